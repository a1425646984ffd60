"""Model families, one file each, and THE registry of them.

==============  ==============================================  =========================================
kind            class                                           latent
==============  ==============================================  =========================================
``vecset_vae``  :class:`~shapeflow.models.vecset_vae.VecSetVAE`  token set ``(b, m, c)``
``grid_vae``    :class:`~shapeflow.models.grid_vae.GridVAE`      grid ``(b, c, r, r, r)``
``sparse_vae``  :class:`~shapeflow.models.sparse_vae.SparseSDFVAE`  sparse grid: coords ``(M, 4)`` + ``(M, c)``
``token_dit``   :class:`~shapeflow.models.dit.TokenDiT`          velocity on token latents
``grid_dit``    :class:`~shapeflow.models.dit.GridDiT`           velocity on grid latents
``sparse_dit``  :class:`~shapeflow.models.sparse_dit.SparseDiT`  velocity on sparse latents' voxels
``hunyuan21_dit``  :class:`~shapeflow.models.hunyuan_dit.Hunyuan21DiT`  velocity on token latents (Hunyuan3D-2.1)
``hunyuan20_dit``  :class:`~shapeflow.models.hunyuan_dit.Hunyuan20DiT`  velocity on token latents (2.0 / 2mini)
==============  ==============================================  =========================================

Token-latent generators (``TOKEN_DIT_KINDS``) pair with VecSet VAEs and are called alike:
``dit(x (b, m, c), t (b,), cond)``.

Every family saves and loads through :class:`shapeflow.checkpoint.Pretrained`: ``Model.from_pretrained(path)``
(a shapeflow checkpoint, a training run, or a public release the family converts) and
``model.save_pretrained(dir)``. :func:`load_model` does the same when the family is not known in advance:
it reads ``kind`` from the checkpoint (or recognises a release) and dispatches through :data:`MODELS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from shapeflow.checkpoint import CheckpointError, read_model_kind
from shapeflow.models.dit import GridDiT, GridDiTConfig, TokenDiT, TokenDiTConfig
from shapeflow.models.hunyuan_dit import Hunyuan20DiT, Hunyuan20DiTConfig, Hunyuan21DiT, Hunyuan21DiTConfig
from shapeflow.models.sparse_dit import SparseDiT, SparseDiTConfig
from shapeflow.models.grid_vae import GridVAE, GridVAEConfig
from shapeflow.models.sparse_vae import SparseSDFVAE, SparseSDFVAEConfig
from shapeflow.models.vecset_vae import VecSetVAE, VecSetVAEConfig

__all__ = ["MODELS", "VAE_KINDS", "DIT_KINDS", "TOKEN_DIT_KINDS", "model_kind", "load_model", "load_vae", "load_dit"]

#: THE registry: model family -> (config class, model class).
MODELS: dict[str, tuple[type, type]] = {
    "vecset_vae": (VecSetVAEConfig, VecSetVAE),
    "grid_vae": (GridVAEConfig, GridVAE),
    "sparse_vae": (SparseSDFVAEConfig, SparseSDFVAE),
    "token_dit": (TokenDiTConfig, TokenDiT),
    "grid_dit": (GridDiTConfig, GridDiT),
    "sparse_dit": (SparseDiTConfig, SparseDiT),
    "hunyuan21_dit": (Hunyuan21DiTConfig, Hunyuan21DiT),
    "hunyuan20_dit": (Hunyuan20DiTConfig, Hunyuan20DiT),
}
VAE_KINDS = ("vecset_vae", "grid_vae", "sparse_vae")
DIT_KINDS = ("token_dit", "grid_dit", "sparse_dit", "hunyuan21_dit", "hunyuan20_dit")
TOKEN_DIT_KINDS = ("token_dit", "hunyuan21_dit", "hunyuan20_dit")  # (b, m, c) latents of a VecSet VAE


def model_kind(path: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> str:
    """The family of the checkpoint or public release at ``path`` (a key of :data:`MODELS`).

    Releases of ``kinds`` are looked for first (a Hunyuan3D DiT folder also bundles a VAE: it is a DiT to
    :func:`load_dit` and a VAE to :func:`load_vae`). Raises ``FileNotFoundError`` / ``ValueError`` with a
    one-line message when ``path`` is neither or names an unknown family.
    """
    p = Path(path)
    order = [k for k in MODELS if kinds is not None and k in kinds] + [k for k in MODELS if k not in (kinds or ())]
    for kind in order:
        if any(release.detect(p) for release in MODELS[kind][1].releases):
            return kind
    kind = read_model_kind(p)
    if kind not in MODELS:
        raise CheckpointError(f"{p}: unknown model kind {kind!r} (expected one of {', '.join(MODELS)})")
    return kind


def load_model(path: str | os.PathLike, *, ema: bool = False, kinds: tuple[str, ...] | None = None,
               **overrides: Any) -> tuple[nn.Module, str]:
    """Load any registered model from ``path``; returns ``(model in eval mode, kind)``.

    ``kinds`` restricts the accepted families (a one-line error names the one found); ``overrides`` are
    config fields (see :meth:`shapeflow.checkpoint.Pretrained.from_pretrained`).
    """
    kind = model_kind(path, kinds)
    if kinds is not None and kind not in kinds:
        role = {VAE_KINDS: "a VAE", DIT_KINDS: "a DiT"}.get(kinds, "one")
        raise CheckpointError(f"{path}: is a {kind} checkpoint, not {role} ({' or '.join(kinds)})")
    return MODELS[kind][1].from_pretrained(path, ema=ema, **overrides), kind


def load_vae(path: str | os.PathLike, *, ema: bool = False, **overrides: Any) -> tuple[nn.Module, str]:
    """A VecSet or grid VAE (shapeflow checkpoint, Hunyuan3D ShapeVAE release, TRELLIS ``ss_enc/ss_dec``)."""
    return load_model(path, ema=ema, kinds=VAE_KINDS, **overrides)


def load_dit(path: str | os.PathLike, *, ema: bool = False, **overrides: Any) -> tuple[nn.Module, str]:
    """A token, grid or sparse DiT (shapeflow checkpoint, TRELLIS ``ss_flow_*``, or a Hunyuan3D-2.1 / 2.0 /
    2mini DiT release folder)."""
    return load_model(path, ema=ema, kinds=DIT_KINDS, **overrides)
