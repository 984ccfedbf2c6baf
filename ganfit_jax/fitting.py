"""GANFIT fitting (Gecer et al., CVPR 2019, Sec. 3.3-3.4): the jitted loss of Eq. 12, two-stage
Adam under jit/vmap, and multi-frame fitting with shared identity (Eq. 13).

Everything a step needs travels as pytrees: `FitParams` (what is optimised), `Target` (what the
photo gives), `Pipeline` (the models: 3DMM, texture generator, identity network, plus the static
choices), so `loss`, `step` and whole fits `jit` and `vmap` without closures over globals.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ganfit_jax import camera as camera_lib
from ganfit_jax import losses, morphable, precision

# ------------------------------------------------------------------------------------------
# Parameters and targets
# ------------------------------------------------------------------------------------------


@flax.struct.dataclass
class FitParams:
    """p = {p_s, p_e, p_t, p_c, p_l} of the paper.

    shape (S,) and expression (E,) in standard deviations; texture (T,) the generator's latent;
    camera (8,) [eye xyz mm, target xyz mm, focal px, roll rad]; light (9,) [position xyz mm,
    colour rgb, ambient rgb].
    """

    shape: jnp.ndarray
    expression: jnp.ndarray
    texture: jnp.ndarray
    camera: jnp.ndarray
    light: jnp.ndarray


@flax.struct.dataclass
class Target:
    """What the photo provides, at the working resolution.

    image (H,W,3) in [0,1]; landmarks (68,2) pixels (NaN where missing); identity: the identity
    network's (embedding, features) of the aligned photo, computed once before fitting;
    pixel_weight (H,W) in [0,1]: which of the photo's pixels the pixel loss (Eq. 10) compares, a
    face mask (1 on the face; 0 on hair, hands, glasses that cover it: the render cannot explain
    them and would bend its texture and light towards them), None for every pixel the face
    covers; the identity terms see the photo's pixels where it hides the face
    (`identity_view`). In a batch every target has one, or none has.
    """

    image: jnp.ndarray
    landmarks: jnp.ndarray
    embedding: Optional[jnp.ndarray] = None
    features: Any = None
    pixel_weight: Optional[jnp.ndarray] = None


DEFAULT_LIGHT = np.array([0.0, 300.0, 1000.0, 0.6, 0.6, 0.6, 0.5, 0.5, 0.5], np.float32)

# How far one Adam step may move each parameter: Adam's step is ~lr in the units it sees, so we
# let it see parameters in these units. shape/expression/texture/colours are already O(1); the
# camera is in mm and pixels and would otherwise crawl at 0.01 mm per step.
CAMERA_UNITS = np.array([20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 50.0, 1.0], np.float32)
LIGHT_UNITS = np.array([200.0, 200.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class RandomRenderStats:
    """Gaussians of the second render Î_R (Eq. 7): expression ~ N(0, σ_e²) as in the paper;
    the pose is the current camera rotated about its target by yaw/pitch ~ N(0, σ²) (degrees),
    and the light position moves by N(0, σ_l²) mm and its colour by N(0, σ_c²). Our choice in
    place of the paper's 300W-3D statistics: head poses of in-the-wild portraits rarely leave
    ±30° yaw, ±15° pitch."""

    expression_std: float = 0.5
    yaw_std_deg: float = 15.0
    pitch_std_deg: float = 8.0
    light_position_std: float = 300.0
    light_colour_std: float = 0.1


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Static choices of a fit; the defaults are the paper's (DESIGN.md) except stage 1's length
    and rate (below)."""

    stage1_iterations: int = 600
    stage2_iterations: int = 300
    learning_rate: float = 0.01
    # Stage 1 (landmarks only) costs ~1% of a stage-2 step, and at the paper's rate it is still
    # falling after 200 steps (einstein: 3.8% of the inter-ocular distance at 200, 2.7% at
    # 600 steps of 0.03; BENCHMARKS.md), so it runs longer and faster than stage 2.
    stage1_learning_rate: float = 0.03
    # iterations per jitted lax.scan between progress lines; a stage's count that is not a
    # multiple ends in a shorter chunk, on accelerators a second program to compile
    chunk: int = 25
    weights: losses.LossWeights = losses.LossWeights()
    random_render: RandomRenderStats = RandomRenderStats()
    # recompute the forward pass during the backward pass instead of storing its activations
    # (jax.checkpoint): less memory per image, so larger batches fit a device, ~1.3x the FLOPs
    remat: bool = False
    # 'auto': chunks as one lax.scan on GPU/TPU, as a host loop of jitted steps on the CPU
    # (see `uses_scan`); 'scan' or 'host' force one
    loop: str = "auto"
    # 'auto': the host loop's step is compiled with the pipeline (3DMM, GAN, identity network)
    # as constants when it holds at most CONSTANT_PIPELINE_MAX_BYTES, as an argument otherwise
    # (see `pipeline_as_constants`); 'always' or 'never' force one
    constant_pipeline: str = "auto"
    # an unbatched step ('single': fit --image) shades at most this fraction of each render's
    # pixels as a compacted list of the covered ones, and the whole grid when the face covers
    # more (`render.render`'s pixel_budget; same result, ~30% less renderer time for a face
    # covering ~40% of the image); batched steps (vmap) always shade the whole grid. None: off
    pixel_budget: Optional[float] = 0.5
    # ... but only for renders of at least this many pixels: the compaction's lax.cond costs
    # 2-3 s more tracing and compilation per program, which a small render's step never earns
    # back (a tiny step's gradient on 2 CPU cores: 0.7 ms a step saved at 64², 0.9 at 128², 2.5 at
    # 160², 13 at 192², 11 at 224²; BENCHMARKS.md session 29). 0: compact at every size
    pixel_budget_min_pixels: int = 192 * 192
    # one photo on the CPU, pipeline compiled in: Eq. 12's two views (the photo's and the random
    # one of Eq. 7) run as separate programs on two threads (`TwoViewStep`); XLA:CPU runs one
    # program's many small ops one after another, two programs overlap (~10% off the cpu-small
    # step; BENCHMARKS.md). Same gradient as the fused step. False: one fused program
    two_threads: bool = True
    # how a batch of photos (fit --images) or of one person's frames (fit --frames, Eq. 13)
    # steps in the host loop: 'vmap', one vmapped program; 'per_photo', photo after photo with
    # the single-photo step (its compacted shading and two threads; on the 2-core CPU 52-64 ms
    # a photo against 76-94 ms a photo vmapped at batch 2 and 8, cpu-small, BENCHMARKS.md),
    # frames then sharing the mean of their shape and texture; 'auto', per_photo for stage 2
    # on a single CPU device, vmap otherwise (stage 1 is a few tiny ops: vmap amortises dispatch)
    batch_steps: str = "auto"
    # parameter blocks held at their starting values in both stages (names of FitParams fields),
    # e.g. ('shape', 'texture') to fit expression, pose and light to a known identity: their
    # Adam steps are zeroed (`optimiser`), so every step (fused, two-view, per-photo, vmapped)
    # keeps them exactly; the loss takes them as constants (`without_gradient`), and a held
    # texture is generated once for stage 2, not every step (`hold_texture`: the cpu-small step
    # 1.7x faster, BENCHMARKS.md)
    frozen: tuple = ()
    # research variants of Eq. 12 inside the project's fit (batches, sharding, chunks, progress):
    # (name, weight, fn) triples, each term fn(params, target, pipeline, render) → scalar
    # added to stage 2's loss as weight · fn(...) and reported under `name`; `render` holds the
    # photo's view as Eq. 12 made it: 'image' (H×W×3 on the photo), 'mask' (H×W, 1 where a
    # triangle covers the pixel centre), 'coverage' (with `Pipeline.antialias` how much of each
    # pixel the face covers, differentiable in shape and camera: a silhouette term against a
    # face parser's mask; otherwise the mask), 'landmarks' (68×2 projected, NaN where the model
    # has none) and 'texture' (G(p_t)).
    # Pure and jittable, as the terms of `losses` are; under vmap each sees one photo.
    extra_terms: tuple = ()

    def __post_init__(self):
        blocks = [f.name for f in dataclasses.fields(FitParams)]
        if isinstance(self.frozen, str) or not all(b in blocks for b in self.frozen):
            raise ValueError(f"FitConfig.frozen must be a tuple of parameter blocks from "
                             f"{blocks}, got {self.frozen!r}")
        object.__setattr__(self, "frozen", tuple(self.frozen))
        object.__setattr__(self, "extra_terms", tuple(tuple(t) for t in self.extra_terms))
        taken = {"total", "landmark", "pixel", "identity", "content", "identity_random", "reg"}
        for term in self.extra_terms:
            if not (len(term) == 3 and isinstance(term[0], str) and term[0] not in taken
                    and isinstance(term[1], (int, float, np.number)) and 0 <= term[1] < np.inf
                    and callable(term[2])):
                raise ValueError("FitConfig.extra_terms: each must be (name, weight ≥ 0, "
                                 "fn(params, target, pipeline, render) → scalar), with a name "
                                 f"not among Eq. 12's {sorted(taken)}; got {term!r}")
        names = [t[0] for t in self.extra_terms]
        if len(set(names)) != len(names):
            raise ValueError(f"FitConfig.extra_terms: names must differ, got {names}")
        # a zero chunk divides by zero deep inside the loop, a negative rate or weight fits
        # uphill without a word: refuse them where the config is made
        for name, least in (("stage1_iterations", 0), ("stage2_iterations", 0), ("chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"FitConfig.{name} must be an integer ≥ {least}, got {value!r}")
        for name in ("learning_rate", "stage1_learning_rate"):
            value = getattr(self, name)
            if not (callable(value)  # an optax schedule
                    or isinstance(value, (int, float, np.number)) and 0 < value < np.inf):
                raise ValueError(f"FitConfig.{name} must be a finite number > 0 or an optax "
                                 f"schedule, got {value!r}")
        if self.pixel_budget is not None and not 0 < self.pixel_budget <= 1:
            raise ValueError("FitConfig.pixel_budget must be None or a fraction in (0, 1], got "
                             f"{self.pixel_budget!r}")
        if (isinstance(self.pixel_budget_min_pixels, bool)
                or not isinstance(self.pixel_budget_min_pixels, (int, np.integer))
                or self.pixel_budget_min_pixels < 0):
            raise ValueError("FitConfig.pixel_budget_min_pixels must be an int ≥ 0, got "
                             f"{self.pixel_budget_min_pixels!r}")
        for field in dataclasses.fields(self.weights):
            value = getattr(self.weights, field.name)
            if isinstance(value, (int, float, np.number)) and not 0 <= value < np.inf:
                raise ValueError(f"FitConfig.weights.{field.name} (a λ of Eq. 12) must be a "
                                 f"finite number ≥ 0, got {value!r}")


@flax.struct.dataclass
class Pipeline:
    """The models a fit runs through. Arrays are pytree leaves; functions and sizes are static.

    texture_fn(texture_params, p_t) → a UV map (Ht,Wt,3) or per-vertex colours (N,3) in [0,1].
    identity_fn(identity_params, image (H,W,3), landmarks (68,2)) → (embedding, features): the
      network *including* its differentiable alignment, so one call per image.
    render_fn(vertices, triangles, uv, colours_or_texture, camera, light, image_size) →
      (image, aux) with aux['mask']; `ganfit_jax.render.render` by default.
    antialias: the default renderer blends the silhouettes (`render.antialias`): the outline
      carries gradients, and research terms get the render's `coverage` (see `loss`).
    """

    model: morphable.MorphableModel
    texture_params: Any = None
    identity_params: Any = None
    texture_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    identity_fn: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)
    render_fn: Optional[Callable] = flax.struct.field(pytree_node=False, default=None)
    image_size: tuple = flax.struct.field(pytree_node=False, default=(224, 224))
    antialias: bool = flax.struct.field(pytree_node=False, default=False)


@jax.jit
def identity_of(net, image, landmarks):
    """F(align(I)): the identity network's (embedding, features) of an image, aligned with its
    68 landmarks; the `identity_fn` of a Pipeline using `ganfit_jax.identity`. Jitted, so
    that nested in the programs of a fit (both views of Eq. 12, each program of a
    `TwoViewStep`) the network is traced and differentiated once per image size, as
    `_default_render` is."""
    from ganfit_jax import identity

    return identity.embed(net, identity.align(net, image, landmarks))


def generate_texture(texture_model, p_t):
    """G(p_t) of any texture model with a `generate` method (GAN, PCA, direct UV)."""
    return texture_model.generate(p_t)


def make_pipeline(model, texture_model, identity_net=None, image_size=(224, 224)) -> Pipeline:
    """A Pipeline of the project's own texture models and identity networks."""
    return Pipeline(model=model, texture_params=texture_model, identity_params=identity_net,
                    texture_fn=generate_texture,
                    identity_fn=None if identity_net is None else identity_of,
                    image_size=tuple(image_size))


def with_compute_dtype(pipeline: Pipeline, compute_dtype: str) -> Pipeline:
    """The pipeline with its texture GAN and identity network computing in `compute_dtype`
    ('float32' or 'bfloat16', see `ganfit_jax.precision`); models without the option (PCA and
    direct UV textures, custom functions) are left in float32."""
    precision.check_compute_dtype(compute_dtype)

    def narrowed(m):
        return m.replace(compute_dtype=compute_dtype) if hasattr(m, "compute_dtype") else m

    return pipeline.replace(texture_params=narrowed(pipeline.texture_params),
                            identity_params=narrowed(pipeline.identity_params))


def target_from_image(pipeline: Pipeline, image, landmarks, pixel_weight=None) -> Target:
    """The Target of a working-resolution photo: identity features computed once, here.
    `pixel_weight`: (H,W) in [0,1], see `Target` (e.g. `inputs.crop_pixel_weight` of a face
    mask)."""
    image = jnp.asarray(image, jnp.float32)
    landmarks = jnp.asarray(landmarks, jnp.float32)
    if pixel_weight is not None:
        pixel_weight = jnp.asarray(pixel_weight, jnp.float32)
        if pixel_weight.shape != image.shape[:2]:
            raise ValueError(f"pixel_weight: expected {image.shape[:2]} like the image, got "
                             f"{pixel_weight.shape}")
    embedding = features = None
    if pipeline.identity_fn is not None:
        embedding, features = jax.jit(pipeline.identity_fn)(pipeline.identity_params, image,
                                                            landmarks)
    return Target(image=image, landmarks=landmarks, embedding=embedding, features=features,
                  pixel_weight=pixel_weight)


# ------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------


def init_params(model: morphable.MorphableModel, landmarks, image_size, texture_dim, focal=None,
                texture_init=None) -> FitParams:
    """The mean face, a closed-form camera from the fixed landmarks, a frontal white light."""
    landmarks = np.asarray(landmarks, np.float64)
    idx = np.asarray(model.landmark_indices)
    ok = (idx >= 0) & np.all(np.isfinite(landmarks), axis=1)
    if ok.sum() < 6:
        raise ValueError(f"landmarks: need at least 6 of the model's defined landmarks, "
                         f"got {int(ok.sum())}")
    points3d = np.asarray(model.mean)[idx[ok]]
    cam = camera_lib.camera_from_landmarks(points3d, landmarks[ok], image_size, focal=focal)
    right, up, forward = camera_lib.axes(np.asarray(cam), np)
    light = DEFAULT_LIGHT.copy()
    # in front of the face, above the camera: portrait key light
    light[:3] = cam[:3] + 300.0 * up
    texture = (np.zeros(texture_dim, np.float32) if texture_init is None
               else np.asarray(texture_init, np.float32))
    # copied to the device as they are: jnp.zeros and jnp.asarray compile a program per shape
    return FitParams(shape=jax.device_put(np.zeros(model.num_shape, np.float32)),
                     expression=jax.device_put(np.zeros(model.num_expression, np.float32)),
                     texture=jax.device_put(texture),
                     camera=jax.device_put(np.asarray(cam, np.float32)),
                     light=jax.device_put(np.asarray(light, np.float32)))


# ------------------------------------------------------------------------------------------
# The forward model
# ------------------------------------------------------------------------------------------


def project_landmarks(pipeline: Pipeline, params: FitParams, landmarks_target=None):
    """M(p): the model's 68 landmarks in pixels for the current shape, expression and camera."""
    verts = morphable.vertices(pipeline.model, params.shape, params.expression)
    px, _ = camera_lib.project(params.camera, verts, pipeline.image_size)
    return losses.model_landmarks_2d(pipeline.model, px, landmarks_target)


@functools.cache
def _default_render():
    """`render.render` as a jitted function of its own, nested in the programs that call it:
    JAX then traces and differentiates a render of given shapes once per process and reuses
    it in every program (both renders of Eq. 12, each view's program of a `TwoViewStep`, the
    outputs' renders) instead of tracing it again in each; XLA inlines it as before (the
    cpu-small loss and gradient: ~0.6 s less tracing and ~0.2 s less lowering)."""
    from ganfit_jax import render as render_lib

    return jax.jit(render_lib.render, static_argnums=(6,), static_argnames=(
        "specular", "shininess", "texture_sampling", "near", "chunk_size", "pixel_budget",
        "antialias"))


def render_face(pipeline: Pipeline, params: FitParams, background=None, texture=None,
                pixel_budget=None):
    """I_R = R(S(p_s,p_e), P(G(p_t)), p_c, p_l): the rendered face and the renderer's aux.
    `texture`: G(p_t) when the caller already has it (both renders of Eq. 12 share one).
    `pixel_budget`: None, or the fraction of the image's pixels the default renderer may shade
    as a compacted list (`render.render`; not passed to a pipeline's own render_fn)."""
    render_fn = pipeline.render_fn or _default_render()
    verts = morphable.vertices(pipeline.model, params.shape, params.expression)
    if texture is None:
        texture = pipeline.texture_fn(pipeline.texture_params, params.texture)
    kwargs = {} if background is None else {"background": background}
    if pipeline.antialias:
        if pipeline.render_fn is not None:
            raise ValueError("Pipeline.antialias: only the default renderer antialiases; "
                             "give a render_fn that does it itself instead")
        kwargs["antialias"] = True
    if pixel_budget is not None and pipeline.render_fn is None:
        height, width = camera_lib.image_hw(pipeline.image_size)
        kwargs["pixel_budget"] = int(pixel_budget * height * width)
    return render_fn(verts, pipeline.model.triangles, pipeline.model.uv, texture, params.camera,
                     params.light, pipeline.image_size, **kwargs)


def intrinsic_images(pipeline: Pipeline, params: FitParams):
    """The render I_R split as the Phong model of Sec. 3.2 composes it, I_R = albedo ⊙ shading +
    specular: (albedo (the texture as the camera sees it, unlit), shading (ambient + diffuse,
    RGB: what the light does to a white face), specular (the highlight), mask), each (H,W,3)
    but the mask, black off the face. By re-rendering with the light or the texture replaced:
    ambient 1 and no light gives the albedo, a black texture the highlight alone, a white one
    shading plus highlight. Never antialiased: blending at the outline is linear in the colours,
    so it would break albedo ⊙ shading there."""
    pipeline = pipeline.replace(antialias=False)
    texture = pipeline.texture_fn(pipeline.texture_params, params.texture)
    black = jnp.zeros(3)
    unlit = params.light.at[3:6].set(0.0).at[6:9].set(1.0)
    albedo, aux = render_face(pipeline, params.replace(light=unlit), background=black,
                              texture=texture)
    specular, _ = render_face(pipeline, params, background=black, texture=jnp.zeros_like(texture))
    white, _ = render_face(pipeline, params, background=black, texture=jnp.ones_like(texture))
    return albedo, white - specular, specular, aux["mask"]


def random_second_view(params: FitParams, key, stats: RandomRenderStats,
                       expression_range=None) -> FitParams:
    """Î_R's parameters (Eq. 7): same identity and texture, random expression, pose and light.
    With the model's `expression_range`, the random expression is moved into it (blendshapes:
    each one off or partly on, never inverted)."""
    k_e, k_yaw, k_pitch, k_lp, k_lc = jax.random.split(key, 5)
    expression = stats.expression_std * jax.random.normal(k_e, params.expression.shape)
    if expression_range is not None:
        expression = jnp.clip(expression, *expression_range)
    yaw = jnp.deg2rad(stats.yaw_std_deg) * jax.random.normal(k_yaw)
    pitch = jnp.deg2rad(stats.pitch_std_deg) * jax.random.normal(k_pitch)
    cam = params.camera
    eye, target = cam[0:3], cam[3:6]
    right, up, forward = camera_lib.axes(cam)
    offset = eye - target
    # rotate the eye about the target: yaw about the camera's up axis, pitch about its right axis
    offset = _rotate(offset, up, yaw)
    offset = _rotate(offset, right, pitch)
    camera = cam.at[0:3].set(target + offset)
    light = params.light
    light = light.at[0:3].add(stats.light_position_std * jax.random.normal(k_lp, (3,)))
    light = light.at[3:9].add(stats.light_colour_std * jax.random.normal(k_lc, (6,)))
    return params.replace(expression=expression, camera=camera, light=light)


def _rotate(v, axis, angle):
    """Rodrigues' rotation of v about a unit axis."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    return v * c + jnp.cross(axis, v) * s + axis * jnp.dot(axis, v) * (1 - c)


# ------------------------------------------------------------------------------------------
# Eq. 12
# ------------------------------------------------------------------------------------------


def identity_view(image, target: Target):
    """The render as the identity terms (Eq. 8, 9) see it: over the photo, and where the face
    mask hides the face (`Target.pixel_weight`), the photo's own pixels. F^n(I_0) saw the hand
    or hair over the face; a render without it would be pulled to explain the difference in
    identity. With the occluder pasted in, both embeddings see it and compare the rest."""
    if target.pixel_weight is None:
        return image
    return target.image + target.pixel_weight[..., None] * (image - target.image)


def landmark_term(pipeline: Pipeline, landmarks_model, landmarks_target):
    """L_lan (Eq. 11) over the landmarks the model defines, in pixels of a
    `losses.LANDMARK_FRAME`-pixel image (resolution-independent λ_lan)."""
    scale = losses.LANDMARK_FRAME / max(pipeline.image_size)
    w = losses.landmark_weights(pipeline.model, landmarks_target)
    return losses.masked_landmark_loss(scale * landmarks_model, scale * landmarks_target, w)


def landmark_stage_loss(params: FitParams, target: Target, pipeline: Pipeline,
                        weights: losses.LossWeights, prior_scale=0.1):
    """Stage 1: L_lan and a weak prior on shape and expression (no render, no networks).

    The paper's stage 1 is the landmark loss alone; we keep `prior_scale` (a tenth) of Reg so
    that expression coefficients cannot run off on noisy landmarks. With the full prior, the
    fits of FFHQ photos stopped at 4-7% of the inter-ocular distance; with a tenth, 3-4% (SFM)
    and 2-3% (ICT)."""
    lan = landmark_term(pipeline, project_landmarks(pipeline, params, target.landmarks),
                        target.landmarks)
    reg = prior_scale * losses.regulariser(params.shape, params.expression, jnp.zeros(()),
                                           weights)
    terms = {"landmark": lan, "reg": reg}
    return weights.landmark * lan + reg, terms


def loss(params: FitParams, target: Target, pipeline: Pipeline, key,
         weights: losses.LossWeights = losses.LossWeights(),
         random_stats: RandomRenderStats = RandomRenderStats(), light_init=None,
         pixel_budget=None, extra_terms=()):
    """Eq. 12, one scalar and its terms (dict of scalars, unweighted).

    Terms whose weight is 0, or whose network is absent (pipeline.identity_fn is None), are
    skipped at trace time, so an ablation costs nothing. `pixel_budget`: see `render_face`
    (leave None under vmap). `extra_terms`: (name, weight, fn) of a research variant, as
    `FitConfig.extra_terms` describes.
    """
    # G(p_t) once: the main and the random render share the texture, and a second generator
    # pass would double its backward pass too (XLA merges equal forwards, not their gradients)
    texture = pipeline.texture_fn(pipeline.texture_params, params.texture)
    use_identity = pipeline.identity_fn is not None and target.embedding is not None
    photo_identity = use_identity and bool(weights.identity or weights.content)
    if weights.pixel or extra_terms or photo_identity:
        image, aux = render_face(pipeline, params, background=target.image, texture=texture,
                                 pixel_budget=pixel_budget)
        mask = aux["mask"]
    # else no term sees the photo's view (the random view's program of a TwoViewStep): not
    # traced at all, which XLA's dead-code elimination would only undo after seconds of
    # differentiating and lowering it
    pred_lm = project_landmarks(pipeline, params, target.landmarks)
    terms = {}
    terms["landmark"] = landmark_term(pipeline, pred_lm, target.landmarks)
    if not weights.landmark:
        # reported, not fitted (the random view's program of a TwoViewStep): without the cut,
        # XLA back-propagates zeros through the projection (~0.4 ms of that view on one core)
        terms["landmark"] = jax.lax.stop_gradient(terms["landmark"])
    if weights.pixel:
        compared = mask if target.pixel_weight is None else mask * target.pixel_weight
        terms["pixel"] = losses.pixel_loss(image, target.image, compared)
    if photo_identity:
        # the render's landmarks are known exactly: align it with its own projected landmarks
        emb, feats = pipeline.identity_fn(
            pipeline.identity_params, identity_view(image, target),
            losses.complete_landmarks(pred_lm, target.landmarks))
        if weights.identity:
            terms["identity"] = losses.identity_loss(emb, target.embedding)
        if weights.content:
            terms["content"] = losses.content_loss(feats, target.features)
    if use_identity and weights.identity_random:
        second = random_second_view(params, key, random_stats, pipeline.model.expression_range)
        image2, _ = render_face(pipeline, second, background=target.image, texture=texture,
                                pixel_budget=pixel_budget)
        lm2 = project_landmarks(pipeline, second, None)
        lm2 = losses.complete_landmarks(_fill_jaw(pipeline, second, lm2), target.landmarks)
        emb2, _ = pipeline.identity_fn(pipeline.identity_params, image2, lm2)
        terms["identity_random"] = losses.identity_loss(emb2, target.embedding)
    light_init = params.light if light_init is None else light_init
    light_dev = (params.light - jax.lax.stop_gradient(light_init)) / jnp.asarray(LIGHT_UNITS)
    terms["reg"] = losses.regulariser(params.shape, params.expression, light_dev, weights)
    total = (weights.landmark * terms["landmark"] + terms["reg"]
             + weights.pixel * terms.get("pixel", 0.0)
             + weights.identity * terms.get("identity", 0.0)
             + weights.content * terms.get("content", 0.0)
             + weights.identity_random * terms.get("identity_random", 0.0))
    if extra_terms:
        render = dict(image=image, mask=mask, landmarks=pred_lm, texture=texture,
                      coverage=aux.get("coverage", mask))
    for name, weight, fn in extra_terms:
        terms[name] = jnp.asarray(fn(params, target, pipeline, render), jnp.float32)
        total = total + weight * terms[name]
    return total, terms


def _fill_jaw(pipeline, params, lm):
    """Jaw landmarks for a render with no target: contour candidates spaced evenly along each
    side (the photo's jaw points belong to another pose)."""
    model = pipeline.model
    if model.contour_right is None:
        return lm
    verts = morphable.vertices(model, params.shape, params.expression)
    px, _ = camera_lib.project(params.camera, verts, pipeline.image_size)
    # without a photo to match, use the candidates' image positions in order along the contour
    out = lm
    for jaw, contour in ((losses.JAW_RIGHT, model.contour_right),
                         (losses.JAW_LEFT, model.contour_left)):
        pick = np.linspace(0, contour.shape[0] - 1, len(jaw)).round().astype(int)
        out = out.at[jnp.asarray(jaw)].set(px[contour[pick]])
    return out


# ------------------------------------------------------------------------------------------
# Optimisation
# ------------------------------------------------------------------------------------------


def parameter_units(params: FitParams, texture_step=1.0) -> FitParams:
    """How far one unit of Adam's step moves each block (see CAMERA_UNITS)."""
    return FitParams(shape=jnp.ones_like(params.shape), expression=jnp.ones_like(params.expression),
                     texture=texture_step * jnp.ones_like(params.texture),
                     camera=jnp.asarray(CAMERA_UNITS[: params.camera.shape[-1]]),
                     light=jnp.asarray(LIGHT_UNITS))


def optimiser(learning_rate: float, params: FitParams, stage: int, texture_step=1.0,
              frozen=(), expression_range=None):
    """optax Adam at the paper's rate, scaled per parameter block; stage 1 frees only shape,
    expression and camera (landmark fitting), stage 2 everything but the `frozen` blocks
    (`FitConfig.frozen`). `texture_step` is the texture model's own `step_scale` (a prior-free
    texture moves slowly, or the identity network's gradients paint adversarial noise into it).
    `expression_range` (the model's, `MorphableModel.expression_range`): every step lands p_e
    on the nearest coefficients in range (projected Adam; `update` then needs `params`)."""
    units = parameter_units(params, texture_step)
    held = set(frozen) | ({"texture", "light"} if stage == 1 else set())
    # in the blocks' order, not the set's: the traced program (and so its key in the persistent
    # compilation cache) must not depend on the process's string hashing
    units = units.replace(**{f.name: jnp.zeros_like(getattr(units, f.name))
                             for f in dataclasses.fields(FitParams) if f.name in held})
    # the projection is in the chain either way (as a no-op without a range), so one state
    # serves every model: `init_opt_state` does not need the model
    return optax.chain(optax.adam(learning_rate),
                       optax.GradientTransformation(
                           lambda p: optax.EmptyState(),
                           lambda u, s, p=None: (jax.tree.map(jnp.multiply, u, units), s)),
                       _expression_in_range(expression_range))


def _expression_in_range(expression_range):
    def update(updates, state, params=None):
        if expression_range is None:
            return updates, state
        low, high = expression_range
        if params is None:
            raise ValueError("an optimiser with an expression_range moves p_e into the range: "
                             "call its update with the params, tx.update(grads, state, params)")
        expression = jnp.clip(params.expression + updates.expression, low, high)
        return updates.replace(expression=expression - params.expression), state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def stage_learning_rate(config: FitConfig, stage: int) -> float:
    return config.stage1_learning_rate if stage == 1 else config.learning_rate


def without_gradient(params: FitParams, blocks) -> FitParams:
    """`blocks` (`FitConfig.frozen`) as constants of the loss: Adam's step for them is zeroed
    anyway (`optimiser`), and this way autodiff does not compute their gradient at all (for the
    texture, the renderer's scatter into the UV map and G's backward pass)."""
    if not blocks:
        return params
    return params.replace(**{b: jax.lax.stop_gradient(getattr(params, b)) for b in blocks})


def pixel_budget_for(config: FitConfig, image_size) -> Optional[float]:
    """The fraction of an unbatched step's render `render_face` may shade as a compacted list:
    `config.pixel_budget`, or None (the whole grid) for a render of fewer than
    `config.pixel_budget_min_pixels` pixels."""
    height, width = camera_lib.image_hw(image_size)
    return None if height * width < config.pixel_budget_min_pixels else config.pixel_budget


def _stage_loss(stage, config: FitConfig, pixel_budget, pipeline, params, target, key,
                light_init):
    params = without_gradient(params, config.frozen)
    if stage == 1:
        return landmark_stage_loss(params, target, pipeline, config.weights)
    return loss(params, target, pipeline, key, config.weights, config.random_render, light_init,
                pixel_budget, config.extra_terms)


def texture_step_scale(pipeline: Pipeline) -> float:
    return float(getattr(pipeline.texture_params, "step_scale", 1.0))


def make_step(config: FitConfig, stage: int, share_axis: Optional[str] = None,
              batched: bool = False):
    """One Adam step: a function (pipeline, params, opt_state, target, key, light_init) →
    (params, opt_state, terms). With `share_axis` (a vmap axis name), shape and texture are
    averaged across that axis after the step (Eq. 13, multi-frame fitting). `batched`: the step
    will run under vmap (no compacted shading: `FitConfig.pixel_budget`)."""
    unbatched = not batched and share_axis is None

    def step(pipeline, params, opt_state, target, key, light_init):
        tx = optimiser(stage_learning_rate(config, stage), params, stage,
                       texture_step_scale(pipeline), config.frozen,
                       pipeline.model.expression_range)
        pixel_budget = pixel_budget_for(config, pipeline.image_size) if unbatched else None
        loss_fn = functools.partial(_stage_loss, stage, config, pixel_budget, pipeline)
        if config.remat:
            loss_fn = jax.checkpoint(loss_fn)
        (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, target, key, light_init)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if share_axis is not None:
            params = params.replace(shape=jax.lax.pmean(params.shape, share_axis),
                                    texture=jax.lax.pmean(params.texture, share_axis))
        return params, opt_state, dict(terms, total=total)

    return step


def make_chunk(config: FitConfig, stage: int, share_axis: Optional[str] = None,
               batched: bool = False):
    """A function (pipeline, params, opt_state, target, key, light_init) → (params, opt_state,
    terms) running `config.chunk` steps (`make_step`) in one lax.scan; terms are per step."""
    step = make_step(config, stage, share_axis, batched)

    def chunk(pipeline, params, opt_state, target, key, light_init):
        def body(carry, k):
            params, opt_state, terms = step(pipeline, *carry, target, k, light_init)
            return (params, opt_state), terms

        keys = jax.random.split(key, config.chunk)
        (params, opt_state), terms = jax.lax.scan(body, (params, opt_state), keys)
        return params, opt_state, terms

    return chunk


def _vectorise(fn, mode):
    if mode == "single":
        return fn
    axis = "frames" if mode == "frames" else None
    return jax.vmap(fn, in_axes=(None, 0, 0, 0, 0, 0), axis_name=axis)


def uses_scan(config: FitConfig) -> bool:
    """Whether chunks run as one lax.scan (accelerators) or as a host loop of jitted steps (CPU:
    XLA's CPU backend runs a step inside a while loop ~2.5× slower than the same step alone,
    measured on the 2-core dev machine; BENCHMARKS.md)."""
    if config.loop not in ("auto", "scan", "host"):
        raise ValueError(f"FitConfig.loop must be 'auto', 'scan' or 'host', got {config.loop!r}")
    return config.loop == "scan" or (config.loop == "auto" and jax.default_backend() != "cpu")


# XLA:CPU hands dots, convolutions and reductions to YNNPACK by default. For the fitting step's
# small convolutions (dlib's 32-256 channels on 72² down to 4², the 128² ProGAN) XLA's other
# paths are faster, and so is the machine's big reference convolution (155-180 vs ~95 GFLOP/s,
# `experiments.benchmark_fit.machine_rates`): the CPU step is compiled with YNNPACK off.
# cpu-small step, weights compiled in: 78-80 → 66-68 ms (2-core dev machine, interleaved;
# BENCHMARKS.md). Session 3 had kept YNNPACK to dots and convolutions (reductions were slow).
# XLA:CPU's older loop emitters (fusion emitters off) compile the step ~35% faster (cpu-small:
# 27-31 → 18-20 s) and run it as fast (BENCHMARKS.md, session 7). 512-bit vectors where the
# CPU has them (AVX-512; XLA prefers 256): a view's program ~3% faster on one core, the step
# 46.1 → 45.5 ms (faster in 8 of 9 interleaved rounds; session 8). No effect without AVX-512.
CPU_STEP_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "",
                             "xla_cpu_use_fusion_emitters": False,
                             "xla_cpu_prefer_vector_width": 512}


# A pipeline up to this size is compiled into the CPU step as constants: its network weights
# are fixed during a fit, and as constants XLA folds, once at compile time, what it otherwise
# redoes every step (the flipped, transposed kernels of every backward convolution: ~15 ms of a
# ~110 ms cpu-small step). Larger pipelines (the paper's iResNet-100 and 512² GAN) stay
# arguments: folding hundreds of MB of constants costs more compile time than it saves.
CONSTANT_PIPELINE_MAX_BYTES = 128 * 2 ** 20


@functools.lru_cache(maxsize=None)
def cpu_step_compiler_options(backend: str):
    """The options of CPU_STEP_COMPILER_OPTIONS this jaxlib knows, on the CPU backend (each
    tried on a trivial program; XLA's defaults are correct without them), else None."""
    if backend != "cpu":
        return None
    known = {}
    for name, value in CPU_STEP_COMPILER_OPTIONS.items():
        try:
            jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
                jnp.zeros((), jnp.float32)).compile()
        except Exception:  # noqa: BLE001 -- an XLA without the option
            continue
        known[name] = value
    return known or None


