#!/usr/bin/env bash
# The preference example end to end on the shipped tiny model: set up .venv, write the pairs, SFT on the
# quickstart's chats, DPO on the pairs from that SFT run, then evaluate base, SFT and SFT+DPO on held-out
# pairs (preference accuracy) and held-out chats (the task: exact JSON list). Extra arguments go to the
# DPO `tunekit train`.
set -euo pipefail
cd "$(dirname "$0")/../.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev}" bash scripts/setup.sh
T=.venv/bin/tunekit
E=examples/preference
step() { printf '\n\033[1m== %s\033[0m (%ss so far)\n' "$1" "$SECONDS"; }

step "1/5 pairs from the quickstart's recipes, checked with the model's template"
.venv/bin/python $E/make_data.py
$T data check $E/train.jsonl --validation $E/valid.jsonl --model models/tiny-chat --max-len 256

step "2/5 SFT: the quickstart's config, 2 of its 8 epochs (LoRA on models/tiny-chat) -> runs/preference-sft"
$T train examples/quickstart/config.yaml output.dir=$PWD/runs/preference-sft train.epochs=2 ${SFT_ARGS:-}

step "3/5 DPO from the SFT run on the pairs -> runs/preference-dpo"
$T train $E/config.yaml "$@"

step "4/5 held-out pairs: SFT+DPO against its base (the SFT run) and models/tiny-chat"
$T eval runs/preference-dpo --data $E/valid.jsonl --baseline base --model models/tiny-chat \
  --out runs/preference-dpo/eval-pairs

step "5/5 held-out chats (the task): SFT+DPO against SFT"
$T eval runs/preference-dpo --data examples/quickstart/valid.jsonl --baseline base --max-new-tokens 48 \
  --out runs/preference-dpo/eval-task

.venv/bin/python $E/table.py runs/preference-dpo/eval-pairs/results.json runs/preference-dpo/eval-task/results.json
printf '\nDone in %ss. Reports: runs/preference-dpo/eval-pairs/report.html, runs/preference-dpo/eval-task/report.html\n' \
  "$SECONDS"
