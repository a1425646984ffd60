"""Reconstruction evaluation of both VAE families on preprocessed objects (``reconstruct``, ``eval-vae``).

Per object: encode its training input (VecSet: a fixed surface subsample; grid: the 64^3 shell
occupancy or the dense TSDF; sparse: the SDF band), decode to a mesh, and compare with the object's
watertight surface in the canonical frame:

* ``iou``: volume IoU at the object's stored **uniform** SDF query points (exact labels ``sdf < 0``)
  against containment in the reconstructed mesh (:func:`shapeflow.metrics.mesh_contains`);
* ``chamfer_l1`` (OccNet convention: mean of the two mean unsquared nearest-neighbour distances),
  ``f_score@1%`` (threshold 1% of the ground truth's longest bounding-box side) and
  ``normal_consistency``, from ``n_points`` area-weighted samples on each surface
  (:func:`shapeflow.metrics.surface_metrics`);
* ``encode_s`` / ``decode_s``: wall seconds (decode includes marching cubes).

Meshes from the shell occupancy (TRELLIS sparse structure) are thin double-walled shells; for the
volume metrics the decoded shell is **filled**: cells not reachable from the grid boundary through empty
cells count as inside, so the mesh is the outer surface of the shell (about half a voxel outside the
true surface).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from shapeflow import metrics
from shapeflow.data import format as fmt
from shapeflow.data.datasets import ObjectFolder
from shapeflow.data.latents import seed_of, sparse_band_input, vae_encoder_overrides, vecset_surface
from shapeflow.decode import decode_to_mesh
from shapeflow.geometry.frame import normalize_vertices
from shapeflow.geometry.io import load_mesh
from shapeflow.geometry.marching_cubes import EmptySurfaceError
from shapeflow.geometry.synth import DEFAULT_RESOLUTION, generate_dataset
from shapeflow.metrics import generation_metrics, sample_surface
from shapeflow.models import load_vae, model_kind

log = logging.getLogger(__name__)

METRIC_KEYS = ("iou", "chamfer_l1", "f_score@1%", "normal_consistency", "clean", "components", "encode_s", "decode_s")


def encoder_input(vae, kind: str, obj_dir: Path):
    """The encoder input of one preprocessed object, batched: (1, n, 7) surface, (1, 1, r, r, r) grid or
    the sparse SDF band (a SparseTensor of one object).

    VecSet: the VAE config's ``surface_points`` + ``sharp_points``, the same deterministic subsample as
    ``encode-latents`` (seed 0), so stored latents reproduce.
    """
    c = vae.config
    if kind == "sparse_vae":
        return sparse_band_input(obj_dir, vae)
    if kind == "vecset_vae":
        surface = vecset_surface(obj_dir, c.surface_points, c.sharp_points, seed_of(obj_dir.name, 0))
        return torch.from_numpy(surface)[None]
    name = "tsdf" if c.input == "sdf" else "occ64"
    try:
        g = fmt.read_sample_file(obj_dir / fmt.SAMPLES_FILE, [name])[name]
    except KeyError:
        raise ValueError(f"{obj_dir}: no {name} array (preprocess with --tsdf-res for SDF-grid VAEs)") from None
    return torch.from_numpy(g.astype(np.float32))[None, None]


@torch.no_grad()
def reconstruct_object(vae, kind: str, obj_dir: str | Path, *, resolution: int = 128,
                       strategy: str = "hierarchical", n_points: int = 100_000, with_metrics: bool = True,
                       smooth: float = 0.0) -> dict:
    """Encode + decode one preprocessed object; returns ``{"mesh": (v, f) or None, "metrics": {...}}``.

    ``mesh`` is None (and the metrics the worst) when the decoded field has no surface; ``"empty"`` then
    holds the reason.
    """
    obj_dir = Path(obj_dir)
    p = next(vae.parameters())
    x = encoder_input(vae, kind, obj_dir).to(p.device)
    t0 = time.perf_counter()
    if kind == "vecset_vae":
        gen = torch.Generator().manual_seed(seed_of(obj_dir.name, 1))
        z = vae.encode(x, generator=gen).mode()
    elif kind == "sparse_vae":
        posterior, latent = vae.encode(x)
        z = latent.replace(posterior.mode())
    else:
        z = vae.encode(x).mode()
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    empty = None
    try:
        mesh = decode_to_mesh(vae, kind, z, resolution=resolution, strategy=strategy, smooth=smooth)
    except EmptySurfaceError as e:
        mesh, empty = None, str(e)
    decode_s = time.perf_counter() - t0
    numel = z.feats.numel() if kind == "sparse_vae" else z[0].numel()
    result = {"mesh": mesh, "empty": empty, "latent_numel": int(numel),
              "metrics": {"encode_s": encode_s, "decode_s": decode_s}}
    if with_metrics:
        result["metrics"].update(mesh_metrics(mesh, obj_dir, n_points=n_points))
    return result


def mesh_metrics(mesh, obj_dir: Path, *, n_points: int = 100_000, max_iou_points: int = 100_000) -> dict:
    """Metrics of a reconstructed mesh against a preprocessed object's watertight surface and SDF labels."""
    if mesh is None:
        return {"iou": 0.0, "chamfer_l1": float("nan"), "f_score@1%": 0.0, "normal_consistency": float("nan"),
                "clean": 0.0, "components": 0}
    gt = load_mesh(obj_dir / fmt.MESH_FILE)
    a = fmt.read_sample_file(obj_dir / fmt.SAMPLES_FILE, ["sdf_points", "sdf_values", "sdf_group"])
    sel = np.flatnonzero(a["sdf_group"] == 0)[:max_iou_points]
    pts = a["sdf_points"][sel].astype(np.float64)
    iou = metrics.volume_iou(metrics.mesh_contains(*mesh, pts), a["sdf_values"][sel] < 0)
    s = metrics.surface_metrics(mesh, gt, n_points=n_points, fscore_thresholds=(0.01,), seed=0)
    c = metrics.mesh_cleanliness(*mesh)
    return {"iou": iou, "chamfer_l1": s["chamfer_l1"], "f_score@1%": s["f_score@1%"],
            "normal_consistency": s["normal_consistency"], "clean": float(c["clean"]), "components": c["components"]}


