"""Publisher formats: small files written in each genuine layout, read back through morphable.load.

Each test computes the expected mesh from the raw fields with NumPy, following the publisher's
own recipe (units, scaling, 1-based indices, winding), and compares with `vertices(model, ...)`.
"""

import importlib.util
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from ganfit_jax import model_formats, morphable

RNG = np.random.default_rng(0)

# A genuine layout must load without the winding fallback kicking in.
pytestmark = pytest.mark.filterwarnings("error:.*face inwards:UserWarning")


def _mask(n=7, radius=100.0, half_width=50.0):
    """A spherical-cap face mask facing +z (mm) and its triangles, counter-clockwise from +z."""
    xs = np.linspace(-half_width, half_width, n)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    z = np.sqrt(radius**2 - x**2 - y**2) - radius + 100.0
    points = np.stack([x, y, z], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = idx[i, j], idx[i + 1, j], idx[i, j + 1], idx[i + 1, j + 1]
            tris += [(a, b, c), (b, d, c)]  # (b-a) = +x, (c-a) = +y: normal +z
    return points, np.asarray(tris, np.int64)


def _orthonormal(rows, cols):
    q, _ = np.linalg.qr(RNG.normal(size=(rows, cols)))
    return q


def _assert_outward(model):
    """The normal at the mask's centre vertex points +z (out of the face, towards a viewer)."""
    verts = morphable.vertices(model, 0.0, 0.0)
    normals = np.asarray(morphable.vertex_normals(verts, model.triangles))
    centre = np.argmin(np.linalg.norm(np.asarray(verts)[:, :2], axis=1))
    assert normals[centre, 2] > 0.99


# ------------------------------------------------------------------------------------------
# BFM 2009
# ------------------------------------------------------------------------------------------


def _bfm2009_fields():
    points, tris = _mask()
    n, s, t = len(points), 5, 4
    return dict(
        shapeMU=(points.reshape(-1, 1) * 1000).astype(np.float32),      # micrometres
        shapePC=_orthonormal(3 * n, s).astype(np.float32),
        shapeEV=np.array([[9000], [5000], [3000], [2000], [1000]], np.float32),  # SDs in um
        texMU=RNG.uniform(60, 200, (3 * n, 1)).astype(np.float32),         # 0..255
        texPC=_orthonormal(3 * n, t).astype(np.float32),
        texEV=np.array([[400], [200], [100], [50]], np.float32),
        tl=(tris[:, [0, 2, 1]] + 1).astype(np.float64),                    # 1-based, clockwise
        segbin=np.zeros((n, 4), np.float64),
    ), tris


def _check_bfm2009(model, f, tris):
    p = np.linspace(-2, 2, 5)
    want = (f["shapeMU"][:, 0] + f["shapePC"] @ (p * f["shapeEV"][:, 0])).reshape(-1, 3) / 1000
    np.testing.assert_allclose(morphable.vertices(model, p, 0.0), want, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(model.triangles), tris)
    q = np.array([1.0, -1.0, 0.5, 2.0])
    want_tex = (f["texMU"][:, 0] + f["texPC"] @ (q * f["texEV"][:, 0])).reshape(-1, 3) / 255
    np.testing.assert_allclose(morphable.vertex_colours(model, q), want_tex, atol=1e-5)
    assert model.num_expression == 0
    _assert_outward(model)


@pytest.mark.parametrize("compressed", [False, True])
def test_bfm2009_v5(tmp_path, compressed):
    f, tris = _bfm2009_fields()
    path = tmp_path / "01_MorphableModel.mat"
    scipy.io.savemat(path, f, format="5", do_compression=compressed)
    assert model_formats.mat_flavour(path) == "bfm2009"
    lm = tmp_path / "bfm_lm.txt"
    lm.write_text("# iBUG-68 → BFM vertex\n" + "\n".join(str(i % 49 - 1) for i in range(68)))
    model = morphable.load(path, landmarks=lm)
    _check_bfm2009(model, f, tris)
    np.testing.assert_array_equal(model.landmark_indices, [i % 49 - 1 for i in range(68)])


def _write_v73(path, fields):
    """MATLAB 7.3: HDF5 with a 512-byte user block and every array stored transposed."""
    with h5py.File(path, "w", userblock_size=512) as h5:
        for name, value in fields.items():
            h5.create_dataset(name, data=np.asarray(value).T)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")


def test_bfm2009_v73(tmp_path):
    f, tris = _bfm2009_fields()
    path = tmp_path / "01_MorphableModel_v73.mat"
    _write_v73(path, f)
    assert morphable.detect_format(path) == "mat"
    _check_bfm2009(morphable.load(path), f, tris)


def test_truncated_and_foreign_mat(tmp_path):
    f, _ = _bfm2009_fields()
    path = tmp_path / "full.mat"
    scipy.io.savemat(path, f, format="5")
    for compressed in (False, True):
        scipy.io.savemat(path, f, format="5", do_compression=compressed)
        cut = tmp_path / "cut.mat"
        cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
        with pytest.raises(ValueError, match="cut.mat.*(truncated|corrupt)"):
            morphable.load(cut)
    v73 = tmp_path / "cut73.mat"
    _write_v73(v73, f)
    v73.write_bytes(v73.read_bytes()[:4000])
    with pytest.raises(ValueError, match="cut73.mat.*(truncated|corrupt)"):
        morphable.load(v73)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"foo": np.zeros(3)})
    with pytest.raises(ValueError, match="other.mat.*neither BFM 2009.*nor LSFM.*foo"):
        morphable.load(other)
    with pytest.raises(FileNotFoundError, match="nope.mat"):
        model_formats.load_bfm2009(tmp_path / "nope.mat")


