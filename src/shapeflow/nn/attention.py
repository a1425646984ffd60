"""Multi-head attention on PyTorch scaled-dot-product attention (SDPA), the one attention path.

SDPA picks the fused flash / memory-efficient kernels on GPUs and a fused CPU kernel otherwise, so
there is no backend switch and no environment variable (compare TRELLIS' ``ATTN_BACKEND``).

Weight layout (fixed; checkpoint loaders of other projects permute into it):

* self-attention: ``to_qkv`` Linear(dim -> 3 * dim); output rows are ``[q | k | v]``, each ``(h d)``
  (heads outer, head channels inner), i.e. ``rearrange(..., "b n (three h d) -> three b h n d")``.
* cross-attention: ``to_q`` Linear(dim -> dim), ``to_kv`` Linear(context_dim -> 2 * dim) with rows ``[k | v]``.
* ``to_out`` Linear(dim -> dim).

qk-norm (normalising queries and keys per head before the dot product) keeps logits bounded in
bf16/fp16 training (SD3, TRELLIS, Hunyuan3D). Two kinds, as used by the public checkpoints:

* ``"layer"``: ``LayerNorm(head_dim)`` with weight and bias, eps 1e-6 (Hunyuan3D ShapeVAE).
* ``"rms"``: ``normalize(x) * gamma[h, d] * sqrt(head_dim)`` (TRELLIS ``MultiHeadRMSNorm``).
* ``"rmsnorm"``: ``x / sqrt(mean(x^2) + 1e-6) * weight[d]`` in float32, one gain shared by the heads
  (``torch.nn.RMSNorm``; Hunyuan3D-2.x DiTs).

Under CPU autocast (``train.precision=bf16`` on a CPU with AMX) the attention itself runs in float32
(:func:`sdpa`): the CPU's fused kernel is slower in bfloat16 than in float32, while the projections
around it, which are plain matmuls, run faster in bfloat16 on CPUs with native bf16 units.

Legend: b batch, n query tokens, m key/value tokens, h heads, d head channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
         scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; in float32 on a CPU under autocast or for bf16 / fp16 inputs.

    On CUDA this is SDPA as is (flash / memory-efficient kernels in bf16). On the CPU under autocast (or with
    half-precision inputs, e.g. a model cast to bf16 for inference) the inputs are cast to float32 and autocast
    is suspended for the call; the result comes back in the autocast (input) dtype: on a CPU with AMX, bf16
    linears with float32 attention beat both all-bf16 and all-float32 training steps of the tiny VecSet VAE.
    """
    low = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or low):
        dtype = q.dtype if low else torch.get_autocast_dtype("cpu")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.float()  # an additive bias; a boolean mask stays boolean
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale, attn_mask=attn_mask)
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


class MultiHeadRMSNorm(nn.Module):
    """Per-head L2 normalisation with a learned per-head, per-channel gain (TRELLIS ``MultiHeadRMSNorm``)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.scale = math.sqrt(head_dim)
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (b, h, n, d)
        y = F.normalize(x.float(), dim=-1) * self.gamma[None, :, None, :] * self.scale
        return y.to(x.dtype)


def make_qk_norm(kind: str | None, heads: int, head_dim: int) -> nn.Module:
    """Build one query or key normaliser of the given kind (``"layer"``, ``"rms"`` or ``None``)."""
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "layer":
        return _HeadLayerNorm(head_dim)
    if kind == "rms":
        return MultiHeadRMSNorm(heads, head_dim)
    if kind == "rmsnorm":
        return HeadRMSNorm(head_dim)
    raise ValueError(f"unknown qk_norm {kind!r}; expected 'layer', 'rms', 'rmsnorm' or None")


class HeadRMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm(head_dim, eps=1e-6)`` over the head channels, computed in float32."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight.to(x.dtype)


class _HeadLayerNorm(nn.LayerNorm):
    """LayerNorm over the head channels of a (b, h, n, d) tensor."""

    def __init__(self, head_dim: int):
        super().__init__(head_dim, eps=1e-6)


class Attention(nn.Module):
    """Self-attention (``context_dim=None``) or cross-attention to a context sequence.

    Parameters
    ----------
    dim : width of the query stream (and of the output).
    heads : number of heads; ``dim`` must be divisible by it.
    context_dim : width of the context for cross-attention; ``None`` makes it self-attention.
    qkv_bias : bias on the q/k/v projections.
    qk_norm : ``"layer"``, ``"rms"`` or ``None`` (see module docstring).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: str | None = "layer",
        out_bias: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = make_qk_norm(qk_norm, heads, self.head_dim)
        self.k_norm = make_qk_norm(qk_norm, heads, self.head_dim)
        self.to_out = nn.Linear(dim, dim, bias=out_bias)

    def project(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """Return normalised ``q (b, h, n, d)``, ``k (b, h, m, d)`` and ``v (b, h, m, d)``."""
        b, n, _ = x.shape
        h, d = self.heads, self.head_dim
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context tensor")
            q = self.to_q(x).view(b, n, h, d).transpose(1, 2)  # (b, h, n, d)
            kv = self.to_kv(context).view(b, context.shape[1], 2, h, d)  # (b, m, 2, h, d)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (b, h, m, d)
        else:
            qkv = self.to_qkv(x).view(b, n, 3, h, d)  # (b, n, 3, h, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (b, h, n, d)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                lengths: list[int] | None = None) -> torch.Tensor:
        """x: (b, n, dim); context: (b, m, context_dim) for cross-attention. Returns (b, n, dim).

        ``lengths`` (self-attention of padded variable-length rows): row ``i`` holds ``lengths[i]`` real
        tokens first, then padding. Each row's real tokens attend to each other only (one SDPA call per row,
        the fused kernels without a mask); padded positions get 0.
        """
        q, k, v = self.project(x, context)
        b, n = x.shape[:2]
        if lengths is None or all(length == n for length in lengths):
            out = sdpa(q, k, v)  # (b, h, n, d)
        else:
            if self.is_cross or len(lengths) != b:
                raise ValueError(f"lengths: one per row of a self-attention batch ({b}), got {len(lengths)}")
            out = torch.zeros_like(q)
            for i, length in enumerate(lengths):
                out[i:i + 1, :, :length] = sdpa(q[i:i + 1, :, :length], k[i:i + 1, :, :length],
                                                v[i:i + 1, :, :length])
        out = out.transpose(1, 2).reshape(b, n, -1)  # (b, n, h*d)
        return self.to_out(out)


class MLP(nn.Module):
    """Linear -> GELU -> Linear. ``approximate="none"`` is exact erf GELU (Hunyuan3D); ``"tanh"`` is TRELLIS'."""

    def __init__(self, dim: int, hidden: int, *, out_dim: int | None = None, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
