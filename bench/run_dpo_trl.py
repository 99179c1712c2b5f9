"""One TRL DPO run (DPOTrainer + peft LoRA) in its own process; writes a result JSON.

    python -m bench.run_dpo_trl --preset cpu-small --workdir DIR --out R.json [--gc]

The same pairs in TRL's conversational form (prompt / chosen / rejected; TRL applies the chat template itself),
sigmoid loss, beta 0.1, the reference being the model with the adapter switched off (TRL's way for a new peft
adapter), and what the comparison fixes: LoRA r/alpha/dropout 0/all-linear, lr constant without warm-up, one
epoch sized to `preset.steps` steps, max_length = seq_len per side, precision (fp32 on CPU: TRL's bf16 default is
turned off there), threads, seed, gradient checkpointing off (TRL's default is on: --gc keeps it). Everything
else is TRL's default (each batch's sides padded to the longest, TRL's fused LM head).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from bench.dpo import BETA
from bench.presets import PRESETS, Preset


def build_trainer(preset: Preset, workdir: Path, *, gradient_checkpointing: bool, output_dir: Path):
    """(DPOTrainer, pairs per step) for one epoch of the pairs in `preset.steps` steps."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from bench.data import read_jsonl

    if preset.threads:
        torch.set_num_threads(preset.threads)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype, attn_implementation="sdpa")
    rows = read_jsonl(workdir / "pairs-trl.jsonl")
    batch = math.ceil(len(rows) / preset.steps)
    config = DPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        learning_rate=preset.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_length=preset.seq_len,
        beta=BETA,
        loss_type=["sigmoid"],
        gradient_checkpointing=gradient_checkpointing,
        bf16=preset.dtype == "bf16",
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
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    return trainer, batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gc", action="store_true", help="keep TRL's default gradient checkpointing")
    args = parser.parse_args()
    started = time.perf_counter()
    preset = PRESETS[args.preset]

    import torch
    from transformers import TrainerCallback

    from bench import measure
    from bench.data import read_jsonl
    from bench.dpo import eval_dpo, ids_digest, load_reference, pair_throughput

    trainer, batch = build_trainer(preset, args.workdir, gradient_checkpointing=args.gc,
                                   output_dir=args.out.parent / "trl-dpo-out")
    tokenizer = trainer.processing_class
    ds = trainer.train_dataset
    triples = list(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True))

    # What each training forward holds, counted as it enters the model (a forward pre-hook, public torch API):
    # the batch is [chosen..., rejected...], so pairs are half its rows; the reference forward runs under
    # no_grad and is not counted. The callback closes the step.
    ends: list[float] = []
    pairs: list[int] = []
    trained: list[int] = []
    losses: list[float] = []
    pending = {"pairs": 0, "trained": 0}

    def count(_module, _args, kwargs):
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled():
            return
        pending["pairs"] += labels.shape[0] // 2
        pending["trained"] += int((labels != -100).sum())

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if preset.device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            pairs.append(pending["pairs"])
            trained.append(pending["trained"])
            pending["pairs"] = pending["trained"] = 0

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    hook = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(StepClock())
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    hook.remove()
    train_rss = measure.peak_rss_mib()

    result = {"runner": "trl" + ("-gc" if args.gc else ""), "preset": preset.name, "batch": batch,
              "batch_unit": "pairs (2 padded rows each)", "gradient_checkpointing": args.gc,
              **pair_throughput(ends, pairs, trained, preset.warmup_steps), "step_losses": losses,
              "train_seconds": train_seconds, "peak_rss_mib": train_rss, "ids_sha256": ids_digest(triples),
              "prompt_tokens": sum(len(t[0]) for t in triples)}
    model = trainer.model
    result.update(eval_dpo(model, load_reference(args.workdir, preset), tokenizer,
                           read_jsonl(args.workdir / "eval.jsonl"), preset.device))
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
