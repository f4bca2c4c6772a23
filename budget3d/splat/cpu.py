"""The "cpu" backend: a compiled (numba) tile rasterizer with an analytic backward.

Same semantics as ``rasterize_torch`` (see its docstring): pixel centres at +0.5, pairs with
sigma < 0 or alpha < 1/255 skipped, alpha = min(0.99, o exp(-sigma)), front to back by depth with
ties by index, the Gaussian that would bring T to <= 1e-4 ends the pixel, background added with
weight T_final. Differentiable w.r.t. means2d, conics, opacities and features (not background).

Work is float32. Threads: the kernels run on torch's own OpenMP team (see pool) with
``torch.get_num_threads()`` threads, so ``torch.set_num_threads(1)`` simulates a one-core device
(``num_threads`` below overrides the torch count for the kernels only). Results do not depend on
the thread count (bitwise). Kernels are cached on disk (numba ``cache=True``); the first process
compiles them (see ``warmup``).

``exp``: by default the kernels use a branch-free polynomial exp that vectorises (within ~1 ulp of
libm's ``expf``) plus an exact fix-up: every lane whose o*exp(-sigma) lies within a few ulp of the
1/255 cut-off or of the 0.99 clamp, or whose next transmittance lies within a tracked error bound of
the 1e-4 stop, is recomputed with libm's ``exp`` (the transmittance by replaying the pixel) in a rare
scalar path. So the default can NOT move a pixel across any cut-off: which pairs are composited (and
n_pixels) is exactly what the libm path gives; values differ by float noise only. ``exact_exp = True``
(module flag) selects the plain libm path (scalar exp under a branch; slower).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from budget3d.splat import kernels as K
from budget3d.splat import pool

exact_exp = False  # True: libm exp everywhere (see the module docstring); same decisions, slower

# every launch holds _LOCK: renders from a viewer thread and a training thread take turns instead
# of oversubscribing the cores
_LOCK = threading.Lock()


# Threads for the kernels; None (default): torch.get_num_threads(). Set it to run the kernels on
# more threads than torch's own ops (torch's intra-op threads can be the slower choice for the
# small projection ops on a loaded 2-vCPU machine).
num_threads = None


def _threads() -> int:
    return max(1, torch.get_num_threads() if num_threads is None else int(num_threads))


def launch(kernel, *args):
    """Run a worker (``pool.kernel``) the way this module runs its own: under _LOCK, on _threads()."""
    with _LOCK:
        return pool.run(kernel, _threads(), *args)


def _np32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


class _Binning:
    __slots__ = ("rows", "goff", "tile_start", "torder", "gpos", "ep", "TX", "n_entries")


def _bin(m2d, con, op, feat, dep, rad, width, height, nthreads):
    """Entries (Gaussian, tile) whose alpha >= 1/255 ellipse reaches the tile, each with the tile's
    pixel rows it reaches (``rows``, (E, 2)) and its Gaussian's parameters (``ep``, see K.bucket),
    grouped by tile in (depth, index) order."""
    N = m2d.shape[0]
    rect = np.empty((N, 4), dtype=np.int32)
    grows = np.empty((N, 4), dtype=np.int32)
    count = np.empty(N, dtype=np.int64)
    TX = K.prepare(m2d, con, op, rad, width, height, rect, grows, count, nthreads)
    TY = (height + K.TH - 1) // K.TH
    order = K.depth_order(dep.view(np.uint32), count)  # visible Gaussians by (depth, index)
    ub_off = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(count[order], out=ub_off[1:])
    UB = int(ub_off[-1])
    if UB >= 2**31 - 1:
        raise ValueError("cpu rasterizer: more than 2^31 (Gaussian, tile) entries")
    P = np.empty((len(order), 6 + max(feat.shape[1], 4)), dtype=np.float32)
    PR = np.empty((len(order), 8), dtype=np.int32)
    K.sort_params(order, m2d, con, op, feat, rect, grows, P, PR, nthreads)
    ent_tile = np.empty(UB, dtype=np.int32)
    ent_row = np.empty((UB, 2), dtype=np.int32)
    ent_rank = np.empty(UB, dtype=np.int32)
    nchunks = max(1, min(4 * nthreads, len(order) // 256 + 1))
    cnt = np.zeros((nchunks, TX * TY), dtype=np.int64)
    K.cull_entries(P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt, nthreads)
    goff = np.zeros(N + 1, dtype=np.int64)
    np.cumsum(count, out=goff[1:])
    ep = np.empty((int(goff[N]), P.shape[1]), dtype=np.float32)
    tile_start, erow, gpos = K.bucket(order, ub_off, count, goff, ent_tile, ent_row, ent_rank, cnt, P, ep,
                                       nthreads)
    if len(tile_start) > 1 and int(np.diff(tile_start).max()) >= 2**24:
        raise ValueError("cpu rasterizer: more than 2^24 Gaussians overlap one tile")
    b = _Binning()
    b.rows, b.goff, b.tile_start, b.gpos, b.ep, b.TX = erow, goff, tile_start, gpos, ep, TX
    # the forward's threads take tiles from a shared counter in this order: the most entries first,
    # so the last tiles taken are short ones
    b.torder = np.argsort(-np.diff(tile_start), kind="stable")
    b.n_entries = int(goff[N])
    return b


def binning_stats(means2d, conics, opacities, depths, radii, width, height) -> dict:
    """Work counts of one render (for benchmarks): visible Gaussians, (Gaussian, tile) entries and
    pixel lanes evaluated (K.TW per tile row an entry visits)."""
    N = means2d.shape[0]
    with _LOCK:
        b = _bin(_np32(means2d), _np32(conics), _np32(opacities).reshape(N), np.zeros((N, 0), np.float32),
                 _np32(depths).reshape(N),
                 np.ascontiguousarray(radii.detach().to(torch.int32).numpy()).reshape(N, 2), int(width),
                 int(height), _threads())
    lanes = int((b.rows[:, 1] - b.rows[:, 0] + 1).sum()) * K.TW
    return {"visible": int((b.goff[1:] > b.goff[:-1]).sum()), "entries": b.n_entries, "lanes": lanes}


class _RasterizeCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means2d, conics, opacities, features, depths, radii, width, height, background):
        with _LOCK:
            return _RasterizeCPU._forward(ctx, means2d, conics, opacities, features, depths, radii, width, height,
                                          background)

    @staticmethod
    def _forward(ctx, means2d, conics, opacities, features, depths, radii, width, height, background):
        nthreads = _threads()
        N, C = features.shape
        m2d, con, op, feat = _np32(means2d), _np32(conics), _np32(opacities).reshape(N), _np32(features)
        dep = _np32(depths).reshape(N)
        rad = np.ascontiguousarray(radii.detach().to(torch.int32).numpy()).reshape(N, 2)
        has_bg = background is not None
        bg = _np32(background).reshape(C) if has_bg else np.zeros(C, dtype=np.float32)
        b = _bin(m2d, con, op, feat, dep, rad, width, height, nthreads)
        HW = width * height
        img = np.empty((HW, C), dtype=np.float32)
        alpha = np.empty(HW, dtype=np.float32)
        t_final = np.empty(HW, dtype=np.float32)
        last = np.empty(HW, dtype=np.int64)
        ent_count = np.zeros(b.n_entries, dtype=np.int64)
        K.forward(b.ep, b.rows, b.tile_start, b.torder, b.gpos, width, height, b.TX, bg, has_bg, bool(exact_exp), img,
                  alpha, t_final, last, ent_count, nthreads)
        n_pixels = np.empty(N, dtype=np.int64)
        K.reduce_counts(b.goff, ent_count, n_pixels, nthreads)
        ctx.saved = (N, C, bg, has_bg, b, t_final, last, width, height)
        ctx.dtypes = (means2d.dtype, conics.dtype, opacities.dtype, features.dtype)
        dt = features.dtype
        out_img = torch.from_numpy(img).reshape(height, width, C).to(dt)
        out_alpha = torch.from_numpy(alpha).reshape(height, width, 1).to(dt)
        npx = torch.from_numpy(n_pixels)
        ctx.mark_non_differentiable(npx)
        return out_img, out_alpha, npx

    @staticmethod
    def backward(ctx, g_img, g_alpha, _g_npix):
        with _LOCK:
            return _RasterizeCPU._backward(ctx, g_img, g_alpha)

    @staticmethod
    def _backward(ctx, g_img, g_alpha):
        N, C, bg, has_bg, b, t_final, last, width, height = ctx.saved
        nthreads = _threads()
        HW = width * height
        gi = (np.zeros((HW, C), dtype=np.float32) if g_img is None
              else _np32(g_img.reshape(HW, C)))
        ga = (np.zeros(HW, dtype=np.float32) if g_alpha is None
              else _np32(g_alpha.reshape(HW)))
        E = b.n_entries
        eg = np.empty((E, 6 + C), dtype=np.float32)
        K.backward(b.ep, b.rows, b.tile_start, b.gpos, width, height, b.TX, bg, has_bg, bool(exact_exp), t_final, last,
                   gi, ga, eg, nthreads)
        g_mean = np.empty((N, 2), dtype=np.float32)
        g_conic = np.empty((N, 3), dtype=np.float32)
        g_opac = np.empty(N, dtype=np.float32)
        g_feat = np.empty((N, C), dtype=np.float32)
        K.reduce_grads(b.goff, eg, g_mean, g_conic, g_opac, g_feat, nthreads)
        dm, dc, do, df = ctx.dtypes
        return (torch.from_numpy(g_mean).to(dm), torch.from_numpy(g_conic).to(dc),
                torch.from_numpy(g_opac).to(do), torch.from_numpy(g_feat).to(df),
                None, None, None, None, None)


def rasterize_cpu(means2d, conics, opacities, features, depths, radii, width, height, background=None):
    """Composite ``features`` (N, C) into an (H, W, C) image; also (H, W, 1) alpha and (N,) pixel
    counts (long). Same signature and semantics as ``rasterize_torch``."""
    img, alpha, n_pixels = _RasterizeCPU.apply(means2d, conics, opacities, features, depths, radii,
                                               int(width), int(height), background)
    return img, alpha, n_pixels


def warmup(kernels=(), jobs=None, on_cold=None) -> float:
    """Compile (or load from numba's cache) the rasterizer's and the projection's kernels, and
    ``kernels`` (more ``pool`` workers), on up to ``jobs`` processes when the cache is cold (see
    pool.compile_all; ``on_cold()`` is called first then); returns the seconds it took."""
    t0 = time.perf_counter()
    pool.compile_all(K.KERNELS[:-1] + list(kernels) + K.KERNELS[-1:], jobs=jobs, on_cold=on_cold)
    g = torch.Generator().manual_seed(0)
    n = 8
    means = (torch.rand(n, 3, generator=g) + torch.tensor([0.0, 0.0, 3.0])).requires_grad_()
    sh0 = torch.rand(n, 1, 3, generator=g).requires_grad_()
    outs = project_sh_cpu(means, torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1), torch.full((n, 3), 0.05),
                          torch.full((n,), 0.5), sh0, torch.zeros(n, 3, 3), torch.eye(4),
                          torch.tensor([[20.0, 0.0, 10.0], [0.0, 20.0, 10.0], [0.0, 0.0, 1.0]]), 20, 20, sh_degree=1)
    (outs[0].sum() + outs[4].sum()).backward()
    m = (torch.rand(n, 2, generator=g) * 20).requires_grad_()
    con = torch.tensor([[0.5, 0.0, 0.5]]).repeat(n, 1).requires_grad_()
    op = torch.full((n,), 0.5, requires_grad=True)
    f = torch.rand(n, 4, generator=g).requires_grad_()
    dep = torch.rand(n, generator=g) + 1
    img, alpha, _ = rasterize_cpu(m, con, op, f, dep, torch.full((n, 2), 4, dtype=torch.int32), 20, 20, torch.zeros(4))
    (img.sum() + alpha.sum()).backward()
    return time.perf_counter() - t0


def _cam_consts(viewmat, K, width, height):
    """float32 camera constants, the same float32 operations as project.project's torch ops (scalar
    numpy float32 instead of 0-d tensors: ~80 us instead of ~280 us per render; equal bitwise over
    2000 random cameras)."""
    vm = viewmat.detach().to(torch.float32)
    v = vm.numpy()
    k = K.detach().to(torch.float32).numpy()
    f32 = np.float32
    fx, fy, cx, cy = f32(k[0, 0]), f32(k[1, 1]), f32(k[0, 2]), f32(k[1, 2])
    # torch computes scalar / t as t.reciprocal() * scalar
    tan_fovx, tan_fovy = (f32(1) / fx) * f32(0.5 * width), (f32(1) / fy) * f32(0.5 * height)
    c3 = f32(0.3)
    lims = (-(cx / fx + c3 * tan_fovx), (f32(width) - cx) / fx + c3 * tan_fovx,
            -(cy / fy + c3 * tan_fovy), (f32(height) - cy) / fy + c3 * tan_fovy)
    # (the torch op render's SH directions use, in viewmat's own dtype)
    campos = (-viewmat[:3, :3].T @ viewmat[:3, 3]).detach().to(torch.float32).numpy()
    return (np.ascontiguousarray(v[:3, :3]), np.ascontiguousarray(v[:3, 3]), fx, fy, cx, cy,
            lims[0], lims[1], lims[2], lims[3], np.ascontiguousarray(campos))


class _ProjectSHCPU(torch.autograd.Function):
    """project.project + project.sh_to_rgb as numba kernels with a hand-written backward."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, sh0, shN, viewmat, Kmat, width, height, near, far, deg):
        with _LOCK:
            nthreads = _threads()
            N = means.shape[0]
            m, q, s, o = _np32(means), _np32(quats), _np32(scales), _np32(opacities).reshape(N)
            s0 = _np32(sh0).reshape(N, 3)
            sN = _np32(shN).reshape(N, shN.shape[1], 3)
            cam = _cam_consts(viewmat, Kmat, width, height)
            args = (m, q, s, o, s0, sN) + cam[:10] + (int(width), int(height), np.float32(near), np.float32(far),
                                                      int(deg), cam[10])
            m2d = np.empty((N, 2), dtype=np.float32)
            con = np.empty((N, 3), dtype=np.float32)
            dep = np.empty(N, dtype=np.float32)
            rad = np.empty((N, 2), dtype=np.int32)
            rgb = np.empty((N, 3), dtype=np.float32)
            K.project_sh_fwd(*args, m2d, con, dep, rad, rgb, nthreads)
        ctx.args = args
        ctx.dtypes = (means.dtype, quats.dtype, scales.dtype, sh0.dtype, shN.dtype)
        dt = means.dtype
        radii = torch.from_numpy(rad)
        ctx.mark_non_differentiable(radii)
        return (torch.from_numpy(m2d).to(dt), torch.from_numpy(con).to(dt), torch.from_numpy(dep).to(dt), radii,
                torch.from_numpy(rgb).to(sh0.dtype))

    @staticmethod
    def backward(ctx, g_m2d, g_con, g_dep, _g_rad, g_rgb):
        args = ctx.args
        m, sN = args[0], args[5]
        N = m.shape[0]

        def z(g, shape):
            return np.zeros(shape, dtype=np.float32) if g is None else _np32(g).reshape(shape)

        gm, gc, gd, gr = z(g_m2d, (N, 2)), z(g_con, (N, 3)), z(g_dep, (N,)), z(g_rgb, (N, 3))
        d_means = np.empty((N, 3), dtype=np.float32)
        d_quats = np.empty((N, 4), dtype=np.float32)
        d_scales = np.empty((N, 3), dtype=np.float32)
        d_sh0 = np.empty((N, 3), dtype=np.float32)
        d_shN = np.empty(sN.shape, dtype=np.float32)
        with _LOCK:
            K.project_sh_bwd(*args, gm, gc, gd, gr, d_means, d_quats, d_scales, d_sh0, d_shN, _threads())
        dm, dq, ds, d0, dn = ctx.dtypes
        deg = args[-2]
        g_shN = torch.from_numpy(d_shN).to(dn) if deg > 0 else None
        return (torch.from_numpy(d_means).to(dm), torch.from_numpy(d_quats).to(dq), torch.from_numpy(d_scales).to(ds),
                None, torch.from_numpy(d_sh0).reshape(N, 1, 3).to(d0), g_shN, None, None, None, None, None, None, None)


