"""SOG, glTF (KHR_gaussian_splatting) and compressed.ply: our writers read back by our readers within
each format's stated quantisation, the byte layout each format specifies, the glTF axis change
(checked by rendering), other writers' glTF layouts (node transforms, interleaving, .gltf JSON,
Cesium's SPZ stream), one-line errors for damaged files, `budget3d export` and the bench variants,
and Spark drawing a SOG in headless Chromium. splat-transform and gltf-validator checks are in
test_splat_transform.py."""

import base64
import json
import math
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from budget3d.cli import main
from budget3d.errors import UserError
from budget3d.export import compressed_ply, gltf, sog
from budget3d.export.splat_arrays import C0, morton_order, quat_to_mat, transform
from budget3d.export.splats import FILES, load_any, save_any, save_spz, sniff
from budget3d.scene.camera import Camera
from budget3d.splat import load_ply, render
from test_export_splats import random_params

N = 3000


def permuted(p, order):
    idx = torch.as_tensor(np.asarray(order))
    return {k: v[idx] for k, v in p.items()}


def alphas(p):
    return torch.sigmoid(p["opacities"])


def rot_dots(a, b):
    na = torch.nn.functional.normalize(a["quats"], dim=1)
    nb = torch.nn.functional.normalize(b["quats"], dim=1)
    return (na * nb).sum(1).abs()


@pytest.fixture(scope="module")
def params():
    """3,000 Gaussians with SH degree 3, an opacity of exactly 0 (sh0 alpha 0) and far-out splats."""
    p = random_params(n=N, sh_degree=3, seed=11)
    p["opacities"][5] = -30.0
    p["means"][7] = torch.tensor([40.0, -25.0, 3.0])
    return p


def one_line(e: pytest.ExceptionInfo, *words):
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def refused(path, *words):
    """Reading ``path`` is a one-line error holding ``words``."""
    with pytest.raises(UserError) as e:
        load_any(path)
    one_line(e, *words)


# ----------------------------------------------------------------------------- compressed.ply


def test_compressed_ply_layout_and_round_trip_within_its_bounds(params, tmp_path):
    path = tmp_path / "g.compressed.ply"
    assert save_any(params, path) == N and sniff(path) == "compressed-ply"
    from plyfile import PlyData

    ply = PlyData.read(str(path))
    nc = math.ceil(N / 256)
    assert len(ply["chunk"].data) == nc and len(ply["vertex"].data) == N and len(ply["sh"].data) == N
    assert list(ply["chunk"].data.dtype.names) == list(compressed_ply.CHUNK_PROPS)
    # 16 bytes a Gaussian + 72 a chunk + 45 bytes of degree-3 SH
    header = path.read_bytes().index(b"end_header\n") + len(b"end_header\n")
    assert path.stat().st_size == header + nc * 72 + N * 16 + N * 45

    q = load_any(path)
    a = permuted(params, morton_order(params["means"].numpy()))  # written in Morton order
    ch = ply["chunk"].data
    ci = np.arange(N) // 256
    span = lambda key: torch.as_tensor(np.stack([ch[f"max_{key}{x}"] - ch[f"min_{key}{x}"]  # noqa: E731
                                                 for x in ("xyz" if key in ("", "scale_") else "rgb")], 1)[ci])
    steps = torch.tensor([2047.0, 1023.0, 2047.0])
    assert ((a["means"] - q["means"]).abs() <= span("") / steps / 2 + 1e-5).all()
    assert ((a["scales"] - q["scales"]).abs() <= span("scale_") / steps / 2 + 1e-5).all()
    col = lambda p: 0.5 + C0 * p["sh0"][:, 0]  # noqa: E731
    col_span = torch.as_tensor(np.stack([ch[f"max_{c}"] - ch[f"min_{c}"] for c in "rgb"], 1)[ci])
    assert ((col(a) - col(q)).abs() <= col_span / 255 / 2 + 1e-5).all()
    assert (alphas(a) - alphas(q)).abs().max() <= 0.5 / 255 + 1e-6
    assert rot_dots(a, q).min() > 1 - 1e-5  # components within 0.5/1023*sqrt(2)
    assert (a["shN"] - q["shN"]).abs().max() <= 1 / 64 + 1e-6  # |SH| < 4 here: the bin's centre
    # a file whose sort is off keeps the given order
    compressed_ply.save_compressed_ply(params, tmp_path / "u.compressed.ply", sort=False)
    assert torch.allclose(load_any(tmp_path / "u.compressed.ply")["means"], params["means"], atol=0.02)


