"""Loaders for the publishers' 3DMM files other than eos' .bin (which lives in morphable.py).

Each loader returns `morphable.make_model(...)`: mean in millimetres, identity basis scaled to
standard deviations (so the shape prior, Reg of GANFIT's Eq. 12, is a plain squared norm),
triangles 0-based and counter-clockwise seen from outside, per-vertex uv (zeros where the
publisher ships none), landmark_indices (68,) with -1 (none of these files names iBUG vertices;
pass `landmarks=`).

What each publisher ships, and the evidence for it:

* Basel Face Model 2009, `01_MorphableModel.mat` (MATLAB v5; some copies re-saved as v7.3):
  shapeMU (3N,1), shapePC (3N,199) orthonormal columns, shapeEV (199,1) *standard deviations*,
  texMU/texPC/texEV likewise with colours in 0..255, tl (F,3) 1-based, all float32 except tl.
  Units micrometres. The triangles are wound clockwise seen from outside.
  Evidence: eos share/scripts/convert-bfm2009-to-eos.py ("These are standard deviations, not
  eigenvalues", "float32", "tl - 1", "front-facing triangles defined the wrong way round ... we
  swap the indices", colours /255); units: unibas-gravis/basel-face-model-viewer issue #20
  (B. Egger: "BFM 2009 micrometer, BFM 2017 and 2019 millimeter").
* Basel Face Model 2017, `model2017-1_bfm_nomouth.h5` / `..._face12_nomouth.h5` (statismo HDF5):
  {shape,expression,color}/model/{mean (3N,), pcaBasis (3N,K), pcaVariance (K,)},
  shape/representer/{points (3,N), cells (3,F)}. pcaBasis has unit-norm orthogonal columns
  and pcaVariance holds variances (eos share/scripts/convert-bfm2017-to-eos.py); millimetres
  (issue above); colours already in [0,1]. eos draws a face as shape sample + expression sample,
  each including its own mean, so the expression mean is folded into our mean here.
* FLAME, `generic_model.pkl` (Python 2 pickle, chumpy objects inside): v_template (5023,3),
  shapedirs (5023,3,400) = 300 identity + 100 expression components in FLAME 2020, already
  multiplied by their standard deviations (T. Bolkart, TimoBolkart/TF_FLAME issue #7 and
  Rubikplayer/flame-fitting issue #20), f (9976,3), posedirs (5023,3,36), J_regressor (5,5023)
  scipy.sparse, weights (5023,5), kintree_table (2,5). Metres. Read here without chumpy: its
  `Ch` objects are mapped to a stand-in that keeps the array chumpy stored in state['x'].
  Only the linear part (Eq. 2) is used; pose/skinning fields are ignored.
* LSFM (menpo/lsfm MODELS.md): `mean` (3N,) ordered x1,y1,z1,..., `components` (3N,K) unit
  eigenvectors, `eigenvalues` (K,) variances, `trilist` (F,3) 0-based, `n_training_samples`,
  `cumulative_explained_variance`. MODELS.md states no unit; we assume millimetres (`scale=`
  overrides it).

Publishers' winding is applied first, then checked against the geometry (area-weighted normals
against the direction from the mesh centroid); a mesh that still faces inwards is flipped with a
warning, so a wrong assumption about any of the above cannot silently turn the face inside out.
"""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np

from ganfit_jax import morphable

MICROMETRES, MILLIMETRES, METRES = 1e-3, 1.0, 1e3  # multipliers to millimetres


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _require_file(path):
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    return path


def load_landmark_indices(source, num_vertices=None, name="landmarks"):
    """68 iBUG vertex indices (0-based, -1 = none) from an array, a .npy or a text file.

    Text files hold 68 integers separated by whitespace, commas or newlines; '#' starts a comment.
    """
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such landmark file")
        try:
            if path.endswith(".npy"):
                values = np.load(path, allow_pickle=False)
            else:
                with open(path) as f:
                    text = " ".join(line.split("#")[0] for line in f)
                values = np.array([int(float(t)) for t in text.replace(",", " ").split()])
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: expected 68 integer vertex indices ({e})") from None
        where = path
    else:
        values, where = np.asarray(source), name
    values = np.asarray(values).reshape(-1)
    if values.shape != (morphable.NUM_LANDMARKS,) or not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{where}: expected 68 integer vertex indices (-1 for none), "
                         f"got {values.size} values")
    values = values.astype(np.int64)
    if values.min() < -1 or (num_vertices is not None and values.max() >= num_vertices):
        raise ValueError(f"{where}: landmark indices must lie in [-1, {num_vertices}), got "
                         f"[{values.min()}, {values.max()}]")
    return values.astype(np.int32)


