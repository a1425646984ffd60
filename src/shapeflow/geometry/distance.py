"""Exact distance from points to a triangle mesh, and signed distance to a closed mesh.

Design choices (speeds: BENCHMARKS.md, "Preprocessing speed")
--------------------------------------------------------------
* **Closest triangle: fcpw** (BVH, float32). It is exact (1e-7 against libigl) and the fastest
  exact option installed. Its batched query parallelises internally with ``std::thread`` over all
  cores (it holds the GIL, so Python threads add nothing). Queries are **sorted along a Morton curve**
  (the BVH walk then stays in cache; unsorted queries are several times slower); points near the
  surface are cheaper than points far from it.
* Only the closest triangle's index and fcpw's float32 distance are read back (reading its per-query
  point/normal arrays costs ~4 us each, more than the query). Where the closest point is needed
  (projection, sign), it is recomputed with its barycentrics in float64 with numpy (Ericson,
  *Real-Time Collision Detection*, 5.1.5); distances are exact up to float32 rounding.
* **Search bounds**: an upper bound on each query's distance (``upper_bound``: from the shell voxels,
  :func:`voxel_distance_bound`, or from the surface sample a near point was made from) narrows fcpw's
  search; results do not depend on it (a bound that turns out too small triggers an unbounded
  search). With the grid sign hints, faster for the pipeline's query mix.
* **Sign: angle-weighted pseudonormals** (Baerentzen & Aanaes, IEEE TVCG 2005) of the closest
  feature (face, edge or vertex). For a closed, edge-manifold, consistently oriented mesh this is
  exact, costs a few numpy ops per point, and needs no ray casting. pysdf's ``contains`` (ray parity)
  is used only for points beyond a ``max_distance`` cut-off, which have no closest triangle.
  libigl and pysdf *distances* are not used: igl is much slower and pysdf's distance is approximate
  (it searches near the nearest vertex only).
* A point is "on a feature" (edge/vertex) when its barycentric coordinates are within 1e-9 of the
  triangle's boundary; using an edge or vertex pseudonormal for a point whose closest point is in
  fact just inside the face is still correct (the face normal has a positive dot product with it).
* Sign convention: negative inside, positive outside (:mod:`shapeflow.geometry.frame`).

Pure numpy + fcpw + pysdf; no torch.
"""

from __future__ import annotations

import fcpw
import numpy as np
import pysdf
from scipy import ndimage

from shapeflow.geometry import grid

_CHUNK = 1 << 17
"""Queries per fcpw call (bounds the memory of fcpw's per-query result objects)."""

_FEATURE_TOL = 1e-9
"""Barycentric tolerance for "the closest point lies on an edge / at a vertex"."""


