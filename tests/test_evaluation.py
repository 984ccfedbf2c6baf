"""Metric tests for ganfit_jax.evaluation against closed forms and brute-force NumPy references."""

import numpy as np
import pytest
import trimesh

from ganfit_jax import evaluation as ev

SFM_NOSE_TIP = 114  # ibug_to_sfm.txt: 31 = 114 (nose tip)


def _random_rotation(rng, max_degrees):
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return ev._rotation_from_vector(axis * np.deg2rad(max_degrees) * rng.uniform(0.5, 1.0))


@pytest.fixture(scope="module")
def sfm_face(sfm_model):
    from ganfit_jax import morphable

    rng = np.random.default_rng(0)
    verts = np.asarray(morphable.vertices(sfm_model, rng.normal(size=sfm_model.num_shape)),
                       np.float64)
    return verts, np.asarray(sfm_model.triangles, np.int64), np.asarray(sfm_model.mean, np.float64)


# ---------------------------------------------------------------------------------------------
# Independent brute-force references
# ---------------------------------------------------------------------------------------------


def _segment_distance(p, a, b):
    e = b - a
    s = np.clip(((p - a) @ e) / max(e @ e, 1e-300), 0.0, 1.0)
    return np.linalg.norm(p - (a + s * e))


def _brute_point_triangle(p, a, b, c):
    """Projection onto the plane + inside test, else the nearest of the three edges."""
    n = np.cross(b - a, c - a)
    nn = np.linalg.norm(n)
    edges = min(_segment_distance(p, a, b), _segment_distance(p, b, c),
                _segment_distance(p, c, a))
    if nn < 1e-12:
        return edges
    n = n / nn
    h = (p - a) @ n
    q = p - h * n
    inside = all(np.cross(y - x, q - x) @ n >= 0 for x, y in ((a, b), (b, c), (c, a)))
    return abs(h) if inside else edges


def _brute_mesh_distance(points, verts, tris):
    """The same construction as _brute_point_triangle, vectorised over all triangles."""
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    n = np.cross(b - a, c - a)
    nn = np.linalg.norm(n, axis=1)
    n = n / np.maximum(nn, 1e-300)[:, None]
    out = []
    for p in points:
        def seg(x, y):
            e = y - x
            s = np.clip(np.sum((p - x) * e, axis=1) / np.maximum(np.sum(e * e, axis=1), 1e-300),
                        0, 1)
            return np.linalg.norm(p - (x + s[:, None] * e), axis=1)
        edges = np.minimum(np.minimum(seg(a, b), seg(b, c)), seg(c, a))
        h = np.sum((p - a) * n, axis=1)
        q = p - h[:, None] * n
        inside = np.ones(len(a), bool)
        for x, y in ((a, b), (b, c), (c, a)):
            inside &= np.sum(np.cross(y - x, q - x) * n, axis=1) >= 0
        out.append(np.where(inside & (nn > 1e-12), np.abs(h), edges).min())
    return np.array(out)


# ---------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------


def test_umeyama_recovers_similarity_and_rigid():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(40, 3)) * 30
    rot = _random_rotation(rng, 120)
    dst = 1.3 * src @ rot.T + np.array([5.0, -7.0, 11.0])
    sim = ev.umeyama(src, dst, with_scale=True)
    np.testing.assert_allclose(sim.scale, 1.3, rtol=1e-10)
    np.testing.assert_allclose(sim.rotation, rot, atol=1e-10)
    np.testing.assert_allclose(sim(src), dst, atol=1e-9)
    rigid = ev.align_landmarks(src, src @ rot.T + 3.0, mode="rigid")
    assert rigid.scale == 1.0
    np.testing.assert_allclose(rigid.rotation, rot, atol=1e-10)
    assert np.linalg.det(ev.umeyama(src, src * [1, 1, -1]).rotation) > 0  # no reflections
    with pytest.raises(ValueError, match="mode"):
        ev.align_landmarks(src, dst, mode="affine")


