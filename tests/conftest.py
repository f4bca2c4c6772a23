import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_sessionstart(session):
    """Compile the numba kernels up front, on all cores when the cache is cold (a fresh clone: ~25 s
    instead of ~40 s one by one inside the first tests that render)."""
    from budget3d.splat import cpu
    from budget3d.train import optim, ssim

    cpu.warmup(ssim.KERNELS + optim.KERNELS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on a CUDA machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """A test (or the code it calls) that leaves autograd switched off breaks every later test that
    trains (CI once failed 85 tests this way): fail the test that leaked it, and switch it back on."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("autograd was left disabled (torch.set_grad_enabled(False) outside a with-block)")


os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory):
    """One small finished run shared by the bench, web-export and viewer tests: test_distill's tiny
    scene and teacher, a "small" student distilled at 32x32, and RUN/export/ holding nelf.onnx,
    nelf.int8.onnx (whatever names budget3d.export.onnx writes), gaussians.ply/.splat/.spz."""
    from budget3d.cli import main
    from budget3d.export import onnx as ex
    from budget3d.nelf.distill import distill
    from test_distill import cfg_for, make_run

    run = make_run(tmp_path_factory.mktemp("exported_run"))
    distill(cfg_for(run, preset="small", iters=150, lr=1e-3), progress=False)
    for fmt in ("onnx", "onnx-int8"):
        ex.export(run, fmt, run / "export", progress=False)
    assert main(["export", str(run), "--format", "ply,splat,spz"]) == 0
    return run
