"""The sparse-voxel engine (:mod:`shapeflow.sparse`) against dense references, on tiny CPU grids.

* SubMConv3d equals ``F.conv3d`` on the zero-filled dense grid read at the active nodes (float64, 1e-12),
  for both algorithms, dilations 1 and 2, a 5^3 kernel, and a batch whose elements have different
  coordinates; batch elements never mix; gradcheck; the neighbour map is built once per coordinate set.
* fold / unfold / child_mask / unfold_to against ``pixel_unshuffle_3d`` and set arithmetic.
* Norms take per-batch-element statistics; window attention equals a naive loop over windows.
* Bad inputs raise one-line ValueErrors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shapeflow.sparse.nn as sparse_nn
import shapeflow.sparse.tensor as sparse_tensor
from shapeflow.nn.spatial import pixel_unshuffle_3d
from shapeflow.sparse import (
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseTensor,
    SparseWindowAttention,
    SubMConv3d,
    cat,
    child_mask,
    parent_rows,
    fold,
    kernel_offsets,
    unfold,
    unfold_to,
)


def random_sparse(seed: int, *, batch: int = 2, shape: int = 9, density: float = 0.3, channels: int = 3,
                  dtype=torch.float64) -> SparseTensor:
    """Random active nodes (different in every batch element) with random features."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, shape, shape, shape, generator=g) < density
    x = torch.randn(batch, channels, shape, shape, shape, generator=g, dtype=dtype)
    return SparseTensor.from_dense(x, mask)


