"""One tunekit DPO run in its own process, through the public Python API; writes a result JSON.

    python -m bench.run_dpo_tunekit --preset cpu-small --workdir DIR --out R.json

A RunConfig with objective dpo (sigmoid loss, beta 0.1, reference: the adapter switched off) on the pairs file
(OpenAI's form), model.base = the saved random-init model dir, and what the comparison fixes: LoRA r/alpha/
dropout 0/all-linear, lr constant without warm-up, one epoch sized to `preset.steps` steps, max_len = seq_len
per side, precision, threads, seed. Everything else is tunekit's default (pairs packed into rows of up to
2 x max_len tokens, one row per micro-batch, LM head only at trained positions, no gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench.dpo import BETA
from bench.presets import PRESETS, Preset


def tunekit_config(preset: Preset, workdir: Path, tokenizer):
    """(RunConfig, rows per step) for one epoch of the pairs in `preset.steps` steps."""
    from tunekit.config import config_from_dict
    from tunekit.data.dataset import epoch_rows, load_pair_splits

    cfg = config_from_dict({
        "objective": "dpo",
        "dpo": {"beta": BETA, "loss": "sigmoid", "reference": "adapter-off"},
        "model": {"base": str(workdir / "model"), "dtype": preset.dtype, "attn_implementation": "auto"},
        "data": {"train": str(workdir / "pairs.jsonl"), "max_len": preset.seq_len},
        "method": "lora",
        "lora": {"r": preset.lora_r, "alpha": preset.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 1, "lr": preset.lr, "batch_size": 1, "scheduler": "constant", "warmup_ratio": 0.0,
                  "seed": 42, "log_every": 1, "threads": preset.threads, "device": preset.device},
        "output": {"dir": str(workdir / "tunekit-run"), "overwrite": True},
    }, source="bench")
    # The packed rows of one epoch (whole pairs per row, as the loop packs them), to size the batch.
    rows = epoch_rows(load_pair_splits(cfg.data, tokenizer).train_lengths(), 2 * cfg.data.max_len, True,
                      cfg.train.seed, 0)
    cfg.train.batch_size = math.ceil(len(rows) / preset.steps)
    return cfg, cfg.train.batch_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    preset = PRESETS[args.preset]

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import AutoTokenizer

    from bench import measure
    from bench.data import read_jsonl
    from bench.dpo import eval_dpo, ids_digest, load_reference, pair_throughput
    from tunekit.data.dataset import epoch_rows, load_pair_splits
    from tunekit.data.types import IGNORE
    from tunekit.model import load_for_inference
    from tunekit.train.loop import train

    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "model")
    cfg, batch = tunekit_config(preset, args.workdir, tokenizer)
    run_dir = Path(cfg.output.dir)

    # The pairs as tunekit renders them (prompt, chosen, rejected ids), and the pairs of each step: the epoch's
    # rows, `batch` per step, as the loop takes them (checked below against the trained tokens it logged).
    splits = load_pair_splits(cfg.data, tokenizer)
    triples = []
    for chosen, rejected in splits.train:
        n_prompt = next(k for k, label in enumerate(chosen.labels) if label != IGNORE)
        triples.append((chosen.input_ids[:n_prompt], chosen.input_ids[n_prompt:], rejected.input_ids[n_prompt:]))
    rows = epoch_rows(splits.train_lengths(), 2 * cfg.data.max_len, True, cfg.train.seed, 0)
    step_rows = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    step_pairs = [sum(len(r) for r in group) for group in step_rows]
    step_trained = [sum(len(triples[i][1]) + len(triples[i][2]) for r in group for i in r) for group in step_rows]

    ends: list[float] = []

    def step_done(_optimizer, _args, _kwargs):
        if preset.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(step_done)
    train_start = time.perf_counter()
    result_obj = train(cfg)
    train_seconds = time.perf_counter() - train_start
    handle.remove()
    train_rss = measure.peak_rss_mib()

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cumulative = [m["trained_tokens"] for m in metrics]
    logged = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]
    if len(ends) != len(step_pairs) or logged != step_trained:
        raise RuntimeError(f"steps as the bench counts them ({len(step_pairs)}, trained tokens {step_trained}) differ "
                           f"from the run ({len(ends)} steps, trained tokens {logged})")
    result = {"runner": "tunekit", "preset": preset.name, "batch": batch, "batch_unit": "packed rows of pairs",
              "gradient_checkpointing": cfg.train.gradient_checkpointing,
              **pair_throughput(ends, step_pairs, step_trained, preset.warmup_steps),
              "step_losses": [m["train_loss"] for m in metrics], "train_seconds": train_seconds,
              "peak_rss_mib": train_rss, "summary": result_obj.summary, "ids_sha256": ids_digest(triples),
              "prompt_tokens": sum(len(t[0]) for t in triples)}

    model, _ = load_for_inference(run_dir, device=preset.device)
    result.update(eval_dpo(model, load_reference(args.workdir, preset), tokenizer,
                           read_jsonl(args.workdir / "eval.jsonl"), preset.device))
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