# ----------------------------------------------------------------------------- SOG


@pytest.fixture(scope="module")
def sog_files(params, tmp_path_factory):
    d = tmp_path_factory.mktemp("sog")
    assert sog.save_sog(params, d / "g.sog") == N
    assert save_any(params, d / "folder" / "meta.json", "sog") == N
    return d / "g.sog", d / "folder"


def test_sog_bundle_and_folder_hold_the_same_lossless_webp_files(sog_files):
    bundle, folder = sog_files
    assert sniff(bundle) == "sog" and sniff(folder) == "sog" and sniff(folder / "meta.json") == "sog"
    with zipfile.ZipFile(bundle) as z:
        names = z.namelist()
        assert set(names) == set(sog.FILES["means"] + sog.FILES["scales"] + sog.FILES["quats"] + sog.FILES["sh0"]
                                 + sog.FILES["shN"] + ["meta.json"])  # at the archive's root
        for name in names:
            data = z.read(name)
            assert z.getinfo(name).compress_type == zipfile.ZIP_STORED
            assert data == (folder / name).read_bytes(), name
            if name.endswith(".webp"):
                assert data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8L", name  # VP8L: lossless
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["version"] == 2 and meta["count"] == N
    assert len(meta["scales"]["codebook"]) == len(meta["sh0"]["codebook"]) == len(meta["shN"]["codebook"]) == 256
    assert meta["shN"]["bands"] == 3 and meta["shN"]["count"] == sog.palette_size(N) == 2048
    from PIL import Image

    w = math.ceil(math.sqrt(N) / 4) * 4
    for name in ("means_l.webp", "quats.webp", "sh0.webp", "shN_labels.webp"):
        assert Image.open(folder / name).size == (w, math.ceil(N / w / 4) * 4), name
    assert Image.open(folder / "shN_centroids.webp").size == (64 * 15, 2048 // 64)
    assert torch.equal(load_any(bundle)["means"], load_any(folder)["means"])


def test_sog_round_trip_within_its_quantisation(params, sog_files):
    bundle, folder = sog_files
    meta = json.loads((folder / "meta.json").read_text())
    q = load_any(bundle)
    a = permuted(params, morton_order(params["means"].numpy()))
    # positions: half a 16-bit step of the log-domain range, back through sign(v)(e^|v| - 1)
    step = torch.tensor(np.subtract(meta["means"]["maxs"], meta["means"]["mins"]), dtype=torch.float32) / 65535
    bound = 0.5 * step * torch.exp(torch.log1p(a["means"].abs()) + step)
    assert ((a["means"] - q["means"]).abs() <= bound + 1e-6).all()
    assert (a["means"] - q["means"]).abs().max() > 0  # and it is quantised, not float
    # log-scales and DC: the nearest entry of the 256-level codebook
    for key, book in (("scales", "scales"), ("sh0", "sh0")):
        cb = torch.tensor(meta[book]["codebook"])
        want = cb[(a[key].reshape(N, -1, 1) - cb).abs().argmin(-1)].reshape(q[key].shape)
        assert torch.allclose(q[key], want, atol=1e-6), key
    i5 = int(np.nonzero(morton_order(params["means"].numpy()) == 5)[0][0])
    assert alphas(q)[i5] < 1e-5 and (q["sh0"][i5] != 0).any()  # alpha 0 kept its colour (exact WebP)
    assert (alphas(a) - alphas(q)).abs().max() <= 0.5 / 255 + 1e-6
    assert rot_dots(a, q).min() > 1 - 2e-4  # three components within 0.5/255*sqrt(2)
    # higher SH: each Gaussian's palette entry, every value one of the codebook's 256
    cb = torch.tensor(meta["shN"]["codebook"])
    assert ((q["shN"].reshape(-1, 1) - cb).abs().min(1).values < 1e-6).all()
    assert (a["shN"] - q["shN"]).abs().mean() < 0.5 * a["shN"].abs().mean()


def test_sog_sh_palette_is_exact_for_few_distinct_sh(tmp_path):
    """With fewer distinct SH vectors than palette entries, every Gaussian gets its own vector back,
    rounded only by the 256-level codebook."""
    p = random_params(n=2000, sh_degree=1, seed=3)
    p["shN"] = p["shN"][torch.arange(2000) % 40]
    sog.save_sog(p, tmp_path / "g.sog")
    q = load_any(tmp_path / "g.sog")
    meta = json.loads(zipfile.ZipFile(tmp_path / "g.sog").read("meta.json"))
    cb = torch.tensor(meta["shN"]["codebook"])
    a = permuted(p, morton_order(p["means"].numpy()))
    want = cb[(a["shN"].reshape(-1, 1) - cb).abs().argmin(1)].reshape(a["shN"].shape)
    assert torch.allclose(q["shN"], want, atol=1e-6)
    assert meta["shN"]["bands"] == 1 and meta["shN"]["count"] == 1024


def test_sog_without_higher_sh_and_version_1(tmp_path):
    p = random_params(n=700, sh_degree=0, seed=4)
    sog.save_sog(p, tmp_path / "d0.sog")
    meta = json.loads(zipfile.ZipFile(tmp_path / "d0.sog").read("meta.json"))
    assert "shN" not in meta and load_any(tmp_path / "d0.sog")["shN"].shape == (700, 0, 3)
    # a version-1 folder (per-axis min/max, count in means.shape): the older SOG files still read
    d = tmp_path / "v1"
    d.mkdir()
    n, w = 700, 28
    order = morton_order(p["means"].numpy())
    a = permuted(p, order)
    m = a["means"].double().numpy()
    lm = np.sign(m) * np.log1p(np.abs(m))
    lo, hi = lm.min(0), lm.max(0)
    q16 = np.rint((lm - lo) / (hi - lo) * 65535).astype(np.int64)
    img = lambda cols, alpha=255: np.stack(  # noqa: E731
        [np.pad(c, (0, w * w - n)) for c in cols] + [np.full(w * w, alpha)], 1).reshape(w, w, 4)
    s = a["scales"].numpy()
    smin, smax = s.min(0), s.max(0)
    dc = np.concatenate([a["sh0"][:, 0].numpy(), a["opacities"].numpy()[:, None]], 1)
    dmin, dmax = dc.min(0), dc.max(0)
    files = {"means_l.webp": img([q16[:, i] & 255 for i in range(3)]), "means_u.webp": img([q16[:, i] >> 8 for i in range(3)]),
             "scales.webp": img([np.rint((s[:, i] - smin[i]) / (smax[i] - smin[i]) * 255) for i in range(3)]),
             "sh0.webp": np.pad(np.rint((dc - dmin) / (dmax - dmin) * 255), ((0, w * w - n), (0, 0))).reshape(w, w, 4),
             "quats.webp": img([np.full(n, 127.5)] * 3, 252)}
    for name, arr in files.items():
        (d / name).write_bytes(sog._webp(arr.astype(np.uint8)))
    (d / "meta.json").write_text(json.dumps({
        "means": {"shape": [n, 3], "mins": lo.tolist(), "maxs": hi.tolist(), "files": ["means_l.webp", "means_u.webp"]},
        "scales": {"shape": [n, 3], "mins": smin.tolist(), "maxs": smax.tolist(), "files": ["scales.webp"]},
        "quats": {"shape": [n, 4], "files": ["quats.webp"]},
        "sh0": {"shape": [n, 1, 4], "mins": dmin.tolist(), "maxs": dmax.tolist(), "files": ["sh0.webp"]}}))
    q = load_any(d)
    assert len(q["means"]) == n
    assert (q["means"] - a["means"]).abs().max() < 1e-3
    assert ((q["scales"] - a["scales"]).abs() <= torch.as_tensor(smax - smin) / 255 / 2 + 1e-5).all()
    assert ((q["sh0"][:, 0] - a["sh0"][:, 0]).abs() <= torch.as_tensor(dmax[:3] - dmin[:3]) / 255 / 2 + 1e-5).all()


# ----------------------------------------------------------------------------- glTF


def glb_parts(path):
    """(JSON, BIN) of a .glb, parsed here by hand (independently of our reader)."""
    raw = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", raw)
    assert (magic, version, length) == (b"glTF", 2, len(raw))
    jlen, jtype = struct.unpack_from("<II", raw, 12)
    blen, btype = struct.unpack_from("<II", raw, 20 + jlen)
    assert jtype == 0x4E4F534A and btype == 0x004E4942 and jlen % 4 == 0 and blen % 4 == 0
    return json.loads(raw[20:20 + jlen]), raw[28 + jlen:28 + jlen + blen]


def attribute(doc, binary, name):
    acc = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"][name]]
    view = doc["bufferViews"][acc["bufferView"]]
    assert view["byteOffset"] % 4 == 0
    dt = {5126: "<f4", 5121: "u1"}[acc["componentType"]]
    width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[acc["type"]]
    return np.frombuffer(binary, dt, acc["count"] * width, view["byteOffset"]).reshape(acc["count"], width)


def test_glb_layout_follows_the_extension(params, tmp_path):
    path = tmp_path / "g.glb"
    assert save_any(params, path) == N and sniff(path) == "glb"
    doc, binary = glb_parts(path)
    prim = doc["meshes"][0]["primitives"][0]
    assert prim["mode"] == 0 and doc["extensionsUsed"] == ["KHR_gaussian_splatting"]
    assert prim["extensions"]["KHR_gaussian_splatting"] == {
        "kernel": "ellipse", "colorSpace": "srgb_rec709_display", "projection": "perspective",
        "sortingMethod": "cameraDistance"}
    ext = "KHR_gaussian_splatting:"
    sh = [f"{ext}SH_DEGREE_{l}_COEF_{n}" for l in (1, 2, 3) for n in range(2 * l + 1)]
    assert set(prim["attributes"]) == {"POSITION", "COLOR_0", f"{ext}ROTATION", f"{ext}SCALE", f"{ext}OPACITY",
                                       f"{ext}SH_DEGREE_0_COEF_0", *sh}
    types = {name: (doc["accessors"][i]["type"], doc["accessors"][i]["componentType"])
             for name, i in prim["attributes"].items()}
    assert types[f"{ext}ROTATION"] == ("VEC4", 5126) and types[f"{ext}SCALE"] == ("VEC3", 5126)
    assert types[f"{ext}OPACITY"] == ("SCALAR", 5126) and types["COLOR_0"] == ("VEC4", 5121)
    assert all(types[s] == ("VEC3", 5126) for s in sh)
    assert doc["accessors"][prim["attributes"]["COLOR_0"]]["normalized"] is True
    pos = attribute(doc, binary, "POSITION")
    acc = doc["accessors"][prim["attributes"]["POSITION"]]
    np.testing.assert_array_equal(acc["min"], pos.min(0))
    np.testing.assert_array_equal(acc["max"], pos.max(0))
    # +Y up: the half turn about z, (x, y, z) -> (-x, -y, z); rotations (w, -x, -y, z) stored x y z w
    np.testing.assert_array_equal(pos, params["means"].numpy() * [-1, -1, 1])
    q = torch.nn.functional.normalize(params["quats"], dim=1).numpy()
    np.testing.assert_allclose(attribute(doc, binary, f"{ext}ROTATION"), q[:, [1, 2, 3, 0]] * [-1, -1, 1, 1],
                               atol=1e-6)
    np.testing.assert_allclose(attribute(doc, binary, f"{ext}SCALE"), np.exp(params["scales"].numpy()), rtol=1e-6)
    np.testing.assert_allclose(attribute(doc, binary, f"{ext}OPACITY")[:, 0], alphas(params).numpy(), atol=1e-7)
    # degree 1 is (y, z, x): y and x change sign, z does not
    d1 = np.stack([attribute(doc, binary, s) for s in sh[:3]], 1)
    np.testing.assert_array_equal(d1, params["shN"][:, :3].numpy() * np.array([-1, 1, -1])[None, :, None])
    # COLOR_0: the clamped DC colour, sRGB decoded to linear, alpha the opacity
    srgb = np.clip(0.5 + C0 * params["sh0"][:, 0].numpy(), 0, 1)
    lin = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)
    col = attribute(doc, binary, "COLOR_0") / 255.0
    assert np.abs(col[:, :3] - lin).max() <= 0.5 / 255 + 1e-6
    assert np.abs(col[:, 3] - alphas(params).numpy()).max() <= 0.5 / 255 + 1e-6


