#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): install, then run the whole suite.
#   bash tests/run.sh                     everything: tests/unit (in-process, seconds) + tests/integration (torchrun, end to end)
#   bash tests/run.sh tests/unit          the quick loop while developing
#   bash tests/run.sh [pytest args]
# Two passes: the suite on TEST_WORKERS pytest-xdist workers (2: most tests are one process
# starting torch, so a second core halves the time; tests sharing an expensive fixture stay on one
# worker), then the few tests that assert wall-clock bounds (marked serial) alone.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
ruff check .
run_pass() {  # one pytest pass; 5 (the arguments selected none of its tests) counts as success
  local rc=0
  python -m pytest -q "$@" || rc=$?
  [ "$rc" -eq 5 ] && rc=0
  return "$rc"
}
run_pass -n "${TEST_WORKERS:-2}" --dist loadgroup -m "not serial" --durations=25 "$@"
run_pass -m serial --durations=5 "$@"
