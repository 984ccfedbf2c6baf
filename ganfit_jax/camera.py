"""The look-at pinhole camera of GANFIT (Gecer et al., CVPR 2019, Sec. 3.2).

The paper parameterises the camera as p_c = [eye x, y, z, target x, y, z, focal]: the camera sits at
`eye`, looks at `target`, the world's up direction is +y, and `focal` is the focal length in
pixels. A look-at camera with a fixed up vector cannot roll, so a tilted head in a photo could
only be explained by the face itself tilting; we therefore accept an optional 8th entry, the roll
angle (radians) about the viewing axis. A 7-vector means roll 0, exactly the paper's camera.

Conventions (DESIGN.md): image origin top-left, x right, y down, pixel centres at +0.5, so the
principal point is the image centre (W/2, H/2) in continuous pixel coordinates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

WORLD_UP = (0.0, 1.0, 0.0)


def _normalise(v, xp=jnp):
    return v / xp.linalg.norm(v, axis=-1, keepdims=True)


def _check_camera(camera):
    if camera.shape[-1] not in (7, 8):
        raise ValueError(
            f"camera: expected [eye xyz, target xyz, focal] (7 values) or with a roll angle (8), "
            f"got shape {tuple(camera.shape)}")


def image_hw(image_size):
    """(height, width) from an int (square) or a (height, width) pair."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def axes(camera, xp=jnp):
    """Camera axes in world coordinates: (right, up, forward), each (3,).

    forward points from eye to target; right = forward x world-up, so that a camera on +z looking
    at the origin has right = +x and up = +y; then the roll rotates right towards up.
    xp=numpy computes them on the host in the camera's own precision (float64 for the OpenCV
    matrices), without compiling JAX's operations one by one outside jit.
    """
    camera = xp.asarray(camera)
    _check_camera(camera)
    eye, target = camera[0:3], camera[3:6]
    forward = _normalise(target - eye, xp)
    right = _normalise(xp.cross(forward, xp.asarray(WORLD_UP, camera.dtype)), xp)
    up = xp.cross(right, forward)
    if camera.shape[-1] == 8:
        c, s = xp.cos(camera[7]), xp.sin(camera[7])
        right, up = c * right + s * up, -s * right + c * up
    return right, up, forward


def to_camera_frame(camera, points):
    """World points (N,3) → camera coordinates (N,3) as (right, up, forward) components."""
    camera = jnp.asarray(camera)
    right, up, forward = axes(camera)
    rel = jnp.asarray(points) - camera[0:3]
    # full float32 even on GPUs (TF32 by default there): ~1 m from the face, TF32's 1e-3
    # relative error would move points by a millimetre
    dot = functools.partial(jnp.dot, precision=jax.lax.Precision.HIGHEST)
    return jnp.stack([dot(rel, right), dot(rel, up), dot(rel, forward)], axis=-1)


def project(camera, points, image_size):
    """Pinhole projection of world points.

    Args:
      camera: (7,) [eye xyz, target xyz, focal px] or (8,) with roll (radians) appended.
      points: (N,3) world points (mm).
      image_size: int or (height, width).

    Returns:
      pixels (N,2) as (x right, y down) in continuous pixel coordinates, and depth (N,), the
      positive distance along the viewing axis. Points behind the camera have depth <= 0 and
      their pixels are meaningless; the renderer clips them.
    """
    camera = jnp.asarray(camera)
    height, width = image_hw(image_size)
    cam = to_camera_frame(camera, points)
    focal = camera[6]
    depth = cam[:, 2]
    x = focal * cam[:, 0] / depth + 0.5 * width
    y = -focal * cam[:, 1] / depth + 0.5 * height
    return jnp.stack([x, y], axis=-1), depth


def opencv_matrices(camera, image_size):
    """The camera as OpenCV (and most other tools) write a pinhole: intrinsics K (3,3) and the
    world-to-camera rotation R (3,3) and translation t (3,), camera axes x right, y down,
    z forward, pixel (0, 0)'s centre at (0, 0), so that K (R X + t), divided by its last entry,
    is `project(camera, X)` less half a pixel. NumPy float64; one camera (7,) or (8,)."""
    camera = np.asarray(camera, np.float64)
    _check_camera(camera)
    height, width = image_hw(image_size)
    right, up, forward = axes(camera, np)
    rotation = np.stack([right, -up, forward])
    translation = -rotation @ camera[0:3]
    focal = camera[6]
    intrinsics = np.array([[focal, 0.0, 0.5 * width - 0.5],
                           [0.0, focal, 0.5 * height - 0.5],
                           [0.0, 0.0, 1.0]])
    return intrinsics, rotation, translation


