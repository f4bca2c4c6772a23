"""Numba kernels of the "cpu" rasterizer (see cpu.py for the torch wrapper).

Layout: the image is cut into 16x16 tiles. Binning gives every (Gaussian, tile) pair an
*entry*; entries are grouped by tile and sorted within each tile by (depth, index), which is the
compositing order of rasterize_torch. The forward walks each tile's entries front to back and,
per entry, only the pixel rows the Gaussian's alpha >= 1/255 ellipse can reach, with a
branch-free loop over the 16 pixels of a row (it vectorises). The backward walks each tile back to
front and writes gradients per entry (no two threads write the same memory); a final kernel
reduces the entries of each Gaussian.

All arithmetic that decides which pairs are composited is float32 and written in the same order
as rasterize_torch, so the same pairs are kept (up to 1-ulp differences of ``exp``).
Kernels take no thread count and read none: they are cached (cache=True); the caller sets
numba's thread count.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

TS = 16  # tile side
TP = TS * TS  # pixels per tile

F0 = np.float32(0.0)
F1 = np.float32(1.0)
HALF = np.float32(0.5)
AMIN = np.float32(1.0 / 255.0)  # rasterize_torch compares a float32 alpha with 1/255 -> float32
AMAX = np.float32(0.99)
# The oracle stops where T <= 1e-4 in float64. float32(1e-4) = 9.9999997e-05 is just below 1e-4
# and the next float32 is above it, so for a float32 T the test is exactly T <= float32(1e-4).
TMIN = np.float32(1e-4)
SMAX = np.float32(30.0)
LOG2E = np.float32(1.4426950408889634)
LN2HI = np.float32(0.693145751953125)
LN2LO = np.float32(1.428606765330187e-06)
# 2^-k for the fast exp's range reduction
P0 = np.float32(1.0)
P1 = np.float32(0.5)
P2 = np.float32(0.25)
P4 = np.float32(1.0 / 16.0)
P8 = np.float32(1.0 / 256.0)
P16 = np.float32(1.0 / 65536.0)
# minimax-ish Taylor coefficients of exp(r) on |r| <= ln2/2 (error ~2 ulp)
C2 = np.float32(1.0 / 2.0)
C3 = np.float32(1.0 / 6.0)
C4 = np.float32(1.0 / 24.0)
C5 = np.float32(1.0 / 120.0)
C6 = np.float32(1.0 / 720.0)
C7 = np.float32(1.0 / 5040.0)
P32 = np.float32(2.0**-32)
# Fix-up windows of the polynomial exp (measured: within 1.2e-7 relative of libm's expf on [0, 30]).
# DX bounds the relative difference of o*exp(-sigma) between the two exps (16x margin); a lane whose
# o*exp is within DX (relative) of 1/255 or 0.99 is recomputed with libm. For the T <= 1e-4 test each
# pixel carries a bound on the relative difference between its T and the libm path's T: one
# compositing step adds at most DX / (1 - alpha) (bounded here by DX * 2, 10 or 100), and a lane whose
# next T is within that bound of 1e-4 has its T recomputed exactly (replay with libm).
DX = np.float32(2e-6)
DX2 = np.float32(4e-6)
DX10 = np.float32(2e-5)
DX100 = np.float32(2e-4)
A05 = np.float32(0.5)
A09 = np.float32(0.9)

_opts = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)


@intrinsic
def _i32_as_f32(typingctx, x):
    """Reinterpret the bits of an int32 as a float32 (vectorises)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@njit(inline="always", **_opts)
def _fast_exp_neg(s):
    """exp(-s), branch free so that it vectorises; s < 0 gives exp(0) (those pairs are skipped).
    Cody-Waite reduction and a degree-7 Taylor polynomial: within ~1-2 ulp of exp (decisions are
    made exact by the fix-up in ``_fixup_fwd`` / ``_fixup_bwd``)."""
    s = s if s > F0 else F0
    s = s if s < SMAX else SMAX
    ki = np.int32(s * LOG2E + HALF)  # round(s / ln2), s >= 0
    k = np.float32(ki)
    r = (k * LN2HI - s) + k * LN2LO  # -s + k ln2, |r| <= ln2/2
    p = F1 + r * (F1 + r * (C2 + r * (C3 + r * (C4 + r * (C5 + r * (C6 + r * C7))))))
    return p * _i32_as_f32((np.int32(127) - ki) << np.int32(23))  # p * 2^-k, 0 <= k <= 44


