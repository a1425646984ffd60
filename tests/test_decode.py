"""Volume decoding: dense vs hierarchical (coarse-to-fine) on analytic fields and on a tiny VecSet VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from shapeflow.decode import (
    VecSetField,
    decode_field,
    dense_field,
    hierarchical_field,
    latents_to_field,
    latents_to_mesh,
    resolution_chain,
)
from shapeflow.geometry import grid
from shapeflow.geometry.marching_cubes import marching_cubes
from shapeflow.models.vecset_vae import VecSetVAE
from shapeflow.nn.blocks import select_topk_kv


def torus(p: torch.Tensor) -> torch.Tensor:
    """Exact SDF of a torus (R 0.5, r 0.2) around z, negative inside."""
    q = torch.stack([torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2) - 0.5, p[:, 2]], dim=-1)
    return q.norm(dim=-1) - 0.2


def two_spheres(p: torch.Tensor) -> torch.Tensor:
    a = (p - torch.tensor([0.45, 0.0, 0.0])).norm(dim=-1) - 0.35
    b = (p + torch.tensor([0.45, 0.1, 0.0])).norm(dim=-1) - 0.25
    return torch.minimum(a, b)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def topology(v: np.ndarray, f: np.ndarray) -> tuple[int, int]:
    mesh = trimesh.Trimesh(v, f, process=True)
    return mesh.euler_number, len(mesh.split(only_watertight=False))


def test_resolution_chain():
    assert resolution_chain(256) == [64, 128, 256]
    assert resolution_chain(384, 63) == [96, 192, 384]
    assert resolution_chain(128, 32) == [32, 64, 128]
    assert resolution_chain(100, 32) == [50, 100]
    assert resolution_chain(33, 8) == [33]


def test_dense_field_is_on_the_node_grid():
    field, stats = dense_field(lambda p: p[:, 0] + 10 * p[:, 1] + 100 * p[:, 2], 8, chunk_size=100)
    pts = grid.node_points(8).reshape(9, 9, 9, 3)
    np.testing.assert_array_equal(field, pts[..., 0] + 10 * pts[..., 1] + 100 * pts[..., 2])
    assert stats.queries == 9**3 == stats.dense_queries


@pytest.mark.parametrize("fn, euler, parts", [(torus, 0, 1), (two_spheres, 4, 2)])
def test_hierarchical_equals_dense_on_analytic_fields(fn, euler, parts):
    res = 96
    dense, sd = dense_field(fn, res, chunk_size=50_000)
    hier, sh = hierarchical_field(fn, res, min_resolution=24, chunk_size=50_000)
    nan, _ = hierarchical_field(fn, res, min_resolution=24, chunk_size=50_000, fill="nan")
    known = ~np.isnan(nan)
    assert sh.levels == (24, 48, 96)
    # every evaluated node has the dense value (PyTorch kernels are not bitwise batch-invariant: a
    # point can differ in the last ulp depending on the chunk it is evaluated in)
    np.testing.assert_allclose(hier[known], dense[known], rtol=0, atol=1e-6)
    assert np.array_equal(hier < 0, dense < 0)  # unevaluated nodes keep the right side
    assert sd.queries / sh.queries > 4, f"query reduction {sd.queries / sh.queries:.1f}x"
    v_d, f_d = marching_cubes(dense)
    for field in (hier, nan):
        v_h, f_h = marching_cubes(field)
        assert chamfer(v_d, v_h) <= 1e-4
        assert topology(v_h, f_h) == topology(v_d, f_d) == (euler, parts)


def test_band_and_dilation_refine_more():
    _, s0 = hierarchical_field(torus, 64, min_resolution=16, dilation=0, final_dilation=0)
    _, s1 = hierarchical_field(torus, 64, min_resolution=16, dilation=2, final_dilation=1)
    _, s2 = hierarchical_field(torus, 64, min_resolution=16, dilation=2, final_dilation=1, band=0.1)
    assert s0.queries < s1.queries < s2.queries < s1.dense_queries


def sphere_with_spike(p: torch.Tensor) -> torch.Tensor:
    """A sphere (r 0.4) with a thin capsule (r 0.03, thinner than the coarse spacings) sticking out."""
    ball = p.norm(dim=-1) - 0.4
    a, b = torch.tensor([0.3, 0.031, 0.017]), torch.tensor([0.85, 0.031, 0.017])
    t = ((p - a) @ (b - a) / (b - a).dot(b - a)).clamp(0, 1)
    spike = (p - a - t[:, None] * (b - a)).norm(dim=-1) - 0.03
    return torch.minimum(ball, spike)


def test_tracing_follows_a_thin_part_out_of_the_refined_region():
    """Without dilation the coarse levels see only the spike's root; tracing follows it to its tip, so
    the mesh equals the dense one, while the untraced decode cuts it off."""
    dense, sd = dense_field(sphere_with_spike, 64)
    v_d, f_d = marching_cubes(dense)
    kw = dict(min_resolution=16, dilation=0, final_dilation=0)
    traced, st = hierarchical_field(sphere_with_spike, 64, fill="nan", **kw)
    cut, _ = hierarchical_field(sphere_with_spike, 64, trace=False, **kw)
    known = ~np.isnan(traced)
    np.testing.assert_allclose(traced[known], dense[known], rtol=0, atol=1e-6)
    v_t, f_t = marching_cubes(traced)
    assert chamfer(v_d, v_t) <= 1e-4
    assert topology(v_t, f_t) == topology(v_d, f_d) == (2, 1)
    assert sum(st.extra["traced_queries"]) > 0 and st.queries < sd.queries / 4
    v_c, _ = marching_cubes(cut)
    assert v_c[:, 0].max() < v_d[:, 0].max() - 0.1  # the untraced decode loses the spike's tip


def test_decode_field_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        decode_field(torus, 8, strategy="octree")


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "position_bias"])
def tiny_vae(request):
    torch.manual_seed(0)
    model = VecSetVAE.from_preset("tiny", num_tokens=32, latent_channels=8, width=32, heads=2,
                                  encoder_layers=1, decoder_layers=1, position_bias=request.param).eval()
    torch.nn.init.normal_(model.geo_decoder.output_proj.weight, std=0.05)
    return model


def test_hierarchical_equals_dense_through_a_tiny_vae(tiny_vae):
    """A sphere SDF plus the (random) network's output: the network path must give the same values
    whatever chunk a node is evaluated in, and the meshes must agree."""
    with torch.no_grad():
        tokens = tiny_vae.decode(torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(0)))
    net = VecSetField(tiny_vae, tokens)

    def fn(p):
        return p.norm(dim=-1) - 0.6 + 0.05 * net(p)

    dense, sd = dense_field(fn, 64, chunk_size=8192)
    nan, sh = hierarchical_field(fn, 64, min_resolution=16, chunk_size=8192, fill="nan")
    known = ~np.isnan(nan)
    np.testing.assert_allclose(nan[known], dense[known], rtol=0, atol=1e-6)
    v_d, f_d = marching_cubes(dense)
    v_h, f_h = marching_cubes(nan)
    assert chamfer(v_d, v_h) <= 1e-4
    assert topology(v_h, f_h) == topology(v_d, f_d)
    assert sd.queries / sh.queries > 3, f"query reduction {sd.queries / sh.queries:.1f}x"


def test_latents_to_mesh_end_to_end(tiny_vae):
    z = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    # shift the output so the random field has a bounded surface: field = net - c
    model = tiny_vae
    with torch.no_grad():
        field, _ = latents_to_field(model, z, 32, strategy="dense")
        old = model.geo_decoder.output_proj.bias.clone()
        model.geo_decoder.output_proj.bias -= float(np.median(field))
    try:
        v, f, stats = latents_to_mesh(model, z, 32, strategy="hierarchical", min_resolution=16)
    finally:
        with torch.no_grad():
            model.geo_decoder.output_proj.bias.copy_(old)
    assert len(f) > 0 and v.shape[1] == 3 and np.abs(v).max() <= 1.0 + 2.0 / 32
    assert stats.levels == (16, 32) and stats.queries < stats.dense_queries and stats.seconds_mesh > 0
    assert model.training is False


def test_topk_selection_and_region_bucketing(tiny_vae):
    # select_topk_kv keeps the keys with the largest mean q.k (per head)
    q = torch.zeros(1, 1, 4, 2)
    q[..., 0] = 1.0
    k = torch.tensor([[[[0.1, 0.0], [3.0, 0.0], [-1.0, 0.0], [2.0, 5.0]]]])
    v = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 2)
    ks, vs, none = select_topk_kv(q, k, v, 2, stride=1)
    assert sorted(vs[0, 0, :, 0].tolist()) == [1.0, 3.0] and none is None
    # an additive logit bias counts in the score and comes back gathered to the kept keys
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 2] = 10.0
    bias[0, 0, :, 1] = torch.arange(4.0) - 9.0  # key 1 loses its lead; its per-query values must follow it
    ks, vs, kept = select_topk_kv(q, k, v, 2, stride=1, bias=bias)
    order = vs[0, 0, :, 0].long().tolist()
    assert sorted(order) == [2, 3]
    torch.testing.assert_close(kept[0, 0], bias[0, 0][:, order])
    # with topk = all tokens the bucketed path must return the plain values in the original order
    with torch.no_grad():
        tokens = tiny_vae.decode(torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(2)))
    pts = torch.rand(3000, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain = VecSetField(tiny_vae, tokens)(pts)
    bucketed = VecSetField(tiny_vae, tokens, topk=32, regions=3)(pts)
    torch.testing.assert_close(bucketed, plain, rtol=0, atol=1e-6)
    approx = VecSetField(tiny_vae, tokens, topk=16, regions=2, topk_stride=4)(pts)
    assert approx.shape == plain.shape and torch.isfinite(approx).all()
    assert not torch.equal(approx, plain)


class _ShellVAE:
    """Stands in for a shell-occupancy grid VAE: decodes any latent to a hollow cube, one voxel thick."""

    config = type("Config", (), {"input": "occupancy"})()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        logits = torch.full((z.shape[0], 1, 16, 16, 16), -5.0)
        logits[:, :, 4:12, 4:12, 4:12] = 5.0
        logits[:, :, 5:11, 5:11, 5:11] = -5.0  # hollow inside
        return logits


def test_generated_grid_shells_are_filled_like_reconstructions():
    """Generation and evaluation decode latents the same way: a shell-occupancy grid decodes to the solid
    it encloses (one outward surface), not to the shell's two walls."""
    from shapeflow.decode import decode_to_mesh
    from shapeflow.generate import decode_latents

    h = 2.0 / 16  # cell side of the 16^3 grid over [-1, 1]
    z = torch.zeros(2, 8, 4, 4, 4)
    meshes, empty = decode_latents(_ShellVAE(), "grid_vae", z)
    assert len(meshes) == 2 and empty == {}
    for v, f in meshes:
        m = trimesh.Trimesh(v, f, process=False)
        assert m.is_watertight and m.body_count == 1
        assert m.volume == pytest.approx((8 * h) ** 3, rel=0.05)  # walls only: (8^3 - 6^3) h^3, 42 % less
    v, f = decode_to_mesh(_ShellVAE(), "grid_vae", z[:1], fill_shell=False)
    assert trimesh.Trimesh(v, f, process=False).volume == pytest.approx((8 ** 3 - 6 ** 3) * h ** 3, rel=0.08)
    with pytest.raises(ValueError, match="one shape"):
        decode_to_mesh(_ShellVAE(), "grid_vae", z)


class _EmptyVAE(_ShellVAE):
    """Decodes every latent to nothing: empty space everywhere."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full((z.shape[0], 1, 16, 16, 16), -5.0)


def test_an_empty_decode_is_counted_per_sample_and_other_errors_raise():
    """'No surface' is a per-sample outcome with its reason; a caller's error is not swallowed."""
    from shapeflow.generate import decode_latents

    meshes, empty = decode_latents(_EmptyVAE(), "grid_vae", torch.zeros(2, 8, 4, 4, 4))
    assert meshes == [None, None] and sorted(empty) == [0, 1]
    assert all("no surface to extract" in reason for reason in empty.values())
    with pytest.raises(ValueError, match="smooth must be >= 0"):
        decode_latents(_ShellVAE(), "grid_vae", torch.zeros(1, 8, 4, 4, 4), smooth=-1.0)
    with pytest.raises(ValueError, match="input_kind must be"):  # a broken VAE is an error, not "no surface"
        bad = _ShellVAE()
        bad.config = type("Config", (), {"input": "points"})()
        decode_latents(bad, "grid_vae", torch.zeros(1, 8, 4, 4, 4))
