"""Splat files other viewers open, and the ones other tools write.

Every reader returns the params dict the renderer takes (gsplat's names, torch float32):
means (N,3), scales (N,3) log, quats (N,4) wxyz, opacities (N,) logit, sh0 (N,1,3), shN (N,K,3).
Our params use the axes of the Inria ``.ply`` (OpenCV's right-down-forward, "RDF"), as do
``.splat``, ``compressed.ply`` and SOG. SPZ stores right-up-back ("RUB", OpenGL/three.js): the SPZ
reader and writer convert (y, z negated; quaternion y, z negated; SH coefficients odd in y or z
negated), as Niantic's library does when told the data is RDF, and as whoever wrote
``shared/data/splats/biker.spz`` did (it matches ``biker.compressed.ply`` only after this flip).
PlayCanvas' ``splat-transform`` (3.7) does *not* convert: it reads and writes SPZ axes as they are,
so its .ply of an SPZ is ours with y and z negated. ``convert=False`` does the same here.

Formats
-------
``.ply`` (Inria layout)
    ``budget3d.splat.save_ply`` / ``load_ply``: float32, every SH coefficient, lossless.
``.splat`` (antimatter15's WebGL viewer, also read by SuperSplat, Spark, gsplat.js, ...)
    32 bytes per Gaussian, no header: position 3 x float32, linear scale 3 x float32 (exp of the
    log-scale), RGBA 4 x uint8 (RGB = 0.5 + C0 * SH DC, A = sigmoid(opacity), both x255 and
    clipped), rotation 4 x uint8 (normalised wxyz quaternion, q*128+128 clipped). Gaussians are
    written in the order the reference converter uses: exp(sum of log-scales) * opacity,
    descending. Degree-0 only: view-dependent colour is dropped.
``.spz`` (Niantic)
    Header (little-endian) magic 0x5053474e "NGSP", version, numPoints, shDegree,
    fractionalBits, flags; then per attribute, all Gaussians at a time: positions 3 x 24-bit
    signed fixed point (``fractionalBits`` fraction bits), alphas uint8 (sigmoid x255), colours
    3 x uint8 (SH DC x 0.15 + 0.5, x255), scales 3 x uint8 ((log-scale + 10) x 16), rotations,
    SH rest (coefficient-major, channel fastest; (x*128)+128 as uint8, degree 1 kept to 5 bits
    and higher degrees to 4 bits like Niantic's encoder). Quaternions are stored x, y, z, w.
    - v2: gzip around a 16-byte header + data; rotations 3 x uint8 (xyz of the w >= 0
      quaternion, (v+1)*127.5).
    - v3: as v2 but rotations "smallest three" in a uint32: index of the largest |component|
      in bits 30-31, then three 10-bit fields (9-bit magnitude scaled by 1/sqrt(2), 1 sign bit),
      the lowest field holding the last of the other components.
    - v4 (what ``shared/data/splats/biker.spz`` is, and newer Niantic tools write): *not*
      gzipped. A 32-byte header (v3's 16 bytes where byte 15 is numStreams, then u32
      tocByteOffset and 12 reserved bytes; flag 0x2 = extension records between the header and
      the TOC), a table of contents of numStreams x (u64 compressed size, u64 uncompressed size)
      and then each attribute stream (positions, alphas, colours, scales, rotations [, SH])
      compressed as its own zstd frame. The attribute encodings are v3's. Needs ``zstandard``.
    We write v3 by default (gzip, the most widely read); ``version=2`` and ``version=4`` too.
``compressed.ply`` (PlayCanvas / SuperSplat), SOG (PlayCanvas), glTF ``KHR_gaussian_splatting``
    In their own modules, which say what each stores and what it loses: ``compressed_ply``,
    ``sog``, ``gltf`` (the one that changes axes: glTF is +Y up). ``sniff`` / ``load_any`` /
    ``save_any`` here take every format; ``FILES`` names what ``budget3d export`` writes.

``reprune(params, n, scores)`` keeps the ``n`` Gaussians a weaker device can afford: by
``run_scores`` (the Taming score of training, computed on a few of the run's training views) when
the run's scene is at hand, else by ``orbit_scores`` (the same score over views orbiting the
splats' centre, the full model's own renders as targets). No fine-tune follows: the kept
Gaussians are unchanged. Measured (PSNR against the full model, 4 held-out orbit views at
256x256, SH degree 0), keeping a third / an eighth: biker (152,746) at 50,406: orbit Taming score
35.3-36.9 dB, random choice 30.6-32.0, opacity x area 27.3-28.7; at 19,856: 29.6-30.5, 26.7-27.9,
24.7-26.1. guitar (90,854) at 29,981: 33.1-59.4, 31.3-35.9, 25.1-40.4; at 11,811: 26.2-46.6,
26.4-31.3, 22.8-34.8. The view-free ``importance`` is cheap but worse than chance: not the default.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.export.compressed_ply import load_compressed_ply, save_compressed_ply
from budget3d.export.gltf import load_glb, save_glb
from budget3d.export.sog import is_sog_folder, load_sog, save_sog
from budget3d.export.splat_arrays import (C0, flip_axes, logit, read_bytes, sh_degree_of, sigmoid, to_numpy,
                                          to_params, u8, unit_quats)
from budget3d.runtime import write_bytes

SPZ_MAGIC = 0x5053474E
SPZ_COLOR_SCALE = 0.15
SPLAT_BYTES = 32
# every splat format we write, by its --format name, and the file name `budget3d export` gives it
FILES = {"ply": "gaussians.ply", "splat": "gaussians.splat", "spz": "gaussians.spz", "sog": "gaussians.sog",
         "glb": "gaussians.glb", "compressed-ply": "gaussians.compressed.ply"}
FORMATS = tuple(FILES)


# ----------------------------------------------------------------------------- .splat


def save_splat(params, path) -> int:
    """antimatter15 ``.splat`` (32 bytes per Gaussian, sorted as the reference converter does).
    Returns the number of Gaussians written."""
    p = to_numpy(params)
    n = len(p["means"])
    order = np.argsort(-(p["scales"].astype(np.float64).sum(1) + np.log(sigmoid(p["opacities"]) + 1e-30)),
                       kind="stable")
    rec = np.zeros(n, dtype=[("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
    rec["pos"] = p["means"][order]
    rec["scale"] = np.exp(p["scales"][order])
    rgb = 0.5 + C0 * p["sh0"][order]
    rec["rgba"][:, :3] = u8(rgb * 255)
    rec["rgba"][:, 3] = u8(sigmoid(p["opacities"][order]) * 255)
    rec["rot"] = u8(unit_quats(p["quats"][order]) * 128 + 128)
    write_bytes(path, rec.tobytes())
    return n


def load_splat(path) -> dict[str, torch.Tensor]:
    """Read an antimatter15 ``.splat`` (SH degree 0)."""
    data = read_bytes(path)
    if len(data) % SPLAT_BYTES or not data:
        raise UserError(f"{path}: {len(data)} bytes is not a whole number of 32-byte .splat records; "
                        "give a .splat file written by a splat converter")
    rec = np.frombuffer(data, dtype=[("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
    rgba = rec["rgba"].astype(np.float32) / 255
    q = (rec["rot"].astype(np.float32) - 128) / 128
    return to_params(rec["pos"], np.log(np.maximum(rec["scale"], 1e-30)), unit_quats(q), logit(rgba[:, 3]),
                   (rgba[:, :3] - 0.5) / C0)


# ----------------------------------------------------------------------------- .spz


def _pack_smallest_three(q_xyzw: np.ndarray) -> np.ndarray:
    """(N,4) unit xyzw -> (N,) uint32, Niantic's v3 encoding."""
    q = q_xyzw.astype(np.float64)
    big = np.argmax(np.abs(q), axis=1)
    q = q * np.where(q[np.arange(len(q)), big] < 0, -1.0, 1.0)[:, None]
    comp = big.astype(np.uint32)
    mask = (1 << 9) - 1
    for i in range(4):  # fields in increasing index, the last ending in the lowest bits
        v = q[:, i]
        mag = np.clip(np.rint(mask * np.abs(v) / math.sqrt(0.5)), 0, mask).astype(np.uint32)
        field = mag | ((v < 0).astype(np.uint32) << 9)
        comp = np.where(big == i, comp, (comp << 10) | field)
    return comp.astype("<u4")


