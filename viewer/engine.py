"""What the viewer renders on the server, without any viser: the run folder's assets, camera
conversions between viser and ``Camera``, the NeLF runtimes and our 3DGS render (gsplat's kernels on
a GPU, our CPU kernels elsewhere).

Conventions. viser reports a client's camera as ``wxyz`` + ``position`` of the camera in the world
with OpenCV axes (x right, y down, z forward) and a vertical field of view ``fov`` in radians; so
``c2w = [R(wxyz) | position]`` is exactly the inverse of ``Camera.world_to_camera``. Intrinsics of a
server frame of ``width`` x ``height`` pixels: ``fy = height / 2 / tan(fov / 2)``, ``fx = fy``,
principal point at the centre.

ONNX resolution. An exported graph has its intrinsics and resolution baked in. The viewer uses the
run's own files (``RUN/export/nelf*.onnx``) at the resolution scale 1x; any other scale is a graph
exported on demand from ``nelf/student.pt`` at that size (same field of view) into a temporary
folder, quantized the same way (int8: the float nodes named in the file's .json sidecar; mixed: its
``float_convs``), kept for the life of the server. Those graphs have a fixed aspect ratio: the frame
is padded / cropped to the client's aspect for the full view. The torch runtime renders any camera,
so it follows the client's aspect and adapts its size to a latency target.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from budget3d.errors import UserError
from budget3d.export import ONNX_FILES
from budget3d.runtime import psnr

RUNTIMES = ("torch", "onnx", "onnx-int8", "onnx-mixed")
RUNTIME_LABELS = {"torch": "torch", "onnx": "ONNX fp32", "onnx-int8": "ONNX int8", "onnx-mixed": "ONNX mixed"}
DOWNLOADS = ("gaussians.ply", "gaussians.splat", "gaussians.spz", *ONNX_FILES.values())
SH_C0 = 0.28209479177387814

# One computation at a time: with 2 cores, two clients rendering at once would each report the
# other's time, and torch's thread count is process-wide (the thread knob sets it per frame).
COMPUTE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- cameras


def quat_to_matrix(wxyz) -> np.ndarray:
    w, x, y, z = np.asarray(wxyz, dtype=np.float64) / max(np.linalg.norm(wxyz), 1e-12)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    """wxyz of a rotation matrix (Shepperd's method; w >= 0)."""
    R = np.asarray(R, dtype=np.float64)
    t = np.trace(R)
    if t > 0:
        s = math.sqrt(t + 1.0) * 2
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2]) * 2
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2]) * 2
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1]) * 2
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def viser_to_c2w(wxyz, position) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, :3] = quat_to_matrix(wxyz)
    c2w[:3, 3] = np.asarray(position, dtype=np.float64)
    return c2w


def c2w_to_viser(c2w) -> tuple[np.ndarray, np.ndarray]:
    c2w = np.asarray(c2w, dtype=np.float64)
    return matrix_to_quat(c2w[:3, :3]), c2w[:3, 3].copy()


def camera_for(c2w, fov_y: float, width: int, height: int):
    """``Camera`` for a ``width`` x ``height`` frame seen from ``c2w`` with vertical field of view
    ``fov_y`` (square pixels, centred principal point), as the browser draws it."""
    from budget3d.scene.camera import Camera

    fy = height / 2.0 / math.tan(fov_y / 2.0)
    return Camera(fy, fy, width / 2.0, height / 2.0, int(width), int(height), np.linalg.inv(np.asarray(c2w, np.float64)))


def fov_y_of(camera) -> float:
    return 2.0 * math.atan(camera.height / 2.0 / camera.fy)


def fit_aspect(img: np.ndarray, aspect: float, fill) -> np.ndarray:
    """``img`` (H, W, 3) padded (with ``fill``) or centre-cropped horizontally to width/height
    ``aspect``, keeping its height: the same vertical field of view in another window shape."""
    h, w = img.shape[:2]
    want = max(1, int(round(h * aspect)))
    if want == w:
        return img
    if want < w:
        x0 = (w - want) // 2
        return img[:, x0:x0 + want]
    out = np.empty((h, want, 3), dtype=img.dtype)
    out[:] = np.asarray(fill, dtype=np.float64).reshape(1, 1, 3) * (255 if img.dtype == np.uint8 else 1)
    x0 = (want - w) // 2
    out[:, x0:x0 + w] = img
    return out


