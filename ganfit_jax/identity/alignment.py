"""Differentiable face alignment: 68 landmarks → similarity transform → bilinear warp to a template.

GANFIT computes its identity and content losses (paper, Eqs. 8–9) on crops aligned the way the
identity network was trained: ArcFace on 112×112 crops from a 5-point similarity transform, dlib's
ResNet on 150×150 "face chips". The input photo is aligned with its detected landmarks and the
rendering with the projected model landmarks, so both the transform estimate and the warp must be
differentiable with respect to the landmarks and the image. Everything here is pure jnp and vmaps.

Coordinates are the project's: x right, y down, the centre of pixel (i, j) at (j + 0.5, i + 0.5).
Templates published in pixel-index coordinates (centre of the first pixel at 0: insightface,
OpenCV, dlib) are shifted by +0.5 on the way in.
"""

import jax.numpy as jnp
import numpy as np

# insightface's arcface_torch / model-zoo template (src/utils norm_crop, 112×112), in index
# coordinates: image-left eye, image-right eye, nose tip, image-left and image-right mouth corner.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)

# dlib's mean face (dlib/image_transforms/interpolation.h, get_face_chip_details): positions of
# iBUG points 17..67 in a unit square.
_DLIB_MEAN_FACE_X = np.array([
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689])
_DLIB_MEAN_FACE_Y = np.array([
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182])
# dlib fits the chip on the nose, eyes, outer lips and upper inner lip (no jaw, brows, lower lip).
DLIB_CHIP_POINTS = tuple(i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67))


def five_points(landmarks):
    """iBUG-68 → ArcFace's 5 points: eye centres (mean of each eye's 6 points), nose tip, mouth corners."""
    lm = jnp.asarray(landmarks)
    return jnp.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


def arcface_template(size=112):
    """ArcFace's 5-point template for a size×size crop, in the project's pixel convention."""
    return jnp.asarray(ARCFACE_TEMPLATE_112 * (size / 112.0) + 0.5)


def dlib_chip_template(size=150, padding=0.25):
    """dlib's mean-face positions of DLIB_CHIP_POINTS in a size×size chip (index coordinates)."""
    idx = np.array(DLIB_CHIP_POINTS) - 17
    p = np.stack([_DLIB_MEAN_FACE_X[idx], _DLIB_MEAN_FACE_Y[idx]], -1)
    return jnp.asarray((padding + p) / (2 * padding + 1) * size, jnp.float32)


def similarity_transform(src, dst):
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) src → dst.

    Umeyama (1991) in 2-D reduces to a closed form: with centred points, the linear part is
    [[a, −b], [b, a]], a = Σ⟨s, d⟩ / Σ|s|², b = Σ s×d / Σ|s|². No SVD, so gradients are smooth.
    Returns a (2, 3) matrix A with dst ≈ A[:, :2] @ src + A[:, 2].
    """
    src = jnp.asarray(src)
    dst = jnp.asarray(dst)
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    norm = jnp.sum(s * s)
    a = jnp.sum(s * d) / norm
    b = jnp.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]) / norm
    m = jnp.array([[a, -b], [b, a]])
    return jnp.concatenate([m, (md - m @ ms)[:, None]], axis=1)


def invert_affine(A):
    """Inverse of a (2, 3) affine map."""
    m_inv = jnp.linalg.inv(A[:, :2])
    return jnp.concatenate([m_inv, (-m_inv @ A[:, 2])[:, None]], axis=1)


def apply_affine(A, points):
    return points @ A[:, :2].T + A[:, 2]


def bilinear_sample(image, xy):
    """Sample image (H, W, C) at points xy (..., 2) bilinearly; zero outside the image.

    Differentiable in the image values and in xy (through the interpolation weights).
    """
    h, w = image.shape[:2]
    u = xy[..., 0] - 0.5  # to index coordinates
    v = xy[..., 1] - 0.5
    u0 = jnp.floor(u)
    v0 = jnp.floor(v)
    fu = u - u0
    fv = v - v0
    u0 = u0.astype(jnp.int32)
    v0 = v0.astype(jnp.int32)

    def tap(vi, ui):
        inside = (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
        val = image[jnp.clip(vi, 0, h - 1), jnp.clip(ui, 0, w - 1)]
        return val * inside[..., None].astype(image.dtype)

    fu = fu[..., None]
    fv = fv[..., None]
    return ((1 - fv) * ((1 - fu) * tap(v0, u0) + fu * tap(v0, u0 + 1))
            + fv * ((1 - fu) * tap(v0 + 1, u0) + fu * tap(v0 + 1, u0 + 1)))


def warp_affine(image, out_to_in, out_hw, supersample=1):
    """Output image (out_h, out_w, C) whose pixel centre p shows the input at out_to_in(p).

    supersample=k averages k×k bilinear samples spread over each output pixel: a box pre-filter
    against aliasing when the warp shrinks the image by more than ~2× (a high-resolution photo to
    a 112×112 crop). k=1 is plain bilinear sampling, like OpenCV's warpAffine and dlib's chips.
    """
    oh, ow = out_hw
    dtype = jnp.promote_types(jnp.asarray(out_to_in).dtype, jnp.float32)
    ys, xs = jnp.meshgrid(jnp.arange(oh, dtype=dtype) + 0.5,
                          jnp.arange(ow, dtype=dtype) + 0.5, indexing="ij")
    grid = jnp.stack([xs, ys], -1)
    if supersample == 1:
        return bilinear_sample(image, apply_affine(out_to_in, grid))
    k = int(supersample)
    offsets = (jnp.arange(k, dtype=dtype) + 0.5) / k - 0.5
    oy, ox = jnp.meshgrid(offsets, offsets, indexing="ij")
    sub = grid[:, :, None, :] + jnp.stack([ox.ravel(), oy.ravel()], -1)  # (oh, ow, k², 2)
    return bilinear_sample(image, apply_affine(out_to_in, sub)).mean(axis=2)


def arcface_transform(landmarks, size=112):
    """(2, 3) image → crop similarity putting the 5 points on ArcFace's template."""
    return similarity_transform(five_points(landmarks), arcface_template(size))


