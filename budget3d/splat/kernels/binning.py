"""Binning: which (Gaussian, tile) entries exist, in compositing order (see the package docstring).

``prepare`` bounds each Gaussian's tiles and pixel rows, ``depth_order`` sorts the visible ones by
(depth, index), ``sort_params`` packs their parameters in that order, ``cull_entries`` keeps the
tiles the alpha >= 1/255 ellipse really reaches and ``bucket`` groups the entries by tile.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from budget3d.splat.kernels.common import AMIN, F0, TH, TW, opts


@njit(inline="always", **opts)
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


@njit(inline="always", **opts)
def _ellipse_level(o):
    """sigma <= L wherever alpha >= 1/255 (float64, with margin for the float32 sigma)."""
    return math.log(o / np.float64(AMIN)) * (1.0 + 1e-5) + 1e-5


@njit(inline="always", **opts)
def _branch(u, b, c, det, L2c, sign):
    """dy of the ellipse's upper (sign +1) or lower (-1) boundary at dx = u."""
    return (-b * u + sign * math.sqrt(max(L2c - det * u * u, 0.0))) / c


@njit(inline="always", **opts)
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


@njit(**opts)
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


@njit(inline="always", **opts)
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


@njit(**opts)
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


@njit(inline="always", **opts)
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


@njit(inline="always", **opts)
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
