"""Encode a preprocessed dataset once with a trained VAE, so generator training reads latents, not meshes.

Layout of a latent folder (``shapeflow encode-latents``)::

    OUT_DIR/latents.json      what produced it: VAE checkpoint and weights digest, kind, latent shape,
                              latent scale, encoder inputs
    OUT_DIR/manifest.jsonl    one record per object: id, class (source parent folder), source, status
    OUT_DIR/<id>.npy          float32 posterior **mean** of the object times the VAE's latent scale
                              (``vae.scale_latents``): (m, c) tokens or (c, r, r, r) grid
    OUT_DIR/<id>.npz          sparse latents (sparse SDF VAE): ``coords`` (m, 3) int16 latent-grid nodes
                              [i, j, k], sorted, and ``feats`` (m, c) float32, scaled like the others
    OUT_DIR/structure/        sparse latents only: a latent folder of its own (same layout) with each
                              object's structure grid ``<id>.npy`` (1, r, r, r), +1 at its latent voxels,
                              -1 elsewhere (r = cells of the latent grid): the data of the stage-1 grid DiT

Design choices

* The posterior mean, not a sample (TRELLIS ``encode_ss_latent.py``; the flow then models the mean
  latents, which decode to the sharpest shapes).
* VecSet encoder inputs are a fixed subsample of the object's surface samples (the VAE's
  ``surface_points`` uniform + ``sharp_points`` sharp points, seeded by the object id) and FPS queries
  seeded the same way, so a latent depends only on (object, VAE, counts), never on the batch or shard it
  was encoded in. The counts are the VAE config's; ``num_tokens`` / ``surface_points`` / ``sharp_points``
  override them for one encode (config overrides, checked by the config).
* The stored latents are what generators model: ``vae.scale_latents(z)`` (Hunyuan3D's scale factor; 1 for
  shapeflow's own VAEs). ``generate`` undoes it with ``vae.unscale_latents`` before decoding.
* Sharded (``shard = (i, n)`` takes every n-th object of the id-sorted list) and resumable: an object
  whose ``.npy`` exists is skipped; files are written atomically, and a manifest record is appended
  only after its file is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from shapeflow import fileio
from shapeflow.data import format as fmt
from shapeflow.data.datasets import GridDataset, class_of, is_val
from shapeflow.data.preprocess import read_manifest
from shapeflow.models import load_vae, model_kind
from shapeflow.models.sparse_dit import structure_grid
from shapeflow.sparse import SparseTensor

log = logging.getLogger(__name__)

INFO_FILE = "latents.json"
MANIFEST_FILE = "manifest.jsonl"


def seed_of(oid: str, seed: int) -> int:
    """A 63-bit seed of (object id, seed): what makes an object's encoder input and queries reproducible."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{oid}".encode()).digest()[:8], "big") >> 1


def vecset_surface(obj_dir: Path, surface_points: int, sharp_points: int, seed: int) -> np.ndarray:
    """The deterministic encoder input of one object: ``(surface_points + sharp_points, 7)`` float32."""
    a = fmt.read_sample_file(obj_dir / fmt.SAMPLES_FILE, ["surface_points", "surface_normals", "surface_sharp"])
    rng = np.random.default_rng(seed)
    sharp = a["surface_sharp"]
    uni, shp = np.flatnonzero(~sharp), np.flatnonzero(sharp)
    if len(uni) == 0:
        uni = shp
    iu = rng.choice(uni, surface_points, replace=len(uni) < surface_points)
    pool = shp if len(shp) else uni
    ish = rng.choice(pool, sharp_points, replace=len(pool) < sharp_points) if sharp_points else pool[:0]
    idx = np.concatenate([iu, ish])
    flag = np.concatenate([np.zeros(len(iu)), sharp[ish].astype(np.float64)])
    return np.concatenate([a["surface_points"][idx], a["surface_normals"][idx], flag[:, None]], 1).astype(np.float32)


def sparse_band_input(obj_dir: Path, model) -> SparseTensor:
    """The sparse SDF VAE's input for one preprocessed object: its stored band (``--sparse-res R``) as a
    batch of one, features ``[tsdf, 1]`` on the grid of ``R`` cells."""
    path = obj_dir / fmt.SAMPLES_FILE
    try:
        a = fmt.read_sample_file(path, list(fmt.SPARSE_ARRAYS))
    except KeyError:
        raise ValueError(f"{obj_dir}: no sparse SDF band (preprocess with --sparse-res R)") from None
    res = int(a["sparse_res"])
    if res % model.config.factor:
        raise ValueError(f"{obj_dir}: band at {res}^3 is not a multiple of the VAE's latent factor "
                         f"{model.config.factor}")
    return model.band_input(a["sparse_coords"], a["sparse_sdf"], res)


