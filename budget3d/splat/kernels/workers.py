"""The parallel launches: each kernel is a cfunc worker run on torch's OpenMP team (see
budget3d.splat.pool); the Python functions keep the kernels' signatures plus a thread count.
"""

from __future__ import annotations

import numpy as np

from budget3d.splat import pool
from budget3d.splat import pool as P_
from budget3d.splat.kernels.binning import _bucket_fill, _bucket_src, _cull_entries, _prepare, _sort_params, bucket_plan
from budget3d.splat.kernels.common import TW, copts
from budget3d.splat.kernels.project_sh import PCH, _project_sh_bwd, _project_sh_fwd
from budget3d.splat.kernels.raster import _backward, _forward, _reduce_counts, _reduce_grads


@pool.kernel(**copts)
def _prepare_w(data):
    d = P_.words(data)
    m2d = P_.f32_2(d, 0)
    for lo, hi in P_.spans(d, m2d.shape[0]):
        _prepare(lo, hi, m2d, P_.f32_2(d, 1), P_.f32_1(d, 2), P_.i32_2(d, 3), P_.i64(d, 4), P_.i64(d, 5),
                 P_.i32_2(d, 6), P_.i32_2(d, 7), P_.i64_1(d, 8))


def prepare(means2d, conics, opac, radii, width, height, rect, rows, count, nthreads):
    """See _prepare (all Gaussians); returns the number of tile columns."""
    pool.run(_prepare_w, nthreads, means2d, conics, opac, radii, width, height, rect, rows, count)
    return (width + TW - 1) // TW


@pool.kernel(**copts)
def _sort_params_w(data):
    d = P_.words(data)
    order = P_.i32_1(d, 0)
    for lo, hi in P_.spans(d, order.shape[0]):
        _sort_params(lo, hi, order, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_1(d, 3), P_.f32_2(d, 4), P_.i32_2(d, 5),
                     P_.i32_2(d, 6), P_.f32_2(d, 7), P_.i32_2(d, 8))


def sort_params(order, means2d, conics, opac, feats, rect, rows, P, PR, nthreads):
    """See _sort_params (all of ``order``)."""
    pool.run(_sort_params_w, nthreads, order, means2d, conics, opac, feats, rect, rows, P, PR)


@pool.kernel(**copts)
def _cull_entries_w(data):
    d = P_.words(data)
    nchunks = P_.i64(d, 5)
    for c0, c1 in P_.spans(d, nchunks):
        _cull_entries(c0, c1, P_.f32_2(d, 0), P_.i32_2(d, 1), P_.i32_1(d, 2), P_.i64_1(d, 3), P_.i64(d, 4), nchunks,
                      P_.i32_1(d, 6), P_.i32_2(d, 7), P_.i32_1(d, 8), P_.i64_1(d, 9), P_.i64_2(d, 10))


def cull_entries(P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt, nthreads):
    """See _cull_entries (all ``nchunks`` chunks)."""
    pool.run(_cull_entries_w, nthreads, P, PR, order, ub_off, TX, nchunks, ent_tile, ent_row, ent_rank, count, cnt)


@pool.kernel(**copts)
def _bucket_src_w(data):
    d = P_.words(data)
    cnt = P_.i64_2(d, 4)
    for c0, c1 in P_.spans(d, cnt.shape[0]):
        _bucket_src(c0, c1, P_.i32_1(d, 0), P_.i64_1(d, 1), P_.i64_1(d, 2), P_.i32_1(d, 3), cnt, P_.i32_1(d, 5))


@pool.kernel(**copts)
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
    pool.run(_bucket_src_w, nthreads, order, ub_off, count, ent_tile, cnt, src)
    erow = np.empty((E, 2), dtype=np.int32)
    gpos = np.empty(E, dtype=np.int32)
    pool.run(_bucket_fill_w, nthreads, src, ent_row, ent_rank, gb, P, erow, gpos, ep)
    return tile_start, erow, gpos


@pool.kernel(**copts)
def _forward_w(data):
    d = P_.words(data)
    _forward(d, P_.f32_2(d, 0), P_.i32_2(d, 1), P_.i64_1(d, 2), P_.i64_1(d, 3), P_.i32_1(d, 4), P_.i64(d, 5),
             P_.i64(d, 6), P_.i64(d, 7), P_.f32_1(d, 8), P_.i64(d, 9) != 0, P_.i64(d, 10) != 0, P_.f32_2(d, 11),
             P_.f32_1(d, 12), P_.f32_1(d, 13), P_.i64_1(d, 14), P_.i64_1(d, 15))


def forward(ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg, exact_exp, img, alpha_img,
            t_final, last, ent_count, nthreads):
    """See _forward (tiles taken in ``torder``)."""
    pool.run(_forward_w, nthreads, ep, rows, tile_start, torder, gpos, width, height, TX, background, has_bg,
              exact_exp, img, alpha_img, t_final, last, ent_count)


@pool.kernel(**copts)
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
    pool.run(_backward_w, nthreads, ep, rows, tile_start, gpos, width, height, TX, background, has_bg, exact_exp,
              t_final, last, g_img, g_alpha, eg)


@pool.kernel(**copts)
def _reduce_grads_w(data):
    d = P_.words(data)
    goff = P_.i64_1(d, 0)
    for lo, hi in P_.spans(d, goff.shape[0] - 1):
        _reduce_grads(lo, hi, goff, P_.f32_2(d, 1), P_.f32_2(d, 2), P_.f32_2(d, 3), P_.f32_1(d, 4), P_.f32_2(d, 5))


def reduce_grads(goff, eg, g_mean, g_conic, g_opac, g_feat, nthreads):
    pool.run(_reduce_grads_w, nthreads, goff, eg, g_mean, g_conic, g_opac, g_feat)


@pool.kernel(**copts)
def _reduce_counts_w(data):
    d = P_.words(data)
    goff = P_.i64_1(d, 0)
    for lo, hi in P_.spans(d, goff.shape[0] - 1):
        _reduce_counts(lo, hi, goff, P_.i64_1(d, 1), P_.i64_1(d, 2))


def reduce_counts(goff, ent_count, n_pixels, nthreads):
    pool.run(_reduce_counts_w, nthreads, goff, ent_count, n_pixels)


@pool.kernel(**copts)
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
    pool.run(_project_sh_fwd_w, args[-1], *args[:-1])


@pool.kernel(**copts)
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
    pool.run(_project_sh_bwd_w, args[-1], *args[:-1])


# all the workers, heaviest first (compile time): see pool.compile_all
KERNELS = [_backward_w, _forward_w, _project_sh_bwd_w, _project_sh_fwd_w, _cull_entries_w, _prepare_w, _reduce_grads_w,
           _bucket_fill_w, _bucket_src_w, _sort_params_w, _reduce_counts_w]
