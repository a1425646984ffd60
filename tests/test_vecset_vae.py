"""VecSet VAE: embedding, FPS, shapes, gradients, KL, overfitting, checkpoints and the Hunyuan3D release."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import yaml
from conftest import TINY_VECSET

from shapeflow.checkpoint import CheckpointError
from shapeflow.config import ConfigError, preset
from shapeflow.geometry.sampling import farthest_points
from shapeflow.models import load_vae
from shapeflow.models.distributions import DiagonalGaussian
from shapeflow.models.pretrained.hunyuan_vae import (
    convert_state_dict,
    interleaved_to_blocked,
    release_from_state_dict,
)
from shapeflow.models.vecset_losses import VecSetLossConfig, field_target, vecset_vae_loss
from shapeflow.models.vecset_vae import VecSetVAE, VecSetVAEConfig, fps_indices, select_query_indices
from shapeflow.nn.blocks import attention_with_distance_penalty, distance_bias
from shapeflow.nn.embeddings import FourierEmbedder

# the public-checkpoint layout (no position bias) unless a test asks for it
TINY = dict(TINY_VECSET, position_bias=False)


def tiny_model(seed: int = 0, **overrides) -> VecSetVAE:
    torch.manual_seed(seed)
    return VecSetVAE.from_preset("tiny", **{**TINY, **overrides})


def load_hunyuan(sd: dict, **overrides) -> VecSetVAE:
    """A VecSetVAE from an in-memory Hunyuan3D state dict (architecture read from the shapes)."""
    return VecSetVAE.from_release(release_from_state_dict(sd), **overrides)


def sphere_batch(b: int = 2, n: int = 256, q: int = 200, radius: float = 0.6, seed: int = 0) -> dict:
    """Surface samples of a sphere ([xyz, normal, sharp flag]) and labelled query points."""
    g = torch.Generator().manual_seed(seed)
    d = F.normalize(torch.randn(b, n, 3, generator=g), dim=-1)
    sharp = (torch.rand(b, n, 1, generator=g) < 0.25).float()
    surface = torch.cat([d * radius, d, sharp], dim=-1)  # (b, n, 7)
    uni = torch.rand(b, q // 2, 3, generator=g) * 2 - 1
    dn = F.normalize(torch.randn(b, q - q // 2, 3, generator=g), dim=-1)
    near = dn * (radius + 0.02 * torch.randn(b, q - q // 2, 1, generator=g))
    points = torch.cat([uni, near], dim=1)
    sdf = points.norm(dim=-1) - radius
    groups = torch.cat([torch.zeros(b, q // 2), torch.ones(b, q - q // 2)], dim=1).to(torch.uint8)
    return dict(surface=surface, points=points, sdf=sdf, groups=groups)


# ---------------------------------------------------------------------------------------------
# Embedding, config
# ---------------------------------------------------------------------------------------------


def test_fourier_embedding_formula_and_order():
    x = torch.tensor([[0.1, -0.2, 0.3], [0.7, 0.0, -0.9]])
    emb = FourierEmbedder(8)
    out = emb(x)
    assert emb.out_dim == 51 and out.shape == (2, 51)
    for r in range(2):
        prods = [x[r, i].item() * 2.0 ** k for i in range(3) for k in range(8)]  # input-dim major
        expected = [*x[r].tolist(), *map(math.sin, prods), *map(math.cos, prods)]
        np.testing.assert_allclose(out[r].numpy(), expected, rtol=1e-6, atol=1e-6)
    with_pi = FourierEmbedder(2, include_pi=True)(x[:1])
    np.testing.assert_allclose(with_pi[0, 3].item(), math.sin(0.1 * math.pi), rtol=1e-6)
    assert FourierEmbedder(4, include_input=False)(x).shape == (2, 24)
    assert "frequencies" not in emb.state_dict()


def test_presets_and_config_validation():
    large = preset(VecSetVAEConfig, "large")
    assert (large.num_tokens, large.latent_channels, large.width, large.heads) == (4096, 64, 1024, 16)
    assert (large.encoder_layers, large.decoder_layers) == (8, 16)
    assert (large.fourier_dim, large.point_feats) == (51, 4)
    assert (large.surface_points, large.sharp_points) == (81920, 0)  # Hunyuan3D-2.1 inference input
    assert large.qk_norm == "layer" and not large.qkv_bias and not large.include_pi
    assert set(VecSetVAEConfig.PRESETS) == {"tiny", "base", "large"}
    assert preset(VecSetVAEConfig, "tiny").position_bias and not large.position_bias
    assert not preset(VecSetVAEConfig, "base").position_bias
    with pytest.raises(ValueError, match="not divisible"):
        VecSetVAEConfig(width=30, heads=4)
    with pytest.raises(ConfigError, match=r"widht: unknown key \(did you mean width\?\)"):
        preset(VecSetVAEConfig, "tiny", widht=64)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset(VecSetVAEConfig, "huge")


def test_the_token_count_is_checked_in_one_place():
    """num_tokens must lie in [1, surface_points + sharp_points]: the config refuses anything else."""
    c = VecSetVAEConfig(num_tokens=64, surface_points=48, sharp_points=16)
    assert c.input_points == 64 and c.check_num_tokens(None) == 64 and c.check_num_tokens(10) == 10
    with pytest.raises(ValueError, match=r"num_tokens 65 exceeds the 64 encoder input points"):
        VecSetVAEConfig(num_tokens=65, surface_points=48, sharp_points=16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_tokens must be an integer >= 1"):
            c.check_num_tokens(bad)


# ---------------------------------------------------------------------------------------------
# Query selection
# ---------------------------------------------------------------------------------------------


def test_query_selection_is_fps_and_splits_sharp_points_proportionally():
    rng = np.random.default_rng(0)
    n = 400
    pts = rng.normal(size=(n, 7)).astype(np.float32)
    pts[:, 6] = 0.0
    pts[300:, 6] = 1.0  # a quarter of the points are sharp
    idx = select_query_indices(pts, 16, fps_ratio=4, rng=np.random.default_rng(1))
    assert len(idx) == 16 and len(set(idx.tolist())) == 16
    assert (pts[idx, 6] > 0.5).sum() == 4
    # FPS spreads queries: two far clusters, two queries -> one in each.
    two = np.concatenate([rng.normal(size=(50, 3)) * 0.01, rng.normal(size=(50, 3)) * 0.01 + 5.0])
    pick = fps_indices(two, 2, np.random.default_rng(0))
    assert {int(p) // 50 for p in pick} == {0, 1}
    with pytest.raises(ValueError, match="exceeds"):
        select_query_indices(pts, n + 1, fps_ratio=4, rng=np.random.default_rng(0))


def test_query_selection_is_seeded():
    m, batch = tiny_model(), sphere_batch()
    a = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(3))
    b = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 16) and torch.equal(a, b)


def test_exact_fps_starts_where_told_and_breaks_ties_to_the_lowest_index():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 3))
    idx = farthest_points(pts, 20, start=7)
    assert idx[0] == 7 and len(set(idx.tolist())) == 20
    # brute force: each next point maximises the distance to the chosen set
    chosen = [7]
    for _ in range(19):
        d = np.min(np.linalg.norm(pts[:, None] - pts[chosen][None], axis=-1), axis=1)
        chosen.append(int(np.argmax(d)))
    assert idx.tolist() == chosen
    # the corners of a square, start at 0: the opposite corner (index 3) is farthest; then 1 and 2 tie
    square = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert farthest_points(square, 4).tolist() == [0, 3, 1, 2]
    with pytest.raises(ValueError, match="start index 9"):
        farthest_points(square, 2, start=9)


def test_deterministic_queries_ignore_the_rng_and_start_at_each_groups_first_point():
    m, batch = tiny_model(), sphere_batch()
    a = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(1), deterministic=True)
    b = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(2), deterministic=True)
    assert torch.equal(a, b)
    for i in range(2):
        s = batch["surface"][i].numpy()
        uniform, sharp = np.flatnonzero(s[:, 6] < 0.5), np.flatnonzero(s[:, 6] > 0.5)
        n_sharp = int((s[a[i].numpy(), 6] > 0.5).sum())
        expected = np.concatenate([uniform[farthest_points(s[uniform, :3], 16 - n_sharp)],
                                   sharp[farthest_points(s[sharp, :3], n_sharp)]])
        assert a[i].tolist() == expected.tolist() and a[i, 0] == uniform[0]
    with torch.no_grad():
        z1 = m.encode(batch["surface"], deterministic=True).mode()
        z2 = m.encode(batch["surface"], generator=torch.Generator().manual_seed(9), deterministic=True).mode()
    assert torch.equal(z1, z2)


# ---------------------------------------------------------------------------------------------
# Forward shapes, gradients, KL
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_shapes_through_every_stage_and_token_count_at_inference():
    m, batch = tiny_model().eval(), sphere_batch()
    post = m.encode(batch["surface"])
    assert post.mean.shape == post.logvar.shape == (2, 16, 4)
    z = post.sample(torch.Generator().manual_seed(0))
    tokens = m.decode(z)
    assert tokens.shape == (2, 16, 32)
    field = m.query(batch["points"], tokens)
    assert field.shape == (2, 200)
    out = m(batch["surface"], batch["points"])
    assert out["field"].shape == (2, 200) and out["latents"].shape == (2, 16, 4)
    # a different token count at inference (no weight depends on it)
    post40 = m.encode(batch["surface"], num_tokens=40)
    assert post40.mean.shape == (2, 40, 4)
    assert m.query(batch["points"], m.decode(post40.mode())).shape == (2, 200)
    # chunked querying equals one pass
    torch.nn.init.normal_(m.geo_decoder.output_proj.weight)
    full = m.query(batch["points"], tokens)
    chunked = m.query(batch["points"], tokens, chunk_size=37)
    np.testing.assert_allclose(chunked.numpy(), full.numpy(), atol=1e-5)
    # batch of one equals the batched result
    one = m.query(batch["points"][1:], tokens[1:])
    np.testing.assert_allclose(one.numpy(), full[1:].numpy(), atol=1e-5)


def test_untrained_model_predicts_exactly_zero():
    m, batch = tiny_model(), sphere_batch()
    assert torch.count_nonzero(m(batch["surface"], batch["points"])["field"]) == 0


def test_bad_surface_shape_is_a_clear_error():
    m = tiny_model()
    with pytest.raises(ValueError, match=r"surface must be \(b, n, >= 7\)"):
        m.encode(torch.zeros(1, 64, 6))


@pytest.mark.parametrize("extra", [{}, dict(eikonal_weight=0.1, surface_weight=1.0, normal_weight=0.5,
                                            surface_samples=64)])
def test_finite_gradients_on_every_parameter(extra):
    m, batch = tiny_model(), sphere_batch()
    torch.nn.init.normal_(m.geo_decoder.output_proj.weight, std=0.1)  # zero init would block upstream grads
    gen = torch.Generator().manual_seed(0)
    loss, logs = vecset_vae_loss(m, batch, VecSetLossConfig(**extra), generator=gen)
    loss.backward()
    assert set(logs) >= {"loss", "recon", "kl", "sign_acc", "recon_uniform", "recon_near_fine"}
    assert all(v.ndim == 0 and not v.requires_grad and math.isfinite(v.item()) for v in logs.values())
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # a constant shift of every key leaves softmax unchanged: k_norm.bias has an exactly-zero gradient
        if not name.endswith("k_norm.bias"):
            assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = sphere_batch()
    grads = []
    for ckpt in (False, True):
        m = tiny_model()
        m.grad_checkpointing = ckpt  # the training engine's switch
        assert m.grad_checkpointing == ckpt and m.decoder.blocks.gradient_checkpointing == ckpt
        torch.nn.init.normal_(m.geo_decoder.output_proj.weight, std=0.1)
        calls = []
        m.decoder.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        out = m(batch["surface"], batch["points"], query_idx=torch.arange(16).expand(2, 16),
                generator=torch.Generator().manual_seed(0))
        out["field"].square().mean().backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputes the block in backward
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_kl_matches_closed_form_and_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    kl = DiagonalGaussian(mean, logvar).kl()
    assert kl.shape == (3,)
    var = logvar.exp()
    closed = 0.5 * (mean**2 + var - 1.0 - logvar)  # KL(N(mu, var) || N(0, 1)) per element
    torch.testing.assert_close(kl, closed.flatten(1).mean(1))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, var.sqrt()),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl, ref.flatten(1).mean(1))
    # standard normal posterior: zero divergence; a shifted mean: mu^2 / 2
    assert DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3)).kl().abs().max() == 0
    shifted = DiagonalGaussian(torch.full((1, 4), 2.0), torch.zeros(1, 4))
    torch.testing.assert_close(shifted.kl(), torch.tensor([2.0]))


# ---------------------------------------------------------------------------------------------
# Loss conventions (with a stand-in model whose field is known)
# ---------------------------------------------------------------------------------------------


class _AnalyticVAE(torch.nn.Module):
    """Stand-in with the VecSetVAE interface whose field is a given function of the query points."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros(1, 1, 2))

    def forward(self, surface, points, sample_posterior=True, num_tokens=None, generator=None):
        b = surface.shape[0]
        posterior = DiagonalGaussian(self.dummy.expand(b, 4, 2), torch.zeros(b, 4, 2))
        field = self.fn(points) + 0.0 * self.dummy.sum()
        return dict(field=field, posterior=posterior, latents=posterior.mode())


