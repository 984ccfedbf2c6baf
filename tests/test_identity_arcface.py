"""ArcFace backbones: weight import parity against references built here in their native formats.

The references are written from arcface_torch's forward passes as ONNX graphs (onnx.helper) with
random weights and run by onnxruntime: once with every batch norm as its own node (the layout of an
arcface_torch state dict), once with the norms that follow a convolution folded into it and the
input normalisation inside the graph (the layout of insightface's model-zoo exports). The same
random weights are written as a genuine torch-layout `.pth` zip (no torch needed) and imported.
"""

import collections
import sys
import types
import zipfile

import jax
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ganfit_jax.identity import arcface, weights  # noqa: E402

EPS = 1e-5


# ----------------------------------------------------------------------------- random state dicts

class _SD:
    """Random arcface_torch-style state dict, filled in the order PyTorch registers modules."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.sd = collections.OrderedDict()

    def conv(self, name, cout, cin, k, groups=1, gain=1.0):
        fan_in = cin // groups * k * k
        self.sd[name + ".weight"] = (self.rng.standard_normal((cout, cin // groups, k, k))
                                     * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def bn(self, name, c, gamma=1.0):
        r = self.rng
        self.sd[name + ".weight"] = (gamma * (1 + 0.2 * r.standard_normal(c))).astype(np.float32)
        self.sd[name + ".bias"] = (0.1 * r.standard_normal(c)).astype(np.float32)
        self.sd[name + ".running_mean"] = (0.1 * r.standard_normal(c)).astype(np.float32)
        self.sd[name + ".running_var"] = r.uniform(0.5, 1.5, c).astype(np.float32)
        self.sd[name + ".num_batches_tracked"] = np.array(123, np.int64)

    def prelu(self, name, c):
        self.sd[name + ".weight"] = self.rng.uniform(0.1, 0.3, c).astype(np.float32)

    def linear(self, name, cout, cin, bias=True):
        self.sd[name + ".weight"] = (self.rng.standard_normal((cout, cin)) / np.sqrt(cin)).astype(np.float32)
        if bias:
            self.sd[name + ".bias"] = (0.1 * self.rng.standard_normal(cout)).astype(np.float32)


def iresnet_state_dict(layers, width, seed=0):
    s = _SD(seed)
    s.conv("conv1", width[0], 3, 3)
    s.bn("bn1", width[0])
    s.prelu("prelu", width[0])
    inplanes = width[0]
    for li, (planes, blocks) in enumerate(zip(width, layers)):
        for b in range(blocks):
            p = f"layer{li + 1}.{b}."
            s.bn(p + "bn1", inplanes)
            s.conv(p + "conv1", planes, inplanes, 3)
            s.bn(p + "bn2", planes)
            s.prelu(p + "prelu", planes)
            s.conv(p + "conv2", planes, planes, 3)
            s.bn(p + "bn3", planes, gamma=0.3)
            if b == 0:
                s.conv(p + "downsample.0", planes, inplanes, 1)
                s.bn(p + "downsample.1", planes)
            inplanes = planes
    s.bn("bn2", width[-1])
    s.linear("fc", 512, width[-1] * 49)
    s.bn("features", 512)
    return s.sd


def mbf_state_dict(blocks=(1, 4, 6, 2), scale=2, seed=0):
    s = _SD(seed)

    def conv_block(p, cin, cout, k, groups=1):
        s.conv(p + ".layers.0", cout, cin, k, groups)
        s.bn(p + ".layers.1", cout)
        s.prelu(p + ".layers.2", cout)

    def linear_block(p, cin, cout, k, groups=1, gamma=1.0):
        s.conv(p + ".layers.0", cout, cin, k, groups)
        s.bn(p + ".layers.1", cout, gamma)

    def depth_wise(p, cin, cout, groups, residual):
        conv_block(p + ".layers.0", cin, groups, 1)
        conv_block(p + ".layers.1", groups, groups, 3, groups)
        linear_block(p + ".layers.2", groups, cout, 1, gamma=0.3 if residual else 1.0)

    c1, c2 = 64 * scale, 128 * scale
    conv_block("layers.0", 3, c1, 3)
    assert blocks[0] == 1
    conv_block("layers.1", c1, c1, 3, 64)
    depth_wise("layers.2", c1, c1, 128, False)
    for i in range(blocks[1]):
        depth_wise(f"layers.3.layers.{i}", c1, c1, 128, True)
    depth_wise("layers.4", c1, c2, 256, False)
    for i in range(blocks[2]):
        depth_wise(f"layers.5.layers.{i}", c2, c2, 256, True)
    depth_wise("layers.6", c2, c2, 512, False)
    for i in range(blocks[3]):
        depth_wise(f"layers.7.layers.{i}", c2, c2, 256, True)
    conv_block("conv_sep", c2, 512, 1)
    linear_block("features.layers.0", 512, 512, 7, 512)
    s.linear("features.layers.2", 512, 512, bias=False)
    s.bn("features.layers.3", 512)
    return s.sd


# ----------------------------------------------------------------------------- ONNX references

class _Graph:
    """onnx.helper graph builder that follows arcface_torch's forward, optionally folding BN."""

    def __init__(self, sd, fold):
        self.sd, self.fold = sd, fold
        self.nodes, self.inits, self.n = [], [], 0

    def name(self):
        self.n += 1
        return f"t{self.n}"

    def const(self, array):
        nm = self.name()
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), nm))
        return nm

    def op(self, op_type, inputs, **attrs):
        out = self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def bn(self, x, p):
        sd = self.sd
        return self.op("BatchNormalization", [x, self.const(sd[p + ".weight"]), self.const(sd[p + ".bias"]),
                                              self.const(sd[p + ".running_mean"]),
                                              self.const(sd[p + ".running_var"])], epsilon=EPS)

    def conv_bn(self, x, conv, bn, stride, pad, groups=1):
        """torch Conv2d(bias=False) then BatchNorm2d; folded into one biased Conv when self.fold."""
        w = self.sd[conv + ".weight"]
        k = w.shape[-1]
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups)
        if not self.fold:
            return self.bn(self.op("Conv", [x, self.const(w)], **attrs), bn)
        g = self.sd[bn + ".weight"] / np.sqrt(self.sd[bn + ".running_var"] + EPS)
        b = self.sd[bn + ".bias"] - self.sd[bn + ".running_mean"] * g
        return self.op("Conv", [x, self.const(w * g[:, None, None, None]), self.const(b)], **attrs)

    def prelu(self, x, p):
        return self.op("PRelu", [x, self.const(self.sd[p + ".weight"].reshape(-1, 1, 1))])

    def model(self, x_in, out):
        graph = helper.make_graph(self.nodes, "ref", [helper.make_tensor_value_info(
            x_in, TensorProto.FLOAT, [None, 3, 112, 112])], [helper.make_tensor_value_info(
                out, TensorProto.FLOAT, [None, 512])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    def normalised_input(self):
        """Model-zoo graphs take 0..255 and normalise inside; state-dict graphs take normalised x."""
        if self.fold:
            x = self.op("Sub", ["input", self.const(np.array(127.5))])
            return self.op("Mul", [x, self.const(np.array(1 / 127.5))])
        return "input"


def iresnet_onnx(sd, layers, width, fold):
    g = _Graph(sd, fold)
    x = g.prelu(g.conv_bn(g.normalised_input(), "conv1", "bn1", 1, 1), "prelu")
    for li, (planes, blocks) in enumerate(zip(width, layers)):
        for b in range(blocks):
            p = f"layer{li + 1}.{b}."
            stride = 2 if b == 0 else 1
            y = g.bn(x, p + "bn1")  # a norm before a conv cannot be folded
            y = g.prelu(g.conv_bn(y, p + "conv1", p + "bn2", 1, 1), p + "prelu")
            y = g.conv_bn(y, p + "conv2", p + "bn3", stride, 1)
            if b == 0:
                x = g.conv_bn(x, p + "downsample.0", p + "downsample.1", stride, 0)
            x = g.op("Add", [y, x])
    x = g.op("Flatten", [g.bn(x, "bn2")], axis=1)
    x = g.op("Gemm", [x, g.const(sd["fc.weight"]), g.const(sd["fc.bias"])], transB=1)
    return g.model("input", g.bn(x, "features"))


def mbf_onnx(sd, blocks, fold):
    g = _Graph(sd, fold)

    def conv_block(x, p, stride, pad, groups=1):
        return g.prelu(g.conv_bn(x, p + ".layers.0", p + ".layers.1", stride, pad, groups), p + ".layers.2")

    def depth_wise(x, p, stride, groups, residual):
        y = conv_block(x, p + ".layers.0", 1, 0)
        y = conv_block(y, p + ".layers.1", stride, 1, groups)
        y = g.conv_bn(y, p + ".layers.2.layers.0", p + ".layers.2.layers.1", 1, 0)
        return g.op("Add", [x, y]) if residual else y

    x = conv_block(g.normalised_input(), "layers.0", 2, 1)
    x = conv_block(x, "layers.1", 1, 1, 64)
    for idx, (nb, groups, stride_groups) in zip((2, 4, 6), ((blocks[1], 128, 128), (blocks[2], 256, 256),
                                                            (blocks[3], 256, 512))):
        x = depth_wise(x, f"layers.{idx}", 2, stride_groups, False)
        for i in range(nb):
            x = depth_wise(x, f"layers.{idx + 1}.layers.{i}", 1, groups, True)
    x = conv_block(x, "conv_sep", 1, 0)
    x = g.conv_bn(x, "features.layers.0.layers.0", "features.layers.0.layers.1", 1, 0, 512)
    x = g.op("Flatten", [x], axis=1)
    x = g.op("MatMul", [x, g.const(sd["features.layers.2.weight"].T)])
    return g.model("input", g.bn(x, "features.layers.3"))


def run_onnx(model, images01, fold):
    x = np.transpose(np.asarray(images01, np.float32), (0, 3, 1, 2)) * 255.0
    if not fold:
        x = (x - 127.5) / 127.5
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


# ----------------------------------------------------------------------------- genuine .pth writer

def write_torch_pth(path, state_dict, share_first_two=False):
    """Write `state_dict` as torch.save does (zip: archive/data.pkl + archive/data/<key>), sans torch.

    Storages are pickled as persistent ids and tensors as torch._utils._rebuild_tensor_v2 calls,
    resolved by name through stand-in modules registered only while pickling.
    """
    storage_names = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # identity only matters by name
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch_mod._utils = utils_mod
    for nm in storage_names.values():
        cls = type(nm, (), {"__module__": "torch"})
        setattr(torch_mod, nm, cls)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, offset, shape):
            self.storage, self.offset, self.shape = storage, offset, shape

        def __reduce_ex__(self, protocol):
            stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
            return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.shape), stride, False,
                                         collections.OrderedDict()))

    blobs, tensors = {}, collections.OrderedDict()
    items = list(state_dict.items())
    start = 0
    if share_first_two:  # two tensors in one storage at different offsets, as views can be saved
        (k0, a0), (k1, a1) = items[0], items[1]
        st = Storage("0", np.concatenate([a0.ravel(), a1.ravel()]))
        blobs["0"] = st
        tensors[k0] = Tensor(st, 0, a0.shape)
        tensors[k1] = Tensor(st, a0.size, a1.shape)
        start = 2
    for k, a in items[start:]:
        st = Storage(str(len(blobs)), np.ascontiguousarray(a))
        blobs[st.key] = st
        tensors[k] = Tensor(st, 0, a.shape)
    tensors._metadata = collections.OrderedDict({"": {"version": 1}})

    import io
    import pickle

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                cls = getattr(torch_mod, storage_names[obj.array.dtype])
                return ("storage", cls, obj.key, "cpu", obj.array.size)
            return None

    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
    try:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(tensors)
    finally:
        for m, v in saved.items():
            if v is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = v
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for st in blobs.values():
            z.writestr(f"archive/data/{st.key}", st.array.astype(st.array.dtype.newbyteorder("<")).tobytes())
        z.writestr("archive/version", "3\n")


