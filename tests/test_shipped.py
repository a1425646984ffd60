"""The shipped tiny checkpoints keep generating the same shapes.

``tests/data/generate_chair_seed0.npz`` was written from ``shapeflow generate --class chair --num 2 --seed 0``
(default sampler, steps and resolution) at commit c4aec55, before the architecture step that moved the
checkpoint layer; it holds, per mesh, the vertex and face counts, a SHA-256 of the face array, every 50th
vertex and the vertex mean. Any change to loading, sampling, decoding or meshing that moves a vertex by more
than 1e-6 fails here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from shapeflow import cli

REFERENCE = Path(__file__).resolve().parent / "data" / "generate_chair_seed0.npz"


def test_generate_chair_seed0_matches_the_recorded_meshes(tmp_path):
    out = tmp_path / "chairs"
    assert cli.main(["generate", "--class", "chair", "--num", "2", "--seed", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "generate.json").read_text())
    ref = np.load(REFERENCE)
    assert meta["files"] == ["sample_000.glb", "sample_001.glb"]
    for k, name in enumerate(meta["files"]):
        mesh = trimesh.load(out / name, process=False, force="mesh")
        v, f = np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
        assert [len(v), len(f)] == ref[f"counts_{k}"].tolist()
        assert hashlib.sha256(np.ascontiguousarray(f).tobytes()).hexdigest() == str(ref[f"faces_sha256_{k}"])
        np.testing.assert_allclose(v[::50], ref[f"vertices_every_50_{k}"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(v.mean(0), ref[f"vertex_mean_{k}"], rtol=0, atol=1e-6)


def test_shipped_sparse_vae_reconstructs_an_unseen_mesh_as_one_closed_piece(tmp_path):
    """``shapeflow reconstruct any.obj --model sparse`` right after install (the tiny VAE in the package)."""
    src = tmp_path / "ring.obj"  # a torus: none of the classes or real meshes the tiny VAE was trained on
    trimesh.creation.torus(major_radius=1.0, minor_radius=0.35, major_sections=48, minor_sections=24).export(src)
    out = tmp_path / "rec"
    assert cli.main(["reconstruct", str(src), "--model", "sparse", "--resolution", "128", "--prep-resolution", "128",
                     "--points", "20000", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["ring"]
    assert m["clean"] == 1.0 and m["components"] == 1
    assert m["iou"] > 0.97 and m["normal_consistency"] > 0.98 and m["f_score@1%"] > 0.9, m  # 0.992, 0.995, 0.960
    rec = trimesh.load(out / "ring.glb", force="mesh")
    assert np.allclose(rec.bounds, trimesh.load(src, force="mesh").bounds, atol=0.05)  # the source's frame and units


def test_reconstruct_refuses_a_checkpoint_of_another_family(tmp_path, capsys):
    src = tmp_path / "ball.obj"
    trimesh.creation.icosphere(subdivisions=2).export(src)
    vecset = Path(cli.__file__).parent / "assets" / "tiny" / "vecset_vae"
    assert cli.main(["reconstruct", str(src), "--model", "sparse", "--ckpt", str(vecset), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "vecset_vae checkpoint, not sparse" in err and len(err.splitlines()) == 1


def test_shipped_sparse_vae_encodes_and_decodes_a_mesh_in_python():
    """The three-line Python path of the README: any mesh in its own units -> latent -> mesh in those units."""
    from shapeflow import metrics
    from shapeflow.models import load_vae

    vae, kind = load_vae(Path(cli.__file__).parent / "assets" / "tiny" / "sparse_vae")
    src = trimesh.creation.capsule(height=2.0, radius=0.6)
    src.apply_transform(np.diag([10.0, 10.0, 10.0, 1.0]))
    src.apply_translation([100.0, -5.0, 3.0])  # metres far from the origin: the transform takes care of it
    z, transform = vae.encode_mesh(src.vertices, src.faces, resolution=128, watertight_resolution=128)
    v, f = vae.decode_mesh(z)
    v = transform.to_source(v)
    s = metrics.surface_metrics((v, f), (src.vertices, src.faces), n_points=20_000, fscore_thresholds=(0.01,))
    assert kind == "sparse_vae" and metrics.mesh_cleanliness(v, f)["clean"]
    assert s["f_score@1%"] > 0.9 and s["normal_consistency"] > 0.98, s  # 0.964, 0.996
    assert np.allclose([v.min(0), v.max(0)], src.bounds, atol=0.5)  # the source's units (extent 32)
    with pytest.raises(ValueError, match="multiple of the latent factor"):
        vae.encode_mesh(src.vertices, src.faces, resolution=100)


def test_shipped_sparse_pipeline_generates_after_install(tmp_path):
    """`shapeflow generate --pipeline sparse`: the shipped VecSet pair gives the structure, the shipped sparse
    DiT its latents, the shipped sparse VAE decodes them at 256^3: one mesh per shape, reproducible."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["generate", "--pipeline", "sparse", "--class", "mug", "--num", "1", "--steps", "4",
                         "--out", str(out)]) == 0
        meta = json.loads((out / "generate.json").read_text())
        assert meta["files"] == ["sample_000.glb"] and meta["empty"] == {}
        assert "token_dit" in meta["structure"] and meta["dit"].endswith("sparse_dit")
        assert set(meta["seconds"]) == {"structure", "sample", "decode"}
        mesh = trimesh.load(out / "sample_000.glb", process=False, force="mesh")
        assert len(mesh.faces) > 1000 and np.abs(mesh.vertices).max() <= 1.0
        runs.append(np.asarray(mesh.vertices))
    np.testing.assert_array_equal(runs[0], runs[1])
