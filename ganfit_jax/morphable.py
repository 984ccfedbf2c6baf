"""3D morphable shape/expression model (GANFIT Eq. 2) and loaders for the formats the field uses.

    S(p_s, p_e) = m + U_s p_s + U_e p_e                                          (Eq. 2)

`U_s` is stored scaled by the square root of its eigenvalues, so p_s is in units of standard
deviations and the shape prior is a plain squared norm (DESIGN.md). Expression bases keep the
publisher's scaling (e.g. the SFM's blendshapes: coefficient 1 = the full expression).

Loaders (one per publisher format) live at the bottom of this module and each returns the same
`MorphableModel` pytree; `load(path)` picks one by looking at the file.
"""

from __future__ import annotations

import json
import os
import struct
import tomllib
from typing import Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NUM_LANDMARKS = 68


@flax.struct.dataclass
class MorphableModel:
    """A linear face model; every field an array so the model passes through jit/vmap/grad.

    Attributes:
      mean: (N,3) mean shape, millimetres.
      shape_basis: (N,3,S) identity basis scaled to standard deviations.
      expression_basis: (N,3,E) expression basis (E may be 0).
      triangles: (F,3) int32 vertex indices, counter-clockwise seen from outside.
      uv: (N,2) per-vertex texture coordinates, OBJ convention (u right, v up, in [0,1]);
        image row of a texel = (1 - v) * H.
      landmark_indices: (68,) int32 iBUG-68 vertex indices, -1 where the model has no fixed vertex
        (e.g. the SFM's jaw line).
      contour_right, contour_left: (K,) int32 candidate vertices for the moving jaw-line
        landmarks (iBUG 1-8 on the subject's right, 10-17 on the left), or None.
      symmetry: (N,) int32 index of each vertex's mirror image, or None.
      texture_mean, texture_basis: optional per-vertex linear texture model (N,3) and (N,3,T),
        RGB in [0,1], basis scaled to standard deviations (Eq. 1).
      expression_range: (low, high) that every expression coefficient keeps to, or None for an
        unbounded (PCA) expression model. Blendshapes (the SFM's six, ICT's ARKit set: 1 = the
        full expression) are (0, 1): a negative "smile" or a cheek puffed twice over is no face,
        and a fit that may use them follows landmarks with shapes nobody has (eos fits the
        SFM's blendshapes by non-negative least squares for the same reason). Static, not an
        array: it selects the program (`project_expression`).
    """

    mean: jnp.ndarray
    shape_basis: jnp.ndarray
    expression_basis: jnp.ndarray
    triangles: jnp.ndarray
    uv: jnp.ndarray
    landmark_indices: jnp.ndarray
    contour_right: Optional[jnp.ndarray] = None
    contour_left: Optional[jnp.ndarray] = None
    symmetry: Optional[jnp.ndarray] = None
    texture_mean: Optional[jnp.ndarray] = None
    texture_basis: Optional[jnp.ndarray] = None
    expression_range: Optional[Tuple[float, float]] = flax.struct.field(pytree_node=False,
                                                                        default=None)

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def num_shape(self) -> int:
        return self.shape_basis.shape[-1]

    @property
    def num_expression(self) -> int:
        return self.expression_basis.shape[-1]

    def summary(self) -> str:
        defined = int(np.sum(np.asarray(self.landmark_indices) >= 0))
        return (f"vertices={self.num_vertices} triangles={self.triangles.shape[0]} "
                f"S={self.num_shape} E={self.num_expression} landmarks_defined={defined}/68"
                + (f" T={self.texture_basis.shape[-1]}" if self.texture_basis is not None else "")
                + (" expression_range=[{:g},{:g}]".format(*self.expression_range)
                   if self.expression_range is not None else ""))


def _coefficients(coeffs, count, name):
    coeffs = jnp.asarray(coeffs, jnp.float32)
    if coeffs.ndim == 0:
        return jnp.broadcast_to(coeffs, (count,))
    if coeffs.shape != (count,):
        raise ValueError(f"{name}: expected shape ({count},), got {tuple(coeffs.shape)}")
    return coeffs


