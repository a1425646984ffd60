"""The toy task: a residual MLP regressing a fixed random teacher function on an in-memory dataset.

It exists for the engine's own tests (resume, DDP, precision, NaN handling) and as the smallest example of
the task contract (:mod:`shapeflow.train.task`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from shapeflow.train.task import Task

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig


@dataclass(frozen=True)
class ToyModelConfig:
    in_dim: int = 8  # input features
    hidden: int = 32  # residual stream width
    depth: int = 2  # residual blocks
    out_dim: int = 1  # regression targets
    dropout: float = 0.0  # inside blocks (exercises the RNG state on resume)

    PRESETS: ClassVar[dict[str, dict]] = {
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


def _toy_loss(model: nn.Module, batch: dict[str, Tensor], cfg: "ExperimentConfig", step: int, frozen=None):
    pred = model(batch["x"]).float()  # (b, out_dim)
    err = pred - batch["y"]
    mse = err.square().mean()
    return mse, {"mse": mse.detach(), "mae": err.abs().mean().detach()}


@torch.no_grad()
def _toy_validate(model: nn.Module, loader: Iterable, cfg: "ExperimentConfig", frozen=None) -> dict[str, float]:
    sq, ab, n = 0.0, 0.0, 0
    for batch in loader:
        err = model(batch["x"]).float() - batch["y"]  # (b, out_dim)
        sq += err.square().mean(dim=1).sum().item()
        ab += err.abs().mean(dim=1).sum().item()
        n += err.shape[0]
    return {"mse": sq / n, "mae": ab / n}


TASK = Task(name="toy", kind=None, model_config=ToyModelConfig, data_config=ToyDataConfig,
            build_model=_toy_model, build_datasets=_toy_datasets, loss=_toy_loss, validate=_toy_validate)
