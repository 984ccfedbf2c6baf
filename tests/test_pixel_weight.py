"""A face mask in the pixel loss (Eq. 10): `Target.pixel_weight`, read by
`inputs.load_pixel_weight` and cropped by `inputs.crop_pixel_weight`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import fitting, inputs, losses, morphable

SIZE = (64, 64)


def frontal_face(model, size, light=fitting.DEFAULT_LIGHT):
    """(pipeline, params): the mean face 1050 mm in front of the camera with the direct UV
    texture at its skin-tone start."""
    from ganfit_jax import camera
    from ganfit_jax.texture.direct import DirectUVTexture

    texture = DirectUVTexture(coarse=4, resolution=16)
    params = fitting.FitParams(
        shape=jnp.zeros(model.num_shape), expression=jnp.zeros(model.num_expression),
        texture=jnp.asarray(texture.init_latent()),
        camera=jnp.asarray([0, 0, 1050, 0, 10, 0, camera.default_focal(size), 0], jnp.float32),
        light=jnp.asarray(light, jnp.float32))
    return fitting.make_pipeline(model, texture, None, size), params


def test_pixel_loss_is_the_weighted_mean_absolute_error():
    rng = np.random.default_rng(0)
    render, photo = rng.random((2, 8, 9, 3))
    coverage = (rng.random((8, 9)) > 0.3).astype(np.float64)
    weight = rng.random((8, 9))
    value = float(losses.pixel_loss(jnp.asarray(render), jnp.asarray(photo),
                                    jnp.asarray(coverage * weight)))
    w = coverage * weight
    expected = np.sum(w[..., None] * np.abs(render - photo)) / np.sum(w)
    assert value == pytest.approx(expected, rel=1e-5)


def test_what_the_mask_hides_neither_moves_the_loss_nor_its_gradient(sfm_model):
    """An occluder (a hand, hair) painted over half the face: with the face mask zero there, the
    pixel term and its gradient are those of the photo without it; without the mask the
    occluder pulls on the texture."""
    pipe, params = frontal_face(sfm_model, SIZE)
    full = np.asarray(fitting.project_landmarks(pipe, params, None))
    photo, aux = fitting.render_face(pipe, params.replace(texture=params.texture + 0.3))
    photo = np.asarray(photo)
    occluded = photo.copy()
    occluded[:, 32:] = [0.9, 0.1, 0.8]  # the face's right half behind a magenta hand
    weight = np.ones(SIZE, np.float32)
    weight[:, 32:] = 0.0
    assert np.asarray(aux["mask"])[:, 32:].sum() > 100  # the hand covers part of the face
    weights = losses.LossWeights(identity=0, identity_random=0, content=0, landmark=0)

    @jax.jit
    @jax.value_and_grad
    def pixel_value_and_grad(p, target):
        return fitting.loss(p, target, pipe, jax.random.key(0), weights)[1]["pixel"]

    def pixel_term(image, pixel_weight):
        return pixel_value_and_grad(params, fitting.target_from_image(
            pipe, image, full, pixel_weight=pixel_weight))

    clean, clean_grad = pixel_term(photo, weight)
    masked, masked_grad = pixel_term(occluded, weight)
    assert float(masked) == pytest.approx(float(clean), rel=1e-6)
    for a, b in zip(jax.tree.leaves(masked_grad), jax.tree.leaves(clean_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    unmasked, unmasked_grad = pixel_term(occluded, None)
    assert float(unmasked) > 1.5 * float(clean)
    assert not np.allclose(np.asarray(unmasked_grad.texture), np.asarray(clean_grad.texture),
                           atol=1e-4)
    with pytest.raises(ValueError, match=r"pixel_weight: expected \(64, 64\)"):
        fitting.target_from_image(pipe, photo, full, pixel_weight=np.ones((32, 32)))


def test_the_identity_terms_see_the_occluder_in_the_render_too(sfm_model):
    """F^n(I_0) of an occluded photo saw the hand: the render it is compared with gets the
    photo's pixels where the mask hides the face (`fitting.identity_view`), so a render of the
    very face behind the hand matches it in identity (Eq. 8, 9 ≈ 0) where, without the mask, the
    missing hand alone costs identity."""
    from ganfit_jax import identity

    pipe, params = frontal_face(sfm_model, SIZE)
    net = identity.load_identity("tiny", key=jax.random.PRNGKey(0))
    pipe = pipe.replace(identity_params=net, identity_fn=fitting.identity_of)
    full = np.asarray(fitting.project_landmarks(pipe, params, None))
    photo = np.asarray(fitting.render_face(pipe, params)[0])
    occluded = photo.copy()
    occluded[:, 32:] = [0.9, 0.1, 0.8]
    weight = np.ones(SIZE, np.float32)
    weight[:, 32:] = 0.0
    weights = losses.LossWeights(identity_random=0, landmark=0, pixel=0)

    def terms(pixel_weight):
        target = fitting.target_from_image(pipe, occluded, full, pixel_weight=pixel_weight)
        _, t = fitting.loss(params, target, pipe, jax.random.key(0), weights)
        composite = np.asarray(fitting.identity_view(
            fitting.render_face(pipe, params, background=target.image)[0], target))
        return float(t["identity"]), float(t["content"]), composite

    masked_id, masked_content, composite = terms(weight)
    np.testing.assert_allclose(composite, occluded, atol=1e-6)
    assert masked_id < 1e-5 and masked_content < 1e-6
    unmasked_id, unmasked_content, _ = terms(None)
    assert unmasked_id > 100 * max(masked_id, 1e-6)
    assert unmasked_content > 100 * max(masked_content, 1e-7)


def _save(path, array, palette=False):
    from PIL import Image

    image = Image.fromarray(array)
    if palette:  # indices into a colour table, as face parsers save their label maps
        image.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
        assert image.mode == "P"
    image.save(path)
    return path


def test_mask_files_as_weights_or_label_maps(tmp_path):
    rng = np.random.default_rng(1)
    hw = (30, 40)
    binary = rng.random(hw) > 0.5
    # a 0/255 PNG, a 0/1 PNG, a float .npy in [0, 1], a bool .npy: weights as they are
    np.testing.assert_array_equal(inputs.load_pixel_weight(
        _save(tmp_path / "a.png", (binary * 255).astype(np.uint8)), hw), binary)
    np.testing.assert_array_equal(inputs.load_pixel_weight(
        _save(tmp_path / "b.png", binary.astype(np.uint8)), hw), binary)
    soft = rng.random(hw)
    np.save(tmp_path / "c.npy", soft)
    np.testing.assert_allclose(inputs.load_pixel_weight(tmp_path / "c.npy", hw), soft, atol=1e-7)
    np.save(tmp_path / "d.npy", binary)
    np.testing.assert_array_equal(inputs.load_pixel_weight(tmp_path / "d.npy", hw), binary)
    # a face parser's label map (CelebAMask-HQ's classes) as a palette PNG, as they are saved
    labels = rng.integers(0, 19, hw).astype(np.uint8)
    path = tmp_path / "parsing.png"
    _save(path, labels, palette=True)
    np.testing.assert_array_equal(inputs.load_pixel_weight(path, hw, labels="celebamask"),
                                  np.isin(labels, (1, 2, 3, 4, 5, 10, 11, 12, 13)))
    np.testing.assert_array_equal(inputs.load_pixel_weight(path, hw, labels=[1, 17]),
                                  np.isin(labels, (1, 17)))
    np.testing.assert_array_equal(inputs.load_pixel_weight(path, hw, labels="nonzero"),
                                  labels != 0)
    # ... which read as weights would be silently wrong: refused, naming the way out
    with pytest.raises(ValueError, match=r"parsing.png: values 0..18 in 19 levels .*"
                                         r"--mask_labels=celebamask"):
        inputs.load_pixel_weight(path, hw)
    with pytest.raises(ValueError, match=r"a.png: 40×30 pixels, the photo is 30×40"):
        inputs.load_pixel_weight(tmp_path / "a.png", (40, 30))
    colour = np.zeros(hw + (3,), np.uint8)
    colour[..., 0] = 255
    with pytest.raises(ValueError, match="colour image; expected one channel"):
        inputs.load_pixel_weight(_save(tmp_path / "e.png", colour), hw)
    with pytest.raises(FileNotFoundError, match="face mask .*nope.png does not exist"):
        inputs.load_pixel_weight(tmp_path / "nope.png", hw)
    with pytest.raises(ValueError, match="labels: expected integers"):
        inputs.load_pixel_weight(path, hw, labels="skin")


def test_the_crop_of_a_mask_lines_up_with_the_crop_of_its_photo():
    rng = np.random.default_rng(2)
    photo = np.zeros((120, 160, 3), np.float32)
    photo[30:90, 50:110] = 1.0  # a bright square, and its mask
    photo += rng.random(photo.shape).astype(np.float32) * 0.05
    mask = np.zeros((120, 160), np.float32)
    mask[30:90, 50:110] = 1.0
    lm = np.stack([rng.uniform(55, 105, 68), rng.uniform(35, 85, 68)], -1)
    crop, _, transform = inputs.crop_face(photo, lm, 96)
    weight = inputs.crop_pixel_weight(mask, transform)
    assert weight.shape == (96, 96) and weight.dtype == np.float32
    bright = crop[..., 0] > 0.55
    assert np.mean((weight > 0.5) == bright) > 0.995


def test_unwrap_leaves_out_what_the_mask_hides_and_mirrors_the_other_side(sfm_model):
    from ganfit_jax.texture import unwrap

    size = (96, 96)
    pipe, params = frontal_face(sfm_model, size)
    photo = np.asarray(fitting.render_face(pipe, params)[0]).copy()
    photo[:, 48:] = [0.9, 0.1, 0.8]  # the face's left half (image right) behind a magenta hand
    hidden = np.ones(size, np.float32)
    hidden[:, 46:] = 0.0
    verts = np.asarray(morphable.vertices(sfm_model, params.shape, params.expression))

    def unwrapped(weight):
        return unwrap.unwrap(sfm_model, verts, params.camera, photo, 64, pixel_weight=weight)

    def magenta(uv_map, mask):
        hit = (uv_map[..., 0] > 0.8) & (uv_map[..., 1] < 0.2) & (uv_map[..., 2] > 0.7)
        return np.sum(hit & (mask > 0))

    plain_map, plain_mask = unwrapped(None)
    ones_map, ones_mask = unwrapped(np.ones(size, np.float32))
    np.testing.assert_array_equal(ones_map, plain_map)
    np.testing.assert_array_equal(ones_mask, plain_mask)
    masked_map, masked_mask = unwrapped(hidden)
    assert magenta(plain_map, plain_mask) > 100
    assert magenta(masked_map, masked_mask) == 0
    # the hidden side's texels are filled from the side the photo shows
    assert np.sum(masked_mask == 1) < 0.7 * np.sum(plain_mask == 1)
    assert np.sum(masked_mask == 0.5) > np.sum(plain_mask == 0.5) + 100
    with pytest.raises(ValueError, match=r"pixel_weight: expected \(96, 96\)"):
        unwrapped(np.ones((10, 10)))


def test_skin_weight_keeps_skin_and_face_parts_and_drops_what_is_not_skin(sfm_model):
    """A rendered face (skin tone, Phong-shaded: its brightness varies, its chromaticity
    does not), red lips and dark eyes inside their landmark outlines, over a blue background,
    with a dark-brown "lock of hair" and a grey "microphone" over the face."""
    size = (128, 128)
    pipe, params = frontal_face(sfm_model, size,
                                light=[300.0, 300.0, 1000.0, 0.7, 0.7, 0.7, 0.3, 0.3, 0.3])
    background = jnp.broadcast_to(jnp.asarray([0.2, 0.3, 0.8]), size + (3,))
    photo, aux = fitting.render_face(pipe, params, background=background)
    photo, face = np.asarray(photo).copy(), np.asarray(aux["mask"]) > 0.5
    from experiments import benchmark_quality

    verts = morphable.vertices(sfm_model, params.shape, params.expression)
    # the jaw along the SFM's contour, the points it lacks from their neighbours
    lm = benchmark_quality.truth_landmarks(sfm_model, np.asarray(verts), params.camera, size)
    lips = inputs._polygon_mask(size, lm[48:60])
    eyes = inputs._polygon_mask(size, lm[36:42]) | inputs._polygon_mask(size, lm[42:48])
    photo[lips] = [0.75, 0.1, 0.15]
    photo[eyes] = [0.15, 0.1, 0.1]
    hair, mic = np.zeros(size, bool), np.zeros(size, bool)
    brows, eye, nose, mouth = lm[17:27, 1].min(), lm[45], lm[35], lm[54]
    hair[int(brows) - 22:int(brows) - 6, int(lm[19, 0]):int(lm[24, 0])] = True  # the forehead
    mic[int(eye[1]) + 8:int(mouth[1]) - 8, int(nose[0]) + 8:int(eye[0]) + 4] = True  # a cheek
    photo[hair] = [0.25, 0.15, 0.08]
    photo[mic] = [0.55, 0.55, 0.55]
    assert face[hair].mean() > 0.8 and face[mic].mean() > 0.8
    weight = inputs.skin_pixel_weight(photo, lm)
    assert weight.shape == size and weight.dtype == np.float32
    skin = face & ~hair & ~mic & ~lips & ~eyes
    assert weight[skin].mean() > 0.97 and np.mean(weight[skin] == 1) > 0.95
    assert weight[lips].min() == 1 and weight[eyes].min() == 1
    assert weight[hair].max() < 0.05 and weight[mic].max() < 0.05
    assert weight[~face].mean() < 0.02  # the blue background
    # a greyscale photo has no chromaticity to tell skin by: every pixel counts
    grey = np.repeat(photo.mean(-1, keepdims=True), 3, -1)
    np.testing.assert_array_equal(inputs.skin_pixel_weight(grey, lm), 1.0)
    np.testing.assert_array_equal(inputs.skin_pixel_weight(photo, np.full((68, 2), np.nan)), 1.0)
