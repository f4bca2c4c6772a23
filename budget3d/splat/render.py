"""The one renderer API: ``render(params, camera, backend=...)``.

``params`` holds the 3DGS parameters under gsplat's names (a dict or nn.ParameterDict):
means (N,3), scales (N,3) log, quats (N,4) wxyz unnormalised, opacities (N,) logit,
sh0 (N,1,3), shN (N,K,3). Backends:
- "torch": pure PyTorch (rasterize_torch), the oracle;
- "cpu":   compiled numba kernels (budget3d.splat.cpu), same semantics, much faster;
- "cuda":  gsplat.rasterization;
- "auto":  "cuda" for CUDA tensors, "cpu" otherwise.
Colours come from our SH evaluation on every backend, so features are plain channels and
extra per-Gaussian channels ride along (the score trick: d/dc_i sum_p w_p C_p = sum_p w_p a_i T_i).
``viewmat`` (a (4, 4) tensor) replaces the camera's pose; when it requires grad, its gradient is
computed on every backend (camera pose refinement).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from budget3d.scene.camera import Camera
from budget3d.splat.output import RenderOutput, finish
from budget3d.splat.project import Projected, project, sh_to_rgb
from budget3d.splat.rasterize_torch import rasterize_torch

BACKENDS = ("auto", "torch", "cpu", "cuda")

# "cpu" backend: projection and SH colour in numba kernels (cpu.project_sh_cpu); False: the torch
# ops of the "torch" backend (kept for benchmarks and as a fallback)
cpu_fused = True


def resolve_backend(backend: str, device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device(device)
    if backend == "auto":
        return "cuda" if dev.type == "cuda" else "cpu"
    if backend == "cuda" and dev.type != "cuda":
        raise ValueError("backend 'cuda' needs the Gaussians on a CUDA device")
    if backend == "cpu" and dev.type != "cpu":
        raise ValueError("backend 'cpu' needs the Gaussians on the CPU")
    return backend


def render(
    params,
    camera: Camera,
    *,
    backend: str = "auto",
    sh_degree: Optional[int] = None,
    background: Optional[torch.Tensor] = None,
    extra: Optional[torch.Tensor] = None,
    near: float = 0.01,
    far: float = 1e10,
    viewmat: Optional[torch.Tensor] = None,
) -> RenderOutput:
    """Render one view. ``background`` (3,) is added where alpha < 1; ``extra`` (N, K) channels
    are composited with the same weights. ``sh_degree`` defaults to the highest stored.
    ``viewmat``: a world-to-camera (4, 4) tensor used instead of ``camera.world_to_camera``
    (the intrinsics and size stay the camera's); gradients reach it when it requires grad."""
    means = params["means"]
    dev, dt = means.device, means.dtype
    backend = resolve_backend(backend, dev)
    shN = params["shN"]
    max_deg = int(round((shN.shape[1] + 1) ** 0.5)) - 1
    deg = max_deg if sh_degree is None else min(sh_degree, max_deg)
    viewmat = camera.viewmat(dev, dt) if viewmat is None else viewmat.to(dev, dt)
    K = camera.K(dev, dt)
    W, H = camera.width, camera.height
    scales = torch.exp(params["scales"])
    opacities = torch.sigmoid(params["opacities"])
    quats = params["quats"]

    if backend == "cpu" and cpu_fused:
        from budget3d.splat.cpu import project_sh_posed

        m2d, conics, depths, radii, rgb = project_sh_posed(means, quats, scales, opacities, params["sh0"], shN, viewmat,
                                                           K, W, H, near, far, deg)
        p = Projected(m2d, conics, depths, radii)
    elif deg > 0:
        cam_center = -viewmat[:3, :3].T @ viewmat[:3, 3]
        dirs = F.normalize(means - cam_center, dim=-1)
        rgb = sh_to_rgb(params["sh0"], shN, dirs, deg)
    else:
        rgb = sh_to_rgb(params["sh0"], shN, means, 0)
    if background is not None:
        background = torch.as_tensor(background, device=dev, dtype=dt)

    if backend == "cuda":
        from budget3d.splat.cuda import render_cuda

        return render_cuda(means, quats, scales, opacities, rgb, extra, viewmat, K, W, H, background, near, far)

    if not (backend == "cpu" and cpu_fused):
        p = project(means, quats, scales, opacities, viewmat, K, W, H, near, far)
    feats = [rgb, p.depths[:, None]] + ([extra] if extra is not None else [])
    features = torch.cat(feats, -1)
    bg = None
    if background is not None:
        bg = torch.cat([background, torch.zeros(features.shape[1] - 3, device=dev, dtype=dt)])
    if p.means2d.requires_grad:
        p.means2d.retain_grad()
    if backend == "cpu":
        from budget3d.splat.cpu import rasterize_cpu

        img, alpha, n_pixels = rasterize_cpu(p.means2d, p.conics, opacities, features, p.depths, p.radii, W, H, bg)
    else:
        img, alpha, n_pixels = rasterize_torch(p.means2d, p.conics, opacities, features, p.depths, p.radii, W, H, bg)
    return finish(img, alpha, p.means2d, p.radii, n_pixels, p.depths, extra is not None)