def outward_score(points, triangles):
    """Area-weighted mean of cos(normal, position - centroid) over faces; > 0 means outward.

    The right-hand-rule normal of a counter-clockwise (seen from outside) triangle points away
    from the body, i.e. roughly along its offset from the centroid, for closed heads and for
    the open, convex-ish face masks that 3DMMs are.
    """
    p = np.asarray(points, np.float64)
    t = np.asarray(triangles, np.int64)
    a, b, c = p[t[:, 0]], p[t[:, 1]], p[t[:, 2]]
    area_normal = np.cross(b - a, c - a)
    offset = (a + b + c) / 3.0 - p.mean(axis=0)
    offset /= np.maximum(np.linalg.norm(offset, axis=1, keepdims=True), 1e-12)
    total = np.sum(np.linalg.norm(area_normal, axis=1))
    return float(np.sum(area_normal * offset) / max(total, 1e-30))


def _orient(points, triangles, source):
    if triangles.size and outward_score(points, triangles) < 0:
        warnings.warn(f"{source}: triangles face inwards after the publisher's convention; "
                      "flipping them to counter-clockwise seen from outside")
        triangles = triangles[:, [0, 2, 1]]
    return triangles


def _std_scaled(basis, spread, spread_is, source, what):
    """basis (3N,K) with orthonormal columns → columns scaled to one standard deviation.

    `spread` holds per-component 'std' or 'var'. If the columns are not unit length but already
    have the standard deviations as their norms (a re-exported file), they are kept as they are.
    """
    basis = np.asarray(basis, np.float64)
    spread = np.asarray(spread, np.float64).reshape(-1)
    if basis.ndim != 2 or spread.shape != (basis.shape[1],):
        raise ValueError(f"{source}: {what} basis {basis.shape} and its "
                         f"{'standard deviations' if spread_is == 'std' else 'variances'} "
                         f"{spread.shape} do not match")
    std = spread if spread_is == "std" else np.sqrt(np.maximum(spread, 0.0))
    norms = np.linalg.norm(basis, axis=0)
    if basis.shape[1] and not np.allclose(norms, 1.0, rtol=1e-2, atol=1e-3):
        if np.allclose(norms, std, rtol=1e-2):
            return basis  # already scaled by the standard deviations
        raise ValueError(f"{source}: {what} basis columns have norms {norms[:3]}..., neither "
                         f"unit length nor the standard deviations {std[:3]}...")
    return basis * std[None, :]


def _per_vertex(flat, source, what):
    """(3N,) or (3N,K) ordered x1,y1,z1,... → (N,3) or (N,3,K)."""
    flat = np.asarray(flat)
    if flat.shape[0] % 3:
        raise ValueError(f"{source}: {what} has {flat.shape[0]} rows, not a multiple of 3")
    return flat.reshape(flat.shape[0] // 3, 3, *flat.shape[1:])


# --------------------------------------------------------------------------------------------
# MATLAB files (v5 via scipy, v7.3 via h5py)
# --------------------------------------------------------------------------------------------


def _is_v73(path):
    with open(path, "rb") as f:
        head = f.read(128)
    if head[:19] == b"MATLAB 7.3 MAT-file" or head[:8] == b"\x89HDF\r\n\x1a\n":
        return True
    if head[:10] == b"MATLAB 5.0":
        return False
    raise ValueError(f"{path}: not a MATLAB .mat file (header {head[:20]!r})")


def _check_v5_complete(path):
    """Walks a v5 file's top-level data elements; scipy lists a truncated file's first ones."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(128)
        order = "<" if header[126:128] == b"IM" else ">"
        pos = 128
        while pos < size:
            f.seek(pos)
            tag = f.read(8)
            if len(tag) < 8:
                break
            dtype, nbytes = (int(v) for v in np.frombuffer(tag, f"{order}u4"))
            pos += 8 + nbytes
            if dtype != 15:  # miMATRIX elements are padded to 8 bytes; miCOMPRESSED ones are not
                pos += (-pos) % 8
    if pos > size:
        raise ValueError(f"{path}: truncated MATLAB file (a variable needs {pos} bytes, the "
                         f"file has {size})")


def mat_variables(path):
    """Names of the variables in a MATLAB v5 or v7.3 file, without reading their data."""
    path = _require_file(path)
    v73 = _is_v73(path)
    if not v73:
        _check_v5_complete(path)
    try:
        if v73:
            import h5py

            with h5py.File(path, "r") as f:
                return [k for k in f.keys() if not k.startswith("#")]
        import scipy.io

        return [name for name, _, _ in scipy.io.whosmat(path)]
    except (OSError, ValueError, EOFError, TypeError) as e:
        raise ValueError(f"{path}: unreadable MATLAB file, truncated or corrupt ({e})") from None


def read_mat(path, names, optional=()):
    """{name: array} in MATLAB's own shape (v7.3 datasets are transposed back), v5 or v7.3."""
    path = _require_file(path)
    present = set(mat_variables(path))
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"{path}: lacks MATLAB variables {missing}; found {sorted(present)}")
    wanted = [n for n in list(names) + list(optional) if n in present]
    try:
        if _is_v73(path):
            import h5py

            with h5py.File(path, "r") as f:
                # MATLAB writes column-major, so HDF5 sees every array with its axes reversed.
                return {n: np.asarray(f[n][()]).T for n in wanted}
        import scipy.io

        return dict((n, v) for n, v in scipy.io.loadmat(path, variable_names=wanted).items()
                    if n in wanted)
    except (OSError, ValueError, EOFError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: could not read {wanted}: truncated or corrupt MATLAB file "
                         f"({e})") from None


