"""Training tasks of the generators: rectified-flow DiTs on encoded VAE latents.

* ``token_dit``: :class:`~shapeflow.models.dit.TokenDiT` on VecSet latents ``(m, c)``;
* ``grid_dit``: :class:`~shapeflow.models.dit.GridDiT` on voxel-grid latents ``(c, r, r, r)``.

Data: a latent folder written by ``shapeflow encode-latents`` (:class:`~shapeflow.data.latents.LatentDataset`).
Objective: :class:`~shapeflow.flow.FlowConfig` (time sampling, shift, condition dropout), the loss is
:func:`~shapeflow.flow.flow_matching_loss` in the flow convention of :mod:`shapeflow.flow`.

Latent normalisation: ``build_model`` fits a :class:`~shapeflow.flow.LatentNormalizer` on the training
split (``data.normalization``) and stores it in the DiT's ``latent_mean`` / ``latent_std`` buffers, so
it is saved with the weights; the flow is trained on ``normalize_latents(z)`` and samples are mapped back
with ``denormalize_latents``.

Conditioning (``model.cond``): ``"none"``; ``"class"`` with ``data.classes`` naming the classes in label
order (recorded in the checkpoint's config, so ``shapeflow generate --class NAME`` can map names), null
class ``num_classes`` for classifier-free guidance; ``"image"``: a random rendered view of the object
(``data.image_root``, a folder preprocessed with ``--render-views``) is encoded by a frozen DINOv2
(``data.image_encoder``: hub name or local directory; loaded once per process, no gradients) and its
tokens are the cross-attention context (TRELLIS / Hunyuan3D); the null condition is all-zero tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from shapeflow.data.latents import LatentDataset
from shapeflow.flow import FlowConfig, LatentNormalizer, flow_matching_loss
from shapeflow.models.dit import GridDiT, GridDiTConfig, TokenDiT, TokenDiTConfig
from shapeflow.train.ema import unwrap

if TYPE_CHECKING:
    from shapeflow.config import ExperimentConfig


@dataclass(frozen=True)
class LatentDataConfig:
    root: str = "data/latents"  # a `shapeflow encode-latents` output folder
    val_fraction: float = 0.1  # share of objects held out (by id hash)
    split_seed: int = 0  # seed of the id-hash split
    classes: tuple[str, ...] = ()  # class names in label order (class-conditional models); () = no labels
    normalization: str = "channel"  # latent normaliser fitted on the train split: channel|global|scale|none
    image_root: str = ""  # image conditioning: preprocessed folder with rendered views (--render-views)
    image_encoder: str = "facebook/dinov2-large"  # image conditioning: DINOv2 hub name or local directory

    def __post_init__(self):
        if self.normalization not in ("channel", "global", "scale", "none"):
            raise ValueError(f"data.normalization must be channel, global, scale or none, "
                             f"got {self.normalization!r}")


def _datasets(cfg: "ExperimentConfig"):
    d, m = cfg.data, cfg.model
    classes = list(d.classes) if m.cond == "class" else None
    if m.cond == "class":
        if not d.classes:
            raise ValueError("a class-conditional DiT needs data.classes (class names in label order)")
        if len(d.classes) != m.num_classes:
            raise ValueError(f"data.classes has {len(d.classes)} names but model.num_classes is {m.num_classes}")
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
    c = model.config.in_channels
    if isinstance(model, TokenDiT):
        m = model.config.num_tokens
        ok = z.ndim == 2 and z.shape[1] == c and (m == 0 or z.shape[0] == m)
        want = f"({m or 'm'}, {c})" + (" (model.num_tokens)" if m else "")
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
        train, _ = _datasets(cfg)
        z = train.stack()  # (n, ...)
        _check_shape(model, z[0], cfg.data.root)
        mode = cfg.data.normalization
        if mode != "none":
            channel_dim = -1 if cls is TokenDiT else 1
            model.set_latent_normalizer(LatentNormalizer.fit(z, mode=mode, channel_dim=channel_dim))
        return model
    return build


_ENCODERS: dict = {}


def image_tokens(images: torch.Tensor, cfg: "ExperimentConfig") -> torch.Tensor:
    """RGBA views ``(b, H, W, 4)`` uint8 -> frozen DINOv2 tokens ``(b, l, cond_dim)`` on their device."""
    from shapeflow.models.conditioning import ImageConditioner

    key = (cfg.data.image_encoder, str(images.device))
    if key not in _ENCODERS:
        enc = ImageConditioner.from_pretrained(cfg.data.image_encoder).to(images.device).eval()
        if enc.cond_dim != cfg.model.cond_dim:
            raise ValueError(f"{cfg.data.image_encoder}: gives {enc.cond_dim}-dim tokens, model.cond_dim is "
                             f"{cfg.model.cond_dim}")
        _ENCODERS[key] = enc
    enc = _ENCODERS[key]
    pixels = enc.preprocess([im.cpu().numpy() for im in images]).to(images.device)
    return enc(pixels)


def _cond(batch: dict, cfg: "ExperimentConfig"):
    if cfg.model.cond == "image":
        return image_tokens(batch["image"], cfg)
    return batch["label"] if cfg.model.cond == "class" else None


def _null(cfg: "ExperimentConfig"):
    return cfg.model.num_classes if cfg.model.cond == "class" else None


def loss(model: nn.Module, batch: dict, cfg: "ExperimentConfig", step: int):
    x1 = unwrap(model).normalize_latents(batch["latent"].float())
    value, logs = flow_matching_loss(model, x1, _cond(batch, cfg), config=cfg.objective, null_cond=_null(cfg))
    return value, {"mse": logs["mse"]}  # binned terms vary per batch; validation reports them


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, cfg: "ExperimentConfig") -> dict[str, float]:
    """Flow-matching MSE on held-out latents with fixed noise and times, overall and per t band."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    gen = torch.Generator().manual_seed(0)
    no_dropout = FlowConfig(**{**cfg.objective.__dict__, "cond_dropout": 0.0})
    for batch in loader:
        x1 = model.normalize_latents(batch["latent"].float())
        b = x1.shape[0]
        _, logs = flow_matching_loss(model, x1, _cond(batch, cfg), config=no_dropout, null_cond=_null(cfg),
                                     generator=gen)
        for k, v in logs.items():
            n = b if k == "mse" else 1
            sums[k] = sums.get(k, 0.0) + v * n
            counts[k] = counts.get(k, 0) + n
    return {k: sums[k] / counts[k] for k in sums}


def register(tasks: dict) -> None:
    from shapeflow.train.tasks import Task

    for name, cls, cfg_cls in (("token_dit", TokenDiT, TokenDiTConfig), ("grid_dit", GridDiT, GridDiTConfig)):
        tasks[name] = Task(name=name, model_config=cfg_cls, data_config=LatentDataConfig,
                           build_model=_build_model(cls), build_datasets=_datasets, loss=loss,
                           validate=validate, presets=cfg_cls.PRESETS, objective_config=FlowConfig)
