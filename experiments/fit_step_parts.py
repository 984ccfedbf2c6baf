"""Where a cpu-small fitting step goes: `python -m experiments.fit_step_parts`.

Prints (1) the step with the pipeline as a jit argument or compiled in as constants, each with
XLA:CPU's default options or `fitting.CPU_STEP_COMPILER_OPTIONS` (the fitting step's options),
one compilation per variant, --rounds rounds (0: skip); (2) the forward+backward of each part of
the step alone (ProGAN, dlib ResNet, renderer) with XLA's FLOP count, dlib's up to the end of
each stage and the renderer's in pieces; (3) the two-view step against the
fused one, and its four programs alone (--two_threads); (4) a batch photo after photo against
vmap (--batches). The numbers behind BENCHMARKS.md's tables.

The parts are the honest way to split a program's time on XLA:CPU: a profiler's per-op times
undercount its asynchronous convolutions and charge their wait to whatever op comes next. Run
under `taskset -c 0` for one core's numbers (each view of the two-view step runs on one core).
"""

import statistics
import time

from absl import app, flags

from experiments import common

flags.DEFINE_string("model", "../shared/assets/sfm/sfm_shape_3448.bin", "SFM shape model")
flags.DEFINE_integer("rounds", 3, "rounds of the variant comparison (0: skip it)", lower_bound=0)
flags.DEFINE_integer("repeats", 15, "timed calls per measurement (median)", lower_bound=1)
flags.DEFINE_bool("two_threads", True, "also time fitting.TwoViewStep (the two views of Eq. 12 "
                  "on two threads) against the fused step")
flags.DEFINE_list("batches", ["2", "8"], "also time a batch stepped photo after photo "
                  "(fitting.PerPhotoStep) against the vmapped step at these sizes, ms per photo "
                  "(empty: skip)")
FLAGS = flags.FLAGS


def _ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import benchmark_fit
    from ganfit_jax import camera as camera_lib
    from ganfit_jax import fitting, identity, morphable
    from ganfit_jax.render import raster

    key = jax.random.PRNGKey(0)
    pipe, params, target = benchmark_fit.build("cpu-small", FLAGS.model, key)
    config = fitting.FitConfig()
    step = fitting.make_step(config, stage=2)
    opt = fitting.optimiser(config.learning_rate, params, 2,
                            fitting.texture_step_scale(pipe)).init(params)
    light = params.light
    calls = {}
    for weights in ("arguments", "constants") if FLAGS.rounds > 0 else ():
        for fusions, options in (("default", None),
                                 ("step options", fitting.CPU_STEP_COMPILER_OPTIONS)):
            if weights == "constants":
                f = jax.jit(lambda p, o: step(pipe, p, o, target, key, light),
                            compiler_options=options)
                calls[weights, fusions] = (f, (params, opt))
            else:
                f = jax.jit(step, compiler_options=options)
                calls[weights, fusions] = (f, (pipe, params, opt, target, key, light))
    times = {name: [] for name in calls}
    for _ in range(FLAGS.rounds):
        for name, (f, args) in calls.items():
            times[name].append(_ms(lambda: jax.block_until_ready(f(*args)), FLAGS.repeats))
    if calls:
        print("step ms, batch 1, per round:")
    for (weights, fusions), t in times.items():
        print(f"  weights as {weights:9s} options {fusions:12s} "
              + " / ".join(f"{x:.0f}" for x in t))

    def part(name, fn, *args):
        c = jax.jit(fn, compiler_options=fitting.CPU_STEP_COMPILER_OPTIONS).lower(*args).compile()
        cost = c.cost_analysis()
        flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        ms = _ms(lambda: jax.block_until_ready(c(*args)), FLAGS.repeats)
        print(f"  {name:40s} {ms:6.1f} ms {flops / 1e9:6.2f} GFLOP {flops / ms / 1e6:6.0f} GFLOP/s")

    print("parts alone (weights as constants, the step options):")
    texture = pipe.texture_fn(pipe.texture_params, params.texture)
    part("ProGAN 128² forward+backward",
         jax.grad(lambda z: jnp.sum(pipe.texture_fn(pipe.texture_params, z) ** 2)), params.texture)
    net = pipe.identity_params
    chip = identity.align(net, target.image, target.landmarks)
    part("dlib ResNet forward+backward (150² chip)",
         jax.grad(lambda c: jnp.sum(identity.embed(net, c)[0])), chip)
    part("dlib ResNet forward", lambda c: identity.embed(net, c)[0], chip)
    # Up to the end of each stage: XLA removes the stages after it, so the differences between
    # rows are each stage's forward+backward (a fixed random cotangent at the cut).
    features = jax.eval_shape(lambda c: identity.embed(net, c)[1], chip)
    rng = np.random.default_rng(0)
    for name in ("stem", "stage1", "stage2", "stage3", "stage4", "stage5"):
        probe = rng.normal(size=features[name].shape).astype(np.float32)
        part(f"dlib forward+backward up to {name}",
             jax.grad(lambda c, n=name, w=probe: jnp.sum(identity.embed(net, c)[1][n] * w)), chip)
    height, width = pipe.image_size

    def screen(p):
        verts = morphable.vertices(pipe.model, p.shape, p.expression)
        return camera_lib.project(p.camera, verts, (height, width))

    part("rasterization (224², forward only)",
         lambda p: raster.rasterize(*screen(p), pipe.model.triangles, (height, width))[0], params)
    part(f"renderer forward (224², pixel_budget {config.pixel_budget})",
         lambda p, t: fitting.render_face(pipe, p, target.image, texture=t,
                                          pixel_budget=config.pixel_budget)[0], params, texture)
    for budget in (None, config.pixel_budget):
        shaded = "whole grid" if budget is None else f"pixel_budget {budget}"
        part(f"renderer forward+backward (224², {shaded})",
             jax.grad(lambda p, t, b=budget: jnp.sum(fitting.render_face(
                 pipe, p, target.image, texture=t, pixel_budget=b)[0]), argnums=(0, 1)),
             params, texture)
    part("alignment forward+backward (224² → 150²)",
         jax.grad(lambda im: jnp.sum(identity.align(net, im, target.landmarks) ** 2)),
         target.image)
    if FLAGS.two_threads:
        fused = calls.get(("constants", "step options")) or (
            jax.jit(lambda p, o: step(pipe, p, o, target, key, light),
                    compiler_options=fitting.CPU_STEP_COMPILER_OPTIONS), (params, opt))
        _two_threads(pipe, params, target, key, config, fused)
    if FLAGS.batches:
        _batches(pipe, params, target, key, config, [int(b) for b in FLAGS.batches])


