"""Progressive GAN training step, schedule and checkpoint (de)serialisation, as pure functions.

experiments/train_texture_gan.py is a thin binary over this module (flags, files, sharding).

Schedule (Karras et al. Sec. 3): phase 0 trains 4x4; then for each level L = 3..max_level a
*fade* phase (alpha ramps linearly 0 -> 1 while the new block is blended in) and a *stable* phase
(alpha = 1), each `steps_per_phase` steps. The phase is a function of the global step only, so
raising the final resolution simply appends phases and a resumed run continues where it stopped.
Adam moments are reset at the start of every phase, as in Karras et al.'s code
(`reset_opt_for_new_lod`), because a new block changes what each parameter means.

Unobserved texels (masks from photo unwrapping) are handled by masking both sides of the game:
the discriminator sees reals and fakes multiplied by the same (real) masks, so the generator is
never asked to match colours nobody observed, yet is still judged on every observed texel.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ganfit_jax.texture import progan

CHECKPOINT_FORMAT = "ganfit_jax.progan_train.v1"


class Phase(NamedTuple):
    index: int
    level: int
    fade: bool  # True while the new level is blended in
    start_step: int
    end_step: int

    @property
    def resolution(self) -> int:
        return 2 ** self.level

    def alpha(self, step: int) -> float:
        """Fade-in weight at a global step (1.0 in stable phases)."""
        if not self.fade:
            return 1.0
        return min(1.0, (step - self.start_step) / max(self.end_step - self.start_step, 1))

    def describe(self) -> str:
        r = self.resolution
        return f"phase {self.index} ({r}x{r} {'fade-in' if self.fade else 'stable'})"


def schedule(max_resolution: int, steps_per_phase: int) -> list[Phase]:
    """The progressive phases for a final resolution: 4 stable, then (fade, stable) per level."""
    if steps_per_phase < 1:
        raise ValueError(f"steps_per_phase must be >= 1, got {steps_per_phase}")
    top = int(math.log2(max_resolution))
    kinds = [(2, False)] + [(lv, f) for lv in range(3, top + 1) for f in (True, False)]
    return [Phase(i, lv, f, i * steps_per_phase, (i + 1) * steps_per_phase)
            for i, (lv, f) in enumerate(kinds)]


def phase_at(phases: list[Phase], step: int) -> Phase | None:
    """The phase that trains `step`, or None when the schedule is complete."""
    for p in phases:
        if p.start_step <= step < p.end_step:
            return p
    return None


@flax.struct.dataclass
class TrainState:
    g_params: Any
    d_params: Any
    g_ema: Any  # exponential moving average of G (Karras et al. Sec. A.1), used for samples
    g_opt: Any
    d_opt: Any
    step: jnp.ndarray  # global step (int32)


def optimizer(learning_rate: float):
    """Adam with Karras et al.'s settings: beta1 = 0, beta2 = 0.99, eps = 1e-8."""
    return optax.adam(learning_rate, b1=0.0, b2=0.99, eps=1e-8)


def init_state(key, config: progan.ProGANConfig, learning_rate: float) -> TrainState:
    kg, kd = jax.random.split(key)
    g = progan.init_generator(kg, config)
    d = progan.init_discriminator(kd, config)
    opt = optimizer(learning_rate)
    ema = jax.tree_util.tree_map(jnp.copy, g)  # own buffers, so the step may donate the state
    return TrainState(g, d, ema, opt.init(g), opt.init(d), jnp.zeros((), jnp.int32))


def reset_optimizers(state: TrainState, learning_rate: float) -> TrainState:
    opt = optimizer(learning_rate)
    return state.replace(g_opt=opt.init(state.g_params), d_opt=opt.init(state.d_params))


def prepare_reals(images, masks, level: int, alpha):
    """Reals of the current phase in the data range [-1, 1], masked, plus the masks.

    images (N, R, R, 3) in [0, 1] and masks (N, R, R, 1) at the data resolution are box-filtered
    to 2^level using only observed texels; during a fade-in the reals are blended with their
    2x-coarser version (Karras et al.'s `lod` blending), matching what the generator outputs.
    """
    def pooled(level_):
        m = progan.resize_to_level(masks, level_)
        x = progan.resize_to_level((2.0 * images - 1.0) * masks, level_)
        return x / jnp.maximum(m, 1e-6), m

    x, m = pooled(level)
    if level > 2:
        x_low, _ = pooled(level - 1)
        x_low = progan.upsample2x(x_low)
        x = x_low + jnp.asarray(alpha, x.dtype) * (x - x_low)
    return x * m, m


