"""What several binaries share: where the default model is, which files are images."""

from __future__ import annotations

import glob
import os

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp")


LIST_EXTENSIONS = (".txt", ".lst")


def read_image_list(path):
    """The photos a list file names, one path a line (a data set's split file), in its order,
    each once; relative paths are from the list's folder, blank lines and `#` comments
    skipped. ValueError naming the list and line of a photo that is not there."""
    base = os.path.dirname(os.path.abspath(path))
    paths = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            photo = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
            if not os.path.isfile(photo):
                raise ValueError(f"{path}:{number}: {entry}: no such file")
            paths.append(photo)
    return list(dict.fromkeys(paths))


def find_images(spec, recursive=False):
    """Sorted image paths in a folder (optionally its sub-folders) or matching a glob (where
    `**` matches any depth of folders, as in a shell with globstar); or those a list file
    (.txt, .lst) names, in its order (`read_image_list`)."""
    if os.path.isfile(spec) and spec.lower().endswith(LIST_EXTENSIONS):
        return read_image_list(spec)
    if os.path.isdir(spec):
        pattern = os.path.join(spec, "**", "*") if recursive else os.path.join(spec, "*")
        candidates = glob.glob(pattern, recursive=recursive)
    else:
        candidates = glob.glob(spec, recursive=True)
    return sorted(p for p in candidates if p.lower().endswith(IMAGE_EXTENSIONS))


