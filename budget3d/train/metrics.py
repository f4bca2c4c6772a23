"""Image metrics, test-split evaluation with renders saved for a look, and the progress plot.

PSNR is ``runtime.psnr``, SSIM with pytorch-msssim. LPIPS needs backbone weights that are
downloaded at run time by its package: we never download; it is computed only when ``lpips``
is importable *and* its weights are already on disk, and reported as ``None`` ("absent")
otherwise -- never as 0.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from budget3d.runtime import psnr, save_figure


def ssim(img: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM of (H, W, 3) float images in [0, 1] (gaussian window 11, as 3DGS reports)."""
    from pytorch_msssim import ssim as _ssim

    nchw = lambda x: x.permute(2, 0, 1)[None]  # noqa: E731
    return float(_ssim(nchw(img.clamp(0, 1)), nchw(gt), data_range=1.0, size_average=True))


def to_float(image_u8: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(image_u8, device=device).float().div_(255.0)


def _lpips_model(device):
    """An LPIPS(alex) model if the package and every weight file are already local, else (None, why)."""
    try:
        import lpips  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:
        return None, "absent: the lpips package is not installed"
    import lpips

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    backbone = list(hub.glob("alexnet-*.pth")) if hub.is_dir() else []
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not backbone or not linear.is_file():
        return None, "absent: LPIPS weights are not on disk (never downloaded by budget3d)"
    try:
        return lpips.LPIPS(net="alex", verbose=False).to(device).eval(), "ok"
    except Exception as e:  # a partial or corrupt cache must not break evaluation
        return None, f"absent: could not load LPIPS ({type(e).__name__})"


def peak_memory_mb(device) -> dict:
    """Peak resident memory of this process (and peak CUDA allocation on a GPU), in MB."""
    out = {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


@torch.no_grad()
def evaluate(params, views, *, render_fn, background, renders_dir: Optional[Path] = None,
             max_views: int = 0, progress: bool = True) -> dict:
    """PSNR / SSIM / LPIPS over ``views`` (the test split); ``render_fn(params, camera)`` renders.

    With ``renders_dir`` each view is written as ``NAME.png``: ground truth left, render right.
    """
    import cv2
    from tqdm import tqdm

    views = list(views)[:max_views] if max_views and max_views > 0 else list(views)
    device = params["means"].device
    lp_model, lp_status = _lpips_model(device) if views else (None, "absent: no test views")
    rows = []
    if renders_dir is not None:
        Path(renders_dir).mkdir(parents=True, exist_ok=True)
    for view in tqdm(views, desc="eval", disable=not progress or len(views) < 2, leave=False):
        gt = to_float(view.image(), device)
        img = render_fn(params, view.camera).image.clamp(0, 1)
        row = {"name": view.name, "psnr": psnr(img, gt), "ssim": ssim(img, gt)}
        if lp_model is not None:
            nchw = lambda x: x.permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
            row["lpips"] = float(lp_model(nchw(img), nchw(gt)))
        rows.append(row)
        if renders_dir is not None:
            pair = np.concatenate([view.image(), (img.cpu().numpy() * 255 + 0.5).astype(np.uint8)], axis=1)
            name = Path(view.name).with_suffix("").as_posix().replace("/", "_") + ".png"
            cv2.imwrite(str(Path(renders_dir) / name), cv2.cvtColor(pair, cv2.COLOR_RGB2BGR))
    mean = lambda k: round(float(np.mean([r[k] for r in rows])), 4) if rows else None  # noqa: E731
    return {
        "psnr": mean("psnr"),
        "ssim": mean("ssim"),
        "lpips": mean("lpips") if lp_model is not None and rows else None,
        "lpips_status": lp_status,
        "n_test_views": len(rows),
        "per_view": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }


def plot_progress(history: list, path: Path, title: str = "") -> None:
    """Training PSNR and Gaussian count against step, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax1 = plt.subplots(figsize=(7, 4), dpi=100)
    ax1.plot(steps, [h["psnr"] for h in history], color="tab:blue", lw=1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training PSNR (dB)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [h["count"] for h in history], color="tab:orange", lw=1.5)
    ax2.set_ylabel("Gaussians", color="tab:orange")
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
