"""The task contract: everything the generic loop (:mod:`shapeflow.train.loop`) needs from one model family.

A :class:`Task` bundles the model config class, the data config class, and a few functions. The loop
owns everything else (optimizer, schedule, precision, EMA, DDP/FSDP, data order, checkpoints, logs).

Contract (what the loop guarantees and expects)
-----------------------------------------------
* ``build_model(cfg) -> nn.Module`` gets the whole :class:`~shapeflow.train.experiment.ExperimentConfig`
  and returns the model on CPU in fp32. It runs after ``torch.manual_seed(cfg.train.seed)`` on every
  rank, so all ranks start from identical weights. For ``train.grad_checkpointing`` the model must have
  a boolean attribute ``grad_checkpointing`` (the loop sets it to True; models check it in forward).
* ``build_datasets(cfg) -> (train_ds, val_ds | None)``: map-style datasets (``__len__`` and
  ``__getitem__``). The loop shuffles with a per-epoch permutation seeded by ``train.seed``, splits each
  global batch across ranks, and **seeds python/numpy/torch RNGs from (seed, epoch, index) around every
  ``__getitem__``**: random augmentation inside ``__getitem__`` may use the global RNGs freely and stays
  reproducible across worker counts, world sizes and ``--resume``.
* ``build_frozen(cfg, device) -> Any`` (optional): helpers the loss needs but training does not update,
  built once per run on the training device (e.g. the frozen DINOv2 image encoder of an
  image-conditioned DiT). The loop passes the result to ``loss`` and ``validate`` as ``frozen``
  (``None`` without the hook), so no task keeps module-level state.
* ``loss(model, batch, cfg, step, frozen) -> (loss, logs)``: ``batch`` is what the DataLoader yields
  (``collate`` or torch's default collate), with every tensor inside dicts/lists/tuples already on the
  device. ``model`` is the (possibly DDP/FSDP-wrapped) module: **call it only through ``model(...)``**
  (forward), so gradient synchronisation and FSDP unsharding happen; put what the loss needs into
  ``forward``. ``loss`` is a scalar tensor, the mean over this rank's micro-batch (so the engine's
  average over micro-batches and ranks is the global-batch mean). ``logs`` maps names to 0-dim tensors
  (or floats), with the same keys on every rank and step; the engine keeps them on the device and reads
  them out at log steps only. It runs under autocast (bf16 on GPU by default); compute losses in fp32
  (``pred.float()``). ``step`` is the number of updates done so far (0 for the first); randomness may
  use the global torch RNG (seeded per rank, restored on resume).
* ``validate(model, val_loader, cfg, frozen) -> dict[str, float]`` (optional): ``model`` is a plain
  (unwrapped, unsharded) module in eval mode, called under ``torch.no_grad()`` and autocast; any method
  may be used (encode/decode, mesh extraction). ``val_loader`` yields device batches of this rank's
  contiguous shard of the validation set. Return **per-sample means**: the engine averages them over
  ranks weighted by shard size. Without ``validate`` the engine reports the mean of ``loss``'s logs.
* ``collate`` (optional): DataLoader ``collate_fn`` (runs in workers; keep it deterministic).
* ``export(cfg, final_dir)`` (optional): runs on rank 0 after ``<out_dir>/final`` is written (e.g. the
  fine-tuned weights in a public release's layout next to it).
* ``kind``: the model family the task trains, a key of :data:`shapeflow.models.MODELS` (None for models
  outside the registry, such as the toy task's MLP). It is written into every checkpoint's ``config.json``
  so that :func:`shapeflow.models.load_model` can rebuild the model from the checkpoint alone.
* Model presets (``model.preset``) come from the model config class's ``PRESETS``
  (:func:`shapeflow.config.build`).

Adding a task
-------------
Write the functions next to the others (e.g. ``shapeflow/train/task_vecset.py``), end the file with
``TASK = Task(name=..., kind=..., model_config=..., ...)``, and add it to the tuple in
:mod:`shapeflow.train.tasks`; then an experiment file says ``task: <name>``. No import-path strings in
configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig

LossFn = Callable[[nn.Module, Any, "ExperimentConfig", int, Any], "tuple[Tensor, Mapping[str, float | Tensor]]"]
ValidateFn = Callable[[nn.Module, Iterable, "ExperimentConfig", Any], "Mapping[str, float]"]


@dataclass(frozen=True)
class Task:
    """One trainable model family (see the module docstring for the contract of each function)."""

    name: str
    kind: str | None  # model family in shapeflow.models.MODELS (written into checkpoints); None: outside it
    model_config: type  # dataclass of the model's hyper-parameters (``model:`` section)
    data_config: type  # dataclass of the dataset options (``data:`` section)
    build_model: Callable[["ExperimentConfig"], nn.Module]
    build_datasets: Callable[["ExperimentConfig"], "tuple[Dataset, Dataset | None]"]
    loss: LossFn
    validate: ValidateFn | None = None
    collate: Callable[[list], Any] | None = None
    objective_config: type | None = None  # dataclass of the ``objective:`` section (loss weights, flow schedule)
    build_frozen: Callable[["ExperimentConfig", torch.device], Any] | None = None  # helpers the loss reads
    export: Callable[["ExperimentConfig", Path], None] | None = None  # extra exports of <out_dir>/final