@pytest.mark.parametrize("method", ["point", "plane"])
def test_icp_self_alignment_after_random_rigid_transform_is_zero(sfm_face, method):
    verts, tris, _ = sfm_face
    rng = np.random.default_rng(2)
    rot = _random_rotation(rng, 8)
    moved = verts @ rot.T + rng.normal(size=3) * 4
    result = ev.icp(moved, verts, tris, method=method, max_iterations=200)
    assert result.converged
    aligned = result.transform(moved)
    assert np.abs(aligned - verts).max() < 1e-3, np.abs(aligned - verts).max()
    assert result.errors[-1] < 1e-4
    assert result.transform.scale == 1.0


def test_icp_with_scale_recovers_a_known_scale(sfm_face):
    verts, tris, _ = sfm_face
    centre = verts.mean(axis=0)
    scaled = (verts - centre) * 0.9 + centre + [1.0, -2.0, 0.5]
    for method in ("point", "plane"):
        result = ev.icp(scaled, verts, tris, with_scale=True, method=method, max_iterations=300)
        np.testing.assert_allclose(result.transform.scale, 1 / 0.9, rtol=1e-4)
        assert np.abs(result.transform(scaled) - verts).max() < 1e-2


# ---------------------------------------------------------------------------------------------
# Cropping and the nose tip
# ---------------------------------------------------------------------------------------------


def test_crop_keeps_exactly_the_vertices_within_the_radius(sfm_face):
    verts, tris, _ = sfm_face
    for radius in (30.0, 60.0, 95.0):
        c = ev.crop(verts, tris, SFM_NOSE_TIP, radius)
        inside = {i for i in range(len(verts))
                  if np.sqrt(np.sum((verts[i] - verts[SFM_NOSE_TIP]) ** 2)) <= radius}
        assert set(c.indices.tolist()) == inside
        np.testing.assert_array_equal(c.vertices, verts[c.indices])
        expected = [t for t in tris.tolist() if all(i in inside for i in t)]
        np.testing.assert_array_equal(c.indices[c.triangles], np.asarray(expected))
    point_crop = ev.crop(verts, tris, verts[SFM_NOSE_TIP] + [0, 0, 1.0], 50.0)
    assert len(point_crop.indices) > 0
    with pytest.raises(ValueError, match="center"):
        ev.crop(verts, tris, len(verts), 10.0)


def test_find_nose_tip_on_the_sfm(sfm_face):
    verts, _, mean = sfm_face
    for v in (mean, verts):
        tip = ev.find_nose_tip(v)
        assert np.linalg.norm(v[tip] - v[SFM_NOSE_TIP]) < 6.0
    # a scan with neck and shoulders below (a wide plate 10 cm behind the face) and a noise spike
    # on the cheek: still the nose
    xs, ys = np.meshgrid(np.linspace(-250, 250, 60), np.linspace(-350, -60, 40))
    body = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, -100.0)], axis=1)
    spiky = verts.copy()
    cheek = np.argmin(np.linalg.norm(verts - (verts[SFM_NOSE_TIP] + [45, -10, -40]), axis=1))
    spiky[cheek, 2] = verts[SFM_NOSE_TIP, 2] + 8.0
    tip = ev.find_nose_tip(np.concatenate([spiky, body]))
    assert np.linalg.norm(spiky[tip] - verts[SFM_NOSE_TIP]) < 6.0


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def test_closest_point_on_triangles_matches_brute_force():
    rng = np.random.default_rng(3)
    a, b, c = (rng.normal(size=(400, 3)) for _ in range(3))
    c[:10] = a[:10]  # degenerate (segment) triangles
    c[10:15] = b[10:15] = a[10:15]  # and single points
    p = rng.normal(size=(400, 3)) * 2
    q = ev.closest_point_on_triangles(p, a, b, c)
    got = np.linalg.norm(p - q, axis=1)
    want = np.array([_brute_point_triangle(*x) for x in zip(p, a, b, c)])
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_closest_points_on_mesh_matches_brute_force_and_trimesh(sfm_face):
    verts, tris, _ = sfm_face
    small = ev.crop(verts, tris, SFM_NOSE_TIP, 25.0)
    rng = np.random.default_rng(4)
    pts = small.vertices[rng.integers(0, len(small.vertices), 150)] + rng.normal(size=(150, 3)) * 4
    pts = np.concatenate([pts, rng.normal(size=(10, 3)) * 200])  # far away points too
    closest, dist, tri = ev.closest_points_on_mesh(pts, small.vertices, small.triangles)
    want = _brute_mesh_distance(pts, small.vertices, small.triangles)
    np.testing.assert_allclose(dist, want, atol=1e-8)
    np.testing.assert_allclose(np.linalg.norm(pts - closest, axis=1), dist, atol=1e-9)
    # the reported triangle holds the reported point
    corners = np.moveaxis(small.vertices[small.triangles[tri]], 1, 0)
    q = ev.closest_point_on_triangles(closest, *corners)
    np.testing.assert_allclose(q, closest, atol=1e-8)
    pytest.importorskip("rtree")
    mesh = trimesh.Trimesh(small.vertices, small.triangles, process=False)
    _, tdist, _ = trimesh.proximity.closest_point(mesh, pts)
    np.testing.assert_allclose(dist, tdist, atol=1e-6)


