"""From a photo of any size to the working crop around the face, and back.

The fitting runs at a fixed working resolution (static shapes for jit). The crop is a square
around the 68 landmarks, scaled to `size`; its similarity transform is kept so that results
(overlays, landmarks) map back onto the original photo. NumPy + Pillow, outside jit.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from ganfit_jax import optional


@dataclasses.dataclass(frozen=True)
class CropTransform:
    """crop pixel = scale * (original pixel − origin); continuous coordinates, centres at +0.5."""

    origin: tuple  # (x, y) of the crop's top-left corner in the original photo
    scale: float   # crop pixels per original pixel
    size: int      # the crop is size × size
    original_hw: tuple

    def to_crop(self, points):
        return (np.asarray(points, np.float64) - np.asarray(self.origin)) * self.scale

    def to_original(self, points):
        return np.asarray(points, np.float64) / self.scale + np.asarray(self.origin)

    def intrinsics_to_original(self, intrinsics):
        """An OpenCV camera matrix (3,3) of the crop → the same camera in the photo's pixels
        (OpenCV's convention on both sides: pixel (0, 0)'s centre at (0, 0))."""
        (ox, oy), s = self.origin, self.scale
        # OpenCV crop pixel + 0.5 → ours; / scale + origin → the photo; − 0.5 → OpenCV's
        back = np.array([[1 / s, 0, 0.5 / s + ox - 0.5], [0, 1 / s, 0.5 / s + oy - 0.5],
                         [0, 0, 1]], np.float64)
        return back @ np.asarray(intrinsics, np.float64)


def face_box(landmarks, margin=1.6):
    """A square (x0, y0, side) centred on the landmarks' box, `margin` times its larger side:
    room for the forehead (the iBUG points stop at the brows) and the jaw."""
    pts = np.asarray(landmarks, np.float64)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 3:
        raise ValueError("landmarks: need at least 3 finite points to place the face crop")
    lo, hi = pts.min(0), pts.max(0)
    centre = 0.5 * (lo + hi)
    centre[1] -= 0.1 * (hi[1] - lo[1])  # shift up: the brows are not the top of the head
    side = margin * float(max(hi - lo))
    return centre[0] - side / 2, centre[1] - side / 2, side


def crop_face(image, landmarks, size=224, margin=1.6):
    """Returns (crop (size,size,3) float32, landmarks in crop pixels (68,2), CropTransform).

    Parts of the square outside the photo are filled by edge replication, which keeps the
    pixel loss from seeing an artificial black border as "skin"."""
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    x0, y0, side = face_box(landmarks, margin)
    points = np.asarray(landmarks, np.float64)
    inside = (points[:, 0] >= 0) & (points[:, 0] <= w) & (points[:, 1] >= 0) & (points[:, 1] <= h)
    if not inside.any():  # edge replication would make a "face" of border pixels
        raise ValueError(f"landmarks: none of the points lies inside the {w}×{h} image "
                         "(landmarks of another image, or of another size of it?)")
    transform = CropTransform(origin=(x0, y0), scale=size / side, size=size, original_hw=(h, w))
    return crop_square(image, transform), transform.to_crop(landmarks).astype(np.float32), \
        transform


def crop_square(image, transform: CropTransform, size=None):
    """The photo's square of `transform` resampled to size × size (default: the transform's own
    working size; another size gives the same square at another resolution, e.g. the face at
    its own resolution in the photo). Parts outside the photo are edge-replicated."""
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    size = transform.size if size is None else int(size)
    x0, y0 = transform.origin
    side = transform.size / transform.scale
    # Only the square and the bilinear filter's reach around it (widened by the downscale) are
    # read: padding and converting a whole 12 MP photo took ~3 s of a loader thread.
    reach = side / size + 2.0
    left, top = int(np.floor(x0 - reach)), int(np.floor(y0 - reach))
    right, bottom = int(np.ceil(x0 + side + reach)), int(np.ceil(y0 + side + reach))
    rows = np.clip(np.arange(top, bottom), 0, h - 1)  # clamped indices: edge replication
    cols = np.clip(np.arange(left, right), 0, w - 1)
    window = image[rows[:, None], cols[None, :]]
    pil = Image.fromarray(np.clip(window * 255.0 + 0.5, 0, 255).astype(np.uint8))
    box = (x0 - left, y0 - top, x0 - left + side, y0 - top + side)
    crop = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(crop, np.float32) / 255.0


def inside_photo(transform: CropTransform, size=None):
    """(size, size) bool: the pixels of `crop_square`'s square (at `size`, default the
    transform's) whose centres lie in the photo; the rest is edge replication, which the fit
    needs (no black border for the pixel loss to explain) but a viewer should not take for the
    photo."""
    size = transform.size if size is None else int(size)
    centres = (np.arange(size) + 0.5) * (transform.size / size)  # the transform's crop pixels
    x, y = transform.to_original(np.stack([centres, centres], axis=1)).T
    h, w = transform.original_hw
    return ((y >= 0) & (y < h))[:, None] & ((x >= 0) & (x < w))[None, :]


# face-parsing.PyTorch's CelebAMask-HQ classes (0 background, 1 skin, 2-3 brows, 4-5 eyes,
# 6 glasses, 7-9 ears and earrings, 10 nose, 11 mouth, 12-13 lips, 14-15 neck and necklace,
# 16 cloth, 17 hair, 18 hat): the face the model's texture describes, without glasses, hair or
# ears, as DECA and Deep3DFaceRecon mask their photometric losses.
CELEBAMASK_FACE_LABELS = (1, 2, 3, 4, 5, 10, 11, 12, 13)


def load_pixel_weight(path, hw, labels=None):
    """A face mask file → the photo's pixel weights (H,W) float32 in [0, 1]: which pixels the
    pixel loss (Eq. 10) compares (`fitting.Target.pixel_weight`): 1 on the face, 0 on what
    covers it (hair, hands, glasses) and the background.

    `path`: .npy, or an image pillow reads with one channel (or equal channels), in the upright
    photo's pixels at its size `hw`. Without `labels` its values are weights: 0/1, 0/255 (0/65535
    for 16 bits) or floats in [0, 1]. With `labels` it is a label map (a face parser's output):
    weight 1 where the label is one of `labels` (a sequence of ints), 'celebamask'
    (CELEBAMASK_FACE_LABELS) or 'nonzero' (any label but 0)."""
    import pathlib

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face mask {path} does not exist")
    full_scale = 1.0
    if path.suffix.lower() == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"face mask {path}: not a readable .npy file ({e})") from None
    else:
        from PIL import ImageOps, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                    rgb = np.asarray(im.convert("RGB"))
                    if np.any(rgb != rgb[..., :1]):
                        raise ValueError(f"face mask {path}: a colour image; expected one "
                                         "channel (a mask or a label map)")
                    raw = rgb[..., 0]
                else:  # 'L', 'P' (a label map's indices), '1', 16- and 32-bit: values as stored
                    raw = np.asarray(im)
                full_scale = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0,
                              "I;16L": 65535.0, "RGB": 255.0, "RGBA": 255.0, "LA": 255.0,
                              "CMYK": 255.0, "YCbCr": 255.0}.get(im.mode, 1.0)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"face mask {path}: not an image pillow can read ({e})") from None
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.number) and raw.dtype != bool:
        raise ValueError(f"face mask {path}: expected one value per pixel (H, W), got shape "
                         f"{raw.shape} of {raw.dtype}")
    if raw.shape != tuple(hw):
        raise ValueError(f"face mask {path}: {raw.shape[1]}×{raw.shape[0]} pixels, the photo is "
                         f"{hw[1]}×{hw[0]} (a mask of the upright photo, at its size)")
    values = raw.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"face mask {path}: holds non-finite values")
    if labels is not None:
        if isinstance(labels, str):
            if labels not in ("celebamask", "nonzero"):
                raise ValueError(f"labels: expected integers, 'celebamask' or 'nonzero', got "
                                 f"{labels!r}")
            if labels == "nonzero":
                return (values != 0).astype(np.float32)
            labels = CELEBAMASK_FACE_LABELS
        return np.isin(np.rint(values), np.asarray(labels, np.float64)).astype(np.float32)
    levels = np.unique(values)
    if np.all(np.isin(levels, (0.0, 1.0))):
        return values.astype(np.float32)
    if full_scale > 1 and levels[-1] == full_scale and levels[0] >= 0:
        return (values / full_scale).astype(np.float32)
    if full_scale == 1 and levels[0] >= 0 and levels[-1] <= 1:
        return values.astype(np.float32)
    raise ValueError(f"face mask {path}: values {levels[0]:g}..{levels[-1]:g} in {len(levels)} "
                     "levels are not weights (0/1, 0/255 or floats in [0, 1]); a face parser's "
                     "label map? give its face labels (fit --mask_labels=celebamask for "
                     "CelebAMask-HQ's classes, a list such as 1,2,10, or nonzero)")


# iBUG-68 polygons of the parts of a face that are not skin-coloured but are the face's own
# texture (brows, eyes, lips): a skin-colour model must not take them for occluders
_FACE_PARTS = (tuple(range(17, 22)), tuple(range(22, 27)), tuple(range(36, 42)),
               tuple(range(42, 48)), tuple(range(48, 60)))
_JAW_AND_BROWS = tuple(range(0, 27))


def _convex_hull(points):
    """Andrew's monotone chain: the hull's vertices (K,2), counter-clockwise."""
    pts = sorted(map(tuple, np.asarray(points, np.float64)))
    if len(pts) < 3:
        return np.asarray(pts)

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out
    return np.asarray(half(pts)[:-1] + half(pts[::-1])[:-1])


def _polygon_mask(hw, polygon, grow=0.0):
    """Pixels (H,W) bool whose centre lies in the polygon (pixel coordinates, centres at +0.5),
    its outline drawn `grow` px wide too."""
    from PIL import ImageDraw

    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    xy = [(float(x) - 0.5, float(y) - 0.5) for x, y in polygon]
    if len(xy) >= 3:
        draw.polygon(xy, fill=255)
    if grow > 0 and len(xy) >= 2:
        draw.line(xy + xy[:1], fill=255, width=max(1, int(round(2 * grow))))
    return np.asarray(canvas) > 0


# skin_pixel_weight's floor under the chromaticity's spread: real faces here spread 0.006-0.037
# in r and g; a floor of 0.01 let brown hair and beige walls pass as skin
SKIN_CHROMA_STD = 0.004


def skin_pixel_weight(image, landmarks, inlier=9.0, outlier=16.0):
    """Pixel weights (H,W) in [0, 1] from the photo's own skin colour, where no face mask is
    given (fit --face_mask=skin): hair, glasses, a scarf or a microphone over the face are
    unlike its skin and weigh 0; skin, and the brows, eyes and lips the landmarks outline, weigh
    1. Occlusion handling by a skin model, as Deep3DFaceRecon's skin attention and Egger et al.'s
    occlusion-aware fitting do, estimated from this photo alone (no trained classifier): a robust
    Gaussian of the chromaticity (r, g) = (R, G)/(R + G + B), which shading does not change, of
    the pixels inside the jaw-and-brows hull less the face parts, refitted to its own inliers
    (squared Mahalanobis distance ≤ `inlier`) so that an occluder covering under half of the face
    does not bend it. The weight falls from 1 at `inlier` to 0 at `outlier` (χ² with 2 degrees of
    freedom: 98.9% and 99.97% of skin). What is skin-coloured (a hand) stays in, and so does
    whatever covers the brows, eyes or lips (they keep weight 1 whatever their colour, lipstick
    included): give a face parser's mask for those.

    Args:
      image: (H,W,3) in [0,1]; landmarks: (68,2) in its pixels (NaN where missing).
    """
    image = np.asarray(image, np.float64)
    landmarks = np.asarray(landmarks, np.float64)
    hw = image.shape[:2]
    ok = np.all(np.isfinite(landmarks), axis=1)
    outline = landmarks[list(_JAW_AND_BROWS)][ok[list(_JAW_AND_BROWS)]]
    if len(outline) < 3:
        return np.ones(hw, np.float32)  # nowhere to learn the skin from: every pixel counts
    parts = np.zeros(hw, bool)
    grow = 0.04 * max(float(np.ptp(outline[:, 0])), 1.0)  # a brow is a line: give it a width
    for part in _FACE_PARTS:
        pts = landmarks[list(part)][ok[list(part)]]
        parts |= _polygon_mask(hw, pts, grow)
    face = _polygon_mask(hw, _convex_hull(outline)) & ~parts
    total = np.maximum(image.sum(-1, keepdims=True), 1e-3)
    chroma = (image / total)[..., :2]
    samples = chroma[face]
    if len(samples) < 20:
        return np.ones(hw, np.float32)
    mean = np.median(samples, axis=0)
    spread = 1.4826 * np.median(np.abs(samples - mean), axis=0)
    cov = np.diag(np.maximum(spread, SKIN_CHROMA_STD) ** 2)
    for _ in range(5):
        d2 = _mahalanobis2(samples, mean, cov)
        inliers = samples[d2 <= inlier]
        if len(inliers) < 10:
            break
        mean = inliers.mean(0)
        # the inliers' covariance, widened for the χ² cut's truncation of the tails (≈ 1/0.95)
        # and by a floor a flat-coloured face (a render, heavy make-up) needs: there a
        # highlight's whiter chromaticity is still skin
        cov = np.cov(inliers.T) / 0.95 + np.eye(2) * SKIN_CHROMA_STD ** 2
    d2 = _mahalanobis2(chroma.reshape(-1, 2), mean, cov).reshape(hw)
    weight = np.clip((outlier - d2) / (outlier - inlier), 0.0, 1.0)
    return np.where(parts, 1.0, weight).astype(np.float32)


def _mahalanobis2(x, mean, cov):
    diff = x - mean
    return np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)


def crop_pixel_weight(weight, transform: CropTransform, size=None):
    """Photo pixel weights (H,W) → the working crop's (size, size), sampled as `crop_square`
    samples the photo (the same square, filter and edge replication; 8-bit steps)."""
    weight = np.asarray(weight, np.float32)
    return crop_square(np.repeat(weight[..., None], 3, axis=-1), transform, size)[..., 0]


def bilinear(image, xy):
    """Samples image (H,W,C) at continuous pixel coordinates xy (...,2), centres at +0.5,
    clamping at the border. NumPy, outside jit."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    x = np.clip(xy[..., 0] - 0.5, 0, w - 1)
    y = np.clip(xy[..., 1] - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    return ((1 - fx) * (1 - fy) * image[y0, x0] + fx * (1 - fy) * image[y0, x1]
            + (1 - fx) * fy * image[y1, x0] + fx * fy * image[y1, x1])


def square_window(transform: CropTransform, hw=None):
    """((top, bottom, left, right) of the photo's pixels whose centre may fall in the crop's
    square, those centres in crop pixels (K,2) row after row), or None when the square misses
    the photo (of `hw`, default the transform's). Only these pixels are touched: a 12 MP photo
    sampled whole took ~13 s for a face of a few hundred pixels."""
    h, w = transform.original_hw if hw is None else hw
    x0, y0 = transform.origin
    side = transform.size / transform.scale
    left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    right, bottom = min(w, int(np.ceil(x0 + side)) + 1), min(h, int(np.ceil(y0 + side)) + 1)
    if left >= right or top >= bottom:
        return None
    ys, xs = np.mgrid[top:bottom, left:right]
    return (top, bottom, left, right), transform.to_crop(
        np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1))


def paste_back(original, crop_image, crop_mask, transform: CropTransform):
    """Composites a crop-sized render (and its mask, or coverage) onto the original photo.

    The render is resampled premultiplied by its mask: interpolated on its own, a pixel at the
    face's edge mixed the face's colour with the background's (black, or whatever the render
    left there) before the mask's own interpolation weighed it again, and the face showed a
    dark outline in overlay.png."""
    original = np.asarray(original, np.float32)
    out = original.copy()
    window = square_window(transform, original.shape[:2])
    if window is None:
        return out
    (top, bottom, left, right), pts = window
    size = transform.size
    inside = ((pts[:, 0] >= 0) & (pts[:, 0] < size) & (pts[:, 1] >= 0) & (pts[:, 1] < size))
    mask = np.asarray(crop_mask, np.float32)[..., None]
    colour = bilinear(np.asarray(crop_image, np.float32) * mask, pts) * inside[:, None]
    alpha = bilinear(mask, pts) * inside[:, None]
    window = original[top:bottom, left:right].reshape(-1, 3)
    out[top:bottom, left:right] = (window * (1 - alpha) + colour).reshape(
        bottom - top, right - left, 3)
    return out


def map_to_original(crop_map, crop_mask, transform: CropTransform):
    """A per-pixel map of the crop's square (R,R,C) at any resolution R (depth, normals) → the
    photo's pixels (H,W,C), NaN where the map does not cover them.

    Each photo pixel takes the mean of the covered ones among its four bilinear neighbours,
    weighted as bilinear interpolation would, and is covered when their weight is at least half:
    a depth edge is never blended with the background (what `paste_back`'s alpha does to
    colours) and the covered area keeps its shape."""
    crop_map = np.asarray(crop_map, np.float64)
    if crop_map.ndim == 2:
        crop_map = crop_map[..., None]
    if crop_map.ndim != 3 or crop_map.shape[0] != crop_map.shape[1]:
        raise ValueError(f"crop_map: expected the crop's square, (R,R) or (R,R,C), got "
                         f"{np.shape(crop_map)}")
    if np.shape(crop_mask) != crop_map.shape[:2]:
        raise ValueError(f"crop_mask: expected {crop_map.shape[:2]} like crop_map, got "
                         f"{np.shape(crop_mask)}")
    mask = np.asarray(crop_mask, bool) & np.all(np.isfinite(crop_map), axis=-1)
    out = np.full(tuple(transform.original_hw) + crop_map.shape[-1:], np.nan, np.float32)
    window = square_window(transform)
    if window is None:
        return out
    (top, bottom, left, right), pts = window
    resolution = crop_map.shape[0]
    pts = pts * (resolution / transform.size)
    inside = np.all((pts >= 0) & (pts < resolution), axis=1)
    weight = bilinear(mask[..., None].astype(np.float64), pts)[:, 0] * inside
    total = bilinear(np.where(mask[..., None], crop_map, 0.0), pts)
    covered = weight >= 0.5
    values = np.full(total.shape, np.nan)
    values[covered] = total[covered] / weight[covered, None]
    out[top:bottom, left:right] = values.reshape(bottom - top, right - left, -1)
    return out


def prefetch_map(fn, items, workers=2, ahead=8):
    """Yields (item, fn(item) or the exception it raised) in order, computing up to `ahead`
    results in background threads: decoding, landmark detection and cropping of the next photos
    overlap the device's work on the current batch (Pillow and dlib release the GIL)."""
    import collections
    import concurrent.futures

    def safe(item):
        try:
            return fn(item)
        except Exception as e:  # handed to the caller, who reports and skips that item
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        iterator = iter(items)
        for item in iterator:
            pending.append((item, pool.submit(safe, item)))
            if len(pending) >= ahead:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(iterator, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(safe, nxt)))
            yield item, future.result()


