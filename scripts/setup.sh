#!/usr/bin/env bash
# Create .venv and install tunekit into it at the locked versions. Idempotent: safe to run again.
# torch is installed first, on its own and pinned, so that nothing else can pull another build of it;
# then tunekit with the extras, every distribution constrained to requirements/lock.txt
# (scripts/lock.sh refreshes the lock).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${TUNEKIT_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
LOCK=requirements/lock.txt
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q -c "$LOCK" pip setuptools wheel
if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -c "$LOCK" -e ".[${EXTRAS}]"
echo "tunekit is installed in .venv (extras: ${EXTRAS}, versions from ${LOCK}); activate with: source .venv/bin/activate"