def test_loss_is_zero_for_the_exact_field_in_each_convention():
    batch, r = sphere_batch(q=400), 0.6
    tau = 0.015
    sdf_model = _AnalyticVAE(lambda p: ((p.norm(dim=-1) - r).clamp(-tau, tau) / tau))
    cfg = VecSetLossConfig(truncation=tau, eikonal_weight=1.0, normal_weight=1.0, surface_weight=1.0,
                           surface_samples=64, sample_posterior=False)
    loss, logs = vecset_vae_loss(sdf_model, batch, cfg)
    assert logs["recon"] < 1e-10 and logs["sign_acc"] == 1.0
    assert logs["normal"] < 1e-6 and logs["surface"] < 1e-5 and logs["eikonal"] < 1e-6
    # the wrong sign (positive inside) is heavily penalised
    flipped = _AnalyticVAE(lambda p: -((p.norm(dim=-1) - r).clamp(-tau, tau) / tau))
    _, bad = vecset_vae_loss(flipped, batch, cfg)
    assert bad["recon"] > 1.0 and bad["sign_acc"] < 0.05 and bad["normal"] > 1.9
    # occupancy variant: the field is the logit of P(outside), negative inside
    occ = _AnalyticVAE(lambda p: 1000.0 * (p.norm(dim=-1) - r))
    _, logs = vecset_vae_loss(occ, batch, VecSetLossConfig(kind="occupancy", sample_posterior=False))
    assert logs["sign_acc"] == 1.0 and logs["recon_uniform"] < 1e-2
    assert torch.equal(field_target(torch.tensor([-0.1, 0.2]), VecSetLossConfig(kind="occupancy")),
                       torch.tensor([0.0, 1.0]))
    np.testing.assert_allclose(field_target(torch.tensor([-0.1, 0.003, 0.2]), VecSetLossConfig()).numpy(),
                               [-1.0, 0.2, 1.0], rtol=1e-6)


