"""int8 and mixed precision for the exported NeLF graph (``budget3d.export.onnx`` writes the float
graph and calls these for ``onnx-int8`` / ``onnx-mixed``).

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

Mixed precision (the MixDQ idea): the drop of a variant is PSNR(fp32 vs teacher) - PSNR(variant
vs teacher) on the held-out views (the teacher is the run's gaussians.ply). Quantize one conv at
a time for its sensitivity, then start from all-int8 and keep the most sensitive convs in float
until the drop is <= ``max_drop_db`` (0.3 dB) or keeping another one in float would exceed
``max_mb``. The per-layer table comes back in the result (``layer_table`` prints it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from budget3d.export.ortrun import INPUT, mean_psnr, run_poses, session, size_mb
from budget3d.runtime import atomic_path

CONV_OPS = ("Conv", "ConvTranspose")  # the layers mixed precision chooses between


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


# ----------------------------------------------------------------------------- mixed precision


def mixed_precision(src, path, calib, evals, teacher, enc, convs, max_drop_db, max_mb, progress: bool = True) -> dict:
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
