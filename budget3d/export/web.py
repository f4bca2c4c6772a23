"""``budget3d export RUN --format web`` and ``budget3d serve``: the NeLF and the splats in a phone's browser.

The export is one static folder (``RUN/export/web/``) that needs nothing from the network:

- ``index.html`` + ``app.js``: the page (orbit with touch or mouse, a NeLF / splats toggle, the
  ms per frame on screen);
- ``nelf-int8.onnx`` (``nelf.onnx`` when asked for fp32): the student, pose in, image out, run by
  onnxruntime-web on its WASM (CPU) backend, one thread, like the native 1-thread figure;
- ``gaussians.spz``: the splats, drawn by Spark (``@sparkjsdev/spark``) on three.js;
- ``lod.splat`` when the run has a budget ladder (``budget3d export RUN --lod ...``, ``export.lod``):
  the page streams it instead of ``gaussians.spz``, shows the smallest level as soon as its prefix has
  arrived, and swaps in each larger level once its bytes are in and the current level's frame time
  (median interval between animation frames) is within the frame-time target: ``lod.target_ms`` in
  config.json (``--lod-ms`` at export, ``?lod_ms=`` in the page's URL), 33 ms by default, with the
  viewer's hysteresis (a level whose frames take more than 1.15x the target is given back for the
  one below, and not tried again); the level is shown in the corner;
- ``vendor/``: those runtimes as published on npm (copied from the package's ``web_assets``,
  refreshed by ``scripts/vendor_web.py``), each with its licence;
- ``config.json``: what the page needs: file names, the ONNX input/output names and size, the
  intrinsics, the starting camera (a training pose), the orbit centre and up direction.

One camera drives both renderers. The three.js camera (OpenGL axes: x right, y up, looking down
-z) is converted per frame into the OpenCV camera-to-world matrix the ONNX graph takes
(``c2w_cv = c2w_gl @ diag(1, -1, -1, 1)``); its projection matrix is built from the student's
intrinsics, so the splats are drawn with the NeLF's exact field of view and principal point.
SPZ stores its axes as right-up-back (see ``splats``), so the page turns the splat mesh 180
degrees about x to put it back in the run's world frame.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
from pathlib import Path

from budget3d.errors import UserError
from budget3d.export import ONNX_FILES

ASSETS = Path(__file__).resolve().parent / "web_assets"
PAGE_FILES = ("index.html", "app.js")
WEB_DIR = "web"
CHROMIUM = "/usr/lib/chromium/chromium"
VARIANTS = {"int8": "onnx-int8", "fp32": "onnx"}
LOD_TARGET_MS = 33.0  # 30 frames a second: what the phone page aims for before it shows a larger level
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".onnx": "application/octet-stream", ".spz": "application/octet-stream",
        ".splat": "application/octet-stream", ".json": "application/json"}


# ----------------------------------------------------------------------------- CLI


def add_arguments(p):
    p.add_argument("folder", help="folder written by 'budget3d export RUN --format web' (RUN/export/web), or the RUN")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 lets a phone on the LAN open it)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--measure", action="store_true",
                   help="instead of serving until Ctrl-C: open the page in headless Chromium (phone-sized, CPU "
                        "throttled), print the NeLF and splat ms/frame beside the native 1-thread figure, and exit")
    p.add_argument("--throttle", type=float, default=4.0, help="--measure: CPU slowdown factor (default 4)")
    p.add_argument("--frames", type=int, default=30, help="--measure: NeLF frames to time (default 30)")
    p.add_argument("--browser", default=CHROMIUM, help=f"--measure: Chromium binary (default {CHROMIUM})")


def main(args) -> int:
    folder = web_folder(args.folder)
    if args.measure:
        result = measure(folder, throttle=args.throttle, frames=args.frames, browser=args.browser)
        print(json.dumps(result, indent=1))
        return 0
    server = make_server(folder, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {folder}")
    if host in ("0.0.0.0", "::"):
        ip = _lan_ip()
        print(f"open http://{ip or '<this-machine-ip>'}:{port}/ on a phone on the same network "
              f"(http://127.0.0.1:{port}/ here); Ctrl-C stops")
    else:
        print(f"open http://{_url_host(host)}:{port}/  (Ctrl-C stops; --host 0.0.0.0 for a phone on the LAN)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


def web_folder(path) -> Path:
    """The export folder for ``path`` (the folder itself, or RUN -> RUN/export/web); one-line errors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder; give RUN/export/web (written by 'budget3d export RUN --format web')")
    for cand in (path, path / "export" / WEB_DIR, path / WEB_DIR):
        if (cand / "index.html").is_file() and (cand / "config.json").is_file():
            return cand
    raise UserError(f"{path}: not a web export (no index.html and config.json); "
                    f"write one with 'budget3d export RUN --format web'")


