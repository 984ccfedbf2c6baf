"""The NoW benchmark's scan-to-mesh error (Sanyal et al., CVPR 2019) on its validation set, here.

    python -m experiments.fit --images=NOW/imagepathsvalidation.txt --output_dir=outputs/now_val
    python -m experiments.export_now --fits=outputs/now_val --output_dir=outputs/now_predicted
    python -m experiments.evaluate_now --dataset=NOW --predictions=outputs/now_predicted

NoW's validation scans are public (its test scans are not: the test set is scored by its
authors from an `export_now` submission). Its own evaluation (github.com/soubhiksanyal/
now_evaluation) needs psbody-mesh and chumpy; this is the same protocol on NumPy/SciPy
(`evaluation.now_scan_errors`): for each photo of the list (NOW/imagepathsvalidation.txt, lines
SUBJECT/CHALLENGE/NAME.jpg), the subject's scan (NOW/scans/SUBJECT/*.obj) is cropped to the
sphere its 7 landmarks (NOW/scans_lmks_onlypp/SUBJECT/*.pp) give, the prediction
(PREDICTIONS/SUBJECT/CHALLENGE/NAME.obj and its 7 landmarks NAME.npy, as `export_now` writes
them) is aligned to the scan by those landmarks and then by the scan-to-mesh fit (scale,
rotation, translation), and every cropped scan vertex's distance to the prediction's surface is
an error. As NoW reports: the median, mean and standard deviation of all the errors together,
per challenge (neutral, expressions, occlusions, selfie) and over all; a photo without a
prediction is counted as missing. Writes PREDICTIONS/now_errors.json (per photo and per
challenge) and now_errors.png (NoW's cumulative error curve per challenge) and prints the table,
with progress and an ETA as it goes.

`--metrical` runs NoW's metrical protocol (Zielonka et al., MICA, ECCV 2022), which judges the
reconstruction's size too: predictions taken in `--predicted_mesh_unit`, both alignments rigid.

The optimiser differs from NoW's (point-to-plane ICP with scale, not chumpy's dogleg on the exact
scan-to-mesh distance), so numbers can differ from the official script's in the second digit.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import common, now_protocol

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "The NoW folder: imagepathsvalidation.txt, scans/SUBJECT/"
                    "*.obj, scans_lmks_onlypp/SUBJECT/*.pp.")
flags.DEFINE_string("predictions", None, "export_now's output folder: SUBJECT/CHALLENGE/NAME.obj "
                    "and NAME.npy (the 7 landmarks).")
flags.DEFINE_string("image_list", None, "The photos to score (default DATASET/"
                    "imagepathsvalidation.txt).")
flags.DEFINE_enum("challenge", "", ["", "multiview_neutral", "multiview_expressions",
                                    "multiview_occlusions", "selfie"],
                  "Score one challenge only (default: all).")
flags.DEFINE_bool("refine", True, "Refine the landmark alignment by the scan-to-mesh fit, as NoW "
                  "does (--norefine: landmarks only).")
flags.DEFINE_bool("metrical", False, "NoW's metrical protocol (MICA, ECCV 2022): the size is "
                  "judged too, the alignments rigid without scale; predictions in "
                  "--predicted_mesh_unit.")
flags.DEFINE_enum("predicted_mesh_unit", "mm", ["mm", "cm", "m"], "--metrical: the predictions' "
                  "unit (export_now writes millimetres).")
flags.DEFINE_string("alignment_dir", None, "Also write, per scored photo, SUBJECT/CHALLENGE/"
                    "NAME.obj (the prediction as aligned to its scan, the scan's frame) and "
                    "NAME_errors.ply (the cropped scan's points coloured by their error, 0 to "
                    "5 mm): to look at an alignment or where a face is off.")
flags.DEFINE_string("output", None, "Where the JSON goes (default PREDICTIONS/now_errors.json).")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
flags.mark_flags_as_required(["dataset", "predictions"])


def main(argv):
    del argv
    common.require_folders("dataset", "predictions")
    image_list = FLAGS.image_list or os.path.join(FLAGS.dataset, "imagepathsvalidation.txt")
    if not os.path.exists(image_list):
        raise ValueError(f"{image_list}: no such image list (pass --image_list)")
    paths = common.report_paths(
        FLAGS.output or os.path.join(FLAGS.predictions, "now_errors.json"), FLAGS.overwrite)
    aligned = FLAGS.alignment_dir
    if aligned and os.path.isdir(aligned) and os.listdir(aligned) and not FLAGS.overwrite:
        raise ValueError(f"--alignment_dir={FLAGS.alignment_dir} is not empty; pass --overwrite "
                         "or choose another folder")
    names = now_protocol.photo_names(image_list, FLAGS.challenge)
    result = now_protocol.evaluate(FLAGS.dataset, FLAGS.predictions, names, FLAGS.refine,
                                   log=lambda line: print(line, flush=True),
                                   metrical=FLAGS.metrical, unit=FLAGS.predicted_mesh_unit,
                                   alignment_dir=FLAGS.alignment_dir)
    print(now_protocol.table(result), flush=True)
    curves = {name: [100 * f for f in s["cumulative"]]
              for name, s in list(result["challenges"].items()) + [("all", result["all"])]
              if s["cumulative"] is not None}
    common.write_report(paths, result, curves, now_protocol.CUMULATIVE_MM, "error (mm)",
                        "NoW: % of scan points within the error", FLAGS.overwrite)


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
