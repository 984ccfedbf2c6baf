"""The fit benchmark's FLOP count: the CPU cost model's count, also when another device runs it."""

import jax
import jax.numpy as jnp
import numpy as np

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


def test_batch_of_one_times_the_single_photo_step_with_the_same_result(sfm_dir):
    """For batch 1 the benchmark times `fit --image`'s unvmapped step; it must compute what the
    vmapped step computes."""
    from ganfit_jax import fitting

    pipe, params, target = benchmark_fit.build("tiny", str(sfm_dir / "sfm_shape_3448.bin"),
                                               jax.random.PRNGKey(0))
    config = fitting.FitConfig()
    ps, ts = fitting.stack([params]), fitting.stack([target])
    tx = fitting.optimiser(config.learning_rate, params, 2, fitting.texture_step_scale(pipe))
    opt = jax.vmap(tx.init)(ps)
    keys = jax.random.split(jax.random.PRNGKey(1), 1)
    single = jax.jit(benchmark_fit.step_function(config, 1))(pipe, ps, opt, ts, keys)
    vmapped = jax.vmap(fitting.make_step(config, 2), in_axes=(None, 0, 0, 0, 0, 0))(
        pipe, ps, opt, ts, keys, ps.light)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(vmapped)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
