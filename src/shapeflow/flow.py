"""Rectified flow: THE time convention of shapeflow, the training path, time sampling, the loss.

Convention (every generator, sampler, loader and test in shapeflow uses exactly this)::

    t in [0, 1],   t = 0 is Gaussian noise,   t = 1 is data
    x_t = (1 - t) * noise + t * data
    v   = d x_t / d t = data - noise          (the regression target, constant along each path)

The network receives ``t`` in [0, 1]; its timestep embedder multiplies by 1000 internally
(:class:`shapeflow.nn.embeddings.TimestepEmbedder`), because the sinusoidal embedding was designed for
inputs of order 1000.

Why this direction: it is the one of the flow-matching literature (Lipman et al. 2023,
arXiv 2210.02747; ``facebookresearch/flow_matching``'s ``CondOTProbPath``) and of Hunyuan3D-2.x
(velocity ``x1 - x0`` with ``x0`` noise), so sampling integrates *forward* in time with a positive
step and "the velocity" is ``data - noise`` without a sign flip. TRELLIS, SD3, diffusers and TripoSG
use the opposite direction (``sigma = 1`` is noise, target ``noise - data``, ``sigma * 1000`` fed to
the network); checkpoints from those projects are adapted in their loaders only
(``shapeflow.models.pretrained.trellis_ss_flow``), never here.

Design choices:

* Peer hyper-parameters are written in terms of the noise level ``sigma = 1 - t`` so that they keep
  their published meaning. The SD3 timestep shift ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` is
  applied to ``sigma = 1 - t``, which gives ``t' = t / (s - (s - 1) * t)`` (:func:`shift_time`): ``s > 1``
  moves time toward the **noise** end in training and spends more sampler steps there, exactly as in
  SD3 / TRELLIS ``rescale_t``. (Applying the SD3 formula to our ``t`` directly would do the opposite.)
* Logit-normal sampling likewise draws ``sigma = sigmoid(N(mean, std))``, so TRELLIS's released
  ``logitNormal(mean=1, std=1)`` (biased toward noise) is ``sample_t(kind="logit_normal", mean=1)``
  here; SD3's default is ``mean=0, std=1``.
* The loss is the conditional flow-matching MSE (mean over all elements); the per-sample errors come back
  with their times (:class:`FlowTerms`) so that validation can report them per band of ``t`` (TRELLIS
  logs 10 bins), the useful training diagnostic, without reading anything back per step.
* Classifier-free-guidance dropout replaces a sample's condition by the null condition with
  probability ``p`` (about 0.1 in TRELLIS / CraftsMan / Step1X-3D); the null condition is all zeros
  for image tokens and a reserved label index for class labels.
* Latents are normalised to about unit variance before flow training (TRELLIS per-channel mean/std,
  Hunyuan3D a global scale factor); :class:`LatentNormalizer` computes either from encoded training
  latents and serialises to a plain dict stored in the generator checkpoint config.
* Token sets (VecSet latents ``(b, m, c)``) are unordered, and the token DiT is permutation-equivariant,
  so which data token a noise token flows to is free. ``set_coupling="ot"`` picks it per sample by
  minimum total squared distance (Hungarian matching, :func:`match_tokens`), the equivariant OT flow
  matching of Klein, Kraemer and Noe (NeurIPS 2023): the paths stop crossing, and the network no longer
  has to average over all token orders. Never for models with positions (grid DiTs, positional tokens).
* Randomness comes from an optional ``torch.Generator``; draws are made on the generator's device and
  moved, so a seed gives the same numbers on CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

NOISE_T = 0.0  # the end of the path that is Gaussian noise
DATA_T = 1.0  # the end of the path that is data

ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]  # (x_t, t (b,), cond) -> v


# -------------------------------------------------------------------------------------------------
# Randomness helpers
# -------------------------------------------------------------------------------------------------


def randn(shape, *, generator: torch.Generator | None = None, device=None,
          dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws made on ``generator``'s device (CPU by default), then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    x = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


def rand(shape, *, generator: torch.Generator | None = None, device=None,
         dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draws made on ``generator``'s device, then moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    x = torch.rand(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


def _expand_t(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-sample ``t`` of shape ``(b,)`` against ``like`` of shape ``(b, ...)``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be a scalar or of shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))  # (b, 1, ..., 1)


# -------------------------------------------------------------------------------------------------
# The path
# -------------------------------------------------------------------------------------------------


def interpolate(noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The point ``x_t = (1 - t) * noise + t * data`` on the straight path.

    Parameters
    ----------
    noise, data : tensors of identical shape ``(b, ...)``.
    t : scalar or ``(b,)``; 0 gives ``noise``, 1 gives ``data``.
    """
    if noise.shape != data.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and data {tuple(data.shape)} differ in shape")
    tt = _expand_t(t, data)
    return (1.0 - tt) * noise + tt * data