def sparse_latent_file(out: Path, oid: str) -> Path:
    return out / f"{oid}.npz"


def read_sparse_latent(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse latent file -> ``(coords (m, 3) int32, feats (m, c) float32)``."""
    with np.load(path) as z:
        return torch.from_numpy(z["coords"].astype(np.int32)), torch.from_numpy(z["feats"].astype(np.float32))


def latent_file(root: Path, oid: str) -> Path:
    """The latent file of object ``oid`` in a latent folder: ``<id>.npz`` (sparse) or ``<id>.npy``."""
    sparse = sparse_latent_file(root, oid)
    return sparse if sparse.is_file() else root / f"{oid}.npy"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes, bytes; first 16 hex digits), whatever file it
    came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def vae_encoder_overrides(kind: str, source, *, num_tokens: int | None = None, surface_points: int | None = None,
                          sharp_points: int | None = None) -> dict:
    """The VecSet encoder-count overrides that were given, as config fields; an error for other families."""
    given = {k: v for k, v in (("num_tokens", num_tokens), ("surface_points", surface_points),
                               ("sharp_points", sharp_points)) if v is not None}
    if given and kind != "vecset_vae":
        raise ValueError(f"{source}: token and point counts ({', '.join(given)}) apply to VecSet VAEs, "
                         f"not {kind}")
    return given


@torch.no_grad()
def encode_dataset(
    vae_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 8,
    num_tokens: int | None = None,
    surface_points: int | None = None,
    sharp_points: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Encode every ``ok`` object of ``data_dir`` with the VAE at ``vae_path`` into ``out_dir``.

    ``num_tokens`` / ``surface_points`` / ``sharp_points`` (VecSet only) replace the VAE config's counts.
    Returns a summary ``{"encoded", "skipped", "failed", "seconds", "latent_shape"}``; an object that cannot
    be read is recorded as failed (with the reason) and the rest go on.
    """
    vae_path, data_dir, out = Path(vae_path), Path(data_dir), Path(out_dir)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: index must be in [0, {count})")
    overrides = vae_encoder_overrides(model_kind(vae_path), vae_path, num_tokens=num_tokens,
                                      surface_points=surface_points, sharp_points=sharp_points)
    model, kind = load_vae(vae_path, **overrides)
    model.to(device)
    records = sorted(read_manifest(data_dir, status="ok"), key=lambda r: r["id"])
    records = [r for r in records if (data_dir / r["id"] / fmt.META_FILE).is_file()]
    if not records:
        raise ValueError(f"{data_dir}: no preprocessed objects (status ok) to encode")
    mine = records[index::count]
    c = model.config
    info = {"vae": str(vae_path), "vae_sha256": weights_digest(model), "kind": kind, "data_dir": str(data_dir),
            "seed": seed, "latent_scale": c.latent_scale, "version": 2}
    if kind == "vecset_vae":
        info.update(surface_points=c.surface_points, sharp_points=c.sharp_points, num_tokens=c.num_tokens,
                    latent_shape=[c.num_tokens, c.latent_channels])
    elif kind == "sparse_vae":  # a variable number of latent nodes per object
        info.update(source="sparse band", factor=c.factor, latent_shape=[-1, c.latent_channels])
    else:
        info.update(source="tsdf" if c.input == "sdf" else "occ64", latent_shape=list(c.latent_shape))
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / INFO_FILE
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        same = ("vae", "data_dir")  # paths may be spelled differently; the weights' digest decides
        keep = {k: v for k, v in old.items() if k not in same}
        if keep != {k: v for k, v in info.items() if k not in same}:
            raise ValueError(f"{info_path}: folder was encoded with different settings ({old}); "
                             "use a new output folder")
    else:
        fileio.write_json(info_path, info)

    todo = [r for r in mine if not latent_file(out, r["id"]).is_file()]
    summary = {"encoded": 0, "skipped": len(mine) - len(todo), "failed": 0, "latent_shape": info["latent_shape"]}
    t0 = time.perf_counter()
    grid_ds = (GridDataset(data_dir, source=info["source"], normalize_tsdf=False, split="all")
               if kind == "grid_vae" else None)
    grid_index = {r["id"]: i for i, r in enumerate(grid_ds.records)} if grid_ds is not None else None
    bar = tqdm(total=len(todo), desc="encode", unit="obj", disable=not progress)
    if kind == "sparse_vae":
        _encode_sparse(model, data_dir, out, todo, device, summary, bar, info)
        todo = []  # done above: a sparse band is a batch of its own
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        inputs, ok = [], []
        for r in chunk:
            try:
                if kind == "vecset_vae":
                    inputs.append(vecset_surface(data_dir / r["id"], c.surface_points, c.sharp_points,
                                                 seed_of(r["id"], seed)))
                else:
                    inputs.append(grid_ds[grid_index[r["id"]]]["grid"].numpy())
                ok.append(r)
            except (OSError, ValueError, KeyError) as e:
                summary["failed"] += 1
                _record_failure(out, r, e)
        if ok:
            x = torch.from_numpy(np.stack(inputs)).to(device)
            if kind == "vecset_vae":
                gens = [torch.Generator().manual_seed(seed_of(r["id"], seed + 1)) for r in ok]
                z = torch.cat([model.encode(x[i:i + 1], generator=g).mode() for i, g in enumerate(gens)])
            else:
                z = model.encode(x).mode()
            for r, zi in zip(ok, model.scale_latents(z).float().cpu().numpy()):
                with fileio.atomic_path(out / f"{r['id']}.npy") as tmp:
                    np.save(tmp, zi.astype(np.float32))
                _record(out, r, "ok", None)
                summary["encoded"] += 1
        bar.update(len(chunk))
    bar.close()
    summary["seconds"] = time.perf_counter() - t0
    return summary


STRUCTURE_DIR = "structure"


def _structure_info(info: dict, cells: int) -> dict:
    return {**{k: info[k] for k in ("vae", "vae_sha256", "data_dir", "version")}, "kind": "structure",
            "source": "sparse latent voxels", "latent_shape": [1, cells, cells, cells]}


def _encode_sparse(model, data_dir: Path, out: Path, todo: list[dict], device, summary: dict, bar,
                   info: dict) -> None:
    """Sparse SDF VAE: one object at a time (its band is the batch) -> ``<id>.npz`` latent coords + feats, and
    its structure grid in ``structure/<id>.npy``."""
    sdir = out / STRUCTURE_DIR
    for r in todo:
        bar.update(1)
        try:
            x = sparse_band_input(data_dir / r["id"], model).to(device)
        except (OSError, ValueError, KeyError) as e:
            summary["failed"] += 1
            _record_failure(out, r, e)
            continue
        with torch.no_grad():
            posterior, latent = model.encode(x)
        feats = model.scale_latents(posterior.mode()).float().cpu().numpy()
        _write_structure(sdir, r, latent, info)
        with fileio.atomic_path(sparse_latent_file(out, r["id"])) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, coords=latent.coords[:, 1:].cpu().numpy().astype(np.int16), feats=feats)
        _record(out, r, "ok", None)
        summary["encoded"] += 1


