"""budget3d.runtime: --device auto follows --backend (checked on the CPU by pretending a GPU is
there), atomic writes leave the old file or the new one and no temporary file, PSNR, Ctrl-C."""

import json
import os
import signal

import numpy as np
import pytest
import torch

from budget3d import runtime
from budget3d.errors import UserError


@pytest.fixture
def gpu_host(monkeypatch):
    """torch believes a CUDA GPU with gsplat's kernels is there (nothing may then touch it: these
    tests stop before)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "cuda_kernels_missing", lambda: None)


def test_auto_falls_back_to_the_cpu_when_gsplats_kernels_are_missing(gpu_host, monkeypatch):
    """A GPU without nvcc: --device auto trains on the CPU with a warning that says what to
    install; asking for the GPU explicitly stays a one-line error."""
    monkeypatch.setattr(runtime, "cuda_kernels_missing", lambda: "gsplat's _C is None: no nvcc, or the build failed")
    with pytest.warns(UserWarning, match="training on the CPU instead.*nvcc"):
        assert runtime.pick_device("auto", "auto") == torch.device("cpu")
    with pytest.raises(UserError, match="kernels cannot be built") as e:
        runtime.pick_backend("auto", torch.device("cuda"))
    assert "\n" not in str(e.value)


def test_kernel_check_without_a_gpu_says_why():
    """On this CPU machine gsplat has no kernels (no nvcc): the check returns a reason instead of
    letting the first render die with an AttributeError."""
    if torch.cuda.is_available():
        pytest.skip("a GPU host builds the kernels")
    why = runtime.cuda_kernels_missing()
    assert why and "\n" not in why


def test_auto_device_follows_the_backend_on_a_gpu_host(gpu_host):
    for backend in ("cpu", "torch"):
        assert runtime.pick_device("auto", backend) == torch.device("cpu"), backend
    assert runtime.pick_device("auto", "auto").type == "cuda"
    assert runtime.pick_device("auto", "cuda").type == "cuda"
    assert runtime.pick_device("cpu", "auto") == torch.device("cpu")
    assert runtime.pick_device("cuda", "torch").type == "cuda"  # torch renders on either


def test_auto_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for backend in ("auto", "cpu", "torch"):
        assert runtime.pick_device("auto", backend) == torch.device("cpu")
    for device, backend in (("cuda", "auto"), ("auto", "cuda")):
        with pytest.raises(UserError, match="no CUDA GPU") as e:
            runtime.pick_device(device, backend)
        assert "\n" not in str(e.value)


def test_cuda_device_with_the_cpu_backend_is_one_line(gpu_host):
    with pytest.raises(UserError, match="--device cuda --backend cpu") as e:
        runtime.pick_device("cuda", "cpu")
    assert "\n" not in str(e.value)


def test_train_and_eval_auto_device_mean_the_cpu_for_cpu_backends(gpu_host, tmp_path):
    """The trainer's setup asks runtime with its backend: on a GPU host backend cpu/torch with
    device auto trains on the CPU (it used to pick CUDA, and resolve_backend then refused)."""
    from test_train import tiny_config, tiny_scene

    from budget3d.train.trainer import setup

    scene = tiny_scene(n_train=2, n_test=1, points=20)
    for backend in ("cpu", "torch"):
        s = setup(tiny_config(tmp_path / backend, backend=backend, device="auto", iters=2), scene=scene)
        assert s.device == torch.device("cpu") and s.backend == backend
        assert s.params["means"].device.type == "cpu"


def test_cli_cuda_device_with_cpu_backend_is_one_line(gpu_host, capsys, tmp_path):
    from test_cli import assert_one_line_error, run_cli
    from test_train import write_blender_scene

    data = write_blender_scene(tmp_path / "scene", n_train=2, n_test=1)
    code, _, err = run_cli(capsys, "train", "--data", data, "--budget", "10", "--out", tmp_path / "run",
                           "--device", "cuda", "--backend", "cpu", "--quiet")
    assert_one_line_error(code, err, "--device cuda", "--backend cpu")
    assert not (tmp_path / "run").exists()


def test_pick_backend_messages():
    assert runtime.pick_backend("auto", "cpu") in ("cpu", "torch")
    with pytest.raises(UserError, match="--backend cuda"):
        runtime.pick_backend("cuda", torch.device("cpu"))


# ----------------------------------------------------------------------------- atomic writes


def test_write_json(tmp_path):
    path = tmp_path / "m.json"
    runtime.write_json(path, {"a": np.int64(3), "b": np.float32(0.5), "c": np.float32("nan"), "p": tmp_path})
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": 3, "b": 0.5, "c": None, "p": str(tmp_path)}
    runtime.write_json(path, [1], indent=1)
    assert json.loads(path.read_text()) == [1]
    with pytest.raises(ValueError):  # strict JSON asked for: the old file stays, no temporary file
        runtime.write_json(path, {"x": float("inf")}, allow_nan=False)
    assert json.loads(path.read_text()) == [1]
    assert os.listdir(tmp_path) == ["m.json"]


def test_failed_writes_keep_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    runtime.save_torch({"step": 1}, path)

    def broken(obj, f, *a, **k):
        open(f, "wb").write(b"torn")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        runtime.save_torch({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["ck.pt"]
    runtime.write_bytes(tmp_path / "b.bin", b"xyz")
    assert (tmp_path / "b.bin").read_bytes() == b"xyz"


def test_atomic_path_names(tmp_path):
    with runtime.atomic_path(tmp_path / "a.json") as tmp:
        assert tmp.name == "a.json.tmp"
        tmp.write_text("1")
    with runtime.atomic_path(tmp_path / "p.png", keep_suffix=True) as tmp:
        assert tmp.name == "p.tmp.png"
        tmp.write_text("1")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "p.png"]


def test_write_png_and_figure(tmp_path):
    import cv2

    img = torch.zeros(4, 5, 3)
    img[..., 0] = 1.0  # red
    runtime.write_png(tmp_path / "a.png", img)
    bgr = cv2.imread(str(tmp_path / "a.png"))
    assert bgr.shape == (4, 5, 3) and (bgr[..., 2] == 255).all() and (bgr[..., :2] == 0).all()
    runtime.write_png(tmp_path / "b.png", np.full((2, 2, 3), 7, np.uint8))
    assert (cv2.imread(str(tmp_path / "b.png")) == 7).all()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    runtime.save_figure(fig, tmp_path / "f.png", dpi=50)
    assert not plt.fignum_exists(fig.number)
    assert cv2.imread(str(tmp_path / "f.png")) is not None
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "f.png"]


# ----------------------------------------------------------------------------- PSNR, Ctrl-C


def test_psnr_torch_and_numpy_agree():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 8, 3, generator=g), torch.rand(8, 8, 3, generator=g)
    want = -10 * np.log10(np.mean((a.numpy().astype(np.float64) - b.numpy()) ** 2))
    assert runtime.psnr(a, b) == pytest.approx(want, abs=1e-4)
    assert runtime.psnr(a.numpy(), b.numpy()) == pytest.approx(want, abs=1e-9)
    assert runtime.psnr(a * 2, b) == runtime.psnr(a.clamp(max=0.5) * 2, b)  # clamped to [0, 1]
    assert runtime.psnr(a, a) == float("inf") and runtime.psnr(a.numpy(), a.numpy()) == float("inf")
    assert runtime.psnr_from_mse(0.0, floor=1e-10) == pytest.approx(100.0)
    assert runtime.psnr_from_mse(0.01) == pytest.approx(20.0)


def test_stop_on_ctrl_c():
    old = signal.getsignal(signal.SIGINT)
    with runtime.StopOnCtrlC() as c:
        assert not c.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert c.requested  # the first asks
        with pytest.raises(KeyboardInterrupt):  # the second interrupts
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is old


def test_cuda_backend_without_gsplat_kernels_is_one_line(monkeypatch):
    """gsplat without its compiled kernels (no nvcc) has ``_C = None`` and died at the first render
    with an AttributeError; now the backend is checked before any work, in one line."""
    import sys
    import types

    import torch

    from budget3d.errors import UserError
    from budget3d.runtime import pick_backend

    fake = types.ModuleType("gsplat.cuda._backend")
    fake._C = None
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", fake)
    import gsplat.cuda

    monkeypatch.setattr(gsplat.cuda, "_backend", fake, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="CUDA kernels cannot be built or loaded.*--device cpu") as e:
        pick_backend("auto", torch.device("cuda"))
    assert "\n" not in str(e.value)
    fake._C = object()  # kernels present: the backend is cuda
    assert pick_backend("auto", torch.device("cuda")) == "cuda"
