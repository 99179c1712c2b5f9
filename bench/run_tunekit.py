"""One tunekit run in its own process, through the public Python API; writes a result JSON.

    python -m bench.run_tunekit --preset cpu-small --workdir DIR --out R.json

Builds a RunConfig (the data as the JSONL file, model.base = the saved random-init model dir) with the
settings the comparison fixes: LoRA r/alpha/dropout 0/all-linear, lr (constant, no warm-up), one epoch of the
same data sized to `preset.steps` steps, max_len = seq_len, precision, threads, seed. Everything else is
tunekit's default (packing on, selective LM head, micro-batch of one row, no gradient checkpointing).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench.presets import PRESETS, Preset


def tunekit_config(preset: Preset, workdir: Path, tokenizer, train_rows: list[dict]):
    """(RunConfig, rows per step) for one epoch of `train_rows` in `preset.steps` steps."""
    from bench.data import render_with_mask
    from tunekit.config import config_from_dict
    from tunekit.data.pack import best_fit_decreasing

    # Packed rows of one epoch (tunekit packs best-fit-decreasing), to size the batch to `preset.steps` steps.
    lengths = [len(render_with_mask(ex, tokenizer)[0]) for ex in train_rows]
    rows = len(best_fit_decreasing(lengths, preset.seq_len))
    batch = math.ceil(rows / preset.steps)
    cfg = config_from_dict({
        # "auto": sdpa on CPU; on CUDA flash-attn's varlen path when it is installed (tunekit's default).
        "model": {"base": str(workdir / "model"), "dtype": preset.dtype, "attn_implementation": "auto"},
        "data": {"train": str(workdir / "train.jsonl"), "max_len": preset.seq_len},
        "method": "lora",
        "lora": {"r": preset.lora_r, "alpha": preset.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 1, "lr": preset.lr, "batch_size": batch, "scheduler": "constant", "warmup_ratio": 0.0,
                  "seed": 42, "log_every": 1, "threads": preset.threads, "device": preset.device},
        "output": {"dir": str(workdir / "tunekit-run"), "overwrite": True},
    }, source="bench")
    return cfg, batch


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
    from tunekit.model import load_for_inference
    from tunekit.train.loop import train

    train_rows = read_jsonl(args.workdir / "train.jsonl")
    eval_rows = read_jsonl(args.workdir / "eval.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "model")
    cfg, batch = tunekit_config(preset, args.workdir, tokenizer, train_rows)
    run_dir = Path(cfg.output.dir)

    # The end of each optimizer step, seen through torch's global optimizer hook (public API): the clock the
    # TRL runner reads from its step-end callback.
    ends: list[float] = []

    def step_done(_optimizer, _args, _kwargs):
        if preset.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(step_done)
    if preset.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_start = time.perf_counter()
    result_obj = train(cfg)
    train_seconds = time.perf_counter() - train_start
    handle.remove()
    train_rss = measure.peak_rss_mib()  # ru_maxrss only grows: this is the peak up to the end of training

    # Per-step trained tokens from metrics.jsonl (cumulative, one row per step with log_every=1); processed
    # tokens per step from the ratio of the two rates the loop logs over the same window.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(metrics) != len(ends):
        raise RuntimeError(f"{len(metrics)} metrics rows but {len(ends)} optimizer steps")
    log = measure.StepLog()
    previous = 0
    for end, row in zip(ends, metrics, strict=True):
        trained = row["trained_tokens"] - previous
        previous = row["trained_tokens"]
        processed = round(trained * row["input_tokens_per_s"] / row["tokens_per_s"]) if row["tokens_per_s"] else 0
        log.add(end, trained, processed)
        log.losses.append(row["train_loss"])

    speed = measure.throughput(log, preset.warmup_steps)
    result = {
        "runner": "tunekit", "preset": preset.name, "batch": batch, "batch_unit": "packed rows",
        "gradient_checkpointing": cfg.train.gradient_checkpointing, **speed, "step_losses": log.losses,
        "train_seconds": train_seconds, "peak_rss_mib": train_rss, "summary": result_obj.summary,
    }
    if preset.device == "cuda":
        mean_len = speed["processed_tokens"] / max(1, len(train_rows))
        result.update(measure.cuda_stats(preset, "lora", speed["processed_tokens_per_s"], mean_len))
    model, _ = load_for_inference(run_dir, device=preset.device)
    result.update(measure.eval_loss(model, tokenizer, eval_rows, next(model.parameters()).device))
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
