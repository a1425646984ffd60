"""Hunyuan3D shape-DiT releases (2.1, 2.0, 2mini and their guidance-distilled variants) <-> shapeflow.

What is read, as published (HF ``tencent/Hunyuan3D-2.1`` ``hunyuan3d-dit-v2-1/``, ``tencent/Hunyuan3D-2``
``hunyuan3d-dit-v2-0[-fast|-turbo]/``, ``tencent/Hunyuan3D-2mini`` ``hunyuan3d-dit-v2-mini[-turbo]/``): a folder
with ``config.yaml`` (sections ``model``, ``vae``, ``conditioner``, ``scheduler``, ``image_processor``, each
``{target, params}``) and ``model.fp16.ckpt`` (``torch.save({'model', 'vae', 'conditioner'})``) or the
``.safetensors`` variant (flat ``model.*`` / ``vae.*`` / ``conditioner.*`` keys). ``model.target`` decides the
family: ``...HunYuanDiTPlain`` -> :class:`~shapeflow.models.hunyuan_dit.Hunyuan21DiT`, ``...Hunyuan3DDiT`` ->
:class:`~shapeflow.models.hunyuan_dit.Hunyuan20DiT`.

Conversions (``shared/reference/vecset.md`` 2.2.1; all exact, so :func:`export_release` inverts them):

* 2.1 self-attention: ``to_q``, ``to_k``, ``to_v`` are concatenated and head ``h`` takes rows
  ``[h*3d, (h+1)*3d)`` of the concatenation as its (q, k, v). Our fused ``to_qkv`` holds ``[q | k | v]`` with
  heads outer: ``cat(Wq, Wk, Wv).view(h, 3, d, in).transpose(0, 1)``. Cross-attention likewise with
  ``cat(Wk, Wv).view(h, 2, d, in)`` into ``to_kv``; its ``to_q`` splits as usual.
* 2.1 time: the released sinusoid is ``[sin, cos]``, ours ``[cos, sin]``: the two column halves of
  ``t_embedder.mlp.0.weight`` swap. The 2.0 time embedding already has our order and scale.
* Renames only otherwise (tables :data:`RENAMES_21`, :data:`RENAMES_20`); RMSNorm ``scale`` -> ``weight``.
* The model output is the velocity toward data in both, t = 0 noise: no sign or time flip.

Nothing here builds the DiT: :meth:`shapeflow.checkpoint.Pretrained.from_pretrained` does, strictly, from what
:func:`convert_21` / :func:`convert_20` return. :func:`release_conditioner` builds the release's own DINOv2
from the ``conditioner`` group, :func:`release_settings` reads the sampler, VAE scale and image settings.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shapeflow.checkpoint import Release, ReleaseFormat, load_state_dict_strict, write_dir
from shapeflow.models.conditioning import ImageConditioner, ImageConditionerConfig
from shapeflow.models.pretrained.hunyuan_vae import _read_yaml, _weights_file

log = logging.getLogger(__name__)

__all__ = ["FORMAT_21", "FORMAT_20", "RENAMES_21", "RENAMES_20", "ReleaseSettings", "read_group", "convert_21",
           "convert_20", "export_release", "release_settings", "release_conditioner", "is_release", "read_groups",
           "HUNYUAN_SAMPLER"]

#: The reference pipeline's defaults (``Hunyuan3DDiTFlowMatchingPipeline.__call__``): 50 model calls on
#: ``sigmas = linspace(0, 1, 50)`` followed by a zero-length step, i.e. shapeflow's Euler with 49 steps
#: (the 50th call cannot change the result); guidance 5.0 as ``u + s (c - u)``; octree resolution 384,
#: bounds 1.01, level 0.
HUNYUAN_SAMPLER = dict(steps=49, method="euler", shift=1.0, cfg_scale=5.0, resolution=384)

# ----------------------------------------------------------------------------------------------
# Key tables (released name regex -> shapeflow name); unmatched names are kept as they are
# ----------------------------------------------------------------------------------------------

_WB = r"(weight|bias)"
RENAMES_21: tuple[tuple[str, str], ...] = (
    (rf"x_embedder\.{_WB}", r"input_layer.\1"),
    (rf"blocks\.(\d+)\.attn([12])\.out_proj\.{_WB}", r"blocks.\1.attn\2.to_out.\3"),
    (rf"blocks\.(\d+)\.skip_(linear|norm)\.{_WB}", r"blocks.\1.skip.skip_\2.\3"),
    (rf"blocks\.(\d+)\.moe\.experts\.(\d+)\.net\.0\.proj\.{_WB}", r"blocks.\1.moe.experts.\2.fc1.\3"),
    (rf"blocks\.(\d+)\.moe\.experts\.(\d+)\.net\.2\.{_WB}", r"blocks.\1.moe.experts.\2.fc2.\3"),
    (rf"blocks\.(\d+)\.moe\.shared_experts\.net\.0\.proj\.{_WB}", r"blocks.\1.moe.shared.fc1.\2"),
    (rf"blocks\.(\d+)\.moe\.shared_experts\.net\.2\.{_WB}", r"blocks.\1.moe.shared.fc2.\2"),
    (rf"final_layer\.norm_final\.{_WB}", r"final_norm.\1"),
    (rf"final_layer\.linear\.{_WB}", r"out_layer.\1"),
)
RENAMES_20: tuple[tuple[str, str], ...] = (
    (rf"latent_in\.{_WB}", r"input_layer.\1"),
    (rf"time_in\.in_layer\.{_WB}", r"t_embedder.mlp.0.\1"),
    (rf"time_in\.out_layer\.{_WB}", r"t_embedder.mlp.2.\1"),
    (rf"guidance_in\.in_layer\.{_WB}", r"guidance_embedder.mlp.0.\1"),
    (rf"guidance_in\.out_layer\.{_WB}", r"guidance_embedder.mlp.2.\1"),
    (rf"cond_in\.{_WB}", r"cond_layer.\1"),
    (rf"double_blocks\.(\d+)\.img_mod\.lin\.{_WB}", r"double_blocks.\1.x_mod.lin.\2"),
    (rf"double_blocks\.(\d+)\.txt_mod\.lin\.{_WB}", r"double_blocks.\1.c_mod.lin.\2"),
    (rf"double_blocks\.(\d+)\.img_attn\.qkv\.{_WB}", r"double_blocks.\1.x_attn.to_qkv.\2"),
    (rf"double_blocks\.(\d+)\.txt_attn\.qkv\.{_WB}", r"double_blocks.\1.c_attn.to_qkv.\2"),
    (rf"double_blocks\.(\d+)\.img_attn\.proj\.{_WB}", r"double_blocks.\1.x_attn.to_out.\2"),
    (rf"double_blocks\.(\d+)\.txt_attn\.proj\.{_WB}", r"double_blocks.\1.c_attn.to_out.\2"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.(query|key)_norm\.scale", r"double_blocks.\1.x_attn.\2_norm.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.(query|key)_norm\.scale", r"double_blocks.\1.c_attn.\2_norm.weight"),
    (rf"double_blocks\.(\d+)\.img_mlp\.0\.{_WB}", r"double_blocks.\1.x_mlp.fc1.\2"),
    (rf"double_blocks\.(\d+)\.img_mlp\.2\.{_WB}", r"double_blocks.\1.x_mlp.fc2.\2"),
    (rf"double_blocks\.(\d+)\.txt_mlp\.0\.{_WB}", r"double_blocks.\1.c_mlp.fc1.\2"),
    (rf"double_blocks\.(\d+)\.txt_mlp\.2\.{_WB}", r"double_blocks.\1.c_mlp.fc2.\2"),
    (r"single_blocks\.(\d+)\.norm\.(query|key)_norm\.scale", r"single_blocks.\1.\2_norm.weight"),
    (rf"final_layer\.linear\.{_WB}", r"out_layer.\1"),
    (rf"final_layer\.adaLN_modulation\.1\.{_WB}", r"final_modulation.\1"),
)
_QK = {"query": "q", "key": "k"}


def _rename(key: str, table) -> str:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m:
            out = m.expand(template)
            return re.sub(r"\.(query|key)_norm\.", lambda g: f".{_QK[g.group(1)]}_norm.", out)
    return key


# 2.1 fused attention projections: (released key regex, shapeflow key template, part index, parts)
_FUSED_21 = re.compile(r"blocks\.(\d+)\.attn([12])\.to_([qkv])\.(weight|bias)")


def _fused_target(key: str) -> tuple[str, int, int] | None:
    """For a released 2.1 ``to_q/k/v`` key: ``(our key, part, parts)``, or None (cross-attention ``to_q`` and
    other keys)."""
    m = _FUSED_21.fullmatch(key)
    if m is None:
        return None
    i, attn, which, wb = m.groups()
    if attn == "1":
        return f"blocks.{i}.attn1.to_qkv.{wb}", "qkv".index(which), 3
    if which == "q":
        return None
    return f"blocks.{i}.attn2.to_kv.{wb}", "kv".index(which), 2


def _heads_interleaved_to_blocked(cat: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    """Rows of ``cat(W_1, .., W_parts)`` with head ``h`` owning rows ``[h*parts*d, (h+1)*parts*d)`` ->
    ``[W'_1 | .. | W'_parts]`` with heads outer (our layout)."""
    d = cat.shape[0] // (heads * parts)
    return cat.reshape(heads, parts, d, *cat.shape[1:]).transpose(0, 1).reshape(cat.shape)


def _heads_blocked_to_interleaved(ours: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    d = ours.shape[0] // (heads * parts)
    return ours.reshape(parts, heads, d, *ours.shape[1:]).transpose(0, 1).reshape(ours.shape)


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """``[sin | cos]`` columns <-> ``[cos | sin]`` (its own inverse)."""
    half = w.shape[1] // 2
    return torch.cat([w[:, half:], w[:, :half]], dim=1)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _model_target(path: Path) -> str | None:
    cfg = path / "config.yaml"
    if not path.is_dir() or not cfg.is_file():
        return None
    node = _read_yaml(cfg).get("model")
    return str(node.get("target", "")) if isinstance(node, dict) else None


def is_release(path) -> bool:
    """A Hunyuan3D DiT release folder of either family."""
    target = _model_target(Path(path)) or ""
    return target.endswith("HunYuanDiTPlain") or target.endswith("Hunyuan3DDiT")


GROUPS = ("model", "vae", "conditioner")


def read_groups(path: Path, groups: tuple[str, ...] = GROUPS) -> dict[str, dict[str, torch.Tensor]]:
    """Groups (``model``, ``vae``, ``conditioner``) of a release folder's weights, as stored (fp16), from one
    read of the file. Only the asked-for tensors are read: ``safe_open`` for ``.safetensors``, a memory-mapped
    ``torch.load`` for ``.ckpt`` (a 2.1 checkpoint is 7 GB; its conditioner alone is 0.6 GB)."""
    wfile = _weights_file(path)
    if wfile.suffix == ".safetensors":
        try:
            with safe_open(str(wfile), framework="pt") as f:
                return {g: {k[len(g) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(g + ".")}
                        for g in groups}
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{wfile}: not a readable safetensors file ({err})") from None
    try:
        try:
            obj = torch.load(wfile, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            obj = torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{wfile}: not a readable torch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{wfile}: expected a dict of state dicts (torch.save of model/vae/conditioner)")
    out = {}
    for g in groups:
        sd = obj.get(g, {})
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{wfile}: the {g!r} group is not a state dict of tensors")
        out[g] = dict(sd)
    return out


def read_group(path: Path, group: str) -> dict[str, torch.Tensor]:
    """One group of a release folder's weights (:func:`read_groups`)."""
    return read_groups(path, (group,))[group]


