"""The 3DMM (Eq. 2) on the real Surrey Face Model, against eos' own loader and NumPy references."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import morphable


def test_sfm_loads_with_expected_sizes(sfm_model):
    m = sfm_model
    assert m.mean.shape == (3448, 3)
    assert m.shape_basis.shape == (3448, 3, 63)
    assert m.expression_basis.shape == (3448, 3, 6)
    assert m.triangles.shape == (6736, 3)
    assert m.uv.shape == (3448, 2)
    lm = np.asarray(m.landmark_indices)
    # iBUG 1-8 and 10-17 (the moving jaw line) have no fixed vertex; 9 (chin) and 31 (nose) do.
    assert (lm[:8] == -1).all() and (lm[9:17] == -1).all()
    assert lm[8] == 33 and lm[30] == 114
    assert m.contour_right.shape == (17,) and m.contour_left.shape == (17,)


def test_sfm_matches_eos_py(sfm_dir, sfm_model):
    eos = pytest.importorskip("eos", reason="eos-py is the independent reference loader")
    ref = eos.morphablemodel.load_model(str(sfm_dir / "sfm_shape_3448.bin"))
    shape = ref.get_shape_model()
    np.testing.assert_allclose(np.asarray(sfm_model.mean).ravel(), np.asarray(shape.get_mean()),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(sfm_model.shape_basis).reshape(-1, 63),
                               np.asarray(shape.get_rescaled_pca_basis()), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sfm_model.triangles),
                                  np.asarray(shape.get_triangle_list()))
    uv_eos = np.asarray(ref.get_texture_coordinates())
    np.testing.assert_allclose(np.asarray(sfm_model.uv), np.c_[uv_eos[:, 0], 1 - uv_eos[:, 1]],
                               atol=1e-6)
    blend = eos.morphablemodel.load_blendshapes(str(sfm_dir / "expression_blendshapes_3448.bin"))
    for k, b in enumerate(blend):
        np.testing.assert_allclose(np.asarray(sfm_model.expression_basis[:, :, k]).ravel(),
                                   np.asarray(b.deformation), atol=1e-5)
    mapper = eos.core.LandmarkMapper(str(sfm_dir / "ibug_to_sfm.txt"))
    for k in (9, 31, 37, 46, 49, 55):
        assert int(mapper.convert(str(k))) == int(sfm_model.landmark_indices[k - 1])


def test_sfm_geometry_conventions(sfm_model):
    """mm units, face along +z, +x = subject's left, v up: what the camera and texture assume."""
    mean = np.asarray(sfm_model.mean)
    lm = np.asarray(sfm_model.landmark_indices)
    eye_r, eye_l = mean[lm[36]], mean[lm[45]]  # outer eye corners, subject's right / left
    assert 80 < np.linalg.norm(eye_l - eye_r) < 100
    assert eye_l[0] > 0 > eye_r[0]
    assert mean[lm[30], 2] > mean[:, 2].max() - 5  # nose tip is (nearly) the frontmost point
    uv = np.asarray(sfm_model.uv)
    assert uv[lm[8], 1] < uv[lm[19], 1]  # chin below brow in v-up UV


def test_vertices_at_zero_is_mean(sfm_model):
    np.testing.assert_array_equal(np.asarray(morphable.vertices(sfm_model, 0, 0)),
                                  np.asarray(sfm_model.mean))


def test_vertices_matches_numpy(sfm_model):
    rng = np.random.default_rng(0)
    ps, pe = rng.normal(size=63), rng.normal(size=6) * 0.5
    ref = (np.asarray(sfm_model.mean, np.float64)
           + np.asarray(sfm_model.shape_basis, np.float64) @ ps
           + np.asarray(sfm_model.expression_basis, np.float64) @ pe)
    got = morphable.vertices(sfm_model, jnp.asarray(ps, jnp.float32), jnp.asarray(pe, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-3)
    # one SD of the first mode moves the mesh by millimetres, as a face model in mm should
    d = np.linalg.norm(np.asarray(sfm_model.shape_basis[:, :, 0]), axis=1)
    assert 1.0 < np.median(d) < 20.0


def test_vertices_gradient_matches_finite_differences(sfm_model):
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(3448, 3)), jnp.float32)
    f = lambda ps, pe: jnp.sum(w * morphable.vertices(sfm_model, ps, pe)) / 3448.0
    ps, pe = jnp.zeros(63), jnp.zeros(6)
    gs, ge = jax.grad(f, argnums=(0, 1))(ps, pe)
    eps = 1e-1
    for k in (0, 5, 62):
        e = jnp.zeros(63).at[k].set(eps)
        fd = (f(ps + e, pe) - f(ps - e, pe)) / (2 * eps)
        np.testing.assert_allclose(gs[k], fd, rtol=1e-3, atol=1e-4)
    e = jnp.zeros(6).at[3].set(eps)
    np.testing.assert_allclose(ge[3], (f(ps, pe + e) - f(ps, pe - e)) / (2 * eps), rtol=1e-3,
                               atol=1e-4)


