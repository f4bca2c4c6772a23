"""The "cuda" backend: gsplat's CUDA kernels behind our render API.

Colours (and depth, and extra channels) are passed as plain features, so SH evaluation is
ours on every backend. Differences from the torch oracle that gsplat's kernels impose: alpha is
clamped at 0.999 (not 0.99), and a pixel outside every tile that a Gaussian's box touches is
skipped (ours is exact per pixel). ``n_pixels`` is estimated from the 1/255 ellipse's area,
since gsplat does not count contributing pixels.
"""

from __future__ import annotations

import math

import torch

from budget3d.splat.output import finish
from budget3d.splat.project import ALPHA_MIN


def render_cuda(means, quats, scales, opacities, rgb, extra, viewmat, K, W, H, background, near, far):
    from gsplat import rasterization

    z = (means @ viewmat[:3, :3].T + viewmat[:3, 3])[:, 2:3]
    feats = torch.cat([rgb, z] + ([extra] if extra is not None else []), -1)
    bg = None
    if background is not None:
        bg = torch.cat([background, torch.zeros(feats.shape[1] - 3, device=means.device, dtype=means.dtype)])[None]
    img, alpha, meta = rasterization(
        means, quats, scales, opacities, feats, viewmat[None], K[None], W, H,
        near_plane=near, far_plane=far, packed=False, backgrounds=bg,
    )
    means2d = meta["means2d"]
    if means2d.requires_grad:
        means2d.retain_grad()
    radii = meta["radii"][0]
    if radii.dim() == 1:  # older gsplat: one radius
        radii = radii[:, None].expand(-1, 2)
    with torch.no_grad():
        conics = meta["conics"][0]
        det = (conics[:, 0] * conics[:, 2] - conics[:, 1] ** 2).clamp_min(1e-12)
        k2 = (2 * torch.log(opacities.clamp_min(ALPHA_MIN) / ALPHA_MIN)).clamp(max=3.33**2)
        n_pixels = torch.where((radii > 0).any(-1), math.pi * k2 / det.sqrt(), 0).round().long()
    return finish(img[0], alpha[0], means2d, radii.int(), n_pixels, z[:, 0], extra is not None)
