"""Conditions for the generators: DINOv2 image tokens, class labels, and their null conditions.

Design choices:

* **Image** (:class:`ImageConditioner`): a frozen DINOv2 from ``transformers`` loaded by hub name
  (``facebook/dinov2-large`` by default, ``facebook/dinov2-with-registers-large`` for TRELLIS's
  ``dinov2_vitl14_reg``, ``facebook/dinov2-giant`` for Hunyuan3D-2.0). Its tokens are the DiT's
  cross-attention context. Never trained, always in eval mode, run under ``no_grad``.
* Token choice (``tokens`` / ``features``):

  - TRELLIS: *all* tokens (CLS + 4 registers + 37 x 37 patches = 1374) of the last block **before** the
    backbone's final LayerNorm, then a non-affine ``layer_norm`` (``tokens="all", features="prenorm"``,
    :meth:`ImageConditionerConfig.trellis`);
  - Hunyuan3D-2.x: the backbone output after its final LayerNorm, CLS kept (1 + 1369 = 1370)
    (``tokens="all", features="final"``, :meth:`ImageConditionerConfig.hunyuan`);
  - default: patch tokens only, pre-norm + non-affine layer norm.

* Preprocessing of an RGBA render or photo (:func:`preprocess_image`), the TRELLIS recipe:
  bounding box of ``alpha > 0.8``, enlarged x1.2 to a square around its centre (area outside the
  image is transparent), resized to 518 px with LANCZOS, then the colour is **premultiplied** by
  alpha (black background, TRELLIS) or composited on **white** (Hunyuan3D), and normalised with
  the ImageNet mean / std. RGB images without alpha are used whole (no background removal here).
* **Class labels** (:class:`ClassConditioner`): an embedding table with one extra learned *null* row
  at index ``num_classes``; output is a one-token sequence ``(b, 1, C)`` (the class DiT adds it to the
  timestep embedding).
* **Null conditions** for classifier-free guidance: zeros for image tokens (TRELLIS, Hunyuan3D,
  TripoSG), the null index for labels; training-time dropout is :func:`shapeflow.flow.drop_condition`
  (``p`` about 0.1), exposed here as ``.drop``.

Legend: b batch, l condition tokens, C width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from shapeflow.flow import drop_condition

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Class labels
# ----------------------------------------------------------------------------------------------


class ClassConditioner(nn.Module):
    """Class label -> one condition token, ``(b,) int -> (b, 1, dim)``; index ``num_classes`` = null class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)
        self.init_weights()

    @property
    def null_index(self) -> int:
        return self.num_classes

    def init_weights(self) -> None:
        """Embedding rows (null row included) ~ N(0, 0.02) (DiT ``y_embedder``)."""
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, None, :]  # (b, 1, dim)

    def null_condition(self, batch: int, *, device=None) -> torch.Tensor:
        """Null labels ``(batch,)``."""
        return torch.full((batch,), self.null_index, dtype=torch.long, device=device)

    def drop(self, labels: torch.Tensor, p: float, *,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null label with probability ``p`` (CFG training)."""
        return drop_condition(labels, p, null=self.null_condition(labels.shape[0], device=labels.device),
                              generator=generator)


# ----------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------


def _to_pil_rgba(image):
    if isinstance(image, Image.Image):
        return image.convert("RGBA") if image.mode != "RGBA" else image
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (h, w, 3|4) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f" and arr.size and arr.max() <= 1.0:
            arr = np.round(arr * 255.0)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return Image.fromarray(arr, mode="RGBA")


def crop_to_foreground(image, *, scale: float = 1.2, alpha_threshold: float = 0.8):
    """Square crop around the alpha bounding box, enlarged by ``scale`` (TRELLIS ``preprocess_image``).

    Pixels with ``alpha > alpha_threshold * 255`` define the box; its longer side times ``scale`` is the
    square's side, centred on the box centre. Regions outside the image come back transparent black.
    Returns a PIL RGBA image. Raises ``ValueError`` if no pixel passes the threshold.
    """
    img = _to_pil_rgba(image)
    alpha = np.asarray(img)[:, :, 3]
    ys, xs = np.nonzero(alpha > alpha_threshold * 255)
    if len(xs) == 0:
        raise ValueError(f"image has no foreground (no alpha above {alpha_threshold:g}); expected an RGBA "
                         "render or a photo with its background removed")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    size = max(int(max(x1 - x0, y1 - y0) * scale), 2)
    box = (cx - size // 2, cy - size // 2, cx + size // 2, cy + size // 2)  # PIL rounds, as in TRELLIS
    return img.crop(box)


def preprocess_image(
    image,
    *,
    size: int = 518,
    crop: bool = True,
    crop_scale: float = 1.2,
    alpha_threshold: float = 0.8,
    background: Literal["black", "white"] = "black",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> torch.Tensor:
    """RGBA (or RGB) image -> normalised ``(3, size, size)`` float32 tensor for DINOv2.

    Parameters
    ----------
    image : PIL image or ``(h, w, 3|4)`` uint8 / float-in-[0, 1] array.
    crop : crop to the alpha bounding box enlarged by ``crop_scale`` (:func:`crop_to_foreground`);
        images without an alpha channel are opaque, so the crop is then the whole image enlarged.
    background : ``"black"`` premultiplies colour by alpha (TRELLIS), ``"white"`` composites on white
        (Hunyuan3D).
    """
    if crop:
        img = crop_to_foreground(image, scale=crop_scale, alpha_threshold=alpha_threshold)
    else:
        img = _to_pil_rgba(image)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(img).astype(np.float32) / 255.0  # (size, size, 4)
    rgb, alpha = arr[:, :, :3], arr[:, :, 3:4]
    if background == "black":
        rgb = rgb * alpha
    elif background == "white":
        rgb = rgb * alpha + (1.0 - alpha)
    else:
        raise ValueError(f"background must be 'black' or 'white', got {background!r}")
    rgb = (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))  # (3, size, size)


def separate_background(image, *, source: str = "image", tolerance: float = 12.0) -> Image.Image:
    """An RGB(A) image whose alpha is all opaque -> RGBA with the background made transparent.

    Works when the background is one flat colour: the median of the border pixels, and every pixel within
    ``tolerance`` (0-255 units, max over channels) of it connected to the border is background. Raises
    ``ValueError`` naming ``source`` when the border is not one colour (a photo: remove its background first,
    e.g. with ``rembg``) or nothing is left.
    """
    from scipy import ndimage  # scipy is a core dependency (geometry)

    rgba = np.array(_to_pil_rgba(image))
    if rgba[..., 3].min() < 255:
        return Image.fromarray(rgba, mode="RGBA")
    rgb = rgba[..., :3].astype(np.int16)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])  # (k, 3)
    colour = np.median(border, axis=0)
    if np.mean(np.abs(border - colour).max(axis=1) <= tolerance) < 0.95:
        raise ValueError(f"{source}: no alpha channel and the background is not one flat colour; give an RGBA "
                         "image with the background removed (e.g. rembg)")
    close = np.abs(rgb - colour).max(axis=-1) <= tolerance
    labels, _ = ndimage.label(close)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge[edge > 0])
    if background.all():
        raise ValueError(f"{source}: the image is one flat colour (no object to reconstruct)")
    rgba[..., 3] = np.where(background, 0, 255).astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


def preprocess_image_hunyuan(image, *, size: int = 518, processor_size: int = 512, border_ratio: float = 0.15,
                             source: str = "image", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Hunyuan3D's recipe (``ImageProcessorV2`` + the DINOv2 encoder's transform) -> ``(3, size, size)``.

    1. the alpha bounding box (any alpha > 0; an opaque image first goes through :func:`separate_background`),
       scaled so its longer side is ``int(S (1 - border_ratio))`` of the square canvas ``S = max(h, w)``,
       centred on a transparent canvas (area resampling);
    2. composited on white, resized to ``processor_size`` (bicubic);
    3. resized to ``size`` (bilinear, antialiased), centre-cropped, ImageNet-normalised.

    Hunyuan uses OpenCV's resamplers in 1-2 (INTER_AREA, INTER_CUBIC); PIL's box and bicubic filters are
    used here, so pixels can differ by a few grey levels. The box's last row and column are excluded, as in
    the reference.
    """
    img = separate_background(image, source=source)
    arr = np.asarray(img)  # (h, w, 4) uint8
    ys, xs = np.nonzero(arr[..., 3])
    if len(ys) == 0:
        raise ValueError(f"{source}: the alpha channel is empty (nothing to reconstruct)")
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0, x1 - x0
    if h == 0 or w == 0:
        raise ValueError(f"{source}: the foreground is a single line of pixels")
    side = max(arr.shape[0], arr.shape[1])
    scale = int(side * (1 - border_ratio)) / max(h, w)
    h2, w2 = max(int(h * scale), 1), max(int(w * scale), 1)
    crop = Image.fromarray(np.ascontiguousarray(arr[y0:y1, x0:x1]), mode="RGBA")
    canvas = np.zeros((side, side, 4), np.uint8)
    top, left = (side - h2) // 2, (side - w2) // 2
    canvas[top:top + h2, left:left + w2] = np.asarray(crop.resize((w2, h2), Image.Resampling.BOX))
    alpha = canvas[..., 3:].astype(np.float32) / 255.0
    rgb = (canvas[..., :3] * alpha + 255.0 * (1 - alpha)).clip(0, 255).astype(np.uint8)
    rgb = Image.fromarray(rgb, mode="RGB").resize((processor_size, processor_size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, p, p)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


# ----------------------------------------------------------------------------------------------
# DINOv2 image tokens
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConditionerConfig:
    """How images become condition tokens (defaults: DINOv2-L patch tokens, TRELLIS preprocessing)."""

    model_name: str = "facebook/dinov2-large"  # hub name or local directory of a transformers DINOv2
    image_size: int = 518  # input resolution (37 x 37 patches of 14 px)
    background: Literal["black", "white"] = "black"  # black: premultiplied alpha (TRELLIS); white: Hunyuan3D
    crop_scale: float = 1.2  # alpha bounding box enlargement before resizing
    alpha_threshold: float = 0.8  # foreground = alpha above this fraction
    tokens: Literal["patch", "all"] = "patch"  # patch tokens only, or CLS (+ registers) too
    features: Literal["prenorm", "final"] = "prenorm"  # last block + plain LN (TRELLIS) / backbone output
    recipe: Literal["trellis", "hunyuan"] = "trellis"  # preprocess_image / preprocess_image_hunyuan
    processor_size: int = 512  # hunyuan recipe: the intermediate square size
    border_ratio: float = 0.15  # hunyuan recipe: empty border around the object

    @classmethod
    def trellis(cls) -> "ImageConditionerConfig":
        """TRELLIS: DINOv2-L/14 with registers, all 1374 tokens, pre-norm + LN, black background."""
        return cls(model_name="facebook/dinov2-with-registers-large", tokens="all", features="prenorm",
                   background="black")

    @classmethod
    def hunyuan(cls, *, image_size: int = 518, use_cls_token: bool = True, processor_size: int = 512,
                border_ratio: float = 0.15, model_name: str = "facebook/dinov2-large") -> "ImageConditionerConfig":
        """Hunyuan3D-2.x: final-LN output with CLS (1370 tokens at 518 px), its recentring on white
        (:func:`preprocess_image_hunyuan`); DINOv2-L for 2.1, DINOv2-G for 2.0 / 2mini."""
        return cls(model_name=model_name, image_size=image_size, tokens="all" if use_cls_token else "patch",
                   features="final", background="white", recipe="hunyuan", processor_size=processor_size,
                   border_ratio=border_ratio)


class ImageConditioner(nn.Module):
    """Frozen DINOv2 image encoder: images -> condition tokens ``(b, l, hidden)``.

    Build with :meth:`from_pretrained` (downloads / reads weights by hub name, for users) or
    :meth:`from_config` (a ``transformers`` ``Dinov2Config`` / ``Dinov2WithRegistersConfig``, random
    weights; tests). ``cond_dim`` is the token width for :class:`~shapeflow.models.dit.DiTConfig`.
    """

    def __init__(self, backbone: nn.Module, config: ImageConditionerConfig = ImageConditionerConfig()):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        bcfg = backbone.config
        self.patch_size = int(bcfg.patch_size)
        self.num_prefix_tokens = 1 + int(getattr(bcfg, "num_register_tokens", 0) or 0)
        if config.image_size % self.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of the patch size "
                             f"{self.patch_size}")

    @classmethod
    def from_pretrained(cls, name: str | None = None, config: ImageConditionerConfig | None = None,
                        **kwargs) -> "ImageConditioner":
        """DINOv2 weights via ``transformers.AutoModel.from_pretrained(name)`` (hub name or local dir)."""
        from transformers import AutoModel  # lazy: optional dependency (the "image" extra)

        config = config or ImageConditionerConfig()
        if name is not None:
            config = dataclasses.replace(config, model_name=name)
        backbone = AutoModel.from_pretrained(config.model_name, **kwargs)
        return cls(backbone, config)

    @classmethod
    def from_config(cls, backbone_config, config: ImageConditionerConfig | None = None) -> "ImageConditioner":
        """A randomly initialised DINOv2 from a ``transformers`` config (nothing is downloaded)."""
        from transformers import AutoModel  # lazy: optional dependency (the "image" extra)

        return cls(AutoModel.from_config(backbone_config), config or ImageConditionerConfig())

    @property
    def cond_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def num_tokens(self, image_size: int | None = None) -> int:
        """Condition tokens per image at ``image_size`` (1369 patch tokens at 518 px)."""
        n = ((image_size or self.config.image_size) // self.patch_size) ** 2
        return n + (self.num_prefix_tokens if self.config.tokens == "all" else 0)

    def train(self, mode: bool = True) -> "ImageConditioner":
        super().train(mode)
        self.backbone.eval()  # frozen: never in training mode (no dropout / drop-path)
        return self

    def preprocess(self, images, *, source: str = "image") -> torch.Tensor:
        """PIL / array images (a list or one) -> ``(b, 3, s, s)`` pixels (:func:`preprocess_image`, or
        :func:`preprocess_image_hunyuan`; ``source`` names the input in its errors)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        c = self.config
        if c.recipe == "hunyuan":
            return torch.stack([preprocess_image_hunyuan(im, size=c.image_size, processor_size=c.processor_size,
                                                         border_ratio=c.border_ratio, source=source)
                                for im in images])
        return torch.stack([preprocess_image(im, size=c.image_size, crop_scale=c.crop_scale,
                                             alpha_threshold=c.alpha_threshold, background=c.background)
                            for im in images])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(b, 3, s, s)`` -> condition tokens ``(b, l, cond_dim)`` in float32."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected preprocessed pixels (b, 3, s, s), got {tuple(pixels.shape)}")
        param = next(self.backbone.parameters())
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        if self.config.features == "prenorm":
            out = self.backbone(pixel_values=pixels, output_hidden_states=True)
            h = out.hidden_states[-1].float()  # (b, l_all, C): last block output, before the final LayerNorm
        else:
            h = self.backbone(pixel_values=pixels).last_hidden_state.float()  # (b, l_all, C)
        if self.config.tokens == "patch":
            h = h[:, self.num_prefix_tokens:]  # (b, patches, C)
        if self.config.features == "prenorm":
            h = F.layer_norm(h, (h.shape[-1],))  # non-affine, eps 1e-5 (TRELLIS F.layer_norm)
        return h

    def encode_images(self, images) -> torch.Tensor:
        """PIL / array images -> condition tokens (preprocess + forward)."""
        return self(self.preprocess(images))

    def null_condition(self, batch: int, *, device=None) -> torch.Tensor:
        """All-zero tokens ``(batch, l, cond_dim)``, the unconditional input for guidance."""
        return torch.zeros(batch, self.num_tokens(), self.cond_dim, device=device)

    @staticmethod
    def drop(tokens: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Zero each sample's tokens with probability ``p`` (CFG training)."""
        return drop_condition(tokens, p, generator=generator)
