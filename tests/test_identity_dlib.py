"""dlib's face-recognition ResNet in Flax vs dlib itself, on the real released weights."""

import itertools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

dlib = pytest.importorskip("dlib")

from ganfit_jax import landmarks  # noqa: E402
from ganfit_jax.identity import dlib_format, dlib_resnet  # noqa: E402

CHIPS_PER_PERSON = 4


@pytest.fixture(scope="module")
def chips(faces_dir):
    """Aligned 150×150 chips of 5 people (dlib's examples/johns), a few each."""
    from PIL import Image

    people = sorted(p for p in (faces_dir / "dlib" / "johns").iterdir() if p.is_dir())
    images, labels = [], []
    for i, person in enumerate(people):
        for f in sorted(person.iterdir())[:CHIPS_PER_PERSON]:
            images.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(i)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def descriptors(chips, dlib_models):
    images, _ = chips
    path = dlib_models(landmarks.FACE_RECOGNITION_RESNET)
    reference = dlib.face_recognition_model_v1(path)
    ref = np.stack([np.asarray(reference.compute_face_descriptor(im, 0)) for im in images])
    params = dlib_resnet.load_dlib_resnet_params(path)
    ours, features = jax.jit(dlib_resnet.DlibResNet().apply)({"params": params},
                                                              jnp.asarray(images, jnp.float32) / 255.0)
    return np.asarray(ours, np.float64), ref, features


def test_descriptors_match_dlib(descriptors):
    ours, ref, features = descriptors
    cos = np.sum(ours * ref, 1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, cos.min()
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # measured: ~5e-7
    assert features["stage1"].shape[1:] == (35, 35, 32)
    assert features["stage4"].shape[1:] == (4, 4, 256)   # 3×3 branch zero-padded onto 4×4 shortcut
    assert features["stage5"].shape[1:] == (2, 2, 256)


def test_same_person_closer_as_in_dlib(chips, descriptors):
    _, labels = chips
    ours, ref, _ = descriptors
    pairs = list(itertools.combinations(range(len(labels)), 2))
    d_ours = np.array([np.linalg.norm(ours[i] - ours[j]) for i, j in pairs])
    d_ref = np.array([np.linalg.norm(ref[i] - ref[j]) for i, j in pairs])
    same = np.array([labels[i] == labels[j] for i, j in pairs])
    assert d_ours[same].mean() < d_ours[~same].mean()
    # dlib's own verification decisions (threshold 0.6) are reproduced pair by pair
    np.testing.assert_array_equal(d_ours < 0.6, d_ref < 0.6)
    assert (d_ours[same] < 0.6).mean() >= (d_ref[same] < 0.6).mean()
    np.testing.assert_allclose(d_ours, d_ref, atol=1e-4)


def test_gradient_wrt_input_is_finite(chips, dlib_models):
    params = dlib_resnet.load_dlib_resnet_params(dlib_models(landmarks.FACE_RECOGNITION_RESNET))
    image = jnp.asarray(chips[0][:1], jnp.float32) / 255.0
    net = dlib_resnet.DlibResNet()
    grad = jax.jit(jax.grad(lambda x: jnp.sum(net.apply({"params": params}, x)[0] ** 2)))(image)
    assert grad.shape == image.shape and bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.abs(grad).max()) > 0


def test_reader_layers(dlib_models):
    loss, inp, layers = dlib_format.read_dlib_network(dlib_models(landmarks.FACE_RECOGNITION_RESNET))
    assert loss["kind"] == "loss_metric_2" and abs(loss["distance_threshold"] - 0.6) < 1e-6
    assert (inp["nr"], inp["nc"]) == (150, 150)
    kinds = [layer.kind for layer in layers]
    assert kinds.count("con_4") == 29 and kinds.count("add_prev_") == 14 and kinds[-1] == "fc_2"


def test_bad_files_name_the_file(tmp_path, dlib_models):
    truncated = tmp_path / "resnet_truncated.dat"
    with open(dlib_models(landmarks.FACE_RECOGNITION_RESNET), "rb") as fh:
        truncated.write_bytes(fh.read(1_000_000))
    with pytest.raises(dlib_format.DlibFormatError, match=r"resnet_truncated\.dat.*past the end of the file"):
        dlib_resnet.load_dlib_resnet_params(truncated)
    # another dlib file (the 5-point shape predictor) is not this network
    other = tmp_path / "shape_predictor_5.dat"
    shutil.copy(dlib_models(landmarks.SHAPE_PREDICTOR_5), other)
    with pytest.raises(dlib_format.DlibFormatError, match=r"shape_predictor_5\.dat.*expected dlib"):
        dlib_resnet.load_dlib_resnet_params(other)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(dlib_format.DlibFormatError, match=r"junk\.dat"):
        dlib_resnet.load_dlib_resnet_params(junk)
    with pytest.raises(FileNotFoundError, match="nowhere.dat"):
        dlib_resnet.load_dlib_resnet_params(tmp_path / "nowhere.dat")


