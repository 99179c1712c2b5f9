"""The training loop: setup -> epochs of steps -> checkpoints -> final weights, top to bottom.

`train(cfg, resume=False)` is what `tunekit train` runs. The loss is the mean next-token NLL over the
trained tokens of a whole optimizer step: the trained tokens of all its micro-batches are counted first,
and each micro-batch's summed NLL is divided by that count, so accumulating 4 micro-batches of 2 rows
equals one batch of 8 rows. The LM head is applied only at positions whose next token is trained.
With objective: dpo the same loop trains on preference pairs (`dpo.py`): a row holds whole pairs, and the
loss is the mean over the step's pairs, counted first in the same way. With objective: grpo a step samples
completions of its prompts with the generation engine, grades them, and trains on them (`grpo.py`).

A run dir holds config.yaml, metrics.jsonl, summary.json, final/ and checkpoints/step-NNNNNN/. A
checkpoint holds everything needed to continue exactly where it was written: weights, optimizer and
scheduler state, RNG states, the position in the data (whose order is a pure function of seed and
epoch), and the metrics so far.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.markup import escape

from tunekit.config import RunConfig, load_config
from tunekit.data.dataset import DataSplits, PairSplits, epoch_rows, load_pair_splits, load_splits, valid_rows
from tunekit.data.pack import Batch, collate_packed, collate_padded, packing_efficiency
from tunekit.errors import ConfigError, Problem, TunekitError, install_command
from tunekit.families import check as check_architecture
from tunekit.fsio import publish_dir
from tunekit.model import (
    apply_method,
    body_and_head,
    config_source,
    device_problems,
    is_run_dir,
    load_base,
    model_architecture,
    read_run_dir,
    resolve_device,
    run_tokenizer,
)
from tunekit.train import distributed, dpo, grpo, trackers
from tunekit.train.checkpoint import (
    copy_weights,
    list_checkpoints,
    load_training_state,
    load_weights,
    restore_rng,
    save_checkpoint,
)
from tunekit.train.distributed import SINGLE, Dist
from tunekit.train.estimate import MB, check_memory, peak_rss
from tunekit.train.hyper import Plan, lr_factor, make_plan
from tunekit.train.sft import TrainedNLL

# A file of this name in the run dir asks the loop to stop after the current step: it writes a checkpoint,
# removes the file and raises TrainingStopped (`tunekit serve` pauses a fine-tuning job this way).
STOP_FILE = "STOP"
STOPPED_EXIT_CODE = 3  # `tunekit train` exits with it when the run stopped on request (every process does)
# Steps timed before the time left is estimated and printed.
TIMED_STEPS = 3
# Config fields a resumed run may change: they do not alter the math of training.
RESUME_MAY_CHANGE = {"output.overwrite", "output.tensorboard", "output.wandb", "output.mlflow", "train.threads",
                     "train.log_every", "train.save_every", "train.keep_last", "train.eval_every", "train.device",
                     "train.distributed.timeout_s"}


class TrainingStopped(TunekitError):
    """The run stopped at a checkpoint because STOP_FILE appeared; `--resume` continues it exactly.

    `tunekit train` exits with STOPPED_EXIT_CODE then, on every process."""


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict


# --------------------------------------------------------------------------------------------------
# Up-front checks (before any weight loads)


def check_setup(cfg: RunConfig, *, resume: bool, world_size: int = 1, run_dir: bool = True) -> list[Problem]:
    """Everything that can be checked without loading weights, reported together."""
    problems = distributed.check(cfg, world_size)
    problems += device_problems(cfg)  # CUDA-only settings on a machine without CUDA (or without bf16)
    if cfg.method == "full" and cfg.model.dtype == "fp16":
        problems.append(Problem("model.dtype", "full fine-tuning in fp16 weights is unstable (no loss scaling)",
                                "use bf16 (on GPUs that support it) or fp32"))
    if cfg.method == "qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(Problem("method", "qlora needs the bitsandbytes package",
                                    f"{install_command('qlora')}, or use method: lora"))
    if cfg.train.compile:
        problems.append(Problem("train.compile", "torch.compile is not supported by the training loop yet",
                                "set train.compile: false"))
    try:
        problems += check_architecture(model_architecture(config_source(cfg.model.base)),
                                       attn_implementation=cfg.model.attn_implementation)
    except TunekitError:
        pass  # an earlier run without final/: reported below
    base = Path(cfg.model.base).expanduser()
    if is_run_dir(base):
        try:
            run = read_run_dir(base)
        except TunekitError as exc:
            problems += exc.problems
        else:
            if run.has_adapter and cfg.method == "qlora" and cfg.model.previous_adapter == "merge":
                problems.append(Problem("model.previous_adapter", "cannot fold the earlier adapter into a 4-bit base",
                                        "use model.previous_adapter: continue, or method: lora"))
    problems += trackers.check(cfg) + trackers.reach(cfg, cfg.output.dir)
    problems += _objective_problems(cfg, world_size)
    if cfg.eval.enabled and cfg.eval.data is None and cfg.data.validation is None:
        problems.append(Problem("eval.enabled", "evaluation after training needs a held-out file",
                                "set eval.data or data.validation (a file the run does not train on)"))
    if run_dir:  # (a dry run writes nothing)
        problems += _run_dir_problems(cfg, resume=resume)
    return problems


def _objective_problems(cfg: RunConfig, world_size: int) -> list[Problem]:
    """A data file of the wrong kind for cfg.objective (named by its first record's line), and dpo's checks."""
    from tunekit.data.formats import detect_format, read_jsonl

    if cfg.objective == "grpo":
        return grpo.check(cfg, world_size)
    pairs = cfg.objective == "dpo"
    if cfg.data.format == "reinforcement":
        return [Problem("data.format", f"data.format: reinforcement with objective: {cfg.objective}",
                        "prompts with a grader train with objective: grpo (docs/grpo.md)")]
    problems = dpo.check(cfg, world_size) if pairs else []
    if cfg.data.format != "auto" and (cfg.data.format == "preference") != pairs:
        return problems + [Problem("data.format", f"data.format: {cfg.data.format} with objective: {cfg.objective}",
                                   "objective: dpo trains on data.format: preference (or auto); objective: sft on "
                                   "chat, completion or text")]
    for field, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        if path is None or not Path(path).is_file():
            continue
        try:
            first = next((line for line in read_jsonl(path) if isinstance(line.record, dict)), None)
        except (OSError, TunekitError):
            continue  # unreadable: the data layer names it
        fmt = detect_format(first.record) if first is not None else None
        if fmt is None or (fmt == "preference") == pairs:
            continue
        if pairs:
            problems.append(Problem(f"{path}:{first.number}", f"a {fmt} record ({field}), but objective: dpo trains "
                                    "on preference pairs", "give a preference file (docs/preference.md), or set "
                                    "objective: sft"))
        else:
            problems.append(Problem(f"{path}:{first.number}", f"a preference pair ({field}), but objective: sft "
                                    "trains on chat, completion or text data", "set objective: dpo (the override "
                                    "objective=dpo) to train on preference pairs, or give a chat file"))
    return problems


def _run_dir_problems(cfg: RunConfig, *, resume: bool) -> list[Problem]:
    run_dir = cfg.output.dir
    ckpts = list_checkpoints(run_dir)
    if resume:
        if not ckpts:
            return [Problem("output.dir", f"nothing to resume: {run_dir} has no checkpoints",
                            "run without --resume to start the run")]
        saved = load_config(run_dir / "config.yaml", check_files=False)
        changed = [k for k in _diff(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))
                   if not any(k == free or k.startswith(free + ".") for free in RESUME_MAY_CHANGE)]
        if changed:
            return [Problem("output.dir", f"the config differs from the run's config.yaml in: {', '.join(changed)}",
                            "resume with the same config, or set output.dir to a new run dir")]
        return []
    if cfg.output.overwrite:
        return []
    if ckpts:
        return [Problem("output.dir", f"{run_dir} has checkpoints (last: {ckpts[-1].name})",
                        "continue it with --resume, or set output.overwrite: true to start over")]
    if (run_dir / "config.yaml").exists() or (run_dir / "final").exists():
        return [Problem("output.dir", f"{run_dir} already holds a run",
                        "set output.dir to a new dir, or output.overwrite: true to replace it")]
    return []


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


# --------------------------------------------------------------------------------------------------
# A step: forward + backward of the objective over micro-batches (the objective's loss: sft.py)


def auto_threads(cores: int, load: float, processes: int = 1) -> int:
    """`train.threads: auto`: torch threads per process from the cores that are free.

    `cores`: the cores this process may run on; `load`: the 1-minute load average (runnable processes, this
    one included, ~1 while it reads the data). On a machine other work keeps busy, a thread of an op waits at
    its barrier for a sibling thread the scheduler took away (a ~10 ms quantum per op): 2 threads measured
    14.4 s/step against 1 thread's 2.2 s there (examples/quickstart/README.md), so only free cores count."""
    free = cores - max(0, round(load) - 1)  # what this process does not leave to others
    return max(1, min(cores, free) // max(1, processes))


def threads_of(cfg: RunConfig, d: Dist) -> int | None:
    """torch threads for this process: `train.threads`, or for `auto` from the free cores (None: torch's own
    default, every core)."""
    if cfg.train.threads != "auto":
        return cfg.train.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return auto_threads(cores, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0, d.world_size)


def autocast(device: torch.device | str, mixed_precision: str = "no"):
    """The forward's precision context: bfloat16 autocast for "bf16", else a no-op.

    Checkpointed LM-head chunks recompute under the same autocast state in backward (torch.utils.checkpoint
    restores it), and the logits are cast to fp32 before the softmax either way.
    """
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")


def _units(batch) -> int:
    """What the loss of a step is the mean over: trained tokens (SFT), pairs (DPO), completion tokens or
    completions (GRPO, grpo.loss_norm)."""
    if isinstance(batch, grpo.RolloutBatch):
        return batch.units
    return batch.num_pairs if isinstance(batch, dpo.PairBatch) else batch.num_trained


def backward_step(net, micro_batches: list, device, mixed_precision: str = "no", *,
                  d: Dist = SINGLE, n_micro: int = 0, filler=None) -> tuple[float, int, int | list[float]]:
    """Forward + backward of one optimizer step over this process's micro-batches; returns (summed loss,
    units, stats) of the step, summed over every process. SFT: (summed NLL, trained tokens, trained tokens the
    model predicted right before this step's update); DPO: (summed pair losses, pairs, dpo.STATS sums).

    The units of ALL micro-batches (of every process) are counted first and every micro-batch's summed loss
    is divided by that one count, so the gradients equal those of a single batch holding every row. Under
    several processes every rank runs `n_micro` forward/backward passes (their collectives must pair up); a
    rank with fewer rows runs `filler` at weight 0 for the missing ones.
    """
    n_units = int(distributed.sum_([sum(_units(b) for b in micro_batches)], d)[0])
    first = (micro_batches or [filler])[0]
    pairs = isinstance(first, dpo.PairBatch | grpo.RolloutBatch)  # stats: a list
    step_loss, step_stats, scalar = 0.0, None, not pairs
    for i in range(max(n_micro, len(micro_batches))):
        real = i < len(micro_batches)
        batch = micro_batches[i] if real else filler
        with autocast(device, mixed_precision):
            loss_sum, _, stats = net(batch.to(device))
        # DDP and FSDP2 average gradients over ranks: x N makes it a sum (x 1, exact, in one process).
        (loss_sum * d.world_size / n_units if real else loss_sum * 0.0).backward()
        if real:
            step_loss += float(loss_sum.detach())
            scalar = not isinstance(stats, list)
            stats = [stats] if scalar else stats
            step_stats = stats if step_stats is None else [a + b for a, b in zip(step_stats, stats, strict=True)]
    empty = [0.0] * (len(grpo.STATS) if isinstance(first, grpo.RolloutBatch) else len(dpo.STATS) if pairs
                     else 1)  # a rank that ran only the filler
    step_loss, *step_stats = distributed.sum_([step_loss, *(step_stats or empty)], d)
    return step_loss, n_units, int(step_stats[0]) if scalar else step_stats


@torch.no_grad()
def evaluate_sums(net, batches: list, device, mixed_precision: str = "no") -> tuple[float, int, list[float]]:
    """(summed loss, units, summed stats) of the objective over `batches`, in eval mode.

    Under several processes every rank scores all of `batches` (the forwards of FSDP2 are collective).
    """
    was_training = net.training
    net.eval()
    loss, count, total = 0.0, 0, None
    for batch in batches:
        with autocast(device, mixed_precision):
            loss_sum, n, stats = net(batch.to(device))
        stats = stats if isinstance(stats, list) else [stats]
        loss, count = loss + float(loss_sum), count + n
        total = stats if total is None else [a + b for a, b in zip(total, stats, strict=True)]
    net.train(was_training)
    return loss, count, total or []


def evaluate_loss(net, batches: list[Batch], device, mixed_precision: str = "no") -> tuple[float, float]:
    """(mean NLL per trained token, next-token accuracy at trained positions) over `batches` (SFT)."""
    nll, count, (correct,) = evaluate_sums(net, batches, device, mixed_precision) if batches else (0.0, 0, [0])
    return nll / max(1, count), correct / max(1, count)


def evaluate(cfg: RunConfig, net, batches: list, device) -> dict[str, float]:
    """The validation metrics of the objective over `batches`: valid_loss and valid_token_accuracy (SFT), or
    valid_loss and the valid_reward_* of dpo.step_metrics (DPO)."""
    if cfg.objective == "dpo":
        return dpo.step_metrics(*evaluate_sums(net, batches, device, cfg.train.mixed_precision), prefix="valid_")
    if cfg.objective == "grpo":  # batches: grpo.ValidPrompts; greedy completions, graded
        return grpo.validate(getattr(net, "module", net).model, batches.prompts, cfg.grpo, batches.rewarder,
                             batches.tokenizer, batches.stop_ids, batches.pad_id, batches.d)
    loss, acc = evaluate_loss(net, batches, device, cfg.train.mixed_precision)
    return {"valid_loss": loss, "valid_token_accuracy": acc}


# --------------------------------------------------------------------------------------------------
# Batches


def make_batches(seqs: list, rows: list[list[int]], micro: int, packing: bool,
                 pad_id: int, split: str = "train") -> list:
    """Rows (lists of sequence indices) -> micro-batches of `micro` rows; rows of preference pairs (a list of
    (chosen, rejected) sequences) -> `dpo.PairBatch`es."""
    if seqs and isinstance(seqs[0], tuple):
        return dpo.make_pair_batches(seqs, rows, micro, packing, pad_id, split)
    out = []
    for start in range(0, len(rows), micro):
        group = rows[start:start + micro]
        if packing:
            out.append(collate_packed([[seqs[i] for i in row] for row in group], pad_id))
        else:
            out.append(collate_padded([seqs[row[0]] for row in group], pad_id))
    return out


# --------------------------------------------------------------------------------------------------
# Logging


def _progress(console):
    """A progress bar with loss, trained tokens/s and time left; off when the console is not a TTY."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)


# --------------------------------------------------------------------------------------------------
# The run


def train(cfg: RunConfig, *, resume: bool = False, console=None, dry_run: bool = False,
          processes: int | None = None) -> TrainResult:
    """Train as configured; write the run dir; return its path and summary.

    Started by torchrun (WORLD_SIZE > 1), every process runs this same function; see tunekit.train.distributed.
    dry_run: print the plan and the memory estimate per process (for `processes` of them) and stop before
    any weight loads or anything is written; the summary holds them.
    """
    from rich.console import Console

    if dry_run:  # no process group: the plan of `processes` processes, seen from rank 0
        n = processes or distributed.launched_world_size()
        d = Dist(world_size=n, strategy=distributed.resolve_strategy(cfg) if n > 1 else "none")
    else:
        d = distributed.setup(cfg)
    if console is None or not d.main:  # only the main process prints
        console = Console(stderr=True, quiet=not d.main)
    together = False  # every process ends here in step (done, or stopped on request): they meet first
    try:
        result = _train(cfg, d, resume=resume, console=console, dry_run=dry_run)
        together = True
        return result
    except TrainingStopped:
        together = True
        raise
    finally:
        distributed.teardown(d, together=together)


@dataclass
class TrainData:
    """What the loop reads: the rendered splits, their rows and the plan made from them."""

    tokenizer: object
    pad_id: int
    splits: DataSplits | PairSplits | grpo.PromptSplits
    lengths: object  # tokens per training sequence or pair (an array when read from the data cache)
    rows0: list[list[int]]  # epoch 0's rows (packing and the plan are measured on it)
    plan: Plan
    valid_batches: list
    row_len: int  # tokens a packed row holds: data.max_len, or 2 x data.max_len for pairs (both sides)


def build_data(cfg: RunConfig, d: Dist, say, *, dry_run: bool) -> TrainData:
    """Tokenizer, rendered data (the main process renders into the data cache, the others read it) and the
    plan; printed."""
    tokenizer = run_tokenizer(cfg)
    if getattr(tokenizer, "chat_template", None):
        from tunekit.data.render import template_problems

        if unusable := template_problems(tokenizer):  # said once, not as an error on every line
            raise ConfigError(unusable)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    if cfg.objective == "grpo":  # prompts: a row is one prompt, a step train.batch_size of them
        prompts = grpo.load_prompt_splits(cfg, tokenizer)
        for note in prompts.notes:
            say(f"[yellow]note:[/] {note}", highlight=False)
        plan = make_plan(cfg, prompts.n_train_examples, len(prompts.train))
        say(f"{prompts.n_train_examples} train prompts, {prompts.n_valid_examples} validation prompts; "
            f"{plan.epochs} epochs x {plan.steps_per_epoch} steps, {plan.total_steps} steps; {plan.batch_size} "
            f"prompts x {cfg.grpo.group_size} completions per step, {plan.micro_batch_size} completions per "
            f"forward; lr {plan.lr:g}", highlight=False)
        return TrainData(tokenizer, pad_id, prompts, prompts.train_lengths(), [[i] for i in range(len(prompts.train))],
                         plan, [], cfg.data.max_len)
    pairs = cfg.objective == "dpo"
    with distributed.main_first(SINGLE if dry_run else d):  # a dry run has no process group
        data = load_pair_splits(cfg.data, tokenizer) if pairs else load_splits(cfg.data, tokenizer)
    for note in data.notes:
        say(f"[yellow]note:[/] {note}", highlight=False)
    row_len = cfg.data.max_len * (2 if pairs else 1)  # a pair's two sides each fit max_len
    lengths = data.train_lengths()  # from the cache's arrays when data.cache is on
    rows0 = epoch_rows(lengths, row_len, cfg.data.packing, cfg.train.seed, 0)
    plan = make_plan(cfg, data.n_train_examples, len(rows0))
    v_lengths = [len(c) + len(r) for c, r in data.valid] if pairs else [len(s) for s in data.valid]
    v_rows = valid_rows(v_lengths, row_len, cfg.data.packing)
    valid_batches = make_batches(data.valid, v_rows, plan.micro_batch_size, cfg.data.packing, pad_id, "valid")
    say(f"{data.n_train_examples} train examples -> {len(data.train)} {'pairs' if pairs else 'sequences'}, "
        f"{data.train_fit.tokens} tokens ({data.train_fit.trained_tokens} trained) per epoch, {plan.rows_per_epoch} rows/epoch "
        f"(packing efficiency {packing_efficiency(rows0, lengths, row_len):.1%}); "
        f"{plan.epochs} epochs x {plan.steps_per_epoch} steps, {plan.total_steps} steps; "
        f"batch {plan.batch_size} rows = {plan.micro_batch_size} x "
        f"{math.ceil(plan.batch_size / plan.micro_batch_size)} accumulated; lr {plan.lr:g}", highlight=False)
    if d.on:
        say(f"{d.world_size} processes ({d.strategy}): up to {math.ceil(plan.batch_size / d.world_size)} rows per "
            "process per step", highlight=False)
    return TrainData(tokenizer, pad_id, data, lengths, rows0, plan, valid_batches, row_len)


def prepare_run_dir(cfg: RunConfig, d: Dist, *, resume: bool) -> Path:
    """The run dir, emptied of an earlier run (output.overwrite) and holding the resolved config; written by
    the main process only."""
    run_dir = Path(cfg.output.dir)
    if d.main:
        if not resume and run_dir.exists() and cfg.output.overwrite:
            for name in ("checkpoints", "final", "metrics.jsonl", "summary.json", "config.yaml", "eval",
                         dpo.REFERENCE_FILE, *trackers.RUN_DIR_FOLDERS):
                p = run_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return run_dir


def build_model(cfg: RunConfig, d: Dist, device: torch.device, ckpt: Path | None, objective=None):
    """(model, net, trained params): the base with the method applied (the checkpoint's weights restored),
    wrapped as the objective for this many processes.

    objective: model -> the loss module (default: SFT's TrainedNLL), called before the checkpoint's weights
    are restored, so that what it computes from the model (DPO's precomputed reference) is of the weights
    training starts from.
    """
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = apply_method(load_base(cfg, device), cfg)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: gradients reach LoRA weights even though the frozen inputs need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_module = objective(model) if objective is not None else TrainedNLL(model, cfg.train.lm_head_chunk)
    if ckpt is not None:
        load_weights(model, ckpt)  # before wrapping: FSDP2 then shards the restored weights
    model.train()
    net = distributed.wrap(loss_module, body_and_head(model)[0].layers, d, cfg.train.mixed_precision)
    params = [p for p in net.parameters() if p.requires_grad]  # after wrap: FSDP2 swaps in sharded ones
    return model, net, params


def build_optimizer(cfg: RunConfig, plan: Plan, params: list, device: torch.device):
    """(AdamW, its lr schedule: warmup then cfg.train.scheduler)."""
    optimizer = torch.optim.AdamW(params, lr=plan.lr, betas=tuple(cfg.train.adam_betas),
                                  weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.scheduler, plan.warmup_steps, plan.total_steps))
    return optimizer, scheduler


def _train(cfg: RunConfig, d: Dist, *, resume: bool, console, dry_run: bool = False) -> TrainResult:
    say = console.print
    wall_start = time.time()

    # --- 1. checks that need no weights, then data (tokenizer only) --------------------------------
    problems = check_setup(cfg, resume=resume, world_size=d.world_size, run_dir=not dry_run)
    if problems:
        raise ConfigError(problems, title="cannot start training")
    if (threads := threads_of(cfg, d)) is not None:
        torch.set_num_threads(threads)
        if cfg.train.threads == "auto":
            say(f"[dim]train.threads auto: {threads} torch thread(s) per process, from the free cores[/]",
                highlight=False)
    device = distributed.device_of(d, resolve_device(cfg.train.device))
    td = build_data(cfg, d, say, dry_run=dry_run)
    tokenizer, pad_id, data, lengths, rows0, plan = td.tokenizer, td.pad_id, td.splits, td.lengths, td.rows0, td.plan
    valid_batches, row_len, pairs = td.valid_batches, td.row_len, cfg.objective == "dpo"
    rl, rollouts, rewarder = cfg.objective == "grpo", None, None  # grpo: the current generation, the grader
    memory = check_memory(cfg, plan, d, device, say)
    if dry_run:
        return TrainResult(Path(cfg.output.dir), {"plan": asdict(plan), "processes": d.world_size,
                                                  "strategy": d.strategy, "memory_estimate_mb": memory.to_dict()})

    # --- 2. run dir, model, optimizer, restored state -----------------------------------------------
    run_dir = prepare_run_dir(cfg, d, resume=resume)
    ckpt = list_checkpoints(run_dir)[-1] if resume else None
    objective = None
    if pairs:
        ref_mode = dpo.reference_mode(cfg)
        say(f"objective dpo: loss {cfg.dpo.loss}, beta {cfg.dpo.beta:g}, reference: {ref_mode}", highlight=False)

        def objective(model):  # the precomputed reference is of the weights training starts from
            module = dpo.PreferenceLoss(model, cfg.dpo, cfg.train.lm_head_chunk, ref_mode)
            if ref_mode == "precompute":
                def compute(split_pairs, split):
                    return dpo.reference_logps(model, split_pairs, split, plan.micro_batch_size, cfg.data.packing,
                                               pad_id, cfg.train.lm_head_chunk, device,
                                               autocast(device, cfg.train.mixed_precision))
                module.tables = dpo.load_or_compute_reference(model, run_dir, {"train": data.train,
                                                                                "valid": data.valid},
                                                              compute, say, main=d.main)
            return module

    if rl:
        from tunekit.data.render import end_of_turn_ids

        g = cfg.grpo
        say(f"objective grpo: group {g.group_size}, up to {g.max_new_tokens} new tokens, temperature "
            f"{g.temperature:g}, top_p {g.top_p:g}, beta {g.beta:g}" + (" (reference: adapter-off)" if g.beta else "")
            + f", epsilon {g.epsilon:g}, loss_norm {g.loss_norm}, {g.steps_per_generation} step(s) per generation",
            highlight=False)
        rewarder = grpo.Rewarder(grpo.load_grader(cfg)[0], g.judges, cfg.train.device)  # python: sandbox opens
        stop_ids = list(end_of_turn_ids(tokenizer))
        valid_batches = grpo.ValidPrompts(data.valid, rewarder, tokenizer, stop_ids, pad_id, d)

        def objective(model):
            return grpo.PolicyLoss(model, g, cfg.train.lm_head_chunk)

    model, net, params = build_model(cfg, d, device, ckpt, objective)
    served = grpo.rollout_served(model, stop_ids, pad_id) if rl else None  # the engine's view of the live model
    if (adapter := getattr(model, "peft_config", {}).get("default")) is not None:
        say(f"LoRA r={adapter.r} on {', '.join(sorted(adapter.target_modules or []))}"
            + (f"; on the parameters {', '.join(sorted(adapter.target_parameters))}" if adapter.target_parameters
               else "") + f" ({sum(p.numel() for p in params):,} trained parameters)", highlight=False)
    optimizer, scheduler = build_optimizer(cfg, plan, params, device)

    step, metrics, trained_total, initial_valid = 0, [], 0, {}
    if ckpt is not None:
        state = load_training_state(ckpt, net, optimizer, scheduler)
        restore_rng(ckpt, d)
        step, metrics, trained_total = state["step"], state["metrics"], state["trained_tokens"]
        initial_valid = state["initial_valid"]
        if state.get(grpo.STATE_KEY):  # stopped between the steps of one generation: its rollouts
            rollouts = grpo.restored_rollouts(state[grpo.STATE_KEY], d)
            if rollouts is None:
                say(f"the checkpoint holds rollouts sampled by {len(state[grpo.STATE_KEY])} process(es): this run "
                    f"samples step {step + 1}'s completions again", highlight=False)
        written_by = state.get("world_size", 1)
        say(f"resumed from {ckpt} (step {step})" + (f"; it was written by {written_by} processes, this run has "
                                                     f"{d.world_size}" if written_by != d.world_size else ""),
            highlight=False)
    elif valid_batches:
        # The starting point, so the summary shows what training changed (eval mode: no RNG is used).
        initial_valid = evaluate(cfg, net, valid_batches, device)
    if d.main:  # metrics.jsonl holds exactly the rows up to the restored step (a killed run may have written more)
        with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in metrics)
        if rl:
            grpo.keep_samples(run_dir, step)
    tracking = (trackers.Trackers.start(cfg, run_dir, resume=resume,
                                        warn=lambda m: say(f"[yellow]warning:[/] {escape(m)}", highlight=False))
                if d.main else trackers.Trackers())
    max_grad_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")

    def checkpoint_now() -> Path:
        state = _state(step, plan, metrics, trained_total, initial_valid)
        if rollouts is not None and step < rollouts.first_step + cfg.grpo.steps_per_generation:
            state[grpo.STATE_KEY] = grpo.rollouts_state(rollouts, d)  # later steps of this generation train on it
        return save_checkpoint(run_dir, model, net, optimizer, scheduler, state, cfg.train.keep_last, d)

    # --- 3. the loop --------------------------------------------------------------------------------
    window_trained, window_real, window_start = 0, 0, time.time()
    real_seen, row_seen, train_time, last_loss = 0, 0, 0.0, None
    trained_this_run, first_step = 0, step
    with _progress(console) as progress:
        task = progress.add_task("train", total=plan.total_steps, completed=step, loss="-", tps="-")
        while step < plan.total_steps:
            t0 = time.time()
            if rl:  # sample and grade the completions of this step's prompts (and of the generation's next steps)
                g = cfg.grpo
                if rollouts is None or step >= rollouts.first_step + g.steps_per_generation:
                    steps = range(step, min(plan.total_steps, step + g.steps_per_generation))
                    rollouts = grpo.generate_rollouts(
                        model, [[data.train[i] for i in grpo.step_prompts(len(data.train), cfg.train.seed, s,
                                                                          plan.batch_size, plan.steps_per_epoch)]
                                for s in steps], step, g, rewarder, tokenizer, stop_ids, pad_id, cfg.train.seed,
                        rank=d.rank, world=d.world_size, served=served)
                    if step == first_step:  # a grader failing on everything stops the run before it trains
                        try:
                            grpo.check_grades(rollouts, d)
                        except TunekitError:
                            tracking.close()
                            rewarder.close()
                            raise
                    if g.steps_per_generation > 1:  # the ratio's denominator, before any update on them
                        rollouts.old_logps = grpo.old_logps(model, rollouts, plan.micro_batch_size, pad_id,
                                                            cfg.train.lm_head_chunk)
                micro_batches = grpo.rollout_batches(rollouts, step, plan.micro_batch_size, pad_id, g.loss_norm)
                # every rank runs as many passes as the rank with the most completions (a filler at weight 0)
                n_micro = max(distributed.gather_objects(len(micro_batches), d))
                short = d.on and len(micro_batches) < n_micro
                filler = (micro_batches[0] if micro_batches else grpo.filler_batch(data.train[0], pad_id)) \
                    if short else None
            else:
                epoch, in_epoch = divmod(step, plan.steps_per_epoch)
                rows = epoch_rows(lengths, row_len, cfg.data.packing, cfg.train.seed, epoch)
                step_rows = rows[in_epoch * plan.batch_size:(in_epoch + 1) * plan.batch_size]
                micro_batches = make_batches(data.train, distributed.deal(step_rows, d), plan.micro_batch_size,
                                             cfg.data.packing, pad_id)
                # Micro-batches per process in this step, the same on every rank (their collectives pair up).
                n_micro = math.ceil(math.ceil(len(step_rows) / d.world_size) / plan.micro_batch_size)
                # A rank with fewer rows than n_micro pads its passes with a weight-0 row (built only then).
                short = d.on and len(micro_batches) < n_micro
                filler = make_batches(data.train, step_rows[:1], 1, cfg.data.packing, pad_id)[0] if short else None

            step_loss, n_units, stats = backward_step(net, micro_batches, device, cfg.train.mixed_precision,
                                                      d=d, n_micro=n_micro, filler=filler)
            # trained tokens of the step (SFT: its units; DPO: of both sides of every pair; GRPO: completion tokens)
            n_trained = int(distributed.sum_([sum(b.num_trained for b in micro_batches)], d)[0]) if pairs or rl \
                else n_units
            grad_norm = distributed.full_norm(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.time() - t0

            step += 1
            if step == first_step + TIMED_STEPS and step < plan.total_steps:
                left = (plan.total_steps - step) * train_time / TIMED_STEPS
                say(f"time: {train_time / TIMED_STEPS:.2f} s per step over the first {TIMED_STEPS} -> about "
                    f"{left / 60:.1f} min for the {plan.total_steps - step} steps left", highlight=False)
            last_loss = step_loss / n_units
            real, row_tokens = distributed.sum_([sum(b.real_tokens for b in micro_batches),
                                                 sum(b.input_ids.numel() for b in micro_batches)], d)
            trained_total += n_trained
            trained_this_run += n_trained
            window_trained += n_trained
            window_real += int(real)
            real_seen += int(real)
            row_seen += int(row_tokens)

            do_eval = bool(valid_batches) and (
                step == plan.total_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
            if step % cfg.train.log_every == 0 or do_eval or step == plan.total_steps:
                elapsed = max(1e-9, time.time() - window_start)
                done = grpo.step_rollouts(rollouts, step - 1, d) if rl else None  # the step's, every rank's
                measured = dpo.step_metrics(step_loss, n_units, stats) if pairs else \
                    grpo.step_metrics(step_loss, n_units, stats, n_trained, done, step - 1, cfg.grpo.beta) if rl \
                    else {"train_loss": last_loss, "train_token_accuracy": stats / n_trained}
                if rl and d.main:  # a sample of what was graded: the completions of the step's first prompt
                    first = grpo.step_prompts(len(data.train), cfg.train.seed, step - 1, plan.batch_size,
                                              plan.steps_per_epoch)[0]
                    grpo.write_samples(run_dir, done, step, data.train[first].item)
                row = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "lr": lr_now,
                       **measured, "grad_norm": grad_norm, "trained_tokens": trained_total,
                       "tokens_per_s": window_trained / elapsed, "input_tokens_per_s": window_real / elapsed}
                if do_eval:
                    row.update(evaluate(cfg, net, valid_batches, device))
                metrics.append(row)
                if d.main:
                    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(row) + "\n")
                tracking.log(row)
                if not console.is_terminal:
                    extra = f"  reward {row['reward_mean']:.3f}" if rl else ""
                    if rl and row["grader_error_share"]:
                        extra += f" (grader failed on {row['grader_error_share']:.0%}, scored 0)"
                    valid = row.get("valid_reward_mean" if rl else "valid_loss")
                    extra += f"  valid {valid:.4f}" if do_eval else ""
                    say(f"step {step}/{plan.total_steps}  loss {last_loss:.4f}{extra}  "
                        f"{row['tokens_per_s']:.0f} trained tok/s", highlight=False)
                window_trained, window_real, window_start = 0, 0, time.time()
            progress.update(task, completed=step, loss=f"{last_loss:.4f}",
                            tps=f"{n_trained / max(1e-9, time.time() - t0):.0f}")

            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < plan.total_steps:
                checkpoint_now()
            # A pause (see STOP_FILE); the main process decides for every rank.
            if distributed.agree((run_dir / STOP_FILE).exists(), d) and step < plan.total_steps:
                checkpoint_now()
                if d.main:
                    (run_dir / STOP_FILE).unlink(missing_ok=True)
                tracking.close()
                if rewarder is not None:
                    rewarder.close()
                raise TrainingStopped(Problem(str(run_dir), f"stopped at step {step} on request ({STOP_FILE} file)",
                                              "continue with --resume"))

    # --- 4. final weights, summary ------------------------------------------------------------------
    peaks = distributed.gather_objects(peak_rss(), d)  # per process, up to here (before the final save)
    last = checkpoint_now()
    if d.main:  # final/ holds the last checkpoint's weights: gathered (under FSDP2) and serialized once
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        copy_weights(last, tmp)
        tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, run_dir / "final")

    if rewarder is not None:  # the python sandbox, if the grader opened one
        rewarder.close()
    last_valid = next((r for r in reversed(metrics) if "valid_loss" in r or "valid_reward_mean" in r), {})
    summary = {
        "steps": step, "epochs": round(step / plan.steps_per_epoch, 4), "planned_epochs": plan.epochs,
        "final_train_loss": last_loss if last_loss is not None else (metrics[-1]["train_loss"] if metrics else None),
        "initial_valid_loss": initial_valid.get("valid_loss"),
        "final_valid_loss": last_valid.get("valid_loss"),
        "final_valid_token_accuracy": last_valid.get("valid_token_accuracy"),
        "trained_tokens": trained_total,
        "tokens_per_epoch": data.train_fit.tokens, "trained_tokens_per_epoch": data.train_fit.trained_tokens,
        "tokens_per_s": trained_this_run / train_time if train_time else None,  # trained tokens/s, all processes
        "packing": cfg.data.packing,
        "packing_efficiency": packing_efficiency(rows0, lengths, row_len),
        "batch_fill": real_seen / row_seen if row_seen else None,  # real / tensor tokens actually run
        "train_examples": data.n_train_examples, "valid_examples": data.n_valid_examples,
        "train_sequences": len(data.train),
        "dropped_too_long": data.train_fit.dropped_too_long,
        "dropped_trained_tokens": data.train_fit.dropped_trained_tokens,
        "truncated": data.train_fit.truncated, "lost_trained_tokens": data.train_fit.lost_trained_tokens,
        "no_trained_tokens": data.train_fit.no_trained_tokens,
        "plan": asdict(plan), "wall_time_s": time.time() - wall_start, "resumed": resume,
        "processes": d.world_size, "strategy": d.strategy,
        "memory_estimate_mb": memory.to_dict(), "peak_rss_mb": [p / MB for p in peaks],  # per process
    }
    if pairs:  # the preference metrics of the last logged step and evaluation, and where they started
        last_train = metrics[-1] if metrics else {}
        summary.update({"objective": "dpo", "dpo_loss": cfg.dpo.loss, "reference": dpo.reference_mode(cfg),
                        "train_pairs": len(data.train), "valid_pairs": len(data.valid),
                        **{f"final_{k}": last_train.get(k) for k in ("reward_accuracy", "reward_margin")},
                        **{f"initial_{k}": initial_valid.get(k) for k in ("valid_reward_accuracy",
                                                                           "valid_reward_margin")},
                        **{f"final_{k}": last_valid.get(k) for k in ("valid_reward_accuracy", "valid_reward_margin")}})
    if rl:  # the rewards of the first and last logged steps, and of the validation prompts
        summary.update({"objective": "grpo", "train_prompts": len(data.train), "valid_prompts": len(data.valid),
                        "group_size": cfg.grpo.group_size, "loss_norm": cfg.grpo.loss_norm,
                        "first_reward_mean": metrics[0].get("reward_mean") if metrics else None,
                        "final_reward_mean": metrics[-1].get("reward_mean") if metrics else None,
                        "initial_valid_reward_mean": initial_valid.get("valid_reward_mean"),
                        "final_valid_reward_mean": last_valid.get("valid_reward_mean")})
    if not d.main:
        return TrainResult(run_dir, summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    final, here = (run_dir / "final").resolve(), Path.cwd().resolve()  # examples/x/../../runs/y -> runs/y
    say(f"[green]done[/]: {step} steps, final train loss {summary['final_train_loss']:.4f}; weights in "
        f"{escape(str(final.relative_to(here) if final.is_relative_to(here) else final))}", highlight=False)

    tracking.log_summary(summary)

    if cfg.eval.enabled:
        from tunekit.eval.evaluate import evaluate_from_config

        try:
            evaluate_from_config(cfg, run_dir, log=lambda message: say(message, highlight=False))
        except BaseException:
            tracking.close(failed=True)
            raise
        results = json.loads((run_dir / "eval" / "results.json").read_text(encoding="utf-8"))
        tracking.log_summary({"verdict": results["verdict"],
                              **{c["name"]: c["metrics"] for c in results["candidates"]}}, name="eval")
    tracking.close()
    return TrainResult(run_dir, summary)


def _state(step: int, plan: Plan, metrics: list, trained_tokens: int, initial_valid: dict) -> dict:
    """Position in the data and metrics so far. The epoch order is epoch_rows(seed, epoch)."""
    epoch, batch_index = divmod(step, plan.steps_per_epoch)
    return {"step": step, "epoch": epoch, "batch_index": batch_index, "rows_per_step": plan.batch_size,
            "order": "tunekit.data.dataset.epoch_rows(lengths, max_len, packing, train.seed, epoch)",
            "trained_tokens": trained_tokens, "initial_valid": initial_valid, "metrics": metrics,
            "time": time.time()}

