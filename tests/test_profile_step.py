"""experiments/profile_step.py and its library profile_ops: self times from a trace's nesting,
the device's tracks when there are any, and the binary on the CPU end to end."""

import json
import os
import subprocess
import sys

import pytest

from experiments import profile_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(name, ts, dur, pid=1, tid=1):
    return dict(ph="X", name=name, ts=ts, dur=dur, pid=pid, tid=tid)


def test_op_times_are_self_times_without_the_runtime_wrappers():
    events = [_x("ThunkExecutor::Execute", 0, 100), _x("while.1", 10, 50),
              _x("fusion.a", 20, 10), _x("fusion.b", 35, 20), _x("dot.2", 70, 20),
              _x("fusion.a", 0, 5, tid=2), _x("$api.py:1 block_until_ready", 0, 200, tid=3)]
    times = profile_ops.op_times(events)
    assert times == {"while.1": (20.0, 1), "fusion.a": (15.0, 2), "fusion.b": (20.0, 1),
                     "dot.2": (20.0, 1)}
    ops, kinds = profile_ops.summarise(times, steps=5)
    assert [op["name"] for op in ops][0] in ("while.1", "fusion.b", "dot.2")
    assert ops[-1] == dict(name="fusion.a", ms_per_step=0.003, calls_per_step=0.4, share=0.2,
                           kind="other")
    assert kinds == {"other": 0.011, "matmul": 0.004}


def test_op_times_keep_only_the_device_tracks_when_there_are_any():
    events = [dict(ph="M", name="process_name", pid=7, args=dict(name="/device:GPU:0")),
              dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
              _x("ampere_sgemm", 0, 30, pid=7), _x("fusion.3", 40, 10, pid=7, tid=2),
              _x("PjitFunction(step)", 0, 100), _x("host_only", 10, 5)]
    assert profile_ops.op_times(events) == {"ampere_sgemm": (30.0, 1), "fusion.3": (10.0, 1)}
    assert profile_ops.op_kind("sm90_xmma_fprop_implicit_gemm") == "convolution"
    assert profile_ops.op_kind("scatter_add_fusion") == "gather/scatter"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.profile_step", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_profile_step_binary_on_the_tiny_configuration(tmp_path, sfm_dir):
    proc = _run("--config=tiny", "--steps=1", f"--output_dir={tmp_path}",
                f"--model={sfm_dir / 'sfm_shape_3448.bin'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ops.json").read_text())
    assert result["config"] == "tiny" and result["backend"] == "cpu" and result["step_ms"] > 0
    names = [op["name"] for op in result["ops"]]
    # the step's convolutions (tiny identity net, GAN) and its dots are among the ops
    assert result["kinds"].get("convolution", 0) > 0 and result["kinds"].get("matmul", 0) > 0
    assert not any(profile_ops._WRAPPERS.search(n) for n in names)
    assert sum(op["share"] for op in result["ops"]) == pytest.approx(1.0, abs=0.01)
    assert "ms per step under the profiler" in proc.stdout
    # a second run does not replace the first's results unless asked
    again = _run("--config=tiny", "--steps=1", f"--output_dir={tmp_path}",
                 f"--model={sfm_dir / 'sfm_shape_3448.bin'}")
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert json.loads((tmp_path / "ops.json").read_text()) == result


def test_profile_step_names_a_missing_model(tmp_path):
    proc = _run("--config=tiny", f"--output_dir={tmp_path}", "--model=/nonexistent/sfm.bin")
    assert proc.returncode != 0
    assert "--model: /nonexistent/sfm.bin does not exist" in proc.stderr
    assert not (tmp_path / "ops.json").exists()
