#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/gpu/run.sh may install on the GPU machine, which has Python
# 3.12 and no registry: the packages bench/gpu/needs.py CARRIES, at requirements/lock.txt's versions, built
# for CPython 3.12 on x86-64 Linux (pure-Python ones and manylinux binaries), without their dependencies
# (the machine has the rest). bitsandbytes is slimmed to its CUDA 13 and CPU libraries. Run from anywhere:
#   bash bench/gpu/wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
mapfile -t pins < <("$PY" -m bench.gpu.needs pins)
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
"$PY" -m bench.gpu.needs slim .whl
ls -l .whl
echo "total: $(du -cb .whl/*.whl | tail -1 | cut -f1) bytes in $(ls .whl/*.whl | wc -l) wheels"
