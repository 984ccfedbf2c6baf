"""Interpolation, UV texturing and Phong shading: the differentiable half of the renderer.

GANFIT (Gecer et al., CVPR 2019), Sec. 3.2: the rendered image I_R is the textured mesh lit by a
point light with Phong reflection, p_l = [x_l, y_l, z_l, r_l, g_l, b_l, r_a, g_a, b_a] (light
position, light colour, ambient colour); per-vertex colours are sampled from the GAN's UV map,
P(I_UV, t_coord).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ganfit_jax import camera as camera_lib
from ganfit_jax.morphable import vertex_normals
from ganfit_jax.render.silhouette import antialias_with_coverage
from ganfit_jax.render import raster as rasterize_lib
from ganfit_jax.stored import stored

DEFAULT_SPECULAR = 0.2
DEFAULT_SHININESS = 16.0
_EPS = 1e-12


def interpolate(attributes, triangles, triangle_ids, bary):
    """Barycentric interpolation of per-vertex attributes (N,C) → (H,W,C); zero on background."""
    corners = rasterize_lib.corner_ids(triangles, triangle_ids)
    planes = tuple(bary[..., k] for k in range(3))
    return jnp.moveaxis(interpolate_planar(attributes, corners, planes), 0, -1)


def interpolate_planar(attributes, corners, bary):
    """Interpolation from per-pixel corner ids and barycentrics as (H,W) planes → (C,H,W)."""
    # One row gather per corner (its backward pass is one scatter-add of C-vectors), then
    # channel-first planes for the per-pixel arithmetic (see raster.barycentrics_planar).
    attributes = jnp.asarray(attributes)
    out = sum(attributes[c] * b[..., None] for c, b in zip(corners, bary))
    return jnp.moveaxis(out, -1, 0)


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
    return jnp.moveaxis(sample_texture_planar(uv_map, uv[..., 0], uv[..., 1]), 0, -1)


def sample_texture_planar(uv_map, u, v):
    """`sample_texture` with u and v as separate arrays (...), returning (C,...)."""
    return _bilinear(uv_map, u, v)


def _texel_coordinates(shape, u, v):
    th, tw = shape[:2]
    x = u * tw - 0.5
    y = (1.0 - v) * th - 0.5
    inside_x = (x > 0) & (x < tw - 1)  # where the clamp below passes the gradient
    inside_y = (y > 0) & (y < th - 1)
    x = jnp.clip(x, 0.0, tw - 1.0)
    y = jnp.clip(y, 0.0, th - 1.0)
    x0 = jnp.clip(jnp.floor(x), 0, max(tw - 2, 0))
    y0 = jnp.clip(jnp.floor(y), 0, max(th - 2, 0))
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    x1, y1 = jnp.minimum(x0 + 1, tw - 1), jnp.minimum(y0 + 1, th - 1)
    index = (y0 * tw + x0, y0 * tw + x1, y1 * tw + x0, y1 * tw + x1)
    return index, fx, fy, inside_x, inside_y


def _gather_texels(uv_map, index):
    # Row gathers from the flat map (one per corner), then channel-first planes.
    flat = uv_map.reshape(-1, uv_map.shape[-1])
    return [jnp.moveaxis(flat[i], -1, 0) for i in index]


def _bilinear_forward(uv_map, u, v):
    index, fx, fy, inside_x, inside_y = _texel_coordinates(uv_map.shape, u, v)
    t00, t01, t10, t11 = _gather_texels(uv_map, index)
    top = t00 + (t01 - t00) * fx
    bottom = t10 + (t11 - t10) * fx
    out = top + (bottom - top) * fy
    return out, (uv_map, index, fx, fy, inside_x, inside_y, u, v)


@jax.custom_vjp
def _bilinear(uv_map, u, v):
    return _bilinear_forward(uv_map, u, v)[0]


def _bilinear_backward(residuals, g):
    # Hand-written: autodiff of the forward re-derives the texel differences through every
    # gather and measured 3-4× slower than this on XLA:CPU.
    uv_map, index, fx, fy, inside_x, inside_y, u, v = residuals
    th, tw, channels = uv_map.shape
    t00, t01, t10, t11 = _gather_texels(uv_map, index)
    d_fx = jnp.sum(g * ((t01 - t00) * (1 - fy) + (t11 - t10) * fy), axis=0)
    d_fy = jnp.sum(g * ((t10 - t00) * (1 - fx) + (t11 - t01) * fx), axis=0)
    d_u = jnp.where(inside_x, d_fx * tw, 0.0).astype(u.dtype)
    d_v = jnp.where(inside_y, -d_fy * th, 0.0).astype(v.dtype)
    weights = ((1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy)
    d_flat = jnp.zeros((th * tw, channels), g.dtype)
    for i, w in zip(index, weights):
        # rows stacked from the planes, not moveaxis (see raster.gather_planes' backward pass)
        d_flat = d_flat.at[i].add(jnp.stack([g[c] * w for c in range(channels)], axis=-1))
    return d_flat.reshape(uv_map.shape).astype(uv_map.dtype), d_u, d_v


_bilinear.defvjp(_bilinear_forward, _bilinear_backward)


def phong(albedo, normals, positions, eye, light, specular=DEFAULT_SPECULAR,
          shininess=DEFAULT_SHININESS):
    """Phong reflection with one point light and an ambient term (GANFIT Sec. 3.2).

      I = albedo ⊙ (c_a + c_l · max(0, n·l)) + k_s · c_l · max(0, r·v)^α,   r = 2(n·l)n − l

    with l, v the unit vectors to the light and to the eye; no highlight where n·l <= 0.

    Args:
      albedo: (...,3) surface colour; normals: (...,3) (normalised here); positions: (...,3)
        world positions; eye: (3,) camera position; light: (9,) [x_l, y_l, z_l (world position),
        r_l, g_l, b_l (light colour), r_a, g_a, b_a (ambient colour)].
      specular: k_s, the strength of the (white, untextured) highlight; default 0.2.
      shininess: α, the Phong exponent; default 16.

    Returns:
      (...,3) shaded colour (not clipped).
    """
    planes = lambda a: tuple(jnp.asarray(a)[..., i] for i in range(3))
    out = phong_planar(planes(albedo), planes(normals), planes(positions), eye, light, specular,
                       shininess)
    return jnp.stack(out, axis=-1)


def phong_planar(albedo, normals, positions, eye, light, specular=DEFAULT_SPECULAR,
                 shininess=DEFAULT_SHININESS):
    """`phong` on per-channel planes: each argument a 3-tuple of (...) arrays; returns a 3-tuple.

    Planes, not (...,3) arrays: XLA:CPU vectorises a size-3 minor dimension poorly; this form
    measured 4× faster backward and 5× forward. With k_s and α given as numbers (the renderer's
    case) the backward pass is written by hand (`_phong_vjp`); traced k_s or α, e.g. to fit
    them, take autodiff's.
    """
    light = jnp.asarray(light)
    eye = jnp.asarray(eye)
    if light.shape != (9,):
        raise ValueError(f"light: expected [x_l,y_l,z_l, r_l,g_l,b_l, r_a,g_a,b_a] (9 values), "
                         f"got shape {light.shape}")
    planes = lambda xs: tuple(jnp.asarray(x) for x in xs)
    args = (planes(albedo), planes(normals), planes(positions), eye, light)
    if all(isinstance(a, (int, float)) and not isinstance(a, bool)
           for a in (specular, shininess)):
        return _phong_vjp(float(specular), float(shininess), *args)
    return _phong_terms(*args, specular, shininess)[0]


def _phong_terms(albedo, normals, positions, eye, light, specular, shininess):
    """The shaded planes and the per-pixel terms the hand-written backward pass reuses."""
    n, n_scale = _unit_and_scale(normals)
    l, l_scale = _unit_and_scale(tuple(light[i] - positions[i] for i in range(3)))
    v, v_scale = _unit_and_scale(tuple(eye[i] - positions[i] for i in range(3)))
    n_dot_l = _dot3(n, l)
    n_dot_v = _dot3(n, v)
    # r·v with r = 2(n·l)n − l, without forming r
    r_dot_v = 2.0 * n_dot_l * n_dot_v - _dot3(l, v)
    lit = (r_dot_v > 0) & (n_dot_l > 0)
    # Powers only of positive bases: the gradient of x^α at x <= 0 may be NaN for non-integer α.
    base = jnp.where(lit, r_dot_v, 1.0)
    power_less_one = _power(base, shininess - 1)  # r·v^(α−1), reused by the derivative
    highlight = specular * jnp.where(lit, power_less_one * base, 0.0)
    diffuse = jnp.maximum(n_dot_l, 0.0)
    shaded = tuple(albedo[i] * (light[6 + i] + light[3 + i] * diffuse) + light[3 + i] * highlight
                   for i in range(3))
    terms = dict(n=n, n_scale=n_scale, l=l, l_scale=l_scale, v=v, v_scale=v_scale,
                 n_dot_l=n_dot_l, n_dot_v=n_dot_v, lit=lit, power_less_one=power_less_one,
                 highlight=highlight, diffuse=diffuse)
    return shaded, terms


def _unit_and_scale(x):
    # rsqrt of a clamped squared norm: the gradient of |v| at v = 0 would be NaN.
    squared = x[0] * x[0] + x[1] * x[1] + x[2] * x[2]
    scale = jax.lax.rsqrt(jnp.maximum(squared, _EPS))
    return tuple(c * scale for c in x), (scale, squared > _EPS)


def _dot3(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _power(x, exponent):
    if isinstance(exponent, (int, float)) and float(exponent).is_integer():
        return jax.lax.integer_pow(x, int(exponent))  # multiplications, not exp(α·log x)
    return jnp.power(x, exponent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _phong_vjp(specular, shininess, albedo, normals, positions, eye, light):
    return _phong_terms(albedo, normals, positions, eye, light, specular, shininess)[0]


def _phong_vjp_forward(specular, shininess, albedo, normals, positions, eye, light):
    # The per-pixel terms are residuals, not recomputed by the backward pass: the cpu-small
    # photo view on one core 29.6 -> 29.2 ms (5 of 5 interleaved rounds).
    out, terms = _phong_terms(albedo, normals, positions, eye, light, specular, shininess)
    return out, (albedo, normals, positions, eye, light, terms)


def _phong_vjp_backward(specular, shininess, residuals, g):
    # Autodiff's backward pass of `_phong_terms` re-derives the unit vectors and dot products
    # inside each of its ~20 output fusions; written once here, the shading's forward+backward
    # on 25,088 pixels took 1.47 → 0.71 ms on one core of the 2-core dev machine (with the
    # forward terms recomputed; they are now residuals).
    albedo, normals, positions, eye, light, t = residuals
    # The incoming cotangent and the three dot products' cotangents are each read by six or
    # more of the fusions below; stored once (`stored`), not re-gathered and re-derived in each:
    # the cpu-small photo view on one core 28.9 -> 28.3 ms (median of 7 interleaved rounds).
    g = tuple(stored(jnp.stack(g)))
    colour, ambient = light[3:6], light[6:9]
    d_albedo = tuple(g[i] * (ambient[i] + colour[i] * t["diffuse"]) for i in range(3))
    d_ambient = [jnp.sum(g[i] * albedo[i]) for i in range(3)]
    d_colour = [jnp.sum(g[i] * (albedo[i] * t["diffuse"] + t["highlight"])) for i in range(3)]
    d_diffuse = sum(g[i] * albedo[i] * colour[i] for i in range(3))
    d_highlight = sum(g[i] * colour[i] for i in range(3))
    d_r_dot_v = jnp.where(t["lit"], d_highlight * (specular * shininess) * t["power_less_one"],
                          0.0)
    d_n_dot_l = jnp.where(t["n_dot_l"] > 0, d_diffuse, 0.0) + 2.0 * t["n_dot_v"] * d_r_dot_v
    d_n_dot_v = 2.0 * t["n_dot_l"] * d_r_dot_v
    d_n_dot_l, d_n_dot_v, d_l_dot_v = tuple(stored(jnp.stack([d_n_dot_l, d_n_dot_v,
                                                              -d_r_dot_v])))
    n, l, v = t["n"], t["l"], t["v"]
    d_n = tuple(d_n_dot_l * l[i] + d_n_dot_v * v[i] for i in range(3))
    d_l = tuple(d_n_dot_l * n[i] + d_l_dot_v * v[i] for i in range(3))
    d_v = tuple(d_n_dot_v * n[i] + d_l_dot_v * l[i] for i in range(3))
    d_normals = _unit_backward(n, t["n_scale"], d_n)
    d_to_light = _unit_backward(l, t["l_scale"], d_l)
    d_to_eye = _unit_backward(v, t["v_scale"], d_v)
    d_positions = tuple(-(a + b) for a, b in zip(d_to_light, d_to_eye))
    d_eye = jnp.stack([jnp.sum(d) for d in d_to_eye]).astype(eye.dtype)
    d_light = jnp.stack([jnp.sum(d) for d in d_to_light] + d_colour + d_ambient).astype(light.dtype)
    cast = lambda ds, xs: tuple(_sum_to(d, x) for d, x in zip(ds, xs))
    return (cast(d_albedo, albedo), cast(d_normals, normals), cast(d_positions, positions),
            d_eye, d_light)


def _sum_to(d, x):
    """d summed over the axes along which x was broadcast, in x's dtype."""
    lead = d.ndim - x.ndim
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(x.shape)
                                      if n == 1 and d.shape[lead + i] != 1)
    return jnp.sum(d, axis=axes).reshape(x.shape).astype(x.dtype) if axes else d.astype(x.dtype)


