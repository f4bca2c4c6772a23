"""NeLF latency goals, side by side in one process: the paper net (mobile-r2l: GELU, ConvTranspose
super-resolution) against the int8-friendly one (mobile-int8: ReLU, conv + PixelShuffle), each as
ONNX fp32 and int8 (budget3d.export.onnx's recipe: QDQ, per-channel, QUInt8 activations, the
encoding and the RGB tail in float, NHWC pixel shuffles), at 800x800 and 1 thread, random weights
(latency does not depend on the values). The sessions run interleaved, one frame each per round, so a busy neighbour
slows them alike and the ratios hold even when the absolute numbers do not.

    python scripts/bench_nelf_latency.py                     # 800x800, 1 thread, ~3-5 min on 2 cores
    python scripts/bench_nelf_latency.py --resolution 400x400 --rounds 5   # a quick look

Goal (the issue): mobile-int8 int8 at <= 0.3x the paper net's fp32 latency, its file <= 5 MB.
The quality half of the goals (int8 within 0.3 dB of its own fp32 on test views; mixed precision
beating plain int8) needs a distilled student: ``budget3d bench RUN`` on a real run.
Writes the numbers as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from budget3d.export.measure import measure, ort_session, profile_onnx
from budget3d.export.onnx import export_torch, pose_model
from budget3d.export.ortrun import INPUT, size_mb
from budget3d.export.quantize import encoding_nodes, quantize, tail_nodes
from budget3d.nelf.students.r2l import build, count_params, macs_per_frame
from budget3d.scene.camera import look_at_w2c

PRESETS = ("mobile-r2l", "mobile-int8")
N_POINTS, FREQS = 8, 6


def look_at_c2w(eye, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """OpenCV-axes camera-to-world looking from ``eye`` at ``target`` (z up in the world)."""
    return np.linalg.inv(look_at_w2c(eye, target, (0.0, 0.0, 1.0))).astype(np.float32)


def poses(n: int, radius: float = 4.0) -> list:
    return [look_at_c2w((radius * math.cos(a), radius * math.sin(a), 1.0)) for a in np.linspace(0, 2 * math.pi, n,
                                                                                                  endpoint=False)]


def random_student(preset: str, seed: int):
    torch.manual_seed(seed)
    model = build(preset, in_ch=3 * N_POINTS * (2 * FREQS + 1)).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding does something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def make_files(preset: str, res: tuple, folder: Path, calib: list, seed: int, float_head: bool = False) -> dict:
    model = random_student(preset, seed)
    w, h = res
    f = 1.1 * w
    payload = {"intrinsics": [f, f, w / 2, h / 2], "resolution": [w, h], "near": 2.0, "far": 6.0,
               "n_points": N_POINTS, "freqs": FREQS}
    fp32 = folder / f"{preset}-fp32.onnx"
    int8 = folder / f"{preset}-int8.onnx"
    t = time.perf_counter()
    export_torch(pose_model(model, payload, res), fp32)
    t_export = time.perf_counter() - t
    enc, convs = encoding_nodes(fp32)
    enc = list(enc) + tail_nodes(fp32)  # export.onnx's default: the RGB tail in float
    t = time.perf_counter()
    quantize(fp32, int8, calib, exclude=list(enc))  # export.onnx's default recipe
    t_quant = time.perf_counter() - t
    out = {"fp32": fp32, "int8": int8, "params": count_params(model), "gmac": macs_per_frame(model, h, w) / 1e9,
           "export_s": round(t_export, 1), "quantize_s": round(t_quant, 1)}
    if float_head:  # export.onnx's quantize_head=False: the head conv kept float
        out["int8-float-head"] = folder / f"{preset}-int8-float-head.onnx"
        quantize(fp32, out["int8-float-head"], calib, exclude=list(enc) + [convs[0]])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--resolution", default="800x800", help="output WxH (default 800x800)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--rounds", type=int, default=12, help="timed rounds, one frame of each file per round")
    ap.add_argument("--calib", type=int, default=2, help="calibration poses for int8 (default 2)")
    ap.add_argument("--no-profile", action="store_true", help="skip onnxruntime's per-operator profile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--presets", default=",".join(PRESETS),
                    help="comma-separated presets; ratios are against the first one's fp32 (default: %(default)s)")
    args = ap.parse_args(argv)
    presets = [x.strip() for x in args.presets.split(",") if x.strip()]
    w, h = (int(v) for v in args.resolution.lower().split("x"))
    torch.set_num_threads(args.threads)  # the export and calibration too: the numbers stay 1-core
    eval_poses, calib = poses(4), poses(args.calib + 4)[4:]
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    results = {"resolution": [w, h], "threads": args.threads, "weights": "random", "variants": {}}
    with tempfile.TemporaryDirectory(prefix="nelf-latency-") as tmp:
        files = {}
        for preset in presets:
            print(f"exporting {preset} at {w}x{h} (fp32, then int8 calibrated on {len(calib)} poses) ...",
                  file=sys.stderr, flush=True)
            files[preset] = make_files(preset, (w, h), Path(tmp), calib, args.seed, float_head=preset == "mobile-int8")
        runners, sessions = {}, {}
        for preset in presets:
            for dt in [k for k in ("fp32", "int8", "int8-float-head") if k in files[preset]]:
                name = f"{preset} {dt}"
                sess = ort_session(files[preset][dt], args.threads)
                sessions[name] = sess
                feeds = [{INPUT: p} for p in eval_poses]
                runners[name] = (lambda s, fs: (lambda i: s.run(None, fs[i])))(sess, feeds)
        print(f"timing {len(runners)} files interleaved, {args.rounds} rounds ...", file=sys.stderr, flush=True)
        stats = measure(runners, len(eval_poses), rounds=args.rounds, min_rounds=args.rounds, budget_s=0)
        base = stats[f"{presets[0]} fp32"]["median"]
        for preset in presets:
            for dt in [k for k in ("fp32", "int8", "int8-float-head") if k in files[preset]]:
                name = f"{preset} {dt}"
                row = {"preset": preset, "dtype": dt, "size_mb": round(size_mb(files[preset][dt]), 3),
                       "params": files[preset]["params"], "gmac": round(files[preset]["gmac"], 1), **stats[name],
                       "vs_paper_fp32": round(stats[name]["median"] / base, 3)}
                if not args.no_profile:
                    prof = profile_onnx(files[preset][dt], eval_poses, Path(tmp) / name.replace(" ", "-"), runs=2, top=3)
                    row["top_ops"] = prof["top_ops"]
                results["variants"][name] = row
    v = results["variants"]
    goals = {"mobile-r2l fp32", "mobile-r2l int8", "mobile-int8 fp32", "mobile-int8 int8", "mobile-int8 int8-float-head"} <= set(v)
    results["ratios"] = {}
    if goals:  # the pair
        results["ratios"] = {
            "paper_int8_vs_fp32": round(v["mobile-r2l int8"]["median"] / base, 3),
            "mobile_int8_fp32_vs_paper_fp32": round(v["mobile-int8 fp32"]["median"] / base, 3),
            "mobile_int8_int8_vs_paper_fp32": round(v["mobile-int8 int8"]["median"] / base, 3),
            "mobile_int8_int8_vs_its_fp32": round(v["mobile-int8 int8"]["median"] / v["mobile-int8 fp32"]["median"], 3),
            "mobile_int8_int8_float_head_vs_paper_fp32": round(v["mobile-int8 int8-float-head"]["median"] / base, 3),
        }
        goal_lat = results["ratios"]["mobile_int8_int8_vs_paper_fp32"] <= 0.3
        goal_mb = v["mobile-int8 int8"]["size_mb"] <= 5.0
        results["goals"] = {"mobile_int8_int8_le_0.3x_paper_fp32": goal_lat, "mobile_int8_int8_file_le_5mb": goal_mb}

    print(f"\n{w}x{h}, {args.threads} thread(s), random weights, onnxruntime, interleaved rounds")
    print(f"{'file':<21} {'MB':>6} {'GMAC':>6} {'median ms':>10} {'p90 ms':>8} {'cpu/wall':>8} {'x paper fp32':>13}  top ops")
    for name, r in v.items():
        ops = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in r.get("top_ops", []))
        print(f"{name:<21} {r['size_mb']:>6.2f} {r['gmac']:>6.1f} {r['median']:>10.1f} {r['p90']:>8.1f} "
              f"{r['cpu_per_wall']:>8.2f} {r['vs_paper_fp32']:>13.3f}  {ops}")
    if goals:
        print("\nratios: " + "  ".join(f"{k} {x:.3f}" for k, x in results["ratios"].items()))
        print(f"goal mobile-int8 int8 <= 0.3x paper fp32: {'MET' if goal_lat else 'NOT MET'} "
              f"({results['ratios']['mobile_int8_int8_vs_paper_fp32']:.3f}x); file <= 5 MB: "
              f"{'MET' if goal_mb else 'NOT MET'} ({v['mobile-int8 int8']['size_mb']:.2f} MB; with the head kept float "
              f"{v['mobile-int8 int8-float-head']['size_mb']:.2f} MB, "
              f"{results['ratios']['mobile_int8_int8_float_head_vs_paper_fp32']:.3f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
