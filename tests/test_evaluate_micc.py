"""End-to-end test of experiments/evaluate_micc.py on a small MICC-layout folder made from the
SFM."""

import csv
import io
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from experiments import evaluate_micc as micc
from ganfit_jax import evaluation as ev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE_MM = {"Indoor-Cooperative": 0.3, "PTZ-Indoor": 0.8, "PTZ-Outdoor": 1.6}


def _write_obj(path, verts, tris):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("mtllib scan.mtl\n")  # as scanner exports do; the file itself is absent
        f.writelines(f"v {x:.5f} {y:.5f} {z:.5f}\n" for x, y, z in verts)
        f.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in tris)


def _write_wrl(path, verts, tris):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("#VRML V2.0 utf8\nTransform { children [ Shape {\n geometry IndexedFaceSet {\n"
                "  coord Coordinate { point [\n")
        f.write(",\n".join(f"{x:.5f} {y:.5f} {z:.5f}" for x, y, z in verts))
        f.write(" ] }\n  coordIndex [\n")
        f.write(",\n".join(f"{a}, {b}, {c}, -1" for a, b, c in tris))
        f.write(" ]\n } } ] }\n")


def _frame(value, size=(24, 32)):
    return np.full(size + (3,), value, np.uint8)


@pytest.fixture(scope="module")
def micc_folder(tmp_path_factory, sfm_model):
    """Two subjects: subject_01 with an OBJ scan and frame folders, subject_02 with a VRML scan
    (no obj/) and motion-JPEG videos; reconstructions = the scan's shape plus normal noise."""
    from ganfit_jax import morphable

    root = tmp_path_factory.mktemp("micc")
    micc_dir, rec_dir = root / "florence", root / "recons"
    tris = np.asarray(sfm_model.triangles, np.int64)
    rng = np.random.default_rng(0)
    for s, subject in enumerate(("subject_01", "subject_02")):
        shape = np.asarray(morphable.vertices(sfm_model, rng.normal(size=sfm_model.num_shape)),
                           np.float64)
        # the scanner's own frame: shifted and slightly turned
        a = np.deg2rad(4.0 * (s + 1))
        rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        scan = shape @ rot.T + [12.0, -30.0, 850.0]
        sdir = micc_dir / subject
        if s == 0:
            _write_obj(str(sdir / "Model/frontal1/obj/110920150452.obj"), scan, tris)
        else:
            _write_wrl(str(sdir / "Model/frontal1/vrml/110920151020.wrl"), scan, tris)
        normals = ev.vertex_normals(shape, tris)
        for k, setting in enumerate(micc.SETTINGS):
            noisy = shape + normals * rng.uniform(-2, 2, (len(shape), 1)) * NOISE_MM[setting] / 1.0
            _write_obj(str(rec_dir / subject / f"{setting}.obj"), noisy, tris)
            if s == 0:
                d = sdir / "Video" / setting
                d.mkdir(parents=True)
                for i in range(12):
                    Image.fromarray(_frame(10 * i + k)).save(d / f"frame{i + 1}.png")
            else:
                (sdir / "Video").mkdir(parents=True, exist_ok=True)
                with open(sdir / "Video" / f"{setting}.mjpg", "wb") as f:
                    for i in range(20):
                        buf = io.BytesIO()
                        Image.fromarray(_frame(10 * i)).save(buf, "JPEG", quality=95)
                        f.write(b"--myboundary\r\nContent-Type: image/jpeg\r\n\r\n")
                        f.write(buf.getvalue())
    return micc_dir, rec_dir


def test_layout_discovery_and_uniform_frame_sampling(micc_folder):
    micc_dir, _ = micc_folder
    assert micc.find_subjects(str(micc_dir)) == ["subject_01", "subject_02"]
    assert micc.find_scan(str(micc_dir / "subject_01")).endswith("obj/110920150452.obj")
    assert micc.find_scan(str(micc_dir / "subject_02")).endswith(".wrl")
    assert micc.uniform_indices(12, 5) == [1, 3, 6, 8, 10]
    assert micc.uniform_indices(3, 5) == [0, 1, 2]
    # natural order: frame2 before frame10
    frames, idx = micc.sample_frames(
        micc.find_video(str(micc_dir / "subject_01"), "PTZ-Indoor"), 5)
    assert idx == [1, 3, 6, 8, 10] and len(frames) == 5
    assert frames[0].shape == (24, 32, 3) and frames[0].dtype == np.float32
    np.testing.assert_allclose([f[0, 0, 0] * 255 for f in frames], [11, 31, 61, 81, 101], atol=0.5)
    video = micc.find_video(str(micc_dir / "subject_02"), "PTZ-Outdoor")
    assert video.endswith("PTZ-Outdoor.mjpg")
    frames, idx = micc.sample_frames(video, 5)
    assert idx == [2, 6, 10, 14, 18]
    np.testing.assert_allclose([f[0, 0, 0] * 255 for f in frames], [20, 60, 100, 140, 180], atol=2)
    with pytest.raises(FileNotFoundError, match="no video"):
        micc.find_video(str(micc_dir / "subject_02"), "Outdoor-Party")
    with pytest.raises(FileNotFoundError, match="subject_NN"):
        micc.find_subjects(str(micc_dir / "subject_01"))


