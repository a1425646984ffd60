"""A small sparse-voxel engine in plain PyTorch (CPU and CUDA, no compiled extension).

It is the substrate of sparse SDF / surface VAEs (TRELLIS.2 SC-VAE, Direct3D-S2): sparse tensors,
submanifold convolution, space-to-channel level changes with child-existence masks, per-batch norms and
window attention.

Conventions
-----------
* **Grid.** A sparse grid holds a subset of the nodes of a regular grid with ``shape`` samples per axis.
  For shapeflow's node grid of ``R`` cells, ``shape = R + 1``; world positions come from
  :func:`shapeflow.geometry.grid.index_to_world` (the engine itself never needs them).
* **Coordinates.** ``coords`` is ``(N, 4) int32 [b, i, j, k]``, ``b`` the batch index,
  ``0 <= i, j, k < shape``; unique and sorted lexicographically by ``(b, i, j, k)``, so each batch element
  is a contiguous slice of rows (:meth:`SparseTensor.batch_slices`). ``feats`` is ``(N, C)`` float.
* **Neighbours.** :meth:`SparseTensor.neighbors` gives ``(N, k^3)`` row indices (``-1`` where absent) in
  the order of ``nn.Conv3d``'s ``weight.view(out, in, -1)``: column ``a * k^2 + b * k + c`` is the
  displacement ``((a - k//2) d, (b - k//2) d, (c - k//2) d)`` along ``(i, j, k)`` (the last axis fastest;
  :func:`kernel_offsets`). So :class:`SubMConv3d` with an ``nn.Conv3d`` weight equals ``F.conv3d`` with
  ``padding = k // 2 * d`` on the zero-filled dense grid, read back at the active nodes.
* **Levels.** The parent of node ``(i, j, k)`` one level coarser is ``(i >> 1, j >> 1, k >> 1)``; the
  coarser grid has ``(shape + 1) // 2`` nodes per axis. The children of parent ``c`` are ``2 c + o``,
  ``o in {0, 1}^3``, and the child **slot** of ``o`` is ``o_i * 4 + o_j * 2 + o_k``, the offset order of
  :func:`shapeflow.nn.spatial.pixel_shuffle_3d` (its channel ``c * 8 + slot``). :func:`fold` stores slot
  ``s`` in feature columns ``[s C, (s + 1) C)`` (slot-major).
* **Cache.** Everything that depends on the coordinates only (linear keys, neighbour maps, batch slices,
  fold and window partitions) is computed once and shared by every tensor with those coordinates that
  was derived through :meth:`SparseTensor.replace` (which all modules use), :func:`cat`, :func:`fold` (the
  parents of one coordinate set share one cache) and :func:`unfold_to` onto a SparseTensor target.
* **Activations.** Apply them to the features, ``x.replace(F.silu(x.feats))``, or use :class:`SparseSiLU`
  / :class:`SparseGELU` inside ``nn.Sequential``.

Legend used in the modules: N voxels, M parent voxels, C channels, S nodes per axis, B batch, K = k^3.
"""

from shapeflow.sparse.nn import (
    SparseGELU,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseWindowAttention,
    SubMConv3d,
    window_partition,
)
from shapeflow.sparse.ops import CHILD_OFFSETS, cat, child_mask, coarse_shape, fold, parent_rows, unfold, unfold_to
from shapeflow.sparse.tensor import SparseTensor, kernel_offsets, linear_keys

__all__ = [
    "CHILD_OFFSETS",
    "SparseGELU",
    "SparseGroupNorm",
    "SparseLayerNorm",
    "SparseLinear",
    "SparseSiLU",
    "SparseTensor",
    "SparseWindowAttention",
    "SubMConv3d",
    "cat",
    "child_mask",
    "coarse_shape",
    "fold",
    "kernel_offsets",
    "linear_keys",
    "parent_rows",
    "unfold",
    "unfold_to",
    "window_partition",
]