def _unit_backward(unit, scale, d_unit):
    """The cotangent of x from that of u = x / |x| (with |x|² clamped below at _EPS: where the
    clamp holds, u = x / sqrt(_EPS) is linear in x)."""
    s, unclamped = scale
    along = jnp.where(unclamped, _dot3(unit, d_unit), 0.0)
    return tuple(s * (d_unit[i] - unit[i] * along) for i in range(3))


_phong_vjp.defvjp(_phong_vjp_forward, _phong_vjp_backward)


def _shade_pixels(pixels, depth, triangles, attributes, uv_map, eye, light, specular, shininess,
                  triangle_ids, pixel_centres):
    """Barycentrics, interpolation, texturing and Phong for pixel arrays of any shape (the (H,W)
    grid or a compacted list): (shaded colour 3-tuple, depth, barycentrics 3-tuple)."""
    mask = triangle_ids >= 0
    corners = rasterize_lib.corner_ids(triangles, triangle_ids)
    bary = rasterize_lib.barycentrics_planar(pixels, depth, corners, mask, pixel_centres)
    # Phong's hand-written backward pass reads positions, normals and albedo in each of its
    # fusions: stored once, not re-interpolated and re-sampled in each (the cpu-small photo
    # view on one core 31.4 -> 30.1 ms, 5 interleaved rounds).
    planes = stored(interpolate_planar(attributes, corners, bary))  # (C,...)
    positions, pixel_normals = planes[0:3], planes[3:6]
    # Depth of the visible surface: sum_i b'_i z_i with the perspective-correct b'.
    pixel_depth = jnp.where(mask, planes[6], 0.0)
    if uv_map is None:
        albedo = planes[7:10]
    else:
        albedo = stored(sample_texture_planar(uv_map, planes[7], planes[8]))
    shaded = phong_planar(tuple(albedo), tuple(pixel_normals), tuple(positions), eye, light,
                          specular, shininess)
    return shaded, pixel_depth, bary


