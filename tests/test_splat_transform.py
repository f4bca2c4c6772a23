"""Our splat files against independent implementations: PlayCanvas' ``splat-transform`` (npm) and
the Khronos ``gltf-validator`` (npm).

splat-transform reads our .ply / .splat / .spz / .sog (bundle and folder) / .compressed.ply and
writes them back out as a float .ply, which must hold what our own readers decode from the same
files; the .spz (v3, v4), .sog and .compressed.ply files it writes must decode, with our reader,
to the .ply they came from within each format's quantisation (and, for its SOG, to exactly what it
decodes itself); the .glb it writes must read back as the .ply it came from, exactly: the same
axis change as ours. No splat-transform release reads glTF (3.7.0 here, and 3.10.2, the newest on
npm when this was written, list no .glb input), so our GLB is checked by the validator and by our
reader instead.

gltf-validator (2.0.0-dev.3.10, the newest release) does not know ``KHR_gaussian_splatting``: it
reports the extension as unsupported (an info) and every ``KHR_gaussian_splatting:*`` attribute
name as MESH_PRIMITIVE_INVALID_ATTRIBUTE, an error, because it accepts only core and ``_``-prefixed
semantics (KhronosGroup/glTF-Validator#252, open). splat-transform's own GLB gets the same errors.
The test allows exactly those and nothing else: no other error, no warning.

How the package is had: ``npm install`` of the pinned version into a cache folder on first use
(``$BUDGET3D_NPM_CACHE``, default ``~/.cache/budget3d/npm``), reused afterwards. It is not
vendored because with its dependencies (the playcanvas engine and a native WebGPU binding) it is
~215 MB; it is a test oracle only, never used by budget3d itself. The tests skip only when node/npm
are absent or the registry cannot be reached (the reason says which); any other failure fails.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from budget3d.export.splats import load_any, load_spz, save_any
from budget3d.splat import load_ply, save_ply

PACKAGE, VERSION = "@playcanvas/splat-transform", "3.7.0"
VALIDATOR, VALIDATOR_VERSION = "gltf-validator", "2.0.0-dev.3.10"


def npm_package(package: str, version: str, entry: str) -> tuple[str, Path]:
    """(node, folder of the installed package): ``npm install`` of the pinned version into the cache
    on first use. Skips only without node/npm or when the registry cannot be reached."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip(f"node/npm not installed: the independent {package} check needs Node.js")
    cache = Path(os.environ.get("BUDGET3D_NPM_CACHE", Path.home() / ".cache" / "budget3d" / "npm"))
    prefix = cache / f"{package.rsplit('/', 1)[-1]}-{version}"
    folder = prefix / "node_modules" / package
    if not (folder / entry).is_file():
        prefix.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts",
                            "--no-save", f"{package}@{version}"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            tail = " ".join((r.stderr or r.stdout).split())[-300:]
            pytest.skip(f"cannot install {package}@{version} from the npm registry: {tail}")
    assert (folder / entry).is_file(), f"npm install succeeded but {folder / entry} is missing"
    assert json.loads((folder / "package.json").read_text())["version"] == version
    return node, folder


@pytest.fixture(scope="session")
def splat_transform():
    """argv prefix that runs splat-transform with node."""
    node, folder = npm_package(PACKAGE, VERSION, "bin/cli.mjs")
    cli = folder / "bin" / "cli.mjs"
    out = subprocess.run([node, str(cli), "--version"], capture_output=True, text=True, timeout=60)
    assert VERSION in out.stdout + out.stderr
    return [node, str(cli)]