def pipeline_bytes(pipeline: Pipeline) -> int:
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(pipeline))


def pipeline_as_constants(config: FitConfig, pipeline: Pipeline) -> bool:
    """Whether the host loop's step compiles `pipeline` in as constants (see
    CONSTANT_PIPELINE_MAX_BYTES). The lax.scan path (accelerators) always takes it as an
    argument."""
    if config.constant_pipeline not in ("auto", "always", "never"):
        raise ValueError("FitConfig.constant_pipeline must be 'auto', 'always' or 'never', got "
                         f"{config.constant_pipeline!r}")
    if config.constant_pipeline != "auto":
        return config.constant_pipeline == "always"
    return not uses_scan(config) and pipeline_bytes(pipeline) <= CONSTANT_PIPELINE_MAX_BYTES


@dataclasses.dataclass(frozen=True)
class BoundStep:
    """One jitted step bound to a pipeline: call it as (params, opt_state, target, key,
    light_init). `jitted` takes the pipeline first unless it was compiled in (then
    `pipeline_args` is empty); `lower` gives the AOT stages (cost and memory analysis)."""

    jitted: Callable
    pipeline_args: tuple

    def __call__(self, *args):
        return self.jitted(*self.pipeline_args, *args)

    def lower(self, *args):
        return self.jitted.lower(*self.pipeline_args, *args)


