#!/usr/bin/env bash
# The benchmarks' interpreter: the checkout's .venv when there is one, else python3.
#   bash benchmarks/python.sh benchmarks/SCRIPT.py ARGS...
here=$(cd "$(dirname "$0")/.." && pwd)
py=python3
if [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"; fi
exec "$py" "$@"
