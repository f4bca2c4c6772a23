"""The student's teacher: the run's Gaussians rendered at the student's output size, as training goes.

MobileR2L stored ~77 GB of pseudo images; a 3DGS teacher renders a view in milliseconds, so its
renders are made when a pose is first drawn and kept in a bounded LRU cache of uint8 images
(never on disk). The same render gives depth and alpha for free; they are cached beside the image
(float16) when the student asks for them. Training photos (for a real-image fine-tune) and the
test views' renders are cached here too, so every target a distillation reads comes from one place.
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
    ``depth(pose)`` (H, W) camera-ray distance (0 where the teacher is transparent) and
    ``alpha(pose)`` (H, W); at most ``limit`` poses kept (least recently used go first)."""

    def __init__(self, gaussians: dict, sh_degree: Optional[int], backend: str, background, poses: PoseSampler,
                 scene, width: int, height: int, limit: int, device: torch.device):
        self.gaussians, self.sh_degree, self.backend = gaussians, sh_degree, backend
        self.background = torch.as_tensor(background, dtype=torch.float32, device=device)
        self.poses, self.scene, self.width, self.height, self.limit = poses, scene, width, height, limit
        self.device = device
        self.cache: OrderedDict = OrderedDict()  # pose -> (uint8 image, float16 depth | None, uint8 alpha | None)
        self.photos: dict = {}  # training view -> uint8 photo at the output size
        self.tests: dict = {}  # test view -> float render
        self.hits = self.misses = 0

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
        camera = at_resolution(self.poses.camera(pose), self.width, self.height)
        out = self.render(camera)
        img = (out.image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        depth = alpha = None
        if geometry:  # distance along the (unit) ray: camera z over the ray's forward component
            from budget3d.nelf.rays import camera_rays

            _, dirs = camera_rays(camera, 1, device=self.device)
            fwd = torch.as_tensor(np.asarray(camera.world_to_camera, np.float64)[2, :3], dtype=torch.float32,
                                  device=self.device)
            depth = (out.depth[..., 0] / (dirs @ fwd).clamp_min(1e-6)).half()  # render's depth: alpha-normalised
            alpha = (out.alpha[..., 0].clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        e = self.cache[pose] = (img, depth, alpha)
        while len(self.cache) > self.limit:
            self.cache.popitem(last=False)
        return e

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