@pytest.mark.parametrize("size", [72, 73, 8])
def test_max_pool_valid_equals_flax_max_pool_and_its_gradient(size):
    """The strided-slice max pool the dlib stem uses equals a reduce-window max pool, forward and
    (away from ties, which random data does not have) backward."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size + 3, 5))
    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")  # noqa: E731
    ours = lambda x: dlib_resnet.max_pool_valid(x, 3, 2)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(ref(x)))
    w = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
    g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(x)
    g_ours = jax.grad(lambda x: jnp.sum(ours(x) * w))(x)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), rtol=1e-6, atol=1e-6)


def test_max_pool_valid_sends_each_window_gradient_to_one_input_on_ties():
    """Flat input (every tap ties): each window's cotangent goes to exactly one input, its first
    tap, so the input gradient sums to the output cotangent's sum and sits on the taps (0, 0)."""
    x = jnp.zeros((1, 9, 7, 2))
    w = jax.random.normal(jax.random.PRNGKey(3), (1, 4, 3, 2))
    g = jax.grad(lambda x: jnp.sum(dlib_resnet.max_pool_valid(x, 3, 2) * w))(x)
    np.testing.assert_allclose(float(jnp.sum(g)), float(jnp.sum(w)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g[:, 0:8:2, 0:6:2]), np.asarray(w), rtol=1e-6)
    assert float(jnp.abs(g).sum() - jnp.abs(g[:, 0:8:2, 0:6:2]).sum()) == 0.0


@pytest.mark.parametrize("size,kernel,stride", [((150, 150), 7, 2), ((19, 24), 5, 3),
                                                ((11, 10), 3, 2), ((8, 9), 4, 4)])
def test_space_to_depth_conv_equals_strided_conv(size, kernel, stride):
    """The dlib stem's space-to-depth convolution equals nn.Conv with the same parameters
    (stride s, no padding), forward and in both gradients."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), (2, *size, 3))
    ours = dlib_resnet.SpaceToDepthConv(8, kernel, stride)
    ref = nn.Conv(8, (kernel, kernel), strides=(stride, stride), padding="VALID")
    params = ours.init(jax.random.PRNGKey(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias too
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.PRNGKey(1), x))
    y_ref = ref.apply(params, x)
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(y_ref),
                               rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(2), y_ref.shape)
    g_ours = jax.grad(lambda p, x: jnp.sum(jnp.tanh(ours.apply(p, x)) * w), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.tanh(ref.apply(p, x)) * w), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        # the kernel's gradient sums ~10k float32 products in another order than XLA's
        # convolution (entries up to ~40): an absolute tolerance of the gradient's own scale
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("size,stride", [((4, 4), 2), ((3, 3), 2), ((1, 1), 1), ((5, 6), 1), ((8, 9), 2)])
def test_dlib_conv_equals_nn_conv(size, stride):
    """DlibConv (dlib's padding rule; one matrix product where the output is a single pixel, as in
    stage 5) equals nn.Conv with the same parameters, forward and in both gradients."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.PRNGKey(0), (2, *size, 6))
    pad = 0 if stride != 1 else 1
    ours = dlib_resnet.DlibConv(5, 3, stride)
    ref = nn.Conv(5, (3, 3), strides=(stride, stride), padding=[(pad, pad), (pad, pad)])
    params = jax.tree.map(lambda p: p + 0.1, ours.init(jax.random.PRNGKey(1), x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(jax.random.PRNGKey(1), x))
    y_ref = ref.apply(params, x)
    y = ours.apply(params, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(2), y_ref.shape)
    g_ours = jax.grad(lambda p, x: jnp.sum(jnp.tanh(ours.apply(p, x)) * w), argnums=(0, 1))(params, x)
    g_ref = jax.grad(lambda p, x: jnp.sum(jnp.tanh(ref.apply(p, x)) * w), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