def test_group_weights_and_kl_weight_enter_the_total():
    batch = sphere_batch()
    model = _AnalyticVAE(lambda p: torch.zeros_like(p[..., 0]))
    cfg = VecSetLossConfig(group_weights=(1.0, 3.0, 5.0), kl_weight=0.5, sample_posterior=False)
    loss, logs = vecset_vae_loss(model, batch, cfg)
    logs = {k: v.item() for k, v in logs.items()}
    expected = logs["recon_uniform"] + 3 * logs["recon_near_fine"] + 5 * logs["recon_near_coarse"]
    assert logs["recon"] == pytest.approx(expected, rel=1e-6)
    assert logs["loss"] == pytest.approx(logs["recon"] + 0.5 * logs["kl"], rel=1e-6)
    with pytest.raises(ValueError, match="eikonal"):
        VecSetLossConfig(kind="occupancy", eikonal_weight=1.0)


def test_a_list_of_token_counts_draws_one_count_per_step():
    """``objective.num_tokens: [a, b]`` trains each step at one of the counts, drawn with the generator."""
    seen = []

    class Spy(_AnalyticVAE):
        def forward(self, surface, points, sample_posterior=True, num_tokens=None, generator=None):
            seen.append(num_tokens)
            return super().forward(surface, points, sample_posterior, num_tokens, generator)

    model, batch = Spy(lambda p: p.norm(dim=-1) - 0.6), sphere_batch()
    cfg = VecSetLossConfig(num_tokens=[8, 16], sample_posterior=False)
    assert cfg.num_tokens == (8, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        vecset_vae_loss(model, batch, cfg, generator=g)
    assert set(seen) == {8, 16} and 10 <= seen.count(8) <= 30
    seen.clear()
    vecset_vae_loss(model, batch, VecSetLossConfig(num_tokens=12, sample_posterior=False))
    assert seen == [12]
    for bad in ([], [0, 8], [8, None], [None], 2.5, True):
        with pytest.raises(ValueError, match="num_tokens"):
            VecSetLossConfig(num_tokens=bad)


def test_validation_runs_at_the_models_own_token_count_when_training_draws_from_a_list():
    """Training with ``num_tokens: [4, 12]`` still validates at the model's count (as encode-latents)."""
    from types import SimpleNamespace

    from shapeflow.train.task_vecset import validate

    model, seen = tiny_model(), []
    select = model.select_queries

    def spy(surface, num_tokens=None, *, generator=None, deterministic=False):
        seen.append(model.config.num_tokens if num_tokens is None else num_tokens)
        return select(surface, num_tokens, generator=generator, deterministic=deterministic)

    model.select_queries = spy
    cfg = SimpleNamespace(data=SimpleNamespace(val_mesh_resolution=0),
                          objective=VecSetLossConfig(num_tokens=[4, 12], sample_posterior=False))
    logs = validate(model.eval(), [sphere_batch()], cfg)
    assert seen and set(seen) == {model.config.num_tokens} == {16}  # the encode and the loss both
    assert {"iou", "iou_near", "recon"} <= set(logs)


def test_overfits_one_batch():
    m = tiny_model(latent_channels=8, position_bias=True)
    batch = sphere_batch(b=2, n=256, q=256)
    cfg = VecSetLossConfig(sample_posterior=False, truncation=0.1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    qidx = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(60):
        out = m(batch["surface"], batch["points"], query_idx=qidx, sample_posterior=False)
        loss = (out["field"] - field_target(batch["sdf"], cfg)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])  # measured: about 0.004x in 60 steps


# ---------------------------------------------------------------------------------------------
# Position-biased geometry decoder
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_position_bias_is_a_distance_penalty_on_the_logits():
    m = tiny_model(position_bias=True).eval()
    geo = m.geo_decoder
    torch.nn.init.normal_(geo.output_proj.weight)
    torch.nn.init.normal_(geo.pos_head[1].weight, std=0.3)
    # initial length scales 0.05 .. 0.4 over the heads: w = 1 / (2 s^2)
    torch.testing.assert_close(geo.pos_log_weight.exp(), torch.tensor([200.0, 3.125]))
    tokens = m.decode(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1)))
    pts = torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    # by hand: softmax(q.k / sqrt(d) - w_h |x - p_j|^2) with p = pos_head(tokens)
    ca = geo.cross_attn
    k, v = ca.context_kv(tokens)
    x = geo.query_proj(m.fourier(pts))
    q = ca.queries(x)
    pos = geo.pos_head(tokens)
    d2 = ((pts[:, :, None] - pos[:, None]) ** 2).sum(-1)  # (b, q, m)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits - geo.pos_log_weight.exp()[:, None, None] * d2[:, None]
    att = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 50, -1)
    h = x + ca.attn.to_out(att)
    h = h + ca.mlp(ca.ln_3(h))
    expected = geo.output_proj(geo.ln_post(h)).squeeze(-1)
    torch.testing.assert_close(m.query(pts, tokens), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.query(pts, tokens, chunk_size=7), expected, rtol=1e-4, atol=1e-5)
    # a very sharp penalty makes a query see only its nearest token: moving a far token changes nothing
    geo.pos_log_weight.fill_(math.log(1e4))
    near = pos[0, 3] + 0.01  # next to token 3
    far = (pos[0] - near).norm(dim=-1).argmax()
    before = m.query(near[None, None], tokens[:1])
    moved = tokens.clone()
    moved[0, far] += torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(3))
    assert (m.geo_decoder.pos_head(moved[:1])[0, far] - near).norm() > 0.5  # still far after moving
    torch.testing.assert_close(m.query(near[None, None], moved[:1]), before, rtol=0, atol=1e-5)
    assert not hasattr(tiny_model().geo_decoder, "pos_head")  # off by default (public checkpoints)


