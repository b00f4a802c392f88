#!/usr/bin/env bash
# Pretrained vs from-scratch fine-tuning, λ = 0 and 0.5 (benchmarks/finetune_gain.py):
#   bash benchmarks/finetune_gain.sh TRAIN_JSONL VALIDATION_JSONL EVAL_JSONL [--work DIR] [--examples 1000]
# e.g. bash benchmarks/finetune_gain.sh ../shared/data/rotten_tomatoes.{train,validation,validation}.jsonl
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash benchmarks/finetune_gain.sh TRAIN_JSONL VALIDATION_JSONL EVAL_JSONL [options]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/python.sh" "$(dirname "$0")/finetune_gain.py" "$@"
