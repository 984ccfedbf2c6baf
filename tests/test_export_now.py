"""experiments/export_now: a NoW submission's layout and contents from fit folders."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ganfit_jax import io, morphable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def export(*args):
    return subprocess.run([sys.executable, "-m", "experiments.export_now", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def fake_fit(folder, model, source, shape, expression):
    """What fit leaves in a photo's folder, as far as the export reads it."""
    verts = np.asarray(morphable.vertices(model, shape, expression))
    io.save_params(folder / "params.npz", dict(shape=shape, expression=expression,
                                              vertices=verts), source=str(source))
    (folder / "metrics.json").write_text(json.dumps({"source": str(source)}))


def obj_vertices(path):
    """The `v` lines of an OBJ, read without our reader."""
    return np.array([line.split()[1:4] for line in path.read_text().splitlines()
                     if line.startswith("v ")], float)


@pytest.fixture(scope="module")
def sfm_path(sfm_dir):
    return sfm_dir / "sfm_shape_3448.bin"


@pytest.fixture(scope="module")
def sfm(sfm_path):
    return morphable.load(sfm_path)


def test_now_layout_neutral_shape_and_the_seven_landmarks(sfm, sfm_path, tmp_path):
    rng = np.random.default_rng(3)
    photos = tmp_path / "NoW" / "iphone_pictures"
    fits = tmp_path / "fits"
    coefficients = {}
    for k, rel in enumerate(["FaMoS_1/multiview_neutral/IMG_0101.jpg",
                             "FaMoS_2/selfie/IMG_0101.jpg"]):
        folder = fits / f"fit_{k}"
        folder.mkdir(parents=True)
        shape = rng.normal(size=sfm.num_shape).astype(np.float32)
        expression = rng.normal(size=sfm.num_expression).astype(np.float32)
        fake_fit(folder, sfm, photos / rel, shape, expression)
        coefficients[rel[:-4]] = shape, expression
    # the mean face, whose landmarks' order is checked below
    fake_fit(_new(fits / "mean"), sfm, photos / "FaMoS_0/selfie/IMG_1.jpg",
             np.zeros(sfm.num_shape, np.float32), np.zeros(sfm.num_expression, np.float32))
    (fits / "unfinished").mkdir()  # params.npz without metrics.json: an interrupted write
    io.save_params(fits / "unfinished" / "params.npz", dict(shape=np.zeros(3)), source="a/b/c.jpg")
    image_list = tmp_path / "imagepathsvalidation.txt"
    image_list.write_text("FaMoS_1/multiview_neutral/IMG_0101.jpg\nFaMoS_2/selfie/IMG_0101.jpg\n"
                          "FaMoS_3/multiview_expressions/IMG_0007.jpg\n")
    out = tmp_path / "predicted"
    proc = export(f"--fits={fits}", f"--output_dir={out}", f"--model={sfm_path}",
                  f"--image_list={image_list}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of 3 photos fitted, 1 fit(s) not in the list" in proc.stdout
    assert "no fit: FaMoS_3/multiview_expressions/IMG_0007" in proc.stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == [
        "FaMoS_0/selfie/IMG_1.npy", "FaMoS_0/selfie/IMG_1.obj",
        "FaMoS_1/multiview_neutral/IMG_0101.npy", "FaMoS_1/multiview_neutral/IMG_0101.obj",
        "FaMoS_2/selfie/IMG_0101.npy", "FaMoS_2/selfie/IMG_0101.obj"]
    for name, (shape, expression) in coefficients.items():
        verts = obj_vertices(out / (name + ".obj"))
        neutral = np.asarray(morphable.vertices(sfm, shape, np.zeros(sfm.num_expression)))
        np.testing.assert_allclose(verts, neutral, atol=1e-4)  # the scans are neutral
        fitted = np.asarray(morphable.vertices(sfm, shape, expression))
        assert np.abs(verts - fitted).max() > 1.0
        points = np.load(out / (name + ".npy"))
        assert points.shape == (7, 3) and points.dtype == np.float32
        # each landmark is a vertex of the mesh written beside it
        assert np.min(np.linalg.norm(verts[None] - points[:, None], axis=-1), axis=1).max() < 1e-3

    # NoW's order, read off the mean face's geometry rather than the model's mapping: the right
    # eye's corners on one side (outer farther out), the left eye's on the other, the nose base
    # on the midline below the eyes, the mouth corners below it, one on each side
    mean = np.asarray(morphable.vertices(sfm, np.zeros(sfm.num_shape), 0.0))
    p = np.load(out / "FaMoS_0" / "selfie" / "IMG_1.npy")
    np.testing.assert_allclose(obj_vertices(out / "FaMoS_0/selfie/IMG_1.obj"), mean, atol=1e-4)
    width = np.ptp(mean[:, 0])
    right, left = np.sign(p[0, 0]), np.sign(p[3, 0])
    assert right == np.sign(p[1, 0]) == np.sign(p[5, 0]) == -left == -np.sign(p[2, 0]) \
        == -np.sign(p[6, 0])
    assert abs(p[0, 0]) > abs(p[1, 0]) and abs(p[3, 0]) > abs(p[2, 0])  # outer corners outside
    assert abs(p[4, 0]) < 0.02 * width                                  # nose on the midline
    eyes_y, nose_y, mouth_y = p[:4, 1].mean(), p[4, 1], p[5:, 1].mean()
    assert eyes_y > nose_y > mouth_y  # y up, as in the model
    assert 1.4 < np.linalg.norm(p[0] - p[3]) / np.linalg.norm(p[5] - p[6]) < 2.4  # eyes, mouth


def _new(folder):
    folder.mkdir(parents=True)
    return folder


def test_fitted_expression_refusals_and_errors(sfm, sfm_path, tmp_path):
    rng = np.random.default_rng(4)
    fits, out = tmp_path / "fits", tmp_path / "predicted"
    shape = rng.normal(size=sfm.num_shape).astype(np.float32)
    expression = rng.normal(size=sfm.num_expression).astype(np.float32)
    fake_fit(_new(fits / "a"), sfm, "/data/S1/selfie/IMG_5.png", shape, expression)
    proc = export(f"--fits={fits}", f"--output_dir={out}", f"--model={sfm_path}", "--noneutral")
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(obj_vertices(out / "S1/selfie/IMG_5.obj"),
                               morphable.vertices(sfm, shape, expression), atol=1e-4)
    before = (out / "S1/selfie/IMG_5.npy").read_bytes()
    proc = export(f"--fits={fits}", f"--output_dir={out}", f"--model={sfm_path}")
    assert proc.returncode == 1 and "IMG_5.obj: already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "S1/selfie/IMG_5.npy").read_bytes() == before
    # two fits of one photo
    fake_fit(_new(fits / "b"), sfm, "/data/S1/selfie/IMG_5.png", shape, expression)
    proc = export(f"--fits={fits}", f"--output_dir={tmp_path / 'o2'}", f"--model={sfm_path}")
    assert proc.returncode == 1 and "both fit S1/selfie/IMG_5" in proc.stderr
    # fits of another model
    other = _new(tmp_path / "other" / "x")
    io.save_params(other / "params.npz", dict(shape=np.zeros(5), expression=np.zeros(2),
                                             vertices=np.zeros((10, 3))), source="/S/c/d.jpg")
    (other / "metrics.json").write_text("{}")
    proc = export(f"--fits={other.parent}", f"--output_dir={tmp_path / 'o3'}",
                  f"--model={sfm_path}")
    assert proc.returncode == 1 and "5 shape coefficients on 10 vertices" in proc.stderr
    assert not (tmp_path / "o3").exists()
    proc = export(f"--fits={tmp_path / 'none'}", f"--output_dir={tmp_path / 'o4'}")
    assert proc.returncode == 1 and "none: no such folder" in proc.stderr
