"""Video tracking against ground truth: one person's frames fitted three ways, side by side.

    python -m experiments.benchmark tracking --num_frames=12 --keyframe_step=4 [--json]
        [--output=ROWS.jsonl] [--plot=ERRORS.png]

Needs no download. One SFM face (one shape, one texture: the person) is rendered over one
background in --num_frames frames whose pose and expression move smoothly (`make_sequence`), and
the frames are fitted as `experiments/fit.py` would fit them (`--fits` picks some):

  * 'per frame' (`fit --images`): every frame its own fit, shape and texture included;
  * 'joint (Eq. 13)' (`fit --frames`): all frames together, one shape and texture for all;
  * 'keyframes + track' (`fit --frames --track`): every --keyframe_step-th frame fitted jointly,
    every other frame then fitted with the keyframes' shape and texture held
    (`FitConfig.frozen`), from the closed-form camera and the mean expression, as `fit` does;
  * 'spread keyframes + track' (`fit --frames --track --keyframes=spread`): as many keyframes,
    those whose head poses (from their noisy landmarks) lie farthest apart
    (`camera.spread_views`).

The ground truth (fixed seeds): shape p_s ~ N(0, 1)·--shape_std; expression moving smoothly
between N(0, 0.5²) draws, one every 6 frames (smoothstep between them), moved into the model's
expression range (the SFM's blendshapes: [0, 1]); the camera sweeping the
yaw from −max_yaw to +max_yaw degrees (--max_yaw) across the clip, the pitch ±8° and the roll
±3° in one sine period, at 1050 mm (--pose_path=sweep); or a mostly frontal head that glances
to −max_yaw a quarter of the way through and to +max_yaw at 70%, each glance a Gaussian bump
of one twelfth of the clip (--pose_path=glance: a talking head); a key light fixed in the world (the head turns under it);
textures, background and landmark noise as `benchmark_quality` draws them.

Each row (one per way of fitting) reports means over the frames of:
  * error_mm: the MICC distance (`benchmark_quality.mesh_error`) of the fitted mesh S(p_s, p_e) to
    the frame's true mesh;
  * identity_mm: the same for the neutral meshes S(p_s, 0): how well the person is recovered;
  * landmark_px: the fitted model's 68 projected landmarks against the noise-free true ones;
  * yaw_deg / pitch_deg: |error| of the head pose (`camera.orbit_angles`), in degrees;
  * jitter_mm: over consecutive frames, the mean per-vertex length of (fitted motion − true
    motion) of the model-space mesh (pose removed): how much the fit flickers that the face does
    not;
  * fit_s: wall time of the fit (stage 1, per frame the photo texture, stage 2; all frames), the
    compilation of its programs included (JAX's caches are cleared before each way, as in a
    fresh `fit` run without a persistent cache); steady_s: the same fit run again, compiled (what
    each further frame of a long video costs, per frame, is steady_s / frames); speedup: the
    per-frame fit's steady_s over this row's.
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments import benchmark_quality as bq
from experiments import common

FLAGS = flags.FLAGS

METHODS = ("per frame", "joint (Eq. 13)", "keyframes + track", "spread keyframes + track")
# --fits names → METHODS
FITS = {"per_frame": "per frame", "joint": "joint (Eq. 13)", "track": "keyframes + track",
        "spread": "spread keyframes + track"}
POSE_PATHS = ("sweep", "glance")


def define_flags(flag_values=FLAGS):
    """This benchmark's flags, skipping names already defined (experiments/benchmark.py shares
    --json, --model, --iterations and the quality benchmark's flags with it)."""
    bq.define_flags(flag_values)
    specs = [
        ("integer", "num_frames", 12, "Frames of the ground-truth clip."),
        ("integer", "keyframe_step", 4, "Every N-th frame is a keyframe of 'keyframes + track' "
         "(fit --frame_step)."),
        ("integer", "track_iterations", None, "Stage-2 iterations of a tracked frame "
         "(fit --track_iterations); default --iterations."),
        ("integer", "track_stage1_iterations", None, "Stage-1 iterations of a tracked frame; "
         "default --stage1_iterations."),
        ("float", "max_yaw", 30.0, "The head turns from -max_yaw to +max_yaw degrees."),
        ("enum", "pose_path", "sweep", "How the head moves: 'sweep' (yaw across the clip) or "
         "'glance' (frontal, two short glances aside)."),
        ("list", "fits", list(FITS), f"Ways of fitting the clip to run: {','.join(FITS)}."),
        ("string", "plot", None, "Also draw the per-frame mesh, identity and yaw errors of "
         "every way to this PNG."),
    ]
    for kind, name, default, help_ in specs:
        if name in flag_values:
            continue
        if kind == "enum":
            flags.DEFINE_enum(name, default, POSE_PATHS, help_, flag_values=flag_values)
        else:
            getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=flag_values)
    if "batch_steps" not in flag_values:  # experiments/benchmark.py defines it for `fit` too
        flags.DEFINE_enum("batch_steps", "auto", ["auto", "vmap", "per_photo"],
                          "How batches step (fitting.FitConfig.batch_steps; fit --batch_steps).",
                          flag_values=flag_values)


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------