def photo_folders(paths, output_dir):
    """One output folder per photo: named after it where the names differ; else the photo's
    path below the photos' common folder, as sub-folders (a glob over a data set's subjects
    often meets one name in many of them; one folder for two photos would mix their fits);
    a.jpg and a.png beside each other get a_jpg and a_png."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) < len(stems):
        base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        stems = [os.path.splitext(os.path.relpath(os.path.abspath(p), base))[0] for p in paths]
        if len(set(stems)) < len(stems):
            stems = [os.path.relpath(os.path.abspath(p), base).replace(".", "_") for p in paths]
    return [os.path.join(output_dir, stem) for stem in stems]


def video_frame_jobs(path, output_dir, keyframes):
    """((name, frame), output folder) of every frame of a video but the `keyframes` (indices),
    decoded as they are asked for (`fit --frames --track`); ValueError for a bad video."""
    from ganfit_jax import inputs

    for i, frame in inputs.iter_video_frames(path):
        if i not in keyframes:
            yield (video_frame_name(path, i), frame), os.path.join(output_dir, f"frame_{i:06d}")


def video_frame_name(path, index):
    """How fit names a video's frame (in its output, metrics.json's source, errors)."""
    return f"{path} frame {index}"


def video_frame_number(name):
    """The frame index in a `video_frame_name`."""
    return int(name.rsplit(" frame ", 1)[1])


def nearest_keyframe_face(faces, number):
    """(x, y) of the person's face in the keyframe nearest in time to frame `number` (the
    earlier one on a tie); faces: (keyframes, 3) rows of frame number, x, y, in frame order."""
    import numpy as np

    faces = np.asarray(faces, np.float64)
    row = faces[np.argmin(np.abs(faces[:, 0] - number))]  # the first of equals: the earlier
    return float(row[1]), float(row[2])


def default_model_path():
    """checkpoints/sfm.npz if converted, else the SFM among the shared assets, else None."""
    assets = os.environ.get("GANFIT_ASSETS", os.path.join("..", "shared", "assets"))
    for c in (os.path.join("checkpoints", "sfm.npz"),
              os.path.join(assets, "sfm", "sfm_shape_3448.bin")):
        if os.path.exists(c):
            return c
    return None


MISSING_MODEL = ("no --model given, and neither checkpoints/sfm.npz nor "
                 "$GANFIT_ASSETS/sfm/sfm_shape_3448.bin (default ../shared/assets) exists; see "
                 "WORKSPACE.md")


MIN_CACHED_COMPILE_S = 0.1


def enable_compilation_cache(folder):
    """JAX's persistent compilation cache in `folder` (created; OSError if it cannot be), for
    every program that took at least 0.1 s to compile (or what
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says); '' or None leaves it off.

    Not JAX's default of 1 s: the identity network's embedding, stage 1's step and a dozen more
    compile in 0.1-0.8 s each and are read back in milliseconds (the README's fit run again
    with a warm cache: ~16 -> ~14 s, BENCHMARKS.md session 29). Quicker programs are left out:
    reading them back saves little, and several are shaped by each photo's size, so a data set
    of many sizes would leave a file per size."""
    if not folder:
        return
    import jax

    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(
        os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_CACHED_COMPILE_S)))


def require_positive(*names):
    """Flags (floats) that must be > 0: absl's lower_bound admits the bound itself, and a zero
    learning rate, camera distance or colour-scale top is a mistake, not a choice."""
    from absl import flags

    for name in names:
        flags.register_validator(name, lambda value: value is None or value > 0,
                                 message="must be > 0")


def input_errors_as_one_line(main):
    """Wraps a binary's absl main: a ValueError or OSError (what the loaders raise for a bad or
    missing file or argument, each naming it), or an optional package a feature needs and this
    installation lacks (`optional.MissingDependency`, saying how to install it), ends the run as
    one `error: ...` line on stderr and exit status 1, not a traceback; GANFIT_TRACEBACK=1
    re-raises, to debug."""
    import functools
    import sys

    from ganfit_jax.optional import MissingDependency

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (ValueError, OSError, MissingDependency) as e:
            if os.environ.get("GANFIT_TRACEBACK"):
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapped


def require_folders(*names):
    """A ValueError naming the first of these flags whose value is not an existing folder."""
    from absl import flags

    for name in names:
        value = getattr(flags.FLAGS, name)
        if not os.path.isdir(value):
            raise ValueError(f"--{name}={value}: no such folder")


def report_paths(output, overwrite):
    """An evaluation's (JSON, its PNG beside it), both refused before any work unless
    `overwrite`."""
    from ganfit_jax import io

    plot = os.path.splitext(output)[0] + ".png"
    for path in (output, plot):
        io.refuse_overwrite(path, overwrite)
    return output, plot


def write_report(paths, result, curves, steps, x_label, title, overwrite):
    """`result` as JSON and `curves` ({name: values at `steps`}) drawn as the PNG beside it
    (none when no curve has values); says what it wrote."""
    import json

    from ganfit_jax import io

    output, plot = paths
    io.write_never_overwrite(output, json.dumps(result, indent=1), overwrite)
    if curves:
        io.save_image(plot, io.render_curves(curves, steps=steps, x_label=x_label, title=title),
                      overwrite=overwrite)
    print(f"wrote {output}" + (f" and {plot}" if curves else ""), flush=True)


def fraction_within(values, thresholds):
    """For each threshold, the fraction of `values` at most that (a cumulative error curve;
    inf counts as never within)."""
    import numpy as np

    values = np.sort(np.asarray(values, np.float64).ravel())
    return [float(f) for f in np.searchsorted(values, thresholds, side="right") / values.size]


SKIN_MASK = "skin"  # --face_mask=skin: weights from each photo's own skin colour, no file
MASK_LABEL_SETS = ("celebamask", "nonzero")


def parse_mask_labels(values):
    """--mask_labels as `inputs.load_pixel_weight` takes it: None, a named set or integers."""
    if not values:
        return None
    if len(values) == 1 and values[0] in MASK_LABEL_SETS:
        return values[0]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--mask_labels: expected integers, 'celebamask' or 'nonzero', got "
                         f"{','.join(values)}") from None


def face_mask_file(spec, path):
    """--face_mask's file for photo or frame `path`: `spec` itself when it is a file, else
    STEM.png or STEM.npy in the folder `spec`; None when there is none."""
    if os.path.isfile(spec):
        return spec
    stem = os.path.splitext(os.path.basename(str(path)))[0]
    for ext in (".png", ".npy"):
        candidate = os.path.join(spec, stem + ext)
        if os.path.isfile(candidate):
            return candidate
    return None


def crop_face_mask(spec, labels, path, image, crop, lm_crop, transform, report=print):
    """The working crop's pixel weights (`fitting.Target.pixel_weight`) of --face_mask=`spec`
    for photo `path`: None without one; `inputs.skin_pixel_weight` for 'skin'; the mask file's
    crop (`face_mask_file`), or ones, reported, where the folder has none for the photo (so
    every photo of a batch has weights). ValueError / FileNotFoundError naming a bad file."""
    import numpy as np

    from ganfit_jax import inputs

    if not spec:
        return None
    if spec == SKIN_MASK:
        return inputs.skin_pixel_weight(crop, lm_crop)
    mask = face_mask_file(spec, path)
    if mask is None:
        report(f"{path}: no face mask in {spec} (STEM.png or STEM.npy); every pixel the face "
               "covers is compared")
        return np.ones(np.shape(crop)[:2], np.float32)
    weight = inputs.load_pixel_weight(mask, np.shape(image)[:2], labels)
    return inputs.crop_pixel_weight(weight, transform)


_JITTED = {}


def jitted(fn, static_argnames=()):
    """`fn` under `jax.jit`, made once per process. What the binaries compute outside the fit's
    steps (every output's renders, the metrics) calls the library's functions on concrete
    arrays, where JAX would trace, lower and compile each of their operations as a program of
    its own (BENCHMARKS.md, session 26: a tiny three-photo `--antialias` fit compiled 578
    programs, 228 with these and antialiasing's walks jitted)."""
    import jax

    key = (fn, tuple(static_argnames))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn, static_argnames=static_argnames)
    return _JITTED[key]


def _face_texture(pipeline, latent):
    return pipeline.texture_fn(pipeline.texture_params, latent)


def face_texture(pipeline, latent):
    """G(p_t): the pipeline's UV texture (or per-vertex colours) of a texture latent, jitted."""
    return jitted(_face_texture)(pipeline, latent)


def render_face(pipeline, params, background=None):
    """`fitting.render_face` jitted (its image and aux)."""
    from ganfit_jax import fitting

    return jitted(fitting.render_face)(pipeline, params, background)


def render_with_alpha(pipeline, params):
    """(colour (H,W,3) in [0,1], alpha (H,W)) of the fitted face at the working crop: alpha the
    mask, or with --antialias the coverage, its outline blended; the colour un-premultiplied
    there (the render is over black), so that pasting it over a photo leaves no dark fringe."""
    import numpy as np

    rendered, aux = render_face(pipeline, params)
    alpha = np.asarray(aux.get("coverage", aux["mask"]))
    colour = np.asarray(rendered) / np.where(alpha > 0, alpha, 1.0)[..., None]
    return np.clip(colour, 0, 1), alpha
