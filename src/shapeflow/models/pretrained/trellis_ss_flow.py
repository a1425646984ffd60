"""TRELLIS's released sparse-structure flow model (``ss_flow_img_dit_L_16l8_fp16``) -> a
:class:`~shapeflow.models.dit.GridDiT` config and state dict.

TRELLIS (Xiang et al. 2024, arXiv 2412.01506) ships ``ckpts/ss_flow_img_dit_L_16l8_fp16.json``
(``{"name": "SparseStructureFlowModel", "args": {...}}``) and the matching ``.safetensors`` (fp16).
:func:`convert` reads both (fp16 -> fp32); ``GridDiT.from_pretrained(prefix)`` builds and loads the model
strictly. By default (``convention="shapeflow"``) the time flip and the sign flip below are folded into
the weights, so the result is an ordinary shapeflow velocity model: it samples with
:func:`shapeflow.sampling.sample` and fine-tunes with :func:`shapeflow.flow.flow_matching_loss`
unchanged. ``convention="trellis"`` keeps TRELLIS's weights as stored (the model's forward then equals
TRELLIS's ``forward(x, t' * 1000, cond)`` given ``t'``); :class:`TrellisFlowAdapter` wraps such a model at
run time instead.

Key mapping (TRELLIS -> shapeflow); every other key has the same name in both:

============================================  ===========================================
TRELLIS                                        shapeflow
============================================  ===========================================
``blocks.{i}.self_attn.q_rms_norm.gamma``      ``blocks.{i}.self_attn.q_norm.gamma``
``blocks.{i}.self_attn.k_rms_norm.gamma``      ``blocks.{i}.self_attn.k_norm.gamma``
``blocks.{i}.cross_attn.q_rms_norm.gamma``     ``blocks.{i}.cross_attn.q_norm.gamma``
``blocks.{i}.cross_attn.k_rms_norm.gamma``     ``blocks.{i}.cross_attn.k_norm.gamma``
``blocks.{i}.mlp.mlp.0.{weight,bias}``         ``blocks.{i}.mlp.fc1.{weight,bias}``
``blocks.{i}.mlp.mlp.2.{weight,bias}``         ``blocks.{i}.mlp.fc2.{weight,bias}``
============================================  ===========================================

Unchanged: ``pos_emb``, ``t_embedder.mlp.{0,2}``, ``input_layer``, ``blocks.{i}.norm2``,
``blocks.{i}.self_attn.{to_qkv,to_out}``, ``blocks.{i}.cross_attn.{to_q,to_kv,to_out}``,
``blocks.{i}.adaLN_modulation.1``, ``out_layer``. The q/k/v row layouts already agree
(``[q|k|v]`` / ``[k|v]`` blocks with heads outer, :mod:`shapeflow.nn.attention`).

Time convention (sparse_voxel.md section 3.1). TRELLIS uses ``t'`` with ``t' = 1`` noise::

    x_t' = (1 - t') x0 + (sigma_min + (1 - sigma_min) t') eps,   target v' = (1 - sigma_min) eps - x0,

and calls the network with ``1000 t'``. shapeflow's path ``x_t = (1 - t) eps + t x0`` is the same
path with ``t' = 1 - t`` once ``sigma_min = 1e-5`` is neglected (relative difference 1e-5 in the
noise coefficient, which TRELLIS's own Euler sampler also ignores). Then
``dx/dt = -dx/dt' = x0 - (1 - sigma_min) eps ~= x0 - eps``, so::

    our_velocity(x, t, cond) = -trellis_net(x, 1000 * (1 - t), cond)

(:class:`GridDiT` multiplies its time input by 1000, so the adapter passes ``1 - t``).

Folding it into the weights (:func:`fold_trellis_convention`, exact up to float rounding): the sign is
``out_layer`` negated; for the time, the sinusoid of ``1000 (1 - t)`` is a fixed rotation of the
sinusoid of ``1000 t`` per frequency, absorbed into the columns of ``t_embedder.mlp.0.weight``
(:func:`shapeflow.nn.embeddings.reverse_time_weight`).

With this,
:func:`shapeflow.sampling.sample` with ``method="euler"`` reproduces TRELLIS's ``FlowEulerSampler``
step for step: its grid ``rescale_t`` equals our ``shift``, its CFG strength ``w'`` in
``(1 + w') c - w' u`` equals our ``cfg_scale = 1 + w'``, and its guidance interval ``[a, b]`` in ``t'``
is ``(1 - b, 1 - a)`` in ``t``. :data:`TRELLIS_SAMPLER_DEFAULTS` holds the released pipeline's values
(25 steps, cfg 5.0 -> 6.0, interval [0.5, 1.0] -> (0.0, 0.5), rescale_t 3.0) in our terms.

Condition: DINOv2 ViT-L/14 with registers, all 1374 tokens before the final norm, non-affine
layer norm (``ImageConditionerConfig.trellis()``); the null condition is all zeros.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from shapeflow.checkpoint import Release, ReleaseFormat
from shapeflow.nn.embeddings import reverse_time_weight, sincos_3d_position_embedding

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "TRELLIS_KEY_MAP",
    "TRELLIS_SAMPLER_DEFAULTS",
    "TrellisFlowAdapter",
    "convert",
    "convert_trellis_state_dict",
    "detect",
    "fold_trellis_convention",
    "grid_dit_config_from_trellis",
]

# Per-block key renames (regex on the full key -> replacement); all other keys keep their names.
TRELLIS_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^blocks\.(\d+)\.(self_attn|cross_attn)\.q_rms_norm\.gamma$", r"blocks.\1.\2.q_norm.gamma"),
    (r"^blocks\.(\d+)\.(self_attn|cross_attn)\.k_rms_norm\.gamma$", r"blocks.\1.\2.k_norm.gamma"),
    (r"^blocks\.(\d+)\.mlp\.mlp\.0\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^blocks\.(\d+)\.mlp\.mlp\.2\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
)

# TRELLIS-image-large pipeline.json sparse-structure sampler (steps 25, cfg_strength 5.0,
# cfg_interval [0.5, 1.0], rescale_t 3.0), converted to shapeflow.sampling.sample arguments.
TRELLIS_SAMPLER_DEFAULTS = dict(method="euler", steps=25, shift=3.0, cfg_scale=6.0, cfg_interval=(0.0, 0.5))

_TRELLIS_ARGS = {"resolution", "in_channels", "model_channels", "cond_channels", "out_channels", "num_blocks",
                 "num_heads", "num_head_channels", "mlp_ratio", "patch_size", "pe_mode", "use_fp16",
                 "use_checkpoint", "share_mod", "qk_rms_norm", "qk_rms_norm_cross"}


def convert_trellis_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename TRELLIS ``SparseStructureFlowModel`` keys to :class:`GridDiT` keys and cast to float32."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in TRELLIS_KEY_MAP:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value.float() if value.is_floating_point() else value
    return out


def grid_dit_config_from_trellis(obj: dict, *, source: str = "TRELLIS config") -> dict[str, Any]:
    """:class:`GridDiTConfig` fields of a TRELLIS ``{"name": "SparseStructureFlowModel", "args": {...}}`` JSON."""
    if obj.get("name") != "SparseStructureFlowModel":
        raise ValueError(f"{source}: model name is {obj.get('name')!r}, expected 'SparseStructureFlowModel'")
    args = dict(obj.get("args", {}))
    unknown = sorted(set(args) - _TRELLIS_ARGS)
    if unknown:
        raise ValueError(f"{source}: unknown SparseStructureFlowModel args {unknown}")
    missing = sorted({"resolution", "in_channels", "model_channels", "cond_channels", "out_channels",
                      "num_blocks"} - set(args))
    if missing:
        raise ValueError(f"{source}: missing SparseStructureFlowModel args {missing}")
    if args["out_channels"] != args["in_channels"]:
        raise ValueError(f"{source}: out_channels {args['out_channels']} != in_channels "
                         f"{args['in_channels']} "
                         "(a velocity model needs equal counts)")
    if args.get("pe_mode", "ape") != "ape":
        raise ValueError(f"{source}: pe_mode {args['pe_mode']!r} is not supported (only 'ape', as released)")
    if args.get("share_mod", False):
        raise ValueError(f"{source}: share_mod=true is not supported (the released v1 configs use false)")
    heads = args.get("num_heads") or args["model_channels"] // args.get("num_head_channels", 64)
    return dict(
        resolution=args["resolution"], in_channels=args["in_channels"], width=args["model_channels"],
        depth=args["num_blocks"], heads=heads, mlp_ratio=float(args.get("mlp_ratio", 4)),
        patch_size=args.get("patch_size", 2), cond="image", cond_dim=args["cond_channels"],
        qk_norm="rms" if args.get("qk_rms_norm", False) else None,
        qk_norm_cross="rms" if args.get("qk_rms_norm_cross", False) else None,
        qkv_bias=True, gelu_approximate="tanh", final_adaln=False, long_skip=False,
        gradient_checkpointing=bool(args.get("use_checkpoint", False)),
    )


def _pair(path) -> tuple[Path, Path]:
    """``(json, safetensors)`` of a TRELLIS checkpoint given the prefix or either file."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.parent / (stem.name + ".json"), stem.parent / (stem.name + ".safetensors")


