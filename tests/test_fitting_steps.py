"""Fitting steps: the pixel budget, a zero-weighted landmark term, the two-view step (Eq. 12's
views as programs on two threads) and the per-photo batch step each equal the plain step."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganfit_jax import fitting, losses
from test_fitting import SIZE, random_truth, synthetic_landmarks


@pytest.fixture(scope="module")
def tiny(sfm_dir):
    """The benchmark's tiny pipeline, its start and target: compiled steps are per pipeline."""
    from experiments import benchmark_fit

    key = jax.random.PRNGKey(0)
    return benchmark_fit.build("tiny", str(sfm_dir / "sfm_shape_3448.bin"), key)


@pytest.fixture(scope="module")
def two_views(tiny):
    """One TwoViewStep (compiled once, on its first call) shared by the tests below; off the
    CPU `bound_step` keeps the fused step, so the four programs are built directly."""
    config = fitting.FitConfig(loop="host")
    step = fitting.bound_step(config, 2, "single", tiny[0])
    if not isinstance(step, fitting.TwoViewStep):
        step = fitting.TwoViewStep(config, tiny[0], None)
    return step

def test_pixel_budget_leaves_the_loss_and_its_gradient_unchanged(sfm_model):
    """FitConfig.pixel_budget (compacted shading of the covered pixels in unbatched steps) is a
    speed choice only: Eq. 12 and its gradient equal the whole-grid renders, with the face inside
    the budget and beyond it (the fallback); batched steps never compact."""
    from ganfit_jax.texture.direct import DirectUVTexture

    tex = DirectUVTexture(coarse=4, resolution=16)
    pipe = fitting.make_pipeline(sfm_model, tex, None, SIZE)
    truth = random_truth(sfm_model, 3).replace(texture=tex.init_latent() + 0.2)
    photo, aux = fitting.render_face(pipe, truth)
    covered = float(np.asarray(aux["mask"]).mean())
    lm = synthetic_landmarks(sfm_model, truth)
    target = fitting.Target(image=photo, landmarks=jnp.asarray(lm))
    p0 = fitting.init_params(sfm_model, lm, SIZE, tex.latent_dim, texture_init=tex.init_latent())
    key = jax.random.PRNGKey(0)

    def value_and_grad(budget):
        f = lambda p: fitting.loss(p, target, pipe, key, pixel_budget=budget)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(p0)

    ref_value, ref_grad = value_and_grad(None)
    for budget in (min(1.0, covered * 1.5), covered * 0.5):
        value, grad = value_and_grad(budget)
        np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                       atol=1e-5 * float(np.abs(np.asarray(b)).max()) + 1e-12)
    cfg = fitting.FitConfig()
    opt = fitting.optimiser(cfg.learning_rate, p0, 2).init(p0)
    args = (pipe, p0, opt, target, key, p0.light)
    conds = lambda step: str(jax.make_jaxpr(step)(*args)).count(" cond[")  # noqa: E731
    assert conds(fitting.make_step(cfg, 2)) >= 1  # the main render (no identity net here)
    assert conds(fitting.make_step(cfg, 2, batched=True)) == 0
    # a render of fewer pixels is shaded whole: its step never earns the cond's compilation back
    small = dataclasses.replace(cfg, pixel_budget_min_pixels=SIZE[0] * SIZE[1] + 1)
    assert conds(fitting.make_step(small, 2)) == 0
    assert fitting.pixel_budget_for(cfg, SIZE) == cfg.pixel_budget
    assert fitting.pixel_budget_for(cfg, (64, 64)) is None
    assert fitting.pixel_budget_for(dataclasses.replace(cfg, pixel_budget_min_pixels=0),
                                    (64, 64)) == cfg.pixel_budget


