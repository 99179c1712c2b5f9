"""One part of the GPU benchmark in its own process (bench/gpu/run.py starts each); writes its result JSON.

    python -m bench.gpu.parts PART --plan PLAN.json --workdir DIR --deadline EPOCH_S --out RESULT.json

build  the bench tokenizer and chat data (bench/data.py) and random-init Llama models of the plan's shapes,
       built on the plan's device and saved (no download); on CUDA also the bf16 matmul rate measured there;
lora   tunekit, LoRA on the big shape; qlora: the same on a 4-bit base; full: full fine-tuning of the small
       shape. Each takes the `--dry-run` estimate first (`train(cfg, dry_run=True)`, before any weight loads),
       then trains `plan.steps` steps and reports per-step times, tokens and the memory peaks;
trl    TRL's SFTTrainer with the settings of `lora`: packed rows (best-fit decreasing), one row per forward,
       `plan.batch_rows` accumulated per step, no gradient checkpointing, bf16, the same LoRA and lr;
serve  the serve engine (tunekit.generate) on the small shape: one closed-loop client against `plan.clients`,
       and plain `model.generate` one request at a time, on the same prompts.

Each part stops by itself at `--deadline` (a training run through tunekit's STOP file or a TRL callback, the
serving part between its phases) and reports what it measured until then; run.py kills it later than that.
Raw numbers only: run.py derives ratios, MFU and the estimate-vs-peak table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
import traceback
from pathlib import Path

from bench.gpu.plan import Plan
from bench.presets import Preset

MB = 2**20


def model_dir(workdir: Path, preset: Preset) -> Path:
    return workdir / preset.name / "model"


def train_file(workdir: Path, preset: Preset) -> Path:
    return workdir / preset.name / "train.jsonl"


# --------------------------------------------------------------------------------------------------
# build


def build(plan: Plan, workdir: Path, deadline: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.data import build_tokenizer, make_dataset, render_with_mask, write_jsonl

    out = {"machine": machine()}
    tokenizers = {}  # one per vocabulary size (training one takes seconds)
    for preset in (plan.big, plan.small):
        started = time.perf_counter()
        (workdir / preset.name).mkdir(parents=True, exist_ok=True)
        tokenizer = tokenizers.get(preset.tokenizer_vocab) or build_tokenizer(preset.tokenizer_vocab)
        tokenizers[preset.tokenizer_vocab] = tokenizer
        examples = make_dataset(preset, tokenizer, preset.n_train, seed=0)
        write_jsonl(examples, train_file(workdir, preset))
        lengths = [len(render_with_mask(ex, tokenizer)[0]) for ex in examples]
        config = LlamaConfig(
            vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
            num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
            max_position_embeddings=max(preset.seq_len, 2048), tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
        with torch.device(preset.device):  # random init where it will run: seconds on a GPU for 8B
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir(workdir, preset))
        tokenizer.save_pretrained(model_dir(workdir, preset))
        del model
        if preset.device == "cuda":
            torch.cuda.empty_cache()
        out[preset.name] = {"params": params, "examples": len(examples), "tokens": sum(lengths),
                            "mean_example_tokens": sum(lengths) / len(lengths), "max_example_tokens": max(lengths),
                            "saved_gib": sum(f.stat().st_size for f in model_dir(workdir, preset).iterdir()) / 2**30,
                            "seconds": time.perf_counter() - started}
    if plan.big.device == "cuda":
        from bench.measure import measured_matmul_tflops

        out["matmul_peak_tflops"] = measured_matmul_tflops(torch.bfloat16)
    return out


def machine() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "pydantic"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


# --------------------------------------------------------------------------------------------------
# GPU memory


def reset_memory(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory(device: str) -> dict:
    """Peaks since `reset_memory`, and what the device holds outside torch's allocator (the CUDA context with
    the libraries' handles and loaded kernels: what the estimate's CUDA_CONTEXT assumes)."""
    import torch

    from tunekit.train.estimate import peak_rss

    host = {"peak_rss_mib": peak_rss() / MB}  # the process's host memory (on a GPU too)
    if device != "cuda":
        return host
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated_mib": torch.cuda.max_memory_allocated() / MB,
            "max_reserved_mib": torch.cuda.max_memory_reserved() / MB,
            "outside_allocator_mib": (total - free - torch.cuda.memory_reserved()) / MB,
            "device_total_mib": total / MB, **host}


# --------------------------------------------------------------------------------------------------
# tunekit: lora, qlora, full


def run_config(plan: Plan, preset: Preset, method: str, workdir: Path):
    """The tunekit run every comparison fixes: packed rows of seq_len, one row per forward, batch_rows rows
    per step, `steps` steps, constant lr, LoRA r/alpha of the preset (dropout 0, all-linear), no gradient
    checkpointing, the preset's dtype (bf16 on GPU) and device; attention auto (sdpa, or flash-attn when
    installed)."""
    from tunekit.config import config_from_dict

    return config_from_dict({
        "model": {"base": str(model_dir(workdir, preset)), "dtype": preset.dtype, "attn_implementation": "auto"},
        "data": {"train": str(train_file(workdir, preset)), "max_len": preset.seq_len, "cache": False,
                 "num_workers": 1},
        "method": method,
        "lora": {"r": preset.lora_r, "alpha": preset.lora_alpha, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"epochs": 3, "max_steps": plan.steps, "lr": preset.lr, "batch_size": plan.batch_rows,
                  "micro_batch_size": 1, "scheduler": "constant", "warmup_ratio": 0.0, "seed": 42, "log_every": 1,
                  "threads": preset.threads, "device": preset.device, "gradient_checkpointing": False},
        "output": {"dir": str(workdir / f"run-{method}"), "overwrite": True},
    }, source=f"bench/gpu {method}")


def tunekit_run(plan: Plan, role: str, method: str, workdir: Path, deadline: float) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from tunekit.train.estimate import estimate_memory, model_shapes
    from tunekit.train.loop import STOP_FILE, TrainingStopped, train

    preset = plan.preset(role)
    cfg = run_config(plan, preset, method, workdir)
    out: dict = {"shape": preset.name, "method": method, "dtype": preset.dtype, "seq_len": preset.seq_len,
                 "batch_rows": plan.batch_rows, "micro_batch_rows": 1, "gradient_checkpointing": False}
    began = time.perf_counter()
    dry = train(cfg, dry_run=True).summary  # `tunekit train --dry-run`: no weights loaded, nothing written
    out["estimate_mib"] = dry["memory_estimate_mb"]
    out["dry_run_s"] = time.perf_counter() - began
    if preset.device != "cuda":  # the GPU formula for the same run (a GPU's dry run prints it itself)
        out["estimate_gpu_formula_mib"] = estimate_memory(
            cfg, model_shapes(cfg), micro_batch=1, processes=1, strategy="none",
            device=torch.device("cuda")).to_dict()

    run_dir = Path(cfg.output.dir)
    ends: list[float] = []

    def step_done(_optimizer, _args, _kwargs):
        if preset.device == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    def ask_to_stop():  # the loop checks for this file after every step, checkpoints and stops
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).touch()

    timer = threading.Timer(max(0.0, deadline - time.time()), ask_to_stop)
    hook = register_optimizer_step_post_hook(step_done)
    reset_memory(preset.device)
    timer.start()
    started = time.perf_counter()
    try:
        train(cfg)
        out["stopped_at_deadline"] = False
    except TrainingStopped:
        out["stopped_at_deadline"] = True
    finally:
        timer.cancel()
        hook.remove()
    out["train_s"] = time.perf_counter() - started  # loading, steps and the final save
    out["memory"] = memory(preset.device)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out.update(step_table(ends, [r["trained_tokens"] for r in rows],
                          [r["input_tokens_per_s"] / r["tokens_per_s"] if r["tokens_per_s"] else 0 for r in rows],
                          [r["train_loss"] for r in rows], plan.warmup))
    return out


def step_table(ends: list[float], cumulative_trained: list[int], processed_per_trained: list[float],
               losses: list[float], warmup: int) -> dict:
    """Per-step trained and processed tokens from tunekit's metrics rows, and bench.measure's throughput."""
    from bench import measure

    if len(ends) != len(cumulative_trained):
        raise RuntimeError(f"{len(cumulative_trained)} metrics rows but {len(ends)} optimizer steps")
    log, previous = measure.StepLog(), 0
    for end, total, ratio, loss in zip(ends, cumulative_trained, processed_per_trained, losses, strict=True):
        log.add(end, total - previous, round((total - previous) * ratio))
        log.losses.append(loss)
        previous = total
    return {**throughput(log, warmup), "step_losses": log.losses}


def throughput(log, warmup: int) -> dict:
    from bench import measure

    out = {"steps": len(log.ends), "step_s": [b - a for a, b in zip(log.ends, log.ends[1:], strict=False)]}
    try:
        out.update(measure.throughput(log, warmup))
    except ValueError as exc:  # too few steps before the deadline
        out["throughput_error"] = str(exc)
    return out


# --------------------------------------------------------------------------------------------------
# TRL


def trl_run(plan: Plan, workdir: Path, deadline: float) -> dict:
    """TRL's SFTTrainer with peft LoRA, set as `run_config` sets tunekit (bench/run_trl.py's `packed` variant,
    with one row per forward and `batch_rows` accumulated, as tunekit's micro-batch of one row)."""
    import importlib.util

    if absent := [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]:
        return {"status": "missing", "error": f"{' and '.join(absent)} not installed (the bench extra; on the GPU "
                                              "machine, carried in .whl/)"}
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from bench import measure
    from bench.data import for_trl, read_jsonl

    preset = plan.big
    if preset.threads:
        torch.set_num_threads(preset.threads)
    cuda = preset.device == "cuda"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    out: dict = {"shape": preset.name, "method": "lora", "dtype": preset.dtype, "seq_len": preset.seq_len,
                 "batch_rows": plan.batch_rows, "micro_batch_rows": 1, "gradient_checkpointing": False,
                 "attn_implementation": "flash_attention_2" if flash else "sdpa"}
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(workdir, preset))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir(workdir, preset), dtype=torch.bfloat16 if preset.dtype == "bf16" else torch.float32,
        attn_implementation=out["attn_implementation"], device_map={"": preset.device})
    config = SFTConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=1,
        gradient_accumulation_steps=plan.batch_rows, max_steps=plan.steps, learning_rate=preset.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_length=preset.seq_len, assistant_only_loss=True,
        packing=True, packing_strategy="bfd", gradient_checkpointing=False, bf16=preset.dtype == "bf16",
        use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=42,
        dataloader_num_workers=0)
    peft_config = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list([for_trl(ex) for ex in read_jsonl(train_file(workdir, preset))])
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)

    log = measure.StepLog()
    pending = {"trained": 0, "processed": 0}

    def count(_module, _args, kwargs):  # what each micro-batch trains and runs on, as it enters the model
        labels = kwargs.get("labels")
        if labels is None or not torch.is_grad_enabled():
            return
        pending["trained"] += int((labels[:, 1:] != -100).sum())
        mask = kwargs.get("attention_mask")
        pending["processed"] += int(mask.sum()) if mask is not None else int(labels.numel())

    class StepClock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            log.add(time.perf_counter(), pending["trained"], pending["processed"])
            pending["trained"] = pending["processed"] = 0
            if time.time() > deadline:
                out["stopped_at_deadline"] = True
                control.should_training_stop = True

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                log.losses.append(float(logs["loss"]))

    hook = trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.add_callback(StepClock())
    out["setup_s"] = time.perf_counter() - started
    reset_memory(preset.device)
    started = time.perf_counter()
    trainer.train()
    out["train_s"] = time.perf_counter() - started
    hook.remove()
    out["memory"] = memory(preset.device)
    out.update(throughput(log, plan.warmup))
    out["step_losses"] = log.losses
    out.setdefault("stopped_at_deadline", False)
    return out


