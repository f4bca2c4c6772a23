"""The grid student: learnable tri-plane features where the ray meets the surface, then a small
conv decoder and PixelShuffle super-resolution. One forward per frame, pose in, image out.

Why: the MobileR2L recipe (positional encoding of K fixed points, an MLP of 1x1 convs) has to
learn where along each ray the surface is and what it looks like from sin/cos of coordinates,
which takes ~600k steps on GPUs. Feature planes (TensoRF, K-Planes) store the field itself, so a
step updates the few texels a ray touches and the function is learned in minutes; and a 3DGS
teacher renders depth for free, so the student can be told where the surface is.

Per low-resolution ray, in the student's frame (``nelf/frame.py``: the unit ball holding 99% of
the teacher's Gaussians for 360° scenes, NDC for forward-facing ones):
1. **where**: ``coarse`` samples uniform on the ray's chord through the unit ball (in NDC: uniform
   in disparity between the scene's bounds); a density per
   sample from a small multi-resolution tri-plane (a product of the three planes' bilinear
   features, as K-Planes, then a linear map and softplus); volume-rendering weights give the
   expected depth t̂ and the opacity A. Trained by the image loss and, beside it, by the
   teacher's own depth and alpha.
2. **what**: ``fine`` points around t̂ (spread over a few coarse spacings); larger tri-planes
   give their features, concatenated with A, t̂ and the direction -> 1x1 conv decoder ->
   PixelShuffle stages (each x2) -> RGB (linear, clamped to [0, 1] at inference).
Every op exports to ONNX opset 17 as plain ops plus 4-D GridSample (no 3-D grids), which
onnxruntime runs on its CPU and WASM kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budget3d.nelf.frame import Frame, scene_frame
from budget3d.nelf.students.r2l import ACTS, LinearClamp, sr_stage

# the settings that rebuild a grid student (a student.pt records them, so it rebuilds as distilled)
DEFAULTS = dict(
    coarse=32,  # density samples per ray
    density="atlas",  # "atlas": a dense G^3 grid (z slices side by side in one 2-D texture, seeded
    #                   from the teacher's depth); "planes": a tri-plane product
    density_res=64,  # G of the atlas
    coarse_res=(32, 64, 128),  # resolutions of the density tri-planes (one level each)
    coarse_ch=4,  # channels per density level
    ray_fine=3,  # feature points per low-resolution ray around the expected depth (decoder input)
    fine=2,  # feature points per output pixel around the (upsampled) expected depth
    fine_res=(64, 128, 256),  # resolutions of the feature tri-planes
    fine_ch=8,  # channels per feature level
    spread=3.0,  # the fine points cover t̂ +- spread coarse spacings (wider measured better on ethiopian_head than 0.5 and 1.5)
    width=64,  # decoder width
    n_blocks=1,  # decoder 1x1 layers after the first
    act="relu",
    sr_channels=(32, 16),  # PixelShuffle stages: the ray grid is at 1/2**len of the output
    pixel_width=32,  # the per-pixel decoder's hidden width
    frame_quantile=0.99,  # the unit ball holds this share of the teacher's opacity mass (beyond: clamped to it)
)


def _planes(res, ch, lo=0.1, hi=0.5):
    """One (3, ch, r, r) parameter per resolution: the xy, xz and yz planes of a level, initialised
    as K-Planes does (uniform [0.1, 0.5]: products of three stay small and positive)."""
    return nn.ParameterList([nn.Parameter(torch.empty(3, ch, r, r).uniform_(lo, hi)) for r in res])


def triplane(levels: nn.ParameterList, x: torch.Tensor) -> torch.Tensor:
    """Features (P, sum of channels) at points ``x`` (P, 3) in [-1, 1]^3: per level the product
    of its three planes' bilinear lookups, levels concatenated."""
    g = torch.stack([x[:, [0, 1]], x[:, [0, 2]], x[:, [1, 2]]])[:, :, None, :]  # (3, P, 1, 2)
    out = []
    for planes in levels:
        f = F.grid_sample(planes, g, mode="bilinear", padding_mode="border", align_corners=True)  # (3, C, P, 1)
        out.append(f[0, :, :, 0] * f[1, :, :, 0] * f[2, :, :, 0])  # (C, P)
    return torch.cat(out, 0).t()


def packed_table(planes: torch.Tensor) -> torch.Tensor:
    """A level's planes (3, C, r, r) as rows (3 * r * r, 4 * C): each texel with its right, lower
    and lower-right neighbours (the last row and column repeat, as border padding does)."""
    n, C, r, _ = planes.shape
    p = planes.permute(0, 2, 3, 1)  # (3, y, x, C)
    right = torch.cat([p[:, :, 1:], p[:, :, -1:]], 2)
    down = torch.cat([p[:, 1:], p[:, -1:]], 1)
    diag = torch.cat([down[:, :, 1:], down[:, :, -1:]], 2)
    return torch.stack([p, right, down, diag], 3).reshape(n * r * r, 4 * C)