# ----------------------------------------------------------------------------- tests

def _compare(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    cos = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    rel = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    return cos.min(), rel


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(3), (2, 112, 112, 3))


# Full iResNet-50 (3, 4, 14, 3) at full width; MobileFaceNet exactly as get_mbf builds it.
R50 = arcface.IRESNET_LAYERS["r50"]
WIDTH = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def r50_state_dict():
    return iresnet_state_dict(R50, WIDTH)


@pytest.fixture(scope="module")
def r50_apply():
    return jax.jit(arcface.make_arcface("r50").apply)


@pytest.mark.parametrize("fold", [False, True], ids=["bn-nodes", "bn-folded"])
def test_iresnet50_onnx_import_matches_onnxruntime(tmp_path, images, r50_state_dict, r50_apply, fold):
    sd = r50_state_dict
    path = tmp_path / "r50.onnx"
    onnx.save(iresnet_onnx(sd, R50, WIDTH, fold), path)
    ref = run_onnx(onnx.load(path), images, fold)
    variables = weights.load_arcface_variables(arcface.make_arcface("r50"), path)
    ours, feats = r50_apply(variables, images)
    cos, rel = _compare(ours, ref)
    assert cos >= 0.9999 and rel <= 1e-4, (cos, rel)
    assert feats["stage4"].shape == (2, 7, 7, 512)