def _dependent_outputs(jaxpr, dependent_inputs):
    """Which of `jaxpr`'s outputs depend on the inputs flagged in `dependent_inputs`: dataflow
    through its equations, into nested jit/call bodies; any other nested program (cond, scan,
    custom rules) counts as depending on all of its inputs, which errs on the safe side."""
    from jax.extend import core as jcore

    dependent = {v for v, d in zip(jaxpr.invars, dependent_inputs) if d}

    def depends(v):
        return isinstance(v, jcore.Var) and v in dependent

    for eqn in jaxpr.eqns:
        inputs = [depends(v) for v in eqn.invars]
        if not any(inputs):
            continue
        body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        body = getattr(body, "jaxpr", body)
        if (isinstance(body, jcore.Jaxpr) and len(body.invars) == len(inputs)
                and len(body.outvars) == len(eqn.outvars)):
            outputs = _dependent_outputs(body, inputs)
        else:
            outputs = [True] * len(eqn.outvars)
        dependent.update(v for v, d in zip(eqn.outvars, outputs) if d)
    return [depends(v) for v in jaxpr.outvars]


def vjp_with_constant_residuals(fn, x):
    """jax.vjp(fn, ·) as two functions to jit separately, (forward, backward):
    forward(x) → (fn(x), residuals) and backward(residuals, cotangent) → the cotangent of x.

    The VJP's residuals that do not depend on x (for the texture GAN: its scaled and
    rearranged kernels) are computed once, here, and closed over by `backward`, so they are
    compiled into it as constants and XLA folds what it derives from them (each backward
    convolution's flipped, transposed kernel) at compile time instead of every step; `forward`
    returns only the residuals that depend on x. `x` gives the shape and dtype (its value is
    only used to evaluate the constant residuals, which do not depend on it)."""
    treedef = {}

    def leaves(x):
        flat, treedef["vjp"] = jax.tree.flatten(jax.vjp(fn, x)[1])
        return flat

    closed = jax.make_jaxpr(leaves)(x)
    dependent = _dependent_outputs(closed.jaxpr, [True] * len(closed.jaxpr.invars))
    constants = jax.jit(lambda x: [r for r, d in zip(leaves(x), dependent) if not d])(x)

    def forward(x):
        out, vjp = jax.vjp(fn, x)
        return out, [r for r, d in zip(jax.tree.leaves(vjp), dependent) if d]

    def backward(residuals, cotangent):
        varying, fixed = iter(residuals), iter(constants)
        flat = [next(varying) if d else next(fixed) for d in dependent]
        return jax.tree.unflatten(treedef["vjp"], flat)(cotangent)[0]

    return forward, backward


