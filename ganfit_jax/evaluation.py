"""Geometric evaluation of reconstructions against 3D scans (GANFIT Sec. 4.2, Table 1).

The MICC Florence protocol of GANFIT's Table 1 follows Genova et al., "Unsupervised Training for
3D Morphable Model Regression" (CVPR 2018): the ground-truth scan is cropped to a sphere of 95 mm
around the nose tip, the reconstruction is rigidly aligned to it by ICP, and the error is the
*symmetric* point-to-plane distance in millimetres — the mean distance from the reconstruction
to the scan and from the scan to the reconstruction, averaged:

    E = 1/2 ( mean_{p in R} d(p, S) + mean_{q in S} d(q, R) )

Two readings of d(., M) are in use and both are here:
  * ``"plane"``: the distance to the tangent plane of the nearest vertex of M, |(p - v) . n_v|
    (the classic point-to-plane residual of ICP);
  * ``"surface"``: the exact distance to the closest point on M's triangles (what the released
    GANFIT/OSTeC MICC benchmark computes with a VTK closest-point locator, and what NoW calls
    scan-to-mesh distance).
``"point"`` (nearest vertex) is the point-to-point distance.

Everything here is NumPy/SciPy, not traced: evaluation runs once per mesh, on meshes whose size
(raw scans) differs from call to call. The only file readers are `load_mesh` and its helpers.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import numpy as np
from scipy.spatial import cKDTree

DEFAULT_CROP_RADIUS_MM = 95.0  # Genova et al. 2018 / GANFIT Table 1
NOSE_TIP_IBUG = 30  # 0-based index of iBUG point 31, the nose tip


# --------------------------------------------------------------------------------------------
# Mesh basics
# --------------------------------------------------------------------------------------------


def _as_points(x, name):
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"{name}: expected an (N,3) array of points, got shape {x.shape}")
    return x


def _as_triangles(t, num_vertices, name="triangles"):
    t = np.asarray(t, np.int64)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected an (F,3) integer array, got shape {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= num_vertices):
        raise ValueError(f"{name}: indices must lie in [0,{num_vertices}), "
                         f"got [{t.min()},{t.max()}]")
    return t


def vertex_normals(vertices, triangles):
    """Area-weighted unit vertex normals (N,3); vertices in no triangle get a zero normal."""
    v = _as_points(vertices, "vertices")
    t = _as_triangles(triangles, len(v))
    face = np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]])
    normals = np.zeros_like(v)
    for k in range(3):
        np.add.at(normals, t[:, k], face)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 0, normals / np.maximum(length, 1e-300), 0.0)


@dataclasses.dataclass(frozen=True)
class Crop:
    """A cropped mesh: its vertices, re-indexed triangles and the kept original vertex indices."""

    vertices: np.ndarray
    triangles: np.ndarray
    indices: np.ndarray


def crop(vertices, triangles, center, radius=DEFAULT_CROP_RADIUS_MM) -> Crop:
    """Keeps exactly the vertices within `radius` (mm, inclusive) of `center`.

    `center` is a point (3,) or a vertex index. Triangles survive only if all three corners do,
    so the crop's surface never reaches outside the sphere.
    """
    v = _as_points(vertices, "vertices")
    t = _as_triangles(triangles, len(v))
    center = np.asarray(center)
    if center.ndim == 0:
        if not 0 <= int(center) < len(v):
            raise ValueError(f"center: vertex index {int(center)} outside [0,{len(v)})")
        center = v[int(center)]
    elif center.shape != (3,):
        raise ValueError(f"center: expected a point (3,) or a vertex index, got {center.shape}")
    if not radius > 0:
        raise ValueError(f"radius: expected a positive distance in mm, got {radius}")
    keep = np.linalg.norm(v - center, axis=1) <= radius
    indices = np.flatnonzero(keep)
    remap = -np.ones(len(v), np.int64)
    remap[indices] = np.arange(len(indices))
    tri_keep = keep[t].all(axis=1)
    return Crop(v[indices], remap[t[tri_keep]], indices)


def find_nose_tip(vertices, forward=(0.0, 0.0, 1.0), up=(0.0, 1.0, 0.0), lateral_radius=35.0,
                  neighbours=10) -> int:
    """Index of the nose tip of a roughly frontal face scan.

    The usual heuristic for scans without landmarks: the nose tip is the most protruding point
    along the viewing direction. To keep hair, shoulders or a jutting chin from winning we
    (1) look only near the face's lateral centre (within 2.5 `lateral_radius` mm of the median in
    the plane orthogonal to `forward`, then within `lateral_radius` of that first guess) and
    (2) score each point by the median protrusion of its `neighbours` nearest points, so an
    isolated spike of scanner noise cannot win.

    Args:
      vertices: (N,3) points in mm of a face looking along `forward` with `up` roughly up.
      forward, up: the face's viewing and up directions (SFM/MICC frontal: +z, +y).
    """
    v = _as_points(vertices, "vertices")
    f = np.asarray(forward, np.float64)
    f /= np.linalg.norm(f)
    height = np.asarray(up, np.float64)
    height = height - f * (height @ f)
    height /= np.linalg.norm(height)
    side = np.cross(height, f)
    plane = np.stack([v @ side, v @ height], axis=1)
    depth = v @ f
    centre = np.median(plane, axis=0)
    tree = cKDTree(v)
    best = None
    # a wide first window (the median may sit low when the scan includes neck and shoulders),
    # then a narrow one re-centred on the first guess
    for radius in (2.5 * lateral_radius, lateral_radius):
        window = np.flatnonzero(np.linalg.norm(plane - centre, axis=1) <= radius)
        if window.size == 0:
            window = np.arange(len(v))
        top = window[np.argsort(depth[window])[-min(200, window.size):]]
        _, near = tree.query(v[top], k=min(neighbours, len(v)))
        score = np.median(depth[near.reshape(len(top), -1)], axis=1)
        best = int(top[np.argmax(score)])
        centre = plane[best]
    return best


# --------------------------------------------------------------------------------------------
# Similarity transforms, landmark alignment and ICP
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Similarity:
    """x ↦ scale · R x + t."""

    scale: float = 1.0
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(3))

    def __call__(self, points):
        return self.scale * np.asarray(points, np.float64) @ self.rotation.T + self.translation

    def then(self, other: "Similarity") -> "Similarity":
        """other ∘ self: apply self first."""
        return Similarity(other.scale * self.scale, other.rotation @ self.rotation,
                          other.scale * other.rotation @ self.translation + other.translation)

    def matrix(self):
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m


def umeyama(source, target, with_scale=True, weights=None) -> Similarity:
    """Least-squares similarity (or rigid, `with_scale=False`) transform mapping source → target.

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    TPAMI 1991: R from the SVD of the cross-covariance with the reflection fixed by a sign flip,
    scale = trace(D S) / var(source).
    """
    src = _as_points(source, "source")
    dst = _as_points(target, "target")
    if src.shape != dst.shape:
        raise ValueError(f"source and target must correspond one to one, got {src.shape} and "
                         f"{dst.shape}")
    if len(src) < 3:
        raise ValueError(f"need at least 3 corresponding points, got {len(src)}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = 1.0
    if with_scale:
        var = np.sum(w * np.sum(xs ** 2, axis=1))
        if var <= 0:
            raise ValueError("source points are all identical; the scale is undefined")
        scale = float(np.sum(d * sign) / var)
    return Similarity(scale, rotation, mu_d - scale * rotation @ mu_s)


def align_landmarks(source_landmarks, target_landmarks, mode="similarity") -> Similarity:
    """Initial alignment from corresponding landmarks (NaN rows are ignored).

    mode: "similarity" (rotation, translation and scale) or "rigid" (no scale).
    """
    if mode not in ("similarity", "rigid"):
        raise ValueError(f"mode: expected 'similarity' or 'rigid', got {mode!r}")
    src = _as_points(source_landmarks, "source_landmarks")
    dst = _as_points(target_landmarks, "target_landmarks")
    if src.shape != dst.shape:
        raise ValueError(f"landmark sets differ in shape: {src.shape} vs {dst.shape}")
    ok = np.isfinite(src).all(axis=1) & np.isfinite(dst).all(axis=1)
    return umeyama(src[ok], dst[ok], with_scale=(mode == "similarity"))


def _rotation_from_vector(w):
    """Rodrigues: the rotation by angle |w| about w/|w|."""
    angle = np.linalg.norm(w)
    if angle < 1e-15:
        return np.eye(3)
    k = w / angle
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * kx + (1 - np.cos(angle)) * kx @ kx


@dataclasses.dataclass(frozen=True)
class IcpResult:
    transform: Similarity
    errors: np.ndarray  # mean residual (mm) at each iteration, before its update
    iterations: int
    converged: bool


def icp(source, target_vertices, target_triangles=None, *, with_scale=False, method="point",
        init: Optional[Similarity] = None, max_iterations=100, tolerance=1e-7,
        max_correspondence_distance=None) -> IcpResult:
    """Iterative closest point aligning `source` points to a target mesh/point cloud (Besl & McKay
    1992; point-to-plane of Chen & Medioni 1992).

    Each iteration pairs every transformed source point with its nearest target vertex
    (cKDTree), drops pairs farther than `max_correspondence_distance` (mm, None keeps all), and
    solves for the update: "point" minimises Σ|s R p + t - q|² in closed form (Umeyama);
    "plane" minimises Σ((s R p + t - q)·n_q)² linearised in the small rotation (and scale), with
    n_q the target's vertex normals (needs `target_triangles`). Iteration stops when the mean
    residual changes by less than `tolerance` (relative), or repeats its value of two iterations
    before (a 2-cycle of the nearest-vertex pairing), or after `max_iterations`.

    Returns the accumulated transform mapping the original `source` onto the target.
    """
    if method not in ("point", "plane"):
        raise ValueError(f"method: expected 'point' or 'plane', got {method!r}")
    src = _as_points(source, "source")
    tgt = _as_points(target_vertices, "target_vertices")
    normals = None
    if method == "plane":
        if target_triangles is None:
            raise ValueError("method='plane' needs target_triangles for the target's normals")
        normals = vertex_normals(tgt, target_triangles)
    tree = cKDTree(tgt)
    transform = init or Similarity()
    errors, converged = [], False
    for it in range(max_iterations):
        moved = transform(src)
        dist, j = tree.query(moved)
        keep = np.ones(len(src), bool)
        if max_correspondence_distance is not None:
            keep = dist <= max_correspondence_distance
        if method == "plane":
            keep &= np.linalg.norm(normals[j], axis=1) > 0
        if keep.sum() < 6:
            raise ValueError(f"ICP: only {keep.sum()} correspondences within "
                             f"{max_correspondence_distance} mm; the initial alignment is too "
                             "far off")
        p, q = moved[keep], tgt[j[keep]]
        if method == "point":
            errors.append(float(dist[keep].mean()))
            step = umeyama(p, q, with_scale=with_scale)
        else:
            n = normals[j[keep]]
            residual = np.sum((p - q) * n, axis=1)
            errors.append(float(np.abs(residual).mean()))
            # r(x) ≈ residual + (w × p')·n + t·n + ds (p'·n), p' centred for conditioning
            centre = p.mean(axis=0)
            pc = p - centre
            columns = [np.cross(pc, n), n]
            if with_scale:
                columns.append(np.sum(pc * n, axis=1, keepdims=True))
            a = np.concatenate(columns, axis=1)
            x, *_ = np.linalg.lstsq(a, -(residual), rcond=None)
            rot = _rotation_from_vector(x[:3])
            scale = 1.0 + (x[6] if with_scale else 0.0)
            # x ↦ s R (x - centre) + centre + t
            step = Similarity(scale, rot, centre + x[3:6] - scale * rot @ centre)
        transform = transform.then(step)
        # relative change, with a floor of 1 nm so exact fits (error ~1e-12 mm) stop too; the
        # discrete nearest-vertex pairing can also settle into a 2-cycle, which is as converged
        # as it gets
        tol = max(tolerance * errors[-1], 1e-6)
        if (it > 0 and abs(errors[-2] - errors[-1]) <= tol) or (
                it > 1 and abs(errors[-3] - errors[-1]) <= tol):
            converged = True
            break
    return IcpResult(transform, np.asarray(errors), len(errors), converged)


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


def closest_point_on_triangles(points, a, b, c):
    """Exact closest point on triangle (a_i, b_i, c_i) to points_i, all (M,3).

    Voronoi-region classification of the point against the triangle's vertices, edges and face
    (Ericson, Real-Time Collision Detection, Sec. 5.1.5); degenerate triangles fall back to
    their edges. Returns (M,3).
    """
    p, a, b, c = (np.asarray(x, np.float64) for x in (points, a, b, c))
    ab, ac, ap = b - a, c - a, p - a
    d1 = np.einsum("ij,ij->i", ab, ap)
    d2 = np.einsum("ij,ij->i", ac, ap)
    bp = p - b
    d3 = np.einsum("ij,ij->i", ab, bp)
    d4 = np.einsum("ij,ij->i", ac, bp)
    cp = p - c
    d5 = np.einsum("ij,ij->i", ab, cp)
    d6 = np.einsum("ij,ij->i", ac, cp)
    vc = d1 * d4 - d3 * d2
    vb = d5 * d2 - d1 * d6
    va = d3 * d6 - d5 * d4
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ab = d1 / (d1 - d3)
        t_ac = d2 / (d2 - d6)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        denom = va + vb + vc
        v_in = vb / denom
        w_in = vc / denom
    on_ab = a + np.nan_to_num(t_ab)[:, None] * ab
    on_ac = a + np.nan_to_num(t_ac)[:, None] * ac
    on_bc = b + np.nan_to_num(t_bc)[:, None] * (c - b)
    inside = a + np.nan_to_num(v_in)[:, None] * ab + np.nan_to_num(w_in)[:, None] * ac
    conditions = [
        (d1 <= 0) & (d2 <= 0),
        (d3 >= 0) & (d4 <= d3),
        (vc <= 0) & (d1 >= 0) & (d3 <= 0),
        (d6 >= 0) & (d5 <= d6),
        (vb <= 0) & (d2 >= 0) & (d6 <= 0),
        (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0),
    ]
    choices = [a, b, on_ab, c, on_ac, on_bc]
    out = inside.copy()
    # np.select semantics (first true wins) but on (M,3) rows
    chosen = np.zeros(len(p), bool)
    for cond, val in zip(conditions, choices):
        take = cond & ~chosen
        out[take] = val[take]
        chosen |= take
    degenerate = ~chosen & ((denom == 0) | ~np.isfinite(v_in) | ~np.isfinite(w_in))
    if degenerate.any():  # zero-area triangle: nearest of its three edges
        idx = np.flatnonzero(degenerate)
        best = None
        for u, w in ((a, b), (a, c), (b, c)):
            e = w[idx] - u[idx]
            ee = np.einsum("ij,ij->i", e, e)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.clip(np.nan_to_num(np.einsum("ij,ij->i", p[idx] - u[idx], e) / ee), 0, 1)
            cand = u[idx] + s[:, None] * e
            dd = np.sum((p[idx] - cand) ** 2, axis=1)
            if best is None:
                best, bestd = cand, dd
            else:
                better = dd < bestd
                best[better], bestd[better] = cand[better], dd[better]
        out[idx] = best
    return out


def closest_points_on_mesh(points, vertices, triangles, chunk=50000):
    """Exact closest points on a triangle mesh: (closest (M,3), distance (M,), triangle (M,)).

    Exact, not approximate: with u the distance to the nearest mesh vertex, the closest triangle
    T lies within u of the point, so its centroid lies within u + r_T (r_T the largest distance
    from its centroid to a corner). Triangles are bucketed by r_T in powers of two; each bucket
    is searched with a centroid-tree ball query of radius u + (the bucket's largest r_T), so a
    few huge triangles cost no more than a few small ones.
    """
    p = _as_points(points, "points")
    v = _as_points(vertices, "vertices")
    t = _as_triangles(triangles, len(v))
    if len(t) == 0:
        raise ValueError("closest_points_on_mesh: the mesh has no triangles")
    corners = v[t]
    centroid = corners.mean(axis=1)
    radius = np.linalg.norm(corners - centroid[:, None], axis=2).max(axis=1)
    unit = 2.0 * np.median(radius) + 1e-9
    level = np.maximum(np.ceil(np.log2(np.maximum(radius, 1e-300) / unit)), 0).astype(int)
    bound, _ = cKDTree(v[np.unique(t)]).query(p)
    best_d2 = np.full(len(p), np.inf)
    best_tri = np.zeros(len(p), np.int64)
    best_pt = np.zeros_like(p)

    for lv in np.unique(level):
        members = np.flatnonzero(level == lv)
        reach = radius[members].max() + 1e-9
        tree = cKDTree(centroid[members])
        for start in range(0, len(p), chunk):
            sl = slice(start, start + chunk)
            # best_d2 so far also bounds the search, which prunes the later (bigger) buckets
            r = np.minimum(bound[sl], np.sqrt(best_d2[sl])) + reach
            lists = tree.query_ball_point(p[sl], r)
            lengths = np.fromiter((len(x) for x in lists), np.int64, len(lists))
            if lengths.sum() == 0:
                continue
            qi = np.repeat(np.arange(start, start + len(lists)), lengths)
            ti = members[np.concatenate([np.asarray(x, np.int64) for x in lists])]
            cp = closest_point_on_triangles(p[qi], corners[ti, 0], corners[ti, 1],
                                            corners[ti, 2])
            d2 = np.sum((p[qi] - cp) ** 2, axis=1)
            order = np.lexsort((d2, qi))
            qs, first = np.unique(qi[order], return_index=True)
            win = order[first]
            better = d2[win] < best_d2[qs]
            qs, win = qs[better], win[better]
            best_d2[qs], best_tri[qs], best_pt[qs] = d2[win], ti[win], cp[win]
    return best_pt, np.sqrt(best_d2), best_tri


def point_to_point_distances(points, target_vertices):
    """Distance from each point to the nearest target vertex (M,)."""
    return cKDTree(_as_points(target_vertices, "target_vertices")).query(
        _as_points(points, "points"))[0]


def point_to_plane_distances(points, target_vertices, target_triangles):
    """|(p - v)·n_v| with v the nearest target vertex and n_v its normal (M,)."""
    tgt = _as_points(target_vertices, "target_vertices")
    normals = vertex_normals(tgt, target_triangles)
    p = _as_points(points, "points")
    _, j = cKDTree(tgt).query(p)
    return np.abs(np.sum((p - tgt[j]) * normals[j], axis=1))


def scan_to_mesh_distances(scan_points, mesh_vertices, mesh_triangles):
    """NoW-style scan-to-mesh error (Sanyal et al., CVPR 2019): each scan point's distance to the
    closest point on the reconstructed mesh's surface (M,)."""
    return closest_points_on_mesh(scan_points, mesh_vertices, mesh_triangles)[1]


def now_statistics(scan_points, mesh_vertices, mesh_triangles):
    """The NoW benchmark's summary of scan-to-mesh errors: median, mean and std (mm)."""
    d = scan_to_mesh_distances(scan_points, mesh_vertices, mesh_triangles)
    return dict(median=float(np.median(d)), mean=float(d.mean()), std=float(d.std()))


DISTANCES = ("plane", "surface", "point")


def distances(points, target_vertices, target_triangles, kind="plane"):
    """One-directional per-point distance of the chosen kind (see module docstring)."""
    if kind == "plane":
        return point_to_plane_distances(points, target_vertices, target_triangles)
    if kind == "surface":
        return scan_to_mesh_distances(points, target_vertices, target_triangles)
    if kind == "point":
        return point_to_point_distances(points, target_vertices)
    raise ValueError(f"kind: expected one of {DISTANCES}, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class SymmetricError:
    mean: float  # ½(mean a→b + mean b→a), mm
    a_to_b: np.ndarray  # per vertex of a
    b_to_a: np.ndarray  # per vertex of b


def symmetric_distance(a_vertices, a_triangles, b_vertices, b_triangles, kind="plane"):
    """Symmetric distance of Genova et al. 2018 as in GANFIT Table 1: mean of both directions."""
    ab = distances(a_vertices, b_vertices, b_triangles, kind)
    ba = distances(b_vertices, a_vertices, a_triangles, kind)
    return SymmetricError(0.5 * (float(ab.mean()) + float(ba.mean())), ab, ba)


# --------------------------------------------------------------------------------------------
# The whole protocol
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Result of `evaluate`: errors (mm), the alignment and per-vertex error maps."""

    error: float  # symmetric distance of `kind`
    reconstruction_to_scan: float
    scan_to_reconstruction: float
    point_to_point: float  # symmetric nearest-vertex distance, for reference
    transform: Similarity  # maps the reconstruction into the scan's frame
    icp_iterations: int
    reconstruction_crop: Crop  # in the scan frame (aligned)
    scan_crop: Crop
    reconstruction_errors: np.ndarray  # per vertex of reconstruction_crop
    scan_errors: np.ndarray  # per vertex of scan_crop

    def as_row(self):
        return dict(error_mm=self.error, rec_to_scan_mm=self.reconstruction_to_scan,
                    scan_to_rec_mm=self.scan_to_reconstruction, p2p_mm=self.point_to_point,
                    scale=self.transform.scale, icp_iterations=self.icp_iterations)


def evaluate(reconstruction_vertices, reconstruction_triangles, scan_vertices, scan_triangles, *,
             scan_nose=None, reconstruction_nose=None, reconstruction_landmarks=None,
             scan_landmarks=None, landmark_mode="similarity", radius=DEFAULT_CROP_RADIUS_MM,
             kind="plane", icp_method="plane", icp_scale=False, icp_max_iterations=100,
             max_correspondence_distance=None, forward=(0.0, 0.0, 1.0)) -> Evaluation:
    """The MICC protocol: crop, align, ICP, symmetric distance.

    1. The scan is cropped to `radius` mm around its nose tip (`scan_nose`: point or vertex
       index; default `find_nose_tip`).
    2. Initial alignment of the reconstruction into the scan frame: from corresponding landmarks
       if both sets are given (`landmark_mode` similarity or rigid), else by translating the
       reconstruction's nose tip onto the scan's (both faces must then look along `forward`).
    3. The reconstruction is cropped to the same radius around its (aligned) nose tip and
       aligned to the scan crop by ICP (rigid; `icp_scale` adds a scale).
    4. The symmetric distance of `kind` between the two crops, plus per-vertex error maps.
    """
    rv = _as_points(reconstruction_vertices, "reconstruction_vertices")
    rt = _as_triangles(reconstruction_triangles, len(rv), "reconstruction_triangles")
    sv = _as_points(scan_vertices, "scan_vertices")
    st = _as_triangles(scan_triangles, len(sv), "scan_triangles")

    def _point(nose, verts, name):
        if nose is None:
            return verts[find_nose_tip(verts, forward)]
        nose = np.asarray(nose)
        if nose.ndim == 0:
            if not 0 <= int(nose) < len(verts):
                raise ValueError(f"{name}: vertex index {int(nose)} outside [0,{len(verts)})")
            return verts[int(nose)]
        if nose.shape != (3,):
            raise ValueError(f"{name}: expected a point (3,) or a vertex index, got {nose.shape}")
        return nose.astype(np.float64)

    use_landmarks = reconstruction_landmarks is not None and scan_landmarks is not None
    if use_landmarks:
        for lms, name in ((reconstruction_landmarks, "reconstruction_landmarks"),
                          (scan_landmarks, "scan_landmarks")):
            lms = _as_points(lms, name)
            if scan_nose is None and name == "scan_landmarks" and len(lms) == 68 \
                    and np.isfinite(lms[NOSE_TIP_IBUG]).all():
                scan_nose = lms[NOSE_TIP_IBUG]
            if reconstruction_nose is None and name == "reconstruction_landmarks" \
                    and len(lms) == 68 and np.isfinite(lms[NOSE_TIP_IBUG]).all():
                reconstruction_nose = lms[NOSE_TIP_IBUG]
    scan_tip = _point(scan_nose, sv, "scan_nose")
    rec_tip = _point(reconstruction_nose, rv, "reconstruction_nose")
    scan_crop = crop(sv, st, scan_tip, radius)
    if use_landmarks:
        init = align_landmarks(reconstruction_landmarks, scan_landmarks, landmark_mode)
    else:
        init = Similarity(translation=scan_tip - rec_tip)
    rec_crop = crop(rv, rt, rec_tip, radius / init.scale)
    if len(rec_crop.indices) < 6 or len(scan_crop.indices) < 6:
        raise ValueError(f"fewer than 6 vertices within {radius} mm of the nose tip "
                         f"(scan {len(scan_crop.indices)}, reconstruction "
                         f"{len(rec_crop.indices)}); check units (mm) and the nose tip")
    result = icp(rec_crop.vertices, scan_crop.vertices, scan_crop.triangles,
                 with_scale=icp_scale, method=icp_method, init=init,
                 max_iterations=icp_max_iterations,
                 max_correspondence_distance=max_correspondence_distance)
    aligned = Crop(result.transform(rec_crop.vertices), rec_crop.triangles, rec_crop.indices)
    sym = symmetric_distance(aligned.vertices, aligned.triangles, scan_crop.vertices,
                             scan_crop.triangles, kind)
    p2p = symmetric_distance(aligned.vertices, aligned.triangles, scan_crop.vertices,
                             scan_crop.triangles, "point")
    return Evaluation(sym.mean, float(sym.a_to_b.mean()), float(sym.b_to_a.mean()), p2p.mean,
                      result.transform, result.iterations, aligned, scan_crop, sym.a_to_b,
                      sym.b_to_a)


def error_map(reconstruction_vertices, num_vertices, evaluation: Evaluation, fill=np.nan):
    """Per-vertex error over the full (uncropped) reconstruction: NaN outside the crop."""
    out = np.full(num_vertices, fill, np.float64)
    out[evaluation.reconstruction_crop.indices] = evaluation.reconstruction_errors
    return out


# --------------------------------------------------------------------------------------------
# The NoW benchmark's protocol (Sanyal et al., CVPR 2019), validation set run locally
# --------------------------------------------------------------------------------------------


# NoW's seven alignment landmarks as iBUG-68 indices (0-based), in the order of its scans' .pp
# files: eye corners right-outer, right-inner, left-inner, left-outer; nose base; mouth corners
# right, left (the 51 inner points' 19, 22, 25, 28, 16, 31, 37, as DECA and MICA export them).
NOW_LANDMARKS_IBUG = (36, 39, 42, 45, 33, 48, 54)


def now_face_region(scan_landmarks):
    """(centre (3,), radius) of the sphere NoW's evaluation keeps of a scan, from its 7
    landmarks (eye corners right-outer, right-inner, left-inner, left-outer; nose base; mouth
    corners): the centre 30% of the way from the nose base up to the point between the inner eye
    corners, the radius 1.4 × the mean of the outer-eye-corner distance and that nose length."""
    lm = _as_points(scan_landmarks, "scan_landmarks")
    if len(lm) != 7:
        raise ValueError(f"scan_landmarks: NoW has 7 landmarks, got {len(lm)}")
    nose_base, bridge = lm[4], 0.5 * (lm[1] + lm[2])
    centre = nose_base + 0.3 * (bridge - nose_base)
    radius = 1.4 * 0.5 * (np.linalg.norm(lm[0] - lm[3]) + np.linalg.norm(bridge - nose_base))
    return centre, float(radius)


def now_scan_crop(scan_vertices, scan_landmarks):
    """The scan's vertices (M,3) inside `now_face_region`: the points NoW scores."""
    scan = _as_points(scan_vertices, "scan_vertices")
    centre, radius = now_face_region(scan_landmarks)
    points = scan[np.linalg.norm(scan - centre, axis=1) <= radius]
    if len(points) < 10:
        raise ValueError(f"only {len(points)} scan vertices lie within {radius:.1f} of the face "
                         "centre the landmarks give: landmarks of another scan?")
    return points


def surface_icp(points, mesh_vertices, mesh_triangles, max_iterations=30, tolerance=1e-4,
                with_scale=True):
    """The similarity (scale, rotation, translation; rigid without `with_scale`) that moves a
    mesh onto `points` (M,3),
    minimising the points' distances to its surface: each iteration pairs every point with the
    exact closest point of the moved mesh's triangles (`closest_points_on_mesh`) and takes the
    point-to-plane step against that triangle's plane (Chen & Medioni 1992, linearised in a
    small rotation and scale change; exact at a perfect fit, where nearest-vertex pairing and
    vertex normals would leave a bias on a coarse mesh), until the mean distance changes by less
    than `tolerance` (relative). Returns (the accumulated transform to apply to the mesh's
    vertices, mean distance per iteration)."""
    points = _as_points(points, "points")
    verts = _as_points(mesh_vertices, "mesh_vertices")
    triangles = _as_triangles(mesh_triangles, len(verts), "mesh_triangles")
    transform, errors = Similarity(), []
    for _ in range(max_iterations):
        moved = transform(verts)
        closest, distance, face = closest_points_on_mesh(points, moved, triangles)
        errors.append(float(distance.mean()))
        if len(errors) > 1 and abs(errors[-2] - errors[-1]) <= max(tolerance * errors[-1], 1e-9):
            break
        a, b, c = (moved[triangles[face, k]] for k in range(3))
        n = np.cross(b - a, c - a)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
        residual = np.sum((closest - points) * n, axis=1)
        centre = closest.mean(axis=0)
        q = closest - centre
        # the moved closest point s R q + centre + t ≈ q + w × q + ds q + centre + t
        columns = [np.cross(q, n), n] + ([np.sum(q * n, axis=1, keepdims=True)]
                                         if with_scale else [])
        x, *_ = np.linalg.lstsq(np.concatenate(columns, 1), -residual, rcond=None)
        scale, rotation = (1.0 + x[6] if with_scale else 1.0), _rotation_from_vector(x[:3])
        transform = transform.then(
            Similarity(scale, rotation, centre + x[3:6] - scale * rotation @ centre))
    return transform, np.asarray(errors)


NOW_FIT_POINTS = 20000  # scan points the refinement fits (a fixed subset); all are scored


def now_scan_errors(scan_vertices, scan_landmarks, mesh_vertices, mesh_triangles, mesh_landmarks,
                    refine=True, max_iterations=30, metrical=False, mesh_unit_mm=1.0):
    """NoW's scan-to-mesh errors of one reconstruction: (distances (M,) mm of the scan's
    vertices inside `now_face_region` to the closest point of the reconstruction's surface, the
    reconstruction's vertices as aligned to the scan (N,3)).

    The reconstruction is brought to the scan by the similarity that best maps its 7 landmarks
    onto the scan's (NoW's Procrustes step), then, with `refine`, by the similarity that best
    fits its surface to the cropped scan (NoW minimises the scan-to-mesh distance over scale,
    rotation and translation; here `surface_icp` on at most NOW_FIT_POINTS of the scan's
    points, a fixed subset). Units are the scan's: a reconstruction in any unit is scaled to
    it by the alignment. `metrical`: NoW's metrical protocol (Zielonka et al., MICA, ECCV
    2022), which judges the size too: the reconstruction is taken in millimetres (its unit ×
    `mesh_unit_mm`) and both alignments are rigid, without scale."""
    scan = _as_points(scan_vertices, "scan_vertices")
    verts = _as_points(mesh_vertices, "mesh_vertices")
    triangles = _as_triangles(mesh_triangles, len(verts), "mesh_triangles")
    if np.shape(mesh_landmarks) != (7, 3):
        raise ValueError(f"mesh_landmarks: expected NoW's 7 landmarks (7,3), got "
                         f"{np.shape(mesh_landmarks)}")
    points = now_scan_crop(scan, scan_landmarks)
    unit = mesh_unit_mm if metrical else 1.0
    aligned = umeyama(np.asarray(mesh_landmarks, np.float64) * unit, scan_landmarks,
                      with_scale=not metrical)(verts * unit)
    if refine:
        subset = points
        if len(points) > NOW_FIT_POINTS:
            subset = points[np.random.default_rng(0).choice(len(points), NOW_FIT_POINTS,
                                                            replace=False)]
        transform, _ = surface_icp(subset, aligned, triangles, max_iterations,
                                   with_scale=not metrical)
        aligned = transform(aligned)
    return scan_to_mesh_distances(points, aligned, triangles), aligned


def read_pp(path):
    """The points (K,3) of a MeshLab PickedPoints file (.pp, XML; NoW's scan landmarks), in the
    file's order."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(str(path)).getroot()
        points = [[float(p.attrib[k]) for k in "xyz"] for p in root.iter("point")]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such landmark file") from None
    except (ElementTree.ParseError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a MeshLab .pp file ({type(e).__name__}: {e})") from None
    if not points:
        raise ValueError(f"{path}: holds no <point>")
    return np.asarray(points, np.float64)


# --------------------------------------------------------------------------------------------
# Mesh files: OBJ (trimesh) and VRML (MICC ships its scans as both)
# --------------------------------------------------------------------------------------------

_VRML_COORD = re.compile(r"\bCoordinate3?\s*\{\s*point\s*\[([^\]]*)\]")
_VRML_INDEX = re.compile(r"\bcoordIndex\s*\[([^\]]*)\]")


def load_vrml(path):
    """Vertices (N,3) and triangles (F,3) of the IndexedFaceSets of a VRML 1.0/2.0 file.

    A small reader for scanner exports such as MICC's: every `Coordinate { point [...] }`
    (VRML 2.0) or `Coordinate3 { point [...] }` (1.0) is paired, in file order, with the next
    `coordIndex [...]`; polygons (-1 terminated) are fan-triangulated. Transform nodes, DEF/USE
    re-use and PROTOs are not interpreted (scanner exports do not use them).
    """
    with open(path, "rb") as f:
        text = f.read().decode("latin-1")
    if not text.startswith("#VRML"):
        raise ValueError(f"{path}: not a VRML file (no '#VRML' header)")
    text = re.sub(r"#[^\n]*", " ", text)
    coords = list(_VRML_COORD.finditer(text))
    if not coords:
        raise ValueError(f"{path}: no 'Coordinate {{ point [...] }}' node found")
    all_v, all_t, offset = [], [], 0
    for k, m in enumerate(coords):
        nums = np.array(m.group(1).replace(",", " ").split(), np.float64)
        if nums.size % 3:
            raise ValueError(f"{path}: point list {k} has {nums.size} numbers, not a multiple of 3")
        verts = nums.reshape(-1, 3)
        end = coords[k + 1].start() if k + 1 < len(coords) else len(text)
        im = _VRML_INDEX.search(text, m.end(), end)
        if im is None:  # an IndexedFaceSet may list coordIndex before coord
            im = _VRML_INDEX.search(text, coords[k - 1].end() if k else 0, m.start())
        tris = []
        if im is not None:
            idx = np.array(im.group(1).replace(",", " ").split(), np.int64)
            if idx.size and idx[-1] != -1:
                idx = np.append(idx, -1)
            stops = np.flatnonzero(idx == -1)
            begin = 0
            for s in stops:
                poly = idx[begin:s]
                begin = s + 1
                for j in range(1, len(poly) - 1):
                    tris.append((poly[0], poly[j], poly[j + 1]))
        tris = np.asarray(tris, np.int64).reshape(-1, 3)
        if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
            raise ValueError(f"{path}: coordIndex of shape {k} refers to vertex {tris.max()} "
                             f"but the shape has {len(verts)} points")
        all_v.append(verts)
        all_t.append(tris + offset)
        offset += len(verts)
    return np.concatenate(all_v), np.concatenate(all_t)


def load_mesh(path):
    """Vertices (N,3) float64 and triangles (F,3) int64 of an .obj/.ply/.stl/.off or .wrl file."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such mesh file")
    if path.lower().endswith((".wrl", ".vrml")):
        return load_vrml(path)
    import trimesh

    # maintain_order: without it trimesh duplicates OBJ vertices along texture seams, which
    # would split the vertex normals of textured scans
    extra = dict(maintain_order=True) if path.lower().endswith(".obj") else {}
    try:
        mesh = trimesh.load(path, force="mesh", process=False, skip_materials=True, **extra)
    except Exception as e:  # trimesh raises many types for foreign files
        raise ValueError(f"{path}: cannot read a mesh ({e})") from None
    faces = np.asarray(mesh.faces, np.int64).reshape(-1, 3)
    verts = np.asarray(mesh.vertices, np.float64).reshape(-1, 3)
    if len(verts) == 0:
        raise ValueError(f"{path}: the file holds no vertices")
    return verts, faces


# --------------------------------------------------------------------------------------------
# Error-map rendering (NumPy z-buffer; a visualisation, not the differentiable renderer)
# --------------------------------------------------------------------------------------------

# A perceptually ordered sequential map: dark blue-violet → teal → green → yellow, lightness
# rising monotonically (anchors sampled along a viridis-like path; interpolated linearly).
_COLORMAP_ANCHORS = np.array([
    [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530],
    [0.207, 0.372, 0.553], [0.164, 0.471, 0.558], [0.128, 0.567, 0.551],
    [0.135, 0.659, 0.518], [0.267, 0.749, 0.441], [0.478, 0.821, 0.318],
    [0.741, 0.873, 0.150], [0.993, 0.906, 0.144]])


def colormap(values, vmin=0.0, vmax=1.0):
    """(N,) values → (N,3) RGB in [0,1]; NaN → mid grey."""
    values = np.asarray(values, np.float64)
    x = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    x = np.nan_to_num(x, nan=0.0)
    pos = x * (len(_COLORMAP_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(_COLORMAP_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = (1 - frac) * _COLORMAP_ANCHORS[lo] + frac * _COLORMAP_ANCHORS[lo + 1]
    return np.where(np.isnan(values)[..., None], 0.6, rgb)


def rasterize(pixels, depth, triangles, image_size, max_fragments=4_000_000):
    """Z-buffer visibility: (triangle id (H,W) int, -1 = background; barycentrics (H,W,3)).

    Pixel centres at +0.5; a pixel is covered if its centre is inside or on the triangle's
    edges; the nearest positive depth wins (ties: the lower triangle index). Barycentrics are
    perspective-correct. Vectorised: triangles are grouped by the power-of-two size of their
    pixel box, every (triangle, pixel-in-box) fragment is tested at once, and the nearest
    fragment per pixel is found by sorting.
    """
    from ganfit_jax.camera import image_hw

    h, w = image_hw(image_size)
    pixels = np.asarray(pixels, np.float64)
    depth = np.asarray(depth, np.float64)
    tris = np.asarray(triangles, np.int64).reshape(-1, 3)
    px, py, pz = pixels[tris, 0], pixels[tris, 1], depth[tris]  # (F,3) each
    area = ((px[:, 1] - px[:, 0]) * (py[:, 2] - py[:, 0])
            - (py[:, 1] - py[:, 0]) * (px[:, 2] - px[:, 0]))
    x0 = np.maximum(np.ceil(px.min(axis=1) - 0.5), 0)
    x1 = np.minimum(np.floor(px.max(axis=1) - 0.5), w - 1)
    y0 = np.maximum(np.ceil(py.min(axis=1) - 0.5), 0)
    y1 = np.minimum(np.floor(py.max(axis=1) - 0.5), h - 1)
    ok = (pz.min(axis=1) > 0) & (np.abs(area) > 1e-12) & (x0 <= x1) & (y0 <= y1)
    ok &= np.isfinite(px).all(axis=1) & np.isfinite(py).all(axis=1)
    faces = np.flatnonzero(ok)
    size = np.maximum(x1 - x0, y1 - y0)[faces] + 1
    level = np.ceil(np.log2(size)).astype(int)
    frag = {k: [] for k in ("pix", "z", "f", "b")}
    for lv in np.unique(level):
        side = 2 ** lv
        members = faces[level == lv]
        per_chunk = max(1, max_fragments // (side * side))
        dy, dx = np.divmod(np.arange(side * side), side)
        for start in range(0, len(members), per_chunk):
            f = members[start:start + per_chunk]
            gx = x0[f, None] + dx[None]
            gy = y0[f, None] + dy[None]
            valid = (gx <= x1[f, None]) & (gy <= y1[f, None])
            cx, cy = gx + 0.5, gy + 0.5
            X, Y, A = px[f], py[f], area[f, None]
            l0 = ((X[:, 1, None] - cx) * (Y[:, 2, None] - cy)
                  - (Y[:, 1, None] - cy) * (X[:, 2, None] - cx)) / A
            l1 = ((X[:, 2, None] - cx) * (Y[:, 0, None] - cy)
                  - (Y[:, 2, None] - cy) * (X[:, 0, None] - cx)) / A
            l2 = 1.0 - l0 - l1
            keep = valid & (l0 >= 0) & (l1 >= 0) & (l2 >= 0)
            if not keep.any():
                continue
            rows, cols = np.nonzero(keep)
            # perspective-correct: 1/z is affine in screen space
            lin = np.stack([l0[rows, cols], l1[rows, cols], l2[rows, cols]], axis=1)
            persp = lin / pz[f[rows]]
            z = 1.0 / persp.sum(axis=1)
            frag["pix"].append((gy[rows, cols] * w + gx[rows, cols]).astype(np.int64))
            frag["z"].append(z)
            frag["f"].append(f[rows])
            frag["b"].append(persp * z[:, None])
    ids = -np.ones(h * w, np.int64)
    bary = np.zeros((h * w, 3))
    if frag["pix"]:
        pix, z, fid, b = (np.concatenate(frag[k]) for k in ("pix", "z", "f", "b"))
        order = np.lexsort((fid, z, pix))
        _, first = np.unique(pix[order], return_index=True)
        win = order[first]
        ids[pix[win]] = fid[win]
        bary[pix[win]] = b[win]
    return ids.reshape(h, w), bary.reshape(h, w, 3)


def view_camera(vertices, view="front", image_size=256, distance=600.0, fov_degrees=None):
    """A look-at camera framing the mesh from the front (+z) or its left side (+x)."""
    from ganfit_jax import camera as cam

    v = _as_points(vertices, "vertices")
    centre = 0.5 * (v.min(axis=0) + v.max(axis=0))
    direction = {"front": np.array([0.0, 0, 1]), "side": np.array([1.0, 0, 0]),
                 "right": np.array([-1.0, 0, 0])}.get(view)
    if direction is None:
        raise ValueError(f"view: expected 'front', 'side' or 'right', got {view!r}")
    radius = np.linalg.norm(v - centre, axis=1).max()
    fov = fov_degrees or np.rad2deg(2 * np.arctan(1.1 * radius / distance))
    focal = cam.default_focal(image_size, fov)
    eye = centre + distance * direction
    return np.concatenate([eye, centre, [focal]])


def render_vertex_colours(vertices, triangles, colours, camera_params, image_size=256,
                          background=1.0):
    """Shaded render (H,W,3) in [0,1] of per-vertex colours with a head light (Lambert)."""
    from ganfit_jax import camera as cam

    v = _as_points(vertices, "vertices")
    t = _as_triangles(triangles, len(v))
    pixels, depth = cam.project(np.asarray(camera_params, np.float32), v.astype(np.float32),
                                image_size)
    ids, bary = rasterize(np.asarray(pixels), np.asarray(depth), t, image_size)
    normals = vertex_normals(v, t)
    eye = np.asarray(camera_params[:3], np.float64)
    shade_v = np.abs(np.sum(normals * (eye - v) / np.linalg.norm(eye - v, axis=1,
                                                                    keepdims=True), axis=1))
    h, w = ids.shape
    out = np.full((h, w, 3), background, np.float64)
    hit = ids >= 0
    corner = t[ids[hit]]
    b = bary[hit]
    col = np.einsum("pk,pkc->pc", b, np.asarray(colours, np.float64)[corner])
    shade = np.einsum("pk,pk->p", b, shade_v[corner])
    out[hit] = col * (0.35 + 0.65 * shade[:, None])
    return out.astype(np.float32)


def _colour_bar(height, vmax, width=70):
    from PIL import Image, ImageDraw

    from ganfit_jax import io

    bar = np.ones((height, width, 3))
    top, bottom = 12, height - 12
    ramp = colormap(np.linspace(vmax, 0.0, bottom - top), 0.0, vmax)
    bar[top:bottom, 8:24] = ramp[:, None, :]
    img = Image.fromarray((bar * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = io.label_font()
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = int(round(bottom - 1 - frac * (bottom - top - 1)))
        draw.line([(24, y), (28, y)], fill=(0, 0, 0))
        draw.text((30, y - 7), f"{frac * vmax:.1f}", fill=(0, 0, 0), font=font)
    draw.text((2, -2), "mm", fill=(0, 0, 0), font=font)
    return np.asarray(img, np.float32) / 255.0


def render_error_map(vertices, triangles, errors, vmax=None, views=("front", "side"),
                     image_size=256):
    """Per-vertex errors (mm) colour-coded on the mesh, one panel per view, with a mm colour bar.

    Returns an (H, W, 3) float32 image in [0,1]; vertices with NaN error are grey. `vmax`
    defaults to the 95th percentile of the finite errors, so outliers do not wash out the map.
    """
    errors = np.asarray(errors, np.float64)
    v = _as_points(vertices, "vertices")
    if errors.shape != (len(v),):
        raise ValueError(f"errors: expected one value per vertex ({len(v)},), got {errors.shape}")
    finite = errors[np.isfinite(errors)]
    if vmax is None:
        vmax = float(np.percentile(finite, 95)) if finite.size else 1.0
    vmax = max(float(vmax), 1e-6)
    colours = colormap(errors, 0.0, vmax)
    panels = [render_vertex_colours(v, triangles, colours, view_camera(v, view, image_size),
                                    image_size) for view in views]
    panels.append(_colour_bar(panels[0].shape[0], vmax))
    return np.concatenate(panels, axis=1)


def to_uint8(image):
    return (np.clip(np.asarray(image), 0, 1) * 255 + 0.5).astype(np.uint8)
