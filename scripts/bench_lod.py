"""The budget ladder's cost of being nested: each level of ``budget3d export RUN --lod`` against a
run trained straight to that level's budget, and (``--finetune STEPS``) what fine-tuning each level
with the levels below it frozen would change.

    python scripts/bench_lod.py --run RUN --levels 3k,10k,30k --direct --finetune 300 --json out.json

RUN is a finished run trained to the largest level. ``--direct`` trains, for each smaller level, a
run with RUN's config.json but that budget (into RUN-direct-COUNT/, reused when it exists). Every
figure is test PSNR / SSIM as ``budget3d eval`` renders the test views (``export.lod.EvalViews``).

Two fine-tunes that keep the ladder nested (``--mode``): ``joint`` is what ``export
--lod-finetune`` ships (``export.lod.finetune``: every Gaussian trained on the mean of every level's
loss); ``nested`` trains level 1's Gaussians alone, then each larger level only its new Gaussians
with every smaller level's (already tuned) frozen, ``--finetune`` steps a level. Both: L1 + 0.2
(1 - SSIM) on the run's training views (one per step, in a seeded random order), Adam at the run's
learning rates (means at the final, decayed rate), the run's background.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def direct_run(run: Path, count: int, progress: bool) -> Path:
    from budget3d.train import TrainConfig, train

    out = run.parent / f"{run.name}-direct-{count}"
    if (out / "gaussians.ply").is_file():
        return out
    saved = json.loads((run / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    cfg = dataclasses.replace(cfg, budget=str(count), out=str(out), save_renders=False)
    train(cfg, progress=progress)
    return out


def finetune_ladder(run: Path, ordered: dict, counts: list, steps: int, views, progress: bool,
                    mode: str = "nested") -> list:
    """The nested fine-tune (module notes), or ``mode="joint"``: every Gaussian trained at once on
    the mean of every level's loss (one render per level per step); returns each level's params."""
    from tqdm import tqdm

    from budget3d.runfolder import read_config
    from budget3d.splat import render
    from budget3d.train.init import scene_scale
    from budget3d.train.ssim import ssim

    cfg = read_config(run)
    scene = views.scene
    lrs = {"means": cfg["means_lr_final"] * scene_scale(scene), "scales": cfg["scales_lr"], "quats": cfg["quats_lr"],
           "opacities": cfg["opacities_lr"], "sh0": cfg["sh0_lr"], "shN": cfg["shN_lr"]}
    lam = cfg["ssim_lambda"]
    train = list(scene.train)
    targets = [torch.as_tensor(v.image()).float() / 255 for v in train]
    rng = np.random.default_rng(0)
    frozen = {k: v[:0] for k, v in ordered.items()}
    out, prev = [], 0
    if mode == "joint":  # what export --lod-finetune ships
        from budget3d.export.lod import finetune

        tuned = finetune(views, run, ordered, counts, steps, progress=progress)
        return [{k: v[:n] for k, v in tuned.items()} for n in counts]
    bar = tqdm(total=steps * len(counts), desc="fine-tune", unit="step", disable=not progress)
    for n in counts:
        delta = {k: v[prev:n].clone().requires_grad_() for k, v in ordered.items()}
        opt = torch.optim.Adam([{"params": [delta[k]], "lr": lrs[k], "name": k} for k in delta], eps=1e-15)
        for _ in range(steps):
            i = int(rng.integers(len(train)))
            p = {k: torch.cat([frozen[k], delta[k]]) for k in delta}
            img = render(p, train[i].camera, backend=views.backend, sh_degree=views.sh_degree,
                         background=views.background).image
            loss = (1 - lam) * (img - targets[i]).abs().mean() + lam * (1 - ssim(img, targets[i]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        frozen = {k: torch.cat([frozen[k], delta[k].detach()]) for k in delta}
        out.append({k: v.clone() for k, v in frozen.items()})
        prev = n
    bar.close()
    return out


def main() -> int:
    from budget3d.export.lod import EvalViews, importance_order, parse_levels, run_importance
    from budget3d.splat import load_ply

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run trained to the largest level")
    ap.add_argument("--levels", required=True, help="as export --lod: 3k,10k,30k or 0.1,0.3,1.0")
    ap.add_argument("--direct", action="store_true", help="also train a run straight to each smaller level")
    ap.add_argument("--finetune", type=int, default=0, metavar="STEPS", help="also fine-tune each level (nested)")
    ap.add_argument("--mode", choices=["nested", "joint"], default="nested",
                    help="fine-tune: nested (each level's new Gaussians, smaller levels frozen) or joint (all "
                         "Gaussians on the mean loss of every level)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    run, progress = Path(a.run), not a.quiet
    params = load_ply(run / "gaussians.ply")
    total = len(params["means"])
    counts = parse_levels(a.levels, total)
    t0 = time.perf_counter()
    scores, what = run_importance(run, params)
    order = torch.as_tensor(importance_order(scores))
    ordered = {k: v.detach()[order].clone() for k, v in params.items()}
    views = EvalViews(run)
    rows = [{"count": n, "ladder": views({k: v[:n] for k, v in ordered.items()})} for n in counts]
    print(f"ladder by {what}: {[r['ladder']['psnr'] for r in rows]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.finetune:
        t1 = time.perf_counter()
        for r, p in zip(rows, finetune_ladder(run, ordered, counts, a.finetune, views, progress, a.mode)):
            r["finetuned"] = views(p)
        print(f"fine-tuned ({a.mode}) {a.finetune} steps a level: {[r['finetuned']['psnr'] for r in rows]} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)
    if a.direct:
        for r in rows:
            d = run if r["count"] == total else direct_run(run, r["count"], progress)
            m = json.loads((d / "metrics.json").read_text())
            r["direct"] = {"run": str(d), "psnr": m["psnr"], "ssim": m["ssim"], "num_gaussians": m["num_gaussians"],
                           "train_seconds": m.get("train_seconds")}
    result = {"run": str(run), "total": total, "order": what, "finetune_steps": a.finetune, "mode": a.mode,
              "n_test_views": rows[0]["ladder"]["n_test_views"], "levels": rows}
    print("| level | Gaussians | ladder PSNR / SSIM | " + ("fine-tuned | " if a.finetune else "")
          + ("trained to that budget | ladder cost |" if a.direct else ""))
    for i, r in enumerate(rows, 1):
        cells = [str(i), f"{r['count']:,}", f"{r['ladder']['psnr']:.2f} / {r['ladder']['ssim']:.4f}"]
        if a.finetune:
            cells.append(f"{r['finetuned']['psnr']:.2f} / {r['finetuned']['ssim']:.4f}")
        if a.direct:
            cells += [f"{r['direct']['psnr']:.2f} / {r['direct']['ssim']:.4f}",
                      f"{r['direct']['psnr'] - r['ladder']['psnr']:.2f} dB"]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
