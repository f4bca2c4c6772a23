"""Structure from motion with pycolmap (CPU, no COLMAP binary): SIFT, matching, mapping, undistortion.

Each stage runs in chunks so that it has a progress bar: features a few images at a time (the
images and their cameras, one per image size or one for all, are imported first, so the chunks
share them), matching
a list of image pairs at a time (all pairs for a small set, neighbours in capture order for a video
or a long series), mapping with pycolmap's own per-image callback (incremental) or a ticking bar
(global). pycolmap's own log is silenced to errors; what matters goes into process.json.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import cv2  # noqa: F401  before pycolmap: imported after it, OpenCV's PNG writer crashes (their zlibs clash)

from budget3d.errors import UserError

MATCHERS = ("auto", "exhaustive", "sequential")
MAPPERS = ("incremental", "global")
CAMERA_MODELS = ("SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV")
EXHAUSTIVE_MAX = 100  # "auto": every pair up to this many photos (4,950 pairs), neighbours beyond
SEQUENTIAL_OVERLAP = 10  # neighbours matched in capture order, plus 2^k further ones (COLMAP's quadratic overlap)


@contextlib.contextmanager
def quiet_colmap():
    """pycolmap logs every step at INFO to stderr; keep errors only while it works."""
    import pycolmap

    old = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 2
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = old


@contextlib.contextmanager
def stage_bar(desc: str, total, progress: bool, unit: str = "it"):
    """A tqdm bar that also ticks once a second, so a stage without callbacks still shows time passing."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, leave=False)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    t = threading.Thread(target=tick, daemon=True)
    if progress:
        t.start()
    try:
        yield bar
    finally:
        stop.set()
        if progress:
            t.join()
        bar.close()


