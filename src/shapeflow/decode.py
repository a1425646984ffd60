"""Volume decoding: a field function (a VecSet VAE's decoder, or any analytic field) -> node grid -> mesh.

Design choices
--------------
* Everything is sampled on THE node grid (:mod:`shapeflow.geometry.grid`: ``res`` cells, ``res + 1``
  nodes per axis over ``[-bound, bound]``, ``indexing="ij"``) and meshed by
  :func:`shapeflow.geometry.marching_cubes.marching_cubes` at level 0, negative inside.
* A *field function* maps ``(n, 3)`` float32 world points to ``(n,)`` values, negative inside.
  :class:`VecSetField` wraps a VAE and its decoded tokens; tests and benchmarks wrap analytic SDFs.
  Points are passed in chunks of at most ``chunk_size``, so memory stays bounded by the chunk, never
  by the grid (the dense grid coordinates are generated per chunk, not materialised).
* Two strategies:

  - ``dense``: all ``(res + 1)^3`` nodes.
  - ``hierarchical``: coarse-to-fine as Hunyuan3D / FlashVDM's hierarchical volume decoding
    (arXiv 2503.16302). The resolution chain halves ``res`` while it stays even and
    ``>= min_resolution`` (default ``res // 4``: 256 -> [64, 128, 256], 384 -> [96, 192, 384] as in
    Hunyuan3D). The coarsest level is decoded densely. At each finer level a coarse cell is *active*
    if its 8 corners do not all have the same sign (``< 0`` vs ``>= 0``) or its smallest ``|value|`` is
    below ``band``; active cells are split into their 8 fine cells, which are dilated (3x3x3) by
    ``dilation`` fine cells (``final_dilation`` at the last level, where Hunyuan3D also dilates less);
    every node of those fine cells is evaluated (nodes shared with the coarse grid are copied, not
    re-evaluated) and every other fine node takes the trilinear interpolation of the coarser level.
    Interpolated values keep the sign of the inactive coarse cell they lie in, so they create no
    marching-cubes crossings (``fill="nan"`` marks them NaN instead, like Hunyuan3D).

    Then (``trace=True``, the default; this project's addition) the surface is *followed*: every fine
    cell whose 8 corner values (evaluated or interpolated) do not all have the same sign and that has a
    corner not yet evaluated gets its corners evaluated, repeated until no such cell remains. So every
    cell marching cubes meshes has all 8 corners evaluated, and a surface that leaves the refined
    region (a thin part between coarse nodes) is followed instead of cut; this is what lets the last
    level skip the dilation (``final_dilation=0``): fewer queries on trained VecSet fields for the same
    main surface (BENCHMARKS.md, "VecSet VAE").

    Every meshed fine cell has its corners evaluated at the same float32 points as ``dense`` (values
    can differ in the last ulp only because PyTorch kernels are not bitwise batch-invariant across
    chunk compositions), so marching cubes sees the same surface there. A surface component that never
    reaches a refined cell (a floater smaller than a coarse cell, with no coarse corner sign change, no
    corner within ``band``, not reached by the dilation) is missed, as in the published method; for a
    true SDF in world units, ``band > sqrt(3) * coarsest spacing`` rules that out.
* Optional FlashVDM **adaptive KV selection** (``topk``): the points of each call are bucketed into
  ``regions^3`` sub-cubes and each bucket attends only to the ``topk`` latent tokens with the largest
  mean ``q . k`` over a subsample of its queries. Off by default; it changes the field slightly.
* Stats (:class:`DecodeStats`) report decoder queries per level and wall time, so the saving of the
  hierarchical strategy is measurable.
* :func:`decode_to_mesh` is the one "latents of one shape -> mesh" for both VAE families (VecSet through
  the above, grid VAEs on their own grid, shell occupancy filled); ``generate``, ``reconstruct`` and
  ``eval-vae`` all call it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from scipy import ndimage

from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND
from shapeflow.geometry.marching_cubes import marching_cubes
from shapeflow.models.grid_vae import grid_to_field

log = logging.getLogger(__name__)

FieldFn = Callable[[torch.Tensor], torch.Tensor]
"""``(n, 3)`` float32 world points -> ``(n,)`` field values, negative inside."""

DEFAULT_CHUNK = 16384  # points per decoder call: ~0.7 GB of activations for the base preset on CPU


@dataclass
class DecodeStats:
    """What a volume decode did."""

    strategy: str
    resolution: int
    levels: tuple[int, ...]  # resolution chain (cells per axis), coarse to fine
    queries_per_level: tuple[int, ...]  # field-function evaluations per level
    seconds: float  # wall time of the field evaluation (including grid bookkeeping)
    seconds_mesh: float = 0.0  # marching cubes (0 if no mesh was extracted)
    extra: dict = field(default_factory=dict)

    @property
    def queries(self) -> int:
        """Total field-function evaluations."""
        return int(sum(self.queries_per_level))

    @property
    def dense_queries(self) -> int:
        """Evaluations a dense decode at the final resolution needs: ``(res + 1)^3``."""
        return (self.resolution + 1) ** 3

    def as_dict(self) -> dict:
        return dict(strategy=self.strategy, resolution=self.resolution, levels=list(self.levels),
                    queries=self.queries, queries_per_level=list(self.queries_per_level),
                    dense_queries=self.dense_queries, seconds=self.seconds, seconds_mesh=self.seconds_mesh,
                    **self.extra)


# ----------------------------------------------------------------------------------------------
# Field functions
# ----------------------------------------------------------------------------------------------


class VecSetField:
    """A VecSet VAE's geometry decoder bound to one shape's tokens, as a :data:`FieldFn`.

    Parameters
    ----------
    model : a :class:`~shapeflow.models.vecset_vae.VecSetVAE` (in eval mode).
    tokens : (1, m, width) decoded tokens (``model.decode(z)``) of one shape.
    topk : FlashVDM adaptive KV selection: keep this many tokens per region (None: all tokens).
    regions : sub-cubes per axis for ``topk`` (FlashVDM uses 4 at the first level).
    topk_stride : score tokens with every ``topk_stride``-th query of a region.
    bound : half side of the decoding cube (for the region buckets).
    """

    def __init__(self, model, tokens: torch.Tensor, *, topk: int | None = None, regions: int = 4,
                 topk_stride: int = 16, bound: float = BOUND):
        if tokens.ndim != 3 or tokens.shape[0] != 1:
            raise ValueError(f"VecSetField decodes one shape: tokens must be (1, m, w), "
                             f"got {tuple(tokens.shape)}")
        self.model, self.tokens = model, tokens
        with torch.no_grad():
            self.context = model.geo_decoder.context(tokens)  # projected once per shape
        self.topk, self.regions, self.topk_stride, self.bound = topk, regions, topk_stride, bound

    @torch.no_grad()
    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """points (n, 3) -> field (n,), negative inside."""
        model = self.model
        pts = points.to(self.tokens.device, self.tokens.dtype)
        if self.topk is None:
            return model.query_context(pts[None], self.context)[0]
        g = self.regions
        cell = ((pts + self.bound) / (2 * self.bound) * g).long().clamp_(0, g - 1)  # (n, 3)
        region = (cell[:, 0] * g + cell[:, 1]) * g + cell[:, 2]  # (n,)
        order = torch.argsort(region, stable=True)
        counts = torch.bincount(region, minlength=g ** 3).tolist()
        out = torch.empty(len(pts), dtype=pts.dtype, device=pts.device)
        start = 0
        for c in counts:
            if c:
                idx = order[start:start + c]
                out[idx] = model.query_context(pts[idx][None], self.context, topk=self.topk,
                                               topk_stride=self.topk_stride)[0]
                start += c
        return out


# ----------------------------------------------------------------------------------------------
# Grid evaluation
# ----------------------------------------------------------------------------------------------


def resolution_chain(resolution: int, min_resolution: int | None = None) -> list[int]:
    """Coarse-to-fine resolutions: halve while the result stays an integer ``>= min_resolution``.

    The default ``min_resolution`` is ``max(16, resolution // 4)``: two refinement levels, which gives
    Hunyuan3D's chain for 384 (96, 192, 384) and 64 -> 128 -> 256 for 256.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if min_resolution is None:
        min_resolution = max(16, resolution // 4)
    chain = [int(resolution)]
    while chain[0] % 2 == 0 and chain[0] // 2 >= min_resolution:
        chain.insert(0, chain[0] // 2)
    return chain


def _coords(res: int, bound: float, device) -> torch.Tensor:
    # The float64 -> float32 values of grid.node_points: dense and hierarchical query identical points.
    return torch.from_numpy(grid.node_coords_1d(res, bound)).to(device)


def _eval_indices(field_fn: FieldFn, ijk: torch.Tensor, coords: torch.Tensor,
                  chunk_size: int) -> torch.Tensor:
    """Field at node indices ``ijk (k, 3)`` in chunks; returns (k,) float32."""
    out = torch.empty(len(ijk), dtype=torch.float32, device=coords.device)
    for s in range(0, len(ijk), chunk_size):
        idx = ijk[s:s + chunk_size]
        pts = coords[idx].to(torch.float32)  # (c, 3)
        out[s:s + chunk_size] = field_fn(pts).reshape(-1).to(out.device, torch.float32)
    return out


def _flat_to_ijk(flat: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([flat // (n * n), (flat // n) % n, flat % n], dim=-1)  # (k, 3)


@torch.no_grad()
def dense_field(field_fn: FieldFn, resolution: int, *, bound: float = BOUND, chunk_size: int = DEFAULT_CHUNK,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, DecodeStats]:
    """Evaluate ``field_fn`` at every node of the ``resolution`` node grid.

    Returns
    -------
    field : (resolution + 1,) * 3 float32, indexed [i, j, k] = [x, y, z]
    stats : :class:`DecodeStats`
    """
    t0 = time.perf_counter()
    n = resolution + 1
    coords = _coords(resolution, bound, device)
    out = torch.empty(n ** 3, dtype=torch.float32, device=device)
    for s in range(0, n ** 3, chunk_size):
        flat = torch.arange(s, min(s + chunk_size, n ** 3), device=device)
        out[s:s + len(flat)] = _eval_indices(field_fn, _flat_to_ijk(flat, n), coords, chunk_size)
    field_ = out.reshape(n, n, n).cpu().numpy()
    return field_, DecodeStats("dense", resolution, (resolution,), (n ** 3,), time.perf_counter() - t0)


def _max3(x: torch.Tensor, k: tuple[int, int, int], pad: tuple[int, int, int]) -> torch.Tensor:
    return F.max_pool3d(x[None, None], k, stride=1, padding=pad)[0, 0]


def _corner_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the 8 corners of every cell: (n + 1,) * 3 nodes -> (n,) * 3 cells (separable)."""
    for k in ((2, 1, 1), (1, 2, 1), (1, 1, 2)):
        x = _max3(x, k, (0, 0, 0))
    return x


def _dilate(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` 3x3x3 binary dilations of a float 0/1 volume (separable max pools)."""
    for _ in range(steps):
        for k, p in (((3, 1, 1), (1, 0, 0)), ((1, 3, 1), (0, 1, 0)), ((1, 1, 3), (0, 0, 1))):
            x = _max3(x, k, p)
    return x


_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])  # (8, 3) cell corners


def _trace_surface(field_fn: FieldFn, values: torch.Tensor, known: torch.Tensor, new: torch.Tensor,
                   coords: torch.Tensor, chunk_size: int, batch: int = 1 << 16) -> tuple[int, int]:
    """Follow the zero crossing out of the evaluated region, in place (see the module docstring).

    values : (n,) * 3 node values (evaluated or interpolated); known : (n,) * 3 evaluated mask;
    new : (k, 3) nodes just evaluated. A cell can only start crossing, or see a corner value change,
    where a corner was just evaluated, so each round inspects the (up to 8) cells around each new node:
    a crossing cell with an unknown corner gets its unknown corners evaluated, which are the next
    round's new nodes. Work is in batches of ``batch`` nodes (~40 MB of indices each).

    Returns ``(nodes evaluated, rounds)``.
    """
    n = values.shape[0]
    flat_values, flat_known = values.view(-1), known.view(-1)
    corners = _CORNERS.to(new.device)
    corner_offsets = (corners[:, 0] * n + corners[:, 1]) * n + corners[:, 2]  # (8,) flat node offsets
    total = rounds = 0
    while len(new):
        found = []
        for s in range(0, len(new), batch):
            cells = new[s:s + batch, None, :] - corners  # (k, 8, 3): the cells having the node as a corner
            cells = cells[((cells >= 0) & (cells < n - 1)).all(-1)]  # (c, 3), by their lowest corner
            base = torch.unique((cells[:, 0] * n + cells[:, 1]) * n + cells[:, 2])
            idx = base[:, None] + corner_offsets  # (c, 8) flat corner nodes
            neg = flat_values[idx] < 0
            cand = idx[neg.any(1) & ~neg.all(1)].reshape(-1)
            found.append(cand[~flat_known[cand]])
        todo = torch.unique(torch.cat(found))
        if not len(todo):
            break
        new = _flat_to_ijk(todo, n)
        flat_values[todo] = _eval_indices(field_fn, new, coords, chunk_size)
        flat_known[todo] = True
        total += len(todo)
        rounds += 1
    return total, rounds


@torch.no_grad()
def hierarchical_field(field_fn: FieldFn, resolution: int, *, bound: float = BOUND,
                       chunk_size: int = DEFAULT_CHUNK, min_resolution: int | None = None, band: float = 0.0,
                       dilation: int = 2, final_dilation: int = 0, trace: bool = True, fill: str = "coarse",
                       device: str | torch.device = "cpu") -> tuple[np.ndarray, DecodeStats]:
    """Coarse-to-fine evaluation of ``field_fn`` on the ``resolution`` node grid (see module docstring).

    Parameters
    ----------
    min_resolution : the coarsest level is the smallest halving of ``resolution`` that is
      ``>= min_resolution``
      (default ``max(16, resolution // 4)``, see :func:`resolution_chain`).
    band : also refine cells whose smallest ``|value|`` is below this (field units); 0 = sign changes only.
    dilation : grow the refined region by this many fine cells at intermediate levels.
    final_dilation : the same at the last level (FlashVDM-style decoding without ``trace`` needs 1).
    trace : follow the surface out of the refined region until every meshed cell is fully evaluated.
    fill : value of nodes never evaluated at the final level: ``"coarse"`` (trilinear from the coarser
      level; sign-consistent, so the field is complete) or ``"nan"``.

    Returns
    -------
    field : (resolution + 1,) * 3 float32
    stats : :class:`DecodeStats` with per-level query counts.
    """
    if fill not in ("coarse", "nan"):
        raise ValueError(f"fill must be 'coarse' or 'nan', got {fill!r}")
    t0 = time.perf_counter()
    levels = resolution_chain(resolution, min_resolution)
    r0 = levels[0]
    values, _ = dense_field(field_fn, r0, bound=bound, chunk_size=chunk_size, device=device)
    values = torch.from_numpy(values).to(device)  # (r0 + 1,) * 3
    known = torch.ones_like(values, dtype=torch.bool)
    counts = [(r0 + 1) ** 3]
    traced, trace_rounds = [], []  # per refined level
    for res in levels[1:]:
        neg = (values < 0).float()
        mixed = _corner_max(neg) > -_corner_max(-neg)  # (rc,) * 3 cells: some corner < 0 and some >= 0
        if band > 0:
            mixed |= -_corner_max(-values.abs()) < band
        fine_cells = mixed.float().repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        fine_cells = _dilate(fine_cells, final_dilation if res == levels[-1] else dilation)  # (res,) * 3
        need = _corner_max(F.pad(fine_cells, (1, 1, 1, 1, 1, 1))) > 0  # (res + 1,) * 3 nodes of active cells
        del neg, mixed, fine_cells  # free the masks before the (memory-hungry) field evaluation
        fine = F.interpolate(values[None, None], size=(res + 1,) * 3, mode="trilinear",
                             align_corners=True)[0, 0]  # (res + 1,) * 3
        fine_known = torch.zeros_like(need)
        fine_known[::2, ::2, ::2] = known
        fine[::2, ::2, ::2] = values  # exact copies of evaluated (and filled) coarse nodes
        todo = need & ~fine_known
        del need
        ijk = todo.nonzero()  # (k, 3)
        coords = _coords(res, bound, device)
        fine[todo] = _eval_indices(field_fn, ijk, coords, chunk_size)
        fine_known |= todo
        del todo
        n_traced, rounds = _trace_surface(field_fn, fine, fine_known, ijk, coords, chunk_size) if trace else (0, 0)
        values, known = fine, fine_known
        counts.append(len(ijk) + n_traced)
        traced.append(n_traced)
        trace_rounds.append(rounds)
    if fill == "nan":
        values = values.masked_fill(~known, float("nan"))
    stats = DecodeStats("hierarchical", resolution, tuple(levels), tuple(counts), time.perf_counter() - t0,
                        extra=dict(band=band, dilation=dilation, final_dilation=final_dilation, trace=trace,
                                   traced_queries=traced, trace_rounds=trace_rounds,
                                   evaluated_fraction=float(known.float().mean())))
    return values.cpu().numpy(), stats


def decode_field(field_fn: FieldFn, resolution: int, *, strategy: str = "hierarchical",
                 **kwargs) -> tuple[np.ndarray, DecodeStats]:
    """:func:`dense_field` or :func:`hierarchical_field` by name."""
    if strategy == "dense":
        return dense_field(field_fn, resolution, **kwargs)
    if strategy == "hierarchical":
        return hierarchical_field(field_fn, resolution, **kwargs)
    raise ValueError(f"unknown decoding strategy {strategy!r}; choose 'dense' or 'hierarchical'")


# ----------------------------------------------------------------------------------------------
# Latents / surfaces -> meshes
# ----------------------------------------------------------------------------------------------


def _single(latents: torch.Tensor) -> torch.Tensor:
    if latents.ndim == 2:
        latents = latents[None]
    if latents.ndim != 3 or latents.shape[0] != 1:
        raise ValueError(f"expected the latents of one shape, (m, c) or (1, m, c), "
                         f"got {tuple(latents.shape)}")
    return latents


@torch.no_grad()
def latents_to_field(model, latents: torch.Tensor, resolution: int = 256, *, strategy: str = "hierarchical",
                     topk: int | None = None, regions: int = 4, bound: float = BOUND,
                     **kwargs) -> tuple[np.ndarray, DecodeStats]:
    """VAE latents of one shape -> node-grid field.

    Parameters
    ----------
    latents : (m, c) or (1, m, c) in VAE space, i.e. ``z`` and **not** ``z * latent_scale`` (generator
      samples go through ``model.unscale_latents`` first).
    strategy, kwargs : see :func:`dense_field` / :func:`hierarchical_field` (``chunk_size``, ``band``, ...).
    topk, regions : FlashVDM adaptive KV selection (off by default).
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        tokens = model.decode(_single(latents).to(p.device, p.dtype))
        fn = VecSetField(model, tokens, topk=topk, regions=regions, bound=bound)
        field_, stats = decode_field(fn, resolution, strategy=strategy, bound=bound, device=p.device,
                                     **kwargs)
    finally:
        model.train(was_training)
    if topk is not None:
        stats.extra.update(topk=topk, regions=regions)
    return field_, stats


def field_to_mesh(field_: np.ndarray, stats: DecodeStats | None = None, *, bound: float = BOUND,
                  **mc_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes at level 0 (negative inside) on a node-grid field; fills ``stats.seconds_mesh``."""
    t0 = time.perf_counter()
    v, f = marching_cubes(field_, level=0.0, bound=bound, **mc_kwargs)
    if stats is not None:
        stats.seconds_mesh = time.perf_counter() - t0
    return v, f


def latents_to_mesh(model, latents: torch.Tensor, resolution: int = 256, *, strategy: str = "hierarchical",
                    bound: float = BOUND, mc_kwargs: dict | None = None,
                    **kwargs) -> tuple[np.ndarray, np.ndarray, DecodeStats]:
    """VAE latents of one shape -> ``(vertices (n, 3) float64 world, faces (f, 3) int64 outward, stats)``.

    Raises :class:`~shapeflow.geometry.marching_cubes.EmptySurfaceError` when the decoded field has no surface.
    """
    field_, stats = latents_to_field(model, latents, resolution, strategy=strategy, bound=bound, **kwargs)
    v, f = field_to_mesh(field_, stats, bound=bound, **(mc_kwargs or {}))
    return v, f, stats


@torch.no_grad()
def decode_to_mesh(vae, kind: str, z: torch.Tensor, *, resolution: int = 128, strategy: str = "hierarchical",
                   fill_shell: bool = True, smooth: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Latents of one shape from either VAE family -> ``(vertices, faces)`` in the canonical frame.

    ``kind``: ``"vecset_vae"`` (decoded by :func:`latents_to_mesh` at ``resolution``), ``"grid_vae"`` (its
    own grid; ``resolution`` and ``strategy`` do not apply) or ``"sparse_vae"`` (``z`` a SparseTensor of one
    shape; its band decoded and meshed block by block at the latent grid's resolution,
    :meth:`~shapeflow.models.sparse_vae.SparseSDFVAE.decode_mesh`; ``smooth`` does not apply).
    A shell-occupancy grid VAE (TRELLIS sparse
    structure) decodes a thin double-walled shell; ``fill_shell`` meshes the solid it encloses instead
    (:func:`filled_shell_logits`), one outward surface about half a voxel outside the true one.
    ``smooth``: Gaussian filter of the field before marching cubes (world units; 0 = none).
    Raises :class:`~shapeflow.geometry.marching_cubes.EmptySurfaceError` when the decoded field has no surface.
    """
    if kind == "vecset_vae":
        v, f, _ = latents_to_mesh(vae, z, resolution, strategy=strategy, mc_kwargs={"smooth": smooth})
        return v, f
    if kind == "sparse_vae":
        return vae.decode_mesh(z)
    if z.shape[0] != 1:
        raise ValueError(f"expected the latents of one shape, (1, c, l, l, l), got {tuple(z.shape)}")
    out = vae.decode(z)
    if vae.config.input == "occupancy" and fill_shell:
        out = filled_shell_logits(out)
    fields, field_bound = grid_to_field(out, vae.config.input)
    return marching_cubes(fields[0], 0.0, field_bound, smooth=smooth)


def filled_shell_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shell occupancy logits ``(1, 1, r, r, r)`` -> logits of the solid the shell encloses.

    Empty cells not reachable from the grid boundary through empty cells (6-connected flood fill) become
    occupied (logit ``|x| + 1``); everything else is unchanged.
    """
    occ = (logits[0, 0] > 0).cpu().numpy()
    empty = np.pad(~occ, 1, constant_values=True)
    lab, _ = ndimage.label(empty)
    exterior = (lab == lab[0, 0, 0])[1:-1, 1:-1, 1:-1]
    filled = logits.clone()
    interior = torch.from_numpy(~exterior & ~occ).to(logits.device)
    filled[0, 0][interior] = torch.abs(logits[0, 0][interior]) + 1.0  # inside: positive logit
    return filled


@torch.no_grad()
def encode_surface(model, surface, *, num_tokens: int | None = None, seed: int = 0) -> torch.Tensor:
    """Deterministic latents (posterior mean) of one surface sample ``(n, 3 + f)`` -> ``(1, m, c)``."""
    p = next(model.parameters())
    s = torch.as_tensor(np.asarray(surface), dtype=p.dtype, device=p.device)
    if s.ndim == 2:
        s = s[None]
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        return model.encode(s, num_tokens=num_tokens, generator=gen).mode()
    finally:
        model.train(was_training)


def reconstruct_mesh(model, surface, resolution: int = 256, *, num_tokens: int | None = None, seed: int = 0,
                     **kwargs) -> tuple[np.ndarray, np.ndarray, DecodeStats]:
    """Encode a surface sample and decode it to a mesh (:func:`encode_surface`, :func:`latents_to_mesh`)."""
    t0 = time.perf_counter()
    z = encode_surface(model, surface, num_tokens=num_tokens, seed=seed)
    t_enc = time.perf_counter() - t0
    v, f, stats = latents_to_mesh(model, z, resolution, **kwargs)
    stats.extra["seconds_encode"] = t_enc
    return v, f, stats


__all__ = [
    "FieldFn", "DecodeStats", "VecSetField", "resolution_chain", "dense_field", "hierarchical_field",
    "decode_field", "latents_to_field", "field_to_mesh", "latents_to_mesh", "decode_to_mesh",
    "filled_shell_logits", "encode_surface", "reconstruct_mesh",
]
