r"""MICC Florence evaluation of GANFIT's Table 1 (Gecer et al., CVPR 2019, Sec. 4.2).

For every subject, 5 frames are sampled uniformly from each of the three videos (cooperative
indoor, PTZ indoor, PTZ outdoor), one face is reconstructed from each set of frames, and compared
with the subject's frontal scan by the protocol of Genova et al. 2018: crop the scan at 95 mm
around the nose tip, align rigidly by ICP, symmetric point-to-plane distance in mm
(ganfit_jax.evaluation). Writes a CSV per subject (resumable: finished subjects are skipped),
all rows in results.csv and the Table-1 summary (mean ± std over subjects per video setting) in
table1.md.

    python -m experiments.evaluate_micc --micc_dir=/data/florence --output_dir=/tmp/micc \
        --method=fit --model=../shared/assets/sfm/sfm_shape_3448.bin
    python -m experiments.evaluate_micc --micc_dir=/data/florence --output_dir=/tmp/micc \
        --method=precomputed --reconstructions_dir=/tmp/recons   # DIR/subject_NN/SETTING.obj

MICC Florence layout (as distributed, and as public loaders of it read it):

    MICC_DIR/subject_01/Model/frontal1/obj/<timestamp>.obj   (+ .mtl/.bmp texture)
    MICC_DIR/subject_01/Model/frontal1/vrml/<timestamp>.wrl  (the same scan as VRML)
    MICC_DIR/subject_01/Model/{frontal2,sidel,sider}/...      (further scans; frontal2 optional)
    MICC_DIR/subject_01/Video/Indoor-Cooperative.mjpg         (videos, .mjpg/.mjpeg/.avi/...)
    MICC_DIR/subject_01/Video/PTZ-Indoor.mjpg
    MICC_DIR/subject_01/Video/PTZ-Outdoor.mjpg

Assumptions (documented because MICC ships no machine-readable description):
  * Scans: the first *.obj under Model/SCAN/obj/, else the first *.wrl anywhere under
    Model/SCAN/; coordinates are multiplied by --scan_scale to give millimetres (1 for the
    original scans) and the face looks roughly along --scan_forward (+z).
  * Videos: a file Video/SETTING.* — raw or AVI-wrapped motion JPEG is decoded here without
    extra packages; other codecs need PyAV (`pip install av`, optional) — or a folder
    Video/SETTING/ of frame images (e.g. from `ffmpeg -i X.mjpg SETTING/%05d.png`).
  * Frames: k frames at the centres of k equal segments of the video (uniform sampling).
  * MICC gives no scan landmarks, so the initial alignment translates the reconstruction's nose
    tip (the model's iBUG-31 vertex, or the most protruding point) onto the scan's nose tip
    (`evaluation.find_nose_tip`), tries a few yaw angles (--init_yaw_degrees) and keeps the ICP
    result with the lowest error. With 68 manually labelled 3D landmarks per scan
    (--scan_landmarks_dir: subject_NN[_SCAN].{npy,txt,ljson}) and a model with landmark vertices,
    a landmark similarity/rigid alignment replaces it, as in GANFIT's released benchmark.
  * With several scans (--scans=frontal1,frontal2) a subject/setting scores the lower error of
    the scans, as GANFIT's released benchmark does; the default is frontal1 only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys
import numpy as np
from absl import app, flags, logging

from experiments import common
from ganfit_jax import evaluation as ev
from ganfit_jax import inputs

SETTINGS = ("Indoor-Cooperative", "PTZ-Indoor", "PTZ-Outdoor")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mjpg", ".mjpeg", ".avi", ".mpg", ".mpeg", ".mp4", ".mov", ".mkv", ".wmv")
MESH_EXTENSIONS = (".obj", ".ply", ".off", ".stl", ".wrl")
FIELDS = ("subject", "setting", "scan", "status", "error_mm", "rec_to_scan_mm", "scan_to_rec_mm",
          "p2p_mm", "scale", "icp_iterations", "init_yaw_degrees", "frames", "reconstruction",
          "scan_file")

FLAGS = flags.FLAGS


def define_flags():
    """Flags of this binary; defined only when it runs, so importing the module (tests, other
    binaries) cannot collide with flags of the same name elsewhere."""
    flags.DEFINE_string("micc_dir", None, "MICC Florence root holding subject_NN/ folders.")
    flags.DEFINE_string("output_dir", None, "Where CSVs, table1.md, error maps (and fits) go.")
    flags.DEFINE_enum("method", "fit", ["fit", "precomputed"],
                      "fit: ganfit_jax.fitting.fit_frames on the sampled frames; precomputed: read "
                      "--reconstructions_dir/subject_NN/SETTING.obj.")
    flags.DEFINE_string("reconstructions_dir", None, "For --method=precomputed.")
    flags.DEFINE_string("model", None, "3DMM file (morphable.load) for --method=fit; for "
                        "precomputed meshes in the model's topology it supplies the nose tip "
                        "vertex and landmark vertices.")
    flags.DEFINE_list("settings", list(SETTINGS), "Video settings to evaluate.")
    flags.DEFINE_list("scans", ["frontal1"],
                      "Scans under Model/ to compare against (min over them).")
    flags.DEFINE_list("subjects", [],
                      "Only these subjects (e.g. subject_01,subject_02); default all.")
    flags.DEFINE_integer("frames_per_video", 5, "Frames sampled uniformly per video (paper: 5).",
                         lower_bound=1)
    flags.DEFINE_float("crop_radius", ev.DEFAULT_CROP_RADIUS_MM,
                       "Crop radius around the nose tip, mm.")
    flags.DEFINE_enum("distance", "plane", list(ev.DISTANCES),
                      "plane: nearest-vertex tangent plane; surface: exact point-to-surface; "
                      "point: nearest vertex.")
    flags.DEFINE_enum("icp_method", "plane", ["plane", "point"], "ICP residual.")
    flags.DEFINE_bool("icp_scale", False, "Let ICP scale the reconstruction (the paper: rigid).")
    flags.DEFINE_float("max_correspondence_mm", 0.0,
                       "ICP ignores pairs farther apart than this (0: keep all), e.g. where the "
                       "scan has hair or neck the reconstruction lacks.", lower_bound=0.0)
    flags.DEFINE_float("scan_scale", 1.0, "Multiplies scan coordinates to give millimetres.")
    flags.DEFINE_list("scan_forward", ["0", "0", "1"], "Direction the scanned face looks.")
    flags.DEFINE_list("init_yaw_degrees", ["0", "-20", "20"],
                      "Yaw angles tried for the nose-tip initial alignment (best ICP result wins).")
    flags.DEFINE_integer("reconstruction_nose_vertex", -1,
                         "Nose-tip vertex of the reconstructions; -1: the model's iBUG-31 landmark "
                         "if --model is given, else evaluation.find_nose_tip.")
    flags.DEFINE_string("scan_landmarks_dir", None,
                        "Optional 68x3 scan landmarks, subject_NN[_SCAN].{npy,txt,ljson}.")
    flags.DEFINE_enum("landmark_mode", "similarity", ["similarity", "rigid"],
                      "Landmark initial alignment (with --scan_landmarks_dir).")
    flags.DEFINE_bool("error_maps", True, "Write per-vertex error map PNGs.")
    flags.DEFINE_float("error_map_vmax", 4.0, "Top of the error-map colour scale, mm.")
    flags.DEFINE_integer("error_map_size", 256, "Pixels per error-map view.", lower_bound=16)
    flags.DEFINE_integer("seed", 0, "PRNG seed passed to the fitting.")
    flags.DEFINE_string("fit_kwargs", "{}", "JSON object of extra keyword arguments for "
                        "fitting.fit_frames (e.g. checkpoint paths, iteration counts).")
    flags.DEFINE_bool("overwrite", False, "Re-evaluate subjects that already have a CSV.")
    common.require_positive("crop_radius", "error_map_vmax", "scan_scale")


# ---------------------------------------------------------------------------------------------
# Layout discovery
# ---------------------------------------------------------------------------------------------


def _natural_key(name):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def find_subjects(micc_dir, only=()):
    if not os.path.isdir(micc_dir):
        raise FileNotFoundError(f"--micc_dir {micc_dir}: no such directory")
    names = sorted((n for n in os.listdir(micc_dir) if re.fullmatch(r"subject_\d+", n)
                    and os.path.isdir(os.path.join(micc_dir, n))), key=_natural_key)
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise FileNotFoundError(f"--subjects {missing} not found in {micc_dir}")
        names = [n for n in names if n in set(only)]
    if not names:
        raise FileNotFoundError(f"{micc_dir}: no subject_NN/ folders (MICC Florence layout)")
    return names


def find_scan(subject_dir, scan="frontal1"):
    """The scan file of Model/SCAN: obj/*.obj first, else any *.wrl below Model/SCAN/."""
    base = os.path.join(subject_dir, "Model", scan)
    obj_dir = os.path.join(base, "obj")
    if os.path.isdir(obj_dir):
        objs = sorted(f for f in os.listdir(obj_dir) if f.lower().endswith(".obj"))
        if objs:
            return os.path.join(obj_dir, objs[0])
    wrls = []
    for root, _, files in os.walk(base):
        wrls += [os.path.join(root, f) for f in files if f.lower().endswith((".wrl", ".vrml"))]
    if wrls:
        return sorted(wrls)[0]
    raise FileNotFoundError(f"{base}: no scan (looked for obj/*.obj and **/*.wrl)")


