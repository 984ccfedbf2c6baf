"""Identity networks F for GANFIT's identity and content losses (paper, Eqs. 8–9).

One interface whichever network is configured:

    net = load_identity('dlib')                     # default: installs with pip, no downloads
    net = load_identity('arcface-r50', weights='checkpoints/arcface_r50.msgpack')  # or .pth / .onnx
    net = load_identity('tiny', key=jax.random.key(0))   # random, small: for tests of other parts
    crop = align(net, image, landmarks68)           # differentiable in image and landmarks
    embedding, features = embed(net, crop)          # (D,), {layer name: (h, w, c)}

`IdentityNet` is a pytree (its variables are leaves; module, input size and alignment are static),
so it can be passed through jit/vmap/grad. `embed` takes one aligned image (H, W, 3) in [0, 1] (vmap
it for batches) or a batch (B, H, W, 3).

Feature names: 'stem', 'stage1' … 'stage4' (ArcFace; 112×112 input, 512-d embedding), 'stem',
'stage1' … 'stage5' and 'pooled' (dlib; 150×150 input, 128-d). The losses should normalise the
embedding themselves (cosine similarity): dlib's descriptors are not unit length (|e| ≈ 1.4).
"""

import os
import pathlib
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ganfit_jax import precision
from ganfit_jax.identity import alignment as _align
from ganfit_jax.identity import arcface, dlib_resnet
from ganfit_jax.identity import weights as _weights

DEFAULT_NAME = "dlib"


@flax.struct.dataclass
class IdentityNet:
    """A face-recognition network with its weights and the alignment it was trained with."""

    variables: Any
    module: nn.Module = flax.struct.field(pytree_node=False)
    input_size: int = flax.struct.field(pytree_node=False)
    alignment: str = flax.struct.field(pytree_node=False)  # 'dlib' or 'arcface'
    name: str = flax.struct.field(pytree_node=False)
    # 'bfloat16': F runs at tensor-core rate on GPU/TPU (ganfit_jax.precision); outputs float32
    compute_dtype: str = flax.struct.field(pytree_node=False, default="float32")


def embed(net, aligned_image):
    """F(I): (embedding (D,), {name: feature map}) of an aligned image, or batched with a leading B."""
    single = aligned_image.ndim == 3
    images = aligned_image[None] if single else aligned_image
    if images.shape[1:3] != (net.input_size, net.input_size):
        raise ValueError(f"{net.name} expects {net.input_size}×{net.input_size} aligned images, got "
                         f"{images.shape[1:3]}; use align(net, image, landmarks) first")
    if precision.check_compute_dtype(net.compute_dtype) != "float32":
        variables, images = precision.cast_floating((net.variables, images), net.compute_dtype)
        embedding, features = precision.cast_floating(net.module.apply(variables, images),
                                                      jnp.float32)
    else:
        embedding, features = net.module.apply(net.variables, images)
    if single:
        embedding = embedding[0]
        features = {k: v[0] for k, v in features.items()}
    return embedding, features


def align(net, image, landmarks, supersample=1):
    """Crop `image` (H, W, 3) to the network's template using 68 landmarks (differentiably).

    supersample (static int): k×k samples per output pixel against aliasing when the face in
    `image` is much larger than the crop (see alignment.warp_affine).
    """
    return _align.align(image, landmarks, net.alignment, net.input_size, supersample)


def cosine_similarity(a, b, eps=1e-8):
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def default_dlib_weights():
    """face_recognition_models' copy of dlib's face recognition ResNet (dlib_face_recognition_
    resnet_model_v1.dat), the identity network's default weights."""
    from ganfit_jax import landmarks

    return landmarks.dlib_model_file(landmarks.FACE_RECOGNITION_RESNET,
                                     "dlib's identity network without a weights file given")


def _tiny_module():
    return dlib_resnet.DlibResNet(stages=((8, 1, False), (16, 1, True)), stem_features=8,
                                  embedding_size=32)


def _random_variables(module, key, input_size):
    """He-normal kernels, unit scales, zero shifts, drawn with numpy from `key`.

    (flax's jitted `init` of even the tiny net takes ~10 s to compile on a 2-core CPU; this is
    instant and just as random for tests.)
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, input_size, input_size, 3)))
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            # made by numpy and copied: jnp.asarray, jnp.ones and jnp.zeros would each compile
            # a program for every leaf's shape
            return jax.device_put((rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in))
                                  .astype(leaf.dtype))
        if name.endswith("['scale']") or name.endswith("['var']"):  # BN running variance: 1
            return jax.device_put(np.ones(leaf.shape, leaf.dtype))
        return jax.device_put(np.zeros(leaf.shape, leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def load_identity(name=DEFAULT_NAME, weights=None, key=None):
    """Build an IdentityNet.

    name: 'dlib' (weights: dlib's .dat, default the one in face_recognition_models, or a .msgpack);
      'arcface' (= 'arcface-r50'), 'arcface-r18' | -r34 | -r50 | -r100 | -mbf (weights required:
      arcface_torch .pth, insightface .onnx, or a .msgpack from experiments/convert_identity.py;
      or no weights and a `key`: untrained He-normal weights, for benchmarks);
      'tiny' (random weights from `key`; a 2-stage dlib-style net on 112×112 ArcFace crops, 32-d).
    """
    if name == "dlib":
        path = pathlib.Path(weights or default_dlib_weights())
        if path.suffix.lower() in (".msgpack", ".flax"):
            variables = _weights.load_variables(path, dlib_resnet.DlibResNet(), dlib_resnet.DLIB_INPUT_SIZE)
        else:
            variables = {"params": dlib_resnet.load_dlib_resnet_params(path)}
        variables = jax.device_put(variables)  # jnp.asarray: a program per leaf's shape
        return IdentityNet(variables, dlib_resnet.DlibResNet(), dlib_resnet.DLIB_INPUT_SIZE, "dlib", name)
    if name == "tiny":
        if key is None and weights is not None and not isinstance(weights, (str, os.PathLike)):
            key, weights = weights, None  # load_identity('tiny', key)
        if key is None:
            raise ValueError("load_identity('tiny') needs a PRNG key: load_identity('tiny', key=...)")
        module = _tiny_module()
        return IdentityNet(_random_variables(module, key, 112), module, 112, "arcface", name)
    if name.startswith("arcface"):
        arch = name.split("-", 1)[1] if "-" in name else "r50"
        module = arcface.make_arcface(arch)
        if weights is None and key is not None:
            # untrained, for benchmarks and shape checks: same graph and FLOPs as the real net
            return IdentityNet(_random_variables(module, key, 112), module, 112, "arcface", name)
        if weights is None:
            raise ValueError(f"load_identity({name!r}) needs weights=PATH: an arcface_torch .pth, an "
                             "insightface .onnx, or a .msgpack written by experiments/convert_identity"
                             " (or key=PRNGKey for untrained weights, as the benchmark uses)")
        variables = _weights.load_arcface_variables(module, weights)
        variables = jax.device_put(variables)  # jnp.asarray: a program per leaf's shape
        return IdentityNet(variables, module, 112, "arcface", name)
    raise ValueError(f"unknown identity network {name!r}; expected 'dlib', 'tiny', 'arcface' or "
                     "'arcface-<r18|r34|r50|r100|mbf>'")
