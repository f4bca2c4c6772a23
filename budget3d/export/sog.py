"""PlayCanvas SOG ("Spatially Ordered Gaussians"): lossless WebP textures plus ``meta.json``.

We write version 2, the version PlayCanvas' ``splat-transform`` (3.7 to 3.10, the newest on npm)
writes and reads and Spark 2.2 reads; we read versions 2 and 1 (the older per-axis min/max files).
The developer site now also describes a version 3; no released tool we can run writes it, so a
version-3 file is refused with a one-line error rather than read by guesswork.

Every per-Gaussian image is W x H texels (W = ceil(sqrt(N)/4)*4, H = ceil(N/W/4)*4), Gaussian i at
texel i in row-major order; texels past ``count`` are ignored. Axes are the .ply's (no change).

- ``means_l.webp`` / ``means_u.webp``: low / high bytes (RGB) of a 16-bit fraction of each axis
  between ``means.mins`` and ``means.maxs``, in the log domain v = sign(x) * ln(|x| + 1) (fine
  near the origin, coarse far away);
- ``quats.webp``: RGB = the three components other than the largest |component| (of wxyz, made
  positive), each times sqrt(2) mapped from [-1, 1] to 0..255; A = 252 + index of the largest;
- ``scales.webp``: RGB = indices into ``scales.codebook`` (256 log-scales shared by the 3 axes);
- ``sh0.webp``: RGB = indices into ``sh0.codebook`` (256 DC coefficients shared by the 3
  channels), A = round(255 * sigmoid(opacity));
- ``shN_centroids.webp`` / ``shN_labels.webp`` (SH degree >= 1): a palette of ``shN.count``
  k-means centroids of the (N, 3K) rest coefficients, each centroid K texels wide in a
  (64 K) x ceil(count / 64) image whose RGB are indices into ``shN.codebook`` (256 values); a
  Gaussian's label (R + 256 G of its texel) picks its centroid.

The bundle (``.sog``) is a zip of the same files at its root (stored, not deflated: WebP is already
compressed). Lossless WebP must keep the RGB of transparent texels (an opacity of 0 in sh0's alpha
must not erase the colour indices): the encoder's "exact" mode.

Writing (our own choices where the format leaves them free): Gaussians in Morton order (as
PlayCanvas writes them: neighbouring texels hold neighbouring splats, so the images compress); each
codebook is a 256-level 1-D k-means (Lloyd) of the pooled values; the SH palette is a k-means of
min(64, 2^floor(log2(N / 1024))) x 1024 centroids (splat-transform's palette size, at most N) over
at most ``SH_ITERATIONS`` rounds (splat-transform's default), fewer once the error settles; positions and quaternion components are rounded to the nearest level.

Quantisation error (what the tests check): positions within half a 16-bit step of the log-domain
range (|dx| <= (e^|v|) * range / 65535 / 2); log-scales and DC to the nearest codebook entry;
alpha within 0.5/255; quaternion components within 0.5/255 * sqrt(2); higher SH to their centroid,
whose values are rounded to the nearest codebook entry.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.export.splat_arrays import (SH_COUNTS, logit, morton_order, sigmoid, to_numpy, to_params, u8,
                                          unit_quats)
from budget3d.runtime import atomic_path, write_bytes

SH_ITERATIONS = 10
FILES = {"means": ["means_l.webp", "means_u.webp"], "scales": ["scales.webp"], "quats": ["quats.webp"],
         "sh0": ["sh0.webp"], "shN": ["shN_centroids.webp", "shN_labels.webp"]}


# ----------------------------------------------------------------------------- quantisers


def codebook(values: np.ndarray, k: int = 256, iters: int = 30) -> np.ndarray:
    """``k`` levels for the 1-D ``values`` (sorted ascending, float32): Lloyd's k-means started from a
    blend of quantile and uniform positions, so sparse tails still get levels."""
    v = np.sort(np.asarray(values, np.float64).reshape(-1))
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return np.zeros(k, np.float32)
    lo, hi = v[0], v[-1]
    t = (np.arange(k) + 0.5) / k
    c = 0.5 * np.quantile(v, t) + 0.5 * (lo + (hi - lo) * t)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        cnt = np.bincount(idx, minlength=k)
        s = np.bincount(idx, weights=v, minlength=k)
        new = np.where(cnt > 0, s / np.maximum(cnt, 1), c)
        new.sort()
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c.astype(np.float32)


def nearest(values: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted ``book`` for each value (uint8 for 256 entries)."""
    b = book.astype(np.float64)
    idx = np.searchsorted((b[1:] + b[:-1]) / 2, np.asarray(values, np.float64))
    return idx.astype(np.uint8 if len(book) <= 256 else np.int64)