def find_video(subject_dir, setting):
    """Video/SETTING/ (a folder of frames) or Video/SETTING.<video extension>."""
    video_dir = os.path.join(subject_dir, "Video")
    folder = os.path.join(video_dir, setting)
    if os.path.isdir(folder):
        return folder
    if os.path.isdir(video_dir):
        for name in sorted(os.listdir(video_dir)):
            stem, ext = os.path.splitext(name)
            if stem == setting and ext.lower() in VIDEO_EXTENSIONS:
                return os.path.join(video_dir, name)
    raise FileNotFoundError(f"{video_dir}: no video {setting}.* ({', '.join(VIDEO_EXTENSIONS)}) "
                            f"and no frame folder {setting}/")


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


def uniform_indices(count, k):
    """k frame indices at the centres of k equal segments of [0, count)."""
    if count <= 0:
        raise ValueError("the video has no frames")
    if count <= k:
        return list(range(count))
    return [int((j + 0.5) * count / k) for j in range(k)]


def _jpeg_end(data, start):
    """End offset of the JPEG starting at `start` (marker walk, so embedded thumbnails and
    0xFFD9 bytes inside segments are skipped), or None if truncated."""
    i, n = start + 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        while i + 1 < n and data[i + 1] == 0xFF:  # fill bytes
            i += 1
        if i + 1 >= n:
            return None
        marker = data[i + 1]
        if marker == 0xD9:
            return i + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if i + 4 > n:
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:  # entropy-coded data runs to the next non-stuffed, non-RST marker
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return None
                nxt = data[i + 1]
                if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
                    i += 2
                    continue
                break
    return None


