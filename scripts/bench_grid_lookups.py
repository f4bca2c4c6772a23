#!/usr/bin/env python
"""The grid student's ONNX graph with its feature planes read by GridSample against the corner-packed
Gather the exporter writes (``budget3d.nelf.students.grid.triplane_gather``): 1-thread onnxruntime
latency of both graphs, run interleaved in one process (a busy neighbour slows both alike, so the
ratio holds), and the largest difference between their images.

    python scripts/bench_grid_lookups.py RUN                 # RUN/nelf/student.pt: a grid student
    python scripts/bench_grid_lookups.py RUN --rounds 10 --resolution 248x248
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from budget3d.export.onnx import export_torch, pose_model
    from budget3d.export.ortrun import run_poses, session
    from budget3d.nelf.students import load_student

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder with a distilled grid student (RUN/nelf/student.pt)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--resolution", help="WxH (default: the student's)")
    args = p.parse_args(argv)
    model, payload = load_student(Path(args.run) / "nelf" / "student.pt")
    if not hasattr(model, "export_lookups"):
        raise SystemExit(f"{args.run}: the student is not a grid student")
    res = tuple(int(v) for v in args.resolution.split("x")) if args.resolution else None
    sessions, outs = {}, {}
    pose = np.eye(4, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for name, gather in (("GridSample", False), ("Gather", True)):
            module = pose_model(model, payload, res)
            module.model.export_lookups = gather
            path = Path(tmp) / f"{name}.onnx"
            export_torch(module, path)
            sessions[name] = session(path, threads=1)
            pose[:3, 3] = module.model.frame.centre.numpy()  # at the scene's centre: every ray crosses the ball
            outs[name] = run_poses(sessions[name], [pose])[0]
        times = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                run_poses(s, [pose])
                times[k].append(1e3 * (time.perf_counter() - t))
    med = {k: statistics.median(v[1:] or v) for k, v in times.items()}
    w, h = res or payload["resolution"]
    print(f"{w}x{h}, 1 thread, {args.rounds} rounds: GridSample {med['GridSample']:.1f} ms, "
          f"Gather {med['Gather']:.1f} ms, {med['GridSample'] / med['Gather']:.2f}x; "
          f"max |difference| {float(np.abs(outs['GridSample'] - outs['Gather']).max()):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
