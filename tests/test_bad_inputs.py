"""One table of bad inputs for every command: each case is one line on stderr that names the file
or flag, says what was wrong and what to do, exit status 2, no traceback, and nothing new left
under a final name. Then Ctrl-C (130) and kill -9 in the middle of the long commands.

The good run is conftest's ``exported_run`` (a scene, its Gaussians, a small student and its
ONNX exports); each case corrupts its own copy."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from budget3d.cli import main

COMMANDS = ("inspect", "train", "eval", "distill", "export", "bench", "serve", "view")
PY = [sys.executable, "-m", "budget3d.cli"]


def truncate(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not what the name says\n" * 7)


@pytest.fixture(scope="module")
def root(exported_run, tmp_path_factory):
    """A folder with the good run's scene (moved beside it), a plain file and a web folder."""
    r = tmp_path_factory.mktemp("bad_inputs")
    cfg = json.loads((exported_run / "config.json").read_text())
    shutil.copytree(cfg["data"], r / "scene")
    shutil.copytree(exported_run, r / "run")
    cfg["data"] = str(r / "scene")
    (r / "run" / "config.json").write_text(json.dumps(cfg))
    (r / "afile").write_text("a file, not a folder\n")
    (r / "web").mkdir()
    (r / "web" / "index.html").write_text("<!doctype html><title>x</title>\n")
    (r / "web" / "config.json").write_text("{}\n")
    return r


def variant(root: Path, tmp: Path, spoil=None, nelf: bool = True) -> Path:
    """A private copy of the good run, spoiled by ``spoil(run)``; ``nelf=False`` drops its
    distillation (so ``distill`` starts afresh)."""
    run = tmp / "run"
    shutil.copytree(root / "run", run)
    if not nelf:
        shutil.rmtree(run / "nelf")
    if spoil is not None:
        spoil(run)
    return run


def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


