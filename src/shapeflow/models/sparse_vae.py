"""Sparse-voxel SDF VAE: the signed distance on the surface band of a high-resolution node grid -> a sparse
latent grid at 1/8 or 1/16 of the resolution -> the band's signed distance again.

Direct3D-S2's sparse SDF VAE (arXiv 2505.17412) and TRELLIS.2's shape SC-VAE (arXiv 2512.14692) encode the
surface of a shape on the sparse set of voxels near it at 256^3-1024^3 instead of a dense 64^3 grid or a
global token set; this is that family, built on shapeflow's plain-PyTorch sparse engine
(:mod:`shapeflow.sparse`), so it trains and runs on a CPU and, unchanged, on GPUs.

Design choices
--------------
* **Input and output: the band.** The data (``shapeflow preprocess --sparse-res R``,
  :mod:`shapeflow.geometry.sparse_band`) are the nodes of the ``R``-cell node grid within ``band`` node
  spacings of the surface (default ``sqrt(3)``: every corner of a cell the surface crosses) with their exact
  signed distance. The network sees and predicts ``tsdf = clamp(sdf / (band * h), -1, 1)``, ``h = 2 / R``:
  the same numbers at every resolution, so one model can be trained and run at several ``R``: nothing in the
  network depends on ``R`` (``config.resolution`` is the data's and :meth:`SparseSDFVAE.decode_mesh`'s default),
  and a grid of any ``R`` divisible by ``2^L`` is encoded, including crops of a band (how ``tiny`` trains).
* **A sparse convolutional U-Net without attention** (TRELLIS.2): levels ``0 .. L`` of the node grid, level
  ``l`` at ``R / 2^l``; between levels the 2x2x2 children of a node are folded into its channels
  (space-to-channel, :func:`shapeflow.sparse.fold`) and a linear layer maps ``8 C_l -> C_(l+1)``; each level
  has ``blocks[l]`` ConvNeXt-style blocks (3^3 submanifold conv, LayerNorm, MLP, residual). As in TRELLIS.2
  the finest level has no convolution by default (``blocks[0] = 0``): it is where most voxels are.
* **Latent**: ``latent_channels`` numbers per active node at level ``L`` (``R / 8`` for ``len(channels) == 4``,
  ``R / 16`` for 5), a :class:`~shapeflow.models.distributions.DiagonalGaussian` like the other VAEs; the
  latent's active set is the band's structure at that level (every node with a band node below it).
* **Decoder: structure and values.** It mirrors the encoder; each upsampling to levels ``L - 1 .. 1``
  predicts 8 "child exists" logits per voxel and unfolds channels to the kept children
  (:func:`shapeflow.sparse.unfold`), so the decoder reconstructs the band's structure from the latent's
  (TRELLIS.2's pruning). In training the children are the true ones (teacher forcing,
  :func:`shapeflow.sparse.unfold_to`) and the logits learn them with BCE; at inference children with
  probability above ``threshold`` are kept. The last upsampling, to the band's own grid, keeps **all 8
  children** of every level-1 node and a linear layer gives each its tsdf: a cell the surface crosses has its
  8 corners in the band, hence in complete level-1 blocks, so marching cubes never meets a crossing cell with a
  missing corner (a pruned corner is a hole in the mesh: the first trained model left 20-30 000 boundary
  edges on a thin-walled mesh). The children outside the band are supervised exactly too: one outside the band
  has ``|sdf| > sqrt(3) h`` and every node of its 2x2x2 block lies within ``sqrt(3) h`` of it, so it has the
  sign of the block's band nodes and a tsdf beyond +-1 (a hinge loss asks for that).
* **Losses** (:func:`sparse_vae_loss`): L1 on the tsdf of the band, weighted ``1 + near_weight`` on nodes with
  ``|tsdf| < 0.5``; the hinge ``relu(1 - sign * tsdf)`` on the other children of the finest level;
  child-existence BCE per level times ``existence_weight``; the per-element-mean KL times
  ``kl_weight`` (TRELLIS.2 1e-6).
* **Meshes**: :meth:`SparseSDFVAE.decode_mesh` runs :func:`shapeflow.geometry.sparse_mc.sparse_marching_cubes`
  on the decoded nodes: marching cubes over cells whose 8 corners are decoded, block by block, never a dense
  ``R^3`` array; the absent nodes next to the decoded ones first get the sign their neighbours vote for
  (:func:`shapeflow.geometry.sparse_mc.close_band`), so a surface never ends at the edge of the decoded set,
  and components under 1 % of the faces (floaters) are dropped.

Legend: N band nodes (level 0), M latent nodes, C channels, b batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapeflow.checkpoint import Pretrained
from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND, Transform, normalize_transform
from shapeflow.geometry.marching_cubes import EmptySurfaceError, filter_components
from shapeflow.geometry.sparse_band import band_nodes
from shapeflow.geometry.sparse_mc import close_band, sparse_marching_cubes
from shapeflow.geometry.watertight import make_watertight
from shapeflow.models.distributions import DiagonalGaussian
from shapeflow.sparse.tensor import decode_keys, linear_keys
from shapeflow.sparse import (
    SparseLayerNorm,
    SparseLinear,
    SparseTensor,
    SparseWindowAttention,
    SubMConv3d,
    child_mask,
    fold,
    unfold,
    unfold_to,
)

INIT_LOGVAR = -4.0  # initial log-variance of the posterior (the bias of its last layer)

# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseSDFVAEConfig:
    """Architecture and loss of a :class:`SparseSDFVAE` (defaults = the ``tiny`` preset)."""

    resolution: int = 256  # R: cells per axis of the band's node grid (the data's --sparse-res; meshes' default)
    band: float = math.sqrt(3.0)  # band half-width in node spacings; tsdf = clamp(sdf / (band h), -1, 1)
    channels: tuple[int, ...] = (16, 32, 64, 128)  # width per level, finest first; len - 1 halvings (R/8 here)
    blocks: tuple[int, ...] = (0, 1, 2, 2)  # ConvNeXt blocks per level (encoder; the decoder mirrors them)
    latent_channels: int = 8  # numbers per latent node
    mlp_ratio: float = 2.0  # hidden width of a block's MLP / its width
    attn_blocks: int = 0  # window-attention blocks at the latent level, each side (Direct3D-S2: Swin there)
    attn_window: int = 8  # attention window, latent nodes per axis
    attn_heads: int = 4
    threshold: float = 0.5  # inference: keep a child when sigmoid(logit) > threshold (TRELLIS.2: logit > 0)
    near_weight: float = 4.0  # extra tsdf-loss weight on nodes with |tsdf| < 0.5
    existence_weight: float = 0.5  # weight of the child-existence BCE (mean over levels)
    kl_weight: float = 1e-5  # weight of the per-element-mean KL (TRELLIS.2: 1e-6)
    latent_scale: float = 1.0  # generators see z * latent_scale (scale_latents / unscale_latents)
    grad_checkpointing: bool = False  # recompute block activations in backward

    PRESETS: ClassVar[dict[str, dict]] = {
        # Trains on a 2-core CPU on crops of 256^3 bands: 1/8 resolution, 8 numbers per latent node.
        "tiny": dict(resolution=256, channels=(16, 32, 64, 128), blocks=(0, 1, 2, 2), latent_channels=8),
        # Direct3D-S2-like at 512^3: 1/8 resolution (64^3 latent grid), window attention at the latent level.
        "base": dict(resolution=512, channels=(32, 64, 128, 512), blocks=(0, 2, 4, 8), latent_channels=16,
                     attn_blocks=4, attn_window=8, attn_heads=8, mlp_ratio=4.0),
        # TRELLIS.2 shape SC-VAE size (f16c32) at 1024^3: widths 64..1024, blocks 0/4/8/16/4, 1/16 resolution.
        "large": dict(resolution=1024, channels=(64, 128, 256, 512, 1024), blocks=(0, 4, 8, 16, 4),
                      latent_channels=32, mlp_ratio=4.0, kl_weight=1e-6),
    }

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if len(self.channels) < 2 or len(self.blocks) != len(self.channels):
            raise ValueError(f"SparseSDFVAEConfig: channels {self.channels} and blocks {self.blocks} need the "
                             "same length >= 2 (one entry per level)")
        if min(self.channels) < 1 or min(self.blocks) < 0 or self.latent_channels < 1:
            raise ValueError("SparseSDFVAEConfig: channels and latent_channels must be >= 1, blocks >= 0")
        if self.resolution < 2 or self.resolution % self.factor:
            raise ValueError(f"SparseSDFVAEConfig: resolution {self.resolution} is not a multiple of the "
                             f"downsampling factor {self.factor}")
        if not self.band > 0 or not 0.0 < self.threshold < 1.0:
            raise ValueError("SparseSDFVAEConfig: band must be > 0 and threshold in (0, 1)")
        if self.attn_blocks and self.channels[-1] % self.attn_heads:
            raise ValueError(f"SparseSDFVAEConfig: {self.channels[-1]} latent-level channels are not divisible "
                             f"by {self.attn_heads} heads")
        if not self.latent_scale > 0:
            raise ValueError(f"SparseSDFVAEConfig.latent_scale must be > 0, got {self.latent_scale}")

    @property
    def levels(self) -> int:
        """Number of halvings ``L`` between the band and the latent."""
        return len(self.channels) - 1

    @property
    def factor(self) -> int:
        """Band nodes per latent node along one axis: ``2^L``."""
        return 2 ** self.levels

    @property
    def spacing(self) -> float:
        """Node spacing ``h`` of the band's grid, world units."""
        return grid.spacing(self.resolution, BOUND)

    @property
    def truncation(self) -> float:
        """World distance that maps to tsdf 1 at ``resolution``: ``band * h``."""
        return self.band * self.spacing

    def truncation_at(self, res: int) -> float:
        """World distance that maps to tsdf 1 on a grid of ``res`` cells."""
        return self.band * grid.spacing(res, BOUND)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """``x + fc2(gelu(fc1(LN(conv(x)))))``: a 3^3 submanifold conv, LayerNorm and an MLP (TRELLIS.2's sparse
    ConvNeXt block, full conv). ``fc2`` starts at zero, so a fresh block is the identity."""

    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(round(channels * mlp_ratio))
        self.conv = SubMConv3d(channels, channels, 3)
        self.norm = SparseLayerNorm(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.norm(self.conv(x)).feats  # (N, C)
        return x.replace(x.feats + self.fc2(F.gelu(self.fc1(h))))


class AttentionBlock(nn.Module):
    """Pre-norm window self-attention + MLP over the voxels of one level (Direct3D-S2's latent-level Swin)."""

    def __init__(self, channels: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = SparseLayerNorm(channels)
        self.attn = SparseWindowAttention(channels, heads, window=window, shift=shift)
        self.norm2 = SparseLayerNorm(channels)
        hidden = int(round(channels * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x.replace(x.feats + self.attn(self.norm1(x)).feats)
        return x.replace(x.feats + self.mlp(self.norm2(x).feats))


class Stage(nn.Module):
    """The blocks of one level, optionally recomputed in backward (``grad_checkpointing``)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: SparseTensor) -> SparseTensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = x.replace(checkpoint(lambda f, b=block, t=x: b(t.replace(f)).feats, x.feats,
                                         use_reentrant=False))
            else:
                x = block(x)
        return x


def _stage(cfg: SparseSDFVAEConfig, level: int, *, attention: bool) -> Stage:
    c = cfg.channels[level]
    blocks: list[nn.Module] = [ConvNeXtBlock(c, cfg.mlp_ratio) for _ in range(cfg.blocks[level])]
    if attention:
        blocks += [AttentionBlock(c, cfg.attn_heads, cfg.attn_window, (i % 2) * cfg.attn_window // 2, cfg.mlp_ratio)
                   for i in range(cfg.attn_blocks)]
    return Stage(blocks)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


def band_tensor(coords: torch.Tensor, tsdf: torch.Tensor, res: int, batch_size: int | None = None) -> SparseTensor:
    """The encoder input: band nodes ``coords (N, 4) [b, i, j, k]`` of a grid of ``res`` cells (``res + 1``
    nodes per axis) with features ``[tsdf, 1]`` (the constant channel marks presence: a folded parent sees
    which children exist, not only their values)."""
    feats = torch.stack([tsdf.float(), torch.ones_like(tsdf, dtype=torch.float32)], dim=-1)  # (N, 2)
    return SparseTensor(coords.int(), feats, res + 1, batch_size)


def structure(coords: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The band's active sets at levels ``0 .. levels``: level ``l`` holds the parents ``>> l`` (unique, sorted).

    (The model gets them from its encoder's folds, :meth:`SparseSDFVAE.forward`; this is the same by hand.)
    """
    out = [coords.int()]
    shape = int(coords[:, 1:].max()) + 2 if len(coords) else 1
    for _ in range(levels):
        c = out[-1].long()
        parents = torch.cat([c[:, :1], c[:, 1:] >> 1], dim=1)
        out.append(decode_keys(torch.unique(linear_keys(parents, shape)), shape))  # sorted (b, i, j, k)
    return out


class SparseSDFVAE(Pretrained, nn.Module):
    """Sparse SDF VAE (see the module docstring). Typical use::

        vae = SparseSDFVAE.from_pretrained(ckpt)
        x = band_tensor(coords, tsdf, R)                   # the band of one or more shapes at R
        posterior, latent = vae.encode(x)                  # latent: SparseTensor at R / 2^L
        out = vae.decode(latent.replace(posterior.mode()))  # dict: "tsdf" SparseTensor at level 0, logits
        v, f = vae.decode_mesh(latent.replace(posterior.mode()))
    """

    kind: ClassVar[str] = "sparse_vae"
    config_class: ClassVar[type] = SparseSDFVAEConfig

    def __init__(self, config: SparseSDFVAEConfig):
        super().__init__()
        self.config = cfg = config
        self.finest_chunk = 1 << 16  # level-1 nodes per chunk of the inference decode's finest level
        L, C = cfg.levels, cfg.channels
        # encoder: stem -> (stage, fold + linear) per level -> latent stage -> moments
        self.stem = SparseLinear(2, C[0])
        self.enc_stages = nn.ModuleList([_stage(cfg, lvl, attention=False) for lvl in range(L)])
        self.downs = nn.ModuleList([SparseLinear(8 * C[lvl], C[lvl + 1]) for lvl in range(L)])
        self.enc_latent = _stage(cfg, L, attention=True)
        self.enc_out = nn.Sequential(SparseLayerNorm(C[L]), SparseLinear(C[L], 2 * cfg.latent_channels))
        with torch.no_grad():  # start with a narrow posterior (std e^-2): unit noise would hide the structure
            self.enc_out[1].bias[cfg.latent_channels:] = INIT_LOGVAR
        # decoder: latent -> stage -> (existence head, linear + unfold, stage) per level -> tsdf
        self.dec_in = SparseLinear(cfg.latent_channels, C[L])
        self.dec_latent = _stage(cfg, L, attention=True)
        # existence heads of the upsamplings to levels 1 .. L-1 (heads[lvl - 1]); level 0 keeps every child
        self.heads = nn.ModuleList([nn.Sequential(SparseLayerNorm(C[lvl + 1]), SparseLinear(C[lvl + 1], 8))
                                    for lvl in range(1, L)])
        self.ups = nn.ModuleList([SparseLinear(C[lvl + 1], 8 * C[lvl]) for lvl in range(L)])
        self.dec_stages = nn.ModuleList([_stage(cfg, lvl, attention=False) for lvl in range(L)])
        self.out = nn.Sequential(SparseLayerNorm(C[0]), SparseLinear(C[0], 1))

    @property
    def grad_checkpointing(self) -> bool:
        return any(m.grad_checkpointing for m in self.modules() if isinstance(m, Stage))

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, Stage):
                m.grad_checkpointing = bool(value)

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, x: SparseTensor) -> tuple[DiagonalGaussian, SparseTensor]:
        """Band ``x`` (features ``[tsdf, 1]``, :func:`band_tensor`) -> posterior over ``(M, latent_channels)`` and
        the latent's sparse structure (its ``feats`` are the moments)."""
        posterior, moments, _ = self._encode(x)
        return posterior, moments

    def band_input(self, coords, sdf, res: int) -> SparseTensor:
        """The encoder input of ONE shape's band on the model's device: ``coords (n, 3)`` node indices ``[i, j, k]``
        of the ``res``-cell grid and ``sdf (n,)`` world-unit signed distances (numpy arrays or tensors)."""
        device = next(self.parameters()).device
        c = torch.as_tensor(coords, device=device).to(torch.int32)
        c = torch.cat([c.new_zeros(len(c), 1), c], dim=1)
        sdf = torch.as_tensor(sdf, device=device).float()
        return band_tensor(c, tsdf_of(sdf, self.config, res), res, 1)

    @torch.no_grad()
    def encode_mesh(self, vertices: np.ndarray, faces: np.ndarray, *, resolution: int | None = None,
                    watertight_resolution: int = 256) -> tuple[SparseTensor, Transform]:
        """Any triangle mesh in its own units -> ``(latent of the shape (posterior mode), the Transform to the
        canonical frame)``, as ``shapeflow reconstruct`` does: canonical frame, watertight surface at
        ``watertight_resolution``^3 (:func:`~shapeflow.geometry.watertight.make_watertight`), the SDF band at
        ``resolution``^3 (default ``config.resolution``), encode. ``decode_mesh(z)`` gives canonical-frame
        vertices; ``transform.to_source(v)`` puts them back in the mesh's units.

        Raises ``ValueError`` (one line) for a mesh without faces, with non-finite vertices, or with no inside.
        """
        res = self.config.resolution if resolution is None else int(resolution)
        if res % self.config.factor:
            raise ValueError(f"resolution {res} is not a multiple of the latent factor {self.config.factor}")
        transform = normalize_transform(vertices)
        wt = make_watertight(transform.to_canonical(np.asarray(vertices, dtype=np.float64)), faces,
                             resolution=watertight_resolution)
        coords, sdf = band_nodes(wt.vertices.astype(np.float32).astype(np.float64), wt.faces, res)
        posterior, latent = self.encode(self.band_input(coords, sdf, res))
        return latent.replace(posterior.mode()), transform

    def _encode(self, x: SparseTensor) -> tuple[DiagonalGaussian, SparseTensor, list[SparseTensor]]:
        """:meth:`encode`, plus the tensor at each level ``0 .. L - 1`` (the band's structure, with caches)."""
        factor = self.config.factor
        if x.feats.shape[-1] != 2 or (x.shape - 1) % factor:
            raise ValueError(f"SparseSDFVAE.encode expects a band on a grid of a multiple of {factor} cells "
                             f"(shape R + 1) with features [tsdf, 1], got shape {x.shape} and "
                             f"{x.feats.shape[-1]} features")
        h, levels = self.stem(x), []
        for stage, down in zip(self.enc_stages, self.downs):
            levels.append(h)
            h = down(fold(stage(h)))  # (M_next, C_next)
        moments = self.enc_out(self.enc_latent(h))  # (M, 2 C_z)
        return DiagonalGaussian.from_moments(moments.feats.float(), dim=-1), moments, levels

    # -- decoding --------------------------------------------------------------------------------

    def decode(self, z: SparseTensor, targets: list[torch.Tensor | SparseTensor] | None = None) -> dict:
        """Latent ``z`` (features ``(M, latent_channels)``, VAE space) -> the band.

        ``None`` (inference): children with ``sigmoid(logit) > threshold`` are kept. ``targets`` (training):
        the band's true active sets at levels ``1 .. L - 1`` (a list indexed by level, entry 0 unused;
        coordinates, :func:`structure`, or the encoder's tensors): the decoder keeps the true children (teacher
        forcing) and its logits learn them. Level 0 gets every child of level 1 either way; at inference it is
        computed ``finest_chunk`` level-1 nodes at a time when it has no convolution.

        Returns ``{"tsdf": SparseTensor (N, 1) at level 0, "logits": [(M_l, 8) per upsampling to levels
        L-1 .. 1, coarse first], "parents": [the SparseTensor each logits row belongs to], "exist": [(M_l, 8)
        bool true children, with targets]}``.
        """
        cfg = self.config
        res = self.grid_resolution(z)
        h = self.dec_latent(self.dec_in(z))
        logits, parents, exist = [], [], []
        for lvl in reversed(range(cfg.levels)):
            fine_shape = (res >> lvl) + 1
            if lvl == 0 and targets is None and not cfg.blocks[0]:  # inference, pointwise finest level
                return {"tsdf": self._finest_in_chunks(h, fine_shape), "logits": logits, "parents": parents,
                        "exist": exist}
            up = self.ups[lvl](h)  # (M, 8 C_lvl)
            if lvl == 0:
                h = unfold(up, shape=fine_shape)  # every child (inside the grid)
            else:
                logit = self.heads[lvl - 1](h).feats  # (M, 8)
                logits.append(logit)
                parents.append(h)
                if targets is not None:
                    exist.append(child_mask(h, targets[lvl]))
                    h = unfold_to(up, targets[lvl], fine_shape)
                else:
                    h = unfold(up, keep=torch.sigmoid(logit.float()) > cfg.threshold, shape=fine_shape)
            h = self.dec_stages[lvl](h)
        return {"tsdf": self.out(h), "logits": logits, "parents": parents, "exist": exist}

    def _finest_in_chunks(self, h: SparseTensor, fine_shape: int) -> SparseTensor:
        """The last upsampling and the output head on ``finest_chunk`` level-1 nodes at a time; the same numbers
        as the whole level at once when the finest stage has no convolution (``blocks[0] == 0``), at the peak
        memory of one chunk (the finest level holds 8x the nodes of level 1: most of a decode's memory)."""
        coords, feats = [], []
        for s in range(0, h.num_voxels, self.finest_chunk):
            part = SparseTensor(h.coords[s:s + self.finest_chunk], h.feats[s:s + self.finest_chunk], h.shape,
                                h.batch_size)
            y = self.out(self.dec_stages[0](unfold(self.ups[0](part), shape=fine_shape)))
            coords.append(y.coords)
            feats.append(y.feats)
        if not coords:  # no level-1 node: the empty level, through the same layers
            return self.out(self.dec_stages[0](unfold(self.ups[0](h), shape=fine_shape)))
        c, f = torch.cat(coords), torch.cat(feats)
        order = torch.argsort(linear_keys(c, fine_shape))  # chunks of sorted parents: children sorted per chunk
        return SparseTensor(c[order], f[order], fine_shape, h.batch_size)

    def forward(self, x: SparseTensor, *, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> dict:
        """Encode the band ``x``, decode with teacher forcing on its own structure; for the training loss.

        Returns ``{"tsdf": (K,) at the decoded finest nodes, "target": (K,) their tsdf (band nodes) or +-1 (the
        others, :func:`outside_signs`), "known": (K,) bool (target defined), "in_band": (K,) bool, "logits":
        [...], "targets": [(M_l, 8) bool], "posterior": DiagonalGaussian}``.
        """
        posterior, latent, levels = self._encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        out = self.decode(latent.replace(z), targets=levels)
        full = out["tsdf"]  # every child of the decoded level-1 nodes, sorted; the band's nodes are among them
        band = x.feats[:, 0].float()  # (N,) tsdf of the band
        pos = torch.searchsorted(full.keys(), x.keys())  # (N,) each band node's row in full
        in_band = torch.zeros(full.num_voxels, dtype=torch.bool, device=band.device)
        in_band[pos] = True
        target = band.new_zeros(full.num_voxels)
        target[pos] = band
        sign = outside_signs(full, in_band, target)
        target = torch.where(in_band, target, sign)
        return {"tsdf": full.feats[:, 0], "target": target, "known": in_band | (sign != 0), "in_band": in_band,
                "logits": out["logits"], "targets": out["exist"], "posterior": posterior}

    def grid_resolution(self, z: SparseTensor) -> int:
        """Cells per axis ``R`` of the band grid a latent decodes to: ``(z.shape - 1) * 2^L``."""
        return (z.shape - 1) * self.config.factor

    @torch.no_grad()
    def decode_band(self, z: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent -> the predicted band: ``(coords (N, 4) [b, i, j, k], sdf (N,) world units)``."""
        out = self.decode(z)
        sdf = out["tsdf"].feats[:, 0].float().clamp(-1.0, 1.0) * self.config.truncation_at(self.grid_resolution(z))
        return out["tsdf"].coords, sdf

    @torch.no_grad()
    def decode_mesh(self, z: SparseTensor, *, block: int = 64, close: bool = True,
                    min_component_ratio: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """Latent of ONE shape -> ``(vertices (n, 3) float64 canonical frame, faces (f, 3) int64)``.

        Marching cubes over the cells of the decoded nodes (block by block, never a dense ``R^3`` array).
        ``close``: first give the absent nodes next to the decoded ones the sign their neighbours vote for,
        at the truncation distance (:func:`~shapeflow.geometry.sparse_mc.close_band`), so every surface is
        closed. ``min_component_ratio``: drop connected components with fewer faces than this share of the
        mesh (floaters; 0 keeps everything). Raises
        :class:`~shapeflow.geometry.marching_cubes.EmptySurfaceError` when nothing is meshed.
        """
        if z.batch_size != 1:
            raise ValueError(f"decode_mesh meshes one shape, got a batch of {z.batch_size}")
        res = self.grid_resolution(z)
        coords, sdf = self.decode_band(z)
        c, v = coords[:, 1:].cpu().numpy(), sdf.cpu().numpy()
        if not len(c):
            raise EmptySurfaceError("the decoder kept no node: nothing to mesh")
        if close:
            c, v = close_band(c, v, res, fill=self.config.truncation_at(res))
        verts, faces = sparse_marching_cubes(c, v, res, bound=BOUND, block=block)
        if min_component_ratio > 0:
            verts, faces = filter_components(verts, faces, min_faces=int(min_component_ratio * len(faces)))
        return verts, faces

    # -- latents for generators -----------------------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent features -> what generators model: ``z * latent_scale``."""
        return z * self.config.latent_scale

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents`."""
        return x / self.config.latent_scale


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def outside_signs(x: SparseTensor, in_band: torch.Tensor, tsdf: torch.Tensor, waves: int = 2) -> torch.Tensor:
    """The exact sign (+-1, 0 where unknown) of the nodes of ``x`` outside the band, from the band's values.

    A node outside the band has ``|sdf| > sqrt(3) h``, so (the SDF being 1-Lipschitz) every node within
    ``sqrt(3) h`` of it, its 26 neighbours, has its sign; so it takes the sign of any neighbour in the band
    (they all agree), and a second wave passes it on to outside nodes next to those. Nodes reached by no wave
    (far false positives of the structure) stay 0: no target.
    """
    nbr = x.neighbors(3)  # (K, 27), -1 where absent
    k = x.num_voxels
    known = torch.where(in_band, torch.sign(tsdf), torch.zeros_like(tsdf))  # (K,)
    idx = torch.where(nbr < 0, k, nbr)
    for _ in range(waves):
        votes = torch.cat([known, known.new_zeros(1)])[idx].sum(dim=1)  # (K,)
        known = torch.where(in_band | (known != 0), known, torch.sign(votes))
    return torch.where(in_band, torch.zeros_like(known), known)


def tsdf_of(sdf: torch.Tensor, cfg: SparseSDFVAEConfig, res: int | None = None) -> torch.Tensor:
    """World-unit signed distances on a grid of ``res`` cells (default ``cfg.resolution``) -> the network's
    target ``clamp(sdf / (band h), -1, 1)``."""
    trunc = cfg.truncation if res is None else cfg.truncation_at(res)
    return (sdf.float() / trunc).clamp(-1.0, 1.0)


def sparse_vae_loss(model: nn.Module, batch: dict, cfg: SparseSDFVAEConfig,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of a batch of bands ``{"coords": (N, 4), "sdf": (N,), "batch_size": b}`` at
    ``cfg.resolution``; an optional ``"shape"`` is the grid's nodes per axis when the bands are crops (else
    ``cfg.resolution + 1``).

    Calls ``model(...)`` (its forward) so DDP / FSDP wrappers see a forward pass. Returns the scalar loss and
    detached 0-d tensors: ``tsdf_l1`` (band), ``beyond`` (hinge on the other finest children), ``exist_bce``,
    ``exist_acc``, ``kl``, ``sign_acc`` (band nodes with ``|tsdf| < 1``).
    """
    target = tsdf_of(batch["sdf"], cfg)  # (N,)
    shape = int(batch.get("shape", cfg.resolution + 1))
    x = band_tensor(batch["coords"], target, shape - 1, int(batch["batch_size"]))
    out = model(x, generator=generator, sample_posterior=True)
    pred, target, in_band = out["tsdf"].float(), out["target"], out["in_band"]
    weight = in_band.float() * (1.0 + cfg.near_weight * (target.abs() < 0.5).float())
    tsdf_l1 = (weight * (pred - target).abs()).sum() / weight.sum()
    outside = out["known"] & ~in_band
    beyond = F.relu(1.0 - target[outside] * pred[outside]).mean() if outside.any() else pred.new_zeros(())
    bce, correct, total = [], 0.0, 0
    for logit, tgt in zip(out["logits"], out["targets"]):
        bce.append(F.binary_cross_entropy_with_logits(logit.float(), tgt.float()))
        correct = correct + ((logit > 0) == tgt).float().sum()
        total += tgt.numel()
    exist_bce = torch.stack(bce).mean() if bce else pred.new_zeros(())
    kl = out["posterior"].kl().mean()
    loss = tsdf_l1 + beyond + cfg.existence_weight * exist_bce + cfg.kl_weight * kl
    near = in_band & (target.abs() < 1.0)
    sign_acc = ((pred[near] < 0) == (target[near] < 0)).float().mean() if near.any() else pred.new_ones(())
    exist_acc = correct / total if total else pred.new_ones(())
    logs = {"tsdf_l1": tsdf_l1, "beyond": beyond, "exist_bce": exist_bce, "exist_acc": exist_acc,
            "kl": kl, "sign_acc": sign_acc}
    return loss, {k: v.detach().float() for k, v in logs.items()}
