"""Each splat format's size and quality loss on a trained run: the table in docs/export.md.

For every format ``budget3d export`` writes (ply, splat, spz, sog, glb, compressed-ply) this writes
the run's Gaussians into a temporary folder (as ``budget3d export`` does), reads the file back with
our readers and renders what it decodes to on every test view of the run's scene with the CPU
renderer, at the run's own resolution and SH degree. It prints a markdown table: file size, bytes
per Gaussian, size against the .ply, write time, test PSNR against the ground truth, the loss
against the .ply's PSNR, and the PSNR of the format's render against the .ply's render.

    python scripts/splat_formats_table.py RUN [RUN ...] [--views N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from budget3d.export.sog import sog_size
from budget3d.export.splats import FILES, load_any, save_any
from budget3d.runfolder import load_run_scene, read_config
from budget3d.runtime import psnr
from budget3d.splat import load_ply, render


def measure(run: Path, max_views: int = 0) -> dict:
    params = load_ply(run / "gaussians.ply")
    cfg = read_config(run)
    scene = load_run_scene(run)
    views = scene.test or scene.train[:3]
    if max_views and len(views) > max_views:
        views = [views[round(i * (len(views) - 1) / (max_views - 1))] for i in range(max_views)]
    bg = torch.as_tensor(scene.background, dtype=torch.float32)
    deg = cfg.get("sh_degree")
    gts = [torch.as_tensor(v.image(), dtype=torch.float32) / 255 for v in views]

    def images(p):
        with torch.no_grad():
            return [render(p, v.camera, backend="cpu", sh_degree=deg, background=bg).image.clamp(0, 1) for v in views]

    rows, ref = [], None
    with tempfile.TemporaryDirectory(prefix="budget3d-formats-") as tmp:
        for fmt, name in FILES.items():
            path = Path(tmp) / name
            t0 = time.perf_counter()
            save_any(params, path, fmt)
            seconds = time.perf_counter() - t0
            size = sog_size(path) if fmt == "sog" else path.stat().st_size
            imgs = images({k: v.float() for k, v in load_any(path).items()})
            if fmt == "ply":
                ref = imgs
            rows.append({"format": fmt, "bytes": size, "write_s": round(seconds, 2),
                         "psnr": sum(psnr(a, b) for a, b in zip(imgs, gts)) / len(gts),
                         "psnr_vs_ply": sum(min(psnr(a, b), 99.0) for a, b in zip(imgs, ref)) / len(ref)})
    ply = rows[0]
    for r in rows:
        r["loss_db"] = ply["psnr"] - r["psnr"]
        r["x_smaller"] = ply["bytes"] / r["bytes"]
    n = len(params["means"])
    return {"run": str(run), "gaussians": n, "sh_degree": deg, "views": len(views),
            "resolution": [views[0].camera.width, views[0].camera.height], "rows": rows}


def table(m: dict) -> str:
    out = [f"{Path(m['run']).name}: {m['gaussians']:,} Gaussians, SH degree {m['sh_degree']}, {m['views']} test "
           f"views at {m['resolution'][0]}x{m['resolution'][1]}", "",
           "| format | size | bytes / Gaussian | x smaller than .ply | write s | test PSNR | loss vs .ply | "
           "PSNR vs .ply render |", "|---|---|---|---|---|---|---|---|"]
    for r in m["rows"]:
        size = f"{r['bytes'] / 1e6:.3f} MB" if r["bytes"] >= 1e5 else f"{r['bytes'] / 1e3:.1f} kB"
        vs = "lossless" if r["format"] == "ply" else (">= 99" if r["psnr_vs_ply"] >= 98.9 else f"{r['psnr_vs_ply']:.2f}")
        out.append(f"| `{r['format']}` | {size} | {r['bytes'] / m['gaussians']:.1f} | {r['x_smaller']:.1f} | "
                   f"{r['write_s']:.2f} | {r['psnr']:.2f} | {r['loss_db']:.3f} dB | {vs} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--views", type=int, default=0, help="at most N test views, evenly spaced (default: all)")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args(argv)
    results = []
    for run in args.runs:
        m = measure(run, args.views)
        results.append(m)
        print(table(m), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
