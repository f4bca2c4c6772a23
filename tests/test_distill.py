"""Online distillation of a 3DGS run into a NeLF student, on a tiny run folder written directly:
the tiny Blender scene of test_train (rendered from ``truth_gaussians``) and those same Gaussians
as gaussians.ply, so the teacher reproduces the ground truth. 32x32 output, preset tiny."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from budget3d.cli import main
from budget3d.errors import UserError
from budget3d.nelf.distill import (DistillConfig, DistillInterrupted, PoseSampler, at_resolution, distill,
                                   load_student, lr_at, parse_resolution, setup)
from budget3d.nelf.rays import camera_rays, embed
from budget3d.scene.camera import Camera
from budget3d.nelf.students.r2l import PRESETS, build
from budget3d.splat import save_ply
from test_train import truth_gaussians, write_blender_scene

ITERS = 60


def make_run(root):
    scene = write_blender_scene(root / "scene", n_train=8, n_test=2)
    run = root / "run"
    run.mkdir()
    save_ply(truth_gaussians(), run / "gaussians.ply")
    (run / "config.json").write_text(json.dumps({"data": str(scene), "downscale": 1, "sh_degree": 1}))
    return run


def cfg_for(run, **kw):
    base = dict(run=str(run), preset="tiny", iters=ITERS, batch=4, lr=1e-2, warmup=5, resolution="32x32",
                n_poses=200, backend="cpu", checkpoint_every=0, log_every=10)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished distillation: (run folder, metrics)."""
    run = make_run(tmp_path_factory.mktemp("distill"))
    return run, distill(cfg_for(run), progress=False)


def test_distill_writes_metrics_and_files(done):
    run, m = done
    for k in ("teacher_psnr", "student_psnr", "student_vs_teacher_psnr", "student_ssim", "preset", "params",
              "macs_per_frame", "resolution", "distill_seconds"):
        assert k in m, k
    on_disk = json.loads((run / "nelf" / "metrics.json").read_text())
    assert on_disk["student_vs_teacher_psnr"] == m["student_vs_teacher_psnr"]
    assert m["preset"] == "tiny" and m["resolution"] == [32, 32] and m["params"] > 0 and m["macs_per_frame"] > 0
    assert m["teacher_psnr"] > 35  # the teacher is the scene's own Gaussians
    for name in ("checkpoint.pt", "student.pt", "strip.png", "progress.png"):
        assert (run / "nelf" / name).is_file(), name
    import cv2

    strip = cv2.imread(str(run / "nelf" / "strip.png"))
    assert strip.shape == (2 * 32, 3 * 32, 3)  # 2 test views, GT | teacher | student


def test_student_learns_toward_teacher(done):
    _, m = done
    assert m["student_vs_teacher_psnr"] > m["student_vs_teacher_psnr_init"] + 3, m
    assert m["student_psnr"] > m["mean_colour_psnr"], m
    train = [h["psnr"] for h in m["history"] if "psnr" in h]
    assert train[-1] > train[0] + 3


def test_student_pt_rebuilds_the_student(done):
    run, _ = done
    model, p = load_student(run / "nelf" / "student.pt")
    assert p["preset"] == "tiny" and p["resolution"] == [32, 32] and p["n_points"] == 8 and p["freqs"] == 6
    assert p["scale"] == model.scale and 0 < p["near"] < p["far"]
    # the rebuilt model gives the same test image as the distiller's own
    d = setup(cfg_for(run), resume=True)
    view = d.scene.test[0]
    with torch.no_grad():
        ref = d.model.eval()
        ref = d.student([view.camera])
        d.model = model
        out = d.student([view.camera])
    assert torch.allclose(ref, out, atol=1e-6)


def test_students_rebuild_with_the_arch_they_were_distilled_with(done, tmp_path):
    """student.pt records the network's fields; a file from before the residual block and the
    output activation were choices rebuilds with the old x + f(x) block and plain sigmoid, even
    for a preset whose current defaults differ."""
    run, _ = done
    p = torch.load(run / "nelf" / "student.pt", weights_only=False)
    assert p["arch"]["block"] == "add" and load_student(run / "nelf" / "student.pt")[0].arch == p["arch"]
    old = dict(p, preset="mobile-int8", arch=None)  # as if distilled as mobile-int8 before the change
    arch = {**PRESETS["tiny"], "block": "add"}
    old["arch"] = {k: v for k, v in arch.items() if k != "block"}
    torch.save(old, tmp_path / "old.pt")
    model, _ = load_student(tmp_path / "old.pt")
    assert model.arch["block"] == "add" and isinstance(model.body[0].post, torch.nn.Identity)
    assert isinstance(model.out_act, torch.nn.Sigmoid)
    post = build("mobile-int8", in_ch=24)
    assert post.arch["block"] == "post" and isinstance(post.body[0].post, torch.nn.ReLU)
    assert post.arch["out_act"] == "linear"
    assert not isinstance(post.body[0].f[-1], torch.nn.ReLU)  # f ends in BatchNorm; the ReLU is after the add


