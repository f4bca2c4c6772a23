"""NeLF student -> ONNX: one graph, camera pose in, image out; float32, int8 and mixed precision.

The graph takes a (4, 4) float32 camera-to-world matrix (OpenCV axes, as ``Camera`` uses) and
returns the (1, 3, H, W) image in [0, 1]. Intrinsics and the output resolution are fixed at
export; the rays (``rays_from_c2w``) and the point encoding (``encode``) are computed inside the
graph from plain torch ops, so a device only has to supply a pose. BatchNorm is folded into the
convs before export, so after the encoding the graph holds only Conv / Relu / Add, the pixel
shuffles as Reshape / Transpose, and the output activation (Sigmoid, or Clip for a linear output).

int8 is ``onnxruntime.quantization.quantize_static``: QDQ, per-channel weights, unsigned
activations (QUInt8; signed ran ~2x slower here), calibrated on held-out poses (the run's test
cameras plus jittered poses around the training band). Only the network is quantized: every
node upstream of the first conv (rays, points, sin/cos encoding) stays float. Measured on the
test student (small, 32x32): quantizing the encoding too gives 35.2 dB against the fp32 graph,
the network only 40.5 dB. The RGB tail conv and what follows stay float too: its rounding lands
straight on the pixels. The head conv is int8 (``quantize_head=False`` keeps it float): on the
default small student at 128x128 that cost 0.004 dB against the teacher, and it makes the file
smaller (0.29 vs 0.37 MB) and faster (4.2 vs 5.9 ms), and lets onnxruntime keep the whole body in
NHWC (a float head left 56 NCHW/NHWC transposes around the residual adds, 13% of mobile-int8's
time at 800x800).

Two graph forms make int8 fast and exact (``pose_model``): each super-resolution conv is followed
by its ReLU and then the pixel shuffle (they commute), so the ReLU fuses into the int8 conv and
the shuffle carries the conv's own scale; and the shuffle is written in NHWC (``ShuffleNHWC``),
not as DepthToSpace, whose onnxruntime kernel is NCHW-only and slow on uint8. Together, on the
default small student: int8's drop against the teacher 1.65 -> 0.36 dB, 7.1 -> 5.9 ms. What int8
cannot fix is a network whose activations span thousands: students with a sigmoid output drive
overshooting logits far out (its gradient vanishes there), which cost a 28-block student 5.4 dB;
``mobile-int8`` therefore has a linear output clamped to [0, 1] (0.03 dB; docs/export.md, "Quality of int8").

Mixed precision (the MixDQ idea): the drop of a variant is PSNR(fp32 vs teacher) - PSNR(variant
vs teacher) on the held-out views (the teacher is the run's gaussians.ply). Quantize one conv at
a time for its sensitivity, then start from all-int8 and keep the most sensitive convs in float
until the drop is <= ``max_drop_db`` (0.3 dB) or keeping another one in float would exceed
``max_mb``. The per-layer table comes back in the result (``layer_table`` prints it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from budget3d.errors import UserError
from budget3d.export import ONNX_FILES
from budget3d.runtime import atomic_path, psnr_from_mse, write_json

FORMATS = tuple(ONNX_FILES)  # onnx, onnx-int8, onnx-mixed
INPUT, OUTPUT = "c2w", "image"
CONV_OPS = ("Conv", "ConvTranspose")  # the layers mixed precision chooses between


# ----------------------------------------------------------------------------- torch side


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm2d that directly follows a Conv2d in an
    nn.Sequential folded into that conv (and replaced by Identity):
    w' = w * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps) + beta."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names[:-1], names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            with torch.no_grad():
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                    1.0 / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(s)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                   conv.padding, conv.dilation, conv.groups, bias=True,
                                   padding_mode=conv.padding_mode).to(conv.weight.device, conv.weight.dtype)
                folded.weight.copy_(conv.weight * s.reshape(-1, 1, 1, 1))
                folded.bias.copy_((bias - bn.running_mean) * s + shift)
            seq._modules[a] = folded
            seq._modules[b] = nn.Identity()
    return model


class ShuffleNHWC(nn.Module):
    """PixelShuffle(r) written as NHWC reshape / transpose, for input channels ordered (dy, dx, c)
    ("DCR") instead of PixelShuffle's (c, dy, dx). onnxruntime runs its int8 convs in NHWC, so the
    outer transposes cancel against its own and the shuffle becomes one copy of contiguous
    c-byte runs; its DepthToSpace kernel is NCHW-only and ~6x slower on uint8 (12.8 vs 2.1 ms for
    a 256x200x200 tensor, 1 thread)."""

    def __init__(self, r: int):
        super().__init__()
        self.r = int(r)

    def forward(self, x):
        n, c, h, w = x.shape
        r = self.r
        y = x.permute(0, 2, 3, 1).reshape(n, h, w, r, r, c // (r * r)).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(n, h * r, w * r, c // (r * r)).permute(0, 3, 1, 2)


ELEMENTWISE = (nn.ReLU, nn.GELU)


def nhwc_shuffles(model: nn.Module) -> nn.Module:
    """In place: every conv -> [activation] -> PixelShuffle in an nn.Sequential (or conv ->
    PixelShuffle -> activation, as ``convert_to_pixelshuffle`` leaves a paper model; an elementwise
    activation commutes with the shuffle, so it moves before it) becomes conv with its output
    channels permuted to DCR order -> activation -> ``ShuffleNHWC``. Same outputs."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        mods = list(seq._modules.values())
        for i, m in enumerate(mods):
            if i + 1 < len(mods) and isinstance(m, nn.PixelShuffle) and isinstance(mods[i + 1], ELEMENTWISE):
                mods[i], mods[i + 1] = mods[i + 1], m
        for i, m in enumerate(mods):
            if not isinstance(m, nn.PixelShuffle):
                continue
            j = i - 1 - (i > 0 and isinstance(mods[i - 1], ELEMENTWISE))
            conv, r = mods[j] if j >= 0 else None, m.upscale_factor
            if not isinstance(conv, nn.Conv2d):
                continue
            co = conv.out_channels // (r * r)
            perm = torch.arange(conv.out_channels).reshape(co, r * r).T.reshape(-1)  # new (d, c) <- old c*r*r + d
            with torch.no_grad():
                conv.weight.copy_(conv.weight[perm])
                if conv.bias is not None:
                    conv.bias.copy_(conv.bias[perm])
            mods[i] = ShuffleNHWC(r)
        for k, m in zip(list(seq._modules), mods):
            seq._modules[k] = m
    return model


