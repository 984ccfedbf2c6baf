"""`benchmark load`: the loader's photos/s, per thread count and detection size."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def dlib_available(dlib_models):
    pass


def test_rows_count_every_photo_and_the_faceless_one_as_failed(faces_dir, dlib_available,
                                                               tmp_path):
    from PIL import Image

    from experiments import benchmark_load

    for name in ("00000.png", "00003.png"):
        shutil.copy(faces_dir / "ffhq" / "FFHQ" / name, tmp_path / name)
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "blank.png")
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    rows = benchmark_load.bench_load(paths, [1, 2], ["reduced", "full"], size=64)
    assert [(r["detection"], r["threads"]) for r in rows] == [
        ("reduced", 1), ("reduced", 2), ("full", 1), ("full", 2)]
    for row in rows:
        assert row["photos"] == 3 and row["failed"] == 1
        # seconds kept to the millisecond: tiny runs take ~0.1 s
        assert row["photos_per_second"] == pytest.approx(3 / row["seconds"], rel=0.02)
    assert all("speedup_vs_full" in r for r in rows[:2])
    with pytest.raises(ValueError, match="--detection: unknown"):
        benchmark_load.bench_load(paths, [1], ["half"])


def test_the_binary_prints_json_rows_and_refuses_a_bad_thread_count(faces_dir, dlib_available,
                                                                   tmp_path):
    shutil.copy(faces_dir / "ffhq" / "FFHQ" / "00000.png", tmp_path / "a.png")
    run = lambda *flags: subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "load", f"--photos={tmp_path}", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    done = run("--threads=2", "--detection=reduced", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert row["threads"] == 2 and row["photos"] == 1 and row["failed"] == 0
    bad = run("--threads=0")
    assert bad.returncode != 0 and "--threads" in bad.stdout + bad.stderr
