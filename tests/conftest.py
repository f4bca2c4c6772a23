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


os.environ.setdefault("MPLBACKEND", "Agg")