# GPUs run float32 products in TF32 by default (10-bit mantissa: ~0.1 mm on a face, a pixel
# after projection). Geometry is a few MFLOP, so it always runs at full float32 precision.
_EXACT = jax.lax.Precision.HIGHEST


def vertices(model: MorphableModel, shape_coeffs, expression_coeffs=0.0):
    """Eq. 2: the mesh (N,3) in mm for shape and expression coefficients (a scalar broadcasts)."""
    p_s = _coefficients(shape_coeffs, model.num_shape, "shape_coeffs")
    p_e = _coefficients(expression_coeffs, model.num_expression, "expression_coeffs")
    out = model.mean + jnp.einsum("nds,s->nd", model.shape_basis, p_s, precision=_EXACT)
    if model.num_expression:
        out = out + jnp.einsum("nde,e->nd", model.expression_basis, p_e, precision=_EXACT)
    return out


def project_expression(model: MorphableModel, expression_coeffs):
    """p_e moved onto the model's `expression_range` (the nearest allowed coefficients; any
    leading batch axes), or unchanged for an unbounded model."""
    if model.expression_range is None:
        return expression_coeffs
    low, high = model.expression_range
    return jnp.clip(expression_coeffs, low, high)


def vertex_colours(model: MorphableModel, texture_coeffs):
    """Eq. 1: per-vertex albedo (N,3) of the linear texture model, if the model has one."""
    if model.texture_basis is None:
        raise ValueError("this morphable model has no texture PCA (texture_mean/texture_basis)")
    p_t = _coefficients(texture_coeffs, model.texture_basis.shape[-1], "texture_coeffs")
    return model.texture_mean + jnp.einsum("ndt,t->nd", model.texture_basis, p_t, precision=_EXACT)


def landmarks3d(model: MorphableModel, verts):
    """(68,3) model landmark positions, NaN where the model defines no fixed vertex."""
    idx = jnp.asarray(model.landmark_indices)
    picked = verts[jnp.maximum(idx, 0)]
    return jnp.where((idx >= 0)[:, None], picked, jnp.nan)


