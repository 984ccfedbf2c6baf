"""The look-at pinhole camera against an OpenGL-style NumPy reference and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import camera as cam


def reference_project(eye, target, focal, points, height, width):
    """gluLookAt + pinhole, written the OpenGL way: camera looks down its -z axis."""
    z = eye - target
    z = z / np.linalg.norm(z)
    x = np.cross([0.0, 1.0, 0.0], z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    view = np.stack([x, y, z])  # rows: camera axes
    pc = (points - eye) @ view.T
    depth = -pc[:, 2]
    u = width / 2 + focal * pc[:, 0] / depth
    v = height / 2 - focal * pc[:, 1] / depth
    return np.stack([u, v], 1), depth


def random_points(rng, n=50):
    return rng.normal(size=(n, 3)) * 60.0


@pytest.mark.parametrize("eye,target", [([0, 0, 600], [0, 0, 0]), ([250, 120, 500], [10, -20, 5]),
                                        ([-400, -80, 300], [0, 30, -20])])
def test_project_matches_numpy_reference(eye, target):
    rng = np.random.default_rng(0)
    pts = random_points(rng)
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    c = np.r_[eye, target, 900.0].astype(np.float32)
    px, depth = cam.project(jnp.asarray(c), jnp.asarray(pts, jnp.float32), (200, 300))
    ref_px, ref_depth = reference_project(eye, target, 900.0, pts, 200, 300)
    np.testing.assert_allclose(np.asarray(px), ref_px, atol=2e-3 * np.abs(ref_px).max())
    np.testing.assert_allclose(np.asarray(depth), ref_depth, rtol=1e-5)


def test_image_conventions():
    """Target at the image centre; +x world to the right, +y world up (so smaller pixel y)."""
    c = jnp.asarray([0, 0, 500, 0, 0, 0, 1000.0])
    px, depth = cam.project(c, jnp.asarray([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]]), (100, 160))
    np.testing.assert_allclose(np.asarray(px[0]), [80, 50], atol=1e-4)
    assert px[1, 0] > 80 and px[2, 1] < 50
    np.testing.assert_allclose(np.asarray(depth), [500, 500, 500], rtol=1e-6)
    np.testing.assert_allclose(float(px[1, 0]) - 80, 1000 * 10 / 500, rtol=1e-5)


def test_roll_rotates_the_image():
    pts = jnp.asarray([[10.0, 0, 0]])
    no_roll = cam.project(jnp.asarray([0, 0, 500, 0, 0, 0, 1000.0]), pts, 100)[0]
    quarter = cam.project(jnp.asarray([0, 0, 500, 0, 0, 0, 1000.0, np.pi / 2]), pts, 100)[0]
    np.testing.assert_allclose(np.asarray(no_roll[0]), [70, 50], atol=1e-4)
    # rolling the camera's right axis onto its up axis moves a point on world +x to image "down"
    np.testing.assert_allclose(np.asarray(quarter[0]), [50, 70], atol=1e-4)


def test_project_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    pts = jnp.asarray(random_points(rng, 20), jnp.float32)
    w = jnp.asarray(rng.normal(size=(20, 2)), jnp.float32)
    c0 = jnp.asarray([30.0, -20, 550, 5, 10, 0, 800.0, 0.1])

    def f(c, p):
        px, depth = cam.project(c, p, (120, 160))
        return jnp.sum(w * px) + jnp.sum(depth) * 0.01

    gc, gp = jax.grad(f, argnums=(0, 1))(c0, pts)
    for k, eps in [(0, 1.0), (2, 1.0), (4, 1.0), (6, 1.0), (7, 1e-3)]:
        e = jnp.zeros(8).at[k].set(eps)
        fd = (f(c0 + e, pts) - f(c0 - e, pts)) / (2 * eps)
        np.testing.assert_allclose(gc[k], fd, rtol=2e-2, atol=1e-2)
    e = jnp.zeros((20, 3)).at[3, 1].set(0.5)
    np.testing.assert_allclose(gp[3, 1], (f(c0, pts + e) - f(c0, pts - e)) / 1.0, rtol=2e-2,
                               atol=1e-2)


def test_vmap_over_cameras_equals_loop():
    rng = np.random.default_rng(2)
    pts = jnp.asarray(random_points(rng, 10), jnp.float32)
    cams = jnp.asarray(np.c_[rng.normal(size=(5, 3)) * 50 + [0, 0, 600], rng.normal(size=(5, 3)),
                             np.full(5, 900.0)], jnp.float32)
    batched = jax.vmap(cam.project, in_axes=(0, None, None))(cams, pts, 128)
    for i in range(5):
        single = cam.project(cams[i], pts, 128)
        np.testing.assert_allclose(np.asarray(batched[0][i]), np.asarray(single[0]), atol=1e-4)


@pytest.mark.parametrize("roll", [0.0, 0.3, -0.5])
def test_camera_from_landmarks_reprojects(sfm_model, roll):
    """The closed-form start puts the model's landmarks within a pixel or two of the truth."""
    from ganfit_jax import morphable

    idx = np.asarray(sfm_model.landmark_indices)
    pts = np.asarray(morphable.landmarks3d(sfm_model, sfm_model.mean))[idx >= 0]
    focal = cam.default_focal(256)
    truth = jnp.asarray([120, 60, 1100, 0, 10, 0, focal, roll], jnp.float32)
    target_px, _ = cam.project(truth, jnp.asarray(pts), 256)
    est = cam.camera_from_landmarks(pts, np.asarray(target_px), 256, focal=focal)
    est_px, _ = cam.project(jnp.asarray(est), jnp.asarray(pts), 256)
    err = np.linalg.norm(np.asarray(est_px) - np.asarray(target_px), axis=1)
    assert err.mean() < 1.5, err.mean()
    assert abs(float(est[7]) - roll) < 0.05
    seven = cam.camera_from_landmarks(pts, np.asarray(target_px), 256, with_roll=False)
    assert seven.shape == (7,)