def _unpack_smallest_three(comp: np.ndarray) -> np.ndarray:
    comp = comp.astype(np.uint32).copy()
    mask = (1 << 9) - 1
    big = comp >> 30
    q = np.zeros((len(comp), 4), np.float64)
    for i in range(3, -1, -1):
        mag = (comp & mask).astype(np.float64)
        neg = (comp >> 9) & 1
        v = math.sqrt(0.5) * mag / mask * np.where(neg == 1, -1.0, 1.0)
        take = big != i
        q[:, i] = np.where(take, v, 0.0)
        comp = np.where(take, comp >> 10, comp)
    rest = np.sqrt(np.maximum(0.0, 1.0 - (q * q).sum(1)))
    q[np.arange(len(q)), big] = rest
    return q.astype(np.float32)


def _rdf_rub(means: np.ndarray, quats_wxyz: np.ndarray, shN: Optional[np.ndarray]):
    """RDF <-> RUB (its own inverse): a half turn about x."""
    return flip_axes(means, quats_wxyz, shN, (1, -1, -1))


def _spz_streams(p: dict, version: int, fractional_bits: int, convert: bool = True) -> list[bytes]:
    n = len(p["means"])
    p = dict(p)
    if convert:
        p["means"], p["quats"], p["shN"] = _rdf_rub(p["means"], p["quats"], p["shN"])
    fixed = np.rint(p["means"].astype(np.float64) * (1 << fractional_bits)).astype(np.int64)
    fixed = np.clip(fixed, -(1 << 23), (1 << 23) - 1) & 0xFFFFFF
    pos = np.stack([(fixed >> s) & 0xFF for s in (0, 8, 16)], -1).astype(np.uint8)  # (N,3,3) little-endian
    alphas = u8(sigmoid(p["opacities"]) * 255)
    colors = u8((p["sh0"] * SPZ_COLOR_SCALE + 0.5) * 255)
    scales = u8((p["scales"] + 10.0) * 16.0)
    q = unit_quats(p["quats"])[:, [1, 2, 3, 0]]  # wxyz -> xyzw
    if version == 2:
        q = q * np.where(q[:, 3:4] < 0, -1.0, 1.0)
        rot = u8((q[:, :3] + 1) * 127.5)
    else:
        rot = _pack_smallest_three(q).view(np.uint8).reshape(n, 4)
    streams = [pos.tobytes(), alphas.tobytes(), colors.tobytes(), scales.tobytes(), rot.tobytes()]
    k = p["shN"].shape[1]
    if k:
        sh = np.rint(p["shN"].astype(np.float64) * 128 + 128).clip(0, 255)
        bits = np.where(np.arange(k) < 3, 5, 4)[None, :, None]  # Niantic's defaults: 5 bits degree 1, 4 above
        bucket = (1 << (8 - bits)).astype(np.float64)
        sh = np.minimum(np.floor((sh + bucket / 2) / bucket) * bucket, 255)
        streams.append(sh.astype(np.uint8).tobytes())
    return streams


