"""Each term of Eq. 12 against a NumPy transcription of the paper's formula."""

import jax
import jax.numpy as jnp
import numpy as np

from ganfit_jax import losses


def test_identity_loss_is_one_minus_cosine():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=128), rng.normal(size=128)
    ref = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    np.testing.assert_allclose(float(losses.identity_loss(jnp.asarray(a), jnp.asarray(b))), ref,
                               rtol=1e-5)
    assert abs(float(losses.identity_loss(jnp.asarray(a), jnp.asarray(3 * a)))) < 1e-6


def test_content_loss_matches_numpy():
    rng = np.random.default_rng(1)
    fa = {"s1": rng.normal(size=(8, 8, 4)), "s2": rng.normal(size=(4, 4, 16)), "only_a": np.ones(3),
          "pooled": np.ones(5)}
    fb = {"s1": rng.normal(size=(8, 8, 4)), "s2": rng.normal(size=(4, 4, 16)), "pooled": np.zeros(5)}
    ref = sum(np.linalg.norm(fa[k] - fb[k]) / fa[k].size for k in ("s1", "s2"))
    got = losses.content_loss(jax.tree.map(jnp.asarray, fa), jax.tree.map(jnp.asarray, fb))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # identical maps: zero loss and a finite gradient (no 0/0 from the norm)
    g = jax.grad(lambda x: losses.content_loss({"s": x}, {"s": x + 0.0}))(jnp.ones((2, 2, 2)))
    assert np.isfinite(np.asarray(g)).all()


def test_pixel_loss_only_counts_the_face_region():
    render = jnp.zeros((4, 4, 3))
    target = jnp.ones((4, 4, 3)).at[:2].set(0.0)
    mask = jnp.zeros((4, 4)).at[:2].set(1.0)
    assert float(losses.pixel_loss(render, target, mask)) == 0.0
    mask = mask.at[3, 3].set(1.0)
    # 9 covered pixels, one of them wrong by 1 in each of 3 channels
    np.testing.assert_allclose(float(losses.pixel_loss(render, target, mask)), 3 / 9, rtol=1e-6)


def test_landmark_loss_sum_of_squares_and_masking():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(68, 2)), rng.normal(size=(68, 2))
    np.testing.assert_allclose(float(losses.landmark_loss(jnp.asarray(a), jnp.asarray(b))),
                               np.sum((a - b) ** 2), rtol=1e-5)
    a[5] = np.nan
    w = np.ones(68)
    w[5] = 0
    f = lambda x: losses.masked_landmark_loss(x, jnp.asarray(b), jnp.asarray(w))
    val, g = jax.value_and_grad(f)(jnp.asarray(a))
    np.testing.assert_allclose(float(val), np.nansum((a - b) ** 2), rtol=1e-5)
    assert np.isfinite(np.asarray(g)).all()


def test_regulariser_weights():
    w = losses.LossWeights()
    got = losses.regulariser(jnp.full(4, 2.0), jnp.full(2, 1.0), jnp.full(9, 0.5), w)
    np.testing.assert_allclose(float(got), 0.05 * 16 + 0.05 * 2 + 0.01 * 9 * 0.25, rtol=1e-6)


def test_jaw_landmarks_follow_the_target_contour(sfm_model):
    """iBUG 1-8/10-17 pick the contour candidate nearest the detected point, per side."""
    rng = np.random.default_rng(3)
    px = jnp.asarray(rng.uniform(0, 200, size=(3448, 2)), jnp.float32)
    cr, cl = np.asarray(sfm_model.contour_right), np.asarray(sfm_model.contour_left)
    target = np.full((68, 2), 100.0)
    target[2] = np.asarray(px)[cr[5]] + 0.1
    target[12] = np.asarray(px)[cl[9]] - 0.1
    lm = np.asarray(losses.model_landmarks_2d(sfm_model, px, jnp.asarray(target)))
    np.testing.assert_allclose(lm[2], np.asarray(px)[cr[5]])
    np.testing.assert_allclose(lm[12], np.asarray(px)[cl[9]])
    np.testing.assert_allclose(lm[30], np.asarray(px)[114])
    w = np.asarray(losses.landmark_weights(sfm_model, jnp.asarray(target)))
    defined = np.asarray(sfm_model.landmark_indices) >= 0
    assert w[:17].all() and (w[17:] == defined[17:]).all()


def test_complete_landmarks_carries_missing_points_by_similarity():
    """Undefined model landmarks come from the reference under the best 2-D similarity."""
    rng = np.random.default_rng(4)
    ref = rng.uniform(50, 150, size=(68, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    truth = scale * ref @ rot.T + shift
    model = truth.copy()
    model[[60, 64]] = np.nan
    got = np.asarray(losses.complete_landmarks(jnp.asarray(model), jnp.asarray(ref)))
    np.testing.assert_allclose(got, truth, atol=1e-3)
    # the model's NaNs must not leak into the gradient of the defined points
    g = jax.grad(lambda m: jnp.sum(losses.complete_landmarks(m, jnp.asarray(ref))))(
        jnp.asarray(model))
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)[0]).sum() > 0
