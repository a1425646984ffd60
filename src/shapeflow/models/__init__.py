"""Model families, one file each, and the one place that maps a checkpoint to its family.

==============  ==============================================  =========================================
kind            class                                           latent
==============  ==============================================  =========================================
``vecset_vae``  :class:`~shapeflow.models.vecset_vae.VecSetVAE`  token set ``(b, m, c)``
``grid_vae``    :class:`~shapeflow.models.grid_vae.GridVAE`      grid ``(b, c, r, r, r)``
``token_dit``   :class:`~shapeflow.models.dit.TokenDiT`          velocity on token latents
``grid_dit``    :class:`~shapeflow.models.dit.GridDiT`           velocity on grid latents
==============  ==============================================  =========================================

A shapeflow checkpoint directory holds ``config.json`` whose ``kind`` (written by ``save_pretrained``)
or ``task`` (written by the training engine) names the family, and ``model.safetensors`` /
``ema.safetensors``. Public checkpoints of other projects are recognised by their own files (see
:mod:`shapeflow.models.pretrained`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VAE_KINDS = ("vecset_vae", "grid_vae")
DIT_KINDS = ("token_dit", "grid_dit")


def checkpoint_kind(path: str | os.PathLike) -> str:
    """The model family of a shapeflow checkpoint (a directory, a run directory, or its ``final/``).

    Raises ``FileNotFoundError`` / ``ValueError`` with a one-line message when ``path`` is not a
    shapeflow checkpoint or names no known family.
    """
    from shapeflow.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(_prefer_final(Path(path)))
    try:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{ckpt}/config.json: invalid JSON ({e})") from None
    kind = cfg.get("kind") or cfg.get("task")
    if kind not in VAE_KINDS + DIT_KINDS:
        raise ValueError(f"{ckpt}/config.json: unknown model kind {kind!r} "
                         f"(expected one of {', '.join(VAE_KINDS + DIT_KINDS)})")
    return kind


def _prefer_final(path: Path) -> Path:
    """A run directory stands for its exported ``final/`` weights when they exist."""
    return path / "final" if (path / "final" / "config.json").is_file() else path


def load_vae(path: str | os.PathLike, *, ema: bool = False):
    """Load a VecSet or grid VAE from a shapeflow checkpoint; returns ``(model, kind)`` in eval mode.

    Public checkpoints: a Hunyuan3D ShapeVAE file (``.safetensors`` / ``.ckpt``) loads as ``vecset_vae``;
    a TRELLIS ``ss_enc_* / ss_dec_*`` pair (path prefix, ``.json`` or ``.safetensors``) as ``grid_vae``.
    """
    from shapeflow.models.grid_vae import GridVAE
    from shapeflow.models.vecset_vae import VecSetVAE

    p = Path(path)
    if p.is_file() or not p.exists():  # a single public file or a TRELLIS prefix
        if p.suffix in (".ckpt", ".pt", ".pth") or (p.suffix == ".safetensors" and not _trellis_pair(p)):
            return VecSetVAE.from_pretrained(p).eval(), "vecset_vae"
        return GridVAE.from_pretrained(p).eval(), "grid_vae"
    p = _prefer_final(p)
    kind = checkpoint_kind(p)
    if kind == "vecset_vae":
        return VecSetVAE.from_pretrained(p, ema=ema).eval(), kind
    if kind == "grid_vae":
        return GridVAE.from_pretrained(p, ema=ema).eval(), kind
    raise ValueError(f"{path}: is a {kind} checkpoint, not a VAE")


def load_dit(path: str | os.PathLike, *, ema: bool = False):
    """Load a token or grid DiT (shapeflow checkpoint or a TRELLIS ``ss_flow_*`` pair); ``(model, kind)``."""
    from shapeflow.models.dit import GridDiT, load_dit as _load

    p = Path(path)
    if p.is_file() or not p.exists():
        return GridDiT.from_pretrained(p).eval(), "grid_dit"
    p = _prefer_final(p)
    kind = checkpoint_kind(p)
    if kind not in DIT_KINDS:
        raise ValueError(f"{path}: is a {kind} checkpoint, not a DiT")
    model = _load(p, ema=ema)
    return model.eval(), kind


def _trellis_pair(p: Path) -> bool:
    return p.with_suffix(".json").is_file()
