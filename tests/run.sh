#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): install, then run the whole suite.
#   bash tests/run.sh                     everything: tests/unit (in-process, seconds) + tests/integration (torchrun, end to end)
#   bash tests/run.sh tests/unit          the quick loop while developing
#   bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
ruff check .
python -m pytest -q --durations=25 "$@"