def _write_structure(sdir: Path, rec: Mapping, latent: SparseTensor, info: dict) -> None:
    """The object's structure grid (its latent voxels on the ``cells^3`` grid) into ``sdir``; an object whose
    band reaches the last node plane of the grid (coarse ``--sparse-res``: the band of a shape touching the
    0.95 box spills past the bound) is recorded failed there, its sparse latent is kept."""
    cells = latent.shape - 1
    _write_structure_info(sdir, _structure_info(info, cells))
    coords = latent.coords[:, 1:].cpu()
    if len(coords) and int(coords.max()) >= cells:
        _record_failure(sdir, rec, ValueError(
            f"latent voxels on the last node plane ({int(coords.max())}) of the {cells}^3 structure grid; "
            "preprocess with a finer --sparse-res"))
        return
    with fileio.atomic_path(sdir / f"{rec['id']}.npy") as tmp:
        np.save(tmp, structure_grid(coords, cells).numpy())
    _record(sdir, rec, "ok", None)


def _write_structure_info(sdir: Path, info: dict) -> None:
    path = sdir / INFO_FILE
    if path.is_file():
        if json.loads(path.read_text())["latent_shape"] != info["latent_shape"]:
            raise ValueError(f"{path}: structure grids of another size; objects of one latent folder share "
                             "one band resolution")
        return
    sdir.mkdir(parents=True, exist_ok=True)
    fileio.write_json(path, info)


