"""Hunyuan3D ShapeVAE releases (2.1 full VAE, 2.0 decoder) -> a :class:`~shapeflow.models.vecset_vae.VecSetVAE`
config dict and state dict.

What is read, as published (HF ``tencent/Hunyuan3D-2.1``, ``tencent/Hunyuan3D-2``):

* a **VAE folder** (``hunyuan3d-vae-v2-1/``): ``config.yaml`` (``{target: ...ShapeVAE, params: {...}}``) and
  ``model.fp16.ckpt`` (a flat state dict) or ``model.fp16.safetensors``;
* a **DiT folder** whose ``config.yaml`` has a ``vae`` section (``hunyuan3d-dit-v2-0/``, which bundles the
  2.0 decoder): the ``vae`` group of its single-file checkpoint (``{'model', 'vae', 'conditioner'}`` in a
  ``.ckpt``, ``vae.``-prefixed keys in a ``.safetensors``);
* a **lone weights file** (``.ckpt`` / ``.pt`` / ``.pth``, or a ``.safetensors`` with Hunyuan key names):
  ``config.yaml`` beside it when present; otherwise the architecture is read from the tensor shapes and
  ``num_tokens`` / ``latent_scale`` take the published values of the version the shapes match (logged).

Facts from the public code (``hy3dshape/models/autoencoders``, ``shared/reference/vecset.md`` §1) the
conversion relies on:

* ``config.yaml`` params are ``ShapeVAE``'s constructor arguments; missing ones take its defaults
  (:data:`HUNYUAN_DEFAULTS`: note ``include_pi=True``, ``qkv_bias=True``, ``qk_norm=False`` there, which
  every released config overrides). ``scale_factor`` is the latent scale the DiT works in (2.1:
  1.0039506158752403; 2.0: 0.9990943042622529; 2mini: 1.0188137142395404).
* Key names: ``encoder.{input_proj, cross_attn, self_attn.resblocks.i, ln_post}``, ``pre_kl``, ``post_kl``,
  ``transformer.resblocks.i``, ``geo_decoder.{query_proj, cross_attn_decoder, ln_post, output_proj}``;
  inside blocks ``attn.c_qkv`` / ``attn.c_q`` / ``attn.c_kv``, ``attn.c_proj``, ``attn.attention.{q,k}_norm``,
  ``mlp.c_fc``, ``mlp.c_proj``.
* **Per-head interleaved QKV**: ``c_qkv(x).view(b, n, h, 3 * d).split(d, -1)``, i.e. weight rows
  ``[h0: q, k, v | h1: q, k, v | ...]``; ``c_kv`` likewise with ``[k, v]`` per head. Ours are
  ``[q | k | v]`` each ``(h d)``; rows are permuted here.
* qk-norm is ``LayerNorm(head_dim, eps=1e-6)`` with weight and bias; block LayerNorms use eps 1e-6, the
  two ``ln_post`` use ``nn.LayerNorm``'s default 1e-5.
* The output is a **positive-inside** logit; ours is negative inside, so ``output_proj`` weight and bias
  are negated: our field is exactly minus theirs.
* Hunyuan3D-2.0 released only the decoder half (no ``encoder.*`` / ``pre_kl``): it converts to a
  decoder-only config (``decoder_only=True``).

Nothing here builds a model: :meth:`shapeflow.checkpoint.Pretrained.from_pretrained` does, from what
:func:`convert` returns, and loads the weights strictly.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from shapeflow.checkpoint import Release, ReleaseFormat

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "HUNYUAN_DEFAULTS", "detect", "convert", "release_from_state_dict", "config_from_params",
           "config_from_shapes", "convert_state_dict", "read_state_dict", "rename_key", "interleaved_to_blocked"]

SCALE_FACTOR_V21 = 1.0039506158752403
SCALE_FACTOR_V20 = 0.9990943042622529

#: ``ShapeVAE.__init__`` defaults (Hunyuan3D-2.1 ``models/autoencoders/model.py``) for params a config omits.
HUNYUAN_DEFAULTS: dict[str, Any] = dict(
    num_encoder_layers=8, pc_size=5120, pc_sharpedge_size=5120, point_feats=3, downsample_ratio=20,
    geo_decoder_downsample_ratio=1, geo_decoder_mlp_expand_ratio=4, geo_decoder_ln_post=True, num_freqs=8,
    include_pi=True, qkv_bias=True, qk_norm=False, label_type="binary", drop_path_rate=0.0, scale_factor=1.0,
    use_ln_post=True, ckpt_path=None,
)
_REQUIRED = ("num_latents", "embed_dim", "width", "heads", "num_decoder_layers")

# Whole-prefix renames (Hunyuan -> shapeflow), applied first.
PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("encoder.self_attn.resblocks.", "encoder.blocks."),
    ("transformer.resblocks.", "decoder.blocks."),
    ("geo_decoder.cross_attn_decoder.", "geo_decoder.cross_attn."),
)
# Renames inside a block (Hunyuan -> shapeflow).
BLOCK_MAP: tuple[tuple[str, str], ...] = (
    (".attn.c_qkv.", ".attn.to_qkv."),
    (".attn.c_q.", ".attn.to_q."),
    (".attn.c_kv.", ".attn.to_kv."),
    (".attn.c_proj.", ".attn.to_out."),
    (".attn.attention.q_norm.", ".attn.q_norm."),
    (".attn.attention.k_norm.", ".attn.k_norm."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)

_MARKERS = ("geo_decoder.output_proj.weight", "post_kl.weight")
_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a mapping")
    return obj


def _vae_params(config: dict, source: Path) -> dict | None:
    """The ShapeVAE params of a VAE folder's ``config.yaml`` or of a DiT folder's ``vae`` section; None if neither."""
    node = config.get("vae", config)
    if not isinstance(node, dict) or "ShapeVAE" not in str(node.get("target", "")):
        return None
    params = node.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: the ShapeVAE params are not a mapping")
    return dict(params)


def _weights_file(folder: Path) -> Path:
    """The released weights of a folder: ``model*.safetensors`` or ``model*.ckpt`` (fp16 variant first)."""
    for pattern in ("model.fp16.safetensors", "model.fp16.ckpt", "model*.safetensors", "model*.ckpt"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{folder}: config.yaml but no model.fp16.ckpt / model*.safetensors weights")


def _has_hunyuan_keys(path: Path) -> bool:
    """A ``.safetensors`` file whose keys look like a (possibly ``vae.``-prefixed) ShapeVAE."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not a readable safetensors file: not ours to claim (the loader reports it)
        return False
    return is_hunyuan_state_dict(dict.fromkeys(keys))