def default_focal(image_size, fov_degrees=12.0):
    """A long lens (small field of view) as portrait photos are taken; focal in pixels."""
    height, width = image_hw(image_size)
    return 0.5 * max(height, width) / np.tan(np.deg2rad(fov_degrees) / 2)


def framing_cameras(points, focal, image_size, yaws, min_distance=0.0, fill=0.9):
    """Cameras (len(yaws), 8) looking at the middle of `points`' bounding box from each yaw
    (degrees; 0 on +z, positive towards +x, no pitch or roll), `focal` in pixels, all at one
    distance: the least, and at least `min_distance`, at which every view sees every point
    within `fill` of the half-frame. A point at (right r, up u, forward w) from the centre
    projects to f·r / (d + w) from the image's middle, so d ≥ f·|r| / (fill·W/2) − w, and the
    same for u with the height: views to compare side by side, at one scale, none cut off."""
    points = np.asarray(points, np.float64).reshape(-1, 3)
    height, width = image_hw(image_size)
    centre = 0.5 * (points.min(0) + points.max(0))
    offsets = points - centre
    yaws = np.deg2rad(np.asarray(yaws, np.float64).reshape(-1))
    directions = np.stack([np.sin(yaws), np.zeros_like(yaws), np.cos(yaws)], -1)
    distance = float(min_distance)
    for direction in directions:
        right = np.array([direction[2], 0.0, -direction[0]])  # forward × world up
        r, u, w = offsets @ right, offsets[:, 1], offsets @ -direction
        distance = max(distance, float(np.max(focal * np.abs(r) / (fill * width / 2) - w)),
                       float(np.max(focal * np.abs(u) / (fill * height / 2) - w)))
    count = len(yaws)
    return np.concatenate([centre + distance * directions, np.broadcast_to(centre, (count, 3)),
                           np.full((count, 1), float(focal)), np.zeros((count, 1))], 1)


def orbit_angles(camera):
    """Where the camera sits around the face, (..., 7|8) cameras → (yaw, pitch, roll) in
    radians, each (...,): yaw about the model's up axis (+y) from its +z axis (0: a frontal
    view, positive towards +x), pitch above the model's horizontal plane, roll about the viewing
    axis. The head's pose in the image is the inverse rotation. A video's tracked frames are a
    time series of these (`fit --frames --track` writes sequence.npz)."""
    camera = jnp.asarray(camera)
    _check_camera(camera)
    offset = camera[..., 0:3] - camera[..., 3:6]
    yaw = jnp.arctan2(offset[..., 0], offset[..., 2])
    pitch = jnp.arctan2(offset[..., 1], jnp.hypot(offset[..., 0], offset[..., 2]))
    roll = camera[..., 7] if camera.shape[-1] == 8 else jnp.zeros_like(yaw)
    return yaw, pitch, roll


def head_pose_from_landmarks(points3d, points2d):
    """(yaw, pitch) in degrees of the camera around the face (`orbit_angles`) that
    `camera_from_landmarks` finds for model points (K,3) seen at pixels (K,2), NaN rows left
    out: a face's pose from its landmarks alone, e.g. to pick keyframes (`spread_views`).
    Independent of the image's size and the focal length (the rotation is the affine fit's)."""
    points3d = np.asarray(points3d, np.float64)
    points2d = np.asarray(points2d, np.float64)
    ok = np.all(np.isfinite(points3d), 1) & np.all(np.isfinite(points2d), 1)
    side = float(np.ptp(points2d[ok], axis=0).max()) * 4 + 1
    yaw, pitch, _ = orbit_angles(camera_from_landmarks(points3d[ok], points2d[ok], (side, side)))
    return float(np.degrees(yaw)), float(np.degrees(pitch))