class TwoViewStep:
    """Stage 2 for one photo on the CPU as four programs, called like a BoundStep: (params,
    opt_state, target, key, light_init) → (params, opt_state, terms).

    1. G(p_t) forward, returning its VJP residuals;
    2. the photo's view: L_lan, L_pix, L_id, L_con, Reg and their gradient, given G(p_t);
    3. the random view of Eq. 7: λ̂_id·L̂_id and its gradient, given G(p_t) — on a second thread,
       beside 2;
    4. G's backward pass of both texture gradients, then the Adam update.
    The sum of 2 and 3 is Eq. 12 term by term, so the gradient is the fused step's (tested).
    1 and 4 are compiled on the first call, with G's residuals that do not depend on p_t as
    constants of 4 (`vjp_with_constant_residuals`)."""

    pipeline_args = ()  # the pipeline is compiled in, as in a BoundStep of constants

    def __init__(self, config: FitConfig, pipeline: Pipeline, compiler_options):
        weights = config.weights
        unweighted = {f.name: 0.0 for f in dataclasses.fields(losses.LossWeights)}
        view_weights = (dataclasses.replace(weights, identity_random=0.0),
                        losses.LossWeights(**dict(unweighted,
                                                  identity_random=weights.identity_random)))
        given_texture = pipeline.replace(texture_fn=_given_texture, texture_params=None)

        def view(w, extra_terms):
            def view_loss(params, texture, target, key, light_init):
                params = without_gradient(params.replace(texture=texture), config.frozen)
                return loss(params, target, given_texture, key, w,
                            config.random_render, light_init,
                            pixel_budget_for(config, pipeline.image_size), extra_terms)

            return jax.jit(jax.value_and_grad(view_loss, argnums=(0, 1), has_aux=True),
                           compiler_options=compiler_options)

        self._config, self._pipeline, self._options = config, pipeline, compiler_options
        self._generate = self._update = None  # compiled for p_t's shape on the first call
        # a research term belongs to the photo's view, whose render it is given
        self._views = (view(view_weights[0], config.extra_terms), view(view_weights[1], ()))

    def _compile_texture_programs(self, p_t):
        config, pipeline = self._config, self._pipeline
        generate, texture_backward = vjp_with_constant_residuals(
            functools.partial(pipeline.texture_fn, pipeline.texture_params), p_t)

        def update(residuals, view_grads, view_texture_grads, view_totals, params, opt_state):
            # the two views' gradients and losses summed here, not by eager ops between the
            # programs (~0.2 ms of dispatch on the step's critical path)
            grads = jax.tree.map(jnp.add, *view_grads)
            texture_grads = view_texture_grads[0] + view_texture_grads[1]
            grads = grads.replace(
                texture=grads.texture + texture_backward(residuals, texture_grads))
            tx = optimiser(stage_learning_rate(config, 2), params, 2,
                           texture_step_scale(pipeline), config.frozen,
                           pipeline.model.expression_range)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, view_totals[0] + view_totals[1]

        self._generate = jax.jit(generate, compiler_options=self._options)
        self._update = jax.jit(update, compiler_options=self._options)

    def __call__(self, params, opt_state, target, key, light_init, overlap=True):
        """overlap=False runs the random view after the photo's, on this thread (for timing)."""
        first_call = self._generate is None
        if first_call:
            self._compile_texture_programs(params.texture)
        texture, texture_residuals = self._generate(params.texture)
        args = (params, texture, target, key, light_init)
        if first_call:
            # traced and lowered here one after the other, so the random view reuses the photo
            # view's traced render (`_default_render`), then compiled on two threads below;
            # traced on two threads, each would trace its own while holding the other back
            for view in self._views:
                view.trace(*args).lower()
        if overlap:
            # Dispatched, not waited for: the random view's program is enqueued from the worker
            # thread (XLA:CPU runs programs enqueued from one thread one after another, from two
            # threads side by side), and the update is enqueued behind both views before they
            # finish, so no Python (thread start, join, the update's dispatch) lies between the
            # views and the update: the cpu-small step 40.82 -> 40.22 ms (BENCHMARKS.md,
            # session 11).
            second = _VIEW_DISPATCHER.submit(self._views[1], *args)
            (total, terms), (grads, texture_grads) = self._views[0](*args)
            (total2, terms2), (grads2, texture_grads2) = second.result()
        else:
            (total, terms), (grads, texture_grads) = jax.block_until_ready(self._views[0](*args))
            (total2, terms2), (grads2, texture_grads2) = self._views[1](*args)
        params, opt_state, total = self._update(texture_residuals, (grads, grads2),
                                                (texture_grads, texture_grads2), (total, total2),
                                                params, opt_state)
        # the random view's program also evaluates L_lan and Reg (weighted 0): the photo's count
        return params, opt_state, dict(terms2, **terms, total=total)