# ------------------------------------------------------------------------------------------
# BFM 2017
# ------------------------------------------------------------------------------------------


def _write_bfm2017(path, pre_scaled=False, inward=False):
    points, tris = _mask()
    n = len(points)
    shape_var = np.array([40.0, 20.0, 9.0, 4.0], np.float32)  # mm^2
    exp_var = np.array([16.0, 4.0, 1.0], np.float32)
    col_var = np.array([0.01, 0.004], np.float32)
    u_s, u_e, u_c = (_orthonormal(3 * n, k).astype(np.float32) for k in (4, 3, 2))
    exp_mean = RNG.normal(0, 0.5, 3 * n).astype(np.float32)
    f = {
        "shape": (points.reshape(-1).astype(np.float32), u_s, shape_var),
        "expression": (exp_mean, u_e, exp_var),
        "color": (RNG.uniform(0.2, 0.8, 3 * n).astype(np.float32), u_c, col_var),
    }
    with h5py.File(path, "w") as h5:
        for group, (mean, basis, var) in f.items():
            model = h5.create_group(f"{group}/model")
            model["mean"] = mean
            model["pcaBasis"] = basis * np.sqrt(var) if pre_scaled else basis
            model["pcaVariance"] = var
            model["noiseVariance"] = np.float32(0.0)
            rep = h5.create_group(f"{group}/representer")
            rep["points"] = points.T.astype(np.float32)                    # (3, N)
            rep["cells"] = (tris[:, [0, 2, 1]] if inward else tris).T.astype(np.int32)  # (3, F)
        h5.create_group("catalog")
    return f, tris


@pytest.mark.parametrize("pre_scaled", [False, True])
def test_bfm2017(tmp_path, pre_scaled):
    path = tmp_path / "model2017-1_face12_nomouth.h5"
    f, tris = _write_bfm2017(path, pre_scaled)
    assert morphable.detect_format(path) == "bfm2017"
    model = morphable.load(path)
    p, e = np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.3, -1.0, 2.0])
    (s_mean, u_s, s_var), (e_mean, u_e, e_var), (c_mean, u_c, c_var) = (
        f["shape"], f["expression"], f["color"])
    want = s_mean + e_mean + u_s @ (p * np.sqrt(s_var)) + u_e @ (e * np.sqrt(e_var))
    np.testing.assert_allclose(morphable.vertices(model, p, e), want.reshape(-1, 3), atol=1e-4)
    q = np.array([1.5, -0.5])
    np.testing.assert_allclose(morphable.vertex_colours(model, q),
                               (c_mean + u_c @ (q * np.sqrt(c_var))).reshape(-1, 3), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.triangles), tris)
    assert (model.num_shape, model.num_expression) == (4, 3)
    _assert_outward(model)


