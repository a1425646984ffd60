"""The one training loop shared by every model family; a model plugs in as a :class:`.tasks.Task`.

Command lines::

    # CPU (tiny configs; fp32)
    shapeflow train configs/toy.yaml train.steps=200 --out runs/toy

    # one GPU (bf16 autocast is the default on CUDA)
    shapeflow train configs/vecset_vae_base.yaml --out runs/vae_base
    shapeflow train configs/vecset_vae_base.yaml --out runs/vae_base --resume     # after a stop / preemption

    # several GPUs / nodes (DDP; train.batch_size is the GLOBAL batch)
    torchrun --nproc_per_node=8 -m shapeflow train configs/token_dit_base.yaml --out runs/dit_base
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m shapeflow train configs/token_dit_large.yaml --out runs/dit_large --resume

Design choices:

* Step-based: ``train.steps`` optimizer updates; each consumes one global batch of
  ``train.batch_size`` samples = per-rank micro-batch x world size x ``train.grad_accum``.
* Data order is a function of (seed, step) only: epoch ``e`` is ``default_rng([seed, e])``'s
  permutation, global batch ``k`` of the epoch is its slice ``[k*B, (k+1)*B)`` (the incomplete tail is
  dropped), and rank ``r`` takes the ``r``-th contiguous part. The same global batches therefore reach
  the optimizer for any world size, and ``--resume`` at step ``s`` restarts at batch ``s``. RNGs are
  seeded from (seed, epoch, index) around each ``__getitem__`` so per-item augmentation is reproducible
  too; the main-process RNG states of every rank are saved with each checkpoint and restored.
  Result: on CPU a resumed run is bitwise identical to an uninterrupted one, and 2 processes match 1
  process up to float summation order.
* Loss: the task returns the mean over its micro-batch; gradients are averaged over micro-batches
  (loss / grad_accum) and ranks (DDP/FSDP all-reduce), i.e. the global-batch mean.
* AdamW with decoupled weight decay on matrices only (not on 1-D params / embeddings, unless
  ``train.decay_norms_and_biases``), linear warm-up then cosine decay to ``min_lr`` computed from the
  step (stateless, so resume cannot drift), global-norm gradient clipping, EMA (:mod:`.ema`).
  ``train.optimizer: muon`` hands the 2-D weights inside attention / MLP blocks to
  :class:`torch.optim.Muon` (:class:`.muon.BatchedMuon`: the same update, batched over same-shape
  matrices; orthogonalised Nesterov momentum, update RMS matched to AdamW's so
  ``train.lr`` keeps its meaning) and the rest (embeddings, input / output projections, norms, biases) to
  AdamW (BENCHMARKS.md compares the two). DDP only (FSDP shards the matrices Muon orthogonalises).
* Precision: fp32 master weights; ``precision: auto`` is bf16 autocast on CUDA and on CPUs with native
  bf16 matmuls (AMX tile units on Intel Sapphire Rapids and later, AVX512-BF16 on AMD Zen 4 / Zen 5),
  fp32 on other CPUs (where bf16 is emulated and slower than float32); no grad scaler (bf16 has fp32's
  range). Attention runs in float32 on the CPU (:func:`shapeflow.nn.attention.sdpa`).
* Phases: :func:`run` finds the resume point (:func:`_resume_point`), builds the run (:func:`_build`),
  then per step updates (:func:`_step`), logs, validates and saves when due (:func:`_train`), and exports
  ``final/`` (:func:`_export`).
* Host reads: the loss terms stay on the device, summed over the log interval, and are read once per
  log step. The one per-step read is a bool: NaN/inf in the loss terms (averaged over ranks) or the
  gradient norm, checked before the update; then every rank raises :class:`NonFiniteLossError` naming the
  step and the terms, nothing is updated or saved, and the last good checkpoint stays ``latest``.
* Multi-process: ``torchrun`` environment only (:mod:`.dist`). ``strategy: ddp`` wraps in
  DistributedDataParallel; ``strategy: fsdp`` applies FSDP2 ``fully_shard`` to every element of every
  ``nn.ModuleList`` (the transformer blocks) and then to the root. Checkpoints always hold full
  (unsharded) state dicts written by rank 0, so any strategy / world size can resume them.
* Validation: every rank evaluates a contiguous shard of the validation set with a plain module (under
  FSDP an unsharded replica), metrics averaged weighted by shard size; with EMA the averaged weights
  are evaluated too (``val_ema/*``). Validation does not consume training RNG.
* Logs: tqdm bar (rank 0) with loss and samples/s, TensorBoard scalars in ``<out_dir>/tb`` when
  tensorboard is installed, and ``<out_dir>/metrics.jsonl`` (one JSON object per log step/validation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from shapeflow import checkpoint as ckpt_lib
from shapeflow import fileio
from shapeflow.train import dist, lora
from shapeflow.train.ema import EMA, DTensor, unwrap
from shapeflow.train.experiment import ExperimentConfig, TrainConfig, resolved_dict, save_resolved
from shapeflow.train.task import Task
from shapeflow.train.tasks import TASKS

log = logging.getLogger(__name__)

__all__ = ["run", "measure_step_time", "lr_at", "NonFiniteLossError", "GlobalBatchSampler"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the update was not applied and nothing was saved."""