def detect(path: Path) -> bool:
    """Whether ``path`` is a Hunyuan3D ShapeVAE release (folder with a ShapeVAE ``config.yaml``, or weights file)."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "config.yaml"
        return cfg.is_file() and _vae_params(_read_yaml(cfg), cfg) is not None
    if not path.is_file() or path.suffix not in _WEIGHT_SUFFIXES:
        return False
    if path.suffix == ".safetensors":  # shapeflow's own weights sit beside a config.json
        return not (path.parent / "config.json").is_file() and _has_hunyuan_keys(path)
    return True


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or torch checkpoint, the VAE part only (``vae`` group or ``vae.`` keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: not a readable torch checkpoint ({first})") from None
        for key in ("state_dict", "vae"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return strip_vae_prefix(obj)


def strip_vae_prefix(state_dict: dict) -> dict:
    """Keep only the ``vae.`` part of a pipeline single-file checkpoint (no-op for a bare VAE state dict)."""
    if any(k.startswith("vae.") for k in state_dict):
        return {k[len("vae."):]: v for k, v in state_dict.items() if k.startswith("vae.")}
    return dict(state_dict)


def is_hunyuan_state_dict(state_dict: dict) -> bool:
    """True if the keys look like a Hunyuan3D ShapeVAE (possibly ``vae.``-prefixed)."""
    keys = set(strip_vae_prefix(state_dict))
    return all(m in keys for m in _MARKERS) and any(k.startswith("transformer.resblocks.") for k in keys)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def config_from_params(params: dict, state: dict, *, source: str) -> dict[str, Any]:
    """VecSetVAEConfig fields from ShapeVAE constructor params (``config.yaml``) and the weights' key set.

    Raises ValueError naming unknown params and the settings shapeflow's VecSet VAE does not have.
    """
    unknown = sorted(set(params) - set(HUNYUAN_DEFAULTS) - set(_REQUIRED))
    if unknown:
        raise ValueError(f"{source}: unknown ShapeVAE params {unknown}")
    missing = [k for k in _REQUIRED if k not in params]
    if missing:
        raise ValueError(f"{source}: ShapeVAE params lack {missing}")
    p = {**HUNYUAN_DEFAULTS, **params}
    unsupported = {k: p[k] for k, ok in (("geo_decoder_downsample_ratio", 1), ("label_type", "binary"),
                                         ("use_ln_post", True), ("ckpt_path", None)) if p[k] != ok}
    if unsupported:
        raise ValueError(f"{source}: ShapeVAE settings not supported by shapeflow's VecSet VAE: {unsupported}")
    if p["drop_path_rate"]:
        log.info("%s: drop_path_rate %s is a training setting; shapeflow's VecSet VAE has no drop path",
                 source, p["drop_path_rate"])
    decoder_only = not any(k.startswith("encoder.") for k in state)
    return dict(
        num_tokens=int(p["num_latents"]), latent_channels=int(p["embed_dim"]), width=int(p["width"]),
        heads=int(p["heads"]), encoder_layers=0 if decoder_only else int(p["num_encoder_layers"]),
        decoder_layers=int(p["num_decoder_layers"]), mlp_ratio=float(p["geo_decoder_mlp_expand_ratio"]),
        num_freqs=int(p["num_freqs"]), include_pi=bool(p["include_pi"]), point_feats=int(p["point_feats"]),
        surface_points=int(p["pc_size"]), sharp_points=int(p["pc_sharpedge_size"]),
        qkv_bias=bool(p["qkv_bias"]), qk_norm="layer" if p["qk_norm"] else None, block_eps=1e-6,
        ln_post_eps=1e-5, geo_ln_post=bool(p["geo_decoder_ln_post"]), fps_ratio=int(p["downsample_ratio"]),
        latent_scale=float(p["scale_factor"]), decoder_only=decoder_only, position_bias=False,
    )


def _layer_count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"Hunyuan3D checkpoint has non-contiguous layers under {prefix!r}: {sorted(idx)}")
    return len(idx)


def config_from_shapes(state: dict, *, source: str) -> dict[str, Any]:
    """ShapeVAE params read from the tensor shapes of a state dict (a lone weights file, no ``config.yaml``).

    ``num_latents`` and ``scale_factor`` are not in the weights: the published values of 2.0 (decoder only:
    3072, 0.99909...) or 2.1 (4096, 1.00395...) are used, and ``include_pi`` is False as in every release.
    """
    keys = set(state)
    needed = (*_MARKERS, "geo_decoder.query_proj.weight", "geo_decoder.cross_attn_decoder.mlp.c_fc.weight")
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(f"{source}: not a Hunyuan3D ShapeVAE state dict: missing {missing}")
    width, latent_channels = state["post_kl.weight"].shape
    fourier_in = state["geo_decoder.query_proj.weight"].shape[1]
    if fourier_in % 3 or (fourier_in // 3 - 1) % 2:
        raise ValueError(f"{source}: geo_decoder.query_proj takes {fourier_in} inputs, not 3 * (2 * num_freqs + 1)")
    norm_key = "geo_decoder.cross_attn_decoder.attn.attention.q_norm.weight"
    if norm_key not in keys:
        raise ValueError(f"{source}: no qk-norm weights, so the head count cannot be read from the shapes; "
                         "put the release's config.yaml beside the file")
    decoder_only = not any(k.startswith("encoder.") for k in keys)
    params = dict(
        num_latents=3072 if decoder_only else 4096, embed_dim=int(latent_channels), width=int(width),
        heads=int(width // state[norm_key].shape[0]),
        num_decoder_layers=_layer_count(keys, "transformer.resblocks."), num_freqs=(fourier_in // 3 - 1) // 2,
        include_pi=False, qkv_bias="geo_decoder.cross_attn_decoder.attn.c_q.bias" in keys, qk_norm=True,
        geo_decoder_mlp_expand_ratio=state["geo_decoder.cross_attn_decoder.mlp.c_fc.weight"].shape[0] / width,
        geo_decoder_ln_post="geo_decoder.ln_post.weight" in keys,
        scale_factor=SCALE_FACTOR_V20 if decoder_only else SCALE_FACTOR_V21,
    )
    if not decoder_only:
        params.update(num_encoder_layers=_layer_count(keys, "encoder.self_attn.resblocks."),
                      point_feats=int(state["encoder.input_proj.weight"].shape[1] - fourier_in),
                      pc_size=81920, pc_sharpedge_size=0)
    log.warning("%s: no config.yaml beside the weights; architecture read from the tensor shapes, "
                "num_tokens %d and latent scale %.6f are the published values of Hunyuan3D-%s",
                source, params["num_latents"], params["scale_factor"], "2.0" if decoder_only else "2.1")
    return params


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def rename_key(key: str) -> str:
    """A Hunyuan3D ShapeVAE key -> the matching :class:`VecSetVAE` key (table lookups only)."""
    for old, new in PREFIX_MAP:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in BLOCK_MAP:
        key = key.replace(old, new)
    return key


def interleaved_to_blocked(t: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    """Per-head interleaved rows ``[h0: p0, p1, .. | h1: ..]`` -> blocked ``[p0 | p1 | ..]``, each ``(h d)``.

    t : (parts * heads * d, ...) weight or bias of Hunyuan's ``c_qkv`` (parts=3) or ``c_kv`` (parts=2).
    """
    rest = t.shape[1:]
    d = t.shape[0] // (parts * heads)
    t = t.reshape(heads, parts, d, *rest)  # (h, parts, d, ...)
    return t.transpose(0, 1).reshape(parts * heads * d, *rest)  # (parts * h * d, ...)


def convert_state_dict(state_dict: dict, heads: int) -> dict[str, torch.Tensor]:
    """Hunyuan3D ShapeVAE state dict -> :class:`VecSetVAE` keys, float32, shapeflow's QKV layout and sign.

    Renames by :data:`PREFIX_MAP` / :data:`BLOCK_MAP`, permutes the per-head interleaved ``c_qkv`` /
    ``c_kv`` rows to ``[q|k|v]`` / ``[k|v]``, negates ``output_proj`` (positive-inside -> negative-inside).
    Keys are not checked here; the strict load does that.
    """
    out = {}
    for key, value in strip_vae_prefix(state_dict).items():
        t = value.detach().to(torch.float32)
        if ".attn.c_qkv." in key:
            t = interleaved_to_blocked(t, heads, 3)
        elif ".attn.c_kv." in key:
            t = interleaved_to_blocked(t, heads, 2)
        elif key.startswith("geo_decoder.output_proj."):
            t = -t
        out[rename_key(key)] = t.contiguous()
    return out


def release_from_state_dict(state: dict, params: dict | None = None, *, source: str = "Hunyuan3D state dict",
                            config_source: str | None = None) -> Release:
    """A ShapeVAE state dict (Hunyuan key names) and its ``config.yaml`` params (None: read from the shapes)
    as a :class:`Release`."""
    state = strip_vae_prefix(state)
    if params is None:
        params = config_from_shapes(state, source=source)
    config = config_from_params(params, state, source=config_source or source)
    return Release(config=config, state=convert_state_dict(state, config["heads"]), source=source,
                   names={rename_key(k): k for k in state})


def convert(path: str | Path) -> Release:
    """A Hunyuan3D ShapeVAE release (folder or weights file, see the module docstring) as a :class:`Release`."""
    path = Path(path)
    if path.is_dir():
        cfg_file, weights = path / "config.yaml", _weights_file(path)
    else:
        cfg_file, weights = path.parent / "config.yaml", path
    params = _vae_params(_read_yaml(cfg_file), cfg_file) if cfg_file.is_file() else None
    return release_from_state_dict(read_state_dict(weights), params, source=str(weights),
                                   config_source=str(cfg_file) if params is not None else None)


FORMAT = ReleaseFormat("Hunyuan3D ShapeVAE", detect, convert)
