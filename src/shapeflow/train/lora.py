"""LoRA adapters for parameter-efficient fine-tuning of any model's linear layers (Hu et al. 2021,
arXiv 2106.09685): ``y = W x + b + (alpha / r) B A x`` with ``A`` (r x in) Kaiming-initialised and ``B``
(out x r) zero, so training starts from the model exactly.

Design choices:

* **No renamed weights.** The adapter is a child module ``lora`` of the ``nn.Linear`` it adapts and its
  output is added by a forward hook, so every original key (``blocks.3.attn1.to_qkv.weight``) keeps its name
  and only ``... .lora.down.weight`` / ``... .lora.up.weight`` are new. Checkpoints of a LoRA run resume like
  any other; :func:`merge_state_dict` folds the adapters into the base weights and drops their keys, which
  gives exactly the state dict of the plain model (what ``<run>/final`` holds, and what the released layout
  export writes).
* Targets are matched by the last component of the module name (attention ``to_qkv``, ``to_q``, ``to_kv``,
  ``to_out``; MLP and expert ``fc1``, ``fc2``; single-stream ``linear1``, ``linear2``): the attention and
  feed-forward projections of every DiT in shapeflow. Everything else is frozen.
* Written here rather than with ``peft``: ``peft`` wraps each target in a new module (``base_layer``),
  which renames the keys the strict loaders, FSDP wrapping and the release export rely on; the math is a
  dozen lines.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

DEFAULT_TARGETS = ("to_qkv", "to_q", "to_kv", "to_out", "fc1", "fc2", "linear1", "linear2")
_DOWN, _UP = ".lora.down.weight", ".lora.up.weight"


class LoRA(nn.Module):
    """The low-rank update of one linear layer: ``scale * up(down(x))``."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False, device=linear.weight.device,
                              dtype=linear.weight.dtype)
        self.up = nn.Linear(rank, linear.out_features, bias=False, device=linear.weight.device,
                            dtype=linear.weight.dtype)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


def _add_update(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.lora(inputs[0]).to(output.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze ``model`` and give every targeted ``nn.Linear`` a trainable adapter; returns the adapted names.

    Raises ``ValueError`` when ``rank < 1`` or no layer matches ``targets``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = set(targets)
    alpha = float(alpha or rank)
    model.requires_grad_(False)
    adapted = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and not hasattr(module, "lora"):
            module.lora = LoRA(module, rank, alpha)
            module.register_forward_hook(_add_update)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"LoRA: no linear layer named {sorted(targets)} in {type(model).__name__}")
    return adapted


def merge_state_dict(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Fold ``W + scale * up @ down`` into each adapted weight and drop the adapter keys (the plain model's
    state dict). ``scale`` is ``alpha / rank``."""
    out = {k: v for k, v in state.items() if not (k.endswith(_DOWN) or k.endswith(_UP))}
    for key, down in state.items():
        if not key.endswith(_DOWN):
            continue
        base = key[:-len(_DOWN)] + ".weight"
        up = state[key[:-len(_DOWN)] + _UP]
        w = out[base]
        dt = torch.promote_types(w.dtype, torch.float32)
        out[base] = (w.to(dt) + scale * (up.to(dt) @ down.to(dt))).to(w.dtype)
    return out


def has_lora(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(_DOWN) for k in state)
