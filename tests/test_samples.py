"""Distances, samples and grid labels: exactness against libigl and analytic shapes."""

from __future__ import annotations

import igl
import numpy as np
import pytest
import trimesh

from shapeflow.geometry import grid, labels, sampling
from shapeflow.geometry.distance import MeshDistance, closest_point_on_triangles, voxel_distance_bound
from shapeflow.geometry.frame import normalize_vertices
from shapeflow.geometry.watertight import make_watertight

RES = 64
H = grid.spacing(RES)


@pytest.fixture(scope="module")
def sphere():
    """A fine icosphere of radius 0.7 centred at the origin (closed, outward)."""
    m = trimesh.creation.icosphere(subdivisions=5, radius=0.7)
    return np.asarray(m.vertices), np.asarray(m.faces, dtype=np.int64)


@pytest.fixture(scope="module")
def torus_wt():
    m = trimesh.creation.torus(1.0, 0.35)
    v, _ = normalize_vertices(m.vertices)
    return make_watertight(v, m.faces, resolution=RES)


def queries(rng, surface_pts, n=3000):
    return np.concatenate([
        rng.uniform(-1, 1, (n, 3)),
        surface_pts[rng.integers(0, len(surface_pts), n)] + rng.normal(0, 0.005, (n, 3)),
        surface_pts[rng.integers(0, len(surface_pts), n)] + rng.normal(0, 0.05, (n, 3)),
    ])


def test_closest_point_on_triangles_matches_brute_force():
    rng = np.random.default_rng(0)
    n = 500
    a, b, c = rng.normal(size=(3, n, 3))
    p = rng.normal(size=(n, 3)) * 2
    cp, bary = closest_point_on_triangles(p, a, b, c)
    assert np.allclose(bary.sum(1), 1) and (bary >= -1e-12).all()
    assert np.allclose(cp, a * bary[:, :1] + b * bary[:, 1:2] + c * bary[:, 2:])
    # Brute force: dense barycentric lattice on each triangle.
    k = 120
    i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
    keep = i + j <= k
    wb, wc = i[keep] / k, j[keep] / k
    lattice = a[:, None] + wb[None, :, None] * (b - a)[:, None] + wc[None, :, None] * (c - a)[:, None]
    brute = np.linalg.norm(lattice - p[:, None], axis=2).min(1)
    exact = np.linalg.norm(p - cp, axis=1)
    assert (exact <= brute + 1e-12).all()
    assert np.abs(exact - brute).max() < 0.02 * np.linalg.norm(b - a, axis=1).max()


def test_signed_distance_exact_vs_igl_and_sign_both_sides(sphere):
    v, f = sphere
    rng = np.random.default_rng(1)
    ps, _, _ = sampling.sample_surface(v, f, 5000, rng)
    q = queries(rng, ps)
    md = MeshDistance(v, f)
    sdf = md.signed_distance(q)
    d2, _, _ = igl.point_mesh_squared_distance(q, v, f)
    assert np.abs(np.abs(sdf) - np.sqrt(d2)).max() < 1e-6
    inside = igl.fast_winding_number(v, f, q) > 0.5
    assert ((sdf < 0) == inside).all()
    assert inside.any() and (~inside).any()
    # The analytic sphere SDF agrees up to the tessellation error of the icosphere.
    assert np.abs(sdf - (np.linalg.norm(q, axis=1) - 0.7)).max() < 2e-3
    # Truncated queries: exact inside the band, +-trunc with the right sign outside it.
    t = md.signed_distance(q, max_distance=0.05)
    near = np.abs(sdf) < 0.05
    assert np.allclose(t[near], sdf[near], atol=1e-6)
    assert np.array_equal(t[~near], np.sign(sdf[~near]) * 0.05)


