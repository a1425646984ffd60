"""Fine-tuning a released Hunyuan3D DiT with shapeflow's engine, end to end on tiny models saved in the
released layouts: encode-latents with the released VAE folder, ``shapeflow train`` with ``model.init_from``,
full weights and LoRA, ``final/`` as a shapeflow checkpoint and ``final/release/`` in the released layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_hunyuan_dit import Ref21, _tiny_dinov2, hy21_state, write_dit_release
from test_vecset_vae import _hunyuan_params, _write_release, hunyuan_state_dict

from shapeflow import cli
from shapeflow.models import load_dit
from shapeflow.models.pretrained.hunyuan_dit import read_group
from shapeflow.train.lora import add_lora, merge_state_dict

pytest.importorskip("transformers")

MODEL = ("{preset: tiny, width: 32, heads: 4, depth: 5, moe_layers: 2, num_experts: 4, cond_dim: 24, "
         "in_channels: 8, num_tokens: 32, init_from: INIT}")
YAML = """task: hunyuan21_dit
model: MODEL
data: {root: ROOT/latents, image_root: ROOT/prep, normalization: none, val_fraction: 0.0}
objective: {t_sampling: uniform, cond_dropout: 0.1}
train: {steps: 4, batch_size: 2, warmup_steps: 1, lr: 1.0e-3, min_lr: 1.0e-5, log_every: 2, val_every: 0,
        ckpt_every: 0, num_workers: 0, ema: false, optimizer: adamw}
"""


def sf(*args) -> int:
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 synthetic shapes with 2 rendered views each, a tiny VAE and DiT release, latents of that VAE."""
    root = tmp_path_factory.mktemp("ft")
    assert sf("synth", root / "synth", "--per-class", 2, "--classes", "chair", "mug", "--resolution", 32) == 0
    assert sf("preprocess", root / "synth", root / "prep", "--resolution", 32, "--surface-points", 1024,
              "--sharp-points", 256, "--sdf-points", 1024, "--render-views", 2, "--render-size", 56,
              "--workers", 0, "--no-progress") == 0
    params = _hunyuan_params(scale_factor=1.25, num_latents=32)
    _write_release(root / "vae", hunyuan_state_dict(), params)
    cfg, dino = _tiny_dinov2()
    cond = ({f"main_image_encoder.model.{k}": v for k, v in dino.state_dict().items()},
            {"config": cfg.to_dict(), "image_size": 56, "use_cls_token": True})
    write_dit_release(root / "dit", hy21_state(), conditioner=cond, vae_params=params)
    assert sf("encode-latents", root / "prep", root / "latents", "--vae", root / "vae", "--no-progress") == 0
    info = json.loads((root / "latents" / "info.json").read_text()) if (root / "latents" / "info.json").is_file() \
        else {}
    assert info.get("latent_scale", 1.25) == 1.25
    return root


def _train(root: Path, name: str, *overrides: str, model: str = MODEL) -> int:
    cfg = root / f"{name}.yaml"
    cfg.write_text(YAML.replace("MODEL", model).replace("INIT", str(root / "dit")).replace("ROOT", str(root)))
    return sf("train", cfg, *overrides, "--out", root / "runs" / name)


def test_full_finetune_from_a_release_exports_both_layouts(data):
    assert _train(data, "full") == 0
    final = data / "runs" / "full" / "final"
    tuned, kind = load_dit(final)
    base, _ = load_dit(data / "dit")
    assert kind == "hunyuan21_dit"
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert len(changed) > 10  # the engine trained the released weights
    release = final / "release"
    assert (release / "config.yaml").read_text() == (data / "dit" / "config.yaml").read_text()
    group, template = read_group(release, "model"), read_group(data / "dit", "model")
    assert set(group) == set(template) and all(group[k].dtype == torch.float16 for k in group)
    assert set(read_group(release, "conditioner")) == set(read_group(data / "dit", "conditioner"))
    x, t, ctx = torch.randn(2, 12, 8), torch.rand(2), torch.randn(2, 17, 24)
    with torch.no_grad():  # the reference forward on the exported release = the fine-tuned model (fp16 weights)
        want = tuned.half().float()(x, t, ctx)
        torch.testing.assert_close(Ref21({k: v.float() for k, v in group.items()})(x, t, ctx), want,
                                   rtol=1e-4, atol=1e-4)


