"""Sparse marching cubes: the same mesh as dense marching cubes, block stitching, missing corners, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from shapeflow.geometry import grid
from shapeflow.geometry.marching_cubes import EmptySurfaceError, marching_cubes
from shapeflow.geometry.sparse_mc import sparse_marching_cubes


def node_index(res: int) -> np.ndarray:
    """All node indices of the grid, (res + 1)^3 x 3, C order (matches ``field.reshape(-1)``)."""
    n = np.arange(res + 1)
    return np.stack(np.meshgrid(n, n, n, indexing="ij"), axis=-1).reshape(-1, 3)


def sphere_field(res: int, center=(0.07, -0.11, 0.04), radius: float = 0.55) -> np.ndarray:
    p = grid.node_points(res, dtype=np.float64)
    return (np.linalg.norm(p - np.asarray(center), axis=1) - radius).reshape((res + 1,) * 3)


def torus_field(res: int, center=(0.05, 0.02, -0.06), major: float = 0.5, minor: float = 0.2) -> np.ndarray:
    p = grid.node_points(res, dtype=np.float64) - np.asarray(center)
    q = np.stack([np.linalg.norm(p[:, [0, 2]], axis=1) - major, p[:, 1]], axis=1)  # ring in the x-z plane
    return (np.linalg.norm(q, axis=1) - minor).reshape((res + 1,) * 3)


def band(field: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes with ``|field| <= width``, as (coords, values): what a sparse SDF decoder evaluates."""
    keep = np.abs(field.reshape(-1)) <= width
    return node_index(field.shape[0] - 1)[keep], field.reshape(-1)[keep]


