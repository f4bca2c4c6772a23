"""The student's teacher: the run's Gaussians rendered at the student's output size, as training goes.

MobileR2L stored ~77 GB of pseudo images; a 3DGS teacher renders a view in milliseconds, so its
renders are made when a pose is first drawn. A step trains on crop windows of its views, so the
teacher renders what is reused whole and the rest as windows:
- when the whole pose pool fits in the cache, every pose is rendered once, whole, and kept
  (uint8, never on disk; depth and alpha beside it as float16 / uint8 when the student asks);
- otherwise the first ``limit`` poses of the pool are kept whole (the training poses first: a
  quarter of every batch comes from those few dozen), and every window of the others is rendered
  by itself: a crop is a camera with a shifted principal point and a small image, so a step costs
  about the same on a 504x376 view as on a 128x128 one instead of re-rendering whole views for
  64x64 windows (a least-recently-used cache smaller than the pool mostly missed).
Training photos (for a real-image fine-tune) and the test views' renders are cached here too, so
every target a distillation reads comes from one place.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from budget3d.nelf.poses import PoseSampler, at_resolution
from budget3d.scene.camera import Camera


class Teacher:
    """Renders of the pose pool at ``width`` x ``height``: ``image(pose)`` (H, W, 3) in [0, 1],
    ``geometry(pose)``: (depth (H, W) distance along the ray, 0 where the teacher is transparent;
    alpha (H, W)), and ``window(...)`` for a crop of either; at most ``limit`` whole poses kept
    (least recently used go first)."""

    def __init__(self, gaussians: dict, sh_degree: Optional[int], backend: str, background, poses: PoseSampler,
                 scene, width: int, height: int, limit: int, device: torch.device):
        self.gaussians, self.sh_degree, self.backend = gaussians, sh_degree, backend
        self.background = torch.as_tensor(background, dtype=torch.float32, device=device)
        self.poses, self.scene, self.width, self.height, self.limit = poses, scene, width, height, limit
        self.device = device
        self.cache: OrderedDict = OrderedDict()  # pose -> (uint8 image, float16 depth | None, uint8 alpha | None)
        self.photos: dict = {}  # training view -> uint8 photo at the output size
        self.tests: dict = {}  # test view -> float render
        self.hits = self.misses = self.windows = 0
        self.keep_all = limit >= len(poses)  # else poses 0 .. limit-1 are kept whole, the others windowed

    @torch.no_grad()
    def render(self, camera: Camera, size: Optional[tuple] = None):
        """The teacher's render (``RenderOutput``: image, depth, alpha) of ``camera`` at ``size``
        (default: the output size)."""
        from budget3d.splat import render

        cam = at_resolution(camera, *(size or (self.width, self.height)))
        return render(self.gaussians, cam, backend=self.backend, sh_degree=self.sh_degree,
                      background=self.background)

    def _entry(self, pose: int, geometry: bool):
        e = self.cache.get(pose)
        if e is not None and (e[1] is not None or not geometry):
            self.hits += 1
            self.cache.move_to_end(pose)
            return e
        self.misses += 1
        e = self._targets(at_resolution(self.poses.camera(pose), self.width, self.height), geometry)
        self.cache[pose] = e
        while len(self.cache) > self.limit:
            self.cache.popitem(last=False)
        return e

    def _targets(self, camera: Camera, geometry: bool):
        """(uint8 image, float16 depth | None, uint8 alpha | None) of one render of ``camera``."""
        out = self.render(camera, (camera.width, camera.height))
        img = (out.image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        depth = alpha = None
        if geometry:  # distance along the (unit) ray: camera z over the ray's forward component
            from budget3d.nelf.rays import camera_rays

            _, dirs = camera_rays(camera, 1, device=self.device)
            fwd = torch.as_tensor(np.asarray(camera.world_to_camera, np.float64)[2, :3], dtype=torch.float32,
                                  device=self.device)
            depth = (out.depth[..., 0] / (dirs @ fwd).clamp_min(1e-6)).half()  # render's depth: alpha-normalised
            alpha = (out.alpha[..., 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        return img, depth, alpha

    def window(self, pose: int, x0: int, y0: int, w: int, h: int, geometry: bool = False) -> torch.Tensor:
        """The targets (h, w, 3, or 5 with depth and alpha) of the window at (x0, y0) of pool pose
        ``pose`` at the output size: sliced from the whole view when it is kept, else rendered alone."""
        if self.keep_all or pose < self.limit or pose in self.cache or (w, h) == (self.width, self.height):
            img, depth, alpha = self._entry(pose, geometry)
            img, depth, alpha = (None if t is None else t[y0:y0 + h, x0:x0 + w] for t in (img, depth, alpha))
        else:
            self.windows += 1
            cam = at_resolution(self.poses.camera(pose), self.width, self.height)
            crop = Camera(cam.fx, cam.fy, cam.cx - x0, cam.cy - y0, w, h, cam.world_to_camera)
            img, depth, alpha = self._targets(crop, geometry)
        out = img.float() / 255.0
        if geometry:
            out = torch.cat([out, depth.float()[..., None], alpha.float()[..., None] / 255.0], -1)
        return out

    def image(self, pose: int) -> torch.Tensor:
        return self._entry(pose, False)[0].float() / 255.0

    def geometry(self, pose: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(depth (H, W), alpha (H, W)) of pool pose ``pose``."""
        _, depth, alpha = self._entry(pose, True)
        return depth.float(), alpha.float() / 255.0

    def photo(self, pose: int) -> torch.Tensor:
        """Training view ``pose``'s photo at the output size (for a fine-tune on the real images)."""
        if pose not in self.photos:
            self.photos[pose] = (photo(self.scene.train[pose], self.width, self.height, self.device) * 255
                                 + 0.5).to(torch.uint8)
        return self.photos[pose].float() / 255.0

    def test(self, i: int, view) -> torch.Tensor:
        """The teacher's render of test view ``i`` (kept for every later evaluation)."""
        if i not in self.tests:
            self.tests[i] = self.render(view.camera).image.clamp(0, 1)
        return self.tests[i]


def photo(view, width: int, height: int, device) -> torch.Tensor:
    """The view's ground truth (H, W, 3) in [0, 1] at ``width`` x ``height`` (area-averaged when it differs)."""
    import cv2

    img = view.image()
    if img.shape[:2] != (height, width):
        img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)
    return torch.as_tensor(img, device=device).float() / 255.0


__all__ = ["Teacher", "photo"]