def mjpeg_frames(path):
    """(start, end) byte spans of the JPEG frames of a raw or AVI-wrapped motion-JPEG file."""
    with open(path, "rb") as f:
        data = f.read()
    spans, pos = [], 0
    while True:
        start = data.find(b"\xff\xd8\xff", pos)
        if start < 0:
            break
        end = _jpeg_end(data, start)
        if end is None:
            break
        spans.append((start, end))
        pos = end
    return data, spans


def _to_float_image(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return (img[..., :3].astype(np.float32) / 255.0)


def sample_frames(source, k=5):
    """k uniformly sampled frames (float32 H×W×3 in [0,1]) of a frame folder or video file,
    and their indices."""
    from PIL import Image

    if os.path.isdir(source):
        names = sorted((f for f in os.listdir(source) if f.lower().endswith(IMAGE_EXTENSIONS)),
                       key=_natural_key)
        if not names:
            raise FileNotFoundError(f"{source}: no frame images ({', '.join(IMAGE_EXTENSIONS)})")
        idx = uniform_indices(len(names), k)
        return [_to_float_image(Image.open(os.path.join(source, names[i]))) for i in idx], idx
    import io

    if source.lower().endswith((".mjpg", ".mjpeg", ".avi")):
        data, spans = mjpeg_frames(source)
        if spans:
            idx = uniform_indices(len(spans), k)
            return [_to_float_image(Image.open(io.BytesIO(data[slice(*spans[i])])))
                    for i in idx], idx
    from ganfit_jax import optional

    try:  # PyAV for codecs other than motion JPEG
        av = optional.require("av", "video", f"{source}: not motion JPEG; decoding it")
    except optional.MissingDependency as e:
        raise optional.MissingDependency(f"{e}; or extract its frames into a folder of the same "
                                         "name (ffmpeg -i VIDEO DIR/%05d.png)") from None
    with av.open(source) as container:
        frames = [inputs.upright_frame(f, source) for f in container.decode(video=0)]
    idx = uniform_indices(len(frames), k)
    return [_to_float_image(frames[i]) for i in idx], idx


# ---------------------------------------------------------------------------------------------
# Reconstruction methods
# ---------------------------------------------------------------------------------------------


def _reconstruction_vertices(result):
    """Accepts what fit_frames may return: (N,3) vertices, a dict or an object with them."""
    if isinstance(result, dict):
        result = result.get("vertices", result.get("mesh"))
    elif hasattr(result, "vertices"):
        result = result.vertices
    verts = np.asarray(result, np.float64)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"fit_frames returned {type(result).__name__} of shape {verts.shape}; "
                         "expected (N,3) vertices or something holding them")
    return verts


