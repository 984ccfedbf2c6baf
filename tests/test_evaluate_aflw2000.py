"""experiments/evaluate_aflw2000: NME by yaw group from AFLW2000-3D's .mat files and fit folders.

AFLW2000-3D's annotations are not among the shared assets; the test writes .mat files in its
layout (`pt3d_68` 3 × 68, `Pose_Para` 1 × 7, as scipy reads the data set's) around known
errors, so every number the binary prints is known in advance."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import scipy.io
from PIL import Image

from ganfit_jax import io, landmarks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def evaluate(*args):
    return subprocess.run([sys.executable, "-m", "experiments.evaluate_aflw2000",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_nme_by_yaw_group_for_the_fit_and_its_input(tmp_path):
    rng = np.random.default_rng(5)
    data, fits = tmp_path / "AFLW2000", tmp_path / "fits"
    data.mkdir()
    expected = {}
    # (name, yaw in degrees, fitted?, the fit's offset from the truth in px)
    for name, yaw, fitted, offset in (("image00002", 10.0, True, (3.0, 4.0)),
                                      ("image00004", -45.0, True, (6.0, 8.0)),
                                      ("image00006", 75.0, False, None)):
        Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(data / f"{name}.jpg")
        matlab = rng.uniform(20, 100, size=(68, 2))  # 1-based pixel centres, as MATLAB's
        z = rng.normal(size=(68, 1))
        pose = np.array([[0.1, np.radians(yaw), -0.05, 60, 60, 0, 0.001]])
        scipy.io.savemat(data / f"{name}.mat", {"pt3d_68": np.concatenate([matlab, z], 1).T,
                                                "Pose_Para": pose})
        if not fitted:
            continue
        truth = matlab - 0.5  # the project's convention: the first pixel's centre at 0.5
        fit = truth + np.float64(offset)
        fit[:17] = np.nan  # a model without the contour's landmarks
        folder = fits / name
        folder.mkdir(parents=True)
        io.save_params(folder / "params.npz", dict(landmarks2d=fit), source=str(data / name))
        (folder / "metrics.json").write_text("{}")
        (folder / "landmarks.json").write_text(landmarks.landmarks_json(truth + [0.0, 2.0]))
        size = np.sqrt(np.prod(np.ptp(truth, axis=0)))
        expected[name] = (100 * np.hypot(*offset) / size, 100 * 2.0 / size)
    proc = evaluate(f"--data_dir={data}", f"--fits={fits}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((fits / "aflw2000.json").read_text())
    rows = {os.path.splitext(r["photo"])[0]: r for r in result["photos"]}
    assert [r["group"] for r in result["photos"]] == [0, 1, 2]  # |yaw|: 10, 45, 75
    for name, (fit_nme, input_nme) in expected.items():
        assert abs(rows[name]["fit_nme"] - fit_nme) < 1e-3, (name, rows[name], fit_nme)
        assert abs(rows[name]["input_nme"] - input_nme) < 1e-3, (name, rows[name], input_nme)
        assert rows[name]["landmarks_compared"] == 51
    assert "fit_nme" not in rows["image00006"]
    groups = result["groups"]
    assert [(g["photos"], g["fitted"]) for g in groups] == [(1, 1), (1, 1), (1, 0)]
    assert abs(groups[1]["fit_nme"] - expected["image00004"][0]) < 1e-3
    assert groups[2]["fit_nme"] is None and result["balanced"]["fit_nme"] is None
    assert re.search(r"\[0, 30\)\s+1\s+1\s+" + f"{expected['image00002'][0]:.2f}", proc.stdout)
    assert re.search(r"\[60, 90\]\s+1\s+0\s+-", proc.stdout), proc.stdout
    # the CED over all three photos: the unfitted one never within, each fit from its own NME
    thresholds = [0.25 * k for k in range(41)]
    first, second = sorted(v[0] for v in expected.values())
    for t, fraction in zip(thresholds, result["ced"]["fit_nme"]):
        assert abs(fraction - ((t >= first) + (t >= second)) / 3) < 1e-12, (t, fraction)
    assert (fits / "aflw2000.png").stat().st_size > 0
    # nothing replaced unless asked; a missing folder is one line
    before = (fits / "aflw2000.json").read_bytes()
    proc = evaluate(f"--data_dir={data}", f"--fits={fits}")
    assert proc.returncode == 1 and "aflw2000.json: already exists" in proc.stderr
    assert (fits / "aflw2000.json").read_bytes() == before
    proc = evaluate(f"--data_dir={tmp_path / 'nope'}", f"--fits={fits}")
    assert proc.returncode == 1 and "--data_dir=" in proc.stderr and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr
