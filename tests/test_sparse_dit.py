"""The sparse DiT (stage 2 of sparse generation): packing, masks, order equivariance, flow training."""

from __future__ import annotations

import pytest
import torch

from shapeflow.flow import FlowConfig, flow_matching_loss
from shapeflow.models.sparse_dit import SparseDiT, SparseDiTConfig, pack, unpack, velocity_fn
from shapeflow.sampling import sample

CFG = SparseDiTConfig(in_channels=4, resolution=8, patch_size=2, width=48, depth=2, heads=4)


def _voxels(seed: int, m: int, r: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(r ** 3, generator=g)[:m]
    return torch.stack([keys // (r * r), (keys // r) % r, keys % r], dim=-1)


def _model(**kw) -> SparseDiT:
    torch.manual_seed(0)
    model = SparseDiT(SparseDiTConfig(**{**CFG.__dict__, **kw})).eval()
    for p in model.parameters():  # leave adaLN-Zero's all-zero start, so every path carries signal
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_pack_unpack_roundtrip_and_layout():
    coords = [_voxels(0, 30), _voxels(1, 5)]
    feats = [torch.randn(30, 4), torch.randn(5, 4)]
    batch = pack(coords, feats, patch_size=2, channels=4, resolution=8)
    assert batch.x.shape[0] == 2 and batch.x.shape[2:] == (8, 4)
    for i, (c, f, back) in enumerate(zip(coords, feats, unpack(batch.x, batch))):
        assert torch.equal(back, f)
        assert len(c) == int(batch.child[i].sum())
    # every token holds exactly the voxels of its 2^3 cell; tokens sorted; padding after the real tokens
    mask = batch.mask
    assert mask[1].sum() < mask[0].sum() and not mask[1, mask[1].sum():].any()
    cells = {tuple(v) for v in (coords[1] // 2).tolist()}
    assert {tuple(p) for p in batch.pos[1, :int(mask[1].sum())].tolist()} == cells
    with pytest.raises(ValueError, match="outside"):
        pack([torch.tensor([[0, 0, 8]])], None, patch_size=2, channels=4, resolution=8)
    with pytest.raises(ValueError, match="no active voxels"):
        pack([torch.zeros(0, 3, dtype=torch.long)], None, patch_size=2, channels=4, resolution=8)
    with pytest.raises(ValueError, match="duplicate"):
        pack([torch.tensor([[1, 1, 1], [1, 1, 1]])], None, patch_size=2, channels=4, resolution=8)


def test_fresh_model_is_zero_velocity():
    model = SparseDiT(CFG).eval()
    batch = model.pack([_voxels(0, 20)], [torch.randn(20, 4)])
    v = model(batch.x, torch.tensor([0.3]), pos=batch.pos, child=batch.child)
    assert torch.count_nonzero(v) == 0


def test_voxel_order_equivariance():
    """Shuffling an object's voxels (and so its tokens) shuffles the predicted velocities the same way."""
    model = _model()
    coords, feats = _voxels(3, 40), torch.randn(40, 4)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    a = model.pack([coords], [feats])
    b = model.pack([coords[perm]], [feats[perm]])
    va = unpack(model(a.x, 0.4, pos=a.pos, child=a.child), a)[0]
    vb = unpack(model(b.x, 0.4, pos=b.pos, child=b.child), b)[0]
    torch.testing.assert_close(vb, va[perm], rtol=1e-5, atol=1e-5)
    # and a token-level shuffle (not sorted by cell) gives the same per-voxel output
    n = a.pos.shape[1]
    tp = torch.randperm(n, generator=torch.Generator().manual_seed(2))
    vt = model(a.x[:, tp], 0.4, pos=a.pos[:, tp], child=a.child[:, tp])
    torch.testing.assert_close(vt, model(a.x, 0.4, pos=a.pos, child=a.child)[:, tp], rtol=1e-5, atol=1e-5)


def test_objects_do_not_attend_to_each_other_or_padding():
    """An object's output is the same alone or batched with any other object (no cross-object attention,
    padding ignored), and absent children get exactly zero velocity."""
    model = _model()
    c0, f0 = _voxels(4, 12), torch.randn(12, 4)
    alone = model.pack([c0], [f0])
    v_alone = unpack(model(alone.x, 0.7, pos=alone.pos, child=alone.child), alone)[0]
    for other in (_voxels(5, 60), _voxels(6, 3)):
        both = model.pack([c0, other], [f0, torch.randn(len(other), 4)])
        v = model(both.x, torch.tensor([0.7, 0.2]), pos=both.pos, child=both.child)
        torch.testing.assert_close(unpack(v, both)[0], v_alone, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(v[~both.child]) == 0


def test_class_and_image_conditions_change_the_output():
    model = _model(cond="class", classes=("a", "b"))
    batch = model.pack([_voxels(7, 10)] * 2)
    v = model(batch.x, 0.5, torch.tensor([0, 1]), pos=batch.pos, child=batch.child)
    assert not torch.allclose(v[0], v[1])
    img = _model(cond="image", cond_dim=16)
    tokens = torch.randn(2, 5, 16)
    v = img(batch.x, 0.5, tokens, pos=batch.pos, child=batch.child)
    assert not torch.allclose(v[0], v[1])


def test_masked_flow_loss_ignores_padding_and_trains():
    """The flow loss counts real voxels only (padding values do not change it), and a few steps of
    training lower it on a fixed batch."""
    torch.manual_seed(0)
    model = SparseDiT(CFG)
    batch = model.pack([_voxels(8, 25), _voxels(9, 7)], [torch.randn(25, 4) + 2.0, torch.randn(7, 4) - 2.0])
    mask = batch.voxel_mask()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fn = velocity_fn(model, batch)
    base, _ = flow_matching_loss(fn, batch.x, config=FlowConfig(), mask=mask, generator=g())
    junk = batch.x.masked_fill(~mask, 7.0)
    again, _ = flow_matching_loss(fn, junk, config=FlowConfig(), mask=mask, generator=g())
    torch.testing.assert_close(base, again)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t = torch.full((2,), 0.5)
    noise = torch.randn(batch.x.shape, generator=g())
    first = None
    for _ in range(60):
        loss, _ = flow_matching_loss(fn, batch.x, config=FlowConfig(), mask=mask, noise=noise, t=t)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sampling_with_guidance_keeps_absent_children_zero():
    model = _model(cond="class", classes=("a", "b"))
    batch = model.pack([_voxels(10, 9), _voxels(11, 30)])
    noise = torch.randn(batch.x.shape) * batch.voxel_mask()
    x = sample(velocity_fn(model, batch), noise, steps=3, cond=torch.tensor([0, 1]),
               null_cond=model.null_condition(2), cfg_scale=2.0)
    assert torch.isfinite(x).all() and torch.count_nonzero(x[~batch.child]) == 0


def _pipeline():
    from shapeflow.models.dit import GridDiT, GridDiTConfig
    from shapeflow.models.sparse_vae import SparseSDFVAE, SparseSDFVAEConfig

    torch.manual_seed(0)
    classes = ("a", "b")
    structure = GridDiT(GridDiTConfig(in_channels=1, resolution=8, patch_size=2, width=32, depth=1, heads=2,
                                      cond="class", classes=classes))
    dit = _model(cond="class", classes=classes)
    vae = SparseSDFVAE(SparseSDFVAEConfig(resolution=64, channels=(4, 8, 8, 16), blocks=(0, 1, 1, 1),
                                          latent_channels=4))
    return structure, dit, vae


def test_sparse_generation_is_per_sample_deterministic_and_records_empty_structures():
    from shapeflow.generate import check_sparse_pipeline, generate, largest_piece

    structure, dit, vae = _pipeline()
    run = dict(dit_kind="sparse_dit", vae_kind="sparse_vae", structure=structure, steps=2, decode=False)
    both = generate(dit, vae, num=2, cond=torch.tensor([0, 1]), seed=5, **run)
    one = generate(dit, vae, num=1, cond=torch.tensor([1]), seed=6, **run)
    (c2, f2), (c1, f1) = both.latents[1], one.latents[0]
    assert torch.equal(c2, c1) and len(c1) > 0
    torch.testing.assert_close(f2, f1, rtol=1e-4, atol=1e-4)  # sample 1 of seed 5 = sample 0 of seed 6
    # "largest" keeps one 26-connected piece of the sampled structure
    assert len(largest_piece(c1, 8)) == len(c1)
    two = torch.tensor([[0, 0, 0], [0, 0, 1], [5, 5, 5]])
    assert torch.equal(largest_piece(two, 8), two[:2])
    # a structure stage that yields no voxel: a recorded empty sample, not a crash
    with torch.no_grad():
        structure.latent_mean.fill_(-100.0)
    out = generate(dit, vae, num=2, cond=torch.tensor([0, 1]), **run)
    assert out.meshes == [None, None] and out.latents == [None, None]
    assert set(out.empty) == {0, 1} and "no active voxels" in out.empty[0]
    # pipelines that do not fit together
    with pytest.raises(ValueError, match="stage-1 structure model"):
        check_sparse_pipeline(dit, None, vae, dit_kind="sparse_dit", vae_kind="sparse_vae")
    with pytest.raises(ValueError, match="8-channel|decodes"):
        check_sparse_pipeline(_model(in_channels=8, cond="class", classes=("a", "b")), structure, vae,
                              dit_kind="sparse_dit", vae_kind="sparse_vae")
    with pytest.raises(ValueError, match="different conditions"):
        check_sparse_pipeline(_model(), structure, vae, dit_kind="sparse_dit", vae_kind="sparse_vae")
