"""Timings of the hot paths, one subcommand per component.

  python -m experiments.benchmark render [--json] [--cases sfm-224,dense-512] [--repeats 10]
  python -m experiments.benchmark fit --config=cpu-small|paper [--batch_sizes=1,2,4] [--json]
  python -m experiments.benchmark load [--photos=DIR] [--threads=1,2] [--json]  (the loader)
  python -m experiments.benchmark quality|tracking [--json]  (ground truth: benchmark_*.py)

Each subcommand prints a table (or, with --json, one JSON object per line). To add one, write
`def run_NAME(argv) -> list[dict]` and register it in SUBCOMMANDS.

Timings are medians (and minima, *_min_ms) over --repeats calls after compilation, wall clock,
with `block_until_ready`; compile_s is lowering + XLA compilation of the forward+backward function;
peak_mb is XLA's own memory analysis of that compiled function (arguments + outputs + temporaries),
which on CPU is the buffer footprint of one call.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("json", False, "print one JSON object per line instead of a table")
flags.DEFINE_integer("repeats", 10, "timed calls per measurement (the median is reported)",
                     lower_bound=1)
flags.DEFINE_list("cases", None, "subset of cases to run (default: all of the subcommand's)")
flags.DEFINE_string("model", None, "SFM shape model (.bin); default: the shared assets' "
                    "sfm/sfm_shape_3448.bin ($GANFIT_ASSETS, else ../shared/assets)")

_DEFAULT_MODEL = os.path.join(
    os.environ.get("GANFIT_ASSETS", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "shared",
        "assets")), "sfm", "sfm_shape_3448.bin")


def _times_ms(fn, args, repeats):
    """(median, minimum) wall time in ms; the minimum is the robust figure on a shared machine."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times), 1000.0 * min(times)


def _peak_mb(compiled):
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2 ** 20
    except Exception:  # memory analysis is backend-dependent; absent → not reported
        return None


# ---------------------------------------------------------------------------------------------
# render
# ---------------------------------------------------------------------------------------------

RENDER_CASES = {
    # name: (mesh, image size, batch, antialias)
    "sfm-224": ("sfm", 224, 1, False),
    "sfm-512": ("sfm", 512, 1, False),
    "dense-224": ("dense", 224, 1, False),
    "dense-512": ("dense", 512, 1, False),
    "sfm-224-batch16": ("sfm", 224, 16, False),
    # the same with render(antialias=True), to read its cost off as a ratio to the row above
    "sfm-224-aa": ("sfm", 224, 1, True),
    "dense-224-aa": ("dense", 224, 1, True),
    "sfm-512-aa": ("sfm", 512, 1, True),
    # Not run by default (about 430k triangles): the SFM subdivided three times.
    "dense3-512": ("dense3", 512, 1, False),
}
_DEFAULT_RENDER_CASES = ["sfm-224", "sfm-512", "dense-224", "dense-512", "sfm-224-batch16",
                         "sfm-224-aa", "sfm-512-aa", "dense-224-aa"]


def _render_inputs(mesh, size, batch, model_path):
    import numpy as np

    from ganfit_jax import camera, morphable
    from ganfit_jax.render import subdivide

    model = morphable.load(model_path)
    verts, tris, uv = (np.asarray(model.mean), np.asarray(model.triangles), np.asarray(model.uv))
    for _ in range({"sfm": 0, "dense": 2, "dense3": 3}[mesh]):
        verts, tris, uv = subdivide(verts, tris, uv)
    rng = np.random.default_rng(0)
    # A smooth random 512×512 UV map, the size of the paper's GAN textures.
    coarse = rng.uniform(0.3, 0.9, (16, 16, 3)).astype(np.float32)
    texture = np.kron(coarse, np.ones((32, 32, 1), np.float32))
    focal = camera.default_focal(size)
    light = np.array([200, 300, 800, 0.8, 0.75, 0.7, 0.3, 0.3, 0.3], np.float32)
    if batch == 1:
        cam = np.array([0, 0, 600, 0, 0, 0, focal], np.float32)
        return verts, tris, uv, texture, cam, light
    # A batch of different faces and poses: per-item vertices (random shape coefficients) and
    # cameras (yaw within ±30°).
    coeffs = rng.normal(0, 1, (batch, model.num_shape)).astype(np.float32)
    batch_verts = np.stack([np.asarray(morphable.vertices(model, c)) for c in coeffs])
    yaw = np.deg2rad(np.linspace(-30, 30, batch))
    cams = np.stack([[600 * np.sin(a), 0, 600 * np.cos(a), 0, 0, 0, focal] for a in yaw])
    return batch_verts, tris, uv, texture, cams.astype(np.float32), light