# ----------------------------------------------------------------------------------------------
# binning


@njit(parallel=True, **_opts)
def prepare(means2d, conics, opac, radii, width, height, rect, rows, count):
    """Per Gaussian: tile rectangle (tx0, tx1, ty0, ty1), pixel rows [r0, r1] the alpha >= 1/255
    ellipse can reach (cut to the oracle's candidate box), and the number of tiles."""
    N = means2d.shape[0]
    TX = (width + TS - 1) // TS
    thr = np.float64(AMIN)
    for g in prange(N):
        count[g] = 0
        rect[g, 0] = 0
        rect[g, 1] = 0
        rect[g, 2] = 0
        rect[g, 3] = 0
        rows[g, 0] = 0
        rows[g, 1] = -1
        rx = radii[g, 0]
        ry = radii[g, 1]
        if rx <= 0 and ry <= 0:
            continue
        mx = means2d[g, 0]
        my = means2d[g, 1]
        if not (np.isfinite(mx) and np.isfinite(my)):
            continue
        # the oracle's candidate box, in float32 as it computes it
        bx0 = max(0.0, min(float(width), float(math.floor(mx - np.float32(rx)))))
        bx1 = max(0.0, min(float(width), float(math.ceil(mx + np.float32(rx)))))
        by0 = max(0.0, min(float(height), float(math.floor(my - np.float32(ry)))))
        by1 = max(0.0, min(float(height), float(math.ceil(my + np.float32(ry)))))
        if bx1 <= bx0 or by1 <= by0:
            continue
        c0 = bx0
        c1 = bx1 - 1.0
        r0 = by0
        r1 = by1 - 1.0
        o = np.float64(opac[g])
        if not (o >= thr):
            continue  # alpha <= opacity < 1/255 everywhere
        a = np.float64(conics[g, 0])
        b = np.float64(conics[g, 1])
        c = np.float64(conics[g, 2])
        det = a * c - b * b
        if a > 0 and c > 0 and det > 0:
            L = math.log(o / thr) * (1.0 + 1e-5) + 1e-5  # sigma <= L where alpha >= 1/255 (+margin)
            hx = math.sqrt(2.0 * L * c / det) * (1.0 + 1e-5) + 2e-3
            hy = math.sqrt(2.0 * L * a / det) * (1.0 + 1e-5) + 2e-3
            # pixel centres p + 0.5 within [m - h, m + h]
            c0 = max(c0, float(math.ceil(mx - hx - 0.5)))
            c1 = min(c1, float(math.floor(mx + hx - 0.5)))
            r0 = max(r0, float(math.ceil(my - hy - 0.5)))
            r1 = min(r1, float(math.floor(my + hy - 0.5)))
            if c1 < c0 or r1 < r0:
                continue
        ic0 = np.int64(c0)
        ic1 = np.int64(c1)
        ir0 = np.int64(r0)
        ir1 = np.int64(r1)
        rows[g, 0] = ir0
        rows[g, 1] = ir1
        tx0 = ic0 // TS
        tx1 = ic1 // TS + 1
        ty0 = ir0 // TS
        ty1 = ir1 // TS + 1
        rect[g, 0] = tx0
        rect[g, 1] = tx1
        rect[g, 2] = ty0
        rect[g, 3] = ty1
        count[g] = (tx1 - tx0) * (ty1 - ty0)
    return TX


