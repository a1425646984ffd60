"""Grid labels of a watertight surface: the surface-shell voxel occupancy and a dense truncated SDF.

Design choices
--------------
* **Shell occupancy** (TRELLIS sparse structure, arXiv 2412.01506): on THE cell grid
  (:mod:`shapeflow.geometry.grid`, default 64^3 over ``[-BOUND, BOUND]^3``) a voxel is set iff the
  surface passes through it, decided by an exact triangle/box overlap test (separating axes,
  Akenine-Moeller 2001) on the closed voxel box, for every triangle against the voxels of its
  bounding box. This is the same rule as TRELLIS' Open3D ``VoxelGrid.create_from_triangle_mesh``
  and needs no sign, so it also works for decimated meshes. Only the shell is set; the interior
  is empty (TRELLIS' sparse structure is a shell too).
* **Truncated SDF** on THE node grid (``(R + 1)^3`` nodes), clipped to ``+-trunc``: exact signed
  distances within the truncation band (fcpw + pseudonormals, :class:`MeshDistance`); farther nodes
  take ``+-trunc`` with their side from a sign hint or ray parity. The default truncation is two
  voxels of the TSDF grid (``trunc = 2 * 2 * BOUND / R``).

Pure numpy; no torch.
"""

from __future__ import annotations

import numpy as np

from shapeflow.geometry import grid
from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.frame import BOUND

_MAX_PAIRS = 4_000_000
"""Triangle/voxel pairs tested per batch."""


def surface_voxels(
    vertices: np.ndarray, faces: np.ndarray, res: int = 64, bound: float = BOUND
) -> np.ndarray:
    """Voxels of the cell grid that the surface passes through (closed voxel boxes).

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
    res : int
      Cells per axis.
    bound : float

    Returns
    -------
    occupancy : (res, res, res) bool
      Indexed ``[i, j, k] = [x, y, z]``; voxel ``(i, j, k)`` spans
      ``[-bound + i * h, -bound + (i + 1) * h]`` per axis with ``h = 2 * bound / res``.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    h = grid.spacing(res, bound)
    occ = np.zeros((res, res, res), dtype=bool)
    if len(f) == 0:
        return occ
    tri = v[f]  # (f, 3, 3)
    tlo = np.clip(np.floor((tri.min(axis=1) + bound) / h).astype(np.int64), 0, res - 1)
    thi = np.clip(np.floor((tri.max(axis=1) + bound) / h).astype(np.int64), 0, res - 1)
    ext = thi - tlo + 1  # (f, 3) voxels per axis in each triangle's box
    single = (ext == 1).all(axis=1)
    # A triangle whose bounding box lies in one voxel certainly overlaps it.
    occ[tlo[single, 0], tlo[single, 1], tlo[single, 2]] = True
    multi = np.flatnonzero(~single)
    if len(multi) == 0:
        return occ
    count = ext[multi].prod(axis=1)
    cum = np.cumsum(count)
    begin = 0
    while begin < len(multi):
        base = cum[begin - 1] if begin else 0
        stop = max(int(np.searchsorted(cum, base + _MAX_PAIRS, side="right")), begin + 1)
        sel = multi[begin:stop]
        cnt = count[begin:stop]
        begin = stop
        t = np.repeat(sel, cnt)  # (p,) triangle of each pair
        local = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)  # (p,) pair index in its box
        e = ext[t]
        ci = tlo[t, 0] + local // (e[:, 1] * e[:, 2])
        cj = tlo[t, 1] + (local // e[:, 2]) % e[:, 1]
        ck = tlo[t, 2] + local % e[:, 2]
        centre = -bound + (np.stack([ci, cj, ck], axis=1) + 0.5) * h  # (p, 3)
        hit = _tri_box_overlap(tri[t] - centre[:, None, :], 0.5 * h * (1.0 + 1e-9))
        occ[ci[hit], cj[hit], ck[hit]] = True
    return occ


def _tri_box_overlap(tri: np.ndarray, half: float) -> np.ndarray:
    """Separating-axis test of triangles (relative to box centres) against ``[-half, half]^3``.

    Parameters
    ----------
    tri : (p, 3, 3) float64
      Triangle corners relative to each box centre.

    Returns
    -------
    overlap : (p,) bool
    """
    v0, v1, v2 = tri[:, 0], tri[:, 1], tri[:, 2]
    ok = np.ones(len(tri), dtype=bool)
    # 1. Box face normals (the coordinate axes): triangle AABB vs box.
    ok &= (np.minimum(np.minimum(v0, v1), v2) <= half).all(axis=1)
    ok &= (np.maximum(np.maximum(v0, v1), v2) >= -half).all(axis=1)
    # 2. Triangle normal: plane/box test.
    e0, e1, e2 = v1 - v0, v2 - v1, v0 - v2
    n = np.cross(e0, e1)
    r = half * np.abs(n).sum(axis=1)
    s = np.einsum("ij,ij->i", n, v0)
    ok &= np.abs(s) <= r
    # 3. The nine cross products of box axes and triangle edges.
    for e in (e0, e1, e2):
        for axis in range(3):
            a = np.zeros_like(e)  # axis = unit_axis x e
            u, w = (axis + 1) % 3, (axis + 2) % 3
            a[:, u] = -e[:, w]
            a[:, w] = e[:, u]
            p0 = np.einsum("ij,ij->i", a, v0)
            p1 = np.einsum("ij,ij->i", a, v1)
            p2 = np.einsum("ij,ij->i", a, v2)
            rad = half * (np.abs(a[:, u]) + np.abs(a[:, w]))
            ok &= (np.minimum(np.minimum(p0, p1), p2) <= rad) & (np.maximum(np.maximum(p0, p1), p2) >= -rad)
    return ok


def truncated_sdf(
    surface: MeshDistance,
    res: int,
    trunc: float | None = None,
    sign_hint=None,
    bound: float = BOUND,
) -> tuple[np.ndarray, float]:
    """Dense truncated signed distance on the node grid (negative inside), clipped to ``+-trunc``.

    Parameters
    ----------
    surface : MeshDistance
      Of a closed, outward-oriented mesh.
    res : int
      Cells per axis (``res + 1`` nodes).
    trunc : float or None
      Truncation distance in canonical units; default two voxels, ``4 * bound / res``.
    sign_hint : callable or None
      ``points (q, 3) -> (q,) int8`` known signs (e.g. ``WatertightResult.sign_hint``).
    bound : float

    Returns
    -------
    tsdf : (res + 1, res + 1, res + 1) float32
      Indexed ``[i, j, k] = [x, y, z]`` at ``-bound + (i, j, k) * 2 * bound / res``.
    trunc : float
    """
    if trunc is None:
        trunc = 2.0 * grid.spacing(res, bound)
    if not trunc > 0:
        raise ValueError(f"trunc must be positive, got {trunc}")
    pts = grid.node_points(res, bound, dtype=np.float64)
    hint = sign_hint(pts) if sign_hint is not None else None
    sdf = surface.signed_distance(pts, max_distance=float(trunc), sign_hint=hint)
    tsdf = np.clip(sdf, -trunc, trunc).astype(np.float32).reshape((res + 1,) * 3)
    return tsdf, float(trunc)
