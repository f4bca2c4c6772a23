"""nerfstudio / instant-ngp ``transforms.json``.

Intrinsics (``fl_x fl_y cx cy w h``, or ``camera_angle_x``/``camera_angle_y``) and distortion
(``k1 k2 k3 p1 p2``; ``k1..k4`` with ``camera_model: OPENCV_FISHEYE``) are global or per frame
(a frame's own keys win). Distorted images are undistorted with OpenCV to a pinhole camera with
the same fx, fy, cx, cy. ``transform_matrix`` is camera-to-world in OpenGL axes. ``aabb_scale``
is recorded in ``Scene.meta``; ``ply_file_path`` gives initial points. Frames whose image is
missing are skipped with one warning. Split: ``test_filenames`` (or ``val_filenames``) and
``train_filenames`` when present, else every ``test_every``-th frame (sorted by file name).
"""

from __future__ import annotations

import math
import posixpath
import warnings
from pathlib import Path

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, Scene
from budget3d.scene.common import (
    Undistorter,
    find_image,
    gl_c2w_to_w2c,
    image_size,
    make_view,
    pose_matrix,
    read_json,
    read_ply_points,
    split_indices,
    warn_skipped,
)

PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")
SUPPORTED_MODELS = ("OPENCV", "OPENCV_FISHEYE", "PINHOLE", "SIMPLE_PINHOLE")
_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "k1", "k2", "k3", "k4", "p1", "p2", "camera_angle_x", "camera_angle_y")


def _norm(p: str) -> str:
    return posixpath.normpath(str(p).replace("\\", "/"))


def _float(d: dict, key: str, where: str):
    v = d.get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v):
        raise UserError(f"{where}: '{key}' must be a number (got {d.get(key)!r}); fix the file")
    return v


def load_nerfstudio(path: Path, *, downscale=1, background=(1.0, 1.0, 1.0), test_every=8, cache=True) -> Scene:
    path = Path(path)
    root = path.parent
    meta = read_json(path)
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise UserError(f"{path}: no 'frames' list; a transforms.json needs frames with file_path and transform_matrix")
    if not frames:
        raise UserError(f"{path}: no frames (empty scene); add frames or point to another scene folder")
    for i, fr in enumerate(frames):
        if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
            raise UserError(f"{path}: frame {i} needs 'file_path' and 'transform_matrix'; fix the file")
    frames = sorted(frames, key=lambda fr: str(fr["file_path"]))

    first_size = None
    undistorters: dict = {}
    entries = []  # (normalised file_path, View)
    n_skipped, example = 0, ""
    for i, fr in enumerate(frames):
        where = f"{path} frame '{fr['file_path']}'"
        img_path, prescaled = find_image(root, str(fr["file_path"]), downscale=downscale)
        if img_path is None:
            n_skipped += 1
            example = example or str(fr["file_path"])
            continue
        p = {k: _float(fr, k, where) if k in fr else _float(meta, k, str(path)) for k in _KEYS}
        model = str(fr.get("camera_model", meta.get("camera_model", "OPENCV"))).upper()
        if model not in SUPPORTED_MODELS:
            raise UserError(
                f"{path}: camera_model {model} is not supported (supported: {', '.join(SUPPORTED_MODELS)}); "
                "undistort the images first (e.g. ns-process-data) or convert the cameras"
            )
        w, h = p["w"], p["h"]
        if w is None or h is None:
            if first_size is None:
                first_size = image_size(img_path)
                if prescaled:
                    first_size = (int(round(first_size[0] * downscale)), int(round(first_size[1] * downscale)))
            w, h = first_size
        w, h = int(round(w)), int(round(h))
        fx, fy = p["fl_x"], p["fl_y"]
        if fx is None:
            if p["camera_angle_x"] is None:
                raise UserError(f"{where}: no focal length; add 'fl_x' (pixels) or 'camera_angle_x' (radians)")
            fx = 0.5 * w / math.tan(0.5 * p["camera_angle_x"])
        if fy is None:
            fy = 0.5 * h / math.tan(0.5 * p["camera_angle_y"]) if p["camera_angle_y"] is not None else fx
        if fx <= 0 or fy <= 0 or w <= 0 or h <= 0:
            raise UserError(f"{where}: focal lengths and image size must be positive; fix the file")
        cx = p["cx"] if p["cx"] is not None else w / 2.0
        cy = p["cy"] if p["cy"] is not None else h / 2.0
        c = {k: (p[k] or 0.0) for k in ("k1", "k2", "k3", "k4", "p1", "p2")}
        und = None
        if model == "OPENCV_FISHEYE":
            coeffs, kind = (c["k1"], c["k2"], c["k3"], c["k4"]), "fisheye"
        else:
            coeffs, kind = (c["k1"], c["k2"], c["p1"], c["p2"], c["k3"]), "opencv"
        if any(coeffs):
            key = (kind, fx, fy, cx, cy, w, h, coeffs)
            if key not in undistorters:
                undistorters[key] = Undistorter(kind, fx, fy, cx, cy, w, h, coeffs)
            und = undistorters[key]
        w2c = gl_c2w_to_w2c(pose_matrix(fr["transform_matrix"], where), where)
        cam = Camera(fx, fy, cx, cy, w, h, w2c)
        name = _norm(fr["file_path"])
        entries.append(
            (name, make_view(name, img_path, cam, downscale=downscale, background=background, cache=cache, undistort=und, prescaled=prescaled))
        )
    if not entries:
        raise UserError(
            f"{path}: none of the {len(frames)} images listed exist (e.g. {example}); check the scene folder is complete"
        )
    warn_skipped(n_skipped, len(frames), path, example)

    test_names = meta.get("test_filenames") or meta.get("val_filenames")
    if test_names:
        test_set = {_norm(n) for n in test_names}
        train_set = {_norm(n) for n in meta["train_filenames"]} if meta.get("train_filenames") else None
        test = [v for n, v in entries if n in test_set]
        train = [v for n, v in entries if n not in test_set and (train_set is None or n in train_set)]
    else:
        tr, te = split_indices(len(entries), test_every)
        train, test = [entries[i][1] for i in tr], [entries[i][1] for i in te]
    if not train:
        raise UserError(f"{path}: the split leaves no training frames; fix train_filenames/test_filenames")

    points = colors = None
    if meta.get("ply_file_path"):
        ply = root / str(meta["ply_file_path"])
        if ply.is_file():
            points, colors = read_ply_points(ply)
        else:
            warnings.warn(f"{path}: ply_file_path {ply} does not exist; loading without initial points", UserWarning, stacklevel=2)
    extra = {}
    if "aabb_scale" in meta:
        extra["aabb_scale"] = meta["aabb_scale"]
    scene = Scene(
        format="nerfstudio",
        path=str(root),
        train=train,
        test=test,
        points=points,
        colors=colors,
        background=tuple(background),
        n_skipped=n_skipped,
    )
    scene.meta.update(extra)
    return scene