def _batches(pipe, params, target, key, config, sizes):
    """`fitting.FitConfig.batch_steps`: the batch step `fit --images` runs, photo after photo
    (the CPU's default) against one vmapped program, each the step the benchmark times
    (`benchmark_fit.step_arguments`), in interleaved rounds, as ms per photo."""
    import dataclasses as dc

    import jax

    from experiments import benchmark_fit

    calls = {}
    for mode in ("per_photo", "vmap"):
        for b in ([1] if mode == "per_photo" else []) + sizes:
            step, args = benchmark_fit.step_arguments(dc.replace(config, batch_steps=mode),
                                                      pipe, params, target, b, key)
            calls[mode, b] = (lambda step=step, args=args:
                              jax.block_until_ready(step(*args)))
    print("batch step, ms per photo (per_photo: photo after photo; vmap: one program):")
    for _ in range(FLAGS.rounds):
        print("  " + " | ".join(f"{mode} b={b} {_ms(call, FLAGS.repeats) / b:.1f}"
                                for (mode, b), call in calls.items()))


def _two_threads(pipe, params, target, key, config, fused):
    """`fitting.TwoViewStep` (what `fit` runs for one photo on the CPU: the two views of Eq. 12
    as programs on two threads) against the fused step, with the same arguments: their results
    compared, then timed, and the TwoViewStep's programs called on one thread for reference."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from ganfit_jax import fitting

    f, (params_, opt) = fused
    step = fitting.TwoViewStep(dc.replace(config, two_threads=True), pipe,
                               fitting.CPU_STEP_COMPILER_OPTIONS)
    args = (params, opt, target, key, params.light)
    got, want = step(*args), f(params_, opt)
    diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for a, b in zip(jax.tree.leaves(got[:2]), jax.tree.leaves(want[:2])))
    print(f"two views on two threads (fitting.TwoViewStep): new params vs the fused step's, max "
          f"relative difference {diff:.1e}")

    for _ in range(FLAGS.rounds):
        print("  fused step {:.1f} ms | four programs, one thread {:.1f} ms | two threads {:.1f} ms"
              .format(_ms(lambda: jax.block_until_ready(f(params_, opt)), FLAGS.repeats),
                      _ms(lambda: jax.block_until_ready(step(*args, overlap=False)), FLAGS.repeats),
                      _ms(lambda: jax.block_until_ready(step(*args)), FLAGS.repeats)))
    _two_view_programs(step, args)


def _two_view_programs(step, args):
    """Where a TwoViewStep's time goes: its four programs timed alone (both cores), and the two
    views beside each other on two threads, as the step runs them."""
    import threading

    import jax

    params, opt = args[:2]
    texture, residuals = step._generate(params.texture)
    view_args = (params, texture) + args[2:]
    (total, _), (grads, texture_grads) = step._views[0](*view_args)

    def views_beside_each_other():
        other = threading.Thread(target=lambda: jax.block_until_ready(step._views[1](*view_args)))
        other.start()
        jax.block_until_ready(step._views[0](*view_args))
        other.join()

    calls = {
        "G forward": lambda: step._generate(params.texture),
        "photo's view alone": lambda: step._views[0](*view_args),
        "random view alone": lambda: step._views[1](*view_args),
        "both views, two threads": views_beside_each_other,
        "update (G backward, Adam)": lambda: step._update(
            residuals, (grads, grads), (texture_grads, texture_grads), (total, total), params,
            opt),
    }
    print("the two-view step's programs, ms:")
    for _ in range(FLAGS.rounds):
        times = {name: _ms(lambda c=call: jax.block_until_ready(c()), FLAGS.repeats)
                 for name, call in calls.items()}
        print("  " + " | ".join(f"{name} {ms:.1f}" for name, ms in times.items()))


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
