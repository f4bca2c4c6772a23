"""``budget3d export RUN --lod``: the budget ladder on the shared exported run (80 Gaussians, a tiny
scene with 8 training and 2 test views), copied so its export folder stays as other tests expect.
The levels are nested and exact (each the top-k by the score ``export --budget`` keeps by),
lod.json is complete and its PSNR is ``budget3d eval``'s, the one-file stream's prefixes decode
to the levels, and bad ``--lod`` values are one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from budget3d.cli import main
from budget3d.errors import UserError
from budget3d.export import lod
from budget3d.export.splats import load_splat, reprune, run_scores
from budget3d.splat import load_ply

LEVELS = (10, 30, 80)


@pytest.fixture(scope="module")
def run(exported_run, tmp_path_factory):
    """A copy of the shared run (without its web folder) holding a ladder written by the CLI."""
    run = tmp_path_factory.mktemp("lod") / "run"
    shutil.copytree(exported_run, run, ignore=shutil.ignore_patterns("web", "web.tmp", "lod"))
    assert main(["export", str(run), "--lod", ",".join(map(str, LEVELS)), "--format", "ply,splat"]) == 0
    return run


def manifest(run):
    return json.loads((run / "export" / "lod" / "lod.json").read_text())


def row_ids(sub, full) -> np.ndarray:
    """Index in ``full`` of each Gaussian of ``sub`` (matched by its exact float32 centre)."""
    key = lambda p: [tuple(r) for r in p["means"].numpy().astype(np.float32)]  # noqa: E731
    where = {k: i for i, k in enumerate(key(full))}
    assert len(where) == len(full["means"]), "the run's centres are not distinct"
    return np.array([where[k] for k in key(sub)])


def test_levels_are_nested_exact_top_k(run):
    params = load_ply(run / "gaussians.ply")
    scores, what = run_scores(run, params)
    assert scores is not None and what.startswith("Taming score over 8 training views")
    s = scores.numpy()
    m = manifest(run)
    assert m["order"] == what and m["total"] == 80
    prev = set()
    for n, row in zip(LEVELS, m["levels"]):
        level = load_ply(run / "export" / "lod" / row["files"]["ply"]["file"])
        assert len(level["means"]) == n == row["count"]
        ids = row_ids(level, params)
        assert len(set(ids)) == n
        # exact: the level's Gaussians are the run's own, bit for bit
        for k in ("means", "scales", "quats", "opacities", "sh0", "shN"):
            assert torch.equal(level[k], params[k][ids]), k
        # nested: every smaller level is inside this one
        assert prev <= set(ids)
        prev = set(ids)
        # the top-k by the score: nothing left out scores higher than anything kept
        out = np.setdiff1d(np.arange(80), ids)
        if len(out):
            assert s[ids].min() >= s[out].max()
            if s[ids].min() > s[out].max():  # no tie at the boundary: exactly what export --budget keeps
                kept = reprune(params, n, scores)
                assert set(row_ids(kept, params)) == set(ids)


def test_manifest_is_complete_and_psnr_is_evals(run, tmp_path):
    m = manifest(run)
    folder = run / "export" / "lod"
    assert m["stream"] == {"file": "lod.splat", "format": "splat", "bytes_per_splat": 32, "size_bytes": 80 * 32,
                           "sh_degree": 0}
    assert (folder / "lod.splat").stat().st_size == 80 * 32
    assert m["evaluation"]["n_test_views"] == 2
    for i, row in enumerate(m["levels"], 1):
        assert row["level"] == i and row["fraction"] == pytest.approx(row["count"] / 80)
        assert row["stream_bytes"] == [0, 32 * row["count"]]
        assert set(row["files"]) == {"ply", "splat"} and row["file"] == row["files"]["ply"]["file"]
        for f in row["files"].values():
            assert (folder / f["file"]).stat().st_size == f["size_bytes"] > 0
        for k in ("psnr", "ssim", "psnr_splat", "ssim_splat"):
            assert np.isfinite(row[k]), k
    psnrs = [r["psnr"] for r in m["levels"]]
    assert psnrs[0] < psnrs[1] < psnrs[2], psnrs  # more Gaussians of the ground truth: closer to it
    # the largest level is the whole run: its PSNR is what 'budget3d eval' measures
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    assert main(["eval", str(copy)]) == 0
    evaluated = json.loads((copy / "metrics.json").read_text())
    assert evaluated["n_test_views"] == 2
    assert m["levels"][-1]["psnr"] == pytest.approx(evaluated["psnr"], abs=1e-3)
    assert m["levels"][-1]["ssim"] == pytest.approx(evaluated["ssim"], abs=1e-4)


def test_stream_prefixes_decode_to_the_levels(run):
    folder = run / "export" / "lod"
    stream = (folder / "lod.splat").read_bytes()
    params = load_ply(run / "gaussians.ply")
    scores, _ = run_scores(run, params)
    order = lod.importance_order(scores)
    for row in manifest(run)["levels"]:
        a, b = row["stream_bytes"]
        # the prefix holds the same 32-byte records as the level's own .splat (which save_splat sorts otherwise)
        recs = lambda data: sorted(data[i:i + 32] for i in range(0, len(data), 32))  # noqa: E731
        assert recs(stream[a:b]) == recs((folder / row["files"]["splat"]["file"]).read_bytes())
        # and decodes to the level's Gaussians
        prefix = lod.read_prefix(folder / "lod.splat", row["count"])
        level = load_ply(folder / row["files"]["ply"]["file"])
        np.testing.assert_array_equal(np.sort(prefix["means"].numpy(), 0), np.sort(level["means"].numpy(), 0))
    # any prefix is a top-n, record by record in importance order
    first = load_splat(folder / "lod.splat")
    np.testing.assert_array_equal(first["means"].numpy(), params["means"].numpy()[order])
    assert not (run / "export" / "lod.tmp").exists() and not (run / "export" / "lod.old").exists()


def test_fractions_and_percentages():
    assert lod.parse_levels("0.1,0.5,1.0", 80) == [8, 40, 80]
    assert lod.parse_levels("10%,50%,100%", 80) == [8, 40, 80]
    assert lod.parse_levels("0.05,20,1.", 80) == [4, 20, 80]
    assert lod.parse_levels("1k,10k,0.1m", 100_000) == [1000, 10000, 100000]


@pytest.mark.parametrize("bad, says", [
    ("30,10", "levels must increase"),
    ("10,10", "levels must increase"),
    ("0.5,0.5", "levels must increase"),
    ("0,10", "keep at least one Gaussian"),
    ("0.0,1.0", "not a fraction"),
    ("10,81", "above the run's 80 Gaussians"),
    ("1.5", "neither a fraction"),
    ("10,,30", "comma-separated"),
    ("ten", "expected a count"),
    ("-5", "keep at least one"),
    ("150%", "not a fraction"),
])
def test_bad_lod_values_are_one_line_errors(run, bad, says, capsys):
    with pytest.raises(UserError, match=says):
        lod.parse_levels(bad, 80)
    before = (run / "export" / "lod" / "lod.json").read_bytes()
    assert main(["export", str(run), "--lod", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert (run / "export" / "lod" / "lod.json").read_bytes() == before  # the ladder there is untouched


def test_lod_flags_that_do_not_fit_are_errors(run, capsys):
    assert main(["export", str(run), "--lod", "10,80", "--budget", "40"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format" in err and "--lod" in err
    assert main(["export", str(run), "--format", "ply", "--lod-finetune", "50"]) == 2
    assert "give the levels with --lod" in capsys.readouterr().err


def test_finetuned_ladder_keeps_members_and_nesting(run, tmp_path):
    """--lod-finetune: the same members in the same order, still byte-prefix nested, tuned values;
    the smaller levels (10 and 30 of the scene's 80 Gaussians) render the test views better."""
    tuned_run = tmp_path / "run"
    shutil.copytree(run, tuned_run, ignore=shutil.ignore_patterns("web", "lod"))
    assert main(["export", str(tuned_run), "--lod", ",".join(map(str, LEVELS)), "--format", "ply",
                 "--lod-finetune", "60"]) == 0
    m, plain = manifest(tuned_run), manifest(run)
    assert m["finetune_steps"] == 60 and plain["finetune_steps"] == 0
    folder, plain_folder = tuned_run / "export" / "lod", run / "export" / "lod"
    levels = [load_ply(folder / r["files"]["ply"]["file"]) for r in m["levels"]]
    for small, big in zip(levels, levels[1:]):
        for k in small:
            assert torch.equal(small[k], big[k][:len(small[k])]), k
    top, plain_top = levels[-1], load_ply(plain_folder / plain["levels"][-1]["files"]["ply"]["file"])
    # members and order: each tuned centre is still its own Gaussian's (the means move at the final lr)
    d = torch.cdist(top["means"], plain_top["means"])
    assert torch.equal(d.argmin(1), torch.arange(80))
    assert not torch.equal(top["opacities"], plain_top["opacities"])  # it did train
    # the stream is the tuned ladder too
    np.testing.assert_array_equal(np.sort(lod.read_prefix(folder / "lod.splat", 10)["means"].numpy(), 0),
                                  np.sort(levels[0]["means"].numpy(), 0))
    gain = [t["psnr"] - u["psnr"] for t, u in zip(m["levels"], plain["levels"])]
    assert gain[0] > 0.3 and gain[1] > 1, gain  # (the top level here is the ground truth itself: it can only lose)
    with pytest.raises(UserError, match="steps >= 0"):
        lod.export_lod(tuned_run, "10,80", tuned_run / "export", finetune_steps=-1)


def test_ladder_without_the_scene_has_no_psnr(run, tmp_path, capsys):
    """The run's scene gone: the ladder is still written (ordered by orbit views of the model, as
    --budget does then), and lod.json says why it has no PSNR; a fine-tune needs the scene."""
    moved = tmp_path / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("export"))
    cfg = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**cfg, "data": str(tmp_path / "gone")}))
    assert main(["export", str(moved), "--lod", "10,80"]) == 0
    assert "no PSNR" in capsys.readouterr().out
    m = manifest(moved)
    assert m["order"].startswith("Taming score over 8 orbit views")
    assert "not evaluated" in m["evaluation"]["skipped"] and "--data" in m["evaluation"]["skipped"]
    assert [r["count"] for r in m["levels"]] == [10, 80] and "psnr" not in m["levels"][0]
    assert main(["export", str(moved), "--lod", "10,80", "--lod-finetune", "5"]) == 2
    assert "--data" in capsys.readouterr().err
