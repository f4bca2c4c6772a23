"""Scene readers: Blender, nerfstudio/instant-ngp, COLMAP (binary + text), LLFF, the bundled scene.

Every fixture scene is written by the test itself (tiny images), so these run in seconds and
need no data; the lego check runs only when ../shared/data/lego is present.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from budget3d.errors import UserError
from budget3d.scene import Camera, Scene, View, describe, detect_format, load_scene
from budget3d.scene.common import decode_image

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "scenes" / "toy"
LEGO = Path(__file__).resolve().parents[1].parent / "shared/data/lego"
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- helpers


def write_png(path: Path, rgb_or_rgba: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.asarray(rgb_or_rgba, np.uint8)
    code = cv2.COLOR_RGBA2BGRA if img.shape[2] == 4 else cv2.COLOR_RGB2BGR
    assert cv2.imwrite(str(path), cv2.cvtColor(img, code))
    return path


def noise_image(w, h, seed=0, channels=3):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)


def look_at_cv(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV camera-to-world (x right, y down, z forward) at ``eye`` looking at ``target``."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    fwd = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(fwd, up)
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, fwd, eye
    return c2w


def project(cam: Camera, X) -> tuple[float, float, float]:
    """(u, v, z) of world point X with the loaded camera (our pixel convention)."""
    Xc = cam.world_to_camera @ np.append(np.asarray(X, float), 1.0)
    return cam.fx * Xc[0] / Xc[2] + cam.cx, cam.fy * Xc[1] / Xc[2] + cam.cy, Xc[2]


def distorted_blob_image(w, h, K_cv, D, fisheye, centers, sigma=1.5, bg=40):
    """What a distorted camera sees of blobs that are round in the *undistorted* image.

    Each source pixel is mapped to its undistorted position with OpenCV's iterative
    ``undistortPoints`` (independent of the loader's remap tables) and the blobs, centred at
    ``centers`` in our pixel convention, are evaluated there.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    pix = np.stack([xx, yy], -1).reshape(-1, 1, 2)
    crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    if fisheye:
        n = cv2.fisheye.undistortPoints(pix, K_cv, D, criteria=crit)
    else:
        n = cv2.undistortPoints(pix, K_cv, D, criteria=crit)
    n = n.reshape(h, w, 2)
    u = K_cv[0, 0] * n[..., 0] + K_cv[0, 2] + 0.5  # our convention: pixel centres at +0.5
    v = K_cv[1, 1] * n[..., 1] + K_cv[1, 2] + 0.5
    img = np.full((h, w), float(bg))
    for cu, cv_ in centers:
        img += 200.0 * np.exp(-((u - cu) ** 2 + (v - cv_) ** 2) / (2 * sigma**2))
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def blob_centroid(img, near, radius=6, bg=40):
    """Intensity centroid (our convention: index + 0.5) of the blob near ``near`` (our convention)."""
    g = img[..., 0].astype(np.float64) - bg
    x0, y0 = int(near[0]), int(near[1])
    win = g[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1].clip(0)
    yy, xx = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
    return (xx * win).sum() / win.sum() + 0.5, (yy * win).sum() / win.sum() + 0.5


def quat_from_R(R) -> np.ndarray:
    """Rotation matrix -> unit quaternion (w, x, y, z), COLMAP's order."""
    w = math.sqrt(max(0.0, 1 + R[0, 0] + R[1, 1] + R[2, 2])) / 2
    x = math.copysign(math.sqrt(max(0.0, 1 + R[0, 0] - R[1, 1] - R[2, 2])) / 2, R[2, 1] - R[1, 2])
    y = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] + R[1, 1] - R[2, 2])) / 2, R[0, 2] - R[2, 0])
    z = math.copysign(math.sqrt(max(0.0, 1 - R[0, 0] - R[1, 1] + R[2, 2])) / 2, R[1, 0] - R[0, 1])
    return np.array([w, x, y, z])


# ----------------------------------------------------------------------------- scene writers


def make_blender(root: Path, n_train=3, n_test=2, w=32, h=24, angle=0.9, eyes=None, rgba=True, test_json=True):
    frames = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            eye = eyes[i] if eyes is not None else (4 * math.cos(i), 4 * math.sin(i), 2.0)
            c2w_gl = look_at_cv(eye) @ GL_TO_CV
            img = noise_image(w, h, seed=i + 100 * (split == "test"), channels=4 if rgba else 3)
            write_png(root / split / f"r_{i}.png", img)
            frames[split].append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w_gl.tolist()})
    for split in ("train", "test") if test_json else ("train",):
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames[split]}))
    return root


