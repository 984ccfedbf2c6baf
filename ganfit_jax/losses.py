"""Every term of GANFIT's cost (Gecer et al., CVPR 2019, Sec. 3.3), each a pure function.

    E(p) = λ_id L_id + λ̂_id L̂_id + λ_con L_con + λ_pix L_pix + λ_lan L_lan + Reg(p)     (Eq. 12)

The functions here take arrays (embeddings, feature maps, images, landmarks, coefficients) and
return scalars, so a research variant can swap any term without touching the renderer or the
networks. `ganfit_jax.fitting.loss` composes them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from ganfit_jax import morphable
from ganfit_jax.identity import cosine_similarity


@flax.struct.dataclass
class LossWeights:
    """The λ of Eq. 12, defaults from the paper (DESIGN.md) except λ_lan (below)."""

    identity: float = 2.0          # λ_id
    identity_random: float = 2.0   # λ̂_id
    content: float = 50.0          # λ_con
    pixel: float = 1.0             # λ_pix
    # λ_lan: the paper's 0.001 let stage 2 pull the landmarks off (breakingbad 3.7% of the
    # inter-ocular distance after stage 1, 6.5% at the end; einstein 4.5%) while the identity
    # cosine gained nothing from it; at 0.01 they end at 3.5% and 2.5% with the same cosine
    # (BENCHMARKS.md). Our L_lan is in a fixed 512-px frame; the paper does not give its scale.
    landmark: float = 0.01
    shape_reg: float = 0.05        # λ_reg on p_s
    expression_reg: float = 0.05   # λ_reg on p_e
    light_reg: float = 0.01        # λ_reg on p_l


def identity_loss(embedding_render, embedding_target):
    """Eq. 8: L_id = 1 − cos(F^n(I_0), F^n(I_R)), on the identity network's final embedding."""
    return 1.0 - cosine_similarity(embedding_render, embedding_target)


def content_loss(features_render, features_target):
    """Eq. 9: L_con = Σ_j ||F^j(I_0) − F^j(I_R)||_2 / (H_j W_j C_j), over intermediate maps.

    The paper divides by H_j W_j only; we also divide by the channel count C_j, because without
    it the term's size depends on the network's width (measured on dlib's ResNet: Σ_j ≈ 10 for two
    different faces, so λ_con = 50 swamped every other term and pulled the landmarks 3× further
    off during stage 2). With C_j, λ_con = 50 sits beside λ_id·L_id and λ_lan·L_lan.

    Both arguments are dicts name → (H_j, W_j, C_j); the sum runs over the spatial maps they
    share, so a network's pooled vector (its embedding, which L_id compares) does not count twice.
    """
    total = 0.0
    for name in sorted(set(features_render) & set(features_target)):
        a, b = features_render[name], features_target[name]
        if a.ndim != 3:
            continue
        # sqrt(x + eps) keeps the gradient finite when the two maps coincide
        total = total + jnp.sqrt(jnp.sum(jnp.square(a - b)) + 1e-12) / a.size
    return total


def pixel_loss(image_render, image_target, mask):
    """Eq. 10: L_pix = ||I_0 − I_R||_1 over the rendered face region (mean absolute error per
    covered pixel, summed over RGB), so it does not depend on image size or face area. `mask`
    may be soft: the render's coverage times the photo's pixel weights (a face mask) gives the
    weighted mean over the pixels compared."""
    mask = mask[..., None] if mask.ndim == image_render.ndim - 1 else mask
    covered = jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(mask * jnp.abs(image_render - image_target)) / covered


def landmark_loss(landmarks_model, landmarks_target, weights=None):
    """Eq. 11: L_lan = ||M(p_s, p_e, p_c) − M_0||², summed over landmarks, in squared pixels.

    `weights` (68,) can drop landmarks (0) that the target lacks. The fitting measures it in
    pixels of a LANDMARK_FRAME-pixel image whatever its working resolution, so λ_lan = 0.001 means
    the same at 128² and 512².
    """
    sq = jnp.sum(jnp.square(landmarks_model - landmarks_target), axis=-1)
    if weights is not None:
        sq = sq * weights
    return jnp.sum(sq)


# The frame L_lan is measured in (pixels of a 512-pixel image, the resolution of the paper's UV
# maps and renders). At a 224-pixel working size the paper's λ_lan against λ_reg then assumes
# ~2 px landmark noise instead of ~5 px: on FFHQ photos (ICT model) the fitted landmarks went
# from 3.3-4.2 % to 2.3-3.3 % of the inter-ocular distance.
LANDMARK_FRAME = 512.0


def regulariser(shape_coeffs, expression_coeffs, light_deviation, weights: LossWeights):
    """Reg(p) of Eq. 12: squared norms of p_s and p_e (in standard deviations, so this is the
    Gaussian prior) and of the light's deviation from its initial value (normalised units)."""
    return (weights.shape_reg * jnp.sum(jnp.square(shape_coeffs))
            + weights.expression_reg * jnp.sum(jnp.square(expression_coeffs))
            + weights.light_reg * jnp.sum(jnp.square(light_deviation)))


