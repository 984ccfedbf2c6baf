"""`benchmark load`: how fast the batch loader prepares photos (decode, EXIF turn, dlib
detection, 68 points, the working crop), per loader thread count and detection size.

A batch fit keeps its device busy only while the loader prepares photos at least as fast as the
device fits them (`fit --images`: `inputs.prefetch_map` in `--loader_threads` threads). This
times that work alone over a folder, with landmarks always detected (sibling landmark files
ignored), so its photos/s can be set beside `benchmark fit`'s images_per_second. 'reduced'
searches faces at `landmarks.DETECTION_MAX_SIDE` pixels (what `fit` does); 'full' searches the
whole image, the peer that shows what the reduced search saves on large photos.
"""

from __future__ import annotations

import time

from ganfit_jax import inputs, landmarks

DETECTION_SIDES = {"reduced": landmarks.DETECTION_MAX_SIDE, "full": None}


def load_photo(path, size, max_side):
    """A photo → its working crop, as `fit --images` prepares it (landmarks detected)."""
    image = landmarks.load_image(path)
    points = landmarks.detect_landmarks(image, name=str(path), max_side=max_side)
    crop, _, _ = inputs.crop_face(image, points, size)
    return crop


def megapixels(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size[0] * im.size[1] / 1e6


def bench_load(paths, threads, detections, size=224):
    """One row per (detection, thread count): photos prepared, failures (no face), wall time and
    photos/s; `speedup_vs_full` where the 'full' row of that thread count ran too."""
    unknown = [d for d in detections if d not in DETECTION_SIDES]
    if unknown:
        raise ValueError(f"--detection: unknown {unknown}; known: {list(DETECTION_SIDES)}")
    try:  # dlib's models are loaded by the first detection: not in the first row's time
        load_photo(paths[0], size, DETECTION_SIDES["reduced"])
    except ValueError:
        pass
    mean_mp = sum(megapixels(p) for p in paths) / len(paths)
    rows = []
    for detection in detections:
        for count in threads:
            start = time.perf_counter()
            failed = sum(isinstance(result, Exception) for _, result in inputs.prefetch_map(
                lambda p: load_photo(p, size, DETECTION_SIDES[detection]), paths,
                workers=count, ahead=2 * count + 2))
            seconds = time.perf_counter() - start
            rows.append(dict(case="load", detection=detection, threads=count,
                             photos=len(paths), failed=failed,
                             mean_megapixels=round(mean_mp, 2), seconds=round(seconds, 3),
                             photos_per_second=round(len(paths) / seconds, 2)))
    full = {r["threads"]: r["seconds"] for r in rows if r["detection"] == "full"}
    for row in rows:
        if row["detection"] != "full" and row["threads"] in full:
            row["speedup_vs_full"] = round(full[row["threads"]] / row["seconds"], 2)
    return rows
