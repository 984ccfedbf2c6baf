"""Every binary refuses a numeric flag out of its range at parse time, naming the flag, before
anything is loaded or written (before: a zero --chunk divided by zero inside the fit loop, a
negative λ fitted uphill, a zero --distance rendered from inside the face)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("fit", "--chunk=0", "not a positive integer"),
    ("fit", "--iterations=-3", "not a non-negative integer"),
    ("fit", "--image_size=16", "not integer >= 32"),
    ("fit", "--lambda_content=-50", "not a non-negative number"),
    ("fit", "--stage1_learning_rate=0", "must be > 0"),
    ("render", "--distance=0", "must be > 0"),
    ("render", "--background=2", "not a number in the range [0.0, 1.0]"),
    ("train_texture_gan", "--ema_decay=1.5", "not a number in the range [0.0, 1.0]"),
    ("train_texture_gan", "--max_resolution=2048", "not an integer in the range [4, 1024]"),
    ("evaluate_micc", "--crop_radius=0", "must be > 0"),
    ("benchmark", "--repeats=0", "not a positive integer"),
    ("build_uv_dataset", "--resolution=0", "not integer >= 4"),
    ("build_texture_pca", "--num_components=-1", "not a non-negative integer"),
    ("profile_step", "--steps=0", "not a positive integer"),
    ("convert_3dmm", "--flame_num_shape=0", "not a positive integer"),
]


@pytest.mark.parametrize("binary, flag, expect", CASES, ids=[f"{b} {f}" for b, f, _ in CASES])
def test_out_of_range_flag_is_refused_by_name(binary, flag, expect, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", f"experiments.{binary}", flag]
    if binary in ("fit", "render", "train_texture_gan", "evaluate_micc", "build_uv_dataset",
                  "profile_step"):
        args.append(f"--output_dir={out}")  # a run that got past the flags would write here
    if binary == "benchmark":
        args.insert(3, "fit")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    name = flag.split("=")[0]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"flag {name}=" in proc.stderr and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
