"""Smoke tests of ``benchmarks/``: every script starts, imports only names the library has, and the modes
that take seconds on a CPU run end to end with the shipped tiny models or a few preprocessed shapes.

The benchmark scripts are not part of the library, so nothing else notices when an API change breaks them:

* ``--help`` of every ``bench_*.py`` (a subprocess, as a user runs it) catches module-level import errors;
* every ``from shapeflow... import NAME`` in a script, module level or inside a function (several scripts
  import lazily, which ``--help`` never reaches), must resolve;
* the cheap runs exercise the calls into the library (config fields, loaders, evaluation helpers) with
  tiny settings and check the report each prints.

The whole module takes well over 15 s (each subprocess imports torch), so it is marked ``slow``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))
TINY = REPO / "src" / "shapeflow" / "assets" / "tiny"
PAIR = f"tiny={TINY / 'token_dit'},{TINY / 'vecset_vae'}"

pytestmark = pytest.mark.slow


def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script> args`` as a user does (one thread); fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} {' '.join(map(str, args))} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def test_there_are_scripts():
    assert len(SCRIPTS) >= 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script: Path):
    r = run(script.name, "--help")
    assert r.stdout.startswith("usage:"), r.stdout


def _shapeflow_imports(script: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name or None)`` of every shapeflow import in ``script``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"), filename=str(script))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "shapeflow":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "shapeflow"]
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shapeflow_imports_resolve(script: Path):
    missing = []
    for line, module, name in _shapeflow_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: import {module}: {e}")
            continue
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------------------------------------
# Cheap runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A preprocessed folder of small balls and boxes with at least 8 training objects and one held-out one
    (the scripts use ``val_fraction`` 0.1; the split hashes each file's contents, so shapes are added until
    both splits are filled)."""
    from shapeflow.data import preprocess as pp
    from shapeflow.data.datasets import ObjectFolder, is_val

    root = tmp_path_factory.mktemp("bench")
    split = {True: 0, False: 0}
    for k in range(40):
        if split[False] >= 8 and split[True] >= 1:
            break
        cls = ("ball", "cube")[k % 2]
        size = 0.4 + 0.05 * k
        m = (trimesh.creation.icosphere(2, radius=size) if cls == "ball"
             else trimesh.creation.box(extents=(size, 1, 2 - size)))
        p = root / "in" / cls / f"{cls}_{k:04d}.obj"
        p.parent.mkdir(parents=True, exist_ok=True)
        m.export(p)
        split[is_val(pp.object_id(p), 0.1)] += 1
    cfg = pp.PreprocessConfig(resolution=32, surface_points=2000, sharp_points=500, sdf_points=3000, tsdf_res=8)
    s = pp.preprocess_dataset(root / "in", root / "out", cfg, workers=0, progress=False)
    assert s.ok == sum(split.values())
    assert len(ObjectFolder(root / "out", split="train", val_fraction=0.1)) >= 8
    assert len(ObjectFolder(root / "out", split="val", val_fraction=0.1)) >= 1
    return root / "out"


def test_sampler_analytic():
    r = run("bench_sampler.py", "--num", 64, "--ref-steps", 64, "--nfe", 4, 8, "--shift", 1)
    assert "| shift | NFE |" in r.stdout
    assert "shift 1 NFE 8: euler/heun error ratio" in r.stdout


def test_sampler_with_the_shipped_dit():
    r = run("bench_sampler.py", "--dit", TINY / "token_dit", "--num", 4, "--ref-steps", 8, "--nfe", 4,
            "--shift", 1)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 1 | 4 |")]
    assert len(rows) == 1 and rows[0].count("e") >= 3, r.stdout  # euler, heun and midpoint cells


def test_generation_sampler_with_the_shipped_pair():
    r = run("bench_generation.py", "sampler", "--gen", PAIR, "--samples", 1, "--steps-list", 2, 4,
            "--resolution", 32)
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| euler |", "| heun |", "| midpoint |"))]
    assert len(rows) == 4, r.stdout  # euler 2 and 4 steps, heun and midpoint 2 steps
    assert "nan" not in "".join(rows), r.stdout


def test_generation_speed_with_the_shipped_pair():
    r = run("bench_generation.py", "speed", "--gen", PAIR, "--steps", 2, "--repeats", 1)
    assert "tiny: one shape, 2 euler steps, decoded at 128^3: median" in r.stdout, r.stdout


