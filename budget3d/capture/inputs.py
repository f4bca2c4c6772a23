"""What ``budget3d process`` starts from: a folder of photos or a video, staged as plain images.

Photos: JPEG, PNG or WebP of any size. Each is decoded (a truncated or unreadable one is named in
the error), turned upright by its EXIF orientation (phones store portrait shots sideways and say
so in EXIF; COLMAP would not turn them), composited on white where it has alpha, and staged under
its own name: copied byte for byte when nothing changed, else re-encoded (JPEG at quality 95,
PNG for the rest).

Video (mp4, mov, webm, ... whatever OpenCV decodes): the frames are split into ``frames`` equal
windows and the sharpest frame of each window is kept (variance of the Laplacian of a grey copy
at most 640 pixels wide: motion blur lowers it), so a shaky hand costs fewer blurred views.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from budget3d.errors import UserError

PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp")
VIDEO_EXTS = (".mp4", ".mov", ".webm", ".m4v", ".avi", ".mkv")
MIN_IMAGES = 3
SHARPNESS_WIDTH = 640


def capture_kind(path) -> Optional[str]:
    """"video" for a video file, "photos" for a folder of photos that is not already a scene
    (no transforms.json, COLMAP model or poses_bounds.npy), else None."""
    p = Path(path).expanduser()
    if p.is_file():
        return "video" if p.suffix.lower() in VIDEO_EXTS else None
    if not p.is_dir():
        return None
    from budget3d.scene import detect_format

    try:
        detect_format(p)
        return None
    except UserError:
        pass
    return "photos" if photo_files(p) else None


def photo_files(folder: Path) -> list:
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in PHOTO_EXTS
                  and not f.name.startswith("."))


# ----------------------------------------------------------------------------- photos


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of a JPEG's bytes; 1 when it has none."""
    if data[:2] != b"\xff\xd8":
        return 1
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: no more metadata segments
            break
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(t: bytes) -> int:
    if len(t) < 8 or t[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if t[:2] == b"II" else "big"
    u16 = lambda o: int.from_bytes(t[o : o + 2], order)  # noqa: E731
    ifd = int.from_bytes(t[4:8], order)
    if ifd + 2 > len(t):
        return 1
    for k in range(u16(ifd)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(t):
            break
        if u16(e) == 0x0112:  # Orientation, a SHORT stored in the value field
            v = u16(e + 8)
            return v if 1 <= v <= 8 else 1
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """The image as it is meant to be seen, for EXIF orientation 1..8."""
    import cv2

    if orientation in (5, 6, 7, 8):
        img = np.ascontiguousarray(img.transpose(1, 0, 2) if img.ndim == 3 else img.T)  # transpose: 5
        if orientation == 6:
            img = cv2.flip(img, 1)
        elif orientation == 7:
            img = cv2.rotate(img, cv2.ROTATE_180)
        elif orientation == 8:
            img = cv2.flip(img, 0)
    elif orientation == 2:
        img = cv2.flip(img, 1)
    elif orientation == 3:
        img = cv2.rotate(img, cv2.ROTATE_180)
    elif orientation == 4:
        img = cv2.flip(img, 0)
    return img


def _why(e: UserError) -> str:
    """The reason part of a decode_image error ("path: reason; what to do")."""
    text = str(e).split(": ", 1)[-1]
    return text.split(";")[0].strip()


def stage_photos(src: Path, dst: Path, progress: bool = True) -> list:
    """Decode, check, orient and copy the photos of ``src`` into ``dst``; returns one dict per
    photo: name (the staged file's), source, width, height, orientation."""
    import cv2
    from tqdm import tqdm

    from budget3d.scene.common import decode_image

    src = Path(src)
    files = photo_files(src)
    if len(files) < MIN_IMAGES:
        others = sorted({f.suffix.lower() for f in src.iterdir() if f.is_file() and f.suffix}
                        - set(PHOTO_EXTS)) if src.is_dir() else []
        also = f" (also found {', '.join(others)} files, which are not read: convert them to JPEG)" if others else ""
        raise UserError(f"{src}: {len(files)} photo{'s' * (len(files) != 1)} (JPEG, PNG or WebP) found{also}; "
                        f"structure from motion needs at least {MIN_IMAGES} overlapping photos (20 or more for a "
                        "good scene): add photos")
    dst.mkdir(parents=True, exist_ok=True)
    out, bad, taken = [], [], set()
    for f in tqdm(files, desc="photos", disable=not progress, dynamic_ncols=True, leave=False):
        try:
            data = f.read_bytes()
            img = decode_image(f)
        except UserError as e:
            bad.append(f"{f.name} ({_why(e)})")
            continue
        except OSError as e:
            bad.append(f"{f.name} ({e.strerror or e})")
            continue
        orient = exif_orientation(data)
        has_alpha = img.shape[2] == 4
        if has_alpha:
            from budget3d.scene.common import composite

            img = composite(img, (1.0, 1.0, 1.0))
        img = apply_orientation(img, orient)
        ext = f.suffix.lower()
        copy = ext in (".jpg", ".jpeg", ".png") and orient == 1 and not has_alpha
        name = f.name if copy or ext in (".jpg", ".jpeg") else f.stem + ".png"
        if name.lower() in taken:
            name = f.name + ".png"
        taken.add(name.lower())
        if copy:
            shutil.copyfile(f, dst / name)
        else:
            params = [cv2.IMWRITE_JPEG_QUALITY, 95] if name.lower().endswith((".jpg", ".jpeg")) else []
            if not cv2.imwrite(str(dst / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), params):
                raise UserError(f"{dst / name}: cannot write the staged photo; check the free disk space")
        out.append({"name": name, "source": f.name, "width": int(img.shape[1]), "height": int(img.shape[0]),
                    "orientation": orient})
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"{src}: {len(bad)} of {len(files)} photos cannot be read: {shown}; replace them (copy them "
                        "again from the phone) or remove them from the folder")
    return out


def stage_masks(masks: Path, photos: list, dst: Path) -> dict:
    """COLMAP-style masks (``dst/<staged name>.png``, 0 = ignore) from ``masks/<photo's name>``
    (or the same stem with any image extension, or COLMAP's ``<name>.png``), oriented and checked
    against their photos; returns {"found": n, "missing": [names]}."""
    import cv2

    masks = Path(masks)
    if not masks.is_dir():
        raise UserError(f"--masks {masks}: no such folder; give a folder of masks named like the photos")
    dst.mkdir(parents=True, exist_ok=True)
    by_stem = {}
    for f in sorted(masks.iterdir()):
        if f.is_file():
            by_stem.setdefault(f.stem.lower(), f)
    found, missing = 0, []
    for ph in photos:
        src = ph["source"]
        cands = [masks / src, masks / (src + ".png")]
        f = next((c for c in cands if c.is_file()), None) or by_stem.get(Path(src).stem.lower())
        if f is None:
            missing.append(src)
            continue
        m = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        if m is None:
            raise UserError(f"{f}: mask is not a readable image; give a black-and-white PNG (black = ignore)")
        w, h = ph["width"], ph["height"]
        if (m.shape[1], m.shape[0]) == (h, w) and w != h:  # drawn on the photo's stored (sideways) pixels
            m = apply_orientation(m[:, :, None], ph["orientation"])[:, :, 0]
        if (m.shape[1], m.shape[0]) != (w, h):
            raise UserError(f"{f}: mask is {m.shape[1]}x{m.shape[0]} but its photo {src} is {w}x{h}; "
                            "masks must have their photo's size")
        cv2.imwrite(str(dst / (ph["name"] + ".png")), np.where(m >= 128, 255, 0).astype(np.uint8))
        found += 1
    if not found:
        raise UserError(f"--masks {masks}: no mask matches a photo's name (e.g. {photos[0]['source']} or "
                        f"{Path(photos[0]['source']).stem}.png); name each mask like its photo")
    return {"found": found, "missing": missing}


# ----------------------------------------------------------------------------- video


def sharpness(frame_bgr: np.ndarray) -> float:
    """Variance of the Laplacian of a grey copy at most SHARPNESS_WIDTH wide (blur lowers it)."""
    import cv2

    g = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
    if g.shape[1] > SHARPNESS_WIDTH:
        g = cv2.resize(g, (SHARPNESS_WIDTH, round(g.shape[0] * SHARPNESS_WIDTH / g.shape[1])),
                       interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(g, cv2.CV_32F).var())


def _open_video(path: Path):
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise UserError(f"{path}: OpenCV cannot open this video (unknown container or codec, or a damaged "
                        f"file); convert it, e.g. 'ffmpeg -i {path.name} -c:v libx264 video.mp4', or extract its "
                        "frames into a folder and process that")
    return cap


def extract_frames(video: Path, dst: Path, target: int, progress: bool = True,
                   on_frame: Optional[Callable] = None) -> dict:
    """The sharpest frame of each of ``target`` equal windows of ``video``, as dst/frame_NNNNN.jpg;
    returns {"frames_total", "fps", "kept": [{name, frame, sharpness}]}."""
    import cv2
    from tqdm import tqdm

    video = Path(video)
    if target < MIN_IMAGES:
        raise UserError(f"--frames {target}: keep at least {MIN_IMAGES} frames (100-200 make a good scene)")
    cap = _open_video(video)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if total <= 0:  # some containers do not say: count them first
        while cap.grab():
            total += 1
        cap.release()
        cap = _open_video(video)
    dst.mkdir(parents=True, exist_ok=True)
    kept, best, window, i = [], None, -1, 0

    def flush():
        if best is not None:
            name = f"frame_{len(kept) + 1:05d}.jpg"
            cv2.imwrite(str(dst / name), best[2], [cv2.IMWRITE_JPEG_QUALITY, 95])
            kept.append({"name": name, "frame": best[1], "sharpness": round(best[0], 2)})

    bar = tqdm(total=total or None, desc="video frames", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            w = i * target // total if total > target else i
            if w != window:
                flush()
                best, window = None, w
            s = sharpness(frame)
            if best is None or s > best[0]:
                best = (s, i, frame)
            i += 1
            bar.update(1)
        flush()
    finally:
        bar.close()
        cap.release()
    if i == 0:
        raise UserError(f"{video}: OpenCV opened the video but decoded no frame from it (an unsupported codec or a "
                        f"damaged file); convert it, e.g. 'ffmpeg -i {video.name} -c:v libx264 video.mp4'")
    if len(kept) < MIN_IMAGES:
        raise UserError(f"{video}: only {len(kept)} frame{'s' * (len(kept) != 1)} decoded; structure from motion "
                        f"needs at least {MIN_IMAGES} (a video of 10 s or more moving around the subject)")
    return {"frames_total": i, "fps": round(fps, 3), "kept": kept}
