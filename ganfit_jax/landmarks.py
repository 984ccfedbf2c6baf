"""68-point iBUG landmarks for the input photo: loaders for annotation files and dlib's detectors.

GANFIT's landmark loss (paper, Eq. 12) and the 5-point alignment of the identity crops start from
the 68 iBUG landmarks of the input image. This module reads them from files or detects them.

Coordinate convention (the project's): (68, 2) float32 pixel coordinates, x right, y down, origin at
the top-left *corner* of the image, so the centre of pixel (row i, column j) is (j + 0.5, i + 0.5).
Sources differ, and each loader converts:

- iBUG/menpo `.pts`: 1-based, pixel centres at integers starting at 1 (Matlab; menpo subtracts 1 to
  reach its 0-based convention) → subtract 0.5.
- `.npy` (e.g. FFHQ landmarks from face_alignment) and dlib's shape predictor: 0-based pixel
  indices (pixel centre at the integer) → add 0.5.
- JSON: ``{"landmarks": [[x, y], ...], "pixel_centre": c}`` or a bare list; ``c`` is where the
  first pixel's centre lies (0.5, the project's convention, when absent) → add 0.5 − c.

Images are float32 H×W×3 RGB in [0, 1].
"""

import contextlib
import json
import os
import pathlib
import threading

import numpy as np

from ganfit_jax import optional

NUM_LANDMARKS = 68
# Where the centre of the first pixel lies in each source's coordinates.
PIXEL_CENTRE = {".pts": 1.0, ".npy": 0.0, ".json": 0.5, "dlib": 0.0}

# iBUG-68 index groups used for 5-point alignment (0-based).
RIGHT_EYE = tuple(range(36, 42))   # subject's right eye: image left
LEFT_EYE = tuple(range(42, 48))
NOSE_TIP = 30
MOUTH_RIGHT = 48
MOUTH_LEFT = 54


def load_image(image):
    """Any image file or array → float32 H×W×3 RGB in [0, 1].

    Accepts a path (any format pillow reads), or an array that is greyscale (H, W) / (H, W, 1), RGB or
    RGBA (alpha dropped, not composited), uint8 (0..255), uint16 (0..65535) or float (assumed [0, 1]).
    A file is turned upright by its EXIF orientation, as viewers, browsers and OpenCV's `imread`
    show it: a phone stores a portrait photo's pixels sideways and says so in that tag, and the
    face detector only finds upright faces. Landmark files beside a photo are therefore read in
    the upright image's pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image {path} does not exist")
        from PIL import Image, ImageOps, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64) / 65535.0
                elif im.mode == "F":
                    arr = np.asarray(im, dtype=np.float64)
                else:
                    arr = np.asarray(im.convert("RGBA" if "A" in im.mode else "RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:  # OSError: truncated data
            raise ValueError(f"image {path} is not an image file pillow can read ({e})") from None
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image must be H×W, H×W×1, H×W×3 or H×W×4, got shape {arr.shape}")
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    # Each step on a fresh float32 copy, in place: a 12 MP photo is 36 M values, and every
    # extra pass over them is ~0.1 s of a loader thread.
    if arr.dtype in (np.uint8, np.uint16):
        out = arr.astype(np.float32)
        out /= np.float32(255.0 if arr.dtype == np.uint8 else 65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    else:
        raise ValueError(f"image dtype {arr.dtype} unsupported (uint8, uint16, float or bool)")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)


def to_uint8(image):
    """float [0, 1] image → uint8 H×W×3 (what dlib's C++ functions take)."""
    # in float32 and in place: a 12 MP photo's float64 round trip took ~0.8 s
    scaled = np.multiply(image, np.float32(255.0), dtype=np.float32)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return np.ascontiguousarray(scaled.astype(np.uint8))


def _check(points, path):
    points = np.asarray(points, dtype=np.float64)
    if points.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks {path}: expected 68 (x, y) points, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"landmarks {path}: contain non-finite values")
    return points


