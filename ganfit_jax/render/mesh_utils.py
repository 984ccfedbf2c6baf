"""Mesh helpers for the renderer's tests and benchmarks (NumPy, not traced)."""

from __future__ import annotations

import numpy as np


def subdivide(vertices, triangles, uv=None):
    """One step of midpoint subdivision: every triangle becomes four.

    Each edge gets one new vertex at its midpoint (shared by the two triangles of the edge), so
    the surface is unchanged and the triangle count quadruples: the SFM's 6736 triangles become
    26,944 after one step and 107,776 after two (the density of BFM/LSFM-class models).

    Args:
      vertices: (N,3) positions; triangles: (F,3) int indices; uv: optional (N,2), or any
        (N,C) per-vertex attribute, interpolated at the midpoints like the positions.

    Returns:
      (vertices (N+E,3), triangles (4F,3) int32, uv (N+E,C) or None), E the number of edges.
      Triangle k's children are 4k..4k+3 and keep its orientation.
    """
    vertices = np.asarray(vertices)
    triangles = np.asarray(triangles, np.int64)
    if triangles.ndim != 2 or triangles.shape[1] != 3:
        raise ValueError(f"subdivide: triangles must be (F,3), got {triangles.shape}")
    if vertices.ndim != 2:
        raise ValueError(f"subdivide: vertices must be (N,3), got {vertices.shape}")
    n = vertices.shape[0]
    if triangles.size and (triangles.min() < 0 or triangles.max() >= n):
        raise ValueError(f"subdivide: triangle indices must lie in [0,{n})")
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    keys = np.sort(edges, axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(3, -1)
    mid = n + inverse  # (3,F): midpoint vertex of edges 01, 12, 20
    a, b, c = triangles.T
    m01, m12, m20 = mid
    new_triangles = np.stack([np.stack([a, m01, m20], 1), np.stack([m01, b, m12], 1),
                              np.stack([m20, m12, c], 1), np.stack([m01, m12, m20], 1)], axis=1)
    new_triangles = new_triangles.reshape(-1, 3).astype(np.int32)

    def _midpoints(values):
        values = np.asarray(values)
        return np.concatenate([values, 0.5 * (values[unique[:, 0]] + values[unique[:, 1]])])

    return (_midpoints(vertices).astype(vertices.dtype), new_triangles,
            None if uv is None else _midpoints(uv).astype(np.asarray(uv).dtype))
