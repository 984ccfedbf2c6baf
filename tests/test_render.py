"""Renderer: visibility against brute force and trimesh ray casting, gradients against finite
differences, texture/shading against NumPy formulas, batching and tracing."""

import functools

import numpy as np
import pytest
import scipy.ndimage

import jax
import jax.numpy as jnp

from ganfit_jax import camera as camera_lib
from ganfit_jax import render


# ---------------------------------------------------------------------------------------------
# An independent z-buffer: every pixel against every triangle, in float64 NumPy.
# ---------------------------------------------------------------------------------------------

def brute_force_ids(pixels, depth, triangles, height, width, near=render.DEFAULT_NEAR):
    pixels, depth = np.asarray(pixels, np.float64), np.asarray(depth, np.float64)
    triangles = np.asarray(triangles)
    qx, qy = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    best = np.zeros((height, width))
    ids = -np.ones((height, width), np.int64)
    for t, (i, j, k) in enumerate(triangles):
        (x0, y0), (x1, y1), (x2, y2) = pixels[i], pixels[j], pixels[k]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if abs(area) < 1e-10 or min(depth[[i, j, k]]) <= near:
            continue
        w0 = ((x2 - x1) * (qy - y1) - (y2 - y1) * (qx - x1)) / area
        w1 = ((x0 - x2) * (qy - y2) - (y0 - y2) * (qx - x2)) / area
        w2 = 1 - w0 - w1
        inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
        inv_z = w0 / depth[i] + w1 / depth[j] + w2 / depth[k]
        win = inside & (inv_z >= best)
        best = np.where(win, inv_z, best)
        ids = np.where(win, t, ids)
    return ids


def random_soup(seed, num_triangles, size, spread=1.5):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (num_triangles, 1, 2))
    pixels = (centres + rng.normal(0, spread * size / 4, (num_triangles, 3, 2))).reshape(-1, 2)
    depth = rng.uniform(1.0, 10.0, num_triangles * 3)
    triangles = np.arange(num_triangles * 3).reshape(-1, 3)
    return pixels.astype(np.float32), depth.astype(np.float32), triangles


# ---------------------------------------------------------------------------------------------
# Visibility
# ---------------------------------------------------------------------------------------------

def test_two_overlapping_triangles_nearest_wins():
    # A far triangle (depth 5) over most of the image and a near one (depth 2) on its left part.
    pixels = np.array([[0, 0], [16, 0], [0, 16], [2, 2], [10, 2], [2, 10]], np.float32)
    depth = np.array([5, 5, 5, 2, 2, 2], np.float32)
    triangles = np.array([[0, 1, 2], [3, 4, 5]])
    ids, depth_map = render.rasterize(pixels, depth, triangles, 16)
    qx, qy = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5)
    expected = np.where(qx + qy <= 16, 0, -1)
    expected = np.where((qx >= 2) & (qy >= 2) & (qx + qy <= 12), 1, expected)
    np.testing.assert_array_equal(np.asarray(ids), expected)
    np.testing.assert_allclose(np.asarray(depth_map), np.select([expected == 1, expected == 0],
                                                                 [2.0, 5.0], 0.0), rtol=1e-6)
    # Swap the depths: the big triangle now hides the small one everywhere.
    ids, _ = render.rasterize(pixels, depth[[3, 4, 5, 0, 1, 2]], triangles, 16)
    np.testing.assert_array_equal(np.asarray(ids), np.where(qx + qy <= 16, 0, -1))


def test_screen_filling_quad_and_huge_triangle():
    size = (24, 40)
    quad = np.array([[0, 0], [40, 0], [40, 24], [0, 24]], np.float32)
    ids, depth_map = render.rasterize(quad, np.full(4, 3.0, np.float32), np.array([[0, 1, 2], [0, 2, 3]]), size)
    ids = np.asarray(ids)
    assert ids.shape == (24, 40) and np.all(ids >= 0)
    qx, qy = np.meshgrid(np.arange(40) + 0.5, np.arange(24) + 0.5)
    # Pixel centres exactly on the diagonal count for both; the larger id wins the tie.
    np.testing.assert_array_equal(ids, np.where(qy / 24 >= qx / 40, 1, 0))
    np.testing.assert_allclose(np.asarray(depth_map), 3.0, rtol=1e-6)
    # One triangle far larger than the image covers every pixel, with chunks much smaller than
    # its H·W fragments.
    huge = np.array([[-1e4, -1e4], [1e4, -1e4], [0, 1e4]], np.float32)
    ids, _ = render.rasterize(huge, np.ones(3, np.float32), np.array([[0, 1, 2]]), size,
                              chunk_size=97)
    assert np.all(np.asarray(ids) == 0)