def save_spz(params, path, version: int = 3, convert: bool = True) -> int:
    """Niantic ``.spz``, version 3 (gzip) by default; 2 or 4 (zstd streams) on request.
    Positions use 12 fraction bits (Niantic's choice) unless the scene needs fewer to fit 24 bits.
    ``convert``: our RDF axes to SPZ's RUB (False: write the axes as they are). Returns the count."""
    if version not in (2, 3, 4):
        raise ValueError(f"SPZ version {version}: we write 2, 3 or 4")
    p = to_numpy(params)
    n = len(p["means"])
    k = p["shN"].shape[1]
    if k > 15:
        p["shN"], k = p["shN"][:, :15], 15
    deg = sh_degree_of(k)
    extent = float(np.abs(p["means"]).max()) if n else 0.0
    fb = 12
    while fb > 0 and extent * (1 << fb) >= (1 << 23) - 1:
        fb -= 1
    streams = _spz_streams(p, version, fb, convert)
    if version in (2, 3):
        header = struct.pack("<IIIBBBB", SPZ_MAGIC, version, n, deg, fb, 0, 0)
        data = gzip.compress(header + b"".join(streams), compresslevel=9, mtime=0)
    else:
        zstd = _zstd()
        comp = [zstd.ZstdCompressor(level=12).compress(s) for s in streams]
        header = struct.pack("<IIIBBBBI12x", SPZ_MAGIC, 4, n, deg, fb, 0, len(comp), 32)
        toc = b"".join(struct.pack("<QQ", len(c), len(s)) for c, s in zip(comp, streams))
        data = header + toc + b"".join(comp)
    write_bytes(path, data)
    return n


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise UserError("SPZ version 4 files are zstd-compressed: pip install zstandard") from None
    return zstandard


