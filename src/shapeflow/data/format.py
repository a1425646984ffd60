"""THE per-object training-sample file: array names, shapes, dtypes and units, written once here.

Layout of a preprocessed dataset (``shapeflow preprocess INPUT OUT_DIR``)::

    OUT_DIR/manifest.jsonl           one JSON record per input (see shapeflow.data.preprocess)
    OUT_DIR/config.json              the PreprocessConfig every object was made with
    OUT_DIR/<id>/samples.safetensors the arrays below
    OUT_DIR/<id>/watertight.ply      the watertight surface the samples were taken from (canonical frame)
    OUT_DIR/<id>/views/NN.png        optional RGBA renders (image conditioning; cameras in meta.json)
    OUT_DIR/<id>/meta.json           written last: its presence marks the object complete

``<id>`` is the first 16 hex digits (64 bits) of the SHA-256 of the source file's bytes.

Arrays in ``samples.safetensors`` (all coordinates in the canonical frame of
:mod:`shapeflow.geometry.frame`: object in ``[-0.95, 0.95]^3``, working cube ``[-1, 1]^3``):

==================  ======================  =======  ==================================================
name                shape                   dtype    meaning
==================  ======================  =======  ==================================================
``surface_points``  (Ns, 3)                 float32  points on the watertight surface: ``n_uniform``
                                                     area-weighted uniform points first, then
                                                     ``n_sharp`` sharp-edge points (``n_sharp`` may be
                                                     0, or fewer than requested)
``surface_normals`` (Ns, 3)                 float32  unit outward normals of those points
``surface_sharp``   (Ns,)                   bool     True for the sharp-edge points (the tail)
``sdf_points``      (Q, 3)                  float32  query points: group 0, then 1, then 2
``sdf_values``      (Q,)                    float32  signed distance to the watertight surface,
                                                     **negative inside**, canonical units (exact)
``sdf_group``       (Q,)                    uint8    0 uniform in the cube, 1 near surface (fine noise,
                                                     sigma 0.005), 2 near surface (coarse, sigma 0.05)
``occ64``           (64, 64, 64)            bool     surface-shell occupancy on the 64^3 cell grid
                                                     (voxel set iff the surface passes through it)
``tsdf``            (R+1, R+1, R+1)         float32  optional: truncated SDF on the node grid with R
                                                     cells, clipped to ``+-trunc`` (R and trunc in
                                                     meta.json)
``sparse_coords``   (Nb, 3)                 int16    optional (``--sparse-res R``): node indices
                                                     ``[i, j, k]`` in ``0 .. R`` of the sparse SDF band,
                                                     sorted lexicographically by ``(i, j, k)``, unique
``sparse_sdf``      (Nb,)                   float32  their exact signed distances (canonical units,
                                                     **negative inside**), ``|sdf| <= sqrt(3) h``
``sparse_res``      ()                      int32    R, the cells per axis of that node grid
==================  ======================  =======  ==================================================

Grids are indexed ``[i, j, k] = [x, y, z]`` (:mod:`shapeflow.geometry.grid`).

**Sparse SDF band** (the data of the sparse SDF VAEs, Direct3D-S2 / TRELLIS.2;
:mod:`shapeflow.geometry.sparse_band`): on THE node grid with ``R`` cells over ``[-BOUND, BOUND]^3``
(``h = 2 * BOUND / R``, node ``(i, j, k)`` at ``-BOUND + (i, j, k) * h``), the band is every node with
``|sdf| <= sqrt(3) * h`` ("sqrt(3) voxels"): each corner of a cell the surface passes through is within
one cell diagonal of a surface point, so every cell with a sign change has its 8 corners in the band and
marching cubes over the cells whose 8 corners are band nodes recovers the whole surface. The three
arrays are present together or not at all; ``R`` is stored in the file itself (``sparse_res``, so a
reader needs nothing else) and in ``meta.json`` (``"sparse": {"res": R, ...}``). Coarser levels (the
existence masks, parent = index >> 1) are derived by the consumers and not stored. A surface of area
``A`` has about ``2 sqrt(3) A / h^2`` band nodes (10 bytes each): 16x more at ``R = 1024`` than at 256.

Why safetensors: it is a flat header + raw little-endian buffers that load by memory map, many times
faster than an uncompressed ``.npz`` (whose zip members are copied); a data loader that reads only
``occ64`` or a subsample pays for only that. Files are written atomically (:mod:`shapeflow.fileio`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from shapeflow import fileio
from shapeflow.geometry.frame import BOUND

SAMPLES_FILE = "samples.safetensors"
MESH_FILE = "watertight.ply"
META_FILE = "meta.json"
VIEWS_DIR = "views"
"""Optional RGBA renders of the watertight mesh (``preprocess --render-views N``): ``views/00.png`` ..."""
FORMAT_VERSION = 1

OCC_RES = 64
"""Cells per axis of the shell occupancy grid (TRELLIS sparse structure)."""

# name -> (dtype, shape as a tuple of ints or symbolic names)
ARRAYS: dict[str, tuple[np.dtype, tuple]] = {
    "surface_points": (np.dtype(np.float32), ("Ns", 3)),
    "surface_normals": (np.dtype(np.float32), ("Ns", 3)),
    "surface_sharp": (np.dtype(np.bool_), ("Ns",)),
    "sdf_points": (np.dtype(np.float32), ("Q", 3)),
    "sdf_values": (np.dtype(np.float32), ("Q",)),
    "sdf_group": (np.dtype(np.uint8), ("Q",)),
    "occ64": (np.dtype(np.bool_), (OCC_RES, OCC_RES, OCC_RES)),
}
OPTIONAL_ARRAYS: dict[str, tuple[tuple[np.dtype, ...], tuple]] = {
    "tsdf": ((np.dtype(np.float32), np.dtype(np.float16)), ("R1", "R1", "R1")),
    "sparse_coords": ((np.dtype(np.int16),), ("Nb", 3)),
    "sparse_sdf": ((np.dtype(np.float32),), ("Nb",)),
    "sparse_res": ((np.dtype(np.int32),), ()),
}
SPARSE_ARRAYS = ("sparse_coords", "sparse_sdf", "sparse_res")
"""The sparse SDF band: present together or not at all."""
SPARSE_BAND_VOXELS = math.sqrt(3.0)
"""Half width of the sparse SDF band in voxels of its grid (see the module docstring)."""

GROUP_UNIFORM, GROUP_NEAR_FINE, GROUP_NEAR_COARSE = 0, 1, 2


def validate(arrays: dict[str, np.ndarray]) -> None:
    """Check names, dtypes and shapes against the spec above.

    Raises
    ------
    ValueError
      Naming the first offending array.
    """
    sizes: dict[str, int] = {}
    for name, (dtype, shape) in ARRAYS.items():
        if name not in arrays:
            raise ValueError(f"missing array {name!r}")
        _check_one(name, arrays[name], (dtype,), shape, sizes)
    for name, (dtypes, shape) in OPTIONAL_ARRAYS.items():
        if name in arrays:
            _check_one(name, arrays[name], dtypes, shape, sizes)
    unknown = set(arrays) - set(ARRAYS) - set(OPTIONAL_ARRAYS)
    if unknown:
        raise ValueError(f"unknown array(s) {sorted(unknown)}")
    sharp = np.asarray(arrays["surface_sharp"])
    if sharp.any() and not sharp[np.argmax(sharp):].all():
        raise ValueError("surface_sharp must mark a tail: uniform points first, then sharp points")
    if np.any(np.diff(np.asarray(arrays["sdf_group"]).astype(np.int16)) < 0):
        raise ValueError("sdf_group must be sorted: group 0 first, then 1, then 2")
    _validate_sparse(arrays)


def _validate_sparse(arrays: dict[str, np.ndarray]) -> None:
    """The sparse band's arrays: all or none, indices in the grid, sorted and unique, within the band."""
    present = [k for k in SPARSE_ARRAYS if k in arrays]
    if not present:
        return
    if len(present) != len(SPARSE_ARRAYS):
        raise ValueError(f"sparse band arrays come together: got {present}, expected all of {list(SPARSE_ARRAYS)}")
    res = int(arrays["sparse_res"])
    if not 1 <= res <= np.iinfo(np.int16).max:
        raise ValueError(f"sparse_res must be in [1, {np.iinfo(np.int16).max}], got {res}")
    c = np.asarray(arrays["sparse_coords"]).astype(np.int64)
    if len(c) and (c.min() < 0 or c.max() > res):
        raise ValueError(f"sparse_coords must lie in 0 .. {res} (sparse_res)")
    keys = (c[:, 0] * (res + 1) + c[:, 1]) * (res + 1) + c[:, 2]
    if np.any(np.diff(keys) <= 0):
        raise ValueError("sparse_coords must be sorted by (i, j, k) without duplicates")
    sdf = np.asarray(arrays["sparse_sdf"])
    limit = SPARSE_BAND_VOXELS * 2.0 * BOUND / res
    if not np.isfinite(sdf).all() or (len(sdf) and np.abs(sdf).max() > limit * (1 + 1e-6)):
        raise ValueError(f"sparse_sdf must be finite with |sdf| <= sqrt(3) * h = {limit:.6g}")