@torch.no_grad()
def test_position_bias_positions_stay_float32_under_bf16_autocast():
    m = tiny_model(position_bias=True).eval()
    torch.nn.init.normal_(m.geo_decoder.pos_head[1].weight, std=0.3)
    tokens = m.decode(torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1)))
    ref = m.geo_decoder.token_positions(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos = m.geo_decoder.context(tokens.bfloat16())[2]
    assert pos.dtype == torch.float32
    # only the bf16 rounding of the tokens themselves remains (~1e-2 relative), not a bf16 head output
    torch.testing.assert_close(pos, m.geo_decoder.token_positions(tokens.bfloat16().float()), rtol=0, atol=1e-6)
    assert (pos - ref).abs().max() < 0.05


@pytest.mark.parametrize("d", [32, 5])
def test_distance_penalty_channels_equal_the_explicit_mask(d):
    # float32 takes the extra-channel path, float64 the explicit (b, h, n, m) mask: they must agree,
    # with and without padding to a multiple of 8 channels, in values and in gradients
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n in (40, 12, 12))
    xq, xk = torch.rand(2, 40, 3, generator=g) * 2 - 1, torch.rand(2, 12, 3, generator=g) * 2 - 1
    w = torch.tensor([200.0, 12.0, 0.5])
    outs, grads = [], []
    for dtype in (torch.float32, torch.float64):
        args = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, xq, xk, w)]
        out = attention_with_distance_penalty(*args)
        out.square().sum().backward()
        outs.append(out.double())
        grads.append([a.grad.double() for a in args])
    # the extra channels carry logits of size ~w = 200 before cancellation: float32 keeps ~1e-5 of them
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=2e-4)
    for a, b in zip(*grads):  # within 1 % of each gradient's largest entry
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d) + distance_bias(xq, xk, w).double()
    torch.testing.assert_close(outs[1], logits.softmax(-1) @ v.double(), rtol=1e-9, atol=1e-9)


def test_attention_runs_in_float32_under_cpu_autocast(monkeypatch):
    # bf16 linears, float32 attention: the kernel must see float32 inputs, the result must equal the
    # float32 attention of the same (bf16-rounded) inputs, and it comes back in the autocast dtype
    from shapeflow.nn import attention as attn_mod

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).bfloat16() for n in (40, 12, 12))
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn_mod.sdpa(q, k, v)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16
    ref = real(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)  # only the final bf16 rounding
    # the distance-penalty attention takes the fused float32 channel path too (no explicit mask)
    xq, xk = torch.rand(2, 40, 3, generator=g) * 2 - 1, torch.rand(2, 12, 3, generator=g) * 2 - 1
    w = torch.tensor([200.0, 12.0, 0.5])
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention_with_distance_penalty(q, k, v, xq, xk, w)
    logits = q.double() @ k.double().transpose(-1, -2) / 4 + distance_bias(xq, xk, w).double()
    assert out.dtype == torch.bfloat16 and seen == [torch.float32]
    torch.testing.assert_close(out.double(), logits.softmax(-1) @ v.double(), rtol=0, atol=1e-2)
    # a whole tiny model: the residual streams stay float32 (so do the tokens the positions are read
    # from), and the field is close to the float32 one (bf16 rounding of the projections remains)
    m, batch = tiny_model(position_bias=True).eval(), sphere_batch()
    torch.nn.init.normal_(m.geo_decoder.output_proj.weight, std=0.1)
    qi = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ref = m(batch["surface"], batch["points"], sample_posterior=False, query_idx=qi)["field"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(batch["surface"], batch["points"], sample_posterior=False, query_idx=qi)["field"]
            tokens = m.decode(torch.randn(2, 16, 4, generator=g))
    assert tokens.dtype == torch.float32
    err = (low.float() - ref).abs().mean() / ref.std()
    assert err < 0.02, err


def test_a_boolean_mask_still_masks_under_cpu_autocast():
    # a boolean mask must not be cast to float (True -> +1.0 would be a bias, not a mask)
    from shapeflow.nn.attention import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (5, 6, 6))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 3:] = False
    ref = F.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


