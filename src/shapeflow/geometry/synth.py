"""Procedural shape families with analytic signed distance functions: the embedded default data.

Each category (:data:`CATEGORIES`) is a small constructive-solid-geometry tree of primitives with
random proportions. The data need no download, come with exact ground truth (the analytic SDF) and
with class labels (the category) for conditional generation.

Design choices
--------------
* **Sign is exact, distance is a 1-Lipschitz bound.** Primitives have exact Euclidean SDFs
  (rounded boxes, capped cylinders, capsules, tori, solids of revolution of a 2-D profile polygon);
  they are combined with ``min`` (union) and ``max(a, -b)`` (subtraction) and moved by rigid
  motions and one uniform scale. The result has the exact sign everywhere, the
  exact distance outside unions, and is 1-Lipschitz everywhere (``|f(x) - f(y)| <= |x - y|``), which
  :func:`sdf_grid` relies on to skip blocks far from the surface. Negative inside
  (:mod:`shapeflow.geometry.frame`).
* **Solids of revolution** take a closed profile polygon in the ``(r, a)`` half-plane (``r >= 0``
  distance from the axis, ``a`` along it). The 3-D distance to the solid equals the 2-D distance of
  ``(r, a)`` to the polygon (the nearest point of a rotation-symmetric solid lies in the query's
  meridian half-plane), so the SDF is exact; polygon edges lying on the axis are not surface and are
  left out of the distance. Hollow parts (mug, vase, lamp shade) are profile polygons of the wall.
* **Canonical frame**: every shape is built in "design units" (y up, front towards +z), then
  centred on its bounding box and scaled uniformly so the longest side spans
  ``[-EXTENT, EXTENT]`` (:data:`shapeflow.geometry.frame.EXTENT` = 0.95). Bounds come from the
  primitives (conservative for rotated parts), so the true longest side is at most ``2 * EXTENT``.
* **Determinism**: parameters are drawn from a :class:`numpy.random.Generator` and rounded to 4
  decimals; the geometry is built only from that (JSON-serialisable) parameter dict, so
  :func:`shape_from_params` rebuilds a shape exactly from its saved ``.json``. The dataset writer
  seeds each object independently from ``(seed, crc32(category), index)``, so a file does not depend
  on the worker count, the other classes, or ``--per-class``.
* Minimum feature sizes (legs, walls, panels) are set relative to the longest side so they stay
  above about 0.045 in canonical units (1.5 cells at the default 64^3 mesh resolution); every mesh
  is one closed, connected surface (tested).
* Written meshes are decimated (quadric edge collapse, ``fast_simplification``) by
  :data:`DEFAULT_DECIMATE` = 70% of their faces: marching cubes over-tessellates flat parts, and the
  files get several times smaller while vertices stay within about
  0.4 cell of the zero set. A decimated mesh that is not closed, consistently wound, positively
  oriented and with as many connected parts as the original is discarded for the undecimated one.

numpy/scipy, scikit-image (through :mod:`shapeflow.geometry.marching_cubes`), fast_simplification and
trimesh (decimation and its checks); no torch.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import fast_simplification
import numpy as np
import trimesh
from scipy.interpolate import PchipInterpolator
from tqdm import tqdm

from shapeflow import fileio
from shapeflow.geometry import grid
from shapeflow.geometry.frame import BOUND, EXTENT
from shapeflow.geometry.io import save_mesh
from shapeflow.geometry.marching_cubes import marching_cubes

log = logging.getLogger(__name__)

SYNTH_VERSION = 1
"""Bump when any generator changes (recorded in every ``.json`` and in ``synth.json``)."""

DEFAULT_RESOLUTION = 64
"""Marching-cubes resolution (cells per axis) of the written meshes."""

DEFAULT_DECIMATE = 0.7
"""Fraction of marching-cubes faces the dataset writer removes by quadric decimation (0 = keep all)."""

# --------------------------------------------------------------------------------------------------
# SDF primitives (design units). Every node: sdf(p (n, 3)) -> (n,), bounds() -> (2, 3) [lo, hi].
# --------------------------------------------------------------------------------------------------


class Node:
    """A signed distance function with an axis-aligned bounding box (negative inside)."""

    def sdf(self, p: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def bounds(self) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def _vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(3)


def _axial(p: np.ndarray, center: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(radial distance from the axis line through ``center``, coordinate along the axis)."""
    i, j = [k for k in range(3) if k != axis]
    return np.hypot(p[:, i] - center[i], p[:, j] - center[j]), p[:, axis] - center[axis]


# Primitives work column by column (x, y, z as 1-D arrays): numpy reductions and small matrix
# products along a length-3 axis are several times slower than elementwise ops on columns.


class Box(Node):
    """Axis-aligned box with edges rounded by ``radius`` (exact SDF)."""

    def __init__(self, center, half, radius: float = 0.0):
        self.c, self.h, self.r = _vec(center), _vec(half), float(radius)
        if self.r < 0 or (self.h - self.r).min() < 0:
            raise ValueError("rounding radius must be in [0, min(half)]")

    def sdf(self, p):
        e = self.h - self.r
        qx, qy, qz = (np.abs(p[:, k] - self.c[k]) - e[k] for k in range(3))
        ox, oy, oz = np.maximum(qx, 0.0), np.maximum(qy, 0.0), np.maximum(qz, 0.0)
        outside = np.sqrt(ox * ox + oy * oy + oz * oz)
        inside = np.minimum(np.maximum(qx, np.maximum(qy, qz)), 0.0)
        return outside + inside - self.r

    def bounds(self):
        return np.stack([self.c - self.h, self.c + self.h])


