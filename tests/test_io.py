"""Mesh export/import: round trips, one-line errors, scene flattening."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from shapeflow.geometry.io import MeshError, load_mesh, save_mesh


@pytest.fixture
def two_parts():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    box = trimesh.creation.box((0.5, 0.3, 0.2))
    box.apply_translation((0.7, -0.1, 0.05))
    m = trimesh.util.concatenate([sphere, box])
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)


@pytest.mark.parametrize("ext", [".glb", ".obj", ".ply"])
def test_round_trip(tmp_path, two_parts, ext):
    v, f = two_parts
    path = tmp_path / f"mesh{ext}"
    save_mesh(path, v, f)
    v2, f2 = load_mesh(path)
    assert v2.dtype == np.float64 and f2.dtype == np.int64
    assert v2.shape == v.shape and f2.shape == f.shape
    np.testing.assert_allclose(v2, v, atol=1e-6)  # GLB/PLY store float32
    np.testing.assert_array_equal(f2, f)
    assert [p.name for p in tmp_path.iterdir()] == [f"mesh{ext}"]  # atomic write left no temporary


def test_save_rejects_unknown_extension(tmp_path, two_parts):
    with pytest.raises(ValueError, match="cannot write '.stl'"):
        save_mesh(tmp_path / "m.stl", *two_parts)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("missing.obj", None, "no such file"),
        ("empty.ply", b"", "empty file"),
        ("garbage.ply", b"this is not a ply\x00\x01\x02", "cannot parse PLY"),
        ("garbage.glb", b"glTF\x07\x00\x00\x00garbage", "cannot parse GLB"),
        ("garbage.obj", b"hello\nworld\n", "no triangles"),
        ("truncated.off", b"OFF\n3 1 0\n0 0 0\n", "cannot parse OFF"),
        ("mesh.xyz", b"1 2 3\n", "unsupported mesh format"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, data, message):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(MeshError) as info:
        load_mesh(path)
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text
    assert message in text


def test_glb_scene_is_flattened_with_node_transforms(tmp_path):
    box = trimesh.creation.box((1.0, 1.0, 1.0))
    tet = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]],
                          [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    t_shift = trimesh.transformations.translation_matrix((3.0, 0.0, 0.0))
    tf = trimesh.transformations
    t_turn = tf.rotation_matrix(np.pi / 2, (0, 0, 1)) @ tf.scale_matrix(2.0)
    scene = trimesh.Scene()
    scene.add_geometry(box, node_name="box_shifted", geom_name="box", transform=t_shift)
    # The same geometry instanced a second time.
    scene.add_geometry(box, node_name="box_turned", geom_name="box", transform=t_turn)
    scene.add_geometry(tet, node_name="tet", geom_name="tet", transform=t_shift @ t_turn)
    path = tmp_path / "scene.glb"
    path.write_bytes(scene.export(file_type="glb"))
    v, f = load_mesh(path)
    assert len(f) == 2 * len(box.faces) + len(tet.faces)
    assert len(v) == 2 * len(box.vertices) + len(tet.vertices)
    # Each instance appears with its own transform: compare vertex sets, independent of node order.
    expected = np.concatenate([
        trimesh.transform_points(box.vertices, t_shift),
        trimesh.transform_points(box.vertices, t_turn),
        trimesh.transform_points(tet.vertices, t_shift @ t_turn),
    ])
    got = np.unique(np.round(v, 5), axis=0)
    want = np.unique(np.round(expected, 5), axis=0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(v.min(axis=0), [-1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(v.max(axis=0), [3.5, 2.0, 2.0], atol=1e-6)
    # Faces keep referring to the right vertices: total area equals the sum of transformed parts.
    area = trimesh.Trimesh(v, f, process=False).area
    assert area == pytest.approx(box.area + 4 * box.area + 4 * tet.area, rel=1e-6)
