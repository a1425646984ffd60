"""Generation: a trained DiT + its VAE -> latents (ODE sampling) -> meshes and pictures.

One function, :func:`generate`, used by ``shapeflow generate``, the demo and the benchmarks:

1. draw initial noise per sample from ``seed + i`` (the same seed gives the same shape whatever the
   batch size or position);
2. integrate the DiT's velocity from t = 0 (noise) to t = 1 (data) with :func:`shapeflow.sampling.sample`
   (Euler / Heun / midpoint, time shift, classifier-free guidance);
3. map the samples back to VAE latents: the DiT's stored normaliser (:meth:`denormalize_latents`), then the
   VAE's latent scale (:meth:`unscale_latents`, Hunyuan3D's scale factor; 1 for shapeflow's own VAEs);
4. decode to a field on the node grid and run marching cubes: hierarchical decoding for VecSet VAEs
   (:mod:`shapeflow.decode`), the decoder's grid for voxel-grid VAEs. A sample whose field has no surface
   gets no mesh; :attr:`Generated.empty` says which and why, and the command reports it.

The shipped ``tiny`` checkpoints (``shapeflow/assets/tiny/``) are the defaults of ``shapeflow generate``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shapeflow.decode import decode_to_mesh
from shapeflow.geometry.marching_cubes import EmptySurfaceError
from shapeflow.render import image_grid, render_mesh
from shapeflow.sampling import initial_noise, sample

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
DEFAULT_DIT = ASSETS / "token_dit"
DEFAULT_VAE = ASSETS / "vecset_vae"
SHIPPED_VAES = {"vecset": DEFAULT_VAE, "sparse": ASSETS / "sparse_vae"}  # the tiny VAEs in the package


@dataclass
class Generated:
    """The output of :func:`generate`: one mesh (or ``None`` when nothing was decoded) per sample."""

    meshes: list[tuple[np.ndarray, np.ndarray] | None]
    latents: torch.Tensor  # (n, ...) VAE-space latents
    labels: list[str]
    seconds: dict = field(default_factory=dict)
    nfe: int = 0
    empty: dict[int, str] = field(default_factory=dict)  # sample index -> why it has no mesh


def latent_shape(dit, kind: str, num_tokens: int | None = None) -> tuple[int, ...]:
    """Shape of one latent sample: ``(m, c)`` for token DiTs (``num_tokens``, else the DiT's trained
    ``config.num_tokens``), ``(c, r, r, r)`` for grid DiTs."""
    c = dit.config.in_channels
    if kind == "token_dit":
        m = dit.config.num_tokens if num_tokens is None else int(num_tokens)
        if m < 1:
            raise ValueError(f"num_tokens must be >= 1, got {m}")
        return (m, c)
    r = dit.config.resolution
    return (c, r, r, r)


@torch.no_grad()
def generate(
    dit,
    vae,
    *,
    dit_kind: str,
    vae_kind: str,
    num: int = 4,
    cond=None,
    labels: Sequence[str] | None = None,
    steps: int = 25,
    method: str = "euler",
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] | None = None,
    seed: int = 0,
    resolution: int = 128,
    smooth: float = 0.0,
    num_tokens: int | None = None,
    decode: bool = True,
    device: str = "cpu",
    progress: bool = False,
) -> Generated:
    """Sample ``num`` shapes.

    Parameters
    ----------
    cond : ``None`` (unconditional), class labels ``(num,)`` int64, or condition tokens ``(num, l, d)``.
    cfg_scale : guidance scale (1 = conditional only; needs a conditional DiT otherwise).
    resolution : marching-cubes grid for VecSet VAEs (cells per axis); grid VAEs use their own grid.
    smooth : Gaussian filter of the decoded fields, standard deviation in world units (0: none; see
        :func:`decode_latents`).
    """
    if (vae_kind == "vecset_vae") != (dit_kind == "token_dit"):
        raise ValueError(f"a {dit_kind} cannot be decoded by a {vae_kind}: token DiTs go with VecSet VAEs, "
                         "grid DiTs with grid VAEs")
    dit.to(device).eval()
    vae.to(device).eval()
    shape = latent_shape(dit, dit_kind, num_tokens)
    seeds = [seed + i for i in range(num)]
    noise = initial_noise((num, *shape), seed=seeds, device=device)
    null = None
    if cond is not None:
        cond = cond.to(device)
        if cfg_scale != 1.0:
            null = dit.null_condition(num, num_tokens=cond.shape[1] if cond.ndim == 3 else None, device=device)
    t0 = time.perf_counter()
    x, stats = sample(dit, noise, steps=steps, method=method, shift=shift, cond=cond, null_cond=null,
                      cfg_scale=cfg_scale, cfg_interval=cfg_interval, progress=progress, return_stats=True)
    z = vae.unscale_latents(dit.denormalize_latents(x))
    seconds = {"sample": time.perf_counter() - t0}
    out = Generated(meshes=[], latents=z.cpu(), labels=list(labels or [""] * num), seconds=seconds, nfe=stats.nfe)
    if not decode:
        return out
    t0 = time.perf_counter()
    out.meshes, out.empty = decode_latents(vae, vae_kind, z, resolution=resolution, smooth=smooth)
    seconds["decode"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def decode_latents(vae, vae_kind: str, z: torch.Tensor, *, resolution: int = 128, strategy: str = "hierarchical",
                   smooth: float = 0.0) -> tuple[list[tuple[np.ndarray, np.ndarray] | None], dict[int, str]]:
    """VAE latents ``(n, ...)`` -> one mesh per sample, and ``{index: reason}`` for those without a surface.

    Each sample is decoded by :func:`shapeflow.decode.decode_to_mesh` (the same call ``reconstruct`` and
    ``eval-vae`` use; shell-occupancy grid VAEs give the filled solid's surface). Only "no surface" is
    counted per sample (:class:`~shapeflow.geometry.marching_cubes.EmptySurfaceError`); any other error
    stops the call.

    ``smooth``: Gaussian filter of the decoded field before marching cubes, standard deviation in world units
    (:func:`shapeflow.geometry.marching_cubes.marching_cubes`).
    """
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0 (a length in world units), got {smooth}")
    meshes: list[tuple[np.ndarray, np.ndarray] | None] = []
    empty: dict[int, str] = {}
    for i in range(z.shape[0]):
        try:
            meshes.append(decode_to_mesh(vae, vae_kind, z[i:i + 1], resolution=resolution, strategy=strategy,
                                         smooth=smooth))
        except EmptySurfaceError as e:
            meshes.append(None)
            empty[i] = str(e)
    return meshes, empty


def preview_grid(meshes: Sequence[tuple[np.ndarray, np.ndarray] | None], labels: Sequence[str] | None = None,
                 *, size: int = 160, ncols: int | None = None) -> np.ndarray:
    """One rendered view per mesh (a blank tile for ``None``), tiled with labels: (H, W, 3) uint8."""
    tiles = []
    for m in meshes:
        if m is None:
            tiles.append(np.full((size, size, 4), 255, np.uint8))
        else:
            tiles.append(render_mesh(m[0], m[1], size=size, background=(255, 255, 255)))
    return image_grid(tiles, ncols=ncols, labels=labels)