def at_nodes(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S, S) dense -> (N, C) values at coords."""
    c = coords.long()
    return dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


def make_conv(cin: int, cout: int, k: int, d: int, algorithm: str, seed: int = 0) -> SubMConv3d:
    torch.manual_seed(seed)
    return SubMConv3d(cin, cout, k, d, algorithm=algorithm).double()


# ------------------------------------------------------------------------------------------------
# SparseTensor
# ------------------------------------------------------------------------------------------------


def test_dense_round_trip_and_batch_slices():
    x = random_sparse(0)
    assert x.coords.dtype == torch.int32 and x.batch_size == 2 and x.shape == 9
    y = SparseTensor.from_dense(x.dense(), x.dense().abs().sum(1) > 0)
    assert torch.equal(y.coords, x.coords) and torch.equal(y.feats, x.feats)
    (s0, e0), (s1, e1) = x.batch_slices()
    assert s0 == 0 and e0 == s1 and e1 == x.num_voxels
    assert bool((x.coords[s0:e0, 0] == 0).all()) and bool((x.coords[s1:e1, 0] == 1).all())


def test_from_unsorted_sorts_and_merges():
    coords = torch.tensor([[1, 0, 0, 0], [0, 2, 1, 0], [0, 0, 0, 3], [0, 2, 1, 0]])
    feats = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    x = SparseTensor.from_unsorted(coords, feats, 4)
    assert x.coords.tolist() == [[0, 0, 0, 3], [0, 2, 1, 0], [1, 0, 0, 0]]
    assert x.feats[:, 0].tolist() == [3.0, 3.0, 1.0]
    assert SparseTensor.from_unsorted(coords, feats, 4, reduce="sum").feats[1, 0] == 6.0


def test_neighbors_against_brute_force():
    x = random_sparse(1, shape=6, density=0.4)
    index = {tuple(c): n for n, c in enumerate(x.coords.tolist())}
    for k, d in ((3, 1), (3, 2), (5, 1)):
        nbr = x.neighbors(k, d)
        offsets = kernel_offsets(k, d).tolist()
        assert nbr.shape == (x.num_voxels, k**3) and nbr.dtype == torch.int64
        expect = [[index.get((b, i + di, j + dj, kk + dk), -1) for di, dj, dk in offsets]
                  for b, i, j, kk in x.coords.tolist()]
        assert nbr.tolist() == expect
    assert kernel_offsets(3)[:3].tolist() == [[-1, -1, -1], [-1, -1, 0], [-1, -1, 1]]  # last axis fastest


# ------------------------------------------------------------------------------------------------
# Submanifold convolution
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["im2col", "offsets"])
@pytest.mark.parametrize("k,d", [(1, 1), (3, 1), (3, 2), (5, 1)])
def test_subm_conv_equals_dense_conv(algorithm, k, d):
    x = random_sparse(2)
    conv = make_conv(3, 4, k, d, algorithm)
    y = conv(x)
    ref = F.conv3d(x.dense(), conv.weight, conv.bias, padding=k // 2 * d, dilation=d)
    assert torch.equal(y.coords, x.coords)
    torch.testing.assert_close(y.feats, at_nodes(ref, x.coords), rtol=0, atol=1e-12)
    # full (dense) sparse tensor: exactly nn.Conv3d's output everywhere
    full = SparseTensor.from_dense(x.dense(), torch.ones(2, 9, 9, 9, dtype=torch.bool))
    torch.testing.assert_close(conv(full).dense(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["im2col", "offsets"])
def test_subm_conv_batch_elements_never_mix(algorithm):
    x = random_sparse(3)
    conv = make_conv(3, 2, 3, 1, algorithm)
    y = conv(x)
    # move the voxels of element 1 (new coords and feats); element 0's rows keep their output
    other = random_sparse(4)
    s1 = other.batch_slices()[1][0]
    e0 = x.batch_slices()[0][1]
    z = SparseTensor(torch.cat([x.coords[:e0], other.coords[s1:]]), torch.cat([x.feats[:e0], other.feats[s1:]]), 9)
    assert torch.equal(conv(z).feats[:e0], y.feats[:e0])


@pytest.mark.parametrize("algorithm", ["im2col", "offsets"])
def test_subm_conv_gradcheck(algorithm):
    x = random_sparse(5, batch=1, shape=4, density=0.5, channels=2)
    conv = make_conv(2, 3, 3, 1, algorithm)

    def f(feats, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (x.replace(feats),)).feats

    inputs = (x.feats, conv.weight, conv.bias)
    assert torch.autograd.gradcheck(f, tuple(t.detach().clone().requires_grad_() for t in inputs))


@pytest.mark.parametrize("budget", [1, 6000])
def test_im2col_chunks(monkeypatch, budget):
    """Row chunks of 50 voxels, in offset groups of 1 (budget 1) or 5 (6000 bytes): same values and grads."""
    x = random_sparse(20)
    conv = make_conv(3, 4, 3, 1, "im2col")

    def run():
        feats = x.feats.clone().requires_grad_()
        conv.zero_grad()
        y = conv(x.replace(feats)).feats
        (y * torch.arange(4.0, dtype=torch.float64)).sum().backward()
        return y, feats.grad, conv.weight.grad.clone()

    expect = run()
    monkeypatch.setattr(sparse_nn, "_CHUNK_BYTES", {"cpu": budget})
    monkeypatch.setattr(sparse_nn, "_MIN_ROWS", 50)
    assert sparse_nn._chunking(torch.device("cpu"), 27, 3, 8) == (50, 1 if budget == 1 else 5)
    for a, b in zip(run(), expect):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_conv_algorithms_agree_and_init_matches_conv3d():
    x = random_sparse(6, channels=8, dtype=torch.float32)
    a, b = make_conv(8, 8, 3, 1, "im2col").float(), make_conv(8, 8, 3, 1, "offsets").float()
    torch.testing.assert_close(a(x).feats, b(x).feats)
    torch.manual_seed(0)
    dense = nn.Conv3d(8, 8, 3)
    torch.manual_seed(0)
    sparse = SubMConv3d(8, 8, 3)
    assert torch.equal(dense.weight, sparse.weight) and torch.equal(dense.bias, sparse.bias)
    assert SubMConv3d(8, 8).algorithm == "im2col" and SubMConv3d(128, 128).algorithm == "offsets"


def test_neighbor_map_is_built_once(monkeypatch):
    calls = []
    build = sparse_tensor._build_neighbors
    monkeypatch.setattr(sparse_tensor, "_build_neighbors", lambda *a: calls.append(a[3:]) or build(*a))
    x = random_sparse(7)
    conv1, conv2 = make_conv(3, 3, 3, 1, "im2col"), make_conv(3, 3, 3, 1, "offsets")
    y = conv2(conv1(x))
    y = conv1(SparseSiLU()(y.replace(y.feats * 2)))
    assert calls == [(3, 1)]
    assert y.neighbors() is x.neighbors()
    make_conv(3, 3, 3, 2, "im2col")(y)
    assert calls == [(3, 1), (3, 2)]


def test_conv_under_autocast():
    x = random_sparse(8, channels=4, dtype=torch.float32)
    conv = SubMConv3d(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.feats.dtype == torch.bfloat16
    torch.testing.assert_close(y.feats.float(), conv(x).feats, rtol=0.05, atol=0.05)
    y.feats.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Levels: fold / unfold / child_mask / unfold_to
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [8, 9])
def test_unfold_inverts_fold(shape):
    x = random_sparse(9, shape=shape)
    p = fold(x)
    assert p.shape == (shape + 1) // 2 and p.num_channels == 8 * 3
    y = unfold(p, keep=child_mask(p, x.coords), shape=shape)
    assert torch.equal(y.coords, x.coords) and torch.equal(y.feats, x.feats)


def test_fold_slots_match_pixel_unshuffle():
    x = random_sparse(10, shape=8)
    p = fold(x)
    b, c = x.batch_size, x.num_channels
    dense = p.dense().view(b, 8, c, 4, 4, 4).transpose(1, 2).reshape(b, c * 8, 4, 4, 4)  # slot-major -> c * 8 + s
    assert torch.equal(dense, pixel_unshuffle_3d(x.dense(), 2))
    # the parents are exactly the occupied 2x2x2 blocks
    occupied = pixel_unshuffle_3d((x.dense().abs().sum(1, keepdim=True) > 0).double(), 2).sum(1) > 0
    assert torch.equal(p.coords, occupied.nonzero().int())


def test_unfold_keep_mask_and_child_mask():
    x = random_sparse(11, shape=5, channels=2 * 8)
    keep = torch.rand(x.num_voxels, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    y = unfold(x, keep=keep, shape=9)
    expect = sorted((b, 2 * i + oi, 2 * j + oj, 2 * k + ok)
                    for n, (b, i, j, k) in enumerate(x.coords.tolist())
                    for s, (oi, oj, ok) in enumerate((a, bb, cc) for a in (0, 1) for bb in (0, 1) for cc in (0, 1))
                    if keep[n, s] and max(2 * i + oi, 2 * j + oj, 2 * k + ok) < 9)
    assert [tuple(c) for c in y.coords.tolist()] == expect
    in_range = child_mask(x, unfold(x, shape=9).coords)  # all children inside the 9^3 grid
    assert torch.equal(child_mask(x, y.coords), keep & in_range)
    # each child carries its slot's columns
    parent = {tuple(c): n for n, c in enumerate(x.coords.tolist())}
    for (b, i, j, k), f in zip(y.coords.tolist(), y.feats):
        s = (i & 1) * 4 + (j & 1) * 2 + (k & 1)
        assert torch.equal(f, x.feats[parent[(b, i >> 1, j >> 1, k >> 1)], 2 * s:2 * s + 2])
    # fold's occupancy: a block of ones marks the present children
    fine = random_sparse(12, shape=9)
    p = fold(fine.replace(torch.ones(fine.num_voxels, 1, dtype=torch.float64)))
    assert torch.equal(child_mask(p, fine.coords), p.feats > 0)


def test_unfold_to_gives_exactly_the_targets():
    x = random_sparse(13, shape=5, channels=8)
    target = random_sparse(14, shape=9, channels=1)
    y = unfold_to(x, target.coords, 9)
    assert torch.equal(y.coords, target.coords) and y.shape == 9
    parent = {tuple(c): n for n, c in enumerate(x.coords.tolist())}
    for (b, i, j, k), f in zip(y.coords.tolist(), y.feats[:, 0].tolist()):
        n = parent.get((b, i >> 1, j >> 1, k >> 1))
        assert f == (0.0 if n is None else float(x.feats[n, (i & 1) * 4 + (j & 1) * 2 + (k & 1)]))
    z = unfold_to(x, target, None)  # a SparseTensor target: its cache is shared
    assert torch.equal(z.feats, y.feats) and z._cache is target._cache


def test_parent_rows_point_at_each_parent_or_minus_one():
    x = random_sparse(17, shape=5, channels=1)
    fine = random_sparse(18, shape=9, channels=1)
    rows = parent_rows(x, fine.coords)
    parent = {tuple(c): n for n, c in enumerate(x.coords.tolist())}
    expect = [parent.get((b, i >> 1, j >> 1, k >> 1), -1) for b, i, j, k in fine.coords.tolist()]
    assert rows.tolist() == expect and -1 in expect and max(expect) >= 0


def test_ops_are_differentiable():
    x = random_sparse(15, shape=8, channels=2)
    feats = x.feats.clone().requires_grad_()
    p = fold(x.replace(feats))
    y = unfold_to(p, x.coords, 8)
    (y.feats * torch.arange(2, dtype=torch.float64)).sum().backward()
    assert torch.equal(feats.grad, torch.arange(2, dtype=torch.float64).expand_as(feats))
    assert cat(x, x.replace(x.feats * 2)).num_channels == 4


# ------------------------------------------------------------------------------------------------
# Norms, linear
# ------------------------------------------------------------------------------------------------


def test_group_norm_per_batch_element():
    x = random_sparse(16, channels=6)
    norm = SparseGroupNorm(3, 6).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    ref = nn.GroupNorm(3, 6).double()
    ref.load_state_dict(norm.state_dict())
    y = norm(x)
    for s, e in x.batch_slices():
        torch.testing.assert_close(y.feats[s:e], ref(x.feats[s:e].t()[None])[0].t(), rtol=0, atol=1e-12)
    ln = SparseLayerNorm(6).double()
    torch.testing.assert_close(ln(x).feats, F.layer_norm(x.feats, (6,), eps=1e-6))
    lin = SparseLinear(6, 2).double()
    torch.testing.assert_close(lin(x).feats, x.feats @ lin.weight.t() + lin.bias)


# ------------------------------------------------------------------------------------------------
# Window attention
# ------------------------------------------------------------------------------------------------


def naive_window_attention(attn: SparseWindowAttention, x: SparseTensor) -> torch.Tensor:
    """Loop over (batch, window) groups; softmax attention written out."""
    h, d, w = attn.heads, attn.head_dim, attn.window
    qkv = attn.to_qkv(x.feats).view(-1, 3, h, d)
    out = torch.zeros(x.num_voxels, h * d, dtype=x.feats.dtype)
    win = torch.cat([x.coords[:, :1].long(), (x.coords[:, 1:].long() + attn.shift) // w], 1)
    for key in win.unique(dim=0):
        rows = (win == key).all(1).nonzero().squeeze(1)
        q, k, v = (qkv[rows, i].transpose(0, 1)[None] for i in range(3))  # (1, h, n, d)
        q, k = attn.q_norm(q), attn.k_norm(k)
        a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
        out[rows] = (a @ v)[0].transpose(0, 1).reshape(len(rows), h * d)
    return attn.to_out(out)


@pytest.mark.parametrize("shift", [0, 2])
def test_window_attention_equals_naive_loop(shift):
    x = random_sparse(17, shape=10, density=0.2, channels=8)
    torch.manual_seed(0)
    attn = SparseWindowAttention(8, 2, window=4, shift=shift).double()
    nn.init.normal_(attn.q_norm.gamma)
    y = attn(x)
    torch.testing.assert_close(y.feats, naive_window_attention(attn, x), rtol=0, atol=1e-12)
    # move one voxel of another window (and batch element 1 entirely): window (0, 0, 0, 0) is unchanged
    win = (x.coords[:, 1:].long() + shift) // 4
    first = (x.coords[:, 0] == 0) & (win == 0).all(1)
    c = x.coords.clone()
    c[~first & (x.coords[:, 0] == 0), 1:] = c[~first & (x.coords[:, 0] == 0), 1:].flip(1)
    c[x.coords[:, 0] == 1, 1:] = 9 - c[x.coords[:, 0] == 1, 1:]
    moved = SparseTensor.from_unsorted(c, x.feats, 10)
    keep = (moved.coords[:, 0] == 0) & ((moved.coords[:, 1:].long() + shift) // 4 == 0).all(1)
    assert keep.sum() == first.sum() > 0
    torch.testing.assert_close(attn(moved).feats[keep], y.feats[first], rtol=0, atol=1e-12)


def test_empty_tensor_and_detach():
    x = SparseTensor(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 3), 8, batch_size=2)
    assert x.batch_slices() == [(0, 0), (0, 0)]
    y = SubMConv3d(3, 8)(x)
    assert y.feats.shape == (0, 8) and fold(x).num_voxels == 0 and unfold(fold(y)).num_voxels == 0
    assert SparseWindowAttention(3, 1)(x).feats.shape == (0, 3) and SparseGroupNorm(1, 3)(x).num_voxels == 0
    x = random_sparse(18)
    z = x.replace(torch.ones(x.num_voxels, 1, requires_grad=True))
    assert not z.detach().feats.requires_grad and z.detach()._cache is x._cache
    assert z.to(dtype=torch.float16).dtype == torch.float16 and z.to("cpu")._cache is x._cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = random_sparse(19, channels=8, dtype=torch.float32)
    xc = x.to("cuda")
    for algorithm in ("im2col", "offsets"):
        conv = make_conv(8, 8, 3, 1, algorithm).float()
        ref = conv(x)
        out = conv.cuda()(xc)
        torch.testing.assert_close(out.feats.cpu(), ref.feats, rtol=1e-4, atol=1e-4)
    p = fold(xc)
    assert torch.equal(unfold(p, keep=child_mask(p, xc.coords), shape=9).feats.cpu(), x.feats)
    attn = SparseWindowAttention(8, 2, window=4)
    torch.testing.assert_close(attn.cuda()(xc).feats.cpu(), attn.cpu()(x).feats, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def _raises_one_line(fn, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_inputs_raise_one_line_value_errors():
    c = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.int32)
    f = torch.zeros(2, 3)
    _raises_one_line(lambda: SparseTensor(c.long(), f, 4), "int32")
    _raises_one_line(lambda: SparseTensor(c[:, :3], f, 4), r"\(N, 4\)")
    _raises_one_line(lambda: SparseTensor(c, f[:1], 4), "rows")
    _raises_one_line(lambda: SparseTensor(c, f.long(), 4), "floating")
    _raises_one_line(lambda: SparseTensor(c.flip(0), f, 4), "sorted")
    _raises_one_line(lambda: SparseTensor(c[[0, 0]], f, 4), "unique")
    _raises_one_line(lambda: SparseTensor(c + 3, f, 4), "out of range")
    _raises_one_line(lambda: SparseTensor(c, f, 0), "shape")
    _raises_one_line(lambda: SparseTensor(c, f, 4, batch_size=0), "batch_size")
    x = SparseTensor(c, f, 4)
    _raises_one_line(lambda: x.replace(torch.zeros(3, 3)), "rows")
    _raises_one_line(lambda: x.neighbors(2), "odd")
    _raises_one_line(lambda: SubMConv3d(4, 4)(x), "channels")
    _raises_one_line(lambda: SubMConv3d(3, 3, backend="spconv"), "backend")
    _raises_one_line(lambda: unfold(x), "divisible by 8")
    p = x.replace(torch.zeros(2, 8))
    _raises_one_line(lambda: unfold(p, keep=torch.ones(2, 4, dtype=torch.bool)), "keep")
    _raises_one_line(lambda: unfold(p, shape=5), "coarsen")
    _raises_one_line(lambda: unfold_to(p, c, None), "shape")
    _raises_one_line(lambda: cat(x, SparseTensor(c[:1], f[:1], 4)), "same coords")
    _raises_one_line(lambda: SparseTensor.from_unsorted(c, f, 4, reduce="median"), "reduce")
    _raises_one_line(lambda: SparseWindowAttention(6, 4), "divisible")
