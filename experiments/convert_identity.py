"""Convert identity-network weights to Flax msgpack checkpoints under checkpoints/.

  python -m experiments.convert_identity --arch=r50 --source=ms1mv3_arcface_r50_fp16/backbone.pth
  python -m experiments.convert_identity --arch=r50 --source=buffalo_l/w600k_r50.onnx
  python -m experiments.convert_identity --arch=mbf --source=buffalo_s/w600k_mbf.onnx
  python -m experiments.convert_identity --arch=dlib          # dlib's .dat from face_recognition_models

Prints every source tensor/node → Flax layer it mapped, then the output path. Load the result with
`identity.load_identity('arcface-<arch>', weights=<output>)` (or 'dlib').
"""

import pathlib

import jax
import numpy as np
from absl import app, flags

from experiments import common

from ganfit_jax import identity
from ganfit_jax.identity import arcface, dlib_resnet, weights

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "r50", ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "dlib"],
                  "Backbone the weights belong to.")
flags.DEFINE_string("source", None, "Weight file: arcface_torch .pth, insightface .onnx, or dlib "
                    ".dat (default for --arch=dlib: face_recognition_models' copy).")
flags.DEFINE_string("output", None, "Output .msgpack (default checkpoints/arcface_<arch>_<source stem>"
                    ".msgpack, or checkpoints/dlib_resnet_v1.msgpack).")
flags.DEFINE_boolean("quiet", False, "Do not print the per-layer mapping.")


def main(argv):
    del argv
    log = None if FLAGS.quiet else (lambda line: print("  " + line))
    if FLAGS.arch == "dlib":
        source = pathlib.Path(FLAGS.source or identity.default_dlib_weights())
        params = dlib_resnet.load_dlib_resnet_params(source)
        if log:
            for name, leaves in params.items():
                for leaf, value in (leaves.items() if isinstance(leaves, dict) else []):
                    if isinstance(value, dict):
                        for k, v in value.items():
                            log(f"{name}/{leaf}/{k} {tuple(v.shape)}")
                    else:
                        log(f"{name}/{leaf} {tuple(value.shape)}")
        variables = {"params": params}
    else:
        if FLAGS.source is None:
            raise app.UsageError("--source is required for ArcFace backbones")
        source = pathlib.Path(FLAGS.source)
        module = arcface.make_arcface(FLAGS.arch)
        print(f"mapping {source} onto {type(module).__name__} ({FLAGS.arch}):")
        variables = weights.load_arcface_variables(module, source, log=log)
    default = ("checkpoints/dlib_resnet_v1.msgpack" if FLAGS.arch == "dlib"
               else f"checkpoints/arcface_{FLAGS.arch}_{source.stem}.msgpack")
    output = pathlib.Path(FLAGS.output or default)
    weights.save_variables(output, variables)
    count = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(variables))
    print(f"wrote {output} ({count:,} values) from {source}")


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
