#!/usr/bin/env python
"""Render strips of several runs of one scene side by side: ground truth, then each run's render.

Each run folder's ``renders/*.png`` holds ground truth | render per test view; this stacks the
same views of every run into one PNG (one row per view) with the runs' test PSNR in a header.

    python scripts/compare_renders.py runs/before runs/after --views 3 --out strip.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by 'budget3d train' (same scene)")
    p.add_argument("--views", type=int, default=3, help="how many test views (evenly spaced)")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    names = sorted(f.name for f in (Path(args.runs[0]) / "renders").glob("*.png"))
    if not names:
        print(f"compare_renders: error: {args.runs[0]}/renders has no PNGs; train with save_renders on",
              file=sys.stderr)
        return 2
    pick = [names[i] for i in np.linspace(0, len(names) - 1, min(args.views, len(names))).round().astype(int)]
    rows = []
    for name in pick:
        tiles = []
        for k, run in enumerate(args.runs):
            img = cv2.imread(str(Path(run) / "renders" / name))
            if img is None:
                print(f"compare_renders: error: {run}/renders/{name} is missing", file=sys.stderr)
                return 2
            w = img.shape[1] // 2
            tiles += [img[:, :w]] if k == 0 else []
            tiles.append(img[:, w:])
        rows.append(np.concatenate(tiles, 1))
    strip = np.concatenate(rows, 0)
    w = rows[0].shape[1] // (len(args.runs) + 1)
    head = np.full((28, strip.shape[1], 3), 255, np.uint8)
    labels = ["ground truth"] + [f"{Path(r).name} {_psnr(r)}" for r in args.runs]
    for i, text in enumerate(labels):
        cv2.putText(head, text, (i * w + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(args.out, np.concatenate([head, strip], 0))
    print(f"wrote {args.out}")
    return 0


def _psnr(run) -> str:
    try:
        m = json.loads((Path(run) / "metrics.json").read_text())
        return f"{m['psnr']:.2f} dB"
    except (OSError, ValueError, KeyError):
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
