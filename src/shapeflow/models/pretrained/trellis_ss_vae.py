"""TRELLIS's released sparse-structure VAE -> a :class:`~shapeflow.models.grid_vae.GridVAE` config and state dict.

Released files (HF ``microsoft/TRELLIS-image-large``, ``ckpts/``; also reused by TRELLIS.2):
``ss_enc_conv3d_16l8_fp16.{json,safetensors}`` and ``ss_dec_conv3d_16l8_fp16.{json,safetensors}``.
Nothing is downloaded here: pass local paths.

Facts this loader relies on (``shared/reference/sparse_voxel.md`` §1; TRELLIS @ 6b0d64751ad5):

* ``<prefix>.json`` is ``{"name": "SparseStructureEncoder" | "SparseStructureDecoder", "args": {...}}``
  with the constructor kwargs ``in_channels`` / ``out_channels``, ``latent_channels``,
  ``num_res_blocks``, ``channels``, ``num_res_blocks_middle`` (default 2), ``norm_type`` (default
  ``"layer"``) and ``use_fp16``; ``<prefix>.safetensors`` is the flat state dict.
* Key names are the module paths of TRELLIS's encoder/decoder, which :class:`GridVAE`'s ``encoder`` /
  ``decoder`` reproduce, so the map is ``k -> "encoder." + k`` (or ``"decoder." + k``) with no renames.
  The strict load lists missing / unexpected keys and shape mismatches in TRELLIS's own key names.
* ``blocks.*`` and ``middle_block.*`` conv tensors are stored in fp16 (``use_fp16``), everything else in
  fp32; all are cast to fp32 (the model runs in fp32).
* Every released configuration uses ``norm_type="layer"``. TRELLIS builds its ResBlocks without passing
  ``norm_type``, so with ``"group"`` only ``out_layer[0]`` would be a GroupNorm; that mixed layout has
  no released checkpoint and is rejected here with a clear error instead of being emulated.
* Data convention of the released weights: 64^3 surface-shell occupancy of shapes normalised to fill
  ``[-0.5, 0.5]^3`` (longest side 1), Blender Z-up, voxel ``(i, j, k)`` = ``(x, y, z)``. Our cell grid maps
  ``[-1, 1]^3`` with the longest side at ``2 * EXTENT = 1.9``, i.e. shapes are 5 % smaller in voxels;
  no resampling is done here (the network is convolutional and tolerant of that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shapeflow.checkpoint import Release, ReleaseFormat

__all__ = ["FORMAT", "ENCODER_NAME", "DECODER_NAME", "detect", "convert", "read_trellis_checkpoint",
           "config_from_trellis_args"]

ENCODER_NAME = "SparseStructureEncoder"
DECODER_NAME = "SparseStructureDecoder"
_ENC_ARGS = {"in_channels", "latent_channels", "num_res_blocks", "channels", "num_res_blocks_middle",
             "norm_type", "use_fp16"}
_DEC_ARGS = (_ENC_ARGS - {"in_channels"}) | {"out_channels"}


def _prefix(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    for ext in (".json", ".safetensors"):
        f = path.with_name(path.name + ext)
        if not f.is_file():
            raise FileNotFoundError(
                f"{f}: not found (a TRELLIS checkpoint is a <name>.json + <name>.safetensors pair)"
            )
    return path


def read_trellis_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[str, dict, dict]:
    """Read one TRELLIS ``{name, args}`` JSON + safetensors pair.

    Parameters
    ----------
    path : the prefix ``.../ss_enc_conv3d_16l8_fp16`` or either file's full name.

    Returns
    -------
    name : ``"SparseStructureEncoder"`` or ``"SparseStructureDecoder"``
    args : the constructor kwargs from the JSON
    state : the flat state dict (dtypes as stored)
    """
    prefix = _prefix(path)
    jf = prefix.with_name(prefix.name + ".json")
    try:
        meta = json.loads(jf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{jf}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "name" not in meta or not isinstance(meta.get("args"), dict):
        raise ValueError(f"{jf}: expected a TRELLIS {{\"name\": ..., \"args\": {{...}}}} model file")
    name = meta["name"]
    if name not in (ENCODER_NAME, DECODER_NAME):
        raise ValueError(
            f"{jf}: model {name!r} is not a TRELLIS sparse-structure VAE ({ENCODER_NAME} / {DECODER_NAME})"
        )
    sf = prefix.with_name(prefix.name + ".safetensors")
    try:
        state = load_file(str(sf), device=str(map_location))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{sf}: not a readable safetensors file ({e})") from None
    return name, dict(meta["args"]), state


def _check_args(args: dict, allowed: set[str], required: set[str], source: str) -> dict:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ValueError(f"{source}: unknown TRELLIS constructor args {unknown}")
    absent = sorted(required - set(args))
    if absent:
        raise ValueError(f"{source}: TRELLIS args lack {absent}")
    a = {"num_res_blocks_middle": 2, "norm_type": "layer", **args}
    if a["norm_type"] != "layer":
        raise ValueError(
            f"{source}: norm_type={a['norm_type']!r} is not supported (TRELLIS then mixes LayerNorm "
            "ResBlocks with a GroupNorm out_layer; every released checkpoint uses 'layer')"
        )
    return a


def config_from_trellis_args(
    encoder_args: dict | None, decoder_args: dict | None, *, source: str = "TRELLIS checkpoint"
) -> dict[str, Any]:
    """:class:`GridVAEConfig` fields equivalent to TRELLIS's encoder and/or decoder constructor args.

    The result describes 64^3 occupancy with TRELLIS's training loss (``"dice"``, KL weight 1e-3); decoder
    args alone give a decoder-only model. The two halves must agree on ``latent_channels``,
    ``num_res_blocks`` and ``num_res_blocks_middle``.
    """
    if encoder_args is None and decoder_args is None:
        raise ValueError("config_from_trellis_args needs the encoder args, the decoder args or both")
    base = dict(input="occupancy", resolution=64, loss="dice", kl_weight=1e-3, norm="layer",
                upsample="pixel_shuffle")
    enc = dec = None
    if encoder_args is not None:
        need = {"in_channels", "latent_channels", "num_res_blocks", "channels"}
        enc = _check_args(encoder_args, _ENC_ARGS, need, f"{source} (encoder)")
    if decoder_args is not None:
        need = {"out_channels", "latent_channels", "num_res_blocks", "channels"}
        dec = _check_args(decoder_args, _DEC_ARGS, need, f"{source} (decoder)")
    if enc is not None and dec is not None:
        for k in ("latent_channels", "num_res_blocks", "num_res_blocks_middle"):
            if enc[k] != dec[k]:
                raise ValueError(f"{source}: encoder {k}={enc[k]} differs from decoder {k}={dec[k]}")
    ref = enc if enc is not None else dec
    channels = tuple(enc["channels"]) if enc is not None else tuple(reversed(dec["channels"]))
    dec_channels = None
    if dec is not None and tuple(dec["channels"]) != tuple(reversed(channels)):
        dec_channels = tuple(dec["channels"])
    return dict(
        **base,
        in_channels=int(enc["in_channels"]) if enc is not None else 1,
        out_channels=int(dec["out_channels"]) if dec is not None else 1,
        latent_channels=int(ref["latent_channels"]),
        channels=channels,
        decoder_channels=dec_channels,
        num_res_blocks=int(ref["num_res_blocks"]),
        num_res_blocks_middle=int(ref["num_res_blocks_middle"]),
        decoder_only=enc is None,
    )


def _sibling_decoder(prefix: Path) -> Path | None:
    if "ss_enc_" not in prefix.name:
        return None
    cand = prefix.with_name(prefix.name.replace("ss_enc_", "ss_dec_", 1))
    return cand if cand.with_name(cand.name + ".json").is_file() else None


def detect(path: Path) -> bool:
    """Whether ``path`` (a prefix, or its ``.json`` / ``.safetensors``) is a TRELLIS ``{name, args}`` model file
    other than the sparse-structure flow model: the VAE halves convert, any other TRELLIS model (e.g.
    ``SLatEncoder``) is then refused by :func:`convert` with its name."""
    path = Path(path)
    if path.is_dir():
        return False
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    js = stem.with_name(stem.name + ".json")
    try:
        meta = json.loads(js.read_text(encoding="utf-8")) if js.is_file() else None
    except (json.JSONDecodeError, OSError):
        return False
    return (isinstance(meta, dict) and isinstance(meta.get("args"), dict)
            and meta.get("name") != "SparseStructureFlowModel")


def convert(path: str | Path, decoder_path: str | Path | None = None, *,
            map_location: str | torch.device = "cpu") -> Release:
    """TRELLIS's sparse-structure encoder and/or decoder files as a :class:`~shapeflow.checkpoint.Release`.

    Parameters
    ----------
    path : prefix (or file) of the encoder, or of the decoder for a decoder-only model.
    decoder_path : prefix of the decoder when ``path`` is the encoder; defaults to the ``ss_enc_`` ->
        ``ss_dec_`` sibling of ``path``.

    The loaded model's ``encode(x).mode()`` equals TRELLIS's ``encoder(x)`` (posterior mean) and
    ``decode(z)`` TRELLIS's ``decoder(z)`` logits, up to float32 rounding (fp16 tensors become fp32).
    """
    name, args, state = read_trellis_checkpoint(path, map_location=map_location)
    src = str(_prefix(path))
    if name == DECODER_NAME:
        if decoder_path is not None:
            raise ValueError(f"{src}: is a decoder; pass the encoder as path and the decoder as decoder_path")
        return Release(config=config_from_trellis_args(None, args, source=src),
                       state={f"decoder.{k}": v for k, v in state.items()}, source=f"{src}.safetensors",
                       names={f"decoder.{k}": k for k in state})
    dec_prefix = Path(decoder_path) if decoder_path is not None else _sibling_decoder(_prefix(path))
    if dec_prefix is None:
        raise FileNotFoundError(f"{src}: encoder without a decoder; pass decoder_path=.../ss_dec_... ")
    dname, dargs, dstate = read_trellis_checkpoint(dec_prefix, map_location=map_location)
    if dname != DECODER_NAME:
        raise ValueError(f"{_prefix(dec_prefix)}: expected a {DECODER_NAME}, found {dname}")
    merged = {**{f"encoder.{k}": v for k, v in state.items()}, **{f"decoder.{k}": v for k, v in dstate.items()}}
    return Release(config=config_from_trellis_args(args, dargs, source=src), state=merged,
                   source=f"{src}.safetensors + {_prefix(dec_prefix)}.safetensors",
                   names={k: k.split(".", 1)[1] for k in merged})


FORMAT = ReleaseFormat("TRELLIS sparse-structure VAE", detect, convert)