def test_inward_winding_is_flipped_with_a_warning(tmp_path):
    path = tmp_path / "inward.h5"
    _, tris = _write_bfm2017(path, inward=True)
    with pytest.warns(UserWarning, match="inward.h5.*face inwards"):
        model = model_formats.load_bfm2017(path)
    assert {tuple(np.roll(t, -np.argmin(t))) for t in np.asarray(model.triangles)} == \
        {tuple(np.roll(t, -np.argmin(t))) for t in tris}
    _assert_outward(model)


def test_bfm2017_bad_files(tmp_path):
    path = tmp_path / "model.h5"
    _write_bfm2017(path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match="cut.h5"):
        morphable.load(cut)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="other.h5.*'shape' group"):
        morphable.load(other)


# ------------------------------------------------------------------------------------------
# FLAME
# ------------------------------------------------------------------------------------------

_FAKE_CHUMPY = '''
import numpy as np

class Ch(object):
    """Pickles like chumpy.ch.Ch: __dict__ minus caches, the value in 'x'."""
    def __init__(self, x):
        self.x = np.asarray(x, np.float64)
        self._dirty_vars = set()
        self._itr = None
        self._depends_on_deps = {}
        self._make_dense = False
        self._make_sparse = False
        self._parents = {}
        self._cache = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        del d["_parents"], d["_cache"]
        return d
'''

_WRITER = '''
import pickle, sys
import numpy as np, scipy.sparse
from chumpy.ch import Ch
{extra}
fields = np.load(sys.argv[1])
data = {{
    "v_template": Ch(fields["v_template"]),
    "shapedirs": {shapedirs},
    "posedirs": Ch(fields["posedirs"]),
    "f": fields["f"].astype(np.uint32),
    "J_regressor": scipy.sparse.csc_matrix(fields["J_regressor"]),
    "weights": Ch(fields["weights"]),
    "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
    "J": Ch(fields["J"]),
    "bs_style": "lbs",
    "bs_type": "lrotmin",
}}
with open(sys.argv[2], "wb") as f:
    pickle.dump(data, f, protocol=2)
'''