def extract_features(db: Path, images: Path, names: list, *, camera_model: str, sizes: dict = None,
                     max_size: int, masks: Path = None, progress: bool = True) -> dict:
    """SIFT keypoints and descriptors of every image into ``db``; returns counts. One camera per
    image size (``sizes``: name -> (width, height)), or one for all when ``sizes`` is None.
    (pycolmap's CameraMode.AUTO made one camera per image here, even for images of one size.)"""
    import pycolmap

    mode = pycolmap.CameraMode.SINGLE
    groups = {}
    for n in names:
        groups.setdefault(None if sizes is None else tuple(sizes[n]), []).append(n)
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    if masks is not None:
        reader.mask_path = Path(masks)
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.max_image_size = int(max_size)
    pycolmap.Database.open(db).close()
    with quiet_colmap():
        for group in groups.values():  # one SINGLE import per size: one camera each
            pycolmap.import_images(db, images, camera_mode=mode, image_names=group, options=reader)
        chunk = max(1, min(8, len(names) // 20 or 1))
        with stage_bar("features", len(names), progress, "img") as bar:
            for i in range(0, len(names), chunk):
                pycolmap.extract_features(db, images, image_names=names[i : i + chunk], camera_mode=mode,
                                          reader_options=reader, extraction_options=extraction)
                bar.update(len(names[i : i + chunk]))
    with pycolmap.Database.open(db) as d:
        return {"cameras": d.num_cameras(), "keypoints": d.num_keypoints()}


def image_pairs(names: list, matcher: str) -> list:
    """The pairs to match: all of them ("exhaustive"), or each image with its next SEQUENTIAL_OVERLAP
    and those 2^k further on ("sequential", for frames in capture order)."""
    n = len(names)
    if matcher == "exhaustive":
        return [(names[i], names[j]) for i in range(n) for j in range(i + 1, n)]
    pairs = set()
    for i in range(n):
        for d in range(1, SEQUENTIAL_OVERLAP + 1):
            if i + d < n:
                pairs.add((i, i + d))
        k = 1
        while i + SEQUENTIAL_OVERLAP * 2 ** k < n:  # quadratic overlap: closes loops around the subject
            pairs.add((i, i + SEQUENTIAL_OVERLAP * 2 ** k))
            k += 1
    return [(names[i], names[j]) for i, j in sorted(pairs)]


def match(db: Path, pairs: list, work: Path, progress: bool = True) -> dict:
    """SIFT matching and geometric verification of ``pairs``; returns counts."""
    import pycolmap

    work.mkdir(parents=True, exist_ok=True)
    chunk = 64
    with quiet_colmap(), stage_bar("matching", len(pairs), progress, "pair") as bar:
        for i in range(0, len(pairs), chunk):
            f = work / "pairs.txt"
            f.write_text("".join(f"{a} {b}\n" for a, b in pairs[i : i + chunk]))
            opts = pycolmap.ImportedPairingOptions()
            opts.match_list_path = f
            pycolmap.match_image_pairs(db, pairing_options=opts)
            bar.update(len(pairs[i : i + chunk]))
    with pycolmap.Database.open(db) as d:
        return {"pairs": len(pairs), "verified_pairs": d.num_verified_image_pairs()}


def reconstruct(db: Path, images: Path, out: Path, mapper: str, n_images: int, progress: bool = True) -> list:
    """Mapping; returns the reconstructions, largest first (registered images, then lower error)."""
    import pycolmap

    out.mkdir(parents=True, exist_ok=True)
    with quiet_colmap():
        if mapper == "incremental":
            opts = pycolmap.IncrementalPipelineOptions()
            opts.min_model_size = 3
            opts.random_seed = 0
            with stage_bar("mapping", n_images, progress, "img") as bar:
                def pair():
                    bar.update(2)

                def one():
                    bar.update(1)

                recs = pycolmap.incremental_mapping(db, images, out, options=opts,
                                                    initial_image_pair_callback=pair, next_image_callback=one)
        else:
            opts = pycolmap.GlobalPipelineOptions()
            opts.min_model_size = 3
            opts.random_seed = 0
            with stage_bar("mapping (global)", None, progress):
                recs = pycolmap.global_mapping(db, images, out, options=opts)
    found = [r for r in recs.values() if r.num_reg_images() >= 3]
    return sorted(found, key=lambda r: (-r.num_reg_images(), r.compute_mean_reprojection_error()))


def undistort(rec, images: Path, work: Path, out_images: Path, out_sparse: Path) -> None:
    """COLMAP's undistortion to PINHOLE cameras: undistorted images and the model beside them."""
    import pycolmap

    model = work / "model"
    model.mkdir(parents=True, exist_ok=True)
    rec.write(model)
    und = work / "undistorted"
    with quiet_colmap():
        pycolmap.undistort_images(und, model, images)
    (und / "images").rename(out_images)
    out_sparse.mkdir(parents=True, exist_ok=True)
    for f in (und / "sparse").iterdir():
        f.rename(out_sparse / f.name)


def mask_maps(cam_from, cam_to):
    """Remap tables (for cv2.remap) that warp an image of camera ``cam_from`` (distorted) into the
    undistorted camera ``cam_to``: the same warp COLMAP's undistorter applies to the photos."""
    import numpy as np

    w, h = cam_to.width, cam_to.height
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    uv = np.stack([u.ravel(), v.ravel()], 1)
    xy = np.asarray(cam_to.cam_from_img(uv), np.float64).reshape(-1, 2)
    src = cam_from.img_from_cam(np.concatenate([xy, np.ones((len(xy), 1))], 1), check_cheirality=False)
    src = np.asarray(src, np.float64).reshape(h, w, 2) - 0.5  # COLMAP's pixel centres at +0.5; OpenCV's at 0
    return src[..., 0].astype(np.float32), src[..., 1].astype(np.float32)


def check_registered(recs: list, n_images: int, verified_pairs: int, max_size: int, matcher: str) -> None:
    """A one-line error with what to try when nothing (or fewer than 3 images) registered."""
    if recs:
        return
    why = ("no two images share enough matched features" if verified_pairs == 0 else
           f"{verified_pairs} image pairs matched but no pair made a good start (too little parallax or overlap)")
    tips = ["take photos with more overlap (each part of the subject in 3 or more photos, about 10-20 degrees "
            "apart, moving around it rather than turning on the spot)"]
    if matcher != "exhaustive":
        tips.append("--matcher exhaustive")
    tips.append(f"a larger --max-size (now {max_size})" if max_size > 0 else "more texture in view")
    raise UserError(f"structure from motion registered none of the {n_images} images ({why}); try: "
                    + "; ".join(tips))


def seconds(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


def version() -> str:
    import pycolmap

    return getattr(pycolmap, "__version__", "unknown")
