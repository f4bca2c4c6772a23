"""The one CLI: one-line errors with exit code 2, inspect --json, train/eval round trip, demo's
missing-scene message."""

import json
import re
import subprocess
import sys

import cv2
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
    if kind == "truncated jpeg":  # OpenCV would decode it half grey, with only a warning
        make_nerfstudio(root, n=3)
        meta = json.loads((root / "transforms.json").read_text())
        meta["frames"][1]["file_path"] = "images/frame_00001.jpg"
        (root / "transforms.json").write_text(json.dumps(meta))
        jpg = cv2.imencode(".jpg", noise_image(40, 30))[1].tobytes()
        (root / "images" / "frame_00001.jpg").write_bytes(jpg[: len(jpg) * 6 // 10])
        return [root, "--check"], [str(root / "images" / "frame_00001.jpg"), "truncated", "replace the file"]
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


@pytest.mark.parametrize("kind", ["no such folder", "unknown layout", "corrupt image", "truncated jpeg",
                                  "inconsistent size", "unsupported camera model", "empty scene"])
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


def test_inspect_into_a_closed_pipe_exits_quietly(data):
    """``budget3d inspect PATH | head``: the reader may be gone before anything is written (here it
    closes at once, so the write is sure to fail): no BrokenPipeError traceback, exit 1 as Python's docs do."""
    p = subprocess.Popen([sys.executable, "-m", "budget3d", "inspect", str(data)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err


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
    assert not (tmp_path / "a").exists()


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
    code, stdout, err = run_cli(capsys, "demo", "--out", out, "--iters", 8, "--budget", 97, "--backend", "torch",
                                "--distill-iters", 30)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_gaussians"] == 97
    assert (out / "progress.png").is_file() and any((out / "renders").glob("*.png"))
    assert str(out) in stdout and "next:" in stdout and f"budget3d eval {out}" in stdout
    assert "budget3d train --data" in stdout
    # then a tiny NeLF student, both PSNRs printed, its exports and a short bench table
    n = json.loads((out / "nelf" / "metrics.json").read_text())
    assert n["preset"] == "tiny" and n["iters"] == 30
    assert f"test PSNR {n['student_psnr']:.2f} dB (teacher {n['teacher_psnr']:.2f} dB)" in stdout
    for name in ("nelf.onnx", "nelf-int8.onnx", "gaussians.splat"):
        assert (out / "export" / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    names = {v["name"] for v in bench["variants"]}
    assert {"3dgs", "nelf-torch", "onnx-fp32", "onnx-int8"} <= names, names
    for name in ("onnx-int8", "3dgs"):
        assert name in stdout
    assert f"budget3d view {out}" in stdout


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


# ----------------------------------------------------------------------------- every TrainConfig field on the CLI


def _settings():
    """{name: (field, default)} of the TrainConfig fields the CLI sets (all but out and the private resolved)."""
    import dataclasses

    from budget3d.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig) if f.name not in ("out", "resolved")}


def _other_value(f, data):
    """A valid value unlike the default for every field, so that each one is seen to arrive."""
    fixed = dict(data=str(data), budget="61", iters=4, device="cpu", backend="torch", strategy="default",
                 sh_degree=1, downscale=2, checkpoint_every=2, log_every=3, shN_every=2, sh_up_every=2,
                 densify_start=1, densify_stop=3, densify_every=1, opacity_reset_every=0, eval_max_views=1,
                 score="grad")  # text fields take one of a few words
    if f.name in fixed:
        return fixed[f.name]
    if isinstance(f.default, bool):
        return not f.default
    if f.default is None:  # Optional[...]: auto by default
        return True if "bool" in str(f.type) else 7 if "int" in str(f.type) else 0.5 if "float" in str(f.type) \
            else pytest.fail(f"{f.name}: give the new Optional field a valid value in ``fixed``")
    if isinstance(f.default, float):
        return f.default * 0.5 if f.default else 0.25
    if isinstance(f.default, int):
        return f.default + 1
    return f"{f.default}x"  # a new text field: give it a valid value in ``fixed``


def _flag_text(v):
    return json.dumps(v) if isinstance(v, bool) else str(v)


def test_every_config_field_is_a_flag_and_reaches_config_json(capsys, tmp_path, data):
    want = {name: _other_value(f, data) for name, f in _settings().items()}
    assert all(want[name] != f.default for name, f in _settings().items())
    argv = ["train", "--out", tmp_path / "run", "--quiet"]
    for name, v in want.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if _settings()[name].metadata.get("action") == "store_true" else [flag, _flag_text(v)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: saved[k] for k in want} == want
    # a previous run's config.json is a valid --config (its out and resolved are ignored)
    from budget3d.cli import _parser, train_config

    cfg = train_config(_parser().parse_args(["train", "--out", str(tmp_path / "again"),
                                             "--config", str(tmp_path / "run" / "config.json")]))
    assert {k: getattr(cfg, k) for k in want} == want and cfg.out == str(tmp_path / "again")


def test_train_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, f in _settings().items():
        assert "--" + name.replace("_", "-") in out, name
    assert re.search(r"--means-lr X [^-]*\(default: 0\.00016\)", out)
    for text in ("--densify-start N|auto", "(default: auto)",
                 "--visible-adam BOOL", "(default: true)", "--opacity-reset-every", "--set KEY=VALUE", "--config"):
        assert text in out, text


def _cfg(*argv):
    from budget3d.cli import _parser, train_config

    return train_config(_parser().parse_args(["train", *map(str, argv)]))


def test_config_flags_set_precedence_and_value_forms(tmp_path, data):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"data": str(data), "iters": 7, "means_lr": 1e-3, "ssim-lambda": 0.5,
                                "visible_adam": False, "densify_start": 5, "out": "ignored", "resolved": True}))
    out = tmp_path / "r"
    cfg = _cfg("--out", out, "--config", conf)
    assert (cfg.iters, cfg.means_lr, cfg.ssim_lambda, cfg.visible_adam, cfg.densify_start) == (7, 1e-3, 0.5, False, 5)
    assert cfg.out == str(out) and cfg.resolved is False and cfg.seed == 0  # untouched fields keep their defaults
    # defaults < --config < flags < --set
    cfg = _cfg("--out", out, "--config", conf, "--iters", 8, "--means-lr", 1e-4, "--set", "iters=9",
               "--set", "ssim-lambda=0.1", "--densify-start", "auto", "--shn-lr", "0.5")
    assert (cfg.iters, cfg.means_lr, cfg.ssim_lambda, cfg.densify_start, cfg.shN_lr) == (9, 1e-4, 0.1, None, 0.5)
    for text, value in (("true", True), ("1", True), ("yes", True), ("FALSE", False), ("0", False), ("no", False)):
        assert _cfg("--out", out, "--data", data, "--save-renders", text).save_renders is value
        assert _cfg("--out", out, "--data", data, "--set", f"save_renders={text}").save_renders is value
    cfg = _cfg("--out", out, "--data", data, "--set", "budget=none", "--set", "sh_up_every=NONE", "--budget", "9")
    assert (cfg.budget, cfg.sh_up_every) == (None, None)


