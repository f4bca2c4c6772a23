"""budget3d view: camera conventions, one-line errors, and the viser app driven by a real Chromium
(Debian's, software WebGL) through Playwright."""

import math
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from budget3d.cli import main
from viewer import engine
from viewer.engine import Nelf, Run, Settings

CHROMIUM = "/usr/lib/chromium/chromium"
ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"]


# Every browser step waits on the state it needs, never on a fixed sleep; the timeouts hold on a
# 2-core machine with other processes burning both cores (checked: docs/viewer.md, "The browser tests under load").
T = 120.0


def wait_until(cond, timeout=T, what="condition"):
    t = time.time()
    while time.time() - t < timeout:
        v = cond()
        if v is not None and (isinstance(v, np.ndarray) or v):
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- no browser


def test_camera_conventions_round_trip(exported_run):
    run = Run.open(exported_run)
    name, cam = run.cameras["test"][0]
    c2w = np.linalg.inv(cam.world_to_camera)
    q, p = engine.c2w_to_viser(c2w)
    assert np.allclose(engine.viser_to_c2w(q, p), c2w, atol=1e-9)
    assert abs(np.linalg.norm(q) - 1) < 1e-9
    again = engine.camera_for(c2w, engine.fov_y_of(cam), cam.width, cam.height)
    assert np.allclose(again.world_to_camera, cam.world_to_camera, atol=1e-9)
    assert math.isclose(again.fy, cam.fy, rel_tol=1e-9) and math.isclose(again.cy, cam.cy, rel_tol=1e-9)
    # covariances: eigenvalues are the squared activated scales
    a = run.splat_arrays()
    ev = np.sort(np.linalg.eigvalsh(a["covariances"][:5].astype(np.float64)), 1)
    want = np.sort(np.exp(2 * run.gaussians["scales"][:5].double().numpy()), 1)
    assert np.allclose(ev, want, rtol=1e-3)
    assert a["opacities"].shape == (run.n_gaussians, 1) and 0 < a["opacities"].min() and a["opacities"].max() < 1


def test_frame_figures_and_runtimes(exported_run):
    """Every runtime renders the same view as the 3DGS frame it is compared with; other resolution
    scales of an ONNX runtime are exported on demand."""
    run = Run.open(exported_run)
    assert run.runtimes() == ["torch", "onnx", "onnx-int8"]
    nelf = Nelf(run)
    try:
        cam = run.cameras["test"][0][1]
        c2w = np.linalg.inv(cam.world_to_camera)
        figs = {}
        for rt in run.runtimes():
            f = engine.render_frame(run, nelf, c2w, nelf.fov_y, 1.0, Settings(runtime=rt))
            assert f.nelf.shape == f.splats.shape == (32, 32, 3)
            assert f.nelf_ms > 0 and f.splat_ms > 0 and f.psnr > 12, (rt, f.psnr)
            figs[rt] = f
        # fp32 ONNX is the torch student; int8 is close to it
        assert engine.psnr(figs["onnx"].nelf, figs["torch"].nelf) > 50
        assert engine.psnr(figs["onnx-int8"].nelf, figs["onnx"].nelf) > 25
        f = engine.render_frame(run, nelf, c2w, nelf.fov_y, 1.0, Settings(runtime="onnx-int8", scale=2.0))
        assert f.nelf.shape == (64, 64, 3) and f.psnr > 12
        # the torch runtime follows the client's aspect
        f = engine.render_frame(run, nelf, c2w, nelf.fov_y, 2.0, Settings(runtime="torch"))
        assert f.nelf.shape[1] == 2 * f.nelf.shape[0]
    finally:
        nelf.close()


