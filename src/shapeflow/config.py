"""Typed experiment configs: YAML files + dotted overrides -> frozen dataclasses, strictly checked.

An experiment file names a task and has one section per component::

    task: vecset_vae            # a key of shapeflow.train.tasks.TASKS
    out_dir: runs/vecset_tiny   # optional; default runs/<yaml stem>
    model: {preset: tiny, width: 128}   # the task's model config dataclass (+ optional preset)
    data: {root: data/prep}             # the task's data config dataclass
    train: {steps: 2000, lr: 3.0e-4}    # TrainConfig

Design choices:

* One frozen dataclass per component (:class:`TrainConfig` here; model and data configs live next to
  their model / task). An :class:`ExperimentConfig` bundles them with the task name and output dir.
* Strict at load time: an unknown key (with a "did you mean" hint), a wrong type, a missing required
  key or a bad ``Literal`` choice is a :class:`ConfigError` (a ``ValueError``) whose one-line message
  names the source (file or command-line override) and the dotted key, e.g.
  ``configs/x.yaml: model.widht: unknown key (did you mean width?)``.
* Supported field types: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``Optional[...]``,
  ``Literal[...]``, ``tuple[X, ...]``/``tuple[X, Y]``/``list[X]``, ``dict[str, X]``, nested
  dataclasses, and ``Any`` (passed through). ``bool`` is never accepted for ``int``/``float``.
* YAML is read with a loader that also parses ``3e-4`` as a float (plain YAML 1.1 reads it as a
  string). Overrides ``a.b=value`` parse ``value`` as YAML; for ``str`` fields the raw text is used, so
  ``model.name=123`` gives the string ``"123"``. ``null``/``~``/``None`` set an ``Optional`` to None.
* ``model.preset: NAME`` expands a preset first: preset < YAML fields < overrides. Presets come from
  the task (``Task.presets``), else a ``PRESETS`` mapping on the model config class, else the
  ``PRESETS`` dict of the model config's module. Entries are dicts of fields or config instances.
* The resolved config (preset expanded, every field explicit) is saved as JSON with every checkpoint
  (:func:`to_dict` / :func:`save_resolved`) and rebuilt from it (:func:`config_from_dict`); keys that
  an older file lacks take their defaults with a log line, never silently.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from shapeflow import fileio

log = logging.getLogger(__name__)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "from_dict",
    "to_dict",
    "save_resolved",
    "load_resolved",
    "parse_overrides",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line naming source and key."""


