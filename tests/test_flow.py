"""The rectified-flow convention (t = 0 noise, t = 1 data), time sampling, loss and latent normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from shapeflow import flow
from shapeflow.flow import (
    FlowConfig,
    LatentNormalizer,
    drop_condition,
    flow_matching_loss,
    interpolate,
    sample_t,
    shift_time,
    target_velocity,
)


def _pair(seed=0, shape=(4, 16, 3)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5 + 2.0


def test_interpolate_endpoints_are_noise_then_data():
    noise, data = _pair()
    assert torch.equal(interpolate(noise, data, 0.0), noise)
    assert torch.equal(interpolate(noise, data, 1.0), data)
    assert flow.NOISE_T == 0.0 and flow.DATA_T == 1.0
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    x = interpolate(noise, data, t)
    assert torch.equal(x[0], noise[0]) and torch.equal(x[1], data[1])


def test_velocity_is_finite_difference_of_the_path():
    noise, data = _pair(1)
    noise, data = noise.double(), data.double()
    v = target_velocity(noise, data)
    assert torch.equal(v, data - noise)
    for t in (0.1, 0.5, 0.9):
        h = 1e-6
        fd = (interpolate(noise, data, t + h) - interpolate(noise, data, t - h)) / (2 * h)
        torch.testing.assert_close(fd, v, atol=1e-8, rtol=1e-8)


def test_euler_with_exact_velocity_maps_noise_to_data():
    noise, data = _pair(2)
    x = noise.clone()
    steps = 7
    for k in range(steps):
        t = k / steps
        # the exact conditional velocity, evaluated from the current point (constant along the path)
        v = (data - x) / (1 - t)
        x = x + v / steps
    torch.testing.assert_close(x, data, atol=1e-5, rtol=1e-5)


def test_interpolate_rejects_bad_shapes():
    noise, data = _pair()
    with pytest.raises(ValueError):
        interpolate(noise, data[:2], 0.5)
    with pytest.raises(ValueError):
        interpolate(noise, data, torch.rand(3))


def test_uniform_t_statistics():
    t = sample_t(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01


def test_logit_normal_statistics_are_in_sigma():
    g = torch.Generator().manual_seed(0)
    t = sample_t(40000, "logit_normal", mean=0.0, std=1.0, generator=g)
    logit_sigma = torch.log((1 - t) / t)
    assert abs(logit_sigma.mean().item()) < 0.02
    assert abs(logit_sigma.std().item() - 1.0) < 0.02
    # TRELLIS's logitNormal(mean=1) favours noise: median t = 1 - sigmoid(1) ~= 0.269
    t1 = sample_t(40000, "logit_normal", mean=1.0, std=1.0, generator=g)
    assert abs(t1.median().item() - (1 - 1 / (1 + math.exp(-1.0)))) < 0.01


def test_shift_moves_time_toward_noise():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:-1] < t[1:-1])  # closer to the noise end
    assert abs(shift_time(0.5, 3.0) - 0.25) < 1e-12
    # identical to the SD3 formula applied to sigma = 1 - t
    sigma = 1 - t
    sd3 = 3.0 * sigma / (1 + 2.0 * sigma)
    torch.testing.assert_close(1 - sd3, s)
    assert torch.equal(shift_time(t, 1.0), t)
    # training times follow it too
    g = torch.Generator().manual_seed(0)
    assert sample_t(5000, "uniform", shift=3.0, generator=g).mean() < 0.4
    with pytest.raises(ValueError):
        shift_time(t, 0.0)
    with pytest.raises(ValueError):
        sample_t(4, "cosine")


def test_drop_condition_rate_and_null():
    g = torch.Generator().manual_seed(0)
    cond = torch.ones(4000, 3, 2)
    out = drop_condition(cond, 0.1, generator=g)
    dropped = (out.flatten(1) == 0).all(1)
    kept = (out.flatten(1) == 1).all(1)
    assert torch.all(dropped | kept)
    assert 0.08 < dropped.float().mean().item() < 0.12
    labels = torch.arange(1000) % 5
    lab = drop_condition(labels, 0.5, null=torch.full_like(labels, 5), generator=g)
    assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 4, 5} and (lab == 5).any()
    assert torch.equal(lab[lab != 5], labels[lab != 5])
    lab2 = drop_condition(labels, 0.5, null=5, generator=torch.Generator().manual_seed(3))
    assert (lab2 == 5).any() and torch.equal(lab2[lab2 != 5], labels[lab2 != 5])
    with pytest.raises(ValueError):
        drop_condition(labels, 0.5)  # labels need the null index
    assert drop_condition(cond, 0.0) is cond and drop_condition(None, 0.5) is None


def test_loss_is_zero_for_the_exact_velocity_and_logs_bins():
    noise, data = _pair(3)
    t = torch.tensor([0.05, 0.3, 0.55, 0.95])

    def exact(x, tt, cond):  # knows the noise: returns data - noise exactly
        return data - noise

    loss, terms = flow_matching_loss(exact, data, noise=noise, t=t, config=FlowConfig(log_bins=4))
    assert loss.item() == 0.0 and torch.equal(terms.per_sample, torch.zeros(4)) and torch.equal(terms.t, t)

    def zero(x, tt, cond):
        return torch.zeros_like(x)

    loss, terms = flow_matching_loss(zero, data, noise=noise, t=t, config=FlowConfig(log_bins=4))
    torch.testing.assert_close(loss, (data - noise).pow(2).mean())
    per = (data - noise).pow(2).flatten(1).mean(1)
    assert not terms.per_sample.requires_grad
    torch.testing.assert_close(terms.per_sample, per)
    # bands of t (band 0 the noise end): one sample in each of 4 bands; with 2 bands, two in each
    sums, counts = terms.by_time(4)
    torch.testing.assert_close(sums, per)
    torch.testing.assert_close(counts, torch.ones(4))
    sums, counts = terms.by_time(2)
    torch.testing.assert_close(sums, torch.stack([per[0] + per[1], per[2] + per[3]]))
    torch.testing.assert_close(counts, torch.tensor([2.0, 2.0]))


def test_loss_feeds_the_model_the_path_point_and_drops_conditions():
    data = torch.randn(64, 5)
    seen = {}

    def spy(x, t, cond):
        seen["x"], seen["t"], seen["cond"] = x, t, cond
        return torch.zeros_like(x)

    noise = torch.randn(64, 5)
    t = torch.rand(64)
    cond = torch.ones(64, 2, 3)
    flow_matching_loss(spy, data, cond, noise=noise, t=t, config=FlowConfig(cond_dropout=0.5),
                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["x"], (1 - t[:, None]) * noise + t[:, None] * data)
    zeroed = (seen["cond"].flatten(1) == 0).all(1)
    assert 0 < zeroed.sum() < 64


def test_latent_normalizer_channel_global_scale_roundtrip():
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    std = torch.tensor([0.5, 3.0, 1.0])
    z = torch.randn(200, 32, 3, generator=g) * std + mean  # token latents (b, m, c)
    norm = LatentNormalizer.fit(z, mode="channel", channel_dim=-1)
    torch.testing.assert_close(norm.mean, mean, atol=0.05, rtol=0)
    torch.testing.assert_close(norm.std, std, rtol=0.03, atol=0)
    zn = norm.normalize(z)
    torch.testing.assert_close(zn.mean((0, 1)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(zn.std((0, 1)), torch.ones(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(norm.denormalize(zn), z, atol=1e-5, rtol=1e-5)
    # iterable of batches == one tensor; dict round trip
    norm2 = LatentNormalizer.fit([z[:50], z[50:]], mode="channel")
    torch.testing.assert_close(norm2.mean, norm.mean)
    back = LatentNormalizer.from_dict(norm.to_dict())
    torch.testing.assert_close(back.normalize(z), zn)
    # grid latents: channels on dim 1
    grid = torch.randn(10, 3, 4, 4, 4, generator=g) * std[:, None, None, None] + mean[:, None, None, None]
    ng = LatentNormalizer.fit(grid, mode="channel", channel_dim=1)
    torch.testing.assert_close(ng.normalize(grid).mean((0, 2, 3, 4)), torch.zeros(3), atol=1e-4, rtol=0)
    # scale factor: no shift, unit std
    ns = LatentNormalizer.fit(z * 4.0, mode="scale")
    assert ns.mean.item() == 0.0
    assert ns.normalize(z * 4.0).std().item() == pytest.approx(1.0, rel=1e-3)
    assert ns.scale_factor == pytest.approx(1.0 / (z * 4.0).std().item(), rel=1e-3)
    with pytest.raises(ValueError):
        norm.normalize(torch.randn(2, 5, 4))  # wrong channel count
    with pytest.raises(ValueError):
        LatentNormalizer.from_dict({"mode": "channel", "mean": [0.0], "std": [1.0], "extra": 1})


def test_match_tokens_is_the_optimal_per_sample_permutation():
    import itertools

    g = torch.Generator().manual_seed(5)
    noise, data = torch.randn(3, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    matched = flow.match_tokens(noise, data)
    for b in range(3):
        cost = torch.cdist(noise[b], data[b]).pow(2)
        best = min(sum(cost[i, p[i]].item() for i in range(5)) for p in itertools.permutations(range(5)))
        assert (noise[b] - matched[b]).pow(2).sum().item() == pytest.approx(best, rel=1e-6)
        # the same set of tokens, only reordered
        assert torch.equal(matched[b][torch.argsort(matched[b][:, 0])], data[b][torch.argsort(data[b][:, 0])])
    # data that is the noise reordered is matched back exactly
    perm = torch.randperm(5, generator=g)
    assert torch.equal(flow.match_tokens(noise, noise[:, perm]), noise)
    with pytest.raises(ValueError, match="one shape"):
        flow.match_tokens(noise, data[:, :4])


def test_set_coupling_trains_on_the_matched_tokens():
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(4, 8, 3, generator=g)
    data = noise[:, torch.randperm(8, generator=g)] + 1.0  # each data token is one noise token shifted by 1
    t = torch.full((4,), 0.5)
    seen = []

    def model(x, tt, cond):
        seen.append(x)
        return torch.ones_like(x)  # the velocity of the matched pairs: data - noise = 1 everywhere

    loss, _ = flow_matching_loss(model, data, noise=noise, t=t, config=FlowConfig(set_coupling="ot"))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(seen[0], noise + 0.5)
    loss, _ = flow_matching_loss(model, data, noise=noise, t=t, config=FlowConfig())
    assert loss.item() > 0.5  # unmatched, the pairs are arbitrary
    with pytest.raises(ValueError, match="set_coupling"):
        FlowConfig(set_coupling="sinkhorn")


def test_set_coupling_is_refused_for_grid_dits():
    from types import SimpleNamespace

    from shapeflow.models.dit import GridDiT
    from shapeflow.train.task_dit import _build_model

    cfg = SimpleNamespace(objective=FlowConfig(set_coupling="ot"))
    with pytest.raises(ValueError, match="only a token DiT"):
        _build_model(GridDiT)(cfg)
