"""The evaluation's generation: tunekit's engine (`tunekit.generate.engine.generate`, what `tunekit eval` runs)
against transformers' batched `generate` with left padding (what `tunekit eval` ran before it generated through
the engine), on the same model, prompts, batch size and token limit, alternating, in one process.

    python -m bench.eval_generate [RUN_OR_MODEL] [--prompts 100] [--max-new-tokens 48] [--batch-size 8] [--rounds 3]

Default model: runs/quickstart when it exists, else models/tiny-chat; prompts: the quickstart's held-out
recipes. Prints per round the wall time of each and the ratio, whether the greedy outputs are identical, and
writes bench/results/eval_generate.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tunekit.data.render import end_of_turn_ids, render_prompt
from tunekit.generate.engine import generate
from tunekit.model import load_for_inference

REPO = Path(__file__).resolve().parents[1]


def transformers_batched(model, prompts: list[list[int]], stop: list[int], pad: int, max_new_tokens: int,
                         batch_size: int) -> list[list[int]]:
    """Greedy, batched by similar length with left padding (generate() derives positions from the mask)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
                              pad_token_id=pad)
    out: list[list[int] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
        for row, i in enumerate(chunk):
            cut = next((j for j, t in enumerate(new[row]) if t in stop), None)
            out[i] = new[row] if cut is None else new[row][:cut]
    return out  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = REPO / "runs" / "quickstart"
    parser.add_argument("model", nargs="?", type=Path,
                        default=default if (default / "final").is_dir() else REPO / "models" / "tiny-chat")
    parser.add_argument("--data", type=Path, default=REPO / "examples" / "quickstart" / "valid.jsonl")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_for_inference(args.model)
    rows = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines()[:args.prompts]]
    prompts = [list(render_prompt({"messages": r["messages"][:-1]}, tokenizer)) for r in rows]
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    rounds = []
    for _ in range(args.rounds):
        began = time.perf_counter()
        engine = [g.ids for g in generate(model, prompts, stop_ids=stop, pad_id=pad,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)]
        engine_s = time.perf_counter() - began
        began = time.perf_counter()
        peer = transformers_batched(model, prompts, stop, pad, args.max_new_tokens, args.batch_size)
        peer_s = time.perf_counter() - began
        same = sum(a == b for a, b in zip(engine, peer, strict=True))
        rounds.append({"engine_s": round(engine_s, 3), "transformers_s": round(peer_s, 3),
                       "speedup": round(peer_s / engine_s, 2), "identical_outputs": same,
                       "tokens": sum(map(len, engine))})
        print(json.dumps(rounds[-1]), flush=True)
    result = {"model": str(args.model), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "threads": args.threads, "rounds": rounds}
    out = REPO / "bench" / "results" / "eval_generate.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
