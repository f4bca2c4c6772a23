"""The distillation levers that are not DistillConfig fields, measured against the default loop.

Each run trains the student of RUN (a 'budget3d train' folder) at 1 thread and prints
(step, CPU seconds, wall seconds, test PSNR against the teacher) every ``evalevery`` steps:

    OMP_NUM_THREADS=1 python scripts/nelf_levers.py NAME PRESET ITERS TRIPLANE run=RUN [key=value ...]

TRIPLANE 1 adds learnable tri-plane features (``res`` x ``res``, ``ch`` channels, planes' lr x ``pmult``)
sampled at the K points; ``box=1`` puts the K points between the ray's entry into and exit from
the teacher's Gaussians' box instead of the global near/far; ``crop=64`` trains on random 64x64
crops (``batch`` of them) instead of whole views; ``lr``, ``batch``, ``K`` as in DistillConfig.
Results of the runs reported in the README: docs/distill_levers.json.
"""
import sys, time, json, torch, numpy as np
import torch.nn.functional as F
from torch import nn
from budget3d.nelf.distill import DistillConfig, at_resolution, setup, _quick_eval, lr_at
from budget3d.nelf.net import build

class Tri(nn.Module):
    def __init__(self, base, K, centre, half, res=128, ch=8, keep_pe=True):
        super().__init__()
        self.base, self.K, self.ch, self.keep_pe = base, K, ch, keep_pe
        self.planes = nn.Parameter(torch.randn(3, ch, res, res) * 0.1)
        self.register_buffer("centre", torch.as_tensor(centre, dtype=torch.float32))
        self.register_buffer("hw", torch.tensor(float(half)))
        self.scale = base.scale
    def forward(self, x):
        B, _, h, w = x.shape
        K = self.K
        p = x[:, :3 * K].reshape(B, K, 3, h, w).permute(0, 3, 4, 1, 2)  # B h w K 3
        q = (p - self.centre) / self.hw
        f = 0
        for i, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
            g = torch.stack([q[..., a], q[..., b]], -1).reshape(B, h, w * K, 2)
            s = F.grid_sample(self.planes[i:i + 1].expand(B, -1, -1, -1), g, align_corners=False, padding_mode="zeros")
            f = f + s
        f = f.reshape(B, self.ch, h, w, K).permute(0, 4, 1, 2, 3).reshape(B, K * self.ch, h, w)
        z = torch.cat([x, f], 1) if self.keep_pe else torch.cat([x[:, :3*K], f], 1)
        return self.base(z)

def main(name, preset, iters, tri, lr=3e-3, batch=4, res=128, ch=8, keep_pe=1, evalevery=200, pmult=3.0, crop=0, box=0, K=8, run="runs/demo"):
    torch.set_num_threads(1)
    cfg = DistillConfig(run=run, preset=preset, iters=iters, lr=lr, batch=batch, backend="cpu", n_points=K, cache_size=2000)
    d = setup(cfg)
    if box:
        from budget3d.nelf.rays import camera_rays, encode
        pts = d.teacher["means"]
        blo, bhi = torch.quantile(pts, 0.005, 0), torch.quantile(pts, 0.995, 0)
        pad = 0.05 * (bhi - blo)
        blo, bhi = blo - pad, bhi + pad
        print("box", blo, bhi, "near far", d.near, d.far)
        def inputs(cameras):
            s_ = d.model.scale
            rays = [camera_rays(at_resolution(c, d.width, d.height), s_) for c in cameras]
            o = torch.stack([r[0] for r in rays]); dd = torch.stack([r[1] for r in rays])
            inv = 1.0 / torch.where(dd.abs() < 1e-9, torch.full_like(dd, 1e-9), dd)
            t1, t2 = (blo - o) * inv, (bhi - o) * inv
            tn = torch.minimum(t1, t2).amax(-1).clamp(min=d.near * 0.5)
            tf = torch.maximum(t1, t2).amin(-1)
            miss = tf <= tn
            tf = torch.where(miss, tn, tf)
            return encode(o, dd, tn, tf, k=cfg.n_points, freqs=cfg.freqs)
        d.inputs = inputs
    K = cfg.n_points
    if tri:
        in_ch = (3 * K * 13 if keep_pe else 3 * K) + K * ch
        base = build(preset, in_ch=in_ch)
        pts = d.teacher["means"]
        lo, hi = torch.quantile(pts, 0.01, 0), torch.quantile(pts, 0.99, 0)
        centre, half = (lo + hi) / 2, float((hi - lo).max() / 2 * 1.1)
        d.model = Tri(base, K, centre, half, res, ch, keep_pe)
        d.optimizer = torch.optim.AdamW([{"params": base.parameters()}, {"params": [d.model.planes], "weight_decay": 0.0, "lr_mult": pmult}], lr=lr, weight_decay=1e-2)
    hist = []
    t0 = time.process_time(); w0 = time.perf_counter()
    for step in range(iters):
        d.model.train()
        for g in d.optimizer.param_groups: g["lr"] = lr_at(cfg, step) * g.get("lr_mult", 1.0)
        idx = d.poses.batch(step, cfg.batch)
        if crop:
            from budget3d.scene.camera import Camera
            g = np.random.default_rng([step, 5])
            gts, cams = [], []
            for i in idx:
                full = d.target(i)
                c = at_resolution(d.poses.camera(i), d.width, d.height)
                x0 = int(g.integers(0, (d.width - crop) // d.model.scale + 1)) * d.model.scale
                y0 = int(g.integers(0, (d.height - crop) // d.model.scale + 1)) * d.model.scale
                gts.append(full[y0:y0 + crop, x0:x0 + crop])
                cams.append(Camera(c.fx, c.fy, c.cx - x0, c.cy - y0, crop, crop, c.world_to_camera))
            gt = torch.stack(gts)
            W, H = d.width, d.height
            d.width = d.height = crop
            img = d.student(cams)
            d.width, d.height = W, H
        else:
            gt = torch.stack([d.target(i) for i in idx])
            img = d.student([d.poses.camera(i) for i in idx])
        loss = F.mse_loss(img, gt)
        d.optimizer.zero_grad(); loss.backward(); d.optimizer.step()
        if (step + 1) % evalevery == 0 or step + 1 == iters:
            c = time.process_time() - t0
            hist.append((step + 1, round(c, 1), round(time.perf_counter() - w0, 1), round(_quick_eval(d), 2)))
            print(name, hist[-1], flush=True)
    json.dump(hist, open(f"{name}.json", "w"))

if __name__ == "__main__":
    a = sys.argv
    kw = {k: (v if k == "run" else float(v) if "." in v or "e" in v else int(v)) for k, v in (x.split("=") for x in a[5:])}
    main(a[1], a[2], int(a[3]), int(a[4]), **kw)
