"""Diffusion transformers (DiT) that predict rectified-flow velocities on shape latents.

Two front ends share one transformer:

* :class:`TokenDiT` for VecSet latents ``(b, m, c)``: a linear projection in, no patchify and **no
  positional embedding** (the latent set is unordered; Hunyuan3D-2.x, TripoSG, 3DShape2VecSet), so
  the token count may differ between training and sampling.
* :class:`GridDiT` for voxel-grid latents ``(b, c, r, r, r)`` (TRELLIS ``SparseStructureFlowModel``):
  3D patchify (:func:`shapeflow.nn.spatial.patchify_3d`), a fixed 3D sin-cos absolute position
  embedding stored as the persistent buffer ``pos_emb``, unpatchify at the end. Its submodule names
  follow TRELLIS so the released ``ss_flow_img_dit_L_16l8`` weights load through a plain key table
  (:mod:`shapeflow.models.pretrained.trellis_ss_flow`).

Design choices:

* Velocity prediction in the convention of :mod:`shapeflow.flow` (t = 0 noise, t = 1 data). The
  network takes ``t`` in [0, 1]; :class:`TimestepEmbedder` multiplies by 1000 before the 256-dim
  sinusoid (``cat([cos, sin])``, TRELLIS/DiT order) and an MLP.
* :class:`DiTBlock` = TRELLIS ``ModulatedTransformerCrossBlock``: adaLN-modulated self-attention with
  qk-norm, optional cross-attention to condition tokens (affine ``norm2``, no modulation, no gate),
  adaLN-modulated MLP (GELU tanh). ``adaLN_modulation`` = SiLU + Linear(C, 6C) gives
  ``shift/scale/gate`` for the two modulated branches (Peebles & Xie 2023, arXiv 2212.09748).
* **adaLN-Zero**: modulation and output layers start at zero, and so does the cross-attention output
  projection (TRELLIS leaves it xavier; zeroing it makes the identity-at-init property hold for
  conditioned blocks too). A fresh model is exactly the zero velocity and every block the identity.
* Conditioning (``cond`` argument of ``forward``):

  - ``"image"``: tokens ``(b, l, cond_dim)`` (e.g. DINOv2 from
    :class:`shapeflow.models.conditioning.ImageConditioner`) read by cross-attention in every block;
    the null condition is all zeros (TRELLIS, Hunyuan3D, TripoSG).
  - ``"class"``: integer labels ``(b,)``; a :class:`~shapeflow.models.conditioning.ClassConditioner`
    embedding (with one extra learned *null* row, index ``num_classes``) is **added to the timestep
    embedding**, i.e. it drives adaLN in every block (DiT's class conditioning, its best variant).
    No cross-attention layers are built. ``cond=None`` means the null class.
  - ``"none"``: unconditional.

* Optional U-ViT long skips (Bao et al. 2023, arXiv 2209.12152; Hunyuan3D-2.1 / TripoSG):
  with ``k = (depth - 1) // 2``, the outputs of blocks ``0 .. k-1`` are fused into blocks
  ``depth-k .. depth-1`` (last in, first out) by ``LayerNorm(Linear(cat[skip, x]))``.
* Final stage: adaLN-modulated non-affine LayerNorm (eps 1e-6, DiT ``FinalLayer``) + zero-initialised
  linear out; with ``final_adaln=False`` TRELLIS's plain ``F.layer_norm`` (eps 1e-5) + linear.
* Optional gradient checkpointing per block (only while autograd records).

Legend: b batch, m latent tokens, n transformer tokens, l condition tokens, c latent channels,
C width, r grid resolution, p patch size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapeflow.checkpoint import Pretrained
from shapeflow.flow import LatentNormalizer
from shapeflow.models.conditioning import ClassConditioner
from shapeflow.models.pretrained import trellis_ss_flow
from shapeflow.nn.attention import MLP, Attention
from shapeflow.nn.embeddings import TimestepEmbedder, sincos_3d_position_embedding
from shapeflow.nn.spatial import patchify_3d, unpatchify_3d

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Configs and presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Transformer fields shared by :class:`TokenDiTConfig` and :class:`GridDiTConfig`."""

    in_channels: int = 16  # latent channels c (the output has the same count: a velocity)
    width: int = 128  # transformer width C
    depth: int = 4  # number of DiT blocks
    heads: int = 4  # attention heads (head channels = width / heads)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    cond: Literal["none", "class", "image"] = "none"  # conditioning kind (module docstring)
    classes: tuple[str, ...] = ()  # class-conditional: the class names, label i = classes[i] (null = len)
    cond_dim: int = 0  # image-conditional: width of the condition tokens (1024 for DINOv2-L)
    qk_norm: str | None = "rms"  # self-attention qk-norm: "rms" (TRELLIS), "layer" (Hunyuan) or None
    qk_norm_cross: str | None = None  # cross-attention qk-norm (TRELLIS image L: none; XL: rms)
    qkv_bias: bool = True  # bias on q/k/v projections (TRELLIS: yes)
    gelu_approximate: Literal["tanh", "none"] = "tanh"  # MLP GELU: "tanh" (TRELLIS, DiT) or "none"
    long_skip: bool = False  # U-ViT long skips (Hunyuan3D-2.1 / TripoSG)
    final_adaln: bool = True  # adaLN-modulated final LayerNorm (DiT); False = TRELLIS plain LN
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory

    def __post_init__(self):
        for name in ("in_channels", "width", "depth", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"{type(self).__name__}: width {self.width} not divisible by {self.heads} heads")
        if self.cond not in ("none", "class", "image"):
            raise ValueError(f"{type(self).__name__}.cond must be none, class or image, not {self.cond!r}")
        if self.cond == "class" and not self.classes:
            raise ValueError(f"{type(self).__name__}: cond='class' needs the class names (classes)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{type(self).__name__}.classes has duplicate names: {list(self.classes)}")
        if self.cond == "image" and self.cond_dim < 1:
            raise ValueError(f"{type(self).__name__}: cond='image' needs cond_dim >= 1 (the token width)")
        for name in ("qk_norm", "qk_norm_cross"):
            if getattr(self, name) not in (None, "layer", "rms"):
                raise ValueError(f"{type(self).__name__}.{name} must be 'layer', 'rms' or None")

    @property
    def num_classes(self) -> int:
        """Number of real classes (the class embedding has one more row: the null class)."""
        return len(self.classes)


