"""Load Hunyuan3D ShapeVAE weights (2.1 full VAE, 2.0 decoder-only) into :class:`VecSetVAE`.

Facts from the public code (``Tencent-Hunyuan/Hunyuan3D-2.1`` ``hy3dshape``, ``Tencent/Hunyuan3D-2``
``hy3dgen``; see ``shared/reference/vecset.md`` §1.3) this converter relies on:

* Key names: ``encoder.{input_proj, cross_attn, self_attn.resblocks.i, ln_post}``, ``pre_kl``,
  ``post_kl``, ``transformer.resblocks.i``, ``geo_decoder.{query_proj, cross_attn_decoder, ln_post,
  output_proj}``; inside blocks ``attn.c_qkv`` / ``attn.c_q`` / ``attn.c_kv``, ``attn.c_proj``,
  ``attn.attention.{q,k}_norm``, ``mlp.c_fc``, ``mlp.c_proj``. Pipeline single-file checkpoints
  prefix every VAE key with ``vae.`` (torch ``.ckpt`` files hold a ``{"vae": state_dict}`` dict).
* **Per-head interleaved QKV**: ``c_qkv(x).view(b, n, h, 3 * d).split(d, -1)``, i.e. weight rows
  ``[h0: q, k, v | h1: q, k, v | ...]``; ``c_kv`` likewise with ``[k, v]`` per head. Ours are
  ``[q | k | v]`` each ``(h d)``; rows are permuted here.
* qk-norm is ``LayerNorm(head_dim, eps=1e-6)`` with weight and bias; block LayerNorms use eps 1e-6, the
  two ``ln_post`` use ``nn.LayerNorm``'s default 1e-5 (our config has both eps fields).
* The output is a **positive-inside** logit; ours is negative inside, so ``output_proj`` weight and bias
  are negated: our field is exactly minus theirs.
* ``scale_factor`` (the DiT sees ``z * scale_factor``) is in the pipeline config, not in the weights:
  2.1 uses 1.0039506158752403 and 2.0 uses 0.9990943042622529; it is stored as
  ``VecSetVAEConfig.latent_scale`` and can be overridden.
* Hunyuan3D-2.0 released only the decoder half (no ``encoder.*`` / ``pre_kl``): it loads into a
  decoder-only model (``decoder_only=True``), whose ``encode`` raises.

Architecture numbers (width, heads, layer counts, Fourier frequencies, point features, qkv bias,
qk-norm, MLP ratio, ``ln_post``) are read from the tensor shapes; ``include_pi`` is not visible in the
weights and defaults to False as in every released Hunyuan3D config.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from shapeflow.models.vecset_vae import VecSetVAE, VecSetVAEConfig
from shapeflow.train.checkpoint import load_state_dict_strict

log = logging.getLogger(__name__)

SCALE_FACTOR_V21 = 1.0039506158752403
SCALE_FACTOR_V20 = 0.9990943042622529

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


def is_hunyuan_state_dict(state_dict: dict) -> bool:
    """True if the keys look like a Hunyuan3D ShapeVAE (possibly ``vae.``-prefixed)."""
    keys = set(strip_vae_prefix(state_dict))
    return all(m in keys for m in _MARKERS) and any(k.startswith("transformer.resblocks.") for k in keys)


def strip_vae_prefix(state_dict: dict) -> dict:
    """Keep only the ``vae.`` part of a pipeline single-file checkpoint (no-op for a bare VAE state dict)."""
    if any(k.startswith("vae.") for k in state_dict):
        return {k[len("vae."):]: v for k, v in state_dict.items() if k.startswith("vae.")}
    return dict(state_dict)


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


def _layer_count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"Hunyuan3D checkpoint has non-contiguous layers under {prefix!r}: {sorted(idx)}")
    return len(idx)


def hunyuan_config(state_dict: dict, **overrides) -> VecSetVAEConfig:
    """Infer the :class:`VecSetVAEConfig` of a Hunyuan3D ShapeVAE state dict from its tensor shapes."""
    sd = strip_vae_prefix(state_dict)
    keys = set(sd)
    needed = (*_MARKERS, "geo_decoder.query_proj.weight", "geo_decoder.cross_attn_decoder.mlp.c_fc.weight")
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(f"not a Hunyuan3D ShapeVAE state dict: missing {missing}")
    width, latent_channels = sd["post_kl.weight"].shape
    fourier_in = sd["geo_decoder.query_proj.weight"].shape[1]
    if fourier_in % 3 or (fourier_in // 3 - 1) % 2:
        raise ValueError(f"geo_decoder.query_proj takes {fourier_in} inputs, not 3 * (2 * num_freqs + 1)")
    num_freqs = (fourier_in // 3 - 1) // 2
    norm_key = "geo_decoder.cross_attn_decoder.attn.attention.q_norm.weight"
    qk_norm = "layer" if norm_key in keys else None
    if qk_norm is None:
        raise ValueError("Hunyuan3D checkpoint without qk-norm weights: the head count cannot be inferred; "
                         "this converter supports the released qk_norm=True models only")
    head_dim = sd[norm_key].shape[0]
    decoder_only = not any(k.startswith("encoder.") for k in keys)
    fc = sd["geo_decoder.cross_attn_decoder.mlp.c_fc.weight"].shape[0]
    cfg = dict(
        width=int(width), latent_channels=int(latent_channels), heads=int(width // head_dim),
        num_freqs=int(num_freqs), include_pi=False, qk_norm=qk_norm,
        qkv_bias="geo_decoder.cross_attn_decoder.attn.c_q.bias" in keys,
        mlp_ratio=fc / width, geo_ln_post="geo_decoder.ln_post.weight" in keys,
        block_eps=1e-6, ln_post_eps=1e-5, fps_ratio=20,
        decoder_layers=_layer_count(keys, "transformer.resblocks."),
        decoder_only=decoder_only,
        num_latents=3072 if decoder_only else 4096,
        latent_scale=SCALE_FACTOR_V20 if decoder_only else SCALE_FACTOR_V21,
    )
    if decoder_only:
        cfg.update(encoder_layers=0, point_feats=4)
    else:
        cfg.update(encoder_layers=_layer_count(keys, "encoder.self_attn.resblocks."),
                   point_feats=int(sd["encoder.input_proj.weight"].shape[1] - fourier_in))
    unknown = set(overrides) - set(VecSetVAEConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown VecSetVAEConfig field(s): {sorted(unknown)}")
    cfg.update(overrides)
    return VecSetVAEConfig(**cfg)


def convert_hunyuan_state_dict(state_dict: dict, cfg: VecSetVAEConfig) -> dict[str, torch.Tensor]:
    """Hunyuan3D ShapeVAE state dict -> a :class:`VecSetVAE` state dict (float32, our layout and sign).

    Renames by :data:`PREFIX_MAP` / :data:`BLOCK_MAP`, permutes the per-head interleaved ``c_qkv`` /
    ``c_kv`` rows to ``[q|k|v]`` / ``[k|v]``, negates ``output_proj`` (positive-inside -> negative-inside).
    Keys are not checked here; :func:`load_state_dict_strict` does that.
    """
    out = {}
    for key, value in strip_vae_prefix(state_dict).items():
        t = value.detach().to(torch.float32)
        if ".attn.c_qkv." in key:
            t = interleaved_to_blocked(t, cfg.heads, 3)
        elif ".attn.c_kv." in key:
            t = interleaved_to_blocked(t, cfg.heads, 2)
        elif key.startswith("geo_decoder.output_proj."):
            t = -t
        out[rename_key(key)] = t.contiguous()
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or torch checkpoint (``state_dict`` / ``vae`` entries unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from None
    for key in ("state_dict", "vae"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return obj


def load_hunyuan_vae(path_or_state_dict, **overrides) -> VecSetVAE:
    """A :class:`VecSetVAE` with Hunyuan3D ShapeVAE weights.

    Parameters
    ----------
    path_or_state_dict : a ``.safetensors`` / ``.ckpt`` / ``.pt`` file (bare VAE or pipeline single-file
      with ``vae.`` keys) or an in-memory state dict with Hunyuan3D key names.
    **overrides : config fields, e.g. ``num_latents=...`` or ``latent_scale=...`` (the 2.0-mini VAE
      uses 1.0188137142395404).

    Raises
    ------
    ValueError listing every missing / unexpected key or shape mismatch.
    """
    if isinstance(path_or_state_dict, dict):
        sd, source = path_or_state_dict, "Hunyuan3D state dict"
    else:
        sd, source = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    cfg = hunyuan_config(sd, **overrides)
    model = VecSetVAE(cfg)
    converted = convert_hunyuan_state_dict(sd, cfg)
    names = {rename_key(k): k for k in strip_vae_prefix(sd)}
    load_state_dict_strict(model, converted, source=source, names=names)
    log.info("loaded Hunyuan3D ShapeVAE%s from %s (width %d, %d tokens default, scale %.6f)",
             " decoder" if cfg.decoder_only else "", source, cfg.width, cfg.num_latents, cfg.latent_scale)
    return model
