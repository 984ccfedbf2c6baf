"""NoW's validation protocol over a data set folder and a prediction folder, with no absl flags
(so tests and other binaries may import it): `experiments/evaluate_now.py` is its command line,
and its docstring says what is measured."""

from __future__ import annotations

import glob
import os
import time

from experiments import common


def photo_names(image_list, challenge=""):
    """(SUBJECT, CHALLENGE, NAME) of each photo of NoW's list, in its order."""
    with open(image_list, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    names = []
    for k, line in enumerate(lines):
        parts = line.replace("\\", "/").split("/")
        if len(parts) < 3:
            raise ValueError(f"{image_list}:{k + 1}: {line!r} is not SUBJECT/CHALLENGE/NAME.jpg")
        if not challenge or parts[-2] == challenge:
            names.append((parts[-3], parts[-2], os.path.splitext(parts[-1])[0]))
    if not names:
        raise ValueError(f"{image_list}: no photo" + (f" of {challenge}" if challenge else ""))
    return names


def subject_scan(dataset, subject):
    """(scan vertices, the scan's 7 landmarks) of one subject."""
    from ganfit_jax import evaluation

    found = {}
    for folder, pattern in (("scans", "*.obj"), ("scans_lmks_onlypp", "*.pp")):
        paths = sorted(glob.glob(os.path.join(dataset, folder, subject, pattern)))
        if not paths:
            raise ValueError(f"--dataset={dataset}: no {folder}/{subject}/{pattern}")
        found[folder] = paths[0]
    vertices, _ = evaluation.load_mesh(found["scans"])
    landmarks = evaluation.read_pp(found["scans_lmks_onlypp"])
    if landmarks.shape != (7, 3):
        raise ValueError(f"{found['scans_lmks_onlypp']}: NoW's scans have 7 landmarks, got "
                         f"{len(landmarks)}")
    return vertices, landmarks


CUMULATIVE_MM = tuple(0.25 * k for k in range(41))  # NoW's cumulative error curve, 0-10 mm


def summary(errors):
    """Median, mean, std and count of all the errors together, and the fraction of them within
    each of CUMULATIVE_MM (NoW's cumulative error curve)."""
    import numpy as np

    if not errors:
        return dict(median=None, mean=None, std=None, points=0, cumulative=None)
    d = np.concatenate(errors)
    return dict(median=float(np.median(d)), mean=float(d.mean()), std=float(d.std()),
                points=int(d.size), cumulative=common.fraction_within(d, CUMULATIVE_MM))


UNIT_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}


ERROR_COLOUR_MM = 5.0  # --alignment_dir's colour scale: 0 mm dark blue to this yellow


def write_alignment(stem, aligned, triangles, points, errors):
    """--alignment_dir: STEM.obj (the aligned prediction) and STEM_errors.ply (the scored scan
    points coloured by error)."""
    import trimesh

    from ganfit_jax import evaluation, io

    os.makedirs(os.path.dirname(stem), exist_ok=True)
    io.write_obj(stem + ".obj", aligned, triangles, overwrite=True)  # refused up front
    colours = (255 * evaluation.colormap(errors, 0.0, ERROR_COLOUR_MM)).round().astype("uint8")
    trimesh.PointCloud(points, colors=colours).export(stem + "_errors.ply")


def evaluate(dataset, predictions, names, refine=True, log=print, metrical=False, unit="mm",
             alignment_dir=None):
    """{'photos': [...], 'challenges': {name: summary}, 'all': summary} (see the docstring);
    with `alignment_dir`, each scored photo's alignment and errors as files there."""
    import numpy as np

    from ganfit_jax import evaluation

    scan_of, rows, errors, t0 = None, [], {}, time.time()  # the list runs subject by subject
    for k, (subject, challenge, name) in enumerate(names):
        row = dict(subject=subject, challenge=challenge, name=name)
        stem = os.path.join(predictions, subject, challenge, name)
        if not (os.path.exists(stem + ".obj") and os.path.exists(stem + ".npy")):
            row["missing"] = True
        else:
            if scan_of is None or scan_of[0] != subject:
                scan_of = (subject, *subject_scan(dataset, subject))
            _, scan, scan_landmarks = scan_of
            vertices, triangles = evaluation.load_mesh(stem + ".obj")
            landmarks = np.load(stem + ".npy")
            try:
                d, aligned = evaluation.now_scan_errors(
                    scan, scan_landmarks, vertices, triangles, landmarks, refine=refine,
                    metrical=metrical, mesh_unit_mm=UNIT_MM[unit])
            except ValueError as e:
                raise ValueError(f"{stem}.obj: {e}") from None
            if alignment_dir:
                write_alignment(os.path.join(alignment_dir, subject, challenge, name), aligned,
                                triangles, evaluation.now_scan_crop(scan, scan_landmarks), d)
            errors.setdefault(challenge, []).append(d)
            row.update(median=float(np.median(d)), mean=float(d.mean()), points=int(d.size))
        rows.append(row)
        if log and ((k + 1) % 20 == 0 or k + 1 == len(names)):
            rate = (k + 1) / max(time.time() - t0, 1e-9)
            eta = (len(names) - k - 1) / rate
            log(f"{k + 1}/{len(names)} photos, {rate:.2f}/s, eta {eta:.0f}s")
    challenges = {}
    for challenge in dict.fromkeys(c for _, c, _ in names):
        mine = [r for r in rows if r["challenge"] == challenge]
        challenges[challenge] = dict(summary(errors.get(challenge, [])), photos=len(mine),
                                     missing=sum("missing" in r for r in mine))
    every = [d for ds in errors.values() for d in ds]
    return dict(photos=rows, challenges=challenges,
                all=dict(summary(every), photos=len(rows),
                         missing=sum("missing" in r for r in rows)))


def table(result):
    def cell(value):
        return "    -" if value is None else f"{value:5.2f}"

    lines = ["challenge               photos  missing  median  mean    std  (mm)"]
    for name, s in list(result["challenges"].items()) + [("all", result["all"])]:
        lines.append(f"{name:<23} {s['photos']:>6}  {s['missing']:>7}  {cell(s['median'])}  "
                     f"{cell(s['mean'])}  {cell(s['std'])}")
    return "\n".join(lines)
