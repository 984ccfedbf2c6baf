"""`experiments/fit.py --images --distributed`: two processes (jax.distributed, on the CPU) split
a folder of photos, each fitting its share sharded over its own two devices; every photo is
fitted once, and as a single process on one device fits the same photos."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np

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
             (["--images=x", "--num_processes=2"], "--num_processes goes with --distributed"),
             (["--images=x", "--distributed", "--num_processes=2", "--process_id=2"],
              "--process_id=2 must be below --num_processes=2")]
    for args, expect in cases:
        code, _, stderr = run_fit(*args, f"--output_dir={tmp_path / 'out'}")
        lines = [l for l in stderr.splitlines() if l.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expect in lines[0], stderr[-2000:]
        assert not (tmp_path / "out").exists()