# ----------------------------------------------------------------------------- export


def export_web(run_dir, out_dir, variant: str = "int8", splat_format: str = "spz", data=None,
               lod_target_ms: float = LOD_TARGET_MS) -> dict:
    """Write the static viewer into ``out_dir/web`` (``out_dir`` is normally RUN/export). Reuses
    ``out_dir/nelf-int8.onnx`` (or ``nelf.onnx`` for ``variant="fp32"``) and
    ``out_dir/gaussians.spz`` when they are newer than what they were made from, and writes them
    first otherwise; streams ``out_dir/lod/lod.splat`` when the ladder there is newer than the
    run's gaussians.ply. Returns a summary (folder, files, sizes, native 1-thread latency)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if variant not in VARIANTS:
        raise UserError(f"web export: unknown NeLF variant {variant!r}; choose {' or '.join(VARIANTS)}")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; give a folder written by 'budget3d train --out'")
    if not (run_dir / "gaussians.ply").is_file():
        raise UserError(f"{run_dir}: no gaussians.ply; this is not a finished run folder "
                        "(train it with 'budget3d train')")
    student = run_dir / "nelf" / "student.pt"
    if not student.is_file():
        raise UserError(f"{run_dir}: no NeLF student (nelf/student.pt); run 'budget3d distill {run_dir}' first, "
                        "then export again")
    missing = [p for p in (ASSETS / f for f in PAGE_FILES + ("vendor/VERSIONS.json",)) if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: the web viewer's files are missing from this installation; "
                        "reinstall budget3d (or run scripts/vendor_web.py in a checkout)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the folder ({e.strerror})") from None
    if not (out_dir / WEB_DIR).exists() and (out_dir / (WEB_DIR + ".old")).is_dir():
        os.replace(out_dir / (WEB_DIR + ".old"), out_dir / WEB_DIR)  # killed mid-swap last time: the old folder

    onnx_path, onnx_meta = _nelf_file(run_dir, out_dir, variant, student, data)
    splat_path = _splat_file(run_dir, out_dir, splat_format)
    ladder, ladder_note = _ladder(run_dir, out_dir)
    if not lod_target_ms > 0:
        raise UserError(f"--lod-ms {lod_target_ms}: the frame-time target must be above 0 ms")

    from budget3d.nelf.students import load_student

    _, payload = load_student(student)
    io = _onnx_io(onnx_path)
    width, height = io["width"], io["height"]
    w0, h0 = (int(v) for v in payload["resolution"])
    fx, fy, cx, cy = (float(v) for v in payload["intrinsics"])
    intr = [fx * width / w0, fy * height / h0, cx * width / w0, cy * height / h0]
    cam = initial_camera(run_dir, payload, data)

    web = out_dir / WEB_DIR
    tmp = out_dir / (WEB_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(ASSETS, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.py", "*.pyc"))
    shutil.copy2(onnx_path, tmp / onnx_path.name)
    shutil.copy2(splat_path, tmp / splat_path.name)
    if ladder is not None:
        shutil.copy2(out_dir / "lod" / ladder["stream"]["file"], tmp / ladder["stream"]["file"])
    versions = json.loads((ASSETS / "vendor" / "VERSIONS.json").read_text())
    config = {
        "title": run_dir.resolve().name,
        "nelf": {"file": onnx_path.name, "variant": variant, "input": io["input"], "output": io["output"],
                 "width": width, "height": height, "intrinsics": [round(v, 6) for v in intr],
                 "size_mb": round(onnx_path.stat().st_size / 1e6, 4),
                 "native_ms_1thread": onnx_meta.get("latency_ms_1thread"),
                 "psnr_vs_teacher": onnx_meta.get("psnr_vs_teacher")},
        "splats": {"file": splat_path.name, "format": splat_format,
                   # SPZ holds right-up-back axes: the page rotates the mesh back into the run's frame
                   "flip_yz": splat_format == "spz",
                   "size_mb": round(splat_path.stat().st_size / 1e6, 4)},
        "lod": None if ladder is None else {
            "file": ladder["stream"]["file"], "format": "splat", "total_bytes": ladder["stream"]["size_bytes"],
            "target_ms": float(lod_target_ms), "order": ladder["order"],
            "levels": [{"count": r["count"], "bytes": r["stream_bytes"], "psnr": r.get("psnr_splat")}
                       for r in ladder["levels"]]},
        "camera": cam,
        "background": [float(v) for v in payload.get("background", (1.0, 1.0, 1.0))],
        "threads": 1,
        "runtime": {k: v["version"] for k, v in versions.items()},
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    old = out_dir / (WEB_DIR + ".old")  # the swap: web -> web.old, web.tmp -> web (two renames)
    if old.exists():
        shutil.rmtree(old)
    if web.exists():
        os.replace(web, old)
    os.replace(tmp, web)
    shutil.rmtree(old, ignore_errors=True)
    total = sum(p.stat().st_size for p in web.rglob("*") if p.is_file())
    return {"folder": str(web), "nelf": onnx_path.name, "splats": splat_path.name,
            "size_mb": round(total / 1e6, 2), "resolution": f"{width}x{height}",
            "native_ms_1thread": onnx_meta.get("latency_ms_1thread"),
            "lod": ladder_note, "serve": f"budget3d serve {web}"}


def _nelf_file(run_dir: Path, out_dir: Path, variant: str, student: Path, data=None) -> tuple[Path, dict]:
    from budget3d.export import onnx as ex

    fmt = VARIANTS[variant]
    path = out_dir / ONNX_FILES[fmt]
    meta_path = path.with_suffix(".json")
    if not path.is_file() or path.stat().st_mtime < student.stat().st_mtime:
        ex.export(run_dir, fmt, out_dir, progress=False, data=data)
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    return path, meta


def _splat_file(run_dir: Path, out_dir: Path, fmt: str) -> Path:
    from budget3d.export.splats import save_any
    from budget3d.splat import load_ply

    path = out_dir / f"gaussians.{fmt}"
    ply = run_dir / "gaussians.ply"
    if not path.is_file() or path.stat().st_mtime < ply.stat().st_mtime:
        save_any(load_ply(ply), path, fmt)
    return path


def _ladder(run_dir: Path, out_dir: Path) -> tuple:
    """(manifest, note) of the budget ladder in ``out_dir/lod`` the page streams; (None, why) when
    there is none or it is older than the run's gaussians.ply (it would show other Gaussians)."""
    from budget3d.export.lod import LOD_DIR, MANIFEST, read_manifest

    lod = out_dir / LOD_DIR
    m = read_manifest(lod)
    if m is None:
        return None, "none (budget3d export RUN --lod 0.1,0.3,1.0 makes one)"
    stream = lod / m["stream"]["file"]
    if not stream.is_file() or stream.stat().st_size != m["stream"]["size_bytes"]:
        return None, f"{stream} is missing or damaged; not streamed (export the ladder again with --lod)"
    if (lod / MANIFEST).stat().st_mtime < (run_dir / "gaussians.ply").stat().st_mtime:
        return None, f"{lod} is older than gaussians.ply; not streamed (export the ladder again with --lod)"
    return m, " -> ".join(f"{r['count']:,}" for r in m["levels"]) + f" Gaussians streamed from {m['stream']['file']}"


