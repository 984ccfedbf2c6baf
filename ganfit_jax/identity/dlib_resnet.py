"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1`) as a Flax module.

The network is the `anet_type` of dlib's examples/dnn_face_recognition_ex.cpp: a 29-convolution
ResNet on 150×150 RGB chips giving a 128-d descriptor (99.38% on LFW). Batch norm was folded into
per-channel `affine_` layers before release. Two details of dlib's layers matter for parity:

- stride-2 convolutions and all pooling have zero padding (dlib's default when stride ≠ 1), so the
  residual branch of a down-sampling block can be one pixel smaller than the 2×2 average-pooled
  shortcut (at 150×150: 3×3 vs 4×4 in stage 4, 1×1 vs 2×2 in stage 5);
- `add_prev` adds tensors of different shapes by zero-padding both to the larger one, anchored at
  the top-left (and likewise along channels when the block widens).

The pixels enter as dlib's `input_rgb_image_sized<150>` builds them: (value·255 − mean_c) / 256.
"""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ganfit_jax.identity import dlib_format
from ganfit_jax.stored import stored

# dlib's released model: (width, blocks, first block down-samples) per stage, in forward order
# (dlib's alevel4 ... alevel0).
DLIB_STAGES = ((32, 3, False), (64, 4, True), (128, 3, True), (256, 3, True), (256, 1, True))
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_INPUT_SIZE = 150


def pad_add(a, b):
    """dlib's tt::add for tensors of different shape: zero-pad both to the larger, top-left anchored."""
    shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))

    def grow(t):
        return jnp.pad(t, [(0, s - n) for n, s in zip(t.shape, shape)])

    return grow(a) + grow(b)


