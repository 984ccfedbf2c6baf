"""`experiments/fit.py --distributed`: two processes (jax.distributed, on the CPU) split a folder
of photos, each fitting its share sharded over its own two devices; every photo is fitted once,
and as a single process on one device fits the same photos. With `--frames --track`, process 0
fits a video's keyframes and the other gets their shape and texture through JAX's coordinator."""

import csv
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_fit_binary import TINY

PHOTOS = ("00003", "00004", "00005", "00006")


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_fit(args, devices, home):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    xla_flags = (f"{os.environ.get('XLA_FLAGS', '')} "
                 f"--xla_force_host_platform_device_count={devices}").strip()
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.fit", *args], cwd=root, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, XDG_CACHE_HOME=str(home)))


def finish(proc):
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def copy_photos(faces_dir, folder, names):
    folder.mkdir()
    for name in names:
        for ext in (".png", ".npy"):  # landmarks beside each photo: no dlib detection
            shutil.copy(faces_dir / "ffhq" / "FFHQ" / (name + ext), folder / (name + ext))


def test_processes_split_the_folder_and_fit_as_one_process(faces_dir, sfm_dir, tmp_path):
    copy_photos(faces_dir, tmp_path / "all", PHOTOS)
    copy_photos(faces_dir, tmp_path / "first_share", PHOTOS[0::2])  # process 0's photos
    common = [f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY, "--batch_size=2"]
    port = free_port()
    processes = [start_fit([f"--images={tmp_path / 'all'}", f"--output_dir={tmp_path / 'out'}",
                            "--distributed", f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}", *common],
                           devices=2, home=tmp_path / "xdg")
                 for i in range(2)]
    single = start_fit([f"--images={tmp_path / 'first_share'}",
                        f"--output_dir={tmp_path / 'single'}", *common],
                       devices=1, home=tmp_path / "xdg")
    logs = [finish(p) for p in processes]
    finish(single)
    for i, log in enumerate(logs):
        assert f"process {i} of 2: 2 photo(s)" in log, log[-2000:]
        mine = PHOTOS[i::2]
        for name in PHOTOS:  # photo i, i+2 of the sorted folder, and no other, on process i
            assert (f"{name}.png: landmark error" in log) == (name in mine), (name, log[-2000:])
        # each process's table of its own share
        with open(tmp_path / "out" / f"summary_process{i}_of_2.csv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [os.path.basename(os.path.normpath(r["folder"])) for r in rows] == list(mine)
    for name in PHOTOS:
        assert (tmp_path / "out" / name / "params.npz").exists(), name
    # process 0 (its batch sharded over two devices, stage 2 vmapped) against one process on
    # one device (stage 2 photo after photo): the same fit
    for name in PHOTOS[0::2]:
        got = np.load(tmp_path / "out" / name / "params.npz")
        want = np.load(tmp_path / "single" / name / "params.npz")
        for key in ("shape", "expression", "camera", "light", "texture", "vertices"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-3, err_msg=key)


def test_distributed_flags_are_checked(tmp_path, run_fit):
    cases = [(["--image=x.png", "--distributed"], "--distributed splits an --images folder"),
             (["--frames=x", "--distributed"], "--frames without --track fit on one process"),
             (["--images=x", "--num_processes=2"], "--num_processes goes with --distributed"),
             (["--images=x", "--distributed", "--num_processes=2", "--process_id=2"],
              "--process_id=2 must be below --num_processes=2")]
    for args, expect in cases:
        code, _, stderr = run_fit(*args, f"--output_dir={tmp_path / 'out'}")
        lines = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expect in lines[0], stderr[-2000:]
        assert not (tmp_path / "out").exists()


def test_processes_track_a_video_with_process_zeros_keyframes(faces_dir, sfm_dir, tmp_path,
                                                              dlib_models):
    """Keyframes 0, 2, 4 fitted by process 0 alone; the tracked frames 1, 3, 5 split (1 and 5
    on process 0, 3 on process 1), all with the keyframes' shape and texture to the bit; process
    0 writes the whole sequence after process 1 is done."""
    av = pytest.importorskip("av", reason="PyAV (requirements.txt) reads video files")
    from test_video import SHIFT, write_video

    assert av
    clip = tmp_path / "clip.mp4"
    write_video(clip, faces_dir / "ffhq" / "FFHQ" / "00001.png", 6)
    out = tmp_path / "out"
    port = free_port()
    processes = [start_fit([f"--frames={clip}", "--frame_step=2", "--track", f"--output_dir={out}",
                            f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny",
                            "--texture=direct", "--stage1_iterations=6", "--iterations=2",
                            "--chunk=2", "--image_size=64", "--batch_size=2", "--distributed",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}"], devices=1, home=tmp_path / "xdg")
                 for i in range(2)]
    logs = [finish(p) for p in processes]
    assert "fitted 3 frame(s)" in logs[0] and "fitted 3 frame(s)" not in logs[1], logs
    assert "waiting for process 0's keyframes' shape and texture" in logs[1], logs[1][-2000:]
    for i, log in enumerate(logs):
        mine = (1, 5) if i == 0 else (3,)
        for frame in (1, 3, 5):
            assert (f"clip.mp4 frame {frame}: landmark" in log) == (frame in mine), (i, frame, log)
        assert f"wrote {len(mine)}/{len(mine)} (0 skipped)" in log, (i, log[-2000:])  # its share
    params = [np.load(out / f"frame_{i:06d}" / "params.npz") for i in range(6)]
    for p in params[1:]:
        np.testing.assert_array_equal(p["shape"], params[0]["shape"])
        np.testing.assert_array_equal(p["texture"], params[0]["texture"])
    nose = [p["landmarks2d"][30, 0] for p in params]
    assert np.all(np.abs(np.diff(nose) - SHIFT) < 4), nose
    sequence = np.load(out / "sequence.npz")
    np.testing.assert_array_equal(sequence["frame"], np.arange(6))
    assert "waiting for the other 1 process(es) to finish" in logs[0]


def test_process_zeros_keyframe_error_ends_the_others_with_it(sfm_dir, tmp_path, dlib_models):
    """No face in the keyframes: process 0 reports it, and process 1, waiting for the keyframes'
    shape and texture, ends with process 0's error instead of waiting for ever."""
    pytest.importorskip("av", reason="PyAV (requirements.txt) reads video files")
    from PIL import Image
    from test_video import write_video

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(grey)
    clip = tmp_path / "grey.mp4"
    write_video(clip, grey, 4)
    port = free_port()
    processes = [start_fit([f"--frames={clip}", "--frame_step=2", "--track",
                            f"--output_dir={tmp_path / 'out'}",
                            f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--identity=tiny",
                            "--texture=direct", "--distributed",
                            f"--coordinator_address=localhost:{port}", "--num_processes=2",
                            f"--process_id={i}"], devices=1, home=tmp_path / "xdg")
                 for i in range(2)]
    for i, proc in enumerate(processes):
        _, stderr = proc.communicate(timeout=600)
        lines = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode == 1 and len(lines) == 1, (i, stderr[-2000:])
        assert "no face found in" in lines[0] and "Traceback" not in stderr, (i, lines)
        assert ("process 0 could not produce" in lines[0]) == (i == 1), (i, lines)
    assert not (tmp_path / "out").exists()
