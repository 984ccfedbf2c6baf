"""Ground-truth quality benchmark and the leave-one-out ablation of GANFIT (Fig. 5).

    python -m experiments.benchmark_quality --num_faces=8 [--uv_dir=DIR | --texture_model=F]
    python -m experiments.benchmark_quality --num_faces=4 --ablate=id,id_random,content,pixel,landmark,gan --json

Needs no download: N faces are rendered from the SFM with known shape, expression, pose, light and
texture over a photo-like background, fitted by the full pipeline (`fitting.fit`, vmapped in
batches of --batch_size), and the fitted mesh is compared with the true one by the MICC protocol
of `ganfit_jax.evaluation.evaluate` (95 mm crop around the nose tip, landmark similarity alignment,
rigid point-to-plane ICP, symmetric point-to-plane distance in mm).

The ground truth (fixed seeds; `make_faces`):
  * shape p_s ~ N(0, 1)·--shape_std (0.8: draws from the prior's bulk, not its tails), expression
    p_e ~ N(0, 0.5²) moved into the model's expression range (the SFM's blendshapes: [0, 1],
    so each is off or partly on; before session 34 the truth held negative blendshapes too);
  * pose: the camera orbits the face centre by yaw ~ U(±30°), pitch ~ U(±15°), roll ~ N(0, 3°), at
    1050 ± 50 mm with the default 12° lens, the look-at point jittered by N(0, 8 mm);
  * light: a frontal key light 300 mm above the camera, jittered by N(0, 150 mm) per axis, colour
    0.6 + N(0, 0.05) and ambient 0.5 + N(0, 0.05) per channel;
  * texture: a real UV map of --uv_dir (experiments/build_uv_dataset.py; unobserved texels filled
    with the map's mean observed colour), else a sample of --texture_model (GAN z ~ N(0, I); PCA
    p_t ~ N(0, 0.7²)), else a random smooth skin map (`random_skin_texture`);
  * background: smooth colour noise (`random_background`), so the face is not on black;
  * landmarks: the truth's 68 points (fixed landmarks projected; jaw points spread evenly along
    the SFM contour vertices, as tests/test_fitting.py does; points the model lacks placed from
    their neighbours, `truth_landmarks`) plus N(0, --landmark_noise_px²) to imitate a detector.

What each row reports:
  * error_mm / median_mm: mean and median over faces of the symmetric point-to-plane distance
    between the fitted mesh S(p_s, p_e) and the true mesh (both with their expression: the
    reconstruction of the face as photographed);
  * landmark_px / landmark_iod_pct: mean distance of the fitted model's 68 projected landmarks to
    the noise-free true ones, in pixels and in % of the true inter-ocular (outer corner) distance;
  * id_cos: cosine of the identity network's embeddings of the aligned fitted render (over the
    target photo) and of the target photo. The same network drives L_id, so this measures how well
    the fit satisfies its own objective, not an independent recognition score;
  * fit_s: wall time of the configuration's fit (stage 2, all faces; stage 1 is shared and its time
    is on the 'stage 1 (landmarks)' row).

  * texture_mae: mean absolute error (RGB summed) of the fitted UV map against the true one,
    over the whole UV layout (unseen texels included: they count the same for every row).

With --occlude an occluder (a flat-coloured ellipse, `occlude`) is painted over the lower half of
each face, and a 'full + face mask' row fits the same photos given the occluder's complement as
their face mask (`fitting.Target.pixel_weight`, fit --face_mask), a 'full + skin mask' row given
each photo's skin-colour weights (`inputs.skin_pixel_weight`, fit --face_mask=skin).

With --antialias the ground truth is rendered with its outline antialiased (`render.antialias`,
as a camera's photo has no staircase), and a 'full + antialias' row fits with
`Pipeline.antialias` (fit --antialias) beside the 'full' row's hard-edged renders.

Rows: 'mean face' (the model mean, same alignment: the number any fit must beat), 'stage 1
(landmarks)' (the landmark-only initialisation), 'full' (Eq. 12), and with --ablate one row per
removed term: id (λ_id = 0), id_random (λ̂_id = 0), content (λ_con = 0), pixel (λ_pix = 0),
landmark (λ_lan = 0), gan (the GAN texture prior replaced by the PCA model of --pca_texture_model).
Ablations remove the term from the stage-2 cost of Eq. 12; stage 1 (landmark fitting, the
initialisation every configuration shares) is run once. 'gan' is skipped, with a note, unless the
configured texture is a GAN and a PCA model is given: with the prior-free direct texture there is
no GAN prior to remove.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

from absl import app, flags

from experiments import common

FLAGS = flags.FLAGS

ABLATIONS = ("id", "id_random", "content", "pixel", "landmark", "gan")
# the row fitted with `Pipeline.antialias` (--antialias)
ANTIALIAS_ROW = "full + antialias"
# ablation name → the LossWeights field it zeroes
_ABLATED_WEIGHT = {"id": "identity", "id_random": "identity_random", "content": "content",
                   "pixel": "pixel", "landmark": "landmark"}
# outer eye corners (iBUG 37 and 46, 0-based) for the inter-ocular distance
_EYE_OUTER = (36, 45)


def define_flags(flag_values=FLAGS):
    """Defines this benchmark's flags, skipping names already defined (experiments/benchmark.py
    shares --json, --model and --iterations with it)."""
    specs = [
        ("integer", "num_faces", 8, "Ground-truth faces to render and fit."),
        ("integer", "seed", 0, "Seed of the ground truth and of the fits."),
        ("integer", "iterations", 200, "Stage-2 iterations (Eq. 12)."),
        ("integer", "stage1_iterations", 100, "Stage-1 iterations (landmarks)."),
        ("integer", "chunk", 25, "Iterations per jitted chunk."),
        ("integer", "image_size", 224, "Working (render) resolution."),
        ("integer", "batch_size", 4, "Faces per vmapped fit."),
        ("string", "identity", "dlib", "Identity network: dlib | tiny | none | arcface-* "
         "(with --identity_weights)."),
        ("string", "identity_weights", None, "Weights for --identity."),
        ("string", "texture", "direct", "Texture model fitted: 'direct', a GAN .msgpack or a "
         "PCA .npz."),
        ("string", "pca_texture_model", None, "PCA .npz replacing the GAN for --ablate=gan."),
        ("string", "uv_dir", None, "Folder of true UV maps (experiments/build_uv_dataset.py)."),
        ("string", "texture_model", None, "GAN/PCA file sampled for true textures when no "
         "--uv_dir."),
        ("float", "landmark_noise_px", 1.0, "Gaussian noise (std, px) on the target landmarks."),
        ("float", "shape_std", 0.8, "Std of the true shape coefficients (prior units)."),
        ("list", "ablate", [], f"Terms to remove one at a time: {','.join(ABLATIONS)}."),
        ("bool", "occlude", False, "Paint an occluder (a flat-coloured ellipse, a hand or a "
         "lock of hair) over part of each face and add a 'full + face mask' row: the same fit "
         "given the occluder's complement as its face mask (fit --face_mask)."),
        ("bool", "antialias", False, "Render the ground truth antialiased and add a 'full + "
         "antialias' row: the same fit with antialiased renders (fit --antialias)."),
        ("string", "model", None, "3DMM; default ../shared/assets/sfm/sfm_shape_3448.bin."),
        ("bool", "json", False, "Print one JSON object per row instead of a table."),
        ("string", "output", None, "Also write the rows as JSON lines to this file."),
    ]
    for kind, name, default, help_ in specs:
        if name not in flag_values:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=flag_values)


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------


def _upsample(rng, coarse, size, std, channels=3):
    """Gaussian noise on a coarse grid, bilinearly upsampled: smooth random variation."""
    import jax
    import numpy as np

    grid = rng.normal(scale=std, size=(coarse, coarse, channels)).astype(np.float32)
    return np.asarray(jax.image.resize(grid, (size, size, channels), "linear"))


def random_skin_texture(rng, resolution=128):
    """A random smooth skin UV map: a base tone around (0.78, 0.60, 0.50) scaled in brightness
    by U(0.55, 1.1) and tinted by N(0, 0.03) per channel, plus low-frequency variation (8×8 grid,
    std 0.04) and finer mottling (32×32, std 0.015), clipped to [0, 1]."""
    import numpy as np

    base = np.array([0.78, 0.60, 0.50]) * rng.uniform(0.55, 1.1) + rng.normal(0, 0.03, 3)
    tex = (base[None, None, :] + _upsample(rng, 8, resolution, 0.04)
           + _upsample(rng, 32, resolution, 0.015))
    return np.clip(tex, 0.0, 1.0).astype(np.float32)


def random_background(rng, size):
    """Smooth colour noise: a 4×4 grid of U(0.1, 0.9) colours upsampled, plus 16×16 noise of
    std 0.05; like an out-of-focus photo background."""
    import numpy as np

    coarse = rng.uniform(0.1, 0.9, size=(4, 4, 3)).astype(np.float32)
    import jax

    bg = np.asarray(jax.image.resize(coarse, (size, size, 3), "linear"))
    return np.clip(bg + _upsample(rng, 16, size, 0.05), 0.0, 1.0).astype(np.float32)


def _uv_textures(uv_dir, resolution=256):
    """True textures from real UV maps; unobserved texels take the mean observed colour."""
    import numpy as np

    from ganfit_jax.texture import uv_io

    _, images, masks = uv_io.load_uv_folder(uv_dir, resolution)
    out = []
    for img, m in zip(images, masks):
        seen = m[..., 0] > 0.5
        fill = img[seen].mean(0) if seen.any() else np.array([0.78, 0.6, 0.5], np.float32)
        out.append(np.where(seen[..., None], img, fill).astype(np.float32))
    return out


def _model_textures(path, num, rng):
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax.texture import model as texture_model

    tm = texture_model.load_texture_model(path)
    std = 1.0 if isinstance(tm, texture_model.GANTexture) else 0.7
    return [np.asarray(tm.generate(jnp.asarray(rng.normal(0, std, tm.latent_dim), jnp.float32)))
            for _ in range(num)]


def truth_landmarks(model, vertices, camera, image_size):
    """The truth's 68 landmarks: fixed ones projected, jaw spread along the contour candidates
    (a detector's jaw line follows the silhouette, not fixed vertices)."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import camera as camera_lib
    from ganfit_jax import losses

    px = np.asarray(camera_lib.project(jnp.asarray(camera), jnp.asarray(vertices), image_size)[0])
    lm = np.array(losses.model_landmarks_2d(model, jnp.asarray(px), None))
    if model.contour_right is not None:
        pick = np.linspace(0, len(model.contour_right) - 1, 8).round().astype(int)
        lm[0:8] = px[np.asarray(model.contour_right)[pick]]
        lm[9:17] = px[np.asarray(model.contour_left)[pick][::-1]]
    # a detector reports all 68; points the model lacks are placed where they lie on a face
    # (e.g. the SFM's inner mouth corners, iBUG 61/65: between the outer corner and the midpoint
    # of the inner lip points beside it), so the identity network's 68-point alignment works
    for inner, outer, beside in ((60, 48, (61, 67)), (64, 54, (63, 65))):
        if not np.isfinite(lm[inner]).all():
            lm[inner] = 0.5 * (lm[outer] + lm[list(beside)].mean(0))
    return lm


def orbit_camera(yaw, pitch, roll, distance, target, image_size):
    """The project's camera (eye, look-at, focal, roll) on a sphere around `target` (mm): yaw
    and pitch (radians) as `camera.orbit_angles` measures them, the default 12° lens."""
    import numpy as np

    from ganfit_jax import camera as camera_lib

    direction = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    eye = np.asarray(target) + distance * direction
    focal = camera_lib.default_focal((image_size, image_size))
    return np.concatenate([eye, target, [focal, roll]]).astype(np.float32)


def _orbit_camera(rng, image_size):
    import numpy as np

    yaw = np.deg2rad(rng.uniform(-30, 30))
    pitch = np.deg2rad(rng.uniform(-15, 15))
    roll = np.deg2rad(rng.normal(0, 3))
    distance = 1050 + rng.uniform(-50, 50)
    target = np.array([0.0, 10.0, 0.0]) + rng.normal(0, 8, 3)
    return orbit_camera(yaw, pitch, roll, distance, target, image_size)


def key_light(rng, camera):
    """A key light 300 mm above the camera, jittered by N(0, 150 mm) per axis; colour 0.6 and
    ambient 0.5 per channel, each + N(0, 0.05)."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import camera as camera_lib

    _, up, _ = (np.asarray(a) for a in camera_lib.axes(jnp.asarray(camera)))
    return np.concatenate([camera[:3] + 300.0 * up + rng.normal(0, 150, 3),
                           0.6 + rng.normal(0, 0.05, 3),
                           0.5 + rng.normal(0, 0.05, 3)]).astype(np.float32)


def render_truth(model, render_fn, rng, shape, expression, camera, light, texture, background,
                 landmark_noise_px):
    """One ground-truth photo: a dict with image, landmarks (noisy), landmarks_true, vertices
    and the parameters that made it."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import morphable

    size = background.shape[:2]
    verts = np.asarray(morphable.vertices(model, jnp.asarray(shape), jnp.asarray(expression)))
    image, _ = render_fn(jnp.asarray(verts), model.triangles, model.uv, jnp.asarray(texture),
                         jnp.asarray(camera), jnp.asarray(light), image_size=size,
                         background=jnp.asarray(background))
    lm_true = truth_landmarks(model, verts, camera, size)
    lm = (lm_true + rng.normal(0, landmark_noise_px, lm_true.shape)).astype(np.float32)
    return dict(image=np.clip(np.asarray(image), 0, 1).astype(np.float32), landmarks=lm,
                landmarks_true=lm_true.astype(np.float32), vertices=verts, shape=shape,
                expression=expression, camera=camera, light=light, texture=texture)


def ground_truth_textures(rng, num, uv_dir=None, texture_model=None):
    """(num true UV maps, where they come from): --uv_dir's real maps, samples of a texture
    model, else random smooth skin."""
    if uv_dir:
        pool = _uv_textures(uv_dir)
        return [pool[i % len(pool)] for i in range(num)], f"uv_dir {uv_dir}"
    if texture_model:
        return _model_textures(texture_model, num, rng), f"sampled {texture_model}"
    return [random_skin_texture(rng) for _ in range(num)], "random smooth skin"


def occlude(rng, face):
    """Paints an occluder over a ground-truth photo: a flat-coloured ellipse (a hand, a lock of
    hair) centred on a random point of the face's lower half, half to two thirds of the
    landmarks' width across. Returns the photo and the occluder's mask (H,W) bool."""
    import numpy as np

    image = face["image"].copy()
    lm = face["landmarks_true"]
    lo, hi = lm.min(0), lm.max(0)
    width = hi[0] - lo[0]
    centre = np.array([rng.uniform(lo[0], hi[0]), rng.uniform((lo[1] + hi[1]) / 2, hi[1])])
    radii = width * rng.uniform(0.25, 0.33, 2)
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]] + 0.5
    mask = ((xs - centre[0]) / radii[0]) ** 2 + ((ys - centre[1]) / radii[1]) ** 2 <= 1
    colour = rng.uniform(0.0, 1.0, 3)
    shading = 1.0 + 0.1 * rng.standard_normal(image.shape[:2])  # not quite flat
    image[mask] = np.clip(colour[None] * shading[mask][:, None], 0, 1)
    return image.astype(np.float32), mask


