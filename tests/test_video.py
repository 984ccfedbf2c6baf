"""Video input: frames decoded with PyAV, and `fit --frames=VIDEO` fitting one person jointly.

The reference is the frames the test itself encodes: decoding must give them back (up to the
codec's loss), in order, with the requested step and count."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from ganfit_jax import camera, inputs

av = pytest.importorskip("av", reason="PyAV (requirements.txt) reads video files")

SHIFT = 6  # pixels the face moves right per frame


def encode_mpeg4(path, frames, rate=10):
    """Square uint8 frames as an MPEG-4 clip at `rate` frames per second."""
    size = frames[0].shape[0]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        stream.options = {"qscale": "2"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path, photo, num_frames, size=256):
    """An MPEG-4 clip of `photo` moving right by SHIFT pixels per frame; returns the frames."""
    from PIL import Image

    image = np.asarray(Image.open(photo).convert("RGB").resize((size, size)))
    frames = [np.roll(image, SHIFT * i, axis=1).copy() for i in range(num_frames)]
    encode_mpeg4(path, frames)
    return frames


@pytest.fixture
def clip(faces_dir, tmp_path):
    path = tmp_path / "clip.mp4"
    return path, write_video(path, faces_dir / "ffhq" / "FFHQ" / "00001.png", 6)


def test_frames_come_back_in_order_with_step_and_count(clip):
    path, written = clip
    frames = inputs.read_video_frames(path)
    assert [i for i, _ in frames] == list(range(6))
    for k, (_, got) in enumerate(frames):
        assert got.dtype == np.float32 and got.shape == written[k].shape
        # each decoded frame is nearest to the frame written at its index (not a neighbour)
        errors = [np.abs(got * 255 - w).mean() for w in written]
        assert int(np.argmin(errors)) == k and errors[k] < 8, errors
    assert [i for i, _ in inputs.read_video_frames(path, step=2)] == [0, 2, 4]
    assert [i for i, _ in inputs.read_video_frames(path, step=2, max_frames=2)] == [0, 2]
    assert inputs.video_frame_count(path) == 6  # the header's count, for --track's ETA


def write_stored(path, frames, rotation=0, hflip=False, vflip=False):
    """A clip of `frames` exactly as stored, with a display matrix: rotate `rotation` degrees
    counter-clockwise, then mirror (PyAV's `set_display_rotation`, what phones write)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv420p", {"qscale": "2"}
        if rotation or hflip or vflip:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def quadrants(height=48, width=80):
    """Four flat colours, one a quadrant: each of the eight quarter turns and mirrors of a
    non-square frame gives another picture, and flat blocks survive the codec."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w], image[:h, w:] = (230, 30, 30), (30, 230, 30)
    image[h:, :w], image[h:, w:] = (30, 30, 230), (230, 230, 230)
    return image


@pytest.mark.parametrize("rotation,hflip,vflip", [(0, False, False), (90, False, False),
                                                  (180, False, False), (-90, False, False),
                                                  (0, True, False), (0, False, True),
                                                  (90, True, False), (90, False, True)])
def test_a_clip_is_decoded_as_a_player_shows_it(tmp_path, rotation, hflip, vflip):
    stored = quadrants()
    path = tmp_path / "phone.mp4"
    write_stored(path, [stored], rotation, hflip, vflip)
    shown = np.rot90(stored, rotation // 90)
    shown = shown[:, ::-1] if hflip else shown
    shown = shown[::-1] if vflip else shown
    (_, got), = inputs.read_video_frames(path)
    assert got.shape == shown.shape
    assert np.abs(got * 255 - shown).mean() < 6


def test_a_skewed_display_matrix_is_refused_by_name(tmp_path):
    path = tmp_path / "tilted.mp4"
    write_stored(path, [quadrants()], rotation=30)
    with pytest.raises(ValueError, match="tilted.mp4: its display matrix .* not a quarter turn"):
        inputs.read_video_frames(path)


def test_a_portrait_phone_clip_is_detected_where_the_upright_photo_is(faces_dir, tmp_path,
                                                                        dlib_models):
    """A phone's portrait clip: frames stored turned 90° clockwise, displayed turned back.
    dlib finds no face in the stored frames; the decoded frame has the upright photo's."""
    from PIL import Image

    from ganfit_jax import landmarks

    photo = faces_dir / "ffhq" / "FFHQ" / "00003.png"
    upright = np.asarray(Image.open(photo).convert("RGB").resize((256, 256)))
    path = tmp_path / "portrait.mp4"
    write_stored(path, [np.ascontiguousarray(np.rot90(upright, -1))], rotation=90)
    (_, frame), = inputs.read_video_frames(path)
    reference = landmarks.detect_landmarks(upright)
    err = np.linalg.norm(landmarks.detect_landmarks(frame) - reference, axis=1)
    assert np.median(err) < 0.05 * landmarks.interocular_distance(reference), np.median(err)
    with pytest.raises(ValueError, match="no face"):
        landmarks.detect_landmarks(np.rot90(frame, -1))


def test_not_a_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    assert inputs.is_video(bad) and not inputs.is_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="broken.mp4 is not a video"):
        inputs.read_video_frames(bad)
    with pytest.raises(ValueError, match="step"):
        inputs.read_video_frames(bad, step=0)
    assert inputs.video_frame_count(bad) is None


