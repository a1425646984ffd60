"""Training losses of the voxel-grid VAE (:mod:`shapeflow.models.grid_vae`).

``grid_vae_loss(model, batch, cfg) -> (loss, logs)`` is the step function the training engine calls.

Design choices
--------------
* **Occupancy (TRELLIS sparse structure).** ``"dice"`` is TRELLIS's released choice:
  ``1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1)`` with ``p = sigmoid(logits)``, the sums running over the
  **whole batch** (not per sample) with smoothing 1. Dice is insensitive to the heavy class imbalance of
  a one-voxel surface shell (~1-5 % occupied), but it does not calibrate probabilities. ``"bce"`` is the
  per-voxel mean binary cross-entropy on logits: calibrated (``p = 0.5`` / ``logits = 0`` is the decision
  boundary that TRELLIS inference and our marching cubes use) but dominated by the empty voxels.
  ``"dice+bce"`` (unweighted sum) gets both: Dice for the rare positives, BCE to make the 0.5 threshold
  meaningful. It is the ``tiny`` preset's default; the ``trellis`` preset keeps ``"dice"`` to match the
  release. Same data and training (``benchmarks/bench_grid_vae.py``, 32^3 shells, 300 steps, one seed):
  the best held-out IoU of the three in a short run (BENCHMARKS.md, "Grid VAE").
* **KL** exactly as TRELLIS: ``0.5 * mean(mu^2 + var - 1 - logvar)`` over **all** latent elements (batch
  included), weighted by ``cfg.kl_weight`` (1e-3 released). ``DiagonalGaussian.kl()`` is the per-sample
  element mean, so its batch mean is the same number.
* **SDF grid.** L1 (default) or MSE between prediction and target in *truncation units*
  (``clamp(sdf, -t, t) / t``), so the loss scale does not depend on the grid resolution. Nodes inside
  the band ``|sdf| < t`` (the only ones marching cubes reads) get weight ``1 + sdf_band_weight``; the
  saturated far field keeps weight 1 so the network still learns the sign everywhere. The weighted
  mean is normalised by the total weight.

Every term is returned in ``logs`` as a detached 0-d tensor (call ``.item()`` when logging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shapeflow.models.grid_vae import GridVAE, GridVAEConfig

__all__ = ["dice_loss", "occupancy_iou", "grid_vae_loss"]


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """TRELLIS Dice loss: ``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)``, sums over the whole batch.

    Parameters
    ----------
    logits, target : same-shape tensors; ``target`` is 0/1.
    smooth : the additive smoothing ``s`` (TRELLIS: 1).
    """
    p = torch.sigmoid(logits.float())
    t = target.float()
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


@torch.no_grad()
def occupancy_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of ``logits > 0`` against ``target > 0.5``: shape ``(b,)``; 1 when both are empty."""
    pred = (logits > 0).flatten(1)
    gt = (target > 0.5).flatten(1)
    inter = (pred & gt).sum(1).float()
    union = (pred | gt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def grid_vae_loss(
    model: GridVAE,
    batch: dict,
    cfg: GridVAEConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training loss: reconstruction of ``batch["grid"]`` from a posterior sample, plus weighted KL.

    Parameters
    ----------
    model : GridVAE
    batch : dict
        ``{"grid": (b, 1, r, r, r) float32}``: 0/1 occupancy on the cell grid (``input="occupancy"``) or a
        truncated SDF in world units, negative inside, on the node grid (``input="sdf"``). Other keys
        are ignored.
    cfg : GridVAEConfig, optional
        Loss settings (``loss``, ``kl_weight``, ``sdf_*``); defaults to ``model.config``.
    generator : torch.Generator, optional
        For the posterior sample.

    Returns
    -------
    loss : 0-d tensor (differentiable)
    logs : dict of detached 0-d tensors: ``loss``, ``recon``, ``kl`` and the parts
        (``dice`` / ``bce`` and ``iou`` for occupancy; ``l1`` / ``mse`` and ``sign_acc`` for SDF).
    """
    cfg = cfg if cfg is not None else model.config
    if "grid" not in batch:
        raise ValueError(f"grid VAE batch needs a 'grid' entry, got keys {sorted(batch)}")
    x = batch["grid"]
    if x.dim() != 5 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"batch['grid'] must be (b, {cfg.in_channels}, r, r, r), got {tuple(x.shape)}")
    x = x.float()
    out, posterior = model(x, sample_posterior=True, generator=generator)
    kl = posterior.kl().mean()
    logs: dict[str, torch.Tensor] = {}
    if cfg.input == "occupancy":
        terms = []
        if "dice" in cfg.loss:
            d = dice_loss(out, x)
            logs["dice"] = d.detach()
            terms.append(d)
        if "bce" in cfg.loss:
            b = F.binary_cross_entropy_with_logits(out.float(), x)
            logs["bce"] = b.detach()
            terms.append(b)
        recon = sum(terms)
        logs["iou"] = occupancy_iou(out.detach(), x).mean()
    else:
        t = cfg.sdf_truncation
        gt = x.clamp(-t, t) / t
        pred = out.float() / t
        w = 1.0 + cfg.sdf_band_weight * (gt.abs() < 1.0).float()
        err = (pred - gt).abs() if cfg.loss == "l1" else (pred - gt).square()
        recon = (w * err).sum() / w.sum()
        logs[cfg.loss] = recon.detach()
        with torch.no_grad():
            logs["sign_acc"] = ((pred < 0) == (gt < 0)).float().mean()
    loss = recon + cfg.kl_weight * kl
    logs.update(loss=loss.detach(), recon=recon.detach(), kl=kl.detach())
    return loss, logs