@njit(parallel=True, **_opts)
def bin_entries(rect, count, dkey, goff, n_tiles, TX, nchunks):
    """Entries grouped by tile and sorted within each tile by (depth, index).

    Returns tile_start (T+1,), gid (E,) Gaussian of each entry, slot (E,) such that the entries of
    Gaussian g are slot[goff[g]:goff[g+1]] (for the per-Gaussian reduction)."""
    N = count.shape[0]
    E = goff[N]
    csize = (N + nchunks - 1) // nchunks
    cnt = np.zeros((nchunks, n_tiles), dtype=np.int64)
    for ch in prange(nchunks):
        for g in range(ch * csize, min(N, (ch + 1) * csize)):
            if count[g] == 0:
                continue
            for ty in range(rect[g, 2], rect[g, 3]):
                for tx in range(rect[g, 0], rect[g, 1]):
                    cnt[ch, ty * TX + tx] += 1
    tile_start = np.empty(n_tiles + 1, dtype=np.int64)
    run = 0
    for t in range(n_tiles):
        tile_start[t] = run
        for ch in range(nchunks):
            v = cnt[ch, t]
            cnt[ch, t] = run
            run += v
    tile_start[n_tiles] = run
    keys = np.empty(E, dtype=np.uint64)
    for ch in prange(nchunks):
        for g in range(ch * csize, min(N, (ch + 1) * csize)):
            if count[g] == 0:
                continue
            k = (np.uint64(dkey[g]) << np.uint64(32)) | np.uint64(g)
            for ty in range(rect[g, 2], rect[g, 3]):
                for tx in range(rect[g, 0], rect[g, 1]):
                    t = ty * TX + tx
                    keys[cnt[ch, t]] = k
                    cnt[ch, t] += 1
    gid = np.empty(E, dtype=np.int32)
    slot = np.empty(E, dtype=np.int64)
    for t in prange(n_tiles):
        s = tile_start[t]
        e = tile_start[t + 1]
        if e - s > 1:
            keys[s:e].sort()
        tx = t % TX
        ty = t // TX
        for i in range(s, e):
            g = np.int64(keys[i] & np.uint64(0xFFFFFFFF))
            gid[i] = g
            w = rect[g, 1] - rect[g, 0]
            slot[goff[g] + (ty - rect[g, 2]) * w + (tx - rect[g, 0])] = i
    return tile_start, gid, slot


# ----------------------------------------------------------------------------------------------
# per-entry helpers. An entry (Gaussian, tile) touches the tile's pixel rows [ra, rb]: a flat block
# q in [16 ra, 16 rb + 16) of the tile's 256 pixels. Loops over such a block have run-time bounds,
# so LLVM keeps them as loops and vectorises them (with a few run-time alias checks).


@njit(inline="always", **_opts)
def _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc):
    """buf[0] = sigma (written in the oracle's order of float32 operations), buf[1] = 0."""
    for q in range(q0, q1):
        dx = pc[0, q] - mx
        dy = pc[1, q] - my
        buf[0, q] = HALF * (ca * (dx * dx) + cc * (dy * dy)) + (cb * dx) * dy
        buf[1, q] = F0


@njit(inline="always", **_opts)
def _block_exp(buf, q0, q1, Lf):
    """buf[1] = exp(-sigma) (libm) where sigma <= Lf (elsewhere alpha < 1/255 for sure; left at 0)."""
    for q in range(q0, q1):
        sq = buf[0, q]
        if sq <= Lf:
            buf[1, q] = np.exp(-sq)


@njit(inline="always", **_opts)
def _step_err(al):
    """Bound on the relative T difference one compositing step with this alpha adds (DX/(1-al))."""
    return DX100 if al > A09 else (DX10 if al > A05 else DX2)


@njit(inline="always", **_opts)
def _near_a(oe):
    """o*exp within the fix-up window of the 1/255 cut-off or of the 0.99 clamp."""
    return (abs(oe - AMIN) <= AMIN * DX) | (abs(oe - AMAX) <= DX)


@njit(inline="always", **_opts)
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
        nflag += np.int32(f)
    return nflag


@njit(inline="always", **_opts)
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
        nflag += np.int32((buf[0, q] >= F0) & _near_a(o * buf[1, q]))
    return nflag


@njit(inline="always", **_opts)
def _cutoff(ca, cb, cc, o):
    """float32 Lf: alpha >= 1/255 implies sigma <= Lf (with margin); inf for odd conics."""
    a = np.float64(ca)
    det = a * np.float64(cc) - np.float64(cb) * np.float64(cb)
    if not (a > 0.0 and det > 0.0 and np.float64(o) > 0.0):
        return np.float32(np.inf)
    L = math.log(max(np.float64(o), 1e-30) / np.float64(AMIN))
    return np.float32(L * (1.0 + 1e-4) + 1e-4)


