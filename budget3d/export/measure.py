"""How ``budget3d bench`` measures (``budget3d.export.bench`` drives it and writes the report):
interleaved timing, peak-memory growth, onnxruntime's per-operator profile, and one ``Variant``
per file of the run with its runners (``Bench`` holds what they share: test views, poses, the
student, temporary ONNX files at other resolutions).

Latency: median and p90 ms per frame after two warm-up frames, cycling the test poses, at each
thread count and output resolution. Thread limits are set where each runtime takes them
(onnxruntime intra-op = N and inter-op = 1, sequential; ``torch.set_num_threads`` for torch and for
our CPU splat kernels, which run on torch's OpenMP team; ExecuTorch's threadpool), and checked:
each measurement also records ``cpu_per_wall``, the process CPU time over wall time during the
timed frames (<= ~1 means one core). Variants run interleaved, one frame each per round, so a
neighbour's load on a shared CPU hits them all alike. ONNX files have their resolution fixed at
export: for the other resolutions the bench exports temporary ONNX files from student.pt
(int8 and mixed re-quantized with the same recipe: the float convs recorded in their JSON
sidecar, the same calibration poses). The ``.pte`` is measured at its own size only.

Memory: ``peak_mem_mb`` is the growth of the process's peak RSS (VmHWM, reset before each variant
through /proc/self/clear_refs) while loading the variant and running one frame at the first
thread count: what that variant adds on top of a Python process with torch loaded.

Top operators: onnxruntime's profiler at 1 thread (a separate pass, profiling slows it), kernel
time summed per operator type and the heaviest nodes, in ``top_ops`` / ``top_nodes``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from budget3d.errors import UserError

WARMUP = 2


def res_key(res) -> str:
    return f"{res[0]}x{res[1]}"


# ----------------------------------------------------------------------------- timing, memory, profile


def _status_kb(field: str):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _stats(times_ms: list, cpu_s: float, wall_s: float) -> dict:
    import numpy as np

    return {"median": round(float(np.median(times_ms)), 3), "p90": round(float(np.percentile(times_ms, 90)), 3),
            "min": round(float(np.min(times_ms)), 3), "n": len(times_ms), "cpu_per_wall": round(cpu_s / wall_s, 3) if wall_s > 0 else None}


def measure(runners: dict, n_views: int, *, rounds: int, min_rounds: int = 3, budget_s: float = 10.0) -> dict:
    """Interleaved timing: per round, one frame of every runner (``fn(i)``, i cycling the views),
    after ``WARMUP`` frames each. Stops after ``rounds`` rounds, or after ``min_rounds`` once
    ``budget_s`` has passed. Returns name -> {median, p90, n, cpu_per_wall}."""
    for fn in runners.values():
        for k in range(WARMUP):
            fn(k % n_views)
    times = {n: [] for n in runners}
    cpu = {n: 0.0 for n in runners}
    wall = {n: 0.0 for n in runners}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in runners.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn(r % n_views)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            times[name].append(dt * 1e3)
            cpu[name] += dc
            wall[name] += dt
        if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {n: _stats(times[n], cpu[n], wall[n]) for n in runners}


def ort_session(path, threads: int, profile_prefix=None):
    from budget3d.export.ortrun import session

    return session(path, threads, profile_prefix)


def profile_onnx(path, poses: list, prefix: Path, runs: int = 5, top: int = 5) -> dict:
    """Kernel time per operator type and the heaviest nodes, from onnxruntime's profiler at 1
    thread. Each node's time is its fastest over ``runs`` runs after a warm-up: on a shared CPU a
    run that is descheduled mid-kernel charges the wait to whichever node was running, and the
    minimum drops that."""
    import numpy as np

    from budget3d.export.ortrun import INPUT

    sess = ort_session(path, 1, profile_prefix=prefix)
    for i in range(runs + 1):
        sess.run(None, {INPUT: np.asarray(poses[i % len(poses)], dtype=np.float32)})
    trace = Path(sess.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    runs_seen = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_end = (runs_seen[0]["ts"] + runs_seen[0]["dur"]) if runs_seen else -1
    per_node = {}  # node -> [op, {run start: summed ms in that run}]
    starts = sorted(e["ts"] for e in runs_seen)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e.get("ts", 0) <= first_end:
            continue
        run_id = max((s for s in starts if s <= e["ts"]), default=0)
        op = e.get("args", {}).get("op_name", "?")
        entry = per_node.setdefault(e["name"][: -len("_kernel_time")], [op, {}])
        entry[1][run_id] = entry[1].get(run_id, 0.0) + e.get("dur", 0) / 1e3
    by_node = {k: (op, min(t.values())) for k, (op, t) in per_node.items()}
    by_op = {}
    for op, ms in by_node.values():
        by_op[op] = by_op.get(op, 0.0) + ms
    total = sum(by_op.values()) or 1.0
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][1])[:top]
    return {"top_ops": [{"op": k, "ms": round(v, 3), "share": round(v / total, 3)} for k, v in ops],
            "top_nodes": [{"node": k, "op": op, "ms": round(v, 3), "share": round(v / total, 3)}
                          for k, (op, v) in nodes],
            "kernel_ms": round(total, 3), "profile_runs": max(0, len(runs_seen) - 1)}


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so a later allocation shows in RSS again."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_growth_mb(work):
    """How far the process's peak RSS rises above its current RSS while ``work()`` runs (MB), or
    None where the peak cannot be reset (not Linux)."""
    import gc

    gc.collect()
    _malloc_trim()
    if not _reset_peak():
        return None
    rss0 = _status_kb("VmRSS")
    work()
    peak = _status_kb("VmHWM")
    gc.collect()
    _malloc_trim()
    return None if rss0 is None or peak is None else round(max(0, peak - rss0) / 1024, 1)


# ----------------------------------------------------------------------------- variants


class Variant:
    """One thing to measure: ``runner(res, threads)`` builds ``fn(i) -> raw output`` for view i;
    ``image(raw)`` turns a raw output into an (H, W, 3) float tensor in [0, 1]."""

    def __init__(self, name: str, file: Path, resolution: tuple, runner, image, **meta):
        self.name, self.file, self.resolution = name, Path(file), tuple(resolution)
        self.runner, self.image, self.meta = runner, image, meta

    @property
    def size_mb(self) -> float:
        return self.file.stat().st_size / 1e6


class Bench:
    """The state shared by the variants of one run: test views, cameras, poses, the student."""

    def __init__(self, run: Path, tmp: Path, max_views: int = 0, data=None):
        import torch

        from budget3d.export.onnx import _c2w
        from budget3d.runfolder import load_run_scene

        self.run, self.tmp = run, tmp
        self.config = read_json(run / "config.json")
        self.data = data
        scene = load_run_scene(run, self.config, data)
        views = list(scene.test) or list(scene.train[:3])
        self.split = "test" if scene.test else "first 3 train (the scene has no test split)"
        self.n_all = len(views)
        if max_views and len(views) > max_views:  # evenly spaced, always the first
            views = [views[round(i * (len(views) - 1) / (max_views - 1))] for i in range(max_views)] \
                if max_views > 1 else views[:1]
        self.views = views
        self.cams = [v.camera for v in self.views]
        self.poses = [_c2w(c) for c in self.cams]
        self.background = torch.tensor(scene.background, dtype=torch.float32)
        self.model = self.payload = None
        if (run / "nelf" / "student.pt").is_file():
            from budget3d.nelf.students import load_student

            self.model, self.payload = load_student(run / "nelf" / "student.pt")
        self._gt, self._calib, self._tmp_onnx = {}, None, {}

    # ground truth at a resolution, as distillation's _gt: area-averaged when it differs
    def gt(self, res) -> list:
        import cv2
        import torch

        if res not in self._gt:
            out = []
            for v in self.views:
                img = v.image()
                if img.shape[:2] != (res[1], res[0]):
                    img = cv2.resize(img, tuple(res), interpolation=cv2.INTER_AREA)
                out.append(torch.as_tensor(img).float() / 255.0)
            self._gt[res] = out
        return self._gt[res]

    def calib(self) -> list:
        if self._calib is None:
            from budget3d.export.onnx import held_out_poses

            self._calib = held_out_poses(self.run, data=self.data)[1]
        return self._calib

    def onnx_at(self, variant: str, sidecar: dict, res) -> Path:
        """A temporary ONNX file of ``variant`` at ``res``: exported from student.pt, quantized
        with the float convs its sidecar records (None when that cannot be reproduced)."""
        from budget3d.export.onnx import export_torch, pose_model
        from budget3d.export.quantize import quantize, recipe_exclude

        if self.model is None:
            return None
        key = (variant, res)
        if key in self._tmp_onnx:
            return self._tmp_onnx[key]
        fp32 = self.tmp / f"fp32-{res_key(res)}.onnx"
        with _quiet_logs():
            if not fp32.is_file():
                export_torch(pose_model(self.model, self.payload, res), fp32)
            path = fp32
            if variant != "onnx-fp32":
                exclude = recipe_exclude(fp32, sidecar, variant)
                if exclude is None:
                    path = None
                else:
                    path = self.tmp / f"{variant}-{res_key(res)}.onnx"
                    quantize(fp32, path, self.calib(), exclude=exclude)
        self._tmp_onnx[key] = path
        return path


@contextlib.contextmanager
def _quiet_logs():
    """The exporter's and the quantizer's advice (torchvision missing, "consider pre-processing")
    is noise between progress bars: errors only while making the temporary files."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("", "torch", "torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({type(e).__name__}); is this a run folder?") from None