class Cylinder(Node):
    """Capped cylinder along ``axis`` (0, 1, 2), centre ``center`` (exact SDF)."""

    def __init__(self, center, radius: float, half_height: float, axis: int = 1):
        self.c, self.r, self.hh, self.axis = _vec(center), float(radius), float(half_height), int(axis)

    def sdf(self, p):
        r, a = _axial(p, self.c, self.axis)
        dx, dy = r - self.r, np.abs(a) - self.hh
        return np.minimum(np.maximum(dx, dy), 0.0) + np.hypot(np.maximum(dx, 0.0), np.maximum(dy, 0.0))

    def bounds(self):
        h = np.full(3, self.r)
        h[self.axis] = self.hh
        return np.stack([self.c - h, self.c + h])


class Capsule(Node):
    """Segment ``a``-``b`` swept by a ball of ``radius`` (exact SDF); ``a == b`` is a ball."""

    def __init__(self, a, b, radius: float):
        self.a, self.b, self.r = _vec(a), _vec(b), float(radius)

    def sdf(self, p):
        ba = self.b - self.a
        pa = [p[:, k] - self.a[k] for k in range(3)]
        den = float(ba @ ba)
        if den > 0:
            t = np.clip((pa[0] * ba[0] + pa[1] * ba[1] + pa[2] * ba[2]) / den, 0.0, 1.0)
            pa = [pa[k] - t * ba[k] for k in range(3)]
        return np.sqrt(pa[0] * pa[0] + pa[1] * pa[1] + pa[2] * pa[2]) - self.r

    def bounds(self):
        return np.stack([np.minimum(self.a, self.b) - self.r, np.maximum(self.a, self.b) + self.r])


class Torus(Node):
    """Torus around ``axis`` through ``center``: ring radius ``major``, tube radius ``minor`` (exact)."""

    def __init__(self, center, major: float, minor: float, axis: int = 1):
        self.c, self.R, self.r, self.axis = _vec(center), float(major), float(minor), int(axis)

    def sdf(self, p):
        r, a = _axial(p, self.c, self.axis)
        return np.hypot(r - self.R, a) - self.r

    def bounds(self):
        h = np.full(3, self.R + self.r)
        h[self.axis] = self.r
        return np.stack([self.c - h, self.c + h])


class Revolve(Node):
    """Solid of revolution of a closed profile polygon around ``axis`` through ``center``.

    Parameters
    ----------
    profile : (k, 2) float
      Polygon vertices ``(r, a)`` with ``r >= 0`` (distance from the axis) and ``a`` the coordinate
      along the axis relative to ``center``; closed implicitly, any orientation, not self-intersecting.
    """

    def __init__(self, center, profile, axis: int = 1):
        self.c, self.axis = _vec(center), int(axis)
        poly = np.asarray(profile, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3 or poly[:, 0].min() < 0:
            raise ValueError("profile must be (k >= 3, 2) with r >= 0")
        self.poly = poly
        nxt = np.roll(poly, -1, axis=0)
        # Edges on the axis bound the profile but are not part of the 3-D surface.
        self.surface_edge = ~((poly[:, 0] == 0.0) & (nxt[:, 0] == 0.0))

    def sdf(self, p):
        r, a = _axial(p, self.c, self.axis)
        return polygon_sdf(np.stack([r, a], axis=1), self.poly, self.surface_edge)

    def bounds(self):
        rmax = self.poly[:, 0].max()
        h = np.full(3, rmax)
        lo, hi = self.c - h, self.c + h
        lo[self.axis] = self.c[self.axis] + self.poly[:, 1].min()
        hi[self.axis] = self.c[self.axis] + self.poly[:, 1].max()
        return np.stack([lo, hi])


def polygon_sdf(q: np.ndarray, poly: np.ndarray, distance_edges: np.ndarray | None = None) -> np.ndarray:
    """Exact signed distance from 2-D points to a closed polygon (negative inside, even-odd rule).

    Parameters
    ----------
    q : (n, 2) float
    poly : (k, 2) float
      Vertices; edge ``i`` joins ``poly[i]`` and ``poly[(i + 1) % k]``.
    distance_edges : (k,) bool, optional
      Edges that count for the distance (all by default); every edge counts for the sign.

    Returns
    -------
    sdf : (n,) float64
    """
    k = len(poly)
    use = np.ones(k, dtype=bool) if distance_edges is None else np.asarray(distance_edges, dtype=bool)
    d2 = np.full(len(q), np.inf)
    inside = np.zeros(len(q), dtype=bool)
    qx, qy = q[:, 0], q[:, 1]
    for i in range(k):
        ax, ay = poly[i]
        bx, by = poly[(i + 1) % k]
        ex, ey = bx - ax, by - ay
        wx, wy = qx - ax, qy - ay
        if use[i]:
            t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            np.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2, out=d2)
        if ey != 0.0:  # crossing number of a ray towards +x
            straddle = (ay <= qy) != (by <= qy)
            x_cross = ax + (qy - ay) * (ex / ey)
            inside ^= straddle & (qx < x_cross)
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


class Union(Node):
    def __init__(self, *children: Node):
        if not children:
            raise ValueError("empty union")
        self.children = children

    def sdf(self, p):
        out = self.children[0].sdf(p)
        for c in self.children[1:]:
            np.minimum(out, c.sdf(p), out=out)
        return out

    def bounds(self):
        b = np.stack([c.bounds() for c in self.children])  # (m, 2, 3)
        return np.stack([b[:, 0].min(axis=0), b[:, 1].max(axis=0)])