def read_spz_streams(path, data: Optional[bytes] = None) -> tuple[dict, list[bytes]]:
    """The header fields and the raw (uncompressed) attribute streams of a ``.spz`` file (or of
    ``data``, its bytes, with ``path`` naming where they came from for errors): positions, alphas,
    colours, scales, rotations[, SH]."""
    raw = read_bytes(path) if data is None else bytes(data)

    def bad(what):
        return UserError(f"{path}: {what}; give a .spz written by Niantic's spz library or a splat tool")

    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise bad(f"broken gzip stream ({e})") from None
        gz = True
    else:
        gz = False
    if len(raw) < 16:
        raise bad("too short for an SPZ header")
    magic, version, n, deg, fb, flags, byte15 = struct.unpack_from("<IIIBBBB", raw, 0)
    if magic != SPZ_MAGIC:
        raise bad("no SPZ magic 'NGSP'")
    if deg > 4:
        raise bad(f"SH degree {deg} (SPZ allows 0..4)")
    k = (0, 3, 8, 15, 24)[deg]
    if version in (2, 3) and gz:
        body, off = raw, 16
        sizes = [n * 9, n, n * 3, n * 3, n * (3 if version == 2 else 4)] + ([n * k * 3] if k else [])
        streams = []
        for s in sizes:
            if off + s > len(body):
                raise bad(f"data ends early (expected {16 + sum(sizes)} bytes after gzip, got {len(body)})")
            streams.append(body[off:off + s])
            off += s
    elif version == 4 and not gz:
        n_streams = byte15
        if len(raw) < 32:
            raise bad("too short for an SPZ v4 header")
        (toc_off,) = struct.unpack_from("<I", raw, 16)
        sizes = [n * 9, n, n * 3, n * 3, n * 4] + ([n * k * 3] if k else [])
        if n_streams != len(sizes) or toc_off < 32 or toc_off + 16 * n_streams > len(raw):
            raise bad(f"SPZ v4 table of contents does not fit ({n_streams} streams at byte {toc_off})")
        toc = [struct.unpack_from("<QQ", raw, toc_off + 16 * i) for i in range(n_streams)]
        zstd = _zstd()
        off, streams = toc_off + 16 * n_streams, []
        for (csize, usize), want in zip(toc, sizes):
            if usize != want or off + csize > len(raw):
                raise bad(f"SPZ v4 stream of {usize} bytes where {want} were expected")
            try:
                s = zstd.ZstdDecompressor().decompress(raw[off:off + csize], max_output_size=usize)
            except zstd.ZstdError as e:
                raise bad(f"broken zstd stream ({e})") from None
            if len(s) != usize:
                raise bad("an SPZ v4 stream decompresses to the wrong size")
            streams.append(s)
            off += csize
    else:
        raise bad(f"SPZ version {version}{' inside gzip' if gz else ' without gzip'} is not supported "
                  "(we read 2 and 3 gzipped, 4 with zstd streams)")
    return {"version": version, "num_points": n, "sh_degree": deg, "fractional_bits": fb, "flags": flags}, streams