def test_fit_a_video_shares_shape_and_tracks_every_frame(clip, sfm_dir, tmp_path, run_fit,
                                                          read_glb, dlib_models):
    """Keyframes 0, 2, 4 fitted jointly (Eq. 13), then --track fits frames 1, 3, 5 with that
    shape and texture held, decoded as they go."""
    path, _ = clip
    out = tmp_path / "person"
    code, stdout, stderr = run_fit(
        f"--frames={path}", "--frame_step=2", f"--output_dir={out}", "--track", "--batch_size=3",
        f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny", "--texture=direct",
        "--stage1_iterations=6", "--iterations=2", "--chunk=2", "--image_size=64", "--glb",
        "--transforms")
    assert code == 0, stderr[-2000:]
    assert "3 frame(s)" in stdout and "batch 1: 3 frame(s)" in stdout
    # the tracked frames' progress: of the video header's 6 frames, 3 are not keyframes
    assert re.search(r"wrote 3/3 \(0 skipped\) in \d+s, [\d.]+ frames/s, eta 0s", stdout), stdout
    names = sorted(d.name for d in out.iterdir() if d.is_dir())
    assert names == [f"frame_{i:06d}" for i in range(6)]
    params = [np.load(out / n / "params.npz") for n in names]
    for p in params[1:]:  # Eq. 13: one identity, kept by the tracked frames
        np.testing.assert_array_equal(p["shape"], params[0]["shape"])
        np.testing.assert_array_equal(p["texture"], params[0]["texture"])
    # the face moved right by SHIFT pixels a frame (256-px frames): the fitted nose tip, in
    # photo pixels, follows it through keyframes and tracked frames alike
    nose = [p["landmarks2d"][30, 0] for p in params]
    steps = np.diff(nose)
    assert np.all(np.abs(steps - SHIFT) < 4), nose
    for n in names:
        assert (out / n / "overlay.png").stat().st_size > 0
    assert json.loads((out / "frame_000003" / "metrics.json").read_text())["source"] \
        == f"{path} frame 3"
    # the frames as one time series, in frame order
    sequence = np.load(out / "sequence.npz")
    np.testing.assert_array_equal(sequence["frame"], np.arange(6))
    assert list(sequence["source"]) == [f"{path} frame {i}" for i in range(6)]
    for i, p in enumerate(params):
        np.testing.assert_array_equal(sequence["expression"][i], p["expression"])
        np.testing.assert_array_equal(sequence["landmarks2d"][i], p["landmarks2d"])
        np.testing.assert_array_equal(sequence["camera_matrix"][i], p["camera_matrix"])
    yaw, pitch, roll = (np.degrees(np.asarray(a)) for a in
                        camera.orbit_angles(np.stack([p["camera"] for p in params])))
    np.testing.assert_allclose(sequence["camera_yaw_deg"], yaw, rtol=1e-6)
    np.testing.assert_array_equal(sequence["shape"], params[0]["shape"])
    np.testing.assert_array_equal(sequence["image_size"], params[0]["image_size"])
    assert (out / "sequence.png").read_bytes()[:4] == b"\x89PNG"
    # identity.obj: the shared shape at a neutral expression, with the shared texture
    import trimesh

    from ganfit_jax import morphable

    person = trimesh.load(out / "identity.obj", process=False, force="mesh")
    model = morphable.load(sfm_dir / "sfm_shape_3448.bin")
    neutral = morphable.vertices(model, params[0]["shape"], np.zeros(model.num_expression))
    np.testing.assert_allclose(person.vertices, np.asarray(neutral), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "identity.png")),
                                  np.asarray(Image.open(out / "frame_000000" / "mesh.png")))
    np.testing.assert_allclose(read_glb(out / "identity.glb")["POSITION"],
                               np.asarray(neutral) * 1e-3, rtol=1e-5, atol=1e-8)  # --glb
    # overlay.mp4: every frame's overlay.png in order, at the clip's 10 fps
    assert inputs.video_frame_rate(out / "overlay.mp4") == pytest.approx(10)
    shown = inputs.read_video_frames(out / "overlay.mp4")
    assert len(shown) == 6
    for i, frame in shown:
        overlay = np.asarray(Image.open(out / f"frame_{i:06d}" / "overlay.png"), np.float32) / 255
        assert np.abs(frame - overlay).mean() < 0.02, i  # H.264's loss, not another frame
        if i:
            assert np.abs(frame - shown[i - 1][1]).mean() > 0.03  # the face moved
    # --transforms: nerfstudio's transforms.json, each frame's OpenGL camera-to-world (metres)
    # and intrinsics put the fitted 3D landmarks where params.npz's 2D ones are; its image is
    # the upright frame
    transforms = json.loads((out / "transforms.json").read_text())
    assert transforms["camera_model"] == "OPENCV" and len(transforms["frames"]) == 6
    for i, frame in enumerate(transforms["frames"]):
        p = params[i]
        assert frame["frame"] == i and frame["file_path"] == f"frame_{i:06d}/input.png"
        image = Image.open(out / frame["file_path"])
        assert image.size == (frame["w"], frame["h"]) == (256, 256)
        ok = np.isfinite(p["landmarks3d"]).all(1)
        world = np.concatenate([p["landmarks3d"][ok] / 1000.0, np.ones((ok.sum(), 1))], 1)
        opengl = (np.linalg.inv(np.array(frame["transform_matrix"])) @ world.T).T[:, :3]
        opencv = opengl * [1, -1, -1]
        pixels = np.stack([frame["fl_x"] * opencv[:, 0] / opencv[:, 2] + frame["cx"],
                           frame["fl_y"] * opencv[:, 1] / opencv[:, 2] + frame["cy"]], 1)
        np.testing.assert_allclose(pixels, p["landmarks2d"][ok] - 0.5, atol=0.05)
        np.testing.assert_allclose(frame["expression"], p["expression"], rtol=1e-6)
    # shape.mp4: every frame's shape.png the same way
    shapes = inputs.read_video_frames(out / "shape.mp4")
    assert len(shapes) == 6
    for i, frame in shapes:
        shape = np.asarray(Image.open(out / f"frame_{i:06d}" / "shape.png"), np.float32) / 255
        assert np.abs(frame - shape).mean() < 0.02, i

    # interrupted while tracking: frame 3 stopped while writing (no metrics.json, written
    # last), frame 5 never started. --resume reads the keyframes' shape and texture back, fits
    # only frames 3 and 5, and leaves the finished frames' files as they were
    (out / "frame_000003" / "metrics.json").unlink()
    (out / "frame_000003" / "overlay.png").write_bytes(b"half written")
    shutil.rmtree(out / "frame_000005")
    kept = {(n, f.name): f.read_bytes() for n in ("frame_000000", "frame_000001", "frame_000004")
            for f in (out / n).iterdir()}
    resume = [f"--frames={path}", "--frame_step=2", f"--output_dir={out}", "--track",
              "--batch_size=3", f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny",
              "--texture=direct", "--stage1_iterations=6", "--iterations=2", "--chunk=2",
              "--image_size=64", "--resume"]
    code, stdout, stderr = run_fit(*resume)
    assert code == 0, stderr[-2000:]
    assert "the 3 keyframes are finished" in stdout and "fitted 3 frame(s)" not in stdout, stdout
    assert "--resume: 1 tracked frame(s) already finished" in stdout, stdout
    assert "batch 1: 2 frame(s)" in stdout and f"{path} frame 1:" not in stdout, stdout
    assert {(n, f.name): f.read_bytes() for n in ("frame_000000", "frame_000001", "frame_000004")
            for f in (out / n).iterdir()} == kept
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == names
    for i in (3, 5):
        again = np.load(out / f"frame_{i:06d}" / "params.npz")
        np.testing.assert_array_equal(again["shape"], params[0]["shape"])
        np.testing.assert_array_equal(again["texture"], params[0]["texture"])
        # the same tracking as the first run's (another batch composition, so not bit for bit)
        assert abs(again["landmarks2d"][30, 0] - nose[i]) < 1.5, (i, nose)
        assert (out / f"frame_{i:06d}" / "overlay.png").read_bytes()[:4] == b"\x89PNG"
    sequence = np.load(out / "sequence.npz")  # written again, with the refitted frames
    np.testing.assert_array_equal(sequence["frame"], np.arange(6))
    np.testing.assert_array_equal(sequence["expression"][3],
                                  np.load(out / "frame_000003" / "params.npz")["expression"])

    # a finished frame from another run (another shape) is refused before anything is fitted
    other = dict(np.load(out / "frame_000003" / "params.npz"))
    other["shape"] = other["shape"] + 0.5
    np.savez(out / "frame_000003" / "params.npz", **other)
    (out / "frame_000005" / "metrics.json").unlink()
    code, stdout, stderr = run_fit(*resume)
    assert code == 1 and "Traceback" not in stderr, stderr[-2000:]
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "frame_000003" in lines[0] and "another run" in lines[0], stderr
    assert "batch 1" not in stdout and not (out / "frame_000005" / "metrics.json").exists()