def mat_flavour(path) -> str:
    """'bfm2009' or 'lsfm' from a .mat file's variable names, or a ValueError naming both."""
    names = set(mat_variables(path))
    if {"shapeMU", "shapePC", "shapeEV", "tl"} <= names:
        return "bfm2009"
    if {"mean", "components", "eigenvalues", "trilist"} <= names:
        return "lsfm"
    raise ValueError(f"{path}: a MATLAB file, but neither BFM 2009 (shapeMU, shapePC, shapeEV, "
                     f"tl) nor LSFM (mean, components, eigenvalues, trilist); it holds "
                     f"{sorted(names)}")


# --------------------------------------------------------------------------------------------
# Basel Face Model 2009
# --------------------------------------------------------------------------------------------


def load_bfm2009(path, landmarks=None, scale=MICROMETRES, texture=True):
    """BFM 2009 `01_MorphableModel.mat` → MorphableModel (no expressions: E = 0).

    Args:
      path: the .mat file (v5 or v7.3).
      landmarks: optional 68 vertex indices (array, .npy or text file), 0-based, -1 = none.
      scale: multiplier to millimetres (the file is in micrometres).
      texture: also load the colour PCA (texMU/texPC/texEV) as texture_mean/basis in [0,1].
    """
    path = _require_file(path)
    tex_names = ("texMU", "texPC", "texEV") if texture else ()
    m = read_mat(path, ("shapeMU", "shapePC", "shapeEV", "tl"), optional=tex_names)
    mean = _per_vertex(np.asarray(m["shapeMU"], np.float64).reshape(-1), path, "shapeMU")
    n = mean.shape[0]
    basis = _std_scaled(m["shapePC"], m["shapeEV"], "std", path, "shape")
    if basis.shape[0] != 3 * n:
        raise ValueError(f"{path}: shapePC has {basis.shape[0]} rows, shapeMU {3 * n}")
    tl = np.asarray(m["tl"])
    if tl.ndim != 2 or 3 not in tl.shape:
        raise ValueError(f"{path}: tl must be (F,3) 1-based vertex indices, got {tl.shape}")
    tl = tl if tl.shape[1] == 3 else tl.T
    if tl.size and tl.min() < 1:
        raise ValueError(f"{path}: tl must be 1-based (MATLAB) indices, found {tl.min()}")
    # 1-based → 0-based, and clockwise → counter-clockwise (eos' BFM 2009 converter swaps too).
    triangles = (np.rint(tl).astype(np.int64) - 1)[:, [0, 2, 1]]
    mean_mm = mean * scale
    triangles = _orient(mean_mm, triangles, path)
    t_mean = t_basis = None
    if texture and all(k in m for k in tex_names):
        t_mean = _per_vertex(np.asarray(m["texMU"], np.float64).reshape(-1), path, "texMU") / 255
        t_basis = _per_vertex(_std_scaled(m["texPC"], m["texEV"], "std", path, "texture") / 255,
                              path, "texPC")
    return morphable.make_model(
        mean_mm, _per_vertex(basis, path, "shapePC") * scale, None, triangles, None,
        load_landmark_indices(landmarks, n), texture_mean=t_mean, texture_basis=t_basis,
        source=path)


