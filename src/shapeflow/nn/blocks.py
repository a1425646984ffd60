"""Pre-norm transformer blocks (self- and cross-attention) on :mod:`shapeflow.nn.attention`.

Design choices
--------------
* Pre-norm residual blocks, the Hunyuan3D ShapeVAE / Michelangelo order:

  - :class:`SelfAttentionBlock`: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.
  - :class:`CrossAttentionBlock`: ``x = x + attn(ln_1(x), ln_2(context)); x = x + mlp(ln_3(x))``
    (``ln_2`` normalises the *context*, ``ln_3`` is the pre-MLP norm).

* Submodule names (``ln_1``, ``attn.to_qkv`` / ``attn.to_q`` / ``attn.to_kv``, ``attn.q_norm``,
  ``attn.to_out``, ``mlp.fc1``, ``mlp.fc2``) are fixed: checkpoint converters map public names onto
  them with a plain table (see :mod:`shapeflow.models.pretrained.hunyuan_vae`).
* LayerNorm eps defaults to 1e-6 (Hunyuan3D block norms); it is an argument so a loader can match
  a checkpoint's training configuration exactly.
* A cross-attention block can split its work into :meth:`CrossAttentionBlock.context_kv` (keys and
  values of the context, computed once) and :meth:`CrossAttentionBlock.forward` with ``kv=``, so a
  decoder that queries millions of points in chunks projects the latent tokens only once. Optional
  per-query-set top-k selection of context tokens (FlashVDM "adaptive KV selection",
  arXiv 2503.16302) lives here too.
* :class:`BlockStack` runs a list of blocks, optionally with activation (gradient) checkpointing
  (``torch.utils.checkpoint``, ``use_reentrant=False``) when gradients are being recorded.

Legend: b batch, n query tokens, m context tokens, h heads, d head channels, c width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapeflow.nn.attention import MLP, Attention, sdpa


class SelfAttentionBlock(nn.Module):
    """``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`` with multi-head self-attention."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: str | None = "layer", eps: float = 1e-6):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads=heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, c) -> (b, n, c)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CrossAttentionBlock(nn.Module):
    """``x = x + attn(ln_1(x), ln_2(context)); x = x + mlp(ln_3(x))``.

    Parameters
    ----------
    dim : width of the query stream ``x``.
    context_dim : width of the context tokens (defaults to ``dim``).
    """

    def __init__(self, dim: int, *, heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_norm: str | None = "layer", eps: float = 1e-6):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.ln_2 = nn.LayerNorm(context_dim, eps=eps)
        self.attn = Attention(dim, heads=heads, context_dim=context_dim, qkv_bias=qkv_bias, qk_norm=qk_norm)
        self.ln_3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(round(dim * mlp_ratio)))

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values of the context: ``(b, m, context_dim) -> 2 x (b, h, m, d)``."""
        attn = self.attn
        b, m, _ = context.shape
        kv = attn.to_kv(self.ln_2(context)).view(b, m, 2, attn.heads, attn.head_dim)  # (b, m, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (b, h, m, d)
        return attn.k_norm(k), v

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries of the stream: ``(b, n, c) -> (b, h, n, d)``."""
        attn = self.attn
        b, n, _ = x.shape
        q = attn.to_q(self.ln_1(x)).view(b, n, attn.heads, attn.head_dim).transpose(1, 2)  # (b, h, n, d)
        return attn.q_norm(q)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                distance_penalty: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                topk: int | None = None, topk_stride: int = 16) -> torch.Tensor:
        """Attend from ``x (b, n, c)`` to a context; returns ``(b, n, c)``.

        Give either ``context (b, m, context_dim)`` or its precomputed ``kv`` from :meth:`context_kv`.
        ``distance_penalty = (xq (b, n, 3), xk (b, m, 3), w (h,))`` subtracts ``w_h |xq_i - xk_j|^2`` from
        the logits of head ``h`` (after the 1/sqrt(d) scale); see :func:`attention_with_distance_penalty`.
        ``topk`` (off by default) keeps, per batch item and head, only the ``topk`` context tokens with
        the largest mean logit over every ``topk_stride``-th query of ``x`` (FlashVDM adaptive KV
        selection). It is meant for ``x`` holding queries of one small spatial region.
        """
        if kv is None:
            if context is None:
                raise ValueError("CrossAttentionBlock needs a context or precomputed kv")
            kv = self.context_kv(context)
        k, v = kv
        q = self.queries(x)  # (b, h, n, d)
        if topk is not None and topk < k.shape[2]:
            bias = None if distance_penalty is None else distance_bias(*distance_penalty)
            k, v, bias = select_topk_kv(q, k, v, topk, stride=topk_stride, bias=bias)
            out = sdpa(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
        elif distance_penalty is not None:
            out = attention_with_distance_penalty(q, k, v, *distance_penalty)
        else:
            out = sdpa(q, k, v)  # (b, h, n, d)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (b, n, h*d)
        x = x + self.attn.to_out(out)
        return x + self.mlp(self.ln_3(x))


def distance_bias(xq: torch.Tensor, xk: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Additive logits ``-w_h |xq_i - xk_j|^2``: xq (b, n, 3), xk (b, m, 3), w (h,) -> (b, h, n, m), float32."""
    d2 = torch.cdist(xq.float(), xk.float()).square()  # (b, n, m)
    return -w.float()[None, :, None, None] * d2[:, None]


def attention_with_distance_penalty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, xq: torch.Tensor,
                                    xk: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``softmax(q . k / sqrt(d) - w_h |xq_i - xk_j|^2) v`` for q (b, h, n, d), k, v (b, h, m, d).

    In float32 the penalty becomes four extra channels of q and k: ``-w |x - y|^2 = 2 w x . y - w |y|^2
    - w |x|^2``, and the last term is the same for every key of a query, so softmax ignores it. Padding
    the channels to a multiple of 8 keeps SDPA's fused kernels (on the CPU far cheaper than an explicit
    (b, h, n, m) mask, which disables them). In lower precisions the extra
    channels (``2 w x`` reaches ~10^3) would lose the logits' accuracy, so an explicit mask is used on
    CUDA; on a CPU under autocast the whole attention runs in float32 instead (see
    :func:`shapeflow.nn.attention.sdpa`), which keeps the fused kernel.
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        with torch.autocast("cpu", enabled=False):
            return attention_with_distance_penalty(q.float(), k.float(), v.float(), xq, xk, w).to(dtype)
    if q.dtype != torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=distance_bias(xq, xk, w).to(q.dtype))
    b, h, n, d = q.shape
    m = k.shape[2]
    wh = w.float()[None, :, None, None]  # (1, h, 1, 1)
    pad = (-(d + 4)) % 8
    sq = math.sqrt(d)  # SDPA divides every channel by sqrt(d); the extra ones must not be
    q_extra = torch.cat([2 * wh * xq[:, None], -wh.expand(b, h, n, 1)], dim=-1) * sq  # (b, h, n, 4)
    k_extra = torch.cat([xk, xk.square().sum(-1, keepdim=True)], dim=-1)[:, None].expand(b, h, m, 4)
    qe = torch.cat([q, q_extra, q.new_zeros(b, h, n, pad)], dim=-1)
    ke = torch.cat([k, k_extra, k.new_zeros(b, h, m, pad)], dim=-1)
    ve = torch.cat([v, v.new_zeros(b, h, m, 4 + pad)], dim=-1)
    return F.scaled_dot_product_attention(qe, ke, ve, scale=1.0 / sq)[..., :d]


def select_topk_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, *, stride: int = 16,
                   bias: torch.Tensor | None = None):
    """Keep the ``topk`` keys/values per (batch, head) with the largest mean attention logit.

    The logit ``q . k / sqrt(d) (+ bias)`` of a key is averaged over every ``stride``-th query
    (FlashVDM samples every 50th-100th).

    Parameters
    ----------
    q : (b, h, n, d) queries; k, v : (b, h, m, d).
    bias : optional (b or 1, h or 1, n, m) additive logits; returned gathered to the kept keys.

    Returns
    -------
    k, v : (b, h, topk, d), and ``bias`` (b, h, n, topk) or None
    """
    step = max(1, stride)
    sample = q[:, :, ::step]  # (b, h, n', d)
    score = torch.einsum("bhnd,bhmd->bhm", sample, k) / (sample.shape[2] * sample.shape[-1] ** 0.5)
    if bias is not None:
        score = score + bias[:, :, ::step].mean(2)  # (b, h, m)
    idx = score.topk(topk, dim=-1).indices  # (b, h, topk)
    if bias is not None:
        b, h = score.shape[:2]
        bias = bias.expand(b, h, -1, -1)
        bias = bias.gather(3, idx[:, :, None, :].expand(-1, -1, bias.shape[2], -1))  # (b, h, n, topk)
    idx = idx[..., None].expand(-1, -1, -1, k.shape[-1])  # (b, h, topk, d)
    return k.gather(2, idx), v.gather(2, idx), bias


class BlockStack(nn.ModuleList):
    """A sequence of blocks applied in order, with optional gradient checkpointing.

    ``gradient_checkpointing`` recomputes each block's activations in the backward pass instead of
    storing them (less memory, about one extra forward of compute). It only acts while autograd is
    recording, so evaluation is unaffected.
    """

    def __init__(self, blocks, *, gradient_checkpointing: bool = False):
        super().__init__(blocks)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, n, c) -> (b, n, c)."""
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x