def triplane_gather(levels: nn.ParameterList, x: torch.Tensor) -> torch.Tensor:
    """``triplane`` as one Gather per level from its ``packed_table`` and a 4-weight MatMul: the
    same values to float rounding, 1.2x (quiet) to 1.65x (loaded) faster in onnxruntime, whose GridSample interpolates
    each channel of each point on its own. The exported graphs use it; training keeps grid_sample
    (faster backward in torch). Tried and slower in onnxruntime: Mul + ReduceSum for the weights,
    a channels-first table gathered along its columns."""
    x = x.clamp(-1, 1) + 1  # 0..2; clamped once (per level it trips onnxscript's optimizer)
    a, b, c = x[:, 0], x[:, 1], x[:, 2]
    uv = torch.stack([torch.stack([a, b], -1), torch.stack([a, c], -1), torch.stack([b, c], -1)])  # (3, P, 2)
    out = []
    for planes in levels:
        n, C, r, _ = planes.shape
        q = uv * (0.5 * (r - 1))  # (column, row) in texels
        i0 = torch.floor(q).clamp(0, r - 2)
        f = q - i0
        i0 = i0.long()
        idx = torch.arange(n, device=x.device)[:, None] * (r * r) + i0[..., 1] * r + i0[..., 0]  # (3, P)
        v = packed_table(planes).index_select(0, idx.reshape(-1)).reshape(n, -1, 4, C)
        fx, fy = f[..., 0], f[..., 1]
        w = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)  # (3, P, 4)
        val = torch.matmul(w[..., None, :], v)[..., 0, :]  # (3, P, C)
        out.append(val[0] * val[1] * val[2])
    return torch.cat(out, 1)


