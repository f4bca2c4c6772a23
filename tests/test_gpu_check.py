"""scripts/gpu_check.sh, the prepared check for a GPU machine: its dry run checks its own inputs
(the wheel list against the wheels folder, the scene) and prints what it would run, here on the CPU."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dry(*args):
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_dry_run_prints_the_plan():
    r = dry()
    assert r.returncode == 0, r.stderr
    for want in ("pip install -q --no-deps -e .", "cuda_kernels_missing", "pytest -q -m cuda",
                 "--strategy taming", "--strategy mcmc", "--strategy default", "budget3d distill"):
        assert want in r.stdout, want


def test_dry_run_checks_the_wheels_it_is_handed(tmp_path):
    r = dry("--wheels", str(tmp_path))
    assert r.returncode == 2 and "no wheel for gsplat==1.5.3" in r.stderr and "nothing was run" in r.stderr
    for line in (REPO / "scripts" / "gpu_wheels.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split("=")[0]
        if name:
            (tmp_path / f"{name.replace('-', '_')}-1.0-py3-none-any.whl").write_bytes(b"")
    assert dry("--wheels", str(tmp_path)).returncode == 0


def test_bad_arguments_are_one_line():
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--bogus" in r.stderr
