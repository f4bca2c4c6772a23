#!/usr/bin/env python
"""Benchmarks of the capture route: ``budget3d process`` against given poses, appearance
compensation against per-image exposure changes, pose refinement against pose noise.

Each trains the same recipe (docs/capture.md's: ``--downscale 4 --iters 3000 --budget 30k``) and
reports test PSNR (and ``psnr_matched``: each test view's colour matched on its left half, scored
on its right); the test views are always the unmodified images at their given poses, rendered
without any per-view correction.

    # photos -> process -> train, against training on the given poses (ethiopian_head: 66 photos)
    python scripts/bench_capture.py process --photos ../shared/data/ethiopian_head/images \\
        --given ../shared/data/ethiopian_head --out runs/capture_eh [--given-run runs/eh]
    # training images through random per-image gains (0.6-1.4) and colour shifts (+-0.05)
    python scripts/bench_capture.py appearance --data ../shared/data/ethiopian_head --out runs/app_eh
    # training cameras rotated by 1 degree and moved by 1% of the cameras' radius, random directions
    python scripts/bench_capture.py pose --data ../shared/data/lego --out runs/pose_lego

Every run's metrics.json stays in its folder under --out; the summary goes to --out/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from budget3d.scene import Scene, View, load_scene
from budget3d.train import TrainConfig, train

RECIPE = dict(downscale=4, iters=3000, budget="30k")


def _train(out: Path, tag: str, scene=None, **kw) -> dict:
    d = out / tag
    if (d / "metrics.json").is_file():  # already run: reuse (delete the folder to run again)
        m = json.loads((d / "metrics.json").read_text())
    else:
        shutil.rmtree(d, ignore_errors=True)
        cfg = TrainConfig(out=str(d), checkpoint_every=0, save_renders=False, **{**RECIPE, **kw})
        t = time.perf_counter()
        m = train(cfg, scene=scene, progress=False)
        m["wall_seconds"] = round(time.perf_counter() - t, 1)
        (d / "metrics.json").write_text(json.dumps(m, indent=2, default=str))
    keep = ("psnr", "psnr_matched", "ssim", "train_seconds", "appearance", "pose_refinement", "n_test_views")
    row = {"run": tag, **{k: m.get(k) for k in keep if k in m}}
    print(json.dumps(row), flush=True)
    return row


def _with_images(scene: Scene, images: dict) -> Scene:
    """The scene with some training views' images replaced (name -> uint8 image)."""
    train = [View(v.name, v.camera, (lambda img=images[v.name]: img), load_mask=v.load_mask)
             if v.name in images else v for v in scene.train]
    return Scene(**{**scene.__dict__, "train": train})


def _with_cameras(scene: Scene, w2c: dict) -> Scene:
    import dataclasses

    train = [View(v.name, dataclasses.replace(v.camera, world_to_camera=w2c[v.name]), v.load, load_mask=v.load_mask)
             for v in scene.train]
    return Scene(**{**scene.__dict__, "train": train})


def cmd_appearance(a) -> dict:
    out = Path(a.out)
    data = str(Path(a.data).resolve())
    scene = load_scene(data, downscale=RECIPE["downscale"])
    rng = np.random.default_rng(a.seed)
    gains = rng.uniform(0.6, 1.4, (len(scene.train), 3))
    shifts = rng.uniform(-a.shift, a.shift, (len(scene.train), 3))
    changed = {v.name: np.clip(np.rint(v.image().astype(np.float32) * g + 255 * s), 0, 255).astype(np.uint8)
               for v, g, s in zip(scene.train, gains, shifts)}
    shifted = _with_images(scene, changed)
    rows = [
        _train(out, "clean-off", scene=scene, data=data, appearance=False),
        _train(out, "clean-on", scene=scene, data=data, appearance=True),
        _train(out, "shifted-off", scene=shifted, data=data, appearance=False),
        _train(out, "shifted-on", scene=shifted, data=data, appearance=True),
    ]
    summary = {"runs": rows, "gains": [0.6, 1.4], "shift": a.shift, "seed": a.seed}
    for metric in ("psnr", "psnr_matched"):
        p = {r["run"]: r.get(metric) for r in rows}
        if None in p.values():
            continue
        summary[metric] = {"loss_with_compensation_vs_clean_on": round(p["clean-on"] - p["shifted-on"], 3),
                           "loss_with_compensation_vs_clean_off": round(p["clean-off"] - p["shifted-on"], 3),
                           "loss_without_compensation_vs_clean_off": round(p["clean-off"] - p["shifted-off"], 3),
                           "compensation_on_clean_capture": round(p["clean-on"] - p["clean-off"], 3)}
    return summary