def test_track_a_folder_of_frames_and_resume_with_a_keyframe_unfinished(clip, sfm_dir, tmp_path,
                                                                       run_fit, faces_dir,
                                                                       dlib_models):
    """--frames=DIR --track: the keyframes picked from the sorted folder as from a video; one
    without a face is reported and left out, and a larger face beside the person's is not
    taken for theirs. A run interrupted before every keyframe was written fits the keyframes
    again (Eq. 13 fits them together) and tracks every other frame again, with the new shape
    and texture."""
    from PIL import Image

    _, written = clip
    frames = tmp_path / "frames"
    frames.mkdir()
    stranger = np.asarray(Image.open(faces_dir / "ffhq" / "FFHQ" / "00003.png").convert("RGB")
                          .resize((360, 360)))  # dlib's box: 186 px against their 155
    for i, frame in enumerate(written):
        canvas = np.full((360, 616, 3), 90, np.uint8)
        canvas[52:308, :256] = frame
        if i in (3, 4):  # a larger face beside theirs, in a tracked frame and a keyframe
            canvas[:, 256:] = stranger
        Image.fromarray(canvas).save(frames / f"f{i:02d}.png")
    # the 4th keyframe (--frame_step=2): the head turned away, say
    Image.fromarray(np.full_like(written[0], 128)).save(frames / "f06.png")
    out = tmp_path / "person"
    args = [f"--frames={frames}", "--frame_step=2", f"--output_dir={out}", "--track",
            "--batch_size=3", f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny",
            "--texture=direct", "--stage1_iterations=6", "--iterations=2", "--chunk=2",
            "--image_size=64", "--track_stage1_iterations=5", "--track_iterations=4"]
    code, stdout, stderr = run_fit(*args)
    assert code == 0, stderr[-2000:]
    assert "fitted 3 frame(s)" in stdout and "batch 1: 3 frame(s)" in stdout, stdout
    assert "skipped " in stdout and "f06.png: no face found" in stdout, stdout
    assert "wrote 3/3 (0 skipped)" in stdout, stdout  # the 3 tracked frames of the folder
    # the keyframes' schedule, then the tracked frames' own
    keyed, tracked = stdout.split("batch 1: 3 frame(s)")
    assert "stage 1 iter 6/6" in keyed and "stage 2 iter 2/2" in keyed, keyed
    # 5 steps in chunks of 2: exactly 5, the last chunk a single step
    assert "stage 1 iter 4/5" in tracked and "stage 1 iter 5/5" in tracked, tracked
    assert "stage 2 iter 4/4" in tracked, tracked
    assert "iter 6/6" not in tracked and "iter 2/2" not in tracked, tracked
    names = [f"f{i:02d}" for i in range(6)]
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == names
    first = {n: dict(np.load(out / n / "params.npz")) for n in names}
    for n in names[1:]:
        np.testing.assert_array_equal(first[n]["shape"], first["f00"]["shape"])
    nose = [first[n]["landmarks2d"][30, 0] for n in names]
    assert np.all(np.abs(np.diff(nose) - SHIFT) < 4), nose
    sequence = np.load(out / "sequence.npz")  # keyframes and tracked frames in folder order
    assert [os.path.basename(str(s)) for s in sequence["source"]] == [f"{n}.png" for n in names]
    np.testing.assert_array_equal(sequence["camera"], np.stack([first[n]["camera"]
                                                                for n in names]))

    (out / "f02" / "metrics.json").unlink()  # interrupted while writing the keyframes
    code, stdout, stderr = run_fit(*args, "--resume")
    assert code == 0, stderr[-2000:]
    assert "--resume: 2 of 3 keyframe(s) finished" in stdout, stdout  # the 3 with a face
    assert "fitted 3 frame(s)" in stdout and "batch 1: 3 frame(s)" in stdout, stdout
    # every frame written again, the same fit as the first run's. (This failed in 2 of 4 CI runs
    # while the loader's two threads shared one dlib detector: a tracked frame got other
    # landmarks; test_landmarks checks threaded detection.)
    for n in names:
        assert (out / n / "metrics.json").exists()
        again = np.load(out / n / "params.npz")
        np.testing.assert_array_equal(again["shape"], first["f00"]["shape"])
        np.testing.assert_allclose(again["camera"], first[n]["camera"], rtol=1e-4, atol=1e-3,
                                   err_msg=n)


