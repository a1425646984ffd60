"""``SparseTensor``: the active nodes of a regular 3D grid, their features, and cached neighbour maps.

Conventions (the package docstring, :mod:`shapeflow.sparse`, states them in full):

* ``coords`` is ``(N, 4) int32 [b, i, j, k]``, unique and sorted lexicographically, so every batch element
  is one contiguous slice of rows and the **linear key** ``((b * S + i) * S + j) * S + k`` (int64,
  :func:`linear_keys`) is strictly increasing. Lookups are binary searches on these keys
  (``torch.searchsorted``): memory grows with ``N``, never with ``S^3``.
* Kernel offsets are listed in the order of a flattened ``nn.Conv3d`` weight,
  ``weight.view(out, in, -1)``: offset ``o = a * k^2 + b * k + c`` is the displacement
  ``((a - k // 2) * dilation, (b - k // 2) * dilation, (c - k // 2) * dilation)`` along ``(i, j, k)``
  (the last axis fastest; :func:`kernel_offsets`). The middle offset ``k^3 // 2`` is the voxel itself, and
  offset ``k^3 - 1 - o`` is the mirror image (``-d``) of offset ``o``.
* Everything derived from the coordinates alone (keys, neighbour maps, batch slices, fold and window
  partitions) is computed once and kept in a private cache object that every tensor made by
  :meth:`SparseTensor.replace` (and the ops and modules built on it) shares with its source.

Legend: N active nodes, C channels, S nodes per axis (``shape``), B batch size, K kernel offsets.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = ["SparseTensor", "kernel_offsets", "linear_keys"]


def linear_keys(coords: torch.Tensor, shape: int) -> torch.Tensor:
    """``(N, 4) [b, i, j, k]`` (any integer dtype) -> ``(N,) int64`` keys ``((b * S + i) * S + j) * S + k``.

    Keys order exactly like the lexicographic order of ``coords`` when ``0 <= i, j, k < shape``.
    """
    c = coords.long()
    return ((c[:, 0] * shape + c[:, 1]) * shape + c[:, 2]) * shape + c[:, 3]


def decode_keys(keys: torch.Tensor, shape: int) -> torch.Tensor:
    """Inverse of :func:`linear_keys`: ``(N,) int64 -> (N, 4) int32 [b, i, j, k]``."""
    k = keys % shape
    rest = keys // shape
    j = rest % shape
    rest = rest // shape
    i = rest % shape
    b = rest // shape
    return torch.stack([b, i, j, k], dim=1).int()  # (N, 4)


def kernel_offsets(kernel_size: int, dilation: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """``(k^3, 3) int64`` displacements ``(di, dj, dk)`` in ``nn.Conv3d`` weight order (last axis fastest)."""
    r = kernel_size // 2
    ar = (torch.arange(kernel_size, device=device) - r) * dilation
    return torch.cartesian_prod(ar, ar, ar)  # (K, 3), C order over (a, b, c)


def _check_kernel(kernel_size: int, dilation: int) -> None:
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer (submanifold: centred), got {kernel_size!r}")
    if int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")


def _build_neighbors(coords: torch.Tensor, keys: torch.Tensor, shape: int, kernel_size: int,
                     dilation: int) -> torch.Tensor:
    """The neighbour map of :meth:`SparseTensor.neighbors` (uncached; see there).

    One binary search of the ``N`` shifted keys per offset, for the first half of the offsets only: the
    map is symmetric (``nbr[p, o] == q`` exactly when ``nbr[q, K - 1 - o] == p``), so each search also fills
    the mirrored column by a scatter, and the middle column is the identity.
    """
    n = coords.shape[0]
    offsets = kernel_offsets(kernel_size, dilation, device=coords.device)  # (K, 3)
    num = offsets.shape[0]
    nbr = torch.full((num, n), -1, dtype=torch.long, device=coords.device)  # (K, N), transposed at the end
    nbr[num // 2] = torch.arange(n, device=coords.device)
    if n == 0:
        return nbr.t().contiguous()
    ijk = coords[:, 1:].long()  # (N, 3)
    for o in range(num // 2):
        d = offsets[o]  # (3,)
        q = ijk + d  # (N, 3)
        inside = ((q >= 0) & (q < shape)).all(dim=1)  # (N,) a key outside the grid could alias a real one
        qkey = keys + (d[0] * shape + d[1]) * shape + d[2]  # (N,)
        pos = torch.searchsorted(keys, qkey).clamp_(max=n - 1)  # (N,)
        p = (inside & (keys[pos] == qkey)).nonzero().squeeze(1)  # (n_o,) rows that have this neighbour
        q_idx = pos[p]
        nbr[o, p] = q_idx
        nbr[num - 1 - o, q_idx] = p  # mirror: q's neighbour at -d is p
    return nbr.t().contiguous()  # (N, K)


class SparseTensor:
    """Features on a sorted, unique subset of the nodes of ``batch_size`` regular ``shape^3`` grids.

    Parameters
    ----------
    coords : (N, 4) int32 tensor
        ``[b, i, j, k]`` with ``0 <= b < batch_size`` and ``0 <= i, j, k < shape``; unique and sorted
        lexicographically (use :meth:`from_unsorted` otherwise).
    feats : (N, C) floating tensor on the same device.
    shape : int
        Samples per axis of the full grid (``R + 1`` for shapeflow's node grid of ``R`` cells).
    batch_size : int, optional
        Defaults to ``coords[-1, 0] + 1`` (1 when ``N == 0``); pass it when trailing batch elements are empty.

    Raises
    ------
    ValueError
        On a wrong dtype or rank, different row counts, coordinates out of range, or coordinates that are
        not sorted and unique. The checks synchronise with the device once (construct inside models via
        :meth:`replace` and the ops, which skip them).
    """

    coords: torch.Tensor
    feats: torch.Tensor
    shape: int
    batch_size: int

    def __init__(self, coords: torch.Tensor, feats: torch.Tensor, shape: int, batch_size: int | None = None):
        shape = _check_shape(shape)
        _check_coords(coords)
        _check_feats(feats, coords.shape[0])
        if coords.device != feats.device:
            raise ValueError(f"coords are on {coords.device} but feats on {feats.device}")
        n = coords.shape[0]
        if batch_size is None:
            batch_size = int(coords[-1, 0]) + 1 if n else 1
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if n:
            lo, hi = int(coords.min()), int(coords[:, 1:].max())
            if lo < 0 or hi >= shape or int(coords[:, 0].max()) >= batch_size:
                raise ValueError(f"coords out of range: need 0 <= b < {batch_size} and 0 <= i, j, k < {shape}, "
                                 f"got values in [{lo}, {max(hi, int(coords[:, 0].max()))}]")
        keys = linear_keys(coords, shape)
        if n > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("coords must be unique and sorted by (b, i, j, k); use SparseTensor.from_unsorted")
        self.coords, self.feats, self.shape, self.batch_size = coords, feats, shape, int(batch_size)
        self._cache: dict[Any, Any] = {"keys": keys}

    @classmethod
    def _trusted(cls, coords: torch.Tensor, feats: torch.Tensor, shape: int, batch_size: int,
                 cache: dict | None = None) -> SparseTensor:
        """Construct without checks, from coordinates the engine made (sorted, unique, in range)."""
        out = cls.__new__(cls)
        out.coords, out.feats, out.shape, out.batch_size = coords, feats, shape, batch_size
        out._cache = {} if cache is None else cache
        return out

    # ------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def from_unsorted(cls, coords: torch.Tensor, feats: torch.Tensor, shape: int, batch_size: int | None = None,
                      reduce: str = "mean") -> SparseTensor:
        """Sort ``coords`` (any integer dtype) and merge duplicates, reducing their feats with ``reduce``.

        ``reduce`` is one of ``"mean"``, ``"sum"``, ``"amax"``, ``"amin"`` (``Tensor.scatter_reduce``).
        """
        shape = _check_shape(shape)
        if not isinstance(coords, torch.Tensor) or coords.dim() != 2 or coords.shape[1] != 4 \
                or coords.is_floating_point() or coords.is_complex():
            raise ValueError(f"coords must be an (N, 4) integer tensor, got {_describe(coords)}")
        _check_feats(feats, coords.shape[0])
        if reduce not in ("mean", "sum", "amax", "amin"):
            raise ValueError(f"reduce must be 'mean', 'sum', 'amax' or 'amin', got {reduce!r}")
        if coords.shape[0] and (int(coords.min()) < 0 or int(coords[:, 1:].max()) >= shape):
            raise ValueError(f"coords out of range: need b >= 0 and 0 <= i, j, k < {shape}")
        keys, inverse = torch.unique(linear_keys(coords, shape), sorted=True, return_inverse=True)  # (M,), (N,)
        index = inverse[:, None].expand(-1, feats.shape[1])  # (N, C)
        merged = feats.new_zeros(keys.shape[0], feats.shape[1]).scatter_reduce(
            0, index, feats, reduce=reduce, include_self=False)  # (M, C)
        return cls(decode_keys(keys, shape), merged, shape, batch_size)

    @classmethod
    def from_dense(cls, x: torch.Tensor, mask: torch.Tensor) -> SparseTensor:
        """The nodes of a dense ``(B, C, S, S, S)`` grid where ``mask (B, S, S, S) bool`` is set."""
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or not (x.shape[2] == x.shape[3] == x.shape[4]):
            raise ValueError(f"from_dense expects x of shape (B, C, S, S, S), got {_describe(x)}")
        b, _, s = x.shape[0], x.shape[1], x.shape[2]
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, s, s, s):
            raise ValueError(f"from_dense expects a bool mask of shape {(b, s, s, s)}, got {_describe(mask)}")
        coords = mask.nonzero().int()  # (N, 4), C order = sorted
        feats = x.permute(0, 2, 3, 4, 1)[mask]  # (N, C)
        return cls._trusted(coords, feats, s, b)

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same coordinates (and the same cache), new ``feats (N, C')``."""
        _check_feats(feats, self.num_voxels)
        return SparseTensor._trusted(self.coords, feats, self.shape, self.batch_size, self._cache)

    def detach(self) -> SparseTensor:
        return self.replace(self.feats.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SparseTensor:
        """Move to ``device`` and/or cast ``feats`` to ``dtype``; the cache is kept only on the same device."""
        device = self.coords.device if device is None else torch.device(device)
        feats = self.feats.to(device=device, dtype=dtype)
        if device == self.coords.device:
            return self.replace(feats)
        return SparseTensor._trusted(self.coords.to(device), feats, self.shape, self.batch_size)

    # ------------------------------------------------------------------------------------------------
    # Queries
    # ------------------------------------------------------------------------------------------------

    @property
    def num_voxels(self) -> int:
        return self.coords.shape[0]

    @property
    def num_channels(self) -> int:
        return self.feats.shape[1]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    def keys(self) -> torch.Tensor:
        """``(N,) int64`` linear keys of the coordinates (strictly increasing; cached)."""
        keys = self._cache.get("keys")
        if keys is None:
            keys = self._cache["keys"] = linear_keys(self.coords, self.shape)
        return keys

    def batch_slices(self) -> list[tuple[int, int]]:
        """``[(start, end)]`` rows of each batch element (cached; one device synchronisation the first time)."""
        slices = self._cache.get("batch_slices")
        if slices is None:
            bounds = torch.arange(self.batch_size + 1, device=self.coords.device, dtype=torch.int32)
            ends = torch.searchsorted(self.coords[:, 0].contiguous(), bounds).tolist()
            slices = self._cache["batch_slices"] = list(zip(ends[:-1], ends[1:]))
        return slices

    def neighbors(self, kernel_size: int = 3, dilation: int = 1) -> torch.Tensor:
        """``(N, kernel_size^3) int64``: row of the neighbour at each kernel offset, ``-1`` where absent.

        Column ``o`` is the neighbour at displacement ``kernel_offsets(kernel_size, dilation)[o]``, the order
        of ``nn.Conv3d``'s ``weight.view(out, in, -1)`` (``o = a * k^2 + b * k + c`` for offset
        ``((a - k//2) d, (b - k//2) d, (c - k//2) d)`` along ``(i, j, k)``). Neighbours are looked up in the
        same batch element only. Built once per ``(kernel_size, dilation)`` by binary search on the sorted
        linear keys, then cached and shared with every tensor of the same coordinates.
        """
        _check_kernel(kernel_size, dilation)
        key = ("neighbors", int(kernel_size), int(dilation))
        nbr = self._cache.get(key)
        if nbr is None:
            nbr = self._cache[key] = _build_neighbors(self.coords, self.keys(), self.shape, int(kernel_size),
                                                      int(dilation))
        return nbr

    def dense(self) -> torch.Tensor:
        """``(B, C, S, S, S)`` zero-filled dense grid (differentiable; for tests and small grids)."""
        b, s, c = self.batch_size, self.shape, self.num_channels
        flat = self.feats.new_zeros(b * s**3, c).index_copy(0, self.keys(), self.feats)  # (B S^3, C)
        return flat.view(b, s, s, s, c).permute(0, 4, 1, 2, 3).contiguous()  # (B, C, S, S, S)

    def __repr__(self) -> str:
        return (f"SparseTensor(num_voxels={self.num_voxels}, channels={self.num_channels}, shape={self.shape}, "
                f"batch_size={self.batch_size}, dtype={self.dtype}, device={self.device})")


# ------------------------------------------------------------------------------------------------
# Input checks (one-line ValueErrors)
# ------------------------------------------------------------------------------------------------


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_shape(shape: int) -> int:
    try:
        s = operator.index(shape)
    except TypeError:
        s = 0
    if isinstance(shape, bool) or s < 1:
        raise ValueError(f"shape (nodes per axis) must be a positive integer, got {shape!r}")
    return s


def _check_coords(coords: torch.Tensor) -> None:
    if not isinstance(coords, torch.Tensor) or coords.dtype != torch.int32 or coords.dim() != 2 \
            or coords.shape[1] != 4:
        raise ValueError(f"coords must be an (N, 4) int32 tensor [b, i, j, k], got {_describe(coords)}")


def _check_feats(feats: torch.Tensor, n: int) -> None:
    if not isinstance(feats, torch.Tensor) or not feats.is_floating_point() or feats.dim() != 2:
        raise ValueError(f"feats must be an (N, C) floating-point tensor, got {_describe(feats)}")
    if feats.shape[0] != n:
        raise ValueError(f"feats has {feats.shape[0]} rows but there are {n} coords")