def _read_pts(path):
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    try:
        start = lines.index("{") + 1
        end = lines.index("}", start)
    except ValueError:
        raise ValueError(f"landmarks {path}: not a .pts file (expected 'version: 1', 'n_points: 68' "
                         "and the points between '{' and '}')") from None
    try:
        return np.array([[float(v) for v in ln.split()[:2]] for ln in lines[start:end] if ln])
    except ValueError:
        raise ValueError(f"landmarks {path}: a point line between '{{' and '}}' is not 'x y'") from None


def _read_points(path, pixel_centre):
    """The raw array of a landmark file and where its first pixel's centre lies."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"landmark file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".pts":
        points = _read_pts(path)
    elif suffix == ".npy":
        try:
            points = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"landmarks {path}: not a numeric .npy array ({e})") from None
        if points.ndim in (2, 3) and points.shape[-1] == 3:  # (x, y, visibility/z) variants
            points = points[..., :2]
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"landmarks {path}: invalid JSON ({e})") from None
        if isinstance(data, dict):
            key = "faces" if "faces" in data else "landmarks"
            if key not in data:
                raise ValueError(f"landmarks {path}: JSON object needs a 'landmarks' key with 68 "
                                 "[x, y] (or 'faces': a list of such lists)")
            if pixel_centre is None:
                pixel_centre = float(data.get("pixel_centre", PIXEL_CENTRE[".json"]))
            data = data[key]
        try:
            points = np.asarray(data, np.float64)
        except (ValueError, TypeError):
            raise ValueError(f"landmarks {path}: the points are not a list of [x, y]") from None
    else:
        raise ValueError(f"landmarks {path}: unknown extension {suffix!r} (expected .pts, .npy or .json)")
    if pixel_centre is None:
        pixel_centre = PIXEL_CENTRE[suffix]
    return points, pixel_centre


def load_landmarks(path, pixel_centre=None):
    """Read 68 iBUG landmarks from `.pts`, `.npy` or `.json` into the project's convention.

    `pixel_centre` overrides where the source puts the first pixel's centre (see module docstring).
    Returns float32 (68, 2).
    """
    points, pixel_centre = _read_points(path, pixel_centre)
    if points.ndim == 3 and points.shape[0] == 1:
        points = points[0]
    points = _check(points, path)
    return (points + (0.5 - pixel_centre)).astype(np.float32)


def load_landmark_sets(path, pixel_centre=None):
    """Every face's 68 landmarks in one file: a `.npy` of shape (faces, 68, 2) (or (68, 2)), a
    `.json` ``{"faces": [[[x, y], ...], ...]}`` or a list of such lists, or a `.pts` (one face).
    Returns float32 (faces, 68, 2) in the project's convention."""
    points, pixel_centre = _read_points(path, pixel_centre)
    if points.ndim == 2:
        points = points[None]
    if points.ndim != 3 or points.shape[0] == 0:
        raise ValueError(f"landmarks {path}: expected (faces, 68, 2) points, got shape "
                         f"{points.shape}")
    points = np.stack([_check(p, f"{path} (face {i})") for i, p in enumerate(points)])
    return (points + (0.5 - pixel_centre)).astype(np.float32)


def landmarks_json(landmarks, name="landmarks"):
    """Landmarks (project convention) as the JSON text `load_landmarks` reads back."""
    landmarks = _check(landmarks, name)
    return json.dumps({"landmarks": landmarks.tolist(), "pixel_centre": 0.5})


def save_landmarks_json(path, landmarks):
    """Write landmarks (project convention) as JSON that `load_landmarks` reads back."""
    pathlib.Path(path).write_text(landmarks_json(landmarks, path))


def interocular_distance(landmarks):
    """Distance between the eye centres (mean of each eye's 6 points): the usual error normaliser."""
    lm = np.asarray(landmarks)
    return float(np.linalg.norm(lm[list(LEFT_EYE)].mean(0) - lm[list(RIGHT_EYE)].mean(0)))