def vertex_normals(verts, triangles):
    """Area-weighted per-vertex normals (N,3), unit length."""
    a, b, c = verts[triangles[:, 0]], verts[triangles[:, 1]], verts[triangles[:, 2]]
    e1, e2 = b - a, c - a
    # The cross product written out and stacked along the last axis: jnp.cross's moveaxis
    # leaves XLA:CPU a channel-first result to reorder at run time, in the backward pass too.
    face_normals = jnp.stack([e1[:, 1] * e2[:, 2] - e1[:, 2] * e2[:, 1],
                              e1[:, 2] * e2[:, 0] - e1[:, 0] * e2[:, 2],
                              e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]], axis=-1)
    normals = jnp.zeros_like(verts)
    for k in range(3):
        normals = normals.at[triangles[:, k]].add(face_normals)
    return normals / jnp.maximum(jnp.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------
# Construction and validation
# --------------------------------------------------------------------------------------------


def _on_device(x, dtype):
    """A host array on the default device: `jax.device_put` copies it; `jnp.asarray` would
    also compile a program (`jit(stage)`) for every new shape, a dozen at each model load."""
    return jax.device_put(np.asarray(x, dtype))


def _opt_int(x):
    return None if x is None else _on_device(x, np.int32)


def _opt_float(x):
    return None if x is None else _on_device(x, np.float32)


def make_model(mean, shape_basis, expression_basis=None, triangles=None, uv=None,
               landmark_indices=None, contour_right=None, contour_left=None, symmetry=None,
               texture_mean=None, texture_basis=None, source="model",
               expression_range=None) -> MorphableModel:
    """Validates shapes (naming `source` in errors) and builds a MorphableModel of device arrays."""
    mean = np.asarray(mean, np.float32)
    if mean.ndim != 2 or mean.shape[1] != 3:
        raise ValueError(f"{source}: mean must be (N,3), got {mean.shape}")
    n = mean.shape[0]
    shape_basis = np.asarray(shape_basis, np.float32)
    if shape_basis.ndim != 3 or shape_basis.shape[:2] != (n, 3):
        raise ValueError(f"{source}: shape_basis must be ({n},3,S), got {shape_basis.shape}")
    if expression_basis is None:
        expression_basis = np.zeros((n, 3, 0), np.float32)
    expression_basis = np.asarray(expression_basis, np.float32)
    if expression_basis.ndim != 3 or expression_basis.shape[:2] != (n, 3):
        raise ValueError(
            f"{source}: expression_basis must be ({n},3,E), got {expression_basis.shape}")
    triangles = np.asarray(triangles, np.int64)
    if triangles.ndim != 2 or triangles.shape[1] != 3:
        raise ValueError(f"{source}: triangles must be (F,3), got {triangles.shape}")
    if triangles.size and (triangles.min() < 0 or triangles.max() >= n):
        raise ValueError(f"{source}: triangle indices must lie in [0,{n}), "
                         f"got [{triangles.min()},{triangles.max()}]")
    uv = np.zeros((n, 2), np.float32) if uv is None else np.asarray(uv, np.float32)
    if uv.shape != (n, 2):
        raise ValueError(f"{source}: uv must be ({n},2), got {uv.shape}")
    if landmark_indices is None:
        landmark_indices = -np.ones(NUM_LANDMARKS, np.int32)
    landmark_indices = np.asarray(landmark_indices, np.int64)
    if landmark_indices.shape != (NUM_LANDMARKS,) or landmark_indices.max() >= n:
        raise ValueError(f"{source}: landmark_indices must be (68,) vertex indices or -1, "
                         f"got shape {landmark_indices.shape}")
    for name, arr in (("contour_right", contour_right), ("contour_left", contour_left)):
        if arr is not None and (np.asarray(arr).ndim != 1 or np.max(arr) >= n):
            raise ValueError(f"{source}: {name} must be a 1-D list of vertex indices < {n}")
    if symmetry is not None and np.asarray(symmetry).shape != (n,):
        raise ValueError(f"{source}: symmetry must be ({n},), got {np.asarray(symmetry).shape}")
    if (texture_mean is None) != (texture_basis is None):
        raise ValueError(f"{source}: texture_mean and texture_basis come together")
    if texture_mean is not None:
        if np.asarray(texture_mean).shape != (n, 3) or np.asarray(texture_basis).shape[:2] != (n, 3):
            raise ValueError(f"{source}: texture_mean must be ({n},3) and texture_basis ({n},3,T)")
    if expression_range is not None:
        expression_range = np.asarray(expression_range, np.float64).reshape(-1)
        if expression_range.shape != (2,) or not expression_range[0] < expression_range[1]:
            raise ValueError(f"{source}: expression_range must be two numbers low < high, got "
                             f"{expression_range.tolist()}")
        expression_range = (float(expression_range[0]), float(expression_range[1]))
    return MorphableModel(
        mean=_on_device(mean, np.float32), shape_basis=_on_device(shape_basis, np.float32),
        expression_basis=_on_device(expression_basis, np.float32),
        triangles=_on_device(triangles, np.int32), uv=_on_device(uv, np.float32),
        landmark_indices=_on_device(landmark_indices, np.int32),
        contour_right=_opt_int(contour_right), contour_left=_opt_int(contour_left),
        symmetry=_opt_int(symmetry), texture_mean=_opt_float(texture_mean),
        texture_basis=_opt_float(texture_basis), expression_range=expression_range)


# --------------------------------------------------------------------------------------------
# The project's own .npz layout
# --------------------------------------------------------------------------------------------

_NPZ_REQUIRED = ("mean", "shape_basis", "expression_basis", "triangles", "uv", "landmark_indices")
_NPZ_OPTIONAL = ("contour_right", "contour_left", "symmetry", "texture_mean", "texture_basis")


# Blendshapes keep to [0, 1] (MorphableModel.expression_range); eos' and ICT's are blendshapes
BLENDSHAPE_RANGE = (0.0, 1.0)


def save_npz(model: MorphableModel, path, **extra):
    """Writes the project's .npz layout (keys of DESIGN.md / convert_3dmm)."""
    arrays = {k: np.asarray(getattr(model, k)) for k in _NPZ_REQUIRED}
    for k in _NPZ_OPTIONAL:
        if getattr(model, k) is not None:
            arrays[k] = np.asarray(getattr(model, k))
    if model.expression_range is not None:
        arrays["expression_range"] = np.asarray(model.expression_range, np.float32)
    arrays.update(extra)
    np.savez(path, **arrays)


def load_npz(path) -> MorphableModel:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile/ValueError/EOFError: a truncated or foreign file
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("mean", "shape_basis", "triangles") if k not in data.files]
    if missing:
        raise ValueError(f"{path}: .npz model lacks keys {missing}; expected {list(_NPZ_REQUIRED)}")
    get = lambda k: data[k] if k in data.files else None
    return make_model(**{k: get(k) for k in _NPZ_REQUIRED + _NPZ_OPTIONAL}, source=str(path),
                      expression_range=npz_expression_range(data))


