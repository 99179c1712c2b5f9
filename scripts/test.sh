#!/usr/bin/env bash
# Set up .venv (if needed) and run the linter and the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev,qlora,trackers,serve,gguf,rag,graders}" bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
