"""NeLF -> ONNX (fp32, int8, mixed) on a tiny run folder: test_distill's scene and teacher, a
"small" student distilled for a few seconds at 32x32 (so the weights dominate the file and the
student is not a constant image), poses in, images out, checked with onnxruntime."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from budget3d.errors import UserError
from budget3d.export import onnx as ex
from budget3d.export.ortrun import mean_psnr, run_poses, session
from budget3d.export.quantize import encoding_nodes, layer_table, quantize, tail_nodes
from budget3d.nelf.distill import distill
from budget3d.nelf.students.r2l import build
from test_distill import cfg_for, make_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("export_onnx"))
    m = distill(cfg_for(run, preset="small", iters=150, lr=1e-3), progress=False)
    assert m["student_vs_teacher_psnr"] > m["mean_colour_psnr"] + 3  # learnt something, not a flat image
    return run


@pytest.fixture(scope="module")
def fp32(run):
    return ex.export(run, "onnx", run / "export")


@pytest.fixture(scope="module")
def int8(run, fp32):
    return ex.export(run, "onnx-int8", run / "export")


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    model = build("tiny")
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    folded = ex.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.randn(1, model.in_ch, 6, 5)
    with torch.no_grad():
        assert torch.allclose(folded.decode(x), model.decode(x), atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "mobile-r2l"])
def test_nhwc_shuffles_keep_outputs(preset):
    """The export form of the pixel shuffles (conv channels permuted, NHWC reshape/transpose) is
    exact, for our pixelshuffle stages and for a paper model converted from ConvTranspose (whose
    activation follows the shuffle and is moved before it); no PixelShuffle is left."""
    from budget3d.nelf.students.r2l import convert_to_pixelshuffle

    torch.manual_seed(0)
    model = build(preset, in_ch=12).eval()
    if preset == "mobile-r2l":
        model.body = model.body[:1]  # keep it small; the SR stages are what is checked
        model = convert_to_pixelshuffle(model)
    x = torch.randn(1, 12, 5, 3)
    with torch.no_grad():
        ref = model.decode(x)
        form = ex.nhwc_shuffles(ex.fold_batchnorm(model))
        out = form.decode(x)
    assert not any(isinstance(m, nn.PixelShuffle) for m in form.modules())
    assert sum(isinstance(m, ex.ShuffleNHWC) for m in form.modules()) == len(model.sr)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


def test_fp32_onnx_matches_torch(run, fp32):
    path = run / "export" / "nelf.onnx"
    assert fp32["path"] == str(path) and path.is_file() and fp32["fmt"] == "onnx"
    assert fp32["exporter"] in ("dynamo", "torchscript")
    assert fp32["max_abs_diff"] < 1e-4, fp32
    assert fp32["resolution"] == [32, 32] and fp32["size_mb"] > 0 and fp32["latency_ms_1thread"] > 0
    assert (run / "export" / "nelf.json").is_file()
    sess = session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "c2w" and list(inp.shape) == [4, 4] and inp.type == "tensor(float)"
    assert list(out.shape) == [1, 3, 32, 32]
    # a pose the export never saw, against the student as distilled (BatchNorm not folded)
    model, payload = ex.load_run(run)
    _, calib, _ = ex.held_out_poses(run)
    ref = ex.torch_poses(ex.pose_model(model, payload, fold=False), calib[-2:])
    got = run_poses(sess, calib[-2:])
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) < 1e-4
    assert all(0 <= g.min() and g.max() <= 1 for g in got) and np.std(got[0]) > 0.01


def test_export_at_another_resolution(run, tmp_path):
    r = ex.export(run, "onnx", tmp_path, resolution="16x16", latency=False, teacher=False)
    assert r["resolution"] == [16, 16] and r["max_abs_diff"] < 1e-4
    assert list(session(r["path"]).get_outputs()[0].shape) == [1, 3, 16, 16]
    with pytest.raises(UserError, match="multiples of 4"):
        ex.export(run, "onnx", tmp_path, resolution="30x30")


def test_exporter_fallback_never_keeps_a_broken_file(run, tmp_path):
    """The TorchScript exporter (the fallback) must give a graph onnxruntime loads and that
    matches, or fail loudly, leaving no file (torch 2.13: it fails on encode's movedim)."""
    model, payload = ex.load_run(run)
    module = ex.pose_model(model, payload, (16, 16))
    path = tmp_path / "ts.onnx"
    try:
        assert ex.export_torch(module, path, dynamo=False) == "torchscript"
    except RuntimeError as e:
        assert "torchscript" in str(e) and not path.exists()
        return
    poses = ex.held_out_poses(run)[0]
    got, ref = run_poses(session(path), poses), ex.torch_poses(module, poses)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) < 1e-4


