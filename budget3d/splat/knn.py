"""Exact k-nearest-neighbour distances of a point cloud with a k-d tree (numba).

Used to initialise Gaussian scales from a point cloud. Brute force is O(N^2): a 138k-point Mip-NeRF
360 cloud took 121 s on 2 cores; the tree takes a fraction of a second. Distances are computed in
float64, so they are exact up to rounding (brute force through ``torch.cdist`` uses the
``|x|^2 + |y|^2 - 2 x.y`` expansion, which loses precision far from the origin).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

# numba's "workqueue" threading layer for the query's prange: on the shared 2-vCPU machines the
# OpenMP layer (a second OpenMP runtime next to torch's) collapsed to ~10x slower than one thread.
# Set NUMBA_THREADING_LAYER to choose another layer.
if os.environ.get("NUMBA_THREADING_LAYER") is None and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

LEAF = 16


@njit(cache=True, nogil=True)
def _build(p, perm, lo_, hi_, left, right, bmin, bmax, depth):
    """Nodes over perm (reordered in place): node n holds perm[lo_[n]:hi_[n]], children left/right
    (-1 for a leaf), bounding box bmin/bmax. Splits at the middle of the widest side of the box
    (Hoare partition, O(N) per level); a box with no extent (duplicates) is a leaf. Returns the
    tree's depth (depth[n]: node n's)."""
    n_nodes = 1
    lo_[0] = 0
    hi_[0] = p.shape[0]
    depth[0] = 0
    dmax = 0
    stack = np.empty(lo_.shape[0] + 1, dtype=np.int64)
    stack[0] = 0  # the root
    sp = 1
    while sp > 0:
        sp -= 1
        nd = stack[sp]
        lo = lo_[nd]
        hi = hi_[nd]
        for d in range(3):
            mn = np.inf
            mx = -np.inf
            for i in range(lo, hi):
                v = p[perm[i], d]
                mn = min(mn, v)
                mx = max(mx, v)
            bmin[nd, d] = mn
            bmax[nd, d] = mx
        left[nd] = -1
        right[nd] = -1
        if hi - lo <= LEAF:
            continue
        d = 0
        for e in range(1, 3):
            if bmax[nd, e] - bmin[nd, e] > bmax[nd, d] - bmin[nd, d]:
                d = e
        if not (bmax[nd, d] > bmin[nd, d]):
            continue  # all points equal
        mid = 0.5 * (bmin[nd, d] + bmax[nd, d])
        i = lo
        j = hi - 1
        while i <= j:
            if p[perm[i], d] < mid:
                i += 1
            else:
                t = perm[i]
                perm[i] = perm[j]
                perm[j] = t
                j -= 1
        # both sides are non-empty: the minimum is < mid and the maximum is >= mid
        a = n_nodes
        b = n_nodes + 1
        n_nodes += 2
        lo_[a] = lo
        hi_[a] = i
        lo_[b] = i
        hi_[b] = hi
        left[nd] = a
        right[nd] = b
        depth[a] = depth[nd] + 1
        depth[b] = depth[nd] + 1
        dmax = max(dmax, depth[a])
        stack[sp] = a
        stack[sp + 1] = b
        sp += 2
    return dmax


@njit(inline="always")
def _gap(q, a, b):
    return a - q if q < a else (q - b if q > b else 0.0)


@njit(inline="always")
def _box_d2(q0, q1, q2, bmin, bmax, nd):
    """Squared distance from the point to node nd's box (0 inside)."""
    g0 = _gap(q0, bmin[nd, 0], bmax[nd, 0])
    g1 = _gap(q1, bmin[nd, 1], bmax[nd, 1])
    g2 = _gap(q2, bmin[nd, 2], bmax[nd, 2])
    return g0 * g0 + g1 * g1 + g2 * g2


@njit(parallel=True, cache=True, nogil=True)
def _query(p, perm, lo_, hi_, left, right, bmin, bmax, dmax, k, out):
    """out[i] = mean distance from point i to its k nearest other points (float64)."""
    N = p.shape[0]
    for i in prange(N):
        best = np.full(k + 1, np.inf)  # k + 1 smallest squared distances, ascending (includes i itself)
        stack = np.empty(dmax + 2, dtype=np.int64)  # depth-first, two children pushed per level
        q0 = p[i, 0]
        q1 = p[i, 1]
        q2 = p[i, 2]
        stack[0] = 0  # the root
        sp = 1
        while sp > 0:
            sp -= 1
            nd = stack[sp]
            if _box_d2(q0, q1, q2, bmin, bmax, nd) > best[k]:
                continue
            if left[nd] < 0:
                for j in range(lo_[nd], hi_[nd]):
                    g = perm[j]
                    t0 = p[g, 0] - q0
                    t1 = p[g, 1] - q1
                    t2 = p[g, 2] - q2
                    d2 = t0 * t0 + t1 * t1 + t2 * t2
                    if d2 < best[k]:
                        m = k
                        while m > 0 and best[m - 1] > d2:
                            best[m] = best[m - 1]
                            m -= 1
                        best[m] = d2
                continue
            a = left[nd]
            b = right[nd]
            # nearer child last (popped first)
            if _box_d2(q0, q1, q2, bmin, bmax, a) < _box_d2(q0, q1, q2, bmin, bmax, b):
                a, b = b, a
            stack[sp] = a
            stack[sp + 1] = b
            sp += 2
        s = 0.0
        for m in range(1, k + 1):  # drop the smallest: the point itself (or a duplicate at 0)
            s += np.sqrt(best[m])
        out[i] = s / k


def knn_mean_dist(points: np.ndarray, k: int = 3) -> np.ndarray:
    """Mean distance from each point to its min(k, N - 1) nearest other points (exact; float32;
    NaN for a single point)."""
    p = np.ascontiguousarray(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    n = p.shape[0]
    if n <= 1:
        return np.full(n, np.nan, dtype=np.float32)
    k = min(int(k), n - 1)
    perm = np.arange(n, dtype=np.int64)
    cap = 2 * n  # every split has two non-empty sides: at most n leaves, 2n - 1 nodes
    lo_ = np.empty(cap, dtype=np.int64)
    hi_ = np.empty(cap, dtype=np.int64)
    left = np.empty(cap, dtype=np.int64)
    right = np.empty(cap, dtype=np.int64)
    bmin = np.empty((cap, 3))
    bmax = np.empty((cap, 3))
    depth = np.empty(cap, dtype=np.int64)
    out = np.empty(n)
    dmax = _build(p, perm, lo_, hi_, left, right, bmin, bmax, depth)
    _query(p, perm, lo_, hi_, left, right, bmin, bmax, dmax, k, out)
    return out.astype(np.float32)
