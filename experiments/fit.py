"""GANFIT: fit a textured 3D face to a photo, a folder of photos, or frames of one person.

    python -m experiments.fit --image=PHOTO [--landmarks=PTS_OR_NPY] --output_dir=outputs/NAME
    python -m experiments.fit --images='DIR_OR_GLOB' --batch_size=8 --output_dir=outputs/batch
    python -m experiments.fit --image=GROUP_PHOTO --all_faces --output_dir=outputs/group
    python -m experiments.fit --frames=DIR --output_dir=outputs/person   # one shared identity
    python -m experiments.fit --frames=clip.mp4 --frame_step=5 --output_dir=outputs/person

Per result it writes: mesh.obj + mesh.mtl + mesh.png (UV texture; --glb adds mesh.glb, the same
in one binary glTF file, in metres; --depth adds depth.npy, depth.png and normals.png, the
fitted surface's depth and normals in the photo's pixels; --photo_texture adds
photo_texture.png, the photo unwrapped into the UV layout), params.npz (every parameter
block, vertices (N,3) mm in model coordinates, landmarks3d (68,3), landmarks2d in the photo, and
the camera as OpenCV takes one: camera_matrix (3,3) in the photo's pixels, rotation (3,3) and
translation (3,) from model to camera coordinates),
overlay.png (render on the photo), shape.png (the fitted shape alone, grey, on the photo at its
own resolution), side_by_side.png (photo | render | overlay; where the
crop runs past the photo's border, dimmed), intrinsics.png (the render's
albedo | shading | highlight: render = albedo × shading × metrics.json's shading_scale +
highlight), landmarks.png
(the landmarks followed, green, and the fitted model's, red, on the crop), landmarks.json (the
former in the photo's pixels, as --landmarks reads them), views.png (three other viewpoints,
textured and as grey shape) and loss.png. With --frames, the output folder also gets
sequence.npz (every fitted frame's expression, camera, head-pose angles, light and landmarks in
frame order, the shared shape and texture once), sequence.png (pose and expression over the
frames), overlay.mp4 (the frames' overlays as a video) and shape.mp4 (their shape.png). With
--all_faces, every face of a photo is a result in its own folder face_00, face_01, ... (largest
first), and the photo's folder gets overlay.png (every face pasted back) and faces.json. The
output folder gets flags.txt (every flag as this run had it; --flagfile reads it back). Existing
outputs are never replaced unless --overwrite. --face_mask (a file, or a folder of masks named as
the photos) keeps what covers the face (hair, hands, glasses) out of the pixel loss and out of
the texture's start: those texels take their mirror texel's colour.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import sys
import time
import typing

from absl import app, flags

from experiments import common, processes
from ganfit_jax.landmarks import DETECTORS
from ganfit_jax.optional import MissingDependency

FLAGS = flags.FLAGS
flags.DEFINE_string("image", None, "One photo.")
flags.DEFINE_string("images", None, "A folder, glob or list file (.txt/.lst: a path a line) of "
                    "photos, fitted independently in "
                    "batches of --batch_size (vmapped; see --batch_steps).")
flags.DEFINE_string("frames", None, "A folder of frames, or a video file (.mp4, .mov, .avi, "
                    ".mkv, .webm, ...), of one person: per-frame expression, pose and light, one "
                    "shared shape and texture (Eq. 13); a frame without a face is reported and "
                    "left out. The first frame's largest face (--face) is the person, then the "
                    "face nearest where they were (the frame before; a tracked frame's nearest "
                    "keyframe) among those dlib's face descriptor takes for them.")
flags.DEFINE_integer("frame_step", 1, "--frames video: fit every N-th frame.", lower_bound=1)
flags.DEFINE_integer("max_frames", 0, "--frames video: at most this many frames (0: all); all "
                     "frames are fitted jointly, so memory grows with their number.", lower_bound=0)
flags.DEFINE_enum("keyframes", "uniform", ["uniform", "spread"],
                 "--frames: which frames are fitted together (Eq. 13; the keyframes of --track): "
                 "'uniform', every --frame_step-th, at most --max_frames; 'spread', the "
                 "--max_frames of those whose head poses (from each frame's landmarks) lie "
                 "farthest apart, the most frontal first, so that the shared shape sees the face "
                 "from as many sides as the video shows (every candidate's face is detected "
                 "by dlib first, even where a landmark file lies beside a frame).")
flags.DEFINE_string("landmarks", None, "68 iBUG landmarks for --image (.pts, .npy (68,2) or "
                    ".json). Default: a file of the same stem beside the image, else dlib.")
flags.DEFINE_string("face_mask", None, "Which of the photo's pixels the pixel loss (Eq. 10) "
                    "compares: a face mask, 1 on the face, 0 on hair, hands, glasses and the "
                    "background (a face parser's output), in the upright photo's pixels. A file "
                    "(--image), or a folder holding STEM.png or STEM.npy for each photo or frame "
                    "(--images, --frames=DIR; a photo without one is compared wherever the face "
                    "covers it, and reported). Values: 0/1, 0/255 or [0, 1] weights; a label map "
                    "with --mask_labels. 'skin': no file, each photo's weights from its own "
                    "skin colour (inputs.skin_pixel_weight: hair, glasses, a scarf over the face "
                    "weigh 0; a hand, skin-coloured, does not).")
flags.DEFINE_list("mask_labels", None, "--face_mask files are label maps: the labels of the "
                  "face (integers), 'celebamask' (CelebAMask-HQ's skin, brows, eyes, nose, mouth "
                  "and lips: 1,2,3,4,5,10,11,12,13, as face-parsing.PyTorch labels them) or "
                  "'nonzero'.")
flags.DEFINE_string("model", None, "3DMM (.npz or any format morphable.load knows). Default: "
                    "checkpoints/sfm.npz, else $GANFIT_ASSETS/sfm (../shared/assets/sfm).")
flags.DEFINE_string("identity", "dlib", "Identity network: dlib | tiny | none | arcface-r50 "
                    "(etc., with --identity_weights).")
flags.DEFINE_string("identity_weights", None, "Weights for --identity (.msgpack/.pth/.onnx).")
flags.DEFINE_string("texture", "direct", "Texture model: a GAN .msgpack, a PCA .npz, 'direct' "
                    "(prior-free UV map; the fallback before a GAN is trained) or 'random' "
                    "(untrained tiny GAN, tests only).")
flags.DEFINE_integer("iterations", 300, "Stage-2 iterations (everything, Eq. 12).", lower_bound=0)
flags.DEFINE_integer("stage1_iterations", 600, "Stage-1 iterations (landmarks only; cheap).",
                     lower_bound=0)
flags.DEFINE_float("stage1_learning_rate", 0.03, "Stage-1 Adam rate (stage 2: 0.01, the paper's).")
flags.DEFINE_integer("chunk", 25, "Iterations per jitted chunk (one progress line each; the "
                     "iteration flags are run exactly, the last chunk shorter where needed: on "
                     "a GPU or TPU a second program to compile, so keep them multiples there).",
                     lower_bound=1)
flags.DEFINE_integer("image_size", 224, "Working (render) resolution.", lower_bound=32)
flags.DEFINE_integer("batch_size", 8, "Photos per batch with --images.", lower_bound=1)
flags.DEFINE_integer("loader_threads", 0, "--images/--track: threads that decode, landmark and "
                     "crop the next photos while the device fits (0: 2 on the CPU, which they "
                     "share with XLA; on an accelerator every CPU this process may use).",
                     lower_bound=0)
flags.DEFINE_enum("detector", "hog", DETECTORS, "dlib face detector when landmarks must be "
                  "detected: 'hog+cnn' runs the slower CNN only on photos or frames where HOG "
                  "finds no face.")
flags.DEFINE_integer("face", 0, "Which detected face to fit, by size: 0 the largest, 1 the next, "
                     "...; with --frames, the person followed from the first frame. A photo "
                     "with fewer faces is reported (--images: skipped). Landmarks read from a "
                     "file name their face themselves.", lower_bound=0)
flags.DEFINE_bool("all_faces", False, "--image/--images: fit every face dlib finds (or every "
                  "face of a (faces, 68, 2) landmark file), largest first, each in a folder "
                  "face_00, face_01, ... of the photo's output folder, in --batch_size batches; "
                  "the photo's folder also gets overlay.png (every face pasted back) and "
                  "faces.json (written last).")
flags.DEFINE_float("min_interocular", 0.0, "--all_faces: leave out faces whose eyes are closer "
                   "than this many pixels of the photo (a crowd's distant faces), reported by "
                   "name.", lower_bound=0.0)
flags.DEFINE_bool("overlay_video", True, "--frames: also write overlay.mp4, every fitted frame's "
                  "overlay.png in frame order (H.264), at the video's frame rate over the step "
                  "between fitted frames (a folder of frames: --fps), and shape.mp4 from their "
                  "shape.png the same way (with --shape_image).")
flags.DEFINE_float("fps", 25.0, "--frames=DIR: the frames' rate, for overlay.mp4 and shape.mp4 "
                   "(a video's own rate is read from it).", lower_bound=0.01)
flags.DEFINE_integer("seed", 0, "PRNG seed (random second render, texture init).")
flags.DEFINE_float("lambda_id", 2.0, "λ_id", lower_bound=0.0)
flags.DEFINE_float("lambda_id_random", 2.0, "λ̂_id", lower_bound=0.0)
flags.DEFINE_float("lambda_content", 50.0, "λ_con", lower_bound=0.0)
flags.DEFINE_float("lambda_pixel", 1.0, "λ_pix", lower_bound=0.0)
flags.DEFINE_float("lambda_landmark", 0.01, "λ_lan (the paper: 0.001; see losses.LossWeights)",
                   lower_bound=0.0)
flags.DEFINE_float("lambda_shape", 0.05, "λ_reg on shape", lower_bound=0.0)
flags.DEFINE_float("lambda_expression", 0.05, "λ_reg on expression", lower_bound=0.0)
flags.DEFINE_float("lambda_light", 0.01, "λ_reg on light", lower_bound=0.0)
flags.DEFINE_string("expression_range", "model", "The range every expression coefficient "
                    "keeps to in the fit: `model`, the model's own (blendshapes, the SFM's and "
                    "ICT's: [0, 1]; PCA expressions, BFM 2017's or FLAME's: unbounded), `none` "
                    "(unbounded), or `LOW,HIGH`.")
flags.register_validator(
    "expression_range", lambda v: v is None or v in ("model", "none") or _range_or_none(v),
    message="--expression_range: expected model, none or two numbers LOW,HIGH with LOW < HIGH")
flags.DEFINE_string("output_dir", None, "Where results go (one sub-folder per photo with "
                    "--images; the folder itself with --image/--frames).")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
flags.DEFINE_bool("glb", False, "Also write mesh.glb (with --frames also identity.glb): the "
                  "textured mesh as one binary glTF file, in metres, that a browser, Blender or "
                  "a phone shows as it is.")
flags.DEFINE_bool("depth", False, "Also write depth.npy (the photo's height × width, float32: "
                  "the fitted face's depth in mm along the camera's axis, OpenCV's camera z, NaN "
                  "off the face), depth.png (nearer brighter) and normals.png (camera-space "
                  "normals as colours: red right, green up, blue towards the camera), rendered "
                  "at the face's resolution in the photo (at most 2048 px).")
flags.DEFINE_bool("shape_image", True, "Write shape.png (the fitted shape alone, grey, over "
                  "the photo at the face's resolution; --all_faces: every face's, in the "
                  "photo's folder; --frames: shape.mp4 of them), and a grey row in views.png; "
                  "--noshape_image skips them (~8 s less for a 12 MP photo).")
flags.DEFINE_bool("transforms", False, "--frames: also write transforms.json (nerfstudio's and "
                  "instant-ngp's camera file) in the output folder, for training a head avatar "
                  "(NeRF, 3D Gaussians) on the frames: each fitted frame's camera around the "
                  "fitted head (transform_matrix: OpenGL camera-to-world, metres, model "
                  "coordinates), its intrinsics in its pixels, its expression, and file_path: "
                  "the upright frame, written as input.png in its folder.")
flags.DEFINE_bool("photo_texture", False, "Also write photo_texture.png: the photo's own "
                  "colours in the model's UV layout (512², or mesh.png's size when larger), as "
                  "eos' isomap and DECA's uv_texture_gt give them; alpha 255 where the photo "
                  "shows the texel, 128 filled from its mirror texel, 0 unseen.")
flags.DEFINE_bool("track", False, "--frames: after the joint fit of the keyframes (every "
                  "--frame_step-th frame, at most --max_frames), fit every other frame with the "
                  "joint shape and texture held (its expression, pose and light its own), in "
                  "batches of --batch_size decoded as they go: a long video in the memory of "
                  "one batch. The held texture is generated once, so these steps skip G.")
flags.DEFINE_integer("track_iterations", None, "--track: stage-2 iterations of a tracked frame "
                     "(default: --iterations); its shape and texture are known, only "
                     "expression, pose and light are fitted", lower_bound=0)
flags.DEFINE_integer("track_stage1_iterations", None, "--track: stage-1 iterations of a tracked "
                     "frame (default: --stage1_iterations)", lower_bound=0)
flags.DEFINE_bool("resume", False, "--images or --frames --track: go on with an interrupted run "
                  "into the same --output_dir: photos or frames whose folder holds a finished "
                  "fit (its metrics.json, written last) are skipped, the others fitted, "
                  "replacing what the interrupted run left in their folders. With --track, "
                  "finished keyframes give the joint shape and texture (read from their "
                  "params.npz); if any keyframe is unfinished, the keyframes are fitted again "
                  "and every other frame tracked again.")
flags.DEFINE_bool("antialias", False, "Blend the renders' silhouettes (render.antialias, "
                  "nvdiffrast's analytic antialiasing): the face's outline carries gradients to "
                  "shape and camera, and the identity network and the output images see a smooth "
                  "outline rather than a staircase; 2-3.5x the renderer's time (BENCHMARKS.md).")
flags.DEFINE_bool("remat", False, "Recompute activations in the backward pass (jax.checkpoint): "
                  "less device memory per photo, for large --batch_size.")
flags.DEFINE_bool("two_threads", True, "One photo on the CPU: run Eq. 12's two views (the photo's "
                  "and the random one) as programs on two threads (20-25% faster steps, ~6 s "
                  "more compilation; BENCHMARKS.md). --notwo_threads: one fused program.")
flags.DEFINE_enum("batch_steps", "auto", ["auto", "vmap", "per_photo"],
                  "--images and --frames: how a batch steps. 'auto': on one CPU device stage 2 "
                  "goes photo (frame) after photo with the single-photo step (1.3-1.7x the "
                  "vmapped throughput on a 2-core CPU; BENCHMARKS.md; --frames then averages "
                  "the shared shape and texture after each step), elsewhere one vmapped "
                  "program.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "Width of the texture GAN and identity network; bfloat16 is ~1.5x faster on "
                  "GPUs (BENCHMARKS.md), geometry and losses stay float32.")
flags.DEFINE_string("compilation_cache",
                    os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "ganfit_jax",
                                 "xla"),
                    "Folder of JAX's persistent compilation cache ('' to turn it off): a second "
                    "fit of the same shapes skips XLA compilation (~20 s of a ~35 s fit of one "
                    "photo on a 2-core CPU).")
flags.DEFINE_bool("distributed", False, "--images over several processes (hosts): call "
                  "jax.distributed.initialize() first; process i of n fits photos i, i+n, ... "
                  "of the folder on its own devices (no host waits for another). With --frames "
                  "--track, process 0 fits the keyframes and hands their shape and texture to "
                  "the others, process i tracks other frames i, i+n, ..., and process 0 writes "
                  "the sequence once all are done. The address, count and id come from the "
                  "flags below, else from the cluster (SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: how many processes.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "--distributed: this process's id, 0 .. n-1.",
                     lower_bound=0)
common.require_positive("stage1_learning_rate")

# --frames: in the output folder itself
SEQUENCE_FILES = ("sequence.npz", "sequence.png", "identity.obj", "identity.mtl", "identity.png",
                  "overlay.mp4", "shape.mp4")
DEPTH_FILES = ("depth.npy", "depth.png", "normals.png")
FACES_FILES = ("overlay.png", "shape.png", "faces.json")  # --all_faces: the photo's folder
OUTPUT_FILES = ("mesh.obj", "mesh.mtl", "mesh.png", "params.npz", "overlay.png", "shape.png",
                "side_by_side.png", "intrinsics.png", "landmarks.png", "landmarks.json",
                "views.png", "loss.png", "metrics.json")


def faces_files():
    """--all_faces: what each photo's own folder gets (beside its face_NN folders)."""
    return tuple(f for f in FACES_FILES if FLAGS.shape_image or f != "shape.png")