def test_triangle_crossing_the_image_border():
    pixels = np.array([[-10, 4], [12, -6], [9, 14]], np.float32)
    depth = np.array([2, 3, 4], np.float32)
    ids, _ = render.rasterize(pixels, depth, np.array([[0, 1, 2]]), 12)
    np.testing.assert_array_equal(np.asarray(ids), brute_force_ids(pixels, depth, [[0, 1, 2]], 12, 12))
    assert 0 < np.mean(np.asarray(ids) == 0) < 1


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_nearer_wins_beyond_round_off_and_the_larger_id_within_it(chunk_size):
    # Two squares over the whole 8x8 image, one behind the other: the nearer one wins wherever
    # the gap exceeds float32 round-off, whichever id it has; within NEAREST_ROUNDOFF the two
    # are a tie, which the larger id takes (as at equal depth).
    square = np.array([[-1, -1], [9, -1], [9, 9], [-1, 9]], np.float32)
    pixels = np.concatenate([square, square])
    quads = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    for gap, winners in ((1e-4, (0, 1)), (-1e-4, (2, 3)),
                         (0.25 * render.raster.NEAREST_ROUNDOFF, (2, 3))):
        depth = np.array([100.0] * 4 + [100.0 * (1 + gap)] * 4, np.float32)
        ids, _ = render.rasterize(pixels, depth, quads, 8, chunk_size=chunk_size)
        assert set(np.unique(np.asarray(ids))) == set(winners), (gap, np.unique(ids))


@pytest.mark.parametrize("chunk_size", [None, 5, 333])
def test_random_soup_matches_brute_force(chunk_size):
    # Many overlapping triangles of every size, some leaving the image; any chunking is exact.
    pixels, depth, triangles = random_soup(0, 60, 32)
    ids, depth_map = render.rasterize(pixels, depth, triangles, (32, 28), chunk_size=chunk_size)
    expected = brute_force_ids(pixels, depth, triangles, 32, 28)
    agreement = np.mean(np.asarray(ids) == expected)
    assert agreement >= 0.998, agreement  # float32 vs float64 on pixel centres within ~1e-6 of an edge
    assert np.all((np.asarray(depth_map) > 0) == (np.asarray(ids) >= 0))


def test_near_plane_degenerate_and_nonfinite_triangles_are_culled():
    pixels = np.array([[0, 0], [16, 0], [0, 16],       # behind the near plane (one vertex)
                       [0, 0], [8, 8], [16, 16],       # zero area
                       [0, 0], [np.nan, 0], [0, 16],   # non-finite
                       [4, 4], [12, 4], [4, 12]], np.float32)
    depth = np.array([5, 5, -1, 2, 2, 2, 1, 1, 1, 3, 3, 3], np.float32)
    triangles = np.arange(12).reshape(4, 3)
    ids, _ = render.rasterize(pixels, depth, triangles, 16)
    ids = np.asarray(ids)
    assert set(np.unique(ids)) == {-1, 3}
    alone = brute_force_ids(pixels[9:], depth[9:], [[0, 1, 2]], 16, 16)
    np.testing.assert_array_equal(ids, np.where(alone == 0, 3, -1))


def _sfm_view(model, yaw_degrees, size):
    yaw = np.deg2rad(yaw_degrees)
    eye = 600.0 * np.array([np.sin(yaw), 0.1, np.cos(yaw)])
    return np.concatenate([eye, [0, 0, 0], [camera_lib.default_focal(size)]]).astype(np.float32)


def test_visibility_matches_trimesh_ray_casting_on_sfm(sfm_model):
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("embreex", reason="trimesh's Embree ray caster (requirements-test.txt)")
    from trimesh.ray import ray_pyembree
    size = 224
    verts = np.asarray(sfm_model.mean, np.float64)
    faces = np.asarray(sfm_model.triangles)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    intersector = ray_pyembree.RayMeshIntersector(mesh)
    for yaw in (-60, -30, 0, 30, 60):
        cam = _sfm_view(sfm_model, yaw, size)
        pixels, depth = camera_lib.project(cam, sfm_model.mean, size)
        ids = np.asarray(render.rasterize(pixels, depth, sfm_model.triangles, size)[0])
        # Rays through every pixel centre, built from the camera's own axes.
        right, up, forward = (np.asarray(a, np.float64) for a in camera_lib.axes(cam))
        qx, qy = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
        f = float(cam[6])
        dirs = ((qx - size / 2)[..., None] * right - (qy - size / 2)[..., None] * up
                + f * forward).reshape(-1, 3)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        origins = np.broadcast_to(np.asarray(cam[:3], np.float64), dirs.shape)
        hit_tri, hit_ray = intersector.intersects_id(origins, dirs, multiple_hits=False)
        reference = -np.ones(size * size, np.int64)
        reference[hit_ray] = hit_tri
        agreement = np.mean(ids.reshape(-1) == reference)
        print(f"yaw {yaw}: agreement {agreement:.5f}")
        assert agreement >= 0.995, (yaw, agreement)
        assert np.mean(ids >= 0) > 0.3


