"""`python -m experiments.benchmark fit`: the cost of one GANFIT optimisation step.

One step = the loss of Eq. 12 (two renders, the identity network on both, every term), its
gradient and the Adam update, on one photo or vmapped over a batch: exactly the step
`fitting.fit` runs (`fitting.bound_step`: on the CPU with the models compiled in as constants
when they are small; inside a lax.scan on accelerators). For each batch size we report the median step time, XLA's FLOP count of the
compiled step (cost analysis), the achieved FLOP/s, compile time, XLA's memory footprint and
images per second at --iterations steps per image.

Configurations:
  cpu-small  SFM (3448 vertices), 224² render, dlib ResNet (150²), 128² ProGAN texture
  paper      SFM subdivided twice (~54k vertices, the size of LSFM), 224² render, iResNet-100
             (112²), 512² ProGAN texture: the paper's networks at their sizes (random weights;
             the cost does not depend on the values)

The machine's own matmul and convolution rates are measured in the same run, so the distance
to the machine's limit is a ratio, not a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import numpy as np

CONFIGS = {
    # for the CPU dry run of experiments/gpu_check.sh and the tests: the same code path, tiny
    "tiny": dict(subdivisions=0, render=64, identity="tiny", gan_resolution=16,
                 gan_fmap_base=64, gan_fmap_max=16),
    "cpu-small": dict(subdivisions=0, render=224, identity="dlib", gan_resolution=128,
                      gan_fmap_base=1024, gan_fmap_max=128),
    "paper": dict(subdivisions=2, render=224, identity="arcface-r100", gan_resolution=512,
                  gan_fmap_base=8192, gan_fmap_max=512),
}


def subdivided_model(model, times):
    """The model with every triangle split in four `times` times; bases follow the midpoints."""
    from ganfit_jax import morphable
    from ganfit_jax.render import subdivide

    if times == 0:
        return model
    n = model.num_vertices
    attrs = np.concatenate([np.asarray(model.uv), np.asarray(model.mean),
                            np.asarray(model.shape_basis).reshape(n, -1),
                            np.asarray(model.expression_basis).reshape(n, -1)], axis=1)
    tris = np.asarray(model.triangles)
    for _ in range(times):
        _, tris, attrs = subdivide(attrs[:, 2:5], tris, attrs)
    m = attrs.shape[0]
    s, e = model.num_shape, model.num_expression
    return morphable.make_model(attrs[:, 2:5], attrs[:, 5:5 + 3 * s].reshape(m, 3, s),
                                attrs[:, 5 + 3 * s:].reshape(m, 3, e), tris, attrs[:, 0:2],
                                model.landmark_indices, model.contour_right, model.contour_left,
                                source="subdivided", expression_range=model.expression_range)


def build(config_name, model_path, key, compute_dtype="float32"):
    """(pipeline, one params, one target) for a configuration."""
    import jax

    from experiments.common import jitted
    from ganfit_jax import fitting, identity, morphable
    from ganfit_jax.texture import model as texture_model
    from ganfit_jax.texture import progan

    cfg = CONFIGS[config_name]
    model = subdivided_model(morphable.load(model_path), cfg["subdivisions"])
    k_gan, k_id, k_img = jax.random.split(key, 3)
    gan_cfg = progan.ProGANConfig(latent_dim=512 if cfg["gan_resolution"] > 16 else 16, max_resolution=cfg["gan_resolution"],
                                  fmap_base=cfg["gan_fmap_base"], fmap_max=cfg["gan_fmap_max"])
    texture = texture_model.GANTexture(progan.init_generator(k_gan, gan_cfg), gan_cfg)
    if cfg["identity"] == "dlib":
        net = identity.load_identity("dlib")
    elif cfg["identity"] == "tiny":
        net = identity.load_identity("tiny", key=k_id)
    else:
        net = identity.load_identity(cfg["identity"], key=k_id)
    size = (cfg["render"], cfg["render"])
    pipeline = fitting.with_compute_dtype(fitting.make_pipeline(model, texture, net, size),
                                          compute_dtype)
    # a synthetic photo: the mean face rendered with a random texture over noise
    rng = np.random.default_rng(0)
    # jitted, and numpy arguments: op by op, the projection alone compiled ~50 programs (~0.8 s
    # of every benchmark run)
    zeros = functools.partial(np.zeros, dtype=np.float32)
    landmarks = np.array(jitted(fitting.project_landmarks)(
        pipeline, fitting.FitParams(shape=zeros(model.num_shape),
                                    expression=zeros(model.num_expression),
                                    texture=zeros(texture.latent_dim),
                                    camera=np.asarray([0, 0, 1000, 0, 0, 0, 1000.0 * size[0] / 224,
                                                       0], np.float32),
                                    light=np.asarray(fitting.DEFAULT_LIGHT, np.float32))))
    ok = np.isfinite(landmarks).all(1)
    landmarks[~ok] = landmarks[ok].mean(0)
    landmarks += rng.normal(size=landmarks.shape) * 2.0
    image = jax.device_put(rng.uniform(0.2, 0.8, size + (3,)).astype(np.float32))
    params = fitting.init_params(model, landmarks, size, texture.latent_dim,
                                 texture_init=texture.init_latent(k_img))
    target = fitting.target_from_image(pipeline, image, landmarks)
    return pipeline, params, target


def machine_rates(repeats=5):
    """Measured matmul and convolution FLOP/s of this device (float32), the ceilings we compare
    a step against: on the CPU the best of XLA's default compilation and the fitting step's
    options (`fitting.cpu_step_compiler_options`), so the ceiling is what this machine can do,
    not what one code path gets."""
    import jax
    import jax.numpy as jnp

    from ganfit_jax import fitting

    step_options = fitting.cpu_step_compiler_options(jax.default_backend())
    option_sets = [None] if step_options is None else [None, step_options]
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    x = jnp.ones((8, 56, 56, 64), jnp.float32)
    w = jnp.ones((3, 3, 64, 64), jnp.float32)
    matmul = convolution = 0.0
    for options in option_sets:
        mm = jax.jit(lambda x: x @ x, compiler_options=options)
        mm(a).block_until_ready()
        t = _median(lambda: mm(a).block_until_ready(), repeats)
        matmul = max(matmul, 2 * n ** 3 / t)
        conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
            compiler_options=options)
        conv(x, w).block_until_ready()
        t = _median(lambda: conv(x, w).block_until_ready(), repeats)
        convolution = max(convolution, 2 * 8 * 56 * 56 * 64 * 64 * 9 / t)
    return matmul, convolution


def step_flops(fn, args, compiled=None):
    """FLOPs of one step as XLA's CPU cost model counts the program optimised for the CPU,
    whatever device runs it: GPU cost analysis leaves out convolutions (on an H100 it reported
    ~1.5 of the ~300 GFLOP per image of the `paper` step), so only the CPU count compares across
    machines. On a GPU/TPU this costs one extra (CPU) compilation."""
    import jax

    if compiled is not None and jax.default_backend() == "cpu":
        stages = [lambda: compiled]
    else:
        stages = [lambda: jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).compile()]
    for stage in stages:
        try:
            cost = stage().cost_analysis()
        except Exception:  # noqa: BLE001 -- e.g. a sharded program; the row says nan
            continue
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops", 0) > 0:
            return float(cost["flops"])
    return float("nan")


def counted_flops(config, pipeline, step, args, single, compiled=None):
    """`step_flops` of the BoundStep `step` (`compiled`: its compiled program, if at hand), with
    whole-grid renders when the step shades a compacted list of covered pixels
    (`FitConfig.pixel_budget`, batch 1): XLA's count of that program adds up both branches of
    its `lax.cond` and the branch's recomputation, so the whole-grid step, the same algorithm
    without the compaction, is what we count (the compacted step itself does ~3% fewer FLOPs: it
    skips the background's shading). On the CPU the step's own program is counted (its compiler
    options forbid nesting it in another jit), compiled here when not given."""
    import jax

    from ganfit_jax import fitting

    if isinstance(step, fitting.PerPhotoStep):
        # photo after photo: the same algorithm as the vmapped batch program, which is counted
        step = fitting.bound_step(dataclasses.replace(config, batch_steps="vmap"), 2, "batch",
                                  pipeline)
        compiled = None
    elif single and (config.pixel_budget is not None or isinstance(step, fitting.TwoViewStep)):
        # the same algorithm as one fused whole-grid program (a TwoViewStep is four programs,
        # none of which is the step)
        step = fitting.bound_step(dataclasses.replace(config, pixel_budget=None,
                                                      two_threads=False), 2, "single", pipeline)
        compiled = None
    if compiled is None and jax.default_backend() == "cpu":
        compiled = step.lower(*args).compile()
    return step_flops(step.jitted, step.pipeline_args + args, compiled)


def _rates(flops, step_s, matmul_rate, conv_rate, floors=False):
    """The columns derived from a step's FLOP count (None when it was not counted)."""
    best = max(matmul_rate, conv_rate)
    ok = flops is not None
    rates = dict(achieved_gflops=round(flops / step_s / 1e9, 2) if ok else None)
    if floors:
        rates.update(floor_ms=round(flops / best * 1000, 1) if ok else None,
                     ratio_to_floor=round(step_s / (flops / best), 2) if ok else None)
    rates["ratio_to_conv_floor"] = round(step_s / (flops / conv_rate), 2) if ok else None
    return rates


def _median(fn, repeats):
    return _times(fn, repeats)[0]


def _times(fn, repeats):
    """(median, minimum) seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def step_arguments(config, pipeline, params, target, batch_size, key):
    """(the BoundStep `fitting.fit` runs for this batch size, its arguments): for a batch of 1
    the single-photo step as `fit --image` runs it (no vmap; vmap over one image costs ~40% on
    the CPU), else the batch step of `fit --images` (vmapped, or on one CPU photo after photo:
    `fitting.PerPhotoStep`), with the pipeline compiled in as constants or passed as an argument
    exactly as the fit would (`fitting.pipeline_as_constants`)."""
    import jax

    from ganfit_jax import fitting

    texture_step = fitting.texture_step_scale(pipeline)
    if batch_size == 1:
        args = (params, fitting.init_opt_state(config, 2, params, texture_step), target, key,
                params.light)
        return fitting.bound_step(config, 2, "single", pipeline), args
    ps = fitting.stack([params] * batch_size)
    ts = fitting.stack([target] * batch_size)
    args = (ps, fitting.init_opt_state(config, 2, ps, texture_step, vectorised=True), ts,
            jax.random.split(key, batch_size), ps.light)
    sharding = fitting.batch_sharding(batch_size)
    if sharding is not None:
        args = jax.device_put(args, sharding)
    return fitting.bound_step(config, 2, "batch", pipeline), args


LOOPS = ("step", "scan", "host")


def chunk_step_ms(config, loop, chunk, pipeline, args, repeats):
    """(ms per step, compile s) of `fitting.compiled_chunk` with `loop` ('scan': one lax.scan,
    what accelerators run; 'host': a host loop of jitted steps, what the CPU runs), `chunk`
    steps per call: the per-step cost including the loop itself."""
    import jax

    from ganfit_jax import fitting

    params, opt_state, target, key, light_init = args
    cfg = dataclasses.replace(config, loop=loop, chunk=chunk)
    mode = "single" if params.shape.ndim == 1 else "batch"
    run = fitting.compiled_chunk(cfg, 2, mode)
    call = lambda: jax.block_until_ready(  # noqa: E731
        run(pipeline, params, opt_state, target, key, light_init))
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    per_chunk = _median(call, repeats)
    return per_chunk / chunk * 1000, max(first - per_chunk, 0.0)


def bench_fit(config_name, batch_sizes, model_path, iterations, repeats, remat=False,
              compute_dtype="float32", loop="step", chunk=10, count_flops=True,
              batch_steps="auto", frozen=()):
    """Rows for each batch size. loop='step' times one step (`fitting.bound_step`); 'scan' or
    'host' time `chunk` steps as `fitting.fit` runs them (see `chunk_step_ms`).
    count_flops=False leaves `flops` and the rates derived from it None: off the CPU the count
    is one extra CPU compilation per batch size (~30 s for `paper`), device time a short lease
    is better spent on; the count does not depend on the device, so any CPU can supply it.
    `frozen`: blocks held (`FitConfig.frozen`; `fit --track` holds shape and texture), a held
    texture generated once before the steps, as `fitting.run_stage` does."""
    import jax

    from ganfit_jax import fitting

    if loop not in LOOPS:
        raise ValueError(f"--loop must be one of {LOOPS}, got {loop!r}")
    # a bad value is refused before minutes of building and compiling
    config = fitting.FitConfig(remat=remat, batch_steps=batch_steps, frozen=tuple(frozen))
    key = jax.random.PRNGKey(0)
    pipeline, params, target = build(config_name, model_path, key, compute_dtype)
    matmul_rate, conv_rate = machine_rates()
    if "texture" in config.frozen:
        pipeline, params = fitting.hold_texture(pipeline, params)
    rows = []
    for b in batch_sizes:
        step, args = step_arguments(config, pipeline, params, target, b, key)
        common = dict(config=config_name, batch_size=b, loop=loop, iterations=iterations,
                      remat=remat, compute_dtype=compute_dtype, devices=jax.device_count(),
                      frozen=",".join(config.frozen),
                      machine_matmul_gflops=round(matmul_rate / 1e9, 1),
                      machine_conv_gflops=round(conv_rate / 1e9, 1))
        if loop != "step":
            step_ms, compile_s = chunk_step_ms(config, loop, chunk, pipeline, args, repeats)
            flops = counted_flops(config, pipeline, step, args, b == 1) if count_flops else None
            rows.append(dict(common, chunk=chunk, step_ms=round(step_ms, 1), flops=flops,
                             **_rates(flops, step_ms / 1000, matmul_rate, conv_rate),
                             images_per_second=round(b / (step_ms / 1000 * iterations), 4),
                             compile_s=round(compile_s, 1), peak_mb=None))
            yield rows[-1]
            continue
        t0 = time.perf_counter()
        try:
            if isinstance(step, (fitting.TwoViewStep, fitting.PerPhotoStep)):
                # several programs, compiled on the first call
                compiled = step
                jax.block_until_ready(step(*args))
            else:
                compiled = step.lower(*args).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(*step.pipeline_args, *args))
        except Exception as e:  # noqa: BLE001 -- an OOM at one batch size still reports the others
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            rows.append(dict(config=config_name, batch_size=b, error="out of memory",
                             detail=str(e).splitlines()[0][:300], remat=remat,
                             compute_dtype=compute_dtype,
                             devices=jax.device_count()))
            yield rows[-1]
            break
        flops = counted_flops(config, pipeline, step, args, b == 1,
                              None if compiled is step else compiled) if count_flops else None
        run = lambda: jax.block_until_ready(compiled(*step.pipeline_args, *args))  # noqa: E731
        step_s, fastest_s = _times(run, repeats)
        try:  # (a TwoViewStep or PerPhotoStep has none: several programs)
            m = compiled.memory_analysis()
            peak_mb = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                       - m.alias_size_in_bytes) / 2 ** 20
        except Exception:  # backend without memory analysis
            peak_mb = None
        # the minimum beside the median: on a shared machine it is the uncontended step
        rows.append(dict(common, step_ms=round(step_s * 1000, 1),
                         step_ms_min=round(fastest_s * 1000, 1), flops=flops,
                         **_rates(flops, step_s, matmul_rate, conv_rate, floors=True),
                         # compiled-in weights are in the executable, not in peak_mb
                         pipeline_as_constants=not step.pipeline_args,
                         two_threads=isinstance(getattr(step, "single", step),
                                                fitting.TwoViewStep),
                         per_photo=isinstance(step, fitting.PerPhotoStep),
                         images_per_second=round(b / (step_s * iterations), 4),
                         compile_s=round(compile_s, 1),
                         peak_mb=None if peak_mb is None else round(peak_mb, 1)))
        yield rows[-1]