# ------------------------------------------------------------------------------------------
# M(p): the model's 68 landmarks in the image, with the moving jaw line
# ------------------------------------------------------------------------------------------

JAW_RIGHT = tuple(range(0, 8))    # iBUG 1-8, the subject's right
JAW_LEFT = tuple(range(9, 17))    # iBUG 10-17, the subject's left


def _nearest_candidate(candidate_px, targets):
    """For each target (K,2) the candidate (C,2) nearest in the image; selection carries no
    gradient, the chosen vertex's position does (eos' contour correspondence, made jittable)."""
    d = jnp.sum(jnp.square(targets[:, None, :] - candidate_px[None, :, :]), axis=-1)
    pick = jnp.argmin(jax.lax.stop_gradient(d), axis=1)
    return candidate_px[pick]


def model_landmarks_2d(model: morphable.MorphableModel, vertex_pixels, landmarks_target=None):
    """M(p): (68,2) pixel positions of the model's landmarks.

    Fixed landmarks are their vertices' projections. The jaw line has no fixed vertex on most
    models (it slides over the face as the head turns), so where the model lists contour
    candidates, iBUG 1-8 / 10-17 take the candidate projected nearest to the target landmark.
    Landmarks still undefined come back as NaN; `landmark_weights` gives their zero weights.
    """
    idx = jnp.asarray(model.landmark_indices)
    fixed = jnp.where((idx >= 0)[:, None], vertex_pixels[jnp.maximum(idx, 0)], jnp.nan)
    if landmarks_target is None or model.contour_right is None:
        return fixed
    out = fixed
    for jaw, contour in ((JAW_RIGHT, model.contour_right), (JAW_LEFT, model.contour_left)):
        jaw = jnp.asarray(jaw)
        chosen = _nearest_candidate(vertex_pixels[contour], landmarks_target[jaw])
        undefined = (idx[jaw] < 0)[:, None]
        out = out.at[jaw].set(jnp.where(undefined, chosen, fixed[jaw]))
    return out


def landmark_weights(model: morphable.MorphableModel, landmarks_target=None):
    """(68,) 1 where M(p) defines a landmark (and the target has a finite one), else 0."""
    idx = jnp.asarray(model.landmark_indices)
    defined = idx >= 0
    if model.contour_right is not None:
        jaw = jnp.asarray(JAW_RIGHT + JAW_LEFT)
        defined = defined.at[jaw].set(True)
    w = defined.astype(jnp.float32)
    if landmarks_target is not None:
        w = w * jnp.all(jnp.isfinite(landmarks_target), axis=-1)
    return w


def complete_landmarks(landmarks, reference):
    """Fills the landmarks a model does not define (NaN, e.g. the SFM's inner mouth corners
    iBUG 61/65) with `reference` (e.g. the photo's 68) carried over by the 2-D similarity that
    best maps the reference's defined points onto `landmarks`' (closed-form least squares, as
    complex numbers). Alignment templates such as dlib's need all 68 points."""
    ok = jnp.all(jnp.isfinite(landmarks), axis=-1) & jnp.all(jnp.isfinite(reference), axis=-1)
    w = ok.astype(landmarks.dtype)[:, None]
    p = jnp.where(ok[:, None], landmarks, 0.0)
    r = jnp.where(ok[:, None], reference, 0.0)
    total = jnp.maximum(jnp.sum(w), 1.0)
    mp, mr = jnp.sum(w * p, 0) / total, jnp.sum(w * r, 0) / total
    pc, rc = (p - mp) * w, (r - mr) * w
    norm = jnp.maximum(jnp.sum(rc * rc), 1e-9)
    a = jnp.sum(rc[:, 0] * pc[:, 0] + rc[:, 1] * pc[:, 1]) / norm
    b = jnp.sum(rc[:, 0] * pc[:, 1] - rc[:, 1] * pc[:, 0]) / norm
    rr = jnp.where(jnp.isfinite(reference), reference, mr) - mr
    mapped = jnp.stack([a * rr[:, 0] - b * rr[:, 1], b * rr[:, 0] + a * rr[:, 1]], -1) + mp
    keep = jnp.all(jnp.isfinite(landmarks), axis=-1)[:, None]
    return jnp.where(keep, landmarks, mapped)


def masked_landmark_loss(landmarks_model, landmarks_target, weights):
    """Eq. 11 with NaN-safe masking: undefined points neither count nor poison the gradient."""
    ok = weights > 0
    safe_model = jnp.where(ok[:, None], landmarks_model, 0.0)
    safe_target = jnp.where(ok[:, None], landmarks_target, 0.0)
    return landmark_loss(safe_model, safe_target, weights)
