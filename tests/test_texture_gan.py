"""ProGAN texture GAN: architecture pieces against numpy references, fade-in, WGAN-GP against finite
differences, training steps, checkpoints and the training binary (resume, growth, 2 devices)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ganfit_jax import io
from ganfit_jax.texture import progan, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = progan.ProGANConfig.tiny(max_resolution=16, latent_dim=8, width=8)
# jitted applies: op-by-op dispatch of the same networks is far slower on CPU
G = jax.jit(progan.generator_apply, static_argnums=(1, 3))
D = jax.jit(progan.discriminator_apply, static_argnums=(1, 3))


@pytest.fixture(scope="module")
def params():
    return (progan.init_generator(jax.random.key(0), CFG),
            progan.init_discriminator(jax.random.key(1), CFG))


def _synthetic_uv_folder(path, n=8, res=16, seed=0):
    """Smooth coloured 'UV maps' with left-band masks on half of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.uniform(0.2, 0.8, 3)
        img = np.clip(base * (0.6 + 0.4 * np.sin(3 * xx + i))[..., None] + 0.2 * yy[..., None], 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(path / f"face{i}.png")
        if i % 2 == 0:
            m = np.full((res, res), 255, np.uint8)
            m[:, : res // 4] = 0
            Image.fromarray(m).save(path / f"face{i}_mask.png")
    return path


@pytest.fixture(scope="module")
def uv_dir(tmp_path_factory):
    return _synthetic_uv_folder(tmp_path_factory.mktemp("uv"))


# ---------------------------------------------------------------------------------------------
# building blocks vs numpy


def test_config_channel_widths_and_validation():
    paper = progan.ProGANConfig()
    # Karras et al. Table 2: 512 channels up to 32x32, then 256, 128, 64, 32 at 512x512
    assert [paper.num_features(r - 1) for r in range(2, 10)] == [512] * 4 + [256, 128, 64, 32]
    with pytest.raises(ValueError, match="power of two"):
        progan.ProGANConfig(max_resolution=48)
    with pytest.raises(ValueError, match="level"):
        CFG.check_level(5)


def test_pixel_norm_and_minibatch_stddev_match_numpy():
    x = np.random.default_rng(0).normal(size=(6, 4, 4, 5)).astype(np.float32)
    pn = np.asarray(progan.pixel_norm(jnp.asarray(x)))
    np.testing.assert_allclose(np.mean(pn ** 2, axis=-1), 1.0, rtol=1e-5)
    out = np.asarray(progan.minibatch_stddev(jnp.asarray(x), group_size=4))
    # batch 6 -> group size 3 (largest divisor <= 4); sample i is in group i mod 2
    assert out.shape == (6, 4, 4, 6)
    for i in range(6):
        members = x[[j for j in range(6) if j % 2 == i % 2]]
        expect = np.mean(np.sqrt(np.var(members, axis=0) + 1e-8))
        np.testing.assert_allclose(out[i, ..., -1], expect, rtol=1e-5)
    np.testing.assert_array_equal(out[..., :5], x)


def test_equalized_conv_scales_weights_by_he_constant():
    layer = progan.EqualizedConv(4, kernel_size=3)
    x = np.random.default_rng(1).normal(size=(1, 5, 5, 2)).astype(np.float32)
    p = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
    w = np.asarray(p["kernel"]) * math.sqrt(2.0) / math.sqrt(3 * 3 * 2)
    pad = np.pad(x[0], ((1, 1), (1, 1), (0, 0)))
    ref = np.zeros((5, 5, 4), np.float32)
    for i in range(5):
        for j in range(5):
            ref[i, j] = np.einsum("abc,abcd->d", pad[i:i + 3, j:j + 3], w)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": p}, jnp.asarray(x)))[0], ref,
                               rtol=1e-4, atol=1e-5)
    assert abs(float(np.std(np.asarray(p["kernel"]))) - 1.0) < 0.3  # stored N(0, 1)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 4, 3, 5), (1, 6, 6, 2)])
def test_upsample_conv_equals_conv_of_the_upsampled_input(shape):
    """The generator's fused upsample-conv against numpy (repeat, zero-pad, 3x3 windows), and
    its gradients against XLA's convolution of the upsampled input."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(3, 3, shape[-1], 4)).astype(np.float32)
    up = np.pad(x.repeat(2, 1).repeat(2, 2), ((0, 0), (1, 1), (1, 1), (0, 0)))
    n, h, wd = shape[0], 2 * shape[1], 2 * shape[2]
    ref = np.zeros((n, h, wd, 4), np.float32)
    for i in range(h):
        for j in range(wd):
            ref[:, i, j] = np.einsum("nabc,abcd->nd", up[:, i:i + 3, j:j + 3], w)
    out = progan.upsample2x_conv3x3(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)

    def unfused(x, w):
        return jax.lax.conv_general_dilated(progan.upsample2x(x), w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    cot = jnp.asarray(rng.normal(size=ref.shape).astype(np.float32))
    grads = jax.grad(lambda x, w: jnp.sum(cot * progan.upsample2x_conv3x3(x, w)), (0, 1))(x, w)
    expect = jax.grad(lambda x, w: jnp.sum(cot * unfused(x, w)), (0, 1))(x, w)
    for g, e in zip(grads, expect):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-4)


def test_leaky_relu_pixel_norm_gradient_equals_autodiff_of_the_composition():
    """The generator's activation with its hand-written VJP against JAX's differentiation of
    pixel_norm(leaky_relu(z)), forward and backward, batched and with exact zeros."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 4, 3, 6)).astype(np.float32)
    z[0, 0, 0, :3] = 0.0
    z = jnp.asarray(z)
    ct = jnp.asarray(rng.normal(size=z.shape).astype(np.float32))
    composed = lambda z: progan.pixel_norm(progan.leaky_relu(z))  # noqa: E731
    np.testing.assert_allclose(progan.leaky_relu_pixel_norm(z), composed(z), rtol=1e-6)
    got = jax.grad(lambda z: jnp.sum(ct * progan.leaky_relu_pixel_norm(z)))(z)
    expect = jax.grad(lambda z: jnp.sum(ct * composed(z)))(z)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    got = jax.vmap(jax.grad(lambda z, c: jnp.sum(c * progan.leaky_relu_pixel_norm(z))))(z, ct)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_upsample_conv_layer_keeps_the_parameters_and_needs_3x3():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 3, 4)), jnp.float32)
    fused, plain = progan.EqualizedConv(5, upsample=True), progan.EqualizedConv(5)
    p = fused.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x))
    np.testing.assert_allclose(np.asarray(fused.apply(p, x)),
                               np.asarray(plain.apply(p, progan.upsample2x(x))), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="3x3 kernel"):
        progan.EqualizedConv(5, kernel_size=1, upsample=True).init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# networks


