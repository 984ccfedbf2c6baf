"""Import ArcFace weights into the Flax modules of arcface.py, without PyTorch.

Sources:
- arcface_torch `.pth` state dicts (e.g. ms1mv3_arcface_r50_fp16/backbone.pth). A `.pth` written by
  torch ≥ 1.6 is a zip holding `<root>/data.pkl` (a pickle whose tensors are
  `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and whose storages are
  persistent ids ('storage', <Float|Half|...>Storage, key, location, numel)) and one raw
  little-endian file `<root>/data/<key>` per storage. A restricted Unpickler rebuilds them as numpy
  arrays; nothing else in the pickle is allowed.
- insightface model-zoo ONNX graphs (w600k_r50.onnx, w600k_mbf.onnx, glint360k_r100.onnx). Their
  exporters fold each batch norm that follows a convolution into it, and rename the weights, so the
  graph is matched by structure: parameterised nodes (Conv, BatchNormalization, PRelu, Gemm/MatMul)
  in graph order against the Flax layers in call order, where a missing BatchNormalization after a
  convolution means it was folded (the conv's bias becomes that norm's shift).

Checkpoints in the project's own format are Flax variables serialised with flax.serialization
(msgpack) under checkpoints/.
"""

import io
import os
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import serialization

from ganfit_jax import optional
from ganfit_jax.identity import arcface


class WeightFormatError(ValueError):
    """A weight file that is not what the importer expects."""


# ----------------------------------------------------------------------------- .pth (zip) reader

_STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                   "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if len(size) == 0:
        return np.array(storage[offset])
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None, *args):
    return data


class _StateDictUnpickler(pickle.Unpickler):

    def __init__(self, fh, archive, root, path):
        super().__init__(fh)
        self.archive = archive
        self.root = root
        self.path = path

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        raise WeightFormatError(f"{self.path}: the pickle refers to {module}.{name}, which a plain "
                                "state dict of tensors does not contain; refusing to load it")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise WeightFormatError(f"{self.path}: unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
        dtype = _STORAGE_DTYPES.get(name)
        if dtype is None:
            raise WeightFormatError(f"{self.path}: storage type {name} is not supported")
        try:
            raw = self.archive.read(f"{self.root}/data/{key}")
        except KeyError:
            raise WeightFormatError(
                f"{self.path}: storage {self.root}/data/{key} missing from the zip") from None
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def read_torch_state_dict(path):
    """A torch ≥ 1.6 `.pth` state dict → {key: numpy array}, without importing torch."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise WeightFormatError(
            f"{path}: not a zip archive; expected a PyTorch state dict saved by torch>=1.6 "
            "(zip with <name>/data.pkl and <name>/data/<n>); re-save legacy files with "
            "torch.save(sd, f) on a recent torch, or convert the ONNX model instead")
    with zipfile.ZipFile(path) as archive:
        pkls = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkls) != 1:
            raise WeightFormatError(f"{path}: expected exactly one '<name>/data.pkl' in the zip, "
                                    f"found {pkls}")
        root = pkls[0][: -len("/data.pkl")]
        try:
            obj = _StateDictUnpickler(io.BytesIO(archive.read(pkls[0])), archive, root, path).load()
        except WeightFormatError:
            raise
        except Exception as e:  # truncated or corrupt pickle
            raise WeightFormatError(
                f"{path}: could not unpickle {pkls[0]} ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightFormatError(f"{path}: expected a dict of tensors (a state_dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


# ----------------------------------------------------------------------------- Flax layer list

def layer_call_order(module, input_size=112):
    """[(flax name, kind)] of the module's Conv/BatchNorm/Dense/PReLU layers in call order."""
    order = []

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and m.name is not None:
            kind = {nn.Conv: "conv", nn.BatchNorm: "bn", nn.Dense: "dense",
                    arcface.PReLU: "prelu"}.get(type(m))
            if kind is not None:
                order.append((m.name, kind))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, input_size, input_size, 3)))
    return order


def _empty_variables(module, input_size=112):
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, input_size, input_size, 3)))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _assign(variables, collection, name, leaf, value, source, path):
    target = variables[collection][name][leaf]
    value = np.asarray(value, np.float32)
    if value.shape != target.shape:
        raise WeightFormatError(f"{path}: {source} has shape {value.shape}, but Flax "
                                f"{collection}/{name}/{leaf} needs {target.shape}; wrong architecture?")
    variables[collection][name][leaf] = value