def test_generation_speed_of_the_shipped_sparse_pipeline():
    r = run("bench_generation.py", "speed", "--gen", "sparse", "--steps", 2, "--repeats", 1)
    assert "sparse: one shape, 2 euler steps, decoded at 256^3 (the sparse band of the latent grid): median" \
        in r.stdout, r.stdout
    assert "structure" in r.stdout and "decode" in r.stdout, r.stdout


def test_optimizer():
    r = run("bench_optimizer.py", "--repeats", 1)
    assert "| tiny VecSet VAE |" in r.stdout and "| tiny token DiT (class-conditional) |" in r.stdout, r.stdout


def test_watertight_quality_writes_its_own_report(tmp_path):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    trimesh.creation.icosphere(2, radius=0.7).export(meshes / "ball.obj")
    out = tmp_path / "log" / "watertight.md"
    out.parent.mkdir()
    out.write_text("an older report\n")
    r = run("bench_watertight_quality.py", "--meshes", meshes, "--resolution", 32, "--points", 2000,
            "--write", out)
    text = out.read_text()
    assert "older" not in text  # replaced, not appended to
    assert text.startswith("## Watertight quality") and "| ball.obj |" in text and "| **mean** |" in text
    assert text in r.stdout  # the file holds the printed report


def test_vae_quality_on_preprocessed_shapes(prepared, tmp_path):
    r = run("bench_vae_quality.py", "--vae", f"tiny={TINY / 'vecset_vae'}", "--real", prepared, "--limit", 2,
            "--resolution", 32, "--points", 2000, "--picture", 1, "--out", tmp_path)
    assert "| tiny | vecset_vae | 2048 |" in r.stdout, r.stdout  # 128 tokens x 16 channels
    assert (tmp_path / "quality.md").is_file() and (tmp_path / "recon_shared.png").is_file()


def test_vecset_tiny_step(prepared):
    r = run("bench_vecset.py", "--part", "tiny-step", "--data", prepared, "--repeats", 1, "--threads", 1)
    assert '"median_s": {"plain":' in r.stdout, r.stdout


def test_vecset_short_runs(prepared):
    r = run("bench_vecset_short_runs.py", prepared, "--name", "smoke", "--steps", 2, "--eval-every", 2,
            "--queries", 256, "--diagnose")
    assert "smoke step 2 " in r.stdout and "iou_uniform" in r.stdout, r.stdout
    assert '"iou_own"' in r.stdout, r.stdout


def test_gpu_sparse_check_runs_its_code_on_the_cpu(tmp_path):
    r = run("bench_gpu_sparse.py", "--device", "cpu", "--smoke", "--out", tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) >= {"conv", "train", "decode", "total_s"}
    assert max(report["conv"]["max_err_out_dx_dw_fp64"]) == 0.0  # the same device: the same numbers
    assert report["train"]["finite"] and report["decode"]["band_voxels"] > 0, r.stdout


def test_sparse_conv_speed_table():
    r = run("bench_sparse_conv.py", "--cases", "32:8", "--repeats", 1, "--threads", 1)
    assert "| 32" in r.stdout and "im2col" in r.stdout, r.stdout


def test_sparse_vae_band_and_codec_table(tmp_path):
    mesh = tmp_path / "sphere.ply"
    trimesh.creation.icosphere(subdivisions=3).export(mesh)
    r = run("bench_sparse_vae.py", "--mesh", mesh, "--res", 32, "--threads", 1)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 32^3")]
    assert len(rows) == 2, r.stdout  # one band row, one encode/decode row with the shipped tiny VAE
    assert "| one closed piece |" in rows[1], r.stdout  # a sphere comes back as one closed piece


def test_hunyuan_dit_sizes_and_speed_smoke(tmp_path):
    r = run("bench_hunyuan_dit.py", "params")
    assert "hunyuan21      3.051 B" in r.stdout and "hunyuan2mini   0.559 B" in r.stdout, r.stdout
    run("bench_hunyuan_dit.py", "speed", "--models", "tiny", "--dtypes", "fp32", "bf16", "--steps", 2,
        "--out", tmp_path / "speed.json")
    rows = json.loads((tmp_path / "speed.json").read_text())
    assert [(r["model"], r["dtype"], len(r["s_per_step"]), r["finite"]) for r in rows] == \
        [("tiny", "fp32", 2, True), ("tiny", "bf16", 2, True)]