@pytest.fixture(scope="session")
def gltf_validator():
    """A function path -> the validator's report (dict) for a .glb."""
    node, folder = npm_package(VALIDATOR, VALIDATOR_VERSION, "package.json")
    script = folder.parents[1] / "validate.mjs"  # beside node_modules, so the import resolves
    script.write_text("import v from 'gltf-validator';\nimport fs from 'fs';\n"
                      "const r = await v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), "
                      "{maxIssues: 0});\nconsole.log(JSON.stringify(r));\n")

    def validate(path):
        r = subprocess.run([node, str(script), str(path)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-500:]
        return json.loads(r.stdout)
    return validate


def convert(tool, src: Path, dst: Path, *flags):
    r = subprocess.run(tool + ["-q", "-w", *flags, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"splat-transform {src.name} -> {dst.name} failed: {r.stderr[-500:]}"
    assert dst.is_file()
    return dst


def assert_same(ours: dict, theirs: dict, what: str, pos_atol=1e-6, quat_atol=1e-5, col_atol=1e-5):
    """Same Gaussians in the same order: positions, scales, opacities (as alphas), colours,
    rotations (up to the sign of the quaternion), higher SH."""
    n = len(ours["means"])
    assert n > 0 and len(theirs["means"]) == n, f"{what}: {len(theirs['means'])} Gaussians, expected {n}"
    close = lambda a, b, atol, name: np.testing.assert_allclose(  # noqa: E731
        a.numpy(), b.numpy(), atol=atol, rtol=0, err_msg=f"{what}: {name}")
    close(ours["means"], theirs["means"], pos_atol, "means")
    close(ours["scales"], theirs["scales"], 1e-4, "log-scales")
    close(torch.sigmoid(ours["opacities"]), torch.sigmoid(theirs["opacities"]), 1e-4, "alphas")
    close(ours["sh0"], theirs["sh0"], col_atol, "SH DC")
    qa = ours["quats"] / ours["quats"].norm(dim=1, keepdim=True)
    qb = theirs["quats"] / theirs["quats"].norm(dim=1, keepdim=True)
    qb = qb * torch.sign((qa * qb).sum(1, keepdim=True) + 1e-12)
    close(qa, qb, quat_atol, "rotations")
    k = ours["shN"].shape[1]
    assert theirs["shN"].shape[1] == k, f"{what}: {theirs['shN'].shape[1]} SH rest coefficients, expected {k}"
    if k:
        close(ours["shN"], theirs["shN"], col_atol, "SH rest")


@pytest.mark.parametrize("fmt", ["ply", "splat", "spz"])
def test_splat_transform_reads_our_files(exported_run, splat_transform, tmp_path, fmt):
    src = exported_run / "export" / f"gaussians.{fmt}"
    theirs = load_ply(convert(splat_transform, src, tmp_path / f"theirs-{fmt}.ply"))
    # splat-transform keeps SPZ's stored (right-up-back) axes, so compare with ours read unconverted
    ours = load_spz(src, convert=False) if fmt == "spz" else load_any(src)
    # .splat stores uint8 rotations: the two readers normalise (v - 128) / 128 in a slightly different order
    assert_same(ours, theirs, f"{fmt} read by splat-transform", quat_atol=1e-2 if fmt == "splat" else 1e-5)
    if fmt == "spz":  # and the axis change is exactly the one our reader undoes
        conv = load_spz(src)
        np.testing.assert_allclose(conv["means"].numpy(), theirs["means"].numpy() * np.array([1, -1, -1]), atol=1e-6)


@pytest.mark.parametrize("version", ["3", "4"])
def test_our_spz_reader_reads_splat_transform_spz(exported_run, splat_transform, tmp_path, version):
    ply = exported_run / "export" / "gaussians.ply"
    theirs = load_spz(convert(splat_transform, ply, tmp_path / f"theirs-v{version}.spz", "--spz-version", version),
                      convert=False)
    # splat-transform writes SPZ without an axis change, our writer converts to right-up-back:
    # their file read as it is equals ours read with the conversion (positions may round one
    # fixed-point step apart, 12 fraction bits; everything else is bit-identical)
    pos_step = 2.0 ** -12 * 1.01
    assert_same(load_spz(exported_run / "export" / "gaussians.spz"), theirs, f"their SPZ v{version} read by us",
                pos_atol=pos_step)
    orig = load_ply(ply)  # and it holds the .ply it came from, within SPZ's quantisation
    np.testing.assert_allclose(theirs["means"].numpy(), orig["means"].numpy(), atol=pos_step)
    np.testing.assert_allclose(torch.sigmoid(theirs["opacities"]).numpy(), torch.sigmoid(orig["opacities"]).numpy(),
                               atol=0.5 / 255 + 1e-6)


# ----------------------------------------------------------------------------- SOG, compressed.ply, glTF


@pytest.fixture(scope="module")
def sh3_ply(tmp_path_factory):
    """2,000 Gaussians with SH degree 3 (the exported run's are degree 1), as a float .ply."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_export_splats import random_params

    p = random_params(n=2000, sh_degree=3, seed=21)
    p["quats"] = torch.nn.functional.normalize(p["quats"], dim=1)
    path = tmp_path_factory.mktemp("sh3") / "g.ply"
    save_ply(p, path)
    return path


@pytest.mark.parametrize("target", ["g.sog", "folder/meta.json", "g.compressed.ply"])
def test_splat_transform_reads_our_sog_and_compressed_ply(sh3_ply, splat_transform, tmp_path, target):
    ours_file = tmp_path / target
    save_any(load_ply(sh3_ply), ours_file, "compressed-ply" if target.endswith(".compressed.ply") else "sog")
    theirs = load_ply(convert(splat_transform, ours_file, tmp_path / "theirs.ply"))
    # the same Gaussians in the file's order: SOG decodes bit for bit alike (same formulas, float32),
    # compressed.ply to float rounding
    assert_same(load_any(ours_file), theirs, f"our {target} read by splat-transform", pos_atol=1e-6, quat_atol=1e-6)


def test_our_readers_read_splat_transform_sog_and_compressed_ply(sh3_ply, splat_transform, tmp_path):
    orig = load_ply(sh3_ply)
    for name in ("theirs.sog", "theirs.compressed.ply"):
        # -g cpu: splat-transform's SOG k-means uses WebGPU unless told not to
        theirs = load_any(convert(splat_transform, sh3_ply, tmp_path / name, "-g", "cpu"))
        # their file, decoded by them, is what we decode
        assert_same(theirs, load_ply(convert(splat_transform, tmp_path / name, tmp_path / f"{name}.ply")),
                    f"their {name}: our reader against theirs", pos_atol=1e-6, quat_atol=1e-5)
        # and it holds the .ply it came from (in splat-transform's own Morton order, not ours: each
        # decoded Gaussian is matched to the nearest original, and those are distinct)
        near = torch.cdist(theirs["means"], orig["means"]).argmin(1)
        a = {k: v[near] for k, v in orig.items()}
        assert len(near.unique()) == len(near)
        assert (a["means"] - theirs["means"]).abs().max() < 2e-3, name
        assert (torch.sigmoid(a["opacities"]) - torch.sigmoid(theirs["opacities"])).abs().max() < 1.5 / 255, name
        assert (a["scales"] - theirs["scales"]).abs().max() < 0.05, name
        assert (0.28209479 * (a["sh0"] - theirs["sh0"])).abs().max() < 0.01, name
        dots = (a["quats"] * torch.nn.functional.normalize(theirs["quats"], dim=1)).sum(1).abs()
        assert dots.min() > 0.999, name


def test_our_glb_reader_reads_splat_transform_glb_exactly(sh3_ply, splat_transform, tmp_path):
    """splat-transform writes glTF in engine axes (its PLY transform is a half turn about z): our
    reader, undoing our own half turn about z, gets the .ply back float for float, SH included."""
    from budget3d.export.splat_arrays import quat_to_mat

    orig = load_ply(sh3_ply)
    theirs = load_any(convert(splat_transform, sh3_ply, tmp_path / "theirs.glb"))
    for k in ("means", "sh0", "shN"):
        assert torch.equal(orig[k], theirs[k]), k
    assert torch.allclose(orig["scales"], theirs["scales"], atol=1e-6)
    assert (torch.sigmoid(orig["opacities"]) - torch.sigmoid(theirs["opacities"])).abs().max() < 1e-6
    # rotations: they turn each Gaussian by the half turn (q -> r q), we conjugate (q -> r q r^-1);
    # the two differ by a half turn about the Gaussian's own z axis, which leaves the ellipsoid
    # (its covariance) unchanged: compare covariances
    def cov(p):
        r = quat_to_mat(torch.nn.functional.normalize(p["quats"], dim=1).double().numpy())
        rs = r * np.exp(p["scales"].double().numpy())[:, None, :]
        return rs @ rs.transpose(0, 2, 1)

    np.testing.assert_allclose(cov(theirs), cov(orig), rtol=1e-4, atol=1e-9)  # exp/log of float32 scales


def validator_errors(report) -> tuple[list, list]:
    """(errors other than the extension's attribute names, warnings) of a validator report."""
    msgs = report["issues"]["messages"]
    known = [m for m in msgs if m["severity"] == 0 and m["code"] == "MESH_PRIMITIVE_INVALID_ATTRIBUTE"
             and m["pointer"].rsplit("/", 1)[-1].startswith("KHR_gaussian_splatting:")]
    return [m for m in msgs if m["severity"] == 0 and m not in known], [m for m in msgs if m["severity"] == 1]


def test_gltf_validator_finds_no_errors_in_our_glb(sh3_ply, gltf_validator, splat_transform, tmp_path):
    save_any(load_ply(sh3_ply), tmp_path / "ours.glb")
    report = gltf_validator(tmp_path / "ours.glb")
    assert report["validatorVersion"] == VALIDATOR_VERSION
    errors, warnings = validator_errors(report)
    assert not errors and not warnings, errors + warnings
    msgs = report["issues"]["messages"]
    # the one accepted error: the 19 extension attribute names (4 + 15 SH at degree 3) it does not know
    assert report["issues"]["numErrors"] == 19
    assert any(m["code"] == "UNSUPPORTED_EXTENSION" and "KHR_gaussian_splatting" in m["message"] for m in msgs)
    assert report["info"]["drawCallCount"] == 1 and report["info"]["totalVertexCount"] == 2000
    # splat-transform's GLB of the same splats draws exactly the same verdict
    theirs = gltf_validator(convert(splat_transform, sh3_ply, tmp_path / "theirs.glb"))
    assert validator_errors(theirs) == ([], []) and theirs["issues"]["numErrors"] == 19
    # and the validator does find real faults: a POSITION max that is wrong is an error
    raw = (tmp_path / "ours.glb").read_bytes()
    jlen = int.from_bytes(raw[12:16], "little")
    doc = json.loads(raw[20:20 + jlen])
    pos = doc["accessors"][doc["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    pos["max"] = [v - 0.5 for v in pos["max"]]
    js = json.dumps(doc).encode()
    js += b" " * ((-len(js)) % 4)
    rest = raw[20 + jlen:]
    (tmp_path / "bad.glb").write_bytes(b"glTF" + (2).to_bytes(4, "little") + (20 + len(js) + len(rest)).to_bytes(4, "little")
                                       + len(js).to_bytes(4, "little") + raw[16:20] + js + rest)
    errors, _ = validator_errors(gltf_validator(tmp_path / "bad.glb"))
    assert any(m["code"] == "ACCESSOR_MAX_MISMATCH" for m in errors), errors