def test_resume_continues_the_same_trajectory(done, tmp_path):
    ref_run, m_ref = done
    run = make_run(tmp_path)
    with pytest.raises(DistillInterrupted, match="--resume"):
        distill(cfg_for(run), progress=False, on_step=lambda d: d.step == 25)
    ck = torch.load(run / "nelf" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 25
    m = distill(cfg_for(run, iters=999), resume=True, progress=False)  # the saved config wins
    assert m["iters"] == ITERS
    assert torch.load(run / "nelf" / "checkpoint.pt", weights_only=False)["step"] == ITERS
    a = torch.load(ref_run / "nelf" / "student.pt", weights_only=False)["state_dict"]
    b = torch.load(run / "nelf" / "student.pt", weights_only=False)["state_dict"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    assert abs(m["student_vs_teacher_psnr"] - m_ref["student_vs_teacher_psnr"]) < 0.05


def test_pose_sampler_orbits_within_the_training_band(tmp_path):
    run = make_run(tmp_path)
    d = setup(cfg_for(run, iters=1), resume=False)
    poses = d.poses
    assert not poses.forward_facing
    assert poses.camera(0) is d.scene.train[0].camera
    assert poses.batch(3, 4) == poses.batch(3, 4)  # a pure function of (seed, step)
    lo, hi = poses.r_band
    for i in range(poses.n_train, poses.n_train + 20):
        cam = poses.camera(i)
        r = np.linalg.norm(cam.center - poses.centre)
        assert lo - 1e-6 <= r <= hi + 1e-6
        fwd = np.asarray(cam.world_to_camera)[2, :3]
        to_centre = (poses.centre - cam.center) / r
        assert fwd @ to_centre > 0.99  # looks at the centre (up to the small target jitter)
        R = np.asarray(cam.world_to_camera)[:3, :3]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) > 0
        assert (cam.width, cam.height) == (d.scene.train[0].camera.width, d.scene.train[0].camera.height)
    # the teacher's pool renders stay in a bounded cache
    d.teacher.limit = 3
    for i in range(6):
        d.teacher.image(poses.n_train + i)
    assert len(d.teacher.cache) == 3


def test_pose_sampler_forward_facing_box():
    from budget3d.scene.camera import Scene, View

    rng = np.random.default_rng(0)
    cams = []
    for i in range(6):
        w2c = np.eye(4)  # all looking down +z, centres spread in x and y
        w2c[:3, 3] = -np.array([rng.uniform(-1, 1), rng.uniform(-0.5, 0.5), rng.uniform(-0.1, 0.1)])
        cams.append(Camera(30.0, 30.0, 16.0, 16.0, 32, 32, w2c))
    views = [View(f"v{i}", c, lambda: np.zeros((32, 32, 3), np.uint8)) for i, c in enumerate(cams)]
    scene = Scene(format="llff", path="<ff>", train=views, test=[], near_far=(1.0, 10.0))
    poses = PoseSampler(scene, 50, seed=3)
    assert poses.forward_facing
    lo, hi = poses.box
    for i in range(6, 50):
        cam = poses.camera(i)
        assert np.all(cam.center >= lo - 1e-9) and np.all(cam.center <= hi + 1e-9)
        assert np.allclose(np.asarray(cam.world_to_camera)[:3, :3], np.eye(3))
    assert all(0 <= j < 50 for j in poses.batch(0, 16))


def test_resolution_and_schedule():
    cam = Camera(40.0, 40.0, 50.0, 37.5, 100, 75, np.eye(4))
    assert parse_resolution(None, cam, 4) == (100, 72)
    assert parse_resolution("64", cam, 4) == (64, 48)
    assert parse_resolution("32x16", cam, 8) == (32, 16)
    with pytest.raises(UserError, match="multiples of 8"):
        parse_resolution("30x30", cam, 8)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        parse_resolution("big", cam, 8)
    c = at_resolution(cam, 64, 48)
    assert (c.width, c.height) == (64, 48) and math.isclose(c.cx, 32.0) and math.isclose(c.cy, 24.0)
    cfg = DistillConfig(iters=100, warmup=10, lr=1.0, lr_final_frac=0.0)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 55) == pytest.approx(0.5) and lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-9)
    timed = dataclasses.replace(cfg, minutes=1.0)  # the decay follows whichever runs out first
    assert lr_at(timed, 55, 0.0) == pytest.approx(0.5) and lr_at(timed, 10, 30.0) == pytest.approx(0.5)
    assert lr_at(timed, 10, 60.0) == pytest.approx(0.0, abs=1e-9) and lr_at(timed, 5, 60.0) == pytest.approx(0.6)


