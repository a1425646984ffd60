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