def test_sign_hint_and_bounds_on_watertight_torus(torus_wt):
    """Sign hints from the grid agree with pseudonormal signs, and bounds do not change results."""
    r = torus_wt
    md = MeshDistance(r.vertices, r.faces)
    rng = np.random.default_rng(2)
    ps, _, _ = sampling.sample_surface(r.vertices, r.faces, 5000, rng)
    q = queries(rng, ps)
    plain = md.signed_distance(q)
    hint = r.sign_hint(q)
    assert (hint != 0).mean() > 0.5
    known = hint != 0
    assert np.array_equal(np.sign(plain[known]), hint[known].astype(float))
    occ = labels.surface_voxels(r.vertices, r.faces, 32)
    ub = voxel_distance_bound(occ, q)
    assert (ub >= np.abs(plain) - 1e-9).all()
    fast = md.signed_distance(q, sign_hint=hint, upper_bound=ub)
    assert np.abs(fast - plain).max() < 1e-6
    d2, _, _ = igl.point_mesh_squared_distance(q, r.vertices, r.faces)
    assert np.abs(np.abs(fast) - np.sqrt(d2)).max() < 1e-6
    w = igl.fast_winding_number(r.vertices, r.faces, q) > 0.5
    assert ((fast < 0) == w).all()


def test_signed_distance_rejects_open_mesh():
    m = trimesh.creation.box()
    md = MeshDistance(m.vertices, m.faces[1:])
    with pytest.raises(ValueError, match="closed edge-manifold"):
        md.signed_distance(np.array([[0.1, 0.1, 0.1]]))
    assert np.isfinite(md.unsigned_distance(np.array([[0.1, 0.1, 0.1]]))).all()


def test_surface_samples_on_surface_with_outward_normals(torus_wt):
    r = torus_wt
    rng = np.random.default_rng(3)
    p, n, fid = sampling.sample_surface(r.vertices, r.faces, 4000, rng)
    d2, _, _ = igl.point_mesh_squared_distance(p, r.vertices, r.faces)
    assert np.sqrt(d2).max() < 1e-5
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0)
    md = MeshDistance(r.vertices, r.faces)
    step = 0.2 * H
    assert (md.signed_distance(p + step * n) > 0).all()
    assert (md.signed_distance(p - step * n) < 0).all()


def test_surface_sampling_is_area_weighted():
    # Two squares, the second with 4x the area: about 80% of samples land on it.
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0],
                  [0, 0, 1], [2, 0, 1], [2, 2, 1], [0, 2, 1]], dtype=float)
    f = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    p, _, _ = sampling.sample_surface(v, f, 20000, np.random.default_rng(0))
    assert abs((p[:, 2] > 0.5).mean() - 0.8) < 0.02


def test_sharp_edges_box_and_sphere():
    box = trimesh.creation.box()
    s, e = sampling.sharp_edges(box.vertices, box.faces)
    assert len(s) == 12  # the 12 cube edges, not the 6 face diagonals
    assert np.allclose(np.sort(np.linalg.norm(e - s, axis=1)), 1.0)
    # Soup (unmerged vertices) with some faces flipped: same 12 edges.
    soup_v = box.vertices[box.faces].reshape(-1, 3)
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    soup_f[::3] = soup_f[::3, ::-1]
    s2, _ = sampling.sharp_edges(soup_v, soup_f)
    assert len(s2) == 12
    # A smooth sphere has none.
    sph = trimesh.creation.icosphere(4)
    s3, _ = sampling.sharp_edges(sph.vertices, sph.faces, angle_deg=15)
    assert len(s3) == 0


def test_sharp_samples_projected_to_watertight_surface():
    box = trimesh.creation.box()
    v, _ = normalize_vertices(box.vertices)
    r = make_watertight(v, box.faces, resolution=RES)
    md = MeshDistance(r.vertices, r.faces)
    s, e = sampling.sharp_edges(v, box.faces)
    rng = np.random.default_rng(4)
    p, n = sampling.sample_sharp(s, e, 2000, md, r.stats["eps"] + 0.5 * H, rng)
    assert len(p) == 2000
    d2, _, _ = igl.point_mesh_squared_distance(p, r.vertices, r.faces)
    assert np.sqrt(d2).max() < 1e-6
    # Near a cube edge: two coordinates are at +-(0.95 + eps) within the rounding of the shell.
    top2 = np.sort(np.abs(p), axis=1)[:, 1:]
    assert (top2 > 0.95 - 1e-6).all() and (top2 < 0.95 + r.stats["eps"] + 1e-6).all()
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0)
    assert (md.signed_distance(p + 0.2 * H * n) > 0).all()


