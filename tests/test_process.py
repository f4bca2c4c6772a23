"""``budget3d process``: real pycolmap on real images made here (a textured scene with known
cameras), a video written with OpenCV, masks, EXIF orientation, and every failure's one line."""

import json
import math
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from budget3d.capture.inputs import apply_orientation, exif_orientation, stage_photos
from budget3d.cli import main
from budget3d.errors import UserError
from budget3d.scene import load_scene
from conftest import SHARED_DATA
from textured_scene import orbit_cameras, pose_errors, poster, render, write_photos

pytest.importorskip("pycolmap")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *words):
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("budget3d: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def noise_photo(path, seed, w=320, h=240):
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 1.0))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    cams = write_photos(root / "photos")
    return root / "photos", cams


@pytest.fixture(scope="module")
def processed(photos, tmp_path_factory):
    from budget3d.capture import process

    out = tmp_path_factory.mktemp("processed") / "scene"
    info = process(photos[0], out, progress=False)
    return out, info


# ----------------------------------------------------------------------------- the scene it writes


def test_processed_cameras_match_the_known_ones(photos, processed):
    """After the similarity that aligns the camera centres (Umeyama): median centre error <= 1% of
    the cameras' radius, rotation error <= 1 degree."""
    _, cams = photos
    out, info = processed
    assert info["registered"] == info["total"] == len(cams) and info["unregistered"] == []
    scene = load_scene(out, test_every=0)
    by_name = {v.name: v.camera.world_to_camera for v in scene.train}
    names = sorted(by_name)
    true = [cams[int(n[5:8])].world_to_camera for n in names]
    c_err, r_err = pose_errors([by_name[n] for n in names], true)
    assert np.median(c_err) <= 0.01, c_err
    assert np.median(r_err) <= 1.0 and r_err.max() <= 2.0, r_err