def bench_render_case(name, model_path, repeats):
    import jax
    import jax.numpy as jnp

    from ganfit_jax import render

    mesh, size, batch, antialias = RENDER_CASES[name]
    verts, tris, uv, texture, cam, light = _render_inputs(mesh, size, batch, model_path)
    tris, uv = jnp.asarray(tris), jnp.asarray(uv)

    def image(v, t, c, l):
        return render.render(v, tris, uv, t, c, l, size, antialias=antialias)[0]

    if batch > 1:
        image = jax.vmap(image, in_axes=(0, None, 0, None))
    target = 0.5

    def loss(v, t, c, l):
        return jnp.mean((image(v, t, c, l) - target) ** 2)

    args = tuple(jnp.asarray(a) for a in (verts, texture, cam, light))
    forward = jax.jit(image)
    forward_backward = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    start = time.perf_counter()
    compiled = forward_backward.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(forward(*args))  # compile the forward outside the timing
    jax.block_until_ready(compiled(*args))
    forward_ms, forward_min_ms = _times_ms(forward, args, repeats)
    backward_ms, backward_min_ms = _times_ms(compiled, args, repeats)
    return dict(
        case=name, triangles=int(tris.shape[0]), pixels=size * size, batch=batch,
        forward_ms=round(forward_ms, 2), forward_backward_ms=round(backward_ms, 2),
        compile_s=round(compile_s, 2), peak_mb=_round(_peak_mb(compiled)),
        forward_min_ms=round(forward_min_ms, 2), forward_backward_min_ms=round(backward_min_ms, 2))


def _round(x):
    return None if x is None else round(x, 1)


def run_render(argv):
    model_path = FLAGS.model or _DEFAULT_MODEL
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"--model {model_path}: no such SFM model file (the shared "
                                "assets' sfm/sfm_shape_3448.bin)")
    cases = FLAGS.cases or _DEFAULT_RENDER_CASES
    unknown = [c for c in cases if c not in RENDER_CASES]
    if unknown:
        raise ValueError(f"--cases: unknown render cases {unknown}; known: {list(RENDER_CASES)}")
    rows = []
    for name in cases:
        row = bench_render_case(name, model_path, FLAGS.repeats)
        rows.append(row)
        _emit([row], header=len(rows) == 1)
    return rows


# ---------------------------------------------------------------------------------------------
# Output and dispatch
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("case", "triangles", "pixels", "batch", "forward_ms", "forward_backward_ms",
            "compile_s", "peak_mb")


def _emit(rows, header):
    import jax

    for row in rows:
        if FLAGS.json:
            row = dict(row, machine=f"{os.cpu_count()}-core {platform.machine()}",
                       backend=jax.default_backend(),
                       load_average=round(os.getloadavg()[0], 2))
            print(json.dumps(row), flush=True)
        else:
            columns = [c for c in _COLUMNS if c in row] + [c for c in row if c not in _COLUMNS]
            if header:
                print(" | ".join(columns), flush=True)
            print(" | ".join(str(row.get(c, "")) for c in columns), flush=True)


# ---------------------------------------------------------------------------------------------
# fit (experiments/benchmark_fit.py)
# ---------------------------------------------------------------------------------------------

flags.DEFINE_string("config", "cpu-small", "fit: cpu-small | paper")
flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16"], "fit: batch sizes to time")
flags.DEFINE_integer("iterations", 300, "fit: iterations per image for images_per_second",
                     lower_bound=1)
