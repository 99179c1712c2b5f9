#!/usr/bin/env bash
# The function-calling example end to end on the shipped tiny model: set up .venv, check the data, fine-tune,
# compare tool-call accuracy with the base model, then serve the tuned run and drive it with the openai SDK
# (client.py runs the tools the model calls). Extra arguments go to `tunekit train` as overrides.
set -euo pipefail
cd "$(dirname "$0")/../.."
TUNEKIT_EXTRAS="${TUNEKIT_EXTRAS:-dev,serve}" bash scripts/setup.sh
T=.venv/bin/tunekit
E=examples/function-calling
step() { printf '\n\033[1m== %s\033[0m (%ss so far)\n' "$1" "$SECONDS"; }

step "1/4 check the data with the model's tokenizer and tool template"
$T data check $E/train.jsonl --validation $E/valid.jsonl --model $E/tiny-chat-tools --max-len 512

step "2/4 fine-tune models/tiny-chat to call the tools"
$T train $E/config.yaml "$@"

step "3/4 evaluate: tool-call accuracy of the tuned run vs the base on the 100 held-out questions"
$T eval runs/function-calling --data $E/valid.jsonl --baseline base --max-new-tokens 200

step "4/4 serve the tuned run and call it with the openai SDK"
PORT=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
$T serve runs/function-calling --port "$PORT" > runs/function-calling-serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null && break
  sleep 1
done
.venv/bin/python $E/client.py --base-url "http://127.0.0.1:$PORT/v1"
printf '\nDone in %ss. Report: runs/function-calling/eval/report.html\n' "$SECONDS"
