"""PlayCanvas / SuperSplat packed ``compressed.ply``: 16 bytes a Gaussian plus 72 per 256.

Layout (as PlayCanvas' engine reads it and ``splat-transform`` writes it; our axes are the .ply's,
no change of axes):

- element ``chunk``, one per 256 Gaussians: float min/max of x, y, z, of the log-scales
  (``min_scale_x`` ..., clamped to [-20, 20]) and of the colour ``0.5 + C0 * f_dc`` (``min_r`` ...;
  files from before those existed have no colour bounds and store the colour in [0, 1]);
- element ``vertex``: four uint32 — ``packed_position`` and ``packed_scale`` (11-10-11 bits, x in
  the high bits: unorm fractions of the chunk's range), ``packed_rotation`` (2 bits: index of the
  largest |component| of (rot_0..rot_3) = wxyz, made positive; then the other three in index order
  as 10-bit unorm of ``v / sqrt(2) + 0.5``), ``packed_color`` (8-8-8-8: colour fractions of the
  chunk's range, alpha = sigmoid(opacity));
- optional element ``sh``: ``f_rest_*`` (the Inria .ply's channel-major order) as uchar,
  ``floor((v / 8 + 0.5) * 256)`` clipped to 0..255, read back as the bin's centre
  ``((b + 0.5) / 256 - 0.5) * 8`` except 0 and 255, which map to -4 and 4.

unorm(t, bits) = floor(t * (2^bits - 1) + 0.5). The writer sorts the Gaussians in Morton order (as
PlayCanvas does) so that each chunk's bounds are tight, and fills the last chunk's bounds from its
real Gaussians only.

Quantisation error (the bound the tests check), per Gaussian in chunk c: position and log-scale
within half a step of the chunk's range over 2047 (x, z) or 1023 (y); colour within half of the
chunk's colour range / 255; alpha within 0.5/255; each stored quaternion component within
0.5/1023 * sqrt(2); higher SH within 1/64 inside [-4, 4) (clipped outside).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.export.splat_arrays import C0, logit, morton_order, sigmoid, to_numpy, to_params, unit_quats
from budget3d.runtime import write_bytes

CHUNK = 256
CHUNK_PROPS = ("min_x", "min_y", "min_z", "max_x", "max_y", "max_z",
               "min_scale_x", "min_scale_y", "min_scale_z", "max_scale_x", "max_scale_y", "max_scale_z",
               "min_r", "min_g", "min_b", "max_r", "max_g", "max_b")
VERTEX_PROPS = ("packed_position", "packed_rotation", "packed_scale", "packed_color")


def _unorm_pack(t: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.clip(np.floor(t * top + 0.5), 0, top).astype(np.uint32)


def _fractions(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(nc, 256, 3) values as fractions of their chunk's (nc, 1, 3) range; a flat range gives 0."""
    span = hi - lo
    return np.where(span < 1e-5, 0.0, np.clip((v - lo) / np.where(span < 1e-5, 1.0, span), 0.0, 1.0))


def _pack_11_10_11(t: np.ndarray) -> np.ndarray:
    return (_unorm_pack(t[..., 0], 11) << 21) | (_unorm_pack(t[..., 1], 10) << 11) | _unorm_pack(t[..., 2], 11)


