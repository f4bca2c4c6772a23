#!/usr/bin/env bash
# One prepared check for a GPU machine that has its own CUDA torch but no internet (the `device`
# machine): install budget3d without its deps plus the wheels it is handed, build gsplat's CUDA
# kernels once, run the cuda-marked tests, train lego three ways (taming, mcmc, default capped)
# and distil for 2 minutes; one JSON with PSNR, seconds and peak GPU memory.
#
#   bash scripts/gpu_check.sh --dry-run                      # check the inputs, print the plan
#   bash scripts/gpu_check.sh --wheels .whl --data .gpudata/lego --out "$OUT/gpu_check.json"
#
# Wheels: the packages in scripts/gpu_wheels.txt, for the machine's Python (3.12 when last read),
# downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl -r scripts/gpu_wheels.txt
# and carried (.whl/ is git-ignored). Data: a Blender-layout scene (lego) inside the checkout,
# carried too (../shared beside a checkout does not travel). Sized to fit 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0; WHEELS=.whl; DATA=""; OUT=gpu_check.json; ITERS=3000; BUDGET=100k; DISTILL_MIN=2
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --iters) ITERS="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$DATA" ]; then
  for d in .gpudata/lego shared/data/lego ../shared/data/lego; do [ -d "$d" ] && DATA="$d" && break; done
fi

problems=0
need() { echo "gpu_check: $1" >&2; problems=$((problems + 1)); }
[ -f scripts/gpu_wheels.txt ] || need "scripts/gpu_wheels.txt is missing"
if [ -d "$WHEELS" ]; then
  while read -r req; do
    req="${req%%#*}"; req="$(echo "$req" | xargs)"; [ -z "$req" ] && continue
    name="$(echo "${req%%[=<>]*}" | tr '[:upper:]-' '[:lower:]_')"
    ls "$WHEELS" | tr '[:upper:]-' '[:lower:]_' | grep -q "^${name}_" || need "$WHEELS/ has no wheel for $req"
  done < scripts/gpu_wheels.txt
elif [ "$DRY" = 0 ]; then
  need "$WHEELS/: no such folder of wheels (see the download command at the top of this script)"
else
  echo "gpu_check: (dry run) $WHEELS/ absent: the real run needs the wheels of scripts/gpu_wheels.txt there"
fi
if [ -z "$DATA" ] || [ ! -f "$DATA/transforms_train.json" ]; then
  if [ "$DRY" = 0 ]; then need "no Blender-layout lego scene (give --data DIR with transforms_train.json)"
  else echo "gpu_check: (dry run) no lego scene found: the real run needs --data DIR"; DATA="${DATA:-.gpudata/lego}"; fi
fi
[ "$problems" = 0 ] || { echo "gpu_check: $problems problem(s); nothing was run" >&2; exit 2; }

RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXX")
PLAN=(
  "pip install -q --no-deps -e ."
  "pip install -q --no-deps $WHEELS/*.whl"
  "python -c 'from budget3d.runtime import cuda_kernels_missing as m; w = m(); assert w is None, w'"
  "python -m pytest -q -m cuda $(grep -l 'mark.cuda' tests/*.py | tr '\n' ' ')"
  "budget3d train --data $DATA --downscale 2 --iters $ITERS --budget $BUDGET --strategy taming --device cuda --out $RUNS/taming --quiet"
  "budget3d train --data $DATA --downscale 2 --iters $ITERS --budget $BUDGET --strategy mcmc --device cuda --out $RUNS/mcmc --quiet"
  "budget3d train --data $DATA --downscale 2 --iters $ITERS --budget $BUDGET --strategy default --device cuda --out $RUNS/default --quiet"
  "budget3d distill $RUNS/taming --minutes $DISTILL_MIN --quiet"
)
if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run; would run, in $(pwd):"
  printf '  %s\n' "${PLAN[@]}"
  echo "  then write $OUT (per step: seconds, rc; per run: PSNR, count, train seconds, peak GPU memory)"
  rmdir "$RUNS"
  exit 0
fi

LOG="$RUNS/steps.jsonl"
for step in "${PLAN[@]}"; do
  echo "gpu_check: $step"
  t0=$SECONDS
  set +e; bash -c "$step"; rc=$?; set -e
  python3 -c "import json,sys; print(json.dumps({'step': sys.argv[1], 'rc': int(sys.argv[2]), 'seconds': int(sys.argv[3])}))" \
    "$step" "$rc" "$((SECONDS - t0))" >> "$LOG"
done
python3 - "$RUNS" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {"steps": [json.loads(l) for l in (runs / "steps.jsonl").read_text().splitlines()], "runs": {}}
for name in ("taming", "mcmc", "default"):
    m = runs / name / "metrics.json"
    if m.is_file():
        d = json.loads(m.read_text())
        res["runs"][name] = {k: d.get(k) for k in ("psnr", "num_gaussians", "train_seconds", "peak_memory_mb",
                                                   "peak_gpu_memory_mb", "device", "backend", "iters")}
n = runs / "taming" / "nelf" / "metrics.json"
if n.is_file():
    d = json.loads(n.read_text())
    res["distill"] = {k: d.get(k) for k in ("preset", "steps", "distill_seconds", "student_vs_teacher_psnr", "device")}
out.write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
EOF
