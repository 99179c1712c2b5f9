#!/usr/bin/env bash
# README command 1: set up .venv, then the quickstart end to end on the shipped tiny model:
# check the data, fine-tune a LoRA (a few minutes on 2 CPU cores), compare it with the base model,
# and ask it about a recipe it has not seen. Extra arguments go to `tunekit train` as overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev,rag}" bash scripts/setup.sh
T=.venv/bin/tunekit
Q=examples/quickstart
step() { printf '\n\033[1m== %s\033[0m (%ss so far)\n' "$1" "$SECONDS"; }

step "1/4 check the data with the model's tokenizer"
$T data check $Q/train.jsonl --validation $Q/valid.jsonl --model models/tiny-chat --max-len 256

step "2/4 fine-tune a LoRA on models/tiny-chat"
$T train $Q/config.yaml "$@"

step "3/4 evaluate: tuned vs base, 3-shot and retrieval 3-shot prompts on the 100 held-out recipes"
$T eval runs/quickstart --data $Q/valid.jsonl --baseline base --baseline few-shot:3 --baseline rag:3 --max-new-tokens 48

step "4/4 ask the tuned model about a new recipe"
SYSTEM=$(.venv/bin/python -c "import json; print(json.loads(open('$Q/valid.jsonl').readline())['messages'][0]['content'])")
RECIPE=$'Banana Oat Muffins\n\nIngredients:\n- 2 cups whole wheat flour\n- 1 cup rolled oats\n- 1/2 cup packed brown sugar\n- 2 large eggs, beaten\n- 1 teaspoon ground cinnamon'
printf '%s\n' "$RECIPE"
$T chat runs/quickstart --system "$SYSTEM" "$RECIPE" --max-new-tokens 48
printf '\nDone in %ss. Report: runs/quickstart/eval/report.html\n' "$SECONDS"
printf "Export it: tunekit export runs/quickstart --format merged (or adapter, gguf, ollama; see README)\\n"