# =================================================================================================
# Components owned by the engine
# =================================================================================================


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, logging and checkpointing for :func:`shapeflow.train.loop.run`."""

    steps: int = 1000  # optimizer updates in total (not epochs: step-based runs resume exactly)
    batch_size: int = 32  # GLOBAL batch per update = per-rank micro-batch x world size x grad_accum
    grad_accum: int = 1  # micro-batches per update on each rank (memory knob; same math)
    lr: float = 1e-4  # peak learning rate after warm-up (Hunyuan3D/TRELLIS use 1e-4)
    min_lr: float = 1e-6  # floor of the cosine decay (3DShape2VecSet min_lr)
    warmup_steps: int = 100  # linear warm-up from lr/warmup_steps to lr
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon (torch.optim.Muon, lr matched to AdamW's
    #   update RMS) on the 2-D weights inside attention / MLP blocks, AdamW on everything else
    weight_decay: float = 0.01  # AdamW decoupled decay (Hunyuan3D 1e-2), matrices only
    decay_norms_and_biases: bool = False  # False: no weight decay on 1-D params and nn.Embedding
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas (Hunyuan3D-2.1, Step1X-3D)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float | None = 1.0  # max global grad norm; None = no clipping (norm still logged)
    ema: bool = True  # keep an exponential moving average of the weights (exported by default)
    ema_decay: float = 0.999  # 0.999 for short runs, 0.9999 for long ones
    ema_start: int = 0  # EMA copies the weights until this step, then averages
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + n) / (10 + n)), n = steps since ema_start
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and native-bf16 CPUs (AMX, AVX512-BF16)
    grad_checkpointing: bool = False  # trade compute for memory (model must support it)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda:LOCAL_RANK when available
    strategy: Literal["ddp", "fsdp"] = "ddp"  # multi-process wrapper; fsdp = FSDP2 fully_shard
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in a step
    ckpt_every: int = 1000  # checkpoint every N steps (0: only at the end); always at the end
    keep_last: int = 3  # checkpoints kept on disk (oldest removed first)
    log_every: int = 10  # steps between progress / TensorBoard / metrics.jsonl entries
    val_every: int = 1000  # steps between validations (0: only at the end); always at the end
    val_weights: Literal["ema", "model", "both"] = "both"  # which weights validation evaluates
    seed: int = 0  # model init uses seed on every rank; data/augmentation RNG is seeded per rank
    num_workers: int = 2  # DataLoader worker processes per rank
    export_weights: Literal["ema", "model"] = "ema"  # weights written to <out_dir>/final ("model" if ema off)

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {value}")
        for name in ("warmup_steps", "ckpt_every", "val_every", "ema_start", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr/min_lr: need 0 <= min_lr <= lr and lr > 0, "
                              f"got {self.lr}, {self.min_lr}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip: must be > 0 or null, got {self.grad_clip}")


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run: which task, its model and data configs, the engine settings, where to write."""

    task: str  # key of shapeflow.train.tasks.TASKS
    model: Any  # the task's model config dataclass instance
    data: Any  # the task's data config dataclass instance
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/default"  # checkpoints/, tb/, metrics.jsonl, final/
    objective: Any = None  # the task's objective config (loss weights, flow schedule), if it has one


# =================================================================================================
# YAML and overrides
# =================================================================================================


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4``/``3E+2`` (no dot) as floats, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class _Override:
    """A command-line value: the raw text (used for str fields) and its YAML parse (everything else)."""

    text: str
    value: Any