def _onnx_io(path: Path) -> dict:
    """Input/output names and output size of the NeLF graph (read from the file, not assumed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__}); "
                        "export it again with 'budget3d export RUN --format onnx-int8'") from None
    inp, out = model.graph.input[0], model.graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    in_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or in_dims != [4, 4]:
        raise UserError(f"{path}: expected a NeLF graph (4x4 pose in, 1x3xHxW image out), got input {in_dims} "
                        f"and output {dims}; export it again with 'budget3d export RUN --format onnx-int8'")
    return {"input": inp.name, "output": out.name, "width": int(dims[3]), "height": int(dims[2])}


# ----------------------------------------------------------------------------- the starting camera


def look_at_c2w(eye, target, up):
    """OpenCV camera-to-world of a camera at ``eye`` looking at ``target`` with ``up`` up: the
    pose three.js's ``camera.lookAt`` gives (then converted to OpenCV axes)."""
    import numpy as np

    from budget3d.scene.camera import look_at_w2c

    return np.linalg.inv(look_at_w2c(eye, target, up))


def initial_camera(run_dir: Path, payload: dict, data=None) -> dict:
    """The page's starting camera: the run's first training pose; the orbit centre on its optical
    axis, at the depth nearest to all training cameras' axes (where a 360 capture looks), or
    mid-way between the student's near and far when that is ill-posed (forward-facing); "up" the
    training cameras' mean up. ``c2w`` is that pose as three.js's ``lookAt`` rebuilds it
    (identical unless the training camera is rolled; ``roll_deg`` says by how much)."""
    import numpy as np

    poses, source = [], None
    try:
        from budget3d.runfolder import load_run_scene

        scene = load_run_scene(run_dir, override=data)
        views = list(scene.train) or list(scene.test)
        poses = [np.linalg.inv(np.asarray(v.camera.world_to_camera, np.float64)) for v in views]
        source = f"training view {views[0].name}"
    except Exception:  # scene moved or gone: orbit the splats instead
        poses = []
    mid = 0.5 * (float(payload["near"]) + float(payload["far"]))
    if poses:
        c0 = poses[0]
        up = -np.mean([p[:3, 1] for p in poses], axis=0)
        if np.linalg.norm(up) < 1e-6:
            up = -c0[:3, 1]
        o0, d0 = c0[:3, 3], c0[:3, 2] / np.linalg.norm(c0[:3, 2])
        a, b = np.zeros((3, 3)), np.zeros(3)
        for p in poses:
            d = p[:3, 2] / np.linalg.norm(p[:3, 2])
            m = np.eye(3) - np.outer(d, d)
            a += m
            b += m @ p[:3, 3]
        depth = mid
        if len(poses) >= 2 and np.linalg.cond(a) < 1e4:
            t = float(np.dot(np.linalg.solve(a, b) - o0, d0))
            if t > 0.05 * mid:
                depth = t
    else:
        from budget3d.export.splats import orbit_cameras
        from budget3d.splat import load_ply

        c0 = np.linalg.inv(orbit_cameras(load_ply(Path(run_dir) / "gaussians.ply"), n=1)[0].world_to_camera)
        up = -c0[:3, 1]
        o0, d0 = c0[:3, 3], c0[:3, 2] / np.linalg.norm(c0[:3, 2])
        depth, source = mid, "orbit view of the splats (the run's scene was not found)"
    up = up / np.linalg.norm(up)
    axis = int(np.argmax(np.abs(up)))
    if abs(up[axis]) > math.cos(math.radians(10)):  # a captured "up" a few degrees off an axis: the axis
        up = np.sign(up[axis]) * np.eye(3)[axis]
    target = o0 + depth * d0
    c2w = look_at_c2w(o0, target, up)
    cosang = np.clip((np.trace(c2w[:3, :3].T @ c0[:3, :3]) - 1) / 2, -1, 1)
    return {"c2w": [[round(float(v), 7) for v in row] for row in c2w],
            "train_c2w": [[round(float(v), 7) for v in row] for row in c0],
            "target": [round(float(v), 7) for v in target], "up": [round(float(v), 7) for v in up],
            "depth": round(float(depth), 6), "roll_deg": round(math.degrees(math.acos(cosang)), 4),
            "near": round(max(1e-3, 0.01 * depth), 6), "far": round(100.0 * max(depth, float(payload["far"])), 4),
            "source": source}


