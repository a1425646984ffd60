"""Watertight conversion: closed, outward, close to the input, robust to broken inputs."""

from __future__ import annotations

import os
from pathlib import Path

import igl
import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from shapeflow.geometry import grid
from shapeflow.geometry.frame import normalize_vertices
from shapeflow.geometry.io import load_mesh
from shapeflow.geometry.watertight import (
    WatertightError,
    check_closed,
    closed_input,
    is_closed,
    make_watertight,
    make_watertight_dense,
    merge_vertices,
)

RES = 64
H = grid.spacing(RES)


def shared_meshes() -> Path:
    env = os.environ.get("SHAPEFLOW_TEST_MESHES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "meshes"


def canonical(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    v, _ = normalize_vertices(mesh.vertices)
    return v, np.asarray(mesh.faces, dtype=np.int64)


def udf(points: np.ndarray, v: np.ndarray, f: np.ndarray) -> np.ndarray:
    d2, _, _ = igl.point_mesh_squared_distance(np.asarray(points, float), v, f)
    return np.sqrt(d2)


def assert_valid(res_mesh) -> trimesh.Trimesh:
    m = trimesh.Trimesh(res_mesh.vertices, res_mesh.faces, process=False)
    assert m.is_watertight
    assert m.is_winding_consistent
    assert m.volume > 0
    assert res_mesh.stats["watertight"] and res_mesh.stats["winding_consistent"]
    return m


@pytest.mark.parametrize(
    "mesh",
    [trimesh.creation.icosphere(4), trimesh.creation.box(), trimesh.creation.torus(1.0, 0.3)],
    ids=["sphere", "box", "torus"],
)
def test_closed_input_gives_eps_offset_surface(mesh):
    v, f = canonical(mesh)
    r = make_watertight(v, f, resolution=RES)
    assert_valid(r)
    eps = r.stats["eps"]
    assert eps == pytest.approx(0.75 * H)  # the default offset
    # Every output vertex lies on the eps level set of the input's unsigned distance (up to the linear
    # interpolation of marching cubes, largest around the box's edges where the level set is a
    # cylinder of radius eps).
    d = udf(r.vertices, v, f)
    assert np.abs(d - eps).max() < 0.15 * H
    # Chamfer (mean L2, not squared) between the surfaces is about eps, and nothing is missed.
    ps, _ = trimesh.sample.sample_surface(trimesh.Trimesh(v, f), 20000, seed=0)
    back = udf(ps, r.vertices, r.faces)
    assert back.max() < eps + 0.5 * H
    assert abs(back.mean() - eps) < 0.1 * H
    # Enclosed volume = input volume grown by eps (approximately).
    assert r.stats["volume"] > abs(trimesh.Trimesh(v, f).volume)


def test_outward_orientation_sphere():
    v, f = canonical(trimesh.creation.icosphere(3))
    r = make_watertight(v, f, resolution=RES)
    fn = trimesh.Trimesh(r.vertices, r.faces, process=False).face_normals
    centroids = r.vertices[r.faces].mean(axis=1)
    assert (np.einsum("ij,ij->i", fn, centroids) > 0).all()


def test_narrow_band_matches_dense_grid():
    v, f = canonical(trimesh.creation.torus(1.0, 0.3))
    r = make_watertight(v, f, resolution=48)
    dv, df = make_watertight_dense(v, f, resolution=48)
    assert len(dv) == len(r.vertices) and len(df) == len(r.faces)
    assert cKDTree(dv).query(r.vertices)[0].max() < 1e-5
    assert cKDTree(r.vertices).query(dv)[0].max() < 1e-5


def test_open_box_becomes_closed():
    box = trimesh.creation.box()
    v, f = canonical(box)
    f = f[2:]  # delete two faces: one side is half open
    assert not is_closed(v, f)
    r = make_watertight(v, f, resolution=RES)
    m = assert_valid(r)
    # The hole (a whole side) is far wider than 2 * eps, so the flood fill enters the box and the walls
    # become 2 * eps thick shells: one closed, cup-like body around the input.
    assert m.body_count == 1
    ps, _ = trimesh.sample.sample_surface(trimesh.Trimesh(v, f), 5000, seed=1)
    assert udf(ps, r.vertices, r.faces).max() < r.stats["eps"] + 0.5 * H


def test_soup_with_unmerged_vertices_and_duplicates():
    v, f = canonical(trimesh.creation.icosphere(2))
    soup_v = v[f].reshape(-1, 3)  # every face has its own three vertices
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    soup_f = np.concatenate([soup_f, soup_f[:10], soup_f[:5, ::-1]])  # duplicate and flipped faces
    assert not trimesh.Trimesh(soup_v, soup_f, process=False).is_watertight
    r = make_watertight(soup_v, soup_f, resolution=RES)
    assert_valid(r)
    assert r.stats["components"] == 1
    mv, mf = merge_vertices(soup_v, soup_f)
    assert len(mv) == len(np.unique(np.round(v / 1e-6), axis=0))


def test_two_intersecting_boxes_one_body():
    a = trimesh.creation.box(extents=(1.0, 0.4, 0.4))
    b = trimesh.creation.box(extents=(0.4, 1.0, 0.4))
    b.apply_translation((0.2, 0.1, 0.05))
    v = np.concatenate([a.vertices, b.vertices])
    f = np.concatenate([a.faces, b.faces + len(a.vertices)])
    v, _ = normalize_vertices(v)
    r = make_watertight(v, f, resolution=RES)
    assert_valid(r)
    assert r.stats["components"] == 1  # interior faces of the overlap are gone


def test_thin_sheet_survives_as_shell():
    # A single square (two triangles), zero thickness: becomes a closed 2*eps slab.
    v = np.array([[-0.9, -0.9, 0.0], [0.9, -0.9, 0.0], [0.9, 0.9, 0.0], [-0.9, 0.9, 0.0]])
    f = np.array([[0, 1, 2], [0, 2, 3]])
    r = make_watertight(v, f, resolution=RES)
    assert_valid(r)
    eps = r.stats["eps"]
    assert r.stats["volume"] == pytest.approx(1.8 * 1.8 * 2 * eps, rel=0.1)


def test_huge_and_tiny_coordinates_give_the_same_surface():
    m = trimesh.creation.torus(1.0, 0.3)
    out = []
    for scale in (1e-6, 1e6):
        v, _ = normalize_vertices(m.vertices * scale + 123.0 * scale)
        out.append(make_watertight(v, m.faces, resolution=48).vertices)
    assert len(out[0]) == len(out[1])
    assert cKDTree(out[0]).query(out[1])[0].max() < 1e-6


def test_degenerate_inputs_raise():
    v = np.array([[0.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0]])  # collinear: zero area
    with pytest.raises(WatertightError, match="zero area"):
        make_watertight(v, np.array([[0, 1, 2]]), resolution=32)
    with pytest.raises(WatertightError, match="no faces"):
        make_watertight(v, np.zeros((0, 3), dtype=np.int64), resolution=32)
    with pytest.raises(WatertightError, match="canonical frame"):
        make_watertight(v * 5, np.array([[0, 1, 2]]), resolution=32)


def test_decimation_keeps_it_closed():
    v, f = canonical(trimesh.creation.icosphere(4))
    r = make_watertight(v, f, resolution=RES, target_faces=5000)
    assert_valid(r)
    assert r.stats["decimated"] and r.stats["faces_out"] <= 5200
    assert r.node_inside is None  # grid no longer describes the decimated surface exactly


def test_check_closed_detects_problems():
    m = trimesh.creation.box()
    ok, info = check_closed(m.vertices, m.faces)
    assert ok and info["watertight"] and info["winding_consistent"]
    ok, info = check_closed(m.vertices, m.faces[1:])
    assert not ok and not info["watertight"]
    flipped = m.faces.copy()
    flipped[0] = flipped[0, ::-1]
    ok, info = check_closed(m.vertices, flipped)
    assert not ok and info["watertight"] and not info["winding_consistent"]
    ok, info = check_closed(m.vertices, m.faces[:, ::-1])
    assert not ok and info["winding_consistent"] and info["volume"] < 0


@pytest.mark.slow
def test_shared_meshes_become_watertight():
    folder = shared_meshes()
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set SHAPEFLOW_TEST_MESHES)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".obj", ".ply", ".stl", ".glb"))
    assert files
    for p in files:
        v, f = load_mesh(p)
        v, _ = normalize_vertices(v)
        r = make_watertight(v, f, resolution=48)
        assert_valid(r)


