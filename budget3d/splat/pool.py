"""Parallel kernels on torch's own OpenMP threads.

torch's CPU ops run on an OpenMP (libgomp) team whose workers spin for milliseconds after every
parallel op. numba's threads (any of its layers: its OpenMP layer loads a second libgomp) then
share the cores with those spinners, and on the 2-vCPU machines the kernels ran 10-40% slower after
a torch op. So the kernels are numba ``cfunc`` workers started with libgomp's ``GOMP_parallel``
from torch's own library: the team that runs torch's ops runs ours, one pool, no contention.
Without that library (a torch built with another threading runtime) the workers run on Python
threads (ctypes releases the GIL), still without a second compiled copy.

A worker is a ``void(void*)`` function; its argument points at an int64 buffer: HDR header words
(the buffer's length, a part counter, the thread count, a work counter) then 4 words per
argument (arrays: data pointer and up to 3 dims, C-contiguous; ints; floats as float64 bits). The
worker reads its arguments with the typed getters below (``f32_2(d, k)``: argument k as a 2-D float32
array, ...) and takes its shares of a range with ``for lo, hi in spans(d, N)`` (or items with ``next_work(d)``).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import importlib
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

HDR = 4

# numba's cache (cache=True) checks only the source file of the function it caches, but a worker
# inlines kernels and helpers from other files (budget3d/splat/kernels/*.py, this one): an edit
# there would leave a stale worker in the cache. So the workers (``Kernel.compiled``, wherever they
# are defined) and the njit functions of those files are cached under a stamp that also covers those
# files: an edit to any of them recompiles every kernel once. (kernels/common.py imports this module
# first, so every kernel file is decorated after the stamp is installed; other njit functions keep
# numba's own stamp.)
_HERE = os.path.abspath(__file__)
_KERNEL_SOURCES = tuple(sorted(glob.glob(os.path.join(os.path.dirname(_HERE), "kernels", "*.py")))) + (_HERE,)
_COMPILING = threading.local()  # .worker: True while Kernel.compiled compiles (see _install_cache_stamp)


@functools.lru_cache(maxsize=None)
def _file_hash(path, mtime_ns, size):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def kernel_sources_stamp() -> tuple:
    """Content hashes of the kernels' shared source files (see above)."""
    out = []
    for p in _KERNEL_SOURCES:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
            continue
        out.append(_file_hash(p, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _install_cache_stamp():
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or any(getattr(c, "_budget3d", False) for c in impl._locator_classes):
        return

    class _Stamped:
        _budget3d = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if not (getattr(_COMPILING, "worker", False) or os.path.abspath(py_file) in _KERNEL_SOURCES):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return super().get_source_stamp(), kernel_sources_stamp()

    bases = [getattr(caching, n, None) for n in ("UserProvidedCacheLocator", "InTreeCacheLocator",
                                                  "UserWideCacheLocator")]
    impl._locator_classes[:0] = [type("Stamped" + b.__name__, (_Stamped, b), {}) for b in bases if b is not None]


_install_cache_stamp()


@intrinsic
def _ptr(typingctx, x):
    """int64 -> void* (an address from the argument buffer)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return sig, codegen


@intrinsic
def _as_f64(typingctx, x):
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@intrinsic
def atomic_next(typingctx, arr, idx):
    """Atomically arr[idx] += 1 (int64 array); returns the old value."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(idx, types.Integer)):
        return None
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [i])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return sig, codegen


_i = dict(inline="always", cache=True, nogil=True, boundscheck=False)


@njit(**_i)
def words(data):
    n = carray(data, (1,), np.int64)[0]
    return carray(data, (n,), np.int64)


@njit(**_i)
def part(d):
    """The next unclaimed part in 0, 1, 2, ... (see spans)."""
    return atomic_next(d, 1)


@njit(**_i)
def nth(d):
    return d[2]


@njit(**_i)
def next_work(d):
    """The next item of a shared work counter (0, 1, 2, ... across the threads)."""
    return atomic_next(d, 3)


@njit(nogil=True, boundscheck=False)  # (not cached: numba cannot load a generator from its cache)
def spans(d, N):
    """The worker's shares [lo, hi) of range(N): ``for lo, hi in spans(d, N)``. range(N) is cut in
    nth(d) contiguous parts (numba's static prange split); parts are claimed from a counter, so a
    smaller team than asked (e.g. under OMP_THREAD_LIMIT) still does all of them."""
    while True:
        p = part(d)
        if p >= nth(d):
            return
        yield span(p, nth(d), N)


@njit(**_i)
def span(t, n, N):
    """Thread t of n's contiguous share [lo, hi) of range(N) (numba's static prange split)."""
    size = (N + n - 1) // n
    lo = min(N, t * size)
    return lo, min(N, lo + size)


@njit(**_i)
def i64(d, k):
    return d[HDR + 4 * k]


@njit(**_i)
def f64(d, k):
    return _as_f64(d[HDR + 4 * k])


@njit(**_i)
def f32(d, k):
    return np.float32(_as_f64(d[HDR + 4 * k]))


@njit(**_i)
def f32_1(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1],), np.float32)


@njit(**_i)
def f32_2(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1], d[j + 2]), np.float32)


@njit(**_i)
def f32_3(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1], d[j + 2], d[j + 3]), np.float32)


@njit(**_i)
def f64_1(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1],), np.float64)


@njit(**_i)
def f64_2(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1], d[j + 2]), np.float64)


@njit(**_i)
def i32_1(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1],), np.int32)


@njit(**_i)
def i32_2(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1], d[j + 2]), np.int32)


@njit(**_i)
def i64_1(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1],), np.int64)


@njit(**_i)
def i64_2(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1], d[j + 2]), np.int64)


