"""The one CLI: one-line errors with exit code 2, inspect --json, train/eval round trip, demo's
missing-scene message."""

import json
import subprocess
import sys

import pytest

from budget3d.cli import main
from test_scene import colmap_model, make_nerfstudio, noise_image, write_colmap_bin, write_colmap_images, write_png
from test_train import write_blender_scene


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_blender_scene(tmp_path_factory.mktemp("cli") / "scene")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budget3d: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_inspect_json_has_the_required_keys(capsys, data):
    code, out, _ = run_cli(capsys, "inspect", data, "--json")
    assert code == 0
    info = json.loads(out)
    for key in ("format", "n_train", "n_test", "width", "height", "n_points", "n_skipped", "bounds", "path"):
        assert key in info, key
    assert info["format"] == "blender" and info["n_train"] == 8 and info["n_test"] == 2 and info["width"] == 32
    code, out, _ = run_cli(capsys, "inspect", data)
    assert code == 0 and "n_train: 8" in out.splitlines()


def test_inspect_check_decodes_every_image(capsys, data):
    code, out, err = run_cli(capsys, "inspect", data, "--json", "--check")
    assert code == 0, err
    assert json.loads(out)["n_images_checked"] == 10


def test_inspect_reports_skipped_frames_in_one_warning_line(capsys, tmp_path):
    root = make_nerfstudio(tmp_path / "ns", n=5, missing=(1, 3))
    code, out, err = run_cli(capsys, "inspect", root, "--json")
    assert code == 0, err
    assert json.loads(out)["n_skipped"] == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budget3d: warning: ") and "skipped 2 of 5" in lines[0], err
    assert "frame_00001.png" in lines[0]


def _colmap(root, cameras=None, n_images=3):
    cams, images, pts, rgb = colmap_model(n_images=n_images)
    if cameras is not None:
        cams = cameras
        for im in images:
            im["cam"] = 1
    write_colmap_bin(root / "sparse" / "0", cams, images, pts, rgb)
    write_colmap_images(root, images)
    return root


def _bad_scene(kind, root):
    """A scene folder with one user mistake; returns (argv after 'inspect', words the error must contain)."""
    if kind == "no such folder":
        return [root / "nope"], ["nope", "no such file or folder"]
    if kind == "unknown layout":
        root.mkdir()
        (root / "photo.png").write_bytes(b"x")
        return [root], [str(root), "unknown scene layout", "transforms.json"]
    if kind == "corrupt image":
        make_nerfstudio(root, n=3)
        (root / "images" / "frame_00001.png").write_bytes(b"this is not a png")
        return [root, "--check"], [str(root / "images" / "frame_00001.png"), "corrupt", "replace the file"]
    if kind == "inconsistent size":
        _colmap(root)
        write_png(root / "images" / "img_002.png", noise_image(41, 30))
        return [root, "--check"], [str(root / "images" / "img_002.png"), "41x30", "40x30", "re-export"]
    if kind == "unsupported camera model":
        _colmap(root, cameras={1: ("FULL_OPENCV", 40, 30, tuple([30.0, 30.0, 20.0, 15.0] + [0.0] * 8))})
        return [root], [str(root / "sparse" / "0" / "cameras.bin"), "FULL_OPENCV", "not supported", "undistort"]
    if kind == "empty scene":
        root.mkdir()
        (root / "transforms.json").write_text(json.dumps({"fl_x": 10, "w": 8, "h": 8, "frames": []}))
        return [root], [str(root / "transforms.json"), "no frames", "add frames"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no such folder", "unknown layout", "corrupt image", "inconsistent size",
                                  "unsupported camera model", "empty scene"])
def test_bad_scenes_are_one_line_errors(capsys, tmp_path, kind):
    argv, words = _bad_scene(kind, tmp_path / "scene")
    assert_one_line_error(*run_cli(capsys, "inspect", *argv)[::2], *words)


