"""Training loss of the VecSet VAE: field regression + optional eikonal / surface / normal terms + KL.

Variants (``VecSetLossConfig.kind``)
-----------------------------------
* ``"sdf"`` (default), **Dora's truncated SDF** (arXiv 2412.17808; CraftsMan3D ``objaverse.py`` /
  ``shape_autoencoder.py``): the target is ``clip(sdf, -tau, tau) / tau`` with ``tau = 0.015`` (the
  frame here is Dora's, the longest side in about [-1, 1]), regressed with MSE, so the network output
  is a signed distance in units of ``tau``, **negative inside**, saturating at +-1 beyond ``tau``.
  ``truncation=None`` regresses the raw SDF instead (VecSetX: ``L_vol + 10 L_near + 1e-3 eikonal +
  |f(surface)|``; set ``group_weights=(1, 10, 10)``, ``eikonal_weight=1e-3``, ``surface_weight=1``,
  ``sdf_loss="l1"`` to reproduce it).
* ``"occupancy"``, **3DShape2VecSet** BCE (``engine_ae.py``: ``BCE(vol) + 0.1 BCE(near)``): the output
  is the logit of P(outside), so ``field < 0`` still means inside. Set ``group_weights=(1, 0.1, 0.1)``
  to reproduce their weights.

Terms
-----
* reconstruction: per-point error averaged **per point group** (batch ``groups``: 0 uniform, 1 near
  fine, 2 near coarse), then summed with ``group_weights``. The default ``(1, 2, 1)`` follows Dora's
  ``coarse 1 / sharp 2``: we have no sharp-near group, so the fine near-surface band, which carries the
  detail, gets the weight 2. Without ``groups`` every point has weight 1.
* ``kl``: :meth:`DiagonalGaussian.kl` (per-element mean) times ``kl_weight`` (1e-3, 3DShape2VecSet / Dora).
* ``eikonal`` (optional): ``mean (|grad d| - 1)^2`` with ``d = field * tau`` the distance in world units,
  on query points inside the linear band ``|sdf| < tau`` (all points when ``truncation=None``).
* ``surface`` (optional): ``mean |field|`` at surface points (VecSetX surface term).
* ``normal`` (optional): ``mean (1 - cos(grad field, n))`` at surface points (TripoSG's normal guidance).
* ``position`` (position-bias models only, ``VecSetVAEConfig.position_bias``): mean squared distance
  between the positions the geometry decoder reads from the tokens and the tokens' FPS points, times
  ``position_weight`` (1). It teaches the latents to carry where they are.

Gradient terms need double backward through attention, which PyTorch's fused SDPA kernels lack; the
forward pass then runs with the math SDPA backend (slower, more memory). They are off by default.

The loss calls ``model(surface, points, ...)`` (its ``forward``), never ``encode`` / ``query`` directly,
so it works unchanged on a model wrapped in DDP or FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from shapeflow.models.distributions import DiagonalGaussian

GROUP_NAMES = ("uniform", "near_fine", "near_coarse")


@dataclass(frozen=True)
class VecSetLossConfig:
    """Weights and variant of :func:`vecset_vae_loss` (defaults: Dora truncated-SDF MSE)."""

    kind: str = "sdf"  # "sdf" (truncated SDF regression, Dora) or "occupancy" (BCE, 3DShape2VecSet)
    truncation: float | None = 0.015  # tau: target clip(sdf, -tau, tau) / tau; None = raw SDF (VecSetX)
    sdf_loss: str = "mse"  # per-point error of the sdf variant: "mse" (Dora) or "l1" (VecSetX)
    group_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)  # uniform, near fine, near coarse
    kl_weight: float = 1e-3  # on the per-element mean KL (3DShape2VecSet, Dora)
    eikonal_weight: float = 0.0  # |grad sdf| -> 1 in world units (VecSetX 1e-3); costs double backward
    surface_weight: float = 0.0  # |field(surface points)| -> 0 (VecSetX 1)
    normal_weight: float = 0.0  # 1 - cos(grad field, normal) at surface points
    surface_samples: int = 2048  # surface points per shape for the surface / normal terms
    sample_posterior: bool = True  # decode a posterior sample (VAE) rather than the mean
    num_tokens: int | tuple[int, ...] | None = None  # tokens per training step (None: the model's
    #   config.num_tokens); a list draws one count per step, uniformly (TripoSG / Dora train with varying counts)
    position_weight: float = 1.0  # token positions -> their FPS points (position-bias models only)

    def __post_init__(self):
        if self.kind not in ("sdf", "occupancy"):
            raise ValueError(f"VecSetLossConfig.kind must be 'sdf' or 'occupancy', got {self.kind!r}")
        if self.sdf_loss not in ("mse", "l1"):
            raise ValueError(f"VecSetLossConfig.sdf_loss must be 'mse' or 'l1', got {self.sdf_loss!r}")
        if self.truncation is not None and not self.truncation > 0:
            raise ValueError(f"VecSetLossConfig.truncation must be > 0 or None, got {self.truncation!r}")
        if self.kind == "occupancy" and self.eikonal_weight > 0:
            raise ValueError("the eikonal term needs kind='sdf' (an occupancy logit is not a distance)")
        if not self.position_weight >= 0:
            raise ValueError(f"VecSetLossConfig.position_weight must be >= 0, got {self.position_weight!r}")
        if isinstance(self.num_tokens, list):  # YAML lists -> a hashable, frozen tuple
            object.__setattr__(self, "num_tokens", tuple(self.num_tokens))
        counts = self.num_tokens if isinstance(self.num_tokens, tuple) else (self.num_tokens,)
        is_count = [isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts]
        if self.num_tokens is not None and not (counts and all(is_count)):
            raise ValueError(f"VecSetLossConfig.num_tokens must be null, a token count >= 1 or a list of them, "
                             f"got {self.num_tokens!r}")
        if len(self.group_weights) != 3:
            raise ValueError("VecSetLossConfig.group_weights needs 3 weights "
                             "(uniform, near fine, near coarse)")

    @property
    def field_unit(self) -> float:
        """World length of one unit of the network output (``tau``; 1 for raw SDF)."""
        return self.truncation if (self.kind == "sdf" and self.truncation) else 1.0


def field_target(sdf: torch.Tensor, cfg: VecSetLossConfig) -> torch.Tensor:
    """The training target for ground-truth SDF values (negative inside) under ``cfg``."""
    if cfg.kind == "occupancy":
        return (sdf > 0).to(sdf.dtype)  # P(outside) label
    if cfg.truncation:
        return sdf.clamp(-cfg.truncation, cfg.truncation) / cfg.truncation
    return sdf


def _point_error(field: torch.Tensor, target: torch.Tensor, cfg: VecSetLossConfig) -> torch.Tensor:
    if cfg.kind == "occupancy":
        return F.binary_cross_entropy_with_logits(field, target, reduction="none")
    return (field - target).square() if cfg.sdf_loss == "mse" else (field - target).abs()


def _step_num_tokens(cfg: VecSetLossConfig, generator: torch.Generator | None) -> int | None:
    """This step's token count: ``cfg.num_tokens``, or one of the list drawn with ``generator``."""
    if not isinstance(cfg.num_tokens, tuple):
        return cfg.num_tokens
    k = torch.randint(len(cfg.num_tokens), (1,), generator=generator, device=generator.device if generator else "cpu")
    return cfg.num_tokens[int(k)]