# --------------------------------------------------------------------------------------------------
# serving


def serve_run(plan: Plan, workdir: Path, deadline: float) -> dict:
    import torch

    from bench.serve import percentile, prompts
    from tunekit.data.render import render_prompt
    from tunekit.generate.models import load_models, parse_model_arg

    preset = plan.small
    if preset.threads:
        torch.set_num_threads(preset.threads)
    reset_memory(preset.device)
    served = load_models([parse_model_arg(f"bench={model_dir(workdir, preset)}")], preset.device)["bench"]
    rendered = [render_prompt(m, served.tokenizer) for m in prompts(max(plan.requests_one, plan.requests_many))]
    out: dict = {"shape": preset.name, "max_tokens": plan.max_tokens, "clients": plan.clients,
                 "prompt_tokens_mean": statistics.mean(len(p) for p in rendered), "kv_cache": served.weights.path}

    model = served.weights.model
    device = next(model.parameters()).device

    def generate_one(prompt: list[int]) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=plan.max_tokens,
                                 do_sample=False, eos_token_id=served.stop_ids, pad_token_id=served.pad_id)
        return new[0, ids.shape[1]:].tolist()

    def summary(latencies: list[float], tokens: int, wall: float) -> dict:
        return {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}

    generate_one(rendered[0])  # warm-up: kernels load, the allocator fills
    asyncio.run(engine_level(served, rendered[:4], 4, plan.max_tokens))
    phases = [("engine_1", lambda: asyncio.run(engine_level(served, rendered[:plan.requests_one], 1, plan.max_tokens))),
              ("engine_many", lambda: asyncio.run(engine_level(served, rendered[:plan.requests_many], plan.clients,
                                                               plan.max_tokens))),
              ("generate", lambda: sequential(generate_one, rendered[:plan.requests_one]))]
    outputs = {}
    for name, run in phases:
        if time.time() > deadline:
            out[name] = {"skipped": "deadline"}
            continue
        latencies, produced, wall = run()
        outputs[name] = produced
        out[name] = summary(latencies, sum(len(o) for o in produced), wall)
    if "engine_1" in outputs and "engine_many" in outputs:  # greedy: batching should not change the tokens
        same = sum(a == b for a, b in zip(outputs["engine_1"], outputs["engine_many"], strict=False))
        out["engine_many"]["equal_to_one_client"] = same
    if "engine_1" in outputs and "generate" in outputs:
        out["generate"]["equal_to_engine"] = sum(a == b for a, b in zip(outputs["generate"], outputs["engine_1"],
                                                                        strict=False))
    out["memory"] = memory(preset.device)
    return out


