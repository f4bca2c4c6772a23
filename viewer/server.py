"""The viser app: the run's splats drawn by the browser, the NeLF frame and our 3DGS frame (CPU, or CUDA where gsplat runs)
rendered on the server for each client's camera, live figures, hardware knobs, camera jumps and
downloads.

One ``ClientSession`` per browser tab, each with its own render thread: camera messages only bump
a version counter and wake the thread (coalescing: it always renders the newest camera); a frame
whose camera moved on while it was being rendered is dropped unless the client has had nothing for
``STALE_GRACE_S`` (so a camera that never stops still gets frames). The computation itself is
serialised across clients (``engine.COMPUTE_LOCK``) so each reported latency is one frame's own.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np

from budget3d.errors import UserError
from viewer import engine
from viewer.engine import RUNTIME_LABELS, Nelf, Run, Settings

STALE_GRACE_S = 0.4  # a moving camera still gets a frame at least this often
STATS_EVERY_S = 0.25  # stats panel / chart refresh
CHART_POINTS = 60
SCALES = {"0.25x": 0.25, "0.5x": 0.5, "1x": 1.0, "2x": 2.0}


def check_port(host: str, port: int) -> None:
    """One-line error when ``host:port`` cannot be bound (viser would silently move to the next port)."""
    if port == 0:
        return
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        from budget3d.export.web import listen_error

        raise UserError(f"cannot listen on {host}:{port} ({listen_error(e)})") from None
    finally:
        s.close()


def to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ViewerApp:
    """``ViewerApp(run_dir).start()`` serves the viewer; ``sessions`` holds the live clients."""

    def __init__(self, run_dir, host: str = "127.0.0.1", port: int = 8080, verbose: bool = False, data=None,
                 device: str = "auto"):
        self.run = Run.open(run_dir, data, device)
        gs = f"3DGS {self.run.splat_label}"
        self.views = ("NeLF", gs, f"NeLF | {gs}")  # what the server frame shows
        self.nelf = Nelf(self.run) if self.run.student is not None else None
        self.host, self.port, self.verbose = host, int(port), verbose
        self.sessions: dict = {}
        self.errors: list = []  # (client id, traceback text) of every failed frame
        self.frames_rendered = 0
        self.server = None
        self._splats = self.run.splat_arrays()
        self._lock = threading.Lock()

    # -- lifecycle

    def start(self) -> "ViewerApp":
        import viser

        check_port(self.host, self.port)
        server = viser.ViserServer(host=self.host, port=self.port, label="budget3d", verbose=self.verbose)
        if self.port and server.get_port() != self.port:  # lost a race for the port after our check
            server.stop()
            raise UserError(f"port {self.port} on {self.host} is in use; pass another --port (or --port 0 for any free one)")
        self.server = server
        self.port = server.get_port()
        server.scene.set_up_direction(tuple(float(v) for v in self.run.up))
        c2w = self.run.home_c2w()
        fov = self.nelf.fov_y if self.nelf is not None else self._home_fov()
        server.initial_camera.position = tuple(c2w[:3, 3])
        server.initial_camera.look_at = tuple(self._look_at_point(c2w))
        server.initial_camera.up = tuple(float(v) for v in self.run.up)
        server.initial_camera.fov = float(fov)
        # warm the renderers (numba kernels load, torch allocates) so the first frame is not an outlier
        engine.render_frame(self.run, self.nelf, c2w, fov, 1.0, Settings(runtime=(self.run.runtimes() or ["torch"])[0],
                                                                          scale=0.25))
        server.on_client_connect(self._connect)
        server.on_client_disconnect(self._disconnect)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        for s in list(self.sessions.values()):
            s.close()
        if self.server is not None:
            self.server.stop()
        if self.nelf is not None:
            self.nelf.close()

    def _home_fov(self) -> float:
        for split in ("test", "train"):
            if self.run.cameras[split]:
                return engine.fov_y_of(self.run.cameras[split][0][1])
        return 0.8

    def _look_at_point(self, c2w) -> np.ndarray:
        """A point ahead on the camera's axis, as far as the scene centre (the orbit pivot)."""
        fwd = c2w[:3, 2]
        d = float(np.dot(self.run.centre - c2w[:3, 3], fwd))
        return c2w[:3, 3] + fwd * (d if d > 1e-3 else 1.0)

    def _connect(self, client) -> None:
        s = ClientSession(self, client)
        with self._lock:
            self.sessions[client.client_id] = s
        s.start()

    def _disconnect(self, client) -> None:
        with self._lock:
            s = self.sessions.pop(client.client_id, None)
        if s is not None:
            s.close()

    def record_error(self, cid: int, text: str) -> None:
        with self._lock:
            self.errors.append((cid, text))
        if self.verbose:
            print(text)

    def count_frame(self) -> None:
        with self._lock:
            self.frames_rendered += 1