def project_sh_cpu(means, quats, scales, opacities, sh0, shN, viewmat, K, width, height, near=0.01, far=1e10,
                   sh_degree=0):
    """``project.project`` and ``project.sh_to_rgb`` (directions from the camera centre, degree
    ``sh_degree``) in one pass of numba kernels; returns (means2d, conics, depths, radii, rgb).
    Differentiable w.r.t. means, quats, scales (linear), sh0 and shN; ``opacities`` only gate
    visibility (as in ``project``)."""
    return _ProjectSHCPU.apply(means, quats, scales, opacities, sh0, shN, viewmat, K, int(width), int(height),
                               float(near), float(far), int(sh_degree))


def project_sh_posed(means, quats, scales, opacities, sh0, shN, viewmat, K, width, height, near, far, sh_degree):
    """``project_sh_cpu`` as ``render`` calls it: when ``viewmat`` requires grad (camera pose
    refinement) its gradient goes round the kernels (see _pose_grad_through_gaussians)."""
    if not viewmat.requires_grad:
        return project_sh_cpu(means, quats, scales, opacities, sh0, shN, viewmat, K, width, height, near, far,
                              sh_degree)
    m_geo, q_geo, m_sh = _pose_grad_through_gaussians(means, quats, viewmat)
    viewmat = viewmat.detach()
    m2d, conics, depths, radii, rgb = project_sh_cpu(m_geo, q_geo, scales, opacities, sh0, shN, viewmat, K, width,
                                                     height, near, far, 0)
    if sh_degree > 0:
        rgb = project_sh_cpu(m_sh, quats, scales, opacities, sh0, shN, viewmat, K, width, height, near, far,
                             sh_degree)[4]
    return m2d, conics, depths, radii, rgb