def triangles(v: np.ndarray, f: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Faces as position ids, each rotated to start at its smallest id (winding kept), rows sorted."""
    ids = np.unique(positions, axis=0, return_inverse=True)[1].reshape(-1)[: len(v)]
    t = ids[f]  # (f, 3)
    r = np.argmin(t, axis=1)[:, None]
    t = np.take_along_axis(t, (r + np.arange(3)) % 3, axis=1)
    return t[np.lexsort(t.T[::-1])]


def assert_same_mesh(sparse, dense):
    """Identical vertex set and identical triangles (same winding); positions compared exactly."""
    (vs, fs), (vd, fd) = sparse, dense
    assert vs.dtype == np.float64 and fs.dtype == np.int64 and fs.shape[1] == 3
    assert len(fs) == len(fd)
    np.testing.assert_array_equal(np.unique(vs, axis=0), np.unique(vd, axis=0))
    both = np.concatenate([vs, vd])  # position ids over the union: the same id for the same position
    assert len(np.unique(vs, axis=0)) == len(vs)  # no two sparse vertices at one position: welded
    np.testing.assert_array_equal(triangles(vs, fs, both), triangles(vd, fd, np.concatenate([vd, vs])))


def edge_use(f: np.ndarray) -> tuple[np.ndarray, bool]:
    """Faces per undirected edge, and whether every directed edge is used once (consistent winding)."""
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    _, per_edge = np.unique(np.sort(e, axis=1), axis=0, return_counts=True)
    return per_edge, len(np.unique(e, axis=0)) == len(e)


@pytest.mark.parametrize("shape", ["sphere", "torus"])
@pytest.mark.parametrize("res", [32, 48])
@pytest.mark.parametrize("block", [5, 16, 17, None])  # None: one block covers the grid
def test_band_meshes_like_dense_marching_cubes(shape, res, block):
    field = (sphere_field if shape == "sphere" else torus_field)(res)
    h = grid.spacing(res)
    coords, values = band(field, np.sqrt(3) * h)
    assert len(coords) < 0.3 * field.size
    vs, fs = sparse_marching_cubes(coords, values, res, block=block or res)
    vd, fd = marching_cubes(field)
    assert_same_mesh((vs, fs), (vd, fd))
    m = trimesh.Trimesh(vs, fs, process=False)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0
    assert m.volume == pytest.approx(trimesh.Trimesh(vd, fd, process=False).volume, rel=1e-12)


def test_random_field_in_any_order_and_dtype_is_exactly_dense():
    """Ambiguous cells everywhere: Lewiner's interior vertices are recomputed exactly too."""
    res = 16
    rng = np.random.default_rng(0)
    field = rng.standard_normal((res + 1,) * 3)
    field[[0, -1]] = field[:, [0, -1]] = field[:, :, [0, -1]] = 1.0  # outside at the border: no capping
    perm = rng.permutation(field.size)
    coords, values = node_index(res)[perm].astype(np.uint16), field.reshape(-1)[perm]
    vs, fs = sparse_marching_cubes(coords, values, res, block=5)
    vd, fd = marching_cubes(field)
    idx = grid.world_to_index(vd, res)
    fractional = ~np.isclose(idx, np.round(idx), rtol=0, atol=1e-9)
    assert (fractional.sum(axis=1) == 3).sum() > 100  # interior (cell-centre) vertices exist
    assert_same_mesh((vs, fs), (vd, fd))
    per_edge, consistent = edge_use(fs)
    assert (per_edge == 2).all() and consistent


def test_nodes_exactly_on_the_level():
    res = 24
    box = np.abs(node_index(res) - (13, 12, 11)).max(axis=1) - 6  # a box whose faces pass through nodes
    field = (box * grid.spacing(res)).reshape((res + 1,) * 3)
    assert (field == 0).sum() > 100
    coords, values = band(field, np.sqrt(3) * grid.spacing(res))
    vs, fs = sparse_marching_cubes(coords, values, res, block=7)
    vd, fd = marching_cubes(field)
    assert len(fs) == len(fd)
    np.testing.assert_array_equal(np.unique(vs, axis=0), np.unique(vd, axis=0))
    m = trimesh.Trimesh(vs, fs, process=False)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0


def test_level_argument():
    res = 32
    field = sphere_field(res, radius=0.3)
    keep = np.abs(field.reshape(-1) - 0.2) <= np.sqrt(3) * grid.spacing(res)  # the band of the 0.2 level set
    coords, values = node_index(res)[keep], field.reshape(-1)[keep]
    assert_same_mesh(sparse_marching_cubes(coords, values, res, level=0.2, block=8), marching_cubes(field, level=0.2))


def test_cell_with_a_missing_corner_gives_nothing():
    res = 32
    field = sphere_field(res)
    coords, values = band(field, np.sqrt(3) * grid.spacing(res))
    vd, fd = marching_cubes(field)
    # Remove the lower node of a grid edge that the surface crosses.
    pos = grid.world_to_index(vd, res)
    integral = np.isclose(pos, np.round(pos), rtol=0, atol=1e-9)
    first = np.flatnonzero(integral.sum(axis=1) == 2)[0]
    gone = np.where(integral[first], np.round(pos[first]), np.floor(pos[first])).astype(int)
    keep = ~(coords == gone).all(axis=1)
    assert keep.sum() == len(coords) - 1
    vs, fs = sparse_marching_cubes(coords[keep], values[keep], res, block=8)
    assert len(fs) < len(fd)
    # What is left is exactly the dense mesh minus the triangles of the 8 cells around the node.
    idx_d = grid.world_to_index(vd, res)
    in_hole = (np.abs(idx_d[fd].mean(axis=1) - gone) < 1).all(axis=1)  # centroid in one of the 8 cells
    assert in_hole.any()
    both = np.concatenate([vs, vd])
    np.testing.assert_array_equal(triangles(vs, fs, both), triangles(vd, fd[~in_hole], np.concatenate([vd, vs])))
    # No vertex on the grid edges at the missing node (those edges belong only to its cells).
    idx_s = grid.world_to_index(vs, res)
    on_its_lines = np.isclose(idx_s, gone, rtol=0, atol=1e-9).sum(axis=1) == 2
    assert not (on_its_lines & (np.abs(idx_s - gone) < 1).all(axis=1)).any()
    per_edge, consistent = edge_use(fs)
    assert consistent and (per_edge == 1).any() and per_edge.max() == 2  # a hole, nothing else
    assert not trimesh.Trimesh(vs, fs, process=False).is_watertight


def test_nan_is_a_missing_node():
    res = 24
    field = torus_field(res)
    coords, values = band(field, np.sqrt(3) * grid.spacing(res))
    values = values.copy()
    values[::50] = np.nan
    v1, f1 = sparse_marching_cubes(coords, values, res, block=8)
    ok = ~np.isnan(values)
    v2, f2 = sparse_marching_cubes(coords[ok], values[ok], res, block=8)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(f1, f2)


def test_vertices_are_welded_across_block_boundaries():
    res, block = 32, 4
    coords, values = band(torus_field(res), np.sqrt(3) * grid.spacing(res))
    v, f = sparse_marching_cubes(coords, values, res, block=block)
    idx = grid.world_to_index(v, res)
    on_block_face = np.isclose(idx / block, np.round(idx / block), rtol=0, atol=1e-9).any(axis=1)
    assert on_block_face.sum() > 100  # the stitching is exercised
    assert len(np.unique(v, axis=0)) == len(v)  # one vertex per position
    per_edge, consistent = edge_use(f)
    assert (per_edge == 2).all() and consistent
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.body_count == 1 and m.volume > 0


def test_component_filters():
    res = 40
    field = np.minimum(sphere_field(res, (-0.4, 0, 0), 0.4), sphere_field(res, (0.5, 0, 0), 0.15))
    coords, values = band(field, np.sqrt(3) * grid.spacing(res))
    v, f = sparse_marching_cubes(coords, values, res, block=16)
    assert trimesh.Trimesh(v, f, process=False).body_count == 2
    vl, fl = sparse_marching_cubes(coords, values, res, block=16, largest_component=True)
    ml = trimesh.Trimesh(vl, fl, process=False)
    assert ml.body_count == 1 and ml.is_watertight and ml.centroid[0] == pytest.approx(-0.4, abs=0.01)
    assert_same_mesh((vl, fl), marching_cubes(field, largest_component=True))
    _, fm = sparse_marching_cubes(coords, values, res, block=16, min_component_faces=len(fl))
    assert len(fm) == len(fl)


def test_bad_input_raises():
    res = 16
    coords, values = band(sphere_field(res, radius=0.5), np.sqrt(3) * grid.spacing(res))
    with pytest.raises(ValueError, match="different lengths"):
        sparse_marching_cubes(coords, values[:-1], res)
    with pytest.raises(ValueError, match="out of range"):
        sparse_marching_cubes(np.r_[coords, [[0, 0, res + 1]]], np.r_[values, 1.0], res)
    with pytest.raises(ValueError, match="out of range"):
        sparse_marching_cubes(np.r_[coords, [[3, -1, 4]]], np.r_[values, 1.0], res)
    with pytest.raises(ValueError, match="integer node indices"):
        sparse_marching_cubes(coords.astype(np.float64), values, res)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        sparse_marching_cubes(coords[:, :2], values, res)
    with pytest.raises(ValueError, match="duplicate"):
        sparse_marching_cubes(np.r_[coords, coords[:1]], np.r_[values, values[:1]], res)
    with pytest.raises(ValueError, match="no present cell"):
        sparse_marching_cubes(coords[::2], values[::2], res)  # every other node: no cell has its 8 corners
    with pytest.raises(ValueError, match="no present cell"):
        sparse_marching_cubes(np.zeros((0, 3), int), np.zeros(0), res)
    with pytest.raises(ValueError, match="block must be"):
        sparse_marching_cubes(coords, values, res, block=0)
    with pytest.raises(ValueError, match="grid resolution"):
        sparse_marching_cubes(coords, values, 0)
    with pytest.raises(EmptySurfaceError, match="no complete cell crosses"):
        sparse_marching_cubes(coords, np.abs(values) + 0.01, res)  # all outside
    with pytest.raises(EmptySurfaceError, match="no complete cell crosses"):
        sparse_marching_cubes(coords, values, res, level=5.0)  # all inside


def test_close_band_closes_a_surface_that_runs_out_of_the_present_nodes():
    from shapeflow.geometry.sparse_mc import close_band

    res = 32
    coords, values = band(sphere_field(res), np.sqrt(3) * 2 / res)
    keep = ~np.all((coords >= [14, 14, 0]) & (coords <= [18, 18, 8]), axis=1)  # a hole in the band
    c, v = coords[keep], values[keep]
    vo, fo = sparse_marching_cubes(c, v, res)
    assert not trimesh.Trimesh(vo, fo, process=False).is_watertight
    c2, v2 = close_band(c, v, res, fill=float(np.abs(values).max()))
    # the dense-array lookup (grids up to 2^26 nodes) and the sorted-key lookup give the same nodes
    c2s, v2s = close_band(c, v, res, fill=float(np.abs(values).max()), dense_limit=0)
    assert np.array_equal(c2, c2s) and np.array_equal(v2, v2s)
    assert len(c2) > len(c) and set(map(tuple, c2[: len(c)].tolist())) == set(map(tuple, c.tolist()))
    added = c2[len(c):]
    assert set(map(tuple, added.tolist())).isdisjoint(map(tuple, c.tolist()))
    assert np.all(np.abs(v2[len(c):]) == np.float32(np.abs(values).max()))
    vc, fc = sparse_marching_cubes(c2, v2, res)
    closed = trimesh.Trimesh(vc, fc, process=False)
    assert closed.is_watertight and closed.volume > 0
    # a band without holes gains a layer but keeps its surface
    c3, v3 = close_band(coords, values, res, fill=float(np.abs(values).max()))
    v4, f4 = sparse_marching_cubes(c3, v3, res)
    v5, f5 = sparse_marching_cubes(coords, values, res)
    assert len(f4) == len(f5)
    with pytest.raises(ValueError, match="fill must be > 0"):
        close_band(coords, values, res, fill=0.0)
