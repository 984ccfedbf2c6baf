"""Progressive-growing GAN (Karras et al., "Progressive Growing of GANs", ICLR 2018) in UV space.

GANFIT (Gecer et al., CVPR 2019, Sec. 3.1) replaces the linear texture model of Eq. 1 by such a
generator, G(p_t): R^512 -> R^{H x W x 3} (Eq. 5), trained on unwrapped UV maps.

What follows Karras et al. (Sec. 2-4 and their Table 2):
  * pixel-wise feature normalisation ("pixel norm") after every generator conv and on the latent;
  * equalised learning rate: weights are stored as N(0, 1) and scaled at run time by the He
    constant gain / sqrt(fan_in), so Adam's per-parameter step sizes match across layers;
  * leaky ReLU (slope 0.2), nearest-neighbour 2x upsampling, 2x2 average-pool downsampling;
  * a 1x1 to-RGB (from-RGB) layer per resolution and a fade-in weight `alpha` that blends the
    new top block with the upsampled output of the previous resolution;
  * minibatch standard deviation as an extra feature map in the last discriminator block;
  * WGAN-GP loss (Gulrajani et al. 2017) with the drift term eps_drift * E[D(x)^2].

Phases and parameters: ONE parameter tree holds every resolution up to `max_resolution`; the
networks take a static `level` (log2 of the current output resolution, 2 = 4x4) and a traced
`alpha` in [0, 1], so one tree serves every phase and `jit` compiles once per level. Every
submodule is named after its resolution (`blocks_16_0`, `to_rgb_16`, ...) and channel widths depend
only on the resolution (not on `max_resolution`), so a tree built for a larger `max_resolution`
contains the smaller one as a subset: growing a trained model is a dictionary overlay
(`grow_params`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEAKY_SLOPE = 0.2  # Karras et al. Sec. 4.2 / Table 2
EPS_DRIFT = 0.001  # Karras et al. Sec. A.1: keeps D's output near zero
LAMBDA_GP = 10.0  # Gulrajani et al. 2017


@dataclasses.dataclass(frozen=True)
class ProGANConfig:
    """Architecture of the generator and discriminator (hashable, so it can be a static arg).

    Channel width at resolution 2^r is min(fmap_base / 2^(r-1), fmap_max) as in Karras et al.'s
    code; the paper's 512x512 network is fmap_base=8192, fmap_max=512.
    """

    latent_dim: int = 512
    max_resolution: int = 512
    fmap_base: int = 8192
    fmap_max: int = 512
    channels: int = 3
    mbstd_group_size: int = 4

    def __post_init__(self):
        r = self.max_resolution
        if not (isinstance(r, int) and 4 <= r <= 1024 and r & (r - 1) == 0):
            raise ValueError(f"max_resolution must be a power of two in [4, 1024], got {r!r}")
        for name in ("latent_dim", "fmap_base", "fmap_max", "channels", "mbstd_group_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")

    @classmethod
    def tiny(cls, max_resolution: int = 16, latent_dim: int = 16, width: int = 16):
        """A narrow network for CPU tests and smoke runs: `width` channels up to 16x16, halving
        per level above (fmap_base = 8 * width, fmap_max = width)."""
        return cls(latent_dim=latent_dim, max_resolution=max_resolution,
                   fmap_base=8 * width, fmap_max=width)

    @property
    def max_level(self) -> int:
        return int(math.log2(self.max_resolution))

    def num_features(self, stage: int) -> int:
        """Karras et al.'s nf(stage); stage = log2(resolution) - 1."""
        return int(min(self.fmap_base // (2 ** max(stage, 0)), self.fmap_max))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_level(self, level: int) -> int:
        if not (isinstance(level, int) and 2 <= level <= self.max_level):
            raise ValueError(f"level must be an int in [2, {self.max_level}] "
                             f"(log2 of the resolution), got {level!r}")
        return level


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def pixel_norm(x, eps=1e-8):
    """Karras et al. Eq. in Sec. 4.2: b = a / sqrt(mean_j a_j^2 + eps) over the channel axis."""
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def leaky_relu(x):
    return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def leaky_relu_pixel_norm(z, eps=1e-8):
    """pixel_norm(leaky_relu(z)), the generator's activation after every convolution.

    Its gradient is written out so that the only residuals are the output y and the per-pixel
    scale r = 1/sqrt(mean a² + eps) (y is the next layer's input, stored anyway); automatic
    differentiation of the composition keeps more full-size arrays per layer for G's backward
    pass to read back (the activation before normalisation, the sign mask).
    """
    return pixel_norm(leaky_relu(z), eps)


def _leaky_relu_pixel_norm_fwd(z, eps):
    a = leaky_relu(z)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(a), axis=-1, keepdims=True) + eps)
    y = a * r
    return y, (y, r)