def encode(params, sort: bool = True) -> tuple[bytes, np.ndarray]:
    """The file's bytes and the order the Gaussians were written in (indices into ``params``)."""
    p = to_numpy(params)
    n = len(p["means"])
    if n == 0:
        raise UserError("no Gaussians to write")
    order = morton_order(p["means"]) if sort else np.arange(n)
    nc = -(-n // CHUNK)
    pad = np.concatenate([order, np.full(nc * CHUNK - n, order[-1])])  # repeat the last, as PlayCanvas does
    real = (np.arange(nc * CHUNK) < n).reshape(nc, CHUNK, 1)

    def chunked(a):
        return a[pad].astype(np.float64).reshape(nc, CHUNK, -1)

    def bounds(v):
        lo = np.where(real, v, np.inf).min(1, keepdims=True)
        hi = np.where(real, v, -np.inf).max(1, keepdims=True)
        return lo, hi

    pos = chunked(p["means"])
    sca = chunked(p["scales"])
    col = 0.5 + C0 * chunked(p["sh0"])
    plo, phi = bounds(pos)
    slo, shi = (np.clip(b, -20, 20) for b in bounds(sca))
    clo, chi = bounds(col)
    alpha = sigmoid(p["opacities"])[pad].astype(np.float64).reshape(nc, CHUNK)
    cf = _fractions(col, clo, chi)
    packed_color = ((_unorm_pack(cf[..., 0], 8) << 24) | (_unorm_pack(cf[..., 1], 8) << 16)
                    | (_unorm_pack(cf[..., 2], 8) << 8) | _unorm_pack(alpha, 8))

    q = unit_quats(p["quats"])[pad].astype(np.float64)
    big = np.argmax(np.abs(q), 1)
    q = q * np.where(q[np.arange(len(q)), big] < 0, -1.0, 1.0)[:, None]
    rot = big.astype(np.uint32)
    for i in range(4):
        rot = np.where(big == i, rot, (rot << 10) | _unorm_pack(q[:, i] * math.sqrt(0.5) + 0.5, 10))

    vert = np.zeros((nc * CHUNK, 4), "<u4")
    vert[:, 0] = _pack_11_10_11(_fractions(pos, plo, phi)).reshape(-1)
    vert[:, 1] = rot
    vert[:, 2] = _pack_11_10_11(_fractions(sca, slo, shi)).reshape(-1)
    vert[:, 3] = packed_color.reshape(-1)
    chunk = np.concatenate([plo, phi, slo, shi, clo, chi], -1).reshape(nc, 18).astype("<f4")

    k = p["shN"].shape[1]
    header = ["ply", "format binary_little_endian 1.0", "comment Generated by budget3d",
              f"element chunk {nc}", *[f"property float {c}" for c in CHUNK_PROPS],
              f"element vertex {n}", *[f"property uint {v}" for v in VERTEX_PROPS]]
    body = [chunk.tobytes(), vert[:n].tobytes()]
    if k:
        header += [f"element sh {n}", *[f"property uchar f_rest_{i}" for i in range(3 * k)]]
        rest = p["shN"][order].transpose(0, 2, 1).reshape(n, 3 * k).astype(np.float64)
        body.append(np.clip(np.floor((rest / 8 + 0.5) * 256), 0, 255).astype(np.uint8).tobytes())
    return ("\n".join(header + ["end_header"]) + "\n").encode() + b"".join(body), order


def save_compressed_ply(params, path, sort: bool = True) -> int:
    """Write a PlayCanvas ``compressed.ply`` (Morton order unless ``sort=False``). Returns the count."""
    data, order = encode(params, sort)
    write_bytes(path, data)
    return len(order)


def _unorm(v: np.ndarray, shift: int, bits: int) -> np.ndarray:
    return ((v >> shift) & ((1 << bits) - 1)).astype(np.float32) / ((1 << bits) - 1)


def _lerp(lo, hi, t):
    return lo + (hi - lo) * t


def load_compressed_ply(path) -> dict[str, torch.Tensor]:
    """Read a PlayCanvas / SuperSplat packed ``compressed.ply`` (see the module notes)."""
    from plyfile import PlyData

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a splat file (.ply, .splat or .spz)")
    try:
        ply = PlyData.read(str(path))
        chunk, vert = ply["chunk"].data, ply["vertex"].data
    except KeyError as e:
        raise UserError(f"{path}: no {e} element; this is not a PlayCanvas compressed.ply") from None
    except Exception as e:  # plyfile raises many types for bad files
        msg = " ".join(str(e).split())[:160]
        raise UserError(f"{path}: not a readable .ply ({msg}); the file is damaged or truncated, "
                        "export it again") from None
    need = ("packed_position", "packed_rotation", "packed_scale", "packed_color")
    if any(k not in vert.dtype.names for k in need):
        raise UserError(f"{path}: the vertex element lacks {list(need)}; this is not a PlayCanvas compressed.ply")
    n = len(vert)
    if len(chunk) * CHUNK < n:
        raise UserError(f"{path}: {len(chunk)} chunks cannot hold {n} splats (256 each); the file is damaged")
    ci = np.arange(n) // CHUNK
    c = lambda name: np.asarray(chunk[name], np.float32)[ci]  # noqa: E731
    pp = np.asarray(vert["packed_position"], np.uint32)
    means = np.stack([_lerp(c("min_x"), c("max_x"), _unorm(pp, 21, 11)),
                      _lerp(c("min_y"), c("max_y"), _unorm(pp, 11, 10)),
                      _lerp(c("min_z"), c("max_z"), _unorm(pp, 0, 11))], 1)
    ps = np.asarray(vert["packed_scale"], np.uint32)
    scales = np.stack([_lerp(c("min_scale_x"), c("max_scale_x"), _unorm(ps, 21, 11)),
                       _lerp(c("min_scale_y"), c("max_scale_y"), _unorm(ps, 11, 10)),
                       _lerp(c("min_scale_z"), c("max_scale_z"), _unorm(ps, 0, 11))], 1)
    pr = np.asarray(vert["packed_rotation"], np.uint32)
    norm = 1.0 / (math.sqrt(2) * 0.5)
    abc = np.stack([(_unorm(pr, s, 10) - 0.5) * norm for s in (20, 10, 0)], 1)
    m = np.sqrt(np.maximum(0.0, 1.0 - (abc * abc).sum(1)))
    big = (pr >> 30).astype(np.int64)
    quats = np.zeros((n, 4), np.float32)
    for b in range(4):
        sel = big == b
        others = [i for i in range(4) if i != b]
        quats[np.ix_(sel, others)] = abc[sel]
        quats[sel, b] = m[sel]
    pc = np.asarray(vert["packed_color"], np.uint32)
    rgb = np.stack([_unorm(pc, s, 8) for s in (24, 16, 8)], 1)
    if "min_r" in chunk.dtype.names:
        rgb = np.stack([_lerp(c(f"min_{ch}"), c(f"max_{ch}"), rgb[:, i]) for i, ch in enumerate("rgb")], 1)
    alpha = _unorm(pc, 0, 8)
    shN = None
    if "sh" in ply:
        sh = ply["sh"].data
        rest = sorted((k for k in sh.dtype.names if k.startswith("f_rest_")), key=lambda k: int(k[7:]))
        if rest and len(sh) == n:
            if len(rest) % 3 or len(rest) // 3 not in (3, 8, 15):
                raise UserError(f"{path}: {len(rest)} f_rest properties is not a whole SH degree; the file is damaged")
            v = np.stack([np.asarray(sh[k], np.float32) for k in rest], 1)
            t = np.where(v == 0, 0.0, np.where(v == 255, 1.0, (v + 0.5) / 256))
            kk = len(rest) // 3
            shN = ((t - 0.5) * 8).astype(np.float32).reshape(n, 3, kk).transpose(0, 2, 1)  # channel-major like Inria
    return to_params(means, scales, unit_quats(quats), logit(alpha), (rgb - 0.5) / C0, shN)