def test_int8_is_smaller_and_close_to_fp32(run, fp32, int8):
    path = run / "export" / "nelf-int8.onnx"
    assert int8["path"] == str(path) and path.is_file()
    assert int8["size_mb"] < 0.6 * fp32["size_mb"], (int8["size_mb"], fp32["size_mb"])
    # measured 40.4 dB vs fp32 on the test views; the teacher PSNR moves by ~0.02 dB
    assert int8["psnr_vs_fp32"] > 30, int8
    assert int8["psnr_vs_teacher"] > int8["fp32_psnr_vs_teacher"] - 0.5, int8
    g = onnx.load(str(path)).graph
    ops = [n.op_type for n in g.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "DepthToSpace" not in ops  # the shuffles are NHWC reshape / transpose (ShuffleNHWC)
    # rays and encoding stay float: nothing upstream of the first conv is quantized
    enc, convs = encoding_nodes(run / "export" / "nelf.onnx")
    by_name = {n.name: n for n in g.node}
    producer = {o: n.name for n in g.node for o in n.output}
    assert {by_name[n].op_type for n in enc} >= {"Sin", "Cos", "Mul"}
    for n in enc:  # fed by float encoding nodes only: no Q/DQ inside the encoding
        assert all(producer[i] in enc for i in by_name[n].input if i in producer), n
    assert int8["float_convs"] == [convs[-1]]  # the RGB tail; the head is int8 by default
    assert int8["quantize_head"] and not int8["quantize_tail"]
    tail = tail_nodes(run / "export" / "nelf.onnx")
    assert convs[-1] in tail and {by_name[n].op_type for n in tail if n in by_name} >= {"Conv", "Sigmoid"}
    consumers = {i for n in g.node if n.op_type == "QuantizeLinear" for i in n.input}
    assert not any(o in consumers for n in tail if n in by_name for o in by_name[n].output)  # nothing after it int8
    x = run_poses(session(path), ex.held_out_poses(run)[0])[0]
    assert x.shape == (1, 3, 32, 32) and np.isfinite(x).all()


def test_quantizing_the_encoding_hurts(run, tmp_path):
    """Why only the network is quantized: one uint8 scale for the points and their sin/cos bands
    loses more than quantizing every conv (measured 35.2 vs 40.5 dB against fp32)."""
    model, payload = ex.load_run(run)
    evals, calib, _ = ex.held_out_poses(run)
    src = tmp_path / "fp32.onnx"
    ex.export_torch(ex.pose_model(model, payload), src)
    ref = run_poses(session(src), evals)
    enc, _ = encoding_nodes(src)
    quantize(src, tmp_path / "all.onnx", calib)
    quantize(src, tmp_path / "net.onnx", calib, exclude=enc)
    p_all = mean_psnr(run_poses(session(tmp_path / "all.onnx"), evals), ref)
    p_net = mean_psnr(run_poses(session(tmp_path / "net.onnx"), evals), ref)
    assert p_net > p_all + 2, (p_net, p_all)


def test_mixed_precision_table_and_budget(run, int8, tmp_path):
    r = ex.export(run, "onnx-mixed", tmp_path / "a", latency=False, progress=False)
    convs = encoding_nodes(run / "export" / "nelf.onnx")[1]
    assert sorted(row["node"] for row in r["layers"]) == sorted(convs[:-1])  # the RGB tail stays float anyway
    assert sorted(row["rank"] for row in r["layers"]) == list(range(1, len(convs)))
    assert all("drop_db" in row and row["params"] > 0 and row["module"] for row in r["layers"])
    assert r["drop_db"] <= 0.3 and r["float_convs"] == []  # plain int8 already within 0.3 dB here
    assert "rank" in layer_table(r) and "head.0" in layer_table(r)
    assert "convs kept float" in ex.describe(r) and "\n" not in ex.describe(r)
    # an unreachable drop target: layers are tried in float, most sensitive first, until max_mb
    # (here int8 costs ~0.01 dB, so a float copy may not help enough to be kept)
    cap = int8["size_mb"] * 1.6
    f = ex.export(run, "onnx-mixed", tmp_path / "b", max_drop_db=-100.0, max_mb=cap, latency=False,
                  progress=False)
    assert f["size_mb"] <= cap and len(f["steps"]) >= 2
    order = [row["node"] for row in sorted(f["layers"], key=lambda row: row["rank"])]
    tried = [s["tried"] if "tried" in s else s["float"][-1] for s in f["steps"][1:]]
    assert tried == order[: len(tried)]  # most sensitive first
    assert [n for n in order if n in f["float_convs"]] == f["float_convs"]
    kept = [s for s in f["steps"] if s.get("kept", True)]  # a layer whose float copy did not help stays int8
    assert [len(s["float"]) for s in kept] == list(range(len(f["float_convs"]) + 1))
    assert all(b["drop_db"] < a["drop_db"] for a, b in zip(kept, kept[1:]))
    assert all(s["drop_db"] > kept[-1]["drop_db"] - 0.01 for s in f["steps"] if not s.get("kept", True))
    assert (f["size_mb"] > r["size_mb"]) == bool(f["float_convs"])
    x = run_poses(session(f["path"]), ex.held_out_poses(run)[0])[0]
    assert x.shape == (1, 3, 32, 32) and np.isfinite(x).all()


def test_bad_inputs_are_one_line_errors(run, tmp_path):
    with pytest.raises(UserError, match="budget3d distill"):
        ex.export(tmp_path, "onnx", tmp_path / "out")
    with pytest.raises(UserError, match="no such run folder"):
        ex.export(tmp_path / "nope", "onnx", tmp_path / "out")
    with pytest.raises(UserError, match="unknown ONNX format"):
        ex.export(run, "onnx-fp16", tmp_path / "out")


def test_cli_exports_onnx(run, tmp_path, capsys):
    from budget3d.cli import main

    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nelf.onnx").is_file() and "max_abs_diff" in capsys.readouterr().out
