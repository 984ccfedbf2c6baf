"""Train the progressive UV-texture GAN of GANFIT (Sec. 3.1; Karras et al., ICLR 2018).

    python -m experiments.train_texture_gan --uv_dir=DIR --output_dir=DIR \
        --max_resolution=64 --steps_per_phase=1000 --batch_size=16

Reads every UV map in --uv_dir (NAME.png / .jpg, optional NAME_mask.png for unobserved texels),
trains 4x4 -> --max_resolution with fade-in phases, and writes into --output_dir:

  checkpoint.msgpack        full training state (latest; resumed automatically)
  generator.msgpack         EMA generator at the latest finished phase (texture.load_gan)
  samples_phaseKK_RxR_{fade,stable}.png   sample grid at the end of each phase (fixed latents)
  losses_phaseKK.png        D/G loss curves of each phase
  metrics.jsonl             one line of metrics per step
  config.json               the flags of the first run

Running again on the same --output_dir resumes from checkpoint.msgpack (and says so); a larger
--max_resolution grows the networks and appends phases. Training is data-parallel over all
local devices (batch sharded on a 1-D jax.sharding mesh, state replicated) and deterministic
given --seed: batch indices and PRNG keys are functions of (seed, step) only.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from ganfit_jax import io
from ganfit_jax.texture import model as texture_model
from experiments import common
from ganfit_jax.texture import progan, train, uv_io

FLAGS = flags.FLAGS
flags.DEFINE_string("uv_dir", None, "Folder of UV maps (NAME.png, optional NAME_mask.png).")
flags.DEFINE_string("output_dir", None, "Where checkpoints, samples and curves go.")
flags.DEFINE_integer("max_resolution", 64, "Final resolution (power of two, 4..1024).",
                     lower_bound=4, upper_bound=1024)
flags.DEFINE_integer("steps_per_phase", 1000, "Steps in each fade-in and each stable phase.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 16, "Global batch (divisible by the number of devices).",
                     lower_bound=1)
flags.DEFINE_integer("latent_dim", 512, "Size of p_t (the paper: 512).", lower_bound=1)
flags.DEFINE_integer("fmap_base", 8192, "Channel width base: width(res) = min(base/(res/2), max).",
                     lower_bound=1)
flags.DEFINE_integer("fmap_max", 512, "Largest channel width.", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (Karras et al.: 0.001).")
flags.DEFINE_float("ema_decay", 0.999, "Decay of the generator EMA used for samples/export.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Seed of initialisation, batches and latents.")
flags.DEFINE_integer("checkpoint_every", 500, "Also checkpoint every N steps (0: phase ends only).",
                     lower_bound=0)
flags.DEFINE_integer("log_every", 50, "Progress line every N steps.", lower_bound=1)
flags.DEFINE_integer("num_samples", 16, "Samples per grid (a square number reads best).",
                     lower_bound=1)
flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in this invocation (0: none).",
                     lower_bound=0)
common.require_positive("learning_rate")


def _atomic_write(path, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sample_grid(images, tile: int = 64):
    """(N, r, r, 3) in [0, 1] -> one uint8 grid image, tiles upscaled (nearest) to >= tile px."""
    n, r = images.shape[0], images.shape[1]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    scale = max(1, tile // r)
    big = np.repeat(np.repeat(np.asarray(images), scale, 1), scale, 2)
    s = r * scale
    grid = np.ones((rows * (s + 2) + 2, cols * (s + 2) + 2, 3), np.float32)
    for i in range(n):
        y, x = 2 + (i // cols) * (s + 2), 2 + (i % cols) * (s + 2)
        grid[y:y + s, x:x + s] = big[i]
    return Image.fromarray(np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8))


def _eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_train_step = jax.jit(train.train_step, donate_argnums=0,
                      static_argnames=("config", "level", "learning_rate", "ema_decay"))
_sample = jax.jit(progan.generator_apply, static_argnums=(1, 3))


def train_gan(uv_dir, output_dir, config: progan.ProGANConfig, steps_per_phase: int,
              batch_size: int, learning_rate: float = 1e-3, ema_decay: float = 0.999,
              seed: int = 0, checkpoint_every: int = 500, log_every: int = 50,
              num_samples: int = 16, max_steps: int = 0, log=print):
    """The whole run (what main() calls with the flags); returns the final global step."""
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(f"--batch_size={batch_size} must be divisible by the "
                         f"{len(devices)} local devices")
    names, images, masks = uv_io.load_uv_folder(uv_dir, config.max_resolution)
    os.makedirs(output_dir, exist_ok=True)  # after the data loads: a typo leaves no empty folder
    log(f"Loaded {len(names)} UV maps from {uv_dir} at {config.max_resolution}px, "
        f"observed texels {100 * masks.mean():.1f}%; {len(devices)} device(s): "
        f"{devices[0].platform}")
    phases = train.schedule(config.max_resolution, steps_per_phase)
    total = phases[-1].end_step
    ckpt_path = os.path.join(output_dir, "checkpoint.msgpack")
    meta = {"seed": seed, "steps_per_phase": steps_per_phase, "batch_size": batch_size,
            "learning_rate": learning_rate, "ema_decay": ema_decay}
    if os.path.exists(ckpt_path):
        with open(ckpt_path, "rb") as f:
            state, saved, old_meta = train.checkpoint_from_bytes(
                f.read(), config, learning_rate, source=ckpt_path)
        for k in ("seed", "steps_per_phase"):
            if old_meta.get(k) != meta[k]:
                raise ValueError(f"{ckpt_path} was trained with --{k}={old_meta.get(k)}; resume "
                                 f"with the same value (got {meta[k]}) or use a new --output_dir")
        step = int(state.step)
        grown = ""
        if saved.max_resolution != config.max_resolution:
            added = len(phases) - len(train.schedule(saved.max_resolution, steps_per_phase))
            grown = (f"; max_resolution raised {saved.max_resolution} -> "
                     f"{config.max_resolution}: networks grown, {added} phases appended")
        log(f"Resuming from {ckpt_path} at step {step}{grown}")
    else:
        state = train.init_state(jax.random.key(seed), config, learning_rate)
        step = 0
        with open(os.path.join(output_dir, "config.json"), "w") as f:
            json.dump(dict(meta, **config.to_dict(), uv_dir=os.path.abspath(uv_dir)), f,
                      indent=1)
        log(f"Starting a new run in {output_dir}")
    if step >= total:
        log(f"Schedule already complete ({step}/{total} steps); nothing to do.")
        return step

    # Auto axis: XLA partitions the step (minibatch-stddev groups may span devices).
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state, replicated)
    z_samples = jax.random.normal(jax.random.key(seed + 1_000_003),
                                  (num_samples, config.latent_dim))
    base_key = jax.random.key(seed + 1)
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    history = []
    if os.path.exists(metrics_path):  # keep only what the checkpoint has seen
        with open(metrics_path) as f:
            history = [r for r in map(json.loads, f) if r["step"] < step]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)

    def save_checkpoint():
        _atomic_write(ckpt_path, train.checkpoint_to_bytes(state, config, meta))

    start_time, start_step, pending = time.time(), step, []
    n = images.shape[0]
    while step < total and (not max_steps or step - start_step < max_steps):
        phase = train.phase_at(phases, step)
        if step == phase.start_step:
            state = train.reset_optimizers(state, learning_rate)
            state = jax.device_put(state, replicated)
            log(f"== {phase.describe()}: steps {phase.start_step}..{phase.end_step - 1}")
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(n, batch_size, replace=n < batch_size)
        batch = jax.device_put(images[idx], batch_sharding)
        batch_masks = jax.device_put(masks[idx], batch_sharding)
        alpha = phase.alpha(step)
        state, metrics = _train_step(
            state, batch, batch_masks, jax.random.fold_in(base_key, step), config=config,
            level=phase.level, alpha=jnp.float32(alpha), learning_rate=learning_rate,
            ema_decay=ema_decay)
        pending.append((step, alpha, metrics))
        step += 1
        done_phase = step == phase.end_step
        stopping = bool(max_steps) and step - start_step >= max_steps
        if done_phase or stopping or step % log_every == 0 or step == total:
            rows = []
            for s, a, m in pending:
                row = {"step": s, "phase": phase.index, "resolution": phase.resolution,
                       "alpha": round(float(a), 6)}
                row.update({k: float(v) for k, v in jax.device_get(m).items()})
                rows.append(row)
            pending = []
            history.extend(rows)
            with open(metrics_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            r = rows[-1]
            rate = (step - start_step) / max(time.time() - start_time, 1e-9)
            log(f"[{phase.describe()}] step {step}/{total} alpha={r['alpha']:.2f} "
                f"d_loss={r['d_loss']:.4f} g_loss={r['g_loss']:.4f} wdist={r['wdist']:.4f} "
                f"gp={r['gp']:.4f} | {rate:.2f} it/s ETA {_eta((total - step) / rate)}")
        if done_phase:
            fakes = _sample(state.g_ema, config, z_samples, phase.level, 1.0)
            grid = sample_grid(np.clip(0.5 * (np.asarray(fakes) + 1.0), 0.0, 1.0))
            kind = "fade" if phase.fade else "stable"
            res = phase.resolution
            grid.save(os.path.join(output_dir,
                                   f"samples_phase{phase.index:02d}_{res}x{res}_{kind}.png"))
            rows = [h for h in history if h["phase"] == phase.index]
            curves = {k: [h[k] for h in rows] for k in ("d_loss", "g_loss", "wdist")}
            # a phase whose every logged loss is NaN still saves its generator and checkpoint
            if np.isfinite(np.asarray(list(curves.values()))).any():
                chart = io.render_curves(curves, steps=[h["step"] for h in rows],
                                         title=f"{phase.describe()}: WGAN-GP losses")
                Image.fromarray(chart).save(
                    os.path.join(output_dir, f"losses_phase{phase.index:02d}.png"))
            gen = texture_model.GANTexture(jax.device_get(state.g_ema), config, phase.level)
            _atomic_write(os.path.join(output_dir, "generator.msgpack"),
                          texture_model.gan_to_bytes(gen))
            save_checkpoint()
            log(f"   wrote samples, loss curves, generator ({res}x{res}) and checkpoint")
        elif checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint()
    save_checkpoint()
    log(f"Stopped at step {step}/{total}; checkpoint {ckpt_path}")
    return step


def main(argv):
    del argv
    config = progan.ProGANConfig(latent_dim=FLAGS.latent_dim, max_resolution=FLAGS.max_resolution,
                                 fmap_base=FLAGS.fmap_base, fmap_max=FLAGS.fmap_max)
    train_gan(FLAGS.uv_dir, FLAGS.output_dir, config, FLAGS.steps_per_phase, FLAGS.batch_size,
              FLAGS.learning_rate, FLAGS.ema_decay, FLAGS.seed, FLAGS.checkpoint_every,
              FLAGS.log_every, FLAGS.num_samples, FLAGS.max_steps,
              log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    flags.mark_flags_as_required(["uv_dir", "output_dir"])
    app.run(common.input_errors_as_one_line(main))