# ---------------------------------------------------------------------------------------------
# Interpolation, texture, shading
# ---------------------------------------------------------------------------------------------

def test_barycentrics_are_perspective_correct():
    # A slanted quad of a known plane; the interpolated world x must equal the ray's intersection.
    verts = np.array([[-50, -50, 0], [50, -50, -80], [50, 50, -80], [-50, 50, 0]], np.float32)
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    cam = np.array([0, 0, 300, 0, 0, 0, 100], np.float32)
    pixels, depth = camera_lib.project(cam, verts, 64)
    ids, depth_map = render.rasterize(pixels, depth, tris, 64)
    bary = render.barycentrics(pixels, depth, tris, ids)
    pos = np.asarray(render.interpolate(verts, tris, ids, bary))
    mask = np.asarray(ids) >= 0
    np.testing.assert_allclose(np.asarray(bary).sum(-1)[mask], 1.0, atol=1e-5)
    assert np.all(np.asarray(bary)[~mask] == 0)
    # Reproject the interpolated point: it must land on its pixel centre (affine interpolation
    # in screen space would miss by up to a pixel or more on this slanted quad).
    reproj, z = camera_lib.project(cam, pos[mask], 64)
    qx, qy = np.meshgrid(np.arange(64) + 0.5, np.arange(64) + 0.5)
    np.testing.assert_allclose(np.asarray(reproj), np.stack([qx[mask], qy[mask]], -1), atol=2e-3)
    np.testing.assert_allclose(np.asarray(depth_map)[mask], np.asarray(z), rtol=1e-4)


def test_sample_texture_matches_scipy_bilinear():
    rng = np.random.default_rng(1)
    uv_map = rng.uniform(size=(9, 13, 3)).astype(np.float32)
    uv = rng.uniform(-0.1, 1.1, (50, 2)).astype(np.float32)
    got = np.asarray(render.sample_texture(uv_map, uv))
    rows = np.clip((1 - uv[:, 1]) * 9 - 0.5, 0, 8)
    cols = np.clip(uv[:, 0] * 13 - 0.5, 0, 12)
    for c in range(3):
        ref = scipy.ndimage.map_coordinates(uv_map[..., c], [rows, cols], order=1, mode="nearest")
        np.testing.assert_allclose(got[:, c], ref, atol=1e-5)
    # OBJ convention: v = 1 is the top row.
    np.testing.assert_allclose(render.sample_texture(uv_map, np.array([[0.5 / 13, 1 - 0.5 / 9]])),
                               uv_map[0:1, 0], atol=1e-6)


def test_sample_texture_gradients_match_finite_differences():
    # The bilinear lookup has a hand-written VJP; check it against central differences, with
    # some coordinates outside [0,1] (clamped: zero uv gradient there).
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        uv_map = jnp.asarray(rng.uniform(size=(6, 7, 3)))
        uv = jnp.asarray(np.concatenate([rng.uniform(0.05, 0.95, (30, 2)), [[1.2, 0.47], [0.53, -0.3]]]))
        weights = jnp.asarray(rng.normal(size=(32, 3)))
        loss = jax.jit(lambda m, t: jnp.sum(jnp.sin(render.sample_texture(m, t)) * weights))
        d_map, d_uv = jax.grad(loss, argnums=(0, 1))(uv_map, uv)
        np.testing.assert_array_equal(np.asarray(d_uv[30, 0]), 0.0)
        np.testing.assert_array_equal(np.asarray(d_uv[31, 1]), 0.0)
        eps = 1e-6
        for grad, argnum in ((d_map, 0), (d_uv, 1)):
            for _ in range(3):
                direction = rng.normal(size=grad.shape)
                args = [uv_map, uv]
                plus, minus = list(args), list(args)
                plus[argnum] = args[argnum] + eps * direction
                minus[argnum] = args[argnum] - eps * direction
                numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
                np.testing.assert_allclose(float(np.sum(np.asarray(grad) * direction)),
                                           float(numeric), rtol=1e-6, atol=1e-8)