def make_faces(model, num_faces, seed=0, image_size=224, uv_dir=None, texture_model=None,
               landmark_noise_px=1.0, shape_std=0.8, antialias=False):
    """The benchmark's ground truth (see the module docstring): a list of dicts with image
    (H,W,3), landmarks (68,2) noisy, landmarks_true (68,2), vertices (N,3) mm, shape, expression,
    camera, light, texture (UV map), texture_source."""
    import jax
    import numpy as np

    from ganfit_jax import morphable, render

    if num_faces < 1:
        raise ValueError(f"num_faces: expected at least 1, got {num_faces}")
    rng = np.random.default_rng(seed)
    textures, source = ground_truth_textures(rng, num_faces, uv_dir, texture_model)
    render_fn = jax.jit(functools.partial(render.render, antialias=antialias),
                        static_argnames=("image_size",))
    faces = []
    for i in range(num_faces):
        shape = (rng.normal(size=model.num_shape) * shape_std).astype(np.float32)
        expression = np.asarray(morphable.project_expression(
            model, (rng.normal(size=model.num_expression) * 0.5).astype(np.float32)))
        cam = _orbit_camera(rng, image_size)
        light = key_light(rng, cam)
        background = random_background(rng, image_size)
        faces.append(render_truth(model, render_fn, rng, shape, expression, cam, light,
                                  textures[i], background, landmark_noise_px))
        faces[-1]["texture_source"] = source
    return faces


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def mesh_error(model, vertices, true_vertices):
    """The MICC protocol (`evaluation.evaluate`) of a reconstruction against the truth, both in
    the model's topology: landmark similarity alignment, 95 mm crop, rigid ICP, symmetric
    point-to-plane distance (mm)."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import evaluation, morphable

    tri = np.asarray(model.triangles)
    lm_rec = np.asarray(morphable.landmarks3d(model, jnp.asarray(vertices)))
    lm_true = np.asarray(morphable.landmarks3d(model, jnp.asarray(true_vertices)))
    return evaluation.evaluate(np.asarray(vertices), tri, np.asarray(true_vertices), tri,
                               reconstruction_landmarks=lm_rec, scan_landmarks=lm_true)


def landmark_errors(pipeline, params, landmarks_true):
    """(mean px, mean % of the true outer inter-ocular distance) over the defined landmarks."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import fitting

    pred = np.asarray(fitting.project_landmarks(pipeline, params, jnp.asarray(landmarks_true)))
    d = np.linalg.norm(pred - landmarks_true, axis=1)
    iod = np.linalg.norm(landmarks_true[_EYE_OUTER[0]] - landmarks_true[_EYE_OUTER[1]])
    px = float(np.nanmean(d))
    return px, 100.0 * px / float(iod)


