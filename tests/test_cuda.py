"""Every path on a GPU: training (taming / default / mcmc to exact counts, pose refinement,
appearance), distillation (small and grid-small), ONNX export of a CUDA-trained run and the
viewer's server frame from it. Marked ``cuda``: skipped without an NVIDIA GPU, run by
``pytest -m cuda`` and by ``scripts/gpu_check.sh``. (Render and score parity against the CPU
backends live in test_render.py and test_score_parity.py.)"""

import json

import numpy as np
import pytest
import torch

from budget3d.demo import bundled_scene
from budget3d.splat import load_ply
from budget3d.train import TrainConfig, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

BUDGET = 3000


def cfg(out, **kw):
    base = dict(data=str(bundled_scene()), out=str(out), budget=str(BUDGET), iters=400, device="cuda",
                backend="auto", checkpoint_every=0, save_renders=False, eval_max_views=4)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "run"
    return out, train(cfg(out), progress=False)


def test_taming_on_cuda_lands_on_the_budget(cuda_run):
    run, m = cuda_run
    conf = json.loads((run / "config.json").read_text())
    assert conf["device"] == "cuda" and conf["iters"] == 400
    assert m["num_gaussians"] == BUDGET and len(load_ply(run / "gaussians.ply")["means"]) == BUDGET
    assert m["psnr"] > 18  # 400 steps on the bundled scene; the mean colour alone gives about 12


@pytest.mark.parametrize("strategy,budget", [("default", BUDGET), ("mcmc", BUDGET), ("mcmc", 200)])
def test_strategies_on_cuda_land_on_exactly_the_budget(strategy, budget, tmp_path):
    m = train(cfg(tmp_path / "run", strategy=strategy, budget=str(budget)), progress=False)
    assert m["num_gaussians"] == budget
    assert np.isfinite(m["psnr"])


def test_pose_refinement_and_appearance_on_cuda(tmp_path):
    m = train(cfg(tmp_path / "run", pose_opt=True, appearance=True), progress=False)
    assert m["num_gaussians"] == BUDGET and m["psnr"] > 16


def test_cuda_training_matches_the_cpu_backend_in_quality(cuda_run, tmp_path):
    """Same scene, steps and seed on the CPU backend: the two land within 1.5 dB (atomics and
    alpha clamps differ, so not bit-equal)."""
    _, m_cuda = cuda_run
    m_cpu = train(cfg(tmp_path / "run", device="cpu", backend="cpu"), progress=False)
    assert abs(m_cuda["psnr"] - m_cpu["psnr"]) < 1.5, (m_cuda["psnr"], m_cpu["psnr"])


@pytest.mark.parametrize("preset", ["small", "grid-small"])
def test_distill_on_cuda(cuda_run, preset, tmp_path):
    import shutil

    from budget3d.nelf.config import DistillConfig
    from budget3d.nelf.distill import distill

    run = tmp_path / "run"
    shutil.copytree(cuda_run[0], run)
    m = distill(DistillConfig(run=str(run), preset=preset, iters=300, resolution="64x64", device="cuda",
                              checkpoint_every=0, log_every=50), progress=False)
    assert (run / "nelf" / "student.pt").is_file()
    assert m["student_vs_teacher_psnr"] > m["student_vs_teacher_psnr_init"] + 1, m  # it learned


@pytest.fixture(scope="module")
def distilled(cuda_run, tmp_path_factory):
    import shutil

    from budget3d.nelf.config import DistillConfig
    from budget3d.nelf.distill import distill

    run = tmp_path_factory.mktemp("cuda_distilled") / "run"
    shutil.copytree(cuda_run[0], run)
    distill(DistillConfig(run=str(run), preset="small", iters=200, resolution="64x64", device="cuda",
                          checkpoint_every=0), progress=False)
    return run


def test_onnx_export_of_a_cuda_run_equals_its_student(distilled):
    """The student distilled on the GPU exports (on the CPU); ONNX Runtime gives the torch frame
    at poses the export never saw."""
    from budget3d.cli import main
    from budget3d.export import onnx as ex
    from budget3d.export.ortrun import run_poses, session

    assert main(["export", str(distilled), "--format", "onnx,ply"]) == 0
    model, payload = ex.load_run(distilled)
    _, calib, _ = ex.held_out_poses(distilled)
    ref = ex.torch_poses(ex.pose_model(model.cpu(), payload, fold=False), calib[-2:])
    got = run_poses(session(distilled / "export" / "nelf.onnx"), calib[-2:])
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref)) < 1e-4
    assert np.std(got[0]) > 0.01


def test_viewer_frame_from_a_cuda_run(cuda_run):
    """The viewer renders a CUDA run's splats with gsplat on the GPU, and the frame equals our CPU
    backend's render of the same camera."""
    from budget3d.runtime import psnr
    from budget3d.splat import render
    from viewer import engine

    run = engine.Run.open(cuda_run[0])
    assert run.splat_device == "cuda" and run.splat_label == "CUDA"
    cam = run.cameras["test"][0][1]
    img, ms = engine.render_splats(run, cam)
    with torch.no_grad():
        ref = render(run.gaussians, cam, backend="cpu", sh_degree=run.sh_degree,
                     background=torch.tensor(run.background)).image.clamp(0, 1).numpy()
    assert ms > 0 and psnr(img, ref) > 35
