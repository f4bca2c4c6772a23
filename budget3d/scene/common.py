"""Shared pieces of the scene readers: JSON/PLY reading, lazy image loading, undistortion, splits.

Every reader builds cameras at the *source* resolution and hands them to ``make_view``, which
scales the camera for the requested downscale and returns a ``View`` whose ``load`` closure
reads, checks, composites, undistorts and resizes the image only when it is first needed.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, View

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp", ".exr")

# OpenGL / Blender camera axes (x right, y up, z back) -> OpenCV (x right, y down, z forward).
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- small readers


def read_json(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or regenerate the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e}); check the file exists and is readable text") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}; fix or regenerate the file")
    return data


def read_ply_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(M,3) float32 xyz and (M,3) uint8 rgb from a PLY's ``vertex`` element (grey if it has no colours)."""
    from plyfile import PlyData

    try:
        ply = PlyData.read(str(path))
        v = ply["vertex"].data
        names = v.dtype.names or ()
        xyz = np.stack([np.asarray(v[k], dtype=np.float32) for k in ("x", "y", "z")], axis=1)
    except Exception as e:  # plyfile raises many types for bad input
        raise UserError(f"{path}: not a readable point cloud PLY with x, y, z vertices ({e}); regenerate it or remove it") from None
    if all(k in names for k in ("red", "green", "blue")):
        rgb = np.stack([np.asarray(v[k]) for k in ("red", "green", "blue")], axis=1)
        if np.issubdtype(rgb.dtype, np.floating):
            rgb = rgb * 255.0 if rgb.size and rgb.max() <= 1.0 else rgb
        elif rgb.dtype.itemsize > 1:  # 16-bit colours
            rgb = rgb / 257.0
        rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    else:
        rgb = np.full((len(xyz), 3), 128, np.uint8)
    return xyz, rgb


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image, from its header for PNG/JPEG, else by decoding it."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
                w, h = struct.unpack(">II", head[16:24])
                return int(w), int(h)
            if head[:2] == b"\xff\xd8":
                size = _jpeg_size(f)
                if size is not None:
                    return size
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e}); check the file exists and is readable") from None
    img = decode_image(path)
    return img.shape[1], img.shape[0]


def _jpeg_size(f) -> Optional[tuple[int, int]]:
    f.seek(2)
    while True:
        b = f.read(1)
        while b and b != b"\xff":
            b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        seg = f.read(2)
        if len(seg) < 2:
            return None
        (length,) = struct.unpack(">H", seg)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return int(w), int(h)
        f.seek(length - 2, 1)


# --------------------------------------------------------------------------- images


