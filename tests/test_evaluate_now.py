"""experiments/evaluate_now: NoW's validation protocol on a data set made here from the SFM (a
subdivided mean face as the 'scan'), against predictions whose error is known."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ganfit_jax import evaluation, io, morphable

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUBJECT = "FaMoS_180424_03335_TA"


def write_pp(path, points):
    """A MeshLab PickedPoints file as MeshLab writes one (header lines, then a point a line)."""
    lines = ['<!DOCTYPE PickedPoints>', '<PickedPoints>', ' <DocumentData>',
             '  <DateTime time="10:00:00" date="2019-01-01"/>', '  <User name="x"/>',
             '  <DataFileName name="scan.obj"/>', '  <templateName name=""/>', ' </DocumentData>']
    lines += [f' <point x="{x:.6f}" y="{y:.6f}" z="{z:.6f}" active="1" name="{k}"/>'
              for k, (x, y, z) in enumerate(points)]
    path.write_text("\n".join(lines + ['</PickedPoints>']) + "\n")


def similarity(points, scale, degrees, shift):
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return scale * np.asarray(points, np.float64) @ rotation.T + shift


@pytest.fixture(scope="module")
def now_data(sfm_dir, tmp_path_factory):
    """NOW/ (scan, its landmarks, the list) and PREDICTIONS/ with: neutral IMG_1 the scan's face
    in metres, turned and moved (error 0); selfie IMG_2 the same face with its 7 landmarks
    misplaced by millimetres (error 0 once the scan-to-mesh fit refines them); expressions
    IMG_3 missing."""
    import trimesh

    root = tmp_path_factory.mktemp("now")
    model = morphable.load(sfm_dir / "sfm_shape_3448.bin")
    verts = np.asarray(model.mean, np.float64)
    triangles = np.asarray(model.triangles)
    landmarks7 = verts[np.asarray(model.landmark_indices)[list(evaluation.NOW_LANDMARKS_IBUG)]]
    scan_v, scan_f = trimesh.remesh.subdivide(verts, triangles)  # on the same surface
    (root / "NOW" / "scans" / SUBJECT).mkdir(parents=True)
    (root / "NOW" / "scans_lmks_onlypp" / SUBJECT).mkdir(parents=True)
    trimesh.Trimesh(scan_v, scan_f, process=False).export(root / "NOW" / "scans" / SUBJECT /
                                                          "scan.obj")
    write_pp(root / "NOW" / "scans_lmks_onlypp" / SUBJECT / "scan_picked_points.pp", landmarks7)
    photos = [f"{SUBJECT}/multiview_neutral/IMG_1.jpg", f"{SUBJECT}/selfie/IMG_2.jpg",
              f"{SUBJECT}/multiview_expressions/IMG_3.jpg"]
    (root / "NOW" / "imagepathsvalidation.txt").write_text("\n".join(photos) + "\n")
    rng = np.random.default_rng(0)
    for rel, (points, marks) in zip(photos[:2], [
            (similarity(verts, 1e-3, 30, [0.1, 0, 0.5]), similarity(landmarks7, 1e-3, 30,
                                                                   [0.1, 0, 0.5])),
            (verts, landmarks7 + rng.uniform(-4, 4, size=(7, 3)))]):
        stem = root / "pred" / os.path.splitext(rel)[0]
        stem.parent.mkdir(parents=True)
        io.write_obj(str(stem) + ".obj", points, triangles)
        np.save(str(stem) + ".npy", marks.astype(np.float32))
    return root, scan_v, landmarks7


def test_now_errors_vanish_for_the_scans_own_surface_and_count_the_crop(now_data):
    from experiments import now_protocol  # no absl flags: safe to import in the test process

    root, scan_v, landmarks7 = now_data
    names = now_protocol.photo_names(root / "NOW" / "imagepathsvalidation.txt")
    result = now_protocol.evaluate(root / "NOW", root / "pred", names, log=None)
    rows = {r["name"]: r for r in result["photos"]}
    # NoW's sphere, from its definition: 30% from the nose base to between the inner eye corners,
    # radius 1.4 × the mean of the outer eye corners' distance and that nose length
    bridge = (landmarks7[1] + landmarks7[2]) / 2
    centre = landmarks7[4] + 0.3 * (bridge - landmarks7[4])
    radius = 0.7 * (np.linalg.norm(landmarks7[0] - landmarks7[3])
                    + np.linalg.norm(bridge - landmarks7[4]))
    inside = int((np.linalg.norm(scan_v - centre, axis=1) <= radius).sum())
    assert 0.3 * len(scan_v) < inside < len(scan_v)  # a crop, not the whole scan
    assert rows["IMG_1"]["points"] == rows["IMG_2"]["points"] == inside
    # metres, turned 30° and moved: scaled back by the landmark similarity
    assert rows["IMG_1"]["mean"] < 1e-4, rows["IMG_1"]
    # landmarks off by up to 4 mm: the scan-to-mesh fit brings the surface back
    assert rows["IMG_2"]["median"] < 1e-3, rows["IMG_2"]
    rough = now_protocol.evaluate(root / "NOW", root / "pred", names, refine=False, log=None)
    assert {r["name"]: r for r in rough["photos"]}["IMG_2"]["median"] > 0.3
    assert rows["IMG_3"] == dict(subject=SUBJECT, challenge="multiview_expressions",
                                 name="IMG_3", missing=True)
    assert result["all"]["photos"] == 3 and result["all"]["missing"] == 1
    assert result["all"]["points"] == 2 * inside
    assert result["challenges"]["multiview_expressions"]["median"] is None
    assert result["challenges"]["selfie"]["points"] == inside
    # without refinement, the cumulative curve crosses 50% at the median
    curve = {r: np.array(s["cumulative"]) for r, s in rough["challenges"].items()
             if s["cumulative"] is not None}["selfie"]
    median = rough["challenges"]["selfie"]["median"]
    below, above = int(median // 0.25), int(median // 0.25) + 1
    assert curve[below] <= 0.5 <= curve[above], (median, curve[below], curve[above])


def test_the_metrical_protocol_judges_size_and_takes_the_unit(now_data):
    """IMG_1 is the scan's face in metres: exact once taken in metres, 1000× too small in mm.
    A face 10% too large is exact up to scale, and millimetres off in the metrical protocol."""
    from experiments import now_protocol  # no absl flags: safe to import in the test process

    root, scan_v, landmarks7 = now_data
    names = [(SUBJECT, "multiview_neutral", "IMG_1")]
    metres = now_protocol.evaluate(root / "NOW", root / "pred", names, log=None, metrical=True,
                                   unit="m")
    assert metres["photos"][0]["mean"] < 1e-4, metres["photos"][0]
    wrong = now_protocol.evaluate(root / "NOW", root / "pred", names, log=None, metrical=True,
                                  unit="mm", refine=False)  # a fit to a speck would be slow
    assert wrong["photos"][0]["median"] > 20
    verts, tris = evaluation.load_mesh(root / "pred" / SUBJECT / "multiview_neutral" /
                                       "IMG_1.obj")
    large, large_marks = 1100 * verts, 1100 * np.load(root / "pred" / SUBJECT /
                                                      "multiview_neutral" / "IMG_1.npy")
    for metrical, low, high in ((False, 0, 1e-4), (True, 0.5, 20.0)):  # metrical: 1.24
        d, _ = evaluation.now_scan_errors(scan_v, landmarks7, large, tris, large_marks,
                                          metrical=metrical)
        assert low <= np.median(d) <= high, (metrical, np.median(d))


def test_the_binary_writes_the_table_and_refuses_to_overwrite(now_data, sfm_dir):
    root, _, _ = now_data

    def run(*args):
        return subprocess.run([sys.executable, "-m", "experiments.evaluate_now",
                               f"--dataset={root / 'NOW'}", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))

    out = root / "errors.json"
    proc = run(f"--predictions={root / 'pred'}", f"--output={out}", "--challenge=selfie",
               f"--alignment_dir={root / 'aligned'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selfie" in proc.stdout and "1/1 photos" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["photos"]] == ["IMG_2"]
    # the cumulative error curve: every point within 0.25 mm once the fit is refined
    cumulative = result["challenges"]["selfie"]["cumulative"]
    assert len(cumulative) == 41 and cumulative[1] == 1.0 and cumulative == sorted(cumulative)
    assert (root / "errors.png").stat().st_size > 0
    # --alignment_dir: the prediction where the alignment put it, on the SFM mean the scan was
    # made from, and the scored points coloured by their (here ~0) error
    import trimesh

    from ganfit_jax import morphable

    aligned, _ = evaluation.load_mesh(root / "aligned" / SUBJECT / "selfie" / "IMG_2.obj")
    sfm = morphable.load(pathlib.Path(sfm_dir) / "sfm_shape_3448.bin")
    np.testing.assert_allclose(aligned, np.asarray(sfm.mean), atol=1e-3)
    cloud = trimesh.load(root / "aligned" / SUBJECT / "selfie" / "IMG_2_errors.ply")
    assert len(cloud.vertices) == result["photos"][0]["points"]
    dark = (255 * evaluation.colormap(np.zeros(1), 0.0, 5.0)).round()[0, :3]
    np.testing.assert_allclose(np.asarray(cloud.colors)[:, :3], np.broadcast_to(dark, (len(
        cloud.vertices), 3)), atol=1)
    before = out.read_bytes()
    proc = run(f"--predictions={root / 'pred'}", f"--output={out}")
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and out.read_bytes() == before
    # a scan landmark file that is not one: one line naming it
    bad = root / "bad"
    (bad / "scans" / SUBJECT).mkdir(parents=True)
    (bad / "scans_lmks_onlypp" / SUBJECT).mkdir(parents=True)
    (bad / "scans" / SUBJECT / "scan.obj").write_bytes(
        (root / "NOW" / "scans" / SUBJECT / "scan.obj").read_bytes())
    (bad / "scans_lmks_onlypp" / SUBJECT / "x.pp").write_text("<PickedPoints><point x='1'/>")
    (bad / "imagepathsvalidation.txt").write_text(f"{SUBJECT}/selfie/IMG_2.jpg\n")
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate_now", f"--dataset={bad}",
                           f"--predictions={root / 'pred'}", f"--output={bad / 'e.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "x.pp: not a MeshLab .pp file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_read_pp_reads_points_in_order(tmp_path):
    points = np.arange(21, dtype=float).reshape(7, 3) * 1.5
    write_pp(tmp_path / "a.pp", points)
    np.testing.assert_allclose(evaluation.read_pp(tmp_path / "a.pp"), points, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="b.pp"):
        evaluation.read_pp(tmp_path / "b.pp")