def make_fit_method(model, seed, save_dir, fit_kwargs=None):
    """Reconstruct with ganfit_jax.fitting.fit_frames(frames, model=..., seed=..., **fit_kwargs).

    frames: list of float32 H×W×3 images in [0,1] (the sampled video frames, one person);
    the result: (N,3) vertices in mm in the model's topology, or a dict/object holding
    `vertices`. The mesh is saved as reconstructions/subject_NN/SETTING.obj.
    """
    try:
        from ganfit_jax import fitting
    except ImportError as e:
        raise ValueError(f"--method=fit needs ganfit_jax.fitting ({e}); use "
                         "--method=precomputed with --reconstructions_dir") from None
    if not hasattr(fitting, "fit_frames"):
        raise ValueError("--method=fit needs ganfit_jax.fitting.fit_frames(frames, model=, seed=) "
                         "(multi-frame fitting, Eq. 13), which this checkout lacks; use "
                         "--method=precomputed with --reconstructions_dir")
    triangles = np.asarray(model.triangles, np.int64)

    def reconstruct(subject, setting, load_frames):
        frames, idx = load_frames()
        verts = _reconstruction_vertices(
            fitting.fit_frames(frames, model=model, seed=seed, **(fit_kwargs or {})))
        path = os.path.join(save_dir, subject, f"{setting}.obj")
        write_obj(path, verts, triangles)
        return verts, triangles, idx, path

    return reconstruct


def make_precomputed_method(directory):
    if not directory or not os.path.isdir(directory):
        raise FileNotFoundError(f"--reconstructions_dir {directory}: no such directory "
                                "(expected DIR/subject_NN/SETTING.obj)")

    def reconstruct(subject, setting, load_frames):
        for ext in MESH_EXTENSIONS:
            path = os.path.join(directory, subject, setting + ext)
            if os.path.exists(path):
                verts, tris = ev.load_mesh(path)
                return verts, tris, [], path
        raise FileNotFoundError(f"{os.path.join(directory, subject)}: no {setting}"
                                f"{{{','.join(MESH_EXTENSIONS)}}}")

    return reconstruct


def write_obj(path, vertices, triangles):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(f"v {x:.6f} {y:.6f} {z:.6f}\n" for x, y, z in vertices)
        f.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in triangles)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Scan landmarks (optional)
# ---------------------------------------------------------------------------------------------


