"""What every splat-file reader and writer shares: the params dict as numpy arrays and back,
the activations, Morton order and rigid changes of axes (positions, rotations and SH together).

The params dict is the renderer's (gsplat's names, torch float32): means (N,3), scales (N,3) log,
quats (N,4) wxyz, opacities (N,) logit, sh0 (N,1,3), shN (N,K,3) with K = (degree+1)^2 - 1 in
gsplat's coefficient order (the order the Inria .ply's f_rest_* use per channel, and the order of
the glTF extension's SH_DEGREE_l_COEF_n: m = -l..l within each degree).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from budget3d.errors import UserError

C0 = 0.28209479177387814
SH_COUNTS = {0: 0, 1: 3, 2: 8, 3: 15}  # rest coefficients per channel for SH degree 0..3


def sh_degree_of(k: int) -> int:
    d = {0: 0, 3: 1, 8: 2, 15: 3, 24: 4}.get(k)
    if d is None:
        raise ValueError(f"{k} SH rest coefficients is not a whole SH degree")
    return d


def to_numpy(params) -> dict[str, np.ndarray]:
    """The params as float32 numpy arrays; sh0 as (N,3), shN (N,K,3) (K = 0 when absent)."""
    need = ("means", "scales", "quats", "opacities", "sh0")
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(f"Gaussian params lack {missing}")
    out = {k: params[k].detach().cpu().float().numpy() for k in need}
    n = len(out["means"])
    out["shN"] = (params["shN"].detach().cpu().float().numpy() if "shN" in params
                  else np.zeros((n, 0, 3), np.float32))
    out["sh0"] = out["sh0"].reshape(n, 3)
    return out


def to_params(means, scales, quats, opacities, sh0, shN=None) -> dict[str, torch.Tensor]:
    n = len(means)
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    if shN is None:
        shN = np.zeros((n, 0, 3), np.float32)
    return {"means": t(means), "scales": t(scales), "quats": t(quats), "opacities": t(opacities),
            "sh0": t(np.asarray(sh0).reshape(n, 1, 3)), "shN": t(shN)}


def logit(a: np.ndarray) -> np.ndarray:
    a = np.clip(np.asarray(a, np.float64), 1e-6, 1 - 1e-6)
    return np.log(a / (1 - a)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


def unit_quats(q: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(norm > 0, q / np.maximum(norm, 1e-30), np.array([1.0, 0, 0, 0], np.float32))
    return q.astype(np.float32)


def u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def read_bytes(path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a splat file "
                        "(.ply, .compressed.ply, .splat, .spz, .sog, .glb)")
    return path.read_bytes()


# ----------------------------------------------------------------------------- order


def _spread3(v: np.ndarray) -> np.ndarray:
    """21-bit integers with two zero bits after each bit (the x, y or z lane of a 63-bit Morton code)."""
    v = v.astype(np.uint64) & np.uint64(0x1FFFFF)
    for shift, mask in ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F),
                        (4, 0x10C30C30C30C30C3), (2, 0x1249249249249249)):
        v = (v | (v << np.uint64(shift))) & np.uint64(mask)
    return v


def morton_order(means: np.ndarray) -> np.ndarray:
    """Indices that sort the Gaussians along a Z-order curve over their bounding box. PlayCanvas'
    formats store Gaussians this way: neighbours in the file are neighbours in space, so a chunk's
    bounds stay tight (compressed.ply) and the textures compress (SOG)."""
    m = np.asarray(means, np.float64)
    if len(m) == 0:
        return np.zeros(0, np.int64)
    lo, hi = m.min(0), m.max(0)
    q = np.floor((m - lo) / np.maximum(hi - lo, 1e-30) * ((1 << 21) - 1)).astype(np.int64)
    code = _spread3(q[:, 0]) << np.uint64(2) | _spread3(q[:, 1]) << np.uint64(1) | _spread3(q[:, 2])
    return np.argsort(code, kind="stable")


# ----------------------------------------------------------------------------- axes

# The monomial of each real SH basis function (gsplat's order, degrees 1..3) as powers of (x, y, z)
# modulo 2: under an axis-sign change (x, y, z) -> (sx x, sy y, sz z) the coefficient is multiplied
# by sx^px sy^py sz^pz.
_SH_PARITY = np.array([
    (0, 1, 0), (0, 0, 1), (1, 0, 0),                                    # y, z, x
    (1, 1, 0), (0, 1, 1), (0, 0, 0), (1, 0, 1), (0, 0, 0),              # xy, yz, 3z^2-1, xz, x^2-y^2
    (0, 1, 0), (1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 0, 1), (1, 0, 0),
])


def flip_axes(means: np.ndarray, quats_wxyz: np.ndarray, shN, signs) -> tuple:
    """Negate two of the three axes (``signs`` like (1, -1, -1): a half turn about the axis kept),
    a proper rotation and its own inverse: positions, rotations (the quaternion's vector part is an
    axis, so it flips with the positions) and SH coefficients (odd ones change sign)."""
    s = np.asarray(signs, np.float32)
    if s.prod() != 1 or not np.all(np.abs(s) == 1):
        raise ValueError(f"axis signs {signs}: a rotation negates exactly two axes (or none)")
    q = quats_wxyz * np.concatenate([[1.0], s]).astype(np.float32)
    if shN is not None and shN.shape[1]:
        par = _SH_PARITY[: shN.shape[1]]
        shN = shN * np.prod(np.where(par == 1, s[None, :], 1.0), axis=1).astype(np.float32)[:, None]
    return means * s, q, shN


def sh_basis(dirs: np.ndarray, degree: int) -> np.ndarray:
    """Real SH basis values (gsplat's order and signs, degrees 1..``degree``) at unit directions:
    (M, K). Used to rotate SH coefficients for an arbitrary rotation."""
    x, y, z = (dirs[:, i].astype(np.float64) for i in range(3))
    cols = []
    if degree >= 1:
        c1 = 0.4886025119029199
        cols += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        cols += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.31539156525252005 * (2 * zz - xx - yy),
                 -1.0925484305920792 * x * z, 0.5462742152960396 * (xx - yy)]
    if degree >= 3:
        cols += [-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * x * y * z,
                 -0.4570457994644658 * y * (4 * zz - xx - yy), 0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
                 -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
                 -0.5900435899266435 * x * (xx - 3 * yy)]
    return np.stack(cols, 1) if cols else np.zeros((len(dirs), 0))


def sh_rotation(rot: np.ndarray, k: int) -> np.ndarray:
    """(K, K) matrix M with c' = M c: the SH coefficients of f(R^T d) from those of f(d), for the
    first ``k`` rest coefficients (whole degrees). Solved per degree by least squares on sample
    directions, which is exact because each degree is a rotation-invariant subspace."""
    deg = sh_degree_of(k)
    rng = np.random.default_rng(0)
    d = rng.normal(size=(64, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    b = sh_basis(d, deg)
    b_rot = sh_basis(d @ np.asarray(rot, np.float64), deg)  # rows are R^T d
    m = np.zeros((k, k))
    start = 0
    for l in range(1, deg + 1):
        sl = slice(start, start + 2 * l + 1)
        # f'(d) = sum_j c_j Y_j(R^T d) = sum_i c'_i Y_i(d)  =>  B c' = B_rot c
        m[sl, sl] = np.linalg.lstsq(b[:, sl], b_rot[:, sl], rcond=None)[0]
        start += 2 * l + 1
    return m


def quat_to_mat(q_wxyz: np.ndarray) -> np.ndarray:
    w, x, y, z = (q_wxyz[..., i].astype(np.float64) for i in range(4))
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def mat_to_quat(m: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) to unit quaternions wxyz (w >= 0), Shepperd's method."""
    m = np.asarray(m, np.float64)
    tr = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = np.stack([
        np.stack([1 + tr, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        np.stack([m[..., 2, 1] - m[..., 1, 2], 1 + 2 * m[..., 0, 0] - tr, m[..., 0, 1] + m[..., 1, 0],
                  m[..., 0, 2] + m[..., 2, 0]], -1),
        np.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 + 2 * m[..., 1, 1] - tr,
                  m[..., 1, 2] + m[..., 2, 1]], -1),
        np.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                  1 + 2 * m[..., 2, 2] - tr], -1),
    ], -2)
    pick = np.argmax(np.stack([tr, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], -1), -1)
    q = np.take_along_axis(cands, pick[..., None, None], -2)[..., 0, :]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return q * np.where(q[..., :1] < 0, -1.0, 1.0)