class Subtract(Node):
    """``a`` minus ``b``: ``max(a, -b)``."""

    def __init__(self, a: Node, b: Node):
        self.a, self.b = a, b

    def sdf(self, p):
        return np.maximum(self.a.sdf(p), -self.b.sdf(p))

    def bounds(self):
        return self.a.bounds()


class Rotate(Node):
    """``child`` rotated by ``angle`` (radians, right-handed) about ``axis`` through ``pivot``."""

    def __init__(self, child: Node, axis: int, angle: float, pivot):
        self.child, self.pivot = child, _vec(pivot)
        c, s = math.cos(angle), math.sin(angle)
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        self.m = m  # world = m @ (local - pivot) + pivot

    def sdf(self, p):
        q = [p[:, k] - self.pivot[k] for k in range(3)]
        local = np.empty(p.shape, order="F")  # local = m^T (p - pivot) + pivot, column by column
        for k in range(3):
            local[:, k] = self.m[0, k] * q[0] + self.m[1, k] * q[1] + self.m[2, k] * q[2] + self.pivot[k]
        return self.child.sdf(local)

    def bounds(self):
        lo, hi = self.child.bounds()
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T  # (8, 3)
        w = (corners - self.pivot) @ self.m.T + self.pivot
        return np.stack([w.min(axis=0), w.max(axis=0)])


