"""Splat export and import: ply / .splat / .spz round trips within each format's quantisation,
a render of a round-tripped model, other tools' files from shared/data (skipped when absent),
re-pruning to a budget, and `budget3d export` for the splat formats."""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from budget3d.cli import main
from budget3d.export import (
    importance, load_any, load_compressed_ply, load_splat, load_spz, look_at, orbit_cameras, orbit_scores,
    read_spz_streams, reprune, save_splat, save_spz, sniff,
)
from budget3d.export.splats import _unpack_smallest_three
from budget3d.splat import load_ply, render, save_ply
from conftest import SHARED_DATA

C0 = 0.28209479177387814
SPLATS = SHARED_DATA / "splats"
BIKER_PLY, BIKER_SPZ, GUITAR = SPLATS / "biker.compressed.ply", SPLATS / "biker.spz", SPLATS / "guitar.compressed.ply"
needs = lambda *p: pytest.mark.skipif(not all(f.is_file() for f in p), reason="shared/data/splats absent")  # noqa: E731


def random_params(n=500, sh_degree=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    k = (sh_degree + 1) ** 2 - 1
    return {
        "means": (u(n, 3) - 0.5) * 2.0,
        "scales": torch.log(0.01 + 0.05 * u(n, 3)),
        "quats": torch.randn(n, 4, generator=g) * 3,
        "opacities": torch.logit(0.05 + 0.9 * u(n)),
        "sh0": ((0.05 + 0.9 * u(n, 1, 3)) - 0.5) / C0,
        "shN": (u(n, k, 3) - 0.5) * 0.6,
    }


def by_position(p):
    """Rows sorted by position (.splat reorders Gaussians; positions identify them)."""
    m = p["means"].numpy()
    order = np.lexsort((m[:, 2], m[:, 1], m[:, 0]))
    return {k: v[torch.as_tensor(order)] for k, v in p.items()}


def unit(q):
    return torch.nn.functional.normalize(q, dim=-1)


def assert_rotations_close(a, b, min_dot):
    dot = (unit(a) * unit(b)).sum(-1).abs()
    assert dot.min() > min_dot, dot.min()


# ----------------------------------------------------------------------------- round trips


def test_ply_round_trip_is_exact(tmp_path):
    p = random_params()
    save_ply(p, tmp_path / "g.ply")
    q = load_any(tmp_path / "g.ply")
    for k in p:
        assert torch.equal(p[k], q[k]), k


def test_splat_round_trip_within_quantisation(tmp_path):
    p = random_params(sh_degree=1)
    n = save_splat(p, tmp_path / "g.splat")
    assert n == 500 and (tmp_path / "g.splat").stat().st_size == 32 * 500
    q = load_splat(tmp_path / "g.splat")
    assert sniff(tmp_path / "g.splat") == "splat" and len(load_any(tmp_path / "g.splat")["means"]) == 500
    a, b = by_position(p), by_position(q)
    assert torch.equal(a["means"], b["means"])
    assert torch.allclose(a["scales"], b["scales"], atol=1e-5)
    assert (C0 * (a["sh0"] - b["sh0"])).abs().max() <= 0.5 / 255 + 1e-5
    assert (torch.sigmoid(a["opacities"]) - torch.sigmoid(b["opacities"])).abs().max() <= 0.5 / 255 + 1e-5
    assert_rotations_close(a["quats"], b["quats"], 0.99)
    assert b["shN"].shape == (500, 0, 3)


def test_splat_is_sorted_by_size_times_opacity(tmp_path):
    p = random_params(n=200)
    save_splat(p, tmp_path / "g.splat")
    q = load_splat(tmp_path / "g.splat")
    key = torch.exp(p["scales"].sum(1)) * torch.sigmoid(p["opacities"])
    assert torch.equal(q["means"], p["means"][torch.argsort(-key)])


@pytest.mark.parametrize("version", [2, 3, 4])
def test_spz_round_trip_within_quantisation(tmp_path, version):
    if version == 4:
        pytest.importorskip("zstandard")
    p = random_params(sh_degree=3)
    path = tmp_path / "g.spz"
    assert save_spz(p, path, version=version) == 500
    head = path.read_bytes()[: 4 if version == 4 else 2]
    assert head == (b"NGSP" if version == 4 else b"\x1f\x8b")
    q = load_spz(path)
    assert sniff(path) == "spz" and len(load_any(path)["means"]) == 500
    assert q["shN"].shape == p["shN"].shape
    assert (p["means"] - q["means"]).abs().max() <= 0.5 / 4096 + 1e-6
    assert (p["scales"] - q["scales"]).abs().max() <= 0.5 / 16 + 1e-5
    assert (torch.sigmoid(p["opacities"]) - torch.sigmoid(q["opacities"])).abs().max() <= 0.5 / 255 + 1e-5
    assert (C0 * (p["sh0"] - q["sh0"])).abs().max() <= C0 * 0.5 / 255 / 0.15 + 1e-5
    assert_rotations_close(p["quats"], q["quats"], 0.99 if version == 2 else 0.9995)
    # SH rest: 5 bits for degree 1, 4 bits above (Niantic's defaults), 8-bit grid of 1/128
    assert (p["shN"][:, :3] - q["shN"][:, :3]).abs().max() <= 4.5 / 128 + 1e-5
    assert (p["shN"][:, 3:] - q["shN"][:, 3:]).abs().max() <= 8.5 / 128 + 1e-5


def test_spz_keeps_far_scenes_by_using_fewer_fraction_bits(tmp_path):
    p = random_params(n=50, sh_degree=0)
    p["means"] = p["means"] * 5000  # beyond 2^11 units: 12 fraction bits would overflow 24 bits
    save_spz(p, tmp_path / "far.spz")
    q = load_spz(tmp_path / "far.spz")
    assert (p["means"] - q["means"]).abs().max() < 0.05


def test_render_of_round_tripped_splat_matches(tmp_path):
    p = random_params(n=400, sh_degree=1, seed=3)
    p["scales"] = torch.log(0.02 + 0.06 * torch.rand(400, 3, generator=torch.Generator().manual_seed(4)))
    save_splat(p, tmp_path / "g.splat")
    q = load_splat(tmp_path / "g.splat")
    cam = look_at([0.3, -0.4, -3.0], [0, 0, 0], size=64)
    bg = torch.ones(3)
    a = render(p, cam, backend="torch", sh_degree=0, background=bg).image
    b = render(q, cam, backend="torch", sh_degree=0, background=bg).image
    assert (a - bg).abs().max() > 0.2  # something was drawn
    psnr = -10 * torch.log10(((a - b) ** 2).mean())
    assert psnr > 30, psnr


def pack_compressed_ply(p, path):
    """A minimal PlayCanvas-style packer (one chunk per 256 splats), for a reader test without shared/."""
    from plyfile import PlyData, PlyElement

    n = len(p["means"])
    m, s = p["means"].numpy(), p["scales"].numpy()
    rgb = (0.5 + C0 * p["sh0"].reshape(n, 3)).numpy()
    a = torch.sigmoid(p["opacities"]).numpy()
    q = unit(p["quats"]).numpy()
    nc = (n + 255) // 256
    names = [f"{w}_{c}" for w in ("min", "max") for c in "xyz"]
    names += [f"{w}_scale_{c}" for w in ("min", "max") for c in "xyz"]
    names += [f"{w}_{c}" for w in ("min", "max") for c in "rgb"]
    chunk = np.zeros(nc, [(k, "<f4") for k in names])

    def unorm(v, lo, hi, bits):
        t = np.clip((v - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
        return np.rint(t * ((1 << bits) - 1)).astype(np.uint32)

    pos, sca, col = (np.zeros(n, np.uint32) for _ in range(3))
    for c in range(nc):
        sl = slice(c * 256, min(n, c * 256 + 256))
        for arr, pre in ((m, ""), (s, "scale_")):
            lo, hi = arr[sl].min(0), arr[sl].max(0)
            for i, ax in enumerate("xyz"):
                chunk[f"min_{pre}{ax}"][c], chunk[f"max_{pre}{ax}"][c] = lo[i], hi[i]
            packed = (unorm(arr[sl, 0], lo[0], hi[0], 11) << 21) | (unorm(arr[sl, 1], lo[1], hi[1], 10) << 11) \
                | unorm(arr[sl, 2], lo[2], hi[2], 11)
            (pos if pre == "" else sca)[sl] = packed
        lo, hi = rgb[sl].min(0), rgb[sl].max(0)
        for i, ch in enumerate("rgb"):
            chunk[f"min_{ch}"][c], chunk[f"max_{ch}"][c] = lo[i], hi[i]
        col[sl] = (unorm(rgb[sl, 0], lo[0], hi[0], 8) << 24) | (unorm(rgb[sl, 1], lo[1], hi[1], 8) << 16) \
            | (unorm(rgb[sl, 2], lo[2], hi[2], 8) << 8) | unorm(a[sl], 0, 1, 8)
    big = np.abs(q).argmax(1)
    q = q * np.where(q[np.arange(n), big] < 0, -1, 1)[:, None]
    rot = big.astype(np.uint32)
    for i in range(4):
        rot = np.where(big == i, rot, (rot << 10) | unorm(q[:, i] * math.sqrt(0.5) + 0.5, 0, 1, 10))
    vert = np.zeros(n, [("packed_position", "<u4"), ("packed_rotation", "<u4"), ("packed_scale", "<u4"),
                        ("packed_color", "<u4")])
    vert["packed_position"], vert["packed_rotation"], vert["packed_scale"], vert["packed_color"] = pos, rot, sca, col
    PlyData([PlyElement.describe(chunk, "chunk"), PlyElement.describe(vert, "vertex")], byte_order="<").write(str(path))


def test_compressed_ply_reader_on_a_packed_file(tmp_path):
    p = random_params(n=600, sh_degree=0, seed=5)
    pack_compressed_ply(p, tmp_path / "c.ply")
    assert sniff(tmp_path / "c.ply") == "compressed-ply"
    q = load_any(tmp_path / "c.ply")
    assert len(q["means"]) == 600
    assert (p["means"] - q["means"]).abs().max() <= 2.0 / 1023 * 0.5 + 1e-5  # chunk range <= 2, 10 bits
    assert (p["scales"] - q["scales"]).abs().max() <= 2.0 / 1023 * 0.5 + 1e-4
    assert (C0 * (p["sh0"] - q["sh0"])).abs().max() <= 1.0 / 255 * 0.5 + 1e-4
    assert (torch.sigmoid(p["opacities"]) - torch.sigmoid(q["opacities"])).abs().max() <= 0.5 / 255 + 1e-5
    assert_rotations_close(p["quats"], q["quats"], 0.999)


def test_bad_files_are_user_errors(tmp_path):
    from budget3d.errors import UserError

    (tmp_path / "x.splat").write_bytes(b"\0" * 33)
    (tmp_path / "x.spz").write_bytes(b"NGSP" + b"\0" * 8)
    for f in ("x.splat", "x.spz", "missing.spz"):
        with pytest.raises(UserError):
            load_any(tmp_path / f)


SPLAT_TRANSFORM = os.environ.get("BUDGET3D_SPLAT_TRANSFORM") or shutil.which("splat-transform")


@pytest.mark.skipif(not SPLAT_TRANSFORM, reason="PlayCanvas splat-transform not installed (npm i -g "
                    "@playcanvas/splat-transform, or set BUDGET3D_SPLAT_TRANSFORM to its path)")
def test_playcanvas_splat_transform_reads_and_writes_what_we_do(tmp_path):
    """An independent implementation: it decodes our files as we do, and we read its files.
    splat-transform keeps SPZ axes as they are, hence convert=False on our side for .spz."""
    p = random_params(n=300, sh_degree=3, seed=7)
    save_ply(p, tmp_path / "ours.ply")
    save_splat(p, tmp_path / "ours.splat")
    save_spz(p, tmp_path / "ours3.spz")
    save_spz(p, tmp_path / "ours4.spz", version=4)

    def convert(src, dst):
        subprocess.run([SPLAT_TRANSFORM, "-w", str(src), str(dst)], check=True, capture_output=True, timeout=120)

    for src in ("ours.ply", "ours.splat", "ours3.spz", "ours4.spz"):
        convert(tmp_path / src, tmp_path / f"theirs_{src}.ply")
        theirs = load_ply(tmp_path / f"theirs_{src}.ply")
        ours = load_spz(tmp_path / src, convert=False) if src.endswith(".spz") else load_any(tmp_path / src)
        assert len(theirs["means"]) == 300, src
        assert torch.allclose(theirs["means"], ours["means"], atol=1e-6), src
        assert torch.allclose(theirs["scales"], ours["scales"], atol=1e-5), src
        assert torch.allclose(torch.sigmoid(theirs["opacities"]), torch.sigmoid(ours["opacities"]), atol=1e-5), src
        assert torch.allclose(theirs["sh0"], ours["sh0"], atol=1e-4), src
        assert torch.allclose(theirs["shN"], ours["shN"], atol=1e-4), src
        assert_rotations_close(theirs["quats"], ours["quats"], 0.9999)
    # their writers, our readers; splat-transform 3.7 writes .splat rotations without normalising
    # them (q*128+128 clipped), so give it unit quaternions
    p["quats"] = unit(p["quats"])
    save_ply(p, tmp_path / "unit.ply")
    for fmt in ("splat", "spz"):
        convert(tmp_path / "unit.ply", tmp_path / f"theirs.{fmt}")
        q = load_spz(tmp_path / "theirs.spz", convert=False) if fmt == "spz" else load_any(tmp_path / "theirs.splat")
        a, b = (by_position(p), by_position(q)) if fmt == "splat" else (p, q)
        assert len(b["means"]) == 300
        assert (a["means"] - b["means"]).abs().max() < 1e-3, fmt
        assert (torch.sigmoid(a["opacities"]) - torch.sigmoid(b["opacities"])).abs().max() < 1.5 / 255, fmt
        assert (C0 * (a["sh0"] - b["sh0"])).abs().max() < 0.01, fmt
        assert_rotations_close(a["quats"], b["quats"], 0.99)
    # their compressed.ply (Morton-ordered, with an "sh" element) through our reader
    convert(tmp_path / "unit.ply", tmp_path / "theirs.compressed.ply")
    q = load_any(tmp_path / "theirs.compressed.ply")
    a = {k: v[torch.cdist(q["means"], p["means"]).argmin(1)] for k, v in p.items()}
    assert len(q["means"]) == 300 and q["shN"].shape == (300, 15, 3)
    assert (a["means"] - q["means"]).abs().max() < 2e-3
    assert (a["scales"] - q["scales"]).abs().max() < 2e-3
    assert (a["shN"] - q["shN"]).abs().max() <= 4.0 / 256 + 1e-5  # 8 bits over [-4, 4)
    assert (C0 * (a["sh0"] - q["sh0"])).abs().max() < 0.5 / 255 * 1.5
    assert_rotations_close(a["quats"], q["quats"], 0.9999)


# ----------------------------------------------------------------------------- budget


def test_reprune_keeps_the_most_important_in_order():
    p = random_params(n=300)
    imp = importance(p)
    q = reprune(p, 100, imp)
    assert all(len(v) == 100 for v in q.values())
    kept = torch.topk(imp, 100).indices.sort().values
    assert torch.equal(q["means"], p["means"][kept])
    assert len(reprune(p, 100)["means"]) == 100  # default: orbit Taming score
    assert len(reprune(p, 1000)["means"]) == 300
    scores = torch.arange(300.0)
    assert torch.equal(reprune(p, 10, scores)["means"], p["means"][290:])


# ----------------------------------------------------------------------------- other tools' files


@needs(BIKER_PLY, BIKER_SPZ)
def test_biker_compressed_ply_and_spz_load_and_agree():
    a = load_compressed_ply(BIKER_PLY)
    b = load_any(BIKER_SPZ)
    assert len(a["means"]) == len(b["means"]) == 152_746
    assert b["shN"].shape == (152_746, 0, 3)  # SH degree 0
    # the same splats in the same order: positions within SPZ's 1/4096 grid plus the packed .ply's 11-10-11 bits
    d = (a["means"] - b["means"]).abs().max(1).values
    assert d.max() < 2e-3 and d.median() < 3e-4, (d.max(), d.median())
    assert_rotations_close(a["quats"], b["quats"], 0.999)
    assert (torch.sigmoid(a["opacities"]) - torch.sigmoid(b["opacities"])).abs().max() < 2 / 255
    assert (C0 * (a["sh0"] - b["sh0"])).abs().median() < 0.01
    # log-scales agree except where SPZ's [-10, 6) range clips
    inside = (a["scales"] > -9.9).all(1)
    assert (a["scales"] - b["scales"])[inside].abs().max() < 0.05


@needs(BIKER_SPZ)
def test_biker_spz_re_encoded_as_v4_matches_the_original_streams(tmp_path):
    pytest.importorskip("zstandard")
    save_spz(load_spz(BIKER_SPZ), tmp_path / "b.spz", version=4)
    h0, s0 = read_spz_streams(BIKER_SPZ)
    h1, s1 = read_spz_streams(tmp_path / "b.spz")
    assert h0 == h1 and h0["version"] == 4
    for i in range(4):  # positions, alphas, colours, scales: byte for byte
        assert s0[i] == s1[i], i
    # rotations: the same values but for the sign bit of zero components (-0 vs 0), and a handful
    # whose two largest components tie within the quantisation step (either may be dropped)
    r0, r1 = (_unpack_smallest_three(np.frombuffer(s, "<u4")) for s in (s0[4], s1[4]))
    assert (r0 != r1).any(1).sum() <= 10
    assert np.abs((r0 * r1).sum(1)).min() > 0.999


@needs(BIKER_PLY)
def test_biker_reprune_by_orbit_taming_score_beats_opacity_times_area():
    p = load_any(BIKER_PLY)
    held_out = orbit_cameras(p, 4, size=128, phase=1.9)  # not the scoring views

    def psnr(q):
        vals = []
        for cam in held_out:
            a = render(p, cam, backend="cpu", sh_degree=0, background=torch.zeros(3)).image
            b = render(q, cam, backend="cpu", sh_degree=0, background=torch.zeros(3)).image
            vals.append(float(-10 * torch.log10(((a - b) ** 2).mean())))
        return min(vals)

    taming = psnr(reprune(p, 50_000, orbit_scores(p)))
    plain = psnr(reprune(p, 50_000, importance(p)))
    assert taming > 33 and taming > plain + 3, (taming, plain)


@needs(GUITAR)
def test_guitar_compressed_ply_loads():
    p = load_any(GUITAR)
    assert len(p["means"]) == 90_854
    assert torch.isfinite(p["means"]).all() and torch.isfinite(p["scales"]).all()


@needs(BIKER_PLY)
def test_biker_renders_a_non_blank_view(tmp_path):
    p = load_any(BIKER_PLY)
    center = p["means"].median(0).values.numpy()
    extent = float((p["means"].quantile(0.95, 0) - p["means"].quantile(0.05, 0)).norm())
    cam = look_at(center + np.array([0.0, -0.3, -1.5]) * extent, center, size=64)
    out = render(p, cam, backend="cpu", sh_degree=0, background=torch.zeros(3))
    assert out.alpha.mean() > 0.05 and out.image.std() > 0.01, (out.alpha.mean(), out.image.std())
    # and our own files of it render the same
    save_splat(p, tmp_path / "b.splat")
    q = load_splat(tmp_path / "b.splat")
    b = render(q, cam, backend="cpu", sh_degree=0, background=torch.zeros(3)).image
    assert -10 * torch.log10(((out.image - b) ** 2).mean()) > 30


# ----------------------------------------------------------------------------- CLI


def test_cli_export_writes_every_splat_format(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_ply(random_params(n=300, sh_degree=3), run / "gaussians.ply")
    code = main(["export", str(run), "--format", "ply,splat,spz", "--budget", "200"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ex = run / "export"
    assert (ex / "gaussians.splat").stat().st_size == 32 * 200
    assert len(load_ply(ex / "gaussians.ply")["means"]) == 200
    assert len(load_spz(ex / "gaussians.spz")["means"]) == 200
    for fmt in ("ply", "splat", "spz"):
        assert f"gaussians.{fmt}" in out and "200 Gaussians" in out
    code = main(["export", str(run), "--format", "splat", "--out", str(tmp_path / "o")])
    capsys.readouterr()
    assert code == 0 and (tmp_path / "o" / "gaussians.splat").stat().st_size == 32 * 300


def test_cli_export_budget_uses_the_taming_score_of_the_runs_views(tmp_path, capsys):
    import json

    from budget3d.scene import load_scene
    from budget3d.splat import init_from_points
    from budget3d.train import TrainConfig
    from test_train import write_blender_scene

    root = write_blender_scene(tmp_path / "scene")
    run = tmp_path / "run"
    run.mkdir()
    scene = load_scene(root)
    params = init_from_points(scene.points, scene.colors, sh_degree=1, opacity=0.5)
    save_ply(params, run / "gaussians.ply")
    (run / "config.json").write_text(json.dumps(TrainConfig(data=str(root), out=str(run)).to_json()))
    n = len(params["means"])
    code = main(["export", str(run), "--format", "splat", "--budget", str(n // 2)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Taming score over" in out and f"kept {n // 2} of {n}" in out, out
    assert (run / "export" / "gaussians.splat").stat().st_size == 32 * (n // 2)
    # the scene moved away: orbit views of the model itself, said so
    (run / "config.json").write_text(json.dumps(TrainConfig(data=str(tmp_path / "gone"), out=str(run)).to_json()))
    code = main(["export", str(run), "--format", "splat", "--budget", str(n // 2)])
    out, err = capsys.readouterr()
    assert code == 0 and "orbit views" in out and "not readable" in out, (out, err)


@pytest.mark.parametrize("argv, words", [
    (["export", "{tmp}/nope", "--format", "splat"], ["no such run folder"]),
    (["export", "{tmp}", "--format", "splat"], ["no gaussians.ply"]),
    (["export", "{tmp}", "--format", "jpeg"], ["unknown format jpeg"]),
    (["export", "{tmp}", "--format", "splat", "--budget", "lots"], ["--budget"]),
])
def test_cli_export_mistakes_are_one_line_errors(tmp_path, capsys, argv, words):
    if "--budget" in argv:
        save_ply(random_params(n=10, sh_degree=0), tmp_path / "gaussians.ply")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("budget3d: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
