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

import json
import os
import shutil

from absl import app, flags

from experiments import common, profile_ops

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "cpu-small", ["tiny", "cpu-small", "paper"],
                  "a configuration of experiments.benchmark fit")
flags.DEFINE_integer("batch_size", 1, "photos per step", lower_bound=1)
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the texture GAN and identity network")
flags.DEFINE_integer("steps", 10, "profiled steps (after one warm-up call)", lower_bound=1)
flags.DEFINE_integer("top", 40, "ops listed in the table (all are in ops.json)", lower_bound=1)
flags.DEFINE_string("output_dir", None, "folder for ops.json and the trace (created)")
flags.DEFINE_string("model", None, "3DMM (.bin or .npz); default checkpoints/sfm.npz, else the "
                    "shared assets' SFM")
flags.DEFINE_bool("overwrite", False, "replace an existing ops.json and trace in --output_dir")
flags.mark_flag_as_required("output_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    model = FLAGS.model or common.default_model_path()
    if model is None:
        raise app.UsageError(common.MISSING_MODEL)
    if not os.path.exists(model):
        raise app.UsageError(f"--model: {model} does not exist")
    existing = [name for name in ("ops.json", "trace")
                if os.path.exists(os.path.join(FLAGS.output_dir, name))]
    if existing and not FLAGS.overwrite:
        raise app.UsageError(f"--output_dir: {FLAGS.output_dir} already holds "
                             f"{', '.join(existing)}; pass --overwrite to replace them")
    if FLAGS.overwrite and "trace" in existing:
        shutil.rmtree(os.path.join(FLAGS.output_dir, "trace"))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    result = profile_ops.profile(FLAGS.config, FLAGS.batch_size, FLAGS.compute_dtype, FLAGS.steps,
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
    app.run(common.input_errors_as_one_line(main))