def test_closed_input_is_kept_as_is_and_oriented_outward():
    v, f = canonical(trimesh.creation.box(extents=(1.0, 0.04, 0.6)))  # a thin board: the offset would grow it
    kept = closed_input(v, f)
    assert kept is not None and kept.stats["kept_input"] and kept.stats["eps"] == 0.0
    assert kept.node_inside is None and not kept.sign_hint(v).any()  # no grid: every sign is computed
    assert np.allclose(np.sort(kept.vertices, axis=0), np.sort(v, axis=0))
    assert kept.stats["volume"] == pytest.approx(trimesh.Trimesh(v, f).volume, rel=1e-9)
    offset = make_watertight(v, f, resolution=64)  # what the default path makes of the same board
    assert offset.stats["volume"] > 1.5 * kept.stats["volume"]
    # Inward winding is flipped; an unwelded soup of the same box is welded.
    flipped = closed_input(v, f[:, ::-1])
    assert flipped is not None and flipped.stats["volume"] > 0
    soup = closed_input(v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3))
    assert soup is not None and soup.stats["faces_out"] == len(f)


def test_closed_input_refuses_open_or_inconsistent_meshes():
    v, f = canonical(trimesh.creation.box())
    assert closed_input(v, f[:-1]) is None  # a hole
    mixed = f.copy()
    mixed[0] = mixed[0, ::-1]  # one face wound against its neighbours
    assert closed_input(v, mixed) is None
    assert closed_input(v * 2.0, f) is None  # outside the working cube
