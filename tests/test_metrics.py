"""Metrics against brute-force references (plain double loops) and their defining properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from shapeflow import metrics

# ------------------------------------------------------------------------------------------------
# Brute-force references: plain Python loops, no KD-tree, no vectorisation.
# ------------------------------------------------------------------------------------------------


def bf_nn(a, b):
    """Distance from each point of a to its nearest point of b."""
    out = []
    for x in a:
        best = math.inf
        for y in b:
            best = min(best, math.sqrt(sum((xi - yi) ** 2 for xi, yi in zip(x, y))))
        out.append(best)
    return out


def bf_nn_index(a, b):
    out = []
    for x in a:
        best, arg = math.inf, -1
        for j, y in enumerate(b):
            d = math.sqrt(sum((xi - yi) ** 2 for xi, yi in zip(x, y)))
            if d < best:
                best, arg = d, j
        out.append(arg)
    return out


def bf_chamfer(a, b, squared):
    da, db = bf_nn(a, b), bf_nn(b, a)
    if squared:
        da, db = [d * d for d in da], [d * d for d in db]
    return 0.5 * (sum(da) / len(da) + sum(db) / len(db))


def bf_pointflow_cd(x, y):
    dx, dy = bf_nn(x, y), bf_nn(y, x)
    return sum(d * d for d in dx) / len(dx) + sum(d * d for d in dy) / len(dy)


def bf_mmd(d_sr):
    n_s, n_r = len(d_sr), len(d_sr[0])
    return sum(min(d_sr[i][j] for i in range(n_s)) for j in range(n_r)) / n_r


def bf_cov(d_sr):
    n_s, n_r = len(d_sr), len(d_sr[0])
    hit = set()
    for i in range(n_s):
        hit.add(min(range(n_r), key=lambda j: d_sr[i][j]))
    return len(hit) / n_r


def bf_1nna(d_ss, d_rr, d_sr):
    n_s, n_r = len(d_ss), len(d_rr)
    items = [("s", i) for i in range(n_s)] + [("r", j) for j in range(n_r)]

    def dist(u, v):
        (ku, iu), (kv, iv) = u, v
        if ku == "s" and kv == "s":
            return d_ss[iu][iv]
        if ku == "r" and kv == "r":
            return d_rr[iu][iv]
        return d_sr[iu][iv] if ku == "s" else d_sr[iv][iu]

    correct = 0
    for u in items:
        nearest = min((v for v in items if v != u), key=lambda v: dist(u, v))
        correct += nearest[0] == u[0]
    return correct / len(items)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ------------------------------------------------------------------------------------------------


def test_chamfer_matches_brute_force(rng):
    a, b = rng.normal(size=(23, 3)), rng.normal(size=(31, 3)) + 0.3
    assert metrics.chamfer_distance(a, b) == pytest.approx(bf_chamfer(a, b, False), rel=1e-12)
    assert metrics.chamfer_distance(a, b, squared=True) == pytest.approx(bf_chamfer(a, b, True), rel=1e-12)
    d, i = metrics.nearest_neighbors(a, b)
    np.testing.assert_allclose(d, bf_nn(a, b), rtol=1e-12)
    np.testing.assert_array_equal(i, bf_nn_index(a, b))


def test_chamfer_properties(rng):
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(40, 3))
    assert metrics.chamfer_distance(a, a) == 0.0
    assert metrics.chamfer_distance(a, b) == pytest.approx(metrics.chamfer_distance(b, a), rel=1e-12)
    # Shifting one point set by a small t (smaller than every NN gap) gives CD-L1 <= |t|.
    assert metrics.chamfer_distance(a, a + [0.001, 0, 0]) == pytest.approx(0.001, rel=1e-6)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        metrics.chamfer_distance(a[:, :2], b)


def test_f_score_matches_brute_force(rng):
    pred, gt = rng.uniform(size=(40, 3)), rng.uniform(size=(35, 3))
    for tau in (0.05, 0.1, 0.2, 0.4):
        dp, dg = bf_nn(pred, gt), bf_nn(gt, pred)
        p = sum(d <= tau for d in dp) / len(dp)
        r = sum(d <= tau for d in dg) / len(dg)
        f = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        assert metrics.f_score(pred, gt, tau) == pytest.approx((f, p, r), rel=1e-12)


@pytest.mark.parametrize("tau", [1e-9, 1e-3, 0.1, 10.0])
def test_f_score_identical_sets_is_one(rng, tau):
    a = rng.normal(size=(100, 3))
    assert metrics.f_score(a, a.copy(), tau) == (1.0, 1.0, 1.0)


def test_f_score_far_sets_is_zero(rng):
    a = rng.normal(size=(30, 3))
    assert metrics.f_score(a, a + 100, 1.0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="positive"):
        metrics.f_score(a, a, 0.0)


def test_normal_consistency_matches_brute_force(rng):
    pp, gp = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    pn, gn = rng.normal(size=(20, 3)), rng.normal(size=(25, 3))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    upn, ugn = unit(pn), unit(gn)
    i_pg, i_gp = bf_nn_index(pp, gp), bf_nn_index(gp, pp)
    acc = sum(abs(float(upn[k] @ ugn[i_pg[k]])) for k in range(20)) / 20
    comp = sum(abs(float(ugn[k] @ upn[i_gp[k]])) for k in range(25)) / 25
    assert metrics.normal_consistency(pp, pn, gp, gn) == pytest.approx(0.5 * (acc + comp), rel=1e-12)
    # Orientation-blind and 1 for identical geometry.
    assert metrics.normal_consistency(pp, pn, pp, -3 * pn) == pytest.approx(1.0)


def test_volume_iou(rng):
    a, b = rng.random(200) < 0.4, rng.random(200) < 0.6
    inter = sum(1 for x, y in zip(a, b) if x and y)
    union = sum(1 for x, y in zip(a, b) if x or y)
    assert metrics.volume_iou(a, b) == pytest.approx(inter / union)
    assert metrics.volume_iou(a, a) == 1.0
    assert metrics.volume_iou(a, ~a) == 0.0
    assert metrics.volume_iou(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        metrics.volume_iou(a, b[:10])


def test_mesh_volume_iou_of_boxes():
    a = trimesh.creation.box((1.0, 1.0, 1.0))
    b = trimesh.creation.box((1.0, 1.0, 1.0))
    b.apply_translation((0.5, 0.0, 0.0))
    ma, mb = (a.vertices, a.faces), (b.vertices, b.faces)
    assert metrics.mesh_volume_iou(ma, ma, 20_000) == 1.0
    # Overlap 0.5, union 1.5 -> 1/3 (Monte Carlo, ~37k points in the union: std ~0.003).
    assert metrics.mesh_volume_iou(ma, mb, 200_000, seed=1) == pytest.approx(1 / 3, abs=0.015)
    far = trimesh.creation.box((0.2, 0.2, 0.2))
    far.apply_translation((0.8, 0.8, 0.8))
    assert metrics.mesh_volume_iou(ma, (far.vertices, far.faces), 50_000) == 0.0
    # Explicit points: containment agrees with the analytic box test.
    pts = np.random.default_rng(0).uniform(-1, 1, (3000, 3))
    inside = metrics.mesh_contains(*mb, pts)
    np.testing.assert_array_equal(inside, (np.abs(pts - (0.5, 0, 0)) < 0.5).all(axis=1))


def test_surface_metrics_concentric_spheres():
    small = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    big = trimesh.creation.icosphere(subdivisions=4, radius=0.55)
    out = metrics.surface_metrics((big.vertices, big.faces), (small.vertices, small.faces),
                                  n_points=20_000, fscore_thresholds=(0.01, 0.1))
    # Every NN distance is >= the 0.05 radial gap, plus a little lateral offset from sampling.
    assert 0.05 <= out["accuracy"] < 0.055 and 0.05 <= out["completeness"] < 0.055
    assert out["chamfer_l1"] == pytest.approx(0.5 * (out["accuracy"] + out["completeness"]))
    assert 0.0025 <= out["chamfer_l2"] < 0.055**2
    assert out["scale"] == pytest.approx(1.0, abs=0.01)  # longest side of the gt bbox
    assert out["f_score@1%"] == 0.0  # tau = 0.01 < gap
    assert out["f_score@10%"] == 1.0  # tau = 0.1 > gap
    assert out["normal_consistency"] > 0.99
    # The same mesh, sampled twice independently: only sampling noise remains (it needs OccNet's 100k
    # points for F@1% ~ 1: at 20k the mean spacing on this sphere is ~1.3% of its size).
    same = metrics.surface_metrics((small.vertices, small.faces), (small.vertices, small.faces))
    assert same["f_score@1%"] > 0.99 and same["chamfer_l1"] < 0.005
    again = metrics.surface_metrics((small.vertices, small.faces), (small.vertices, small.faces))
    assert again == same  # seeded


# ------------------------------------------------------------------------------------------------
# Generation metrics
# ------------------------------------------------------------------------------------------------


def test_pairwise_chamfer_matches_brute_force(rng):
    a = rng.normal(size=(4, 9, 3))
    b = rng.normal(size=(3, 7, 3)) + 0.2
    m = metrics.pairwise_chamfer(a, b)
    assert m.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            assert m[i, j] == pytest.approx(bf_pointflow_cd(a[i], b[j]), rel=1e-12)
            assert m[i, j] == pytest.approx(2 * metrics.chamfer_distance(a[i], b[j], squared=True), rel=1e-12)
    self_m = metrics.pairwise_chamfer(a)
    np.testing.assert_allclose(self_m, self_m.T)
    np.testing.assert_allclose(np.diag(self_m), 0.0)
    np.testing.assert_allclose(self_m, metrics.pairwise_chamfer(a, a.copy()), rtol=1e-12)


# Toy example, worked by hand. Rows: samples S0..S2, columns: references R0..R2.
D_SR = np.array([[1.0, 4.0, 6.0],
                 [2.0, 3.0, 0.5],
                 [1.5, 5.0, 7.0]])
D_SS = np.array([[0.0, 2.5, 0.8],
                 [2.5, 0.0, 3.0],
                 [0.8, 3.0, 0.0]])
D_RR = np.array([[0.0, 0.7, 4.0],
                 [0.7, 0.0, 2.0],
                 [4.0, 2.0, 0.0]])


def test_toy_mmd_cov_1nna_by_hand():
    # MMD: per reference the closest sample: R0 -> 1.0 (S0), R1 -> 3.0 (S1), R2 -> 0.5 (S1); mean 1.5.
    assert metrics.minimum_matching_distance(D_SR) == pytest.approx(1.5)
    # COV: nearest reference per sample: S0 -> R0, S1 -> R2, S2 -> R0; {R0, R2} covered -> 2/3.
    assert metrics.coverage(D_SR) == pytest.approx(2 / 3)
    # 1-NNA: nearest other cloud: S0 -> S2 (ok), S1 -> R2 (wrong), S2 -> S0 (ok),
    #        R0 -> R1 (ok), R1 -> R0 (ok), R2 -> S1 (wrong): 4 / 6.
    assert metrics.one_nna(D_SS, D_RR, D_SR) == pytest.approx(4 / 6)
    # Same as the brute-force references.
    assert bf_mmd(D_SR.tolist()) == pytest.approx(1.5)
    assert bf_cov(D_SR.tolist()) == pytest.approx(2 / 3)
    assert bf_1nna(D_SS.tolist(), D_RR.tolist(), D_SR.tolist()) == pytest.approx(4 / 6)


def test_generation_metrics_match_brute_force(rng):
    s = rng.normal(size=(5, 8, 3))
    r = rng.normal(size=(5, 8, 3)) * 1.3
    d_sr = [[bf_pointflow_cd(x, y) for y in r] for x in s]
    d_ss = [[bf_pointflow_cd(x, y) for y in s] for x in s]
    d_rr = [[bf_pointflow_cd(x, y) for y in r] for x in r]
    out = metrics.generation_metrics(s, r)
    assert out["MMD-CD"] == pytest.approx(bf_mmd(d_sr), rel=1e-12)
    assert out["COV-CD"] == pytest.approx(bf_cov(d_sr))
    assert out["1-NNA-CD"] == pytest.approx(bf_1nna(d_ss, d_rr, d_sr))
    assert (out["n_samples"], out["n_references"], out["n_points"]) == (5, 5, 8)


def test_one_nna_separated_and_same_distribution(rng):
    base = rng.normal(size=(20, 32, 3))
    far = rng.normal(size=(20, 32, 3)) + [10.0, 0.0, 0.0]
    out = metrics.generation_metrics(base, far)
    assert out["1-NNA-CD"] == 1.0
    assert out["COV-CD"] < 0.5  # every sample is equally far from every reference: few are hit
    # Same distribution, many clouds: 1-NNA near the ideal 0.5 (loose bound).
    s = rng.normal(size=(60, 32, 3))
    r = rng.normal(size=(60, 32, 3))
    same = metrics.generation_metrics(s, r)
    assert 0.3 <= same["1-NNA-CD"] <= 0.7
    assert same["COV-CD"] > 0.4
    # Identical sets: every sample covers its own copy.
    assert metrics.generation_metrics(s, s.copy())["COV-CD"] == 1.0
    assert metrics.generation_metrics(s, s.copy())["MMD-CD"] == 0.0


def test_one_nna_needs_equal_sizes():
    with pytest.raises(ValueError, match="equally many"):
        metrics.one_nna(D_SS[:2, :2], D_RR, D_SR[:2])


def test_reference_shapes_are_put_in_the_canonical_frame(tmp_path, monkeypatch):
    """Generation references are scored in the frame the training shapes are in (bbox centred, longest side
    2 * EXTENT), whatever the frame of the synthetic meshes written to disk."""
    from shapeflow import evaluate
    from shapeflow.evaluate import reference_shapes
    from shapeflow.geometry.frame import EXTENT
    from shapeflow.geometry.io import save_mesh

    box = trimesh.creation.box(extents=(0.4, 0.8, 1.2))
    calls = []

    def fake_generate_dataset(out_dir, per_class, seed=0, *, classes, **kw):  # an off-centre, undersized "lamp"
        calls.append((per_class, seed, list(classes)))
        for c in classes:
            for k in range(per_class):
                save_mesh(tmp_path / "ref" / c / f"{c}_{k:04d}.obj", box.vertices * (1 + k) + (0.1, -0.2, 0.05),
                          box.faces)

    monkeypatch.setattr(evaluate, "generate_dataset", fake_generate_dataset)
    refs = reference_shapes(tmp_path / "ref", ["lamp"], 2, 5)
    assert calls == [(2, 5, ["lamp"])]
    assert len(refs["lamp"]) == 2
    for v, f in refs["lamp"]:
        lo, hi = v.min(axis=0), v.max(axis=0)
        np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-9)
        assert (hi - lo).max() == pytest.approx(2 * EXTENT)
        np.testing.assert_allclose(hi - lo, np.array([0.4, 0.8, 1.2]) * 2 * EXTENT / 1.2)
        assert np.array_equal(f, box.faces)


def test_generation_eval_pooled_row_and_workers():
    """``pooled=False`` drops only the all-class row; the KD-tree thread count changes no number."""
    from shapeflow.evaluate import generation_eval

    def boxes(scales):
        return [(b.vertices, b.faces) for b in (trimesh.creation.box(extents=(s, 1.0, 0.5)) for s in scales)]

    gen = {"a": boxes([0.5, 0.6, 0.7]), "b": boxes([1.5, 1.6, 1.7])}
    ref = {"a": boxes([0.55, 0.65, 0.9]), "b": boxes([1.4, 1.65, 1.8])}
    full = generation_eval(gen, ref, n_points=256)
    per_class = generation_eval(gen, ref, n_points=256, pooled=False, workers=1)
    assert set(full) == {"a", "b", "all"} and set(per_class) == {"a", "b"}
    for c in ("a", "b"):
        assert per_class[c] == full[c]
    assert full["all"]["n_samples"] == 6
    assert full["a"]["clean"] == 1.0 and full["a"]["extra_components"] == 0.0  # closed boxes


def test_generation_eval_reports_the_share_of_clean_meshes():
    from shapeflow.evaluate import generation_eval

    box = trimesh.creation.box(extents=(1.0, 1.0, 0.5))
    two = (np.concatenate([box.vertices, box.vertices + 2.0]), np.concatenate([box.faces, box.faces + 8]))
    gen = {"a": [(box.vertices, box.faces), two, None, (box.vertices, box.faces[2:])]}  # clean, 2 pieces, failed, hole
    ref = {"a": [(box.vertices, box.faces)] * 4}
    t = generation_eval(gen, ref, n_points=64)
    assert t["a"]["clean"] == 0.25 and t["all"]["clean"] == 0.25
    assert t["a"]["extra_components"] == pytest.approx(1 / 3)  # over the three decoded meshes


def test_mesh_cleanliness_counts_pieces_floaters_and_holes():
    big = trimesh.creation.icosphere(subdivisions=3)
    clean = metrics.mesh_cleanliness(big.vertices, big.faces)
    assert clean == {"components": 1, "small_components": 0, "watertight": True, "clean": True}
    # a far floater of tiny area: two components, one below 1 % of the surface
    tiny = trimesh.creation.icosphere(subdivisions=1, radius=0.02)
    v = np.concatenate([big.vertices, tiny.vertices + 3.0])
    f = np.concatenate([big.faces, tiny.faces + len(big.vertices)])
    r = metrics.mesh_cleanliness(v, f)
    assert (r["components"], r["small_components"], r["watertight"], r["clean"]) == (2, 1, True, False)
    # a hole: one face removed leaves three boundary edges
    r = metrics.mesh_cleanliness(big.vertices, big.faces[1:])
    assert (r["components"], r["watertight"], r["clean"]) == (1, False, False)
    assert metrics.mesh_cleanliness(np.zeros((0, 3)), np.zeros((0, 3)))["clean"] is False
