"""Sparse marching cubes: a field known only at a sparse set of node-grid nodes -> a triangle mesh.

For sparse-voxel SDF decoders that evaluate a narrow band of nodes at ``res = 256 .. 1024``, where a
dense ``(res + 1)^3`` array (4 GB of float32 at 1024) is what we must not allocate.

Design choices
--------------
* Input: ``coords (N, 3)`` integer node indices of THE node grid (:mod:`shapeflow.geometry.grid`:
  ``res`` cells, ``res + 1`` nodes per axis over ``[-bound, bound]``) and ``values (N,)``, negative
  inside (:mod:`shapeflow.geometry.frame`). Nodes that are not listed are **unknown**, not outside,
  and NaN values count as not listed.
* A cell is meshed iff all 8 of its corner nodes are present; a cell with a missing corner gives
  nothing. The data side picks the band so that every cell the surface crosses is complete.
* Blocks: the present nodes are grouped into cubes of ``block`` cells per axis (a node on a block face
  belongs to every block that shares it). Each block that holds a complete cell with a crossing gets a
  dense node array over the bounding box of those cells (at most ``(block + 1)^3``; absent nodes hold
  an arbitrary value) and one :func:`skimage.measure.marching_cubes` call whose ``mask`` selects
  exactly the complete crossing cells (scikit-image visits cell ``(i, j, k)`` iff
  ``mask[i + 1, j + 1, k + 1]``; tests pin this). Peak memory is O(N) for the grouping plus
  O(block^3) per block plus the output, never O(res^3).
* Same mesh as :func:`shapeflow.geometry.marching_cubes.marching_cubes` of the dense field, per cell:
  the values are prepared as there (float32, level subtracted in float32, exact zeros nudged to the
  smallest positive float32, +-inf clipped to the largest finite magnitude), and Lewiner's
  triangulation of a cell depends only on its 8 corner values. Vertex positions are recomputed from
  the corner values with scikit-image's own formula (inverse-distance weights ``1 / (eps + |v|)``)
  in global coordinates, including the one-node offset of the dense function's border padding, so
  they are bit-identical to the dense ones rather than rounded in block-local float32.
* Stitching by grid-edge identity, not float position: an edge vertex is keyed by (lower node,
  axis), a vertex that rounds onto a node (next to a zero value) by that node, and Lewiner's interior
  vertex of an ambiguous cell is never shared. The same edge seen from two blocks is one vertex, so
  a closed zero set inside the complete cells gives one closed, consistently wound mesh (winding
  "descent": outward normals, as in the dense function).
* Triangles with two corners on one vertex (they occur only next to exact zeros, where several edge
  vertices round onto one node) are dropped, as the dense function's ``allow_degenerate=False`` does.
* No capping: a surface that leaves the complete cells (or the grid) stays open there; the dense
  function's ``close_boundary`` padding has no sparse analogue. No ``smooth`` either (a Gaussian filter
  needs neighbours the band may not have). :func:`close_band` is the sparse capping: it gives every
  absent node next to a present one a value of the sign its present neighbours vote for, so the cells
  around the present set are complete and a surface that would leave it closes instead.

Pure numpy/scikit-image; no torch.
"""

from __future__ import annotations

import itertools

import numpy as np
from skimage import measure

from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND
from shapeflow.geometry.marching_cubes import EmptySurfaceError, filter_components

_EPS = float(np.spacing(1.0))
"""scikit-image's Lewiner ``FLT_EPSILON`` (a double epsilon, despite the name) in its vertex weights."""

_PAD = 1
"""The one-node border padding of the dense ``marching_cubes`` (close_boundary): vertices are rounded
to float32 at ``index + _PAD`` there, so they are here too."""

# Lewiner corner n of a cell as (di, dj, dk) in numpy axis order (scikit-image's cython code works in
# x, y, z = k, j, i). The order matters: the interior vertex sums the corner weights in this order.
_CORNERS = np.array(
    [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 0)], dtype=np.int64
)