# --------------------------------------------------------------------------------------------
# Basel Face Model 2017 (statismo HDF5)
# --------------------------------------------------------------------------------------------


def _h5_pca(f, group, path):
    try:
        g = f[group]["model"]
        return (np.asarray(g["mean"][()], np.float64).reshape(-1),
                np.asarray(g["pcaBasis"][()], np.float64),
                np.asarray(g["pcaVariance"][()], np.float64).reshape(-1))
    except KeyError as e:
        raise ValueError(f"{path}: statismo group {group}/model lacks mean/pcaBasis/pcaVariance "
                         f"({e})") from None


def load_bfm2017(path, landmarks=None, scale=MILLIMETRES, expression=True, texture=True):
    """BFM 2017 statismo `.h5` (bfm_nomouth or face12_nomouth) → MorphableModel.

    The expression model (100 components in the 2017 release) becomes expression_basis, scaled to
    standard deviations like the identity basis; its mean is added to the identity mean.
    """
    path = _require_file(path)
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file, truncated or corrupt ({e})") from None
    with f:
        if "shape" not in f:
            raise ValueError(f"{path}: HDF5 file without a 'shape' group; expected the statismo "
                             f"layout of BFM 2017 (shape/, expression/, color/), found "
                             f"{sorted(f.keys())}")
        try:
            mean, basis, var = _h5_pca(f, "shape", path)
            cells = np.asarray(f["shape"]["representer"]["cells"][()])
            exp = _h5_pca(f, "expression", path) if expression and "expression" in f else None
            col = _h5_pca(f, "color", path) if texture and "color" in f else None
        except (OSError, KeyError) as e:
            raise ValueError(f"{path}: truncated or corrupt BFM 2017 file ({e})") from None
    n = mean.size // 3
    shape_basis = _per_vertex(_std_scaled(basis, var, "var", path, "shape"), path, "pcaBasis")
    mean = _per_vertex(mean, path, "shape mean")
    expression_basis = None
    if exp is not None:
        e_mean, e_basis, e_var = exp
        if e_mean.size != 3 * n:
            raise ValueError(f"{path}: expression mean has {e_mean.size} values, shape {3 * n}")
        mean = mean + _per_vertex(e_mean, path, "expression mean")
        expression_basis = _per_vertex(_std_scaled(e_basis, e_var, "var", path, "expression"),
                                       path, "expression pcaBasis") * scale
    if cells.ndim != 2 or cells.shape[0] != 3:
        raise ValueError(f"{path}: shape/representer/cells must be (3,F), got {cells.shape}")
    triangles = _orient(mean * scale, cells.T.astype(np.int64), path)
    t_mean = t_basis = None
    if col is not None and col[0].size == 3 * n:
        t_mean = _per_vertex(col[0], path, "color mean")
        t_basis = _per_vertex(_std_scaled(col[1], col[2], "var", path, "color"), path, "color")
    return morphable.make_model(
        mean * scale, shape_basis * scale, expression_basis, triangles, None,
        load_landmark_indices(landmarks, n), texture_mean=t_mean, texture_basis=t_basis,
        source=path)


# --------------------------------------------------------------------------------------------
# FLAME (Python 2 pickle with chumpy objects), read without chumpy
# --------------------------------------------------------------------------------------------


class _ChumpyStandIn:
    """Takes the place of any chumpy class while unpickling; keeps chumpy's state dict.

    chumpy's Ch.__getstate__ returns its __dict__ (minus caches); a plain `Ch` keeps its value
    in 'x'. Expression nodes (Select, add, ...) have no 'x' and cannot be evaluated here.
    """

    chumpy_name = "chumpy.ch.Ch"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"x": state}