def atlas_lookup(atlas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Trilinear values (P,) of a G^3 grid stored as a (1, 1, G, G*G) texture (slice z at columns
    z*G .. z*G+G-1) at points ``x`` (P, 3) in [-1, 1]^3: two bilinear lookups in adjacent slices,
    blended along z. 4-D GridSample only, so it exports to every ONNX runtime."""
    G = atlas.shape[2]
    q = (x.clamp(-1, 1) + 1) * (0.5 * (G - 1))  # continuous voxel index, 0 .. G-1
    z0 = torch.floor(q[:, 2]).clamp(0, G - 2)
    fz = q[:, 2] - z0
    gy = q[:, 1] / (G - 1) * 2 - 1
    n = G * G - 1
    g = torch.stack([torch.stack([(z0 * G + q[:, 0]) / n * 2 - 1, gy], -1),
                     torch.stack([((z0 + 1) * G + q[:, 0]) / n * 2 - 1, gy], -1)])[None]  # (1, 2, P, 2)
    v = F.grid_sample(atlas, g, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]  # (2, P)
    return v[0] + (v[1] - v[0]) * fz


def occupancy_atlas(points: torch.Tensor, weights: torch.Tensor, G: int, empty: float = -8.0,
                    full: float = 30.0) -> torch.Tensor:
    """A (1, 1, G, G*G) atlas seeded from surface points (P, 3) in the unit frame (the teacher's
    depth back-projected, weighted by its alpha): a weighted histogram, blurred by one voxel,
    scaled to [0, 1] at its 99th percentile, mapped to raw densities ``empty`` .. ``full``."""
    idx = ((points.clamp(-1, 1) + 1) * (0.5 * (G - 1))).round().long().clamp(0, G - 1)
    flat = (idx[:, 2] * G + idx[:, 1]) * G + idx[:, 0]
    hist = torch.zeros(G * G * G).index_add_(0, flat, weights.float()).reshape(1, 1, G, G, G)  # (z, y, x)
    k = torch.tensor([0.25, 0.5, 0.25])
    for dim in (2, 3, 4):
        shape = [1, 1, 1, 1, 1]
        shape[dim] = 3
        hist = F.conv3d(hist, k.reshape(shape), padding=[1 if i == dim else 0 for i in (2, 3, 4)])
    occ = hist[0, 0]
    top = torch.quantile(occ[occ > 0], 0.99) if (occ > 0).any() else torch.tensor(1.0)
    occ = (occ / top.clamp_min(1e-12)).clamp(0, 1)
    raw = empty + (full - empty) * occ.sqrt()  # (z, y, x)
    return raw.permute(1, 0, 2).reshape(1, 1, G, G * G).contiguous()  # row y, column z*G + x


class GridStudent(nn.Module):
    """``forward(c2w (B, 4, 4), K (B, 3, 3), width, height)`` -> (B, 3, height, width)."""

    kind = "grid"
    needs_geometry = True  # the density is seeded from, and fitted to, the teacher's depth and alpha

    def __init__(self, frame: Frame = None, **arch):
        super().__init__()
        a = {**DEFAULTS, **arch}
        for k in ("coarse_res", "fine_res", "sr_channels"):
            a[k] = tuple(int(v) for v in a[k])
        self.arch = a
        self.frame = frame if frame is not None else Frame()
        if a["density"] == "atlas":
            G = int(a["density_res"])
            self.atlas = nn.Parameter(torch.zeros(1, 1, G, G * G))
            self.coarse_planes = nn.ParameterList()
        elif a["density"] == "planes":
            self.atlas = None
            self.coarse_planes = _planes(a["coarse_res"], a["coarse_ch"])
            self.density = nn.Linear(a["coarse_ch"] * len(a["coarse_res"]), 1)
            nn.init.normal_(self.density.weight, 0.0, 0.1)
            nn.init.zeros_(self.density.bias)
        else:
            raise ValueError(f"unknown density kind {a['density']!r}: expected 'atlas' or 'planes'")
        self.fine_planes = _planes(a["fine_res"], a["fine_ch"])
        fc = a["fine_ch"] * len(a["fine_res"])
        in_ch = a["ray_fine"] * fc + 2 + 3
        act = a["act"]
        body = [nn.Conv2d(in_ch, a["width"], 1), ACTS[act]()]
        for _ in range(a["n_blocks"]):
            body += [nn.Conv2d(a["width"], a["width"], 1), ACTS[act]()]
        self.head = nn.Sequential(*body)
        chans = (a["width"], *a["sr_channels"])
        self.sr = nn.Sequential(*[sr_stage(i, o, "pixelshuffle", act) for i, o in zip(chans[:-1], chans[1:])])
        self.pixel = nn.Sequential(nn.Conv2d(chans[-1] + a["fine"] * fc, a["pixel_width"], 1), ACTS[act](),
                                   nn.Conv2d(a["pixel_width"], 3, 1))
        self.out_act = LinearClamp()
        self.scale = 2 ** len(a["sr_channels"])
        self.in_ch = in_ch
        self.preset = "custom"
        self.aux = {}  # the last forward's expected depth and opacity on the ray grid (for losses)
        self.export_lookups = False  # True: the feature planes are read by ``triplane_gather`` (ONNX)

    def grid_parameters(self):
        return ([self.atlas] if self.atlas is not None else []) + list(self.coarse_planes) + list(self.fine_planes)

    def seed_density(self, points_world: torch.Tensor, weights: torch.Tensor) -> None:
        """Start the density atlas from surface points of the teacher (world coordinates)."""
        if self.atlas is not None:
            x = self.frame.points(points_world.float().to(self.atlas.device))
            with torch.no_grad():
                self.atlas.copy_(occupancy_atlas(x.cpu(), weights.cpu(), self.atlas.shape[2]))

    def geometry_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The last forward's expected depth and opacity against the teacher's (``target`` (B, H, W, 2):
        the depth as the frame's ray parameter t (``Frame.param``) and alpha at the output size,
        averaged over each ray's block): L1 on the depth where the teacher is opaque, L2 on the opacity."""
        t = target.permute(0, 3, 1, 2)
        a = F.avg_pool2d(t[:, 1:2], self.scale)[:, 0]
        depth = F.avg_pool2d(t[:, :1] * t[:, 1:2], self.scale)[:, 0] / a.clamp_min(1e-6)
        return (a * (self.aux["depth"] - depth).abs()).mean() + ((self.aux["alpha"] - a) ** 2).mean()

    def lr_groups(self, lr: float, grid_lr: float, weight_decay: float) -> list:
        """AdamW parameter groups: the grids at ``grid_lr`` without weight decay (it would pull every
        texel a ray never reaches to zero), the network at ``lr``. ``lr_scale`` is what the schedule
        multiplies."""
        return [{"params": self.net_parameters(), "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay},
                {"params": self.grid_parameters(), "lr": grid_lr, "lr_scale": grid_lr / lr, "weight_decay": 0.0}]

    def macs_per_frame(self, h: int, w: int) -> int:
        """Multiply-accumulates of the convs per h x w frame, plus the grid's texel reads (one MAC each)."""
        total = 0

        def hook(m, inp, out):
            nonlocal total
            total += out.shape[2] * out.shape[3] * m.out_channels * m.in_channels // m.groups * m.weight[0, 0].numel()

        hooks = [m.register_forward_hook(hook) for m in self.modules() if isinstance(m, nn.Conv2d)]
        try:
            with torch.no_grad():  # a real forward (the grid lookups have no meta kernels); ~0.1 s
                dev = self.frame.centre.device
                K = torch.tensor([[w, 0.0, w / 2], [0.0, w, h / 2], [0.0, 0.0, 1.0]], device=dev)
                self(torch.eye(4, device=dev), K, w, h)
        finally:
            for k in hooks:
                k.remove()
        return total + lookups_per_frame(self.arch, h, w)

    def net_parameters(self):
        grids = {id(p) for p in self.grid_parameters()}
        return [p for p in self.parameters() if id(p) not in grids]

    def _points(self, o, d, depth, delta, k):
        """``k`` points (B * h * w * k, 3) per ray around ``depth`` (B, h, w), ``spread`` spacings apart."""
        off = torch.linspace(-1.0, 1.0, k, dtype=o.dtype, device=o.device) * self.arch["spread"] if k > 1 else \
            torch.zeros(1, dtype=o.dtype, device=o.device)
        t = depth[..., None] + delta[..., None] * off
        return (o[..., None, :] + t[..., None] * d[..., None, :]).reshape(-1, 3).clamp(-1, 1)

    def forward(self, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> torch.Tensor:
        from budget3d.nelf.rays import rays_from_c2w

        if c2w.dim() == 2:
            c2w, K = c2w[None], K[None]
        a, s = self.arch, self.scale
        wo, d = rays_from_c2w(c2w, K, width, height, s)  # the ray grid (B, h, w, 3)
        o, v, t0, t1 = self.frame.segment(wo, d, chord=True)  # points o + t v in the frame
        B, h, w, _ = o.shape
        t0, t1 = (torch.as_tensor(t, dtype=o.dtype, device=o.device).expand(B, h, w) for t in (t0, t1))
        n = a["coarse"]
        u = (torch.arange(n, dtype=o.dtype, device=o.device) + 0.5) / n
        t = t0[..., None] + (t1 - t0)[..., None] * u  # (B, h, w, n)
        pts = o[..., None, :] + t[..., None] * v[..., None, :]
        flat = pts.reshape(-1, 3).clamp(-1, 1)
        raw = atlas_lookup(self.atlas, flat)[:, None] if self.atlas is not None else \
            self.density(triplane(self.coarse_planes, flat))
        sigma = F.softplus(raw)
        tau = sigma.reshape(B, h, w, n) * ((t1 - t0) / n)[..., None]  # optical depth per sample
        trans = torch.exp(-(torch.cumsum(tau, -1) - tau))  # transmittance before each sample
        wts = trans * (1.0 - torch.exp(-tau))
        acc = wts.sum(-1)  # opacity A
        depth = (wts * t).sum(-1) + (1.0 - acc) * t1  # expected depth, the far end where nothing is
        delta = (t1 - t0) / n
        if self.training:
            self.aux = {"depth": depth, "alpha": acc}
        x = [acc[:, None], ((depth - t0) / (t1 - t0 + 1e-6))[:, None], d.permute(0, 3, 1, 2)]
        # the feature points of the ray grid and (``fine``) of every output pixel, at the expected
        # depth of its block, read in one lookup per plane (one gradient buffer per plane, not two)
        pts = []
        if a["ray_fine"] > 0:
            pts.append(self._points(o, v, depth, delta, a["ray_fine"]))
        if a["fine"] > 0:
            of, df = rays_from_c2w(c2w, K, width, height, 1)
            of, df, _, _ = self.frame.segment(of, df, chord=True)
            up = lambda v: F.interpolate(v[:, None], scale_factor=s, mode="bilinear",  # noqa: E731
                                         align_corners=False)[:, 0]
            pts.append(self._points(of, df, up(depth), up(delta), a["fine"]))
        lookup = triplane_gather if self.export_lookups else triplane
        feats = lookup(self.fine_planes, torch.cat(pts)).split([len(p) for p in pts]) if pts else []
        if a["ray_fine"] > 0:
            x.insert(0, feats[0].reshape(B, h, w, -1).permute(0, 3, 1, 2))
        ctx = self.sr(self.head(torch.cat(x, 1)))  # (B, c, H, W)
        if a["fine"] > 0:
            ctx = torch.cat([ctx, feats[-1].reshape(B, height, width, -1).permute(0, 3, 1, 2)], 1)
        return self.out_act(self.pixel(ctx))


def lookups_per_frame(arch: dict, h: int, w: int) -> int:
    """Bilinear texel reads (4 per plane lookup, each of a level's channels) per h x w frame."""
    a = {**DEFAULTS, **arch}
    rays = (h // 2 ** len(a["sr_channels"])) * (w // 2 ** len(a["sr_channels"]))
    coarse = rays * a["coarse"] * a["coarse_ch"] * len(a["coarse_res"])
    fine = (rays * a["ray_fine"] + h * w * a["fine"]) * a["fine_ch"] * len(a["fine_res"])
    return int(12 * (coarse + fine))


__all__ = ["DEFAULTS", "GridStudent", "lookups_per_frame", "scene_frame", "triplane", "triplane_gather"]
