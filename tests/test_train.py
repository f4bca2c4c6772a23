"""Trainer: VisibleAdam, a short run that learns, the exact budget, resume == uninterrupted,
Ctrl-C, the default strategy, the run folder's contents, and strategies.py (the config mapping,
the extras each strategy takes, the capped Default's reset and growth against gsplat's versions).
Tiny scenes made here."""

import json
import math
import os
import signal
import warnings

import cv2
import numpy as np
import pytest
import torch

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, Scene, View
from budget3d.splat import random_init, render
from budget3d.train import TrainConfig, TrainingInterrupted, VisibleAdam, evaluate_run, train
from budget3d.train.trainer import resolve_config

SIZE = 32


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenCV world-to-camera (x right, y down, z forward) for a camera at ``eye``."""
    eye, target, up = (np.asarray(v, np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    w2c = np.eye(4)
    w2c[:3, :3] = np.stack([x, y, z])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return w2c


def ring_cameras(n, size=SIZE, radius=4.0, height=1.5, phase=0.0):
    f = size * 1.2
    cams = []
    for i in range(n):
        a = 2 * math.pi * i / n + phase
        eye = (radius * math.cos(a), radius * math.sin(a), height + 0.5 * math.sin(3 * a))
        cams.append(Camera(f, f, size / 2, size / 2, size, size, look_at(eye)))
    return cams


def truth_gaussians(n=80, seed=1):
    """A small coloured blob of Gaussians around the origin: the scene to recover."""
    g = torch.Generator().manual_seed(seed)
    p = random_init(n, (0.0, 0.0, 0.0), 0.8, sh_degree=1, seed=seed)
    p["scales"] = torch.log(torch.rand(n, 3, generator=g) * 0.15 + 0.08)
    p["opacities"] = torch.logit(torch.rand(n, generator=g) * 0.5 + 0.45)
    p["sh0"] = (torch.rand(n, 1, 3, generator=g) - 0.5) * 3.0
    return p


def tiny_scene(n_train=10, n_test=3, size=SIZE, points=60):
    """Views rendered from ``truth_gaussians`` (torch oracle) on white, plus noisy init points."""
    truth = truth_gaussians()
    bg = torch.ones(3)

    def view(name, cam):
        with torch.no_grad():
            img = render(truth, cam, backend="torch", background=bg).image
        arr = (img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        return View(name, cam, lambda arr=arr: arr)

    train = [view(f"train/r_{i}", c) for i, c in enumerate(ring_cameras(n_train, size))]
    test = [view(f"test/r_{i}", c) for i, c in enumerate(ring_cameras(n_test, size, height=1.0, phase=0.4))]
    rng = np.random.default_rng(0)
    pts = (truth["means"].numpy()[:points] + rng.normal(0, 0.05, (points, 3))).astype(np.float32)
    cols = rng.integers(0, 256, (points, 3)).astype(np.uint8)
    return Scene(format="blender", path="<tiny>", train=train, test=test, points=pts, colors=cols)


def write_blender_scene(root, n_train=8, n_test=2, size=SIZE):
    """The tiny scene on disk in the Blender layout (RGBA PNGs, OpenGL c2w, points3d.ply)."""
    from plyfile import PlyData, PlyElement

    scene = tiny_scene(n_train, n_test, size)
    root.mkdir(parents=True, exist_ok=True)
    gl = np.diag([1.0, -1.0, -1.0, 1.0])
    for split, views in (("train", scene.train), ("test", scene.test)):
        (root / split).mkdir(exist_ok=True)
        frames = []
        for v in views:
            cv2.imwrite(str(root / f"{v.name}.png"), cv2.cvtColor(v.image(), cv2.COLOR_RGB2BGR))
            c2w = np.linalg.inv(v.camera.world_to_camera) @ gl
            frames.append({"file_path": f"./{v.name}", "transform_matrix": c2w.tolist()})
        angle = 2 * math.atan(size / 2 / views[0].camera.fx)
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    arr = np.empty(len(scene.points), dtype=[(k, "f4") for k in "xyz"] + [(k, "u1") for k in ("red", "green", "blue")])
    for i, k in enumerate("xyz"):
        arr[k] = scene.points[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        arr[k] = scene.colors[:, i]
    PlyData([PlyElement.describe(arr, "vertex")]).write(str(root / "points3d.ply"))
    return root


def tiny_config(tmp_path, **kw):
    base = dict(data="", out=str(tmp_path / "run"), budget="150", iters=300, backend="torch", sh_degree=1,
                checkpoint_every=0, save_renders=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def scene():
    return tiny_scene()


def mean_colour_psnr(scene):
    mean = np.mean([v.image().reshape(-1, 3).mean(0) for v in scene.train], 0) / 255.0
    vals = [-10 * math.log10(np.mean((v.image() / 255.0 - mean) ** 2)) for v in scene.test]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- VisibleAdam


def test_visible_adam_matches_torch_adam_when_all_rows_visible():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50, 4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours, ref = VisibleAdam([a], lr=1e-2, eps=1e-15), torch.optim.Adam([b], lr=1e-2, eps=1e-15)
    for _ in range(20):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(torch.ones(50, dtype=torch.bool))
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-5)
    assert torch.equal(ours.state[a]["row_step"], torch.full((50,), 20.0))


def test_visible_adam_updates_only_visible_rows_with_per_row_bias_correction():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 3))
    opt = VisibleAdam([p], lr=0.1)
    vis = torch.zeros(10, dtype=torch.bool)
    vis[[1, 4, 7]] = True
    before = p.detach().clone()
    p.grad = torch.randn(10, 3)
    opt.step(vis)
    changed = (p.detach() != before).any(1)
    assert torch.equal(changed, vis)
    st = opt.state[p]
    assert torch.equal(st["row_step"], vis.float())
    assert (st["exp_avg"][~vis] == 0).all() and (st["exp_avg"][vis] != 0).all()
    # a row's first update is a full lr-sized step (bias-corrected by *its* count), even late
    for _ in range(5):
        p.grad = torch.randn(10, 3)
        opt.step(vis)
    late = torch.zeros(10, dtype=torch.bool)
    late[0] = True
    p.grad = torch.ones(10, 3)
    before = p.detach().clone()
    opt.step(late)
    assert torch.allclose(before[0] - p.detach()[0], torch.full((3,), 0.1), atol=1e-5)
    assert torch.equal(p.detach()[1:], before[1:])


def test_visible_adam_torch_path_has_no_host_sync_and_equals_the_gathered_rows(monkeypatch):
    """The path CUDA takes (here forced by float64): a masked update with no ``nonzero()`` or
    ``bool(...)`` (each a host sync per parameter per step on a GPU), bit-equal to updating the
    gathered visible rows and leaving the others untouched."""
    from budget3d.train.optim import _adam_rows

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(12, 2, 3, dtype=torch.float64))
    opt = VisibleAdam([p], lr=0.05)
    m = torch.zeros_like(p.detach())
    v, t, ref = m.clone(), torch.zeros(12), p.detach().clone()  # row_step is float32

    def no_sync(*a, **k):
        raise AssertionError("host sync on the optimiser's path")

    for step in range(6):
        vis = torch.rand(12) < 0.5
        p.grad = torch.randn(12, 2, 3, dtype=torch.float64)
        with monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "nonzero", no_sync)
            mp.setattr(torch.Tensor, "__bool__", no_sync)
            opt.step(vis)
        r = vis.nonzero()[:, 0]
        if len(r):
            pr, mr, vr, tr = ref[r], m[r], v[r], t[r]
            _adam_rows(pr, p.grad[r], mr, vr, tr, 0.05, 0.9, 0.999, 1e-15)
            ref[r], m[r], v[r], t[r] = pr, mr, vr, tr
        assert torch.equal(p.detach(), ref), step
    st = opt.state[p]
    assert torch.equal(st["exp_avg"], m) and torch.equal(st["exp_avg_sq"], v)


def test_default_steps_fit_the_device():
    """No --iters: 3,000 steps on the CPU; on CUDA the 3DGS/Taming schedule (30,000 steps,
    densification every 100 from 500 to 15,000); given values win on both."""
    from budget3d.train.trainer import resolve_config

    cpu = resolve_config(TrainConfig(budget="100"), "cpu")
    assert (cpu.iters, cpu.densify_start, cpu.densify_stop, cpu.densify_every) == (3000, 300, 1800, 100)
    gpu = resolve_config(TrainConfig(budget="100"), "cuda")
    assert (gpu.iters, gpu.densify_start, gpu.densify_stop, gpu.densify_every) == (30_000, 500, 15_000, 100)
    assert gpu.opacity_reset_every == 3000 and gpu.sh_up_every == 1000
    mine = resolve_config(TrainConfig(budget="100", iters=2000, densify_start=50), "cuda")
    assert (mine.iters, mine.densify_start, mine.densify_stop) == (2000, 50, 1200)


def test_visible_adam_cpu_kernel_matches_the_torch_ops():
    from budget3d.train import optim

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300, 15, 3))  # float32 on the CPU: the numba kernel
    b = torch.nn.Parameter(a.detach().double().clone())  # float64: the torch ops
    oa, ob = VisibleAdam([a], lr=1e-2), VisibleAdam([b], lr=1e-2)
    for i in range(12):
        g = torch.randn_like(a)
        vis = torch.rand(300) < 0.6
        a.grad, b.grad = g.clone(), g.double()
        oa.step(vis if i != 3 else None)
        ob.step(vis if i != 3 else None)
        sa, sb = oa.state[a], ob.state[b]
        assert optim._cpu_ok(a, sa["exp_avg"], sa["exp_avg_sq"], sa["row_step"], vis)
        assert not optim._cpu_ok(b, sb["exp_avg"], sb["exp_avg_sq"], sb["row_step"], vis)
    assert torch.equal(sa["row_step"], sb["row_step"]) and sa["row_step"].min() >= 1
    assert torch.allclose(a.detach().double(), b.detach(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(sa["exp_avg_sq"].double(), sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_visible_adam_bias_table_equals_computing_per_row():
    """The kernel reads the bias corrections from a table where it has the row's step count and
    computes them otherwise: the same values, bitwise."""
    from budget3d.train import optim

    torch.manual_seed(0)
    p0, m0, v0, g = torch.randn(500, 7), torch.rand(500, 7), torch.rand(500, 7), torch.randn(500, 7)
    t0 = torch.randint(0, 3000, (500,)).float()
    vis = torch.rand(500) < 0.7
    res = []
    for tab in (optim._bias_table(0.9, 0.999, 3001), None):
        p, m, v, t = p0.clone(), m0.clone(), v0.clone(), t0.clone()
        p.grad = g.clone()
        optim._adam_cpu(p, m, v, t, vis, 1e-2, 0.9, 0.999, 1e-15, tab)
        assert not torch.equal(p, p0) and not torch.equal(v, v0)
        res.append((p, m, v, t))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_visible_adam_state_follows_gsplat_densification_ops():
    from gsplat.strategy.ops import duplicate, remove

    p = {"means": torch.nn.Parameter(torch.randn(6, 3))}
    opts = {"means": VisibleAdam([p["means"]], lr=0.1)}
    p["means"].grad = torch.randn(6, 3)
    opts["means"].step(torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool))
    duplicate(p, opts, {}, torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool))
    st = opts["means"].state[p["means"]]
    assert st["row_step"].tolist() == [1, 1, 0, 1, 0, 1, 0, 0]
    remove(p, opts, {}, torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool))
    st = opts["means"].state[p["means"]]
    assert st["row_step"].tolist() == [1, 0, 1, 0, 1, 0] and st["exp_avg"].shape == (6, 3)
    p["means"].grad = torch.randn(6, 3)
    opts["means"].step(torch.ones(6, dtype=torch.bool))  # still steps after the rows changed


# ----------------------------------------------------------------------------- training


def test_short_run_learns_and_ends_at_exactly_the_budget(tmp_path, scene):
    cfg = tiny_config(tmp_path, budget="137", iters=400, backend="auto")
    m = train(cfg, scene=scene, progress=False)
    assert m["num_gaussians"] == 137 == m["budget"]
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert hist["num_gaussians"] == 137
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    losses = [h["loss"] for h in ckpt["history"]]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    base = mean_colour_psnr(scene)
    assert m["psnr"] >= base + 5.0, (m["psnr"], base)


def test_budget_below_initial_count_shrinks_to_it(tmp_path, scene):
    m = train(tiny_config(tmp_path, budget="40", iters=120, backend="auto"), scene=scene, progress=False)
    assert m["num_gaussians"] == 40


def test_run_folder_has_everything(tmp_path, scene):
    cfg = tiny_config(tmp_path, iters=60, backend="auto", save_renders=True)
    train(cfg, scene=scene, progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "gaussians.ply", "metrics.json", "progress.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "lpips", "num_gaussians", "budget", "train_seconds", "peak_memory_mb", "iters",
                "strategy", "backend"):
        assert key in m, key
    if m["lpips"] is None:
        assert m["lpips_status"].startswith("absent")
    assert m["peak_memory_mb"] > 0 and m["train_seconds"] > 0
    renders = sorted((run / "renders").glob("*.png"))
    assert len(renders) == len(scene.test)
    assert cv2.imread(str(renders[0])).shape == (SIZE, 2 * SIZE, 3)  # ground truth | render
    saved = json.loads((run / "config.json").read_text())
    assert saved["iters"] == 60 and saved["densify_every"] >= 1 and saved["sh_up_every"] >= 1


def _params(run):
    return torch.load(run / "checkpoint.pt", weights_only=False)["params"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, scene):
    """2000 steps straight == Ctrl-C (a real SIGINT) at 1000, then --resume to 2000. On the CPU
    backend: gsplat's CUDA backward accumulates with atomics, so a GPU run is not bit-exact."""
    kw = dict(budget="120", iters=2000, backend="cpu", checkpoint_every=500, sh_degree=1)
    straight = train(tiny_config(tmp_path / "a", **kw), scene=scene, progress=False)

    def ctrl_c_at_1000(session):
        if session.step == 1000:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops after this step
        return False

    cfg = tiny_config(tmp_path / "b", **kw)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(cfg, scene=scene, progress=False, on_step=ctrl_c_at_1000)
    assert torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["step"] == 1000
    assert not (tmp_path / "b" / "run" / "metrics.json").exists()
    resumed = train(TrainConfig(out=cfg.out, backend="cpu"), resume=True, scene=scene, progress=False)

    a, b = _params(tmp_path / "a" / "run"), _params(tmp_path / "b" / "run")
    assert resumed["num_gaussians"] == straight["num_gaussians"] == 120
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert abs(resumed["psnr"] - straight["psnr"]) < 1e-3


