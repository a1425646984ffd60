"""Level changes and channel ops on :class:`~shapeflow.sparse.tensor.SparseTensor` (all autograd-friendly).

* :func:`fold` (space-to-channel, TRELLIS.2 ``SparseSpatial2Channel``) and :func:`unfold` (channel-to-space,
  ``SparseChannel2Spatial``) move between a level and the next coarser one, where node ``(i, j, k)`` has
  the parent ``(i >> 1, j >> 1, k >> 1)`` on a grid of ``(shape + 1) // 2`` nodes per axis.
* The 8 children of parent ``c`` are ``2 c + o``, ``o in {0, 1}^3``, in **slots**
  ``s = o_i * 4 + o_j * 2 + o_k`` (:data:`CHILD_OFFSETS`); a folded tensor has ``8 C`` channels with slot
  ``s`` in columns ``[s C, (s + 1) C)`` (slot-major), i.e. ``fold(x).feats.view(M, 8, C)[:, s, c]`` is
  channel ``c * 8 + s`` of :func:`shapeflow.nn.spatial.pixel_unshuffle_3d` of the dense grid (channel-major
  there). TRELLIS.2 numbers its slots ``o_i + 2 o_j + 4 o_k``: permute the 8 column blocks when porting.
* :func:`child_mask` gives the (M, 8) existence targets of a subdivision head and :func:`unfold_to` the
  teacher-forced upsampling onto known fine coordinates.

Legend: N fine nodes, M coarse (parent) nodes, C channels, S nodes per axis.
"""

from __future__ import annotations

import torch

from shapeflow.sparse.tensor import SparseTensor, _check_coords, _describe, decode_keys, linear_keys

__all__ = ["CHILD_OFFSETS", "cat", "child_mask", "fold", "parent_rows", "unfold", "unfold_to"]

#: (8, 3) offsets ``o = (o_i, o_j, o_k)`` of the children of a node, in slot order ``o_i * 4 + o_j * 2 + o_k``.
CHILD_OFFSETS = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.long)


def coarse_shape(shape: int) -> int:
    """Nodes per axis one level coarser: ``(shape + 1) // 2`` (so node ``shape - 1`` keeps its parent)."""
    return (shape + 1) // 2


def _slots(coords: torch.Tensor) -> torch.Tensor:
    """(N,) int64 child slot ``(i & 1) * 4 + (j & 1) * 2 + (k & 1)`` of each node."""
    c = coords.long()
    return (c[:, 1] & 1) * 4 + (c[:, 2] & 1) * 2 + (c[:, 3] & 1)


def _parents(coords: torch.Tensor) -> torch.Tensor:
    """(N, 4) int64 ``[b, i >> 1, j >> 1, k >> 1]``."""
    c = coords.long()
    return torch.cat([c[:, :1], c[:, 1:] >> 1], dim=1)


def fold(x: SparseTensor) -> SparseTensor:
    """Space-to-channel: ``(N, C)`` on ``S^3`` -> ``(M, 8 C)`` on the parents, ``((S + 1) // 2)^3``.

    The parents are the unique parents of ``x``'s nodes (sorted); a child's features land in its slot's
    columns, absent children are zeros. The parent coordinates and the scatter index are cached with
    ``x``'s coordinates, and every fold of a tensor with those coordinates returns the same parent cache,
    so the coarse level's neighbour maps are built once too.
    """
    cached = x._cache.get("fold")
    if cached is None:
        s2 = coarse_shape(x.shape)
        keys, inverse = torch.unique(linear_keys(_parents(x.coords), s2), sorted=True, return_inverse=True)
        dest = inverse * 8 + _slots(x.coords)  # (N,) row of each child in the (M * 8, C) view; unique
        cached = x._cache["fold"] = (decode_keys(keys, s2), dest, {"keys": keys})
    coords, dest, cache = cached
    m, c = coords.shape[0], x.num_channels
    feats = x.feats.new_zeros(m * 8, c).index_copy(0, dest, x.feats).view(m, 8 * c)  # (M, 8 C)
    return SparseTensor._trusted(coords, feats, coarse_shape(x.shape), x.batch_size, cache)