def sparse_marching_cubes(
    coords: np.ndarray,
    values: np.ndarray,
    res: int,
    *,
    bound: float = BOUND,
    level: float = 0.0,
    block: int = 64,
    largest_component: bool = False,
    min_component_faces: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Extract the ``values == level`` iso-surface of a sparse node-grid field (negative inside).

    Parameters
    ----------
    coords : (N, 3) int
      Node indices ``[i, j, k]`` in ``[0, res]`` (any integer dtype, unique, any order).
    values : (N,) float
      Field at those nodes; below ``level`` is inside. NaN = not evaluated (same as absent).
    res : int
      Grid resolution in cells (``res + 1`` nodes per axis over ``[-bound, bound]``).
    bound : float
      Half side of the grid cube.
    level : float
      Iso-value (0 for an SDF).
    block : int
      Cells per block axis; the working memory of a block is about ``15 * (block + 1)^3`` bytes
      (4 MB at 64), beside O(N) for grouping the nodes and the output.
    largest_component, min_component_faces
      As in :func:`shapeflow.geometry.marching_cubes.marching_cubes`
      (:func:`~shapeflow.geometry.marching_cubes.filter_components`).

    Returns
    -------
    vertices : (n, 3) float64
      World coordinates.
    faces : (f, 3) int64
      Triangles wound counter-clockwise seen from outside (outward normals).

    Raises
    ------
    EmptySurfaceError
      If no complete cell crosses ``level`` (or the component filter removes everything).
    ValueError
      On malformed input: shapes, lengths, non-integer or out-of-range coords, duplicate nodes,
      a bad ``res`` or ``block``, or no cell with all 8 corners present.
    """
    if int(res) != res or res < 1:
        raise ValueError(f"grid resolution must be a positive integer number of cells, got {res!r}")
    if int(block) != block or block < 1:
        raise ValueError(f"block must be a positive integer number of cells, got {block!r}")
    res, block = int(res), int(block)
    c, v = _prepare(coords, values, res, level)
    v_range = float(v.min()) + level, float(v.max()) + level
    keys, index, faces, any_complete = _mesh_blocks(c, v, res, block)
    del c, v
    if not any_complete:
        raise ValueError("no present cell: no cell of the grid has all 8 of its corner nodes in coords")
    if len(faces) == 0:
        raise EmptySurfaceError(
            f"no complete cell crosses level {level:g} (values in [{v_range[0]:.4g}, {v_range[1]:.4g}]): "
            "no surface to extract"
        )
    index, faces = _weld(keys, index, faces)
    vertices = grid.index_to_world(index, res, bound)  # (n, 3)
    if min_component_faces > 0 or largest_component:
        vertices, faces = filter_components(
            vertices, faces, min_faces=min_component_faces, keep_largest=largest_component
        )
    return vertices, faces


DENSE_LOOKUP_NODES = 1 << 26  # close_band looks nodes up in a dense int8 array up to this many grid nodes (64 MB)


def close_band(coords: np.ndarray, values: np.ndarray, res: int, *, fill: float,
               max_layers: int = 8, dense_limit: int = DENSE_LOOKUP_NODES) -> tuple[np.ndarray, np.ndarray]:
    """Add absent nodes around a sparse field, valued ``+-fill``, so that no surface leaves the known nodes.

    Layer 1: every absent node of the ``res``-cell node grid among the 26 neighbours of a present node gets
    ``fill * sign(sum of those present neighbours' values)`` (``+fill`` on a tie). With ``fill`` at least the
    largest ``|value|`` this is what the field beyond a truncated SDF band looks like (a node beyond the band
    has the sign of its neighbours in it), and every cell with a present corner is complete. Where the present
    set has a hole across a surface (a structure error), the first layer holds both signs at the hole's rim;
    further layers grow from the layer nodes next to a node of the other sign only (at most ``max_layers``
    in all), so the surface closes over the hole instead of running into unknown nodes. Then
    :func:`sparse_marching_cubes` of the result has no boundary edge except at the grid's border (or in a hole
    wider than ``max_layers``).

    Returns ``(coords (N + F, 3) int64, values (N + F,) float32)``: the input (NaN values dropped, sorted) then
    the F added nodes. Known nodes are looked up in a dense int8 array of the node grid while it has at most
    ``dense_limit`` nodes (256^3: 17 MB; several times faster), else in sorted keys (O(N) memory per neighbour
    offset, never O(res^3)); both give the same result.
    """
    c, v = _prepare(coords, values, res, 0.0)  # validated; (N, 3) and float32
    if not fill > 0:
        raise ValueError(f"close_band: fill must be > 0, got {fill}")
    lin = _linear(c, res)
    order = np.argsort(lin, kind="stable")
    keys, c, v = lin[order], c[order].astype(np.int64), v[order]
    known = _DenseNodes(res, keys, v) if (res + 1) ** 3 <= dense_limit else _SortedNodes(keys, v)
    offsets = [np.array(o, dtype=np.int64) for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
    out_c, out_v = [c], [v]
    src_c, src_v = c, v  # the nodes the next layer grows from
    for _ in range(max_layers):
        add_k, add_votes = [], []
        for o in offsets:
            n = src_c + o
            ok = np.all((n >= 0) & (n <= res), axis=1)
            nk = _linear(n[ok], res)
            absent = ~known.member(nk)
            add_k.append(nk[absent])
            add_votes.append(src_v[ok][absent])
        k = np.concatenate(add_k)
        if not len(k):
            break
        votes = np.concatenate(add_votes)
        order = np.argsort(k, kind="stable")
        k, votes = k[order], votes[order]
        start = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])  # one group per added node
        new_k = k[start]
        new_c = np.stack(np.unravel_index(new_k, (res + 1,) * 3), axis=1).astype(np.int64)
        new_v = np.where(np.add.reduceat(votes, start) < 0, -fill, fill).astype(np.float32)
        out_c.append(new_c)
        out_v.append(new_v)
        known.add(new_k, new_v)
        # grow next only from new nodes that see the other sign among the known nodes (a surface runs there)
        conflict = np.zeros(len(new_k), dtype=bool)
        for o in offsets:
            n = new_c + o
            ok = np.all((n >= 0) & (n <= res), axis=1)
            hit, sign = known.sign(_linear(n[ok], res))
            other = np.zeros(len(hit), dtype=bool)
            other[hit] = sign[hit] != np.sign(new_v[ok][hit])
            conflict[np.flatnonzero(ok)[other]] = True
        if not conflict.any():
            break
        src_c, src_v = new_c[conflict], new_v[conflict]
    return np.concatenate(out_c), np.concatenate(out_v)


class _DenseNodes:
    """Known nodes of a node grid as int8 codes: 0 absent, else ``sign(value) + 2``."""

    def __init__(self, res: int, keys: np.ndarray, values: np.ndarray):
        self.code = np.zeros((res + 1) ** 3, dtype=np.int8)
        self.add(keys, values)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self.code[keys] = (np.sign(values) + 2).astype(np.int8)

    def member(self, keys: np.ndarray) -> np.ndarray:
        return self.code[keys] != 0

    def sign(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        code = self.code[keys]
        return code != 0, code.astype(np.float32) - 2.0


class _SortedNodes:
    """Known nodes as sorted linear keys and their values."""

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        self.keys, self.values = keys, values

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        k, v = np.concatenate([self.keys, keys]), np.concatenate([self.values, values])
        order = np.argsort(k, kind="stable")
        self.keys, self.values = k[order], v[order]

    def member(self, keys: np.ndarray) -> np.ndarray:
        return _member(self.keys, keys)

    def sign(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool), np.zeros(len(keys), dtype=np.float32)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[pos] == keys, np.sign(self.values[pos])


def _member(sorted_keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Whether each of ``query`` is in ``sorted_keys``."""
    if not len(sorted_keys):
        return np.zeros(len(query), dtype=bool)
    pos = np.searchsorted(sorted_keys, query).clip(max=len(sorted_keys) - 1)
    return sorted_keys[pos] == query


def _mesh_blocks(
    c: np.ndarray, v: np.ndarray, res: int, block: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Marching cubes block by block; vertices keyed by grid identity, not yet welded.

    Returns
    -------
    keys : (m,) int64
      Grid identity of every block vertex (:func:`_vertex_keys`); equal keys are one vertex.
    index : (m, 3) float64
      Global fractional node index of every block vertex.
    faces : (f, 3) int32
      Triangles over the block vertices (rows of ``keys``), winding "descent".
    any_complete : bool
      Whether any cell had all 8 corners present.
    """
    nb = -(-res // block)  # blocks per axis
    node, bid = _assign_blocks(c, res, block, nb)
    cuts = np.flatnonzero(np.diff(bid)) + 1
    keys, index, faces = [], [], []
    n_vertices = n_interior = 0
    any_complete = False
    for s, e in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(bid)].tolist()):
        b = int(bid[s])
        origin = np.array([b // (nb * nb), (b // nb) % nb, b % nb], dtype=np.int64) * block  # (3,)
        sel = node[s:e]
        vol, cross, complete = _block_arrays(c[sel] - origin, v[sel], np.minimum(block, res - origin) + 1)
        any_complete |= complete
        if not cross.any():
            continue
        # Crop to the bounding box of the crossing cells: nodes lo .. hi + 1 per axis.
        lo, hi = zip(*(_extent(cross.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1))))
        sub = np.ascontiguousarray(vol[lo[0] : hi[0] + 2, lo[1] : hi[1] + 2, lo[2] : hi[2] + 2])
        mask = np.zeros(sub.shape, dtype=bool)  # scikit-image visits cell (i, j, k) iff mask[i + 1, j + 1, k + 1]
        mask[1:, 1:, 1:] = cross[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        verts, tri, _, _ = measure.marching_cubes(
            sub, level=0.0, method="lewiner", gradient_direction="descent", allow_degenerate=True, mask=mask
        )
        k, idx, n_new = _vertex_keys(verts, sub, origin + lo, res, n_interior)
        n_interior += n_new
        keys.append(k)
        index.append(idx)
        faces.append(tri.astype(np.int32) + np.int32(n_vertices))
        n_vertices += len(verts)
    if not faces:
        return np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros((0, 3), np.int32), any_complete
    return np.concatenate(keys), np.concatenate(index), np.concatenate(faces), any_complete


def _weld(keys: np.ndarray, index: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One vertex per key; drop triangles with two corners on one vertex and unreferenced vertices.

    Face arithmetic stays in int32 (fewer than 2^31 vertices) until the int64 result, to keep the peak low.

    Returns
    -------
    index : (n, 3) float64, faces : (f, 3) int64
    """
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    index = index[first]  # (n, 3), vertices in key order
    faces = inverse.reshape(-1).astype(np.int32)[faces]  # (f, 3)
    del inverse
    f0, f1, f2 = faces.T
    ok = (f0 != f1) & (f1 != f2) & (f0 != f2)  # degenerate only next to exact zeros (module docstring)
    del f0, f1, f2
    if not ok.all():
        faces = faces[ok]
        if len(faces) == 0:
            raise EmptySurfaceError("every triangle is degenerate (all vertices on nodes): no surface to extract")
        used = np.zeros(len(index), dtype=bool)
        used[faces.ravel()] = True
        index, faces = index[used], (np.cumsum(used, dtype=np.int32) - 1)[faces]
    return index, faces.astype(np.int64)


def _extent(occupied: np.ndarray) -> tuple[int, int]:
    """First and last True of a 1-d bool array."""
    where = np.flatnonzero(occupied)
    return int(where[0]), int(where[-1])


def _prepare(coords, values, res: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Validate; return int32 node indices and float32 values prepared as the dense function does."""
    c = np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 3:
        raise ValueError(f"coords must have shape (N, 3), got {c.shape}")
    if c.dtype.kind not in "iu":
        raise ValueError(f"coords must be integer node indices, got dtype {c.dtype}")
    vals = np.asarray(values)
    if vals.ndim != 1:
        raise ValueError(f"values must have shape (N,), got {vals.shape}")
    if len(vals) != len(c):
        raise ValueError(f"coords and values have different lengths: {len(c)} nodes, {len(vals)} values")
    if len(c) == 0:
        raise ValueError("no present cell: coords is empty")
    lo, hi = int(c.min()), int(c.max())
    if lo < 0 or hi > res:
        raise ValueError(f"coords out of range: node indices must lie in [0, {res}] for res={res}, got [{lo}, {hi}]")
    # float32 and the level subtracted in float32, exactly as the dense marching_cubes does.
    v = np.array(vals, dtype=np.float32)
    v -= np.float32(level)
    nan = np.isnan(v)
    if nan.all():
        raise ValueError("no present cell: every value is NaN")
    c = c.astype(np.int32, copy=False)  # read only here
    if nan.any():
        c, v = c[~nan], v[~nan]
    inf = np.isinf(v)
    if inf.any():
        far = float(np.abs(v[~inf]).max()) if (~inf).any() else 1.0
        v[inf] = np.copysign(far if far > 0.0 else 1.0, v[inf])
    v[v == 0.0] = np.finfo(np.float32).tiny  # "just outside": no vertex exactly on a node
    return c, v


def _assign_blocks(c: np.ndarray, res: int, block: int, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (node, block) membership, sorted by block: ``node`` indexes ``c``; ``bid`` is the block id.

    Block ``(bi, bj, bk)`` (id ``(bi * nb + bj) * nb + bk``) owns the cells ``bi * block ..`` and the nodes
    ``bi * block .. min((bi + 1) * block, res)`` per axis, so a node on a block face is in two blocks per
    axis (up to 8 at a block corner).
    """
    dtype = np.int32 if nb**3 < 2**31 else np.int64
    prim = np.minimum(c // block, nb - 1)  # (N, 3) the block with the node's cells above it
    shared = (c % block == 0) & (c > 0) & (c < res)  # (N, 3) also the last node of block prim - 1
    nodes, bids = [], []
    for step in itertools.product((0, 1), repeat=3):
        pick = np.array(step, dtype=bool)
        if pick.any():
            sel = np.flatnonzero(shared[:, pick].all(axis=1)).astype(np.int32)
            b = prim[sel] - np.array(step, dtype=np.int32)  # (m, 3)
        else:
            sel, b = np.arange(len(c), dtype=np.int32), prim
        nodes.append(sel)
        bids.append((b[:, 0].astype(dtype) * nb + b[:, 1]) * nb + b[:, 2])
    del prim, shared
    node, bid = np.concatenate(nodes), np.concatenate(bids)
    del nodes, bids
    order = np.argsort(bid, kind="stable")  # deterministic; fast on runs (coords sorted by node)
    return node[order], bid[order]


def _block_arrays(local: np.ndarray, vals: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """One block's dense node values, its complete cells with a crossing, and whether it has a complete cell.

    Returns
    -------
    vol : shape float32
      Node values; absent nodes hold 1.0 (never read: their cells are not meshed).
    cross : shape - 1 bool
      Cells with all 8 corners present and both signs (Lewiner's case index is neither 0 nor 255).
    any_complete : bool
    """
    shape = tuple(int(n) for n in shape)
    flat = np.ravel_multi_index(tuple(local.T), shape)
    vol = np.ones(shape, dtype=np.float32)
    present = np.zeros(shape, dtype=bool)
    vol.flat[flat] = vals
    present.flat[flat] = True
    if np.count_nonzero(present) != len(flat):
        raise ValueError("coords contains duplicate nodes")
    complete = _all_corners(present)  # (shape - 1) bool
    if not complete.any():
        return vol, complete, False
    outside = vol > 0.0  # Lewiner's bit: v > 0 (exact zeros are already nudged to the outside)
    cross = complete & ~_all_corners(outside) & ~_all_corners(~outside)
    return vol, cross, True


def _all_corners(a: np.ndarray) -> np.ndarray:
    """Per cell (shape ``a.shape - 1``): whether all 8 corner nodes of the cell are True."""
    nx, ny, nz = a.shape
    out = a[: nx - 1, : ny - 1, : nz - 1].copy()
    for i, j, k in itertools.product((0, 1), repeat=3):
        if i or j or k:
            out &= a[i : nx - 1 + i, j : ny - 1 + j, k : nz - 1 + k]
    return out


def _vertex_keys(
    verts: np.ndarray, sub: np.ndarray, origin: np.ndarray, res: int, interior_offset: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Grid identity and dense-identical global position of one block's marching-cubes vertices.

    Parameters
    ----------
    verts : (n, 3) float32
      Block-local fractional node indices from scikit-image.
    sub : (a, b, c) float32
      The block's node values; ``sub[0, 0, 0]`` is global node ``origin``.
    origin : (3,) int
    interior_offset : int
      Interior vertices seen so far (their keys must stay unique across blocks).

    Returns
    -------
    keys : (n,) int64
      ``4 * node + axis`` for an edge vertex (``node``: linear index of the edge's lower node),
      ``4 * node + 3`` for a vertex that rounds onto a node, negative for interior vertices.
    index : (n, 3) float64
      Global fractional node index, rounded to float32 at ``index + _PAD`` as in the dense function.
    n_interior : int
    """
    local = verts.astype(np.float64)
    integral = local == np.floor(local)  # (n, 3)
    n_int = integral.sum(axis=1)
    index = local + origin  # fallback (interior vertices rounded onto a cell face)
    keys = np.zeros(len(local), dtype=np.int64)

    # Edge vertices: two integral coordinates; the third is lower + w, w = t_hi / (t_lo + t_hi).
    edge = np.flatnonzero(n_int == 2)
    axis = np.argmin(integral[edge], axis=1)
    lower = np.floor(local[edge]).astype(np.int64)  # (m, 3) local
    upper = lower.copy()
    upper[np.arange(len(edge)), axis] += 1
    t_lo = 1.0 / (_EPS + np.abs(sub[tuple(lower.T)].astype(np.float64)))
    t_hi = 1.0 / (_EPS + np.abs(sub[tuple(upper.T)].astype(np.float64)))
    g_lower = lower + origin
    along = _round_like_dense(g_lower[np.arange(len(edge)), axis], t_hi / (t_lo + t_hi))
    edge_index = g_lower.astype(np.float64)
    edge_index[np.arange(len(edge)), axis] = along
    index[edge] = edge_index
    keys[edge] = 4 * _linear(g_lower, res) + axis

    # Lewiner's interior vertex of an ambiguous cell: the weighted mean of the 8 corners.
    inner = np.flatnonzero(n_int == 0)
    if len(inner):
        cell = np.floor(local[inner]).astype(np.int64)  # (m, 3) local
        w = [1.0 / (_EPS + np.abs(sub[tuple((cell + d).T)].astype(np.float64))) for d in _CORNERS]
        total = w[0]
        for wn in w[1:]:
            total = total + wn  # the cython code's summation order, corner 0 to 7
        frac = [((w[4] + w[5]) + w[6]) + w[7], ((w[2] + w[3]) + w[6]) + w[7], ((w[1] + w[2]) + w[5]) + w[6]]
        g_cell = cell + origin
        index[inner] = np.stack([_round_like_dense(g_cell[:, a], frac[a] / total) for a in range(3)], axis=1)

    # Whatever lies exactly on a node (here or in a neighbouring block) is keyed by that node.
    on_node = (index == np.floor(index)).all(axis=1)
    keys[on_node] = 4 * _linear(index[on_node].astype(np.int64), res) + 3
    interior = np.flatnonzero((n_int < 2) & ~on_node)
    keys[interior] = -1 - interior_offset - np.arange(len(interior))
    return keys, index, len(interior)


def _round_like_dense(g: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """``float32(float64(g + _PAD) + frac) - _PAD``: scikit-image's rounding of a vertex of the padded dense grid."""
    return ((g + _PAD).astype(np.float64) + frac).astype(np.float32).astype(np.float64) - _PAD


def _linear(node: np.ndarray, res: int) -> np.ndarray:
    """Linear index of integer node indices ``(m, 3)`` on the ``(res + 1)^3`` node grid (int64)."""
    n = res + 1
    node = node.astype(np.int64)
    return (node[:, 0] * n + node[:, 1]) * n + node[:, 2]