def test_phong_matches_formula():
    albedo = np.array([0.5, 0.4, 0.3])
    normal = np.array([0.0, 0.0, 2.0])  # normalised inside
    pos = np.array([0.0, 0.0, 0.0])
    eye = np.array([0.0, 0.0, 10.0])
    light = np.array([10.0, 0.0, 10.0, 0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    got = np.asarray(render.phong(albedo, normal, pos, eye, light, specular=0.5, shininess=4.0))
    l = np.array([1, 0, 1]) / np.sqrt(2)
    n_dot_l = l[2]
    r = 2 * n_dot_l * np.array([0, 0, 1]) - l
    spec = 0.5 * light[3:6] * max(r[2], 0) ** 4
    np.testing.assert_allclose(got, albedo * (light[6:9] + light[3:6] * n_dot_l) + spec, rtol=1e-6)
    # A light behind the surface leaves only the ambient term.
    back = light.copy()
    back[2] = -10
    np.testing.assert_allclose(render.phong(albedo, normal, pos, eye, back), albedo * light[6:9],
                               rtol=1e-6)


def _phong_reference(albedo, normals, positions, eye, light, specular, shininess):
    """Phong as the paper writes it, on (...,3) vectors, for autodiff to differentiate."""
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    n, l, v = unit(normals), unit(light[:3] - positions), unit(eye - positions)
    n_dot_l = jnp.sum(n * l, -1, keepdims=True)
    r = 2 * n_dot_l * n - l
    r_dot_v = jnp.sum(r * v, -1, keepdims=True)
    lit = (r_dot_v > 0) & (n_dot_l > 0)
    highlight = specular * jnp.where(lit, jnp.where(lit, r_dot_v, 1.0) ** shininess, 0.0)
    return albedo * (light[6:9] + light[3:6] * jnp.maximum(n_dot_l, 0.0)) + light[3:6] * highlight


@pytest.mark.parametrize("shininess", [16, 2.5])
def test_phong_hand_written_gradient_matches_autodiff_of_the_formula(shininess):
    """`phong`'s backward pass is written by hand; autodiff of the textbook vector form is the
    reference, for every input (eye and light included), lit and unlit pixels, in float64."""
    rng = np.random.default_rng(5)
    shape = (40, 3)
    with jax.enable_x64(True):
        albedo = jnp.asarray(rng.uniform(0.1, 0.9, shape))
        normals = jnp.asarray(rng.normal(size=shape) + [0, 0, 2.0])
        positions = jnp.asarray(rng.normal(size=shape) * 30)
        eye = jnp.asarray([5.0, -3.0, 400.0])
        light = jnp.asarray([80.0, 60.0, 300.0, 0.9, 0.8, 0.7, 0.2, 0.25, 0.3])
        weights = jnp.asarray(rng.normal(size=shape))
        args = (albedo, normals, positions, eye, light)

        def loss(fn):
            return lambda *a: jnp.sum(fn(*a, specular=0.4, shininess=shininess) * weights)

        # the data cover both branches: pixels with a highlight and pixels without
        highlight = _phong_reference(*args, 0.4, shininess) - _phong_reference(*args, 0.0, 1.0)
        assert 0 < int(jnp.sum(highlight[:, 0] > 0)) < shape[0]
        got = jax.grad(loss(render.phong), argnums=range(5))(*args)
        want = jax.grad(loss(_phong_reference), argnums=range(5))(*args)
        for name, g, w in zip(["albedo", "normals", "positions", "eye", "light"], got, want):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12, err_msg=name)
        # Broadcast albedo (one colour for every pixel): its gradient is summed back to (3,).
        g = jax.grad(lambda a: jnp.sum(render.phong(a, *args[1:]) * weights))(albedo[0])
        w = jax.grad(lambda a: jnp.sum(_phong_reference(a, *args[1:], 0.2, 16.0) * weights))(
            albedo[0])
        np.testing.assert_allclose(g, w, rtol=1e-9)
        # A traced k_s (fitting it) takes autodiff's path and gets the same gradient.
        traced = jax.grad(lambda ks: jnp.sum(render.phong(*args, specular=ks,
                                                          shininess=shininess) * weights))(0.4)
        reference = jax.grad(lambda ks: jnp.sum(_phong_reference(*args, ks, shininess)
                                                * weights))(0.4)
        np.testing.assert_allclose(traced, reference, rtol=1e-9)


def test_barycentrics_hand_written_gradient_matches_autodiff_of_the_formula():
    """The perspective-correct barycentrics' backward pass is written by hand; autodiff of
    b_k = (A_k / z_k) / Σ_j (A_j / z_j) (A_k the sub-triangle areas) is the reference."""
    verts, tris = np.array([[4.0, 3.0], [27.0, 6.0], [12.0, 29.0], [30.0, 28.0]]), \
        np.array([[0, 1, 2], [1, 3, 2]])
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        pixels = jnp.asarray(verts)
        depth = jnp.asarray([200.0, 260.0, 230.0, 300.0])
        ids, _ = render.rasterize(pixels, depth, tris, 32)
        assert int(jnp.sum(ids == 0)) > 50 and int(jnp.sum(ids == 1)) > 50
        weights = jnp.asarray(rng.normal(size=(32, 32, 3)))

        def reference(pixels, depth):
            c = jnp.asarray(tris)[jnp.maximum(ids, 0)]  # (H,W,3)
            qx = jnp.arange(32.0)[None, :] + 0.5
            qy = jnp.arange(32.0)[:, None] + 0.5
            px, py, z = pixels[c, 0] - qx[..., None], pixels[c, 1] - qy[..., None], depth[c]
            areas = jnp.stack([px[..., (k + 1) % 3] * py[..., (k + 2) % 3]
                               - px[..., (k + 2) % 3] * py[..., (k + 1) % 3] for k in range(3)], -1)
            q = areas / z
            return jnp.where((ids >= 0)[..., None], q / jnp.sum(q, -1, keepdims=True), 0.0)

        got_b = render.barycentrics(pixels, depth, tris, ids)
        np.testing.assert_allclose(got_b, reference(pixels, depth), rtol=1e-12, atol=1e-14)
        got = jax.grad(lambda p, d: jnp.sum(render.barycentrics(p, d, tris, ids) * weights),
                       argnums=(0, 1))(pixels, depth)
        want = jax.grad(lambda p, d: jnp.sum(reference(p, d) * weights), argnums=(0, 1))(
            pixels, depth)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The render entry point: textures, background, gradients
# ---------------------------------------------------------------------------------------------

def _tiny_scene():
    """A bumpy 5×5-vertex sheet facing +z, 32 triangles, per-vertex colours and UVs."""
    g = np.linspace(-40, 40, 5)
    xx, yy = np.meshgrid(g, g)
    zz = 6 * np.sin(xx / 17) * np.cos(yy / 23)
    verts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
    tris = []
    for r in range(4):
        for c in range(4):
            a, b, d, e = r * 5 + c, r * 5 + c + 1, (r + 1) * 5 + c, (r + 1) * 5 + c + 1
            tris += [[a, b, e], [a, e, d]]
    uv = np.stack([(xx + 40) / 80, (yy + 40) / 80], -1).reshape(-1, 2)
    rng = np.random.default_rng(2)
    colours = rng.uniform(0.2, 0.9, (25, 3))
    texture = rng.uniform(0.2, 0.9, (8, 8, 3))
    cam = np.array([5, 3, 250, 0, 0, 0, 80])
    light = np.array([60, 80, 200, 0.8, 0.7, 0.6, 0.2, 0.25, 0.3])
    return verts, np.array(tris), uv, colours, texture, cam, light


def test_render_with_uv_map_and_vertex_colours_and_background():
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    cam = cam * np.array([1, 1, 1, 1, 1, 1, 0.5])  # a wider view: background around the sheet
    background = np.full((24, 24, 3), 0.5, np.float32)
    image, aux = render.render(verts, tris, uv, texture, cam, light, 24, background=background)
    mask = np.asarray(aux["mask"]).astype(bool)
    assert image.shape == (24, 24, 3) and aux["triangle_ids"].dtype == jnp.int32
    assert 0.2 < mask.mean() < 1.0
    np.testing.assert_array_equal(np.asarray(image)[~mask], 0.5)
    np.testing.assert_array_equal(mask, np.asarray(aux["triangle_ids"]) >= 0)
    assert np.all(np.asarray(aux["depth"])[mask] > 200) and np.all(np.asarray(aux["depth"])[~mask] == 0)
    # Unlit (ambient 1, no light colour) the image is the albedo: per-pixel UV lookup equals
    # sampling the map at the interpolated UV; "vertex" sampling equals per-vertex colours.
    flat = np.array([0, 0, 1e3, 0, 0, 0, 1, 1, 1], np.float32)
    ids, bary = aux["triangle_ids"], aux["bary"]
    pixel_uv = render.interpolate(uv, tris, ids, bary)
    image, _ = render.render(verts, tris, uv, texture, cam, flat, 24, specular=0.0)
    np.testing.assert_allclose(np.asarray(image)[mask],
                               np.asarray(render.sample_texture(texture, pixel_uv))[mask], atol=1e-5)
    image, _ = render.render(verts, tris, uv, texture, cam, flat, 24, specular=0.0,
                             texture_sampling="vertex")
    by_vertex, _ = render.render(verts, tris, uv, render.sample_texture(texture, uv), cam, flat,
                                 24, specular=0.0)
    np.testing.assert_allclose(np.asarray(image), np.asarray(by_vertex), atol=1e-6)
    with pytest.raises(ValueError, match="colours_or_texture"):
        render.render(verts, tris, uv, colours[:5], cam, light, 24)
    with pytest.raises(ValueError, match="light"):
        render.render(verts, tris, uv, colours, cam, light[:6], 24)


def test_non_square_image_is_a_crop_of_the_square_one():
    # The principal point is the image centre, so a 32×48 (H×W) render equals rows 8..39 of the
    # 48×48 render: checks the (height, width) order through projection, raster and shading.
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    wide, aux_wide = render.render(verts, tris, uv, texture, cam * [1, 1, 1, 1, 1, 1, 0.6], light,
                                   (32, 48))
    square, aux_square = render.render(verts, tris, uv, texture, cam * [1, 1, 1, 1, 1, 1, 0.6],
                                       light, 48)
    assert wide.shape == (32, 48, 3)
    np.testing.assert_array_equal(np.asarray(aux_wide["triangle_ids"]),
                                  np.asarray(aux_square["triangle_ids"])[8:40])
    np.testing.assert_allclose(np.asarray(wide), np.asarray(square)[8:40], atol=1e-5)


def _check_directional_derivatives(loss_and_ids, args, seed, rel=2e-3, eps=1e-4):
    """Central differences along random directions vs the gradient's inner product, per argument.

    `loss_and_ids` returns (scalar, triangle ids); finite differences are meaningful only while
    visibility stays fixed, so the ids of every perturbed evaluation must equal the base ones.
    """
    _, base_ids = loss_and_ids(*args)
    grads = jax.jit(jax.grad(lambda *a: loss_and_ids(*a)[0], argnums=tuple(range(len(args)))))(*args)
    rng = np.random.default_rng(seed)
    for argnum, grad in enumerate(grads):
        assert np.all(np.isfinite(np.asarray(grad)))
        assert np.any(np.asarray(grad) != 0), argnum
        for _ in range(2):
            direction = rng.normal(size=np.shape(args[argnum]))
            values = []
            for sign in (1, -1):
                moved = list(args)
                moved[argnum] = args[argnum] + sign * eps * direction
                value, ids = loss_and_ids(*moved)
                np.testing.assert_array_equal(np.asarray(ids), np.asarray(base_ids))
                values.append(float(value))
            numeric = (values[0] - values[1]) / (2 * eps)
            analytic = float(np.sum(np.asarray(grad) * direction))
            assert abs(numeric - analytic) <= rel * max(abs(numeric), 1e-3), (argnum, numeric,
                                                                             analytic)


@pytest.mark.parametrize("use_texture", [False, True])
def test_gradients_match_finite_differences(use_texture):
    """Vertices, colours or UV map, camera and light, in float64."""
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    weights = np.random.default_rng(3).normal(size=(20, 20, 3))
    with jax.enable_x64(True):
        @jax.jit
        def loss_and_ids(v, c_or_t, camera, light_):
            image, aux = render.render(v, tris, uv, c_or_t, camera, light_, 20, background=0.3)
            return jnp.sum(image * weights), aux["triangle_ids"]

        args = [jnp.asarray(verts, jnp.float64), jnp.asarray(texture if use_texture else colours),
                jnp.asarray(cam, jnp.float64), jnp.asarray(light, jnp.float64)]
        assert loss_and_ids(*args)[0].dtype == jnp.float64
        _check_directional_derivatives(loss_and_ids, args, seed=int(use_texture))


def test_gradients_finite_with_background_and_degenerate_triangles():
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    verts = verts.copy()
    verts[6] = verts[7]  # collapse an edge: two zero-area triangles
    extra = np.concatenate([verts, [[500, 500, 0]]])  # a vertex used by no triangle
    colours = np.concatenate([colours, [[1, 1, 1]]])
    uv = np.concatenate([uv, [[0, 0]]])

    def loss(v, c, camera, light_):
        image, aux = render.render(v, tris, uv, c, camera, light_, 16)
        return jnp.sum(image ** 2) + jnp.sum(aux["depth"])

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        jnp.asarray(extra, jnp.float32), colours, jnp.asarray(cam, jnp.float32), light)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.any(np.asarray(grads[0]) != 0)