def npz_expression_range(data):
    """An .npz model's `expression_range`: its own key (two numbers), else blendshapes' [0, 1]
    where the expressions are named (`expression_names`: ARKit's or FACS' shapes, as in the ICT
    Face Model's file; PCA modes have no names), else None (unbounded)."""
    if "expression_range" in data.files:
        return data["expression_range"]
    if ("expression_names" in data.files and "expression_basis" in data.files
            and data["expression_basis"].shape[-1]):
        return BLENDSHAPE_RANGE
    return None


# --------------------------------------------------------------------------------------------
# eos / Surrey Face Model: cereal binary archives
# --------------------------------------------------------------------------------------------


class _CerealReader:
    """Sequential reader of a cereal portable-binary-less (native little-endian) archive."""

    def __init__(self, path):
        self.path = str(path)
        with open(path, "rb") as f:
            self.buf = f.read()
        self.pos = 0

    def _take(self, nbytes, what):
        if self.pos + nbytes > len(self.buf):
            raise ValueError(f"{self.path}: truncated or not an eos model file (ran out of data "
                             f"reading {what} at byte {self.pos} of {len(self.buf)})")
        out = self.buf[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def u32(self, what="uint32"):
        return struct.unpack("<I", self._take(4, what))[0]

    def u64(self, what="uint64"):
        return struct.unpack("<Q", self._take(8, what))[0]

    def matrix(self, what):
        """An Eigen::MatrixXf: int32 rows, int32 cols, column-major float32 data."""
        rows, cols = struct.unpack("<ii", self._take(8, what))
        if rows < 0 or cols < 0:
            raise ValueError(f"{self.path}: negative {what} size {rows}x{cols}; "
                             "not an eos model file")
        data = np.frombuffer(self._take(4 * rows * cols, what), np.float32)
        return data.reshape(cols, rows).T.copy()

    def array_vector(self, dtype, width, what):
        n = self.u64(what)
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self._take(n * width * itemsize, what), dtype).reshape(n, width).copy()

    def string(self, what):
        n = self.u64(what)
        if n > 4096:
            raise ValueError(f"{self.path}: implausible {what} length {n}")
        return self._take(n, what).decode("utf-8", "replace")

    def pca_model(self, what):
        """eos PcaModel: mean, orthonormal basis, eigenvalues (variances), triangle list."""
        mean = self.matrix(f"{what} mean")
        basis = self.matrix(f"{what} basis")
        eigenvalues = self.matrix(f"{what} eigenvalues")
        triangles = self.array_vector(np.int32, 3, f"{what} triangles")
        return mean, basis, eigenvalues, triangles


