"""glTF 2.0 binary (``.glb``) with the Khronos ``KHR_gaussian_splatting`` extension.

One node, one mesh, one POINTS primitive (mode 0) whose ``extensions.KHR_gaussian_splatting`` is
``{"kernel": "ellipse", "colorSpace": "srgb_rec709_display", "projection": "perspective",
"sortingMethod": "cameraDistance"}`` (our colours are trained against sRGB images and blended
as they are: display-referred sRGB). Attributes, one float accessor and buffer view each:

=========================================== ====== ======================================================
``POSITION``                                VEC3   the means (with the min / max glTF requires)
``KHR_gaussian_splatting:ROTATION``         VEC4   unit quaternion, x y z w (glTF's order)
``KHR_gaussian_splatting:SCALE``            VEC3   linear: exp of our log-scales
``KHR_gaussian_splatting:OPACITY``          SCALAR sigmoid of our logits, in [0, 1]
``KHR_gaussian_splatting:SH_DEGREE_0_COEF_0`` VEC3 the DC coefficients (colour = 0.5 + C0 * DC)
``KHR_gaussian_splatting:SH_DEGREE_l_COEF_n`` VEC3 degree l = 1..3, n = 0..2l (m = -l..l), the run's degree
``COLOR_0``                                 VEC4   fallback for viewers without the extension: unsigned
                                                   byte normalized, the clamped DC colour decoded from
                                                   sRGB to linear (glTF colours are linear), alpha =
                                                   opacity
=========================================== ====== ======================================================

The extension's SH basis (its Appendix A, with the Condon-Shortley phase) is gsplat's and the
Inria .ply's, coefficient for coefficient, so only the axes change.

Axes. glTF is right-handed with +Y up and +Z the asset's front (+X its left: "left, up, front").
Our Gaussians carry the axes of the Inria .ply, which every splat tool reads as OpenCV's
right-down-front (-Y up: a COLMAP capture's usual frame). The conversion is the half turn about Z,
(x, y, z) -> (-x, -y, z), as PlayCanvas' splat-transform writes glTF and Niantic's spz library maps
PLY (RDF) to GLB (LUF); rotations become (w, -x, -y, z) (the half turn conjugating each rotation;
splat-transform multiplies by it instead, which differs by a half turn about the Gaussian's own z
axis: the same ellipsoid, and tests compare covariances), and SH coefficients odd in x + y change
sign. It is a rotation, so it is its own inverse and the reader undoes it exactly. A run whose
world is +Z up (Blender-synthetic scenes such as lego) has its up along glTF's +Z after the
conversion, as its .ply has it along +Z in SuperSplat: the file says how a viewer should place the
splats, not which way the capture's gravity pointed.

Reading also takes other writers' files: any accessor component type the extension allows
(normalized integers included), interleaved buffer views, ``.gltf`` JSON with embedded (data URI)
or side-by-side buffers, several splat primitives (concatenated), node transforms (applied:
positions by the world matrix, covariances and SH by its rotation, see ``transform``) and Cesium's
``KHR_gaussian_splatting_compression_spz_2`` (an SPZ stream in a buffer view, read with its axes
as they are, i.e. as glTF axes).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from budget3d.errors import UserError
from budget3d.export.splat_arrays import (C0, SH_COUNTS, flip_axes, logit, read_bytes, sigmoid, to_numpy, to_params,
                                          transform, unit_quats)
from budget3d.runtime import write_bytes

EXT = "KHR_gaussian_splatting"
SPZ_EXT = "KHR_gaussian_splatting_compression_spz_2"
GLB_MAGIC, JSON_CHUNK, BIN_CHUNK = b"glTF", 0x4E4F534A, 0x004E4942
TO_GLTF = (-1, -1, 1)  # (x, y, z) -> (-x, -y, z): a half turn about z (and back)
FLOAT, ARRAY_BUFFER = 5126, 34962
COMPONENTS = {5120: ("i1", 127.0), 5121: ("u1", 255.0), 5122: ("<i2", 32767.0), 5123: ("<u2", 65535.0),
              5125: ("<u4", None), 5126: ("<f4", None)}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def _sh_names(k: int) -> list[str]:
    names = []
    for l in range(1, 4):
        names += [f"{EXT}:SH_DEGREE_{l}_COEF_{n}" for n in range(2 * l + 1)]
    return names[:k]


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


# ----------------------------------------------------------------------------- write


def encode(params, generator: str = "budget3d") -> bytes:
    """The .glb bytes of ``params`` (see the module notes)."""
    p = to_numpy(params)
    n = len(p["means"])
    if n == 0:
        raise UserError("no Gaussians to write")
    k = min(p["shN"].shape[1], 15)
    means, quats, shN = flip_axes(p["means"], unit_quats(p["quats"]), p["shN"][:, :k], TO_GLTF)
    rgb = np.clip(0.5 + C0 * p["sh0"].astype(np.float64), 0.0, 1.0)
    alpha = sigmoid(p["opacities"])
    color = np.concatenate([_srgb_to_linear(rgb), alpha[:, None].astype(np.float64)], 1)
    attrs = [("POSITION", means.astype("<f4"), "VEC3"),
             (f"{EXT}:ROTATION", quats[:, [1, 2, 3, 0]].astype("<f4"), "VEC4"),
             (f"{EXT}:SCALE", np.exp(p["scales"].astype(np.float64)).astype("<f4"), "VEC3"),
             (f"{EXT}:OPACITY", alpha.astype("<f4"), "SCALAR"),
             (f"{EXT}:SH_DEGREE_0_COEF_0", p["sh0"].astype("<f4"), "VEC3")]
    attrs += [(name, shN[:, i].astype("<f4"), "VEC3") for i, name in enumerate(_sh_names(k))]
    attrs.append(("COLOR_0", np.clip(np.rint(color * 255), 0, 255).astype(np.uint8), "VEC4"))

    blobs, views, accessors, attributes, offset = [], [], [], {}, 0
    for name, arr, typ in attrs:
        data = np.ascontiguousarray(arr).tobytes()
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": ARRAY_BUFFER})
        acc = {"bufferView": len(views) - 1, "componentType": 5121 if arr.dtype == np.uint8 else FLOAT,
               "count": n, "type": typ}
        if arr.dtype == np.uint8:
            acc["normalized"] = True
        if name == "POSITION":
            acc["min"], acc["max"] = arr.min(0).tolist(), arr.max(0).tolist()
        accessors.append(acc)
        attributes[name] = len(accessors) - 1
        pad = (-len(data)) % 4
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    binary = b"".join(blobs)
    doc = {
        "asset": {"version": "2.0", "generator": generator},
        "extensionsUsed": [EXT],
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": attributes, "mode": 0, "extensions": {EXT: {
            "kernel": "ellipse", "colorSpace": "srgb_rec709_display", "projection": "perspective",
            "sortingMethod": "cameraDistance"}}}]}],
        "accessors": accessors, "bufferViews": views, "buffers": [{"byteLength": len(binary)}],
    }
    js = json.dumps(doc, separators=(",", ":")).encode()
    js += b" " * ((-len(js)) % 4)
    total = 12 + 8 + len(js) + 8 + len(binary)
    return (struct.pack("<4sII", GLB_MAGIC, 2, total) + struct.pack("<II", len(js), JSON_CHUNK) + js
            + struct.pack("<II", len(binary), BIN_CHUNK) + binary)


def save_glb(params, path) -> int:
    """Write a ``.glb`` with ``KHR_gaussian_splatting``. Returns the number of Gaussians."""
    write_bytes(path, encode(params))
    return len(params["means"])


# ----------------------------------------------------------------------------- read


class _Doc:
    """A parsed glTF: its JSON and a way to get the bytes of a buffer view or an accessor."""

    def __init__(self, path: Path):
        self.path = path
        raw = read_bytes(path)
        self.glb_bin: Optional[bytes] = None
        if raw[:4] == GLB_MAGIC:
            self.json = self._parse_glb(raw)
        elif raw.lstrip()[:1] == b"{":
            self.json = self._parse_json(raw)
        else:
            raise self.bad("neither a binary glTF (no 'glTF' magic) nor glTF JSON")
        self._buffers: dict[int, bytes] = {}

    def bad(self, what: str) -> UserError:
        return UserError(f"{self.path}: {what}; give a .glb / .gltf with KHR_gaussian_splatting")

    def _parse_json(self, raw: bytes) -> dict:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.bad(f"its JSON does not parse ({' '.join(str(e).split())[:100]})") from None
        if not isinstance(doc, dict):
            raise self.bad("its JSON is not an object")
        return doc

    def _parse_glb(self, raw: bytes) -> dict:
        if len(raw) < 20:
            raise self.bad(f"{len(raw)} bytes is too short for a GLB header")
        _, version, length = struct.unpack_from("<4sII", raw, 0)
        if version != 2:
            raise self.bad(f"GLB container version {version} (glTF 2.0 files are version 2)")
        if length > len(raw):
            raise UserError(f"{self.path}: the GLB header says {length} bytes but the file has {len(raw)}; the file "
                            "is truncated, export or download it again")
        off, chunks = 12, []
        while off + 8 <= length:
            size, kind = struct.unpack_from("<II", raw, off)
            if off + 8 + size > length:
                raise UserError(f"{self.path}: a GLB chunk runs past the end of the file; the file is truncated")
            chunks.append((kind, raw[off + 8: off + 8 + size]))
            off += 8 + size
        if not chunks or chunks[0][0] != JSON_CHUNK:
            raise self.bad("the GLB does not start with a JSON chunk")
        doc = self._parse_json(chunks[0][1])
        self.glb_bin = next((c for kind, c in chunks[1:] if kind == BIN_CHUNK), None)
        return doc

    def _list(self, key: str) -> list:
        v = self.json.get(key, [])
        return v if isinstance(v, list) else []

    def _item(self, key: str, i) -> dict:
        items = self._list(key)
        if not isinstance(i, int) or not 0 <= i < len(items) or not isinstance(items[i], dict):
            raise self.bad(f"refers to {key}[{i}], which does not exist")
        return items[i]

    def buffer(self, i: int) -> bytes:
        if i in self._buffers:
            return self._buffers[i]
        b = self._item("buffers", i)
        uri = b.get("uri")
        if uri is None:
            if self.glb_bin is None:
                raise self.bad(f"buffers[{i}] has no uri and the file has no binary chunk")
            data = self.glb_bin
        elif uri.startswith("data:"):
            try:
                data = base64.b64decode(uri.split(",", 1)[1])
            except (ValueError, IndexError):
                raise self.bad(f"buffers[{i}] has a data URI that is not base64") from None
        else:
            f = self.path.parent / uri
            if not f.is_file():
                raise UserError(f"{self.path}: its buffer {uri} is not beside it; copy the .bin with the .gltf")
            data = f.read_bytes()
        if len(data) < int(b.get("byteLength", 0)):
            raise UserError(f"{self.path}: buffers[{i}] holds {len(data)} of its {b.get('byteLength')} bytes; "
                            "the file is truncated")
        self._buffers[i] = data
        return data

    def view(self, i: int) -> tuple[bytes, Optional[int]]:
        v = self._item("bufferViews", i)
        data = self.buffer(v.get("buffer", -1))
        start, length = int(v.get("byteOffset", 0)), int(v.get("byteLength", -1))
        if length < 0 or start + length > len(data):
            raise UserError(f"{self.path}: bufferViews[{i}] runs past its buffer; the file is damaged")
        return data[start:start + length], v.get("byteStride")

    def accessor(self, i: int, name: str) -> np.ndarray:
        a = self._item("accessors", i)
        if a.get("componentType") not in COMPONENTS or a.get("type") not in WIDTH:
            raise self.bad(f"accessor {i} ({name}) has component type {a.get('componentType')} / type {a.get('type')}")
        if "sparse" in a:
            raise self.bad(f"accessor {i} ({name}) is sparse, which splat attributes never are")
        dt, scale = COMPONENTS[a["componentType"]]
        width, count = WIDTH[a["type"]], int(a.get("count", 0))
        if "bufferView" not in a:
            raise self.bad(f"accessor {i} ({name}) has no buffer view (compressed by an extension we do not read)")
        data, stride = self.view(a["bufferView"])
        item = np.dtype(dt).itemsize * width
        stride = stride or item
        start = int(a.get("byteOffset", 0))
        if count and start + stride * (count - 1) + item > len(data):
            raise UserError(f"{self.path}: accessor {i} ({name}) runs past its buffer view; the file is damaged")
        arr = np.ndarray((count, width), dtype=dt, buffer=data, offset=start, strides=(stride, np.dtype(dt).itemsize))
        out = arr.astype(np.float64)
        if a.get("normalized") and scale:
            out = np.maximum(out / scale, -1.0)
        return out

    def world_matrices(self) -> list[tuple[int, np.ndarray]]:
        """(mesh index, 4x4 world matrix) of each node with a mesh in the default scene (every
        root node when the file names no scene)."""
        nodes = self._list("nodes")
        scenes = self._list("scenes")
        if scenes:
            s = self.json.get("scene", 0)
            roots = self._item("scenes", s).get("nodes", []) if isinstance(s, int) and s < len(scenes) else []
        else:
            children = {c for nd in nodes if isinstance(nd, dict) for c in nd.get("children", [])}
            roots = [i for i in range(len(nodes)) if i not in children]
        out, stack, seen = [], [(r, np.eye(4)) for r in roots], set()
        while stack:
            i, parent = stack.pop()
            if i in seen:
                raise self.bad("its node hierarchy has a cycle")
            seen.add(i)
            nd = self._item("nodes", i)
            world = parent @ _local_matrix(nd)
            if "mesh" in nd:
                out.append((nd["mesh"], world))
            stack += [(c, world) for c in nd.get("children", [])]
        if not out and not nodes:  # a bare mesh list: place each mesh as it is
            out = [(m, np.eye(4)) for m in range(len(self._list("meshes")))]
        return out


def _local_matrix(nd: dict) -> np.ndarray:
    if "matrix" in nd:
        return np.asarray(nd["matrix"], np.float64).reshape(4, 4).T  # glTF matrices are column-major
    from budget3d.export.splat_arrays import quat_to_mat

    m = np.eye(4)
    x, y, z, w = nd.get("rotation", [0, 0, 0, 1])
    m[:3, :3] = quat_to_mat(np.array([w, x, y, z], np.float64)) * np.asarray(nd.get("scale", [1, 1, 1]))[None, :]
    m[:3, 3] = nd.get("translation", [0, 0, 0])
    return m


def _primitive_arrays(doc: _Doc, prim: dict) -> dict[str, np.ndarray]:
    """The Gaussians of one splat primitive in glTF axes, as ``to_numpy`` arrays."""
    ext = prim["extensions"][EXT] or {}
    spz = (ext.get("extensions") or {}).get(SPZ_EXT) if isinstance(ext, dict) else None
    if spz is not None:
        from budget3d.export.splats import load_spz

        blob, _ = doc.view(spz.get("bufferView", -1))
        return to_numpy(load_spz(f"{doc.path} ({SPZ_EXT} stream)", convert=False, data=blob))
    attrs = prim.get("attributes", {})
    need = ["POSITION", f"{EXT}:ROTATION", f"{EXT}:SCALE", f"{EXT}:OPACITY", f"{EXT}:SH_DEGREE_0_COEF_0"]
    missing = [a for a in need if a not in attrs]
    if missing:
        raise doc.bad(f"its splat primitive lacks {', '.join(missing)}")
    get = lambda name: doc.accessor(attrs[name], name)  # noqa: E731
    means, rot, scale = get("POSITION"), get(need[1]), get(need[2])
    n = len(means)
    opacity, dc = get(need[3])[:, 0], get(need[4])
    for name, arr in ((need[1], rot), (need[2], scale), (need[3], opacity), (need[4], dc)):
        if len(arr) != n:
            raise doc.bad(f"{name} has {len(arr)} values for {n} positions")
    if (rot.shape[1], scale.shape[1], dc.shape[1], means.shape[1]) != (4, 3, 3, 3):
        raise doc.bad("a splat attribute has the wrong accessor type (ROTATION VEC4, SCALE / SH VEC3)")
    k = 0
    for l in (1, 2, 3):
        names = [f"{EXT}:SH_DEGREE_{l}_COEF_{c}" for c in range(2 * l + 1)]
        present = [nm in attrs for nm in names]
        if all(present):
            k = SH_COUNTS[l]
        elif any(present):
            raise doc.bad(f"SH degree {l} is partly defined (the extension requires all {2 * l + 1} coefficients)")
        else:
            break
    shN = np.stack([get(nm) for nm in _sh_names(k)], 1) if k else np.zeros((n, 0, 3))
    return {"means": means.astype(np.float32), "quats": unit_quats(rot[:, [3, 0, 1, 2]].astype(np.float32)),
            "scales": np.log(np.maximum(scale, 1e-30)).astype(np.float32),
            "opacities": logit(np.clip(opacity, 0.0, 1.0)), "sh0": dc.astype(np.float32),
            "shN": shN.astype(np.float32)}


def load_glb(path) -> dict[str, torch.Tensor]:
    """Read the ``KHR_gaussian_splatting`` primitives of a ``.glb`` / ``.gltf`` into our axes."""
    path = Path(path)
    doc = _Doc(path)
    parts = []
    for mesh_i, world in doc.world_matrices():
        for prim in doc._item("meshes", mesh_i).get("primitives", []):
            if isinstance(prim, dict) and EXT in (prim.get("extensions") or {}):
                if prim.get("mode", 4) != 0:
                    raise doc.bad(f"a {EXT} primitive has mode {prim.get('mode', 4)}, the extension requires POINTS (0)")
                parts.append(transform(_primitive_arrays(doc, prim), world))
    if not parts:
        used = doc.json.get("extensionsUsed", [])
        raise UserError(f"{path}: no mesh primitive uses {EXT} (extensions used: {', '.join(used) or 'none'}); "
                        "this glTF holds no Gaussian splats")
    k = min(pp["shN"].shape[1] for pp in parts)
    cat = {key: np.concatenate([pp[key][:, :k] if key == "shN" else pp[key] for pp in parts]) for key in parts[0]}
    means, quats, shN = flip_axes(cat["means"], cat["quats"], cat["shN"], TO_GLTF)
    return to_params(means, cat["scales"], quats, cat["opacities"], cat["sh0"], shN)
