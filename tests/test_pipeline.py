"""The integration layer end to end on a tiny dataset: train every task, encode latents, generate,
reconstruct, evaluate, the demo, and the one-line user errors of those commands.

Everything runs through :func:`shapeflow.cli.main` in-process (a subprocess only where a separate process
is the point: the offline image-conditioned run). One session fixture synthesises 2 classes x 3 shapes and
preprocesses them at 32^3 (TSDF at 16 cells); each tiny model is trained once (fixtures below) and shared.
The VecSet VAE gets 150 steps so that it decodes a surface (an untrained one decodes none); the other
models only need to run.
"""

from __future__ import annotations

import dataclasses
import json
import time
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import MESHES

from shapeflow import cli

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("chair", "mug")
N_OBJECTS = 2 * 3
VAL_FRACTION = 0.3  # 1 of the 6 objects (by id hash) is held out: validation runs, 5 train


def sf(*args) -> int:
    """``shapeflow ARGS`` in this process; returns the exit code."""
    return cli.main([str(a) for a in args])


def error_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"shapeflow {command}: error:")]


def assert_one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err, command)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def mesh_paths(n: int = 1) -> list[Path]:
    """Small real meshes of ../shared/meshes (skip when the folder is absent)."""
    if not MESHES.is_dir():
        pytest.skip(f"real test meshes not found at {MESHES} (set SHAPEFLOW_TEST_MESHES)")
    picks = [MESHES / name for name in ("fandisk.obj", "suzanne.obj", "featuretype.stl")][:n]
    missing = [p for p in picks if not p.is_file()]
    if missing:
        pytest.skip(f"missing test meshes: {missing}")
    return picks


