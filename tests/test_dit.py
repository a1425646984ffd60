"""Token and grid DiTs: shapes, adaLN-Zero, gradients, overfitting, checkpoints, and the TRELLIS loader."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DIT as TINY

from shapeflow.checkpoint import CheckpointError
from shapeflow.config import ConfigError, preset
from shapeflow.flow import FlowConfig, flow_matching_loss
from shapeflow.models import load_dit
from shapeflow.models.dit import GridDiT, GridDiTConfig, TokenDiT, TokenDiTConfig
from shapeflow.nn.embeddings import sincos_3d_position_embedding
from shapeflow.nn.spatial import patchify_3d, unpatchify_3d

CLASSES = ("a", "b", "c")


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Add noise to every parameter so zero-initialised paths become active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _models():
    torch.manual_seed(0)
    return [
        TokenDiT(TokenDiTConfig(in_channels=8, **TINY)),
        TokenDiT(TokenDiTConfig(in_channels=8, cond="image", cond_dim=12, long_skip=True, width=32, depth=5, heads=2)),
        TokenDiT(TokenDiTConfig(in_channels=8, cond="class", classes=CLASSES, **TINY)),
        GridDiT(GridDiTConfig(in_channels=4, resolution=4, patch_size=2, **TINY)),
        GridDiT(GridDiTConfig(in_channels=4, resolution=4, patch_size=1, cond="image", cond_dim=12,
                              final_adaln=False, **TINY)),
    ]


def _inputs(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    if isinstance(model, GridDiT):
        x = torch.randn(b, cfg.in_channels, cfg.resolution, cfg.resolution, cfg.resolution, generator=g)
    else:
        x = torch.randn(b, 16, cfg.in_channels, generator=g)
    t = torch.rand(b, generator=g)
    cond = None
    if cfg.cond == "image":
        cond = torch.randn(b, 5, cfg.cond_dim, generator=g)
    elif cfg.cond == "class":
        cond = torch.randint(0, cfg.num_classes, (b,), generator=g)
    return x, t, cond


def test_presets_and_config_errors():
    assert preset(TokenDiTConfig, "tiny").width == 128
    trellis = preset(GridDiTConfig, "trellis_ss_flow_img_L")
    t = trellis
    assert (t.resolution, t.width, t.depth, t.heads, t.patch_size) == (16, 1024, 24, 16, 1)
    assert trellis.num_tokens == 4096 and trellis.qk_norm == "rms" and trellis.qk_norm_cross is None
    with torch.device("meta"):
        n = GridDiT(trellis).num_params()
    assert 550e6 < n < 560e6  # TRELLIS SS flow L: about 556 M
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset(TokenDiTConfig, "huge")
    with pytest.raises(ConfigError, match=r"widht: unknown key"):
        preset(TokenDiTConfig, "tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        GridDiTConfig(resolution=6, patch_size=4)
    with pytest.raises(ValueError, match="needs the class names"):
        TokenDiTConfig(cond="class")
    with pytest.raises(ValueError, match="duplicate names"):
        TokenDiTConfig(cond="class", classes=("a", "a"))
    assert TokenDiTConfig(cond="class", classes=CLASSES).num_classes == 3
    with pytest.raises(ValueError, match="cond_dim"):
        TokenDiTConfig(cond="image")


@pytest.mark.parametrize("idx", range(5))
def test_fresh_model_outputs_zero_and_blocks_are_identity(idx):
    model = _models()[idx]
    x, t, cond = _inputs(model)
    out = model(x, t, cond)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    h = torch.randn(2, 7, model.config.width)
    c = torch.randn(2, model.config.width)
    ctx = torch.randn(2, 5, model.config.cond_dim) if model.config.cond == "image" else None
    for block in model.blocks:
        assert torch.equal(block(h, c, ctx), h)


@pytest.mark.parametrize("idx", range(5))
def test_finite_gradients_on_every_parameter(idx):
    model = _models()[idx]
    _perturb(model)
    x, t, cond = _inputs(model)
    loss, _ = flow_matching_loss(model, x, cond, config=FlowConfig(cond_dropout=0.0),
                                 generator=torch.Generator().manual_seed(1))
    loss.backward()
    for name, p in model.named_parameters():
        if model.config.cond == "class" and name == "class_embedder.embedding.weight":
            assert torch.isfinite(p.grad).all()  # only the rows of the labels used get gradient
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches():
    model = TokenDiT(TokenDiTConfig(in_channels=8, long_skip=True, width=32, depth=4, heads=2))
    _perturb(model)
    x, t, _ = _inputs(model)
    out = model(x, t)
    out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    out2 = model(x, t)
    out2.pow(2).sum().backward()
    torch.testing.assert_close(out2, out)
    for g1, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g1)


def test_batch_of_one_equals_batched_and_token_count_is_free():
    model = TokenDiT(TokenDiTConfig(in_channels=8, cond="image", cond_dim=12, **TINY))
    _perturb(model)
    x, t, cond = _inputs(model, b=3)
    full = model(x, t, cond)
    single = torch.cat([model(x[i:i + 1], t[i:i + 1], cond[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(single, full, atol=1e-5, rtol=1e-5)
    assert model(torch.randn(2, 40, 8), 0.5, cond[:2]).shape == (2, 40, 8)  # no positional embedding
    # tokens are processed as a set: permuting them permutes the output
    perm = torch.randperm(16)
    torch.testing.assert_close(model(x[:, perm], t, cond), full[:, perm], atol=1e-5, rtol=1e-5)


def test_conditioning_changes_the_output():
    cls_model = TokenDiT(TokenDiTConfig(in_channels=8, cond="class", classes=CLASSES, **TINY))
    _perturb(cls_model)
    x, t, _ = _inputs(cls_model)
    a = cls_model(x, t, torch.tensor([0, 0]))
    b = cls_model(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(cls_model(x, t, None), cls_model(x, t, cls_model.null_condition(2)))
    img_model = TokenDiT(TokenDiTConfig(in_channels=8, cond="image", cond_dim=12, **TINY))
    _perturb(img_model)
    x, t, cond = _inputs(img_model)
    assert not torch.allclose(img_model(x, t, cond), img_model(x, t, torch.zeros_like(cond)))
    assert img_model.null_condition(2, num_tokens=5).shape == (2, 5, 12)
    with pytest.raises(ValueError, match="condition tokens"):
        img_model(x, t, cond[..., :4])
    with pytest.raises(ValueError, match="unconditional"):
        TokenDiT(TokenDiTConfig(in_channels=8, **TINY))(x, t, cond)
    with pytest.raises(ValueError, match="labels"):
        cls_model(x, t, torch.zeros(2, 1, 8))


def test_grid_dit_tokens_follow_patchify_order_and_position_embedding():
    r, p, width = 4, 2, 20
    emb = sincos_3d_position_embedding(r // p, width)
    # independent loop implementation of TRELLIS's AbsolutePositionEmbedder
    fd = width // 3 // 2
    ref = torch.zeros((r // p) ** 3, width)
    n = 0
    for i in range(r // p):
        for j in range(r // p):
            for k in range(r // p):
                row = []
                for coord in (i, j, k):
                    for f in range(fd):
                        row.append(math.sin(coord / 10000 ** (f / fd)))
                    for f in range(fd):
                        row.append(math.cos(coord / 10000 ** (f / fd)))
                ref[n, :len(row)] = torch.tensor(row)
                n += 1
    torch.testing.assert_close(emb, ref)
    assert torch.count_nonzero(emb[:, 6 * fd:]) == 0  # zero padding to the width
    # token n of patchify covers the patch at grid index (i, j, k) of row n of the embedding
    coords = torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"))  # (3, r, r, r)
    tokens = patchify_3d(coords[None].float(), p, tokens=True)  # (1, n, 3 p^3)
    patch_origin = tokens[0].view(-1, 3, p ** 3)[:, :, 0]  # (n, 3): voxel offset (0, 0, 0) of each patch
    grid_idx = torch.stack(torch.meshgrid(*[torch.arange(r // p)] * 3, indexing="ij"), -1).reshape(-1, 3)
    torch.testing.assert_close(patch_origin, (grid_idx * p).float())
    # the token form GridDiT uses is an exact inverse pair, and non-divisible sizes are refused
    x = torch.randn(2, 3, 4, 4, 4)
    assert torch.equal(unpatchify_3d(patchify_3d(x, 2, tokens=True), 2, grid=(4, 4, 4)), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify_3d(torch.randn(1, 3, 6, 6, 6), 4)
    model = GridDiT(GridDiTConfig(in_channels=3, resolution=r, patch_size=p, **TINY))
    assert "pos_emb" in model.state_dict()  # persistent buffer (TRELLIS checkpoints contain it)
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(1, 3, 8, 8, 8), 0.5)


@pytest.mark.parametrize("kind", ["token", "grid"])
def test_overfit_one_batch(kind):
    torch.manual_seed(0)
    if kind == "token":
        model = TokenDiT(TokenDiTConfig(in_channels=8, width=32, depth=2, heads=4))
        data = torch.randn(4, 64, 8)
    else:
        model = GridDiT(GridDiTConfig(in_channels=4, resolution=4, patch_size=1, width=32, depth=2, heads=4))
        data = torch.randn(4, 4, 4, 4, 4)
    noise = torch.randn_like(data)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss, _ = flow_matching_loss(model, data, noise=noise, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx((data - noise).pow(2).mean().item(), rel=1e-5)  # zero prediction at init
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("idx", range(5))
def test_save_load_roundtrip(idx, tmp_path):
    model = _models()[idx]
    _perturb(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = type(model).from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    x, t, cond = _inputs(model)
    assert torch.equal(loaded(x, t, cond), model(x, t, cond))
    dit, kind = load_dit(tmp_path / "ckpt")
    assert type(dit) is type(model) and kind == model.kind


def test_engine_layout_and_strict_errors(tmp_path):
    from safetensors.torch import save_file

    model = TokenDiT(TokenDiTConfig(in_channels=8, **TINY))
    ckpt = tmp_path / "run" / "final"
    ckpt.mkdir(parents=True)
    # the training engine's resolved config: model fields under "model", other sections beside
    (ckpt / "config.json").write_text(json.dumps({"task": "token_dit", "kind": "token_dit",
                                                  "model": {"preset": "tiny", "in_channels": 8, **TINY},
                                                  "train": {"steps": 1}}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt / "model.safetensors"))
    loaded = TokenDiT.from_pretrained(tmp_path / "run")  # a run directory stands for its final/
    assert loaded.config == model.config
    with pytest.raises(CheckpointError, match="holds a token_dit model, not a grid_dit"):
        GridDiT.from_pretrained(ckpt)
    state["extra.weight"] = torch.zeros(1)
    del state["out_layer.bias"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: out_layer.bias.*unexpected keys: extra.weight"):
        TokenDiT.from_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"kind": "token_dit", "model": {"widht": 3}}))
    with pytest.raises(ValueError, match="widht"):
        TokenDiT.from_pretrained(ckpt)
    with pytest.raises(FileNotFoundError):
        TokenDiT.from_pretrained(tmp_path / "nope")


def test_older_class_conditional_checkpoints_are_upgraded(tmp_path, caplog):
    """Before the names were part of the model: model.num_classes + data.classes."""
    model = TokenDiT(TokenDiTConfig(in_channels=8, cond="class", classes=CLASSES, num_tokens=64, **TINY))
    model.save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["model"]["num_classes"] = len(raw["model"].pop("classes"))
    old = {"task": "token_dit", "model": raw["model"], "data": {"classes": list(CLASSES)}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    with caplog.at_level("INFO"):
        assert TokenDiT.from_pretrained(tmp_path / "m").config == model.config
    assert any("model.classes" in r.getMessage() for r in caplog.records)
    old["model"]["num_tokens"] = 0  # "the VAE's count": not recoverable from the checkpoint alone
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        TokenDiT.from_pretrained(tmp_path / "m")
    assert any("num_tokens is 0" in r.getMessage() for r in caplog.records)
    assert TokenDiT.from_pretrained(tmp_path / "m", num_tokens=64).config == model.config


# ------------------------------------------------------------------------------------------------
# TRELLIS SparseStructureFlowModel: a state dict in its layout and an independent reference forward
# ------------------------------------------------------------------------------------------------


def _trellis_args(qk_cross: bool, patch: int):
    return dict(resolution=4, in_channels=3, out_channels=3, model_channels=52, cond_channels=20, num_blocks=2,
                num_head_channels=13, mlp_ratio=2, patch_size=patch, pe_mode="ape", use_fp16=True,
                use_checkpoint=False, share_mod=False, qk_rms_norm=True, qk_rms_norm_cross=qk_cross)


def _trellis_state(a: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under TRELLIS's key names and shapes (sparse_voxel.md section 2.3), stored as fp16."""
    g = torch.Generator().manual_seed(seed)
    C, ctx, p3 = a["model_channels"], a["cond_channels"], a["patch_size"] ** 3
    H, hd, hidden = C // a["num_head_channels"], a["num_head_channels"], C * a["mlp_ratio"]

    def w(*shape, s=0.15):
        return (torch.randn(*shape, generator=g) * s).half()

    sd = {"t_embedder.mlp.0.weight": w(C, 256), "t_embedder.mlp.0.bias": w(C),
          "t_embedder.mlp.2.weight": w(C, C), "t_embedder.mlp.2.bias": w(C),
          "input_layer.weight": w(C, a["in_channels"] * p3), "input_layer.bias": w(C),
          "out_layer.weight": w(a["out_channels"] * p3, C), "out_layer.bias": w(a["out_channels"] * p3)}
    # pos_emb as TRELLIS computes it: per axis [sin, cos] of integer coords, axes concatenated, zero padded
    n = a["resolution"] // a["patch_size"]
    fd = C // 3 // 2
    freqs = 1.0 / 10000 ** (torch.arange(fd, dtype=torch.float32) / fd)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * 3, indexing="ij"), -1).reshape(-1)
    out = torch.outer(coords, freqs)
    pe = torch.cat([out.sin(), out.cos()], -1).reshape(n ** 3, -1)
    sd["pos_emb"] = F.pad(pe, (0, C - pe.shape[1])).half()
    for i in range(a["num_blocks"]):
        b = f"blocks.{i}."
        sd.update({
            b + "norm2.weight": (1 + w(C)).half(), b + "norm2.bias": w(C),
            b + "self_attn.to_qkv.weight": w(3 * C, C), b + "self_attn.to_qkv.bias": w(3 * C),
            b + "self_attn.q_rms_norm.gamma": (1 + w(H, hd)).half(),
            b + "self_attn.k_rms_norm.gamma": (1 + w(H, hd)).half(),
            b + "self_attn.to_out.weight": w(C, C), b + "self_attn.to_out.bias": w(C),
            b + "cross_attn.to_q.weight": w(C, C), b + "cross_attn.to_q.bias": w(C),
            b + "cross_attn.to_kv.weight": w(2 * C, ctx), b + "cross_attn.to_kv.bias": w(2 * C),
            b + "cross_attn.to_out.weight": w(C, C), b + "cross_attn.to_out.bias": w(C),
            b + "mlp.mlp.0.weight": w(hidden, C), b + "mlp.mlp.0.bias": w(hidden),
            b + "mlp.mlp.2.weight": w(C, hidden), b + "mlp.mlp.2.bias": w(C),
            b + "adaLN_modulation.1.weight": w(6 * C, C), b + "adaLN_modulation.1.bias": w(6 * C),
        })
        if a["qk_rms_norm_cross"]:
            sd[b + "cross_attn.q_rms_norm.gamma"] = (1 + w(H, hd)).half()
            sd[b + "cross_attn.k_rms_norm.gamma"] = (1 + w(H, hd)).half()
    return sd


