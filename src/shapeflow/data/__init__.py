"""Preprocessing of raw meshes into training samples, and torch datasets over the result."""