def test_bad_camera_shape():
    with pytest.raises(ValueError, match=r"camera: expected \[eye xyz, target xyz, focal\]"):
        cam.project(jnp.zeros(6), jnp.zeros((3, 3)), 64)


def test_too_few_landmarks():
    with pytest.raises(ValueError, match="at least 4 corresponding"):
        cam.camera_from_landmarks(np.zeros((3, 3)), np.zeros((3, 2)), 64)


def test_orbit_angles_give_back_the_angles_a_camera_was_placed_at():
    rng = np.random.default_rng(3)
    yaw, pitch, roll = rng.uniform(-1.2, 1.2, 16), rng.uniform(-0.6, 0.6, 16), rng.normal(size=16)
    target = rng.normal(size=(16, 3)) * 20
    distance = rng.uniform(300, 1500, (16, 1))
    direction = np.stack([np.cos(pitch) * np.sin(yaw), np.sin(pitch),
                          np.cos(pitch) * np.cos(yaw)], 1)
    cameras = np.concatenate([target + distance * direction, target, np.full((16, 1), 1000.0),
                              roll[:, None]], 1)
    got = [np.asarray(a) for a in cam.orbit_angles(cameras)]
    for g, want in zip(got, (yaw, pitch, roll)):
        np.testing.assert_allclose(g, want, atol=1e-5)
    # one camera, a 7-vector (no roll), on the +x side of a frontal view
    y, p, r = cam.orbit_angles(jnp.asarray([200.0, 0, 500, 0, 0, 0, 1000]))
    assert float(y) > 0 and float(p) == 0 and float(r) == 0
    with pytest.raises(ValueError, match="camera"):
        cam.orbit_angles(np.zeros((2, 6)))


@pytest.mark.parametrize("roll", [None, 0.3])
def test_opencv_matrices_project_as_the_camera_does(roll):
    """K (R X + t), divided by depth, lands where `project` puts X less half a pixel (OpenCV's
    pixel-centre convention), R is a rotation and its z row gives `project`'s depth; in a
    photo's pixels through a crop's transform too."""
    from ganfit_jax import inputs

    rng = np.random.default_rng(3)
    pts = random_points(rng)
    c = np.r_[[230.0, -90, 700], [5, 12, -3], 1400.0] if roll is None else \
        np.r_[[230.0, -90, 700], [5, 12, -3], 1400.0, roll]
    px, depth = (np.asarray(a, np.float64) for a in cam.project(
        jnp.asarray(c, jnp.float32), jnp.asarray(pts, jnp.float32), (180, 240)))
    K, R, t = cam.opencv_matrices(c, (180, 240))
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-6)
    in_camera = pts @ R.T + t
    np.testing.assert_allclose(in_camera[:, 2], depth, rtol=1e-5)
    uvw = in_camera @ K.T
    np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], px - 0.5, atol=2e-3)
    crop = inputs.CropTransform(origin=(310.5, 97.25), scale=0.4, size=240,
                                original_hw=(1200, 1600))
    uvw = in_camera @ crop.intrinsics_to_original(K).T
    np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], crop.to_original(px) - 0.5, atol=5e-3)