def _identity_cosine(pipeline, params, target):
    import jax.numpy as jnp

    from ganfit_jax import fitting, identity

    image, _ = fitting.render_face(pipeline, params, background=target.image)
    lm = fitting.project_landmarks(pipeline, params, target.landmarks)
    emb, _ = pipeline.identity_fn(pipeline.identity_params, fitting.identity_view(image, target),
                                  jnp.where(jnp.isfinite(lm), lm, 0.0))
    return identity.cosine_similarity(emb, target.embedding)


_identity_cosine_jit = None


def identity_cosine(pipeline, params, target):
    """cos(F(align(I_R)), F(align(I_0))): the fitted render over the photo, aligned with its own
    projected landmarks, against the target's precomputed embedding (NaN without a network)."""
    global _identity_cosine_jit
    import jax

    if pipeline.identity_fn is None or target.embedding is None:
        return float("nan")
    if _identity_cosine_jit is None:
        _identity_cosine_jit = jax.jit(_identity_cosine)
    return float(_identity_cosine_jit(pipeline, params, target))


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------


def _load_identity(name, weights, key):
    if name == "none":
        return None
    from ganfit_jax import identity

    if name == "tiny":
        return identity.load_identity("tiny", key=key)
    return identity.load_identity(name, weights=weights)