def load_spz(path, convert: bool = True, data: Optional[bytes] = None) -> dict[str, torch.Tensor]:
    """Read a Niantic ``.spz``: versions 2 and 3 (gzip) and 4 (zstd streams). ``convert``: SPZ's
    RUB axes to our RDF (False: keep the file's axes, as splat-transform does)."""
    h, streams = read_spz_streams(path, data)
    version, n, fb = h["version"], h["num_points"], h["fractional_bits"]
    k = (0, 3, 8, 15, 24)[h["sh_degree"]]
    pos = np.frombuffer(streams[0], np.uint8).reshape(n, 3, 3).astype(np.int32)
    fixed = pos[..., 0] | (pos[..., 1] << 8) | (pos[..., 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
    means = fixed.astype(np.float64) / (1 << fb)
    alphas = np.frombuffer(streams[1], np.uint8).astype(np.float32) / 255
    colors = np.frombuffer(streams[2], np.uint8).reshape(n, 3).astype(np.float32)
    sh0 = (colors / 255 - 0.5) / SPZ_COLOR_SCALE
    scales = np.frombuffer(streams[3], np.uint8).reshape(n, 3).astype(np.float32) / 16 - 10
    if version == 2:
        xyz = np.frombuffer(streams[4], np.uint8).reshape(n, 3).astype(np.float32) / 127.5 - 1
        w = np.sqrt(np.maximum(0, 1 - (xyz * xyz).sum(1)))
        q_xyzw = np.concatenate([xyz, w[:, None]], 1)
    else:
        q_xyzw = _unpack_smallest_three(np.frombuffer(streams[4], "<u4"))
    shN = None
    if k:
        shN = (np.frombuffer(streams[5], np.uint8).reshape(n, k, 3).astype(np.float32) - 128) / 128
        if k > 15:  # degree 4: the renderer draws up to degree 3
            shN = shN[:, :15]
    means, quats = means.astype(np.float32), unit_quats(q_xyzw[:, [3, 0, 1, 2]])
    if convert:
        means, quats, shN = _rdf_rub(means, quats, shN)
    return to_params(means, scales, quats, logit(alphas), sh0, shN)


# ----------------------------------------------------------------------------- any


KNOWN = ".ply, .compressed.ply, .splat, .spz, .sog (or a SOG folder / its meta.json), .glb / .gltf"


def sniff(path) -> str:
    """The format of a splat file (one of ``FORMATS``) from its first bytes (the extension breaks
    ties): a SOG folder or its meta.json is 'sog', glTF JSON is 'glb' too."""
    path = Path(path)
    if path.is_dir() or path.name == "meta.json":
        if is_sog_folder(path):
            return "sog"
        raise UserError(f"{path}: not a SOG folder (no meta.json with means and quats); give a splat file ({KNOWN})")
    if not path.is_file():
        raise UserError(f"{path}: no such file; give the path of a splat file ({KNOWN})")
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"ply\n" or head[:5] == b"ply\r\n":
        end = head.find(b"end_header")
        text = head[: end if end >= 0 else len(head)]
        return "compressed-ply" if b"element chunk" in text or b"packed_position" in text else "ply"
    if head[:4] == b"glTF" or (path.suffix.lower() == ".gltf" and head.lstrip()[:1] == b"{"):
        return "glb"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "sog"
    if head[:4] == struct.pack("<I", SPZ_MAGIC) or (head[:2] == b"\x1f\x8b" and path.suffix.lower() != ".splat"):
        return "spz"
    if path.suffix.lower() in (".sog", ".glb"):
        what = "a zip (SOG bundle)" if path.suffix.lower() == ".sog" else "a binary glTF ('glTF' magic)"
        raise UserError(f"{path}: does not start as {what}; the file is damaged or not a {path.suffix} file")
    if path.suffix.lower() == ".splat" or (path.stat().st_size % SPLAT_BYTES == 0 and path.stat().st_size):
        return "splat"
    raise UserError(f"{path}: not a splat file we know ({KNOWN})")


def is_splat_file(path) -> bool:
    """Whether ``path`` is a splat file (or a SOG folder) rather than a run folder."""
    path = Path(path)
    if path.is_file():
        return True
    return path.is_dir() and (path / "meta.json").is_file() and not (path / "config.json").is_file()


def load_any(path) -> dict[str, torch.Tensor]:
    """Read any splat file we know (``sniff`` says which): Inria ``.ply``, PlayCanvas
    ``compressed.ply``, ``.splat``, ``.spz``, SOG (zip, folder or meta.json), glTF / GLB."""
    kind = sniff(path)
    if kind == "ply":
        from budget3d.splat.gaussians import load_ply

        return load_ply(path)
    readers = {"compressed-ply": load_compressed_ply, "splat": load_splat, "spz": load_spz, "sog": load_sog,
               "glb": load_glb}
    return readers[kind](path)


def format_of(path) -> Optional[str]:
    """The format a file name asks for: gaussians.compressed.ply, x.sog, a SOG meta.json, ..."""
    name = Path(path).name.lower()
    if name.endswith(".compressed.ply"):
        return "compressed-ply"
    if name == "meta.json":
        return "sog"
    ext = Path(name).suffix.lstrip(".")
    return {"gltf": "glb"}.get(ext, ext) if ext in FORMATS or ext == "gltf" else None


def save_any(params, path, fmt: Optional[str] = None) -> int:
    """Write ``params`` as ``fmt`` (one of ``FORMATS``; default: from the file name). Returns the count."""
    fmt = fmt or format_of(path)
    if fmt == "ply":
        from budget3d.splat.gaussians import save_ply

        save_ply(params, path)
        return len(params["means"])
    writers = {"splat": save_splat, "spz": save_spz, "sog": save_sog, "glb": save_glb,
               "compressed-ply": save_compressed_ply}
    if fmt not in writers:
        raise UserError(f"{path}: unknown splat format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return writers[fmt](params, path)


# ----------------------------------------------------------------------------- budget


def importance(params) -> torch.Tensor:
    """A view-free importance per Gaussian: opacity x projected area (volume^(2/3)), i.e.
    sigmoid(opacity) * exp(2/3 * sum of log-scales). Cheap, but it keeps big blurry Gaussians over
    the small ones that carry detail: measured worse than a random choice (module notes)."""
    return torch.sigmoid(params["opacities"].detach().float()) * torch.exp(
        params["scales"].detach().float().sum(-1) * (2.0 / 3.0))


def reprune(params, n: int, scores: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Keep the ``n`` highest-scoring Gaussians (``scores`` if given, else ``orbit_scores``), in
    their original order. ``n`` >= the count returns a copy of everything; no fine-tune happens."""
    total = len(params["means"])
    if n < 1:
        raise UserError(f"--budget {n}: keep at least one Gaussian")
    if n >= total:
        return {k: v.detach().clone() for k, v in params.items()}
    s = orbit_scores(params) if scores is None else torch.as_tensor(scores).float().reshape(-1)
    if len(s) != total:
        raise ValueError(f"{len(s)} scores for {total} Gaussians")
    keep = torch.sort(torch.topk(torch.nan_to_num(s, nan=-1.0), n).indices).values
    return {k: v.detach()[keep].clone() for k, v in params.items()}


def run_scores(run_dir, params, n_views: int = 8, max_side: int = 400, backend: str = "cpu", data=None
               ) -> tuple[Optional[torch.Tensor], str]:
    """The Taming score (``budget3d.budget.taming.compute_scores``: opacity, volume, depth, screen
    size, pixels covered and error/edge-weighted blending weight; no positional-gradient term, as no
    training step runs) of every Gaussian, over ``n_views`` training views of the run's scene at most
    ``max_side`` pixels wide. Returns (scores, what); (None, why) when the run's scene cannot be loaded."""
    import cv2

    from budget3d.budget.taming import TamingConfig, compute_scores
    from budget3d.splat import render
    from budget3d.runfolder import load_run_scene

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        return None, "the run has no config.json to find its scene"
    try:
        scene = load_run_scene(run_dir, override=data)
        train = scene.train
        if not train:
            return None, "the run's scene has no training views"
        pick = sorted({round(i * (len(train) - 1) / max(1, n_views - 1)) for i in range(min(n_views, len(train)))})
        views = []
        for i in pick:
            cam, img = train[i].camera, train[i].image()
            factor = max(cam.width, cam.height) / max_side
            if factor > 1:
                cam = cam.scaled(factor)
                img = cv2.resize(img, (cam.width, cam.height), interpolation=cv2.INTER_AREA)
            views.append((cam, torch.as_tensor(img, dtype=torch.float32) / 255))
    except (OSError, ValueError, TypeError, KeyError, UserError) as e:
        return None, f"the run's scene is not readable ({' '.join(str(e).split())[:160]})"
    bg = torch.as_tensor(scene.background, dtype=torch.float32)
    p = {k: v.detach().float() for k, v in params.items()}

    def render_fn(pp, cam, extra):
        return render(pp, cam, backend=backend, extra=extra, background=bg)

    scores = compute_scores(p, {}, TamingConfig(budget=len(p["means"])), views, render_fn)
    return scores, f"Taming score over {len(views)} training views"


def look_at(eye, target, size: int = 256, fov_deg: float = 50.0):
    """A square pinhole ``Camera`` at ``eye`` looking at ``target`` (OpenCV axes, world -y up)."""
    from budget3d.scene.camera import Camera, look_at_w2c

    eye, target = np.asarray(eye, np.float64), np.asarray(target, np.float64)
    z = (target - eye) / max(np.linalg.norm(target - eye), 1e-12)
    w2c = look_at_w2c(eye, target, [0.0, -1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0])
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    return Camera(f, f, size / 2, size / 2, size, size, w2c)


def orbit_cameras(params, n: int = 8, size: int = 256, distance: float = 1.5, phase: float = 0.4) -> list:
    """``n`` cameras on two rings (elevations -0.5 and 0.3 rad) around the median of the means, at
    ``distance`` x the diagonal of the 5-95% box of the means."""
    m = params["means"].detach().float().cpu()
    center = m.median(0).values.double().numpy()
    lo, hi = torch.quantile(m[:: max(1, len(m) // 100_000)], torch.tensor([0.05, 0.95]), dim=0)
    radius = distance * max(float((hi - lo).norm()), 1e-6)
    cams = []
    for i in range(n):
        el = (-0.5, 0.3)[i % 2]
        az = phase + 2 * math.pi * (i // 2) / max(1, (n + 1) // 2) + (math.pi / max(1, n) if i % 2 else 0.0)
        d = np.array([math.sin(az) * math.cos(el), math.sin(el), -math.cos(az) * math.cos(el)])
        cams.append(look_at(center + radius * d, center, size))
    return cams


def orbit_scores(params, n_views: int = 8, size: int = 256, backend: str = "cpu") -> torch.Tensor:
    """The Taming score (no gradient term) over ``orbit_cameras``, each view's target being the
    full model's own render: for splat files without their capture (see the module notes)."""
    from budget3d.budget.taming import TamingConfig, compute_scores
    from budget3d.splat import render

    p = {k: v.detach().float() for k, v in params.items()}
    bg = torch.zeros(3)

    def render_fn(pp, cam, extra=None):
        return render(pp, cam, backend=backend, extra=extra, background=bg)

    with torch.no_grad():
        views = [(cam, render_fn(p, cam).image) for cam in orbit_cameras(p, n_views, size)]
    return compute_scores(p, {}, TamingConfig(budget=len(p["means"])), views, render_fn)
