"""Where one fitting step's time goes, op by op, on whatever device runs it.

  python -m experiments.profile_step --config=paper --batch_size=32 --compute_dtype=bfloat16 \
      --output_dir=/tmp/prof

Builds the step `experiments.benchmark fit` times (same configurations, `fitting.bound_step`),
compiles and warms it up, then records --steps calls with `jax.profiler` (a Perfetto trace) and
sums each op's time per step. On a GPU the ops are its kernels (the device's tracks of the
trace); on the CPU, XLA's thunks (fusions, convolutions, dots) on the host threads. Writes
OUTPUT_DIR/ops.json (`step_ms`, `ops`: name, ms per step, calls per step, share of the ops'
total; `kinds`: the same summed by a coarse kind guessed from the name) and prints the table;
the trace itself stays in OUTPUT_DIR/trace for Perfetto or TensorBoard.

Op times of concurrent streams or threads add up, so their total can exceed the step's wall
time; the shares say what dominates, not what a change would save.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "cpu-small", ["tiny", "cpu-small", "paper"],
                  "a configuration of experiments.benchmark fit")
flags.DEFINE_integer("batch_size", 1, "photos per step")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the texture GAN and identity network")
flags.DEFINE_integer("steps", 10, "profiled steps (after one warm-up call)")
flags.DEFINE_integer("top", 40, "ops listed in the table (all are in ops.json)")
flags.DEFINE_string("output_dir", None, "folder for ops.json and the trace (created)")
flags.DEFINE_string("model", None, "3DMM (.bin or .npz); default checkpoints/sfm.npz, else the "
                    "shared assets' SFM")
flags.mark_flag_as_required("output_dir")

# Host-side wrappers in a jax.profiler trace: they contain the ops rather than being ops.
_WRAPPERS = re.compile(r"^\$|ThunkExecutor|PjitFunction|PjRt|Pjrt|AllocateOutputBuffers|"
                       r"ExecuteHelper|ExecutePrepare|block_until_ready")
_KINDS = (("convolution", re.compile(r"conv|cudnn|xmma|fprop|dgrad|wgrad|implicit", re.I)),
          ("matmul", re.compile(r"dot|gemm|cublas|cutlass|matmul", re.I)),
          ("gather/scatter", re.compile(r"gather|scatter|dynamic.slice|dynamic.update", re.I)),
          ("reduce", re.compile(r"reduce", re.I)),
          ("copy/transpose", re.compile(r"copy|transpose", re.I)))


def op_kind(name):
    """A coarse kind for an op or kernel name (a guess from the name; 'other' otherwise)."""
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _load_trace(folder):
    files = sorted(glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"{folder}: jax.profiler wrote no perfetto_trace.json.gz")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def op_times(events):
    """{op name: (self time µs, calls)} of the trace's complete events: the device's tracks when
    the trace has any (a GPU's kernels), else the host's events less the runtime's wrappers.
    Self time: an event's duration less that of the events nested in it on its thread (a while
    loop's or conditional's thunk contains its body's thunks)."""
    process = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in process.items() if re.search(r"/device:(GPU|TPU)", name)}
    tracks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and (not device or e.get("pid") in device):
            tracks[e.get("pid"), e.get("tid")].append(e)
    totals = collections.defaultdict(lambda: [0.0, 0])
    for track in tracks.values():
        track.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack = []  # [event, self time] of the events open at this point of the track
        for e in track + [None]:
            start = float("inf") if e is None else float(e["ts"])
            while stack and float(stack[-1][0]["ts"]) + float(stack[-1][0]["dur"]) <= start:
                done, self_us = stack.pop()
                if device or not _WRAPPERS.search(done["name"]):
                    totals[done["name"]][0] += max(self_us, 0.0)
                    totals[done["name"]][1] += 1
            if e is not None:
                if stack:
                    stack[-1][1] -= float(e["dur"])
                stack.append([e, float(e["dur"])])
    return {name: (us, calls) for name, (us, calls) in totals.items()}


def summarise(times, steps):
    """ops.json's `ops` and `kinds` from `op_times` over `steps` steps."""
    total = sum(us for us, _ in times.values()) or 1.0
    ops = [dict(name=name, ms_per_step=round(us / steps / 1000, 4),
                calls_per_step=round(calls / steps, 2), share=round(us / total, 6),
                kind=op_kind(name))
           for name, (us, calls) in sorted(times.items(), key=lambda kv: -kv[1][0])]
    kinds = collections.defaultdict(float)
    for op in ops:
        kinds[op["kind"]] += op["ms_per_step"]
    return ops, {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def profile(config_name, batch_size, compute_dtype, steps, output_dir, model_path):
    import jax

    from experiments import benchmark_fit
    from ganfit_jax import fitting

    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    key = jax.random.PRNGKey(0)
    pipeline, params, target = benchmark_fit.build(config_name, model_path, key, compute_dtype)
    step, args = benchmark_fit.step_arguments(fitting.FitConfig(), pipeline, params, target,
                                              batch_size, key)
    t0 = time.perf_counter()
    jax.block_until_ready(step(*args))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(step(*args))
    trace_dir = os.path.join(output_dir, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(step(*args))
        step_ms = (time.perf_counter() - t0) / steps * 1000
    ops, kinds = summarise(op_times(_load_trace(trace_dir)), steps)
    return dict(config=config_name, batch_size=batch_size, compute_dtype=compute_dtype,
                backend=jax.default_backend(), device=str(jax.devices()[0]), steps=steps,
                step_ms=round(step_ms, 2), first_call_s=round(compile_s, 1),
                ops_ms_per_step=round(sum(op["ms_per_step"] for op in ops), 3), kinds=kinds,
                ops=ops, trace=trace_dir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import common

    model = FLAGS.model or common.default_model_path()
    if model is None:
        raise app.UsageError(common.MISSING_MODEL)
    if not os.path.exists(model):
        raise app.UsageError(f"--model: {model} does not exist")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    result = profile(FLAGS.config, FLAGS.batch_size, FLAGS.compute_dtype, FLAGS.steps,
                     FLAGS.output_dir, model)
    with open(os.path.join(FLAGS.output_dir, "ops.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['config']} batch {result['batch_size']} {result['compute_dtype']} on "
          f"{result['device']}: {result['step_ms']} ms per step under the profiler; ops "
          f"{result['ops_ms_per_step']} ms per step")
    print("by kind: " + ", ".join(f"{k} {v:.2f} ms" for k, v in result["kinds"].items()))
    print(f"{'ms/step':>9} {'calls':>6} {'share':>6}  op")
    for op in result["ops"][:FLAGS.top]:
        print(f"{op['ms_per_step']:9.3f} {op['calls_per_step']:6.1f} {op['share']:6.1%}  "
              f"{op['name'][:100]}")


if __name__ == "__main__":
    app.run(main)