@dataclass(frozen=True)
class TokenDiTConfig(DiTConfig):
    """Architecture of a :class:`TokenDiT` (defaults = the ``tiny`` preset, unconditional)."""

    num_tokens: int = 128  # latent tokens per sample: what it trains on (checked against the latents) and
    #   samples by default; no weight depends on it

    def __post_init__(self):
        super().__post_init__()
        if int(self.num_tokens) < 1:
            raise ValueError(f"TokenDiTConfig.num_tokens must be >= 1, got {self.num_tokens!r}")

    PRESETS: ClassVar[dict[str, dict]] = {
        # Trains on a 2-core CPU in minutes on 64-256 tokens x 8-16 channels; pairs with the tiny VecSet VAE.
        "tiny": dict(width=128, depth=4, heads=4, num_tokens=128),
        # DiT-B sizes (Peebles & Xie): about 130 M parameters, 163 M with DINOv2-L cross-attention; pairs with
        # the base VecSet VAE (512 tokens).
        "base": dict(width=768, depth=12, heads=12, num_tokens=512),
        # Hunyuan3D-2.1 / TripoSG-like: width 2048, 21 blocks, 16 heads, U-ViT long skips, RMS qk-norm
        # (no MoE, adaLN instead of a time token); about 1.9 B parameters with DINOv2-L cross-attention
        # (cond_dim 1024), 1.7 B without; pairs with the large VecSet VAE (4096 tokens).
        "large": dict(width=2048, depth=21, heads=16, long_skip=True, num_tokens=4096),
    }


