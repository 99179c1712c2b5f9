#!/usr/bin/env bash
# Refresh requirements/lock.txt: install tunekit with every extra into a new, empty venv (torch==2.13.0
# first, on its own, as setup.sh does), then freeze every installed distribution at its version.
# The rule: refresh, run the suite (bash scripts/test.sh), commit the lock and any fixes together.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${TUNEKIT_LOCK_EXTRAS:-dev,qlora,trackers,serve,gguf,bench,rag,graders}"
PY="${PYTHON:-python3}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel
"$tmp/venv/bin/python" -m pip install -q torch==2.13.0
"$tmp/venv/bin/python" -m pip install -q -e ".[${EXTRAS}]"
{
  echo "# tunekit's lock: every distribution that 'pip install -e .[${EXTRAS}]' installs, at the"
  echo "# versions the test suite passed with. Used as pip constraints by scripts/setup.sh (torch is"
  echo "# installed first, on its own). Made by scripts/lock.sh with $("$tmp/venv/bin/python" -V) on $(uname -m);"
  echo "# refresh with: bash scripts/lock.sh && bash scripts/test.sh, then commit both together."
  # --all: pip, setuptools and wheel too. torch's local build tag (+cpu) is dropped: the CPU and the CUDA
  # builds of one release are the same version to pip, and each machine installs its own.
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) distributions, extras ${EXTRAS})"