def test_default_strategy_runs_and_densifies(tmp_path, scene):
    m = train(tiny_config(tmp_path, strategy="default", budget=None, iters=200, backend="auto"),
              scene=scene, progress=False)
    assert m["strategy"] == "default" and m["budget"] is None
    assert m["num_gaussians"] > len(scene.points)
    assert m["psnr"] > mean_colour_psnr(scene) + 3


def test_torch_backend_and_plain_adam_also_train(tmp_path, scene):
    m = train(tiny_config(tmp_path, iters=60, backend="torch", visible_adam=False, shN_every=1),
              scene=scene, progress=False)
    assert m["num_gaussians"] == 150 and m["backend"] == "torch"


def test_bad_settings_are_user_errors(tmp_path, scene):
    with pytest.raises(UserError, match="budget"):
        train(tiny_config(tmp_path, budget="lots"), scene=scene, progress=False)
    with pytest.raises(UserError, match="budget"):
        train(tiny_config(tmp_path, budget=None), scene=scene, progress=False)
    with pytest.raises(UserError, match="strategy"):
        train(tiny_config(tmp_path, strategy="magic"), scene=scene, progress=False)


def test_evaluate_run_rescores_a_run_folder(tmp_path):
    data = write_blender_scene(tmp_path / "scene")
    cfg = tiny_config(tmp_path, data=str(data), iters=80, backend="auto")
    m = train(cfg, progress=False)
    again = evaluate_run(tmp_path / "run", backend="auto", progress=False)
    assert abs(again["psnr"] - m["psnr"]) < 0.05  # the .ply round trip is float32-exact
    assert again["train_seconds"] == m["train_seconds"]  # training part kept
    with pytest.raises(UserError, match="run folder"):
        evaluate_run(tmp_path / "nothing-here")


