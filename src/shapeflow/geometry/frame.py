"""THE canonical frame and THE SDF sign. Written once here; everything else imports it.

Canonical frame
---------------
A mesh is centred on the centre of its axis-aligned bounding box and scaled uniformly so that the
box's **longest side spans** ``[-EXTENT, EXTENT]`` with ``EXTENT = 0.95``. Every shape therefore lies in
``[-0.95, 0.95]^3`` and the working volume is ``[-BOUND, BOUND]^3`` with ``BOUND = 1.0``: the 0.05
margin keeps the watertight offset shell, near-surface samples and marching-cubes boundary cells
inside the grid (6 cells at 256^3, 1.6 cells at 64^3).

The map is ``canonical = (source - center) * scale``; its inverse ``source = canonical / scale + center``
is recorded per object (``transform`` in the preprocessing manifest) so results can be put back in
the source's own units.

SDF sign
--------
Signed distance is **negative inside, positive outside** (``SDF_SIGN_INSIDE = -1``). Occupancy is
``sdf < 0``. Peers that use the other sign (Hunyuan3D and TripoSG output positive-inside logits) are
converted at their loaders, never downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOUND = 1.0
"""Half side of the working cube ``[-BOUND, BOUND]^3`` (grids, decoders, uniform samples)."""

EXTENT = 0.95
"""Half of the longest bounding-box side of every normalized shape."""

SDF_SIGN_INSIDE = -1
"""Sign of the signed distance inside a shape."""


@dataclass(frozen=True)
class Transform:
    """Canonical <- source similarity: ``canonical = (source - center) * scale``."""

    center: tuple[float, float, float]
    scale: float

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) source points -> (n, 3) canonical points."""
        return (np.asarray(points, dtype=np.float64) - np.asarray(self.center)) * self.scale

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) canonical points -> (n, 3) source points."""
        return np.asarray(points, dtype=np.float64) / self.scale + np.asarray(self.center)

    def as_dict(self) -> dict:
        return {"center": [float(c) for c in self.center], "scale": float(self.scale)}


def normalize_transform(vertices: np.ndarray, extent: float = EXTENT) -> Transform:
    """The canonical transform of a vertex set (bbox centre to origin, longest side to ``2 * extent``).

    Parameters
    ----------
    vertices : (n, 3) float
      Vertex positions in the source's units; must be finite and not all coincident.

    Raises
    ------
    ValueError
      If there are no vertices, a coordinate is not finite, or the bounding box is a single point.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"expected (n, 3) vertices with n > 0, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or infinite coordinates")
    lo, hi = v.min(axis=0), v.max(axis=0)
    longest = float((hi - lo).max())
    if not longest > 0.0:
        raise ValueError("degenerate geometry: all vertices coincide (zero-size bounding box)")
    center = (lo + hi) / 2.0
    return Transform(center=tuple(float(c) for c in center), scale=2.0 * extent / longest)


def normalize_vertices(vertices: np.ndarray, extent: float = EXTENT) -> tuple[np.ndarray, Transform]:
    """Put vertices in the canonical frame. Returns ``(canonical_vertices (n, 3) float64, transform)``."""
    t = normalize_transform(vertices, extent)
    return t.to_canonical(vertices), t
