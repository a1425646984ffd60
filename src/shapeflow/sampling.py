"""Stateless ODE samplers for rectified-flow generators (Euler, Heun, midpoint) with classifier-free guidance.

The sampler integrates ``dx/dt = v(x, t)`` from Gaussian noise at ``t = 0`` to data at ``t = 1``, the
convention owned by :mod:`shapeflow.flow`. A velocity function has the signature
``velocity_fn(x (b, ...), t (b,), cond) -> (b, ...)``; a DiT module is one.

Design choices:

* **Time grid.** ``steps + 1`` points from 0 to 1, uniform in ``t`` and then shifted with the SD3 shift
  expressed for our direction (:func:`shapeflow.flow.shift_time`): ``shift > 1`` spends more steps near
  the noise end, like TRELLIS's ``rescale_t`` (its pipeline uses 3.0). A custom grid can be passed.
* **Methods.** ``"euler"`` (1 evaluation per step; what every released 3D pipeline uses),
  ``"heun"`` (2nd order, the deterministic sampler of EDM, Karras et al. 2022 arXiv 2206.00364
  Alg. 1: an Euler predictor and a trapezoidal corrector, ``2 * steps`` evaluations) and
  ``"midpoint"`` (2nd order, ``2 * steps`` evaluations). :func:`num_evaluations` gives the exact
  count; ``sample(..., return_stats=True)`` reports what was actually done.
* Heun's corrector runs on the final step too. EDM skips it there because its ODE is singular at
  sigma = 0; the flow ODE is not (the exact velocity at t = 1 is ``x - E[noise | x] = x``), and
  because a shifted grid makes the final step the *longest* one, an Euler final step dominates the
  error (by far the largest error term on the analytic test flow). The corrector never needs
  ``t > 1``: grids end exactly at 1. A model trained with logit-normal times sees ``t`` near 1 rarely;
  ``"midpoint"`` never evaluates at ``t = 1`` if that matters.
* **Guidance.** Standard form ``v = v_u + w (v_c - v_u)`` (Ho & Salimans 2022): ``w = 1`` is *exactly* the
  conditional prediction (the unconditional branch is then not evaluated at all), ``w = 0`` the
  unconditional one. TRELLIS v1 writes ``(1 + w') v_c - w' v_u``, i.e. ``w = 1 + w'`` (its cfg 5.0 is our
  6.0); TRELLIS.2's ``guidance_strength`` ``s`` equals our ``w``. Conditional and unconditional
  predictions come from one batched call (``2b`` rows). An optional ``cfg_interval = (lo, hi)`` in our
  ``t`` applies guidance only for ``lo <= t <= hi`` and uses the conditional prediction elsewhere; TRELLIS's
  interval ``[0.5, 1.0]`` (in its ``t``, 1 = noise) is ``(0.0, 0.5)`` here.
* **Determinism.** The samplers add no noise; given the initial noise the output is a deterministic
  function of it. :func:`initial_noise` draws the noise from a seed (optionally one seed per sample, so
  a sample does not depend on the batch it was drawn in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from shapeflow.flow import DATA_T, NOISE_T, shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]

METHODS = ("euler", "heun", "midpoint")


def time_grid(steps: int, shift: float = 1.0, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """Sampler times ``(steps + 1,)``, increasing from 0 (noise) to 1 (data), shifted by ``shift``."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    t = torch.linspace(NOISE_T, DATA_T, steps + 1, dtype=torch.float64)
    t = shift_time(t, shift)
    t[0], t[-1] = NOISE_T, DATA_T  # exact endpoints despite rounding
    return t.to(device=device, dtype=dtype)


def num_evaluations(steps: int, method: str = "euler") -> int:
    """Number of velocity evaluations (NFE) of ``steps`` steps; guidance doubles the batch, not the NFE."""
    if method == "euler":
        return steps
    if method in ("heun", "midpoint"):
        return 2 * steps
    raise ValueError(f"unknown sampler {method!r}; expected one of {METHODS}")