def test_cpu_backend_trains_to_the_same_psnr_as_torch(tmp_path, scene):
    """The compiled kernels are a drop-in for the oracle: the same run reaches the same PSNR.
    budget == initial count and no densification step, so no sampling: only float noise separates
    the runs (with sampling, seeds alone move this tiny run by ~0.4 dB)."""
    n0 = len(scene.points)
    ms = {be: train(tiny_config(tmp_path / be, iters=300, backend=be, budget=str(n0), densify_start=400,
                                densify_stop=401), scene=scene, progress=False)
          for be in ("torch", "cpu")}
    assert ms["cpu"]["backend"] == "cpu" and ms["torch"]["backend"] == "torch"
    assert ms["torch"]["psnr"] > mean_colour_psnr(scene) + 5
    assert abs(ms["cpu"]["psnr"] - ms["torch"]["psnr"]) < 0.1, (ms["cpu"]["psnr"], ms["torch"]["psnr"])


# ----------------------------------------------------------------------------- schedules, loss, files


def test_lr_sh_and_shN_schedules(tmp_path, scene):
    """Position lr decays exponentially from lr * extent; the SH degree rises every sh_up_every
    steps; higher-order SH move only on steps that are multiples of shN_every."""
    from budget3d.train import exp_decay

    assert exp_decay(0, 100, 1e-2, 1e-4) == pytest.approx(1e-2)
    assert exp_decay(50, 100, 1e-2, 1e-4) == pytest.approx(1e-3)
    assert exp_decay(100, 100, 1e-2, 1e-4) == pytest.approx(1e-4)
    n0 = len(scene.points)
    cfg = tiny_config(tmp_path, budget=str(n0), iters=24, sh_degree=2, sh_up_every=5, shN_every=4,
                      densify_start=1000, densify_stop=2000, opacity_reset_every=0, backend="torch")
    seen = []

    def record(s):
        lr = s.optimizers["means"].param_groups[0]["lr"]
        seen.append((s.step - 1, s.sh_now, lr, s.params["shN"].detach().clone()))

    train(cfg, scene=scene, progress=False, on_step=record)
    extent = scene.camera_extent()
    assert [sh for _, sh, _, _ in seen] == [min(2, k // 5) for k in range(24)]
    for k, _, lr, _ in seen:
        assert lr == pytest.approx(exp_decay(k, 24, cfg.means_lr * extent, cfg.means_lr_final * extent))
    assert seen[0][2] == pytest.approx(cfg.means_lr * extent) and seen[-1][2] < seen[0][2]
    moved = [k for (k, _, _, a), (_, _, _, b) in zip(seen[1:], seen) if not torch.equal(a, b)]
    assert moved and all(k % 4 == 0 for k in moved), moved
    assert {8, 12, 16, 20} <= set(moved)


def test_loss_is_l1_plus_ssim_term():
    from budget3d.train.metrics import ssim
    from budget3d.train.trainer import _loss

    assert TrainConfig().ssim_lambda == 0.2
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(24, 24, 3, generator=g), torch.rand(24, 24, 3, generator=g)
    l1 = (a - b).abs().mean().item()
    assert _loss(a, b, 0.0).item() == pytest.approx(l1)
    assert _loss(a, b, 0.2).item() == pytest.approx(0.8 * l1 + 0.2 * (1 - ssim(a, b)), rel=1e-5)
    assert _loss(a, a, 0.2).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("h,w", [(200, 200), (37, 53), (11, 11), (12, 300), (8, 40)])
def test_cpu_ssim_matches_pytorch_msssim_value_and_gradient(h, w):
    from pytorch_msssim import ssim as reference

    from budget3d.train.ssim import ssim

    g = torch.Generator().manual_seed(h * 1000 + w)
    gt = torch.rand(h, w, 3, generator=g)
    a = (0.7 * gt + 0.3 * torch.rand(h, w, 3, generator=g)).requires_grad_()
    b = a.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (8 rows: pytorch_msssim skips smoothing along them; so do we)
        ours = ssim(a, gt)
        ref = reference(b.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0, size_average=True)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=2e-6)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5 * b.grad.abs().max().item())
    assert (a.grad != 0).any()


