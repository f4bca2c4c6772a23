"""NeLF student -> ExecuTorch ``.pte`` lowered to XNNPACK (the optional ``mobile`` extra).

The same pose-in, image-out module as the ONNX export (``budget3d.export.onnx.pose_model``:
rays, encoding and the BatchNorm-folded student in one graph), exported with ``torch.export``
and lowered with ``to_edge_transform_and_lower(..., XnnpackPartitioner())``: the convs run in
XNNPACK, the ray/encoding ops on ExecuTorch's portable kernels. float32 only. Written as
``RUN/export/nelf.pte`` with a ``nelf.pte.json`` sidecar (the ONNX file owns ``nelf.json``).

ExecuTorch is not a core dependency (it pulls ~40 packages); without it ``export_pte`` raises a
one-line UserError naming the pip command.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from budget3d.errors import UserError

FILENAME = "nelf.pte"
SIDECAR = "nelf.pte.json"
INSTALL = "pip install 'budget3d[mobile]'"


def require_executorch():
    """The ExecuTorch modules export_pte needs, or a one-line UserError saying how to install them."""
    try:
        with _quiet_logs():
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except ImportError as e:
        raise UserError(f"--format pte needs ExecuTorch, which is not installed here ({e.name or e}); "
                        f"install it with: {INSTALL}") from None
    return to_edge_transform_and_lower, XnnpackPartitioner


def available() -> bool:
    """Whether ExecuTorch is installed (without importing it: that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("executorch") is not None and \
            importlib.util.find_spec("executorch.runtime") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_logs():
    """Importing ExecuTorch logs torchao's missing CUDA kernels and torch's deprecation notes
    (warnings only; errors still show)."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    disabled = logging.root.manager.disable
    try:
        logging.disable(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        root.setLevel(level)


@contextlib.contextmanager
def _quiet_stderr():
    """ExecuTorch's runtime logs cpuinfo probing straight to fd 2 on first use; hide that."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_threads(n: int) -> None:
    """Size ExecuTorch's shared threadpool (XNNPACK's threads) to ``n``."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(int(n))


def load_method(path, threads: int = 1):
    """The ``forward`` method of a .pte, on ``threads`` threads; call it as ``method.execute([c2w])``."""
    with _quiet_stderr(), _quiet_logs():
        from executorch.runtime import Runtime

        set_threads(threads)
        program = Runtime.get().load_program(str(path))
        return program.load_method("forward")


def run_pose(method, pose):
    """(1, 3, H, W) numpy output for one (4, 4) pose."""
    import numpy as np
    import torch

    return method.execute([torch.as_tensor(np.asarray(pose, dtype=np.float32))])[0].numpy()


def export_pte(run_dir, fmt, out_dir, **opts) -> dict:
    """Write ``out_dir/nelf.pte`` (XNNPACK, float32) from ``RUN/nelf/student.pt`` and check it:
    ``max_abs_diff`` against the torch student on the run's test views, ``psnr_vs_teacher``
    (when the run has its gaussians.ply and ``teacher`` is not False), ``latency_ms_1thread``.
    Options: ``resolution`` ("WxH", a width, or None for the student's own), ``latency`` (True),
    ``teacher`` (True); others are ignored (the CLI passes its flags through)."""
    if fmt != "pte":
        raise UserError(f"unknown ExecuTorch format {fmt!r}; the one format here is 'pte'")
    lower, partitioner = require_executorch()
    import numpy as np
    import torch

    from budget3d.export.onnx import _finite, held_out_poses, pose_model, prepare, teacher_images, torch_poses
    from budget3d.export.ortrun import mean_psnr, size_mb
    from budget3d.runtime import write_bytes, write_json

    opts, run_dir, out_dir, model, payload, res = prepare(run_dir, out_dir, opts)
    evals, _, cams = held_out_poses(run_dir, n_jitter=0, data=opts.get("data"))
    t0 = time.perf_counter()
    module = pose_model(model, payload, res)
    with _quiet_logs(), torch.no_grad():
        program = torch.export.export(module, (torch.eye(4, dtype=torch.float32),))
        buffer = lower(program, partitioner=[partitioner()]).to_executorch().buffer
    path = out_dir / FILENAME
    write_bytes(path, buffer)
    method = load_method(path, threads=1)
    outs = [run_pose(method, p) for p in evals]
    ref = torch_poses(pose_model(model, payload, res, fold=False), evals)
    result = {"fmt": "pte", "backend": "xnnpack", "dtype": "float32", "preset": payload.get("preset"),
              "resolution": list(res), "input": [4, 4], "path": str(path), "size_mb": round(size_mb(path), 4),
              "n_eval_views": len(evals), "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(outs, ref))),
              "psnr": mean_psnr(outs, ref), "export_seconds": round(time.perf_counter() - t0, 2)}
    teacher = teacher_images(run_dir, cams, *res, payload) if opts.get("teacher", True) else None
    if teacher is not None:
        result["psnr_vs_teacher"] = mean_psnr(outs, teacher)
    if opts.get("latency", True):
        feed = evals[0]
        run_pose(method, feed)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            run_pose(method, feed)
            times.append((time.perf_counter() - t) * 1e3)
        result["latency_ms_1thread"] = round(float(np.median(times)), 3)
    result = _finite(result)
    write_json(out_dir / SIDECAR, result, indent=1, allow_nan=False)
    return result


def describe(result: dict) -> str:
    bits = [f"pte: {result['path']} ({result['size_mb']:.2f} MB, {result['resolution'][0]}x{result['resolution'][1]}, "
            f"XNNPACK fp32)", f"max |pte - torch| = {result['max_abs_diff']:.2e}"]
    if result.get("psnr_vs_teacher") is not None:
        bits.append(f"PSNR vs teacher {result['psnr_vs_teacher']:.2f} dB")
    if "latency_ms_1thread" in result:
        bits.append(f"{result['latency_ms_1thread']:.1f} ms/frame at 1 thread")
    return "; ".join(bits)


def read_sidecar(out_dir) -> dict:
    p = Path(out_dir) / SIDECAR
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
