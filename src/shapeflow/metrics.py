"""Reconstruction and generation metrics on point sets and meshes (numpy in, numpy/float out).

Every definition is written out in the docstrings: which distance (Euclidean, squared or not), which
reduction (mean or sum), which set is the reference. Nearest neighbours come from
:class:`scipy.spatial.cKDTree` (exact, float64, multi-threaded with ``workers=-1``); no torch.

Reconstruction (OccNet / ConvONet protocol, ``im2mesh/eval.py``)
---------------------------------------------------------------
* ``accuracy``     = mean over predicted points of the distance to the nearest ground-truth point.
* ``completeness`` = mean over ground-truth points of the distance to the nearest predicted point.
* ``chamfer_l1``   = 0.5 * (accuracy + completeness), distances **not squared** ("Chamfer-L1").
* ``chamfer_l2``   = 0.5 * (mean squared NN distance pred->gt + mean squared NN distance gt->pred).
* ``f_score@tau``  = harmonic mean of precision (fraction of predicted points within ``tau`` of the
  ground truth) and recall (fraction of ground-truth points within ``tau`` of the prediction).
  :func:`surface_metrics` sets ``tau`` as a fraction of the ground truth's longest bounding-box side
  (1% ~ OccNet's tau = 0.01 in the unit cube; 3DShape2VecSet's tau = 0.02 in [-1, 1]).
* ``normal_consistency`` = 0.5 * (mean |cos| over pred->gt NN pairs + mean |cos| over gt->pred pairs).
* volume IoU = |A and B| / |A or B| of occupancy labels at the same query points.
* ``mesh_cleanliness``: connected components (through shared vertices), the components below 1 % of the
  surface area, and watertightness (every edge shared by exactly two faces); a mesh is *clean* when it
  is one watertight component.
Note: 3DShape2VecSet reports the *sum* accuracy + completeness (2x ``chamfer_l1``); PyTorch3D's
``chamfer_distance`` and the CUDA kernels used by PointFlow/LION return *squared* distances.

Generation (PointFlow / LION protocol, ``metrics/evaluation_metrics.py``)
------------------------------------------------------------------------
Between two clouds X, Y of the same size the distance is
``CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |x - y|^2`` (squared distances, the two directions
**summed**, = ``2 * chamfer_distance(X, Y, squared=True)``). With ``S`` the generated set and ``R`` the
reference set:
* ``MMD``  = mean over references r of min over samples s of CD(r, s) (lower is better).
* ``COV``  = |{argmin_r CD(s, r) : s in S}| / |R|, the fraction of references that are the nearest
  reference of at least one sample (higher is better).
* ``1-NNA`` = leave-one-out 1-nearest-neighbour accuracy on S u R labelled by origin (ideal 0.5;
  1.0 = the sets are perfectly separable).
All three are returned as fractions (multiply by 100 for %, by 1e3 for LION's "MMD-CD x 1e3").
The clouds must be normalised consistently beforehand (e.g. all in the canonical frame); PointFlow
uses 2048 points per cloud.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pysdf
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from shapeflow.geometry.frame import BOUND


def _points(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty (n, 3) point set, got shape {a.shape}")
    return a


def nearest_neighbors(query: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query point to its nearest reference point (exact, KD-tree).

    Returns
    -------
    distance : (n,) float64
      Not squared.
    index : (n,) int64
      Index into ``reference``.
    """
    q, r = _points(query, "query"), _points(reference, "reference")
    d, i = cKDTree(r).query(q, k=1, workers=-1)
    return d, i.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Reconstruction
# ----------------------------------------------------------------------------------------------


def chamfer_distance(a: np.ndarray, b: np.ndarray, *, squared: bool = False) -> float:
    """Symmetric Chamfer distance, the OccNet convention (averaged over both directions).

    ``0.5 * (mean_{x in a} min_{y in b} d(x, y) + mean_{y in b} min_{x in a} d(x, y))`` with
    ``d = |x - y|`` ("Chamfer-L1", default) or ``d = |x - y|^2`` (``squared=True``, "Chamfer-L2").

    Parameters
    ----------
    a : (n, 3) float
    b : (m, 3) float
    """
    da, _ = nearest_neighbors(a, b)
    db, _ = nearest_neighbors(b, a)
    if squared:
        da, db = da**2, db**2
    return float(0.5 * (da.mean() + db.mean()))


