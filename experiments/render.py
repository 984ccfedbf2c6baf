"""Renders a morphable model (or fitted parameters) to PNGs from chosen views.

  python -m experiments.render --model ../shared/assets/sfm/sfm_shape_3448.bin \\
      --output_dir /tmp/renders --views=-30,0,30 --turntable 0 --image_size 256 --save_depth

--params (optional) is an .npz with any of: shape (S,), expression (E,), camera (7,) or (8,),
light (9,), texture (Ht,Wt,3) UV map or colours (N,3); a fit's params.npz (experiments/fit.py)
as it stands: its texture is a texture model's latent, so its UV map is read from the mesh.png
the fit wrote beside it (or --texture_map), and its camera's focal length is scaled from the fit's
working size to --image_size, so the 0° view frames the face as the fit's render did.
--expression_from takes the expression (and --pose_from the camera) of another fit: one
person's face with another's expression or head pose. Without --params the mean face is rendered with
the model's texture mean (if any), else a uniform skin tone, lit by a light above the camera.
Views are yaw angles (degrees) of a camera orbiting the face at --distance mm (default: as near
as keeps the whole mesh in the frame from any side; the default light, above the camera, goes
round with it); a params camera is used as the 0° view and orbited about its target. --shape_only renders the shape alone, grey
(a turntable of the fitted geometry, without the texture that hides its errors). Existing outputs are never overwritten
unless --overwrite.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "model file loadable by ganfit_jax.morphable.load")
flags.DEFINE_string("params", None, "optional .npz with shape/expression/camera/light/texture")
flags.DEFINE_string("output_dir", None, "folder for the PNGs (created if absent)")
flags.DEFINE_list("views", ["0"], "yaw angles in degrees (positive: camera towards the subject's left)")
flags.DEFINE_integer("turntable", 0, "if > 0, also render this many views evenly over 360°",
                     lower_bound=0)
flags.DEFINE_bool("turntable_video", False, "also write turntable.mp4: the --turntable views "
                  "in order as one H.264 video at --fps")
flags.DEFINE_float("fps", 25.0, "--turntable_video's and --sequence's frame rate",
                   lower_bound=0.1)
flags.DEFINE_integer("image_size", 256, "square image size in pixels", lower_bound=8)
flags.DEFINE_float("distance", None, "camera distance (mm) from the face centre, without a "
                   "--params camera; default: the least at which the whole mesh is in the "
                   "frame from any yaw (camera.framing_cameras: a head model with its neck and "
                   "ears, like ICT's, ran past a fixed 800 mm's frame)")
flags.DEFINE_list("light", None, "9 values: x,y,z (world mm), light rgb, ambient rgb")
flags.DEFINE_float("background", 1.0, "background grey level in [0,1]",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_enum("texture_sampling", "pixel", ["pixel", "vertex"], "UV map lookup mode")
flags.DEFINE_bool("save_depth", False, "also save depth maps (.npy, mm, 0 on background)")
flags.DEFINE_bool("save_mask", False, "also save foreground masks (.npy, float32)")
flags.DEFINE_bool("save_normals", False, "also save normal maps (.npy, float32 H×W×3: unit "
                  "normals in OpenCV's camera frame, x right, y down, z forward; NaN on "
                  "background; render.geometry_maps)")
flags.DEFINE_bool("shape_only", False, "render the shape alone, grey and untextured, lit from "
                  "above left of the camera (render.shape_shading), instead of its texture and "
                  "the params' light: how the geometry itself looks")
flags.DEFINE_string("texture_map", None, "a UV map (PNG) to render with; default: the texture in "
                    "--params, or, for a fit's params.npz, the mesh.png beside it")
flags.DEFINE_string("expression_from", None, "a params.npz whose expression replaces --params' "
                    "(expression transfer)")
flags.DEFINE_string("pose_from", None, "a params.npz whose camera (the head pose and framing) "
                    "replaces --params'")
flags.DEFINE_string("sequence", None, "a `fit --frames` sequence.npz: render every frame with its "
                    "expression and head pose, as sequence.mp4 at --fps (and frame_NNNNNN.png "
                    "with --save_frames), instead of --views: the --params person performing "
                    "the video's expressions and poses (expression and pose transfer), or, "
                    "without --params, the video's own person (its identity.png as texture)")
flags.DEFINE_bool("sequence_pose", True, "--sequence: each frame's head pose (its camera); "
                  "--nosequence_pose keeps --params' camera (or the frontal view) and moves the "
                  "expression alone")
flags.DEFINE_bool("save_frames", False, "--sequence: also write every frame as "
                  "frame_NNNNNN.png (its number in the video)")
flags.DEFINE_bool("antialias", False, "blend the silhouettes (render.antialias, nvdiffrast's "
                  "analytic antialiasing): smooth outlines against the background, textured "
                  "or --shape_only; --save_mask then saves each pixel's coverage")
flags.DEFINE_bool("overwrite", False, "replace existing output files")
common.require_positive("distance")

DEFAULT_ALBEDO = (0.78, 0.6, 0.5)


# what experiments/fit.py writes into params.npz beside the blocks this binary renders
FIT_OUTPUTS = {"vertices", "landmarks3d", "landmarks2d", "crop_origin", "crop_scale",
               "camera_matrix", "rotation", "translation", "image_size"}


def _load_params(path, model, flag="--params"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{flag} {path}: not a readable .npz ({e})") from None
    known = {"shape", "expression", "camera", "light", "texture", "colours"}
    keys = {k for k in data.files if not k.startswith("__meta__/")}
    unknown = sorted(keys - known - FIT_OUTPUTS)
    if unknown:
        raise ValueError(f"{flag} {path}: unexpected keys {unknown}; expected some of "
                         f"{sorted(known)} (or a fit's params.npz)")
    out = {k: np.asarray(data[k], np.float32) for k in keys & known}
    if "image_size" in keys:  # a fit's working (render) size: its camera's focal is for that
        out["fit_size"] = np.asarray(data["image_size"], np.float32)
    path = f"{flag} {path}"
    if "shape" in out and out["shape"].shape != (model.num_shape,):
        raise ValueError(f"{path}: shape must be ({model.num_shape},), "
                         f"got {out['shape'].shape}")
    if "expression" in out and out["expression"].shape != (model.num_expression,):
        raise ValueError(f"{path}: expression must be ({model.num_expression},), "
                         f"got {out['expression'].shape}")
    if "camera" in out and out["camera"].shape not in ((7,), (8,)):
        raise ValueError(f"{path}: camera must be (7,) or (8,), got {out['camera'].shape}")
    if "light" in out and out["light"].shape != (9,):
        raise ValueError(f"{path}: light must be (9,), got {out['light'].shape}")
    return out


def _with_texture_map(params, params_path, texture_map):
    """The UV map to render with: --texture_map, else the params' own UV map or colours, else (a
    fit's latent) the fit's mesh.png beside its params.npz."""
    from ganfit_jax import landmarks

    latent = "texture" in params and params["texture"].ndim == 1
    if texture_map is None and not latent:
        return params
    out = {k: v for k, v in params.items() if k != "texture"}
    if texture_map is None:
        beside = os.path.join(os.path.dirname(params_path), "mesh.png")
        if not os.path.exists(beside):
            raise ValueError(
                f"--params {params_path}: its texture is a texture model's latent "
                f"({params['texture'].size} values), and no mesh.png (the fit's UV map) is beside "
                "it; give the UV map with --texture_map")
        texture_map = beside
    elif not os.path.exists(texture_map):
        raise FileNotFoundError(f"--texture_map {texture_map}: no such file")
    try:
        out["texture"] = landmarks.load_image(texture_map)
    except ValueError as e:
        raise ValueError(f"--texture_map: {e}") from None
    return out


def _orbit(point, target, yaw_degrees):
    """`point` rotated by `yaw` about the vertical axis through `target`."""
    a = np.deg2rad(yaw_degrees)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return target + rot @ (point - target)


def orbit_camera(base_camera, yaw_degrees):
    """The camera rotated by `yaw` about the vertical axis through its target."""
    base_camera = np.asarray(base_camera, np.float32)
    out = base_camera.copy()
    out[0:3] = _orbit(base_camera[0:3], base_camera[3:6], yaw_degrees)
    return out


def render_views(model, params, yaws, image_size, distance, light=None, background=1.0,
                 texture_sampling="pixel", normals=False, shape_only=False, antialias=False):
    """Yields (yaw, image, aux) for each yaw; library code kept here free of file I/O.
    `normals`: aux also holds `normals`, the visible surface's (`render.geometry_maps`).
    `shape_only`: the image is that surface's grey shading (`render.shape_shading`)."""
    import jax
    import jax.numpy as jnp

    from ganfit_jax import morphable

    verts = morphable.vertices(model, params.get("shape", 0.0), params.get("expression", 0.0))
    appearance = _appearance(model, params)
    base = params["camera"] if "camera" in params else _frontal_camera(verts, image_size,
                                                                       distance)
    if light is None:
        light = params.get("light")
    # a light of the scene's (given, or the fit's) stays where it is while the camera orbits;
    # the default one, above the camera, goes round with it, so that no view is lit from behind
    follows = light is None
    if follows:
        away = float(np.linalg.norm(np.asarray(base[0:3]) - np.asarray(base[3:6])))
        light = np.concatenate([np.asarray(base[0:3]) + [0.0, 0.6 * away, 0.0],
                                [0.75, 0.75, 0.75, 0.35, 0.35, 0.35]]).astype(np.float32)

    one = jax.jit(lambda cam, lit: _render_one(model, verts, appearance, cam, lit, image_size,
                                               background, texture_sampling, normals,
                                               shape_only, antialias))
    target = np.asarray(base[3:6], np.float32)
    for yaw in yaws:
        lit = np.concatenate([_orbit(light[0:3], target, yaw), light[3:]]) if follows else light
        image, aux = one(jnp.asarray(orbit_camera(base, yaw)), jnp.asarray(lit, jnp.float32))
        yield yaw, np.asarray(image), {k: np.asarray(v) for k, v in aux.items()}


