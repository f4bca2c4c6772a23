"""Benchmark the "cpu" (numba) and "torch" render backends side by side, through ``render``.

Cases: random scenes like tests/test_render.py (projected sigma 0.3-3 px, opacity 0.1-0.9) with
2k Gaussians at 64x64, 10k and 50k at 256x256, and the Mip-NeRF 360 garden points
(../shared/data/garden_points/test_garden.npz; skipped with a message when absent).

For each case: forward and forward+backward milliseconds (median of --repeats after a warm-up),
the speedup over "torch", contributing pairs (sum of n_pixels) per second, cycles per contributing
pair, and peak memory; the cpu backend at each --threads count (torch.set_num_threads, which the
cpu backend follows). Also the numba compile time of a fresh process (empty cache; on all cores,
as the trainer and warmup compile, and in one process) and the load time of a second process.

    python scripts/bench_render.py [--quick] [--threads 1,2] [--json out.json] [--no-compile] [--exact-exp]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from budget3d.scene.camera import Camera  # noqa: E402
from budget3d.splat import cpu as cpu_backend  # noqa: E402
from budget3d.splat import project, render  # noqa: E402

GARDEN = REPO.parent / "shared" / "data" / "garden_points" / "test_garden.npz"

# Cost model behind the "limit" column (an estimate, stated so it can be argued with): every
# contributing (Gaussian, pixel) pair needs about 25 float ops forward (offset, sigma, exp, alpha,
# blend of 4 channels) and about 60 backward (exp again, T recovery, dL/dalpha, chain rule to 6
# parameters, 4 feature gradients); the kernels use AVX2 (8 float32 lanes; the 2-vCPU AMD EPYC
# machines have no AVX-512), and with 2 vector pipes that is (25 + 60) / 16 ~ 5.3 cycles per pair at
# perfect utilisation. The kernels also evaluate pairs that do not contribute (whole 8-pixel tile
# rows, alpha < 1/255), so a realistic limit is that figure times lanes evaluated / contributing
# pairs; both are reported.
LIMIT_CYCLES_PER_PAIR = 85 / 16


def cpu_ghz() -> tuple[float, str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":")[1]) / 1000.0, "/proc/cpuinfo 'cpu MHz'"
    except OSError:
        pass
    return 2.5, "assumed 2.5 GHz (no /proc/cpuinfo)"


def random_params(n, seed=0, spread=0.64, sigma=(0.3, 3.0), f=200.0):
    """The random scenes of tests/test_render.py (projected sigma 0.3-3 px, opacity 0.1-0.9)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 3
    xy = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * z[:, None] * spread
    sig = torch.rand(n, generator=g, dtype=torch.float64) * (sigma[1] - sigma[0]) + sigma[0]
    p = {
        "means": torch.cat([xy, z[:, None]], 1),
        "scales": torch.log(sig * z / f)[:, None].repeat(1, 3) + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64),
        "quats": torch.randn(n, 4, generator=g, dtype=torch.float64),
        "opacities": torch.logit(torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1),
        "sh0": torch.randn(n, 1, 3, generator=g, dtype=torch.float64) * 0.5,
        "shN": torch.randn(n, 15, 3, generator=g, dtype=torch.float64) * 0.1,
    }
    return {k: v.float() for k, v in p.items()}


def random_case(n, w, h):
    f = 200.0 * w / 256
    cam = Camera(f, f, w / 2, h / 2, w, h, np.eye(4))
    return {"name": f"random {n // 1000}k {w}x{h}", "params": random_params(n), "camera": cam,
            "note": "random: projected sigma 0.3-3 px, opacity 0.1-0.9, SH degree 3"}


