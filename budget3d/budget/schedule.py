"""The Gaussian budget: parse what the user asked for, and the Taming 3DGS growth schedule.

A budget is one exact Gaussian count. Users may say it three ways (``parse_budget``):
a count, a multiple of the initial points, or the size of the ``.ply`` they want to ship.
"""

from __future__ import annotations

import math
import re

from budget3d.errors import UserError

FORMS = ('a count ("200000", "200k", "1.5M"), a multiple of the initial points ("15x"), '
         'or a .ply size ("30MB", "500KB", "1.5GB" = powers of 10; "30MiB", "500KiB" = powers of 2)')

_UNITS = {  # bytes per unit; lower-cased keys
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6}


def _ply_properties(sh_degree: int) -> list[str]:
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def ply_bytes_per_gaussian(sh_degree: int) -> int:
    """4 bytes x (3 xyz + 3 normals + 3 f_dc + 3((d+1)^2-1) f_rest + 1 opacity + 3 scale + 4 rot)."""
    return 4 * len(_ply_properties(sh_degree))


def ply_header_bytes(n: int, sh_degree: int) -> int:
    """Exact header length of the binary .ply ``budget3d.splat.save_ply`` writes for ``n`` Gaussians."""
    head = f"ply\nformat binary_little_endian 1.0\nelement vertex {n}\n"
    head += "".join(f"property float {p}\n" for p in _ply_properties(sh_degree))
    return len((head + "end_header\n").encode())


def ply_size(n: int, sh_degree: int) -> int:
    """Exact size in bytes of the Inria-layout .ply for ``n`` Gaussians at SH degree ``sh_degree``."""
    return ply_header_bytes(n, sh_degree) + n * ply_bytes_per_gaussian(sh_degree)


def max_gaussians_for_size(size_bytes: int, sh_degree: int) -> int:
    """The largest count whose .ply fits in ``size_bytes`` (0 when not even one fits)."""
    per = ply_bytes_per_gaussian(sh_degree)
    n = max(0, (size_bytes - ply_header_bytes(1, sh_degree)) // per)
    # The header grows by one byte per decimal digit of n: step down until it fits.
    while n > 0 and ply_size(n, sh_degree) > size_bytes:
        n -= 1
    return n


def _bad(spec, why: str = "") -> UserError:
    why = f" ({why})" if why else ""
    return UserError(f"bad budget {spec!r}{why}; give {FORMS}")


def parse_budget(spec, n_init: int, sh_degree: int) -> int:
    """Turn a budget spec into an exact Gaussian count (> 0).

    - a count: ``200000``, ``"200000"``, ``"200k"`` (k = 1e3), ``"1.5M"`` (M = 1e6, no "B");
    - a multiple of the ``n_init`` initial points: ``"15x"``;
    - a size of the Inria .ply written at SH degree ``sh_degree``: ``"30MB"``, ``"500KB"``,
      ``"1.5GB"`` (decimal: KB = 1e3, MB = 1e6, GB = 1e9 bytes), ``"30MiB"``, ``"500KiB"``,
      ``"1GiB"`` (binary: 2^10, 2^20, 2^30), or ``"123456B"``; the result is the largest count
      whose file (header included, exactly) is at most that size.
    Units are case-insensitive. Anything else, or a budget <= 0, raises ``UserError``.
    """
    if isinstance(spec, bool):
        raise _bad(spec)
    if isinstance(spec, int):
        n = spec
    elif isinstance(spec, float):
        if not math.isfinite(spec) or spec != int(spec):
            raise _bad(spec, "a count must be a whole number")
        n = int(spec)
    elif isinstance(spec, str):
        n = _parse_str(spec.strip().replace("_", ""), n_init, sh_degree, spec)
    else:
        raise _bad(spec)
    if n <= 0:
        raise _bad(spec, f"it gives {n} Gaussians; the budget must be at least 1")
    return n


def _parse_str(s: str, n_init: int, sh_degree: int, spec) -> int:
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)", s)
    if not m:
        raise _bad(spec)
    value, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(value):
        raise _bad(spec)
    if unit == "x":
        if n_init <= 0:
            raise _bad(spec, "a multiple needs initial points, and there are none")
        return int(round(value * n_init))
    if unit in _COUNT_SUFFIX:
        n = value * _COUNT_SUFFIX[unit]
        if abs(n - round(n)) > 1e-6:
            raise _bad(spec, "a count must be a whole number")
        return int(round(n))
    if unit in _UNITS:
        size = int(math.floor(value * _UNITS[unit] + 1e-6))
        n = max_gaussians_for_size(size, sh_degree)
        if n <= 0:
            raise _bad(spec, f"{size} bytes is smaller than a 1-Gaussian .ply ({ply_size(1, sh_degree)} bytes)")
        return n
    raise _bad(spec, f"unknown unit {m.group(2)!r}")


def budget_schedule(n_init: int, budget: int, n_steps: int) -> list[int]:
    """Target count after densification step i = 1..n_steps (Taming 3DGS):
    ``S + (B - S) * (1 - (1 - i/N)^2)``, rounded; big steps first, the last exactly B.
    Works for B < S too (then it shrinks, fast first)."""
    if n_steps <= 0:
        return []
    S, B, N = int(n_init), int(budget), int(n_steps)
    out = [int(round(S + (B - S) * (1.0 - (1.0 - i / N) ** 2))) for i in range(1, N + 1)]
    out[-1] = B
    return out
