"""What every stage shares at run time, written once: the device and backend a run uses, the
Ctrl-C guard of the training loops, seeding, atomic file writes and PSNR.

Atomic writes go to a temporary name in the target's folder and are moved over the target with
``os.replace``, so a reader (or a run killed mid-write) sees the old file or the new one, never a
torn one; a failed write removes its temporary file. The temporary name is ``NAME.tmp``, or
``STEM.tmp.EXT`` where the writer picks its format from the extension (cv2, matplotlib, ONNX).

Nothing here imports torch at module level: ``budget3d --help`` and the viewer import this file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path
from typing import Iterator, Optional

from budget3d.errors import UserError

# ----------------------------------------------------------------------------- device and backend


def pick_device(name: str = "auto", backend: str = "auto"):
    """The torch device for ``--device name`` with ``--backend backend``.

    ``auto`` follows the backend: the ``cpu`` and ``torch`` backends mean the CPU (even where a
    GPU exists), ``cuda`` means the GPU, ``auto`` means the GPU when torch sees one, else the CPU.
    An explicit device that cannot work is a one-line ``UserError``."""
    import torch

    if name == "auto":
        if backend in ("cpu", "torch"):
            return torch.device("cpu")
        if backend == "cuda" and not torch.cuda.is_available():
            raise UserError("--backend cuda: no CUDA GPU is available to torch here; use --backend auto (or cpu)")
        if backend == "auto" and torch.cuda.is_available():
            why = cuda_kernels_missing()
            if why:  # a GPU without gsplat's kernels: auto means "what works here"
                import warnings

                warnings.warn(f"gsplat's CUDA kernels cannot be built or loaded ({why}); training on the CPU instead. "
                              f"Install the CUDA toolkit (nvcc) that matches torch's CUDA {torch.version.cuda} to use "
                              "the GPU", stacklevel=2)
                return torch.device("cpu")
            return torch.device("cuda")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available to torch here; use --device cpu (or auto)")
        if backend == "cpu":
            raise UserError(f"--device {name} --backend cpu: the cpu backend renders on the CPU; use --device cpu "
                            "(or auto), or --backend auto / cuda / torch on the GPU")
    return dev


def pick_backend(name: str, device) -> str:
    """The renderer for ``--backend name`` on ``device`` (``splat.render.resolve_backend``), as a
    one-line ``UserError`` when they do not fit; ``auto`` on the CPU falls back to the slow
    ``torch`` backend with a warning when the compiled CPU backend cannot be imported."""
    import warnings

    import torch

    from budget3d.splat.render import resolve_backend

    try:
        backend = resolve_backend(name, torch.device(device))
    except ValueError as e:
        raise UserError(f"--backend {name}: {e}") from None
    if backend == "cpu":
        try:
            import budget3d.splat.cpu  # noqa: F401
        except ImportError as e:
            if name == "cpu":
                raise UserError(f"--backend cpu: the compiled CPU backend is unavailable ({e}); use --backend torch") from None
            warnings.warn(f"compiled CPU backend unavailable ({e}); using the slow 'torch' backend", stacklevel=2)
            backend = "torch"
    if backend == "cuda":  # before any timed loop: the first use builds gsplat's kernels (minutes, once)
        why = cuda_kernels_missing()
        if why:
            raise UserError(f"--backend {name}: gsplat's CUDA kernels cannot be built or loaded ({why}); install the "
                            f"CUDA toolkit (nvcc) that matches torch's CUDA {torch.version.cuda}, or use --device cpu")
    return backend


def cuda_kernels_missing() -> Optional[str]:
    """None when gsplat's CUDA kernels load (importing ``gsplat.cuda._backend`` compiles them the
    first time on a machine), else why not. gsplat without its kernels has ``_C = None``, and its
    first render would die with an AttributeError.

    The processes of a machine (torchrun's ranks) take turns under one file lock: the first builds,
    the others load its build. Building at once, each would delete the others' lock in the shared
    build folder (gsplat removes a stale ``lock`` before building) and race on the same files."""
    import sys
    import tempfile

    if "gsplat.cuda._backend" not in sys.modules:
        print("loading gsplat's CUDA kernels (the first time on a machine builds them: a few minutes)",
              file=sys.stderr, flush=True)
    with open(Path(tempfile.gettempdir()) / "budget3d-gsplat-kernels.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except (ImportError, OSError):  # no fcntl (Windows) or a filesystem without locks: build unguarded
            pass
        try:
            from gsplat.cuda import _backend
        except Exception as e:  # noqa: BLE001  (a failed build raises whatever the compiler's wrapper raises)
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None if getattr(_backend, "_C", None) is not None else "gsplat's _C is None: no nvcc, or the build failed"


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- Ctrl-C


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step (so the checkpoint is
    consistent); a second one interrupts at once."""

    def __enter__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is moved
    over ``path`` (``os.replace``), otherwise removed. ``keep_suffix``: the temporary name keeps
    the extension (``STEM.tmp.EXT``) for writers that choose the format by it."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}" if keep_suffix else path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_default(o):
    """``json.dumps`` default: numpy scalars as Python numbers, anything else ``float()`` takes (a
    0-d tensor) as a float (NaN as null), the rest as str (a path)."""
    import numpy as np

    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating) or hasattr(o, "__float__"):
        v = float(o)
        return None if math.isnan(v) else v
    return str(o)


def write_json(path, obj, indent: int = 2, allow_nan: bool = True) -> None:
    """``obj`` as JSON (a trailing newline), atomically."""
    text = json.dumps(obj, indent=indent, default=json_default, allow_nan=allow_nan) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_torch(obj, path) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_png(path, image) -> None:
    """An (H, W, 3) RGB image as a PNG, atomically: uint8 as is, float (numpy or torch) in [0, 1]
    clamped and rounded."""
    import cv2
    import numpy as np

    if hasattr(image, "detach"):
        image = image.detach().clamp(0, 1).cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    with atomic_path(path, keep_suffix=True) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: cv2 could not write the image")


def save_figure(fig, path, **savefig_kwargs) -> None:
    """Save a matplotlib figure atomically (the format from ``path``'s extension) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path, keep_suffix=True) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- PSNR


def psnr_from_mse(mse: float, floor: Optional[float] = None) -> float:
    """-10 log10(mse) for images in [0, 1]: infinite for identical images unless ``floor`` bounds
    the MSE from below."""
    mse = float(mse) if floor is None else max(float(mse), floor)
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def psnr(a, b) -> float:
    """PSNR of two images, each clamped to [0, 1]: torch tensors in their own dtype, numpy arrays
    in float64."""
    if hasattr(a, "detach"):  # torch: no numpy round trip (and no torch import for numpy callers)
        return psnr_from_mse(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    import numpy as np

    return psnr_from_mse(np.mean((np.clip(a, 0, 1).astype(np.float64) - np.clip(b, 0, 1)) ** 2))


__all__ = ["StopOnCtrlC", "atomic_path", "json_default", "pick_backend", "pick_device", "psnr", "psnr_from_mse",
           "save_figure", "save_torch", "seed_everything", "write_bytes", "write_json", "write_png"]
