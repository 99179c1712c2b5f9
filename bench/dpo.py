"""tunekit DPO against TRL's DPOTrainer on the same model, pairs, LoRA settings and CPU, each in a fresh process.

    python -m bench.dpo --preset cpu-small [--runs tunekit,trl] [--repeat N] [--trl-gc]

Builds the bench tokenizer and the preset's random-init model (bench/data.py) and a synthetic preference set
from the same generator as the SFT bench's chats (a conversation without its last answer is the prompt, that
answer the preferred reply, the same answer cut short the non-preferred one), runs each stack in its own subprocess
(bench/run_dpo_tunekit.py, bench/run_dpo_trl.py), checks that both trained the same token ids, takes each
child's peak RSS from the kernel (os.wait4), prints the table and the line
`dpo vs trl: X.XXx pairs/s, Y.YYx memory, loss diff Z.ZZ%` and writes bench/results/dpo-<preset>.json.

Both stacks train the sigmoid (DPO) loss with beta 0.1, the reference being the same model with the LoRA adapter
switched off, one epoch of the same pairs in `preset.steps` steps, no gradient checkpointing (TRL's default
turns it on: --trl-gc keeps it).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

from bench.data import (
    CHAT_TEMPLATE,
    TextGen,
    build_model_dir,
    build_tokenizer,
    make_example,
    write_jsonl,
)
from bench.presets import PRESETS, Preset
from bench.sft import bench_arguments, interleaved_rounds, machine, median_attempt

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("tunekit", "trl")
BETA = 0.1

# The bench's ChatML template, except that nothing follows the last message's <|im_end|>. TRL's completion is
# what prompt + reply renders to after the generation prompt, so with the SFT template it would also train the
# "\n" after <|im_end|>, which tunekit leaves out (as SFT does); without it both train the same tokens.
_AFTER_TURN = "{%- endgeneration %}{{- '\\n' }}"
assert _AFTER_TURN in CHAT_TEMPLATE
DPO_TEMPLATE = CHAT_TEMPLATE.replace(_AFTER_TURN, "{%- endgeneration %}{%- if not loop.last %}{{- '\\n' }}{%- endif %}")


# --------------------------------------------------------------------------------------------------
# Pairs


def render_pair_ids(pair: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids: the prompt is the template's generation prompt, each reply what
    prompt + reply renders to after it (the reply's text and <|im_end|>)."""
    messages, tools = pair["input"]["messages"], pair["input"].get("tools")
    prompt = list(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
    sides = []
    for reply in (pair["preferred_output"], pair["non_preferred_output"]):
        ids = list(tokenizer.apply_chat_template(messages + reply, tools=tools, tokenize=True,
                                                 return_dict=True)["input_ids"])
        if ids[:len(prompt)] != prompt:
            raise ValueError("the prompt does not render as a prefix of prompt + reply")
        sides.append(ids[len(prompt):])
    return prompt, sides[0], sides[1]


def make_pairs(preset: Preset, tokenizer, n: int, seed: int) -> list[dict]:
    """`n` pairs in OpenAI's DPO form: a chat of bench/data.py (log-normal length around the preset's median,
    a quarter with tools) without its last answer is the prompt; that answer is preferred, the same answer cut
    short (an incomplete reply) is not. Pairs with a side (prompt + reply) over seq_len are redrawn."""
    gen = TextGen(seed)
    pairs = []
    while len(pairs) < n:
        target = int(math.exp(gen.rng.gauss(math.log(preset.median_tokens), 0.7)))
        example = make_example(gen, min(target, preset.seq_len))
        *prompt, answer = example["messages"]
        # The non-preferred reply stops early: the preferred one's text cut at a space 40-70% of the way in.
        text = answer["content"]
        spaces = [k for k, ch in enumerate(text) if ch == " "]
        if len(spaces) < 3:
            continue
        other = {"role": "assistant", "content": text[:spaces[int(len(spaces) * gen.rng.uniform(0.4, 0.7))]]}
        pair = {"input": {"messages": prompt, **({"tools": example["tools"]} if "tools" in example else {})},
                "preferred_output": [answer], "non_preferred_output": [other]}
        p, c, r = render_pair_ids(pair, tokenizer)
        if len(p) + max(len(c), len(r)) <= preset.seq_len:
            pairs.append(pair)
    return pairs


def for_trl(pair: dict) -> dict:
    """TRL's conversational form of the same pair; `tools` as a JSON string (TRL json-loads it), so Arrow does
    not merge the tool schemas into one struct with None-filled keys."""
    tools = pair["input"].get("tools")
    return {"prompt": pair["input"]["messages"], "chosen": pair["preferred_output"],
            "rejected": pair["non_preferred_output"], "tools": json.dumps(tools) if tools else None}


def ids_digest(triples) -> str:
    """sha256 of the (prompt, chosen, rejected) token ids of every pair, in order."""
    return hashlib.sha256(json.dumps([[list(map(int, x)) for x in t] for t in triples]).encode()).hexdigest()


def prepare(preset: Preset, workdir: Path, seed: int = 0) -> dict:
    """Tokenizer (with DPO_TEMPLATE), model dir, pairs.jsonl (OpenAI form, tunekit reads it), pairs-trl.jsonl
    (TRL's form) and eval.jsonl under `workdir`; their paths and token counts."""
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.tokenizer_vocab, seed)
    tokenizer.chat_template = DPO_TEMPLATE
    train = make_pairs(preset, tokenizer, preset.n_train, seed)
    evals = make_pairs(preset, tokenizer, preset.n_eval, seed + 1)
    write_jsonl(train, workdir / "pairs.jsonl")
    write_jsonl([for_trl(p) for p in train], workdir / "pairs-trl.jsonl")
    write_jsonl(evals, workdir / "eval.jsonl")
    model_dir = build_model_dir(preset, tokenizer, workdir / "model", seed)
    triples = [render_pair_ids(p, tokenizer) for p in train]
    prompt = sum(len(t[0]) for t in triples)
    chosen = sum(len(t[1]) for t in triples)
    rejected = sum(len(t[2]) for t in triples)
    longest = sorted(len(t[0]) + max(len(t[1]), len(t[2])) for t in triples)
    return {"model_dir": str(model_dir), "train": str(workdir / "pairs.jsonl"),
            "train_trl": str(workdir / "pairs-trl.jsonl"), "eval": str(workdir / "eval.jsonl"),
            "n_train": len(train), "n_eval": len(evals), "with_tools": sum("tools" in p["input"] for p in train),
            "prompt_tokens": prompt, "chosen_tokens": chosen, "rejected_tokens": rejected,
            # every token a forward runs on: both sides, each with its prompt
            "tokens": 2 * prompt + chosen + rejected, "trained_tokens": chosen + rejected,
            "side_p50": longest[len(longest) // 2], "side_max": longest[-1], "ids_sha256": ids_digest(triples)}


# --------------------------------------------------------------------------------------------------
# The held-out loss, scored the same way in both runs


def reply_logps(model, prompt: list[int], reply: list[int], device) -> float:
    """Summed log-prob of `reply` after `prompt`, one unpadded forward."""
    import torch

    ids = torch.tensor([prompt + reply], device=device)
    logits = model(input_ids=ids, use_cache=False).logits.float()[0, len(prompt) - 1:-1]  # (len(reply), V)
    return float(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).sum())


def eval_dpo(policy, reference, tokenizer, pairs: list[dict], device) -> dict:
    """The sigmoid DPO loss (beta BETA) of `policy` against `reference` on held-out pairs, each side scored
    alone; the mean over pairs, and the reward accuracy and margin."""
    import torch

    policy.eval()
    reference.eval()
    losses, margins = [], []
    with torch.no_grad():
        for pair in pairs:
            prompt, chosen, rejected = render_pair_ids(pair, tokenizer)
            z = ((reply_logps(policy, prompt, chosen, device) - reply_logps(policy, prompt, rejected, device))
                 - (reply_logps(reference, prompt, chosen, device) - reply_logps(reference, prompt, rejected, device)))
            losses.append(-float(torch.nn.functional.logsigmoid(torch.tensor(BETA * z, dtype=torch.float64))))
            margins.append(BETA * z)
    return {"eval_loss": sum(losses) / len(losses), "eval_reward_margin": sum(margins) / len(margins),
            "eval_reward_accuracy": sum(m > 0 for m in margins) / len(margins), "eval_pairs": len(pairs)}


def load_reference(workdir: Path, preset: Preset):
    """The untrained model (the reference of both runs), for the held-out loss."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype).to(preset.device)


def pair_throughput(ends: list[float], pairs: list[int], trained: list[int], warmup: int) -> dict:
    """Pairs/s and trained tokens/s after `warmup` steps (the last warm-up step's end starts the clock)."""
    if len(ends) <= warmup + 1 or warmup < 1:
        raise ValueError(f"{len(ends)} steps: need warm-up >= 1 and more than warm-up + 1 steps")
    seconds = ends[-1] - ends[warmup - 1]
    return {"steps": len(ends), "measured_steps": len(ends) - warmup, "measured_seconds": seconds,
            "measured_pairs": sum(pairs[warmup:]), "pairs_per_s": sum(pairs[warmup:]) / seconds,
            "tokens_per_s": sum(trained[warmup:]) / seconds, "pairs": sum(pairs), "trained_tokens": sum(trained),
            "pairs_per_step": pairs}


# --------------------------------------------------------------------------------------------------
# The comparison


def child_command(run: str, preset: Preset, workdir: Path, out: Path, trl_gc: bool) -> list[str]:
    module = "bench.run_dpo_tunekit" if run == "tunekit" else "bench.run_dpo_trl"
    cmd = [sys.executable, "-m", module, "--preset", preset.name, "--workdir", str(workdir), "--out", str(out)]
    return cmd + (["--gc"] if run == "trl" and trl_gc else [])


def table(results: dict[str, dict]) -> str:
    lines = [f"{'run':<10}{'steps':>6}{'pairs':>7}{'trained tok':>12}{'pairs/s':>9}{'tok/s':>8}{'peak RSS MiB':>14}"
             f"{'eval loss':>11}{'wall s':>8}"]
    for name, r in results.items():
        if "pairs_per_s" not in r:
            lines.append(f"{name:<10}  failed (exit {r.get('returncode')}), see {r.get('log')}")
            continue
        lines.append(f"{name:<10}{r['steps']:>6}{r['pairs']:>7}{r['trained_tokens']:>12}{r['pairs_per_s']:>9.2f}"
                     f"{r['tokens_per_s']:>8.0f}{r['child_maxrss_mib']:>14.0f}{r['eval_loss']:>11.5f}"
                     f"{r['wall_seconds']:>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = bench_arguments(__doc__, RUNS, "dpo-<preset>", 1, "rounds of all runs (median pairs/s is reported)")
    parser.add_argument("--trl-gc", action="store_true", help="keep TRL's default gradient checkpointing")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if unknown := [r for r in runs if r not in RUNS]:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if preset.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"preset {preset.name} needs a CUDA GPU; on CPU use cpu-small or cpu-medium")

    workdir = args.workdir or Path("/tmp/tunekit-bench") / f"dpo-{preset.name}"
    print(f"preparing {preset.name} pairs, tokenizer and model in {workdir} ...", flush=True)
    data = prepare(preset, workdir)
    print(f"  {data['n_train']} pairs ({data['with_tools']} with tools): prompt {data['prompt_tokens']}, chosen "
          f"{data['chosen_tokens']}, rejected {data['rejected_tokens']} tokens; a side (prompt + reply) p50 "
          f"{data['side_p50']}, max {data['side_max']}", flush=True)

    # Each stack's reported run is its median by pairs/s.
    def report(run: str, result: dict, proc: dict) -> str:
        same = result["ids_sha256"] == data["ids_sha256"]
        return (f"{result['pairs_per_s']:.2f} pairs/s, peak RSS {proc['child_maxrss_mib']:.0f} MiB, eval loss "
                f"{result['eval_loss']:.5f}, token ids {'as rendered' if same else 'DIFFERENT'}, load avg "
                f"{proc['loadavg_before'][0]:.1f}")

    attempts = interleaved_rounds(runs, args.repeat, workdir,
                                  lambda run, out: child_command(run, preset, workdir, out, args.trl_gc), report)
    results: dict[str, dict] = {}
    for run, tries in attempts.items():
        chosen, done = median_attempt(tries, "pairs_per_s")
        results[run] = {**chosen, "pairs_per_s_all_rounds": [t["pairs_per_s"] for t in done],
                        "peak_rss_all_rounds": [t["child_maxrss_mib"] for t in done]}

    print()
    print(table(results))
    record = {"command": " ".join(["python -m bench.dpo", *sys.argv[1:]]), "preset": preset.to_dict(),
              "beta": BETA, "loss": "sigmoid", "data": data, "machine": machine(),
              "trl_gradient_checkpointing": args.trl_gc, "runs": results,
              "same_token_ids": {run: r.get("ids_sha256") == data["ids_sha256"] for run, r in results.items()}}
    tk, trl = results.get("tunekit", {}), results.get("trl", {})
    if "pairs_per_s" in tk and "pairs_per_s" in trl:
        record["ratios"] = {"pairs_per_s": tk["pairs_per_s"] / trl["pairs_per_s"],
                            "peak_rss": tk["child_maxrss_mib"] / trl["child_maxrss_mib"],
                            "loss_diff_pct": 100 * (tk["eval_loss"] - trl["eval_loss"]) / trl["eval_loss"]}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"dpo-{preset.name}{f'-{args.tag}' if args.tag else ''}.json"
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(record, indent=2))
    print(f"\nwritten {path}")
    if "ratios" in record:
        r = record["ratios"]
        print(f"dpo vs trl: {r['pairs_per_s']:.2f}x pairs/s, {r['peak_rss']:.2f}x memory, loss diff "
              f"{r['loss_diff_pct']:.2f}%")


if __name__ == "__main__":
    main()