flags.DEFINE_bool("remat", False, "fit: rematerialise the step (jax.checkpoint) to save memory")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "fit: width of the texture GAN and identity network (ganfit_jax.precision)")
flags.DEFINE_enum("loop", "step", ["step", "scan", "host"],
                  "fit: 'step' times one step; 'scan' / 'host' time --chunk steps as fitting.fit "
                  "runs them (one lax.scan, as on accelerators / a host loop, as on the CPU)")
flags.DEFINE_integer("chunk", 10, "fit: steps per timed chunk with --loop=scan|host", lower_bound=1)
flags.DEFINE_enum("batch_steps", "auto", ["auto", "vmap", "per_photo"],
                  "fit: how batches > 1 step (fitting.FitConfig.batch_steps)")
flags.DEFINE_list("frozen", [], "fit: parameter blocks held, e.g. shape,texture as `fit "
                  "--track` holds them (fitting.FitConfig.frozen; a held texture is generated "
                  "once, not every step)")
flags.DEFINE_bool("count_flops", True, "fit: count each step's FLOPs (XLA's CPU cost analysis; "
                  "off the CPU one extra CPU compilation per batch size); --nocount_flops "
                  "leaves flops and the rates from it null")


def run_fit(argv):
    from experiments import benchmark_fit

    rows = []
    for row in benchmark_fit.bench_fit(FLAGS.config, [int(b) for b in FLAGS.batch_sizes],
                                       FLAGS.model or _DEFAULT_MODEL, FLAGS.iterations,
                                       FLAGS.repeats, FLAGS.remat, FLAGS.compute_dtype,
                                       FLAGS.loop, FLAGS.chunk, FLAGS.count_flops,
                                       FLAGS.batch_steps, FLAGS.frozen):
        rows.append(row)
        _emit([row], header=len(rows) == 1)
    return rows


# ---------------------------------------------------------------------------------------------
# load (experiments/benchmark_load.py)
# ---------------------------------------------------------------------------------------------

flags.DEFINE_string("photos", None, "load: a folder (searched with its sub-folders) or glob of "
                    "photos; default: the shared assets' faces")
flags.DEFINE_list("threads", ["1", "2"], "load: loader thread counts to time")
flags.DEFINE_list("detection", ["reduced", "full"], "load: 'reduced' searches faces at "
                  "landmarks.DETECTION_MAX_SIDE pixels as fit does, 'full' at full size")


def run_load(argv):
    from experiments import benchmark_load

    spec = FLAGS.photos or os.path.join(os.path.dirname(os.path.dirname(_DEFAULT_MODEL)), "faces")
    paths = common.find_images(spec, recursive=os.path.isdir(spec))
    if not paths:
        raise FileNotFoundError(f"--photos={spec}: no images found")
    threads = [int(t) for t in FLAGS.threads]
    if any(t < 1 for t in threads):
        raise ValueError(f"--threads: thread counts must be ≥ 1, got {FLAGS.threads}")
    rows = benchmark_load.bench_load(paths, threads, FLAGS.detection)
    _emit(rows, header=True)
    return rows


# quality, tracking: experiments/benchmark_quality.py, benchmark_tracking.py (their flags are
# added when this binary runs)
from experiments import benchmark_quality, benchmark_tracking, common  # noqa: E402

SUBCOMMANDS = {
    "render": run_render,
    "fit": run_fit,
    "load": run_load,
    "quality": lambda argv: benchmark_quality.main_quality(),
    "tracking": lambda argv: benchmark_tracking.main_tracking(),
}


def main(argv):
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        raise app.UsageError(f"usage: python -m experiments.benchmark "
                             f"{{{','.join(SUBCOMMANDS)}}} [--json] [flags]")
    SUBCOMMANDS[argv[1]](argv[1:])


if __name__ == "__main__":
    benchmark_tracking.define_flags()  # and the quality benchmark's; skips those defined above
    app.run(common.input_errors_as_one_line(main))