def _load_texture(spec):
    from ganfit_jax.texture import model as texture_model
    from ganfit_jax.texture.direct import DirectUVTexture

    if spec == "direct":
        return DirectUVTexture()
    return texture_model.load_texture_model(spec)


def _batches(items, batch_size, pad=True):
    """Consecutive batches and their real sizes, the last padded by repeating its last item
    (one compiled shape) unless `pad` is False."""
    out = []
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        padding = [chunk[-1]] * (batch_size - len(chunk)) if pad else []
        out.append((chunk + padding, len(chunk)))
    return out


def texture_error(fitted, truth):
    """Mean absolute error (RGB summed, over the UV layout's texels) of a fitted UV map against
    the true one, at the fitted map's resolution."""
    import numpy as np
    from PIL import Image

    fitted = np.clip(np.asarray(fitted, np.float64), 0, 1)
    size = fitted.shape[:2][::-1]
    truth = np.asarray(Image.fromarray((np.clip(truth, 0, 1) * 255 + 0.5).astype(np.uint8))
                       .resize(size, Image.Resampling.BILINEAR), np.float64) / 255
    return float(np.mean(np.sum(np.abs(fitted - truth), axis=-1)))


def _summary(name, per_face, fit_s, note=""):
    import numpy as np

    err = [f["error_mm"] for f in per_face]
    tex = [f["texture_mae"] for f in per_face if "texture_mae" in f]
    lm = [f["landmark_px"] for f in per_face if "landmark_px" in f]
    iod = [f["landmark_iod_pct"] for f in per_face if "landmark_iod_pct" in f]
    ids = [f["id_cos"] for f in per_face if "id_cos" in f]
    return dict(config=name, faces=len(per_face), error_mm=float(np.mean(err)),
                median_mm=float(np.median(err)), std_mm=float(np.std(err)),
                landmark_px=float(np.mean(lm)) if lm else float("nan"),
                landmark_iod_pct=float(np.mean(iod)) if iod else float("nan"),
                id_cos=float(np.mean(ids)) if ids else float("nan"),
                texture_mae=float(np.mean(tex)) if tex else float("nan"),
                fit_s=fit_s, note=note, per_face=per_face)