def splat_variant(b: Bench, name: str, path: Path, nelf_res) -> Variant:
    import torch

    from budget3d.export.splats import load_any
    from budget3d.nelf.distill import at_resolution
    from budget3d.runtime import pick_backend
    from budget3d.splat import render

    backend = pick_backend("auto", torch.device("cpu"))
    own = nelf_res or (b.cams[0].width, b.cams[0].height)
    state, meta = {}, {"renderer": backend}

    def load():  # on first use, so that the memory pass counts the file's Gaussians
        if not state:
            params = {k: v.float() for k, v in load_any(path).items()}
            stored = int(round((params["shN"].shape[1] + 1) ** 0.5)) - 1 if params.get("shN") is not None else 0
            sh = b.config.get("sh_degree")
            state.update(params=params, deg=stored if sh is None else min(int(sh), stored))
            meta.update(gaussians=int(len(params["means"])), sh_degree=state["deg"])
        return state["params"], state["deg"]

    def runner(res, threads):
        torch.set_num_threads(threads)
        params, deg = load()
        cams = [at_resolution(c, *res) for c in b.cams]

        def fn(i):
            with torch.no_grad():
                return render(params, cams[i], backend=backend, sh_degree=deg, background=b.background).image
        return fn

    v = Variant(name, path, own, runner, lambda img: img.clamp(0, 1))
    v.meta = meta
    return v