def result_files():
    """What each result's folder gets (OUTPUT_FILES, mesh.glb under --glb, the depth and normal
    maps under --depth, photo_texture.png under --photo_texture)."""
    return (tuple(f for f in OUTPUT_FILES if FLAGS.shape_image or f != "shape.png")
            + (("mesh.glb",) if FLAGS.glb else ())
            + (DEPTH_FILES if FLAGS.depth else ())
            + (("photo_texture.png",) if FLAGS.photo_texture else ())
            + (("input.png",) if FLAGS.transforms else ()))


def sequence_files():
    """--frames: what the output folder itself gets (the videos under --overlay_video, shape.mp4
    also under --shape_image, identity.glb under --glb, transforms.json under --transforms)."""
    left_out = ({"overlay.mp4", "shape.mp4"} if not FLAGS.overlay_video
                else set() if FLAGS.shape_image else {"shape.mp4"})
    return (tuple(f for f in SEQUENCE_FILES if f not in left_out)
            + (("identity.glb",) if FLAGS.glb else ())
            + (("transforms.json",) if FLAGS.transforms else ()))


SHUTDOWN_WAIT_S = 48 * 3600  # --distributed: how long a finished process waits for the others


class InputError(Exception):
    """A problem with what the user gave: reported in one line, exit code 1, nothing written."""


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def list_images(spec, flag):
    try:
        paths = common.find_images(spec)
    except (ValueError, OSError) as e:
        raise InputError(f"--{flag}={spec}: {e}") from None
    if not paths:
        raise InputError(f"--{flag}={spec}: no images found")
    return paths


def default_model_path():
    path = common.default_model_path()
    if path is None:
        raise InputError(common.MISSING_MODEL)
    return path


def _range_or_none(text):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        return None
    return (low, high) if low < high else None


@functools.lru_cache(maxsize=2)  # --keyframes=spread reads it before the fit does
def load_model(path):
    """The model at `path`, with --expression_range's range."""
    from ganfit_jax import morphable

    try:
        model = morphable.load(path)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--model: {e}") from None
    if FLAGS.expression_range == "model":
        return model
    return model.replace(expression_range=_range_or_none(FLAGS.expression_range))


def load_texture(spec, key):
    from ganfit_jax.texture.direct import DirectUVTexture

    if spec == "direct":
        return DirectUVTexture()
    from ganfit_jax.texture import model as texture_model

    if spec == "random":
        return texture_model.random_texture_model(key, resolution=64, latent_dim=32)
    try:
        return texture_model.load_texture_model(spec)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--texture: {e}") from None


def load_identity_net(name, weights, key):
    if name == "none":
        return None
    from ganfit_jax import identity

    try:
        if name == "tiny":
            return identity.load_identity("tiny", key=key)
        return identity.load_identity(name, weights=weights)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"--identity={name}: {e}") from None


class Prepared(typing.NamedTuple):
    """A photo (or frame) ready to fit: the photo, its working crop, the crop's landmarks, the
    crop's CropTransform and the crop's pixel weights (--face_mask; None without)."""

    image: typing.Any
    crop: typing.Any
    landmarks: typing.Any
    transform: typing.Any
    pixel_weight: typing.Any = None


def mask_labels():
    """--mask_labels as load_pixel_weight takes it: None, a name, or integers."""
    try:
        return common.parse_mask_labels(FLAGS.mask_labels)
    except ValueError as e:
        raise InputError(str(e)) from None


def pixel_weight(path, image, crop, lm_crop, transform):
    """The working crop's pixel weights from --face_mask (`common.crop_face_mask`)."""
    try:
        return common.crop_face_mask(FLAGS.face_mask, mask_labels(), path, image, crop,
                                     lm_crop, transform,
                                     report=lambda text: print(text, flush=True))
    except (ValueError, FileNotFoundError) as e:
        raise InputError(f"{e} (--face_mask for {path})") from None


def prepare(path, landmarks_path, size, detector, near=None, face=0, like=None):
    """Photo → Prepared (the photo, working crop, crop landmarks, CropTransform, weights). Detected
    landmarks are those of the face nearest the point `near`, if given, else of the `face`-th
    largest; among the faces that are the person whose descriptor is `like`, where any is."""
    from ganfit_jax import inputs, landmarks

    try:
        image = landmarks.load_image(path)
        lm = landmarks.load_or_detect(path, landmarks_path, detector=detector, near=near,
                                      image=image, face=None if near is not None else face,
                                      like=like)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    try:
        crop, lm_crop, transform = inputs.crop_face(image, lm, size)
    except ValueError as e:
        raise InputError(f"{landmarks_path or path}: {e}") from None
    return Prepared(image, crop, lm_crop, transform,
                    pixel_weight(path, image, crop, lm_crop, transform))


def prepare_all(path, landmarks_path, size, detector):
    """--all_faces: a photo → [what `prepare` returns] for every face, largest first, the
    photo's pixels shared between them."""
    from ganfit_jax import inputs, landmarks

    try:
        image = landmarks.load_image(path)
        faces = landmarks.load_or_detect_all(path, landmarks_path, detector=detector, image=image)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    items = []
    for k, lm in enumerate(faces):
        eyes = landmarks.interocular_distance(lm)
        if eyes < FLAGS.min_interocular:
            print(f"{path}: face {k} left out, its eyes {eyes:.0f} px apart "
                  f"(--min_interocular={FLAGS.min_interocular:g})", flush=True)
            continue
        try:
            crop, lm_crop, transform = inputs.crop_face(image, lm, size)
        except ValueError as e:
            raise InputError(f"{landmarks_path or path} (face {k}): {e}") from None
        items.append(Prepared(image, crop, lm_crop, transform,
                              pixel_weight(path, image, crop, lm_crop, transform)))
    if not items:
        raise InputError(f"{path}: every face's eyes are closer than --min_interocular="
                         f"{FLAGS.min_interocular:g} px")
    return items