def losses_and_grads(state: TrainState, images, masks, key, config, level: int, alpha,
                     lambda_gp=progan.LAMBDA_GP, eps_drift=progan.EPS_DRIFT):
    """WGAN-GP gradients for D (given the current G) and for G (given the current D)."""
    k_z, k_gp, k_z2 = jax.random.split(key, 3)
    n = images.shape[0]
    reals, m = prepare_reals(images, masks, level, alpha)

    def generate(g_params, k):
        z = jax.random.normal(k, (n, config.latent_dim), jnp.float32)
        return progan.generator_apply(g_params, config, z, level, alpha) * m

    def d_loss(d_params):
        critic = lambda x: progan.discriminator_apply(d_params, config, x, level, alpha)
        fakes = jax.lax.stop_gradient(generate(state.g_params, k_z))
        return progan.wgan_gp_discriminator_loss(critic, reals, fakes, k_gp, lambda_gp, eps_drift)

    def g_loss(g_params):
        critic = lambda x: progan.discriminator_apply(state.d_params, config, x, level, alpha)
        return progan.wgan_generator_loss(critic, generate(g_params, k_z2))

    (_, metrics), d_grads = jax.value_and_grad(d_loss, has_aux=True)(state.d_params)
    g_value, g_grads = jax.value_and_grad(g_loss)(state.g_params)
    return d_grads, g_grads, dict(metrics, g_loss=g_value)


def train_step(state: TrainState, images, masks, key, *, config: progan.ProGANConfig,
               level: int, alpha, learning_rate: float, ema_decay: float = 0.999):
    """One D update then one G update (n_critic = 1, as Karras et al.), then the EMA of G.

    The G update uses the D of before this step's D update (both gradients come from the same
    state), which keeps the step a single fused computation; with n_critic = 1 this is the
    simultaneous-gradient variant of alternating updates.
    Jit with `level` and the float hyper-parameters static (alpha is traced).
    """
    d_grads, g_grads, metrics = losses_and_grads(state, images, masks, key, config, level, alpha)
    opt = optimizer(learning_rate)
    d_updates, d_opt = opt.update(d_grads, state.d_opt, state.d_params)
    g_updates, g_opt = opt.update(g_grads, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, g_updates)
    g_ema = jax.tree_util.tree_map(lambda e, p: p + ema_decay * (e - p), state.g_ema, g_params)
    new = TrainState(g_params, optax.apply_updates(state.d_params, d_updates), g_ema, g_opt, d_opt,
                     state.step + 1)
    return new, metrics


# ----------------------------------------------------------------------------------------------
# Checkpoints (bytes; the binary writes them to disk)
# ----------------------------------------------------------------------------------------------


def checkpoint_to_bytes(state: TrainState, config: progan.ProGANConfig, meta: dict) -> bytes:
    """msgpack of the full training state, the architecture and free-form run metadata."""
    payload = {"format": CHECKPOINT_FORMAT, "config": json.dumps(config.to_dict()),
               "meta": json.dumps(meta),
               "state": flax.serialization.to_state_dict(jax.device_get(state))}
    return flax.serialization.msgpack_serialize(payload)


def checkpoint_from_bytes(data: bytes, config: progan.ProGANConfig | None = None,
                          learning_rate: float = 1e-3, source: str = "checkpoint"):
    """Restore (state, saved_config, meta); if `config` is larger, grow the state into it.

    Growing keeps every saved array (parameters, EMA, Adam moments) under its key path and
    initialises the new resolutions' parameters exactly as a fresh run with `config` would
    (same key), so a resumed run with a raised max resolution continues seamlessly.
    """
    try:
        payload = flax.serialization.msgpack_restore(data)
    except Exception as e:
        raise ValueError(f"{source}: not a msgpack checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{source}: not a ganfit-jax ProGAN training checkpoint")
    saved = progan.ProGANConfig(**json.loads(payload["config"]))
    meta = json.loads(payload["meta"])
    target_config = saved if config is None else config
    if config is not None:
        differs = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items()
                   if k != "max_resolution" and getattr(config, k) != v}
        if differs:
            raise ValueError(f"{source}: architecture differs from the checkpoint {differs} "
                             "(only max_resolution may change on resume)")
        if config.max_resolution < saved.max_resolution:
            raise ValueError(f"{source}: checkpoint was trained to {saved.max_resolution}; "
                             f"cannot resume with a smaller max_resolution {config.max_resolution}")
    seed = int(meta.get("seed", 0))
    template = init_state(jax.random.key(seed), target_config, learning_rate)
    template_dict = flax.serialization.to_state_dict(template)
    state_dict = progan.grow_params(template_dict, payload["state"])
    state = flax.serialization.from_state_dict(template, state_dict)
    state = jax.tree_util.tree_map(jnp.asarray, state)
    return state, saved, meta