def _write_flame(tmp_path, shapedirs="Ch(fields['shapedirs'])", extra=""):
    points, tris = _mask()
    n = len(points)
    fields = dict(v_template=points / 1000.0,                                   # metres
                  shapedirs=RNG.normal(0, 1e-3, (n, 3, 7)),                     # 4 shape + 3 exp
                  posedirs=RNG.normal(0, 1e-4, (n, 3, 36)), f=tris,
                  J_regressor=np.full((5, n), 1.0 / n), weights=np.full((n, 5), 0.2),
                  J=np.zeros((5, 3)))
    mods = tmp_path / "fake_modules"
    (mods / "chumpy").mkdir(parents=True)
    (mods / "chumpy" / "__init__.py").write_text("")
    (mods / "chumpy" / "ch.py").write_text(_FAKE_CHUMPY)
    (mods / "chumpy" / "reordering.py").write_text(
        "from chumpy.ch import Ch\nclass Select(Ch):\n    pass\n")
    np.savez(tmp_path / "fields.npz", **fields)
    writer = tmp_path / "write_flame.py"
    writer.write_text(_WRITER.format(shapedirs=shapedirs, extra=extra))
    out = tmp_path / "generic_model.pkl"
    env = dict(os.environ, PYTHONPATH=str(mods))
    subprocess.run([sys.executable, str(writer), str(tmp_path / "fields.npz"), str(out)],
                   check=True, env=env, cwd=tmp_path)
    # Spell the globals as a Python 2 / numpy 1 / old scipy pickle does (protocol 2 GLOBAL
    # opcodes are newline-terminated, so renaming them in place keeps the pickle valid).
    data = out.read_bytes()
    for new, old in ((b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"),
                     (b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")):
        assert new in data
        data = data.replace(new, old)
    out.write_bytes(data)
    return out, fields


def test_flame_without_chumpy(tmp_path):
    path, f = _write_flame(tmp_path)
    assert importlib.util.find_spec("chumpy") is None  # read back with no chumpy anywhere
    assert b"chumpy.ch" in path.read_bytes()
    assert morphable.detect_format(path) == "flame"
    model = morphable.load(path, num_shape=4)
    p, e = np.array([1.0, -1.0, 2.0, 0.5]), np.array([0.5, 1.0, -2.0])
    want = (f["v_template"] + f["shapedirs"][..., :4] @ p + f["shapedirs"][..., 4:] @ e) * 1000
    np.testing.assert_allclose(morphable.vertices(model, p, e), want, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(model.triangles), f["f"])
    assert (model.num_shape, model.num_expression) == (4, 3)
    _assert_outward(model)
    raw = model_formats.read_flame_pickle(path)
    assert isinstance(raw["J_regressor"], scipy.sparse.spmatrix | scipy.sparse.sparray)
    np.testing.assert_allclose(raw["posedirs"], f["posedirs"])


def test_flame_chumpy_expression_and_bad_pickles(tmp_path):
    path, _ = _write_flame(tmp_path, shapedirs="Select(fields['shapedirs'])",
                           extra="from chumpy.reordering import Select")
    with pytest.raises(ValueError, match="shapedirs.*chumpy expression.*reordering.Select"):
        morphable.load(path)
    cut = tmp_path / "cut.pkl"
    good, _ = _write_flame(tmp_path / "again")
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="cut.pkl.*truncated or corrupt"):
        morphable.load(cut)
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"v_template": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="evil.pkl.*refusing to load posix.getcwd"):
        morphable.load(evil)


# ------------------------------------------------------------------------------------------
# LSFM
# ------------------------------------------------------------------------------------------


def test_lsfm(tmp_path):
    points, tris = _mask()
    n, k = len(points), 6
    var = np.linspace(50, 2, k)
    f = dict(mean=points.reshape(-1), components=_orthonormal(3 * n, k), eigenvalues=var,
             cumulative_explained_variance=np.cumsum(var) / var.sum() * 0.998,
             trilist=tris.astype(np.int32), n_training_samples=8402)
    path = tmp_path / "all_all_all.mat"
    scipy.io.savemat(path, f)
    assert model_formats.mat_flavour(path) == "lsfm"
    model = morphable.load(path, landmarks=np.arange(68) % 50 - 1)
    p = RNG.normal(size=k)
    want = (f["mean"] + f["components"] @ (p * np.sqrt(var))).reshape(-1, 3)
    np.testing.assert_allclose(morphable.vertices(model, p, 0.0), want, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(model.triangles), tris)
    assert model.landmark_indices[0] == -1 and model.landmark_indices[67] == 16
    _assert_outward(model)


def test_landmark_file_errors(tmp_path):
    bad = tmp_path / "lm.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="lm.txt.*68 integer vertex indices.*got 3"):
        model_formats.load_landmark_indices(bad, 10)
    np.save(tmp_path / "lm.npy", np.full(68, 10))
    with pytest.raises(ValueError, match=r"lm.npy.*\[-1, 10\)"):
        model_formats.load_landmark_indices(tmp_path / "lm.npy", 10)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        model_formats.load_landmark_indices(tmp_path / "missing.txt", 10)


# ------------------------------------------------------------------------------------------
# Real models: the geometric winding check agrees with their known-good winding; ICT via load
# ------------------------------------------------------------------------------------------


def test_real_models_face_outward(sfm_model, ict_path):
    assert model_formats.outward_score(sfm_model.mean, sfm_model.triangles) > 0.3
    ict = np.load(ict_path)
    assert model_formats.outward_score(ict["mean"], ict["triangles"]) > 0.3
    assert model_formats.outward_score(ict["mean"], ict["triangles"][:, ::-1]) < -0.3


def test_ict_npz_loads(ict_path):
    raw = np.load(ict_path)
    model = morphable.load(ict_path)
    assert (model.num_vertices, model.num_shape, model.num_expression) == (9409, 100, 53)
    c = np.random.default_rng(1).normal(size=100)
    e = np.zeros(53)
    e[5] = 0.7
    want = (raw["mean"].astype(np.float64) + raw["shape_basis"].astype(np.float64) @ c
            + raw["expression_basis"].astype(np.float64) @ e)
    np.testing.assert_allclose(morphable.vertices(model, c, e), want, atol=1e-3)
    np.testing.assert_array_equal(model.landmark_indices, raw["landmark_indices"])
