"""ArcFace backbones of insightface's `arcface_torch` in Flax: iResNet-18/34/50/100 and MobileFaceNet.

GANFIT uses a pretrained face-recognition network F both for the identity loss on its final
embedding (paper, Eq. 8) and for the content loss on intermediate activations (Eq. 9); ArcFace is
the network of the paper. The modules below mirror `recognition/arcface_torch/backbones/iresnet.py`
and `mobilefacenet.py` layer for layer, and name every layer after its PyTorch state-dict prefix with
'.' replaced by '_' (e.g. `layer1.0.bn1` → `layer1_0_bn1`), so weight import is a rename plus a
layout change. Layers are created in the order PyTorch's forward calls them, which is also the order
in which an exported ONNX graph lists them (weights.py relies on that).

Input: a batch of 112×112 RGB images in [0, 1], normalised as insightface does ((x·255 − 127.5) /
127.5). Output: (embedding (B, 512), feature maps by name: 'stem', 'stage1' … 'stage4').
"""

import jax.numpy as jnp
import flax.linen as nn

IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3),
                  "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6)}
BN_EPS = 1e-5


class PReLU(nn.Module):
    """Per-channel PReLU, max(0, x) + α·min(0, x) (torch.nn.PReLU)."""

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, alpha * x)


def _bn(name):
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name=name)


def _conv(features, kernel, stride, pad, name, groups=1):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=[(pad, pad), (pad, pad)], feature_group_count=groups, use_bias=False,
                   name=name)


def insightface_normalise(images):
    return (images * 255.0 - 127.5) / 127.5


class IResNet(nn.Module):
    """insightface's improved ResNet (IBasicBlock: BN → conv → BN → PReLU → conv(stride) → BN)."""

    layers: tuple = IRESNET_LAYERS["r50"]
    num_features: int = 512
    width: tuple = (64, 128, 256, 512)
    input_size: int = 112

    @nn.compact
    def __call__(self, images):
        x = insightface_normalise(images)
        features = {}
        x = _conv(self.width[0], 3, 1, 1, "conv1")(x)
        x = PReLU(name="prelu")(_bn("bn1")(x))
        features["stem"] = x
        inplanes = self.width[0]
        for s, (planes, blocks) in enumerate(zip(self.width, self.layers)):
            for b in range(blocks):
                p = f"layer{s + 1}_{b}_"
                stride = 2 if b == 0 else 1
                y = _bn(p + "bn1")(x)
                y = _conv(planes, 3, 1, 1, p + "conv1")(y)
                y = PReLU(name=p + "prelu")(_bn(p + "bn2")(y))
                y = _conv(planes, 3, stride, 1, p + "conv2")(y)
                y = _bn(p + "bn3")(y)
                if b == 0 and (stride != 1 or inplanes != planes):
                    x = _bn(p + "downsample_1")(_conv(planes, 1, stride, 0, p + "downsample_0")(x))
                x = y + x
                inplanes = planes
            features[f"stage{s + 1}"] = x
        x = _bn("bn2")(x)
        # torch.flatten on NCHW: channel-major order, which fc.weight expects.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dense(self.num_features, name="fc")(x)
        embedding = _bn("features")(x)
        return embedding, features


class MobileFaceNet(nn.Module):
    """insightface's MobileFaceNet (`get_mbf`: blocks (1, 4, 6, 2), scale 2; GDC head)."""

    blocks: tuple = (1, 4, 6, 2)
    scale: int = 2
    num_features: int = 512
    input_size: int = 112

    @nn.compact
    def __call__(self, images):
        x = insightface_normalise(images)
        features = {}

        def conv_block(x, out_c, kernel, stride, pad, prefix, groups=1):
            x = _conv(out_c, kernel, stride, pad, prefix + "_layers_0", groups)(x)
            return PReLU(name=prefix + "_layers_2")(_bn(prefix + "_layers_1")(x))

        def linear_block(x, out_c, kernel, stride, pad, prefix, groups=1):
            x = _conv(out_c, kernel, stride, pad, prefix + "_layers_0", groups)(x)
            return _bn(prefix + "_layers_1")(x)

        def depth_wise(x, out_c, residual, stride, groups, prefix):
            y = conv_block(x, groups, 1, 1, 0, prefix + "_layers_0")
            y = conv_block(y, groups, 3, stride, 1, prefix + "_layers_1", groups=groups)
            y = linear_block(y, out_c, 1, 1, 0, prefix + "_layers_2")
            return x + y if residual else y

        def residual(x, c, num_block, groups, prefix):
            for i in range(num_block):
                x = depth_wise(x, c, True, 1, groups, f"{prefix}_layers_{i}")
            return x

        c1, c2 = 64 * self.scale, 128 * self.scale
        x = conv_block(x, c1, 3, 2, 1, "layers_0")
        if self.blocks[0] == 1:
            x = conv_block(x, c1, 3, 1, 1, "layers_1", groups=64)
        else:
            x = residual(x, c1, self.blocks[0], 128, "layers_1")
        features["stem"] = x
        x = depth_wise(x, c1, False, 2, 128, "layers_2")
        x = residual(x, c1, self.blocks[1], 128, "layers_3")
        features["stage1"] = x
        x = depth_wise(x, c2, False, 2, 256, "layers_4")
        x = residual(x, c2, self.blocks[2], 256, "layers_5")
        features["stage2"] = x
        x = depth_wise(x, c2, False, 2, 512, "layers_6")
        x = residual(x, c2, self.blocks[3], 256, "layers_7")
        features["stage3"] = x
        x = conv_block(x, 512, 1, 1, 0, "conv_sep")
        features["stage4"] = x
        x = linear_block(x, 512, 7, 1, 0, "features_layers_0", groups=512)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.num_features, use_bias=False, name="features_layers_2")(x)
        embedding = _bn("features_layers_3")(x)
        return embedding, features


def make_arcface(arch, **kwargs):
    """'r18' | 'r34' | 'r50' | 'r100' | 'r200' | 'mbf' → Flax module."""
    if arch in IRESNET_LAYERS:
        return IResNet(layers=IRESNET_LAYERS[arch], **kwargs)
    if arch == "mbf":
        return MobileFaceNet(**kwargs)
    if arch == "mbf_large":
        return MobileFaceNet(blocks=(2, 8, 12, 4), scale=4, **kwargs)
    raise ValueError(f"unknown ArcFace backbone {arch!r}; expected one of "
                     f"{sorted(IRESNET_LAYERS) + ['mbf', 'mbf_large']}")