def sequential(generate_one, prompts: list[list[int]]) -> tuple[list[float], list[list[int]], float]:
    latencies, produced = [], []
    began = time.perf_counter()
    for prompt in prompts:
        start = time.perf_counter()
        produced.append(generate_one(prompt))
        latencies.append(time.perf_counter() - start)
    return latencies, produced, time.perf_counter() - began


async def engine_level(served, prompts: list[list[int]], clients: int, max_tokens: int):
    """`clients` closed-loop clients (asyncio tasks), each sending its share of `prompts` one after another to
    one Engine (the server's batch loop, no HTTP). (latencies, tokens of each prompt in order, wall seconds)."""
    from bench.serve import job_tokens
    from tunekit.generate.engine import Engine, Job, Sampling

    engine = Engine(window_s=0.002, max_batch=64, prefix_cache_bytes=0)
    engine.start()
    latencies: list[float] = []
    outputs: dict[int, list[int]] = {}

    async def client(k: int) -> None:
        for i in range(k, len(prompts), clients):
            job = Job(served, prompts[i], Sampling(max_tokens=max_tokens), 1, asyncio.get_running_loop())
            start = time.perf_counter()
            engine.submit(job)
            outputs[i] = await job_tokens(job)
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(client(k) for k in range(clients)))
    finally:
        engine.stop()
    return latencies, [outputs[i] for i in range(len(prompts))], time.perf_counter() - began


