"""THE grid convention. Every field sampled on a regular grid in shapeflow goes through here.

Two kinds of regular grid over the cube ``[-bound, bound]^3`` (``bound`` defaults to
:data:`shapeflow.geometry.frame.BOUND` = 1.0):

* **Node grid** (fields: SDF, occupancy probability, anything fed to marching cubes).
  ``res`` is the number of *cells* per axis; there are ``res + 1`` samples per axis, the first at
  ``-bound`` and the last at ``+bound``. Spacing is ``2 * bound / res``. Sample ``(i, j, k)`` sits at
  ``world = -bound + (i, j, k) * spacing``. Arrays are indexed ``[i, j, k]`` = ``[x, y, z]``
  (``indexing="ij"``), so ``field.shape == (res + 1,) * 3``.

* **Cell grid** (voxels: the TRELLIS sparse-structure occupancy, voxel VAEs).
  ``res`` cells per axis; voxel ``(i, j, k)`` covers ``[-bound + i * spacing, -bound + (i+1) * spacing)``
  on each axis and its centre is ``-bound + (i + 0.5) * spacing``. Arrays have shape ``(res,) * 3``.

* **The half-cell shift** (cell values -> a node-grid field): pad the cell grid with one ring of cells;
  the ``(res + 2)^3`` cell centres of the padded grid are the nodes of a node grid of ``res + 1`` cells
  over ``[-b', b']`` with ``b' = bound + spacing / 2`` (:func:`padded_cell_bound`). Marching cubes of
  such a field puts the surface between the centres of cells, i.e. on the cell faces.

Marching cubes (:mod:`shapeflow.geometry.marching_cubes`) and every decoder use only these helpers,
so a mesh extracted from a field always lands in world coordinates with no off-by-one scale.

Pure numpy; no torch (decoders convert the returned arrays themselves).
"""

from __future__ import annotations

import numpy as np

from shapeflow.geometry.frame import BOUND


def spacing(res: int, bound: float = BOUND) -> float:
    """Distance between neighbouring samples (node grid) or voxel edge length (cell grid)."""
    _check_res(res)
    return 2.0 * bound / res


def node_coords_1d(res: int, bound: float = BOUND) -> np.ndarray:
    """The ``res + 1`` sample positions along one axis of the node grid.

    Returns
    -------
    coords : (res + 1,) float64
    """
    _check_res(res)
    return -bound + np.arange(res + 1, dtype=np.float64) * spacing(res, bound)


def node_points(res: int, bound: float = BOUND, dtype=np.float32) -> np.ndarray:
    """All node-grid sample positions, flattened in C order over ``[i, j, k]``.

    Returns
    -------
    points : ((res + 1) ** 3, 3) float
      ``points.reshape(res + 1, res + 1, res + 1, 3)[i, j, k] == index_to_world([i, j, k])``.
    """
    c = node_coords_1d(res, bound)
    g = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
    return g.reshape(-1, 3).astype(dtype)


def cell_centers(res: int, bound: float = BOUND, dtype=np.float32) -> np.ndarray:
    """All voxel centres of the cell grid, flattened in C order over ``[i, j, k]``.

    Returns
    -------
    points : (res ** 3, 3) float
    """
    _check_res(res)
    h = spacing(res, bound)
    c = -bound + (np.arange(res, dtype=np.float64) + 0.5) * h
    g = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
    return g.reshape(-1, 3).astype(dtype)


def index_to_world(index: np.ndarray, res: int, bound: float = BOUND) -> np.ndarray:
    """Node-grid (possibly fractional) index -> world position.

    Parameters
    ----------
    index : (..., 3) float or int
      Index ``[i, j, k]``; fractional indices are allowed (marching-cubes vertices are).

    Returns
    -------
    world : (..., 3) float64
    """
    return -bound + np.asarray(index, dtype=np.float64) * spacing(res, bound)


def world_to_index(points: np.ndarray, res: int, bound: float = BOUND) -> np.ndarray:
    """World position -> fractional node-grid index (inverse of :func:`index_to_world`).

    Returns
    -------
    index : (..., 3) float64
    """
    return (np.asarray(points, dtype=np.float64) + bound) / spacing(res, bound)


def world_to_cell(points: np.ndarray, res: int, bound: float = BOUND) -> np.ndarray:
    """World position -> integer cell index ``[i, j, k]`` of the voxel containing it, clipped to the grid.

    Returns
    -------
    cell : (..., 3) int64
    """
    idx = np.floor(world_to_index(points, res, bound)).astype(np.int64)
    return np.clip(idx, 0, res - 1)


def padded_cell_bound(res: int, bound: float = BOUND) -> float:
    """The half-cell shift: the bound of the node grid through the cell centres of the ``res^3`` cell grid
    padded by one ring of cells (``res + 1`` node-grid cells over ``[-b, b]``, ``b = bound + spacing / 2``)."""
    return bound + spacing(res, bound) / 2.0


def _check_res(res: int) -> None:
    if int(res) != res or res < 1:
        raise ValueError(f"grid resolution must be a positive integer number of cells, got {res!r}")
