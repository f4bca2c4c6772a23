"""Per-training-view corrections learned with the Gaussians: appearance and camera pose.

**Appearance** (``Appearance``): phones change exposure and white balance from shot to shot, and
the Gaussians would otherwise bake those differences into floaters and view-dependent colour.
Each training image k gets an affine colour per channel, ``out = render * exp(g_k) + b_k``
(6 numbers). Only the ratio between images is observable (brighter Gaussians and darker gains
look the same), so after every step the gains and offsets are re-centred to mean zero over the
images: the Gaussians keep the average appearance, which is what test views are rendered with
(test views never get a correction: they are held out, so there is nothing to fit them with).

**Pose** (``PoseRefine``): structure from motion leaves cameras off by a fraction of a degree,
and a splat fitted to slightly wrong cameras blurs. Each training camera k gets an SE(3)
correction in its own axes, ``w2c_k = [R(w_k) | t_k * scale] @ w2c_k(given)`` (gsplat's pose_opt
idea, with a rotation vector instead of its 6D rotation), and the renderer differentiates the
pose on every backend (``render(..., viewmat=...)``). The first ``pose_start`` steps leave the
cameras alone: before the Gaussians resemble the scene their pull on a camera is noise.

Both use Adam that updates only the row of the view rendered in the step (``VisibleAdam``):
plain Adam would keep moving every other image's correction by stale momentum.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from budget3d.train.optim import VisibleAdam


class _Rows:
    """An (n, d) parameter, one row per training view, with its row-wise Adam."""

    def __init__(self, n: int, d: int, lr: float, device):
        self.param = torch.nn.Parameter(torch.zeros(n, d, device=device))
        self.opt = VisibleAdam([self.param], lr=lr, eps=1e-15)

    def step(self, k: int) -> None:
        if self.param.grad is None:
            return
        rows = torch.zeros(self.param.shape[0], dtype=torch.bool, device=self.param.device)
        rows[k] = True
        self.opt.step(rows)
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"param": self.param.detach().cpu().clone(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.param.copy_(state["param"].to(self.param.device))
        self.opt.load_state_dict(state["opt"])


class Appearance(_Rows):
    """Affine colour per channel per training image: ``img * exp(gain) + offset``."""

    def __init__(self, n: int, lr: float, device="cpu"):
        super().__init__(n, 6, lr, device)

    def apply(self, k: int, img: torch.Tensor) -> torch.Tensor:
        g = self.param[k]
        return img * torch.exp(g[:3]) + g[3:]

    def step(self, k: int) -> None:
        super().step(k)
        with torch.no_grad():  # only ratios between images are observable: keep the mean at zero
            self.param.sub_(self.param.mean(0, keepdim=True))

    def summary(self) -> dict:
        g = self.param.detach().cpu()
        gains = torch.exp(g[:, :3])
        return {"gain_min": round(float(gains.min()), 4), "gain_max": round(float(gains.max()), 4),
                "offset_abs_max": round(float(g[:, 3:].abs().max()), 4)}


def _hat(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros((), dtype=w.dtype, device=w.device)
    return torch.stack([torch.stack([z, -w[2], w[1]]), torch.stack([w[2], z, -w[0]]),
                        torch.stack([-w[1], w[0], z])])


def rotation(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: the rotation by angle |w| about w (series near zero, so the gradient at 0 is finite)."""
    th2 = (w * w).sum()
    small = th2 < 1e-6
    th = torch.sqrt(torch.where(small, torch.ones_like(th2), th2))
    a = torch.where(small, 1 - th2 / 6 + th2 * th2 / 120, torch.sin(th) / th)
    b = torch.where(small, 0.5 - th2 / 24 + th2 * th2 / 720, (1 - torch.cos(th)) / (th * th))
    K = _hat(w)
    return torch.eye(3, dtype=w.dtype, device=w.device) + a * K + b * (K @ K)


class PoseRefine(_Rows):
    """SE(3) correction per training camera, in the camera's axes: rotation vector (rad) and
    translation in units of ``scale`` (the scene scale, so the learning rate is scale-free)."""

    def __init__(self, n: int, lr: float, scale: float, device="cpu"):
        super().__init__(n, 6, lr, device)
        self.scale = float(scale)

    def delta(self, k: int) -> torch.Tensor:
        x = self.param[k]
        top = torch.cat([rotation(x[:3]), (x[3:] * self.scale)[:, None]], 1)
        return torch.cat([top, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)], 0)

    def viewmat(self, k: int, camera) -> torch.Tensor:
        """The corrected world-to-camera of training camera ``k`` (differentiable)."""
        return self.delta(k) @ camera.viewmat(self.param.device)

    def world_to_camera(self, k: int, camera) -> np.ndarray:
        with torch.no_grad():
            d = self.delta(k).double().cpu().numpy()
        return d @ np.asarray(camera.world_to_camera, np.float64)

    def summary(self) -> dict:
        x = self.param.detach().cpu().double()
        deg = torch.rad2deg(x[:, :3].norm(dim=1))
        move = x[:, 3:].norm(dim=1)  # in units of the scene scale
        return {"rotation_deg_median": round(float(deg.median()), 4), "rotation_deg_max": round(float(deg.max()), 4),
                "translation_median": round(float(move.median()), 5), "translation_max": round(float(move.max()), 5),
                "translation_unit": "scene scale"}


def lr_at(step: int, start: int, iters: int, lr: float, final_frac: float = 0.01) -> float:
    """0 before ``start``, then ``lr`` decaying exponentially to ``lr * final_frac`` at the last step."""
    if step < start:
        return 0.0
    t = (step - start) / max(1, iters - 1 - start)
    return lr * math.exp(t * math.log(final_frac))