def variables_from_state_dict(module, state_dict, path="state dict", log=None):
    """Map an arcface_torch state dict onto the module's Flax variables (rename + layout change)."""
    variables = _empty_variables(module)
    variables = {c: {n: dict(v) for n, v in tree.items()} for c, tree in variables.items()}
    kinds = dict(layer_call_order(module))
    used = set()
    for name, kind in kinds.items():
        prefix = name.replace("_", ".")
        # Flax names replace '.' by '_'; resolve the torch prefix by trying the known keys.
        candidates = [k for k in state_dict if k.rsplit(".", 1)[0].replace(".", "_") == name]
        if not candidates:
            raise WeightFormatError(f"{path}: no tensors for layer {prefix!r} (Flax {name}); expected "
                                    f"an arcface_torch {type(module).__name__} state dict")
        torch_prefix = candidates[0].rsplit(".", 1)[0]

        def get(suffix):
            key = f"{torch_prefix}.{suffix}"
            if key not in state_dict:
                raise WeightFormatError(f"{path}: missing {key}")
            used.add(key)
            return state_dict[key], key

        if kind == "conv":
            w, key = get("weight")
            _assign(variables, "params", name, "kernel", np.transpose(w, (2, 3, 1, 0)), key, path)
        elif kind == "dense":
            w, key = get("weight")
            _assign(variables, "params", name, "kernel", w.T, key, path)
            if "bias" in variables["params"][name]:
                b, key = get("bias")
                _assign(variables, "params", name, "bias", b, key, path)
        elif kind == "prelu":
            w, key = get("weight")
            _assign(variables, "params", name, "alpha", w.reshape(-1), key, path)
        elif kind == "bn":
            for suffix, coll, leaf in (("weight", "params", "scale"), ("bias", "params", "bias"),
                                       ("running_mean", "batch_stats", "mean"),
                                       ("running_var", "batch_stats", "var")):
                v, key = get(suffix)
                _assign(variables, coll, name, leaf, v, key, path)
            used.add(f"{torch_prefix}.num_batches_tracked")
        if log is not None:
            log(f"{torch_prefix}.* -> {name} ({kind})")
    unused = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
    if unused:
        raise WeightFormatError(f"{path}: {len(unused)} tensors do not belong to {type(module).__name__}"
                                f" (first: {unused[:3]}); wrong architecture?")
    return variables


# ----------------------------------------------------------------------------- ONNX

def _onnx_entries(path):
    onnx = optional.require("onnx", "onnx", "importing ONNX weights")
    from onnx import numpy_helper
    try:
        model = onnx.load(os.fspath(path))
    except Exception as e:
        raise WeightFormatError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold weights in some exports
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(a.t)
    entries = []
    pre_conv_ops = []
    for node in graph.node:
        op = node.op_type
        consts = [inits.get(i) for i in node.input]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n_before = len(entries)
        if op == "Conv":
            entries.append(dict(op="conv", weight=consts[1],
                                bias=consts[2] if len(consts) > 2 else None, attrs=attrs))
        elif op == "BatchNormalization":
            entries.append(dict(op="bn", scale=consts[1], bias=consts[2], mean=consts[3], var=consts[4],
                                eps=attrs.get("epsilon", 1e-5)))
        elif op == "PRelu":
            entries.append(dict(op="prelu", slope=consts[1]))
        elif op == "Gemm":
            w = consts[1]
            if attrs.get("transB", 0):
                w = w.T
            entries.append(dict(op="dense", weight=w, bias=consts[2] if len(consts) > 2 else None))
        elif op == "MatMul" and consts[1] is not None:
            entries.append(dict(op="dense", weight=consts[1], bias=None))
        elif op == "Add" and entries and entries[-1]["op"] == "dense" and entries[-1]["bias"] is None \
                and any(c is not None for c in consts):
            entries[-1]["bias"] = next(c for c in consts if c is not None)
        elif not entries and op in ("Sub", "Mul", "Div"):
            pre_conv_ops.append((op, next((c for c in consts if c is not None), None)))
        if len(entries) > n_before:
            entries[-1]["input"] = node.input[0]
        if entries and op in ("Conv", "BatchNormalization", "PRelu", "Gemm", "MatMul", "Add"):
            entries[-1].setdefault("output", node.output[0])
            if op == "Add" and entries[-1]["op"] == "dense":
                entries[-1]["output"] = node.output[0]
    return entries, pre_conv_ops


