"""render.geometry_maps (depth and normals per pixel) against a ray-traced sphere,
render.shape_shading (grey shading of those normals) against its formula worked out by hand, and
inputs.map_to_original (a crop-square map into the photo's pixels) against the function it
samples."""

import numpy as np
import pytest


def sphere_view():
    import trimesh

    from ganfit_jax import camera

    sphere = trimesh.creation.icosphere(subdivisions=4, radius=50.0)
    centre = np.array([10.0, -5.0, 20.0])
    cam = np.array([30.0, 40.0, 600.0, 10.0, -5.0, 20.0, 350.0, 0.3], np.float32)  # rolled
    return sphere.vertices + centre, sphere.faces, centre, cam, camera


def test_depth_and_normals_of_a_sphere_match_its_ray_intersections():
    from ganfit_jax import render

    verts, faces, centre, cam, camera = sphere_view()
    depth, normals, mask = (np.asarray(a) for a in render.geometry_maps(
        verts.astype(np.float32), faces, cam, (48, 64)))
    # each pixel centre's ray, in world coordinates, through OpenCV's matrices (an independent
    # path from the renderer's look-at projection)
    K, R, t = camera.opencv_matrices(cam, (48, 64))
    ys, xs = np.mgrid[0:48, 0:64]
    rays_cam = np.stack([xs - K[0, 2], ys - K[1, 2], np.full(xs.shape, K[0, 0])], -1) / K[0, 0]
    eye = -R.T @ t
    d = rays_cam @ R  # world directions with a unit camera z component
    oc = eye - centre
    a, b, c = np.sum(d * d, -1), 2 * np.sum(d * oc, -1), oc @ oc - 50.0 ** 2
    disc = b * b - 4 * a * c
    hit = disc > 0
    z = np.where(hit, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.nan)  # nearer root
    # the polygon lies inside the true sphere by at most ~0.05 mm: pixels within a few of the
    # silhouette may differ in coverage; well inside, every one is covered
    inner = disc > 0.2 * np.nanmax(disc)
    assert mask[inner].all() and not mask[~hit].any()
    assert np.isnan(depth[~mask]).all() and np.isnan(normals[~mask]).all()
    np.testing.assert_allclose(depth[inner], z[inner], atol=0.15)
    point = eye + z[..., None] * d
    truth = ((point - centre) / 50.0) @ R.T  # outward normal in OpenCV's camera frame
    cosine = np.sum(normals[inner] * truth[inner], -1)
    assert cosine.min() > np.cos(np.deg2rad(2.0)), np.degrees(np.arccos(cosine.min()))
    np.testing.assert_allclose(np.linalg.norm(normals[mask], axis=-1), 1.0, atol=1e-5)
    assert (normals[inner][:, 2] < 0).all()  # facing the camera
    with pytest.raises(ValueError, match=r"vertices: expected \(N,3\)"):
        render.geometry_maps(verts[:, :2], faces, cam, (48, 64))


def test_map_to_original_samples_a_linear_map_exactly_and_keeps_its_outline():
    from ganfit_jax import inputs

    transform = inputs.CropTransform(origin=(10.3, 20.7), scale=224 / 150, size=224,
                                     original_hw=(250, 300))
    resolution = 448  # the map at twice the working size: only its own square counts

    def f(crop_xy):
        return np.stack([2 * crop_xy[..., 0] + 3 * crop_xy[..., 1], -crop_xy[..., 0]], -1)

    grid = (np.stack(np.mgrid[0:resolution, 0:resolution][::-1], -1) + 0.5) * (224 / resolution)
    values = f(grid)
    radius = np.linalg.norm(grid - 112.0, axis=-1)
    mask = radius < 80
    out = inputs.map_to_original(np.where(mask[..., None], values, np.nan), mask, transform)
    assert out.shape == (250, 300, 2) and out.dtype == np.float32
    ys, xs = np.mgrid[0:250, 0:300]
    crop = transform.to_crop(np.stack([xs + 0.5, ys + 0.5], -1))
    r = np.linalg.norm(crop - 112.0, axis=-1)
    well_inside, well_outside = r < 78, r > 82
    np.testing.assert_allclose(out[well_inside], f(crop)[well_inside], rtol=1e-5, atol=1e-3)
    assert np.isnan(out[well_outside]).all()
    # the covered area keeps its size: a disk of radius 80 crop pixels = 80 / scale photo px
    area = np.isfinite(out[..., 0]).sum()
    assert area == pytest.approx(np.pi * (80 / transform.scale) ** 2, rel=0.02)
    with pytest.raises(ValueError, match="crop_map"):
        inputs.map_to_original(np.zeros((10, 12)), np.ones((10, 12), bool), transform)


def test_shape_shading_matches_blinn_phong_worked_by_hand_and_keeps_nan():
    from ganfit_jax import render

    towards_light = np.array([-1.0, -1.0, -1.0]) / np.sqrt(3)
    away = -towards_light
    # the bisector of the light and the viewer (0, 0, -1) makes half their angle with each
    half_angle = np.arccos(-towards_light[2]) / 2
    normals = np.array([towards_light, away, [0.0, 0.0, -1.0], [np.nan] * 3])
    grey = np.asarray(render.shape_shading(normals, light=(-2.0, -2.0, -2.0), albedo=0.6,
                                           ambient=0.25, specular=0.1, shininess=8.0))
    assert grey[0] == pytest.approx(0.6 + 0.1 * np.cos(half_angle) ** 8, abs=1e-6)
    assert grey[1] == pytest.approx(0.6 * 0.25, abs=1e-6)  # faces away: ambient only
    # facing the viewer: n·l = 1/√3, n·h = cos(half_angle)
    assert grey[2] == pytest.approx(0.6 * (0.25 + 0.75 / np.sqrt(3))
                                    + 0.1 * np.cos(half_angle) ** 8, abs=1e-6)
    assert np.isnan(grey[3])
    with pytest.raises(ValueError, match=r"normals: expected \(\.\.\., 3\)"):
        render.shape_shading(np.zeros((4, 2)))


def test_shape_shading_of_a_sphere_is_brightest_where_its_normal_bisects_light_and_view():
    from ganfit_jax import render

    verts, faces, centre, cam, camera = sphere_view()
    _, normals, mask = (np.asarray(a) for a in render.geometry_maps(
        verts.astype(np.float32), faces, cam, (96, 128)))
    grey = np.asarray(render.shape_shading(normals, specular=0.0))
    assert np.isnan(grey[~mask]).all() and np.isfinite(grey[mask]).all()
    brightest = normals[np.unravel_index(np.nanargmax(grey), grey.shape)]
    light = np.asarray(render.SHAPE_LIGHT) / np.linalg.norm(render.SHAPE_LIGHT)
    # without a highlight the brightest point faces the light (to the sphere's tessellation)
    assert np.degrees(np.arccos(brightest @ light)) < 4.0
