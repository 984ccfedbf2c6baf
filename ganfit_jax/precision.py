"""Mixed precision for the two networks of the fit (texture GAN G, identity network F).

On GPUs and TPUs the networks dominate a fitting step, and bfloat16 runs them at the tensor
cores' full rate with half the memory traffic. Only the networks change width: the 3DMM, camera,
rasteriser and every loss term of Eq. 12 stay float32, and each network's outputs are cast back
to float32 before a loss sees them (the loss-scaling problems of float16 training do not arise
with bfloat16's float32 exponent range).
"""

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(name):
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    return name


def cast_floating(tree, dtype):
    """Every floating leaf of `tree` as `dtype`; integer and boolean leaves unchanged."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)