def load_scan_landmarks(directory, subject, scan):
    """68×3 landmarks from subject_NN_SCAN.* or subject_NN.* (.npy, whitespace .txt, .ljson)."""
    if not directory:
        return None
    for stem in (f"{subject}_{scan}", subject):
        for ext in (".npy", ".txt", ".ljson"):
            path = os.path.join(directory, stem + ext)
            if not os.path.exists(path):
                continue
            if ext == ".npy":
                pts = np.load(path)
            elif ext == ".txt":
                pts = np.loadtxt(path)
            else:
                with open(path) as f:
                    pts = np.asarray(json.load(f)["landmarks"]["points"], np.float64)
            pts = np.asarray(pts, np.float64)
            if pts.shape != (68, 3):
                raise ValueError(f"{path}: expected 68x3 landmarks, got {pts.shape}")
            return pts
    return None


# ---------------------------------------------------------------------------------------------
# Evaluation loop
# ---------------------------------------------------------------------------------------------


def _yaw(degrees, centre):
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return ev.Similarity(1.0, rot, centre - rot @ centre)


def evaluate_pair(rec_v, rec_t, scan_v, scan_t, *, rec_nose, rec_landmarks, scan_landmarks,
                  yaws, radius, distance, icp_method, icp_scale, landmark_mode, forward,
                  max_correspondence=None):
    """Best evaluation over the initial alignments tried; returns (Evaluation, yaw or nan)."""
    common = dict(radius=radius, kind=distance, icp_method=icp_method, icp_scale=icp_scale,
                  forward=forward, max_correspondence_distance=max_correspondence)
    if scan_landmarks is not None and rec_landmarks is not None:
        return ev.evaluate(rec_v, rec_t, scan_v, scan_t, reconstruction_landmarks=rec_landmarks,
                           scan_landmarks=scan_landmarks, landmark_mode=landmark_mode,
                           **common), float("nan")
    scan_nose = ev.find_nose_tip(scan_v, forward)
    if rec_nose is None:
        rec_nose = ev.find_nose_tip(rec_v, forward)
    best = None
    for yaw in yaws:
        # rotating the reconstruction about its own nose tip leaves the nose-tip pairing intact
        turned = _yaw(yaw, rec_v[rec_nose])(rec_v)
        result = ev.evaluate(turned, rec_t, scan_v, scan_t, scan_nose=scan_nose,
                             reconstruction_nose=rec_nose, **common)
        if best is None or result.error < best[0].error:
            total = _yaw(yaw, rec_v[rec_nose]).then(result.transform)
            best = (dataclasses.replace(result, transform=total), yaw)
    return best


def _fmt(x):
    return "" if x is None else (f"{x:.6f}" if isinstance(x, float) else str(x))


