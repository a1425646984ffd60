"""Loading and saving VecSet VAE weights: shapeflow checkpoints and public (Hunyuan3D) checkpoints.

shapeflow checkpoint layout (shared with the training engine): a directory holding

* ``config.json``: either the bare :class:`~shapeflow.models.vecset_vae.VecSetVAEConfig` fields or a
  resolved experiment config with the model fields under ``"model"`` (other top-level sections are
  ignored). A ``kind`` / ``name`` / ``type`` entry, if present, must name the VecSet VAE; a ``preset``
  entry supplies defaults for the fields it does not list. Unknown fields are an error; fields missing
  from an older checkpoint take their defaults with a log line.
* ``model.safetensors`` (and optionally ``ema.safetensors``, loaded with ``ema=True``).

Loading is always strict: missing, unexpected or mis-shaped keys raise a ``ValueError`` listing them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shapeflow.models.pretrained.hunyuan_vae import (
    is_hunyuan_state_dict,
    load_hunyuan_vae,
    read_state_dict,
)
from shapeflow.models.vecset_vae import PRESETS, VecSetVAE, VecSetVAEConfig
from shapeflow.train.checkpoint import load_state_dict_strict

log = logging.getLogger(__name__)

__all__ = ["load_vecset_vae", "save_vecset_vae", "vecset_config_from_dict", "load_hunyuan_vae"]

_KIND_KEYS = ("kind", "name", "type", "arch")
_KIND_NAMES = {"vecset_vae", "vecset", "vecsetvae", "VecSetVAE"}


def vecset_config_from_dict(obj: dict, *, source: str = "config", **overrides) -> VecSetVAEConfig:
    """Build a config from a checkpoint's ``config.json`` content (bare or under ``"model"``), strictly."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a JSON object")
    d = dict(obj["model"]) if isinstance(obj.get("model"), dict) else dict(obj)
    task = obj.get("task") if isinstance(obj.get("model"), dict) else None
    if task is not None and task not in _KIND_NAMES:
        raise ValueError(f"{source}: checkpoint of task {task!r}, not a VecSet VAE")
    kinds = {k: d.pop(k) for k in _KIND_KEYS if k in d}
    if "kind" in obj and not isinstance(obj.get("kind"), dict):
        kinds.setdefault("kind", obj["kind"])
    bad = {k: v for k, v in kinds.items() if v not in _KIND_NAMES}
    if bad:
        raise ValueError(f"{source}: checkpoint model is {bad}, not a VecSet VAE")
    preset = d.pop("preset", None)
    fields = set(VecSetVAEConfig.__dataclass_fields__)
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown VecSetVAEConfig field(s) {unknown}")
    base = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{source}: unknown VecSet VAE preset {preset!r}; choose from {sorted(PRESETS)}")
        base = dict(PRESETS[preset])
    absent = sorted(fields - set(d) - set(base) - set(overrides))
    if absent and preset is None:
        log.info("%s: fields %s not in the checkpoint config; using their defaults", source, absent)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown VecSetVAEConfig field(s) {unknown}")
    try:
        return VecSetVAEConfig(**{**base, **d, **overrides})
    except TypeError as err:
        raise ValueError(f"{source}: {err}") from None


def save_vecset_vae(model: VecSetVAE, directory: str | Path) -> None:
    """Atomically write ``config.json`` (``{"kind": "vecset_vae", "model": {...}}``) and the weights."""
    from safetensors.torch import save

    from shapeflow.fileio import write_bytes, write_json

    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_bytes(directory / "model.safetensors", save(tensors))
    write_json(directory / "config.json", {"kind": "vecset_vae", "model": model.cfg.to_dict()})


def load_vecset_vae(path: str | Path, *, ema: bool = False, **overrides) -> VecSetVAE:
    """Load a VecSet VAE from a shapeflow checkpoint directory or a Hunyuan3D ShapeVAE file.

    Parameters
    ----------
    path : a directory with ``config.json`` + ``model.safetensors``; a ``.safetensors`` file inside such a
      directory; or a Hunyuan3D checkpoint file (detected by its key names).
    ema : load ``ema.safetensors`` instead of ``model.safetensors`` (shapeflow checkpoints only).
    **overrides : config fields to replace (e.g. ``num_latents``, ``gradient_checkpointing``); fields
      that change tensor shapes make the strict load fail.

    Raises
    ------
    FileNotFoundError if the path or a needed file does not exist; ValueError for a malformed config or
    any missing / unexpected / mis-shaped key (all listed).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.is_dir():
        weights = path / ("ema.safetensors" if ema else "model.safetensors")
        config = path / "config.json"
    else:
        weights, config = path, path.parent / "config.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {weights.name} in the checkpoint directory")
    state_dict = read_state_dict(weights)
    if is_hunyuan_state_dict(state_dict):
        if ema:
            raise ValueError(f"{path}: Hunyuan3D checkpoints have no separate EMA weights")
        return load_hunyuan_vae(state_dict, **overrides)
    if not config.is_file():
        raise FileNotFoundError(f"{weights}: no config.json beside the weights, "
                                "and the keys are not Hunyuan3D's")
    try:
        obj = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config}: invalid JSON ({err})") from None
    cfg = vecset_config_from_dict(obj, source=str(config), **overrides)
    model = VecSetVAE(cfg)
    load_state_dict_strict(model, state_dict, source=str(weights))
    return model
