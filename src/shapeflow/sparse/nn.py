"""Modules on :class:`~shapeflow.sparse.tensor.SparseTensor`: submanifold convolution, per-voxel layers,
norms with per-batch-element statistics, and window attention. Every ``forward`` maps a SparseTensor to a
SparseTensor on the same coordinates (sharing its cache).

Design choices
--------------
* **Submanifold convolution in plain PyTorch** (:class:`SubMConv3d`), CPU and CUDA, no compiled extension:
  ``out[p] = bias + sum_o W_o x[nbr[p, o]]`` over the cached neighbour map
  (:meth:`SparseTensor.neighbors`). A custom autograd function avoids every scatter of the im2col path:
  the map is symmetric (``nbr[p, o] == q`` iff ``nbr[q, K-1-o] == p``), so the input gradient is the same
  gather-matmul applied to the output gradient with the mirrored, transposed kernel, and the weight
  gradient is ``cols^T @ grad``, recomputed chunk by chunk instead of stored. Two algorithms, chosen by
  channel count (``algorithm="auto"``), both measured on a 2-core CPU (``benchmarks/bench_sparse_conv.py``):

  - ``"im2col"`` (``in * out <= 32 * 64``, the memory-bound regime): rows in cache-sized chunks
    (about 4 MiB of gathered columns on a CPU), ``(rows, K * C_in)`` gathered with one ``index_select``
    (absent neighbours read a zero row) and one matmul per chunk;
  - ``"offsets"`` (wider layers, compute-bound): one gather, matmul and ``index_add_`` per kernel offset
    over the pairs that exist only, so no multiply-adds are spent on absent neighbours (a surface shell
    has about 16 of 27).

  Memory grows with ``N`` only. ``backend="torch"`` is the only backend: spconv's CPU wheel (2.3.8) needs a
  monkeypatch to run backward at all and, with this project's torch, returns wrong values (its CPU pair map;
  the benchmark's ``err`` column), so it is only compared against in the benchmark.
* **Activations**: :class:`SparseSiLU` / :class:`SparseGELU` modules for ``nn.Sequential``, or directly
  ``x.replace(F.silu(x.feats))`` (identical).
* **Norms**: :class:`SparseLayerNorm` normalises each voxel over its channels (ConvNeXt / TRELLIS.2);
  :class:`SparseGroupNorm` takes statistics per batch element over its voxels and the group's channels,
  exactly ``nn.GroupNorm`` on that element's ``(1, C, n_b)`` features (batch elements never mix).
* **Window attention** (:class:`SparseWindowAttention`): the voxels of each ``window^3`` block
  (index ``(coords[:, 1:] + shift) // window``) of one batch element attend to each other only. Windows
  are grouped by size rounded up to a power of two and padded (at most ``log2(window^3) + 1`` SDPA calls,
  padding below 2x) with an additive key-padding mask; no positional encoding is added here.

Legend: N voxels, C channels, K kernel offsets (``k^3``), W windows, L padded window length, h heads,
d head channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from shapeflow.nn.attention import make_qk_norm, sdpa
from shapeflow.sparse.tensor import SparseTensor, _check_kernel

__all__ = ["SparseGELU", "SparseGroupNorm", "SparseLayerNorm", "SparseLinear", "SparseSiLU",
           "SparseWindowAttention", "SubMConv3d"]

#: Gathered-column bytes per chunk of the im2col algorithm: about one L2/L3 slice on a CPU, large on a GPU.
_CHUNK_BYTES = {"cpu": 4 << 20}
_CHUNK_BYTES_DEFAULT = 256 << 20
#: Fewest rows per chunk (keeps the weight reads of a chunk small next to its column reads).
_MIN_ROWS = 256
#: ``"auto"`` uses im2col up to this ``in_channels * out_channels``, the per-offset algorithm above it.
_IM2COL_MAX_CHANNEL_PRODUCT = 32 * 64


# ------------------------------------------------------------------------------------------------
# Submanifold convolution
# ------------------------------------------------------------------------------------------------


def _chunking(device: torch.device, k: int, c: int, itemsize: int) -> tuple[int, int]:
    """``(rows, offsets)`` per im2col block so that a block of gathered columns fits the chunk budget."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES_DEFAULT)
    rows = max(_MIN_ROWS, budget // (k * c * itemsize))
    return rows, min(k, max(1, budget // (rows * c * itemsize)))


def _im2col_blocks(x: torch.Tensor, nbr: torch.Tensor):
    """Yield ``(row slice, offset slice, cols)``: ``cols (r, g * C)`` holds ``x[nbr[rows, offsets]]``, zeros
    where a neighbour is absent."""
    n, c = x.shape
    k = nbr.shape[1]
    padded = torch.cat([x, x.new_zeros(1, c)])  # (N + 1, C); row N stands for an absent neighbour
    rows, group = _chunking(x.device, k, c, x.element_size())
    for s in range(0, n, rows):
        idx = nbr[s:s + rows]
        idx = torch.where(idx < 0, n, idx)  # (r, K)
        for a in range(0, k, group):
            b = min(k, a + group)
            cols = padded.index_select(0, idx[:, a:b].reshape(-1)).view(idx.shape[0], (b - a) * c)  # (r, g C)
            yield slice(s, s + rows), slice(a * c, b * c), cols


def _im2col_matmul(x: torch.Tensor, nbr: torch.Tensor, w: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = bias + sum_o x[nbr[p, o]] @ w[o]`` with ``x (N, Ci)``, ``w (K, Ci, Co)``: ``(N, Co)``."""
    w = w.reshape(-1, w.shape[2])  # (K Ci, Co)
    out = x.new_empty(x.shape[0], w.shape[1])  # (N, Co)
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.expand_as(out))
    for rows, cols_slice, cols in _im2col_blocks(x, nbr):
        out[rows].addmm_(cols, w[cols_slice])
    return out


def _im2col_weight_grad(x: torch.Tensor, nbr: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum_p x[nbr[p, o]]^T grad[p]`` for every offset: ``(K, Ci, Co)``."""
    k, c = nbr.shape[1], x.shape[1]
    gw = x.new_zeros(k * c, grad.shape[1])  # (K Ci, Co)
    for rows, cols_slice, cols in _im2col_blocks(x, nbr):
        gw[cols_slice].addmm_(cols.t(), grad[rows])
    return gw.view(k, c, grad.shape[1])


def _offset_pairs(x: SparseTensor, kernel_size: int, dilation: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per kernel offset ``o``: ``(p, q)``, the rows that have a neighbour there and that neighbour (cached)."""
    key = ("pairs", kernel_size, dilation)
    pairs = x._cache.get(key)
    if pairs is None:
        nbr = x.neighbors(kernel_size, dilation)
        pairs = []
        for o in range(nbr.shape[1]):
            p = (nbr[:, o] >= 0).nonzero().squeeze(1)  # (n_o,)
            pairs.append((p, nbr[p, o]))
        pairs = x._cache[key] = pairs
    return pairs


def _offsets_matmul(x: torch.Tensor, pairs, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same as :func:`_im2col_matmul`, one gather + matmul + ``index_add_`` per offset over existing pairs."""
    centre = len(pairs) // 2  # the identity
    out = x @ w[centre] if bias is None else torch.addmm(bias, x, w[centre])  # (N, Co)
    for o, (p, q) in enumerate(pairs):
        if o != centre and p.numel():
            out.index_add_(0, p, x.index_select(0, q) @ w[o])
    return out


def _offsets_weight_grad(x: torch.Tensor, pairs, grad: torch.Tensor) -> torch.Tensor:
    gw = x.new_zeros(len(pairs), x.shape[1], grad.shape[1])  # (K, Ci, Co)
    for o, (p, q) in enumerate(pairs):
        if p.numel():
            torch.mm(x.index_select(0, q).t(), grad.index_select(0, p), out=gw[o])
    return gw


class _SubMConv3dFunction(torch.autograd.Function):
    """``(feats (N, Ci), weight (Co, Ci, k, k, k), bias (Co,) | None, nbr (N, K), pairs | None) -> (N, Co)``.

    ``pairs`` selects the per-offset algorithm, ``None`` im2col. The input gradient uses the symmetry of the
    map: ``grad_x[q] = sum_o W_o^T grad[nbr[q, K-1-o]]``, i.e. the forward with kernel ``W_{K-1-o}^T``.
    """

    @staticmethod
    def forward(ctx, feats, weight, bias, nbr, pairs):
        w = weight.flatten(2).permute(2, 1, 0)  # (K, Ci, Co)
        ctx.save_for_backward(feats, weight, nbr)
        ctx.pairs, ctx.has_bias = pairs, bias is not None
        if pairs is None:
            return _im2col_matmul(feats, nbr, w, bias)
        return _offsets_matmul(feats, pairs, w, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        feats, weight, nbr = ctx.saved_tensors
        pairs = ctx.pairs
        grad = grad.contiguous()  # (N, Co)
        grad_feats = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            wt = weight.flatten(2).permute(2, 0, 1).flip(0)  # (K, Co, Ci): mirrored offsets, transposed
            grad_feats = _im2col_matmul(grad, nbr, wt) if pairs is None else _offsets_matmul(grad, pairs, wt)
        if ctx.needs_input_grad[1]:
            gw = _im2col_weight_grad(feats, nbr, grad) if pairs is None else _offsets_weight_grad(feats, pairs, grad)
            grad_weight = gw.permute(2, 1, 0).reshape(weight.shape)  # (Co, Ci, k, k, k)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_feats, grad_weight, grad_bias, None, None


class SubMConv3d(nn.Module):
    """Submanifold 3D convolution: output on the input's coordinates, inputs read at active nodes only.

    Equals ``F.conv3d(x.dense(), weight, bias, padding=k // 2 * dilation, dilation=dilation)`` read back at
    the active nodes (absent nodes count as zeros). ``weight`` has ``nn.Conv3d``'s layout
    ``(out, in, k, k, k)`` (offset order: :meth:`SparseTensor.neighbors`) and initialisation, so dense
    checkpoints load unchanged. Under autocast the convolution runs in the autocast dtype.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : odd int (centred kernel)
    dilation : int
    bias : bool
    backend : ``"torch"`` (the only one; see the module docstring)
    algorithm : ``"auto"``, ``"im2col"`` or ``"offsets"`` (see the module docstring; all give the same result)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1,
                 bias: bool = True, *, backend: str = "torch", algorithm: str = "auto"):
        super().__init__()
        _check_kernel(kernel_size, dilation)
        if backend != "torch":
            raise ValueError(f"unknown sparse conv backend {backend!r}; only 'torch' is available")
        if algorithm not in ("auto", "im2col", "offsets"):
            raise ValueError(f"algorithm must be 'auto', 'im2col' or 'offsets', got {algorithm!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.dilation = int(kernel_size), int(dilation)
        self.backend = backend
        if algorithm == "auto":
            algorithm = "im2col" if in_channels * out_channels <= _IM2COL_MAX_CHANNEL_PRODUCT else "offsets"
        self.algorithm = algorithm
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k, k))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv3d``'s initialisation: weight kaiming-uniform (a = sqrt(5)), bias U(+-1/sqrt(fan_in))."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**3
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise ValueError(f"SubMConv3d expects {self.in_channels} channels, got {x.num_channels}")
        nbr = x.neighbors(self.kernel_size, self.dilation)  # (N, K), cached
        pairs = _offset_pairs(x, self.kernel_size, self.dilation) if self.algorithm == "offsets" else None
        feats, weight, bias = x.feats, self.weight, self.bias
        device = feats.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            feats, weight = feats.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            out = _SubMConv3dFunction.apply(feats, weight, bias, nbr, pairs)  # (N, Co)
        return x.replace(out)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, algorithm={self.algorithm!r}")


# ------------------------------------------------------------------------------------------------
# Per-voxel layers and norms
# ------------------------------------------------------------------------------------------------


class SparseLinear(nn.Linear):
    """``nn.Linear`` on each voxel's features (same parameters and state-dict keys)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseSiLU(nn.Module):
    """SiLU on the features; same as ``x.replace(F.silu(x.feats))``."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.silu(x.feats))


class SparseGELU(nn.Module):
    """GELU on the features (``approximate`` as in ``nn.GELU``)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(F.gelu(x.feats, approximate=self.approximate))


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm of each voxel over its channels (ConvNeXt-style; eps 1e-6 as in TRELLIS.2)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(super().forward(x.feats))


class SparseGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per batch element, over its voxels and the group's channels.

    Each batch element's features ``(n_b, C)`` are normalised as ``nn.GroupNorm`` normalises a
    ``(1, C, n_b)`` tensor (one loop step per batch element; batch elements never mix).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.num_channels:
            raise ValueError(f"SparseGroupNorm expects {self.num_channels} channels, got {x.num_channels}")
        parts = []
        for start, end in x.batch_slices():
            if end > start:
                f = x.feats[start:end].t().unsqueeze(0)  # (1, C, n_b)
                parts.append(F.group_norm(f, self.num_groups, self.weight, self.bias, self.eps)[0].t())  # (n_b, C)
        return x.replace(torch.cat(parts) if parts else x.feats)


# ------------------------------------------------------------------------------------------------
# Window attention
# ------------------------------------------------------------------------------------------------


def window_partition(x: SparseTensor, window: int, shift: int = 0):
    """Group the voxels of ``x`` by window: ``(buckets, inverse)``, cached per ``(window, shift)``.

    Window of a voxel: ``(b, (coords[:, 1:] + shift) // window)``. ``buckets`` is a list of
    ``(index (W, L) int64, valid (W, L) bool, full)``, windows whose voxel count rounds up to the power of
    two ``L``; ``index`` lists the rows of each window's voxels (sorted), padded with ``N``; ``full`` is True
    when no window of the bucket is padded. ``inverse (N,)`` maps each voxel to its row in
    ``cat([index[valid] for index, valid, _ in buckets])``.
    """
    if int(window) != window or window < 1 or int(shift) != shift or shift < 0:
        raise ValueError(f"window must be a positive integer and shift a non-negative one, got {window!r}, {shift!r}")
    key = ("windows", int(window), int(shift))
    cached = x._cache.get(key)
    if cached is not None:
        return cached
    n, dev = x.num_voxels, x.coords.device
    c = x.coords.long()
    per_axis = (x.shape - 1 + shift) // window + 1
    wkey = ((c[:, 0] * per_axis + (c[:, 1] + shift) // window) * per_axis
            + (c[:, 2] + shift) // window) * per_axis + (c[:, 3] + shift) // window  # (N,)
    order = torch.argsort(wkey, stable=True)  # voxel rows grouped by window
    counts = torch.unique_consecutive(wkey[order], return_counts=True)[1]  # (W,)
    starts = torch.cumsum(counts, 0) - counts
    length = torch.where(counts > 1, 2 ** torch.ceil(torch.log2(counts.double())).long(), 1)  # (W,)
    buckets, flat = [], []
    for size in length.unique().tolist():
        sel = (length == size).nonzero().squeeze(1)
        ar = torch.arange(size, device=dev)
        valid = ar < counts[sel, None]  # (W_b, L)
        index = torch.where(valid, order[(starts[sel, None] + ar).clamp(max=n - 1)], n)  # (W_b, L)
        buckets.append((index, valid, bool(valid.all())))
        flat.append(index[valid])
    inverse = torch.empty(n, dtype=torch.long, device=dev)
    if n:
        inverse[torch.cat(flat)] = torch.arange(n, device=dev)
    x._cache[key] = (buckets, inverse)
    return buckets, inverse


class SparseWindowAttention(nn.Module):
    """Multi-head self-attention among the voxels of each window of ``window^3`` nodes of one batch element.

    Windows are ``(coords[:, 1:] + shift) // window`` (Swin: alternate ``shift=0`` and ``window // 2``).
    Weight layout as :class:`shapeflow.nn.attention.Attention`: ``to_qkv`` rows ``[q | k | v]`` of
    ``(h d)``, then ``to_out``. ``qk_norm``: ``True`` = ``"rms"`` (TRELLIS ``MultiHeadRMSNorm``), ``False``
    or ``None`` = none, or a kind for :func:`shapeflow.nn.attention.make_qk_norm`. No positional encoding.
    """

    def __init__(self, dim: int, heads: int, window: int = 8, shift: int = 0, qk_norm: bool | str | None = True,
                 *, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if int(window) != window or window < 1 or int(shift) != shift or shift < 0:
            raise ValueError(f"window must be a positive integer and shift a non-negative one, got {window}, {shift}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window, self.shift = int(window), int(shift)
        kind = "rms" if qk_norm is True else (None if qk_norm is False else qk_norm)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = make_qk_norm(kind, heads, self.head_dim)
        self.k_norm = make_qk_norm(kind, heads, self.head_dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.dim:
            raise ValueError(f"SparseWindowAttention expects {self.dim} channels, got {x.num_channels}")
        h, d = self.heads, self.head_dim
        buckets, inverse = window_partition(x, self.window, self.shift)
        qkv = self.to_qkv(x.feats)  # (N, 3 h d)
        qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])  # (N + 1, 3 h d); row N pads windows
        outs = []
        for index, valid, full in buckets:
            w, length = index.shape
            q, k, v = qkv[index].view(w, length, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (W, h, L, d)
            q, k = self.q_norm(q), self.k_norm(k)
            mask = None
            if not full:
                mask = torch.zeros(w, 1, 1, length, dtype=q.dtype, device=q.device)
                mask.masked_fill_(~valid[:, None, None, :], float("-inf"))  # (W, 1, 1, L) key padding
            out = sdpa(q, k, v, attn_mask=mask)  # (W, h, L, d)
            outs.append(out.transpose(1, 2).reshape(w * length, h * d)[valid.view(-1)])  # (n_b, h d)
        out = torch.cat(outs).index_select(0, inverse) if outs else qkv[:0, : h * d]  # (N, h d), voxel order
        return x.replace(self.to_out(out))
