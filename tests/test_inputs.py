"""The working crop around the face and its way back onto the photo."""

import numpy as np
import pytest

from ganfit_jax import inputs


def gradient_image(h, w):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xs / w, ys / h, 0.5 * np.ones_like(xs)], -1)


def test_crop_maps_landmarks_and_pixels():
    img = gradient_image(300, 400)
    rng = np.random.default_rng(0)
    lm = rng.uniform([150, 100], [250, 220], size=(68, 2))
    crop, lm_crop, tf = inputs.crop_face(img, lm, size=128)
    assert crop.shape == (128, 128, 3) and crop.dtype == np.float32
    np.testing.assert_allclose(tf.to_original(lm_crop), lm, atol=1e-3)
    # the crop pixel at a landmark shows the colour the photo has there (a linear ramp)
    for k in (0, 30, 50):
        x, y = lm_crop[k]
        got = crop[int(y), int(x)]
        ox, oy = tf.to_original([[int(x) + 0.5, int(y) + 0.5]])[0]
        np.testing.assert_allclose(got[:2], [ox / 400, oy / 300], atol=0.02)
    assert lm_crop.min() > 0 and lm_crop.max() < 128


def test_crop_near_the_border_replicates_edges():
    img = gradient_image(100, 100)
    lm = np.random.default_rng(1).uniform(0, 30, size=(68, 2))
    crop, _, _ = inputs.crop_face(img, lm, size=64)
    assert np.isfinite(crop).all() and crop.min() >= 0 and crop[0, 0, 2] == pytest.approx(0.5, abs=0.01)


def test_paste_back_round_trip():
    img = gradient_image(200, 240)
    lm = np.random.default_rng(2).uniform([80, 60], [160, 150], size=(68, 2))
    crop, _, tf = inputs.crop_face(img, lm, size=96)
    out = inputs.paste_back(np.zeros_like(img), crop, np.ones((96, 96)), tf)
    x0, y0 = tf.origin
    side = 96 / tf.scale
    ys, xs = np.mgrid[int(y0) + 3:int(y0 + side) - 3, int(x0) + 3:int(x0 + side) - 3]
    np.testing.assert_allclose(out[ys, xs], img[ys, xs], atol=0.02)
    assert (out[0, 0] == 0).all()  # outside the crop the photo is untouched


def test_too_few_landmarks():
    with pytest.raises(ValueError, match="landmarks: need at least 3"):
        inputs.crop_face(np.zeros((10, 10, 3)), np.full((68, 2), np.nan))
