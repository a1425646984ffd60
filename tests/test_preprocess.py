"""The preprocessing pipeline and dataset driver: outputs, failures, resume, shards, CLI."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh

from shapeflow.data import format as fmt
from shapeflow.data import preprocess as pp
from shapeflow.geometry.distance import MeshDistance
from shapeflow.geometry.io import load_mesh

CFG = pp.PreprocessConfig(resolution=48, surface_points=600, sharp_points=200, sdf_points=1500, tsdf_res=16)


def shared_meshes() -> Path:
    env = os.environ.get("SHAPEFLOW_TEST_MESHES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "meshes"


def write_good(root: Path) -> list[Path]:
    """Three small valid meshes in class folders (OBJ, STL soup, PLY)."""
    paths = [root / "ball" / "sphere.obj", root / "cube" / "box.stl", root / "ring" / "torus.ply"]
    meshes = [trimesh.creation.icosphere(2), trimesh.creation.box(extents=(1, 2, 0.5)),
              trimesh.creation.torus(1.0, 0.3, major_sections=24, minor_sections=12)]
    for p, m in zip(paths, meshes):
        p.parent.mkdir(parents=True, exist_ok=True)
        m.export(p)
    return paths


def write_bad(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    bad = root / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("obj", "ply", "stl", "glb"):
        p = bad / f"garbage.{ext}"
        p.write_bytes(rng.bytes(2000))
        paths.append(p)
    (bad / "empty.obj").write_bytes(b"")
    (bad / "coincident.obj").write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\n")
    (bad / "zero_area.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3\nf 2 3 4\n")
    return paths + [bad / "empty.obj", bad / "coincident.obj", bad / "zero_area.obj"]


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def load_object(out: Path, oid: str) -> tuple[dict, bytes]:
    return fmt.read_sample_file(out / oid / fmt.SAMPLES_FILE), (out / oid / fmt.MESH_FILE).read_bytes()


def test_process_object_outputs(tmp_path):
    src = write_good(tmp_path / "in")[1]  # the box STL: a soup with sharp edges
    out = tmp_path / "out"
    rec = pp.process_object(src, out, CFG)
    assert rec["status"] == "ok" and rec["error"] is None
    oid = rec["id"]
    assert len(oid) == pp.ID_HEX_DIGITS and oid == pp.object_id(src)
    assert set(os.listdir(out / oid)) == {fmt.SAMPLES_FILE, fmt.MESH_FILE, fmt.META_FILE}
    a = fmt.read_sample_file(out / oid / fmt.SAMPLES_FILE)
    fmt.validate(a)
    ns = CFG.surface_points + CFG.sharp_points
    assert a["surface_points"].shape == (ns, 3) and a["surface_sharp"].sum() == CFG.sharp_points
    assert not a["surface_sharp"][: CFG.surface_points].any()
    assert a["sdf_points"].shape == (CFG.sdf_points, 3) and a["sdf_values"].dtype == np.float32
    assert np.bincount(a["sdf_group"], minlength=3).tolist() == list(CFG.sdf_counts())
    assert a["occ64"].shape == (64, 64, 64) and a["occ64"].any()
    assert a["tsdf"].shape == (17, 17, 17)
    meta = json.loads((out / oid / fmt.META_FILE).read_text())
    assert meta["tsdf"]["res"] == 16 and meta["tsdf"]["trunc"] > 0
    # The stored SDF is the exact signed distance to the stored watertight mesh.
    v, f = load_mesh(out / oid / fmt.MESH_FILE)
    sdf = MeshDistance(v, f).signed_distance(a["sdf_points"].astype(np.float64))
    assert np.abs(sdf - a["sdf_values"]).max() < 1e-6
    # The transform maps the source into the canonical frame.
    t = rec["transform"]
    sv, _ = load_mesh(src)
    canon = (sv - np.array(t["center"])) * t["scale"]
    assert np.isclose(np.abs(canon).max(), 0.95)
    stats = rec["stats"]
    assert stats["faces_in"] == 12 and stats["watertight_in"] is True and stats["sharp_edges"] == 12
    assert stats["seconds"] > 0 and stats["peak_rss_mb"] > 0


def test_keep_closed_uses_closed_inputs_as_they_are(tmp_path):
    src = tmp_path / "board.obj"
    trimesh.creation.box(extents=(1.0, 0.04, 0.6)).export(src)  # closed, thinner than two offsets
    cfg = pp.PreprocessConfig(**{**dataclass_kwargs(CFG), "keep_closed": True})
    rec = pp.process_object(src, tmp_path / "out", cfg)
    assert rec["status"] == "ok" and rec["stats"]["kept_input"]
    a = fmt.read_sample_file(tmp_path / "out" / rec["id"] / fmt.SAMPLES_FILE)
    v, f = load_mesh(tmp_path / "out" / rec["id"] / fmt.MESH_FILE)
    assert len(f) == 12  # the input's triangles, not a remeshed offset surface
    # The labels are the exact signed distances to the board itself (negative inside), sign included.
    half = np.abs(v).max(axis=0)
    q = a["sdf_points"].astype(np.float64)
    outside = np.maximum(np.abs(q) - half, 0.0)
    box_sdf = np.linalg.norm(outside, axis=1) + np.minimum((np.abs(q) - half).max(axis=1), 0.0)
    assert np.abs(box_sdf - a["sdf_values"]).max() < 1e-5
    assert np.abs(a["tsdf"]).max() > 0 and (a["tsdf"] < 0).any()
    # Without the option the same input becomes the offset surface (thicker); an open input still does.
    rec = pp.process_object(src, tmp_path / "out2", CFG)
    assert not rec["stats"]["kept_input"] and rec["stats"]["volume"] > 1.5 * np.prod(2 * half)
    open_src = tmp_path / "open.obj"
    box = trimesh.creation.box()
    trimesh.Trimesh(box.vertices, box.faces[:-2]).export(open_src)
    rec = pp.process_object(open_src, tmp_path / "out3", cfg)
    assert rec["status"] == "ok" and not rec["stats"]["kept_input"]


def test_config_keys_added_later_take_their_default_on_resume(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = pp._config_dict(CFG)
    del old["keep_closed"]  # a folder written before the option existed
    (out / pp.CONFIG_FILE).write_text(json.dumps(old))
    pp._check_config(out, CFG)  # same config: accepted
    with pytest.raises(ValueError, match="keep_closed=False"):
        pp._check_config(out, pp.PreprocessConfig(**{**dataclass_kwargs(CFG), "keep_closed": True}))


def test_bad_files_fail_with_one_line_reasons_while_others_finish(tmp_path):
    good = write_good(tmp_path / "in")
    bad = write_bad(tmp_path / "in")
    listing = tmp_path / "list.txt"
    missing = tmp_path / "in" / "missing.obj"
    listing.write_text("\n".join(str(p) for p in good + bad + [missing]) + "\n# a comment\n\n")
    out = tmp_path / "out"
    summary = pp.preprocess_dataset(listing, out, CFG, workers=0, progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (len(good), len(bad) + 1, 0)
    recs = {r["source"]: r for r in manifest_lines(out)}
    assert len(recs) == len(good) + len(bad) + 1
    for p in good:
        assert recs[str(p)]["status"] == "ok"
    for p in bad + [missing]:
        r = recs[str(p)]
        assert r["status"] == "failed", p
        assert r["error"] and "\n" not in r["error"] and str(p) in r["error"]
    assert "empty file" in recs[str(tmp_path / "in" / "bad" / "empty.obj")]["error"]
    assert "coincide" in recs[str(tmp_path / "in" / "bad" / "coincident.obj")]["error"]
    assert "zero area" in recs[str(tmp_path / "in" / "bad" / "zero_area.obj")]["error"]
    assert "no such file" in recs[str(missing)]["error"] and recs[str(missing)]["id"] is None
    # A second run skips everything, including known failures, and appends nothing.
    n_lines = len(manifest_lines(out))
    again = pp.preprocess_dataset(listing, out, CFG, workers=0, progress=False)
    assert again.ok == 0 and again.skipped == len(good) + len(bad) and again.failed == 1  # missing again
    assert len(manifest_lines(out)) == n_lines


def test_manifest_latest_record_wins_and_duplicates(tmp_path):
    good = write_good(tmp_path / "in")
    dup = tmp_path / "in" / "copy" / "sphere_again.obj"
    dup.parent.mkdir()
    dup.write_bytes(good[0].read_bytes())
    out = tmp_path / "out"
    s = pp.preprocess_dataset(tmp_path / "in", out, CFG, workers=0, progress=False)
    assert s.ok == 3 and s.skipped == 1
    lines = manifest_lines(out)
    assert len(lines) == 4
    assert {r["id"] for r in lines if r["source"] in (str(good[0]), str(dup))} == {pp.object_id(dup)}
    # Later records replace earlier ones of the same id.
    oid = pp.object_id(good[1])
    from shapeflow import fileio

    fileio.append_line(out / "manifest.jsonl", json.dumps({"id": oid, "source": "x", "status": "failed",
                                                           "error": "e", "transform": None, "stats": {}}))
    latest = {r["id"]: r for r in pp.read_manifest(out)}
    assert latest[oid]["status"] == "failed" and len(latest) == 3
    assert len(pp.read_manifest(out, status="ok")) == 2


def test_shards_partition_the_inputs(tmp_path):
    write_good(tmp_path / "in")
    write_bad(tmp_path / "in")
    files = pp.list_inputs(tmp_path / "in")
    assert files == sorted(files, key=lambda p: p.relative_to(tmp_path / "in").as_posix())
    shards = [pp.shard_inputs(files, i, 3) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(files)
    assert sum(len(s) for s in shards) == len(files)
    assert pp.parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError):
            pp.parse_shard(bad)
    # Two shards into one folder give the same manifest content as one run.
    out = tmp_path / "out"
    for i in range(2):
        pp.preprocess_dataset(tmp_path / "in", out, CFG, workers=0, shard=(i, 2), progress=False)
    assert sorted(r["source"] for r in manifest_lines(out)) == sorted(str(p) for p in files)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    write_good(tmp_path / "in")
    full, part = tmp_path / "full", tmp_path / "part"
    pp.preprocess_dataset(tmp_path / "in", full, CFG, workers=0, progress=False)
    s1 = pp.preprocess_dataset(tmp_path / "in", part, CFG, workers=0, progress=False, limit=1)
    assert s1.ok == 1
    s2 = pp.preprocess_dataset(tmp_path / "in", part, CFG, workers=0, progress=False)
    assert s2.ok == 2 and s2.skipped == 1
    for rec in pp.read_manifest(full):
        a, mesh_a = load_object(full, rec["id"])
        b, mesh_b = load_object(part, rec["id"])
        assert mesh_a == mesh_b
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_outputs(tmp_path):
    src = tmp_path / "in"
    write_good(src)
    for k in range(3):  # more objects so the kill lands mid-run
        p = src / "extra" / f"torus{k}.obj"
        p.parent.mkdir(exist_ok=True)
        trimesh.creation.torus(1.0, 0.2 + 0.05 * k).export(p)
    full, killed = tmp_path / "full", tmp_path / "killed"
    cfg = dataclass_kwargs(CFG)
    code = (
        "from shapeflow.data import preprocess as pp\n"
        f"pp.preprocess_dataset({str(src)!r}, {str(killed)!r}, pp.PreprocessConfig(**{cfg!r}), "
        "workers=1, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            manifest = killed / "manifest.jsonl"
            if manifest.is_file() and manifest.read_text().count("\n") >= 1:
                break
            assert proc.poll() is None, "preprocessing finished or crashed before it could be killed"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker
    finally:
        proc.wait()
    done = [d for d in killed.iterdir() if (d / fmt.META_FILE).is_file()]
    assert 1 <= len(done) < 6, "the kill should land mid-run"
    # Whatever exists under a final name is complete and readable.
    for d in killed.iterdir():
        if d.is_dir() and (d / fmt.SAMPLES_FILE).is_file():
            fmt.validate(fmt.read_sample_file(d / fmt.SAMPLES_FILE))
    resumed = pp.preprocess_dataset(src, killed, CFG, workers=0, progress=False)
    assert resumed.skipped == len(done) and resumed.ok == 6 - len(done)
    pp.preprocess_dataset(src, full, CFG, workers=0, progress=False)
    recs = pp.read_manifest(full)
    assert len(recs) == 6
    for rec in recs:
        a, mesh_a = load_object(full, rec["id"])
        b, mesh_b = load_object(killed, rec["id"])
        assert mesh_a == mesh_b
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not list((killed / rec["id"]).glob(".*.tmp-*"))
    pairs = [(r["id"], r["source"]) for r in manifest_lines(killed) if r["status"] == "ok"]
    assert len(pairs) == len(set(pairs)) == 6


def dataclass_kwargs(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


@pytest.mark.slow
def test_worker_pool_and_timeout(tmp_path):
    good = write_good(tmp_path / "in")
    bad = write_bad(tmp_path / "in")
    out = tmp_path / "out"
    s = pp.preprocess_dataset(tmp_path / "in", out, CFG, workers=2, progress=False, start_method="spawn")
    assert (s.ok, s.failed) == (len(good), len(bad))
    assert {r["status"] for r in manifest_lines(out)} == {"ok", "failed"}
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        # Two workers split the CPUs (fcpw threads over every CPU a process may use).
        share = len(os.sched_getaffinity(0)) // 2
        assert {r["stats"]["cpus"] for r in manifest_lines(out) if r["status"] == "ok"} == {share}
    # A per-object timeout kills the worker and records the object as failed (the default config
    # needs seconds per object; the pool checks its workers every second).
    out2 = tmp_path / "out2"
    s2 = pp.preprocess_dataset(good[2], out2, pp.PreprocessConfig(), workers=1, progress=False, timeout=0.2)
    assert s2.failed == 1
    (rec,) = manifest_lines(out2)
    assert rec["status"] == "failed" and "timed out" in rec["error"]


def test_cli_command(tmp_path, capsys):
    from shapeflow.commands import preprocess as cmd

    write_good(tmp_path / "in")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd.register(sub)
    args = parser.parse_args([
        "preprocess", str(tmp_path / "in"), str(tmp_path / "out"), "--workers", "0", "--resolution", "32",
        "--surface-points", "300", "--sharp-points", "50", "--sdf-points", "500", "--tsdf-res", "8",
        "--shard", "0/1", "--no-progress",
    ])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("shapeflow preprocess: 3 ok, 0 failed, 0 skipped")
    oid = pp.read_manifest(tmp_path / "out")[0]["id"]
    meta = json.loads((tmp_path / "out" / oid / fmt.META_FILE).read_text())
    assert meta["config"]["resolution"] == 32 and meta["tsdf"]["res"] == 8
    with pytest.raises(FileNotFoundError):
        pp.preprocess_dataset(tmp_path / "nope", tmp_path / "out2", progress=False)
    # Objects are keyed by content only: another config into the same folder is refused.
    with pytest.raises(ValueError, match="resolution=32 .now 48."):
        pp.preprocess_dataset(tmp_path / "in", tmp_path / "out", CFG, workers=0, progress=False)


@pytest.mark.slow
def test_all_shared_meshes_preprocess_ok(tmp_path):
    folder = shared_meshes()
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set SHAPEFLOW_TEST_MESHES)")
    cfg = pp.PreprocessConfig(resolution=64, surface_points=2000, sharp_points=500, sdf_points=5000)
    s = pp.preprocess_dataset(folder, tmp_path / "out", cfg, workers=2, progress=False)
    recs = pp.read_manifest(tmp_path / "out")
    bad = [(r["source"], r["error"]) for r in recs if r["status"] != "ok"]
    assert not bad
    assert s.ok == 12 and len(recs) == 12
    for r in recs:
        assert r["stats"]["faces_out"] > 0 and r["stats"]["surface_uniform"] == 2000


def test_sample_file_format_roundtrip_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "surface_points": rng.random((10, 3), dtype=np.float32),
        "surface_normals": rng.random((10, 3), dtype=np.float32),
        "surface_sharp": np.r_[np.zeros(7, bool), np.ones(3, bool)],
        "sdf_points": rng.random((20, 3), dtype=np.float32),
        "sdf_values": rng.random(20, dtype=np.float32),
        "sdf_group": np.repeat(np.arange(3, dtype=np.uint8), [8, 5, 7]),
        "occ64": np.zeros((64, 64, 64), bool),
    }
    fmt.write_sample_file(tmp_path / "s.safetensors", arrays)
    back = fmt.read_sample_file(tmp_path / "s.safetensors")
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    # memory maps hold the same arrays (dtypes and shapes too), read-only
    mm = fmt.read_sample_file(tmp_path / "s.safetensors", mmap=True)
    assert mm.keys() == arrays.keys()
    for k in arrays:
        assert mm[k].dtype == arrays[k].dtype and np.array_equal(mm[k], arrays[k]), k
    assert not mm["sdf_values"].flags.writeable
    assert list(fmt.read_sample_file(tmp_path / "s.safetensors", ["sdf_group"], mmap=True)) == ["sdf_group"]
    with pytest.raises(KeyError):
        fmt.read_sample_file(tmp_path / "s.safetensors", ["tsdf"], mmap=True)
    # a truncated or garbled file is a one-line error naming it
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    for name, message in (("cut", "past the end"), ("junk", "not a readable safetensors")):
        with pytest.raises(ValueError, match=message) as err:
            fmt.read_sample_file(tmp_path / f"{name}.safetensors", mmap=True)
        assert f"{name}.safetensors" in str(err.value) and "\n" not in str(err.value)
    assert list(fmt.read_sample_file(tmp_path / "s.safetensors", ["occ64"])) == ["occ64"]
    with pytest.raises(KeyError):
        fmt.read_sample_file(tmp_path / "s.safetensors", ["tsdf"])
    with pytest.raises(FileNotFoundError):
        fmt.read_sample_file(tmp_path / "missing.safetensors")
    bad = [
        ("sdf_values", rng.random(20)),  # float64
        ("sdf_values", rng.random(19, dtype=np.float32)),  # Q mismatch
        ("occ64", np.zeros((32, 32, 32), bool)),
        ("surface_sharp", np.r_[np.ones(3, bool), np.zeros(7, bool)]),  # sharp points not at the tail
        ("sdf_group", np.r_[np.ones(10, np.uint8), np.zeros(10, np.uint8)]),  # groups out of order
    ]
    messages = {"surface_sharp": "tail", "sdf_group": "sorted"}
    for name, value in bad:
        with pytest.raises(ValueError, match=messages.get(name, name)):
            fmt.validate({**arrays, name: value})
    with pytest.raises(ValueError, match="missing"):
        fmt.validate({k: v for k, v in arrays.items() if k != "occ64"})
    with pytest.raises(ValueError):  # invalid arrays are refused before anything is written
        fmt.write_sample_file(tmp_path / "bad.safetensors", {**arrays, "sdf_group": np.zeros(20)})
    assert not list(tmp_path.glob("*bad*"))


def test_read_manifest_skips_a_torn_line(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(
        '{"id": "a", "source": "x", "status": "ok"}\n{"id": "b", "sou'
    )
    recs = pp.read_manifest(tmp_path)
    assert [r["id"] for r in recs] == ["a"]


def test_sparse_band_is_written_exactly(tmp_path):
    from shapeflow.geometry import grid

    src = write_good(tmp_path / "in")[0]  # the icosphere
    cfg = pp.PreprocessConfig(**{**dataclass_kwargs(CFG), "sparse_res": 40})
    rec = pp.process_object(src, tmp_path / "out", cfg)
    assert rec["status"] == "ok", rec["error"]
    oid = rec["id"]
    a = fmt.read_sample_file(tmp_path / "out" / oid / fmt.SAMPLES_FILE)
    fmt.validate(a)
    coords, sdf = a["sparse_coords"], a["sparse_sdf"]
    assert coords.dtype == np.int16 and sdf.dtype == np.float32 and int(a["sparse_res"]) == 40
    meta = json.loads((tmp_path / "out" / oid / fmt.META_FILE).read_text())
    assert meta["sparse"]["res"] == 40 and meta["sparse"]["nodes"] == len(sdf) == rec["stats"]["sparse_nodes"]
    assert rec["stats"]["t_sparse"] > 0
    # The band of the stored watertight mesh, by brute force over all 41^3 nodes.
    v, f = load_mesh(tmp_path / "out" / oid / fmt.MESH_FILE)
    dense = MeshDistance(v, f).signed_distance(grid.node_points(40, dtype=np.float64))
    keys = (coords[:, 0].astype(np.int64) * 41 + coords[:, 1]) * 41 + coords[:, 2]
    assert np.array_equal(keys, np.flatnonzero(np.abs(dense) <= np.sqrt(3.0) * grid.spacing(40)))
    assert np.abs(dense[keys] - sdf).max() < 1e-6
    with pytest.raises(ValueError, match="sparse_res"):
        pp.PreprocessConfig(sparse_res=1)


def test_cli_sparse_res_flag(tmp_path):
    from shapeflow.commands import preprocess as cmd

    src = write_good(tmp_path / "in")[1]
    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    base = ["preprocess", str(src), str(tmp_path / "out"), "--workers", "0", "--resolution", "32",
            "--surface-points", "300", "--sharp-points", "50", "--sdf-points", "500", "--no-progress"]
    assert parser.parse_args(base).sparse_res is None  # off unless asked for
    args = parser.parse_args(base + ["--sparse-res", "24"])
    assert args.func(args) == 0
    (rec,) = pp.read_manifest(tmp_path / "out")
    assert rec["status"] == "ok" and rec["stats"]["sparse_nodes"] > 0
    a = fmt.read_sample_file(tmp_path / "out" / rec["id"] / fmt.SAMPLES_FILE, ["sparse_res", "sparse_coords"])
    assert int(a["sparse_res"]) == 24 and a["sparse_coords"].max() <= 24
    assert json.loads((tmp_path / "out" / pp.CONFIG_FILE).read_text())["sparse_res"] == 24


def test_sample_file_validates_the_sparse_band():
    rng = np.random.default_rng(0)
    arrays = {
        "surface_points": rng.random((4, 3), dtype=np.float32),
        "surface_normals": rng.random((4, 3), dtype=np.float32),
        "surface_sharp": np.zeros(4, bool),
        "sdf_points": rng.random((3, 3), dtype=np.float32),
        "sdf_values": rng.random(3, dtype=np.float32),
        "sdf_group": np.zeros(3, np.uint8),
        "occ64": np.zeros((64, 64, 64), bool),
    }
    h = 2.0 / 8
    band = {"sparse_coords": np.array([[0, 1, 2], [0, 2, 0], [8, 8, 8]], np.int16),
            "sparse_sdf": np.array([0.1, -0.2, 0.0], np.float32), "sparse_res": np.asarray(8, np.int32)}
    fmt.validate({**arrays, **band})
    bad = [
        ({"sparse_res": np.asarray(7, np.int32)}, "0 .. 7"),  # index 8 outside the grid
        ({"sparse_coords": band["sparse_coords"][[1, 0, 2]]}, "sorted"),
        ({"sparse_coords": band["sparse_coords"][[0, 0, 2]]}, "duplicates"),
        ({"sparse_sdf": np.array([0.1, -0.2, 1.8 * h], np.float32)}, "sqrt"),
        ({"sparse_coords": band["sparse_coords"].astype(np.int32)}, "sparse_coords"),
        ({"sparse_sdf": band["sparse_sdf"][:2]}, "Nb"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            fmt.validate({**arrays, **band, **change})
    with pytest.raises(ValueError, match="together"):
        fmt.validate({**arrays, "sparse_coords": band["sparse_coords"], "sparse_sdf": band["sparse_sdf"]})
