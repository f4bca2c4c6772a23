#!/usr/bin/env bash
# The browser and viewer tests, RUNS times in a row, beside BURNERS processes that each keep a
# core busy: what CI's 2-core machine looks like when it is loaded. Prints one line per round and
# the counts; exit status 1 if any round failed (its log stays in $LOG_DIR).
#
#   bash scripts/loaded_tests.sh                      # 10 rounds beside two `python -c "while 1: pass"`
#   RUNS=3 BURNERS=4 bash scripts/loaded_tests.sh     # harsher
#   BURN_CMD_1="budget3d train --data X --out runs/x" BURN_CMD_2="..." bash scripts/loaded_tests.sh
#       # burner i first runs BURN_CMD_i (one thread), then burns plainly: useful work as the load
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
BURNERS=${BURNERS:-2}
TESTS=${TESTS:-"tests/test_viewer.py tests/test_export_web.py"}
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/loaded_tests.XXXX)}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python}

pids=()
for i in $(seq "$BURNERS"); do
  var=BURN_CMD_$i
  cmd=${!var:-}
  ( if [ -n "$cmd" ]; then OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 bash -c "$cmd" \
      >"$LOG_DIR/burner$i.log" 2>&1; fi
    exec "$PY" -c "while 1: pass" ) &
  pids+=($!)
done
cleanup() { for p in "${pids[@]}"; do pkill -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

pass=0
fail=0
for r in $(seq "$RUNS"); do
  t0=$(date +%s)
  # shellcheck disable=SC2086
  if "$PY" -m pytest -q -p no:cacheprovider $TESTS >"$LOG_DIR/round$r.log" 2>&1; then
    pass=$((pass + 1)); verdict=green
  else
    fail=$((fail + 1)); verdict=FAILED
  fi
  echo "round $r/$RUNS: $verdict in $(( $(date +%s) - t0 )) s, load $(cut -d' ' -f1 /proc/loadavg): $(tail -n 1 "$LOG_DIR/round$r.log")"
done
echo "loaded browser tests: $pass green, $fail failed of $RUNS rounds beside $BURNERS burners (logs: $LOG_DIR)"
[ "$fail" -eq 0 ]