def test_glb_round_trip_is_float_exact(params, tmp_path):
    save_any(params, tmp_path / "g.glb")
    q = load_any(tmp_path / "g.glb")
    assert torch.equal(q["means"], params["means"]) and torch.equal(q["sh0"], params["sh0"])
    assert torch.equal(q["shN"], params["shN"])
    assert torch.allclose(q["scales"], params["scales"], atol=1e-6)
    assert (alphas(q) - alphas(params)).abs().max() < 1e-6
    assert rot_dots(q, params).min() > 1 - 1e-6


def test_glb_axes_render_the_same_image(params, tmp_path):
    """The file's Gaussians, read in glTF axes as they are stored, seen by a camera carried by the same
    half turn, render the image ours render: positions, rotations and view-dependent SH all agree."""
    from budget3d.export.splats import look_at

    p = random_params(n=400, sh_degree=3, seed=12)
    p["shN"] = p["shN"] * 3  # strong view dependence, so a wrong SH sign shows
    save_any(p, tmp_path / "g.glb")
    doc, binary = glb_parts(tmp_path / "g.glb")
    ext = "KHR_gaussian_splatting:"
    names = [f"{ext}SH_DEGREE_{l}_COEF_{n}" for l in (1, 2, 3) for n in range(2 * l + 1)]
    raw = {"means": torch.tensor(attribute(doc, binary, "POSITION").copy()),
           "quats": torch.tensor(attribute(doc, binary, f"{ext}ROTATION")[:, [3, 0, 1, 2]].copy()),
           "scales": torch.log(torch.tensor(attribute(doc, binary, f"{ext}SCALE").copy())),
           "opacities": torch.logit(torch.tensor(attribute(doc, binary, f"{ext}OPACITY")[:, 0].copy())),
           "sh0": torch.tensor(attribute(doc, binary, f"{ext}SH_DEGREE_0_COEF_0").copy())[:, None],
           "shN": torch.tensor(np.stack([attribute(doc, binary, s) for s in names], 1).copy())}
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    for eye in ([2.5, 0.4, -1.0], [-0.8, -2.2, 1.4]):
        cam = look_at(eye, [0, 0, 0], 96)
        ours = render(p, cam, backend="torch").image
        cam_g = Camera(cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height, cam.world_to_camera @ flip)
        theirs = render(raw, cam_g, backend="torch").image
        assert (ours - theirs).abs().max() < 1e-4
        unflipped = dict(raw, shN=raw["shN"] * -1)  # a wrong SH sign is visible in this test
        assert (ours - render(unflipped, cam_g, backend="torch").image).abs().max() > 0.05