def vecset_vae_loss(model, batch: dict, cfg: VecSetLossConfig = VecSetLossConfig(), *,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One training loss of a :class:`~shapeflow.models.vecset_vae.VecSetVAE`.

    Parameters
    ----------
    batch : dict with
      ``surface`` (b, n, 7) float32 ``[xyz, normal, sharp flag]``;
      ``points`` (b, q, 3) float32 query points;
      ``sdf`` (b, q) float32 ground-truth signed distance, negative inside;
      optional ``groups`` (b, q) uint8: 0 uniform, 1 near fine, 2 near coarse.
    cfg : loss variant and weights.

    Returns
    -------
    loss : scalar tensor
    logs : dict of detached 0-d tensors (no device sync; read out when logging): ``loss``, ``recon``,
      ``recon_<group>`` (when groups are given), ``kl``, ``sign_acc`` (fraction of query points on the right
      side), ``position`` for position-bias models,
      and each enabled optional term.
    """
    surface, points, sdf = batch["surface"], batch["points"], batch["sdf"]
    b, q = sdf.shape
    use_surface = cfg.surface_weight > 0 or cfg.normal_weight > 0
    need_grad = cfg.eikonal_weight > 0 or cfg.normal_weight > 0
    query_pts = points
    if use_surface:
        k = min(cfg.surface_samples, surface.shape[1])
        dev = generator.device if generator is not None else surface.device
        sel = torch.rand(b, surface.shape[1], generator=generator, device=dev).argsort(dim=1)[:, :k]
        sel = sel.to(surface.device)  # (b, k) random surface points per shape
        surf = surface.gather(1, sel[..., None].expand(-1, -1, surface.shape[-1]))  # (b, k, >=6)
        query_pts = torch.cat([points, surf[..., :3]], dim=1)  # (b, q + k, 3)
    # Call the module itself (not encode/decode/query) so DDP / FSDP wrappers see a forward pass.
    kwargs = dict(sample_posterior=cfg.sample_posterior, num_tokens=_step_num_tokens(cfg, generator),
                  generator=generator)
    if need_grad:
        query_pts = query_pts.detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # fused SDPA kernels have no double backward
            out = model(surface, query_pts, **kwargs)
        field_all = out["field"]
        grad = torch.autograd.grad(field_all.sum(), query_pts, create_graph=True)[0]  # (b, q (+k), 3)
    else:
        out = model(surface, query_pts, **kwargs)
        field_all = out["field"]
    field_all = field_all.float()  # losses in fp32 even under bf16 autocast
    posterior = DiagonalGaussian(out["posterior"].mean.float(), out["posterior"].logvar.float())
    field = field_all[:, :q]

    err = _point_error(field, field_target(sdf, cfg), cfg)  # (b, q)
    terms: dict[str, torch.Tensor] = {}
    groups = batch.get("groups")
    if groups is None:
        recon = err.mean()
    else:
        recon = err.new_zeros(())
        for g, (name, w) in enumerate(zip(GROUP_NAMES, cfg.group_weights)):
            mask = (groups == g).to(err.dtype)
            terms[f"recon_{name}"] = (err * mask).sum() / mask.sum().clamp(min=1.0)
            recon = recon + w * terms[f"recon_{name}"]
    terms["recon"] = recon
    terms["kl"] = posterior.kl().mean()
    loss = recon + cfg.kl_weight * terms["kl"]

    if "token_xyz_pred" in out:
        terms["position"] = (out["token_xyz_pred"].float() - out["token_xyz"].float()).square().sum(-1).mean()
        loss = loss + cfg.position_weight * terms["position"]
    if cfg.eikonal_weight > 0:
        norm = (grad[:, :q].float() * cfg.field_unit).norm(dim=-1)  # world-unit gradient of the distance
        band = (sdf.abs() < cfg.truncation).to(norm.dtype) if (cfg.kind == "sdf" and cfg.truncation) \
            else torch.ones_like(norm)
        terms["eikonal"] = ((norm - 1.0).square() * band).sum() / band.sum().clamp(min=1.0)
        loss = loss + cfg.eikonal_weight * terms["eikonal"]
    if use_surface:
        f_surf = field_all[:, q:]
        if cfg.surface_weight > 0:
            terms["surface"] = f_surf.abs().mean()
            loss = loss + cfg.surface_weight * terms["surface"]
        if cfg.normal_weight > 0:
            cos = F.cosine_similarity(grad[:, q:].float(), surf[..., 3:6].float(), dim=-1, eps=1e-8)
            terms["normal"] = (1.0 - cos).mean()
            loss = loss + cfg.normal_weight * terms["normal"]

    terms["sign_acc"] = ((field.detach() < 0) == (sdf < 0)).float().mean()
    terms["loss"] = loss
    return loss, {name: value.detach().float() for name, value in terms.items()}  # 0-d tensors: no device sync
