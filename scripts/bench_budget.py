#!/usr/bin/env python
"""Quality against Gaussian budget: Taming vs its gradient-only ablation vs Default vs MCMC at the same count.

Per seed: train ``--strategy default`` (3DGS's densification, no budget) to find the count C it
reaches on this scene and step count; then, for each budget fraction f (default 10%, 25%, 50%,
100% of C), train to exactly round(f * C) Gaussians with
  - ``taming``       the full score (gradient, opacity, volume, depth, screen size, pixels, blend);
  - ``taming-grad``  the same strategy sampling by positional gradient alone (``score=grad``);
  - ``default-cap``  Default made to end at the count: each refinement grows only the
                     highest-gradient candidates that fit under the count (its threshold raised
                     to fit), and at the end the lowest-opacity Gaussians are trimmed (or the
                     largest split) to exactly the count;
  - ``mcmc``         3DGS-MCMC (relocation of dead Gaussians, growth by opacity sampling, noise,
                     L1 opacity/scale regularisers) with its count on the same budget schedule as
                     Taming, exactly the count at the end (budget3d/budget/mcmc.py).
Same steps, seed, learning rates and schedules for all. Writes a JSON with every run and the
per-(method, fraction) means, and a PNG of PSNR against count, one line per method.

    python scripts/bench_budget.py                                   # bundled scene, 1 seed
    python scripts/bench_budget.py --data ../shared/data/lego --downscale 4 --seeds 0,1 \\
        --json runs/sweep_lego.json --png runs/sweep_lego.png
    # two seeds side by side on two cores, then one table and plot:
    OMP_NUM_THREADS=1 python scripts/bench_budget.py ... --seeds 0 --json s0.json &
    OMP_NUM_THREADS=1 python scripts/bench_budget.py ... --seeds 1 --json s1.json; wait
    python scripts/bench_budget.py --merge s0.json,s1.json --json sweep.json --png sweep.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from budget3d.cli import bundled_scene
from budget3d.errors import UserError
from budget3d.train import TrainConfig, train

METHODS = {  # name -> TrainConfig fields
    "taming": dict(strategy="taming", score="full"),
    "taming-grad": dict(strategy="taming", score="grad"),
    "default-cap": dict(strategy="default"),
    "mcmc": dict(strategy="mcmc"),
}


def run(args) -> dict:
    data = Path(args.data) if args.data else bundled_scene()
    out = Path(args.out)
    fractions = [float(f) for f in args.fractions.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    common = dict(data=str(data), iters=args.iters, device=args.device, downscale=args.downscale,
                  eval_max_views=args.eval_views, checkpoint_every=0, save_renders=False)
    common.update(json.loads(args.set) if args.set else {})
    rows = []

    def one(name, seed, budget=None, fraction=None, **kw):
        tag = f"{name}-{budget or 'free'}-s{seed}"
        cfg = TrainConfig(out=str(out / tag), seed=seed, budget=None if budget is None else str(budget),
                          **{**common, **kw})
        t0 = time.perf_counter()
        m = train(cfg, progress=not args.quiet)
        row = {"method": name, "seed": seed, "fraction": fraction, "budget": budget, "num_gaussians": m["num_gaussians"],
               "psnr": m["psnr"], "ssim": m["ssim"], "train_seconds": m["train_seconds"],
               "wall_seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{tag}: {row['num_gaussians']} Gaussians, PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.4f}, "
              f"{row['train_seconds']:.0f} s", flush=True)
        if args.json:  # partial results survive an interrupted sweep
            Path(args.json).write_text(json.dumps({"runs": rows}, indent=2) + "\n")
        return row

    for seed in [int(s) for s in args.seeds.split(",")]:
        natural = args.count or one("default", seed, **METHODS["default-cap"])["num_gaussians"]
        for f in fractions:
            for name in methods:
                one(name, seed, max(1, round(f * natural)), fraction=f, **METHODS[name])
    return summarise(str(data), args, rows)


def merge(args) -> dict:
    parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
    args.downscale, args.iters = parts[0].get("downscale", args.downscale), parts[0].get("iters", args.iters)
    return summarise(parts[0].get("scene", args.data or ""), args, [r for p in parts for r in p["runs"]])


def summarise(scene: str, args, rows: list) -> dict:
    groups = defaultdict(list)
    for r in rows:
        if r.get("fraction") is not None:
            groups[(r["method"], r["fraction"])].append(r)
    mean = lambda xs: round(sum(xs) / len(xs), 3)  # noqa: E731
    summary = [{"method": m, "fraction": f, "n_seeds": len(g), "num_gaussians": mean([r["num_gaussians"] for r in g]),
                "psnr": mean([r["psnr"] for r in g]), "ssim": round(sum(r["ssim"] for r in g) / len(g), 4),
                "train_seconds": mean([r["train_seconds"] for r in g])}
               for (m, f), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return {"scene": scene, "downscale": args.downscale, "iters": args.iters, "runs": rows, "summary": summary}


def table(result: dict) -> str:
    head = f"{'method':<13}{'fraction':>9}{'count':>9}{'PSNR':>8}{'SSIM':>8}{'seconds':>9}"
    lines = [f"{result['scene']} (downscale {result['downscale']}, {result['iters']} steps)", head, "-" * len(head)]
    for r in result["summary"]:
        lines.append(f"{r['method']:<13}{r['fraction']:>9.2f}{r['num_gaussians']:>9.0f}{r['psnr']:>8.2f}"
                     f"{r['ssim']:>8.4f}{r['train_seconds']:>9.0f}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        pts = sorted((r["num_gaussians"], r["psnr"]) for r in result["summary"] if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    free = [r for r in result["runs"] if r["method"] == "default" and r.get("fraction") is None]
    if free:  # Default's own count and quality: where the fractions are taken from
        ax.scatter([r["num_gaussians"] for r in free], [r["psnr"] for r in free], marker="*", s=120, color="k",
                   label="default (uncapped)", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("Gaussians")
    ax.set_ylabel("test PSNR (dB)")
    ax.set_title(f"{Path(result['scene']).name}: {result['iters']} steps, /{result['downscale']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="scene folder (default: the bundled scene)")
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="budgets as fractions of Default's count")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--count", type=int, help="skip the Default runs and use this count (from an earlier run)")
    p.add_argument("--set", help='extra TrainConfig fields for every run, as JSON, e.g. \'{"recycle_frac": 0.05}\'')
    p.add_argument("--eval-views", type=int, default=0, help="test views to score (0 = all)")
    p.add_argument("--out", default="runs/bench_budget", help="parent folder of the run folders")
    p.add_argument("--json", help="write the results to this JSON file (updated after every run)")
    p.add_argument("--png", help="write the PSNR-against-count plot here")
    p.add_argument("--merge", help="train nothing: combine these comma-separated JSON files of earlier sweeps "
                                   "(e.g. one per seed, run side by side) into --json / --png")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        result = merge(args) if args.merge else run(args)
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
    if args.png:
        plot(result, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
