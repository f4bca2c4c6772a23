"""Numba kernels of the "cpu" rasterizer (see cpu.py for the torch wrapper).

Layout: the image is cut into tiles 8 pixels wide (one AVX2 vector of float32 per row) and 32
tall. Binning gives a (Gaussian, tile) *entry* only where the Gaussian's alpha >= 1/255 ellipse
reaches the tile (conservative float64 test), with the tile's pixel rows the ellipse reaches there,
and packs each entry's Gaussian parameters (``ep``) so the raster kernels read them sequentially.
Narrow tiles waste fewer lanes than 16x16 ones (random 50k scene: 10.5M evaluated lanes instead of
15.0M, for 12% more entries). The visible Gaussians are sorted once by (depth, index) (radix sort)
and bucketed into tiles in that order, so each tile's entries come out in the compositing order of
rasterize_torch without per-tile sorts. The forward walks each tile's entries front to back and,
per entry, only its pixel rows, with branch-free loops over that block of rows (they vectorise).
The forward's threads take tiles from a shared atomic counter (``_pool.next_work``), the tiles with
most entries first, instead of static halves, so a thread whose core is shared for a while (on the
2-vCPU machines) or whose tiles are heavier does not hold up the kernel. (The backward keeps static
halves: its body ran ~10% slower in the counter loop on 1 thread, and a second copy of it for 1
thread doubled the first-call compile time.)
The backward walks each tile back to front, one fused loop per entry with the gradient sums kept in
registers, and writes them per entry (no two threads write the same memory) to the entry's row in
Gaussian-major order; a final kernel sums each Gaussian's contiguous rows.

Three LLVM-level helpers keep the loops vectorised without function-wide fast-math: ``_sel`` (a
select, where numba's branches became masked stores), ``_fma`` and ``_radd`` (an add marked
reassociable, for the backward's running sums).

Projection and SH colour (``project_sh_fwd`` / ``project_sh_bwd``) are per-Gaussian kernels with a
hand-written backward, following project.project / project.sh_to_rgb.

All arithmetic that decides which pairs are composited is float32 and written in the same order
as rasterize_torch, so the same pairs are kept (up to 1-ulp differences of ``exp``).
Parallel kernels are cfunc workers run on torch's OpenMP team by ``_pool.run`` (the Python
functions at the end keep the kernels' signatures plus a thread count); they read no thread count
at compile time, so they are cached (cache=True).

Measured and not kept (50k/256^2 forward, 1 thread, in-process A/B; 29 ms as written): the forward
as one fused pass per tile row with explicit 8-wide LLVM vectors (too many live vectors and
constants for 16 ymm registers: 29-32 ms without the fix-up path, 44-46 ms with it); the checks of
the fix-up folded into the compositing loop (34 ms: the masks vectorised badly); workers compiled
without NRT reference counting (no change); skipping tile rows whose pixels have all stopped (15% of
the rows, no change). Without the fix-up's checks the forward takes 20 ms: exact decisions cost ~30%.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from budget3d.splat import _pool

TW = 8  # tile width: a row of a tile is one AVX2 vector of float32
TH = 32  # tile height
TP = TW * TH  # pixels per tile

I0 = np.int32(0)
I1 = np.int32(1)
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
# Fix-up windows of the polynomial exp (measured: within 2.6e-7 relative of libm's expf on [0, 30], 32M points;
# tests/test_cpu_backend.py checks 1/8 of DX).
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


@intrinsic
def _sel(typingctx, c, a, b):
    """``a if c else b`` as one LLVM select, no branch. Written as a conditional expression stored
    to an array, numba's branches become masked stores (vmaskmovps) in the vectorised loop, which
    are microcoded and slow on AMD (the forward's compositing loop ran 4x slower)."""
    if not isinstance(c, types.Boolean) or a != b:
        return None
    sig = a(c, a, b)

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return sig, codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma: vfmadd on FMA3 machines, vectorises)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _radd(typingctx, a, b):
    """a + b marked reassociable (and sign of zero insignificant): a running sum of these in a loop
    vectorises as a reduction, while the rest of the function keeps strict IEEE order."""
    if not (isinstance(a, types.Float) and a == b):
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        v = builder.fadd(args[0], args[1])
        v.flags.extend(["reassoc", "nsz"])
        return v

    return sig, codegen


