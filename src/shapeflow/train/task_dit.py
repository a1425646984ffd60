"""Training tasks of the generators: rectified-flow DiTs on encoded VAE latents.

* ``token_dit``: :class:`~shapeflow.models.dit.TokenDiT` on VecSet latents ``(m, c)``;
* ``grid_dit``: :class:`~shapeflow.models.dit.GridDiT` on voxel-grid latents ``(c, r, r, r)`` (also stage 1 of
  sparse generation: the ``structure/`` folder of a sparse latent folder, ``(1, r, r, r)`` occupancy);
* ``sparse_dit``: :class:`~shapeflow.models.sparse_dit.SparseDiT` on sparse latents (stage 2: features on
  the active voxels; a variable count per object, packed into padded tokens with masks in the loss);
* ``hunyuan21_dit`` / ``hunyuan20_dit``: the Hunyuan3D DiTs (:mod:`shapeflow.models.hunyuan_dit`), usually
  fine-tuned from a released folder (``model.init_from``) on latents that ``encode-latents --vae <released
  VAE>`` wrote. Their latent space is the released one (``data.normalization: none``, checked); the frozen
  image encoder is the release's own DINOv2; ``<run>/final/release/`` holds the result in the released layout
  (loadable by the reference pipeline) when ``init_from`` is a release. LoRA: ``train.lora_rank``.

Data: a latent folder written by ``shapeflow encode-latents`` (:class:`~shapeflow.data.latents.LatentDataset`).
Objective: :class:`~shapeflow.flow.FlowConfig` (time sampling, shift, condition dropout), the loss is
:func:`~shapeflow.flow.flow_matching_loss` in the flow convention of :mod:`shapeflow.flow`.

Latent normalisation: ``build_model`` fits a :class:`~shapeflow.flow.LatentNormalizer` on the training
split (``data.normalization``) and stores it in the DiT's ``latent_mean`` / ``latent_std`` buffers, so
it is saved with the weights; the flow is trained on ``normalize_latents(z)`` and samples are mapped back
with ``denormalize_latents``.

Conditioning (``model.cond``): ``"none"``; ``"class"`` with ``model.classes`` naming the classes in label
order (part of the model's config, so ``shapeflow generate --class NAME`` can map names; objects of other
classes in the latent folder are left out), null class ``len(classes)`` for classifier-free guidance;
``"image"``: a random rendered view of the object (``data.image_root``, a folder preprocessed with
``--render-views``) is encoded by a frozen DINOv2 (``data.image_encoder``: hub name or local directory;
built once per run by the task's ``build_frozen``, no gradients) and its tokens are the cross-attention
context (TRELLIS / Hunyuan3D); the null condition is all-zero tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from shapeflow.data.latents import LatentDataset
from shapeflow.flow import FlowConfig, LatentNormalizer, flow_matching_loss
from shapeflow.models.conditioning import ImageConditioner
from shapeflow.models import TOKEN_DIT_KINDS, load_model
from shapeflow.models.dit import GridDiT, TokenDiT
from shapeflow.models.hunyuan_dit import Hunyuan20DiT, Hunyuan21DiT
from shapeflow.models.pretrained.hunyuan_dit import export_release, is_release, release_conditioner
from shapeflow.models.sparse_dit import SparseDiT, velocity_fn
from shapeflow.train.ema import unwrap
from shapeflow.train.task import Task

if TYPE_CHECKING:
    from shapeflow.train.experiment import ExperimentConfig

log = logging.getLogger(__name__)

RELEASED = (Hunyuan21DiT, Hunyuan20DiT)  # families of public releases: their latent space is fixed


@dataclass(frozen=True)
class LatentDataConfig:
    root: str = "data/latents"  # a `shapeflow encode-latents` output folder
    val_fraction: float = 0.1  # share of objects held out (by id hash)
    split_seed: int = 0  # seed of the id-hash split
    normalization: str = "channel"  # latent normaliser fitted on the train split: channel|global|scale|none
    image_root: str = ""  # image conditioning: preprocessed folder with rendered views (--render-views)
    image_encoder: str = "facebook/dinov2-large"  # image conditioning: DINOv2 hub name or local directory

    def __post_init__(self):
        if self.normalization not in ("channel", "global", "scale", "none"):
            raise ValueError(f"data.normalization must be channel, global, scale or none, "
                             f"got {self.normalization!r}")


def _datasets(cfg: "ExperimentConfig"):
    d, m = cfg.data, cfg.model
    classes = list(m.classes) if m.cond == "class" else None
    views = None
    if m.cond == "image":
        if not d.image_root:
            raise ValueError("an image-conditional DiT needs data.image_root (a folder preprocessed with "
                             "--render-views)")
        views = d.image_root
    common = dict(val_fraction=d.val_fraction, split_seed=d.split_seed, classes=classes, views_root=views)
    train = LatentDataset(d.root, split="train", **common)
    if len(train) == 0:
        raise ValueError(f"{d.root}: no training latents")
    val = LatentDataset(d.root, split="val", **common) if d.val_fraction > 0 else None
    return train, (val if val is not None and len(val) else None)


def _check_shape(model: nn.Module, z: torch.Tensor, root: str) -> None:
    """THE check that a DiT fits its latents (a token DiT's ``num_tokens``, a grid DiT's grid)."""
    c = model.config.in_channels
    if model.kind in TOKEN_DIT_KINDS:
        m = model.config.num_tokens
        ok = z.ndim == 2 and tuple(z.shape) == (m, c)
        want = f"({m}, {c}) (model.num_tokens, model.in_channels)"
    else:
        r = model.config.resolution
        ok = tuple(z.shape) == (c, r, r, r)
        want = f"({c}, {r}, {r}, {r})"
    if not ok:
        raise ValueError(f"{root}: latents have shape {tuple(z.shape)}, the model expects {want}")


def _build_model(cls):
    def build(cfg: "ExperimentConfig") -> nn.Module:
        if cfg.objective.set_coupling != "none" and cls is not TokenDiT:
            raise ValueError(f"objective.set_coupling={cfg.objective.set_coupling!r} reorders latent tokens; "
                             f"only a token DiT (unordered token sets) may use it, not a {cls.__name__}")
        model = cls(cfg.model)
        if getattr(cfg.model, "init_from", ""):
            _init_from(model, cfg.model.init_from)
        if cls in RELEASED and cfg.data.normalization != "none":
            raise ValueError(f"data.normalization={cfg.data.normalization!r}: a {cls.kind} works in the released "
                             "latent space (the VAE's scale_factor, already in the latents); set it to none")
        train, _ = _datasets(cfg)
        if cls is SparseDiT:
            return _fit_sparse(model, train, cfg)
        if train.sparse:
            raise ValueError(f"{cfg.data.root}: sparse latents train a sparse_dit (their structure/ folder a "
                             f"grid_dit), not a {cls.kind}")
        z = train.stack()  # (n, ...)
        _check_shape(model, z[0], cfg.data.root)
        mode = cfg.data.normalization
        if mode != "none" and cls not in RELEASED:
            channel_dim = -1 if cls is TokenDiT else 1
            model.set_latent_normalizer(LatentNormalizer.fit(z, mode=mode, channel_dim=channel_dim))
        return model
    return build


# the fields that do not change the weights (free to differ from the checkpoint a run starts from)
_NOT_ARCHITECTURE = {"num_tokens", "cond_tokens", "gradient_checkpointing", "init_from", "moe_aux_weight"}


def _init_from(model: nn.Module, source: str) -> None:
    """Load the weights of ``source`` (a released folder or a shapeflow checkpoint of the same family) into
    ``model``; a one-line error names the architecture fields that differ."""
    loaded = type(model).from_pretrained(source)
    mine, theirs = dataclasses.asdict(model.config), dataclasses.asdict(loaded.config)
    diff = {k: (mine[k], theirs[k]) for k in mine if k not in _NOT_ARCHITECTURE and mine[k] != theirs.get(k)}
    if diff:
        raise ValueError(f"model.init_from={source}: its architecture differs from model.* in "
                         + ", ".join(f"{k} (config {a!r}, checkpoint {b!r})" for k, (a, b) in diff.items())
                         + "; use the matching preset")
    model.load_state_dict(loaded.state_dict(), strict=True)


def _export_release(cfg: "ExperimentConfig", final: Path) -> None:
    """``final/release/``: the fine-tuned weights in the layout of the release the run started from."""
    src = cfg.model.init_from
    if not src or not is_release(src):
        return
    model = load_model(final)[0]
    out = export_release(model, src, final / "release")
    log.info("wrote the fine-tuned weights in the released layout: %s", out)


def _fit_sparse(model: SparseDiT, train: LatentDataset, cfg: "ExperimentConfig") -> SparseDiT:
    """Check a sparse latent folder against the model (channels, grid) and fit the per-channel normaliser
    on all training voxels."""
    root, mc = cfg.data.root, model.config
    if not train.sparse:
        raise ValueError(f"{root}: not a sparse latent folder (encode-latents with a sparse_vae); a sparse_dit "
                         "trains on sparse latents")
    items = [train[i] for i in range(len(train))]
    feats = torch.cat([it["latent"] for it in items])
    top = max(int(it["coords"].max()) for it in items)
    if feats.shape[1] != mc.in_channels or top >= mc.resolution:
        raise ValueError(f"{root}: latents of {feats.shape[1]} channels with voxels up to {top}; the model expects "
                         f"{mc.in_channels} channels (model.in_channels) on a {mc.resolution}^3 grid "
                         "(model.resolution)")
    if cfg.data.normalization != "none":
        model.set_latent_normalizer(LatentNormalizer.fit(feats, mode=cfg.data.normalization, channel_dim=-1))
    return model


def collate_sparse_latents(items: list[dict]) -> dict:
    """Sparse latent items -> ``{"coords": [(m_i, 3)], "latent": [(m_i, c)], "id": [...], "label"?, "image"?}``
    (packed into tokens by the loss, which knows the model's patch size and normaliser)."""
    out = {"coords": [it["coords"] for it in items], "latent": [it["latent"] for it in items],
           "id": [it["id"] for it in items]}
    for key in ("label", "image"):
        if key in items[0]:
            out[key] = torch.stack([torch.as_tensor(it[key]) for it in items])
    return out


def _flow_inputs(model: nn.Module, batch: dict):
    """``(velocity function, normalised data, mask)`` of a batch: token latents as they are, sparse latents
    packed into padded tokens (:meth:`SparseDiT.pack`)."""
    m = unwrap(model)
    if isinstance(m, SparseDiT):
        tokens = m.pack(batch["coords"], [m.normalize_latents(f.float()) for f in batch["latent"]])
        return velocity_fn(model, tokens), tokens.x, tokens.voxel_mask()
    return model, m.normalize_latents(batch["latent"].float()), None


def build_frozen(cfg: "ExperimentConfig", device: torch.device) -> ImageConditioner | None:
    """The frozen DINOv2 encoder of an image-conditioned DiT (None otherwise), once per run: a release's
    own encoder when the run starts from a Hunyuan3D release, else ``data.image_encoder``."""
    if cfg.model.cond != "image":
        return None
    src = getattr(cfg.model, "init_from", "")
    if src and is_release(src):
        enc = release_conditioner(src).to(device).eval()
    else:
        enc = ImageConditioner.from_pretrained(cfg.data.image_encoder).to(device).eval()
    if enc.cond_dim != cfg.model.cond_dim:
        raise ValueError(f"{cfg.data.image_encoder}: gives {enc.cond_dim}-dim tokens, model.cond_dim is "
                         f"{cfg.model.cond_dim}")
    return enc


def image_tokens(images: torch.Tensor, encoder: ImageConditioner) -> torch.Tensor:
    """RGBA views ``(b, H, W, 4)`` uint8 -> frozen DINOv2 tokens ``(b, l, cond_dim)`` on their device."""
    pixels = encoder.preprocess([im.cpu().numpy() for im in images]).to(images.device)
    return encoder(pixels)


def _cond(batch: dict, cfg: "ExperimentConfig", frozen: ImageConditioner | None):
    if cfg.model.cond == "image":
        return image_tokens(batch["image"], frozen)
    return batch["label"] if cfg.model.cond == "class" else None


def _null(cfg: "ExperimentConfig"):
    return cfg.model.num_classes if cfg.model.cond == "class" else None


def loss(model: nn.Module, batch: dict, cfg: "ExperimentConfig", step: int, frozen=None):
    fn, x1, mask = _flow_inputs(model, batch)
    value, _ = flow_matching_loss(fn, x1, _cond(batch, cfg, frozen), config=cfg.objective, null_cond=_null(cfg),
                                  mask=mask)
    return value, {"mse": value.detach()}  # the per-time-band terms vary per batch; validation reports them


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, cfg: "ExperimentConfig", frozen=None) -> dict[str, float]:
    """Flow-matching MSE on held-out latents with fixed noise and times, overall and per band of t."""
    bins = cfg.objective.log_bins
    sums = counts = None
    gen = torch.Generator().manual_seed(0)
    no_dropout = dataclasses.replace(cfg.objective, cond_dropout=0.0)
    for batch in loader:
        fn, x1, mask = _flow_inputs(model, batch)
        _, terms = flow_matching_loss(fn, x1, _cond(batch, cfg, frozen), config=no_dropout,
                                      null_cond=_null(cfg), generator=gen, mask=mask)
        s, c = terms.by_time(bins)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    if sums is None:
        return {}
    sums, counts = sums.tolist(), counts.tolist()  # the one host read
    out = {"mse": sum(sums) / sum(counts)}
    out.update({f"mse_bin{k}": sums[k] / counts[k] for k in range(bins) if counts[k]})
    return out


TASKS = tuple(
    Task(name=cls.kind, kind=cls.kind, model_config=cls.config_class, data_config=LatentDataConfig,
         build_model=_build_model(cls), build_datasets=_datasets, loss=loss, validate=validate,
         objective_config=FlowConfig, build_frozen=build_frozen,
         collate=collate_sparse_latents if cls is SparseDiT else None,
         export=_export_release if cls in RELEASED else None)
    for cls in (TokenDiT, GridDiT, SparseDiT, *RELEASED)
)
