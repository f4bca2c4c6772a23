"""The one command line: ``budget3d inspect | train | eval | demo``.

A user mistake (``UserError``) prints ``budget3d: error: <message>`` on one line and exits 2;
Ctrl-C exits 130 after saying how to resume.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from budget3d.errors import UserError

DEMO_BUDGET = "6000"
DEMO_ITERS = 1500


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError (one line, exit 2) like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see: {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="budget3d", description="3D Gaussian Splatting trained to an exact Gaussian budget.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("inspect", help="summarise a scene folder (format, views, size, points, bounds)")
    q.add_argument("path", help="scene folder (Blender, nerfstudio/instant-ngp, COLMAP or LLFF)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.add_argument("--downscale", type=int, default=1, help="image downscale factor (default 1)")
    q.add_argument("--check", action="store_true",
                   help="also decode every image (slower): stops at the first unreadable or wrongly sized one")

    t = sub.add_parser("train", help="train Gaussians to an exact budget; writes a run folder")
    t.add_argument("--data", help="scene folder (not needed with --resume)")
    t.add_argument("--budget", help='Gaussian budget: a count ("200000", "200k"), "15x" the initial points, '
                                    'or a .ply size ("30MB"); not needed for --strategy default')
    t.add_argument("--out", required=True, help="run folder to write (or to continue with --resume)")
    t.add_argument("--iters", type=int, help="training steps (default 3000)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    t.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], help="renderer backend (default auto)")
    t.add_argument("--downscale", type=int, help="image downscale factor (default 1)")
    t.add_argument("--sh-degree", type=int, dest="sh_degree", help="spherical-harmonics degree 0..3 (default 3)")
    t.add_argument("--strategy", choices=["taming", "default", "mcmc"],
                   help="densification: taming (exact budget, default), default (classic 3DGS, no budget), "
                        "mcmc (gsplat MCMC capped at the budget, CUDA only)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--random-background", action="store_true", default=None, dest="random_background",
                   help="train on random background colours")
    t.add_argument("--checkpoint-every", type=int, dest="checkpoint_every", help="steps between checkpoints (default 1000)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="re-evaluate a run folder on its test views; rewrites metrics.json")
    e.add_argument("run", help="run folder written by 'budget3d train'")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    d = sub.add_parser("demo", help="train on the bundled scene in a few minutes and show where the results are")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--iters", type=int, default=DEMO_ITERS, help=f"training steps (default {DEMO_ITERS})")
    d.add_argument("--budget", default=DEMO_BUDGET, help=f"Gaussian budget (default {DEMO_BUDGET})")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("--backend", choices=["auto", "torch", "cpu", "cuda"], default="auto")
    return p


# ----------------------------------------------------------------------------- commands


def cmd_inspect(args) -> int:
    from budget3d.scene import describe, load_scene

    with warnings.catch_warnings(record=True) as caught:  # e.g. skipped frames: one line each, no source line
        warnings.simplefilter("always", UserWarning)
        scene = load_scene(args.path, downscale=args.downscale, cache=False)
    for w in caught:
        print(f"budget3d: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
    info = describe(scene)
    if args.check:  # images load lazily, so a corrupt or wrongly sized one only shows when decoded
        for view in scene.train + scene.test:
            view.image()
        info["n_images_checked"] = len(scene.train) + len(scene.test)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


TRAIN_FLAGS = ("data", "budget", "iters", "device", "backend", "downscale", "sh_degree", "strategy", "seed",
               "random_background", "checkpoint_every")
RESUME_OVERRIDES = ("device", "backend")  # runtime choices that do not change the result's recipe


def cmd_train(args) -> int:
    from budget3d.train import TrainConfig, train

    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.resume:
        fixed = sorted(k for k in given if k not in RESUME_OVERRIDES)
        if fixed:
            flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
            raise UserError(f"--resume continues {args.out} with its saved config; drop {flags} "
                            "(or start a new run in another --out folder)")
        cfg = TrainConfig(out=args.out, device=given.get("device", "auto"), backend=given.get("backend", "auto"))
    else:
        if not given.get("data"):
            raise UserError("train needs --data PATH (a scene folder), or --resume to continue a run")
        _refuse_overwrite(Path(args.out))
        cfg = TrainConfig(out=args.out, **given)
    metrics = train(cfg, resume=args.resume, progress=not args.quiet)
    _print_summary(metrics, Path(args.out))
    return 0


def cmd_eval(args) -> int:
    from budget3d.train import evaluate_run

    metrics = evaluate_run(args.run, device=args.device, backend=args.backend)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "per_view"}))
    else:
        _print_summary(metrics, Path(args.run))
    return 0


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


def cmd_demo(args) -> int:
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
    _print_summary(metrics, out)
    print("\nnext:")
    print(f"  look at   {out / 'progress.png'} and {out / 'renders'}/ (ground truth left, render right)")
    print(f"  re-score  budget3d eval {out}")
    print(f"  your data budget3d train --data PATH/TO/SCENE --budget 200k --out runs/mine")
    print("  compare   python scripts/bench_budget.py   (default 3DGS vs Taming at the same count)")
    return 0


def _refuse_overwrite(out: Path) -> None:
    if (out / "checkpoint.pt").is_file():
        raise UserError(f"{out} already holds a run; continue it with --resume, or choose another --out")


def _print_summary(m: dict, run: Path) -> None:
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


COMMANDS = {"inspect": cmd_inspect, "train": cmd_train, "eval": cmd_eval, "demo": cmd_demo}


def main(argv: Optional[list] = None) -> int:
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except UserError as e:
        msg = " ".join(str(e).split())  # one line, always
        print(f"budget3d: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        msg = " ".join(str(e).split()) or "interrupted"
        print(f"\nbudget3d: {msg}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