# =================================================================================================
# schedule, optimizer
# =================================================================================================


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16
    dot products (AMD Zen 4 / Zen 5, Intel Cooper Lake). Elsewhere bf16 is emulated and slower than float32."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):  # private torch APIs: absence means "don't know" -> no
            continue
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast? ``"bf16"``: yes; ``"fp32"``: no; ``"auto"``: on CUDA and on CPUs with native bf16."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def _is_block_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a block, attention or MLP (what ``train.optimizer=muon`` hands to Muon)."""
    return p.ndim == 2 and name.endswith(".weight") and any(s in name for s in ("blocks.", ".attn.", ".mlp."))


class CombinedOptimizer:
    """Several optimizers stepped as one, with one ``state_dict`` indexed like a single optimizer.

    ``param_groups`` lists every member's groups (the same dicts, so setting ``lr`` on them reaches the
    members); the state dict numbers parameters in that order, so checkpoints key it by parameter name
    exactly as for a single optimizer.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({offset + i: v for i, v in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups, offset = list(sd["param_groups"]), 0
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, expected "
                             f"{len(self.param_groups)} (was it saved with another train.optimizer?)")
        for o in self.optimizers:
            mine, groups = groups[:len(o.param_groups)], groups[len(o.param_groups):]
            n = sum(len(g["params"]) for g in o.param_groups)
            state = {i - offset: v for i, v in sd["state"].items() if offset <= i < offset + n}
            mine = [{**g, "params": [i - offset for i in g["params"]]} for g in mine]
            o.load_state_dict({"state": state, "param_groups": mine})
            offset += n


def _optimizer(model: nn.Module,
               cfg: TrainConfig) -> tuple[torch.optim.Optimizer | CombinedOptimizer, list[str]]:
    """The optimizer and the parameter names in its order.

    ``adamw``: AdamW with weight decay on matrices only. ``muon``: additionally, the 2-D weights inside
    attention / MLP blocks go to Muon (:class:`.muon.BatchedMuon`; orthogonalised momentum, Nesterov, momentum
    0.95; ``adjust_lr_fn="match_rms_adamw"`` scales its update to AdamW's RMS, so ``train.lr`` means the
    same for both); embeddings, input / output projections, norms and biases stay on AdamW.
    """
    if cfg.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise ValueError(f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                         f"{torch.__version__}: upgrade torch or set train.optimizer=adamw")
    m = unwrap(model)
    embeddings = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Embedding)}
    matrices, decay, no_decay = [], [], []
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and _is_block_matrix(name, p) and id(p) not in embeddings:
            matrices.append((name, p))
            continue
        use_decay = cfg.decay_norms_and_biases or (p.ndim >= 2 and id(p) not in embeddings)
        (decay if use_decay else no_decay).append((name, p))
    groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    if not matrices:
        return opt, names
    from shapeflow.train.muon import BatchedMuon  # lazy: subclasses torch.optim.Muon, torch >= 2.9 only

    muon = BatchedMuon([p for _, p in matrices], lr=cfg.lr, weight_decay=cfg.weight_decay,
                       momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    return CombinedOptimizer([muon, opt]), [n for n, _ in matrices] + names


def _optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, names: list[str],
                     fsdp: bool) -> dict | None:
    """Full optimizer state keyed by parameter name (collective under FSDP; None off rank 0)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # lazy: FSDP

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(model, opt, options=options)
        return sd if dist.is_main_process() else None
    if not dist.is_main_process():
        return None
    sd = opt.state_dict()
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, names: list[str], sd: dict,
                          fsdp: bool) -> None:
    saved = [n for g in sd["param_groups"] for n in g["params"]]
    if sorted(saved) != sorted(names):
        missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise ckpt_lib.CheckpointError(f"optimizer state does not match the model: missing {missing[:8]}, "
                                       f"unexpected {unexpected[:8]}")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # lazy: FSDP

        set_optimizer_state_dict(model, opt, sd, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    opt.load_state_dict({"state": {index[n]: v for n, v in sd["state"].items()}, "param_groups": groups})


# =================================================================================================
# data
# =================================================================================================


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for updates ``[start_step, stop_step)``, as keys ``epoch * n + index``.

    Epoch ``e`` is the permutation ``default_rng([seed, e]).permutation(n)``; global batch ``k`` of it
    is ``perm[k*B:(k+1)*B]`` (the tail ``n % B`` of each epoch is dropped); rank ``r`` takes part ``r``
    of ``world_size`` contiguous parts and splits it into ``grad_accum`` micro-batches.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world_size: int, grad_accum: int, seed: int,
                 start_step: int, stop_step: int):
        if n < global_batch:
            raise ValueError(f"the training set has {n} samples, fewer than train.batch_size={global_batch}")
        self.n, self.batch, self.rank, self.world = n, global_batch, rank, world_size
        self.accum, self.seed = grad_accum, seed
        self.start, self.stop = start_step, stop_step
        self.per_rank = global_batch // world_size
        self.micro = self.per_rank // grad_accum
        self.steps_per_epoch = n // global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def position(self, step: int) -> dict[str, int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": k, "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.batch, "dataset_len": self.n}

    def __iter__(self) -> Iterator[list[int]]:
        perm, perm_epoch = None, None
        for step in range(self.start, self.stop):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self.permutation(epoch), epoch
            mine = perm[k * self.batch + self.rank * self.per_rank:][: self.per_rank]
            for j in range(self.accum):
                yield [int(epoch * self.n + i) for i in mine[j * self.micro:(j + 1) * self.micro]]

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum


