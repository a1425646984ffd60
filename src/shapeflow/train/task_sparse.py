"""Training task of the sparse-voxel SDF VAE (:mod:`shapeflow.models.sparse_vae`).

* data: :class:`shapeflow.data.datasets.SparseSDFDataset` over ``shapeflow preprocess --sparse-res R`` folders
  (``R`` = ``model.resolution``): the band nodes of each object with their exact signed distances, batched by
  :func:`shapeflow.data.datasets.collate_sparse` (``coords (N, 4) [b, i, j, k]``, ``sdf (N,)``).
  ``data.extra_roots`` adds more folders (e.g. real meshes) to the training set.
* augmentation (``data.augment``): a random permutation of the grid axes and random flips per object. Both map
  nodes to nodes and keep every signed distance, so the band stays exact; the model's convolutions are not
  equivariant to them, and the synthetic shapes are mostly upright, so this is what teaches orientations.
  ``data.crop`` trains on a random cube of ``crop`` cells around a random band node instead of the whole grid
  (origin a multiple of the latent factor, so the crop's levels are the full band's): the model is local, so
  a crop teaches it at full resolution for a fraction of the voxels (a 256^3 band holds 200k-400k nodes).
* loss: :func:`shapeflow.models.sparse_vae.sparse_vae_loss` (tsdf L1 near-weighted, child-existence BCE, KL).
* validation: the teacher-forced loss terms on every held-out object, and for the first ``data.val_meshes``
  of them a mesh decoded with the *predicted* structure (as at inference) compared with the object's surface
  samples: Chamfer-L1, F-score at 1 % of the bounding-box side, normal consistency (:mod:`shapeflow.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from shapeflow import metrics
from shapeflow.data import format as fmt
from shapeflow.data.datasets import SparseSDFDataset, collate_sparse
from shapeflow.geometry.marching_cubes import EmptySurfaceError
from shapeflow.models.sparse_vae import SparseSDFVAE, SparseSDFVAEConfig, sparse_vae_loss
from shapeflow.train.task import Task

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig


@dataclass(frozen=True)
class SparseDataConfig:
    root: str = "data/prep"  # a `shapeflow preprocess --sparse-res R` folder (R = model.resolution)
    extra_roots: tuple[str, ...] = ()  # more such folders, trained on too (their held-out part validates)
    extra_repeat: int = 1  # each extra folder's training objects count this many times (few real meshes)
    val_fraction: float = 0.1  # share of objects held out (by id hash)
    split_seed: int = 0  # seed of the id-hash split
    augment: bool = True  # random axis permutation and flips per training object
    crop: int = 0  # train on random cubes of this many cells (a multiple of the latent factor); 0 = whole bands
    val_meshes: int = 8  # held-out objects decoded to meshes per validation (0: loss terms only)
    val_mesh_points: int = 20000  # surface points per validation mesh for Chamfer / F-score


class BandAugmented(Dataset):
    """A band dataset (node grid ``[0, res]``) whose items are cropped and/or get a random axis permutation and
    random flips. A crop of ``crop`` cells around a random band node starts at a multiple of ``align`` and is
    shifted to the origin; the item then carries ``shape = crop + 1``. Uses the global RNG, which the
    training loop seeds per worker."""

    def __init__(self, ds: Dataset, res: int, *, crop: int = 0, flip: bool = True, align: int = 1):
        if crop and (crop % align or crop < align):
            raise ValueError(f"data.crop {crop} must be a positive multiple of the latent factor {align}")
        self.ds, self.res, self.flip, self.align = ds, res, flip, align
        self.crop = crop if 0 < crop < res else 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.ds[index])
        c, sdf, size = item["coords"].long(), item["sdf"], self.res  # (N, 3), (N,)
        if self.crop:
            size = self.crop
            center = c[int(torch.randint(len(c), ()))]
            origin = (center - size // 2).div(self.align, rounding_mode="floor") * self.align
            origin = origin.clamp(0, self.res - size)
            inside = ((c >= origin) & (c <= origin + size)).all(dim=1)
            c, sdf = c[inside] - origin, sdf[inside]
            item["shape"] = size + 1
        if self.flip:
            perm = torch.randperm(3)
            flipped = torch.rand(3) < 0.5
            c = torch.where(flipped, size - c[:, perm], c[:, perm])
        order = np.lexsort(c.numpy().T[::-1])  # sort by (i, j, k)
        item["coords"] = c[order].int()
        item["sdf"] = sdf[order]
        return item


def build_model(cfg: "ExperimentConfig") -> nn.Module:
    return SparseSDFVAE(cfg.model)


def _folders(cfg: "ExperimentConfig") -> list[str]:
    return [cfg.data.root, *cfg.data.extra_roots]


def build_datasets(cfg: "ExperimentConfig"):
    d, res = cfg.data, cfg.model.resolution
    common = dict(res=res, val_fraction=d.val_fraction, split_seed=d.split_seed)
    if d.extra_repeat < 1:
        raise ValueError(f"data.extra_repeat must be >= 1, got {d.extra_repeat}")
    parts = [SparseSDFDataset(root, split="train", **common) for root in _folders(cfg)]
    train = ConcatDataset(parts[:1] + [p for p in parts[1:] for _ in range(d.extra_repeat)])
    if len(train) == 0:
        raise ValueError(f"{', '.join(_folders(cfg))}: no training objects preprocessed with --sparse-res {res}")
    if d.augment or d.crop:
        train = BandAugmented(train, res, crop=d.crop, flip=d.augment, align=cfg.model.factor)
    if d.val_fraction <= 0:
        return train, None
    val = ConcatDataset([SparseSDFDataset(root, split="val", **common) for root in _folders(cfg)])
    return train, (val if len(val) else None)


def loss(model: nn.Module, batch: dict, cfg: "ExperimentConfig", step: int, frozen=None):
    return sparse_vae_loss(model, batch, cfg.model)


def _object_dir(cfg: "ExperimentConfig", oid: str) -> Path:
    for root in _folders(cfg):
        if (Path(root) / oid).is_dir():
            return Path(root) / oid
    raise FileNotFoundError(f"{oid}: not found in {', '.join(_folders(cfg))}")


@torch.no_grad()
def validate(model: SparseSDFVAE, loader: Iterable, cfg: "ExperimentConfig", frozen=None) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def add(name: str, value: float, n: int = 1) -> None:
        sums[name] = sums.get(name, 0.0) + float(value) * n
        counts[name] = counts.get(name, 0) + n

    meshed = 0
    for batch in loader:
        b = int(batch["batch_size"])
        _, logs = sparse_vae_loss(model, batch, model.config, generator=torch.Generator().manual_seed(0))
        for k, v in logs.items():
            add(k, v, b)
        coords, sdf = batch["coords"], batch["sdf"]
        for i in range(b):
            if meshed >= cfg.data.val_meshes:
                break
            meshed += 1
            sel = coords[:, 0] == i
            posterior, latent = model.encode(model.band_input(coords[sel, 1:], sdf[sel], model.config.resolution))
            try:
                v, f = model.decode_mesh(latent.replace(posterior.mode()))
            except EmptySurfaceError:
                add("f_score", 0.0)
                add("empty_mesh", 1.0)
                continue
            add("empty_mesh", 0.0)
            gt = fmt.read_sample_file(_object_dir(cfg, batch["id"][i]) / fmt.SAMPLES_FILE,
                                      ["surface_points", "surface_normals"])
            gt_pts, gt_nrm = gt["surface_points"].astype(np.float64), gt["surface_normals"].astype(np.float64)
            pts, nrm = metrics.sample_surface(v, f, cfg.data.val_mesh_points, seed=i)
            scale = float(np.ptp(gt_pts, axis=0).max())
            add("chamfer_l1", metrics.chamfer_distance(pts, gt_pts))
            add("f_score", metrics.f_score(pts, gt_pts, 0.01 * scale)[0])
            add("normal_consistency", metrics.normal_consistency(pts, nrm, gt_pts, gt_nrm))
    return {k: sums[k] / counts[k] for k in sums}


TASK = Task(name="sparse_vae", kind=SparseSDFVAE.kind, model_config=SparseSDFVAEConfig, data_config=SparseDataConfig,
            build_model=build_model, build_datasets=build_datasets, loss=loss, validate=validate,
            collate=collate_sparse)