# ----------------------------------------------------------------------------- the run folder


@dataclass
class Run:
    """A run folder's assets as the viewer needs them. ``Run.open`` gives one-line errors."""

    path: Path
    gaussians: dict  # float32 tensors, gsplat names
    sh_degree: Optional[int]
    background: tuple
    cameras: dict  # "train" / "test" -> list of (name, Camera)
    scene_note: str  # why there are no cameras, or ""
    up: np.ndarray  # world up (the training cameras' mean -y)
    centre: np.ndarray  # what the cameras look at
    student: Optional[tuple] = None  # (model, payload) when nelf/student.pt exists
    exports: dict = field(default_factory=dict)  # file name -> Path (the RUN/export files that exist)
    splat_device: str = "cpu"  # where our 3DGS frame is rendered: "cpu" or "cuda"
    _on_device: Optional[dict] = field(default=None, repr=False)

    @property
    def splat_label(self) -> str:
        return "CUDA" if self.splat_device == "cuda" else "CPU"

    def device_gaussians(self) -> dict:
        """The Gaussians where ``splat_device`` renders them (``gaussians`` stays on the CPU for the
        browser's copy and the camera maths)."""
        if self._on_device is None:
            self._on_device = {k: v.to(self.splat_device) for k, v in self.gaussians.items()}
        return self._on_device

    @classmethod
    def open(cls, path, data=None, device: str = "auto") -> "Run":
        import torch

        from budget3d.splat import load_ply

        from budget3d.runfolder import check_run_dir

        from budget3d.export.splats import is_splat_file, load_any, sniff

        if is_splat_file(path):  # another tool's file (a SuperSplat .sog, a Cesium .glb ...): splats only
            path = Path(path)
            try:
                sniff(path)
            except UserError as e:
                raise UserError(f"{path}: is a file, not a run folder; give a run folder written by 'budget3d train', "
                                f"or a splat file ({str(e).split(': ', 1)[-1]})") from None
            gauss = {k: v.float().contiguous() for k, v in load_any(path).items()}
        else:
            path = check_run_dir(path)
            ply = path / "gaussians.ply"
            if not ply.is_file():
                raise UserError(f"{path}: no gaussians.ply; not a finished run folder (train one with 'budget3d train')")
            gauss = {k: v.float().contiguous() for k, v in load_ply(ply).items()}
        cfg = {}
        if path.is_dir() and (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text())
            except ValueError:
                raise UserError(f"{path / 'config.json'}: not valid JSON; the run folder is damaged") from None
        sh = cfg.get("sh_degree")
        cams, note, bg = {"train": [], "test": []}, "", (1.0, 1.0, 1.0)
        if cfg.get("data") or data:
            try:
                from budget3d.runfolder import load_run_scene

                scene = load_run_scene(path, cfg, data)
                cams = {"train": [(v.name, v.camera) for v in scene.train], "test": [(v.name, v.camera) for v in scene.test]}
                bg = tuple(float(c) for c in scene.background)
            except Exception as e:  # a moved scene folder only costs the camera buttons
                note = f"scene {data or cfg['data']} not loadable ({e}); no camera buttons (pass --data PATH)"
        else:
            note = "config.json names no scene; no camera buttons"
        student = None
        st = path / "nelf" / "student.pt"
        if path.is_dir() and st.is_file():
            from budget3d.nelf.students import load_student

            student = load_student(st)
            bg = tuple(float(c) for c in student[1].get("background", bg))
        exports = {n: path / "export" / n for n in DOWNLOADS if (path / "export" / n).is_file()} if path.is_dir() else {}
        if student is not None:  # a damaged ONNX file is an error now, not a failure mid-session
            from budget3d.export.ortrun import session

            for n in exports:
                if n.endswith(".onnx"):
                    session(exports[n])
        allcams = [c for _, c in cams["train"] + cams["test"]]
        if allcams:
            R = np.stack([np.asarray(c.world_to_camera, np.float64)[:3, :3] for c in allcams])
            up = -R[:, 1].mean(0)
            C = np.stack([c.center for c in allcams])
            D = R[:, 2]
            P = np.eye(3)[None] - D[:, :, None] * D[:, None, :]
            try:
                centre = np.linalg.solve(P.sum(0), (P @ C[:, :, None]).sum(0)[:, 0])
            except np.linalg.LinAlgError:
                centre = gauss["means"].median(0).values.double().numpy()
        else:
            up = np.array([0.0, 0.0, 1.0])
            centre = gauss["means"].median(0).values.double().numpy()
        up = up / max(np.linalg.norm(up), 1e-12) if np.linalg.norm(up) > 1e-6 else np.array([0.0, 0.0, 1.0])
        from budget3d.runtime import pick_device

        splat_device = pick_device(device, "auto").type  # auto: the GPU when gsplat's kernels load there
        return cls(path, gauss, None if sh is None else int(sh), bg, cams, note, up, np.asarray(centre, np.float64),
                   student, exports, splat_device)

    @property
    def n_gaussians(self) -> int:
        return int(self.gaussians["means"].shape[0])

    def runtimes(self) -> list:
        """The NeLF runtimes this run can show: torch with a student, each ONNX file that exists."""
        if self.student is None:
            return []
        return ["torch"] + [r for r in RUNTIMES[1:] if ONNX_FILES[r] in self.exports]

    def file_sizes(self) -> dict:
        """name -> MB of the exported artifacts (and the student)."""
        out = {n: p.stat().st_size / 1e6 for n, p in self.exports.items()}
        if self.student is not None:
            out["nelf/student.pt"] = (self.path / "nelf" / "student.pt").stat().st_size / 1e6
        return out

    def splat_arrays(self) -> dict:
        """What viser's ``add_gaussian_splats`` takes: centres, covariances R S S^T R^T from the
        log scales and quaternions, SH DC colours and sigmoid opacities."""
        g = self.gaussians
        means = g["means"].numpy().astype(np.float32)
        q = g["quats"].numpy().astype(np.float64)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        w, x, y, z = q.T
        R = np.stack([
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ], 1)
        s = np.exp(g["scales"].numpy().astype(np.float64))
        M = R * s[:, None, :]
        cov = (M @ M.transpose(0, 2, 1)).astype(np.float32)
        rgb = np.clip(0.5 + SH_C0 * g["sh0"].numpy().reshape(-1, 3), 0, 1).astype(np.float32)
        op = (1.0 / (1.0 + np.exp(-g["opacities"].numpy().astype(np.float64)))).astype(np.float32)[:, None]
        return {"centers": means, "covariances": cov, "rgbs": rgb, "opacities": op}

    def home_c2w(self) -> np.ndarray:
        """The first test camera (else training camera), else a view from above the splats' centre."""
        for split in ("test", "train"):
            if self.cameras[split]:
                return np.linalg.inv(np.asarray(self.cameras[split][0][1].world_to_camera, np.float64))
        from budget3d.scene.camera import look_at_w2c

        ext = float(np.percentile(np.linalg.norm(self.gaussians["means"].numpy() - self.centre, axis=1), 90))
        eye = self.centre + np.array([0.0, -2.5, 1.0]) * max(ext, 1e-3)
        return np.linalg.inv(look_at_w2c(eye, self.centre, self.up))