def test_closest_points_handles_a_few_huge_triangles():
    grid = trimesh.creation.icosphere(subdivisions=3, radius=40.0)
    big = np.array([[-500, -500, 60], [500, -500, 60], [0, 500, 60]], np.float64)
    verts = np.concatenate([grid.vertices, big])
    tris = np.concatenate([grid.faces, [[len(grid.vertices), len(grid.vertices) + 1,
                                         len(grid.vertices) + 2]]])
    pts = np.array([[0.0, 0.0, 58.0], [0, 0, 45], [300, -200, 61]])
    _, dist, tri = ev.closest_points_on_mesh(pts, verts, tris)
    np.testing.assert_allclose(dist, _brute_mesh_distance(pts, verts, tris), atol=1e-9)
    assert tri[0] == len(tris) - 1 and tri[2] == len(tris) - 1


def test_point_to_plane_and_point_to_point_match_brute_force(sfm_face):
    from ganfit_jax import morphable

    verts, tris, mean = sfm_face
    small = ev.crop(mean, tris, SFM_NOSE_TIP, 30.0)
    target = ev.crop(verts, tris, SFM_NOSE_TIP, 30.0)
    # reference: full distance matrix and the JAX (area-weighted) normals of morphable.py
    d = np.linalg.norm(small.vertices[:, None] - target.vertices[None], axis=2)
    j = d.argmin(axis=1)
    normals = np.asarray(morphable.vertex_normals(target.vertices, target.triangles), np.float64)
    want_plane = np.abs(np.sum((small.vertices - target.vertices[j]) * normals[j], axis=1))
    np.testing.assert_allclose(ev.point_to_point_distances(small.vertices, target.vertices),
                               d.min(axis=1), atol=1e-9)
    np.testing.assert_allclose(
        ev.point_to_plane_distances(small.vertices, target.vertices, target.triangles),
        want_plane, atol=1e-4)