def test_inverse_rendering_recovers_light():
    import optax
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=50.0)
    verts = jnp.asarray(sphere.vertices, jnp.float32)
    tris = jnp.asarray(sphere.faces, jnp.int32)
    colours = jnp.full(verts.shape, 0.7, jnp.float32)
    uv = jnp.zeros((verts.shape[0], 2), jnp.float32)
    cam = jnp.array([0, 0, 400, 0, 0, 0, 160], jnp.float32)
    true_light = jnp.array([300, 200, 400, 0.9, 0.6, 0.4, 0.15, 0.2, 0.25], jnp.float32)
    size = 40
    target, _ = render.render(verts, tris, uv, colours, cam, true_light, size)

    def loss(light):
        image, _ = render.render(verts, tris, uv, colours, cam, light, size)
        return jnp.mean((image - target) ** 2)

    optimiser = optax.adam(0.05)
    # Optimise the light direction (position scaled to 1/100) and the colours.
    scale = jnp.array([100.0] * 3 + [1.0] * 6)
    params = jnp.array([-1.0, 1.0, 3.0, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3])
    state = optimiser.init(params)

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(lambda p: loss(p * scale))(params)
        updates, state = optimiser.update(grad, state)
        return optax.apply_updates(params, updates), state, value

    for _ in range(400):
        params, state, value = step(params, state)
    recovered = np.asarray(params * scale)
    direction = recovered[:3] / np.linalg.norm(recovered[:3])
    true_direction = np.asarray(true_light[:3]) / np.linalg.norm(np.asarray(true_light[:3]))
    assert np.degrees(np.arccos(np.clip(direction @ true_direction, -1, 1))) < 3.0
    np.testing.assert_allclose(recovered[3:], np.asarray(true_light[3:]), atol=0.03)