class PoseToImage(nn.Module):
    """(4, 4) camera-to-world -> (1, 3, H, W) image: rays, encoding and the student in one forward."""

    def __init__(self, model: nn.Module, K: torch.Tensor, width: int, height: int):
        super().__init__()
        self.model = model
        self.register_buffer("K", torch.as_tensor(K, dtype=torch.float32).reshape(3, 3).clone())
        self.width, self.height = int(width), int(height)

    def forward(self, c2w: torch.Tensor) -> torch.Tensor:
        return self.model(c2w, self.K, self.width, self.height)


def intrinsics_matrix(payload: dict, width: int, height: int) -> torch.Tensor:
    """3x3 K for a ``width`` x ``height`` output from the student's intrinsics (given at its own
    training resolution), scaled per axis."""
    fx, fy, cx, cy = (float(v) for v in payload["intrinsics"])
    w0, h0 = (int(v) for v in payload["resolution"])
    sx, sy = width / w0, height / h0
    return torch.tensor([[fx * sx, 0.0, cx * sx], [0.0, fy * sy, cy * sy], [0.0, 0.0, 1.0]], dtype=torch.float32)


def pose_model(model: nn.Module, payload: dict, resolution: Optional[tuple] = None, fold: bool = True) -> PoseToImage:
    """The exportable module for a loaded student (``load_student``): BatchNorm folded and the
    pixel shuffles in NHWC form (``nhwc_shuffles``), unless ``fold`` is False (the student as
    distilled, the reference the exports are checked against)."""
    w, h = resolution or tuple(int(v) for v in payload["resolution"])
    net = nhwc_shuffles(fold_batchnorm(model)) if fold else copy.deepcopy(model).eval()
    if fold and hasattr(net, "export_lookups"):  # a grid student: feature planes by Gather, not GridSample
        net.export_lookups = True
    return PoseToImage(net, intrinsics_matrix(payload, w, h), w, h).eval()


