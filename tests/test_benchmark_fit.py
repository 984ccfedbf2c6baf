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


def test_the_benchmark_times_the_steps_fit_runs_with_their_results(sfm_dir):
    """Batch 1 times `fit --image`'s unvmapped step (on the CPU a TwoViewStep: the two views of
    Eq. 12 as programs on two threads), batch 2 the batch step of `fit --images` (on one CPU
    device photo after photo with that step, a PerPhotoStep), with the pipeline compiled in as
    constants as `fit` does on the CPU: each must compute what the plain vmapped step computes
    with the pipeline as an argument."""
    from ganfit_jax import fitting

    pipe, params, target = benchmark_fit.build("tiny", str(sfm_dir / "sfm_shape_3448.bin"),
                                               jax.random.PRNGKey(0))
    config = fitting.FitConfig()
    key = jax.random.PRNGKey(1)
    ps, ts = fitting.stack([params] * 2), fitting.stack([target] * 2)
    tx = fitting.optimiser(config.learning_rate, params, 2, fitting.texture_step_scale(pipe))
    want = jax.jit(jax.vmap(fitting.make_step(config, 2, batched=True),
                            in_axes=(None, 0, 0, 0, 0, 0)))(
        pipe, ps, jax.vmap(tx.init)(ps), ts, jax.random.split(key, 2), ps.light)
    for b, k in ((2, key), (1, jax.random.split(key, 2)[0])):
        step, args = benchmark_fit.step_arguments(config, pipe, params, target, b, k)
        assert step.pipeline_args == ()  # a tiny pipeline on the CPU: compiled in
        # one photo: the two views on two threads (fitting.TwoViewStep); a batch: that step
        # photo after photo on one CPU device, else one vmapped program
        per_photo = b == 2 and jax.device_count() == 1
        assert isinstance(step, fitting.TwoViewStep) == (b == 1)
        assert isinstance(step, fitting.PerPhotoStep) == per_photo
        got = step(*args) if b == 1 or per_photo else step.lower(*args).compile()(*args)
        expected = want if b == 2 else jax.tree.map(lambda x: x[:1], want)
        if b == 1:
            got = jax.tree.map(lambda x: x[None], got)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
        if per_photo:  # several programs: counted as the vmapped program of the same step
            assert benchmark_fit.counted_flops(config, pipe, step, args, False) > 0


def test_chunk_timing_runs_the_fit_loop_and_rejects_unknown_loops(sfm_dir):
    """--loop=scan times `fitting.compiled_chunk` (what accelerators run): a positive per-step
    time, compilation separated out; an unknown loop is refused before anything is built."""
    import pytest

    from ganfit_jax import fitting

    with pytest.raises(ValueError, match="--loop"):
        next(benchmark_fit.bench_fit("tiny", [1], "unused", 10, 1, loop="while"))
    pipe, params, target = benchmark_fit.build("tiny", str(sfm_dir / "sfm_shape_3448.bin"),
                                               jax.random.PRNGKey(0))
    config = fitting.FitConfig()
    _, args = benchmark_fit.step_arguments(config, pipe, params, target, 1,
                                              jax.random.PRNGKey(1))
    step_ms, compile_s = benchmark_fit.chunk_step_ms(config, "scan", 2, pipe, args, 1)
    assert 0 < step_ms < compile_s * 1000


def test_the_count_of_a_compacted_step_is_the_whole_grid_step(sfm_dir):
    """Batch 1 shades a compacted pixel list inside a lax.cond (FitConfig.pixel_budget); XLA's
    count of that program adds both branches, so the benchmark counts the whole-grid step."""
    import dataclasses

    from ganfit_jax import fitting

    pipe, params, target = benchmark_fit.build("tiny", str(sfm_dir / "sfm_shape_3448.bin"),
                                               jax.random.PRNGKey(0))
    # the tiny render (64²) is compacted only below the default pixel_budget_min_pixels
    config = fitting.FitConfig(two_threads=False, pixel_budget_min_pixels=0)
    step, args = benchmark_fit.step_arguments(config, pipe, params, target, 1,
                                              jax.random.PRNGKey(1))
    whole, _ = benchmark_fit.step_arguments(dataclasses.replace(config, pixel_budget=None), pipe,
                                            params, target, 1, jax.random.PRNGKey(1))
    as_compiled = benchmark_fit.step_flops(step.jitted, args, step.lower(*args).compile())
    counted = benchmark_fit.counted_flops(config, pipe, step, args, True)
    assert counted == benchmark_fit.step_flops(whole.jitted, args, whole.lower(*args).compile())
    assert counted < as_compiled
    # the default one-photo step is a TwoViewStep (four programs): the same fused count
    threaded = dataclasses.replace(config, two_threads=True)
    two_views, _ = benchmark_fit.step_arguments(threaded, pipe, params, target, 1,
                                                jax.random.PRNGKey(1))
    assert isinstance(two_views, fitting.TwoViewStep)
    assert benchmark_fit.counted_flops(threaded, pipe, two_views, args, True) == counted


def test_rates_from_a_count_and_null_without_one():
    """--nocount_flops (what the device check passes: off the CPU the count is one more CPU
    compilation per batch size) leaves every rate derived from the count null."""
    rates = benchmark_fit._rates(None, 0.1, 2e11, 1e11, floors=True)
    assert rates == dict(achieved_gflops=None, floor_ms=None, ratio_to_floor=None,
                         ratio_to_conv_floor=None)
    counted = benchmark_fit._rates(4e9, 0.1, 2e11, 1e11, floors=True)
    assert counted == dict(achieved_gflops=40.0, floor_ms=20.0, ratio_to_floor=5.0,
                           ratio_to_conv_floor=2.5)


def test_a_held_shape_and_texture_step_skips_the_generator(sfm_dir):
    """--frozen=shape,texture (what `fit --track` runs): G(p_t) generated once before the steps,
    so the step counts fewer FLOPs than the full step by at least G's forward pass, which XLA
    counts on its own here."""
    path = str(sfm_dir / "sfm_shape_3448.bin")
    full, held = (next(benchmark_fit.bench_fit("tiny", [1], path, 10, 1, frozen=frozen))
                  for frozen in ((), ("shape", "texture")))
    assert (full["frozen"], held["frozen"]) == ("", "shape,texture")
    pipe, params, _ = benchmark_fit.build("tiny", path, jax.random.PRNGKey(0))
    generator = benchmark_fit.step_flops(
        jax.jit(lambda t: pipe.texture_fn(pipe.texture_params, t)), (params.texture,))
    assert generator > 0 and held["flops"] < full["flops"] - generator, (full, held, generator)
    assert held["step_ms"] > 0
    # a block that is not one of FitParams' is refused as the config refuses it, before building
    import pytest

    with pytest.raises(ValueError, match="frozen"):
        next(benchmark_fit.bench_fit("tiny", [1], "unused", 10, 1, frozen=("albedo",)))