def garden_case():
    if not GARDEN.exists():
        return None
    from budget3d.splat.knn import knn_mean_dist
    from budget3d.splat.project import rgb_to_sh0

    d = np.load(GARDEN)
    pts = d["means3d"].astype(np.float32)
    n = len(pts)
    t0 = time.perf_counter()
    nn = np.clip(knn_mean_dist(pts, k=1), 1e-6, None)  # exact nearest-neighbour distance (k-d tree)
    how = f"k-d tree, {time.perf_counter() - t0:.1f} s"
    g = torch.Generator().manual_seed(0)
    rgb = torch.as_tensor(d["colors"].astype(np.float32) / 255.0)
    params = {
        "means": torch.as_tensor(pts),
        "scales": torch.log(torch.as_tensor(nn))[:, None].repeat(1, 3),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacities": torch.logit(torch.rand(n, generator=g) * 0.4 + 0.5),
        "sh0": rgb_to_sh0(rgb)[:, None, :],
        "shN": torch.zeros(n, 0, 3),
    }
    K = d["Ks"][0].astype(np.float64)
    w2c = d["viewmats"][0].astype(np.float64)
    W, H = int(d["width"]), int(d["height"])
    cam = Camera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], W, H, w2c)
    note = (f"garden: {n} points, view 0 of {len(d['viewmats'])}, isotropic scale = nearest-neighbour "
            f"distance ({how}), opacity uniform 0.5-0.9, SH degree 0")
    return {"name": f"garden {n // 1000}k {W}x{H}", "params": params, "camera": cam, "note": note}


def _loss_weights(cam, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cam.height, cam.width, 3, generator=g)


