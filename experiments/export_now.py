"""A NoW benchmark submission (Sanyal et al., CVPR 2019) from a folder of `fit` results.

    python -m experiments.fit --images=NOW/imagepaths.txt --output_dir=outputs/now_val
    python -m experiments.export_now --fits=outputs/now_val --output_dir=outputs/now_predicted \
        --image_list=NOW/imagepathsvalidation.txt

NoW's evaluation (github.com/soubhiksanyal/now_evaluation) reads, for each photo
SUBJECT/CHALLENGE/NAME.jpg of its list, a mesh SUBJECT/CHALLENGE/NAME.obj and seven 3D landmarks
SUBJECT/CHALLENGE/NAME.npy from the prediction folder, aligns the mesh to the scan by those
landmarks (rotation, translation, scale), and measures the scan-to-mesh distance. This writes
each fit's shape at a neutral expression (the benchmark's scans are neutral; `--noneutral`
keeps the fitted expression) in model coordinates, millimetres (NoW's metrical protocol:
`--predicted_mesh_unit=mm`), and the model's vertices for NoW's seven landmarks, in its order:
the right eye's outer and inner corners, the left eye's inner and outer corners, the base of the
nose, the right and left mouth corners (iBUG-68 points 37, 40, 43, 46, 34, 49, 55, 1-based).

Each fit is found by its params.npz (the photo it came from is in its metadata), so the fit's
own folder names do not matter; two fits of one photo are an error naming both. With
`--image_list`, photos of the list without a fit are listed (NoW counts them as failures).
Existing files are never replaced unless --overwrite.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import common
from ganfit_jax import evaluation

FLAGS = flags.FLAGS
flags.DEFINE_string("fits", None, "The output folder of `fit --images` (searched at any depth "
                    "for params.npz).")
flags.DEFINE_string("output_dir", None, "Where the submission goes: SUBJECT/CHALLENGE/NAME.obj "
                    "and .npy for each fitted photo.")
flags.DEFINE_string("image_list", None, "NoW's image list (imagepathsvalidation.txt, "
                    "imagepathstest.txt): report which of its photos have no fit.")
flags.DEFINE_string("model", None, "The morphable model the fits used (default: fit's default, "
                    "checkpoints/sfm.npz or the shared SFM).")
flags.DEFINE_bool("neutral", True, "The fitted shape at a neutral expression (NoW's scans are "
                  "neutral); --noneutral keeps each fit's expression.")
flags.DEFINE_bool("overwrite", False, "Replace existing files.")
flags.mark_flags_as_required(["fits", "output_dir"])



def now_name(source):
    """SUBJECT/CHALLENGE/NAME of a photo's path, as NoW's evaluation names its prediction."""
    parts = os.path.normpath(str(source)).split(os.sep)
    if len(parts) < 3:
        raise ValueError(f"{source}: a NoW photo's path ends in SUBJECT/CHALLENGE/NAME.jpg")
    return os.path.join(*parts[-3:-1], os.path.splitext(parts[-1])[0])


def find_fits(folder):
    """{NoW name: params.npz} of every finished fit below `folder`."""
    from ganfit_jax import io

    found = {}
    for root, _, files in sorted(os.walk(folder)):
        if "params.npz" not in files or "metrics.json" not in files:  # metrics.json: written last
            continue
        params = os.path.join(root, "params.npz")
        source = io.load_params(params)["__meta__"].get("source")
        if source is None:
            raise ValueError(f"{params}: no source photo in its metadata (not written by fit?)")
        name = now_name(source)
        if name in found:
            raise ValueError(f"{found[name]} and {params} both fit {name}; keep one")
        found[name] = params
    return found


def now_prediction(model, params, neutral=True):
    """(vertices (N,3) mm, the seven landmarks (7,3)) of one fit's params.npz as loaded."""
    import numpy as np

    from ganfit_jax import morphable

    expression = np.zeros(model.num_expression) if neutral else params["expression"]
    verts = np.asarray(morphable.vertices(model, params["shape"], expression), np.float64)
    points = np.asarray(morphable.landmarks3d(model, verts))[list(evaluation.NOW_LANDMARKS_IBUG)]
    return verts, points


def check_model(model, model_path, params, path):
    """ValueError naming both files when `params` was not fitted with `model`."""
    shape, verts = params["shape"], params["vertices"]
    if shape.shape != (model.num_shape,) or verts.shape != (model.num_vertices, 3):
        raise ValueError(f"{path}: fitted with {shape.shape[0]} shape coefficients on "
                         f"{verts.shape[0]} vertices, but --model={model_path} has "
                         f"{model.num_shape} on {model.num_vertices}; pass the fit's --model")
    missing = [i + 1 for i in evaluation.NOW_LANDMARKS_IBUG if model.landmark_indices[i] < 0]
    if missing:
        raise ValueError(f"--model={model_path} defines no vertex for iBUG-68 point(s) "
                         f"{missing} (1-based), which NoW aligns by")


def main(argv):
    del argv
    import numpy as np

    from ganfit_jax import io, morphable

    if not os.path.isdir(FLAGS.fits):
        raise ValueError(f"--fits={FLAGS.fits}: no such folder")
    model_path = FLAGS.model or common.default_model_path()
    if model_path is None:
        raise ValueError(common.MISSING_MODEL)
    fits = find_fits(FLAGS.fits)
    if not fits:
        raise ValueError(f"--fits={FLAGS.fits}: no finished fit (params.npz beside metrics.json)")
    wanted = None
    if FLAGS.image_list:
        with open(FLAGS.image_list, encoding="utf-8") as f:
            wanted = [now_name(line.strip()) for line in f if line.strip()]
    model = morphable.load(model_path)
    loaded = {}
    for name, path in sorted(fits.items()):  # every refusal before anything is written
        params = io.load_params(path)
        check_model(model, model_path, params, path)
        loaded[name] = {k: params[k] for k in ("shape", "expression")}
        for ext in (".obj", ".npy"):
            target = os.path.join(FLAGS.output_dir, name + ext)
            if os.path.exists(target) and not FLAGS.overwrite:
                raise FileExistsError(f"{target}: already exists; refusing to overwrite it "
                                      "(pass --overwrite)")
    for k, (name, params) in enumerate(loaded.items()):
        verts, points = now_prediction(model, params, FLAGS.neutral)
        stem = os.path.join(FLAGS.output_dir, name)
        io.write_obj(stem + ".obj", verts, np.asarray(model.triangles), overwrite=FLAGS.overwrite)
        with open(io.refuse_overwrite(stem + ".npy", FLAGS.overwrite), "wb") as f:
            np.save(f, points.astype(np.float32))
        if (k + 1) % 100 == 0:
            print(f"{k + 1}/{len(fits)} written", flush=True)
    expression = "neutral" if FLAGS.neutral else "fitted"
    print(f"wrote {len(fits)} prediction(s) (mesh .obj in mm, {expression} expression, and the 7 "
          f"landmarks .npy) to {FLAGS.output_dir}", flush=True)
    if wanted is not None:
        missing = [name for name in wanted if name not in fits]
        extra = len(set(fits) - set(wanted))
        print(f"--image_list: {len(wanted) - len(missing)} of {len(wanted)} photos fitted"
              + (f", {extra} fit(s) not in the list" if extra else ""), flush=True)
        for name in missing[:20]:
            print(f"  no fit: {name}", file=sys.stderr)
        if len(missing) > 20:
            print(f"  ... and {len(missing) - 20} more", file=sys.stderr)


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
