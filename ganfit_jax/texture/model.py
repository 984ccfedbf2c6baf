"""Texture models behind one interface: the GAN of GANFIT (Eq. 5) and the linear PCA (Eq. 1).

Both are `flax.struct` pytrees with

    model.generate(p_t)        -> UV map (H, W, 3), float32 RGB in [0, 1]   (pure; jit/vmap/grad)
    model.latent_dim           -> size of p_t
    model.resolution           -> H (= W)
    model.init_latent(key)     -> a starting p_t for fitting

so the fitting switches between GAN and PCA texture (the paper's ablation, Fig. 5(i)) by loading
a different file with `load_texture_model(path)`: `.msgpack` -> GAN, `.npz` -> PCA. A 3DMM's own
per-vertex texture PCA (BFM) is `VertexPCATexture.from_morphable(model)`; its `generate` gives
(N, 3) vertex colours and `per_vertex` is True (False for the UV models).

UV maps use the image convention of the whole project: row 0 is the top (v = 1 in OBJ terms).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ganfit_jax import precision
from ganfit_jax.texture import progan

GAN_FORMAT = "ganfit_jax.progan.v1"


def generate(params, p_t, config: progan.ProGANConfig, level: int | None = None, alpha=1.0,
             compute_dtype: str = "float32"):
    """Eq. 5: G(p_t) as a UV map (2^level, 2^level, C) in [0, 1] for one latent (latent_dim,).

    The generator works in [-1, 1] (Karras et al.'s data range); the map is (x + 1) / 2, clipped
    to [0, 1] (gradients vanish only on texels already outside the valid colour range).
    Batch with `jax.vmap` over p_t.
    """
    level = config.max_level if level is None else level
    p_t = jnp.asarray(p_t, jnp.float32)
    if p_t.shape != (config.latent_dim,):
        raise ValueError(f"p_t: expected shape ({config.latent_dim},), got {tuple(p_t.shape)}")
    if precision.check_compute_dtype(compute_dtype) != "float32":
        # the generator runs in bfloat16; the UV map the renderer and losses see is float32
        params, p_t = precision.cast_floating((params, p_t), compute_dtype)
        return _generate(params, p_t, config, level, alpha).astype(jnp.float32)
    return _generate(params, p_t, config, level, alpha)


@functools.partial(jax.jit, static_argnums=(2, 3))  # inlined under an outer jit; fast eagerly
def _generate(params, p_t, config, level, alpha):
    x = progan.generator_apply(params, config, p_t[None], level, alpha)[0]
    return jnp.clip(0.5 * (x + 1.0), 0.0, 1.0)


@flax.struct.dataclass
class GANTexture:
    """A trained (or random) ProGAN generator as a texture model (GANFIT Eq. 5)."""

    params: Any
    config: progan.ProGANConfig = flax.struct.field(pytree_node=False)
    level: int = flax.struct.field(pytree_node=False, default=None)
    # 'bfloat16': G runs at tensor-core rate on GPU/TPU (ganfit_jax.precision); weights stay f32
    compute_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    def __post_init__(self):
        if self.level is None:
            object.__setattr__(self, "level", self.config.max_level)
        self.config.check_level(self.level)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def resolution(self) -> int:
        return 2 ** self.level

    def generate(self, p_t):
        return generate(self.params, p_t, self.config, self.level,
                        compute_dtype=self.compute_dtype)

    def init_latent(self, key):
        """A sample of the training prior z ~ N(0, I) (G pixel-normalises it, Karras Sec. 4.2)."""
        return jax.random.normal(key, (self.latent_dim,), jnp.float32)


@flax.struct.dataclass
class PCATexture:
    """Linear UV texture model T(p_t) = mean + basis p_t (GANFIT Eq. 1), basis in std units.

    Attributes:
      mean: (H, W, 3) mean UV map in [0, 1].
      basis: (H, W, 3, K) principal components scaled by their standard deviations.
      coverage: (H, W) fraction of training maps that observed each texel (0 = never seen).
    """

    mean: jnp.ndarray
    basis: jnp.ndarray
    coverage: jnp.ndarray

    @property
    def latent_dim(self) -> int:
        return self.basis.shape[-1]

    @property
    def resolution(self) -> int:
        return self.mean.shape[0]

    def generate(self, p_t):
        p_t = jnp.asarray(p_t, jnp.float32)
        if p_t.shape != (self.latent_dim,):
            raise ValueError(f"p_t: expected shape ({self.latent_dim},), got {tuple(p_t.shape)}")
        return jnp.clip(self.mean + jnp.einsum("hwck,k->hwc", self.basis, p_t), 0.0, 1.0)

    def init_latent(self, key):
        """The mean texture (p_t = 0); the key is unused but kept for a uniform interface."""
        del key
        return jnp.zeros((self.latent_dim,), jnp.float32)


@flax.struct.dataclass
class VertexPCATexture:
    """A 3DMM's own per-vertex texture PCA (e.g. the BFM's, via the morphable-model loaders).

    Same interface, but `generate` returns per-vertex albedo (N, 3) instead of a UV map:
    `per_vertex` is True, so the renderer interpolates colours over triangles rather than
    sampling a UV map. Built with `VertexPCATexture.from_morphable(model)`.
    """

    mean: jnp.ndarray  # (N, 3)
    basis: jnp.ndarray  # (N, 3, T), standard-deviation units

    per_vertex = True

    @classmethod
    def from_morphable(cls, morphable_model):
        if morphable_model.texture_basis is None:
            raise ValueError("this morphable model has no texture PCA (texture_mean/texture_basis)")
        return cls(morphable_model.texture_mean, morphable_model.texture_basis)

    @property
    def latent_dim(self) -> int:
        return self.basis.shape[-1]

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    def generate(self, p_t):
        """Eq. 1 per vertex, clipped to [0, 1]."""
        p_t = jnp.asarray(p_t, jnp.float32)
        if p_t.shape != (self.latent_dim,):
            raise ValueError(f"p_t: expected shape ({self.latent_dim},), got {tuple(p_t.shape)}")
        return jnp.clip(self.mean + jnp.einsum("ndt,t->nd", self.basis, p_t), 0.0, 1.0)

    def init_latent(self, key):
        del key
        return jnp.zeros((self.latent_dim,), jnp.float32)


GANTexture.per_vertex = False
PCATexture.per_vertex = False

TextureModel = GANTexture | PCATexture | VertexPCATexture


def random_texture_model(key, resolution: int = 16, latent_dim: int = 8, width: int = 16):
    """A tiny randomly initialised GAN texture model, for tests of the renderer and fitting."""
    config = progan.ProGANConfig.tiny(max_resolution=resolution, latent_dim=latent_dim,
                                      width=width)
    return GANTexture(progan.init_generator(key, config), config)


# ----------------------------------------------------------------------------------------------
# Serialisation (bytes here; files only in the loaders below)
# ----------------------------------------------------------------------------------------------


def gan_to_bytes(model: GANTexture) -> bytes:
    """msgpack bytes holding the generator parameters, its config and output level."""
    payload = {"format": GAN_FORMAT, "config": json.dumps(model.config.to_dict()),
               "level": model.level,
               "params": flax.serialization.to_state_dict(jax.device_get(model.params))}
    return flax.serialization.msgpack_serialize(payload)


def gan_from_bytes(data: bytes, source: str = "bytes") -> GANTexture:
    try:
        payload = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types
        raise ValueError(f"{source}: not a msgpack file ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != GAN_FORMAT:
        raise ValueError(f"{source}: not a ganfit-jax generator file (expected format "
                         f"{GAN_FORMAT!r})")
    config = progan.ProGANConfig(**json.loads(payload["config"]))
    template = progan.init_generator(jax.random.key(0), config)
    params = flax.serialization.from_state_dict(template, payload["params"])
    params = jax.device_put(params)  # jnp.asarray: a program per leaf's shape
    return GANTexture(params, config, int(payload["level"]))


def load_gan(path) -> GANTexture:
    """Load a generator written by experiments/train_texture_gan.py (`generator.msgpack`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generator file {path} does not exist")
    with open(path, "rb") as f:
        return gan_from_bytes(f.read(), path)


def save_pca(model: PCATexture, path) -> None:
    np.savez_compressed(os.fspath(path), format="ganfit_jax.uv_pca.v1",
                        mean=np.asarray(model.mean, np.float32),
                        basis=np.asarray(model.basis, np.float32),
                        coverage=np.asarray(model.coverage, np.float32))


def load_pca(path) -> PCATexture:
    """Load a UV PCA texture model written by `save_pca` (.npz: mean, basis, coverage)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PCA texture file {path} does not exist")
    try:
        archive = np.load(path)
    except (ValueError, OSError) as e:  # not a zip: numpy tries it as a pickle and refuses
        raise ValueError(f"{path}: not a readable .npz PCA texture model ({e})") from None
    with archive as f:
        missing = [k for k in ("mean", "basis") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; expected mean (H,W,3), "
                             "basis (H,W,3,K), coverage (H,W)")
        mean, basis = f["mean"], f["basis"]
        coverage = f["coverage"] if "coverage" in f.files else np.ones(mean.shape[:2], np.float32)
    if mean.ndim != 3 or mean.shape[-1] != 3 or basis.shape[:3] != mean.shape or basis.ndim != 4:
        raise ValueError(f"{path}: expected mean (H,W,3) and basis (H,W,3,K), got "
                         f"{mean.shape} and {basis.shape}")
    return PCATexture(jnp.asarray(mean, jnp.float32), jnp.asarray(basis, jnp.float32),
                      jnp.asarray(coverage, jnp.float32))


def load_texture_model(path) -> TextureModel:
    """`.msgpack` -> GANTexture, `.npz` -> PCATexture (the one switch the fitting needs)."""
    path = os.fspath(path)
    if path.endswith(".msgpack"):
        return load_gan(path)
    if path.endswith(".npz"):
        return load_pca(path)
    raise ValueError(f"texture model {path}: expected a .msgpack generator or a .npz PCA model")
