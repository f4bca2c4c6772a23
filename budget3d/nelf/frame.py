"""The student's input frame: where a ray's points are, in coordinates that do not depend on the
scene's world units.

Structure from motion has no metric scale, so a processed scene's coordinates are an accident of
COLMAP's gauge, and a positional encoding ``sin(2^i p)`` of raw world coordinates is NeRF's
encoding only when they happen to lie within a few units (a 20x copy of the bundled scene
distilled 3.6 dB worse). Every student therefore sees its points in one of two frames, as NeRF,
R2L and MobileR2L do:

- ``ball`` (360° scenes): ``(x - centre) / radius``, the unit ball holding the teacher's
  Gaussians (``scene_frame``); points uniform in distance between the scene's near and far bounds
  (in radii), or, for the grid student, on the ray's chord through the ball.
- ``ndc`` (forward-facing scenes): normalised device coordinates of a reference camera (the
  training cameras' mean pose and focal length): x, y in [-1, 1] across its image, depth
  ``s = 1 - 2 n / z`` (-1 at the plane z = n, 1 at infinity), so points uniform in ``s`` are
  uniform in disparity. Rays are straight lines in NDC: ``P(s) = A + s V``.

A frame is chosen at distill time, stored in student.pt (``to_json``) and applied inside the
student's forward (plain torch ops), so the exported graph still takes a pose in world units.
Both frames map a scene scaled by any factor to the same coordinates.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

NDC_NEAR = 0.75  # the NDC plane z = n sits at this share of the near bound (NeRF's LLFF setting)
# The r2l student's encoded NDC points are scaled by this: NDC spans [-1, 1] across the image, a
# third of what a 360° scene's ball coordinates span across its object, so the positional
# encoding's top band was too coarse (forward-facing test wall, 240 steps, 32x32, against the
# teacher: 23.8 dB at 1, 25.6 at 2, 23.6 at 4; 8 frequencies instead of 6 at 1: 22.9)
NDC_ENCODING_GAIN = 2.0


class Frame(nn.Module):
    """World -> frame coordinates. ``segment(o, d)`` gives each ray (world origin ``o``, unit
    direction ``d``) as ``P0 + t V`` in frame coordinates with ``t`` in ``[t0, t1]``.

    kind "ball": centre (3,), radius; t is the distance in radii; ``t0, t1`` the scene's bounds in
    radii (``chord=True``: where the ray meets the unit ball).
    kind "ndc": ``w2c`` (4, 4) of the reference camera (OpenCV axes), ``ax, ay`` its focal lengths
    over half its image size, ``n`` the NDC plane's depth; t is the NDC depth s, ``t0, t1`` those
    of the scene's near and far bounds."""

    def __init__(self, kind: str = "ball", centre=(0.0, 0.0, 0.0), radius: float = 1.0, t0: float = 0.0,
                 t1: float = 1.0, w2c=None, ax: float = 1.0, ay: float = 1.0, n: float = 1.0):
        super().__init__()
        if kind not in ("ball", "ndc"):
            raise ValueError(f"unknown student frame {kind!r}: expected 'ball' or 'ndc'")
        self.kind = kind
        self.radius, self.t0, self.t1 = float(radius), float(t0), float(t1)
        self.ax, self.ay, self.n = float(ax), float(ay), float(n)
        # not in the state_dict: student.pt keeps the frame as JSON, so older files load unchanged
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32).reshape(3).clone(),
                             persistent=False)
        w2c = np.eye(4) if w2c is None else np.asarray(w2c, dtype=np.float64)
        self.register_buffer("R", torch.as_tensor(w2c[:3, :3], dtype=torch.float32).clone(), persistent=False)
        self.register_buffer("T", torch.as_tensor(w2c[:3, 3], dtype=torch.float32).clone(), persistent=False)

    # -------------------------------------------------------------------------------- geometry

    def _camera(self, x: torch.Tensor) -> torch.Tensor:
        """World points or directions (..., 3) rotated into the reference camera (no translation)."""
        return x @ self.R.t()

    def segment(self, o: torch.Tensor, d: torch.Tensor, chord: bool = False):
        """(P0, V, t0, t1) for rays ``o``, ``d`` (..., 3): the frame's points ``P0 + t V``, t in
        [t0, t1] (scalars, or (...) tensors for the ball's chord)."""
        if self.kind == "ball":
            p0 = (o - self.centre) / self.radius
            if not chord:
                return p0, d, self.t0, self.t1
            b = (p0 * d).sum(-1)  # the unit ball's chord; rays that miss it get a short one at their closest point
            root = torch.sqrt((b * b - (p0 * p0).sum(-1) + 1.0).clamp_min(1e-4))
            return p0, d, (-b - root).clamp_min(1e-3), (-b + root).clamp_min(2e-3)
        oc = self._camera(o) + self.T
        dc = self._camera(d)
        dz = dc[..., 2:3].clamp_min(1e-4)  # forward-facing: every ray goes away from the reference plane
        q = dc[..., :2] / dz
        m = (oc[..., :2] - oc[..., 2:3] * q) / (2.0 * self.n)
        a = torch.tensor([self.ax, self.ay], dtype=o.dtype, device=o.device)
        p0 = torch.cat([a * (q + m), torch.zeros_like(dz)], -1)
        v = torch.cat([-a * m, torch.ones_like(dz)], -1)
        return p0, v, self.t0, self.t1

    def sample(self, o: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
        """``k`` points (..., k, 3) per ray to encode, uniform in t over [t0, t1], both ends included
        (as R2L); NDC points scaled by ``NDC_ENCODING_GAIN``."""
        p0, v, t0, t1 = self.segment(o, d)
        steps = torch.arange(k, dtype=o.dtype, device=o.device) / max(k - 1, 1)
        t = t0 + (t1 - t0) * steps
        pts = p0[..., None, :] + t[:, None] * v[..., None, :]
        return pts * NDC_ENCODING_GAIN if self.kind == "ndc" else pts

    def points(self, x: torch.Tensor) -> torch.Tensor:
        """World points (P, 3) in frame coordinates."""
        if self.kind == "ball":
            return (x - self.centre) / self.radius
        c = self._camera(x) + self.T
        z = c[:, 2:3].clamp_min(1e-6 * self.n)
        return torch.cat([self.ax * c[:, :1] / z, self.ay * c[:, 1:2] / z, 1.0 - 2.0 * self.n / z], 1)

    def param(self, o: torch.Tensor, d: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """The frame's ``t`` of the points at world distance ``dist`` (...) along rays ``o``, ``d``."""
        if self.kind == "ball":
            return dist / self.radius
        z = (self._camera(o) + self.T)[..., 2] + dist * self._camera(d)[..., 2]
        return 1.0 - 2.0 * self.n / z.clamp_min(1e-6 * self.n)

    # -------------------------------------------------------------------------------- records

    def to_json(self) -> dict:
        if self.kind == "ball":
            return {"kind": "ball", "centre": [float(v) for v in self.centre], "radius": self.radius,
                    "t0": self.t0, "t1": self.t1}
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = self.R.double().cpu().numpy(), self.T.double().cpu().numpy()
        return {"kind": "ndc", "w2c": w2c.tolist(), "ax": self.ax, "ay": self.ay, "n": self.n,
                "t0": self.t0, "t1": self.t1}

    @classmethod
    def from_json(cls, rec, near: Optional[float] = None, far: Optional[float] = None) -> "Frame":
        """A frame from its record. Students from before frames: a grid student's [centre, radius]
        (its chord frame), an r2l student's None (world coordinates between its ``near``, ``far``)."""
        if rec is None:
            return cls("ball", t0=near if near is not None else 0.0, t1=far if far is not None else 1.0)
        if isinstance(rec, (list, tuple)):
            return cls("ball", centre=rec[0], radius=rec[1])
        rec = dict(rec)
        return cls(rec.pop("kind"), **rec)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.to_json().items() if k != "w2c")


# ------------------------------------------------------------------------------------ choosing one


def ball_frame(centre, radius: float, near: float, far: float) -> Frame:
    """The 360° frame: the unit ball (``scene_frame``), points between the scene's bounds in radii."""
    return Frame("ball", centre=centre, radius=radius, t0=near / radius, t1=far / radius)


def ndc_frame(cameras: list, near: float, far: float) -> Frame:
    """The forward-facing frame: NDC of the training cameras' mean pose (mean centre, mean forward
    and down axes made orthonormal), their mean focal length over half the image size, the NDC
    plane at ``NDC_NEAR`` of the near bound; t from that plane (-1) to the far bound."""
    R = np.stack([np.asarray(c.world_to_camera, np.float64)[:3, :3] for c in cameras])
    C = np.stack([c.center for c in cameras])
    fwd = R[:, 2].mean(0)
    fwd /= np.linalg.norm(fwd)
    x = np.cross(R[:, 1].mean(0), fwd)
    x /= np.linalg.norm(x)
    y = np.cross(fwd, x)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, fwd])
    w2c[:3, 3] = -w2c[:3, :3] @ C.mean(0)
    ax = float(np.mean([c.fx / (c.width / 2) for c in cameras]))
    ay = float(np.mean([c.fy / (c.height / 2) for c in cameras]))
    n = NDC_NEAR * near
    return Frame("ndc", w2c=w2c, ax=ax, ay=ay, n=n, t0=-1.0, t1=1.0 - 2.0 * n / far)