def test_vmap_equals_loop(sfm_model):
    rng = np.random.default_rng(2)
    ps = jnp.asarray(rng.normal(size=(4, 63)), jnp.float32)
    pe = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    batched = jax.jit(jax.vmap(morphable.vertices, in_axes=(None, 0, 0)))(sfm_model, ps, pe)
    for i in range(4):
        np.testing.assert_allclose(np.asarray(batched[i]),
                                   np.asarray(morphable.vertices(sfm_model, ps[i], pe[i])),
                                   atol=1e-4)


def test_landmarks3d_nan_where_undefined(sfm_model):
    lm3 = np.asarray(morphable.landmarks3d(sfm_model, sfm_model.mean))
    defined = np.asarray(sfm_model.landmark_indices) >= 0
    assert np.isnan(lm3[~defined]).all() and np.isfinite(lm3[defined]).all()
    np.testing.assert_array_equal(lm3[30], np.asarray(sfm_model.mean)[114])


def test_vertex_normals_point_outward(sfm_model):
    n = np.asarray(morphable.vertex_normals(sfm_model.mean, sfm_model.triangles))
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    nose = int(sfm_model.landmark_indices[30])
    assert n[nose, 2] > 0.8  # the face looks along +z, so the nose tip's normal does too


def test_npz_round_trip(sfm_model, tmp_path):
    path = tmp_path / "m.npz"
    morphable.save_npz(sfm_model, path)
    back = morphable.load(path)
    for k in ("mean", "shape_basis", "expression_basis", "triangles", "uv", "landmark_indices",
              "contour_left", "contour_right"):
        np.testing.assert_array_equal(np.asarray(getattr(back, k)), np.asarray(getattr(sfm_model, k)))


def test_ict_npz_loads(ict_path):
    m = morphable.load(ict_path)
    assert m.mean.shape == (9409, 3) and m.num_shape == 100 and m.num_expression == 53
    assert int(np.sum(np.asarray(m.landmark_indices) >= 0)) == 68
    # named expressions (ARKit's blendshapes) keep to [0, 1]
    assert m.expression_range == (0.0, 1.0)


def test_blendshapes_keep_to_their_range_and_pca_expressions_do_not(sfm_model, tmp_path):
    assert sfm_model.expression_range == (0.0, 1.0)  # eos' blendshapes
    p_e = jnp.asarray([-0.5, 0.25, 1.75, 0.0, 1.0, -2.0])
    np.testing.assert_array_equal(np.asarray(morphable.project_expression(sfm_model, p_e)),
                                  [0.0, 0.25, 1.0, 0.0, 1.0, 0.0])
    batch = jnp.stack([p_e, -p_e])  # any leading axes
    assert morphable.project_expression(sfm_model, batch).shape == (2, 6)
    pca = sfm_model.replace(expression_range=None)
    assert morphable.project_expression(pca, p_e) is p_e
    # the .npz keeps the range; a file of unnamed expressions without one is unbounded (PCA)
    morphable.save_npz(sfm_model.replace(expression_range=(-1.0, 2.0)), tmp_path / "r.npz")
    assert morphable.load(tmp_path / "r.npz").expression_range == (-1.0, 2.0)
    morphable.save_npz(pca, tmp_path / "pca.npz")
    assert morphable.load(tmp_path / "pca.npz").expression_range is None
    morphable.save_npz(pca, tmp_path / "named.npz", expression_names=np.array(list("abcdef")))
    assert morphable.load(tmp_path / "named.npz").expression_range == (0.0, 1.0)
    assert "expression_range=[0,1]" in sfm_model.summary()
    with pytest.raises(ValueError, match="bad.npz: expression_range must be two numbers"):
        morphable.make_model(np.asarray(sfm_model.mean), np.asarray(sfm_model.shape_basis),
                             np.asarray(sfm_model.expression_basis),
                             np.asarray(sfm_model.triangles), source="bad.npz",
                             expression_range=(1.0, 0.0))


# ---------------------------------------------------------------- bad input ----------------


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        morphable.load(tmp_path / "nope.bin")


def test_unknown_format_lists_known(tmp_path):
    p = tmp_path / "model.xyz"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"model.xyz: unknown 3DMM format; known: npz, sfm"):
        morphable.load(p)


def test_truncated_sfm_names_file(sfm_dir, tmp_path):
    data = (sfm_dir / "sfm_shape_3448.bin").read_bytes()
    p = tmp_path / "sfm_shape_3448.bin"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"sfm_shape_3448.bin: truncated or not an eos model"):
        morphable.load(p)


def test_corrupt_npz_names_file(tmp_path):
    p = tmp_path / "broken.npz"
    p.write_bytes(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(ValueError, match="broken.npz: not a readable .npz"):
        morphable.load(p)


def test_npz_missing_keys(tmp_path):
    p = tmp_path / "partial.npz"
    np.savez(p, mean=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"partial.npz: .npz model lacks keys \['shape_basis'"):
        morphable.load(p)


def test_wrong_coefficient_length(sfm_model):
    with pytest.raises(ValueError, match=r"shape_coeffs: expected shape \(63,\)"):
        morphable.vertices(sfm_model, jnp.zeros(10), 0)