def run_quality(num_faces=8, seed=0, iterations=200, stage1_iterations=100, image_size=224,
                identity="dlib", texture="direct", ablate=(), json_out=False, *, batch_size=4,
                chunk=25, uv_dir=None, texture_model=None, pca_texture_model=None,
                identity_weights=None, landmark_noise_px=1.0, shape_std=0.8, model=None,
                occluders=False, antialias=False, log=print):
    """Runs the benchmark; returns one dict per configuration (see the module docstring), each
    with its per-face rows under 'per_face'. Prints the table (or JSON lines) as it goes.

    model: a MorphableModel or a path for `morphable.load` (default: the shared SFM).
    occluders: paint one over each face (`occlude`) and add the 'full + face mask' row.
    antialias: render the ground truth antialiased and add the 'full + antialias' row."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import fitting, inputs, losses, morphable
    from ganfit_jax.texture import model as texture_lib

    unknown = [a for a in ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"ablate: unknown terms {unknown}; expected some of {list(ABLATIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    if not isinstance(model, morphable.MorphableModel):
        model = morphable.load(model or default_model_path())
    key = jax.random.PRNGKey(seed)
    k_id, k_tex, k_fit = jax.random.split(key, 3)
    size = (image_size, image_size)
    quiet = None if json_out else log

    t0 = time.time()
    faces = make_faces(model, num_faces, seed, image_size, uv_dir, texture_model,
                       landmark_noise_px, shape_std, antialias=antialias)
    if quiet:
        quiet(f"rendered {num_faces} ground-truth faces ({faces[0]['texture_source']}) in "
              f"{time.time() - t0:.1f}s")
    if occluders:
        occluder_rng = np.random.default_rng(seed + 1)
        for f in faces:
            f["image"], f["occluder"] = occlude(occluder_rng, f)
    net = _load_identity(identity, identity_weights, k_id)
    tex = _load_texture(texture)

    configs = [("full", losses.LossWeights(), tex, "")]
    if antialias:
        configs.append((ANTIALIAS_ROW, losses.LossWeights(), tex,
                        "Pipeline.antialias (fit --antialias)"))
    if occluders:
        configs.append(("full + face mask", losses.LossWeights(), tex,
                        "the occluder's complement as the face mask"))
        configs.append(("full + skin mask", losses.LossWeights(), tex,
                        "inputs.skin_pixel_weight (fit --face_mask=skin)"))
    skipped = []
    for name in ablate:
        if name == "gan":
            if not isinstance(tex, texture_lib.GANTexture) or not pca_texture_model:
                skipped.append(("no gan", "skipped: needs --texture=GAN.msgpack and "
                                "--pca_texture_model (with the direct texture there is no GAN "
                                "prior to remove)"))
                continue
            configs.append(("no gan (PCA texture)", losses.LossWeights(),
                            texture_lib.load_texture_model(pca_texture_model), ""))
        else:
            w = dataclasses.replace(losses.LossWeights(), **{_ABLATED_WEIGHT[name]: 0.0})
            configs.append((f"no {name}", w, tex, ""))
        if net is None and name in ("id", "id_random", "content"):
            configs[-1] = configs[-1][:3] + ("identity none: term already absent",)

    # one Target per face per identity net (shared by every configuration)
    base = fitting.make_pipeline(model, tex, net, size)
    targets = [fitting.target_from_image(base, f["image"], f["landmarks"]) for f in faces]
    given_targets = {}
    if occluders:
        given_targets["full + face mask"] = [
            t.replace(pixel_weight=jnp.asarray(~f["occluder"], jnp.float32))
            for t, f in zip(targets, faces)]
        given_targets["full + skin mask"] = [
            t.replace(pixel_weight=jnp.asarray(inputs.skin_pixel_weight(f["image"],
                                                                        f["landmarks"])))
            for t, f in zip(targets, faces)]

    # stage 1 once (landmarks; the texture model only sets the latent size, carried as zeros)
    stage1_cfg = fitting.FitConfig(stage1_iterations=stage1_iterations, stage2_iterations=0,
                                   chunk=chunk)
    t1 = time.time()
    stage1 = []
    index = list(range(num_faces))
    stage1_pipeline = base.replace(texture_params=None)
    for b, (items, real) in enumerate(_batches(index, batch_size)):
        p0 = fitting.stack([fitting.init_params(model, faces[i]["landmarks"], size, 0)
                            for i in items])
        tg = fitting.stack([targets[i] for i in items])
        p1, _ = fitting.fit(stage1_pipeline, p0, tg,
                            stage1_cfg, jax.random.fold_in(k_fit, b), batched=True, log=None)
        stage1 += fitting.unstack(p1, real)
    stage1_s = time.time() - t1

    rows = []

    def evaluate_params(pipeline, params_list):
        out = []
        for i, p in enumerate(params_list):
            verts = np.asarray(morphable.vertices(model, p.shape, p.expression))
            ev = mesh_error(model, verts, faces[i]["vertices"])
            px, pct = landmark_errors(pipeline, p, faces[i]["landmarks_true"])
            textured = pipeline.texture_fn is not None and p.texture.size
            row = dict(face=i, error_mm=ev.error, p2p_mm=ev.point_to_point,
                       landmark_px=px, landmark_iod_pct=pct,
                       id_cos=identity_cosine(pipeline, p, targets[i]) if textured
                       else float("nan"))
            uv_map = np.asarray(pipeline.texture_fn(pipeline.texture_params, p.texture)) \
                if textured else None
            if uv_map is not None and uv_map.ndim == 3:  # a UV map (not per-vertex colours)
                row["texture_mae"] = texture_error(uv_map, faces[i]["texture"])
            out.append(row)
        return out

    def emit(row):
        rows.append(row)
        if json_out:
            print(to_json(row), flush=True)
        elif log is not None:
            log(f"{row['config']}: error {row['error_mm']:.3f} mm (median {row['median_mm']:.3f})"
                f" landmarks {row['landmark_px']:.2f} px id_cos {row['id_cos']:.3f} "
                f"texture {row.get('texture_mae', float('nan')):.3f} "
                f"fit {row['fit_s']:.1f}s {row['note']}")

    mean_rows = []
    for i, f in enumerate(faces):
        ev = mesh_error(model, np.asarray(model.mean), f["vertices"])
        mean_rows.append(dict(face=i, error_mm=ev.error, p2p_mm=ev.point_to_point))
    emit(_summary("mean face", mean_rows, 0.0, "model mean, same alignment"))
    s1_rows = evaluate_params(base.replace(texture_fn=None), stage1)
    emit(_summary("stage 1 (landmarks)", s1_rows, stage1_s, "shared by every configuration"))

    for name, weights, texture_model_, note in configs:
        pipeline = fitting.make_pipeline(model, texture_model_, net, size).replace(
            antialias=name == ANTIALIAS_ROW)
        texture_init = np.asarray(texture_model_.init_latent(k_tex))
        cfg = fitting.FitConfig(stage1_iterations=0, stage2_iterations=iterations, chunk=chunk,
                                weights=weights)
        fitted = []
        t2 = time.time()
        given = given_targets.get(name, targets)
        for b, (items, real) in enumerate(_batches(index, batch_size)):
            starts = []
            for i in items:
                p = stage1[i].replace(texture=jnp.asarray(texture_init))
                # stage 2 starts from the photo's colours where the texture model can invert them
                starts.append(fitting.texture_from_photo(pipeline, p, faces[i]["image"],
                                                         pixel_weight=given[i].pixel_weight))
            p2, _ = fitting.fit(pipeline, fitting.stack(starts),
                                fitting.stack([given[i] for i in items]), cfg,
                                jax.random.fold_in(k_fit, 1000 + b), batched=True, log=None)
            fitted += fitting.unstack(p2, real)
        fit_s = time.time() - t2
        emit(_summary(name, evaluate_params(pipeline, fitted), fit_s, note))
    for name, note in skipped:
        if not json_out and log is not None:
            log(f"{name}: {note}")
        rows.append(dict(config=name, faces=0, error_mm=float("nan"), median_mm=float("nan"),
                         std_mm=float("nan"), landmark_px=float("nan"),
                         landmark_iod_pct=float("nan"), id_cos=float("nan"),
                         texture_mae=float("nan"), fit_s=0.0, note=note, per_face=[]))
        if json_out:
            print(to_json(rows[-1]), flush=True)
    if not json_out and log is not None:
        log("")
        log(markdown_table(rows))
    return rows


COLUMNS = (("config", "configuration", "{}"), ("error_mm", "mean mm", "{:.3f}"),
           ("median_mm", "median mm", "{:.3f}"), ("std_mm", "std mm", "{:.3f}"),
           ("landmark_px", "landmarks px", "{:.2f}"), ("landmark_iod_pct", "landmarks % IOD",
                                                       "{:.2f}"),
           ("id_cos", "identity cos", "{:.3f}"), ("texture_mae", "texture MAE", "{:.3f}"),
           ("fit_s", "time s", "{:.1f}"),
           ("note", "note", "{}"))


def to_json(row):
    """One JSON line; NaN (a metric that does not apply) becomes null, so the line is strict JSON."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(row), allow_nan=False)