def choose_frame(forward_facing: bool, cameras: list, gaussians: dict, near: float, far: float,
                 quantile: float = 0.99) -> Frame:
    """NDC for forward-facing captures, the teacher's unit ball otherwise."""
    if forward_facing:
        return ndc_frame(cameras, near, far)
    centre, radius = scene_frame(gaussians, cameras, quantile)
    return ball_frame(centre, radius, near, far)


def scene_frame(gaussians: dict, cameras: list, quantile: float = 0.99) -> tuple[list, float]:
    """(centre, radius) of the normalised ball: the centre the training cameras look at (least
    squares over their optical axes; the Gaussians' median when ill-posed), the radius holding
    ``quantile`` of the Gaussians' opacity-weighted mass, capped at 0.45 of the nearest camera's distance."""
    means = gaussians["means"].detach().double().cpu().numpy()
    op = torch.sigmoid(gaussians["opacities"].detach().double().reshape(-1)).cpu().numpy()
    C = np.stack([c.center for c in cameras])
    D = np.stack([np.asarray(c.world_to_camera, np.float64)[2, :3] for c in cameras])
    P = np.eye(3)[None] - D[:, :, None] * D[:, None, :]
    try:
        centre = np.linalg.solve(P.sum(0), (P @ C[:, :, None]).sum(0)[:, 0])
    except np.linalg.LinAlgError:
        centre = np.median(means, 0)
    if not np.all(np.isfinite(centre)) or np.linalg.norm(centre - np.median(means, 0)) > 10 * np.std(means):
        centre = np.median(means, 0)
    dist = np.linalg.norm(means - centre, axis=1)
    order = np.argsort(dist)
    cum = np.cumsum(op[order]) / max(op.sum(), 1e-12)
    r = float(dist[order][min(len(order) - 1, int(np.searchsorted(cum, quantile)))])
    cam_min = float(np.linalg.norm(C - centre, axis=1).min())
    # at most 0.45 of the nearest camera's distance: a handheld capture's far background would
    # otherwise take the ball (ethiopian_head: +1.5 dB against the teacher at equal steps for the
    # grid student); the bundled scene and lego keep their 99% radius
    r = min(max(r, 1e-3 * cam_min), 0.45 * cam_min) if cam_min > 0 else max(r, 1e-12)
    return [float(v) for v in centre], r


__all__ = ["Frame", "ball_frame", "choose_frame", "ndc_frame", "scene_frame"]
