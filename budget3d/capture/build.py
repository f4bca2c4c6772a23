"""``budget3d process INPUT --out SCENE``: photos or a video -> a COLMAP scene folder.

The scene is built in a hidden folder beside SCENE and renamed into place at the end, so SCENE
is either absent or complete (an interrupted or failed run leaves nothing half-written):

    SCENE/
      images/          undistorted (PINHOLE) images, named as staged (the photos' own names)
      images_2/ _4/ _8 the same, downscaled (what ``budget3d train --downscale N`` reads)
      sparse/0/        cameras.bin, images.bin, points3D.bin (+ COLMAP 4's rigs.bin, frames.bin)
      masks/           with --masks: <image name>.png, white = keep, black = ignored by training
      process.json     registered/total, unregistered names, reprojection error, points, seconds per stage

Defaults (docs/capture.md has the measurements): SIFT on images at
most 1600 pixels wide, every pair matched up to 100 photos and neighbours in capture order
beyond (always for video), incremental mapping, SIMPLE_RADIAL cameras, one per image size.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from budget3d.errors import UserError
from budget3d.runtime import write_json

PROCESS_JSON = "process.json"
DOWNSCALES = (2, 4, 8)


@dataclass
class ProcessOptions:
    frames: int = 100  # video: frames kept (the sharpest of each of this many equal windows)
    max_size: int = 1600  # SIFT runs on images downscaled to at most this many pixels on the long side
    matcher: str = "auto"  # auto | exhaustive | sequential
    mapper: str = "incremental"  # incremental | global
    camera_model: str = "SIMPLE_RADIAL"
    single_camera: bool = False  # one camera for every image (video: always)
    masks: Optional[str] = None  # folder of masks named like the photos (black = ignore)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_options(o: ProcessOptions) -> None:
    from budget3d.capture import sfm

    if o.matcher not in sfm.MATCHERS:
        raise UserError(f"--matcher {o.matcher}: choose one of {', '.join(sfm.MATCHERS)}")
    if o.mapper not in sfm.MAPPERS:
        raise UserError(f"--mapper {o.mapper}: choose one of {', '.join(sfm.MAPPERS)}")
    if o.camera_model.upper() not in sfm.CAMERA_MODELS:
        raise UserError(f"--camera-model {o.camera_model}: choose one of {', '.join(sfm.CAMERA_MODELS)}")
    if o.max_size < 64:
        raise UserError(f"--max-size {o.max_size}: give at least 64 pixels (1600 is the default; 0 is not allowed)")


def _check_input(src: Path) -> str:
    from budget3d.capture.inputs import PHOTO_EXTS, VIDEO_EXTS, capture_kind

    if not src.exists():
        raise UserError(f"{src}: no such file or folder; give a folder of photos or a video file")
    kind = capture_kind(src)
    if kind is not None:
        return kind
    if src.is_file():
        raise UserError(f"{src}: not a video ({', '.join(e[1:] for e in VIDEO_EXTS)}); give a video file or a "
                        f"folder of photos ({', '.join(e[1:] for e in PHOTO_EXTS)})")
    from budget3d.scene import detect_format

    try:
        fmt, _ = detect_format(src)
    except UserError:
        return "photos"  # no photos at all: stage_photos says so
    raise UserError(f"{src}: already a {fmt} scene with camera poses; train it as it is: "
                    f"budget3d train --data {src} --out runs/NAME")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists; choose another --out, or remove it to process again")


def process(src, out, opts: Optional[ProcessOptions] = None, progress: bool = True) -> dict:
    """Photos or a video -> a COLMAP scene folder at ``out``; returns what process.json holds."""
    from budget3d.capture import inputs, sfm

    opts = opts or ProcessOptions()
    _check_options(opts)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    kind = _check_input(src)
    _check_out(out)
    try:
        import pycolmap  # noqa: F401  (after sfm, which imports cv2 first)
    except ImportError as e:
        raise UserError(f"budget3d process needs pycolmap ({e}); install it: pip install pycolmap") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = _build(src, kind, tmp, opts, progress, inputs, sfm)
        info["scene"] = str(out.resolve().parent / out.name)
        write_json(tmp / "scene" / PROCESS_JSON, info)
        if out.is_dir():
            out.rmdir()  # an empty folder (checked above)
        os.replace(tmp / "scene", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _build(src: Path, kind: str, tmp: Path, opts: ProcessOptions, progress: bool, inputs, sfm) -> dict:
    t_all = time.perf_counter()
    secs = {}
    staged = tmp / "input"
    t = time.perf_counter()
    info = {"input": str(src.resolve()), "kind": kind}
    if kind == "video":
        vid = inputs.extract_frames(src, staged, opts.frames, progress)
        names = [k["name"] for k in vid["kept"]]
        info["video"] = {"frames_total": vid["frames_total"], "fps": vid["fps"], "frames_kept": len(names),
                         "source_frames": [k["frame"] for k in vid["kept"]]}
        photos = [{"name": n, "source": n} for n in names]
    else:
        photos = inputs.stage_photos(src, staged, progress)
        names = [p["name"] for p in photos]
    secs["prepare"] = sfm.seconds(t)
    masks = None
    if opts.masks:
        if kind == "video":
            raise UserError("--masks: masks go with photos (named like them); extract the video's frames into a "
                            "folder, mask those and process the folder")
        masks = tmp / "masks_in"
        info["masks"] = inputs.stage_masks(Path(opts.masks).expanduser(), photos, masks)
        if info["masks"]["missing"]:
            m = info["masks"]["missing"]
            _say(f"budget3d: warning: --masks: no mask for {len(m)} of {len(photos)} photos (e.g. {m[0]}); "
                 "those are used whole")
    single = opts.single_camera or kind == "video"
    matcher = opts.matcher
    if matcher == "auto":
        matcher = "sequential" if kind == "video" or len(names) > sfm.EXHAUSTIVE_MAX else "exhaustive"
    model = opts.camera_model.upper()
    info.update({"total": len(names), "matcher": matcher, "mapper": opts.mapper, "camera_model": model,
                 "single_camera": single, "max_size": opts.max_size, "pycolmap": sfm.version()})

    db = tmp / "database.db"
    t = time.perf_counter()
    sizes = None if single else {p["name"]: (p["width"], p["height"]) for p in photos}
    feats = sfm.extract_features(db, staged, names, camera_model=model, sizes=sizes,
                                 max_size=opts.max_size, masks=masks, progress=progress)
    secs["features"] = sfm.seconds(t)
    t = time.perf_counter()
    matched = sfm.match(db, sfm.image_pairs(names, matcher), tmp / "pairs", progress)
    secs["matching"] = sfm.seconds(t)
    t = time.perf_counter()
    recs = sfm.reconstruct(db, staged, tmp / "sparse", opts.mapper, len(names), progress)
    secs["mapping"] = sfm.seconds(t)
    sfm.check_registered(recs, len(names), matched["verified_pairs"], opts.max_size, matcher)
    rec = recs[0]
    registered = {im.name for im in rec.images.values()}
    unregistered = [n for n in names if n not in registered]
    info.update({
        "registered": len(registered),
        "unregistered": unregistered,
        "models": [r.num_reg_images() for r in recs],
        "mean_reprojection_error": round(float(rec.compute_mean_reprojection_error()), 4),
        "points": int(rec.num_points3D()),
        "cameras": int(rec.num_cameras()),
        "keypoints": int(feats["keypoints"]),
        "pairs": matched["pairs"],
        "verified_pairs": matched["verified_pairs"],
    })
    if unregistered:
        more = f" (largest of {len(recs)} models: {', '.join(map(str, info['models']))})" if len(recs) > 1 else ""
        _say(f"budget3d: warning: registered {len(registered)} of {len(names)} images{more}; the scene keeps those, "
             f"the other {len(unregistered)} (e.g. {unregistered[0]}) are listed in {PROCESS_JSON}; to register "
             "them: more overlap between photos, --matcher exhaustive, or a larger --max-size")

    scene = tmp / "scene"
    scene.mkdir()
    t = time.perf_counter()
    orig_cams = {im.name: rec.cameras[im.camera_id] for im in rec.images.values()}
    with _bar("undistortion", progress):
        sfm.undistort(rec, staged, tmp / "undistort", scene / "images", scene / "sparse" / "0")
    if masks is not None:
        _undistort_masks(scene, masks, orig_cams, sfm)
    secs["undistortion"] = sfm.seconds(t)
    t = time.perf_counter()
    _downscaled_copies(scene / "images", progress)
    secs["downscale"] = sfm.seconds(t)
    secs["total"] = sfm.seconds(t_all)
    info["seconds"] = secs
    return info


class _bar:
    """A one-step bar for a stage with no finer progress."""

    def __init__(self, desc, progress):
        self.desc, self.progress = desc, progress

    def __enter__(self):
        from budget3d.capture.sfm import stage_bar

        self._cm = stage_bar(self.desc, 1, self.progress)
        self.bar = self._cm.__enter__()
        return self.bar

    def __exit__(self, *exc):
        self.bar.update(1)
        return self._cm.__exit__(*exc)


def _undistort_masks(scene: Path, masks: Path, orig_cams: dict, sfm) -> None:
    """Warp each staged mask into its undistorted camera (COLMAP's warp of the photo)."""
    import cv2
    import numpy as np
    import pycolmap

    und = pycolmap.Reconstruction(scene / "sparse" / "0")
    (scene / "masks").mkdir()
    maps = {}
    for im in und.images.values():
        f = masks / (im.name + ".png")
        if not f.is_file():
            continue
        cam = und.cameras[im.camera_id]
        src = orig_cams[im.name]
        key = (src.camera_id, im.camera_id)
        if key not in maps:
            maps[key] = sfm.mask_maps(src, cam)
        m = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        warped = cv2.remap(m, *maps[key], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        cv2.imwrite(str(scene / "masks" / (im.name + ".png")), np.where(warped >= 128, 255, 0).astype(np.uint8))


def _downscaled_copies(images: Path, progress: bool) -> None:
    """images_N/ for N in DOWNSCALES, each round(size / N) as the COLMAP reader expects."""
    import cv2
    from tqdm import tqdm

    files = sorted(f for f in images.iterdir() if f.is_file())
    for f in tqdm(files, desc="downscaled copies", disable=not progress, dynamic_ncols=True, leave=False):
        img = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UserError(f"{f}: the undistorted image cannot be read back; check the free disk space")
        h, w = img.shape[:2]
        for n in DOWNSCALES:
            size = (int(round(w / n)), int(round(h / n)))
            if min(size) < 16:
                continue
            d = images.parent / f"images_{n}"
            d.mkdir(exist_ok=True)
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if f.suffix.lower() in (".jpg", ".jpeg") else []
            cv2.imwrite(str(d / f.name), cv2.resize(img, size, interpolation=cv2.INTER_AREA), params)


def summary(info: dict) -> str:
    s = info["seconds"]
    parts = ", ".join(f"{k} {_dur(s[k])}" for k in ("features", "matching", "mapping") if k in s)
    return (f"scene: {info['scene']}  registered {info['registered']}/{info['total']} images, "
            f"{info['points']:,} points, reprojection {info['mean_reprojection_error']:.2f} px, "
            f"{_dur(s['total'])} ({parts})")


def _dur(sec: float) -> str:
    return f"{sec:.0f} s" if sec < 90 else f"{int(sec // 60)} min {int(sec % 60)} s"


# ----------------------------------------------------------------------------- the trainer's hook


def maybe_process(data: str, run_dir, progress: bool = True) -> str:
    """``budget3d train --data PHOTOS|VIDEO``: process into RUN/scene first (or reuse the one there
    made from the same input) and return the scene to train; any other path is returned as is."""
    from budget3d.capture.inputs import capture_kind

    kind = capture_kind(data)
    if kind is None:
        return data
    scene = Path(run_dir) / "scene"
    src = str(Path(data).expanduser().resolve())
    done = scene / PROCESS_JSON
    if done.is_file():
        try:
            made_from = json.loads(done.read_text()).get("input")
        except (OSError, ValueError):
            made_from = None
        if made_from == src:
            _say(f"budget3d: training {scene}, made from {data} by an earlier 'budget3d process'")
            return str(scene)
        raise UserError(f"{scene} holds a scene made from {made_from}, not {data}; choose another --out")
    what = "a video" if kind == "video" else "a folder of photos"
    _say(f"budget3d: {data} is {what}, not a scene with camera poses: running 'budget3d process {data} "
         f"--out {scene}' first")
    info = process(data, scene, ProcessOptions(), progress)
    _say(summary(info))
    return str(scene)


# ----------------------------------------------------------------------------- the command


def add_arguments(p) -> None:
    d = ProcessOptions()
    p.add_argument("input", metavar="INPUT", help="a folder of photos (JPEG, PNG, WebP) or a video (mp4, mov, webm)")
    p.add_argument("--out", required=True, metavar="SCENE", help="scene folder to write (must not exist yet)")
    p.add_argument("--frames", type=int, default=d.frames,
                   help=f"video: frames to keep, the sharpest of each equal window (default {d.frames})")
    p.add_argument("--max-size", type=int, default=d.max_size,
                   help=f"SIFT on images at most this many pixels on the long side (default {d.max_size}; "
                        "larger finds more features, slower)")
    p.add_argument("--matcher", choices=["auto", "exhaustive", "sequential"], default=d.matcher,
                   help="image pairs to match: every pair, or neighbours in capture order (default auto: "
                        "exhaustive up to 100 photos, sequential for more and for video)")
    p.add_argument("--mapper", choices=["incremental", "global"], default=d.mapper,
                   help=f"pycolmap's incremental or global (GLOMAP) mapping (default {d.mapper})")
    p.add_argument("--camera-model", default=d.camera_model, type=str.upper,
                   choices=["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"],
                   help=f"camera model estimated, then undistorted to PINHOLE (default {d.camera_model})")
    p.add_argument("--single-camera", action="store_true",
                   help="one camera (intrinsics) for every image (default: one per image size; video: always one)")
    p.add_argument("--masks", metavar="DIR",
                   help="masks named like the photos: black pixels are ignored by SIFT and by training")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    opts = ProcessOptions(frames=args.frames, max_size=args.max_size, matcher=args.matcher, mapper=args.mapper,
                          camera_model=args.camera_model, single_camera=args.single_camera, masks=args.masks)
    info = process(args.input, args.out, opts, progress=not args.quiet)
    print(summary(info))
    print(f"next: budget3d train --data {args.out} --budget 200k --out runs/NAME   (or --downscale 4 for speed)")
    return 0


__all__ = ["PROCESS_JSON", "ProcessOptions", "add_arguments", "main", "maybe_process", "process", "summary"]
