"""Converts a publisher's 3DMM into the project's .npz layout (morphable.save_npz).

  python -m experiments.convert_3dmm --format=sfm --shape=sfm_shape_3448.bin \
      --expression=expression_blendshapes_3448.bin --landmarks=ibug_to_sfm.txt \
      [--contours=sfm_model_contours.json] --output=checkpoints/sfm.npz
  python -m experiments.convert_3dmm --format=bfm2017 --input=model2017-1_face12_nomouth.h5 \
      [--landmarks=bfm_ibug68.txt] --output=checkpoints/bfm2017.npz

--format may be left out: it is then read from the file (--shape means sfm). For the SFM,
--landmarks is eos' TOML mapping; for the other formats it is a text or .npy file of 68 vertex
indices (0-based, -1 where a landmark has no fixed vertex). Prints one summary line. Refuses to
replace an existing --output unless --overwrite.
"""

import io as _io
import os
import sys

from absl import app, flags

from ganfit_jax import io, model_formats, morphable

FLAGS = flags.FLAGS
flags.DEFINE_enum("format", None, ["sfm", "bfm2009", "bfm2017", "flame", "lsfm", "npz"],
                  "Input model format; default: detected from the file.")
flags.DEFINE_string("shape", None, "SFM: eos shape model (.bin).")
flags.DEFINE_string("expression", None, "SFM: eos expression blendshapes (.bin).")
flags.DEFINE_string("contours", None, "SFM: eos model_contours.json (jaw-line candidates).")
flags.DEFINE_string("symmetry", None, "SFM: eos reference symmetry file (optional).")
flags.DEFINE_string("input", None, "Other formats: the model file (.mat, .h5, .pkl, .npz).")
flags.DEFINE_string("landmarks", None,
                    "SFM: eos TOML iBUG mapping; others: text/.npy of 68 vertex indices.")
flags.DEFINE_integer("flame_num_shape", 300, "FLAME: leading shapedirs that are identity.",
                     lower_bound=1)
flags.DEFINE_string("output", None, "Output .npz path.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")


def convert(fmt, shape=None, expression=None, landmarks=None, contours=None, symmetry=None,
            input_path=None, flame_num_shape=300):
    """Loads the model as the flags describe; raises FileNotFoundError/ValueError on bad input."""
    if fmt is None:
        if shape is not None:
            fmt = "sfm"
        elif input_path is not None:
            fmt = morphable.detect_format(input_path)
            if fmt == "mat":
                fmt = model_formats.mat_flavour(input_path)
        else:
            raise ValueError("give --input=MODEL_FILE (or --shape=... for the SFM)")
    if fmt == "sfm":
        shape = shape or input_path
        if shape is None:
            raise ValueError("--format=sfm needs --shape=sfm_shape_*.bin")
        for name, value in (("shape", shape), ("expression", expression),
                            ("landmarks", landmarks), ("contours", contours),
                            ("symmetry", symmetry)):
            if value is not None and not os.path.exists(value):
                raise FileNotFoundError(f"{value}: no such file (--{name})")
        return morphable.load_sfm(shape, expression, landmarks, contours, symmetry)
    if input_path is None:
        raise ValueError(f"--format={fmt} needs --input=MODEL_FILE")
    if shape or expression or contours:
        raise ValueError("--shape/--expression/--contours are for --format=sfm; "
                         f"use --input for {fmt}")
    if fmt == "npz":
        model = morphable.load(input_path, format="npz")
        if landmarks is not None:
            model = model.replace(landmark_indices=morphable.jnp.asarray(
                model_formats.load_landmark_indices(landmarks, model.num_vertices)))
        return model
    kwargs = {"landmarks": landmarks}
    if fmt == "flame":
        kwargs["num_shape"] = flame_num_shape
    return morphable.load(input_path, format=fmt, **kwargs)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.output:
        raise app.UsageError("--output=OUT.npz is required")
    if not FLAGS.output.endswith(".npz"):
        raise app.UsageError(f"--output={FLAGS.output}: expected a .npz file name")
    try:
        io.refuse_overwrite(FLAGS.output, FLAGS.overwrite)  # before minutes of loading
        model = convert(FLAGS.format, FLAGS.shape, FLAGS.expression, FLAGS.landmarks,
                        FLAGS.contours, FLAGS.symmetry, FLAGS.input, FLAGS.flame_num_shape)
        buf = _io.BytesIO()
        morphable.save_npz(model, buf)
        io.write_never_overwrite(FLAGS.output, buf.getvalue(), FLAGS.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, IsADirectoryError) as e:
        sys.exit(f"convert_3dmm: error: {e}")
    print(f"{FLAGS.output}: {model.summary()}")


if __name__ == "__main__":
    app.run(main)