# --------------------------------------------------------------------------------------------------


def run_part(part: str, plan: Plan, workdir: Path, deadline: float) -> dict:
    if part == "build":
        return build(plan, workdir, deadline)
    if part == "lora":
        return tunekit_run(plan, "big", "lora", workdir, deadline)
    if part == "qlora":
        return tunekit_run(plan, "big", "qlora", workdir, deadline)
    if part == "full":
        return tunekit_run(plan, "small", "full", workdir, deadline)
    if part == "trl":
        return trl_run(plan, workdir, deadline)
    if part == "serve":
        return serve_run(plan, workdir, deadline)
    raise ValueError(f"unknown part {part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part")
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds: stop and report by then")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    plan = Plan.from_dict(json.loads(args.plan.read_text()))
    try:
        result = {"status": "ok", **run_part(args.part, plan, args.workdir, args.deadline)}
    except Exception as exc:  # reported in the results: the next part still runs
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["imported"] = imported_packages()
    args.out.write_text(json.dumps(result, indent=1, default=str))


def imported_packages() -> list[str]:
    """Top-level packages this process imported, the standard library and this checkout's left out."""
    import sys

    tops = {name.split(".")[0] for name in list(sys.modules) if not name.startswith("_")}
    return sorted(tops - set(sys.stdlib_module_names) - {"bench", "tunekit"})


if __name__ == "__main__":
    main()
