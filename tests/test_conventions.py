"""The canonical frame, the SDF sign and the grid convention, pinned down."""

import numpy as np
import pytest

from shapeflow.geometry import frame, grid


def test_normalize_puts_longest_side_on_extent_and_centres_bbox():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 3)) * [3.0, 1.0, 0.5] + [100.0, -20.0, 7.0]
    out, t = frame.normalize_vertices(v)
    lo, hi = out.min(0), out.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-12)
    assert np.isclose((hi - lo).max(), 2 * frame.EXTENT)
    assert np.all(np.abs(out) <= frame.EXTENT + 1e-12)
    np.testing.assert_allclose(t.to_source(out), v, atol=1e-9)


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_normalize_handles_tiny_and_huge_coordinates(scale):
    v = np.array([[0, 0, 0], [1, 2, 3], [3, 1, 2]], dtype=np.float64) * scale
    out, _ = frame.normalize_vertices(v)
    assert np.isclose(np.ptp(out, axis=0).max(), 2 * frame.EXTENT)


@pytest.mark.parametrize(
    "v, msg",
    [(np.zeros((0, 3)), "n > 0"), (np.ones((4, 3)), "coincide"), (np.array([[0, 0, np.nan], [1, 1, 1]]), "NaN")],
)
def test_normalize_rejects_degenerate_input(v, msg):
    with pytest.raises(ValueError, match=msg):
        frame.normalize_vertices(v)


def test_sdf_sign_is_negative_inside():
    assert frame.SDF_SIGN_INSIDE == -1


def test_node_grid_layout():
    res = 4
    h = grid.spacing(res)
    assert h == pytest.approx(2 * frame.BOUND / res)
    c = grid.node_coords_1d(res)
    assert len(c) == res + 1 and c[0] == -frame.BOUND and c[-1] == pytest.approx(frame.BOUND)
    pts = grid.node_points(res).reshape(res + 1, res + 1, res + 1, 3)
    # indexing "ij": the first array axis is x, the last is z
    np.testing.assert_allclose(pts[2, 0, 0], [c[2], c[0], c[0]], atol=1e-7)
    np.testing.assert_allclose(pts[0, 0, 3], [c[0], c[0], c[3]], atol=1e-7)
    idx = np.array([[1.5, 0.0, 4.0]])
    np.testing.assert_allclose(grid.world_to_index(grid.index_to_world(idx, res), res), idx)


def test_cell_grid_layout():
    res = 8
    centers = grid.cell_centers(res).reshape(res, res, res, 3)
    h = grid.spacing(res)
    np.testing.assert_allclose(centers[0, 0, 0], [-1 + h / 2] * 3, atol=1e-7)
    np.testing.assert_allclose(centers[res - 1, 0, 2], [1 - h / 2, -1 + h / 2, -1 + 2.5 * h], atol=1e-6)
    # every centre falls in its own cell
    cells = grid.world_to_cell(centers.reshape(-1, 3), res).reshape(res, res, res, 3)
    ii = np.stack(np.meshgrid(*[np.arange(res)] * 3, indexing="ij"), -1)
    np.testing.assert_array_equal(cells, ii)


@pytest.mark.parametrize("res", [0, -2, 2.5])
def test_grid_rejects_bad_resolution(res):
    with pytest.raises(ValueError, match="resolution"):
        grid.spacing(res)


def test_the_half_cell_shift_is_one_function_that_both_cell_grid_meshers_use():
    """Cell values read as a node-grid field: one ring of padding, nodes at the cell centres, spacing kept."""
    import torch

    from shapeflow.geometry.marching_cubes import voxels_to_mesh
    from shapeflow.models.grid_vae import grid_to_field

    res = 8
    b = grid.padded_cell_bound(res)
    assert b == pytest.approx(frame.BOUND + grid.spacing(res) / 2)
    # the padded grid's nodes are the cell centres: node 1 is cell 0's centre, spacing unchanged
    assert grid.node_coords_1d(res + 1, b)[1] == pytest.approx(grid.cell_centers(res)[0, 0])
    assert grid.spacing(res + 1, b) == pytest.approx(grid.spacing(res))
    # a grid VAE's occupancy logits and a plain voxel grid give the same surface: the faces of the voxels
    occ = np.zeros((res,) * 3, bool)
    occ[2:6, 3:5, 1:7] = True
    fields, field_bound = grid_to_field(torch.from_numpy(np.where(occ, 5.0, -5.0))[None, None].float(), "occupancy")
    assert field_bound == pytest.approx(b) and fields.shape == (1, res + 2, res + 2, res + 2)
    v, _ = voxels_to_mesh(occ)
    h = grid.spacing(res)
    lo, hi = -1 + np.array([2, 3, 1]) * h, -1 + np.array([6, 5, 7]) * h  # the outer faces of the block
    np.testing.assert_allclose(v.min(0), lo, atol=1e-9)
    np.testing.assert_allclose(v.max(0), hi, atol=1e-9)
