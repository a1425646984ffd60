"""Marching cubes: grid convention, orientation, closed output, NaN handling, occupancy and voxel inputs."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from shapeflow.geometry import grid
from shapeflow.geometry.marching_cubes import (
    filter_components,
    marching_cubes,
    occupancy_to_mesh,
    voxels_to_mesh,
)


def sphere_field(res: int, center, radius: float, bound: float = 1.0) -> np.ndarray:
    p = grid.node_points(res, bound, dtype=np.float64)
    return (np.linalg.norm(p - np.asarray(center), axis=1) - radius).reshape((res + 1,) * 3)


def box_field(res: int, center, half, bound: float = 1.0) -> np.ndarray:
    p = grid.node_points(res, bound, dtype=np.float64)
    q = np.abs(p - np.asarray(center)) - np.asarray(half)
    d = np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(axis=1), 0)
    return d.reshape((res + 1,) * 3)


def fit_sphere(v: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through the vertices: |v|^2 = 2 c.v + (r^2 - |c|^2)."""
    a = np.c_[2 * v, np.ones(len(v))]
    x = np.linalg.lstsq(a, (v**2).sum(axis=1), rcond=None)[0]
    c = x[:3]
    return c, float(np.sqrt(x[3] + c @ c))


@pytest.mark.parametrize("res", [16, 33, 64])
@pytest.mark.parametrize("center", [(0.0, 0.0, 0.0), (0.13, -0.21, 0.07)])
@pytest.mark.parametrize("bound", [1.0, 0.8])
def test_sphere_recovers_center_and_radius(res, center, bound):
    r = 0.45
    v, f = marching_cubes(sphere_field(res, center, r, bound), bound=bound)
    h = grid.spacing(res, bound)
    c_fit, r_fit = fit_sphere(v)
    # The requirement is "within one voxel"; MC of an exact SDF does much better, and the tight
    # tolerance is what catches grid off-by-ones (e.g. dividing by res + 1 instead of res moves the
    # off-centre sphere by about h / 2).
    assert np.abs(c_fit - center).max() < 0.05 * h
    assert abs(r_fit - r) < 0.05 * h
    assert np.abs(np.linalg.norm(v - center, axis=1) - r).max() < 0.1 * h
    assert v.dtype == np.float64 and f.dtype == np.int64 and f.shape[1] == 3


def test_sphere_is_closed_and_outward():
    r = 0.6
    v, f = marching_cubes(sphere_field(40, (0.1, 0.0, -0.1), r))
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.is_winding_consistent
    # Positive signed volume <=> normals point outward.
    assert m.volume == pytest.approx(4 / 3 * np.pi * r**3, rel=0.02)
    # Every face normal points away from the centre.
    centroids = v[f].mean(axis=1) - (0.1, 0.0, -0.1)
    assert (np.einsum("ij,ij->i", m.face_normals, centroids) > 0).all()


def test_box_is_watertight_with_outward_normals():
    half = np.array([0.5, 0.3, 0.7])
    v, f = marching_cubes(box_field(32, (0.05, 0.0, -0.1), half))
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume > 0
    assert m.volume == pytest.approx(np.prod(2 * half), rel=0.03)
    c = np.array([0.05, 0, -0.1])
    np.testing.assert_allclose(m.bounds, [c - half, c + half], atol=1e-6)  # float32 inside skimage


def test_surface_touching_the_border_is_capped():
    field = sphere_field(24, (0.0, 0.0, 0.0), 1.3)  # the inside reaches every face of the cube
    h = grid.spacing(24)
    v, f = marching_cubes(field)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.volume > 0
    assert np.abs(v).max() <= 1.0 + h + 1e-9
    v_open, f_open = marching_cubes(field, close_boundary=False)
    assert not trimesh.Trimesh(v_open, f_open, process=False).is_watertight
    assert np.abs(v_open).max() <= 1.0 + 1e-9


def test_level_argument():
    field = sphere_field(32, (0, 0, 0), 0.3)
    v, _ = marching_cubes(field, level=0.2)  # the 0.2 offset surface: radius 0.5
    assert np.linalg.norm(v, axis=1).mean() == pytest.approx(0.5, abs=0.01)


def test_nan_nodes_far_from_the_surface_change_nothing():
    res = 32
    field = sphere_field(res, (0.1, -0.05, 0.0), 0.5)
    h = grid.spacing(res)
    holes = field.copy()
    holes[np.abs(field) > 3 * h] = np.nan  # what a coarse-to-fine decoder leaves unevaluated
    assert np.isnan(holes).mean() > 0.5
    v0, f0 = marching_cubes(field)
    v1, f1 = marching_cubes(holes)
    np.testing.assert_array_equal(f0, f1)
    np.testing.assert_allclose(v0, v1, atol=1e-12)


def test_nan_takes_the_sign_of_its_nearest_evaluated_node():
    res = 16
    field = sphere_field(res, (0, 0, 0), 0.5)
    field[:, :, :3] = np.nan  # unevaluated slab, outside the sphere
    field[8, 8, 8] = np.nan  # one unevaluated node deep inside
    v, f = marching_cubes(field)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.body_count == 1  # no spurious surface around either NaN region
    assert m.volume == pytest.approx(4 / 3 * np.pi * 0.5**3, rel=0.05)


def test_all_nan_and_no_crossing_raise():
    with pytest.raises(ValueError, match="no finite value"):
        marching_cubes(np.full((5, 5, 5), np.nan))
    with pytest.raises(ValueError, match="no crossing.*outside"):
        marching_cubes(np.ones((9, 9, 9)))
    with pytest.raises(ValueError, match="no crossing.*inside"):
        marching_cubes(-np.ones((9, 9, 9)))
    with pytest.raises(ValueError, match="cubic node-grid"):
        marching_cubes(np.zeros((9, 9, 8)))