def transform(p: dict[str, np.ndarray], matrix: np.ndarray) -> dict[str, np.ndarray]:
    """The Gaussians of ``p`` (``to_numpy``'s arrays) moved by a 4x4 affine ``matrix`` (a glTF node's
    world matrix): means by the whole matrix, covariances M S S^T M^T, SH by M's rotation. A rotation
    times a uniform scale keeps each Gaussian's own axes; any other linear part is exact for the
    covariance too (eigen-decomposed into new axes and scales)."""
    mat = np.asarray(matrix, np.float64)
    lin, t = mat[:3, :3], mat[:3, 3]
    if np.allclose(mat, np.eye(4), atol=1e-12):
        return p
    out = dict(p)
    out["means"] = (p["means"].astype(np.float64) @ lin.T + t).astype(np.float32)
    u, sv, vt = np.linalg.svd(lin)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        raise UserError("the glTF node transform mirrors the splats (negative determinant); the "
                        "KHR_gaussian_splatting extension leaves such splats undefined")
    r_q = quat_to_mat(unit_quats(p["quats"]))
    if np.ptp(sv) <= 1e-6 * sv.max():
        out["quats"] = mat_to_quat(rot[None] @ r_q).astype(np.float32)
        out["scales"] = (p["scales"] + math.log(sv.mean())).astype(np.float32)
    else:
        m = lin[None] @ r_q * np.exp(p["scales"].astype(np.float64))[:, None, :]
        evals, evecs = np.linalg.eigh(m @ m.transpose(0, 2, 1))
        evecs = evecs * np.where(np.linalg.det(evecs) < 0, -1.0, 1.0)[:, None, None]
        out["quats"] = mat_to_quat(evecs).astype(np.float32)
        out["scales"] = (0.5 * np.log(np.maximum(evals, 1e-60))).astype(np.float32)
    k = p["shN"].shape[1]
    if k:
        out["shN"] = np.einsum("ij,njc->nic", sh_rotation(rot, k), p["shN"].astype(np.float64)).astype(np.float32)
    return out