@contextlib.contextmanager
def _preserve_rng(cuda: bool = False) -> Iterator[None]:
    """Restore the python / numpy / torch-CPU (and with ``cuda`` all CUDA) RNG states on exit."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    gpu = torch.cuda.get_rng_state_all() if cuda else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
        if gpu is not None:
            torch.cuda.set_rng_state_all(gpu)


class _SeededItems(Dataset):
    """``ds[index]`` for key ``epoch * n + index``, RNGs seeded from (seed, salt, epoch, index) around it."""

    def __init__(self, ds: Dataset, seed: int, salt: int):
        self.ds, self.seed, self.salt, self.n = ds, seed, salt, len(ds)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), self.n)
        s = int(np.random.SeedSequence([self.seed, self.salt, epoch, index]).generate_state(1, np.uint64)[0])
        with _preserve_rng():
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.random.default_generator.manual_seed(s)
            return self.ds[index]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


class _DeviceLoader:
    """Iterate a DataLoader, moving each batch to ``device``."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield _to_device(batch, self.device)


def _loader(ds: Dataset, batch_sampler: Iterable[list[int]], task: Task, cfg: TrainConfig,
            device: torch.device, seed: int) -> DataLoader:
    # an own generator: creating the iterator must not draw from the global RNG (exact resume)
    return DataLoader(ds, batch_sampler=batch_sampler, num_workers=cfg.num_workers, collate_fn=task.collate,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))


def _first_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _first_len(v)
            if n:
                return n
    return 0


# =================================================================================================
# model wrapping, full state dicts
# =================================================================================================


def _wrap(model: nn.Module, cfg: TrainConfig, info: dist.DistInfo, device: torch.device) -> nn.Module:
    if not info.is_distributed:
        return model
    if cfg.strategy == "ddp":
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=cfg.find_unused_parameters)
    try:
        from torch.distributed.fsdp import fully_shard  # lazy: torch >= 2.6
    except ImportError:
        raise ValueError(f"train.strategy=fsdp needs torch >= 2.6 (FSDP2 fully_shard), "
                         f"this is {torch.__version__}") from None

    blocks = [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]
    for block in reversed(blocks):  # innermost first
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(model)
    return model


