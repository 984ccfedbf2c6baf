"""Reader for dlib's binary serialisation of DNNs (`dlib::serialize(net, out)`), in pure Python.

dlib writes a network recursively: the loss layer, then one version integer per nested layer from the
outside in, the input layer, and then each layer's details from the input outwards. Tags and skips
contribute only a version integer, so the graph itself is not in the file: it lives in the C++ type of
the network. The reader therefore returns the layers with parameters in forward order and leaves the
topology to the module that consumes them (`dlib_resnet.py`), which checks names and shapes.

Primitive encodings (dlib/serialize.h, dlib/float_details.h, dlib/dnn/tensor.h):
  integer  one control byte (low nibble: byte count, bit 7: negative), then little-endian magnitude;
  float    integer mantissa and integer exponent, value = mantissa * 2**exponent;
  bool     one ASCII character '0' or '1';
  string   integer length, then the bytes;
  tensor   integer version 2, num_samples, k, nr, nc, then little-endian float32 data;
  alias_tensor  integer version 1, num_samples, k, nr, nc (no data; a view into params).
"""

import dataclasses
import os

import numpy as np


class DlibFormatError(ValueError):
    """A file that is not the dlib network this reader expects."""


@dataclasses.dataclass
class DlibLayer:
    """One layer's details: its serialised name and the fields read for it."""

    kind: str
    fields: dict


class _Reader:

    def __init__(self, data, path):
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what):
        raise DlibFormatError(
            f"{self.path}: {what} at byte {self.pos} of {len(self.data)}; expected dlib's serialised "
            "dlib_face_recognition_resnet_model_v1 (loss_metric_2 over input_rgb_image_sized<150>, "
            "con_4/affine_/relu_/max_pool_2/avg_pool_2/add_prev_/fc_2 layers)")

    def byte(self):
        if self.pos >= len(self.data):
            self.fail("unexpected end of file")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def integer(self):
        control = self.byte()
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            self.pos -= 1
            self.fail(f"invalid integer control byte {control:#04x}")
        if self.pos + size > len(self.data):
            self.fail("unexpected end of file")
        value = int.from_bytes(self.data[self.pos:self.pos + size], "little")
        self.pos += size
        return -value if control & 0x80 else value

    def real(self):
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0 ** exponent

    def boolean(self):
        c = self.byte()
        if c not in (ord("0"), ord("1")):
            self.pos -= 1
            self.fail(f"invalid bool byte {c:#04x}")
        return c == ord("1")

    def string(self, max_len=64):
        n = self.integer()
        if not 0 <= n <= max_len:
            self.fail(f"implausible string length {n}")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return s.decode("ascii")
        except UnicodeDecodeError:
            self.fail("non-ASCII layer name")

    def expect_version(self, expected, what):
        v = self.integer()
        if v != expected:
            self.pos -= 2
            self.fail(f"{what} has version {v}, expected {expected}")

    def tensor(self):
        self.expect_version(2, "tensor")
        shape = tuple(self.integer() for _ in range(4))
        if any(s < 0 for s in shape):
            self.fail(f"negative tensor shape {shape}")
        count = int(np.prod(shape))
        end = self.pos + 4 * count
        if end > len(self.data):
            self.fail(f"tensor of shape {shape} runs past the end of the file")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos = end
        return values.reshape(shape)

    def alias_tensor(self):
        self.expect_version(1, "alias_tensor")
        return tuple(self.integer() for _ in range(4))


def _layer_details(r, kind):
    """Read the fields that follow a layer's name, as dlib/dnn/layers.h writes them."""
    if kind == "con_4":
        f = dict(params=r.tensor(), num_filters=r.integer(), nr=r.integer(), nc=r.integer(),
                 stride_y=r.integer(), stride_x=r.integer(), padding_y=r.integer(),
                 padding_x=r.integer(), filters=r.alias_tensor(), biases=r.alias_tensor())
        f["multipliers"] = [r.real() for _ in range(4)]
        return f
    if kind == "affine_":
        return dict(params=r.tensor(), gamma=r.alias_tensor(), beta=r.alias_tensor(), mode=r.integer())
    if kind in ("relu_", "add_prev_"):
        return {}
    if kind in ("max_pool_2", "avg_pool_2"):
        return dict(nr=r.integer(), nc=r.integer(), stride_y=r.integer(), stride_x=r.integer(),
                    padding_y=r.integer(), padding_x=r.integer())
    if kind == "fc_2":
        f = dict(num_outputs=r.integer(), num_inputs=r.integer(), params=r.tensor(),
                 weights=r.alias_tensor(), biases=r.alias_tensor(), bias_mode=r.integer())
        f["multipliers"] = [r.real() for _ in range(4)]
        return f
    r.fail(f"unsupported layer {kind!r}")


def read_dlib_network(path):
    """Parse a dlib DNN file into (loss, input, layers in forward order).

    Returns (loss_fields, input_fields, [DlibLayer, ...]). Raises FileNotFoundError or DlibFormatError
    naming the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dlib network file {path} does not exist")
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:3] == b"BZh":
        raise DlibFormatError(f"{path}: is bzip2-compressed; decompress it first (bunzip2)")
    r = _Reader(data, path)
    r.expect_version(1, "add_loss_layer")
    loss_kind = r.string()
    if loss_kind != "loss_metric_2":
        r.fail(f"loss layer {loss_kind!r} (expected 'loss_metric_2')")
    loss = dict(kind=loss_kind, margin=r.real(), distance_threshold=r.real())
    # One version integer per nested add_layer (2), tag/skip layer (1), until the input's add_layer (3).
    nesting = []
    while True:
        v = r.integer()
        nesting.append(v)
        if v == 3:
            break
        if v not in (1, 2):
            r.fail(f"unexpected layer version {v}")
    input_kind = r.string()
    if input_kind != "input_rgb_image_sized":
        r.fail(f"input layer {input_kind!r} (expected 'input_rgb_image_sized')")
    inp = dict(kind=input_kind, mean_rgb=(r.real(), r.real(), r.real()), nr=r.integer(), nc=r.integer())
    layers = []
    for i in range(sum(1 for v in nesting if v != 1)):
        kind = r.string()
        fields = _layer_details(r, kind)
        # add_layer bookkeeping: three flags and three (empty) cached tensors; the layer on the
        # input (add_layer version 3) also stores its sample expansion factor.
        for _ in range(3):
            r.boolean()
        for _ in range(3):
            r.tensor()
        if i == 0:
            r.integer()
        layers.append(DlibLayer(kind, fields))
    if r.pos != len(data):
        r.fail(f"{len(data) - r.pos} trailing bytes")
    return loss, inp, layers
