"""Raw meshes -> watertight surfaces + training samples, for one object and for a whole dataset.

Per object (:func:`process_object`): load -> canonical frame -> watertight surface (with ``keep_closed``
an input that already is closed is used as it is) -> uniform and sharp surface points -> SDF query
points and exact signed distances -> 64^3 shell occupancy (-> optional dense TSDF) (-> optional sparse SDF
band at ``sparse_res``, :mod:`shapeflow.geometry.sparse_band`) -> files. The file layout is
:mod:`shapeflow.data.format`.

Dataset driver (:func:`preprocess_dataset`, CLI ``shapeflow preprocess``)
-----------------------------------------------------------------------
* **Inputs**: a folder searched recursively for :data:`shapeflow.geometry.io.MESH_EXTENSIONS`
  (case-insensitive), or a text file with one path per line (blank lines and ``#`` comments
  skipped; relative paths are relative to the text file). The list is sorted (folder: by path
  relative to the folder; text file: by the path string), so every machine sees the same order.
* **Sharding** ``--shard I/N`` (0-based ``I``): input ``k`` of the sorted list belongs to shard
  ``k % N``. The N shards partition the inputs, so a job array of N tasks covers a dataset once.
* **Object id** = the first 16 hex digits (64 bits) of the SHA-256 of the file's bytes (collision
  odds ~3e-8 at a million distinct objects). Identical files share one output folder. For ``.gltf``
  files with external buffers only the ``.gltf`` bytes are hashed.
* **Resumable and atomic**: every file goes through :mod:`shapeflow.fileio` (temporary file +
  rename); ``meta.json`` is renamed into place last, so an object is complete iff its
  ``meta.json`` exists and a killed run leaves no partial file under a final name (stale
  temporaries are removed when the object is redone). Complete objects are skipped; so are inputs
  whose id already has a ``failed`` record, unless ``retry_failed``. Each object's random numbers
  come from ``(seed, id)``, so a resumed run writes exactly what an uninterrupted one would.
  ``OUT_DIR/config.json`` records the config; a run with a different config into the same folder
  is refused (objects are keyed by content only, so mixing configs would go unnoticed).
* **Manifest** ``OUT_DIR/manifest.jsonl``: one JSON record per input, appended by the parent process
  with :func:`shapeflow.fileio.append_line` (several shards may share one manifest). Keys: ``id``
  (null when the file could not be read), ``source``, ``status`` (``"ok"``/``"failed"``), ``error``
  (one line or null), ``transform`` (``{"center": [x, y, z], "scale": s}`` with
  ``canonical = (source - center) * scale``; null if failed before normalization) and ``stats``.
  :func:`read_manifest` returns the latest record per id.
* **Isolation**: with ``workers >= 1`` every object runs in a worker process
  (:mod:`multiprocessing`, ``spawn`` by default so it is safe everywhere); exceptions become
  ``failed`` records with a one-line reason, a worker that dies (segfault, out of memory) or exceeds
  ``timeout`` seconds is replaced and its object recorded as failed. ``workers=0`` runs in-process
  (no isolation; for debugging).
* **CPU shares**: fcpw (the distance queries) runs each batch on ``std::thread`` over every CPU the
  process may use. With ``workers >= 2`` (and no more workers than CPUs) each worker is pinned to its
  own ``len(cpus) // workers`` CPUs (Linux ``sched_setaffinity``), so N workers run N x (CPUs / N)
  threads instead of N x CPUs; a single worker uses all CPUs.
* **Statistics** per object: faces/vertices in, ``watertight_in`` (after welding vertices), faces
  and vertices out, components, sharp edges, sample counts (``sparse_nodes``: the sparse band's nodes),
  seconds per stage (``t_load`` ... ``t_sparse``, ``t_write``), total ``seconds``
  (wall) and ``cpu_seconds`` (process CPU time: the wall time on an idle core), and ``peak_rss_mb``
  (the worker process' peak resident memory so far, ``ru_maxrss``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shapeflow import fileio
from shapeflow.data import format as fmt
from shapeflow.geometry import grid, labels, sampling, sparse_band
from shapeflow.geometry.distance import MeshDistance, voxel_distance_bound
from shapeflow.geometry.frame import BOUND, normalize_vertices
from shapeflow.geometry.io import MESH_EXTENSIONS, load_mesh, save_mesh
from shapeflow.geometry.watertight import (
    DEFAULT_EPS_VOXELS,
    DEFAULT_RESOLUTION,
    closed_input,
    is_closed,
    make_watertight,
)
from shapeflow.render import render_views, save_png

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
CONFIG_FILE = "config.json"
ID_HEX_DIGITS = 16
"""Object ids are this many hex digits of the SHA-256 of the file (64 bits)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What to compute per object. Defaults are sized for real training."""

    resolution: int = DEFAULT_RESOLUTION  # watertight grid cells per axis (512+ on servers)
    eps_voxels: float = DEFAULT_EPS_VOXELS  # watertight offset in voxels (Hunyuan3D / Dora: 1; see watertight)
    keep_closed: bool = False  # use inputs that already are closed as they are, without the offset remeshing
    #   (clean closed data only, e.g. `shapeflow synth`'s; see shapeflow.geometry.watertight.closed_input)
    target_faces: int | None = None  # decimate the watertight mesh to ~this many faces (None: keep MC output)
    surface_points: int = 100_000  # uniform area-weighted surface samples
    sharp_points: int = 32_768  # sharp-edge samples (Dora uses 32k-65k)
    sharp_angle: float = 15.0  # dihedral threshold in degrees (Dora)
    sdf_points: int = 500_000  # SDF query points (Hunyuan3D-2.1 stores ~625k)
    sdf_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)  # uniform / near fine / near coarse (as Hunyuan)
    near_sigmas: tuple[float, float] = (0.005, 0.05)  # Gaussian noise of the near groups (Hunyuan3D-2.1)
    tsdf_res: int | None = None  # dense truncated SDF with this many cells (None: skip)
    tsdf_trunc: float | None = None  # TSDF truncation in canonical units (None: 2 TSDF voxels)
    sparse_res: int | None = None  # sparse SDF band (|sdf| <= sqrt(3) voxels) on this node grid (None: skip);
    #   256 for the sparse SDF VAE family, 512 / 1024 on servers
    render_views: int = 0  # RGBA renders of the watertight mesh per object (image-conditioning data)
    render_size: int = 256  # pixels per side of those renders
    seed: int = 0  # combined with the object id for per-object randomness

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        if min(self.surface_points, self.sharp_points, self.sdf_points) < 0:
            raise ValueError("sample counts must be >= 0")
        if self.surface_points < 1:
            raise ValueError("surface_points must be >= 1")
        if len(self.sdf_fractions) != 3 or min(self.sdf_fractions) < 0 or not sum(self.sdf_fractions) > 0:
            raise ValueError(f"sdf_fractions must be 3 non-negative numbers, got {self.sdf_fractions}")
        if self.render_views < 0 or self.render_size < 8:
            raise ValueError("render_views must be >= 0 and render_size >= 8")
        if self.tsdf_res is not None and self.tsdf_res < 2:
            raise ValueError(f"tsdf_res must be >= 2, got {self.tsdf_res}")
        if self.sparse_res is not None and not 2 <= self.sparse_res <= sparse_band.MAX_RES:
            raise ValueError(f"sparse_res must be in [2, {sparse_band.MAX_RES}], got {self.sparse_res}")

    def sdf_counts(self) -> tuple[int, int, int]:
        """Numbers of uniform, near-fine and near-coarse query points (summing to ``sdf_points``)."""
        w = np.asarray(self.sdf_fractions, dtype=np.float64)
        n = np.floor(w / w.sum() * self.sdf_points).astype(int)
        n[np.argmax(w)] += self.sdf_points - int(n.sum())
        return int(n[0]), int(n[1]), int(n[2])


# ---------------------------------------------------------------------------------------------
# Inputs, ids, shards
# ---------------------------------------------------------------------------------------------


def list_inputs(source: str | os.PathLike) -> list[Path]:
    """The sorted list of mesh files named by a folder (recursive) or a text file of paths.

    Raises
    ------
    FileNotFoundError
      If ``source`` does not exist.
    """
    src = Path(source)
    if src.is_dir():
        files = [p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in MESH_EXTENSIONS]
        return sorted(files, key=lambda p: p.relative_to(src).as_posix())
    if src.is_file():
        if src.suffix.lower() in MESH_EXTENSIONS:
            return [src]
        paths = []
        for line in src.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            paths.append(p if p.is_absolute() else src.parent / p)
        return sorted(paths, key=lambda p: str(p))
    raise FileNotFoundError(f"{src}: no such folder or file")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 3/16), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


def shard_inputs(paths: list, index: int, count: int) -> list:
    """Items ``index, index + count, ...`` of an already sorted list (shards partition the list)."""
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"invalid shard {index}/{count}")
    return list(paths)[index::count]


def object_id(path: str | os.PathLike) -> str:
    """First :data:`ID_HEX_DIGITS` hex digits of the SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:ID_HEX_DIGITS]


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def read_manifest(out_dir: str | os.PathLike, status: str | None = None) -> list[dict]:
    """Records of ``OUT_DIR/manifest.jsonl``, the latest per id (per source for records without id).

    Parameters
    ----------
    out_dir : path
    status : "ok", "failed" or None
      Keep only records with this status (after taking the latest per id).

    Returns
    -------
    records : list of dict, ordered by the position of each id's latest record. Unreadable lines (a torn
      line from a killed writer) are skipped with a warning.
    """
    path = Path(out_dir) / MANIFEST
    latest: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping unreadable manifest line", path)
                continue
            key = rec.get("id") or f"source:{rec.get('source')}"
            latest.pop(key, None)  # re-insert: order follows each key's latest record
            latest[key] = rec
    recs = list(latest.values())
    if status is not None:
        recs = [r for r in recs if r.get("status") == status]
    return recs


