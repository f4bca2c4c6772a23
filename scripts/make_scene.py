#!/usr/bin/env python
"""Generate the bundled toy scene (``scenes/toy``) with an independent numpy ray tracer.

Not a Gaussian rasterizer: analytic ray/shape intersections, so the scene is a fair
reconstruction target. Contents: a finite 8x8 checkered ground square, a red and a green
sphere, a sphere with blue/yellow latitude bands and an orange box rotated about the vertical
axis; Lambertian shading from one directional light (soft shadows from a jittered light
direction) plus ambient light; 3x3 supersampling for anti-aliased edges. Rays that miss every
shape are transparent, so the RGBA images composite on any background (white by default, like
NeRF-synthetic lego).

Output (Blender / NeRF-synthetic layout, world z up):
  transforms_train.json, transforms_test.json   camera_angle_x + frames (OpenGL camera-to-world)
  train/r_<i>.png (60), test/r_<i>.png (12)     128x128 RGBA
  points3d.ply                                   ~4000 surface points with shaded colours (x,y,z,red,green,blue)
  README.md

Deterministic (fixed seed, no threads-dependent maths); about 10 s on 2 cores:
    python scripts/make_scene.py [--out scenes/toy]

``--forward-facing`` writes the same shapes as an LLFF capture instead (``poses_bounds.npy`` +
``images/``): 20 cameras on a 5x4 grid in one plane, all looking the same way, 504x376 by
default, opaque (a sky gradient where rays miss, so the far field reaches infinity), its world
scaled by ``--scale`` (cameras and bounds; structure from motion gives every capture an arbitrary
scale, and the light-field student must not care):
    python scripts/make_scene.py --forward-facing --scale 20 --out /tmp/ff
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np

SEED = 0
W = H = 128
CAMERA_ANGLE_X = 0.8  # radians, horizontal field of view
RADIUS = 5.2  # camera distance from the look-at point
TARGET = np.array([0.0, 0.0, 0.3])
N_TRAIN, N_TEST = 60, 12
SS = 3  # supersampling per axis
N_POINTS = 4000

GROUND_HALF = 1.6  # ground square is [-1.6, 1.6]^2 at z = 0, 8x8 squares of 0.4
CHECKER = (np.array([0.90, 0.88, 0.82]), np.array([0.32, 0.38, 0.55]))
SPHERES = [  # centre, radius, colour (None = banded texture)
    (np.array([0.75, -0.45, 0.45]), 0.45, np.array([0.85, 0.15, 0.12])),
    (np.array([-0.55, -0.60, 0.35]), 0.35, np.array([0.20, 0.70, 0.25])),
    (np.array([0.15, 0.65, 0.50]), 0.50, None),
]
BANDS = (np.array([0.15, 0.30, 0.85]), np.array([0.95, 0.80, 0.20]))
BOX_CENTER = np.array([-0.85, 0.65, 0.30])
BOX_HALF = np.array([0.28, 0.28, 0.30])
BOX_ANGLE = math.radians(30.0)
BOX_COLOR = np.array([0.95, 0.55, 0.10])
LIGHT = np.array([0.4, -0.5, 1.0]) / np.linalg.norm([0.4, -0.5, 1.0])  # direction towards the light
AMBIENT, DIFFUSE = 0.3, 0.7
EPS = 1e-4

_c, _s = math.cos(BOX_ANGLE), math.sin(BOX_ANGLE)
BOX_R = np.array([[_c, -_s, 0.0], [_s, _c, 0.0], [0.0, 0.0, 1.0]])  # box-local -> world


# ----------------------------------------------------------------------------- intersections
# Each returns t (N,) with inf where the ray misses; directions are unit length.


def hit_sphere(o, d, c, r):
    oc = o - c
    b = np.einsum("ij,ij->i", oc, d)
    cc = np.einsum("ij,ij->i", oc, oc) - r * r
    disc = b * b - cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = -b - sq, -b + sq
    t = np.where(t0 > EPS, t0, t1)
    return np.where((disc > 0) & (t > EPS), t, np.inf)


def hit_ground(o, d):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 2] / d[:, 2]
    p = o + d * t[:, None]
    ok = (t > EPS) & (np.abs(p[:, 0]) <= GROUND_HALF) & (np.abs(p[:, 1]) <= GROUND_HALF)
    return np.where(ok, t, np.inf)


def hit_box(o, d):
    lo = (o - BOX_CENTER) @ BOX_R  # world -> local (R orthonormal: x_local = R^T x)
    ld = d @ BOX_R
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    t1, t2 = (-BOX_HALF - lo) * inv, (BOX_HALF - lo) * inv
    tmin, tmax = np.minimum(t1, t2).max(1), np.maximum(t1, t2).min(1)
    t = np.where(tmin > EPS, tmin, tmax)
    return np.where((tmax >= tmin) & (t > EPS), t, np.inf)


def box_normal(p):
    q = (p - BOX_CENTER) @ BOX_R / BOX_HALF
    axis = np.abs(q).argmax(1)
    n = np.zeros_like(q)
    n[np.arange(len(q)), axis] = np.sign(q[np.arange(len(q)), axis])
    return n @ BOX_R.T


def intersect(o, d):
    """(t, object id) with id 0 ground, 1..3 spheres, 4 box, -1 miss."""
    ts = np.stack([hit_ground(o, d)] + [hit_sphere(o, d, c, r) for c, r, _ in SPHERES] + [hit_box(o, d)], 1)
    idx = ts.argmin(1)
    t = ts[np.arange(len(ts)), idx]
    return t, np.where(np.isfinite(t), idx, -1)


def occluded(o, d):
    t = np.full(len(o), np.inf)
    for c, r, _ in SPHERES:
        t = np.minimum(t, hit_sphere(o, d, c, r))
    return np.isfinite(np.minimum(t, hit_box(o, d)))


# ----------------------------------------------------------------------------- surface appearance


def surface(p, obj):
    """Normals and albedo at points ``p`` on objects ``obj`` (ids as in ``intersect``)."""
    n = np.zeros_like(p)
    albedo = np.zeros_like(p)
    g = obj == 0
    n[g] = (0.0, 0.0, 1.0)
    sq = np.floor((p[g, :2] + GROUND_HALF) / (2 * GROUND_HALF / 8)).astype(int).sum(1) % 2
    albedo[g] = np.where(sq[:, None] == 0, CHECKER[0], CHECKER[1])
    for k, (c, r, col) in enumerate(SPHERES, start=1):
        m = obj == k
        n[m] = (p[m] - c) / r
        if col is not None:
            albedo[m] = col
        else:
            band = np.floor((p[m, 2] - c[2]) / r * 3.0 + 3.0).astype(int) % 2
            albedo[m] = np.where(band[:, None] == 0, BANDS[0], BANDS[1])
    b = obj == 4
    n[b] = box_normal(p[b])
    albedo[b] = BOX_COLOR
    return n, albedo


def shade(p, obj, light_dirs):
    n, albedo = surface(p, obj)
    lam = np.maximum(np.einsum("ij,ij->i", n, light_dirs), 0.0)
    lit = ~occluded(p + n * 1e-3, light_dirs)
    return albedo * (AMBIENT + DIFFUSE * lam * lit)[:, None]


# ----------------------------------------------------------------------------- cameras


def look_at(eye):
    """Blender/OpenGL camera-to-world (x right, y up, z back) looking at TARGET, world z up."""
    fwd = TARGET - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -fwd, eye
    return c2w


def camera_positions():
    golden = math.pi * (3.0 - math.sqrt(5.0))
    lo, hi = math.sin(math.radians(15)), math.sin(math.radians(70))
    train = []
    for i in range(N_TRAIN):  # Fibonacci spiral over the band of elevations 15..70 degrees
        el = math.asin(lo + (hi - lo) * (i + 0.5) / N_TRAIN)
        train.append((i * golden, el))
    test = [((i + 0.5) * 2 * math.pi / N_TEST + 0.2, math.radians(25 if i % 2 else 50)) for i in range(N_TEST)]
    to_eye = lambda az, el: TARGET + RADIUS * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return [to_eye(*a) for a in train], [to_eye(*a) for a in test]


def render(c2w_gl, W=W, H=H, SS=SS, sky=False):
    """RGBA uint8 (H, W, 4) for a camera; pixel (col, row) has its centre at (col+.5, row+.5).
    ``sky``: opaque, a vertical gradient where rays miss."""
    f = 0.5 * W / math.tan(0.5 * CAMERA_ANGLE_X)
    sub = (np.arange(SS) + 0.5) / SS
    cols = (np.arange(W)[:, None] + sub[None, :]).reshape(-1)  # (W*SS,)
    rows = (np.arange(H)[:, None] + sub[None, :]).reshape(-1)
    u, v = np.meshgrid(cols, rows)  # (H*SS, W*SS)
    dirs_cam = np.stack([(u - W / 2) / f, (v - H / 2) / f, np.ones_like(u)], -1).reshape(-1, 3)  # OpenCV axes
    c2w_cv = c2w_gl[:3, :3] @ np.diag([1.0, -1.0, -1.0])
    d = dirs_cam @ c2w_cv.T
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    o = np.broadcast_to(c2w_gl[:3, 3], d.shape).copy()
    t, obj = intersect(o, d)
    hit = obj >= 0
    # Soft shadows: each of the SS*SS sub-samples of a pixel uses its own jittered light direction.
    rng = np.random.default_rng(SEED)
    jit = rng.normal(size=(SS * SS, 3)) * 0.06
    lights = LIGHT + jit
    lights /= np.linalg.norm(lights, axis=1, keepdims=True)
    sub_id = ((np.arange(H * SS)[:, None] % SS) * SS + (np.arange(W * SS)[None, :] % SS)).reshape(-1)
    rgb = np.zeros_like(d)
    p = o[hit] + d[hit] * t[hit, None]
    rgb[hit] = shade(p, obj[hit], lights[sub_id[hit]])
    if sky:
        up = np.clip(d[~hit, 2:3], -1, 1)
        rgb[~hit] = (1 - up) * np.array([0.85, 0.80, 0.70]) + up * np.array([0.25, 0.45, 0.85])
        hit = np.ones_like(hit)
    # Average sub-samples: colour over hits (straight alpha), alpha = hit fraction.
    rgb = rgb.reshape(H, SS, W, SS, 3).sum((1, 3))
    cnt = hit.reshape(H, SS, W, SS).sum((1, 3)).astype(np.float64)
    col = np.where(cnt[..., None] > 0, rgb / np.maximum(cnt, 1)[..., None], 0.0)
    alpha = cnt / (SS * SS)
    out = np.concatenate([col, alpha[..., None]], -1)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- points


def sample_points(rng):
    """Points on the visible surfaces (area-weighted), coloured with the main light, jittered."""
    areas = [(2 * GROUND_HALF) ** 2] + [4 * math.pi * r * r for _, r, _ in SPHERES]
    hx, hy, hz = BOX_HALF
    box_faces = [(2, +1, 4 * hx * hy)] + [(a, s, 4 * (hy if a == 0 else hx) * hz) for a in (0, 1) for s in (-1, 1)]
    areas.append(sum(a for _, _, a in box_faces))
    counts = np.floor(N_POINTS * np.array(areas) / sum(areas)).astype(int)
    counts[0] += N_POINTS - counts.sum()
    pts, ids = [], []
    g = rng.uniform(-GROUND_HALF, GROUND_HALF, size=(counts[0] * 2, 2))
    gl = (g - BOX_CENTER[:2]) @ BOX_R[:2, :2]  # drop ground points hidden under the box
    g = g[~((np.abs(gl[:, 0]) < BOX_HALF[0]) & (np.abs(gl[:, 1]) < BOX_HALF[1]))][: counts[0]]
    pts.append(np.c_[g, np.zeros(len(g))])
    ids.append(np.zeros(len(g), int))
    for k, (c, r, _) in enumerate(SPHERES, start=1):
        v = rng.normal(size=(counts[k], 3))
        pts.append(c + r * v / np.linalg.norm(v, axis=1, keepdims=True))
        ids.append(np.full(counts[k], k))
    face_p = np.array([a for _, _, a in box_faces])
    face = rng.choice(len(box_faces), size=counts[4], p=face_p / face_p.sum())
    q = rng.uniform(-1, 1, size=(counts[4], 3))
    for j, (axis, sign, _) in enumerate(box_faces):
        q[face == j, axis] = sign
    pts.append(BOX_CENTER + (q * BOX_HALF) @ BOX_R.T)
    ids.append(np.full(counts[4], 4))
    p, obj = np.concatenate(pts), np.concatenate(ids)
    col = shade(p, obj, np.broadcast_to(LIGHT, p.shape))
    p = p + rng.normal(scale=0.005, size=p.shape)
    return p.astype(np.float32), np.clip(np.rint(col * 255), 0, 255).astype(np.uint8)


def write_ply(path: Path, xyz, rgb):
    from plyfile import PlyData, PlyElement

    v = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    v["x"], v["y"], v["z"] = xyz.T
    v["red"], v["green"], v["blue"] = rgb.T
    PlyData([PlyElement.describe(v, "vertex")]).write(str(path))


README = """# toy — the bundled scene