def test_shapes_per_phase_and_param_tree_covers_all_levels(params):
    g, d = params
    assert {"to_rgb_4", "to_rgb_8", "to_rgb_16", "blocks_16_1"} <= set(g)
    assert {"from_rgb_4", "from_rgb_8", "from_rgb_16", "block_4_dense1"} <= set(d)
    z = jax.random.normal(jax.random.key(2), (3, CFG.latent_dim))
    for level in (2, 3, 4):
        img = G(g, CFG, z, level, 0.5)
        assert img.shape == (3, 2 ** level, 2 ** level, 3) and img.dtype == jnp.float32
        assert D(d, CFG, img, level, 0.5).shape == (3,)
    with pytest.raises(ValueError, match="expects images"):
        D(d, CFG, jnp.zeros((3, 8, 8, 3)), 4)


def test_smaller_max_resolution_is_a_subtree(params):
    g, d = params
    small = progan.ProGANConfig.tiny(max_resolution=8, latent_dim=8, width=8)
    g8 = progan.init_generator(jax.random.key(0), small)
    assert set(g8) < set(g)
    for name in g8:
        jax.tree_util.tree_map(np.testing.assert_array_equal, g8[name], g[name])
    z = jax.random.normal(jax.random.key(3), (2, 8))
    np.testing.assert_array_equal(G(g8, small, z, 3),
                                  G(g, CFG, z, 3))