def face_folder(folder, k):
    return os.path.join(folder, f"face_{k:02d}")


def prepare_frame(frame, name, size, detector, near=None, face=0, like=None):
    """A decoded video frame → what `prepare` returns for a photo (landmarks detected by dlib)."""
    from ganfit_jax import inputs, landmarks

    try:
        image = landmarks.load_image(frame)
        lm = landmarks.detect_landmarks(image, detector=detector, name=name, near=near,
                                        face=None if near is not None else face, like=like)
    except ValueError as e:
        raise InputError(str(e)) from None
    crop, lm_crop, transform = inputs.crop_face(image, lm, size)
    # a video's frames have no mask files (check_face_mask): None, or --face_mask=skin's weights
    return Prepared(image, crop, lm_crop, transform,
                    pixel_weight(name, image, crop, lm_crop, transform))


def load_frame(path):
    from ganfit_jax import landmarks

    try:
        return landmarks.load_image(path)
    except (ValueError, FileNotFoundError):
        return None  # follow_person reports it as a frame without a face


def spread_keyframes(names, images):
    """--keyframes=spread: of the candidate frames (`names`, their pixels `images`, an iterable
    read as it goes), the --max_frames whose head poses lie farthest apart
    (`camera.spread_views` over the yaw and pitch of the closed-form camera that puts the
    model's mean landmarks on each frame's, the person followed as `fit --frames` follows them),
    in frame order."""
    import numpy as np

    from ganfit_jax import camera, landmarks, morphable

    model = load_model(FLAGS.model or default_model_path())
    mean_landmarks = np.asarray(morphable.landmarks3d(model, model.mean), np.float64)
    numbers, angles, t0 = [], [], time.time()

    def frames():
        for i, image in enumerate(images):
            if i and i % 50 == 0:
                total = f" of {len(names)}" if isinstance(names, list) else ""
                print(f"--keyframes=spread: {i}{total} candidate frames, {len(numbers)} with "
                      f"the person, {time.time() - t0:.0f}s", flush=True)
            yield np.zeros((8, 8, 3), np.float32) if image is None else image

    from_files = []

    def given(i):
        """A folder's frame with a landmark file beside it (fit then reads it too)."""
        found = landmarks.landmark_file(names[i]) if isinstance(names, list) else None
        if found is None:
            return None
        from_files.append(i)
        return landmarks.load_landmarks(found)

    for i, points in landmarks.follow_person(frames(), FLAGS.detector, FLAGS.face, names, given):
        if isinstance(points, ValueError):
            continue
        numbers.append(i)
        angles.append(camera.head_pose_from_landmarks(mean_landmarks, points))
    if not numbers:
        raise InputError(f"--frames={FLAGS.frames}: no face in any of the {len(names)} candidate "
                         "frame(s) for --keyframes=spread")
    picks = camera.spread_views(np.array(angles), FLAGS.max_frames, times=numbers)
    chosen = [names[numbers[k]] for k in picks]
    shown = ", ".join(f"{os.path.basename(names[numbers[k]])} (yaw {angles[k][0]:+.0f}°, pitch "
                      f"{angles[k][1]:+.0f}°)" for k in picks)
    yaws = np.array(angles)[:, 0]
    files = f", {len(from_files)} from landmark files" if from_files else ""
    print(f"--keyframes=spread: {len(chosen)} of {len(numbers)} frames with the person{files} "
          f"(yaw {yaws.min():+.0f}° to {yaws.max():+.0f}°): {shown}", flush=True)
    return chosen


def spread_video_keyframes(path):
    """--keyframes=spread on a video: every --frame_step-th frame a candidate (looked at as
    decoded, not held), then the chosen ones decoded again: [(index, frame)]."""
    from ganfit_jax import inputs

    indices = []

    def candidates():
        for index, frame in inputs.iter_video_frames(path, FLAGS.frame_step):
            indices.append(index)
            yield frame

    try:
        names = _Names(path, indices)
        chosen = spread_keyframes(names, candidates())
        wanted = {common.video_frame_number(name) for name in chosen}
        video = []
        for index, frame in inputs.iter_video_frames(path):
            if index in wanted:
                video.append((index, frame))
            if len(video) == len(wanted):
                break
    except ValueError as e:
        raise InputError(f"--frames={e}") from None
    return video


class _Names:
    """A video's candidate frames' names, known as they are decoded (`spread_video_keyframes`)."""

    def __init__(self, path, indices):
        self.path, self.indices = path, indices

    def __getitem__(self, k):
        return common.video_frame_name(self.path, self.indices[k])

    def __len__(self):
        return len(self.indices)


def read_video(path):
    from ganfit_jax import inputs

    try:
        frames = inputs.read_video_frames(path, FLAGS.frame_step, FLAGS.max_frames)
    except ValueError as e:
        raise InputError(f"--frames={e}") from None
    print(f"{path}: {len(frames)} frame(s) (every {FLAGS.frame_step}), fitted jointly", flush=True)
    return frames


def check_outputs_free(folders, files=None):
    if FLAGS.overwrite:
        return
    files = result_files() if files is None else files
    for folder in folders:
        existing = [f for f in files if os.path.exists(os.path.join(folder, f))]
        if FLAGS.all_faces and "faces.json" in files:  # how many faces is known once detected
            existing += [os.path.join(os.path.basename(face), f)
                         for face in sorted(glob.glob(os.path.join(folder, "face_*")))
                         for f in result_files() if os.path.exists(os.path.join(face, f))][:3]
        if existing:
            raise InputError(f"{folder} already holds {', '.join(existing)}; pass --overwrite "
                             "to replace them or choose another --output_dir")


# ------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------


def fit_metrics(pipeline, params, landmarks_crop, transform, history):
    """How well the fit reproduces the photo: landmark error (pixels of the original photo and %
    of the inter-ocular distance, over the landmarks the model defines) and the identity cosine
    between render and photo at the start and end of stage 2 (1 − L_id); and where the fitted
    camera sits around the face (`camera.orbit_angles` in degrees, as sequence.npz has them per
    frame), so a data set's profiles can be sorted out of summary.csv."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import camera, fitting, landmarks

    pred = np.asarray(common.jitted(fitting.project_landmarks)(pipeline, params,
                                                                jnp.asarray(landmarks_crop)))
    pred, truth = transform.to_original(pred), transform.to_original(landmarks_crop)
    ok = np.all(np.isfinite(pred), 1) & np.all(np.isfinite(truth), 1)
    err = np.linalg.norm(pred[ok] - truth[ok], axis=1)
    iod = float(landmarks.interocular_distance(truth))
    out = dict(landmark_error_px=float(err.mean()), landmark_error_iod=float(err.mean() / iod),
               landmarks_compared=int(ok.sum()), interocular_px=iod)
    for name, angle in zip(POSE_COLUMNS, common.jitted(camera.orbit_angles)(params.camera)):
        out[name] = float(np.degrees(angle))
    stage2 = history.get(2, {})
    if "identity" in stage2 and len(stage2["identity"]):
        out["identity_cosine_start"] = float(1 - stage2["identity"][0])
        out["identity_cosine_end"] = float(1 - stage2["identity"][-1])
    for stage, h in history.items():
        out[f"stage{stage}_final"] = {k: float(v[-1]) for k, v in h.items()}
    return out


MAX_FACE_RESOLUTION = 2048
OUTSIDE_PHOTO_BRIGHTNESS = 0.35  # side_by_side.png, landmarks.png: the crop beyond the photo
PHOTO_TEXTURE_SIZE = 512  # --photo_texture's UV map, or mesh.png's size when that is larger


def face_resolution(transform):
    """The square --depth and --photo_texture render at: the crop's side in the photo's pixels
    (a multiple of 64, so that photos of similar face sizes share a compiled program), at least
    the working size and at most MAX_FACE_RESOLUTION."""
    import numpy as np

    side = transform.size / transform.scale
    return int(min(MAX_FACE_RESOLUTION, max(transform.size, 64 * np.ceil(side / 64))))


def camera_at_face_resolution(transform, camera):
    """(R, the fit's camera over the crop's square rendered at R × R): only the focal (in
    pixels) scales, the principal point stays at the square's centre."""
    import numpy as np

    resolution = face_resolution(transform)
    camera = np.asarray(camera, np.float32).copy()
    camera[6] *= resolution / transform.size
    return resolution, camera


def write_photo_texture(folder, model, verts, camera, item, size, over):
    """--photo_texture: photo_texture.png, the photo's colours in the model's UV layout (size ×
    size), seen from the fitted camera at the face's own resolution in the photo; alpha 255
    where the photo shows the texel (and its --face_mask the face), 128 filled from its mirror
    texel, 0 unseen."""
    import numpy as np
    from PIL import Image

    from ganfit_jax import inputs, io
    from ganfit_jax.texture import unwrap

    resolution, camera = camera_at_face_resolution(item.transform, camera)
    square = inputs.crop_square(item.image, item.transform, resolution)
    weight = None
    if item.pixel_weight is not None:  # the crop's weights over the same square, resampled
        weight = np.asarray(Image.fromarray(np.asarray(item.pixel_weight, np.float32)).resize(
            (resolution, resolution), Image.Resampling.BILINEAR))
    uv_map, seen = unwrap.unwrap(model, verts, camera, square, size, pixel_weight=weight)
    io.save_image(os.path.join(folder, "photo_texture.png"),
                  np.concatenate([uv_map, seen[..., None]], -1), overwrite=over)


def geometry_maps(verts, triangles, camera, image_size):
    """`render.geometry_maps` as one program per image size: (depth, normals, mask)."""
    import numpy as np

    from ganfit_jax import render

    return common.jitted(render.geometry_maps, ("image_size",))(verts, np.asarray(triangles),
                                                                 camera, image_size)


def photo_geometry(verts, triangles, camera, transform):
    """The fitted surface in the photo's pixels: depth (H,W) in mm along the camera's axis and
    unit normals (H,W,3) in OpenCV's camera frame, NaN off the face, rendered by
    render.geometry_maps at the face's own resolution (face_resolution)."""
    import numpy as np

    from ganfit_jax import inputs

    resolution, camera = camera_at_face_resolution(transform, camera)
    depth, normals, mask = geometry_maps(verts, triangles, camera, (resolution, resolution))
    # depth and normals mapped together: the photo's window and its bilinear weights once
    both = inputs.map_to_original(np.concatenate([np.asarray(depth)[..., None],
                                                  np.asarray(normals)], -1),
                                  np.asarray(mask), transform)
    depth, normals = both[..., 0], both[..., 1:]
    return depth, normals / np.linalg.norm(normals, axis=-1, keepdims=True)


def shape_overlay(photo, normals):
    """shape.png: the photo with the fitted shape, grey and untextured (render.shape_shading),
    over the face: where the geometry is right or wrong, which the texture hides."""
    import numpy as np

    from ganfit_jax import render

    grey = np.asarray(common.jitted(render.shape_shading)(normals))
    return np.where(np.isfinite(grey)[..., None], grey[..., None], photo).astype(np.float32)


