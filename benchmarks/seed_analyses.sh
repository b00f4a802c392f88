#!/usr/bin/env bash
# GPT-1's analyses at this scale (benchmarks/seed_analyses.py): zero-shot accuracy during pretraining,
# layers transferred, and pretrained vs from scratch against the number of labels.
#   bash benchmarks/seed_analyses.sh TRAIN_JSONL VALIDATION_JSONL TEST_JSONL [--work DIR] [options]
# e.g. python benchmarks/seed_analyses.py --split ../shared/data/rotten_tomatoes.validation.jsonl /tmp/rt
#      bash benchmarks/seed_analyses.sh ../shared/data/rotten_tomatoes.train.jsonl /tmp/rt/{dev,test}.jsonl
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash benchmarks/seed_analyses.sh TRAIN_JSONL VALIDATION_JSONL TEST_JSONL [options]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/python.sh" "$(dirname "$0")/seed_analyses.py" "$@"
