"""Space <-> channel rearrangements on 3D grids: pixel (un)shuffle and DiT patchify.

All four functions are pure reshapes/permutes (no arithmetic), so they are exact and differentiable,
and each has an exact inverse here.

Design choices
--------------
* **One channel order for everything.** A ``s x s x s`` block of channel ``c`` at offset
  ``(sx, sy, sz)`` lives in channel ``c * s^3 + sx * s^2 + sy * s + sz`` (channel outer, then the
  offsets along dims 2, 3, 4 in C order). This is TRELLIS's ``pixel_shuffle_3d`` mapping
  (``trellis/modules/spatial.py``), which the released sparse-structure decoder weights depend on,
  and it is also what TRELLIS's ``patchify`` produces, so ``patchify_3d == pixel_unshuffle_3d``.
* **Token order** for the grid DiT: tokens run in C order over the patch grid (dim 2 slowest),
  features are the ``C * p^3`` channels above: ``(b, c * p^3, d', h', w') -> (b, d' h' w', c * p^3)``.
  The DiT's absolute position embedding must enumerate ``meshgrid(indexing="ij")`` in the same order.
* Sizes that do not divide raise ``ValueError`` naming the offending size (TRELLIS asserts).

Legend: b batch, c channels, s / p scale / patch size, (d, h, w) the three spatial dims (i, j, k).
"""

from __future__ import annotations

import torch

__all__ = ["pixel_shuffle_3d", "pixel_unshuffle_3d", "patchify_3d", "unpatchify_3d"]


def _check_5d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name} expects a (b, c, d, h, w) tensor, got shape {tuple(x.shape)}")


def _check_factor(s: int, name: str) -> None:
    if int(s) != s or s < 1:
        raise ValueError(f"{name} must be a positive integer, got {s!r}")


def pixel_shuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Move channel blocks into space: ``(b, c * s^3, d, h, w) -> (b, c, s*d, s*h, s*w)``.

    Input channel ``c * s^3 + sx * s^2 + sy * s + sz`` at voxel ``(i, j, k)`` goes to output voxel
    ``(s*i + sx, s*j + sy, s*k + sz)`` of channel ``c`` (TRELLIS ``pixel_shuffle_3d``). A
    ``channels_last_3d`` input gives a ``channels_last_3d`` output (same values).

    Raises
    ------
    ValueError
        If ``x`` is not 5-D or its channel count is not divisible by ``scale ** 3``.
    """
    _check_5d(x, "pixel_shuffle_3d")
    _check_factor(scale, "pixel_shuffle_3d scale")
    b, c, d, h, w = x.shape
    s = int(scale)
    if c % s**3:
        raise ValueError(f"pixel_shuffle_3d: channel count {c} is not divisible by scale^3 = {s**3}")
    cl = c > 1 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    x = x.reshape(b, c // s**3, s, s, s, d, h, w)  # (b, c', sx, sy, sz, d, h, w); a view in both layouts
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (b, c', d, sx, h, sy, w, sz)
    if cl:  # keep channels_last_3d (one copy, straight into that layout)
        y = x.permute(0, 2, 3, 4, 5, 6, 7, 1).contiguous()  # (b, d, sx, h, sy, w, sz, c')
        return y.view(b, d * s, h * s, w * s, c // s**3).permute(0, 4, 1, 2, 3)  # (b, c', sd, sh, sw)
    return x.reshape(b, c // s**3, d * s, h * s, w * s)


def pixel_unshuffle_3d(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Inverse of :func:`pixel_shuffle_3d`: ``(b, c, s*d, s*h, s*w) -> (b, c * s^3, d, h, w)``.

    Raises
    ------
    ValueError
        If ``x`` is not 5-D or a spatial size is not divisible by ``scale``.
    """
    _check_5d(x, "pixel_unshuffle_3d")
    _check_factor(scale, "pixel_unshuffle_3d scale")
    b, c, D, H, W = x.shape
    s = int(scale)
    for dim, n in zip("dhw", (D, H, W)):
        if n % s:
            raise ValueError(f"pixel_unshuffle_3d: spatial size {dim}={n} is not divisible by scale {s}")
    x = x.reshape(b, c, D // s, s, H // s, s, W // s, s)  # (b, c, d, sx, h, sy, w, sz)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (b, c, sx, sy, sz, d, h, w)
    return x.reshape(b, c * s**3, D // s, H // s, W // s)


def patchify_3d(x: torch.Tensor, patch_size: int, *, tokens: bool = False) -> torch.Tensor:
    """Cut a latent grid into non-overlapping ``p^3`` patches (TRELLIS ``patchify``, 3D).

    Parameters
    ----------
    x : (b, c, d, h, w) tensor
        Each spatial size must be divisible by ``patch_size``.
    patch_size : int
        ``p``; 1 is allowed (then this is a reshape only).
    tokens : bool
        ``False``: return the grid form ``(b, c * p^3, d/p, h/p, w/p)``.
        ``True``: return the token form ``(b, n, c * p^3)`` with ``n = (d/p)(h/p)(w/p)`` tokens in C order
        over the patch grid.

    Notes
    -----
    Patch feature ``c * p^3 + px * p^2 + py * p + pz`` is channel ``c`` at offset ``(px, py, pz)`` in the
    patch; identical to :func:`pixel_unshuffle_3d`.
    """
    g = pixel_unshuffle_3d(x, patch_size)  # (b, c p^3, d', h', w')
    if not tokens:
        return g
    return g.flatten(2).transpose(1, 2)  # (b, n, c p^3)


def unpatchify_3d(
    x: torch.Tensor, patch_size: int, grid: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`patchify_3d`, from either form.

    Parameters
    ----------
    x : (b, c * p^3, d', h', w') grid form, or (b, n, c * p^3) token form
    patch_size : int
        ``p``.
    grid : (d, h, w), required for the token form
        The full spatial size of the **output** grid (e.g. ``(16, 16, 16)`` for TRELLIS's latent);
        each must be divisible by ``p`` and ``n`` must equal ``(d/p)(h/p)(w/p)``. Ignored-if-consistent
        for the grid form (a mismatch raises).

    Returns
    -------
    (b, c, d, h, w) tensor
    """
    _check_factor(patch_size, "unpatchify_3d patch_size")
    p = int(patch_size)
    if x.dim() == 3:
        if grid is None:
            raise ValueError("unpatchify_3d: the token form (b, n, c*p^3) needs grid=(d, h, w)")
        grid = tuple(int(n) for n in grid)
        if len(grid) != 3:
            raise ValueError(f"unpatchify_3d: grid must have three sizes, got {grid}")
        for dim, n in zip("dhw", grid):
            if n % p:
                raise ValueError(f"unpatchify_3d: grid size {dim}={n} is not divisible by patch size {p}")
        pd, ph, pw = (n // p for n in grid)
        b, n, f = x.shape
        if n != pd * ph * pw:
            raise ValueError(
                f"unpatchify_3d: {n} tokens do not fill a {pd}x{ph}x{pw} patch grid (grid {grid}, patch {p})"
            )
        x = x.transpose(1, 2).reshape(b, f, pd, ph, pw)  # (b, c p^3, d', h', w')
    elif x.dim() != 5:
        raise ValueError(
            f"unpatchify_3d expects (b, c*p^3, d', h', w') or (b, n, c*p^3), got shape {tuple(x.shape)}"
        )
    out = pixel_shuffle_3d(x, p)
    if grid is not None and tuple(out.shape[2:]) != tuple(grid):
        raise ValueError(f"unpatchify_3d: output grid {tuple(out.shape[2:])} differs from grid={tuple(grid)}")
    return out
