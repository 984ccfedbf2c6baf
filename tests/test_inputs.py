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


@pytest.mark.parametrize("size", [None, 96])
def test_inside_photo_marks_the_crop_pixels_the_photo_shows(size):
    """A photo dark but for its last row and column: the crop replicates them beyond the
    bottom-right border, so what `inside_photo` marks outside must read bright there, and what it
    marks inside (a pixel away from the border, beyond the bilinear filter's reach) dark."""
    img = np.zeros((200, 160, 3), np.float32)
    img[-1], img[:, -1] = 1.0, 1.0
    rng = np.random.default_rng(1)
    lm = rng.uniform([100, 140], [150, 195], size=(68, 2))  # a face in the bottom-right corner
    _, _, tf = inputs.crop_face(img, lm, size=64)
    crop = inputs.crop_square(img, tf, size)
    inside = inputs.inside_photo(tf, size)
    n = crop.shape[0]
    assert inside.shape == (n, n) and inside.any() and not inside.all()
    # a pixel's distance to the other side of the border, in crop pixels
    near = np.zeros_like(inside)
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            near |= np.roll(inside, shift, axis) != inside
    assert np.all(crop[~inside & ~near] > 0.99)
    assert np.all(crop[inside & ~near] < 0.01)
    assert not inside[-1, -1] and inside[0, 0]


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


def crop_of_the_padded_photo(image, landmarks, size, margin=1.6):
    """The crop by its definition: the whole photo edge-padded by the square's side, then the
    square resampled (bilinear, antialiased) out of it."""
    from PIL import Image

    x0, y0, side = inputs.face_box(landmarks, margin)
    pad = int(np.ceil(side)) + 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    pil = Image.fromarray(np.clip(padded * 255.0 + 0.5, 0, 255).astype(np.uint8))
    box = (x0 + pad, y0 + pad, x0 + pad + side, y0 + pad + side)
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR, box=box))


@pytest.mark.parametrize("size", [64, 224, 700])
@pytest.mark.parametrize("centre", [(400, 300), (20, 580), (790, 10)])
def test_the_crop_reads_a_window_yet_equals_the_crop_of_the_padded_photo(size, centre):
    """Only the square and the filter's reach are read (a 12 MP photo is not padded whole),
    at the photo's corners too; float rounding of the box may move a value by one level."""
    image = np.random.default_rng(size).random((600, 800, 3)).astype(np.float32)
    lm = np.random.default_rng(3).uniform(-100, 100, size=(68, 2)) + np.asarray(centre)
    crop, _, _ = inputs.crop_face(image, lm, size)
    levels = np.round(crop * 255).astype(int)
    difference = np.abs(levels - crop_of_the_padded_photo(image, lm, size))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (difference > 0).mean()


def test_landmarks_outside_the_photo_are_refused():
    image = gradient_image(100, 120)
    lm = np.random.default_rng(4).uniform(500, 600, size=(68, 2))
    with pytest.raises(ValueError, match="none of the points lies inside the 120×100 image"):
        inputs.crop_face(image, lm)
    inputs.crop_face(image, lm - 490)  # a face half outside the photo is still cropped


def paste_back_everywhere(original, crop_image, crop_mask, transform):
    """The composite by its definition: every pixel of the photo sampled from the crop."""
    h, w = original.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    pts = transform.to_crop(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1))
    size = transform.size
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < size) & (pts[:, 1] >= 0) & (pts[:, 1] < size)
    mask = np.asarray(crop_mask, np.float32)[..., None]
    colour = inputs.bilinear(np.asarray(crop_image, np.float32) * mask, pts) * inside[:, None]
    alpha = inputs.bilinear(mask, pts) * inside[:, None]
    return (original.reshape(-1, 3) * (1 - alpha) + colour).reshape(h, w, 3)


@pytest.mark.parametrize("centre", [(120, 90), (5, 170), (235, 3), (-60, 90)])
def test_paste_back_touches_only_the_square_and_equals_sampling_every_pixel(centre):
    rng = np.random.default_rng(5)
    photo = rng.random((180, 240, 3)).astype(np.float32)
    lm = rng.uniform(-30, 30, size=(68, 2)) + np.asarray(centre)
    lm[0] = (10, 10)  # one point inside the photo: the crop is allowed
    _, _, tf = inputs.crop_face(photo, lm, size=48)
    render, mask = rng.random((48, 48, 3)), rng.random((48, 48))
    pasted = inputs.paste_back(photo, render, mask, tf)
    assert pasted.dtype == np.float32
    np.testing.assert_array_equal(pasted, paste_back_everywhere(photo, render, mask, tf)
                                  .astype(np.float32))


@pytest.mark.parametrize("size", [48, 96, 200])
def test_a_pasted_face_has_no_dark_outline(size):
    """A face of one colour (a disk, the render black around it) pasted into a photo of
    another, the crop magnified or shrunk: every pixel is a mix of the two colours, none darker
    than both, and the disk's edge is blended, not cut."""
    photo = np.full((120, 120, 3), 0.8, np.float32)
    lm = np.random.default_rng(6).uniform(35, 85, size=(68, 2))
    _, _, tf = inputs.crop_face(photo, lm, size=size)
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    disk = ((xs - size / 2) ** 2 + (ys - size / 2) ** 2 < (size / 3) ** 2).astype(np.float32)
    face = np.array([0.9, 0.6, 0.5], np.float32)
    render = disk[..., None] * face  # over black, as the renderer draws it
    pasted = inputs.paste_back(photo, render, disk, tf)
    share = (pasted - photo) / (face - photo)  # per channel: 0 the photo, 1 the face
    np.testing.assert_allclose(share, share[..., :1].repeat(3, -1), atol=1e-5)
    assert share.min() > -1e-5 and share.max() < 1 + 1e-5
    assert ((share > 0.05) & (share < 0.95)).any()  # the edge, blended


def test_too_few_landmarks():
    with pytest.raises(ValueError, match="landmarks: need at least 3"):
        inputs.crop_face(np.zeros((10, 10, 3)), np.full((68, 2), np.nan))
