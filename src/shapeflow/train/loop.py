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
  AdamW; on the tiny VecSet VAE it reaches in 1000 steps what AdamW reaches in 4000 (BENCHMARKS.md).
  DDP only (FSDP shards the matrices Muon orthogonalises).
* Precision: fp32 master weights; ``precision: auto`` is bf16 autocast on CUDA and on CPUs with native
  bf16 matmuls: AMX tile units (Intel Sapphire Rapids and later: a tiny VecSet step 1.5x faster than in
  float32) or AVX512-BF16 (AMD Zen 5: the demo's VecSet and DiT steps 1.6-1.7x faster; BENCHMARKS.md);
  fp32 on other CPUs (where bf16 is emulated and slower than float32); no grad
  scaler (bf16 has fp32's range). Attention runs in float32 on the CPU (:func:`shapeflow.nn.attention.sdpa`).
* NaN/inf: the loss terms (averaged over ranks) and the gradient norm are checked every step before the
  update; on a non-finite value every rank raises :class:`NonFiniteLossError` naming the step and the
  terms, nothing is updated or saved, and the last good checkpoint stays ``latest``.
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
import json
import logging
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from shapeflow import fileio
from shapeflow.config import ExperimentConfig, TrainConfig, save_resolved, to_dict
from shapeflow.train import checkpoint as ckpt_lib
from shapeflow.train import dist
from shapeflow.train.ema import EMA, DTensor, unwrap
from shapeflow.train.tasks import TASKS, Task

log = logging.getLogger(__name__)

__all__ = ["run", "lr_at", "NonFiniteLossError", "GlobalBatchSampler"]


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
    from shapeflow.train.muon import BatchedMuon  # subclasses torch.optim.Muon (torch >= 2.9)

    muon = BatchedMuon([p for _, p in matrices], lr=cfg.lr, weight_decay=cfg.weight_decay,
                       momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    return CombinedOptimizer([muon, opt]), [n for n, _ in matrices] + names


def _optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, names: list[str],
                     fsdp: bool) -> dict | None:
    """Full optimizer state keyed by parameter name (collective under FSDP; None off rank 0)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

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
        from torch.distributed.fsdp import fully_shard
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
        replica = task.build_model(cfg)
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


def _default_validate(task: Task, cfg: ExperimentConfig, step: int) -> Callable:
    def validate(model: nn.Module, loader: Iterable, cfg: ExperimentConfig) -> dict[str, float]:
        sums: dict[str, float] = defaultdict(float)
        count = 0
        for batch in loader:
            n = _first_len(batch) or 1
            loss, logs = task.loss(model, batch, cfg, step)
            for k, v in {**{k: float(v) for k, v in logs.items()}, "loss": float(loss)}.items():
                sums[k] += v * n
            count += n
        return {k: v / max(count, 1) for k, v in sums.items()}

    return validate


def _validate(task: Task, cfg: ExperimentConfig, model: nn.Module, ema: EMA | None, val_ds: Dataset,
              info: dist.DistInfo, device: torch.device, autocast: Callable, micro: int,
              step: int) -> dict[str, float]:
    tc = cfg.train
    n = len(val_ds)
    lo, hi = n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size
    batches = [list(range(i, min(i + micro, hi))) for i in range(lo, hi, micro)]
    which = tc.val_weights if ema is not None else "model"
    fn = task.validate or _default_validate(task, cfg, step)
    out: dict[str, float] = {}
    for weights in (["model", "ema"] if which == "both" else [which]):
        averaged = ema if weights == "ema" else None
        with _preserve_rng(cuda=device.type == "cuda"), _eval_module(task, cfg, model, averaged, device) as m:
            metrics: dict[str, float] = {}
            if batches:
                items = _SeededItems(val_ds, tc.seed, salt=1)
                loader = _DeviceLoader(_loader(items, batches, task, tc, device, tc.seed), device)
                with torch.no_grad(), autocast():
                    metrics = {k: float(v) for k, v in fn(m, loader, cfg).items()}
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
    cur = _flatten({k: v for k, v in to_dict(cfg).items() if k != "out_dir"})
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
# the loop
# =================================================================================================


def run(cfg: ExperimentConfig, resume: bool = False) -> dict[str, float]:
    """Train ``cfg`` (in this process or as one rank of a torchrun job); returns the final metrics.

    Parameters
    ----------
    cfg : resolved experiment config (:func:`shapeflow.config.load_config`).
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
        return _run(cfg, TASKS[cfg.task], info, device, resume)
    finally:
        if owns_group:
            dist.destroy_distributed()


def _run(cfg: ExperimentConfig, task: Task, info: dist.DistInfo, device: torch.device,
         resume: bool) -> dict[str, float]:
    tc = cfg.train
    out_dir = Path(cfg.out_dir)
    main = info.is_main
    if tc.batch_size % (info.world_size * tc.grad_accum):
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by world size x grad_accum = "
                         f"{info.world_size} x {tc.grad_accum}")
    micro = tc.batch_size // (info.world_size * tc.grad_accum)
    fsdp = tc.strategy == "fsdp" and info.is_distributed
    if fsdp and tc.optimizer == "muon":
        raise ValueError("train.optimizer=muon needs whole weight matrices: use train.strategy=ddp "
                         "(FSDP shards them)")
    if tc.strategy == "fsdp" and not info.is_distributed:
        dist.print0("train.strategy=fsdp in a single process: training unsharded")
    bf16 = use_bf16(tc.precision, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if device.type == "cuda" and tc.precision != "fp32":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts

    # ---- where to start -------------------------------------------------------------------------
    found, error = None, None
    if main:  # decided on rank 0, shared with every rank (errors too, so no rank waits forever)
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
    ckpt = Path(found) if found else None
    state = None
    if ckpt is not None:
        _check_resume_config(ckpt_lib.read_config(ckpt), cfg, ckpt)
        state = ckpt_lib.load_train_state(ckpt)
        dist.print0("resuming from %s (step %d)", ckpt, state["step"])
    elif resume:
        dist.print0("no checkpoint in %s; starting from step 0", out_dir)

    # ---- model, data, optimizer, EMA ------------------------------------------------------------
    dist.seed_everything(tc.seed)  # identical initial weights on every rank
    model = task.build_model(cfg)
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
    dist.seed_everything(_rank_seed(tc.seed, info.rank, 0))
    if state is not None:
        if len(state["rng"]) == info.world_size:
            dist.set_rng_state(state["rng"][info.rank])
        else:
            dist.print0("world size changed (%d -> %d): RNG streams reseeded", len(state["rng"]),
                        info.world_size, level=logging.WARNING)
            dist.seed_everything(_rank_seed(tc.seed, info.rank, start))
    loader = _loader(_SeededItems(train_ds, tc.seed, salt=0), sampler, task, tc, device,
                     _rank_seed(tc.seed, info.rank, start))
    batches = iter(loader)

    # ---- logging --------------------------------------------------------------------------------
    writer = None
    if main:
        save_resolved(cfg, out_dir / "config.json")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out_dir / "tb"))
        except ImportError:
            log.info("tensorboard is not installed: scalars go to %s only", out_dir / "metrics.jsonl")
    dist.print0("task %s: %.3fM parameters, %d steps, global batch %d (%d ranks x %d accum x %d), "
                "%s, %s on %s",
                cfg.task, n_params / 1e6, tc.steps, tc.batch_size, info.world_size, tc.grad_accum, micro,
                "bf16 autocast" if bf16 else "fp32", tc.strategy if info.is_distributed else "single process",
                device)

    def emit(step: int, split: str, values: dict[str, float]) -> None:
        if not main:
            return
        fileio.append_line(out_dir / "metrics.jsonl", json.dumps({"step": step, "split": split, **values}))
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(k if "/" in k else f"{split}/{k}", v, step)

    def save(done: int) -> Path | None:
        model_state = _full_model_state(model) if (main or fsdp) else None
        ema_state = ema.state_dict() if ema is not None and (main or fsdp) else None
        optim = _optimizer_state(model, opt, names, fsdp)
        rngs = dist.all_gather_object(dist.rng_state())
        path = None
        if main:
            train_state = {"format": 1, "step": done, "optimizer": optim, "rng": rngs,
                           "world_size": info.world_size, "data": sampler.position(done),
                           "lr": lr_at(done, tc), "torch": str(torch.__version__)}
            path = ckpt_lib.save_checkpoint(out_dir, done, config=to_dict(cfg), model_state=model_state,
                                            ema_state=ema_state, train_state=train_state,
                                            keep_last=tc.keep_last)
        dist.barrier()
        return path

    # ---- train ----------------------------------------------------------------------------------
    results: dict[str, float] = {"step": float(start)}
    interval: dict[str, float] = defaultdict(float)
    n_interval, paused, t0 = 0, 0.0, time.perf_counter()
    pbar = tqdm(total=tc.steps, initial=start, disable=not main, desc=cfg.task, dynamic_ncols=True)
    try:
        for step in range(start, tc.steps):
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            total = torch.zeros((), device=device)
            terms: dict[str, torch.Tensor] = {}
            for j in range(tc.grad_accum):
                batch = _to_device(next(batches), device)
                with _grad_sync(model, j == tc.grad_accum - 1):
                    with autocast():
                        loss, logs = task.loss(model, batch, cfg, step)
                    (loss / tc.grad_accum).backward()
                total += loss.detach().float() / tc.grad_accum
                for k, v in logs.items():
                    if k != "loss":
                        v = torch.as_tensor(v, device=device).detach().float().reshape(())
                        terms[k] = terms.get(k, 0.0) + v / tc.grad_accum
            keys = sorted(terms)
            vec = dist.all_reduce_mean(torch.stack([total] + [terms[k] for k in keys]))
            grad_norm = _clip_grads(model, tc.grad_clip)
            values = torch.cat([vec, grad_norm.detach().float().reshape(1).to(vec.device)]).cpu().tolist()
            loss_terms = {"loss": values[0], **dict(zip(keys, values[1:-1]))}
            if not all(math.isfinite(v) for v in values):
                latest = ckpt_lib.latest_checkpoint(out_dir) if main else None
                shown = ", ".join(f"{k}={v:.6g}" for k, v in loss_terms.items())
                bad_loss = not all(math.isfinite(v) for v in loss_terms.values())
                what = "loss" if bad_loss else f"gradient norm ({values[-1]})"
                raise NonFiniteLossError(
                    f"step {step}: non-finite {what} ({shown}); stopped before the update, nothing saved; "
                    f"last good checkpoint: {latest if latest is not None else 'none'}")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step)
            done = step + 1
            pbar.update(1)
            for k, v in loss_terms.items():
                interval[k] += v
            interval["grad_norm"] += values[-1]
            n_interval += 1

            if done % tc.log_every == 0 or done == tc.steps:
                elapsed = max(time.perf_counter() - t0 - paused, 1e-9)
                rec = {k: v / n_interval for k, v in interval.items()}
                rec.update(lr=lr, samples_per_s=n_interval * tc.batch_size / elapsed)
                results.update({f"train/{k}": v for k, v in rec.items()})
                emit(done, "train", rec)
                pbar.set_postfix(loss=f"{rec['loss']:.4g}", samples_s=f"{rec['samples_per_s']:.1f}")
                interval.clear()
                n_interval, paused, t0 = 0, 0.0, time.perf_counter()

            t_pause = time.perf_counter()
            validate_now = (tc.val_every and done % tc.val_every == 0) or done == tc.steps
            if val_ds is not None and len(val_ds) and validate_now:
                val = _validate(task, cfg, model, ema, val_ds, info, device, autocast, micro, done)
                results.update(val)
                emit(done, "val", val)
                dist.print0("step %d: %s", done, ", ".join(f"{k}={v:.5g}" for k, v in val.items()))
            if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == tc.steps:
                save(done)
            paused += time.perf_counter() - t_pause
            results["step"] = float(done)
    finally:
        pbar.close()
        if writer is not None:
            writer.close()

    if start >= tc.steps:
        dist.print0("checkpoint is at step %d >= train.steps=%d: nothing to train", start, tc.steps)
    if main:
        last = ckpt_lib.latest_checkpoint(out_dir)
        if last is not None:
            which = tc.export_weights if ema is not None else "model"
            final = ckpt_lib.export_final(out_dir, last, which)
            dist.print0("exported %s weights to %s", which, final)
    dist.barrier()
    return results