def test_a_landmark_term_weighted_zero_is_reported_but_not_differentiated(sfm_model):
    """λ_lan = 0 (the random view's program of a TwoViewStep): L_lan is still reported, its
    gradient is exactly zero, and XLA is not asked to back-propagate through the projection
    (the compiled gradient counts fewer FLOPs than with λ_lan > 0)."""
    from ganfit_jax.texture.direct import DirectUVTexture

    tex = DirectUVTexture(coarse=4, resolution=16)
    pipe = fitting.make_pipeline(sfm_model, tex, None, SIZE)
    truth = random_truth(sfm_model, 5)
    lm = synthetic_landmarks(sfm_model, truth)
    target = fitting.Target(image=jnp.zeros(SIZE + (3,)), landmarks=jnp.asarray(lm) + 3.0)
    p0 = fitting.init_params(sfm_model, lm, SIZE, tex.latent_dim, texture_init=tex.init_latent())
    p0 = p0.replace(shape=p0.shape + 0.1)
    key = jax.random.PRNGKey(0)
    only = dict(identity=0.0, identity_random=0.0, content=0.0, pixel=0.0, expression_reg=0.0,
                light_reg=0.0, shape_reg=0.05)

    def program(landmark):
        weights = losses.LossWeights(landmark=landmark, **only)
        f = lambda p: fitting.loss(p, target, pipe, key, weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (total, terms), grad = program(0.0)(p0)
    assert float(terms["landmark"]) > 1.0  # reported: the target is 3 px off
    np.testing.assert_allclose(float(total), float(terms["reg"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad.shape), 2 * 0.05 * np.asarray(p0.shape), rtol=1e-5)
    for g in (grad.expression, grad.camera, grad.light, grad.texture):
        assert not np.any(np.asarray(g))
    _, fitted = program(0.01)(p0)
    assert np.any(np.asarray(fitted.camera))  # with λ_lan > 0 the landmarks pull the camera

    def flops(landmark):
        cost = program(landmark).lower(p0).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert flops(0.0) < flops(0.01)


def test_two_view_step_equals_the_fused_step(tiny, two_views):
    """FitConfig.two_threads (one photo, CPU, pipeline compiled in): Eq. 12's photo view and
    random view as programs on two threads give the fused step's parameters, optimiser state and
    terms, step after step; it is used only where both views exist."""
    pipe, params, target = tiny
    key = jax.random.PRNGKey(0)
    threaded = fitting.FitConfig(loop="host")
    fused = dataclasses.replace(threaded, two_threads=False)
    one = fitting.bound_step(fused, 2, "single", pipe)
    # only the CPU runs a program's small ops one after another; elsewhere the step stays fused
    on_cpu = jax.default_backend() == "cpu"
    assert isinstance(fitting.bound_step(threaded, 2, "single", pipe),
                      fitting.TwoViewStep) == on_cpu
    assert isinstance(one, fitting.BoundStep)
    tx = fitting.optimiser(threaded.learning_rate, params, 2, fitting.texture_step_scale(pipe))
    a = b = (params, tx.init(params))
    for i in range(3):
        k = jax.random.fold_in(key, i)
        *a, terms_a = two_views(*a, target, k, params.light)
        *b, terms_b = one(*b, target, k, params.light)
        assert sorted(terms_a) == sorted(terms_b)
        assert "identity_random" in terms_a and "identity" in terms_a
        for name in terms_b:
            np.testing.assert_allclose(terms_a[name], terms_b[name], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # the SFM's blendshapes keep to [0, 1] in both: some were pushed below and held at 0
    expression = np.asarray(a[0].expression)
    assert expression.min() >= 0.0 and np.any(expression == 0.0), expression
    # not where a view is missing, under remat, for batches or for stage 1
    no_random = dataclasses.replace(
        threaded, weights=dataclasses.replace(threaded.weights, identity_random=0.0))
    assert not fitting.two_view_step_applies(no_random, 2, "single", pipe)
    assert not fitting.two_view_step_applies(threaded, 2, "single",
                                             pipe.replace(identity_fn=None))
    assert not fitting.two_view_step_applies(dataclasses.replace(threaded, remat=True), 2,
                                             "single", pipe)
    assert not fitting.two_view_step_applies(threaded, 2, "batch", pipe)
    assert not fitting.two_view_step_applies(threaded, 1, "single", pipe)
    assert fitting.two_view_step_applies(threaded, 2, "single", pipe) == on_cpu


def test_the_photos_view_is_rendered_only_where_a_term_sees_it(tiny):
    """The random view's program of a TwoViewStep weighs every term but λ̂_id·L̂_id zero: the
    photo's view is then not rendered (nor differentiated, nor lowered) at all; with the
    pixel, identity, content or a research term on, it is."""
    from ganfit_jax import render

    pipe, params, target = tiny
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[4])  # the camera it renders from
        return render.render(*args, **kwargs)

    pipe = pipe.replace(render_fn=counted)
    zero = losses.LossWeights(**{f.name: 0.0 for f in dataclasses.fields(losses.LossWeights)})
    key = jax.random.PRNGKey(0)

    def renders(weights, extra_terms=()):
        calls.clear()
        f = lambda p: fitting.loss(p, target, pipe, key, weights,  # noqa: E731
                                   extra_terms=extra_terms)[0]
        jax.make_jaxpr(jax.value_and_grad(f))(params)
        return len(calls)

    assert renders(dataclasses.replace(zero, identity_random=2.0)) == 1  # the random view only
    assert renders(zero) == 0
    for name in ("pixel", "identity", "content"):
        assert renders(dataclasses.replace(zero, **{name: 1.0})) == 1, name
    assert renders(zero, (("coverage", 1.0, lambda p, t, pl, r: r["coverage"].mean()),)) == 1
    assert renders(losses.LossWeights()) == 2
    # and the random view alone still reports L_lan, unweighted, for the photo's program
    value, terms = fitting.loss(params, target, pipe, key, dataclasses.replace(
        zero, identity_random=2.0))
    assert set(terms) == {"landmark", "reg", "identity_random"}
    np.testing.assert_allclose(float(value), 2.0 * float(terms["identity_random"]), rtol=1e-6)


def test_a_render_and_an_identity_of_given_shapes_are_traced_once_for_every_program(
        sfm_dir, monkeypatch):
    """Both renders of Eq. 12 (the photo's view, the random view) have the same shapes, and so
    have both images the identity network sees: the default renderer and `identity_of` are
    jitted functions of their own (`fitting._default_render`), each traced and differentiated
    once and reused in the fused step and across a TwoViewStep's programs."""
    from experiments import benchmark_fit
    from ganfit_jax import identity
    from ganfit_jax.render import raster

    traced = {"render": 0, "identity": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            traced[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(raster, "rasterize", counted("render", raster.rasterize))
    monkeypatch.setattr(identity, "embed", counted("identity", identity.embed))
    # a render size no other test traces, so JAX's trace caches start empty for it
    monkeypatch.setitem(benchmark_fit.CONFIGS, "tiny-72",
                        dict(benchmark_fit.CONFIGS["tiny"], render=72))
    pipe, params, target = benchmark_fit.build("tiny-72", str(sfm_dir / "sfm_shape_3448.bin"),
                                               jax.random.PRNGKey(0))
    assert traced == {"render": 0, "identity": 1}  # the photo's features (Target)
    key = jax.random.PRNGKey(1)
    f = lambda p: fitting.loss(p, target, pipe, key)  # noqa: E731
    jax.make_jaxpr(jax.value_and_grad(f, has_aux=True))(params)
    assert traced == {"render": 1, "identity": 1}
    # the programs of a TwoViewStep's two views, as its first call traces them
    texture = pipe.texture_fn(pipe.texture_params, params.texture)
    for view in fitting.TwoViewStep(fitting.FitConfig(), pipe, None)._views:
        view.trace(params, texture, target, key, params.light)
    assert traced == {"render": 1, "identity": 1}


def test_two_view_step_dispatch_paths_agree_and_reraise_the_random_views_error(tiny, two_views):
    """The random view enqueued from the worker thread (overlap=True) and run after the photo's
    on the caller's thread (overlap=False) give the same step; an error on the random view's
    thread reaches the caller (not a silent missing term)."""
    pipe, params, target = tiny
    key = jax.random.PRNGKey(1)
    opt_state = fitting.optimiser(0.01, params, 2, fitting.texture_step_scale(pipe)).init(params)
    args = (params, opt_state, target, key, params.light)
    overlapped = two_views(*args)
    serial = two_views(*args, overlap=False)
    for x, y in zip(jax.tree.leaves(overlapped), jax.tree.leaves(serial)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(overlapped[2]["total"]) > 0

    def broken(*_):
        raise RuntimeError("random view failed")

    broken_step = copy.copy(two_views)  # the shared step keeps its own views
    broken_step._views = (two_views._views[0], broken)
    with pytest.raises(RuntimeError, match="random view failed"):
        broken_step(*args)


def fit_vmapped_and_per_photo(pipe, params, target, key, mode):
    """(per-photo fit, vmapped fit), each (params, history), of a batch (`mode` 'batch') or of
    one person's frames ('frames'); checks which step `bound_step` gave each."""
    results = {}
    for steps in ("vmap", "per_photo"):
        cfg = fitting.FitConfig(stage1_iterations=2, stage2_iterations=4, chunk=2,
                                batch_steps=steps)
        results[steps] = fitting.fit(pipe, params, target, cfg, key, batched=mode == "batch",
                                     frames=mode == "frames", log=None)
        assert isinstance(fitting.bound_step(cfg, 2, mode, pipe),
                          fitting.PerPhotoStep) == (steps == "per_photo")
    return results["per_photo"], results["vmap"]


def assert_same_fit(got, want):
    (got, got_hist), (want, want_hist) = got, want
    for stage in (1, 2):
        for name, v in want_hist[stage].items():
            np.testing.assert_allclose(got_hist[stage][name], v, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(b)).max()))


def test_frames_per_photo_equal_the_vmapped_frames(tiny):
    """One person's frames (Eq. 13) stepped frame after frame, shape and texture then averaged,
    give what the vmapped step with its mean over the 'frames' axis gives: the same shared shape
    and texture (the same in every frame), expressions, cameras and per-step terms."""
    pipe, params, target = tiny
    ps = fitting.stack([params, params.replace(camera=params.camera.at[0].add(20.0)),
                        params.replace(expression=params.expression + 0.1)])
    ts = fitting.stack([target, target.replace(landmarks=target.landmarks + 1.5),
                        target.replace(landmarks=target.landmarks - 1.0)])
    got, want = fit_vmapped_and_per_photo(pipe, ps, ts, jax.random.PRNGKey(5), "frames")
    assert_same_fit(got, want)
    fitted = got[0]
    for block in (fitted.shape, fitted.texture):  # shared: one value in every frame
        np.testing.assert_array_equal(np.asarray(block), np.asarray(block[:1]).repeat(3, 0))
    assert np.abs(np.asarray(fitted.expression[0] - fitted.expression[2])).max() > 1e-3


def test_batch_per_photo_equals_the_vmapped_batch(tiny):
    """FitConfig.batch_steps='per_photo' (on one CPU device the default for stage 2 of `fit
    --images`): photo after photo with the single-photo step, each photo with its own key as
    under vmap, gives the vmapped batch's parameters and per-step terms, random view included."""
    pipe, params, target = tiny
    ps = fitting.stack([params, params.replace(shape=params.shape + 0.2)])
    ts = fitting.stack([target, target.replace(landmarks=target.landmarks + 1.5)])
    got, want = fit_vmapped_and_per_photo(pipe, ps, ts, jax.random.PRNGKey(3), "batch")
    assert got[1][2]["identity_random"].shape == (4, 2)
    assert_same_fit(got, want)
    auto = fitting.FitConfig()
    on_one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert fitting.per_photo_batch_applies(auto, 2, "batch") == on_one_cpu
    assert not fitting.per_photo_batch_applies(auto, 1, "batch")
    assert fitting.per_photo_batch_applies(auto, 2, "frames") == on_one_cpu
    assert not fitting.per_photo_batch_applies(
        dataclasses.replace(auto, batch_steps="per_photo"), 2, "single")
    assert not fitting.per_photo_batch_applies(dataclasses.replace(auto, loop="scan"), 2, "batch")
    with pytest.raises(ValueError, match="batch_steps"):
        fitting.per_photo_batch_applies(dataclasses.replace(auto, batch_steps="loop"), 2, "batch")


def brightness(params, target, pipeline, render):
    """A research term of the photo's view: the mean brightness of the render's face."""
    mask = render["mask"][..., None]
    return jnp.sum(render["image"] * mask) / (3 * jnp.sum(mask) + 1e-6)


def expression_pull(params, target, pipeline, render):
    return jnp.square(params.expression[0] - 3.0)


def test_extra_terms_join_eq12_in_every_step(tiny, two_views):
    """FitConfig.extra_terms: a term of the render and a term of the parameters are added to
    stage 2's loss with their weights and reported by name; the two-view step (the term in the
    photo's view) equals the fused step with them (the step every other mode runs, vmapped or
    photo after photo); malformed terms are refused by name."""
    pipe, params, target = tiny
    terms = (("brightness", 0.5, brightness), ("pull", 1000.0, expression_pull))
    threaded = fitting.FitConfig(loop="host", extra_terms=terms)
    fused = dataclasses.replace(threaded, two_threads=False)
    key = jax.random.PRNGKey(3)
    two = fitting.TwoViewStep(threaded, pipe, None)
    one = fitting.bound_step(fused, 2, "single", pipe)
    tx = fitting.optimiser(threaded.learning_rate, params, 2, fitting.texture_step_scale(pipe))
    a = b = (params, tx.init(params))
    for i in range(2):
        k = jax.random.fold_in(key, i)
        if i == 0:  # Eq. 12 alone at the same point (the plain step's terms, before its update)
            *_, plain = two_views(params, tx.init(params), target, k, params.light)
        *a, terms_a = two(*a, target, k, params.light)
        *b, terms_b = one(*b, target, k, params.light)
        assert {"brightness", "pull"} <= set(terms_a) and sorted(terms_a) == sorted(terms_b)
        for name in terms_b:
            np.testing.assert_allclose(terms_a[name], terms_b[name], rtol=1e-5, atol=1e-6)
        if i == 0:
            expected = (float(plain["total"]) + 0.5 * float(terms_b["brightness"])
                        + 1000.0 * float(terms_b["pull"]))
            np.testing.assert_allclose(float(terms_b["total"]), expected, rtol=1e-5)
            np.testing.assert_allclose(float(terms_b["pull"]),
                                       (float(params.expression[0]) - 3) ** 2, rtol=1e-5)
            assert 0 < float(terms_b["brightness"]) < 1
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    # two steps of the pull (weight 1000: it outweighs Eq. 12's own) moved e0 towards 3
    assert float(a[0].expression[0]) > float(params.expression[0])
    for bad in ((("landmark", 1.0, expression_pull),), (("x", -1.0, expression_pull),),
                (("x", 1.0, None),), (("x", 1.0, brightness), ("x", 1.0, brightness))):
        with pytest.raises(ValueError, match="extra_terms"):
            fitting.FitConfig(extra_terms=bad)