def _rotation(axis, angle):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def cmd_pose(a) -> dict:
    out = Path(a.out)
    data = str(Path(a.data).resolve())
    scene = load_scene(data, downscale=RECIPE["downscale"])
    centres = np.stack([v.camera.center for v in scene.train + scene.test])
    radius = float(np.linalg.norm(centres - centres.mean(0), axis=1).max())
    rng = np.random.default_rng(a.seed)
    noisy = {}
    for v in scene.train:
        w2c = np.asarray(v.camera.world_to_camera, np.float64)
        R, c = w2c[:3, :3], v.camera.center
        dR = _rotation(rng.normal(size=3), math.radians(a.noise_deg))  # about the camera's centre
        d = rng.normal(size=3)
        c2 = c + a.noise_frac * radius * d / np.linalg.norm(d)
        m = np.eye(4)
        m[:3, :3] = dR @ R
        m[:3, 3] = -m[:3, :3] @ c2
        noisy[v.name] = m
    moved = _with_cameras(scene, noisy)
    extra = json.loads(a.set) if a.set else {}
    rows = [
        _train(out, "clean-off", scene=scene, data=data, pose_opt=False),
        _train(out, "noisy-off", scene=moved, data=data, pose_opt=False),
        _train(out, "noisy-on" + a.tag, scene=moved, data=data, pose_opt=True, **extra),
    ]
    rows[-1]["pose_error"] = _pose_errors(scene, moved, out / ("noisy-on" + a.tag), radius)
    print(json.dumps({"pose_error": rows[-1]["pose_error"]}), flush=True)
    if a.clean_on:
        rows.append(_train(out, "clean-on" + a.tag, scene=scene, data=data, pose_opt=True, **extra))
    p = {r["run"].replace(a.tag, "") if a.tag else r["run"]: r["psnr"] for r in rows}
    cost = p["clean-off"] - p["noisy-off"]
    summary = {"runs": rows, "settings": extra, "noise_deg": a.noise_deg, "noise_frac_of_radius": a.noise_frac, "radius": radius,
               "seed": a.seed, "psnr_cost_of_noise": round(cost, 3),
               "recovered_fraction": round((p["noisy-on"] - p["noisy-off"]) / cost, 3) if cost > 0 else None}
    return summary


def _pose_errors(clean: Scene, noisy: Scene, run_dir: Path, radius: float) -> dict:
    """Median and max rotation (degrees) and camera-centre error (% of the cameras' radius) of the
    training cameras against the clean ones: as given (noisy) and as refined (the run's checkpoint)."""
    import torch

    from budget3d.train.init import scene_scale
    from budget3d.train.refine import PoseRefine

    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    poses = PoseRefine(len(noisy.train), 0.0, scene_scale(noisy))
    poses.load_state_dict(ck["extra"]["poses"])

    def err(a, b):
        r = a[:3, :3] @ b[:3, :3].T
        ang = math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1, 1))))
        ca, cb = -a[:3, :3].T @ a[:3, 3], -b[:3, :3].T @ b[:3, 3]
        return ang, 100 * float(np.linalg.norm(ca - cb)) / radius

    res = {}
    for tag, get in (("given", lambda k, v: np.asarray(v.camera.world_to_camera, np.float64)),
                     ("refined", lambda k, v: poses.world_to_camera(k, v.camera))):
        e = np.array([err(get(k, v), np.asarray(c.camera.world_to_camera, np.float64))
                      for k, (v, c) in enumerate(zip(noisy.train, clean.train))])
        res[tag] = {"rot_deg_median": round(float(np.median(e[:, 0])), 3), "rot_deg_max": round(float(e[:, 0].max()), 3),
                    "centre_pct_median": round(float(np.median(e[:, 1])), 3),
                    "centre_pct_max": round(float(e[:, 1].max()), 3)}
    return res


