"""Interpolation, UV texturing and Phong shading: the differentiable half of the renderer.

GANFIT (Gecer et al., CVPR 2019), Sec. 3.2: the rendered image I_R is the textured mesh lit by a
point light with Phong reflection, p_l = [x_l, y_l, z_l, r_l, g_l, b_l, r_a, g_a, b_a] (light
position, light colour, ambient colour); per-vertex colours are sampled from the GAN's UV map,
P(I_UV, t_coord).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ganfit_jax import camera as camera_lib
from ganfit_jax.morphable import vertex_normals
from ganfit_jax.render import raster as rasterize_lib

DEFAULT_SPECULAR = 0.2
DEFAULT_SHININESS = 16.0
_EPS = 1e-12


def interpolate(attributes, triangles, triangle_ids, bary):
    """Barycentric interpolation of per-vertex attributes (N,C) → (H,W,C); zero on background."""
    corners = jnp.asarray(triangles)[jnp.maximum(triangle_ids, 0)]  # (H,W,3)
    return _interpolate_corners(attributes, corners, bary)


def _interpolate_corners(attributes, corners, bary):
    # Multiply-and-sum rather than einsum: XLA:CPU lowers the per-pixel 3×C contraction to a
    # batched matmul of tiny matrices, several times slower than the fused elementwise form.
    gathered = jnp.asarray(attributes)[corners]  # (H,W,3,C)
    return (gathered[..., 0, :] * bary[..., 0:1] + gathered[..., 1, :] * bary[..., 1:2]
            + gathered[..., 2, :] * bary[..., 2:3])


def sample_texture(uv_map, uv):
    """Bilinear lookup P(I_UV, t) of a UV map (Ht,Wt,C) at texture coordinates uv (...,2).

    OBJ convention (v up): texel column = u·Wt, row = (1 − v)·Ht, texel centres at +0.5;
    coordinates outside [0,1] clamp to the border texels. Differentiable in the map and in uv.
    """
    uv_map = jnp.asarray(uv_map)
    uv = jnp.asarray(uv)
    if uv_map.ndim != 3 or uv.shape[-1] != 2:
        raise ValueError(f"sample_texture: expected uv_map (H,W,C) and uv (...,2), got "
                         f"{uv_map.shape} and {uv.shape}")
    th, tw = uv_map.shape[:2]
    x = jnp.clip(uv[..., 0] * tw - 0.5, 0.0, tw - 1.0)
    y = jnp.clip((1.0 - uv[..., 1]) * th - 0.5, 0.0, th - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, max(tw - 2, 0))
    y0 = jnp.clip(jnp.floor(y), 0, max(th - 2, 0))
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    # Each texel carries its 2×2 neighbourhood, so one gather (and, in the backward pass, one
    # scatter-add) replaces four; edge-padded so that the last row/column repeat themselves.
    padded = jnp.pad(uv_map, ((0, 1), (0, 1), (0, 0)), mode="edge")
    quad = jnp.concatenate([padded[:-1, :-1], padded[:-1, 1:], padded[1:, :-1], padded[1:, 1:]],
                           axis=-1).reshape(th * tw, 4, -1)
    texels = quad[y0.astype(jnp.int32) * tw + x0.astype(jnp.int32)]  # (...,4,C)
    top = texels[..., 0, :] * (1 - fx) + texels[..., 1, :] * fx
    bottom = texels[..., 2, :] * (1 - fx) + texels[..., 3, :] * fx
    return top * (1 - fy) + bottom * fy


def _safe_normalise(v):
    # sqrt of a clamped squared norm: the gradient of |v| at v = 0 would be NaN.
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), _EPS))


def phong(albedo, normals, positions, eye, light, specular=DEFAULT_SPECULAR,
          shininess=DEFAULT_SHININESS):
    """Phong reflection with one point light and an ambient term (GANFIT Sec. 3.2).

      I = albedo ⊙ (c_a + c_l · max(0, n·l)) + k_s · c_l · max(0, r·v)^α,   r = 2(n·l)n − l

    Args:
      albedo: (...,3) surface colour; normals: (...,3) (normalised here); positions: (...,3)
        world positions; eye: (3,) camera position; light: (9,) [x_l, y_l, z_l (world position),
        r_l, g_l, b_l (light colour), r_a, g_a, b_a (ambient colour)].
      specular: k_s, the strength of the (white, untextured) highlight; default 0.2.
      shininess: α, the Phong exponent; default 16.

    Returns:
      (...,3) shaded colour (not clipped).
    """
    light = jnp.asarray(light)
    if light.shape[-1] != 9:
        raise ValueError(f"light: expected [x_l,y_l,z_l, r_l,g_l,b_l, r_a,g_a,b_a] (9 values), "
                         f"got shape {light.shape}")
    n = _safe_normalise(normals)
    l = _safe_normalise(light[0:3] - positions)
    v = _safe_normalise(jnp.asarray(eye) - positions)
    n_dot_l = jnp.sum(n * l, axis=-1, keepdims=True)
    diffuse = jnp.maximum(n_dot_l, 0.0)
    r = 2.0 * n_dot_l * n - l
    r_dot_v = jnp.sum(r * v, axis=-1, keepdims=True)
    lit = r_dot_v > 0
    # power only of positive bases: the gradient of x^α at x <= 0 may be NaN for non-integer α.
    base = jnp.where(lit, r_dot_v, 1.0)
    if isinstance(shininess, (int, float)) and float(shininess).is_integer():
        power = jax.lax.integer_pow(base, int(shininess))  # multiplications, not exp(α·log x)
    else:
        power = jnp.power(base, shininess)
    highlight = jnp.where(lit, power, 0.0)
    highlight = jnp.where(n_dot_l > 0, highlight, 0.0)
    return albedo * (light[6:9] + light[3:6] * diffuse) + specular * light[3:6] * highlight


def render(vertices, triangles, uv, colours_or_texture, camera, light, image_size,
           background=None, specular=DEFAULT_SPECULAR, shininess=DEFAULT_SHININESS,
           texture_sampling="pixel", near=rasterize_lib.DEFAULT_NEAR, chunk_size=None):
    """Renders a mesh with Phong shading: the rendering function R of GANFIT Sec. 3.2.

    Args:
      vertices: (N,3) world positions (mm).
      triangles: (F,3) int vertex indices.
      uv: (N,2) texture coordinates (OBJ convention, v up); used only with a UV map.
      colours_or_texture: (N,3) per-vertex colours, or (Ht,Wt,3) a UV map.
      camera: (7,) or (8,) camera of `ganfit_jax.camera`.
      light: (9,) [x_l,y_l,z_l, r_l,g_l,b_l, r_a,g_a,b_a]; the position is in world coordinates.
      image_size: int or (height, width) (static under jit).
      background: None (black), a scalar, an RGB (3,) or an image (H,W,3) shown where no triangle
        covers a pixel.
      specular, shininess: Phong k_s and α, see `phong`.
      texture_sampling: with a UV map, "pixel" looks the map up at every pixel through the
        interpolated UV (sharp on coarse meshes such as the 3448-vertex SFM); "vertex" samples it
        at the vertices and interpolates the colours, the paper's P(I_UV, t_coord).
      near: triangles with a vertex at depth <= near are culled (see `rasterize`).
      chunk_size: fragment chunk of the z-buffer (static), see `rasterize`.

    Returns:
      image: (H,W,3) float32, not clipped to [0,1].
      aux: dict with triangle_ids (H,W) int32 (-1 background), mask (H,W) float32 (1 where a
        triangle is visible), depth (H,W) perspective-correct depth (0 on background,
        differentiable), bary (H,W,3) barycentrics.
    """
    vertices = jnp.asarray(vertices)
    triangles = jnp.asarray(triangles, jnp.int32)
    colours_or_texture = jnp.asarray(colours_or_texture)
    height, width = camera_lib.image_hw(image_size)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices: expected (N,3), got {vertices.shape}")
    num_vertices = vertices.shape[0]
    if colours_or_texture.ndim == 2:
        if colours_or_texture.shape != (num_vertices, 3):
            raise ValueError(f"colours_or_texture: per-vertex colours must be ({num_vertices},3), "
                             f"got {colours_or_texture.shape}")
    elif colours_or_texture.ndim != 3 or colours_or_texture.shape[-1] != 3:
        raise ValueError(f"colours_or_texture: expected (N,3) colours or an (H,W,3) UV map, got "
                         f"{colours_or_texture.shape}")
    if texture_sampling not in ("pixel", "vertex"):
        raise ValueError(f"texture_sampling: expected 'pixel' or 'vertex', got {texture_sampling!r}")

    pixels, depth = camera_lib.project(camera, vertices, (height, width))
    triangle_ids, _ = rasterize_lib.rasterize(pixels, depth, triangles, (height, width),
                                              near=near, chunk_size=chunk_size)
    mask = triangle_ids >= 0
    corners = triangles[jnp.maximum(triangle_ids, 0)]
    bary = rasterize_lib._barycentrics_from_corners(pixels, depth, corners, mask)

    normals = vertex_normals(vertices, triangles)
    if colours_or_texture.ndim == 2:
        per_vertex = colours_or_texture
    elif texture_sampling == "vertex":
        per_vertex = sample_texture(colours_or_texture, uv)
    else:
        per_vertex = None
    stacked = [vertices, normals] + ([per_vertex] if per_vertex is not None else [])
    attributes = _interpolate_corners(jnp.concatenate(stacked, axis=1), corners, bary)
    positions, pixel_normals = attributes[..., 0:3], attributes[..., 3:6]
    if per_vertex is not None:
        albedo = attributes[..., 6:9]
    else:
        pixel_uv = _interpolate_corners(jnp.asarray(uv), corners, bary)
        albedo = sample_texture(colours_or_texture, pixel_uv)

    eye = jnp.asarray(camera)[0:3]
    shaded = phong(albedo, pixel_normals, positions, eye, light, specular, shininess)
    mask_f = mask.astype(shaded.dtype)
    if background is None:
        background = jnp.zeros((), shaded.dtype)
    background = jnp.asarray(background, shaded.dtype)
    if background.ndim == 3 and background.shape != (height, width, 3):
        raise ValueError(f"background: an image must be ({height},{width},3), "
                         f"got {background.shape}")
    image = jnp.where(mask[..., None], shaded, background)
    # Depth of the visible surface from the same barycentrics: 1 / sum_i (b_i / z_i) in screen
    # space equals the perspective-correct interpolation sum_i b'_i z_i.
    pixel_depth = jnp.where(mask, jnp.sum(depth[corners] * bary, axis=-1), 0.0)
    aux = dict(triangle_ids=triangle_ids, mask=mask_f, depth=pixel_depth, bary=bary)
    return image, aux