def test_iresnet50_pth_import_matches_reference(tmp_path, images, r50_state_dict, r50_apply):
    sd = r50_state_dict
    path = tmp_path / "backbone.pth"
    write_torch_pth(path, sd, share_first_two=True)
    read = weights.read_torch_state_dict(path)
    assert list(read) == list(sd) and all(np.array_equal(read[k], sd[k]) for k in sd)
    ref = run_onnx(iresnet_onnx(sd, R50, WIDTH, fold=False), images, fold=False)
    ours, _ = r50_apply(weights.load_arcface_variables(arcface.make_arcface("r50"), path), images)
    cos, rel = _compare(ours, ref)
    assert cos >= 0.9999 and rel <= 1e-4, (cos, rel)


@pytest.mark.parametrize("fmt", ["onnx-folded", "onnx-bn", "pth"])
def test_mobilefacenet_import_matches_reference(tmp_path, images, fmt):
    blocks = (1, 4, 6, 2)
    sd = mbf_state_dict(blocks)
    fold = fmt == "onnx-folded"
    model = mbf_onnx(sd, blocks, fold)
    ref = run_onnx(model, images, fold)
    if fmt == "pth":
        path = tmp_path / "mbf.pth"
        write_torch_pth(path, sd)
    else:
        path = tmp_path / "mbf.onnx"
        onnx.save(model, path)
    module = arcface.make_arcface("mbf")
    ours, feats = jax.jit(module.apply)(weights.load_arcface_variables(module, path), images)
    cos, rel = _compare(ours, ref)
    assert cos >= 0.9999 and rel <= 1e-4, (cos, rel)
    assert set(feats) == {"stem", "stage1", "stage2", "stage3", "stage4"}


