"""Samplers: convergence on an analytic flow, guidance, guidance interval, NFE accounting, determinism."""

from __future__ import annotations

import pytest
import torch

from shapeflow.sampling import initial_noise, num_evaluations, sample, time_grid

MU, S = 1.5, 0.3  # data ~ N(MU, S^2) per element, noise ~ N(0, 1)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """Exact marginal velocity E[data - noise | x_t = x] of N(0, 1) -> N(MU, S^2) on x_t = (1-t) n + t d.

    x_t ~ N(t MU, s_t^2) with s_t^2 = (1-t)^2 + t^2 S^2, and v = MU + (t S^2 - (1-t)) / s_t^2 (x - t MU).
    Its flow maps a noise value n to MU + S n at t = 1 (the monotone Gaussian transport).
    """
    t = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    var = (1 - t) ** 2 + t**2 * S**2
    return MU + (t * S**2 - (1 - t)) / var * (x - t * MU)


def _err(method, steps, shift=1.0):
    noise = initial_noise((256, 4), seed=0, dtype=torch.float64)
    out = sample(gaussian_velocity, noise, steps=steps, method=method, shift=shift)
    return (out - (MU + S * noise)).abs().max().item()


def test_time_grid_endpoints_monotone_and_shift():
    g = time_grid(10)
    assert g.shape == (11,) and g[0] == 0 and g[-1] == 1 and torch.all(g[1:] > g[:-1])
    gs = time_grid(10, shift=3.0)
    assert gs[0] == 0 and gs[-1] == 1 and torch.all(gs[1:-1] < g[1:-1])  # more steps near noise
    with pytest.raises(ValueError):
        time_grid(0)


def test_euler_is_first_order_heun_second_order():
    e16, e32 = _err("euler", 16), _err("euler", 32)
    h16, h32 = _err("heun", 16), _err("heun", 32)
    m16, m32 = _err("midpoint", 16), _err("midpoint", 32)
    assert 1.7 < e16 / e32 < 2.3  # error halves
    assert h16 / h32 > 3.2  # error about quarters
    assert m16 / m32 > 3.2
    assert _err("heun", 200) < 1e-4 and _err("midpoint", 200) < 1e-6


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_beats_euler_at_equal_evaluations(shift):
    for steps in (2, 4, 8, 16):
        nfe = num_evaluations(steps, "heun")
        assert nfe == num_evaluations(steps, "midpoint") == 2 * steps
        euler = _err("euler", nfe, shift)
        assert _err("heun", steps, shift) < 0.5 * euler
        assert _err("midpoint", steps, shift) < 0.5 * euler


def test_nfe_accounting_and_evaluation_times():
    calls = []

    def v(x, t, cond):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    noise = torch.randn(3, 5)
    for method in ("euler", "heun", "midpoint"):
        calls.clear()
        out, stats = sample(v, noise, steps=6, method=method, return_stats=True)
        assert torch.equal(out, noise)  # zero velocity leaves the noise unchanged
        assert stats.nfe == len(calls) == num_evaluations(6, method) == stats.model_calls
        assert stats.rows == 3 * len(calls)
        last = {"euler": 5 / 6, "heun": 1.0, "midpoint": 11 / 12}[method]  # heun's last corrector is at t = 1
        assert min(calls) == 0.0 and max(calls) == pytest.approx(last, abs=1e-6)


def test_cfg_scale_one_is_exactly_conditional():
    rows = []

    def v(x, t, cond):
        rows.append(x.shape[0])
        return cond[:, None] * x + torch.sin(3 * t)[:, None]

    noise = initial_noise((4, 6), seed=1)
    cond, null = torch.tensor([0.5, -1.0, 2.0, 0.1]), torch.zeros(4)
    plain = sample(v, noise, steps=8, cond=cond)
    rows.clear()
    guided1 = sample(v, noise, steps=8, cond=cond, null_cond=null, cfg_scale=1.0, method="euler")
    assert torch.equal(plain, guided1)
    assert rows == [4] * 8  # the unconditional branch was never evaluated


def test_cfg_formula_and_single_batched_call():
    rows = []

    def v(x, t, cond):
        rows.append(x.shape[0])
        return cond[:, None].expand_as(x).clone()  # constant velocity = condition value

    noise = torch.zeros(2, 3)
    cond, null = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    out = sample(v, noise, steps=4, cond=cond, null_cond=null, cfg_scale=3.0)
    # integrates u + w (c - u) over t in [0, 1]
    expected = (null + 3.0 * (cond - null))[:, None].expand(2, 3)
    torch.testing.assert_close(out, expected)
    assert rows == [4] * 4  # cond and uncond in one call of 2b rows
    # a one-row null condition is broadcast
    out2 = sample(v, noise, steps=4, cond=cond, null_cond=null[:1], cfg_scale=3.0)
    torch.testing.assert_close(out2, expected)


def test_cfg_interval_applies_guidance_only_inside():
    seen = []

    def v(x, t, cond):
        seen.append((round(float(t[0]), 6), x.shape[0]))
        return cond[:, None].expand_as(x).clone()

    noise = torch.zeros(2, 1)
    cond, null = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    out, stats = sample(v, noise, steps=4, cond=cond, null_cond=null, cfg_scale=5.0, cfg_interval=(0.0, 0.5),
                        return_stats=True)
    assert seen == [(0.0, 4), (0.25, 4), (0.5, 4), (0.75, 2)]
    assert stats.guided_evaluations == 3 and stats.rows == 14
    # guided velocity 5 for 3 steps of 0.25, conditional velocity 1 for the last
    torch.testing.assert_close(out, torch.full((2, 1), 5 * 0.75 + 0.25))
    # an interval that excludes every step equals plain conditional sampling
    plain = sample(v, noise, steps=4, cond=cond)
    none = sample(v, noise, steps=4, cond=cond, null_cond=null, cfg_scale=5.0, cfg_interval=(0.9, 1.0))
    assert torch.equal(plain, none)


def test_determinism_given_a_seed():
    def v(x, t, cond):
        return -x + torch.cos(5 * t)[:, None, None]

    a = sample(v, (3, 4, 2), steps=5, method="heun", seed=7)
    b = sample(v, (3, 4, 2), steps=5, method="heun", seed=7)
    c = sample(v, (3, 4, 2), steps=5, method="heun", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample seeds: a sample does not depend on its batch
    n = initial_noise((3, 4), seed=[10, 11, 12])
    assert torch.equal(n[1:2], initial_noise((1, 4), seed=[11]))
    with pytest.raises(ValueError):
        initial_noise((2, 4), seed=[1])


def test_bad_arguments():
    v = lambda x, t, c: x  # noqa: E731
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="null_cond"):
        sample(v, noise, steps=2, cond=torch.ones(2), cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        sample(v, noise, steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="sampler"):
        sample(v, noise, steps=2, method="rk4")
    with pytest.raises(ValueError, match="grid"):
        sample(v, noise, grid=[0.0, 0.6, 0.5, 1.0])
    with pytest.raises(ValueError, match="cfg_interval"):
        sample(v, noise, steps=2, cond=torch.ones(2), null_cond=torch.zeros(2), cfg_scale=2.0, cfg_interval=(0.6, 0.2))