# =================================================================================================
# session fixtures: data, tiny models, latents
# =================================================================================================


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    """``synth`` (2 classes x 3 shapes), ``preprocess`` at 32^3 with a 16-cell TSDF: ``root/{synth,prep}``."""
    root = tmp_path_factory.mktemp("pipeline")
    assert sf("synth", root / "synth", "--per-class", 3, "--classes", *CLASSES, "--resolution", 32) == 0
    assert sf("preprocess", root / "synth", root / "prep", "--resolution", 32, "--surface-points", 1024,
              "--sharp-points", 256, "--sdf-points", 4096, "--tsdf-res", 16, "--workers", 0,
              "--no-progress") == 0
    recs = [json.loads(x) for x in (root / "prep" / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "ok" for r in recs) == N_OBJECTS
    return root


ENGINE = ("train: {{steps: {steps}, batch_size: {batch}, warmup_steps: 5, lr: {lr}, min_lr: 1.0e-5, "
          "log_every: {log}, val_every: 0, ckpt_every: 0, num_workers: 0, ema_decay: 0.9}}\n")

VECSET_YAML = """task: vecset_vae
model: {preset: tiny, num_tokens: 16, latent_channels: 4, width: 32, heads: 2, encoder_layers: 1,
        decoder_layers: 1, num_freqs: 4, surface_points: 256, sharp_points: 64}
data: {root: ROOT/prep, n_queries: 256, val_fraction: 0.3, val_mesh_resolution: 16, val_mesh_points: 500}
objective: {kind: sdf, truncation: 0.05}
""" + ENGINE.format(steps=150, batch=4, lr=3.0e-3, log=25)

GRID_OCC_YAML = """task: grid_vae
model: {preset: tiny, resolution: 64, channels: [4, 8, 8], stem: 2, latent_channels: 2, num_res_blocks: 0,
        num_res_blocks_middle: 1}
data: {root: ROOT/prep, val_fraction: 0.3}
""" + ENGINE.format(steps=6, batch=2, lr=1.0e-3, log=3)

# TSDF of `preprocess --tsdf-res 16`: 17^3 nodes, truncated at 2 voxels = 0.25 canonical units
GRID_SDF_YAML = """task: grid_vae
model: {preset: sdf_tiny, resolution: 16, channels: [4, 8], stem: 2, latent_channels: 2, num_res_blocks: 0,
        num_res_blocks_middle: 1, sdf_truncation: 0.25}
data: {root: ROOT/prep, val_fraction: 0.3}
""" + ENGINE.format(steps=6, batch=2, lr=1.0e-3, log=3)

TOKEN_DIT_YAML = """task: token_dit
model: {preset: tiny, in_channels: 4, width: 32, depth: 1, heads: 2, cond: class, classes: [chair, mug],
        num_tokens: 16}
data: {root: ROOT/latents_vecset, val_fraction: 0.3}
""" + ENGINE.format(steps=60, batch=4, lr=3.0e-3, log=20)

GRID_DIT_YAML = """task: grid_dit
model: {preset: tiny, in_channels: 2, resolution: 8, patch_size: 2, width: 32, depth: 1, heads: 2}
data: {root: ROOT/latents_grid_occ, val_fraction: 0.3}
""" + ENGINE.format(steps=6, batch=2, lr=1.0e-3, log=3)


def train(root: Path, name: str, yaml_text: str, *overrides: str) -> Path:
    """``shapeflow train ROOT/name.yaml OVERRIDES --out ROOT/runs/name``; returns the run directory."""
    cfg = root / f"{name}.yaml"
    cfg.write_text(yaml_text.replace("ROOT", str(root)))
    out = root / "runs" / name
    assert sf("train", cfg, *overrides, "--out", out) == 0
    return out


def encode(root: Path, vae: Path, name: str, *extra) -> Path:
    out = root / name
    assert sf("encode-latents", root / "prep", out, "--vae", vae, "--no-progress", *extra) == 0
    return out


@pytest.fixture(scope="session")
def vecset_run(root) -> Path:
    return train(root, "vecset", VECSET_YAML)


@pytest.fixture(scope="session")
def grid_occ_run(root) -> Path:
    return train(root, "grid_occ", GRID_OCC_YAML)


@pytest.fixture(scope="session")
def grid_sdf_run(root) -> Path:
    return train(root, "grid_sdf", GRID_SDF_YAML)


@pytest.fixture(scope="session")
def vecset_latents(root, vecset_run) -> Path:
    return encode(root, vecset_run, "latents_vecset")


@pytest.fixture(scope="session")
def grid_occ_latents(root, grid_occ_run) -> Path:
    return encode(root, grid_occ_run, "latents_grid_occ")


@pytest.fixture(scope="session")
def grid_sdf_latents(root, grid_sdf_run) -> Path:
    return encode(root, grid_sdf_run, "latents_grid_sdf")


@pytest.fixture(scope="session")
def token_dit_run(root, vecset_latents) -> Path:
    return train(root, "token_dit", TOKEN_DIT_YAML)


@pytest.fixture(scope="session")
def grid_dit_run(root, grid_occ_latents) -> Path:
    return train(root, "grid_dit", GRID_DIT_YAML)


def train_losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def val_records(run: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == "val"]


def npy_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npy"))}


# =================================================================================================
# training: every task through `shapeflow train`, checkpoints load with the right kind
# =================================================================================================


def test_train_vae_tasks_export_loadable_checkpoints(vecset_run, grid_occ_run, grid_sdf_run):
    from safetensors.torch import load_file

    from shapeflow.models import load_dit, load_vae, model_kind
    from shapeflow.models.grid_vae import GridVAE
    from shapeflow.models.vecset_vae import VecSetVAE

    for run, cls, want in ((vecset_run, VecSetVAE, "vecset_vae"), (grid_occ_run, GridVAE, "grid_vae"),
                           (grid_sdf_run, GridVAE, "grid_vae")):
        final = run / "final"
        assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
        assert model_kind(final) == model_kind(run) == want
        assert json.loads((final / "config.json").read_text())["kind"] == want
        model, kind = load_vae(run)  # a run directory stands for its final/ export
        assert isinstance(model, cls) and kind == want and not model.training
        exported = load_file(str(final / "model.safetensors"))
        state = model.state_dict()
        assert exported.keys() == state.keys()
        assert all(torch.equal(exported[k], state[k]) for k in state)
        losses = train_losses(run)
        assert losses and all(np.isfinite(losses))
        val = val_records(run)
        assert val and all(np.isfinite(v) for k, v in val[-1].items() if k.startswith("val/"))
        with pytest.raises(ValueError, match=f"is a {want} checkpoint, not a DiT"):
            load_dit(run)

    vecset, _ = load_vae(vecset_run)
    c = vecset.config
    assert (c.width, c.num_tokens, c.latent_channels, c.surface_points, c.sharp_points) == (32, 16, 4, 256, 64)
    losses = train_losses(vecset_run)
    assert len(losses) == 150 // 25 and losses[-1] < 0.9 * losses[0]  # it learned something
    assert val_records(vecset_run)[-1]["val_ema/empty_mesh"] == 0.0  # and decodes a surface
    occ, _ = load_vae(grid_occ_run)
    sdf, _ = load_vae(grid_sdf_run)
    assert occ.config.input == "occupancy" and occ.config.latent_shape == (2, 8, 8, 8)
    assert sdf.config.input == "sdf" and sdf.config.resolution == 16 and sdf.config.latent_shape == (2, 5, 5, 5)
    assert {"val/iou", "val_ema/iou"} <= set(val_records(grid_sdf_run)[-1])


def test_train_dit_tasks_export_loadable_checkpoints(token_dit_run, grid_dit_run, vecset_latents):
    from shapeflow.data.latents import LatentDataset
    from shapeflow.models import load_dit, load_vae, model_kind
    from shapeflow.models.dit import GridDiT, TokenDiT

    assert model_kind(token_dit_run) == "token_dit" and model_kind(grid_dit_run) == "grid_dit"
    token, kind = load_dit(token_dit_run)
    assert isinstance(token, TokenDiT) and kind == "token_dit" and not token.training
    assert token.config.cond == "class" and token.config.classes == CLASSES
    grid, kind = load_dit(grid_dit_run)
    assert isinstance(grid, GridDiT) and kind == "grid_dit" and grid.config.cond == "none"
    assert (grid.config.resolution, grid.config.patch_size, grid.config.in_channels) == (8, 2, 2)
    for run in (token_dit_run, grid_dit_run):
        assert all(np.isfinite(train_losses(run))) and val_records(run)
        with pytest.raises(ValueError, match="checkpoint, not a VAE"):
            load_vae(run)
    # the latent normaliser fitted on the training split is saved with the weights ("channel" mode)
    z = LatentDataset(vecset_latents, split="train", val_fraction=VAL_FRACTION, classes=list(CLASSES)).stack()
    assert z.shape == (5, 16, 4)
    torch.testing.assert_close(token.latent_mean, z.mean(dim=(0, 1)), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(token.latent_std, torch.ones(4))


# =================================================================================================
# encode-latents
# =================================================================================================


def test_encode_latents_layout_and_labels(vecset_latents, grid_occ_latents, grid_sdf_latents):
    from shapeflow.data.latents import LatentDataset, read_latent_manifest

    for folder, shape in ((vecset_latents, (16, 4)), (grid_occ_latents, (2, 8, 8, 8)),
                          (grid_sdf_latents, (2, 5, 5, 5))):
        info = json.loads((folder / "latents.json").read_text())
        assert tuple(info["latent_shape"]) == shape
        recs = read_latent_manifest(folder)
        assert len(recs) == N_OBJECTS and {r["class"] for r in recs} == set(CLASSES)
        for r in recs:
            z = np.load(folder / f"{r['id']}.npy")
            assert z.shape == shape and z.dtype == np.float32 and np.isfinite(z).all()
    info = json.loads((vecset_latents / "latents.json").read_text())
    assert (info["kind"], info["surface_points"], info["sharp_points"], info["num_tokens"]) == \
        ("vecset_vae", 256, 64, 16)
    assert info["latent_scale"] == 1.0
    ds = LatentDataset(vecset_latents, split="all", classes=["mug", "chair"])
    by_id = {r["id"]: r["class"] for r in read_latent_manifest(vecset_latents)}
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == ["mug", "chair"].index(by_id[item["id"]])


def test_encode_latents_resumes_without_rewriting(root, vecset_run, vecset_latents, capsys):
    from shapeflow.data.latents import encode_dataset

    before = npy_files(vecset_latents)
    mtimes = {p.name: p.stat().st_mtime_ns for p in vecset_latents.glob("*.npy")}
    manifest = (vecset_latents / "manifest.jsonl").read_bytes()
    capsys.readouterr()
    assert sf("encode-latents", root / "prep", vecset_latents, "--vae", vecset_run, "--no-progress") == 0
    assert "encoded 0, skipped 6, failed 0" in capsys.readouterr().out
    assert npy_files(vecset_latents) == before
    assert {p.name: p.stat().st_mtime_ns for p in vecset_latents.glob("*.npy")} == mtimes
    assert (vecset_latents / "manifest.jsonl").read_bytes() == manifest
    # a lost file is redone (and only it), bit for bit
    resumed = root / "latents_vecset_resume"
    shutil.copytree(vecset_latents, resumed)
    victim = sorted(resumed.glob("*.npy"))[2]
    victim.unlink()
    s = encode_dataset(vecset_run, root / "prep", resumed, progress=False)
    assert (s["encoded"], s["skipped"], s["failed"]) == (1, 5, 0)
    assert npy_files(resumed) == before


@pytest.mark.parametrize("which", ["vecset", "grid_occ"])
def test_encode_latents_shards_match_single_run(root, which, request):
    run = request.getfixturevalue(f"{which}_run")
    full = request.getfixturevalue(f"{which}_latents")
    sharded = root / f"latents_{which}_sharded"
    encode(root, run, sharded.name, "--shard", "1/2", "--batch-size", 2)
    assert len(list(sharded.glob("*.npy"))) == N_OBJECTS // 2
    encode(root, run, sharded.name, "--shard", "0/2", "--batch-size", 3)
    a, b = npy_files(full), npy_files(sharded)
    assert a.keys() == b.keys() and len(a) == N_OBJECTS
    for name in a:
        za, zb = np.load(full / name), np.load(sharded / name)
        if which == "vecset":  # one sample per encoder call: independent of batch and shard exactly
            assert np.array_equal(za, zb), name
        else:  # batched convolutions: equal up to float summation order
            np.testing.assert_allclose(za, zb, atol=1e-5, rtol=1e-5, err_msg=name)


def test_encode_latents_refuses_other_vae_or_settings(root, vecset_latents, grid_occ_run, vecset_run, capsys):
    before = npy_files(vecset_latents)
    capsys.readouterr()
    assert sf("encode-latents", root / "prep", vecset_latents, "--vae", grid_occ_run, "--no-progress") == 2
    assert_one_line_error(capsys, "encode-latents", str(vecset_latents), "different settings")
    assert sf("encode-latents", root / "prep", vecset_latents, "--vae", vecset_run, "--surface-points", 128,
              "--no-progress") == 2
    assert_one_line_error(capsys, "encode-latents", "different settings")
    assert npy_files(vecset_latents) == before


def test_encoded_latents_are_posterior_means(root, vecset_run, vecset_latents, grid_sdf_run,
                                             grid_sdf_latents):
    from shapeflow.data.datasets import GridDataset
    from shapeflow.data.latents import read_latent_manifest, seed_of, vecset_surface
    from shapeflow.models import load_vae

    # VecSet: surface subsample seeded by (seed 0, id), FPS generator seeded by (seed 1, id), posterior mean
    vae, _ = load_vae(vecset_run)
    oid = read_latent_manifest(vecset_latents)[3]["id"]
    x = torch.from_numpy(vecset_surface(root / "prep" / oid, 256, 64, seed_of(oid, 0)))[None]
    assert x.shape == (1, 320, 7)
    with torch.no_grad():
        post = vae.encode(x, num_tokens=16, generator=torch.Generator().manual_seed(seed_of(oid, 1)))
    stored = torch.from_numpy(np.load(vecset_latents / f"{oid}.npy"))
    assert torch.equal(stored, post.mode()[0])
    assert not torch.allclose(stored, post.sample(torch.Generator().manual_seed(0))[0])
    # grid: the dense TSDF (world units) through the encoder, posterior mean
    vae, _ = load_vae(grid_sdf_run)
    ds = GridDataset(root / "prep", source="tsdf", normalize_tsdf=False, split="all")
    i = 1
    with torch.no_grad():
        z = vae.encode(ds[i]["grid"][None].float()).mode()[0]
    np.testing.assert_allclose(np.load(grid_sdf_latents / f"{ds.records[i]['id']}.npy"), z.numpy(),
                               atol=1e-6, rtol=1e-5)


# =================================================================================================
# generate
# =================================================================================================


def _load_pair(dit_run, vae_run):
    from shapeflow.models import load_dit, load_vae

    dit, dit_kind = load_dit(dit_run)
    vae, vae_kind = load_vae(vae_run)
    return dict(dit=dit, vae=vae, dit_kind=dit_kind, vae_kind=vae_kind)


def test_generate_latents_deterministic_per_sample_seed(token_dit_run, vecset_run, grid_dit_run,
                                                        grid_occ_run):
    from shapeflow.generate import generate

    pair = _load_pair(token_dit_run, vecset_run)
    kw = dict(**pair, steps=3, decode=False)
    chair = torch.zeros(3, dtype=torch.long)
    a = generate(num=3, cond=chair, seed=5, **kw).latents
    b = generate(num=3, cond=chair, seed=5, **kw).latents
    c = generate(num=3, cond=chair, seed=6, **kw).latents
    assert a.shape == (3, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # sample k uses seed + k, whatever the batch
    torch.testing.assert_close(c[:2], a[1:], atol=1e-5, rtol=1e-5)
    single = generate(num=1, cond=chair[:1], seed=7, **kw).latents
    torch.testing.assert_close(single[0], a[2], atol=1e-5, rtol=1e-5)
    mug = generate(num=3, cond=torch.ones(3, dtype=torch.long), seed=5, **kw).latents
    assert not torch.allclose(a, mug, atol=1e-4)  # the class condition reaches the network
    # grid DiT + grid VAE: latents (c, r, r, r), decoded meshes in the working cube
    gpair = _load_pair(grid_dit_run, grid_occ_run)
    g = generate(num=2, seed=0, steps=2, **gpair)
    assert g.latents.shape == (2, 2, 8, 8, 8) and len(g.meshes) == 2
    for m in g.meshes:
        if m is not None:
            # cell-centred occupancy fields reach half a cell past the cube; capping adds at most one cell
            assert np.abs(m[0]).max() <= 1.0 + 2.0 * 2.0 / 64 + 1e-6
    with pytest.raises(ValueError, match="cannot be decoded"):
        generate(num=1, seed=0, steps=1, dit=gpair["dit"], vae=pair["vae"], dit_kind="grid_dit",
                 vae_kind="vecset_vae")


def test_generate_cli_same_seed_same_files(root, token_dit_run, vecset_run, capsys):
    from shapeflow.geometry.io import load_mesh

    outs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = root / "gen" / name
        rc = sf("generate", "--dit", token_dit_run, "--vae", vecset_run, "--class", "mug", "--num", 2,
                "--steps", 3, "--resolution", 24, "--seed", seed, "--out", out)
        meta = json.loads((out / "generate.json").read_text())
        assert rc == (0 if all(meta["files"]) else 1)
        assert (out / "preview.png").stat().st_size > 0
        # Heun (the default): 2 evaluations per step
        assert meta["labels"] == ["mug", "mug"] and meta["seed"] == seed and meta["nfe"] == 6
        assert meta["method"] == "heun"
        outs[name] = meta
    a, b, c = (root / "gen" / n for n in "abc")
    assert outs["a"]["files"] == outs["b"]["files"]
    written = [f for f in outs["a"]["files"] if f]
    for f in written:
        assert f.endswith(".glb")
        assert (a / f).read_bytes() == (b / f).read_bytes()
        v, faces = load_mesh(a / f)
        # marching cubes caps a surface that reaches the grid edge at most one cell (2 / 24) outside
        assert len(faces) > 0 and np.abs(v).max() <= 1.0 + 2.0 / 24 + 1e-6
    assert (a / "preview.png").read_bytes() == (b / "preview.png").read_bytes()
    different = [f for f in written
                 if f in outs["c"]["files"] and (c / f).read_bytes() != (a / f).read_bytes()]
    assert not written or different or outs["c"]["files"] != outs["a"]["files"]


def test_generate_cli_class_choice(root, token_dit_run, vecset_run, capsys):
    out = root / "gen" / "all"
    capsys.readouterr()
    rc = sf("generate", "--dit", token_dit_run, "--vae", vecset_run, "--class", "all", "--num", 2,
            "--steps", 2, "--resolution", 16, "--out", out)
    meta = json.loads((out / "generate.json").read_text())
    assert meta["labels"] == ["chair", "chair", "mug", "mug"] and len(meta["files"]) == 4
    assert rc == (0 if all(meta["files"]) else 1)
    assert "/4 shapes" in capsys.readouterr().out
    assert sf("generate", "--dit", token_dit_run, "--vae", vecset_run, "--class", "sofa", "--out",
              root / "gen" / "sofa") == 2
    assert_one_line_error(capsys, "generate", "unknown class 'sofa'", "chair, mug")
    assert not (root / "gen" / "sofa").exists()
    assert sf("generate", "--dit", token_dit_run, "--vae", vecset_run, "--out", root / "gen" / "none") == 2
    assert_one_line_error(capsys, "generate", "--class", "chair, mug")
    for flag, value, message in (("--num-tokens", 0, "--num-tokens must be >= 1"),
                                 ("--smooth", -0.1, "smooth must be >= 0")):
        assert sf("generate", "--dit", token_dit_run, "--vae", vecset_run, "--class", "mug", "--steps", 1,
                  flag, value, "--out", root / "gen" / "bad") == 2
        assert_one_line_error(capsys, "generate", message)
    assert not (root / "gen" / "bad").exists()


def test_generate_cli_uses_the_shipped_checkpoints(tmp_path):
    """Without --dit/--vae, generate loads the tiny checkpoints shipped in the package and writes meshes."""
    from shapeflow.generate import DEFAULT_DIT, DEFAULT_VAE
    from shapeflow.geometry.io import load_mesh
    from shapeflow.geometry.synth import CATEGORIES
    from shapeflow.models import load_dit

    assert (DEFAULT_DIT / "model.safetensors").is_file() and (DEFAULT_VAE / "model.safetensors").is_file()
    assert list(load_dit(DEFAULT_DIT)[0].config.classes) == list(CATEGORIES)
    out = tmp_path / "shipped"
    assert sf("generate", "--class", "table", "--num", 1, "--steps", 4, "--resolution", 32, "--out", out) == 0
    meta = json.loads((out / "generate.json").read_text())
    assert meta["labels"] == ["table"] and meta["files"][0].endswith(".glb")
    v, f = load_mesh(out / meta["files"][0])
    assert len(f) > 100 and np.abs(v).max() <= 1.0 + 2.0 / 32 + 1e-6


@pytest.mark.slow
def test_generate_cli_image_conditioned_offline(root, vecset_run, tmp_path):
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    from shapeflow.models.dit import TokenDiT, TokenDiTConfig

    torch.manual_seed(0)
    encoder = tmp_path / "dinov2_tiny"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(encoder)
    dit_dir = tmp_path / "image_dit"
    dit = TokenDiT(TokenDiTConfig(in_channels=4, width=32, depth=1, heads=2, cond="image", cond_dim=32))
    with torch.no_grad():  # DiT init zeroes the output layers (velocity 0 whatever the image): perturb all
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    dit.save_pretrained(dit_dir)
    img = np.zeros((64, 48, 4), np.uint8)
    img[10:50, 12:36] = (200, 60, 30, 255)
    Image.fromarray(img, "RGBA").save(tmp_path / "img.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache: only the local folder can be read
    cmd = [sys.executable, "-m", "shapeflow", "generate", "--dit", str(dit_dir), "--vae", str(vecset_run),
           "--image", str(tmp_path / "img.png"), "--image-encoder", str(encoder), "--num", 2, "--steps", 2,
           "--resolution", 16, "--out", str(tmp_path / "out")]
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    meta_path = tmp_path / "out" / "generate.json"
    assert meta_path.is_file(), p.stderr[-3000:]
    meta = json.loads(meta_path.read_text())
    assert p.returncode == (0 if all(meta["files"]) else 1), p.stderr[-3000:]
    assert len(meta["files"]) == 2 and (tmp_path / "out" / "preview.png").is_file()
    # the image decides the tokens, so a different image gives different shapes
    from shapeflow.generate import generate, image_tokens

    pair = _load_pair(dit_dir, vecset_run)
    img2 = img.copy()
    img2[10:50, 12:36] = (30, 200, 90, 255)
    img2[20:30, 12:20, 3] = 0
    Image.fromarray(img2, "RGBA").save(tmp_path / "img2.png")
    t1 = image_tokens(tmp_path / "img.png", encoder=str(encoder), num=2)
    t2 = image_tokens(tmp_path / "img2.png", encoder=str(encoder), num=2)
    assert t1.shape == (2, 37 * 37, 32) and not torch.allclose(t1, t2)
    z1 = generate(num=2, cond=t1, steps=2, decode=False, **pair).latents
    z1b = generate(num=2, cond=t1, steps=2, decode=False, **pair).latents
    z2 = generate(num=2, cond=t2, steps=2, decode=False, **pair).latents
    assert torch.equal(z1, z1b) and not torch.allclose(z1, z2)


# =================================================================================================
# reconstruct / eval-vae
# =================================================================================================


def _bbox(v: np.ndarray) -> np.ndarray:
    return np.stack([v.min(0), v.max(0)])


def _check_source_frame(out_mesh: Path, src_mesh: Path) -> None:
    """The reconstruction is in the input's frame: its box overlaps the input's and has a similar size."""
    from shapeflow.geometry.io import load_mesh

    v_out, f_out = load_mesh(out_mesh)
    v_in, _ = load_mesh(src_mesh)
    a, b = _bbox(v_out), _bbox(v_in)
    assert len(f_out) > 0
    assert np.all(a[0] < b[1]) and np.all(b[0] < a[1]), (a, b)  # boxes overlap on every axis
    size_ratio = np.ptp(a, axis=0).max() / np.ptp(b, axis=0).max()
    assert 0.3 < size_ratio < 3.0, size_ratio


def _moved_synth_mesh(root: Path, folder: Path) -> Path:
    """A synthetic chair scaled by 20 and moved to (100, -50, 30): far from the canonical cube."""
    from shapeflow.geometry.io import load_mesh, save_mesh

    v, f = load_mesh(root / "synth" / "chair" / "chair_0001.obj")
    path = folder / "moved_chair.obj"
    save_mesh(path, v * 20.0 + np.array([100.0, -50.0, 30.0]), f)
    return path


RECON_KEYS = {"source", "id", "iou", "chamfer_l1", "f_score@1%", "normal_consistency", "clean", "components",
              "preprocess_s", "encode_s", "decode_s"}


@pytest.mark.parametrize("which", ["vecset", "grid_sdf"])  # the occupancy family: in test_eval_vae (cheaper)
def test_reconstruct_writes_meshes_in_source_frame(root, which, request, tmp_path, capsys):
    run = request.getfixturevalue(f"{which}_run")
    inputs = [_moved_synth_mesh(root, tmp_path)]
    if which == "vecset" and MESHES.is_dir():  # a real mesh too (fandisk: far from the origin, scale ~5)
        inputs += mesh_paths(1)
    out = tmp_path / "recon"
    capsys.readouterr()
    rc = sf("reconstruct", *inputs, "--ckpt", run, "--out", out, "--prep-resolution", 48, "--resolution", 32,
            "--format", "obj")
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {p.stem for p in inputs}
    for p in inputs:
        m = metrics[p.stem]
        assert set(m) == RECON_KEYS and m["source"] == str(p)
        assert f"{p.stem}: IoU {m['iou']:.4f}" in printed
        assert 0.0 <= m["iou"] <= 1.0
        if (out / f"{p.stem}.obj").is_file():
            _check_source_frame(out / f"{p.stem}.obj", p)
            assert np.isfinite(m["chamfer_l1"]) and m["chamfer_l1"] < 0.5
    written = [p for p in inputs if (out / f"{p.stem}.obj").is_file()]
    assert rc == (0 if len(written) == len(inputs) else 1)
    if which == "vecset":  # the 150-step VAE decodes a surface; the others only have to run
        assert len(written) == len(inputs)


def test_reconstruct_model_family_mismatch_is_an_error(root, vecset_run, grid_sdf_run, tmp_path, capsys):
    mesh = root / "synth" / "mug" / "mug_0000.obj"
    capsys.readouterr()
    assert sf("reconstruct", mesh, "--ckpt", vecset_run, "--model", "grid", "--out", tmp_path / "a") == 2
    assert_one_line_error(capsys, "reconstruct", "vecset_vae", "not grid")
    assert sf("reconstruct", mesh, "--ckpt", grid_sdf_run, "--model", "vecset", "--out", tmp_path / "b") == 2
    assert_one_line_error(capsys, "reconstruct", "grid_vae", "not vecset")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_eval_vae_table_and_json(root, vecset_run, grid_occ_run, tmp_path, capsys):
    from shapeflow.data.datasets import ObjectFolder

    out = tmp_path / "eval"
    capsys.readouterr()
    assert sf("eval-vae", root / "prep", "--ckpt", vecset_run, "--split", "all", "--resolution", 24,
              "--points", 2000, "--out", out) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| object | IoU |") and rows[1].startswith("|---|")
    body = rows[2:]
    names = {Path(r["source"]).stem for r in ObjectFolder(root / "prep", split="all").records}
    assert len(body) == N_OBJECTS + 1 and body[-1].startswith(f"| **mean ({N_OBJECTS})**")
    assert {r.split("|")[1].strip() for r in body[:-1]} == names
    data = json.loads((out / "eval.json").read_text())
    assert data["summary"]["objects"] == N_OBJECTS and len(data["rows"]) == N_OBJECTS
    ious = [r["iou"] for r in data["rows"]]
    assert data["summary"]["iou"] == pytest.approx(float(np.nanmean(ious)))
    assert f"{data['summary']['iou']:.4f}" in body[-1]
    assert (out / "eval.md").read_text() == "\n".join(rows) + "\n"
    # the grid family and the split option: only held-out objects, no --out
    assert sf("eval-vae", root / "prep", "--ckpt", grid_occ_run, "--split", "val",
              "--val-fraction", VAL_FRACTION, "--points", 2000) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 1 + 1 and rows[-1].startswith("| **mean (1)**")


# =================================================================================================
# the sparse SDF VAE: preprocess --sparse-res, train, encode-latents, eval-vae, reconstruct
# =================================================================================================

SPARSE_YAML = """task: sparse_vae
model: {preset: tiny, resolution: 32, channels: [4, 8, 8, 16], blocks: [0, 1, 1, 1], latent_channels: 2}
data: {root: ROOT/prep_sparse, val_fraction: 0.3, crop: 24, val_meshes: 1, val_mesh_points: 500}
""" + ENGINE.format(steps=4, batch=2, lr=1.0e-3, log=2)


@pytest.fixture(scope="session")
def sparse_run(root) -> Path:
    assert sf("preprocess", root / "synth", root / "prep_sparse", "--keep-closed", "--resolution", 32,
              "--surface-points", 1024, "--sharp-points", 0, "--sdf-points", 4096, "--sparse-res", 32,
              "--workers", 0, "--no-progress") == 0
    return train(root, "sparse", SPARSE_YAML)


def test_sparse_vae_trains_encodes_evaluates_and_reconstructs(root, sparse_run, tmp_path, capsys):
    from shapeflow.data.latents import LatentDataset, read_sparse_latent
    from shapeflow.models import load_vae

    assert (sparse_run / "final").is_dir()
    vae, kind = load_vae(sparse_run / "final")
    assert kind == "sparse_vae"
    # encode-latents: coordinates + features per object, resumable like the others
    out = root / "latents_sparse"
    assert sf("encode-latents", root / "prep_sparse", out, "--vae", sparse_run / "final", "--no-progress") == 0
    info = json.loads((out / "latents.json").read_text())
    assert info["kind"] == "sparse_vae" and info["latent_shape"] == [-1, 2]
    ds = LatentDataset(out, split="all")
    assert len(ds) == N_OBJECTS
    coords, feats = read_sparse_latent(out / f"{ds.records[0]['id']}.npz")
    item = ds[0]
    assert torch.equal(item["coords"], coords) and torch.equal(item["latent"], feats)
    assert coords.shape[1] == 3 and feats.shape == (len(coords), 2) and int(coords.max()) <= 32 // 8
    assert sf("encode-latents", root / "prep_sparse", out, "--vae", sparse_run / "final", "--no-progress") == 0
    # eval-vae and reconstruct run on the family (an untrained VAE may decode nothing: rc 1, a message)
    capsys.readouterr()
    assert sf("eval-vae", root / "prep_sparse", "--ckpt", sparse_run / "final", "--split", "all",
              "--points", 500, "--out", tmp_path / "eval") == 0
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert data["summary"]["objects"] == N_OBJECTS
    mesh = root / "synth" / "mug" / "mug_0000.obj"
    rc = sf("reconstruct", mesh, "--model", "sparse", "--ckpt", sparse_run / "final", "--resolution", 32,
            "--prep-resolution", 32, "--points", 500, "--out", tmp_path / "recon", "--format", "obj")
    metrics = json.loads((tmp_path / "recon" / "metrics.json").read_text())
    assert set(metrics["mug_0000"]) == RECON_KEYS
    assert rc == (0 if (tmp_path / "recon" / "mug_0000.obj").is_file() else 1)
    # a resolution the latent grid cannot divide, and a checkpoint of another family: one-line errors
    capsys.readouterr()
    assert sf("reconstruct", mesh, "--model", "sparse", "--ckpt", sparse_run / "final", "--resolution", 36,
              "--out", tmp_path / "bad") == 2
    assert_one_line_error(capsys, "reconstruct", "--resolution 36", "multiple of 8")
    assert sf("reconstruct", mesh, "--model", "vecset", "--ckpt", sparse_run / "final", "--out", tmp_path / "c") == 2
    assert_one_line_error(capsys, "reconstruct", "sparse_vae", "not vecset")


STRUCTURE_DIT_YAML = """task: grid_dit
model: {preset: tiny, in_channels: 1, resolution: 16, patch_size: 4, width: 32, depth: 1, heads: 2, cond: class,
        classes: [chair, mug]}
data: {root: ROOT/latents_s128/structure, val_fraction: 0.3}
""" + ENGINE.format(steps=4, batch=2, lr=1.0e-3, log=2)

SPARSE_DIT_YAML = """task: sparse_dit
model: {preset: tiny, in_channels: 2, resolution: 16, patch_size: 2, width: 32, depth: 1, heads: 2, cond: class,
        classes: [chair, mug]}
data: {root: ROOT/latents_s128, val_fraction: 0.3}
""" + ENGINE.format(steps=4, batch=2, lr=1.0e-3, log=2)


def test_sparse_generation_trains_both_stages_and_generates(root, sparse_run, token_dit_run, vecset_run, tmp_path,
                                                           capsys):
    """encode-latents writes the structure grids next to the sparse latents; `shapeflow train` fits the
    stage-1 grid DiT and the stage-2 sparse DiT on them; `shapeflow generate` runs both stages and the
    sparse decoder, chosen by the checkpoint kinds; mismatched pipelines are one-line errors."""
    from shapeflow.data.latents import LatentDataset, read_sparse_latent
    from shapeflow.models import load_dit
    from shapeflow.models.sparse_dit import active_voxels

    # the R = 32 band of the fixture reaches the grid's last node plane: structure failed, latents kept
    coarse = root / "latents_sparse"  # resumable: encodes only what an earlier test has not
    assert sf("encode-latents", root / "prep_sparse", coarse, "--vae", sparse_run / "final", "--no-progress") == 0
    failed = [json.loads(x) for x in (coarse / "structure" / "manifest.jsonl").read_text().splitlines()]
    assert len(failed) == N_OBJECTS and len(LatentDataset(coarse, split="all")) == N_OBJECTS
    assert all(r["status"] == "failed" and "finer --sparse-res" in r["error"] for r in failed)
    # a 128-cell band (the same VAE runs at any multiple of its factor): 16^3 structure grids
    assert sf("preprocess", root / "synth", root / "prep_s128", "--keep-closed", "--resolution", 32,
              "--surface-points", 1024, "--sharp-points", 0, "--sdf-points", 1024, "--sparse-res", 128,
              "--workers", 0, "--no-progress") == 0
    out = root / "latents_s128"
    assert sf("encode-latents", root / "prep_s128", out, "--vae", sparse_run / "final", "--no-progress") == 0
    info = json.loads((out / "structure" / "latents.json").read_text())
    assert info["kind"] == "structure" and info["latent_shape"] == [1, 16, 16, 16]
    grids = LatentDataset(out / "structure", split="all")
    assert len(grids) == N_OBJECTS
    coords, _ = read_sparse_latent(out / f"{grids.records[0]['id']}.npz")
    assert torch.equal(active_voxels(grids.latent(0)), coords.long())  # +1 exactly at the latent voxels
    structure = train(root, "structure_dit", STRUCTURE_DIT_YAML)
    sparse = train(root, "sparse_dit", SPARSE_DIT_YAML)
    dit, kind = load_dit(sparse / "final")
    assert kind == "sparse_dit" and float(dit.latent_std.min()) != 1.0  # the voxel normaliser was fitted
    assert all(np.isfinite(train_losses(sparse)))
    gen = tmp_path / "gen"
    rc = sf("generate", "--dit", sparse / "final", "--structure", structure / "final", "--vae",
            sparse_run / "final", "--class", "all", "--num", 1, "--steps", 2, "--format", "obj", "--out", gen)
    report = json.loads((gen / "generate.json").read_text())
    assert report["structure"] == str(structure / "final") and report["labels"] == list(CLASSES)
    made = [f for f in report["files"] if f]
    assert rc == (0 if len(made) == 2 else 1) and len(made) + len(report["empty"]) == 2
    assert all((gen / f).is_file() for f in made) and (gen / "preview.png").is_file()
    # stage 1 by a VecSet generator (token DiT + its VAE): its decoded shapes' band cells
    vs = tmp_path / "vs"
    rc = sf("generate", "--dit", sparse / "final", "--structure", f"{token_dit_run / 'final'},{vecset_run / 'final'}",
            "--vae", sparse_run / "final", "--class", "mug", "--num", 1, "--steps", 2, "--format", "obj", "--out", vs)
    report = json.loads((vs / "generate.json").read_text())
    assert report["structure"].startswith(str(token_dit_run / "final"))
    assert rc == (0 if report["files"][0] else 1) and len(report["empty"]) == (0 if report["files"][0] else 1)
    # wrong combinations: one-line errors
    capsys.readouterr()
    assert sf("generate", "--dit", sparse / "final", "--vae", sparse_run / "final", "--class", "mug",
              "--out", tmp_path / "x") == 2
    assert_one_line_error(capsys, "generate", "--structure")
    assert sf("generate", "--dit", sparse / "final", "--structure", token_dit_run / "final", "--vae",
              sparse_run / "final", "--class", "mug", "--out", tmp_path / "x") == 2
    assert_one_line_error(capsys, "generate", "token_dit and its vecset_vae")
    assert sf("generate", "--dit", sparse / "final", "--structure", sparse / "final", "--vae", sparse_run / "final",
              "--class", "mug", "--out", tmp_path / "x") == 2
    assert_one_line_error(capsys, "generate", "structure")
    assert sf("generate", "--dit", sparse / "final", "--structure", structure / "final", "--vae",
              sparse_run / "final", "--class", "sofa", "--out", tmp_path / "x") == 2
    assert_one_line_error(capsys, "generate", "unknown class 'sofa'")
    assert sf("train", root / "structure_dit.yaml", "data.root=" + str(out), "--out", tmp_path / "wrong") == 2
    assert_one_line_error(capsys, "train", "sparse latents train a sparse_dit")


@pytest.mark.slow
def test_sparse_vae_trains_under_torchrun_ddp(root, sparse_run, tmp_path):
    """Two gloo ranks, each with its own number of voxels per batch: the engine's DDP path runs the family."""
    import socket

    from shapeflow.checkpoint import load_train_state
    from shapeflow.models import load_vae

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "shapeflow", "train", str(root / "sparse.yaml"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_train_state(out)["world_size"] == 2
    assert all(np.isfinite(train_losses(out))) and len(train_losses(out)) >= 2
    assert load_vae(out / "final")[1] == "sparse_vae"


def _spy_encoder(monkeypatch) -> list[tuple[int, int]]:
    """Record ``(input points, tokens)`` of every VecSet encode."""
    from shapeflow.models.vecset_vae import VecSetVAE

    seen = []
    encode = VecSetVAE.encode

    def spy(self, surface, **kwargs):
        posterior = encode(self, surface, **kwargs)
        seen.append((surface.shape[1], posterior.mean.shape[1]))
        return posterior

    monkeypatch.setattr(VecSetVAE, "encode", spy)
    return seen


def test_eval_vae_token_and_point_counts_reach_the_encoder(root, vecset_run, grid_occ_run, monkeypatch, capsys):
    seen = _spy_encoder(monkeypatch)
    assert sf("eval-vae", root / "prep", "--ckpt", vecset_run, "--split", "all", "--limit", 1, "--resolution", 16,
              "--points", 500, "--num-tokens", 12, "--surface-points", 300, "--sharp-points", 20) == 0
    assert seen == [(320, 12)]
    assert sf("eval-vae", root / "prep", "--ckpt", vecset_run, "--split", "all", "--limit", 1, "--resolution", 16,
              "--points", 500) == 0
    trained = json.loads((Path(vecset_run) / "config.json").read_text())["model"]  # the model's own counts
    assert seen[1] == (trained["surface_points"] + trained["sharp_points"], trained["num_tokens"])
    capsys.readouterr()
    assert sf("eval-vae", root / "prep", "--ckpt", grid_occ_run, "--split", "all", "--num-tokens", 12) == 2
    assert_one_line_error(capsys, "eval-vae", "num_tokens", "VecSet")
    # counts that cannot work are refused before any object is encoded, naming the checkpoint and the field
    for flags, needle in ((["--num-tokens", 0], "num_tokens must be >= 1"),
                          (["--surface-points", 0], "surface_points must be >= 1"),
                          (["--num-tokens", 100, "--surface-points", 90, "--sharp-points", 0], "exceeds the 90")):
        assert sf("eval-vae", root / "prep", "--ckpt", vecset_run, "--split", "all", *flags) == 2
        assert_one_line_error(capsys, "eval-vae", str(vecset_run), needle)
    assert len(seen) == 2


def test_reconstruct_token_count(vecset_run, grid_occ_run, monkeypatch, tmp_path, capsys):
    mesh = mesh_paths(1)[0]
    seen = _spy_encoder(monkeypatch)
    assert sf("reconstruct", mesh, "--ckpt", vecset_run, "--out", tmp_path / "rec", "--resolution", 16,
              "--prep-resolution", 32, "--points", 500, "--num-tokens", 20) == 0
    assert [m for _, m in seen] == [20]
    capsys.readouterr()
    assert sf("reconstruct", mesh, "--ckpt", grid_occ_run, "--out", tmp_path / "g", "--num-tokens", 12) == 2
    assert_one_line_error(capsys, "reconstruct", "num_tokens", "VecSet")
    assert sf("reconstruct", mesh, "--ckpt", vecset_run, "--out", tmp_path / "big", "--num-tokens", 10**6) == 2
    assert_one_line_error(capsys, "reconstruct", str(vecset_run), "exceeds")
    assert not (tmp_path / "g").exists() and not (tmp_path / "big").exists()


# =================================================================================================
# user errors
# =================================================================================================


def test_train_config_errors_are_one_line(root, tmp_path, capsys):
    bad_task = tmp_path / "bad_task.yaml"
    bad_task.write_text("task: nope\nmodel: {}\ndata: {}\n")
    capsys.readouterr()
    assert sf("train", bad_task, "--out", tmp_path / "a") == 2
    assert_one_line_error(capsys, "train", "unknown task 'nope'", "vecset_vae")
    cfg = tmp_path / "vecset.yaml"
    cfg.write_text(VECSET_YAML.replace("ROOT", str(root)))
    assert sf("train", cfg, "model.widht=8", "--out", tmp_path / "b") == 2
    assert_one_line_error(capsys, "train", "model.widht", "did you mean width")
    assert sf("train", cfg, "data.nope=1", "--out", tmp_path / "c") == 2
    assert_one_line_error(capsys, "train", "data.nope")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_encode_latents_on_a_non_preprocessed_folder(root, vecset_run, tmp_path, capsys):
    capsys.readouterr()
    for folder in (tmp_path, root / "synth"):
        assert sf("encode-latents", folder, tmp_path / "lat", "--vae", vecset_run) == 2
        assert_one_line_error(capsys, "encode-latents", str(folder))
    assert not (tmp_path / "lat").exists()


def test_generate_with_a_vae_as_dit_is_an_error(root, vecset_run, token_dit_run, capsys):
    capsys.readouterr()
    assert sf("generate", "--dit", vecset_run, "--vae", vecset_run, "--out", root / "gen" / "bad") == 2
    assert_one_line_error(capsys, "generate", str(vecset_run), "not a DiT")
    assert sf("generate", "--dit", token_dit_run, "--vae", token_dit_run, "--class", "mug",
              "--out", root / "gen" / "bad") == 2
    assert_one_line_error(capsys, "generate", "not a VAE")
    assert not (root / "gen" / "bad").exists()


# =================================================================================================
# the demo
# =================================================================================================


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path, capsys):
    from shapeflow.demo import NNA_DATA_STD, QUICK

    real = None
    if MESHES.is_dir():
        real = tmp_path / "real"
        real.mkdir()
        for p in mesh_paths(3)[1:]:  # suzanne (open, 968 faces) and featuretype (CAD, 3476 faces)
            shutil.copy(p, real / p.name)
    out = tmp_path / "demo"
    args = ["demo", out, "--quick", "--no-progress", "--workers", 1]
    args += ["--real-meshes", real] if real else []
    assert sf(*args) == 0
    assert "demo done" in capsys.readouterr().out
    for name in ("report.md", "report.json", "generated.png", "data_preview.png", "vae_eval.md"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    stages = ["synth", "preprocess", "preview_data", "vae", "latents", "dit", "generate", "evaluate"]
    if real:
        stages.insert(2, "preprocess_real")
        assert report["preprocess_real"]["ok"] + report["preprocess_real"]["failed"] == 2
    assert list(report["seconds"]) == stages + ["total"]
    assert report["seconds"]["total"] == pytest.approx(sum(report["seconds"][s] for s in stages))
    classes = list(QUICK.classes)
    assert report["classes"] == classes
    assert set(report["generation_metrics"]) == set(classes) | {"all"}
    for m in report["generation_metrics"].values():
        assert {"COV-CD", "MMD-CD", "1-NNA-CD"} <= set(m)
    assert len(report["generate"]["files"]) == len(classes) * QUICK.gen_per_class
    assert report["generate"]["method"] == QUICK.gen_method and report["generate"]["nfe"] == 2 * QUICK.gen_steps  # Heun
    # the quick run is seconds of training (quality is the full demo's business, see BENCHMARKS.md), fitted to
    # the budget (the recipe fits easily), and its schedule must fit the run: warm-up a tenth of the steps
    training = report["training"]
    for name, recipe in (("vae", QUICK.max_vae_steps), ("dit", QUICK.max_dit_steps)):
        assert training[name]["fitted"] and training[name]["steps"] == recipe and training[name]["step_s"] > 0
        assert not training[name]["too_slow"]
    assert training["repeat"] == f"--vae-steps {QUICK.max_vae_steps} --dit-steps {QUICK.max_dit_steps}"
    assert json.loads((out / "plan.json").read_text())["vae"]["steps"] == QUICK.max_vae_steps
    vae_cfg = json.loads((out / "runs" / "vae" / "final" / "config.json").read_text())
    assert vae_cfg["train"]["warmup_steps"] == QUICK.max_vae_steps // 10 and vae_cfg["train"]["steps"] == 30
    # the DiT trains on and samples num_tokens tokens per shape, fewer than the VAE's default
    dit_cfg = json.loads((out / "runs" / "dit" / "final" / "config.json").read_text())
    assert dit_cfg["model"]["num_tokens"] == QUICK.num_tokens < vae_cfg["model"]["num_tokens"]
    assert json.loads((out / "latents" / "latents.json").read_text())["latent_shape"][0] == QUICK.num_tokens
    assert {"iou", "chamfer_l1", "f_score@1%", "normal_consistency"} <= set(report["vae_metrics"])
    assert 0 <= report["generate"]["empty"] <= len(report["generate"]["files"])
    md = (out / "report.md").read_text()
    assert "## Training" in md and training["repeat"] in md
    for s in stages:
        assert f"| {s} |" in md
    for c in classes + ["all"]:
        assert f"| {c} |" in md
    assert f"about {NNA_DATA_STD[8]} points at 8 shapes per class" in md  # QUICK makes 2 per class: nearest size
    # resume: training and encoding are skipped, checkpoints untouched
    ckpts = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "runs").rglob("*.safetensors")}
    assert len(ckpts) >= 4
    t0 = time.perf_counter()
    assert sf(*args) == 0
    rerun = time.perf_counter() - t0
    again = json.loads((out / "report.json").read_text())
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "runs").rglob("*.safetensors")} == ckpts
    assert again["latents"]["encoded"] == 0 and again["latents"]["skipped"] == report["latents"]["encoded"]
    # the resumed stages report the first run's timings, and the re-run costs less than training did
    assert {"synth", "preprocess", "vae", "latents", "dit"} <= set(again["resumed_stages"])
    assert again["seconds"]["vae"] == report["seconds"]["vae"] and again["seconds"]["dit"] == report["seconds"]["dit"]
    assert rerun < report["seconds"]["total"]
    assert again["generate"]["files"] == report["generate"]["files"]


@pytest.mark.slow
def test_demo_quick_sparse_pipeline_end_to_end_and_resume(tmp_path, capsys):
    """`shapeflow demo --pipeline sparse`: the shipped sparse VAE encodes the demo's bands, the sparse DiT trains
    (fitted to the sparse budget), stage 1 is the shipped VecSet pair (or a structure grid DiT trained here),
    generation runs both stages, the report names them; resumes."""
    from shapeflow.demo import QUICK

    (tmp_path / "none").mkdir()
    common = ["--quick", "--pipeline", "sparse", "--per-class", 2, "--no-progress", "--workers", 1,
              "--real-meshes", tmp_path / "none"]
    out = tmp_path / "demo"
    assert sf("demo", out, *common) == 0
    assert "demo done" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stages = ["synth", "preprocess", "preprocess_real", "preview_data", "latents", "dit", "generate", "evaluate"]
    assert list(report["seconds"]) == stages + ["total"]
    training = report["training"]
    assert training["vae"]["steps"] == 0 and "shipped" in training["vae"]
    assert training["structure"]["steps"] == 0 and "token_dit" in training["structure"]["shipped"]
    assert training["dit"]["fitted"] and training["dit"]["steps"] == QUICK.max_sparse_dit_steps
    assert training["repeat"] == f"--pipeline sparse --dit-steps {QUICK.max_sparse_dit_steps}"
    assert json.loads((out / "runs" / "dit" / "final" / "config.json").read_text())["kind"] == "sparse_dit"
    assert (out / "latents" / "structure" / "latents.json").is_file()
    g = report["generate"]
    assert len(g["files"]) == 2 * len(QUICK.classes) and g["nfe"] == 2 * 2 * QUICK.gen_steps  # two Heun stages
    assert g["resolution"] == QUICK.sparse_res and "structure" in g["seconds"]
    md = (out / "report.md").read_text()
    assert "stage 1 (structure)" in md and "Sparse SDF VAE reconstruction" in md and training["repeat"] in md
    for c in list(QUICK.classes) + ["all"]:
        assert f"| {c} |" in md
    # resume: nothing retrained
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")}
    assert sf("demo", out, *common) == 0
    again = json.loads((out / "report.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.safetensors")} == ckpts
    assert {"dit", "latents"} <= set(again["resumed_stages"])
    # stage 1 trained here: a structure grid DiT on the latent folder's structure grids
    grid = tmp_path / "grid"
    assert sf("demo", grid, *common, "--sparse-structure", "grid") == 0
    report = json.loads((grid / "report.json").read_text())
    assert "structure" in report["seconds"] and report["training"]["structure"]["steps"] == QUICK.max_structure_steps
    assert json.loads((grid / "runs" / "structure" / "final" / "config.json").read_text())["kind"] == "grid_dit"
    assert "--sparse-structure grid --structure-steps" in report["training"]["repeat"]
    # one-line errors for options of the other pipeline
    capsys.readouterr()
    assert sf("demo", tmp_path / "x", "--quick", "--pipeline", "sparse", "--vae-steps", 3) == 2
    assert_one_line_error(capsys, "demo", "shipped sparse VAE")
    assert sf("demo", tmp_path / "x", "--quick", "--pipeline", "sparse", "--structure-steps", 3) == 2
    assert_one_line_error(capsys, "demo", "--sparse-structure grid")
    assert sf("demo", tmp_path / "x", "--quick", "--sparse-structure", "grid") == 2
    assert_one_line_error(capsys, "demo", "--pipeline sparse")


@dataclasses.dataclass(frozen=True)
class _Train:
    steps: int


@dataclasses.dataclass(frozen=True)
class _Exp:
    """Stands in for an ExperimentConfig in the plan test (only out_dir and train.steps are read)."""

    out_dir: str
    train: _Train


def test_demo_fits_the_training_steps_to_the_time_left(tmp_path, monkeypatch):
    """The plan: the recipe where it fits, fewer steps when the budget is short, the floor (flagged) below."""
    from shapeflow import demo
    from shapeflow.demo import DemoConfig, _Plan, fit_steps

    assert fit_steps(100.0, 0.5, 150, 0.25) == (150, False)  # 200 steps fit: the recipe's 150
    assert fit_steps(50.0, 0.5, 150, 0.25) == (100, False)
    assert fit_steps(10.0, 0.5, 150, 0.25) == (38, True)  # 20 fit, the floor is ceil(0.25 * 150)
    assert fit_steps(-5.0, 0.5, 150, 0.25) == (38, True)
    with pytest.raises(ValueError):
        fit_steps(10.0, 0.0, 150, 0.25)

    timed = []
    monkeypatch.setattr(demo, "measure_step_time", lambda exp, steps: timed.append(exp.train.steps) or 0.1)
    exp = _Exp(out_dir=str(tmp_path / "run"), train=_Train(steps=7))
    cfg = DemoConfig(budget_s=60.0, min_fraction=0.25, step_margin=1.0)
    plan = _Plan(tmp_path / "plan.json", cfg, time.perf_counter())
    assert plan.steps("vae", exp, None, 1000, lambda left, step_s: left - 20.0) in range(390, 401)  # ~40 s
    careful = _Plan(tmp_path / "careful.json", dataclasses.replace(cfg, step_margin=2.0, min_fraction=0.1),
                    time.perf_counter())
    assert careful.steps("vae", exp, None, 1000, lambda left, step_s: left - 20.0) in range(195, 201)
    timed.pop()
    assert timed == [1000]  # the recipe's schedule is what gets timed
    assert plan.steps("dit", exp, 123, 4000, lambda left, step_s: left) == 123  # given: no timing
    assert timed == [1000]
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["vae"]["fitted"] and not saved["dit"]["fitted"] and saved["dit"]["steps"] == 123
    short = _Plan(tmp_path / "short.json", DemoConfig(budget_s=5.0), time.perf_counter())
    assert short.steps("vae", exp, None, 1000, lambda left, step_s: left) == 250
    assert json.loads((tmp_path / "short.json").read_text())["vae"]["too_slow"] and len(timed) == 2
    # a resumed stage (its run has begun) keeps the first plan instead of timing again
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    again = _Plan(tmp_path / "plan.json", cfg, time.perf_counter())
    assert again.steps("vae", exp, None, 1000, lambda left, step_s: 0.0) == saved["vae"]["steps"]
    assert len(timed) == 2


def test_measure_step_time_leaves_no_trace(tmp_path):
    from shapeflow.train.experiment import load_config
    from shapeflow.train.loop import measure_step_time

    cfg = load_config(REPO / "configs" / "toy.yaml", ["train.num_workers=0", f"out_dir={tmp_path / 'toy'}"])
    state = torch.get_rng_state()
    assert 0 < measure_step_time(cfg, steps=3, warmup=1) < 5.0
    assert not (tmp_path / "toy").exists() and torch.equal(torch.get_rng_state(), state)


def test_latent_scale_is_applied_by_encode_latents_and_undone_by_generate(root, vecset_run, vecset_latents,
                                                                          token_dit_run, tmp_path):
    """Generators model ``z * latent_scale`` (Hunyuan3D's scale factor): encode-latents multiplies by it,
    generate divides by it before decoding; one field of the VAE's config."""
    from shapeflow.data.latents import encode_dataset
    from shapeflow.generate import generate
    from shapeflow.models import load_dit, load_vae
    from shapeflow.models.vecset_vae import VecSetVAE

    vae, _ = load_vae(vecset_run)
    scaled = VecSetVAE(dataclasses.replace(vae.config, latent_scale=2.0))
    scaled.load_state_dict(vae.state_dict())
    scaled.save_pretrained(tmp_path / "vae2")
    encode_dataset(tmp_path / "vae2", root / "prep", tmp_path / "lat2", progress=False)
    assert json.loads((tmp_path / "lat2" / "latents.json").read_text())["latent_scale"] == 2.0
    plain = npy_files(vecset_latents)
    assert set(npy_files(tmp_path / "lat2")) == set(plain)
    for name in plain:
        np.testing.assert_allclose(np.load(tmp_path / "lat2" / name), 2.0 * np.load(vecset_latents / name),
                                   rtol=1e-6, atol=1e-7)
    dit, kind = load_dit(token_dit_run)
    runs = [generate(dit, v, dit_kind=kind, vae_kind="vecset_vae", num=2, cond=torch.tensor([0, 1]), steps=2,
                     decode=False) for v in (vae, scaled)]
    torch.testing.assert_close(runs[1].latents, runs[0].latents / 2.0)