def write_depth(folder, depth, normals, over):
    """--depth: depth.npy, depth.png and normals.png in the photo's pixels (see the flag)."""
    import numpy as np

    from ganfit_jax import io

    with open(io.refuse_overwrite(os.path.join(folder, "depth.npy"), over), "wb") as f:
        np.save(f, depth)
    face = np.isfinite(depth)
    shown = np.zeros(depth.shape, np.float32)
    if face.any():
        near, far = np.min(depth[face]), np.max(depth[face])
        shown[face] = 1.0 - 0.85 * (depth[face] - near) / max(far - near, 1e-6)
    io.save_image(os.path.join(folder, "depth.png"), np.repeat(shown[..., None], 3, -1),
                  overwrite=over)
    # the usual normal-map colours: OpenCV's (x right, y down, z forward) as (right, up, towards
    # the camera)
    colours = np.where(face[..., None], 0.5 + 0.5 * normals * np.array([1, -1, -1]), 0.0)
    io.save_image(os.path.join(folder, "normals.png"), colours.astype(np.float32),
                  overwrite=over)


def write_intrinsics(folder, pipeline, params, over):
    """intrinsics.png: the render taken apart as Phong composes it (fitting.intrinsic_images),
    albedo | shading | highlight. The fitted light often brightens past 1 what the texture
    darkens (their product is what the photo fixes), so the shading panel is divided by its
    99th percentile over the face, returned: render = albedo × shading × scale + highlight."""
    import numpy as np

    from ganfit_jax import fitting, io

    albedo, shading, specular, mask = (np.asarray(a) for a in
                                       common.jitted(fitting.intrinsic_images)(pipeline, params))
    face = mask > 0.5
    scale = float(np.percentile(shading[face], 99)) if face.any() else 1.0
    scale = max(scale, 1e-6)
    io.save_image(os.path.join(folder, "intrinsics.png"), np.clip(np.concatenate(
        [albedo, shading / scale, specular], axis=1), 0, 1), overwrite=over)
    return scale


def write_result(folder, pipeline, params, item, history, source):
    """Every output of one fit (`item`: the Prepared photo it was fitted to) into `folder`."""
    import numpy as np

    from ganfit_jax import camera, fitting, inputs, io, landmarks, morphable, render

    original, crop, transform, landmarks_crop = item.image, item.crop, item.transform, \
        item.landmarks
    write_run_flags()
    os.makedirs(folder, exist_ok=True)
    model = pipeline.model
    verts = np.asarray(common.jitted(morphable.vertices)(model, params.shape, params.expression))
    texture = np.clip(np.asarray(common.face_texture(pipeline, params.texture)), 0, 1)
    over = FLAGS.overwrite or FLAGS.resume  # --resume: what an interrupted write left
    io.write_obj(os.path.join(folder, "mesh.obj"), verts, np.asarray(model.triangles),
                 np.asarray(model.uv), texture, overwrite=over)
    if FLAGS.glb:
        io.write_glb(os.path.join(folder, "mesh.glb"), verts, np.asarray(model.triangles),
                     np.asarray(model.uv), texture, overwrite=over)
    lm2d_crop = np.asarray(common.jitted(fitting.project_landmarks)(pipeline, params, None))
    # the fitted camera as other tools (OpenCV, Open3D, pyrender) take one, in the photo's pixels
    intrinsics, rotation, translation = camera.opencv_matrices(params.camera, pipeline.image_size)
    io.save_params(os.path.join(folder, "params.npz"),
                   dict(shape=params.shape, expression=params.expression, texture=params.texture,
                        camera=params.camera, light=params.light, vertices=verts,
                        landmarks3d=np.asarray(common.jitted(morphable.landmarks3d)(model, verts)),
                        landmarks2d=transform.to_original(lm2d_crop),
                        crop_origin=np.asarray(transform.origin), crop_scale=transform.scale,
                        camera_matrix=transform.intrinsics_to_original(intrinsics),
                        rotation=rotation, translation=translation,
                        image_size=np.asarray(pipeline.image_size)),
                   overwrite=over, source=str(source))
    rendered, mask = common.render_with_alpha(pipeline, params)
    overlay = inputs.paste_back(original, rendered, mask, transform)
    io.save_image(os.path.join(folder, "overlay.png"), overlay, overwrite=over)
    if FLAGS.transforms:  # the frame a head avatar trains on, as the fit saw it (upright)
        io.save_image(os.path.join(folder, "input.png"), original, overwrite=over)
    if FLAGS.shape_image or FLAGS.depth:
        depth, normals = photo_geometry(verts, model.triangles, params.camera, transform)
    if FLAGS.shape_image:
        io.save_image(os.path.join(folder, "shape.png"), shape_overlay(original, normals),
                      overwrite=over)
    if FLAGS.depth:
        write_depth(folder, depth, normals, over)
    if FLAGS.photo_texture:
        size = max(PHOTO_TEXTURE_SIZE, *texture.shape[:2]) if texture.ndim == 3 \
            else PHOTO_TEXTURE_SIZE  # a per-vertex texture model has no map
        write_photo_texture(folder, model, verts, params.camera, item, size, over)
    # where the square runs past the photo's border, the crop's replicated edge pixels are
    # shown dimmed: streaks that look like the photo, but are not
    shown = crop * np.where(inputs.inside_photo(transform, crop.shape[0])[..., None], 1.0,
                            OUTSIDE_PHOTO_BRIGHTNESS)
    over_black = rendered * mask[..., None]  # as the renderer drew it (--antialias: its edge)
    crop_overlay = shown * (1 - mask[..., None]) + over_black
    io.save_image(os.path.join(folder, "side_by_side.png"),
                  np.concatenate([shown, over_black, crop_overlay], axis=1), overwrite=over)
    shading_scale = write_intrinsics(folder, pipeline, params, over)
    if landmarks_crop is not None:
        # the landmarks the fit followed (green), as `--landmarks` reads them back, and where
        # the fitted model puts its own (red)
        io.write_never_overwrite(os.path.join(folder, "landmarks.json"), landmarks.landmarks_json(
            transform.to_original(landmarks_crop)), over)
        io.save_image(os.path.join(folder, "landmarks.png"), io.draw_points(
            shown, [(landmarks_crop, (40, 220, 60)), (lm2d_crop, (230, 40, 40))]), overwrite=over)
    views, shapes = [], []
    for turned in turned_views(params, verts, pipeline.image_size):
        img, _ = common.render_face(pipeline, turned, background=np.ones(3, np.float32))
        views.append(np.clip(np.asarray(img), 0, 1))
        if FLAGS.shape_image:
            _, view_normals, _ = geometry_maps(verts, model.triangles, turned.camera,
                                               pipeline.image_size)
            grey = np.nan_to_num(np.asarray(common.jitted(render.shape_shading)(view_normals)),
                                 nan=1.0)
            shapes.append(np.repeat(grey[..., None], 3, -1))
    # textured views above, the same views of the shape alone below
    rows = [np.concatenate(views, 1)] + ([np.concatenate(shapes, 1)] if shapes else [])
    io.save_image(os.path.join(folder, "views.png"), np.concatenate(rows, 0), overwrite=over)
    curves, offset = {}, 0
    for stage, hist in sorted(history.items()):
        length = 0
        for name, values in hist.items():
            values = np.asarray(values, np.float64)
            # stage 2 continues where stage 1 ended on the x axis (NaN is not drawn)
            curves[f"{name} (stage {stage})"] = np.concatenate([np.full(offset, np.nan), values])
            length = len(values)
        offset += length
    io.save_loss_curves(os.path.join(folder, "loss.png"), curves, log_y=True,
                        title=f"GANFIT fit of {os.path.basename(str(source))}", overwrite=over)
    metrics = fit_metrics(pipeline, params, landmarks_crop, transform, history)
    metrics["shading_scale"] = shading_scale
    if item.pixel_weight is not None:
        # how much of the fitted face the pixel loss compared: near 0, a mask (or the skin
        # model) that threw the face away
        metrics["face_mask_coverage"] = float(np.sum(mask * np.asarray(item.pixel_weight))
                                              / max(float(np.sum(mask)), 1.0))
    io.write_never_overwrite(os.path.join(folder, "metrics.json"),
                             json.dumps(dict(metrics, source=str(source)), indent=1), over)
    return metrics


VIEW_YAWS = (-60.0, 0.0, 60.0)


def turned_views(params, vertices, image_size):
    """params seen from each of VIEW_YAWS: cameras turned about the middle of the fitted
    face's bounding box, with the fitted focal, at the fitted distance or as much farther as
    `camera.framing_cameras` needs to keep every view's face in the frame (the model's origin
    lies behind the face, the SFM's by ~35 mm, and turning about it swung the ±60° profiles
    out of the frame), each lit from above its camera."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import camera as camera_lib

    camera = np.asarray(params.camera, np.float64)
    distance = float(np.linalg.norm(camera[0:3] - camera[3:6]))
    views = []
    for cam in camera_lib.framing_cameras(vertices, float(camera[6]), image_size, VIEW_YAWS,
                                          min_distance=distance):
        light = np.asarray(params.light).copy()
        light[0:3] = cam[0:3] + np.array([0.0, 300.0, 0.0])
        views.append(params.replace(camera=jnp.asarray(cam, jnp.float32),
                                    light=jnp.asarray(light, jnp.float32)))
    return views


def summary_name(index, count):
    """--images' table of its fits; under --distributed, one per process (its own share)."""
    return "summary.csv" if count == 1 else f"summary_process{index}_of_{count}.csv"


def sheet_name(summary):
    """summary.png beside summary.csv (or summary_processI_of_N.png)."""
    return os.path.splitext(summary)[0] + ".png"


POSE_COLUMNS = ("camera_yaw_deg", "camera_pitch_deg", "camera_roll_deg")
SUMMARY_COLUMNS = ("photo", "folder", "landmark_error_px", "landmark_error_iod_percent",
                   "identity_cosine_start", "identity_cosine_end") + POSE_COLUMNS + (
                   "face_mask_coverage",)