# ----------------------------------------------------------------------------- rendering


def render_splats(run: Run, camera) -> tuple[np.ndarray, float]:
    """Our 3DGS render of ``camera`` on ``run.splat_device``: ((H, W, 3) float32 in [0, 1],
    milliseconds, the GPU's work included)."""
    import torch

    from budget3d.splat import render

    cuda = run.splat_device == "cuda"
    t = time.perf_counter()
    with torch.no_grad():
        img = render(run.device_gaussians(), camera, backend="cuda" if cuda else "cpu", sh_degree=run.sh_degree,
                     background=torch.tensor(run.background, dtype=torch.float32)).image.clamp(0, 1)
        if cuda:
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    return img.cpu().numpy(), ms


class Nelf:
    """The run's student behind every runtime: torch (any camera) and the ONNX graphs (the run's
    files at 1x, graphs exported on demand at other sizes). Sessions are cached per
    (file, threads); ``render`` is called with ``COMPUTE_LOCK`` held."""

    def __init__(self, run: Run, cache_dir: Optional[Path] = None):
        from budget3d.export import onnx as ex

        self.run = run
        self.model, self.payload = run.student
        self.net = ex.fold_batchnorm(self.model)
        self.scale = int(self.model.scale)
        self.native = tuple(int(v) for v in self.payload["resolution"])
        self.sidecars = {}
        for r, name in ONNX_FILES.items():
            js = run.path / "export" / name.replace(".onnx", ".json")
            try:
                self.sidecars[r] = json.loads(js.read_text()) if js.is_file() else {}
            except ValueError:
                self.sidecars[r] = {}
        self._tmp = None if cache_dir is not None else tempfile.TemporaryDirectory(prefix="budget3d-view-")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path(self._tmp.name)
        self._files: dict = {}
        self._sessions: dict = {}
        self._build_lock = threading.Lock()
        self._calib = None

    @property
    def fov_y(self) -> float:
        fy = float(self.payload["intrinsics"][1])
        return 2.0 * math.atan(self.native[1] / 2.0 / fy)

    def onnx_resolution(self, runtime: str, scale: float) -> tuple[int, int]:
        w0, h0 = self.sidecars.get(runtime, {}).get("resolution") or self.native
        if abs(scale - 1.0) < 1e-9:
            return int(w0), int(h0)
        s = self.scale
        return max(s, int(round(w0 * scale / s)) * s), max(s, int(round(h0 * scale / s)) * s)

    def torch_resolution(self, aspect: float, scale: float, budget: float = 1.0) -> tuple[int, int]:
        """The student's own height times ``scale`` and the latency ``budget`` factor, the width from
        the client's ``aspect``; both multiples of the student's upsampling factor."""
        s = self.scale
        h = max(s, int(round(self.native[1] * scale * budget / s)) * s)
        w = max(s, int(round(h * aspect / s)) * s)
        return w, h

    def onnx_camera(self, runtime: str, c2w, scale: float):
        """The camera an ONNX graph renders: its baked intrinsics (the student's, scaled per axis)."""
        from budget3d.scene.camera import Camera

        w, h = self.onnx_resolution(runtime, scale)
        fx, fy, cx, cy = (float(v) for v in self.payload["intrinsics"])
        sx, sy = w / self.native[0], h / self.native[1]
        return Camera(fx * sx, fy * sy, cx * sx, cy * sy, w, h, np.linalg.inv(np.asarray(c2w, np.float64)))

    def onnx_path(self, runtime: str, scale: float) -> Path:
        """The graph for ``runtime`` at resolution scale ``scale``: the run's file at 1x, else one
        exported (and quantized like the run's file) on demand, once."""
        from budget3d.export.onnx import export_torch, pose_model
        from budget3d.export.quantize import quantize, recipe_exclude

        res = self.onnx_resolution(runtime, scale)
        key = (runtime, res)
        if key in self._files:
            return self._files[key]
        with self._build_lock:
            if key in self._files:
                return self._files[key]
            if abs(scale - 1.0) < 1e-9:
                path = self.run.exports[ONNX_FILES[runtime]]
            else:
                d = self.cache_dir / f"{res[0]}x{res[1]}"
                fp32 = d / "nelf.onnx"
                if not fp32.is_file():
                    export_torch(pose_model(self.model, self.payload, res), fp32)
                path = d / ONNX_FILES[runtime]
                if runtime != "onnx" and not path.is_file():
                    variant = "onnx-int8" if runtime == "onnx-int8" else "onnx-mixed"
                    exclude = recipe_exclude(fp32, self.sidecars.get(runtime, {}), variant)
                    if exclude is None:  # the sidecar does not say: the int8 export's current recipe
                        exclude = recipe_exclude(fp32, {"float_convs": [], "quantize_tail": False}, "onnx-int8")
                    quantize(fp32, path, self._calibration_poses(), exclude=exclude)
            self._files[key] = path
            return path

    def _calibration_poses(self) -> list:
        if self._calib is None:
            cams = [c for _, c in self.run.cameras["test"] + self.run.cameras["train"]][:24]
            if not cams:
                cams = [camera_for(self.run.home_c2w(), self.fov_y, *self.native)]
            self._calib = [np.linalg.inv(np.asarray(c.world_to_camera, np.float64)).astype(np.float32) for c in cams]
        return self._calib

    def session(self, path: Path, threads: int):
        from budget3d.export import ortrun

        key = (str(path), int(threads))
        if key not in self._sessions:
            sess = ortrun.session(path, int(threads))
            sess.run(None, {ortrun.INPUT: np.eye(4, dtype=np.float32)})  # warm-up: the first run allocates
            self._sessions[key] = sess
        return self._sessions[key]

    def render(self, runtime: str, camera, threads: int, scale: float = 1.0) -> tuple[np.ndarray, float]:
        """((H, W, 3) float32 frame, milliseconds of the forward pass alone) for ``camera``. torch
        renders ``camera`` as given; ONNX renders ``camera``'s pose with its graph's intrinsics
        (``onnx_camera``), so give it that camera to compare like with like."""
        import torch

        from budget3d.export.onnx import PoseToImage
        from budget3d.export.ortrun import INPUT

        c2w = np.linalg.inv(np.asarray(camera.world_to_camera, np.float64)).astype(np.float32)
        torch.set_num_threads(int(threads))
        if runtime == "torch":
            module = PoseToImage(self.net, camera.K(), camera.width, camera.height).eval()
            x = torch.as_tensor(c2w)
            t = time.perf_counter()
            with torch.no_grad():
                out = module(x)
            ms = (time.perf_counter() - t) * 1e3
            return out[0].permute(1, 2, 0).numpy(), ms
        if runtime not in ONNX_FILES:
            raise ValueError(f"unknown runtime {runtime!r}")
        sess = self.session(self.onnx_path(runtime, scale), threads)
        t = time.perf_counter()
        out = sess.run(None, {INPUT: c2w})[0]
        ms = (time.perf_counter() - t) * 1e3
        return np.ascontiguousarray(out[0].transpose(1, 2, 0)), ms

    def close(self) -> None:
        self._sessions.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