def kmeans(x: np.ndarray, k: int, iters: int = SH_ITERATIONS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k, D), labels (N,)) of plain k-means, started from ``k`` distinct random rows,
    stopping early once a round lowers the squared error by less than 0.1% (on lego's 30k Gaussians
    rounds 5 to 10 changed it by 0.03% and cost half the write); a centroid that loses all its
    points keeps its place."""
    xt = torch.as_tensor(np.ascontiguousarray(x, np.float32))
    n = len(xt)
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    c = xt[torch.randperm(n, generator=g)[:k]].clone()
    rows = max(1, (1 << 24) // max(k, 1))
    x2 = float((xt.double() ** 2).sum())

    def assign(c):  # argmin |x - c|^2 = argmin |c|^2 - 2 x.c, one fused matmul per block of rows
        c2, ct = (c * c).sum(1), c.T.contiguous()
        lab, err = torch.empty(n, dtype=torch.int64), 0.0
        for s in range(0, n, rows):
            d, lab[s:s + rows] = torch.addmm(c2, xt[s:s + rows], ct, alpha=-2).min(1)
            err += float(d.double().sum())
        return lab, err + x2

    lab, err = assign(c)
    for _ in range(iters):
        cnt = torch.bincount(lab, minlength=k).float()
        s = torch.zeros_like(c).index_add_(0, lab, xt)
        c = torch.where((cnt == 0)[:, None], c, s / cnt.clamp(min=1)[:, None])
        lab, new_err = assign(c)
        if err - new_err < 1e-3 * max(new_err, 1e-30):
            break
        err = new_err
    return c.numpy(), lab.numpy()


def palette_size(n: int) -> int:
    return int(min(64.0, 2.0 ** math.floor(math.log2(max(n, 1) / 1024))) * 1024)


# ----------------------------------------------------------------------------- WebP


def _webp(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # exact: keep the RGB of texels whose alpha is 0 (sh0's alpha is the opacity)
    Image.fromarray(np.ascontiguousarray(rgba, np.uint8), "RGBA").save(buf, "WEBP", lossless=True, exact=True,
                                                                        quality=100, method=4)
    return buf.getvalue()


def _unwebp(data: bytes, name: str, where) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for broken images
        raise UserError(f"{where}: {name} is not a readable WebP image ({' '.join(str(e).split())[:120]}); "
                        "the SOG is damaged, export it again") from None
    return np.asarray(img.convert("RGBA"))


# ----------------------------------------------------------------------------- write


def encode(params, sh_iterations: int = SH_ITERATIONS) -> tuple[dict, dict[str, bytes], np.ndarray]:
    """(meta.json dict, {file name: WebP bytes}, the order Gaussians were written in)."""
    p = to_numpy(params)
    n = len(p["means"])
    if n == 0:
        raise UserError("no Gaussians to write")
    k = p["shN"].shape[1]
    if k > 15:
        k = 15
    if k not in (0, 3, 8, 15):
        raise ValueError(f"{k} SH rest coefficients is not a whole SH degree")
    order = morton_order(p["means"])
    w = int(math.ceil(math.sqrt(n) / 4) * 4)
    h = int(math.ceil(n / w / 4) * 4)

    def image(cols: list[np.ndarray], alpha=None) -> np.ndarray:
        img = np.zeros((w * h, 4), np.uint8)
        for i, col in enumerate(cols):
            img[:n, i] = col
        img[:, 3] = 255 if alpha is None else 0
        if alpha is not None:
            img[:n, 3] = alpha
        return img.reshape(h, w, 4)

    files = {}
    m = p["means"][order].astype(np.float64)
    lm = np.sign(m) * np.log1p(np.abs(m))
    mins, maxs = lm.min(0), lm.max(0)
    q16 = np.clip(np.rint(65535 * (lm - mins) / np.where(maxs > mins, maxs - mins, 1.0)), 0, 65535).astype(np.uint16)
    files["means_l.webp"] = _webp(image([q16[:, i] & 0xFF for i in range(3)]))
    files["means_u.webp"] = _webp(image([q16[:, i] >> 8 for i in range(3)]))

    q = unit_quats(p["quats"][order]).astype(np.float64)
    big = np.argmax(np.abs(q), 1)
    q = q * np.where(q[np.arange(n), big] < 0, -1.0, 1.0)[:, None] * math.sqrt(2)
    others = np.array([[j for j in range(4) if j != i] for i in range(4)])[big]
    comp = np.take_along_axis(q, others, 1)
    files["quats.webp"] = _webp(image([u8(255 * (comp[:, i] * 0.5 + 0.5)) for i in range(3)], 252 + big))

    s_book = codebook(p["scales"])
    s_idx = nearest(p["scales"][order], s_book)
    files["scales.webp"] = _webp(image([s_idx[:, i] for i in range(3)]))

    c_book = codebook(p["sh0"])
    c_idx = nearest(p["sh0"][order], c_book)
    files["sh0.webp"] = _webp(image([c_idx[:, i] for i in range(3)], u8(255 * sigmoid(p["opacities"][order]))))

    meta = {
        "version": 2,
        "asset": {"generator": "budget3d"},
        "count": n,
        "means": {"mins": mins.tolist(), "maxs": maxs.tolist(), "files": FILES["means"]},
        "scales": {"codebook": s_book.tolist(), "files": FILES["scales"]},
        "quats": {"files": FILES["quats"]},
        "sh0": {"codebook": c_book.tolist(), "files": FILES["sh0"]},
    }
    if k:
        rest = p["shN"][order, :k].transpose(0, 2, 1).reshape(n, 3 * k)  # the .ply's f_rest order
        cent, lab = kmeans(rest, palette_size(n), sh_iterations)
        n_cent = len(cent)
        r_book = codebook(cent)
        r_idx = nearest(cent, r_book).reshape(n_cent, 3, k)  # centroid, channel, coefficient
        rows = -(-n_cent // 64)
        tex = np.zeros((rows * 64 * k, 4), np.uint8)
        tex[:n_cent * k, :3] = r_idx.transpose(0, 2, 1).reshape(n_cent * k, 3)
        tex[:, 3] = 255
        files["shN_centroids.webp"] = _webp(tex.reshape(rows, 64 * k, 4))
        lab = lab.astype(np.int64)
        files["shN_labels.webp"] = _webp(image([lab & 0xFF, lab >> 8, np.zeros(n, np.uint8)]))
        meta["shN"] = {"count": n_cent, "bands": {3: 1, 8: 2, 15: 3}[k], "codebook": r_book.tolist(),
                       "files": FILES["shN"]}
    return meta, files, order


def _is_folder_target(path: Path) -> bool:
    return path.name == "meta.json" or path.is_dir() or path.suffix == ""


def save_sog(params, path, sh_iterations: int = SH_ITERATIONS) -> int:
    """Write a SOG: a ``.sog`` zip, or the folder form when ``path`` is a folder or a ``meta.json``
    (the images go beside it). Returns the number of Gaussians."""
    path = Path(path)
    meta, files, order = encode(params, sh_iterations)
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    if _is_folder_target(path):
        folder = path.parent if path.name == "meta.json" else path
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_bytes(folder / name, data)
        write_bytes(folder / "meta.json", meta_bytes)  # last: a reader never finds meta.json without its images
        return len(order)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            for name, data in list(files.items()) + [("meta.json", meta_bytes)]:
                info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                z.writestr(info, data)
    return len(order)


def sog_size(path) -> int:
    """Bytes on disk of a SOG (the zip, or meta.json plus the images it names)."""
    path = Path(path)
    if path.is_file() and path.name != "meta.json":
        return path.stat().st_size
    meta = path if path.name == "meta.json" else path / "meta.json"
    names = {"meta.json"} | {f for v in json.loads(meta.read_text()).values()
                             if isinstance(v, dict) for f in v.get("files", [])}
    return sum((meta.parent / f).stat().st_size for f in names if (meta.parent / f).is_file())


# ----------------------------------------------------------------------------- read


def _open(path: Path):
    """(meta dict, a function name -> bytes, what to call the source in errors)."""
    if path.is_dir():
        path = path / "meta.json"
    if not path.is_file():
        raise UserError(f"{path}: no such file; give a .sog file, a SOG folder or its meta.json")
    if path.name == "meta.json" or path.suffix.lower() == ".json":
        folder = path.parent

        def get(name):
            f = folder / name
            if not f.is_file():
                raise UserError(f"{path}: names {name}, which is not in {folder}; copy the SOG folder whole")
            return f.read_bytes()

        text = path.read_bytes()
        return _parse_meta(text, path), get, path
    try:
        z = zipfile.ZipFile(path)
        entries = {i.filename: i for i in z.infolist() if not i.is_dir()}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .sog zip ({' '.join(str(e).split())[:100]}); the file is damaged "
                        "or truncated, export or download it again") from None
    metas = [nm for nm in entries if nm.rsplit("/", 1)[-1] == "meta.json"]
    if not metas:
        raise UserError(f"{path}: the zip has no meta.json; this is not a SOG bundle")
    base = min(metas, key=len)
    prefix = base[: -len("meta.json")]

    def get(name):
        full = prefix + name
        if full not in entries:
            raise UserError(f"{path}: meta.json names {name}, which is not in the zip; the bundle is incomplete")
        try:
            return z.read(full)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: {name} in the zip is damaged ({' '.join(str(e).split())[:100]}); "
                            "export or download it again") from None

    return _parse_meta(get("meta.json"), path), get, path


def _parse_meta(text: bytes, where) -> dict:
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{where}: meta.json is not valid JSON ({e}); the SOG is damaged") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: meta.json is not a JSON object; this is not a SOG")
    return meta


def _need(meta: dict, where, *keys):
    missing = []
    for k in keys:
        node = meta
        for part in k.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(k)
    if missing:
        raise UserError(f"{where}: meta.json lacks {', '.join(missing)}; this SOG is damaged or not a SOG")


def _texels(get, name, count, where) -> np.ndarray:
    img = _unwebp(get(name), name, where)
    flat = img.reshape(-1, 4)
    if len(flat) < count:
        raise UserError(f"{where}: {name} holds {len(flat)} texels for {count} Gaussians; the SOG is damaged")
    return flat[:count].astype(np.int64)


def load_sog(path) -> dict[str, torch.Tensor]:
    """Read a SOG: a ``.sog`` zip, a SOG folder or its ``meta.json``; versions 2 and 1."""
    path = Path(path)
    meta, get, where = _open(path)
    version = meta.get("version")
    if version is None:
        return _load_v1(meta, get, where)
    if version != 2:
        raise UserError(f"{where}: SOG version {version}; we read versions 1 and 2 (convert it with "
                        "'splat-transform IN.sog OUT.ply' first)")
    _need(meta, where, "count", "means.mins", "means.maxs", "means.files", "scales.codebook", "scales.files",
          "quats.files", "sh0.codebook", "sh0.files")
    n = int(meta["count"])
    if n < 1:
        raise UserError(f"{where}: meta.json says count {meta['count']}; the SOG holds no Gaussians")
    lo = _texels(get, meta["means"]["files"][0], n, where)
    hi = _texels(get, meta["means"]["files"][1], n, where)
    mins, maxs = np.asarray(meta["means"]["mins"], np.float64), np.asarray(meta["means"]["maxs"], np.float64)
    v = mins + (maxs - mins) * ((lo[:, :3] | (hi[:, :3] << 8)) / 65535.0)
    means = np.sign(v) * np.expm1(np.abs(v))
    quats = _quats(_texels(get, meta["quats"]["files"][0], n, where))
    s_book = np.asarray(meta["scales"]["codebook"], np.float32)
    c_book = np.asarray(meta["sh0"]["codebook"], np.float32)
    sl = _texels(get, meta["scales"]["files"][0], n, where)
    c0 = _texels(get, meta["sh0"]["files"][0], n, where)
    if len(s_book) < 256 or len(c_book) < 256:
        raise UserError(f"{where}: meta.json's codebooks have {len(s_book)} / {len(c_book)} entries, not 256; "
                        "the SOG is damaged")
    shN = None
    sh = meta.get("shN")
    if sh:
        _need(meta, where, "shN.count", "shN.bands", "shN.codebook", "shN.files")
        k = SH_COUNTS.get(int(sh["bands"]), None)
        if not k:
            raise UserError(f"{where}: shN.bands {sh['bands']} (SOG allows 1..3); the SOG is damaged")
        r_book = np.asarray(sh["codebook"], np.float32)
        cen = _unwebp(get(sh["files"][0]), sh["files"][0], where)
        if cen.shape[1] != 64 * k or len(r_book) < 256:
            raise UserError(f"{where}: {sh['files'][0]} is {cen.shape[1]} texels wide, not {64 * k} for "
                            f"{sh['bands']} SH bands; the SOG is damaged")
        lab = _texels(get, sh["files"][1], n, where)
        label = lab[:, 0] | (lab[:, 1] << 8)
        count = min(int(sh["count"]), cen.shape[0] * 64)
        pal = cen.reshape(-1, 4)[: count * k, :3].reshape(count, k, 3)  # centroid, coefficient, channel
        valid = label < count
        shN = np.zeros((n, k, 3), np.float32)
        shN[valid] = r_book[pal[label[valid]]]
    return to_params(means, s_book[sl[:, :3]], quats, logit(c0[:, 3] / 255.0), c_book[c0[:, :3]], shN)


def _quats(qt: np.ndarray) -> np.ndarray:
    tag = qt[:, 3]
    abc = (qt[:, :3] / 255.0 * 2 - 1) / math.sqrt(2)
    q = np.zeros((len(qt), 4))
    for b in range(4):
        sel = tag == 252 + b
        q[np.ix_(sel, [j for j in range(4) if j != b])] = abc[sel]
        q[sel, b] = np.sqrt(np.maximum(0.0, 1 - (abc[sel] ** 2).sum(1)))
    q[(tag < 252)] = (1, 0, 0, 0)  # as PlayCanvas reads a texel without a valid tag
    return unit_quats(q.astype(np.float32))


def _load_v1(meta: dict, get, where) -> dict[str, torch.Tensor]:
    """SOG version 1 (no ``version`` key): per-axis min/max instead of codebooks, count in
    ``means.shape[0]``, opacity as a logit range in sh0's alpha, SH palette width 64 * K."""
    _need(meta, where, "means.shape", "means.mins", "means.maxs", "means.files", "scales.mins", "scales.maxs",
          "scales.files", "quats.files", "sh0.mins", "sh0.maxs", "sh0.files")
    n = int(meta["means"]["shape"][0])
    lo = _texels(get, meta["means"]["files"][0], n, where)
    hi = _texels(get, meta["means"]["files"][1], n, where)
    mins, maxs = np.asarray(meta["means"]["mins"], np.float64), np.asarray(meta["means"]["maxs"], np.float64)
    v = mins + (maxs - mins) * ((lo[:, :3] | (hi[:, :3] << 8)) / 65535.0)
    means = np.sign(v) * np.expm1(np.abs(v))

    def lerp(key, tex, ch):
        a, b = np.asarray(meta[key]["mins"], np.float64), np.asarray(meta[key]["maxs"], np.float64)
        return a[:ch] + (b[:ch] - a[:ch]) * (tex[:, :ch] / 255.0)

    scales = lerp("scales", _texels(get, meta["scales"]["files"][0], n, where), 3)
    c0 = _texels(get, meta["sh0"]["files"][0], n, where)
    dc_op = lerp("sh0", c0, 4)
    shN = None
    sh = meta.get("shN")
    if sh and sh.get("files"):
        cen = _unwebp(get(sh["files"][0]), sh["files"][0], where)
        k = {192: 3, 512: 8, 960: 15}.get(cen.shape[1])
        if k is None:
            raise UserError(f"{where}: {sh['files'][0]} is {cen.shape[1]} texels wide (version 1 uses 192, 512 "
                            "or 960); the SOG is damaged")
        lab = _texels(get, sh["files"][1], n, where)
        label = lab[:, 0] | (lab[:, 1] << 8)
        count = (cen.shape[1] // k) * cen.shape[0]
        pal = cen.reshape(-1, 4)[: count * k, :3].reshape(count, k, 3).astype(np.float64)
        pal = float(sh["mins"]) + (float(sh["maxs"]) - float(sh["mins"])) * pal / 255.0
        valid = label < count
        shN = np.zeros((n, k, 3), np.float32)
        shN[valid] = pal[label[valid]]
    return to_params(means, scales, _quats(_texels(get, meta["quats"]["files"][0], n, where)), dc_op[:, 3],
                     dc_op[:, :3], shN)


def is_sog_folder(path) -> Optional[Path]:
    """The meta.json of a SOG folder (or the path itself when it is a SOG meta.json), else None."""
    path = Path(path)
    meta = path / "meta.json" if path.is_dir() else path
    if meta.name != "meta.json" or not meta.is_file():
        return None
    try:
        m = json.loads(meta.read_bytes()[:1 << 20])
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(m, dict) and "means" in m and "quats" in m else None
