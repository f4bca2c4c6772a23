"""``budget3d demo``: train on the bundled scene, distill a tiny NeLF student, export it and bench it,
then say where the results are. Also the run summary that ``train``, ``eval`` and ``demo`` print.

Like the other subcommands with a module of their own: ``add_arguments(parser)`` (cheap imports
only) and ``main(args)``."""

from __future__ import annotations

import time
from pathlib import Path

from budget3d.errors import UserError

DEMO_BUDGET = "6000"
DEMO_ITERS = 1500
DEMO_DISTILL_ITERS = 3000


def add_arguments(d) -> None:
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--iters", type=int, default=DEMO_ITERS, help=f"training steps (default {DEMO_ITERS})")
    d.add_argument("--budget", default=DEMO_BUDGET, help=f"Gaussian budget (default {DEMO_BUDGET})")
    d.add_argument("--distill-iters", type=int, default=DEMO_DISTILL_ITERS,
                   help=f"steps of the tiny NeLF student distilled afterwards (default {DEMO_DISTILL_ITERS}; 0: none)")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto")


def bundled_scene() -> Path:
    """The scene shipped in the repository's scenes/ folder (first one, by name)."""
    import budget3d

    root = Path(budget3d.__file__).resolve().parents[1] / "scenes"
    found = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not found:
        raise UserError(f"{root}: the bundled scene is missing (it ships with the source repository; "
                        "install budget3d from a git checkout with 'pip install -e .', or pass a scene "
                        "to 'budget3d train --data PATH')")
    return found[0]


def main(args) -> int:
    from budget3d.nelf.distill import DistillConfig, distill
    from budget3d.train import TrainConfig, train

    scene = bundled_scene()
    out = Path(args.out)
    print(f"budget3d demo: training {scene.name} ({scene}) to exactly {args.budget} Gaussians, "
          f"{args.iters} steps -> {out}")
    cfg = TrainConfig(data=str(scene), out=str(out), budget=args.budget, iters=args.iters,
                      device=args.device, backend=args.backend)
    t0 = time.perf_counter()
    metrics = train(cfg)
    print(f"done in {time.perf_counter() - t0:.0f} s")
    print_summary(metrics, out)
    if args.distill_iters > 0:
        print(f"\ndistilling a tiny NeLF student from it ({args.distill_iters} steps) -> {out / 'nelf'}")
        if (out / "nelf" / "checkpoint.pt").is_file():
            import shutil

            shutil.rmtree(out / "nelf")  # the demo's run was just retrained: its old student is stale
        m = distill(DistillConfig(run=str(out), preset="tiny", iters=args.distill_iters, crop=64, batch=16,
                                  device=args.device, backend=args.backend))
        print(f"NeLF:         test PSNR {m['student_psnr']:.2f} dB (teacher {m['teacher_psnr']:.2f} dB), "
              f"{m['student_vs_teacher_psnr']:.2f} dB against the teacher; {m['params'] / 1e3:.0f} k params, "
              f"{m['distill_seconds']:.0f} s")
        _bench(out)
    print("\nnext:")
    print(f"  look at   {out / 'progress.png'} and {out / 'renders'}/ (ground truth left, render right)")
    if args.distill_iters > 0:
        print(f"            {out / 'nelf' / 'strip.png'} (ground truth | 3DGS teacher | NeLF student)")
    print(f"  view      budget3d view {out}")
    print(f"  re-score  budget3d eval {out}")
    print("  your data budget3d train --data PATH/TO/SCENE --budget 200k --out runs/mine")
    print("  compare   python scripts/bench_budget.py   (quality against budget: Taming vs its ablation and Default)")
    return 0


def _bench(run: Path) -> None:
    """Export the student (ONNX fp32 + int8) and the splats, then a short bench table."""
    from budget3d.export.bench import run_bench, table
    from budget3d.export.onnx import export
    from budget3d.export.splats import save_any
    from budget3d.splat import load_ply

    out = run / "export"
    out.mkdir(parents=True, exist_ok=True)
    save_any(load_ply(run / "gaussians.ply"), out / "gaussians.splat", "splat")
    for fmt in ("onnx", "onnx-int8"):
        export(run, fmt, out, progress=False)
    print(f"\nexported to {out}/; bench (quick):")
    print(table(run_bench(run, quick=True, progress=False)))


def print_summary(m: dict, run: Path) -> None:
    """A run's metrics.json in five lines: quality, size, time, and where its files are."""
    fmt = lambda v, nd=2: "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lp = fmt(m.get("lpips"), 4) if m.get("lpips") is not None else m.get("lpips_status", "absent")
    print(f"run folder:   {run}")
    print(f"test PSNR:    {fmt(m.get('psnr'))} dB   SSIM: {fmt(m.get('ssim'), 4)}   LPIPS: {lp}   "
          f"({m.get('n_test_views', 0)} test views)")
    print(f"Gaussians:    {m.get('num_gaussians')} (budget {m.get('budget')})   strategy: {m.get('strategy')}   "
          f"backend: {m.get('backend')}")
    if m.get("train_seconds") is not None:
        print(f"training:     {m.get('iters')} steps in {fmt(m.get('train_seconds'), 1)} s   "
              f"peak memory {fmt(m.get('peak_memory_mb'), 0)} MB")
    print(f"files:        {run / 'metrics.json'}, {run / 'gaussians.ply'}, {run / 'progress.png'}, {run / 'renders'}/")