def test_bad_scene_through_the_installed_entry_point(tmp_path):
    argv, words = _bad_scene("corrupt image", tmp_path / "scene")
    r = subprocess.run([sys.executable, "-m", "budget3d", "inspect", *map(str, argv)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("budget3d: error:") and all(w in lines[0] for w in words)


@pytest.mark.parametrize("budget", ["lots", "-5", "0", "12QB"])
def test_bad_budget_is_one_line(capsys, tmp_path, data, budget):
    code, _, err = run_cli(capsys, "train", "--data", data, f"--budget={budget}", "--out", tmp_path / "r",
                           "--iters", 5, "--quiet")
    assert_one_line_error(code, err, "budget")


def test_bad_run_folders_are_one_line(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "missing")[::2], "no such run folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "empty")[::2], "config.json")
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "missing", "--resume")
    assert_one_line_error(code, err, "no such run folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "half", "--resume")
    assert_one_line_error(code, err, "checkpoint.pt")


def test_bad_flags_and_missing_scene_are_one_line(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", "--out", tmp_path / "r", "--bogus")[::2], "--bogus")
    assert_one_line_error(*run_cli(capsys, "train", "--out", tmp_path / "r")[::2], "--data")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "nope", "--budget", "10", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "nope")
    assert_one_line_error(*run_cli(capsys, "inspect", tmp_path)[::2], "unknown scene layout")
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--budget", "10", "--out", tmp_path / "r",
                           "--strategy", "quantum")
    assert_one_line_error(code, err, "quantum")


def test_train_eval_and_resume_through_the_cli(capsys, tmp_path, data):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", data, "--budget", "1.5x", "--out", run, "--iters", 40,
                             "--sh-degree", 1, "--quiet")
    assert code == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_gaussians"] == m["budget"] == 90  # 1.5 x the 60 initial points
    assert "test PSNR" in out
    code, out, err = run_cli(capsys, "eval", run, "--json")
    assert code == 0, err
    assert json.loads(out)["num_gaussians"] == 90
    # a second train into the same folder must not silently overwrite it
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "90", "--out", run)
    assert_one_line_error(code, err, "--resume")
    # --resume keeps the saved recipe: recipe flags are refused, a finished run just re-finishes
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--budget", "99")
    assert_one_line_error(code, err, "--budget")
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 0, err


def test_demo_without_bundled_scene_is_one_line(capsys, tmp_path, monkeypatch):
    import budget3d

    monkeypatch.setattr(budget3d, "__file__", str(tmp_path / "pkg" / "budget3d" / "__init__.py"))
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo")
    assert_one_line_error(code, err, "bundled scene")


def test_module_entry_point_exits_2_with_one_line():
    r = subprocess.run([sys.executable, "-m", "budget3d", "eval", "/nonexistent/run"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("budget3d: error:")


# ----------------------------------------------------------------------------- train/eval/demo audit


def test_more_bad_run_folders_and_outputs_are_one_line(capsys, tmp_path, data):
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")  # valid JSON, not a run config
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "list")[::2], "config.json")
    (tmp_path / "noply").mkdir()
    (tmp_path / "noply" / "config.json").write_text(json.dumps({"data": str(data)}))
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "noply")[::2], "gaussians.ply")
    (tmp_path / "noply" / "gaussians.ply").write_text("garbage")
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "noply")[::2], "gaussians.ply")
    (tmp_path / "noply" / "checkpoint.pt").write_text("garbage")
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "noply", "--resume")
    assert_one_line_error(code, err, "checkpoint.pt")
    (tmp_path / "afile").write_text("x")  # --out is, or is inside, a file
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "10", "--out", out, "--iters", 2,
                               "--quiet")
        assert_one_line_error(code, err, "--out")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only messages")
def test_cuda_only_choices_are_one_line_on_cpu(capsys, tmp_path, data):
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "10", "--out", tmp_path / "a",
                           "--device", "cuda", "--quiet")
    assert_one_line_error(code, err, "--device cuda")
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "10", "--out", tmp_path / "b",
                           "--strategy", "mcmc", "--device", "cpu", "--quiet")
    assert_one_line_error(code, err, "mcmc", "CUDA")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_flags_reach_the_run_config(capsys, tmp_path, data):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "61", "--out", run, "--iters", 6,
                           "--device", "cpu", "--downscale", 2, "--sh-degree", 0, "--strategy", "taming",
                           "--backend", "torch", "--quiet")
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["device"], cfg["downscale"], cfg["sh_degree"], cfg["strategy"], cfg["iters"]) == ("cpu", 2, 0,
                                                                                                 "taming", 6)
    m = json.loads((run / "metrics.json").read_text())
    assert m["num_gaussians"] == m["budget"] == 61 and m["device"] == "cpu"
    for key in ("psnr", "ssim", "num_gaussians", "budget", "train_seconds"):
        assert m[key] is not None, key
    # the default strategy needs no budget
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "d", "--iters", 6,
                           "--downscale", 2, "--strategy", "default", "--backend", "torch", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["strategy"] == "default"


def test_demo_trains_and_says_where_and_what_next(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", out, "--iters", 8, "--budget", 97, "--backend", "torch")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_gaussians"] == 97
    assert (out / "progress.png").is_file() and any((out / "renders").glob("*.png"))
    assert str(out) in stdout and "next:" in stdout and f"budget3d eval {out}" in stdout
    assert "budget3d train --data" in stdout


def test_ctrl_c_during_cli_train_saves_and_resumes(capsys, tmp_path, data, monkeypatch):
    import os
    import signal

    import budget3d.train as bt
    import torch

    real_train = bt.train

    def train_with_ctrl_c(cfg, **kw):
        def ctrl_c(session):
            if session.step == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return False

        return real_train(cfg, on_step=ctrl_c, **kw)

    run = tmp_path / "run"
    monkeypatch.setattr(bt, "train", train_with_ctrl_c)
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "70", "--out", run, "--iters", 6,
                           "--backend", "torch", "--quiet")
    monkeypatch.undo()
    assert code == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--backend", "torch", "--quiet")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["num_gaussians"] == 70