def evaluate_subject(micc_dir, subject, reconstruct, cfg, error_map_dir=None):
    """All rows (dicts of FIELDS) of one subject."""
    subject_dir = os.path.join(micc_dir, subject)
    scans = {}
    for scan in cfg["scans"]:
        try:
            path = find_scan(subject_dir, scan)
        except FileNotFoundError as e:
            logging.warning("%s", e)
            continue
        v, t = ev.load_mesh(path)
        scans[scan] = (path, v * cfg["scan_scale"], t)
    rows = []
    for setting in cfg["settings"]:
        def load_frames(setting=setting):
            return sample_frames(find_video(subject_dir, setting), cfg["frames_per_video"])

        base = dict(subject=subject, setting=setting)
        if not scans:
            rows.append({**base, "status": "no scan"})
            continue
        try:
            rec_v, rec_t, frame_idx, rec_path = reconstruct(subject, setting, load_frames)
        except FileNotFoundError as e:
            logging.warning("%s %s: %s", subject, setting, e)
            rows.append({**base, "status": f"missing: {e}"})
            continue
        rec_nose = cfg["rec_nose"]
        if rec_nose is None and len(rec_v) == cfg["num_model_vertices"]:
            rec_nose = cfg["model_nose"]
        if rec_nose is not None and rec_nose >= len(rec_v):
            raise ValueError(f"{rec_path}: nose vertex {rec_nose} but only {len(rec_v)} vertices; "
                             "set --reconstruction_nose_vertex or --model for this topology")
        rec_lms = None
        if cfg["landmark_indices"] is not None and len(rec_v) == cfg["num_model_vertices"]:
            li = cfg["landmark_indices"]
            rec_lms = np.where((li >= 0)[:, None], rec_v[np.maximum(li, 0)], np.nan)
        for scan, (scan_path, scan_v, scan_t) in scans.items():
            result, yaw = evaluate_pair(
                rec_v, rec_t, scan_v, scan_t, rec_nose=rec_nose, rec_landmarks=rec_lms,
                scan_landmarks=load_scan_landmarks(cfg["scan_landmarks_dir"], subject, scan),
                yaws=cfg["yaws"], radius=cfg["radius"], distance=cfg["distance"],
                icp_method=cfg["icp_method"], icp_scale=cfg["icp_scale"],
                landmark_mode=cfg["landmark_mode"], forward=cfg["forward"],
                max_correspondence=cfg.get("max_correspondence"))
            rows.append({**base, "scan": scan, "status": "ok", **result.as_row(),
                         "init_yaw_degrees": yaw, "frames": " ".join(map(str, frame_idx)),
                         "reconstruction": rec_path, "scan_file": scan_path})
            logging.info("%s %-18s %s: %.3f mm (rec->scan %.3f, scan->rec %.3f)", subject,
                         setting, scan, result.error, result.reconstruction_to_scan,
                         result.scan_to_reconstruction)
            if error_map_dir:
                from PIL import Image

                image = ev.render_error_map(result.reconstruction_crop.vertices,
                                            result.reconstruction_crop.triangles,
                                            result.reconstruction_errors,
                                            vmax=cfg["error_map_vmax"],
                                            image_size=cfg["error_map_size"])
                os.makedirs(os.path.join(error_map_dir, subject), exist_ok=True)
                Image.fromarray(ev.to_uint8(image)).save(
                    os.path.join(error_map_dir, subject, f"{setting}_{scan}.png"))
    return rows


def write_rows(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in FIELDS})
    os.replace(tmp, path)  # a subject's CSV exists only once it is complete


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(rows, settings):
    """Per setting: the subjects' errors (min over scans), their mean and std."""
    per = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["setting"], row["subject"])
        per[key] = min(per.get(key, np.inf), float(row["error_mm"]))
    table = {}
    for setting in settings:
        errors = np.array([e for (s, _), e in per.items() if s == setting])
        missing = sum(1 for r in rows if r.get("setting") == setting and r.get("status") != "ok")
        table[setting] = dict(n=len(errors), missing=missing,
                              mean=float(errors.mean()) if errors.size else float("nan"),
                              std=float(errors.std()) if errors.size else float("nan"))
    return table


def markdown_table(table, cfg):
    lines = [
        "# MICC Florence: symmetric distance after ICP (GANFIT Table 1 protocol)",
        "",
        f"Distance `{cfg['distance']}`, crop {cfg['radius']:g} mm around the nose tip, ICP "
        f"`{cfg['icp_method']}`{' with scale' if cfg['icp_scale'] else ' (rigid)'}, "
        f"{cfg['frames_per_video']} frames per video, scans {', '.join(cfg['scans'])} "
        "(min over scans), method `" + cfg["method"] + "`. Mean ± std over subjects, mm.",
        "",
        "| setting | subjects | mean ± std (mm) | missing |",
        "|---|---|---|---|",
    ]
    for setting, s in table.items():
        lines.append(f"| {setting} | {s['n']} | {s['mean']:.2f} ± {s['std']:.2f} | "
                     f"{s['missing']} |")
    return "\n".join(lines) + "\n"