def test_known_offset_gives_the_known_distance():
    xs, ys = np.meshgrid(np.linspace(-50, 50, 21), np.linspace(-50, 50, 21))
    verts = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], axis=1)
    quads = np.array([[r * 21 + c, r * 21 + c + 1, (r + 1) * 21 + c + 1, (r + 1) * 21 + c]
                      for r in range(20) for c in range(20)])
    tris = np.concatenate([quads[:, [0, 1, 2]], quads[:, [0, 2, 3]]])
    shifted = verts + [0.0, 0.0, 2.5]
    for kind in ev.DISTANCES:
        sym = ev.symmetric_distance(shifted, tris, verts, tris, kind)
        np.testing.assert_allclose(sym.mean, 2.5, atol=1e-9)
        np.testing.assert_allclose(sym.a_to_b, 2.5, atol=1e-9)
    stats = ev.now_statistics(shifted, verts, tris)
    np.testing.assert_allclose([stats["median"], stats["mean"], stats["std"]], [2.5, 2.5, 0.0],
                               atol=1e-9)
    # sliding along the plane changes point-to-point but not point-to-plane (interior points)
    slid = verts + [1.0, 0.0, 2.5]
    interior = np.abs(slid[:, 0]) < 49
    plane = ev.point_to_plane_distances(slid, verts, tris)
    np.testing.assert_allclose(plane[interior], 2.5, atol=1e-9)
    np.testing.assert_allclose(ev.point_to_point_distances(slid, verts)[interior],
                               np.hypot(1.0, 2.5), atol=1e-9)


def test_known_scale_gives_the_known_distance():
    inner = trimesh.creation.icosphere(subdivisions=4, radius=50.0)
    outer_v = inner.vertices * 1.1  # every vertex 5 mm further out along its radius
    plane = ev.point_to_plane_distances(outer_v, inner.vertices, inner.faces)
    np.testing.assert_allclose(plane, 5.0, atol=0.01)
    surface = ev.scan_to_mesh_distances(outer_v, inner.vertices, inner.faces)
    np.testing.assert_allclose(surface, 5.0, atol=1e-9)  # outer vertices lie over inner vertices
    point = ev.point_to_point_distances(outer_v, inner.vertices)
    np.testing.assert_allclose(point, 5.0, atol=1e-9)


def test_point_to_plane_is_at_most_point_to_point_on_curved_surfaces(sfm_face):
    verts, tris, mean = sfm_face
    plane = ev.point_to_plane_distances(mean, verts, tris)
    point = ev.point_to_point_distances(mean, verts)
    surface = ev.scan_to_mesh_distances(mean, verts, tris)
    assert np.all(plane <= point + 1e-9) and np.all(surface <= point + 1e-9)
    assert plane.mean() < point.mean() and surface.mean() < point.mean()


# ---------------------------------------------------------------------------------------------
# The protocol end to end
# ---------------------------------------------------------------------------------------------


def test_evaluate_self_after_rigid_transform_is_zero(sfm_face, sfm_model):
    verts, tris, _ = sfm_face
    rng = np.random.default_rng(5)
    rot = _random_rotation(rng, 40)
    scan = verts @ rot.T + [20.0, -10.0, 300.0]
    lm = np.asarray(sfm_model.landmark_indices)
    lm_rec = np.where((lm >= 0)[:, None], verts[np.maximum(lm, 0)], np.nan)
    lm_scan = np.where((lm >= 0)[:, None], scan[np.maximum(lm, 0)], np.nan)
    result = ev.evaluate(verts, tris, scan, tris, reconstruction_landmarks=lm_rec,
                         scan_landmarks=lm_scan, landmark_mode="rigid")
    assert result.error < 1e-3 and result.point_to_point < 1e-3
    # same radius around the same point → the two crops hold the same vertices
    np.testing.assert_array_equal(result.reconstruction_crop.indices, result.scan_crop.indices)
    full = ev.error_map(verts, len(verts), result)
    assert np.isnan(full).sum() == len(verts) - len(result.reconstruction_crop.indices)
    # a frontal scan without landmarks: the nose-tip initialisation suffices for small poses
    small = verts @ _random_rotation(rng, 5).T + [3.0, 2.0, 1.0]
    nose_only = ev.evaluate(verts, tris, small, tris, reconstruction_nose=SFM_NOSE_TIP)
    assert nose_only.error < 1e-2, nose_only.error


