"""Loader for a folder of UV maps with optional observation masks.

Layout (what experiments/build_uv_dataset.py writes): `NAME.png` (or .jpg/.jpeg) is a UV map,
`NAME_mask.png` beside it a greyscale mask read as a per-texel weight in [0, 1]: white = seen in
the photo, build_uv_dataset's grey 128 = filled from the mirror texel (weight ~0.5, which the PCA
builder still counts as observed and the GAN's discriminator sees at half weight), black =
unobserved. A map without a mask is fully observed.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

_EXTENSIONS = (".png", ".jpg", ".jpeg")
MASK_SUFFIX = "_mask"


def list_uv_maps(directory):
    """Sorted (name, image path, mask path or None) for every UV map in `directory`."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"UV map folder {directory} does not exist")
    entries = []
    for fname in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(fname)
        if ext.lower() not in _EXTENSIONS or stem.endswith(MASK_SUFFIX):
            continue
        mask = os.path.join(directory, stem + MASK_SUFFIX + ".png")
        entries.append((stem, os.path.join(directory, fname), mask if os.path.isfile(mask) else None))
    if not entries:
        raise FileNotFoundError(f"UV map folder {directory} holds no .png/.jpg UV maps "
                                f"(expected NAME.png and optional NAME{MASK_SUFFIX}.png)")
    return entries


def load_uv_folder(directory, resolution: int):
    """Load every UV map of `directory`, resized to resolution x resolution.

    Returns (names, images (n, R, R, 3) float32 in [0, 1], masks (n, R, R, 1) float32 in [0, 1]).
    Images are box-filtered; masks are box-filtered too, so a mask value is the observed fraction
    of the texel's footprint. Texels with mask 0 get 0 colour (callers must not rely on them).
    """
    if not (isinstance(resolution, int) and resolution >= 1):
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    names, images, masks = [], [], []
    for name, path, mask_path in list_uv_maps(directory):
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((resolution, resolution), Image.Resampling.BOX)
        except OSError as e:
            raise ValueError(f"{path}: cannot read as an image ({e})") from e
        if mask_path is not None:
            with Image.open(mask_path) as im:
                m = im.convert("L").resize((resolution, resolution), Image.Resampling.BOX)
            m = np.asarray(m, np.float32)[..., None] / 255.0
        else:
            m = np.ones((resolution, resolution, 1), np.float32)
        names.append(name)
        images.append(np.asarray(rgb, np.float32) / 255.0 * (m > 0))
        masks.append(m)
    return names, np.stack(images), np.stack(masks)