# --------------------------------------------------------------------------------------------------
# Shapes in the canonical frame
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Shape:
    """One procedural shape in the canonical frame.

    ``sdf(points)`` evaluates ``scale * root((points / scale) + center)``: the design-units tree moved so
    its bounding-box centre is at the origin and its longest side is ``2 * EXTENT``.
    """

    category: str
    params: dict
    root: Node = field(repr=False)
    center: tuple[float, float, float] = field(repr=False)
    scale: float = field(repr=False)

    def sdf(self, points: np.ndarray) -> np.ndarray:
        """Signed distance at canonical ``points (n, 3)`` -> ``(n,)`` float64, negative inside."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        design = np.asfortranarray(p / self.scale + np.asarray(self.center))  # contiguous columns
        return self.root.sdf(design) * self.scale

    def bounds(self) -> np.ndarray:
        """(2, 3) canonical bounding box from the primitives (conservative for rotated parts)."""
        return (self.root.bounds() - np.asarray(self.center)) * self.scale


class _Params:
    """Draws rounded, JSON-friendly parameters from a numpy Generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.p: dict = {}

    def u(self, name: str, lo: float, hi: float) -> float:
        self.p[name] = round(float(self.rng.uniform(lo, hi)), 4)
        return self.p[name]

    def choice(self, name: str, options: Sequence[str]) -> str:
        self.p[name] = str(options[int(self.rng.integers(len(options)))])
        return self.p[name]

    def flag(self, name: str, prob: float) -> bool:
        self.p[name] = bool(self.rng.random() < prob)
        return self.p[name]

    def integer(self, name: str, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi]`` (inclusive)."""
        self.p[name] = int(self.rng.integers(lo, hi + 1))
        return self.p[name]


def _wall_offset(dr: float, dy: float, thickness: float) -> float:
    """Horizontal offset giving a wall of normal ``thickness`` along a profile edge of slope (dr, dy)."""
    return thickness * math.hypot(dr, dy) / abs(dy)


def _leg(style: str, x: float, z: float, y0: float, y1: float, r: float) -> Node:
    c = (x, (y0 + y1) / 2, z)
    if style == "round":
        return Cylinder(c, r, (y1 - y0) / 2)
    return Box(c, (r, (y1 - y0) / 2, r), radius=0.25 * r)


# ---- chair -------------------------------------------------------------------------------------


def _chair_params(g: _Params) -> None:
    g.u("seat_width", 0.42, 0.6)
    g.u("seat_depth", 0.4, 0.55)
    g.u("seat_thickness", 0.05, 0.08)
    g.u("seat_height", 0.4, 0.5)
    g.choice("leg_style", ["round", "square"])
    g.u("leg_radius", 0.025, 0.04)
    g.u("leg_inset", 0.0, 0.05)
    g.u("back_height", 0.35, 0.6)
    g.u("back_thickness", 0.04, 0.06)
    g.choice("back_style", ["panel", "posts"])
    g.u("back_tilt_deg", 0.0, 14.0)
    g.u("edge_round", 0.005, 0.02)
    if g.flag("arms", 0.35):
        g.u("arm_height", 0.17, 0.25)
        g.u("arm_width", 0.04, 0.06)


def _chair(p: dict) -> Node:
    w, d, t, hs = p["seat_width"], p["seat_depth"], p["seat_thickness"], p["seat_height"]
    lr, ins = p["leg_radius"], p["leg_inset"]
    parts: list[Node] = [Box((0, hs - t / 2, 0), (w / 2, t / 2, d / 2), radius=p["edge_round"])]
    lx, lz = w / 2 - ins - lr, d / 2 - ins - lr
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(_leg(p["leg_style"], sx * lx, sz * lz, 0.0, hs - t / 2, lr))
    bh, bt = p["back_height"], p["back_thickness"]
    y0, y1 = hs - t, hs + bh  # the back reaches into the seat
    bz = -d / 2 + bt / 2
    if p["back_style"] == "panel":
        back: Node = Box((0, (y0 + y1) / 2, bz), (w / 2, (y1 - y0) / 2, bt / 2),
                         radius=min(p["edge_round"], bt / 3))
    else:
        pw = max(2 * lr, 0.05)
        rail = max(0.18 * bh, 0.06)
        back = Union(
            Box((-(w / 2 - pw / 2), (y0 + y1) / 2, bz), (pw / 2, (y1 - y0) / 2, bt / 2)),
            Box((w / 2 - pw / 2, (y0 + y1) / 2, bz), (pw / 2, (y1 - y0) / 2, bt / 2)),
            Box((0, y1 - rail / 2, bz), (w / 2, rail / 2, bt / 2)),
            Box((0, hs + 0.45 * bh, bz), (w / 2, 0.35 * rail, bt / 2)),
        )
    # Lean the back backwards (top towards -z) about its foot.
    parts.append(Rotate(back, axis=0, angle=-math.radians(p["back_tilt_deg"]), pivot=(0, hs, bz)))
    if p["arms"]:
        ah, aw = p["arm_height"], p["arm_width"]
        # The arm reaches back to the (possibly tilted) back rest at its height.
        z0 = bz - bt / 2 - ah * math.tan(math.radians(p["back_tilt_deg"]))
        z1 = d / 2 - 0.04
        for sx in (-1, 1):
            x = sx * (w / 2 - aw / 2)
            parts.append(Box((x, hs + ah, (z0 + z1) / 2), (aw / 2, 0.025, (z1 - z0) / 2), radius=0.01))
            parts.append(Box((x, hs + ah / 2, d / 2 - 0.06), (aw / 2, ah / 2, 0.025)))
    return Union(*parts)


# ---- table -------------------------------------------------------------------------------------


def _table_params(g: _Params) -> None:
    style = g.choice("style", ["rect", "round"])
    g.u("height", 0.6, 0.8)
    if style == "rect":
        g.u("top_width", 0.9, 1.6)
        g.u("depth_ratio", 0.45, 0.8)
        g.u("top_thickness_ratio", 0.035, 0.05)
        g.choice("leg_style", ["round", "square"])
        g.u("leg_radius_ratio", 0.022, 0.035)
        g.u("leg_inset", 0.0, 0.08)
        if g.flag("apron", 0.5):
            g.u("apron_height", 0.06, 0.1)
    else:
        g.u("top_radius", 0.4, 0.65)
        g.u("top_thickness_ratio", 0.035, 0.05)
        g.u("pedestal_radius_ratio", 0.04, 0.065)
        g.u("base_radius_ratio", 0.45, 0.7)


def _table(p: dict) -> Node:
    h = p["height"]
    if p["style"] == "rect":
        w = p["top_width"]
        d = w * p["depth_ratio"]
        tt = w * p["top_thickness_ratio"]
        lr = w * p["leg_radius_ratio"]
        parts: list[Node] = [Box((0, h - tt / 2, 0), (w / 2, tt / 2, d / 2), radius=tt / 4)]
        lx, lz = w / 2 - p["leg_inset"] - lr, d / 2 - p["leg_inset"] - lr
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(_leg(p["leg_style"], sx * lx, sz * lz, 0.0, h - tt / 2, lr))
        if p["apron"]:
            ah, at = p["apron_height"], 0.035 * w
            yc = h - tt - ah / 2 + 0.005
            parts.append(Box((0, yc, lz), (lx, ah / 2, at / 2)))
            parts.append(Box((0, yc, -lz), (lx, ah / 2, at / 2)))
            parts.append(Box((lx, yc, 0), (at / 2, ah / 2, lz)))
            parts.append(Box((-lx, yc, 0), (at / 2, ah / 2, lz)))
        return Union(*parts)
    rt = p["top_radius"]
    tt = 2 * rt * p["top_thickness_ratio"]
    pr = 2 * rt * p["pedestal_radius_ratio"]
    rb = rt * p["base_radius_ratio"]
    bt = tt
    top = Revolve((0, h - tt, 0), [(0, 0), (rt - tt / 3, 0), (rt, tt / 3), (rt, tt), (0, tt)])
    base = Revolve((0, 0, 0), [(0, 0), (rb, 0), (rb, 0.4 * bt), (0.7 * rb, bt), (0, bt)])
    pedestal = Cylinder((0, h / 2, 0), pr, h / 2 - tt / 2)
    return Union(top, pedestal, base)


# ---- mug ---------------------------------------------------------------------------------------


def _mug_params(g: _Params) -> None:
    g.u("height", 0.7, 1.0)
    g.u("radius", 0.3, 0.42)
    g.u("taper", 1.0, 1.15)
    g.u("wall", 0.05, 0.07)
    g.u("floor", 0.06, 0.09)
    g.u("handle_height_frac", 0.42, 0.58)
    g.u("handle_major_frac", 0.2, 0.27)
    g.u("handle_minor", 0.045, 0.065)


def _mug(p: dict) -> Node:
    h, rb, w, fl = p["height"], p["radius"], p["wall"], p["floor"]
    rt = rb * p["taper"]

    def outer(y):  # outer radius at height y
        return rb + (rt - rb) * y / h

    off = _wall_offset(rt - rb, h, w)
    bevel = 0.3 * w
    body = Revolve((0, 0, 0), [
        (0, 0), (rb - bevel, 0), (rb, bevel), (rt, h), (rt - off, h),
        (outer(fl) - off, fl), (0, fl),
    ])
    top = h + 0.5  # the cavity solid sticks out of the rim
    cavity = Revolve((0, 0, 0), [(0, fl), (outer(fl) - off, fl), (outer(top) - off, top), (0, top)])
    yh = h * p["handle_height_frac"]
    big = h * p["handle_major_frac"]
    handle = Torus((outer(yh) + 0.55 * big, yh, 0), big, p["handle_minor"], axis=2)
    return Union(body, Subtract(handle, cavity))


# ---- lamp --------------------------------------------------------------------------------------


def _lamp_params(g: _Params) -> None:
    style = g.choice("style", ["floor", "desk"])
    g.u("base_radius", 0.15, 0.26)
    g.u("base_height", 0.04, 0.07)
    if style == "floor":
        g.u("pole_radius", 0.025, 0.04)
        g.u("pole_height", 0.8, 1.3)
        g.u("shade_bottom_radius", 0.2, 0.35)
        g.u("shade_top_ratio", 0.45, 0.85)
        g.u("shade_height", 0.2, 0.35)
        g.u("shade_wall", 0.035, 0.05)
    else:
        g.u("arm_radius", 0.022, 0.032)
        g.u("arm1_length", 0.4, 0.6)
        g.u("arm1_angle_deg", 5.0, 30.0)
        g.u("arm2_length", 0.3, 0.5)
        g.u("arm2_angle_deg", 50.0, 100.0)
        g.u("head_radius", 0.1, 0.15)
        g.u("head_top_ratio", 0.3, 0.5)
        g.u("head_length", 0.15, 0.25)
        g.u("head_wall", 0.035, 0.045)
        g.u("head_tilt_deg", 10.0, 50.0)


def _lamp(p: dict) -> Node:
    rb, bh = p["base_radius"], p["base_height"]
    base = Revolve((0, 0, 0), [(0, 0), (rb, 0), (rb, 0.5 * bh), (0.8 * rb, bh), (0, bh)])
    if p["style"] == "floor":
        hp = p["pole_height"]
        r0 = p["shade_bottom_radius"]
        r1 = r0 * p["shade_top_ratio"]
        sh, sw = p["shade_height"], p["shade_wall"]
        # Shade: a thin frustum wall, closed at the top by a disc the pole ends in.
        y0 = hp - sh
        off = _wall_offset(r1 - r0, sh, sw)
        r_in_top = r0 - off + (r1 - r0) * (sh - sw) / sh
        shade = Revolve((0, y0, 0),
                        [(r0, 0), (r1, sh), (0, sh), (0, sh - sw), (r_in_top, sh - sw), (r0 - off, 0)])
        pole = Cylinder((0, hp / 2, 0), p["pole_radius"], hp / 2 - sw / 2)
        return Union(base, pole, shade)
    ar = p["arm_radius"]
    a1, a2 = math.radians(p["arm1_angle_deg"]), math.radians(p["arm2_angle_deg"])
    j0 = np.array([0.0, bh, -0.3 * rb])
    j1 = j0 + p["arm1_length"] * np.array([0.0, math.cos(a1), -math.sin(a1)])  # leans back
    j2 = j1 + p["arm2_length"] * np.array([0.0, math.cos(a2), math.sin(a2)])  # reaches forward
    hr, hl, hw = p["head_radius"], p["head_length"], p["head_wall"]
    top = hr * p["head_top_ratio"]
    # Head: hollow cone opening towards -y in design, closed at its top (which sits on the arm end).
    off = _wall_offset(hr - top, hl, hw)
    # The closed top is at least ``hw`` thick, and thicker where the inner wall would reach the axis.
    a_cap = max(hw, hl * (off - top + 0.02) / (hr - top))
    r_in_top = top - off + (hr - top) * a_cap / hl
    head = Revolve(tuple(j2), [(0, 0), (top, 0), (hr, -hl), (hr - off, -hl), (r_in_top, -a_cap), (0, -a_cap)])
    # Tilt the opening towards +z (forwards).
    head = Rotate(head, axis=0, angle=-math.radians(p["head_tilt_deg"]), pivot=tuple(j2))
    joint = 1.6 * ar
    return Union(
        base,
        Capsule(j0, j1, ar),
        Capsule(j1, j2, ar),
        Capsule(j1, j1, joint),
        Capsule(j0, j0, joint),
        head,
    )


# ---- vase --------------------------------------------------------------------------------------


def _vase_params(g: _Params) -> None:
    g.u("height", 0.8, 1.2)
    g.u("r_base", 0.15, 0.3)
    g.u("r_belly", 0.25, 0.45)
    g.u("belly_frac", 0.25, 0.5)
    g.u("r_neck", 0.1, 0.2)
    g.u("neck_frac", 0.65, 0.85)
    g.u("r_lip", 0.12, 0.3)
    g.u("wall", 0.035, 0.05)
    g.u("floor", 0.05, 0.08)


def _vase(p: dict) -> Node:
    h, w, fl = p["height"], p["wall"], p["floor"]
    ys = np.array([0.0, p["belly_frac"], p["neck_frac"], 1.0]) * h
    rs = np.array([p["r_base"], p["r_belly"], p["r_neck"], p["r_lip"]])
    curve = PchipInterpolator(ys, rs)
    y = np.linspace(0.0, h, 25)
    r = curve(y)
    outer = list(zip(r, y))
    yi = y[y > fl + 1e-6][::-1]
    inner = list(zip(curve(yi) - w, yi))
    r_floor = float(curve(fl)) - w
    poly = [(0.0, 0.0)] + outer + inner + [(r_floor, fl), (0.0, fl)]
    return Revolve((0, 0, 0), poly)


# ---- bottle ------------------------------------------------------------------------------------


def _bottle_params(g: _Params) -> None:
    style = g.choice("style", ["round", "square"])
    g.u("body_radius", 0.15, 0.25)
    g.u("body_height", 0.45, 0.7)
    g.u("shoulder_height", 0.08, 0.22)
    g.u("neck_radius", 0.05, 0.08)
    g.u("neck_height", 0.1, 0.25)
    if style == "square":
        g.u("depth_ratio", 0.6, 1.0)
    if g.flag("cap", 0.5):
        g.u("cap_height", 0.05, 0.09)


def _bottle(p: dict) -> Node:
    rb, hb, hs = p["body_radius"], p["body_height"], p["shoulder_height"]
    rn, hn = p["neck_radius"], p["neck_height"]
    square = p["style"] == "square"
    d = rb * p["depth_ratio"] if square else rb
    round_r = 0.35 * min(rb, d)
    # A square body is a rounded box; the revolved shoulder then starts inside it, within the flat top.
    r_top = 0.6 * min(rb, d) if square else rb
    if square:
        base = [(0, hb - 0.5 * round_r), (r_top, hb - 0.5 * round_r)]
    else:
        base = [(0, 0), (rb - 0.03, 0), (rb, 0.03)]
    s = np.linspace(0.0, 1.0, 9)[1:-1]
    shoulder = [(rn + (r_top - rn) * 0.5 * (1 + math.cos(math.pi * t)), hb + hs * t) for t in s]
    lip = 0.012
    y_neck = hb + hs
    y_top = y_neck + hn
    prof = base + [(r_top, hb)] + shoulder + [(rn, y_neck), (rn, y_top - 2 * lip)]
    if p["cap"]:
        y_cap = y_top + p["cap_height"]
        rc = rn + 1.5 * lip  # cap radius
        prof += [(rc, y_top - 2 * lip), (rc, y_cap - 0.01), (rc - 0.01, y_cap), (0, y_cap)]
    else:
        prof += [(rn + lip, y_top - 1.5 * lip), (rn + lip, y_top - 0.5 * lip), (rn, y_top), (0, y_top)]
    body = Revolve((0, 0, 0), prof)
    if not square:
        return body
    return Union(Box((0, hb / 2, 0), (rb, hb / 2, d), radius=round_r), body)


# ---- shelf -------------------------------------------------------------------------------------


def _shelf_params(g: _Params) -> None:
    g.u("width", 0.6, 1.2)
    g.u("height", 0.8, 1.8)
    g.u("depth", 0.25, 0.4)
    g.u("thickness_ratio", 0.03, 0.045)
    g.integer("n_shelves", 1, 4)
    g.flag("back_panel", 0.6)
    g.flag("plinth", 0.5)


def _shelf(p: dict) -> Node:
    w, h, d = p["width"], p["height"], p["depth"]
    t = p["thickness_ratio"] * max(w, h)
    parts: list[Node] = [
        Box((-(w / 2 - t / 2), h / 2, 0), (t / 2, h / 2, d / 2)),
        Box((w / 2 - t / 2, h / 2, 0), (t / 2, h / 2, d / 2)),
        Box((0, h - t / 2, 0), (w / 2, t / 2, d / 2)),
    ]
    y_bottom = 0.08 * h if p["plinth"] else 0.0
    parts.append(Box((0, y_bottom + t / 2, 0), (w / 2 - t / 2, t / 2, d / 2)))
    if p["plinth"]:
        parts.append(Box((0, y_bottom / 2, d / 2 - t), (w / 2 - t / 2, y_bottom / 2 + 0.005, t / 2)))
    n = p["n_shelves"]
    for i in range(1, n + 1):
        y = y_bottom + t / 2 + (h - t - y_bottom - t / 2) * i / (n + 1)
        parts.append(Box((0, y, 0.01), (w / 2 - t / 2, t / 2, d / 2 - 0.01)))
    if p["back_panel"]:
        bt = 0.6 * t
        parts.append(Box((0, h / 2, -(d / 2 - bt / 2)), (w / 2 - t / 2, h / 2, bt / 2)))
    return Union(*parts)


# ---- airplane ----------------------------------------------------------------------------------


def _airplane_params(g: _Params) -> None:
    g.u("length", 0.9, 1.1)
    g.u("fuselage_radius", 0.05, 0.08)
    g.u("nose_frac", 0.08, 0.16)
    g.u("tail_frac", 0.2, 0.32)
    g.u("span", 0.8, 1.25)
    g.u("chord", 0.12, 0.22)
    g.u("wing_thickness_ratio", 0.03, 0.04)
    g.u("wing_z", -0.08, 0.1)
    g.u("wing_y_frac", -0.6, 0.6)
    g.u("sweep_deg", 0.0, 35.0)
    g.u("tail_span_ratio", 0.3, 0.42)
    g.u("tail_chord", 0.08, 0.13)
    g.u("fin_height", 0.12, 0.2)
    g.u("fin_sweep_deg", 15.0, 45.0)
    g.choice("engines", ["0", "2", "4"])
    g.u("engine_radius", 0.035, 0.05)
    g.u("engine_length", 0.12, 0.2)


def _airplane(p: dict) -> Node:
    L, rf = p["length"], p["fuselage_radius"]
    nose, tail = p["nose_frac"] * L, p["tail_frac"] * L
    th = np.linspace(0.0, math.pi / 2, 7)[1:-1]
    prof = [(0, -L / 2), (0.35 * rf, -L / 2), (rf, -L / 2 + tail), (rf, L / 2 - nose)]
    prof += [(rf * math.cos(a), L / 2 - nose + nose * math.sin(a)) for a in th]
    prof += [(0, L / 2)]
    fuselage = Revolve((0, 0, 0), prof, axis=2)
    span, chord = p["span"], p["chord"]
    wt = p["wing_thickness_ratio"] * max(L, span)
    wy, wz = p["wing_y_frac"] * rf, p["wing_z"]
    sweep = math.radians(p["sweep_deg"])
    parts: list[Node] = [fuselage]

    def wing(x_half: float, y: float, z: float, c: float, thick: float) -> list[Node]:
        out = []
        for sx in (-1, 1):
            b = Box((sx * x_half / 2, y, z), (x_half / 2, thick / 2, c / 2), radius=0.45 * thick)
            out.append(Rotate(b, axis=1, angle=sx * sweep, pivot=(0, y, z)))
        return out

    parts += wing(span / 2, wy, wz, chord, wt)
    tspan, tc = span * p["tail_span_ratio"], p["tail_chord"]
    tz = -L / 2 + tail * 0.35 + tc / 2
    parts += wing(tspan / 2, 0.3 * rf, tz, tc, 0.8 * wt)
    fh = p["fin_height"]
    fin = Box((0, 0.5 * rf + fh / 2, tz), (0.4 * wt, fh / 2 + 0.5 * rf, tc / 2 + 0.02), radius=0.35 * wt)
    parts.append(Rotate(fin, axis=0, angle=-math.radians(p["fin_sweep_deg"]), pivot=(0, 0.5 * rf, tz)))
    n_eng = int(p["engines"])
    er, el = p["engine_radius"], p["engine_length"]
    xs = [0.3] if n_eng == 2 else ([0.22, 0.42] if n_eng == 4 else [])
    for fx in xs:
        for sx in (-1, 1):
            x = sx * fx * span / 2 * math.cos(sweep)
            z = wz - abs(x) * math.tan(sweep) + 0.25 * chord
            y = wy - wt / 2 - 0.8 * er
            parts.append(Cylinder((x, y, z), er, el / 2, axis=2))
    return Union(*parts)


# --------------------------------------------------------------------------------------------------
# Registry and public API
# --------------------------------------------------------------------------------------------------

_FAMILIES: dict[str, tuple[Callable[[_Params], None], Callable[[dict], Node]]] = {
    "chair": (_chair_params, _chair),
    "table": (_table_params, _table),
    "mug": (_mug_params, _mug),
    "lamp": (_lamp_params, _lamp),
    "vase": (_vase_params, _vase),
    "bottle": (_bottle_params, _bottle),
    "shelf": (_shelf_params, _shelf),
    "airplane": (_airplane_params, _airplane),
}

CATEGORIES: list[str] = list(_FAMILIES)
"""Category names, in a fixed order (the class-label order of the embedded dataset)."""


def _check_category(category: str) -> None:
    if category not in _FAMILIES:
        raise ValueError(f"unknown shape category {category!r}; expected one of {', '.join(CATEGORIES)}")


def sample_params(category: str, rng: np.random.Generator) -> dict:
    """Draw the parameters of one shape of ``category`` (JSON-serialisable, rounded to 4 decimals)."""
    _check_category(category)
    g = _Params(rng)
    _FAMILIES[category][0](g)
    return g.p


def shape_from_params(category: str, params: dict, extent: float = EXTENT) -> Shape:
    """Build the canonical-frame :class:`Shape` of ``category`` from its parameter dict."""
    _check_category(category)
    root = _FAMILIES[category][1](params)
    lo, hi = root.bounds()
    center = (lo + hi) / 2.0
    scale = 2.0 * extent / float((hi - lo).max())
    return Shape(category=category, params=dict(params), root=root,
                 center=tuple(float(c) for c in center), scale=float(scale))


def sample_shape(category: str, rng: np.random.Generator) -> Shape:
    """A random shape of ``category`` drawn from ``rng`` (deterministic given the generator state)."""
    return shape_from_params(category, sample_params(category, rng))


def sdf_grid(
    sdf: Callable[[np.ndarray], np.ndarray],
    res: int,
    bound: float = BOUND,
    block: int = 4,
) -> np.ndarray:
    """Sample a 1-Lipschitz signed distance function on the node grid, exactly only near the surface.

    The grid is split into blocks of ``block`` cells. ``f`` is evaluated at each block centre ``c``;
    if ``|f(c)| > rho + h`` (``rho`` = half the block diagonal, ``h`` = spacing) the block holds no
    surface and every node in it has ``|f| > h``: its nodes get ``sign(f(c)) * (|f(c)| - rho)``, a
    lower bound of ``|f|`` with the right sign. All other nodes are evaluated exactly. An edge with a
    sign change has both end nodes within ``h`` of the surface, so every such node is exact and
    marching cubes gives the same vertices as with a dense evaluation, from a fraction of the
    evaluations for the procedural shapes.

    Parameters
    ----------
    sdf : callable ``(n, 3) -> (n,)``
      1-Lipschitz (e.g. exact SDFs combined with min/max), negative inside.

    Returns
    -------
    field : (res + 1, res + 1, res + 1) float64
    """
    h = grid.spacing(res, bound)
    coords = grid.node_coords_1d(res, bound)
    starts = np.arange(0, res, block)
    ends = np.minimum(starts + block, res)
    centres_1d = grid.index_to_world((starts + ends) / 2.0, res, bound)
    half_1d = (ends - starts) * h / 2.0
    nb = len(starts)
    ci = np.stack(np.meshgrid(np.arange(nb), np.arange(nb), np.arange(nb), indexing="ij"), -1).reshape(-1, 3)
    centres = centres_1d[ci]  # (nb^3, 3)
    rho = np.linalg.norm(half_1d[ci], axis=1)  # (nb^3,)
    fc = np.asarray(sdf(centres), dtype=np.float64)
    near = np.abs(fc) <= rho + h * (1.0 + 1e-6)
    out = np.empty((res + 1,) * 3, dtype=np.float64)
    mask = np.zeros((res + 1,) * 3, dtype=bool)
    for b in range(len(ci)):
        i, j, k = ci[b]
        sl = (slice(starts[i], ends[i] + 1), slice(starts[j], ends[j] + 1), slice(starts[k], ends[k] + 1))
        if near[b]:
            mask[sl] = True
        else:
            out[sl] = np.sign(fc[b]) * (abs(fc[b]) - rho[b])
    if mask.any():
        idx = np.nonzero(mask)
        pts = np.stack([coords[idx[0]], coords[idx[1]], coords[idx[2]]], axis=1)  # (m, 3)
        out[idx] = sdf(pts)
    return out


def shape_to_mesh(
    shape: Shape, resolution: int = DEFAULT_RESOLUTION, bound: float = BOUND, decimate: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of the shape's SDF on the ``resolution``-cell node grid, optionally decimated.

    Parameters
    ----------
    decimate : float in [0, 1)
      Fraction of faces to remove (quadric decimation); the undecimated mesh is returned if the
      result is not closed, consistently wound, outward and with the same number of parts.

    Returns
    -------
    vertices : (n, 3) float64 (canonical frame), faces : (f, 3) int64 (outward normals)
    """
    if not 0.0 <= decimate < 1.0:
        raise ValueError(f"decimate must be in [0, 1), got {decimate}")
    field_ = sdf_grid(shape.sdf, resolution, bound)
    v, f = marching_cubes(field_, 0.0, bound)
    if decimate > 0.0:
        v, f = _decimate(v, f, decimate)
    return v, f