def make_nerfstudio(root: Path, n=10, w=40, h=30, intr=None, per_frame=None, extra=None, missing=()):
    root.mkdir(parents=True, exist_ok=True)
    intr = {"fl_x": 35.0, "fl_y": 36.0, "cx": 19.0, "cy": 16.0, "w": w, "h": h} if intr is None else intr
    frames = []
    for i in range(n):
        eye = (5 * math.cos(0.3 * i), 5 * math.sin(0.3 * i), 1.5)
        fr = {"file_path": f"images/frame_{i:05d}.png", "transform_matrix": (look_at_cv(eye) @ GL_TO_CV).tolist()}
        fr.update((per_frame or {}).get(i, {}))
        frames.append(fr)
        if i not in missing:
            write_png(root / "images" / f"frame_{i:05d}.png", noise_image(w, h, seed=i))
    meta = dict(intr, frames=frames, **(extra or {}))
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def colmap_model(n_images=10, w=40, h=30, cameras=None, n_points=50, seed=0):
    """An in-memory COLMAP model: cameras {id: (model, w, h, params)}, images, points."""
    rng = np.random.default_rng(seed)
    cameras = cameras or {1: ("PINHOLE", w, h, (30.0, 31.0, 20.0, 15.0)), 2: ("SIMPLE_RADIAL", w, h, (33.0, 20.5, 14.5, 0.0))}
    images = []
    for i in range(n_images):
        c2w = look_at_cv((4 * math.cos(0.5 * i), 4 * math.sin(0.5 * i), 1.0 + 0.1 * i))
        w2c = np.linalg.inv(c2w)
        images.append(
            dict(id=i + 1, q=quat_from_R(w2c[:3, :3]), t=w2c[:3, 3], cam=1 if i % 2 == 0 else 2, name=f"img_{i:03d}.png", w2c=w2c)
        )
    pts = rng.uniform(-1, 1, size=(n_points, 3))
    rgb = rng.integers(0, 256, size=(n_points, 3))
    return cameras, images, pts, rgb


def write_colmap_bin(d: Path, cameras, images, pts, rgb):
    from budget3d.scene.colmap import MODEL_IDS

    d.mkdir(parents=True, exist_ok=True)
    with open(d / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", len(cameras)))
        for cid, (model, w, h, params) in cameras.items():
            f.write(struct.pack("<iiQQ", cid, MODEL_IDS[model], w, h) + struct.pack(f"<{len(params)}d", *params))
    with open(d / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", len(images)))
        for im in images:
            f.write(struct.pack("<idddddddi", im["id"], *im["q"], *im["t"], im["cam"]))
            f.write(im["name"].encode() + b"\x00")
            f.write(struct.pack("<Q", 2) + struct.pack("<ddq", 1.5, 2.5, -1) + struct.pack("<ddq", 3.0, 4.0, 0))
    write_points3d_bin(d, pts, rgb)


def write_points3d_bin(d: Path, pts, rgb):
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(pts)))
        for i, (p, c) in enumerate(zip(pts, rgb)):
            f.write(struct.pack("<QdddBBBd", i, *p, *[int(x) for x in c], 0.5))
            f.write(struct.pack("<Q", 2) + struct.pack("<iiii", 1, 0, 2, 1))


