"""The Hunyuan3D shape generators as shapeflow models: velocity DiTs on VecSet latents ``(b, m, 64)``
conditioned on DINOv2 image tokens.

==================  =========================  ==================================================================
kind                class                      released as (Tencent-Hunyuan, ``hy3dshape/models/denoisers/``)
==================  =========================  ==================================================================
``hunyuan21_dit``   :class:`Hunyuan21DiT`      ``hunyuandit.py`` ``HunYuanDiTPlain`` (Hunyuan3D-2.1, 3.3 B)
``hunyuan20_dit``   :class:`Hunyuan20DiT`      ``hunyuan3ddit.py`` ``Hunyuan3DDiT`` (Hunyuan3D-2.0 1.1 B, 2mini 0.6 B)
==================  =========================  ==================================================================

Both are called like :class:`~shapeflow.models.dit.TokenDiT`: ``forward(x (b, m, c), t (b,), cond (b, l, d))``
returns the velocity toward data in the convention of :mod:`shapeflow.flow` (t = 0 noise, t = 1 data), which
is also Hunyuan's (its pipeline calls the output ``noise_pred``; it is ``data - noise``). The networks work on
``z * scale_factor``: that scale belongs to the VAE (``VecSetVAEConfig.latent_scale``, stored latents are
already scaled), so these DiTs have no latent normaliser of their own (``normalize_latents`` is the identity).

:class:`Hunyuan21DiT` (U-ViT with a time token):

* the time embedding is **prepended as token 0** of the sequence (no adaLN anywhere); the final layer drops it;
* block = pre-LN self-attention, pre-LN cross-attention to the image tokens, pre-LN feed-forward, each a
  residual; the blocks after the middle one first fuse a long skip from the mirrored early block
  (``LayerNorm(Linear(cat[skip, x]))``, :class:`~shapeflow.models.dit.LongSkip`);
* the last ``moe_layers`` blocks replace the MLP by a mixture of experts (:class:`MoEFeedForward`);
* qk-norm is ``torch.nn.RMSNorm(head_dim)`` on queries and keys of both attentions; GELU is exact (erf).
* time: ``sin/cos`` of ``t`` itself (no x1000) with ``width`` frequencies, then Linear(C, 4C), GELU,
  Linear(4C, C). Our :class:`~shapeflow.nn.embeddings.TimestepEmbedder` orders features ``[cos, sin]``; the
  loader permutes the released ``[sin, cos]`` columns once.

:class:`Hunyuan20DiT` (Flux-style MM-DiT, no positional embedding):

* ``double_blocks``: two streams (latents ``x``, condition ``c``), each with its own adaLN modulation
  (shift / scale / gate for attention and MLP), joint attention over ``cat[c, x]``;
* ``single_blocks``: one stream over ``cat[c, x]`` with parallel attention + MLP (``linear1`` gives q, k, v
  and the MLP input, ``linear2`` maps ``cat[attention, GELU-tanh(mlp)]`` back);
* final: adaLN (shift, scale) + Linear; time ``sin/cos`` of ``1000 t`` (256 features, ``[cos, sin]``, as
  ours) + SiLU MLP; guidance-distilled releases add the same embedding of the guidance scale.

Attention weights use shapeflow's layout (:mod:`shapeflow.nn.attention`: fused ``[q | k | v]`` rows, heads
outer); the loader (:mod:`shapeflow.models.pretrained.hunyuan_dit`) permutes Hunyuan-2.1's per-head slices of
the concatenated projections into it (vecset.md 2.2.1) and converts back for export.

Legend: b batch, m latent tokens, l condition tokens, C width, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from shapeflow.checkpoint import Pretrained
from shapeflow.models.dit import LongSkip, time_input
from shapeflow.models.pretrained import hunyuan_dit as release
from shapeflow.nn.attention import MLP, Attention, make_qk_norm, sdpa
from shapeflow.nn.embeddings import TimestepEmbedder

__all__ = ["Hunyuan21DiTConfig", "Hunyuan20DiTConfig", "Hunyuan21DiT", "Hunyuan20DiT", "MoEFeedForward"]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HunyuanConfig:
    """Fields both families share (the condition is always image tokens)."""

    in_channels: int = 64  # latent channels (the VAE's embed_dim)
    num_tokens: int = 4096  # latent tokens sampled by default (the VAE's num_latents); no weight depends on it
    width: int = 2048
    heads: int = 16
    mlp_ratio: float = 4.0
    cond_dim: int = 1024  # condition token width (DINOv2-L 1024, DINOv2-G 1536)
    cond_tokens: int = 1370  # condition tokens per image (CLS + 37 x 37 patches at 518 px)
    gradient_checkpointing: bool = False  # recompute block activations in backward
    init_from: str = ""  # training: start from this released folder or shapeflow checkpoint (same architecture)

    # what the shared DiT code paths read (generate, training tasks): image tokens, no classes
    cond: ClassVar[str] = "image"
    classes: ClassVar[tuple[str, ...]] = ()
    num_classes: ClassVar[int] = 0

    def __post_init__(self):
        for name in ("in_channels", "num_tokens", "width", "heads", "cond_dim", "cond_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ValueError(f"{type(self).__name__}: width {self.width} not divisible by {self.heads} heads")


@dataclass(frozen=True)
class Hunyuan21DiTConfig(_HunyuanConfig):
    """``HunYuanDiTPlain`` as released with Hunyuan3D-2.1 (defaults = the released config)."""

    depth: int = 21
    qkv_bias: bool = False
    moe_layers: int = 6  # the last blocks use a mixture of experts instead of the MLP
    num_experts: int = 8
    moe_top_k: int = 2
    moe_aux_weight: float = 0.01  # load-balancing loss weight while training (DeepSeek-MoE style)

    PRESETS: ClassVar[dict[str, dict]] = {
        "hunyuan21": {},  # hunyuan3d-dit-v2-1/config.yaml
        "tiny": dict(width=64, depth=5, heads=4, moe_layers=2, num_experts=4, cond_dim=32, cond_tokens=17,
                     in_channels=8, num_tokens=64),
    }

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.moe_layers <= self.depth:
            raise ValueError(f"Hunyuan21DiTConfig.moe_layers must be in [0, depth], got {self.moe_layers}")
        if self.moe_layers and not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"Hunyuan21DiTConfig.moe_top_k must be in [1, num_experts], got {self.moe_top_k}")


@dataclass(frozen=True)
class Hunyuan20DiTConfig(_HunyuanConfig):
    """``Hunyuan3DDiT`` as released with Hunyuan3D-2.0 (defaults) and 2mini (preset ``hunyuan2mini``)."""

    num_tokens: int = 3072
    width: int = 1024
    cond_dim: int = 1536  # DINOv2-G
    depth: int = 16  # double-stream blocks
    single_depth: int = 32  # single-stream blocks
    qkv_bias: bool = True
    guidance_embed: bool = False  # guidance-distilled ("-Fast" / turbo) releases embed the guidance scale

    PRESETS: ClassVar[dict[str, dict]] = {
        "hunyuan20": {},  # hunyuan3d-dit-v2-0/config.yaml
        "hunyuan2mini": dict(depth=8, single_depth=16),  # hunyuan3d-dit-v2-mini/config.yaml
        "tiny": dict(width=64, depth=2, single_depth=3, heads=4, cond_dim=32, cond_tokens=17, in_channels=8,
                     num_tokens=64),
    }


# ----------------------------------------------------------------------------------------------
# Shared behaviour
# ----------------------------------------------------------------------------------------------


class _HunyuanDiT(Pretrained, nn.Module):
    """What both families share: time handling, the identity latent normaliser, the zero null condition."""

    config: Any

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._grad_checkpointing = config.gradient_checkpointing
        self.input_layer = nn.Linear(config.in_channels, config.width)

    def _init_linears(self) -> None:
        """Xavier weights and zero biases on every linear layer (the families then zero their own outputs)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _check(self, x: torch.Tensor, cond) -> None:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.in_channels:
            raise ValueError(f"expected latents (b, m, {c.in_channels}), got {tuple(x.shape)}")
        if cond is None or cond.ndim != 3 or cond.shape[0] != x.shape[0] or cond.shape[2] != c.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"{type(self).__name__} expects image tokens ({x.shape[0]}, l, {c.cond_dim}), got {got}")

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, value: bool) -> None:
        self._grad_checkpointing = bool(value)

    def _run(self, block: nn.Module, *args):
        if self._grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Identity: the released networks work on the VAE's scaled latents as they are."""
        return z

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def null_condition(self, batch: int, *, num_tokens: int | None = None, device=None) -> torch.Tensor:
        """All-zero image tokens (Hunyuan's unconditional embedding)."""
        n = self.config.cond_tokens if num_tokens is None else int(num_tokens)
        return torch.zeros(batch, n, self.config.cond_dim, device=device)


