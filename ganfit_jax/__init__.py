"""ganfit-jax: GANFIT (Gecer et al., CVPR 2019) as pure JAX functions."""

__version__ = "0.1.0"
