"""Initial points from what the capture has.

- The scene's own points (COLMAP / LLFF ``sparse/0/points3D``, a Blender ``points3d.ply``) when it
  has them; otherwise random points: in the cameras' frustums between the near and far bounds for
  forward-facing captures (a cube around a look-at point would sit in front of a few cameras and
  behind none), in the cube around ``Scene.look_at`` for 360-degree ones.
- Real photos show a background (walls, furniture, sky) that SfM points, concentrated on the
  object, and the look-at cube do not cover. Nothing can grow where no Gaussian is, so scenes whose
  images have background content also get points in the cameras' frustums *behind* the
  foreground: on each sampled ray, between where it leaves the foreground sphere and a few radii
  further (uniform in disparity). Synthetic scenes on a flat background get none.

Random points take the colour of the pixel they were sampled through, so the first renders
already look like the photos from the cameras that made them. ``scene_scale`` is the length
the trainer scales positions by, from the same camera geometry.
"""

from __future__ import annotations

import numpy as np

from budget3d.scene.camera import Scene


def is_forward_facing(scene: Scene) -> bool:
    """All optical axes within ~60 degrees of their mean and the mean well defined (LLFF-style)."""
    cams = [v.camera for v in scene.train] or [v.camera for v in scene.test]
    D = np.stack([np.asarray(c.world_to_camera, np.float64)[2, :3] for c in cams])
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    m = D.mean(0)
    norm = np.linalg.norm(m)
    return bool(norm > 0.8 and (D @ (m / norm)).min() > 0.5)