def load_eos_shape_model(path):
    """Reads an eos MorphableModel archive (version 1: shape, colour, triangles, texture coords).

    Returns (mean (N,3), shape_basis (N,3,S) scaled by sqrt(eigenvalue), triangles, uv,
    texture_mean, texture_basis); UVs are converted from eos' image convention (v down) to ours.
    """
    r = _CerealReader(path)
    version = r.u32("class version")
    if version != 1:
        raise ValueError(f"{path}: eos MorphableModel archive version {version}; this reader "
                         "knows version 1 (the format of sfm_shape_*.bin)")
    mean, basis, eigenvalues, triangles = r.pca_model("shape model")
    c_mean, c_basis, c_eigenvalues, _ = r.pca_model("colour model")
    uv = r.array_vector(np.float64, 2, "texture coordinates")
    if r.pos != len(r.buf):
        raise ValueError(f"{path}: {len(r.buf) - r.pos} unexpected trailing bytes after the model")
    n = mean.shape[0] // 3
    if mean.shape != (3 * n, 1) or basis.shape[0] != 3 * n or eigenvalues.shape[0] != basis.shape[1]:
        raise ValueError(f"{path}: inconsistent shape model sizes mean {mean.shape}, basis "
                         f"{basis.shape}, eigenvalues {eigenvalues.shape}")
    scaled = basis * np.sqrt(np.maximum(eigenvalues[:, 0], 0.0))[None, :]
    texture_mean = texture_basis = None
    if c_mean.size:
        texture_mean = c_mean.reshape(n, 3)
        texture_basis = (c_basis * np.sqrt(np.maximum(c_eigenvalues[:, 0], 0.0))).reshape(n, 3, -1)
    if uv.shape[0] == n:
        uv = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)
    else:
        uv = None
    return (mean.reshape(n, 3), scaled.reshape(n, 3, -1), triangles, uv, texture_mean,
            texture_basis)


def load_eos_blendshapes(path):
    """Reads an eos vector<Blendshape> archive → (names [E], basis (N,3,E))."""
    r = _CerealReader(path)
    count = r.u64("blendshape count")
    if count > 10000:
        raise ValueError(f"{path}: implausible blendshape count {count}; not an eos blendshape file")
    names, columns = [], []
    for k in range(count):
        names.append(r.string(f"blendshape {k} name"))
        columns.append(r.matrix(f"blendshape {k} deformation")[:, 0])
    if r.pos != len(r.buf):
        raise ValueError(f"{path}: {len(r.buf) - r.pos} unexpected trailing bytes after blendshapes")
    basis = np.stack(columns, axis=1)
    return names, basis.reshape(-1, 3, count)


def load_ibug_mapping(path, num_vertices=None):
    """eos' TOML landmark mapping (ibug → vertex) → (68,) int32 with -1 for unmapped points."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
        mappings = table["landmark_mappings"]
    except (tomllib.TOMLDecodeError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: expected eos' TOML mapping with a [landmark_mappings] table "
                         f"('ibug number = vertex index'): {e}") from None
    out = -np.ones(NUM_LANDMARKS, np.int32)
    for key, vertex in mappings.items():
        k = int(key)
        if not 1 <= k <= NUM_LANDMARKS:
            raise ValueError(f"{path}: landmark number {k} outside the iBUG range 1..68")
        if num_vertices is None or int(vertex) < num_vertices:
            out[k - 1] = int(vertex)
    return out


def load_eos_contours(path):
    """eos' model_contours.json → (right (K,), left (K,)) vertex indices."""
    try:
        with open(path) as f:
            contour = json.load(f)["model_contour"]
        return (np.asarray(contour["right_contour"], np.int32),
                np.asarray(contour["left_contour"], np.int32))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected eos' contour JSON with model_contour.right_contour "
                         f"and left_contour: {e}") from None