def test_bad_run_folders_are_one_line_errors(tmp_path, capsys):
    assert main(["distill", str(tmp_path)]) == 2  # a folder, but not a run folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("budget3d: error:") and "not a run folder" in err and "\n" not in err
    (tmp_path / "config.json").write_text(json.dumps({"data": str(tmp_path)}))
    assert main(["distill", str(tmp_path), "--quiet"]) == 2  # a run folder without its Gaussians
    err = capsys.readouterr().err.strip()
    assert "gaussians.ply" in err and "\n" not in err
    assert main(["distill", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown preset"):
        setup(DistillConfig(run=str(tmp_path), preset="huge"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_follow_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): the same global batch, split over the ranks, follows
    the 1-process loss trajectory (BatchNorm statistics per rank are the one difference)."""
    import os
    import subprocess
    import sys

    flags = ["--preset", "tiny", "--iters", "40", "--resolution", "32x32", "--batch", "4", "--backend", "cpu", "--quiet"]
    runs = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        runs[name] = make_run(tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "budget3d", "distill", str(runs["two"]), *flags],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("test PSNR:") == 1  # rank 0 alone reports
    assert main(["distill", str(runs["one"]), *flags]) == 0
    hist = {n: [h["loss"] for h in json.loads((r / "nelf" / "metrics.json").read_text())["history"] if "loss" in h]
            for n, r in runs.items()}
    assert len(hist["one"]) == len(hist["two"]) >= 4
    assert hist["two"][-1] < 0.5 * hist["two"][0]  # it trained
    for a, b in zip(hist["one"], hist["two"]):
        assert abs(a - b) <= 0.1 * a, (hist["one"], hist["two"])
    for name in ("student.pt", "strip.png", "checkpoint.pt"):
        assert (runs["two"] / "nelf" / name).is_file()


def test_ddp_batch_must_split(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="multiple of 2"):
        distill(cfg_for(run, batch=3), progress=False)


def test_crops_are_windows_of_the_whole_view(tmp_path):
    """A crop's rays and teacher pixels are exactly the whole view's inside the window."""
    run = make_run(tmp_path)
    d = setup(cfg_for(run, crop=16))
    idx = d.poses.batch(3, 4)
    gt, cams = d.batch(3, idx)
    assert gt.shape == (4, 16, 16, 3) and all((c.width, c.height) == (16, 16) for c in cams)
    s = d.model.scale
    for i, (img, cam) in enumerate(zip(gt, cams)):
        full_cam = at_resolution(d.poses.camera(idx[i]), d.width, d.height)
        x0, y0 = round(full_cam.cx - cam.cx), round(full_cam.cy - cam.cy)
        assert x0 % s == 0 and y0 % s == 0 and 0 <= x0 <= 16 and 0 <= y0 <= 16
        assert torch.equal(img, d.teacher.image(idx[i])[y0:y0 + 16, x0:x0 + 16])
        whole, part = (embed(d.model.frame.sample(*camera_rays(c, s), d.cfg.n_points), d.cfg.freqs)[0]
                       for c in (full_cam, cam))
        assert torch.allclose(part, whole[:, y0 // s:(y0 + 16) // s, x0 // s:(x0 + 16) // s], atol=1e-5)
    m = distill(cfg_for(run, crop=16, iters=40), progress=False)
    assert m["student_vs_teacher_psnr"] > m["mean_colour_psnr"]


def test_cli_set_reaches_the_config(tmp_path):
    run = make_run(tmp_path)
    assert main(["distill", str(run), "--preset", "tiny", "--iters", "12", "--resolution", "32x32", "--backend", "cpu",
                 "--set", "crop=16", "--set", "lr=0.004", "--quiet"]) == 0
    saved = torch.load(run / "nelf" / "checkpoint.pt", weights_only=False)["config"]
    assert saved["crop"] == 16 and saved["lr"] == 0.004 and saved["iters"] == 12
    assert main(["distill", str(run), "--set", "nope=1"]) == 2


def test_real_image_fine_tune_draws_training_photos(tmp_path):
    run = make_run(tmp_path)
    d = setup(cfg_for(run, iters=40, real_steps=10))
    assert all(i < d.poses.n_train for s in range(30, 40) for i in d.poses.batch(s, 4, real=True))
    gt, _ = d.batch(35, [0, 1])
    from budget3d.nelf.teacher import photo

    want = (photo(d.scene.train[0], d.width, d.height, d.device) * 255 + 0.5).to(torch.uint8).float() / 255
    assert torch.equal(gt[0], want)  # the photo itself, not the teacher's render
    assert 0 in d.teacher.photos and 0 not in d.teacher.cache
    m = distill(cfg_for(run, iters=40, real_steps=10), progress=False)
    assert m["student_psnr"] > m["mean_colour_psnr"]
    with pytest.raises(UserError, match="real_steps"):
        distill(cfg_for(tmp_path, iters=10, real_steps=11), progress=False)


def test_minutes_stops_early_and_still_finishes(tmp_path):
    """--minutes: the loop stops when its time is spent and the run ends as usual (evaluation,
    student.pt, metrics with the steps done)."""
    run = make_run(tmp_path)
    m = distill(cfg_for(run, iters=100000, minutes=1e-4), progress=False)
    assert 1 <= m["steps"] < 100000 and m["iters"] == 100000
    assert (run / "nelf" / "student.pt").is_file() and m["student_vs_teacher_psnr"] is not None
