"""Voxel-grid VAE: the TRELLIS sparse-structure VAE family (dense 3D conv), plus an SDF-grid variant.

A 3D grid goes in, a smaller latent grid ``(b, c, d', h', w')`` comes out, and the decoder mirrors
the encoder back to the input grid (Xiang et al., "Structured 3D Latents for Scalable and Versatile 3D
Generation" (TRELLIS), arXiv:2412.01506, sparse-structure VAE; seed article section C.2).

Design choices
--------------
* **TRELLIS module and attribute names** (``input_layer``, a flat ``blocks`` ModuleList with the
  down/upsample blocks inline, ``middle_block``, ``out_layer = [norm, SiLU, conv]``, ``norm1/conv1/
  norm2/conv2/skip_connection``, ``conv``), so the released ``ss_enc/ss_dec_conv3d_16l8_fp16``
  checkpoints load strictly with an identity key map (see :mod:`shapeflow.models.pretrained.trellis_ss_vae`).
* **Norm:** ``"layer"`` is TRELLIS's ``ChannelLayerNorm32`` (LayerNorm over channels, computed in fp32);
  ``"group"`` is ``GroupNorm32`` with ``gcd(32, c)`` groups (fp32). Unlike TRELLIS, where ``norm_type``
  only reaches ``out_layer[0]`` and every ResBlock uses LayerNorm anyway, ours applies to every norm.
* **Upsampling:** ``"pixel_shuffle"`` (TRELLIS: Conv3d to 8x channels, then :func:`pixel_shuffle_3d`),
  ``"transpose"`` (``ConvTranspose3d`` kernel 4, stride 2, padding 1, the common 3D-GAN choice; kept for
  the checkerboard/speed comparison in ``benchmarks/bench_grid_vae.py``) or ``"nearest"``
  (resize-convolution: nearest x2 then Conv3d k3; Odena et al., Distill 2016). Downsampling is always
  the stride-2 kernel-2 Conv3d of TRELLIS.
* **Posterior:** the shared :class:`~shapeflow.models.distributions.DiagonalGaussian` over the latent grid.
* **Inputs.** ``"occupancy"``: 0/1 voxels on the *cell* grid (``resolution^3``; TRELLIS's 64^3 surface
  shell), fed as-is (as TRELLIS does); the decoder returns logits. ``"sdf"``: a truncated SDF (world
  units, negative inside) on the *node* grid (``(resolution + 1)^3`` samples); the model sees
  ``clamp(sdf, -t, t) / t`` and returns ``t * raw``, i.e. SDF in world units.
* **Odd grid sizes** (node grids have ``res + 1`` samples): ``encode`` pads the high end of each axis to a
  multiple of the downsampling factor (replicate for SDF, zeros for occupancy) and ``decode`` drops
  the same number of trailing samples, so ``decode(encode(x))`` has ``x``'s size.
* **fp32 parameters.** TRELLIS's fp16 torso is a GPU speed choice that does not change the function (its
  loader casts to fp32). Under autocast the convs run in bf16/fp16 while norms compute in fp32 and
  ``encode``/``decode`` return fp32 (on this CPU bf16 is slower than fp32, ``cpu_probe.md``).
* **Activation layout:** ``channels_last=True`` (default) runs every conv on ``channels_last_3d``
  activations: set once after each half's first conv, then kept by convs, :class:`ChannelLayerNorm32`
  and :func:`pixel_shuffle_3d`. On a CPU (oneDNN) it is faster than NCDHW, most for the small presets
  (BENCHMARKS.md, "Grid VAE"). Weights keep the default layout, so checkpoints
  do not depend on it.

Legend: b batch, c channels, r grid samples per axis, l latent grid size per axis.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapeflow.checkpoint import Pretrained
from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND
from shapeflow.geometry.marching_cubes import marching_cubes
from shapeflow.models.distributions import DiagonalGaussian
from shapeflow.models.pretrained import trellis_ss_vae
from shapeflow.nn.spatial import pixel_shuffle_3d, pixel_unshuffle_3d

log = logging.getLogger(__name__)

__all__ = [
    "GridVAEConfig",
    "ChannelLayerNorm32",
    "GroupNorm32",
    "ResBlock3d",
    "DownsampleBlock3d",
    "UpsampleBlock3d",
    "Encoder",
    "Decoder",
    "GridVAE",
    "grid_to_field",
    "grid_to_mesh",
]

NORMS = ("layer", "group")
UPSAMPLES = ("pixel_shuffle", "transpose", "nearest")
INPUTS = ("occupancy", "sdf")
OCC_LOSSES = ("dice", "bce", "dice+bce")
SDF_LOSSES = ("l1", "mse")


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridVAEConfig:
    """Everything that defines a grid VAE (architecture + its loss). Defaults = TRELLIS's release."""

    # "occupancy": 0/1 voxels on the cell grid (TRELLIS); "sdf": truncated SDF on the node grid
    input: Literal["occupancy", "sdf"] = "occupancy"
    resolution: int = 64  # cells per axis: occupancy grid is res^3, the SDF node grid (res + 1)^3
    in_channels: int = 1  # channels of the input grid (1 occupancy or 1 SDF channel)
    out_channels: int = 1  # channels the decoder returns (logits or SDF)
    latent_channels: int = 8  # latent grid channels; TRELLIS 8 (16^3 x 8 = 32768 floats per shape)
    channels: tuple[int, ...] = (32, 128, 512)  # encoder width per level; stride-2 downsample between levels
    decoder_channels: tuple[int, ...] | None = None  # decoder width per level; None = reversed(channels)
    num_res_blocks: int = 2  # ResBlock3d per level (encoder and decoder)
    num_res_blocks_middle: int = 2  # ResBlock3d at the latent resolution, each side
    norm: Literal["layer", "group"] = "layer"  # ChannelLayerNorm32 (TRELLIS) or GroupNorm32, both in fp32
    # "pixel_shuffle" (TRELLIS), "transpose" (ConvTranspose3d k4 s2) or "nearest" (resize + conv)
    upsample: Literal["pixel_shuffle", "transpose", "nearest"] = "pixel_shuffle"
    # reconstruction loss; occupancy: "dice" (TRELLIS) | "bce" | "dice+bce"; sdf: "l1" | "mse"
    loss: Literal["dice", "bce", "dice+bce", "l1", "mse"] = "dice"
    kl_weight: float = 1e-3  # weight of the per-element-mean KL (TRELLIS released config: 1e-3)
    sdf_truncation: float = 0.0625  # sdf input: |SDF| clamp, world units (2 voxels at 64, as preprocess)
    sdf_band_weight: float = 1.0  # sdf input only: extra loss weight on nodes with |sdf| < t (the band)
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, more compute
    channels_last: bool = True  # channels_last_3d activations: faster on CPUs (BENCHMARKS.md)
    # lossless space-to-channel factor: the grid enters through pixel_unshuffle_3d(stem) and leaves through
    # pixel_shuffle_3d(stem), so every conv runs at 1/stem resolution (TRELLIS: 1; CPU presets: 2)
    stem: int = 1
    latent_scale: float = 1.0  # generators see z * latent_scale (TRELLIS: 1); scale_latents / unscale_latents
    decoder_only: bool = False  # no encoder (e.g. TRELLIS's decoder file on its own, to decode flow samples)

    PRESETS: ClassVar[dict[str, dict]] = {
        # CPU size: 64^3 occupancy -> 16^3 x 8 latent (TRELLIS's latent shape). The 2x space-to-channel stem
        # runs every conv at <= 32^3 (several times faster per step than full-resolution convs on a CPU).
        "tiny": dict(channels=(16, 64), stem=2, num_res_blocks=1, num_res_blocks_middle=1, loss="dice+bce"),
        # Latent size comparable to the tiny VecSet VAE (128 x 16 = 2048): 64^3 occupancy -> 8^3 x 4.
        "tiny8": dict(channels=(16, 32, 64), stem=2, latent_channels=4, num_res_blocks=1, num_res_blocks_middle=1,
                      loss="dice+bce"),
        # SDF-grid counterpart with the tiny VecSet's latent budget: 65^3 SDF nodes (padded to 72^3) -> 9^3 x 4.
        "sdf_tiny": dict(input="sdf", resolution=64, channels=(16, 32, 64), stem=2, latent_channels=4,
                         num_res_blocks=1, num_res_blocks_middle=1, loss="l1", sdf_truncation=0.0625),
        # TRELLIS released ss_vae_conv3d_16l8_fp16: 64^3 -> 16^3 x 8, encoder ~59 M / decoder ~74 M params.
        "trellis": dict(),
        # SDF grid in, SDF grid out at 64 cells (65^3 nodes, padded to 68^3) -> 17^3 x 8 latent, 1.6 M params.
        # Truncation 2 voxels = the preprocessing default (`shapeflow preprocess --tsdf-res 64`).
        "sdf64": dict(input="sdf", resolution=64, channels=(16, 32, 64), num_res_blocks=1,
                      num_res_blocks_middle=1, loss="l1", sdf_truncation=0.0625),
        # SDF grid at 128 cells (129^3 nodes, padded to 136^3), three downsamples -> 17^3 x 8 latent.
        "sdf128": dict(input="sdf", resolution=128, channels=(8, 16, 32, 64), num_res_blocks=1,
                       num_res_blocks_middle=1, loss="l1", sdf_truncation=0.03125),
    }

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.decoder_channels is not None:
            object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        _choice("input", self.input, INPUTS)
        _choice("norm", self.norm, NORMS)
        _choice("upsample", self.upsample, UPSAMPLES)
        _choice("loss", self.loss, OCC_LOSSES if self.input == "occupancy" else SDF_LOSSES,
                f" for input={self.input!r}")
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive widths, got {self.channels}")
        if len(self.dec_channels) != len(self.channels):
            raise ValueError(
                f"decoder_channels {self.decoder_channels} must have as many levels as "
                f"channels {self.channels}"
            )
        for name in ("resolution", "in_channels", "out_channels", "latent_channels", "stem"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0 or self.num_res_blocks_middle < 0:
            raise ValueError("num_res_blocks and num_res_blocks_middle must be >= 0")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.input == "sdf" and not self.sdf_truncation > 0:
            raise ValueError(f"sdf_truncation must be > 0, got {self.sdf_truncation}")
        if not self.latent_scale > 0:
            raise ValueError(f"latent_scale must be > 0, got {self.latent_scale}")

    # derived sizes ----------------------------------------------------------------------------------
    @property
    def dec_channels(self) -> tuple[int, ...]:
        """Decoder widths, latent side first."""
        return self.decoder_channels if self.decoder_channels is not None else tuple(reversed(self.channels))

    @property
    def downsample_factor(self) -> int:
        """Input samples per latent sample along one axis (``stem * 2 ** number of downsamples``)."""
        return self.stem * 2 ** (len(self.channels) - 1)

    @property
    def grid_size(self) -> int:
        """Samples per axis of the data grid: ``resolution`` cells, or ``resolution + 1`` SDF nodes."""
        return self.resolution + (1 if self.input == "sdf" else 0)

    @property
    def latent_size(self) -> int:
        """Latent samples per axis (the data grid is padded up to a multiple of the factor)."""
        return -(-self.grid_size // self.downsample_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(c, l, l, l)`` of one latent."""
        n = self.latent_size
        return (self.latent_channels, n, n, n)


def _choice(name: str, value, options, extra: str = "") -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}{extra}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


class ChannelLayerNorm32(nn.LayerNorm):
    """LayerNorm over the channel dim of a ``(b, c, d, h, w)`` grid, computed in fp32 (TRELLIS).

    The output keeps the input's memory format: free for ``channels_last_3d`` input (the permute is a
    view), one copy back for NCDHW input (TRELLIS returns the permuted view, which silently switches the
    rest of its network to channels-last strides).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 4, 1).float()  # (b, d, h, w, c); a view for channels_last_3d input
        y = F.layer_norm(y, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        y = y.permute(0, 4, 1, 2, 3).to(x.dtype)  # (b, c, d, h, w) with channels_last_3d strides
        cl = x.is_contiguous(memory_format=torch.channels_last_3d)
        return y.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 (TRELLIS ``GroupNorm32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def make_norm(kind: str, channels: int) -> nn.Module:
    """The norm layer of a config: ``"layer"`` or ``"group"`` (``gcd(32, channels)`` groups)."""
    if kind == "layer":
        return ChannelLayerNorm32(channels, eps=1e-5)
    if kind == "group":
        return GroupNorm32(math.gcd(32, channels), channels, eps=1e-5)
    raise ValueError(f"unknown norm {kind!r}; expected one of {list(NORMS)}")


class ResBlock3d(nn.Module):
    """Pre-norm residual block: ``h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))); h + skip(x)``."""

    def __init__(self, channels: int, out_channels: int | None = None, *, norm: str = "layer"):
        super().__init__()
        out_channels = out_channels or channels
        self.norm1 = make_norm(norm, channels)
        self.conv1 = nn.Conv3d(channels, out_channels, 3, padding=1)
        self.norm2 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip_connection = (
            nn.Conv3d(channels, out_channels, 1) if channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip_connection(x)


class DownsampleBlock3d(nn.Module):
    """Halve each spatial size: Conv3d kernel 2, stride 2 (TRELLIS ``mode="conv"``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsampleBlock3d(nn.Module):
    """Double each spatial size (``mode`` as in :class:`GridVAEConfig.upsample`)."""

    def __init__(self, in_channels: int, out_channels: int, *, mode: str = "pixel_shuffle"):
        super().__init__()
        _choice("upsample mode", mode, UPSAMPLES)
        self.mode = mode
        if mode == "pixel_shuffle":
            self.conv = nn.Conv3d(in_channels, out_channels * 8, 3, padding=1)
        elif mode == "transpose":
            self.conv = nn.ConvTranspose3d(in_channels, out_channels, 4, stride=2, padding=1)
        else:
            self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel_shuffle":
            return pixel_shuffle_3d(self.conv(x), 2)  # (b, c*8, l, l, l) -> (b, c, 2l, 2l, 2l)
        if self.mode == "transpose":
            return self.conv(x)
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _layout(h: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Fix the activation memory format once; convs, norms and pixel shuffle then keep it.

    Needed after the first conv because a 1-channel input is both NCDHW- and channels-last-contiguous,
    and the conv picks NCDHW for it.
    """
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return h.contiguous(memory_format=fmt)


def _run_blocks(blocks, h: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        h = checkpoint(block, h, use_reentrant=False) if use_checkpoint else block(h)
    return h


class Encoder(nn.Module):
    """Grid -> latent moments ``(b, 2 * latent_channels, l, l, l)`` (TRELLIS ``SparseStructureEncoder``)."""

    def __init__(self, cfg: GridVAEConfig):
        super().__init__()
        ch, norm = cfg.channels, cfg.norm
        self.grad_checkpointing = cfg.grad_checkpointing
        self.channels_last = cfg.channels_last
        self.input_layer = nn.Conv3d(cfg.in_channels * cfg.stem ** 3, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c, c, norm=norm) for _ in range(cfg.num_res_blocks))
            if i < len(ch) - 1:
                self.blocks.append(DownsampleBlock3d(c, ch[i + 1]))
        self.middle_block = nn.Sequential(
            *(ResBlock3d(ch[-1], ch[-1], norm=norm) for _ in range(cfg.num_res_blocks_middle))
        )
        self.out_layer = nn.Sequential(
            make_norm(norm, ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        h = _layout(self.input_layer(x), self.channels_last)  # (b, c0, r, r, r)
        h = _run_blocks(self.blocks, h, ckpt)
        h = _run_blocks(self.middle_block, h, ckpt)
        return self.out_layer(h)  # (b, 2 c_lat, l, l, l)


class Decoder(nn.Module):
    """Latent ``(b, c_lat, l, l, l)`` -> grid ``(b, c_out, f*l, f*l, f*l)`` (``SparseStructureDecoder``)."""

    def __init__(self, cfg: GridVAEConfig):
        super().__init__()
        ch, norm = cfg.dec_channels, cfg.norm
        self.grad_checkpointing = cfg.grad_checkpointing
        self.channels_last = cfg.channels_last
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(
            *(ResBlock3d(ch[0], ch[0], norm=norm) for _ in range(cfg.num_res_blocks_middle))
        )
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c, c, norm=norm) for _ in range(cfg.num_res_blocks))
            if i < len(ch) - 1:
                self.blocks.append(UpsampleBlock3d(c, ch[i + 1], mode=cfg.upsample))
        self.out_layer = nn.Sequential(
            make_norm(norm, ch[-1]), nn.SiLU(), nn.Conv3d(ch[-1], cfg.out_channels * cfg.stem ** 3, 3, padding=1)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        h = _layout(self.input_layer(z), self.channels_last)  # (b, c0, l, l, l)
        h = _run_blocks(self.middle_block, h, ckpt)
        h = _run_blocks(self.blocks, h, ckpt)
        return self.out_layer(h)  # (b, c_out, f l, f l, f l)


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


class GridVAE(Pretrained, nn.Module):
    """Grid in, latent grid, grid out.

    ``config.decoder_only`` builds the decoder only (e.g. TRELLIS's decoder file on its own, for decoding
    flow samples); :meth:`encode` then raises and the state dict holds ``decoder.*`` keys only.
    TRELLIS's released ``ss_enc_* / ss_dec_*`` files load through :meth:`from_pretrained` as published.
    """

    kind: ClassVar[str] = "grid_vae"
    config_class: ClassVar[type] = GridVAEConfig
    releases = (trellis_ss_vae.FORMAT,)

    def __init__(self, config: GridVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = None if config.decoder_only else Encoder(config)
        self.decoder = Decoder(config)
        self.init_weights()

    @property
    def grad_checkpointing(self) -> bool:
        """Recompute block activations in backward (the training engine sets this attribute)."""
        return self.decoder.grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        for part in (self.encoder, self.decoder):
            if part is not None:
                part.grad_checkpointing = bool(value)

    def init_weights(self) -> None:
        """Initialise every tensor (TRELLIS's scheme).

        * Conv3d / ConvTranspose3d: PyTorch's default (Kaiming-uniform with ``a = sqrt(5)`` weights, uniform
          ``+-1/sqrt(fan_in)`` bias).
        * Norm layers: weight 1, bias 0.
        * ``conv2`` of every ResBlock3d: zeros (weight and bias), so each residual block starts as the
          identity (TRELLIS ``zero_module``) and depth does not change the initial signal scale.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.LayerNorm, nn.GroupNorm)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, ResBlock3d):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)

    # ---- grid <-> network units ----------------------------------------------------------------------
    @property
    def _pad(self) -> int:
        f = self.config.downsample_factor
        return -(-self.config.grid_size // f) * f - self.config.grid_size

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"GridVAE expects a (b, {cfg.in_channels}, r, r, r) grid, got shape {tuple(x.shape)}"
            )
        x = x.float()
        if cfg.input == "sdf":
            x = x.clamp(-cfg.sdf_truncation, cfg.sdf_truncation) / cfg.sdf_truncation
        f = cfg.downsample_factor
        pads = [(-n) % f for n in x.shape[2:]]
        if any(pads):
            mode = "replicate" if cfg.input == "sdf" else "constant"
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode=mode)  # high end of each axis
        if cfg.stem > 1:
            x = pixel_unshuffle_3d(x, cfg.stem)  # (b, in s^3, r/s, r/s, r/s), lossless
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    # ---- public API -----------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Grid ``(b, in, r, r, r)`` -> posterior over latents ``(b, latent_channels, l, l, l)``.

        ``x`` is 0/1 occupancy on the cell grid (``input="occupancy"``) or a truncated SDF in world units,
        negative inside, on the node grid (``input="sdf"``). ``l = ceil(r / downsample_factor)``.
        """
        if self.encoder is None:
            raise ValueError("this GridVAE has no encoder (config.decoder_only: built or loaded decoder-only)")
        moments = self.encoder(self._prepare(x))  # (b, 2 c_lat, l, l, l)
        return DiagonalGaussian.from_moments(moments.float().contiguous(), dim=1)  # fp32 even under autocast

    def decode(self, z: torch.Tensor, size: int | tuple[int, int, int] | None = None) -> torch.Tensor:
        """Latents ``(b, latent_channels, l, l, l)`` -> grid ``(b, out, s, s, s)``.

        Returns occupancy **logits** on the cell grid (``p = sigmoid``; TRELLIS thresholds ``logits > 0``)
        or the SDF in world units on the node grid. The decoder makes ``f * l`` samples per axis; the
        output keeps the first ``size`` of them, by default ``f * l - pad`` with ``pad`` the padding that
        ``encode`` adds for this config's grid size (0 for 64^3 occupancy; 3 for a 129^3 node grid),
        so ``decode`` of a ``cfg.latent_shape`` latent has ``cfg.grid_size`` samples per axis.
        """
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"GridVAE.decode expects (b, {self.config.latent_channels}, l, l, l) latents, "
                f"got {tuple(z.shape)}"
            )
        z = z.float()
        if self.config.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)
        out = self.decoder(z).float()  # (b, c_out s^3, f l / s, ...), fp32 even under autocast
        if self.config.stem > 1:
            out = pixel_shuffle_3d(out, self.config.stem)  # (b, c_out, f l, f l, f l)
        if size is None:
            size = tuple(n - self._pad for n in out.shape[2:])
        elif isinstance(size, int):
            size = (size,) * 3
        if any(s > n for s, n in zip(size, out.shape[2:])):
            raise ValueError(
                f"GridVAE.decode: size {tuple(size)} exceeds the decoded grid {tuple(out.shape[2:])}"
            )
        out = out[..., : size[0], : size[1], : size[2]]
        if self.config.input == "sdf":
            out = out * self.config.sdf_truncation
        return out.contiguous()

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct ``x``: returns ``(decoded grid of x's shape, posterior)``.

        ``sample_posterior=True`` decodes a reparameterised sample (training); ``False`` the mean.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, size=tuple(x.shape[2:])), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the latents generators model: ``z * config.latent_scale``."""
        return z * self.config.latent_scale

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents` (generator samples -> VAE latents for :meth:`decode`)."""
        return x / self.config.latent_scale

    @classmethod
    def from_pretrained(cls, path, decoder_path=None, *, ema: bool = False, **overrides) -> "GridVAE":
        """Load a grid VAE checkpoint (:meth:`shapeflow.checkpoint.Pretrained.from_pretrained`), or TRELLIS's
        released sparse-structure files: an ``ss_enc_*`` prefix (or either of its files) with the ``ss_dec_*``
        file beside it or at ``decoder_path``, or an ``ss_dec_*`` file alone (a decoder-only model)."""
        if decoder_path is not None:
            if ema:
                raise ValueError(f"{path}: ema=True needs a shapeflow checkpoint directory")
            return cls.from_release(trellis_ss_vae.convert(path, decoder_path), **overrides)
        return super().from_pretrained(path, ema=ema, **overrides)


# --------------------------------------------------------------------------------------------------
# Decoder output -> marching-cubes field
# --------------------------------------------------------------------------------------------------


def grid_to_field(output: torch.Tensor, input_kind: str, bound: float = BOUND) -> tuple[np.ndarray, float]:
    """Turn decoder output into node-grid fields for ``shapeflow.geometry.marching_cubes`` at level 0.

    Parameters
    ----------
    output : (b, 1, r, r, r) tensor from :meth:`GridVAE.decode`
        ``input_kind="occupancy"``: logits on the **cell** grid of ``r`` voxels per axis.
        ``input_kind="sdf"``: SDF (world units, negative inside) on the **node** grid (``r = res + 1``).
    input_kind : "occupancy" or "sdf"
    bound : float
        Half side of the data cube (``BOUND``).

    Returns
    -------
    fields : (b, n, n, n) float32 numpy, negative inside
    field_bound : float
        The half side to pass to marching cubes with ``fields[i]`` (``res = n - 1``).

    Notes
    -----
    Occupancy voxels are cells, so the probability is known at cell centres
    ``-bound + (i + 0.5) h`` (``h = 2 bound / r``). Those centres, plus one ring of "empty" samples
    outside, form a node grid of ``r + 1`` cells with the same spacing ``h`` over
    ``[-bound - h/2, bound + h/2]`` (the half-cell shift, :func:`shapeflow.geometry.grid.padded_cell_bound`):
    ``n = r + 2``. The field is
    ``0.5 - sigmoid(logits)``, so level 0 is the probability-0.5 iso-surface and the padding ring
    (probability 0) closes every surface. SDF outputs already are node-grid fields: returned as-is
    with ``field_bound = bound``.
    """
    if output.dim() != 5 or output.shape[1] != 1:
        raise ValueError(f"grid_to_field expects a (b, 1, r, r, r) decoder output, got {tuple(output.shape)}")
    out = output.detach().float()[:, 0]
    if input_kind == "occupancy":
        r = out.shape[-1]
        field = F.pad(0.5 - torch.sigmoid(out), (1, 1, 1, 1, 1, 1), value=0.5)  # (b, r+2, r+2, r+2)
        return field.cpu().numpy().astype(np.float32), grid.padded_cell_bound(r, float(bound))
    if input_kind == "sdf":
        return out.cpu().numpy().astype(np.float32), float(bound)
    raise ValueError(f"input_kind must be 'occupancy' or 'sdf', got {input_kind!r}")


def grid_to_mesh(
    output: torch.Tensor, input_kind: str, bound: float = BOUND, **mc_kwargs
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Decoder output ``(b, 1, r, r, r)`` -> one ``(vertices (n, 3) float64, faces (f, 3) int64)`` per sample.

    Runs :func:`shapeflow.geometry.marching_cubes.marching_cubes` at level 0 on :func:`grid_to_field`'s
    fields (occupancy: the probability-0.5 surface through the cell centres; SDF: the zero level set on
    the node grid). ``mc_kwargs`` go to marching cubes (``largest_component``, ``min_component_faces``).
    An output with no surface (all empty / all full) raises marching cubes' ``ValueError``.
    """
    fields, field_bound = grid_to_field(output, input_kind, bound)
    return [marching_cubes(f, 0.0, field_bound, **mc_kwargs) for f in fields]