def _is_fsdp(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict (gathers FSDP shards: call on every rank). Every rank gets the tensors."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in unwrap(model).state_dict().items()}


@contextlib.contextmanager
def _grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for micro-batches before the last one (grad accumulation)."""
    if enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _clip_grads(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        raise ValueError("no parameter received a gradient: does the task's loss use the model?")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# =================================================================================================
# validation
# =================================================================================================


@contextlib.contextmanager
def _eval_module(task: Task, cfg: ExperimentConfig, model: nn.Module, ema: EMA | None,
                 device: torch.device) -> Iterator[nn.Module]:
    """A plain module in eval mode holding the model's (or the EMA's) weights."""
    if _is_fsdp(model):  # unsharded replica: validation may call any method, not only forward
        state = ema.state_dict() if ema is not None else _full_model_state(model)
        replica = _build_model(task, cfg)
        replica.load_state_dict(state, strict=True)
        yield replica.to(device).eval()
        return
    m = unwrap(model)
    backup = None
    if ema is not None:
        backup = {k: t.detach().clone() for k, t in m.state_dict().items()}
        ema.copy_to(m)
    m.eval()
    try:
        yield m
    finally:
        m.train()
        if backup is not None:
            m.load_state_dict(backup, strict=True)


def _default_validate(task: Task, step: int) -> Callable:
    """Without ``task.validate``: the sample-weighted mean of the loss and its logs on the validation set."""

    def validate(model: nn.Module, loader: Iterable, cfg: ExperimentConfig, frozen: Any) -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for batch in loader:
            n = _first_len(batch) or 1
            loss, logs = task.loss(model, batch, cfg, step, frozen)
            for k, v in {**{k: float(v) for k, v in logs.items()}, "loss": float(loss)}.items():
                sums[k] += v * n
            count += n
        return {k: v / max(count, 1) for k, v in sums.items()}

    return validate


def _validate(r: "_Run", step: int) -> dict[str, float]:
    """Validation on this rank's contiguous shard, with the model's and/or the EMA's weights, averaged over
    ranks weighted by shard size. It does not consume training RNG."""
    tc = r.cfg.train
    n = len(r.val_ds)
    lo, hi = n * r.info.rank // r.info.world_size, n * (r.info.rank + 1) // r.info.world_size
    batches = [list(range(i, min(i + r.micro, hi))) for i in range(lo, hi, r.micro)]
    which = tc.val_weights if r.ema is not None else "model"
    fn = r.task.validate or _default_validate(r.task, step)
    out: dict[str, float] = {}
    for weights in (["model", "ema"] if which == "both" else [which]):
        averaged = r.ema if weights == "ema" else None
        with _preserve_rng(cuda=r.device.type == "cuda"), \
                _eval_module(r.task, r.cfg, r.model, averaged, r.device) as m:
            metrics: dict[str, float] = {}
            if batches:
                items = _SeededItems(r.val_ds, tc.seed, salt=1)
                loader = _DeviceLoader(_loader(items, batches, r.task, tc, r.device, tc.seed), r.device)
                with torch.no_grad(), r.autocast():
                    metrics = {k: float(v) for k, v in fn(m, loader, r.cfg, r.frozen).items()}
        gathered = dist.all_gather_object((metrics, hi - lo))
        total = sum(c for _, c in gathered)
        prefix = "val" if weights == "model" else "val_ema"
        for k in sorted({k for d, _ in gathered for k in d}):
            out[f"{prefix}/{k}"] = sum(d[k] * c for d, c in gathered if k in d) / max(total, 1)
    return out


# =================================================================================================
# resume helpers
# =================================================================================================


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _check_resume_config(saved: dict, cfg: ExperimentConfig, where: Path) -> None:
    cur = _flatten({k: v for k, v in resolved_dict(cfg).items() if k != "out_dir"})
    old = _flatten({k: v for k, v in saved.items() if k != "out_dir"})
    old.setdefault("train.optimizer", "adamw")  # checkpoints from before the option
    diff = sorted(k for k in set(cur) | set(old) if cur.get(k, "<absent>") != old.get(k, "<absent>"))
    fatal = [k for k in diff if not k.startswith("train.") or k == "train.optimizer"]
    if fatal:
        shown = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {cur.get(k, '<absent>')!r}" for k in fatal[:6])
        raise ValueError(f"{where}/config.json: cannot resume with a different task/model/data config "
                         f"or optimizer ({shown})")
    if diff:
        changes = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {cur.get(k, '<absent>')!r}" for k in diff)
        dist.print0("resuming with changed train settings: %s", changes, level=logging.WARNING)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, 0x7261]).generate_state(1, np.uint64)[0]) % 2**63


# =================================================================================================
# the loop: resume point -> build -> (step, log, validate, save)* -> export
# =================================================================================================


def run(cfg: ExperimentConfig, resume: bool = False) -> dict[str, float]:
    """Train ``cfg`` (in this process or as one rank of a torchrun job); returns the final metrics.

    Parameters
    ----------
    cfg : resolved experiment config (:func:`shapeflow.train.experiment.load_config`).
    resume : continue from ``<out_dir>/checkpoints/latest`` (start from step 0 when there is none).
        Without it, an ``out_dir`` that already has checkpoints is an error.

    Returns
    -------
    ``{"step": N, "train/<term>": ..., "val/<metric>": ..., "val_ema/<metric>": ...}``: the last logged
    training interval and the last validation (the same on every rank).

    Raises
    ------
    NonFiniteLossError when the loss or gradient norm is NaN/inf (the last good checkpoint is kept);
    ValueError for configuration / data / checkpoint mismatches.
    """
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r} (known: {', '.join(sorted(TASKS))})")
    info = dist.get_dist_info()
    device = dist.select_device(info, cfg.train.device)
    owns_group = info.is_distributed and not torch.distributed.is_initialized()
    dist.init_distributed(info, device)
    try:
        ckpt, state = _resume_point(cfg, info, resume)
        r = _build(cfg, TASKS[cfg.task], info, device, ckpt, state)
        try:
            results = _train(r)
        finally:
            r.close()
        _export(r)
        return results
    finally:
        if owns_group:
            dist.destroy_distributed()


def measure_step_time(cfg: ExperimentConfig, *, steps: int = 8, warmup: int = 2) -> float:
    """Seconds per optimizer update of ``cfg`` on this machine (single process), without training it.

    Builds the run exactly as :func:`run` does (model, data, optimizer, EMA, precision) in a temporary
    ``out_dir``, times ``steps`` updates after ``warmup`` untimed ones, and throws everything away (the
    global RNG states are restored). For fitting step counts to a time budget (``shapeflow demo``).
    """
    info = dist.get_dist_info()
    if info.is_distributed:
        raise ValueError("measure_step_time runs in a single process")
    device = dist.select_device(info, cfg.train.device)
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="shapeflow-probe-") as tmp, _preserve_rng(device.type == "cuda"):
        probe = dataclasses.replace(cfg, out_dir=tmp, train=dataclasses.replace(
            cfg.train, steps=max(cfg.train.steps, total), ckpt_every=0, val_every=0))
        r = _build(probe, TASKS[cfg.task], info, device, None, None)
        try:
            for step in range(warmup):
                _step(r, step)
            t0 = time.perf_counter()
            for step in range(warmup, total):
                keys, values = _step(r, step)
            values.cpu()  # wait for the device
            return (time.perf_counter() - t0) / steps
        finally:
            r.close()


@dataclass
class _Run:
    """Everything one training run holds between its phases."""

    cfg: ExperimentConfig
    task: Task
    info: dist.DistInfo
    device: torch.device
    model: nn.Module  # possibly DDP / FSDP wrapped
    opt: torch.optim.Optimizer | CombinedOptimizer
    names: list[str]  # parameter names in the optimizer's order
    ema: EMA | None
    sampler: GlobalBatchSampler
    batches: Iterator[Any]
    val_ds: Dataset | None
    frozen: Any  # the task's build_frozen result
    start: int  # first step to run
    micro: int  # per-rank micro-batch
    fsdp: bool
    autocast: Callable[[], Any]
    writer: Any = None  # TensorBoard SummaryWriter on rank 0, when tensorboard is installed

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def main(self) -> bool:
        return self.info.is_main

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resume_point(cfg: ExperimentConfig, info: dist.DistInfo, resume: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its training state (decided on rank 0, shared with every rank)."""
    out_dir = Path(cfg.out_dir)
    found, error = None, None
    if info.is_main:  # errors are shared too, so no rank waits forever
        try:
            ckpt_lib.clean_stale(out_dir)
            if resume:
                latest = ckpt_lib.latest_checkpoint(out_dir)
                found = str(latest) if latest is not None else None
            elif ckpt_lib.list_checkpoints(out_dir):
                error = f"{out_dir}: already has checkpoints; pass --resume to continue or use another --out"
        except (OSError, ValueError) as e:
            error = str(e)
    found, error = dist.broadcast_object((found, error))
    if error is not None:
        raise ValueError(error)
    if found is None:
        if resume:
            dist.print0("no checkpoint in %s; starting from step 0", out_dir)
        return None, None
    ckpt = Path(found)
    _check_resume_config(ckpt_lib.read_config(ckpt), cfg, ckpt)
    state = ckpt_lib.load_train_state(ckpt)
    dist.print0("resuming from %s (step %d)", ckpt, state["step"])
    return ckpt, state


