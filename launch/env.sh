# Sourced by the README commands: use the active virtualenv, or create ./.venv, and install
# the project (editable): with its test extras (tests/run.sh), or what INSTALL_EXTRAS names
# (launch/demo.sh: none, so a first demo does not download the test tools). torch==2.13.0 is
# pinned in pyproject.toml.
# shellcheck shell=bash
PYTHON_BIN=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
# a first install downloads torch, megatron-core, DeepSpeed, transformers (minutes): pip's own lines
# show the progress; "already satisfied" lines are left out (a re-run prints only the two lines below)
target=".${INSTALL_EXTRAS-[dev]}"
echo "install: pip install -e $target into ${VIRTUAL_ENV} (the first time takes a few minutes)..." >&2
started=$SECONDS
python -m pip install --disable-pip-version-check -e "$target" 2>&1 \
  | { grep --line-buffered -v -e "^Requirement already satisfied" -e "^Obtaining file" || true; } >&2
echo "install: done in $((SECONDS - started)) s" >&2