@dataclass(frozen=True)
class GridDiTConfig(DiTConfig):
    """Architecture of a :class:`GridDiT` (defaults = the ``tiny`` preset, unconditional)."""

    in_channels: int = 8  # latent channels of the grid VAE (TRELLIS: 8)
    resolution: int = 8  # latent grid size r (cubic); the position embedding is built for it
    patch_size: int = 1  # p; tokens = (r / p)^3 (TRELLIS SS flow: 1 -> 4096 tokens at r = 16)

    PRESETS: ClassVar[dict[str, dict]] = {
        "tiny": dict(resolution=8, patch_size=1, width=128, depth=4, heads=4),
        # TRELLIS ss_flow_txt_dit_B-like sizes on a 16^3 x 8 latent.
        "base": dict(resolution=16, patch_size=1, width=768, depth=12, heads=12),
        # TRELLIS configs/generation/ss_flow_img_dit_L_16l8_fp16.json (about 556 M parameters).
        "trellis_ss_flow_img_L": dict(
            resolution=16, in_channels=8, width=1024, depth=24, heads=16, mlp_ratio=4.0, patch_size=1,
            cond="image", cond_dim=1024, qk_norm="rms", qk_norm_cross=None, qkv_bias=True,
            gelu_approximate="tanh", final_adaln=False, long_skip=False,
        ),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.patch_size < 1 or self.resolution % self.patch_size:
            raise ValueError(f"GridDiTConfig: resolution {self.resolution} is not divisible by "
                             f"patch_size {self.patch_size}")

    @property
    def num_tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 3


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` of shape (b, 1, C)."""
    return x * (1.0 + scale) + shift


def time_input(t, x: torch.Tensor) -> torch.Tensor:
    """Flow time as a DiT takes it: ``(b,)`` on ``x``'s device, float32 (float64 for float64 latents); a
    scalar is broadcast over the batch ``x.shape[0]``."""
    t = torch.as_tensor(t, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, optional cross-attention, adaLN-modulated MLP.

    ``x = x + g1 * SelfAttn(LN1(x) (1 + s1) + b1)``; ``x = x + CrossAttn(LN2(x), ctx)`` (LN2 affine,
    no modulation or gate); ``x = x + g2 * MLP(LN3(x) (1 + s2) + b2)`` where
    ``b1, s1, g1, b2, s2, g2 = adaLN_modulation(c).chunk(6)``.
    """

    def __init__(self, width: int, heads: int, *, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 qk_norm: str | None = "rms", qk_norm_cross: str | None = None, qkv_bias: bool = True,
                 gelu_approximate: str = "tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.self_attn = Attention(width, heads=heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=True)
            self.cross_attn = Attention(width, heads=heads, context_dim=context_dim, qkv_bias=qkv_bias,
                                        qk_norm=qk_norm_cross)
        else:
            self.norm2 = self.cross_attn = None
        self.norm3 = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(width, int(round(width * mlp_ratio)), approximate=gelu_approximate)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None,
                lengths: list[int] | None = None) -> torch.Tensor:
        """x: (b, n, C); c: (b, C) timestep (+ class) embedding; context: (b, l, cond_dim) or None;
        lengths: real tokens per row of padded variable-length rows (real first; self-attention stays within
        them, :meth:`Attention.forward <shapeflow.nn.attention.Attention.forward>`), or None."""
        mod = self.adaLN_modulation(c)[:, None, :]  # (b, 1, 6C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.self_attn(modulate(self.norm1(x), shift_msa, scale_msa), lengths=lengths)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm2(x), context)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class LongSkip(nn.Module):
    """U-ViT skip fusion ``LayerNorm(Linear(cat[skip, x]))`` (Hunyuan3D-2.1 ``skip_linear``/``skip_norm``)."""

    def __init__(self, width: int):
        super().__init__()
        self.skip_linear = nn.Linear(2 * width, width)
        self.skip_norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.skip_norm(self.skip_linear(torch.cat([skip, x], dim=-1)))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class DiTBase(Pretrained, nn.Module):
    """The transformer shared by both front ends: time/condition embedding, blocks, final norm."""

    config: DiTConfig

    @classmethod
    def upgrade_config(cls, fields: dict, raw: dict, source: str) -> dict:
        """Older checkpoints: class names were the training data's ``data.classes`` next to
        ``model.num_classes``; a token DiT's ``num_tokens`` 0 meant "the VAE's count", which the
        checkpoint alone cannot tell (a warning asking for ``num_tokens=M``; the config refuses 0)."""
        if "num_classes" in fields:
            n = fields.pop("num_classes")
            data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
            names = list(data.get("classes") or [])
            if fields.get("cond") == "class" and "classes" not in fields:
                if len(names) != n:
                    raise ValueError(f"{source}: model.num_classes {n} but data.classes names {len(names)}")
                fields["classes"] = names
                log.info("%s: model.num_classes + data.classes -> model.classes (names are part of the model)",
                         source)
        if fields.get("num_tokens") == 0:  # the config check refuses it unless num_tokens=M is passed
            log.warning("%s: model.num_tokens is 0 (an older shapeflow's 'the VAE's count'); load it with "
                        "num_tokens=M, the token count of the latents it was trained on", source)
        return fields

    def _build_trunk(self, cfg: DiTConfig) -> None:
        C = cfg.width
        self.grad_checkpointing = cfg.gradient_checkpointing  # the training engine may switch it on
        self.t_embedder = TimestepEmbedder(C)
        self.class_embedder = ClassConditioner(cfg.num_classes, C) if cfg.cond == "class" else None
        context_dim = cfg.cond_dim if cfg.cond == "image" else None
        self.blocks = nn.ModuleList([
            DiTBlock(C, cfg.heads, mlp_ratio=cfg.mlp_ratio, context_dim=context_dim, qk_norm=cfg.qk_norm,
                     qk_norm_cross=cfg.qk_norm_cross, qkv_bias=cfg.qkv_bias,
                     gelu_approximate=cfg.gelu_approximate)
            for _ in range(cfg.depth)
        ])
        self.num_skips = (cfg.depth - 1) // 2 if cfg.long_skip else 0
        self.skips = nn.ModuleList([LongSkip(C) for _ in range(self.num_skips)]) if self.num_skips else None
        self.final_adaLN_modulation = None
        if cfg.final_adaln:
            self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        # Latent normalisation (flow.LatentNormalizer, per channel) fitted on the encoded training set and
        # saved with the weights: the network works on (z - latent_mean) / latent_std. Identity by default.
        self.register_buffer("latent_mean", torch.zeros(cfg.in_channels), persistent=True)
        self.register_buffer("latent_std", torch.ones(cfg.in_channels), persistent=True)

    # -- pieces of forward ----------------------------------------------------------------------

    def _condition(self, c: torch.Tensor, cond, batch: int):
        """Return ``(c, context)``: the adaLN vector (b, C) and the cross-attention tokens or None."""
        kind = self.config.cond
        if kind == "none":
            if cond is not None:
                raise ValueError("this DiT is unconditional (cond='none') but a condition was passed")
            return c, None
        if kind == "class":
            if cond is None:
                cond = torch.full((batch,), self.class_embedder.null_index, device=c.device, dtype=torch.long)
            if cond.shape != (batch,) or cond.is_floating_point():
                raise ValueError(f"class-conditional DiT expects integer labels of shape ({batch},), "
                                 f"got {tuple(cond.shape)} {cond.dtype}")
            return c + self.class_embedder(cond)[:, 0].to(c.dtype), None
        if cond is None or cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != self.config.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"image-conditional DiT expects condition tokens "
                             f"({batch}, l, {self.config.cond_dim}), got {got}")
        return c, cond

    def _trunk(self, h: torch.Tensor, t: torch.Tensor, cond, lengths: list[int] | None = None) -> torch.Tensor:
        """Tokens (b, n, C) -> final normalised tokens (b, n, C); ``lengths``: real tokens of padded rows."""
        c = self.t_embedder(t)  # (b, C)
        c, context = self._condition(c, cond, h.shape[0])
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        stack: list[torch.Tensor] = []
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            if self.num_skips and i >= depth - self.num_skips:
                h = self.skips[i - (depth - self.num_skips)](h, stack.pop())
            h = (checkpoint(block, h, c, context, lengths, use_reentrant=False) if use_ckpt
                 else block(h, c, context, lengths))
            if i < self.num_skips:
                stack.append(h)
        if self.final_adaLN_modulation is None:
            return F.layer_norm(h, (h.shape[-1],))  # TRELLIS: plain F.layer_norm (eps 1e-5)
        shift, scale = self.final_adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)  # 2 x (b, 1, C)
        return modulate(F.layer_norm(h, (h.shape[-1],), eps=1e-6), shift, scale)  # DiT FinalLayer

    def _init_trunk(self) -> None:
        def basic(m: nn.Module):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        for m in self.modules():
            if hasattr(m, "gamma") and isinstance(m.gamma, nn.Parameter):  # MultiHeadRMSNorm
                nn.init.ones_(m.gamma)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.class_embedder is not None:
            self.class_embedder.init_weights()
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out.weight)
                nn.init.zeros_(block.cross_attn.to_out.bias)
        if self.final_adaLN_modulation is not None:
            nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- latent normalisation -------------------------------------------------------------------

    _CHANNEL_DIM = -1  # where latent channels are: -1 for tokens (b, m, c), 1 for grids (b, c, r, r, r)

    def _channel_shape(self, z: torch.Tensor) -> list[int]:
        shape = [1] * z.ndim
        shape[self._CHANNEL_DIM] = self.config.in_channels
        return shape

    def set_latent_normalizer(self, normalizer: LatentNormalizer) -> None:
        """Store a fitted normaliser ("channel", "global" or "scale" mode) in the model's buffers."""
        c = self.config.in_channels
        mean = normalizer.mean.expand(c) if normalizer.mean.numel() == 1 else normalizer.mean
        std = normalizer.std.expand(c) if normalizer.std.numel() == 1 else normalizer.std
        if mean.shape != (c,):
            raise ValueError(f"normaliser has {normalizer.mean.numel()} channels, the model {c}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the space the flow is trained in: ``(z - latent_mean) / latent_std``."""
        shape = self._channel_shape(z)
        return (z - self.latent_mean.view(shape).to(z.dtype)) / self.latent_std.view(shape).to(z.dtype)

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents` (sampler output -> VAE latents)."""
        shape = self._channel_shape(x)
        return x * self.latent_std.view(shape).to(x.dtype) + self.latent_mean.view(shape).to(x.dtype)

    def null_condition(self, batch: int, *, num_tokens: int | None = None,
                       device=None) -> torch.Tensor | None:
        """The null condition for classifier-free guidance: null labels, zero tokens, or None."""
        if self.config.cond == "class":
            return self.class_embedder.null_condition(batch, device=device)
        if self.config.cond == "image":
            if num_tokens is None:
                raise ValueError("the null image condition needs the number of condition tokens")
            return torch.zeros(batch, num_tokens, self.config.cond_dim, device=device)
        return None


class TokenDiT(DiTBase):
    """DiT over a set of latent tokens ``(b, m, c)`` (VecSet latents): ``forward(x, t, cond) -> v``.

    Submodules: ``input_layer`` Linear(c, C), ``t_embedder``, optional ``class_embedder``, ``blocks``,
    optional ``skips``, optional ``final_adaLN_modulation``, ``out_layer`` Linear(C, c).
    """

    kind: ClassVar[str] = "token_dit"
    config_class: ClassVar[type] = TokenDiTConfig

    def __init__(self, config: TokenDiTConfig = TokenDiTConfig()):
        super().__init__()
        self.config = config
        self.input_layer = nn.Linear(config.in_channels, config.width)
        self._build_trunk(config)
        self.out_layer = nn.Linear(config.width, config.in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every tensor (DiT / TRELLIS recipe with adaLN-Zero).

        * every Linear: xavier-uniform weight, zero bias; affine LayerNorms 1 / 0; qk RMS gains 1;
        * timestep MLP weights N(0, 0.02); class embedding N(0, 0.02) (null row included);
        * zero: each block's ``adaLN_modulation`` output Linear (gates, shifts and scales start at 0,
          so self-attention and MLP branches are off), each ``cross_attn.to_out``,
          ``final_adaLN_modulation`` and ``out_layer``. Hence a fresh model outputs exactly 0 and every
          block is the identity.
        """
        self._init_trunk()

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
        """x: (b, m, c) noisy latents; t: (b,) or scalar in [0, 1] (0 = noise); cond: see module doc.

        Returns the velocity (b, m, c).
        """
        if x.ndim != 3 or x.shape[-1] != self.config.in_channels:
            raise ValueError(f"TokenDiT expects (b, m, {self.config.in_channels}) latents, "
                             f"got {tuple(x.shape)}")
        h = self.input_layer(x)  # (b, m, C)
        h = self._trunk(h, time_input(t, x), cond)
        return self.out_layer(h)  # (b, m, c)



class GridDiT(DiTBase):
    """DiT over a latent grid ``(b, c, r, r, r)`` (TRELLIS ``SparseStructureFlowModel``).

    (Latent channels are axis 1, so the normalisation buffers broadcast over ``(1, c, 1, 1, 1)``.)

    Submodules (TRELLIS names): ``input_layer`` Linear(c p^3, C), buffer ``pos_emb`` (n, C),
    ``t_embedder``, ``blocks``, ``out_layer`` Linear(C, c p^3); plus optional ``class_embedder``,
    ``skips`` and ``final_adaLN_modulation`` (absent in the TRELLIS preset). TRELLIS's released
    ``ss_flow_*`` files load through :meth:`from_pretrained`, converted to shapeflow's flow convention
    (:mod:`shapeflow.models.pretrained.trellis_ss_flow`).
    """

    kind: ClassVar[str] = "grid_dit"
    config_class: ClassVar[type] = GridDiTConfig
    releases = (trellis_ss_flow.FORMAT,)

    _CHANNEL_DIM = 1

    def __init__(self, config: GridDiTConfig = GridDiTConfig()):
        super().__init__()
        self.config = config
        p3 = config.patch_size ** 3
        self.input_layer = nn.Linear(config.in_channels * p3, config.width)
        grid = config.resolution // config.patch_size
        self.register_buffer("pos_emb", sincos_3d_position_embedding(grid, config.width), persistent=True)
        self._build_trunk(config)
        self.out_layer = nn.Linear(config.width, config.in_channels * p3)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every tensor as :meth:`TokenDiT.init_weights`; ``pos_emb`` = the 3D sin-cos table."""
        self._init_trunk()
        self.pos_emb.copy_(sincos_3d_position_embedding(self.config.resolution // self.config.patch_size,
                                                        self.config.width))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
        """x: (b, c, r, r, r) noisy latents; t: (b,) or scalar in [0, 1] (0 = noise). Returns the velocity."""
        cfg = self.config
        r = cfg.resolution
        if x.ndim != 5 or x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != (r, r, r):
            raise ValueError(f"GridDiT expects (b, {cfg.in_channels}, {r}, {r}, {r}) latents, "
                             f"got {tuple(x.shape)}")
        h = patchify_3d(x, cfg.patch_size, tokens=True)  # (b, n, c p^3)
        h = self.input_layer(h) + self.pos_emb[None].to(h.dtype)  # (b, n, C)
        h = self._trunk(h, time_input(t, x), cond)
        h = self.out_layer(h)  # (b, n, c p^3)
        return unpatchify_3d(h, cfg.patch_size, grid=(r, r, r))  # (b, c, r, r, r)