def spread_views(angles, count, times=None, degrees_per_span=5.0):
    """Indices of `count` views whose head poses lie farthest apart: the most frontal first,
    then each time the view farthest (in degrees) from every one chosen (farthest-point
    sampling), returned in increasing order. angles: (n, k) degrees, e.g. yaw and pitch of
    `orbit_angles`. times (n,), e.g. frame numbers: added as `degrees_per_span` degrees across
    their whole span, so that among views of one pose (a still head) the picks spread in time.
    Multi-frame fitting (Eq. 13) learns a shape from the sides of the face its frames show;
    frames picked every N-th of a mostly frontal video show one side many times."""
    angles = np.asarray(angles, np.float64)
    if angles.ndim == 1:
        angles = angles[:, None]
    n = len(angles)
    if count < 1 or n == 0:
        raise ValueError(f"spread_views: need count ≥ 1 of n ≥ 1 views, got {count} of {n}")
    points = angles
    if times is not None:
        times = np.asarray(times, np.float64)
        span = np.ptp(times) if n > 1 else 0.0
        scaled = (times - times.min()) / span * degrees_per_span if span > 0 else times * 0
        points = np.concatenate([angles, scaled[:, None]], axis=1)
    first = int(np.argmin(np.linalg.norm(angles, axis=1)))
    chosen = [first]
    distance = np.linalg.norm(points - points[first], axis=1)
    distance[first] = -1.0
    while len(chosen) < min(count, n):
        pick = int(np.argmax(distance))
        chosen.append(pick)
        distance = np.minimum(distance, np.linalg.norm(points - points[pick], axis=1))
        distance[chosen] = -1.0
    return sorted(chosen)


def affine_camera_from_landmarks(points3d, points2d):
    """Least-squares affine camera x = A X + b (the 'gold standard' of Hartley & Zisserman 7.3).

    Returns A (2,3) and b (2,). NumPy, not traced: it only initialises the fitting.
    """
    points3d = np.asarray(points3d, np.float64)
    points2d = np.asarray(points2d, np.float64)
    if points3d.shape[0] != points2d.shape[0] or points3d.shape[0] < 4:
        raise ValueError(
            f"need at least 4 corresponding 3D/2D points, got {points3d.shape} and {points2d.shape}")
    design = np.concatenate([points3d, np.ones((len(points3d), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, points2d, rcond=None)  # (4,2)
    return solution[:3].T, solution[3]


def camera_from_landmarks(points3d, points2d, image_size, focal=None, with_roll=True):
    """Closed-form look-at camera whose projection of `points3d` matches `points2d`.

    A scaled-orthographic estimate (affine fit, rotation by SVD orthogonalisation) gives the
    rotation and the scale s (pixels per mm); a pinhole at distance focal / s then reproduces the
    same scale at the points' centroid, which it places on the centroid's image position. The
    result is the start of stage 1 of the fitting, not its end.

    Args:
      points3d: (K,3) model points (mm), e.g. the model's landmark vertices.
      points2d: (K,2) their pixel positions.
      image_size: int or (height, width).
      focal: focal length in pixels; default `default_focal(image_size)`.
      with_roll: return the 8-vector with roll; otherwise the paper's 7-vector (roll dropped).

    Returns:
      (8,) or (7,) float32 NumPy camera.
    """
    height, width = image_hw(image_size)
    focal = default_focal(image_size) if focal is None else float(focal)
    points3d = np.asarray(points3d, np.float64)
    points2d = np.asarray(points2d, np.float64)
    A, _ = affine_camera_from_landmarks(points3d, points2d)
    u, sv, vt = np.linalg.svd(A, full_matrices=False)
    scale = sv.mean()
    rows = u @ vt  # the nearest matrix with orthonormal rows: image x (right), image y (down)
    r1, r2 = rows[0], rows[1]
    forward = np.cross(r1, r2)
    up = -r2
    centroid = points3d.mean(axis=0)
    centroid_px = points2d.mean(axis=0)
    distance = focal / scale
    a = -(centroid_px[0] - 0.5 * width) * distance / focal
    b = (centroid_px[1] - 0.5 * height) * distance / focal
    eye = centroid - distance * forward + a * r1 + b * up
    target = eye + distance * forward
    right0 = np.cross(forward, WORLD_UP)
    right0 /= np.linalg.norm(right0)
    up0 = np.cross(right0, forward)
    roll = np.arctan2(r1 @ up0, r1 @ right0)
    camera = np.concatenate([eye, target, [focal]] + ([[roll]] if with_roll else []))
    return camera.astype(np.float32)
