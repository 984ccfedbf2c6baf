"""`stored(x)`: x computed once, where XLA:CPU would recompute it inside each consumer.

XLA:CPU fuses a cheap elementwise producer into every fusion that reads it, so a per-pixel
value read by ten backward-pass fusions is recomputed ten times, with everything fused into it
(gathers, interpolation, texture lookups). A dot's result is always written to memory; a
product with the identity is exact (but for subnormal values, which the CPU's matrix product
flushes to zero, and the sign of zero) and costs one pass over x. It is applied on the CPU only:
elsewhere the recomputation is cheap beside the networks, and GPUs' default float32 matmul
precision (TF32) would round x (the product is asked for at HIGHEST precision regardless).
"""

import jax
import jax.numpy as jnp


def stored(x, axis=0):
    """x (unchanged; subnormals flushed to zero) as the product of the identity along `axis`
    (0 or -1, the axis of a few channels/planes), on the CPU backend; x itself elsewhere."""
    if axis not in (0, -1, x.ndim - 1):
        raise ValueError(f"stored: axis must be 0 or -1, got {axis}")
    if jax.default_backend() != "cpu":
        return x
    eye = jnp.eye(x.shape[axis], dtype=x.dtype)
    highest = jax.lax.Precision.HIGHEST
    if axis == 0:
        flat = jnp.matmul(eye, x.reshape(x.shape[0], -1), precision=highest)
    else:
        flat = jnp.matmul(x.reshape(-1, x.shape[-1]), eye, precision=highest)
    return flat.reshape(x.shape)
