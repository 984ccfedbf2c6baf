"""Masked PCA texture model in UV space (GANFIT Eq. 1, the linear baseline of Fig. 5(i)).

UV maps unwrapped from photos miss texels (occluded or outside the image), so the builder is a
PCA with missing data. Method: iterative low-rank imputation ("hard impute" / EM-PCA, e.g.
Ilin & Raiko, JMLR 2010): fill each unobserved value with the observed mean of its texel, then
repeat { fit mean + rank-r PCA to the completed data; replace ONLY the unobserved values by their
rank-r reconstruction } until the imputed values stop changing. Observed values are never
modified, so at full rank (K = n - 1) the model reproduces every training map exactly on its
observed texels. Texels no map observed get 0.5 grey and `coverage` 0.

The imputation rank r must be below n - 1: at full rank the reconstruction equals the completed
data and the imputation would never move (the default is about half the maps).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from ganfit_jax.texture.model import PCATexture


def _pca(X):
    """Mean and (D, n) components + singular values of the rows of X via the n x n Gram matrix."""
    mean = X.mean(axis=0)
    Xc = X - mean
    gram = Xc @ Xc.T
    evals, U = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, U = np.maximum(evals[order], 0.0), U[:, order]
    s = np.sqrt(evals)
    keep = s > s[0] * 1e-9 if s.size and s[0] > 0 else np.zeros_like(s, bool)
    V = (Xc.T @ U[:, keep]) / s[keep]
    return mean, V, s[keep], U[:, keep], Xc


def build_masked_pca(images, masks=None, num_components: int | None = None,
                     imputation_rank: int | None = None, iterations: int = 50,
                     tol: float = 1e-4, return_completed: bool = False):
    """Build a `PCATexture` from UV maps with per-texel observation masks.

    Args:
      images: (n, H, W, 3) UV maps in [0, 1].
      masks: (n, H, W) or (n, H, W, 1) observation masks (>= 0.5 means observed), or None.
      num_components: K, at most n - 1 (default n - 1, i.e. full rank); capped at the numerical
        rank of the completed data (components with zero variance are dropped).
      imputation_rank: rank used to fill unobserved texels (default min(K, max(1, (n-1)//2))).
      iterations, tol: stop when the largest change of an imputed value is below tol.
      return_completed: also return the completed (n, H, W, 3) data.
    Returns:
      PCATexture with basis scaled to standard deviations: p_t ~ N(0, I) on the training set.
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected (n, H, W, 3), got {images.shape}")
    n, h, w, _ = images.shape
    if n < 2:
        raise ValueError(f"images: need at least 2 UV maps for PCA, got {n}")
    if masks is None:
        observed = np.ones((n, h, w), bool)
    else:
        masks = np.asarray(masks)
        if masks.ndim == 4 and masks.shape[-1] == 1:
            masks = masks[..., 0]
        if masks.shape != (n, h, w):
            raise ValueError(f"masks: expected ({n}, {h}, {w}) or ({n}, {h}, {w}, 1), "
                             f"got {masks.shape}")
        observed = masks >= 0.5
    k = n - 1 if num_components is None else int(num_components)
    if not 1 <= k <= n - 1:
        raise ValueError(f"num_components must be in [1, {n - 1}] for {n} maps, got {k}")
    r = min(k, max(1, (n - 1) // 2)) if imputation_rank is None else int(imputation_rank)
    if not 1 <= r <= n - 1:
        raise ValueError(f"imputation_rank must be in [1, {n - 1}], got {r}")

    X = images.reshape(n, -1)
    obs = np.repeat(observed.reshape(n, -1), 3, axis=1)
    counts = obs.sum(axis=0)
    texel_mean = np.where(counts > 0, (X * obs).sum(axis=0) / np.maximum(counts, 1), 0.5)
    X = np.where(obs, X, texel_mean)
    missing = ~obs
    if missing.any():
        for _ in range(iterations):
            mean, V, s, U, Xc = _pca(X)
            rr = min(r, s.size)
            recon = mean + (U[:, :rr] * s[:rr]) @ V[:, :rr].T
            change = np.max(np.abs(recon[missing] - X[missing]))
            X[missing] = recon[missing]
            if change < tol:
                break
    mean, V, s, _, _ = _pca(X)
    k = min(k, s.size)
    basis = V[:, :k] * (s[:k] / np.sqrt(n - 1))
    model = PCATexture(jnp.asarray(mean.reshape(h, w, 3), jnp.float32),
                       jnp.asarray(basis.reshape(h, w, 3, k), jnp.float32),
                       jnp.asarray(observed.mean(axis=0), jnp.float32))
    if return_completed:
        return model, X.reshape(n, h, w, 3).astype(np.float32)
    return model


def project(model: PCATexture, uv_map, mask=None, ridge: float = 0.0):
    """Least-squares p_t with T(p_t) closest to `uv_map` on observed texels (ridge: prior weight).

    Solves min_p ||M (mean + B p - I)||^2 + ridge ||p||^2 (normal equations, pure JAX).
    """
    uv_map = jnp.asarray(uv_map, jnp.float32)
    if uv_map.shape != model.mean.shape:
        raise ValueError(f"uv_map: expected {tuple(model.mean.shape)}, got {tuple(uv_map.shape)}")
    m = jnp.ones(uv_map.shape[:2], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    m = jnp.broadcast_to(m.reshape(m.shape[0], m.shape[1], -1)[..., :1], uv_map.shape).reshape(-1)
    B = model.basis.reshape(-1, model.latent_dim)
    r = (uv_map - model.mean).reshape(-1)
    A = (B * m[:, None]).T @ B + ridge * jnp.eye(model.latent_dim)
    return jnp.linalg.solve(A, (B * m[:, None]).T @ r)


def build_from_folder(directory, resolution: int, **kwargs):
    """`build_masked_pca` over a folder of UV maps (NAME.png + optional NAME_mask.png)."""
    from ganfit_jax.texture import uv_io

    _, images, masks = uv_io.load_uv_folder(directory, resolution)
    return build_masked_pca(images, masks, **kwargs)