def morton_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """Permutation sorting points along a 3-D Morton (Z-order) curve over their bounding box.

    Parameters
    ----------
    points : (n, 3) float
    bits : int
      Bits per axis (10 -> a 1024^3 lattice).

    Returns
    -------
    order : (n,) int64
    """
    p = np.asarray(points, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.maximum(hi - lo, 1e-30)
    top = (1 << bits) - 1
    ijk = np.clip((p - lo) / span * top, 0, top).astype(np.int64)  # (n, 3)
    code = _spread_bits(ijk[:, 0]) | (_spread_bits(ijk[:, 1]) << 1) | (_spread_bits(ijk[:, 2]) << 2)
    return np.argsort(code, kind="stable")


def _spread_bits(x: np.ndarray) -> np.ndarray:
    """Insert two zero bits between each of the low 10 bits of ``x``."""
    x = x & 0x3FF
    x = (x | (x << 16)) & 0x30000FF
    x = (x | (x << 8)) & 0x300F00F
    x = (x | (x << 4)) & 0x30C30C3
    x = (x | (x << 2)) & 0x9249249
    return x


def closest_point_on_triangles(
    points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closest point on triangle ``(a, b, c)`` to each point (row-wise), in float64.

    Parameters
    ----------
    points, a, b, c : (n, 3) float

    Returns
    -------
    closest : (n, 3) float64
    bary : (n, 3) float64
      Barycentric coordinates ``(wa, wb, wc)`` of ``closest`` (they sum to 1, all >= 0).
    """
    p = np.asarray(points, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    ab, ac, ap = b - a, c - a, p - a
    d1 = np.einsum("ij,ij->i", ab, ap)
    d2 = np.einsum("ij,ij->i", ac, ap)
    bp = p - b
    d3 = np.einsum("ij,ij->i", ab, bp)
    d4 = np.einsum("ij,ij->i", ac, bp)
    cp = p - c
    d5 = np.einsum("ij,ij->i", ab, cp)
    d6 = np.einsum("ij,ij->i", ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    n = len(p)
    wb = np.zeros(n)
    wc = np.zeros(n)
    done = np.zeros(n, dtype=bool)

    def take(mask: np.ndarray, vb_: np.ndarray | float, vc_: np.ndarray | float) -> None:
        m = mask & ~done
        if np.ndim(vb_):
            wb[m] = vb_[m]
        else:
            wb[m] = vb_
        if np.ndim(vc_):
            wc[m] = vc_[m]
        else:
            wc[m] = vc_
        done[m] = True

    with np.errstate(divide="ignore", invalid="ignore"):
        take((d1 <= 0) & (d2 <= 0), 0.0, 0.0)  # vertex a
        take((d3 >= 0) & (d4 <= d3), 1.0, 0.0)  # vertex b
        take((d6 >= 0) & (d5 <= d6), 0.0, 1.0)  # vertex c
        take((vc <= 0) & (d1 >= 0) & (d3 <= 0), d1 / (d1 - d3), 0.0)  # edge ab
        take((vb <= 0) & (d2 >= 0) & (d6 <= 0), 0.0, d2 / (d2 - d6))  # edge ac
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        take((va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0), 1.0 - t_bc, t_bc)  # edge bc
        denom = 1.0 / (va + vb + vc)
        take(np.ones(n, dtype=bool), vb * denom, vc * denom)  # face interior
    # Degenerate (zero-area) triangles can give NaN above; fall back to the nearest vertex.
    bad = ~(np.isfinite(wb) & np.isfinite(wc))
    if bad.any():
        cand = np.stack([a[bad], b[bad], c[bad]], axis=1)  # (k, 3, 3)
        k = np.argmin(((cand - p[bad, None]) ** 2).sum(-1), axis=1)
        wb[bad] = (k == 1).astype(np.float64)
        wc[bad] = (k == 2).astype(np.float64)
    wa = 1.0 - wb - wc
    closest = a + ab * wb[:, None] + ac * wc[:, None]
    return closest, np.stack([wa, wb, wc], axis=1)


def voxel_distance_bound(occupancy: np.ndarray, points: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Upper bounds on the distance from points to a surface, from its shell voxels.

    If the surface passes through every occupied voxel of a cell grid over ``[-bound, bound]^3``
    (:func:`shapeflow.geometry.labels.surface_voxels`), then for any point ``q`` and occupied voxel
    ``v``, ``d(q) <= |q - centre(v)| + half_diagonal``. ``v`` is the occupied voxel nearest to the
    cell containing ``q`` (Euclidean distance transform of the grid).

    Parameters
    ----------
    occupancy : (r, r, r) bool
      Cell-grid shell occupancy; at least one voxel set.
    points : (q, 3) float

    Returns
    -------
    bound : (q,) float64
    """
    occ = np.asarray(occupancy, dtype=bool)
    if not occ.any():
        raise ValueError("occupancy grid is empty")
    res = occ.shape[0]
    idx = ndimage.distance_transform_edt(~occ, return_distances=False, return_indices=True)  # (3, r, r, r)
    q = np.asarray(points, dtype=np.float64)
    cell = grid.world_to_cell(q, res, bound)  # (q, 3)
    nearest = idx[:, cell[:, 0], cell[:, 1], cell[:, 2]].T  # (q, 3) voxel index
    centre = grid.index_to_world(nearest + 0.5, res, bound)  # voxel centres
    return np.linalg.norm(q - centre, axis=1) + 0.5 * np.sqrt(3.0) * grid.spacing(res, bound)


class MeshDistance:
    """Distance queries against one triangle mesh (exact closest points; signed if closed).

    Build once per mesh (milliseconds for 100k faces), then query any number of points.

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
      Triangles. For :meth:`signed_distance` and :meth:`contains` the mesh must be closed,
      edge-manifold and consistently oriented with outward normals (what
      :func:`shapeflow.geometry.watertight.make_watertight` returns); unsigned queries accept any soup.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        v = np.ascontiguousarray(vertices, dtype=np.float64)
        f = np.ascontiguousarray(faces, dtype=np.int64)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
            raise ValueError(f"expected (n, 3) vertices and (f, 3) faces, got {v.shape} and {f.shape}")
        if len(f) == 0:
            raise ValueError("mesh has no faces")
        if f.min() < 0 or f.max() >= len(v):
            raise ValueError("face indices out of range")
        self.vertices = v
        self.faces = f
        self._scene = fcpw.scene_3D()
        self._scene.set_object_count(1)
        self._scene.set_object_vertices(np.asfortranarray(v.astype(np.float32)), 0)
        self._scene.set_object_triangles(np.asfortranarray(f.astype(np.int32)), 0)
        self._scene.build(fcpw.aggregate_type.bvh_surface_area, True)
        self._pseudo: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._inside_test = None

    # ------------------------------------------------------------------ unsigned
    def closest_faces(self, points: np.ndarray, max_distance: float | np.ndarray | None = None) -> np.ndarray:
        """Index of the closest triangle to each point (-1 where none lies within ``max_distance``).

        Parameters
        ----------
        points : (q, 3) float
        max_distance : float or (q,) float or None
          Search radius; a tight bound makes far queries faster. None = unbounded.

        Returns
        -------
        face : (q,) int64
        """
        return self._query(points, max_distance, want_distance=False)[0]

    def _query(
        self,
        points: np.ndarray,
        max_distance: float | np.ndarray | None,
        want_distance: bool,
        face_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """fcpw closest-triangle query on Morton-sorted points.

        Returns ``face (q,) int64`` (-1 for misses, and for points outside ``face_mask`` when
        distances are requested) and ``distance (q,) float32`` (``inf`` for misses) or None.
        """
        q = np.asarray(points, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != 3:
            raise ValueError(f"expected (q, 3) points, got {q.shape}")
        n = len(q)
        face = np.full(n, -1, dtype=np.int64)
        dist = np.full(n, np.inf, dtype=np.float32) if want_distance else None
        if n == 0:
            return face, dist
        if max_distance is None:
            r2 = np.full(n, np.inf, dtype=np.float32)
        else:
            r = np.broadcast_to(np.asarray(max_distance, dtype=np.float64), (n,))
            r2 = (r * r).astype(np.float32)
        order = morton_order(q)
        qs = q[order].astype(np.float32)
        r2s = np.ascontiguousarray(r2[order])
        sparse = want_distance and face_mask is not None
        ms = np.asarray(face_mask, dtype=bool)[order] if sparse else None
        fs = np.full(n, -1, dtype=np.int64)
        ds = np.empty(n, dtype=np.float32) if want_distance else None
        for s in range(0, n, _CHUNK):
            e = min(s + _CHUNK, n)
            inter = fcpw.interaction_3D_list()
            self._scene.find_closest_points(np.asfortranarray(qs[s:e]), r2s[s:e], inter)
            if ds is not None:
                ds[s:e] = np.fromiter((i.d for i in inter), dtype=np.float32, count=e - s)
            if sparse:  # reading only the faces that are needed saves ~0.2 us per point
                sel = np.flatnonzero(ms[s:e])
                fs[s + sel] = np.fromiter((inter[i].primitive_index for i in sel.tolist()), dtype=np.int64,
                                          count=len(sel))
            else:
                fs[s:e] = np.fromiter((i.primitive_index for i in inter), dtype=np.int64, count=e - s)
        if ds is not None:
            miss = ds >= np.finfo(np.float32).max  # fcpw's "nothing within the radius"
            ds[miss] = np.inf
            fs[miss] = -1
            dist[order] = ds
        face[order] = fs
        return face, dist

    def unsigned_distance_f32(self, points: np.ndarray, max_distance: float | None = None) -> np.ndarray:
        """Unsigned distance as computed by fcpw in float32 (no float64 refinement); ``inf`` beyond
        ``max_distance``. Cheaper than :meth:`unsigned_distance` for near points.

        Returns
        -------
        distance : (q,) float32
        """
        q = np.asarray(points, dtype=np.float64)
        return self._query(q, max_distance, want_distance=True, face_mask=np.zeros(len(q), dtype=bool))[1]

    def closest_points(
        self, points: np.ndarray, max_distance: float | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Closest surface point of each query.

        Returns
        -------
        distance : (q,) float64
          Unsigned distance; ``inf`` where no triangle lies within ``max_distance``.
        closest : (q, 3) float64
          Closest point (NaN where none was found).
        face : (q,) int64
          Its triangle (-1 where none).
        bary : (q, 3) float64
          Its barycentric coordinates in that triangle (NaN where none).
        """
        q = np.asarray(points, dtype=np.float64)
        face = self.closest_faces(q, max_distance)
        hit = face >= 0
        n = len(q)
        dist = np.full(n, np.inf)
        closest = np.full((n, 3), np.nan)
        bary = np.full((n, 3), np.nan)
        if hit.any():
            tri = self.faces[face[hit]]  # (h, 3)
            cp, bc = closest_point_on_triangles(
                q[hit], self.vertices[tri[:, 0]], self.vertices[tri[:, 1]], self.vertices[tri[:, 2]]
            )
            closest[hit] = cp
            bary[hit] = bc
            dist[hit] = np.linalg.norm(q[hit] - cp, axis=1)
        return dist, closest, face, bary

    def unsigned_distance(self, points: np.ndarray, max_distance: float | None = None) -> np.ndarray:
        """Exact unsigned distance to the surface; ``inf`` beyond ``max_distance``.

        Returns
        -------
        distance : (q,) float64
        """
        return self.closest_points(points, max_distance)[0]

    # ------------------------------------------------------------------ signed
    def signed_distance(
        self,
        points: np.ndarray,
        max_distance: float | None = None,
        sign_hint: np.ndarray | None = None,
        upper_bound: np.ndarray | None = None,
    ) -> np.ndarray:
        """Exact signed distance to a closed mesh: **negative inside**, positive outside.

        Parameters
        ----------
        points : (q, 3) float
        max_distance : float or None
          If given, points farther than this get ``+-max_distance`` instead of their exact distance
          (a truncated SDF, much faster far from the surface); their sign comes from ``sign_hint`` or
          a ray-parity inside test.
        sign_hint : (q,) int8 or None
          Known signs (-1 inside, +1 outside, 0 unknown), e.g. from the grid the surface was extracted
          from (:meth:`shapeflow.geometry.watertight.WatertightResult.sign_hint`). Points with a known
          sign skip the pseudonormal test and take fcpw's float32 distance.
        upper_bound : (q,) float or None
          Guaranteed upper bounds on the distances (e.g. :func:`voxel_distance_bound`); they only
          narrow fcpw's search (faster far from the surface), results are unchanged.

        Returns
        -------
        sdf : (q,) float64

        Raises
        ------
        ValueError
          If the mesh is not closed and edge-manifold (some edge is not shared by exactly two faces).
        """
        q = np.asarray(points, dtype=np.float64)
        n = len(q)
        hint = np.zeros(n, dtype=np.int8) if sign_hint is None else np.asarray(sign_hint, dtype=np.int8)
        if hint.shape != (n,):
            raise ValueError(f"sign_hint must have shape ({n},), got {hint.shape}")
        radius = max_distance
        if upper_bound is not None:
            ub = np.asarray(upper_bound, dtype=np.float64) * (1.0 + 1e-5) + 1e-6
            radius = ub if max_distance is None else np.minimum(ub, max_distance)
        need_face = hint == 0
        face, d32 = self._query(q, radius, want_distance=True, face_mask=need_face)
        if upper_bound is not None:  # a bound that was too tight (it should not be): search again
            lost = ~np.isfinite(d32)
            if max_distance is not None:
                lost &= np.asarray(radius) < max_distance
            redo = np.flatnonzero(lost)
            if len(redo):
                face[redo], d32[redo] = self._query(q[redo], max_distance, want_distance=True,
                                                    face_mask=need_face[redo])
        sdf = d32.astype(np.float64)
        miss = ~np.isfinite(d32)
        todo = ~miss & (hint == 0)
        if todo.any():
            tri = self.faces[face[todo]]  # (t, 3)
            cp, bary = closest_point_on_triangles(
                q[todo], self.vertices[tri[:, 0]], self.vertices[tri[:, 1]], self.vertices[tri[:, 2]]
            )
            dist = np.linalg.norm(q[todo] - cp, axis=1)
            sdf[todo] = dist * self.sign_from_closest(q[todo], cp, face[todo], bary)
        known = ~miss & (hint != 0)
        sdf[known] *= hint[known]
        if miss.any():
            sign = hint[miss].astype(np.float64)
            unknown = sign == 0
            if unknown.any():
                sub = np.flatnonzero(miss)[unknown]
                sign[unknown] = np.where(self.contains(q[sub]), -1.0, 1.0)
            sdf[miss] = sign * float(max_distance)
        return sdf

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Inside test for a closed mesh (pysdf ray parity, single-threaded).

        Returns
        -------
        inside : (q,) bool
        """
        if self._inside_test is None:
            self._inside_test = pysdf.SDF(
                self.vertices.astype(np.float32), self.faces.astype(np.uint32), robust=True
            )
        q = np.ascontiguousarray(points, dtype=np.float32)
        if len(q) == 0:
            return np.zeros(0, dtype=bool)
        return np.asarray(self._inside_test.contains(q, n_threads=1)).reshape(-1).astype(bool)

    def _pseudonormals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Face normals, vertex and edge pseudonormals, and each face's 3 edge ids (ab, bc, ca)."""
        if self._pseudo is not None:
            return self._pseudo
        v, f = self.vertices, self.faces
        e0 = v[f[:, 1]] - v[f[:, 0]]
        e1 = v[f[:, 2]] - v[f[:, 1]]
        e2 = v[f[:, 0]] - v[f[:, 2]]
        fn = np.cross(e0, -e2)
        norm = np.linalg.norm(fn, axis=1, keepdims=True)
        fn = np.divide(fn, norm, out=np.zeros_like(fn), where=norm > 0)  # (f, 3) unit or 0
        # Angle-weighted vertex pseudonormals.
        vn = np.zeros_like(v)
        for corner, (u, w) in enumerate([(e0, -e2), (e1, -e0), (e2, -e1)]):
            cosang = np.einsum("ij,ij->i", u, w) / np.maximum(
                np.linalg.norm(u, axis=1) * np.linalg.norm(w, axis=1), 1e-300
            )
            ang = np.arccos(np.clip(cosang, -1.0, 1.0))
            for ax in range(3):
                vn[:, ax] += np.bincount(f[:, corner], weights=ang * fn[:, ax], minlength=len(v))
        # Edge pseudonormals: sum of the two adjacent face normals.
        e0 = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])  # (3f,): edges ab, bc, ca of every face
        e1 = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
        key = np.minimum(e0, e1) * np.int64(len(v)) + np.maximum(e0, e1)
        uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
        if (counts != 2).any():
            raise ValueError(
                f"signed distance needs a closed edge-manifold mesh: {int((counts != 2).sum())} of "
                f"{len(uniq)} edges are not shared by exactly two faces"
            )
        inv = inv.reshape(-1)
        en = np.zeros((len(uniq), 3))
        fn3 = np.concatenate([fn, fn, fn])
        for ax in range(3):
            en[:, ax] = np.bincount(inv, weights=fn3[:, ax], minlength=len(uniq))
        face_edges = inv.reshape(3, -1).T  # (f, 3): edge ids of ab, bc, ca
        self._pseudo = (fn, vn, en, face_edges)
        return self._pseudo

    def sign_from_closest(
        self, q: np.ndarray, closest: np.ndarray, face: np.ndarray, bary: np.ndarray
    ) -> np.ndarray:
        """+1 outside / -1 inside of query points ``q (h, 3)`` from the pseudonormal of their closest feature:
        ``closest (h, 3)`` points, ``face (h,)`` triangles and ``bary (h, 3)`` barycentrics, as a closest-point
        query returns them (used by :func:`shapeflow.geometry.sparse_band.band_nodes` too)."""
        fn, vn, en, face_edges = self._pseudonormals()
        normal = fn[face].copy()  # (h, 3) face interior by default
        small = bary <= _FEATURE_TOL  # (h, 3) which barycentrics vanish
        nsmall = small.sum(axis=1)
        # Edge: exactly one barycentric vanishes; the edge opposite that corner.
        # Corner a small -> edge bc (id 1); b small -> edge ca (id 2); c small -> edge ab (id 0).
        on_edge = nsmall == 1
        if on_edge.any():
            which = np.argmax(small[on_edge], axis=1)
            edge_slot = np.array([1, 2, 0])[which]
            normal[on_edge] = en[face_edges[face[on_edge], edge_slot]]
        # Vertex: two barycentrics vanish; the remaining corner.
        on_vertex = nsmall >= 2
        if on_vertex.any():
            corner = np.argmax(bary[on_vertex], axis=1)
            normal[on_vertex] = vn[self.faces[face[on_vertex], corner]]
        s = np.einsum("ij,ij->i", q - closest, normal)
        return np.where(s < 0.0, -1.0, 1.0)