def _build_model(task: Task, cfg: ExperimentConfig) -> nn.Module:
    """The task's model, with LoRA adapters on its projections when ``train.lora_rank > 0`` (the rest frozen)."""
    model = task.build_model(cfg)
    tc = cfg.train
    if tc.lora_rank:
        adapted = lora.add_lora(model, tc.lora_rank, tc.lora_alpha or None, tc.lora_targets)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        dist.print0("LoRA rank %d on %d linear layers: %.3fM trainable parameters", tc.lora_rank, len(adapted),
                    trainable / 1e6)
    return model


def _build(cfg: ExperimentConfig, task: Task, info: dist.DistInfo, device: torch.device, ckpt: Path | None,
           state: dict | None) -> _Run:
    """Model (same initial weights on every rank), data, optimizer, EMA, RNG streams, logs."""
    tc = cfg.train
    if tc.batch_size % (info.world_size * tc.grad_accum):
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by world size x grad_accum = "
                         f"{info.world_size} x {tc.grad_accum}")
    fsdp = tc.strategy == "fsdp" and info.is_distributed
    if fsdp and tc.optimizer == "muon":
        raise ValueError("train.optimizer=muon needs whole weight matrices: use train.strategy=ddp "
                         "(FSDP shards them)")
    if tc.strategy == "fsdp" and not info.is_distributed:
        dist.print0("train.strategy=fsdp in a single process: training unsharded")
    bf16 = use_bf16(tc.precision, device)
    if device.type == "cuda" and tc.precision != "fp32":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts

    dist.seed_everything(tc.seed)  # identical initial weights on every rank
    model = _build_model(task, cfg)
    if tc.grad_checkpointing:
        if not hasattr(model, "grad_checkpointing"):
            raise ValueError(f"train.grad_checkpointing: {type(model).__name__} has no "
                             "grad_checkpointing attribute")
        model.grad_checkpointing = True
    if ckpt is not None:
        ckpt_lib.load_weights(ckpt, model, "model")
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    train_ds, val_ds = task.build_datasets(cfg)
    frozen = task.build_frozen(cfg, device) if task.build_frozen is not None else None
    model = _wrap(model, tc, info, device)
    model.train()
    opt, names = _optimizer(model, tc)
    ema = EMA(model, tc.ema_decay, tc.ema_start, tc.ema_warmup) if tc.ema else None
    start = 0
    if state is not None:
        start = int(state["step"])
        _load_optimizer_state(model, opt, names, state["optimizer"], fsdp)
        if ema is not None:
            ema.load_state_dict(ckpt_lib.read_weights(ckpt, "ema"))
    sampler = GlobalBatchSampler(len(train_ds), tc.batch_size, info.rank, info.world_size, tc.grad_accum,
                                 tc.seed, start, tc.steps)
    if state is not None and state.get("data", {}).get("dataset_len") != len(train_ds):
        dist.print0("training set size changed since the checkpoint (%s -> %d): data order differs",
                    state.get("data", {}).get("dataset_len"), len(train_ds), level=logging.WARNING)
    _restore_rng(tc.seed, info, start, state)
    loader = _loader(_SeededItems(train_ds, tc.seed, salt=0), sampler, task, tc, device,
                     _rank_seed(tc.seed, info.rank, start))
    micro = tc.batch_size // (info.world_size * tc.grad_accum)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    r = _Run(cfg=cfg, task=task, info=info, device=device, model=model, opt=opt, names=names, ema=ema,
             sampler=sampler, batches=iter(loader), val_ds=val_ds, frozen=frozen, start=start, micro=micro,
             fsdp=fsdp, autocast=autocast)
    _open_logs(r)
    dist.print0("task %s: %.3fM parameters, %d steps, global batch %d (%d ranks x %d accum x %d), "
                "%s, %s on %s", cfg.task, n_params / 1e6, tc.steps, tc.batch_size, info.world_size,
                tc.grad_accum, micro, "bf16 autocast" if bf16 else "fp32",
                tc.strategy if info.is_distributed else "single process", device)
    return r