def run(cfg, reconstruct):
    """Evaluates every subject not yet done; returns the summary table."""
    out = cfg["output_dir"]
    per_subject = os.path.join(out, "per_subject")
    subjects = find_subjects(cfg["micc_dir"], cfg["subjects"])  # before any folder is made
    os.makedirs(per_subject, exist_ok=True)
    error_map_dir = os.path.join(out, "error_maps") if cfg["error_maps"] else None
    for subject in subjects:
        path = os.path.join(per_subject, f"{subject}.csv")
        if os.path.exists(path) and not cfg["overwrite"]:
            logging.info("%s: done already (%s), skipping", subject, path)
            continue
        write_rows(path, evaluate_subject(cfg["micc_dir"], subject, reconstruct, cfg,
                                          error_map_dir))
    rows = []
    for subject in subjects:
        path = os.path.join(per_subject, f"{subject}.csv")
        if os.path.exists(path):
            rows += read_rows(path)
    write_rows(os.path.join(out, "results.csv"), rows)
    table = summarise(rows, cfg["settings"])
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write(markdown_table(table, cfg))
    with open(os.path.join(out, "table1.json"), "w") as f:
        json.dump(table, f, indent=1)
    return table


def config_from_flags():
    for name in ("micc_dir", "output_dir"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")
    unknown = [s for s in FLAGS.settings if s not in SETTINGS]
    if unknown:
        logging.warning("settings %s are not MICC's %s; looking for them anyway", unknown,
                        SETTINGS)
    forward = np.asarray([float(x) for x in FLAGS.scan_forward])
    if forward.shape != (3,) or not np.linalg.norm(forward) > 0:
        raise ValueError(f"--scan_forward: expected 3 numbers, got {FLAGS.scan_forward}")
    model = None
    if FLAGS.model:
        from ganfit_jax import morphable

        model = morphable.load(FLAGS.model)
    rec_nose = FLAGS.reconstruction_nose_vertex if FLAGS.reconstruction_nose_vertex >= 0 else None
    landmark_indices = model_nose = None
    if model is not None:
        landmark_indices = np.asarray(model.landmark_indices)
        if landmark_indices[ev.NOSE_TIP_IBUG] >= 0:
            model_nose = int(landmark_indices[ev.NOSE_TIP_IBUG])
    cfg = dict(micc_dir=FLAGS.micc_dir, output_dir=FLAGS.output_dir, method=FLAGS.method,
               settings=list(FLAGS.settings), scans=list(FLAGS.scans),
               subjects=list(FLAGS.subjects), frames_per_video=FLAGS.frames_per_video,
               radius=FLAGS.crop_radius, distance=FLAGS.distance, icp_method=FLAGS.icp_method,
               icp_scale=FLAGS.icp_scale, scan_scale=FLAGS.scan_scale, forward=forward,
               max_correspondence=FLAGS.max_correspondence_mm or None,
               yaws=[float(y) for y in FLAGS.init_yaw_degrees] or [0.0], rec_nose=rec_nose,
               model_nose=model_nose, error_map_size=FLAGS.error_map_size,
               landmark_indices=landmark_indices,
               num_model_vertices=None if model is None else model.num_vertices,
               scan_landmarks_dir=FLAGS.scan_landmarks_dir, landmark_mode=FLAGS.landmark_mode,
               error_maps=FLAGS.error_maps, error_map_vmax=FLAGS.error_map_vmax,
               overwrite=FLAGS.overwrite)
    if FLAGS.method == "fit":
        if model is None:
            raise ValueError("--method=fit needs --model (a 3DMM file for morphable.load)")
        try:
            fit_kwargs = json.loads(FLAGS.fit_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--fit_kwargs: not a JSON object ({e})") from None
        if not isinstance(fit_kwargs, dict):
            raise ValueError(f"--fit_kwargs: expected a JSON object, got {FLAGS.fit_kwargs!r}")
        reconstruct = make_fit_method(model, FLAGS.seed,
                                      os.path.join(FLAGS.output_dir, "reconstructions"), fit_kwargs)
    else:
        reconstruct = make_precomputed_method(FLAGS.reconstructions_dir)
    return cfg, reconstruct


def main(argv):
    del argv
    cfg, reconstruct = config_from_flags()
    table = run(cfg, reconstruct)
    sys.stdout.write(markdown_table(table, cfg))


if __name__ == "__main__":
    define_flags()
    app.run(common.input_errors_as_one_line(main))
