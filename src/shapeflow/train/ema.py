"""Exponential moving average of model weights (DiT ``update_ema``, LitEma warm-up).

Design choices:

* The average lives as a name -> tensor dict mirroring ``named_parameters()`` of the unwrapped model,
  so under FSDP2 each entry is a sharded DTensor like its parameter (the update is element-wise, so
  no communication); under DDP the ``module.`` wrapper is removed first.
* Buffers (e.g. norm statistics) are copied, not averaged.
* ``decay_n = min(decay, (1 + n) / (10 + n))`` with ``n`` updates since ``start`` when ``warmup`` is on;
  before ``start`` the average just copies the weights.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # public since torch 2.5
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, distribute_tensor


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 modules are not wrappers)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class EMA:
    """EMA of ``model``'s parameters (fp32 copies, same sharding) plus copied buffers."""

    def __init__(self, model: nn.Module, decay: float = 0.999, start: int = 0, warmup: bool = True):
        self.decay, self.start, self.warmup = decay, start, warmup
        m = unwrap(model)
        keys = set(m.state_dict().keys())  # persistent buffers only, tied weights under each name
        self.params = {k: p.detach().clone() for k, p in m.named_parameters(remove_duplicate=False)}
        self.buffers = {k: b.detach().clone() for k, b in m.named_buffers() if k in keys}

    def decay_at(self, step: int) -> float:
        """Decay used by the update made after optimizer step ``step`` (0-based)."""
        if step < self.start:
            return 0.0
        n = step - self.start
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        m = unwrap(model)
        for k, p in m.named_parameters(remove_duplicate=False):
            self.params[k].lerp_(p.detach(), 1.0 - d)
        for k, b in m.named_buffers():
            if k in self.buffers:
                self.buffers[k].copy_(b)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (same wrapping as at construction)."""
        m = unwrap(model)
        for k, p in m.named_parameters(remove_duplicate=False):
            p.copy_(self.params[k])
        for k, b in m.named_buffers():
            if k in self.buffers:
                b.copy_(self.buffers[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors keyed like ``model.state_dict()``.

        Under FSDP2 this gathers every shard: call it on all ranks.
        """
        out = {}
        for k, t in {**self.params, **self.buffers}.items():
            out[k] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load full tensors from :meth:`state_dict` (re-sharded to match under FSDP2); strict."""
        mine = {**self.params, **self.buffers}
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        for k, t in mine.items():
            src = state[k].to(device=t.device, dtype=t.dtype)
            if isinstance(t, DTensor):
                src = distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None)  # local slices
            elif src.shape != t.shape:
                raise ValueError(f"EMA state: {k} has shape {tuple(src.shape)}, the model {tuple(t.shape)}")
            t.copy_(src)