def _all_records(out_dir: Path) -> list[dict]:
    path = out_dir / MANIFEST
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no details"
    return f"{type(e).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# One object
# ---------------------------------------------------------------------------------------------


def object_rng(config: PreprocessConfig, oid: str) -> np.random.Generator:
    """The random generator of one object: a function of ``(config.seed, id)`` only."""
    return np.random.default_rng([int(config.seed), int(oid, 16)])


def process_object(path: str | os.PathLike, out_dir: str | os.PathLike, config: PreprocessConfig,
                   oid: str | None = None) -> dict:
    """Preprocess one mesh file into ``OUT_DIR/<id>/``; never raises for bad input.

    Returns
    -------
    record : dict
      The manifest record (``status`` ``"ok"`` or ``"failed"`` with a one-line ``error``).
    """
    t_start = time.perf_counter()
    record = {"id": oid, "source": str(path), "status": "failed", "error": None, "transform": None,
              "stats": {}}
    try:
        if oid is None:
            oid = object_id(path)
            record["id"] = oid
        record.update(_process(Path(path), Path(out_dir), config, oid, record["stats"]))
        record["status"] = "ok"
    except Exception as e:  # every failure becomes a record; the run goes on
        reason = _one_line(e)
        record["error"] = reason if str(path) in reason else f"{path}: {reason}"
        record["stats"]["seconds"] = round(time.perf_counter() - t_start, 4)
        log.debug("failed %s: %s", path, record["error"])
    return record