def test_lora_finetune_trains_only_adapters_and_merges_them(data):
    assert _train(data, "lora", "train.lora_rank=4", "train.lora_alpha=8") == 0
    run = data / "runs" / "lora"
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    raw = load_file(str(ckpts[-1] / "model.safetensors"))
    downs = [k for k in raw if k.endswith(".lora.down.weight")]
    assert downs and all(".attn1.to_qkv." in k or ".to_out." in k or ".fc" in k or ".attn2.to_" in k
                         for k in downs)
    base = load_dit(data / "dit")[0].state_dict()
    plain = {k: v for k, v in raw.items() if ".lora." not in k}
    assert all(torch.equal(plain[k], base[k]) for k in base)  # frozen: the base weights did not move
    ups = [raw[k.replace(".down.", ".up.")] for k in downs]
    assert any(u.abs().sum() > 0 for u in ups)  # the adapters did
    final = load_file(str(run / "final" / "model.safetensors"))
    assert set(final) == set(base)  # merged: the plain model's keys only
    torch.testing.assert_close(final, merge_state_dict(raw, scale=8 / 4))
    assert not torch.equal(final["blocks.0.attn1.to_qkv.weight"], base["blocks.0.attn1.to_qkv.weight"])
    assert torch.equal(final["blocks.0.norm1.weight"], base["blocks.0.norm1.weight"])
    assert (run / "final" / "release" / "model.fp16.ckpt").is_file()


def test_lora_adapter_starts_at_the_model_and_merges_exactly():
    from shapeflow.models.hunyuan_dit import Hunyuan21DiT

    model = Hunyuan21DiT.from_preset("tiny").double().eval()  # float64: the merge is exact up to rounding
    x, t, ctx = (torch.randn(2, 6, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64),
                 torch.randn(2, 17, 32, dtype=torch.float64))
    with torch.no_grad():
        for p in model.out_layer.parameters():
            p.normal_()
        before = model(x, t, ctx)
        names = add_lora(model, rank=2, alpha=4)
        torch.testing.assert_close(model(x, t, ctx), before)  # zero-initialised up: same function
        assert "blocks.0.attn1.to_qkv" in names and "out_layer" not in names
        for n, p in model.named_parameters():
            assert p.requires_grad == (".lora." in n)
            if n.endswith(".lora.up.weight"):
                p.normal_(std=0.1)
        adapted = model(x, t, ctx)
        plain = Hunyuan21DiT.from_preset("tiny").double().eval()
        plain.load_state_dict(merge_state_dict(model.state_dict(), scale=2.0))
        torch.testing.assert_close(plain(x, t, ctx), adapted, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(adapted, before)


def test_finetune_config_errors_are_one_line(data, capsys):
    wrong = MODEL.replace("depth: 5", "depth: 4")
    assert _train(data, "wrong", model=wrong) != 0
    err = capsys.readouterr().err
    assert "model.init_from" in err and "depth (config 4, checkpoint 5)" in err and "Traceback" not in err
    assert _train(data, "norm", "data.normalization=channel") != 0
    assert "set it to none" in capsys.readouterr().err


def test_lora_finetune_resumes_to_the_same_weights(data):
    import shutil

    assert _train(data, "straight", "train.lora_rank=4", "train.ckpt_every=2") == 0
    assert _train(data, "resumed", "train.lora_rank=4", "train.ckpt_every=2") == 0
    run = data / "runs" / "resumed"
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if stopped after step 2
    (run / "checkpoints" / "latest").write_text("step_00000002")
    shutil.rmtree(run / "final")
    assert _train(data, "resumed", "train.lora_rank=4", "train.ckpt_every=2", "--resume") == 0
    a = load_file(str(data / "runs" / "straight" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_lora_finetune_with_two_processes(data, tmp_path):
    """torchrun, 2 ranks (gloo on the CPU), FSDP2 over the blocks, LoRA, MoE experts some steps leave unused."""
    import os
    import socket
    import subprocess
    import sys

    cfg = data / "fsdp.yaml"
    cfg.write_text(YAML.replace("MODEL", MODEL).replace("INIT", str(data / "dit")).replace("ROOT", str(data)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "shapeflow", "train", str(cfg), "train.strategy=fsdp", "train.lora_rank=4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tuned = load_file(str(out / "final" / "model.safetensors"))
    base = load_dit(data / "dit")[0].state_dict()
    assert set(tuned) == set(base)
    assert not torch.equal(tuned["blocks.0.attn1.to_qkv.weight"], base["blocks.0.attn1.to_qkv.weight"])
    assert torch.equal(tuned["blocks.0.norm1.weight"], base["blocks.0.norm1.weight"])
    assert (out / "final" / "release" / "model.fp16.ckpt").is_file()