def test_sharp_samples_of_removed_interior_edges_are_dropped():
    outer = trimesh.creation.box(extents=(1, 1, 1))
    inner = trimesh.creation.box(extents=(0.3, 0.3, 0.3))  # fully inside: removed by the flood fill
    v = np.concatenate([outer.vertices, inner.vertices])
    f = np.concatenate([outer.faces, inner.faces + len(outer.vertices)])
    v, _ = normalize_vertices(v)
    r = make_watertight(v, f, resolution=RES)
    md = MeshDistance(r.vertices, r.faces)
    s, e = sampling.sharp_edges(v, f)
    assert len(s) == 24
    p, _ = sampling.sample_sharp(s, e, 1000, md, r.stats["eps"] + 0.5 * H, np.random.default_rng(5))
    assert len(p) == 1000
    assert (np.abs(p).max(axis=1) > 0.9).all()  # all on the outer box


def test_query_groups_and_bounds():
    rng = np.random.default_rng(6)
    sp = rng.normal(size=(100, 3)) * 0.1
    q, g = sampling.sample_queries(sp, 1000, 500, 300, rng)
    assert q.shape == (1800, 3) and g.dtype == np.uint8
    assert (g[:1000] == 0).all() and (g[1000:1500] == 1).all() and (g[1500:] == 2).all()
    assert np.abs(q).max() <= 1.0
    from scipy.spatial import cKDTree

    d = cKDTree(sp).query(q)[0]
    assert np.median(d[g == 1]) < np.median(d[g == 2]) < np.median(d[g == 0])


def test_occupancy_of_sphere_is_a_shell(sphere):
    v, f = sphere
    occ = labels.surface_voxels(v, f, 64)
    centres = grid.cell_centers(64).reshape(64, 64, 64, 3)
    r = np.linalg.norm(centres, axis=-1)
    half_diag = 0.5 * np.sqrt(3) * grid.spacing(64)
    # Every set voxel is crossed by the sphere, every voxel crossed by it is set.
    assert (np.abs(r[occ] - 0.7) <= half_diag + 1e-3).all()
    p, _, _ = sampling.sample_surface(v, f, 200000, np.random.default_rng(7))
    cells = grid.world_to_cell(p, 64)
    assert occ[cells[:, 0], cells[:, 1], cells[:, 2]].all()
    assert not occ[32, 32, 32] and not occ[0, 0, 0]
    assert (np.abs(r - 0.7) < half_diag * 0.3)[~occ].sum() == 0  # no hole in the shell


def test_triangle_box_overlap_matches_dense_sampling():
    rng = np.random.default_rng(8)
    v = rng.uniform(-0.9, 0.9, (60, 3))
    f = rng.integers(0, 60, (20, 3))
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    occ = labels.surface_voxels(v, f, 16)
    p, _, _ = sampling.sample_surface(v, f, 400000, rng)
    cells = grid.world_to_cell(p, 16)
    dense = np.zeros_like(occ)
    dense[cells[:, 0], cells[:, 1], cells[:, 2]] = True
    assert (occ >= dense).all()  # nothing sampled is missing
    extra = occ & ~dense  # set by SAT but not hit by samples: must touch a triangle (corner clips)
    if extra.any():
        centres = grid.cell_centers(16).reshape(16, 16, 16, 3)[extra]
        d2, _, _ = igl.point_mesh_squared_distance(centres, v, f)
        assert (np.sqrt(d2) <= 0.5 * np.sqrt(3) * grid.spacing(16) + 1e-9).all()
    assert extra.sum() <= 0.05 * occ.sum()


def test_truncated_sdf(sphere):
    v, f = sphere
    md = MeshDistance(v, f)
    tsdf, trunc = labels.truncated_sdf(md, 16)
    assert tsdf.shape == (17, 17, 17) and tsdf.dtype == np.float32
    assert trunc == pytest.approx(2 * grid.spacing(16))
    exact = md.signed_distance(grid.node_points(16, dtype=np.float64)).reshape(17, 17, 17)
    assert np.allclose(tsdf, np.clip(exact, -trunc, trunc), atol=1e-6)
    assert tsdf[8, 8, 8] == pytest.approx(-trunc) and tsdf[0, 0, 0] == pytest.approx(trunc)