def parse_overrides(items: Sequence[str]) -> list[tuple[str, _Override, str]]:
    """Parse ``["a.b=1", ...]`` into ``(dotted_key, value, source)`` triples (raises ConfigError)."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}': expected key=value with a dotted key, e.g. train.lr=3e-4")
        out.append((key, _Override(text, _yaml_value(text)), f"override '{item}'"))
    return out


# =================================================================================================
# Typed conversion
# =================================================================================================


class _Sources:
    """Where each dotted key came from, for error messages (default: the YAML file)."""

    def __init__(self, default: str, by_key: Mapping[str, str] | None = None):
        self.default = default
        self.by_key = dict(by_key or {})

    def of(self, key: str) -> str:
        # the longest prefix that has an explicit source (an override of a whole section counts)
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            src = self.by_key.get(".".join(parts[:n]))
            if src is not None:
                return src
        return self.default

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.of(key)}: {key}: {problem}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_none_text(value: Any) -> bool:
    return isinstance(value, _Override) and value.text.strip() in ("None", "null", "~", "")


def _convert(value: Any, tp: Any, key: str, src: _Sources) -> Any:
    """Return ``value`` checked / converted to the annotation ``tp`` (tuples from lists, etc.)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value.value if isinstance(value, _Override) else value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or _is_none_text(value)):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _convert(value, options[0], key, src)
        for arg in options:
            try:
                return _convert(value, arg, key, src)
            except ConfigError:
                pass
        raw = value.value if isinstance(value, _Override) else value
        raise src.error(key, f"expected {_type_name(tp)}, got {raw!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        raw = value.text if isinstance(value, _Override) and all(isinstance(c, str) for c in choices) else (
            value.value if isinstance(value, _Override) else value)
        if raw not in choices:
            raise src.error(key, f"{raw!r} is not one of {', '.join(repr(c) for c in choices)}")
        return raw
    if dataclasses.is_dataclass(tp):
        raw = value.value if isinstance(value, _Override) else value
        if dataclasses.is_dataclass(raw) and isinstance(raw, tp):
            return raw
        if not isinstance(raw, Mapping):
            raise src.error(key, f"expected a mapping for {tp.__name__}, got {raw!r}")
        return _build(tp, raw, key, src)
    if tp is str:
        if isinstance(value, _Override):
            return value.text
        if not isinstance(value, str):
            raise src.error(key, f"expected str, got {type(value).__name__} {value!r}")
        return value
    raw = value.value if isinstance(value, _Override) else value
    if tp is bool:
        if not isinstance(raw, bool):
            raise src.error(key, f"expected bool (true/false), got {raw!r}")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise src.error(key, f"expected int, got {type(raw).__name__} {raw!r}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise src.error(key, f"expected float, got {type(raw).__name__} {raw!r}")
        return float(raw)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(raw, (list, tuple)):
            raise src.error(key, f"expected a list for {_type_name(tp)}, got {raw!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(raw) != len(args):
                raise src.error(key, f"expected {len(args)} items for {_type_name(tp)}, got {len(raw)}")
            items = [_convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(raw, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]", src) for i, v in enumerate(raw)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(raw, Mapping):
            raise src.error(key, f"expected a mapping, got {raw!r}")
        args = typing.get_args(tp)
        val_tp = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                raise src.error(key, f"mapping keys must be strings, got {k!r}")
            out[k] = _convert(v, val_tp, f"{key}.{k}", src)
        return out
    raise src.error(key, f"unsupported field type {_type_name(tp)} in config class")


def _build(cls: type, data: Mapping[str, Any], prefix: str, src: _Sources, note_missing: bool = False):
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:  # a forward reference the config class's module cannot resolve
        raise ConfigError(f"{cls.__qualname__}: cannot resolve field types ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise src.error(key, f"unknown key{hint}")
        kwargs[name] = _convert(value, hints[name], key, src)
    for name, f in fields.items():
        if name in kwargs:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise src.error(key, "missing required key")
        if note_missing:
            log.info("%s: %s missing; using the default %r", src.default, key,
                     f.default if f.default is not dataclasses.MISSING else f.default_factory())
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ checks already name the key
        raise ConfigError(f"{src.of(prefix)}: {e}") from None
    except (TypeError, ValueError) as e:
        raise src.error(prefix or cls.__name__, str(e)) from None


def from_dict(cls: type, data: Mapping[str, Any], source: str = "<dict>", prefix: str = "") -> Any:
    """Strictly build dataclass ``cls`` from a plain mapping (e.g. a ``config.json`` section).

    Lists become tuples where the field is a tuple; unknown keys / wrong types raise
    :class:`ConfigError` naming ``source`` and the dotted key (prefixed by ``prefix``, e.g. "model").
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or cls.__name__}: expected a mapping, got {data!r}")
    return _build(cls, data, prefix, _Sources(source))


def to_dict(cfg: Any) -> Any:
    """A JSON-ready nested dict of a (nested) dataclass config; tuples become lists.

    Only ``init`` fields are written (derived ``field(init=False)`` values are recomputed on load).
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# =================================================================================================
# Experiment configs
# =================================================================================================

_TOP_KEYS = ("task", "model", "data", "objective", "train", "out_dir")


def _preset_table(task) -> Mapping[str, Any] | None:
    if task.presets is not None:
        return task.presets
    import sys

    own = getattr(task.model_config, "PRESETS", None)  # e.g. a ClassVar on the config class
    if isinstance(own, Mapping):
        return own
    return getattr(sys.modules.get(task.model_config.__module__), "PRESETS", None)


def _preset_fields(value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"preset entries must be dicts or config instances, got {type(value).__name__}")


def _resolve(raw: Mapping[str, Any], src: _Sources, note_missing: bool = False) -> ExperimentConfig:
    from shapeflow.train.tasks import TASKS  # late import: tasks import this module

    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(_TOP_KEYS)})"
            raise src.error(str(key), f"unknown key{hint}")
    if "task" not in raw:
        raise src.error("task", f"missing required key (one of: {', '.join(sorted(TASKS))})")
    task_name = _convert(raw["task"], str, "task", src)
    if task_name not in TASKS:
        raise src.error("task", f"unknown task {task_name!r} (known: {', '.join(sorted(TASKS))})")
    task = TASKS[task_name]

    model_raw = _section(raw, "model", src)
    preset = model_raw.pop("preset", None)
    if preset is not None:
        preset = _convert(preset, str, "model.preset", src)
        table = _preset_table(task) or {}
        if preset not in table:
            known = ", ".join(table) if table else "none defined"
            raise src.error("model.preset",
                            f"unknown preset {preset!r} for task {task_name} (known: {known})")
        base = _preset_fields(table[preset])
        for k in base:
            if k not in model_raw:
                src.by_key.setdefault(f"model.{k}", f"{src.of('model.preset')} (preset {preset!r})")
        model_raw = {**base, **model_raw}
        if "preset" in {f.name for f in dataclasses.fields(task.model_config)}:
            model_raw["preset"] = preset  # the model config records its preset name itself

    model = _build(task.model_config, model_raw, "model", src, note_missing)
    data = _build(task.data_config, _section(raw, "data", src), "data", src, note_missing)
    train = _build(TrainConfig, _section(raw, "train", src), "train", src, note_missing)
    objective_raw = _section(raw, "objective", src)
    if task.objective_config is None:
        if objective_raw:
            raise src.error("objective", f"task {task_name} has no objective settings")
        objective = None
    else:
        objective = _build(task.objective_config, objective_raw, "objective", src, note_missing)
    out_dir = _convert(raw["out_dir"], str, "out_dir", src) if "out_dir" in raw else "runs/default"
    return ExperimentConfig(task=task_name, model=model, data=data, train=train, out_dir=out_dir,
                            objective=objective)


def _section(raw: Mapping[str, Any], name: str, src: _Sources) -> dict[str, Any]:
    value = raw.get(name)
    value = value.value if isinstance(value, _Override) else value
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise src.error(name, f"expected a mapping, got {value!r}")
    return dict(value)


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, _Override) and isinstance(child.value, Mapping):
            child = node[part] = dict(child.value)
        elif not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML file, apply ``key=value`` overrides, and check everything.

    Parameters
    ----------
    path : YAML file with top-level keys ``task``, ``model``, ``data``, ``train``, ``out_dir``.
        ``out_dir`` defaults to ``runs/<file stem>``.
    overrides : dotted ``key=value`` strings applied after the file (and after a model preset).

    Raises
    ------
    FileNotFoundError if the file is missing; ConfigError (ValueError) with a one-line message for
    YAML syntax errors, unknown keys, wrong types, unknown tasks or presets.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    raw.setdefault("out_dir", str(Path("runs") / path.stem))
    src = _Sources(str(path))
    for key, value, source in parse_overrides(overrides):
        _set_dotted(raw, key, value, source)
        src.by_key[key] = source
    return _resolve(raw, src)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Rebuild an :class:`ExperimentConfig` from :func:`to_dict` output (e.g. a checkpoint's config.json).

    Keys missing from ``data`` (older files) take their defaults with an INFO log line.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return _resolve(dict(data), _Sources(source), note_missing=True)


def save_resolved(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the fully resolved config as JSON (atomically); the model config is under ``"model"``."""
    fileio.write_json(path, to_dict(cfg))


def load_resolved(path: str | Path) -> ExperimentConfig:
    """Read a ``config.json`` written by :func:`save_resolved` (strict, like YAML loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    return config_from_dict(data, str(path))
