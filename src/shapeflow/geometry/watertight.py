"""Any triangle soup -> one closed, manifold, outward-oriented surface (narrow-band UDF + flood fill).

The practical standard (Hunyuan3D-2.1 ``watertight_and_sample.py``, Dora, CraftsMan) is: unsigned
distance on a grid, decide inside/outside, and take the iso-surface at a small offset ``eps``. This
module does that, with the costs moved to where the surface is.

Design choices
--------------
* **Input** must already be in the canonical frame (:func:`shapeflow.geometry.frame.normalize_vertices`):
  everything lies in ``[-EXTENT, EXTENT]^3`` inside the node grid over ``[-BOUND, BOUND]^3``
  (:mod:`shapeflow.geometry.grid`; ``res`` cells, spacing ``h = 2 * BOUND / res``). Duplicate,
  degenerate (zero-area) faces, soups, open borders, non-manifold edges, several parts,
  self-intersections: all fine, since only the *unsigned* distance to the triangles is used.
* **Offset** ``eps = eps_voxels * h`` with ``eps_voxels = 0.75`` by default. Hunyuan3D-2.1 and Dora
  v1.1 use one voxel (``2/256`` in ``[-1, 1]`` at 256^3); on ../shared/meshes 0.75 voxel stays closer
  to the original surfaces than one voxel (BENCHMARKS.md), because gaps narrower than about ``2 * eps``
  are sealed and whatever lies
  behind them becomes interior. The output is the ``udf = eps`` level set seen from outside: closed
  surfaces grow by ``eps``, open sheets and thin parts become ``2 * eps`` thick shells (they survive at
  any resolution). ``eps > h / 2`` is required so a 6-connected flood fill cannot leak through the
  surface between two grid nodes (every grid edge crossing the surface has an end within ``h / 2`` of
  it); 0.75 keeps a quarter-voxel margin.
* **Narrow band.** The plain approach evaluates the UDF at all ``(res + 1)^3`` nodes (17M at 256; far
  slower than the band, BENCHMARKS.md). Only nodes with ``udf <= eps + h`` influence
  the iso-surface (sign *and* interpolated position: along a grid edge the UDF changes by at most
  ``h``), so the surface is rasterised instead: every triangle is sampled on a barycentric lattice
  fine enough that each of its points is within ``delta = 0.45 h`` of a sample, the samples' nearest
  nodes are marked and dilated by ``ceil((eps + h + delta) / h + 1/2)`` nodes (a separable max
  filter), and the exact UDF (fcpw, :class:`shapeflow.geometry.distance.MeshDistance`) is computed
  only on those band nodes, with the search radius capped at ``eps + h``. Every other node is "far"
  (> ``eps + h``). On lucy (100k faces) at 256^3 this is 0.5M queries instead of 17M.
* **Sign by flood fill** (6-connected, :func:`scipy.ndimage.label`) from the grid boundary over nodes
  with ``udf > eps``. Everything not reached (the ``eps`` band *and* enclosed cavities) is inside, so
  interior faces, internal parts and cavities disappear and only outer shells remain. This needs no
  orientation or closedness of the input, unlike winding numbers or ray parity. The work is done on
  the band's bounding box (padded), not the whole grid.
* **Iso-surface**: ``phi = udf - eps`` outside, ``-|udf - eps|`` inside (negative inside,
  :mod:`shapeflow.geometry.frame`), extracted with scikit-image's Lewiner marching cubes (consistent
  ambiguity resolution, so the output is a closed 2-manifold) and mapped to world coordinates with
  :func:`shapeflow.geometry.grid.index_to_world`. Nodes exactly at the level are pushed inside so no
  vertex lands on a node.
* **Every component kept**: each is the boundary of the outside region, hence an outer, closed shell
  (a multi-part object keeps all its parts; there are no inner shells to drop).
* **Optional decimation** (``target_faces``) with fast-simplification (quadric edge collapse); the
  decimated mesh is re-checked and the undecimated one kept if the check fails.
* **Verification** (:func:`check_closed`, equivalent to trimesh's ``is_watertight`` and
  ``is_winding_consistent``): every edge in exactly two faces traversing it in opposite directions,
  and positive volume, else :class:`WatertightError` is raised. Statistics are returned with the mesh.
* **Closed inputs kept as they are** (:func:`closed_input`, preprocessing's ``keep_closed``): the offset
  changes every shape (walls grow by ``eps`` per side, a thin board or wing doubles at 128^3), which a
  1-NNA against the originals sees (docs/log/benchmarks-2026-11.md). Data known to be clean closed
  surfaces (such as marching-cubes output) can skip it. The default does not, since closedness alone
  does not rule out self-intersecting parts, and neither does the demo: its tiny VAE + DiT trained on
  the thinner originals scored worse against them.
* **Exact inside/outside for later labels**: the result keeps the node grid's inside flags
  (``node_inside``); a point in a cell whose 8 nodes agree is on that side of the (undecimated)
  marching-cubes surface, which :meth:`WatertightResult.sign_hint` exposes to the SDF labelling.

Pure numpy/scipy/scikit-image + fcpw (and fast-simplification for the optional decimation); no torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import fast_simplification
import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import measure

from shapeflow.geometry import grid
from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.frame import BOUND, EXTENT

log = logging.getLogger(__name__)

_MAX_LATTICE_POINTS = 2_000_000
"""Rasterisation samples generated per batch (bounds memory for huge triangles)."""


class WatertightError(ValueError):
    """The input cannot be turned into a valid closed surface (one-line reason)."""


DEFAULT_RESOLUTION = 256
"""Grid cells per axis by default: fits a laptop (seconds per mesh); use 512+ on servers."""

DEFAULT_EPS_VOXELS = 0.75
"""Default iso offset in voxels (> 0.5 required; Hunyuan3D/Dora use 1; see the module docstring)."""


@dataclass
class WatertightResult:
    """A closed surface and how it was made.

    Attributes
    ----------
    vertices : (n, 3) float64
      Canonical-frame positions.
    faces : (f, 3) int64
      Outward-wound triangles.
    stats : dict
      ``faces_in``, ``faces_used`` (after dropping degenerate faces), ``faces_out``, ``vertices_out``,
      ``components``, ``volume``, ``area``, ``resolution``, ``eps``, ``band_nodes``, ``decimated``,
      ``watertight``, ``winding_consistent`` and per-stage seconds (``t_band``, ``t_udf``,
      ``t_flood``, ``t_mc``, ``t_decimate``, ``t_check``).
    node_inside : tuple or None
      ``(origin (3,) int, inside (a, b, c) bool)``: inside flags of the node grid in the box starting
      at node ``origin`` (nodes outside the box are outside), exactly the side of the surface each
      node is on. Only set when the mesh was not decimated (then the surface is exactly the
      marching-cubes surface of these flags and a cell whose 8 nodes agree is entirely on that side).
    """

    vertices: np.ndarray
    faces: np.ndarray
    stats: dict = field(default_factory=dict)
    node_inside: tuple[np.ndarray, np.ndarray] | None = None

    def sign_hint(self, points: np.ndarray, bound: float = BOUND) -> np.ndarray:
        """Exact side of the surface for points in grid cells the surface does not cross.

        Parameters
        ----------
        points : (q, 3) float
          Points in ``[-bound, bound]^3`` (others are clipped to the nearest cell).

        Returns
        -------
        hint : (q,) int8
          -1 inside, +1 outside, 0 unknown (the point's cell is crossed by the surface, or the mesh
          was decimated so the grid no longer describes it exactly).
        """
        q = np.asarray(points, dtype=np.float64)
        if self.node_inside is None:
            return np.zeros(len(q), dtype=np.int8)
        origin, code = self._cell_code()
        res = int(self.stats["resolution"])
        cell = grid.world_to_cell(q, res, bound) - origin  # (q, 3) box-relative
        ok = ((cell >= 0) & (cell < np.asarray(code.shape))).all(axis=1)
        hint = np.ones(len(q), dtype=np.int8)  # cells leaving the node box touch only outside nodes
        hint[ok] = code[cell[ok, 0], cell[ok, 1], cell[ok, 2]]
        return hint

    def _cell_code(self) -> tuple[np.ndarray, np.ndarray]:
        """Per cell of the node box: -1 all 8 nodes inside, +1 all outside, 0 mixed (cached)."""
        if getattr(self, "_code", None) is None:
            origin, inside = self.node_inside
            x = inside.view(np.uint8)
            n = (x[:-1, :-1, :-1] + x[1:, :-1, :-1] + x[:-1, 1:, :-1] + x[:-1, :-1, 1:]
                 + x[1:, 1:, :-1] + x[1:, :-1, 1:] + x[:-1, 1:, 1:] + x[1:, 1:, 1:])
            code = np.zeros(n.shape, dtype=np.int8)
            code[n == 0] = 1
            code[n == 8] = -1
            self._code = (origin, code)
        return self._code


def make_watertight(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = DEFAULT_RESOLUTION,
    eps_voxels: float = DEFAULT_EPS_VOXELS,
    target_faces: int | None = None,
    bound: float = BOUND,
) -> WatertightResult:
    """Convert a canonical-frame triangle soup into a closed, manifold, outward-oriented surface.

    Parameters
    ----------
    vertices : (n, 3) float
      Canonical-frame positions; all must lie within ``[-bound, bound]^3``.
    faces : (f, 3) int
    resolution : int
      Grid cells per axis (detail ~ ``2 * bound / resolution``).
    eps_voxels : float
      Offset of the output surface from the input in voxels; must be > 0.5.
    target_faces : int or None
      If set and the result has more faces, decimate it to about this many.
    bound : float

    Returns
    -------
    WatertightResult

    Raises
    ------
    WatertightError
      Degenerate input (no face with positive area), vertices outside the bound, or a result that
      fails the watertightness checks.
    """
    t0 = time.perf_counter()
    stats: dict = {}
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise WatertightError(f"expected (n, 3) vertices and (f, 3) faces, got {v.shape} and {f.shape}")
    if not eps_voxels > 0.5:
        raise ValueError(f"eps_voxels must be > 0.5 (flood fill would leak), got {eps_voxels}")
    stats["faces_in"] = int(len(f))
    if len(f) == 0:
        raise WatertightError("degenerate geometry: no faces")
    if not np.isfinite(v).all():
        raise WatertightError("vertices contain NaN or infinite coordinates")
    if np.abs(v[np.unique(f)]).max() > bound:
        raise WatertightError(f"vertices leave [-{bound}, {bound}]^3: normalize to the canonical frame first")
    f = _drop_degenerate_faces(v, f)
    stats["faces_used"] = int(len(f))
    if len(f) == 0:
        raise WatertightError("degenerate geometry: every face has zero area")

    res = int(resolution)
    h = grid.spacing(res, bound)
    eps = float(eps_voxels) * h
    radius = eps + 1.001 * h  # exact UDF needed up to eps + h (the UDF changes by <= h along a grid edge)
    stats["resolution"] = res
    stats["eps"] = eps
    if eps >= bound - EXTENT:
        log.warning("eps = %.4g reaches the %.3g margin between the canonical extent and the grid bound: "
                    "shells of shapes touching the extent are capped at the bound (use resolution >= %d)",
                    eps, bound - EXTENT, int(math.ceil(2 * bound * eps_voxels / (bound - EXTENT))) + 1)

    # 1. Band nodes by rasterising the surface: every node with udf <= radius is within
    #    radius + delta (+ h/2 rounding) of a sample's nearest node along each axis.
    delta = 0.45 * h
    k = int(math.ceil((radius + delta) / h + 0.5))
    used = np.unique(f)
    lo_idx = np.rint((v[used].min(axis=0) + bound) / h).astype(np.int64)
    hi_idx = np.rint((v[used].max(axis=0) + bound) / h).astype(np.int64)
    lo = np.maximum(lo_idx - k - 1, 0)
    hi = np.minimum(hi_idx + k + 2, res + 1)  # exclusive
    shape = tuple(int(s) for s in hi - lo)
    band = np.zeros(shape, dtype=np.uint8)
    _rasterise_nodes(v, f, delta, res, bound, band, lo)
    band = ndimage.maximum_filter(band, size=2 * k + 1, mode="constant", cval=0).view(bool)
    band_idx = np.argwhere(band)  # (b, 3) crop-relative
    del band
    stats["band_nodes"] = int(len(band_idx))
    t1 = time.perf_counter()
    stats["t_band"] = t1 - t0

    # 2. Exact unsigned distance on the band (search capped at `radius`; misses are far).
    md = MeshDistance(v, f)
    pts = grid.index_to_world(band_idx + lo, res, bound)  # (b, 3)
    d = md.unsigned_distance_f32(pts, max_distance=radius)
    stats["band_hits"] = int(np.count_nonzero(d <= radius))
    far = np.float32(radius + h)
    udf = np.full(shape, far, dtype=np.float32)
    udf[band_idx[:, 0], band_idx[:, 1], band_idx[:, 2]] = np.minimum(d, far)
    del pts, d, band_idx
    t2 = time.perf_counter()
    stats["t_udf"] = t2 - t1

    # 3. Flood fill from the (virtually padded) boundary over nodes with udf > eps.
    passable = np.pad(udf > eps, 1, mode="constant", constant_values=True)
    labels, _ = ndimage.label(passable)  # 6-connectivity
    outside = labels == labels[0, 0, 0]
    del labels
    outside = outside[1:-1, 1:-1, 1:-1]
    inside = ~outside
    if not inside.any():
        raise WatertightError("no surface: nothing blocks the flood fill (input too small for the grid?)")
    t3 = time.perf_counter()
    stats["t_flood"] = t3 - t2

    # 4. Marching cubes of phi = udf - eps outside, -|udf - eps| inside (negative inside).
    tiny = np.float32(1e-6 * h)
    phi = udf - np.float32(eps)
    np.abs(phi, out=phi)
    np.maximum(phi, tiny, out=phi)
    phi[inside] *= -1.0
    del udf
    phi = np.pad(phi, 1, mode="constant", constant_values=far)  # closes the surface at the crop
    mc_v, mc_f, _, _ = measure.marching_cubes(
        phi, level=0.0, method="lewiner", gradient_direction="descent", allow_degenerate=False
    )
    del phi
    out_v = grid.index_to_world(mc_v.astype(np.float64) + (lo - 1), res, bound)
    out_f = mc_f.astype(np.int64)
    t4 = time.perf_counter()
    stats["t_mc"] = t4 - t3

    # 5. Optional decimation, kept only if it stays watertight.
    decimated = False
    node_inside = (lo.astype(np.int64), inside)
    if target_faces is not None and len(out_f) > target_faces:
        dv, df = _decimate(out_v, out_f, int(target_faces))
        ok, _ = check_closed(dv, df)
        if ok:
            out_v, out_f, decimated, node_inside = dv, df, True, None
        else:
            log.warning("decimation broke watertightness; keeping the %d-face mesh", len(out_f))
    t5 = time.perf_counter()
    stats["t_decimate"] = t5 - t4
    stats["decimated"] = decimated

    # 6. Verify.
    ok, info = check_closed(out_v, out_f)
    stats.update(info)
    stats["faces_out"] = int(len(out_f))
    stats["vertices_out"] = int(len(out_v))
    stats["t_check"] = time.perf_counter() - t5
    stats["seconds"] = time.perf_counter() - t0
    if not ok:
        raise WatertightError(
            f"result is not a valid closed surface (watertight={info['watertight']}, "
            f"winding_consistent={info['winding_consistent']}, volume={info['volume']:.3g})"
        )
    return WatertightResult(vertices=out_v, faces=out_f, stats=stats, node_inside=node_inside)


def closed_input(vertices: np.ndarray, faces: np.ndarray, bound: float = BOUND) -> WatertightResult | None:
    """The input itself as the surface, if it already is a closed, consistently wound one; else None.

    For clean closed inputs (marching-cubes output such as ``shapeflow synth``'s) the offset of
    :func:`make_watertight` only changes the shape: every wall grows by ``eps`` per side, which doubles
    a thin board or wing at 128^3 and is what a Chamfer-based metric then sees. Vertices are welded
    (``merge_vertices``) and zero-area faces dropped; the result must pass :func:`check_closed` with
    every face flipped if the volume is negative. Not detected, so not for arbitrary data:
    self-intersecting or overlapping closed parts (the signed distance's pseudonormal sign is wrong inside
    an overlap); such data needs :func:`make_watertight`.

    Returns
    -------
    WatertightResult or None
      With ``eps = 0``, ``kept_input = True`` and no ``node_inside`` (later labels use the exact
      pseudonormal sign and a ray-parity test instead of the grid's flags).
    """
    t0 = time.perf_counter()
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0 or not np.isfinite(v).all() or np.abs(v[np.unique(f)]).max() > bound:
        return None
    v, f = merge_vertices(v, f)
    f = _drop_degenerate_faces(v, f)
    used = np.unique(f)
    remap = np.full(len(v), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    v, f = v[used], remap[f]
    ok, info = check_closed(v, f)
    if not ok and info["winding_consistent"] and info["volume"] < 0:
        f = f[:, ::-1].copy()
        ok, info = check_closed(v, f)
    if not ok:
        return None
    stats = {"faces_in": int(len(faces)), "faces_used": int(len(f)), "resolution": 0, "eps": 0.0,
             "band_nodes": 0, "band_hits": 0, "t_band": 0.0, "t_udf": 0.0, "t_flood": 0.0, "t_mc": 0.0,
             "t_decimate": 0.0, "decimated": False, **info, "faces_out": int(len(f)),
             "vertices_out": int(len(v)), "kept_input": True}
    stats["t_check"] = stats["seconds"] = time.perf_counter() - t0
    return WatertightResult(vertices=v, faces=f, stats=stats, node_inside=None)


def make_watertight_dense(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = DEFAULT_RESOLUTION,
    eps_voxels: float = DEFAULT_EPS_VOXELS,
    bound: float = BOUND,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference baseline: the same surface from the UDF at **all** ``(res + 1)^3`` nodes.

    Used by the benchmark to time the plain dense-grid approach (with the same exact float32 UDF);
    :func:`make_watertight` gives the same surface much faster.

    Returns
    -------
    vertices : (n, 3) float64, faces : (f, 3) int64
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = _drop_degenerate_faces(v, np.asarray(faces, dtype=np.int64))
    res = int(resolution)
    h = grid.spacing(res, bound)
    eps = eps_voxels * h
    udf = MeshDistance(v, f).unsigned_distance_f32(grid.node_points(res, bound, dtype=np.float64))
    udf = udf.reshape((res + 1,) * 3)
    passable = np.pad(udf > eps, 1, mode="constant", constant_values=True)
    labels, _ = ndimage.label(passable)
    inside = (labels != labels[0, 0, 0])[1:-1, 1:-1, 1:-1]
    gap = np.maximum(np.abs(udf - eps), 1e-9 * h)
    phi = np.pad(np.where(inside, -gap, gap).astype(np.float32), 1, mode="constant", constant_values=h)
    mc_v, mc_f, _, _ = measure.marching_cubes(
        phi, level=0.0, method="lewiner", gradient_direction="descent", allow_degenerate=False
    )
    return grid.index_to_world(mc_v.astype(np.float64) - 1, res, bound), mc_f.astype(np.int64)


def merge_vertices(
    vertices: np.ndarray, faces: np.ndarray, tol: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Weld vertices that coincide after quantising positions to ``tol`` (triangle soups, STL).

    Faces that collapse (repeated index) are dropped. Positions of a welded cluster are averaged.

    Returns
    -------
    vertices : (m, 3) float64, faces : (g, 3) int64
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    q = np.round(v / tol).astype(np.int64)
    q -= q.min(axis=0)
    if len(q) and q.max() < (1 << 21):  # pack into one int64 key: a 1-D unique is much faster
        key = (q[:, 0] << 42) | (q[:, 1] << 21) | q[:, 2]
        uniq, inv = np.unique(key, return_inverse=True)
    else:
        uniq, inv = np.unique(q, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    count = np.bincount(inv, minlength=len(uniq))
    mv = np.stack([np.bincount(inv, weights=v[:, k], minlength=len(uniq)) for k in range(3)], axis=1)
    mv /= count[:, None]
    mf = inv[f]
    mf = mf[(mf[:, 0] != mf[:, 1]) & (mf[:, 1] != mf[:, 2]) & (mf[:, 0] != mf[:, 2])]
    return mv, mf


def is_closed(vertices: np.ndarray, faces: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether a mesh is watertight after welding coincident vertices (every edge in exactly 2 faces).

    This is the ``watertight in`` statistic of preprocessing (trimesh's ``is_watertight`` after
    merging vertices); orientation is not required.
    """
    mv, mf = merge_vertices(vertices, faces, tol)
    if len(mf) == 0:
        return False
    return bool(check_closed(mv, mf)[1]["watertight"])


def _drop_degenerate_faces(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Faces with repeated indices or (relative) zero area removed."""
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    if len(f) == 0:
        return f
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    area2 = np.linalg.norm(np.cross(b - a, c - a), axis=1)
    scale = max(float(np.ptp(v[np.unique(f)], axis=0).max()), 1e-300)
    return f[area2 > 1e-12 * scale * scale]


def _rasterise_nodes(
    v: np.ndarray, f: np.ndarray, delta: float, res: int, bound: float, out: np.ndarray, origin: np.ndarray
) -> None:
    """Mark (set to 1) the nearest node of surface samples that cover every face within ``delta``.

    Each triangle gets a barycentric lattice with ``n >= longest_edge / (delta * sqrt(3))`` steps: the
    lattice cuts it into ``n^2`` copies with longest edge ``longest_edge / n``, and no point of a
    triangle is farther than ``longest_edge / sqrt(3)`` from its nearest corner. ``n`` is rounded up
    to a geometric ladder so that few distinct lattices are built.

    Parameters
    ----------
    out : (a, b, c) uint8
      Node flags of the box of nodes starting at node index ``origin`` (must contain every sample).
    origin : (3,) int
    """
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    longest = np.maximum(np.maximum(np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1)),
                         np.linalg.norm(a - c, axis=1))
    need = np.maximum(np.ceil(longest / (delta * math.sqrt(3.0))).astype(np.int64), 1)
    ladder = np.unique(np.ceil(1.2 ** np.arange(0, 80)).astype(np.int64))
    steps = ladder[np.searchsorted(ladder, need)]
    h = grid.spacing(res, bound)
    flat = out.reshape(-1)
    sa, sb, sc = out.shape
    offset = bound / h - np.asarray(origin, dtype=np.float64)  # index = p / h + offset

    def mark(p: np.ndarray) -> None:
        idx = np.rint(p / h + offset).astype(np.int64)  # (m, 3) box-relative node index
        flat[(idx[:, 0] * sb + idx[:, 1]) * sc + idx[:, 2]] = 1

    for n in np.unique(steps):
        sel = np.flatnonzero(steps == n)
        if n == 1:  # the three corners
            for corner in (a, b, c):
                mark(corner[sel])
            continue
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = (i + j) <= n
        wb = (i[keep] / n).astype(np.float64)
        wc = (j[keep] / n).astype(np.float64)  # (l,)
        per_batch = max(1, _MAX_LATTICE_POINTS // len(wb))
        for s in range(0, len(sel), per_batch):
            t = sel[s : s + per_batch]
            pa, ab, ac = a[t], b[t] - a[t], c[t] - a[t]
            p = pa[:, None, :] + wb[None, :, None] * ab[:, None, :] + wc[None, :, None] * ac[:, None, :]
            mark(p.reshape(-1, 3))


def _decimate(v: np.ndarray, f: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    dv, df = fast_simplification.simplify(
        np.ascontiguousarray(v, dtype=np.float64), np.ascontiguousarray(f, dtype=np.int32),
        target_count=int(target_faces),
    )
    return np.asarray(dv, dtype=np.float64), np.asarray(df, dtype=np.int64)


def check_closed(vertices: np.ndarray, faces: np.ndarray) -> tuple[bool, dict]:
    """Is the mesh a closed, consistently oriented surface with positive volume?

    Equivalent to trimesh's ``is_watertight and is_winding_consistent and volume > 0`` (every edge
    shared by exactly two faces which traverse it in opposite directions), computed with two sorts.

    Returns
    -------
    ok : bool
    info : dict
      ``watertight``, ``winding_consistent``, ``volume`` (signed), ``area``, ``components``.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) == 0:
        return False, {"watertight": False, "winding_consistent": False, "volume": 0.0, "area": 0.0,
                       "components": 0}
    n = np.int64(len(v))
    e0 = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    e1 = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    # Undirected edge key * 2 + direction bit, sorted: a closed oriented surface has every edge
    # exactly twice, once in each direction, i.e. sorted pairs (2k, 2k + 1) with distinct k.
    key = np.sort((np.minimum(e0, e1) * n + np.maximum(e0, e1)) * 2 + (e0 > e1))
    watertight = False
    winding = False
    if len(key) % 2 == 0:
        pairs = key.reshape(-1, 2)
        und = pairs // 2
        watertight = bool((und[:, 0] == und[:, 1]).all() and (und[1:, 0] != und[:-1, 0]).all())
        winding = bool(watertight and ((pairs[:, 1] - pairs[:, 0]) == 1).all())
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cr = np.cross(b - a, c - a)
    volume = float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)
    area = float(np.linalg.norm(cr, axis=1).sum() / 2.0)
    adj = coo_matrix((np.ones(len(e0), dtype=np.int8), (e0, e1)), shape=(len(v), len(v)))
    ncomp, _ = connected_components(adj, directed=False)
    unreferenced = int(np.count_nonzero(np.bincount(f.reshape(-1), minlength=len(v)) == 0))
    components = int(ncomp) - unreferenced
    info = {"watertight": watertight, "winding_consistent": winding, "volume": volume, "area": area,
            "components": components}
    return bool(watertight and winding and volume > 0), info