def _leaky_relu_pixel_norm_bwd(eps, residuals, dy):
    del eps
    y, r = residuals
    # d(a·r)/da = r·(dy − y·mean(dy·y)); sign(y) = sign(z) because r > 0
    da = r * (dy - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    return (jnp.where(y >= 0, da, LEAKY_SLOPE * da),)


leaky_relu_pixel_norm.defvjp(_leaky_relu_pixel_norm_fwd, _leaky_relu_pixel_norm_bwd)


def upsample2x(x):
    """Nearest-neighbour 2x upsampling of (..., H, W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def downsample2x(x):
    """2x2 average pooling of (..., H, W, C) (H, W even)."""
    *lead, h, w, c = x.shape
    return x.reshape(*lead, h // 2, 2, w // 2, 2, c).mean(axis=(-4, -2))


def resize_to_level(x, level):
    """Average-pool (..., H, W, C) down to 2^level pixels per side (the reals of each phase)."""
    target = 2 ** level
    while x.shape[-2] > target:
        x = downsample2x(x)
    if x.shape[-2] != target:
        raise ValueError(f"cannot resize {x.shape[-3:-1]} to {target}x{target}")
    return x


def minibatch_stddev(x, group_size=4):
    """Karras et al. Sec. 3: append the mean over features of the per-group standard deviation.

    The group size is the largest divisor of the batch that does not exceed `group_size`
    (Karras et al. require divisibility; this keeps any batch size legal).
    """
    n, h, w, _ = x.shape
    g = max(d for d in range(1, min(group_size, n) + 1) if n % d == 0)
    y = x.reshape(g, n // g, h, w, -1).astype(jnp.result_type(x.dtype, jnp.float32))
    y = y - jnp.mean(y, axis=0, keepdims=True)
    y = jnp.sqrt(jnp.mean(jnp.square(y), axis=0) + 1e-8)  # (n/g, h, w, c)
    y = jnp.mean(y, axis=(1, 2, 3))  # (n/g,)
    y = jnp.tile(y, (g,))[:, None, None, None]  # sample i belongs to group i mod n/g
    return jnp.concatenate([x, jnp.broadcast_to(y, (n, h, w, 1)).astype(x.dtype)], axis=-1)


class EqualizedDense(nn.Module):
    """Dense layer with equalised learning rate (weights N(0,1), scaled by gain/sqrt(fan_in))."""

    features: int
    gain: float = math.sqrt(2.0)

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        w = self.param("kernel", nn.initializers.normal(1.0), (fan_in, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return x @ (w * (self.gain / math.sqrt(fan_in))) + b


# Which of a 3x3 kernel's taps (along one axis) reach each output phase of a 2x nearest
# upsampling, as two taps over the low-resolution input: even outputs 2i see input rows
# (i-1, i, i) through taps (0, 1, 2), odd outputs 2i+1 see rows (i, i, i+1).
_UPSAMPLE_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],
                                 [[1, 1, 0], [0, 0, 1]]], np.float32)  # (phase, tap, 3x3 tap)


def upsample2x_conv3x3(x, w):
    """conv3x3_SAME(upsample2x(x), w) computed at x's resolution: (N, H, W, Ci) -> (N, 2H, 2W, Co).

    Each of the four output phases is a 2x2 convolution of x with sums of w's taps (the function
    Karras et al.'s code computes as a transposed convolution, `upscale2d_conv2d` with
    fused_scale), so it takes 16 instead of 36 multiply-adds
    per output value and never stores the upsampled input. The four phases are one
    convolution with 4·Co output channels over x padded by one pixel; phase (a, b) of output
    pixel (i, j) is that convolution's pixel (i + a, j + b).
    """
    n, h, wd, _ = x.shape
    co = w.shape[-1]
    m = jnp.asarray(_UPSAMPLE_PHASE_TAPS, w.dtype)
    w_phases = jnp.einsum("atu,bsv,uvio->tsiabo", m, m, w).reshape(2, 2, w.shape[2], 4 * co)
    y = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), w_phases, window_strides=(1, 1),
        padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(n, h + 1, wd + 1, 2, 2, co)
    rows = jnp.stack([y[:, a:a + h, :, a] for a in (0, 1)], axis=2)  # (n, h, 2, w+1, 2, co)
    out = jnp.stack([rows[:, :, :, b:b + wd, b] for b in (0, 1)], axis=4)  # (n, h, 2, w, 2, co)
    return out.reshape(n, 2 * h, 2 * wd, co)


class EqualizedConv(nn.Module):
    """k x k convolution (NHWC, 'SAME' padding) with equalised learning rate.

    upsample=True: the convolution of the 2x nearest-upsampled input (ProGAN's upsample-conv),
    same parameters, computed without upsampling (`upsample2x_conv3x3`; 3x3 kernels only).
    """

    features: int
    kernel_size: int = 3
    gain: float = math.sqrt(2.0)
    upsample: bool = False

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        fan_in = k * k * cin
        w = self.param("kernel", nn.initializers.normal(1.0), (k, k, cin, self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        w = w * (self.gain / math.sqrt(fan_in))
        if self.upsample:
            if k != 3:
                raise ValueError(f"upsample=True needs a 3x3 kernel, got kernel_size={k}")
            return upsample2x_conv3x3(x, w) + b
        y = jax.lax.conv_general_dilated(
            x, w, window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + b


# ----------------------------------------------------------------------------------------------
# Generator and discriminator
# ----------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """G(z) at resolution 2^level; output is linear RGB, nominally in [-1, 1] (data scaling).

    Call with z (N, latent_dim), a static int `level` in [2, max_level] and `alpha` in [0, 1]:
    alpha = 1 uses only the top block; alpha < 1 blends it with the upsampled to-RGB of
    the previous level (Karras et al. Fig. 2). `init_all=True` runs every block and to-RGB layer
    so that `init` creates the whole tree (see `init_generator`).
    """

    config: ProGANConfig

    def setup(self):
        cfg, nf = self.config, self.config.num_features
        # 4x4 block: the latent is a 1x1 feature map; Karras' code uses a dense layer with
        # gain sqrt(2)/4 to reach 4x4 ("conv 4x4" on a 1x1 input in their Table 2).
        self.block_4_dense = EqualizedDense(16 * nf(1), gain=math.sqrt(2.0) / 4)
        self.block_4_conv = EqualizedConv(nf(1))
        self.blocks = {str(2 ** r): (EqualizedConv(nf(r - 1), upsample=True),
                                     EqualizedConv(nf(r - 1)))
                       for r in range(3, cfg.max_level + 1)}
        self.to_rgb = {str(2 ** r): EqualizedConv(cfg.channels, 1, gain=1.0)
                       for r in range(2, cfg.max_level + 1)}

    def _rgb(self, r, x):
        return self.to_rgb[str(2 ** r)](x)

    def __call__(self, z, level: int, alpha=1.0, init_all: bool = False):
        cfg = self.config
        level = cfg.check_level(level)
        top = cfg.max_level if init_all else level
        z = jnp.asarray(z)  # floating z keeps its width (bfloat16 under mixed precision)
        x = pixel_norm(z if jnp.issubdtype(z.dtype, jnp.floating) else z.astype(jnp.float32))
        x = leaky_relu_pixel_norm(self.block_4_dense(x).reshape(-1, 4, 4, cfg.num_features(1)))
        x = leaky_relu_pixel_norm(self.block_4_conv(x))
        features = {2: x}
        for r in range(3, top + 1):
            c0, c1 = self.blocks[str(2 ** r)]
            x = leaky_relu_pixel_norm(c0(x))  # c0 convolves the 2x-upsampled x
            x = leaky_relu_pixel_norm(c1(x))
            features[r] = x
        if init_all:
            for r in range(2, top + 1):
                self._rgb(r, features[r])
        rgb = self._rgb(level, features[level])
        if level == 2:
            return rgb
        # Fade-in (Karras et al. Fig. 2b): lerp from the previous level's image, upsampled.
        old = upsample2x(self._rgb(level - 1, features[level - 1]))
        return old + jnp.asarray(alpha, rgb.dtype) * (rgb - old)


class Discriminator(nn.Module):
    """D(x) for images (N, 2^level, 2^level, C) in [-1, 1]; returns (N,) critic scores."""

    config: ProGANConfig

    def setup(self):
        cfg, nf = self.config, self.config.num_features
        self.from_rgb = {str(2 ** r): EqualizedConv(nf(r - 1), 1)
                         for r in range(2, cfg.max_level + 1)}
        self.blocks = {str(2 ** r): (EqualizedConv(nf(r - 1)), EqualizedConv(nf(r - 2)))
                       for r in range(3, cfg.max_level + 1)}
        self.block_4_conv = EqualizedConv(nf(1))
        self.block_4_dense0 = EqualizedDense(nf(0))
        self.block_4_dense1 = EqualizedDense(1, gain=1.0)

    def _from_rgb(self, r, img):
        return leaky_relu(self.from_rgb[str(2 ** r)](img))

    def _block(self, r, x):
        c0, c1 = self.blocks[str(2 ** r)]
        return downsample2x(leaky_relu(c1(leaky_relu(c0(x)))))

    def __call__(self, img, level: int, alpha=1.0, init_all: bool = False):
        cfg = self.config
        level = cfg.check_level(level)
        if img.shape[-3:] != (2 ** level, 2 ** level, cfg.channels):
            raise ValueError(f"discriminator at level {level} expects images (N, {2 ** level}, "
                             f"{2 ** level}, {cfg.channels}), got {img.shape}")
        img = jnp.asarray(img, jnp.result_type(img.dtype, jnp.float32))  # f64 stays f64 (tests)
        if init_all:
            # Create every resolution's parameters (dummy inputs; outputs discarded).
            for r in range(cfg.max_level, 2, -1):
                self._block(r, self._from_rgb(r, jnp.zeros((1, 2 ** r, 2 ** r, cfg.channels))))
            self._from_rgb(2, jnp.zeros((1, 4, 4, cfg.channels)))
        x = self._from_rgb(level, img)
        if level > 2:
            x = self._block(level, x)
            # Fade-in: the previous level's from-RGB on the 2x-downsampled image.
            old = self._from_rgb(level - 1, downsample2x(img))
            x = old + jnp.asarray(alpha, x.dtype) * (x - old)
        for r in range(level - 1, 2, -1):
            x = self._block(r, x)
        x = minibatch_stddev(x, cfg.mbstd_group_size)
        x = leaky_relu(self.block_4_conv(x))
        x = leaky_relu(self.block_4_dense0(x.reshape(x.shape[0], -1)))
        return self.block_4_dense1(x)[:, 0]


def _init_by_path(key, shapes):
    """Equalised-LR init of a shape tree: kernels N(0, 1), biases 0, seeded by the leaf's path.

    Seeding each leaf with (key, hash of its path) gives a layer the same values whatever the
    rest of the tree is, so networks for different max resolutions share their common layers.
    Drawn with numpy on the host: compiling threefry for every layer costs seconds on CPU, and
    initialisation never needs to be traced.
    """
    entropy = [int(v) for v in np.asarray(jax.random.key_data(key)).reshape(-1)]

    def leaf(path, shape):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name.endswith("bias"):
            return jnp.zeros(shape.shape, shape.dtype)
        rng = np.random.default_rng(entropy + [zlib.crc32(name.encode())])
        return jnp.asarray(rng.standard_normal(shape.shape, np.float32), shape.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def init_generator(key, config: ProGANConfig):
    """Parameters of G for every level up to config.max_resolution."""
    z = jnp.zeros((1, config.latent_dim), jnp.float32)
    shapes = jax.eval_shape(lambda: Generator(config).init(
        jax.random.key(0), z, config.max_level, 1.0, init_all=True)["params"])
    return _init_by_path(key, shapes)


def init_discriminator(key, config: ProGANConfig):
    """Parameters of D for every level up to config.max_resolution."""
    r = config.max_resolution
    x = jnp.zeros((2, r, r, config.channels), jnp.float32)
    shapes = jax.eval_shape(lambda: Discriminator(config).init(
        jax.random.key(0), x, config.max_level, 1.0, init_all=True)["params"])
    return _init_by_path(key, shapes)


def generator_apply(params, config: ProGANConfig, z, level: int, alpha=1.0):
    """G(z) (N, 2^level, 2^level, C) in the data range [-1, 1] (not clipped)."""
    return Generator(config).apply({"params": params}, z, level, alpha)


def discriminator_apply(params, config: ProGANConfig, images, level: int, alpha=1.0):
    """D(images) -> (N,) critic scores."""
    return Discriminator(config).apply({"params": params}, images, level, alpha)


def grow_params(new_tree: Any, old_tree: Any):
    """Overlay a trained (smaller) tree onto a freshly initialised larger one, by key path.

    Works for any nested dict of arrays (parameters, EMA, optimiser moments in state-dict form):
    leaves the old tree has keep their values; leaves only the new tree has keep their init.
    """
    if isinstance(new_tree, dict):
        if not isinstance(old_tree, dict):
            raise ValueError("grow_params: tree structures differ (dict vs leaf)")
        return {k: grow_params(v, old_tree[k]) if k in old_tree else v for k, v in new_tree.items()}
    if hasattr(new_tree, "shape") and hasattr(old_tree, "shape") and new_tree.shape != old_tree.shape:
        raise ValueError(f"grow_params: leaf shape changed {old_tree.shape} -> {new_tree.shape}; "
                         "channel widths (fmap_base/fmap_max/latent_dim) must match")
    return old_tree


# ----------------------------------------------------------------------------------------------
# WGAN-GP with drift (Karras et al. Sec. A.1; Gulrajani et al. 2017)
# ----------------------------------------------------------------------------------------------


def gradient_penalty(critic, mixed):
    """E[(||grad_x critic(x)||_2 - 1)^2] at the interpolates `mixed` (N, ...), per-sample norms.

    `critic` maps a batch (N, ...) to scores (N,); the gradient is that of sum(critic(x)), as in
    the reference implementations (with minibatch-stddev, samples interact through the batch).
    Returns (penalty, per-sample gradient norms).
    """
    grads = jax.grad(lambda x: jnp.sum(critic(x)))(mixed)
    norms = jnp.sqrt(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))) + 1e-12)
    return jnp.mean(jnp.square(norms - 1.0)), norms


def wgan_gp_discriminator_loss(critic, reals, fakes, key, lambda_gp=LAMBDA_GP,
                               eps_drift=EPS_DRIFT):
    """L_D = E[D(fake)] - E[D(real)] + lambda_gp * GP + eps_drift * E[D(real)^2].

    Returns (loss, metrics dict).
    """
    d_real = critic(reals)
    d_fake = critic(fakes)
    eps = jax.random.uniform(key, (reals.shape[0],) + (1,) * (reals.ndim - 1), reals.dtype)
    mixed = reals + eps * (fakes - reals)
    gp, _ = gradient_penalty(critic, mixed)
    wdist = jnp.mean(d_real) - jnp.mean(d_fake)
    drift = jnp.mean(jnp.square(d_real))
    loss = -wdist + lambda_gp * gp + eps_drift * drift
    return loss, {"d_loss": loss, "wdist": wdist, "gp": gp, "drift": drift}


def wgan_generator_loss(critic, fakes):
    """L_G = -E[D(G(z))]."""
    return -jnp.mean(critic(fakes))