def test_evaluate_noise_level_is_reported(sfm_face):
    verts, tris, _ = sfm_face
    rng = np.random.default_rng(6)
    normals = ev.vertex_normals(verts, tris)
    noisy = verts + normals * rng.uniform(-1.0, 1.0, size=(len(verts), 1))  # mean |offset| 0.5
    result = ev.evaluate(noisy, tris, verts, tris, scan_nose=SFM_NOSE_TIP,
                         reconstruction_nose=SFM_NOSE_TIP, kind="surface")
    assert 0.2 < result.error < 0.6, result.error
    assert result.error <= result.point_to_point


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_vrml_and_obj_readers_agree(tmp_path):
    verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1]], np.float64)
    wrl = tmp_path / "scan.wrl"
    wrl.write_text("#VRML V2.0 utf8\n# a comment with Coordinate { point [ 9 9 9 ] }\n"
                   "Shape { appearance Appearance { texture ImageTexture { url \"t.bmp\" } }\n"
                   " geometry IndexedFaceSet {\n  coord Coordinate { point [\n"
                   + ",\n".join(" ".join(f"{x:g}" for x in v) for v in verts) + " ] }\n"
                   "  texCoord TextureCoordinate { point [ 0 0, 1 0, 1 1 ] }\n"
                   "  coordIndex [ 0, 1, 2, 3, -1, 0, 1, 4, -1 ]\n"
                   "  texCoordIndex [ 0, 1, 2, -1 ]\n } }\n")
    v, t = ev.load_vrml(wrl)
    np.testing.assert_allclose(v, verts)
    np.testing.assert_array_equal(t, [[0, 1, 2], [0, 2, 3], [0, 1, 4]])
    # VRML 1.0 with two shapes: indices of the second shape are offset by the first's points
    wrl1 = tmp_path / "scan1.wrl"
    wrl1.write_text("#VRML V1.0 ascii\nSeparator { Coordinate3 { point [ 0 0 0, 1 0 0, 1 1 0 ] }\n"
                    " IndexedFaceSet { coordIndex [ 0, 1, 2, -1 ] } }\n"
                    "Separator { Coordinate3 { point [ 0 0 1, 1 0 1, 1 1 1, 0 1 1 ] }\n"
                    " IndexedFaceSet { coordIndex [ 0, 1, 2, 3 ] } }\n")
    v1, t1 = ev.load_vrml(wrl1)
    assert v1.shape == (7, 3)
    np.testing.assert_array_equal(t1, [[0, 1, 2], [3, 4, 5], [3, 5, 6]])
    obj = tmp_path / "scan.obj"
    obj.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in verts)
                   + "f 1 2 3\nf 1 3 4\nf 1 2 5\n")
    v2, t2 = ev.load_mesh(obj)
    np.testing.assert_allclose(v2, verts)
    np.testing.assert_array_equal(t2, t)
    # a textured scan: texture seams must not duplicate vertices
    seams = tmp_path / "textured.obj"
    seams.write_text("".join(f"v {x} {y} {z}\n" for x, y, z in verts)
                     + "vt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\nvt .5 .5\n"
                     + "f 1/1 2/2 3/3\nf 1/5 3/3 4/4\nf 1/1 2/2 5/5\n")
    v3, t3 = ev.load_mesh(seams)
    np.testing.assert_allclose(v3, verts)
    np.testing.assert_array_equal(t3, t)
    with pytest.raises(FileNotFoundError):
        ev.load_mesh(tmp_path / "missing.obj")
    bad = tmp_path / "bad.wrl"
    bad.write_text("not vrml")
    with pytest.raises(ValueError, match="VRML"):
        ev.load_mesh(bad)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def test_rasterize_coverage_and_depth_order():
    pixels = np.array([[2.0, 2.0], [14.0, 2.0], [2.0, 14.0],   # near triangle
                       [0.0, 0.0], [16.0, 0.0], [0.0, 16.0]])  # far triangle covering it
    depth = np.array([10.0, 10.0, 10.0, 20.0, 20.0, 20.0])
    for tris in ([[0, 1, 2], [3, 4, 5]], [[3, 4, 5], [0, 1, 2]]):
        ids, bary = ev.rasterize(pixels, depth, np.array(tris), 16)
        near = tris.index([0, 1, 2])
        gy, gx = np.mgrid[0:16, 0:16] + 0.5
        in_near = (gx >= 2) & (gy >= 2) & (gx + gy <= 16)
        in_far = gx + gy <= 16
        assert np.all((ids == near) == in_near)
        assert np.all((ids >= 0) == in_far)
        np.testing.assert_allclose(bary[ids >= 0].sum(axis=1), 1.0)
        # barycentrics reproduce the pixel centre (equal depths → affine)
        hit = ids == near
        rec = np.einsum("pk,kc->pc", bary[hit], pixels[:3])
        np.testing.assert_allclose(rec, np.stack([gx[hit], gy[hit]], axis=1), atol=1e-9)


