#!/usr/bin/env python
"""Training on N CPU processes (torchrun, gloo, the Gaussians sharded) against one process
rendering the same N views per step (``--batch N``), same steps, seed and budget, side by side in
one run: test PSNR, final count, wall and training seconds, bytes each rank sends per step (the
sharded render's exchange, forward and backward), peak memory per rank.

    python scripts/bench_distributed.py                          # bundled scene, 2 processes
    python scripts/bench_distributed.py --data ../shared/data/lego --downscale 4 --budget 30k \\
        --nprocs 2,4 --json docs/distributed_lego.json

Each process gets cores / N threads (torchrun's ranks share the machine), the single process all
of them, so the wall times compare what the same machine does either way.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, nproc: int, batch: int, common: list, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    train = ["-m", "budget3d", "train", "--out", str(out), "--quiet", "--batch", str(batch), *common]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
                               str(free_port())] if nproc > 1 else []) + train
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    per_rank = m.get("per_rank") or [{"peak_memory_mb": m.get("peak_memory_mb"), "bytes_sent_per_step": 0}]
    return {"processes": nproc, "views_per_step": nproc * batch, "psnr": m["psnr"], "ssim": m.get("ssim"),
            "num_gaussians": m["num_gaussians"], "wall_seconds": round(wall, 1), "train_seconds": m["train_seconds"],
            "bytes_sent_per_step_per_rank": [r["bytes_sent_per_step"] for r in per_rank],
            "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in per_rank], "shard_counts": m.get("shard_counts")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="scene folder (default: the bundled scene)")
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--budget", default="3000")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--nprocs", default="2", help="comma-separated process counts to compare with one process")
    p.add_argument("--eval-views", type=int, default=0)
    p.add_argument("--out", default="runs/bench_distributed")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    from budget3d.demo import bundled_scene

    data = a.data or str(bundled_scene())
    cores = os.cpu_count() or 1
    common = ["--data", data, "--downscale", str(a.downscale), "--budget", a.budget, "--iters", str(a.iters),
              "--checkpoint-every", "0", "--eval-max-views", str(a.eval_views), "--save-renders", "false"]
    rows = []
    for n in [int(x) for x in a.nprocs.split(",")]:
        for nproc, batch in ((1, n), (n, 1)):
            out = Path(a.out) / f"{Path(data).name}-p{nproc}-b{batch}"
            row = run(out, nproc, batch, common, max(1, cores // nproc))
            rows.append(row)
            print(f"{nproc} process(es) x {batch} view(s): {row['psnr']:.2f} dB, {row['num_gaussians']} Gaussians, "
                  f"{row['wall_seconds']:.0f} s wall ({row['train_seconds']:.0f} s training), "
                  f"{max(row['bytes_sent_per_step_per_rank']) / 1e6:.2f} MB sent per step per rank, "
                  f"peak {max(row['peak_memory_mb_per_rank'])} MB per rank", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"scene": data, "downscale": a.downscale, "budget": a.budget,
                                            "iters": a.iters, "cores": cores, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