# ----------------------------------------------------------------------------------------------
# Hunyuan3D-2.1
# ----------------------------------------------------------------------------------------------


class _AuxLoss(torch.autograd.Function):
    """Identity on ``x`` whose backward also gives ``aux`` a gradient of 1: the auxiliary loss joins the
    training objective without the loss function knowing about it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class MoEFeedForward(nn.Module):
    """Top-k mixture of MLP experts plus one always-on shared expert (DeepSeek-MoE style, Hunyuan3D-2.1).

    ``gate`` = Linear(C, E) without bias, softmax over experts, the ``top_k`` probabilities are used as they
    are (**not** renormalised to sum to 1). ``y = sum_k p_k expert_k(x) + shared(x)``. While training (and
    ``aux_weight > 0``) the load-balancing term ``aux_weight * E * sum_e mean_p(e) * share(e)`` (``share``: the
    fraction of top-k slots routed to e, no gradient) is added to the objective through :class:`_AuxLoss`, and
    kept in ``self.aux_loss`` for logging.
    """

    def __init__(self, width: int, hidden: int, num_experts: int, top_k: int, aux_weight: float = 0.01):
        super().__init__()
        self.top_k, self.aux_weight = top_k, aux_weight
        self.gate = nn.Linear(width, num_experts, bias=False)
        self.experts = nn.ModuleList([MLP(width, hidden) for _ in range(num_experts)])
        self.shared = MLP(width, hidden)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, C)
        probs = self.gate(flat).softmax(dim=-1)  # (T, E)
        weight, index = probs.topk(self.top_k, dim=-1)  # (T, k)
        out = torch.zeros_like(flat)
        grads = torch.is_grad_enabled()
        for e, expert in enumerate(self.experts):
            rows, slot = (index == e).nonzero(as_tuple=True)
            if rows.numel() == 0 and not grads:
                continue
            # with gradients, an expert no token chose still runs (on 0 rows): its gradient is then 0, not
            # None, so every data-parallel rank reduces the same tensors whatever its routing
            y = expert(flat[rows]) * weight[rows, slot, None].to(flat.dtype)
            out = out.index_add(0, rows, y.to(out.dtype))
        out = (out + self.shared(flat)).reshape(shape)
        if self.training and self.aux_weight > 0 and torch.is_grad_enabled():
            share = F.one_hot(index.reshape(-1), probs.shape[-1]).float().mean(0)  # (E,) fraction of slots
            aux = (probs.float().mean(0) * share * probs.shape[-1]).sum() * self.aux_weight
            self.aux_loss = aux.detach()
            out = _AuxLoss.apply(out, aux)
        return out


class Hunyuan21Block(nn.Module):
    """Optional long-skip fusion, then pre-LN self-attention, cross-attention and MLP / MoE residuals."""

    def __init__(self, cfg: Hunyuan21DiTConfig, *, skip: bool, moe: bool):
        super().__init__()
        C, h = cfg.width, cfg.heads
        self.skip = LongSkip(C) if skip else None
        self.norm1 = nn.LayerNorm(C, eps=1e-6)
        self.attn1 = Attention(C, heads=h, qkv_bias=cfg.qkv_bias, qk_norm="rmsnorm")
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.attn2 = Attention(C, heads=h, context_dim=cfg.cond_dim, qkv_bias=cfg.qkv_bias, qk_norm="rmsnorm")
        self.norm3 = nn.LayerNorm(C, eps=1e-6)
        hidden = int(C * cfg.mlp_ratio)
        self.mlp = None if moe else MLP(C, hidden)
        self.moe = MoEFeedForward(C, hidden, cfg.num_experts, cfg.moe_top_k, cfg.moe_aux_weight) if moe else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip is not None:
            x = self.skip(x, skip)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        ff = self.moe if self.moe is not None else self.mlp
        return x + ff(self.norm3(x))


class Hunyuan21DiT(_HunyuanDiT):
    """Hunyuan3D-2.1's shape DiT (module docstring). Submodules: ``input_layer``, ``t_embedder``, ``blocks``
    (``blocks.i.skip`` on the second half, ``blocks.i.moe`` on the last ``moe_layers``), ``final_norm``,
    ``out_layer``."""

    kind: ClassVar[str] = "hunyuan21_dit"
    config_class: ClassVar[type] = Hunyuan21DiTConfig
    releases = (release.FORMAT_21,)

    def __init__(self, config: Hunyuan21DiTConfig = Hunyuan21DiTConfig()):
        super().__init__(config)
        cfg, C = config, config.width
        self.t_embedder = TimestepEmbedder(C, freq_dim=C, time_scale=1.0, hidden=4 * C, activation="gelu")
        half = cfg.depth // 2
        self.blocks = nn.ModuleList([
            Hunyuan21Block(cfg, skip=i > half, moe=cfg.depth - i <= cfg.moe_layers) for i in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(C, eps=1e-6)
        self.out_layer = nn.Linear(C, cfg.in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, zero biases, N(0, 0.02) time MLP, zero output layer (a fresh model predicts 0)."""
        self._init_linears()
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
        """x: (b, m, c) latents, t: (b,) or scalar in [0, 1], cond: (b, l, cond_dim) -> velocity (b, m, c)."""
        self._check(x, cond)
        t = time_input(t, x)
        h = torch.cat([self.t_embedder(t)[:, None, :], self.input_layer(x)], dim=1)  # (b, 1 + m, C)
        half = len(self.blocks) // 2
        stack: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            skip = stack.pop() if block.skip is not None else None
            h = self._run(block, h, cond, skip)
            if i < half:
                stack.append(h)
        return self.out_layer(self.final_norm(h)[:, 1:])