def summarize(rows: list[dict]) -> dict:
    """Mean of each metric over rows (NaNs skipped), plus the count."""
    out = {"objects": len(rows)}
    for k in METRIC_KEYS:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        if len(vals):
            out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


def format_table(rows: list[dict], summary: dict) -> str:
    """A markdown table: one row per object, then the mean."""
    head = ("| object | IoU | Chamfer-L1 | F@1% | NC | clean | components | encode s | decode s |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    def line(name, r):
        return (f"| {name} | {r.get('iou', float('nan')):.4f} | {r.get('chamfer_l1', float('nan')):.5f} | "
                f"{r.get('f_score@1%', float('nan')):.4f} | {r.get('normal_consistency', float('nan')):.4f} | "
                f"{r.get('clean', float('nan')):.2f} | {r.get('components', float('nan')):.2f} | "
                f"{r.get('encode_s', float('nan')):.3f} | {r.get('decode_s', float('nan')):.3f} |\n")
    body = "".join(line(r.get("name", r.get("id", "?")), r) for r in rows)
    return head + body + line(f"**mean ({summary['objects']})**", summary)


def eval_vae(vae_path: str | Path, data_dir: str | Path, *, split: str = "val", val_fraction: float = 0.1,
             split_seed: int = 0, limit: int | None = None, resolution: int = 128,
             strategy: str = "hierarchical", n_points: int = 100_000, device: str = "cpu",
             num_tokens: int | None = None, surface_points: int | None = None, sharp_points: int | None = None,
             progress: bool = True) -> tuple[list[dict], dict]:
    """Evaluate a VAE checkpoint over a preprocessed folder; returns ``(rows, summary)``.

    VecSet only: ``num_tokens`` tokens per shape from ``surface_points`` + ``sharp_points`` input points
    replace the VAE config's counts (they may differ from training). Objects whose decoded field has no
    surface score the worst values and are counted in ``summary["empty"]``.
    """
    overrides = vae_encoder_overrides(model_kind(vae_path), vae_path, num_tokens=num_tokens,
                                      surface_points=surface_points, sharp_points=sharp_points)
    vae, kind = load_vae(vae_path, **overrides)
    vae.to(device)
    folder = ObjectFolder(data_dir, split=split, val_fraction=val_fraction, split_seed=split_seed)
    if len(folder) == 0:
        raise ValueError(f"{data_dir}: no objects in split {split!r}")
    idx = range(len(folder)) if limit is None else range(min(limit, len(folder)))
    rows, empty = [], 0
    for i in tqdm(idx, desc="eval-vae", unit="obj", disable=not progress):
        rec = folder.records[i]
        r = reconstruct_object(vae, kind, folder.object_dir(i), resolution=resolution, strategy=strategy,
                               n_points=n_points)
        if r["empty"] is not None:
            empty += 1
            log.warning("%s: nothing decoded (%s)", rec["id"], r["empty"])
        rows.append({"id": rec["id"], "name": Path(rec["source"]).stem, **r["metrics"]})
    return rows, {**summarize(rows), "empty": empty}


def reference_shapes(folder: str | Path, classes, per_class: int, seed: int, *, resolution: int | None = None,
                     workers: int = 1, progress: bool = False) -> dict:
    """Fresh synthetic reference shapes for the generation metrics, **in the canonical frame**.

    ``shapeflow synth`` meshes (written to ``folder``, reused when present) are put in the frame every
    preprocessed training shape is in (:func:`shapeflow.geometry.frame.normalize_vertices`: bounding-box
    centre at the origin, longest side ``2 * EXTENT``). ``synth`` places shapes by their primitives'
    conservative bounds, so some (lamps, airplanes) are off-centre or up to 10 % smaller than the frame;
    a generator learns the normalized shapes and would otherwise be scored against a shifted target.
    Returns ``{class: [(vertices, faces), ...]}``.
    """
    folder = Path(folder)
    generate_dataset(folder, per_class, seed=seed, resolution=resolution or DEFAULT_RESOLUTION, classes=list(classes),
                     workers=workers, progress=progress)
    out = {}
    for c in classes:
        meshes = [load_mesh(p) for p in sorted((folder / c).glob("*.obj"))[:per_class]]
        out[c] = [(normalize_vertices(v)[0], f) for v, f in meshes]
    return out


def generation_eval(generated: dict, references: dict, *, n_points: int = 2048, seed: int = 0, pooled: bool = True,
                    workers: int = -1) -> dict:
    """COV / MMD / 1-NNA (Chamfer) per class and over all classes (:func:`shapeflow.metrics.generation_metrics`),
    with the cleanliness of the generated meshes (:func:`shapeflow.metrics.mesh_cleanliness`): ``"clean"`` the
    share that is one watertight piece (a failed sample is not clean), ``"extra_components"`` the mean count
    of components beyond the first over the decoded meshes.

    Parameters
    ----------
    generated, references : ``{class: [mesh (v, f) or None, ...]}`` with as many generated as reference
      shapes per class (1-NNA needs equal set sizes). A ``None`` (nothing decoded) counts as a point cloud
      far outside the working cube, so failures are penalised rather than dropped.
    n_points : points sampled per surface (PointFlow / LION protocol: 2048).
    pooled : also the ``"all"`` row (every class in one pool). Its distance matrix grows with the square of
      the total, so at 64 shapes per class and 8 classes it costs several times the per-class rows together.
    workers : KD-tree query threads (:func:`shapeflow.metrics.pairwise_chamfer`; -1 = every core).
    """
    def cloud(mesh, k):
        if mesh is None:
            return np.full((n_points, 3), 10.0)
        return sample_surface(*mesh, n_points, seed=seed + k)[0]

    def pieces(rows: list) -> dict:  # rows: mesh_cleanliness of each sample, None where nothing was decoded
        return {"clean": float(np.mean([r is not None and r["clean"] for r in rows])),
                "extra_components": float(np.mean([max(r["components"] - 1, 0) for r in rows if r is not None]
                                                  or [float("nan")]))}

    table, all_g, all_r, all_clean = {}, [], [], []
    for c in references:
        g = np.stack([cloud(m, k) for k, m in enumerate(generated[c])])
        r = np.stack([cloud(m, 10_000 + k) for k, m in enumerate(references[c])])
        clean = [metrics.mesh_cleanliness(*m) if m is not None else None for m in generated[c]]
        table[c] = {**generation_metrics(g, r, workers=workers), **pieces(clean)}
        all_g.append(g)
        all_r.append(r)
        all_clean += clean
    if pooled:
        table["all"] = {**generation_metrics(np.concatenate(all_g), np.concatenate(all_r), workers=workers),
                        **pieces(all_clean)}
    return table
