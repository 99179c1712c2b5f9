"""The preference objective (objective: dpo): DPO and its IPO / ORPO / SimPO losses over pairs of replies.

Like `sft.py`, the objective is a module, `forward(pairs) -> (summed loss over pairs, pairs, stats)`: the loop
divides by the step's pairs (so accumulating micro-batches equals one batch of every pair) and runs backward.

Both sides of a pair go through one forward: a micro-batch of P pairs is one `Batch` of rows holding the
preferred (chosen) and the non-preferred (rejected) sequence of each pair, packed into rows (data.packing: whole
pairs per row, up to 2 x data.max_len tokens) or one side per padded row. A side's log-prob is the sum of the
log-probs of its trained tokens (the reply's; the prompt is never trained), also divided by their count where a
loss reads the length-normalised one (IPO, ORPO, SimPO).

The reference model is never a second copy of the weights: with LoRA / QLoRA it is the same model with the
adapter switched off (peft's `disable_adapter()`, under no_grad, in the same step); otherwise its log-probs are
computed once before training (`reference_logps`) and kept in the run dir (REFERENCE_FILE).

The losses, with x = beta, pc / pr the policy's and rc / rr the reference's log-probs of chosen / rejected:
  sigmoid  (DPO)   z = (pc - pr) - (rc - rr);  -(1 - ls) log σ(x z) - ls log σ(-x z)
  ipo              the same z of length-normalised log-probs;  (z - 1 / (2x))^2
  orpo             mean log-probs; log-odds o = (pc - pr) - (log(1 - e^pc) - log(1 - e^pr));  -pc - x log σ(o)
  simpo            mean log-probs; z = (pc - pr) - gamma / x;  -(1 - ls) log σ(x z) - ls log σ(-x z)
plus sft_weight x (the preferred side's mean NLL, -pc / n) for any of them (RPO). Rewards are x (policy -
reference) log-probs (x policy log-probs for ORPO and SimPO, which have no reference), and a pair counts as
right when the preferred side's reward is the higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunekit.config import DpoConfig, RunConfig
from tunekit.data.pack import Batch, collate_packed, collate_padded
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import Problem, TunekitError
from tunekit.model import body_and_head, continues_adapter, read_run_dir
from tunekit.train.sft import _chunk_logits, forward_hidden

# The precomputed reference log-probs in the run dir: (pairs, 2) float64 sums of chosen / rejected per split.
REFERENCE_FILE = "reference_logps.safetensors"
# Sums over a micro-batch's pairs that `forward` returns beside the loss (metrics divide them by the pairs).
STATS = ("reward_chosen", "reward_rejected", "reward_accuracy", "logps_chosen", "logps_rejected")
NO_REFERENCE = ("orpo", "simpo")

Pair = tuple[Sequence, Sequence]


# --------------------------------------------------------------------------------------------------
# Up-front checks


def reference_mode(cfg: RunConfig) -> str:
    """"none" (ORPO, SimPO), "adapter-off" or "precompute": what dpo.reference: auto means for this run.

    auto is adapter-off for a new adapter (LoRA / QLoRA, also on an earlier run whose adapter is merged), and
    precompute for full fine-tuning or an adapter that continues training (switching it off would give the
    model before that adapter, not the one this run starts from).
    """
    if cfg.dpo.loss in NO_REFERENCE:
        return "none"
    if cfg.dpo.reference != "auto":
        return cfg.dpo.reference
    if cfg.method == "full" or _continues(cfg):
        return "precompute"
    return "adapter-off"


def _continues(cfg: RunConfig) -> bool:
    try:
        return continues_adapter(cfg, read_run_dir(cfg.model.base))
    except TunekitError:
        return False  # an unfinished earlier run: check_setup names it


def check(cfg: RunConfig, world_size: int) -> list[Problem]:
    """Combinations the preference objective cannot run, found before any weight loads."""
    problems = []
    dpo = cfg.dpo
    if dpo.label_smoothing and dpo.loss not in ("sigmoid", "simpo"):
        problems.append(Problem("dpo.label_smoothing", f"label smoothing is defined for loss sigmoid and simpo, not "
                                f"{dpo.loss}", "set dpo.label_smoothing: 0, or dpo.loss: sigmoid"))
    if dpo.loss in NO_REFERENCE and dpo.reference != "auto":
        problems.append(Problem("dpo.reference", f"loss {dpo.loss} uses no reference model",
                                "leave dpo.reference: auto"))
    elif dpo.reference == "adapter-off" and cfg.method == "full":
        problems.append(Problem("dpo.reference", "adapter-off needs an adapter (method: lora or qlora)",
                                "use dpo.reference: precompute (or auto) for full fine-tuning"))
    elif dpo.reference == "adapter-off" and _continues(cfg):
        problems.append(Problem("dpo.reference", "the adapter continues an earlier run's (model.previous_adapter: "
                                "continue): switched off, it gives the model before that run, not this run's start",
                                "use dpo.reference: precompute (or auto), or model.previous_adapter: merge"))
    # The evaluation of a DPO run scores held-out pairs (eval/preference.py): nothing is generated.
    shots = [b for b in cfg.eval.baselines if b.startswith(("few-shot", "rag"))]
    if shots:
        problems.append(Problem("eval.baselines", f"{', '.join(shots)} add examples to a chat prompt; the "
                                "evaluation of preference pairs compares likelihoods of the two given replies",
                                "use base and model dirs as eval.baselines after objective: dpo"))
    if cfg.eval.scorer:
        problems.append(Problem("eval.scorer", "a scorer reads generated replies; preference pairs are scored "
                                "by the likelihood of both given replies", "leave eval.scorer out"))
    return problems


# --------------------------------------------------------------------------------------------------
# Batches of pairs


@dataclass
class PairBatch:
    """One micro-batch of P pairs: both sides of each in one Batch of rows."""

    batch: Batch  # (R, T): R = P packed rows, or 2P padded rows (chosen, rejected, chosen, ...)
    side: torch.Tensor  # (R, T) long: 2p at the tokens of pair p's chosen side, 2p + 1 at its rejected, -1 padding
    pair_index: torch.Tensor  # (P,) each pair's index in its split (a row of the precomputed reference)
    split: str  # "train" or "valid"

    @property
    def num_pairs(self) -> int:
        return int(self.pair_index.numel())

    @property
    def num_trained(self) -> int:
        return self.batch.num_trained

    @property
    def real_tokens(self) -> int:
        return self.batch.real_tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.batch.to(device), self.side.to(device, non_blocking=True),
                         self.pair_index.to(device, non_blocking=True), self.split)


def collate_pairs(rows: list[list[Pair]], pad_id: int, packed: bool) -> tuple[Batch, torch.Tensor]:
    """Rows of whole pairs -> (Batch, (R, T) side ids). packed: each row one packed row of its pairs' sides
    (chosen, rejected, chosen, ...), positions restarting per side (`collate_packed`); else (one pair per row)
    each side its own right-padded row (`collate_padded`)."""
    sides = [[s for pair in row for s in pair] for row in rows]
    if packed:
        batch = collate_packed(sides, pad_id)
    else:
        sides = [[s] for row in sides for s in row]
        batch = collate_padded([row[0] for row in sides], pad_id)
    width = batch.input_ids.shape[1]
    side, k = [], 0
    for row in sides:
        ids = []
        for seq in row:
            ids += [k] * len(seq)
            k += 1
        side.append(ids + [-1] * (width - len(ids)))
    return batch, torch.tensor(side)


def make_pair_batches(pairs: list[Pair], rows: list[list[int]], micro: int, packing: bool, pad_id: int,
                      split: str = "train") -> list[PairBatch]:
    """Rows (lists of pair indices) -> micro-batches of `micro` rows (`loop.make_batches` for pairs)."""
    out = []
    for start in range(0, len(rows), micro):
        group = rows[start:start + micro]
        batch, side = collate_pairs([[pairs[i] for i in row] for row in group], pad_id, packing)
        out.append(PairBatch(batch, side, torch.tensor([i for row in group for i in row]), split))
    return out


# --------------------------------------------------------------------------------------------------
# Log-probs and losses


def _chunk_logps(head, softcap: float | None, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(chunk,) log-prob of each target token."""
    return -F.cross_entropy(_chunk_logits(head, softcap, h), target, reduction="none")


