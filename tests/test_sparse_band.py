"""The sparse SDF band: exactly the brute-force band, sorted int16 coordinates, marching-cubes coverage, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from shapeflow.geometry import grid
from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.sparse_band import band_keys, band_nodes

R = 32


def sphere(radius: float = 0.7, center=(0.013, -0.021, 0.008)) -> trimesh.Trimesh:
    m = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    m.apply_translation(center)
    return m


def box(extents=(1.1, 0.73, 1.37), center=(0.013, -0.021, 0.008)) -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=extents)
    m.apply_translation(center)
    return m


def box_sdf(points: np.ndarray, extents, center) -> np.ndarray:
    q = np.abs(points - np.asarray(center)) - np.asarray(extents) / 2.0
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


def brute_force(mesh: trimesh.Trimesh, res: int, band: float = math.sqrt(3.0), bound: float = 1.0):
    """Every node of the grid, its exact SDF, and the band mask."""
    pts = grid.node_points(res, bound, dtype=np.float64)  # C order over [i, j, k]
    sdf = MeshDistance(mesh.vertices, mesh.faces).signed_distance(pts)
    return sdf, np.abs(sdf) <= band * grid.spacing(res, bound)


def as_dense(coords: np.ndarray, res: int) -> np.ndarray:
    mask = np.zeros((res + 1,) * 3, dtype=bool)
    mask[coords[:, 0], coords[:, 1], coords[:, 2]] = True
    return mask


@pytest.mark.parametrize("make", [sphere, box], ids=["sphere", "box"])
def test_band_equals_brute_force(make):
    mesh = make()
    coords, sdf = band_nodes(mesh.vertices, mesh.faces, R)
    assert coords.dtype == np.int16 and coords.shape[1] == 3 and sdf.dtype == np.float32
    assert coords.min() >= 0 and coords.max() <= R
    keys = band_keys(coords, R)
    assert (np.diff(keys) > 0).all()  # sorted by (i, j, k), no duplicates
    dense_sdf, in_band = brute_force(mesh, R)
    assert np.array_equal(np.flatnonzero(in_band), keys)
    assert np.abs(sdf - dense_sdf[keys]).max() < 1e-6
    assert (sdf < 0).any() and (sdf > 0).any()


def test_box_band_matches_the_analytic_sdf():
    ext, ctr = (1.1, 0.73, 1.37), (0.013, -0.021, 0.008)
    coords, sdf = band_nodes(*_vf(box(ext, ctr)), R)
    pts = grid.node_points(R, dtype=np.float64)
    exact = box_sdf(pts, ext, ctr)
    in_band = np.abs(exact) <= math.sqrt(3.0) * grid.spacing(R)
    assert np.array_equal(np.flatnonzero(in_band), band_keys(coords, R))
    assert np.abs(sdf - exact[band_keys(coords, R)]).max() < 1e-6


@pytest.mark.parametrize("make", [sphere, box], ids=["sphere", "box"])
def test_every_sign_change_cell_has_its_eight_corners_in_the_band(make):
    mesh = make()
    coords, _ = band_nodes(mesh.vertices, mesh.faces, R)
    in_band = as_dense(coords, R)
    dense_sdf, _ = brute_force(mesh, R)
    neg = (dense_sdf < 0).reshape((R + 1,) * 3)
    corners = [neg[a:R + a, b:R + b, c:R + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    active = np.any(corners, axis=0) & ~np.all(corners, axis=0)  # (R, R, R) cells with a sign change
    assert active.sum() > 100
    full = np.all([in_band[a:R + a, b:R + b, c:R + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], axis=0)
    assert not (active & ~full).any()


def test_blocks_bound_and_band_width_options():
    mesh = sphere()
    ref = band_nodes(mesh.vertices, mesh.faces, R)
    tiny = band_nodes(mesh.vertices, mesh.faces, R, block=50,
                      distance=MeshDistance(mesh.vertices, mesh.faces))  # many slabs and chunks
    assert np.array_equal(ref[0], tiny[0]) and np.array_equal(ref[1], tiny[1])
    # another band width and another bound
    coords, sdf = band_nodes(mesh.vertices, mesh.faces, 24, band=1.0, bound=0.9)
    dense_sdf, in_band = brute_force(mesh, 24, band=1.0, bound=0.9)
    assert np.array_equal(np.flatnonzero(in_band), band_keys(coords, 24))
    assert np.abs(sdf - dense_sdf[band_keys(coords, 24)]).max() < 1e-6


def test_surface_leaving_the_grid_keeps_the_nodes_inside_it():
    mesh = box(extents=(2.4, 0.8, 0.9), center=(0.05, 0.0, 0.02))  # sticks out on +x and -x
    coords, sdf = band_nodes(mesh.vertices, mesh.faces, R)
    dense_sdf, in_band = brute_force(mesh, R)
    assert np.array_equal(np.flatnonzero(in_band), band_keys(coords, R))
    assert coords[:, 0].min() == 0 and coords[:, 0].max() == R


def test_bad_inputs_raise_one_line_errors():
    mesh = sphere()
    v, f = _vf(mesh)
    cases = [
        (dict(res=0), "resolution"),
        (dict(res=12.5), "resolution"),
        (dict(res=40000), "int16"),
        (dict(res=R, band=2.0), "band"),
        (dict(res=R, block=0), "block"),
    ]
    for kwargs, message in cases:
        _raises(lambda: band_nodes(v, f, **kwargs), message)
    _raises(lambda: band_nodes(v + 5.0, f, R), "empty band")  # entirely outside the grid
    _raises(lambda: band_nodes(v, f[:, ::-1], R), "no inside")  # inward-oriented
    small = sphere(radius=0.25 * 2.0 / R, center=(0.5 / R, 0.5 / R, 0.5 / R))  # between nodes
    _raises(lambda: band_nodes(*_vf(small), R), "no inside")
    _raises(lambda: band_nodes(v, f[:-3], R), "closed")  # a hole: no sign
    _raises(lambda: band_nodes(v[:, :2], f, R), "expected")


def _vf(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def _raises(fn, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        fn()
    assert "\n" not in str(err.value)