# (id, argv with {run} {root} {tmp} {port}, words the message must hold, how to spoil the run, keep nelf)
CASES = [
    # a path that does not exist
    ("inspect-missing", "inspect {tmp}/nope", ["{tmp}/nope", "no such"], None, True),
    ("train-missing", "train --data {tmp}/nope --out {tmp}/o --budget 100", ["{tmp}/nope", "no such"], None, True),
    ("eval-missing", "eval {tmp}/nope", ["{tmp}/nope", "no such run folder"], None, True),
    ("distill-missing", "distill {tmp}/nope", ["{tmp}/nope", "no such run folder"], None, True),
    ("export-missing", "export {tmp}/nope --format ply", ["{tmp}/nope", "no such run folder"], None, True),
    ("bench-missing", "bench {tmp}/nope", ["{tmp}/nope", "no such run folder"], None, True),
    ("serve-missing", "serve {tmp}/nope", ["{tmp}/nope", "no such folder"], None, True),
    ("view-missing", "view {tmp}/nope", ["{tmp}/nope", "no such run folder"], None, True),
    ("train-resume-missing", "train --out {tmp}/nope --resume", ["{tmp}/nope", "no such run folder"], None, True),
    ("process-missing", "process {tmp}/nope --out {tmp}/s", ["{tmp}/nope"], None, True),
    # a file where a folder is expected
    ("process-file", "process {root}/afile --out {tmp}/s", ["{root}/afile"], None, True),
    ("inspect-file", "inspect {root}/afile", ["{root}/afile", "scene folder"], None, True),
    ("train-file", "train --data {root}/afile --out {tmp}/o --budget 100", ["{root}/afile", "scene folder"], None, True),
    ("eval-file", "eval {root}/afile", ["{root}/afile", "is a file"], None, True),
    ("distill-file", "distill {root}/afile", ["{root}/afile", "is a file"], None, True),
    ("export-file", "export {root}/afile --format ply", ["{root}/afile", "is a file"], None, True),
    ("bench-file", "bench {root}/afile", ["{root}/afile", "is a file"], None, True),
    ("serve-file", "serve {root}/afile", ["{root}/afile", "web export"], None, True),
    ("view-file", "view {root}/afile", ["{root}/afile", "is a file"], None, True),
    ("train-out-file", "train --data {root}/scene --out {root}/afile --budget 100", ["{root}/afile", "--out"],
     None, True),
    # run folders from older or unfinished layouts
    ("distill-no-config", "distill {run}", ["{run}", "no config.json"],
     lambda r: (r / "config.json").unlink(), False),
    ("distill-config-no-scene", "distill {run}", ["config.json", "names no scene", "--data"],
     lambda r: (r / "config.json").write_text(json.dumps({"sh_degree": 1})), False),
    ("distill-scene-moved", "distill {run}", ["config.json", "scenes/toy", "is missing", "--data"],
     lambda r: (r / "config.json").write_text(json.dumps({"data": "scenes/toy", "sh_degree": 1})), False),
    ("eval-scene-moved", "eval {run}", ["scenes/toy", "is missing", "--data"],
     lambda r: (r / "config.json").write_text(json.dumps({"data": "scenes/toy", "sh_degree": 1})), True),
    ("export-unfinished-run", "export {run} --format splat", ["{run}", "no gaussians.ply", "budget3d train"],
     lambda r: (r / "gaussians.ply").unlink(), True),
    ("distill-unfinished-run", "distill {run}", ["{run}", "no gaussians.ply", "--resume"],
     lambda r: (r / "gaussians.ply").unlink(), False),
    ("export-onnx-no-student", "export {run} --format onnx", ["{run}", "student.pt", "budget3d distill"],
     None, False),
    ("config-not-json", "eval {run}", ["config.json", "not a readable run config"],
     lambda r: garbage(r / "config.json"), True),
    # truncated or corrupt files
    ("eval-ply", "eval {run}", ["gaussians.ply", "not a readable"], lambda r: truncate(r / "gaussians.ply"), True),
    ("distill-ply", "distill {run}", ["gaussians.ply", "not a readable"], lambda r: truncate(r / "gaussians.ply"),
     False),
    ("export-ply", "export {run} --format spz", ["gaussians.ply", "not a readable"],
     lambda r: truncate(r / "gaussians.ply"), True),
    ("bench-ply", "bench {run} --quick", ["gaussians.ply", "not a readable"],
     lambda r: truncate(r / "gaussians.ply"), True),
    ("view-ply", "view {run} --port 0", ["gaussians.ply", "not a readable"],
     lambda r: garbage(r / "gaussians.ply"), True),
    ("train-resume-checkpoint", "train --out {run} --resume", ["checkpoint.pt", "not a readable"],
     lambda r: garbage(r / "checkpoint.pt"), True),
    ("eval-checkpoint", "eval {run}", ["checkpoint.pt", "not a readable"],
     lambda r: ((r / "gaussians.ply").unlink(), garbage(r / "checkpoint.pt")), True),
    ("distill-resume-checkpoint", "distill {run} --resume", ["nelf/checkpoint.pt", "not a readable"],
     lambda r: truncate(r / "nelf" / "checkpoint.pt"), True),
    ("export-student", "export {run} --format onnx", ["nelf/student.pt", "not a readable"],
     lambda r: truncate(r / "nelf" / "student.pt"), True),
    ("bench-student", "bench {run} --quick", ["nelf/student.pt", "not a readable"],
     lambda r: truncate(r / "nelf" / "student.pt"), True),
    ("view-student", "view {run} --port 0", ["nelf/student.pt", "not a readable"],
     lambda r: garbage(r / "nelf" / "student.pt"), True),
    ("bench-onnx", "bench {run} --quick", ["export/nelf.onnx", "not a readable ONNX"],
     lambda r: truncate(r / "export" / "nelf.onnx"), True),
    ("view-onnx", "view {run} --port 0", ["export/nelf-int8.onnx", "not a readable ONNX"],
     lambda r: garbage(r / "export" / "nelf-int8.onnx"), True),
    ("export-web-onnx", "export {run} --format web", ["nelf-int8.onnx", "not a readable ONNX"],
     lambda r: (garbage(r / "export" / "nelf-int8.onnx"), os.utime(r / "export" / "nelf-int8.onnx")), True),
    # unknown choices and values, in the words they were typed
    ("distill-preset", "distill {run} --preset nope", ["--preset", "nope"], None, False),
    ("export-format", "export {run} --format ply,nope", ["--format", "nope"], None, True),
    ("train-strategy", "train --data {root}/scene --out {tmp}/o --strategy nope", ["--strategy", "nope"], None, True),
    ("train-budget", "train --data {root}/scene --out {tmp}/o --budget lots", ["lots"], None, True),
    ("train-iters", "train --data {root}/scene --out {tmp}/o --budget 100 --iters -5", ["--iters", "-5"], None, True),
    ("distill-iters", "distill {run} --iters -5", ["--iters -5", "positive"], None, False),
    ("distill-iters-existing", "distill {run} --iters -5", ["--iters -5", "positive"], None, True),
    ("distill-batch", "distill {run} --batch 0", ["--batch 0", "positive"], None, False),
    ("distill-set-crop", "distill {run} --set crop=-1", ["--set crop=-1"], None, False),
    ("distill-set-unknown", "distill {run} --set nope=1", ["nope"], None, False),
    ("distill-real-steps", "distill {run} --iters 10 --set real_steps=20", ["--set real_steps=20", "--iters 10"],
     None, False),
    ("bench-threads", "bench {run} --threads x", ["--threads", "x"], None, True),
    ("export-budget", "export {run} --format ply --budget zero", ["--budget", "zero"], None, True),
    # impossible resolutions
    ("distill-res-zero", "distill {run} --resolution 0x0", ["--resolution", "0x0"], None, False),
    ("distill-res-odd", "distill {run} --resolution 33x32", ["--resolution", "33x32", "multiples"], None, False),
    ("distill-res-text", "distill {run} --resolution big", ["--resolution", "big"], None, False),
    ("export-res", "export {run} --format onnx --resolution 5x5", ["--resolution", "5x5"], None, True),
    ("bench-res", "bench {run} --resolutions 0x0", ["--resolutions", "0x0"], None, True),
    ("inspect-downscale", "inspect {root}/scene --downscale 0", ["--downscale 0"], None, True),
    ("train-downscale", "train --data {root}/scene --out {tmp}/o --budget 100 --downscale 0", ["--downscale 0"],
     None, True),
    # ports
    ("serve-port-in-use", "serve {root}/web --port {port}", ["--port", "{port}", "in use"], None, True),
    ("view-port-in-use", "view {run} --port {port}", ["{port}", "in use"], None, True),
    ("serve-port-range", "serve {root}/web --port 70000", ["--port 70000"], None, True),
    ("view-port-range", "view {run} --port 70000", ["--port 70000"], None, True),
    # an output that cannot be written
    ("train-out-unwritable", "train --data {root}/scene --out {root}/afile/run --budget 100 --iters 5",
     ["{root}/afile/run", "--out"], None, True),
    ("export-out-unwritable", "export {run} --format ply --out {root}/afile/x", ["{root}/afile/x", "--out"],
     None, True),
    ("export-onnx-out-unwritable", "export {run} --format onnx --out {root}/afile/x", ["{root}/afile/x"],
     None, True),
    ("distill-out-unwritable", "distill {run}", ["nelf", "cannot create"],
     lambda r: (r / "nelf").write_text("a file where the nelf folder goes"), False),
]


