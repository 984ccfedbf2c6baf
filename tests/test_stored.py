"""`ganfit_jax.stored`: an exact identity product that XLA:CPU stores instead of re-fusing."""

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ganfit_jax.stored import stored


@pytest.mark.parametrize("axis,shape", [(0, (3, 7, 5)), (-1, (4, 6, 12))])
def test_stored_is_bit_exact_forward_and_backward(axis, shape):
    rng = np.random.default_rng(0)
    # values across many binades up to float32's largest (subnormals are flushed to zero)
    x = rng.normal(size=shape) * 10.0 ** rng.integers(-30, 30, size=shape)
    x.flat[:3] = [0.0, 3.4e38, -1.2e-38]
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: stored(v, axis))(x)), np.asarray(x))
    g = jnp.asarray(rng.normal(size=shape), jnp.float32)
    _, vjp = jax.vjp(lambda v: stored(v, axis), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def test_stored_is_a_dot_on_the_cpu_that_xla_keeps():
    """The point of it: the compiled program computes x once, as a dot's result."""
    def f(v):
        y = jnp.sin(v) * 2.0
        return stored(y) + 1.0, stored(y) * 3.0

    hlo = jax.jit(f).lower(jnp.ones((3, 16))).compile().as_text()
    assert re.search(r"\bdot\(", hlo), hlo


def test_stored_rejects_a_middle_axis():
    with pytest.raises(ValueError, match="axis must be 0 or -1"):
        stored(jnp.ones((2, 3, 4)), axis=1)