def export_torch(module: PoseToImage, path: Path, dynamo: Optional[bool] = None) -> str:
    """Write ``module`` as one self-contained ONNX file. Tries the dynamo (onnxscript) exporter,
    falls back to the TorchScript one; returns which ran ("dynamo" / "torchscript"). A file
    onnxruntime cannot load counts as a failure: with torch 2.13 the TorchScript exporter writes
    an invalid Transpose for ``encode``'s ``movedim(-1, -3)``, so in practice only dynamo works."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = (torch.eye(4, dtype=torch.float32),)
    errors = []
    for use_dynamo in ([True, False] if dynamo is None else [bool(dynamo)]):
        try:
            with atomic_path(path, keep_suffix=True) as tmp, torch.no_grad():
                if use_dynamo:
                    prog = torch.onnx.export(module, example, dynamo=True, input_names=[INPUT],
                                             output_names=[OUTPUT], optimize=True, verbose=False)
                    prog.save(str(tmp), external_data=False)
                else:
                    torch.onnx.export(module, example, str(tmp), dynamo=False, input_names=[INPUT],
                                      output_names=[OUTPUT], opset_version=17, do_constant_folding=True)
                session(tmp)  # a graph onnxruntime cannot load is a failed export
            return "dynamo" if use_dynamo else "torchscript"
        except Exception as e:  # exporter failures come in many types
            errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError("ONNX export failed: " + " | ".join(errors))


# ----------------------------------------------------------------------------- onnxruntime side


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


@torch.no_grad()
def torch_poses(module: nn.Module, poses: list) -> list:
    return [module(torch.as_tensor(np.asarray(p, dtype=np.float32))).numpy() for p in poses]


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


# ----------------------------------------------------------------------------- quantization


class PoseReader:
    """onnxruntime CalibrationDataReader feeding (4, 4) c2w poses."""

    def __init__(self, poses: list):
        self.poses = [np.asarray(p, dtype=np.float32) for p in poses]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.poses):
            return None
        self.i += 1
        return {INPUT: self.poses[self.i - 1]}

    def rewind(self):
        self.i = 0


def encoding_nodes(model_path) -> tuple[list, list]:
    """(names of the nodes upstream of the first conv: rays and encoding, names of the Conv /
    ConvTranspose nodes in graph order). The first conv is the network's head."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type in CONV_OPS]
    if not convs:
        raise RuntimeError(f"{model_path}: no Conv node in the graph")
    if any(n.op_type == "GridSample" for n in g.node):  # a grid student: its lookups also feed later convs;
        # every node that is not a conv stays float (rays, texel reads, volume weights, shuffles)
        return sorted(n.name for n in g.node if n.op_type not in CONV_OPS), [n.name for n in convs]
    seen, stack = set(), [convs[0].input[0]]
    while stack:
        n = producer.get(stack.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.input)
    return sorted(seen), [n.name for n in convs]


def tail_nodes(model_path) -> list:
    """Names of the last conv (the 1x1 conv to RGB) and every node after it (sigmoid, layout):
    a handful of MACs whose int8 rounding lands straight on the output pixels."""
    import onnx

    g = onnx.load(str(model_path), load_external_data=False).graph
    convs = [n for n in g.node if n.op_type in CONV_OPS]
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out, stack = {convs[-1].name}, list(convs[-1].output)
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name not in out:
                out.add(n.name)
                stack.extend(n.output)
    return sorted(out)


def recipe_exclude(fp32_path, sidecar: dict, variant: str) -> Optional[list]:
    """The nodes to keep float when re-quantizing ``fp32_path`` (the same student, exported at
    another size) as the quantized file described by ``sidecar`` (its .json) was; None when the
    sidecar does not say. Files from before the tail was kept float record no quantize_tail."""
    enc, convs = encoding_nodes(fp32_path)
    floats = sidecar.get("float_convs", [convs[0]] if variant == "onnx-int8" else None)
    if floats is None or any(c not in convs for c in floats):
        return None
    tail = [] if sidecar.get("quantize_tail", True) else tail_nodes(fp32_path)
    return list(enc) + tail + list(floats)