def markdown_table(rows, columns=COLUMNS):
    """The configurations side by side (one Markdown row each; NaN shown as '–'); columns:
    (key, header, format) triples."""
    lines = ["| " + " | ".join(c[1] for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key, "")
            cells.append("–" if isinstance(v, float) and math.isnan(v) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_model_path():
    assets = os.environ.get("GANFIT_ASSETS", os.path.join("..", "shared", "assets"))
    path = os.path.join(assets, "sfm", "sfm_shape_3448.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no --model given and {path} does not exist (set GANFIT_ASSETS "
                                "or pass --model)")
    return path


def check_output_free(flag="output"):
    """A file flag (--output, --plot) is never overwritten: refused before anything runs."""
    path = getattr(FLAGS, flag)
    if path and os.path.exists(path):
        raise ValueError(f"--{flag}={path} exists; choose another file")


def write_output(rows):
    """The rows as JSON lines to --output, if given."""
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write("".join(to_json(r) + "\n" for r in rows))


def main_quality(argv=None):
    """Runs from the parsed flags (also the `quality` subcommand of experiments/benchmark.py)."""
    check_output_free()
    rows = run_quality(FLAGS.num_faces, FLAGS.seed, FLAGS.iterations, FLAGS.stage1_iterations,
                       FLAGS.image_size, FLAGS.identity, FLAGS.texture, list(FLAGS.ablate),
                       FLAGS.json, batch_size=FLAGS.batch_size, chunk=FLAGS.chunk,
                       uv_dir=FLAGS.uv_dir, texture_model=FLAGS.texture_model,
                       pca_texture_model=FLAGS.pca_texture_model,
                       identity_weights=FLAGS.identity_weights,
                       landmark_noise_px=FLAGS.landmark_noise_px, shape_std=FLAGS.shape_std,
                       model=FLAGS.model, occluders=FLAGS.occlude, antialias=FLAGS.antialias)
    write_output(rows)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    main_quality()


if __name__ == "__main__":
    # defined only when run, never at import: the tests import several binaries into one process
    define_flags()
    app.run(common.input_errors_as_one_line(main))