# ---------------------------------------------------------------------------------------------
# Batching and tracing
# ---------------------------------------------------------------------------------------------

def test_vmap_equals_loop_and_jit_traces_once():
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    rng = np.random.default_rng(4)
    batch_verts = (verts[None] + rng.normal(0, 2, (3,) + verts.shape)).astype(np.float32)
    batch_cams = (cam[None] + np.array([[0, 0, 0, 0, 0, 0, 0], [30, -10, 0, 0, 0, 0, 0],
                                        [-40, 20, -50, 0, 0, 0, 20]])).astype(np.float32)
    traces = []

    def one(v, c):
        traces.append(1)
        image, aux = render.render(v, tris, uv, texture, c, light, 24)
        return image, aux["triangle_ids"]

    batched = jax.jit(jax.vmap(one))
    images, ids = batched(batch_verts, batch_cams)
    for b in range(3):
        image_b, ids_b = one(batch_verts[b], batch_cams[b])
        np.testing.assert_array_equal(np.asarray(ids[b]), np.asarray(ids_b))
        np.testing.assert_allclose(np.asarray(images[b]), np.asarray(image_b), atol=1e-5)
    traces.clear()
    jitted = jax.jit(one)
    for b in range(3):
        jitted(batch_verts[b], batch_cams[b])
    assert len(traces) == 1