def _frontal_camera(verts, image_size, distance):
    """A camera in front of the face (+z), looking at it, no roll: `distance` mm from the
    vertices' mean, or (None) from the middle of their bounding box at the least distance at
    which it sees every vertex from any yaw (every 15°), so that a view looks the same whichever
    others are asked for with it."""
    from ganfit_jax import camera as camera_lib

    focal = camera_lib.default_focal(image_size)
    if distance is None:
        return camera_lib.framing_cameras(np.asarray(verts), focal, image_size,
                                          np.arange(0.0, 360.0, 15.0))[0].astype(np.float32)
    centre = np.asarray(np.mean(np.asarray(verts), axis=0), np.float64)
    return np.concatenate([centre + [0, 0, distance], centre, [focal, 0.0]]).astype(np.float32)


def _appearance(model, params):
    """What the face is coloured with: the params' UV map or colours, else the model's texture
    mean, else a uniform skin tone."""
    if "texture" in params:
        return params["texture"]
    if "colours" in params:
        return params["colours"]
    if model.texture_mean is not None:
        return np.clip(np.asarray(model.texture_mean), 0, 1)
    return np.broadcast_to(np.float32(DEFAULT_ALBEDO), (model.num_vertices, 3))


def _render_one(model, verts, appearance, cam, light, image_size, background, texture_sampling,
                normals=False, shape_only=False, antialias=False):
    """One view (traced): (image, aux), aux with `normals` when asked or `shape_only` (the
    image then the shape's grey shading over the background). `antialias`: the outline blended
    into the background after either, and aux's mask the pixels' coverage."""
    import jax.numpy as jnp

    from ganfit_jax import camera as camera_lib
    from ganfit_jax import render

    image, aux = render.render(verts, model.triangles, model.uv, appearance, cam, light,
                               image_size, background=background,
                               texture_sampling=texture_sampling)
    if normals or shape_only:
        aux["normals"] = render.geometry_maps(verts, model.triangles, cam,
                                              camera_lib.image_hw(image_size))[1]
    if shape_only:
        grey = render.shape_shading(aux["normals"])
        image = jnp.where(jnp.isnan(grey)[..., None], jnp.asarray(background, jnp.float32),
                          jnp.repeat(grey[..., None], 3, axis=-1))
    if antialias:
        pixels, _ = camera_lib.project(cam, verts, camera_lib.image_hw(image_size))
        image, aux["mask"] = render.antialias_with_coverage(
            image, aux["mask"], aux["triangle_ids"], aux["depth"], pixels, model.triangles)
    return image, aux


