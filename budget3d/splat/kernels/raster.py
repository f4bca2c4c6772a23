"""Rasterize forward and backward, per tile (see the package docstring), and the per-Gaussian
reductions of the backward's per-entry results.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from budget3d.splat import pool
from budget3d.splat.kernels.common import (
    A05, A09, AMAX, AMIN, DX, DX2, DX10, DX100, F0, F1, HALF, I0, I1, TH, TMIN, TP, TW, _entry, _fast_exp_neg, _fma,
    _radd, _sel, opts,
)


# ----------------------------------------------------------------------------------------------
# per-entry helpers. An entry (Gaussian, tile) touches the tile's pixel rows [ra, rb]: a flat block
# q in [TW ra, TW rb + TW) of the tile's TP pixels. Loops over such a block have run-time bounds,
# so LLVM keeps them as loops and vectorises them (with a few run-time alias checks).


@njit(inline="always", **opts)
def _inc(n, flag):
    """n + flag as int32. Written ``n += np.int32(flag)``, numba widens the sum to int64, and the
    loop counting lanes then vectorises 4 wide (xmm floats, int64 accumulators) instead of 8."""
    return np.int32(n + (I1 if flag else I0))


@njit(inline="always", **opts)
def _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc):
    """buf[0] = sigma (written in the oracle's order of float32 operations), buf[1] = 0."""
    for q in range(q0, q1):
        dx = pc[0, q] - mx
        dy = pc[1, q] - my
        buf[0, q] = HALF * (ca * (dx * dx) + cc * (dy * dy)) + (cb * dx) * dy
        buf[1, q] = F0


@njit(inline="always", **opts)
def _block_exp(buf, q0, q1, Lf):
    """buf[1] = exp(-sigma) (libm) where sigma <= Lf (elsewhere alpha < 1/255 for sure; left at 0)."""
    for q in range(q0, q1):
        sq = buf[0, q]
        if sq <= Lf:
            buf[1, q] = np.exp(-sq)


@njit(inline="always", **opts)
def _step_err(al):
    """Bound on the relative T difference one compositing step with this alpha adds (DX/(1-al))."""
    return DX100 if al > A09 else (DX10 if al > A05 else DX2)


@njit(inline="always", **opts)
def _near_a(oe):
    """o*exp within the fix-up window of the 1/255 cut-off or of the 0.99 clamp."""
    return (abs(oe - AMIN) <= AMIN * DX) | (abs(oe - AMAX) <= DX)


@njit(inline="always", **opts)
def _block_sigma_exp_fwd(buf, st, pc, q0, q1, mx, my, ca, cb, cc, o):
    """buf[0] = sigma, buf[1] = polynomial exp(-sigma); returns the number of active lanes whose
    decisions the approximation could flip (see DX)."""
    for q in range(q0, q1):
        dx = pc[0, q] - mx
        dy = pc[1, q] - my
        sg = HALF * (ca * (dx * dx) + cc * (dy * dy)) + (cb * dx) * dy
        buf[0, q] = sg
        buf[1, q] = _fast_exp_neg(sg)
    nflag = np.int32(0)  # a separate loop: fused into the one above it vectorised much worse
    for q in range(q0, q1):
        sg = buf[0, q]
        oe = o * buf[1, q]
        al = oe if oe < AMAX else AMAX
        nT = st[0, q] * (F1 - al)
        w = st[3, q] + _step_err(al)
        f = (sg >= F0) & (st[1, q] > F0) & (_near_a(oe) | (abs(nT - TMIN) <= TMIN * w))
        nflag = _inc(nflag, f)
    return nflag


@njit(inline="always", **opts)
def _block_sigma_exp_bwd(buf, pc, q0, q1, mx, my, ca, cb, cc, o):
    """buf[0] = sigma, buf[1] = polynomial exp(-sigma); returns the number of lanes near 1/255 or 0.99."""
    for q in range(q0, q1):
        dx = pc[0, q] - mx
        dy = pc[1, q] - my
        sg = HALF * (ca * (dx * dx) + cc * (dy * dy)) + (cb * dx) * dy
        buf[0, q] = sg
        buf[1, q] = _fast_exp_neg(sg)
    nflag = np.int32(0)  # a separate loop: fused into the one above it vectorised much worse
    for q in range(q0, q1):
        nflag = _inc(nflag, (buf[0, q] >= F0) & _near_a(o * buf[1, q]))
    return nflag


@njit(inline="always", **opts)
def _cutoff(ca, cb, cc, o):
    """float32 Lf: alpha >= 1/255 implies sigma <= Lf (with margin); inf for odd conics."""
    a = np.float64(ca)
    det = a * np.float64(cc) - np.float64(cb) * np.float64(cb)
    if not (a > 0.0 and det > 0.0 and np.float64(o) > 0.0):
        return np.float32(np.inf)
    L = math.log(max(np.float64(o), 1e-30) / np.float64(AMIN))
    return np.float32(L * (1.0 + 1e-4) + 1e-4)


@njit(**opts)
def _fixup_fwd(buf, st, pc, q0, q1, o, Lf, ep, rows, s0, k, y0):
    """Rare scalar path of the forward: lanes flagged by _block_sigma_exp_fwd get libm's exp; a lane
    whose next T is near 1e-4 also gets its T recomputed exactly as the libm path computes it
    (replaying the tile's earlier entries on that pixel), so every decision is libm's."""
    for q in range(q0, q1):
        sg = buf[0, q]
        if not ((sg >= F0) & (st[1, q] > F0)):
            continue
        oe = o * buf[1, q]
        al = oe if oe < AMAX else AMAX
        nT = st[0, q] * (F1 - al)
        ft = abs(nT - TMIN) <= TMIN * (st[3, q] + _step_err(al))
        if not (_near_a(oe) | ft):
            continue
        buf[1, q] = np.exp(-sg) if sg <= Lf else F0
        if ft:
            r = q // TW
            px = pc[0, q]
            py = pc[1, q]
            T = F1
            for j in range(s0, k):
                if rows[j, 0] - y0 > r or rows[j, 1] - y0 < r:
                    continue
                mxj, myj, caj, cbj, ccj, oj = _entry(ep, j)
                dx = px - mxj
                dy = py - myj
                sj = HALF * (caj * (dx * dx) + ccj * (dy * dy)) + (cbj * dx) * dy
                if not (sj >= F0):
                    continue
                ej = np.exp(-sj) if sj <= _cutoff(caj, cbj, ccj, oj) else F0
                alj = oj * ej
                alj = alj if alj < AMAX else AMAX
                if alj >= AMIN:
                    T = T * (F1 - alj)
            st[0, q] = T
            st[3, q] = F0
    return 0


@njit(**opts)
def _fixup_bwd(buf, q0, q1, o, Lf):
    """Rare scalar path of the backward: libm's exp for lanes near 1/255 or 0.99 (as the forward)."""
    for q in range(q0, q1):
        sg = buf[0, q]
        if (sg >= F0) & _near_a(o * buf[1, q]):
            buf[1, q] = np.exp(-sg) if sg <= Lf else F0
    return 0


@njit(inline="always", **opts)
def _bwd_entry(buf, st, G, pc, q0, q1, mx, my, ca, cb, cc, o, kl, f0, f1, f2, f3):
    """One entry's backward on its block (back to front): recovers T before it, updates the running
    sums, and returns its gradient sums (mean x, y, conic a, b, c, opacity, channels 0..3). One fused
    loop with the reductions in registers: only the sums are reassociable (_radd), so they vectorise
    while the decisions keep the forward's exact arithmetic; inlined (as a call, with its ~50
    arguments and set-up, it cost ~130 ns per entry). buf[2] holds the extra channels' f . dL/dout
    (0 without extra channels); buf[3] gets the weights. The channel sums are a second loop (in the
    first, as a separate function, they made LLVM spill registers)."""
    s0 = F0
    s1 = F0
    s2 = F0
    s3 = F0
    s4 = F0
    s5 = F0
    t0 = F0
    t1 = F0
    t2 = F0
    t3 = F0
    for q in range(q0, q1):
        s = buf[0, q]
        e = buf[1, q]
        fg = _fma(f0, G[0, q], _fma(f1, G[1, q], _fma(f2, G[2, q], _fma(f3, G[3, q], buf[2, q]))))
        oe = o * e
        al = oe if oe < AMAX else AMAX
        Tn = st[0, q]
        Sg = st[1, q]
        valid = (s >= F0) & (al >= AMIN) & (st[3, q] >= kl)
        om = F1 - al
        # (selects of a value loaded from the same address become masked stores: select the operands)
        Ti = Tn / _sel(valid, om, F1)
        w = al * Ti
        dla = Ti * fg - (Sg + st[2, q]) / om
        st[0, q] = Ti
        st[1, q] = _fma(_sel(valid, w, F0), fg, Sg)
        buf[3, q] = _sel(valid, w, F0)
        # alpha = min(0.99, o e): the clamp passes the gradient where o e <= 0.99
        dla = dla if (valid & (oe <= AMAX)) else F0
        ds = -(dla * al)  # dL/dsigma
        dx = pc[0, q] - mx
        dy = pc[1, q] - my
        s0 = _radd(s0, -ds * _fma(ca, dx, cb * dy))
        s1 = _radd(s1, -ds * _fma(cc, dy, cb * dx))
        s2 = _radd(s2, ds * (HALF * dx * dx))
        s3 = _radd(s3, ds * (dx * dy))
        s4 = _radd(s4, ds * (HALF * dy * dy))
        s5 = _radd(s5, dla * e)
    for q in range(q0, q1):
        w = buf[3, q]
        t0 = _radd(t0, w * G[0, q])
        t1 = _radd(t1, w * G[1, q])
        t2 = _radd(t2, w * G[2, q])
        t3 = _radd(t3, w * G[3, q])
    return s0, s1, s2, s3, s4, s5, t0, t1, t2, t3


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
def _dots(w, G, c0, q0, q1, out):
    """out[c] = sum_q w[q] G[c, q] over [q0, q1) for c >= c0 (reassociated: vectorised)."""
    for ci in range(c0, out.shape[0]):
        v = np.float32(0.0)
        for q in range(q0, q1):
            v += w[q] * G[ci, q]
        out[ci] = v


@njit(inline="always", **opts)
def _pixel_centres(pc, x0, y0):
    for q in range(TP):
        pc[0, q] = np.float32(x0 + (q & (TW - 1))) + HALF
        pc[1, q] = np.float32(y0 + (q // TW)) + HALF


# ----------------------------------------------------------------------------------------------
# forward


@njit(inline="always", **opts)
def _tile_box(t, TX, width, height):
    """Tile t's top-left pixel (x0, y0) and its width and height within the image."""
    x0 = (t % TX) * TW
    y0 = (t // TX) * TH
    return x0, y0, min(TW, width - x0), min(TH, height - y0)


@njit(inline="always", **opts)
def _forward_tile(t, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, img, alpha_img,
                  t_final, last, ent_count):
    """One tile of forward (see there)."""
    C = img.shape[1]
    x0, y0, tw, th = _tile_box(t, TX, width, height)
    s0 = tile_start[t]
    # st[0] T, st[1] active (1/0), st[2] last composited entry (local index as float32; -1 none),
    # st[3] bound on the relative difference of T from the libm path's (fast exp only)
    st = np.empty((4, TP), dtype=np.float32)
    acc = np.zeros((max(C, 4), TP), dtype=np.float32)
    buf = np.zeros((3, TP), dtype=np.float32)  # sigma, exp(-sigma), weight
    pc = np.empty((2, TP), dtype=np.float32)
    _pixel_centres(pc, x0, y0)
    for q in range(TP):
        r = q // TW
        j = q & (TW - 1)
        st[0, q] = F1
        st[1, q] = F1 if (r < th and j < tw) else F0
        st[2, q] = np.float32(-1.0)
        st[3, q] = F0
    n_act = tw * th
    for k in range(s0, tile_start[t + 1]):
        if n_act <= 0:
            break
        ra = rows[k, 0] - y0  # the entry's rows (within the tile)
        rb = rows[k, 1] - y0
        q0 = np.uint64(ra * TW)  # unsigned block bounds: no wraparound, the loops vectorise
        q1 = np.uint64((rb + 1) * TW)
        kl = np.float32(k - s0)
        mx, my, ca, cb, cc, o = _entry(ep, k)
        if exact_exp:
            _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc)
            _block_exp(buf, q0, q1, _cutoff(ca, cb, cc, o))
        else:
            if _block_sigma_exp_fwd(buf, st, pc, q0, q1, mx, my, ca, cb, cc, o) > 0:
                _fixup_fwd(buf, st, pc, q0, q1, o, _cutoff(ca, cb, cc, o), ep, rows, s0, k, y0)
        cnt = np.int32(0)
        nstop = np.int32(0)
        for q in range(q0, q1):
            s = buf[0, q]
            al = o * buf[1, q]
            al = al if al < AMAX else AMAX
            Tp = st[0, q]
            act = st[1, q]
            lv = st[2, q]
            valid = (s >= F0) & (al >= AMIN) & (act > F0)
            nT = Tp * (F1 - al)
            stop = valid & (nT <= TMIN)
            con = valid & (~stop)
            buf[2, q] = _sel(con, al * Tp, F0)
            st[0, q] = _sel(con, nT, Tp)
            st[1, q] = _sel(stop, F0, act)
            st[2, q] = _sel(con, kl, lv)
            st[3, q] = st[3, q] + _sel(con, _step_err(al), F0)  # (a select of the old value: masked store)
            cnt = _inc(cnt, con)
            nstop = _inc(nstop, stop)
        if cnt > 0:
            f0 = ep[k, 6]
            f1 = ep[k, 7]
            f2 = ep[k, 8]
            f3 = ep[k, 9]
            for q in range(q0, q1):  # the first four channels in one loop (ep is zero-padded)
                w = buf[2, q]
                acc[0, q] += w * f0
                acc[1, q] += w * f1
                acc[2, q] += w * f2
                acc[3, q] += w * f3
            for ci in range(4, C):
                f = ep[k, 6 + ci]
                for q in range(q0, q1):
                    acc[ci, q] += buf[2, q] * f
        ent_count[gpos[k]] = cnt
        n_act -= nstop
    for r in range(th):
        for j in range(tw):
            q = r * TW + j
            pix = (y0 + r) * width + (x0 + j)
            Tp = st[0, q]
            t_final[pix] = Tp
            lv = st[2, q]
            last[pix] = s0 + np.int64(lv) if lv >= F0 else -1
            alpha_img[pix] = F1 - Tp
            for ci in range(C):
                v = acc[ci, q]
                if has_bg:
                    v += Tp * background[ci]
                img[pix, ci] = v
    return 0


@njit(inline="always", **opts)
def _forward(d, ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg, exact_exp, img,
             alpha_img, t_final, last, ent_count):
    """Front-to-back compositing per tile (ep: each entry's parameters, see bucket; rows (E, 2):
    its absolute pixel rows). Writes
    img (H*W, C), alpha_img (H*W), t_final (H*W),
    last (H*W; the last composited entry of each pixel, -1 if none), ent_count (E; pixels each entry
    was composited into, at gpos[entry]; must come zeroed)."""
    n_tiles = tile_start.shape[0] - 1
    while True:
        i = pool.next_work(d)  # tiles are taken from a shared counter (see torder)
        if i >= n_tiles:
            break
        _forward_tile(torder[i], ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, img,
                      alpha_img, t_final, last, ent_count)
    return 0


# ----------------------------------------------------------------------------------------------
# backward


@njit(inline="always", **opts)
def _backward_tile(t, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final, last,
                   g_img, g_alpha, eg):
    """One tile of backward (see there)."""
    C = g_img.shape[1]
    s0 = tile_start[t]
    s1 = tile_start[t + 1]
    if s1 == s0:
        return 0
    x0, y0, tw, th = _tile_box(t, TX, width, height)
    # st[0] T (running back from T_final), st[1] Sg = sum over the composited entries behind of
    # w_j (f_j . dL/dout), st[2] T_final (bg . dL/dout) - dL/dalpha T_final, st[3] last entry
    st = np.zeros((4, TP), dtype=np.float32)
    G = np.zeros((max(C, 4), TP), dtype=np.float32)  # rows >= C stay 0 (and ep's padding is 0)
    buf = np.zeros((4, TP), dtype=np.float32)  # sigma, exp(-sigma), f . g of the extra channels, weight
    pc = np.empty((2, TP), dtype=np.float32)
    fsum = np.empty(C, dtype=np.float32)
    _pixel_centres(pc, x0, y0)
    for q in range(TP):
        st[3, q] = np.float32(-1.0)
    kmax = -1
    for r in range(th):
        for j in range(tw):
            q = r * TW + j
            pix = (y0 + r) * width + (x0 + j)
            Tf = t_final[pix]
            st[0, q] = Tf
            lk = last[pix]
            st[3, q] = np.float32(lk - s0) if lk >= 0 else np.float32(-1.0)
            kmax = max(kmax, lk)
            dot = F0
            for ci in range(C):
                gv = g_img[pix, ci]
                G[ci, q] = gv
                if has_bg:
                    dot += background[ci] * gv
            st[2, q] = Tf * dot - g_alpha[pix] * Tf
    # entries behind every pixel's last composited one get zero gradients
    for k in range(max(kmax + 1, s0), s1):
        p = gpos[k]
        for j in range(6 + C):
            eg[p, j] = F0
    # per row, its pixels' last composited entry (local): an entry's row range is trimmed to the rows
    # with a pixel it may have been composited into (the other rows' lanes change nothing; at 50k/256^2
    # that drops 15% of the entries' rows, on garden 25%; the gradient sums' rounding differs a little)
    rlast = np.empty(TH, dtype=np.float32)
    for r in range(TH):
        m = np.float32(-1.0)
        for j in range(TW):
            m = max(m, st[3, r * TW + j])
        rlast[r] = m
    for k in range(kmax, s0 - 1, -1):
        kl = np.float32(k - s0)
        ra = rows[k, 0] - y0  # the entry's rows (within the tile)
        rb = rows[k, 1] - y0
        while ra <= rb and rlast[ra] < kl:
            ra += 1
        while rb >= ra and rlast[rb] < kl:
            rb -= 1
        if ra > rb:
            p = gpos[k]
            for j in range(6 + C):
                eg[p, j] = F0
            continue
        q0 = np.uint64(ra * TW)  # unsigned block bounds: no wraparound, the loops vectorise
        q1 = np.uint64((rb + 1) * TW)
        mx, my, ca, cb, cc, o = _entry(ep, k)
        if exact_exp:
            _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc)
            _block_exp(buf, q0, q1, _cutoff(ca, cb, cc, o))
        elif _block_sigma_exp_bwd(buf, pc, q0, q1, mx, my, ca, cb, cc, o) > 0:
            _fixup_bwd(buf, q0, q1, o, _cutoff(ca, cb, cc, o))
        if C > 4:  # the extra channels' part of f . dL/dout (the first four are fused below)
            for q in range(q0, q1):
                buf[2, q] = F0
            for ci in range(4, C):
                f = ep[k, 6 + ci]
                for q in range(q0, q1):
                    buf[2, q] += f * G[ci, q]
        r = _bwd_entry(buf, st, G, pc, q0, q1, mx, my, ca, cb, cc, o, kl, ep[k, 6], ep[k, 7], ep[k, 8], ep[k, 9])
        p = gpos[k]
        eg[p, 0] = r[0]
        eg[p, 1] = r[1]
        eg[p, 2] = r[2]
        eg[p, 3] = r[3]
        eg[p, 4] = r[4]
        eg[p, 5] = r[5]
        eg[p, 6] = r[6]
        if C > 1:
            eg[p, 7] = r[7]
        if C > 2:
            eg[p, 8] = r[8]
        if C > 3:
            eg[p, 9] = r[9]
        if C > 4:
            _dots(buf[3], G, 4, q0, q1, fsum)
            for ci in range(4, C):
                eg[p, 6 + ci] = fsum[ci]
    return 0


@njit(inline="always", **opts)
def _backward(lo, hi, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final, last,
              g_img, g_alpha, eg):
    """Back-to-front per tile (ep from bucket, at least 4 channels wide); writes each entry's
    gradients to eg[gpos[entry]] (E, 6 + C): mean x, y, conic a, b, c, opacity, then the C channels."""
    for t in range(lo, hi):  # (static halves: in forward's counter loop this body ran ~10% slower)
        _backward_tile(t, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final,
                       last, g_img, g_alpha, eg)
    return 0


@njit(inline="always", **opts)
def _reduce_grads(lo, hi, goff, eg, g_mean, g_conic, g_opac, g_feat):
    """Sum each Gaussian's entries (contiguous rows goff[g]..goff[g+1]-1 of eg; float64 accumulation)."""
    C = g_feat.shape[1]
    for g in range(lo, hi):
        m0 = 0.0
        m1 = 0.0
        q0 = 0.0
        q1 = 0.0
        q2 = 0.0
        op = 0.0
        for ci in range(C):
            g_feat[g, ci] = F0
        for i in range(goff[g], goff[g + 1]):
            m0 += eg[i, 0]
            m1 += eg[i, 1]
            q0 += eg[i, 2]
            q1 += eg[i, 3]
            q2 += eg[i, 4]
            op += eg[i, 5]
            for ci in range(C):
                g_feat[g, ci] += eg[i, 6 + ci]
        g_mean[g, 0] = m0
        g_mean[g, 1] = m1
        g_conic[g, 0] = q0
        g_conic[g, 1] = q1
        g_conic[g, 2] = q2
        g_opac[g] = op
    return 0


@njit(inline="always", **opts)
def _reduce_counts(lo, hi, goff, ent_count, n_pixels):
    for g in range(lo, hi):
        s = 0
        for i in range(goff[g], goff[g + 1]):
            s += ent_count[i]
        n_pixels[g] = s
    return 0
