"""Training tasks: everything the generic loop (:mod:`shapeflow.train.loop`) needs from one model family.

A :class:`Task` bundles the model config class, the data config class, and four functions. The loop
owns everything else (optimizer, schedule, precision, EMA, DDP/FSDP, data order, checkpoints, logs).

Contract (what the loop guarantees and expects)
-----------------------------------------------
* ``build_model(cfg) -> nn.Module`` gets the whole :class:`~shapeflow.config.ExperimentConfig` and
  returns the model on CPU in fp32. It runs after ``torch.manual_seed(cfg.train.seed)`` on every rank,
  so all ranks start from identical weights. For ``train.grad_checkpointing`` the model must have a
  boolean attribute ``grad_checkpointing`` (the loop sets it to True; models check it in forward).
* ``build_datasets(cfg) -> (train_ds, val_ds | None)``: map-style datasets (``__len__`` and
  ``__getitem__``). The loop shuffles with a per-epoch permutation seeded by ``train.seed``, splits each
  global batch across ranks, and **seeds python/numpy/torch RNGs from (seed, epoch, index) around every
  ``__getitem__``**: random augmentation inside ``__getitem__`` may use the global RNGs freely and stays
  reproducible across worker counts, world sizes and ``--resume``.
* ``loss(model, batch, cfg, step) -> (loss, logs)``: ``batch`` is what the DataLoader yields (``collate``
  or torch's default collate), with every tensor inside dicts/lists/tuples already on the device.
  ``model`` is the (possibly DDP/FSDP-wrapped) module: **call it only through ``model(...)``** (forward),
  so gradient synchronisation and FSDP unsharding happen; put what the loss needs into ``forward``.
  ``loss`` is a scalar tensor, the mean over this rank's micro-batch (so the engine's average over
  micro-batches and ranks is the global-batch mean). ``logs`` maps names to floats or 0-dim tensors
  (prefer tensors: the engine synchronises once per step), with the same keys on every rank and step.
  It runs under autocast (bf16 on GPU by default); compute losses in fp32 (``pred.float()``).
  ``step`` is the number of updates done so far (0 for the first); randomness may use the global
  torch RNG (seeded per rank, restored on resume).
* ``validate(model, val_loader, cfg) -> dict[str, float]`` (optional): ``model`` is a plain
  (unwrapped, unsharded) module in eval mode, called under ``torch.no_grad()`` and autocast; any method
  may be used (encode/decode, mesh extraction). ``val_loader`` yields device batches of this rank's
  contiguous shard of the validation set. Return **per-sample means**: the engine averages them over
  ranks weighted by shard size. Without ``validate`` the engine reports the mean of ``loss``'s logs.
* ``collate`` (optional): DataLoader ``collate_fn`` (runs in workers; keep it deterministic).
* ``presets`` (optional): ``{name: dict | config}`` for ``model.preset``; by default the ``PRESETS``
  dict of the model config's module is used.

Adding a task
-------------
Write the functions next to the model (e.g. ``shapeflow/train/task_vecset.py``) and add one entry to
``TASKS`` below, e.g.::

    from shapeflow.train import task_vecset
    TASKS["vecset_vae"] = Task(
        name="vecset_vae", model_config=VecSetVAEConfig, data_config=task_vecset.VecSetDataConfig,
        build_model=lambda cfg: VecSetVAE(cfg.model), build_datasets=task_vecset.build_datasets,
        loss=task_vecset.loss, validate=task_vecset.validate)

then ``configs/vecset_vae_tiny.yaml`` says ``task: vecset_vae``. No import-path strings in configs.

The ``toy`` task here (a residual MLP regressing a fixed random teacher function) exists for the
engine's own tests and as a minimal example of the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from shapeflow.config import ExperimentConfig

LossFn = Callable[[nn.Module, Any, "ExperimentConfig", int], "tuple[Tensor, Mapping[str, float | Tensor]]"]
ValidateFn = Callable[[nn.Module, Iterable, "ExperimentConfig"], "Mapping[str, float]"]


@dataclass(frozen=True)
class Task:
    """One trainable model family (see the module docstring for the contract of each function)."""

    name: str
    model_config: type  # dataclass of the model's hyper-parameters (``model:`` section)
    data_config: type  # dataclass of the dataset options (``data:`` section)
    build_model: Callable[["ExperimentConfig"], nn.Module]
    build_datasets: Callable[["ExperimentConfig"], "tuple[Dataset, Dataset | None]"]
    loss: LossFn
    validate: ValidateFn | None = None
    collate: Callable[[list], Any] | None = None
    presets: Mapping[str, Any] | None = None
    objective_config: type | None = None  # dataclass of the ``objective:`` section (loss weights, flow schedule)


# =================================================================================================
# toy task: residual MLP regression on a synthetic in-memory dataset
# =================================================================================================


@dataclass(frozen=True)
class ToyModelConfig:
    in_dim: int = 8  # input features
    hidden: int = 32  # residual stream width
    depth: int = 2  # residual blocks
    out_dim: int = 1  # regression targets
    dropout: float = 0.0  # inside blocks (exercises the RNG state on resume)


TOY_PRESETS = {
    "tiny": dict(hidden=16, depth=1),
    "small": dict(hidden=32, depth=2),
}


@dataclass(frozen=True)
class ToyDataConfig:
    n_train: int = 512  # training samples
    n_val: int = 128  # validation samples
    noise: float = 0.05  # std of Gaussian input jitter drawn in __getitem__ (an "augmentation")
    seed: int = 1234  # seed of the inputs and the teacher function


class ToyMLP(nn.Module):
    """``x (b, in_dim) -> y (b, out_dim)`` through pre-norm residual MLP blocks."""

    def __init__(self, cfg: ToyModelConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.in_dim, cfg.hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, 2 * cfg.hidden), nn.GELU(),
                          nn.Dropout(cfg.dropout), nn.Linear(2 * cfg.hidden, cfg.hidden))
            for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.out_dim)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)  # (b, c)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = h + checkpoint(block, h, use_reentrant=False)
            else:
                h = h + block(h)
        return self.out(self.norm(h))  # (b, out_dim)


class ToyDataset(Dataset):
    """``y = sin(x A) B`` for fixed random ``A``, ``B``; items get fresh input jitter on every read."""

    def __init__(self, n: int, in_dim: int, out_dim: int, noise: float, seed: int, split: int):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(in_dim, 16, generator=g) / math.sqrt(in_dim)
        b = torch.randn(16, out_dim, generator=g) / 4.0
        g.manual_seed(seed + 1 + split)  # train / val inputs differ, teacher is shared
        self.x = torch.randn(n, in_dim, generator=g)  # (n, in_dim)
        self.y = torch.sin(self.x @ a) @ b  # (n, out_dim)
        self.noise = noise

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.x[i] + self.noise * torch.randn(self.x.shape[1])  # global RNG: seeded per item by the loop
        return {"x": x, "y": self.y[i]}


def _toy_model(cfg: "ExperimentConfig") -> nn.Module:
    return ToyMLP(cfg.model)


def _toy_datasets(cfg: "ExperimentConfig") -> tuple[Dataset, Dataset]:
    d, m = cfg.data, cfg.model
    return (ToyDataset(d.n_train, m.in_dim, m.out_dim, d.noise, d.seed, split=0),
            ToyDataset(d.n_val, m.in_dim, m.out_dim, 0.0, d.seed, split=1))


def _toy_loss(model: nn.Module, batch: dict[str, Tensor], cfg: "ExperimentConfig", step: int):
    pred = model(batch["x"]).float()  # (b, out_dim)
    err = pred - batch["y"]
    mse = err.square().mean()
    return mse, {"mse": mse.detach(), "mae": err.abs().mean().detach()}


@torch.no_grad()
def _toy_validate(model: nn.Module, loader: Iterable, cfg: "ExperimentConfig") -> dict[str, float]:
    sq, ab, n = 0.0, 0.0, 0
    for batch in loader:
        err = model(batch["x"]).float() - batch["y"]  # (b, out_dim)
        sq += err.square().mean(dim=1).sum().item()
        ab += err.abs().mean(dim=1).sum().item()
        n += err.shape[0]
    return {"mse": sq / n, "mae": ab / n}


TASKS: dict[str, Task] = {
    "toy": Task(name="toy", model_config=ToyModelConfig, data_config=ToyDataConfig, build_model=_toy_model,
                build_datasets=_toy_datasets, loss=_toy_loss, validate=_toy_validate, presets=TOY_PRESETS),
}


def _register_model_tasks() -> None:
    """The real model families (imported here so that ``TASKS`` is complete wherever it is read)."""
    from shapeflow.train import task_dit, task_grid, task_vecset

    task_vecset.register(TASKS)
    task_grid.register(TASKS)
    task_dit.register(TASKS)


_register_model_tasks()
