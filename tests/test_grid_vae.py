"""Voxel-grid VAE: shapes, gradients, overfitting, checkpoints, TRELLIS loader, losses, field conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from shapeflow.checkpoint import CheckpointError
from shapeflow.config import ConfigError, from_dict, preset, to_dict
from shapeflow.geometry import grid
from shapeflow.models.distributions import DiagonalGaussian
from shapeflow.models.grid_losses import dice_loss, grid_vae_loss, occupancy_iou
from shapeflow.models.grid_vae import GridVAE, GridVAEConfig, grid_to_field, grid_to_mesh
from shapeflow.models.pretrained.trellis_ss_vae import config_from_trellis_args

PRESETS = GridVAEConfig.PRESETS


def from_preset(name: str, **overrides) -> GridVAEConfig:
    return preset(GridVAEConfig, name, **overrides)

# ---------------------------------------------------------------------------------------------------
# Analytic shapes on the cell grid
# ---------------------------------------------------------------------------------------------------


def _sdfs(res: int) -> list[np.ndarray]:
    p = grid.cell_centers(res).reshape(res, res, res, 3).astype(np.float64)

    def sphere(c, r):
        return np.linalg.norm(p - c, axis=-1) - r

    def box(c, e):
        q = np.abs(p - c) - e
        return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(-1), 0)

    def torus(c, big, small):
        q = p - c
        return np.sqrt((np.linalg.norm(q[..., [0, 2]], axis=-1) - big) ** 2 + q[..., 1] ** 2) - small

    return [sphere(np.array([0.1, 0.0, 0.0]), 0.6), box(np.array([0.0, 0.1, 0.0]), np.array([0.5, 0.3, 0.7])),
            torus(np.zeros(3), 0.55, 0.3)]


def _occupancy(res: int) -> torch.Tensor:
    occ = np.stack([d < 0 for d in _sdfs(res)])[:, None]  # (3, 1, r, r, r)
    return torch.tensor(occ, dtype=torch.float32)


def _tiny(**kw) -> GridVAEConfig:
    """A small full-resolution (stem 1) config: three levels of (8, 16, 32) channels."""
    base = dict(resolution=16, channels=(8, 16, 32), stem=1, num_res_blocks=1, num_res_blocks_middle=1,
                loss="dice+bce")
    return GridVAEConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------


def test_shapes_per_level_tiny():
    cfg = _tiny(resolution=32)
    torch.manual_seed(0)
    m = GridVAE(cfg)
    x = _occupancy(32)[:2]
    # Expected (channels, size) after each encoder block: levels of (8, 16, 32) channels at 32, 16, 8.
    exp_enc = [(8, 32), (16, 16), (16, 16), (32, 8), (32, 8)]  # res, down, res, down, res
    h = m.encoder.input_layer(x)
    got = []
    for blk in m.encoder.blocks:
        h = blk(h)
        got.append((h.shape[1], h.shape[2]))
    assert got == exp_enc
    post = m.encode(x)
    assert post.mean.shape == (2, 8, 8, 8, 8) == (2, *cfg.latent_shape)
    exp_dec = [(32, 8), (16, 16), (16, 16), (8, 32), (8, 32)]  # res, up, res, up, res
    h = m.decoder.middle_block(m.decoder.input_layer(post.mode()))
    got = []
    for blk in m.decoder.blocks:
        h = blk(h)
        got.append((h.shape[1], h.shape[2]))
    assert got == exp_dec
    out, _ = m(x)
    assert out.shape == x.shape


def test_space_to_channel_stem_is_lossless_and_shapes_match():
    cfg = _tiny(resolution=32, stem=2)  # convs run at 16^3; factor 2 * 4 = 8 -> 4^3 latent
    assert cfg.downsample_factor == 8 and cfg.latent_shape == (8, 4, 4, 4)
    m = GridVAE(cfg)
    assert m.encoder.input_layer.in_channels == 8 and m.decoder.out_layer[-1].out_channels == 8
    x = _occupancy(32)[:2]
    # the stem is pixel_unshuffle: the encoder input is exactly the rearranged grid
    from shapeflow.nn.spatial import pixel_shuffle_3d

    prepared = m._prepare(x)
    assert prepared.shape == (2, 8, 16, 16, 16)
    torch.testing.assert_close(pixel_shuffle_3d(prepared.contiguous(), 2), x)
    out, post = m(x)
    assert out.shape == x.shape and post.mean.shape == (2, *cfg.latent_shape)
    for name in ("tiny", "tiny8", "sdf_tiny"):
        c = from_preset(name)
        assert c.stem == 2 and GridVAE(c).decode(torch.zeros(1, *c.latent_shape)).shape[2:] == (c.grid_size,) * 3


def test_trellis_preset_shapes_and_sizes_on_meta():
    with torch.device("meta"):
        m = GridVAE(from_preset("trellis"))
        out, post = m(torch.empty(2, 1, 64, 64, 64))
    assert post.mean.shape == (2, 8, 16, 16, 16)
    assert out.shape == (2, 1, 64, 64, 64)
    # Parameter counts of the released model (sparse_voxel.md 1.2: ~59.3 M / ~73.7 M).
    n_enc = sum(p.numel() for p in m.encoder.parameters())
    n_dec = sum(p.numel() for p in m.decoder.parameters())
    assert abs(n_enc - 59.3e6) < 0.05e6 and abs(n_dec - 73.7e6) < 0.05e6
    # fp16 torso (blocks.*/middle_block.* convs) + fp32 rest reproduces the released file sizes up to the
    # safetensors JSON header (a few KB): 119,068,016 B (encoder) and 147,591,972 B (decoder).
    for part, size in ((m.encoder, 119_068_016), (m.decoder, 147_591_972)):
        nbytes = sum(v.numel() * (2 if _is_fp16_key(k) else 4) for k, v in part.state_dict().items())
        assert 0 < size - nbytes < 10_000


def test_sdf_node_grid_is_padded_and_cropped():
    cfg = from_preset("sdf64", resolution=16)
    assert cfg.grid_size == 17 and cfg.latent_size == 5
    m = GridVAE(cfg)
    x = torch.tensor(_sdfs(17)[0][None, None] * 0.5, dtype=torch.float32)  # any (1, 1, 17, 17, 17) field
    post = m.encode(x)
    assert post.mean.shape == (1, 8, 5, 5, 5)
    assert m.decode(post.mode()).shape == (1, 1, 17, 17, 17)
    assert m(x)[0].shape == x.shape


# ---------------------------------------------------------------------------------------------------
# Gradients, layouts, checkpointing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(upsample="transpose"), dict(upsample="nearest", norm="group"), dict(loss="dice"),
     dict(loss="bce"), dict(input="sdf", loss="mse"), dict(input="sdf", loss="l1", channels_last=False)],
)
def test_finite_gradients_on_every_parameter(kw):
    torch.manual_seed(0)
    cfg = _tiny(**kw)
    m = GridVAE(cfg)
    if cfg.input == "sdf":
        x = torch.tensor(np.stack(_sdfs(17)[:2])[:, None], dtype=torch.float32)
    else:
        x = _occupancy(16)[:2]
    loss, logs = grid_vae_loss(m, {"grid": x}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in m.parameters()) > 0
    assert torch.isfinite(loss) and set(logs) >= {"loss", "recon", "kl"}


def test_channels_last_and_grad_checkpointing_do_not_change_results():
    torch.manual_seed(0)
    cfg = _tiny(resolution=16)
    a = GridVAE(cfg)
    b = GridVAE(GridVAEConfig(**{**cfg.__dict__, "channels_last": False}))
    b.load_state_dict(a.state_dict())
    # random weights everywhere (conv2 is zero-initialised, which would hide errors in the residual path)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.copy_(torch.randn_like(pa) * 0.1)
            pb.copy_(pa)
    x = _occupancy(16)[:2]
    za, zb = a.encode(x).mode(), b.encode(x).mode()
    torch.testing.assert_close(za, zb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.decode(za), b.decode(za), rtol=1e-4, atol=1e-5)
    # gradient checkpointing: same loss and gradients
    g = torch.Generator
    la, _ = grid_vae_loss(a, {"grid": x}, generator=g().manual_seed(1))
    la.backward()
    a2 = GridVAE(cfg)
    a2.load_state_dict(a.state_dict())
    a2.grad_checkpointing = True
    assert a2.encoder.grad_checkpointing and a2.decoder.grad_checkpointing
    lb, _ = grid_vae_loss(a2, {"grid": x}, generator=g().manual_seed(1))
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (n, p), q in zip(a.named_parameters(), a2.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_overfit_one_batch():
    """Tiny model, 3 solid shapes at 16^3: 100 Adam steps through grid_vae_loss (posterior samples)."""
    torch.manual_seed(0)
    x = _occupancy(16)
    m = GridVAE(_tiny())
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(100):
        loss, _ = grid_vae_loss(m, {"grid": x}, generator=gen)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        iou = occupancy_iou(m.decode(m.encode(x).mode()), x)
    assert loss.item() < 0.2 * first
    assert iou.mean() > 0.9, iou


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def test_save_load_identity(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny(upsample="transpose", kl_weight=1e-4)
    m = GridVAE(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(tmp_path / "ckpt")
    m2 = GridVAE.from_pretrained(tmp_path / "ckpt")
    assert m2.config == cfg and not m2.training
    x = _occupancy(16)
    with torch.no_grad():
        assert torch.equal(m.decode(m.encode(x).mode()), m2.decode(m2.encode(x).mode()))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_loads_engine_style_config_and_rejects_other_kinds(tmp_path):
    m = GridVAE(_tiny())
    m.save_pretrained(tmp_path / "a")
    fields = to_dict(m.config)
    exp = {"task": "grid_vae", "model": fields, "train": {"lr": 1e-3}, "out_dir": "x"}
    (tmp_path / "a" / "config.json").write_text(json.dumps(exp))
    assert GridVAE.from_pretrained(tmp_path / "a").config == m.config
    (tmp_path / "a" / "config.json").write_text(json.dumps({**exp, "task": "vecset_vae"}))
    with pytest.raises(CheckpointError, match="holds a vecset_vae model, not a grid_vae"):
        GridVAE.from_pretrained(tmp_path / "a")
    cfg_file = tmp_path / "a" / "config.json"
    cfg_file.write_text(json.dumps({"kind": "grid_vae", "model": {**fields, "bogus": 1}}))
    with pytest.raises(ConfigError, match=r"model.bogus: unknown key"):
        GridVAE.from_pretrained(tmp_path / "a")
    cfg_file.write_text(json.dumps({"kind": "grid_vae", "model": {**fields, "latent_channels": 4}}))
    with pytest.raises(ValueError, match="shape mismatch: "):
        GridVAE.from_pretrained(tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        GridVAE.from_pretrained(tmp_path / "nothing_here")



# ---------------------------------------------------------------------------------------------------
# TRELLIS layout (facts: shared/reference/sparse_voxel.md 1.1-1.4), written independently of the model
# ---------------------------------------------------------------------------------------------------


def _is_fp16_key(k: str) -> bool:
    # use_fp16 halves the Conv params of `blocks` and `middle_block` only (norms stay fp32).
    return k.startswith(("blocks.", "middle_block.")) and k.split(".")[-2] in ("conv", "conv1", "conv2")


def _resblock_keys(prefix: str, c: int) -> dict:
    return {f"{prefix}.norm1.weight": (c,), f"{prefix}.norm1.bias": (c,),
            f"{prefix}.conv1.weight": (c, c, 3, 3, 3), f"{prefix}.conv1.bias": (c,),
            f"{prefix}.norm2.weight": (c,), f"{prefix}.norm2.bias": (c,),
            f"{prefix}.conv2.weight": (c, c, 3, 3, 3), f"{prefix}.conv2.bias": (c,)}


def trellis_encoder_keys(cin, latent, ch, nres, nmid) -> dict:
    keys = {"input_layer.weight": (ch[0], cin, 3, 3, 3), "input_layer.bias": (ch[0],)}
    i = 0
    for lvl, c in enumerate(ch):
        for _ in range(nres):
            keys |= _resblock_keys(f"blocks.{i}", c)
            i += 1
        if lvl < len(ch) - 1:
            nxt = ch[lvl + 1]
            keys |= {f"blocks.{i}.conv.weight": (nxt, c, 2, 2, 2), f"blocks.{i}.conv.bias": (nxt,)}
            i += 1
    for j in range(nmid):
        keys |= _resblock_keys(f"middle_block.{j}", ch[-1])
    keys |= {"out_layer.0.weight": (ch[-1],), "out_layer.0.bias": (ch[-1],),
             "out_layer.2.weight": (2 * latent, ch[-1], 3, 3, 3), "out_layer.2.bias": (2 * latent,)}
    return keys


def trellis_decoder_keys(cout, latent, ch, nres, nmid) -> dict:
    keys = {"input_layer.weight": (ch[0], latent, 3, 3, 3), "input_layer.bias": (ch[0],)}
    for j in range(nmid):
        keys |= _resblock_keys(f"middle_block.{j}", ch[0])
    i = 0
    for lvl, c in enumerate(ch):
        for _ in range(nres):
            keys |= _resblock_keys(f"blocks.{i}", c)
            i += 1
        if lvl < len(ch) - 1:
            nxt = ch[lvl + 1] * 8
            keys |= {f"blocks.{i}.conv.weight": (nxt, c, 3, 3, 3), f"blocks.{i}.conv.bias": (nxt,)}
            i += 1
    keys |= {"out_layer.0.weight": (ch[-1],), "out_layer.0.bias": (ch[-1],),
             "out_layer.2.weight": (cout, ch[-1], 3, 3, 3), "out_layer.2.bias": (cout,)}
    return keys


def _random_state(keys: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("weight") and len(shape) == 1:  # norm gains around 1
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=g) / np.sqrt(fan_in) * (1.0 if len(shape) > 1 else 0.1)
        out[k] = t.half() if _is_fp16_key(k) else t.float()
    return out


def _ln(x, w, b):  # LayerNorm over channels in fp32
    x = x.float()
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    shape = (1, -1, 1, 1, 1)
    return (x - mu) / torch.sqrt(var + 1e-5) * w.float().view(shape) + b.float().view(shape)


def _conv(x, sd, k, **kw):
    return F.conv3d(x, sd[k + ".weight"].float(), sd[k + ".bias"].float(), **kw)


def _res(x, sd, p):
    h = _conv(F.silu(_ln(x, sd[p + ".norm1.weight"], sd[p + ".norm1.bias"])), sd, p + ".conv1", padding=1)
    h = _conv(F.silu(_ln(h, sd[p + ".norm2.weight"], sd[p + ".norm2.bias"])), sd, p + ".conv2", padding=1)
    return h + x


def _shuffle2(x):  # out[c, 2i+sx, 2j+sy, 2k+sz] = in[c*8 + 4sx + 2sy + sz, i, j, k]
    b, c8, d, h, w = x.shape
    out = x.new_zeros(b, c8 // 8, 2 * d, 2 * h, 2 * w)
    for sx in range(2):
        for sy in range(2):
            for sz in range(2):
                out[:, :, sx::2, sy::2, sz::2] = x[:, 4 * sx + 2 * sy + sz :: 8]
    return out


def ref_encoder(x, sd, ch, nres, nmid):
    h = _conv(x, sd, "input_layer", padding=1)
    i = 0
    for lvl in range(len(ch)):
        for _ in range(nres):
            h = _res(h, sd, f"blocks.{i}")
            i += 1
        if lvl < len(ch) - 1:
            h = _conv(h, sd, f"blocks.{i}.conv", stride=2)
            i += 1
    for j in range(nmid):
        h = _res(h, sd, f"middle_block.{j}")
    h = _conv(F.silu(_ln(h, sd["out_layer.0.weight"], sd["out_layer.0.bias"])), sd, "out_layer.2", padding=1)
    return h.chunk(2, dim=1)  # mean, logvar


def ref_decoder(z, sd, ch, nres, nmid):
    h = _conv(z, sd, "input_layer", padding=1)
    for j in range(nmid):
        h = _res(h, sd, f"middle_block.{j}")
    i = 0
    for lvl in range(len(ch)):
        for _ in range(nres):
            h = _res(h, sd, f"blocks.{i}")
            i += 1
        if lvl < len(ch) - 1:
            h = _shuffle2(_conv(h, sd, f"blocks.{i}.conv", padding=1))
            i += 1
    h = F.silu(_ln(h, sd["out_layer.0.weight"], sd["out_layer.0.bias"]))
    return _conv(h, sd, "out_layer.2", padding=1)


ENC_ARGS = dict(in_channels=1, latent_channels=3, num_res_blocks=2, num_res_blocks_middle=1,
                channels=[4, 8, 16], use_fp16=True)
DEC_ARGS = dict(out_channels=1, latent_channels=3, num_res_blocks=2, num_res_blocks_middle=1,
                channels=[16, 8, 4], use_fp16=True)


def _write_trellis(tmp_path, name, cls, args, state):
    (tmp_path / f"{name}.json").write_text(json.dumps({"name": cls, "args": args}))
    save_file(state, str(tmp_path / f"{name}.safetensors"))
    return tmp_path / name


def _trellis_pair(tmp_path):
    enc = _random_state(trellis_encoder_keys(1, 3, [4, 8, 16], 2, 1), seed=1)
    dec = _random_state(trellis_decoder_keys(1, 3, [16, 8, 4], 2, 1), seed=2)
    _write_trellis(tmp_path, "ss_enc_conv3d_test", "SparseStructureEncoder", ENC_ARGS, enc)
    _write_trellis(tmp_path, "ss_dec_conv3d_test", "SparseStructureDecoder", DEC_ARGS, dec)
    return enc, dec


def test_trellis_layout_matches_our_modules_at_full_size():
    with torch.device("meta"):
        m = GridVAE(from_preset("trellis"))
    enc = {k: tuple(v.shape) for k, v in m.encoder.state_dict().items()}
    dec = {k: tuple(v.shape) for k, v in m.decoder.state_dict().items()}
    assert enc == trellis_encoder_keys(1, 8, [32, 128, 512], 2, 2)
    assert dec == trellis_decoder_keys(1, 8, [512, 128, 32], 2, 2)
    # literal entries of sparse_voxel.md 1.3
    assert enc["blocks.5.conv.weight"] == (512, 128, 2, 2, 2)
    assert enc["out_layer.2.weight"] == (16, 512, 3, 3, 3)
    assert dec["blocks.2.conv.weight"] == (1024, 512, 3, 3, 3) and dec["blocks.5.conv.bias"] == (256,)
    # released JSON args -> the trellis preset
    released_enc = dict(in_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2,
                        channels=[32, 128, 512], use_fp16=True)
    released_dec = dict(out_channels=1, latent_channels=8, num_res_blocks=2, num_res_blocks_middle=2,
                        channels=[512, 128, 32], use_fp16=True)
    assert GridVAEConfig(**config_from_trellis_args(released_enc, released_dec)) == from_preset("trellis")


def test_trellis_loader_matches_reference_forward(tmp_path):
    enc, dec = _trellis_pair(tmp_path)
    assert enc["blocks.0.conv1.weight"].dtype == torch.float16
    assert enc["input_layer.weight"].dtype == torch.float32
    m = GridVAE.from_pretrained(tmp_path / "ss_enc_conv3d_test")  # decoder found as the ss_dec_ sibling
    assert all(p.dtype == torch.float32 for p in m.parameters())
    c = m.config
    assert c.latent_channels == 3 and c.channels == (4, 8, 16) and c.num_res_blocks_middle == 1
    for k, v in enc.items():
        assert torch.equal(m.encoder.state_dict()[k], v.float()), k
    x = _occupancy(16)
    with torch.no_grad():
        mean_ref, logvar_ref = ref_encoder(x, enc, [4, 8, 16], 2, 1)
        post = m.encode(x)
        torch.testing.assert_close(post.mean, mean_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(post.logvar, logvar_ref.clamp(-30, 20), rtol=1e-4, atol=1e-4)
        z = torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(m.decode(z), ref_decoder(z, dec, [16, 8, 4], 2, 1), rtol=1e-4, atol=1e-4)
    # decoder-only (e.g. to decode flow samples): the same logits, and no encoder
    d = GridVAE.from_pretrained(tmp_path / "ss_dec_conv3d_test.safetensors")
    assert d.encoder is None and d.config.decoder_only
    with torch.no_grad():
        torch.testing.assert_close(d.decode(z), m.decode(z))
    with pytest.raises(ValueError, match="no encoder"):
        d.encode(x)


def test_trellis_loader_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    enc, dec = _trellis_pair(tmp_path)
    bad = dict(enc)
    del bad["blocks.3.norm2.bias"]
    bad["blocks.99.conv.weight"] = torch.zeros(1)
    bad["out_layer.2.bias"] = torch.zeros(7)
    _write_trellis(tmp_path, "ss_enc_conv3d_test", "SparseStructureEncoder", ENC_ARGS, bad)
    with pytest.raises(ValueError) as err:
        GridVAE.from_pretrained(tmp_path / "ss_enc_conv3d_test")
    msg = str(err.value)
    assert "ss_enc_conv3d_test.safetensors" in msg
    assert "missing keys: encoder.blocks.3.norm2.bias;" in msg  # ours: the file cannot name a key it lacks
    assert "unexpected keys: blocks.99.conv.weight;" in msg
    assert "shape mismatch: out_layer.2.bias (7,) vs model (6,)" in msg
    # config-level errors
    enc_name, enc_cls = "ss_enc_conv3d_test", "SparseStructureEncoder"
    _write_trellis(tmp_path, enc_name, enc_cls, {**ENC_ARGS, "norm_type": "group"}, enc)
    with pytest.raises(ValueError, match="norm_type='group' is not supported"):
        GridVAE.from_pretrained(tmp_path / "ss_enc_conv3d_test")
    _write_trellis(tmp_path, enc_name, enc_cls, {**ENC_ARGS, "latent_channels": 4}, enc)
    with pytest.raises(ValueError, match="encoder latent_channels=4 differs from decoder latent_channels=3"):
        GridVAE.from_pretrained(tmp_path / "ss_enc_conv3d_test")
    (tmp_path / "x.json").write_text(json.dumps({"name": "SLatEncoder", "args": {}}))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a TRELLIS sparse-structure VAE"):
        GridVAE.from_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="missing: checkpoint not found"):
        GridVAE.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------


class _Fixed(torch.nn.Module):
    """Stands in for GridVAE in loss tests: returns a given output and posterior."""

    def __init__(self, cfg, out, mean, logvar):
        super().__init__()
        self.config, self.out, self.post = cfg, out, DiagonalGaussian(mean, logvar)

    def forward(self, x, sample_posterior=True, generator=None):
        return self.out, self.post


def test_dice_and_kl_match_trellis_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 4, 4, generator=g)
    y = (torch.rand(2, 1, 4, 4, 4, generator=g) > 0.7).float()
    p = torch.sigmoid(logits)
    want = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)  # whole-batch sums, smoothing 1
    torch.testing.assert_close(dice_loss(logits, y), want)
    mean, logvar = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    cfg = _tiny(loss="dice+bce", kl_weight=0.5)
    loss, logs = grid_vae_loss(_Fixed(cfg, logits, mean, logvar), {"grid": y}, cfg)
    kl = 0.5 * torch.mean(mean**2 + logvar.exp() - logvar - 1)  # TRELLIS: mean over all elements
    bce = F.binary_cross_entropy_with_logits(logits, y)
    torch.testing.assert_close(logs["kl"], kl)
    torch.testing.assert_close(loss, want + bce + 0.5 * kl)
    torch.testing.assert_close(logs["iou"], occupancy_iou(logits, y).mean())


def test_sdf_loss_weights_the_band():
    cfg = from_preset("sdf64", resolution=4, sdf_truncation=0.1, sdf_band_weight=3.0, kl_weight=0.0)
    gt = torch.tensor([-0.5, -0.05, 0.0, 0.05, 0.5]).reshape(1, 1, 5, 1, 1).expand(1, 1, 5, 5, 5).contiguous()
    pred = gt.clamp(-0.1, 0.1) + 0.01  # error 0.1 truncation units everywhere
    pred[:, :, 0] = -0.02  # far inside: error |(-0.02) - (-0.1)| / 0.1 = 0.8, weight 1
    z = torch.zeros(1, 8, 1, 1, 1)
    loss, logs = grid_vae_loss(_Fixed(cfg, pred, z, z), {"grid": gt}, cfg)
    w = torch.tensor([1.0, 4.0, 4.0, 4.0, 1.0])
    e = torch.tensor([0.8, 0.1, 0.1, 0.1, 0.1])
    torch.testing.assert_close(loss, (w * e).sum() / w.sum())
    torch.testing.assert_close(logs["sign_acc"], torch.tensor(1.0))


def test_config_errors():
    with pytest.raises(ValueError, match="loss must be one of \\['l1', 'mse'\\] for input='sdf'"):
        GridVAEConfig(input="sdf", loss="dice")
    with pytest.raises(ValueError, match="upsample must be one of"):
        GridVAEConfig(upsample="bilinear")
    with pytest.raises(ConfigError, match="unknown preset 'huge' for GridVAEConfig"):
        from_preset("huge")
    with pytest.raises(ValueError, match="decoder_channels"):
        GridVAEConfig(decoder_channels=(8, 4))
    with pytest.raises(ValueError, match="expects a \\(b, 1, r, r, r\\) grid"):
        GridVAE(_tiny()).encode(torch.zeros(1, 2, 16, 16, 16))
    assert set(PRESETS) >= {"tiny", "trellis", "sdf64", "sdf128"}
    assert from_dict(GridVAEConfig, to_dict(from_preset("sdf128"))) == from_preset("sdf128")


# ---------------------------------------------------------------------------------------------------
# Decoder output -> marching-cubes field
# ---------------------------------------------------------------------------------------------------


def test_grid_to_field_occupancy_cell_convention():
    from skimage import measure

    r, rad = 24, 0.6
    d = np.linalg.norm(grid.cell_centers(r).reshape(r, r, r, 3), axis=-1) - rad
    logits = torch.tensor(np.where(d < 0, 8.0, -8.0)[None, None], dtype=torch.float32)
    fields, fb = grid_to_field(logits, "occupancy")
    assert fields.shape == (1, r + 2, r + 2, r + 2)
    h = 2.0 / r
    assert np.isclose(fb, 1.0 + h / 2)
    # node i of the returned grid sits at -fb + i * h: the cell centre of voxel i - 1
    v, _, _, _ = measure.marching_cubes(fields[0], 0.0)
    world = grid.index_to_world(v, r + 1, fb)
    radius = np.linalg.norm(world, axis=1)
    # the 0.5 iso-surface of a voxelised ball passes through voxel faces: within one voxel of the sphere
    assert abs(radius.mean() - rad) < h / 2 and np.abs(radius - rad).max() < h
    # the mesh path agrees with the shared cell-grid voxel mesher (same half-cell-shift convention)
    from shapeflow.geometry.marching_cubes import voxels_to_mesh

    (v1, f1), = grid_to_mesh(logits * 3, "occupancy")  # logits +-24: probabilities 0/1 to float32 precision
    v2, f2 = voxels_to_mesh(d < 0)
    assert v1.shape == v2.shape and f1.shape == f2.shape
    np.testing.assert_allclose(np.sort(v1, axis=0), np.sort(v2, axis=0), atol=1e-5)


def test_grid_to_field_sdf_is_node_grid_as_is():
    from skimage import measure

    r, rad = 16, 0.55
    sdf = np.linalg.norm(grid.node_points(r).reshape(r + 1, r + 1, r + 1, 3), axis=-1) - rad
    fields, fb = grid_to_field(torch.tensor(sdf[None, None], dtype=torch.float32), "sdf")
    assert fb == 1.0 and fields.shape == (1, r + 1, r + 1, r + 1)
    v, _, _, _ = measure.marching_cubes(fields[0], 0.0)
    assert np.abs(np.linalg.norm(grid.index_to_world(v, r, fb), axis=1) - rad).max() < 0.02
    (v2, _), = grid_to_mesh(torch.tensor(sdf[None, None], dtype=torch.float32), "sdf")
    assert np.abs(np.linalg.norm(v2, axis=1) - rad).max() < 0.02
    with pytest.raises(ValueError, match="input_kind"):
        grid_to_field(torch.zeros(1, 1, 2, 2, 2), "points")


def test_fully_convolutional_sizes_round_trip():
    m = GridVAE(from_preset("sdf64", resolution=16))  # factor 4, config pad 3 (17 -> 20)
    x = torch.zeros(1, 1, 12, 16, 9)
    out, post = m(x)
    assert post.mean.shape == (1, 8, 3, 4, 3) and out.shape == x.shape
    with pytest.raises(ValueError, match="exceeds the decoded grid"):
        m.decode(post.mode(), size=20)


@pytest.mark.slow
def test_overfit_sdf_grid():
    """SDF grid in, SDF grid out: 150 Adam steps on 3 analytic SDFs on a 17^3 node grid."""
    torch.manual_seed(0)
    r = 16
    p = grid.node_points(r).reshape(r + 1, r + 1, r + 1, 3).astype(np.float64)
    sdfs = [np.linalg.norm(p - [0.1, 0, 0], axis=-1) - 0.6,
            np.linalg.norm(np.maximum(np.abs(p) - [0.5, 0.3, 0.7], 0), axis=-1)
            + np.minimum((np.abs(p) - [0.5, 0.3, 0.7]).max(-1), 0),
            np.sqrt((np.linalg.norm(p[..., [0, 2]], axis=-1) - 0.55) ** 2 + p[..., 1] ** 2) - 0.3]
    x = torch.tensor(np.stack(sdfs)[:, None], dtype=torch.float32)
    cfg = from_preset("sdf64", resolution=r, sdf_truncation=0.25, channels=(8, 16, 32))
    m = GridVAE(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(150):
        loss, logs = grid_vae_loss(m, {"grid": x}, generator=gen)
        first = logs["l1"].item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        y = m.decode(m.encode(x).mode())
    band = x.abs() < cfg.sdf_truncation
    assert logs["l1"].item() < 0.1 * first
    assert ((y < 0) == (x < 0))[band].float().mean() > 0.9
    assert (y - x)[band].abs().mean() < 0.5 * grid.spacing(r)  # world units, within half a node spacing
