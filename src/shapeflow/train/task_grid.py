"""Training task of the voxel-grid VAE (TRELLIS sparse-structure family and the SDF-grid variant).

* data: :class:`shapeflow.data.datasets.GridDataset`: the 64^3 shell occupancy (``model.input:
  occupancy``) or the dense truncated SDF in world units (``model.input: sdf``; objects preprocessed with
  ``--tsdf-res`` equal to ``model.resolution``);
* loss: :func:`shapeflow.models.grid_losses.grid_vae_loss` with the model config's settings (dice / BCE
  for occupancy, L1 / MSE for SDF, KL weight);
* validation: per shape, IoU of the decoded posterior mean (occupancy: ``logits > 0`` vs the voxels;
  SDF: ``sdf < 0`` at the grid nodes) and the loss terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from shapeflow.data.datasets import GridDataset
from shapeflow.models.grid_losses import grid_vae_loss, occupancy_iou
from shapeflow.models.grid_vae import GridVAE, GridVAEConfig
from shapeflow.train.task import Task

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig


@dataclass(frozen=True)
class GridDataConfig:
    root: str = "data/prep"  # a `shapeflow preprocess` output folder
    val_fraction: float = 0.1  # share of objects held out (by id hash)
    split_seed: int = 0  # seed of the id-hash split


def build_model(cfg: "ExperimentConfig") -> nn.Module:
    return GridVAE(cfg.model)


def build_datasets(cfg: "ExperimentConfig"):
    d, m = cfg.data, cfg.model
    common = dict(source="tsdf" if m.input == "sdf" else "occ64", normalize_tsdf=False,
                  val_fraction=d.val_fraction, split_seed=d.split_seed)
    train = GridDataset(d.root, split="train", **common)
    if len(train) == 0:
        raise ValueError(f"{d.root}: no training objects")
    shape = tuple(train[0]["grid"].shape[1:])
    if shape != (m.grid_size,) * 3:
        raise ValueError(f"{d.root}: grids are {shape}, model.resolution={m.resolution} expects "
                         f"{(m.grid_size,) * 3} (preprocess with --tsdf-res {m.resolution} for SDF grids)")
    val = GridDataset(d.root, split="val", **common) if d.val_fraction > 0 else None
    return train, (val if val is not None and len(val) else None)


def loss(model: nn.Module, batch: dict, cfg: "ExperimentConfig", step: int, frozen=None):
    value, logs = grid_vae_loss(model, batch, cfg.model)
    return value, {k: v for k, v in logs.items() if k != "loss"}


@torch.no_grad()
def validate(model: GridVAE, loader: Iterable, cfg: "ExperimentConfig", frozen=None) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x = batch["grid"].float()
        out = model.decode(model.encode(x).mode(), size=tuple(x.shape[2:]))
        if model.config.input == "occupancy":
            iou = occupancy_iou(out, x)
        else:
            iou = occupancy_iou(-out, (x < 0).float())  # inside = sdf < 0
        _, logs = grid_vae_loss(model, batch, model.config, generator=torch.Generator().manual_seed(0))
        b = x.shape[0]
        sums["iou"] = sums.get("iou", 0.0) + iou.sum().item()
        for k, v in logs.items():
            if k not in ("iou", "loss"):  # "iou" above is of the posterior mean; the loss's is of a sample
                sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
    return {k: v / n for k, v in sums.items()}


TASK = Task(name="grid_vae", kind=GridVAE.kind, model_config=GridVAEConfig, data_config=GridDataConfig,
            build_model=build_model, build_datasets=build_datasets, loss=loss, validate=validate)
