"""The one CLI: one-line errors with exit code 2, inspect --json, train/eval round trip, demo's
missing-scene message."""

import json
import subprocess
import sys

import pytest

from budget3d.cli import main
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