@njit(inline="always", **_opts)
def _entry(ep, k):
    """Entry k's Gaussian: mean x, y, conic a, b, c, opacity (see bucket)."""
    return ep[k, 0], ep[k, 1], ep[k, 2], ep[k, 3], ep[k, 4], ep[k, 5]


@njit(inline="always", **_opts)
def _fast_exp_neg(s):
    """exp(-s), branch free so that it vectorises; s < 0 gives exp(0) (those pairs are skipped).
    Cody-Waite reduction and a degree-7 Taylor polynomial in Estrin's form (dependency depth 4
    instead of Horner's 7: the raster loops are bound by latency; 4-6% faster than Horner, A/B):
    within ~2 ulp of exp (decisions are made exact by the fix-up in ``_fixup_fwd`` / ``_fixup_bwd``)."""
    s = s if s > F0 else F0
    s = s if s < SMAX else SMAX
    ki = np.int32(s * LOG2E + HALF)  # round(s / ln2), s >= 0
    k = np.float32(ki)
    r = _fma(k, LN2LO, _fma(k, LN2HI, -s))  # -s + k ln2, |r| <= ln2/2 (k * LN2HI is exact)
    r2 = r * r
    p = _fma(r2 * r2, _fma(r2, _fma(r, C7, C6), _fma(r, C5, C4)), _fma(r2, _fma(r, C3, C2), _fma(r, F1, F1)))
    return p * _i32_as_f32((np.int32(127) - ki) << np.int32(23))  # p * 2^-k, 0 <= k <= 44


# ----------------------------------------------------------------------------------------------
# binning


@njit(inline="always", **_opts)
def _prepare(lo, hi, means2d, conics, opac, radii, width, height, rect, rows, count):
    """Per Gaussian: tile rectangle (tx0, tx1, ty0, ty1), pixel rows [r0, r1] and columns [c0, c1]
    the alpha >= 1/255 ellipse can reach (cut to the oracle's candidate box; rows[g] = (r0, r1, c0,
    c1)), and the number of tiles of the rectangle (an upper bound on its entries)."""
    thr = np.float64(AMIN)
    for g in range(lo, hi):
        count[g] = 0
        rect[g, 0] = 0
        rect[g, 1] = 0
        rect[g, 2] = 0
        rect[g, 3] = 0
        rows[g, 0] = 0
        rows[g, 1] = -1
        rows[g, 2] = 0
        rows[g, 3] = -1
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
            L = _ellipse_level(o)
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
        rows[g, 2] = ic0
        rows[g, 3] = ic1
        tx0 = ic0 // TW
        tx1 = ic1 // TW + 1
        ty0 = ir0 // TH
        ty1 = ir1 // TH + 1
        rect[g, 0] = tx0
        rect[g, 1] = tx1
        rect[g, 2] = ty0
        rect[g, 3] = ty1
        count[g] = (tx1 - tx0) * (ty1 - ty0)
    return 0


@njit(inline="always", **_opts)
def _ellipse_level(o):
    """sigma <= L wherever alpha >= 1/255 (float64, with margin for the float32 sigma)."""
    return math.log(o / np.float64(AMIN)) * (1.0 + 1e-5) + 1e-5


@njit(inline="always", **_opts)
def _branch(u, b, c, det, L2c, sign):
    """dy of the ellipse's upper (sign +1) or lower (-1) boundary at dx = u."""
    return (-b * u + sign * math.sqrt(max(L2c - det * u * u, 0.0))) / c


