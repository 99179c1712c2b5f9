#!/usr/bin/env bash
# The RAG example end to end on the shipped tiny model: set up .venv (with Qdrant's client), build the
# knowledge base and its Qdrant index, write the chats (question + retrieved passages), fine-tune, evaluate
# tuned + retrieval against base + retrieval, print the comparison. Extra arguments go to `tunekit train`.
set -euo pipefail
cd "$(dirname "$0")/../.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev,rag}" bash scripts/setup.sh
T=.venv/bin/tunekit
E=examples/rag
step() { printf '\n\033[1m== %s\033[0m (%ss so far)\n' "$1" "$SECONDS"; }

step "1/4 knowledge base -> Qdrant index (runs/rag-index) -> chats with the top-3 passages"
.venv/bin/python $E/make_data.py --index runs/rag-index
$T data check $E/train.jsonl --validation $E/valid.jsonl --model models/tiny-chat --max-len 320

step "2/4 fine-tune models/tiny-chat (method: full, every weight: config.yaml)"
$T train $E/config.yaml "$@"

step "3/4 evaluate on the 100 held-out questions, both models reading the same retrieved passages"
$T eval runs/rag --data $E/valid.jsonl --baseline base --scorer $E/scorer.py:score --max-new-tokens 16

step "4/4 the comparison"
.venv/bin/python $E/compare.py runs/rag/eval/results.json
printf '\nDone in %ss. Report: runs/rag/eval/report.html\n' "$SECONDS"