def time_backend(case, backend, threads, repeats, warmup=1, kernel_threads=None):
    """(forward ms, forward+backward ms, contributing pairs, peak memory dict) for one backend.
    ``kernel_threads``: the cpu kernels' own thread count (cpu.num_threads), torch ops at ``threads``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu_backend.num_threads = kernel_threads
    try:
        cam = case["camera"]
        wts = _loss_weights(cam)
        bg = torch.tensor([1.0, 1.0, 1.0])

        def fwd():
            with torch.no_grad():
                return render(case["params"], cam, backend=backend, background=bg)

        def fwd_bwd():
            p = {k: v.detach().clone().requires_grad_() for k, v in case["params"].items()}
            out = render(p, cam, backend=backend, background=bg)
            ((out.image * wts).sum() + out.alpha.sum()).backward()
            return out

        for _ in range(warmup):
            out = fwd_bwd()
        pairs = int(out.n_pixels.sum())
        del out
        tf, tfb = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fwd()
            tf.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            fwd_bwd()
            tfb.append(time.perf_counter() - t0)
        # peak memory of one forward+backward: numpy/python allocations via tracemalloc (numpy
        # reports its buffers to it; torch tensors and numba's internal buffers are not seen) and
        # the growth of the process's max RSS (a high-water mark: 0 when below an earlier peak).
        gc.collect()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        fwd_bwd()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem = {"tracemalloc_peak_mb": peak / 2**20, "maxrss_delta_mb": (rss1 - rss0) / 1024}
        return statistics.median(tf) * 1e3, statistics.median(tfb) * 1e3, pairs, mem
    finally:
        torch.set_num_threads(saved)
        cpu_backend.num_threads = None


STAGES = {  # kernel -> stage of the report
    "project_sh_fwd": "project+SH fwd", "project_sh_bwd": "project+SH bwd", "prepare": "binning",
    "depth_order": "binning", "sort_params": "binning", "cull_entries": "binning", "bucket": "binning",
    "forward": "raster fwd",
    "backward": "raster bwd", "reduce_counts": "reductions", "reduce_grads": "reductions",
}


def stage_times(case, threads, repeats):
    """Median ms per stage of one cpu forward+backward through render (each numba kernel timed by a
    wrapper; 'torch + glue' = the rest: torch ops, conversions, autograd)."""
    from budget3d.splat import kernels as K

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    orig = {k: getattr(K, k) for k in STAGES}
    cur = {}

    def wrap(name, f):
        def w(*a):
            t0 = time.perf_counter()
            r = f(*a)
            cur[STAGES[name]] = cur.get(STAGES[name], 0.0) + time.perf_counter() - t0
            return r
        return w

    try:
        for k, f in orig.items():
            setattr(K, k, wrap(k, f))
        cam = case["camera"]
        wts = _loss_weights(cam)
        bg = torch.tensor([1.0, 1.0, 1.0])
        per = {}
        for i in range(repeats + 1):
            cur.clear()
            p = {k: v.detach().clone().requires_grad_() for k, v in case["params"].items()}
            t0 = time.perf_counter()
            out = render(p, cam, backend="cpu", background=bg)
            ((out.image * wts).sum() + out.alpha.sum()).backward()
            tot = time.perf_counter() - t0
            if i == 0:
                continue  # warm-up
            cur["torch + glue"] = tot - sum(cur.values())
            cur["total"] = tot
            for k, v in cur.items():
                per.setdefault(k, []).append(v)
        return {k: statistics.median(v) * 1e3 for k, v in per.items()}
    finally:
        for k, f in orig.items():
            setattr(K, k, f)
        torch.set_num_threads(saved)


def work_counts(case):
    p, cam = case["params"], case["camera"]
    with torch.no_grad():
        op = torch.sigmoid(p["opacities"])
        pr = project(p["means"], p["quats"], torch.exp(p["scales"]), op, cam.viewmat(), cam.K(), cam.width, cam.height)
        return cpu_backend.binning_stats(pr.means2d, pr.conics, op, pr.depths, pr.radii, cam.width, cam.height)


def compile_times():
    """Seconds to compile every kernel in a fresh process with an empty numba cache (on all cores, as
    warmup does, and on one), and to load them from that cache in another process."""
    code = ("import sys, time; t = time.perf_counter(); from budget3d.splat import cpu; "
            "cpu.warmup(jobs=int(sys.argv[1]) or None); print(time.perf_counter() - t)")
    out = {}
    for key, jobs in (("first_compile_s", 0), ("first_compile_1proc_s", 1)):
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, NUMBA_CACHE_DIR=d, PYTHONPATH=str(REPO))
            for k in (key, "cached_load_s"):
                r = subprocess.run([sys.executable, "-c", code, str(jobs)], env=env, capture_output=True, text=True,
                                   cwd=REPO)
                if r.returncode != 0:
                    return {"error": r.stderr[-2000:]}
                out[k] = float(r.stdout.strip().splitlines()[-1])
    out["note"] = ("import + compile (or cache load) + one tiny forward/backward, each in a new process; "
                   "first_compile_s on all cores (helper processes, see pool.compile_all)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small cases only (2k 64x64, 10k 256x256)")
    ap.add_argument("--threads", default=None, help="cpu-backend thread counts, e.g. 1,2 (default: 1 and all cores)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats for the cpu backend (median)")
    ap.add_argument("--torch-repeats", type=int, default=2, help="timed repeats for the torch backend")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-compile", action="store_true", help="skip the fresh-process compile timing")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch backend")
    ap.add_argument("--exact-exp", action="store_true",
                    help="cpu backend: libm exp everywhere (cpu.exact_exp; default: polynomial exp + exact fix-up)")
    args = ap.parse_args()
    cpu_backend.exact_exp = args.exact_exp

    ncores = torch.get_num_threads()
    threads = sorted({int(t) for t in args.threads.split(",")}) if args.threads else sorted({1, ncores})
    ghz, ghz_src = cpu_ghz()
    t0 = time.perf_counter()
    warm_s = cpu_backend.warmup()
    print(f"cpu backend warm-up in this process (cache load or compile): {warm_s:.2f} s")
    comp = None
    if not args.no_compile:
        comp = compile_times()
        if "error" in comp:
            print("compile timing failed:", comp["error"])
        else:
            print(f"numba compile, fresh process: {comp['first_compile_s']:.1f} s on all cores "
                  f"({comp['first_compile_1proc_s']:.1f} s in one process); cached load, second process: "
                  f"{comp['cached_load_s']:.2f} s")

    cases = [random_case(2000, 64, 64), random_case(10000, 256, 256)]
    if not args.quick:
        cases.append(random_case(50000, 256, 256))
        g = garden_case()
        if g is None:
            print(f"garden case skipped: {GARDEN} not found")
        else:
            cases.append(g)

    results = []
    for case in cases:
        print(f"\n== {case['name']}  ({case['note']})")
        wc = work_counts(case)
        row = {"case": case["name"], "note": case["note"], **wc, "cpu": {}}
        if not args.no_torch:
            f, fb, pairs, mem = time_backend(case, "torch", ncores, args.torch_repeats)
            row["torch"] = {"threads": ncores, "fwd_ms": f, "fwd_bwd_ms": fb, "mem": mem}
            row["pairs"] = pairs
            print(f"  torch   x{ncores}: fwd {f:9.1f} ms  fwd+bwd {fb:9.1f} ms  mem {mem}")
        runs = [(str(t), t, None) for t in threads]
        runs += [(f"{t}k", 1, t) for t in threads if t > 1]  # kernels on t threads, torch ops on 1
        for label, t, kt in runs:
            f, fb, pairs, mem = time_backend(case, "cpu", t, args.repeats, kernel_threads=kt)
            t = kt or t
            row["pairs"] = pairs
            r = {"threads": t, "torch_threads": 1 if kt else t, "fwd_ms": f, "fwd_bwd_ms": fb, "mem": mem,
                 "pairs_per_s_fwd_bwd": pairs / (fb / 1e3),
                 "cycles_per_pair_fwd_bwd": fb / 1e3 * ghz * 1e9 * t / max(pairs, 1)}
            if "torch" in row:
                r["speedup_fwd"] = row["torch"]["fwd_ms"] / f
                r["speedup_fwd_bwd"] = row["torch"]["fwd_bwd_ms"] / fb
            row["cpu"][label] = r
            sp = f"  speedup fwd {r['speedup_fwd']:6.1f}x  fwd+bwd {r['speedup_fwd_bwd']:6.1f}x" if "torch" in row else ""
            print(f"  cpu     x{label:3s}: fwd {f:9.2f} ms  fwd+bwd {fb:9.2f} ms{sp}  "
                  f"{r['pairs_per_s_fwd_bwd'] / 1e6:6.1f} Mpairs/s  {r['cycles_per_pair_fwd_bwd']:5.1f} cyc/pair  mem {mem}")
        row["cpu_stages_ms"] = {str(t): stage_times(case, t, args.repeats) for t in threads}
        print("  stages (ms, fwd+bwd):", "  ".join(
            f"x{t}: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()) for t, st in row["cpu_stages_ms"].items()))
        row["limit_cycles_per_pair"] = LIMIT_CYCLES_PER_PAIR
        row["limit_cycles_per_pair_with_waste"] = LIMIT_CYCLES_PER_PAIR * wc["lanes"] / max(row["pairs"], 1)
        results.append(row)

    # table
    print("\n" + "=" * 110)
    print(f"CPU: {platform.processor() or platform.machine()}, {ncores} threads, {ghz:.2f} GHz ({ghz_src}); "
          f"times are medians in ms, through budget3d.splat.render; 'cpu xN' = kernels and torch ops on N "
          f"threads, 'cpu xNk' = kernels on N threads, torch ops (projection, SH, autograd) on 1")
    hdr = f"{'case':22s} {'backend':9s} {'fwd':>9s} {'fwd+bwd':>9s} {'x fwd':>7s} {'x f+b':>7s} {'Mpair/s':>8s} {'cyc/pair':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for row in results:
        if "torch" in row:
            t = row["torch"]
            print(f"{row['case']:22s} {'torch x' + str(t['threads']):9s} {t['fwd_ms']:9.1f} {t['fwd_bwd_ms']:9.1f}")
        for k, r in row["cpu"].items():
            sp = (f"{r['speedup_fwd']:7.1f} {r['speedup_fwd_bwd']:7.1f}" if "speedup_fwd" in r else f"{'':7s} {'':7s}")
            print(f"{row['case']:22s} {'cpu x' + k:9s} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:9.2f} {sp} "
                  f"{r['pairs_per_s_fwd_bwd'] / 1e6:8.1f} {r['cycles_per_pair_fwd_bwd']:8.1f}")
        print(f"{'':22s} pairs {row['pairs']:,}  entries {row['entries']:,}  lanes evaluated {row['lanes']:,}  "
              f"limit ~{row['limit_cycles_per_pair']:.1f} cyc/pair ideal, "
              f"~{row['limit_cycles_per_pair_with_waste']:.1f} with the evaluated-lane waste")
    print("\nper stage, cpu forward+backward (ms, medians; threads side by side)")
    for row in results:
        sts = row["cpu_stages_ms"]
        keys = list(next(iter(sts.values())).keys())
        print(f"{row['case']:22s} " + "  ".join(f"{'x' + t:>6s}" for t in sts))
        for k in keys:
            print(f"  {k:20s} " + "  ".join(f"{sts[t].get(k, 0.0):6.1f}" for t in sts))
    print(f"total bench time {time.perf_counter() - t0:.0f} s")

    if args.json:
        out = {"cpu_ghz": ghz, "cpu_ghz_source": ghz_src, "threads_available": ncores, "threads": threads,
               "compile": comp, "warmup_in_process_s": warm_s, "exact_exp": cpu_backend.exact_exp,
               "memory_note": "tracemalloc peak (numpy buffers; not torch tensors or numba-internal buffers) and "
                              "ru_maxrss growth over one forward+backward",
               "limit_note": "see LIMIT_CYCLES_PER_PAIR in scripts/bench_render.py",
               "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print("wrote", args.json)


if __name__ == "__main__":
    main()
