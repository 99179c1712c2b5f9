"""One tunekit GRPO run in its own process, through the public Python API; writes a result JSON.

    python -m bench.run_grpo_tunekit --preset cpu-small --workdir DIR --out R.json

A RunConfig with objective grpo on the prompt file (OpenAI's reinforcement form), model.base = the saved
random-init model dir, and what the comparison fixes (bench/grpo.py): the grader, group size, max new tokens,
temperature, beta, epsilon, loss_norm token, group-std advantages, one generation per step, prompts per step,
one prompt's group of completions per micro-batch (see bench/grpo.py),
LoRA r/alpha/dropout 0/all-linear, lr constant without warm-up,
one epoch, precision, threads, seed. Everything else is tunekit's default (rollouts on its generation engine in
this process on the live weights, a prompt prefilled once for its group, the reference with the adapter off,
the LM head only at completion tokens, no gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.grpo import GRADER, SEED, GrpoBench, settings
from bench.presets import PRESETS, Preset


def tunekit_config(preset: Preset, bench: GrpoBench, workdir: Path):
    from tunekit.config import config_from_dict

    return config_from_dict({
        "objective": "grpo",
        "grpo": {"grader": GRADER, "group_size": bench.group_size, "max_new_tokens": bench.max_new_tokens,
                 "temperature": bench.temperature, "top_p": 1.0, "beta": bench.beta, "epsilon": bench.epsilon,
                 "steps_per_generation": 1, "loss_norm": "token", "scale_rewards": True,
                 "generation_batch_size": bench.completions_per_step},
        "model": {"base": str(workdir / "model"), "dtype": preset.dtype, "attn_implementation": "auto"},
        "data": {"train": str(workdir / "prompts.jsonl"), "max_len": preset.seq_len, "validation_fraction": 0.0},
        "method": "lora",
        "lora": {"r": preset.lora_r, "alpha": preset.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 1, "lr": preset.lr, "batch_size": bench.prompts_per_step,
                  "micro_batch_size": bench.group_size, "scheduler": "constant", "warmup_ratio": 0.0,
                  "seed": SEED, "log_every": 1, "threads": preset.threads, "device": preset.device},
        "output": {"dir": str(workdir / "tunekit-run"), "overwrite": True},
    }, source="bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    preset = PRESETS[args.preset]
    bench = settings(preset)

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import AutoTokenizer

    from bench import measure
    from bench.grpo import RolloutClock, ids_digest, rollout_throughput
    from tunekit.train.grpo import load_prompt_splits, step_prompts
    from tunekit.train.loop import train

    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "model")
    cfg = tunekit_config(preset, bench, args.workdir)
    run_dir = Path(cfg.output.dir)

    # The prompts as tunekit renders them, and each step's, as the loop takes them.
    prompts = load_prompt_splits(cfg, tokenizer).train
    order = [step_prompts(len(prompts), cfg.train.seed, s, bench.prompts_per_step, bench.steps)
             for s in range(bench.steps)]

    # The model is built inside `train`: the clock attaches to the first causal LM called (bench/grpo.py).
    clock = RolloutClock(torch.cuda.synchronize if preset.device == "cuda" else None)
    hooks = clock.attach_at_first_call()
    handle = register_optimizer_step_post_hook(lambda *_: clock.step_end())
    train_start = time.perf_counter()
    result_obj = train(cfg)
    train_seconds = time.perf_counter() - train_start
    handle.remove()
    for hook in hooks:
        hook.remove()
    train_rss = measure.peak_rss_mib()

    # Per step (steps_per_generation 1: one generation each): completions and generated tokens; the loop's own
    # timing of each generation (rollout_tokens_per_s = generated tokens / seconds around the engine run) is
    # kept beside the clock's.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    n = bench.completions_per_step
    generated = [round(m["completion_tokens_mean"] * n) for m in metrics]
    own_seconds = [g / m["rollout_tokens_per_s"] for g, m in zip(generated, metrics, strict=True)]
    cumulative = [m["trained_tokens"] for m in metrics]
    trained = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    if len(clock.ends) != bench.steps or len(metrics) != bench.steps or trained != generated:
        raise RuntimeError(f"{len(clock.ends)} optimizer steps and {len(metrics)} logged (expected {bench.steps}); "
                           f"trained tokens per step {trained}, generated {generated}")
    result = {"runner": "tunekit", "preset": preset.name, "grpo": bench.to_dict(),
              "gradient_checkpointing": cfg.train.gradient_checkpointing,
              "micro_batch_size": result_obj.summary["plan"]["micro_batch_size"],  # completions per forward
              **rollout_throughput(clock, [n] * bench.steps, generated, bench.warmup_steps),
              "engine_run_seconds_per_step": own_seconds,
              "step_rewards": [m["reward_mean"] for m in metrics], "step_losses": [m["train_loss"] for m in metrics],
              "step_kl": [m.get("kl") for m in metrics], "train_seconds": train_seconds, "peak_rss_mib": train_rss,
              "summary": result_obj.summary, "ids_sha256": ids_digest([prompts[i].ids for step in order for i in step]),
              "step_order": [[prompts[i].item["id"] for i in step] for step in order]}
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
