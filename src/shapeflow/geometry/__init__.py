"""Torch-free geometry: numpy/trimesh functions on (vertices, faces) arrays."""