# One long-lived worker thread that enqueues TwoViewStep's second view (starting a thread per
# step cost ~0.4 ms of the step); its thread starts on the first submit, not at import.
_VIEW_DISPATCHER = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                         thread_name_prefix="ganfit-random-view")


def _given_texture(_, texture):
    return texture


def hold_texture(pipeline: Pipeline, params: FitParams, vectorised: bool = False):
    """A frozen texture (`FitConfig.frozen`, e.g. `fit --track`): G(p_t) is the same at every
    step, so it is generated once, here, and the steps run on a pipeline whose texture is that
    UV map (or per-vertex colours), neither running G forward nor back-propagating through it.
    Returns (that pipeline, `params` with G(p_t) in place of p_t); `run_stage` does this itself
    and puts p_t back after the stage."""
    textures = _generated(pipeline.texture_fn, pipeline.texture_params, params.texture,
                          vectorised)
    return (pipeline.replace(texture_fn=_given_texture, texture_params=None),
            params.replace(texture=textures))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _generated(texture_fn, texture_params, p_t, vectorised):
    if vectorised:
        return jax.vmap(texture_fn, in_axes=(None, 0))(texture_params, p_t)
    return texture_fn(texture_params, p_t)


def two_view_step_applies(config: FitConfig, stage: int, mode: str, pipeline: Pipeline) -> bool:
    """Whether `bound_step` gives a `TwoViewStep`: stage 2 of one photo in the CPU's host loop,
    pipeline compiled in, both views present (an identity network and λ̂_id > 0), no remat."""
    return (config.two_threads and stage == 2 and mode == "single" and not config.remat
            and jax.default_backend() == "cpu" and pipeline.identity_fn is not None
            and config.weights.identity_random > 0 and pipeline_as_constants(config, pipeline))


