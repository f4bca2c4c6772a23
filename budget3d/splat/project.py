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


def _quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(N,4) wxyz quaternions (any norm) -> (N,3,3) rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)


def quat_scale_to_covar(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(N,4) wxyz quaternions (any norm) and (N,3) linear scales -> (N,3,3) covariances."""
    M = _quat_to_rotmat(quats) * scales[:, None, :]
    # elementwise M M^T (batched 3x3 matmuls are slow on CPU)
    return (M[:, :, None, :] * M[:, None, :, :]).sum(-1)


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
    # cov2d = J R_v Rq S S^T Rq^T R_v^T J^T = T T^T with T = (J R_v) Rq S (2x3 per Gaussian), in
    # elementwise broadcasting ops on (N, 3) rows: batched 3x3 matmuls (bmm) are slow on CPU.
    # J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]
    iz = 1.0 / zs
    j00, j02 = fx * iz, -fx * tx * iz * iz
    j11, j12 = fy * iz, -fy * ty * iz * iz
    JR0 = j00[:, None] * R[0] + j02[:, None] * R[2]  # (N, 3) rows of J R_v
    JR1 = j11[:, None] * R[1] + j12[:, None] * R[2]
    M = _quat_to_rotmat(quats) * scales[:, None, :]  # Rq S
    T0 = (JR0[:, :, None] * M).sum(1)  # (N, 3)
    T1 = (JR1[:, :, None] * M).sum(1)
    a = (T0 * T0).sum(-1) + EPS2D
    b = (T0 * T1).sum(-1)
    c = (T1 * T1).sum(-1) + EPS2D
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
        # the basis (N, nb - 1) times shN[:, :nb - 1] in one broadcast product: selecting shN[:, k]
        # per term would cost a zero-filled (N, K, 3) gradient buffer per term in the backward
        x, y, z = dirs.unbind(-1)
        basis = [-C1 * y, C1 * z, -C1 * x]
        if degree > 1:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            basis += [C2[0] * xy, C2[1] * yz, C2[2] * (2 * zz - xx - yy), C2[3] * xz, C2[4] * (xx - yy)]
            if degree > 2:
                basis += [
                    C3[0] * y * (3 * xx - yy),
                    C3[1] * xy * z,
                    C3[2] * y * (4 * zz - xx - yy),
                    C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
                    C3[4] * x * (4 * zz - xx - yy),
                    C3[5] * z * (xx - yy),
                    C3[6] * x * (xx - 3 * yy),
                ]
        nb = len(basis)
        s = shN if shN.shape[1] == nb else shN[:, :nb]
        out = out + (torch.stack(basis, -1)[:, :, None] * s).sum(1)
    return torch.clamp_min(out + 0.5, 0.0)


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - 0.5) / C0


def sh_degree_for(num_rest: int) -> int:
    """SH degree whose rest-coefficient count is ``num_rest`` (0, 3, 8, 15)."""
    d = int(round(math.sqrt(num_rest + 1))) - 1
    if num_sh_bases(d) - 1 != num_rest:
        raise ValueError(f"{num_rest} is not a valid count of higher-order SH coefficients")
    return d
