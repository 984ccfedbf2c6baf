"""2D landmark error on AFLW2000-3D (Zhu et al., CVPR 2016), the protocol 3DDFA and PRNet report.

    python -m experiments.fit --images=AFLW2000 --output_dir=outputs/aflw2000
    python -m experiments.evaluate_aflw2000 --data_dir=AFLW2000 --fits=outputs/aflw2000

For each photo NAME.jpg of the data set with NAME.mat beside it (`pt3d_68`: the 68 landmarks
as 3 × 68, x and y in the photo's pixels, MATLAB's 1-based convention; `Pose_Para`: pitch, yaw,
roll in radians, ...), the fit's 68 landmarks (params.npz's `landmarks2d`, the fitted model
projected into the photo) are compared with the annotation: the normalised mean error (NME) is
the mean distance over the landmarks the model defines, divided by the square root of the
annotation's bounding-box area, in %. Photos are grouped by |yaw| into [0°, 30°), [30°, 60°),
[60°, 90°]; the balanced mean is the mean of the three groups' means, as the papers report it.
The landmarks fit followed (its `landmarks.json`: dlib's, unless given) are scored the same way,
so the table shows what fitting the model adds to, or takes from, its input. A photo without a
fit (dlib found no face: most of the profiles) is counted as missing per group, not scored.
Writes `aflw2000.json` (per photo and per group, and the cumulative error distribution, CED)
and `aflw2000.png` (the CED curves of the fit and of its input) and prints the table.

The fit must not read the annotations: `fit` looks for .pts/.npy/.json landmark files beside a
photo, never .mat, so it detects with dlib here.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "The AFLW2000-3D folder (imageNNNNN.jpg + .mat).")
flags.DEFINE_string("fits", None, "`fit --images=DATA_DIR`'s output folder (a folder per photo).")
flags.DEFINE_string("output", None, "Where the JSON goes (default FITS/aflw2000.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
flags.mark_flags_as_required(["data_dir", "fits"])

YAW_GROUPS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))


def read_annotation(path):
    """(68 landmarks (68, 2) in the project's pixel convention (`ganfit_jax.landmarks`: the
    first pixel's centre at 0.5), |yaw| in degrees) of one AFLW2000-3D .mat file. The data set
    was made in MATLAB, so its pixel centres are taken to start at 1, as a .pts file's do (the
    papers compare raw values; the two conventions differ by 0.5 px a coordinate)."""
    import numpy as np

    from ganfit_jax import model_formats

    values = model_formats.read_mat(path, ["pt3d_68", "Pose_Para"])
    points = np.asarray(values["pt3d_68"], np.float64)
    if points.shape != (3, 68) and points.shape != (2, 68):
        raise ValueError(f"{path}: pt3d_68 must be 3 × 68 (or 2 × 68), got {points.shape}")
    pose = np.asarray(values["Pose_Para"], np.float64).reshape(-1)
    if pose.size < 3:
        raise ValueError(f"{path}: Pose_Para must hold pitch, yaw, roll; got {pose.size} values")
    return points[:2].T - 0.5, abs(float(np.degrees(pose[1])))


def nme(predicted, truth):
    """Mean landmark distance over the landmarks both define, ÷ sqrt(annotation's box area), in
    % ; and how many landmarks it is over."""
    import numpy as np

    ok = np.all(np.isfinite(predicted), 1) & np.all(np.isfinite(truth), 1)
    if not ok.any():
        return float("nan"), 0
    size = np.sqrt(np.prod(truth.max(0) - truth.min(0)))
    error = np.linalg.norm(predicted[ok] - truth[ok], axis=1).mean()
    return float(100.0 * error / size), int(ok.sum())


def yaw_group(yaw):
    for k, (lo, hi) in enumerate(YAW_GROUPS):
        if yaw < hi or k == len(YAW_GROUPS) - 1:
            return k
    return len(YAW_GROUPS) - 1


def evaluate(data_dir, fits):
    """{'photos': [...], 'groups': [...], 'balanced': {...}} (see the module docstring)."""
    import numpy as np

    from ganfit_jax import io, landmarks

    photos = [p for p in common.find_images(data_dir)
              if os.path.exists(os.path.splitext(p)[0] + ".mat")]
    if not photos:
        raise ValueError(f"--data_dir={data_dir}: no photo with a .mat annotation beside it")
    folders = common.photo_folders(photos, fits)
    rows = []
    for photo, folder in zip(photos, folders):
        truth, yaw = read_annotation(os.path.splitext(photo)[0] + ".mat")
        row = dict(photo=os.path.basename(photo), yaw_deg=yaw, group=yaw_group(yaw))
        if os.path.exists(os.path.join(folder, "metrics.json")):
            fitted = io.load_params(os.path.join(folder, "params.npz"))["landmarks2d"]
            row["fit_nme"], row["landmarks_compared"] = nme(np.asarray(fitted, np.float64), truth)
            followed = os.path.join(folder, "landmarks.json")
            if os.path.exists(followed):
                row["input_nme"], _ = nme(np.asarray(landmarks.load_landmarks(followed),
                                                     np.float64), truth)
        rows.append(row)
    groups = []
    for k, (lo, hi) in enumerate(YAW_GROUPS):
        mine = [r for r in rows if r["group"] == k]
        scored = [r for r in mine if "fit_nme" in r]
        inputs = [r["input_nme"] for r in scored if "input_nme" in r]
        groups.append(dict(
            yaw=f"[{lo:.0f}, {hi:.0f}{']' if k == len(YAW_GROUPS) - 1 else ')'}",
            photos=len(mine), fitted=len(scored),
            fit_nme=float(np.mean([r["fit_nme"] for r in scored])) if scored else None,
            input_nme=float(np.mean(inputs)) if inputs else None))
    balanced = {key: (float(np.mean([g[key] for g in groups]))
                      if all(g[key] is not None for g in groups) else None)
                for key in ("fit_nme", "input_nme")}
    return dict(photos=rows, groups=groups, balanced=balanced, ced=ced(rows))


CED_PERCENT = tuple(0.25 * k for k in range(41))  # NME thresholds of the CED curve, 0-10%


def ced(rows):
    """The cumulative error distribution landmark papers plot: for each of CED_PERCENT, the
    fraction of all the photos (a photo without a fit counts as never within) whose NME is at
    most that, for the fit and for the landmarks it followed."""
    import numpy as np

    out = {}
    for key in ("fit_nme", "input_nme"):
        values = np.array([r.get(key, np.inf) for r in rows], np.float64)
        values[np.isnan(values)] = np.inf
        out[key] = common.fraction_within(values, CED_PERCENT)
    return out


def table(result):
    def cell(value):
        return "   -  " if value is None else f"{value:6.2f}"

    lines = ["|yaw|      photos  fitted  NME fit %  NME input %"]
    for g in result["groups"]:
        lines.append(f"{g['yaw']:<10} {g['photos']:>6}  {g['fitted']:>6}  {cell(g['fit_nme']):>9}"
                     f"  {cell(g['input_nme']):>11}")
    b = result["balanced"]
    lines.append(f"{'balanced':<10} {'':>6}  {'':>6}  {cell(b['fit_nme']):>9}"
                 f"  {cell(b['input_nme']):>11}")
    return "\n".join(lines)


def main(argv):
    del argv
    common.require_folders("data_dir", "fits")
    paths = common.report_paths(FLAGS.output or os.path.join(FLAGS.fits, "aflw2000.json"),
                                FLAGS.overwrite)
    result = evaluate(FLAGS.data_dir, FLAGS.fits)
    print(table(result), flush=True)
    curves = {"fit": [100 * f for f in result["ced"]["fit_nme"]],
              "landmarks followed": [100 * f for f in result["ced"]["input_nme"]]}
    common.write_report(paths, result, curves, CED_PERCENT, "NME (%)",
                        "AFLW2000-3D: % of photos within the NME", FLAGS.overwrite)


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