def torch_variant(b: Bench, res0) -> Variant:
    import torch

    from budget3d.export.onnx import pose_model

    def runner(res, threads):
        torch.set_num_threads(threads)
        module = pose_model(b.model, b.payload, res)
        poses = [torch.as_tensor(p) for p in b.poses]

        def fn(i):
            with torch.inference_mode():
                return module(poses[i])
        return fn

    return Variant("nelf-torch", b.run / "nelf" / "student.pt", res0, runner,
                   lambda out: out[0].permute(1, 2, 0).clamp(0, 1), preset=b.payload.get("preset"))


def onnx_variant(b: Bench, name: str, path: Path) -> Variant:
    import numpy as np
    import torch

    from budget3d.export.ortrun import INPUT

    sidecar = read_json(path.with_suffix(".json"))
    shape = ort_session(path, 1).get_outputs()[0].shape
    own = (int(shape[3]), int(shape[2]))
    poses = [np.asarray(p, dtype=np.float32) for p in b.poses]

    def runner(res, threads):
        src = path if tuple(res) == own else b.onnx_at(name, sidecar, tuple(res))
        if src is None:
            return None
        sess = ort_session(src, threads)
        return lambda i: sess.run(None, {INPUT: poses[i]})[0]

    meta = {k: sidecar[k] for k in ("preset", "exporter", "float_convs", "quantize_head", "drop_db", "int8_drop_db")
            if k in sidecar}
    return Variant(name, path, own, runner, lambda out: torch.from_numpy(out[0]).permute(1, 2, 0).clamp(0, 1), **meta)


def pte_variant(b: Bench, path: Path) -> Variant:
    import torch

    from budget3d.export import pte

    side = pte.read_sidecar(path.parent)
    probe = pte.load_method(path, 1)
    out = pte.run_pose(probe, b.poses[0])
    own = (int(out.shape[3]), int(out.shape[2]))

    def runner(res, threads):
        if tuple(res) != own:
            return None  # a .pte has its size fixed at export; lowering another one takes ~20 s
        m = pte.load_method(path, threads)
        poses = [torch.as_tensor(p) for p in b.poses]
        return lambda i: m.execute([poses[i]])[0]

    return Variant("pte", path, own, runner,
                   lambda o: torch.as_tensor(o)[0].permute(1, 2, 0).clamp(0, 1), backend=side.get("backend", "xnnpack"))