def strip_metadata(path) -> None:
    """Drop the exporter's per-node doc strings and metadata (~0.2 MB on mobile-int8; same outputs)."""
    import onnx

    m = onnx.load(str(path))
    for n in m.graph.node:
        n.doc_string = ""
        del n.metadata_props[:]
    with atomic_path(path, keep_suffix=True) as tmp:
        onnx.save(m, str(tmp))


def quantize(fp32_path, out_path, calib_poses: list, *, exclude: list = (), only: Optional[list] = None,
             per_channel: bool = True) -> None:
    """quantize_static, QDQ, per-channel weights, QUInt8 activations and QInt8 weights.
    ``exclude``: node names kept float; ``only``: if given, quantize just these nodes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with atomic_path(out_path, keep_suffix=True) as tmp:
        quantize_static(str(fp32_path), str(tmp), PoseReader(calib_poses), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), nodes_to_quantize=list(only) if only else None,
                        calibrate_method=CalibrationMethod.MinMax)
        strip_metadata(tmp)


# ----------------------------------------------------------------------------- the run folder


def load_run(run_dir: Path):
    """(student in eval mode, payload) of ``RUN/nelf/student.pt``; one-line errors."""
    from budget3d.nelf.distill import NELF_DIR, STUDENT
    from budget3d.nelf.students import load_student

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give a folder written by 'budget3d train --out'")
    path = run_dir / NELF_DIR / STUDENT
    if not path.is_file():
        raise UserError(f"{run_dir}: no NeLF student ({NELF_DIR}/{STUDENT}); run 'budget3d distill {run_dir}' first")
    return load_student(path)


def held_out_poses(run_dir: Path, n_jitter: int = 8, seed: int = 1234, data=None) -> tuple[list, list, list]:
    """(evaluation poses, calibration poses, evaluation cameras); poses are (4, 4) float32 c2w.
    Evaluation: the scene's test cameras (held out from training; the first 3 training views
    when it has none). Calibration: those plus ``n_jitter`` poses of a seeded ``PoseSampler``
    pool (a seed unlike distillation's) in the training band, so the activation ranges cover
    the views a user will ask for, not only the test ones."""
    from budget3d.nelf.distill import PoseSampler
    from budget3d.runfolder import load_run_scene

    scene = load_run_scene(run_dir, override=data)
    cams = [v.camera for v in (list(scene.test) or list(scene.train[:3]))]
    evals = [_c2w(c) for c in cams]
    calib = list(evals)
    if n_jitter > 0 and scene.train:
        pool = PoseSampler(scene, len(scene.train) + n_jitter, seed)
        calib += [_c2w(pool.camera(i)) for i in range(pool.n_train, pool.n_train + n_jitter)]
    return evals, calib, cams


def _c2w(camera) -> np.ndarray:
    return np.linalg.inv(np.asarray(camera.world_to_camera, dtype=np.float64)).astype(np.float32)


def teacher_images(run_dir: Path, cameras: list, width: int, height: int, payload: dict) -> Optional[list]:
    """The run's 3DGS teacher rendered at ``cameras`` as (1, 3, H, W) numpy images, or None when
    the run has no gaussians.ply (then quality is reported against the fp32 graph only)."""
    from budget3d.nelf.distill import at_resolution
    from budget3d.splat import load_ply, render
    from budget3d.runtime import pick_backend

    run_dir = Path(run_dir)
    if not (run_dir / "gaussians.ply").is_file():
        return None
    saved = json.loads((run_dir / "config.json").read_text())
    sh = saved.get("sh_degree")
    gauss = {k: v.float() for k, v in load_ply(run_dir / "gaussians.ply").items()}
    backend = pick_backend("auto", torch.device("cpu"))
    bg = torch.tensor(payload.get("background", (1.0, 1.0, 1.0)), dtype=torch.float32)
    out = []
    with torch.no_grad():
        for cam in cameras:
            img = render(gauss, at_resolution(cam, width, height), backend=backend,
                         sh_degree=None if sh is None else int(sh), background=bg).image.clamp(0, 1)
            out.append(img.permute(2, 0, 1)[None].numpy())
    return out


def _parse_resolution(text, payload: dict, scale: int) -> tuple[int, int]:
    if text in (None, "", "auto"):
        return tuple(int(v) for v in payload["resolution"])
    if isinstance(text, (tuple, list)):
        w, h = (int(v) for v in text)
    else:
        t = str(text).lower().strip()
        try:
            if "x" in t:
                w, h = (int(v) for v in t.split("x"))
            else:
                w0, h0 = payload["resolution"]
                w = int(t)
                h = int(round(w * h0 / w0)) // scale * scale
        except ValueError:
            raise UserError(f"--resolution {text!r}: expected WIDTHxHEIGHT (e.g. 128x128) or a width") from None
    if w <= 0 or h <= 0 or w % scale or h % scale:
        raise UserError(f"--resolution {text!r}: width and height must be positive multiples of {scale} "
                        "(the student's upsampling factor)")
    return w, h


def prepare(run_dir, out_dir, opts: dict) -> tuple:
    """What every NeLF export starts from: (options without Nones, run folder, output folder
    (created), student, payload, output (width, height)); one-line errors."""
    opts = {k: v for k, v in opts.items() if v is not None}
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model, payload = load_run(run_dir)
    res = _parse_resolution(opts.get("resolution"), payload, model.scale)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the folder ({e.strerror})") from None
    return opts, run_dir, out_dir, model, payload, res


def export(run_dir: Path, fmt: str, out_dir: Path, **opts) -> dict:
    """Export ``RUN/nelf/student.pt`` as ``fmt`` ("onnx", "onnx-int8", "onnx-mixed") into
    ``out_dir``; returns what was written and measured (also saved beside it as JSON):
    ``path``, ``size_mb``, ``fmt``, ``resolution``, ``exporter``, ``max_abs_diff`` (the fp32
    graph vs the torch student, over the test views), ``psnr`` (this file's output vs the torch
    student), ``psnr_vs_fp32``, ``psnr_vs_teacher`` / ``fp32_psnr_vs_teacher`` (when the run
    has its gaussians.ply), ``latency_ms_1thread``; for mixed also ``layers`` (per-layer table).

    Options: ``resolution`` ("WxH", a width, or None for the student's own), ``quantize_head``
    (int8: quantize the first conv too; True), ``calib_poses`` (jittered calibration poses
    beside the test views, 8), ``latency`` (measure 1-thread ms/frame, True), ``teacher``
    (render the teacher for quality figures, True), ``dynamo`` (None: try it, then TorchScript);
    mixed: ``max_drop_db`` (0.3), ``max_mb`` (None), ``progress`` (a bar over the layers, True). Other options are ignored (the CLI passes
    its flags through); None means the default."""
    if fmt not in FORMATS:
        raise UserError(f"unknown ONNX format {fmt!r}; choose one of {', '.join(FORMATS)}")
    opts, run_dir, out_dir, model, payload, res = prepare(run_dir, out_dir, opts)
    evals, calib, cams = held_out_poses(run_dir, n_jitter=int(opts.get("calib_poses", 8)), data=opts.get("data"))
    t0 = time.perf_counter()
    module = pose_model(model, payload, res)
    ref = torch_poses(pose_model(model, payload, res, fold=False), evals)  # the student as distilled
    path = out_dir / ONNX_FILES[fmt]
    src = path if fmt == "onnx" else out_dir / ".nelf-fp32.tmp.onnx"
    exporter = export_torch(module, src, opts.get("dynamo"))
    try:
        fp32_outs = run_poses(session(src), evals)
        result = {
            "fmt": fmt, "preset": payload.get("preset"), "resolution": list(res), "input": [4, 4],
            "input_name": INPUT, "output_name": OUTPUT, "exporter": exporter, "n_eval_views": len(evals),
            "fp32_size_mb": round(size_mb(src), 4),
            "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(fp32_outs, ref))),
        }
        teacher = teacher_images(run_dir, cams, *res, payload) if opts.get("teacher", True) else None
        if teacher is not None:
            result["fp32_psnr_vs_teacher"] = mean_psnr(fp32_outs, teacher)
        if fmt == "onnx":
            outs = fp32_outs
        else:
            enc, convs = encoding_nodes(src)
            quantize_head = bool(opts.get("quantize_head", True))
            quantize_tail = bool(opts.get("quantize_tail", False))
            tail = [] if quantize_tail else tail_nodes(src)
            enc = list(enc) + tail  # the RGB conv and what follows stay float in every variant by default
            result["quantize_tail"] = quantize_tail
            if fmt == "onnx-int8":
                keep = list(enc) + ([] if quantize_head else [convs[0]])
                quantize(src, path, calib, exclude=keep)
                result["float_convs"] = [c for c in convs if c in keep]
                result["quantize_head"] = quantize_head
            else:
                if teacher is None:
                    raise UserError(f"{run_dir}: no gaussians.ply; mixed precision measures PSNR drops against "
                                    "the teacher's renders, so it needs the run's teacher (or use --format onnx-int8)")
                result.update(_mixed(src, path, calib, evals, teacher, enc, convs,
                                     float(opts.get("max_drop_db", 0.3)), opts.get("max_mb"),
                                     progress=bool(opts.get("progress", True))))
            outs = run_poses(session(path), evals)
            result["psnr_vs_fp32"] = mean_psnr(outs, fp32_outs)
            result["max_abs_diff_vs_fp32"] = float(max(np.abs(a - b).max() for a, b in zip(outs, fp32_outs)))
            result["n_calib_poses"] = len(calib)
        result["psnr"] = mean_psnr(outs, ref)
        if teacher is not None:
            result["psnr_vs_teacher"] = mean_psnr(outs, teacher)
        result["path"] = str(path)
        result["size_mb"] = round(size_mb(path), 4)
        result["export_seconds"] = round(time.perf_counter() - t0, 2)
        if opts.get("latency", True):
            result["latency_ms_1thread"] = round(latency_ms(path, evals[0], threads=1), 3)
            if fmt != "onnx":
                result["fp32_latency_ms_1thread"] = round(latency_ms(src, evals[0], threads=1), 3)
    finally:
        if fmt != "onnx":
            Path(src).unlink(missing_ok=True)
    result = _finite(result)
    write_json(path.with_suffix(".json"), result, indent=1, allow_nan=False)
    return result


def _finite(obj):
    """inf / nan (identical images give an infinite PSNR) as None, so the JSON stays strict."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _mixed(src, path, calib, evals, teacher, enc, convs, max_drop_db, max_mb, progress: bool = True) -> dict:
    """Per-layer sensitivity, then the greedy float set; writes ``path``; returns the table.

    The drop of a variant is PSNR(fp32 vs teacher) - PSNR(variant vs teacher) on the held-out
    views. Sensitivity of a conv: the drop with only that conv quantized. Start from every conv
    int8; move the most sensitive convs back to float one at a time until the drop is
    <= ``max_drop_db``, or until the next one would make the file larger than ``max_mb``.
    A conv is measured together with the ReLU it fuses with: alone, its output's uint8 range
    would also span the negatives the ReLU drops (on the small student that read 1.38 dB for a
    conv that costs 0.3 dB in the int8 graph)."""
    fp32_psnr = mean_psnr(run_poses(session(src), evals), teacher)
    params, modules, acts = _conv_weight_sizes(src), conv_modules(src), fused_activations(src)
    drop = lambda p: fp32_psnr - mean_psnr(run_poses(session(p), evals), teacher)  # noqa: E731
    table = []
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        one = Path(tmp) / "one.onnx"
        from tqdm import tqdm

        convs = [c for c in convs if c not in enc]  # the tail, when kept float, is not a choice
        for name in tqdm(convs, desc="per-layer sensitivity", unit="conv", disable=not progress, leave=False):
            quantize(src, one, calib, exclude=enc, only=[name] + acts.get(name, []))
            table.append({"node": name, "module": modules.get(name, name), "params": params.get(name, 0),
                          "drop_db": drop(one)})
        order = sorted(table, key=lambda r: -r["drop_db"])  # most sensitive first
        for rank, r in enumerate(order):
            r["rank"] = rank + 1
        cur = Path(tmp) / "mixed0.onnx"
        quantize(src, cur, calib, exclude=enc)
        d_cur = int8_drop = drop(cur)
        floats, steps = [], [{"float": [], "drop_db": d_cur, "size_mb": size_mb(cur)}]
        for r in order:
            if d_cur <= max_drop_db:
                break
            trial = Path(tmp) / f"mixed{len(floats) + 1}.onnx"
            quantize(src, trial, calib, exclude=list(enc) + floats + [r["node"]])
            if max_mb is not None and size_mb(trial) > float(max_mb):
                break
            d_trial = drop(trial)
            if d_trial > d_cur - 0.01:  # keeping this one float did not help: leave it int8
                steps.append({"float": list(floats), "tried": r["node"], "drop_db": d_trial, "size_mb": size_mb(trial),
                              "kept": False})
                continue
            floats.append(r["node"])
            cur, d_cur = trial, d_trial
            steps.append({"float": list(floats), "drop_db": d_cur, "size_mb": size_mb(trial)})
        os.replace(cur, path)
    for r in table:
        r["drop_db"] = round(r["drop_db"], 4)
    for st in steps:
        st["drop_db"], st["size_mb"] = round(st["drop_db"], 4), round(st["size_mb"], 4)
    return {"layers": table, "int8_drop_db": round(int8_drop, 4), "drop_db": round(d_cur, 4), "steps": steps,
            "float_convs": floats, "max_drop_db": max_drop_db, "max_mb": max_mb}


def layer_table(result: dict) -> str:
    """The per-layer sensitivity table of a mixed export, for printing."""
    floats = set(result.get("float_convs", []))
    lines = [f"{'rank':>4}  {'conv':<16} {'params':>8}  {'drop dB':>8}  kept"]
    for r in sorted(result.get("layers", []), key=lambda r: r["rank"]):
        lines.append(f"{r['rank']:>4}  {r.get('module', r['node']):<16} {r['params']:>8}  {r['drop_db']:>8.3f}  "
                     f"{'float' if r['node'] in floats else 'int8'}")
    return "\n".join(lines)


def _conv_weight_sizes(path) -> dict:
    import onnx

    m = onnx.load(str(path))
    inits = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    return {n.name: inits.get(n.input[1], 0) for n in m.graph.node if n.op_type in CONV_OPS}


def fused_activations(path) -> dict:
    """Conv node name -> the Relu nodes reading only its output: int8 runs them fused into the
    conv (the output's uint8 range starts at 0), so a layer's sensitivity is measured with them."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = {}
    for n in g.node:
        if n.op_type in CONV_OPS:
            users = consumers.get(n.output[0], [])
            out[n.name] = [u.name for u in users if u.op_type == "Relu" and len(users) == 1]
    return out


def conv_modules(path) -> dict:
    """Conv node name -> the student's module path (e.g. "body.0.f.3"), from the dynamo
    exporter's name scopes; the node name where the exporter left none."""
    import ast

    import onnx

    out = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        if n.op_type not in CONV_OPS:
            continue
        props = {p.key: p.value for p in n.metadata_props}
        try:
            scopes = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])
            mod = scopes[-2] if len(scopes) >= 2 else n.name
            out[n.name] = mod[len("model."):] if mod.startswith("model.") else mod
        except (KeyError, ValueError, SyntaxError, IndexError):
            out[n.name] = n.name
    return out


def describe(result: dict) -> str:
    """One line for the CLI."""
    bits = [f"{result['fmt']}: {result['path']} ({result['size_mb']:.2f} MB, {result['resolution'][0]}x"
            f"{result['resolution'][1]}, exporter {result['exporter']})",
            f"max |onnx fp32 - torch| = {result['max_abs_diff']:.2e}"]
    if "psnr_vs_fp32" in result:
        bits.append(f"PSNR vs fp32 {result['psnr_vs_fp32']:.2f} dB, vs torch {result['psnr']:.2f} dB")
    if result.get("fmt") == "onnx-mixed":
        bits.append(f"{len(result.get('float_convs', []))} of {len(result.get('layers', []))} convs kept float, "
                    f"drop {result['drop_db']:.2f} dB vs fp32 against the teacher (all-int8: {result['int8_drop_db']:.2f})")
    if "latency_ms_1thread" in result:
        bits.append(f"{result['latency_ms_1thread']:.1f} ms/frame at 1 thread")
    return "; ".join(bits)
