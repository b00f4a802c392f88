# Sourced by the README commands: use the active virtualenv, or create ./.venv, and install
# the project (editable) with its test extras. torch==2.13.0 is pinned in pyproject.toml.
# shellcheck shell=bash
PYTHON_BIN=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -qq --disable-pip-version-check -e ".[dev]"
