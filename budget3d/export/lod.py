"""``budget3d export RUN --lod 10k,30k,100k``: a budget ladder (level of detail) from one run.

Every level is the top-k of the run's Gaussians by the same importance ``export --budget`` keeps
(``splats.run_scores``: the Taming score over a few training views; ``splats.orbit_scores`` when the
run's scene is gone), so the levels are nested and each is exactly what ``export --budget k`` keeps.
The Gaussians are sorted once by that score (descending, ties by their index in gaussians.ply) and
level k is the first ``count_k`` of that order. By default nothing is fine-tuned: each level is the
run's own Gaussians, bit for bit.

``finetune_steps`` > 0 (``--lod-finetune``) trains every Gaussian of the ladder jointly on the mean
of every level's training loss (each step one training view, rendered once per level, the run's
L1 + SSIM loss and learning rates, the means' at its final decayed value). The levels stay nested
prefixes of one order with the same members; their values change. Smaller levels gain several dB
and the largest gives up some (docs/export.md, "Level of detail", has the table and the measured
alternative of tuning each level's new Gaussians with the smaller levels frozen, which lost more
at the top).

Written into ``OUT/lod/`` (OUT is RUN/export by default):

- ``lod.splat``: every Gaussian of the run in that order as antimatter15 ``.splat`` records (32
  bytes each, no header), so *any* byte prefix of 32 x n bytes is the top-n and each level is the
  prefix ``[0, 32 x count)``: one file a page streams, showing each level as its prefix arrives.
  ``.splat`` is SH degree 0 (view-dependent colour dropped), as ``splats.save_splat``.
- ``level-I-COUNT.EXT`` for each level and each splat format asked (default ``spz``; the extension
  as ``export --format`` names it, e.g. ``.compressed.ply``).
- ``lod.json``: the manifest: each level's count, fraction, files and sizes, its byte range in
  ``lod.splat``, and its PSNR / SSIM on the run's test views rendered as ``budget3d eval`` renders
  them (``psnr``: the level's Gaussians as trained; ``psnr_splat``: the level's prefix of
  ``lod.splat`` decoded, what the web page draws).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from budget3d.errors import UserError

LOD_DIR = "lod"
MANIFEST = "lod.json"
STREAM = "lod.splat"
SPLAT_BYTES = 32


# ----------------------------------------------------------------------------- the levels


def parse_levels(text: str, total: int) -> list[int]:
    """``--lod`` as typed -> strictly increasing counts, each within 1..``total``. Items are counts
    (``10000``, ``10k``, ``1.5m``), fractions of the run's count (``0.1``, ``1.0``: a decimal point
    and at most 1) or percentages (``10%``). One-line errors for anything else."""
    from budget3d.export.run import parse_count

    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UserError(f"--lod {text}: expected comma-separated levels such as 10k,30k,100k or 0.1,0.3,1.0")
    counts = []
    for t in items:
        low = t.lower().replace("_", "")
        frac = None
        if low.endswith("%"):
            frac = _number(low[:-1], text) / 100
        elif re.fullmatch(r"[0-9]*\.[0-9]*", low):
            frac = _number(low, text)
            if frac > 1:
                raise UserError(f"--lod {text}: {t} is neither a fraction (0 < f <= 1) nor a whole count")
        if frac is not None:
            if not 0 < frac <= 1:
                raise UserError(f"--lod {text}: {t} is not a fraction of the run's Gaussians in (0, 1]")
            n = max(1, int(round(frac * total)))
        else:
            n = parse_count(t, "--lod")  # one-line errors for junk and for zero
        if n > total:
            raise UserError(f"--lod {text}: {t} is above the run's {total:,} Gaussians; "
                            f"the largest level can be at most {total} (or 1.0)")
        counts.append(n)
    for a, b, ta, tb in zip(counts, counts[1:], items, items[1:]):
        if b <= a:
            raise UserError(f"--lod {text}: levels must increase, but {tb} ({b:,} Gaussians) follows "
                            f"{ta} ({a:,}); list them smallest first, e.g. 10k,30k,100k")
    return counts


def _number(t: str, text: str) -> float:
    try:
        v = float(t)
    except ValueError:
        raise UserError(f"--lod {text}: {t!r} is not a number") from None
    if not np.isfinite(v):
        raise UserError(f"--lod {text}: {t!r} is not a number")
    return v


def importance_order(scores) -> np.ndarray:
    """Indices of the Gaussians, most important first (ties by index, NaN last): its first k are
    a top-k of ``scores`` (the set ``splats.reprune`` keeps whenever no tie straddles k)."""
    s = torch.nan_to_num(torch.as_tensor(scores).double().reshape(-1), nan=-np.inf).numpy()
    return np.argsort(-s, kind="stable")


def run_importance(run_dir, params, data=None) -> tuple[torch.Tensor, str]:
    """The importance ``export --budget`` keeps by: the run's Taming score over its training views,
    else over orbit views of the model itself. Returns (scores, what)."""
    from budget3d.export.splats import orbit_scores, run_scores

    scores, what = run_scores(run_dir, params, data=data)
    if scores is None:
        scores = orbit_scores(params)
        what = f"Taming score over 8 orbit views of itself, as {what}"
    return scores, what


def splat_records(params) -> bytes:
    """``.splat`` records of ``params`` in their given order (``splats.save_splat`` encodes the
    same fields but re-sorts by size x opacity, which would break the prefix property)."""
    from budget3d.export.splat_arrays import C0, sigmoid, to_numpy, u8, unit_quats

    p = to_numpy(params)
    rec = np.zeros(len(p["means"]), dtype=[("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4),
                                           ("rot", "u1", 4)])
    rec["pos"] = p["means"]
    rec["scale"] = np.exp(p["scales"])
    rec["rgba"][:, :3] = u8((0.5 + C0 * p["sh0"]) * 255)
    rec["rgba"][:, 3] = u8(sigmoid(p["opacities"]) * 255)
    rec["rot"] = u8(unit_quats(p["quats"]) * 128 + 128)
    return rec.tobytes()


def read_prefix(path, count: int) -> dict:
    """The first ``count`` Gaussians of a budget-ordered ``.splat`` stream (a level of the ladder)."""
    from budget3d.export.splats import load_splat

    path = Path(path)
    size = path.stat().st_size
    if count * SPLAT_BYTES > size:
        raise UserError(f"{path}: {size} bytes hold {size // SPLAT_BYTES} splats, not {count}; "
                        "export the ladder again with 'budget3d export RUN --lod ...'")
    tmp = path.with_name(path.name + f".prefix{count}.splat")
    try:
        with open(path, "rb") as f:
            tmp.write_bytes(f.read(count * SPLAT_BYTES))
        return load_splat(tmp)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- evaluation


class EvalViews:
    """The run's test views rendered as ``budget3d eval`` renders them (``train.evaluate_run``:
    the run's scene at its downscale, its background and SH degree, ``eval_max_views``, the CPU
    backend here), for scoring many variants of one run without rewriting its metrics.json."""

    def __init__(self, run_dir, data=None, backend: str = "auto"):
        from budget3d.runfolder import load_run_scene, read_config
        from budget3d.runtime import pick_backend

        saved = read_config(run_dir)
        self.scene = load_run_scene(run_dir, saved, override=data)
        self.views = list(self.scene.test)
        self.max_views = int(saved.get("eval_max_views") or 0)
        self.sh_degree = int(saved.get("sh_degree", 3))
        self.backend = pick_backend(backend, torch.device("cpu"))
        self.background = torch.tensor(self.scene.background, dtype=torch.float32)
        if self.backend == "cpu":
            from budget3d.splat import cpu

            cpu.warmup()

    def __call__(self, params) -> dict:
        from budget3d.splat import render
        from budget3d.train.metrics import evaluate

        p = {k: v.detach().float().cpu() for k, v in params.items()}
        deg = min(self.sh_degree, _degree(p))

        def render_fn(pp, cam):
            return render(pp, cam, backend=self.backend, sh_degree=deg, background=self.background)

        m = evaluate(p, self.views, render_fn=render_fn, background=self.background, max_views=self.max_views,
                     progress=False)
        return {"psnr": m["psnr"], "ssim": m["ssim"], "n_test_views": m["n_test_views"]}


def _degree(p) -> int:
    k = p["shN"].shape[1] if "shN" in p and p["shN"].ndim == 3 else 0
    return {0: 0, 3: 1, 8: 2, 15: 3}.get(k, 0)


# ----------------------------------------------------------------------------- the ladder


def finetune(views: "EvalViews", run_dir, ordered: dict, counts: Sequence[int], steps: int, seed: int = 0,
             progress: bool = True) -> dict:
    """The joint fine-tune of the module notes: ``ordered`` (every Gaussian, most important first)
    trained ``steps`` steps on the mean loss of its prefixes ``counts``; returns the tuned params."""
    from tqdm import tqdm

    from budget3d.runfolder import read_config
    from budget3d.splat import render
    from budget3d.train.init import scene_scale
    from budget3d.train.ssim import ssim

    cfg = read_config(run_dir)
    get = lambda k, d: float(cfg.get(k, d))  # noqa: E731  (a run config written before a setting existed)
    lrs = {"means": get("means_lr_final", 1.6e-6) * scene_scale(views.scene), "scales": get("scales_lr", 5e-3),
           "quats": get("quats_lr", 1e-3), "opacities": get("opacities_lr", 5e-2), "sh0": get("sh0_lr", 2.5e-3),
           "shN": get("shN_lr", 2.5e-3 / 20)}
    lam = get("ssim_lambda", 0.2)
    train = list(views.scene.train)
    if not train:
        raise UserError(f"{run_dir}: the run's scene has no training views to fine-tune the ladder on; "
                        "export it without --lod-finetune")
    p = {k: v.detach().float().clone().requires_grad_() for k, v in ordered.items()}
    opt = torch.optim.Adam([{"params": [p[k]], "lr": lrs.get(k, 1e-3)} for k in p], eps=1e-15)
    rng = np.random.default_rng(seed)
    deg = min(views.sh_degree, _degree(p))
    for _ in tqdm(range(steps), desc="lod fine-tune", unit="step", disable=not progress, leave=False):
        view = train[int(rng.integers(len(train)))]
        gt = torch.as_tensor(view.image()).float() / 255
        loss = 0.0
        for n in counts:
            img = render({k: v[:n] for k, v in p.items()}, view.camera, backend=views.backend, sh_degree=deg,
                         background=views.background).image
            loss = loss + (1 - lam) * (img - gt).abs().mean() + (lam * (1 - ssim(img, gt)) if lam > 0 else 0.0)
        opt.zero_grad(set_to_none=True)
        (loss / len(counts)).backward()
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def export_lod(run_dir, levels: str | Sequence[int], out_dir, formats: Sequence[str] = ("spz",), data=None,
               evaluate: bool = True, finetune_steps: int = 0, progress: bool = True) -> dict:
    """Write the ladder into ``out_dir/lod`` (see the module notes); returns the manifest."""
    from tqdm import tqdm

    from budget3d.export.splats import FILES, save_any
    from budget3d.runtime import write_bytes, write_json
    from budget3d.splat import load_ply

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ply = run_dir / "gaussians.ply"
    if not ply.is_file():
        raise UserError(f"{run_dir}: no gaussians.ply; this is not a finished run folder "
                        "(train it with 'budget3d train')")
    params = load_ply(ply)
    total = len(params["means"])
    counts = parse_levels(levels, total) if isinstance(levels, str) else _check_counts(levels, total)

    if finetune_steps < 0:
        raise UserError(f"--lod-finetune {finetune_steps}: give a number of steps >= 0 (0: no fine-tune)")
    scores, what = run_importance(run_dir, params, data)
    order = importance_order(scores)
    ordered = {k: v.detach()[torch.as_tensor(order)].clone() for k, v in params.items()}
    views, skipped = None, None
    if evaluate or finetune_steps:
        try:
            views = EvalViews(run_dir, data)
        except UserError as e:  # the scene moved or is gone: the ladder needs no images, its PSNR does
            if finetune_steps:
                raise
            skipped = f"not evaluated: {e}"
    if finetune_steps:
        ordered = finetune(views, run_dir, ordered, counts, finetune_steps, progress=progress)

    lod = out_dir / LOD_DIR
    tmp = out_dir / (LOD_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    stream = splat_records(ordered)
    write_bytes(tmp / STREAM, stream)
    if not evaluate:
        views = None
    rows = []
    bar = tqdm(total=len(counts), desc="lod", unit="level", disable=not progress, leave=False)
    for i, n in enumerate(counts, 1):
        level = {k: v[:n] for k, v in ordered.items()}
        files = {}
        for fmt in formats:
            ext = FILES.get(fmt, f"gaussians.{fmt}").split(".", 1)[1]  # compressed-ply: compressed.ply
            name = f"level-{i}-{n}.{ext}"
            save_any(level, tmp / name, fmt)
            files[fmt] = {"file": name, "size_bytes": _bytes(tmp / name)}
        row = {"level": i, "count": n, "fraction": round(n / total, 6),
               "file": files[formats[0]]["file"] if formats else None,
               "size_bytes": files[formats[0]]["size_bytes"] if formats else None,
               "files": files, "stream_bytes": [0, n * SPLAT_BYTES]}
        if views is not None:
            bar.set_postfix_str(f"evaluating {n:,} Gaussians")
            m = views(level)
            row.update(psnr=m["psnr"], ssim=m["ssim"])
            ms = views(read_prefix(tmp / STREAM, n))
            row.update(psnr_splat=ms["psnr"], ssim_splat=ms["ssim"])
        rows.append(row)
        bar.update(1)
    bar.close()
    manifest = {
        "version": 1,
        "run": run_dir.resolve().name,
        "source": "gaussians.ply",
        "total": total,
        "order": what,
        "finetune_steps": int(finetune_steps),
        "finetune": "joint: every level's loss, every Gaussian" if finetune_steps else None,
        "stream": {"file": STREAM, "format": "splat", "bytes_per_splat": SPLAT_BYTES,
                   "size_bytes": len(stream), "sh_degree": 0},
        "evaluation": ({"n_test_views": m["n_test_views"], "backend": views.backend,
                        "what": "test views of the run's scene, as 'budget3d eval' renders them"}
                       if views is not None and rows else {"skipped": skipped or "not evaluated (evaluate=False)"}),
        "levels": rows,
    }
    write_json(tmp / MANIFEST, manifest)
    old = out_dir / (LOD_DIR + ".old")  # the swap: lod -> lod.old, lod.tmp -> lod
    if old.exists():
        shutil.rmtree(old)
    if lod.exists():
        lod.replace(old)
    tmp.replace(lod)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def _bytes(path: Path) -> int:
    """A file's size, or a folder's (a format written as a folder) in all."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _check_counts(counts: Sequence[int], total: int) -> list[int]:
    return parse_levels(",".join(str(int(c)) for c in counts), total)


def read_manifest(lod_dir) -> Optional[dict]:
    """``lod_dir/lod.json`` as a dict, or None when there is none (or it is unreadable)."""
    path = Path(lod_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("levels") else None


def summary(manifest: dict) -> str:
    """A few lines for the export printout: each level's count, size and PSNR."""
    lines = [f"lod       {len(manifest['levels'])} levels of {manifest['total']:,} Gaussians by {manifest['order']}; "
             f"stream {manifest['stream']['file']} {manifest['stream']['size_bytes'] / 1e6:.2f} MB"]
    if manifest["evaluation"].get("skipped"):
        lines.append(f"  (no PSNR: {manifest['evaluation']['skipped']})")
    for r in manifest["levels"]:
        q = "" if r.get("psnr") is None else f"  PSNR {r['psnr']:.2f} dB (.splat prefix {r['psnr_splat']:.2f})"
        f = "" if not r.get("file") else f"  {r['file']} {r['size_bytes'] / 1e3:.1f} kB"
        lines.append(f"  level {r['level']}: {r['count']:>9,} Gaussians{f}  bytes {r['stream_bytes'][1]:,}{q}")
    return "\n".join(lines)
