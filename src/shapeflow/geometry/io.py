"""Mesh input and output through trimesh.

Reading flattens every format to one triangle soup ``(vertices (n, 3) float64, faces (f, 3) int64)``:
scenes (GLB/GLTF, multi-object OBJ) are concatenated with each node's world transform applied;
points, lines and other non-triangle geometry are dropped. Nothing is repaired here: repair is the
watertight converter's job, and garbage in the input (duplicate faces, soups, open borders) is kept.

Errors are one line naming the file and the problem (:class:`MeshError`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh

from shapeflow import fileio

MESH_EXTENSIONS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
"""File extensions :func:`load_mesh` reads (case-insensitive)."""

EXPORT_EXTENSIONS = (".glb", ".obj", ".ply")
"""File extensions :func:`save_mesh` writes."""


class MeshError(ValueError):
    """A mesh file that cannot be used; the message is one line naming the file and the reason."""


def load_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh file into one triangle soup.

    Returns
    -------
    vertices : (n, 3) float64
    faces : (f, 3) int64
      Triangles; quads and polygons are triangulated by trimesh.

    Raises
    ------
    MeshError
      Missing, unreadable or corrupt file, unsupported extension, or no triangles in it.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"{path}: unsupported mesh format {ext!r} (expected one of {', '.join(MESH_EXTENSIONS)})")
    if not path.is_file():
        raise MeshError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MeshError(f"{path}: empty file")
    try:
        loaded = trimesh.load(str(path), force=None, process=False, maintain_order=True)
    except Exception as e:  # trimesh raises many types for corrupt files
        raise MeshError(f"{path}: cannot parse {ext[1:].upper()} ({type(e).__name__}: {_one_line(e)})") from None
    meshes = _triangle_meshes(loaded)
    if not meshes:
        raise MeshError(f"{path}: no triangles in file")
    vertices = np.concatenate([np.asarray(m.vertices, dtype=np.float64) for m in meshes])
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    faces = np.concatenate([np.asarray(m.faces, dtype=np.int64) + o for m, o in zip(meshes, offsets)])
    if len(faces) == 0:
        raise MeshError(f"{path}: no triangles in file")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(f"{path}: face indices out of range")
    return vertices, faces


def _triangle_meshes(loaded) -> list[trimesh.Trimesh]:
    if isinstance(loaded, trimesh.Trimesh):
        return [loaded] if len(loaded.faces) else []
    if isinstance(loaded, trimesh.Scene):
        out = []
        for node in loaded.graph.nodes_geometry:
            transform, name = loaded.graph[node]
            geom = loaded.geometry.get(name)
            if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
                m = geom.copy()
                m.apply_transform(transform)
                out.append(m)
        return out
    return []


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else "no details"


def save_mesh(path: str | os.PathLike, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Write a triangle mesh atomically; the format follows the extension (GLB, OBJ or PLY).

    Parameters
    ----------
    vertices : (n, 3) float
    faces : (f, 3) int
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in EXPORT_EXTENSIONS:
        raise ValueError(f"{path}: cannot write {ext!r}; expected one of {', '.join(EXPORT_EXTENSIONS)}")
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    with fileio.atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type=ext[1:])