def decode_image(path: Path) -> np.ndarray:
    """The raw image as uint8 (H, W, C) with C in {3 RGB, 4 RGBA}; UserError naming the file if unreadable.

    The file is read once and decoded from memory, so that its end can be checked for free first.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: image does not exist; replace the file or remove its frame from the scene") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e.strerror or e}); check the file is readable") from None
    why = _truncation(data)
    if why:
        raise UserError(f"{path}: image is truncated or corrupt ({why}); replace the file "
                        "(copy it again from the source) or remove its frame from the scene")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if img is None or img.size == 0:
        raise UserError(f"{path}: image is corrupt, unreadable or not an image; replace the file or remove its "
                        "frame from the scene")
    if img.dtype == np.uint16:
        img = np.rint(img / 257.0).astype(np.uint8)
    elif img.dtype != np.uint8:  # float (EXR/TIFF): assume 0..1
        img = np.clip(np.rint(np.nan_to_num(img.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    c = img.shape[2]
    if c == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
    if c == 2:  # grey + alpha
        grey = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2RGB)
        return np.concatenate([grey, img[:, :, 1:2]], axis=2)
    if c == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return cv2.cvtColor(img[:, :, :4], cv2.COLOR_BGRA2RGBA)


def _truncation(data: bytes) -> Optional[str]:
    """Why a JPEG or PNG is cut short, or None. OpenCV decodes a truncated JPEG into a half-grey
    image with only a warning on stderr, so the end marker is checked here instead."""
    if data[:2] == b"\xff\xd8":
        # End-of-image after the first scan: trailing padding or maker data may follow it, and
        # inside the scan data an 0xFF byte is always escaped, so no false match there.
        if data.rfind(b"\xff\xd9", _jpeg_scan_start(data)) < 0:
            return "JPEG has no end-of-image marker"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i + 8 <= len(data) and data[i + 4 : i + 8] != b"IEND":  # walk the chunks: length, type, data, CRC
            i += 12 + int.from_bytes(data[i : i + 4], "big")
        if i + 8 > len(data):
            return "PNG has no IEND chunk"
    return None


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of the first start-of-scan marker (past any EXIF thumbnail and its own end marker)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        m = data[i + 1]
        if m == 0xDA:
            return i
        if m == 0xFF or m == 0x01 or 0xD0 <= m <= 0xD8:  # fill byte, or a marker without a length
            i += 1 if m == 0xFF else 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return min(i, len(data))


def composite(img: np.ndarray, background: Sequence[float]) -> np.ndarray:
    """RGBA uint8 -> RGB uint8 over ``background`` (floats in 0..1); RGB passes through."""
    if img.shape[2] == 3:
        return img
    a = img[:, :, 3:4].astype(np.float32) / 255.0
    bg = np.asarray(background, np.float32).reshape(1, 1, 3) * 255.0
    out = img[:, :, :3].astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class Undistorter:
    """Undistorts images of one physical camera to a pinhole with the same fx, fy, cx, cy.

    ``model`` is "opencv" (coefficients k1, k2, p1, p2[, k3]) or "fisheye" (k1..k4). Intrinsics
    are given at (width, height) in our pixel-centre-at-+0.5 convention; images of any other
    size (downscaled copies) use the intrinsics scaled to their size. Remap tables are cached.
    """

    def __init__(self, model: str, fx, fy, cx, cy, width, height, coeffs):
        self.model = model
        self.fx, self.fy, self.cx, self.cy = float(fx), float(fy), float(cx), float(cy)
        self.width, self.height = int(width), int(height)
        self.coeffs = np.asarray(coeffs, np.float64)
        self._maps: dict = {}

    def maps(self, w: int, h: int):
        if (w, h) not in self._maps:
            sx, sy = w / self.width, h / self.height
            # OpenCV puts pixel centres at integers; ours are at +0.5, hence the shift.
            K = np.array([[self.fx * sx, 0, self.cx * sx - 0.5], [0, self.fy * sy, self.cy * sy - 0.5], [0, 0, 1]])
            if self.model == "fisheye":
                m1, m2 = cv2.fisheye.initUndistortRectifyMap(K, self.coeffs[:4], np.eye(3), K, (w, h), cv2.CV_32FC1)
            else:
                m1, m2 = cv2.initUndistortRectifyMap(K, self.coeffs, np.eye(3), K, (w, h), cv2.CV_32FC1)
            self._maps[(w, h)] = (m1, m2)
        return self._maps[(w, h)]

    def __call__(self, img: np.ndarray) -> np.ndarray:
        m1, m2 = self.maps(img.shape[1], img.shape[0])
        return cv2.remap(img, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def make_view(
    name: str,
    image_path: Path,
    camera: Camera,
    *,
    downscale: float,
    background,
    cache: bool,
    undistort: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    prescaled: bool = False,
    mask_path: Optional[Path] = None,
) -> View:
    """A lazily loaded view. ``camera`` is at source resolution; the view's camera is downscaled.

    ``prescaled``: the file is an already downscaled copy (``images_N/``), so it must be about
    ``camera.width / downscale`` wide (rounding either way is accepted) instead of full size.
    ``mask_path``: a grey image at the camera's source size, 0 (black) where training ignores the
    pixel; resized to the view (a pixel counts where most of its area does).
    """
    out_cam = camera.scaled(downscale) if downscale != 1 else camera
    tw, th = out_cam.width, out_cam.height
    ew, eh = (camera.width / downscale, camera.height / downscale) if prescaled else (camera.width, camera.height)
    tol = 1.0 if prescaled else 0.0

    def load() -> np.ndarray:
        img = decode_image(image_path)
        h, w = img.shape[:2]
        if abs(w - ew) > tol or abs(h - eh) > tol:
            raise UserError(
                f"{image_path}: image is {w}x{h} but its camera expects {int(round(ew))}x{int(round(eh))}; "
                "images of one camera must all have the camera's size (re-export the image or fix the camera)"
            )
        img = composite(img, background)
        if undistort is not None:
            img = undistort(img)
        if (w, h) != (tw, th):
            interp = cv2.INTER_AREA if tw <= w else cv2.INTER_LINEAR
            img = cv2.resize(img, (tw, th), interpolation=interp)
        return np.ascontiguousarray(img)

    def load_mask() -> np.ndarray:
        m = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise UserError(f"{mask_path}: mask is not a readable image; replace it (black = ignore) or remove it")
        if (m.shape[1], m.shape[0]) != (camera.width, camera.height):
            raise UserError(f"{mask_path}: mask is {m.shape[1]}x{m.shape[0]} but its image's camera is "
                            f"{camera.width}x{camera.height}; masks must have the full image size")
        if undistort is not None:
            m = undistort(m)
        if (m.shape[1], m.shape[0]) != (tw, th):
            m = cv2.resize(m, (tw, th), interpolation=cv2.INTER_AREA)
        return m >= 128

    return View(name=name, camera=out_cam, load=load, cache=cache, load_mask=load_mask if mask_path else None)


def find_image(root: Path, rel: str, *, downscale: float = 1) -> tuple[Optional[Path], bool]:
    """Resolve an image path from a transforms file: as given, else with a common extension.

    With an integer ``downscale`` N > 1, a copy in a sibling ``<dir>_N/`` folder (nerfstudio's
    ``images_2/`` convention) is preferred. Returns (path or None, prescaled).
    """
    p = Path(rel)
    if not p.is_absolute():
        p = root / p
    cands = [p] + ([p.with_name(p.name + e) for e in (".png", ".jpg", ".jpeg", ".JPG", ".PNG")] if p.suffix.lower() not in IMAGE_EXTS else [])
    n = int(downscale) if float(downscale).is_integer() else 0
    if n > 1:
        for c in cands:
            small = c.parent.parent / f"{c.parent.name}_{n}" / c.name
            if small.is_file():
                return small, True
    for c in cands:
        if c.is_file():
            return c, False
    return None, False


def warn_skipped(n: int, total: int, where: Path, example: str) -> None:
    if n:
        warnings.warn(
            f"{where}: skipped {n} of {total} frames whose image file is missing (e.g. {example})",
            UserWarning,
            stacklevel=3,
        )


def split_indices(n: int, test_every: int) -> tuple[list[int], list[int]]:
    """Every ``test_every``-th image (i % test_every == 0) is a test image; 0 disables the test split.

    If that leaves no training image (a one-image scene), every image is used for training.
    """
    if not test_every or test_every <= 0:
        return list(range(n)), []
    test = [i for i in range(n) if i % test_every == 0]
    train = [i for i in range(n) if i % test_every != 0]
    if not train:
        train = list(range(n))
    return train, test


def pose_matrix(m, where: str) -> np.ndarray:
    """A 3x4 or 4x4 nested list -> 4x4 float64, or UserError naming ``where``."""
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape not in ((4, 4), (3, 4)) or not np.isfinite(a).all():
        raise UserError(f"{where}: transform_matrix must be a 4x4 (or 3x4) list of numbers; fix the file")
    if a.shape == (3, 4):
        a = np.vstack([a, [0, 0, 0, 1]])
    return a


def gl_c2w_to_w2c(c2w_gl: np.ndarray, where: str = "transform_matrix") -> np.ndarray:
    """Camera-to-world in OpenGL axes -> world-to-camera in OpenCV axes."""
    c2w = c2w_gl @ GL_TO_CV
    if abs(np.linalg.det(c2w[:3, :3])) < 1e-9:
        raise UserError(f"{where}: camera rotation is singular; fix the pose")
    return np.linalg.inv(c2w)


def check_downscale(downscale) -> float:
    try:
        d = float(downscale)
    except (TypeError, ValueError):
        d = float("nan")
    if not np.isfinite(d) or d < 1:
        raise UserError(f"--downscale {downscale}: must be a number >= 1; use e.g. 1, 2, 4 or 8")
    return int(d) if d.is_integer() else d


def check_background(background) -> tuple:
    try:
        bg = tuple(float(x) for x in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0.0 <= x <= 1.0 for x in bg):
        raise UserError(f"background must be three numbers in 0..1 (got {background!r}); e.g. (1, 1, 1) for white")
    return bg