def write_summary(share, name):
    """--images: one row per photo of `share` ((photo, folder) pairs) whose fit is finished
    (its metrics.json; from earlier runs too under --resume), in the folder's order, so the worst
    fits of thousands can be sorted in a spreadsheet instead of opening every folder; and
    summary.png, the worst of them to look at (`write_contact_sheet`)."""
    import csv
    import io as text_io
    import statistics

    from ganfit_jax import io

    rows = []
    for photo, folder in share:
        if not finished(folder):
            continue
        results = [folder]
        if FLAGS.all_faces:  # a row per face
            with open(os.path.join(folder, "faces.json"), encoding="utf-8") as f:
                results = [os.path.join(folder, face["folder"]) for face in json.load(f)["faces"]]
        for result in results:
            with open(os.path.join(result, "metrics.json"), encoding="utf-8") as f:
                m = json.load(f)
            rows.append(dict(photo=photo, folder=result,
                             landmark_error_px=m["landmark_error_px"],
                             landmark_error_iod_percent=100 * m["landmark_error_iod"],
                             identity_cosine_start=m.get("identity_cosine_start", ""),
                             identity_cosine_end=m.get("identity_cosine_end", ""),
                             **{k: m.get(k, "") for k in POSE_COLUMNS + ("face_mask_coverage",)}))
            # (older fits have no pose; fits without --face_mask no coverage)
    table = text_io.StringIO()
    writer = csv.DictWriter(table, SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(FLAGS.output_dir, name)
    io.write_never_overwrite(path, table.getvalue(), FLAGS.overwrite or FLAGS.resume)
    if rows:
        write_contact_sheet(rows, sheet_name(path))
    text = f"wrote {path}: {len(rows)} of {len(share)} photo(s) fitted"
    if FLAGS.all_faces:
        text = (f"wrote {path}: {len(rows)} face(s) of "
                f"{sum(finished(folder) for _, folder in share)} of {len(share)} photo(s)")
    if rows:
        errors = [r["landmark_error_iod_percent"] for r in rows]
        worst = max(rows, key=lambda r: r["landmark_error_iod_percent"])
        text += (f"; landmark error {statistics.mean(errors):.2f}% of inter-ocular on average "
                 f"(median {statistics.median(errors):.2f}%), the worst "
                 f"{os.path.basename(str(worst['photo']))} "
                 f"({worst['landmark_error_iod_percent']:.2f}%)")
    print(text, flush=True)


SHEET_TILES = 48  # summary.png: the worst fits of a data set, however large


def write_contact_sheet(rows, path):
    """summary.png beside summary.csv: the SHEET_TILES worst fits by landmark error, worst
    first, each its side_by_side.png (crop | render | overlay) under its name and error."""
    from ganfit_jax import io, landmarks

    worst = sorted(rows, key=lambda r: -r["landmark_error_iod_percent"])[:SHEET_TILES]
    labels = []
    for r in worst:
        name = os.path.splitext(os.path.basename(str(r["photo"])))[0]
        if FLAGS.all_faces:
            name += "/" + os.path.basename(r["folder"])
        labels.append(f"{name}: {r['landmark_error_iod_percent']:.2f}%")
    sheet = io.contact_sheet([landmarks.load_image(os.path.join(r["folder"], "side_by_side.png"))
                              for r in worst], labels, columns=4)
    io.save_image(path, sheet, overwrite=FLAGS.overwrite or FLAGS.resume)


def _summary(m):
    text = (f"landmark error {m['landmark_error_px']:.2f} px "
            f"({100 * m['landmark_error_iod']:.2f}% of inter-ocular)")
    if "identity_cosine_start" in m:
        text += (f", identity cosine {m['identity_cosine_start']:.3f} → "
                 f"{m['identity_cosine_end']:.3f} over stage 2")
    return text


def history_slice(history, i):
    return {stage: {k: v[:, i] for k, v in h.items()} for stage, h in history.items()}


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


RUN_FLAGS = "flags.txt"
_run_flags_written = []  # once per process


def write_run_flags():
    """OUTPUT_DIR/flags.txt: every flag of this binary as this run had it, defaults included
    (so a later change of a default does not change the rerun), in absl's flag-file form:
    `fit --flagfile=OUT/flags.txt --output_dir=OTHER` fits the same way again (later flags
    override the file's). Written with the first result (by process 0 of a --distributed run),
    so a run that fails on its input leaves nothing and an interrupted one has it."""
    import jax

    from ganfit_jax import io

    if _run_flags_written or jax.process_index() != 0:
        return
    own = sorted(FLAGS.get_key_flags_for_module(sys.argv[0]), key=lambda f: f.name)
    lines = [f"# python -m experiments.fit, {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    lines += [line for line in (f.serialize() for f in own) if line]  # None serialises to ''
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    io.write_never_overwrite(os.path.join(FLAGS.output_dir, RUN_FLAGS), "\n".join(lines) + "\n",
                             overwrite=True)  # refused up front unless --overwrite or --resume
    _run_flags_written.append(True)


def check_face_mask(mode):
    """--face_mask and --mask_labels, before anything loads."""
    from ganfit_jax import inputs

    if FLAGS.mask_labels and (not FLAGS.face_mask or FLAGS.face_mask == common.SKIN_MASK):
        raise InputError("--mask_labels goes with --face_mask=FILE_OR_DIR (the label maps it "
                         "reads)")
    if not FLAGS.face_mask or FLAGS.face_mask == common.SKIN_MASK:
        return
    mask_labels()
    if mode == "frames" and inputs.is_video(FLAGS.frames):
        raise InputError("--face_mask: a video's frames have no mask files; give "
                         "--face_mask=skin, or its frames as a folder (--frames=DIR) and their "
                         "masks as another")
    if not os.path.exists(FLAGS.face_mask):
        raise InputError(f"--face_mask={FLAGS.face_mask}: no such file or folder")
    if mode != "image" and not os.path.isdir(FLAGS.face_mask):
        raise InputError(f"--face_mask={FLAGS.face_mask}: with --{mode}, a folder of STEM.png "
                         "or STEM.npy masks named as the photos")


def check_flags():
    """Every check of the flags and the files they name that needs neither JAX nor a model, so
    that a mistake is one line in a fraction of a second (importing JAX takes 0.5–1.5 s) →
    the mode: 'image', 'images' or 'frames'."""
    from ganfit_jax import inputs

    modes = [m for m in ("image", "images", "frames") if getattr(FLAGS, m)]
    if len(modes) != 1:
        raise InputError("give exactly one of --image, --images, --frames")
    if FLAGS.resume and FLAGS.overwrite:
        raise InputError("give --resume (keep finished fits) or --overwrite (refit all), not both")
    if FLAGS.resume and modes[0] != "images" and not (modes[0] == "frames" and FLAGS.track):
        raise InputError("--resume goes with --images (a folder of photos, one fit each) or "
                         "with --frames --track (one person's frames, tracked)")
    if FLAGS.all_faces and modes[0] == "frames":
        raise InputError("--all_faces goes with --image or --images; --frames fits one person "
                         "(pick them with --face)")
    if FLAGS.all_faces and FLAGS.face:
        raise InputError("--face picks one face and --all_faces fits every face: give one")
    if FLAGS.keyframes == "spread" and (modes[0] != "frames" or FLAGS.max_frames < 1):
        raise InputError("--keyframes=spread picks --max_frames (e.g. 8) of the --frames "
                         "whose head poses lie farthest apart: give --frames and --max_frames")
    if FLAGS.track and modes[0] != "frames":
        raise InputError("--track goes with --frames (a video or a folder of one person's frames)")
    if FLAGS.transforms and modes[0] != "frames":
        raise InputError("--transforms goes with --frames (one person's frames, the cameras "
                         "around their fitted head)")
    if not FLAGS.track and (FLAGS.track_iterations is not None
                            or FLAGS.track_stage1_iterations is not None):
        raise InputError("--track_iterations and --track_stage1_iterations go with --track")
    if FLAGS.track and FLAGS.frame_step == 1 and not FLAGS.max_frames:
        # every frame a keyframe: one joint fit of a whole video (its memory) and nothing tracked
        raise InputError("--track: with --frame_step=1 and no --max_frames every frame is a "
                         "keyframe and none is left to track; pick keyframes with --frame_step "
                         "(e.g. 10) or --max_frames")
    check_process_flags(modes[0])
    if not FLAGS.output_dir:
        raise InputError("--output_dir is required")
    if FLAGS.landmarks and not FLAGS.image:
        raise InputError("--landmarks goes with --image (for folders, put a .pts/.npy beside "
                         "each photo)")
    check_face_mask(modes[0])
    if modes[0] == "image" and not os.path.exists(FLAGS.image):
        raise InputError(f"--image={FLAGS.image}: no such file")
    if FLAGS.landmarks and not os.path.exists(FLAGS.landmarks):
        raise InputError(f"--landmarks={FLAGS.landmarks}: no such file")
    if modes[0] == "frames" and inputs.is_video(FLAGS.frames) and (
            FLAGS.frame_step < 1 or FLAGS.max_frames < 0):
        raise InputError(f"--frame_step must be ≥ 1 and --max_frames ≥ 0, got "
                         f"{FLAGS.frame_step} and {FLAGS.max_frames}")
    return modes[0]


def run(mode):
    import jax
    import numpy as np

    from ganfit_jax import fitting, inputs, losses

    start_processes()
    video = None
    if mode == "image":
        paths = [FLAGS.image]
    elif mode == "frames" and inputs.is_video(FLAGS.frames):
        video = (spread_video_keyframes(FLAGS.frames) if FLAGS.keyframes == "spread"
                 else read_video(FLAGS.frames))
        paths = [common.video_frame_name(FLAGS.frames, index) for index, _ in video]
    else:
        paths = list_images(getattr(FLAGS, mode), mode)
    tracked = []  # --track, a folder of frames: ((path, path), output folder), non-keyframes
    frame_folders = stem_folders(paths) if mode == "frames" and video is None else []
    # each frame's number: a video's decoded index, a folder's position among its sorted frames
    number = ({name: i for i, name in enumerate(paths)} if video is None
              else {name: i for name, (i, _) in zip(paths, video)})
    named = dict(zip(paths, frame_folders))  # a folder's frames: their folders, named from all
    if mode == "frames" and video is None and (FLAGS.track or FLAGS.keyframes == "spread"):
        # keyframes picked as from a video
        candidates = paths[::FLAGS.frame_step]
        keys = (spread_keyframes(candidates, (load_frame(p) for p in candidates))
                if FLAGS.keyframes == "spread" else candidates[:FLAGS.max_frames or None])
        key_set = set(keys)  # a folder may hold thousands of frames
        if FLAGS.track:
            tracked = [((p, p), named[p]) for p in paths if p not in key_set]
        paths = keys
    if mode == "image":
        folders = [FLAGS.output_dir]
    elif video is not None:
        folders = [os.path.join(FLAGS.output_dir, f"frame_{index:06d}") for index, _ in video]
    elif mode == "frames":
        folders = [named[p] for p in paths]
    else:
        folders = stem_folders(paths)
    batched = mode == "images" or FLAGS.all_faces  # fit_folder: photos (faces) in batches
    if batched:
        # this process's share, named from the whole folder so that every process agrees
        index, count = jax.process_index(), jax.process_count()
        paths, folders = paths[index::count], folders[index::count]
        share = list(zip(paths, folders))
        if count > 1:
            print(f"process {index} of {count}: {len(paths)} photo(s)", flush=True)
        if not FLAGS.resume:
            name = summary_name(index, count)
            check_outputs_free([FLAGS.output_dir], (name, sheet_name(name)))
        if FLAGS.resume:  # after the split: each host looks at its own photos' folders
            done = [finished(f) for f in folders]
            print(f"--resume: {sum(done)} of {len(paths)} photo(s) already fitted, "
                  f"{len(paths) - sum(done)} to go", flush=True)
            paths = [p for p, d in zip(paths, done) if not d]
            folders = [f for f, d in zip(folders, done) if not d]
        if not paths:
            write_summary(share, summary_name(index, count))
            return
    if not FLAGS.resume:
        check_outputs_free(folders, faces_files() if FLAGS.all_faces else result_files())
    faces = {}  # --image --all_faces: found before anything loads, so no face is one line
    if mode == "image" and FLAGS.all_faces:
        faces[FLAGS.image] = prepare_all(FLAGS.image, FLAGS.landmarks, FLAGS.image_size,
                                         FLAGS.detector)
        print(f"{FLAGS.image}: {len(faces[FLAGS.image])} face(s)", flush=True)
    if mode == "frames" and not FLAGS.resume:
        check_outputs_free([FLAGS.output_dir], sequence_files())
    if FLAGS.track and not FLAGS.resume:
        # a video's frame count is known only once decoded: every frame folder already there
        existing = glob.glob(os.path.join(FLAGS.output_dir, "frame_*")) if video is not None \
            else [folder for _, folder in tracked]
        check_outputs_free(existing)

    if jax.process_index() == 0 and not FLAGS.resume:  # process 0 alone writes it
        check_outputs_free([FLAGS.output_dir], (RUN_FLAGS,))

    model = load_model(FLAGS.model or default_model_path())
    if FLAGS.photo_texture and not np.any(np.asarray(model.uv)):
        raise InputError(f"--photo_texture: the model {FLAGS.model or default_model_path()} "
                         "has no UV coordinates to unwrap the photo into")
    key = jax.random.PRNGKey(FLAGS.seed)
    k_tex, k_id, k_fit = jax.random.split(key, 3)
    texture_model = load_texture(FLAGS.texture, k_tex)
    net = load_identity_net(FLAGS.identity, FLAGS.identity_weights, k_id)
    size = (FLAGS.image_size, FLAGS.image_size)
    pipeline = fitting.with_compute_dtype(fitting.make_pipeline(model, texture_model, net, size),
                                          FLAGS.compute_dtype).replace(antialias=FLAGS.antialias)
    weights = losses.LossWeights(
        identity=FLAGS.lambda_id, identity_random=FLAGS.lambda_id_random,
        content=FLAGS.lambda_content, pixel=FLAGS.lambda_pixel, landmark=FLAGS.lambda_landmark,
        shape_reg=FLAGS.lambda_shape, expression_reg=FLAGS.lambda_expression,
        light_reg=FLAGS.lambda_light)
    config = fitting.FitConfig(stage1_iterations=FLAGS.stage1_iterations,
                               stage1_learning_rate=FLAGS.stage1_learning_rate,
                               stage2_iterations=FLAGS.iterations, chunk=FLAGS.chunk,
                               weights=weights, remat=FLAGS.remat,
                               two_threads=FLAGS.two_threads, batch_steps=FLAGS.batch_steps)

    texture_init = np.asarray(texture_model.init_latent(k_tex))

    def start(item):
        return (fitting.init_params(model, item.landmarks, size, texture_model.latent_dim,
                                    texture_init=texture_init),
                fitting.target_from_image(pipeline, item.crop, item.landmarks,
                                          item.pixel_weight))

    def photo_texture(items):
        """Stage 2 starts from the photo's own colours (where its face mask shows the face),
        unwrapped onto the stage-1 mesh."""
        def hook(params):
            if params.shape.ndim == 1:
                return fitting.texture_from_photo(pipeline, params, items[0].crop,
                                                  pixel_weight=items[0].pixel_weight)
            n = params.shape.shape[0]
            return fitting.stack([
                fitting.texture_from_photo(pipeline, p, i.crop, pixel_weight=i.pixel_weight)
                for p, i in zip(fitting.unstack(params, n), items)])
        return hook

    if batched:
        fit_folder(paths, folders, pipeline, config, start, photo_texture, k_fit, faces)
        write_summary(share, summary_name(jax.process_index(), jax.process_count()))
        return
    index, count = jax.process_index(), jax.process_count()  # --track --distributed

    def keyframes():
        kept, person = prepare_together(mode, video, paths, folders)
        joint = None  # --track --resume: the finished keyframes' shape and texture
        if FLAGS.track and FLAGS.resume:
            joint = finished_keyframes([folder for _, folder, _ in kept], model.num_shape,
                                       texture_init.shape)
        if joint is None:
            joint = fit_together(mode, kept, pipeline, config, start, photo_texture, k_fit)
        # where the person is in each keyframe, and who: tracked frames pick the face nearest
        # it among those that are the person
        return joint._replace(faces=np.array(
            [(number[path], *face_centre(item)) for path, _, item in kept], np.float64),
            person=_or_empty(person))

    # process 0 fits the keyframes (Eq. 13: together) and hands their shape and texture on
    if count == 1:
        joint = keyframes()
    else:
        try:
            shared = processes.from_process_zero(lambda: keyframes()._asdict(), index,
                                                 "keyframes' shape and texture")
        except processes.ProcessFailed as e:
            raise InputError(str(e)) from None
        joint = SharedBlocks(shared["shape"], shared["texture"], bool(shared["finished"]),
                             str(shared["source"]), shared["faces"], shared["person"])
    if FLAGS.track:
        if video is None:
            jobs, total = tracked, len(tracked)
        else:  # decoded as they go; the container's frame count (if it gives one) for the ETA
            jobs = other_video_frames(FLAGS.frames, FLAGS.output_dir, {i for i, _ in video})
            in_video = inputs.video_frame_count(FLAGS.frames)
            total = None if in_video is None else max(in_video - len(video), 0)
        if count > 1:  # tracked frames k, k + n, ... of the others on process k
            jobs = (job for k, job in enumerate(jobs) if k % count == index)
            total = None if total is None else len(range(index, total, count))
            print(f"process {index} of {count}: tracking the other frames numbered {index}, "
                  f"{index + count}, {index + 2 * count}, ... among them", flush=True)
        if FLAGS.resume and joint.finished:  # the keyframes were not fitted again
            # a video's frame count is known only once decoded: every frame folder there
            keyframe_folders = set(folders)
            candidates = [f for _, f in tracked] if video is None else [
                f for f in glob.glob(os.path.join(FLAGS.output_dir, "frame_*"))
                if f not in keyframe_folders]
            done_tracked = finished_tracked_frames(candidates, joint)
            jobs = [job for job in jobs if job[1] not in done_tracked] if video is None else (
                job for job in jobs if job[1] not in done_tracked)
            # a video's finished frames are spread over the processes' shares: no ETA there
            total = len(jobs) if video is None else (
                None if total is None or count > 1 else max(total - len(done_tracked), 0))
        with processes.reporting_done(index, count):
            track(joint, jobs, total, pipeline, config, start, k_fit,
                  lambda what: number[what[0]] if video is None
                  else common.video_frame_number(what[0]))
    if count > 1:
        processes.wait_for_others(index, count)  # their frames belong in the sequence
    if mode == "frames" and index == 0:
        write_sequence(FLAGS.output_dir, sequence_folders(video, frame_folders), model)


def sequence_folders(video, frame_folders):
    """(frame number, output folder) of every frame in order: a video's decoded index, a
    folder's position among its sorted images (`frame_folders`, in that order)."""
    if video is None:
        return list(enumerate(frame_folders))
    found = glob.glob(os.path.join(FLAGS.output_dir, "frame_*"))
    return sorted((int(os.path.basename(f)[len("frame_"):]), f) for f in found
                  if os.path.basename(f)[len("frame_"):].isdigit())


def write_sequence(output_dir, numbered_folders, model):
    """sequence.npz and sequence.png: the fitted frames' per-frame parameters as time series (a
    tracked video's expression and head pose), from their params.npz in frame order;
    identity.obj (+ .mtl, .png): the person the frames share, their shape at a neutral
    expression with their texture; and overlay.mp4 and shape.mp4 (`write_overlay_video`)."""
    import numpy as np

    from ganfit_jax import camera, io, landmarks, morphable

    frames, rows = [], []
    for number, folder in numbered_folders:
        if finished(folder):
            frames.append(number)
            rows.append(io.load_params(os.path.join(folder, "params.npz")))
    if not rows:
        return
    cameras = np.stack([r["camera"] for r in rows])
    yaw, pitch, roll = (np.degrees(np.asarray(a)) for a in camera.orbit_angles(cameras))
    stacked = {k: np.stack([r[k] for r in rows])
               for k in ("expression", "camera", "light", "landmarks2d", "camera_matrix",
                         "rotation", "translation")
               if all(k in r for r in rows)}  # a resumed run's older frames may lack the last
    over = FLAGS.overwrite or FLAGS.resume
    io.save_params(os.path.join(output_dir, "sequence.npz"),
                   dict(stacked, frame=np.asarray(frames), camera_yaw_deg=yaw,
                        camera_pitch_deg=pitch, camera_roll_deg=roll,
                        source=np.asarray([str(r["__meta__"]["source"]) for r in rows]),
                        shape=rows[0]["shape"], texture=rows[0]["texture"],
                        # the working size the cameras' focal lengths are in (render --sequence)
                        **({"image_size": rows[0]["image_size"]} if "image_size" in rows[0]
                           else {})),
                   overwrite=over)
    expression = stacked["expression"]
    pose = io.render_curves({"camera yaw": yaw, "camera pitch": pitch, "camera roll": roll},
                            steps=frames, title="camera around the face (degrees)",
                            x_label="frame")
    # the six coefficients that move most (ICT's 53 start with the brows, which rarely do)
    shown = sorted(np.argsort(-np.std(expression, axis=0), kind="stable")[:6])
    unit = ("blendshape weights" if model.expression_range is not None
            else "standard deviations")
    faces = io.render_curves({f"expression {i}": expression[:, i] for i in shown},
                             steps=frames, x_label="frame",
                             title=f"expression ({len(shown)} that move most, {unit})")
    io.save_image(os.path.join(output_dir, "sequence.png"), np.concatenate([pose, faces], 0),
                  overwrite=over)
    # the person the frames share (Eq. 13): their shape at a neutral expression, their texture
    first = next(f for n, f in numbered_folders if n == frames[0])
    neutral = morphable.vertices(model, rows[0]["shape"], np.zeros(model.num_expression))
    identity_mesh = (np.asarray(neutral), np.asarray(model.triangles), np.asarray(model.uv),
                     landmarks.load_image(os.path.join(first, "mesh.png")))
    io.write_obj(os.path.join(output_dir, "identity.obj"), *identity_mesh, overwrite=over)
    if FLAGS.glb:
        io.write_glb(os.path.join(output_dir, "identity.glb"), *identity_mesh, overwrite=over)
    if FLAGS.transforms:
        write_transforms(output_dir, [(n, f) for n, f in numbered_folders if n in set(frames)],
                         rows, over)
    if FLAGS.overlay_video:
        fitted = [(n, f) for n, f in numbered_folders if n in set(frames)]
        write_overlay_video(output_dir, fitted)
        if FLAGS.shape_image:
            write_overlay_video(output_dir, fitted, "shape")
    print(f"wrote {output_dir}/: " + " ".join(sequence_files()) + f" ({len(frames)} frames)",
          flush=True)


def transforms_frame(params, image_path, output_dir, number):
    """One frame of transforms.json from its params.npz: the OpenGL camera-to-world matrix in
    metres (nerfstudio's convention) and OpenCV's intrinsics in the frame's pixels."""
    import numpy as np
    from PIL import Image

    rotation, translation = np.asarray(params["rotation"]), np.asarray(params["translation"])
    to_world = np.eye(4)
    to_world[:3, :3] = rotation.T
    to_world[:3, 3] = -rotation.T @ translation / 1000.0  # mm → m
    to_world = to_world @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV's axes → OpenGL's
    intrinsics = np.asarray(params["camera_matrix"])
    with Image.open(image_path) as image:
        width, height = image.size
    return dict(file_path=os.path.relpath(image_path, output_dir), frame=int(number),
                transform_matrix=to_world.tolist(), fl_x=float(intrinsics[0, 0]),
                fl_y=float(intrinsics[1, 1]), cx=float(intrinsics[0, 2]),
                cy=float(intrinsics[1, 2]), w=int(width), h=int(height),
                expression=np.asarray(params["expression"], np.float64).tolist())


def write_transforms(output_dir, numbered_folders, rows, over):
    """--transforms: transforms.json, nerfstudio's camera file (per-frame intrinsics), one frame
    per fitted frame (`transforms_frame`) with its input.png; the shared shape once."""
    from ganfit_jax import io

    frames = [transforms_frame(params, os.path.join(folder, "input.png"), output_dir, number)
              for (number, folder), params in zip(numbered_folders, rows)
              if os.path.exists(os.path.join(folder, "input.png"))]
    document = dict(camera_model="OPENCV", unit="metre", coordinates="the morphable model's "
                    "(the fitted head at rest; each frame's head pose is in its camera)",
                    shape=[float(v) for v in rows[0]["shape"]], frames=frames)
    io.write_never_overwrite(os.path.join(output_dir, "transforms.json"),
                             json.dumps(document, indent=1), over)


def write_overlay_video(output_dir, numbered_folders, name="overlay"):
    """NAME.mp4 (overlay.mp4, shape.mp4): the fitted frames' NAME.png in frame order, one video
    frame per step of the fitted frames' numbers (their greatest common step: every frame when
    tracked, every --frame_step-th of keyframes alone), a frame missing in between (no face,
    or a resumed run's older frame without the file) showing the one before, at the source's
    rate over that step."""
    import math

    import numpy as np

    from ganfit_jax import inputs, io, landmarks

    numbers = [n for n, _ in numbered_folders]
    step = math.gcd(*np.diff(numbers).tolist()) if len(numbers) > 1 else 1
    rate = inputs.video_frame_rate(FLAGS.frames) if inputs.is_video(FLAGS.frames) else None
    rate = (rate or FLAGS.fps) / step
    by_number = dict(numbered_folders)

    def frames():
        shown, size = None, None
        for n in range(numbers[0], numbers[-1] + 1, step):
            image = os.path.join(by_number.get(n, ""), f"{name}.png")
            if n in by_number and os.path.exists(image):
                shown = landmarks.load_image(image)
                size = size or shown.shape[1::-1]
                if shown.shape[1::-1] != size:  # a folder's frames in several sizes
                    from PIL import Image

                    shown = np.asarray(Image.fromarray(io.to_uint8(shown)).resize(size))
            if shown is not None:
                yield shown

    path = os.path.join(output_dir, f"{name}.mp4")
    count = io.write_video(path, frames(), rate, overwrite=FLAGS.overwrite or FLAGS.resume)
    print(f"wrote {path}: {count} frames at {rate:.3g} fps", flush=True)


def prepare_together(mode, video, paths, folders):
    """--image, or the frames fitted jointly (--frames, a --track run's keyframes): ([(path,
    output folder, what `prepare` returns)], the person's face descriptor or None), every input
    read before anything is written. A frame without a face is reported and left out (a
    keyframe where the head turned away should not end a video's run); --image's photo without
    one is an error, as is a clip with none.
    The first frame's largest face (or --face-th) is the person; in each later frame, the face
    nearest where they were in the frame before, among the faces that are that person by dlib's
    face descriptor where any is (neither a larger face walking in nor a stranger standing where
    they were after a cut is taken for them)."""
    lm_path = FLAGS.landmarks if mode == "image" else None
    frames = [frame for _, frame in video] if video is not None else [None] * len(paths)
    kept, first_error = [], None
    like = None  # who the person is, once a frame has shown them
    for path, folder, frame in zip(paths, folders, frames):
        near = face_centre(kept[-1][2]) if kept else None
        try:
            item = (prepare(path, lm_path, FLAGS.image_size, FLAGS.detector, near, FLAGS.face,
                            like)
                    if frame is None
                    else prepare_frame(frame, path, FLAGS.image_size, FLAGS.detector, near,
                                       FLAGS.face, like))
        except InputError as e:
            if mode == "image":
                raise
            print(f"skipped {path}: {e}", flush=True)
            first_error = first_error or e
            continue
        kept.append((path, folder, item))
        if mode == "frames" and len(kept) == 1:
            like = person_descriptor(item)
    if not kept:
        raise InputError(f"--frames={FLAGS.frames}: none of the {len(paths)} frame(s) to fit "
                         f"together could be fitted; the first: {first_error}")
    return kept, like


def person_descriptor(item):
    """Who the face of a `prepare`d photo is: its dlib face descriptor, or None where dlib is
    not installed (landmarks from files) or cannot describe it: the person is then followed by
    place alone, as before descriptors were used."""
    from ganfit_jax import landmarks

    image, lm_crop, transform = item.image, item.landmarks, item.transform
    try:
        return landmarks.face_descriptor(image, transform.to_original(lm_crop))
    except (ImportError, RuntimeError):
        return None


def _or_empty(descriptor):
    """None as an empty array: what goes from process to process is arrays."""
    import numpy as np

    return np.zeros(0) if descriptor is None else descriptor


def face_centre(item):
    """Where the face of a `prepare`d photo is in it: the mean of its landmarks, (x, y)."""
    return tuple(item.transform.to_original(item.landmarks).mean(0))


def fit_together(mode, kept, pipeline, config, start, photo_texture, key):
    """--image, or --frames jointly (Eq. 13), on `prepare_together`'s inputs. Returns the
    (first) fit's shape and texture, what --track holds."""
    from ganfit_jax import fitting

    t0 = time.time()
    paths, folders, prepared = ([k[i] for k in kept] for i in range(3))
    if mode == "image":
        params, target = start(prepared[0])
        params, history = fitting.fit(pipeline, params, target, config, key,
                                      between_stages=photo_texture(prepared[:1]))
        results = [(params, history)]
    else:
        # frames share one texture, which starts from the prior's own start, not one frame
        starts = [start(item) for item in prepared]
        params, history = fitting.fit(pipeline, fitting.stack([s[0] for s in starts]),
                                      fitting.stack([s[1] for s in starts]), config, key,
                                      frames=True)
        results = [(p, history_slice(history, i))
                   for i, p in enumerate(fitting.unstack(params, len(paths)))]
    print(f"fitted {len(paths)} {'frame' if mode == 'frames' else 'photo'}(s) in "
          f"{time.time() - t0:.1f}s", flush=True)
    for (params, history), item, folder, path in zip(results, prepared, folders, paths):
        metrics = write_result(folder, pipeline, params, item, history, path)
        print(f"wrote {folder}/: " + " ".join(result_files()), flush=True)
        print(_summary(metrics), flush=True)
    if mode == "frames":
        print("shared shape and texture: identical in every frame's params.npz")
    return SharedBlocks(results[0][0].shape, results[0][0].texture, finished=False)


class SharedBlocks(typing.NamedTuple):
    """What --track holds for every frame: Eq. 13's shared shape and texture; `finished` when
    read from an interrupted run's keyframes rather than fitted by this one."""

    shape: object
    texture: object
    finished: bool
    source: str = ""
    faces: object = None  # (keyframes, 3): frame number, x, y of the person's face in each
    person: object = None  # the first keyframe's face descriptor (landmarks.face_descriptor)


def read_shared_blocks(folder):
    """The shape and texture in `folder`/params.npz (a finished fit's)."""
    from ganfit_jax import io

    path = os.path.join(folder, "params.npz")
    try:
        tree = io.load_params(path)
    except (ValueError, OSError) as e:
        raise InputError(f"--resume: {e}") from None
    if "shape" not in tree or "texture" not in tree:
        raise InputError(f"--resume: {path} holds no shape or texture (not fit's params.npz)")
    return SharedBlocks(tree["shape"], tree["texture"], finished=True, source=path)


def same_blocks(a, b):
    import numpy as np

    return np.array_equal(a.shape, b.shape) and np.array_equal(a.texture, b.texture)


def finished(folder):
    """A fit in `folder` is finished once its metrics.json, written last, is there (with
    --all_faces, a photo's once its faces.json is)."""
    return os.path.exists(os.path.join(folder, "faces.json" if FLAGS.all_faces else
                                       "metrics.json"))


def finished_keyframes(folders, num_shape, texture_shape):
    """--track --resume: the keyframes' joint shape and texture when every keyframe's fit is
    finished (its metrics.json, written last), else None: Eq. 13 fits them all together, so
    one unfinished keyframe means fitting them again, and tracking every other frame again."""
    done = [finished(f) for f in folders]
    if not all(done):
        print(f"--resume: {sum(done)} of {len(folders)} keyframe(s) finished: the keyframes are "
              f"fitted again, every other frame tracked again", flush=True)
        return None
    joint = read_shared_blocks(folders[0])
    for folder in folders[1:]:
        if not same_blocks(read_shared_blocks(folder), joint):
            raise InputError(
                f"--resume: {folder}/params.npz and {joint.source} hold different shapes or "
                f"textures, so they are not the keyframes of one joint fit (another run's, or "
                f"another --frame_step or --max_frames); pass --overwrite or choose another "
                f"--output_dir")
    if joint.shape.shape != (num_shape,) or joint.texture.shape != tuple(texture_shape):
        raise InputError(
            f"--resume: {joint.source} has shape {joint.shape.shape} and texture "
            f"{joint.texture.shape}, but this --model and --texture take ({num_shape},) and "
            f"{tuple(texture_shape)}: give the interrupted run's flags, or --overwrite")
    print(f"--resume: the {len(folders)} keyframes are finished; their shape and texture come "
          f"from {joint.source}", flush=True)
    return joint


def finished_tracked_frames(folders, joint):
    """--track --resume: which of the frames' `folders` hold a finished fit; each must hold the
    keyframes' shape and texture, else it is another run's and mixing them is refused (checked
    before anything is fitted)."""
    done = {f for f in folders if finished(f)}
    for folder in sorted(done):
        if not same_blocks(read_shared_blocks(folder), joint):
            raise InputError(
                f"--resume: {folder}/params.npz was fitted with another shape and texture than "
                f"the keyframes' ({joint.source}): another run's; pass --overwrite or choose "
                f"another --output_dir")
    print(f"--resume: {len(done)} tracked frame(s) already finished", flush=True)
    return done


def other_video_frames(path, output_dir, keyframes):
    """`common.video_frame_jobs`, a frame FFmpeg cannot decode part-way through reported as
    bad input."""
    try:
        yield from common.video_frame_jobs(path, output_dir, keyframes)
    except ValueError as e:
        raise InputError(f"--frames={e}") from None


def stem_folders(paths):
    return common.photo_folders(paths, FLAGS.output_dir)


def track(joint, jobs, total, pipeline, config, start, key, frame_number):
    """--track: every frame that was not a keyframe, fitted with the joint shape and texture
    held (`FitConfig.frozen`), in batches as they are decoded and landmarked; `total` (None if
    not known) of them, for the ETA. In each, the face nearest where the person was in the
    keyframe nearest in time (`frame_number` of a job's (name, frame)), among the faces that
    are the person where any is (`joint.person`)."""
    import dataclasses

    import jax.numpy as jnp

    config = dataclasses.replace(config, frozen=("shape", "texture"))
    if FLAGS.track_iterations is not None:
        config = dataclasses.replace(config, stage2_iterations=FLAGS.track_iterations)
    if FLAGS.track_stage1_iterations is not None:
        config = dataclasses.replace(config, stage1_iterations=FLAGS.track_stage1_iterations)

    def start_from_joint(item):
        params, target = start(item)
        # exactly the joint blocks, whether fitted now or read back (--resume) from float32
        return params.replace(shape=jnp.asarray(joint.shape, params.shape.dtype),
                              texture=jnp.asarray(joint.texture, params.texture.dtype)), target

    def load(job):
        name, frame = job
        near = common.nearest_keyframe_face(joint.faces, frame_number(job))
        like = joint.person if joint.person is not None and len(joint.person) else None
        if isinstance(frame, str):  # a frame's image file (landmarks beside it or detected)
            return prepare(frame, None, FLAGS.image_size, FLAGS.detector, near, like=like)
        return prepare_frame(frame, name, FLAGS.image_size, FLAGS.detector, near, like=like)

    print("tracking the other frames with the joint shape and texture held", flush=True)
    done, skipped = fit_in_batches(jobs, load, total, pipeline, config, start_from_joint, None,
                                   key, "frame")
    if skipped and not done:
        raise InputError(f"--track: none of the {skipped} other frames could be fitted")


def given_process_flags():
    """jax.distributed.initialize's arguments among the flags, those given."""
    named = {"coordinator_address": FLAGS.coordinator_address,
             "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
    return {k: v for k, v in named.items() if v is not None}


def check_process_flags(mode):
    """--distributed and the flags that go with it, before JAX is imported."""
    given = given_process_flags()
    if not FLAGS.distributed:
        if given:
            raise InputError(f"--{next(iter(given))} goes with --distributed")
        return
    if mode != "images" and not (mode == "frames" and FLAGS.track):
        raise InputError("--distributed splits an --images folder, or the frames --track fits, "
                         "between processes; --image and --frames without --track fit on one "
                         "process")
    if FLAGS.num_processes is not None and FLAGS.process_id is not None \
            and FLAGS.process_id >= FLAGS.num_processes:
        raise InputError(f"--process_id={FLAGS.process_id} must be below "
                         f"--num_processes={FLAGS.num_processes}")


def start_processes():
    """--distributed: joins the other processes (`jax.distributed.initialize`); its flags were
    checked by `check_process_flags`."""
    import jax

    if not FLAGS.distributed:
        return
    try:
        # a process whose share is done waits at exit for the others (JAX's shutdown barrier),
        # not 5 minutes (JAX's default) and then an error: shares take hours and finish apart
        jax.distributed.initialize(**given_process_flags(),
                                   shutdown_timeout_seconds=SHUTDOWN_WAIT_S)
    except (ValueError, RuntimeError) as e:
        raise InputError(f"--distributed: jax.distributed.initialize failed ({e}); give "
                         f"--coordinator_address, --num_processes and --process_id outside a "
                         f"cluster JAX detects") from e


def fit_folder(paths, folders, pipeline, config, start, photo_texture, key, faces=None):
    """--images: every photo its own fit, in batches (`fit_in_batches`); with --all_faces every
    face of every photo (`faces`: those already found, by path)."""
    if FLAGS.all_faces:
        load = lambda path: (faces or {}).pop(path, None) or prepare_all(
            path, None, FLAGS.image_size, FLAGS.detector)
    else:
        load = lambda path: prepare(path, None, FLAGS.image_size, FLAGS.detector, face=FLAGS.face)
    done, _ = fit_in_batches(list(zip(paths, folders)), load, len(paths), pipeline, config,
                             start, photo_texture, key, "photo")
    if done == 0:
        raise InputError(f"--images: none of the {len(paths)} photos could be fitted")


def loader_threads():
    """--loader_threads, or its default. One loader thread prepares ~3.6 photos a second of
    the shared faces (0.6 MP on average) but ~0.55 of 12 MP phone photos (BENCHMARKS "The batch
    loader"), while an H200 fits ~2 a second: on an accelerator every CPU this process may use
    (its affinity: a cluster's CPU share); on the CPU two, beside XLA's own threads."""
    import jax

    if FLAGS.loader_threads:
        return FLAGS.loader_threads
    if jax.default_backend() == "cpu":
        return 2
    try:
        return max(2, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(2, os.cpu_count() or 2)


def fit_in_batches(jobs, load, total, pipeline, config, start, photo_texture, key, noun):
    """Jobs (what `load` reads, output folder) loaded (decoded, landmarked, cropped) in
    background threads while the device fits the previous batch; batches of --batch_size under
    vmap (sharded over devices); one that cannot be read or has no face is reported and
    skipped. `load` may return a list of faces of one photo (--all_faces): each is a fit in
    its own folder, a batch may hold several photos' faces, and a photo's overlay and
    faces.json are written once its last face is. `jobs` may be a generator (a video's frames,
    decoded as they go); `total` (None when not known) gives the ETA. Returns how many jobs
    were fitted and how many skipped."""
    import collections

    import jax

    from ganfit_jax import fitting, inputs

    batch_size = FLAGS.batch_size
    devices = jax.local_device_count()  # this process's share of the photos runs on its own
    if batch_size % devices:
        batch_size += devices - batch_size % devices  # every device gets the same share
        print(f"batch size rounded up to {batch_size} for {devices} devices")
    workers = loader_threads()
    stream = iter(inputs.prefetch_map(lambda job: load(job[0]), jobs, workers=workers,
                                      ahead=max(2 * batch_size, 2 * workers)))
    source = lambda what: what if isinstance(what, str) else what[0]  # a path or a frame's name
    # fits waiting for a batch: (label, folder, item, the photo's folder if one of its faces)
    pending = collections.deque()
    photos = {}  # --all_faces: a photo's folder → [its source, its face count, finished faces]
    t0, done, skipped, batch_index, fits, per_face = time.time(), 0, 0, 0, 0, False
    while True:
        while len(pending) < batch_size:
            job = next(stream, None)
            if job is None:
                break
            (what, folder), item = job
            if isinstance(item, MissingDependency):  # every photo would fail the same way
                raise item
            if isinstance(item, Exception):
                skipped += 1
                print(f"skipped {source(what)}: {item}", flush=True)
            elif isinstance(item, list):
                per_face = True
                photos[folder] = [source(what), len(item), []]
                pending.extend((f"{source(what)} (face {k})", face_folder(folder, k), face,
                                folder) for k, face in enumerate(item))
            else:
                pending.append((source(what), folder, item, None))
        batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
        if not batch:
            break
        real = len(batch)
        # pad a short last batch by repeating its last photo: one compiled shape for all; not
        # when stage 2 steps photo after photo, where a padded photo costs a whole fit and a
        # new batch shape only recompiles stage 1's small step
        pad = 0 if fitting.per_photo_batch_applies(config, 2, "batch") else batch_size - real
        padded = batch + [batch[-1]] * pad
        starts = [start(item) for _, _, item, _ in padded]
        batch_index += 1
        print(f"batch {batch_index}: {real} {'face' if per_face else noun}(s), {fits} done so far",
              flush=True)
        hook = None if photo_texture is None else photo_texture([i for _, _, i, _ in padded])
        params, history = fitting.fit(pipeline, fitting.stack([s[0] for s in starts]),
                                      fitting.stack([s[1] for s in starts]), config,
                                      jax.random.fold_in(key, batch_index), batched=True,
                                      between_stages=hook)
        for i, p in enumerate(fitting.unstack(params, real)):
            what, folder, item, photo = batch[i]
            metrics = write_result(folder, pipeline, p, item, history_slice(history, i), what)
            print(f"{os.path.basename(what)}: {_summary(metrics)}", flush=True)
            fits += 1
            if photo is None:
                done += 1
                continue
            photos[photo][2].append((folder, p, item, metrics))
            if len(photos[photo][2]) == photos[photo][1]:
                write_faces(photo, pipeline, *photos.pop(photo))
                done += 1
        elapsed = time.time() - t0
        # a video's total is its header's frame count, which may be off by a few
        left = "" if total is None or not done else \
            f", eta {elapsed / done * max(total - done - skipped, 0):.0f}s"
        faces = f" {noun}s ({fits} faces)" if per_face else ""
        print(f"wrote {done}{'' if total is None else f'/{total}'}{faces} ({skipped} skipped) in "
              f"{elapsed:.0f}s, {fits / elapsed:.2f} {'face' if per_face else noun}s/s{left}",
              flush=True)
    return done, skipped


def write_faces(folder, pipeline, source, count, faces):
    """--all_faces: `folder`/overlay.png, every fitted face of the photo pasted back (smaller
    faces first, so that a nearer, larger face covers one behind it), shape.png, every face's
    shape alone the same way, and faces.json, written last: the photo is finished."""
    import numpy as np

    from ganfit_jax import inputs, io, morphable

    over = FLAGS.overwrite or FLAGS.resume
    faces = sorted(faces, key=lambda f: f[0])  # face_00, face_01, ...: largest first
    overlay = shape = faces[0][2].image
    for face_dir, params, item, metrics in sorted(faces, key=lambda f: f[3]["interocular_px"]):
        overlay = inputs.paste_back(overlay, *common.render_with_alpha(pipeline, params),
                                    item.transform)
        if FLAGS.shape_image:  # recomputed, not kept from each face's result: a 12 MP
            # photo's normals are ~145 MB a face
            verts = np.asarray(common.jitted(morphable.vertices)(pipeline.model, params.shape,
                                                                 params.expression))
            _, normals = photo_geometry(verts, pipeline.model.triangles, params.camera,
                                        item.transform)
            shape = shape_overlay(shape, normals)
    io.save_image(os.path.join(folder, "overlay.png"), overlay, overwrite=over)
    if FLAGS.shape_image:
        io.save_image(os.path.join(folder, "shape.png"), shape, overwrite=over)
    listing = [dict(folder=os.path.basename(face_dir),
                    landmark_error_px=m["landmark_error_px"],
                    landmark_error_iod=m["landmark_error_iod"], interocular_px=m["interocular_px"],
                    centre=[float(v) for v in np.nanmean(
                        item.transform.to_original(item.landmarks), axis=0)])
               for face_dir, _, item, m in faces]
    io.write_never_overwrite(os.path.join(folder, "faces.json"),
                             json.dumps(dict(source=str(source), faces=listing), indent=1), over)
    print(f"wrote {folder}/: {' '.join(faces_files())} ({count} face(s) of {source})",
          flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        mode = check_flags()
        try:
            common.enable_compilation_cache(FLAGS.compilation_cache)
        except OSError as e:
            raise app.UsageError(f"--compilation_cache: {e}") from e
        run(mode)
    except (InputError, MissingDependency) as e:  # the latter: dlib or PyAV not installed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
