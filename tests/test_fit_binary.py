"""experiments/fit.py end to end on a real photo (tiny settings) and on bad input."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_summary(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


TINY = ["--identity=tiny", "--texture=direct", "--stage1_iterations=4", "--iterations=2",
        "--chunk=2", "--image_size=64"]


@pytest.fixture(scope="module")
def ffhq_photo(faces_dir):
    return faces_dir / "ffhq" / "FFHQ" / "00002.png"


def test_fit_writes_every_output_and_refuses_to_overwrite(ffhq_photo, sfm_dir, tmp_path, run_fit,
                                                          read_glb):
    out = tmp_path / "fit"
    code, stdout, stderr = run_fit(f"--image={ffhq_photo}", f"--output_dir={out}",
                                   f"--model={sfm_dir / 'sfm_shape_3448.bin'}", "--glb", "--depth",
                                   "--photo_texture", *TINY)
    assert code == 0, stderr[-2000:]
    assert "stage 2 iter 2/2" in stdout and "eta" in stdout
    for name in ("mesh.obj", "mesh.mtl", "mesh.png", "params.npz", "overlay.png", "shape.png",
                 "side_by_side.png", "intrinsics.png", "landmarks.png", "landmarks.json", "views.png", "loss.png",
                 "metrics.json", "mesh.glb", "depth.npy", "depth.png", "normals.png",
                 "photo_texture.png"):
        assert (out / name).stat().st_size > 0, name
    # flags.txt: every flag of the binary as this run had it, in absl's --flagfile form
    given = (out / "flags.txt").read_text().splitlines()
    assert given[0].startswith("# python -m experiments.fit")
    for line in (f"--image={ffhq_photo}", "--iterations=2", "--image_size=64", "--glb",
                 "--identity=tiny", "--nooverwrite", "--lambda_id=2.0"):
        assert line in given, (line, given)
    assert all(l.startswith("--") for l in given[1:]) and len(given) > 40
    from ganfit_jax import landmarks

    # the landmarks the fit followed (here the .npy beside the photo), as --landmarks reads them
    np.testing.assert_allclose(landmarks.load_landmarks(out / "landmarks.json"),
                               landmarks.load_landmarks(ffhq_photo.with_suffix(".npy")), atol=1e-3)
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["landmarks_compared"] >= 60 and 0 < metrics["landmark_error_iod"] < 1
    assert 0 < metrics["identity_cosine_end"] <= 1
    params = np.load(out / "params.npz")
    for key in ("shape", "expression", "texture", "camera", "light", "vertices", "landmarks3d"):
        assert key in params.files, key
    assert params["vertices"].shape == (3448, 3) and params["landmarks3d"].shape == (68, 3)
    assert np.isnan(params["landmarks3d"][0]).all() and np.isfinite(params["landmarks3d"][30]).all()
    # the fitted camera as OpenCV takes one puts the 3D landmarks on the photo's 2D ones
    ok = np.isfinite(params["landmarks3d"]).all(1)
    uvw = (params["landmarks3d"][ok] @ params["rotation"].T + params["translation"]) \
        @ params["camera_matrix"].T
    np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], params["landmarks2d"][ok] - 0.5,
                               atol=0.05)
    # --depth: in the photo's pixels, the camera-frame z of the 3D landmarks where the fitted
    # camera puts them (the inner points the model defines; the nose's sides are steep, so a
    # pixel's step there is millimetres)
    depth = np.load(out / "depth.npy")
    assert depth.shape == np.asarray(Image.open(ffhq_photo)).shape[:2] and depth.dtype == np.float32
    inner = np.arange(17, 68)[ok[17:]]
    assert len(inner) > 40
    z = (params["landmarks3d"][inner] @ params["rotation"].T + params["translation"])[:, 2]
    x, y = np.floor(params["landmarks2d"][inner]).astype(int).T
    error = np.abs(depth[y, x] - z)  # NaN where a point lies in an open mouth
    assert np.nanmedian(error) < 0.5 and np.mean(error < 1.5) > 0.8, error
    face = np.isfinite(depth)
    changed = np.any(np.asarray(Image.open(out / "overlay.png")) != np.asarray(
        Image.open(ffhq_photo).convert("RGB")), -1)
    assert (face & changed).sum() > 0.9 * face.sum() and face.sum() > 0.9 * changed.sum()
    # side_by_side.png's first panel: the working crop, dimmed where it runs past the photo's
    # border (this photo's square does, at the bottom)
    from ganfit_jax import inputs

    size = int(params["image_size"][0])
    crop_tf = inputs.CropTransform(tuple(params["crop_origin"]), float(params["crop_scale"]),
                                   size, np.asarray(Image.open(ffhq_photo)).shape[:2])
    crop = inputs.crop_square(landmarks.load_image(ffhq_photo), crop_tf)
    inside = inputs.inside_photo(crop_tf)
    shown = np.asarray(Image.open(out / "side_by_side.png"), np.float64)[:, :size] / 255
    assert 0 < (~inside).sum() < 0.2 * inside.size
    np.testing.assert_allclose(shown[inside], crop[inside], atol=1.5 / 255)
    np.testing.assert_allclose(shown[~inside], 0.35 * crop[~inside],  # fit.OUTSIDE_PHOTO_BRIGHTNESS
                               atol=1.5 / 255)
    normals = np.asarray(Image.open(out / "normals.png"), np.float64) / 255
    tip = list(inner).index(30)  # the nose tip (iBUG 31) faces the camera: blue
    assert normals[y[tip], x[tip], 2] > 0.9
    # shape.png: the photo itself off the face, the grey shading of the same normals on it
    from ganfit_jax import render

    photo = np.asarray(Image.open(ffhq_photo).convert("RGB"), np.float64) / 255
    shape = np.asarray(Image.open(out / "shape.png"), np.float64) / 255
    assert shape.shape == photo.shape
    np.testing.assert_array_equal(shape[~face], photo[~face])
    assert np.ptp(shape[face], axis=-1).max() == 0  # grey: R = G = B
    camera_normals = 2 * normals[face] - 1
    camera_normals *= np.array([1, -1, -1]) / np.linalg.norm(camera_normals, axis=-1,
                                                               keepdims=True)
    expected = np.asarray(render.shape_shading(camera_normals))
    assert np.median(np.abs(shape[face][:, 0] - expected)) < 2 / 255  # normals.png is 8-bit
    # intrinsics.png: albedo | shading (÷ metrics' shading_scale) | highlight, which compose the
    # render (side_by_side.png's middle) wherever nothing clipped and the face covers the pixel
    parts = np.asarray(Image.open(out / "intrinsics.png"), np.float64) / 255
    albedo, shading, highlight = parts[:, :64], parts[:, 64:128], parts[:, 128:]
    rendered = np.asarray(Image.open(out / "side_by_side.png"), np.float64)[:, 64:128] / 255
    ok = (albedo.max(-1) > 0) & (shading.max(-1) < 1) & (rendered.max(-1) < 1)
    assert ok.mean() > 0.2 and metrics["shading_scale"] > 0
    np.testing.assert_allclose((albedo * shading * metrics["shading_scale"] + highlight)[ok],
                               rendered[ok], atol=6 / 255)
    # views.png: the textured views above, the same views of the shape alone (grey) below
    views = np.asarray(Image.open(out / "views.png"), np.float64)
    assert views.shape == (128, 192, 3)
    assert np.ptp(views[64:], axis=-1).max() == 0 and (views[64:] < 250).mean() > 0.2
    # no view cuts the face off: every panel's border is the white background
    for panel in np.split(views, 3, axis=1):
        border = np.concatenate([panel[:, 0], panel[:, -1], panel[0], panel[63], panel[64],
                                 panel[-1]])
        assert border.min() == 255
    # --photo_texture: each texel the photo shows has the photo's colour where the fitted camera
    # (OpenCV's, in the photo's pixels) sees that texel's surface point
    from ganfit_jax import inputs, morphable
    from ganfit_jax.texture import unwrap

    unwrapped = np.asarray(Image.open(out / "photo_texture.png"), np.float64) / 255
    assert unwrapped.shape == (512, 512, 4)
    assert set(np.unique(np.rint(unwrapped[..., 3] * 255))) <= {0, 128, 255}
    seen = unwrapped[..., 3] == 1
    assert seen.mean() > 0.2
    sfm = morphable.load(sfm_dir / "sfm_shape_3448.bin")
    ids, bary = (np.asarray(a) for a in unwrap.uv_texel_surface(sfm, 512))
    corners = params["vertices"][np.asarray(sfm.triangles)[ids[seen]]]
    points = np.einsum("tk,tkd->td", bary[seen], corners)
    uvw = (points @ params["rotation"].T + params["translation"]) @ params["camera_matrix"].T
    photo = np.asarray(Image.open(ffhq_photo).convert("RGB"), np.float64) / 255
    expected = inputs.bilinear(photo, uvw[:, :2] / uvw[:, 2:] + 0.5)
    assert np.median(np.abs(unwrapped[seen][:, :3] - expected)) < 0.015  # 2 px off: 0.03
    obj_vertices = [l for l in (out / "mesh.obj").read_text().splitlines() if l.startswith("v ")]
    assert len(obj_vertices) == 3448
    np.testing.assert_allclose(np.array(obj_vertices[114].split()[1:4], float),
                               params["vertices"][114], atol=1e-3)  # model vertex order kept
    # --glb: the same mesh and texture map in one file, in glTF's metres
    glb = read_glb(out / "mesh.glb")
    np.testing.assert_allclose(glb["POSITION"], params["vertices"] * 1e-3, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(glb["image"], np.asarray(Image.open(out / "mesh.png")))
    # the fit as a NoW prediction (export_now): photo .../ffhq/FFHQ/00002.png → ffhq/FFHQ/00002
    import subprocess
    import sys

    now = tmp_path / "now"
    proc = subprocess.run([sys.executable, "-m", "experiments.export_now", f"--fits={tmp_path}",
                           f"--output_dir={now}", f"--model={sfm_dir / 'sfm_shape_3448.bin'}",
                           "--noneutral"], cwd=pathlib.Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    now_vertices = [l.split()[1:4] for l in (now / "ffhq/FFHQ/00002.obj").read_text().splitlines()
                    if l.startswith("v ")]
    np.testing.assert_allclose(np.array(now_vertices, float), params["vertices"], atol=1e-3)
    np.testing.assert_allclose(np.load(now / "ffhq/FFHQ/00002.npy")[4], params["landmarks3d"][33],
                               atol=1e-3)  # the nose base
    before = (out / "params.npz").read_bytes()
    code, _, stderr = run_fit(f"--image={ffhq_photo}", f"--output_dir={out}",
                              f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY)
    assert code != 0 and "--overwrite" in stderr
    assert (out / "params.npz").read_bytes() == before


def render_fit(*args):
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "experiments.render", *args], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_render_takes_a_fits_params_as_they_stand(ffhq_photo, sfm_dir, tmp_path, run_fit):
    """experiments/render on fit's params.npz: its 0° view at the fit's size is the fit's own
    render (side_by_side.png's middle panel; the texture from mesh.png beside it), at twice the
    size it frames the face the same, --expression_from moves the face, and a latent without
    its mesh.png or a file without an expression is one line naming the file."""
    from PIL import Image

    fit, model = tmp_path / "fit", f"--model={sfm_dir / 'sfm_shape_3448.bin'}"
    code, _, stderr = run_fit(f"--image={ffhq_photo}", f"--output_dir={fit}", model, *TINY,
                              "--noshape_image")
    assert code == 0, stderr[-2000:]
    # --noshape_image: no shape.png, views.png without its grey row
    assert not (fit / "shape.png").exists()
    assert np.asarray(Image.open(fit / "views.png")).shape == (64, 192, 3)
    base = [model, f"--params={fit / 'params.npz'}", "--background=0", "--save_mask"]
    views = {}
    for name, size, extra in (("same", 64, []), ("twice", 128, []),
                              ("smiles", 64, [f"--expression_from={tmp_path / 'e.npz'}"])):
        if extra:
            np.savez(tmp_path / "e.npz", expression=np.full(6, 2.5, np.float32))
        result = render_fit(*base, f"--output_dir={tmp_path / name}", f"--image_size={size}",
                            *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        views[name] = (np.asarray(Image.open(tmp_path / name / "yaw+0000.0.png"), np.float64),
                       np.load(tmp_path / name / "yaw+0000.0_mask.npy"))
    image, mask = views["same"]
    fitted = np.asarray(Image.open(fit / "side_by_side.png"), np.float64)[:, 64:128]
    inside = mask > 0.99
    assert inside.mean() > 0.2
    assert np.abs(image - fitted)[inside].max() <= 2, np.abs(image - fitted)[inside].max()
    assert abs(views["twice"][1].mean() - mask.mean()) < 0.05 * mask.mean()
    moved = np.abs(views["smiles"][0] - image).max(-1)[inside & (views["smiles"][1] > 0.99)]
    assert (moved > 8).mean() > 0.05
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "params.npz").write_bytes((fit / "params.npz").read_bytes())
    result = render_fit(model, f"--params={alone / 'params.npz'}", f"--output_dir={tmp_path / 'x'}")
    assert result.returncode == 1 and "--texture_map" in result.stderr
    assert "alone/params.npz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
    np.savez(tmp_path / "light.npz", light=np.zeros(9, np.float32))
    result = render_fit(*base, f"--output_dir={tmp_path / 'y'}",
                        f"--expression_from={tmp_path / 'light.npz'}")
    assert result.returncode == 1 and "light.npz: holds no expression" in result.stderr


FLAG_MISTAKES = [["--resume"], ["--track"], ["--all_faces", "--face=1"], ["--num_processes=2"],
                 ["--mask_labels=celebamask"], ["--landmarks=nope.npy"],
                 ["--images=a", "--image=b"]]


@pytest.mark.parametrize("extra", FLAG_MISTAKES, ids=[" ".join(e) for e in FLAG_MISTAKES])
def test_flag_mistakes_are_refused_before_jax_is_imported(extra, ffhq_photo, tmp_path):
    """A mistake in the flags alone (or a missing file they name) is one line at once: importing
    JAX takes ~1.5 s of a refusal that otherwise takes 0.15."""
    out = tmp_path / "out"
    args = [*([] if any(a.startswith("--images") for a in extra) else [f"--image={ffhq_photo}"]),
            f"--output_dir={out}", *extra]
    probe = ("import runpy, sys\n"
             f"sys.argv = ['fit', *{args!r}]\n"
             "try:\n    runpy.run_module('experiments.fit', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('exit', code, 'jax imported', 'jax' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.stdout.strip() == "exit 1 jax imported False", proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "no_face", "bad_landmarks",
                                  "unknown_model", "resume_one_photo", "resume_and_overwrite",
                                  "track_one_photo", "track_every_frame",
                                  "track_iterations_alone", "all_faces_frames",
                                  "all_faces_and_face", "all_faces_no_face",
                                  "all_faces_bad_landmarks", "list_names_a_missing_photo",
                                  "spread_without_max_frames", "photo_texture_without_uv",
                                  "mask_of_another_size", "mask_labels_without_mask",
                                  "mask_of_a_video", "transforms_one_photo"])
def test_bad_input_is_one_clear_line(case, ffhq_photo, sfm_dir, tmp_path, run_fit, request):
    if case in ("no_face", "all_faces_no_face"):  # dlib's search finds none
        request.getfixturevalue("dlib_models")
    out = tmp_path / "out"
    image, extra, expect = ffhq_photo, [], None
    model = f"--model={sfm_dir / 'sfm_shape_3448.bin'}"
    if case == "missing_image":
        image, expect = tmp_path / "nope.png", "nope.png: no such file"
    elif case == "not_an_image":
        image = tmp_path / "text.png"
        image.write_text("not a picture")
        expect = "text.png is not an image"
    elif case == "no_face":
        from PIL import Image

        image = tmp_path / "grey.png"
        Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(image)
        expect = "no face found in"
    elif case == "bad_landmarks":
        lm = tmp_path / "short.npy"
        np.save(lm, np.zeros((5, 2)))
        extra, expect = [f"--landmarks={lm}"], "short.npy"
    elif case == "unknown_model":
        model, expect = f"--model={tmp_path / 'missing.npz'}", "missing.npz: no such model file"
    elif case == "resume_one_photo":
        extra, expect = ["--resume"], "--resume goes with --images"
    elif case == "resume_and_overwrite":
        extra, expect = ["--resume", "--overwrite"], "not both"
    elif case == "track_one_photo":
        extra, expect = ["--track"], "--track goes with --frames"
    elif case == "track_iterations_alone":
        extra, expect = ["--track_iterations=5"], "go with --track"
    elif case == "all_faces_frames":
        extra, expect = ["--all_faces"], "--all_faces goes with --image or --images"
    elif case == "all_faces_and_face":
        extra, expect = ["--all_faces", "--face=1"], "give one"
    elif case == "all_faces_no_face":  # found before the model loads: no folder made
        from PIL import Image

        image = tmp_path / "grey.png"
        Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(image)
        extra, expect = ["--all_faces"], "no face found in"
    elif case == "all_faces_bad_landmarks":  # the file's second face is far off the photo
        face = np.load(ffhq_photo.with_suffix(".npy"))
        lm = tmp_path / "faces.npy"
        np.save(lm, np.stack([face, face - 5000]))
        extra, expect = ["--all_faces", f"--landmarks={lm}"], "faces.npy (face 1)"
    elif case == "photo_texture_without_uv":  # as the BFM loaders give a model: no UV layout
        from ganfit_jax import morphable

        sfm = morphable.load(sfm_dir / "sfm_shape_3448.bin")
        morphable.save_npz(sfm.replace(uv=np.zeros_like(np.asarray(sfm.uv))), tmp_path / "nouv.npz")
        model, extra = f"--model={tmp_path / 'nouv.npz'}", ["--photo_texture"]
        expect = "nouv.npz has no UV coordinates"
    elif case == "mask_of_another_size":
        np.save(tmp_path / "small.npy", np.ones((10, 12)))
        extra, expect = [f"--face_mask={tmp_path / 'small.npy'}"], \
            "small.npy: 12×10 pixels, the photo is 256×256"
    elif case == "transforms_one_photo":
        extra, expect = ["--transforms"], "--transforms goes with --frames"
    elif case == "mask_labels_without_mask":
        extra, expect = ["--mask_labels=celebamask"], "--mask_labels goes with --face_mask"
    source = f"--image={image}"
    if case == "mask_of_a_video":  # refused before the video is read
        (tmp_path / "clip.mp4").write_bytes(b"not read")
        source, extra = f"--frames={tmp_path / 'clip.mp4'}", [f"--face_mask={tmp_path}"]
        expect = "a video's frames have no mask files"
    if case == "list_names_a_missing_photo":
        (tmp_path / "split.txt").write_text(f"# test split\n{ffhq_photo}\n\nmissing.jpg\n")
        source, expect = f"--images={tmp_path / 'split.txt'}", "split.txt:4: missing.jpg: no such"
    if case == "all_faces_frames":
        source = f"--frames={tmp_path}"
    if case == "spread_without_max_frames":
        source, extra, expect = f"--frames={tmp_path}", ["--keyframes=spread"], "--max_frames"
    if case == "track_every_frame":  # frame_step 1, no max_frames: nothing left to track
        source, extra, expect = f"--frames={tmp_path}", ["--track"], "none is left to track"
    code, stdout, stderr = run_fit(source, f"--output_dir={out}", model, *TINY, *extra)
    assert code == 1, (code, stderr[-2000:])
    lines = [l for l in stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not out.exists()


def test_folder_of_photos_in_batches_skips_bad_ones(faces_dir, sfm_dir, tmp_path, run_fit,
                                                    dlib_models):
    import shutil

    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("00003", "00004", "00005"):
        for ext in (".png", ".npy"):
            shutil.copy(faces_dir / "ffhq" / "FFHQ" / (name + ext), photos / (name + ext))
    Image.fromarray(np.full((90, 70, 3), 200, np.uint8)).save(photos / "blank.jpg")  # no face
    out = tmp_path / "out"
    # bfloat16 networks (the GPU setting) and antialiased renders through the whole binary
    code, stdout, stderr = run_fit(f"--images={photos}", f"--output_dir={out}", "--batch_size=2",
                                   f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY,
                                   "--compute_dtype=bfloat16", "--antialias")
    assert code == 0, stderr[-2000:]
    assert "skipped" in stdout and "blank.jpg" in stdout
    assert "batch 2: 1 photo(s)" in stdout  # 3 good photos in batches of 2
    for name in ("00003", "00004", "00005"):
        assert (out / name / "params.npz").exists() and (out / name / "overlay.png").exists()
    assert not (out / "blank").exists()
    # summary.csv: one row per fitted photo, the numbers of its metrics.json
    assert "wrote " + str(out / "summary.csv") + ": 3 of 4 photo(s) fitted" in stdout, stdout
    summary = read_summary(out / "summary.csv")
    assert [os.path.basename(r["photo"]) for r in summary] == ["00003.png", "00004.png",
                                                              "00005.png"]
    from ganfit_jax import camera, landmarks, morphable

    model = morphable.load(sfm_dir / "sfm_shape_3448.bin")
    mean_landmarks = morphable.landmarks3d(model, model.mean)
    for row in summary:
        metrics = json.loads((pathlib.Path(row["folder"]) / "metrics.json").read_text())
        assert float(row["landmark_error_px"]) == pytest.approx(metrics["landmark_error_px"])
        assert float(row["landmark_error_iod_percent"]) == pytest.approx(
            100 * metrics["landmark_error_iod"])
        # where the fitted camera sits, as the closed-form camera on the photo's landmarks puts it
        given = landmarks.load_landmarks(pathlib.Path(row["photo"]).with_suffix(".npy"))
        yaw, pitch = camera.head_pose_from_landmarks(mean_landmarks, given)
        assert float(row["camera_yaw_deg"]) == pytest.approx(metrics["camera_yaw_deg"])
        assert abs(metrics["camera_yaw_deg"] - yaw) < 10 and abs(
            metrics["camera_pitch_deg"] - pitch) < 10, (metrics, yaw, pitch)
        assert row["camera_roll_deg"] != ""
    # summary.png: the fits worst first, each its side_by_side.png under its name and error
    sheet = np.asarray(Image.open(out / "summary.png"), np.float64)
    worst = max(summary, key=lambda r: float(r["landmark_error_iod_percent"]))
    tile = Image.open(pathlib.Path(worst["folder"]) / "side_by_side.png")
    tile = np.asarray(tile.resize((round(tile.width * 128 / tile.height), 128),
                                  Image.Resampling.BILINEAR), np.float64)
    assert sheet.shape == (128 + 16, 3 * tile.shape[1] + 2 * 6, 3)  # three photos in one row
    np.testing.assert_allclose(sheet[16:, :tile.shape[1]], tile, atol=1)
    assert sheet[:16, :tile.shape[1]].min() < 100  # its label, dark on white
    # each photo got its own fit: different cameras, one shared compiled shape
    cams = [np.load(out / n / "params.npz")["camera"] for n in ("00003", "00004", "00005")]
    assert np.abs(cams[0] - cams[1]).max() > 1.0 and np.abs(cams[1] - cams[2]).max() > 1.0

    # an interrupted run: 00004 stopped while writing (no metrics.json, written last), 00005
    # never started; --resume fits those two and leaves 00003's finished fit as it was
    (out / "00004" / "metrics.json").unlink()
    (out / "00004" / "overlay.png").write_bytes(b"half written")
    shutil.rmtree(out / "00005")
    kept = {f.name: f.read_bytes() for f in (out / "00003").iterdir()}
    code, stdout, stderr = run_fit(f"--images={photos}", f"--output_dir={out}", "--batch_size=2",
                                   f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY,
                                   "--compute_dtype=bfloat16", "--antialias", "--resume")
    assert code == 0, stderr[-2000:]
    assert "--resume: 1 of 4 photo(s) already fitted, 3 to go" in stdout, stdout[-2000:]
    assert "00003.png:" not in stdout and "00004.png:" in stdout and "00005.png:" in stdout
    assert {f.name: f.read_bytes() for f in (out / "00003").iterdir()} == kept
    for name in ("00004", "00005"):
        assert (out / name / "metrics.json").exists()
        assert (out / name / "overlay.png").read_bytes()[:4] == b"\x89PNG", name
    np.testing.assert_allclose(np.load(out / "00004" / "params.npz")["camera"], cams[1],
                               rtol=1e-4, atol=1e-3)  # the same fit as the first run's
    # the summary again holds every fitted photo, the one fitted before the interruption too
    assert [os.path.basename(r["photo"]) for r in read_summary(out / "summary.csv")] == [
        "00003.png", "00004.png", "00005.png"]


def test_compilation_cache_is_filled_and_reused(ffhq_photo, sfm_dir, tmp_path, run_fit):
    """--compilation_cache (default $XDG_CACHE_HOME/ganfit_jax/xla): the first fit writes its
    compiled programs there, a second fit of the same shapes loads every one of them (JAX logs
    each hit) and gives the same result; the second run reads its flags from the first one's
    flags.txt (`--flagfile`), so that file reproduces the fit.

    Which programs get written depends on their compile time (>= 1 s), so a program near that
    line may be written by one run and not the other: the test asks that the first run's
    entries are all hits in the second, not that the folder is unchanged."""
    # the fused step (the other tests fit with the default two-view step)
    args = [f"--image={ffhq_photo}", f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY,
            "--notwo_threads"]
    code, _, stderr = run_fit(f"--output_dir={tmp_path / 'a'}", *args,
                              cache_home=tmp_path / "xdg")
    assert code == 0, stderr[-2000:]
    cache = tmp_path / "xdg" / "ganfit_jax" / "xla"
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step") for name in entries), entries
    # the second run takes the first one's flags.txt (every flag as it ran), then its own
    code, _, stderr = run_fit(f"--flagfile={tmp_path / 'a' / 'flags.txt'}",
                              f"--output_dir={tmp_path / 'b'}", f"--compilation_cache={cache}",
                              cache_home=tmp_path / "unused",
                              env={"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"})
    assert code == 0, stderr[-2000:]
    for name in entries:
        key = name[:-len("-cache")]
        # the key is the program's name (which may hold a '-': jit_scatter-add), '-', a hash
        assert f"cache hit for '{key.rsplit('-', 1)[0]}' with key '{key}'" in stderr, key
    assert set(entries) <= {p.name for p in cache.iterdir()}
    first, second = np.load(tmp_path / "a" / "params.npz"), np.load(tmp_path / "b" / "params.npz")
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])
    assert not (tmp_path / "unused").exists()


def test_empty_compilation_cache_leaves_jax_alone(tmp_path):
    import jax

    from experiments import common  # no absl flags: safe to import in the test process

    before = jax.config.jax_compilation_cache_dir
    common.enable_compilation_cache("")
    common.enable_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir == before
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        common.enable_compilation_cache(str(blocker / "xla"))
    assert jax.config.jax_compilation_cache_dir == before


def test_compilation_cache_keeps_programs_over_a_tenth_of_a_second_or_what_the_environment_says(
        tmp_path, monkeypatch):
    import jax

    from experiments import common

    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        common.enable_compilation_cache(str(tmp_path / "a"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.1
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
        common.enable_compilation_cache(str(tmp_path / "b"))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_face_picks_a_group_photos_other_face_and_too_few_faces_is_one_line(faces_dir, sfm_dir,
                                                                            tmp_path, run_fit,
                                                                            dlib_models):
    """dlib finds two faces in this PASCAL photo (boxes 89 and 62 px wide): --face=1 fits the
    smaller one (its fitted landmarks lie in that box, not the larger's); --face=2 names the
    photo and how many faces it has."""
    from ganfit_jax import landmarks

    photo = faces_dir / "dlib" / "faces" / "2008_001009.jpg"
    boxes, _ = landmarks.detect_faces(photo)
    boxes = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    assert len(boxes) == 2
    model = f"--model={sfm_dir / 'sfm_shape_3448.bin'}"
    code, _, stderr = run_fit(f"--image={photo}", f"--output_dir={tmp_path / 'one'}", model,
                              *TINY, "--face=1")
    assert code == 0, stderr[-2000:]
    # the SFM has no vertex for some iBUG points: their projections are NaN
    x, y = np.nanmean(np.load(tmp_path / "one" / "params.npz")["landmarks2d"], axis=0)
    inside = lambda b: b[0] <= x <= b[2] + 1 and b[1] <= y <= b[3] + 1
    assert inside(boxes[1]) and not inside(boxes[0]), ((x, y), boxes)
    code, _, stderr = run_fit(f"--image={photo}", f"--output_dir={tmp_path / 'two'}", model,
                              *TINY, "--face=2")
    assert code != 0 and "face index 2 out of range: 2 face(s) found in" in stderr
    assert "2008_001009.jpg" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "two").exists()


def test_all_faces_fits_every_face_of_every_photo_in_shared_batches(faces_dir, sfm_dir,
                                                                    tmp_path, run_fit,
                                                                    dlib_models):
    """--images --all_faces over a one-face photo and a two-face group photo in batches of two:
    the group photo's faces are split over two batches (one shared with the other photo), each
    face gets its own folder whose fitted landmarks lie in that face's dlib box, the group
    photo's overlay.png differs from the photo at both faces and nowhere else, summary.csv has a
    row per face, and --resume finds both photos finished."""
    from ganfit_jax import landmarks

    group = faces_dir / "dlib" / "faces" / "2008_001009.jpg"
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a_one.png").symlink_to(faces_dir / "ffhq" / "FFHQ" / "00002.png")
    (photos / "b_group.jpg").symlink_to(group)
    out = tmp_path / "out"
    args = [f"--images={photos}", f"--output_dir={out}", "--all_faces", "--batch_size=2",
            f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY]
    code, stdout, stderr = run_fit(*args)
    assert code == 0, stderr[-2000:]
    assert "batch 1: 2 face(s)" in stdout and "batch 2: 1 face(s)" in stdout, stdout[-3000:]
    assert "wrote 2/2 photos (3 faces)" in stdout, stdout[-3000:]
    boxes = sorted(landmarks.detect_faces(group)[0], key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    listing = json.loads((out / "b_group" / "faces.json").read_text())
    assert [f["folder"] for f in listing["faces"]] == ["face_00", "face_01"]
    for k, box in enumerate(boxes):
        x, y = np.nanmean(np.load(out / "b_group" / f"face_{k:02d}" / "params.npz")
                          ["landmarks2d"], axis=0)
        assert box[0] <= x <= box[2] + 1 and box[1] <= y <= box[3] + 1, (k, (x, y), box)
    assert (out / "a_one" / "face_00" / "metrics.json").exists()
    assert not (out / "a_one" / "face_01").exists()
    photo = landmarks.load_image(group)
    overlay = landmarks.load_image(out / "b_group" / "overlay.png")
    changed = np.abs(overlay - photo).max(-1) > 2 / 255
    ys, xs = np.nonzero(changed)
    for box in boxes:  # the face's render covers its box's middle
        mid = changed[box[1] + (box[3] - box[1]) // 3:box[3] - (box[3] - box[1]) // 3,
                      box[0] + (box[2] - box[0]) // 3:box[2] - (box[2] - box[0]) // 3]
        assert mid.mean() > 0.5, mid.mean()
    near = np.zeros(changed.shape, bool)
    for box in boxes:  # and nothing far from the faces changed
        w, h = box[2] - box[0], box[3] - box[1]
        near[max(0, box[1] - h):box[3] + h, max(0, box[0] - w):box[2] + w] = True
    assert not (changed & ~near).any()
    # shape.png: each face's shape alone over the photo, where each face's own shape.png has it
    shape = landmarks.load_image(out / "b_group" / "shape.png")
    for k in range(2):
        own = landmarks.load_image(out / "b_group" / f"face_{k:02d}" / "shape.png")
        face = np.abs(own - photo).max(-1) > 2 / 255
        assert face.sum() > 50 and np.mean(np.abs(shape - own).max(-1)[face] < 1e-6) > 0.9, k
    assert not ((np.abs(shape - photo).max(-1) > 2 / 255) & ~near).any()
    rows = read_summary(out / "summary.csv")
    assert [os.path.relpath(r["folder"], out) for r in rows] == [
        os.path.join("a_one", "face_00"), os.path.join("b_group", "face_00"),
        os.path.join("b_group", "face_01")]
    code, stdout, stderr = run_fit(*args, "--resume")
    assert code == 0, stderr[-2000:]
    assert "--resume: 2 of 2 photo(s) already fitted, 0 to go" in stdout, stdout[-2000:]


def test_all_faces_of_one_photo_leaves_out_faces_too_small(faces_dir, sfm_dir, tmp_path,
                                                          run_fit, dlib_models):
    """--image --all_faces --min_interocular=30 on the PASCAL photo whose two faces have their
    eyes 36 and 28 px apart: only the larger is fitted, the other reported; the photo's own
    folder holds the overlay, faces.json and summary.csv."""
    photo = faces_dir / "dlib" / "faces" / "2008_001009.jpg"
    out = tmp_path / "group"
    code, stdout, stderr = run_fit(f"--image={photo}", f"--output_dir={out}", "--all_faces",
                                   "--min_interocular=30",
                                   f"--model={sfm_dir / 'sfm_shape_3448.bin'}", *TINY)
    assert code == 0, stderr[-2000:]
    assert "face 1 left out, its eyes 28 px apart" in stdout, stdout[-2000:]
    assert json.loads((out / "faces.json").read_text())["faces"][0]["folder"] == "face_00"
    assert len(json.loads((out / "faces.json").read_text())["faces"]) == 1
    assert (out / "face_00" / "metrics.json").exists() and not (out / "face_01").exists()
    assert len(read_summary(out / "summary.csv")) == 1 and (out / "overlay.png").exists()


def test_a_list_file_names_photos_in_its_order_from_its_folder(tmp_path):
    """--images=split.txt: a data set's split file, one path a line, relative to the list's
    folder or absolute, comments and blank lines skipped, each photo once, in the list's order."""
    from experiments import common

    (tmp_path / "set" / "b").mkdir(parents=True)
    for name in ("z.jpg", "b/a.png"):
        (tmp_path / "set" / name).write_bytes(b"")
    listing = tmp_path / "set" / "split.lst"
    listing.write_text(f"z.jpg  # the first\n\n{tmp_path / 'set' / 'b' / 'a.png'}\nz.jpg\n")
    assert common.find_images(str(listing)) == [str(tmp_path / "set" / "z.jpg"),
                                                str(tmp_path / "set" / "b" / "a.png")]


def test_photos_with_one_name_in_many_folders_get_a_folder_each(tmp_path):
    """A glob over a data set's subjects (`**` at any depth) meets one file name in many of
    them: each photo gets its own output folder, its path below the photos' common folder."""
    from experiments import common

    for subject in ("s1/neutral", "s2/neutral", "s2/smile"):
        (tmp_path / subject).mkdir(parents=True)
        (tmp_path / subject / "IMG_0101.jpg").write_bytes(b"")
    (tmp_path / "s2" / "smile" / "IMG_0101.png").write_bytes(b"")
    paths = common.find_images(str(tmp_path / "**" / "IMG_0101.*"))
    assert len(paths) == 4  # `**` reaches the subjects' folders
    folders = common.photo_folders(paths, "out")
    assert len(set(folders)) == 4, folders
    # (a .jpg and a .png of one name in one folder: every folder keeps its extension)
    assert folders == [os.path.join("out", "s1", "neutral", "IMG_0101_jpg"),
                       os.path.join("out", "s2", "neutral", "IMG_0101_jpg"),
                       os.path.join("out", "s2", "smile", "IMG_0101_jpg"),
                       os.path.join("out", "s2", "smile", "IMG_0101_png")]
    no_png = [p for p in paths if p.endswith(".jpg")]
    assert common.photo_folders(no_png, "out") == [
        os.path.join("out", s, "IMG_0101") for s in ("s1/neutral", "s2/neutral", "s2/smile")]
    distinct = [str(tmp_path / "s1" / "neutral" / "IMG_0101.jpg"), str(tmp_path / "b.png")]
    assert common.photo_folders(distinct, "out") == [os.path.join("out", "IMG_0101"),
                                                     os.path.join("out", "b")]


def test_face_mask_keeps_an_occluder_out_of_the_texture(faces_dir, sfm_dir, tmp_path, run_fit):
    """A magenta "hand" over the lower right of the face: with a face mask that excludes it,
    neither the texture's start (the photo unwrapped) nor the pixel loss sees it, and the
    fitted UV map holds no magenta; without the mask it does; --face_mask=skin finds it unlike
    the face's skin, but where it covers the mouth. A folder of masks serves --images, a photo without one is reported."""
    import shutil

    from PIL import Image

    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    source = faces_dir / "ffhq" / "FFHQ" / "00002.png"
    image = np.asarray(Image.open(source).convert("RGB")).copy()
    image[150:, 128:] = (230, 25, 205)
    Image.fromarray(image).save(photos / "hand.png")
    shutil.copy(source.with_suffix(".npy"), photos / "hand.npy")  # its landmarks
    shutil.copy(source, photos / "other.png")
    shutil.copy(source.with_suffix(".npy"), photos / "other.npy")
    weight = np.full(image.shape[:2], 255, np.uint8)
    weight[140:, 118:] = 0  # a margin: the crop's filter reaches a pixel beyond
    Image.fromarray(weight).save(masks / "hand.png")
    model = f"--model={sfm_dir / 'sfm_shape_3448.bin'}"
    args = [model, *TINY, "--identity=none", "--batch_size=2", "--photo_texture"]
    code, stdout, stderr = run_fit(f"--images={photos}", f"--output_dir={tmp_path / 'masked'}",
                                   f"--face_mask={masks}", *args)
    assert code == 0, stderr[-2000:]
    assert "other.png: no face mask in" in stdout and "hand.png: no face mask" not in stdout
    coverage = {os.path.basename(r["photo"]): float(r["face_mask_coverage"])
                for r in read_summary(tmp_path / "masked" / "summary.csv")}
    assert coverage["other.png"] == 1.0 and 0.5 < coverage["hand.png"] < 0.95, coverage
    code, _, stderr = run_fit(f"--image={photos / 'hand.png'}",
                              f"--output_dir={tmp_path / 'plain'}", *args)
    assert code == 0, stderr[-2000:]
    # --face_mask=skin: no file; magenta is nothing like this face's skin
    code, _, stderr = run_fit(f"--image={photos / 'hand.png'}", "--face_mask=skin",
                              f"--output_dir={tmp_path / 'skin'}", *args)
    assert code == 0, stderr[-2000:]

    def magenta(path):
        uv = np.asarray(Image.open(path).convert("RGBA"), np.float64)
        shown = uv[..., 3] > 0  # photo_texture.png's alpha: texels it shows (mesh.png: all)
        return np.mean(shown & (uv[..., 0] > 150) & (uv[..., 1] < 90) & (uv[..., 2] > 130))

    for name in ("mesh.png", "photo_texture.png"):
        plain, masked = magenta(tmp_path / "plain" / name), \
            magenta(tmp_path / "masked" / "hand" / name)
        skin = magenta(tmp_path / "skin" / name)
        assert plain > 0.03 and masked < 0.002, (name, plain, masked)
        # the skin model leaves the lips' outline at weight 1, and the "hand" covers a corner
        # of the mouth: 0.017 of mesh.png
        assert skin < 0.25 * plain, (name, plain, skin)
    # build_uv_dataset (the texture models' training maps) takes the same masks
    import subprocess
    import sys

    def unwrapped(*extra):
        out = tmp_path / f"uv{len(extra)}"
        proc = subprocess.run([sys.executable, "-m", "experiments.build_uv_dataset",
                               f"--images={photos}", f"--output_dir={out}", model,
                               "--resolution=64", "--crop_size=64", "--iterations=20", *extra],
                              cwd=pathlib.Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        uv = np.asarray(Image.open(out / "hand.png").convert("RGB"), np.float64)
        shown = np.asarray(Image.open(out / "hand_mask.png"), np.float64) > 0
        return np.mean(shown & (uv[..., 0] > 150) & (uv[..., 1] < 90) & (uv[..., 2] > 130))

    assert unwrapped() > 0.03 and unwrapped(f"--face_mask={masks}") < 0.002