def expression_path(rng, num_frames, num_expression, every=6):
    """(num_frames, num_expression): N(0, 0.5²) draws at frames 0, every, 2·every, ... (and the
    last), smoothstep in between: a face that moves without jumps."""
    import numpy as np

    anchors = np.unique(np.r_[np.arange(0, num_frames, every), num_frames - 1])
    values = rng.normal(0.0, 0.5, (len(anchors), num_expression))
    if len(anchors) == 1:
        return np.repeat(values, num_frames, 0).astype(np.float32)
    t = np.arange(num_frames)
    seg = np.clip(np.searchsorted(anchors, t, side="right") - 1, 0, len(anchors) - 2)
    u = (t - anchors[seg]) / (anchors[seg + 1] - anchors[seg])
    u = u * u * (3.0 - 2.0 * u)
    return ((1 - u)[:, None] * values[seg] + u[:, None] * values[seg + 1]).astype(np.float32)


def head_yaw(num_frames, max_yaw, pose_path="sweep"):
    """(num_frames,) yaw in degrees of the clip's camera around the face (module docstring)."""
    import numpy as np

    t = np.arange(num_frames, dtype=np.float64)
    if pose_path == "sweep":
        return max_yaw * (2.0 * t / (num_frames - 1) - 1.0)
    if pose_path != "glance":
        raise ValueError(f"pose_path: expected one of {POSE_PATHS}, got {pose_path!r}")
    width = num_frames / 12.0
    bump = lambda centre: np.exp(-np.square((t - centre * (num_frames - 1)) / width))  # noqa
    return max_yaw * (bump(0.7) - bump(0.25))


def make_sequence(model, num_frames, seed=0, image_size=224, max_yaw=30.0, shape_std=0.8,
                  landmark_noise_px=1.0, uv_dir=None, texture_model=None, pose_path="sweep"):
    """The clip (see the module docstring): a list of per-frame dicts as
    `benchmark_quality.make_faces` returns them, all with the same shape and texture."""
    import jax
    import numpy as np

    from ganfit_jax import morphable, render

    if num_frames < 2:
        raise ValueError(f"num_frames: expected at least 2, got {num_frames}")
    rng = np.random.default_rng(seed)
    (texture,), source = bq.ground_truth_textures(rng, 1, uv_dir, texture_model)
    shape = (rng.normal(size=model.num_shape) * shape_std).astype(np.float32)
    # moved into the model's expression range (the SFM's blendshapes: [0, 1]) after the path
    expressions = np.asarray(morphable.project_expression(
        model, expression_path(rng, num_frames, model.num_expression)))
    background = bq.random_background(rng, image_size)
    look_at = np.array([0.0, 10.0, 0.0])
    frontal = bq.orbit_camera(0.0, 0.0, 0.0, 1050.0, look_at, image_size)
    light = bq.key_light(rng, frontal)  # fixed in the world: the head turns under it
    render_fn = jax.jit(render.render, static_argnames=("image_size",))
    frames = []
    yaws = np.deg2rad(head_yaw(num_frames, max_yaw, pose_path))
    for t in range(num_frames):
        phase = 2.0 * np.pi * t / num_frames
        yaw = yaws[t]
        cam = bq.orbit_camera(yaw, np.deg2rad(8.0) * np.sin(phase),
                              np.deg2rad(3.0) * np.sin(phase), 1050.0, look_at, image_size)
        frames.append(bq.render_truth(model, render_fn, rng, shape, expressions[t], cam, light,
                                      texture, background, landmark_noise_px))
        frames[-1]["texture_source"] = source
    return frames


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def pose_errors_deg(fitted_camera, true_camera):
    """|yaw error|, |pitch error| in degrees (`camera.orbit_angles`)."""
    import numpy as np

    from ganfit_jax import camera as camera_lib

    fit = np.rad2deg(np.asarray(camera_lib.orbit_angles(fitted_camera)[:2]))
    true = np.rad2deg(np.asarray(camera_lib.orbit_angles(true_camera)[:2]))
    return tuple(float(abs(a - b)) for a, b in zip(fit, true))


