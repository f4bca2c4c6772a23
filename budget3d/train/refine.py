"""Per-training-view corrections learned with the Gaussians: appearance and camera pose.

**Appearance** (``Appearance``): phones change exposure and white balance from shot to shot, and
the Gaussians would otherwise bake those differences into floaters and view-dependent colour.
Each training image k gets an affine colour per channel, ``out = render * exp(g_k) + b_k``
(6 numbers). Three details decide whether it helps (measured on the tiny scene of
``tests/test_refine.py`` and on ethiopian_head, docs/capture.md, "Per-image appearance"):

- *Saturation*: a camera clips, so where the photo is at 0 or 255 a corrected render beyond it
  is no error (``saturated``). Without this, a brightened image's white background pulls its gain
  back to 1 and the Gaussians take the exposure instead.
- *Gauge*: only ratios between images are observable (brighter Gaussians and darker gains render
  the same). After every step ``recentre`` moves the mean transform into the Gaussians' colours
  and out of every image's transform, a change of gauge (the training predictions stay as they
  were): the Gaussians hold the average exposure of the capture, which is what the viewer, the
  exports and the test views (rendered without any correction) show. On a render with a known
  flat background (the tiny test scene) the background pins the mean offset instead. Three
  earlier versions failed: re-centring the transforms alone (not a change of gauge: every
  image's prediction moves, and the Gaussians chased it: 4 dB lost on the tiny scene); a soft
  pull of the mean transform to the identity (too weak: on ethiopian_head the mean drifted to
  gain 0.94 / offset -0.035, the Gaussians brightened to match, and the uncorrected test views
  lost 2.3 dB); pinning the offset on the white background for photos too (ethiopian_head's
  offsets drifted to -0.1: uncorrected test views 17.7 dB).
- *Start*: the transforms stay at the identity for the first ``appearance_start`` steps, so the
  Gaussians first fit the average appearance and the transforms then learn only the differences.

Test views cannot be corrected (nothing of them may be fitted), so runs also report
``psnr_matched`` (``matched_psnr``): each test render's colour matched to its photo by a
per-channel gain and offset fitted on the left half of the image, PSNR scored on the right half
(NeRF-W's protocol; gsplat reports a colour-corrected PSNR for the same reason): the fair number
when the test photos have their own exposure.

**Pose** (``PoseRefine``): structure from motion leaves cameras off by a fraction of a degree,
and a splat fitted to slightly wrong cameras blurs. Each training camera k gets an SE(3)
correction in its own axes, ``w2c_k = [R(w_k) | t_k * scale] @ w2c_k(given)`` (gsplat's pose_opt
idea, with a rotation vector instead of its 6D rotation), and the renderer differentiates the
pose on every backend (``render(..., viewmat=...)``). The first ``pose_start`` steps leave the
cameras alone: before the Gaussians resemble the scene their pull on a camera is noise. It is
off unless asked for (``--pose-opt true``): with 1 degree / 1% noise on lego's training cameras it
recovers two thirds of the PSNR the noise cost (``pose_lr`` 3e-3), but on a scene that
``budget3d process`` made (ethiopian_head) the cameras are already better than it can tell, and
it cost 0.5 dB (docs/capture.md, "Camera pose refinement").

Both use Adam that updates only the row of the view rendered in the step (``VisibleAdam``):
plain Adam would keep moving every other image's correction by stale momentum.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from budget3d.runtime import psnr_from_mse
from budget3d.train.optim import VisibleAdam


class _Rows:
    """An (n, d) parameter, one row per training view, with its row-wise Adam."""

    def __init__(self, n: int, d: int, lr: float, device):
        self.param = torch.nn.Parameter(torch.zeros(n, d, device=device))
        self.opt = VisibleAdam([self.param], lr=lr, eps=1e-15)

    def step(self, k) -> None:
        """Adam on the rows of image(s) ``k`` (an index or a list of them)."""
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

    def __init__(self, n: int, lr: float, device="cpu", flat_background: Optional[torch.Tensor] = None):
        super().__init__(n, 6, lr, device)
        self.flat_background = flat_background  # see recentre

    def apply(self, k: int, img: torch.Tensor) -> torch.Tensor:
        g = self.param[k]
        return img * torch.exp(g[:3]) + g[3:]

    @torch.no_grad()
    def recentre(self, params: dict, background: Optional[torch.Tensor] = None) -> None:
        """Move the mean transform into the Gaussians' colours and out of every image's transform:
        colours ``c <- a c + p``, gains ``exp(g_k) <- exp(g_k) / a``, offsets
        ``b_k <- b_k - exp(g_k) p / a``, with ``a`` the mean gain (per channel) and

        - photos (``background`` None): ``p`` the mean offset. The renderer's flat background is
          no part of a photo (where it shows, it is an error anyway), so mean gain 1 and mean
          offset 0: the Gaussians take the average exposure;
        - renders on a known flat background (Blender-style): ``p = (1 - a) background``, which
          keeps the background as every image sees it: the mean offset is pinned by it.

        Every training prediction stays as it was (for photos, but where the background shows).
        The SH colour is ``C0 sh0 + 0.5 + sum(basis * shN)``: sh0 and shN change as the colour does
        (exact but for the clamp of colours at 0)."""
        from budget3d.splat.project import C0

        gains = torch.exp(self.param[:, :3])
        a = gains.mean(0)
        p = self.param[:, 3:].mean(0) if background is None else (1 - a) * background.to(a)
        self.param[:, 3:] -= gains * (p / a)
        self.param[:, :3] -= torch.log(a)
        sh0 = params["sh0"]
        sh0.copy_((a * (C0 * sh0 + 0.5) + p - 0.5) / C0)
        params["shN"].mul_(a)

    def summary(self) -> dict:
        g = self.param.detach().cpu()
        gains = torch.exp(g[:, :3])
        return {"gain_min": round(float(gains.min()), 4), "gain_max": round(float(gains.max()), 4),
                "offset_abs_max": round(float(g[:, 3:].abs().max()), 4),
                "mean_gain": [round(float(x), 4) for x in gains.mean(0)],
                "mean_offset": [round(float(x), 4) for x in g[:, 3:].mean(0)]}


def flat_border(views, n_views: int = 4, tol: float = 8.0) -> bool:
    """True when most border pixels of a few images are one flat colour (a render on a plain
    background, whatever its exposure), False for photos: which gauge ``Appearance.recentre`` keeps."""
    views = list(views)
    views = views[:: max(1, len(views) // n_views)][:n_views]
    flat = []
    for v in views:
        img = np.asarray(v.image(), np.float32)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        flat.append((np.abs(border - np.median(border, 0)).max(-1) <= tol).mean())
    return bool(flat) and float(np.mean(flat)) > 0.5


def saturated(img: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``img`` with no error where the photo is clipped (0 or 255) and the render lies beyond it:
    the camera would have clipped it too."""
    hi = (gt >= 254.5 / 255) & (img > gt)
    lo = (gt <= 0.5 / 255) & (img < gt)
    return torch.where(hi | lo, gt, img)


def matched_psnr(img: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR on the right half of ``img`` after a per-channel gain and offset fitted (least squares)
    on its left half: the test view's exposure matched without fitting the pixels that are scored."""
    img, gt = img.double(), gt.double()
    w = img.shape[1] // 2
    fit, score = slice(0, w), slice(w, None)
    out = []
    for c in range(3):
        x, y = img[:, fit, c].reshape(-1), gt[:, fit, c].reshape(-1)
        a = torch.stack([x, torch.ones_like(x)], 1)
        sol = torch.linalg.lstsq(a, y[:, None]).solution[:, 0] if x.numel() > 1 and float(x.std()) > 1e-6 \
            else torch.tensor([1.0, float((y - x).mean()) if x.numel() else 0.0], dtype=x.dtype)
        out.append(img[:, score, c] * sol[0] + sol[1])
    pred = torch.stack(out, -1).clamp(0, 1)
    mse = float(((pred - gt[:, score]) ** 2).mean())
    return psnr_from_mse(mse, floor=1e-10)


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
