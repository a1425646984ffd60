"""VecSet VAE: a surface point cloud -> a set of latent tokens -> a neural signed-distance field.

3DShape2VecSet (Zhang et al. 2023, arXiv 2301.11445) as scaled up by Michelangelo, Dora
(arXiv 2412.17808) and Hunyuan3D-2/2.1 (arXiv 2501.12202). Layout of this file: config and presets
-> query selection (FPS) -> encoder -> geometry decoder -> the VAE.

Design choices
--------------
* **Point queries.** The latent tokens are the input points chosen by farthest point sampling
  (``fpsample.bucket_fps_kdline_sampling``, CPU, after a random subsample to
  ``num_tokens * fps_ratio`` points as Hunyuan3D does with ``downsample_ratio``). Sharp-edge points
  (flag column 6 of ``surface``) and uniform points get queries in proportion to their counts
  (Hunyuan3D-2.1 ``PointCrossAttentionEncoder``). Because no weight depends on the token count,
  ``encode(..., num_tokens=...)`` can use a different count at inference (Dora).
  ``encode(..., deterministic=True)`` uses exact FPS from each group's first point instead (the same
  tokens on every machine, for reproducible encodes and tests).
* **Counts, one place each.** The token count ``num_tokens`` and the encoder input
  (``surface_points`` uniform + ``sharp_points`` sharp-edge points per shape) are config fields, saved
  with the weights; :meth:`VecSetVAEConfig.check_num_tokens` is the one check of a token count.
* **Latent scale.** Generators model ``z * latent_scale`` (Hunyuan3D ``scale_factor``; 1 for shapeflow's
  own VAEs, whose generators normalise latents themselves): :meth:`VecSetVAE.scale_latents` /
  :meth:`VecSetVAE.unscale_latents`, used by ``encode-latents`` and ``generate``.
* **Encoder.** ``[Fourier(xyz), point features]`` through one shared ``input_proj`` for queries and
  data, one Perceiver cross-attention (queries <- *all* input points), ``encoder_layers``
  self-attention blocks, ``ln_post``, then ``pre_kl`` -> (mean, logvar) of a
  :class:`~shapeflow.models.distributions.DiagonalGaussian` over ``(b, m, latent_channels)``.
* **Decoder.** ``post_kl`` back to the width, ``decoder_layers`` self-attention blocks (no
  positional encoding on latent tokens: the set is unordered), then the geometry decoder: Fourier
  of the query xyz -> ``query_proj`` -> one cross-attention block to the tokens -> ``ln_post`` ->
  ``output_proj`` -> one value per query. The token keys/values are projected once per shape and
  queries are processed in chunks, so decoding memory is bounded.
* **Position bias (this project's option, on in ``tiny``).** The geometry decoder reads a position
  from each token and penalises attention to far tokens (:class:`GeometryDecoder`). A plain VecSet
  decoder starts with uniform attention and must discover locality, which takes most of a short CPU
  run; with the bias it is local from the first step. Public checkpoints (Hunyuan3D) have it off.
* **Output sign.** The output ``field`` is **negative inside** for every training variant, so
  ``field < 0`` is occupancy and marching cubes at level 0 works unchanged:

  - SDF variant: a (truncated, scaled) signed distance, negative inside
    (:mod:`shapeflow.models.vecset_losses` says which scale);
  - occupancy variant: the logit of P(outside), i.e. ``sigmoid(field) = P(outside)``.

  Public checkpoints with positive-inside outputs (Hunyuan3D) are flipped at their loader.
* Pre-norm blocks with qk-norm (LayerNorm over head channels, as Hunyuan3D) on PyTorch SDPA, so
  flash / memory-efficient kernels are used automatically on GPUs. Optional activation checkpointing
  of the block stacks (``model.grad_checkpointing = True``, the training engine's switch).
* Every size-related number lives in :class:`VecSetVAEConfig`; its ``PRESETS`` hold tiny / base / large
  (large = Hunyuan3D-2.1 ShapeVAE, whose released folder loads through :meth:`VecSetVAE.from_pretrained`,
  converted by :mod:`shapeflow.models.pretrained.hunyuan_vae`).

Legend: b batch, n surface points, q query points, m latent tokens, c latent channels, w width,
h heads, d head channels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import fpsample
import numpy as np
import torch
from torch import nn

from shapeflow.checkpoint import Pretrained
from shapeflow.geometry.sampling import farthest_points
from shapeflow.models.distributions import DiagonalGaussian
from shapeflow.models.pretrained import hunyuan_vae
from shapeflow.nn.blocks import BlockStack, CrossAttentionBlock, SelfAttentionBlock
from shapeflow.nn.embeddings import FourierEmbedder

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VecSetVAEConfig:
    """Architecture of a :class:`VecSetVAE` and its encoder input (defaults = the ``tiny`` preset)."""

    num_tokens: int = 128  # latent tokens per shape encode() makes by default; no weight depends on it
    latent_channels: int = 16  # channels per latent token: the width the DiT diffuses in
    width: int = 128  # transformer width of encoder, decoder and geometry decoder
    heads: int = 4  # attention heads (head channels = width / heads)
    cross_heads: int | None = None  # heads of the two point<->token cross-attentions (None: heads;
    #   3DShape2VecSet uses 1 full-width head there: sharper spatial lookups in a small model)
    encoder_layers: int = 2  # self-attention blocks after the Perceiver cross-attention
    decoder_layers: int = 4  # self-attention blocks on the latent tokens before the geometry decoder
    mlp_ratio: float = 4.0  # MLP hidden width / width in every block
    num_freqs: int = 8  # Fourier octaves of xyz (2^0 .. 2^(num_freqs-1)); 8 -> 51 features
    include_pi: bool = False  # multiply Fourier frequencies by pi (Hunyuan3D configs: False)
    point_feats: int = 4  # per-point features after xyz: normal (3) + sharp-edge flag (1); 3 = normals only
    surface_points: int = 4096  # encoder input: uniform surface points per shape (Hunyuan3D pc_size)
    sharp_points: int = 1024  # encoder input: sharp-edge points per shape, after them (pc_sharpedge_size)
    qkv_bias: bool = False  # bias on q/k/v projections (Hunyuan3D: none)
    qk_norm: str | None = "layer"  # "layer" (Hunyuan3D), "rms" or None: bounds attention logits in fp16/bf16
    block_eps: float = 1e-6  # LayerNorm eps inside blocks and qk-norm (Hunyuan3D 1e-6)
    ln_post_eps: float = 1e-5  # eps of both ln_post (Hunyuan3D: nn.LayerNorm's default)
    geo_ln_post: bool = True  # LayerNorm before the output layer (Hunyuan3D, VecSetX)
    fps_ratio: int = 4  # random subsample to num_tokens * fps_ratio points before FPS (Hunyuan3D: 20)
    init_scale: float = 0.25  # Linear weights ~ N(0, (init_scale / sqrt(width))^2) (Michelangelo, Dora)
    latent_scale: float = 1.0  # generators see z * latent_scale (Hunyuan3D scale_factor); see module doc
    decoder_only: bool = False  # no encoder / pre_kl (e.g. Hunyuan3D-2.0 released weights)
    position_bias: bool = False  # geometry decoder: predict each token's xyz and add -w_h |x - p_j|^2
    #   to the cross-attention logits (this project's option; see GeometryDecoder). Off for public weights.

    PRESETS: ClassVar[dict[str, dict]] = {
        # Trains on a 2-core CPU in minutes. position_bias: the decoder attends locally from the first step,
        # so a short CPU run learns much faster than without it.
        "tiny": dict(num_tokens=128, latent_channels=16, width=128, heads=4, encoder_layers=2, decoder_layers=4,
                     init_scale=1.0,  # a tiny model trained for minutes learns faster from a standard-scale init
                     position_bias=True),
        # Dora-VAE widths and depths (width 768, 12 heads, 8 / 16 layers), 512 tokens x 32 channels
        # (3DShape2VecSet token count; VecSetX shows 16-32 channels suffice and they are easier to diffuse).
        "base": dict(num_tokens=512, latent_channels=32, width=768, heads=12, encoder_layers=8,
                     decoder_layers=16, surface_points=16384, sharp_points=4096),
        # Hunyuan3D-2.1 ShapeVAE (hunyuan3d-vae-v2-1): 4096 x 64 latents, width 1024, 16 heads, 8 / 16 layers.
        "large": dict(num_tokens=4096, latent_channels=64, width=1024, heads=16, encoder_layers=8,
                      decoder_layers=16, fps_ratio=20, surface_points=81920, sharp_points=0),
    }

    def __post_init__(self):
        for name in ("num_tokens", "latent_channels", "width", "heads", "fps_ratio", "surface_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VecSetVAEConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("encoder_layers", "decoder_layers", "num_freqs", "point_feats", "sharp_points"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"VecSetVAEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"VecSetVAEConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.qk_norm not in (None, "layer", "rms"):
            raise ValueError(f"VecSetVAEConfig.qk_norm must be 'layer', 'rms' or None, got {self.qk_norm!r}")
        if not self.latent_scale > 0:
            raise ValueError(f"VecSetVAEConfig.latent_scale must be > 0, got {self.latent_scale!r}")
        self.check_num_tokens(self.num_tokens)

    @property
    def fourier_dim(self) -> int:
        """Width of the Fourier features of xyz (51 for 8 frequencies)."""
        return 3 * (2 * self.num_freqs + 1)

    @property
    def input_points(self) -> int:
        """Encoder input points per shape: ``surface_points + sharp_points``."""
        return self.surface_points + self.sharp_points

    def check_num_tokens(self, num_tokens: int | None) -> int:
        """THE token-count check: ``num_tokens`` (None: this config's) if ``1 <= m <= input_points``, else an error."""
        m = self.num_tokens if num_tokens is None else num_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"num_tokens must be an integer >= 1, got {m!r}")
        if m > self.input_points:
            raise ValueError(f"num_tokens {m} exceeds the {self.input_points} encoder input points "
                             f"(surface_points {self.surface_points} + sharp_points {self.sharp_points})")
        return m