@pytest.mark.parametrize("use_texture", [False, True])
def test_pixel_budget_gives_the_same_image_aux_and_gradients(use_texture):
    """Shading only the covered pixels (a compacted list, scattered back) equals shading the
    whole grid: image, depth, barycentrics and every gradient; with a budget below the covered
    count the whole-grid branch runs, with the same result."""
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    cam = cam * np.array([1, 1, 1, 1, 1, 1, 0.5])  # background around the sheet
    size = 24
    background = np.random.default_rng(0).uniform(size=(size, size, 3)).astype(np.float32)
    weights = np.random.default_rng(1).normal(size=(size, size, 3))
    c_or_t = texture if use_texture else colours

    def run(budget):
        def f(v, c, camera, light_):
            image, aux = render.render(v, tris, uv, c, camera, light_, size, background=background,
                                       pixel_budget=budget)
            return jnp.sum(image * weights) + jnp.sum(aux["depth"]) * 1e-3, (image, aux)

        (_, (image, aux)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3),
                                                              has_aux=True))(verts, c_or_t, cam,
                                                                             light)
        return image, aux, grads

    image, aux, grads = run(None)
    covered = int(np.asarray(aux["mask"]).sum())
    assert 0 < covered < size * size
    # at, above and just below the covered count (the last runs the whole-grid branch)
    for budget in (covered, covered + 37, covered - 1):
        b_image, b_aux, b_grads = run(budget)
        np.testing.assert_allclose(np.asarray(b_image), np.asarray(image), rtol=1e-6, atol=1e-6)
        for k in ("depth", "bary", "mask", "triangle_ids"):
            np.testing.assert_allclose(np.asarray(b_aux[k]), np.asarray(aux[k]), rtol=1e-6,
                                       atol=1e-6)
        for a, b in zip(b_grads, grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                       atol=2e-5 * float(np.abs(np.asarray(b)).max()))


