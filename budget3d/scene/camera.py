"""The one camera type and the scene container every stage reads.

Conventions, written down once:
- ``world_to_camera`` is a 4x4 float64 matrix in the OpenCV convention: camera x right,
  y down, z forward (points in front of the camera have z > 0).
- Intrinsics are in pixels for an image of ``width`` x ``height``; pixel (col, row) has its
  centre at (col + 0.5, row + 0.5), so a centred camera has cx = width / 2.
- Images are uint8 (H, W, 3) RGB; RGBA sources are composited on the scene background when
  loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch


def look_at_w2c(eye, target, up) -> np.ndarray:
    """OpenCV world-to-camera (x right, y down, z forward) of a camera at ``eye`` looking at
    ``target`` with ``up`` up (any right vector when looking straight along ``up``)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(z, np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0]))
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, z])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


@dataclass
class Camera:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    world_to_camera: np.ndarray  # (4, 4) float64, OpenCV convention
    # the matrices as tensors on an accelerator, made once per camera (a host-to-device copy per
    # render otherwise); not an init field, so dataclasses.replace starts a new camera's cache empty
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def K(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        return self._cached("K", device, dtype, lambda: torch.tensor(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], device=device, dtype=dtype))

    def viewmat(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        return self._cached("viewmat", device, dtype,
                            lambda: torch.as_tensor(np.asarray(self.world_to_camera), dtype=dtype, device=device))

    def _cached(self, what, device, dtype, make) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cpu":  # cheap here, and a caller may write into it
            return make()
        key = (what, str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = make()
        return self._on_device[key]

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        w2c = np.asarray(self.world_to_camera, dtype=np.float64)
        return -w2c[:3, :3].T @ w2c[:3, 3]

    def scaled(self, factor: float) -> "Camera":
        """The same camera for an image downscaled by ``factor`` (2 = half size)."""
        w, h = int(round(self.width / factor)), int(round(self.height / factor))
        sx, sy = w / self.width, h / self.height
        return Camera(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, w, h, self.world_to_camera.copy())


@dataclass
class View:
    """One posed image. ``load`` returns the uint8 (H, W, 3) image; ``image()`` caches it.
    ``load_mask`` (optional) returns a bool (H, W) mask: True where the pixel counts, False where
    training ignores it (a person walking through, the photographer's shadow)."""

    name: str
    camera: Camera
    load: Callable[[], np.ndarray]
    cache: bool = True
    _image: Optional[np.ndarray] = field(default=None, repr=False)
    load_mask: Optional[Callable[[], np.ndarray]] = field(default=None, repr=False)
    _mask: Optional[np.ndarray] = field(default=None, repr=False)

    def image(self) -> np.ndarray:
        if self._image is not None:
            return self._image
        img = self.load()
        if self.cache:
            self._image = img
        return img

    def mask(self) -> Optional[np.ndarray]:
        """The bool (H, W) mask (True = keep), or None when the view has none."""
        if self._mask is not None or self.load_mask is None:
            return self._mask
        m = self.load_mask()
        if self.cache:
            self._mask = m
        return m


@dataclass
class Scene:
    format: str  # "blender" | "nerfstudio" | "colmap" | "llff"
    path: str
    train: list[View]
    test: list[View]
    points: Optional[np.ndarray] = None  # (M, 3) float32 world coordinates
    colors: Optional[np.ndarray] = None  # (M, 3) uint8
    background: tuple = (1.0, 1.0, 1.0)
    n_skipped: int = 0
    near_far: Optional[tuple] = None  # (near, far) where the format gives bounds (LLFF)
    meta: dict = field(default_factory=dict)  # format extras, e.g. nerfstudio's aabb_scale

    def camera_extent(self) -> float:
        """Radius of the camera centres around their mean, x1.1 (3DGS's scene extent)."""
        centers = np.stack([v.camera.center for v in self.train + self.test])
        return float(np.linalg.norm(centers - centers.mean(0), axis=1).max() * 1.1) or 1.0

    def look_at(self) -> tuple[np.ndarray, float]:
        """(centre, half-size) of the region the training cameras look at, for a random init when
        the scene has no point cloud. The centre is the point nearest (least squares) to every
        camera's optical axis; the half-size a third of the cameras' mean distance to it (3DGS
        fills a 2.6-unit cube for Blender scenes seen from 4 units). The mean of the camera centres
        is not it: cameras on a hemisphere (Blender, most 360-degree captures) have their mean
        above the object. For near-parallel axes (forward-facing captures), the mean centre moved
        along the mean axis by the middle of ``near_far`` when given, else by the camera extent."""
        cams = [v.camera for v in self.train] or [v.camera for v in self.test]
        C = np.stack([c.center for c in cams])
        D = np.stack([np.asarray(c.world_to_camera, dtype=np.float64)[2, :3] for c in cams])  # +z in world
        D /= np.linalg.norm(D, axis=1, keepdims=True)
        P = np.eye(3)[None] - D[:, :, None] * D[:, None, :]  # projectors orthogonal to each axis
        A, b = P.sum(0), (P @ C[:, :, None]).sum(0)[:, 0]
        if np.linalg.eigvalsh(A)[0] > 0.05 * len(cams):
            p = np.linalg.solve(A, b)
            if (((p - C) * D).sum(1) > 0).mean() > 0.5:  # in front of most cameras
                return p, float(np.linalg.norm(p - C, axis=1).mean() / 3.0)
        depth = float(np.mean(self.near_far)) if self.near_far is not None else self.camera_extent()
        axis = D.mean(0) / max(np.linalg.norm(D.mean(0)), 1e-12)
        return C.mean(0) + axis * depth, max(depth / 3.0, self.camera_extent() / 3.0)
