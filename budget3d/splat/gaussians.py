"""Gaussian parameters (gsplat's names) and Inria-layout .ply read/write.

The .ply uses the attribute names of the original 3DGS code (x y z nx ny nz f_dc_0..2
f_rest_0.. opacity scale_0..2 rot_0..3), with f_rest stored channel-major as 3DGS does, so
SuperSplat, the Inria viewers, nerfstudio's tools and every common splat viewer open it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.splat.knn import knn_mean_dist
from budget3d.splat.project import num_sh_bases, rgb_to_sh0, sh_degree_for

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


def init_from_points(points: np.ndarray, colors: np.ndarray | None, sh_degree: int = 3,
                     opacity: float = 0.1) -> dict[str, torch.Tensor]:
    """3DGS initialisation: isotropic scales from neighbour distances, identity rotations."""
    n = len(points)
    if n == 0:
        raise UserError("cannot initialise Gaussians from an empty point cloud: give points or use random init")
    if colors is None:
        colors = np.full((n, 3), 128, np.uint8)
    dist = knn_mean_dist(points) if n > 1 else np.ones(1, np.float32)
    dist = np.clip(dist, 1e-7, None)
    rgb = torch.as_tensor(np.asarray(colors, np.float32) / 255.0)
    shN = torch.zeros(n, num_sh_bases(sh_degree) - 1, 3)
    return {
        "means": torch.as_tensor(np.asarray(points, np.float32)).clone(),
        "scales": torch.log(torch.as_tensor(dist, dtype=torch.float32))[:, None].repeat(1, 3),
        "quats": torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
        "opacities": torch.logit(torch.full((n,), opacity)),
        "sh0": rgb_to_sh0(rgb)[:, None, :],
        "shN": shN,
    }


def random_init(n: int, center, radius: float, sh_degree: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` points uniform in a cube of half-size ``radius`` around ``center``, random colours."""
    g = np.random.default_rng(seed)
    pts = (g.uniform(-1, 1, (n, 3)) * radius + np.asarray(center)).astype(np.float32)
    cols = g.integers(0, 256, (n, 3)).astype(np.uint8)
    return init_from_points(pts, cols, sh_degree)


def save_ply(params, path) -> None:
    """Write Inria-layout binary little-endian .ply, atomically."""
    from plyfile import PlyData, PlyElement

    p = {k: params[k].detach().cpu().float().numpy() for k in PARAM_KEYS}
    n = len(p["means"])
    f_dc = p["sh0"].reshape(n, 3)
    f_rest = p["shN"].transpose(0, 2, 1).reshape(n, -1)  # channel-major, as 3DGS writes it
    cols = (
        [("x", p["means"][:, 0]), ("y", p["means"][:, 1]), ("z", p["means"][:, 2])]
        + [(f"n{a}", np.zeros(n, np.float32)) for a in "xyz"]
        + [(f"f_dc_{i}", f_dc[:, i]) for i in range(3)]
        + [(f"f_rest_{i}", f_rest[:, i]) for i in range(f_rest.shape[1])]
        + [("opacity", p["opacities"])]
        + [(f"scale_{i}", p["scales"][:, i]) for i in range(3)]
        + [(f"rot_{i}", p["quats"][:, i]) for i in range(4)]
    )
    arr = np.empty(n, dtype=[(name, "f4") for name, _ in cols])
    for name, v in cols:
        arr[name] = v
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    PlyData([PlyElement.describe(arr, "vertex")], byte_order="<").write(str(tmp))
    os.replace(tmp, path)


def load_ply(path) -> dict[str, torch.Tensor]:
    """Read an Inria-layout .ply (as written by 3DGS, gsplat, nerfstudio, SuperSplat export)."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a Gaussian-splat .ply")
    try:
        v = PlyData.read(str(path))["vertex"]
    except Exception as e:  # plyfile raises many types for bad files
        raise UserError(f"{path}: not a readable .ply ({e}); give an Inria-layout Gaussian-splat .ply") from None
    names = set(v.data.dtype.names)
    need = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"}
    if not need <= names:
        raise UserError(
            f"{path}: missing Gaussian attributes {sorted(need - names)}; this is not an Inria-layout "
            "splat .ply (packed 'compressed.ply' files must be decompressed first)"
        )
    n = len(v.data)
    col = lambda k: np.asarray(v[k], np.float32)  # noqa: E731
    rest = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k[7:]))
    k_rest = len(rest) // 3
    sh_degree_for(k_rest)  # validates the count
    f_rest = np.stack([col(k) for k in rest], 1) if rest else np.zeros((n, 0), np.float32)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a))  # noqa: E731
    return {
        "means": t(np.stack([col("x"), col("y"), col("z")], 1)),
        "scales": t(np.stack([col(f"scale_{i}") for i in range(3)], 1)),
        "quats": t(np.stack([col(f"rot_{i}") for i in range(4)], 1)),
        "opacities": t(col("opacity")),
        "sh0": t(np.stack([col(f"f_dc_{i}") for i in range(3)], 1)[:, None, :]),
        "shN": t(f_rest.reshape(n, 3, k_rest).transpose(0, 2, 1)),
    }