def jitter_mm(fitted_vertices, true_vertices):
    """Mean per-vertex length of (fitted − true) frame-to-frame motion, model space, mm."""
    import numpy as np

    fitted, true = np.asarray(fitted_vertices), np.asarray(true_vertices)
    if len(fitted) < 2:
        return float("nan")
    return float(np.linalg.norm(np.diff(fitted, axis=0) - np.diff(true, axis=0), axis=-1).mean())


def score(model, pipeline, params_list, frames, name, fit_s):
    """One row: the means over the frames (module docstring) and the per-frame numbers."""
    import jax.numpy as jnp
    import numpy as np

    from ganfit_jax import morphable

    per_frame, fitted = [], []
    for t, (p, f) in enumerate(zip(params_list, frames)):
        verts = np.asarray(morphable.vertices(model, p.shape, p.expression))
        neutral = np.asarray(morphable.vertices(model, p.shape, jnp.zeros_like(p.expression)))
        true_neutral = np.asarray(morphable.vertices(model, jnp.asarray(f["shape"]),
                                                     jnp.zeros(model.num_expression)))
        yaw, pitch = pose_errors_deg(p.camera, f["camera"])
        px, _ = bq.landmark_errors(pipeline, p, f["landmarks_true"])
        per_frame.append(dict(frame=t, error_mm=bq.mesh_error(model, verts, f["vertices"]).error,
                              identity_mm=bq.mesh_error(model, neutral, true_neutral).error,
                              landmark_px=px, yaw_deg=yaw, pitch_deg=pitch))
        fitted.append(verts)
    row = dict(method=name, frames=len(frames), fit_s=fit_s, per_frame=per_frame,
               jitter_mm=jitter_mm(fitted, [f["vertices"] for f in frames]))
    for key in ("error_mm", "identity_mm", "landmark_px", "yaw_deg", "pitch_deg"):
        row[key] = float(np.mean([r[key] for r in per_frame]))
    return row


def plot_rows(rows):
    """The per-frame errors of every way, one line each: mesh, identity, |yaw| (uint8 image)."""
    import numpy as np

    from ganfit_jax import io

    charts = []
    for key, title in (("error_mm", "mesh error (mm, MICC)"),
                       ("identity_mm", "identity error: neutral mesh (mm)"),
                       ("yaw_deg", "|yaw error| (degrees)")):
        curves = {r["method"]: [f[key] for f in r["per_frame"]] for r in rows}
        frames = [f["frame"] for f in rows[0]["per_frame"]]
        charts.append(io.render_curves(curves, steps=frames, title=title, x_label="frame"))
    return np.concatenate(charts, 0)


# ------------------------------------------------------------------------------------------
# The three ways of fitting a clip
# ------------------------------------------------------------------------------------------


def batches(count, batch_size, config):
    """Consecutive batches of range(count) and their real sizes, padded by repeating the last
    item (one compiled shape) unless stage 2 steps photo after photo: as `fit` batches them."""
    from ganfit_jax import fitting

    return bq._batches(list(range(count)), batch_size,
                       pad=not fitting.per_photo_batch_applies(config, 2, "batch"))


def fit_per_frame(pipeline, frames, starts, config, key, batch_size):
    """`fit --images`: each frame alone, stage 2 from the photo's unwrapped colours."""
    import jax

    from ganfit_jax import fitting

    out = []
    for b, (items, real) in enumerate(batches(len(frames), batch_size, config)):
        def photo_texture(params, items=items):
            return fitting.stack([fitting.texture_from_photo(pipeline, p, frames[i]["image"])
                                  for p, i in zip(fitting.unstack(params, len(items)), items)])

        params, _ = fitting.fit(pipeline, fitting.stack([starts[i][0] for i in items]),
                                fitting.stack([starts[i][1] for i in items]), config,
                                jax.random.fold_in(key, b), batched=True, log=None,
                                between_stages=photo_texture)
        out += fitting.unstack(params, real)
    return out


def fit_jointly(pipeline, starts, config, key):
    """`fit --frames`: Eq. 13, one shape and texture shared by every frame given."""
    from ganfit_jax import fitting

    params, _ = fitting.fit(pipeline, fitting.stack([s[0] for s in starts]),
                            fitting.stack([s[1] for s in starts]), config, key, frames=True,
                            log=None)
    return fitting.unstack(params, len(starts))