# dlib's face detectors keep scratch buffers in the object: one detector used by two threads at
# once (the prefetching loader's workers, `inputs.prefetch_map`) returned other boxes, and
# landmarks up to 40 px off, in 23 of 30 runs over 12 photos. Each call takes a detector no other
# thread holds from this pool and gives it back, so detectors are made once per thread that
# detects at the same time, not once per call. The face recognition ResNet is a dlib network
# with buffers of its own and is pooled the same way. The 68-point shape predictor only reads
# its model and is shared (0 of 100 such runs differed).
_FREE_MODELS = {"hog": [], "cnn": [], "recognizer": []}
_PREDICTOR = []
_DLIB_LOCK = threading.Lock()

# dlib's descriptor distance below which two faces are one person (its documented threshold:
# 99.38% on LFW), and how much farther than the nearest face another may be and still be taken
# for them (one person's distance varies by ~0.1 with pose and light).
SAME_PERSON = 0.6
SAME_MARGIN = 0.1


def _dlib():
    return optional.require("dlib", "dlib", "finding faces and their landmarks (dlib)")


# dlib's model files as the face_recognition_models package installs them (models/NAME)
SHAPE_PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
SHAPE_PREDICTOR_5 = "shape_predictor_5_face_landmarks.dat"
FACE_RECOGNITION_RESNET = "dlib_face_recognition_resnet_model_v1.dat"
CNN_FACE_DETECTOR = "mmod_human_face_detector.dat"


def dlib_model_file(name, purpose=None):
    """The path of one of dlib's model files (the names above) from face_recognition_models,
    found without importing that package (its `pkg_resources` import fails on setuptools >= 81
    and in Python 3.12's virtual environments: `optional.package_file`)."""
    return optional.package_file("face_recognition_models", "models/" + name, "dlib",
                                 purpose or f"dlib's model file {name}")


def _new_model(kind):
    dlib = _dlib()
    if kind == "hog":
        return dlib.get_frontal_face_detector()
    if kind == "cnn":
        return dlib.cnn_face_detection_model_v1(dlib_model_file(CNN_FACE_DETECTOR))
    return dlib.face_recognition_model_v1(dlib_model_file(FACE_RECOGNITION_RESNET))


@contextlib.contextmanager
def _own(kind):
    """A dlib model ('hog', 'cnn', 'recognizer') no other thread uses until this block ends."""
    with _DLIB_LOCK:
        free = _FREE_MODELS[kind]
        model = free.pop() if free else None
    if model is None:
        model = _new_model(kind)
    try:
        yield model
    finally:
        with _DLIB_LOCK:
            _FREE_MODELS[kind].append(model)


# 'hog+cnn': the HOG detector, then the CNN on an image where HOG finds no face (a turned or
# small face), so a folder's hard photos are fitted and its easy ones cost what HOG costs
DETECTORS = ("hog", "cnn", "hog+cnn")


def _check_detector(detector):
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {', '.join(map(repr, DETECTORS))}, got "
                         f"{detector!r}")


def _own_detector(detector):
    """A dlib detector ('hog' or 'cnn') that no other thread uses until the block ends."""
    _check_detector(detector)
    return _own(detector)


def _shape_predictor():
    dlib = _dlib()
    with _DLIB_LOCK:  # loaded once (~100 MB), by whichever thread asks first
        if not _PREDICTOR:
            _PREDICTOR.append(dlib.shape_predictor(dlib_model_file(SHAPE_PREDICTOR_68)))
        return _PREDICTOR[0]


def _boxes(det, detector, img, upsample):
    if detector == "hog":
        rects, scores, _ = det.run(img, upsample, 0.0)
        return [(r.left(), r.top(), r.right(), r.bottom()) for r in rects], list(scores)
    found = det(img, upsample)
    return ([(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()) for d in found],
            [d.confidence for d in found])


