"""Sparse SDF VAE: structure through the levels, teacher forcing vs inference, batch isolation, gradients,
overfitting one shape to a mesh, checkpoints and the registry, crops and augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from shapeflow import metrics
from shapeflow.checkpoint import CheckpointError
from shapeflow.config import preset
from shapeflow.data.datasets import collate_sparse
from shapeflow.geometry.sparse_band import band_nodes
from shapeflow.models import load_dit, load_model, load_vae
from shapeflow.sparse import CHILD_OFFSETS, SparseTensor
from shapeflow.models.sparse_vae import (
    SparseSDFVAE,
    SparseSDFVAEConfig,
    band_tensor,
    sparse_vae_loss,
    structure,
    tsdf_of,
)
from shapeflow.train.task_sparse import BandAugmented

#: Every level has a block, attention at the latent level: all code paths, a few thousand parameters.
TINY = dict(resolution=32, channels=(8, 8, 16, 16), blocks=(1, 1, 1, 1), latent_channels=4, attn_blocks=2,
            attn_window=4, attn_heads=2, mlp_ratio=1.0)


def _sphere(res: int, radius: float = 0.6, center=(0.05, -0.03, 0.02)):
    m = trimesh.creation.icosphere(4, radius=radius)
    return band_nodes(m.vertices + np.asarray(center), m.faces, res)


def _box(res: int):
    m = trimesh.creation.box(extents=(1.1, 0.7, 0.9))
    return band_nodes(m.vertices, m.faces, res)


def _batch(*bands) -> dict:
    items = [{"coords": torch.from_numpy(c.astype(np.int32)), "sdf": torch.from_numpy(s), "id": str(i)}
             for i, (c, s) in enumerate(bands)]
    return collate_sparse(items)


def _encode_input(batch: dict, cfg: SparseSDFVAEConfig):
    return band_tensor(batch["coords"], tsdf_of(batch["sdf"], cfg), cfg.resolution, batch["batch_size"])


def _model(**kw) -> SparseSDFVAE:
    torch.manual_seed(0)
    return SparseSDFVAE(SparseSDFVAEConfig(**{**TINY, **kw}))


def test_presets_and_config_errors():
    for name in SparseSDFVAEConfig.PRESETS:
        cfg = preset(SparseSDFVAEConfig, name)
        assert cfg.resolution % cfg.factor == 0
    assert preset(SparseSDFVAEConfig, "tiny").factor == 8 and preset(SparseSDFVAEConfig, "large").factor == 16
    with pytest.raises(ValueError, match="same length"):
        SparseSDFVAEConfig(channels=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="multiple of the downsampling factor 8"):
        SparseSDFVAEConfig(resolution=100)
    with pytest.raises(ValueError, match="divisible"):
        SparseSDFVAEConfig(channels=(8, 8, 8, 10), attn_blocks=1, attn_heads=4)
    assert SparseSDFVAEConfig(resolution=256).truncation == pytest.approx(math.sqrt(3) * 2 / 256)


def test_preset_parameter_counts_on_the_meta_device():
    # the sizes the README quotes; built without allocating (the large preset is hundreds of MB)
    counts = {}
    for name in SparseSDFVAEConfig.PRESETS:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in SparseSDFVAE(preset(SparseSDFVAEConfig, name)).parameters())
    assert counts["tiny"] < 5e6 < counts["base"] < counts["large"]


def test_structure_levels_are_the_parents_of_the_band():
    c, _ = _sphere(32)
    coords = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), torch.from_numpy(c.astype(np.int32))], 1)
    levels = structure(coords, 3)
    for lvl, lv in enumerate(levels):
        expect = np.unique(c.astype(np.int64) >> lvl, axis=0)
        np.testing.assert_array_equal(lv[:, 1:].numpy(), expect)


def test_encode_shapes_and_the_latent_structure():
    vae = _model().eval()
    batch = _batch(_sphere(32), _box(32))
    posterior, latent = vae.encode(_encode_input(batch, vae.config))
    levels = structure(batch["coords"], 3)
    assert torch.equal(latent.coords, levels[-1])
    assert latent.shape == 32 // 8 + 1 and latent.batch_size == 2
    assert posterior.mean.shape == (len(levels[-1]), 4)


def test_batch_elements_never_mix():
    vae = _model().eval()
    a, b = _sphere(32), _box(32)
    with torch.no_grad():
        both = vae(_encode_input(_batch(a, b), vae.config), sample_posterior=False)
        one = vae(_encode_input(_batch(a), vae.config), sample_posterior=False)
        two = vae(_encode_input(_batch(b), vae.config), sample_posterior=False)
    torch.testing.assert_close(both["tsdf"], torch.cat([one["tsdf"], two["tsdf"]]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both["posterior"].mean, torch.cat([one["posterior"].mean, two["posterior"].mean]),
                               rtol=1e-5, atol=1e-5)


def test_teacher_forcing_rebuilds_the_band_and_inference_keeps_the_predicted_children():
    vae = _model().eval()
    batch = _batch(_sphere(32))
    x = _encode_input(batch, vae.config)
    with torch.no_grad():
        out = vae(x, sample_posterior=False)
        levels = structure(batch["coords"], 3)
        # the finest level: every child of the band's level-1 nodes, the band among them with its own tsdf,
        # the others +-1 with the sign of their block
        full = (levels[1][:, None, 1:] * 2 + CHILD_OFFSETS.int()).reshape(-1, 3)
        full = torch.unique(torch.cat([levels[1][:, :1].repeat_interleave(8, 0), full], 1), dim=0)
        full = full[(full[:, 1:] <= 32).all(1)]
        assert out["tsdf"].shape == (len(full),) and int(out["in_band"].sum()) == len(batch["coords"])
        tsdf = tsdf_of(batch["sdf"], vae.config)
        torch.testing.assert_close(out["target"][out["in_band"]], tsdf)
        sdf = {tuple(c): float(v) for c, v in zip(batch["coords"][:, 1:].tolist(), tsdf)}
        for c, t, b in zip(full[:, 1:].tolist(), out["target"].tolist(), out["in_band"].tolist()):
            if not b:  # its block's band nodes share one sign, and it is that sign
                block = [sdf[k] for k in sdf if all(k[a] >> 1 == c[a] >> 1 for a in range(3))]
                assert block and all((v < 0) == (t < 0) for v in block) and abs(t) == 1.0
        # the existence targets are the true children of levels 2 and 1
        for tgt, lvl in zip(out["targets"], (2, 1)):
            assert int(tgt.sum()) == len(levels[lvl])
        # inference: heads that say "all children exist" keep every child inside the grid
        for head in vae.heads:
            torch.nn.init.zeros_(head[1].weight)
            torch.nn.init.constant_(head[1].bias, 10.0)
        posterior, latent = vae.encode(x)
        dec = vae.decode(latent.replace(posterior.mode()))
        expect = latent.coords
        for lvl in (2, 1, 0):  # level 0 takes every child anyway
            kids = (expect[:, None, 1:] * 2 + CHILD_OFFSETS.int()).reshape(-1, 3)  # (8 M, 3)
            expect = torch.cat([expect[:, :1].repeat_interleave(8, 0), kids], 1)
            expect = expect[(expect[:, 1:] <= 32 >> lvl).all(1)]
        assert torch.equal(dec["tsdf"].coords, torch.unique(expect, dim=0))
        # and heads that say "no child" keep none
        for head in vae.heads:
            torch.nn.init.constant_(head[1].bias, -10.0)
        dec = vae.decode(latent.replace(posterior.mode()))
        assert dec["tsdf"].num_voxels == 0


def test_the_finest_level_decoded_in_chunks_equals_it_at_once():
    vae = _model(blocks=(0, 1, 1, 1)).eval()  # no convolution at the finest level (every preset)
    x = _encode_input(_batch(_sphere(32), _box(32)), vae.config)
    with torch.no_grad():
        posterior, latent = vae.encode(x)
        z = latent.replace(posterior.mode())
        whole = vae.decode(z)["tsdf"]  # one chunk holds every level-1 node
        vae.finest_chunk = 7
        parts = vae.decode(z)["tsdf"]
        assert whole.num_voxels > 8 * 7 and torch.equal(parts.coords, whole.coords)  # sorted like the whole
        torch.testing.assert_close(parts.feats, whole.feats)
        for head in vae.heads:  # no level-1 node at all: an empty band, not an error
            torch.nn.init.constant_(head[1].bias, -10.0)
        assert vae.decode(z)["tsdf"].num_voxels == 0


def test_finite_gradients_on_every_parameter():
    vae = _model()
    loss, logs = sparse_vae_loss(vae, _batch(_sphere(32), _box(32)), vae.config)
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert set(logs) == {"tsdf_l1", "beyond", "exist_bce", "exist_acc", "kl", "sign_acc"}


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _batch(_sphere(32))
    grads = []
    for ckpt in (False, True):
        vae = _model()
        vae.grad_checkpointing = ckpt
        loss, _ = sparse_vae_loss(vae, batch, vae.config, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_overfits_one_shape_to_a_closed_mesh_decoded_from_the_predicted_structure():
    vae = _model(attn_blocks=0, kl_weight=1e-6)
    batch = _batch(_sphere(32))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(150):
        loss, logs = sparse_vae_loss(vae, batch, vae.config, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["tsdf_l1"] < 0.08 and logs["exist_acc"] > 0.9 and logs["sign_acc"] > 0.95, logs
    assert logs["beyond"] < 0.02, logs  # the children outside the band learn their side
    vae.eval()
    posterior, latent = vae.encode(_encode_input(batch, vae.config))
    v, f = vae.decode_mesh(latent.replace(posterior.mode()), min_component_ratio=0.0)
    mesh = trimesh.Trimesh(v, f, process=False)
    main = max(mesh.split(only_watertight=False), key=lambda m: len(m.faces))
    assert main.is_watertight and len(main.faces) > 0.8 * len(f)  # closed; floaters are a minority
    sphere = trimesh.creation.icosphere(5, radius=0.6)
    gt = sphere.sample(20000, seed=0) + np.array([0.05, -0.03, 0.02])
    pts, _ = metrics.sample_surface(main.vertices, main.faces, 20000, seed=0)
    assert metrics.f_score(pts, gt, 0.5 / 16)[0] > 0.7  # within half a voxel (h = 1/16)
    assert abs(main.volume - 4 / 3 * np.pi * 0.6**3) < 0.03 * main.volume


def test_save_load_and_the_registry(tmp_path):
    vae = _model().eval()
    vae.save_pretrained(tmp_path / "ckpt")
    again, kind = load_vae(tmp_path / "ckpt")
    assert isinstance(again, SparseSDFVAE) and kind == "sparse_vae" and again.config == vae.config
    x = _encode_input(_batch(_sphere(32)), vae.config)
    with torch.no_grad():
        a, b = vae(x, sample_posterior=False)["tsdf"], again(x, sample_posterior=False)["tsdf"]
    assert torch.equal(a, b)
    assert isinstance(load_model(tmp_path / "ckpt")[0], SparseSDFVAE)
    with pytest.raises(CheckpointError, match="sparse_vae checkpoint, not a DiT"):
        load_dit(tmp_path / "ckpt")


def test_a_grid_of_another_resolution_and_bad_inputs():
    vae = _model().eval()
    c, s = _sphere(64)  # twice the configured resolution: the network is local, R only sets h
    coords = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32), torch.from_numpy(c.astype(np.int32))], 1)
    x = band_tensor(coords, tsdf_of(torch.from_numpy(s), vae.config, 64), 64, 1)
    posterior, latent = vae.encode(x)
    assert latent.shape == 64 // 8 + 1 and vae.grid_resolution(latent) == 64
    with pytest.raises(ValueError, match="multiple of 8 cells"):
        vae.encode(band_tensor(coords, torch.zeros(len(coords)), 68, 1))
    two = torch.cat([latent.coords, latent.coords + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])
    with pytest.raises(ValueError, match="one shape"):
        vae.decode_mesh(SparseTensor(two, torch.zeros(len(two), 4), latent.shape))


def test_crops_are_aligned_cubes_of_the_band_and_flips_keep_the_distances():
    c, s = _sphere(64)
    ds = [{"coords": torch.from_numpy(c.astype(np.int32)), "sdf": torch.from_numpy(s), "id": "a"}]
    aug = BandAugmented(ds, 64, crop=24, flip=False, align=8)
    torch.manual_seed(0)
    item = aug[0]
    assert item["shape"] == 25 and int(item["coords"].max()) <= 24
    # the crop is the band inside an aligned cube: find its origin and compare with the full band
    found = []
    for o in np.stack(np.meshgrid(*[np.arange(0, 41, 8)] * 3, indexing="ij"), -1).reshape(-1, 3):
        box = np.all((c >= o) & (c <= o + 24), axis=1)
        if box.sum() == len(item["coords"]) and np.array_equal(c[box] - o, item["coords"].numpy()):
            found.append(o)
    assert len(found) == 1
    np.testing.assert_array_equal(item["sdf"].numpy(), s[np.all((c >= found[0]) & (c <= found[0] + 24), axis=1)])
    # flips and axis permutations map the band to a band of the mirrored shape: same distances, sorted nodes
    flip = BandAugmented(ds, 64, flip=True)
    torch.manual_seed(1)
    it = flip[0]
    assert sorted(it["sdf"].tolist()) == sorted(s.tolist())
    keys = it["coords"].long() @ torch.tensor([65 * 65, 65, 1])
    assert bool((keys[1:] > keys[:-1]).all())
    batch = collate_sparse([aug[0], aug[0]])
    assert batch["shape"] == 25
    vae = _model().eval()
    loss, _ = sparse_vae_loss(vae, batch, vae.config)  # a crop trains like a whole band
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="multiple of the latent factor"):
        BandAugmented(ds, 64, crop=20, align=8)
