#!/usr/bin/env python
"""Time one training step (render + loss + backward + optimizer) per backend, side by side.

    python scripts/bench_train_step.py --data ../shared/data/lego --downscale 4 --gaussians 20000

Gaussians are initialised at random inside the cameras' view (no point cloud needed); the
step is the trainer's own: L1 + 0.2 (1 - SSIM), VisibleAdam. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from budget3d.scene import load_scene
from budget3d.splat import random_init, render
from budget3d.train.optim import VisibleAdam
from budget3d.train.trainer import _loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/lego")
    ap.add_argument("--downscale", type=int, default=4)
    ap.add_argument("--gaussians", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--backends", default="torch,cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scene = load_scene(args.data, downscale=args.downscale)
    centers = np.stack([v.camera.center for v in scene.train])
    radius = 0.4 * float(np.linalg.norm(centers, axis=1).mean())
    init = random_init(args.gaussians, (0.0, 0.0, 0.0), radius, sh_degree=3)
    init["scales"] = init["scales"] - 0.5  # a little smaller than neighbour spacing, as after training
    bg = torch.tensor(scene.background, dtype=torch.float32)
    rows = []
    for be in args.backends.split(","):
        params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        opts = {k: VisibleAdam([p], lr=1e-3, eps=1e-15) for k, p in params.items()}
        times = []
        for i in range(args.steps + 2):  # two warm-up steps (compile, caches)
            view = scene.train[i % len(scene.train)]
            gt = torch.as_tensor(view.image()).float() / 255.0
            t0 = time.perf_counter()
            out = render(params, view.camera, backend=be, background=bg)
            loss = _loss(out.image, gt, 0.2)
            loss.backward()
            for o in opts.values():
                o.step(out.visible)
                o.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        rows.append({"backend": be, "step_ms": round(1e3 * statistics.median(times), 1),
                     "gaussians": args.gaussians, "width": scene.train[0].camera.width,
                     "height": scene.train[0].camera.height, "threads": args.threads})
    base = rows[0]["step_ms"]
    print(f"{args.data} at downscale {args.downscale}, {args.gaussians} Gaussians, {args.threads} threads")
    print(f"{'backend':8} {'step ms':>9} {'speedup':>8}")
    for r in rows:
        r["speedup_vs_first"] = round(base / r["step_ms"], 1)
        print(f"{r['backend']:8} {r['step_ms']:9.1f} {r['speedup_vs_first']:7.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