def initial_noise(
    shape: Sequence[int],
    *,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (``(b, ...)``), drawn on the CPU and moved to ``device``.

    ``seed`` may be one integer (the whole batch from one generator) or one integer per sample (row ``i``
    from its own generator: the same seed gives the same shape regardless of batch size or position).
    """
    shape = tuple(int(s) for s in shape)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if isinstance(seed, Sequence):
        if len(seed) != shape[0]:
            raise ValueError(f"got {len(seed)} seeds for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
                for s in seed]
        x = torch.stack(rows)
    else:
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        gen_device = generator.device if generator is not None else "cpu"
        x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


@dataclass
class SamplerStats:
    """What a :func:`sample` call did: velocity evaluations, model calls and rows passed to the model."""

    nfe: int = 0  # velocity-field evaluations (a guided evaluation counts once)
    model_calls: int = 0  # calls of velocity_fn
    guided_evaluations: int = 0  # evaluations that used the batched cond + uncond call
    rows: int = 0  # total batch rows passed to velocity_fn (cost proxy: guided rows count twice)


def _check_cond(cond, null_cond, cfg_scale: float, batch: int):
    if cfg_scale == 1.0:
        return None
    if cond is None:
        raise ValueError(f"cfg_scale {cfg_scale} needs a condition (unconditional models use cfg_scale 1)")
    if null_cond is None:
        raise ValueError(f"cfg_scale {cfg_scale} needs null_cond (zero image tokens or the null class label)")
    if not isinstance(cond, torch.Tensor) or not isinstance(null_cond, torch.Tensor):
        raise ValueError("guidance needs tensor conditions")
    if null_cond.shape[0] != batch:
        null_cond = null_cond.expand(batch, *null_cond.shape[1:])
    if null_cond.shape != cond.shape:
        raise ValueError(f"null_cond {tuple(null_cond.shape)} does not match cond {tuple(cond.shape)}")
    return null_cond.to(device=cond.device, dtype=cond.dtype)


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor | Sequence[int],
    *,
    steps: int = 25,
    method: str = "euler",
    shift: float = 1.0,
    grid: torch.Tensor | Sequence[float] | None = None,
    cond=None,
    null_cond: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = False,
    return_stats: bool = False,
):
    """Integrate the velocity field from noise (t = 0) to data (t = 1).

    Parameters
    ----------
    velocity_fn : ``(x (b, ...), t (b,), cond) -> v (b, ...)``, ``t`` in [0, 1] with 0 = noise.
    noise : initial noise ``(b, ...)``, or a shape to draw it from ``seed`` / ``generator``
        (:func:`initial_noise`, on ``device``).
    steps : number of time steps (NFE depends on ``method``, see :func:`num_evaluations`).
    method : ``"euler"``, ``"heun"`` or ``"midpoint"``.
    shift : time-grid shift (> 1: more steps near noise); ignored when ``grid`` is given.
    grid : explicit increasing times from 0 to 1 (overrides ``steps`` and ``shift``).
    cond, null_cond : condition for the batch and the null condition (same shape, or one row that is
        broadcast); ``null_cond`` is only needed when ``cfg_scale != 1``.
    cfg_scale : guidance scale ``w`` in ``v_u + w (v_c - v_u)``; 1 = plain conditional sampling.
    cfg_interval : ``(lo, hi)`` in t where guidance applies (inclusive); ``None`` = everywhere.
    progress : show a tqdm bar over steps.
    return_stats : also return a :class:`SamplerStats`.

    Returns
    -------
    x : (b, ...) samples at t = 1 (in the generator's normalised latent space), or ``(x, stats)``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; expected one of {METHODS}")
    if not isinstance(noise, torch.Tensor):
        noise = initial_noise(noise, seed=seed, generator=generator, device=device)
    elif seed is not None or generator is not None:
        raise ValueError("seed/generator are only used when noise is given as a shape")
    if grid is None:
        ts = time_grid(steps, shift).tolist()
    else:
        ts = [float(x) for x in grid]
        if len(ts) < 2 or any(b <= a for a, b in zip(ts, ts[1:])) or ts[0] < NOISE_T or ts[-1] > DATA_T:
            raise ValueError("grid must increase strictly within [0, 1] and have at least two points")
    if cfg_interval is not None:
        lo, hi = cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {cfg_interval}")
    b = noise.shape[0]
    null_cond = _check_cond(cond, null_cond, cfg_scale, b)
    stats = SamplerStats()
    if null_cond is not None:
        cond2 = torch.cat([cond, null_cond], dim=0)  # (2b, ...)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((b,), t, device=x.device, dtype=x.dtype)
        stats.nfe += 1
        stats.model_calls += 1
        guided = null_cond is not None and (cfg_interval is None or cfg_interval[0] <= t <= cfg_interval[1])
        if not guided:
            stats.rows += b
            return velocity_fn(x, tt, cond)
        stats.guided_evaluations += 1
        stats.rows += 2 * b
        v = velocity_fn(torch.cat([x, x]), torch.cat([tt, tt]), cond2)
        v_c, v_u = v.chunk(2, dim=0)
        return v_u + cfg_scale * (v_c - v_u)

    x = noise
    pairs = list(zip(ts[:-1], ts[1:]))
    if progress:
        pairs = tqdm(pairs, desc=f"sampling ({method})", leave=False)
    for t0, t1 in pairs:
        h = t1 - t0
        if method == "euler":
            x = x + h * velocity(x, t0)
        elif method == "midpoint":
            d0 = velocity(x, t0)
            x = x + h * velocity(x + 0.5 * h * d0, t0 + 0.5 * h)
        else:  # heun
            d0 = velocity(x, t0)
            x_pred = x + h * d0  # Euler predictor
            x = x + 0.5 * h * (d0 + velocity(x_pred, t1))  # trapezoidal corrector
    return (x, stats) if return_stats else x
