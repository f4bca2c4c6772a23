"""COLMAP sparse models (binary or text), read with our own parsers.

    scene/
      sparse/0/{cameras,images,points3D}.{bin,txt}   (or sparse/, or the scene folder itself)
      images/        full-resolution images, named as in images.bin/txt
      images_N/      optional downscaled copies, used for downscale=N
      masks/         optional <image name>.png (or the image's own name): black pixels are ignored
                     by training (``View.mask``); ``budget3d process --masks`` writes them

COLMAP's qvec (w, x, y, z) and tvec are already world-to-camera in OpenCV axes. Non-pinhole
models are undistorted with OpenCV to a pinhole camera with the same fx, fy, cx, cy. Images that
the model names but the folder lacks are skipped with one warning.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, Scene
from budget3d.scene.common import Undistorter, make_view, split_indices, warn_skipped

# model id -> (name, number of params), as in COLMAP's src/colmap/sensor/models.h
CAMERA_MODELS = {
    0: ("SIMPLE_PINHOLE", 3),
    1: ("PINHOLE", 4),
    2: ("SIMPLE_RADIAL", 4),
    3: ("RADIAL", 5),
    4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8),
    6: ("FULL_OPENCV", 12),
    7: ("FOV", 5),
    8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5),
    10: ("THIN_PRISM_FISHEYE", 12),
    11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
MODEL_IDS = {name: i for i, (name, _) in CAMERA_MODELS.items()}
SUPPORTED_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "OPENCV_FISHEYE")


class ColmapCamera(NamedTuple):
    id: int
    model: str
    width: int
    height: int
    params: tuple


class ColmapImage(NamedTuple):
    id: int
    qvec: np.ndarray  # (w, x, y, z)
    tvec: np.ndarray
    camera_id: int
    name: str


# --------------------------------------------------------------------------- locating the model


def find_model_dir(root: Path):
    """The folder holding cameras/images/points3D (.bin or .txt), or None."""
    for d in (root / "sparse" / "0", root / "sparse", root):
        for ext in (".bin", ".txt"):
            if (d / f"cameras{ext}").is_file() and (d / f"images{ext}").is_file():
                return d
    return None


def find_images_dir(root: Path, model_dir: Path) -> Path:
    for d in (root, model_dir, model_dir.parent, model_dir.parent.parent):
        if (d / "images").is_dir():
            return d / "images"
    raise UserError(f"{root}: COLMAP model found in {model_dir} but no images/ folder beside it; put the images in {root / 'images'}")


# --------------------------------------------------------------------------- binary parsers


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e}); check the file exists and is readable") from None
        self.pos = 0

    def read(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise UserError(f"{self.path}: file is truncated or corrupt; re-export the COLMAP model")
        out = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return out

    def skip(self, n: int):
        if self.pos + n > len(self.data):
            raise UserError(f"{self.path}: file is truncated or corrupt; re-export the COLMAP model")
        self.pos += n

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise UserError(f"{self.path}: file is truncated or corrupt; re-export the COLMAP model")
        s = self.data[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s


def read_cameras_bin(path: Path) -> dict[int, ColmapCamera]:
    r = _Reader(path)
    (n,) = r.read("Q")
    cams = {}
    for _ in range(n):
        cam_id, model_id, w, h = r.read("iiQQ")
        if model_id not in CAMERA_MODELS:
            raise UserError(f"{path}: unknown camera model id {model_id}; re-export the COLMAP model")
        name, n_params = CAMERA_MODELS[model_id]
        params = r.read("d" * n_params)
        cams[cam_id] = ColmapCamera(cam_id, name, int(w), int(h), tuple(params))
    return cams


def read_images_bin(path: Path) -> dict[int, ColmapImage]:
    r = _Reader(path)
    (n,) = r.read("Q")
    images = {}
    for _ in range(n):
        vals = r.read("idddddddi")
        name = r.cstring()
        (n_pts,) = r.read("Q")
        r.skip(24 * n_pts)  # (x: double, y: double, point3D_id: int64) per 2D point
        images[vals[0]] = ColmapImage(vals[0], np.array(vals[1:5]), np.array(vals[5:8]), vals[8], name)
    return images


def read_points3d_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    r = _Reader(path)
    (n,) = r.read("Q")
    xyz = np.empty((n, 3), np.float32)
    rgb = np.empty((n, 3), np.uint8)
    for i in range(n):
        vals = r.read("QdddBBBdQ")  # id, xyz, rgb, error, track length
        xyz[i] = vals[1:4]
        rgb[i] = vals[4:7]
        r.skip(8 * vals[8])  # (image_id: int32, point2D_idx: int32) per track element
    return xyz, rgb


# --------------------------------------------------------------------------- text parsers


def _text_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e}); check the file exists and is readable") from None


def _bad_line(path: Path, lineno: int, what: str) -> UserError:
    return UserError(f"{path}: line {lineno}: {what}; fix or re-export the COLMAP model")


def read_cameras_txt(path: Path) -> dict[int, ColmapCamera]:
    cams = {}
    for lineno, line in enumerate(_text_lines(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            cam_id, model, w, h = int(parts[0]), parts[1].upper(), int(parts[2]), int(parts[3])
            params = tuple(float(x) for x in parts[4:])
        except (ValueError, IndexError):
            raise _bad_line(path, lineno, "expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]") from None
        if model in MODEL_IDS and len(params) != CAMERA_MODELS[MODEL_IDS[model]][1]:
            raise _bad_line(path, lineno, f"{model} needs {CAMERA_MODELS[MODEL_IDS[model]][1]} parameters, got {len(params)}")
        cams[cam_id] = ColmapCamera(cam_id, model, w, h, params)
    return cams


def read_images_txt(path: Path) -> dict[int, ColmapImage]:
    lines = _text_lines(path)
    images = {}
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=9)
        try:
            img_id = int(parts[0])
            q = np.array([float(x) for x in parts[1:5]])
            t = np.array([float(x) for x in parts[5:8]])
            cam_id = int(parts[8])
            name = parts[9].strip()
        except (ValueError, IndexError):
            raise _bad_line(path, i, "expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME") from None
        images[img_id] = ColmapImage(img_id, q, t, cam_id, name)
        i += 1  # the POINTS2D line that follows (possibly empty)
    return images


def read_points3d_txt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    xyz, rgb = [], []
    for lineno, line in enumerate(_text_lines(path), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            xyz.append([float(x) for x in parts[1:4]])
            rgb.append([int(x) for x in parts[4:7]])
        except ValueError:
            raise _bad_line(path, lineno, "expected POINT3D_ID X Y Z R G B ERROR TRACK[]") from None
        if len(xyz[-1]) != 3 or len(rgb[-1]) != 3:
            raise _bad_line(path, lineno, "expected POINT3D_ID X Y Z R G B ERROR TRACK[]")
    return np.asarray(xyz, np.float32).reshape(-1, 3), np.clip(np.asarray(rgb), 0, 255).astype(np.uint8).reshape(-1, 3)


def read_model(model_dir: Path):
    """(cameras, images, points xyz or None, rgb or None) from a model folder, binary preferred."""
    ext = ".bin" if (model_dir / "cameras.bin").is_file() and (model_dir / "images.bin").is_file() else ".txt"
    if ext == ".bin":
        cams, imgs = read_cameras_bin(model_dir / "cameras.bin"), read_images_bin(model_dir / "images.bin")
    else:
        cams, imgs = read_cameras_txt(model_dir / "cameras.txt"), read_images_txt(model_dir / "images.txt")
    pts = model_dir / f"points3D{ext}"
    xyz = rgb = None
    if pts.is_file():
        xyz, rgb = (read_points3d_bin if ext == ".bin" else read_points3d_txt)(pts)
    return cams, imgs, xyz, rgb, ext


# --------------------------------------------------------------------------- cameras


def qvec_to_rotmat(q) -> np.ndarray:
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def pinhole_and_distortion(cam: ColmapCamera, where: Path):
    """(fx, fy, cx, cy, Undistorter or None) for a supported model, else UserError."""
    p = cam.params
    m = cam.model
    if m not in SUPPORTED_MODELS:
        raise UserError(
            f"{where}: camera {cam.id} uses the {m} model, which is not supported (supported: "
            f"{', '.join(SUPPORTED_MODELS)}); re-run COLMAP with one of those or undistort with 'colmap image_undistorter'"
        )
    if m == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy, coeffs, kind = p[1], p[2], (), None
    elif m == "PINHOLE":
        fx, fy, cx, cy = p[:4]
        coeffs, kind = (), None
    elif m == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, coeffs, kind = p[1], p[2], (p[3], 0.0, 0.0, 0.0), "opencv"
    elif m == "RADIAL":
        fx = fy = p[0]
        cx, cy, coeffs, kind = p[1], p[2], (p[3], p[4], 0.0, 0.0), "opencv"
    elif m == "OPENCV":
        fx, fy, cx, cy = p[:4]
        coeffs, kind = tuple(p[4:8]), "opencv"
    else:  # OPENCV_FISHEYE
        fx, fy, cx, cy = p[:4]
        coeffs, kind = tuple(p[4:8]), "fisheye"
    und = Undistorter(kind, fx, fy, cx, cy, cam.width, cam.height, coeffs) if kind and any(coeffs) else None
    return fx, fy, cx, cy, und


def load_colmap(root: Path, *, downscale=1, background=(1.0, 1.0, 1.0), test_every=8, cache=True) -> Scene:
    root = Path(root)
    model_dir = find_model_dir(root)
    if model_dir is None:
        raise UserError(f"{root}: no COLMAP model (expected sparse/0/cameras.bin|txt and images.bin|txt)")
    cams, imgs, xyz, rgb, ext = read_model(model_dir)
    images_file = model_dir / f"images{ext}"
    if not imgs:
        raise UserError(f"{images_file}: no registered images (empty scene); re-run COLMAP mapping or point to another scene")
    images_dir = find_images_dir(root, model_dir)
    small_dir = images_dir.parent / f"images_{int(downscale)}" if float(downscale).is_integer() and downscale > 1 else None
    use_small = small_dir is not None and small_dir.is_dir()
    masks_dir = images_dir.parent / "masks"
    masks_dir = masks_dir if masks_dir.is_dir() else None

    intr = {}
    views, n_skipped, example = [], 0, ""
    ordered = sorted(imgs.values(), key=lambda im: im.name)
    for im in ordered:
        if im.camera_id not in cams:
            raise UserError(f"{images_file}: image {im.name} refers to camera {im.camera_id}, which cameras{ext} lacks; re-export the model")
        cam = cams[im.camera_id]
        if im.camera_id not in intr:
            intr[im.camera_id] = pinhole_and_distortion(cam, model_dir / f"cameras{ext}")
        fx, fy, cx, cy, und = intr[im.camera_id]
        path, prescaled = None, False
        if use_small and (small_dir / im.name).is_file():
            path, prescaled = small_dir / im.name, True
        elif (images_dir / im.name).is_file():
            path = images_dir / im.name
        if path is None:
            n_skipped += 1
            example = example or im.name
            continue
        w2c = np.eye(4)
        w2c[:3, :3] = qvec_to_rotmat(im.qvec)
        w2c[:3, 3] = im.tvec
        camera = Camera(float(fx), float(fy), float(cx), float(cy), cam.width, cam.height, w2c)
        mask = None
        if masks_dir is not None:
            mask = next((m for m in (masks_dir / (im.name + ".png"), masks_dir / im.name) if m.is_file()), None)
        views.append(make_view(im.name, path, camera, downscale=downscale, background=background, cache=cache,
                               undistort=und, prescaled=prescaled, mask_path=mask))
    if not views:
        raise UserError(
            f"{images_file}: none of its {len(ordered)} images are in {images_dir} (e.g. {example}); put the images there"
        )
    warn_skipped(n_skipped, len(ordered), images_dir, example)
    tr, te = split_indices(len(views), test_every)
    return Scene(
        format="colmap",
        path=str(root),
        train=[views[i] for i in tr],
        test=[views[i] for i in te],
        points=xyz,
        colors=rgb,
        background=tuple(background),
        n_skipped=n_skipped,
        meta={"model_dir": str(model_dir), "model_format": ext[1:],
              **({"masks": sum(v.load_mask is not None for v in views)} if masks_dir is not None else {}),
              **({"processed": True} if (root / "process.json").is_file() else {})},
    )
