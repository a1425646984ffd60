"""Marching cubes: a scalar field on THE node grid -> a triangle mesh in world coordinates.

Design choices
--------------
* Library-backed: :func:`skimage.measure.marching_cubes` with ``method="lewiner"`` (topologically
  consistent cases, so the output is a closed 2-manifold wherever the surface does not leave the grid).
* Grid convention: the field is sampled on the node grid of :mod:`shapeflow.geometry.grid`
  (``field.shape == (res + 1,) * 3``, ``field[i, j, k]`` at ``-bound + (i, j, k) * spacing``,
  spacing ``2 * bound / res``). Marching-cubes vertices come back as fractional node indices and are
  mapped to world coordinates **only** through :func:`shapeflow.geometry.grid.index_to_world`
  (no ``/ grid_size`` style scaling that silently assumes ``res`` instead of ``res + 1`` samples).
* Sign: the field is **negative inside** (:mod:`shapeflow.geometry.frame`); the iso-surface is
  ``field == level``. Faces are wound so normals point outward (positive signed volume), pinned by tests.
  Occupancy/probability fields go through :func:`occupancy_to_mesh`, which flips them to this convention.
* Closed output: the field is padded with one layer of "outside" nodes (``level + spacing``) before
  extraction, so a surface that reaches the grid border is capped instead of left open. The cap lies
  at most one cell outside ``[-bound, bound]``; for fields that are already outside at the border
  (every well-behaved decoder output) padding changes nothing.
* NaN entries (hierarchical / coarse-to-fine decoders leave unevaluated nodes as NaN) are treated as
  "far": each NaN node takes the sign of its nearest evaluated node (Euclidean distance in index space,
  :func:`scipy.ndimage.distance_transform_edt`) with magnitude ``max |field - level|`` over evaluated
  nodes. A NaN node therefore never creates a crossing with its evaluated neighbours; unevaluated
  regions are assumed to lie away from the surface, which is what such decoders guarantee. ``+inf`` /
  ``-inf`` are clipped to the same magnitude with their sign.
* Nodes exactly at ``level`` are nudged to the outside by a tiny relative amount, so no vertex is
  created exactly on a node (which would produce unwelded coincident vertices).
* Precision and memory: the field is processed in float32 (scikit-image's Lewiner code is float32),
  so vertices carry float32 rounding (~1e-7 relative to ``bound``) before they are returned as
  float64. Peak extra memory is about two float32 copies of the field; NaN filling adds a temporary
  int32 index array of 12 bytes per node (200 MB at 256^3).
* An optional connected-component filter (``largest_component``, ``min_component_faces``) removes
  floaters, with connectivity through shared vertices (:func:`scipy.sparse.csgraph.connected_components`).

Pure numpy/scipy/scikit-image; no torch.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import measure

from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND

log = logging.getLogger(__name__)


class EmptySurfaceError(ValueError):
    """A field has no surface to extract (all inside, all outside, or every component filtered out).

    A legitimate outcome for a decoded shape (an untrained or failed generator): callers that mesh many
    shapes count it per shape; every other ``ValueError`` of this module is a caller's error.
    """


def marching_cubes(
    field: np.ndarray,
    level: float = 0.0,
    bound: float = BOUND,
    *,
    close_boundary: bool = True,
    largest_component: bool = False,
    min_component_faces: int = 0,
    smooth: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Extract the ``field == level`` iso-surface of a node-grid field (negative inside).

    Parameters
    ----------
    field : (res + 1, res + 1, res + 1) float
      Samples on the node grid over ``[-bound, bound]^3``, indexed ``[i, j, k] = [x, y, z]``;
      values below ``level`` are inside. NaN marks unevaluated nodes (see module docstring).
    level : float
      Iso-value (0 for an SDF).
    bound : float
      Half side of the grid cube.
    close_boundary : bool
      Cap the surface where the inside touches the grid border (the cap lies within one cell outside
      ``bound``). If False, such meshes are open there.
    largest_component : bool
      Keep only the connected component with the most faces.
    min_component_faces : int
      Drop connected components with fewer faces (applied before ``largest_component``).
    smooth : float
      Standard deviation, in world units, of a Gaussian filter applied to the field first (0: none;
      ``scipy.ndimage.gaussian_filter``, cut at 2 standard deviations). It removes the small bumps of a
      learned field (a briefly trained VAE decodes flat walls lumpy) and rounds edges and parts thinner
      than a few ``smooth``.

    Returns
    -------
    vertices : (n, 3) float64
      World coordinates.
    faces : (f, 3) int64
      Triangles wound counter-clockwise seen from outside (outward normals).

    Raises
    ------
    ValueError
      If the field is not a cube of at least 2 nodes per axis, has no finite value, or has no
      crossing of ``level`` (entirely inside or entirely outside), or if the component filter
      removes everything.
    """
    f = np.asarray(field)
    if f.ndim != 3 or len(set(f.shape)) != 1 or f.shape[0] < 2:
        raise ValueError(
            f"marching_cubes expects a cubic node-grid field of shape (res + 1,) * 3, got {f.shape}"
        )
    res = f.shape[0] - 1
    h = grid.spacing(res, bound)
    # float32 like scikit-image's Lewiner implementation (it would convert anyway); one working copy.
    f = np.array(f, dtype=np.float32)
    f -= np.float32(level)  # the level is now 0
    f = _fill_non_finite(f)
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0 (a length in world units), got {smooth}")
    if smooth > 0:
        f = ndimage.gaussian_filter(f, smooth / h, truncate=2.0)
    lo, hi = float(f.min()), float(f.max())
    if not lo < 0.0 < hi:
        where = "inside" if hi <= 0.0 else "outside"
        raise EmptySurfaceError(
            f"field has no crossing of level {level:g} (min {lo + level:.4g}, max {hi + level:.4g}): "
            f"everything is {where}, no surface to extract"
        )
    # Nudge nodes exactly on the level to the outside so no vertex sits exactly on a node.
    f[f == 0.0] = np.finfo(np.float32).tiny  # smallest positive normal float32: "just outside"
    pad = 1 if close_boundary else 0
    if pad:
        f = np.pad(f, 1, mode="constant", constant_values=h)  # one layer of "outside" nodes
    # "descent" is the winding that gives outward normals for a negative-inside field on an
    # ij-indexed grid (positive signed volume); tests pin it.
    verts, faces, _, _ = measure.marching_cubes(
        f, level=0.0, method="lewiner", gradient_direction="descent", allow_degenerate=False
    )
    vertices = grid.index_to_world(verts.astype(np.float64) - pad, res, bound)  # (n, 3)
    faces = faces.astype(np.int64)
    if min_component_faces > 0 or largest_component:
        vertices, faces = filter_components(
            vertices, faces, min_faces=min_component_faces, keep_largest=largest_component
        )
    return vertices, faces