A small synthetic scene for quick runs and tests, in the Blender / NeRF-synthetic layout that
`budget3d.scene.load_scene` reads (`budget3d inspect scenes/toy`).

- {n_train} training and {n_test} test views, {w}x{h} RGBA PNGs (`train/`, `test/`), transparent where
  rays miss, so they composite on white by default; `camera_angle_x` = {angle} rad.
- Cameras orbit the centre on the upper hemisphere (train: a Fibonacci spiral at 15..70 degrees
  elevation; test: 12 azimuths at 25/50 degrees), distance {radius}, looking at (0, 0, 0.3); world z is up.
- `points3d.ply`: {n_points} points sampled on the shapes' surfaces (x, y, z, red, green, blue),
  shaded colours, jittered by 5 mm: an SfM-like initial point cloud. The Blender reader loads a
  `points3d.ply` beside the transforms files when present.

Content: a finite 8x8 checkered ground square (3.2 x 3.2), a red and a green sphere, a sphere
with blue/yellow latitude bands, and an orange box rotated 30 degrees; Lambertian shading with one
directional light (soft shadows) plus ambient; 3x3 supersampling.

Generated by an independent numpy ray tracer (not a Gaussian rasterizer), deterministically:

    python scripts/make_scene.py --out scenes/toy
"""


def forward_facing(out: Path, w: int, h: int, scale: float, n_x: int = 5, n_y: int = 4) -> None:
    """The shapes as an LLFF capture: cameras on an n_x x n_y grid in a plane, one orientation."""
    eye0 = TARGET + 4.2 * np.array([0.0, -math.cos(math.radians(30)), math.sin(math.radians(30))])
    base = look_at(eye0)
    right, up = base[:3, 0], base[:3, 1]
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(n_y):
        for i in range(n_x):
            c2w = base.copy()
            c2w[:3, 3] = eye0 + right * 0.35 * (i - (n_x - 1) / 2) + up * 0.25 * (j - (n_y - 1) / 2)
            rgba = render(c2w, w, h, 2, sky=True)
            cv2.imwrite(str(out / "images" / f"{j * n_x + i:03d}.png"), cv2.cvtColor(rgba[..., :3], cv2.COLOR_RGB2BGR))
            # LLFF columns: down, right, back (OpenGL: x right, y up, z back), centre, (h, w, focal)
            f = 0.5 * w / math.tan(0.5 * CAMERA_ANGLE_X)
            pose = np.stack([-c2w[:3, 1], c2w[:3, 0], c2w[:3, 2], c2w[:3, 3] * scale, [h, w, f]], 1)
            rows.append(np.concatenate([pose.reshape(-1), [1.5 * scale, 8.0 * scale]]))
    np.save(out / "poses_bounds.npy", np.asarray(rows))
    print(f"wrote {out}: {len(rows)} forward-facing views at {w}x{h}, world x{scale}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "scenes" / "toy"))
    ap.add_argument("--forward-facing", action="store_true", help="an LLFF capture (poses_bounds.npy + images/)")
    ap.add_argument("--resolution", default="504x376", help="--forward-facing: WxH (default 504x376)")
    ap.add_argument("--scale", type=float, default=1.0, help="--forward-facing: world scale (default 1)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.forward_facing:
        w, h = (int(v) for v in args.resolution.lower().split("x"))
        return forward_facing(out, w, h, args.scale)
    train_eyes, test_eyes = camera_positions()
    for split, eyes in (("train", train_eyes), ("test", test_eyes)):
        (out / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, eye in enumerate(eyes):
            c2w = look_at(eye)
            rgba = render(c2w)
            cv2.imwrite(str(out / split / f"r_{i}.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 9])
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": np.round(c2w, 10).tolist()})
        with open(out / f"transforms_{split}.json", "w") as f:
            json.dump({"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}, f, indent=2)
    xyz, rgb = sample_points(np.random.default_rng(SEED))
    write_ply(out / "points3d.ply", xyz, rgb)
    (out / "README.md").write_text(
        README.format(n_train=N_TRAIN, n_test=N_TEST, w=W, h=H, angle=CAMERA_ANGLE_X, radius=RADIUS, n_points=len(xyz))
    )
    print(f"wrote {out}: {N_TRAIN} train + {N_TEST} test views at {W}x{H}, {len(xyz)} points")


if __name__ == "__main__":
    main()