def _rewrite_glb(path, doc, binary):
    js = json.dumps(doc).encode()
    js += b" " * ((-len(js)) % 4)
    binary += b"\0" * ((-len(binary)) % 4)
    path.write_bytes(struct.pack("<4sII", b"glTF", 2, 28 + len(js) + len(binary)) + struct.pack("<II", len(js), 0x4E4F534A)
                     + js + struct.pack("<II", len(binary), 0x004E4942) + binary)


def test_glb_node_transforms_are_applied(tmp_path):
    """A node's rotation, translation and uniform scale move means, rotations and SH together (the
    same image from a camera moved along); a non-uniform scale keeps the covariance M S S^T M^T."""
    from budget3d.export.splats import look_at

    p = random_params(n=300, sh_degree=2, seed=13)
    save_any(p, tmp_path / "g.glb")
    doc, binary = glb_parts(tmp_path / "g.glb")
    ang = 0.7
    axis = np.array([0.3, 0.8, -0.5]) / np.linalg.norm([0.3, 0.8, -0.5])
    quat = [*(axis * math.sin(ang / 2)), math.cos(ang / 2)]  # glTF xyzw
    doc["nodes"] = [{"children": [1], "translation": [0.2, -0.1, 0.4]}, {"mesh": 0, "rotation": quat}]
    doc["scenes"] = [{"nodes": [0]}]
    _rewrite_glb(tmp_path / "t.glb", doc, binary)
    q = load_any(tmp_path / "t.glb")
    # the node's world matrix in our axes: F T F with F the half turn about z
    t = np.eye(4)
    t[:3, :3] = quat_to_mat(np.array([quat[3], *quat[:3]]))
    t[:3, 3] = [0.2, -0.1, 0.4]
    f = np.diag([-1.0, -1.0, 1.0, 1.0])
    m = f @ t @ f
    np.testing.assert_allclose(q["means"].numpy(), p["means"].numpy() @ m[:3, :3].T + m[:3, 3], atol=1e-5)
    cam = look_at([2.0, -0.5, 1.5], [0.1, 0, 0.3], 96)
    moved = Camera(cam.fx, cam.fy, cam.cx, cam.cy, 96, 96, cam.world_to_camera @ m)
    assert (render(q, cam, backend="torch").image - render(p, moved, backend="torch").image).abs().max() < 1e-3

    doc["nodes"] = [{"mesh": 0, "scale": [2.0, 0.5, 1.0]}]
    _rewrite_glb(tmp_path / "s.glb", doc, binary)
    s = load_any(tmp_path / "s.glb")
    lin = np.diag([2.0, 0.5, 1.0])  # F diag F = diag for a diagonal scale

    def cov(pp):
        r = quat_to_mat(torch.nn.functional.normalize(pp["quats"], dim=1).double().numpy())
        rs = r * np.exp(pp["scales"].double().numpy())[:, None, :]
        return rs @ rs.transpose(0, 2, 1)

    np.testing.assert_allclose(cov(s), lin @ cov(p) @ lin.T, atol=1e-6)
    assert transform({"means": np.zeros((1, 3), np.float32)}, np.eye(4))["means"].shape == (1, 3)