# ----------------------------------------------------------------------------------------------
# Query selection
# ----------------------------------------------------------------------------------------------


def _kdline_height(n: int) -> int:
    """KD-tree height for fpsample's bucket FPS: 2^h <= n, about 3-7 as its docs recommend."""
    return int(max(1, min(7, math.floor(math.log2(max(n, 2))) - 7)))


def fps_indices(xyz: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """Farthest point sampling of ``k`` of the ``(n, 3)`` points. Returns (k,) int64.

    With ``rng``: fpsample's bucketed approximation from a random start (fast; training and encoding).
    Without (``rng=None``): exact FPS from point 0, ties to the lowest index
    (:func:`shapeflow.geometry.sampling.farthest_points`): the same indices on every machine.
    """
    n = len(xyz)
    if k > n:
        raise ValueError(f"cannot pick {k} farthest points from {n} points")
    if k == n:
        return np.arange(n, dtype=np.int64)
    if rng is None:
        return farthest_points(xyz, k, start=0)
    idx = fpsample.bucket_fps_kdline_sampling(np.ascontiguousarray(xyz, dtype=np.float32), k,
                                              h=_kdline_height(n), start_idx=int(rng.integers(n)))
    return idx.astype(np.int64)


def select_query_indices(surface: np.ndarray, num_tokens: int, *, fps_ratio: int,
                         rng: np.random.Generator | None) -> np.ndarray:
    """Indices of the surface points that become latent queries (Hunyuan3D-2.1 scheme).

    Parameters
    ----------
    surface : (n, 3 + f) float
      Points with features; if there are at least 7 columns, column 6 is the sharp-edge flag.
    num_tokens : number of queries ``m``.
    fps_ratio : each group is randomly subsampled to ``m_group * fps_ratio`` points before FPS.
    rng : randomness of the subsample and the FPS start; ``None`` is the deterministic mode (no subsample,
      exact FPS from each group's first point, see :func:`fps_indices`).

    Returns
    -------
    idx : (m,) int64 indices into ``surface``; uniform-group queries first, then sharp ones.
    """
    n = len(surface)
    if num_tokens > n:
        raise ValueError(f"num_tokens={num_tokens} exceeds the {n} input surface points")
    sharp = surface[:, 6] > 0.5 if surface.shape[1] >= 7 else np.zeros(n, dtype=bool)
    groups = [np.flatnonzero(~sharp), np.flatnonzero(sharp)]
    m_sharp = int(round(num_tokens * len(groups[1]) / n))
    m_sharp = min(max(m_sharp, num_tokens - len(groups[0])), len(groups[1]))
    counts = [num_tokens - m_sharp, m_sharp]
    out = []
    for members, m in zip(groups, counts):
        if m == 0:
            continue
        subset = members
        if rng is not None and len(members) > m * fps_ratio:
            subset = rng.choice(members, m * fps_ratio, replace=False)
        out.append(subset[fps_indices(surface[subset, :3], m, rng)])
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# Encoder and decoders
# ----------------------------------------------------------------------------------------------


def residual_stream(x: torch.Tensor) -> torch.Tensor:
    """The start of a residual stream: float32 under autocast, unchanged otherwise.

    Autocast runs each Linear in bf16 but adds its output to a float32 stream, so starting the stream in
    float32 keeps the tokens (and the positions the decoder reads from them) at float32 accuracy for
    the price of one cast; without it the whole stream, and every position, is rounded to bf16.
    """
    return x.float() if torch.is_autocast_enabled(x.device.type) else x


def _block_kwargs(cfg: VecSetVAEConfig, cross: bool = False) -> dict:
    heads = cfg.cross_heads if (cross and cfg.cross_heads is not None) else cfg.heads
    return dict(heads=heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                eps=cfg.block_eps)


class VecSetEncoder(nn.Module):
    """Points -> ``(b, m, width)`` token features: input_proj, Perceiver cross-attention, blocks, ln_post."""

    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.fourier_dim + cfg.point_feats, cfg.width)
        self.cross_attn = CrossAttentionBlock(cfg.width, **_block_kwargs(cfg, cross=True))
        self.blocks = BlockStack([SelfAttentionBlock(cfg.width, **_block_kwargs(cfg))
                                  for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_post_eps)

    def forward(self, data: torch.Tensor, query_idx: torch.Tensor) -> torch.Tensor:
        """data: (b, n, fourier + feats) embedded input points; query_idx: (b, m) -> (b, m, w)."""
        x = self.input_proj(data)  # (b, n, w)
        q = residual_stream(x.gather(1, query_idx[..., None].expand(-1, -1, x.shape[-1])))  # (b, m, w)
        h = self.cross_attn(q, x)
        return self.ln_post(self.blocks(h))


class LatentDecoder(nn.Module):
    """Self-attention blocks over the (up-projected) latent tokens."""

    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.blocks = BlockStack([SelfAttentionBlock(cfg.width, **_block_kwargs(cfg))
                                  for _ in range(cfg.decoder_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GeometryDecoder(nn.Module):
    """Query points + tokens -> one field value per point (cross-attention decoder).

    With ``cfg.position_bias`` each token also carries a position: ``pos_head`` reads an xyz
    ``p_j`` from the token's features, and every cross-attention head ``h`` adds the distance penalty
    ``-w_h |x - p_j|^2`` to its logits, with learned ``w_h = exp(pos_log_weight[h])`` initialised to
    length scales ``1 / sqrt(2 w_h)`` from 0.05 to 0.4 (geometric over the heads; the canonical cube is
    ``[-1, 1]^3``). The latent is still a plain token set (the positions are a function of it), but the
    decoder attends locally from the first step instead of having to discover locality. During training
    the predicted positions are pulled to the tokens' FPS points (``position`` loss term). Measured effect:
    docs/log/benchmarks-2026-11.md, the third round of the VecSet ``tiny`` section.
    """

    #: length scales of the first and last head's distance penalty at initialisation (canonical units)
    POSITION_SCALES = (0.05, 0.4)

    def __init__(self, cfg: VecSetVAEConfig):
        super().__init__()
        self.query_proj = nn.Linear(cfg.fourier_dim, cfg.width)
        self.cross_attn = CrossAttentionBlock(cfg.width, **_block_kwargs(cfg, cross=True))
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_post_eps) if cfg.geo_ln_post else nn.Identity()
        self.output_proj = nn.Linear(cfg.width, 1)
        self.position_bias = cfg.position_bias
        if cfg.position_bias:
            self.pos_head = nn.Sequential(nn.LayerNorm(cfg.width, eps=cfg.block_eps), nn.Linear(cfg.width, 3))
            self.pos_log_weight = nn.Parameter(torch.zeros(self.cross_attn.attn.heads))

    def reset_position_weights(self) -> None:
        """``pos_log_weight`` to length scales ``POSITION_SCALES`` spread geometrically over the heads."""
        heads = self.pos_log_weight.numel()
        lo, hi = self.POSITION_SCALES
        scales = torch.tensor([lo * (hi / lo) ** (i / max(heads - 1, 1)) for i in range(heads)])
        with torch.no_grad():
            self.pos_log_weight.copy_(torch.log(0.5 / scales.square()))

    def token_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, m, w) decoded tokens -> (b, m, 3) float32 positions read by ``pos_head`` (position-bias models).

        Always float32, also under bf16 autocast: a bf16 position is off by ~0.004, which the distance
        penalty (``w_h`` up to ~200) would turn into logit errors of order 1.
        """
        if not self.position_bias:
            raise RuntimeError("token_positions needs a model built with position_bias=True")
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return self.pos_head(tokens.float())

    def context(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Everything the queries need from the tokens, computed once per shape: ``(k, v, positions)``."""
        k, v = self.cross_attn.context_kv(tokens)
        return k, v, (self.token_positions(tokens) if self.position_bias else None)

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor, context: tuple, *, topk: int | None = None,
                topk_stride: int = 16) -> torch.Tensor:
        """xyz: (b, q, 3) query points; feats: (b, q, fourier) their Fourier features; context: from
        :meth:`context`. -> (b, q) field values."""
        k, v, pos = context
        penalty = None if pos is None else (xyz.float(), pos, self.pos_log_weight.float().exp())
        x = residual_stream(self.query_proj(feats))  # (b, q, w)
        x = self.cross_attn(x, kv=(k, v), distance_penalty=penalty, topk=topk, topk_stride=topk_stride)
        return self.output_proj(self.ln_post(x)).squeeze(-1)  # (b, q)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class VecSetVAE(Pretrained, nn.Module):
    """VecSet VAE. See the module docstring for the architecture and the output sign (negative inside).

    Typical use::

        vae = VecSetVAE.from_preset("tiny")      # or VecSetVAE.from_pretrained(checkpoint or release folder)
        posterior = vae.encode(surface)          # surface: (b, n, 3 + point_feats)
        z = posterior.mode()                     # (b, m, c); generators see vae.scale_latents(z)
        field = vae.query(points, vae.decode(z)) # (b, q), < 0 inside
    """

    kind: ClassVar[str] = "vecset_vae"
    config_class: ClassVar[type] = VecSetVAEConfig
    releases = (hunyuan_vae.FORMAT,)

    def __init__(self, config: VecSetVAEConfig):
        super().__init__()
        self.config = cfg = config
        self.fourier = FourierEmbedder(cfg.num_freqs, include_input=True, include_pi=cfg.include_pi)
        if not cfg.decoder_only:
            self.encoder = VecSetEncoder(cfg)
            self.pre_kl = nn.Linear(cfg.width, 2 * cfg.latent_channels)
        self.post_kl = nn.Linear(cfg.latent_channels, cfg.width)
        self.decoder = LatentDecoder(cfg)
        self.geo_decoder = GeometryDecoder(cfg)
        self.init_weights()

    @property
    def grad_checkpointing(self) -> bool:
        """Activation checkpointing of every transformer block stack (set by the training engine)."""
        return any(m.gradient_checkpointing for m in self.modules() if isinstance(m, BlockStack))

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, BlockStack):
                m.gradient_checkpointing = bool(value)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every tensor.

        * every ``nn.Linear`` weight (projections, q/k/v, attention outputs, MLPs, ``pre_kl``, ``post_kl``,
          ``query_proj``): ``N(0, s^2)`` with ``s = init_scale / sqrt(width)`` (Michelangelo / Hunyuan3D /
          Dora ``init_linear``); every Linear bias: 0;
        * ``geo_decoder.output_proj`` weight and bias: 0, so an untrained model predicts exactly 0 and the
          first steps are not dominated by a random field (VecSetX zero-initialised output layer);
        * every LayerNorm (blocks, qk-norm, ``ln_post``) weight 1, bias 0; RMS qk-norm gains 1.
        """
        std = self.config.init_scale / math.sqrt(self.config.width)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif hasattr(module, "gamma") and isinstance(module.gamma, nn.Parameter):
                nn.init.ones_(module.gamma)
        nn.init.zeros_(self.geo_decoder.output_proj.weight)
        nn.init.zeros_(self.geo_decoder.output_proj.bias)
        if self.config.position_bias:
            self.geo_decoder.reset_position_weights()

    # -- encoding --------------------------------------------------------------------------------

    def select_queries(self, surface: torch.Tensor, num_tokens: int | None = None, *,
                       generator: torch.Generator | None = None, deterministic: bool = False) -> torch.Tensor:
        """FPS query indices per shape: surface (b, n, >= 3) -> (b, m) int64 on ``surface.device``.

        Randomness (subsample and FPS start) comes from ``generator`` or torch's global RNG;
        ``deterministic=True`` uses none (exact FPS from each group's first point, no subsample).
        """
        m = self.config.num_tokens if num_tokens is None else int(num_tokens)
        if m < 1:
            raise ValueError(f"num_tokens must be >= 1, got {m}")
        pts = surface.detach().to("cpu", torch.float32).numpy()
        if deterministic:
            rngs = [None] * len(pts)
        else:
            dev = generator.device if generator is not None else "cpu"
            seeds = torch.randint(0, 2**62, (len(pts),), generator=generator, device=dev).tolist()
            rngs = [np.random.default_rng(s) for s in seeds]
        idx = [select_query_indices(p, m, fps_ratio=self.config.fps_ratio, rng=r) for p, r in zip(pts, rngs)]
        return torch.from_numpy(np.stack(idx)).to(surface.device)  # (b, m)

    def embed_surface(self, surface: torch.Tensor) -> torch.Tensor:
        """(b, n, 3 + f) surface -> (b, n, fourier_dim + point_feats): ``[Fourier(xyz), features]``."""
        need = 3 + self.config.point_feats
        if surface.ndim != 3 or surface.shape[-1] < need:
            raise ValueError(f"surface must be (b, n, >= {need}) [xyz, {self.config.point_feats} features], "
                             f"got {tuple(surface.shape)}")
        return torch.cat([self.fourier(surface[..., :3]), surface[..., 3:need]], dim=-1)

    def encode(self, surface: torch.Tensor, *, num_tokens: int | None = None,
               query_idx: torch.Tensor | None = None, generator: torch.Generator | None = None,
               deterministic: bool = False) -> DiagonalGaussian:
        """Surface points -> posterior over latents ``(b, m, latent_channels)``.

        Parameters
        ----------
        surface : (b, n, 3 + point_feats) float
          ``[xyz, normal, sharp flag]`` in the canonical frame (extra trailing columns are ignored).
        num_tokens : token count ``m`` (default ``config.num_tokens``); may differ from training.
        query_idx : (b, m) int64, optional
          Precomputed query indices into ``surface`` (skips FPS).
        generator : RNG for the random subsample and FPS start.
        deterministic : exact FPS with no randomness (:func:`select_query_indices`).
        """
        if self.config.decoder_only:
            raise RuntimeError("this VecSetVAE is decoder-only (e.g. Hunyuan3D-2.0 weights): "
                               "it has no encoder")
        data = self.embed_surface(surface)  # (b, n, fourier + f)
        if query_idx is None:
            query_idx = self.select_queries(surface, num_tokens, generator=generator,
                                            deterministic=deterministic)
        h = self.encoder(data, query_idx.to(surface.device))  # (b, m, w)
        return DiagonalGaussian.from_moments(self.pre_kl(h), dim=-1)

    # -- decoding --------------------------------------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the latents generators model: ``z * config.latent_scale`` (Hunyuan3D scale_factor)."""
        return z * self.config.latent_scale

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`scale_latents` (generator samples -> VAE latents for :meth:`decode`)."""
        return x / self.config.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, m, c) in VAE space (see :meth:`unscale_latents`) -> tokens (b, m, w)."""
        return self.decoder(residual_stream(self.post_kl(z)))

    def query(self, points: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int | None = None,
              topk: int | None = None, topk_stride: int = 16) -> torch.Tensor:
        """Field values at query points: points (b, q, 3), tokens (b, m, w) -> (b, q), negative inside.

        The token keys/values are projected once; queries run in chunks of ``chunk_size`` (all at once
        when ``None``). ``topk`` enables FlashVDM adaptive KV selection per chunk (decoding only).
        """
        context = self.geo_decoder.context(tokens)
        q = points.shape[1]
        step = q if chunk_size is None else max(1, int(chunk_size))
        outs = [self.query_context(points[:, i:i + step], context, topk=topk, topk_stride=topk_stride)
                for i in range(0, max(q, 1), step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def query_context(self, points: torch.Tensor, context: tuple, *, topk: int | None = None,
                      topk_stride: int = 16) -> torch.Tensor:
        """Like :meth:`query` with ``context = self.geo_decoder.context(tokens)`` precomputed (decoders)."""
        return self.geo_decoder(points, self.fourier(points), context, topk=topk, topk_stride=topk_stride)

    def forward(self, surface: torch.Tensor, points: torch.Tensor, *, sample_posterior: bool = True,
                num_tokens: int | None = None, query_idx: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict:
        """Encode ``surface`` (b, n, 3 + f), decode, and evaluate the field at ``points`` (b, q, 3).

        Returns ``dict(field=(b, q) negative inside, posterior=DiagonalGaussian, latents=(b, m, c))``;
        position-bias models add ``token_xyz`` (b, m, 3), the tokens' FPS points, and ``token_xyz_pred``,
        the positions the decoder read from the tokens.
        """
        if query_idx is None and not self.config.decoder_only:
            query_idx = self.select_queries(surface, num_tokens, generator=generator)
        posterior = self.encode(surface, num_tokens=num_tokens, query_idx=query_idx, generator=generator)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        context = self.geo_decoder.context(self.decode(z))
        out = dict(field=self.query_context(points, context), posterior=posterior, latents=z)
        if self.config.position_bias:
            idx = query_idx.to(surface.device)[..., None].expand(-1, -1, 3)
            out["token_xyz"] = surface[..., :3].gather(1, idx)
            out["token_xyz_pred"] = context[2]
        return out

    # -- checkpoints -----------------------------------------------------------------------------

    @classmethod
    def upgrade_config(cls, fields: dict, raw: dict, source: str) -> dict:
        """Older checkpoints: ``num_latents`` was renamed ``num_tokens``; the encoder input counts were the
        training data's ``n_surface`` / ``n_sharp`` (default 4096 / 1024)."""
        if "num_latents" in fields and "num_tokens" not in fields:
            fields["num_tokens"] = fields.pop("num_latents")
            log.info("%s: model.num_latents -> model.num_tokens (renamed)", source)
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        for old, new in (("n_surface", "surface_points"), ("n_sharp", "sharp_points")):
            if new not in fields and old in data:
                fields[new] = data[old]
                log.info("%s: data.%s -> model.%s (the encoder input count is part of the model now)",
                         source, old, new)
        return fields
