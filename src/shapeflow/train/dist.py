"""Process topology from the torchrun environment, device choice, rank-0 logging and seeding.

Design choices:

* Rank, local rank and world size come only from ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (set by
  ``torchrun``); when none is set this is one process (rank 0 of 1). A partial set is an error.
* A process group is created only when ``WORLD_SIZE > 1``: NCCL when the device is CUDA, gloo on CPU.
* Logging from the library goes through :func:`print0` (INFO on rank 0 only); no ``print``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def get_dist_info() -> DistInfo:
    """Read ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (torchrun); single process when all are absent."""
    present = [k for k in _ENV if k in os.environ]
    if not present:
        return DistInfo()
    if len(present) != len(_ENV):
        missing = ", ".join(k for k in _ENV if k not in os.environ)
        raise ValueError(f"distributed environment is incomplete: {missing} not set (launch with torchrun)")
    try:
        info = DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise ValueError("RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    if not (0 <= info.rank < info.world_size and info.local_rank >= 0):
        raise ValueError(f"bad distributed environment: RANK={info.rank} WORLD_SIZE={info.world_size}")
    return info


def select_device(info: DistInfo, requested: str = "auto") -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (or requested), else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available on this machine")
    if info.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} CUDA devices")
    device = torch.device("cuda", info.local_rank)
    torch.cuda.set_device(device)
    return device


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Create the default process group when ``world_size > 1`` (NCCL on CUDA, gloo on CPU)."""
    if not info.is_distributed or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "rank": info.rank, "world_size": info.world_size}
    if device.type == "cuda":
        kwargs["device_id"] = device
    torch_dist.init_process_group(**kwargs)
    print0(f"process group: {backend}, world size {info.world_size}")


def destroy_distributed() -> None:
    """Tear down the default process group if this process created one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def is_main_process() -> bool:
    return not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_rank() == 0


def print0(msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log ``msg % args`` once per job (rank 0 only)."""
    if is_main_process():
        log.log(level, msg, *args)


def barrier() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (in place; identity in a single process)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        t /= torch_dist.get_world_size()
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` in a single process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The python / numpy / torch / CUDA RNG states of this process.

    Only lists, tuples, ints, floats and tensors, so ``torch.load(weights_only=True)`` reads it back.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
