#!/usr/bin/env python
"""PSNR against time for NeLF distillation recipes: the default and the levers tried.

Each variant is ``name:key=value,key=value`` over ``DistillConfig`` fields, run on a copy of the
run folder (``RUN/nelf`` of the original is never touched), with a test-view evaluation against
the teacher at ``--points`` moments; the timer excludes those evaluations. Writes one JSON with
every curve and a PNG (PSNR against the teacher vs seconds, one line per variant).

    python scripts/bench_distill.py runs/demo                                 # the CPU default
    python scripts/bench_distill.py runs/demo --iters 6000 \\
        --variants "tiny:preset=tiny" "small:preset=small" "batch8:batch=8,lr=0.005" \\
        --json docs/distill_levers.json --png docs/distill_levers.png
    # variants side by side, one core each, then one plot:
    OMP_NUM_THREADS=1 python scripts/bench_distill.py RUN --variants "a:..." --json a.json &
    OMP_NUM_THREADS=1 python scripts/bench_distill.py RUN --variants "b:..." --json b.json; wait
    python scripts/bench_distill.py --merge a.json,b.json --json all.json --png all.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

from budget3d.errors import UserError
from budget3d.nelf.distill import DistillConfig, distill

FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    kw = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition("=")
        if k.startswith("arch."):  # a grid student's setting: numbers, "a/b/c" for tuples, or text
            num = lambda x: int(x) if x.lstrip("-").isdigit() else float(x) if x.replace(".", "", 1).replace(  # noqa: E731
                "-", "", 1).replace("e", "", 1).isdigit() else x
            kw.setdefault("arch", {})[k[5:]] = tuple(num(x) for x in v.split("/")) if "/" in v else num(v)
            continue
        if k not in FIELDS:
            raise UserError(f"variant {name!r}: {k!r} is not a DistillConfig field ({', '.join(FIELDS)})")
        default = FIELDS[k].default
        if default is None and k == "lr":
            default = 0.0
        kw[k] = v if isinstance(default, str) or default is None else type(default)(
            v.lower() in ("1", "true", "yes") if isinstance(default, bool) else float(v) if isinstance(default, float)
            else int(float(v)) if isinstance(default, int) else v)
    return name or "default", kw


def onnx_figures(run: Path) -> dict:
    """fp32 and int8 ONNX exports of the run's student: file size, 1-thread latency at the
    student's resolution, and int8's PSNR against its own fp32 and both against the teacher."""
    from budget3d.export import onnx as ex

    out = {}
    for fmt in ("onnx", "onnx-int8"):
        r = ex.export(run, fmt, run / "export", progress=False)
        out[fmt] = {k: r.get(k) for k in ("size_mb", "latency_ms_1thread", "psnr_vs_fp32", "psnr_vs_teacher",
                                          "fp32_psnr_vs_teacher", "max_abs_diff")}
    return out


def run_variant(run: Path, name: str, kw: dict, iters: int, points: int, onnx: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        copy = Path(tmp) / "run"
        copy.mkdir()
        for f in ("gaussians.ply", "config.json"):
            shutil.copy(run / f, copy / f)
        kw = {"iters": iters, **kw}
        cfg = DistillConfig(run=str(copy), eval_every=max(1, kw["iters"] // points), checkpoint_every=0, **kw)
        t0 = time.time()
        m = distill(cfg, progress=True)  # the bar goes to stderr (a log file when run in the background)
        curve = [(h["seconds"], h["test_psnr_vs_teacher"]) for h in m["history"] if "test_psnr_vs_teacher" in h]
        extra = {"onnx": onnx_figures(copy)} if onnx else {}
        return {**extra, "run": str(run), "name": name, "settings": kw, "curve": curve, "wall_seconds": round(time.time() - t0, 1),
                **{k: m.get(k) for k in ("preset", "params", "macs_per_frame", "resolution", "distill_seconds",
                                         "steps", "seconds_per_iter", "frame", "teacher_cache", "threads",
                                         "student_vs_teacher_psnr", "student_psnr", "teacher_psnr")}}


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in rows:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(xs, ys, "o-", ms=3, label=f"{Path(r.get('run', '')).name} {r['name']} ({r['student_vs_teacher_psnr']:.2f} dB)")
    ax.axhline(25, color="grey", ls=":", lw=1)
    ax.set_xlabel("distillation seconds (evaluations excluded)")
    ax.set_ylabel("test PSNR against the teacher (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="*", help="run folders written by 'budget3d train' (each gets every variant)")
    p.add_argument("--variants", nargs="*", default=["default:"], help="name:key=value,... (DistillConfig fields)")
    p.add_argument("--iters", type=int, default=DistillConfig.iters, help="steps unless a variant sets iters")
    p.add_argument("--onnx", action="store_true", help="also export fp32 and int8 ONNX: size, 1-thread latency, int8 loss")
    p.add_argument("--points", type=int, default=10, help="evaluations along each run")
    p.add_argument("--merge", help="comma-separated JSON files from earlier runs, merged instead of running")
    p.add_argument("--json", default="bench_distill.json")
    p.add_argument("--png", default="bench_distill.png")
    args = p.parse_args(argv)
    if args.merge:
        rows = [r for f in args.merge.split(",") for r in json.loads(Path(f).read_text())["variants"]]
        source = "merged: " + args.merge
    else:
        if not args.run:
            p.error("give a run folder (or --merge)")
        rows = []
        for run in map(Path, args.run):
            if not (run / "gaussians.ply").is_file():
                raise SystemExit(f"{run}: no gaussians.ply; give a folder written by 'budget3d train'")
            for text in args.variants:
                name, kw = parse_variant(text)
                rows.append(run_variant(run, name, kw, args.iters, args.points, args.onnx))
                r = rows[-1]
                o = r.get("onnx", {})
                ox = "" if not o else (f"  onnx {o['onnx']['size_mb']:.2f} MB {o['onnx']['latency_ms_1thread']:.1f} ms"
                                       f"  int8 {o['onnx-int8']['size_mb']:.2f} MB {o['onnx-int8']['latency_ms_1thread']:.1f} ms"
                                       f" {o['onnx-int8']['psnr_vs_fp32']:.1f} dB vs fp32, loses"
                                       f" {o['onnx-int8']['fp32_psnr_vs_teacher'] - o['onnx-int8']['psnr_vs_teacher']:.2f} dB"
                                       " vs teacher")
                print(f"{run.name:10s} {name:12s} {r['student_vs_teacher_psnr']:6.2f} dB vs teacher  "
                      f"{r['distill_seconds']:7.1f} s  {r['seconds_per_iter']:.3f} s/step  {r['frame']} frame  "
                      f"{r['threads']} threads{ox}  curve "
                      + " ".join(f"{s:.0f}s:{v:.1f}" for s, v in r["curve"]), flush=True)
        source = ", ".join(args.run)
    Path(args.json).write_text(json.dumps({"source": source, "variants": rows}, indent=1) + "\n")
    plot(rows, Path(args.png), f"NeLF distillation: {source}")
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