def occupancy_to_mesh(
    probabilities: np.ndarray,
    threshold: float = 0.5,
    bound: float = BOUND,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Mesh the ``probabilities == threshold`` surface of an occupancy field (high = inside).

    The field is converted to the negative-inside convention as ``threshold - probabilities`` and
    extracted at level 0 (equivalent to level ``threshold`` on the probabilities). Logits work too
    with ``threshold=0``.

    Parameters
    ----------
    probabilities : (res + 1,) * 3 float
      Occupancy probabilities (or logits) on the node grid; NaN = unevaluated.
    threshold : float
    bound : float
    **kwargs
      Passed to :func:`marching_cubes` (``close_boundary``, ``largest_component``, ...).

    Returns
    -------
    vertices : (n, 3) float64, faces : (f, 3) int64
    """
    p = np.asarray(probabilities, dtype=np.float64)
    return marching_cubes(threshold - p, level=0.0, bound=bound, **kwargs)


def voxels_to_mesh(
    occupancy: np.ndarray,
    bound: float = BOUND,
    threshold: float = 0.5,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """Mesh a cell-grid voxel occupancy (e.g. the 64^3 TRELLIS sparse structure).

    Voxel ``(i, j, k)`` of a ``res^3`` cell grid has its centre at ``-bound + (i + 0.5) * h`` with
    ``h = 2 * bound / res`` (:func:`shapeflow.geometry.grid.cell_centers`). The voxel values are
    padded with one empty voxel on every side and the ``(res + 2)^3`` voxel centres are treated as the
    nodes of a node grid with ``res + 1`` cells over ``[-bound - h/2, bound + h/2]`` (the **half-cell
    shift** of :func:`shapeflow.geometry.grid.padded_cell_bound`). The iso-surface at
    ``threshold`` then passes half-way between the centres of an occupied and an empty voxel, i.e.
    on the shared voxel face, so the mesh encloses the occupied voxels (with marching-cubes bevels at
    edges and corners) and always lies within ``[-bound, bound]^3``.

    Parameters
    ----------
    occupancy : (res, res, res) bool or float
      Occupied voxels (or per-voxel probabilities), indexed ``[i, j, k] = [x, y, z]``.
    bound : float
    threshold : float
      Occupied where ``occupancy > threshold``.
    **kwargs
      Passed to :func:`marching_cubes` (``largest_component``, ``min_component_faces``).

    Returns
    -------
    vertices : (n, 3) float64, faces : (f, 3) int64
    """
    occ = np.asarray(occupancy)
    if occ.ndim != 3 or len(set(occ.shape)) != 1 or occ.shape[0] < 1:
        raise ValueError(f"voxels_to_mesh expects a cubic cell grid of shape (res,) * 3, got {occ.shape}")
    res = occ.shape[0]
    occ = np.pad(occ.astype(np.float64), 1, mode="constant", constant_values=0.0)  # (res + 2,) * 3
    kwargs.setdefault("close_boundary", False)  # the padding already closes it
    return marching_cubes(threshold - occ, level=0.0, bound=grid.padded_cell_bound(res, bound), **kwargs)


def filter_components(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    min_faces: int = 0,
    keep_largest: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Remove small connected components (connectivity through shared vertex indices).

    Returns the kept faces with unreferenced vertices removed (vertex order otherwise preserved).

    Raises
    ------
    ValueError
      If nothing is left.
    """
    faces = np.asarray(faces, dtype=np.int64)
    n = len(vertices)
    if len(faces) == 0:
        raise ValueError("mesh has no faces")
    # Vertex adjacency from the three edges of every face.
    a = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    b = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(adj, directed=False)
    face_label = label[faces[:, 0]]  # (f,)
    counts = np.bincount(face_label)
    keep_label = counts >= max(int(min_faces), 1)
    if keep_largest:
        keep_label = np.zeros_like(keep_label)
        keep_label[np.argmax(counts)] = True
    keep = keep_label[face_label]
    if not keep.any():
        raise EmptySurfaceError(f"component filter (min_faces={min_faces}) removed every face")
    dropped = int(np.count_nonzero(counts[~keep_label] > 0))
    if dropped:
        log.debug("dropped %d connected component(s) (%d faces)", dropped, int((~keep).sum()))
    faces = faces[keep]
    used = np.zeros(n, dtype=bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    return np.asarray(vertices)[used], remap[faces]


def _fill_non_finite(f: np.ndarray) -> np.ndarray:
    """Replace NaN by "far" values with the sign of the nearest finite node; clip +-inf (in place)."""
    finite = np.isfinite(f)
    if finite.all():
        return f
    if not finite.any():
        raise ValueError("field has no finite value (all NaN/inf): nothing was evaluated")
    vals = f[finite]
    far = float(np.abs(vals).max())
    if far == 0.0:
        far = 1.0
    nan = np.isnan(f)
    f[np.isposinf(f)] = far
    f[np.isneginf(f)] = -far
    if nan.any():
        # Index of the nearest evaluated (non-NaN) node for every node.
        idx = ndimage.distance_transform_edt(nan, return_distances=False, return_indices=True)
        nearest = f[tuple(idx)]  # (r, r, r)
        f[nan] = np.where(nearest[nan] < 0.0, -far, far)
    return f
