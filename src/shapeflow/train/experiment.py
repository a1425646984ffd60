"""Experiment files: one YAML per training run -> an :class:`ExperimentConfig` of typed sections.

An experiment file names a task and has one section per component::

    task: vecset_vae            # a key of shapeflow.train.tasks.TASKS
    out_dir: runs/vecset_tiny   # optional; default runs/<yaml stem>
    model: {preset: tiny, width: 128}   # the task's model config (a preset expands first)
    data: {root: data/prep}             # the task's data config
    objective: {kl_weight: 1.0e-3}      # the task's loss settings, if it has any
    train: {steps: 2000, lr: 3.0e-4}    # TrainConfig

Every section is built by :func:`shapeflow.config.build` (strict: unknown keys, wrong types and bad
presets are one-line errors naming the file or override and the dotted key). The resolved config (presets
expanded, every field explicit) is saved as ``config.json`` with every checkpoint, together with
``"kind"``, the model family of :data:`shapeflow.models.MODELS` the run trains, so an inference load
needs nothing else (:mod:`shapeflow.checkpoint`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from shapeflow import fileio
from shapeflow.config import ConfigError, Sources, apply_overrides, build, convert, read_yaml, section, to_dict
from shapeflow.train.lora import DEFAULT_TARGETS
from shapeflow.train.tasks import TASKS

__all__ = ["TrainConfig", "ExperimentConfig", "load_config", "config_from_dict", "save_resolved",
           "load_resolved", "resolved_dict"]


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
    lora_rank: int = 0  # > 0: freeze the model, train LoRA adapters of this rank (shapeflow.train.lora)
    lora_alpha: float = 0.0  # adapter scale alpha / rank (0: alpha = rank)
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS  # last name component of the adapted linear layers

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {value}")
        for name in ("warmup_steps", "ckpt_every", "val_every", "ema_start", "num_workers", "seed", "lora_rank"):
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


_TOP_KEYS = ("task", "kind", "model", "data", "objective", "train", "out_dir")


def _resolve(raw: Mapping[str, Any], src: Sources, note_missing: bool = False) -> ExperimentConfig:
    for key in raw:
        if key not in _TOP_KEYS:
            close = difflib.get_close_matches(str(key), _TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(_TOP_KEYS)})"
            raise src.error(str(key), f"unknown key{hint}")
    if "task" not in raw:
        raise src.error("task", f"missing required key (one of: {', '.join(sorted(TASKS))})")
    task_name = convert(raw["task"], str, "task", src)
    if task_name not in TASKS:
        raise src.error("task", f"unknown task {task_name!r} (known: {', '.join(sorted(TASKS))})")
    task = TASKS[task_name]
    if "kind" in raw and convert(raw["kind"], str, "kind", src) != task.kind:
        raise src.error("kind", f"is {raw['kind']!r}, but task {task_name} trains {task.kind!r}")

    def part(cls: type, name: str) -> Any:
        return build(cls, section(raw, name, src), source=src, prefix=name, note_missing=note_missing)

    objective_raw = section(raw, "objective", src)
    if task.objective_config is None and objective_raw:
        raise src.error("objective", f"task {task_name} has no objective settings")
    return ExperimentConfig(
        task=task_name, model=part(task.model_config, "model"), data=part(task.data_config, "data"),
        train=part(TrainConfig, "train"),
        out_dir=convert(raw["out_dir"], str, "out_dir", src) if "out_dir" in raw else "runs/default",
        objective=None if task.objective_config is None else part(task.objective_config, "objective"))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML file, apply ``key=value`` overrides, and check everything.

    Parameters
    ----------
    path : YAML file with top-level keys ``task``, ``model``, ``data``, ``objective``, ``train``,
        ``out_dir``. ``out_dir`` defaults to ``runs/<file stem>``.
    overrides : dotted ``key=value`` strings applied after the file (and after a model preset).

    Raises
    ------
    FileNotFoundError if the file is missing; ConfigError (ValueError) with a one-line message for
    YAML syntax errors, unknown keys, wrong types, unknown tasks or presets.
    """
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("out_dir", str(Path("runs") / path.stem))
    src = Sources(str(path))
    apply_overrides(raw, overrides, src)
    return _resolve(raw, src)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Rebuild an :class:`ExperimentConfig` from :func:`resolved_dict` output (a checkpoint's config.json).

    Keys missing from ``data`` (older files) take their defaults with an INFO log line.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return _resolve(dict(data), Sources(source), note_missing=True)


def resolved_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The JSON form saved with checkpoints: every field explicit, plus the model ``kind`` it trains."""
    out = to_dict(cfg)
    kind = TASKS[cfg.task].kind
    return {"kind": kind, **out} if kind is not None else out


def save_resolved(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write :func:`resolved_dict` as JSON (atomically)."""
    fileio.write_json(path, resolved_dict(cfg))


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