def _restore_rng(seed: int, info: dist.DistInfo, start: int, state: dict | None) -> None:
    """This rank's RNG streams: seeded per rank, or restored from the checkpoint (reseeded if the world changed)."""
    dist.seed_everything(_rank_seed(seed, info.rank, 0))
    if state is None:
        return
    if len(state["rng"]) == info.world_size:
        dist.set_rng_state(state["rng"][info.rank])
    else:
        dist.print0("world size changed (%d -> %d): RNG streams reseeded", len(state["rng"]),
                    info.world_size, level=logging.WARNING)
        dist.seed_everything(_rank_seed(seed, info.rank, start))


def _open_logs(r: _Run) -> None:
    """Rank 0: the resolved config next to the run, TensorBoard when installed."""
    if not r.main:
        return
    save_resolved(r.cfg, r.out_dir / "config.json")
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional dependency (the "log" extra)

        r.writer = SummaryWriter(log_dir=str(r.out_dir / "tb"))
    except ImportError:
        log.info("tensorboard is not installed: scalars go to %s only", r.out_dir / "metrics.jsonl")


def _train(r: _Run) -> dict[str, float]:
    """Steps ``r.start .. train.steps``: update, then log / validate / save when due."""
    tc = r.cfg.train
    results: dict[str, float] = {"step": float(r.start)}
    interval = _Interval()
    pbar = tqdm(total=tc.steps, initial=r.start, disable=not r.main, desc=r.cfg.task, dynamic_ncols=True)
    try:
        for step in range(r.start, tc.steps):
            keys, values = _step(r, step)
            done = step + 1
            pbar.update(1)
            interval.add(keys, values)
            if done % tc.log_every == 0 or done == tc.steps:
                rec = interval.read(lr=lr_at(step, tc), batch_size=tc.batch_size)
                results.update({f"train/{k}": v for k, v in rec.items()})
                _emit(r, done, "train", rec)
                pbar.set_postfix(loss=f"{rec['loss']:.4g}", samples_s=f"{rec['samples_per_s']:.1f}")
            with interval.paused():
                if r.val_ds is not None and len(r.val_ds) and _due(done, tc.val_every, tc.steps):
                    val = _validate(r, done)
                    results.update(val)
                    _emit(r, done, "val", val)
                    dist.print0("step %d: %s", done, ", ".join(f"{k}={v:.5g}" for k, v in val.items()))
                if _due(done, tc.ckpt_every, tc.steps):
                    _save(r, done)
            results["step"] = float(done)
    finally:
        pbar.close()
    if r.start >= tc.steps:
        dist.print0("checkpoint is at step %d >= train.steps=%d: nothing to train", r.start, tc.steps)
    return results


