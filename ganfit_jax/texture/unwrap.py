"""UV maps from photos (GANFIT Sec. 3.1: the GAN is trained on UV maps unwrapped from images).

Given a mesh fitted to a photo (shape, expression, camera), every texel of the model's UV layout
is a point on the surface; where that point is visible in the photo, its colour is the photo's.
Occluded texels of a mirror-symmetric face take the colour of their mirror texel when that one
was seen. Visibility uses the renderer's z-buffer; everything here is plain arrays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree

from ganfit_jax import camera as camera_lib
from ganfit_jax import inputs, morphable, render


def uv_texel_surface(model: morphable.MorphableModel, resolution: int):
    """Which triangle covers each texel of an R×R UV map, and the texel's barycentrics there.

    Rasterises the mesh in UV space (x = u·R, y = (1 − v)·R, constant depth), so the same exact
    z-buffer serves both the photo and the UV layout. Returns (triangle_ids (R,R), bary (R,R,3)).
    """
    return _uv_texel_surface(jnp.asarray(model.uv, jnp.float32),
                             jnp.asarray(model.triangles, jnp.int32), resolution)


# One program each (the jax parts of an unwrap), not op by op: outside jit every operation is
# traced and compiled as a program of its own (~40 of a tiny fit's ~160 compilations).
@functools.partial(jax.jit, static_argnames=("resolution",))
def _uv_texel_surface(uv, triangles, resolution):
    pixels = jnp.stack([uv[:, 0] * resolution, (1.0 - uv[:, 1]) * resolution], axis=1)
    depth = jnp.ones(uv.shape[0], uv.dtype)
    ids, _ = render.rasterize(pixels, depth, triangles, resolution)
    return ids, render.barycentrics(pixels, depth, triangles, ids)


@functools.partial(jax.jit, static_argnames=("image_size",))
def _photo_visibility(camera, vertices, points, triangles, image_size):
    """The photo's z-buffer of the mesh, where the texels' surface points project (and their
    depth), and the mesh's vertex normals."""
    pixels, depth = camera_lib.project(camera, vertices, image_size)
    photo_ids, photo_depth = render.rasterize(pixels, depth, triangles, image_size)
    texel_px, texel_depth = camera_lib.project(camera, points, image_size)
    return (photo_ids, photo_depth, texel_px, texel_depth,
            morphable.vertex_normals(vertices, triangles))


def mirror_symmetry(model: morphable.MorphableModel, tolerance_mm=3.0):
    """Each vertex's mirror image across x = 0 (nearest vertex to (−x, y, z)), or None if the
    mean shape is not mirror-symmetric within `tolerance_mm`."""
    mean = np.asarray(model.mean)
    dist, idx = cKDTree(mean).query(mean * np.array([-1.0, 1.0, 1.0]))
    if np.max(dist) > tolerance_mm:
        return None
    return idx.astype(np.int32)


def uv_layout_is_mirrored(model: morphable.MorphableModel, symmetry, tolerance=1e-3):
    """True if mirror vertices sit at mirrored UVs (u → 1 − u), so texel mirroring is a flip.

    Judged on 98% of the vertices: a mean shape that is only nearly symmetric (the SFM's is
    within 2.3 mm) gives a few nearest-neighbour mirrors one vertex off."""
    uv = np.asarray(model.uv)
    err = np.maximum(np.abs(uv[symmetry, 0] - (1.0 - uv[:, 0])), np.abs(uv[symmetry, 1] - uv[:, 1]))
    return bool(np.mean(err < tolerance) > 0.98 and err.max() < 0.05)


def unwrap(model: morphable.MorphableModel, vertices, camera, image, resolution=256,
           texel_surface=None, min_facing=0.15, mirror=True, pixel_weight=None):
    """The photo's colours in the model's UV layout.

    Args:
      vertices: (N,3) the fitted mesh; camera: its camera; image: (H,W,3) the photo it was
        fitted to (the same pixel frame as the camera).
      resolution: R of the R×R UV map.
      texel_surface: `uv_texel_surface(model, R)`, to reuse across photos.
      min_facing: texels whose surface turns away from the camera more steeply than this
        cosine are treated as unseen (grazing views smear the photo).
      mirror: fill unseen texels from their mirror texel where the layout is mirror-symmetric.
      pixel_weight: (H,W) the photo's face mask (`fitting.Target.pixel_weight`): a texel whose
        pixel weighs under 0.5 (hair, a hand, glasses over the face) is unseen, and so may be
        filled from its mirror texel.

    Returns:
      uv_map (R,R,3) float32 in [0,1], mask (R,R) float32: 1 seen, 0.5 mirrored, 0 unknown.
    """
    image = np.asarray(image, np.float32)
    height, width = image.shape[:2]
    ids, bary = texel_surface if texel_surface is not None else uv_texel_surface(model, resolution)
    ids, bary = np.asarray(ids), np.asarray(bary)
    tris = np.asarray(model.triangles)
    verts = np.asarray(vertices, np.float32)
    covered = ids >= 0
    corners = tris[np.maximum(ids, 0)]  # (R,R,3)
    points = np.einsum("rck,rckd->rcd", bary, verts[corners])  # texel positions on the surface

    photo_ids, photo_depth, texel_px, texel_depth, normals = jax.device_get(_photo_visibility(
        jnp.asarray(camera, jnp.float32), jnp.asarray(verts), jnp.asarray(points.reshape(-1, 3)),
        jnp.asarray(model.triangles, jnp.int32), (height, width)))
    texel_px = texel_px.reshape(resolution, resolution, 2)
    col = np.floor(texel_px[..., 0]).astype(int)
    row = np.floor(texel_px[..., 1]).astype(int)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height) & covered
    seen_id = np.where(inside, photo_ids[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)],
                       -2)
    # visible if the photo's z-buffer shows this triangle or one of its neighbours at that pixel:
    # a texel on a shared edge may land on the pixel of the triangle next door
    texel_normal = np.einsum("rck,rckd->rcd", bary, normals[corners])
    texel_normal /= np.maximum(np.linalg.norm(texel_normal, axis=-1, keepdims=True), 1e-9)
    to_eye = np.asarray(camera)[None, None, 0:3] - points
    to_eye /= np.maximum(np.linalg.norm(to_eye, axis=-1, keepdims=True), 1e-9)
    facing = np.sum(texel_normal * to_eye, axis=-1)
    depth_here = np.asarray(photo_depth)[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)]
    texel_depth = np.asarray(texel_depth).reshape(resolution, resolution)
    same_surface = (seen_id == ids) | (np.abs(depth_here - texel_depth) < 2.0)
    visible = inside & (seen_id >= 0) & same_surface & (facing > min_facing)
    if pixel_weight is not None:
        pixel_weight = np.asarray(pixel_weight, np.float32)
        if pixel_weight.shape != (height, width):
            raise ValueError(f"pixel_weight: expected {(height, width)} like the image, got "
                             f"{pixel_weight.shape}")
        visible &= pixel_weight[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)] >= 0.5

    uv_map = np.zeros((resolution, resolution, 3), np.float32)
    uv_map[visible] = inputs.bilinear(image, texel_px[visible])
    mask = visible.astype(np.float32)
    if mirror:
        symmetry = mirror_symmetry(model)
        if symmetry is not None and uv_layout_is_mirrored(model, symmetry):
            flipped_map, flipped_vis = uv_map[:, ::-1], visible[:, ::-1]
            fill = covered & ~visible & flipped_vis
            uv_map[fill] = flipped_map[fill]
            mask[fill] = 0.5
    return uv_map, mask
