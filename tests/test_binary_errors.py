"""Bad input to the binaries: a numeric flag out of its range is refused at parse time, naming
the flag (before: a zero --chunk divided by zero inside the fit loop, a negative λ fitted
uphill, a zero --distance rendered from inside the face); a bad or missing file ends the run
as one `error:` line naming it, not a traceback, before any output folder is made.
(fit's own bad-input cases are in test_fit_binary.py.)"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(binary, *args, env=None):
    return subprocess.run([sys.executable, "-m", f"experiments.{binary}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


CASES = [
    ("fit", "--chunk=0", "not a positive integer"),
    ("fit", "--iterations=-3", "not a non-negative integer"),
    ("fit", "--image_size=16", "not integer >= 32"),
    ("fit", "--lambda_content=-50", "not a non-negative number"),
    ("fit", "--stage1_learning_rate=0", "must be > 0"),
    # refused before any photo is read, not reported as every photo's skip reason
    ("fit", "--detector=mtcnn", "value should be one of <hog|cnn|hog+cnn>"),
    ("fit", "--expression_range=1,0", "two numbers LOW,HIGH with LOW < HIGH"),
    ("build_uv_dataset", "--detector=mtcnn", "value should be one of <hog|cnn|hog+cnn>"),
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
    args = ["fit", flag] if binary == "benchmark" else [flag]
    if binary in ("fit", "render", "train_texture_gan", "evaluate_micc", "build_uv_dataset",
                  "profile_step"):
        args.append(f"--output_dir={out}")  # a run that got past the flags would write here
    proc = _run(binary, *args)
    name = flag.split("=")[0]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"flag {name}=" in proc.stderr and expect in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


FILE_CASES = ["train_texture_gan", "build_texture_pca", "render", "identity_similarity",
              "convert_identity", "evaluate_micc", "benchmark"]


@pytest.mark.parametrize("binary", FILE_CASES)
def test_bad_file_is_one_error_line_naming_it(binary, tmp_path, sfm_dir):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive")
    photo = tmp_path / "photo.png"
    photo.write_text("not a picture")
    args, named = {
        "train_texture_gan": ([f"--uv_dir={empty}", f"--output_dir={out}"], str(empty)),
        "build_texture_pca": ([f"--uv_dir={empty}", f"--output={out}.npz"], str(empty)),
        "render": ([f"--model={sfm_dir / 'sfm_shape_3448.bin'}", f"--params={junk}",
                    f"--output_dir={out}"], str(junk)),
        "identity_similarity": (["--identity=tiny", str(photo), str(photo)], str(photo)),
        "convert_identity": (["--arch=dlib", f"--source={junk}", f"--output={out}.msgpack"],
                             str(junk)),
        "evaluate_micc": ([f"--micc_dir={tmp_path / 'nope'}", f"--output_dir={out}",
                           f"--model={sfm_dir / 'sfm_shape_3448.bin'}"], "nope"),
        "benchmark": (["fit", f"--model={junk}", "--config=tiny"], str(junk)),
    }[binary]
    proc = _run(binary, *args)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not os.path.exists(f"{out}.npz")
    assert not os.path.exists(f"{out}.msgpack")


def test_ganfit_traceback_shows_where_a_bad_file_failed(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("build_texture_pca", f"--uv_dir={empty}", f"--output={tmp_path / 'o.npz'}",
                env={"GANFIT_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "load_uv_folder" in proc.stderr  # the frame that raised, for whoever debugs it