def _params(path: Path, section: str) -> dict:
    cfg = _read_yaml(path / "config.yaml")
    node = cfg.get(section) or {}
    params = node.get("params") if isinstance(node, dict) else None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{path / 'config.yaml'}: {section}.params is not a mapping")
    return dict(params)


def _conditioner_kwargs(path: Path) -> dict:
    main = _params(path, "conditioner").get("main_image_encoder") or {}
    return dict(main.get("kwargs") or {}) if isinstance(main, dict) else {}


def _cond_tokens(path: Path, default: int) -> int:
    kw = _conditioner_kwargs(path)
    if "image_size" not in kw:
        return default
    n = (int(kw["image_size"]) // 14) ** 2
    return n + (1 if kw.get("use_cls_token", True) else 0)


def _unsupported(source: str, params: dict, allowed: dict[str, Any]) -> None:
    bad = {k: params[k] for k, v in allowed.items() if k in params and params[k] != v and params[k] is not None}
    if bad:
        raise ValueError(f"{source}: settings shapeflow's model does not have: {bad} (released configs use "
                         f"{ {k: allowed[k] for k in bad} })")


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

#: ``HunYuanDiTPlain.__init__`` defaults for params a config omits.
DEFAULTS_21 = dict(input_size=1024, in_channels=4, hidden_size=1024, context_dim=1024, depth=24, num_heads=16,
                   text_len=257, qkv_bias=True, num_moe_layers=6, num_experts=8, moe_top_k=2)
#: ``Hunyuan3DDiT.__init__`` defaults.
DEFAULTS_20 = dict(in_channels=64, context_in_dim=1536, hidden_size=1024, mlp_ratio=4.0, num_heads=16, depth=16,
                   depth_single_blocks=32, qkv_bias=True, time_factor=1000, guidance_embed=False)


def config_21(params: dict, *, source: str, cond_tokens: int | None = None) -> dict[str, Any]:
    """Hunyuan21DiTConfig fields from ``HunYuanDiTPlain`` params (one-line errors for what we do not model)."""
    _unsupported(source, params, dict(use_pos_emb=False, use_attention_pooling=False, with_decoupled_ca=False,
                                      qk_norm=True, qk_norm_type="rms", norm_type="layer", mlp_ratio=4.0))
    if not params.get("qk_norm", False):
        raise ValueError(f"{source}: qk_norm false; shapeflow's Hunyuan21DiT has RMS qk-norm (released: true)")
    if params.get("use_attention_pooling", True):
        raise ValueError(f"{source}: use_attention_pooling true (its default); released configs set it false")
    if params.get("guidance_cond_proj_dim") is not None:
        raise ValueError(f"{source}: guidance_cond_proj_dim is not supported")
    p = {**DEFAULTS_21, **params}
    return dict(in_channels=int(p["in_channels"]), num_tokens=int(p["input_size"]), width=int(p["hidden_size"]),
                cond_dim=int(p["context_dim"]), depth=int(p["depth"]), heads=int(p["num_heads"]),
                cond_tokens=int(cond_tokens or p["text_len"]), qkv_bias=bool(p["qkv_bias"]),
                moe_layers=int(p["num_moe_layers"]), num_experts=int(p["num_experts"]),
                moe_top_k=int(p["moe_top_k"]))


def config_20(params: dict, *, source: str, num_tokens: int | None = None,
              cond_tokens: int | None = None) -> dict[str, Any]:
    """Hunyuan20DiTConfig fields from ``Hunyuan3DDiT`` params."""
    p = {**DEFAULTS_20, **params}
    if float(p["time_factor"]) != 1000:
        raise ValueError(f"{source}: time_factor {p['time_factor']}; shapeflow's Hunyuan20DiT embeds 1000 t")
    width, heads = int(p["hidden_size"]), int(p["num_heads"])
    if "axes_dim" in p and sum(p["axes_dim"]) != width // heads:
        raise ValueError(f"{source}: axes_dim {p['axes_dim']} does not sum to the head width {width // heads}")
    out = dict(in_channels=int(p["in_channels"]), width=width, heads=heads, cond_dim=int(p["context_in_dim"]),
               mlp_ratio=float(p["mlp_ratio"]), depth=int(p["depth"]), single_depth=int(p["depth_single_blocks"]),
               qkv_bias=bool(p["qkv_bias"]), guidance_embed=bool(p["guidance_embed"]))
    if num_tokens:
        out["num_tokens"] = int(num_tokens)
    if cond_tokens:
        out["cond_tokens"] = int(cond_tokens)
    return out


def convert_state_21(sd: dict[str, torch.Tensor], heads: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Released 2.1 keys -> ours (fp32), and our key -> released key(s) for messages."""
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        value = value.float()
        target = _fused_target(key)
        if target is not None:
            ours, part, parts = target
            fused.setdefault(ours, {})[part] = value
            names[ours] = re.sub(r"to_[qkv]\.", "to_{q,k,v}." if parts == 3 else "to_{k,v}.", key)
            continue
        ours = _rename(key, RENAMES_21)
        out[ours] = _swap_halves(value) if ours == "t_embedder.mlp.0.weight" else value
        names[ours] = key
    for ours, parts in fused.items():
        n = 3 if ".to_qkv." in ours else 2
        if sorted(parts) != list(range(n)):  # leave it out: the strict load reports the key as missing
            log.warning("%s: only %d of %d projections present", names[ours], len(parts), n)
            continue
        out[ours] = _heads_interleaved_to_blocked(torch.cat([parts[i] for i in range(n)]), heads, n)
    return out, names


def convert_state_20(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, names = {}, {}
    for key, value in sd.items():
        ours = _rename(key, RENAMES_20)
        out[ours], names[ours] = value.float(), key
    return out, names


def _convert(path, family: str) -> Release:
    path = Path(path)
    source = str(path / "config.yaml")
    params = _params(path, "model")
    vae = _params(path, "vae")
    wfile = _weights_file(path)
    sd = read_group(path, "model")
    if not sd:
        raise ValueError(f"{wfile}: no 'model' weights")
    if family == "21":
        config = config_21(params, source=source, cond_tokens=_cond_tokens(path, 0) or None)
        state, names = convert_state_21(sd, config["heads"])
    else:
        config = config_20(params, source=source, num_tokens=vae.get("num_latents"),
                           cond_tokens=_cond_tokens(path, 0) or None)
        state, names = convert_state_20(sd)
    return Release(config=config, state=state, source=str(wfile), names=names)


def convert_21(path) -> Release:
    """A ``hunyuan3d-dit-v2-1``-style folder -> Hunyuan21DiT config + state dict."""
    return _convert(path, "21")


def convert_20(path) -> Release:
    """A ``hunyuan3d-dit-v2-0`` / ``-mini`` (or ``-fast`` / ``-turbo``) folder -> Hunyuan20DiT config + state."""
    return _convert(path, "20")


FORMAT_21 = ReleaseFormat(name="Hunyuan3D-2.1 DiT", convert=convert_21,
                          detect=lambda p: (_model_target(Path(p)) or "").endswith("HunYuanDiTPlain"))
FORMAT_20 = ReleaseFormat(name="Hunyuan3D-2.0 DiT", convert=convert_20,
                          detect=lambda p: (_model_target(Path(p)) or "").endswith("Hunyuan3DDiT"))


# ----------------------------------------------------------------------------------------------
# Export (shapeflow -> released layout)
# ----------------------------------------------------------------------------------------------


def released_state(model, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights under the released key names and layout of ``template`` (a release's ``model``
    group), in the template's dtypes. Raises ValueError when the architecture differs."""
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    heads = model.config.heads
    family = model.kind
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, ref in template.items():
        target = _fused_target(key) if family == "hunyuan21_dit" else None
        if target is not None:
            name, part, parts = target
            if name not in ours:
                raise ValueError(f"the model has no {name} for the released {key}")
            value = _heads_blocked_to_interleaved(ours[name], heads, parts).chunk(parts)[part]
        else:
            name = _rename(key, RENAMES_21 if family == "hunyuan21_dit" else RENAMES_20)
            if name not in ours:
                raise ValueError(f"the model has no {name} for the released {key}")
            value = ours[name]
            if family == "hunyuan21_dit" and name == "t_embedder.mlp.0.weight":
                value = _swap_halves(value)
        if value.shape != ref.shape:
            raise ValueError(f"{key}: the model's {tuple(value.shape)} vs the release's {tuple(ref.shape)}")
        out[key] = value.to(ref.dtype).contiguous()
        used.add(name)
    extra = sorted(set(ours) - used)
    if extra:
        raise ValueError(f"the model has weights the released layout has no place for: {extra[:8]}")
    return out


def export_release(model, template_dir, out_dir) -> Path:
    """Write ``out_dir`` as a release folder the reference pipeline loads: ``template_dir``'s ``config.yaml``
    and weights with the ``model`` group replaced by ``model``'s weights (same keys, shapes and dtype; the
    ``vae`` and ``conditioner`` groups copied). Written to a temporary folder first, then moved into place."""
    template_dir, out_dir = Path(template_dir), Path(out_dir)
    wfile = _weights_file(template_dir)
    groups = read_groups(template_dir)
    groups["model"] = released_state(model, groups["model"])

    def write(tmp: Path) -> None:
        (tmp / "config.yaml").write_bytes((template_dir / "config.yaml").read_bytes())
        if wfile.suffix == ".safetensors":
            save_file({f"{g}.{k}": v for g, sd in groups.items() for k, v in sd.items()}, str(tmp / wfile.name))
        else:
            torch.save({g: sd for g, sd in groups.items() if sd or g == "model"}, tmp / wfile.name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_dir(out_dir, write)


# ----------------------------------------------------------------------------------------------
# The rest of a release: sampler, latent scale, image encoder
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseSettings:
    """What a release folder says besides the DiT weights."""

    scale_factor: float | None  # the VAE section's scale_factor (the DiT works on z * scale_factor)
    num_latents: int | None  # the VAE section's token count
    image_size: int  # DINOv2 input size
    use_cls_token: bool
    processor_size: int  # ImageProcessorV2 size (512)
    border_ratio: float  # ImageProcessorV2 border ratio (0.15)
    num_train_timesteps: int


def release_settings(path) -> ReleaseSettings:
    path = Path(path)
    vae = _params(path, "vae")
    kw = _conditioner_kwargs(path)
    proc = _params(path, "image_processor")
    sched = _params(path, "scheduler")
    shift = float(sched.get("shift", 1.0))
    if shift != 1.0:
        log.warning("%s: scheduler shift %g (sampling uses it as shapeflow's shift)", path, shift)
    return ReleaseSettings(
        scale_factor=float(vae["scale_factor"]) if "scale_factor" in vae else None,
        num_latents=int(vae["num_latents"]) if "num_latents" in vae else None,
        image_size=int(kw.get("image_size", 518)), use_cls_token=bool(kw.get("use_cls_token", True)),
        processor_size=int(proc.get("size", 512)),
        border_ratio=float(proc["border_ratio"]) if proc.get("border_ratio") is not None else 0.15,
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)))


def _dinov2_config_from_shapes(sd: dict[str, torch.Tensor], source: str):
    """A ``transformers`` Dinov2Config from a DINOv2 state dict's shapes (releases that name a hub model
    instead of writing its config)."""
    from transformers import Dinov2Config  # lazy: the "image" extra

    try:
        width = sd["embeddings.cls_token"].shape[-1]
        patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
        n_pos = sd["embeddings.position_embeddings"].shape[1] - 1
    except KeyError as missing:
        raise ValueError(f"{source}: the conditioner weights are not a DINOv2 (no {missing})") from None
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    swiglu = any(".mlp.weights_in." in k for k in sd)
    fc1 = sd.get("encoder.layer.0.mlp.fc1.weight")
    ratio = fc1.shape[0] // width if fc1 is not None else 4  # SwiGLU (giant): released with mlp_ratio 4
    return Dinov2Config(hidden_size=width, num_hidden_layers=layers, num_attention_heads=max(width // 64, 1),
                        patch_size=patch, image_size=int(round(n_pos ** 0.5)) * patch, use_swiglu_ffn=swiglu,
                        layer_norm_eps=1e-6, mlp_ratio=ratio)  # every DINOv2 size has 64-channel heads


def release_conditioner(path, *, dtype: torch.dtype = torch.float32):
    """The release's own DINOv2 (``conditioner`` group and section) as an
    :class:`~shapeflow.models.conditioning.ImageConditioner` with Hunyuan's preprocessing and token choice."""
    from transformers import Dinov2Config, Dinov2Model  # lazy: the "image" extra

    path = Path(path)
    settings = release_settings(path)
    kw = _conditioner_kwargs(path)
    sd = read_group(path, "conditioner")
    prefix = "main_image_encoder.model."
    sd = {k[len(prefix):]: v.to(dtype) for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{_weights_file(path)}: no conditioner weights (main_image_encoder.model.*); this "
                         "release does not bundle its image encoder")
    source = str(path / "config.yaml")
    cfg = Dinov2Config.from_dict(kw["config"]) if isinstance(kw.get("config"), dict) else \
        _dinov2_config_from_shapes(sd, source)
    backbone = Dinov2Model(cfg).to(dtype)
    if "embeddings.mask_token" not in sd:  # not used at inference; older exports drop it
        sd["embeddings.mask_token"] = backbone.embeddings.mask_token.detach().clone()
    load_state_dict_strict(backbone, sd, source=str(_weights_file(path)))
    config = ImageConditionerConfig.hunyuan(image_size=settings.image_size, use_cls_token=settings.use_cls_token,
                                            processor_size=settings.processor_size,
                                            border_ratio=settings.border_ratio)
    return ImageConditioner(backbone.eval(), config)