def variables_from_onnx(module, path, log=None):
    """Map an insightface ONNX graph (batch norm folded or not) onto the module's Flax variables."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weight file {path} does not exist")
    entries, pre_ops = _onnx_entries(path)
    _check_input_normalisation(pre_ops, path)
    variables = _empty_variables(module)
    variables = {c: {n: dict(v) for n, v in tree.items()} for c, tree in variables.items()}
    layers = layer_call_order(module)
    expected = ("an insightface ArcFace graph whose Conv/BatchNormalization/PRelu/Gemm nodes follow "
                f"arcface_torch's {type(module).__name__} in order")
    i = 0
    pending_shift = None  # bias of a conv/dense whose following batch norm was folded away
    previous = None  # the entry matched to the previous Flax layer
    for name, kind in layers:
        e = entries[i] if i < len(entries) else None
        where = f"node #{i} ({e['op'] if e else 'end of graph'}) for Flax {name} ({kind})"
        if kind == "conv":
            if e is None or e["op"] != "conv":
                raise WeightFormatError(f"{path}: {where}; expected {expected}")
            _assign(variables, "params", name, "kernel", np.transpose(e["weight"], (2, 3, 1, 0)), where, path)
            pending_shift = e["bias"]
            i += 1
        elif kind == "dense":
            if e is None or e["op"] != "dense":
                raise WeightFormatError(f"{path}: {where}; expected {expected}")
            _assign(variables, "params", name, "kernel", e["weight"], where, path)
            pending_shift = e["bias"]
            if "bias" in variables["params"][name]:
                b = e["bias"] if e["bias"] is not None else np.zeros(e["weight"].shape[1])
                _assign(variables, "params", name, "bias", b, where, path)
                pending_shift = None
            i += 1
        elif kind == "prelu":
            if e is None or e["op"] != "prelu":
                raise WeightFormatError(f"{path}: {where}; expected {expected}")
            c = variables["params"][name]["alpha"].shape[0]
            _assign(variables, "params", name, "alpha",
                    np.broadcast_to(np.asarray(e["slope"]).reshape(-1), (c,)), where, path)
            pending_shift = None
            i += 1
        elif kind == "bn":
            c = variables["params"][name]["scale"].shape[0]
            # A norm right after a conv/dense must read that layer's output; otherwise it was folded
            # and the BatchNormalization in sight belongs to a later layer.
            follows = previous is None or previous["op"] not in ("conv", "dense") or (
                e is not None and e.get("input") == previous.get("output"))
            if e is not None and e["op"] == "bn" and follows:
                var = np.asarray(e["var"], np.float64) + float(e["eps"]) - arcface.BN_EPS
                mean = np.asarray(e["mean"], np.float64)
                if pending_shift is not None:  # a conv bias in front of an unfolded norm
                    mean = mean - pending_shift
                values = dict(scale=e["scale"], bias=e["bias"], mean=mean, var=var)
                i += 1
            else:
                # Folded into the preceding conv/dense: an identity norm carrying the shift.
                shift = pending_shift if pending_shift is not None else np.zeros(c)
                values = dict(scale=np.ones(c), bias=shift, mean=np.zeros(c),
                              var=np.full(c, 1.0 - arcface.BN_EPS))
            for leaf in ("scale", "bias"):
                _assign(variables, "params", name, leaf, values[leaf], where, path)
            for leaf in ("mean", "var"):
                _assign(variables, "batch_stats", name, leaf, values[leaf], where, path)
            pending_shift = None
        if kind != "bn" or (e is not None and e["op"] == "bn" and follows):
            previous = e
        else:
            previous = None
        if log is not None:
            log(f"{where} -> {name}")
    if i != len(entries):
        raise WeightFormatError(f"{path}: {len(entries) - i} parameterised nodes left over after "
                                f"{type(module).__name__}; expected {expected}")
    return variables


def _check_input_normalisation(pre_ops, path):
    """Graphs that normalise inside (Sub 127.5, Mul 1/127.5) are equivalent to ours; others are not."""
    a, b = 1.0, 0.0  # the graph's input map x -> a·x + b before the first Conv
    for op, c in pre_ops:
        c = None if c is None else np.asarray(c, np.float64).reshape(-1)
        if c is None or not np.allclose(c, c[0]):
            raise WeightFormatError(f"{path}: per-channel or non-constant input {op} before the first "
                                    "Conv is not supported")
        c = float(c[0])
        if op == "Sub":
            b -= c
        elif op == "Mul":
            a, b = a * c, b * c
        else:
            a, b = a / c, b / c
    if pre_ops and not (abs(a * 127.5 - 1) < 1e-4 and abs(b + 1) < 1e-4):
        raise WeightFormatError(f"{path}: input normalisation {a:g}·x + {b:g} inside the graph "
                                "differs from insightface's (x − 127.5) / 127.5")


# ----------------------------------------------------------------------------- msgpack checkpoints

def save_variables(path, variables):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))


def load_variables(path, module=None, input_size=112):
    """Read a msgpack checkpoint; with `module`, check it against the module's variable shapes."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        variables = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise WeightFormatError(f"{path}: not a flax msgpack checkpoint ({type(e).__name__}: {e})") from None
    if module is not None:
        ref = _empty_variables(module, input_size)
        ok = jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(variables) and all(
            a.shape == np.shape(b) for a, b in zip(jax.tree_util.tree_leaves(ref),
                                                   jax.tree_util.tree_leaves(variables)))
        if not ok:
            raise WeightFormatError(f"{path}: variables do not match {type(module).__name__}")
    return variables


def load_arcface_variables(module, path, log=None):
    """Flax variables for `module` from a .pth, .onnx or converted .msgpack file."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return variables_from_state_dict(module, read_torch_state_dict(path), str(path), log)
    if suffix == ".onnx":
        return variables_from_onnx(module, path, log)
    if suffix in (".msgpack", ".flax"):
        return load_variables(path, module)
    raise WeightFormatError(f"{path}: unknown weight format {suffix!r}; expected an arcface_torch "
                            ".pth state dict, an insightface .onnx model or a converted .msgpack")