def test_position_bias_loss_term_and_gradients():
    batch = sphere_batch()
    m = tiny_model(position_bias=True)
    torch.nn.init.normal_(m.geo_decoder.output_proj.weight, std=0.1)
    totals = {}
    for w in (0.0, 2.5):
        cfg = VecSetLossConfig(kind="occupancy", position_weight=w)
        loss, logs = vecset_vae_loss(m, batch, cfg, generator=torch.Generator().manual_seed(0))
        totals[w] = (loss, logs)
    (_, logs0), (l1, logs1) = totals[0.0], totals[2.5]
    logs0, logs1 = ({k: v.item() for k, v in d.items()} for d in (logs0, logs1))
    assert logs1["position"] == pytest.approx(logs0["position"]) and logs1["position"] > 0
    assert logs1["loss"] == pytest.approx(logs0["loss"] + 2.5 * logs1["position"], rel=1e-6)
    # the term is the mean squared distance between the read positions and the tokens' FPS points
    out = m(batch["surface"], batch["points"], generator=torch.Generator().manual_seed(0))
    idx = m.select_queries(batch["surface"], generator=torch.Generator().manual_seed(0))
    fps_points = batch["surface"][..., :3].gather(1, idx[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(out["token_xyz"], fps_points)
    expected = (out["token_xyz_pred"] - out["token_xyz"]).square().sum(-1).mean().item()
    assert logs1["position"] == pytest.approx(expected, rel=1e-5)
    l1.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.geo_decoder.pos_log_weight.grad.abs().sum() > 0
    assert m.geo_decoder.pos_head[1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="position_weight"):
        VecSetLossConfig(position_weight=-1.0)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("position_bias", [False, True])
def test_save_load_identical_outputs(tmp_path, position_bias):
    m, batch = tiny_model(position_bias=position_bias).eval(), sphere_batch()
    torch.nn.init.normal_(m.geo_decoder.output_proj.weight)
    m.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["kind"] == "vecset_vae"
    m2 = VecSetVAE.from_pretrained(tmp_path / "ckpt")
    assert m2.config == m.config and not m2.training
    qidx = torch.arange(16).expand(2, 16)
    a = m(batch["surface"], batch["points"], query_idx=qidx, sample_posterior=False)["field"]
    b = m2(batch["surface"], batch["points"], query_idx=qidx, sample_posterior=False)["field"]
    assert torch.equal(a, b)
    # the training engine's layout: the model config under "model" of a resolved experiment config
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"task": "vecset_vae", "model": cfg,
                                                               "train": {"lr": 1e-4}}))
    weights = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    (tmp_path / "ckpt" / "ema.safetensors").write_bytes(weights)
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"")  # a training checkpoint: ema.safetensors is read
    m3, kind = load_vae(tmp_path / "ckpt", ema=True, num_tokens=24)
    assert kind == "vecset_vae" and m3.config.num_tokens == 24
    c = m3(batch["surface"], batch["points"], query_idx=qidx, sample_posterior=False)["field"]
    assert torch.equal(a, c)