def per_photo_batch_applies(config: FitConfig, stage: int, mode: str) -> bool:
    """Whether `bound_step` steps a batch photo after photo (`PerPhotoStep`;
    `FitConfig.batch_steps`) in the host loop: independent photos ('batch') or one person's
    frames ('frames', their shape and texture then averaged after the step, as the vmapped
    step's mean over its axis does)."""
    if config.batch_steps not in ("auto", "vmap", "per_photo"):
        raise ValueError("FitConfig.batch_steps must be 'auto', 'vmap' or 'per_photo', got "
                         f"{config.batch_steps!r}")
    if mode == "single" or uses_scan(config) or config.batch_steps == "vmap":
        return False
    return config.batch_steps == "per_photo" or (
        stage == 2 and jax.default_backend() == "cpu" and jax.local_device_count() == 1)


class PerPhotoStep:
    """A batch of independent photos stepped one photo after another with the single-photo
    step (`bound_step(config, stage, 'single', pipeline)`), called like the vmapped step:
    (params, opt_state, target, keys, light_init), each with a leading batch axis, and giving
    its outputs stacked the same way. Photo i gets keys[i], as under vmap, so the results are
    the vmapped step's (tested). On the CPU the single step's compacted shading and two threads
    beat vmap, whose batched renders shade every pixel in one program.

    shared: the batch is one person's frames (Eq. 13): each frame's own Adam step, then shape
    and texture set to their mean over the frames, which is what the vmapped step's mean over
    its 'frames' axis (`make_step`'s share_axis) computes."""

    pipeline_args = ()

    def __init__(self, single, shared=False):
        self.single = single
        self.shared = shared
        self._target = None  # (the batch's target, its photos): the same for a whole stage

    def __call__(self, params, opt_state, target, keys, light_init):
        n = keys.shape[0]
        if self._target is None or self._target[0] is not target:
            self._target = (target, _unstack(target, n))
        photos = _unstack((params, opt_state, keys, light_init), n)
        stepped = [self.single(p, s, t, k, light)
                   for (p, s, k, light), t in zip(photos, self._target[1])]
        return _stack_shared(stepped) if self.shared else _stack(stepped)