def _trellis_reference(sd, a, x, t_trellis, cond):
    """TRELLIS SparseStructureFlowModel.forward written from its description; ``t_trellis`` already x1000."""
    sd = {k: v.float() for k, v in sd.items()}
    C, p = a["model_channels"], a["patch_size"]
    H, hd = C // a["num_head_channels"], a["num_head_channels"]
    B, cin, R = x.shape[0], x.shape[1], x.shape[2]

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def rms(q, name):  # q: (B, L, H, hd); L2-normalise * gamma * sqrt(hd)
        return F.normalize(q, dim=-1) * sd[name + ".gamma"] * math.sqrt(hd)

    def attention(q, k, v):  # (B, L, H, hd) each; plain softmax attention
        w_ = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(hd)
        return torch.einsum("bhlm,bmhd->blhd", w_.softmax(-1), v).reshape(q.shape[0], q.shape[1], -1)

    # TRELLIS patchify (seed article): reshape into (dim/p, p) pairs, move the p's after the channel
    h = x.reshape(B, cin, R // p, p, R // p, p, R // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    h = h.reshape(B, cin * p ** 3, -1).permute(0, 2, 1)  # (B, N, cin p^3)
    h = lin(h, "input_layer") + sd["pos_emb"][None]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t_trellis[:, None].float() * freqs[None]
    t_emb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # cos first
    t_emb = lin(F.silu(lin(t_emb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    for i in range(a["num_blocks"]):
        b = f"blocks.{i}."
        mod = lin(F.silu(t_emb), b + "adaLN_modulation.1")
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        y = F.layer_norm(h, (C,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(y, b + "self_attn.to_qkv").reshape(B, -1, 3, H, hd).unbind(2)
        q, k = rms(q, b + "self_attn.q_rms_norm"), rms(k, b + "self_attn.k_rms_norm")
        h = h + g1[:, None] * lin(attention(q, k, v), b + "self_attn.to_out")
        y = F.layer_norm(h, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        q = lin(y, b + "cross_attn.to_q").reshape(B, -1, H, hd)
        k, v = lin(cond, b + "cross_attn.to_kv").reshape(B, -1, 2, H, hd).unbind(2)
        if a["qk_rms_norm_cross"]:
            q, k = rms(q, b + "cross_attn.q_rms_norm"), rms(k, b + "cross_attn.k_rms_norm")
        h = h + lin(attention(q, k, v), b + "cross_attn.to_out")  # no gate
        y = F.layer_norm(h, (C,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        y = lin(F.gelu(lin(y, b + "mlp.mlp.0"), approximate="tanh"), b + "mlp.mlp.2")
        h = h + g2[:, None] * y
    h = lin(F.layer_norm(h, (C,)), "out_layer")  # (B, N, cout p^3)
    # TRELLIS unpatchify
    n = R // p
    h = h.permute(0, 2, 1).reshape(B, -1, p, p, p, n, n, n).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return h.reshape(B, -1, R, R, R)


@pytest.mark.parametrize("qk_cross,patch", [(False, 1), (True, 2)])
def test_trellis_ss_flow_loader_matches_reference(tmp_path, qk_cross, patch):
    from safetensors.torch import save_file

    from shapeflow.models.pretrained import trellis_ss_flow
    from shapeflow.models.pretrained.trellis_ss_flow import (
        TRELLIS_SAMPLER_DEFAULTS,
        TrellisFlowAdapter,
        is_trellis_checkpoint,
    )

    a = _trellis_args(qk_cross, patch)
    sd = _trellis_state(a)
    prefix = tmp_path / "ckpts" / "ss_flow_img_dit_T_4l3_fp16"
    prefix.parent.mkdir()
    meta = {"name": "SparseStructureFlowModel", "args": a}
    (tmp_path / "ckpts" / (prefix.name + ".json")).write_text(json.dumps(meta))
    save_file(sd, str(prefix) + ".safetensors")
    assert is_trellis_checkpoint(prefix) and is_trellis_checkpoint(str(prefix) + ".json")

    model = GridDiT.from_release(trellis_ss_flow.convert(str(prefix) + ".safetensors", convention="trellis"))
    assert model.config.heads == 4 and model.config.final_adaln is False
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    cond = torch.randn(2, 6, 20, generator=g)
    t_trellis = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ref = _trellis_reference(sd, a, x, 1000 * t_trellis, cond)
        got = model(x, t_trellis, cond)  # GridDiT scales its time input by 1000 itself
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        assert ref.abs().mean() > 0.1  # a non-trivial output was compared
        # shapeflow's convention: v(x, t) = -trellis(x, 1000 (1 - t)), by the run-time adapter ...
        torch.testing.assert_close(TrellisFlowAdapter(model)(x, 1 - t_trellis, cond), -ref, atol=1e-4, rtol=1e-4)
        # ... and folded into the weights (the default of from_pretrained and of the registry)
        for folded in (GridDiT.from_pretrained(str(prefix) + ".safetensors"), load_dit(prefix)[0]):
            assert type(folded) is GridDiT
            torch.testing.assert_close(folded(x, 1 - t_trellis, cond), -ref, atol=1e-4, rtol=1e-4)
    assert TRELLIS_SAMPLER_DEFAULTS["cfg_scale"] == 6.0 and TRELLIS_SAMPLER_DEFAULTS["cfg_interval"] == (0.0, 0.5)


def test_trellis_sampler_equivalence(tmp_path):
    """Our Euler sampler on the adapter reproduces TRELLIS's FlowEuler(Guidance-Interval) sampler loop."""
    from shapeflow.models.pretrained.trellis_ss_flow import (
        convert_trellis_state_dict,
        fold_trellis_convention,
        grid_dit_config_from_trellis,
    )
    from shapeflow.sampling import sample

    a = _trellis_args(False, 1)
    sd = _trellis_state(a, seed=1)
    model = GridDiT(GridDiTConfig(**grid_dit_config_from_trellis({"name": "SparseStructureFlowModel", "args": a})))
    identity = {k: v for k, v in model.state_dict().items() if k in ("latent_mean", "latent_std")}
    model.load_state_dict(fold_trellis_convention({**convert_trellis_state_dict(sd), **identity}), strict=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 4, 4, generator=g)
    cond = torch.randn(2, 6, 20, generator=g)
    steps, w, rescale, interval = 6, 2.0, 3.0, (0.5, 1.0)
    with torch.no_grad():
        # TRELLIS loop: t from 1 to 0, rescaled, x_prev = x - (t - t_prev) v, CFG (1 + w) c - w u inside interval
        ts = torch.linspace(1, 0, steps + 1)
        ts = rescale * ts / (1 + (rescale - 1) * ts)
        x = noise.clone()
        for t, t_prev in zip(ts[:-1].tolist(), ts[1:].tolist()):
            tt = torch.full((2,), 1000 * t)
            vc = _trellis_reference(sd, a, x, tt, cond)
            if interval[0] <= t <= interval[1]:
                vu = _trellis_reference(sd, a, x, tt, torch.zeros_like(cond))
                v = (1 + w) * vc - w * vu
            else:
                v = vc
            x = x - (t - t_prev) * v
        ours = sample(model, noise, steps=steps, shift=rescale, cond=cond,
                      null_cond=torch.zeros_like(cond), cfg_scale=1 + w,
                      cfg_interval=(1 - interval[1], 1 - interval[0]))
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=2e-4)


def test_trellis_loader_errors(tmp_path):
    from safetensors.torch import save_file

    a = _trellis_args(False, 1)
    sd = _trellis_state(a)
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"name": "SparseStructureFlowModel", "args": a}))
    sd["blocks.0.extra"] = torch.zeros(1)
    del sd["blocks.1.mlp.mlp.2.bias"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias.*unexpected keys: blocks\.0\.extra"):
        GridDiT.from_pretrained(tmp_path / "m")
    js.write_text(json.dumps({"name": "SparseStructureFlowModel", "args": {**a, "pe_mode": "rope"}}))
    with pytest.raises(ValueError, match="pe_mode"):
        GridDiT.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        GridDiT.from_pretrained(tmp_path / "absent")


@pytest.mark.parametrize("kind", ["token", "grid"])
def test_latent_normalizer_buffers_round_trip(kind, tmp_path):
    from shapeflow.flow import LatentNormalizer

    if kind == "token":
        model = TokenDiT.from_preset("tiny")
        z = torch.randn(64, 16, model.config.in_channels) * 3.0 + 1.5
        fitted = LatentNormalizer.fit(z, mode="channel", channel_dim=-1)
    else:
        model = GridDiT.from_preset("tiny")
        r = model.config.resolution
        z = torch.randn(8, model.config.in_channels, r, r, r) * 0.5 - 2.0
        fitted = LatentNormalizer.fit(z, mode="channel", channel_dim=1)
    model.set_latent_normalizer(fitted)
    x = model.normalize_latents(z)
    dims = [d for d in range(z.ndim) if d != (z.ndim - 1 if kind == "token" else 1)]
    torch.testing.assert_close(x.mean(dim=dims), torch.zeros(model.config.in_channels), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=dims), torch.ones(model.config.in_channels), atol=1e-3, rtol=0)
    torch.testing.assert_close(model.denormalize_latents(x), z, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "m")
    back = type(model).from_pretrained(tmp_path / "m")
    torch.testing.assert_close(back.latent_mean, model.latent_mean)
    torch.testing.assert_close(back.latent_std, model.latent_std)


def test_token_count_the_dit_samples_and_trains_on():
    from shapeflow.generate import latent_shape
    from shapeflow.train.task_dit import _check_shape

    fixed = TokenDiT.from_preset("tiny", in_channels=4, num_tokens=64)
    assert latent_shape(fixed, "token_dit") == (64, 4)  # what it was trained on
    assert latent_shape(fixed, "token_dit", num_tokens=32) == (32, 4)  # explicit wins
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        latent_shape(fixed, "token_dit", num_tokens=0)
    _check_shape(fixed, torch.zeros(64, 4), "lat")
    with pytest.raises(ValueError, match=r"lat: latents have shape \(32, 4\), the model expects \(64, 4\)"):
        _check_shape(fixed, torch.zeros(32, 4), "lat")
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="num_tokens"):
            preset(TokenDiTConfig, "tiny", num_tokens=bad)