@njit(**_opts)
def _fixup_fwd(buf, st, pc, q0, q1, o, Lf, means2d, conics, opac, rows, gid, s0, k, y0):
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
            r = q // TS
            px = pc[0, q]
            py = pc[1, q]
            T = F1
            for j in range(s0, k):
                gj = gid[j]
                if rows[gj, 0] - y0 > r or rows[gj, 1] - y0 < r:
                    continue
                mxj = means2d[gj, 0]
                myj = means2d[gj, 1]
                caj = conics[gj, 0]
                cbj = conics[gj, 1]
                ccj = conics[gj, 2]
                oj = opac[gj]
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


@njit(**_opts)
def _fixup_bwd(buf, q0, q1, o, Lf):
    """Rare scalar path of the backward: libm's exp for lanes near 1/255 or 0.99 (as the forward)."""
    for q in range(q0, q1):
        sg = buf[0, q]
        if (sg >= F0) & _near_a(o * buf[1, q]):
            buf[1, q] = np.exp(-sg) if sg <= Lf else F0
    return 0


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
def _sum_rows(a, nrows, q0, q1, out):
    """out[i] = sum(a[i, q0:q1]) for i < nrows (reassociated: vectorised)."""
    for i in range(nrows):
        v = np.float32(0.0)
        for q in range(q0, q1):
            v += a[i, q]
        out[i] = v


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy", boundscheck=False)
def _dots(w, G, q0, q1, out):
    """out[c] = sum_q w[q] G[c, q] over [q0, q1) (reassociated: vectorised)."""
    for ci in range(G.shape[0]):
        v = np.float32(0.0)
        for q in range(q0, q1):
            v += w[q] * G[ci, q]
        out[ci] = v