def test_fade_in_blends_the_two_resolutions(params):
    g, d = params
    z = jax.random.normal(jax.random.key(4), (4, CFG.latent_dim))
    for level in (3, 4):
        coarse = progan.upsample2x(G(g, CFG, z, level - 1, 1.0))
        fine = G(g, CFG, z, level, 1.0)
        np.testing.assert_allclose(G(g, CFG, z, level, 0.0), coarse,
                                   atol=1e-6)
        np.testing.assert_allclose(G(g, CFG, z, level, 0.3),
                                   0.7 * coarse + 0.3 * fine, atol=1e-5)
        assert float(jnp.max(jnp.abs(fine - coarse))) > 1e-3  # the blend is not trivial
        # D at alpha = 0 sees only the 2x-downsampled image through the previous level
        x = jax.random.uniform(jax.random.key(5), (4, 2 ** level, 2 ** level, 3), minval=-1)
        np.testing.assert_allclose(D(d, CFG, x, level, 0.0),
                                   D(d, CFG, progan.downsample2x(x),
                                                              level - 1, 1.0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# WGAN-GP


def test_gradient_penalty_matches_finite_differences(params):
    _, d = params
    level = 3
    with jax.enable_x64(True):  # float64 so that central differences are accurate
        d64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), d)
        critic = lambda x: D(d64, CFG, x, level, 0.7)
        x = jax.random.uniform(jax.random.key(6), (2, 8, 8, 3), jnp.float64, minval=-1.0)
        gp, norms = progan.gradient_penalty(critic, x)
        # central differences of sum(critic) along every input coordinate, one vmapped batch
        h = 1e-6
        eye = jnp.eye(x.size, dtype=x.dtype).reshape((x.size,) + x.shape)
        f = jax.jit(jax.vmap(lambda dx: jnp.sum(critic(x + dx))))
        fd = np.asarray((f(h * eye) - f(-h * eye)) / (2 * h)).reshape(x.shape)
        grads = np.asarray(jax.grad(lambda v: jnp.sum(critic(v)))(x))
    np.testing.assert_allclose(grads, fd, rtol=1e-4, atol=1e-7)
    fd_norms = np.sqrt(np.sum(fd ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, fd_norms, rtol=1e-5)
    np.testing.assert_allclose(gp, np.mean((fd_norms - 1.0) ** 2), rtol=1e-4)
    assert abs(float(gp)) > 1e-3  # a penalty that could be wrong


def test_discriminator_loss_terms(params):
    _, d = params
    critic = lambda x: D(d, CFG, x, 2, 1.0)
    reals = jax.random.uniform(jax.random.key(7), (4, 4, 4, 3), minval=-1.0)
    fakes = jax.random.uniform(jax.random.key(8), (4, 4, 4, 3), minval=-1.0)
    loss, m = progan.wgan_gp_discriminator_loss(critic, reals, fakes, jax.random.key(9))
    dr, df = np.asarray(critic(reals)), np.asarray(critic(fakes))
    np.testing.assert_allclose(m["wdist"], dr.mean() - df.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["drift"], np.mean(dr ** 2), rtol=1e-5)
    np.testing.assert_allclose(loss, df.mean() - dr.mean() + 10.0 * m["gp"] + 0.001 * np.mean(dr ** 2),
                               rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# training


def test_schedule_phases_and_alpha():
    phases = train.schedule(16, 10)
    assert [(p.level, p.fade) for p in phases] == [(2, False), (3, True), (3, False), (4, True),
                                                   (4, False)]
    assert phases[-1].end_step == 50 and train.phase_at(phases, 50) is None
    assert train.phase_at(phases, 14).alpha(14) == pytest.approx(0.4)
    assert train.phase_at(phases, 25).alpha(25) == 1.0


def test_prepare_reals_masks_and_blends():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    masks = jnp.ones((2, 8, 8, 1)).at[:, :, :2].set(0.0)
    reals, m = train.prepare_reals(images, masks, 3, 1.0)
    np.testing.assert_allclose(reals[:, :, 2:], 2 * images[:, :, 2:] - 1, atol=1e-6)
    np.testing.assert_array_equal(reals[:, :, :2], 0.0)
    full = jnp.ones((2, 8, 8, 1))
    r0, _ = train.prepare_reals(images, full, 3, 0.0)
    np.testing.assert_allclose(r0, progan.upsample2x(progan.downsample2x(2 * images - 1)), atol=1e-6)


def test_steps_lower_each_players_loss():
    """D steps (fixed G) lower L_D; G steps (fixed D) lower L_G, on a tiny synthetic batch."""
    cfg = progan.ProGANConfig.tiny(max_resolution=8, latent_dim=8, width=8)
    state = train.init_state(jax.random.key(0), cfg, 1e-3)
    rng = np.random.default_rng(0)
    images = jnp.asarray(np.clip(rng.normal(0.6, 0.1, (8, 8, 8, 3)), 0, 1), jnp.float32)
    masks = jnp.ones((8, 8, 8, 1))
    opt = train.optimizer(3e-3)
    key = jax.random.key(1)

    @jax.jit
    def grads(s):
        return train.losses_and_grads(s, images, masks, key, cfg, 2, 1.0)

    def run(which, steps=15):
        s, opt_state, history = state, opt.init(getattr(state, which)), []
        for _ in range(steps):
            d_g, g_g, m = grads(s)
            history.append(float(m["d_loss" if which == "d_params" else "g_loss"]))
            upd, opt_state = opt.update(d_g if which == "d_params" else g_g, opt_state)
            s = s.replace(**{which: jax.tree_util.tree_map(jnp.add, getattr(s, which), upd)})
        return history

    d_hist, g_hist = run("d_params"), run("g_params")
    assert d_hist[-1] < d_hist[0] - 0.1, d_hist
    assert g_hist[-1] < g_hist[0] - 0.1, g_hist


def test_checkpoint_round_trip_is_bit_exact_and_grows():
    cfg = progan.ProGANConfig.tiny(max_resolution=8, latent_dim=8, width=8)
    state = train.init_state(jax.random.key(3), cfg, 1e-3)
    images, masks = jnp.full((4, 8, 8, 3), 0.5), jnp.ones((4, 8, 8, 1))
    from experiments.train_texture_gan import _train_step  # shares its compile with the binary

    state, _ = _train_step(state, images, masks, jax.random.key(0), config=cfg, level=3,
                           alpha=jnp.float32(0.5), learning_rate=1e-3, ema_decay=0.999)
    blob = train.checkpoint_to_bytes(state, cfg, {"seed": 3})
    back, saved, meta = train.checkpoint_from_bytes(blob)
    assert saved == cfg and meta == {"seed": 3} and int(back.step) == 1
    leaves, back_leaves = jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)
    assert len(leaves) == len(back_leaves)
    for a, b in zip(leaves, back_leaves):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert train.checkpoint_to_bytes(back, cfg, {"seed": 3}) == blob
    # growing to 16x16 keeps every trained array and adds the new level
    big = progan.ProGANConfig.tiny(max_resolution=16, latent_dim=8, width=8)
    grown, _, _ = train.checkpoint_from_bytes(blob, big)
    assert "to_rgb_16" in grown.g_params and "to_rgb_16" not in state.g_params
    for name in state.g_params:
        jax.tree_util.tree_map(np.testing.assert_array_equal, state.g_params[name],
                               grown.g_params[name])
    with pytest.raises(ValueError, match="architecture differs"):
        train.checkpoint_from_bytes(blob, progan.ProGANConfig.tiny(16, latent_dim=4, width=8))
    with pytest.raises(ValueError, match="not a msgpack|not a ganfit"):
        train.checkpoint_from_bytes(b"junk")


# ---------------------------------------------------------------------------------------------
# the training binary


def _run(uv_dir, out, max_resolution=8, **kw):
    from experiments import train_texture_gan as binary

    logs = []
    args = dict(steps_per_phase=2, batch_size=4, seed=5, log_every=1, num_samples=4)
    args.update(kw)
    cfg = progan.ProGANConfig.tiny(max_resolution=max_resolution, latent_dim=8, width=8)
    step = binary.train_gan(str(uv_dir), str(out), cfg, log=logs.append, **args)
    return step, logs


def test_binary_resume_is_bit_exact_and_writes_outputs(uv_dir, tmp_path):
    step, _ = _run(uv_dir, tmp_path / "a")
    assert step == 6  # 4x4 stable, 8x8 fade, 8x8 stable
    a = tmp_path / "a"
    for name in ("checkpoint.msgpack", "generator.msgpack", "metrics.jsonl", "config.json",
                 "samples_phase00_4x4_stable.png", "samples_phase01_8x8_fade.png",
                 "samples_phase02_8x8_stable.png", "losses_phase02.png"):
        assert (a / name).is_file(), name
    grid = np.asarray(Image.open(a / "samples_phase02_8x8_stable.png"))
    assert grid.ndim == 3 and grid.std() > 1  # not blank
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert [r["alpha"] for r in rows[2:4]] == [0.0, 0.5]
    # the phase's losses charted by io.render_curves: one line per term, steps 4..5 on x
    chart = np.asarray(Image.open(a / "losses_phase02.png").convert("RGB"))
    phase2 = [r for r in rows if r["phase"] == 2]
    expected = io.render_curves({k: [r[k] for r in phase2] for k in ("d_loss", "g_loss", "wdist")},
                                steps=[r["step"] for r in phase2],
                                title="phase 2 (8x8 stable): WGAN-GP losses")
    np.testing.assert_array_equal(chart, expected)
    for colour in io._PALETTE[:3]:
        assert np.all(chart == np.asarray(colour, np.uint8), axis=-1).sum() > 20

    # interrupted after 3 steps, then resumed: the same bytes as the uninterrupted run
    step_b, _ = _run(uv_dir, tmp_path / "b", max_steps=3)
    assert step_b == 3
    step_b, logs = _run(uv_dir, tmp_path / "b")
    assert step_b == 6 and any("Resuming from" in line and "at step 3" in line for line in logs)
    assert (tmp_path / "b" / "checkpoint.msgpack").read_bytes() == \
        (a / "checkpoint.msgpack").read_bytes()
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (a / "metrics.jsonl").read_text()

    from ganfit_jax import texture
    gen = texture.load_gan(a / "generator.msgpack")
    assert gen.resolution == 8 and gen.generate(jnp.zeros(8)).shape == (8, 8, 3)

    with pytest.raises(ValueError, match="steps_per_phase"):
        _run(uv_dir, tmp_path / "b", steps_per_phase=3)


def test_binary_resume_with_raised_max_resolution_grows(uv_dir, tmp_path):
    from ganfit_jax.texture import train as tr

    step, _ = _run(uv_dir, tmp_path / "c", max_resolution=4)
    assert step == 2
    before, _, _ = tr.checkpoint_from_bytes((tmp_path / "c" / "checkpoint.msgpack").read_bytes())
    step, logs = _run(uv_dir, tmp_path / "c", max_resolution=8, max_steps=1)
    assert step == 3
    assert any("Resuming from" in x and "max_resolution raised 4 -> 8" in x and
               "2 phases appended" in x for x in logs), logs
    step, _ = _run(uv_dir, tmp_path / "c", max_resolution=8)
    assert step == 6 and (tmp_path / "c" / "samples_phase02_8x8_stable.png").is_file()
    after, cfg, _ = tr.checkpoint_from_bytes((tmp_path / "c" / "checkpoint.msgpack").read_bytes())
    assert cfg.max_resolution == 8 and "to_rgb_8" in after.g_params
    assert "to_rgb_8" not in before.g_params
    with pytest.raises(ValueError, match="smaller max_resolution"):
        _run(uv_dir, tmp_path / "c", max_resolution=4)


def test_binary_data_parallel_on_two_devices(uv_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(  # the suite's own flags kept
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"))
    cmd = [sys.executable, "-m", "experiments.train_texture_gan", f"--uv_dir={uv_dir}",
           f"--output_dir={tmp_path / 'two'}", "--max_resolution=4", "--steps_per_phase=4",
           "--batch_size=4", "--latent_dim=8", "--fmap_base=64", "--fmap_max=8", "--seed=5",
           "--log_every=1", "--num_samples=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 device(s)" in proc.stdout and "ETA" in proc.stdout
    _run(uv_dir, tmp_path / "one", max_resolution=4, steps_per_phase=4)
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one) == 4
    for a, b in zip(one, two):  # same maths, only the reduction order may differ
        for k in ("d_loss", "g_loss", "gp"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), (k, a, b)
    bad = [c if not c.startswith("--batch_size") else "--batch_size=3" for c in cmd]
    proc = subprocess.run(bad, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "must be divisible by the 2 local devices" in proc.stderr