def _process(path: Path, out_dir: Path, cfg: PreprocessConfig, oid: str, stats: dict) -> dict:
    t0 = time.perf_counter()
    c0 = time.process_time()
    tick = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stats[name] = round(now - tick[0], 4)
        tick[0] = now

    v_src, f = load_mesh(path)
    stats["faces_in"] = int(len(f))
    stats["vertices_in"] = int(len(v_src))
    try:
        v, transform = normalize_vertices(v_src)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    stats["watertight_in"] = is_closed(v, f)
    lap("t_load")
    rng = object_rng(cfg, oid)

    wt = closed_input(v, f) if cfg.keep_closed and stats["watertight_in"] else None
    stats["kept_input"] = wt is not None
    if wt is None:
        wt = make_watertight(v, f, resolution=cfg.resolution, eps_voxels=cfg.eps_voxels,
                             target_faces=cfg.target_faces)
    # watertight.ply stores float32 positions: sample and label exactly that mesh.
    wt.vertices = wt.vertices.astype(np.float32).astype(np.float64)
    ws = wt.stats
    for k in ("faces_used", "faces_out", "vertices_out", "components", "band_nodes", "decimated",
              "t_band", "t_udf", "t_flood", "t_mc", "t_decimate", "t_check"):
        stats[k] = round(ws[k], 4) if isinstance(ws[k], float) else ws[k]
    stats["volume"] = round(ws["volume"], 6)
    stats["area"] = round(ws["area"], 6)
    stats["eps"] = ws["eps"]
    lap("t_watertight")

    surf = MeshDistance(wt.vertices, wt.faces)
    pu, nu, _ = sampling.sample_surface(wt.vertices, wt.faces, cfg.surface_points, rng)
    lap("t_surface")
    h = grid.spacing(cfg.resolution, BOUND)
    start, end = sampling.sharp_edges(v, f, angle_deg=cfg.sharp_angle)
    stats["sharp_edges"] = int(len(start))
    ps, ns = sampling.sample_sharp(start, end, cfg.sharp_points, surf, ws["eps"] + 0.5 * h, rng)
    stats["surface_uniform"] = int(len(pu))
    stats["surface_sharp"] = int(len(ps))
    lap("t_sharp")

    occ = labels.surface_voxels(wt.vertices, wt.faces, res=fmt.OCC_RES)
    stats["occ64_voxels"] = int(occ.sum())
    lap("t_occ")

    surface_points = np.concatenate([pu, ps])
    n_u, n_f, n_c = cfg.sdf_counts()
    q, group, near_bound = sampling.sample_queries(surface_points, n_u, n_f, n_c, rng, sigmas=cfg.near_sigmas,
                                                   return_bound=True)
    q = q.astype(np.float32).astype(np.float64)  # labels are exact for the stored float32 points
    bound = np.minimum(voxel_distance_bound(occ, q), near_bound + 1e-6)  # only narrows fcpw's search
    sdf = surf.signed_distance(q, sign_hint=wt.sign_hint(q), upper_bound=bound)
    stats["sdf_points"] = int(len(q))
    lap("t_sdf")

    arrays = {
        "surface_points": surface_points.astype(np.float32),
        "surface_normals": np.concatenate([nu, ns]).astype(np.float32),
        "surface_sharp": np.concatenate([np.zeros(len(pu), bool), np.ones(len(ps), bool)]),
        "sdf_points": q.astype(np.float32),
        "sdf_values": sdf.astype(np.float32),
        "sdf_group": group,
        "occ64": occ,
    }
    meta_extra: dict = {}
    if cfg.tsdf_res is not None:
        tsdf, trunc = labels.truncated_sdf(surf, cfg.tsdf_res, cfg.tsdf_trunc, sign_hint=wt.sign_hint)
        arrays["tsdf"] = tsdf
        meta_extra["tsdf"] = {"res": int(cfg.tsdf_res), "trunc": trunc, "grid": "node", "bound": BOUND}
        lap("t_tsdf")
    if cfg.sparse_res is not None:
        coords, band_sdf = sparse_band.band_nodes(wt.vertices, wt.faces, cfg.sparse_res, distance=surf,
                                                  band=fmt.SPARSE_BAND_VOXELS)
        arrays["sparse_coords"] = coords
        arrays["sparse_sdf"] = band_sdf
        arrays["sparse_res"] = np.asarray(cfg.sparse_res, dtype=np.int32)
        meta_extra["sparse"] = {"res": int(cfg.sparse_res), "band_voxels": fmt.SPARSE_BAND_VOXELS,
                                "nodes": int(len(coords)), "grid": "node", "bound": BOUND}
        stats["sparse_nodes"] = int(len(coords))
        lap("t_sparse")

    obj_dir = out_dir / oid
    obj_dir.mkdir(parents=True, exist_ok=True)
    for stale in obj_dir.glob(".*.tmp-*"):  # temporaries of a killed run
        stale.unlink(missing_ok=True)
    fmt.write_sample_file(obj_dir / fmt.SAMPLES_FILE, arrays)
    save_mesh(obj_dir / fmt.MESH_FILE, wt.vertices, wt.faces)
    lap("t_write")
    if cfg.render_views:
        meta_extra["views"] = _render_views(obj_dir, wt.vertices, wt.faces, cfg, int(rng.integers(2**31)))
        lap("t_render")
    stats["seconds"] = round(time.perf_counter() - t0, 4)
    stats["cpu_seconds"] = round(time.process_time() - c0, 4)  # = wall time on an idle core
    peak = _peak_rss_mb()
    stats["peak_rss_mb"] = None if peak is None else round(peak, 1)
    stats["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"transform": transform.as_dict(), "error": None}
    meta = {
        "format_version": fmt.FORMAT_VERSION,
        "id": oid,
        "source": str(path),
        "status": "ok",
        "error": None,
        "transform": result["transform"],
        "stats": stats,
        "config": _config_dict(cfg),
        "arrays": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()},
        **meta_extra,
    }
    fileio.write_json(obj_dir / fmt.META_FILE, meta)  # last: marks the object complete
    return result


