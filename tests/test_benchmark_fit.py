"""The fit benchmark's FLOP count: the CPU cost model's count, also when another device runs it."""

import jax
import jax.numpy as jnp

from experiments import benchmark_fit


def test_step_flops_counts_a_matmul_and_a_convolution_exactly():
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 48))
    assert benchmark_fit.step_flops(lambda a, b: a @ b, (a, b)) == 2 * 64 * 32 * 48
    x = jnp.ones((2, 16, 16, 8))
    w = jnp.ones((3, 3, 8, 4))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert benchmark_fit.step_flops(conv, (x, w)) == 2 * 2 * 14 * 14 * 4 * 3 * 3 * 8


def test_the_cross_device_path_equals_the_compiled_count():
    """Without a compiled program (what a GPU run does) the count comes from a CPU compilation
    of the same function: it must equal the count of the program the CPU itself ran."""
    w = jnp.ones((16, 16))

    def step(x):
        return jnp.tanh(x @ w) @ w.T

    x = jnp.ones((8, 16))
    compiled = jax.jit(step).lower(x).compile()
    assert benchmark_fit.step_flops(step, (x,)) == benchmark_fit.step_flops(step, (x,), compiled)
