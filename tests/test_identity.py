"""The single identity interface the losses use: load_identity / align / embed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import identity


@pytest.fixture(scope="module")
def tiny():
    return identity.load_identity("tiny", jax.random.key(0))  # key positionally, as documented


def test_tiny_is_jit_vmap_grad_safe(tiny):
    images = jax.random.uniform(jax.random.key(1), (3, 112, 112, 3))
    emb, feats = jax.jit(identity.embed)(tiny, images[0])
    assert emb.shape == (32,) and feats["stage2"].ndim == 3
    batched, _ = jax.jit(jax.vmap(identity.embed, in_axes=(None, 0)))(tiny, images)
    np.testing.assert_allclose(np.asarray(batched[0]), np.asarray(emb), atol=1e-5)
    direct, _ = jax.jit(identity.embed)(tiny, images)  # a leading batch axis works too
    np.testing.assert_allclose(np.asarray(direct), np.asarray(batched), atol=1e-5)

    def loss(image, net):
        e, f = identity.embed(net, image)
        return 1 - identity.cosine_similarity(e, emb) + jnp.mean(f["stage1"] ** 2)

    g = jax.jit(jax.grad(loss))(images[1], tiny)
    assert g.shape == (112, 112, 3) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_align_then_embed_grad_wrt_landmarks(tiny):
    image = jax.random.uniform(jax.random.key(2), (200, 180, 3))
    from ganfit_jax.identity import alignment

    lm = jnp.zeros((68, 2)).at[36:42].set(jnp.array([70.0, 90.0])).at[42:48].set(jnp.array([120.0, 88.0]))
    lm = lm.at[30].set(jnp.array([95.0, 115.0])).at[48].set(jnp.array([75.0, 140.0]))
    lm = lm.at[54].set(jnp.array([118.0, 139.0]))
    crop = jax.jit(identity.align)(tiny, image, lm)
    assert crop.shape == (112, 112, 3)
    np.testing.assert_allclose(np.asarray(crop), np.asarray(jax.jit(alignment.align_arcface)(image, lm)),
                               atol=1e-6)
    g = jax.jit(jax.grad(lambda l: jnp.sum(identity.embed(tiny, identity.align(tiny, image, l))[0])))(lm)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[36:55]).sum()) > 0


def test_errors(tiny):
    with pytest.raises(ValueError, match="112"):
        identity.embed(tiny, jnp.zeros((150, 150, 3)))
    with pytest.raises(ValueError, match="unknown identity network 'vgg'"):
        identity.load_identity("vgg")
    with pytest.raises(ValueError, match="weights"):
        identity.load_identity("arcface-r50")
    with pytest.raises(ValueError, match="key"):
        identity.load_identity("tiny")


def test_dlib_pipeline_matches_dlib_on_a_photo(faces_dir, compilations, dlib_models):
    """Photo → dlib landmarks → our chip → our net vs dlib's compute_face_descriptor(img, shape)."""
    import dlib

    from ganfit_jax import landmarks

    with compilations() as compiled:
        net = identity.load_identity("dlib")
    # its weights copied to the device, not by jnp.asarray (a program per leaf's shape: 13)
    assert not compiled, compiled
    assert (net.input_size, net.alignment) == (150, "dlib")
    img8 = landmarks.to_uint8(landmarks.load_image(faces_dir / "ffhq" / "FFHQ" / "00002.png"))
    shape = dlib.shape_predictor(dlib_models(landmarks.SHAPE_PREDICTOR_68))(
        img8, dlib.get_frontal_face_detector()(img8, 1)[0])
    ref = np.asarray(dlib.face_recognition_model_v1(dlib_models(landmarks.FACE_RECOGNITION_RESNET))
                     .compute_face_descriptor(img8, shape, 0))
    lm = jnp.asarray([[shape.part(i).x + 0.5, shape.part(i).y + 0.5] for i in range(68)])

    @jax.jit
    def pipeline(image, lm):
        return identity.embed(net, identity.align(net, image, lm))[0]

    ours = np.asarray(pipeline(jnp.asarray(img8, jnp.float32) / 255.0, lm))
    assert float(identity.cosine_similarity(ours, ref)) >= 0.999
