"""Training samples on and around a watertight surface: surface points, sharp-edge points, query points.

Design choices
--------------
* **Uniform surface points**: area-weighted face choice + uniform barycentrics (``sqrt`` trick),
  normals = the face normal of the watertight triangle they lie on (exact for the piecewise-linear
  surface, unit, outward because the watertight mesh is outward-wound).
* **Sharp-edge points** (Dora, arXiv 2412.17808; threshold 15 degrees as in Dora's
  ``sharp_edge_sampling``): edges of the **original** mesh (in the canonical frame) whose dihedral
  angle (angle between the two face normals) exceeds the threshold. Vertices are merged first
  (quantised to 1e-6, i.e. 1/4000 of a voxel at 256^3) so that triangle soups and STL files have
  edges at all; the two faces of an edge are compared with consistent local orientation (a face pair
  that traverses the edge in the same direction has one normal flipped), so inconsistently wound
  soups do not turn flat regions sharp. Non-manifold edges (3+ faces) and open borders (1 face)
  count as sharp: after watertighting they become creases and ``2 * eps`` rims, the most salient
  features of the watertight surface. Points are drawn along sharp edges with probability
  proportional to length, then **projected to the watertight surface** (closest point) and take the
  watertight face normal there. Points whose projection is farther than ``eps + h / 2`` (edges of
  interior geometry removed by the flood fill) are discarded and redrawn.
  A mesh without sharp edges gets an **empty** sharp set (no fallback; the datasets fill the sharp
  slots with uniform points flagged not-sharp).
* **Query points** for SDF supervision (Hunyuan3D-2.1 ``watertight_and_sample.py`` scales): uniform
  in ``[-BOUND, BOUND]^3``, and near-surface points = surface samples (uniform and sharp pooled)
  + isotropic Gaussian noise with ``sigma = 0.005`` ("fine") and ``0.05`` ("coarse") in the canonical
  frame (``[-0.95, 0.95]`` object extent, the same scale as Hunyuan's ``[-1, 1]``), clipped to the
  bound.

All functions take a ``numpy.random.Generator`` so each object is reproducible from its seed.
Pure numpy; no torch.
"""

from __future__ import annotations

import numpy as np

from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.frame import BOUND
from shapeflow.geometry.watertight import merge_vertices

SHARP_ANGLE_DEG = 15.0
"""Default dihedral-angle threshold for sharp edges (Dora)."""

NEAR_SIGMAS = (0.005, 0.05)
"""Default noise scales (canonical units) of the near-surface query groups 1 ("fine") and 2 ("coarse")."""


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit face normals (right-hand rule); zero for zero-area faces.

    Returns
    -------
    normals : (f, 3) float64
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Uniform (area-weighted) random points on a triangle mesh.

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
    count : int
    rng : numpy.random.Generator

    Returns
    -------
    points : (count, 3) float64
    normals : (count, 3) float64
      Unit face normals of the triangles the points lie on.
    face_index : (count,) int64
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cr = np.cross(b - a, c - a)
    area = np.linalg.norm(cr, axis=1)
    total = area.sum()
    if not total > 0:
        raise ValueError("cannot sample a surface with zero area")
    cdf = np.cumsum(area)
    fid = np.minimum(np.searchsorted(cdf, rng.random(count) * cdf[-1], side="right"), len(f) - 1)
    r1 = np.sqrt(rng.random(count))
    r2 = rng.random(count)
    wa = 1.0 - r1
    wb = r1 * (1.0 - r2)
    wc = r1 * r2
    pts = a[fid] * wa[:, None] + b[fid] * wb[:, None] + c[fid] * wc[:, None]
    normals = cr[fid] / area[fid, None]
    return pts, normals, fid