def test_progress_bar_shows_loss_psnr_and_count(tmp_path, scene, capsys):
    train(tiny_config(tmp_path, budget="70", iters=12, backend="torch"), scene=scene, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "psnr=" in err and "n=70" in err, err[-500:]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from budget3d.train import checkpoint as ck

    path = tmp_path / "checkpoint.pt"
    p = {"means": torch.nn.Parameter(torch.randn(5, 3))}
    opts = {"means": VisibleAdam([p["means"]])}
    kw = dict(params=p, optimizers=opts, strategy_state={}, history=[], config={})
    ck.save_checkpoint(path, step=7, **kw)

    def broken_save(obj, f):  # dies half-way through writing
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint(path, step=8, **kw)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 7  # the previous checkpoint is intact


def test_random_background_targets_follow_the_background(tmp_path):
    """Training on random backgrounds recomposites RGBA ground truth on each step's colour."""
    from budget3d.scene import load_scene
    from budget3d.train.trainer import _target, setup

    data = write_blender_scene(tmp_path / "scene", n_train=3, n_test=1)
    for png in (data / "train").glob("*.png"):  # make the white surround transparent
        bgr = cv2.imread(str(png))
        alpha = np.where(bgr.min(-1) >= 250, 0, 255).astype(np.uint8)
        cv2.imwrite(str(png), np.dstack([bgr, alpha]))
    s = setup(tiny_config(tmp_path, data=str(data), random_background=True, backend="torch"))
    colour = (0.2, 0.5, 0.9)
    want = load_scene(data, background=colour).train
    for i in range(3):
        got = _target(s, i, torch.tensor(colour))
        assert np.abs(got.numpy() - want[i].image() / 255.0).max() < 3 / 255
    assert not np.allclose(want[0].image(), s.scene.train[0].image())  # the background did change


# ----------------------------------------------------------------------------- real-capture robustness


def wall_gaussians():
    """A textured wall of 300 Gaussians 4..6 units down +z."""
    g = torch.Generator().manual_seed(3)
    n = 300
    z = torch.rand(n, generator=g) * 2 + 4
    truth = random_init(n, (0.0, 0.0, 5.0), 1.0, sh_degree=1, seed=3)
    truth["means"] = torch.cat([(torch.rand(n, 2, generator=g) * 2 - 1) * z[:, None] * 0.6, z[:, None]], 1)
    truth["scales"] = torch.log(torch.rand(n, 3, generator=g) * 0.2 + 0.2)
    truth["opacities"] = torch.logit(torch.full((n,), 0.9))
    truth["sh0"] = (torch.rand(n, 1, 3, generator=g) - 0.5) * 3.0
    return truth


def forward_facing_scene(n_views=8, size=SIZE):
    """An LLFF-like capture: cameras on a small grid looking down +z at ``wall_gaussians``, with
    near/far bounds and no points (so random init)."""
    truth = wall_gaussians()
    f = size * 1.0
    views = []
    for i in range(n_views):
        w2c = np.eye(4)
        w2c[:3, 3] = -np.array([0.3 * (i % 4) - 0.45, 0.3 * (i // 4) - 0.15, 0.0])
        cam = Camera(f, f, size / 2, size / 2, size, size, w2c)
        with torch.no_grad():
            img = render(truth, cam, backend="torch", background=torch.ones(3)).image
        arr = (img.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
        views.append(View(f"v{i}", cam, lambda arr=arr: arr))
    return Scene(format="llff", path="<ff>", train=views[1:], test=views[:1], near_far=(3.5, 6.5))


def test_forward_facing_scene_gets_frustum_init_with_pixel_colours():
    from budget3d.train.init import initial_points, is_forward_facing

    ff = forward_facing_scene()
    assert is_forward_facing(ff) and not is_forward_facing(tiny_scene())
    pts, cols, what = initial_points(ff, 2000, bg_fraction=0.5, seed=0)
    assert len(pts) == 2000 and "frustum" in what  # the frustums already reach the far bound
    assert (pts[:, 2] > 0.9 * 3.5 * 0.8).all() and (pts[:, 2] < 6.5 + 1e-3).all()
    # every point projects inside at least one training image, and its colour is a real pixel's
    inside = np.zeros(len(pts), bool)
    for v in ff.train:
        c = v.camera
        p = pts @ c.world_to_camera[:3, :3].T + c.world_to_camera[:3, 3]
        u, w = c.fx * p[:, 0] / p[:, 2] + c.cx, c.fy * p[:, 1] / p[:, 2] + c.cy
        inside |= (p[:, 2] > 0) & (u >= 0) & (u <= c.width) & (w >= 0) & (w <= c.height)
    assert inside.all()
    palette = {tuple(px) for v in ff.train for px in v.image().reshape(-1, 3)}
    assert all(tuple(c) in palette for c in cols[:50])


def test_photos_get_background_points_behind_the_foreground():
    from budget3d.train.init import foreground_sphere, has_background_content, initial_points

    ring = tiny_scene()
    photo = Scene(format="colmap", path="<photo>", train=ring.train, test=ring.test, points=ring.points,
                  colors=ring.colors)
    assert not has_background_content(ring)  # Blender: flat background, no extra points
    rng = np.random.default_rng(0)
    noisy = [View(v.name, v.camera, lambda a=v.image(): np.clip(a.astype(int) - rng.integers(0, 60, a.shape), 0, 255)
                  .astype(np.uint8)) for v in ring.train]
    photo.train = noisy
    assert has_background_content(photo)
    pts, cols, what = initial_points(photo, 10, bg_fraction=0.5, seed=0)
    n_sfm = len(ring.points)
    assert len(pts) == n_sfm + round(0.5 * n_sfm) and "background" in what
    assert len(initial_points(photo, 1000, bg_fraction=0.5, seed=0)[0]) == n_sfm + 500  # sparse SfM: as random
    c, r = foreground_sphere(photo, ring.points)
    assert (np.linalg.norm(pts[n_sfm:] - c, axis=1) >= r * 0.999).all()  # behind the foreground


def test_no_collapse_through_resets_and_pruning_on_a_forward_facing_scene(tmp_path):
    """Random frustum init, an opacity reset every 100 steps and pruning: every densification
    step ends exactly on the schedule's target, so the count never falls below it."""
    ff = forward_facing_scene()
    counts = []
    cfg = tiny_config(tmp_path, budget="600", iters=450, backend="auto", init_points=300,
                      densify_start=30, densify_stop=240, densify_every=30, opacity_reset_every=60)
    m = train(cfg, scene=ff, progress=False, on_step=lambda s: counts.append(s.params["means"].shape[0]))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["strategy_state"]
    assert [c for _, c in state["history"]] == state["schedule"]
    steps = [s for s, _ in state["history"]]
    for (step, target), nxt in zip(state["history"], steps[1:] + [cfg.iters]):
        assert min(counts[step:nxt]) >= target  # counts[i] is the count after step i + 1
    assert m["num_gaussians"] == 600 and m["last_step_added"] < 0.05 * 600
    assert m["psnr"] > mean_colour_psnr(ff) + 1


def test_a_strategy_that_empties_the_model_is_a_one_line_error(tmp_path, scene):
    cfg = tiny_config(tmp_path, strategy="default", budget=None, iters=200, backend="auto", init_opacity=0.001,
                      densify_start=10, densify_every=10)
    with pytest.raises(UserError, match="pruned every Gaussian by step 21 .*--strategy taming"):
        train(cfg, scene=scene, progress=False)


def test_the_budget_is_reached_by_the_schedule_on_the_bundled_scene(tmp_path):
    from budget3d.cli import bundled_scene

    cfg = TrainConfig(data=str(bundled_scene()), out=str(tmp_path / "run"), budget="6000", iters=300, sh_degree=1,
                      checkpoint_every=0, save_renders=False, eval_max_views=1)
    m = train(cfg, progress=False)
    assert m["num_gaussians"] == 6000 and m["densify_steps"] >= 10
    assert 0 <= m["last_step_added"] < 0.05 * (6000 - 4000), m["last_step_added"]


def test_short_runs_get_one_opacity_reset_a_third_of_the_way():
    """Under 10k steps: one reset at iters // 3, inside the densification window (10%-60%);
    longer runs reset every 3,000 steps as 3DGS; an explicit 0 stays off."""
    c = resolve_config(TrainConfig(data="", out="x", budget="100", iters=3000))
    assert c.opacity_reset_every == 1000 and c.densify_start < 1000 < c.densify_stop < 2000
    assert resolve_config(TrainConfig(data="", out="x", budget="100", iters=30_000)).opacity_reset_every == 3000
    assert resolve_config(TrainConfig(data="", out="x", budget="100", iters=3000,
                                      opacity_reset_every=0)).opacity_reset_every == 0


def test_default_capped_at_a_budget_ends_exactly_there(tmp_path, scene):
    cfg = tiny_config(tmp_path, strategy="default", budget="70", iters=200, backend="auto", log_every=1)
    m = train(cfg, scene=scene, progress=False)
    assert m["num_gaussians"] == 70 and m["strategy"] == "default"
    # it lands on the count at its last refinement, so the rest of the run trains what was split
    c = resolve_config(cfg)
    last = (c.densify_stop - 1) // c.densify_every * c.densify_every
    hist = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["history"]
    assert last < 200 - 50 and all(h["count"] == 70 for h in hist if h["step"] > last)


# ----------------------------------------------------------------------------- strategies.py


def test_make_strategy_maps_the_run_config():
    import dataclasses

    from budget3d.budget import BudgetMCMCStrategy, TamingStrategy
    from budget3d.train import strategies

    cfg = resolve_config(TrainConfig(data="", out="x", budget="100", iters=3000))
    t = strategies.make_strategy(cfg, 100, device="cpu")
    assert isinstance(t, TamingStrategy) and t.budget == 100
    assert (t.refine_start_iter, t.refine_stop_iter, t.refine_every, t.reset_every) == \
        (cfg.densify_start, cfg.densify_stop, cfg.densify_every, cfg.opacity_reset_every)
    assert not any(callable(v) for v in vars(t).values())  # no render function held: views come per call
    g = strategies.make_strategy(dataclasses.replace(cfg, score="grad"), 100, device="cpu")
    assert g.n_score_views == 0 and g.w_blend == g.w_opacity == 0 and g.w_grad == 1.0
    d = strategies.make_strategy(dataclasses.replace(cfg, strategy="default"), 70, device="cpu")
    assert isinstance(d, strategies.CappedDefaultStrategy) and d.cap == 70
    assert (d.refine_start_iter, d.refine_stop_iter, d.refine_every, d.reset_every) == \
        (cfg.densify_start, cfg.densify_stop, cfg.densify_every, cfg.opacity_reset_every)
    never = strategies.make_strategy(dataclasses.replace(cfg, strategy="default", opacity_reset_every=0), None,
                                     device="cpu")
    assert never.cap is None and never.reset_every > cfg.iters  # 0 = no reset
    m = strategies.make_strategy(dataclasses.replace(cfg, strategy="mcmc"), 100, device="cpu")
    assert isinstance(m, BudgetMCMCStrategy) and m.budget == 100
    assert (m.refine_start_iter, m.refine_stop_iter, m.refine_every) == \
        (cfg.densify_start, cfg.densify_stop, cfg.densify_every)
    p = {"opacities": torch.zeros(4), "scales": torch.zeros(4, 3)}
    assert float(strategies.regulariser(m, p)) == pytest.approx(0.01 * 0.5 + 0.01 * 1.0)
    assert strategies.regulariser(t, p) == 0.0 and strategies.regulariser(d, p) == 0.0


def test_strategies_get_only_the_extras_they_name():
    from budget3d.train import strategies

    calls = []

    class NeedsLr:
        def step_post_backward(self, params, optimizers, state, step, info, lr):
            calls.append(lr)

    class TakesAnything:
        def step_post_backward(self, params, optimizers, state, step, info, packed=False, **kw):
            calls.append(kw)

    extras = dict(lr=0.5, score_views=None, render_fn=None)
    strategies.step_post_backward(NeedsLr(), {}, {}, {}, 1, {}, **extras)
    strategies.step_post_backward(TakesAnything(), {}, {}, {}, 1, {}, **extras)
    assert calls == [0.5, {}]


def _default_run(strategy, steps, n=6):
    """``strategy.step_post_backward`` over ``steps`` with nothing visible (no growth, no pruning)."""
    params = {"means": torch.nn.Parameter(torch.randn(n, 3)), "scales": torch.nn.Parameter(torch.zeros(n, 3) - 3),
              "quats": torch.nn.Parameter(torch.randn(n, 4)), "opacities": torch.nn.Parameter(torch.full((n,), 3.0))}
    opts = {k: torch.optim.Adam([v], lr=1e-3) for k, v in params.items()}
    state = strategy.initialize_state(scene_scale=1.0)
    for step in steps:
        means2d = torch.zeros(1, n, 2, requires_grad=True)
        means2d.grad = torch.zeros(1, n, 2)
        info = {"means2d": means2d, "radii": torch.zeros(1, n, 2, dtype=torch.int32), "width": 8, "height": 8,
                "n_cameras": 1, "gaussian_ids": None}
        strategy.step_post_backward(params, opts, state, step, info)
    return params


def test_capped_default_resets_opacities_once(monkeypatch):
    """gsplat 1.5.3's DefaultStrategy never resets opacities (``step % self.reset_every == 0 & step > 0``
    is a chained comparison); the capped Default does, at each multiple of reset_every inside the
    refinement window. Where gsplat's own reset works (a later release, or a git install of the fix
    that still says 1.5.3) it adds none, so a reset never fires twice."""
    import gsplat
    import gsplat.strategy.default as gdefault
    from gsplat import DefaultStrategy

    from budget3d.train import strategies

    calls = []
    real = gdefault.reset_opa

    def counted(who):
        def reset(**kw):
            calls.append((who, kw["value"]))
            return real(**kw)
        return reset

    monkeypatch.setattr(strategies, "reset_opa", counted("ours"))
    monkeypatch.setattr(gdefault, "reset_opa", counted("gsplat"))
    kw = dict(refine_start_iter=1000, refine_stop_iter=45, refine_every=1000, reset_every=10)
    if gsplat.__version__ == "1.5.3":
        assert strategies._gsplat_reset_is_broken()
    p = _default_run(strategies.CappedDefaultStrategy(**kw), range(0, 60))
    assert [w for w, _ in calls] == ["ours" if strategies._RESET_IS_BROKEN else "gsplat"] * 4  # 10, 20, 30, 40
    assert torch.sigmoid(p["opacities"]).max() <= 0.011

    real_post = DefaultStrategy.step_post_backward

    def fixed_post(self, params, optimizers, state, step, info, packed=False, **more):  # upstream's fix
        real_post(self, params, optimizers, state, step, info, packed=packed)
        if step < self.refine_stop_iter and step % self.reset_every == 0 and step > 0:
            gdefault.reset_opa(params=params, optimizers=optimizers, state=state, value=self.prune_opa * 2.0)

    monkeypatch.setattr(DefaultStrategy, "step_post_backward", fixed_post)
    assert not strategies._gsplat_reset_is_broken()  # the source, not only the version, decides
    monkeypatch.setattr(gsplat, "__version__", "1.6.0")
    assert not strategies._gsplat_reset_is_broken()
    monkeypatch.setattr(strategies, "_RESET_IS_BROKEN", strategies._gsplat_reset_is_broken())
    calls.clear()
    _default_run(strategies.CappedDefaultStrategy(**kw), range(0, 60))
    assert [w for w, _ in calls] == ["gsplat"] * 4


def test_capped_default_growth_passes_gsplat_arguments_through(monkeypatch):
    from gsplat import DefaultStrategy

    from budget3d.train import strategies

    seen = {}

    def grow_1_6(self, params, optimizers, state, step, scene=None):  # gsplat 1.6 adds scene=
        seen.update(step=step, scene=scene, grad2d=state["grad2d"].clone())
        return 0, 0

    monkeypatch.setattr(DefaultStrategy, "_grow_gs", grow_1_6)
    n = 8
    params = {"means": torch.zeros(n, 3)}
    state = {"grad2d": torch.arange(1.0, n + 1), "count": torch.ones(n), "scene_scale": 1.0}
    assert strategies.CappedDefaultStrategy(cap=10)._grow_gs(params, {}, state, 5, scene="s") == (0, 0)
    assert seen["step"] == 5 and seen["scene"] == "s"
    assert seen["grad2d"].tolist() == [0.0] * 6 + [7.0, 8.0]  # room for 2: only the 2 largest gradients grow
    monkeypatch.setattr(DefaultStrategy, "_grow_gs", lambda self, state, step: (0, 0))  # an incompatible gsplat
    with pytest.raises(UserError, match="_grow_gs"):
        strategies.CappedDefaultStrategy(cap=10)
    strategies.CappedDefaultStrategy()  # uncapped: gsplat's own growth, nothing overridden matters
