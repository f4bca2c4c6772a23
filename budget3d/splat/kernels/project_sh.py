"""Projection and SH colour per Gaussian (the "cpu" backend's replacement for project.project and
project.sh_to_rgb): float32, the oracle's order of operations where it is cheap to follow. The
backward recomputes the forward's intermediates and applies the chain rule by hand.

The forward and the backward each write the projection out (not one shared inline helper): written
once (the recomputation as one helper both call; the forward's stores of the backward's scratch
compiled away by a constant flag), the same images and gradients bitwise, but 1 thread, 100k
Gaussians at 256x256, 5 interleaved process pairs: forward +0.5% (SH degree 3) and +4% (degree 0),
backward +4-7% (the generated code differs: 3014 -> 3152 lines of assembly).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from budget3d.splat.kernels.common import AMIN, F0, F1, HALF, opts

F2 = np.float32(2.0)
F3 = np.float32(3.0)
F4 = np.float32(4.0)
EPS2D32 = np.float32(0.3)
EXT_MAX = np.float32(3.33)
SH_C0 = np.float32(0.28209479177387814)
SH_C1 = np.float32(0.4886025119029199)
SH_C20 = np.float32(1.0925484305920792)
SH_C21 = np.float32(-1.0925484305920792)
SH_C22 = np.float32(0.31539156525252005)
SH_C23 = np.float32(-1.0925484305920792)
SH_C24 = np.float32(0.5462742152960396)
SH_C30 = np.float32(-0.5900435899266435)
SH_C31 = np.float32(2.890611442640554)
SH_C32 = np.float32(-0.4570457994644658)
SH_C33 = np.float32(0.3731763325901154)
SH_C34 = np.float32(-0.4570457994644658)
SH_C35 = np.float32(1.445305721320277)
SH_C36 = np.float32(-0.5900435899266435)
PCH = 512  # Gaussians per parallel chunk (scratch is allocated per chunk)


@njit(inline="always", **opts)
def _quat_rot(qw, qx, qy, qz, R):
    """Normalised quaternion (w, x, y, z) -> R (3x3, float32), as project._quat_to_rotmat."""
    nrm = np.float32(math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz))
    nrm = nrm if nrm > np.float32(1e-12) else np.float32(1e-12)
    w = qw / nrm
    x = qx / nrm
    y = qy / nrm
    z = qz / nrm
    R[0, 0] = F1 - F2 * (y * y + z * z)
    R[0, 1] = F2 * (x * y - w * z)
    R[0, 2] = F2 * (x * z + w * y)
    R[1, 0] = F2 * (x * y + w * z)
    R[1, 1] = F1 - F2 * (x * x + z * z)
    R[1, 2] = F2 * (y * z - w * x)
    R[2, 0] = F2 * (x * z - w * y)
    R[2, 1] = F2 * (y * z + w * x)
    R[2, 2] = F1 - F2 * (x * x + y * y)
    return nrm, w, x, y, z


@njit(inline="always", **opts)
def _sh_rest(B, shN, g, nb):
    """Gaussian g's sums over the SH bases 1..nb, the three channels in one pass over shN's
    contiguous rows (per channel the same order of sums as one channel at a time)."""
    a0 = F0
    a1 = F0
    a2 = F0
    for k in range(nb):
        a0 += B[k] * shN[g, k, 0]
        a1 += B[k] * shN[g, k, 1]
        a2 += B[k] * shN[g, k, 2]
    return a0, a1, a2


@njit(inline="always", **opts)
def _sh_basis(x, y, z, deg, B):
    """B[0:nb-1] = the real SH basis (without the constant term) along the unit (x, y, z)."""
    B[0] = -SH_C1 * y
    B[1] = SH_C1 * z
    B[2] = -SH_C1 * x
    if deg > 1:
        xx = x * x
        yy = y * y
        zz = z * z
        xy = x * y
        yz = y * z
        xz = x * z
        B[3] = SH_C20 * xy
        B[4] = SH_C21 * yz
        B[5] = SH_C22 * (F2 * zz - xx - yy)
        B[6] = SH_C23 * xz
        B[7] = SH_C24 * (xx - yy)
        if deg > 2:
            B[8] = SH_C30 * y * (F3 * xx - yy)
            B[9] = SH_C31 * xy * z
            B[10] = SH_C32 * y * (F4 * zz - xx - yy)
            B[11] = SH_C33 * z * (F2 * zz - F3 * xx - F3 * yy)
            B[12] = SH_C34 * x * (F4 * zz - xx - yy)
            B[13] = SH_C35 * z * (xx - yy)
            B[14] = SH_C36 * x * (xx - F3 * yy)


@njit(inline="always", **opts)
def _project_sh_fwd(c0, c1, means, quats, scales, opac, sh0, shN, Rv, tv, fx, fy, cx, cy, xlo, xhi, ylo, yhi, width,
                    height, near, far, deg, campos, m2d, con, dep, rad, rgb):
    """EWA projection (as project.project) and SH colour (as project.sh_to_rgb) per Gaussian."""
    N = means.shape[0]
    nb = (deg + 1) * (deg + 1) - 1
    for chk in range(c0, c1):
        R = np.empty((3, 3), dtype=np.float32)
        B = np.empty(15, dtype=np.float32)
        for g in range(chk * PCH, min(N, (chk + 1) * PCH)):
            m0 = means[g, 0]
            m1 = means[g, 1]
            m2 = means[g, 2]
            x = m0 * Rv[0, 0] + m1 * Rv[0, 1] + m2 * Rv[0, 2] + tv[0]
            y = m0 * Rv[1, 0] + m1 * Rv[1, 1] + m2 * Rv[1, 2] + tv[1]
            z = m0 * Rv[2, 0] + m1 * Rv[2, 1] + m2 * Rv[2, 2] + tv[2]
            ind = (z > near) & (z < far)
            zs = z if ind else F1
            u = x / zs
            v = y / zs
            tx = zs * min(max(u, xlo), xhi)
            ty = zs * min(max(v, ylo), yhi)
            iz = F1 / zs
            j00 = fx * iz
            j02 = -fx * tx * iz * iz
            j11 = fy * iz
            j12 = -fy * ty * iz * iz
            _quat_rot(quats[g, 0], quats[g, 1], quats[g, 2], quats[g, 3], R)
            a = F0
            b = F0
            c = F0
            for j in range(3):
                sj = scales[g, j]
                T0 = F0
                T1 = F0
                for i in range(3):
                    JR0 = j00 * Rv[0, i] + j02 * Rv[2, i]
                    JR1 = j11 * Rv[1, i] + j12 * Rv[2, i]
                    M = R[i, j] * sj
                    T0 += JR0 * M
                    T1 += JR1 * M
                a += T0 * T0
                b += T0 * T1
                c += T1 * T1
            a = a + EPS2D32
            c = c + EPS2D32
            det = a * c - b * b
            o = opac[g]
            ok = ind & (det > F0) & (o >= AMIN)
            ds = det if ok else F1
            con[g, 0] = c / ds
            con[g, 1] = -b / ds
            con[g, 2] = a / ds
            mx = fx * x / zs + cx
            my = fy * y / zs + cy
            m2d[g, 0] = mx
            m2d[g, 1] = my
            dep[g] = z if ind else F0
            ext = np.float32(math.sqrt(F2 * np.float32(math.log(max(o, AMIN) / AMIN))))
            ext = min(ext, EXT_MAX)
            rx = np.float32(math.ceil(ext * np.float32(math.sqrt(max(a, F0)))))
            ry = np.float32(math.ceil(ext * np.float32(math.sqrt(max(c, F0)))))
            ok = ok & ((rx > F0) | (ry > F0))
            ok = ok & (mx + rx > F0) & (mx - rx < width) & (my + ry > F0) & (my - ry < height)
            ok = ok & np.isfinite(mx) & np.isfinite(my) & np.isfinite(con[g, 0]) & np.isfinite(con[g, 1])
            ok = ok & np.isfinite(con[g, 2])
            rad[g, 0] = np.int32(rx) if ok else 0
            rad[g, 1] = np.int32(ry) if ok else 0
            # colour
            dx = F0
            dy = F0
            dz = F0
            if deg > 0:
                vx = m0 - campos[0]
                vy = m1 - campos[1]
                vz = m2 - campos[2]
                nv = np.float32(math.sqrt(vx * vx + vy * vy + vz * vz))
                nv = nv if nv > np.float32(1e-12) else np.float32(1e-12)
                dx = vx / nv
                dy = vy / nv
                dz = vz / nv
                _sh_basis(dx, dy, dz, deg, B)
            rest = _sh_rest(B, shN, g, nb)
            for ch in range(3):
                val = SH_C0 * sh0[g, ch]
                if deg > 0:
                    val = val + rest[ch]
                val = val + HALF
                rgb[g, ch] = val if val > F0 else F0
    return 0


@njit(**opts)  # (not inlined: the worker's call has > 30 arguments, which CPython passes as *args)
def _project_sh_bwd(c0, c1, means, quats, scales, opac, sh0, shN, Rv, tv, fx, fy, cx, cy, xlo, xhi, ylo, yhi, width,
                    height, near, far, deg, campos, g_m2d, g_con, g_dep, g_rgb, d_means, d_quats, d_scales, d_sh0,
                    d_shN):
    """The hand-written backward of project_sh_fwd (same recomputation; gradients of means, quats,
    linear scales, sh0, shN; opacities only gate visibility and get none here)."""
    N = means.shape[0]
    K = shN.shape[1]
    nb = (deg + 1) * (deg + 1) - 1
    for chk in range(c0, c1):
        R = np.empty((3, 3), dtype=np.float32)
        B = np.empty(15, dtype=np.float32)
        JR = np.empty((2, 3), dtype=np.float32)
        Tm = np.empty((2, 3), dtype=np.float32)
        dM = np.empty((3, 3), dtype=np.float32)
        db = np.empty(15, dtype=np.float32)
        gs = np.empty(3, dtype=np.float32)
        for g in range(chk * PCH, min(N, (chk + 1) * PCH)):
            if ((g_m2d[g, 0] == F0) & (g_m2d[g, 1] == F0) & (g_con[g, 0] == F0) & (g_con[g, 1] == F0)
                    & (g_con[g, 2] == F0) & (g_dep[g] == F0) & (g_rgb[g, 0] == F0) & (g_rgb[g, 1] == F0)
                    & (g_rgb[g, 2] == F0)):
                # no upstream gradient (a Gaussian the rasterizer did not draw): the backward is linear
                for j in range(3):
                    d_means[g, j] = F0
                    d_scales[g, j] = F0
                    d_sh0[g, j] = F0
                for j in range(4):
                    d_quats[g, j] = F0
                for k in range(K):
                    for ch in range(3):
                        d_shN[g, k, ch] = F0
                continue
            m0 = means[g, 0]
            m1 = means[g, 1]
            m2 = means[g, 2]
            x = m0 * Rv[0, 0] + m1 * Rv[0, 1] + m2 * Rv[0, 2] + tv[0]
            y = m0 * Rv[1, 0] + m1 * Rv[1, 1] + m2 * Rv[1, 2] + tv[1]
            z = m0 * Rv[2, 0] + m1 * Rv[2, 1] + m2 * Rv[2, 2] + tv[2]
            ind = (z > near) & (z < far)
            zs = z if ind else F1
            u = x / zs
            v = y / zs
            tx = zs * min(max(u, xlo), xhi)
            ty = zs * min(max(v, ylo), yhi)
            iz = F1 / zs
            j00 = fx * iz
            j02 = -fx * tx * iz * iz
            j11 = fy * iz
            j12 = -fy * ty * iz * iz
            nq, qw, qx, qy, qz = _quat_rot(quats[g, 0], quats[g, 1], quats[g, 2], quats[g, 3], R)
            for i in range(3):
                JR[0, i] = j00 * Rv[0, i] + j02 * Rv[2, i]
                JR[1, i] = j11 * Rv[1, i] + j12 * Rv[2, i]
            a = F0
            b = F0
            c = F0
            for j in range(3):
                sj = scales[g, j]
                T0 = F0
                T1 = F0
                for i in range(3):
                    M = R[i, j] * sj
                    T0 += JR[0, i] * M
                    T1 += JR[1, i] * M
                Tm[0, j] = T0
                Tm[1, j] = T1
                a += T0 * T0
                b += T0 * T1
                c += T1 * T1
            a = a + EPS2D32
            c = c + EPS2D32
            det = a * c - b * b
            o = opac[g]
            ok = ind & (det > F0) & (o >= AMIN)
            # conics (c/D, -b/D, a/D)
            gca = g_con[g, 0]
            gcb = g_con[g, 1]
            gcc = g_con[g, 2]
            if ok:
                iD = F1 / det
                # d(conic)/d(a, b, c) with D = ac - b^2; P = dL/dD
                P = -(gca * c - gcb * b + gcc * a) * iD * iD
                ga = gcc * iD + P * c
                gb = -gcb * iD - F2 * b * P
                gc = gca * iD + P * a
            else:
                ga = gcc
                gb = -gcb
                gc = gca
            # dT0 = 2 ga T0 + gb T1, dT1 = 2 gc T1 + gb T0
            dj00 = F0
            dj02 = F0
            dj11 = F0
            dj12 = F0
            for i in range(3):
                for j in range(3):
                    dM[i, j] = F0
            for j in range(3):
                dT0 = F2 * ga * Tm[0, j] + gb * Tm[1, j]
                dT1 = F2 * gc * Tm[1, j] + gb * Tm[0, j]
                sj = scales[g, j]
                dsj = F0
                for i in range(3):
                    M = R[i, j] * sj
                    # dJR0[i] += dT0 M[i, j]
                    dJR0 = dT0 * M
                    dJR1 = dT1 * M
                    dj00 += dJR0 * Rv[0, i]
                    dj02 += dJR0 * Rv[2, i]
                    dj11 += dJR1 * Rv[1, i]
                    dj12 += dJR1 * Rv[2, i]
                    dm = JR[0, i] * dT0 + JR[1, i] * dT1
                    dM[i, j] = dm * sj  # dL/dR[i, j]
                    dsj += dm * R[i, j]
                d_scales[g, j] = dsj
            # rotation matrix -> normalised quaternion -> quaternion
            G = dM
            dw = F2 * (-qz * G[0, 1] + qy * G[0, 2] + qz * G[1, 0] - qx * G[1, 2] - qy * G[2, 0] + qx * G[2, 1])
            dx_ = F2 * (qy * G[0, 1] + qz * G[0, 2] + qy * G[1, 0] - F2 * qx * G[1, 1] - qw * G[1, 2] + qz * G[2, 0]
                        + qw * G[2, 1] - F2 * qx * G[2, 2])
            dy_ = F2 * (-F2 * qy * G[0, 0] + qx * G[0, 1] + qw * G[0, 2] + qx * G[1, 0] + qz * G[1, 2] - qw * G[2, 0]
                        + qz * G[2, 1] - F2 * qy * G[2, 2])
            dz_ = F2 * (-F2 * qz * G[0, 0] - qw * G[0, 1] + qx * G[0, 2] + qw * G[1, 0] - F2 * qz * G[1, 1]
                        + qy * G[1, 2] + qx * G[2, 0] + qy * G[2, 1])
            dot = qw * dw + qx * dx_ + qy * dy_ + qz * dz_
            iq = F1 / nq if nq > np.float32(1e-12) else F0
            if not (nq > np.float32(1e-12)):
                # F.normalize with the eps clamp: q / eps, a linear map
                iq = np.float32(1e12)
                dot = F0
            d_quats[g, 0] = (dw - qw * dot) * iq
            d_quats[g, 1] = (dx_ - qx * dot) * iq
            d_quats[g, 2] = (dy_ - qy * dot) * iq
            d_quats[g, 3] = (dz_ - qz * dot) * iq
            # J -> (iz, tx, ty)
            diz = fx * dj00 - F2 * fx * tx * iz * dj02 + fy * dj11 - F2 * fy * ty * iz * dj12
            dtx = -fx * iz * iz * dj02
            dty = -fy * iz * iz * dj12
            dzs = -diz * iz * iz
            gx = F0
            gy = F0
            # tx = zs clamp(x / zs)
            cu = min(max(u, xlo), xhi)
            dzs += dtx * cu
            if (u >= xlo) & (u <= xhi):
                du = dtx * zs
                gx += du / zs
                dzs -= du * x / (zs * zs)
            cv = min(max(v, ylo), yhi)
            dzs += dty * cv
            if (v >= ylo) & (v <= yhi):
                dv = dty * zs
                gy += dv / zs
                dzs -= dv * y / (zs * zs)
            # means2d = (fx x / zs + cx, fy y / zs + cy)
            gm0 = g_m2d[g, 0]
            gm1 = g_m2d[g, 1]
            gx += gm0 * fx / zs
            gy += gm1 * fy / zs
            dzs -= (gm0 * fx * x + gm1 * fy * y) / (zs * zs)
            gz = F0
            if ind:
                gz = dzs + g_dep[g]
            # camera -> world
            dmx = Rv[0, 0] * gx + Rv[1, 0] * gy + Rv[2, 0] * gz
            dmy = Rv[0, 1] * gx + Rv[1, 1] * gy + Rv[2, 1] * gz
            dmz = Rv[0, 2] * gx + Rv[1, 2] * gy + Rv[2, 2] * gz
            # colour
            ddx = F0
            ddy = F0
            ddz = F0
            vx = F0
            vy = F0
            vz = F0
            nv = F1
            if deg > 0:
                vx = m0 - campos[0]
                vy = m1 - campos[1]
                vz = m2 - campos[2]
                nv = np.float32(math.sqrt(vx * vx + vy * vy + vz * vz))
                nv = nv if nv > np.float32(1e-12) else np.float32(1e-12)
                vx = vx / nv
                vy = vy / nv
                vz = vz / nv
                _sh_basis(vx, vy, vz, deg, B)
            for k in range(nb, K):
                for ch in range(3):
                    d_shN[g, k, ch] = F0
            rest = _sh_rest(B, shN, g, nb)
            for ch in range(3):
                val = SH_C0 * sh0[g, ch]
                if deg > 0:
                    val = val + rest[ch]
                val = val + HALF
                gr = g_rgb[g, ch] if val >= F0 else F0
                d_sh0[g, ch] = SH_C0 * gr
                gs[ch] = gr
            g0 = gs[0]
            g1 = gs[1]
            g2 = gs[2]
            for k in range(nb):
                d_shN[g, k, 0] = B[k] * g0
                d_shN[g, k, 1] = B[k] * g1
                d_shN[g, k, 2] = B[k] * g2
                db[k] = shN[g, k, 0] * g0 + shN[g, k, 1] * g1 + shN[g, k, 2] * g2
            if deg > 0:
                x_ = vx
                y_ = vy
                z_ = vz
                ddx = -SH_C1 * db[2]
                ddy = -SH_C1 * db[0]
                ddz = SH_C1 * db[1]
                if deg > 1:
                    ddx += (SH_C20 * y_ * db[3] - F2 * x_ * SH_C22 * db[5] + SH_C23 * z_ * db[6]
                            + F2 * x_ * SH_C24 * db[7])
                    ddy += (SH_C20 * x_ * db[3] + SH_C21 * z_ * db[4] - F2 * y_ * SH_C22 * db[5]
                            - F2 * y_ * SH_C24 * db[7])
                    ddz += SH_C21 * y_ * db[4] + F4 * z_ * SH_C22 * db[5] + SH_C23 * x_ * db[6]
                    if deg > 2:
                        xx = x_ * x_
                        yy = y_ * y_
                        zz = z_ * z_
                        ddx += (SH_C30 * np.float32(6.0) * x_ * y_ * db[8] + SH_C31 * y_ * z_ * db[9]
                                - SH_C32 * F2 * x_ * y_ * db[10] - SH_C33 * np.float32(6.0) * x_ * z_ * db[11]
                                + SH_C34 * (F4 * zz - F3 * xx - yy) * db[12] + SH_C35 * F2 * x_ * z_ * db[13]
                                + SH_C36 * F3 * (xx - yy) * db[14])
                        ddy += (SH_C30 * F3 * (xx - yy) * db[8] + SH_C31 * x_ * z_ * db[9]
                                + SH_C32 * (F4 * zz - xx - F3 * yy) * db[10]
                                - SH_C33 * np.float32(6.0) * y_ * z_ * db[11]
                                - SH_C34 * F2 * x_ * y_ * db[12] - SH_C35 * F2 * y_ * z_ * db[13]
                                - SH_C36 * np.float32(6.0) * x_ * y_ * db[14])
                        ddz += (SH_C31 * x_ * y_ * db[9] + SH_C32 * np.float32(8.0) * y_ * z_ * db[10]
                                + SH_C33 * (np.float32(6.0) * zz - F3 * xx - F3 * yy) * db[11]
                                + SH_C34 * np.float32(8.0) * x_ * z_ * db[12] + SH_C35 * (xx - yy) * db[13])
                dd = x_ * ddx + y_ * ddy + z_ * ddz
                dmx += (ddx - x_ * dd) / nv
                dmy += (ddy - y_ * dd) / nv
                dmz += (ddz - z_ * dd) / nv
            d_means[g, 0] = dmx
            d_means[g, 1] = dmy
            d_means[g, 2] = dmz
    return 0
