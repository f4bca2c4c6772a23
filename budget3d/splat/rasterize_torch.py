"""Pure-PyTorch rasterizer: the correctness oracle, differentiable by autograd.

Semantics (shared by every backend; the "cpu" kernels must match them):
- pixel (col, row) is sampled at its centre (col + 0.5, row + 0.5);
- sigma = 0.5 (a dx^2 + c dy^2) + b dx dy with the conic (a, b, c); skip when sigma < 0;
- alpha = min(0.99, opacity * exp(-sigma)); skip when alpha < 1/255;
- front to back by camera depth (ties by index); a Gaussian whose compositing would bring the
  transmittance T to <= 1e-4 is not composited and ends the pixel;
- out = sum_i f_i alpha_i T_i + T_final * background;  alpha_image = 1 - T_final.

Vectorised so the work is proportional to the candidate (Gaussian, pixel) pairs inside each
Gaussian's opacity-aware box, never padded to the busiest tile: pairs are generated, filtered
by alpha, sorted by (pixel, depth), and composited with a segmented cumulative sum of
log(1 - alpha) in float64. Rows are processed in bands to bound the candidate memory.
"""

from __future__ import annotations

import torch

from budget3d.splat.project import ALPHA_MIN

ALPHA_MAX = 0.99
T_MIN = 1e-4


def _candidates(means2d, radii, ids, width, row0, row1):
    """All (gaussian, pixel) pairs within each Gaussian's box, restricted to rows [row0, row1)."""
    m = means2d[ids].detach()
    r = radii[ids].to(m.dtype)
    x0 = torch.floor(m[:, 0] - r[:, 0]).clamp(0, width).long()
    x1 = torch.ceil(m[:, 0] + r[:, 0]).clamp(0, width).long()
    y0 = torch.floor(m[:, 1] - r[:, 1]).clamp(row0, row1).long()
    y1 = torch.ceil(m[:, 1] + r[:, 1]).clamp(row0, row1).long()
    w, h = x1 - x0, y1 - y0
    n = (w * h).clamp_min(0)
    keep = n > 0
    ids, x0, y0, w, n = ids[keep], x0[keep], y0[keep], w[keep], n[keep]
    total = int(n.sum())
    if total == 0:
        e = torch.zeros(0, dtype=torch.long, device=means2d.device)
        return e, e, e
    gid = torch.repeat_interleave(ids, n)
    start = torch.cumsum(n, 0) - n
    k = torch.arange(total, device=means2d.device) - torch.repeat_interleave(start, n)
    wr = torch.repeat_interleave(w, n)
    px = torch.repeat_interleave(x0, n) + k % wr
    py = torch.repeat_interleave(y0, n) + k // wr
    return gid, px, py


def _alpha(means2d, conics, opacities, gid, px, py):
    d = torch.stack([px.to(means2d.dtype) + 0.5, py.to(means2d.dtype) + 0.5], -1) - means2d[gid]
    a, b, c = conics[gid].unbind(-1)
    sigma = 0.5 * (a * d[:, 0] ** 2 + c * d[:, 1] ** 2) + b * d[:, 0] * d[:, 1]
    alpha = torch.clamp(opacities[gid] * torch.exp(-sigma), max=ALPHA_MAX)
    return alpha, sigma


def rasterize_torch(means2d, conics, opacities, features, depths, radii, width, height, background=None,
                    max_pairs=4_000_000):
    """Composite ``features`` (N, C) into an (H, W, C) image; also (H, W, 1) alpha and (N,) pixel counts.

    Differentiable w.r.t. means2d, conics, opacities and features. ``radii`` (N, 2) int, 0 = culled.
    """
    N, C = features.shape
    dev, dt = features.device, features.dtype
    vis = (radii > 0).any(-1)
    ids = torch.nonzero(vis).squeeze(1)
    # depth rank: order of compositing (ties broken by index, as a stable sort does)
    rank = torch.empty(N, dtype=torch.long, device=dev)
    rank[torch.sort(depths.detach(), stable=True).indices] = torch.arange(N, device=dev)

    out = torch.zeros(height * width, C, device=dev, dtype=dt)
    acc = torch.zeros(height * width, device=dev, dtype=dt)
    n_pixels = torch.zeros(N, dtype=torch.long, device=dev)

    # Row bands sized so the candidate pairs per band stay near max_pairs.
    with torch.no_grad():
        r = radii[ids].to(torch.float64)
        rows_per_g = (2 * r[:, 1] + 1).clamp_max(height)
        area = ((2 * r[:, 0] + 1).clamp_max(width) * rows_per_g).sum().item()
        density = area / max(height, 1)  # pairs per row, on average
    band = max(1, min(height, int(max_pairs / max(density, 1.0))))

    for row0 in range(0, height, band):
        row1 = min(height, row0 + band)
        with torch.no_grad():
            gid, px, py = _candidates(means2d, radii, ids, width, row0, row1)
            if gid.numel() == 0:
                continue
            alpha, sigma = _alpha(means2d, conics, opacities, gid, px, py)
            keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
            gid, px, py = gid[keep], px[keep], py[keep]
            pix = py * width + px
            order = torch.argsort(pix * N + rank[gid])
            gid, pix, px, py = gid[order], pix[order], px[order], py[order]
        if gid.numel() == 0:
            continue
        alpha, _ = _alpha(means2d, conics, opacities, gid, px, py)
        log1m = torch.log1p(-alpha.double())
        incl = torch.cumsum(log1m, 0)
        with torch.no_grad():
            first = torch.ones_like(pix, dtype=torch.bool)
            first[1:] = pix[1:] != pix[:-1]
            seg = torch.cumsum(first.long(), 0) - 1
        base = (incl - log1m)[first]  # cumulative sum before each pixel's first pair
        incl = incl - base[seg]
        excl = incl - log1m
        with torch.no_grad():
            ok = incl > torch.log(torch.tensor(T_MIN, dtype=torch.float64))
            # once a pixel stops, everything behind it is skipped: T is monotone so ok is a prefix
        w = (alpha * torch.exp(excl).to(dt))[ok]
        g, p = gid[ok], pix[ok]
        out = out.index_add(0, p, w[:, None] * features[g])
        acc = acc.index_add(0, p, w)
        n_pixels += torch.bincount(g, minlength=N)

    alpha_img = acc.reshape(height, width, 1)
    img = out.reshape(height, width, C)
    if background is not None:
        img = img + (1.0 - alpha_img) * background.to(dt)
    return img, alpha_img, n_pixels
