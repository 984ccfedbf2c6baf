"""Quality benchmark: seeded ground truth, the MICC error of known meshes, a tiny end-to-end run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark_quality as bq
from ganfit_jax import camera as cam
from ganfit_jax import evaluation, fitting, morphable

SIZE = 64


@pytest.fixture(scope="module")
def faces(sfm_model):
    return bq.make_faces(sfm_model, 2, seed=3, image_size=SIZE, landmark_noise_px=0.0)


def test_ground_truth_is_seeded_consistent_and_on_a_background(sfm_model, faces):
    again = bq.make_faces(sfm_model, 2, seed=3, image_size=SIZE, landmark_noise_px=0.0)
    np.testing.assert_array_equal(faces[0]["image"], again[0]["image"])
    other = bq.make_faces(sfm_model, 1, seed=4, image_size=SIZE, landmark_noise_px=0.0)
    assert np.abs(other[0]["image"] - faces[0]["image"]).mean() > 0.01
    for f in faces:
        # the mesh is the model's at the drawn coefficients
        v = morphable.vertices(sfm_model, jnp.asarray(f["shape"]), jnp.asarray(f["expression"]))
        np.testing.assert_allclose(f["vertices"], np.asarray(v), atol=1e-4)
        # fixed landmarks are the projections of the model's landmark vertices
        idx = np.asarray(sfm_model.landmark_indices)
        px = np.asarray(cam.project(jnp.asarray(f["camera"]), jnp.asarray(f["vertices"][idx[idx >= 0]]),
                                    (SIZE, SIZE))[0])
        np.testing.assert_allclose(f["landmarks_true"][idx >= 0], px, atol=1e-3)
        assert np.isfinite(f["landmarks_true"]).all()  # jaw from the contour, 61/65 filled
        np.testing.assert_array_equal(f["landmarks"], f["landmarks_true"])  # noise 0
        # a photo-like background, not black: corners are far from the face
        corners = f["image"][[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.mean() > 0.1 and corners.std() > 0.0
        assert 0.0 <= f["image"].min() and f["image"].max() <= 1.0
    # the two faces differ in pose
    assert np.abs(faces[0]["camera"][:3] - faces[1]["camera"][:3]).max() > 10.0


def test_landmark_noise_has_the_requested_spread(sfm_model):
    f = bq.make_faces(sfm_model, 1, seed=5, image_size=SIZE, landmark_noise_px=2.0)[0]
    d = (f["landmarks"] - f["landmarks_true"])[np.isfinite(f["landmarks_true"])]
    assert 1.5 < d.std() < 2.5, d.std()


def test_mesh_error_zero_for_the_truth_moved_and_positive_for_the_mean(sfm_model, faces):
    truth = faces[0]["vertices"]
    assert bq.mesh_error(sfm_model, truth, truth).error < 1e-6
    # invariant to a rigid motion of the reconstruction (the protocol aligns it)
    a = np.deg2rad(10.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    moved = truth @ rot.T + np.array([5.0, -3.0, 20.0])
    assert bq.mesh_error(sfm_model, moved, truth).error < 1e-3
    # against an independent brute-force point-to-plane of the mean face
    mean_err = bq.mesh_error(sfm_model, np.asarray(sfm_model.mean), truth)
    assert mean_err.error > 0.3
    aligned = mean_err.reconstruction_crop.vertices
    scan = mean_err.scan_crop.vertices
    normals = evaluation.vertex_normals(scan, mean_err.scan_crop.triangles)
    nearest = np.argmin(((aligned[:, None, :] - scan[None, :, :]) ** 2).sum(-1), axis=1)
    ref = np.abs(((aligned - scan[nearest]) * normals[nearest]).sum(-1)).mean()
    assert math.isclose(mean_err.reconstruction_to_scan, ref, rel_tol=1e-6)


def test_identity_cosine_is_one_for_the_true_render_and_lower_for_another(sfm_model, faces):
    from ganfit_jax import identity

    net = identity.load_identity("tiny", key=jax.random.PRNGKey(0))
    pipe = fitting.Pipeline(model=sfm_model, texture_params=jnp.asarray(faces[0]["texture"]),
                            identity_params=net, texture_fn=lambda t, p: t,
                            identity_fn=fitting.identity_of, image_size=(SIZE, SIZE))
    target = fitting.target_from_image(pipe, faces[0]["image"], faces[0]["landmarks"])

    def params(f):
        return fitting.FitParams(shape=jnp.asarray(f["shape"]),
                                 expression=jnp.asarray(f["expression"]), texture=jnp.zeros(0),
                                 camera=jnp.asarray(f["camera"]), light=jnp.asarray(f["light"]))

    same = bq.identity_cosine(pipe, params(faces[0]), target)
    other = bq.identity_cosine(pipe, params(faces[1]), target)
    assert same > 0.9999 and other < same - 1e-4, (same, other)


def test_unknown_ablation_is_a_clear_error():
    with pytest.raises(ValueError, match="ablate: unknown terms \\['bogus'\\]"):
        bq.run_quality(1, ablate=["bogus"])


def test_occluder_covers_part_of_the_face_and_nothing_else(faces):
    rng = np.random.default_rng(0)
    for f in faces:
        image, mask = bq.occlude(rng, f)
        assert mask.shape == image.shape[:2] and 0.02 < mask.mean() < 0.4
        np.testing.assert_array_equal(image[~mask], f["image"][~mask])
        assert np.abs(image[mask] - f["image"][mask]).mean() > 0.05
        ys, xs = np.nonzero(mask)
        lm = f["landmarks_true"]
        centre = np.array([xs.mean(), ys.mean()]) + 0.5
        assert np.all(centre >= lm.min(0) - 1) and np.all(centre <= lm.max(0) + 1)


def test_texture_error_is_zero_for_the_truth_at_any_resolution(faces):
    truth = faces[0]["texture"]
    assert bq.texture_error(truth, truth) < 5e-3  # 8-bit steps, RGB summed
    from PIL import Image

    half = np.asarray(Image.fromarray((truth * 255 + 0.5).astype(np.uint8)).resize(
        (truth.shape[1] // 2, truth.shape[0] // 2), Image.Resampling.BILINEAR)) / 255
    assert bq.texture_error(half, truth) < 0.03
    assert bq.texture_error(np.clip(truth + 0.1, 0, 1), truth) > 0.2


def test_tiny_run_beats_the_mean_face_and_has_ablation_rows(sfm_model, capsys):
    """Also with --occlude: the occluders painted over the faces, the masked fit's texture is
    closer to the truth than the fit that takes them for skin."""
    rows = bq.run_quality(2, seed=0, iterations=10, stage1_iterations=40, image_size=SIZE,
                          identity="none", texture="direct", ablate=["pixel", "gan"],
                          json_out=True, batch_size=2, chunk=10, model=sfm_model,
                          occluders=True)
    names = [r["config"] for r in rows]
    assert names == ["mean face", "stage 1 (landmarks)", "full", "full + face mask",
                     "full + skin mask", "no pixel", "no gan"]
    by = {r["config"]: r for r in rows}
    assert by["full + face mask"]["texture_mae"] < 0.9 * by["full"]["texture_mae"], rows  # 0.80
    assert math.isnan(by["stage 1 (landmarks)"]["texture_mae"])
    for name in names[:6]:
        r = by[name]
        assert len(r["per_face"]) == 2
        for f in r["per_face"]:
            assert math.isfinite(f["error_mm"]) and f["error_mm"] > 0
        assert r["median_mm"] > 0 and math.isfinite(r["error_mm"])
    for name in names[1:6]:
        assert math.isfinite(by[name]["landmark_px"]) and by[name]["landmark_px"] > 0
        assert by[name]["error_mm"] < by["mean face"]["error_mm"], (name, rows)
    assert by["full"]["fit_s"] > 0
    assert by["no gan"]["per_face"] == [] and "skipped" in by["no gan"]["note"]
    # --json: one parseable object per row, nothing else on stdout
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert [json.loads(ln)["config"] for ln in lines] == names
    table = bq.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| no pixel |" in table


def test_antialiased_truth_differs_on_the_outline_only_and_adds_a_row(sfm_model, faces):
    """--antialias: the same seeded faces with their outline blended into the background (a
    photo's edge, not a staircase) and a 'full + antialias' row fitted with antialiased renders."""
    from ganfit_jax.render import rasterize

    smooth = bq.make_faces(sfm_model, 2, seed=3, image_size=SIZE, landmark_noise_px=0.0,
                           antialias=True)
    for hard, soft in zip(faces, smooth):
        verts = jnp.asarray(hard["vertices"])
        pixels, depth = cam.project(jnp.asarray(hard["camera"]), verts, (SIZE, SIZE))
        ids = np.asarray(rasterize(pixels, depth, sfm_model.triangles, (SIZE, SIZE))[0])
        corners = np.where((ids >= 0)[..., None], np.asarray(sfm_model.triangles)[ids], -1)
        # an outline pixel: a 4-neighbour shows another surface (the background, or triangles
        # not sharing a corner: the nose's flank over the cheek)
        outline = np.zeros(ids.shape, bool)
        for axis in (0, 1):
            for shift in (1, -1):
                other = np.roll(corners, shift, axis)
                touching = (corners[..., :, None] == other[..., None, :]).any((-2, -1))
                apart = (np.roll(ids, shift, axis) != ids) & ~(touching & (ids >= 0))
                outline |= apart | np.roll(apart, -shift, axis)
        changed = np.abs(soft["image"] - hard["image"]).max(-1) > 1e-6
        assert changed.sum() > 20 and not changed[~outline].any()
    rows = bq.run_quality(1, seed=0, iterations=2, stage1_iterations=10, image_size=SIZE,
                          identity="none", texture="direct", json_out=True, batch_size=1,
                          chunk=2, model=sfm_model, antialias=True)
    by = {r["config"]: r for r in rows}
    assert list(by) == ["mean face", "stage 1 (landmarks)", "full", "full + antialias"]
    assert by["full + antialias"]["error_mm"] < by["mean face"]["error_mm"]
    assert by["full + antialias"]["texture_mae"] != by["full"]["texture_mae"]
