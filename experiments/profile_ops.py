"""Op-by-op time of a fitting step from a `jax.profiler` trace (the library behind
`experiments/profile_step.py`; no flags, so tests and notebooks can import it)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

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