def test_gltf_json_interleaved_views_and_cesium_spz_stream(params, tmp_path):
    p = random_params(n=500, sh_degree=1, seed=14)
    save_any(p, tmp_path / "g.glb")
    ref = load_any(tmp_path / "g.glb")
    doc, binary = glb_parts(tmp_path / "g.glb")
    # .gltf JSON with the buffer as a data URI
    doc_j = json.loads(json.dumps(doc))
    doc_j["buffers"] = [{"byteLength": len(binary), "uri": "data:application/octet-stream;base64,"
                         + base64.b64encode(binary).decode()}]
    (tmp_path / "g.gltf").write_text(json.dumps(doc_j))
    assert sniff(tmp_path / "g.gltf") == "glb"
    q = load_any(tmp_path / "g.gltf")
    assert all(torch.equal(q[k], ref[k]) for k in ref)
    # position and scale interleaved in one buffer view (byteStride 24)
    ext = "KHR_gaussian_splatting:"
    pos, sca = attribute(doc, binary, "POSITION"), attribute(doc, binary, f"{ext}SCALE")
    inter = np.concatenate([pos, sca], 1).astype("<f4").tobytes()
    doc_i = json.loads(json.dumps(doc))
    doc_i["bufferViews"].append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(inter), "byteStride": 24})
    attrs = doc_i["meshes"][0]["primitives"][0]["attributes"]
    doc_i["accessors"][attrs["POSITION"]].update(bufferView=len(doc_i["bufferViews"]) - 1, byteOffset=0)
    doc_i["accessors"][attrs[f"{ext}SCALE"]].update(bufferView=len(doc_i["bufferViews"]) - 1, byteOffset=12)
    doc_i["buffers"][0]["byteLength"] = len(binary) + len(inter)
    _rewrite_glb(tmp_path / "i.glb", doc_i, binary + inter)
    q = load_any(tmp_path / "i.glb")
    assert all(torch.equal(q[k], ref[k]) for k in ref)
    # Cesium's KHR_gaussian_splatting_compression_spz_2: an SPZ stream (glTF axes) in a buffer view
    from budget3d.export.splat_arrays import flip_axes

    m, qq, sh = flip_axes(p["means"].numpy(), p["quats"].numpy(), p["shN"].numpy(), (-1, -1, 1))
    save_spz(dict(p, means=torch.tensor(m), quats=torch.tensor(qq), shN=torch.tensor(sh)), tmp_path / "g.spz",
             convert=False)
    blob = (tmp_path / "g.spz").read_bytes()
    blob += b"\0" * ((-len(blob)) % 4)
    doc_s = {"asset": {"version": "2.0"}, "extensionsUsed": ["KHR_gaussian_splatting", gltf.SPZ_EXT],
             "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
             "buffers": [{"byteLength": len(blob)}], "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": len(blob)}],
             "accessors": [{"componentType": 5126, "count": 500, "type": "VEC3"}],
             "meshes": [{"primitives": [{"mode": 0, "attributes": {"POSITION": 0}, "extensions": {
                 "KHR_gaussian_splatting": {"kernel": "ellipse", "colorSpace": "srgb_rec709_display",
                                            "extensions": {gltf.SPZ_EXT: {"bufferView": 0}}}}}]}]}
    _rewrite_glb(tmp_path / "cesium.glb", doc_s, blob)
    q = load_any(tmp_path / "cesium.glb")
    assert (q["means"] - p["means"]).abs().max() <= 2.0 ** -12
    assert (alphas(q) - alphas(p)).abs().max() <= 0.5 / 255 + 1e-6
    assert rot_dots(q, p).min() > 0.999


