"""Where a cpu-small fitting step goes: `python -m experiments.fit_step_parts`.

Prints (1) the step with the pipeline as a jit argument or compiled in as constants, each with
XLA:CPU's default options or `fitting.CPU_STEP_COMPILER_OPTIONS` (YNNPACK off), one compilation per
variant, --rounds rounds; (2) the forward+backward of each part of the step alone (ProGAN,
dlib ResNet, renderer) with XLA's FLOP count. The numbers behind BENCHMARKS.md's tables.
"""

import dataclasses
import statistics
import time

from absl import app, flags

flags.DEFINE_string("model", "../shared/assets/sfm/sfm_shape_3448.bin", "SFM shape model")
flags.DEFINE_integer("rounds", 3, "rounds of the variant comparison")
flags.DEFINE_integer("repeats", 15, "timed calls per measurement (median)")
flags.DEFINE_bool("two_threads", True, "also time the probe of the step split into four programs, "
                  "the two views' branches on two threads")
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

    from experiments import benchmark_fit
    from ganfit_jax import fitting, identity

    key = jax.random.PRNGKey(0)
    pipe, params, target = benchmark_fit.build("cpu-small", FLAGS.model, key)
    config = fitting.FitConfig()
    step = fitting.make_step(config, stage=2)
    opt = fitting.optimiser(config.learning_rate, params, 2,
                            fitting.texture_step_scale(pipe)).init(params)
    light = params.light
    calls = {}
    for weights in ("arguments", "constants"):
        for fusions, options in (("default", None),
                                 ("YNNPACK off", fitting.CPU_STEP_COMPILER_OPTIONS)):
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
    fused = calls["constants", "YNNPACK off"]
    print("step ms, batch 1, per round:")
    for (weights, fusions), t in times.items():
        print(f"  weights as {weights:9s} fusions {fusions:17s} "
              + " / ".join(f"{x:.0f}" for x in t))

    def part(name, fn, *args):
        c = jax.jit(fn, compiler_options=fitting.CPU_STEP_COMPILER_OPTIONS).lower(*args).compile()
        cost = c.cost_analysis()
        flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        ms = _ms(lambda: jax.block_until_ready(c(*args)), FLAGS.repeats)
        print(f"  {name:40s} {ms:6.1f} ms {flops / 1e9:6.2f} GFLOP {flops / ms / 1e6:6.0f} GFLOP/s")

    print("parts alone (weights as constants, YNNPACK off):")
    texture = pipe.texture_fn(pipe.texture_params, params.texture)
    part("ProGAN 128² forward+backward",
         jax.grad(lambda z: jnp.sum(pipe.texture_fn(pipe.texture_params, z) ** 2)), params.texture)
    net = pipe.identity_params
    chip = identity.align(net, target.image, target.landmarks)
    part("dlib ResNet forward+backward (150² chip)",
         jax.grad(lambda c: jnp.sum(identity.embed(net, c)[0])), chip)
    part("dlib ResNet forward", lambda c: identity.embed(net, c)[0], chip)
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
        _two_threads(pipe, params, target, key, config, fused)


def _two_threads(pipe, params, target, key, config, fused):
    """A probe, not what `fit` runs: Eq. 12's gradient from four programs, G(p_t) forward (with
    its VJP residuals), the main view's terms and the random view's term (Eq. 7) given G(p_t),
    each with its gradient, and G's backward pass; the two views' programs run on two threads.
    XLA:CPU runs the many small ops of one program one after another (a step keeps ~1 of the 2
    cores busy); two programs overlap. Checks the gradient against the fused one, then times
    it against the fused step (which also applies Adam, < 1 ms)."""
    import threading

    import jax
    import jax.numpy as jnp

    from ganfit_jax import fitting, losses

    options = fitting.CPU_STEP_COMPILER_OPTIONS
    weights = config.weights
    main_weights = dataclasses.replace(weights, identity_random=0.0)
    random_weights = losses.LossWeights(identity=0.0, content=0.0, pixel=0.0, landmark=0.0,
                                        shape_reg=0.0, expression_reg=0.0, light_reg=0.0,
                                        identity_random=weights.identity_random)
    given_texture = pipe.replace(texture_fn=lambda _, t: t, texture_params=None)

    def branch(w):
        def f(p, texture):
            return fitting.loss(p.replace(texture=texture), target, given_texture, key, w,
                                config.random_render, params.light, config.pixel_budget)[0]
        return jax.jit(jax.grad(f, argnums=(0, 1)), compiler_options=options)

    generate = jax.jit(lambda t: jax.vjp(lambda u: pipe.texture_fn(pipe.texture_params, u), t),
                       compiler_options=options)
    generate_backward = jax.jit(lambda vjp, g: vjp(g)[0], compiler_options=options)
    main_view, random_view = branch(main_weights), branch(random_weights)

    def split_gradient(threads=True):
        texture, vjp = generate(params.texture)
        out = {}
        run = lambda: out.setdefault("random", jax.block_until_ready(random_view(params, texture)))
        thread = threading.Thread(target=run) if threads else None
        if thread:
            thread.start()
        g_main = main_view(params, texture)
        if thread:
            thread.join()
        else:
            run()
        g_random = out["random"]
        grads = jax.tree.map(jnp.add, g_main[0], g_random[0])
        return grads.replace(texture=generate_backward(vjp, g_main[1] + g_random[1]))

    fused_grads = jax.jit(jax.grad(lambda p: fitting.loss(
        p, target, pipe, key, weights, config.random_render, params.light,
        config.pixel_budget)[0]), compiler_options=options)(params)
    split = split_gradient()
    diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(fused_grads)))
    print(f"two views on two threads (probe): gradient vs fused, max relative difference {diff:.1e}")
    f, args = fused
    for _ in range(FLAGS.rounds):
        print("  fused step {:.1f} ms | split, one thread {:.1f} ms | split, two threads {:.1f} ms"
              .format(_ms(lambda: jax.block_until_ready(f(*args)), FLAGS.repeats),
                      _ms(lambda: jax.block_until_ready(split_gradient(False)), FLAGS.repeats),
                      _ms(lambda: jax.block_until_ready(split_gradient()), FLAGS.repeats)))


if __name__ == "__main__":
    app.run(main)
