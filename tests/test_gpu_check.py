"""The GPU check script: its CPU dry run passes and writes the JSON the device run will write."""

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path, sfm_dir):
    script = os.path.join(ROOT, "experiments", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(["bash", script, str(tmp_path), "--dry_run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    fit = [json.loads(l) for l in (tmp_path / "fit.jsonl").read_text().splitlines()]
    render = [json.loads(l) for l in (tmp_path / "render.jsonl").read_text().splitlines()]
    assert fit[0]["config"] == "tiny" and fit[0]["batch_size"] == 2
    for key in ("step_ms", "flops", "images_per_second", "compile_s", "peak_mb"):
        assert key in fit[0], key
    # the device run does not spend its lease on the CPU compilation that counts FLOPs
    assert fit[0]["flops"] is None and fit[0]["step_ms"] > 0
    # the fastest of the timed steps beside their median (a shared machine's uncontended step)
    assert 0 < fit[0]["step_ms_min"] <= fit[0]["step_ms"]
    assert render[0]["case"] == "sfm-224" and render[0]["forward_ms"] > 0
    assert "passed" in (tmp_path / "tests.txt").read_text()
    bf16 = [json.loads(l) for l in (tmp_path / "fit_bf16.jsonl").read_text().splitlines()]
    assert bf16[0]["compute_dtype"] == "bfloat16" and bf16[0]["step_ms"] > 0
    scan = [json.loads(l) for l in (tmp_path / "fit_scan.jsonl").read_text().splitlines()]
    assert scan[0]["loop"] == "scan" and scan[0]["chunk"] == 2 and scan[0]["step_ms"] > 0
    # a video's tracked frames: the same batch with shape and texture held (`fit --track`)
    track = [json.loads(l) for l in (tmp_path / "fit_track.jsonl").read_text().splitlines()]
    assert track[0]["frozen"] == "shape,texture" and scan[0]["frozen"] == ""
    assert track[0]["loop"] == "scan" and track[0]["batch_size"] == 2 and track[0]["step_ms"] > 0
    remat = [json.loads(l) for l in (tmp_path / "fit_remat.jsonl").read_text().splitlines()]
    assert remat[0]["remat"] is True and remat[0]["batch_size"] == 2 and remat[0]["step_ms"] > 0
    # rematerialisation recomputes instead of storing: never more scratch memory than without
    assert remat[0]["peak_mb"] <= fit[0]["peak_mb"] * 1.1
