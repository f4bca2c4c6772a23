"""NeLF student -> ONNX: one graph, camera pose in, image out; float32, int8 and mixed precision.

The graph takes a (4, 4) float32 camera-to-world matrix (OpenCV axes, as ``Camera`` uses) and
returns the (1, 3, H, W) image in [0, 1]. Intrinsics and the output resolution are fixed at
export; the rays (``rays_from_c2w``) and the point encoding (``encode``) are computed inside the
graph from plain torch ops, so a device only has to supply a pose. BatchNorm is folded into the
convs before export, so after the encoding the graph holds only Conv / Relu / Add, the pixel
shuffles as Reshape / Transpose, and the output activation (Sigmoid, or Clip for a linear output).

int8 and mixed precision (``quantize_static`` on held-out poses, what stays float and why, the
per-layer sensitivity search) are in ``budget3d.export.quantize``; running the graphs (sessions,
PSNR, latency) in ``budget3d.export.ortrun``. This module exports, checks the files against the
torch student and the teacher, and writes the JSON sidecar.

Two graph forms make int8 fast and exact (``pose_model``): each super-resolution conv is followed
by its ReLU and then the pixel shuffle (they commute), so the ReLU fuses into the int8 conv and
the shuffle carries the conv's own scale; and the shuffle is written in NHWC (``ShuffleNHWC``),
not as DepthToSpace, whose onnxruntime kernel is NCHW-only and slow on uint8. Together, on the
default small student: int8's drop against the teacher 1.65 -> 0.36 dB, 7.1 -> 5.9 ms. What int8
cannot fix is a network whose activations span thousands: students with a sigmoid output drive
overshooting logits far out (its gradient vanishes there), which cost a 28-block student 5.4 dB;
``mobile-int8`` therefore has a linear output clamped to [0, 1] (0.03 dB; docs/export.md, "Quality of int8").
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from budget3d.errors import UserError
from budget3d.export import ONNX_FILES
from budget3d.export.ortrun import INPUT, OUTPUT, latency_ms, mean_psnr, run_poses, session, size_mb
from budget3d.export.quantize import encoding_nodes, mixed_precision, quantize, tail_nodes
from budget3d.runtime import atomic_path, write_json

FORMATS = tuple(ONNX_FILES)  # onnx, onnx-int8, onnx-mixed


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


@torch.no_grad()
def torch_poses(module: nn.Module, poses: list) -> list:
    """The torch module's (1, 3, H, W) numpy outputs for a list of (4, 4) poses (``run_poses``' reference)."""
    return [module(torch.as_tensor(np.asarray(p, dtype=np.float32))).numpy() for p in poses]


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
                result.update(mixed_precision(src, path, calib, evals, teacher, enc, convs,
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
