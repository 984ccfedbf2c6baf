"""Unwraps photos into the 3DMM's UV layout: the training data of the texture GAN (Sec. 3.1).

For each photo: 68 landmarks (a .npy/.pts/.json beside it, else dlib), the working crop, a
landmark fit of shape, expression and camera (stage 1 of the fitting), then the visible texels
sampled into the UV map (less what --face_mask hides), the occluded half filled from its mirror.
Writes NAME.png and
NAME_mask.png (white seen, grey mirrored, black unknown) and a coverage summary.

    python -m experiments.build_uv_dataset --images=DIR --output_dir=DIR [--model=...]
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import common
from ganfit_jax.landmarks import DETECTORS

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "Folder (searched recursively) or glob of photos.")
flags.DEFINE_string("output_dir", None, "Where the UV maps and masks go.")
flags.DEFINE_string("model", None, "3DMM file (default: checkpoints/sfm.npz, else the SFM in "
                    "../shared/assets/sfm).")
flags.DEFINE_integer("resolution", 256, "UV map size.", lower_bound=4)
flags.DEFINE_integer("crop_size", 256, "Working crop of the photo.", lower_bound=32)
flags.DEFINE_integer("iterations", 200, "Landmark-fit iterations per photo.", lower_bound=0)
flags.DEFINE_enum("detector", "hog", DETECTORS, "dlib detector when no landmark file is beside "
                  "an image ('hog+cnn': the CNN where HOG finds no face).")
flags.DEFINE_integer("limit", 0, "Stop after this many photos (0: all).", lower_bound=0)
flags.DEFINE_string("face_mask", None, "Leave out of the UV maps what covers the face (hair, "
                    "hands, glasses): a folder of STEM.png or STEM.npy face masks named as the "
                    "photos (0/1, 0/255, [0, 1], or label maps with --mask_labels), or 'skin' "
                    "(each photo's own skin colour, inputs.skin_pixel_weight), as fit "
                    "--face_mask; hidden texels take their mirror texel's colour.")
flags.DEFINE_list("mask_labels", None, "--face_mask files are label maps: the face's labels, "
                  "'celebamask' or 'nonzero' (as fit --mask_labels).")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from ganfit_jax import fitting, inputs, landmarks, morphable
    from ganfit_jax.texture import unwrap

    if not FLAGS.images or not FLAGS.output_dir:
        raise app.UsageError("--images and --output_dir are required")
    if FLAGS.face_mask and FLAGS.face_mask != common.SKIN_MASK \
            and not os.path.isdir(FLAGS.face_mask):
        raise app.UsageError(f"--face_mask={FLAGS.face_mask}: expected a folder of masks or "
                             "'skin'")
    labels = common.parse_mask_labels(FLAGS.mask_labels)
    paths = [p for p in common.find_images(FLAGS.images, recursive=True) if "_seg" not in p]
    if not paths:
        raise app.UsageError(f"--images={FLAGS.images}: no images found")
    if FLAGS.limit:
        paths = paths[:FLAGS.limit]
    model_path = FLAGS.model or common.default_model_path()
    if model_path is None:
        raise app.UsageError(common.MISSING_MODEL)
    model = morphable.load(model_path)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    size = (FLAGS.crop_size, FLAGS.crop_size)
    surface = unwrap.uv_texel_surface(model, FLAGS.resolution)
    pipeline = fitting.Pipeline(model=model, image_size=size)
    config = fitting.FitConfig(stage1_iterations=FLAGS.iterations, stage2_iterations=0,
                               chunk=FLAGS.iterations)
    summary, t0 = [], time.time()
    for k, path in enumerate(paths):
        name = os.path.splitext(os.path.relpath(path, FLAGS.images if os.path.isdir(FLAGS.images)
                                                else os.path.dirname(path)))[0].replace(os.sep, "_")
        out_png = os.path.join(FLAGS.output_dir, name + ".png")
        if os.path.exists(out_png) and not FLAGS.overwrite:
            print(f"[{k + 1}/{len(paths)}] {name}: exists, skipped (--overwrite to redo)")
            continue
        try:
            image = landmarks.load_image(path)
            lm = landmarks.load_or_detect(path, detector=FLAGS.detector, image=image)
            crop, lm_crop, transform = inputs.crop_face(image, lm, FLAGS.crop_size)
            weight = common.crop_face_mask(FLAGS.face_mask, labels, path, image, crop, lm_crop,
                                           transform, report=lambda text: print(
                                               f"[{k + 1}/{len(paths)}] {text}"))
        except (ValueError, FileNotFoundError) as e:
            print(f"[{k + 1}/{len(paths)}] {name}: skipped: {e}")
            continue
        params = fitting.init_params(model, lm_crop, size, 0)
        target = fitting.Target(image=jnp.asarray(crop), landmarks=jnp.asarray(lm_crop))
        params, _ = fitting.fit(pipeline, params, target, config, log=None)
        verts = morphable.vertices(model, params.shape, params.expression)
        uv_map, mask = unwrap.unwrap(model, verts, params.camera, crop, FLAGS.resolution, surface,
                                     pixel_weight=weight)
        Image.fromarray((np.clip(uv_map, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out_png)
        Image.fromarray((mask * 255 + 0.5).astype(np.uint8)).save(
            os.path.join(FLAGS.output_dir, name + "_mask.png"))
        covered = np.asarray(surface[0]) >= 0
        seen = float((mask == 1).sum() / covered.sum())
        mirrored = float((mask == 0.5).sum() / covered.sum())
        summary.append(dict(name=name, source=path, seen=seen, mirrored=mirrored))
        elapsed = time.time() - t0
        eta = elapsed / (k + 1) * (len(paths) - k - 1)
        print(f"[{k + 1}/{len(paths)}] {name}: seen {seen:.1%} + mirrored {mirrored:.1%} of the "
              f"layout; elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)
    if summary:
        with open(os.path.join(FLAGS.output_dir, "coverage.json"), "w") as f:
            json.dump(summary, f, indent=1)
        seen = np.mean([s["seen"] for s in summary])
        total = np.mean([s["seen"] + s["mirrored"] for s in summary])
        print(f"{len(summary)} UV maps in {FLAGS.output_dir}: mean coverage {seen:.1%} seen, "
              f"{total:.1%} with mirroring")


if __name__ == "__main__":
    app.run(common.input_errors_as_one_line(main))