# ----------------------------------------------------------------------------- one frame


@dataclass
class Settings:
    runtime: str = "torch"  # one of Run.runtimes(); ignored without a student
    threads: int = 1
    scale: float = 1.0  # resolution scale
    target_ms: float = 0.0  # latency target for the torch runtime (0 = none)


@dataclass
class Frame:
    nelf: Optional[np.ndarray]  # (H, W, 3) float32, None without a student
    splats: np.ndarray  # our 3DGS render of the same camera
    camera: object  # the Camera both were rendered with
    nelf_ms: Optional[float]
    splat_ms: float
    psnr: Optional[float]
    runtime: Optional[str]
    threads: int


def render_frame(run: Run, nelf: Optional[Nelf], c2w, fov_y: float, aspect: float, s: Settings,
                 budget: float = 1.0) -> Frame:
    """The NeLF frame and our 3DGS frame of one view, their latencies and the PSNR between them.
    Holds ``COMPUTE_LOCK`` for the computation, so figures from concurrent clients do not mix."""
    import torch

    threads = int(s.threads) if s.threads > 0 else (os.cpu_count() or 1)
    with COMPUTE_LOCK:
        saved = torch.get_num_threads()
        try:
            if nelf is None:
                h = max(8, int(round(128 * s.scale)))
                cam = camera_for(c2w, fov_y, max(8, int(round(h * aspect))), h)
                torch.set_num_threads(threads)
                splats, sms = render_splats(run, cam)
                return Frame(None, splats, cam, None, sms, None, None, threads)
            if s.runtime == "torch":
                cam = camera_for(c2w, fov_y, *nelf.torch_resolution(aspect, s.scale, budget))
            else:
                cam = nelf.onnx_camera(s.runtime, c2w, s.scale)
                nelf.session(nelf.onnx_path(s.runtime, s.scale), threads)  # export / warm-up: not frame time
            img, nms = nelf.render(s.runtime, cam, threads, s.scale)
            torch.set_num_threads(threads)
            splats, sms = render_splats(run, cam)
        finally:
            torch.set_num_threads(saved)
    return Frame(img, splats, cam, nms, sms, psnr(img, splats), s.runtime, threads)