class ClientSession:
    """One browser tab: its GUI, its copy of the splats, its render thread and its figures."""

    def __init__(self, app: ViewerApp, client):
        self.app, self.client = app, client
        self.run, self.nelf = app.run, app.nelf
        self.settings = Settings(runtime=(self.run.runtimes() or ["torch"])[0], threads=1, scale=1.0,
                                 target_ms=0.0)
        self.version = 0
        self.wake = threading.Event()
        self.closed = threading.Event()
        self.nelf_ms: deque = deque(maxlen=30)
        self.splat_ms: deque = deque(maxlen=30)
        self.chart: deque = deque(maxlen=CHART_POINTS)  # (frame no, nelf ms, 3dgs ms)
        self.frames_sent = 0
        self.frames_dropped = 0
        self.last_frame: Optional[engine.Frame] = None
        self.last_sent = 0.0
        self._last_stats = 0.0
        self._stats_pending = False  # the last frame's figures are not on the panel yet
        self.budget = 1.0  # torch runtime: resolution factor the latency target allows
        self.view = app.views[0] if self.nelf is not None else app.views[1]
        self.full_view = False
        self._cam_index = {"train": -1, "test": -1}
        self.thread = threading.Thread(target=self._loop, name=f"viewer-client-{client.client_id}", daemon=True)
        self._build_gui()

    # -- GUI

    def _build_gui(self) -> None:
        c, run = self.client, self.run
        gui = c.gui
        self.splats = c.scene.add_gaussian_splats("/splats", **self.app._splats)
        gui.add_markdown(f"**budget3d** · `{run.path.name}` · {run.n_gaussians:,} Gaussians")
        if self.nelf is None:
            gui.add_markdown(
                f"**No NeLF in this run yet.** The panel shows our 3DGS {run.splat_label} render. Make one with\n\n"
                f"`budget3d distill {run.path}`\n\nthen `budget3d export {run.path} --format onnx,onnx-int8`.")
        with gui.add_folder("Server frame"):
            self.image = gui.add_image(np.full((8, 8, 3), 255, np.uint8), label="waiting for the first frame…",
                                       format="jpeg", jpeg_quality=90)
            opts = self.app.views if self.nelf is not None else self.app.views[1:2]
            self.view_dd = gui.add_dropdown("Show", opts, initial_value=self.view)
            self.full_cb = gui.add_checkbox("Full view", False, hint="the server frame replaces the browser's splats")
        with gui.add_folder("Stats"):
            self.stats_md = gui.add_markdown("NeLF latency: waiting for the first frame")
            self.chart_h = gui.add_uplot(
                (np.zeros(2), np.zeros(2), np.zeros(2)),
                ({"label": "frame"}, {"label": "NeLF ms", "stroke": "#d9480f", "width": 2},
                 {"label": f"3DGS {run.splat_label} ms", "stroke": "#1971c2", "width": 2}),
                title="latency (ms) per frame", aspect=2.0, scales={"x": {"time": False}})
        with gui.add_folder("Constrained hardware"):
            rts = self.run.runtimes()
            labels = [RUNTIME_LABELS[r] for r in rts] or ["(no NeLF)"]
            self.runtime_dd = gui.add_dropdown("NeLF runtime", labels, initial_value=labels[0], disabled=not rts)
            ncpu = os.cpu_count() or 1
            self._threads = {"1": 1, "2": 2, f"all ({ncpu})": ncpu}
            self.threads_dd = gui.add_dropdown("Threads", tuple(self._threads), initial_value="1")
            self.scale_dd = gui.add_dropdown("Resolution scale", tuple(SCALES), initial_value="1x")
            self.target_sl = gui.add_slider("Latency target (ms)", min=0, max=500, step=5, initial_value=0,
                                            hint="torch runtime: lower the resolution to stay under it (0 = off)")
        with gui.add_folder("Cameras"):
            names = [f"train {i}: {n}" for i, (n, _) in enumerate(run.cameras["train"])] + \
                    [f"test {i}: {n}" for i, (n, _) in enumerate(run.cameras["test"])]
            if names:
                self.cam_dd = gui.add_dropdown("Jump to", ["—"] + names, initial_value="—")
                self.cam_bg = gui.add_button_group("Step", ("◀ train", "train ▶", "◀ test", "test ▶"))
                self.cam_dd.on_update(lambda e: self._jump_named(self.cam_dd.value))
                self.cam_bg.on_click(lambda e: self._step(e.target.value))
            else:
                gui.add_markdown(run.scene_note or "no cameras")
        with gui.add_folder("Downloads", expand_by_default=False):
            sizes = run.file_sizes()
            for name, path in run.exports.items():
                b = gui.add_button(f"{name} ({sizes[name]:.2f} MB)", icon=None)
                b.on_click(lambda e, p=path: self._download(e.client, p))
            if not run.exports:
                gui.add_markdown(f"nothing exported yet: `budget3d export {run.path} --format ply,splat,spz`")
        self.view_dd.on_update(lambda e: self._set(view=self.view_dd.value))
        self.full_cb.on_update(lambda e: self._set(full=self.full_cb.value))
        self.runtime_dd.on_update(lambda e: self._set(runtime=self.runtime_dd.value))
        self.threads_dd.on_update(lambda e: self._set(threads=self.threads_dd.value))
        self.scale_dd.on_update(lambda e: self._set(scale=self.scale_dd.value))
        self.target_sl.on_update(lambda e: self._set(target=self.target_sl.value))
        self.client.camera.on_update(lambda cam: self.poke())

    def _set(self, view=None, full=None, runtime=None, threads=None, scale=None, target=None) -> None:
        s = self.settings
        if view is not None:
            self.view = view
        if full is not None:
            self.full_view = bool(full)
            if not self.full_view:
                self.client.scene.set_background_image(None)
            self.splats.visible = not self.full_view
        if runtime is not None:
            inv = {v: k for k, v in RUNTIME_LABELS.items()}
            if inv.get(runtime) in self.run.runtimes():
                s.runtime = inv[runtime]
        if threads is not None:
            s.threads = self._threads[threads]
        if scale is not None:
            s.scale = SCALES[scale]
        if target is not None:
            s.target_ms = float(target)
            self.budget = 1.0
        if runtime is not None or threads is not None or scale is not None:
            self.nelf_ms.clear()
            self.splat_ms.clear()
        self.poke()

    def set_runtime(self, runtime: str) -> None:
        """Programmatic knob (the soak script and tests): runtime key, e.g. "onnx-int8"."""
        self.runtime_dd.value = RUNTIME_LABELS[runtime]
        self._set(runtime=RUNTIME_LABELS[runtime])

    def _download(self, client, path: Path) -> None:
        client.send_file_download(path.name, path.read_bytes(), save_immediately=False)

    def _jump_named(self, value: str) -> None:
        if not value or value == "—":
            return
        split, rest = value.split(" ", 1)
        self.jump(split, int(rest.split(":", 1)[0]))

    def _step(self, label: str) -> None:
        split = "train" if "train" in label else "test"
        n = len(self.run.cameras[split])
        if n == 0:
            return
        i = self._cam_index[split] + (1 if "▶" in label else -1)
        self.jump(split, i % n)

    def jump(self, split: str, i: int) -> None:
        """Move this client's camera to the scene's camera ``split`` ``i``."""
        _, cam = self.run.cameras[split][i]
        self._cam_index[split] = i
        c2w = np.linalg.inv(np.asarray(cam.world_to_camera, np.float64))
        self.set_camera(c2w, engine.fov_y_of(cam))

    def set_camera(self, c2w, fov: Optional[float] = None) -> None:
        cam = self.client.camera
        with self.client.atomic():
            if fov is not None:
                cam.fov = float(fov)
            cam.up_direction = tuple(float(v) for v in self.run.up)
            cam.position = tuple(float(v) for v in c2w[:3, 3])
            cam.look_at = tuple(float(v) for v in self.app._look_at_point(c2w))
        self.poke()

    # -- rendering

    def poke(self) -> None:
        self.version += 1
        self.wake.set()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closed.set()
        self.wake.set()

    def _camera(self):
        cam = self.client.camera
        try:
            wxyz, pos, fov = np.array(cam.wxyz), np.array(cam.position), float(cam.fov)
            aspect = float(cam.aspect)
        except AssertionError:  # no camera message from the browser yet
            return None
        if not np.all(np.isfinite(wxyz)) or not np.isfinite(aspect) or aspect <= 0 or fov <= 0:
            return None
        return engine.viser_to_c2w(wxyz, pos), fov, aspect

    def _loop(self) -> None:
        while not self.closed.is_set():
            if not self.wake.wait(timeout=STATS_EVERY_S) and self.last_frame is not None:
                self._flush_stats()  # the last frame came too soon after a refresh: show its figures now
                continue  # (without a frame yet, keep trying: the first camera message may predate our callback)
            self.wake.clear()
            if self.closed.is_set():
                break
            v = self.version
            cam = self._camera()
            if cam is None:
                continue
            c2w, fov, aspect = cam
            s = Settings(**vars(self.settings))
            try:
                frame = engine.render_frame(self.run, self.nelf, c2w, fov, aspect, s, self.budget)
            except Exception:
                self.app.record_error(self.client.client_id, traceback.format_exc())
                time.sleep(0.2)
                continue
            self.app.count_frame()
            if self.closed.is_set():
                break
            self._adapt(frame, s)
            if self.version != v and time.time() - self.last_sent < STALE_GRACE_S:
                self.frames_dropped += 1  # the camera moved on: render the newest one instead
                continue
            try:
                self._publish(frame, aspect)
            except Exception:
                if self.closed.is_set():  # the tab went away mid-send
                    break
                self.app.record_error(self.client.client_id, traceback.format_exc())

    def _adapt(self, f: engine.Frame, s: Settings) -> None:
        """Latency target (torch runtime): shrink / grow the resolution factor toward it."""
        if s.runtime != "torch" or s.target_ms <= 0 or f.nelf_ms is None:
            return
        if f.nelf_ms > 1.15 * s.target_ms:
            self.budget = max(0.125, self.budget * max(0.5, (s.target_ms / f.nelf_ms) ** 0.5))
        elif f.nelf_ms < 0.6 * s.target_ms and self.budget < 1.0:
            self.budget = min(1.0, self.budget * 1.15)

    def _publish(self, f: engine.Frame, aspect: float) -> None:
        self.last_frame = f
        if f.nelf_ms is not None:
            self.nelf_ms.append(f.nelf_ms)
        self.splat_ms.append(f.splat_ms)
        self.frames_sent += 1
        self.chart.append((self.frames_sent, f.nelf_ms or 0.0, f.splat_ms))
        if self.view == self.app.views[0] and f.nelf is not None:
            shown, label = f.nelf, f"NeLF · {RUNTIME_LABELS[f.runtime]} · {f.camera.width}x{f.camera.height}"
        elif self.view == self.app.views[2] and f.nelf is not None:
            gap = np.ones((f.nelf.shape[0], max(2, f.nelf.shape[1] // 32), 3), np.float32)
            shown = np.concatenate([f.nelf, gap, f.splats], 1)
            label = f"NeLF ({RUNTIME_LABELS[f.runtime]}) | 3DGS {self.run.splat_label} · {f.camera.width}x{f.camera.height}"
        else:
            shown, label = f.splats, f"3DGS {self.run.splat_label} · {f.camera.width}x{f.camera.height}"
        u8 = to_u8(shown)
        bg = None
        if self.full_view:
            full = f.nelf if (f.nelf is not None and self.view != self.app.views[1]) else f.splats
            bg = to_u8(engine.fit_aspect(full, aspect, self.run.background))
        stats = time.time() - self._last_stats >= STATS_EVERY_S

        def send():
            with self.client.atomic():
                self.image.image = u8
                self.image.label = label
                if bg is not None:
                    self.client.scene.set_background_image(bg, format="jpeg", jpeg_quality=90)
            if stats:
                self._update_stats(f)

        self._on_viser_loop(send)
        self.last_sent = time.time()
        if stats:
            self._last_stats = time.time()
        self._stats_pending = not stats

    def _flush_stats(self) -> None:
        """Refresh the stats panel for the last frame when its own send skipped it (a frame within
        ``STATS_EVERY_S`` of the last refresh), so the panel never keeps an older frame's figures."""
        if not self._stats_pending or self.last_frame is None or self.closed.is_set():
            return
        self._stats_pending = False
        f = self.last_frame
        try:
            self._on_viser_loop(lambda: self._update_stats(f))
        except Exception:
            if not self.closed.is_set():
                self.app.record_error(self.client.client_id, traceback.format_exc())
        self._last_stats = time.time()

    def _on_viser_loop(self, fn) -> None:
        """Run ``fn`` (GUI updates) on viser's event-loop thread and wait for it. viser 1.1 pulses an
        asyncio.Event from the calling thread when a message is queued, which races with the loop
        (seen as "RuntimeError: deque mutated during iteration" with several render threads)."""
        loop = getattr(self.app.server, "_event_loop", None)
        if loop is None or not loop.is_running():
            fn()
            return
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the render thread
                done.set_exception(e)

        loop.call_soon_threadsafe(run)
        done.result(timeout=30)

    def stats(self) -> dict:
        """The figures the stats panel shows, as numbers."""
        f = self.last_frame
        return {
            "runtime": None if f is None else f.runtime,
            "threads": None if f is None else f.threads,
            "resolution": None if f is None else (f.camera.width, f.camera.height),
            "nelf_ms": float(np.median(self.nelf_ms)) if self.nelf_ms else None,
            "splat_ms": float(np.median(self.splat_ms)) if self.splat_ms else None,
            "psnr": None if f is None else f.psnr,
            "gaussians": self.run.n_gaussians,
            "frames_sent": self.frames_sent,
            "frames_dropped": self.frames_dropped,
        }

    def _update_stats(self, f: engine.Frame) -> None:
        st = self.stats()
        lines = []
        if st["nelf_ms"] is not None:
            lines.append(f"**NeLF latency:** {st['nelf_ms']:.1f} ms · {RUNTIME_LABELS[f.runtime]}, "
                         f"{f.threads} thread{'s' if f.threads > 1 else ''} (median of {len(self.nelf_ms)})")
        else:
            lines.append("**NeLF latency:** no NeLF in this run")
        lines.append(f"**3DGS {self.run.splat_label} latency:** {st['splat_ms']:.1f} ms (same view)")
        if st["psnr"] is not None:
            lines.append(f"**PSNR NeLF vs 3DGS:** {st['psnr']:.2f} dB (this view)")
        lines.append(f"**Resolution:** {f.camera.width}x{f.camera.height}")
        lines.append(f"**Gaussians:** {st['gaussians']:,}")
        lines.append(f"**Frames:** {st['frames_sent']} shown, {st['frames_dropped']} stale dropped")
        sizes = self.run.file_sizes()
        if sizes:
            lines.append("**Files:** " + ", ".join(f"{n} {mb:.2f} MB" for n, mb in sizes.items()))
        with self.client.atomic():
            self.stats_md.content = "  \n".join(lines)
            if len(self.chart) >= 2:
                a = np.asarray(self.chart, dtype=np.float64)
                self.chart_h.data = (a[:, 0], a[:, 1], a[:, 2])
