"""``load_scene``: one entry point that detects the scene format; ``describe``: a summary dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from budget3d.errors import UserError
from budget3d.scene.camera import Scene
from budget3d.scene.common import check_background, check_downscale

EXPECTED = (
    "transforms_train.json (Blender), transforms.json (nerfstudio / instant-ngp), "
    "sparse/0/cameras.bin|txt + images.bin|txt (COLMAP) or poses_bounds.npy (LLFF)"
)


def detect_format(path) -> tuple[str, Path]:
    """(format, location) for a scene folder, or a transforms/poses file inside one."""
    from budget3d.scene.colmap import find_model_dir

    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p}: no such file or folder; give the path of a scene folder")
    p = p.resolve()
    if p.is_file():
        if p.name in ("transforms_train.json", "transforms_test.json", "transforms_val.json"):
            return "blender", p.parent
        if p.suffix == ".json":
            return "nerfstudio", p
        if p.name == "poses_bounds.npy":
            return "llff", p.parent
        if p.name.startswith(("cameras.", "images.", "points3D.")):
            return "colmap", p.parent
        raise UserError(f"{p}: not a scene file; give a scene folder containing {EXPECTED}")
    if (p / "transforms_train.json").is_file():
        return "blender", p
    if (p / "transforms.json").is_file():
        return "nerfstudio", p / "transforms.json"
    if find_model_dir(p) is not None:
        return "colmap", p
    if (p / "poses_bounds.npy").is_file():
        return "llff", p
    raise UserError(f"{p}: unknown scene layout; expected {EXPECTED}: point to a folder holding one of them")


def load_scene(path, *, downscale=1, background=(1.0, 1.0, 1.0), test_every=8, cache=True) -> Scene:
    """Load a Blender, nerfstudio/instant-ngp, COLMAP or LLFF scene, detecting the format.

    Cameras are built now (no image is decoded beyond a header where the format lacks sizes);
    images load on first ``View.image()`` as uint8 RGB, composited on ``background`` (0..1),
    undistorted where the format has distortion, downscaled by ``downscale``, and cached when
    ``cache``. The dataset's own test split is used where it has one, else every
    ``test_every``-th image (0: no test images). Bad input raises ``UserError``.
    """
    downscale = check_downscale(downscale)
    background = check_background(background)
    try:
        test_every = int(test_every)
    except (TypeError, ValueError):
        raise UserError(f"test_every must be an integer (got {test_every!r}); e.g. 8, or 0 for no test split") from None
    fmt, where = detect_format(path)
    kw = dict(downscale=downscale, background=background, test_every=test_every, cache=cache)
    if fmt == "blender":
        from budget3d.scene.blender import load_blender

        return load_blender(where, **kw)
    if fmt == "nerfstudio":
        from budget3d.scene.nerfstudio import load_nerfstudio

        return load_nerfstudio(where, **kw)
    if fmt == "colmap":
        from budget3d.scene.colmap import load_colmap

        return load_colmap(where, **kw)
    from budget3d.scene.llff import load_llff

    return load_llff(where, **kw)


def _round(a, nd=4):
    return [round(float(x), nd) for x in a]


def describe(scene: Scene) -> dict:
    """A JSON-ready summary: format, counts, image size, bounds of camera centres and points."""
    views = scene.train + scene.test
    cams = [v.camera for v in views]
    sizes = sorted({(c.width, c.height) for c in cams})
    centers = np.stack([c.center for c in cams]) if cams else np.zeros((0, 3))
    pts = scene.points if scene.points is not None and len(scene.points) else np.zeros((0, 3))
    allp = np.concatenate([centers, np.asarray(pts, np.float64)], axis=0)
    out = {
        "format": scene.format,
        "path": scene.path,
        "n_train": len(scene.train),
        "n_test": len(scene.test),
        "width": cams[0].width if cams else 0,
        "height": cams[0].height if cams else 0,
        "n_points": 0 if scene.points is None else int(len(scene.points)),
        "n_skipped": int(scene.n_skipped),
        "bounds": {"min": _round(allp.min(0)), "max": _round(allp.max(0))} if len(allp) else None,
        "camera_bounds": {"min": _round(centers.min(0)), "max": _round(centers.max(0))} if len(centers) else None,
        "point_bounds": {"min": _round(pts.min(0)), "max": _round(pts.max(0))} if len(pts) else None,
        "camera_extent": round(scene.camera_extent(), 4) if cams else 0.0,
        "background": list(scene.background),
    }
    if len(sizes) > 1:
        out["sizes"] = [f"{w}x{h}" for w, h in sizes]
    if cams:
        out["focal"] = _round([cams[0].fx, cams[0].fy], 3)
    if scene.near_far is not None:
        out["near_far"] = _round(scene.near_far)
    for k, v in getattr(scene, "meta", {}).items():
        out.setdefault(k, v)
    return out
