"""SSIM for the training loss on the CPU: pytorch_msssim's ``ssim`` (11-tap Gaussian window, sigma
1.5, valid filtering, K = (0.01, 0.03), mean over pixels and channels) as two numba kernels with a
hand-written gradient w.r.t. the rendered image.

pytorch_msssim runs ten grouped convolutions forward and six backward plus ~30 elementwise ops;
in a 20k-Gaussian CPU training step at 200x200 that was ~8 ms of ~40. Here one pass filters the
five statistics (x, y, x², y², xy) and writes each pixel's partial derivatives, and one pass
applies the transposed filter. Same value and gradient to float32 rounding (tested against
pytorch_msssim); other devices and images smaller than the window use pytorch_msssim.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from budget3d.splat import pool as P_
from budget3d.splat.kernels import copts as _copts, opts as _opts

WIN = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _gauss_window() -> np.ndarray:
    """pytorch_msssim's _fspecial_gauss_1d(11, 1.5), computed the same way in float32."""
    c = torch.arange(WIN, dtype=torch.float)
    c -= WIN // 2
    g = torch.exp(-(c**2) / (2 * SIGMA**2))
    g /= g.sum()
    return g.numpy()


_W = _gauss_window()


def ssim(img: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of two (H, W, C) images, differentiable w.r.t. ``img`` (not ``gt``)."""
    H, W = img.shape[:2]
    if (img.device.type != "cpu" or img.dtype != torch.float32 or gt.dtype != torch.float32
            or H < WIN or W < WIN or img.dim() != 3 or gt.shape != img.shape):
        from pytorch_msssim import ssim as ref

        return ref(img.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=data_range, size_average=True)
    return _SSIM.apply(img, gt, float(data_range))


class _SSIM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, gt, data_range):
        from budget3d.splat.cpu import launch

        x = np.ascontiguousarray(img.detach().numpy())
        y = np.ascontiguousarray(gt.detach().numpy())
        H, W, C = x.shape
        Ho, n = H - WIN + 1, (W - WIN + 1) * C
        h = np.zeros((5, H, n), dtype=np.float32)
        launch(_ssim_h_w, x, y, _W, h)
        d = np.empty((3, Ho, n), dtype=np.float32)
        rows = np.empty(Ho, dtype=np.float64)
        launch(_ssim_v_w, _W, (K1 * data_range) ** 2, (K2 * data_range) ** 2, h, d, rows)
        ctx.save = (x, y, d)
        return torch.tensor(rows.sum() / d[0].size, dtype=img.dtype)

    @staticmethod
    def backward(ctx, g):
        from budget3d.splat.cpu import launch

        x, y, d = ctx.save
        out = np.empty_like(x)
        launch(_ssim_bwd_w, x, y, _W, d, float(np.float32(float(g) / d[0].size)), out)
        return torch.from_numpy(out), None, None


@numba.njit(inline="always", **_opts)
def _ssim_h(lo, hi, x, y, w, h):
    """Rows [lo, hi) of h: the five statistics (x, y, x², y², xy) filtered along W. Rows are flat
    (W*C): a tap k is an offset of k*C, so the inner loops run over contiguous floats (they
    vectorise)."""
    H, W, C = x.shape
    n = h.shape[2]
    xf = x.reshape(H, W * C)
    yf = y.reshape(H, W * C)
    for r in range(lo, hi):
        for k in range(WIN):
            wk = w[k]
            o = k * C
            for q in range(n):
                a = xf[r, q + o]
                b = yf[r, q + o]
                h[0, r, q] += wk * a
                h[1, r, q] += wk * b
                h[2, r, q] += wk * (a * a)
                h[3, r, q] += wk * (b * b)
                h[4, r, q] += wk * (a * b)
    return 0


@numba.njit(inline="always", **_opts)
def _ssim_v(lo, hi, w, c1, c2, h, df, rows):
    """Output rows [lo, hi): h filtered along H; rows[i] = the row's sum of the SSIM map (float32
    sum, as before), df[0..2] = its derivatives w.r.t. mu_x, E[x²] and E[xy]."""
    n = h.shape[2]
    two = np.float32(2.0)
    for i in range(lo, hi):
        v = np.zeros((5, n), dtype=np.float32)
        for k in range(WIN):
            wk = w[k]
            for s in range(5):
                for q in range(n):
                    v[s, q] += wk * h[s, i + k, q]
        acc = np.float32(0.0)
        for q in range(n):
            m1 = v[0, q]
            m2 = v[1, q]
            s11 = v[2, q] - m1 * m1
            s22 = v[3, q] - m2 * m2
            s12 = v[4, q] - m1 * m2
            da = m1 * m1 + m2 * m2 + c1
            db = s11 + s22 + c2
            A = (two * m1 * m2 + c1) / da
            B = (two * s12 + c2) / db
            acc += A * B
            dB_s11 = -B / db
            dB_s12 = two / db
            # s11 = e11 - m1², s12 = e12 - m1 m2
            df[0, i, q] = (two * m2 - A * two * m1) / da * B - A * (dB_s11 * two * m1 + dB_s12 * m2)
            df[1, i, q] = A * dB_s11
            df[2, i, q] = A * dB_s12
        rows[i] = acc
    return 0


@numba.njit(inline="always", **_opts)
def _ssim_bwd(lo, hi, x, y, w, df, scale, out):
    """Image rows [lo, hi) of out = scale (G^T d0 + 2 x G^T d1 + y G^T d2), G the valid separable
    filter (flat rows as in _ssim_h; df (3, Ho, Wo*C))."""
    H, W, C = x.shape
    Ho, n = df.shape[1], df.shape[2]
    xf = x.reshape(H, W * C)
    yf = y.reshape(H, W * C)
    of = out.reshape(H, W * C)
    two = np.float32(2.0)
    for r in range(lo, hi):
        t = np.zeros((3, n), dtype=np.float32)  # this row of the transpose along H
        for k in range(max(0, r - Ho + 1), min(WIN, r + 1)):
            wk = w[k]
            for s in range(3):
                for q in range(n):
                    t[s, q] += wk * df[s, r - k, q]
        u = np.zeros((3, W * C), dtype=np.float32)  # ... and along W
        for k in range(WIN):
            wk = w[k]
            o = k * C
            for s in range(3):
                for q in range(n):
                    u[s, q + o] += wk * t[s, q]
        for q in range(W * C):
            of[r, q] = scale * (u[0, q] + two * xf[r, q] * u[1, q] + yf[r, q] * u[2, q])
    return 0


@P_.kernel(**_copts)
def _ssim_h_w(data):
    d = P_.words(data)
    x = P_.f32_3(d, 0)
    for lo, hi in P_.spans(d, x.shape[0]):
        _ssim_h(lo, hi, x, P_.f32_3(d, 1), P_.f32_1(d, 2), P_.f32_3(d, 3))


@P_.kernel(**_copts)
def _ssim_v_w(data):
    d = P_.words(data)
    rows = P_.f64_1(d, 5)
    for lo, hi in P_.spans(d, rows.shape[0]):
        _ssim_v(lo, hi, P_.f32_1(d, 0), P_.f32(d, 1), P_.f32(d, 2), P_.f32_3(d, 3), P_.f32_3(d, 4), rows)


@P_.kernel(**_copts)
def _ssim_bwd_w(data):
    d = P_.words(data)
    x = P_.f32_3(d, 0)
    for lo, hi in P_.spans(d, x.shape[0]):
        _ssim_bwd(lo, hi, x, P_.f32_3(d, 1), P_.f32_1(d, 2), P_.f32_3(d, 3), P_.f32(d, 4), P_.f32_3(d, 5))


KERNELS = [_ssim_bwd_w, _ssim_h_w, _ssim_v_w]  # (for _pool.compile_all)