@njit(inline="always", **_opts)
def _pixel_centres(pc, x0, y0):
    for q in range(TP):
        pc[0, q] = np.float32(x0 + (q & (TS - 1))) + HALF
        pc[1, q] = np.float32(y0 + (q // TS)) + HALF


# ----------------------------------------------------------------------------------------------
# forward


@njit(parallel=True, **_opts)
def forward(means2d, conics, opac, feats, rows, tile_start, gid, width, height, TX, background, has_bg,
            exact_exp, img, alpha_img, t_final, last, ent_count):
    """Front-to-back compositing per tile. Writes img (H*W, C), alpha_img (H*W), t_final (H*W),
    last (H*W; the last composited entry of each pixel, -1 if none), ent_count (E; pixels each entry
    was composited into; must come zeroed)."""
    C = feats.shape[1]
    n_tiles = tile_start.shape[0] - 1
    for t in prange(n_tiles):
        tx = t % TX
        ty = t // TX
        x0 = tx * TS
        y0 = ty * TS
        tw = min(TS, width - x0)
        th = min(TS, height - y0)
        s0 = tile_start[t]
        # st[0] T, st[1] active (1/0), st[2] last composited entry (local index as float32; -1 none),
        # st[3] bound on the relative difference of T from the libm path's (fast exp only)
        st = np.empty((4, TP), dtype=np.float32)
        acc = np.zeros((C, TP), dtype=np.float32)
        buf = np.zeros((3, TP), dtype=np.float32)  # sigma, exp(-sigma), weight
        pc = np.empty((2, TP), dtype=np.float32)
        fl = np.empty(C, dtype=np.float32)
        _pixel_centres(pc, x0, y0)
        for q in range(TP):
            r = q // TS
            j = q & (TS - 1)
            st[0, q] = F1
            st[1, q] = F1 if (r < th and j < tw) else F0
            st[2, q] = np.float32(-1.0)
            st[3, q] = F0
        n_act = tw * th
        for k in range(s0, tile_start[t + 1]):
            if n_act <= 0:
                break
            g = gid[k]
            ra = max(rows[g, 0] - y0, 0)
            rb = min(rows[g, 1] - y0, th - 1)
            if rb < ra:
                continue
            q0 = np.uint64(ra * TS)  # unsigned block bounds: no wraparound, the loops vectorise
            q1 = np.uint64((rb + 1) * TS)
            kl = np.float32(k - s0)
            mx = means2d[g, 0]
            my = means2d[g, 1]
            ca = conics[g, 0]
            cb = conics[g, 1]
            cc = conics[g, 2]
            o = opac[g]
            if exact_exp:
                _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc)
                _block_exp(buf, q0, q1, _cutoff(ca, cb, cc, o))
            else:
                if _block_sigma_exp_fwd(buf, st, pc, q0, q1, mx, my, ca, cb, cc, o) > 0:
                    _fixup_fwd(buf, st, pc, q0, q1, o, _cutoff(ca, cb, cc, o), means2d, conics, opac, rows, gid,
                               s0, k, y0)
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
                buf[2, q] = al * Tp if con else F0
                st[0, q] = nT if con else Tp
                st[1, q] = F0 if stop else act
                st[2, q] = kl if con else lv
                st[3, q] = st[3, q] + _step_err(al) if con else st[3, q]
                cnt += np.int32(con)
                nstop += np.int32(stop)
            if cnt > 0:
                for ci in range(C):
                    f = feats[g, ci]
                    for q in range(q0, q1):
                        acc[ci, q] += buf[2, q] * f
            ent_count[k] = cnt
            n_act -= nstop
        for r in range(th):
            for j in range(tw):
                q = r * TS + j
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


# ----------------------------------------------------------------------------------------------
# backward


@njit(parallel=True, **_opts)
def backward(means2d, conics, opac, feats, rows, tile_start, gid, width, height, TX, background, has_bg,
             exact_exp, t_final, last, g_img, g_alpha, e_mean, e_conic, e_opac, e_feat):
    """Back-to-front per tile; writes per-entry gradients (E,2), (E,3), (E,), (E,C)."""
    C = feats.shape[1]
    n_tiles = tile_start.shape[0] - 1
    for t in prange(n_tiles):
        s0 = tile_start[t]
        s1 = tile_start[t + 1]
        if s1 == s0:
            continue
        tx = t % TX
        ty = t // TX
        x0 = tx * TS
        y0 = ty * TS
        tw = min(TS, width - x0)
        th = min(TS, height - y0)
        # st[0] T (running back from T_final), st[1] Sg = sum over the composited entries behind of
        # w_j (f_j . dL/dout), st[2] T_final (bg . dL/dout) - dL/dalpha T_final, st[3] last entry
        st = np.zeros((4, TP), dtype=np.float32)
        G = np.zeros((C, TP), dtype=np.float32)
        buf = np.zeros((4, TP), dtype=np.float32)  # sigma, exp(-sigma), f . g, weight
        la = np.zeros((6, TP), dtype=np.float32)  # per pixel: d/d mean x, y, conic a, b, c, opacity
        pc = np.empty((2, TP), dtype=np.float32)
        sums = np.empty(6, dtype=np.float32)
        fsum = np.empty(C, dtype=np.float32)
        _pixel_centres(pc, x0, y0)
        for q in range(TP):
            st[3, q] = np.float32(-1.0)
        kmax = -1
        for r in range(th):
            for j in range(tw):
                q = r * TS + j
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
            e_mean[k, 0] = F0
            e_mean[k, 1] = F0
            e_conic[k, 0] = F0
            e_conic[k, 1] = F0
            e_conic[k, 2] = F0
            e_opac[k] = F0
            for ci in range(C):
                e_feat[k, ci] = F0
        for k in range(kmax, s0 - 1, -1):
            g = gid[k]
            kl = np.float32(k - s0)
            ra = max(rows[g, 0] - y0, 0)
            rb = min(rows[g, 1] - y0, th - 1)
            if rb < ra:
                e_mean[k, 0] = F0
                e_mean[k, 1] = F0
                e_conic[k, 0] = F0
                e_conic[k, 1] = F0
                e_conic[k, 2] = F0
                e_opac[k] = F0
                for ci in range(C):
                    e_feat[k, ci] = F0
                continue
            q0 = np.uint64(ra * TS)  # unsigned block bounds: no wraparound, the loops vectorise
            q1 = np.uint64((rb + 1) * TS)
            mx = means2d[g, 0]
            my = means2d[g, 1]
            ca = conics[g, 0]
            cb = conics[g, 1]
            cc = conics[g, 2]
            o = opac[g]
            if exact_exp:
                _block_sigma(buf, pc, q0, q1, mx, my, ca, cb, cc)
                _block_exp(buf, q0, q1, _cutoff(ca, cb, cc, o))
            elif _block_sigma_exp_bwd(buf, pc, q0, q1, mx, my, ca, cb, cc, o) > 0:
                _fixup_bwd(buf, q0, q1, o, _cutoff(ca, cb, cc, o))
            for q in range(q0, q1):
                buf[2, q] = F0
            for ci in range(C):
                f = feats[g, ci]
                for q in range(q0, q1):
                    buf[2, q] += f * G[ci, q]
            for q in range(q0, q1):
                s = buf[0, q]
                e = buf[1, q]
                fg = buf[2, q]
                oe = o * e
                al = oe if oe < AMAX else AMAX
                Tn = st[0, q]
                Sg = st[1, q]
                valid = (s >= F0) & (al >= AMIN) & (st[3, q] >= kl)
                om = F1 - al
                Ti = Tn / om
                w = al * Ti
                dla = Ti * fg - (Sg + st[2, q]) / om
                st[0, q] = Ti if valid else Tn
                st[1, q] = Sg + w * fg if valid else Sg
                buf[3, q] = w if valid else F0
                # alpha = min(0.99, o e): the clamp passes the gradient where o e <= 0.99
                dla = dla if (valid & (oe <= AMAX)) else F0
                ds = -(dla * al)  # dL/dsigma
                dx = pc[0, q] - mx
                dy = pc[1, q] - my
                la[0, q] = -ds * (ca * dx + cb * dy)
                la[1, q] = -ds * (cc * dy + cb * dx)
                la[2, q] = ds * (HALF * dx * dx)
                la[3, q] = ds * (dx * dy)
                la[4, q] = ds * (HALF * dy * dy)
                la[5, q] = dla * e
            _sum_rows(la, 6, q0, q1, sums)
            _dots(buf[3], G, q0, q1, fsum)
            e_mean[k, 0] = sums[0]
            e_mean[k, 1] = sums[1]
            e_conic[k, 0] = sums[2]
            e_conic[k, 1] = sums[3]
            e_conic[k, 2] = sums[4]
            e_opac[k] = sums[5]
            for ci in range(C):
                e_feat[k, ci] = fsum[ci]
    return 0


@njit(parallel=True, **_opts)
def reduce_grads(goff, slot, e_mean, e_conic, e_opac, e_feat, g_mean, g_conic, g_opac, g_feat):
    """Sum the entries of each Gaussian (float64 accumulation)."""
    N = goff.shape[0] - 1
    C = e_feat.shape[1]
    for g in prange(N):
        m0 = 0.0
        m1 = 0.0
        q0 = 0.0
        q1 = 0.0
        q2 = 0.0
        op = 0.0
        for ci in range(C):
            g_feat[g, ci] = F0
        for i in range(goff[g], goff[g + 1]):
            k = slot[i]
            m0 += e_mean[k, 0]
            m1 += e_mean[k, 1]
            q0 += e_conic[k, 0]
            q1 += e_conic[k, 1]
            q2 += e_conic[k, 2]
            op += e_opac[k]
            for ci in range(C):
                g_feat[g, ci] += e_feat[k, ci]
        g_mean[g, 0] = m0
        g_mean[g, 1] = m1
        g_conic[g, 0] = q0
        g_conic[g, 1] = q1
        g_conic[g, 2] = q2
        g_opac[g] = op
    return 0


@njit(parallel=True, **_opts)
def reduce_counts(goff, slot, ent_count, n_pixels):
    N = goff.shape[0] - 1
    for g in prange(N):
        s = 0
        for i in range(goff[g], goff[g + 1]):
            s += ent_count[slot[i]]
        n_pixels[g] = s
    return 0
