"""LLFF ``poses_bounds.npy`` scenes.

    scene/
      poses_bounds.npy   (N, 17): a 3x5 matrix [R | t | hwf] per image, then near, far
      images/            N images, matched to the rows in sorted file-name order
      images_N/          optional downscaled copies, used for downscale=N
      sparse/0/points3D.bin|txt   optional: the COLMAP points the poses came from (the same world
                         frame, so used as they are), even without COLMAP's cameras and images

The rotation's columns are the camera's [down, right, back] axes in world coordinates (LLFF's
convention); we reorder them to OpenCV's [right, down, forward]. ``hwf`` is the full-resolution
height, width and focal length; the principal point is the image centre. If ``images/`` holds
images of another size with the same aspect ratio, the camera is rescaled to them (as LLFF's
own loader does). ``Scene.near_far`` = (min near, max far).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from budget3d.errors import UserError
from budget3d.scene.camera import Camera, Scene
from budget3d.scene.colmap import read_points3d_bin, read_points3d_txt
from budget3d.scene.common import image_size, make_view, split_indices

LLFF_EXTS = (".png", ".jpg", ".jpeg")


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in LLFF_EXTS and not p.name.startswith("."))


def _find_points(root: Path):
    """The COLMAP points3D file that imgs2poses.py leaves beside poses_bounds.npy, or None."""
    for d in (root / "sparse" / "0", root / "sparse"):
        for name in ("points3D.bin", "points3D.txt"):
            if (d / name).is_file():
                return d / name
    return None


def load_llff(root: Path, *, downscale=1, background=(1.0, 1.0, 1.0), test_every=8, cache=True) -> Scene:
    root = Path(root)
    pb_path = root / "poses_bounds.npy"
    try:
        arr = np.load(pb_path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{pb_path}: cannot read as a numpy array ({e}); regenerate it with LLFF's imgs2poses.py") from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise UserError(f"{pb_path}: expected an (N, 17) array, got shape {arr.shape}; regenerate it with imgs2poses.py")
    if len(arr) == 0:
        raise UserError(f"{pb_path}: no poses (empty scene); regenerate it with imgs2poses.py")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise UserError(f"{pb_path}: contains NaN or infinite values; regenerate it with imgs2poses.py")
    poses = arr[:, :15].reshape(-1, 3, 5)
    bounds = arr[:, 15:17]

    full_dir = root / "images"
    n = int(downscale) if float(downscale).is_integer() else 0
    small_dir = root / f"images_{n}" if n > 1 else None
    img_dir, prescaled = (small_dir, True) if small_dir is not None and small_dir.is_dir() else (full_dir, False)
    if not img_dir.is_dir():
        raise UserError(f"{root}: poses_bounds.npy found but no images/ folder; put the {len(arr)} images in {full_dir}")
    files = _list_images(img_dir)
    if len(files) != len(arr):
        raise UserError(
            f"{img_dir}: has {len(files)} images but {pb_path.name} has {len(arr)} poses; "
            "the folder must hold exactly one image per pose"
        )

    # Reference size of the images we will read, at source resolution.
    h0, w0, f0 = poses[0, :, 4]
    iw, ih = image_size(files[0])
    if prescaled:
        iw, ih = iw * downscale, ih * downscale
    scale = 1.0
    if abs(iw - w0) > (downscale if prescaled else 0) or abs(ih - h0) > (downscale if prescaled else 0):
        if abs(iw / ih - w0 / h0) > 0.01 * (w0 / h0):
            raise UserError(
                f"{files[0]}: image is {int(iw)}x{int(ih)} but poses_bounds.npy says {int(w0)}x{int(h0)}; "
                "use the images the poses were computed for"
            )
        scale = iw / w0

    views = []
    for i, f in enumerate(files):
        h, w, focal = poses[i, :, 4] * scale
        down, right, back, t = poses[i, :, 0], poses[i, :, 1], poses[i, :, 2], poses[i, :, 3]
        c2w = np.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, -back, t
        if abs(np.linalg.det(c2w[:3, :3])) < 1e-9:
            raise UserError(f"{pb_path}: pose {i} has a singular rotation; regenerate it with imgs2poses.py")
        w, h = int(round(w)), int(round(h))
        cam = Camera(float(focal), float(focal), w / 2.0, h / 2.0, w, h, np.linalg.inv(c2w))
        views.append(make_view(f.name, f, cam, downscale=downscale, background=background, cache=cache, prescaled=prescaled))

    pts_file = _find_points(root)
    xyz = rgb = None
    if pts_file is not None:
        xyz, rgb = (read_points3d_bin if pts_file.suffix == ".bin" else read_points3d_txt)(pts_file)
    tr, te = split_indices(len(views), test_every)
    return Scene(
        format="llff",
        path=str(root),
        train=[views[i] for i in tr],
        test=[views[i] for i in te],
        points=xyz,
        colors=rgb,
        background=tuple(background),
        near_far=(float(bounds[:, 0].min()), float(bounds[:, 1].max())),
        meta={"points_file": str(pts_file)} if pts_file is not None else {},
    )
