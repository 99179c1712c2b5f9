"""The "auto" hyperparameters, one rule each, used by `tunekit train` (`loop.make_plan`) and by the fine-tuning
API's worker (which resolves a job's auto values when its files are validated and echoes them on the job).

- epochs: `data.check.recommended_epochs` of the number of training examples (the rule `tunekit data check`
  prints, kept beside the data check that reports it); for objective: dpo, of the number of pairs;
- learning rate: `DEFAULT_LR` of the method (x the job's `learning_rate_multiplier` in the API); for objective:
  dpo, `DPO_LR`;
- batch: as many rows of `data.max_len` tokens as fit in `train.batch_tokens`; for objective: dpo a row holds
  both sides of its pairs (2 x `data.max_len` tokens), so half as many rows: the same tokens per step;
- beta (objective: dpo, the API's `beta`): `DpoConfig`'s default, 0.1.

`make_plan` resolves a run config's autos into a `Plan` (with its steps and warmup); `lr_factor` is the schedule.

It holds rules only, no training code: the server's worker reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunekit.config import DpoConfig, RunConfig
from tunekit.data.check import recommended_epochs

DEFAULT_LR = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}  # peak lr when train.lr is "auto"
# objective: dpo starts from a model that already answers well and moves it a little: 1/40 of SFT's lr (the
# ratio of the DPO and SFT recipes of the Zephyr models: 5e-7 / 2e-5 full, 5e-6 / 2e-4 QLoRA)
DPO_LR = {"full": 2.5e-7, "lora": 5e-6, "qlora": 5e-6}


def auto_epochs(n_examples: int) -> int:
    return recommended_epochs(n_examples)


def auto_lr(method: str, objective: str = "sft") -> float:
    """The peak lr of `method`; a method the config does not know gets LoRA's (the config check refuses it)."""
    table = DPO_LR if objective == "dpo" else DEFAULT_LR
    return table.get(method, table["lora"])


def auto_batch_size(batch_tokens: int, max_len: int, objective: str = "sft") -> int:
    """Rows per optimizer step: packed rows of `max_len` tokens (2 x max_len for objective: dpo, both sides of
    a pair) within `batch_tokens`."""
    return max(1, batch_tokens // (max_len * (2 if objective == "dpo" else 1)))


def auto_beta() -> float:
    """The DPO beta of a fine-tuning job whose `beta` is "auto": the config's default."""
    return DpoConfig().beta


@dataclass
class Plan:
    """Hyperparameters with every "auto" resolved."""

    epochs: int
    lr: float
    batch_size: int  # rows per optimizer step
    micro_batch_size: int  # rows per forward/backward
    rows_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(cfg: RunConfig, n_examples: int, rows_per_epoch: int) -> Plan:
    t = cfg.train
    epochs = auto_epochs(n_examples) if t.epochs == "auto" else t.epochs
    lr = auto_lr(cfg.method, cfg.objective) if t.lr == "auto" else t.lr
    batch = auto_batch_size(t.batch_tokens, cfg.data.max_len, cfg.objective) if t.batch_size == "auto" \
        else t.batch_size
    # a micro-batch is rows (SFT), pairs (DPO) or completions (GRPO: a step's batch is prompts, each with
    # grpo.group_size completions)
    micro = min(t.micro_batch_size, batch * cfg.grpo.group_size if cfg.objective == "grpo" else batch)
    steps_per_epoch = math.ceil(rows_per_epoch / batch)
    total = epochs * steps_per_epoch
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    warmup = math.ceil(t.warmup_ratio * total)
    return Plan(epochs, lr, batch, micro, rows_per_epoch, steps_per_epoch, total, warmup)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
