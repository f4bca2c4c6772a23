"""Running the exported NeLF graphs in onnxruntime: the graph's input / output names, a session
on an exact thread count, outputs for a list of poses, PSNR over views, 1-frame latency, file size.
What the export (``budget3d.export.onnx``), the quantizer (``budget3d.export.quantize``), the bench,
the web export and the viewer run them with."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from budget3d.errors import UserError
from budget3d.runtime import psnr_from_mse

INPUT, OUTPUT = "c2w", "image"


def session(path, threads: int = 1, profile_prefix=None):
    """onnxruntime session on exactly ``threads`` intra-op threads, no inter-op parallelism,
    optionally profiling. A file onnxruntime cannot load is a one-line error naming it."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for missing, truncated or foreign files
        why = " ".join(str(e).split(":")[-1].split()) or type(e).__name__
        raise UserError(f"{path}: not a readable ONNX model ({why}); export it again "
                        "(budget3d export RUN --format onnx,onnx-int8)") from None


def run_poses(sess, poses: list) -> list:
    """Outputs (1, 3, H, W) numpy of an onnxruntime session for a list of (4, 4) poses."""
    return [sess.run(None, {INPUT: np.asarray(p, dtype=np.float32)})[0] for p in poses]


def mean_psnr(outs: list, refs: list) -> float:
    """PSNR of the mean MSE over the views (finite for identical images only when all are)."""
    return psnr_from_mse(np.mean([np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2)
                                  for a, b in zip(outs, refs)]))


def latency_ms(path, pose, threads: int = 1, repeats: int = 5) -> float:
    """Median wall time of one frame (after one warm-up run) at ``threads`` threads."""
    sess = session(path, threads)
    feed = {INPUT: np.asarray(pose, dtype=np.float32)}
    sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def size_mb(path) -> float:
    return Path(path).stat().st_size / 1e6
