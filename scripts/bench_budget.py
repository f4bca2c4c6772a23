#!/usr/bin/env python
"""Classic 3DGS densification vs Taming at the same Gaussian count (and MCMC on CUDA).

Trains the scene with ``--strategy default`` (no budget: it grows as 3DGS does), then with
Taming to exactly the count Default ended at (and gsplat's MCMC capped at it, on CUDA), with
the same steps, seed and learning rates, and prints PSNR / SSIM / count / seconds side by side.

    python scripts/bench_budget.py                                    # the bundled scene
    python scripts/bench_budget.py --data ../shared/data/lego --downscale 4 --iters 3000 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from budget3d.cli import bundled_scene
from budget3d.errors import UserError
from budget3d.train import TrainConfig, train

COLUMNS = ("strategy", "num_gaussians", "psnr", "ssim", "train_seconds")


def run(args) -> dict:
    data = Path(args.data) if args.data else bundled_scene()
    out = Path(args.out)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    common = dict(data=str(data), iters=args.iters, device=args.device, backend=args.backend,
                  downscale=args.downscale, seed=args.seed, eval_max_views=args.eval_views, checkpoint_every=0)
    rows = []

    def one(strategy, budget=None):
        cfg = TrainConfig(out=str(out / strategy), strategy=strategy, budget=budget, **common)
        t0 = time.perf_counter()
        m = train(cfg, progress=not args.quiet)
        m["wall_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append({k: v for k, v in m.items() if k != "per_view"})
        print(f"{strategy}: {m['num_gaussians']} Gaussians, PSNR {m['psnr']}, {m['train_seconds']} s", flush=True)
        return m

    if args.count:  # Default's count known from an earlier run: train only the budgeted strategies
        count = args.count
    else:
        count = one("default")["num_gaussians"]
    one("taming", str(count))
    if cuda:
        one("mcmc", str(count))
    result = {"scene": str(data), "downscale": args.downscale, "iters": args.iters, "count": count,
              "device": rows[0]["device"], "backend": rows[0]["backend"], "runs": rows}
    return result


def table(result: dict) -> str:
    head = f"{'strategy':<10}{'count':>10}{'PSNR':>9}{'SSIM':>8}{'seconds':>10}"
    lines = [f"{result['scene']} (downscale {result['downscale']}, {result['iters']} steps, "
             f"{result['device']}/{result['backend']})", head, "-" * len(head)]
    for r in result["runs"]:
        lines.append(f"{r['strategy']:<10}{r['num_gaussians']:>10}{r['psnr']:>9.2f}{r['ssim']:>8.4f}"
                     f"{r['train_seconds']:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="scene folder (default: the bundled scene)")
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-views", type=int, default=0, help="test views to score (0 = all)")
    p.add_argument("--out", default="runs/bench", help="parent folder of the per-strategy run folders")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--count", type=int, help="skip Default and use this count (from an earlier run)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"bench_budget: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench_budget: interrupted", file=sys.stderr)
        return 130
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
