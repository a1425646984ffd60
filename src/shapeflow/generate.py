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

**Sparse generation** (a ``sparse_dit`` with a stage-1 ``structure`` model and a ``sparse_vae``; TRELLIS's two
stages with Direct3D-S2 / TRELLIS.2 SDF latents) replaces step 2 by:

* stage 1, from seed ``seed + i``, either a structure grid DiT (:class:`GridStructure`: the cells above 0 of its
  sampled ``(1, r, r, r)`` occupancy) or a VecSet generator (:class:`VecSetStructure`: the latent cells of the
  256^3 band of its decoded shape; the shipped default, measured better); by default only the largest
  26-connected piece is kept (``structure_pieces="largest"``: a detached piece would decode as a floater);
* stage 2: the sparse DiT samples the latent features on those voxels, noise per voxel from seed ``seed + i``;

and decodes each latent with :meth:`SparseSDFVAE.decode_mesh <shapeflow.models.sparse_vae.SparseSDFVAE.decode_mesh>`
at the band resolution of the latent grid (``r`` times the VAE's factor; 256 for the tiny models). A
structure without voxels is a recorded empty sample, like a field without surface.

The shipped ``tiny`` checkpoints (``shapeflow/assets/tiny/``) are the defaults of ``shapeflow generate``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.ndimage
import torch
from PIL import Image

from shapeflow.decode import decode_to_mesh
from shapeflow.geometry.marching_cubes import EmptySurfaceError, filter_components
from shapeflow.geometry.sparse_band import band_nodes
from shapeflow.models import TOKEN_DIT_KINDS, load_dit, load_vae
from shapeflow.models.conditioning import ImageConditioner
from shapeflow.models.pretrained.hunyuan_dit import HUNYUAN_SAMPLER, is_release, release_conditioner, release_settings
from shapeflow.models.sparse_dit import active_voxels, unpack, velocity_fn
from shapeflow.render import image_grid, render_mesh
from shapeflow.sampling import initial_noise, sample
from shapeflow.sparse import SparseTensor

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny"
DEFAULT_DIT = ASSETS / "token_dit"
DEFAULT_VAE = ASSETS / "vecset_vae"
SHIPPED_VAES = {"vecset": DEFAULT_VAE, "sparse": ASSETS / "sparse_vae"}  # the tiny VAEs in the package
#: The shipped generator pipelines: checkpoint paths per role (``shapeflow generate --pipeline NAME``).
PIPELINES = {
    "vecset": {"dit": DEFAULT_DIT, "vae": DEFAULT_VAE},
    # stage 1: the shipped VecSet pair (BENCHMARKS.md: better structures than the tiny structure grid DiT)
    "sparse": {"dit": ASSETS / "sparse_dit", "structure": (DEFAULT_DIT, DEFAULT_VAE), "vae": ASSETS / "sparse_vae"},
}


@dataclass
class Generated:
    """The output of :func:`generate`: one mesh (or ``None`` when nothing was decoded) per sample."""

    meshes: list[tuple[np.ndarray, np.ndarray] | None]
    latents: torch.Tensor | list  # (n, ...) VAE-space latents; sparse: per sample (coords (m, 3), feats (m, c))
    #   or None where stage 1 gave no voxels
    labels: list[str]
    seconds: dict = field(default_factory=dict)
    nfe: int = 0
    empty: dict[int, str] = field(default_factory=dict)  # sample index -> why it has no mesh


def latent_shape(dit, kind: str, num_tokens: int | None = None) -> tuple[int, ...]:
    """Shape of one latent sample: ``(m, c)`` for token DiTs (``num_tokens``, else the DiT's trained
    ``config.num_tokens``), ``(c, r, r, r)`` for grid DiTs."""
    c = dit.config.in_channels
    if kind in TOKEN_DIT_KINDS:
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
    structure=None,
    structure_pieces: str = "largest",
) -> Generated:
    """Sample ``num`` shapes.

    Parameters
    ----------
    cond : ``None`` (unconditional), class labels ``(num,)`` int64, or condition tokens ``(num, l, d)``.
    cfg_scale : guidance scale (1 = conditional only; needs a conditional DiT otherwise).
    resolution : marching-cubes grid for VecSet VAEs (cells per axis); grid VAEs use their own grid.
    smooth : Gaussian filter of the decoded fields, standard deviation in world units (0: none; see
        :func:`decode_latents`).
    structure : the stage-1 model of a ``sparse_dit``: a grid DiT, a ``(token_dit, vecset_vae)`` pair or a
        structure source (module docstring); ``structure_pieces``:
        ``"largest"`` keeps the largest 26-connected piece of each sampled structure, ``"all"`` every voxel.
    """
    if dit_kind == "sparse_dit" or vae_kind == "sparse_vae":
        return _generate_sparse(dit, structure, vae, dit_kind=dit_kind, vae_kind=vae_kind, num=num, cond=cond,
                                labels=labels, steps=steps, method=method, shift=shift, cfg_scale=cfg_scale,
                                cfg_interval=cfg_interval, seed=seed, decode=decode, device=device,
                                progress=progress, pieces=structure_pieces)
    if (vae_kind == "vecset_vae") != (dit_kind in TOKEN_DIT_KINDS):
        raise ValueError(f"a {dit_kind} cannot be decoded by a {vae_kind}: token DiTs go with VecSet VAEs, "
                         "grid DiTs with grid VAEs")
    dit.to(device).eval()
    vae.to(device).eval()
    shape = latent_shape(dit, dit_kind, num_tokens)
    seeds = [seed + i for i in range(num)]
    noise = initial_noise((num, *shape), seed=seeds, device=device)
    velocity = dit
    if getattr(dit.config, "guidance_embed", False):  # guidance-distilled: the scale is an input, one pass
        scale = torch.tensor(float(cfg_scale), device=device)

        def velocity(x, t, c):
            return dit(x, t, c, guidance=scale.expand(x.shape[0]))

        cfg_scale = 1.0
    null = None
    if cond is not None:
        cond = cond.to(device)
        if cfg_scale != 1.0:
            null = dit.null_condition(num, num_tokens=cond.shape[1] if cond.ndim == 3 else None, device=device)
    t0 = time.perf_counter()
    x, stats = sample(velocity, noise, steps=steps, method=method, shift=shift, cond=cond, null_cond=null,
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


def check_token_pair(dit, dit_path, vae, vae_path) -> None:
    """One-line errors when a token-latent DiT and a VecSet VAE do not belong together: latent channels and,
    for a Hunyuan3D release folder, the latent scale its ``config.yaml`` names (the DiT was trained on
    ``z * scale_factor``)."""
    c_dit, c_vae = dit.config.in_channels, vae.config.latent_channels
    if c_dit != c_vae:
        raise ValueError(f"{dit_path} and {vae_path} do not match: the DiT models {c_dit}-channel latents, the VAE "
                         f"has {c_vae} channels")
    if is_release(dit_path):
        want = release_settings(dit_path).scale_factor
        have = vae.config.latent_scale
        if want is not None and abs(want - have) > 1e-6 * want:
            raise ValueError(f"{dit_path} and {vae_path} do not match: the DiT was trained on latents scaled by "
                             f"{want}, the VAE's scale_factor is {have} (another Hunyuan3D version?)")


#: ``shapeflow generate``'s sampler and meshing defaults; a Hunyuan3D release uses the reference pipeline's
#: (:data:`~shapeflow.models.pretrained.hunyuan_dit.HUNYUAN_SAMPLER`), see :func:`sampler_defaults`.
DEFAULT_SAMPLER = dict(steps=25, method="heun", shift=1.0, cfg_scale=1.0, resolution=128)


def sampler_defaults(dit_path) -> dict:
    """Steps, method, shift, guidance and marching-cubes resolution to use when the caller names none."""
    return dict(HUNYUAN_SAMPLER if is_release(dit_path) else DEFAULT_SAMPLER)


def open_image(path) -> Image.Image:
    """An image file as PIL RGBA (when it has transparency) or RGB; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        with Image.open(path) as im:
            return im.convert("RGBA") if im.mode in ("RGBA", "LA", "P", "PA") else im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def image_tokens(image, *, release=None, encoder: str | None = None, num: int = 1, device="cpu",
                 source: str | None = None) -> torch.Tensor:
    """Condition tokens ``(num, l, d)`` of one image (a path, PIL image or ``(h, w, 3|4)`` array): with the
    DINOv2 and recipe of ``release`` (a Hunyuan3D DiT folder) or else of the DINOv2 ``encoder`` names.
    An opaque image must have a flat background (:func:`~shapeflow.models.conditioning.separate_background`);
    errors name ``source`` (the path by default)."""
    if isinstance(image, (str, Path)):
        source = source or str(image)
        image = open_image(image)
    enc = release_conditioner(release) if release is not None else \
        ImageConditioner.from_pretrained(encoder or "facebook/dinov2-large")
    enc = enc.to(device)
    tokens = enc(enc.preprocess([image], source=source or "image").to(device))  # (1, l, d)
    return tokens.expand(num, -1, -1).contiguous()


def image_to_3d(image, dit, vae, *, num: int = 1, steps: int | None = None, cfg_scale: float | None = None,
                resolution: int | None = None, seed: int = 0, device="cpu", progress: bool = False):
    """One image -> mesh(es) with a released Hunyuan3D DiT folder and its VAE folder (or any image-conditioned
    token DiT and VecSet VAE checkpoints), with the release's sampler defaults (:func:`sampler_defaults`).

    Returns ``(vertices, faces)`` for ``num=1``, else the :class:`Generated` result."""
    dit_model, dit_kind = load_dit(dit)
    vae_model, vae_kind = load_vae(vae)
    if dit_kind not in TOKEN_DIT_KINDS or vae_kind != "vecset_vae" or dit_model.config.cond != "image":
        raise ValueError(f"{dit}: image-to-3D needs an image-conditioned token DiT and a VecSet VAE, got a "
                         f"{dit_kind} and a {vae_kind}")
    check_token_pair(dit_model, dit, vae_model, vae)
    released = is_release(dit)
    defaults = sampler_defaults(dit)
    cond = image_tokens(image, release=dit if released else None, num=num, device=device)
    out = generate(dit_model, vae_model, dit_kind=dit_kind, vae_kind=vae_kind, num=num, cond=cond,
                   steps=steps or defaults["steps"], method=defaults["method"], shift=defaults["shift"],
                   cfg_scale=defaults["cfg_scale"] if cfg_scale is None else cfg_scale,
                   resolution=resolution or defaults["resolution"], seed=seed,
                   num_tokens=vae_model.config.num_tokens if released else None, device=device, progress=progress)
    if num == 1:
        if out.meshes[0] is None:
            raise ValueError(f"{image}: no surface decoded ({out.empty.get(0, 'empty field')})")
        return out.meshes[0]
    return out


def _null(dit, cond, cfg_scale: float, num: int, device):
    if cond is None or cfg_scale == 1.0:
        return None
    return dit.null_condition(num, num_tokens=cond.shape[1] if cond.ndim == 3 else None, device=device)


@dataclass
class GridStructure:
    """Stage 1 by a structure grid DiT (a ``grid_dit`` on the ``(1, r, r, r)`` occupancy of the latent grid,
    trained on a sparse latent folder's ``structure/``): the cells above 0 of its sample."""

    dit: torch.nn.Module

    @property
    def config(self):
        return self.dit.config

    @torch.no_grad()
    def voxels(self, num: int, cond, *, cells: int, factor: int, seed: int, device,
               **opts) -> tuple[list[torch.Tensor], int]:
        """``(active voxels (m_i, 3) per sample, velocity evaluations)``."""
        self.dit.to(device).eval()
        noise = initial_noise((num, 1, cells, cells, cells), seed=[seed + i for i in range(num)], device=device)
        grids, stats = sample(self.dit, noise, cond=cond, null_cond=_null(self.dit, cond, opts["cfg_scale"], num,
                                                                            device), return_stats=True, **opts)
        return [active_voxels(g) for g in self.dit.denormalize_latents(grids).cpu()], stats.nfe


@dataclass
class VecSetStructure:
    """Stage 1 by a VecSet generator (a ``token_dit`` + its ``vecset_vae``): each sampled shape is decoded to
    a mesh (``resolution``^3 marching cubes, largest piece), and its active voxels are the latent cells of its
    sparse band at the sparse VAE's resolution (``cells * factor``), the definition the sparse DiT was
    trained on (:func:`~shapeflow.geometry.sparse_band.band_nodes` // factor)."""

    dit: torch.nn.Module
    vae: torch.nn.Module
    resolution: int = 64

    @property
    def config(self):
        return self.dit.config

    @torch.no_grad()
    def voxels(self, num: int, cond, *, cells: int, factor: int, seed: int, device,
               **opts) -> tuple[list[torch.Tensor], int]:
        """``(active voxels (m_i, 3) per sample, velocity evaluations)``."""
        res = generate(self.dit, self.vae, dit_kind="token_dit", vae_kind="vecset_vae", num=num, cond=cond,
                       seed=seed, resolution=self.resolution, device=device, **opts)
        out = []
        for mesh in res.meshes:
            if mesh is None:
                out.append(torch.zeros(0, 3, dtype=torch.long))
                continue
            v, f = filter_components(*mesh, keep_largest=True)
            nodes, _ = band_nodes(v, f, cells * factor)
            c = torch.from_numpy(np.unique(nodes.astype(np.int64) // factor, axis=0))
            out.append(c[(c < cells).all(1)])  # a band on the grid's last node plane has no cell
        return out, res.nfe


def structure_source(structure, vae=None):
    """A stage-1 model as a structure source: a ``grid_dit`` (:class:`GridStructure`) or a ``(token_dit,
    vecset_vae)`` pair (:class:`VecSetStructure`); sources pass through."""
    if structure is None or isinstance(structure, (GridStructure, VecSetStructure)):
        return structure
    if isinstance(structure, (tuple, list)):
        return VecSetStructure(*structure)
    return GridStructure(structure)


def load_structure(spec) -> GridStructure | VecSetStructure:
    """A stage-1 model from checkpoint paths: ``"GRID_DIT"`` or ``"TOKEN_DIT,VECSET_VAE"`` (a string or a
    sequence of paths)."""
    parts = [str(p) for p in (spec.split(",") if isinstance(spec, str) else spec)]
    dit, kind = load_dit(parts[0])
    if kind == "grid_dit" and len(parts) == 1:
        return GridStructure(dit)
    if kind == "token_dit" and len(parts) == 2:
        vae, vae_kind = load_vae(parts[1])
        if vae_kind != "vecset_vae":
            raise ValueError(f"{parts[1]}: a token DiT's structure needs its vecset_vae, not a {vae_kind}")
        return VecSetStructure(dit, vae)
    raise ValueError(f"{','.join(parts)}: a structure model is a grid_dit checkpoint, or a token_dit and its "
                     f"vecset_vae as DIT,VAE (got a {kind} and {len(parts) - 1} more path(s))")


def check_sparse_pipeline(dit, structure, vae, *, dit_kind: str, vae_kind: str) -> None:
    """One-line errors for a sparse DiT / structure source / sparse VAE triple that does not fit together."""
    if dit_kind != "sparse_dit" or vae_kind != "sparse_vae":
        raise ValueError(f"a {dit_kind} cannot be decoded by a {vae_kind}: sparse DiTs go with sparse VAEs")
    structure = structure_source(structure)
    if structure is None:
        raise ValueError("a sparse_dit needs its stage-1 structure model: a grid_dit on the structure grids, or a "
                         "token_dit with its vecset_vae")
    r = dit.config.resolution
    sc = structure.config
    if isinstance(structure, GridStructure) and (getattr(sc, "resolution", None) != r or sc.in_channels != 1):
        raise ValueError(f"the structure DiT generates {sc.in_channels} x {getattr(sc, 'resolution', '?')}^3 grids; "
                         f"the sparse DiT needs 1 x {r}^3 occupancy")
    if sc.cond != dit.config.cond or not set(dit.config.classes) <= set(sc.classes):
        raise ValueError(f"the structure model ({sc.cond}: {list(sc.classes)}) and the sparse DiT "
                         f"({dit.config.cond}: {list(dit.config.classes)}) take different conditions")
    if dit.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"the sparse DiT makes {dit.config.in_channels}-channel latents, the VAE decodes "
                         f"{vae.config.latent_channels}")


def structure_labels(cond, dit, structure) -> torch.Tensor | None:
    """The sparse DiT's class labels as the structure model's (by class name; it may know more classes)."""
    names, theirs = list(dit.config.classes), list(structure.config.classes)
    if cond is None or dit.config.cond != "class" or names == theirs:
        return cond
    table = torch.tensor([theirs.index(n) for n in names] + [len(theirs)], device=cond.device)  # null -> null
    return table[cond]


def largest_piece(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """The voxels ``(m, 3)`` of the largest 26-connected piece of a voxel set (ties: the first in row-major
    order), in their given order."""
    if len(coords) == 0:
        return coords
    grid = np.zeros((resolution,) * 3, bool)
    c = coords.cpu().numpy()
    grid[c[:, 0], c[:, 1], c[:, 2]] = True
    labels, count = scipy.ndimage.label(grid, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return coords
    lab = labels[c[:, 0], c[:, 1], c[:, 2]]
    sizes = np.bincount(lab, minlength=count + 1)
    sizes[0] = 0
    return coords[torch.from_numpy(lab == int(np.argmax(sizes)))]


@torch.no_grad()
def _generate_sparse(dit, structure, vae, *, dit_kind, vae_kind, num, cond, labels, steps, method, shift, cfg_scale,
                     cfg_interval, seed, decode, device, progress, pieces) -> Generated:
    """The two stages and the sparse decoder (module docstring)."""
    check_sparse_pipeline(dit, structure, vae, dit_kind=dit_kind, vae_kind=vae_kind)
    if pieces not in ("largest", "all"):
        raise ValueError(f"structure_pieces must be 'largest' or 'all', got {pieces!r}")
    source = structure_source(structure)
    for m in (dit, vae):
        m.to(device).eval()
    r, c = dit.config.resolution, dit.config.in_channels
    cond = cond.to(device) if cond is not None else None
    opts = dict(steps=steps, method=method, shift=shift, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                progress=progress)
    out = Generated(meshes=[None] * num, latents=[None] * num, labels=list(labels or [""] * num))
    # stage 1: which voxels
    t0 = time.perf_counter()
    voxels, out.nfe = source.voxels(num, structure_labels(cond, dit, source), cells=r, factor=vae.config.factor,
                                    seed=seed, device=device, **opts)
    if pieces == "largest":
        voxels = [largest_piece(v, r) for v in voxels]
    out.seconds["structure"] = time.perf_counter() - t0
    keep = [i for i in range(num) if len(voxels[i])]
    for i in set(range(num)) - set(keep):
        out.empty[i] = "the structure stage generated no active voxels"
    if not keep:
        return out
    # stage 2: the latent features on them
    t0 = time.perf_counter()
    noise = [torch.randn(len(voxels[i]), c, generator=torch.Generator().manual_seed(seed + i)) for i in keep]
    tokens = dit.pack([voxels[i] for i in keep], noise).to(device)
    sub = cond[keep] if cond is not None else None
    x, stats = sample(velocity_fn(dit, tokens), tokens.x, cond=sub,
                      null_cond=_null(dit, sub, cfg_scale, len(keep), device), return_stats=True, **opts)
    out.nfe += stats.nfe
    for i, f in zip(keep, unpack(x, tokens)):
        out.latents[i] = (voxels[i], vae.unscale_latents(dit.denormalize_latents(f)).cpu())
    out.seconds["sample"] = time.perf_counter() - t0
    if decode:
        t0 = time.perf_counter()
        for i in keep:
            try:
                out.meshes[i] = decode_sparse_latent(vae, *out.latents[i], cells=r, device=device)
            except EmptySurfaceError as e:
                out.empty[i] = str(e)
        out.seconds["decode"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def decode_sparse_latent(vae, coords: torch.Tensor, feats: torch.Tensor, *, cells: int,
                         device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """One sparse latent (voxels ``(m, 3)`` of a ``cells^3`` latent grid, features ``(m, c)`` in VAE space) ->
    a mesh in the canonical frame (:meth:`SparseSDFVAE.decode_mesh`)."""
    order = torch.argsort((coords[:, 0] * cells + coords[:, 1]) * cells + coords[:, 2])
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords[order].int()], dim=1)
    z = SparseTensor(idx.to(device), feats[order].float().to(device), cells + 1, 1)
    return vae.decode_mesh(z)


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