# dlib's HOG pyramid costs in proportion to pixels: a 12 MP phone photo took 6.7 s at upsample 1
# (0.6 s on its 1344 px copy) while its face spans hundreds of pixels. Faces are found on a copy
# whose long side is at most this, then the 68 points are placed on the full image.
DETECTION_MAX_SIDE = 1920
NO_FACE_HINT = ("give its landmarks (fit --landmarks, or a .pts/.npy/.json beside it) or try "
                "the 'cnn' detector (fit --detector=cnn: slower, finds more turned faces; "
                "--detector=hog+cnn runs it only where HOG finds none)")


def _pixels(image):
    """Any image `load_image` takes → uint8 H×W×3 for dlib, without a float round trip for
    pixels that are already that."""
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        if image.dtype == np.uint8:
            return np.ascontiguousarray(image)
        if image.dtype == np.float32:  # what load_image returns: its values are in [0, 1]
            return to_uint8(image)
    return to_uint8(load_image(image))


def _detection_copy(img, max_side):
    """`img` (uint8) averaged over k×k blocks, the smallest whole k that brings its long side to
    at most `max_side`, and k (1: the image itself). A whole factor keeps every pixel's weight
    equal and the boxes' way back exact."""
    long_side = max(img.shape[:2])
    if not max_side or long_side <= max_side:
        return img, 1
    from PIL import Image

    factor = -(-long_side // max_side)
    return np.asarray(Image.fromarray(img).reduce(factor)), factor


# 'hog+cnn' searches with the CNN on a copy at most this long: on the 1920 px copy one search
# took 35 s on two cores (a faceless HD video frame, searched again at full size, ~1 min); the
# faces HOG misses and the CNN is there for, turned ones, are seldom small
CNN_FALLBACK_MAX_SIDE = 800


def detect_faces(image, detector="hog", upsample=1, max_side=DETECTION_MAX_SIDE):
    """Face boxes as (left, top, right, bottom) in dlib pixel indices, with detector scores.

    'hog' is dlib's frontal HOG+SVM detector; 'cnn' the MMOD CNN from face_recognition_models (slower
    on CPU, better on profiles and small faces); 'hog+cnn' the CNN's boxes only where HOG finds
    none (the scores are then the CNN's). A larger image is searched at `max_side` pixels
    on its long side (None: at full size) and its boxes mapped back; where HOG finds no face
    there the full image is searched, so only a small face
    beside a large one can be missed (at upsample 1 its ~40-pixel minimum becomes ~40 × long
    side / max_side). The CNN searches the copy alone: at the full size of a 12 MP photo it ran
    for minutes and then out of 24 GB of memory. 'hog+cnn''s CNN searches a copy of at most
    CNN_FALLBACK_MAX_SIDE pixels. Safe to call from several threads at once.
    """
    _check_detector(detector)
    if detector == "hog+cnn":
        found = detect_faces(image, "hog", upsample, max_side)
        if found[0]:
            return found
        return detect_faces(image, "cnn", upsample, min(max_side or np.inf,
                                                        CNN_FALLBACK_MAX_SIDE))
    img = _pixels(image)
    small, scale = _detection_copy(img, max_side)
    with _own_detector(detector) as det:
        boxes, scores = _boxes(det, detector, small, upsample)
        if scale == 1 or boxes or detector == "cnn":
            # a pixel index i of the copy covers [i, i + 1) there, [i·s, (i + 1)·s) in the image
            boxes = [tuple(int(round((v + 0.5) * scale - 0.5)) for v in box) for box in boxes]
            return boxes, scores
        return _boxes(det, detector, img, upsample)


def _to_points(shape):
    points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(NUM_LANDMARKS)], np.float64)
    return (points + (0.5 - PIXEL_CENTRE["dlib"])).astype(np.float32)


def _descriptor(recognizer, img, shape):
    return np.asarray(recognizer.compute_face_descriptor(img, shape), np.float64)


