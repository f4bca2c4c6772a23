"""Inspect, render or convert any splat file budget3d reads (a SuperSplat .sog, a Cesium .glb, ...).

    python scripts/splat_convert.py IN                      # format, count, SH degree, bounds, size
    python scripts/splat_convert.py IN OUT                  # convert; OUT's name picks the format
    python scripts/splat_convert.py IN --render view.png    # one view from outside, our CPU renderer

IN: .ply, .compressed.ply, .splat, .spz, .sog (or a SOG folder / meta.json), .glb / .gltf. OUT:
gaussians.ply (a run folder's file, so ``budget3d eval`` / ``view`` can use it), .splat, .spz,
.sog, a folder's meta.json (SOG folder), .glb, .compressed.ply.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.export.sog import sog_size
from budget3d.export.splats import format_of, load_any, look_at, save_any, sniff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--render", type=Path, metavar="PNG", help="write one 512x512 view from outside the splats")
    args = ap.parse_args(argv)
    try:
        kind = sniff(args.src)
        p = load_any(args.src)
        m = p["means"]
        deg = int(round((p["shN"].shape[1] + 1) ** 0.5)) - 1
        size = sog_size(args.src) if kind == "sog" else args.src.stat().st_size
        lo, hi = m.min(0).values.tolist(), m.max(0).values.tolist()
        print(f"{args.src}: {kind}, {len(m):,} Gaussians, SH degree {deg}, {size / 1e6:.3f} MB")
        print(f"bounds (the .ply's axes): min {np.round(lo, 3).tolist()} max {np.round(hi, 3).tolist()}")
        print(f"opacity: median {float(torch.sigmoid(p['opacities']).median()):.3f}; "
              f"scale: median {float(p['scales'].exp().median()):.4g}")
        if args.out:
            if format_of(args.out) is None:
                raise UserError(f"{args.out}: unknown output format; name it .ply, .splat, .spz, .sog, meta.json, "
                                ".glb or .compressed.ply")
            n = save_any(p, args.out)
            out_size = sog_size(args.out) if format_of(args.out) == "sog" else args.out.stat().st_size
            print(f"wrote {args.out}: {format_of(args.out)}, {n:,} Gaussians, {out_size / 1e6:.3f} MB")
        if args.render:
            from budget3d.runtime import write_png
            from budget3d.splat import render

            centre = m.median(0).values.double().numpy()
            radius = 1.5 * float(torch.quantile(m[:: max(1, len(m) // 100_000)], 0.95, dim=0).sub(
                torch.quantile(m[:: max(1, len(m) // 100_000)], 0.05, dim=0)).norm())
            cam = look_at(centre + radius * np.array([0.6, -0.5, -0.62]), centre, 512)
            with torch.no_grad():
                img = render({k: v.float() for k, v in p.items()}, cam, backend="cpu").image.clamp(0, 1)
            write_png(args.render, (img.numpy() * 255).round().astype(np.uint8))
            print(f"wrote {args.render}")
    except UserError as e:
        print(f"splat_convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