def unfold(x: SparseTensor, keep: torch.Tensor | None = None, shape: int | None = None) -> SparseTensor:
    """Channel-to-space: ``(M, 8 C)`` on the parents -> the kept children ``2 c + o``, ``(N, C)``, sorted.

    Parameters
    ----------
    x : SparseTensor with ``8 C`` channels (slot ``s`` in columns ``[s C, (s + 1) C)``).
    keep : (M, 8) bool tensor, optional
        Which children to create (e.g. ``logits > 0`` of a subdivision head); all when ``None``.
    shape : int, optional
        Nodes per axis of the fine grid, ``2 * x.shape`` (default) or ``2 * x.shape - 1``; children
        outside ``[0, shape)`` are dropped.
    """
    m, c8 = x.feats.shape
    if c8 % 8:
        raise ValueError(f"unfold needs a channel count divisible by 8 (8 child slots), got {c8}")
    shape = _fine_shape(x.shape, shape)
    children = (x.coords[:, 1:].long() * 2)[:, None, :] + CHILD_OFFSETS.to(x.coords.device)  # (M, 8, 3)
    take = (children < shape).all(dim=2)  # (M, 8)
    if keep is not None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (m, 8):
            raise ValueError(f"keep must be an ({m}, 8) bool tensor, got {_describe(keep)}")
        take = take & keep.to(take.device)
    rows = take.view(-1).nonzero().squeeze(1)  # (N,) rows of the (M * 8, C) view
    keys = linear_keys(torch.cat([x.coords[rows // 8, :1].long(), children.reshape(-1, 3)[rows]], dim=1), shape)
    keys, order = torch.sort(keys)  # (N,) sorted by (b, i, j, k)
    feats = x.feats.reshape(m * 8, c8 // 8).index_select(0, rows[order])  # (N, C)
    return SparseTensor._trusted(decode_keys(keys, shape), feats, shape, x.batch_size, {"keys": keys})


def child_mask(parent: SparseTensor, child_coords: torch.Tensor | SparseTensor) -> torch.Tensor:
    """``(M, 8) bool``: which children of each node of ``parent`` are in ``child_coords``.

    ``child_coords`` is an ``(N, 4)`` integer tensor (or a SparseTensor, whose coords are used) of the
    fine level; fine nodes whose parent is not in ``parent`` are ignored. This is the target of a
    subdivision (child-existence) head.
    """
    coords = child_coords.coords if isinstance(child_coords, SparseTensor) else _check_fine_coords(child_coords)
    rows = _child_rows(parent, coords)  # (N,)
    mask = torch.zeros(parent.num_voxels * 8 + 1, dtype=torch.bool, device=parent.coords.device)
    mask[rows] = True
    return mask[:-1].view(-1, 8)


def parent_rows(parent: SparseTensor, child_coords: torch.Tensor | SparseTensor) -> torch.Tensor:
    """``(N,) int64``: the row of each fine node's parent in ``parent``, ``-1`` where it is not there."""
    coords = child_coords.coords if isinstance(child_coords, SparseTensor) else _check_fine_coords(child_coords)
    rows = _child_rows(parent, coords)  # (N,) p * 8 + slot, or M * 8
    return torch.where(rows < parent.num_voxels * 8, rows // 8, -1)


def unfold_to(x: SparseTensor, target_coords: torch.Tensor | SparseTensor, shape: int | None = None) -> SparseTensor:
    """Channel-to-space onto exactly ``target_coords`` (teacher forcing while training).

    Parameters
    ----------
    x : SparseTensor with ``8 C`` channels (as for :func:`unfold`).
    target_coords : (N, 4) int32, sorted and unique, or a SparseTensor
        The fine coordinates of the output. Targets whose parent is not in ``x`` get zero features. With a
        SparseTensor the output also shares its cache (neighbour maps) and ``shape``.
    shape : int
        Nodes per axis of the fine grid; required for a coordinate tensor.
    """
    m, c8 = x.feats.shape
    if c8 % 8:
        raise ValueError(f"unfold_to needs a channel count divisible by 8 (8 child slots), got {c8}")
    if isinstance(target_coords, SparseTensor):
        target = target_coords
        if shape is not None and shape != target.shape:
            raise ValueError(f"shape={shape} differs from the target tensor's shape {target.shape}")
    else:
        if shape is None:
            raise ValueError("unfold_to with a coordinate tensor needs shape (nodes per axis of the fine grid)")
        _check_coords(target_coords)
        target = SparseTensor(target_coords, x.feats.new_zeros(target_coords.shape[0], 0), shape, x.batch_size)
    _fine_shape(x.shape, target.shape)
    rows = _child_rows(x, target.coords)  # (N,), m * 8 where the parent is absent
    padded = torch.cat([x.feats.reshape(m * 8, c8 // 8), x.feats.new_zeros(1, c8 // 8)])  # (M * 8 + 1, C)
    return SparseTensor._trusted(target.coords, padded.index_select(0, rows), target.shape, target.batch_size,
                                 target._cache)


def cat(a: SparseTensor, b: SparseTensor, *more: SparseTensor) -> SparseTensor:
    """Concatenate the features of tensors with the same coordinates along channels (shares ``a``'s cache)."""
    for t in (b, *more):
        same = t._cache is a._cache or (t.shape == a.shape and t.coords.shape == a.coords.shape
                                        and torch.equal(t.coords, a.coords))
        if not same:
            raise ValueError("cat needs tensors with the same coords (and shape)")
    return a.replace(torch.cat([a.feats, b.feats, *(t.feats for t in more)], dim=1))


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _child_rows(parent: SparseTensor, coords: torch.Tensor) -> torch.Tensor:
    """(N,) int64 row ``p * 8 + slot`` of each fine node in the ``(M * 8, C)`` view of ``parent``'s feats,
    or ``M * 8`` where its parent is not in ``parent``."""
    m = parent.num_voxels
    pc = _parents(coords)  # (N, 4)
    pkeys = linear_keys(pc, parent.shape)
    keys = parent.keys()
    if m == 0:
        return torch.zeros_like(pkeys)  # M * 8 = 0: no parent anywhere
    pos = torch.searchsorted(keys, pkeys).clamp_(max=m - 1)  # (N,)
    found = (keys[pos] == pkeys) & (pc[:, 1:] < parent.shape).all(dim=1) & (pc[:, 0] < parent.batch_size)
    return torch.where(found, pos * 8 + _slots(coords), m * 8)


def _fine_shape(coarse: int, shape: int | None) -> int:
    if shape is None:
        return 2 * coarse
    if isinstance(shape, bool) or int(shape) != shape or coarse_shape(int(shape)) != coarse:
        raise ValueError(f"fine shape {shape!r} does not coarsen to {coarse} (need {2 * coarse - 1} or {2 * coarse})")
    return int(shape)


def _check_fine_coords(coords: torch.Tensor) -> torch.Tensor:
    if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4 \
            or coords.is_floating_point() or coords.is_complex():
        raise ValueError(f"child coords must be an (N, 4) integer tensor [b, i, j, k], got {_describe(coords)}")
    return coords