# ----------------------------------------------------------------------------- serving


def make_server(folder, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False):
    """A threaded static-file server for ``folder`` (not started: call ``serve_forever``)."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}

        def end_headers(self):
            self.send_header("Cache-Control", "no-cache")
            super().end_headers()

        def log_message(self, fmt, *a):
            if not quiet:
                sys.stderr.write(f"{self.address_string()} {fmt % a}\n")

    if not 0 <= int(port) <= 65535:
        raise UserError(f"--port {port}: expected 0..65535 (0 picks a free one)")
    try:
        return ThreadingHTTPServer((host, port), partial(Handler, directory=str(folder)))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({listen_error(e)})") from None


def listen_error(e: OSError) -> str:
    """Why a port could not be bound, and what to do, for ``serve`` and ``view``."""
    import errno

    if e.errno == errno.EADDRINUSE:
        return "address already in use by another program; choose another --port (0 picks a free one)"
    if e.errno == errno.EACCES:
        return "permission denied: ports below 1024 need administrator rights; choose --port 8000 or another above 1023"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{e.strerror}: this machine has no such address; check --host"
    return f"{e.strerror}; check --host and --port"


def serve_in_thread(folder, host: str = "127.0.0.1", port: int = 0):
    """(server, base URL) with the server running in a daemon thread; ``server.shutdown()`` stops it."""
    server = make_server(folder, host, port, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{_url_host(h)}:{p}/"


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else (f"[{host}]" if ":" in host else host)


def _lan_ip():
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return None


# ----------------------------------------------------------------------------- measuring in a browser

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
BROWSER_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


def open_page(playwright, url: str, browser: str = CHROMIUM, query: str = ""):
    """(browser, page) of the viewer at ``url`` in headless Chromium with a phone-sized viewport and
    software WebGL; every request that is not to ``url``'s own server is aborted (and counted in
    ``page.blocked``; the rest in ``page.served``), so a page that works here fetches nothing from the network."""
    from urllib.parse import urlsplit

    if not Path(browser).is_file():
        raise UserError(f"{browser}: no Chromium there; install it (Debian: apt install chromium) "
                        "or give its path with --browser")
    b = playwright.chromium.launch(executable_path=browser, headless=True, args=BROWSER_ARGS)
    ctx = b.new_context(**PHONE)
    page = ctx.new_page()
    origin = urlsplit(url).netloc
    page.blocked, page.served = [], []

    def route(r):
        if urlsplit(r.request.url).netloc == origin or r.request.url.startswith(("data:", "blob:")):
            page.served.append(r.request.url)
            r.continue_()
        else:
            page.blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.console = []
    page.on("console", lambda m: page.console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console.append(f"pageerror: {e}"))
    page.goto(url + query)
    page.wait_for_function("window.b3d && window.b3d.state !== 'loading'", timeout=120_000)
    state = page.evaluate("window.b3d.state")
    if state != "ready":
        raise RuntimeError(f"the page did not start ({state}): {page.evaluate('window.b3d.error')}; "
                           f"console: {page.console[-5:]}")
    return b, page


def measure(folder, throttle: float = 4.0, frames: int = 30, browser: str = CHROMIUM) -> dict:
    """NeLF ms/frame in headless Chromium (phone viewport, ``throttle``x CPU slowdown through the
    DevTools protocol) beside onnxruntime's native 1-thread figure for the same file and pose."""
    import numpy as np

    folder = web_folder(folder)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UserError("--measure needs Playwright: pip install 'budget3d[dev]' (it drives the system Chromium; "
                        "no 'playwright install' needed)") from None
    cfg = json.loads((folder / "config.json").read_text())
    server, url = serve_in_thread(folder)
    try:
        with sync_playwright() as pw:
            b, page = open_page(pw, url, browser)
            try:
                cdp = page.context.new_cdp_session(page)
                cdp.send("Emulation.setCPUThrottlingRate", {"rate": float(throttle)})
                page.evaluate("window.b3d.bench(3)")  # warm-up
                nelf = page.evaluate(f"window.b3d.bench({int(frames)})")
                page.evaluate("window.b3d.setMode('splats')")
                splats = page.evaluate("window.b3d.splatFrames(20)")
                cdp.send("Emulation.setCPUThrottlingRate", {"rate": 1})
                nelf_1x = page.evaluate(f"window.b3d.bench({int(frames)})")
                blocked = list(page.blocked)
            finally:
                b.close()
    finally:
        server.shutdown()
        server.server_close()
    from budget3d.export.ortrun import latency_ms

    native = latency_ms(folder / cfg["nelf"]["file"], np.asarray(cfg["camera"]["c2w"], np.float32), threads=1,
                        repeats=max(5, frames))
    med = lambda xs: round(float(np.median(xs)), 3)  # noqa: E731
    return {"nelf_file": cfg["nelf"]["file"], "resolution": f"{cfg['nelf']['width']}x{cfg['nelf']['height']}",
            "throttle": throttle, "frames": frames,
            "web_nelf_ms_per_frame": med([f["ms"] for f in nelf]),
            "web_nelf_inference_ms": med([f["infer"] for f in nelf]),
            "web_nelf_ms_per_frame_unthrottled": med([f["ms"] for f in nelf_1x]),
            "native_onnxruntime_ms_1thread": round(native, 3),
            "web_splats_ms_per_frame": med(splats) if splats else None,
            "blocked_requests": blocked}