def sharp_edges(
    vertices: np.ndarray, faces: np.ndarray, angle_deg: float = SHARP_ANGLE_DEG, merge_tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Sharp edges of a (possibly soup) mesh: dihedral angle above ``angle_deg``, borders, non-manifold.

    Parameters
    ----------
    vertices : (n, 3) float
      Canonical-frame positions (``merge_tol`` is in these units).
    faces : (f, 3) int
    angle_deg : float
      Threshold on the angle between the two face normals (0 = coplanar).
    merge_tol : float
      Vertices are merged after quantising positions to this step.

    Returns
    -------
    start, end : (e, 3) float64
      Segment end points of the sharp edges.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    mv, mf = merge_vertices(v, f, merge_tol)
    fn = face_normals(mv, mf)
    good = np.linalg.norm(fn, axis=1) > 0
    mf, fn = mf[good], fn[good]
    if len(mf) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    nf = len(mf)
    e0 = np.concatenate([mf[:, 0], mf[:, 1], mf[:, 2]])
    e1 = np.concatenate([mf[:, 1], mf[:, 2], mf[:, 0]])
    fid = np.tile(np.arange(nf), 3)
    lo, hi = np.minimum(e0, e1), np.maximum(e0, e1)
    forward = e0 < e1  # direction in which the face traverses the edge
    key = lo * np.int64(len(mv)) + hi
    order = np.argsort(key, kind="stable")
    key, lo, hi, fid, forward = key[order], lo[order], hi[order], fid[order], forward[order]
    first = np.r_[True, key[1:] != key[:-1]]
    start = np.flatnonzero(first)
    counts = np.diff(np.r_[start, len(key)])
    sharp = counts != 2  # borders (1) and non-manifold edges (3+)
    two = np.flatnonzero(counts == 2)
    i0, i1 = start[two], start[two] + 1
    n0, n1 = fn[fid[i0]], fn[fid[i1]]
    # Consistently wound neighbours traverse the shared edge in opposite directions.
    flip = np.where(forward[i0] == forward[i1], -1.0, 1.0)
    cosang = np.einsum("ij,ij->i", n0, n1) * flip
    sharp[two] = cosang < np.cos(np.deg2rad(angle_deg))
    s = start[sharp]
    return mv[lo[s]], mv[hi[s]]


def sample_sharp(
    start: np.ndarray,
    end: np.ndarray,
    count: int,
    surface: MeshDistance,
    max_offset: float,
    rng: np.random.Generator,
    max_rounds: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Points along sharp edges (length-weighted), projected onto a watertight surface.

    Parameters
    ----------
    start, end : (e, 3) float
      Sharp edge segments (:func:`sharp_edges`).
    count : int
      Number of points wanted.
    surface : MeshDistance
      The watertight surface to project onto.
    max_offset : float
      Points farther than this from the surface (edges of removed interior geometry) are dropped and
      redrawn (up to ``max_rounds`` rounds); fewer than ``count`` points may be returned.
    rng : numpy.random.Generator

    Returns
    -------
    points : (k, 3) float64, k <= count
      Projected points on the watertight surface.
    normals : (k, 3) float64
      Unit outward face normals of the watertight triangles they land on.
    """
    start = np.asarray(start, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    if count <= 0 or len(start) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    length = np.linalg.norm(end - start, axis=1)
    if not length.sum() > 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    cdf = np.cumsum(length)
    fn = face_normals(surface.vertices, surface.faces)
    pts_out: list[np.ndarray] = []
    nrm_out: list[np.ndarray] = []
    have = 0
    draw = count
    for _ in range(max_rounds):
        eid = np.minimum(np.searchsorted(cdf, rng.random(draw) * cdf[-1], side="right"), len(start) - 1)
        t = rng.random(draw)[:, None]
        p = start[eid] * (1.0 - t) + end[eid] * t
        dist, closest, face, _ = surface.closest_points(p, max_distance=max_offset)
        ok = face >= 0
        pts_out.append(closest[ok])
        nrm_out.append(fn[face[ok]])
        have += int(ok.sum())
        if have >= count:
            break
        rate = ok.mean()
        if rate == 0:
            break
        draw = int(np.ceil((count - have) / rate * 1.2)) + 16
    pts = np.concatenate(pts_out)[:count]
    nrm = np.concatenate(nrm_out)[:count]
    return pts, nrm


def sample_queries(
    surface_points: np.ndarray,
    n_uniform: int,
    n_near_fine: int,
    n_near_coarse: int,
    rng: np.random.Generator,
    sigmas: tuple[float, float] = NEAR_SIGMAS,
    bound: float = BOUND,
    return_bound: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Volume query points: uniform in the cube, then near-surface at two noise scales.

    Parameters
    ----------
    surface_points : (s, 3) float
      Surface samples to perturb (drawn with replacement).
    n_uniform, n_near_fine, n_near_coarse : int
    rng : numpy.random.Generator
    sigmas : (float, float)
      Per-axis Gaussian standard deviations of the fine and coarse groups (canonical units).
    bound : float
      Uniform points fill ``[-bound, bound]^3``; near points are clipped to it.
    return_bound : bool
      Also return ``|point - its surface sample|``, an upper bound on each near point's distance to
      the surface the samples lie on (``inf`` for uniform points); it speeds up exact distance queries.

    Returns
    -------
    points : (n_uniform + n_near_fine + n_near_coarse, 3) float64
      In that order.
    group : (same,) uint8
      0 uniform, 1 near fine, 2 near coarse.
    distance_bound : (same,) float64, only with ``return_bound``
    """
    sp = np.asarray(surface_points, dtype=np.float64)
    if (n_near_fine or n_near_coarse) and len(sp) == 0:
        raise ValueError("near-surface queries need surface points")
    parts = [rng.uniform(-bound, bound, size=(n_uniform, 3))]
    bounds = [np.full(n_uniform, np.inf)]
    for n, sigma in ((n_near_fine, sigmas[0]), (n_near_coarse, sigmas[1])):
        base = sp[rng.integers(0, len(sp), size=n)] if n else np.zeros((0, 3))
        p = np.clip(base + rng.normal(0.0, sigma, size=(n, 3)), -bound, bound)
        parts.append(p)
        bounds.append(np.linalg.norm(p - base, axis=1))
    group = np.concatenate([np.full(n_uniform, 0), np.full(n_near_fine, 1), np.full(n_near_coarse, 2)])
    out = (np.concatenate(parts), group.astype(np.uint8))
    return (*out, np.concatenate(bounds)) if return_bound else out


def farthest_points(points: np.ndarray, k: int, start: int = 0) -> np.ndarray:
    """Exact farthest point sampling, deterministic: the first index is ``start``, ties go to the lowest index.

    Each next point is the one whose distance to the points chosen so far is largest (Euclidean, float64).
    ``O(n k)`` time and ``O(n)`` memory; for reproducible encodes and tests (a random start or a bucketed
    approximation is faster and is what training uses).

    Parameters
    ----------
    points : (n, 3) float
    k : number of points to pick, ``1 <= k <= n``.
    start : index of the first point.

    Returns
    -------
    idx : (k,) int64, distinct.
    """
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if not 1 <= k <= n:
        raise ValueError(f"cannot pick {k} farthest points from {n} points")
    if not 0 <= start < n:
        raise ValueError(f"start index {start} is outside the {n} points")
    idx = np.empty(k, dtype=np.int64)
    idx[0] = start
    dist = np.sum((pts - pts[start]) ** 2, axis=1)  # (n,) squared distance to the chosen set
    for i in range(1, k):
        idx[i] = int(np.argmax(dist))  # argmax returns the first maximum: ties to the lowest index
        np.minimum(dist, np.sum((pts - pts[idx[i]]) ** 2, axis=1), out=dist)
    return idx