@njit(**_i)
def b1(d, k):
    j = HDR + 4 * k
    return carray(_ptr(d[j]), (d[j + 1],), np.bool_)


class Kernel:
    """A worker compiled on first use (numba cfunc, cached on disk like the njit kernels)."""

    def __init__(self, fn, opts):
        self.fn, self.opts, self._c = fn, opts, None

    @property
    def compiled(self):
        if self._c is None:
            _COMPILING.worker = True  # cached under the kernels' sources' stamp (see _install_cache_stamp)
            try:
                self._c = cfunc(types.void(types.voidptr), cache=True, **self.opts)(self.fn)
            finally:
                _COMPILING.worker = False
        return self._c


def kernel(**opts):
    """Decorator: a worker ``fn(data)`` (see the module docstring) run by ``run``."""
    return lambda fn: Kernel(fn, opts)


def compile_all(kernels, jobs=None, on_cold=None) -> int:
    """Compile (or load from numba's cache) ``kernels``, listed heaviest first, on up to ``jobs``
    processes (default: the usable cores, at most 4). numba compiles one function at a time per
    process (~40 s for all the kernels on one core of the 2-vCPU machines), so when the cache is cold
    helper processes take kernels too: each process claims the next unclaimed kernel of the list (a
    file created with O_EXCL) and compiles it into numba's cache; this process then loads the
    helpers' kernels from the cache (or compiles them itself if a helper failed). The last kernel is
    the probe: loaded in a few ms when the cache is warm, and then no helper starts. ``on_cold()`` is
    called once before compiling starts. Returns the number of kernels the helpers compiled."""
    todo = [k for k in kernels if k._c is None]
    if not todo:
        return 0
    _addr(np.zeros(1))  # numba's one-time set-up (~0.3 s), so the probe below times the kernel alone
    t = time.perf_counter()
    todo[-1].compiled
    if time.perf_counter() - t < 0.15 or len(todo) == 1:  # a warm cache
        for k in todo:
            k.compiled
        return 0
    if on_cold is not None:
        on_cold()
    todo = todo[:-1]
    jobs = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) \
        if jobs is None else jobs
    n = 0
    try:
        with tempfile.TemporaryDirectory(prefix="budget3d-compile-") as d:
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                       OMP_NUM_THREADS="1")
            names = [f"{k.fn.__module__}:{k.fn.__name__}" for k in todo]
            code = "import sys; from budget3d.splat import pool; pool._compile_claimed(sys.argv[1], sys.argv[2:])"
            helpers = [subprocess.Popen([sys.executable, "-c", code, d, *names], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL) for _ in range(max(0, min(jobs, len(todo)) - 1))]
            _compile_claimed(d, todo)
            for h in helpers:
                h.wait()
            n = sum(os.path.exists(os.path.join(d, f"{i}.done")) and k._c is None for i, k in enumerate(todo))
    except OSError:  # no temporary folder or no subprocess here: compile in this process
        pass
    for k in todo:
        k.compiled
    return n


def _compile_claimed(d, kernels):
    """Compile each kernel of the list (Kernel objects or "module:name") that no other process has
    claimed in folder d; marks it done there."""
    for i, k in enumerate(kernels):
        try:
            os.close(os.open(os.path.join(d, f"{i}.claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        if isinstance(k, str):
            mod, name = k.split(":")
            k = getattr(importlib.import_module(mod), name)
        k.compiled
        open(os.path.join(d, f"{i}.done"), "w").close()


def _find_gomp():
    """GOMP_parallel of the libgomp that torch loaded (None if there is none)."""
    import torch

    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    for path in libs:
        try:
            f = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        f.restype = None
        return f
    return None


_GOMP = _find_gomp()
_POOL: ThreadPoolExecutor | None = None


def _after_fork_in_child():
    """libgomp is not fork-safe: a forked child that starts a team the parent had used hangs (torch's
    own ops too). The child's kernels run on fresh Python threads instead."""
    global _GOMP, _POOL
    _GOMP, _POOL = None, None


os.register_at_fork(after_in_child=_after_fork_in_child)


@njit(cache=True)
def _addr(a):
    return a.ctypes.data  # (0.3 us through numba's dispatcher; ndarray.ctypes.data takes 1.5 us)


_ZW = (0, 0, 0, 0)
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")


def pack(args) -> np.ndarray:
    words = [HDR + 4 * len(args), 0, 0, 0]
    for k, a in enumerate(args):
        if type(a) is np.ndarray:
            if a.ndim > 3 or not a.flags.c_contiguous:
                raise ValueError(f"kernel argument {k}: needs a C-contiguous array of at most 3 dims, got {a.shape}")
            words.append(_addr(a))
            words += a.shape
            words += _ZW[a.ndim + 1:]
        elif isinstance(a, (bool, int, np.integer, np.bool_)):
            words += (int(a), 0, 0, 0)
        else:
            words += (_I64.unpack(_F64.pack(float(a)))[0], 0, 0, 0)
    return np.array(words, dtype=np.int64)


def run(kern: Kernel, nthreads: int, *args):
    """Run ``kern`` on ``nthreads`` threads (torch's OpenMP team; Python threads without it) over
    ``args`` (kept alive by the caller for the call's duration)."""
    global _POOL
    c = kern.compiled
    d = pack(args)
    n = max(1, int(nthreads))
    d[2] = n
    ptr = d.ctypes.data
    if n == 1:
        c.ctypes(ptr)
    elif _GOMP is not None:
        _GOMP(c.address, ptr, n, 0)
    else:
        if _POOL is None or _POOL._max_workers < n - 1:
            _POOL = ThreadPoolExecutor(max_workers=n - 1)
        futs = [_POOL.submit(c.ctypes, ptr) for _ in range(n - 1)]
        c.ctypes(ptr)
        for f in futs:
            f.result()
    return d