SEQUENCE_KEYS = ("expression", "camera", "light", "frame", "shape", "image_size")


def load_sequence(path, model):
    """A `fit --frames` sequence.npz → dict of its per-frame expression (F,E), camera (F,8),
    light (F,9), frame (F,), and the shared shape (S,) and working image_size."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--sequence {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"--sequence {path}: not a readable .npz ({e})") from None
    missing = [k for k in SEQUENCE_KEYS if k not in data.files]
    if missing:
        raise ValueError(f"--sequence {path}: lacks {missing}; expected the sequence.npz of "
                         "`fit --frames` (one written before `image_size` was kept: fit again)")
    out = {k: np.asarray(data[k], np.float32) for k in SEQUENCE_KEYS}
    frames = len(out["frame"])
    for key, shape in (("expression", (frames, model.num_expression)),
                       ("camera", (frames, 8)), ("light", (frames, 9)),
                       ("shape", (model.num_shape,))):
        if out[key].shape != shape:
            raise ValueError(f"--sequence {path}: {key} must be {shape} for this model and "
                             f"{frames} frames, got {out[key].shape}")
    return out


def render_sequence(model, params, sequence, image_size, light=None, background=1.0,
                    texture_sampling="pixel", shape_only=False, pose=True, distance=None,
                    antialias=False):
    """Yields (frame number, image) for every frame of `sequence` (`load_sequence`): the face of
    `params` (its shape; the sequence's own without one) with that frame's expression, seen by
    that frame's camera (its focal scaled from the fit's working size to `image_size`) when
    `pose`, else by `params`' camera (or one `distance` mm in front, None: framing the face)
    throughout; lit by `light`, else `params`' light, else each frame's own."""
    import jax
    import jax.numpy as jnp

    from ganfit_jax import morphable

    shape = jnp.asarray(params.get("shape", sequence["shape"]))
    appearance = _appearance(model, params)
    cameras = sequence["camera"].copy()
    cameras[:, 6] *= image_size / float(np.max(sequence["image_size"]))
    if not pose:
        fixed = params["camera"] if "camera" in params else _frontal_camera(
            morphable.vertices(model, shape, 0.0), image_size, distance)
        fixed = np.concatenate([fixed, [0.0]])[:8]  # a 7-value camera has no roll
        cameras = np.broadcast_to(np.asarray(fixed, np.float32), cameras.shape)
    if light is None:
        light = params.get("light")
    lights = np.broadcast_to(light, sequence["light"].shape) if light is not None \
        else sequence["light"]

    @jax.jit
    def one(expression, cam, frame_light):
        verts = morphable.vertices(model, shape, expression)
        return _render_one(model, verts, appearance, cam, frame_light, image_size, background,
                           texture_sampling, shape_only=shape_only, antialias=antialias)[0]

    for number, expression, cam, frame_light in zip(sequence["frame"], sequence["expression"],
                                                    cameras, lights):
        yield int(number), np.asarray(one(jnp.asarray(expression), jnp.asarray(cam),
                                          jnp.asarray(frame_light)))


def _stem(output_dir, yaw):
    return os.path.join(output_dir, f"yaw{yaw:+07.1f}")


def _write(path, write, overwrite):
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    write(path)


def render_sequence_files(model, params, sequence, light):
    """--sequence: OUTPUT_DIR/sequence.mp4 (and frame_NNNNNN.png with --save_frames)."""
    from ganfit_jax import io

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    video = os.path.join(FLAGS.output_dir, "sequence.mp4")
    stems = [os.path.join(FLAGS.output_dir, f"frame_{int(n):06d}.png") for n in sequence["frame"]]
    existing = [p for p in [video] + (stems if FLAGS.save_frames else []) if os.path.exists(p)]
    if existing and not FLAGS.overwrite:  # refuse before rendering anything
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} outputs in all); pass "
                              "--overwrite to replace them")
    total = len(stems)

    def frames():
        for k, (number, image) in enumerate(render_sequence(
                model, params, sequence, FLAGS.image_size, light, FLAGS.background,
                FLAGS.texture_sampling, FLAGS.shape_only, FLAGS.sequence_pose, FLAGS.distance,
                FLAGS.antialias)):
            png = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
            if FLAGS.save_frames:
                io.save_image(stems[k], png, overwrite=FLAGS.overwrite)
            if k % 25 == 0 or k == total - 1:
                logging.info("rendered frame %d (%d of %d)", number, k + 1, total)
            yield png

    count = io.write_video(video, frames(), FLAGS.fps, overwrite=FLAGS.overwrite)
    print(video + (f" and {count} frame_NNNNNN.png" if FLAGS.save_frames else ""))


def main(argv):
    del argv
    from PIL import Image

    from ganfit_jax import io, morphable

    if not FLAGS.model:
        raise app.UsageError("--model is required (a file loadable by ganfit_jax.morphable.load)")
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required")
    model = morphable.load(FLAGS.model)
    params = _load_params(FLAGS.params, model) if FLAGS.params else {}
    texture_map = FLAGS.texture_map
    if FLAGS.sequence:
        if FLAGS["views"].present or FLAGS.turntable:
            raise ValueError("--sequence renders the video's frames; --views and --turntable go "
                             "without it")
        sequence = load_sequence(FLAGS.sequence, model)
        beside = os.path.join(os.path.dirname(FLAGS.sequence), "identity.png")
        if not FLAGS.params and texture_map is None and os.path.exists(beside):
            texture_map = beside  # the video's own person: the texture its frames share
    params = _with_texture_map(params, FLAGS.params or "", texture_map)
    for flag, keys in (("expression_from", ("expression",)), ("pose_from", ("camera", "fit_size"))):
        path = getattr(FLAGS, flag)
        if path:
            other = _load_params(path, model, f"--{flag}")
            if keys[0] not in other:
                raise ValueError(f"--{flag} {path}: holds no {keys[0]}")
            params.update({k: other[k] for k in keys if k in other})
    if "camera" in params and "fit_size" in params:  # the same framing at --image_size
        params["camera"] = params["camera"].copy()
        params["camera"][6] *= FLAGS.image_size / float(np.max(params["fit_size"]))
    params.pop("fit_size", None)
    light = None
    if FLAGS.light:
        if len(FLAGS.light) != 9:
            raise ValueError(f"--light: expected 9 comma-separated values, got {len(FLAGS.light)}")
        light = np.asarray([float(x) for x in FLAGS.light], np.float32)
    if FLAGS.sequence:
        render_sequence_files(model, params, sequence, light)
        return
    try:
        yaws = [float(v) for v in FLAGS.views]
    except ValueError:
        raise ValueError(f"--views: expected comma-separated yaw angles in degrees, got "
                         f"{FLAGS.views}") from None
    if FLAGS.turntable_video and FLAGS.turntable < 2:
        raise ValueError("--turntable_video needs --turntable=N (N ≥ 2 views over 360°)")
    turntable = [360.0 * k / FLAGS.turntable for k in range(FLAGS.turntable)]
    yaws += turntable
    yaws = list(dict.fromkeys(yaws))  # a view asked twice is rendered once
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    suffixes = [".png"] + (["_depth.npy"] if FLAGS.save_depth else []) + (
        ["_mask.npy"] if FLAGS.save_mask else []) + (
        ["_normals.npy"] if FLAGS.save_normals else [])
    existing = [p for yaw in yaws for p in (_stem(FLAGS.output_dir, yaw) + s for s in suffixes)
                if os.path.exists(p)]
    video = os.path.join(FLAGS.output_dir, "turntable.mp4")
    if FLAGS.turntable_video and os.path.exists(video):
        existing.append(video)
    if existing and not FLAGS.overwrite:  # refuse before rendering anything
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} outputs in all); pass "
                              "--overwrite to replace them")
    names, frames = [], {}
    for yaw, image, aux in render_views(model, params, yaws, FLAGS.image_size, FLAGS.distance,
                                        light, FLAGS.background, FLAGS.texture_sampling,
                                        FLAGS.save_normals, FLAGS.shape_only, FLAGS.antialias):
        stem = _stem(FLAGS.output_dir, yaw)
        png = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        _write(stem + ".png", lambda p: Image.fromarray(png).save(p), FLAGS.overwrite)
        if FLAGS.save_depth:
            _write(stem + "_depth.npy", lambda p: np.save(p, aux["depth"]), FLAGS.overwrite)
        if FLAGS.save_mask:
            _write(stem + "_mask.npy", lambda p: np.save(p, aux["mask"]), FLAGS.overwrite)
        if FLAGS.save_normals:
            _write(stem + "_normals.npy", lambda p: np.save(p, aux["normals"]), FLAGS.overwrite)
        names.append(stem + ".png")
        if FLAGS.turntable_video and yaw in turntable:
            frames[yaw] = png
        logging.info("wrote %s (%.1f%% foreground)", stem + ".png", 100 * aux["mask"].mean())
    if FLAGS.turntable_video:
        io.write_video(video, (frames[yaw] for yaw in turntable), FLAGS.fps,
                       overwrite=FLAGS.overwrite)
        names.append(video)
    print("\n".join(names))


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
