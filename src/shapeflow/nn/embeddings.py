"""Embeddings shared by the models: Fourier features of xyz, the flow-time embedder, 3D sin-cos positions.

Design choices
--------------
* Fourier features of xyz as in NeRF / 3DShape2VecSet / Hunyuan3D ShapeVAE: log-spaced frequencies
  ``f_k = 2^k`` (``k = 0 .. num_freqs - 1``), optionally times pi.
* The output order is exactly Hunyuan3D's (and TripoSG's), so their weights load unchanged:
  ``[x, sin(x f), cos(x f)]`` where ``x f`` is flattened **input-dim major**
  (``x0 f0, x0 f1, ..., x0 f7, x1 f0, ...``). Output width ``d * (2 * num_freqs + include_input)``,
  51 for xyz with 8 frequencies.
* The frequencies are a non-persistent buffer: they are not in any state dict (Hunyuan3D's aren't either).
* :class:`TimestepEmbedder` (DiT / TRELLIS): flow time ``t`` in [0, 1] (:mod:`shapeflow.flow`) -> a 256-dim
  sinusoid of ``1000 t`` in ``cat([cos, sin])`` order -> MLP. Public models with another time scale or
  order are converted in their loaders, never here.
* :func:`sincos_3d_embedding`: TRELLIS's absolute 3D sin-cos embedding of positions (a token grid's table:
  :func:`sincos_3d_position_embedding`; the sparse DiT's voxels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FourierEmbedder(nn.Module):
    """Fourier features of points: ``(..., d) -> (..., d * (2 * num_freqs + include_input))``.

    Parameters
    ----------
    num_freqs : number of octaves; frequencies are ``2^0 .. 2^(num_freqs - 1)``.
    include_input : prepend the raw coordinates (Hunyuan3D default True).
    include_pi : multiply the frequencies by pi (Hunyuan3D / TripoSG configs set it False).
    input_dim : number of coordinates per point (3 for xyz).
    """

    def __init__(self, num_freqs: int = 8, *, include_input: bool = True, include_pi: bool = False,
                 input_dim: int = 3):
        super().__init__()
        if num_freqs < 0:
            raise ValueError(f"num_freqs must be >= 0, got {num_freqs}")
        freqs = 2.0 ** torch.arange(num_freqs, dtype=torch.float32)
        if include_pi:
            freqs = freqs * math.pi
        self.register_buffer("frequencies", freqs, persistent=False)
        self.num_freqs = num_freqs
        self.include_input = include_input
        self.input_dim = input_dim
        self.out_dim = input_dim * (2 * num_freqs + int(include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., out_dim), ``[x, sin(x f), cos(x f)]``."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"expected points with {self.input_dim} coordinates, got shape {tuple(x.shape)}")
        if self.num_freqs == 0:
            return x
        freqs = self.frequencies.to(dtype=x.dtype)
        embed = (x[..., None] * freqs).flatten(-2)  # (..., d * f), input-dim major
        parts = [x, embed.sin(), embed.cos()] if self.include_input else [embed.sin(), embed.cos()]
        return torch.cat(parts, dim=-1)


class TimestepEmbedder(nn.Module):
    """Flow time ``t`` in [0, 1] -> (b, C): sinusoid of ``1000 t`` (dim 256, ``cat([cos, sin])``) then MLP.

    ``mlp.0`` = Linear(256, C), ``mlp.1`` = SiLU, ``mlp.2`` = Linear(C, C) (TRELLIS / DiT names).
    Frequencies ``exp(-ln(10000) k / 128)``, ``k = 0 .. 127``. ``hidden`` (default C) and ``activation``
    (``"silu"`` / ``"gelu"``) change the MLP's middle; Hunyuan3D-2.1 uses ``time_scale`` 1, ``freq_dim`` C,
    ``hidden`` 4C and GELU (its ``[sin, cos]`` order is permuted into ours by the loader).
    """

    def __init__(self, width: int, freq_dim: int = 256, *, time_scale: float = 1000.0,
                 max_period: float = 10000.0, hidden: int | None = None, activation: str = "silu"):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"timestep frequency dim must be even, got {freq_dim}")
        if activation not in ("silu", "gelu"):
            raise ValueError(f"timestep MLP activation must be silu or gelu, got {activation!r}")
        self.freq_dim, self.time_scale, self.max_period = freq_dim, time_scale, max_period
        hidden = hidden or width
        act = nn.SiLU() if activation == "silu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), act, nn.Linear(hidden, width))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """(b,) -> (b, freq_dim) features of ``time_scale * t`` in float32 (float64 for a float64 ``t``)."""
        half = self.freq_dim // 2
        dtype = torch.promote_types(t.dtype, torch.float32)  # float32, or float64 for a float64 t
        k = torch.arange(half, dtype=dtype, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)  # (half,)
        args = (t.to(dtype) * self.time_scale)[:, None] * freqs[None]  # (b, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (b, freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_3d_embedding(coords: torch.Tensor, width: int) -> torch.Tensor:
    """TRELLIS ``AbsolutePositionEmbedder(width, 3)`` of 3D positions: ``(..., 3) -> (..., width)`` float32.

    Per axis ``[sin(x f), cos(x f)]`` with ``f_k = 1 / 10000^(k / F)``, ``F = width // 3 // 2``; axes
    concatenated x|y|z, zero-padded to ``width``. A function of each position alone, so a set of tokens
    embedded by it is order-free (the sparse DiT's voxels).
    """
    freq_dim = width // 3 // 2
    if freq_dim < 1:
        raise ValueError(f"width {width} is too small for a 3D sin-cos embedding (needs >= 6)")
    if coords.shape[-1] != 3:
        raise ValueError(f"expected (..., 3) positions, got {tuple(coords.shape)}")
    freqs = 1.0 / (10000.0 ** (torch.arange(freq_dim, dtype=torch.float32, device=coords.device) / freq_dim))
    out = coords.float()[..., None] * freqs  # (..., 3, F)
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=-1).flatten(-2)  # (..., 6F)
    return F.pad(emb, (0, width - emb.shape[-1]))  # (..., width)


def sincos_3d_position_embedding(resolution: int, width: int) -> torch.Tensor:
    """:func:`sincos_3d_embedding` of a ``resolution^3`` token grid: ``(r^3, width)``, integer coordinates
    (``meshgrid(indexing="ij")`` flattened in C order, the token order of :func:`shapeflow.nn.spatial.patchify_3d`)."""
    r = torch.arange(resolution, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)  # (n, 3)
    return sincos_3d_embedding(coords, width)


@torch.no_grad()
def reverse_time_weight(weight: torch.Tensor, *, time_scale: float = 1000.0,
                        max_period: float = 10000.0) -> torch.Tensor:
    """First-layer weight ``(C, freq_dim)`` of a :class:`TimestepEmbedder` for reversed time: ``W'`` with
    ``W' emb(t) = W emb(1 - t)`` for every ``t``.

    Per frequency ``f`` (``A = time_scale f``, ``B = time_scale t f``): ``cos(A - B) = cos A cos B + sin A sin B``
    and ``sin(A - B) = sin A cos B - cos A sin B``, a fixed rotation of the ``[cos | sin]`` columns. Computed
    in float64, returned in ``weight``'s dtype.
    """
    half = weight.shape[1] // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    a = time_scale * freqs  # the angle of t = 1
    cos_a, sin_a = torch.cos(a), torch.sin(a)
    w = weight.double()
    w_cos, w_sin = w[:, :half], w[:, half:]  # columns acting on the cos(B) and the sin(B) features
    return torch.cat([w_cos * cos_a + w_sin * sin_a, w_cos * sin_a - w_sin * cos_a], dim=1).to(weight.dtype)
