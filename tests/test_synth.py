"""Procedural shapes: exact sign, Lipschitz SDFs, closed meshes in the canonical frame, determinism."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import trimesh

from shapeflow.geometry import grid, synth
from shapeflow.geometry.frame import EXTENT
from shapeflow.geometry.io import load_mesh
from shapeflow.metrics import mesh_contains

RES = 40  # mesh resolution for the per-category tests (fast; features stay > 1 cell)


@pytest.fixture(scope="module")
def meshes():
    """Two shapes per category (seed 0, indices 0 and 1) and their meshes."""
    out = {}
    for c in synth.CATEGORIES:
        for k in range(2):
            shape = synth.sample_shape(c, synth.object_rng(0, c, k))
            out[c, k] = (shape, *synth.shape_to_mesh(shape, RES))
    return out


def test_at_least_six_categories():
    assert len(synth.CATEGORIES) >= 6
    assert len(set(synth.CATEGORIES)) == len(synth.CATEGORIES)


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_deterministic_and_seed_dependent(category):
    p1 = synth.sample_params(category, synth.object_rng(3, category, 5))
    p2 = synth.sample_params(category, synth.object_rng(3, category, 5))
    assert p1 == p2
    assert json.loads(json.dumps(p1)) == p1  # JSON-serialisable and lossless
    other = [synth.sample_params(category, synth.object_rng(s, category, 5)) for s in (4, 5)]
    assert all(o != p1 for o in other)
    s1 = synth.shape_from_params(category, p1)
    s2 = synth.sample_shape(category, synth.object_rng(3, category, 5))
    pts = np.random.default_rng(0).uniform(-1, 1, (500, 3))
    np.testing.assert_array_equal(s1.sdf(pts), s2.sdf(pts))


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_mesh_is_closed_connected_and_in_the_canonical_frame(meshes, category):
    for k in range(2):
        shape, v, f = meshes[category, k]
        m = trimesh.Trimesh(v, f, process=False)
        assert m.is_watertight and m.is_winding_consistent, (category, k)
        assert m.volume > 0
        assert m.body_count == 1, f"{category} {k}: parts not connected"
        assert np.abs(v).max() <= EXTENT + 1e-6
        b = shape.bounds()
        assert (b[1] - b[0]).max() == pytest.approx(2 * EXTENT)
        np.testing.assert_allclose((b[0] + b[1]) / 2, 0, atol=1e-12)
        # The mesh fills the frame: its longest side is close to 2 * EXTENT (less only where a part's
        # bounds are conservative, i.e. rotated parts, or by marching-cubes rounding).
        assert (m.extents.max()) > 2 * EXTENT - 0.1


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_decimated_mesh_stays_closed_and_close(meshes, category):
    shape, v, f = meshes[category, 0]
    vd, fd = synth.shape_to_mesh(shape, RES, decimate=0.7)
    m = trimesh.Trimesh(vd, fd, process=False)
    assert len(fd) < 0.5 * len(f)
    assert m.is_watertight and m.is_winding_consistent and m.volume > 0 and m.body_count == 1
    assert np.abs(shape.sdf(vd)).max() < 0.5 * grid.spacing(RES)  # vertices stay near the zero set
    with pytest.raises(ValueError, match="decimate"):
        synth.shape_to_mesh(shape, 8, decimate=1.0)


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_sdf_sign_matches_the_mesh(meshes, category):
    h = grid.spacing(RES)
    rng = np.random.default_rng(1)
    for k in range(2):
        shape, v, f = meshes[category, k]
        near = v[rng.integers(0, len(v), 2000)] + rng.normal(0, 0.05, (2000, 3))
        pts = np.concatenate([rng.uniform(-1, 1, (4000, 3)), near])
        d = shape.sdf(pts)
        far = np.abs(d) > 1.5 * h  # marching cubes moves the surface by far less than this
        inside_mesh = mesh_contains(v, f, pts[far])
        np.testing.assert_array_equal(inside_mesh, d[far] < 0)
        assert (d < 0).any() and (d > 0).any()


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_sdf_is_one_lipschitz_and_bounded_by_the_distance(meshes, category):
    rng = np.random.default_rng(2)
    shape, v, f = meshes[category, 0]
    x = rng.uniform(-1, 1, (3000, 3))
    y = x + rng.normal(0, 0.05, (3000, 3))
    lip = np.abs(shape.sdf(x) - shape.sdf(y)) / np.linalg.norm(x - y, axis=1)
    assert lip.max() <= 1.0 + 1e-9
    # |f(x)| <= distance to the surface (Lipschitz + zero on the surface), up to the mesh's error.
    dist = np.abs(trimesh.proximity.signed_distance(trimesh.Trimesh(v, f, process=False), x[:800]))
    assert (np.abs(shape.sdf(x[:800])) <= dist + 0.5 * grid.spacing(RES)).all()


def test_exact_distance_of_primitives():
    rng = np.random.default_rng(0)
    p = rng.uniform(-1, 1, (2000, 3))
    # A revolved rectangle touching the axis is exactly a capped cylinder.
    cyl = synth.Cylinder((0.1, 0.0, -0.2), 0.3, 0.4, axis=1)
    rev = synth.Revolve((0.1, 0.0, -0.2), [(0, -0.4), (0.3, -0.4), (0.3, 0.4), (0, 0.4)], axis=1)
    np.testing.assert_allclose(rev.sdf(p), cyl.sdf(p), atol=1e-12)
    # A ball: capsule with a == b.
    ball = synth.Capsule((0.2, 0.1, 0.0), (0.2, 0.1, 0.0), 0.35)
    np.testing.assert_allclose(ball.sdf(p), np.linalg.norm(p - (0.2, 0.1, 0.0), axis=1) - 0.35)
    # A box outside its faces: plain distance along the axis.
    box = synth.Box((0, 0, 0), (0.2, 0.3, 0.4), radius=0.05)
    np.testing.assert_allclose(box.sdf(np.array([[0.7, 0.0, 0.0], [0.0, -0.5, 0.0]])), [0.5, 0.2])
    assert box.sdf(np.zeros((1, 3)))[0] == pytest.approx(-0.2)
    # Torus around z: distance to the ring circle minus the tube radius.
    tor = synth.Torus((0, 0, 0), 0.5, 0.1, axis=2)
    np.testing.assert_allclose(tor.sdf(np.array([[0.5, 0, 0], [0, 0, 0], [0, 0.5, 0.3]])), [-0.1, 0.4, 0.2])


def test_polygon_sdf_against_dense_boundary_sampling():
    from skimage.measure import points_in_poly

    poly = np.array([[0.0, 0.0], [1.0, 0.1], [0.6, 0.5], [1.0, 1.0], [0.1, 0.8]])  # concave
    rng = np.random.default_rng(0)
    q = rng.uniform(-0.3, 1.3, (200, 2))
    d = synth.polygon_sdf(q, poly)
    t = np.linspace(0, 1, 2001)[:, None]
    boundary = np.concatenate([poly[i] + t * (poly[(i + 1) % 5] - poly[i]) for i in range(5)])
    brute = np.sqrt(((q[:, None, :] - boundary[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(np.abs(d), brute, atol=4e-4)  # boundary sampled every <= 6e-4
    np.testing.assert_array_equal(d < 0, points_in_poly(q, poly))


def test_sdf_grid_matches_dense_evaluation_near_the_surface():
    shape = synth.sample_shape("chair", synth.object_rng(0, "chair", 0))
    res = 48
    h = grid.spacing(res)
    dense = shape.sdf(grid.node_points(res, dtype=np.float64)).reshape((res + 1,) * 3)
    sparse = synth.sdf_grid(shape.sdf, res, block=8)
    np.testing.assert_array_equal(np.sign(sparse), np.sign(dense))
    near = np.abs(dense) <= h
    np.testing.assert_array_equal(sparse[near], dense[near])
    assert (np.abs(sparse[~near]) <= np.abs(dense[~near]) + 1e-12).all()  # lower bounds elsewhere
    from shapeflow.geometry.marching_cubes import marching_cubes

    v0, f0 = marching_cubes(dense)
    v1, f1 = marching_cubes(sparse)
    np.testing.assert_array_equal(f0, f1)
    np.testing.assert_array_equal(v0, v1)


def test_unknown_category():
    with pytest.raises(ValueError, match="unknown shape category 'sofa'"):
        synth.sample_shape("sofa", np.random.default_rng(0))


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_command_writes_identical_files_for_the_same_seed(tmp_path):
    from shapeflow.commands import synth as synth_cmd

    parser = argparse.ArgumentParser()
    synth_cmd.register(parser.add_subparsers())
    argv = ["synth", "--per-class", "2", "--seed", "7", "--resolution", "20", "--classes", "mug", "lamp"]
    for name in ("a", "b"):
        args = parser.parse_args([argv[0], str(tmp_path / name), *argv[1:]])
        assert args.func(args) == 0
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert sorted(a) == [
        "lamp/lamp_0000.json", "lamp/lamp_0000.obj", "lamp/lamp_0001.json", "lamp/lamp_0001.obj",
        "mug/mug_0000.json", "mug/mug_0000.obj", "mug/mug_0001.json", "mug/mug_0001.obj", "synth.json",
    ]
    assert a == b
    meta = json.loads(a["mug/mug_0001.json"])
    assert meta["category"] == "mug" and meta["index"] == 1 and meta["seed"] == 7
    assert meta["params"] == synth.sample_params("mug", synth.object_rng(7, "mug", 1))
    info = json.loads(a["synth.json"])
    assert info == {"version": synth.SYNTH_VERSION, "seed": 7, "per_class": 2, "resolution": 20,
                    "decimate": synth.DEFAULT_DECIMATE, "categories": ["mug", "lamp"]}
    v, f = load_mesh(tmp_path / "a" / "mug" / "mug_0001.obj")
    assert trimesh.Trimesh(v, f, process=False).is_watertight
    # A different seed gives different meshes.
    args = parser.parse_args(["synth", str(tmp_path / "c"), *argv[1:3], "--seed", "8", *argv[5:]])
    args.func(args)
    assert _tree_bytes(tmp_path / "c")["mug/mug_0000.obj"] != a["mug/mug_0000.obj"]


def test_dataset_resumes_and_is_independent_of_workers_and_class_subset(tmp_path):
    kw = dict(resolution=16, progress=False)
    s1 = synth.generate_dataset(tmp_path / "one", 2, 3, classes=["vase", "bottle"], **kw)
    assert s1["written"] == 4 and s1["skipped"] == 0
    s2 = synth.generate_dataset(tmp_path / "one", 2, 3, classes=["vase", "bottle"], **kw)
    assert s2["written"] == 0 and s2["skipped"] == 4
    synth.generate_dataset(tmp_path / "two", 2, 3, classes=["bottle"], workers=2, **kw)
    one, two = _tree_bytes(tmp_path / "one"), _tree_bytes(tmp_path / "two")
    for name in ("bottle/bottle_0000.obj", "bottle/bottle_0001.obj", "bottle/bottle_0001.json"):
        assert one[name] == two[name]
    with pytest.raises(ValueError, match="unknown shape category"):
        synth.generate_dataset(tmp_path / "x", 1, classes=["bottle", "sofa"], progress=False)
    with pytest.raises(ValueError, match="per-class"):
        synth.generate_dataset(tmp_path / "x", 0, progress=False)