def test_msgpack_roundtrip_and_wrong_architecture(tmp_path):
    module = arcface.make_arcface("mbf")
    variables = weights.variables_from_state_dict(module, mbf_state_dict())
    path = tmp_path / "mbf.msgpack"
    weights.save_variables(path, variables)
    back = weights.load_variables(path, module)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(variables),
                                                    jax.tree_util.tree_leaves(back)))
    with pytest.raises(weights.WeightFormatError, match="mbf.msgpack.*IResNet"):
        weights.load_variables(path, arcface.make_arcface("r18"))
    # a MobileFaceNet state dict offered as an iResNet names the file and the missing layer
    pth = tmp_path / "mbf.pth"
    write_torch_pth(pth, mbf_state_dict())
    with pytest.raises(weights.WeightFormatError, match=r"mbf\.pth.*conv1.*IResNet"):
        weights.load_arcface_variables(arcface.make_arcface("r18"), pth)


def test_corrupt_and_unknown_files_name_the_file(tmp_path):
    module = arcface.make_arcface("mbf")
    bad_zip = tmp_path / "broken.pth"
    bad_zip.write_bytes(b"this is not a zip")
    with pytest.raises(weights.WeightFormatError, match=r"broken\.pth.*zip"):
        weights.load_arcface_variables(module, bad_zip)
    truncated = tmp_path / "truncated.pth"
    write_torch_pth(truncated, mbf_state_dict())
    with zipfile.ZipFile(truncated) as z:
        pkl = z.read("archive/data.pkl")
    with zipfile.ZipFile(truncated, "w") as z:
        z.writestr("archive/data.pkl", pkl[: len(pkl) // 2])
    with pytest.raises(weights.WeightFormatError, match=r"truncated\.pth"):
        weights.load_arcface_variables(module, truncated)
    bad_onnx = tmp_path / "garbage.onnx"
    bad_onnx.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(weights.WeightFormatError, match=r"garbage\.onnx"):
        weights.load_arcface_variables(module, bad_onnx)
    with pytest.raises(weights.WeightFormatError, match=r"weights\.h5.*\.pth.*\.onnx"):
        weights.load_arcface_variables(module, tmp_path / "weights.h5")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        weights.load_arcface_variables(module, tmp_path / "missing.onnx")
