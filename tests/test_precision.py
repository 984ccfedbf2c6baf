"""Mixed precision: the texture GAN and the identity network in bfloat16, everything else float32.

The references are the same networks in float32: bfloat16 keeps 8 bits of mantissa, so outputs
agree to about 1e-2, and the fit's loss and gradient must keep their value and direction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import fitting, identity
from ganfit_jax.texture import model as texture_model
from ganfit_jax.texture.model import PCATexture

from test_fitting import SIZE, random_truth, synthetic_landmarks


def test_gan_texture_in_bfloat16_matches_float32_and_runs_bf16_convolutions():
    tex = texture_model.random_texture_model(jax.random.PRNGKey(0), resolution=32)
    narrow = tex.replace(compute_dtype="bfloat16")
    p_t = tex.init_latent(jax.random.PRNGKey(1))
    wide_map, narrow_map = tex.generate(p_t), narrow.generate(p_t)
    assert narrow_map.dtype == jnp.float32 and narrow_map.shape == wide_map.shape
    # per-layer rounding of 2^-9 compounds through the generator: ~1% of the colour range on
    # average, a few texels off by several %
    error = np.abs(np.asarray(narrow_map) - np.asarray(wide_map))
    assert error.mean() < 0.01 and np.percentile(error, 99) < 0.06, (error.mean(), error.max())
    assert float(jnp.abs(narrow_map - wide_map).max()) > 0  # it did change width
    hlo = jax.jit(narrow.generate).lower(p_t).as_text()
    assert "bf16" in hlo and "convolution" in hlo


def test_identity_network_in_bfloat16_keeps_the_embedding():
    net = identity.load_identity("tiny", key=jax.random.PRNGKey(0))
    narrow = net.replace(compute_dtype="bfloat16")
    image = jax.random.uniform(jax.random.PRNGKey(2), (112, 112, 3))
    (e32, _), (e16, f16) = identity.embed(net, image), identity.embed(narrow, image)
    assert e16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in f16.values())
    assert float(identity.cosine_similarity(e16, e32)) > 0.99
    assert not np.array_equal(np.asarray(e16), np.asarray(e32))


def test_fit_loss_and_gradient_in_bfloat16_keep_value_and_direction(sfm_model):
    tex = texture_model.random_texture_model(jax.random.PRNGKey(0), resolution=32)
    net = identity.load_identity("tiny", key=jax.random.PRNGKey(1))
    wide = fitting.make_pipeline(sfm_model, tex, net, SIZE)
    narrow = fitting.with_compute_dtype(wide, "bfloat16")
    assert narrow.texture_params.compute_dtype == "bfloat16"
    assert narrow.identity_params.compute_dtype == "bfloat16"
    truth = random_truth(sfm_model, 0).replace(texture=tex.init_latent(jax.random.PRNGKey(3)))
    photo, _ = fitting.render_face(wide, truth)
    lm = synthetic_landmarks(sfm_model, truth)
    p0 = fitting.init_params(sfm_model, lm, SIZE, tex.latent_dim,
                             texture_init=tex.init_latent(jax.random.PRNGKey(4)))
    key = jax.random.PRNGKey(5)

    def value_and_grad(pipe):
        target = fitting.target_from_image(pipe, photo, lm)
        return jax.jit(jax.value_and_grad(lambda p: fitting.loss(p, target, pipe, key)[0]))(p0)

    (l32, g32), (l16, g16) = value_and_grad(wide), value_and_grad(narrow)
    assert abs(float(l16) - float(l32)) <= 0.03 * abs(float(l32))
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)])
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98


def test_models_without_the_option_stay_float32_and_bad_names_are_refused(sfm_model):
    pca = PCATexture(mean=jnp.full((8, 8, 3), 0.5), basis=jnp.zeros((8, 8, 3, 4)),
                     coverage=jnp.ones((8, 8)))
    pipe = fitting.Pipeline(model=sfm_model, texture_params=pca, image_size=SIZE)
    assert fitting.with_compute_dtype(pipe, "bfloat16").texture_params is pca
    with pytest.raises(ValueError, match="compute dtype must be one of .*float16"):
        fitting.with_compute_dtype(pipe, "float16")
    tex = texture_model.random_texture_model(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="compute dtype"):
        tex.replace(compute_dtype="half").generate(tex.init_latent(jax.random.PRNGKey(1)))