def target_velocity(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The velocity ``d x_t / d t = data - noise`` of the straight path (independent of ``t``)."""
    return data - noise


# -------------------------------------------------------------------------------------------------
# Time sampling
# -------------------------------------------------------------------------------------------------


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift, expressed in shapeflow's direction (t = 0 noise).

    With ``sigma = 1 - t`` the SD3 / TRELLIS formula ``sigma' = s sigma / (1 + (s - 1) sigma)`` becomes
    ``t' = t / (s - (s - 1) t)``. It fixes 0 and 1 and, for ``s > 1``, maps every interior ``t`` closer to
    the noise end (``s = 3`` maps 0.5 to 0.25). ``s = 1`` is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def sample_t(
    n: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Draw ``n`` training times in [0, 1] (t = 0 noise).

    Parameters
    ----------
    kind : ``"uniform"`` (t ~ U[0, 1], Hunyuan3D-2.1 default) or ``"logit_normal"``:
        ``sigma = 1 - t = sigmoid(N(mean, std))`` (SD3, arXiv 2403.03206 Sec. 3.1; ``mean > 0`` favours the
        noise end, TRELLIS uses ``mean=1, std=1``).
    mean, std : logit-normal parameters (ignored for uniform).
    shift : SD3 shift applied after sampling (:func:`shift_time`); ``> 1`` favours the noise end.

    Returns
    -------
    t : (n,) float32.
    """
    if kind == "uniform":
        t = rand((n,), generator=generator, device=device)
    elif kind == "logit_normal":
        if std <= 0:
            raise ValueError(f"logit-normal std must be positive, got {std}")
        sigma = torch.sigmoid(mean + std * randn((n,), generator=generator, device=device))
        t = 1.0 - sigma
    else:
        raise ValueError(f"unknown time sampling {kind!r}; expected 'uniform' or 'logit_normal'")
    return shift_time(t, shift)


# -------------------------------------------------------------------------------------------------
# Condition dropout (classifier-free guidance training)
# -------------------------------------------------------------------------------------------------


def null_like(cond: torch.Tensor, null_index: int | None = None) -> torch.Tensor:
    """The null condition like ``cond``: zeros for float tensors (image tokens), ``null_index`` for labels."""
    if cond.is_floating_point():
        return torch.zeros_like(cond)
    if null_index is None:
        raise ValueError("integer (class-label) conditions need the null class index")
    return torch.full_like(cond, null_index)


def drop_condition(
    cond,
    p: float,
    *,
    null: torch.Tensor | int | float | None = None,
    generator: torch.Generator | None = None,
):
    """Replace each sample's condition by the null condition with probability ``p``.

    Parameters
    ----------
    cond : ``None`` (unconditional: returned unchanged) or a tensor ``(b, ...)`` (labels or tokens).
    p : drop probability; 0 returns ``cond`` itself.
    null : the null condition: a tensor shaped like ``cond`` (or broadcastable to it), or a scalar such
        as the null class index; default zeros (float conditions only; labels must pass it).
    """
    if cond is None or p <= 0.0:
        return cond
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if null is None:
        null = null_like(cond)
    elif not isinstance(null, torch.Tensor):
        null = torch.full_like(cond, null)
    drop = rand((cond.shape[0],), generator=generator, device=cond.device) < p  # (b,)
    mask = drop.view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(mask, null.to(device=cond.device, dtype=cond.dtype), cond)


# -------------------------------------------------------------------------------------------------
# Loss
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowConfig:
    """Training-time flow settings (stored with the generator config)."""

    t_sampling: str = "logit_normal"  # "uniform" or "logit_normal" (SD3's best; TRELLIS/Step1X use it)
    logit_mean: float = 0.0  # logit-normal mean of sigma = 1 - t; TRELLIS uses 1.0 (toward noise)
    logit_std: float = 1.0  # logit-normal std
    shift: float = 1.0  # SD3 shift of training times (> 1: more noise-end samples)
    cond_dropout: float = 0.1  # CFG condition dropout probability (TRELLIS p_uncond 0.1)
    log_bins: int = 5  # number of t bands for per-band MSE logging
    set_coupling: str = "none"  # "ot": match each sample's data tokens to its noise tokens (token sets only)

    def __post_init__(self):
        if self.set_coupling not in ("none", "ot"):
            raise ValueError(f"FlowConfig.set_coupling must be 'none' or 'ot', got {self.set_coupling!r}")


@dataclass(frozen=True)
class FlowTerms:
    """What :func:`flow_matching_loss` measured, per sample: squared error (mean over elements) and time."""

    per_sample: torch.Tensor  # (b,) detached
    t: torch.Tensor  # (b,) detached, float32

    def by_time(self, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums and counts of the errors in ``bins`` bands of ``t`` (band ``k``: ``[k / bins, (k + 1) / bins)``,
        band 0 the noise end): two ``(bins,)`` tensors on the errors' device, no host read."""
        band = (self.t * bins).long().clamp_(0, bins - 1)  # (b,)
        sums = torch.zeros(bins, device=self.per_sample.device).index_add_(0, band, self.per_sample.float())
        counts = torch.bincount(band, minlength=bins).to(sums.dtype)
        return sums, counts


def match_tokens(noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Reorder each sample's data tokens so that token ``i`` is the one paired with noise token ``i``.

    The pairing minimises the summed squared distance over the sample's tokens (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``). ``noise``, ``data``: ``(b, m, c)``; returns ``data`` permuted
    along ``m`` (the same set of tokens per sample).
    """
    if noise.shape != data.shape or data.ndim != 3:
        raise ValueError(f"match_tokens needs noise and data of one shape (b, m, c), got {tuple(noise.shape)} "
                         f"and {tuple(data.shape)}")
    cost = torch.cdist(noise.detach().float(), data.detach().float()).pow(2).cpu().numpy()  # (b, m, m)
    order = torch.from_numpy(np.stack([linear_sum_assignment(c)[1] for c in cost])).to(data.device)  # (b, m)
    return torch.gather(data, 1, order[..., None].expand_as(data))


def flow_matching_loss(
    model_fn: ModelFn,
    data: torch.Tensor,
    cond=None,
    *,
    config: FlowConfig = FlowConfig(),
    null_cond: torch.Tensor | int | None = None,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FlowTerms]:
    """Conditional flow-matching loss ``E || model(x_t, t, c) - (data - noise) ||^2``.

    Parameters
    ----------
    model_fn : ``(x_t, t, cond) -> velocity`` with ``t`` of shape ``(b,)`` in [0, 1]; a DiT module works.
    data : (b, ...) normalised data latents (``t = 1`` end).
    cond : ``None``, class labels ``(b,)`` or condition tokens ``(b, l, c)``; dropped to ``null_cond`` with
        probability ``config.cond_dropout`` (zeros by default; labels need ``null_cond``, e.g. the null
        class index ``num_classes`` as an int).
    noise, t : optional fixed draws (tests, overfitting); drawn from ``generator`` when ``None``.
    mask : optional bool tensor broadcastable to ``data``, False on padding (variable-length samples packed
        into one batch: the sparse DiT). Noise is zero there, and each sample's error is the mean over its
        real elements only.

    Returns
    -------
    loss : scalar, MSE averaged over all elements.
    terms : :class:`FlowTerms`, the detached per-sample errors and times (device tensors: nothing is read
        back to the host here; :meth:`FlowTerms.by_time` bins them).
    """
    b = data.shape[0]
    if noise is None:
        noise = randn(data.shape, generator=generator, device=data.device, dtype=data.dtype)
    if t is None:
        t = sample_t(b, config.t_sampling, mean=config.logit_mean, std=config.logit_std, shift=config.shift,
                     generator=generator, device=data.device)
    t = t.to(device=data.device, dtype=data.dtype)
    if mask is not None:
        mask = mask.to(device=data.device, dtype=data.dtype).expand_as(data)
        noise, data = noise * mask, data * mask
    if config.set_coupling == "ot":
        data = match_tokens(noise, data)
    if cond is not None and config.cond_dropout > 0:
        cond = drop_condition(cond, config.cond_dropout, null=null_cond, generator=generator)
    x_t = interpolate(noise, data, t)
    pred = model_fn(x_t, t, cond)
    if pred.shape != data.shape:
        raise ValueError(f"model output {tuple(pred.shape)} does not match the data {tuple(data.shape)}")
    err = (pred.float() - target_velocity(noise, data).float()).pow(2)
    if mask is None:
        per_sample = err.flatten(1).mean(1)  # (b,)
    else:
        m = mask.float()
        per_sample = (err * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)  # (b,)
    return per_sample.mean(), FlowTerms(per_sample.detach(), t.detach().float())


# -------------------------------------------------------------------------------------------------
# Latent normalisation
# -------------------------------------------------------------------------------------------------


class LatentNormalizer:
    """Affine map ``z -> (z - mean) / std`` that brings encoded latents to about zero mean, unit variance.

    Modes:

    * ``"channel"``: per-channel mean and std (TRELLIS SLat ``normalization``); ``channel_dim`` says
      where channels are: ``-1`` for token latents ``(b, m, c)``, ``1`` for grid latents ``(b, c, d, h, w)``.
    * ``"global"``: one mean and one std over all elements.
    * ``"scale"``: mean 0 and one std, i.e. multiplication by a scale factor ``1 / std`` (Hunyuan3D
      ``z_scale_factor``, Stable Diffusion ``0.18215``).

    :meth:`fit` computes the statistics from encoded training latents in float64;
    :meth:`to_dict`/:meth:`from_dict` give the plain dict stored in the generator checkpoint config.
    """

    MODES = ("channel", "global", "scale")

    def __init__(self, mean, std, *, mode: str = "channel", channel_dim: int = -1):
        if mode not in self.MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; expected one of {self.MODES}")
        self.mode, self.channel_dim = mode, channel_dim
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError("mean and std must have the same number of entries")
        if (self.std <= 0).any():
            raise ValueError("std must be positive")
        if mode != "channel" and self.mean.numel() != 1:
            raise ValueError(f"mode {mode!r} takes one mean/std, got {self.mean.numel()}")

    @classmethod
    def identity(cls) -> "LatentNormalizer":
        """The no-op normaliser (mean 0, std 1)."""
        return cls(0.0, 1.0, mode="global")

    @classmethod
    def fit(
        cls,
        latents: torch.Tensor | Iterable[torch.Tensor],
        *,
        mode: str = "channel",
        channel_dim: int = -1,
        eps: float = 1e-8,
    ) -> "LatentNormalizer":
        """Statistics of encoded training latents: one tensor ``(n, ...)`` or an iterable of batches."""
        batches = [latents] if isinstance(latents, torch.Tensor) else latents
        count, s1, s2 = 0, 0.0, 0.0
        for z in batches:
            z = z.detach().to(torch.float64)
            if mode == "channel":
                z = z.movedim(channel_dim, -1).reshape(-1, z.shape[channel_dim])  # (n, c)
            else:
                z = z.reshape(-1, 1)  # (n, 1)
            count += z.shape[0]
            s1 = s1 + z.sum(0)
            s2 = s2 + z.pow(2).sum(0)
        if count < 2:
            raise ValueError("need at least two latent values to fit a normaliser")
        mean = s1 / count
        var = (s2 / count - mean.pow(2)).clamp_min(0.0) * count / (count - 1)
        std = var.sqrt().clamp_min(eps)
        if mode == "scale":
            mean = torch.zeros_like(mean)  # factor 1 / std, no shift (Stable Diffusion, Hunyuan scale_by_std)
        return cls(mean, std, mode=mode, channel_dim=channel_dim)

    def _shape(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        v = v.to(device=z.device, dtype=z.dtype)
        if self.mode != "channel":
            return v.reshape(())
        dim = self.channel_dim % z.ndim
        if z.shape[dim] != v.numel():
            raise ValueError(f"latent has {z.shape[dim]} channels on dim {self.channel_dim}, "
                             f"the normaliser was fitted on {v.numel()}")
        shape = [1] * z.ndim
        shape[dim] = v.numel()
        return v.view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latents -> flow-space latents."""
        return (z - self._shape(z, self.mean)) / self._shape(z, self.std)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Flow-space latents (sampler output) -> encoder latents for the VAE decoder."""
        return z * self._shape(z, self.std) + self._shape(z, self.mean)

    @property
    def scale_factor(self) -> float:
        """``1 / std`` for the ``"scale"`` and ``"global"`` modes."""
        if self.mode == "channel":
            raise ValueError("a per-channel normaliser has no single scale factor")
        return 1.0 / float(self.std)

    def to_dict(self) -> dict:
        """Plain-JSON form for the checkpoint config."""
        return {"mode": self.mode, "channel_dim": self.channel_dim,
                "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LatentNormalizer":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        extra = set(d) - {"mode", "channel_dim", "mean", "std"}
        if extra:
            raise ValueError(f"unknown latent-normaliser keys {sorted(extra)}")
        return cls(d["mean"], d["std"], mode=d.get("mode", "channel"), channel_dim=d.get("channel_dim", -1))

    def __repr__(self) -> str:
        mean, std = [round(float(x), 4) for x in self.mean], [round(float(x), 4) for x in self.std]
        return f"LatentNormalizer(mode={self.mode!r}, channel_dim={self.channel_dim}, mean={mean}, std={std})"

