"""What the "cpu" rasterizer's kernels share: the compile options, the float32 constants of the
oracle's cut-offs, the LLVM-level helpers (``_sel``, ``_fma``, ``_radd``) and the polynomial exp.

Three LLVM-level helpers keep the loops vectorised without function-wide fast-math: ``_sel`` (a
select, where numba's branches became masked stores), ``_fma`` and ``_radd`` (an add marked
reassociable, for the backward's running sums).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from budget3d.splat import pool  # noqa: F401  (first: installs the kernels' cache stamp, see pool)

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

# njit options of every kernel (cached: no thread count is read at compile time)
opts = dict(cache=True, nogil=True, fastmath=False, error_model="numpy", boundscheck=False)
# cfunc options of the workers (see budget3d.splat.pool.kernel)
copts = dict(error_model="numpy", boundscheck=False, fastmath=False)


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


@njit(inline="always", **opts)
def _entry(ep, k):
    """Entry k's Gaussian: mean x, y, conic a, b, c, opacity (see bucket)."""
    return ep[k, 0], ep[k, 1], ep[k, 2], ep[k, 3], ep[k, 4], ep[k, 5]


@njit(inline="always", **opts)
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