def cmd_process(a) -> dict:
    from budget3d.capture import ProcessOptions, process

    out = Path(a.out)
    scene_dir = out / "scene"
    opts = ProcessOptions(mapper=a.mapper)
    if (scene_dir / "process.json").is_file():
        info = json.loads((scene_dir / "process.json").read_text())
    else:
        info = process(a.photos, scene_dir, opts, progress=not a.quiet)
    print(json.dumps({k: info[k] for k in ("registered", "total", "points", "mean_reprojection_error", "seconds")}))
    rows = []
    if a.given_run:
        m = json.loads((Path(a.given_run) / "metrics.json").read_text())
        rows.append({"run": f"given ({a.given_run})", "psnr": m["psnr"], "ssim": m.get("ssim"),
                     "n_test_views": m.get("n_test_views")})
    rows.append(_train(out, "processed", data=str(scene_dir.resolve())))  # the defaults
    extra = json.loads(a.set) if a.set else {}
    variants = {"processed-pose-off": dict(pose_opt=False), "processed-pose-on": dict(pose_opt=True),
                "processed-appearance-off": dict(appearance=False),
                "processed-neither": dict(pose_opt=False, appearance=False), **extra}
    for tag in (a.variants.split(",") if a.variants else []):
        rows.append(_train(out, tag, data=str(scene_dir.resolve()), **variants[tag]))
    if a.given:
        rows.append(_train(out, "given", data=str(Path(a.given).resolve())))
    given = load_scene(a.given) if a.given else None
    proc = load_scene(scene_dir)
    same = given is not None and sorted(Path(v.name).name for v in given.test) == sorted(v.name for v in proc.test)
    return {"process": info, "runs": rows, "same_test_images": same,
            "test_images": sorted(v.name for v in proc.test)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("appearance")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shift", type=float, default=0.05, help="colour shifts uniform in +-this (0..1 units)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("pose")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--noise-deg", type=float, default=1.0)
    p.add_argument("--noise-frac", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-on", action="store_true", help="also train the clean poses with refinement on")
    p.add_argument("--set", help="JSON object of TrainConfig fields for the refinement runs, e.g. '{\"pose_lr\": 3e-3}'")
    p.add_argument("--tag", default="", help="suffix of the refinement runs' folders (to compare settings)")
    p = sub.add_parser("process")
    p.add_argument("--photos", required=True)
    p.add_argument("--given", help="the same capture with its given poses (a scene folder) to train beside")
    p.add_argument("--given-run", help="an existing run on the given poses (its metrics.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--mapper", default="incremental")
    p.add_argument("--variants", default="processed-pose-on",
                   help="also train the processed scene as: processed-pose-on, processed-pose-off, processed-appearance-off, "
                        "processed-neither (comma-separated; '' for none)")
    p.add_argument("--set", help="JSON object {tag: {TrainConfig fields}} of more variants to name in --variants")
    p.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for k, v in RECIPE.items():
        print(f"recipe {k}={v}", file=sys.stderr)
    summary = {"appearance": cmd_appearance, "pose": cmd_pose, "process": cmd_process}[a.cmd](a)
    (Path(a.out) / f"summary{getattr(a, 'tag', '')}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "process", "test_images")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
