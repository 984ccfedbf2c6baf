"""Batch and multi-frame fitting sharded over (forced) host devices equal the unsharded fits."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    from test_fitting import SIZE, random_truth, synthetic_landmarks
    from ganfit_jax import fitting, morphable
    model = morphable.load(sys.argv[1])
    inits, targets = [], []
    for seed in range(4):
        lm = synthetic_landmarks(model, random_truth(model, seed))
        targets.append(fitting.Target(image=jnp.zeros(SIZE + (3,)), landmarks=jnp.asarray(lm)))
        inits.append(fitting.init_params(model, lm, SIZE, 0))
    pipe = fitting.Pipeline(model=model, image_size=SIZE)
    cfg = fitting.FitConfig(stage1_iterations=20, stage2_iterations=0, chunk=20)
    out, _ = fitting.fit(pipe, fitting.stack(inits), fitting.stack(targets), cfg, batched=True,
                         log=None)
    # frames of one person (Eq. 13): the shared shape is a mean across the devices
    frames, _ = fitting.fit(pipe, fitting.stack(inits), fitting.stack(targets), cfg, frames=True,
                            log=None)
    print("DEVICES", jax.device_count(), "SHARDED", fitting.batch_sharding(4) is not None)
    print("SPEC", out.shape.sharding)
    print("FRAMES SPEC", frames.camera.sharding)  # per frame; the shared shape may be replicated
    np.save(sys.argv[2], np.concatenate([np.asarray(a).ravel() for a in (
        out.shape, out.camera, frames.shape, frames.expression, frames.camera)]))
""")


def run(devices, out, sfm_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(  # the suite's own flags kept
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(sfm_dir / "sfm_shape_3448.bin"),
                           str(out)], cwd=root, env=dict(env, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_sharded_equals_unsharded(sfm_dir, tmp_path):
    log4 = run(4, tmp_path / "four.npy", sfm_dir, tmp_path)
    log1 = run(1, tmp_path / "one.npy", sfm_dir, tmp_path)
    assert "DEVICES 4 SHARDED True" in log4 and "DEVICES 1 SHARDED False" in log1
    # the fitted batch comes back split over the 4 devices, not gathered onto one
    assert "Mesh('batch': 4" in log4 and "spec=P('batch',)" in log4, log4
    frames_spec = log4.split("FRAMES SPEC")[1]
    assert "Mesh('batch': 4" in frames_spec and "spec=P('batch',)" in frames_spec, log4
    np.testing.assert_allclose(np.load(tmp_path / "four.npy"), np.load(tmp_path / "one.npy"),
                               rtol=1e-4, atol=1e-4)