def write_colmap_txt(d: Path, cameras, images, pts, rgb):
    d.mkdir(parents=True, exist_ok=True)
    lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [f"{cid} {m} {w} {h} " + " ".join(repr(float(x)) for x in p) for cid, (m, w, h, p) in cameras.items()]
    (d / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:", "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME"]
    for k, im in enumerate(images):
        lines.append(f"{im['id']} " + " ".join(repr(float(x)) for x in [*im["q"], *im["t"]]) + f" {im['cam']} {im['name']}")
        lines.append("" if k % 2 else "1.5 2.5 -1 3.0 4.0 0")  # POINTS2D line, sometimes empty
    (d / "images.txt").write_text("\n".join(lines) + "\n")
    write_points3d_txt(d, pts, rgb)


def write_points3d_txt(d: Path, pts, rgb):
    d.mkdir(parents=True, exist_ok=True)
    lines = ["# 3D point list"]
    lines += [f"{i} {float(p[0])!r} {float(p[1])!r} {float(p[2])!r} {c[0]} {c[1]} {c[2]} 0.5 1 0 2 1" for i, (p, c) in enumerate(zip(pts, rgb))]
    (d / "points3D.txt").write_text("\n".join(lines) + "\n")


def write_colmap_images(root: Path, images, w=40, h=30, sub="images"):
    for i, im in enumerate(images):
        write_png(root / sub / im["name"], noise_image(w, h, seed=i))


# ----------------------------------------------------------------------------- Blender


def test_blender_camera_convention(tmp_path):
    # Camera 5 m up the +z axis with identity OpenGL rotation: looks down -z, image up = world +y.
    root = tmp_path / "b"
    write_png(root / "train" / "r_0.png", noise_image(40, 30, channels=4))
    c2w_gl = np.eye(4)
    c2w_gl[:3, 3] = (0, 0, 5)
    # Second camera on -y looking at the origin (+y), image up = world +z.
    c2w2 = np.array([[1, 0, 0, 0], [0, 0, -1, -5], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # columns: right, up, back
    write_png(root / "train" / "r_1.png", noise_image(40, 30, channels=4))
    frames = [{"file_path": "./train/r_0", "transform_matrix": c2w_gl.tolist()}, {"file_path": "./train/r_1", "transform_matrix": c2w2.tolist()}]
    (root / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 1.0, "frames": frames}))
    scene = load_scene(root, test_every=0)
    assert scene.format == "blender" and scene.points is None and len(scene.train) == 2 and scene.test == []
    cam = scene.train[0].camera
    f = 0.5 * 40 / math.tan(0.5)
    assert (cam.width, cam.height, cam.cx, cam.cy) == (40, 30, 20.0, 15.0)
    assert cam.fx == pytest.approx(f) and cam.fy == pytest.approx(f)
    np.testing.assert_allclose(cam.center, [0, 0, 5], atol=1e-12)
    u, v, z = project(cam, (1.0, 0.5, 0.0))
    assert z == pytest.approx(5.0)
    assert (u, v) == pytest.approx((20 + f * 0.2, 15 - f * 0.1))  # +x right, +y up in the image
    u, v, z = project(scene.train[1].camera, (0.5, 0.0, 1.0))
    assert z == pytest.approx(5.0)
    assert (u, v) == pytest.approx((20 + f * 0.1, 15 - f * 0.2))  # world +z is up in the image


def test_blender_composite_split_downscale_and_lazy(tmp_path):
    root = make_blender(tmp_path / "b", n_train=3, n_test=2, w=32, h=24)
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 255  # left opaque red, right transparent
    rgba[:, 16:, 3] = 0
    write_png(root / "train" / "r_0.png", rgba)
    scene = load_scene(root)
    assert (len(scene.train), len(scene.test)) == (3, 2)  # the dataset's own split
    img = scene.train[0].image()
    assert img.dtype == np.uint8 and img.shape == (24, 32, 3)
    assert tuple(img[0, 0]) == (200, 0, 0) and tuple(img[0, 31]) == (255, 255, 255)
    assert scene.train[0].image() is img  # cached
    black = load_scene(root, background=(0, 0, 0), cache=False)
    assert tuple(black.train[0].image()[0, 31]) == (0, 0, 0)
    assert black.train[0]._image is None
    half = load_scene(root, downscale=2)
    cam, full = half.train[0].camera, scene.train[0].camera
    assert (cam.width, cam.height) == (16, 12) and cam.fx == pytest.approx(full.fx / 2) and cam.cx == pytest.approx(8.0)
    assert half.train[0].image().shape == (12, 16, 3)
    # Without transforms_test.json: every 8th of the training frames is held out.
    root2 = make_blender(tmp_path / "b2", n_train=17, n_test=0, w=8, h=8, test_json=False)
    s2 = load_scene(root2)
    assert [v.name for v in s2.test] == ["train/r_0.png", "train/r_8.png", "train/r_16.png"] and len(s2.train) == 14


def test_blender_lazy_loading_reads_no_pixels(tmp_path):
    root = make_blender(tmp_path / "b", n_train=2, n_test=1)
    (root / "train" / "r_1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)  # corrupt, header-less
    scene = load_scene(root)  # no image decoded yet, so no error
    with pytest.raises(UserError, match="r_1.png"):
        scene.train[1].image()


def test_blender_missing_frames_are_skipped_with_one_warning(tmp_path):
    root = make_blender(tmp_path / "b", n_train=5, n_test=2)
    (root / "train" / "r_1.png").unlink()
    (root / "train" / "r_3.png").unlink()
    (root / "test" / "r_0.png").unlink()
    with pytest.warns(UserWarning, match="skipped 3 of 7") as rec:
        scene = load_scene(root)
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert scene.n_skipped == 3 and (len(scene.train), len(scene.test)) == (3, 1)


# ----------------------------------------------------------------------------- nerfstudio


def test_nerfstudio_pinhole_split_points_and_convention(tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=17, extra={"aabb_scale": 16, "ply_file_path": "sparse_pc.ply"})
    from plyfile import PlyData, PlyElement

    v = np.array([(0.1, 0.2, 0.3, 10, 20, 30), (-1, 0, 1, 255, 0, 7)], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    PlyData([PlyElement.describe(v, "vertex")]).write(str(root / "sparse_pc.ply"))
    scene = load_scene(root)
    assert scene.format == "nerfstudio" and scene.meta["aabb_scale"] == 16
    assert (len(scene.train), len(scene.test)) == (14, 3)
    assert [v.name for v in scene.test] == ["images/frame_00000.png", "images/frame_00008.png", "images/frame_00016.png"]
    np.testing.assert_allclose(scene.points, [[0.1, 0.2, 0.3], [-1, 0, 1]], atol=1e-6)
    assert scene.colors.dtype == np.uint8 and scene.colors.tolist() == [[10, 20, 30], [255, 0, 7]]
    cam = scene.test[0].camera
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (35.0, 36.0, 19.0, 16.0, 40, 30)
    np.testing.assert_allclose(cam.center, (5, 0, 1.5), atol=1e-9)
    u, v_, z = project(cam, (0, 0, 0))  # the look-at point lands on the principal point, in front
    assert z > 0 and (u, v_) == pytest.approx((19.0, 16.0))
    u, v_, z = project(cam, (0, 0, 1.0))  # a point above the target appears above it
    assert z > 0 and v_ < 16.0 and u == pytest.approx(19.0)
    assert scene.test[0].image().shape == (30, 40, 3)


def test_nerfstudio_per_frame_intrinsics_angle_and_filenames(tmp_path):
    per = {1: {"fl_x": 50.0, "fl_y": 50.0, "w": 40, "h": 30}}
    root = make_nerfstudio(
        tmp_path / "ns",
        n=4,
        intr={"camera_angle_x": 1.2},  # no w/h: read from the first image
        per_frame=per,
        extra={"train_filenames": ["images/frame_00000.png", "./images/frame_00001.png"], "test_filenames": ["images/frame_00003.png"]},
    )
    scene = load_scene(root / "transforms.json")
    assert [v.name for v in scene.train] == ["images/frame_00000.png", "images/frame_00001.png"]
    assert [v.name for v in scene.test] == ["images/frame_00003.png"]
    c0, c1 = scene.train[0].camera, scene.train[1].camera
    assert c0.fx == pytest.approx(20 / math.tan(0.6)) and (c0.width, c0.height, c0.cx, c0.cy) == (40, 30, 20.0, 15.0)
    assert c1.fx == 50.0


def test_nerfstudio_missing_frames(tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=12, missing=(2, 5, 7))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        scene = load_scene(root)
    msgs = [str(w.message) for w in rec if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1 and "skipped 3 of 12" in msgs[0] and "frame_00002" in msgs[0]
    assert scene.n_skipped == 3 and len(scene.train) + len(scene.test) == 9
    assert describe(scene)["n_skipped"] == 3


@pytest.mark.parametrize("model", ["OPENCV", "OPENCV_FISHEYE"])
def test_nerfstudio_distortion_is_undistorted(tmp_path, model):
    w = h = 120
    fx = fy = 80.0
    cx, cy = 60.0, 60.0
    if model == "OPENCV":
        dist = {"k1": -0.25, "k2": 0.05, "p1": 0.002, "p2": -0.001, "k3": 0.1}
        D = np.array([-0.25, 0.05, 0.002, -0.001, 0.1])  # OpenCV's order: k1 k2 p1 p2 k3
    else:
        dist = {"k1": 0.08, "k2": 0.01, "k3": 0.1, "k4": 0.02}
        D = np.array([0.08, 0.01, 0.1, 0.02])
    c2w = look_at_cv((3.0, 1.0, 2.0), target=(0.2, 0.1, 0.3))
    # Known camera-frame points, also given in world coordinates.
    pts_cam = np.array([[0.45, -0.35, 1.0], [-0.5, 0.4, 1.0], [0.0, 0.0, 1.0]])
    pts_world = (c2w[:3, :3] @ pts_cam.T).T + c2w[:3, 3]
    K_cv = np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]])  # OpenCV: pixel centres at integers
    if model == "OPENCV":
        dpx, _ = cv2.projectPoints(pts_cam, np.zeros(3), np.zeros(3), K_cv, D)
    else:
        dpx, _ = cv2.fisheye.projectPoints(pts_cam.reshape(1, -1, 3), np.zeros(3), np.zeros(3), K_cv, D)
    dpx = dpx.reshape(-1, 2)
    ideal = pts_cam[:, :2] / pts_cam[:, 2:] * [fx, fy] + [cx, cy]  # undistorted pixels, our convention
    src = distorted_blob_image(w, h, K_cv, D, model == "OPENCV_FISHEYE", ideal)
    # The blob really sits where OpenCV's forward model puts the distorted point.
    for (x, y), (pu, pv) in zip(dpx[:2], ideal[:2]):
        assert blob_centroid(src, (x + 0.5, y + 0.5)) == pytest.approx((x + 0.5, y + 0.5), abs=0.3)
    root = tmp_path / "ns"
    write_png(root / "images" / "a.png", src)
    meta = dict(fl_x=fx, fl_y=fy, cx=cx, cy=cy, w=w, h=h, camera_model=model, **dist)
    meta["frames"] = [{"file_path": "images/a.png", "transform_matrix": (c2w @ GL_TO_CV).tolist()}]
    (root / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(root, test_every=0)
    view = scene.train[0]
    img = view.image()
    assert img.shape == src.shape and np.abs(img.astype(int) - src.astype(int)).max() > 50  # really changed
    for Xw, dp, ip in zip(pts_world[:2], dpx[:2], ideal[:2]):
        u, v, z = project(view.camera, Xw)
        assert z > 0
        assert abs(u - (dp[0] + 0.5)) + abs(v - (dp[1] + 0.5)) > 3  # distortion moved it visibly
        assert (u, v) == pytest.approx(tuple(ip))
        cu, cv_ = blob_centroid(img, (u, v))
        assert (cu, cv_) == pytest.approx((u, v), abs=0.05)
    u, v, _ = project(view.camera, pts_world[2])
    assert (u, v) == pytest.approx((cx, cy)) and blob_centroid(img, (u, v)) == pytest.approx((cx, cy), abs=0.05)


# ----------------------------------------------------------------------------- COLMAP


@pytest.mark.parametrize("kind", ["bin", "txt"])
def test_colmap_model_poses_points_and_split(tmp_path, kind):
    cameras, images, pts, rgb = colmap_model()
    root = tmp_path / "c"
    (write_colmap_bin if kind == "bin" else write_colmap_txt)(root / "sparse" / "0", cameras, images, pts, rgb)
    write_colmap_images(root, images)
    scene = load_scene(root)
    assert scene.format == "colmap" and scene.n_skipped == 0
    assert [v.name for v in scene.test] == ["img_000.png", "img_008.png"] and len(scene.train) == 8
    np.testing.assert_allclose(scene.points, pts, atol=1e-6)
    assert scene.points.dtype == np.float32 and scene.colors.dtype == np.uint8
    np.testing.assert_array_equal(scene.colors, rgb)
    by_name = {v.name: v for v in scene.train + scene.test}
    for im in images:
        cam = by_name[im["name"]].camera
        np.testing.assert_allclose(cam.world_to_camera, im["w2c"], atol=1e-9)
        u, v, z = project(cam, (0, 0, 0))
        assert z > 0
    c0, c1 = by_name["img_000.png"].camera, by_name["img_001.png"].camera
    assert (c0.fx, c0.fy, c0.cx, c0.cy, c0.width, c0.height) == (30.0, 31.0, 20.0, 15.0, 40, 30)
    assert (c1.fx, c1.fy, c1.cx, c1.cy) == (33.0, 33.0, 20.5, 14.5)
    assert by_name["img_003.png"].image().shape == (30, 40, 3)
    d = describe(scene)
    assert d["n_points"] == 50 and d["width"] == 40 and d["height"] == 30


def test_colmap_known_quaternion_and_sparse_dir(tmp_path):
    # 90 degrees about z: q = (cos 45, 0, 0, sin 45) -> R = [[0,-1,0],[1,0,0],[0,0,1]].
    c = math.sqrt(0.5)
    images = [dict(id=7, q=np.array([c, 0, 0, c]), t=np.array([0.0, 0.0, 4.0]), cam=1, name="x.png")]
    cameras = {1: ("SIMPLE_PINHOLE", 20, 10, (10.0, 10.0, 5.0))}
    root = tmp_path / "c"
    write_colmap_bin(root / "sparse", cameras, images, np.zeros((0, 3)), np.zeros((0, 3), int))  # sparse/ directly
    write_png(root / "images" / "x.png", noise_image(20, 10))
    scene = load_scene(root, test_every=0)
    cam = scene.train[0].camera
    np.testing.assert_allclose(cam.world_to_camera[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    u, v, z = project(cam, (1.0, 0.0, 0.0))  # -> camera (0, 1, 4): below the centre
    assert z == pytest.approx(4.0) and (u, v) == pytest.approx((10.0, 7.5))
    assert scene.points.shape == (0, 3)


def test_colmap_downscale_uses_images_n_or_resizes(tmp_path):
    cameras, images, pts, rgb = colmap_model(n_images=4)
    root = tmp_path / "c"
    write_colmap_bin(root / "sparse" / "0", cameras, images, pts, rgb)
    write_colmap_images(root, images)
    s = load_scene(root, downscale=2, test_every=0)  # no images_2/: resize images/
    cam = s.train[0].camera  # img_000.png, PINHOLE (30, 31, 20, 15) at 40x30
    assert (cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy) == (20, 15, 15.0, 15.5, 10.0, 7.5)
    full = cv2.cvtColor(cv2.imread(str(root / "images" / s.train[0].name)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(s.train[0].image(), cv2.resize(full, (20, 15), interpolation=cv2.INTER_AREA))
    for im in images:  # images_2/ present: used as is
        write_png(root / "images_2" / im["name"], np.full((15, 20, 3), 77, np.uint8))
    s2 = load_scene(root, downscale=2, test_every=0)
    assert s2.train[0].image().shape == (15, 20, 3) and (s2.train[0].image() == 77).all()


@pytest.mark.parametrize(
    "model,params,D,writer",
    [  # params after (f, cx, cy) or (fx, fy, cx, cy); D: the same distortion in OpenCV's order
        ("OPENCV", (0.0015, 0.001), (-0.2, 0.03, 0.0015, 0.001), "txt"),
        ("SIMPLE_RADIAL", (-0.2,), (-0.2, 0.0, 0.0, 0.0), "bin"),
        ("RADIAL", (-0.18, 0.04), (-0.18, 0.04, 0.0, 0.0), "txt"),
        ("OPENCV_FISHEYE", (0.05, 0.01, 0.02, 0.0), (0.05, 0.01, 0.02, 0.0), "bin"),
    ],
)
def test_colmap_distorted_cameras_are_undistorted(tmp_path, model, params, D, writer):
    w, h, f = 100, 80, 70.0
    D = np.array(D)
    fisheye = model == "OPENCV_FISHEYE"
    if model in ("SIMPLE_RADIAL", "RADIAL"):
        cam_params = (f, 50.0, 40.0, *params)
    elif model == "OPENCV":
        cam_params = (f, f, 50.0, 40.0, *D)
    else:
        cam_params = (f, f, 50.0, 40.0, *params)
    cameras = {1: (model, w, h, cam_params)}
    c2w = look_at_cv((2.0, -3.0, 1.5))
    w2c = np.linalg.inv(c2w)
    images = [dict(id=1, q=quat_from_R(w2c[:3, :3]), t=w2c[:3, 3], cam=1, name="d.png")]
    pts_cam = np.array([[0.5, 0.4, 1.0]])
    K_cv = np.array([[f, 0, 49.5], [0, f, 39.5], [0, 0, 1]])
    if fisheye:
        dpx = cv2.fisheye.projectPoints(pts_cam.reshape(1, -1, 3), np.zeros(3), np.zeros(3), K_cv, D)[0].reshape(-1, 2)
    else:
        dpx = cv2.projectPoints(pts_cam, np.zeros(3), np.zeros(3), K_cv, D)[0].reshape(-1, 2)
    root = tmp_path / "c"
    (write_colmap_txt if writer == "txt" else write_colmap_bin)(root / "sparse" / "0", cameras, images, np.zeros((0, 3)), np.zeros((0, 3), int))
    ideal = pts_cam[:, :2] / pts_cam[:, 2:] * f + [50.0, 40.0]
    src = distorted_blob_image(w, h, K_cv, D, fisheye, ideal)
    assert blob_centroid(src, dpx[0] + 0.5) == pytest.approx(tuple(dpx[0] + 0.5), abs=0.3)
    write_png(root / "images" / "d.png", src)
    view = load_scene(root, test_every=0).train[0]
    img = view.image()
    assert np.abs(img.astype(int) - src.astype(int)).max() > 50
    Xw = c2w[:3, :3] @ pts_cam[0] + c2w[:3, 3]
    u, v, z = project(view.camera, Xw)
    assert (u, v) == pytest.approx(tuple(ideal[0])) and abs(u - dpx[0, 0] - 0.5) + abs(v - dpx[0, 1] - 0.5) > 3
    assert z > 0 and blob_centroid(img, (u, v)) == pytest.approx((u, v), abs=0.05)


def test_colmap_missing_images_skipped(tmp_path):
    cameras, images, pts, rgb = colmap_model(n_images=6)
    root = tmp_path / "c"
    write_colmap_bin(root / "sparse" / "0", cameras, images, pts, rgb)
    write_colmap_images(root, images[:4])
    with pytest.warns(UserWarning, match="skipped 2 of 6"):
        scene = load_scene(root)
    assert scene.n_skipped == 2 and len(scene.train + scene.test) == 4


# ----------------------------------------------------------------------------- LLFF


def make_llff(root: Path, n=9, W=32, H=24, F=28.0, name="IMG_{:04d}.png") -> list:
    """poses_bounds.npy and images/; returns the OpenCV camera-to-world matrices."""
    rows, c2ws = [], []
    for i in range(n):
        c2w = look_at_cv((0.3 * i - 1.2, -4.0, 0.2 * (i % 3)), target=(0, 0, 0))
        c2ws.append(c2w)
        right, down, fwd, t = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3]
        m = np.stack([down, right, -fwd, t, [H, W, F]], axis=1)  # LLFF: [down, right, back]
        rows.append(np.concatenate([m.reshape(-1), [1.0 + 0.1 * i, 10.0 + i]]))
        write_png(root / "images" / name.format(i), noise_image(W, H, seed=i))
    np.save(root / "poses_bounds.npy", np.array(rows))
    return c2ws


def test_llff_poses_bounds(tmp_path):
    root = tmp_path / "l"
    H, W, F = 24, 32, 28.0
    c2ws = make_llff(root, W=W, H=H, F=F)
    scene = load_scene(root)
    assert scene.format == "llff" and scene.points is None
    assert scene.near_far == pytest.approx((1.0, 18.0))
    assert [v.name for v in scene.test] == ["IMG_0000.png", "IMG_0008.png"] and len(scene.train) == 7
    cams = {v.name: v.camera for v in scene.train + scene.test}
    for i, c2w in enumerate(c2ws):
        cam = cams[f"IMG_{i:04d}.png"]
        np.testing.assert_allclose(cam.world_to_camera, np.linalg.inv(c2w), atol=1e-9)
        assert (cam.fx, cam.cx, cam.cy, cam.width, cam.height) == (F, 16.0, 12.0, W, H)
        u, v, z = project(cam, (0, 0, 0))
        assert z > 0 and (u, v) == pytest.approx((16.0, 12.0))
    assert scene.train[0].image().shape == (H, W, 3)
    (root / "images_2").mkdir()
    for i in range(9):
        write_png(root / "images_2" / f"IMG_{i:04d}.png", noise_image(W // 2, H // 2, seed=i))
    s2 = load_scene(root, downscale=2)
    assert s2.train[0].camera.fx == pytest.approx(14.0) and s2.train[0].image().shape == (12, 16, 3)
    assert describe(s2)["near_far"] == [1.0, 18.0]


@pytest.mark.parametrize("writer", [write_points3d_bin, write_points3d_txt])
def test_llff_reads_colmap_points_without_the_rest_of_the_model(tmp_path, writer):
    root = tmp_path / "l"
    make_llff(root)
    _, _, pts, rgb = colmap_model(n_points=37, seed=3)
    writer(root / "sparse" / "0", pts, rgb)  # imgs2poses.py leaves the model; here only its points
    assert detect_format(root)[0] == "llff"
    scene = load_scene(root)
    assert scene.format == "llff" and scene.points.shape == (37, 3) and scene.colors.dtype == np.uint8
    np.testing.assert_array_equal(scene.points, pts.astype(np.float32))  # same world frame: untouched
    np.testing.assert_array_equal(scene.colors, rgb)
    info = describe(scene)
    assert info["n_points"] == 37 and info["points_file"].endswith(f"points3D.{writer.__name__[-3:]}")


def test_llff_beside_a_full_colmap_model(tmp_path):
    root = tmp_path / "l"
    make_llff(root, W=40, H=30, name="img_{:03d}.png")  # the images the COLMAP model names
    cameras, images, pts, rgb = colmap_model(n_images=9)
    write_colmap_bin(root / "sparse" / "0", cameras, images, pts, rgb)
    assert load_scene(root).format == "colmap"  # a full model wins, as before
    scene = load_scene(root / "poses_bounds.npy")
    assert scene.format == "llff" and len(scene.train + scene.test) == 9
    np.testing.assert_array_equal(scene.points, pts.astype(np.float32))
    np.testing.assert_array_equal(scene.colors, rgb)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_no_such_folder(tmp_path):
    with pytest.raises(UserError, match="nope"):
        load_scene(tmp_path / "nope")


def test_bad_input_unknown_layout_lists_expected_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load_scene(tmp_path / "empty")
    msg = str(e.value)
    assert "empty" in msg and "transforms.json" in msg and "cameras.bin" in msg and "poses_bounds.npy" in msg
    assert "\n" not in msg


def test_bad_input_malformed_json(tmp_path):
    (tmp_path / "transforms.json").write_text('{"frames": [ {"file_path": "a.png",, }')
    with pytest.raises(UserError, match=r"transforms\.json.*malformed JSON"):
        load_scene(tmp_path)
    (tmp_path / "transforms.json").unlink()
    (tmp_path / "transforms_train.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"transforms_train\.json"):
        load_scene(tmp_path)


def test_bad_input_empty_scene(tmp_path):
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 10, "w": 8, "h": 8, "frames": []}))
    with pytest.raises(UserError, match=r"transforms\.json.*no frames"):
        load_scene(tmp_path)
    b = tmp_path / "b"
    b.mkdir()
    (b / "transforms_train.json").write_text(json.dumps({"camera_angle_x": 0.7, "frames": []}))
    with pytest.raises(UserError, match=r"transforms_train\.json.*no frames"):
        load_scene(b)
    c = tmp_path / "c"
    write_colmap_bin(c / "sparse" / "0", {1: ("PINHOLE", 8, 8, (5.0, 5.0, 4.0, 4.0))}, [], np.zeros((0, 3)), np.zeros((0, 3), int))
    (c / "images").mkdir()
    with pytest.raises(UserError, match=r"images\.bin.*no registered images"):
        load_scene(c)


def test_bad_input_all_images_missing(tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=3, missing=(0, 1, 2))
    with pytest.raises(UserError, match=r"transforms\.json.*none of the 3 images"):
        load_scene(root)


def test_bad_input_corrupt_image_names_file(tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=3)
    (root / "images" / "frame_00001.png").write_bytes(b"this is not a png")
    scene = load_scene(root, test_every=0)
    with pytest.raises(UserError, match=r"frame_00001\.png.*corrupt"):
        [v.image() for v in scene.train]


def _with_exif_thumbnail(jpg: bytes, thumb: bytes) -> bytes:
    """``jpg`` with an APP1 segment holding ``thumb`` (its own end-of-image marker) after the SOI."""
    app1 = b"Exif\x00\x00" + thumb
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:]


def test_truncated_jpeg_and_png_name_the_file(tmp_path):
    img = noise_image(40, 30)
    jpg = cv2.imencode(".jpg", img)[1].tobytes()
    png = cv2.imencode(".png", img)[1].tobytes()
    thumb = cv2.imencode(".jpg", noise_image(8, 6))[1].tobytes()
    whole = {"a.jpg": jpg, "padded.jpg": jpg + b"\x00" * 300 + b"\n", "trailer.jpg": jpg + b"maker data" * 50,
             "thumb.jpg": _with_exif_thumbnail(jpg, thumb), "a.png": png, "padded.png": png + b"\x00" * 64}
    cut = {"cut.jpg": jpg[: len(jpg) * 6 // 10], "cut_thumb.jpg": _with_exif_thumbnail(jpg, thumb)[: len(jpg) * 6 // 10],
           "no_eoi.jpg": jpg[:-2], "cut.png": png[: len(png) * 6 // 10], "no_iend.png": png[:-12]}
    for name, data in {**whole, **cut}.items():
        (tmp_path / name).write_bytes(data)
    for name in whole:
        out = decode_image(tmp_path / name)
        assert out.shape == (30, 40, 3), name
        if name.endswith(".png"):
            np.testing.assert_array_equal(out, img[:, :, ::-1])  # encoded as BGR, decoded as RGB
    for name in cut:
        with pytest.raises(UserError) as e:
            decode_image(tmp_path / name)
        msg = str(e.value)
        assert str(tmp_path / name) in msg and "truncated" in msg and "replace the file" in msg and "\n" not in msg
        assert ("end-of-image" if name.endswith(".jpg") else "IEND") in msg


def test_bad_input_inconsistent_image_size_names_file(tmp_path):
    cameras, images, pts, rgb = colmap_model(n_images=3)
    root = tmp_path / "c"
    write_colmap_bin(root / "sparse" / "0", cameras, images, pts, rgb)
    write_colmap_images(root, images)
    write_png(root / "images" / "img_002.png", noise_image(41, 30))
    scene = load_scene(root, test_every=0)
    scene.train[0].image()
    with pytest.raises(UserError, match=r"img_002\.png.*41x30.*40x30"):
        scene.train[2].image()


def test_bad_input_unsupported_camera_model(tmp_path):
    cameras = {1: ("FULL_OPENCV", 40, 30, tuple([30.0, 30.0, 20.0, 15.0] + [0.0] * 8))}
    _, images, pts, rgb = colmap_model(n_images=2)
    for im in images:
        im["cam"] = 1
    for writer in (write_colmap_bin, write_colmap_txt):
        root = tmp_path / writer.__name__
        writer(root / "sparse" / "0", cameras, images, pts, rgb)
        write_colmap_images(root, images)
        with pytest.raises(UserError) as e:
            load_scene(root)
        msg = str(e.value)
        assert "FULL_OPENCV" in msg and "cameras." in msg and "PINHOLE" in msg and "OPENCV" in msg
    root = make_nerfstudio(tmp_path / "ns", n=2, extra={"camera_model": "EQUIRECTANGULAR"})
    with pytest.raises(UserError, match="EQUIRECTANGULAR"):
        load_scene(root)


def test_bad_input_truncated_colmap_and_bad_options(tmp_path):
    cameras, images, pts, rgb = colmap_model(n_images=2)
    root = tmp_path / "c"
    write_colmap_bin(root / "sparse" / "0", cameras, images, pts, rgb)
    write_colmap_images(root, images)
    data = (root / "sparse" / "0" / "images.bin").read_bytes()
    (root / "sparse" / "0" / "images.bin").write_bytes(data[:40])
    with pytest.raises(UserError, match=r"images\.bin.*truncated"):
        load_scene(root)
    with pytest.raises(UserError, match="downscale"):
        load_scene(root, downscale=0.5)
    with pytest.raises(UserError, match="background"):
        load_scene(root, background=(255, 255, 255))


def test_user_errors_are_one_line(tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=2)
    (root / "images" / "frame_00000.png").write_bytes(b"junk")
    with pytest.raises(UserError) as e:
        load_scene(root, test_every=0).train[0].image()
    assert "\n" not in str(e.value) and str(root / "images" / "frame_00000.png") in str(e.value)


# ----------------------------------------------------------------------------- bundled scene, lego


def test_bundled_scene_loads():
    assert TOY.is_dir(), "run scripts/make_scene.py"
    scene = load_scene(TOY)
    assert scene.format == "blender"
    assert (len(scene.train), len(scene.test)) == (60, 12)
    assert all((v.camera.width, v.camera.height) == (128, 128) for v in scene.train + scene.test)
    assert scene.points is not None and 2000 <= len(scene.points) <= 5000
    assert scene.points.dtype == np.float32 and scene.colors.dtype == np.uint8 and scene.colors.shape == scene.points.shape
    d = describe(scene)
    for key in ("format", "n_train", "n_test", "width", "height", "n_points", "n_skipped", "bounds", "path"):
        assert key in d
    assert (d["n_train"], d["n_test"], d["width"], d["height"]) == (60, 12, 128, 128)
    json.dumps(d)  # JSON-ready
    img = scene.test[0].image()
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert (img == 255).all(axis=2).mean() > 0.05  # white where rays miss
    assert (img.std(axis=2) > 40).mean() > 0.05  # and coloured shapes elsewhere


def test_bundled_scene_projects_shapes_where_they_are():
    """Sphere centres (from make_scene.py) projected with the loaded cameras hit their colour."""
    scene = load_scene(TOY)
    red, green = np.array([0.75, -0.45, 0.45]), np.array([-0.55, -0.60, 0.35])
    checked = 0
    for view in scene.test[:6]:
        img = view.image().astype(int)
        for centre, channel in ((red, 0), (green, 1)):
            u, v, z = project(view.camera, centre)
            assert z > 0
            # Only where the sphere's centre is not hidden by another shape.
            px = img[int(v), int(u)]
            if px[channel] > 40 and px[channel] >= 2 * np.delete(px, channel).max():
                checked += 1
    assert checked >= 9  # most centres (12 in all) show their sphere's colour


@pytest.mark.skipif(not LEGO.is_dir(), reason=f"NeRF-synthetic lego not present at {LEGO}")
def test_lego_loads():
    scene = load_scene(LEGO)
    assert (len(scene.train), len(scene.test)) == (100, 200)
    cam = scene.train[0].camera
    assert (cam.width, cam.height) == (800, 800) and cam.fx == pytest.approx(1111.111, rel=1e-4)
    img = scene.train[0].image()
    assert img.shape == (800, 800, 3) and tuple(img[0, 0]) == (255, 255, 255)
    u, v, z = project(cam, (0, 0, 0))  # lego cameras look at the origin
    assert z > 0 and abs(u - 400) < 40 and abs(v - 400) < 40
    centre, half = scene.look_at()  # the random init's region: at the origin, 3DGS's 1.3-unit half-size
    assert np.linalg.norm(centre) < 0.05 and 1.2 < half < 1.5


def test_public_types():
    assert Scene.__name__ == "Scene" and View.__name__ == "View"


def _looking_at(target, centres, up=(0.0, 0.0, 1.0)):
    """Views whose OpenCV cameras sit at ``centres`` and look at ``target``."""
    views = []
    for i, c in enumerate(np.asarray(centres, dtype=np.float64)):
        z = np.asarray(target, dtype=np.float64) - c
        z /= np.linalg.norm(z)
        x = np.cross(z, up)
        x = x / np.linalg.norm(x) if np.linalg.norm(x) > 1e-9 else np.array([1.0, 0.0, 0.0])
        y = np.cross(z, x)
        w2c = np.eye(4)
        w2c[:3, :3] = np.stack([x, y, z])
        w2c[:3, 3] = -w2c[:3, :3] @ c
        views.append(View(f"v{i}", Camera(50.0, 50.0, 32.0, 32.0, 64, 64, w2c), lambda: np.zeros((64, 64, 3), np.uint8)))
    return views


def test_look_at_finds_what_hemisphere_cameras_look_at():
    """Cameras on an upper hemisphere around (1, 2, 0.5): their mean centre is far above it, the
    least-squares point nearest their axes is it; half-size = a third of their distance."""
    g = np.random.default_rng(0)
    target = np.array([1.0, 2.0, 0.5])
    d = g.normal(size=(40, 3))
    d[:, 2] = np.abs(d[:, 2]) + 0.2
    centres = target + 4.0 * d / np.linalg.norm(d, axis=1, keepdims=True)
    scene = Scene("blender", "x", _looking_at(target, centres), [])
    centre, half = scene.look_at()
    assert np.linalg.norm(centre - target) < 1e-6 and half == pytest.approx(4.0 / 3.0)
    assert np.linalg.norm(centres.mean(0) - target) > 1.5  # what the old init used


def test_look_at_forward_facing_goes_in_front_of_the_cameras():
    """Parallel axes (a forward-facing capture): no nearest point, so the mean centre moved along
    the axis by the middle of the near/far bounds."""
    centres = np.array([[x, y, 0.0] for x in (-0.2, 0.0, 0.2) for y in (-0.1, 0.1)])
    views = _looking_at((0.0, 0.0, 1.0), centres, up=(0.0, 1.0, 0.0))
    for v, c in zip(views, centres):  # make the axes exactly parallel (+z)
        w2c = np.eye(4)
        w2c[:3, 3] = -c
        v.camera.world_to_camera = w2c
    scene = Scene("llff", "x", views, [], near_far=(2.0, 6.0))
    centre, half = scene.look_at()
    assert np.allclose(centre, [0.0, 0.0, 4.0]) and half == pytest.approx(4.0 / 3.0)
