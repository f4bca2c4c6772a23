"""The "cuda" backend: gsplat's CUDA kernels behind our render API.

Colours (and depth, and extra channels) are passed as plain features, so SH evaluation is
ours on every backend. Differences from the torch oracle that gsplat's kernels impose: alpha is
clamped at 0.999 (not 0.99), and a pixel outside every tile that a Gaussian's box touches is
skipped (ours is exact per pixel).

``n_pixels`` counts the pixels each Gaussian was composited into, as the CPU backends do (alpha
at least 1/255, before the pixel's transmittance runs out), so Taming's pixel term means the same
on every backend. gsplat's forward does not count, so the count is a second pass over the same
tile lists with ``rasterize_to_indices_in_range``, one 256-entry batch per tile at a time, run only
when ``n_pixels`` is read (the score views), not on every training step.
"""

from __future__ import annotations

import torch

from budget3d.splat.output import finish


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
    return finish(img[0], alpha[0], means2d, radii.int(), lambda: count_pixels(meta), z[:, 0], extra is not None)


@torch.no_grad()
def count_pixels(meta: dict) -> torch.Tensor:
    """(N,) int64: for one rendered camera (gsplat's ``meta``), how many pixels each Gaussian was
    composited into. gsplat's index kernel walks each pixel's depth-sorted list from the
    transmittance it is given and stops where the forward stops (next T <= 1e-4); between batches
    the transmittance is carried by multiplying in (1 - alpha) of the pairs it returned."""
    from gsplat import rasterize_to_indices_in_range

    W, H, tile = int(meta["width"]), int(meta["height"]), int(meta["tile_size"])
    m2d = meta["means2d"].detach()[:1]
    conics = meta["conics"].detach()[:1]
    opac = meta["opacities"].detach()[:1]
    offsets, flat = meta["isect_offsets"][:1], meta["flatten_ids"]
    n = m2d.shape[-2]
    counts = torch.zeros(n, dtype=torch.long, device=m2d.device)
    if flat.numel() == 0:
        return counts
    ends = torch.cat([offsets.flatten(), offsets.new_tensor([flat.numel()])])
    block = tile * tile
    batches = int(((ends[1:] - ends[:-1]).max().item() + block - 1) // block)  # one sync per counted view
    trans = torch.ones(1, H, W, device=m2d.device)
    for b in range(batches):
        g, pix, _ = rasterize_to_indices_in_range(b, b + 1, trans, m2d, conics, opac, W, H, tile, offsets, flat)
        if g.numel() == 0:
            continue  # this batch drew nothing here; a later one still can
        g, pix = g.long(), pix.long()
        counts += torch.bincount(g, minlength=n)
        d = m2d[0, g] - torch.stack([pix % W, pix // W], -1).to(m2d.dtype) - 0.5
        c = conics[0, g]
        sigma = 0.5 * (c[:, 0] * d[:, 0] ** 2 + c[:, 2] * d[:, 1] ** 2) + c[:, 1] * d[:, 0] * d[:, 1]
        alpha = (opac[0, g] * torch.exp(-sigma)).clamp(max=0.999)
        log_t = torch.zeros(H * W, device=m2d.device).index_add_(0, pix, torch.log1p(-alpha))
        trans = trans * log_t.exp().view(1, H, W)
    return counts
