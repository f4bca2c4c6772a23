"""``budget3d bench RUN``: every variant a run folder holds, measured the same way, side by side.

Variants (each only when its file is in the run; the printout says how to make the missing):
``3dgs`` (RUN/gaussians.ply on our CPU renderer; it is the NeLF's teacher), ``3dgs-splat`` /
``-spz`` / ``-sog`` / ``-glb`` / ``-compressed-ply`` (RUN/export/gaussians.splat / .spz / .sog /
.glb / .compressed.ply: what each file decodes to, on the same renderer, so its PSNR against the
teacher is the format's loss), ``nelf-torch`` (RUN/nelf/student.pt in torch fp32, BatchNorm folded),
``onnx-fp32`` / ``onnx-int8`` / ``onnx-mixed`` (RUN/export/nelf*.onnx in onnxruntime), ``pte``
(RUN/export/nelf.pte in ExecuTorch/XNNPACK, when ExecuTorch is installed).

Quality: on the run's test views (the first 3 training views when it has none) at the variant's
own output resolution (the ONNX files' export size; the 3DGS and torch variants at the NeLF's
size, so every row compares the same pixels): mean over views of PSNR / SSIM against the ground
truth (area-downsampled as in distillation, so ``nelf-torch`` reproduces nelf/metrics.json) and
against the teacher (the 3dgs render), and for the NeLF variants against the float graph.

Latency (median and p90 ms per frame at each thread count and output resolution), memory
(``peak_mem_mb``) and, for the ONNX variants, the top operators are measured by
``budget3d.export.measure``; its docstring says how (interleaving, thread limits, the temporary
ONNX files at other resolutions, the peak-RSS reset, the profiler pass).

Writes RUN/bench.json and RUN/bench.png (PSNR against latency and against file size).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from budget3d.errors import UserError
from budget3d.export import ONNX_FILES
from budget3d.export.measure import (Bench, measure, onnx_variant, peak_growth_mb, profile_onnx, pte_variant, res_key,
                                     splat_variant, torch_variant)

SPLAT_FILES = {"3dgs-splat": "gaussians.splat", "3dgs-spz": "gaussians.spz", "3dgs-sog": "gaussians.sog",
               "3dgs-glb": "gaussians.glb", "3dgs-compressed-ply": "gaussians.compressed.ply"}
ORDER = ("3dgs", *SPLAT_FILES, "nelf-torch", "onnx-fp32", "onnx-int8", "onnx-mixed", "pte")
HOW = {
    "3dgs": "budget3d train --out RUN",
    **{k: f"budget3d export RUN --format {k[len('3dgs-'):]}" for k in SPLAT_FILES},
    "nelf-torch": "budget3d distill RUN",
    "onnx-fp32": "budget3d export RUN --format onnx",
    "onnx-int8": "budget3d export RUN --format onnx-int8",
    "onnx-mixed": "budget3d export RUN --format onnx-mixed",
    "pte": "budget3d export RUN --format pte",
}


def add_arguments(p):
    p.add_argument("run", help="run folder written by 'budget3d train' (and distill / export for the NeLF variants)")
    p.add_argument("--quick", action="store_true",
                   help="5 frames per figure, each variant's own resolution only, 12 views (~15 s on the demo)")
    p.add_argument("--threads", default="1,2", metavar="N[,N...]", help="thread counts to measure (default 1,2)")
    p.add_argument("--resolutions", metavar="WxH[,WxH...]",
                   help="output sizes for latency, besides each variant's own (default: the NeLF's size / 2 and / 4)")
    p.add_argument("--views", type=int, metavar="N", help="test views for quality, evenly spaced (default 24, quick 12)")
    p.add_argument("--data", metavar="PATH", help="the run's scene folder, when it moved (default: the one the run's "
                                                  "config.json names)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    try:
        threads = tuple(sorted({int(t) for t in str(args.threads).split(",") if t.strip()}))
    except ValueError:
        threads = ()
    if not threads or min(threads) < 1:
        raise UserError(f"--threads {args.threads}: expected thread counts such as 1,2")
    res = None
    if args.resolutions:
        res = [_parse_wh(t) for t in str(args.resolutions).split(",") if t.strip()]
    if args.views is not None and args.views < 1:
        raise UserError(f"--views {args.views}: expected at least one view")
    result = run_bench(args.run, quick=args.quick, threads=threads, resolutions=res, progress=not args.quiet,
                       max_views=args.views, data=args.data)
    print(table(result))
    for line in notes(result):
        print(line)
    print(f"files:   {Path(args.run) / 'bench.json'}, {Path(args.run) / 'bench.png'}")
    return 0


def _parse_wh(text) -> tuple[int, int]:
    if isinstance(text, (tuple, list)):
        w, h = (int(v) for v in text)
    else:
        try:
            w, h = (int(v) for v in str(text).lower().strip().split("x"))
        except ValueError:
            raise UserError(f"--resolutions {text!r}: expected WIDTHxHEIGHT, e.g. 64x64") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--resolutions {text!r}: width and height must be positive")
    return w, h


def _runtime(name: str) -> str:
    return "onnxruntime" if name.startswith("onnx") else ("executorch" if name == "pte" else "torch")


def _rel(path: Path, run: Path) -> str:
    """``path`` relative to the run folder when inside it (the JSON stays true when the run moves)."""
    try:
        return str(Path(path).resolve().relative_to(Path(run).resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- the bench


def _check_run(run_dir) -> Path:
    from budget3d.runfolder import read_config

    run = Path(run_dir)
    read_config(run)
    if not (run / "gaussians.ply").is_file() and not (run / "nelf" / "student.pt").is_file():
        raise UserError(f"{run}: nothing to measure (no gaussians.ply, no nelf/student.pt); finish 'budget3d train' "
                        "on it first")
    return run


def inventory(run: Path) -> tuple[dict, list]:
    """(name -> file for the variants present, names missing)."""
    from budget3d.export import pte

    files = {"3dgs": run / "gaussians.ply", "nelf-torch": run / "nelf" / "student.pt"}
    files.update({k: run / "export" / v for k, v in SPLAT_FILES.items()})
    files.update({("onnx-fp32" if k == "onnx" else k): run / "export" / v for k, v in ONNX_FILES.items()})
    files["pte"] = run / "export" / pte.FILENAME
    present = {k: files[k] for k in ORDER if files[k].is_file()}
    if "pte" in present and not pte.available():
        present.pop("pte")
    return present, [k for k in ORDER if k not in present]


def _metrics(imgs: list, refs: list) -> tuple[float, float]:
    """Mean over views of PSNR and SSIM (gaussian window 11, as budget3d.train.metrics.ssim), the
    SSIM of all views in one batched call."""
    import torch
    from pytorch_msssim import ssim

    from budget3d.runtime import psnr

    p = [psnr(a, r) for a, r in zip(imgs, refs)]
    nchw = lambda xs: torch.stack([x.clamp(0, 1) for x in xs]).permute(0, 3, 1, 2)  # noqa: E731
    s = ssim(nchw(imgs), nchw(refs), data_range=1.0, size_average=False)
    pm = float(sum(p) / len(p))
    return (pm if math.isfinite(pm) else None), float(s.mean())


def run_bench(run_dir, *, quick: bool = False, threads=(1, 2), resolutions=None, progress: bool = True,
              max_views: int = None, data=None) -> dict:
    """Measure every variant present in ``run_dir``; writes RUN/bench.json and RUN/bench.png and
    returns the JSON's dict (``variants``: one dict per variant with ``name``, ``file``,
    ``size_mb``, ``resolution``, ``psnr``, ``ssim``, ``psnr_vs_teacher``, ``ssim_vs_teacher``,
    ``latency_ms`` {"1": {"median", "p90", "n", "cpu_per_wall"}, ...} at its own resolution,
    ``latency_by_resolution`` {"WxH": {...}}, ``peak_mem_mb``, for ONNX ``top_ops``/``top_nodes``).
    ``quick``: 5 frames per measurement, only each variant's own size, at most 12 views.
    ``max_views``: test views for quality (evenly spaced; default 24, quick 12)."""
    import tempfile

    import torch
    from tqdm import tqdm

    from budget3d.export.onnx import _finite
    from budget3d.runtime import write_json

    run = _check_run(run_dir)
    threads = tuple(sorted({int(t) for t in threads}))
    present, missing = inventory(run)
    torch_threads = torch.get_num_threads()
    t_start = time.perf_counter()
    phases, last = {}, [t_start]

    def tick(name):  # seconds per phase, so a slow bench says where it went
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - last[0], 2)
        last[0] = now
    rounds, budget_s = (5, 1.5) if quick else (30, 8.0)
    with tempfile.TemporaryDirectory(prefix="budget3d-bench-") as tmp:
        b = Bench(run, Path(tmp), max_views=int(max_views if max_views is not None else (12 if quick else 24)),
                   data=data)
        variants = []
        for name in ("onnx-fp32", "onnx-int8", "onnx-mixed"):
            if name in present:
                variants.append(onnx_variant(b, name, present[name]))
        nelf_res = variants[0].resolution if variants else (tuple(int(v) for v in b.payload["resolution"])
                                                          if b.payload else None)
        head = []
        if "3dgs" in present:
            head.append(splat_variant(b, "3dgs", present["3dgs"], nelf_res))
        for name in SPLAT_FILES:
            if name in present:
                head.append(splat_variant(b, name, present[name], nelf_res))
        if "nelf-torch" in present:
            head.append(torch_variant(b, nelf_res))
        variants = head + variants
        if "pte" in present:
            variants.append(pte_variant(b, present["pte"]))
        own = list(dict.fromkeys(v.resolution for v in variants))
        if resolutions is None:
            scale = int(b.model.scale) if b.model is not None else 1
            extra = [(own[0][0] // d // scale * scale, own[0][1] // d // scale * scale) for d in (() if quick else (2, 4))]
            extra = [r for r in extra if min(r) >= max(scale, 8)]
        else:
            extra = [_parse_wh(r) for r in resolutions]
        res_list = list(dict.fromkeys(own + extra))
        groups = [[v for v in variants if _runtime(v.name) == g] for g in ("torch", "onnxruntime", "executorch")]
        groups = [g for g in groups if g]
        n_steps = 2 * len(variants) + len(res_list) * len(threads) * len(groups) + \
            sum(v.name.startswith("onnx") for v in variants)
        bar = tqdm(total=n_steps, desc="bench", unit="step", disable=not progress, leave=False)

        tick("setup")
        # memory first, before anything of a variant is loaded: peak RSS growth for one frame
        peaks = {}
        for v in variants:
            bar.set_postfix_str(f"memory {v.name}")
            peaks[v.name] = peak_growth_mb(lambda: v.runner(v.resolution, threads[0])(0))
            bar.update(1)

        tick("memory")
        # quality, at each variant's own resolution, on the first thread count (on a busy machine
        # one thread is the predictable choice)
        qt = threads[0]
        torch.set_num_threads(qt)
        outputs, rows = {}, {}
        for v in variants:
            bar.set_postfix_str(f"quality {v.name}")
            fn = v.runner(v.resolution, qt)
            outputs[v.name] = [v.image(fn(i)).float() for i in range(len(b.poses))]
            bar.update(1)
        teacher = {}
        gs = next((v for v in variants if v.name == "3dgs"), None)
        if gs is not None:
            teacher[gs.resolution] = outputs["3dgs"]
            for res in {v.resolution for v in variants} - set(teacher):
                fn = gs.runner(res, qt)
                teacher[res] = [gs.image(fn(i)).float() for i in range(len(b.poses))]
        fp32_name = "onnx-fp32" if "onnx-fp32" in outputs else ("nelf-torch" if "nelf-torch" in outputs else None)
        for v in variants:
            gt = b.gt(v.resolution)
            p, s = _metrics(outputs[v.name], gt)
            row = {"name": v.name, "file": _rel(v.file, run), "size_mb": round(v.size_mb, 6),
                   "resolution": list(v.resolution), "psnr": p, "ssim": s}
            if v.resolution in teacher and v.name != "3dgs":
                row["psnr_vs_teacher"], row["ssim_vs_teacher"] = _metrics(outputs[v.name], teacher[v.resolution])
            else:
                row["psnr_vs_teacher"] = row["ssim_vs_teacher"] = None
                if v.name == "3dgs":
                    row["note"] = "the teacher itself"
            if v.name.startswith(("onnx-", "pte")) and fp32_name and v.name != fp32_name and \
                    outputs[fp32_name][0].shape == outputs[v.name][0].shape:
                row["psnr_vs_fp32"] = _metrics(outputs[v.name], outputs[fp32_name])[0]
            row.update(v.meta)
            row["latency_ms"], row["latency_by_resolution"] = {}, {}
            rows[v.name] = row
        del outputs

        tick("quality")
        # latency, interleaved within a runtime (torch's OpenMP team, onnxruntime's and ExecuTorch's
        # pools each spin after a frame; mixing them in one round would time their contention)
        for res in res_list:
            for t in threads:
                for group in groups:
                    bar.set_postfix_str(f"latency {_runtime(group[0].name)} {res_key(res)} x{t}")
                    torch.set_num_threads(t)
                    runners = {v.name: v.runner(res, t) for v in group}
                    runners = {k: fn for k, fn in runners.items() if fn is not None}
                    got = measure(runners, len(b.poses), rounds=rounds, budget_s=budget_s) if runners else {}
                    del runners
                    for name, st in got.items():
                        rows[name]["latency_by_resolution"].setdefault(res_key(res), {})[str(t)] = st
                    bar.update(1)
        for v in variants:
            row = rows[v.name]
            row["latency_ms"] = row["latency_by_resolution"].get(res_key(v.resolution), {})
            row["peak_mem_mb"] = peaks.get(v.name)

        tick("latency")
        # where the time goes, per ONNX variant, at 1 thread
        for v in variants:
            if v.name.startswith("onnx"):
                bar.set_postfix_str(f"profile {v.name}")
                rows[v.name].update(profile_onnx(v.file, b.poses, Path(tmp) / v.name, runs=3 if quick else 8))
                bar.update(1)
        bar.close()
        tick("profile")
    torch.set_num_threads(torch_threads)

    how = {k: HOW[k].replace("RUN", str(run)) for k in missing}
    if "pte" in how:
        from budget3d.export import pte

        if not pte.available():
            how["pte"] = f"{pte.INSTALL}, then {how['pte']}"
    result = {
        "run": str(run), "variants": [rows[v.name] for v in variants], "missing": missing,
        "how_to_make": how, "threads": list(threads),
        "resolutions": [list(r) for r in res_list], "n_views": len(b.poses), "n_test_views": b.n_all,
        "views": b.split,
        "quick": bool(quick), "cpu_count": os.cpu_count(), "seconds": round(time.perf_counter() - t_start, 1), "seconds_by_phase": phases,
        "versions": _versions(),
    }
    result["ratios"] = ratios(result)
    result = _finite(result)
    write_json(run / "bench.json", result, indent=1, allow_nan=False)
    plot(result, run / "bench.png")
    return result


def _versions() -> dict:
    import numpy
    import torch

    out = {"torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        out["executorch"] = version("executorch")
    except Exception:  # not installed
        pass
    return out


def ratios(result: dict) -> dict:
    """The figures the goals speak of, from one interleaved run: int8 and mixed latency over the
    fp32 graph's (1 thread), their PSNR against their own fp32 and the change in PSNR to GT."""
    v = {r["name"]: r for r in result["variants"]}
    out = {}

    def lat(name, t="1"):
        return (v.get(name, {}).get("latency_ms", {}).get(t) or {}).get("median")

    fp = v.get("onnx-fp32")
    for q in ("onnx-int8", "onnx-mixed"):
        if q in v and fp:
            if lat(q) and lat("onnx-fp32"):
                out[f"{q}_latency_vs_fp32"] = round(lat(q) / lat("onnx-fp32"), 3)
            if v[q].get("psnr") is not None and fp.get("psnr") is not None:
                out[f"{q}_delta_psnr_db"] = round(v[q]["psnr"] - fp["psnr"], 3)
            if v[q].get("psnr_vs_teacher") is not None and fp.get("psnr_vs_teacher") is not None:
                out[f"{q}_delta_psnr_vs_teacher_db"] = round(v[q]["psnr_vs_teacher"] - fp["psnr_vs_teacher"], 3)
    if "onnx-int8" in v and "onnx-mixed" in v:
        if lat("onnx-mixed") and lat("onnx-int8"):
            out["mixed_latency_vs_int8"] = round(lat("onnx-mixed") / lat("onnx-int8"), 3)
        a, c = v["onnx-mixed"].get("psnr_vs_teacher"), v["onnx-int8"].get("psnr_vs_teacher")
        if a is not None and c is not None:
            out["mixed_minus_int8_psnr_vs_teacher_db"] = round(a - c, 3)
    if "3dgs" in v and "onnx-int8" in v and lat("3dgs") and lat("onnx-int8"):
        out["onnx-int8_latency_vs_3dgs"] = round(lat("onnx-int8") / lat("3dgs"), 3)
    return out