def test_a_cut_does_not_hand_the_persons_place_to_a_stranger(faces_dir, sfm_dir, tmp_path,
                                                              run_fit, dlib_models):
    """After a cut the person (FFHQ 00003) is on the right and a stranger (00000, a lookalike
    child: dlib descriptor distance 0.49) stands where they were. The keyframe after the cut
    (f02, the face nearest the previous keyframe's) and the tracked frame between (f01, the
    face nearest its nearest keyframe, f00) both keep to the person: by place alone both would
    be the stranger."""
    from PIL import Image

    load = lambda n: np.asarray(Image.open(faces_dir / "ffhq" / "FFHQ" / n).convert("RGB"))
    person, stranger = load("00003.png"), load("00000.png")
    grey = np.full_like(person, 100)
    frames = tmp_path / "frames"
    frames.mkdir()
    for name, (left, right) in {"f00": (person, grey), "f01": (stranger, person),
                                "f02": (stranger, person)}.items():
        Image.fromarray(np.concatenate([left, right], axis=1)).save(frames / f"{name}.png")
    out = tmp_path / "out"
    code, stdout, stderr = run_fit(
        f"--frames={frames}", "--frame_step=2", f"--output_dir={out}", "--track",
        f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny", "--texture=direct",
        "--stage1_iterations=4", "--iterations=2", "--chunk=2", "--image_size=64")
    assert code == 0, stderr[-2000:]
    nose_x = {n: float(np.load(out / n / "params.npz")["landmarks2d"][30, 0])
              for n in ("f00", "f01", "f02")}
    assert nose_x["f00"] < 256 and nose_x["f01"] > 256 and nose_x["f02"] > 256, nose_x


