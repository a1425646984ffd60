"""Headless CPU mesh renderer: conditioning views and preview pictures, no display, no GPU.

Design choices
--------------
* **Ray casting, library-backed**: one primary ray per sub-pixel through trimesh's Embree
  intersector (:class:`trimesh.ray.ray_pyembree.RayMeshIntersector`, backed by the ``embreex``
  package). Without Embree it falls back to trimesh's pure-python intersector (much slower) and
  logs a warning. No OpenGL/EGL/OSMesa context, so it runs on servers and CI without a display.
* **Camera**: pinhole, looking at ``target`` (the origin by default) from
  ``target + distance * (cos(el) sin(az), sin(el), cos(el) cos(az))``: y is up, azimuth 0 looks
  from +z (the front of the synthetic shapes) and grows towards +x, elevation is above the xz-plane,
  angles in degrees, ``fov`` is the vertical field of view in degrees. The default distance frames
  the bounding sphere of the canonical cube ``[-EXTENT, EXTENT]^3`` (every normalized shape is inside
  it), so all objects are shown at the same scale.
* **Shading**: ``"lambert"`` = ambient + Lambert with a headlight (a light at the camera), two-sided
  (open meshes and back faces stay lit), smooth normals interpolated from area-weighted vertex
  normals (``smooth=False`` gives flat faces); ``"normal"`` = camera-space normal map
  (x right, y up, z towards the camera, mapped ``(n + 1) / 2`` to RGB), useful for geometry previews.
* **Anti-aliasing and alpha**: ``supersample x supersample`` rays per pixel; colour is the mean over
  the sub-pixel hits (straight, not premultiplied, alpha) and alpha is the covered fraction, so image
  conditioning can do its own alpha handling. With ``background=(r, g, b)`` the image is composited
  over that colour and alpha is 255 everywhere.
* numpy + trimesh + PIL only; no torch. Images are ``(H, W, 4) uint8`` RGBA, rows top to bottom.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np
import trimesh
from PIL import Image, ImageDraw, ImageFont

from shapeflow import fileio
from shapeflow.geometry.frame import EXTENT

log = logging.getLogger(__name__)

DEFAULT_FOV = 40.0
"""Vertical field of view in degrees."""

DEFAULT_COLOR = (0.72, 0.75, 0.80)
"""Base surface colour (linear RGB in [0, 1])."""


def default_distance(fov: float = DEFAULT_FOV, radius: float = EXTENT * math.sqrt(3.0)) -> float:
    """Camera distance at which a sphere of ``radius`` around the target just fits the vertical FOV."""
    return radius / math.sin(math.radians(fov) / 2.0)


def look_at(azimuth: float, elevation: float, distance: float, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Camera-to-world matrix (OpenGL convention: camera looks along its -z, y up, x right).

    Returns
    -------
    cam_to_world : (4, 4) float64
      Columns 0-2 are the camera's right, up and backward axes in world coordinates, column 3 its position.
    """
    az, el = math.radians(azimuth), math.radians(elevation)
    target = np.asarray(target, dtype=np.float64)
    direction = np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    eye = target + distance * direction
    back = eye - target
    back /= np.linalg.norm(back)
    world_up = np.array([0.0, 1.0, 0.0]) if abs(back[1]) < 0.999 else np.array([0.0, 0.0, -np.sign(back[1])])
    right = np.cross(world_up, back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up, back, eye
    return m


class MeshRenderer:
    """Holds a mesh and its ray-casting acceleration structure, so several views share one BVH build.

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces, dtype=np.int64)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
            raise ValueError(f"expected vertices (n, 3) and faces (f >= 1, 3), got {v.shape} and {f.shape}")
        self.mesh = trimesh.Trimesh(v, f, process=False)
        self.triangles = v[f]  # (f, 3, 3)
        t = self.triangles
        normals = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])  # (f, 3), length = 2 * area
        self.face_normals = _normalize(normals)  # (f, 3)
        # Area-weighted vertex normals (the cross product's length is twice the area).
        corner = f.ravel()  # (3 f,) each face's normal goes to its three vertices
        vn = np.stack(
            [np.bincount(corner, weights=np.repeat(normals[:, k], 3), minlength=len(v)) for k in range(3)], axis=1
        )  # (n, 3)
        self.vertex_normals = _normalize(vn)
        self.faces = f
        if trimesh.ray.has_embree:
            from trimesh.ray.ray_pyembree import RayMeshIntersector
        else:  # pragma: no cover - embreex is a dependency on x86_64
            log.warning("embree is not available; falling back to trimesh's pure-python ray casting (slow)")
            from trimesh.ray.ray_triangle import RayMeshIntersector
        self.intersector = RayMeshIntersector(self.mesh)

    def render(
        self,
        *,
        size: int | tuple[int, int] = 256,
        azimuth: float = 45.0,
        elevation: float = 20.0,
        distance: float | None = None,
        fov: float = DEFAULT_FOV,
        target: Sequence[float] = (0.0, 0.0, 0.0),
        color: Sequence[float] = DEFAULT_COLOR,
        background: Sequence[int] | None = None,
        shading: str = "lambert",
        smooth: bool = True,
        ambient: float = 0.25,
        supersample: int = 2,
    ) -> np.ndarray:
        """Render one view. See :func:`render_mesh` for the parameters.

        Returns
        -------
        image : (H, W, 4) uint8 RGBA
        """
        width, height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if width < 1 or height < 1 or supersample < 1:
            raise ValueError(
                f"size and supersample must be positive, got size={size}, supersample={supersample}"
            )
        if shading not in ("lambert", "normal"):
            raise ValueError(f"shading must be 'lambert' or 'normal', got {shading!r}")
        distance = default_distance(fov) if distance is None else float(distance)
        cam = look_at(azimuth, elevation, distance, target)
        origins, dirs = _primary_rays(cam, width, height, fov, supersample)  # (m, 3) each
        tri = self.intersector.intersects_first(origins, dirs)  # (m,) face index or -1
        hit = tri >= 0
        rgb = np.zeros((len(dirs), 3))
        if hit.any():
            rgb[hit] = self._shade(origins[hit], dirs[hit], tri[hit], cam, shading, smooth, color, ambient)
        s = supersample
        # Sub-pixel rays are ordered (row, sub-row, col, sub-col): average each s x s block.
        rgb_sum = rgb.reshape(height, s, width, s, 3).sum(axis=(1, 3))  # (h, w, 3)
        cover = hit.reshape(height, s, width, s).sum(axis=(1, 3)).astype(np.float64)  # (h, w)
        alpha = cover / (s * s)
        colour = rgb_sum / np.maximum(cover, 1.0)[..., None]  # straight alpha
        if background is not None:
            bg = np.asarray(background, dtype=np.float64).reshape(3) / 255.0
            colour = colour * alpha[..., None] + bg * (1.0 - alpha[..., None])
            alpha = np.ones_like(alpha)
        out = np.concatenate([colour, alpha[..., None]], axis=-1)
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

    def _shade(self, origins, dirs, tri, cam, shading, smooth, color, ambient) -> np.ndarray:
        n_face = self.face_normals[tri]
        if smooth:
            v0 = self.triangles[tri, 0]
            # Ray-plane intersection gives the hit point; then barycentric weights for the normals.
            t = np.einsum("ij,ij->i", n_face, v0 - origins) / _safe(np.einsum("ij,ij->i", n_face, dirs))
            points = origins + t[:, None] * dirs
            bary = trimesh.triangles.points_to_barycentric(self.triangles[tri], points)
            bary = np.nan_to_num(bary, nan=1.0 / 3.0)
            normals = np.einsum("ik,ikj->ij", bary, self.vertex_normals[self.faces[tri]])
            normals = _normalize(normals)
            bad = ~np.isfinite(normals).all(axis=1) | (np.linalg.norm(normals, axis=1) < 0.5)
            normals[bad] = n_face[bad]
        else:
            normals = n_face
        # Two-sided: flip normals to face the camera.
        facing = np.einsum("ij,ij->i", normals, dirs)
        normals = np.where((facing > 0.0)[:, None], -normals, normals)
        if shading == "normal":
            cam_n = normals @ cam[:3, :3]  # world -> camera axes (right, up, back)
            return (cam_n + 1.0) / 2.0
        lambert = np.clip(-np.einsum("ij,ij->i", normals, dirs), 0.0, 1.0)
        intensity = ambient + (1.0 - ambient) * lambert
        return intensity[:, None] * np.asarray(color, dtype=np.float64).reshape(1, 3)


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    size: int | tuple[int, int] = 256,
    azimuth: float = 45.0,
    elevation: float = 20.0,
    distance: float | None = None,
    fov: float = DEFAULT_FOV,
    target: Sequence[float] = (0.0, 0.0, 0.0),
    color: Sequence[float] = DEFAULT_COLOR,
    background: Sequence[int] | None = None,
    shading: str = "lambert",
    smooth: bool = True,
    ambient: float = 0.25,
    supersample: int = 2,
) -> np.ndarray:
    """Render a triangle mesh headless on the CPU.

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
    size : int or (width, height)
      Image size in pixels.
    azimuth, elevation : float
      Degrees; see the module docstring for the camera convention.
    distance : float, optional
      Camera distance from ``target``; default :func:`default_distance` (frames the canonical cube).
    fov : float
      Vertical field of view, degrees.
    color : (3,) float
      Base colour in [0, 1] (``"lambert"`` shading).
    background : (3,) int, optional
      None: transparent background, alpha = coverage. Otherwise composite over this 0-255 colour.
    shading : "lambert" or "normal"
    smooth : bool
      Interpolate vertex normals (True) or use face normals.
    ambient : float
      Ambient fraction of the intensity (``"lambert"``).
    supersample : int
      Rays per pixel along each axis (anti-aliasing, fractional alpha).

    Returns
    -------
    image : (H, W, 4) uint8 RGBA
    """
    return MeshRenderer(vertices, faces).render(
        size=size, azimuth=azimuth, elevation=elevation, distance=distance, fov=fov, target=target,
        color=color, background=background, shading=shading, smooth=smooth, ambient=ambient,
        supersample=supersample,
    )


def render_views(
    vertices: np.ndarray,
    faces: np.ndarray,
    n_views: int = 4,
    size: int = 256,
    *,
    seed: int | None = None,
    azimuths: Sequence[float] | None = None,
    elevation: float | Sequence[float] = 20.0,
    elevation_range: tuple[float, float] = (-10.0, 40.0),
    distance: float | None = None,
    fov: float = DEFAULT_FOV,
    **kwargs,
) -> tuple[list[np.ndarray], list[dict]]:
    """Render several views of one mesh (one BVH build).

    Views: ``azimuths`` if given; else with ``seed=None`` ``n_views`` azimuths evenly spaced from 45
    degrees at ``elevation``; else random azimuths in [0, 360) and elevations in ``elevation_range``
    drawn from ``numpy.random.default_rng(seed)``.

    Returns
    -------
    images : list of (size, size, 4) uint8
    cameras : list of dict
      ``azimuth``, ``elevation``, ``distance``, ``fov`` (degrees), ``size`` (pixels), ``cam_to_world``
      ((4, 4) nested list, OpenGL axes) and ``intrinsics`` (``fx, fy, cx, cy`` in pixels, pixel
      centres at half-integers, y down): JSON-serialisable.
    """
    if azimuths is not None:
        az = [float(a) for a in azimuths]
        el = list(np.broadcast_to(np.asarray(elevation, dtype=np.float64), (len(az),)))
    elif seed is None:
        az = [45.0 + 360.0 * k / n_views for k in range(n_views)]
        el = list(np.broadcast_to(np.asarray(elevation, dtype=np.float64), (n_views,)))
    else:
        rng = np.random.default_rng(seed)
        az = list(rng.uniform(0.0, 360.0, n_views))
        el = list(rng.uniform(elevation_range[0], elevation_range[1], n_views))
    distance = default_distance(fov) if distance is None else float(distance)
    renderer = MeshRenderer(vertices, faces)
    images, cameras = [], []
    focal = size / (2.0 * math.tan(math.radians(fov) / 2.0))
    for a, e in zip(az, el):
        images.append(
            renderer.render(size=size, azimuth=a, elevation=float(e), distance=distance, fov=fov, **kwargs)
        )
        cameras.append({
            "azimuth": float(a), "elevation": float(e), "distance": distance, "fov": fov, "size": size,
            "cam_to_world": look_at(a, float(e), distance, kwargs.get("target", (0.0, 0.0, 0.0))).tolist(),
            "intrinsics": {"fx": focal, "fy": focal, "cx": size / 2.0, "cy": size / 2.0},
        })
    return images, cameras


def image_grid(
    images: Sequence[np.ndarray],
    ncols: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    pad: int = 4,
    background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Tile images into one RGB picture, with an optional text label under each tile.

    Parameters
    ----------
    images : sequence of (H, W, 3 or 4) uint8
      All the same size; RGBA tiles are composited over ``background``.
    ncols : int, optional
      Columns (default: ceil(sqrt(n))).
    labels : sequence of str, optional
      One per image, drawn with PIL's default font.

    Returns
    -------
    grid : (rows * (H + label + pad) + pad, ncols * (W + pad) + pad, 3) uint8
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    h, w = images[0].shape[:2]
    for im in images:
        if im.shape[:2] != (h, w) or im.ndim != 3 or im.shape[2] not in (3, 4):
            raise ValueError(f"all images must be (H, W, 3|4) of the same size, got {im.shape} and {(h, w)}")
    n = len(images)
    ncols = int(ncols or math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    font = None
    label_h = 0
    if labels is not None:
        try:
            font = ImageFont.load_default(size=max(10, h // 14))
        except TypeError:  # Pillow < 10.1: bitmap font without sizes
            font = ImageFont.load_default()
        label_h = int(max(10, h // 14) * 1.5)
    bg = np.asarray(background, dtype=np.float64).reshape(3)
    canvas_size = (ncols * (w + pad) + pad, nrows * (h + label_h + pad) + pad)
    canvas = Image.new("RGB", canvas_size, tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        tile = im[..., :3].astype(np.float64)
        if im.shape[2] == 4:
            a = im[..., 3:4].astype(np.float64) / 255.0
            tile = tile * a + bg * (1.0 - a)
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), pad + r * (h + label_h + pad)
        canvas.paste(Image.fromarray(np.round(tile).astype(np.uint8)), (x, y))
        if labels is not None:
            draw.text((x + 2, y + h + 1), str(labels[i]), fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def render_preview(
    vertices: np.ndarray, faces: np.ndarray, n_views: int = 4, size: int = 192, **kwargs
) -> np.ndarray:
    """Evenly spaced views of one mesh tiled in a row: (H, n_views * W, 3) uint8 preview picture."""
    images, _ = render_views(vertices, faces, n_views, size, **kwargs)
    return image_grid(images, ncols=n_views)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 image as PNG, atomically."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise ValueError(f"save_png expects a uint8 (H, W[, 3|4]) image, got {img.dtype} {img.shape}")
    with fileio.atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _primary_rays(
    cam: np.ndarray, width: int, height: int, fov: float, s: int
) -> tuple[np.ndarray, np.ndarray]:
    """Origins and unit directions of ``s x s`` rays per pixel, ordered (row, sub-row, col, sub-col)."""
    tan = math.tan(math.radians(fov) / 2.0)
    aspect = width / height
    sub = (np.arange(s) + 0.5) / s
    cols = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)  # (w * s,)
    rows = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)  # (h * s,)
    x = (2.0 * cols / width - 1.0) * tan * aspect
    y = (1.0 - 2.0 * rows / height) * tan
    xx, yy = np.meshgrid(x.astype(np.float32), y.astype(np.float32))  # (h * s, w * s), rows first
    inv = 1.0 / np.sqrt(xx * xx + yy * yy + 1.0)  # |(x, y, -1)|^-1
    right, up, back = (cam[:3, i].astype(np.float32) for i in range(3))
    dirs = np.empty(xx.shape + (3,), dtype=np.float32)
    for k in range(3):  # world direction = x * right + y * up - back, normalised
        dirs[..., k] = (xx * right[k] + yy * up[k] - back[k]) * inv
    dirs = dirs.reshape(-1, 3).astype(np.float64)
    origins = np.broadcast_to(cam[:3, 3], dirs.shape)
    return origins, dirs


def _normalize(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _safe(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) > 1e-12, x, 1e-12)
