#!/usr/bin/env bash
# The reinforcement example end to end on the shipped tiny model: set up .venv, write the prompts, a short SFT
# on the quickstart's chats, GRPO from that SFT run with grader.yaml as the reward, then both evaluated on the
# 400 held-out chats (exact match and the grader). Extra arguments go to the GRPO `tunekit train`.
set -euo pipefail
cd "$(dirname "$0")/../.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev}" bash scripts/setup.sh
T=.venv/bin/tunekit
E=examples/reinforcement
step() { printf '\n\033[1m== %s\033[0m (%ss so far)\n' "$1" "$SECONDS"; }

step "1/4 prompts from the quickstart's recipes (the answer as a field the grader reads), 400 held-out chats"
.venv/bin/python $E/make_data.py

step "2/4 SFT: the quickstart's config, 2 of its 8 epochs (LoRA on models/tiny-chat) -> runs/rft-sft"
$T train examples/quickstart/config.yaml output.dir=$PWD/runs/rft-sft train.epochs=2 ${SFT_ARGS:-}

step "3/4 GRPO from the SFT run, rewarded by grader.yaml (LoRA) -> runs/rft"
$T train $E/config.yaml "$@"

step "4/4 held-out chats: SFT+GRPO against SFT and models/tiny-chat, with the built-in metrics and the grader"
$T eval runs/rft --data $E/test.jsonl --baseline base --model models/tiny-chat --max-new-tokens 48 \
  --grader $E/grader.yaml
.venv/bin/python $E/table.py runs/rft/eval/results.json
printf '\nDone in %ss. Report: runs/rft/eval/report.html\n' "$SECONDS"