def _pose_grad_through_gaussians(means, quats, viewmat):
    """The fused CPU kernels take the camera as constants, so a pose's gradient goes round them.
    Camera V sees the world as camera V0 = V.detach() sees it moved by E = V0^-1 V: V0 (E x) = V x.
    E is the identity in value, so the Gaussians moved by E are the same numbers, but they carry
    V's gradient: exact for the projection (means and covariances) along rigid motions of the camera
    (rotation and translation, what pose refinement moves; not along a general 4x4 perturbation).
    The SH colours see the camera only through its centre c: their viewing direction m - c gets its
    gradient from means shifted by c0 - c (zero in value), in a second, colour-only projection.
    Returns (means and quats for the geometry, means for the colours)."""
    V0 = viewmat.detach()
    E = torch.linalg.solve(V0, viewmat)
    dE = E - E.detach()  # zero in value, E's gradient
    m0 = means.detach()
    m_geo = means + m0 @ dE[:3, :3].T + dE[:3, 3]
    qe = _rotmat_to_quat(E[:3, :3])
    q0 = quats.detach()
    q_geo = quats + _quat_mul(qe, q0) - _quat_mul(qe.detach(), q0)
    c = -viewmat[:3, :3].T @ viewmat[:3, 3]
    return m_geo, q_geo, means + (c.detach() - c)


def _rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """wxyz quaternion of a rotation near the identity (w > 0.5)."""
    w = 0.5 * torch.sqrt((1.0 + R[0, 0] + R[1, 1] + R[2, 2]).clamp_min(1e-8))
    return torch.stack([w, (R[2, 1] - R[1, 2]) / (4 * w), (R[0, 2] - R[2, 0]) / (4 * w), (R[1, 0] - R[0, 1]) / (4 * w)])


def _quat_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product a * b of a (4,) and (N, 4) wxyz quaternions: R(a * b) = R(a) R(b)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)

