"""Muon with the Newton-Schulz iteration batched over same-shape matrices.

:class:`torch.optim.Muon` orthogonalises one matrix at a time: on a small model (the ``tiny`` VecSet
VAE and token DiT have 34 and 22 block matrices of a handful of shapes) the optimizer step is then a few
hundred small kernel launches, a noticeable share of a training step on a CPU
(``benchmarks/bench_optimizer.py`` times both). This subclass
computes the same update (Nesterov momentum, quintic Newton-Schulz in bfloat16 with torch's
coefficients, decoupled weight decay, torch's learning-rate adjustment) with one batched matmul per
Newton-Schulz product per shape, and ``_foreach`` ops for the element-wise parts.

Everything else is torch's: the constructor, the defaults, ``param_groups`` and the state dict (one
``momentum_buffer`` per parameter), so checkpoints move freely between the two classes. The update
matches torch's to bfloat16 rounding (batched and single matmuls may sum in another order);
``tests/test_train.py`` compares the two. ``torch.optim.Muon`` exists from torch 2.9 on, so this module
is imported only when ``train.optimizer=muon`` asks for it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: tuple[int, int]) -> float:
    """torch's Muon learning-rate adjustment for an (A, B) matrix: ``None`` / ``"original"`` (Keller
    Jordan) ``lr * sqrt(max(1, A / B))``; ``"match_rms_adamw"`` (Moonshot) ``lr * 0.2 * sqrt(max(A, B))``."""
    a, b = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr


def _newton_schulz(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                   eps: float) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of ``g`` (n, a, b) with a <= b, in bfloat16."""
    a, b, c = coefficients
    x = g.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x


class BatchedMuon(torch.optim.Muon):
    """:class:`torch.optim.Muon` with the Newton-Schulz iteration batched over same-shape matrices."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            momentum = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            lr = float(group["lr"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[tuple(p.shape)].append(i)
            for shape, idx in by_shape.items():
                g = torch.stack([updates[i] for i in idx])
                tall = shape[0] > shape[1]
                if tall:
                    g = g.mT
                o = _newton_schulz(g, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if tall:
                    o = o.mT
                step = -_adjusted_lr(lr, group["adjust_lr_fn"], shape)
                torch._foreach_add_([params[i] for i in idx], list(o.unbind(0)), alpha=step)
        return loss