def test_spread_views_picks_the_poses_farthest_apart():
    """A mostly frontal clip with one glance left and one up: the frontal view, both glances
    and then the views between, each once; a still head spreads the picks in time."""
    yaw = np.r_[np.zeros(10), [-40.0, -35], np.zeros(10), [5.0]]
    pitch = np.r_[np.zeros(12), np.zeros(9), [25.0], [0.0]]
    angles = np.stack([yaw, pitch], 1)
    picks = cam.spread_views(angles, 3)
    assert picks == sorted({0, 10, 21}), picks
    assert len(set(cam.spread_views(angles, 23))) == 23
    still = cam.spread_views(np.zeros((100, 2)), 4, times=np.arange(100))
    assert still[0] == 0 and still[-1] == 99 and np.diff(still).min() >= 24, still
    with pytest.raises(ValueError, match="count"):
        cam.spread_views(angles, 0)


@pytest.mark.parametrize("yaw,pitch", [(0.0, 0.0), (25.0, -10.0), (-40.0, 15.0)])
def test_head_pose_from_landmarks_gives_back_the_view(sfm_model, yaw, pitch):
    """The SFM's mean landmarks seen from a camera placed at (yaw, pitch) around the face, at
    a portrait's distance and focal length: their pose comes back within a few degrees (the
    scaled-orthographic fit's approximation of the perspective view), NaN rows ignored."""
    from ganfit_jax import morphable

    points = np.asarray(morphable.landmarks3d(sfm_model, sfm_model.mean), np.float64)
    y, p = np.radians(yaw), np.radians(pitch)
    target = np.nanmean(points, 0)
    eye = target + 900 * np.array([np.cos(p) * np.sin(y), np.sin(p), np.cos(p) * np.cos(y)])
    px, _ = cam.project(jnp.asarray(np.r_[eye, target, 2000.0], jnp.float32),
                        jnp.asarray(np.nan_to_num(points), jnp.float32), 512)
    px = np.where(np.isfinite(points[:, :1]), np.asarray(px, np.float64), np.nan)
    got = cam.head_pose_from_landmarks(points, px)
    np.testing.assert_allclose(got, (yaw, pitch), atol=2.5)


def test_framing_cameras_keep_every_view_of_the_points_in_the_frame():
    """Projected through the gluLookAt reference, every point of every view lies within `fill`
    of the half-frame, one of them on that bound (the least such distance), the points' box
    centre at the image's middle; a longer `min_distance` is kept as given."""
    rng = np.random.default_rng(4)
    # a face-like cloud in front of (and off) the origin, as a 3DMM's vertices lie
    points = rng.normal(size=(500, 3)) * [70.0, 90.0, 30.0] + [3.0, 5.0, -40.0]
    centre = 0.5 * (points.min(0) + points.max(0))
    height, width, focal, fill = 64, 96, 500.0, 0.9
    yaws = (-60.0, 0.0, 60.0)
    cameras = cam.framing_cameras(points, focal, (height, width), yaws, fill=fill)
    assert cameras.shape == (3, 8)
    reach = []
    for camera, yaw in zip(cameras, yaws):
        np.testing.assert_allclose(camera[3:6], centre)
        assert np.sign(camera[0] - centre[0]) == np.sign(yaw)
        pixels, depth = reference_project(camera[0:3], camera[3:6], focal, points, height, width)
        assert depth.min() > 0
        reach.append(np.abs(pixels - [width / 2, height / 2]).max(0) / [width / 2, height / 2])
        middle, _ = reference_project(camera[0:3], camera[3:6], focal, centre[None], height, width)
        np.testing.assert_allclose(middle[0], [width / 2, height / 2], atol=1e-9)
    assert np.max(reach) <= fill + 1e-9 and np.max(reach) > fill - 1e-9
    distances = np.linalg.norm(cameras[:, 0:3] - centre, axis=1)
    np.testing.assert_allclose(distances, distances[0])
    far = cam.framing_cameras(points, focal, (height, width), yaws,
                              min_distance=2 * distances[0])
    np.testing.assert_allclose(np.linalg.norm(far[:, 0:3] - centre, axis=1), 2 * distances[0])
