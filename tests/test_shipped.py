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
