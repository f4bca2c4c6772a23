"""EWA projection of 3D Gaussians and spherical-harmonics colour, in plain torch.

Shared by the "torch" and "cpu" backends (the "cuda" backend lets gsplat project), and
written to match gsplat 1.5's pinhole projection: the 1.3x-fov clamp of the Jacobian, a
0.3 px low-pass added to the 2D covariance, and an opacity-aware bounding box that encloses
exactly the ellipse where alpha >= 1/255 (so culling by the box never changes a pixel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALPHA_MIN = 1.0 / 255.0
EPS2D = 0.3


def quat_scale_to_covar(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N,4) wxyz quaternions (any norm) and (N,3) linear scales -> (N,3,3) covariances."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    M = R * scales[:, None, :]
    return M @ M.transpose(1, 2)


@dataclass
class Projected:
    means2d: torch.Tensor  # (N, 2) pixel coordinates, differentiable
    conics: torch.Tensor  # (N, 3) inverse 2D covariance (a, b, c)
    depths: torch.Tensor  # (N,) camera-space z, differentiable
    radii: torch.Tensor  # (N, 2) int32 half-extent of the box in pixels; 0 = culled


def project(means, quats, scales, opacities, viewmat, K, width, height, near=0.01, far=1e10) -> Projected:
    """Project Gaussians into one pinhole camera. ``scales`` linear, ``opacities`` in [0,1]."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    pc = means @ R.T + t
    x, y, z = pc.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    in_depth = (z > near) & (z < far)
    zs = torch.where(in_depth, z, torch.ones_like(z))  # keep culled rows finite

    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * torch.clamp(x / zs, -(cx / fx + 0.3 * tan_fovx), (width - cx) / fx + 0.3 * tan_fovx)
    ty = zs * torch.clamp(y / zs, -(cy / fy + 0.3 * tan_fovy), (height - cy) / fy + 0.3 * tan_fovy)
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs**2, zero, fy / zs, -fy * ty / zs**2], -1).reshape(-1, 2, 3)
    cov_c = R @ quat_scale_to_covar(quats, scales) @ R.T
    cov2d = J @ cov_c @ J.transpose(1, 2)
    a = cov2d[:, 0, 0] + EPS2D
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + EPS2D
    det = a * c - b * b
    ok = in_depth & (det > 0) & (opacities >= ALPHA_MIN)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conics = torch.stack([c / det_s, -b / det_s, a / det_s], -1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)

    with torch.no_grad():
        extend = torch.sqrt(2.0 * torch.log(opacities.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp(max=3.33)
        rx = torch.ceil(extend * torch.sqrt(a.clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp_min(0)))
        mx, my = means2d[:, 0], means2d[:, 1]
        ok = ok & ((rx > 0) | (ry > 0))
        ok = ok & (mx + rx > 0) & (mx - rx < width) & (my + ry > 0) & (my - ry < height)
        ok = ok & torch.isfinite(means2d).all(-1) & torch.isfinite(conics).all(-1)
        radii = torch.stack([rx, ry], -1).where(ok[:, None], torch.zeros_like(means2d)).to(torch.int32)
    return Projected(means2d, conics, torch.where(in_depth, z, zero), radii)


# Real spherical-harmonics constants (as in 3DGS / gsplat).
C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_to_rgb(sh0: torch.Tensor, shN: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Evaluate SH up to ``degree`` along unit ``dirs`` (N,3); returns (N,3) colours >= 0.

    ``sh0`` is (N,1,3), ``shN`` is (N,K,3) with K >= num_sh_bases(degree) - 1.
    """
    out = C0 * sh0[:, 0]
    if degree > 0:
        x, y, z = (d[:, None] for d in dirs.unbind(-1))
        s = shN
        out = out - C1 * y * s[:, 0] + C1 * z * s[:, 1] - C1 * x * s[:, 2]
        if degree > 1:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            out = (
                out
                + C2[0] * xy * s[:, 3]
                + C2[1] * yz * s[:, 4]
                + C2[2] * (2 * zz - xx - yy) * s[:, 5]
                + C2[3] * xz * s[:, 6]
                + C2[4] * (xx - yy) * s[:, 7]
            )
            if degree > 2:
                out = (
                    out
                    + C3[0] * y * (3 * xx - yy) * s[:, 8]
                    + C3[1] * xy * z * s[:, 9]
                    + C3[2] * y * (4 * zz - xx - yy) * s[:, 10]
                    + C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * s[:, 11]
                    + C3[4] * x * (4 * zz - xx - yy) * s[:, 12]
                    + C3[5] * z * (xx - yy) * s[:, 13]
                    + C3[6] * x * (xx - 3 * yy) * s[:, 14]
                )
    return torch.clamp_min(out + 0.5, 0.0)


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / C0


def sh_degree_for(num_rest: int) -> int:
    """SH degree whose rest-coefficient count is ``num_rest`` (0, 3, 8, 15)."""
    d = int(round(math.sqrt(num_rest + 1))) - 1
    if num_sh_bases(d) - 1 != num_rest:
        raise ValueError(f"{num_rest} is not a valid count of higher-order SH coefficients")
    return d
