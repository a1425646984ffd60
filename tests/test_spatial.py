"""pixel_shuffle_3d / pixel_unshuffle_3d / patchify_3d / unpatchify_3d: exact mapping, inverses, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from shapeflow.nn.spatial import patchify_3d, pixel_shuffle_3d, pixel_unshuffle_3d, unpatchify_3d


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_pixel_shuffle_matches_naive_loop(s):
    # TRELLIS mapping: input channel c*s^3 + sx*s^2 + sy*s + sz at voxel (i, j, k)
    # -> output voxel (s*i + sx, s*j + sy, s*k + sz) of channel c.
    b, c, d, h, w = 2, 2, 2, 3, 1
    x = _rand(b, c * s**3, d, h, w)
    y = pixel_shuffle_3d(x, s)
    assert y.shape == (b, c, s * d, s * h, s * w)
    ref = torch.empty_like(y)
    for n, ch, i, j, k, sx, sy, sz in itertools.product(
        range(b), range(c), range(d), range(h), range(w), range(s), range(s), range(s)
    ):
        ref[n, ch, s * i + sx, s * j + sy, s * k + sz] = x[n, ch * s**3 + sx * s * s + sy * s + sz, i, j, k]
    assert torch.equal(y, ref)


def test_pixel_shuffle_matches_trellis_reshape_permute():
    # The literal reshape/permute sequence of trellis/modules/spatial.py (sparse_voxel.md 1.1).
    x = _rand(3, 16, 4, 5, 6)
    B, C, H, W, D = x.shape
    s = 2
    ref = x.reshape(B, C // 8, s, s, s, H, W, D).permute(0, 1, 5, 2, 6, 3, 7, 4)
    ref = ref.reshape(B, C // 8, H * 2, W * 2, D * 2)
    assert torch.equal(pixel_shuffle_3d(x, 2), ref)


@pytest.mark.parametrize("s", [1, 2, 4])
def test_shuffle_unshuffle_are_exact_inverses(s):
    x = _rand(2, 3 * s**3, 2, 3, 2)
    assert torch.equal(pixel_unshuffle_3d(pixel_shuffle_3d(x, s), s), x)
    y = _rand(2, 3, 2 * s, 4 * s, s, seed=1)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(y, s), s), y)


def test_pixel_shuffle_errors():
    with pytest.raises(ValueError, match="channel count 12 is not divisible by scale\\^3 = 8"):
        pixel_shuffle_3d(torch.zeros(1, 12, 2, 2, 2), 2)
    with pytest.raises(ValueError, match="spatial size h=5 is not divisible by scale 2"):
        pixel_unshuffle_3d(torch.zeros(1, 1, 4, 5, 4), 2)
    with pytest.raises(ValueError, match="expects a \\(b, c, d, h, w\\) tensor"):
        pixel_shuffle_3d(torch.zeros(8, 2, 2, 2), 2)
    with pytest.raises(ValueError, match="positive integer"):
        pixel_shuffle_3d(torch.zeros(1, 8, 2, 2, 2), 0)


def test_patchify_matches_trellis_patchify_and_token_order():
    x = _rand(2, 3, 4, 6, 2)
    p = 2
    # Literal TRELLIS `patchify` (seed article D.3) for DIM = 3.
    DIM = 3
    ref = x.reshape(*x.shape[:2], *sum([[x.shape[d] // p, p] for d in range(2, DIM + 2)], []))
    ref = ref.permute(0, 1, *([2 * i + 3 for i in range(DIM)] + [2 * i + 2 for i in range(DIM)]))
    ref = ref.reshape(x.shape[0], x.shape[1] * p**DIM, *ref.shape[-DIM:])
    g = patchify_3d(x, p)
    assert torch.equal(g, ref)
    assert torch.equal(g, pixel_unshuffle_3d(x, p))
    t = patchify_3d(x, p, tokens=True)
    assert t.shape == (2, 2 * 3 * 1, 3 * 8)
    # Token n = (i * h' + j) * w' + k (C order over the patch grid); feature = c*p^3 + px*p^2 + py*p + pz.
    offsets = itertools.product(range(2), range(3), range(1), range(3), range(2), range(2), range(2))
    for i, j, k, c, px, py, pz in offsets:
        n = (i * 3 + j) * 1 + k
        f = c * 8 + px * 4 + py * 2 + pz
        assert t[1, n, f] == x[1, c, 2 * i + px, 2 * j + py, 2 * k + pz]


@pytest.mark.parametrize("p", [1, 2])
def test_unpatchify_inverts_both_forms(p):
    x = _rand(2, 8, 4, 4, 8)
    assert torch.equal(unpatchify_3d(patchify_3d(x, p), p), x)
    assert torch.equal(unpatchify_3d(patchify_3d(x, p, tokens=True), p, grid=(4, 4, 8)), x)
    tok = _rand(2, (4 // p) ** 2 * (8 // p), 8 * p**3, seed=3)
    assert torch.equal(patchify_3d(unpatchify_3d(tok, p, grid=(4, 4, 8)), p, tokens=True), tok)


def test_patchify_errors():
    with pytest.raises(ValueError, match="spatial size w=5 is not divisible by scale 2"):
        patchify_3d(torch.zeros(1, 2, 4, 4, 5), 2)
    with pytest.raises(ValueError, match="needs grid"):
        unpatchify_3d(torch.zeros(1, 8, 16), 2)
    with pytest.raises(ValueError, match="grid size d=3 is not divisible by patch size 2"):
        unpatchify_3d(torch.zeros(1, 8, 16), 2, grid=(3, 4, 4))
    with pytest.raises(ValueError, match="7 tokens do not fill a 2x2x2 patch grid"):
        unpatchify_3d(torch.zeros(1, 7, 16), 2, grid=(4, 4, 4))
    with pytest.raises(ValueError, match="not divisible by scale\\^3"):
        unpatchify_3d(torch.zeros(1, 8, 12), 2, grid=(4, 4, 4))
    with pytest.raises(ValueError, match="differs from grid"):
        unpatchify_3d(torch.zeros(1, 16, 2, 2, 2), 2, grid=(4, 4, 6))


def test_pixel_shuffle_keeps_channels_last_layout():
    x = _rand(2, 16, 3, 4, 5)
    y = pixel_shuffle_3d(x.contiguous(memory_format=torch.channels_last_3d), 2)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(y, pixel_shuffle_3d(x, 2))
    assert pixel_shuffle_3d(x, 2).is_contiguous()