def test_infinities_are_clipped():
    field = sphere_field(16, (0, 0, 0), 0.5)
    field[field > 0.7] = np.inf
    field[field < -0.3] = -np.inf
    v, f = marching_cubes(field)
    assert np.isfinite(v).all()
    assert np.linalg.norm(v, axis=1).mean() == pytest.approx(0.5, abs=0.01)


def test_occupancy_to_mesh_flips_the_convention():
    res = 32
    sdf = sphere_field(res, (0.0, 0.2, 0.0), 0.5)
    prob = 1.0 / (1.0 + np.exp(sdf / 0.02))  # high inside
    v, f = occupancy_to_mesh(prob, threshold=0.5)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.volume > 0 and m.is_watertight
    c, r = fit_sphere(v)
    assert np.abs(c - (0.0, 0.2, 0.0)).max() < 0.1 * grid.spacing(res)
    assert r == pytest.approx(0.5, abs=0.1 * grid.spacing(res))
    # A higher threshold is a smaller surface.
    v2, _ = occupancy_to_mesh(prob, threshold=0.9)
    assert np.linalg.norm(v2 - (0.0, 0.2, 0.0), axis=1).mean() < r - 0.02


def test_voxels_to_mesh_follows_voxel_faces():
    res = 16
    h = grid.spacing(res)
    occ = np.zeros((res,) * 3, dtype=bool)
    occ[3:9, 5:7, 0:4] = True  # touches the -z border of the grid
    v, f = voxels_to_mesh(occ)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.volume > 0
    lo = -1.0 + np.array([3, 5, 0]) * h
    hi = -1.0 + np.array([9, 7, 4]) * h
    # Half-cell shift: the surface passes exactly through the faces of the occupied voxels.
    np.testing.assert_allclose(m.bounds, [lo, hi], atol=1e-6)
    assert m.volume <= np.prod(hi - lo) + 1e-9  # bevelled edges only remove volume
    assert m.volume > 0.7 * np.prod(hi - lo)
    # Every voxel centre of the block is inside the mesh.
    from shapeflow.metrics import mesh_contains

    centres = grid.cell_centers(res, dtype=np.float64).reshape(res, res, res, 3)[occ]
    assert mesh_contains(v, f, centres).all()


def test_voxels_to_mesh_single_corner_voxel():
    occ = np.zeros((8, 8, 8))
    occ[7, 0, 7] = 1.0
    v, _ = voxels_to_mesh(occ)
    h = grid.spacing(8)
    np.testing.assert_allclose(v.min(axis=0), [1 - h, -1, 1 - h], atol=1e-6)
    np.testing.assert_allclose(v.max(axis=0), [1, -1 + h, 1], atol=1e-6)


def test_component_filters():
    res = 40
    field = np.minimum(sphere_field(res, (-0.4, 0, 0), 0.4), sphere_field(res, (0.5, 0, 0), 0.15))
    v, f = marching_cubes(field)
    assert trimesh.Trimesh(v, f, process=False).body_count == 2
    vl, fl = marching_cubes(field, largest_component=True)
    ml = trimesh.Trimesh(vl, fl, process=False)
    assert ml.body_count == 1 and ml.is_watertight
    assert ml.centroid[0] == pytest.approx(-0.4, abs=0.01)
    assert fl.max() == len(vl) - 1  # unreferenced vertices are removed
    vm, fm = marching_cubes(field, min_component_faces=len(fl))  # only the big one has that many faces
    np.testing.assert_array_equal(fm, fl)
    with pytest.raises(ValueError, match="removed every face"):
        filter_components(v, f, min_faces=10 * len(f))


def test_nodes_exactly_on_the_level_give_a_closed_mesh():
    p = grid.node_points(16, dtype=np.float64)
    field = (np.abs(p).max(axis=1) - 0.5).reshape((17,) * 3)  # the cube's faces pass through nodes
    assert (field == 0).sum() > 100
    v, f = marching_cubes(field)
    m = trimesh.Trimesh(v, f, process=False)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0
    np.testing.assert_allclose(m.bounds, [[-0.5] * 3, [0.5] * 3], atol=1e-6)


def test_smooth_removes_bumps_of_a_noisy_field():
    res, radius = 48, 0.6
    clean = sphere_field(res, (0.0, 0.0, 0.0), radius)
    rng = np.random.default_rng(0)
    noisy = clean + 0.02 * rng.standard_normal(clean.shape)  # node noise: a lumpy surface
    h = grid.spacing(res, 1.0)

    def radial_error(v):
        return float(np.abs(np.linalg.norm(v, axis=1) - radius).mean())

    raw = radial_error(marching_cubes(noisy)[0])
    smoothed = radial_error(marching_cubes(noisy, smooth=h)[0])
    assert smoothed < 0.5 * raw
    # a smooth field stays where it is (the filter of a sphere SDF moves its zero set by O(h^2 / r))
    _, r = fit_sphere(marching_cubes(clean, smooth=h)[0])
    assert abs(r - radius) < 0.25 * h
    v0, f0 = marching_cubes(noisy)
    v1, f1 = marching_cubes(noisy, smooth=0.0)
    assert np.array_equal(v0, v1) and np.array_equal(f0, f1)
    with pytest.raises(ValueError, match="smooth must be >= 0"):
        marching_cubes(clean, smooth=-0.1)