def files_under(path: Path) -> set:
    return {p for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, root, tmp_path, capsys, monkeypatch):
    name, argv, words, spoil, nelf = case
    run = variant(root, tmp_path, spoil, nelf)
    monkeypatch.chdir(tmp_path)  # not where anything was made: paths must not depend on it
    sock = busy_port()
    subs = {"run": str(run), "root": str(root), "tmp": str(tmp_path), "port": str(sock.getsockname()[1])}
    fill = lambda t: t.format(**subs)  # noqa: E731
    before = files_under(tmp_path) | files_under(root)
    try:
        rc = main(fill(argv).split())
    finally:
        sock.close()
    out = capsys.readouterr()
    lines = [ln.split("\r")[-1] for ln in out.err.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    assert rc == 2, (rc, out.err[-2000:])
    assert len(lines) == 1, out.err
    msg = lines[0]
    assert msg.startswith("budget3d: error: ") and "Traceback" not in out.err, msg
    for w in words:
        assert fill(w) in msg, (fill(w), msg)
    assert len(msg) < 500, msg
    if os.environ.get("BAD_INPUTS_LOG"):  # the table of messages, for a release note: BAD_INPUTS_LOG=file pytest ...
        with open(os.environ["BAD_INPUTS_LOG"], "a") as f:
            f.write(f"| {name} | `budget3d {argv}` | {msg.replace(str(tmp_path), '{tmp}').replace(str(root), '{root}')} |\n")
    new = files_under(tmp_path) | files_under(root)
    assert new <= before, f"left behind: {sorted(map(str, new - before))}"


def test_every_command_has_rows():
    from budget3d.cli import COMMANDS as ALL

    covered = {c[1].split()[0] for c in CASES}
    for cmd in set(ALL) - {"demo"}:  # demo takes no input but its own flags (test_cli covers them)
        assert cmd in covered, f"no bad-input rows for '{cmd}'"


def test_port_1_without_root_privileges(root):
    """Port 1 needs privileges: as an ordinary user (root here drops CAP_NET_BIND_SERVICE with
    setpriv), serve and view say so in one line."""
    pre = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: port 1 would bind")
        pre = ["setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service"]
    for argv in (["serve", str(root / "web"), "--port", "1"], ["view", str(root / "run"), "--port", "1"]):
        p = subprocess.run(pre + PY + argv, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
        assert "1" in lines[0] and "permission" in lines[0].lower() and "--port" in lines[0], lines[0]


# ----------------------------------------------------------------------------- older layouts that still work


def test_run_folder_works_from_any_directory(root, tmp_path, monkeypatch, capsys):
    """config.json stores the scene as an absolute path; an older run's relative path is found
    relative to the run folder; a moved scene is pointed to with --data."""
    from budget3d.train import TrainConfig, train

    monkeypatch.chdir(root)
    m = train(TrainConfig(data="scene", out=str(tmp_path / "t"), budget="100", iters=5, checkpoint_every=0,
                          eval_max_views=1, save_renders=False), progress=False)
    assert m["num_gaussians"] == 100
    saved = json.loads((tmp_path / "t" / "config.json").read_text())
    assert saved["data"] == str(root / "scene")  # absolute
    monkeypatch.chdir("/")
    assert main(["eval", str(tmp_path / "t"), "--json"]) == 0
    # an older layout: the path relative to where training ran, which was the run's parent
    old = tmp_path / "old"
    shutil.copytree(root / "run", old / "run")
    shutil.copytree(root / "scene", old / "scene")
    cfg = json.loads((old / "run" / "config.json").read_text())
    cfg["data"] = "../scene"
    (old / "run" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["eval", str(old / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr"] > 15
    cfg["data"] = "gone/scene"
    (old / "run" / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(old / "run")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["eval", str(old / "run"), "--data", str(old / "scene"), "--json"]) == 0
    # splat exports and the viewer's splats need no scene at all
    assert main(["export", str(old / "run"), "--format", "ply,splat", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "gaussians.splat").stat().st_size > 0
    from viewer.engine import Run

    r = Run.open(old / "run")
    assert r.n_gaussians > 0 and "no camera buttons" in r.scene_note and r.cameras["train"] == []


# ----------------------------------------------------------------------------- Ctrl-C and kill -9


def start(argv, **kw):
    # Ctrl-C reaches the child even when these tests run in a background job, where the shell
    # ignores SIGINT and Python then keeps ignoring it
    return subprocess.Popen(PY + [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def wait_for_file(path: Path, proc, timeout=300.0, ok=lambda p: True):
    t = time.time()
    while time.time() - t < timeout:
        if path.is_file() and ok(path):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {path}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {path}")


def read_until(proc, pattern: str, timeout=300.0) -> str:
    """stderr of ``proc`` until ``pattern`` shows (progress bars redraw with \\r)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    os.set_blocking(proc.stderr.fileno(), False)
    buf, t = "", time.time()
    while time.time() - t < timeout:
        if sel.select(timeout=0.2):
            chunk = proc.stderr.read()
            if chunk:
                buf += chunk
        if re.search(pattern, buf):
            return buf
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {pattern!r}: {buf[-2000:]}")
    raise AssertionError(f"timed out waiting for {pattern!r}: {buf[-2000:]}")


def finish(proc, seen="") -> tuple[int, list]:
    os.set_blocking(proc.stderr.fileno(), True)
    _, err = proc.communicate(timeout=300)
    err = seen + err
    lines = [ln.split("\r")[-1] for ln in err.split("\n")]
    bar = re.compile(r"^\s*[\w ]+:\s+\d+%\|.*\| \d+/\d+ \[")  # a progress bar's line (stderr is a pipe here)
    return proc.returncode, [ln for ln in lines if ln.strip() and not bar.match(ln)]


DISTILL = ["--preset", "tiny", "--batch", "4", "--resolution", "32x32", "--backend", "cpu", "--set", "lr=0.01",
           "--set", "warmup=5", "--set", "n_poses=200", "--set", "log_every=1"]


def test_ctrl_c_in_distill_export_and_bench(root, tmp_path):
    run = variant(root, tmp_path, nelf=False)
    # distill: the checkpoint is saved, the message says how to resume
    p = start(["distill", run, "--iters", "100000", *DISTILL])
    seen = read_until(p, r"distill tiny:\s+0%\|.*\| [1-9]\d*/100000")
    p.send_signal(signal.SIGINT)
    rc, lines = finish(p, "")
    assert rc == 130 and len(lines) == 1, (rc, lines)
    assert re.match(r"budget3d: interrupted at step \d+/100000; checkpoint saved to .*checkpoint\.pt\. "
                    r"Resume with: budget3d distill .* --resume$", lines[0]), lines[0]
    import torch

    assert torch.load(run / "nelf" / "checkpoint.pt", weights_only=False)["step"] >= 1
    assert not (run / "nelf" / "student.pt").exists() and not list(run.rglob("*.tmp*"))
    # export: the mixed-precision search is the longest; nothing half-written under any name
    shutil.rmtree(run / "nelf")
    shutil.copytree(root / "run" / "nelf", run / "nelf")
    before = {p.name: p.read_bytes() for p in (run / "export").iterdir()}
    # at 256x256 every candidate's evaluation takes long enough that the search is still running
    # when the signal lands, even on a loaded machine (at the student's 32x32 it could finish first)
    p = start(["export", run, "--format", "onnx-mixed", "--resolution", "256"])
    read_until(p, r"per-layer sensitivity")
    p.send_signal(signal.SIGINT)
    rc, lines = finish(p)
    assert rc == 130 and len(lines) == 1 and lines[0].startswith("budget3d: interrupted"), (rc, lines)
    after = {p.name: p.read_bytes() for p in (run / "export").iterdir()}
    assert after == before, sorted(set(after) ^ set(before))
    # bench: no bench.json from half a measurement
    p = start(["bench", run, "--quick"])
    read_until(p, r"bench:\s+\d+%")
    p.send_signal(signal.SIGINT)
    rc, lines = finish(p)
    assert rc == 130 and len(lines) == 1 and lines[0].startswith("budget3d: interrupted"), (rc, lines)
    assert not (run / "bench.json").exists() and not (run / "bench.png").exists()


def test_kill_9_during_distill_then_resume_equals_an_uninterrupted_run(root, tmp_path):
    args = ["--iters", "120", *DISTILL, "--set", "checkpoint_every=20", "--quiet"]
    ref = variant(root, tmp_path / "ref", nelf=False)
    assert subprocess.run(PY + ["distill", str(ref), *args], capture_output=True, timeout=600).returncode == 0
    run = variant(root, tmp_path / "killed", nelf=False)
    import torch

    p = start(["distill", run, *args])
    wait_for_file(run / "nelf" / "checkpoint.pt", p,
                  ok=lambda f: 20 <= torch.load(f, weights_only=False)["step"] < 120)
    p.kill()
    p.wait()
    assert p.returncode == -signal.SIGKILL
    r = subprocess.run(PY + ["distill", str(run), "--resume", "--backend", "cpu", "--quiet"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads((ref / "nelf" / "metrics.json").read_text())
    b = json.loads((run / "nelf" / "metrics.json").read_text())
    for k in ("student_psnr", "student_vs_teacher_psnr", "student_ssim", "teacher_psnr"):
        assert b[k] == pytest.approx(a[k], abs=1e-3), k
    la = [h["loss"] for h in a["history"] if "loss" in h]
    lb = [h["loss"] for h in b["history"] if "loss" in h]
    assert len(la) == len(lb) == 120 and lb == pytest.approx(la, rel=1e-3)


def test_kill_9_during_export_leaves_the_old_file_or_the_new_one(root, tmp_path):
    """Killed at several moments of an ONNX + splat export: every file under a final name is the
    old one, byte for byte, or a whole new one that loads."""
    from budget3d.export.onnx import session
    from budget3d.splat import load_ply

    names = ("nelf.onnx", "nelf-int8.onnx", "gaussians.ply", "nelf.json", "nelf-int8.json")
    outcomes = set()
    for i, delay in enumerate((0.5, 2.0, 4.0, 7.0)):
        run = variant(root, tmp_path / str(i))
        old = {n: (run / "export" / n).read_bytes() for n in names}
        p = start(["export", run, "--format", "onnx,onnx-int8,ply"])
        time.sleep(delay)
        p.kill()
        p.wait()
        for n in names:
            path = run / "export" / n
            assert path.is_file(), n
            data = path.read_bytes()
            if data == old[n]:
                outcomes.add("old")
                continue
            outcomes.add("new")
            if n.endswith(".onnx"):
                session(path)  # loads: whole
            elif n.endswith(".json"):
                json.loads(data)
            else:
                assert len(load_ply(path)["means"]) > 0
    assert "old" in outcomes  # (and usually "new": the kills land at different stages)
