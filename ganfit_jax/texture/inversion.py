"""GAN inversion (GANFIT Sec. 3.1): p_t* = argmin_p |G(p) - I_uv|_1 over observed texels, by Adam.

GANFIT initialises the texture latent of the fitting this way from a UV map; it also turns a UV
data set into latents. Works for any texture model of `ganfit_jax.texture.model` (GAN or PCA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def masked_l1(generated, target, mask=None):
    """Mean absolute difference over observed texels (mask (H,W) or (H,W,1) weights)."""
    diff = jnp.abs(generated - target)
    if mask is None:
        return jnp.mean(diff)
    m = jnp.asarray(mask, diff.dtype)
    m = m.reshape(m.shape[0], m.shape[1], -1)[..., :1]
    return jnp.sum(diff * m) / jnp.maximum(jnp.sum(m) * diff.shape[-1], 1e-8)


@functools.partial(jax.jit, static_argnames=("steps",))
def _run(texture_model, target, mask, p0, steps, learning_rate):
    opt = optax.adam(learning_rate)
    loss_fn = lambda p: masked_l1(texture_model.generate(p), target, mask)

    def step(carry, _):
        p, state = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(g, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (p, _), losses = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    return p, jnp.append(losses, loss_fn(p))


def invert(texture_model, target, mask=None, key=None, p_init=None, steps: int = 300,
           learning_rate: float = 0.05):
    """Fit p_t so that texture_model.generate(p_t) matches `target` (H, W, 3) in [0, 1].

    Args:
      texture_model: a GANTexture or PCATexture.
      target: (H, W, 3) UV map at the model's resolution.
      mask: optional (H, W) / (H, W, 1) observed-texel weights.
      key: PRNG key for the starting latent (texture_model.init_latent) unless p_init is given.
      steps, learning_rate: Adam schedule.
    Returns:
      (p_t, losses) with losses (steps + 1,): the L1 before each step and after the last one.
    """
    target = jnp.asarray(target, jnp.float32)
    res = texture_model.resolution
    if target.shape != (res, res, 3):
        raise ValueError(f"target: expected ({res}, {res}, 3), got {tuple(target.shape)}")
    if p_init is None:
        if key is None:
            raise ValueError("invert: give a PRNG key or p_init for the starting latent")
        p_init = texture_model.init_latent(key)
    mask = jnp.ones((res, res, 1), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    return _run(texture_model, target, mask, jnp.asarray(p_init, jnp.float32), int(steps),
                jnp.float32(learning_rate))