def _due(done: int, every: int, steps: int) -> bool:
    """Whether an every-N-steps action runs after update ``done`` (always after the last one; 0 = only then)."""
    return (every > 0 and done % every == 0) or done == steps


def _step(r: _Run, step: int) -> tuple[list[str], torch.Tensor]:
    """One optimizer update; returns the log keys and a device tensor ``[loss, terms..., grad_norm]``.

    The only host read is one bool (all values finite?), so a NaN/inf stops the run before the update.
    """
    tc = r.cfg.train
    for group in r.opt.param_groups:
        group["lr"] = lr_at(step, tc)
    total = torch.zeros((), device=r.device)
    terms: dict[str, torch.Tensor] = {}
    for j in range(tc.grad_accum):
        batch = _to_device(next(r.batches), r.device)
        with _grad_sync(r.model, j == tc.grad_accum - 1):
            with r.autocast():
                loss, logs = r.task.loss(r.model, batch, r.cfg, step, r.frozen)
            (loss / tc.grad_accum).backward()
        total += loss.detach().float() / tc.grad_accum
        for k, v in logs.items():
            if k != "loss":
                v = torch.as_tensor(v, device=r.device).detach().float().reshape(())
                terms[k] = terms.get(k, 0.0) + v / tc.grad_accum
    keys = ["loss", *sorted(terms), "grad_norm"]
    vec = dist.all_reduce_mean(torch.stack([total] + [terms[k] for k in keys[1:-1]]))
    grad_norm = _clip_grads(r.model, tc.grad_clip)
    values = torch.cat([vec, grad_norm.detach().float().reshape(1).to(vec.device)])
    if not bool(torch.isfinite(values).all()):
        _raise_non_finite(r, step, keys, values)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if r.ema is not None:
        r.ema.update(r.model, step)
    return keys, values