def test_older_checkpoints_are_upgraded_with_a_log_line(tmp_path, caplog):
    """A config.json of the previous version (num_latents; encoder counts in data.n_surface / n_sharp)."""
    m = tiny_model()
    m.save_pretrained(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    fields = raw["model"]
    fields["num_latents"] = fields.pop("num_tokens")
    counts = {"n_surface": fields.pop("surface_points"), "n_sharp": fields.pop("sharp_points")}
    (tmp_path / "old" / "config.json").write_text(json.dumps({"task": "vecset_vae", "model": fields,
                                                              "data": counts}))
    with caplog.at_level("INFO"):
        old = VecSetVAE.from_pretrained(tmp_path / "old")
    assert old.config == m.config
    assert any("num_latents -> model.num_tokens" in r.getMessage() for r in caplog.records)
    assert any("data.n_surface -> model.surface_points" in r.getMessage() for r in caplog.records)


def _save_state_dict(path, sd, cfg=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    if cfg is not None:
        (path / "config.json").write_text(json.dumps(cfg))


def test_missing_extra_or_renamed_keys_raise_listing_them(tmp_path):
    m = tiny_model()
    fields = json.loads(json.dumps(preset(VecSetVAEConfig, "tiny", **TINY).__dict__))
    sd, cfg = m.state_dict(), {"kind": "vecset_vae", "model": fields}
    missing = {k: v for k, v in sd.items() if k != "decoder.blocks.0.ln_1.weight"}
    _save_state_dict(tmp_path / "a", missing, cfg)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.blocks\.0\.ln_1\.weight$"):
        VecSetVAE.from_pretrained(tmp_path / "a")
    extra = {**sd, "decoder.blocks.9.ln_1.weight": torch.ones(32)}
    _save_state_dict(tmp_path / "b", extra, cfg)
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.blocks\.9\.ln_1\.weight$"):
        VecSetVAE.from_pretrained(tmp_path / "b")
    renamed = {("post_kl.w" if k == "post_kl.weight" else k): v for k, v in sd.items()}
    _save_state_dict(tmp_path / "c", renamed, cfg)
    with pytest.raises(ValueError, match=r"missing keys: post_kl\.weight; "
                                         r"unexpected keys: post_kl\.w$"):
        VecSetVAE.from_pretrained(tmp_path / "c")
    _save_state_dict(tmp_path / "d", sd, {"kind": "vecset_vae", "model": {**fields, "width": 64}})
    with pytest.raises(ValueError, match="shape mismatch: "):
        VecSetVAE.from_pretrained(tmp_path / "d")
    _save_state_dict(tmp_path / "e", sd, {"kind": "vecset_vae", "model": {**fields, "depth": 3}})
    with pytest.raises(ConfigError, match=r"model.depth: unknown key"):
        VecSetVAE.from_pretrained(tmp_path / "e")
    _save_state_dict(tmp_path / "f", sd, {"kind": "grid_vae", "model": fields})
    with pytest.raises(CheckpointError, match="holds a grid_vae model, not a vecset_vae"):
        VecSetVAE.from_pretrained(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        VecSetVAE.from_pretrained(tmp_path / "nope")
    (tmp_path / "g").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        VecSetVAE.from_pretrained(tmp_path / "g")
    _save_state_dict(tmp_path / "h", sd, {"kind": "vecset_vae", "model": {"preset": "tiny", **TINY}})
    assert VecSetVAE.from_pretrained(tmp_path / "h").config == m.config  # a preset key expands


# ---------------------------------------------------------------------------------------------
# Hunyuan3D ShapeVAE: an independent reference forward on a state dict in their layout
# ---------------------------------------------------------------------------------------------
# Written from the facts in shared/reference/vecset.md §1.3-1.4: per-head interleaved c_qkv / c_kv
# split by view(B, N, H, k * hd).split(hd, -1); LayerNorm qk-norm (eps 1e-6) on (B, N, H, hd) before
# the head transpose; block LayerNorm eps 1e-6, ln_post eps 1e-5; exact GELU; cross block
# x + attn(ln_1(x), ln_2(data)), then x + mlp(ln_3(x)); Fourier [x, sin, cos] input-dim major;
# output positive inside.

HY = dict(width=32, heads=4, latent=8, enc=2, dec=2, freqs=8, feats=4)


def hunyuan_state_dict(seed: int = 0, decoder_only: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, hd, f_in = HY["width"], HY["width"] // HY["heads"], 3 * (2 * HY["freqs"] + 1)
    sd = {}

    def lin(name, out_f, in_f, bias=True):
        sd[f"{name}.weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
        if bias:
            sd[f"{name}.bias"] = 0.1 * torch.randn(out_f, generator=g)

    def norm(name, dim):
        sd[f"{name}.weight"] = 1.0 + 0.2 * torch.randn(dim, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(dim, generator=g)

    def mlp(p):
        lin(f"{p}.mlp.c_fc", 4 * w, w)
        lin(f"{p}.mlp.c_proj", w, 4 * w)

    def self_block(p):
        norm(f"{p}.ln_1", w)
        lin(f"{p}.attn.c_qkv", 3 * w, w, bias=False)
        lin(f"{p}.attn.c_proj", w, w)
        norm(f"{p}.attn.attention.q_norm", hd)
        norm(f"{p}.attn.attention.k_norm", hd)
        norm(f"{p}.ln_2", w)
        mlp(p)

    def cross_block(p):
        for ln in ("ln_1", "ln_2", "ln_3"):
            norm(f"{p}.{ln}", w)
        lin(f"{p}.attn.c_q", w, w, bias=False)
        lin(f"{p}.attn.c_kv", 2 * w, w, bias=False)
        lin(f"{p}.attn.c_proj", w, w)
        norm(f"{p}.attn.attention.q_norm", hd)
        norm(f"{p}.attn.attention.k_norm", hd)
        mlp(p)

    if not decoder_only:
        lin("encoder.input_proj", w, f_in + HY["feats"])
        cross_block("encoder.cross_attn")
        for i in range(HY["enc"]):
            self_block(f"encoder.self_attn.resblocks.{i}")
        norm("encoder.ln_post", w)
        lin("pre_kl", 2 * HY["latent"], w)
    lin("post_kl", w, HY["latent"])
    for i in range(HY["dec"]):
        self_block(f"transformer.resblocks.{i}")
    lin("geo_decoder.query_proj", w, f_in)
    cross_block("geo_decoder.cross_attn_decoder")
    norm("geo_decoder.ln_post", w)
    lin("geo_decoder.output_proj", 1, w)
    return sd


class HunyuanReference:
    """Hunyuan3D ShapeVAE forward, written from the reference notes (not from any model code here)."""

    def __init__(self, sd):
        self.sd, self.h = sd, HY["heads"]

    def lin(self, name, x):
        return F.linear(x, self.sd[f"{name}.weight"], self.sd.get(f"{name}.bias"))

    def ln(self, name, x, eps=1e-6):
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], eps)

    def attend(self, p, q, k, v):  # (B, N, H, hd) each, before the head transpose
        q = self.ln(f"{p}.attention.q_norm", q)
        k = self.ln(f"{p}.attention.k_norm", k)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, N, hd)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out = (w @ v).permute(0, 2, 1, 3)  # (B, N, H, hd)
        return self.lin(f"{p}.c_proj", out.reshape(*out.shape[:2], -1))

    def self_attn(self, p, x):
        b, n, c = x.shape
        hd = c // self.h
        q, k, v = self.lin(f"{p}.c_qkv", x).view(b, n, self.h, 3 * hd).split(hd, dim=-1)
        return self.attend(p, q, k, v)

    def cross_attn(self, p, x, data):
        b, n, c = x.shape
        hd = c // self.h
        q = self.lin(f"{p}.c_q", x).view(b, n, self.h, hd)
        k, v = self.lin(f"{p}.c_kv", data).view(b, data.shape[1], self.h, 2 * hd).split(hd, dim=-1)
        return self.attend(p, q, k, v)

    def mlp(self, p, x):
        return self.lin(f"{p}.c_proj", F.gelu(self.lin(f"{p}.c_fc", x)))

    def resblock(self, p, x):
        x = x + self.self_attn(f"{p}.attn", self.ln(f"{p}.ln_1", x))
        return x + self.mlp(f"{p}.mlp", self.ln(f"{p}.ln_2", x))

    def crossblock(self, p, x, data):
        x = x + self.cross_attn(f"{p}.attn", self.ln(f"{p}.ln_1", x), self.ln(f"{p}.ln_2", data))
        return x + self.mlp(f"{p}.mlp", self.ln(f"{p}.ln_3", x))

    @staticmethod
    def fourier(x):
        freqs = 2.0 ** torch.arange(HY["freqs"], dtype=x.dtype)
        emb = (x[..., None] * freqs).view(*x.shape[:-1], -1)
        return torch.cat([x, emb.sin(), emb.cos()], dim=-1)

    def encode(self, surface, query_idx):
        pc, feats = surface[..., :3], surface[..., 3:]
        data = self.lin("encoder.input_proj", torch.cat([self.fourier(pc), feats], dim=-1))
        sel = query_idx[..., None]
        qpc = pc.gather(1, sel.expand(-1, -1, 3))
        qfeats = feats.gather(1, sel.expand(-1, -1, feats.shape[-1]))
        query = self.lin("encoder.input_proj", torch.cat([self.fourier(qpc), qfeats], dim=-1))
        x = self.crossblock("encoder.cross_attn", query, data)
        for i in range(HY["enc"]):
            x = self.resblock(f"encoder.self_attn.resblocks.{i}", x)
        x = self.ln("encoder.ln_post", x, eps=1e-5)
        return self.lin("pre_kl", x).chunk(2, dim=-1)

    def decode(self, z):
        x = self.lin("post_kl", z)
        for i in range(HY["dec"]):
            x = self.resblock(f"transformer.resblocks.{i}", x)
        return x

    def query(self, points, x):
        q = self.lin("geo_decoder.query_proj", self.fourier(points))
        h = self.crossblock("geo_decoder.cross_attn_decoder", q, x)
        return self.lin("geo_decoder.output_proj", self.ln("geo_decoder.ln_post", h, eps=1e-5)).squeeze(-1)


def _hunyuan_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(2, 64, 3, generator=g) * 2 - 1
    normals = F.normalize(torch.randn(2, 64, 3, generator=g), dim=-1)
    sharp = (torch.rand(2, 64, 1, generator=g) < 0.3).float()
    surface = torch.cat([xyz, normals, sharp], dim=-1).to(dtype)
    points = (torch.rand(2, 50, 3, generator=g) * 2 - 1).to(dtype)
    qidx = torch.stack([torch.randperm(64, generator=g)[:12] for _ in range(2)])
    return surface, points, qidx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hunyuan_weights_reproduce_the_reference_forward(dtype):
    sd = hunyuan_state_dict()
    ref = HunyuanReference({k: v.to(dtype) for k, v in sd.items()})
    model = load_hunyuan(sd).to(dtype).eval()
    cfg = model.config
    assert (cfg.width, cfg.heads, cfg.encoder_layers, cfg.decoder_layers) == (32, 4, 2, 2)
    assert (cfg.latent_channels, cfg.point_feats, cfg.num_freqs, cfg.mlp_ratio) == (8, 4, 8, 4.0)
    assert cfg.latent_scale == pytest.approx(1.0039506158752403) and cfg.num_tokens == 4096
    assert model.encoder.ln_post.eps == 1e-5 and model.geo_decoder.ln_post.eps == 1e-5
    assert model.decoder.blocks[0].ln_1.eps == 1e-6 and model.decoder.blocks[0].attn.q_norm.eps == 1e-6
    surface, points, qidx = _hunyuan_inputs(dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        mean_ref, logvar_ref = ref.encode(surface, qidx)
        post = model.encode(surface, query_idx=qidx)
        torch.testing.assert_close(post.mean, mean_ref, **tol)
        torch.testing.assert_close(post.logvar, logvar_ref.clamp(-30, 20), **tol)
        tok_ref, tok = ref.decode(mean_ref), model.decode(post.mean)
        torch.testing.assert_close(tok, tok_ref, **tol)
        out_ref = ref.query(points, tok_ref)
        out = model.query(points, tok)
    assert out_ref.abs().mean() > 0.1  # a non-trivial field
    torch.testing.assert_close(out, -out_ref, **tol)  # our field is minus theirs (negative inside)


def _hunyuan_params(**overrides) -> dict:
    """ShapeVAE constructor params as a released ``config.yaml`` writes them (for the HY test sizes)."""
    return {"num_latents": 256, "embed_dim": HY["latent"], "num_freqs": HY["freqs"], "include_pi": False,
            "heads": HY["heads"], "width": HY["width"], "num_encoder_layers": HY["enc"],
            "num_decoder_layers": HY["dec"], "qkv_bias": False, "qk_norm": True, "scale_factor": 1.25,
            "geo_decoder_mlp_expand_ratio": 4, "geo_decoder_downsample_ratio": 1, "geo_decoder_ln_post": True,
            "point_feats": HY["feats"], "pc_size": 512, "pc_sharpedge_size": 128, **overrides}


def _write_release(folder, sd, params, *, target="hy3dshape.models.autoencoders.ShapeVAE", dit_folder=False):
    folder.mkdir(parents=True, exist_ok=True)
    node = {"target": target, "params": params}
    doc = {"model": {"target": "x.HunYuanDiTPlain", "params": {}}, "vae": node} if dit_folder else node
    (folder / "config.yaml").write_text(yaml.safe_dump(doc))
    fp16 = {k: v.half() for k, v in sd.items()}
    torch.save({"model": {}, "vae": fp16, "conditioner": {}} if dit_folder else fp16, folder / "model.fp16.ckpt")


def test_hunyuan_release_folder_builds_from_its_config_yaml(tmp_path):
    """``from_pretrained(<released folder>)``: config.yaml decides the architecture, scale and counts."""
    sd = hunyuan_state_dict()
    _write_release(tmp_path / "hunyuan3d-vae-v2-1", sd, _hunyuan_params())
    m = VecSetVAE.from_pretrained(tmp_path / "hunyuan3d-vae-v2-1")
    c = m.config
    assert (c.num_tokens, c.latent_scale, c.surface_points, c.sharp_points) == (256, 1.25, 512, 128)
    assert (c.width, c.heads, c.fps_ratio) == (32, 4, 20) and not m.training
    assert next(m.parameters()).dtype == torch.float32  # fp16 file, upcast
    ref = load_hunyuan(sd)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-3, atol=2e-3)  # fp16 rounding only
    vae, kind = load_vae(tmp_path / "hunyuan3d-vae-v2-1")  # the registry recognises the release too
    assert kind == "vecset_vae" and vae.config == c
    # the lone file: config.yaml beside it is read as well
    assert VecSetVAE.from_pretrained(tmp_path / "hunyuan3d-vae-v2-1" / "model.fp16.ckpt").config == c
    # a DiT folder bundles the (2.0) VAE under "vae" in both files
    _write_release(tmp_path / "dit", hunyuan_state_dict(decoder_only=True), _hunyuan_params(scale_factor=0.5),
                   dit_folder=True)
    dec = VecSetVAE.from_pretrained(tmp_path / "dit")
    assert dec.config.decoder_only and dec.config.latent_scale == 0.5 and dec.config.encoder_layers == 0


def test_hunyuan_release_config_errors_name_the_file_and_the_problem(tmp_path):
    sd = hunyuan_state_dict()
    _write_release(tmp_path / "a", sd, _hunyuan_params(width=64, heads=8))  # config disagrees with the weights
    with pytest.raises(CheckpointError, match=r"model.fp16.ckpt: weights do not match the model; .*shape mismatch"):
        VecSetVAE.from_pretrained(tmp_path / "a")
    _write_release(tmp_path / "b", sd, _hunyuan_params(mystery=1))
    with pytest.raises(ValueError, match=r"b/config.yaml: unknown ShapeVAE params \['mystery'\]"):
        VecSetVAE.from_pretrained(tmp_path / "b")
    _write_release(tmp_path / "c", sd, _hunyuan_params(geo_decoder_downsample_ratio=2))
    with pytest.raises(ValueError, match=r"c/config.yaml: ShapeVAE settings not supported .*downsample_ratio"):
        VecSetVAE.from_pretrained(tmp_path / "c")
    params = _hunyuan_params()
    del params["width"]
    _write_release(tmp_path / "d", sd, params)
    with pytest.raises(ValueError, match=r"d/config.yaml: ShapeVAE params lack \['width'\]"):
        VecSetVAE.from_pretrained(tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.yaml").write_text(yaml.safe_dump({"target": "x.ShapeVAE", "params": {}}))
    with pytest.raises(FileNotFoundError, match="no model.fp16.ckpt"):
        VecSetVAE.from_pretrained(tmp_path / "e")


def test_hunyuan_file_formats_prefix_fp16_and_decoder_only(tmp_path):
    from safetensors.torch import save_file

    sd = hunyuan_state_dict()
    surface, points, qidx = _hunyuan_inputs(torch.float32)
    base = load_hunyuan(sd)
    # pipeline single-file layout: "vae." prefix next to other components, stored in fp16
    single = {f"vae.{k}": v.half() for k, v in sd.items()}
    single["model.x_embedder.weight"] = torch.zeros(2, 2, dtype=torch.float16)
    save_file(single, str(tmp_path / "model.fp16.safetensors"))
    m16 = VecSetVAE.from_pretrained(tmp_path / "model.fp16.safetensors")
    assert next(m16.parameters()).dtype == torch.float32
    with torch.no_grad():
        a = base.query(points, base.decode(base.encode(surface, query_idx=qidx).mode()))
        b = m16.query(points, m16.decode(m16.encode(surface, query_idx=qidx).mode()))
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # fp16 weights: close, not equal
    # torch .ckpt with {"vae": state_dict}
    torch.save({"vae": sd, "model": {}}, tmp_path / "h2.ckpt")
    mck = VecSetVAE.from_pretrained(tmp_path / "h2.ckpt", num_tokens=512)
    assert mck.config.num_tokens == 512
    for (k1, v1), (k2, v2) in zip(base.state_dict().items(), mck.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # Hunyuan3D-2.0: decoder only -> a decoder-only model whose encode raises
    dec = load_hunyuan(hunyuan_state_dict(decoder_only=True))
    assert dec.config.decoder_only and dec.config.latent_scale == pytest.approx(0.9990943042622529)
    assert not any(k.startswith(("encoder.", "pre_kl")) for k in dec.state_dict())
    with pytest.raises(RuntimeError, match="decoder-only"):
        dec.encode(surface)
    assert dec.query(points[:1], dec.decode(torch.zeros(1, 6, 8))).shape == (1, 50)


def test_hunyuan_bad_state_dicts_list_the_keys():
    sd = hunyuan_state_dict()
    sd.pop("transformer.resblocks.1.mlp.c_fc.bias")
    with pytest.raises(ValueError, match=r"missing keys: decoder\.blocks\.1\.mlp\.fc1\.bias$"):
        load_hunyuan(sd)
    sd = hunyuan_state_dict()
    sd["geo_decoder.extra_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"unexpected keys: geo_decoder\.extra_proj\.weight$"):
        load_hunyuan(sd)
    sd = hunyuan_state_dict()
    sd["encoder.cross_attn.attn.c_q_renamed.weight"] = sd.pop("encoder.cross_attn.attn.c_q.weight")
    with pytest.raises(ValueError, match=r"missing keys: encoder\.cross_attn\.attn\.to_q\.weight; "
                                         r"unexpected keys: encoder\.cross_attn\.attn\.c_q_renamed\.weight$"):
        load_hunyuan(sd)


def test_interleaved_qkv_permutation():
    heads, hd = 3, 2
    # row labels: 100 * part + 10 * head + channel, in Hunyuan's [h: q, k, v] order
    rows = torch.tensor([100 * p + 10 * h + d for h in range(heads) for p in range(3) for d in range(hd)])
    out = interleaved_to_blocked(rows[:, None].float(), heads, 3)[:, 0].long()
    expected = torch.tensor([100 * p + 10 * h + d for p in range(3) for h in range(heads) for d in range(hd)])
    assert torch.equal(out, expected)
    conv = convert_state_dict(hunyuan_state_dict(), HY["heads"])
    original = hunyuan_state_dict()["geo_decoder.output_proj.bias"]
    assert torch.equal(conv["geo_decoder.output_proj.bias"], -original)