def _decimate(v: np.ndarray, f: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    v2, f2 = fast_simplification.simplify(v, f, target_reduction=fraction)
    v2, f2 = np.asarray(v2, dtype=np.float64), np.asarray(f2, dtype=np.int64)
    before = trimesh.Trimesh(v, f, process=False)
    after = trimesh.Trimesh(v2, f2, process=False)
    if (len(f2) and after.is_watertight and after.is_winding_consistent and after.volume > 0
            and after.body_count == before.body_count):
        return v2, f2
    log.debug("decimation broke the mesh (%d -> %d faces); keeping the marching-cubes mesh", len(f), len(f2))
    return v, f


# --------------------------------------------------------------------------------------------------
# Dataset writer (used by ``shapeflow synth``)
# --------------------------------------------------------------------------------------------------


def object_rng(seed: int, category: str, index: int) -> np.random.Generator:
    """The generator for object ``index`` of ``category``: seeded by ``(seed, crc32(category), index)``."""
    entropy = [int(seed), zlib.crc32(category.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _object_stem(category: str, index: int) -> str:
    return f"{category}_{index:04d}"


def _write_object(task: tuple[str, str, int, int, int, float]) -> str:
    out_dir, category, index, seed, resolution, decimate = task
    folder = Path(out_dir) / category
    stem = _object_stem(category, index)
    meta_path = folder / f"{stem}.json"
    mesh_path = folder / f"{stem}.obj"
    meta = {"category": category, "index": index, "seed": seed, "resolution": resolution,
            "decimate": decimate, "version": SYNTH_VERSION}
    if mesh_path.is_file() and meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
            if all(old.get(k) == v for k, v in meta.items()):
                return "skipped"
        except (OSError, ValueError):
            pass
    params = sample_params(category, object_rng(seed, category, index))
    shape = shape_from_params(category, params)
    v, f = shape_to_mesh(shape, resolution, decimate=decimate)
    save_mesh(mesh_path, v, f)
    meta["params"] = params
    meta["n_vertices"], meta["n_faces"] = int(len(v)), int(len(f))
    fileio.write_json(meta_path, meta)  # written last: marks the object complete
    return "written"


def generate_dataset(
    out_dir: str | os.PathLike,
    per_class: int,
    seed: int = 0,
    *,
    resolution: int = DEFAULT_RESOLUTION,
    decimate: float = DEFAULT_DECIMATE,
    classes: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the synthetic dataset: ``out_dir/<category>/<category>_<k:04d>.{obj,json}`` + ``synth.json``.

    Objects whose ``.obj`` and matching ``.json`` (same seed, resolution, decimation, version) exist are
    skipped, so an interrupted run resumes. Output is byte-identical for the same arguments,
    whatever ``workers`` is.

    Returns
    -------
    summary : dict
      The content of ``synth.json`` plus ``written`` and ``skipped`` counts.
    """
    classes = list(CATEGORIES if classes is None else classes)
    for c in classes:
        _check_category(c)
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate classes in {classes}")
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    if int(resolution) != resolution or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8 cells, got {resolution}")
    if not 0.0 <= decimate < 1.0:
        raise ValueError(f"decimate must be in [0, 1), got {decimate}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(str(out), c, k, int(seed), int(resolution), float(decimate))
             for c in classes for k in range(per_class)]
    counts = {"written": 0, "skipped": 0}
    bar = tqdm(total=len(tasks), desc="synth", unit="shape", disable=not progress)
    if workers <= 1:
        for t in tasks:
            counts[_write_object(t)] += 1
            bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            for status in pool.imap_unordered(_write_object, tasks, chunksize=1):
                counts[status] += 1
                bar.update()
    bar.close()
    summary = {"version": SYNTH_VERSION, "seed": int(seed), "per_class": int(per_class),
               "resolution": int(resolution), "decimate": float(decimate), "categories": classes}
    fileio.write_json(out / "synth.json", summary)
    log.info("synth: %d written, %d already present in %s", counts["written"], counts["skipped"], out)
    return {**summary, **counts}