def test_frames_without_any_face_are_one_line(tmp_path, sfm_dir, run_fit, dlib_models):
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.fromarray(np.full((96, 96, 3), 100 + 50 * i, np.uint8)).save(frames / f"{i}.png")
    code, stdout, stderr = run_fit(f"--frames={frames}", f"--output_dir={tmp_path / 'o'}",
                                   f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=none")
    assert code == 1 and "Traceback" not in stderr
    assert stdout.count("skipped ") == 2 and "1.png: no face found" in stdout, stdout
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "none of the 2 frame(s)" in lines[0], stderr[-1000:]
    assert not (tmp_path / "o").exists()


def test_a_tracked_frame_looks_for_the_person_where_the_nearest_keyframe_saw_them():
    from experiments import common

    faces = np.array([[0, 100.0, 50.0], [10, 300.0, 60.0], [20, 500.0, 70.0]])
    assert common.nearest_keyframe_face(faces, 3) == (100.0, 50.0)
    assert common.nearest_keyframe_face(faces, 7) == (300.0, 60.0)
    assert common.nearest_keyframe_face(faces, 5) == (100.0, 50.0)  # a tie: the earlier
    assert common.nearest_keyframe_face(faces, 99) == (500.0, 70.0)
    assert common.nearest_keyframe_face(faces[1:], 0) == (300.0, 60.0)


def test_fit_an_unreadable_video_is_one_line(tmp_path, sfm_dir, run_fit):
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    code, _, stderr = run_fit(f"--frames={bad}", f"--output_dir={tmp_path / 'o'}",
                              f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny")
    assert code == 1 and "Traceback" not in stderr
    lines = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "broken.mp4 is not a video" in lines[0], stderr[-1000:]
    assert not (tmp_path / "o").exists()


def test_tracked_frames_are_the_others_and_a_bad_video_is_a_value_error(clip, tmp_path):
    from experiments import common  # no absl flags: safe to import in the test process

    path, written = clip
    jobs = list(common.video_frame_jobs(str(path), "out", {0, 2, 4}))
    assert [folder for _, folder in jobs] == [os.path.join("out", f"frame_{i:06d}")
                                              for i in (1, 3, 5)]
    (name, frame), _ = jobs[1]
    assert name == f"{path} frame 3" and np.abs(frame * 255 - written[3]).mean() < 8
    assert common.video_frame_number(name) == 3
    bad = tmp_path / "broken.mp4"
    bad.write_text("not a video")
    with pytest.raises(ValueError, match="broken.mp4 is not a video"):
        list(common.video_frame_jobs(str(bad), "out", set()))


SPREAD = {"00001.png": "+5° yaw", "00003.png": "frontal", "00004.png": "+5°",
          "00006.png": "+31°", "00002.png": "-7°", "00000.png": "-24°"}


@pytest.mark.parametrize("source", ["video", "folder"])
def test_spread_keyframes_are_the_poses_farthest_apart(source, faces_dir, sfm_dir, tmp_path,
                                                        run_fit, dlib_models):
    """--keyframes=spread --max_frames=3 over six frames, the first three nearly frontal: the
    most frontal (00003), then the poses farthest from it and each other (00006, turned +31°,
    and 00000, −24°) are fitted together, where the uniform pick takes the first three."""
    from PIL import Image

    names = list(SPREAD)
    frames = [np.asarray(Image.open(faces_dir / "ffhq" / "FFHQ" / n).convert("RGB"))
              for n in names]
    if source == "video":
        path = tmp_path / "clip.mp4"
        encode_mpeg4(path, frames)
        expected = ["frame_000001", "frame_000003", "frame_000005"]
    else:
        path = tmp_path / "frames"
        path.mkdir()
        for i, (frame, name) in enumerate(zip(frames, names)):
            Image.fromarray(frame).save(path / f"f{i:02d}.png")
            if i % 2:  # landmark files beside some frames: spread reads them as fit does
                shutil.copy(faces_dir / "ffhq" / "FFHQ" / name.replace(".png", ".npy"),
                            path / f"f{i:02d}.npy")
        expected = ["f01", "f03", "f05"]
    out = tmp_path / "out"
    code, stdout, stderr = run_fit(
        f"--frames={path}", "--keyframes=spread", "--max_frames=3", f"--output_dir={out}",
        f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny", "--texture=direct",
        "--stage1_iterations=4", "--iterations=2", "--chunk=2", "--image_size=64")
    assert code == 0, stderr[-2000:]
    files = ", 3 from landmark files" if source == "folder" else ""
    assert f"--keyframes=spread: 3 of 6 frames with the person{files} (" in stdout, stdout[-2000:]
    fitted = sorted(d.name for d in out.iterdir() if (d / "metrics.json").exists())
    assert fitted == expected, (fitted, stdout[-2000:])
    shape = [np.load(out / n / "params.npz")["shape"] for n in expected]
    np.testing.assert_array_equal(shape[0], shape[2])  # fitted together (Eq. 13)
