"""Tracking benchmark: the ground-truth clip, its metrics, a tiny run of every way of fitting."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark_quality as bq
from experiments import benchmark_tracking as bt
from ganfit_jax import camera, morphable

SIZE = 64


@pytest.fixture(scope="module")
def clip(sfm_model):
    return bt.make_sequence(sfm_model, 7, seed=2, image_size=SIZE, max_yaw=20.0,
                            landmark_noise_px=0.0)


def test_the_clip_is_one_person_turning_and_moving_smoothly(sfm_model, clip):
    for f in clip:  # one shape and texture; each frame's mesh is the model's at its coefficients
        np.testing.assert_array_equal(f["shape"], clip[0]["shape"])
        np.testing.assert_array_equal(f["texture"], clip[0]["texture"])
        v = morphable.vertices(sfm_model, jnp.asarray(f["shape"]), jnp.asarray(f["expression"]))
        np.testing.assert_allclose(f["vertices"], np.asarray(v), atol=1e-4)
        assert np.isfinite(f["landmarks_true"]).all()
    yaw = np.rad2deg([float(camera.orbit_angles(f["camera"])[0]) for f in clip])
    np.testing.assert_allclose(yaw, np.linspace(-20, 20, 7), atol=1e-3)  # the head turns
    expressions = np.stack([f["expression"] for f in clip])
    assert np.abs(expressions[-1] - expressions[0]).max() > 0.1  # the face moves ...
    steps = np.abs(np.diff(expressions, axis=0)).max(axis=1)
    assert steps.max() < 1.0  # ... without jumps
    # the same seed, the same clip; the images differ from frame to frame
    again = bt.make_sequence(sfm_model, 7, seed=2, image_size=SIZE, max_yaw=20.0,
                             landmark_noise_px=0.0)
    np.testing.assert_array_equal(again[3]["image"], clip[3]["image"])
    assert np.abs(clip[0]["image"] - clip[-1]["image"]).mean() > 0.01


def test_a_glancing_head_is_frontal_but_for_two_glances_that_spread_keyframes_catch(sfm_model):
    """--pose_path=glance: frontal at the ends and between, −max_yaw at a quarter, +max_yaw at
    70%; keyframes spread by the poses of the frames' noisy landmarks take both glances, where
    every 4th frame (0, 4, 8) catches one."""
    yaw = bt.head_yaw(12, 30.0, "glance")
    assert abs(yaw[0]) < 1 and abs(yaw[-1]) < 1 and abs(yaw[5]) < 3
    assert int(np.argmin(yaw)) == 3 and int(np.argmax(yaw)) == 8 and yaw.min() < -25
    np.testing.assert_allclose(bt.head_yaw(5, 10.0), np.linspace(-10, 10, 5))
    frames = bt.make_sequence(sfm_model, 12, seed=1, image_size=SIZE, max_yaw=30.0,
                              pose_path="glance")
    mean = np.asarray(morphable.landmarks3d(sfm_model, sfm_model.mean))
    poses = np.array([camera.head_pose_from_landmarks(mean, f["landmarks"]) for f in frames])
    # 64 px: the landmarks' 1 px noise is ~2% of the face
    assert np.abs(poses[3, 0] - yaw[3]) < 10 and np.abs(poses[0, 0]) < 10, poses[:, 0]
    picks = camera.spread_views(poses, 3, times=np.arange(12))
    assert 3 in picks and 8 in picks, (picks, poses[:, 0])
    with pytest.raises(ValueError, match="pose_path"):
        bt.head_yaw(5, 10.0, "nod")


def test_expression_path_passes_through_its_draws_and_eases_between_them():
    rng = np.random.default_rng(0)
    path = bt.expression_path(rng, 13, 3, every=6)
    draws = np.random.default_rng(0).normal(0.0, 0.5, (3, 3))  # anchors 0, 6, 12
    np.testing.assert_allclose(path[[0, 6, 12]], draws, rtol=1e-6)
    # smoothstep: a third of the way is 7/27 of the change, not a third
    np.testing.assert_allclose(path[2], draws[0] + (draws[1] - draws[0]) * 7 / 27, rtol=1e-5)
    one = bt.expression_path(np.random.default_rng(1), 1, 2)
    assert one.shape == (1, 2)


def test_jitter_is_zero_for_the_truth_and_measures_extra_motion():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(5, 10, 3))
    assert bt.jitter_mm(true, true) == 0.0
    assert bt.jitter_mm(true + 7.0, true) < 1e-12  # a constant offset does not flicker
    shaky = true.copy()
    shaky[2] += np.array([3.0, 0.0, 4.0])  # one frame off by 5 mm: two of the 4 motions
    assert bt.jitter_mm(shaky, true) == pytest.approx(5.0 * 2 / 4)
    assert np.isnan(bt.jitter_mm(true[:1], true[:1]))


def test_pose_errors_are_the_angles_between_two_orbits():
    a = bq.orbit_camera(np.deg2rad(10.0), np.deg2rad(-5.0), 0.0, 1000.0, [0, 0, 0], SIZE)
    b = bq.orbit_camera(np.deg2rad(-4.0), np.deg2rad(2.0), 0.0, 900.0, [5, 10, 0], SIZE)
    yaw, pitch = bt.pose_errors_deg(jnp.asarray(a), b)
    assert yaw == pytest.approx(14.0, abs=1e-3) and pitch == pytest.approx(7.0, abs=1e-3)


def test_every_way_of_fitting_a_tiny_clip(sfm_model):
    rows = bt.run_tracking(num_frames=4, keyframe_step=2, iterations=2, stage1_iterations=4,
                           track_iterations=2, track_stage1_iterations=4, image_size=SIZE,
                           identity="none", chunk=2, batch_size=2, model=sfm_model, log=None)
    assert [r["method"] for r in rows] == list(bt.METHODS)
    by_name = {r["method"]: r for r in rows}
    for row in rows:
        assert row["frames"] == 4 and len(row["per_frame"]) == 4
        for key in ("error_mm", "identity_mm", "landmark_px", "yaw_deg", "jitter_mm", "fit_s"):
            assert np.isfinite(row[key]), (row["method"], key)
        assert row["speedup"] > 0
    assert by_name["per frame"]["speedup"] == 1.0
    # one shape for the clip: every frame's neutral mesh is the same, so is its error; fitted
    # alone, each frame has its own shape
    for name in ("joint (Eq. 13)", "keyframes + track", "spread keyframes + track"):
        identity = [r["identity_mm"] for r in by_name[name]["per_frame"]]
        np.testing.assert_allclose(identity, identity[0], rtol=1e-6, err_msg=name)
    alone = [r["identity_mm"] for r in by_name["per frame"]["per_frame"]]
    assert np.ptp(alone) > 1e-4, alone
    assert by_name["keyframes + track"]["note"] == "keyframes 0,2 (yaw -30°, +10°)"
    # a sweep's most frontal frame (+10° at 2; or −10° at 1, by noisy landmarks) and the one
    # farthest from it
    assert by_name["spread keyframes + track"]["note"] in (
        "keyframes 0,2 (yaw -30°, +10°)", "keyframes 1,3 (yaw -10°, +30°)")
    image = bt.plot_rows(rows)  # three charts of the per-frame errors, one line per way
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] > image.shape[1]
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 4  # lines in several colours


def test_the_clip_needs_tracked_frames_and_known_fits(sfm_model):
    with pytest.raises(ValueError, match="fits: expected some of per_frame,joint,track"):
        bt.run_tracking(num_frames=4, keyframe_step=2, fits=("track", "kalman"), log=None)
    with pytest.raises(ValueError, match="keyframe_step"):
        bt.run_tracking(num_frames=4, keyframe_step=4, model=sfm_model, log=None)
    with pytest.raises(ValueError, match="num_frames"):
        bt.make_sequence(sfm_model, 1, image_size=SIZE)


def test_batches_are_padded_only_for_a_vmapped_step(sfm_model):
    """`fit`'s batching: a vmapped batch repeats its last frame (one compiled shape); photo
    after photo (FitConfig.batch_steps, `--batch_steps`) a padded frame would cost a whole fit."""
    from ganfit_jax import fitting

    vmapped = fitting.FitConfig(batch_steps="vmap")
    assert bt.batches(5, 2, vmapped) == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    per_photo = fitting.FitConfig(batch_steps="per_photo")
    assert bt.batches(5, 2, per_photo) == [([0, 1], 2), ([2, 3], 2), ([4], 1)]
    with pytest.raises(ValueError, match="batch_steps must be"):
        bt.run_tracking(num_frames=4, keyframe_step=2, image_size=SIZE, identity="none",
                        model=sfm_model, log=None, fits=("per_frame",), batch_steps="loop")


def test_the_binary_refuses_bad_flags_in_one_line_and_keeps_an_existing_output(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = tmp_path / "rows.jsonl"
    existing.write_text("earlier rows\n")
    cases = [(["--num_frames=2"], "num_frames: expected at least 3"),
             (["--num_frames=8", "--keyframe_step=8"], "keyframe_step: expected 2"),
             (["--fits=per_frame,kalman"], "fits: expected some of"),
             ([f"--output={existing}"], f"--output={existing} exists"),
             ([f"--plot={existing}"], f"--plot={existing} exists")]
    for args, expect in cases:
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "tracking", *args],
                              cwd=root, capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 1 and expect in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert existing.read_text() == "earlier rows\n"