def test_colormap_is_monotonic_in_lightness():
    rgb = ev.colormap(np.linspace(0, 1, 50))
    lightness = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lightness) > 0)
    assert np.allclose(ev.colormap([np.nan]), 0.6)


def test_render_error_map_colours_the_face(sfm_face):
    verts, tris, mean = sfm_face
    errors = np.abs(verts[:, 0] - verts[:, 0].min()) / 10  # grows left to right
    image = ev.render_error_map(verts, tris, errors, vmax=float(errors.max()), image_size=64)
    assert image.shape == (64, 64 * 2 + 70, 3) and image.dtype == np.float32
    front = image[:, :64]
    face = np.any(front < 0.99, axis=2)
    assert 0.2 < face.mean() < 0.9
    # the subject's right (image left) is low error (dark violet), the left high (yellow)
    cols = np.flatnonzero(face.any(axis=0))
    left, right = front[:, cols[:6]][face[:, cols[:6]]], front[:, cols[-6:]][face[:, cols[-6:]]]
    assert left[:, 2].mean() > left[:, 1].mean() * 0.8  # bluish
    assert right[:, 0].mean() > left[:, 0].mean() and right[:, 1].mean() > left[:, 1].mean()


def test_icp_correspondence_rejection_ignores_parts_the_target_lacks(sfm_face):
    verts, tris, _ = sfm_face
    partial = ev.crop(verts, tris, SFM_NOSE_TIP, 45.0)  # the "scan" covers only the centre
    rng = np.random.default_rng(7)
    moved = verts @ _random_rotation(rng, 3).T + [2.0, -1.5, 1.0]
    plain = ev.icp(moved, partial.vertices, partial.triangles, method="point")
    robust = ev.icp(moved, partial.vertices, partial.triangles, method="point",
                    max_correspondence_distance=3.0, max_iterations=200)
    err = lambda r: np.abs(r.transform(moved)[partial.indices] - partial.vertices).max()
    # pairs within 3 mm of the crop border remain, so not exactly 0, but far better than without
    assert err(robust) < 0.1 and err(plain) > 5 * err(robust), (err(robust), err(plain))


def test_surface_icp_undoes_a_known_similarity_from_surface_points(sfm_model):
    """Points on a face's surface (not its vertices) and the face moved by a known similarity:
    surface_icp's transform puts the moved face back where the points are."""
    verts = np.asarray(sfm_model.mean, np.float64)
    tris = np.asarray(sfm_model.triangles)
    surface, _ = trimesh.remesh.subdivide(verts, tris)
    rng = np.random.default_rng(1)
    rotation = _random_rotation(rng, 4.0)
    moved = 1.03 * verts @ rotation.T + np.array([2.0, -1.5, 3.0])
    transform, errors = ev.surface_icp(surface, moved, tris)
    assert errors[0] > 1.0 and errors[-1] < 1e-4, errors
    np.testing.assert_allclose(transform(moved), verts, atol=1e-3)
    assert transform.scale == pytest.approx(1 / 1.03, rel=1e-5)