def has_background_content(scene: Scene, n_views: int = 4, tol: int = 3) -> bool:
    """False when most border pixels of a few training images are the flat scene background
    (Blender-style synthetic renders); True for photos."""
    if scene.format == "blender":
        return False
    views = scene.train[:: max(1, len(scene.train) // n_views)][:n_views]
    bg = np.asarray(scene.background, np.float32) * 255.0
    flat = []
    for v in views:
        img = v.image().astype(np.float32)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        flat.append((np.abs(border - bg).max(-1) <= tol).mean())
    return float(np.mean(flat)) < 0.5


def _rays(scene: Scene, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random training rays: origins, unit directions, and the colour of their pixel (uint8)."""
    views = scene.train
    which = rng.integers(0, len(views), n)
    o = np.empty((n, 3)), np.empty((n, 3)), np.empty((n, 3), np.uint8)
    origins, dirs, cols = o
    for i in np.unique(which):
        sel = np.nonzero(which == i)[0]
        cam = views[i].camera
        img = views[i].image()
        h, w = img.shape[:2]
        px, py = rng.uniform(0, w, len(sel)), rng.uniform(0, h, len(sel))
        cols[sel] = img[np.minimum(py.astype(int), h - 1), np.minimum(px.astype(int), w - 1), :3]
        d_cam = np.stack([(px - cam.cx) / cam.fx, (py - cam.cy) / cam.fy, np.ones(len(sel))], 1)
        w2c = np.asarray(cam.world_to_camera, np.float64)
        d = d_cam @ w2c[:3, :3]  # R^T d for row vectors
        dirs[sel] = d / np.linalg.norm(d, axis=1, keepdims=True)
        origins[sel] = cam.center
    return origins, dirs, cols


def _along(o, d, t_near, t_far, rng) -> np.ndarray:
    """A point per ray, uniform in disparity between t_near and t_far (more near, as LLFF samples)."""
    u = rng.uniform(0, 1, len(o))
    t = 1.0 / (1.0 / t_near + u * (1.0 / t_far - 1.0 / t_near))
    return (o + d * t[:, None]).astype(np.float32)


def _bounds(scene: Scene) -> tuple[float, float]:
    """(near, far) depths: the scene's bounds (a little nearer), else around the look-at distance."""
    if scene.near_far is not None:
        return 0.9 * float(scene.near_far[0]), float(scene.near_far[1])
    c, _ = scene.look_at()
    dist = float(np.mean([np.linalg.norm(v.camera.center - c) for v in scene.train]))
    return 0.25 * dist, 4.0 * dist


def scene_scale(scene: Scene) -> float:
    """The length that scales the position learning rate and the split / prune size tests: 3DGS's
    camera extent, but at least half the viewing depth for forward-facing captures, whose cameras
    a small step apart look several steps away: their camera extent alone froze the means and had
    every Gaussian pruned as "too big" after the first opacity reset."""
    extent = scene.camera_extent()
    if not is_forward_facing(scene):
        return extent
    near, far = _bounds(scene)
    return max(extent, 0.25 * (near + far))


def frustum_points(scene: Scene, n: int, near: float, far: float, seed: int = 0):
    """``n`` points in random training cameras' frustums, depth (along the ray) in [near, far]."""
    rng = np.random.default_rng([seed, 1])
    o, d, cols = _rays(scene, n, rng)
    return _along(o, d, np.full(n, near), np.full(n, far), rng), cols


def foreground_sphere(scene: Scene, points) -> tuple[np.ndarray, float]:
    """Centre and radius of the foreground: most of the points, else the look-at cube's sphere."""
    if points is not None and len(points) >= 8:
        c = np.median(points, axis=0)
        return c, float(np.percentile(np.linalg.norm(points - c, axis=1), 90))
    c, half = scene.look_at()
    return np.asarray(c, np.float64), float(half) * np.sqrt(3.0)


def background_points(scene: Scene, n: int, points=None, seed: int = 0, depth_radii: float = 4.0):
    """``n`` points on training rays behind the foreground sphere: from where the ray leaves it
    (or, for rays that miss it, the point nearest its centre) to ``depth_radii`` radii further."""
    rng = np.random.default_rng([seed, 2])
    o, d, cols = _rays(scene, n, rng)
    c, r = foreground_sphere(scene, points)
    oc = c - o
    t_mid = (oc * d).sum(1)  # ray parameter nearest the centre
    miss2 = np.maximum((oc * oc).sum(1) - t_mid**2, 0.0)
    t_exit = t_mid + np.sqrt(np.maximum(r * r - miss2, 0.0))
    t0 = np.maximum(t_exit, 1e-3 * r + 1e-6)
    t1 = t0 + depth_radii * r
    if scene.near_far is not None:  # bounded captures: stay within (a little past) the far bound
        far = 1.5 * float(scene.near_far[1])
        t0, t1 = np.minimum(t0, 0.7 * far), np.minimum(t1, far)
    return _along(o, d, t0, np.maximum(t1, t0 * 1.01), rng), cols


def initial_points(scene: Scene, n_random: int, bg_fraction: float, seed: int = 0):
    """(points, colours, what) for the first Gaussians: see the module docstring. Photos get
    ``bg_fraction`` x max(points, ``n_random``) background points. ``what`` says in words where
    they came from (kept in metrics.json)."""
    pts, cols, what = scene.points, scene.colors, []
    if pts is not None and len(pts) > 0:
        what.append(f"{len(pts)} scene points")
        if cols is None:
            cols = np.full((len(pts), 3), 128, np.uint8)
    elif is_forward_facing(scene):  # the frustums between the bounds already reach the background
        near, far = _bounds(scene)
        pts, cols = frustum_points(scene, n_random, near, far, seed)
        return pts, cols, f"{n_random} random points in the camera frustums (depth {near:.3g}..{far:.3g})"
    else:
        center, half = scene.look_at()
        rng = np.random.default_rng(seed)
        pts = (rng.uniform(-1, 1, (n_random, 3)) * half + np.asarray(center)).astype(np.float32)
        cols = rng.integers(0, 256, (n_random, 3)).astype(np.uint8)
        what.append(f"{n_random} random points around the look-at point")
    n_bg = int(round(bg_fraction * max(len(pts), n_random)))  # sparse SfM clouds get as many as random init
    if n_bg > 0 and has_background_content(scene):
        bp, bc = background_points(scene, n_bg, scene.points, seed)
        pts, cols = np.concatenate([pts, bp]), np.concatenate([cols, bc])
        what.append(f"{n_bg} background points behind the foreground")
    return pts, cols, ", ".join(what)
