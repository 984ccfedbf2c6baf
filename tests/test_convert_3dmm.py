"""experiments/convert_3dmm.py as a user runs it: a subprocess on real files and on bad input."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import scipy.io

from ganfit_jax import morphable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "experiments.convert_3dmm", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_sfm_conversion_and_overwrite_refusal(tmp_path, sfm_dir, sfm_model):
    out = tmp_path / "sfm.npz"
    args = ["--format=sfm", f"--shape={sfm_dir / 'sfm_shape_3448.bin'}",
            f"--expression={sfm_dir / 'expression_blendshapes_3448.bin'}",
            f"--landmarks={sfm_dir / 'ibug_to_sfm.txt'}",
            f"--contours={sfm_dir / 'sfm_model_contours.json'}", f"--output={out}"]
    rc, stdout, stderr = _run(*args)
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    assert "vertices=3448 triangles=6736 S=63 E=6 landmarks_defined=" in lines[0]
    with np.load(out) as data:
        assert data["mean"].dtype == np.float32 and data["triangles"].dtype == np.int32
        assert data["shape_basis"].shape == (3448, 3, 63)
        assert data["landmark_indices"].shape == (68,)
    converted = morphable.load(out)
    np.testing.assert_array_equal(converted.mean, sfm_model.mean)
    np.testing.assert_array_equal(converted.landmark_indices, sfm_model.landmark_indices)
    np.testing.assert_array_equal(converted.contour_left, sfm_model.contour_left)
    assert converted.expression_range == (0.0, 1.0)  # eos' blendshapes keep their range

    before = out.read_bytes()
    rc, _, stderr = _run(*args)
    assert rc != 0 and f"{out}: already exists; refusing to overwrite" in stderr
    assert out.read_bytes() == before
    rc, _, stderr = _run(*args, "--overwrite")
    assert rc == 0, stderr


def test_bad_inputs(tmp_path, sfm_dir):
    rc, _, stderr = _run(f"--input={tmp_path / 'missing.h5'}", f"--output={tmp_path / 'o.npz'}")
    assert rc != 0 and "missing.h5: no such model file" in stderr

    rc, _, stderr = _run("--format=bfm2099", f"--input={tmp_path}", f"--output={tmp_path}/o.npz")
    assert rc != 0 and "--format=bfm2099" in stderr and "sfm|bfm2009|bfm2017" in stderr

    unknown = tmp_path / "model.xyz"
    unknown.write_bytes(b"\x00" * 200)
    rc, _, stderr = _run(f"--input={unknown}", f"--output={tmp_path / 'o.npz'}")
    assert rc != 0 and "model.xyz: unknown 3DMM format; known:" in stderr

    whole = (sfm_dir / "sfm_shape_3448.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(whole[: len(whole) // 2])
    rc, _, stderr = _run("--format=sfm", f"--shape={cut}", f"--output={tmp_path / 'o.npz'}")
    assert rc != 0
    assert re.search(r"cut.bin: (truncated|implausible .*not an eos model file)", stderr)
    assert not (tmp_path / "o.npz").exists()


def test_lsfm_with_landmark_file(tmp_path):
    """Another format through --input, with a text file of 68 landmark vertex indices."""
    rng = np.random.default_rng(0)
    n, k = 40, 3
    q, _ = np.linalg.qr(rng.normal(size=(3 * n, k)))
    mean = np.stack([np.cos(np.arange(n)), np.sin(np.arange(n)), np.ones(n)], 1) * 80
    tris = np.array([[0, i, i + 1] for i in range(1, n - 1)], np.int32)
    path = tmp_path / "all_all_all.mat"
    scipy.io.savemat(path, dict(mean=mean.reshape(-1), components=q, eigenvalues=[9.0, 4.0, 1.0],
                                trilist=tris, n_training_samples=100))
    landmarks = tmp_path / "lm.txt"
    landmarks.write_text(" ".join(str(i % n) for i in range(68)))
    out = tmp_path / "lsfm.npz"
    rc, stdout, stderr = _run(f"--input={path}", f"--landmarks={landmarks}", f"--output={out}")
    assert rc == 0, stderr
    assert "vertices=40 triangles=38 S=3 E=0 landmarks_defined=68/68" in stdout
    model = morphable.load(out)
    np.testing.assert_allclose(model.mean, mean, atol=1e-4)
    np.testing.assert_allclose(np.asarray(model.shape_basis).reshape(-1, k), q * [3, 2, 1],
                               atol=1e-6)