def f_score(pred: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """F-score at a distance threshold (Tatarchenko et al. 2019; OccNet eval).

    ``precision`` = fraction of ``pred`` points with a ``gt`` point within distance ``<= threshold``;
    ``recall`` = fraction of ``gt`` points with a ``pred`` point within ``<= threshold``;
    ``f = 2 p r / (p + r)`` (0 when both are 0).

    Returns
    -------
    f, precision, recall : float
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    dp, _ = nearest_neighbors(pred, gt)
    dg, _ = nearest_neighbors(gt, pred)
    precision = float(np.mean(dp <= threshold))
    recall = float(np.mean(dg <= threshold))
    f = 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)
    return f, precision, recall


def normal_consistency(
    pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray, gt_normals: np.ndarray
) -> float:
    """Normal consistency (OccNet): ``0.5 * (mean |<n_p, n_gt(NN(p))>| + mean |<n_g, n_pred(NN(g))>|)``.

    Nearest neighbours are by position; normals are normalised here; the absolute value makes the
    metric blind to orientation (1 = all NN pairs parallel or anti-parallel).

    Parameters
    ----------
    pred_points, pred_normals : (n, 3) float
    gt_points, gt_normals : (m, 3) float
    """
    pp, gp = _points(pred_points, "pred_points"), _points(gt_points, "gt_points")
    pn, gn = _unit(_points(pred_normals, "pred_normals")), _unit(_points(gt_normals, "gt_normals"))
    if len(pn) != len(pp) or len(gn) != len(gp):
        raise ValueError("points and normals must have the same length")
    _, i_pg = nearest_neighbors(pp, gp)
    _, i_gp = nearest_neighbors(gp, pp)
    acc = np.abs(np.einsum("ij,ij->i", pn, gn[i_pg])).mean()
    comp = np.abs(np.einsum("ij,ij->i", gn, pn[i_gp])).mean()
    return float(0.5 * (acc + comp))


def volume_iou(occ_a: np.ndarray, occ_b: np.ndarray) -> float:
    """IoU ``|a & b| / |a | b|`` of boolean occupancy labels at the same query points.

    Both empty gives 1.0 (identical sets).
    """
    a, b = np.asarray(occ_a, dtype=bool), np.asarray(occ_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"occupancies must have the same shape, got {a.shape} and {b.shape}")
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(a & b) / union)


def mesh_cleanliness(vertices: np.ndarray, faces: np.ndarray, *, min_area_ratio: float = 0.01) -> dict:
    """Is a mesh one closed piece?

    Components are connected through shared vertex indices (weld duplicate vertices first if the mesh
    has them, as marching cubes output does not). Returns ``{"components", "small_components" (below
    ``min_area_ratio`` of the total area), "watertight" (every undirected edge in exactly two faces),
    "clean" (watertight and one component)}``. An empty mesh is not clean and has 0 components.
    """
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    v = np.asarray(vertices, dtype=np.float64)
    if len(f) == 0:
        return {"components": 0, "small_components": 0, "watertight": False, "clean": False}
    a = np.concatenate([f[:, 0], f[:, 1], f[:, 2]])
    b = np.concatenate([f[:, 1], f[:, 2], f[:, 0]])
    n = len(v)
    _, label = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)), directed=False)
    face_label = label[f[:, 0]]
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    per = np.bincount(face_label, weights=area)
    used = np.unique(face_label)
    per = per[used]
    small = int(np.count_nonzero(per < min_area_ratio * max(per.sum(), 1e-300)))
    edges = np.sort(np.stack([a, b], axis=1), axis=1)
    _, counts = np.unique(edges[:, 0] * n + edges[:, 1], return_counts=True)
    watertight = bool(np.all(counts == 2))
    return {"components": int(len(used)), "small_components": small, "watertight": watertight,
            "clean": watertight and len(used) == 1}


def mesh_contains(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Inside test of points against a closed mesh (``pysdf.SDF(...).contains``, robust mode).

    Meaningful for watertight meshes only. Returns ``(n,) bool``.
    """
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    f = np.ascontiguousarray(faces, dtype=np.uint32)
    return np.asarray(pysdf.SDF(v, f).contains(np.ascontiguousarray(points, dtype=np.float32)), dtype=bool)


def mesh_volume_iou(
    mesh_a: tuple[np.ndarray, np.ndarray],
    mesh_b: tuple[np.ndarray, np.ndarray],
    n_points: int = 100_000,
    bound: float = BOUND,
    *,
    seed: int = 0,
    points: np.ndarray | None = None,
) -> float:
    """Volume IoU of two closed meshes by containment at points uniform in ``[-bound, bound]^3``.

    Parameters
    ----------
    mesh_a, mesh_b : (vertices (n, 3), faces (f, 3))
      Watertight meshes (containment is undefined otherwise).
    n_points : int
      Uniform query points (ignored when ``points`` is given).
    points : (q, 3) float, optional
      Your own query points, e.g. uniform plus near-surface as in OccNet.
    """
    if points is None:
        rng = np.random.default_rng(seed)
        points = rng.uniform(-bound, bound, size=(int(n_points), 3))
    occ_a = mesh_contains(*mesh_a, points)
    occ_b = mesh_contains(*mesh_b, points)
    return volume_iou(occ_a, occ_b)


def sample_surface(
    vertices: np.ndarray, faces: np.ndarray, n_points: int, seed: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted uniform surface samples with their face normals (:func:`trimesh.sample.sample_surface`).

    Returns
    -------
    points : (n_points, 3) float64
    normals : (n_points, 3) float64
      Unit normals of the faces the points lie on (orientation as wound).
    """
    v, f = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    mesh = trimesh.Trimesh(v, f, process=False)
    if len(mesh.faces) == 0 or not mesh.area > 0:
        raise ValueError("cannot sample the surface of a mesh with zero area")
    pts, face_idx = trimesh.sample.sample_surface(mesh, int(n_points), seed=seed)
    return np.asarray(pts, dtype=np.float64), np.asarray(mesh.face_normals[face_idx], dtype=np.float64)


def surface_metrics(
    mesh_pred: tuple[np.ndarray, np.ndarray],
    mesh_gt: tuple[np.ndarray, np.ndarray],
    n_points: int = 100_000,
    fscore_thresholds: Sequence[float] = (0.01, 0.02),
    *,
    seed: int = 0,
) -> dict:
    """Chamfer, F-score and normal consistency between two meshes from ``n_points`` surface samples each.

    Parameters
    ----------
    mesh_pred, mesh_gt : (vertices (n, 3), faces (f, 3))
    n_points : int
      Area-weighted samples per surface (OccNet uses 100k).
    fscore_thresholds : sequence of float
      Thresholds as **fractions of the ground truth's longest bounding-box side** (0.01 = "F@1%").
    seed : int
      Sampling seed (the two meshes use independent streams derived from it).

    Returns
    -------
    dict
      ``chamfer_l1``, ``chamfer_l2``, ``accuracy``, ``completeness`` (in the meshes' units),
      ``normal_consistency``, and per threshold ``f_score@1%``, ``precision@1%``, ``recall@1%``
      (name from the fraction), plus ``scale`` (the longest gt bbox side) and ``n_points``.
    """
    ss = np.random.SeedSequence(seed).spawn(2)
    pp, pn = sample_surface(*mesh_pred, n_points, seed=np.random.default_rng(ss[0]))
    gp, gn = sample_surface(*mesh_gt, n_points, seed=np.random.default_rng(ss[1]))
    gv = np.asarray(mesh_gt[0], dtype=np.float64)
    scale = float((gv.max(axis=0) - gv.min(axis=0)).max())
    d_pg, i_pg = nearest_neighbors(pp, gp)  # accuracy direction
    d_gp, i_gp = nearest_neighbors(gp, pp)  # completeness direction
    out = {
        "accuracy": float(d_pg.mean()),
        "completeness": float(d_gp.mean()),
        "chamfer_l1": float(0.5 * (d_pg.mean() + d_gp.mean())),
        "chamfer_l2": float(0.5 * ((d_pg**2).mean() + (d_gp**2).mean())),
        "normal_consistency": float(0.5 * (
            np.abs(np.einsum("ij,ij->i", pn, gn[i_pg])).mean()
            + np.abs(np.einsum("ij,ij->i", gn, pn[i_gp])).mean()
        )),
    }
    for frac in fscore_thresholds:
        tau = float(frac) * scale
        p = float(np.mean(d_pg <= tau))
        r = float(np.mean(d_gp <= tau))
        key = f"{100.0 * float(frac):g}%"
        out[f"f_score@{key}"] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
        out[f"precision@{key}"] = p
        out[f"recall@{key}"] = r
    out["scale"] = scale
    out["n_points"] = int(n_points)
    return out


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _cloud_set(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a (num_clouds, num_points, 3) array, got shape {a.shape}")
    return a


def pairwise_chamfer(a: np.ndarray, b: np.ndarray | None = None, *, workers: int = -1) -> np.ndarray:
    """Chamfer distance matrix between two sets of point clouds (PointFlow definition).

    ``M[i, j] = mean_{x in a_i} min_{y in b_j} |x - y|^2 + mean_{y in b_j} min_{x in a_i} |x - y|^2``
    (squared Euclidean, directions summed; ``= 2 * chamfer_distance(a_i, b_j, squared=True)``).

    One KD-tree per cloud; each tree is queried once with all points of the other set, so the cost
    is ``(n_a + n_b)`` batched queries of ``n_b * p`` / ``n_a * p`` points (no Python loop over pairs).
    With ``b=None`` the matrix of ``a`` against itself is computed with each tree built once.

    Parameters
    ----------
    a : (n_a, p, 3) float
    b : (n_b, q, 3) float, optional
    workers : threads of the KD-tree queries (scipy's ``workers``; -1: every core, whatever
      ``OMP_NUM_THREADS`` says, so cap it when the machine is shared with a training run).

    Returns
    -------
    M : (n_a, n_b) float64
    """
    a = _cloud_set(a, "a")
    same = b is None
    b = a if same else _cloud_set(b, "b")
    d_ab = _directed_mean_sq(a, b, workers)  # (n_a, n_b): a_i -> b_j
    d_ba = d_ab.T if same else _directed_mean_sq(b, a, workers).T  # (n_a, n_b): b_j -> a_i
    return d_ab + d_ba


def _directed_mean_sq(a: np.ndarray, b: np.ndarray, workers: int = -1) -> np.ndarray:
    """``D[i, j] = mean_{x in a_i} min_{y in b_j} |x - y|^2`` for all pairs, one KD-tree per ``b_j``."""
    na, p, _ = a.shape
    flat = a.reshape(-1, 3)  # (na * p, 3)
    # Query in spatially sorted order (faster: neighbouring queries walk the same tree nodes).
    lo = flat.min(axis=0)
    cell = np.floor((flat - lo) / max(float(np.ptp(flat, axis=0).max()), 1e-12) * 31.999).astype(np.int64)
    order = np.argsort((cell[:, 0] * 32 + cell[:, 1]) * 32 + cell[:, 2], kind="stable")
    owner = (np.arange(na * p) // p)[order]  # cloud index of each sorted query point
    queries = flat[order]
    out = np.empty((na, len(b)))
    for j in range(len(b)):
        d, _ = cKDTree(b[j]).query(queries, k=1, workers=workers)
        out[:, j] = np.bincount(owner, weights=d * d, minlength=na) / p
    return out


def minimum_matching_distance(dist_sr: np.ndarray) -> float:
    """MMD from a (n_samples, n_refs) distance matrix: mean over references of the min over samples."""
    d = np.asarray(dist_sr, dtype=np.float64)
    return float(d.min(axis=0).mean())


def coverage(dist_sr: np.ndarray) -> float:
    """COV from a (n_samples, n_refs) distance matrix: fraction of references that are the nearest
    reference of at least one sample (ties: the lowest reference index)."""
    d = np.asarray(dist_sr, dtype=np.float64)
    return float(len(np.unique(d.argmin(axis=1))) / d.shape[1])


def one_nna(dist_ss: np.ndarray, dist_rr: np.ndarray, dist_sr: np.ndarray) -> float:
    """1-NNA: leave-one-out 1-nearest-neighbour classification accuracy on samples u references.

    Every cloud is labelled by its set; its nearest *other* cloud in the union (by the given
    distances) predicts its label; the result is the fraction predicted correctly over all
    ``n_s + n_r`` clouds. 0.5 is ideal (indistinguishable sets), 1.0 means perfectly separated.
    Ties go to the lowest index in the order [samples, references].

    Parameters
    ----------
    dist_ss : (n_s, n_s) sample-sample distances
    dist_rr : (n_r, n_r) reference-reference distances
    dist_sr : (n_s, n_r) sample-reference distances

    Raises
    ------
    ValueError
      If the two sets differ in size (the 50% ideal needs equal sizes) or are smaller than 2.
    """
    ss, rr, sr = (np.asarray(x, dtype=np.float64) for x in (dist_ss, dist_rr, dist_sr))
    ns, nr = len(ss), len(rr)
    if ns != nr:
        raise ValueError(f"1-NNA needs equally many samples and references, got {ns} and {nr}")
    if ns < 2 or sr.shape != (ns, nr):
        raise ValueError(f"need at least 2 clouds per set and a ({ns}, {nr}) cross matrix, got {sr.shape}")
    full = np.block([[ss, sr], [sr.T, rr]])  # (ns + nr, ns + nr)
    np.fill_diagonal(full, np.inf)
    label = np.r_[np.zeros(ns, dtype=bool), np.ones(nr, dtype=bool)]
    pred = label[full.argmin(axis=1)]
    return float(np.mean(pred == label))


def generation_metrics(samples: np.ndarray, references: np.ndarray, *, workers: int = -1) -> dict:
    """MMD, COV and 1-NNA with the Chamfer distance of :func:`pairwise_chamfer` (PointFlow protocol).

    Parameters
    ----------
    samples : (n, p, 3) float
      Generated point clouds (PointFlow: p = 2048 surface points per shape).
    references : (n, p, 3) float
      Reference (held-out) clouds, same count and normalisation as ``samples``.
    workers : KD-tree query threads (:func:`pairwise_chamfer`).

    Returns
    -------
    dict
      ``MMD-CD`` (squared-distance units), ``COV-CD`` and ``1-NNA-CD`` (fractions), ``n_samples``,
      ``n_references``, ``n_points``.
    """
    s = _cloud_set(samples, "samples")
    r = _cloud_set(references, "references")
    both = np.concatenate([s, r]) if s.shape[1] == r.shape[1] else None
    if both is not None:
        m = pairwise_chamfer(both, workers=workers)  # one tree per cloud for all three blocks
        ns = len(s)
        m_ss, m_sr, m_rr = m[:ns, :ns], m[:ns, ns:], m[ns:, ns:]
    else:
        m_ss, m_sr, m_rr = (pairwise_chamfer(s, workers=workers), pairwise_chamfer(s, r, workers=workers),
                            pairwise_chamfer(r, workers=workers))
    return {
        "MMD-CD": minimum_matching_distance(m_sr),
        "COV-CD": coverage(m_sr),
        "1-NNA-CD": one_nna(m_ss, m_rr, m_sr),
        "n_samples": int(len(s)),
        "n_references": int(len(r)),
        "n_points": int(s.shape[1]),
    }


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


__all__ = [
    "nearest_neighbors", "chamfer_distance", "f_score", "normal_consistency", "volume_iou",
    "mesh_contains", "mesh_volume_iou", "sample_surface", "surface_metrics", "pairwise_chamfer",
    "minimum_matching_distance", "coverage", "one_nna", "generation_metrics",
]