def fit_tracked(pipeline, starts, joint, config, key, batch_size):
    """`fit --track`'s other frames: the joint shape and texture held, the rest fitted."""
    import dataclasses

    import jax

    from ganfit_jax import fitting

    config = dataclasses.replace(config, frozen=("shape", "texture"))
    out = []
    for b, (items, real) in enumerate(batches(len(starts), batch_size, config)):
        params = fitting.stack([starts[i][0].replace(shape=joint.shape, texture=joint.texture)
                                for i in items])
        params, _ = fitting.fit(pipeline, params, fitting.stack([starts[i][1] for i in items]),
                                config, jax.random.fold_in(key, b), batched=True, log=None)
        out += fitting.unstack(params, real)
    return out


def run_tracking(num_frames=12, keyframe_step=4, seed=0, iterations=150, stage1_iterations=100,
                 track_iterations=None, track_stage1_iterations=None, image_size=224,
                 identity="dlib", texture="direct", *, batch_size=4, chunk=25, max_yaw=30.0,
                 shape_std=0.8, landmark_noise_px=1.0, uv_dir=None, texture_model=None,
                 identity_weights=None, model=None, json_out=False, log=print, fits=tuple(FITS),
                 batch_steps="auto", pose_path="sweep"):
    """Runs the benchmark; returns one dict per way of fitting (module docstring), printed as a
    table (or JSON lines) as it goes. model: a MorphableModel or a path (default: the SFM);
    fits: names of FITS (the speed-up needs 'per_frame'); batch_steps: FitConfig.batch_steps."""
    import dataclasses

    import jax
    import numpy as np

    from ganfit_jax import camera, fitting, morphable

    unknown = [f for f in fits if f not in FITS]
    if unknown or not fits:
        raise ValueError(f"fits: expected some of {','.join(FITS)}, got {','.join(fits)}")
    if num_frames < 3:
        raise ValueError(f"num_frames: expected at least 3 (two keyframes and a tracked frame), "
                         f"got {num_frames}")
    if keyframe_step < 2 or keyframe_step >= num_frames:
        raise ValueError(f"keyframe_step: expected 2 ≤ keyframe_step < num_frames "
                         f"({num_frames}) so that some frames are tracked, got {keyframe_step}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    if not isinstance(model, morphable.MorphableModel):
        model = morphable.load(model or bq.default_model_path())
    key = jax.random.PRNGKey(seed)
    k_id, k_tex, k_fit = jax.random.split(key, 3)
    quiet = None if json_out else log
    t0 = time.time()
    frames = make_sequence(model, num_frames, seed, image_size, max_yaw, shape_std,
                           landmark_noise_px, uv_dir, texture_model, pose_path)
    if quiet:
        quiet(f"rendered a {num_frames}-frame ground-truth clip ({frames[0]['texture_source']}) "
              f"in {time.time() - t0:.1f}s")
    size = (image_size, image_size)
    tex = bq._load_texture(texture)
    pipeline = fitting.make_pipeline(model, tex, bq._load_identity(identity, identity_weights,
                                                                   k_id), size)
    texture_init = np.asarray(tex.init_latent(k_tex))
    starts = [(fitting.init_params(model, f["landmarks"], size, texture_init.shape[0],
                                   texture_init=texture_init),
               fitting.target_from_image(pipeline, f["image"], f["landmarks"])) for f in frames]
    config = fitting.FitConfig(stage1_iterations=stage1_iterations, stage2_iterations=iterations,
                               chunk=chunk, batch_steps=batch_steps)
    track_config = dataclasses.replace(
        config, stage1_iterations=(stage1_iterations if track_stage1_iterations is None
                                   else track_stage1_iterations),
        stage2_iterations=iterations if track_iterations is None else track_iterations)

    uniform = list(range(0, num_frames, keyframe_step))
    # fit --keyframes=spread: as many keyframes, the poses farthest apart by their landmarks
    mean_landmarks = np.asarray(morphable.landmarks3d(model, model.mean))
    poses = [camera.head_pose_from_landmarks(mean_landmarks, f["landmarks"]) for f in frames]
    spread = camera.spread_views(np.array(poses), len(uniform), times=np.arange(num_frames))
    keyframes = {"keyframes + track": uniform, "spread keyframes + track": spread}
    true_yaw = [float(np.degrees(camera.orbit_angles(f["camera"])[0])) for f in frames]

    def tracked(keys):
        others = [t for t in range(num_frames) if t not in keys]
        joint = fit_jointly(pipeline, [starts[t] for t in keys], config,
                            jax.random.fold_in(k_fit, 2))
        rest = fit_tracked(pipeline, [starts[t] for t in others], joint[0], track_config,
                           jax.random.fold_in(k_fit, 3), batch_size)
        by_frame = dict(zip(keys, joint)) | dict(zip(others, rest))
        return [by_frame[t] for t in range(num_frames)]

    ways = {
        "per frame": lambda: fit_per_frame(pipeline, frames, starts, config,
                                           jax.random.fold_in(k_fit, 0), batch_size),
        "joint (Eq. 13)": lambda: fit_jointly(pipeline, starts, config,
                                              jax.random.fold_in(k_fit, 1)),
        "keyframes + track": lambda: tracked(uniform),
        "spread keyframes + track": lambda: tracked(spread),
    }
    rows = []
    for name, way in ways.items():
        if name not in [FITS[f] for f in fits]:
            continue
        # each way compiles its own programs, as a fresh `fit` run would (else a later way would
        # reuse programs an earlier one compiled, e.g. stage 1's); then it runs again, compiled:
        # the time a long video's frames take once compilation is paid
        jax.clear_caches()
        t1 = time.time()
        params = jax.block_until_ready(way())
        t2 = time.time()
        jax.block_until_ready(way())
        row = score(model, pipeline, params, frames, name, t2 - t1)
        row["steady_s"] = time.time() - t2
        keys = keyframes.get(name)
        row["note"] = ("" if keys is None else f"keyframes {','.join(map(str, keys))} (yaw "
                       + ", ".join(f"{true_yaw[t]:+.0f}°" for t in keys) + ")")
        base = [r["steady_s"] for r in rows if r["method"] == "per frame"]
        row["speedup"] = (base[0] if base else row["steady_s"] if name == "per frame"
                          else float("nan")) / row["steady_s"]
        rows.append(row)
        if json_out:
            print(bq.to_json(row), flush=True)
        elif log is not None:
            log(f"{name}: error {row['error_mm']:.3f} mm, identity {row['identity_mm']:.3f} mm, "
                f"landmarks {row['landmark_px']:.2f} px, yaw {row['yaw_deg']:.2f}°, jitter "
                f"{row['jitter_mm']:.3f} mm, {row['fit_s']:.1f}s, compiled {row['steady_s']:.1f}s "
                f"({row['speedup']:.2f}×)")
    if not json_out and log is not None:
        log("")
        log(bq.markdown_table(rows, COLUMNS))
    return rows


COLUMNS = (("method", "fit", "{}"), ("error_mm", "mesh mm", "{:.3f}"),
           ("identity_mm", "identity mm", "{:.3f}"), ("landmark_px", "landmarks px", "{:.2f}"),
           ("yaw_deg", "yaw °", "{:.2f}"), ("pitch_deg", "pitch °", "{:.2f}"),
           ("jitter_mm", "jitter mm", "{:.3f}"), ("fit_s", "time s", "{:.1f}"),
           ("steady_s", "compiled s", "{:.1f}"),
           ("speedup", "speed-up", "{:.2f}×"), ("note", "note", "{}"))


def main_tracking(argv=None):
    """Runs from the parsed flags (also the `tracking` subcommand of experiments/benchmark.py)."""
    bq.check_output_free()
    bq.check_output_free("plot")
    rows = run_tracking(FLAGS.num_frames, FLAGS.keyframe_step, FLAGS.seed, FLAGS.iterations,
                        FLAGS.stage1_iterations, FLAGS.track_iterations,
                        FLAGS.track_stage1_iterations, FLAGS.image_size, FLAGS.identity,
                        FLAGS.texture, batch_size=FLAGS.batch_size, chunk=FLAGS.chunk,
                        max_yaw=FLAGS.max_yaw, shape_std=FLAGS.shape_std,
                        landmark_noise_px=FLAGS.landmark_noise_px, uv_dir=FLAGS.uv_dir,
                        texture_model=FLAGS.texture_model,
                        identity_weights=FLAGS.identity_weights, model=FLAGS.model,
                        json_out=FLAGS.json, fits=tuple(FLAGS.fits),
                        batch_steps=FLAGS.batch_steps, pose_path=FLAGS.pose_path)
    bq.write_output(rows)
    if FLAGS.plot:
        from ganfit_jax import io

        io.save_image(FLAGS.plot, plot_rows(rows))
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    main_tracking()


if __name__ == "__main__":
    define_flags()
    app.run(common.input_errors_as_one_line(main))