def _record_failure(out: Path, rec: Mapping, e: Exception) -> None:
    _record(out, rec, "failed", f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")


def _record(out: Path, rec: Mapping, status: str, error: str | None) -> None:
    line = {"id": rec["id"], "class": class_of(rec), "source": rec["source"], "status": status, "error": error}
    fileio.append_line(out / MANIFEST_FILE, json.dumps(line))


def read_latent_manifest(root: str | os.PathLike) -> list[dict]:
    """Latest ``ok`` record per id of a latent folder whose ``.npy`` exists, sorted by id."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST_FILE} (not a latent folder; run shapeflow encode-latents)")
    latest: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[rec["id"]] = rec
    return sorted((r for r in latest.values() if r["status"] == "ok" and latent_file(root, r["id"]).is_file()),
                  key=lambda r: r["id"])


class LatentDataset(Dataset):
    """Encoded latents for generator training: items ``{"latent": tensor, "id": str, ["label": int]}``
    (sparse latents: also ``"coords"``, the latent nodes).

    Parameters
    ----------
    root : a latent folder (``shapeflow encode-latents``).
    split : "train", "val" or "all"; the split is by id hash, as :class:`~shapeflow.data.datasets.ObjectFolder`.
    classes : class names (index = label) for class-conditional training; objects of other classes are
      left out. ``None``: no labels.
    views_root : a preprocessed folder whose objects have rendered views (``preprocess --render-views``);
      items then carry ``"image"``: one of the object's views, (H, W, 4) uint8, chosen at random.
    """

    def __init__(self, root: str | os.PathLike, *, split: str = "train", val_fraction: float = 0.1,
                 split_seed: int = 0, classes: Sequence[str] | None = None, cache: bool = True,
                 views_root: str | os.PathLike | None = None):
        self.root = Path(root)
        self.views_root = Path(views_root) if views_root else None
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        self.info = json.loads((self.root / INFO_FILE).read_text()) if (self.root / INFO_FILE).is_file() else {}
        recs = read_latent_manifest(self.root)
        if split != "all":
            recs = [r for r in recs if is_val(r["id"], val_fraction, split_seed) == (split == "val")]
        self.class_to_label = None if classes is None else {c: i for i, c in enumerate(classes)}
        if self.class_to_label is not None:
            unknown = sorted({r["class"] for r in recs} - set(self.class_to_label))
            if unknown:
                log.info("%s: leaving out objects of classes not in the class list: %s", self.root, unknown)
            recs = [r for r in recs if r["class"] in self.class_to_label]
        self.records = recs
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        if self.views_root is not None:
            missing = [r["id"] for r in recs if not sorted((self.views_root / r["id"] / fmt.VIEWS_DIR).glob("*.png"))]
            if missing:
                raise ValueError(f"{self.views_root}: {len(missing)} object(s) have no rendered views (e.g. "
                                 f"{missing[0]}); preprocess with --render-views N")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sparse(self) -> bool:
        """Sparse latents (``<id>.npz``): items carry ``coords`` (m, 3) and ``latent`` (m, c) features."""
        return self.info.get("kind") == "sparse_vae"

    def latent(self, index: int) -> torch.Tensor:
        if self.sparse:
            raise ValueError(f"{self.root}: sparse latents have coordinates too; read items (dataset[i])")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        z = torch.from_numpy(np.load(self.root / f"{self.records[index]['id']}.npy"))
        if self._cache is not None:
            self._cache[index] = z
        return z

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        if self.sparse:
            coords, feats = read_sparse_latent(sparse_latent_file(self.root, rec["id"]))
            item = {"coords": coords, "latent": feats, "id": rec["id"]}
        else:
            item = {"latent": self.latent(index), "id": rec["id"]}
        if self.class_to_label is not None:
            item["label"] = self.class_to_label[rec["class"]]
        if self.views_root is not None:
            views = sorted((self.views_root / rec["id"] / fmt.VIEWS_DIR).glob("*.png"))
            pick = views[int(torch.randint(len(views), ()))]  # global RNG: seeded per item by the loop
            item["image"] = torch.from_numpy(np.asarray(Image.open(pick).convert("RGBA")).copy())
        return item

    def stack(self) -> torch.Tensor:
        """All latents as one tensor ``(n, ...)`` (for fitting the latent normaliser)."""
        if not len(self):
            raise ValueError(f"{self.root}: no latents in this split")
        return torch.stack([self.latent(i) for i in range(len(self))])