@jax.jit
def _stack_shared(steps):
    """Stacked (params, opt_state, terms) of one person's frames, with every frame's shape and
    texture their mean (Eq. 13's shared blocks)."""
    params, opt_state, terms = _stack(steps)
    mean = lambda x: jnp.broadcast_to(jnp.mean(x, axis=0), x.shape)  # noqa: E731
    return params.replace(shape=mean(params.shape), texture=mean(params.texture)), opt_state, terms


_CONSTANT_STEPS = {}  # (config, stage, mode, backend) → the latest pipeline's (treedef, leaves, step)


@functools.lru_cache(maxsize=64)
def _step_function(config: FitConfig, stage: int, mode: str):
    return _vectorise(make_step(config, stage, share_axis="frames" if mode == "frames" else None,
                                batched=mode != "single"), mode)


@functools.lru_cache(maxsize=64)
def _jitted_step(config: FitConfig, stage: int, mode: str, backend: str):
    return jax.jit(_step_function(config, stage, mode),
                   compiler_options=cpu_step_compiler_options(backend))


def bound_step(config: FitConfig, stage: int, mode: str, pipeline: Pipeline):
    """The step `fitting.fit` runs on the host (mode as in `compiled_chunk`), jitted once per
    configuration and, when `pipeline_as_constants`, once per pipeline (the latest is kept, so
    fitting photo after photo with one pipeline compiles once). A `PerPhotoStep` where
    `per_photo_batch_applies`, a `TwoViewStep` where `two_view_step_applies`, else a
    `BoundStep`."""
    # a step is the same whatever the chunk it runs in: a fit's shorter last chunk reuses it
    config = dataclasses.replace(config, chunk=1)
    if per_photo_batch_applies(config, stage, mode):
        single = bound_step(config, stage, "single", pipeline)
        key = ("per_photo", config, stage, mode)
        held = _CONSTANT_STEPS.get(key)
        if held is None or held.single is not single:
            held = _CONSTANT_STEPS[key] = PerPhotoStep(single, shared=mode == "frames")
        return held
    backend = jax.default_backend()
    if not pipeline_as_constants(config, pipeline):
        return BoundStep(_jitted_step(config, stage, mode, backend), (pipeline,))
    key = (config, stage, mode, backend)
    leaves, treedef = jax.tree.flatten(pipeline)
    held = _CONSTANT_STEPS.get(key)
    # the same pipeline, also when rebuilt from the same arrays (`pipeline.replace(...)` in a
    # loop); the held leaves keep those arrays alive, so `is` cannot match a reused id
    if held is None or held[0] != treedef or any(a is not b for a, b in zip(held[1], leaves)):
        options = cpu_step_compiler_options(backend)
        if two_view_step_applies(config, stage, mode, pipeline):
            step = TwoViewStep(config, pipeline, options)
        else:
            step = BoundStep(jax.jit(functools.partial(_step_function(config, stage, mode),
                                                       pipeline), compiler_options=options), ())
        held = (treedef, leaves, step)
        _CONSTANT_STEPS[key] = held
    return held[2]


@functools.lru_cache(maxsize=64)
def compiled_chunk(config: FitConfig, stage: int, mode: str = "single"):
    """The chunk of `config.chunk` steps, compiled once per shape (cached, so fitting photo after
    photo compiles once). mode: "single", "batch" (vmap, independent images) or "frames" (vmap,
    shared identity). Same signature and results whether it scans or loops on the host."""
    axis = "frames" if mode == "frames" else None
    if uses_scan(config):
        return jax.jit(_vectorise(make_chunk(config, stage, share_axis=axis,
                                             batched=mode != "single"), mode),
                       compiler_options=cpu_step_compiler_options(jax.default_backend()))
    split = jax.jit(functools.partial(jax.random.split, num=config.chunk))
    if mode != "single":
        split = jax.jit(jax.vmap(functools.partial(jax.random.split, num=config.chunk)))
    chunk_axis = 0 if mode == "single" else 1

    def looped(pipeline, params, opt_state, target, key, light_init):
        keys = split(key)  # the keys lax.scan would use: (chunk, 2) or (batch, chunk, 2)
        step = bound_step(config, stage, mode, pipeline)
        per_step = []
        for i in range(config.chunk):
            k = keys[i] if mode == "single" else keys[:, i]
            params, opt_state, terms = step(params, opt_state, target, k, light_init)
            per_step.append(terms)
        terms = jax.tree.map(lambda *t: jnp.stack(t, axis=chunk_axis), *per_step)
        return params, opt_state, terms

    return looped


def _print_progress(stage, done, total, terms, t0, log):
    elapsed = time.time() - t0
    eta = elapsed / max(done, 1) * (total - done)
    shown = " ".join(f"{k}={float(np.mean(v[-1])):.4g}" for k, v in sorted(terms.items()))
    log(f"stage {stage} iter {done}/{total} {shown} elapsed {elapsed:.1f}s eta {eta:.1f}s")


def batch_sharding(batch_size: int):
    """NamedSharding that splits a leading batch axis over this process's devices (a 1-D 'batch'
    mesh), or None when it has one device or the batch does not divide evenly.

    This process's devices, not every host's: photos are fitted independently, so after
    `jax.distributed.initialize()` each process fits its own photos (`experiments/fit.py
    --images` splits the folder by `jax.process_index()`) and no step waits for another host;
    one global mesh would put every host in lock step for nothing, and every host would have to
    run the same number of batches."""
    devices = jax.local_devices()
    if len(devices) == 1 or batch_size % len(devices):
        return None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))


def init_opt_state(config: FitConfig, stage: int, params: FitParams, texture_step=1.0,
                   vectorised=False):
    """The stage's optimiser state (`optimiser`) for `params`, vmapped over their leading axis
    when `vectorised`, as one program: run op by op, optax's zeros and the blocks' units would
    each compile a program for every leaf's shape (14 in a batch fit)."""
    def init(p):
        return optimiser(stage_learning_rate(config, stage), p, stage, texture_step,
                         config.frozen).init(p)

    return jax.jit(jax.vmap(init) if vectorised else init)(params)