# ----------------------------------------------------------------------------------------------
# Hunyuan3D-2.0 / 2mini
# ----------------------------------------------------------------------------------------------


class Modulation(nn.Module):
    """``Linear(SiLU(vec))`` split into ``n`` (shift, scale, gate) triples, each ``(b, 1, C)``."""

    def __init__(self, width: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(width, 3 * n * width)

    def forward(self, vec: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        parts = self.lin(F.silu(vec))[:, None, :].chunk(3 * self.n, dim=-1)
        return [tuple(parts[3 * i:3 * i + 3]) for i in range(self.n)]


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # non-affine (Flux)


class DoubleStreamBlock(nn.Module):
    """Latent stream ``x`` and condition stream ``c``, each modulated on its own, joint attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.x_mod, self.c_mod = Modulation(width, 2), Modulation(width, 2)
        self.x_attn = Attention(width, heads=heads, qkv_bias=qkv_bias, qk_norm="rmsnorm")
        self.c_attn = Attention(width, heads=heads, qkv_bias=qkv_bias, qk_norm="rmsnorm")
        self.x_mlp = MLP(width, hidden, approximate="tanh")
        self.c_mlp = MLP(width, hidden, approximate="tanh")

    def forward(self, x: torch.Tensor, c: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (xs1, xc1, xg1), (xs2, xc2, xg2) = self.x_mod(vec)
        (cs1, cc1, cg1), (cs2, cc2, cg2) = self.c_mod(vec)
        qx, kx, vx = self.x_attn.project((1 + xc1) * _ln(x) + xs1)  # (b, h, m, d)
        qc, kc, vc = self.c_attn.project((1 + cc1) * _ln(c) + cs1)  # (b, h, l, d)
        out = sdpa(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))  # (b, h, l + m, d)
        out = out.transpose(1, 2).flatten(2)  # (b, l + m, C)
        n_c = c.shape[1]
        x = x + xg1 * self.x_attn.to_out(out[:, n_c:])
        x = x + xg2 * self.x_mlp((1 + xc2) * _ln(x) + xs2)
        c = c + cg1 * self.c_attn.to_out(out[:, :n_c])
        c = c + cg2 * self.c_mlp((1 + cc2) * _ln(c) + cs2)
        return x, c


class SingleStreamBlock(nn.Module):
    """One stream, attention and MLP in parallel from one modulated input (``linear1`` / ``linear2``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.hidden = heads, int(width * mlp_ratio)
        head_dim = width // heads
        self.linear1 = nn.Linear(width, 3 * width + self.hidden)
        self.linear2 = nn.Linear(width + self.hidden, width)
        self.q_norm = make_qk_norm("rmsnorm", heads, head_dim)
        self.k_norm = make_qk_norm("rmsnorm", heads, head_dim)
        self.modulation = Modulation(width, 1)

    def forward(self, h: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        b, n, C = h.shape
        qkv, mlp = self.linear1((1 + scale) * _ln(h) + shift).split([3 * C, self.hidden], dim=-1)
        q, k, v = qkv.view(b, n, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)  # (b, h, n, d)
        out = sdpa(self.q_norm(q), self.k_norm(k), v).transpose(1, 2).flatten(2)  # (b, n, C)
        return h + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class Hunyuan20DiT(_HunyuanDiT):
    """Hunyuan3D-2.0 / 2mini's shape DiT (module docstring). Submodules: ``input_layer``, ``t_embedder``,
    optional ``guidance_embedder``, ``cond_layer``, ``double_blocks``, ``single_blocks``, ``final_modulation``,
    ``out_layer``."""

    kind: ClassVar[str] = "hunyuan20_dit"
    config_class: ClassVar[type] = Hunyuan20DiTConfig
    releases = (release.FORMAT_20,)

    def __init__(self, config: Hunyuan20DiTConfig = Hunyuan20DiTConfig()):
        super().__init__(config)
        cfg, C = config, config.width
        self.t_embedder = TimestepEmbedder(C)  # sinusoid of 1000 t, [cos, sin], as Hunyuan3D-2.0
        self.guidance_embedder = TimestepEmbedder(C) if cfg.guidance_embed else None
        self.cond_layer = nn.Linear(cfg.cond_dim, C)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(C, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias)
                                            for _ in range(cfg.depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(C, cfg.heads, cfg.mlp_ratio)
                                            for _ in range(cfg.single_depth)])
        self.final_modulation = nn.Linear(C, 2 * C)
        self.out_layer = nn.Linear(C, cfg.in_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, zero biases; modulations and the output layer start at zero (adaLN-Zero)."""
        self._init_linears()
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
        for lin in (self.final_modulation, self.out_layer):
            nn.init.zeros_(lin.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None, *,
                guidance: torch.Tensor | float | None = None) -> torch.Tensor:
        """x: (b, m, c), t: (b,) or scalar in [0, 1], cond: (b, l, cond_dim) -> velocity (b, m, c).
        ``guidance``: the guidance scale of a guidance-distilled release (``config.guidance_embed``)."""
        self._check(x, cond)
        t = time_input(t, x)
        h = self.input_layer(x)
        vec = self.t_embedder(t)  # (b, C)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this guidance-distilled DiT needs the guidance scale (guidance=...)")
            vec = vec + self.guidance_embedder(time_input(guidance, x))
        c = self.cond_layer(cond)
        for block in self.double_blocks:
            h, c = self._run(block, h, c, vec)
        n_c = c.shape[1]
        h = torch.cat([c, h], dim=1)
        for block in self.single_blocks:
            h = self._run(block, h, vec)
        shift, scale = self.final_modulation(F.silu(vec))[:, None, :].chunk(2, dim=-1)
        return self.out_layer((1 + scale) * _ln(h[:, n_c:]) + shift)
