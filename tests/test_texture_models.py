"""Texture-model interface (GAN and PCA), masked PCA, GAN inversion and the UV-folder loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ganfit_jax import texture
from ganfit_jax.texture import uv_io


@pytest.fixture(scope="module")
def gan():
    return texture.random_texture_model(jax.random.key(0), resolution=16, latent_dim=8, width=8)


def _low_rank_maps(n=10, res=8, rank=2, seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.3, 0.7, (res * res * 3,))
    comps = rng.normal(0, 0.05, (rank, res * res * 3))
    coeffs = rng.normal(0, 1, (n, rank))
    return (mean + coeffs @ comps).reshape(n, res, res, 3)


# ---------------------------------------------------------------------------------------------
# interface


def test_gan_generate_is_pure_and_transformable(gan):
    assert gan.latent_dim == 8 and gan.resolution == 16
    p = gan.init_latent(jax.random.key(1))
    uv = gan.generate(p)
    assert uv.shape == (16, 16, 3) and uv.dtype == jnp.float32
    assert float(uv.min()) >= 0.0 and float(uv.max()) <= 1.0 and float(uv.std()) > 0.01
    np.testing.assert_allclose(jax.jit(lambda m, q: m.generate(q))(gan, p), uv, atol=1e-5)
    ps = jax.random.normal(jax.random.key(2), (3, 8))
    batch = jax.vmap(gan.generate)(ps)
    # batched convolutions sum in another order: float32 rounding (~4e-6 relative seen)
    np.testing.assert_allclose(batch[1], gan.generate(ps[1]), atol=1e-5)
    g = jax.grad(lambda q: jnp.sum(gan.generate(q) ** 2))(p)
    assert g.shape == (8,) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
    # the functional form used by the fitting
    np.testing.assert_array_equal(texture.generate(gan.params, p, gan.config), uv)
    with pytest.raises(ValueError, match="p_t"):
        gan.generate(jnp.zeros(7))


def test_gan_file_round_trip(gan, tmp_path):
    path = tmp_path / "generator.msgpack"
    path.write_bytes(texture.gan_to_bytes(gan))
    back = texture.load_texture_model(path)
    p = jnp.linspace(-1, 1, 8)
    np.testing.assert_array_equal(back.generate(p), gan.generate(p))
    with pytest.raises(FileNotFoundError, match="nope.msgpack"):
        texture.load_gan(tmp_path / "nope.msgpack")
    (tmp_path / "bad.msgpack").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match="bad.msgpack"):
        texture.load_gan(tmp_path / "bad.msgpack")
    with pytest.raises(ValueError, match=".msgpack generator or a .npz"):
        texture.load_texture_model(tmp_path / "model.pkl")


# ---------------------------------------------------------------------------------------------
# PCA (Eq. 1)


def test_pca_reconstructs_training_maps_exactly_at_full_rank(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.05, 0.95, (6, 8, 8, 3))
    model = texture.build_masked_pca(maps)
    assert model.latent_dim == 5 and model.resolution == 8
    for i in range(6):
        p = texture.project(model, maps[i])
        np.testing.assert_allclose(model.generate(p), maps[i], atol=2e-5)
    # basis in standard deviations: training coefficients have unit variance per component
    coeffs = np.stack([np.asarray(texture.project(model, m)) for m in maps])
    np.testing.assert_allclose(coeffs.var(axis=0, ddof=1), 1.0, rtol=1e-3)
    # save / load through the one-switch loader
    texture.save_pca(model, tmp_path / "pca.npz")
    back = texture.load_texture_model(tmp_path / "pca.npz")
    np.testing.assert_array_equal(back.basis, model.basis)
    np.testing.assert_array_equal(back.init_latent(None), np.zeros(5))
    np.testing.assert_allclose(back.generate(back.init_latent(None)), maps.mean(0), atol=1e-6)


def test_masked_pca_keeps_observed_texels_and_imputes_low_rank_data():
    maps = _low_rank_maps(n=12, rank=2)
    rng = np.random.default_rng(1)
    masks = rng.uniform(size=maps.shape[:3]) > 0.3
    masks[:, 0, 0] = False  # a texel nobody observed
    model, completed = texture.build_masked_pca(maps, masks, imputation_rank=2,
                                                iterations=500, tol=1e-9, return_completed=True)
    obs = np.repeat(masks[..., None], 3, -1)
    np.testing.assert_allclose(completed[obs], maps[obs], atol=1e-6)  # observed never change
    # full rank reproduces every training map on its observed texels
    for i in range(12):
        p = texture.project(model, maps[i], masks[i])
        np.testing.assert_allclose(np.asarray(model.generate(p))[masks[i]], maps[i][masks[i]],
                                   atol=1e-4)
    # the rank-2 imputation recovers the hidden values far better than the per-texel mean
    hidden = ~obs
    hidden[:, 0, 0] = False
    mean_fill = np.where(masks[..., None], maps, 0).sum(0) / np.maximum(masks.sum(0), 1)[..., None]
    err_impute = np.abs(completed - maps)[hidden].mean()
    err_mean = np.abs(np.broadcast_to(mean_fill, maps.shape) - maps)[hidden].mean()
    assert err_impute < 0.1 * err_mean, (err_impute, err_mean)
    assert float(model.coverage[0, 0]) == 0.0
    np.testing.assert_allclose(model.coverage, masks.mean(0), atol=1e-6)


def test_pca_bad_input_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="at least 2"):
        texture.build_masked_pca(np.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match="masks"):
        texture.build_masked_pca(np.zeros((3, 4, 4, 3)), np.ones((3, 5, 4)))
    with pytest.raises(ValueError, match="num_components"):
        texture.build_masked_pca(np.zeros((3, 4, 4, 3)), num_components=3)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        texture.load_pca(tmp_path / "missing.npz")
    np.savez(tmp_path / "wrong.npz", mean=np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="basis"):
        texture.load_pca(tmp_path / "wrong.npz")
    (tmp_path / "junk.npz").write_text("not an archive")  # numpy would try it as a pickle
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz"):
        texture.load_pca(tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------
# GAN inversion (Sec. 3.1)


def test_inversion_recovers_a_generated_map(gan):
    target = gan.generate(jax.random.normal(jax.random.key(3), (8,)))
    p, losses = texture.invert(gan, target, key=jax.random.key(4), steps=150, learning_rate=0.05)
    assert losses.shape == (151,)
    assert float(losses[-1]) < 0.1 * float(losses[0]), (losses[0], losses[-1])
    np.testing.assert_allclose(texture.masked_l1(gan.generate(p), target), losses[-1], rtol=1e-5)


def test_inversion_ignores_masked_texels_and_works_for_pca():
    maps = _low_rank_maps(n=6, res=8, rank=3, seed=2)
    model = texture.build_masked_pca(maps)
    target = np.array(maps[2])
    mask = np.ones((8, 8, 1), np.float32)
    mask[:, :3] = 0.0
    target[:, :3] = 1.0  # garbage where unobserved
    p, losses = texture.invert(model, target, mask, p_init=jnp.zeros(model.latent_dim), steps=300,
                               learning_rate=0.1)
    assert float(losses[-1]) < 0.05 * float(losses[0])
    np.testing.assert_allclose(model.generate(p)[:, 3:], maps[2][:, 3:], atol=5e-3)
    with pytest.raises(ValueError, match="target"):
        texture.invert(model, np.zeros((4, 4, 3)), key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# folder loader


def test_load_uv_folder_pairs_masks_and_resizes(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, 4:] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[:, ::-1]).save(tmp_path / "b.jpg", quality=100)
    m = np.full((8, 8), 255, np.uint8)
    m[:4] = 0
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    (tmp_path / "notes.txt").write_text("ignored")
    names, images, masks = uv_io.load_uv_folder(tmp_path, 4)
    assert names == ["a", "b"] and images.shape == (2, 4, 4, 3) and masks.shape == (2, 4, 4, 1)
    np.testing.assert_array_equal(masks[0, :2], 0.0)
    np.testing.assert_array_equal(masks[0, 2:], 1.0)
    np.testing.assert_array_equal(masks[1], 1.0)
    np.testing.assert_allclose(images[0, 2:, 2:], 200 / 255, atol=1e-6)
    np.testing.assert_array_equal(images[0, :2], 0.0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        uv_io.load_uv_folder(tmp_path / "missing_dir", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .png"):
        uv_io.load_uv_folder(tmp_path / "empty", 4)


def test_build_texture_pca_binary(tmp_path):
    import pathlib
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"m{i}.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m0_mask.png")
    out = tmp_path / "out" / "pca.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.build_texture_pca", f"--uv_dir={tmp_path}",
         f"--output={out}", "--resolution=8"], cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "K=3" in proc.stdout and "mean 0.0000" in proc.stdout
    model = texture.load_texture_model(out)
    assert model.basis.shape == (8, 8, 3, 3)
    assert (tmp_path / "out" / "pca_preview.png").is_file()


def test_vertex_pca_texture_matches_morphable_vertex_colours():
    from ganfit_jax import morphable

    rng = np.random.default_rng(3)
    n = 5
    mm = morphable.make_model(rng.normal(size=(n, 3)), rng.normal(size=(n, 3, 2)),
                              triangles=[[0, 1, 2], [2, 3, 4]],
                              texture_mean=rng.uniform(0.3, 0.7, (n, 3)),
                              texture_basis=rng.normal(0, 0.05, (n, 3, 4)))
    model = texture.VertexPCATexture.from_morphable(mm)
    p = jnp.asarray(rng.normal(size=4), jnp.float32)
    assert model.per_vertex and not texture.PCATexture.per_vertex and model.latent_dim == 4
    np.testing.assert_allclose(model.generate(p), morphable.vertex_colours(mm, p), atol=1e-6)
    with pytest.raises(ValueError, match="no texture PCA"):
        texture.VertexPCATexture.from_morphable(
            morphable.make_model(rng.normal(size=(n, 3)), rng.normal(size=(n, 3, 2)),
                                 triangles=[[0, 1, 2]]))


def test_unwrap_compiles_two_programs_not_each_operation(sfm_model, compilations):
    """unwrap's JAX work (the UV layout's z-buffer and barycentrics; the photo's z-buffer, the
    texels' projection, the normals) runs as jitted programs: outside jit each operation would be
    traced and compiled as a program of its own (~40 of a tiny fit's compilations before)."""
    from ganfit_jax import camera, morphable
    from ganfit_jax.texture import unwrap

    image = np.random.default_rng(0).uniform(size=(40, 48, 3)).astype(np.float32)
    verts = morphable.vertices(sfm_model, jnp.zeros(sfm_model.num_shape),
                               jnp.zeros(sfm_model.num_expression))
    cam = np.array([0.0, 0.0, 700.0, 0.0, 0.0, 0.0, camera.default_focal((40, 48))], np.float32)
    with compilations() as compiled:
        uv_map, mask = unwrap.unwrap(sfm_model, verts, cam, image, resolution=24)
    assert len(compiled) <= 4, compiled  # the two programs, the z-buffers they call jitted
    assert mask.max() == 1.0 and uv_map[mask == 1].std() > 0.05  # the photo's texels, unwrapped