def face_descriptor(image, points):
    """dlib's 128-D face descriptor (the ResNet `identity.dlib_resnet` ports) of the face whose
    68 points (the project's convention) are `points`: who a face is, for following one person
    through a video (`detect_landmarks(like=...)`)."""
    dlib = _dlib()

    img = _pixels(image)
    pts = np.round(np.asarray(points, np.float64) - (0.5 - PIXEL_CENTRE["dlib"])).astype(int)
    (left, top), (right, bottom) = pts.min(0), pts.max(0)
    shape = dlib.full_object_detection(dlib.rectangle(int(left), int(top), int(right), int(bottom)),
                                       [dlib.point(int(x), int(y)) for x, y in pts])
    with _own("recognizer") as recognizer:
        return _descriptor(recognizer, img, shape)


def _found_faces(image, detector, upsample, max_side, name):
    """(uint8 pixels, face boxes, the image's name for errors); ValueError naming it (default:
    the path, if `image` is one) where dlib finds no face."""
    if name is None:
        name = str(image) if isinstance(image, (str, os.PathLike)) else "the given image"
    img = _pixels(image)
    boxes, _ = detect_faces(img, detector, upsample, max_side)
    if not boxes:
        searched = ("hog and cnn detectors" if detector == "hog+cnn"
                    else f"{detector} detector")
        raise ValueError(f"no face found in {name} by dlib's {searched} (upsample={upsample}); "
                         + ("give its landmarks (fit --landmarks, or a .pts/.npy/.json beside "
                            "it)" if "cnn" in detector else NO_FACE_HINT))
    return img, boxes, name


def detect_landmarks(image, detector="hog", face=None, upsample=1, name=None, near=None,
                     max_side=DETECTION_MAX_SIDE, like=None):
    """68 iBUG landmarks of one face by dlib (detector + shape_predictor_68_face_landmarks).

    face: None picks the largest box; an int picks the face at that index in order of decreasing box
    area. near: an (x, y) point (the project's convention) instead picks the face whose box centre
    is nearest it, e.g. where the same person was in a neighbouring video frame. like: a
    `face_descriptor`; where several faces are found and any of them is that person (descriptor
    distance under SAME_PERSON and within SAME_MARGIN of the nearest face's), only those are
    chosen from, so a cut or two people crossing does not hand the person's place to someone
    else. `name` (default: the path, if `image` is one) appears in the error raised when no face
    is found. Faces are searched for at `max_side` pixels (`detect_faces`); the points are
    placed on the full image. Returns float32 (68, 2) in the project's convention.
    """
    dlib = _dlib()

    if face is not None and near is not None:
        raise ValueError("give face (an index by size) or near (a point), not both")
    img, boxes, name = _found_faces(image, detector, upsample, max_side, name)
    predictor = _shape_predictor()
    shapes = [predictor(img, dlib.rectangle(*box)) for box in boxes] if (
        like is not None and len(boxes) > 1) else None
    candidates = list(range(len(boxes)))
    if shapes is not None:
        with _own("recognizer") as recognizer:
            distances = [np.linalg.norm(_descriptor(recognizer, img, shape) - like)
                         for shape in shapes]
        best = min(distances)
        # Lookalikes pass dlib's threshold too (two FFHQ children: 0.49), so only faces nearly
        # as close as the best are kept; between those, place decides.
        candidates = [i for i in candidates
                      if distances[i] < SAME_PERSON and distances[i] < best + SAME_MARGIN
                      ] or candidates
    areas = [(right - left) * (bottom - top) for left, top, right, bottom in boxes]
    order = sorted(candidates, key=lambda i: -areas[i])
    if near is not None:  # dlib's boxes are pixel indices: their centres sit at +0.5
        centres = np.array([((l + r) / 2 + 0.5, (t + b) / 2 + 0.5) for l, t, r, b in boxes])
        distance = np.linalg.norm(centres - np.asarray(near, np.float64), axis=1)
        order = [min(candidates, key=lambda i: distance[i])]
    index = 0 if face is None else int(face)
    if not 0 <= index < len(order):
        raise ValueError(f"face index {index} out of range: {len(boxes)} face(s) found in {name}")
    chosen = order[index]
    if shapes is not None:
        return _to_points(shapes[chosen])
    return _to_points(predictor(img, dlib.rectangle(*boxes[chosen])))


