"""Our splat files against an independent implementation: PlayCanvas' ``splat-transform`` (npm).

It reads our .ply / .splat / .spz and writes them back out as a float .ply, which must hold what
our own readers decode from the same files; and the .spz files it writes (v3 and v4) must decode,
with our reader, to the .ply they came from, within SPZ's quantisation.

How the package is had: ``npm install`` of the pinned version into a cache folder on first use
(``$BUDGET3D_NPM_CACHE``, default ``~/.cache/budget3d/npm``), reused afterwards. It is not
vendored because with its dependencies (the playcanvas engine and a native WebGPU binding) it is
~215 MB; it is a test oracle only, never used by budget3d itself. The tests skip only when node/npm
are absent or the registry cannot be reached (the reason says which); any other failure fails.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from budget3d.export.splats import load_any, load_spz
from budget3d.splat import load_ply

PACKAGE, VERSION = "@playcanvas/splat-transform", "3.7.0"


@pytest.fixture(scope="session")
def splat_transform():
    """argv prefix that runs splat-transform with node."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed: the independent splat-transform check needs Node.js")
    cache = Path(os.environ.get("BUDGET3D_NPM_CACHE", Path.home() / ".cache" / "budget3d" / "npm"))
    prefix = cache / f"splat-transform-{VERSION}"
    cli = prefix / "node_modules" / "@playcanvas" / "splat-transform" / "bin" / "cli.mjs"
    if not cli.is_file():
        prefix.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts",
                            "--no-save", f"{PACKAGE}@{VERSION}"], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            tail = " ".join((r.stderr or r.stdout).split())[-300:]
            pytest.skip(f"cannot install {PACKAGE}@{VERSION} from the npm registry: {tail}")
    assert cli.is_file(), f"npm install succeeded but {cli} is missing"
    out = subprocess.run([node, str(cli), "--version"], capture_output=True, text=True, timeout=60)
    assert VERSION in out.stdout + out.stderr
    return [node, str(cli)]


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