def test_shade_covered_touches_only_covered_pixels():
    """The compacted branch itself (not the fallback): background left as given outside the
    mask, and equal to the whole-grid shading inside."""
    from ganfit_jax.render import shading

    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    cam = cam * np.array([1, 1, 1, 1, 1, 1, 0.5])
    whole, aux = render.render(verts, tris, uv, colours, cam, light, 24, background=0.25)
    mask = np.asarray(aux["mask"]).astype(bool)
    pixels, depth = camera_lib.project(cam, verts, (24, 24))
    normals = render.vertex_normals(jnp.asarray(verts), jnp.asarray(tris))
    attributes = jnp.concatenate([verts, normals, depth[:, None], colours], axis=1)
    shade = functools.partial(shading._shade_pixels, pixels, depth, jnp.asarray(tris), attributes,
                              None, jnp.asarray(cam)[:3], jnp.asarray(light),
                              render.DEFAULT_SPECULAR, render.DEFAULT_SHININESS)
    background = jnp.full((24, 24, 3), 0.25)
    image, depth_map, bary = shading._shade_covered(shade, aux["triangle_ids"], background,
                                                    int(mask.sum()) + 5)
    np.testing.assert_array_equal(np.asarray(image)[~mask], 0.25)
    np.testing.assert_allclose(np.asarray(image), np.asarray(whole), atol=1e-6)
    np.testing.assert_allclose(np.asarray(depth_map), np.asarray(aux["depth"]), rtol=1e-6)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.7, 1.0])
def test_covered_index_equals_nonzero(fraction):
    """The compaction's index list is jnp.nonzero's, truncated or padded to the budget."""
    from ganfit_jax.render.shading import _covered_index

    rng = np.random.default_rng(int(fraction * 10))
    ids = np.where(rng.uniform(size=(13, 17)) < fraction, rng.integers(0, 9, (13, 17)), -1)
    for budget in (1, 40, 13 * 17):
        want = jnp.nonzero(jnp.asarray(ids).ravel() >= 0, size=budget, fill_value=13 * 17)[0]
        got = jax.jit(_covered_index, static_argnums=1)(jnp.asarray(ids, jnp.int32), budget)
        np.testing.assert_array_equal(got, want)


def test_pixel_budget_rejects_bad_values():
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    for bad in (0, -3, 0.5, True):
        with pytest.raises(ValueError, match="pixel_budget"):
            render.render(verts, tris, uv, colours, cam, light, 16, pixel_budget=bad)


def test_given_triangle_ids_give_the_same_image_and_gradients():
    """Rasterizing beforehand (`triangle_ids=`, nvdiffrast's split of visibility from
    interpolation) changes nothing: image, aux and every gradient equal the render that
    rasterizes itself, and the image also with a pixel budget. Ids of another pose are used as
    given (the image changes), and ids of the wrong shape or type are refused by name."""
    verts, tris, uv, colours, texture, cam, light = _tiny_scene()
    cam = cam * np.array([1, 1, 1, 1, 1, 1, 0.5])
    size = 24
    weights = np.random.default_rng(1).normal(size=(size, size, 3))

    def run(ids, camera=cam):
        def f(v, t, camera_, light_):
            image, aux = render.render(v, tris, uv, t, camera_, light_, size, background=0.3,
                                       triangle_ids=ids)
            return jnp.sum(image * weights), (image, aux)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(
            verts, texture, camera, light)

    (_, (image, aux)), grads = run(None)
    (_, (g_image, g_aux)), g_grads = run(aux["triangle_ids"])
    np.testing.assert_array_equal(np.asarray(g_image), np.asarray(image))
    for k in ("depth", "bary", "mask", "triangle_ids"):
        np.testing.assert_array_equal(np.asarray(g_aux[k]), np.asarray(aux[k]))
    for a, b in zip(g_grads, grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                   atol=1e-6 * float(np.abs(np.asarray(b)).max()))
    # the ids are used, not recomputed: another camera's ids change what is shaded
    moved = cam + np.array([0, 0, 0, 0, 0, 0, 0.2]) * cam[6]
    (_, (m_image, m_aux)), _ = run(None, moved)
    assert int(np.asarray(m_aux["mask"]).sum()) != int(np.asarray(aux["mask"]).sum())
    (_, (x_image, _)), _ = run(m_aux["triangle_ids"])
    assert not np.allclose(np.asarray(x_image), np.asarray(image))
    compact, _ = render.render(verts, tris, uv, texture, cam, light, size, background=0.3,
                               pixel_budget=400, triangle_ids=aux["triangle_ids"])
    np.testing.assert_allclose(np.asarray(compact), np.asarray(image), atol=1e-6)
    for bad in (jnp.zeros((size, size + 1), jnp.int32), jnp.zeros((size, size), jnp.float32)):
        with pytest.raises(ValueError, match="triangle_ids"):
            render.render(verts, tris, uv, texture, cam, light, size, triangle_ids=bad)