def _covered_index(triangle_ids, budget):
    """The flat indices of the covered pixels in raster order, the first `budget`, padded with
    H·W: `jnp.nonzero(triangle_ids.ravel() >= 0, size=budget, fill_value=H·W)` with one prefix
    sum along rows instead of two over the whole grid (0.37 -> 0.24 ms at 224², one core)."""
    height, width = triangle_ids.shape
    covered = triangle_ids >= 0
    within_row = jnp.cumsum(covered.astype(jnp.int32), axis=1)
    row_start = jnp.cumsum(within_row[:, -1]) - within_row[:, -1]
    slot = jnp.where(covered, within_row + row_start[:, None] - 1, budget).reshape(-1)
    pixels = jnp.arange(height * width, dtype=jnp.int32)
    return jnp.full((budget,), height * width, jnp.int32).at[slot].set(pixels, mode="drop")


def _shade_covered(shade, triangle_ids, background, budget):
    """`shade` on the (at most `budget`) covered pixels only, scattered back into the grid."""
    height, width = triangle_ids.shape
    flat_ids = triangle_ids.reshape(-1)
    index = _covered_index(triangle_ids, budget)
    ids = flat_ids.at[index].get(mode="fill", fill_value=-1)  # -1 on the unused tail
    dtype = background.dtype
    pixel_centres = ((index % width).astype(dtype) + 0.5, (index // width).astype(dtype) + 0.5)
    shaded, pixel_depth, bary = shade(ids, pixel_centres)

    def scatter(values, base):  # (budget,) into an (H,W) plane; the unused tail is dropped
        return base.reshape(-1).at[index].set(values, mode="drop").reshape(height, width)

    # One plane at a time, stacked afterwards: stacking the shaded channels first made XLA:CPU
    # evaluate the whole Phong expression inside the interleaving copy, once per channel.
    image = jnp.stack([scatter(c, background[..., i]) for i, c in enumerate(shaded)], axis=-1)
    zeros = jnp.zeros((height, width), dtype)
    bary = jnp.stack([scatter(b, zeros) for b in bary], axis=-1)
    return image, scatter(pixel_depth, zeros), bary


def render(vertices, triangles, uv, colours_or_texture, camera, light, image_size,
           background=None, specular=DEFAULT_SPECULAR, shininess=DEFAULT_SHININESS,
           texture_sampling="pixel", near=rasterize_lib.DEFAULT_NEAR, chunk_size=None,
           pixel_budget=None, triangle_ids=None, antialias=False):
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
      pixel_budget: None, or a static int: shade at most this many covered pixels as one
        compacted list instead of the whole grid (the per-pixel work, forward and backward,
        scales with the pixels shaded); when more pixels are covered, the whole grid is shaded
        instead (`lax.cond`). The result is the same either way. A face portrait covers ~40% of
        the image, so half the grid is a good budget for one image; leave None under `vmap`,
        where a batched condition runs both branches.
      triangle_ids: None, or (H,W) int32 from `rasterize` of this mesh and camera, when the
        caller rasterized beforehand (nvdiffrast's split of rasterization from interpolation):
        visibility is piecewise constant in the vertices and carries no gradient, so it can be
        computed in another program, e.g. beside the texture generator. Every gradient still
        flows through the barycentrics, recomputed here from the vertices.
      antialias: blend the silhouettes analytically (`render.antialias`, nvdiffrast's), so that
        the outline, too, carries gradients to the vertices and camera; aux gains `coverage`.

    Returns:
      image: (H,W,3) float32, not clipped to [0,1].
      aux: dict with triangle_ids (H,W) int32 (-1 background), mask (H,W) float32 (1 where a
        triangle is visible), depth (H,W) perspective-correct depth (0 on background,
        differentiable), bary (H,W,3) barycentrics; with `antialias`, coverage (H,W): how much
        of each pixel the mesh covers, the mask antialiased (differentiable).
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
    if pixel_budget is not None and (isinstance(pixel_budget, bool)
                                     or not isinstance(pixel_budget, int) or pixel_budget < 1):
        raise ValueError(f"pixel_budget: expected None or a positive int (a static pixel count), "
                         f"got {pixel_budget!r}")

    pixels, depth = camera_lib.project(camera, vertices, (height, width))
    if triangle_ids is None:
        triangle_ids, _ = rasterize_lib.rasterize(pixels, depth, triangles, (height, width),
                                                  near=near, chunk_size=chunk_size)
    else:
        triangle_ids = jnp.asarray(triangle_ids)
        if triangle_ids.shape != (height, width) or triangle_ids.dtype != jnp.int32:
            raise ValueError(f"triangle_ids: expected ({height},{width}) int32 from rasterize, "
                             f"got {triangle_ids.shape} {triangle_ids.dtype}")
        triangle_ids = jax.lax.stop_gradient(triangle_ids)
    mask = triangle_ids >= 0

    normals = vertex_normals(vertices, triangles)
    if colours_or_texture.ndim == 2:
        per_vertex = colours_or_texture
    elif texture_sampling == "vertex":
        per_vertex = sample_texture(colours_or_texture, uv)
    else:
        per_vertex = jnp.asarray(uv, vertices.dtype)
    # Everything per vertex in one gather per corner: position, normal, depth, colour or UV.
    attributes = jnp.concatenate([vertices, normals, depth[:, None], per_vertex], axis=1)
    uv_map = None if colours_or_texture.ndim == 2 or texture_sampling == "vertex" \
        else colours_or_texture
    eye = jnp.asarray(camera)[0:3]
    shade = functools.partial(_shade_pixels, pixels, depth, triangles, attributes, uv_map, eye,
                              light, specular, shininess)
    if background is None:
        background = jnp.zeros((), attributes.dtype)
    background = jnp.asarray(background, attributes.dtype)
    if background.ndim == 3 and background.shape != (height, width, 3):
        raise ValueError(f"background: an image must be ({height},{width},3), "
                         f"got {background.shape}")
    background = jnp.broadcast_to(background, (height, width, 3))

    def whole_grid(_):
        shaded, pixel_depth, bary = shade(triangle_ids, None)  # None: the (H,W) pixel centres
        # per channel, then stacked (see _shade_covered)
        image = jnp.stack([jnp.where(mask, c, background[..., i]) for i, c in enumerate(shaded)],
                          axis=-1)
        return image, pixel_depth, jnp.stack(bary, axis=-1)

    if pixel_budget is None or pixel_budget >= height * width:
        image, pixel_depth, bary = whole_grid(None)
    else:
        def covered_only(_):
            return _shade_covered(shade, triangle_ids, background, pixel_budget)

        # Under autodiff a cond stores the residuals of both branches, zero-filled for the one
        # not taken: the whole grid's (every plane at H×W) cost more than the compaction saves,
        # so that branch is rematerialised; the compacted branch's residuals (budget-sized) are
        # kept, not recomputed (the cpu-small photo view on one core 30.5 -> 30.1 ms).
        image, pixel_depth, bary = jax.lax.cond(jnp.sum(mask) <= pixel_budget, covered_only,
                                                jax.checkpoint(whole_grid), None)
    aux = dict(triangle_ids=triangle_ids, mask=mask.astype(image.dtype), depth=pixel_depth,
               bary=bary)
    if antialias:
        image, aux["coverage"] = antialias_with_coverage(image, aux["mask"], triangle_ids,
                                                         pixel_depth, pixels, triangles)
    return image, aux


# Towards the light in OpenCV's camera frame (x right, y down, z forward): above and left of
# the camera, so that the face's relief casts its shading down and to the right as in most
# papers' figures of reconstructed shapes.
SHAPE_LIGHT = (-0.35, -0.45, -1.0)


def shape_shading(normals, light=SHAPE_LIGHT, albedo=0.72, ambient=0.3, specular=0.12,
                  shininess=24.0):
    """Grey "clay" shading of a normal map: the fitted shape without its texture, the way DECA's
    `shape_images` and 3DDFA's overlays show a reconstruction (a texture hides the geometry's
    errors; shading alone shows them).

      I = albedo · (ambient + (1 − ambient) · max(0, n·l)) + k_s · max(0, n·h)^α · [n·l > 0]

    Blinn-Phong with a distant light and a distant viewer straight down the camera's axis
    (v = (0, 0, −1)), h = (l + v)/|l + v|, everything in OpenCV's camera frame as
    `geometry_maps` gives the normals, so the result depends on the normals alone.

    Args:
      normals: (..., 3) unit normals in OpenCV's camera frame (a surface facing the camera has
        z < 0); NaN where there is no surface.
      light: (3,) the direction towards the light, same frame (normalised here).

    Returns:
      (...) grey levels in [0, 1], NaN where the normals are NaN.
    """
    normals = jnp.asarray(normals, jnp.float32)
    if normals.ndim < 1 or normals.shape[-1] != 3:
        raise ValueError(f"normals: expected (..., 3), got shape {normals.shape}")
    light = jnp.asarray(light, jnp.float32)
    light = light / jnp.linalg.norm(light)
    half = light + jnp.array([0.0, 0.0, -1.0])
    half = half / jnp.linalg.norm(half)
    lambert = normals @ light
    highlight = jnp.where(lambert > 0, jnp.maximum(normals @ half, 0.0) ** shininess, 0.0)
    grey = albedo * (ambient + (1 - ambient) * jnp.maximum(lambert, 0.0)) + specular * highlight
    return jnp.where(jnp.isnan(lambert), jnp.nan, jnp.clip(grey, 0.0, 1.0))


def geometry_maps(vertices, triangles, camera, image_size, near=rasterize_lib.DEFAULT_NEAR):
    """The visible surface's depth and normal at every pixel centre (a G-buffer; no shading).

    What DECA's `--saveDepth` and most depth/normal pseudo-ground truth are: per pixel, the
    depth along the viewing axis (mm; OpenCV's camera z, as `camera.opencv_matrices` gives the
    camera) and the interpolated vertex normal in OpenCV's camera frame (x right, y down, z
    forward, unit length; a surface facing the camera has z < 0). Both are NaN where no triangle
    covers the pixel centre. Depth is exact on every triangle (the perspective-correct
    barycentrics are the 3D point's own, and depth is linear over the triangle in 3D).

    Returns:
      depth (H,W) float32, normals (H,W,3) float32, mask (H,W) bool.
    """
    if np.ndim(vertices) != 2 or np.shape(vertices)[1] != 3:
        raise ValueError(f"vertices: expected (N,3), got {np.shape(vertices)}")
    if np.ndim(triangles) != 2 or np.shape(triangles)[1] != 3:
        raise ValueError(f"triangles: expected (F,3), got {np.shape(triangles)}")
    return _geometry_maps(vertices, triangles, camera, camera_lib.image_hw(image_size), near)


@functools.partial(jax.jit, static_argnames=("image_size", "near"))
def _geometry_maps(vertices, triangles, camera, image_size, near):
    vertices = jnp.asarray(vertices, jnp.float32)
    triangles = jnp.asarray(triangles, jnp.int32)
    pixels, depth = camera_lib.project(camera, vertices, image_size)
    triangle_ids, _ = rasterize_lib.rasterize(pixels, depth, triangles, image_size, near=near)
    bary = rasterize_lib.barycentrics(pixels, depth, triangles, triangle_ids)
    right, up, forward = camera_lib.axes(camera)
    to_opencv = jnp.stack([right, -up, forward])  # rows: the camera's axes in world coordinates
    normals = vertex_normals(vertices, triangles) @ to_opencv.T
    values = interpolate(jnp.concatenate([depth[:, None], normals], axis=1), triangles,
                         triangle_ids, bary)
    mask = triangle_ids >= 0
    unit = values[..., 1:] / jnp.maximum(jnp.linalg.norm(values[..., 1:], axis=-1,
                                                         keepdims=True), _EPS)
    return (jnp.where(mask, values[..., 0], jnp.nan),
            jnp.where(mask[..., None], unit, jnp.nan), mask)