# ----------------------------------------------------------------------------- output


def _fmt(x, nd=2, w=7):
    return f"{'-':>{w}}" if x is None else f"{x:>{w}.{nd}f}"


def table(result: dict) -> str:
    """Fixed-width: variant, size, PSNR (to ground truth), PSNR to the teacher, median latency at
    1 and 2 threads (at the variant's own resolution)."""
    w = max([11] + [len(r["name"]) for r in result["variants"]])
    lines = [f"{'variant':<{w}} {'res':>9} {'size MB':>8} {'PSNR':>7} {'vs tch':>7} {'1 thr ms':>9} {'2 thr ms':>9}"]
    for r in result["variants"]:
        lat = r.get("latency_ms", {})
        m = lambda t: (lat.get(t) or {}).get("median")  # noqa: E731
        lines.append(f"{r['name']:<{w}} {res_key(r['resolution']):>9} {r['size_mb']:>8.3f} {_fmt(r.get('psnr'))} "
                     f"{_fmt(r.get('psnr_vs_teacher'))} {_fmt(m('1'), 1, 9)} {_fmt(m('2'), 1, 9)}")
    return "\n".join(lines)


def notes(result: dict) -> list:
    """Lines for under the table: where the ONNX time goes, the ratios, the missing variants."""
    out = []
    for r in result["variants"]:
        if r.get("top_ops"):
            ops = ", ".join(f"{o['op']} {o['share'] * 100:.0f}%" for o in r["top_ops"][:3])
            out.append(f"{r['name']:<11} time by operator (1 thread): {ops}")
    ra = result.get("ratios", {})
    if ra:
        out.append("ratios:  " + "  ".join(f"{k} {v:+.3f}" if "delta" in k or "minus" in k else f"{k} {v:.2f}"
                                          for k, v in ra.items()))
    if result.get("missing"):
        out.append("missing: " + "; ".join(f"{k} ({result['how_to_make'][k]})" for k in result["missing"]))
    return out


def plot(result: dict, path: Path) -> None:
    """PSNR against median latency at 1 thread and against file size, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from budget3d.runtime import save_figure

    rows = [r for r in result["variants"] if r.get("psnr") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "latency", "median latency at 1 thread (ms, log)"),
                           (axes[1], "size", "file size (MB, log)")):
        for i, r in enumerate(rows):
            x = (r.get("latency_ms", {}).get("1") or {}).get("median") if key == "latency" else r["size_mb"]
            if not x:
                continue
            kind = "o" if r["name"].startswith("3dgs") else ("s" if "int8" in r["name"] or "mixed" in r["name"] else "^")
            ax.scatter([x], [r["psnr"]], marker=kind, s=50)
            ax.annotate(r["name"], (x, r["psnr"]), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -11), fontsize=8)  # alternate: neighbours overlap less
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if f"{x:.1g}"[0] in "25" else ""))
        ax.set_xlabel(label)
        ax.set_ylabel("test PSNR to ground truth (dB)")
        ax.grid(alpha=0.3, which="both")
    res = {res_key(r["resolution"]) for r in rows}
    fig.suptitle(f"{Path(result['run']).name}: quality against latency and size ({', '.join(sorted(res))}, "
                 f"{result['n_views']} views)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)