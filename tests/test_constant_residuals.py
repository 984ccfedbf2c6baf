"""fitting.vjp_with_constant_residuals: the split VJP equals jax.vjp at any input, and what it
compiles in as constants is exactly what does not depend on the input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import fitting

RNG = np.random.default_rng(0)
W1 = jnp.asarray(RNG.normal(size=(5, 4)), jnp.float32)
W2 = jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32)


@jax.jit
def _inner(h):  # a nested jit, as the texture GAN's generator is
    return jnp.tanh((W2 * 1.5) @ h)


def _plain(x):
    return jnp.sin(W1 @ x) * 2.0


def _nested(x):
    return _inner(jnp.sin((W1 + 1.0) @ x)) ** 2


def _with_cond(x):  # a cond's outputs count as depending on all its inputs
    return jax.lax.cond(x[0] > 0, lambda v: jnp.cos(W1 @ v), lambda v: W1 @ v, x)


@pytest.mark.parametrize("fn", [_plain, _nested, _with_cond])
def test_split_vjp_equals_jax_vjp_at_other_inputs(fn):
    x0 = jnp.asarray(RNG.normal(size=4), jnp.float32)
    forward, backward = fitting.vjp_with_constant_residuals(fn, x0)
    forward, backward = jax.jit(forward), jax.jit(backward)
    for x in (x0, jnp.asarray(RNG.normal(size=4), jnp.float32), -x0):
        out, residuals = forward(x)
        expect_out, vjp = jax.vjp(fn, x)
        ct = jnp.asarray(RNG.normal(size=expect_out.shape), jnp.float32)
        np.testing.assert_allclose(out, expect_out, rtol=1e-6)
        np.testing.assert_allclose(backward(residuals, ct), vjp(ct)[0], rtol=1e-5, atol=1e-6)


def test_only_input_independent_residuals_become_constants():
    x = jnp.ones(4, jnp.float32)
    all_residuals = jax.tree.leaves(jax.vjp(_nested, x)[1])
    _, kept = fitting.vjp_with_constant_residuals(_nested, x)[0](x)
    # the scaled kernels (W1 + 1, 1.5·W2, through the nested jit) are constants; the
    # activations that depend on x stay residuals of the forward pass
    assert 0 < len(kept) < len(all_residuals)
    kept_shapes = sorted(r.shape for r in kept)
    assert (5, 4) not in kept_shapes and (3, 5) not in kept_shapes
    closed = jax.make_jaxpr(lambda x: jax.tree.leaves(jax.vjp(_nested, x)[1]))(x)
    dependent = fitting._dependent_outputs(closed.jaxpr, [True])
    assert sum(dependent) == len(kept)
    assert fitting._dependent_outputs(closed.jaxpr, [False]) == [False] * len(dependent)