def sequence_logps(model, pb: PairBatch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((P, 2) summed log-probs of the trained tokens of each pair's chosen and rejected side, (P, 2) their
    counts). The LM head runs only at trained positions, `chunk` at a time (recomputed in backward)."""
    _, head = body_and_head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    hidden = forward_hidden(model, pb.batch)  # (R, T, H)
    keep = pb.batch.targets != IGNORE  # (R, T)
    h, target, side = hidden[keep], pb.batch.targets[keep], pb.side[keep]  # (N, H), (N,), (N,)
    parts = []
    for start in range(0, h.shape[0], chunk):
        args = (head, softcap, h[start:start + chunk], target[start:start + chunk])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logps(*args))
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    n = 2 * pb.num_pairs
    sums = token_logps.new_zeros(n).index_add(0, side, token_logps)
    counts = torch.bincount(side, minlength=n).to(sums.dtype)
    return sums.view(-1, 2), counts.view(-1, 2)


def preference_losses(dpo: DpoConfig, logps: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward), each (P,), from (P, 2) summed log-probs of the policy (`logps`)
    and the reference (`ref`, None for ORPO / SimPO) and the (P, 2) trained tokens of each side."""
    beta, ls = dpo.beta, dpo.label_smoothing
    mean = logps / counts
    if dpo.loss in ("sigmoid", "ipo"):
        assert ref is not None
        policy, reference = (logps, ref) if dpo.loss == "sigmoid" else (mean, ref / counts)
        z = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
        if dpo.loss == "sigmoid":
            loss = -(1 - ls) * F.logsigmoid(beta * z) - ls * F.logsigmoid(-beta * z)
        else:
            loss = (z - 1 / (2 * beta)) ** 2
        rewards = beta * (policy - reference).detach()
    elif dpo.loss == "orpo":
        pc, pr = mean[:, 0], mean[:, 1]
        log_odds = (pc - pr) - (torch.log(-torch.expm1(pc)) - torch.log(-torch.expm1(pr)))  # log(1 - e^p), exact
        loss = -pc - beta * F.logsigmoid(log_odds)
        rewards = beta * mean.detach()
    else:  # simpo
        z = (mean[:, 0] - mean[:, 1]) - dpo.simpo_gamma / beta
        loss = -(1 - ls) * F.logsigmoid(beta * z) - ls * F.logsigmoid(-beta * z)
        rewards = beta * mean.detach()
    if dpo.sft_weight:
        loss = loss - dpo.sft_weight * mean[:, 0]
    return loss, rewards[:, 0], rewards[:, 1]


class PreferenceLoss(torch.nn.Module):
    """The preference objective: forward(PairBatch) -> (summed loss over its pairs, pairs, STATS sums).

    reference: "adapter-off" computes the reference in the same step with the adapter switched off; "precompute"
    reads `tables[split][pair_index]` (set by the loop from `reference_logps`); "none" uses none."""

    def __init__(self, model, dpo: DpoConfig, chunk: int, reference: str):
        super().__init__()
        self.model, self.dpo, self.chunk, self.reference = model, dpo, chunk, reference
        self.tables: dict[str, torch.Tensor] = {}  # split -> (pairs, 2) precomputed reference log-probs

    def forward(self, pb: PairBatch) -> tuple[torch.Tensor, int, list[float]]:
        logps, counts = sequence_logps(self.model, pb, self.chunk)  # (P, 2) each
        ref = None
        if self.reference == "adapter-off":
            with torch.no_grad(), self.model.disable_adapter():
                ref, _ = sequence_logps(self.model, pb, self.chunk)
        elif self.reference == "precompute":
            ref = self.tables[pb.split][pb.pair_index.cpu()].to(logps.device, logps.dtype)
        loss, chosen, rejected = preference_losses(self.dpo, logps, counts, ref)
        stats = [chosen.sum(), rejected.sum(), (chosen > rejected).sum(), logps[:, 0].detach().sum(),
                 logps[:, 1].detach().sum()]
        return loss.sum(), pb.num_pairs, [float(s) for s in stats]


def step_metrics(loss_sum: float, n_pairs: int, stats: list[float], prefix: str = "") -> dict[str, float]:
    """The metrics of `n_pairs` pairs from their summed loss and STATS: loss and rewards per pair, the reward
    margin (chosen - rejected) and accuracy (share of pairs whose preferred side has the higher reward)."""
    n = max(1, n_pairs)
    mean = {name: value / n for name, value in zip(STATS, stats, strict=True)}
    loss_name = f"{prefix or 'train_'}loss"
    return {loss_name: loss_sum / n, f"{prefix}reward_chosen": mean["reward_chosen"],
            f"{prefix}reward_rejected": mean["reward_rejected"],
            f"{prefix}reward_margin": mean["reward_chosen"] - mean["reward_rejected"],
            f"{prefix}reward_accuracy": mean["reward_accuracy"], f"{prefix}logps_chosen": mean["logps_chosen"],
            f"{prefix}logps_rejected": mean["logps_rejected"]}


# --------------------------------------------------------------------------------------------------
# The precomputed reference


@torch.no_grad()
def reference_logps(model, pairs: list[Pair], split: str, micro: int, packing: bool, pad_id: int, chunk: int,
                    device, autocast) -> torch.Tensor:
    """(pairs, 2) summed log-probs of each pair's chosen and rejected side under `model` as it is (eval mode),
    float64 on the CPU, `micro` pairs per forward."""
    was_training = model.training
    model.eval()
    table = torch.zeros(len(pairs), 2, dtype=torch.float64)
    rows = [[i] for i in range(len(pairs))]
    for pb in make_pair_batches(pairs, rows, micro, packing, pad_id, split):
        with autocast:
            logps, _ = sequence_logps(model, pb.to(device), chunk)
        table[pb.pair_index] = logps.double().cpu()
    model.train(was_training)
    return table


def load_or_compute_reference(model, run_dir: Path, splits: dict[str, list[Pair]], compute, say, *, main: bool
                              ) -> dict[str, torch.Tensor]:
    """The reference tables of `splits` from REFERENCE_FILE in the run dir when it holds them for these pairs
    (a resumed run), else `compute(pairs, split)` for each, written there by the main process."""
    from safetensors.torch import load_file, save_file

    path = Path(run_dir) / REFERENCE_FILE
    if path.is_file():
        tables = load_file(str(path))
        if all(name in tables and tables[name].shape[0] == len(pairs) for name, pairs in splits.items()):
            say(f"reference log-probs read from {path}", highlight=False)
            return {name: tables[name] for name in splits}
    say(f"computing the reference log-probs of {sum(len(p) for p in splits.values())} pairs (once; kept in "
        f"{path.name})", highlight=False)
    tables = {name: compute(pairs, name) for name, pairs in splits.items()}
    if main:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp))
        tmp.replace(path)
    return tables
