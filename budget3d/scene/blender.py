"""Blender-synthetic scenes (NeRF-synthetic layout).

    scene/
      transforms_train.json   {"camera_angle_x": ..., "frames": [{"file_path": "./train/r_0",
      transforms_test.json                                      "transform_matrix": 4x4}, ...]}
      train/*.png test/*.png  RGBA, composited on the chosen background (white by default)
      points3d.ply            optional initial point cloud (x, y, z, red, green, blue)

``transform_matrix`` is camera-to-world in OpenGL axes (y up, z back); ``file_path`` usually has
no extension (``.png`` is appended). ``transforms_val.json`` is ignored. Without
``transforms_test.json`` every ``test_every``-th training frame is held out. Blender files have
no point cloud, but a ``points3d.ply`` beside them (the bundled scene ships one) is loaded.
Optional ``w``/``h``/``fl_x``/``fl_y``/``cx``/``cy`` keys are honoured; otherwise the image size
is read from the first image's header and the principal point is the image centre.
"""

from __future__ import annotations

import math
from pathlib import Path

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, Scene
from budget3d.scene.common import (
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

POINTS_FILE = "points3d.ply"


def _num(meta: dict, key: str, where: Path):
    v = meta.get(key)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        v = float("nan")
    if not math.isfinite(v) or v <= 0 and key not in ("cx", "cy"):
        raise UserError(f"{where}: '{key}' must be a positive number (got {meta.get(key)!r}); fix the file")
    return v


def _frames(path: Path) -> tuple[dict, list]:
    meta = read_json(path)
    frames = meta.get("frames")
    if not isinstance(frames, list):
        raise UserError(f"{path}: no 'frames' list; a Blender transforms file needs camera_angle_x and frames")
    return meta, frames


def load_blender(root: Path, *, downscale=1, background=(1.0, 1.0, 1.0), test_every=8, cache=True) -> Scene:
    root = Path(root)
    train_json, test_json = root / "transforms_train.json", root / "transforms_test.json"
    splits = {"train": _frames(train_json)}
    if test_json.is_file():
        splits["test"] = _frames(test_json)
    if not any(frames for _, frames in splits.values()):
        raise UserError(f"{train_json}: no frames (empty scene); add frames or point to another scene folder")

    size = None  # (w, h) of the first found image, read from its header once
    views = {"train": [], "test": []}
    n_skipped, n_total, example = 0, 0, ""
    for split, (meta, frames) in splits.items():
        where = root / f"transforms_{split}.json"
        angle_x = _num(meta, "camera_angle_x", where)
        fl_x = _num(meta, "fl_x", where)
        if angle_x is None and fl_x is None:
            raise UserError(f"{where}: missing 'camera_angle_x' (horizontal field of view in radians); add it")
        for i, fr in enumerate(frames):
            n_total += 1
            if not isinstance(fr, dict) or "file_path" not in fr or "transform_matrix" not in fr:
                raise UserError(f"{where}: frame {i} needs 'file_path' and 'transform_matrix'; fix the file")
            img_path, prescaled = find_image(root, str(fr["file_path"]), downscale=downscale)
            if img_path is None:
                n_skipped += 1
                example = example or str(fr["file_path"])
                continue
            w2c = gl_c2w_to_w2c(pose_matrix(fr["transform_matrix"], f"{where} frame {i}"), f"{where} frame {i}")
            if "w" in meta and "h" in meta:
                w, h = int(_num(meta, "w", where)), int(_num(meta, "h", where))
            else:
                if size is None:
                    size = image_size(img_path)
                    if prescaled:  # measured on a downscaled copy: the source size is ~N times larger
                        size = (int(round(size[0] * downscale)), int(round(size[1] * downscale)))
                w, h = size
            fx = fl_x if fl_x is not None else 0.5 * w / math.tan(0.5 * angle_x)
            fy = _num(meta, "fl_y", where)
            if fy is None:
                angle_y = _num(meta, "camera_angle_y", where)
                fy = 0.5 * h / math.tan(0.5 * angle_y) if angle_y is not None and fl_x is None else fx
            cx = _num(meta, "cx", where)
            cy = _num(meta, "cy", where)
            cam = Camera(fx, fy, w / 2.0 if cx is None else cx, h / 2.0 if cy is None else cy, w, h, w2c)
            name = img_path.relative_to(root).as_posix() if img_path.is_relative_to(root) else str(img_path)
            views[split].append(
                make_view(name, img_path, cam, downscale=downscale, background=background, cache=cache, prescaled=prescaled)
            )
    if not views["train"] and not views["test"]:
        raise UserError(
            f"{train_json}: none of the {n_total} images listed exist (e.g. {example}); "
            "check the scene folder is complete"
        )
    warn_skipped(n_skipped, n_total, root, example)

    train, test = views["train"], views["test"]
    if "test" not in splits:  # no dataset split: hold out every test_every-th frame
        tr, te = split_indices(len(train), test_every)
        train, test = [train[i] for i in tr], [train[i] for i in te]
    if not train:
        raise UserError(f"{train_json}: no training frames with images; add frames or point to another scene folder")

    points = colors = None
    if (root / POINTS_FILE).is_file():
        points, colors = read_ply_points(root / POINTS_FILE)
    return Scene(
        format="blender",
        path=str(root),
        train=train,
        test=test,
        points=points,
        colors=colors,
        background=tuple(background),
        n_skipped=n_skipped,
    )
