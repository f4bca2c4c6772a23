"""budget3d bench (every variant of a run, measured side by side) and the ExecuTorch pte export."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from budget3d.cli import main
from budget3d.errors import UserError
from budget3d.export import bench, pte

EXPECTED = {"3dgs", "3dgs-splat", "3dgs-spz", "nelf-torch", "onnx-fp32", "onnx-int8"}


@pytest.fixture(scope="module")
def benched(exported_run, tmp_path_factory):
    """A copy of the shared run (bench writes into it), benched quick at its own 32x32 and at 128x128."""
    run = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(exported_run, run)
    result = bench.run_bench(run, quick=True, threads=(1, 2), resolutions=["128x128"], progress=False)
    print("bench seconds:", result["seconds"], result["seconds_by_phase"])
    return run, result


def test_bench_json_has_every_variant_with_numbers(benched):
    run, result = benched
    on_disk = json.loads((run / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(result))  # the file is what came back, strict JSON
    names = [v["name"] for v in on_disk["variants"]]
    assert EXPECTED <= set(names), names
    assert "onnx-mixed" in on_disk["missing"] and "onnx-mixed" in on_disk["how_to_make"]
    for v in on_disk["variants"]:
        assert not v["file"].startswith("/")  # relative to the run folder
        assert v["size_mb"] == pytest.approx((run / v["file"]).stat().st_size / 1e6, abs=1e-6)
        assert v["resolution"] == [32, 32], v["name"]
        assert isinstance(v["psnr"], float) and 5 < v["psnr"] < 80, (v["name"], v["psnr"])
        assert 0 < v["ssim"] <= 1
        if v["name"] != "3dgs":  # the teacher itself has no PSNR against itself
            assert isinstance(v["psnr_vs_teacher"], float) and v["psnr_vs_teacher"] > 5, v["name"]
        assert set(v["latency_ms"]) == {"1", "2"}, v["name"]
        for t, st in v["latency_ms"].items():
            assert 0 < st["median"] <= st["p90"] and st["n"] >= 3, (v["name"], t, st)
        assert set(v["latency_by_resolution"]) == {"32x32", "128x128"}, v["name"]
        assert v["peak_mem_mb"] is None or v["peak_mem_mb"] >= 0
    by = {v["name"]: v for v in on_disk["variants"]}
    # the same test views and ground truth as distillation: the torch student reproduces its metrics
    nelf = json.loads((run / "nelf" / "metrics.json").read_text())
    assert by["nelf-torch"]["psnr"] == pytest.approx(nelf["student_psnr"], abs=0.05)
    assert by["onnx-fp32"]["psnr"] == pytest.approx(by["nelf-torch"]["psnr"], abs=0.01)
    assert by["onnx-int8"]["psnr_vs_fp32"] > 20
    # a bigger frame costs more: the 128x128 ONNX files were really made and run
    assert by["onnx-fp32"]["latency_by_resolution"]["128x128"]["1"]["median"] > \
        by["onnx-fp32"]["latency_by_resolution"]["32x32"]["1"]["median"]
    for name in ("onnx-fp32", "onnx-int8"):
        ops = by[name]["top_ops"]
        assert ops and all(o["ms"] >= 0 for o in ops) and sum(o["share"] for o in ops) <= 1.001
        assert any("Conv" in o["op"] for o in ops), ops
    assert "onnx-int8_latency_vs_fp32" in on_disk["ratios"]
    png = (run / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    lines = bench.table(result).splitlines()
    assert len(lines) == 1 + len(names) and all(n in bench.table(result) for n in names)


def test_one_thread_runs_use_one_core(benched):
    """Process CPU time over wall time while the timed frames ran: at 1 thread it cannot exceed one
    core (plus a little for the interpreter); the 128x128 frames are long enough that an unlimited
    pool would show. CPU time is robust to a busy machine (waiting adds wall time, not CPU time)."""
    _, result = benched
    for v in result["variants"]:
        for res, by_t in v["latency_by_resolution"].items():
            r = by_t["1"]["cpu_per_wall"]
            assert r is not None and r <= 1.3, (v["name"], res, r)


def test_bad_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budget3d: error:") and "no such run folder" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["bench", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run folder" in err and "\n" not in err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(UserError, match="nothing to measure"):
        bench.run_bench(bare, quick=True, progress=False)
    assert main(["bench", str(bare), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_pte_without_executorch_names_the_pip_command(exported_run, tmp_path):
    """With ExecuTorch absent (blocked in a child process where it is installed), the export is a
    one-line error that says how to install it."""
    code = ("import sys; sys.modules['executorch'] = None\n"
            "from budget3d.cli import main\n"
            f"sys.exit(main(['export', {str(exported_run)!r}, '--format', 'pte', '--out', {str(tmp_path)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip()
    assert "\n" not in err and "pip install 'budget3d[mobile]'" in err, err
    assert not (tmp_path / pte.FILENAME).exists()


def test_pte_export_runs_like_the_student(exported_run, tmp_path):
    if not pte.available():  # the documented behaviour without the extra, asserted instead
        with pytest.raises(UserError, match=r"pip install 'budget3d\[mobile\]'"):
            pte.export_pte(exported_run, "pte", tmp_path)
        return
    r = pte.export_pte(exported_run, "pte", tmp_path, latency=False)
    assert (tmp_path / pte.FILENAME).stat().st_size > 1000
    assert r["resolution"] == [32, 32] and r["max_abs_diff"] < 1e-4, r
    assert r["psnr_vs_teacher"] is not None and math.isfinite(r["psnr_vs_teacher"])
    assert json.loads((tmp_path / pte.SIDECAR).read_text())["size_mb"] == r["size_mb"]
