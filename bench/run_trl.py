"""One TRL run (SFTTrainer + peft LoRA) in its own process; writes a result JSON.

    python -m bench.run_trl --preset cpu-small --workdir DIR --variant default|packed --out R.json [--no-gc]

Variants:
- default: TRL's defaults for a conversational dataset: padding to the longest example of each batch,
  assistant-only loss (the bench template has {% generation %} markers), gradient checkpointing on;
- packed: TRL's best packing: `packing=True` with the best-fit-decreasing strategy ("bfd"), which turns on
  padding-free batches (one flattened row, position_ids restart per example, no padding).
Only what the comparison must fix is set: LoRA (r, alpha, dropout 0, all-linear), lr (constant, no warm-up),
one epoch of the same data sized to `preset.steps` steps, max_length = seq_len, precision, threads, seed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.presets import PRESETS, Preset


def build_trainer(preset: Preset, workdir: Path, train_rows: list[dict], *, packed: bool,
                  gradient_checkpointing: bool, output_dir: Path):
    """(SFTTrainer, batch per step) for one epoch of `train_rows` in `preset.steps` steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import pack_dataset

    from bench.data import for_trl, render_with_mask

    if preset.threads:
        torch.set_num_threads(preset.threads)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    # TRL's padding-free batches want flash-attn (varlen) on CUDA; sdpa everywhere else, as for tunekit.
    import importlib.util

    flash = preset.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype,
                                                 attn_implementation="flash_attention_2" if flash else "sdpa")

    # Size the batch so that one epoch takes `preset.steps` steps: examples for padded batches, packed rows
    # (counted with TRL's own packer on the same tokenized lengths) for packing.
    if packed:
        ids = [render_with_mask(ex, tokenizer)[0] for ex in train_rows]
        units = len(pack_dataset(Dataset.from_dict({"input_ids": ids}), preset.seq_len, "bfd"))
    else:
        units = len(train_rows)
    batch = math.ceil(units / preset.steps)

    config = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=preset.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=preset.seq_len,
        assistant_only_loss=True,
        packing=packed,
        packing_strategy="bfd",
        gradient_checkpointing=gradient_checkpointing,
        bf16=preset.dtype == "bf16",  # TRL defaults to bf16; on CPU the bench trains in fp32 like tunekit
        use_cpu=preset.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list([for_trl(ex) for ex in train_rows])
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    return trainer, batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--variant", choices=["default", "packed"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-gc", action="store_true", help="turn off TRL's default gradient checkpointing")
    args = parser.parse_args()
    started = time.perf_counter()
    preset = PRESETS[args.preset]

    import torch
    from transformers import TrainerCallback

    from bench import measure
    from bench.data import read_jsonl

    train_rows = read_jsonl(args.workdir / "train.jsonl")
    eval_rows = read_jsonl(args.workdir / "eval.jsonl")
    packed = args.variant == "packed"
    trainer, batch = build_trainer(preset, args.workdir, train_rows, packed=packed, gradient_checkpointing=not args.no_gc,
                                   output_dir=args.out.parent / f"trl-{args.variant}-out")
    tokenizer = trainer.processing_class

    # Count what each micro-batch trains and processes as it enters the model (a forward pre-hook, public
    # torch API); the callback closes the step.
    log = measure.StepLog()
    pending = {"trained": 0, "processed": 0}

    def count(_module, _args, kwargs):
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled():
            return
        pending["trained"] += int((labels[:, 1:] != -100).sum())
        mask = kwargs.get("attention_mask")
        pending["processed"] += int(mask.sum()) if mask is not None else int(labels.numel())

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if preset.device == "cuda":
                torch.cuda.synchronize()
            log.add(time.perf_counter(), pending["trained"], pending["processed"])
            pending["trained"] = pending["processed"] = 0

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.losses.append(float(logs["loss"]))

    hook = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(StepClock())
    if preset.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    hook.remove()
    train_rss = measure.peak_rss_mib()  # ru_maxrss only grows: this is the peak up to the end of training

    speed = measure.throughput(log, preset.warmup_steps)
    result = {
        "runner": f"trl-{args.variant}" + ("-nogc" if args.no_gc else ""),
        "preset": preset.name, "batch": batch, "batch_unit": "packed rows" if packed else "examples",
        "gradient_checkpointing": not args.no_gc, **speed,
        "step_losses": log.losses, "train_seconds": train_seconds, "peak_rss_mib": train_rss,
    }
    if preset.device == "cuda":
        mean_len = speed["processed_tokens"] / max(1, len(train_rows))
        result.update(measure.cuda_stats(preset, "lora", speed["processed_tokens_per_s"], mean_len))
    device = next(trainer.model.parameters()).device
    result.update(measure.eval_loss(trainer.model, tokenizer, eval_rows, device))
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
