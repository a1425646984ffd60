"""Conditioning: class labels, image preprocessing, and a tiny local DINOv2 (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shapeflow.models.conditioning import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassConditioner,
    ImageConditioner,
    ImageConditionerConfig,
    crop_to_foreground,
    preprocess_image,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _tiny_backbone_config(registers: bool):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
              image_size=56)
    return Dinov2WithRegistersConfig(num_register_tokens=4, **kw) if registers else Dinov2Config(**kw)


def _rgba(h=100, w=80):
    img = np.zeros((h, w, 4), np.uint8)
    img[30:70, 20:40] = (255, 0, 0, 255)  # opaque red box: rows 30..69, cols 20..39 (40 x 20)
    img[5, 5] = (0, 255, 0, 128)  # half-transparent speck: below the 0.8 threshold, ignored by the crop
    return img


def test_class_conditioner_tokens_null_and_dropout():
    torch.manual_seed(0)
    cc = ClassConditioner(5, 16)
    labels = torch.tensor([0, 4, 2])
    tok = cc(labels)
    assert tok.shape == (3, 1, 16)
    assert cc.null_index == 5 and torch.equal(cc.null_condition(3), torch.full((3,), 5))
    assert cc(cc.null_condition(2)).shape == (2, 1, 16)  # the null row exists and is learned
    dropped = cc.drop(torch.arange(5).repeat(400), 0.1, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 5).float().mean().item()
    assert 0.07 < frac < 0.13
    with pytest.raises(ValueError):
        ClassConditioner(0, 4)


def test_crop_to_foreground_geometry():
    crop = np.asarray(crop_to_foreground(_rgba()))
    # box 40 x 20 px -> extent max(39, 19) = 39 -> side int(39 * 1.2) = 46, centred on the box centre
    assert crop.shape == (46, 46, 4)
    rows, cols = np.nonzero(crop[:, :, 3] == 255)
    assert rows.max() - rows.min() + 1 == 40 and cols.max() - cols.min() + 1 == 20
    assert abs((rows.min() + rows.max()) / 2 - 22.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 22.5) <= 1
    assert crop[:, :, 3].sum() == 255 * 40 * 20  # the speck is outside; padding is transparent
    with pytest.raises(ValueError, match="no foreground"):
        crop_to_foreground(np.zeros((10, 10, 4), np.uint8))


@pytest.mark.parametrize("background", ["black", "white"])
def test_preprocess_premultiplies_or_composites_and_normalises(background):
    x = preprocess_image(_rgba(), size=92, background=background)
    assert x.shape == (3, 92, 92) and x.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None], torch.tensor(IMAGENET_STD)[:, None]
    pixels = x.reshape(3, -1) * std + mean  # back to [0, 1] colour
    bg = 0.0 if background == "black" else 1.0
    torch.testing.assert_close(pixels[:, 0], torch.full((3,), bg), atol=1e-6, rtol=0)  # corner: background
    centre = (x[:, 46, 46] * std[:, 0] + mean[:, 0])
    torch.testing.assert_close(centre, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6, rtol=0)  # inside the red box
    # RGB input (no alpha) is opaque: whole image used, nothing premultiplied away
    rgb = np.full((28, 28, 3), 200, np.uint8)
    y = preprocess_image(rgb, size=28, crop=False)
    torch.testing.assert_close(y[:, 3, 3] * std[:, 0] + mean[:, 0], torch.full((3,), 200 / 255), atol=1e-6, rtol=0)


@pytest.mark.parametrize("registers", [False, True])
def test_tiny_dinov2_tokens_offline(registers, tmp_path):
    torch.manual_seed(0)
    cfg = ImageConditionerConfig(image_size=56, tokens="patch")
    cond = ImageConditioner.from_config(_tiny_backbone_config(registers), cfg)
    assert cond.cond_dim == 32 and cond.num_prefix_tokens == (5 if registers else 1)
    assert not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.backbone.training  # frozen backbone stays in eval mode
    seen = {}
    cond.backbone.layernorm.register_forward_hook(lambda m, inp, out: seen.update(pre=inp[0], post=out))
    images = [_rgba(), _rgba()[:, ::-1].copy()]
    tokens = cond.encode_images(images)
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad
    # patch tokens of the last block before the backbone's final norm, then a non-affine layer norm
    pre = seen["pre"][:, cond.num_prefix_tokens:]
    torch.testing.assert_close(tokens, torch.nn.functional.layer_norm(pre, (32,)))
    # "all" tokens keep CLS (+ registers); "final" returns the backbone's normalised output
    every = ImageConditioner(cond.backbone, ImageConditionerConfig(image_size=56, tokens="all", features="final"))
    out = every(cond.preprocess(images))
    assert out.shape == (2, cond.num_tokens(56) + cond.num_prefix_tokens, 32) == (2, every.num_tokens(), 32)
    torch.testing.assert_close(out, seen["post"])
    assert every.null_condition(3).shape == (3, every.num_tokens(), 32)
    assert torch.count_nonzero(every.null_condition(1)) == 0
    # the real loading path, from a local directory (no network: HF_HUB_OFFLINE=1)
    cond.backbone.save_pretrained(tmp_path / "dino")
    loaded = ImageConditioner.from_pretrained(str(tmp_path / "dino"), cfg)
    torch.testing.assert_close(loaded.encode_images(images), tokens)


def test_preset_configs():
    t = ImageConditionerConfig.trellis()
    assert t.model_name == "facebook/dinov2-with-registers-large" and t.tokens == "all" and t.background == "black"
    h = ImageConditionerConfig.hunyuan()
    assert h.features == "final" and h.background == "white"
    assert ImageConditionerConfig().model_name == "facebook/dinov2-large"