def test_a_video_that_needs_pyav_where_it_is_missing_names_it_and_the_folder_way(
        tmp_path, monkeypatch):
    """Not motion JPEG and no PyAV: the error says how to install it (optional.require's
    words, one line in the binary) and how to do without it."""
    from ganfit_jax import optional

    video = tmp_path / "PTZ-Indoor.avi"
    video.write_bytes(b"RIFF" + bytes(64))  # no JPEG frames in it
    monkeypatch.setitem(sys.modules, "av", None)  # as if not installed
    with pytest.raises(optional.MissingDependency) as e:
        micc.sample_frames(str(video), 5)
    message = str(e.value)
    assert message.startswith(f"{video}: not motion JPEG; decoding it needs the 'av' package")
    assert message.endswith("extract its frames into a folder of the same name "
                            "(ffmpeg -i VIDEO DIR/%05d.png)")


def test_evaluate_micc_end_to_end_precomputed_and_resumable(micc_folder, tmp_path, sfm_dir):
    micc_dir, rec_dir = micc_folder
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.evaluate_micc", f"--micc_dir={micc_dir}",
           f"--output_dir={out}", "--method=precomputed", f"--reconstructions_dir={rec_dir}",
           f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--error_map_size=48",
           "--init_yaw_degrees=0"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        # noise uniform in ±2·NOISE along the normal: mean |offset| = NOISE; ICP and the
        # symmetric average keep the error within a band around it
        err = float(r["error_mm"])
        assert 0.4 * NOISE_MM[r["setting"]] < err < 1.2 * NOISE_MM[r["setting"]], r
        assert float(r["p2p_mm"]) >= err
    table = (out / "table1.md").read_text()
    for setting in micc.SETTINGS:
        errs = [float(r["error_mm"]) for r in rows if r["setting"] == setting]
        assert f"| {setting} | 2 | {np.mean(errs):.2f} ± {np.std(errs):.2f} | 0 |" in table
    assert (out / "error_maps/subject_02/PTZ-Outdoor_frontal1.png").exists()
    # resumable: a finished subject is skipped, a removed one is redone
    done = out / "per_subject/subject_01.csv"
    stamp = os.stat(done).st_mtime_ns
    os.remove(out / "per_subject/subject_02.csv")
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "subject_01: done already" in run.stderr
    assert os.stat(done).st_mtime_ns == stamp
    assert (out / "per_subject/subject_02.csv").exists()
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_fit_method_gets_five_frames_and_missing_fitting_is_a_clear_error(
        micc_folder, tmp_path, sfm_model, monkeypatch):
    micc_dir, _ = micc_folder
    import ganfit_jax

    fake = types.ModuleType("ganfit_jax.fitting")
    monkeypatch.setitem(sys.modules, "ganfit_jax.fitting", fake)
    monkeypatch.setattr(ganfit_jax, "fitting", fake, raising=False)
    with pytest.raises(ValueError, match="fit_frames"):
        micc.make_fit_method(sfm_model, 0, str(tmp_path))

    seen = []

    def fit_frames(frames, model, seed):
        seen.append(len(frames))
        assert all(f.dtype == np.float32 and f.shape == (24, 32, 3) for f in frames)
        return {"vertices": np.asarray(model.mean)}

    fake.fit_frames = fit_frames
    reconstruct = micc.make_fit_method(sfm_model, 0, str(tmp_path / "recons"))
    verts, tris, idx, path = reconstruct("subject_01", "PTZ-Indoor", lambda: micc.sample_frames(
        micc.find_video(str(micc_dir / "subject_01"), "PTZ-Indoor"), 5))
    assert seen == [5] and idx == [1, 3, 6, 8, 10]
    v2, t2 = ev.load_mesh(path)  # the fit is saved for later --method=precomputed runs
    np.testing.assert_allclose(v2, np.asarray(sfm_model.mean), atol=1e-5)
    np.testing.assert_array_equal(t2, np.asarray(sfm_model.triangles))


def test_missing_reconstruction_is_reported_not_fatal(micc_folder, tmp_path):
    import shutil

    micc_dir, rec_dir = micc_folder
    partial = tmp_path / "recons"
    shutil.copytree(rec_dir, partial)
    os.remove(partial / "subject_02" / "PTZ-Outdoor.obj")
    cfg = dict(micc_dir=str(micc_dir), output_dir=str(tmp_path / "out"), method="precomputed",
               settings=list(micc.SETTINGS), scans=["frontal1", "frontal2"], subjects=[],
               frames_per_video=5, radius=95.0, distance="surface", icp_method="point",
               icp_scale=False, scan_scale=1.0, forward=np.array([0.0, 0, 1]), yaws=[0.0],
               rec_nose=None, model_nose=None, landmark_indices=None, num_model_vertices=None,
               scan_landmarks_dir=None, landmark_mode="similarity", error_maps=False,
               error_map_vmax=4.0, error_map_size=32, overwrite=False)
    table = micc.run(cfg, micc.make_precomputed_method(str(partial)))
    assert table["PTZ-Outdoor"]["n"] == 1 and table["PTZ-Outdoor"]["missing"] == 1
    assert table["Indoor-Cooperative"]["n"] == 2 and table["Indoor-Cooperative"]["missing"] == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    missing = [r for r in rows if r["status"] != "ok"]
    assert len(missing) == 1 and missing[0]["status"].startswith("missing")
    # frontal2 does not exist in this folder: evaluated against frontal1 only
    assert {r["scan"] for r in rows if r["status"] == "ok"} == {"frontal1"}
    with pytest.raises(FileNotFoundError, match="reconstructions_dir"):
        micc.make_precomputed_method(str(tmp_path / "nowhere"))
