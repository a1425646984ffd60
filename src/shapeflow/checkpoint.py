"""THE checkpoint format: a model family ``kind`` + its config + safetensors weights, and training runs.

A model directory (what ``save_pretrained`` writes, and every training checkpoint)::

    config.json         {"kind": "vecset_vae", "model": {...every config field...}, ...}
    model.safetensors   the weights, keys = model.state_dict(), float32

``kind`` names the model family: a key of :data:`shapeflow.models.MODELS`, the one registry
``{kind: (ConfigClass, ModelClass)}``. Training checkpoints write the resolved experiment config
(``task``, ``data``, ``train``, ``objective``, ``out_dir`` besides ``kind`` and ``model``); inference reads
only ``kind`` and ``model``. Files of older shapeflow versions name the family by ``task`` instead.

A training run (:mod:`shapeflow.train.loop`)::

    <out_dir>/checkpoints/step_00001000/
        model.safetensors   # the trained weights (full, unsharded, fp32), keys = model.state_dict()
        ema.safetensors     # EMA of the weights (when train.ema), same keys
        config.json         # the resolved experiment config (above)
        state.pt            # optimizer (parameter-name keyed), step, RNG states of every rank,
                            # data position; loadable with torch.load(weights_only=True)
    <out_dir>/checkpoints/latest         # text: "step_00001000", written last
    <out_dir>/final/{config.json, model.safetensors}   # inference export (EMA weights by default)

Design choices:

* Every model family loads and saves through :class:`Pretrained` (``from_pretrained`` / ``save_pretrained``):
  the config is rebuilt with :func:`shapeflow.config.build` (strict; a ``preset`` key expands; fields an
  older file lacks take their defaults with a log line; renamed fields are patched explicitly by the
  family's ``upgrade_config``), and the weights load strictly.
* Public weights of other projects (Hunyuan3D, TRELLIS) are recognised by a family's ``releases``: small
  converters (:mod:`shapeflow.models.pretrained`) that turn the released files into this format's two
  halves, a config dict and a state dict in shapeflow's names and conventions. Nothing else differs.
* Atomic: a training checkpoint is written into ``checkpoints/.tmp-step_XXXXXXXX-<pid>/`` and renamed
  onto the final name in one ``os.rename``; the ``latest`` pointer is replaced atomically afterwards. A
  killed writer leaves at most a ``.tmp-*`` folder (removed by :func:`clean_stale`), never a partial
  ``step_*`` folder, and ``latest`` always names a complete checkpoint. ``save_pretrained`` writes each
  file atomically.
* Only rank 0 writes; callers gather full (unsharded) state dicts first.
* Weights never load non-strictly: a missing, unexpected or mis-shaped key is a :class:`CheckpointError`
  listing them, in the source file's own key names for converted releases.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shapeflow import fileio
from shapeflow.config import build, preset, to_dict

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model (one-line message)."""


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``step_*`` directories under ``<out_dir>/checkpoints``, sorted by step."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points to, or None when the run has none."""
    root = checkpoints_dir(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if not (path / "state.pt").is_file():
            raise CheckpointError(f"{pointer}: points to {path.name}, which is missing or incomplete")
        return path
    existing = list_checkpoints(out_dir)
    if existing:  # pointer lost (e.g. deleted by hand): fall back to the highest complete step
        log.warning("%s missing; using %s", pointer, existing[-1][1].name)
        return existing[-1][1]
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint dir, a ``final/`` dir, a run's ``out_dir`` or its ``checkpoints/`` dir."""
    path = Path(path)
    weights = ("model.safetensors", "ema.safetensors")
    if (path / "config.json").is_file() and any((path / f).is_file() for f in weights):
        return path
    for out_dir in (path, path.parent if path.name == CHECKPOINTS else None):
        if out_dir is not None and checkpoints_dir(out_dir).is_dir():
            found = latest_checkpoint(out_dir)
            if found is not None:
                return found
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    raise CheckpointError(f"{path}: not a checkpoint (expected config.json + model.safetensors, "
                          f"or a run directory with {CHECKPOINTS}/{LATEST})")


def model_dir(path: str | os.PathLike) -> Path:
    """The directory an inference load reads: a run's exported ``final/`` when it exists, else
    :func:`resolve_checkpoint` (a model or step directory, a run's latest checkpoint); a
    ``model.safetensors`` / ``ema.safetensors`` file stands for its directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        path = path.parent
    if (path / FINAL / "config.json").is_file():
        path = path / FINAL
    return resolve_checkpoint(path)


def clean_stale(out_dir: str | os.PathLike) -> None:
    """Remove ``.tmp-*`` / ``.trash-*`` folders left by a writer that was killed."""
    for root in (checkpoints_dir(out_dir), Path(out_dir)):
        if root.is_dir():
            for p in root.iterdir():
                if p.is_dir() and (p.name.startswith(".tmp-") or p.name.startswith(".trash-")):
                    log.info("removing stale %s", p)
                    shutil.rmtree(p, ignore_errors=True)


# -------------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------------


def save_safetensors(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Atomically write a state dict (CPU, contiguous; tied tensors are written once per name)."""
    seen: set[int] = set()
    tensors = {}
    for k, v in state.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:  # safetensors refuses tensors that share memory (tied weights)
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    with fileio.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is moved aside first, then deleted."""
    trash = None
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_dir(final: Path, write) -> Path:
    """Build a directory atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``final``."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        _fsync_dir(tmp)
        _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    config: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None,
    train_state: Mapping[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``<out_dir>/checkpoints/step_<step>/`` atomically, point ``latest`` at it, prune old ones.

    Parameters
    ----------
    config : the resolved experiment config as a dict (:func:`shapeflow.config.to_dict`).
    model_state, ema_state : full CPU state dicts (``ema_state`` None when EMA is off).
    train_state : picklable dict for ``state.pt`` (optimizer, step, RNG, data position).
    keep_last : number of ``step_*`` directories to keep (the newest; ``latest`` is never removed).
    """
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dirname(step)
    meta = {"format": "pt", "step": str(step)}

    def write(tmp: Path) -> None:
        save_safetensors(tmp / "model.safetensors", model_state, meta)
        if ema_state is not None:
            save_safetensors(tmp / "ema.safetensors", ema_state, meta)
        fileio.write_json(tmp / "config.json", dict(config))
        with fileio.atomic_path(tmp / "state.pt") as p:
            torch.save(dict(train_state), p)

    write_dir(final, write)
    fileio.write_text(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def export_final(out_dir: str | os.PathLike, ckpt: str | os.PathLike,
                 which: Literal["ema", "model"] = "ema",
                 transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> Path:
    """Copy a checkpoint's ``config.json`` and chosen weights to ``<out_dir>/final/`` (atomically).

    The weights are written as ``final/model.safetensors`` whichever set was chosen, so inference code
    only ever reads ``model.safetensors``. ``transform`` rewrites the state dict on the way (e.g. merging
    LoRA adapters into the weights).
    """
    ckpt = resolve_checkpoint(ckpt)
    src = ckpt / f"{which}.safetensors"
    if not src.is_file():
        raise CheckpointError(f"{ckpt}: has no {which}.safetensors")

    def write(tmp: Path) -> None:
        shutil.copyfile(ckpt / "config.json", tmp / "config.json")
        if transform is None:
            shutil.copyfile(src, tmp / "model.safetensors")
        else:
            save_safetensors(tmp / "model.safetensors", transform(load_file(str(src))))
        for f in ("config.json", "model.safetensors"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())

    return write_dir(Path(out_dir) / FINAL, write)


# -------------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` dict of a checkpoint (see :func:`shapeflow.config.config_from_dict`)."""
    file = resolve_checkpoint(path) / "config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from None


def read_weights(path: str | os.PathLike,
                 which: Literal["ema", "model"] = "model") -> dict[str, torch.Tensor]:
    """The state dict in ``<ckpt>/<which>.safetensors`` (CPU tensors)."""
    file = resolve_checkpoint(path) / f"{which}.safetensors"
    if not file.is_file():
        hint = " (trained with train.ema=false?)" if which == "ema" else ""
        raise CheckpointError(f"{file}: not found{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from None


def check_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                     source: str, *, names: Mapping[str, str] | None = None) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected keys and shape mismatches.

    ``names`` maps keys of ``got`` back to the names they had in the source file (converted foreign
    checkpoints), so the message speaks the file's language.
    """
    names = names or {}
    missing = sorted(names.get(k, k) for k in set(expected) - set(got))
    unexpected = sorted(names.get(k, k) for k in set(got) - set(expected))
    shapes = [f"{names.get(k, k)} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return

    def fmt(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10} more)" if len(keys) > 10 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {fmt(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {fmt(shapes)}")
    raise CheckpointError(f"{source}: weights do not match the model; " + "; ".join(parts))


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                           names: Mapping[str, str] | None = None) -> None:
    """Copy ``state`` into ``module`` (cast to its dtypes, e.g. fp16 release files), or raise
    :class:`CheckpointError` listing every mismatch (:func:`check_state_dict`); nothing is loaded then."""
    own = module.state_dict()
    check_state_dict(own, state, source, names=names)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_weights(path: str | os.PathLike, model: nn.Module, which: Literal["ema", "model"] = "ema") -> Path:
    """Load ``<which>.safetensors`` of a checkpoint into ``model`` strictly; returns the file read.

    ``path`` may be a checkpoint dir, an inference export such as ``final/`` (only ``model.safetensors``,
    which already holds the exported weights: ``which`` is then ignored) or a run directory (its latest
    checkpoint).
    """
    ckpt = resolve_checkpoint(path)
    is_export = not (ckpt / "state.pt").is_file()
    if which == "ema" and is_export and not (ckpt / "ema.safetensors").is_file():
        which = "model"
    state = read_weights(ckpt, which)
    file = ckpt / f"{which}.safetensors"
    load_state_dict_strict(model, state, source=str(file))
    return file


def load_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """``state.pt`` of a checkpoint (loaded with ``weights_only=True``)."""
    file = resolve_checkpoint(path) / "state.pt"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (an inference export has no training state)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or foreign pickle content: one line, not a pickle traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{file}: cannot read training state: {first}") from None


# -------------------------------------------------------------------------------------------------
# models: kind + config + weights
# -------------------------------------------------------------------------------------------------


def model_kind(raw: Mapping[str, Any]) -> str | None:
    """The model family a ``config.json`` names: ``"kind"``, or ``"task"`` in files of older versions."""
    kind = raw.get("kind", raw.get("task"))
    return kind if isinstance(kind, str) else None


def read_model_kind(path: str | os.PathLike) -> str:
    """The ``kind`` of the model checkpoint at ``path`` (see :func:`model_dir`); an error when it has none."""
    ckpt = model_dir(path)
    kind = model_kind(read_config(ckpt))
    if kind is None:
        raise CheckpointError(f"{ckpt / 'config.json'}: names no model kind")
    return kind


def write_model(directory: str | os.PathLike, kind: str, config: Any, state: Mapping[str, torch.Tensor]) -> Path:
    """Write ``directory/config.json`` (``{"kind", "model"}``) and ``directory/model.safetensors``, each atomically."""
    directory = Path(directory)
    save_safetensors(directory / "model.safetensors", state)
    fileio.write_json(directory / "config.json", {"kind": kind, "model": to_dict(config)})
    return directory


@dataclass
class Release:
    """Public weights of another project, converted: a config dict and a state dict in shapeflow's terms."""

    config: dict[str, Any]  # fields of the family's config class
    state: dict[str, torch.Tensor]  # shapeflow key names, shapeflow conventions (sign, time direction)
    source: str  # the file(s) read, for messages
    names: dict[str, str] = field(default_factory=dict)  # shapeflow key -> the key in the released file


@dataclass(frozen=True)
class ReleaseFormat:
    """How to recognise and convert one released layout (a converter in :mod:`shapeflow.models.pretrained`)."""

    name: str  # e.g. "Hunyuan3D ShapeVAE"
    detect: Callable[[Path], bool]  # does this path hold the release? (cheap: file names, a config read)
    convert: Callable[..., Release]  # path -> Release; raises FileNotFoundError / ValueError with one line


class Pretrained:
    """Checkpoint I/O shared by every model family (mixed into the ``nn.Module`` of each family).

    A family sets ``kind`` (its key in :data:`shapeflow.models.MODELS`), ``config_class`` and, for public
    weights, ``releases``; its ``__init__`` takes one config and stores it as ``self.config``.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type]
    releases: ClassVar[tuple[ReleaseFormat, ...]] = ()
    config: Any

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """A freshly initialised model of preset ``name`` (``config_class.PRESETS``) with field ``overrides``."""
        return cls(preset(cls.config_class, name, **overrides))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (:func:`write_model`)."""
        return write_model(directory, self.kind, self.config, self.state_dict())

    @classmethod
    def upgrade_config(cls, fields: dict[str, Any], raw: Mapping[str, Any], source: str) -> dict[str, Any]:
        """Patch the model fields of a ``config.json`` written by an older version (renamed or moved
        fields), logging each change. ``raw`` is the whole file. The default changes nothing."""
        return fields

    @classmethod
    def config_from_checkpoint(cls, raw: Mapping[str, Any], *, source: str, **overrides: Any) -> Any:
        """The config of a ``config.json`` (its ``"model"`` section), strictly, with field ``overrides``."""
        kind = model_kind(raw)
        if kind is not None and kind != cls.kind:
            raise CheckpointError(f"{source}: holds a {kind} model, not a {cls.kind}")
        fields = raw.get("model")
        if not isinstance(fields, Mapping):
            raise CheckpointError(f"{source}: no \"model\" section with the {cls.kind} config")
        fields = cls.upgrade_config(dict(fields), raw, source)
        return build(cls.config_class, {**fields, **overrides}, source=source, prefix="model", note_missing=True)

    @classmethod
    def from_release(cls, release: Release, **overrides: Any):
        """The model of a converted public release, strictly loaded, in eval mode."""
        config = build(cls.config_class, {**release.config, **overrides}, source=release.source, prefix="model")
        model = cls(config)
        load_state_dict_strict(model, release.state, source=release.source, names=release.names)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, ema: bool = False, **overrides: Any):
        """Load a checkpoint of this family, strictly, in eval mode.

        Parameters
        ----------
        path : a model directory (``config.json`` + ``model.safetensors``), a run directory (its ``final/``
            export, else its latest checkpoint), a step directory, or a public release this family
            converts (``cls.releases``, e.g. a Hunyuan3D ShapeVAE folder).
        ema : read ``ema.safetensors`` of a training checkpoint (a ``final/`` export already holds the
            exported weights in ``model.safetensors``).
        **overrides : config fields to replace (e.g. ``grad_checkpointing``); fields that change tensor
            shapes make the strict load fail.

        Raises
        ------
        FileNotFoundError for a missing path; ``ValueError`` (``CheckpointError`` / ``ConfigError``) for a
        malformed config or missing / unexpected / mis-shaped keys (all listed).
        """
        path = Path(path)
        for release in cls.releases:
            if release.detect(path):
                if ema:
                    raise CheckpointError(f"{path}: a {release.name} release has no separate EMA weights")
                model = cls.from_release(release.convert(path), **overrides)
                log.info("loaded %s from %s", release.name, path)
                return model
        ckpt = model_dir(path)
        config = cls.config_from_checkpoint(read_config(ckpt), source=str(ckpt / "config.json"), **overrides)
        model = cls(config)
        exported = not (ckpt / "state.pt").is_file() and not (ckpt / "ema.safetensors").is_file()
        which = "ema" if ema and not exported else "model"
        load_state_dict_strict(model, read_weights(ckpt, which), source=str(ckpt / f"{which}.safetensors"))
        return model.eval()
