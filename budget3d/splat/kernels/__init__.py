"""Numba kernels of the "cpu" rasterizer (see budget3d/splat/cpu.py for the torch wrapper).

Files: ``common`` (compile options, constants, LLVM helpers, the polynomial exp), ``binning``,
``raster`` (forward, backward, reductions), ``project_sh`` (projection and SH colour, forward and
backward), ``workers`` (the parallel launches; their Python functions are re-exported here).

Layout: the image is cut into tiles 8 pixels wide (one AVX2 vector of float32 per row) and 32
tall. Binning gives a (Gaussian, tile) *entry* only where the Gaussian's alpha >= 1/255 ellipse
reaches the tile (conservative float64 test), with the tile's pixel rows the ellipse reaches there,
and packs each entry's Gaussian parameters (``ep``) so the raster kernels read them sequentially.
Narrow tiles waste fewer lanes than 16x16 ones (random 50k scene: 10.5M evaluated lanes instead of
15.0M, for 12% more entries). The visible Gaussians are sorted once by (depth, index) (radix sort)
and bucketed into tiles in that order, so each tile's entries come out in the compositing order of
rasterize_torch without per-tile sorts. The forward walks each tile's entries front to back and,
per entry, only its pixel rows, with branch-free loops over that block of rows (they vectorise).
The forward's threads take tiles from a shared atomic counter (``pool.next_work``), the tiles with
most entries first, instead of static halves, so a thread whose core is shared for a while (on the
2-vCPU machines) or whose tiles are heavier does not hold up the kernel. (The backward keeps static
halves: its body ran ~10% slower in the counter loop on 1 thread, and a second copy of it for 1
thread doubled the first-call compile time.)
The backward walks each tile back to front, one fused loop per entry with the gradient sums kept in
registers, and writes them per entry (no two threads write the same memory) to the entry's row in
Gaussian-major order; a final kernel sums each Gaussian's contiguous rows.

Projection and SH colour (``project_sh_fwd`` / ``project_sh_bwd``) are per-Gaussian kernels with a
hand-written backward, following project.project / project.sh_to_rgb.

All arithmetic that decides which pairs are composited is float32 and written in the same order
as rasterize_torch, so the same pairs are kept (up to 1-ulp differences of ``exp``).
Parallel kernels are cfunc workers run on torch's OpenMP team by ``pool.run`` (the Python
functions of ``workers`` keep the kernels' signatures plus a thread count); they read no thread count
at compile time, so they are cached (cache=True).

Measured and not kept (50k/256^2 forward, 1 thread, in-process A/B; 29 ms as written): the forward
as one fused pass per tile row with explicit 8-wide LLVM vectors (too many live vectors and
constants for 16 ymm registers: 29-32 ms without the fix-up path, 44-46 ms with it); the checks of
the fix-up folded into the compositing loop (34 ms: the masks vectorised badly); workers compiled
without NRT reference counting (no change); skipping tile rows whose pixels have all stopped (15% of
the rows, no change). Without the fix-up's checks the forward takes 20 ms: exact decisions cost ~30%.
"""

from budget3d.splat.kernels.binning import depth_order
from budget3d.splat.kernels.common import TH, TW, copts, opts
from budget3d.splat.kernels.workers import (
    KERNELS, backward, bucket, cull_entries, forward, prepare, project_sh_bwd, project_sh_fwd, reduce_counts,
    reduce_grads, sort_params,
)

__all__ = [
    "KERNELS", "TH", "TW", "backward", "bucket", "copts", "cull_entries", "depth_order", "forward", "opts", "prepare",
    "project_sh_bwd", "project_sh_fwd", "reduce_counts", "reduce_grads", "sort_params",
]
