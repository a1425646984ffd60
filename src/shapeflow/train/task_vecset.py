"""Training task of the VecSet VAE: data, loss and validation glue for the generic loop.

* data: :class:`shapeflow.data.datasets.VecSetDataset` over a ``shapeflow preprocess`` folder (surface
  subsample with its sharp subset, of the model's ``surface_points`` + ``sharp_points``; SDF-labelled
  queries with their point group);
* objective: :class:`shapeflow.models.vecset_losses.VecSetLossConfig` (``objective:`` section);
* validation: per shape, volume IoU of ``field < 0`` vs ``sdf < 0`` on the uniform queries (volume IoU)
  and on the near-surface queries, and, when ``data.val_mesh_resolution > 0``, a mesh decoded from the
  posterior mean (hierarchical decoding, marching cubes) compared with the ground-truth surface points:
  Chamfer-L1, F-score at 1% of the shape's bounding-box side and normal consistency
  (:mod:`shapeflow.metrics`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn

from shapeflow import metrics
from shapeflow.data.datasets import VecSetDataset
from shapeflow.decode import latents_to_mesh
from shapeflow.geometry.marching_cubes import EmptySurfaceError
from shapeflow.models.vecset_losses import VecSetLossConfig, vecset_vae_loss
from shapeflow.models.vecset_vae import VecSetVAE, VecSetVAEConfig
from shapeflow.train.task import Task

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig


@dataclass(frozen=True)
class VecSetDataConfig:
    root: str = "data/prep"  # a `shapeflow preprocess` output folder
    n_queries: int = 4096  # SDF-labelled query points per item (the encoder input counts are the model's)
    query_fractions: tuple[float, float, float] = (0.4, 0.3, 0.3)  # uniform / near fine / near coarse
    val_fraction: float = 0.1  # share of objects held out (by id hash)
    split_seed: int = 0  # seed of the id-hash split
    val_mesh_resolution: int = 64  # grid of the validation meshes (0: field metrics only)
    val_mesh_points: int = 20000  # surface points per validation mesh for Chamfer / F-score


def build_model(cfg: "ExperimentConfig") -> nn.Module:
    return VecSetVAE(cfg.model)


def build_datasets(cfg: "ExperimentConfig"):
    d, m = cfg.data, cfg.model
    common = dict(surface_points=m.surface_points, sharp_points=m.sharp_points, n_queries=d.n_queries,
                  query_fractions=d.query_fractions, val_fraction=d.val_fraction, split_seed=d.split_seed)
    train = VecSetDataset(d.root, split="train", **common)
    if len(train) == 0:
        raise ValueError(f"{d.root}: no training objects (is it a preprocessed folder with ok objects?)")
    val = VecSetDataset(d.root, split="val", **common) if d.val_fraction > 0 else None
    return train, (val if val is not None and len(val) else None)


def loss(model: nn.Module, batch: dict, cfg: "ExperimentConfig", step: int, frozen=None):
    return vecset_vae_loss(model, batch, cfg.objective)


@torch.no_grad()
def validate(model: VecSetVAE, loader: Iterable, cfg: "ExperimentConfig", frozen=None) -> dict[str, float]:
    d = cfg.data
    # with a list of training token counts, validate at the model's own count (as the encode below does)
    objective = (dataclasses.replace(cfg.objective, num_tokens=None)
                 if isinstance(cfg.objective.num_tokens, tuple) else cfg.objective)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + float(value)
        counts[name] = counts.get(name, 0) + 1

    for batch in loader:
        surface, points, sdf = batch["surface"], batch["points"], batch["sdf"]
        groups = batch.get("groups")
        post = model.encode(surface, generator=torch.Generator().manual_seed(0))
        z = post.mode()
        field = model.query(points, model.decode(z)).float()  # (b, q) negative inside
        for i in range(surface.shape[0]):
            pred, gt = field[i] < 0, sdf[i] < 0
            sel = {"iou": torch.ones_like(gt)}
            if groups is not None:
                sel = {"iou": groups[i] == 0, "iou_near": groups[i] > 0}
            for name, mask in sel.items():
                if mask.any():
                    add(name, metrics.volume_iou(pred[mask].cpu().numpy(), gt[mask].cpu().numpy()))
            if d.val_mesh_resolution > 0:
                gt_pts = surface[i, :, :3].cpu().numpy().astype(np.float64)
                gt_nrm = surface[i, :, 3:6].cpu().numpy().astype(np.float64)
                scale = float(np.ptp(gt_pts, axis=0).max())
                try:
                    v, f, _ = latents_to_mesh(model, z[i:i + 1], d.val_mesh_resolution)
                except EmptySurfaceError:  # no surface decoded: worst scores
                    add("f_score", 0.0)
                    add("empty_mesh", 1.0)
                    continue
                add("empty_mesh", 0.0)
                pts, nrm = metrics.sample_surface(v, f, d.val_mesh_points, seed=i)
                add("chamfer_l1", metrics.chamfer_distance(pts, gt_pts))
                add("f_score", metrics.f_score(pts, gt_pts, 0.01 * scale)[0])
                add("normal_consistency", metrics.normal_consistency(pts, nrm, gt_pts, gt_nrm))
        lval, logs = vecset_vae_loss(model, batch, objective)
        for k, val in logs.items():
            sums[k] = sums.get(k, 0.0) + float(val) * surface.shape[0]
            counts[k] = counts.get(k, 0) + surface.shape[0]
    return {k: sums[k] / counts[k] for k in sums}


TASK = Task(name="vecset_vae", kind=VecSetVAE.kind, model_config=VecSetVAEConfig, data_config=VecSetDataConfig,
            build_model=build_model, build_datasets=build_datasets, loss=loss, validate=validate,
            objective_config=VecSetLossConfig)