def _raise_non_finite(r: _Run, step: int, keys: list[str], values: torch.Tensor) -> None:
    vals = dict(zip(keys, values.cpu().tolist()))
    grad_norm = vals.pop("grad_norm")
    latest = ckpt_lib.latest_checkpoint(r.out_dir) if r.main else None
    shown = ", ".join(f"{k}={v:.6g}" for k, v in vals.items())
    what = "loss" if not all(math.isfinite(v) for v in vals.values()) else f"gradient norm ({grad_norm})"
    raise NonFiniteLossError(f"step {step}: non-finite {what} ({shown}); stopped before the update, nothing "
                             f"saved; last good checkpoint: {latest if latest is not None else 'none'}")


class _Interval:
    """Sums of the per-step log values between two log steps, on the device; read out once per log step."""

    def __init__(self):
        self.keys: list[str] | None = None
        self.sum: torch.Tensor | None = None
        self.n, self.paused_s, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, keys: list[str], values: torch.Tensor) -> None:
        if self.keys is not None and keys != self.keys:
            raise ValueError(f"the task's log keys changed between steps: {self.keys} -> {keys}")
        self.keys, self.n = keys, self.n + 1
        self.sum = values if self.sum is None else self.sum + values

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (validation, saving) does not count toward samples/s."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def read(self, *, lr: float, batch_size: int) -> dict[str, float]:
        """The interval's means (one host read), lr and samples/s; starts a new interval."""
        means = dict(zip(self.keys, (self.sum / self.n).cpu().tolist()))
        elapsed = max(time.perf_counter() - self.t0 - self.paused_s, 1e-9)
        rec = {**means, "lr": lr, "samples_per_s": self.n * batch_size / elapsed}
        self.sum, self.n, self.paused_s, self.t0 = None, 0, 0.0, time.perf_counter()
        return rec


def _emit(r: _Run, step: int, split: str, values: dict[str, float]) -> None:
    """One metrics.jsonl line (and TensorBoard scalars) on rank 0."""
    if not r.main:
        return
    fileio.append_line(r.out_dir / "metrics.jsonl", json.dumps({"step": step, "split": split, **values}))
    if r.writer is not None:
        for k, v in values.items():
            r.writer.add_scalar(k if "/" in k else f"{split}/{k}", v, step)


def _save(r: _Run, done: int) -> Path | None:
    """A checkpoint after update ``done`` (collective: every rank gathers; rank 0 writes)."""
    tc = r.cfg.train
    model_state = _full_model_state(r.model) if (r.main or r.fsdp) else None
    ema_state = r.ema.state_dict() if r.ema is not None and (r.main or r.fsdp) else None
    optim = _optimizer_state(r.model, r.opt, r.names, r.fsdp)
    rngs = dist.all_gather_object(dist.rng_state())
    path = None
    if r.main:
        train_state = {"format": 1, "step": done, "optimizer": optim, "rng": rngs,
                       "world_size": r.info.world_size, "data": r.sampler.position(done),
                       "lr": lr_at(done, tc), "torch": str(torch.__version__)}
        path = ckpt_lib.save_checkpoint(r.out_dir, done, config=resolved_dict(r.cfg), model_state=model_state,
                                        ema_state=ema_state, train_state=train_state, keep_last=tc.keep_last)
    dist.barrier()
    return path


def _export(r: _Run) -> None:
    """``<out_dir>/final/``: the latest checkpoint's config and chosen weights (EMA by default)."""
    if r.main:
        last = ckpt_lib.latest_checkpoint(r.out_dir)
        if last is not None:
            tc = r.cfg.train
            which = tc.export_weights if r.ema is not None else "model"
            merge = None
            if tc.lora_rank:  # fold the adapters in: final/ holds the plain model's weights
                scale = (tc.lora_alpha or tc.lora_rank) / tc.lora_rank
                merge = functools.partial(lora.merge_state_dict, scale=scale)
            final = ckpt_lib.export_final(r.out_dir, last, which, transform=merge)
            dist.print0("exported %s weights to %s%s", which, final, " (LoRA merged)" if merge else "")
            if r.task.export is not None:
                r.task.export(r.cfg, final)
    dist.barrier()