@pytest.mark.parametrize("argv, words", [
    (["--iters", "abc"], ["--iters", "whole number", "abc"]),
    (["--means-lr", "fast"], ["--means-lr", "number", "fast"]),
    (["--visible-adam", "maybe"], ["--visible-adam", "true or false", "maybe"]),
    (["--densify-start", "soon"], ["--densify-start", "auto", "soon"]),
    (["--set", "iters=abc"], ["--set iters=abc", "whole number"]),
    (["--set", "densify_strat=3"], ["densify_strat", "densify_start"]),
    (["--set", "iters"], ["KEY=VALUE"]),
    (["--set", "out=x"], ["--out"]),
    (["--config", "missing.json"], ["missing.json"]),
])
def test_bad_settings_are_one_line(capsys, tmp_path, data, argv, words):
    argv = [a.replace("missing.json", str(tmp_path / "missing.json")) for a in argv]
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "r", *argv)
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "r").exists()


def test_bad_config_files_are_one_line(capsys, tmp_path, data):
    for text, words in (('{"iters": 5,', ["not valid JSON"]), ("[1, 2]", ["JSON object"]),
                        ('{"iters": 5, "mean_lr": 1}', ["mean_lr", "means_lr"]), ('{"iters": 2.5}', ["iters", "2.5"]),
                        ('{"visible_adam": "maybe"}', ["visible_adam", "maybe"])):
        conf = tmp_path / "c.json"
        conf.write_text(text)
        code, _, err = run_cli(capsys, "train", "--data", data, "--out", tmp_path / "r", "--config", conf)
        assert_one_line_error(code, err, str(conf), *words)


def test_resume_refuses_every_recipe_setting(capsys, tmp_path):
    run = tmp_path / "run"  # the refusal comes before the run folder is read
    for argv, words in ((["--densify-start", "3"], ["--densify-start"]), (["--set", "means_lr=1"], ["--set means_lr"]),
                        (["--config", tmp_path / "c.json"], ["--config"]),
                        (["--visible-adam", "no", "--set", "seed=2", "--device", "cpu"], ["--visible-adam", "--set seed"])):
        code, _, err = run_cli(capsys, "train", "--out", run, "--resume", *argv)
        assert_one_line_error(code, err, "--resume", *words)
        assert "--device" not in err
    # device and backend are runtime choices: allowed (here the missing run folder is the error)
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--set", "device=cpu", "--backend", "torch")
    assert_one_line_error(code, err, "no such run folder")