def _pool_taps(x, window, stride, out_h, out_w):
    """The window² strided slices of (..., H, W, C) whose elementwise maximum is the pooled map."""
    return [x[..., i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(window) for j in range(window)]


def _max_pool_forward(x, window, stride):
    h, w = x.shape[-3], x.shape[-2]
    taps = _pool_taps(x, window, stride, (h - window) // stride + 1, (w - window) // stride + 1)
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool_valid(x, window, stride):
    """Max pooling without padding over (..., H, W, C), as the maximum of window² strided slices.

    Equal to `nn.max_pool(..., padding="VALID")`, forward and backward (the gradient goes to the
    first maximal tap of each window). Hand-written for the CPU, where both autodiff forms are
    slow: the select-and-scatter of a reduce-window, and the slices' gradient, which pads every
    tap back to the full input size. Here each tap's gradient lands in one of stride² phase
    planes (input rows ≡ r, columns ≡ c mod stride), which are interleaved once."""
    return _max_pool_forward(x, window, stride)


def _max_pool_fwd(x, window, stride):
    out = _max_pool_forward(x, window, stride)
    return out, (x, out)


def _max_pool_bwd(window, stride, residuals, g):
    x, out = residuals
    h, w, channels = x.shape[-3:]
    out_h, out_w = out.shape[-3], out.shape[-2]
    phase_h, phase_w = -(-h // stride), -(-w // stride)
    lead = [(0, 0)] * (x.ndim - 3)
    taken = jnp.zeros(out.shape, bool)
    phases = {}
    for k, tap in enumerate(_pool_taps(x, window, stride, out_h, out_w)):
        i, j = divmod(k, window)
        first = (tap == out) & ~taken
        taken = taken | first
        # input row stride·oy + i is row oy + i // stride of phase i % stride
        di, dj = i // stride, j // stride
        part = jnp.pad(jnp.where(first, g, 0.0),
                       lead + [(di, phase_h - out_h - di), (dj, phase_w - out_w - dj), (0, 0)])
        key = (i % stride, j % stride)
        phases[key] = part if key not in phases else phases[key] + part
    zero = jnp.zeros(x.shape[:-3] + (phase_h, phase_w, channels), g.dtype)
    rows = [jnp.stack([phases.get((r, c), zero) for c in range(stride)], axis=-2)
            for r in range(stride)]
    full = jnp.stack(rows, axis=-4).reshape(
        x.shape[:-3] + (phase_h * stride, phase_w * stride, channels))
    return (full[..., :h, :w, :].astype(x.dtype),)


max_pool_valid.defvjp(_max_pool_fwd, _max_pool_bwd)


def _im2col(x, k):
    """(N,H,W,C) → (N·OH·OW, k²·C): each output pixel's k×k window, taps in (i, j, c) order."""
    n, h, w, c = x.shape
    oh, ow = h - k + 1, w - k + 1
    cols = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(k) for j in range(k)], -1)
    return cols.reshape(n * oh * ow, k * k * c)


@jax.custom_vjp
def conv_valid(x, kernel):
    """Stride-1 convolution without padding, (N,H,W,C) ⊛ (k,k,C,F) → (N,H−k+1,W−k+1,F).

    The forward pass is XLA's convolution; the backward pass is written as matrix products: the
    input gradient as (g · Wᵀ) summed back over the k² window taps (col2im), the kernel gradient
    as im2col(x)ᵀ · g. For the dlib stem (12 input channels) XLA:CPU's own input gradient, a
    convolution with 12 output channels, ran at ~40 GFLOP/s; this form took the stem's forward +
    backward from 2.55 to 1.86 ms on one core of the 2-core dev machine."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_valid_fwd(x, kernel):
    return conv_valid(x, kernel), (x, kernel)


def _conv_valid_bwd(residuals, g):
    x, kernel = residuals
    k, _, c, f = kernel.shape
    n, oh, ow, _ = g.shape
    g2 = g.reshape(n * oh * ow, f)
    window = (g2 @ kernel.reshape(k * k * c, f).T).reshape(n, oh, ow, k * k, c)
    dx = sum(jnp.pad(window[:, :, :, i * k + j], ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
             for i in range(k) for j in range(k))
    # Stored once: otherwise the sum of the k² taps is re-summed inside each of its consumers'
    # fusions (the chip's space-to-depth inverse and the alignment's bilinear scatter). Two views
    # of the cpu-small step on one core: 72.0 → 69.3 ms; the step on two threads 50.9 → 49.6 ms.
    dx = stored(dx, axis=-1)
    # unused (the weights are constants while fitting) and then removed by XLA
    dkernel = (_im2col(x, k).T @ g2).reshape(kernel.shape)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv_valid.defvjp(_conv_valid_fwd, _conv_valid_bwd)


class Affine(nn.Module):
    """Per-channel scale and shift (dlib's `affine_`, batch norm folded at inference)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return x * scale + bias


class _Conv(nn.Module):
    """A k×k, stride-s convolution layer with nn.Conv's parameters."""

    features: int
    kernel_size: int
    stride: int

    def conv_params(self, in_features):
        """(kernel (k,k,Cin,Cout), bias (Cout,)), initialised as nn.Conv's."""
        k = self.kernel_size
        return (self.param("kernel", nn.initializers.lecun_normal(),
                           (k, k, in_features, self.features)),
                self.param("bias", nn.initializers.zeros, (self.features,)))


class SpaceToDepthConv(_Conv):
    """A stride-s convolution without padding, computed as a stride-1 convolution over s×s
    space-to-depth blocks (input channels × s²; kernel zero-padded to a multiple of s).

    Same parameters (`kernel` (k,k,Cin,Cout), `bias`) and same result as `nn.Conv(...,
    strides=s, padding=0)`. For dlib's stem (7×7, stride 2, 3 input channels) XLA:CPU's direct
    convolution ran at ~20 GFLOP/s; over 12-channel blocks it measured ~2.5× faster forward
    (2-core dev machine)."""

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        n, h, w, c = x.shape
        kernel, bias = self.conv_params(c)
        out_h, out_w = (h - k) // s + 1, (w - k) // s + 1
        taps = -(-k // s)  # kernel taps per block axis
        bh, bw = max(-(-h // s), out_h + taps - 1), max(-(-w // s), out_w + taps - 1)
        x = jnp.pad(x, ((0, 0), (0, bh * s - h), (0, bw * s - w), (0, 0)))
        # block (Y, X) holds pixels (sY + a, sX + b); its channels are ordered (a, b, c)
        blocks = x.reshape(n, bh, s, bw, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(
            n, bh, bw, s * s * c)
        pad = taps * s - k
        kernel = jnp.pad(kernel, ((0, pad), (0, pad), (0, 0), (0, 0)))
        kernel = kernel.reshape(taps, s, taps, s, c, self.features).transpose(
            0, 2, 1, 3, 4, 5).reshape(taps, taps, s * s * c, self.features)
        y = conv_valid(blocks, kernel.astype(x.dtype))
        return y[:, :out_h, :out_w] + bias.astype(y.dtype)


class DlibConv(_Conv):
    """dlib's `con_`: a k×k convolution padded by k//2 at stride 1 and not at all otherwise (dlib's
    default), with nn.Conv's parameters (`kernel` (k,k,Cin,Cout), `bias`).

    A convolution whose output is one pixel (stage 5 at 150×150: 3×3, stride 2 over 4×4) is one
    matrix-vector product over the window: XLA:CPU's convolution took ~0.3 ms forward and its
    input gradient ~0.6 ms there (2-core dev machine), a product of 2.4 MB of weights ~0.1 ms;
    over the kernel taps that meet real input only (the next 3×3 convolution, over a 1×1 map,
    reads only its centre tap)."""

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel_size, self.stride
        n, h, w, c = x.shape
        kernel, bias = self.conv_params(c)
        dtype = jnp.promote_types(x.dtype, kernel.dtype)  # as nn.Conv
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        pad = 0 if s != 1 else k // 2
        if (h + 2 * pad - k) // s == 0 and (w + 2 * pad - k) // s == 0:
            # only the taps over real input: stage 5's second convolution (3×3 over a 1×1 map
            # padded by 1) reads its centre tap, 1/9 of the kernel's 2.4 MB
            rows, cols = min(h, k - pad), min(w, k - pad)
            window = x[:, :rows, :cols, :].reshape(n, rows * cols * c)
            taps = kernel[pad:pad + rows, pad:pad + cols].reshape(rows * cols * c, self.features)
            y = (window @ taps)[:, None, None, :]
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), [(pad, pad), (pad, pad)],
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(y.dtype)


class DlibResidualBlock(nn.Module):
    """dlib's `ares` (identity shortcut) or `ares_down` (2×2 average-pooled shortcut, stride-2 branch)."""

    features: int
    downsample: bool

    @nn.compact
    def __call__(self, x):
        stride = 2 if self.downsample else 1
        y = DlibConv(self.features, 3, stride, name="conv1")(x)
        y = nn.relu(Affine(name="affine1")(y))
        y = DlibConv(self.features, 3, 1, name="conv2")(y)
        y = Affine(name="affine2")(y)
        shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID") if self.downsample else x
        return nn.relu(pad_add(y, shortcut))


class DlibResNet(nn.Module):
    """Maps a batch of [0,1] RGB chips (B, 150, 150, 3) to (descriptors (B, 128), feature maps).

    Feature maps are named 'stem' (after the max pool) and 'stage1' ... 'stage5' (dlib's alevel4 ...
    alevel0), plus 'pooled' (the global average before the final projection).
    """

    stages: tuple = DLIB_STAGES
    stem_features: int = 32
    embedding_size: int = 128
    mean_rgb: tuple = DLIB_MEAN_RGB

    @nn.compact
    def __call__(self, images):
        x = (images * 255.0 - jnp.asarray(self.mean_rgb, images.dtype)) / 256.0
        features = {}
        x = SpaceToDepthConv(self.stem_features, 7, 2, name="conv0")(x)
        x = nn.relu(Affine(name="affine0")(x))
        x = max_pool_valid(x, 3, 2)
        features["stem"] = x
        for s, (width, blocks, down) in enumerate(self.stages):
            for b in range(blocks):
                x = DlibResidualBlock(width, down and b == 0, name=f"stage{s + 1}_block{b}")(x)
            features[f"stage{s + 1}"] = x
        x = jnp.mean(x, axis=(1, 2))
        features["pooled"] = x
        embedding = nn.Dense(self.embedding_size, use_bias=False, name="fc")(x)
        return embedding, features


def _expect(layer, kind, path, where):
    if layer.kind != kind:
        raise dlib_format.DlibFormatError(
            f"{path}: layer {where} is {layer.kind!r}, expected {kind!r} for the "
            f"dlib_face_recognition_resnet_model_v1 architecture {DLIB_STAGES}")


def _conv_params(layer, path, where, features, kernel, stride):
    _expect(layer, "con_4", path, where)
    f = layer.fields
    if (f["num_filters"], f["nr"], f["nc"], f["stride_y"], f["stride_x"]) != (
            features, kernel, kernel, stride, stride):
        raise dlib_format.DlibFormatError(
            f"{path}: convolution {where} is {f['num_filters']}×{f['nr']}×{f['nc']} stride "
            f"{f['stride_y']}, expected {features}×{kernel}×{kernel} stride {stride}")
    expected_pad = 0 if stride != 1 else kernel // 2
    if (f["padding_y"], f["padding_x"]) != (expected_pad, expected_pad):
        raise dlib_format.DlibFormatError(f"{path}: convolution {where} has padding "
                                          f"{(f['padding_y'], f['padding_x'])}, expected {expected_pad}")
    flat = f["params"].reshape(-1)
    n = int(np.prod(f["filters"]))
    filters = flat[:n].reshape(f["filters"])  # (out, in, kh, kw), cross-correlation as in cuDNN
    return {"kernel": np.transpose(filters, (2, 3, 1, 0)), "bias": flat[n:n + features].copy()}


def _affine_params(layer, path, where):
    _expect(layer, "affine_", path, where)
    flat = layer.fields["params"].reshape(-1)
    c = flat.size // 2
    return {"scale": flat[:c].copy(), "bias": flat[c:].copy()}


def load_dlib_resnet_params(path):
    """Read `dlib_face_recognition_resnet_model_v1.dat` into DlibResNet's Flax params (numpy arrays).

    Raises FileNotFoundError / DlibFormatError (a ValueError) naming the file and what was expected.
    """
    loss, inp, layers = dlib_format.read_dlib_network(path)
    if (inp["nr"], inp["nc"]) != (DLIB_INPUT_SIZE, DLIB_INPUT_SIZE):
        raise dlib_format.DlibFormatError(f"{path}: input is {inp['nr']}×{inp['nc']}, expected 150×150")
    if not np.allclose(inp["mean_rgb"], DLIB_MEAN_RGB, atol=1e-3):
        raise dlib_format.DlibFormatError(f"{path}: input mean {inp['mean_rgb']}, expected {DLIB_MEAN_RGB}")
    it = iter(enumerate(layers))

    def take():
        try:
            return next(it)
        except StopIteration:
            raise dlib_format.DlibFormatError(f"{path}: too few layers ({len(layers)})") from None

    params = {}
    i, layer = take()
    params["conv0"] = _conv_params(layer, path, i, 32, 7, 2)
    i, layer = take()
    params["affine0"] = _affine_params(layer, path, i)
    for kind in ("relu_", "max_pool_2"):
        i, layer = take()
        _expect(layer, kind, path, i)
    for s, (width, blocks, down) in enumerate(DLIB_STAGES):
        for b in range(blocks):
            block = {}
            stride = 2 if (down and b == 0) else 1
            i, layer = take()
            block["conv1"] = _conv_params(layer, path, i, width, 3, stride)
            i, layer = take()
            block["affine1"] = _affine_params(layer, path, i)
            i, layer = take()
            _expect(layer, "relu_", path, i)
            i, layer = take()
            block["conv2"] = _conv_params(layer, path, i, width, 3, 1)
            i, layer = take()
            block["affine2"] = _affine_params(layer, path, i)
            tail = (["avg_pool_2"] if stride == 2 else []) + ["add_prev_", "relu_"]
            for kind in tail:
                i, layer = take()
                _expect(layer, kind, path, i)
            params[f"stage{s + 1}_block{b}"] = block
    i, layer = take()
    _expect(layer, "avg_pool_2", path, i)
    i, layer = take()
    _expect(layer, "fc_2", path, i)
    f = layer.fields
    if (f["num_inputs"], f["num_outputs"], f["bias_mode"]) != (256, 128, 1):
        raise dlib_format.DlibFormatError(f"{path}: final fc is {f['num_inputs']}→{f['num_outputs']} "
                                          f"bias_mode {f['bias_mode']}, expected 256→128 without bias")
    params["fc"] = {"kernel": f["params"].reshape(256, 128).copy()}  # dlib computes x · W, W (in, out)
    if next(it, None) is not None:
        raise dlib_format.DlibFormatError(f"{path}: more layers than the architecture has")
    return params
