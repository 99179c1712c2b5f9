"""One TRL GRPO run (GRPOTrainer + peft LoRA) in its own process; writes a result JSON.

    python -m bench.run_grpo_trl --preset cpu-small --workdir DIR --out R.json [--gc]

The same prompts in TRL's conversational form (TRL applies the chat template itself), in tunekit's epoch order
(TRL's sampler without shuffling), and what the comparison fixes (bench/grpo.py): the reward (a reward function
that grades each completion with tunekit.eval.graders.grade, the text decoded as tunekit decodes it),
num_generations = the group size, max_completion_length, temperature, beta (the reference: the adapter switched
off, TRL's way for a new peft adapter; the k3 KL term without TRL's default importance-ratio factor,
use_bias_correction_kl False, as tunekit's loss), epsilon, loss_type "dapo", scale_rewards "group", one generation per
optimizer step (per_device_train_batch_size = every completion of the step, gradient_accumulation_steps 1),
LoRA r/alpha/dropout 0/all-linear, lr constant without warm-up, one epoch, precision (fp32 on CPU: TRL's bf16
default is turned off there), threads, seed, gradient checkpointing off (TRL's default is on: --gc keeps it).
Everything else is TRL's default (transformers' generate, no vLLM; the prompts left-padded, each repeated
num_generations times; its fused LM head).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.grpo import GRADER, SEED, GrpoBench, settings
from bench.presets import PRESETS, Preset


def make_reward(tokenizer, stop_ids: list[int]):
    """TRL's reward function: tunekit's grader on each completion, as tunekit grades a rollout (the completion's
    ids without the stop ids, decoded keeping special tokens, stripped; the line as the grader's item). Records
    each call's items (the prompts TRL sampled, in order) in `reward.calls`."""
    from tunekit.eval.graders import grade
    from tunekit.eval.grading import sample_of

    stop = set(stop_ids)

    def similar(completions, completion_ids, item, **kwargs) -> list[float]:
        items = [json.loads(x) for x in item]
        similar.calls.append([x["id"] for x in items])
        out = []
        for ids, line in zip(completion_ids, items, strict=True):
            text = tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=False).strip()
            out.append(float(grade(GRADER, sample_of(text), line, judge=None).reward))
        return out

    similar.calls = []
    return similar


def build_trainer(preset: Preset, bench: GrpoBench, workdir: Path, *, gradient_checkpointing: bool,
                  output_dir: Path):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from bench.data import read_jsonl
    from tunekit.data.render import end_of_turn_ids

    if preset.threads:
        torch.set_num_threads(preset.threads)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype, attn_implementation="sdpa")
    rows = read_jsonl(workdir / "prompts-trl.jsonl")
    config = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=bench.completions_per_step,  # completions, not prompts
        gradient_accumulation_steps=1,
        num_generations=bench.group_size,
        max_completion_length=bench.max_new_tokens,
        temperature=bench.temperature,
        top_p=1.0,
        beta=bench.beta,
        epsilon=bench.epsilon,
        loss_type="dapo",
        use_bias_correction_kl=False,  # tunekit's k3 KL term (TRL 1.16's default multiplies it by the ratio)
        scale_rewards="group",
        shuffle_dataset=False,  # the file is in tunekit's epoch order
        num_train_epochs=1,
        max_steps=bench.steps,
        learning_rate=preset.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        gradient_checkpointing=gradient_checkpointing,
        bf16=preset.dtype == "bf16",
        use_cpu=preset.device == "cpu",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    reward = make_reward(tokenizer, list(end_of_turn_ids(tokenizer)))
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config)
    return trainer, reward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gc", action="store_true", help="keep TRL's default gradient checkpointing")
    args = parser.parse_args()
    started = time.perf_counter()
    preset = PRESETS[args.preset]
    bench = settings(preset)

    import torch
    from transformers import TrainerCallback

    from bench import measure
    from bench.data import read_jsonl
    from bench.grpo import RolloutClock, ids_digest, prompt_ids, rollout_throughput
    from tunekit.data.render import end_of_turn_ids

    trainer, reward = build_trainer(preset, bench, args.workdir, gradient_checkpointing=args.gc,
                                    output_dir=args.out.parent / "trl-grpo-out")
    tokenizer = trainer.processing_class
    rows = read_jsonl(args.workdir / "prompts-trl.jsonl")
    if set(trainer.eos_token_ids) != set(end_of_turn_ids(tokenizer)):
        raise RuntimeError(f"TRL stops at {trainer.eos_token_ids}, tunekit at {end_of_turn_ids(tokenizer)}")

    # The clock's hooks on the causal LM under the peft wrapper (bench/grpo.py); the callback closes each step
    # and reads TRL's per-step logs.
    clock = RolloutClock(torch.cuda.synchronize if preset.device == "cuda" else None)
    generated: list[int] = []
    rewards: list[float] = []
    losses: list[float] = []
    kls: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                rewards.append(float(logs["reward"]))
                generated.append(round(logs["completions/mean_length"] * bench.completions_per_step))
                if "kl" in logs:
                    kls.append(float(logs["kl"]))

    hooks = clock.attach(trainer.model.get_base_model())
    trainer.add_callback(StepClock())
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    for hook in hooks:
        hook.remove()
    train_rss = measure.peak_rss_mib()
    if clock.rows != [bench.completions_per_step] * bench.steps:
        raise RuntimeError(f"completions trained per step {clock.rows}, expected {bench.completions_per_step} in "
                           f"each of {bench.steps} steps")

    by_id = {json.loads(r["item"])["id"]: r for r in rows}
    step_order = [sorted(set(call), key=call.index) for call in reward.calls]  # each prompt once per group
    result = {"runner": "trl" + ("-gc" if args.gc else ""), "preset": preset.name, "grpo": bench.to_dict(),
              "gradient_checkpointing": args.gc, "micro_batch_size": trainer.args.per_device_train_batch_size,
              **rollout_throughput(clock, clock.rows, generated, bench.warmup_steps),
              "step_rewards": rewards, "step_losses": losses, "step_kl": kls, "train_seconds": train_seconds,
              "peak_rss_mib": train_rss, "step_order": step_order,
              "ids_sha256": ids_digest([prompt_ids({"messages": by_id[i]["prompt"]}, tokenizer)
                                        for step in step_order for i in step])}
    result["process_seconds"] = time.perf_counter() - started
    measure.write_result(args.out, result)


if __name__ == "__main__":
    main()
