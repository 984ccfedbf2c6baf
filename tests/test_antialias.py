"""Silhouette antialiasing (`render.antialias`, nvdiffrast's analytic antialiasing): outlines
that carry gradients, checked against exact coverage, supersampling and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import camera, fitting, losses, render
from ganfit_jax.render import antialias, edge_neighbours, rasterize


def _draw(pixels, triangles, size, depth=None, colour=None, smooth=True):
    """(antialiased image, hard image, triangle ids) of flat-coloured triangles."""
    pixels = jnp.asarray(pixels, jnp.float32)
    depth = jnp.full(pixels.shape[0], 10.0) if depth is None else jnp.asarray(depth, jnp.float32)
    ids, depth_map = rasterize(pixels, depth, triangles, size)
    hard = (ids >= 0).astype(jnp.float32)[..., None] if colour is None else colour(ids)
    out = antialias(hard, ids, depth_map, pixels, triangles) if smooth else hard
    return out, hard, ids


def _supersampled_coverage(pixels, triangles, size, factor=16):
    """The box-filtered coverage of the triangles, by rasterizing at `factor`× resolution."""
    ids, _ = rasterize(jnp.asarray(pixels, jnp.float32) * factor,
                       jnp.full(len(pixels), 10.0), triangles, (size[0] * factor, size[1] * factor))
    fine = np.asarray(ids >= 0, np.float64)
    return fine.reshape(size[0], factor, size[1], factor).mean(axis=(1, 3))


def test_edge_neighbours_pair_the_triangles_on_either_side_of_every_edge(sfm_model):
    triangles = np.asarray(sfm_model.triangles)
    owners = {}
    for f, tri in enumerate(triangles):
        for k in range(3):
            owners.setdefault(frozenset((tri[k], tri[(k + 1) % 3])), []).append(f)
    got = np.asarray(edge_neighbours(triangles))
    assert got.shape == triangles.shape
    for f, tri in enumerate(triangles):
        for k in range(3):
            others = [g for g in owners[frozenset((tri[k], tri[(k + 1) % 3]))] if g != f]
            assert got[f, k] == (others[0] if others else -1)
    assert (got == -1).any() and (got >= 0).mean() > 0.9  # an open face mesh: a boundary
    # traced (a model passed to a jitted function as an argument): the sort in jnp, same pairs
    np.testing.assert_array_equal(np.asarray(jax.jit(edge_neighbours)(triangles)), got)


RECT = np.array([[3.3, 4.2], [11.8, 4.2], [11.8, 12.6], [3.3, 12.6]], np.float32)
QUAD = np.array([[0, 1, 2], [0, 2, 3]], np.int32)


def test_an_edge_along_a_row_or_column_is_blended_by_its_exact_coverage():
    out = np.asarray(_draw(RECT, QUAD, (16, 16))[0][..., 0])
    exact = np.asarray(_supersampled_coverage(RECT, QUAD, (16, 16), factor=20))
    # every pixel of the edges but the four corners (whose two edges meet in one pixel)
    inner_rows, inner_cols = slice(5, 12), slice(4, 11)
    np.testing.assert_allclose(out[inner_rows, 3], 0.7, atol=1e-5)  # x from 3.3
    np.testing.assert_allclose(out[inner_rows, 11], 0.8, atol=1e-5)  # x to 11.8
    np.testing.assert_allclose(out[4, inner_cols], 0.8, atol=1e-5)  # y from 4.2
    np.testing.assert_allclose(out[12, inner_cols], 0.6, atol=1e-5)  # y to 12.6
    np.testing.assert_allclose(out[inner_rows, inner_cols], 1.0)
    corners = np.zeros_like(out, bool)
    corners[[4, 4, 12, 12], [3, 11, 3, 11]] = True
    np.testing.assert_allclose(out[~corners], exact[~corners], atol=1e-5)


TRIANGLE = np.array([[5.2, 3.7], [27.4, 9.1], [11.6, 28.3]], np.float32)
ONE = np.array([[0, 1, 2]], np.int32)


def test_a_slanted_outline_comes_close_to_supersampling_and_its_gradient_to_the_areas():
    size = (32, 32)
    out, hard, _ = _draw(TRIANGLE, ONE, size)
    reference = _supersampled_coverage(TRIANGLE, ONE, size)
    smooth_error = np.abs(np.asarray(out[..., 0]) - reference).mean()
    hard_error = np.abs(np.asarray(hard[..., 0]) - reference).mean()
    assert smooth_error < 0.4 * hard_error

    # the triangle scaled by s about its centroid: area s²·A, so d(coverage)/ds = 2A at s = 1
    centre = TRIANGLE.mean(axis=0)
    ids, depth_map = rasterize(jnp.asarray(TRIANGLE), jnp.full(3, 10.0), ONE, size)
    colour = (ids >= 0).astype(jnp.float32)[..., None]

    def coverage(s):
        return antialias(colour, ids, depth_map, centre + s * (TRIANGLE - centre), ONE).sum()

    x, y = TRIANGLE[:, 0], TRIANGLE[:, 1]
    area = 0.5 * abs((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0]))
    assert float(jax.jit(jax.grad(coverage))(1.0)) == pytest.approx(2 * area, rel=0.08)


def test_the_outline_alone_pulls_the_mesh_towards_its_target():
    """A flat-coloured triangle carries no gradient through its shading; antialiased, an L2 loss
    against the same triangle 1.5 px to the right pulls it right, and the gradient is the
    loss's own slope (central differences along it; the blend is piecewise smooth, so the step
    stays small)."""
    size = (32, 32)
    shift = np.array([1.5, 0.0], np.float32)
    target = _draw(TRIANGLE + shift, ONE, size)[0]
    ids, depth_map = rasterize(jnp.asarray(TRIANGLE), jnp.full(3, 10.0), ONE, size)
    colour = (ids >= 0).astype(jnp.float32)[..., None]

    def loss(pixels):
        return jnp.sum(jnp.square(antialias(colour, ids, depth_map, pixels, ONE) - target))

    grad = np.asarray(jax.grad(loss)(jnp.asarray(TRIANGLE)))
    assert grad[:, 0].sum() < 0 and abs(grad[:, 1].sum()) < abs(grad[:, 0].sum())
    direction = -grad / np.abs(grad).max()
    eps = 1e-3
    slope = (float(loss(jnp.asarray(TRIANGLE + eps * direction)))
             - float(loss(jnp.asarray(TRIANGLE - eps * direction)))) / (2 * eps)
    assert slope < 0 and slope == pytest.approx(float(np.sum(grad * direction)), rel=0.03)


def test_edges_inside_one_surface_are_left_alone():
    """A 6×6 grid of triangles facing one way, each a random colour: only the outline changes,
    never an edge between two triangles of the surface, however different their colours."""
    size = (40, 40)
    grid = np.stack(np.meshgrid(np.linspace(6.3, 33.6, 7), np.linspace(5.8, 34.1, 7)), -1)
    pixels = grid.reshape(-1, 2).astype(np.float32)
    quads = [(r * 7 + c, r * 7 + c + 1, (r + 1) * 7 + c + 1, (r + 1) * 7 + c)
             for r in range(6) for c in range(6)]
    triangles = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))], np.int32)
    palette = jnp.asarray(np.random.default_rng(0).random((len(triangles), 3)), jnp.float32)

    def colour(ids):
        return jnp.where((ids >= 0)[..., None], palette[jnp.maximum(ids, 0)], 0.0)

    out, hard, ids = _draw(pixels, triangles, size, colour=colour)
    covered = np.asarray(ids >= 0)
    inner = covered.copy()
    inner[1:] &= covered[:-1]
    inner[:-1] &= covered[1:]
    inner[:, 1:] &= covered[:, :-1]
    inner[:, :-1] &= covered[:, 1:]
    changed = np.any(np.asarray(out) != np.asarray(hard), axis=-1)
    assert not changed[inner].any()
    near = covered.copy()
    near[1:] |= covered[:-1]
    near[:-1] |= covered[1:]
    near[:, 1:] |= covered[:, :-1]
    near[:, :-1] |= covered[:, 1:]
    assert not changed[~near].any()
    # each of the four sides, 27-28 px long, changes one pixel per row or column
    assert changed.sum() >= 4 * 26


def test_a_fold_away_from_the_camera_is_an_outline():
    """Two triangles sharing the edge x = 20.3: unfolded (side by side, facing one way) the
    edge is inside the surface; folded (the second turned back behind the first, facing away)
    it is the outline, blended with the background beyond it."""
    size = (32, 32)
    shared = [[20.3, 4.0], [20.3, 28.0]]
    front = np.array([[6.0, 16.0]] + shared, np.float32)
    unfolded = np.concatenate([front, [[30.0, 16.0]]]).astype(np.float32)
    folded = np.concatenate([front, [[12.0, 16.0]]]).astype(np.float32)
    triangles = np.array([[0, 1, 2], [2, 1, 3]], np.int32)
    depth = np.array([10.0, 10.0, 10.0, 12.0])  # the folded half lies behind the first
    column = 20  # the pixels whose centre (x = 20.5) lies just past the shared edge
    out_unfolded = np.asarray(_draw(unfolded, triangles, size, depth)[0][..., 0])
    out_folded = np.asarray(_draw(folded, triangles, size, depth)[0][..., 0])
    rows = slice(12, 20)
    np.testing.assert_allclose(out_unfolded[rows, column - 1:column + 2], 1.0)
    np.testing.assert_allclose(out_folded[rows, column - 1], 1.0)
    np.testing.assert_allclose(out_folded[rows, column], 0.3, atol=1e-5)  # 20.3 − 20.0


def test_render_antialias_gives_the_face_outline_the_gradient_of_its_area(sfm_model):
    """The SFM face's antialiased coverage: the mask away from the outline, and its total (the
    face's area on screen) moving with the camera's distance as the area of a 16× supersampled
    render does (finite differences)."""
    size = (64, 64)
    focal = camera.default_focal(size)
    verts = sfm_model.mean
    colours = jnp.full((verts.shape[0], 3), 0.6, jnp.float32)
    light = jnp.asarray([0, 0, 1000, 0, 0, 0, 1, 1, 1], jnp.float32)

    def cam(distance, factor=1):
        return jnp.asarray([0, 0, distance, 0, 10, 0, focal * factor], jnp.float32)

    def draw(distance, antialias):
        return render.render(verts, sfm_model.triangles, sfm_model.uv, colours, cam(distance),
                             light, size, antialias=antialias)

    # jitted, as fit runs the renderer (op by op, each of its operations compiles on its own)
    draw = jax.jit(draw, static_argnums=1)

    def coverage(distance):
        return draw(distance, True)[1]["coverage"]

    def supersampled_area(distance, factor=16):
        pixels, depth = camera.project(cam(distance, factor), verts, (64 * factor, 64 * factor))
        ids, _ = rasterize(pixels, depth, sfm_model.triangles, (64 * factor, 64 * factor))
        return float(jnp.sum(ids >= 0)) / factor ** 2

    image, aux = draw(1050.0, True)
    hard, hard_aux = draw(1050.0, False)
    cov, mask = np.asarray(aux["coverage"]), np.asarray(hard_aux["mask"])
    assert cov.min() >= 0 and cov.max() <= 1 + 1e-6
    outline = np.abs(cov - mask) > 1e-6
    assert 0 < outline.sum() < 0.2 * mask.sum()
    same = ~outline
    np.testing.assert_allclose(np.asarray(image)[same], np.asarray(hard)[same], atol=1e-6)
    assert float(jnp.sum(aux["coverage"])) == pytest.approx(supersampled_area(1050.0), rel=0.02)
    grad = float(jax.jit(jax.grad(lambda d: jnp.sum(coverage(d))))(1050.0))
    finite = (supersampled_area(1090.0) - supersampled_area(1010.0)) / 80.0
    assert grad < 0 and grad == pytest.approx(finite, rel=0.05)


def test_a_silhouette_term_fits_the_camera_only_with_antialiasing(sfm_model):
    """A research variant through `FitConfig.extra_terms`: the face's antialiased coverage
    against a silhouette (the face 60 mm farther away, 16× supersampled) fits the camera with
    every other block held; without `Pipeline.antialias` the same term has no gradient and the
    camera stays where it started."""
    from test_pixel_weight import frontal_face

    size = (64, 64)
    pipe, params = frontal_face(sfm_model, size)
    far = params.camera.at[2].add(60.0)
    pixels, depth = camera.project(far.at[6].multiply(16), sfm_model.mean, (1024, 1024))
    ids, _ = rasterize(pixels, depth, sfm_model.triangles, (1024, 1024))
    silhouette = jnp.asarray(np.asarray(ids >= 0, np.float32).reshape(64, 16, 64, 16)
                             .mean(axis=(1, 3)))

    def silhouette_term(p, target, pipeline, render):
        return jnp.mean(jnp.abs(render["coverage"] - silhouette))

    lm = fitting.project_landmarks(pipe, params, None)
    target = fitting.target_from_image(pipe, np.zeros(size + (3,), np.float32), lm)
    config = fitting.FitConfig(
        stage1_iterations=0, stage2_iterations=60, learning_rate=0.1, chunk=60,
        frozen=("shape", "expression", "texture", "light"),
        weights=losses.LossWeights(landmark=0, pixel=0, identity=0, content=0,
                                   identity_random=0),
        extra_terms=(("silhouette", 1.0, silhouette_term),))
    start_error = float(silhouette_term(params, target, pipe, dict(
        coverage=fitting.render_face(pipe.replace(antialias=True), params)[1]["coverage"])))
    fitted, history = fitting.fit(pipe.replace(antialias=True), params, target, config, log=None)
    end_error = float(np.asarray(history[2]["silhouette"])[-1])
    assert end_error < 0.3 * start_error
    hard, _ = fitting.fit(pipe, params, target, config, log=None)
    np.testing.assert_array_equal(np.asarray(hard.camera), np.asarray(params.camera))
    with pytest.raises(ValueError, match="Pipeline.antialias"):
        fitting.render_face(pipe.replace(antialias=True, render_fn=render.render), params)


def test_an_antialiased_face_pastes_over_a_photo_without_a_dark_fringe(sfm_model):
    """fit's overlays (`experiments.common.render_with_alpha`): the antialiased render is over
    black, so its outline pixels are darkened by their coverage; un-premultiplied, a face of one
    colour is that colour wherever it covers any of a pixel, with the coverage as its alpha."""
    from experiments import common
    from test_pixel_weight import frontal_face

    pipe, params = frontal_face(sfm_model, (64, 64))
    pipe = pipe.replace(texture_fn=lambda _, p_t: jnp.full((8, 8, 3), 0.6), antialias=True)
    params = params.replace(light=jnp.asarray([0, 0, 1000, 0, 0, 0, 1, 1, 1], jnp.float32))
    colour, alpha = common.render_with_alpha(pipe, params)
    partial = (alpha > 0.05) & (alpha < 0.95)
    assert partial.sum() > 50  # the outline, blended
    np.testing.assert_allclose(colour[alpha > 0.05], 0.6, atol=1e-4)
    hard_colour, hard_alpha = common.render_with_alpha(pipe.replace(antialias=False), params)
    assert set(np.unique(hard_alpha)) == {0.0, 1.0}
    np.testing.assert_allclose(hard_colour[hard_alpha > 0], 0.6, atol=1e-4)


def test_antialiasing_under_vmap_equals_one_view_at_a_time(sfm_model):
    """A batch of views (fit's vmapped steps on accelerators): the walks' loops run until every
    item's pairs are done, and each item's image and gradient are its own."""
    size = (48, 48)
    focal = camera.default_focal(size)
    colours = jnp.full((sfm_model.num_vertices, 3), 0.6, jnp.float32)
    light = jnp.asarray([0, 0, 1000, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], jnp.float32)
    cams = jnp.asarray([[0, 0, 1050, 0, 10, 0, focal], [300, 0, 1000, 0, 10, 0, focal]],
                       jnp.float32)

    def view(cam):
        image, aux = render.render(sfm_model.mean, sfm_model.triangles, sfm_model.uv, colours,
                                   cam, light, size, antialias=True)
        return image, jnp.sum(aux["coverage"])

    def coverage(cam):
        return view(cam)[1]

    # jitted, as fit runs them (op by op, vmap and grad compile each operation on its own)
    images, _ = jax.jit(jax.vmap(view))(cams)
    grads = jax.jit(jax.vmap(jax.grad(coverage)))(cams)
    one_view, one_grad = jax.jit(view), jax.jit(jax.grad(coverage))
    for k in range(2):
        image, _ = one_view(cams[k])
        np.testing.assert_allclose(np.asarray(images[k]), np.asarray(image), atol=1e-5)
        np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(one_grad(cams[k])),
                                   rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(grads)).max() > 0


def test_an_eager_call_compiles_the_walks_once(compilations):
    """Called on concrete arrays (a notebook's `render(..., antialias=True)`), a second call of
    the same shapes compiles nothing: the outline's walks are one jitted program, not while
    loops traced and compiled again at every call (0.6 s a call at 128² before)."""
    pixels = jnp.asarray(TRIANGLE)
    ids, depth_map = rasterize(pixels, jnp.full(3, 10.0), ONE, (32, 32))
    colour = (ids >= 0).astype(jnp.float32)[..., None]
    first = antialias(colour, ids, depth_map, pixels, ONE)
    moved = pixels + 0.25
    with compilations() as compiled:
        second = antialias(colour, ids, depth_map, moved, ONE)
    assert not compiled, compiled
    assert np.abs(np.asarray(second) - np.asarray(first)).max() > 0.01  # it did run
