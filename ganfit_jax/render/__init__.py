"""Differentiable renderer of GANFIT (Gecer et al., CVPR 2019, Sec. 3.2), pure JAX.

Primitives, composable on their own (nvdiffrast-style), plus one entry point:

  rasterize      visibility: nearest triangle per pixel (z-buffer), no gradient
  barycentrics   perspective-correct barycentrics recomputed differentiably
  interpolate    per-vertex attributes → per-pixel
  sample_texture bilinear UV-map lookup, OBJ convention (row = (1 − v)·H)
  phong          point light + ambient, diffuse and specular
  render         all of the above: (image, aux)
  geometry_maps  depth and normal per pixel (a G-buffer), NaN off the mesh
  shape_shading  grey shading of those normals: the shape without its texture
  antialias      silhouettes blended analytically, so outlines carry gradients (nvdiffrast's)
"""

from ganfit_jax.render.silhouette import antialias, antialias_with_coverage, edge_neighbours
from ganfit_jax.render.mesh_utils import subdivide
from ganfit_jax.render.raster import DEFAULT_NEAR, barycentrics, rasterize
from ganfit_jax.render.shading import (DEFAULT_SHININESS, DEFAULT_SPECULAR, SHAPE_LIGHT,
                                       geometry_maps,
                                       interpolate, phong, render, sample_texture,
                                       shape_shading, vertex_normals)

__all__ = ["rasterize", "barycentrics", "interpolate", "sample_texture", "phong", "render",
           "vertex_normals", "antialias", "antialias_with_coverage", "edge_neighbours",
           "geometry_maps", "shape_shading", "subdivide", "DEFAULT_NEAR", "DEFAULT_SPECULAR",
           "DEFAULT_SHININESS", "SHAPE_LIGHT"]