# ----------------------------------------------------------------------------- damaged files


def test_damaged_files_are_one_line_errors(params, sog_files, tmp_path):
    bundle, folder = sog_files
    small = random_params(n=300, sh_degree=1, seed=15)
    save_any(small, tmp_path / "g.glb")
    save_any(small, tmp_path / "g.compressed.ply")
    raw = bundle.read_bytes()

    (tmp_path / "cut.sog").write_bytes(raw[: len(raw) // 2])
    refused(tmp_path / "cut.sog", "cut.sog", "damaged or truncated")

    with zipfile.ZipFile(tmp_path / "nometa.sog", "w") as z, zipfile.ZipFile(bundle) as src:
        for name in src.namelist():
            if name != "meta.json":
                z.writestr(name, src.read(name))
    refused(tmp_path / "nometa.sog", "nometa.sog", "no meta.json")

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    meta = json.loads((broken / "meta.json").read_text())
    del meta["means"]["mins"], meta["sh0"]["codebook"]
    (broken / "meta.json").write_text(json.dumps(meta))
    refused(broken, "meta.json", "lacks means.mins, sh0.codebook")

    meta = json.loads((folder / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps(dict(meta, version=3)))
    refused(broken / "meta.json", "SOG version 3")

    (broken / "meta.json").write_text(json.dumps(meta))
    (broken / "quats.webp").write_bytes((folder / "quats.webp").read_bytes()[:40])
    refused(broken, "quats.webp", "not a readable WebP")
    (broken / "quats.webp").unlink()
    refused(broken, "quats.webp", "copy the SOG folder whole")

    glb = (tmp_path / "g.glb").read_bytes()
    (tmp_path / "cut.glb").write_bytes(glb[: len(glb) - 100])
    refused(tmp_path / "cut.glb", "cut.glb", "truncated")
    (tmp_path / "magic.glb").write_bytes(b"GLTF" + glb[4:])
    refused(tmp_path / "magic.glb", "magic.glb", "damaged or not a .glb")
    doc, binary = glb_parts(tmp_path / "g.glb")
    del doc["meshes"][0]["primitives"][0]["extensions"]
    doc["extensionsUsed"] = []
    _rewrite_glb(tmp_path / "points.glb", doc, binary)
    refused(tmp_path / "points.glb", "points.glb", "no mesh primitive uses KHR_gaussian_splatting")

    cp = (tmp_path / "g.compressed.ply").read_bytes()
    (tmp_path / "cut.compressed.ply").write_bytes(cp[: len(cp) - 500])
    refused(tmp_path / "cut.compressed.ply", "cut.compressed.ply", "damaged or truncated")


# ----------------------------------------------------------------------------- CLI and bench


def test_cli_exports_and_bench_renders_each_format(exported_run, tmp_path, capsys):
    """``budget3d export --format sog,glb,compressed-ply`` writes and sizes the files, and the bench
    renders what each decodes to: the float glTF loses nothing, the quantised formats a little."""
    from budget3d.export import bench

    run = tmp_path / "run"
    run.mkdir()
    for name in ("gaussians.ply", "config.json"):
        shutil.copy(exported_run / name, run / name)
    code = main(["export", str(run), "--format", "sog,glb,compressed-ply"])
    out, err = capsys.readouterr()
    assert code == 0, err
    n = len(load_ply(run / "gaussians.ply")["means"])
    for fmt in ("sog", "glb", "compressed-ply"):
        f = run / "export" / FILES[fmt]
        line = next(ln for ln in out.splitlines() if ln.startswith(fmt + " "))
        assert str(f) in line and f"{n} Gaussians" in line and ("kB" in line or "MB" in line)
        assert len(load_any(f)["means"]) == n
    result = bench.run_bench(run, quick=True, threads=(1,), progress=False, max_views=2)
    by = {v["name"]: v for v in result["variants"]}
    assert {"3dgs", "3dgs-sog", "3dgs-glb", "3dgs-compressed-ply"} <= set(by)
    assert by["3dgs-glb"]["psnr_vs_teacher"] is None or by["3dgs-glb"]["psnr_vs_teacher"] > 70
    for name in ("3dgs-sog", "3dgs-compressed-ply"):
        assert 30 < by[name]["psnr_vs_teacher"] < 90, (name, by[name]["psnr_vs_teacher"])
    for name in ("3dgs-sog", "3dgs-glb", "3dgs-compressed-ply"):
        assert by[name]["size_mb"] == pytest.approx((run / by[name]["file"]).stat().st_size / 1e6, abs=1e-6)
    assert "3dgs-compressed-ply" in bench.table(result)


# ----------------------------------------------------------------------------- Spark


def test_spark_draws_our_sog_in_chromium(exported_run, tmp_path, capsys):
    """The vendored Spark (2.2.0, which reads .sog bundles) draws our SOG of the run as our own
    rasteriser draws the run at the page's pose (and not at a pose turned 0.5 rad). SOG keeps the
    .ply's axes, so the page draws it without the SPZ flip."""
    import test_export_web as tw
    from budget3d.export import web

    if not tw.HAVE_BROWSER:
        pytest.skip(f"needs Playwright and Chromium at {web.CHROMIUM}")
    from playwright.sync_api import sync_playwright

    run = tmp_path / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("web", "bench*"))
    assert main(["export", str(run), "--format", "web"]) == 0
    site = run / "export" / "web"
    sog.save_sog(load_ply(run / "gaussians.ply"), site / "gaussians.sog")
    cfg = tw.cfg_of(site)
    cfg["splats"]["file"] = "gaussians.sog"
    cfg["splats"]["flip_yz"] = False
    cfg["splats"].pop("lod", None)
    cfg.pop("lod", None)
    (site / "config.json").write_text(json.dumps(cfg))
    (site / "gaussians.spz").unlink()  # the page can only have drawn the SOG
    server, url = web.serve_in_thread(site)
    try:
        with sync_playwright() as pw:
            browser, pg = web.open_page(pw, url)
            pg.set_default_timeout(120_000)
            pg.evaluate("window.b3d.reset()")
            c2w = np.asarray(pg.evaluate("window.b3d.c2w()"), np.float64).reshape(4, 4)
            shot = tw.splat_image(pg, cfg["background"], size=(128, 128))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    same = tw.splat_reference(run, cfg, c2w)
    turned = tw.splat_reference(run, cfg, tw.orbit(c2w, cfg["camera"]["target"], cfg["camera"]["up"], 0.5))
    p_same, p_turned = tw.psnr(shot, same), tw.psnr(shot, turned)
    with capsys.disabled():
        print(f"\nSpark's SOG vs our rasteriser: {p_same:.1f} dB at the page's pose, {p_turned:.1f} dB turned 0.5 rad")
    assert p_same > 22 and p_same > p_turned + 4, (p_same, p_turned)


def test_eval_and_view_take_any_splat_file(exported_run, tmp_path, capsys):
    """Another tool's file needs no run folder: ``budget3d eval FILE --data SCENE`` scores it on the
    scene's test views (a float-exact GLB scores as the run's own .ply does, a SOG within its
    quantisation), and the viewer opens it (splats only; cameras from --data)."""
    import json as _json

    from budget3d.cli import main
    from budget3d.export.splats import load_any, save_any
    from budget3d.splat import load_ply
    from viewer import engine

    params = load_ply(exported_run / "gaussians.ply")
    scene = _json.loads((exported_run / "config.json").read_text())["data"]
    for name in ("g.glb", "g.sog"):
        save_any(params, tmp_path / name)
    assert main(["eval", str(exported_run), "--json"]) == 0
    run_psnr = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr"]
    got = {}
    for name in ("g.glb", "g.sog"):
        assert main(["eval", str(tmp_path / name), "--data", scene, "--json"]) == 0
        got[name] = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["psnr"]
    # (this run's Gaussians are the scene's own: 61 dB, where SOG's quantisation shows as ~1 dB)
    assert abs(got["g.glb"] - run_psnr) < 1e-3 and run_psnr - 2 < got["g.sog"] < run_psnr, (run_psnr, got)
    code = main(["eval", str(tmp_path / "g.glb")])
    assert code != 0 and "--data SCENE" in capsys.readouterr().err

    run = engine.Run.open(tmp_path / "g.glb", data=scene)
    assert run.n_gaussians == len(params["means"]) and run.cameras["test"] and run.student is None
    cam = run.cameras["test"][0][1]
    img, _ = engine.render_splats(run, cam)
    ref, _ = engine.render_splats(engine.Run.open(exported_run), cam)
    assert np.abs(img - ref).max() < 1e-4
    assert len(load_any(tmp_path / "g.glb")["means"]) == run.n_gaussians


def test_export_converts_and_prunes_a_splat_file(exported_run, tmp_path, capsys):
    """``budget3d export FILE --format ... --budget N``: another tool's file into our formats, its
    most important N kept (orbit-view scores: a file has no scene); NeLF formats need a run."""
    from budget3d.cli import main
    from budget3d.export.splats import load_any, save_any
    from budget3d.splat import load_ply

    params = load_ply(exported_run / "gaussians.ply")
    src = tmp_path / "scene.sog"
    save_any(params, src)
    assert main(["export", str(src), "--format", "glb,spz", "--budget", "40"]) == 0
    out = tmp_path / "scene-export"
    for name in ("gaussians.glb", "gaussians.spz"):
        assert len(load_any(out / name)["means"]) == 40
    assert "orbit views" in capsys.readouterr().out
    code = main(["export", str(src), "--format", "onnx"])
    assert code != 0 and "run folder" in capsys.readouterr().err