def _render_views(obj_dir: Path, v: np.ndarray, f: np.ndarray, cfg: PreprocessConfig, seed: int) -> dict:
    """Random-view RGBA renders for image conditioning: ``<id>/views/<k>.png`` + cameras in meta.json."""
    images, cameras = render_views(v, f, cfg.render_views, cfg.render_size, seed=seed)
    names = []
    for k, img in enumerate(images):
        names.append(f"{fmt.VIEWS_DIR}/{k:02d}.png")
        save_png(obj_dir / names[-1], img)
    return {"files": names, "cameras": cameras}


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None where the OS does not report it)."""
    try:
        import resource  # lazy: POSIX only
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # macOS: bytes, Linux: KiB


def _config_dict(cfg: PreprocessConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def is_complete(out_dir: str | os.PathLike, oid: str) -> bool:
    """Whether ``OUT_DIR/<id>/meta.json`` exists (it is written last)."""
    return (Path(out_dir) / oid / fmt.META_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# Dataset driver
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Counts of one :func:`preprocess_dataset` run."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.ok} ok, {self.failed} failed, {self.skipped} skipped "
                f"in {self.seconds:.1f} s")


def preprocess_dataset(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PreprocessConfig | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    timeout: float | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    start_method: str = "spawn",
    limit: int | None = None,
) -> Summary:
    """Preprocess every mesh of ``source`` (one shard of it) into ``out_dir``.

    Parameters
    ----------
    source : path
      Folder (searched recursively) or text file of paths.
    out_dir : path
    config : PreprocessConfig
    workers : int
      Worker processes (0 = in-process, no crash isolation).
    shard : (index, count)
    timeout : float or None
      Seconds per object before its worker is killed and the object recorded as failed.
    retry_failed : bool
      Redo inputs whose id has a ``failed`` record.
    progress : bool
      Show a tqdm progress bar (stderr).
    start_method : "spawn", "forkserver" or "fork"
    limit : int or None
      Process at most this many new objects (the rest are left for a later run).

    Returns
    -------
    Summary
    """
    t0 = time.perf_counter()
    cfg = config or PreprocessConfig()
    inputs = shard_inputs(list_inputs(source), *shard)  # raises before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, cfg)
    manifest = out / MANIFEST
    summary = Summary()

    existing = _all_records(out)
    latest_by_id: dict[str, dict] = {}
    have_pair: set[tuple] = set()
    for rec in existing:
        if rec.get("id"):
            latest_by_id[rec["id"]] = rec
        have_pair.add((rec.get("id"), rec.get("source"), rec.get("status")))

    def emit(rec: dict) -> None:
        fileio.append_line(manifest, json.dumps(rec, separators=(",", ":")))
        have_pair.add((rec.get("id"), rec.get("source"), rec.get("status")))
        if rec.get("id"):
            latest_by_id[rec["id"]] = rec

    tasks: list[tuple[str, str]] = []
    queued_ids: set[str] = set()
    duplicates: list[tuple[str, str]] = []
    for p in inputs:
        src = str(p)
        try:
            oid = object_id(p)
        except OSError as e:
            reason = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read ({_one_line(e)})"
            rec = {"id": None, "source": src, "status": "failed", "error": f"{src}: {reason}",
                   "transform": None, "stats": {}}
            if (None, src, "failed") not in have_pair:
                emit(rec)
            summary.failed += 1
            continue
        if is_complete(out, oid):
            _ensure_record(out, oid, src, have_pair, latest_by_id, emit)
            summary.skipped += 1
            continue
        prev = latest_by_id.get(oid)
        if prev is not None and prev.get("status") == "failed" and not retry_failed:
            if (oid, src, "failed") not in have_pair:
                emit({**prev, "source": src})
            summary.skipped += 1
            continue
        if oid in queued_ids:
            duplicates.append((src, oid))
            continue
        if limit is not None and len(tasks) >= limit:
            continue
        queued_ids.add(oid)
        tasks.append((src, oid))

    bar = tqdm(total=len(tasks), disable=not progress, unit="mesh", dynamic_ncols=True)

    def on_result(rec: dict) -> None:
        emit(rec)
        if rec["status"] == "ok":
            summary.ok += 1
        else:
            summary.failed += 1
        bar.update(1)
        bar.set_postfix(ok=summary.ok, failed=summary.failed, refresh=False)

    try:
        if workers <= 0:
            for src, oid in tasks:
                on_result(process_object(src, out, cfg, oid))
        else:
            _run_pool(tasks, out, cfg, workers, timeout, start_method, on_result)
    finally:
        bar.close()
    for src, oid in duplicates:  # same content as an input processed above
        rec = latest_by_id.get(oid)
        if rec is not None and (oid, src, rec.get("status")) not in have_pair:
            emit({**rec, "source": src})
        summary.skipped += 1
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_config(out: Path, cfg: PreprocessConfig) -> None:
    """Record the config in ``OUT_DIR/config.json``; refuse to mix objects made with another config."""
    path = out / CONFIG_FILE
    new = _config_dict(cfg)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        default = _config_dict(PreprocessConfig())  # a key added after `old` was written has its default
        old = {**{k: v for k, v in default.items() if k not in old}, **old}
        diff = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise ValueError(f"{out} was preprocessed with a different config: {', '.join(diff)}; "
                             "use another OUT_DIR")
        return
    fileio.write_json(path, new)


def _ensure_record(out: Path, oid: str, src: str, have_pair: set, latest_by_id: dict, emit) -> None:
    """A complete object gets an ``ok`` manifest record for this source if it has none yet."""
    if (oid, src, "ok") in have_pair:
        return
    latest = latest_by_id.get(oid)
    if latest is not None and latest.get("status") == "ok":
        emit({**latest, "source": src})
        return
    meta = json.loads((out / oid / fmt.META_FILE).read_text(encoding="utf-8"))
    rec = {k: meta.get(k) for k in ("id", "source", "status", "error", "transform", "stats")}
    emit({**rec, "source": src})


# ---------------------------------------------------------------------------------------------
# Worker pool with crash and timeout isolation
# ---------------------------------------------------------------------------------------------


def _cpu_shares(workers: int) -> list[set[int] | None]:
    """Disjoint CPU sets, one per worker (None: no pinning).

    fcpw parallelises every batched query over all CPUs the process may use; without a share each,
    ``workers`` processes would each start as many threads as there are CPUs.
    """
    if workers < 2 or not hasattr(os, "sched_getaffinity"):
        return [None] * workers
    cpus = sorted(os.sched_getaffinity(0))
    if workers > len(cpus):
        return [None] * workers
    k = len(cpus) // workers
    return [set(cpus[i * k:(i + 1) * k]) for i in range(workers)]


def _worker_main(conn, out_dir: str, cfg_dict: dict, cpus: set[int] | None = None) -> None:
    """Worker process: receive ``(index, source, id)``, reply ``(index, record)``; ``None`` stops."""
    cfg = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    logging.basicConfig(level=logging.WARNING)
    if cpus:
        os.sched_setaffinity(0, cpus)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        index, src, oid = msg
        conn.send((index, process_object(src, out_dir, cfg, oid)))


class _Worker:
    def __init__(self, ctx, out_dir: str, cfg_dict: dict, cpus: set[int] | None = None) -> None:
        self.cpus = cpus
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, out_dir, cfg_dict, cpus), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[int, str, str] | None = None
        self.started = 0.0

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _run_pool(tasks, out: Path, cfg: PreprocessConfig, workers: int, timeout: float | None,
              start_method: str, on_result) -> None:
    if not tasks:
        return
    ctx = mp.get_context(start_method)
    cfg_dict = _config_dict(cfg)
    pending = deque(enumerate(tasks))
    n = min(workers, len(tasks))
    pool = [_Worker(ctx, str(out), cfg_dict, cpus) for cpus in _cpu_shares(n)]

    def failed(task, reason: str) -> dict:
        _, src, oid = task
        return {"id": oid, "source": src, "status": "failed", "error": f"{src}: {reason}",
                "transform": None, "stats": {}}

    try:
        while pending or any(w.task is not None for w in pool):
            for w in pool:
                if w.task is None and pending:
                    index, (src, oid) = pending.popleft()
                    w.task = (index, src, oid)
                    w.started = time.monotonic()
                    w.conn.send(w.task)
            busy = [w for w in pool if w.task is not None]
            mp_wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=1.0)
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                result = None
                try:
                    if w.conn.poll():
                        _, result = w.conn.recv()
                except (EOFError, OSError):
                    result = None
                if result is not None:
                    w.task = None
                    on_result(result)
                    continue
                if not w.proc.is_alive():
                    code = w.proc.exitcode
                    on_result(failed(w.task, f"worker process died (exit code {code})"))
                    w.task = None
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, str(out), cfg_dict, w.cpus)
                elif timeout is not None and time.monotonic() - w.started > timeout:
                    on_result(failed(w.task, f"timed out after {timeout:g} s"))
                    w.task = None
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, str(out), cfg_dict, w.cpus)
    finally:
        for w in pool:
            w.stop(kill=w.task is not None)
