"""The teacher poses a student learns from, and the output size it is distilled at."""

from __future__ import annotations

import numpy as np

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, look_at_w2c


class PoseSampler:
    """A fixed pool of ``n_poses`` teacher poses; pose ``i`` is a pure function of (seed, i).

    Poses ``0 .. n_train-1`` are the training cameras. The others copy the intrinsics of a random
    training camera and move it:
    - **360° scenes** (cameras around what they look at): orbit the look-at centre
      (``Scene.look_at``) within the band of the training cameras: distance and elevation (along
      the cameras' mean up vector) uniform between their min and max; azimuth uniform over the
      circle when the cameras surround the centre (no gap between neighbouring azimuths above
      90°), else the chosen camera's azimuth +- half the mean gap; looking at the centre, with a
      small jitter, without roll.
    - **forward-facing scenes** (all cameras looking the same way: mean forward axis longer than
      0.9): the chosen camera's rotation, its position uniform in the box of the training camera
      centres. LLFF-format bounds alone do not make a scene forward-facing: ethiopian_head comes
      as LLFF but its cameras circle the head (mean forward axis 0.48), and box poses with the
      cameras' rotations looked away from it for 3 in 4 teacher views (a grid student: 22.4 dB
      against the teacher after 1,000 steps with orbit poses, 19.2 with box poses).
    """

    def __init__(self, scene, n_poses: int, seed: int, train_frac: float = 0.25):
        self.train_frac = float(train_frac)
        self.cams = [v.camera for v in scene.train]
        self.n_train = len(self.cams)
        self.n_poses = max(int(n_poses), self.n_train)
        self.seed = int(seed)
        C = np.stack([c.center for c in self.cams])
        R = np.stack([np.asarray(c.world_to_camera, dtype=np.float64)[:3, :3] for c in self.cams])
        fwd = R[:, 2]
        self.forward_facing = float(np.linalg.norm(fwd.mean(0))) > 0.9
        self.box = (C.min(0), C.max(0))
        centre, half = scene.look_at()
        self.centre, self.half = np.asarray(centre, dtype=np.float64), float(half)
        up = -R[:, 1].mean(0)  # OpenCV y points down
        self.up = up / max(np.linalg.norm(up), 1e-12)
        v = C - self.centre
        r = np.linalg.norm(v, axis=1)
        self.r_band = (float(r.min()), float(r.max()))
        elev = np.arcsin(np.clip((v @ self.up) / np.maximum(r, 1e-12), -1, 1))
        self.el_band = (float(elev.min()), float(elev.max()))
        a = np.cross(self.up, [1.0, 0.0, 0.0])
        if np.linalg.norm(a) < 1e-3:
            a = np.cross(self.up, [0.0, 1.0, 0.0])
        self.e1 = a / np.linalg.norm(a)
        self.e2 = np.cross(self.up, self.e1)
        self.azim = np.arctan2(v @ self.e2, v @ self.e1)
        s = np.sort(self.azim)
        gaps = np.diff(np.concatenate([s, s[:1] + 2 * np.pi])) if len(s) > 1 else np.array([2 * np.pi])
        self.surround = float(gaps.max()) < np.pi / 2
        self.az_jitter = float(np.pi / max(len(s), 1))  # half the mean gap

    def __len__(self) -> int:
        return self.n_poses

    def camera(self, i: int) -> Camera:
        """Pose ``i`` of the pool, at the training cameras' resolution."""
        if i < self.n_train:
            return self.cams[i]
        g = np.random.default_rng([self.seed, 7, int(i)])
        base = self.cams[int(g.integers(self.n_train))]
        if self.forward_facing:
            pos = g.uniform(self.box[0], self.box[1])
            R = np.asarray(base.world_to_camera, dtype=np.float64)[:3, :3]
            w2c = np.eye(4)
            w2c[:3, :3], w2c[:3, 3] = R, -R @ pos
        else:
            j = int(g.integers(self.n_train))
            az = g.uniform(-np.pi, np.pi) if self.surround else self.azim[j] + g.uniform(-1, 1) * self.az_jitter
            el = g.uniform(*self.el_band)
            r = g.uniform(*self.r_band)
            eye = self.centre + r * (np.cos(el) * (np.cos(az) * self.e1 + np.sin(az) * self.e2) + np.sin(el) * self.up)
            target = self.centre + g.normal(0.0, 0.05 * self.half, 3)
            w2c = look_at_w2c(eye, target, self.up)
        return Camera(base.fx, base.fy, base.cx, base.cy, base.width, base.height, w2c)

    def batch(self, step: int, size: int, real: bool = False) -> list[int]:
        """The pose indices of ``step``: a pure function of (seed, step), so a resume draws the same.
        ``real``: training poses only (their photos are the targets)."""
        g = np.random.default_rng([self.seed, 11, int(step)])
        out = []
        for _ in range(size):
            if real or self.n_poses == self.n_train or g.random() < self.train_frac:
                out.append(int(g.integers(self.n_train)))
            else:
                out.append(int(g.integers(self.n_train, self.n_poses)))
        return out


def at_resolution(camera: Camera, width: int, height: int) -> Camera:
    """``camera`` for a ``width`` x ``height`` image of the same view (``Camera.scaled`` when
    the aspect ratio is kept, else x and y scaled separately)."""
    if (width, height) == (camera.width, camera.height):
        return camera
    c = camera.scaled(camera.width / width)
    if (c.width, c.height) == (width, height):
        return c
    sx, sy = width / camera.width, height / camera.height
    return Camera(camera.fx * sx, camera.fy * sy, camera.cx * sx, camera.cy * sy, width, height,
                  np.asarray(camera.world_to_camera).copy())


def parse_resolution(text, camera: Camera, scale: int) -> tuple[int, int]:
    """(width, height) of the student's output. None: the camera's size rounded down to a multiple
    of ``scale``; "W": that width, the height from the aspect ratio rounded down; "WxH" as given.
    A given width or height must be a positive multiple of ``scale``."""
    if text in (None, "", "auto"):
        w, h = camera.width // scale * scale, camera.height // scale * scale
        if w < scale or h < scale:
            raise UserError(f"the scene's images ({camera.width}x{camera.height}) are smaller than the student's "
                            f"upsampling factor {scale}; use a smaller preset or a larger --resolution")
        return w, h
    t = str(text).strip().lower()
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x"))
        else:
            w = int(t)
            h = int(w * camera.height / camera.width) // scale * scale
    except ValueError:
        raise UserError(f"--resolution {text!r}: expected WIDTHxHEIGHT (e.g. 128x128) or a width (e.g. 128)") from None
    if w <= 0 or h <= 0 or w % scale or h % scale:
        raise UserError(f"--resolution {text!r}: width and height must be positive multiples of {scale} "
                        f"(the upsampling factor of this preset), e.g. {max(scale, w // scale * scale)}x"
                        f"{max(scale, (h if h > 0 else w) // scale * scale)}")
    return w, h


__all__ = ["PoseSampler", "at_resolution", "parse_resolution"]