def is_trellis_checkpoint(path) -> bool:
    """True if ``path`` (prefix, ``.json`` or ``.safetensors``) names a TRELLIS flow json/safetensors pair."""
    if Path(path).is_dir():
        return False
    js, st = _pair(path)
    if not (js.is_file() and st.is_file()):
        return False
    try:
        return json.loads(js.read_text(encoding="utf-8")).get("name") == "SparseStructureFlowModel"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


@torch.no_grad()
def fold_trellis_convention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TRELLIS-convention GridDiT state dict rewritten so that ``model(x, t) == -trellis(x, 1000 (1 - t))``.

    Negates ``out_layer`` and rotates the columns of ``t_embedder.mlp.0.weight`` (module docstring).
    """
    out = dict(state)
    out["t_embedder.mlp.0.weight"] = reverse_time_weight(state["t_embedder.mlp.0.weight"])
    out["out_layer.weight"] = -state["out_layer.weight"]
    out["out_layer.bias"] = -state["out_layer.bias"]
    return out


def convert(path: str | Path, *, convention: str = "shapeflow") -> Release:
    """TRELLIS's sparse-structure flow files as a :class:`~shapeflow.checkpoint.Release`.

    Parameters
    ----------
    path : ``.../ss_flow_img_dit_L_16l8_fp16`` (prefix), or its ``.json`` or ``.safetensors`` file.
    convention : ``"shapeflow"`` (default): t = 0 noise, velocity data - noise, folded into the weights
        (:func:`fold_trellis_convention`); ``"trellis"``: the weights as stored, TRELLIS's convention.

    Raises
    ------
    FileNotFoundError if either file is missing; ``ValueError`` for an unsupported config.
    """
    if convention not in ("shapeflow", "trellis"):
        raise ValueError(f"convention must be 'shapeflow' or 'trellis', got {convention!r}")
    js, st = _pair(path)
    for f in (js, st):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (TRELLIS checkpoints are a .json + .safetensors pair)")
    try:
        obj = json.loads(js.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{js}: invalid JSON ({err})") from None
    cfg = grid_dit_config_from_trellis(obj, source=str(js))
    raw = load_file(str(st))
    state = convert_trellis_state_dict(raw)
    # TRELLIS' sparse-structure latents are not normalised (``normalization: null``): identity buffers.
    for key in ("latent_mean", "latent_std"):
        if key in state:
            raise ValueError(f"{st}: unexpected key {key!r} in a TRELLIS checkpoint")
    state["latent_mean"] = torch.zeros(cfg["in_channels"])
    state["latent_std"] = torch.ones(cfg["in_channels"])
    if "pos_emb" in state:
        expected = sincos_3d_position_embedding(cfg["resolution"] // cfg["patch_size"], cfg["width"])
        if state["pos_emb"].shape == expected.shape and (state["pos_emb"] - expected).abs().max().item() > 1e-2:
            log.warning("%s: stored pos_emb differs from the 3D sin-cos formula (using the stored one)", st)
    if convention == "shapeflow":
        state = fold_trellis_convention(state)
    names = {convert_trellis_state_dict({k: v}).popitem()[0]: k for k, v in raw.items()}
    return Release(config=cfg, state=state, source=str(st), names=names)


def detect(path: Path) -> bool:
    """True if ``path`` (prefix, ``.json`` or ``.safetensors``) names a TRELLIS flow json/safetensors pair."""
    return is_trellis_checkpoint(path)


class TrellisFlowAdapter(nn.Module):
    """Wrap a TRELLIS-convention :class:`GridDiT` (``convention="trellis"``) to predict shapeflow velocities.

    ``forward(x, t, cond) = -model(x, 1 - t, cond)`` with ``t`` in [0, 1], 0 = noise (module docstring).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        return -self.model(x, 1.0 - t, cond)


FORMAT = ReleaseFormat("TRELLIS sparse-structure flow", detect, convert)