def align_arcface(image, landmarks, size=112, supersample=1):
    """ArcFace-style 5-point aligned crop (size×size×C), differentiable in image and landmarks.

    With supersample=1 this is insightface's norm_crop (skimage similarity + cv2.warpAffine).
    """
    A = arcface_transform(landmarks, size)
    return warp_affine(image, invert_affine(A), (size, size), supersample)


def dlib_chip_transform(landmarks, size=150, padding=0.25):
    """(2, 3) chip → image map of dlib's `get_face_chip_details` + `extract_image_chip`.

    dlib fits a similarity from its mean face (chip coordinates) to the landmarks, then rebuilds the
    extraction from `centered_drect(tform(size/2, size/2), size·scale, size·scale)`, whose corners
    lie (size·scale − 1)/2 from the centre, and maps chip indices 0 and size−1 onto them: the
    sampling step is (size·scale − 1)/(size − 1) and the centre index (size−1)/2 lands on
    tform(size/2, size/2).
    """
    lm_index = jnp.asarray(landmarks)[np.array(DLIB_CHIP_POINTS)] - 0.5
    T = similarity_transform(dlib_chip_template(size, padding), lm_index)
    m = T[:, :2]
    centre = m @ jnp.array([size / 2.0, size / 2.0]) + T[:, 2]
    scale = jnp.sqrt(jnp.sum(m[:, 0] ** 2))
    step = m * ((size * scale - 1.0) / (scale * (size - 1.0)))
    # index coords: img = centre + step @ (q - (size-1)/2); ours: q = q' - 0.5, img' = img + 0.5
    offset = centre - step @ jnp.array([(size - 1) / 2.0 + 0.5] * 2) + 0.5
    return jnp.concatenate([step, offset[:, None]], axis=1)


def align_dlib(image, landmarks, size=150, padding=0.25, supersample=1):
    """dlib face chip (size×size×C) as `dlib.get_face_chip(img, shape, size, padding)` makes it.

    dlib pre-shrinks faces over 2× the chip size with an image pyramid before its bilinear
    sampling; that step is not reproduced (use supersample > 1 for a comparable pre-filter).
    """
    return warp_affine(image, dlib_chip_transform(landmarks, size, padding), (size, size), supersample)


def align(image, landmarks, method, size, supersample=1):
    """Dispatch on a network's alignment: 'arcface' (5-point) or 'dlib' (mean-face chip)."""
    if method == "arcface":
        return align_arcface(image, landmarks, size, supersample=supersample)
    if method == "dlib":
        return align_dlib(image, landmarks, size, supersample=supersample)
    raise ValueError(f"unknown alignment {method!r}; expected 'arcface' or 'dlib'")