@njit(inline="always", **_opts)
def _cull_entries(c0, c1, P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt):
    """The tiles of each Gaussian's rectangle that its alpha >= 1/255 ellipse really reaches, and per
    such entry the tile's pixel rows [ra, rb] (absolute) on which the ellipse meets the tile's
    columns. Gaussians are visited in ``order`` (visible ones by depth; ``nchunks`` chunks in
    parallel), reading their parameters and rectangles from the depth-sorted tables P and PR (see
    sort_params); the i-th one's entries are written at ub_off[i] (by tile column, then row: the
    ellipse's row span is computed once per tile column) with ent_rank = i, count[g] = the number
    kept, cnt[ch, t] += the entries chunk ch puts in tile t.

    The ellipse 0.5 (a dx^2 + c dy^2) + b dx dy <= L cut to the vertical strip of the tile's column
    centres (within [c0, c1]) spans dy from the lower boundary at the strip point nearest the
    ellipse's lowest point to the upper boundary at the strip point nearest its highest point (the
    upper boundary is concave, the lower convex); rows are the pixel centres in that dy range. In
    float64, with L given a larger margin and the strip and dy range widened by 4e-3 px, so the
    test is conservative (never drops a pixel the oracle composites)."""
    M = order.shape[0]
    csize = (M + nchunks - 1) // nchunks
    for ch in range(c0, c1):
        for i in range(ch * csize, min(M, (ch + 1) * csize)):
            g = order[i]
            n = 0
            if ub_off[i + 1] > ub_off[i]:
                mx = np.float64(P[i, 0])
                my = np.float64(P[i, 1])
                a = np.float64(P[i, 2])
                b = np.float64(P[i, 3])
                c = np.float64(P[i, 4])
                det = a * c - b * b
                good = a > 0 and c > 0 and det > 0
                L = 0.0
                hx = 0.0
                hy = 0.0
                if good:
                    L = _ellipse_level(np.float64(P[i, 5])) * (1.0 + 1e-4) + 1e-4
                    hx = math.sqrt(2.0 * L * c / det)
                    hy = math.sqrt(2.0 * L * a / det)
                L2c = 2.0 * L * c
                u_top = -b * hy / a if good else 0.0  # dx of the highest / lowest point
                r0 = PR[i, 4]
                r1 = PR[i, 5]
                c0 = PR[i, 6]
                c1 = PR[i, 7]
                base = ub_off[i]
                single_col = PR[i, 1] - PR[i, 0] == 1
                for tx in range(PR[i, 0], PR[i, 1]):
                    ea = r0  # the ellipse's rows over this tile column
                    eb = r1
                    if good and not single_col:
                        ua = np.float64(max(c0, tx * TW)) + 0.5 - 4e-3 - mx
                        ub = np.float64(min(c1, tx * TW + TW - 1)) + 0.5 + 4e-3 - mx
                        ua = max(ua, -hx)
                        ub = min(ub, hx)
                        if ua > ub:
                            continue
                        dhi = _branch(min(max(u_top, ua), ub), b, c, det, L2c, 1.0)
                        dlo = _branch(min(max(-u_top, ua), ub), b, c, det, L2c, -1.0)
                        ea = max(ea, np.int64(math.ceil(my + dlo - 4e-3 - 0.5)))
                        eb = min(eb, np.int64(math.floor(my + dhi + 4e-3 - 0.5)))
                    for ty in range(max(PR[i, 2], ea // TH), min(PR[i, 3], eb // TH + 1)):
                        ra = max(ea, ty * TH)
                        rb = min(eb, ty * TH + TH - 1)
                        if ra <= rb:
                            t = ty * TX + tx
                            ent_tile[base + n] = t
                            ent_row[base + n, 0] = ra
                            ent_row[base + n, 1] = rb
                            ent_rank[base + n] = i
                            cnt[ch, t] += 1
                            n += 1
            count[g] = n
    return 0


@njit(**_opts)
def depth_order(dbits, count):
    """Indices of the Gaussians with count > 0, sorted by (depth, index): a stable LSD radix sort (4
    passes of 8 bits) of uint32 keys with the order of the float32 depths (``dbits``: their bits;
    -0 counts as +0)."""
    N = dbits.shape[0]
    M = 0
    for g in range(N):
        if count[g] > 0:
            M += 1
    a = np.empty(M, dtype=np.int32)
    ka = np.empty(M, dtype=np.uint32)
    m = 0
    for g in range(N):
        if count[g] > 0:
            d = dbits[g]
            if d == np.uint32(0x80000000):
                d = np.uint32(0)
            a[m] = g
            ka[m] = ~d if (d & np.uint32(0x80000000)) != 0 else d | np.uint32(0x80000000)
            m += 1
    bb = np.empty(M, dtype=np.int32)
    kb = np.empty(M, dtype=np.uint32)
    hist = np.empty(256, dtype=np.int64)
    for p in range(4):
        sh = np.uint32(8 * p)
        hist[:] = 0
        for i in range(M):
            hist[np.int64((ka[i] >> sh) & np.uint32(255))] += 1
        run = 0
        for d in range(256):
            v = hist[d]
            hist[d] = run
            run += v
        for i in range(M):
            d = np.int64((ka[i] >> sh) & np.uint32(255))
            j = hist[d]
            hist[d] = j + 1
            bb[j] = a[i]
            kb[j] = ka[i]
        a, bb = bb, a
        ka, kb = kb, ka
    return a


@njit(inline="always", **_opts)
def _sort_params(lo, hi, order, means2d, conics, opac, feats, rect, rows, P, PR):
    """The visible Gaussians' parameters in depth order: P[i] = (mean x, y, conic a, b, c, opacity,
    channels zero-padded to 4) and PR[i] = (rect, rows) of prepare, of Gaussian order[i], so that the
    binning and bucket read them sequentially (in the Gaussians' order they were cache misses)."""
    C = feats.shape[1]
    for i in range(lo, hi):
        g = order[i]
        P[i, 0] = means2d[g, 0]
        P[i, 1] = means2d[g, 1]
        P[i, 2] = conics[g, 0]
        P[i, 3] = conics[g, 1]
        P[i, 4] = conics[g, 2]
        P[i, 5] = opac[g]
        for ci in range(C):
            P[i, 6 + ci] = feats[g, ci]
        for ci in range(C, P.shape[1] - 6):
            P[i, 6 + ci] = F0
        for j in range(4):
            PR[i, j] = rect[g, j]
            PR[i, 4 + j] = rows[g, j]
    return 0


@njit(**_opts)
def bucket_plan(order, ub_off, goff, cnt):
    """Bucket's serial part: tile_start (T+1,) from the per-chunk counts cnt (nchunks, T) of
    cull_entries, turned in place into each chunk's first slot in each tile; and gb (M,): an entry j
    of the i-th visible Gaussian goes to gpos gb[i] + j."""
    nchunks, n_tiles = cnt.shape
    tile_start = np.empty(n_tiles + 1, dtype=np.int64)
    run = 0
    for t in range(n_tiles):
        tile_start[t] = run
        for ch in range(nchunks):
            v = cnt[ch, t]
            cnt[ch, t] = run
            run += v
    tile_start[n_tiles] = run
    M = order.shape[0]
    gb = np.empty(M, dtype=np.int64)
    for i in range(M):
        gb[i] = goff[order[i]] - ub_off[i]
    return tile_start, gb


@njit(inline="always", **_opts)
def _bucket_src(c0, c1, order, ub_off, count, ent_tile, cnt, src):
    """Chunk ch of ``order`` fills a consecutive range of each tile after the chunks before it:
    src[slot] = the entry (index into cull_entries' arrays) at each slot."""
    M = order.shape[0]
    nchunks = cnt.shape[0]
    csize = (M + nchunks - 1) // nchunks
    for ch in range(c0, c1):
        for i in range(ch * csize, min(M, (ch + 1) * csize)):
            b = ub_off[i]
            for j in range(b, b + count[order[i]]):
                t = ent_tile[j]
                k = cnt[ch, t]
                cnt[ch, t] = k + 1
                src[k] = j
    return 0


@njit(inline="always", **_opts)
def _bucket_fill(lo, hi, src, ent_row, ent_rank, gb, P, erow, gpos, ep):
    """Slots [lo, hi) written sequentially, reading their sources in increasing order within each tile."""
    W = ep.shape[1]
    for k in range(lo, hi):
        j = src[k]
        i = ent_rank[j]
        erow[k, 0] = ent_row[j, 0]
        erow[k, 1] = ent_row[j, 1]
        gpos[k] = gb[i] + j
        for c in range(W):
            ep[k, c] = P[i, c]
    return 0


# ----------------------------------------------------------------------------------------------
# per-entry helpers. An entry (Gaussian, tile) touches the tile's pixel rows [ra, rb]: a flat block
# q in [TW ra, TW rb + TW) of the tile's TP pixels. Loops over such a block have run-time bounds,
# so LLVM keeps them as loops and vectorises them (with a few run-time alias checks).


@njit(inline="always", **_opts)
def _inc(n, flag):
    """n + flag as int32. Written ``n += np.int32(flag)``, numba widens the sum to int64, and the
    loop counting lanes then vectorises 4 wide (xmm floats, int64 accumulators) instead of 8."""
    return np.int32(n + (I1 if flag else I0))


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
        nflag = _inc(nflag, f)
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
        nflag = _inc(nflag, (buf[0, q] >= F0) & _near_a(o * buf[1, q]))
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


@njit(**_opts)
def _fixup_bwd(buf, q0, q1, o, Lf):
    """Rare scalar path of the backward: libm's exp for lanes near 1/255 or 0.99 (as the forward)."""
    for q in range(q0, q1):
        sg = buf[0, q]
        if (sg >= F0) & _near_a(o * buf[1, q]):
            buf[1, q] = np.exp(-sg) if sg <= Lf else F0
    return 0


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
def _pixel_centres(pc, x0, y0):
    for q in range(TP):
        pc[0, q] = np.float32(x0 + (q & (TW - 1))) + HALF
        pc[1, q] = np.float32(y0 + (q // TW)) + HALF


# ----------------------------------------------------------------------------------------------
# forward


@njit(inline="always", **_opts)
def _tile_box(t, TX, width, height):
    """Tile t's top-left pixel (x0, y0) and its width and height within the image."""
    x0 = (t % TX) * TW
    y0 = (t // TX) * TH
    return x0, y0, min(TW, width - x0), min(TH, height - y0)


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
def _forward(d, ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg, exact_exp, img,
             alpha_img, t_final, last, ent_count):
    """Front-to-back compositing per tile (ep: each entry's parameters, see bucket; rows (E, 2):
    its absolute pixel rows). Writes
    img (H*W, C), alpha_img (H*W), t_final (H*W),
    last (H*W; the last composited entry of each pixel, -1 if none), ent_count (E; pixels each entry
    was composited into, at gpos[entry]; must come zeroed)."""
    n_tiles = tile_start.shape[0] - 1
    while True:
        i = _pool.next_work(d)  # tiles are taken from a shared counter (see torder)
        if i >= n_tiles:
            break
        _forward_tile(torder[i], ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, img,
                      alpha_img, t_final, last, ent_count)
    return 0


# ----------------------------------------------------------------------------------------------
# backward


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
def _backward(lo, hi, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final, last,
              g_img, g_alpha, eg):
    """Back-to-front per tile (ep from bucket, at least 4 channels wide); writes each entry's
    gradients to eg[gpos[entry]] (E, 6 + C): mean x, y, conic a, b, c, opacity, then the C channels."""
    for t in range(lo, hi):  # (static halves: in forward's counter loop this body ran ~10% slower)
        _backward_tile(t, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final,
                       last, g_img, g_alpha, eg)
    return 0


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
def _reduce_counts(lo, hi, goff, ent_count, n_pixels):
    for g in range(lo, hi):
        s = 0
        for i in range(goff[g], goff[g + 1]):
            s += ent_count[i]
        n_pixels[g] = s
    return 0


# ----------------------------------------------------------------------------------------------
# projection + SH colour (the "cpu" backend's replacement for project.project / sh_to_rgb):
# per Gaussian, float32, the oracle's order of operations where it is cheap to follow. The backward
# recomputes the forward's intermediates and applies the chain rule by hand.

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


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
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


@njit(inline="always", **_opts)
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


@njit(**_opts)  # (not inlined: the worker's call has > 30 arguments, which CPython passes as *args)
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


# ----------------------------------------------------------------------------------------------
# parallel launches: each kernel is a cfunc worker run on torch's OpenMP team (see _pool); the
# Python functions below keep the kernels' signatures plus a thread count.

_copts = dict(error_model="numpy", boundscheck=False, fastmath=False)
P_ = _pool


@_pool.kernel(**_copts)
def _prepare_w(data):
    d = P_.words(data)
    m2d = P_.f32_2(d, 0)
    for lo, hi in P_.spans(d, m2d.shape[0]):
        _prepare(lo, hi, m2d, P_.f32_2(d, 1), P_.f32_1(d, 2), P_.i32_2(d, 3), P_.i64(d, 4), P_.i64(d, 5),
                 P_.i32_2(d, 6), P_.i32_2(d, 7), P_.i64_1(d, 8))


def prepare(means2d, conics, opac, radii, width, height, rect, rows, count, nthreads):
    """See _prepare (all Gaussians); returns the number of tile columns."""
    _pool.run(_prepare_w, nthreads, means2d, conics, opac, radii, width, height, rect, rows, count)
    return (width + TW - 1) // TW


@_pool.kernel(**_copts)
def _sort_params_w(data):
    d = P_.words(data)
    order = P_.i32_1(d, 0)
    for lo, hi in P_.spans(d, order.shape[0]):
        _sort_params(lo, hi, order, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_1(d, 3), P_.f32_2(d, 4), P_.i32_2(d, 5),
                     P_.i32_2(d, 6), P_.f32_2(d, 7), P_.i32_2(d, 8))


def sort_params(order, means2d, conics, opac, feats, rect, rows, P, PR, nthreads):
    """See _sort_params (all of ``order``)."""
    _pool.run(_sort_params_w, nthreads, order, means2d, conics, opac, feats, rect, rows, P, PR)


@_pool.kernel(**_copts)
def _cull_entries_w(data):
    d = P_.words(data)
    nchunks = P_.i64(d, 5)
    for c0, c1 in P_.spans(d, nchunks):
        _cull_entries(c0, c1, P_.f32_2(d, 0), P_.i32_2(d, 1), P_.i32_1(d, 2), P_.i64_1(d, 3), P_.i64(d, 4), nchunks,
                      P_.i32_1(d, 6), P_.i32_2(d, 7), P_.i32_1(d, 8), P_.i64_1(d, 9), P_.i64_2(d, 10))


def cull_entries(P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt, nthreads):
    """See _cull_entries (all ``nchunks`` chunks)."""
    _pool.run(_cull_entries_w, nthreads, P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt)


@_pool.kernel(**_copts)
def _bucket_src_w(data):
    d = P_.words(data)
    cnt = P_.i64_2(d, 4)
    for c0, c1 in P_.spans(d, cnt.shape[0]):
        _bucket_src(c0, c1, P_.i32_1(d, 0), P_.i64_1(d, 1), P_.i64_1(d, 2), P_.i32_1(d, 3), cnt, P_.i32_1(d, 5))


@_pool.kernel(**_copts)
def _bucket_fill_w(data):
    d = P_.words(data)
    src = P_.i32_1(d, 0)
    for lo, hi in P_.spans(d, src.shape[0]):
        _bucket_fill(lo, hi, src, P_.i32_2(d, 1), P_.i32_1(d, 2), P_.i64_1(d, 3), P_.f32_2(d, 4), P_.i32_2(d, 5),
                     P_.i32_1(d, 6), P_.f32_2(d, 7))


def bucket(order, ub_off, count, goff, ent_tile, ent_row, ent_rank, cnt, P, ep, nthreads):
    """Entries grouped by tile, in depth order within each tile (chunk ch of ``order`` fills a
    consecutive range of each tile after the chunks before it; cnt (nchunks, T) from cull_entries).
    Returns tile_start (T+1,), erow (E, 2) each entry's absolute pixel rows,
    gpos (E,): where entry k's per-entry results go in Gaussian-major order (Gaussian g's entries at
    goff[g]..goff[g+1]-1), so the kernels scatter each entry's results once and the per-Gaussian
    reductions read contiguous memory instead of gathering. Also fills ep (E, P.shape[1]): entry k's
    Gaussian's row of P (mean x, y, conic a, b, c, opacity, channels), so that the raster kernels
    read each entry's parameters sequentially instead of gathering them (random Gaussians per entry:
    the cache misses had cost ~20% of the raster time).
    Two passes: the first scatters only each entry's source index (one int32 per entry); the second
    writes the outputs sequentially, reading the sources in increasing order within each tile."""
    tile_start, gb = bucket_plan(order, ub_off, goff, cnt)
    E = int(tile_start[-1])
    src = np.empty(E, dtype=np.int32)
    _pool.run(_bucket_src_w, nthreads, order, ub_off, count, ent_tile, cnt, src)
    erow = np.empty((E, 2), dtype=np.int32)
    gpos = np.empty(E, dtype=np.int32)
    _pool.run(_bucket_fill_w, nthreads, src, ent_row, ent_rank, gb, P, erow, gpos, ep)
    return tile_start, erow, gpos


@_pool.kernel(**_copts)
def _forward_w(data):
    d = P_.words(data)
    _forward(d, P_.f32_2(d, 0), P_.i32_2(d, 1), P_.i64_1(d, 2), P_.i64_1(d, 3), P_.i32_1(d, 4), P_.i64(d, 5),
             P_.i64(d, 6), P_.i64(d, 7), P_.f32_1(d, 8), P_.i64(d, 9) != 0, P_.i64(d, 10) != 0, P_.f32_2(d, 11),
             P_.f32_1(d, 12), P_.f32_1(d, 13), P_.i64_1(d, 14), P_.i64_1(d, 15))


def forward(ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg, exact_exp, img, alpha_img,
            t_final, last, ent_count, nthreads):
    """See _forward (tiles taken in ``torder``)."""
    _pool.run(_forward_w, nthreads, ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg,
              exact_exp, img, alpha_img, t_final, last, ent_count)


@_pool.kernel(**_copts)
def _backward_w(data):
    d = P_.words(data)
    tile_start = P_.i64_1(d, 2)
    for lo, hi in P_.spans(d, tile_start.shape[0] - 1):
        _backward(lo, hi, P_.f32_2(d, 0), P_.i32_2(d, 1), tile_start, P_.i32_1(d, 3), P_.i64(d, 4), P_.i64(d, 5),
                  P_.i64(d, 6), P_.f32_1(d, 7), P_.i64(d, 8) != 0, P_.i64(d, 9) != 0, P_.f32_1(d, 10), P_.i64_1(d, 11),
                  P_.f32_2(d, 12), P_.f32_1(d, 13), P_.f32_2(d, 14))


def backward(ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp, t_final, last, g_img,
             g_alpha, eg, nthreads):
    """See _backward (all tiles)."""
    _pool.run(_backward_w, nthreads, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp,
              t_final, last, g_img, g_alpha, eg)


@_pool.kernel(**_copts)
def _reduce_grads_w(data):
    d = P_.words(data)
    goff = P_.i64_1(d, 0)
    for lo, hi in P_.spans(d, goff.shape[0] - 1):
        _reduce_grads(lo, hi, goff, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_2(d, 3), P_.f32_1(d, 4), P_.f32_2(d, 5))


def reduce_grads(goff, eg, g_mean, g_conic, g_opac, g_feat, nthreads):
    _pool.run(_reduce_grads_w, nthreads, goff, eg, g_mean, g_conic, g_opac, g_feat)


@_pool.kernel(**_copts)
def _reduce_counts_w(data):
    d = P_.words(data)
    goff = P_.i64_1(d, 0)
    for lo, hi in P_.spans(d, goff.shape[0] - 1):
        _reduce_counts(lo, hi, goff, P_.i64_1(d, 1), P_.i64_1(d, 2))


def reduce_counts(goff, ent_count, n_pixels, nthreads):
    _pool.run(_reduce_counts_w, nthreads, goff, ent_count, n_pixels)


@_pool.kernel(**_copts)
def _project_sh_fwd_w(data):
    d = P_.words(data)
    means = P_.f32_2(d, 0)
    for c0, c1 in P_.spans(d, (means.shape[0] + PCH - 1) // PCH):
        _project_sh_fwd(c0, c1, means, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_1(d, 3), P_.f32_2(d, 4), P_.f32_3(d, 5),
                        P_.f32_2(d, 6), P_.f32_1(d, 7), P_.f32(d, 8), P_.f32(d, 9), P_.f32(d, 10), P_.f32(d, 11),
                        P_.f32(d, 12), P_.f32(d, 13), P_.f32(d, 14), P_.f32(d, 15), P_.i64(d, 16), P_.i64(d, 17),
                        P_.f32(d, 18), P_.f32(d, 19), P_.i64(d, 20), P_.f32_1(d, 21), P_.f32_2(d, 22), P_.f32_2(d, 23),
                        P_.f32_1(d, 24), P_.i32_2(d, 25), P_.f32_2(d, 26))


def project_sh_fwd(*args):
    """See _project_sh_fwd (all Gaussians); the last argument is the thread count."""
    _pool.run(_project_sh_fwd_w, args[-1], *args[:-1])


@_pool.kernel(**_copts)
def _project_sh_bwd_w(data):
    d = P_.words(data)
    means = P_.f32_2(d, 0)
    for c0, c1 in P_.spans(d, (means.shape[0] + PCH - 1) // PCH):
        _project_sh_bwd(c0, c1, means, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_1(d, 3), P_.f32_2(d, 4), P_.f32_3(d, 5),
                        P_.f32_2(d, 6), P_.f32_1(d, 7), P_.f32(d, 8), P_.f32(d, 9), P_.f32(d, 10), P_.f32(d, 11),
                        P_.f32(d, 12), P_.f32(d, 13), P_.f32(d, 14), P_.f32(d, 15), P_.i64(d, 16), P_.i64(d, 17),
                        P_.f32(d, 18), P_.f32(d, 19), P_.i64(d, 20), P_.f32_1(d, 21), P_.f32_2(d, 22), P_.f32_2(d, 23),
                        P_.f32_1(d, 24), P_.f32_2(d, 25), P_.f32_2(d, 26), P_.f32_2(d, 27), P_.f32_2(d, 28),
                        P_.f32_2(d, 29), P_.f32_3(d, 30))


def project_sh_bwd(*args):
    """See _project_sh_bwd (all Gaussians); the last argument is the thread count."""
    _pool.run(_project_sh_bwd_w, args[-1], *args[:-1])


# all the workers, heaviest first (compile time): see _pool.compile_all
KERNELS = [_backward_w, _forward_w, _project_sh_bwd_w, _project_sh_fwd_w, _cull_entries_w, _prepare_w, _reduce_grads_w,
           _bucket_fill_w, _bucket_src_w, _sort_params_w, _reduce_counts_w]
