#!/usr/bin/env bash
# Create .venv and install tunekit into it. Idempotent: safe to run again.
# torch is installed first, pinned, so that the package's own range installs nothing more for it.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${TUNEKIT_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
echo "tunekit is installed in .venv (extras: ${EXTRAS}); activate with: source .venv/bin/activate"
