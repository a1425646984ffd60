"""Positional embeddings for continuous coordinates.

Design choices
--------------
* Fourier features of xyz as in NeRF / 3DShape2VecSet / Hunyuan3D ShapeVAE: log-spaced frequencies
  ``f_k = 2^k`` (``k = 0 .. num_freqs - 1``), optionally times pi.
* The output order is exactly Hunyuan3D's (and TripoSG's), so their weights load unchanged:
  ``[x, sin(x f), cos(x f)]`` where ``x f`` is flattened **input-dim major**
  (``x0 f0, x0 f1, ..., x0 f7, x1 f0, ...``). Output width ``d * (2 * num_freqs + include_input)``,
  51 for xyz with 8 frequencies.
* The frequencies are a non-persistent buffer: they are not in any state dict (Hunyuan3D's aren't either).
"""

from __future__ import annotations

import math

import torch
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