# ------------------------------------------------------------------------------------------
# Video
# ------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(path)


def read_video_frames(path, step: int = 1, max_frames: int = 0):
    """Frames of a video file as [(index, float32 H×W×3 RGB in [0, 1])]: every `step`-th frame
    (indices count decoded frames from 0), at most `max_frames` of them (0: all). Decoded with
    PyAV (FFmpeg), so any container and codec FFmpeg reads, and turned as a player shows them
    (a phone's portrait clip is stored sideways with a rotation to apply: `upright_frame`)."""
    frames = list(iter_video_frames(path, step, max_frames))
    if not frames:
        raise ValueError(f"{path}: no frames decoded")
    return frames


def _video_stream_header(path, read):
    """`read(stream)` of the file's first video stream, or None where it has none, PyAV is
    missing or the file cannot be opened: what the container says, without decoding."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(path)) as container:
            streams = container.streams.video
            return read(streams[0]) if streams else None
    except av.error.FFmpegError:
        return None


def video_frame_count(path):
    """How many frames the container says its video stream holds, or None where it does not
    say (some containers and codecs leave it 0) or the file cannot be opened. The header's
    word, not a decode: for progress and ETA, never to decide which frames exist."""
    return _video_stream_header(path, lambda stream: stream.frames or None)


def video_frame_rate(path):
    """Frames per second of the video stream as its container gives it (average rate), or None
    where it does not say or the file cannot be opened."""
    return _video_stream_header(
        path, lambda stream: float(stream.average_rate) if stream.average_rate else None)


def display_matrix(frame):
    """A decoded PyAV frame's display matrix (3×3, FFmpeg's layout: x' = a x + c y, y' = b x + d
    y in pixel coordinates, with a, b = m[0, :2] and c, d = m[1, :2]), or None when it has none."""
    import av

    data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if data is None:
        return None
    return np.frombuffer(bytes(data), dtype="<i4").reshape(3, 3) / 65536.0


def apply_display_matrix(pixels, matrix, path="video"):
    """Pixels (H×W×C) as a player shows them under `matrix` (`display_matrix`): phones record
    portrait video as landscape frames plus a 90° rotation (and sometimes a mirror) to apply on
    display. Only quarter turns and mirrors exist in the wild; any other matrix is refused
    rather than shown skewed."""
    if matrix is None:
        return pixels
    (a, b), (c, d) = matrix[0, :2], matrix[1, :2]
    square = np.round([a, b, c, d])
    if not (np.allclose([a, b, c, d], square, atol=1e-3)
            and abs(square[0] * square[3] - square[1] * square[2]) == 1):
        raise ValueError(f"{path}: its display matrix [[{a:.3f}, {b:.3f}], [{c:.3f}, {d:.3f}]] is "
                         "not a quarter turn or mirror; re-encode it upright "
                         "(ffmpeg -i IN -c:v libx264 OUT.mp4 applies it)")
    a, b, c, d = square
    if a == 0:   # a quarter turn: x' = c y, y' = b x
        pixels = np.swapaxes(pixels, 0, 1)
        flip_rows, flip_cols = b < 0, c < 0
    else:        # x' = a x, y' = d y
        flip_rows, flip_cols = d < 0, a < 0
    if flip_rows:
        pixels = pixels[::-1]
    if flip_cols:
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels)


def upright_frame(frame, path="video"):
    """A decoded PyAV video frame → uint8 H×W×3 RGB, turned as a player shows it (its display
    matrix applied; PyAV decodes the stored, often sideways, pixels)."""
    return apply_display_matrix(frame.to_ndarray(format="rgb24"), display_matrix(frame), path)


def iter_video_frames(path, step: int = 1, max_frames: int = 0):
    """`read_video_frames` one frame at a time, decoded as they are asked for: a long video is
    never held in memory whole."""
    if step < 1 or max_frames < 0:
        raise ValueError(f"frame step must be ≥ 1 and max frames ≥ 0, got {step}, {max_frames}")
    av = optional.require("av", "video", f"{path}: reading video (PyAV)")
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                if index % step:
                    continue
                yield index, upright_frame(frame, path).astype(np.float32) / 255.0
                count += 1
                if max_frames and count == max_frames:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"{path} is not a video FFmpeg can read ({e})") from None
