"""Midpoint subdivision and the render experiment binary."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ganfit_jax import render

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subdivide_quadruples_triangles_and_keeps_the_surface():
    trimesh = pytest.importorskip("trimesh")
    sphere = trimesh.creation.icosphere(subdivisions=1)
    verts, tris = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    uv = verts[:, :2] * 0.5 + 0.5
    v2, t2, uv2 = render.subdivide(verts, tris, uv)
    edges = len(trimesh.Trimesh(verts, tris, process=False).edges_unique)
    assert t2.shape == (4 * len(tris), 3) and v2.shape == (len(verts) + edges, 3)
    np.testing.assert_array_equal(v2[: len(verts)], verts)
    # New vertices are edge midpoints; a watertight mesh stays watertight with the same area
    # (every child is a quarter of its parent, which is flat) and the same orientation.
    child = trimesh.Trimesh(v2, t2, process=False)
    assert child.is_watertight and child.is_winding_consistent
    np.testing.assert_allclose(child.area, sphere.area, rtol=1e-12)
    np.testing.assert_allclose(child.area_faces.reshape(-1, 4).sum(1), sphere.area_faces, rtol=1e-9)
    np.testing.assert_allclose(child.face_normals[::4], sphere.face_normals, atol=1e-12)
    np.testing.assert_allclose(uv2, v2[:, :2] * 0.5 + 0.5, atol=1e-12)  # uv is affine in xyz
    with pytest.raises(ValueError, match="triangle indices"):
        render.subdivide(verts, tris + len(verts))


def test_subdivided_sfm_renders_the_same_silhouette(sfm_model):
    import jax.numpy as jnp

    from ganfit_jax import camera

    v, t, _ = render.subdivide(sfm_model.mean, sfm_model.triangles)
    cam = jnp.array([0, 0, 600, 0, 0, 0, camera.default_focal(64)], jnp.float32)
    coarse = render.rasterize(*camera.project(cam, sfm_model.mean, 64), sfm_model.triangles, 64)[0]
    fine = render.rasterize(*camera.project(cam, jnp.asarray(v), 64), t, 64)[0]
    # Children 4k..4k+3 cover exactly their parent k (coplanar), up to pixel centres on edges.
    parent = np.where(np.asarray(fine) >= 0, np.asarray(fine) // 4, -1)
    assert np.mean(parent == np.asarray(coarse)) > 0.995


def _run(args):
    return subprocess.run([sys.executable, "-m", "experiments.render"] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_without_a_camera_every_view_frames_the_whole_mesh_lit_from_its_own_side(sfm_dir,
                                                                                  tmp_path):
    """No --params, no --distance: the turntable's camera stands as near as keeps the whole
    mean face in every view (a fixed 800 mm cut the SFM's chin and brow off at 12°), and the
    default light goes round with it: the two profiles are lit alike."""
    from PIL import Image

    out = tmp_path / "t"
    result = _run(["--model", str(sfm_dir / "sfm_shape_3448.bin"), "--output_dir", str(out),
                   "--turntable=4", "--image_size=48", "--save_mask"])
    assert result.returncode == 0, result.stderr[-2000:]
    brightness = {}
    for yaw in ("+0000.0", "+0090.0", "+0180.0", "+0270.0"):
        image = np.asarray(Image.open(out / f"yaw{yaw}.png"), np.float64)
        mask = np.load(out / f"yaw{yaw}_mask.npy") > 0
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert mask.mean() > 0.1 and not border.any(), yaw
        brightness[yaw] = image[mask].mean()
    assert abs(brightness["+0090.0"] / brightness["+0270.0"] - 1) < 0.1, brightness


def test_render_experiment_writes_views_and_refuses_to_overwrite(sfm_dir, tmp_path):
    model = str(sfm_dir / "sfm_shape_3448.bin")
    params = tmp_path / "params.npz"
    np.savez(params, shape=np.full(63, 0.5, np.float32),
             light=np.array([0, 0, 2000, 1, 1, 1, 0.2, 0.2, 0.2], np.float32))
    out = tmp_path / "out"
    args = ["--model", model, "--params", str(params), "--output_dir", str(out),
            "--views=-30,0", "--turntable", "2", "--image_size", "48", "--save_depth",
            "--save_mask", "--save_normals"]
    result = _run(args)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert len(names) == 3 * 4  # yaws -30, 0 and the turntable's 0 (once), 180
    from PIL import Image

    image = np.asarray(Image.open(out / "yaw+0000.0.png"))
    mask = np.load(out / "yaw+0000.0_mask.npy")
    depth = np.load(out / "yaw+0000.0_depth.npy")
    assert image.shape == (48, 48, 3) and mask.shape == depth.shape == (48, 48)
    assert 0.2 < mask.mean() < 0.95 and np.all(depth[mask > 0] > 600)
    assert np.all(image[mask == 0] == 255)  # white background
    # normals where the mask is, NaN elsewhere; seen from the front, the face looks back (z < 0)
    normals = np.load(out / "yaw+0000.0_normals.npy")
    covered = np.isfinite(normals).all(-1)
    assert normals.shape == (48, 48, 3) and np.array_equal(covered, mask > 0)
    np.testing.assert_allclose(np.linalg.norm(normals[covered], axis=-1), 1, atol=1e-4)
    assert np.median(normals[covered][:, 2]) < -0.7
    before = os.path.getmtime(out / "yaw+0000.0.png")
    result = _run(args)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert os.path.getmtime(out / "yaw+0000.0.png") == before
    # --turntable_video: the turntable's views in order as one video
    video_args = ["--model", model, "--params", str(params), "--output_dir", str(tmp_path / "v"),
                  "--turntable", "4", "--image_size", "48", "--turntable_video", "--fps=10"]
    result = _run(video_args)
    assert result.returncode == 0, result.stderr[-2000:]
    from ganfit_jax import inputs

    frames = [f for _, f in inputs.read_video_frames(tmp_path / "v" / "turntable.mp4")]
    assert len(frames) == 4 and frames[0].shape == (48, 48, 3)
    for k, yaw in enumerate(("+0000.0", "+0090.0", "+0180.0", "+0270.0")):
        view = np.asarray(Image.open(tmp_path / "v" / f"yaw{yaw}.png"), np.float64) / 255
        others = [np.abs(frames[j] - view).mean() for j in range(4)]
        assert int(np.argmin(others)) == k and others[k] < 0.03, (yaw, others)
    # --shape_only: the grey shading of the same view's normals, the background elsewhere
    from ganfit_jax import render

    result = _run(["--model", model, "--params", str(params), "--output_dir",
                   str(tmp_path / "s"), "--image_size", "48", "--shape_only", "--background=0"])
    assert result.returncode == 0, result.stderr[-2000:]
    grey = np.asarray(Image.open(tmp_path / "s" / "yaw+0000.0.png"), np.float64) / 255
    np.testing.assert_array_equal(grey[~covered], 0.0)
    expected = np.asarray(render.shape_shading(normals[covered]))
    np.testing.assert_allclose(grey[covered], np.repeat(expected[:, None], 3, 1), atol=0.6 / 255)
    # --antialias: the same grey view with its outline blended into the background by coverage
    result = _run(["--model", model, "--params", str(params), "--output_dir",
                   str(tmp_path / "a"), "--image_size", "48", "--shape_only", "--background=0",
                   "--antialias", "--save_mask"])
    assert result.returncode == 0, result.stderr[-2000:]
    smooth = np.asarray(Image.open(tmp_path / "a" / "yaw+0000.0.png"), np.float64) / 255
    coverage = np.load(tmp_path / "a" / "yaw+0000.0_mask.npy")
    partial = (coverage > 0.02) & (coverage < 0.98)
    assert partial.sum() > 20 and coverage.min() >= 0 and coverage.max() <= 1 + 1e-6
    # whole pixels keep their hard value (grey inside, background out); the outline's are in
    # between, a fraction of a neighbour's grey
    whole = (coverage == 0) | (coverage == 1)
    assert np.mean(np.abs(smooth - grey).max(-1)[whole] < 1 / 255) > 0.98
    assert np.all(smooth[coverage == 0] == 0) and smooth[partial].max() <= grey.max() + 1 / 255
    result = _run(["--model", model, "--output_dir", str(tmp_path / "w"), "--turntable_video"])
    assert result.returncode == 1 and "--turntable_video needs --turntable" in result.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, shape=np.zeros(5))
    result = _run(["--model", model, "--params", str(bad), "--output_dir", str(tmp_path / "b")])
    assert result.returncode != 0 and "shape must be (63,)" in result.stderr


def test_render_a_sequence_is_each_frames_expression_and_pose(sfm_dir, tmp_path):
    """render --sequence: frame k of sequence.mp4 (and frame_NNNNNN.png) is --params' face with
    frame k's expression, seen by frame k's camera (its focal scaled from the fit's 64 px to
    48), as `render --params` of a file holding that expression and camera renders it;
    --nosequence_pose keeps one camera; a sequence without its working size is refused."""
    from PIL import Image

    from ganfit_jax import camera, inputs

    model = str(sfm_dir / "sfm_shape_3448.bin")
    rng = np.random.default_rng(0)
    frames = np.array([3, 4, 5])
    cameras = np.array([[x, 0, 1000, 0, 10, 0, camera.default_focal((64, 64)), 0]
                        for x in (-150.0, 0.0, 150.0)], np.float32)
    expressions = rng.normal(size=(3, 6)).astype(np.float32)
    light = np.array([0, 300, 1000, 0.7, 0.7, 0.7, 0.4, 0.4, 0.4], np.float32)
    np.savez(tmp_path / "sequence.npz", frame=frames, expression=expressions, camera=cameras,
             light=np.tile(light, (3, 1)), shape=np.zeros(63, np.float32),
             texture=np.zeros(4, np.float32), image_size=np.array([64, 64]))
    person = tmp_path / "person.npz"
    np.savez(person, shape=np.full(63, 0.5, np.float32), light=light)
    out = tmp_path / "out"
    base = ["--model", model, "--params", str(person), "--image_size", "48"]
    result = _run(base + ["--sequence", str(tmp_path / "sequence.npz"), "--output_dir",
                          str(out), "--save_frames", "--fps=5"])
    assert result.returncode == 0, result.stderr[-2000:]
    video = inputs.read_video_frames(out / "sequence.mp4")
    assert len(video) == 3 and inputs.video_frame_rate(out / "sequence.mp4") == pytest.approx(5)
    for k, n in enumerate(frames):
        single = tmp_path / f"single{k}.npz"
        np.savez(single, shape=np.full(63, 0.5, np.float32), light=light,
                 expression=expressions[k], camera=cameras[k], image_size=np.array([64, 64]))
        result = _run(["--model", model, "--params", str(single), "--image_size", "48",
                       "--output_dir", str(tmp_path / f"v{k}")])
        assert result.returncode == 0, result.stderr[-2000:]
        expected = np.asarray(Image.open(tmp_path / f"v{k}" / "yaw+0000.0.png"))
        frame = np.asarray(Image.open(out / f"frame_{n:06d}.png"))
        np.testing.assert_array_equal(frame, expected)
        assert np.abs(video[k][1] - frame / 255.0).mean() < 0.02  # H.264's loss
    assert np.abs(video[0][1] - video[2][1]).mean() > 0.02  # the head turned
    # --nosequence_pose: one camera; the same expression every frame gives the same image
    still = tmp_path / "still.npz"
    np.savez(still, frame=frames, expression=np.zeros((3, 6), np.float32), camera=cameras,
             light=np.tile(light, (3, 1)), shape=np.zeros(63, np.float32),
             image_size=np.array([64, 64]))
    result = _run(base + ["--sequence", str(still), "--output_dir", str(tmp_path / "still"),
                          "--save_frames", "--nosequence_pose"])
    assert result.returncode == 0, result.stderr[-2000:]
    first = np.asarray(Image.open(tmp_path / "still" / "frame_000003.png"))
    for n in (4, 5):
        np.testing.assert_array_equal(np.asarray(Image.open(
            tmp_path / "still" / f"frame_{n:06d}.png")), first)
    old = tmp_path / "old.npz"
    np.savez(old, frame=frames, expression=expressions, camera=cameras,
             light=np.tile(light, (3, 1)), shape=np.zeros(63, np.float32))
    result = _run(base + ["--sequence", str(old), "--output_dir", str(tmp_path / "old")])
    assert result.returncode == 1 and "old.npz: lacks ['image_size']" in result.stderr
    assert "Traceback" not in result.stderr