def _check_one(name: str, a: np.ndarray, dtypes: tuple, shape: tuple, sizes: dict[str, int]) -> None:
    a = np.asarray(a)
    if a.dtype not in dtypes:
        raise ValueError(f"array {name!r} has dtype {a.dtype}, expected {' or '.join(map(str, dtypes))}")
    if a.ndim != len(shape):
        raise ValueError(f"array {name!r} has shape {a.shape}, expected {shape}")
    for got, want in zip(a.shape, shape):
        if isinstance(want, str):
            if sizes.setdefault(want, got) != got:
                raise ValueError(f"array {name!r} has {want}={got}, other arrays have {sizes[want]}")
        elif got != want:
            raise ValueError(f"array {name!r} has shape {a.shape}, expected {shape}")


def write_sample_file(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Validate and atomically write one object's arrays as safetensors."""
    validate(arrays)
    data = save({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()})  # keeps 0-d
    fileio.write_bytes(path, data)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _memory_map(path: Path, names) -> dict[str, np.ndarray]:
    """Read-only views of the arrays in a safetensors file (8-byte header length, JSON header, data),
    all on one memory map of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the {size}-byte file")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    out: dict[str, np.ndarray] = {}
    for name in header if names is None else names:
        if name not in header:
            raise KeyError(f"{path}: no array {name!r} (has {sorted(header)})")
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: array {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise ValueError(f"{path}: array {name!r} ends past the end of the file (truncated?)")
        out[name] = buf[8 + n + begin:8 + n + end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_sample_file(
    path: str | os.PathLike, names: list[str] | tuple[str, ...] | None = None, *, mmap: bool = False
) -> dict[str, np.ndarray]:
    """Read some or all arrays of an object's sample file.

    Parameters
    ----------
    path : path to ``samples.safetensors``
    names : list of str or None
      Arrays to read (None = all present).
    mmap : bool
      Return read-only memory maps instead of copies: indexing a few rows then reads only those pages
      (a training item takes a few thousand of the hundreds of thousands of rows).

    Raises
    ------
    FileNotFoundError
      If the file does not exist.
    KeyError
      If a requested array is not in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sample file")
    if mmap:
        return _memory_map(path, names)
    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="np") as fh:
        keys = set(fh.keys())
        for name in keys if names is None else names:
            if name not in keys:
                raise KeyError(f"{path}: no array {name!r} (has {sorted(keys)})")
            out[name] = fh.get_tensor(name)
    return out