def load_symmetry(path):
    """eos' reference_symmetry.txt (1-based, one line per vertex) → (N,) 0-based int32."""
    values = []
    with open(path) as f:
        for line in f:
            field = line.split("#")[0].split()
            if field:
                values.append(int(field[0]) - 1)
    return np.asarray(values, np.int32)


def load_sfm(shape, expression=None, landmarks=None, contours=None, symmetry=None):
    """The Surrey Face Model from eos' share/ files (any of the optional ones may be None)."""
    mean, basis, triangles, uv, t_mean, t_basis = load_eos_shape_model(shape)
    n = mean.shape[0]
    expression_basis = None
    if expression is not None:
        _, expression_basis = load_eos_blendshapes(expression)
        if expression_basis.shape[0] != n:
            raise ValueError(f"{expression}: blendshapes have {expression_basis.shape[0]} "
                             f"vertices, the shape model {shape} has {n}")
    landmark_indices = None if landmarks is None else load_ibug_mapping(landmarks, n)
    right = left = None
    if contours is not None:
        right, left = load_eos_contours(contours)
    sym = None if symmetry is None else load_symmetry(symmetry)
    if sym is not None and sym.shape != (n,):
        sym = None  # reference symmetry is for the 845-vertex reference; ignore it otherwise
    return make_model(mean, basis, expression_basis, triangles, uv, landmark_indices, right, left,
                      sym, t_mean, t_basis, source=str(shape),
                      expression_range=None if expression_basis is None else BLENDSHAPE_RANGE)


def sfm_files(directory):
    """The eos share/ file names beside an sfm_shape_*.bin, those that exist."""
    names = dict(shape="sfm_shape_3448.bin", expression="expression_blendshapes_3448.bin",
                 landmarks="ibug_to_sfm.txt", contours="sfm_model_contours.json",
                 symmetry="sfm_reference_symmetry.txt")
    out = {}
    for key, name in names.items():
        p = os.path.join(directory, name)
        if not os.path.exists(p) and key == "contours":
            p = os.path.join(directory, "model_contours.json")
        if os.path.exists(p):
            out[key] = p
    return out


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

FORMATS = ("npz", "sfm", "bfm2009", "bfm2017", "flame", "lsfm")


def detect_format(path) -> str:
    """Names the format of a model file from its header, or raises listing the known formats."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    with open(path, "rb") as f:
        head = f.read(128)
    if head[:4] == b"PK\x03\x04":
        return "npz"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "bfm2017"
    if head[:10] == b"MATLAB 5.0" or head[:19] == b"MATLAB 7.3 MAT-file":
        return "mat"  # bfm2009 or lsfm, told apart by their variable names
    if head[:1] == b"\x80":
        return "flame"
    if len(head) >= 4 and struct.unpack("<I", head[:4])[0] == 1 and path.endswith(".bin"):
        return "sfm"
    raise ValueError(f"{path}: unknown 3DMM format; known: {', '.join(FORMATS)} "
                     "(.npz, eos .bin, BFM 2009 .mat, BFM 2017 .h5, FLAME .pkl, LSFM .mat)")


def load(path, format=None, **kwargs) -> MorphableModel:
    """Loads any supported model file into a MorphableModel.

    For the SFM, the expression/landmark/contour files beside the .bin are picked up when present
    (override with keyword arguments of `load_sfm`). Other formats: see their loaders.
    """
    path = str(path)
    fmt = format or detect_format(path)
    if fmt == "npz":
        return load_npz(path)
    if fmt == "sfm":
        files = sfm_files(os.path.dirname(os.path.abspath(path)))
        files.update(kwargs)
        files["shape"] = path
        return load_sfm(**files)
    from ganfit_jax import model_formats  # the publishers' other layouts

    if fmt == "mat":
        fmt = model_formats.mat_flavour(path)
    loaders = {"bfm2009": model_formats.load_bfm2009, "bfm2017": model_formats.load_bfm2017,
               "flame": model_formats.load_flame, "lsfm": model_formats.load_lsfm}
    if fmt not in loaders:
        raise ValueError(f"{path}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return loaders[fmt](path, **kwargs)