def run_stage(pipeline: Pipeline, params: FitParams, target: Target, config: FitConfig,
              stage: int, iterations: int, key, batched=False, frames=False, log=print):
    """Runs one stage; returns (params, history: term → (iterations[, batch]) arrays).

    batched: params/targets carry a leading batch axis and are fitted independently (vmap).
    frames: like batched, but the batch is frames of one person sharing shape and texture.
    """
    vectorised = batched or frames
    if stage == 2 and "texture" in config.frozen and pipeline.texture_fn not in (
            None, _given_texture):
        latent = params.texture
        pipeline, params = hold_texture(pipeline, params, vectorised)
        params, history = run_stage(pipeline, params, target, config, stage, iterations, key,
                                    batched, frames, log)
        return params.replace(texture=latent), history
    mode = "frames" if frames else "batch" if batched else "single"
    light_init = params.light  # Reg on light pulls towards where stage 2 starts
    opt_state = init_opt_state(config, stage, params, texture_step_scale(pipeline), vectorised)
    if vectorised:
        n = params.shape.shape[0]
        # frames too: their shared shape and texture are a mean over the vmapped axis
        # (`make_step`), which the partitioned step takes across devices
        sharding = batch_sharding(n)
        if sharding is None and jax.local_device_count() > 1 and log is not None:
            log(f"{n} {'frames' if frames else 'photos'} do not divide evenly over "
                f"{jax.local_device_count()} devices: fitting them on one")
        if sharding is not None:
            # the batch axis lives split over devices; jit partitions the vmapped step to match
            params, opt_state, target, light_init = jax.device_put(
                (params, opt_state, target, light_init), sharding)

        def call(run, p, s, k):
            keys = jax.random.split(k, n)
            if sharding is not None:
                keys = jax.device_put(keys, sharding)
            return run(pipeline, p, s, target, keys, light_init)
    else:
        call = lambda run, p, s, k: run(pipeline, p, s, target, k, light_init)
    history = {}
    t0 = time.time()
    # exactly `iterations` steps: whole chunks, then one as long as the remainder (where chunks
    # scan, a program of its own; the host loop's step is the same)
    whole, rest = divmod(iterations, config.chunk)
    done = 0
    for length in [config.chunk] * whole + [rest] * (rest > 0):
        run = compiled_chunk(config if length == config.chunk
                             else dataclasses.replace(config, chunk=length), stage, mode)
        key, sub = jax.random.split(key)
        params, opt_state, terms = call(run, params, opt_state, sub)
        done += length
        terms = jax.device_get(terms)
        if vectorised:  # (batch, chunk) → (chunk, batch)
            terms = {k: np.moveaxis(np.asarray(v), 0, 1) for k, v in terms.items()}
        for k, v in terms.items():
            history.setdefault(k, []).append(np.asarray(v))
        if log is not None:
            _print_progress(stage, done, iterations, terms, t0, log)
    history = {k: np.concatenate(v, axis=0) for k, v in history.items()}
    return params, history


def fit(pipeline: Pipeline, params: FitParams, target: Target, config: FitConfig = FitConfig(),
        key=None, batched=False, frames=False, log=print, between_stages=None):
    """Stage 1 (landmarks; shape, expression, camera) then stage 2 (Eq. 12, everything).

    between_stages(params) → params runs once after stage 1 (e.g. `texture_from_photo`).
    Each stage runs exactly its iteration count (`config.chunk` steps between progress lines).
    Returns (params, {stage: history}).
    """
    key = jax.random.PRNGKey(0) if key is None else key
    k1, k2 = jax.random.split(key)
    histories = {}
    if config.stage1_iterations:
        params, histories[1] = run_stage(pipeline, params, target, config, 1,
                                         config.stage1_iterations, k1, batched, frames, log)
    if between_stages is not None:
        params = between_stages(params)
    if config.stage2_iterations:
        params, histories[2] = run_stage(pipeline, params, target, config, 2,
                                         config.stage2_iterations, k2, batched, frames, log)
    return params, histories


def texture_from_photo(pipeline: Pipeline, params: FitParams, image, inversion_steps=100,
                       pixel_weight=None):
    """Starts the texture latent from the photo unwrapped onto the stage-1 mesh: directly for a
    texture model that can read a UV map (`latent_from_uv`), by GAN/PCA inversion (Sec. 3.1,
    masked L1) for the others. `pixel_weight`: the target's face mask; what it hides is not
    unwrapped (its mirror texel's colour where that one shows). Not jitted; runs once between
    the stages."""
    from ganfit_jax.texture import inversion, unwrap

    tex = pipeline.texture_params
    if not hasattr(tex, "generate") or not hasattr(tex, "resolution"):
        return params
    verts = morphable.vertices(pipeline.model, params.shape, params.expression)
    uv_map, mask = unwrap.unwrap(pipeline.model, verts, params.camera, np.asarray(image),
                                 tex.resolution, pixel_weight=pixel_weight)
    if hasattr(tex, "latent_from_uv"):
        return params.replace(texture=tex.latent_from_uv(uv_map, mask))
    latent, _ = inversion.invert(tex, uv_map, (mask > 0).astype(np.float32), p_init=params.texture,
                                 steps=inversion_steps)
    return params.replace(texture=latent)


def fit_frames(frames, model, seed=0, identity="dlib", identity_weights=None, texture=None,
               stage1_iterations=FitConfig.stage1_iterations, iterations=300, image_size=224, detector="hog",
               weights: losses.LossWeights = losses.LossWeights(), log=print, face=0):
    """Multi-frame GANFIT on images of one person (Eq. 13): per-frame expression, pose and
    light, one shape and texture. Landmarks are detected with dlib, the person followed from
    frame to frame as `fit --frames` follows them (`landmarks.follow_person`: the first frame's
    `face`-th largest face); frames without a face are left out (at least one must have one).

    Args:
      frames: list of float32 (H,W,3) images in [0,1].
      model: a MorphableModel.
      identity: 'dlib', 'tiny', 'none' or an ArcFace name (with identity_weights).
      texture: a texture model (GAN, PCA, direct); default the prior-free direct UV map.

    Returns a dict: vertices (N,3) mm of the shared identity at neutral expression, params
    (the batched FitParams), used (indices of the frames fitted), history.
    """
    from ganfit_jax import identity as identity_lib
    from ganfit_jax import inputs, landmarks
    from ganfit_jax.texture.direct import DirectUVTexture

    key = jax.random.PRNGKey(seed)
    k_id, k_fit = jax.random.split(key)
    texture = DirectUVTexture() if texture is None else texture
    net = None
    if identity != "none":
        net = (identity_lib.load_identity("tiny", key=k_id) if identity == "tiny"
               else identity_lib.load_identity(identity, weights=identity_weights))
    size = (image_size, image_size)
    pipeline = make_pipeline(model, texture, net, size)
    starts, used = [], []
    for i, lm in landmarks.follow_person([np.asarray(f) for f in frames], detector, face):
        if isinstance(lm, ValueError):
            if log is not None:
                log(f"frame {i} left out: {lm}")
            continue
        crop, lm_crop, _ = inputs.crop_face(frames[i], lm, image_size)
        starts.append((init_params(model, lm_crop, size, texture.latent_dim,
                                   texture_init=texture.init_latent(k_id)),
                       target_from_image(pipeline, crop, lm_crop)))
        used.append(i)
    if not starts:
        raise ValueError(f"no face found in any of the {len(frames)} frames")
    config = FitConfig(stage1_iterations=stage1_iterations, stage2_iterations=iterations,
                       weights=weights)
    params, history = fit(pipeline, stack([s[0] for s in starts]), stack([s[1] for s in starts]),
                          config, k_fit, frames=True, log=log)
    vertices = morphable.vertices(model, params.shape[0], 0.0)
    return dict(vertices=np.asarray(vertices), params=params, used=used, history=history)


def stack(trees):
    """A batch pytree from a list of pytrees (leading axis)."""
    return _stack(list(trees))


def unstack(tree, n):
    """The first `n` entries of a batch pytree, a pytree each."""
    return _unstack(tree, n)


# one program each rather than a stack or slice per leaf: outside jit every leaf's shape would
# be its own compilation (and PerPhotoStep makes one dispatch each way per step, not one per
# array and photo)
@jax.jit
def _stack(trees):
    return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, n):
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]