class _FlameUnpickler(pickle.Unpickler):
    """Allows only the modules a FLAME/SMPL pickle needs, and stands in for chumpy."""

    _stand_ins: dict = {}

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            key = f"{module}.{name}"
            if key not in self._stand_ins:
                self._stand_ins[key] = type(f"ChumpyStandIn_{name}", (_ChumpyStandIn,),
                                            {"chumpy_name": key})
            return self._stand_ins[key]
        if module.startswith("numpy.core"):  # numpy 2 renamed numpy.core → numpy._core
            module = "numpy._core" + module[len("numpy.core"):]
        if module.startswith("scipy.sparse"):  # scipy.sparse.csc etc. became private
            import scipy.sparse

            if hasattr(scipy.sparse, name):
                return getattr(scipy.sparse, name)
        allowed = ("numpy", "scipy", "copy_reg", "copyreg", "__builtin__", "builtins",
                   "_codecs", "collections")
        if module.split(".")[0] not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model pickle")
        return super().find_class(module, name)


def _unchumpy(value, key, path):
    if isinstance(value, _ChumpyStandIn):
        if type(value).chumpy_name.endswith(".Ch") and "x" in getattr(value, "state", {}):
            return np.asarray(value.state["x"])
        raise ValueError(f"{path}: field {key!r} is a chumpy expression "
                         f"({type(value).chumpy_name}) that cannot be evaluated without chumpy; "
                         "re-save the model with its arrays evaluated (`.r`)")
    return value


def read_flame_pickle(path):
    """The FLAME/SMPL pickle as a dict of NumPy arrays (chumpy arrays unwrapped)."""
    path = _require_file(path)
    try:
        with open(path, "rb") as f:
            data = _FlameUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: not a readable FLAME pickle, truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a pickled dict (FLAME generic_model.pkl), got "
                         f"{type(data).__name__}")
    return {k: _unchumpy(v, k, path) for k, v in data.items()}


def load_flame(path, landmarks=None, num_shape=300, scale=METRES):
    """FLAME `generic_model.pkl` → MorphableModel (linear part only: zero pose).

    shapedirs[..., :num_shape] is the identity basis, the rest (100 in FLAME 2020) expression;
    both are already in units of standard deviations. Pose correctives and skinning are not used.
    """
    path = _require_file(path)
    data = read_flame_pickle(path)
    missing = [k for k in ("v_template", "shapedirs", "f") if k not in data]
    if missing:
        raise ValueError(f"{path}: FLAME pickle lacks {missing}; has {sorted(data)}")
    v = np.asarray(data["v_template"], np.float64)
    dirs = np.asarray(data["shapedirs"], np.float64)
    faces = np.asarray(data["f"]).astype(np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or dirs.shape[:2] != v.shape or dirs.ndim != 3:
        raise ValueError(f"{path}: expected v_template (N,3) and shapedirs (N,3,K), got "
                         f"{v.shape} and {dirs.shape}")
    k = min(num_shape, dirs.shape[2])
    triangles = _orient(v * scale, faces, path)
    return morphable.make_model(v * scale, dirs[..., :k] * scale, dirs[..., k:] * scale,
                                triangles, None, load_landmark_indices(landmarks, v.shape[0]),
                                source=path)


# --------------------------------------------------------------------------------------------
# LSFM (menpo/lsfm .mat)
# --------------------------------------------------------------------------------------------


def load_lsfm(path, landmarks=None, scale=MILLIMETRES):
    """LSFM `.mat` (e.g. all_all_all.mat, 158 components) → MorphableModel (E = 0)."""
    path = _require_file(path)
    m = read_mat(path, ("mean", "components", "eigenvalues", "trilist"))
    mean = _per_vertex(np.asarray(m["mean"], np.float64).reshape(-1), path, "mean")
    n = mean.shape[0]
    components = np.asarray(m["components"], np.float64)
    if components.ndim != 2 or 3 * n not in components.shape:
        raise ValueError(f"{path}: components must be ({3 * n}, K), got {components.shape}")
    if components.shape[0] != 3 * n:  # a transposed re-export, (K, 3N)
        components = components.T
    basis = _std_scaled(components, m["eigenvalues"], "var", path, "shape")
    trilist = np.asarray(m["trilist"])
    if trilist.ndim != 2 or trilist.shape[1] != 3:
        raise ValueError(f"{path}: trilist must be (F,3) 0-based, got {trilist.shape}")
    triangles = _orient(mean * scale, trilist.astype(np.int64), path)
    return morphable.make_model(mean * scale, _per_vertex(basis, path, "components") * scale,
                                None, triangles, None, load_landmark_indices(landmarks, n),
                                source=path)
