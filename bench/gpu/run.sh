#!/usr/bin/env bash
# The GPU benchmark end to end in one call of at most 10 minutes on a lent GPU machine (docs/gpu.md):
#
#   bash bench/gpu/run.sh                 on a CUDA machine; results in $OUT (results.json, summary.txt, logs.txt)
#   bash bench/gpu/run.sh --cpu-smoke     the same steps on tiny shapes on CPU (tests/test_gpu_script.py)
#
# Uses the machine's own python3 and torch ($PYTHON to choose another). Wheels carried in .whl/
# (bench/gpu/wheels.sh fills it) are installed into a folder of their own, only those whose package is missing
# here or at a version tunekit, TRL or another carried package cannot use (bench/gpu/needs.py).
# Further arguments go to bench/gpu/run.py (--parts, --budget-s, --workdir).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/runs/gpu-bench}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=()
[ -d "${WHEELS:-.whl}" ] && wheels=("${WHEELS:-.whl}")   # WHEELS: another folder of them
mapfile -t install < <("$PY" -m bench.gpu.needs select "${wheels[@]}" --report "$OUT/needs.json")
if [ "${#install[@]}" -gt 0 ]; then
  site="${TUNEKIT_GPU_SITE:-/tmp/tunekit-gpu-site}"
  echo "installing ${#install[@]} carried wheels into $site: ${install[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${install[@]}"
  export PYTHONPATH="$PYTHONPATH:$site"
fi
# The checkout's tunekit first; the carried packages before the machine's site-packages.
export PYTHONPATH="$PWD/src:$PYTHONPATH" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m bench.gpu.run --out "$OUT" "$@"