def test_processed_folder_is_a_colmap_scene_with_copies_and_a_report(capsys, processed):
    out, info = processed
    assert (out / "sparse" / "0" / "cameras.bin").is_file() and (out / "images").is_dir()
    full = load_scene(out)
    assert full.format == "colmap" and len(full.points) == info["points"] > 500
    assert all(c.fx == c.fy for c in (v.camera for v in full.train))  # undistorted to a pinhole
    for n in (2, 4, 8):
        small = load_scene(out, downscale=n)
        img = small.train[0].image()
        assert img.shape[:2] == (small.train[0].camera.height, small.train[0].camera.width)
        assert (out / f"images_{n}" / full.train[0].name).is_file()
    report = json.loads((out / "process.json").read_text())
    for key in ("registered", "total", "unregistered", "mean_reprojection_error", "points", "seconds", "matcher",
                "mapper", "camera_model", "cameras"):
        assert key in report, key
    assert 0 < report["mean_reprojection_error"] < 1.0 and report["cameras"] == 1
    assert report["matcher"] == "exhaustive"
    assert set(report["seconds"]) >= {"prepare", "features", "matching", "mapping", "undistortion", "total"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    code, stdout, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["n_train"] + json.loads(stdout)["n_test"] == info["registered"]


def test_cli_prints_a_summary_and_refuses_an_existing_scene(capsys, photos, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(8):  # eight neighbouring views: quick
        (few / f"view_{i:03d}.png").write_bytes((photos[0] / f"view_{i:03d}.png").read_bytes())
    code, out, err = run_cli(capsys, "process", few, "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    assert "registered 8/8 images" in out and "budget3d train --data" in out
    code, _, err = run_cli(capsys, "process", few, "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "already exists")


# ----------------------------------------------------------------------------- video


def write_video(path, n=36, blur_odd=True):
    """The textured scene along a 110-degree arc as an mp4 (OpenCV's mp4v); odd frames blurred."""
    cams = orbit_cameras(n, arc=math.radians(110), seed=2)
    tex = poster()
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
    assert wr.isOpened()
    for i, c in enumerate(cams):
        frame = render(c, tex)
        wr.write(cv2.GaussianBlur(frame, (0, 0), 3.0) if blur_odd and i % 2 else frame)
    wr.release()
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_video_frames_are_the_sharpest_of_each_window(video, tmp_path):
    from budget3d.capture.inputs import extract_frames

    got = extract_frames(video, tmp_path / "frames", 18, progress=False)
    assert got["frames_total"] == 36 and len(got["kept"]) == 18
    assert [k["frame"] for k in got["kept"]] == list(range(0, 36, 2))  # the sharp one of each pair
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [k["name"] for k in got["kept"]]
    assert len(extract_frames(video, tmp_path / "all", 100, progress=False)["kept"]) == 36  # fewer frames than asked


def test_train_on_a_video_processes_it_first(capsys, video, tmp_path):
    """'budget3d train --data VIDEO' processes it into RUN/scene (one camera, sequential matching),
    says so, and trains; the run's config names the scene."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", video, "--out", run, "--iters", 60, "--budget", 3000,
                             "--downscale", 2, "--quiet")
    assert code == 0, err
    assert "is a video" in err and "budget3d process" in err
    report = json.loads((run / "scene" / "process.json").read_text())
    assert report["kind"] == "video" and report["matcher"] == "sequential" and report["cameras"] == 1
    assert report["video"]["frames_total"] == report["total"] == 36
    assert report["registered"] >= 30, report
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_gaussians"] == 3000 and metrics["psnr"] > 10
    assert "appearance" in metrics and "pose_refinement" not in metrics  # the defaults for a processed capture
    cfg = json.loads((run / "config.json").read_text())
    assert Path(cfg["data"]) == (run / "scene").resolve() and cfg["appearance"] and not cfg["pose_opt"]


# ----------------------------------------------------------------------------- photos


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + \
        struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def test_exif_orientation_is_honoured_as_opencv_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), (0, 0), 2)
    jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    raw = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    src = tmp_path / "src"
    src.mkdir()
    for o in range(1, 9):
        data = _with_exif_orientation(jpeg, o)
        assert exif_orientation(data) == o
        upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies EXIF
        np.testing.assert_array_equal(apply_orientation(raw, o), upright)
        (src / f"p{o}.jpg").write_bytes(data)
    staged = stage_photos(src, tmp_path / "staged", progress=False)
    for s in staged:
        o = s["orientation"]
        assert (s["width"], s["height"]) == ((30, 50) if o >= 5 else (50, 30))
        got = cv2.imread(str(tmp_path / "staged" / s["name"]), cv2.IMREAD_UNCHANGED)
        assert got.shape[:2] == (s["height"], s["width"])
    assert {s["name"] for s in staged if s["orientation"] == 1} == {"p1.jpg"}  # copied as is


def test_png_and_webp_with_alpha_are_staged_on_white(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 2] = 255  # red in BGR(A), alpha 0 on the left half
    rgba[:, 15:, 3] = 255
    for ext in (".png", ".webp"):
        assert cv2.imwrite(str(src / f"a{ext}"), rgba, [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else [])
    cv2.imwrite(str(src / "b.jpg"), rgba[..., :3])
    staged = {s["source"]: s for s in stage_photos(src, tmp_path / "out", progress=False)}
    assert staged["a.png"]["name"] == "a.png" and staged["a.webp"]["name"] == "a.webp.png"  # no clash
    assert staged["b.jpg"]["name"] == "b.jpg"
    for s in ("a.png", "a.webp"):
        got = cv2.imread(str(tmp_path / "out" / staged[s]["name"]))
        assert got[:, :10].min() >= 250 and got[:, 20:, 2].min() >= 250 and got[:, 20:, 0].max() <= 5


# ----------------------------------------------------------------------------- masks


def test_masks_keep_features_out_and_follow_the_images(photos, tmp_path):
    """Masks black on the left half: no feature of the model lies there; the scene's masks/ are the
    undistorted masks, and the COLMAP reader hands them to training."""
    import pycolmap

    from budget3d.capture import ProcessOptions, process

    src, _ = photos
    masks = tmp_path / "masks"
    masks.mkdir()
    sub = tmp_path / "photos"
    sub.mkdir()
    for i in range(12):
        name = f"view_{i:03d}.png"
        (sub / name).write_bytes((src / name).read_bytes())
        m = np.full((240, 320), 255, np.uint8)
        m[:, :160] = 0
        cv2.imwrite(str(masks / name), m)
    out = tmp_path / "scene"
    info = process(sub, out, ProcessOptions(masks=str(masks)), progress=False)
    assert info["masks"]["found"] == 12 and info["registered"] >= 10
    rec = pycolmap.Reconstruction(out / "sparse" / "0")
    xs = np.concatenate([[p.xy[0] for p in im.points2D] for im in rec.images.values()])
    assert len(xs) > 500 and xs.min() > 150, xs.min()
    scene = load_scene(out, downscale=2)
    v = scene.train[0]
    mask = v.mask()
    assert mask.shape == (v.camera.height, v.camera.width) and mask.dtype == bool
    assert not mask[:, : v.camera.width // 2 - 3].any() and mask[:, v.camera.width // 2 + 3 :].all()


# ----------------------------------------------------------------------------- failures, one line each


def test_fewer_than_three_photos(capsys, photos, tmp_path):
    d = tmp_path / "two"
    d.mkdir()
    for i in range(2):
        (d / f"view_{i:03d}.png").write_bytes((photos[0] / f"view_{i:03d}.png").read_bytes())
    (d / "notes.txt").write_text("not a photo")
    code, _, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "2 photos", "at least 3")
    assert not (tmp_path / "s").exists()


def test_truncated_and_unreadable_photos_are_named(capsys, photos, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(4):
        img = cv2.imread(str(photos[0] / f"view_{i:03d}.png"))
        cv2.imwrite(str(d / f"view_{i:03d}.jpg"), img)
    data = (d / "view_003.jpg").read_bytes()
    (d / "view_003.jpg").write_bytes(data[: len(data) // 2])
    (d / "view_009.png").write_bytes(b"this is not a png")
    code, _, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    line = one_line_error(code, err, "2 of 5 photos cannot be read", "view_003.jpg", "view_009.png", "truncated")
    assert "view_000" not in line
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial*"))


def test_a_video_opencv_cannot_open(capsys, tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "process", bad, "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "clip.mp4", "OpenCV", "ffmpeg")


def test_nothing_registers_says_what_to_try(capsys, tmp_path):
    d = tmp_path / "noise"
    d.mkdir()
    for i in range(4):
        noise_photo(d / f"n{i}.png", seed=i)
    code, _, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "registered none of the 4 images", "overlap", "--max-size")
    code, _, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet", "--matcher", "sequential")
    one_line_error(code, err, "--matcher exhaustive")
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial*"))


def test_no_initial_pair_without_parallax(capsys, photos, tmp_path):
    """Copies of one photo match perfectly but have no parallax: no initial pair."""
    d = tmp_path / "same"
    d.mkdir()
    for i in range(3):
        (d / f"c{i}.png").write_bytes((photos[0] / "view_000.png").read_bytes())
    code, _, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "registered none of the 3 images", "no pair made a good start", "overlap")


def test_partial_registration_keeps_the_largest_model_and_lists_the_rest(capsys, photos, tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(10):
        (d / f"view_{i:03d}.png").write_bytes((photos[0] / f"view_{i:03d}.png").read_bytes())
    for i in range(3):
        noise_photo(d / f"zz_noise_{i}.png", seed=10 + i)
    code, out, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    warn = [x for x in err.splitlines() if x.startswith("budget3d: warning: ")]
    assert len(warn) == 1 and "registered 10 of 13 images" in warn[0] and "process.json" in warn[0], err
    report = json.loads((tmp_path / "s" / "process.json").read_text())
    assert report["registered"] == 10 and sorted(report["unregistered"]) == [f"zz_noise_{i}.png" for i in range(3)]
    assert len(load_scene(tmp_path / "s", test_every=0).train) == 10


def test_two_separate_captures_keep_the_larger_model(capsys, photos, tmp_path):
    """Ten photos of one scene and five of another (no shared content) make two models: the larger
    one is the scene, the other five are named as unregistered, and the model sizes are reported."""
    d = tmp_path / "two"
    d.mkdir()
    for i in range(10):
        (d / f"view_{i:03d}.png").write_bytes((photos[0] / f"view_{i:03d}.png").read_bytes())
    tex = poster(seed=7)
    for i, c in enumerate(orbit_cameras(5, arc=math.radians(40), seed=3)):
        cv2.imwrite(str(d / f"zz_other_{i}.png"), render(c, tex))
    code, out, err = run_cli(capsys, "process", d, "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    warn = [x for x in err.splitlines() if x.startswith("budget3d: warning: ")]
    assert len(warn) == 1 and "registered 10 of 15 images" in warn[0], err
    report = json.loads((tmp_path / "s" / "process.json").read_text())
    assert report["models"][0] == 10 and len(report["models"]) >= 2 and report["models"][1] >= 3, report["models"]
    assert sorted(report["unregistered"]) == [f"zz_other_{i}.png" for i in range(5)]
    assert sorted(v.name for v in load_scene(tmp_path / "s", test_every=0).train) == \
        [f"view_{i:03d}.png" for i in range(10)]


def test_a_folder_that_is_already_a_scene_is_not_processed(capsys, processed, tmp_path):
    code, _, err = run_cli(capsys, "process", processed[0], "--out", tmp_path / "s", "--quiet")
    one_line_error(code, err, "already a colmap scene", "budget3d train --data")


def test_opencv_still_writes_png_once_pycolmap_is_loaded(tmp_path):
    """Imported before OpenCV, pycolmap's zlib makes cv2.imwrite(.png) abort the process; the capture
    modules import OpenCV first, so a fresh process that starts from them is safe."""
    import subprocess

    code = ("import budget3d.capture.sfm, pycolmap, cv2, numpy as np; "
            f"assert cv2.imwrite({str(tmp_path / 'a.png')!r}, np.zeros((64, 64, 3), np.uint8))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------- optional: lego


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "lego" / "transforms_train.json").is_file(), reason="needs ../shared/data/lego")
def test_lego_subset_matches_the_given_cameras(tmp_path):
    """20 lego views at 400x400, processed from the photos alone, against the dataset's cameras."""
    from budget3d.capture import process

    lego = load_scene(SHARED_DATA / "lego", downscale=2, test_every=0)
    views = sorted(lego.train, key=lambda v: v.camera.center[2])[-20:]  # 20 of the highest views overlap well
    d = tmp_path / "lego"
    d.mkdir()
    for v in views:
        cv2.imwrite(str(d / (Path(v.name).stem + ".png")), cv2.cvtColor(v.image(), cv2.COLOR_RGB2BGR))
    info = process(d, tmp_path / "scene", progress=False)
    assert info["registered"] >= 18, info
    est = {Path(v.name).stem: v.camera.world_to_camera for v in load_scene(tmp_path / "scene", test_every=0).train}
    true = {Path(v.name).stem: v.camera.world_to_camera for v in views}
    names = sorted(est)
    c_err, r_err = pose_errors([est[n] for n in names], [true[n] for n in names])
    print(f"lego: median centre error {100 * np.median(c_err):.3f}%, rotation {np.median(r_err):.3f} deg",
          file=sys.stderr)
    assert np.median(c_err) <= 0.01 and np.median(r_err) <= 1.0