def detect_all_landmarks(image, detector="hog", upsample=1, name=None,
                         max_side=DETECTION_MAX_SIDE):
    """68 iBUG landmarks of every face dlib finds, largest box first (the order of
    `detect_landmarks(face=k)`): float32 (faces, 68, 2) in the project's convention. Raises
    ValueError naming `name` (default: the path, if `image` is one) when there is none."""
    dlib = _dlib()

    img, boxes, _ = _found_faces(image, detector, upsample, max_side, name)
    boxes = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    predictor = _shape_predictor()
    return np.stack([_to_points(predictor(img, dlib.rectangle(*box))) for box in boxes])


def follow_person(frames, detector="hog", face=0, names=None, given=None):
    """One person's 68 landmarks through frames (a video's, or one person's photos), as `fit
    --frames` follows them: the first frame with a face gives the person (its `face`-th largest
    face) and their face descriptor; in each later frame, the face nearest where they were in the
    frame before among the faces that are that person where any is (`detect_landmarks`' `near`
    and `like`), so neither a larger face walking in nor a stranger standing in their place
    after a cut is taken for them. Yields (index, float32 (68, 2)) or (index, the ValueError of
    a frame without a face), frame after frame; `names` (default 'frame i') name them in it.
    `given(i)`, where given, is frame i's landmarks from a file (None where there is none):
    taken as they are, and the person followed on from them."""
    near = like = None
    for i, frame in enumerate(frames):
        name = f"frame {i}" if names is None else names[i]
        points = None if given is None else given(i)
        try:
            if points is None:
                points = detect_landmarks(frame, detector, face=None if near is not None
                                          else face, near=near, like=like, name=name)
        except ValueError as e:
            yield i, e
            continue
        if near is None:
            try:
                like = face_descriptor(frame, points)
            except RuntimeError:  # dlib cannot describe it: followed by place alone
                like = None
        near = tuple(np.asarray(points, np.float64).mean(0))
        yield i, points


def landmark_file(image_path, landmarks_path=None):
    """The landmark file for a photo: `landmarks_path` if given, else a .pts/.npy/.json of its
    stem beside it, else None."""
    if landmarks_path is not None:
        return pathlib.Path(landmarks_path)
    for suffix in (".pts", ".npy", ".json"):
        candidate = pathlib.Path(image_path).with_suffix(suffix)
        if candidate.exists():
            return candidate
    return None


def load_or_detect(image_path, landmarks_path=None, detector="hog", near=None, image=None,
                   face=None, like=None):
    """Landmarks from `landmarks_path`, else a sibling .pts/.npy/.json, else detected by dlib
    (the face nearest `near`, if given, else the `face`-th largest, default the largest) in
    `image`, the photo's pixels where the caller has them already, else read from
    `image_path`; `like` as in `detect_landmarks`."""
    found = landmark_file(image_path, landmarks_path)
    if found is not None:
        return load_landmarks(found)
    return detect_landmarks(image_path if image is None else image, detector=detector, near=near,
                            face=face, like=like, name=str(image_path))


def load_or_detect_all(image_path, landmarks_path=None, detector="hog", image=None):
    """Every face's landmarks (faces, 68, 2): from `landmarks_path`, else a sibling
    .pts/.npy/.json (`load_landmark_sets`), else every face dlib finds (`detect_all_landmarks`)
    in `image` (the photo's pixels where the caller has them), else read from `image_path`."""
    found = landmark_file(image_path, landmarks_path)
    if found is not None:
        return load_landmark_sets(found)
    return detect_all_landmarks(image_path if image is None else image, detector=detector,
                                name=str(image_path))
