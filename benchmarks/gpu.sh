#!/usr/bin/env bash
# GPU benchmark (benchmarks/gpu.py): bf16-vs-fp32 check, then tokens/s and MFU of gpt2-small
# and the ~1B preset, as a table. Under 8 minutes on one H100/H200.
#   bash benchmarks/gpu.sh             # needs CUDA
#   bash benchmarks/gpu.sh --dry-run   # the same code path on the CPU (model=tiny, a few steps)
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
if [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
exec "$py" benchmarks/gpu.py "$@"