def test_one_line_errors(exported_run, tmp_path, capsys):
    assert main(["view", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such run folder" in err and "\n" not in err
    assert main(["view", str(tmp_path)]) == 2
    assert "no gaussians.ply" in capsys.readouterr().err
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        assert main(["view", str(exported_run), "--port", str(s.getsockname()[1])]) == 2
    finally:
        s.close()
    err = capsys.readouterr().err.strip()
    assert "in use" in err and "\n" not in err


def test_run_without_nelf_shows_splats(exported_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for n in ("gaussians.ply", "config.json"):
        shutil.copy(exported_run / n, run_dir / n)
    run = Run.open(run_dir)
    assert run.runtimes() == [] and run.student is None
    f = engine.render_frame(run, None, run.home_c2w(), 0.8, 1.5, Settings())
    assert f.nelf is None and f.splats.shape[1] == round(1.5 * f.splats.shape[0]) and f.splats.std() > 0.01


# ----------------------------------------------------------------------------- real Chromium


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(exported_run):
    from viewer.server import ViewerApp

    a = ViewerApp(exported_run, port=0).start()
    yield a
    a.stop()


def open_page(app, browser, size=(900, 600)):
    """A new tab on the viewer: (page, its ClientSession) once its first frame is shown."""
    before = set(app.sessions)
    page = browser.new_page(viewport={"width": size[0], "height": size[1]})
    page.set_default_timeout(T * 1000)
    page.goto(app.url)
    (sid,) = wait_until(lambda: list(set(app.sessions) - before)[:1], T, "the client to connect")  # ids start at 0
    s = app.sessions[sid]
    wait_until(lambda: s.frames_sent > 0, T, "the first server frame")
    return page, s


def drag(page, x0=250, y0=300, dx=120, dy=25, steps=8):
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, steps + 1):
        page.mouse.move(x0 + dx * k / steps, y0 + dy * k / steps)
    page.mouse.up()


def test_page_shows_stats_and_splats(app, browser):
    page, s = open_page(app, browser)
    try:
        page.wait_for_selector("text=NeLF latency:", timeout=T * 1000)
        text = page.inner_text("body")
        for key in ("3DGS CPU latency:", "PSNR NeLF vs 3DGS:", "Gaussians:", "nelf-int8.onnx", "gaussians.spz"):
            assert key in text, key
        st = s.stats()
        assert st["nelf_ms"] > 0 and st["splat_ms"] > 0 and st["psnr"] > 10 and st["gaussians"] == app.run.n_gaussians
        # the splats are sorted in a web worker: the first renders after a page load can be empty
        img = wait_until(lambda: (lambda r: r if (r[..., 3] > 128).mean() > 0.05 else None)(
            s.client.get_render(120, 180, transport_format="png", timeout=T)), T, "the browser to draw the splats")
        covered = img[..., 3] > 128
        assert img[..., :3][covered].std() > 10, "the splat canvas is flat"
    finally:
        page.close()
    assert not app.errors, app.errors[0][1]


def test_browser_splats_match_server_render(app, browser):
    """The same camera drawn by the browser (viser's splats) and by our CPU renderer: the right
    convention matches far better than an OpenGL reading of the pose (y and z flipped)."""
    page, s = open_page(app, browser)
    try:
        run = app.run
        cam = run.cameras["test"][0][1]
        c2w = np.linalg.inv(cam.world_to_camera)
        fov = engine.fov_y_of(cam)
        w, h = 96, 96
        q, p = engine.c2w_to_viser(c2w)
        # the splats are sorted in a web worker: the first renders after a page load can be empty
        rgba = wait_until(lambda: (lambda r: r if (r[..., 3] > 128).mean() > 0.05 else None)(
            s.client.get_render(h, w, wxyz=q, position=p, fov=fov, transport_format="png", timeout=T)),
            T, "the browser to draw the splats")
        a = rgba[..., 3:].astype(np.float64) / 255
        browser_img = rgba[..., :3] / 255 * a + np.asarray(run.background) * (1 - a)
        ok, _ = engine.render_splats(run, engine.camera_for(c2w, fov, w, h))
        flipped, _ = engine.render_splats(run, engine.camera_for(c2w @ np.diag([1.0, -1, -1, 1]), fov, w, h))
        good, bad = engine.psnr(browser_img, ok), engine.psnr(browser_img, flipped)
        assert good > 18 and good > bad + 4, (good, bad)
    finally:
        page.close()


def test_drag_moves_camera_and_a_new_frame_arrives(app, browser):
    page, s = open_page(app, browser)
    try:
        pos0 = np.array(s.client.camera.position)
        n0 = s.frames_sent
        drag(page)
        wait_until(lambda: np.linalg.norm(np.array(s.client.camera.position) - pos0) > 1e-3, T, "the camera to move")
        wait_until(lambda: s.frames_sent > n0, T, "a new NeLF frame")
        f = s.last_frame
        assert np.linalg.norm(np.linalg.inv(f.camera.world_to_camera)[:3, 3] - pos0) > 1e-3
        assert f.nelf is not None and f.nelf.std() > 0.01
    finally:
        page.close()
    assert not app.errors, app.errors[0][1]


def test_switching_runtime_to_int8_changes_reported_latency(app, browser):
    page, s = open_page(app, browser)
    try:
        for _ in range(3):  # a few torch frames for a median
            n = s.frames_sent
            drag(page, dx=40, dy=0, steps=3)
            wait_until(lambda: s.frames_sent > n, T, "a frame")
        before = s.stats()
        assert before["runtime"] == "torch"
        page.get_by_label("NeLF runtime").click()
        page.get_by_role("option", name="ONNX int8").click()
        wait_until(lambda: s.stats()["runtime"] == "onnx-int8", T, "an int8 frame")
        page.wait_for_selector("text=ONNX int8, 1 thread", timeout=T * 1000)
        after = s.stats()
        assert after["nelf_ms"] is not None and after["nelf_ms"] != before["nelf_ms"]
        assert s.last_frame.runtime == "onnx-int8"
    finally:
        page.close()


def test_three_clients_and_one_leaving_mid_render(app, browser):
    tabs = [open_page(app, browser, size=(480, 360)) for _ in range(3)]
    try:
        for page, s in tabs:
            n = s.frames_sent
            drag(page, x0=150, y0=180, dx=60, dy=10, steps=4)
            wait_until(lambda: s.frames_sent > n, T, "every client to get a frame")
        # the third leaves while its camera is moving and frames are being rendered
        page3, s3 = tabs[2]
        drag(page3, x0=150, y0=180, dx=-60, dy=0, steps=4)
        page3.close()
        wait_until(lambda: s3.closed.is_set(), T, "the server to notice the disconnect")
        for page, s in tabs[:2]:
            n = s.frames_sent
            drag(page, x0=150, y0=180, dx=-50, dy=-10, steps=4)
            wait_until(lambda: s.frames_sent > n, T, "the remaining clients to keep getting frames")
        s3.thread.join(T)
        assert not s3.thread.is_alive(), "the render thread of a closed client kept running"
    finally:
        for page, _ in tabs[:2]:
            page.close()
    assert not app.errors, app.errors[0][1]
