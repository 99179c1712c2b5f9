"""The reinforcement objective (objective: grpo): GRPO with an OpenAI grader as the reward (docs/grpo.md).

A step of the loop (`loop.py`) is: the prompts of the step (train.batch_size of them, in an order that is a pure
function of train.seed and the epoch), `group_size` completions of each sampled by the generation engine
(generate/engine.py) in this process on the live weights (the adapter active: no copy, no weight sync; a prompt
is prefilled once for its whole group), each completion graded (`Rewarder`), advantages per group, then the
loss below over micro-batches of completions through the loop's `backward_step`, as for SFT and DPO.

Like `sft.py` and `dpo.py`, the objective is a module, `forward(RolloutBatch) -> (summed loss, units, STATS
sums)`, the loop dividing by the step's units (counted first: accumulating micro-batches equals one batch).

The loss of a completion token t of completion i, with A_i its advantage, r_t = exp(logp_t - old_t) the
importance ratio against the log-prob at generation (steps_per_generation 1: old_t = logp_t detached, r_t = 1
with the gradient of logp_t), ref_t the log-prob with the adapter switched off:
    l_t = -min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i) + beta (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
(the KL term is the k3 estimator of KL(policy || reference), >= 0, 0 where they agree). Normalised by
grpo.loss_norm: token (the default): sum of l_t over every completion token of the step / those tokens (DAPO);
sequence: mean over completions of each one's token mean (the GRPO paper); constant: sum / (completions x
max_new_tokens) (Dr. GRPO). A_i = (R_i - mean of its group) / (std of its group + 1e-4) with
grpo.scale_rewards, else R_i - the mean; a group whose rewards are all equal has A = 0: no signal.

Rollout sampling is seeded per step and prompt (`rollout_seed`), so a resumed run (weights restored exactly)
samples the same completions and gets the same rewards and losses.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from tunekit.config import GrpoConfig, RunConfig
from tunekit.data.pack import Batch, collate_padded
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import Problem, TunekitError
from tunekit.model import body_and_head
from tunekit.train.distributed import SINGLE, Dist, deal, gather_objects
from tunekit.train.sft import forward_hidden

# Sums over a micro-batch's completion tokens that `forward` returns beside the loss.
STATS = ("kl", "clipped", "ratio")
# Grader types a reward can use; score_model / label_model answer with a local judge model (grpo.judges).
REWARD_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")  # OpenAI's RFT union
# Where a run's mid-generation rollouts are kept in a checkpoint's state (steps_per_generation > 1).
STATE_KEY = "grpo_rollouts"


# --------------------------------------------------------------------------------------------------
# Up-front checks


def load_grader(cfg: RunConfig) -> tuple[dict | None, list[Problem]]:
    """The grader of grpo.grader (inline, or read from its JSON / YAML file), unchecked."""
    import yaml

    grader = cfg.grpo.grader
    if grader is None:
        return None, [Problem("grpo.grader", "objective: grpo needs a grader (the reward)",
                              "set grpo.grader to a grader file or an inline grader (docs/grpo.md)")]
    if isinstance(grader, dict):
        return grader, []
    path = Path(grader)
    if not path.is_file():
        return None, [Problem("grpo.grader", f"file not found: {path}", "give a JSON or YAML file holding a grader")]
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        return None, [Problem(f"grpo.grader {path}", f"does not parse: {' '.join(str(exc).split())[:200]}",
                              "write the grader as JSON (.json) or YAML (.yaml)")]
    if not isinstance(value, dict):
        return None, [Problem(f"grpo.grader {path}", "a reward is one grader object",
                              "combine several graders with a multi grader")]
    return value, []


def _item_keys(path: Path | None) -> set[str] | None:
    """The fields every line of a prompt file has (what {{item.field}} may read); None when unreadable."""
    from tunekit.data.formats import read_jsonl

    keys: set[str] | None = None
    try:
        for line in read_jsonl(path):
            if isinstance(line.record, dict):
                keys = set(line.record) if keys is None else keys & set(line.record)
    except (OSError, TunekitError):
        return None
    return keys


def _uses(grader: dict, kind: str) -> bool:
    from tunekit.eval.graders import leaf_graders

    return any(g.get("type") == kind for g in leaf_graders(grader))


def _judge_problems(grader: dict, g: GrpoConfig) -> list[Problem]:
    """Every judge model the grader names must be a key of grpo.judges naming a local model dir or run."""
    from tunekit.eval.grading import judge_models

    problems = []
    for name in sorted(judge_models([grader])):
        path = g.judges.get(name)
        if path is None:
            problems.append(Problem("grpo.judges", f"the grader's judge model {name!r} is not in grpo.judges",
                                    f"map it to a local model dir or run: grpo.judges: {{{name}: PATH}} (a model "
                                    "grader's judge answers in the training process)"))
        elif not (Path(path) / "config.json").is_file() and not (Path(path) / "final").is_dir():
            problems.append(Problem(f"grpo.judges.{name}", f"{path} is not a model dir (no config.json) or a run "
                                    "(no final/)", "give the dir of a saved model, or a tunekit run dir"))
    return problems


def check(cfg: RunConfig, world_size: int) -> list[Problem]:
    """Everything objective: grpo cannot run, found before any weight loads: the grader (checked against the
    fields of the training lines), data files that are not prompts (named by line), the reference, processes."""
    from tunekit.data.formats import read_jsonl, reinforcement_problem
    from tunekit.eval.graders import check_grader
    from tunekit.train.distributed import resolve_strategy
    from tunekit.train.dpo import _continues

    g = cfg.grpo
    grader, problems = load_grader(cfg)
    if grader is not None:
        where = "grpo.grader" if isinstance(g.grader, dict) else f"grpo.grader {g.grader}"
        problems += check_grader(grader, item_keys=_item_keys(cfg.data.train), where=where, allowed=REWARD_TYPES)
    if cfg.data.format not in ("auto", "reinforcement"):
        problems.append(Problem("data.format", f"data.format: {cfg.data.format} with objective: grpo",
                                "objective: grpo trains on prompts: data.format: reinforcement (or auto)"))
    for name, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        if path is None or not Path(path).is_file():
            continue
        try:
            for line in read_jsonl(path):
                why = reinforcement_problem(line.record) if line.record is not None else "not JSON"
                if why is not None:
                    problems.append(Problem(f"{path}:{line.number}", f"not a reinforcement prompt ({name}): {why}",
                                            'each line: {"messages": [..., {"role": "user", ...}], ...fields the '
                                            'grader reads} (docs/grpo.md)'))
                    break
        except (OSError, TunekitError):
            continue  # unreadable: the data layer names it
    if grader is not None and not problems:
        problems += _judge_problems(grader, g)
    if g.beta > 0 and cfg.method == "full":
        problems.append(Problem("grpo.beta", "the KL reference is the model with its adapter switched off; full "
                                "fine-tuning has no adapter (and a second copy of the model is never kept)",
                                "use method: lora (or qlora), or grpo.beta: 0"))
    elif g.beta > 0 and _continues(cfg):
        problems.append(Problem("grpo.beta", "the adapter continues an earlier run's (model.previous_adapter: "
                                "continue): switched off, it gives the model before that run, not this run's start",
                                "use model.previous_adapter: merge, or grpo.beta: 0"))
    if world_size > 1 and resolve_strategy(cfg) == "fsdp2":
        problems.append(Problem("train.distributed.strategy", "objective: grpo on several processes runs with "
                                "ddp: each rank samples its own prompts' completions, a different number of forwards "
                                "per rank, while every forward of an FSDP2-sharded model is a collective of all ranks",
                                "set train.distributed.strategy: ddp (every rank holds the whole model)"))
    if world_size > 1 and isinstance(cfg.train.batch_size, int) and cfg.train.batch_size < world_size:
        problems.append(Problem("train.batch_size", f"{cfg.train.batch_size} prompt(s) per step cannot be dealt to "
                                f"{world_size} processes (each rank samples the completions of its own prompts)",
                                f"set train.batch_size to at least {world_size}, or use fewer processes"))
    if cfg.eval.enabled:
        problems.append(Problem("eval.enabled", "the evaluation after training compares replies with reference "
                                "answers; objective: grpo measures the validation reward during training instead",
                                "set eval.enabled: false and train.eval_every (validation prompts, greedy)"))
    if g.max_new_tokens >= cfg.data.max_len:
        problems.append(Problem("grpo.max_new_tokens", f"{g.max_new_tokens} new tokens leave no room for a prompt "
                                f"within data.max_len {cfg.data.max_len}", "raise data.max_len or lower it"))
    return problems


# --------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    ids: list[int]  # the rendered prompt with the generation prompt
    item: dict  # the training line: the grader reads {{item.field}}
    line: int


@dataclass
class PromptFit:
    """What rendering did to a split (the names of `dataset.Fit` the loop's summary reads; nothing is trained
    from the data itself: the trained tokens are generated)."""

    tokens: int = 0  # prompt tokens
    trained_tokens: int = 0
    dropped_too_long: int = 0  # prompts with no room for max_new_tokens within data.max_len
    dropped_trained_tokens: int = 0
    truncated: int = 0
    lost_trained_tokens: int = 0
    no_trained_tokens: int = 0


@dataclass
class PromptSplits:
    train: list[Prompt]
    valid: list[Prompt]
    n_train_examples: int
    n_valid_examples: int
    train_fit: PromptFit
    notes: list[str] = field(default_factory=list)

    def train_lengths(self) -> list[int]:
        return [len(p.ids) for p in self.train]


def read_prompts(path: Path, tokenizer, max_len: int, max_new_tokens: int) -> tuple[list[Prompt], PromptFit]:
    """The prompts of a reinforcement file, rendered with the chat template (a developer turn as system)."""
    from tunekit.data.formats import read_jsonl, reinforcement_problem
    from tunekit.data.render import render_prompt
    from tunekit.errors import DataError

    prompts, fit, errors = [], PromptFit(), []
    for line in read_jsonl(path):
        why = reinforcement_problem(line.record) if line.record is not None else "not JSON"
        if why is not None:
            errors.append(Problem(f"{path}:{line.number}", why, "docs/grpo.md gives the format"))
            continue
        messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in line.record["messages"]]
        example = {"messages": messages, **({"tools": line.record["tools"]} if "tools" in line.record else {})}
        ids = list(render_prompt(example, tokenizer))
        if len(ids) + max_new_tokens > max_len:
            fit.dropped_too_long += 1
            continue
        fit.tokens += len(ids)
        prompts.append(Prompt(ids, line.record, line.number))
    if errors:
        raise DataError(errors, title=f"{path}: {len(errors)} line(s) are not reinforcement prompts")
    return prompts, fit


def load_prompt_splits(cfg: RunConfig, tokenizer) -> PromptSplits:
    """Train and validation prompts (data.validation, or data.validation_fraction of the training file)."""
    g, d = cfg.grpo, cfg.data
    train, fit = read_prompts(d.train, tokenizer, d.max_len, g.max_new_tokens)
    valid: list[Prompt] = []
    if d.validation is not None:
        valid, _ = read_prompts(d.validation, tokenizer, d.max_len, g.max_new_tokens)
    elif d.validation_fraction > 0:
        order = list(range(len(train)))
        random.Random(d.seed).shuffle(order)
        n_valid = max(1, round(d.validation_fraction * len(train)))
        held = set(order[:n_valid])
        valid = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    notes = [f"{fit.dropped_too_long} prompt(s) left out: no room for grpo.max_new_tokens {g.max_new_tokens} "
             f"within data.max_len {d.max_len}"] if fit.dropped_too_long else []
    if not train:
        raise TunekitError(Problem(str(d.train), "no prompt to train on", "raise data.max_len or add prompts"))
    return PromptSplits(train, valid, len(train), len(valid), fit, notes)


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """The prompts of an epoch in their order: a pure function of (seed, epoch), as `epoch_rows` for SFT."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_prompts(n: int, seed: int, step: int, batch: int, steps_per_epoch: int) -> list[int]:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    return prompt_order(n, seed, epoch)[in_epoch * batch:(in_epoch + 1) * batch]


def rollout_seed(seed: int, step: int, k: int, group_size: int) -> int:
    """The sampling seed of prompt k of `step`; choice c of it samples with this + c (the engine's rule)."""
    return ((seed * 1_000_003 + step) * 65_536 + k) * group_size


# --------------------------------------------------------------------------------------------------
# Rewards


class Rewarder:
    """The grader as a reward: `score(text, item) -> GradeResult`; a python sandbox is opened when the grader
    runs python, and closed by `close`."""

    def __init__(self, grader: dict, judges: dict[str, Path] | None = None, device: str = "auto"):
        from tunekit.eval.graders import PythonSandbox
        from tunekit.eval.grading import LocalJudge, judge_models

        self.grader = grader
        self.sandbox = PythonSandbox(workers=2) if _uses(grader, "python") else None
        names = judge_models([grader])  # loaded on first use, once for the run
        self.judge = LocalJudge({n: str((judges or {})[n]) for n in names}, device=device) if names else None

    def score(self, text: str, item: dict):
        from tunekit.eval.graders import grade
        from tunekit.eval.grading import sample_of

        return grade(self.grader, sample_of(text), item, judge=self.judge, sandbox=self.sandbox)

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None


def group_advantages(rewards: torch.Tensor, scale: bool) -> torch.Tensor:
    """(P, G) rewards -> (P, G) advantages: reward - its group's mean, / (the group's std + 1e-4) with `scale`
    (std with Bessel's correction, as TRL's GRPOTrainer)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4) if scale else centred


# --------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollouts:
    """One generation: `group_size` completions of each prompt of the steps it covers, graded. Plain lists, so
    that a checkpoint taken between its steps can hold it (STATE_KEY)."""

    first_step: int
    step_of: list[int]  # per completion: the optimizer step that trains on it
    group_of: list[int]  # per completion: its group (prompt) in this generation
    prompts: list[list[int]]  # per completion: its prompt ids
    completions: list[list[int]]  # per completion: the generated ids (the end-of-turn id included when it stopped)
    stopped: list[bool]
    rewards: list[float]
    sub_rewards: dict[str, list[float]]  # multi: per sub-grader, per completion
    errors: list[bool]  # the grade failed (scored 0)
    advantages: list[float]
    old_logps: list[list[float]] | None  # per completion token at generation (steps_per_generation > 1)
    seconds: float  # generation wall time (grading not included)
    peak_mb: float | None  # CUDA memory peak of the generation
    generated: int = 0  # tokens generated in `seconds` (all of the generation's steps)
    first_error: str | None = None  # the first failed grade's message
    texts: list[str] = field(default_factory=list)  # per completion: the text the grader read

    def to_state(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_state(state: dict) -> Rollouts:
        return Rollouts(**state)

    def of_step_only(self, step: int) -> Rollouts:
        """The completions of `step` alone (what the step's metrics read)."""
        idx = self.of_step(step)
        pick = (lambda xs: [xs[i] for i in idx])  # noqa: E731
        return Rollouts(self.first_step, pick(self.step_of), pick(self.group_of), pick(self.prompts),
                        pick(self.completions), pick(self.stopped), pick(self.rewards),
                        {k: pick(v) for k, v in self.sub_rewards.items()}, pick(self.errors), pick(self.advantages),
                        None, self.seconds, self.peak_mb, self.generated, self.first_error, pick(self.texts))

    @staticmethod
    def joined(parts: list[Rollouts]) -> Rollouts:
        """The completions of every rank as one generation (groups renumbered; the wall time of the slowest rank,
        the generated tokens of all)."""
        out = Rollouts(parts[0].first_step, [], [], [], [], [], [], {}, [], [], None,
                       max(p.seconds for p in parts), None, sum(p.generated for p in parts))
        peaks = [p.peak_mb for p in parts if p.peak_mb is not None]
        out.peak_mb = max(peaks) if peaks else None
        for p in parts:
            offset = 1 + max(out.group_of, default=-1)
            out.step_of += p.step_of
            out.group_of += [g + offset for g in p.group_of]
            out.prompts += p.prompts
            out.completions += p.completions
            out.stopped += p.stopped
            out.rewards += p.rewards
            out.errors += p.errors
            out.advantages += p.advantages
            out.texts += p.texts
            for k, v in p.sub_rewards.items():
                out.sub_rewards.setdefault(k, []).extend(v)
        return out

    def of_step(self, step: int) -> list[int]:
        return [i for i, s in enumerate(self.step_of) if s == step]

    def step_metrics(self, step: int) -> dict[str, float]:
        """Rollout metrics of `step`'s completions (rewards, no-signal groups, lengths, generation speed)."""
        idx = self.of_step(step)
        rewards = [self.rewards[i] for i in idx]
        groups: dict[int, list[float]] = {}
        for i in idx:
            groups.setdefault(self.group_of[i], []).append(self.rewards[i])
        out = {"reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
               "no_signal_share": sum(len(set(g)) == 1 for g in groups.values()) / len(groups),
               "completion_tokens_mean": statistics.fmean(len(self.completions[i]) for i in idx),
               "stopped_share": statistics.fmean(float(self.stopped[i]) for i in idx),
               "grader_error_share": statistics.fmean(float(self.errors[i]) for i in idx),
               "rollout_tokens_per_s": self.generated / max(1e-9, self.seconds)}
        for name, values in self.sub_rewards.items():
            out[f"reward/{name}"] = statistics.fmean(values[i] for i in idx)
        if self.peak_mb is not None:
            out["rollout_peak_mb"] = self.peak_mb
        return out


SAMPLES_FILE = "rollouts.jsonl"  # in the run dir: the completions of one group per logged step, with their grades


def write_samples(run_dir: Path, r: Rollouts, step: int, item: dict) -> None:
    """Append the completions of the first group of `r` (one step's rollouts, every rank's: rank 0's first is
    the step's first prompt, whose line is `item`) to SAMPLES_FILE: the prompt's last turn, each completion as
    graded, its reward and advantage."""
    if not r.group_of:
        return
    group = r.group_of[0]
    turns = item.get("messages") or [{}]
    prompt = turns[-1].get("content") if isinstance(turns[-1], dict) else None
    with open(run_dir / SAMPLES_FILE, "a", encoding="utf-8") as fh:
        for i, g in enumerate(r.group_of):
            if g == group:
                fh.write(json.dumps({"step": step, "prompt": prompt if isinstance(prompt, str) else None,
                                     "completion": r.texts[i] if i < len(r.texts) else None,
                                     "reward": r.rewards[i], "advantage": r.advantages[i],
                                     "grader_error": r.errors[i], "tokens": len(r.completions[i])},
                                    ensure_ascii=False) + "\n")


def keep_samples(run_dir: Path, last_step: int) -> None:
    """SAMPLES_FILE with only the steps up to `last_step` (a resumed run writes the later ones again)."""
    path = run_dir / SAMPLES_FILE
    if path.is_file():
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        kept = [x for x in lines if json.loads(x).get("step", 0) <= last_step]
        path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


def check_grades(r: Rollouts, d: Dist) -> None:
    """A grader that fails on every completion of a generation stops the run there, with its message (rather
    than an epoch of zero rewards and no signal). Called on every rank (the decision is collective)."""
    from tunekit.train.distributed import sum_

    failed, total = sum_([float(sum(r.errors)), float(len(r.errors))], d)
    if total and failed == total:
        message = next((m for m in gather_objects(r.first_error, d) if m), None) if d.on else r.first_error
        raise TunekitError(Problem("grpo.grader", f"the grader failed on every one of the {int(total)} completions "
                                   f"sampled at step {r.first_step + 1}: {message}",
                                   "fix the grader (try it with `tunekit eval --grader` on a few replies) and "
                                   "train again; grades that fail on some completions score 0 and are counted"))


def step_rollouts(r: Rollouts, step: int, d: Dist) -> Rollouts:
    """The completions of `step` on every rank, as one `Rollouts` (what the step's metrics read)."""
    part = r.of_step_only(step)
    return Rollouts.joined(gather_objects(part, d)) if d.on else part


def rollouts_state(r: Rollouts, d: Dist) -> dict | list[dict]:
    """What a checkpoint keeps of a generation still being trained on: its rollouts, one per rank (each rank
    samples its own prompts) when there are several processes."""
    return [x.to_state() for x in gather_objects(r, d)] if d.on else r.to_state()


def restored_rollouts(state: dict | list[dict], d: Dist) -> Rollouts | None:
    """This rank's rollouts from a checkpoint's state; None when the checkpoint was written by another number
    of processes (the generation is then sampled again at the resumed step)."""
    states = state if isinstance(state, list) else [state]
    return Rollouts.from_state(states[d.rank]) if len(states) == d.world_size else None


def rollout_served(model, stop_ids: list[int], pad_id: int):
    """The live model as the engine serves it (as is: its adapter active). Made once per run: the engine probes
    a model's cache path once per `Weights`."""
    from tunekit.generate.models import Served, Weights

    return Served("", "", Weights("as-is", model, as_is=True), None, None, list(stop_ids), pad_id,
                  int(getattr(model.config, "max_position_embeddings", None) or 2048))


@torch.no_grad()
def generate_rollouts(model, steps: list[list[Prompt]], first_step: int, g: GrpoConfig, rewarder: Rewarder,
                      tokenizer, stop_ids: list[int], pad_id: int, seed: int, *, rank: int = 0,
                      world: int = 1, served=None) -> Rollouts:
    """Sample `g.group_size` completions of every prompt of `steps` (the prompts of steps first_step, first_step
    + 1, ...) with the model as it is (eval mode, adapter active), grade them, and compute advantages.

    On several processes each rank takes prompts k with k % world == rank of each step, sampled with the seed of
    their place k in the step: the completions of a prompt do not depend on the number of processes."""
    from tunekit.generate.engine import Engine, Job, Sampling, Token

    served = served or rollout_served(model, stop_ids, pad_id)
    stop = set(stop_ids)
    jobs, owners = [], []
    for s, prompts in enumerate(steps):
        for k, p in enumerate(prompts):
            if k % world != rank:
                continue
            sampling = Sampling(max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                seed=rollout_seed(seed, first_step + s, k, g.group_size))
            jobs.append(Job(served, p.ids, sampling, g.group_size, None))  # n choices: the prompt prefilled once
            owners.append((s, p))
    was_training = model.training
    model.eval()
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    # A new engine per generation: its prefix cache holds keys and values of these weights only.
    Engine(max_batch=max(g.generation_batch_size, g.group_size), prefix_cache_bytes=64 * 2**20).run(jobs)
    seconds = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and \
        next(model.parameters()).is_cuda else None
    model.train(was_training)

    out = Rollouts(first_step, [], [], [], [], [], [], {}, [], [], None, seconds, peak)
    for group, (job, (s, p)) in enumerate(zip(jobs, owners, strict=True)):
        tokens = [e for e in job.received if isinstance(e, Token)]
        for c in range(g.group_size):
            ids = [t.id for t in tokens if t.choice == c]
            text = tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=False).strip()
            result = rewarder.score(text, p.item)
            out.texts.append(text)
            out.step_of.append(first_step + s)
            out.group_of.append(group)
            out.prompts.append(p.ids)
            out.completions.append(ids)
            out.stopped.append(bool(ids) and ids[-1] in stop)
            out.rewards.append(float(result.reward))
            out.errors.append(result.error_message is not None)
            if result.error_message is not None and out.first_error is None:
                out.first_error = result.error_message
            if rewarder.grader.get("type") == "multi":
                for name, value in result.sub_rewards.items():
                    out.sub_rewards.setdefault(name, []).append(float(value))
    out.generated = sum(len(c) for c in out.completions)
    rewards = torch.tensor(out.rewards, dtype=torch.float64).view(-1, g.group_size)  # (P, G)
    out.advantages = group_advantages(rewards, g.scale_rewards).flatten().tolist()
    return out


# --------------------------------------------------------------------------------------------------
# Batches of completions and the loss


@dataclass
class RolloutBatch:
    """One micro-batch of S completions, each with its prompt in one right-padded row."""

    batch: Batch  # (S, T); trained: the completion's tokens
    advantages: torch.Tensor  # (S,)
    old_logps: torch.Tensor | None  # (N,) per trained token in row-major order; None: the live log-probs
    units: int  # what the step's loss is the mean over (see loss_norm): completion tokens, or completions

    @property
    def num_trained(self) -> int:
        return self.batch.num_trained

    @property
    def real_tokens(self) -> int:
        return self.batch.real_tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    def to(self, device) -> RolloutBatch:
        old = None if self.old_logps is None else self.old_logps.to(device)
        return RolloutBatch(self.batch.to(device), self.advantages.to(device), old, self.units)


def rollout_batches(r: Rollouts, step: int, micro: int, pad_id: int, loss_norm: str) -> list[RolloutBatch]:
    """The completions of `step` in micro-batches of `micro` completions."""
    idx = r.of_step(step)
    out = []
    for start in range(0, len(idx), micro):
        part = idx[start:start + micro]
        seqs = [Sequence(r.prompts[i] + r.completions[i], [IGNORE] * len(r.prompts[i]) + r.completions[i])
                for i in part]
        batch = collate_padded(seqs, pad_id)
        old = None if r.old_logps is None else torch.tensor([x for i in part for x in r.old_logps[i]])
        units = sum(len(r.completions[i]) for i in part) if loss_norm == "token" else len(part)
        out.append(RolloutBatch(batch, torch.tensor([r.advantages[i] for i in part], dtype=torch.float32), old,
                                units))
    return out


def filler_batch(prompt: Prompt, pad_id: int) -> RolloutBatch:
    """A one-completion batch for a rank with no completion in a step: run at weight 0 so that its forward and
    backward pair up with the other ranks' (DDP)."""
    seq = Sequence(prompt.ids + [pad_id], [IGNORE] * len(prompt.ids) + [pad_id])
    return RolloutBatch(collate_padded([seq], pad_id), torch.zeros(1), None, 1)


def _chunk_logps(head, softcap, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from tunekit.train.dpo import _chunk_logps as logps

    return logps(head, softcap, h, target)


def token_logps(model, batch: Batch, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) log-prob of each trained token in row-major order, (N,) its row). The LM head runs only at trained
    positions, `chunk` at a time (recomputed in backward)."""
    _, head = body_and_head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    hidden = forward_hidden(model, batch)  # (S, T, H)
    keep = batch.targets != IGNORE  # (S, T)
    h, target = hidden[keep], batch.targets[keep]  # (N, H), (N,)
    rows = keep.nonzero()[:, 0]  # (N,)
    parts = []
    for start in range(0, h.shape[0], chunk):
        args = (head, softcap, h[start:start + chunk], target[start:start + chunk])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logps(*args))
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), rows


def policy_loss(g: GrpoConfig, logps: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None,
                advantages: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """(summed loss of the micro-batch as loss_norm sums it, (N,) k3 KL per token (zeros without a reference),
    (N,) clipped tokens, (N,) ratios) from (N,) log-probs of the policy, at generation (`old`) and of the
    reference, (S,) advantages and (N,) the row of each token."""
    adv = advantages[rows]  # (N,)
    ratio = torch.exp(logps - old)
    clipped_ratio = ratio.clamp(1 - g.epsilon, 1 + g.epsilon)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = torch.zeros_like(logps)
    if ref is not None:
        delta = ref - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + g.beta * kl
    clipped = ((ratio < 1 - g.epsilon) & (adv < 0)) | ((ratio > 1 + g.epsilon) & (adv > 0))
    if g.loss_norm == "token":
        loss = per_token.sum()
    elif g.loss_norm == "sequence":
        n_rows = advantages.shape[0]
        sums = per_token.new_zeros(n_rows).index_add(0, rows, per_token)
        lengths = torch.bincount(rows, minlength=n_rows).to(sums.dtype).clamp(min=1)
        loss = (sums / lengths).sum()
    else:  # constant
        loss = per_token.sum() / g.max_new_tokens
    return loss, kl.detach(), clipped, ratio.detach()


class PolicyLoss(torch.nn.Module):
    """The reinforcement objective: forward(RolloutBatch) -> (summed loss, units, STATS sums over its completion
    tokens). The reference (grpo.beta > 0) is the same model with the adapter switched off, under no_grad."""

    def __init__(self, model, g: GrpoConfig, chunk: int):
        super().__init__()
        self.model, self.g, self.chunk = model, g, chunk

    def forward(self, rb: RolloutBatch) -> tuple[torch.Tensor, int, list[float]]:
        logps, rows = token_logps(self.model, rb.batch, self.chunk)  # (N,) each
        ref = None
        if self.g.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                ref, _ = token_logps(self.model, rb.batch, self.chunk)
        old = logps.detach() if rb.old_logps is None else rb.old_logps.to(logps.dtype)
        loss, kl, clipped, ratio = policy_loss(self.g, logps, old, ref, rb.advantages, rows)
        return loss, rb.units, [float(kl.sum()), float(clipped.sum()), float(ratio.sum())]


@torch.no_grad()
def old_logps(model, r: Rollouts, micro: int, pad_id: int, chunk: int) -> list[list[float]]:
    """Per completion, the log-prob of each of its tokens under the model as it is (steps_per_generation > 1:
    the ratio's denominator, taken before the first update on these completions)."""
    out: list[list[float]] = []
    for start in range(0, len(r.completions), micro):
        part = range(start, min(len(r.completions), start + micro))
        seqs = [Sequence(r.prompts[i] + r.completions[i], [IGNORE] * len(r.prompts[i]) + r.completions[i])
                for i in part]
        device = next(model.parameters()).device
        logps, rows = token_logps(model, collate_padded(seqs, pad_id).to(device), chunk)
        flat = logps.double().cpu().tolist()
        at = 0
        for i in part:
            n = len(r.completions[i])
            out.append(flat[at:at + n])
            at += n
    return out


def step_metrics(loss_sum: float, n_units: int, stats: list[float], n_tokens: int, r: Rollouts, step: int,
                 beta: float) -> dict[str, float]:
    """The row of a step: loss, the rollout's rewards and lengths, KL (beta > 0), clipped share, mean ratio."""
    kl, clipped, ratio = stats
    n = max(1, n_tokens)
    row = {"train_loss": loss_sum / max(1, n_units), **r.step_metrics(step), "clipped_share": clipped / n,
           "ratio_mean": ratio / n}
    if beta > 0:
        row["kl"] = kl / n
    return row


@torch.no_grad()
def validate(model, prompts: list[Prompt], g: GrpoConfig, rewarder: Rewarder, tokenizer, stop_ids: list[int],
             pad_id: int, d: Dist = SINGLE) -> dict[str, float]:
    """The validation reward: one greedy completion per validation prompt, graded (on several processes each
    rank decodes prompts[rank::world], and the means are over all of them)."""
    from tunekit.generate.engine import generate

    mine = deal(prompts, d)
    was_training = model.training
    model.eval()
    gens = generate(model, [p.ids for p in mine], stop_ids=stop_ids, pad_id=pad_id,
                    max_new_tokens=g.max_new_tokens, batch_size=g.generation_batch_size) if mine else []
    model.train(was_training)
    rewards, lengths, subs = [], [], {}
    for gen, p in zip(gens, mine, strict=True):
        result = rewarder.score(tokenizer.decode(gen.ids, skip_special_tokens=False).strip(), p.item)
        rewards.append(float(result.reward))
        lengths.append(len(gen.ids))
        if rewarder.grader.get("type") == "multi":
            for name, value in result.sub_rewards.items():
                subs.setdefault(name, []).append(float(value))
    if d.on:  # every rank's grades (in rank order; the means do not depend on it)
        parts = gather_objects((rewards, lengths, subs), d)
        rewards = [x for r, _, _ in parts for x in r]
        lengths = [x for _, n, _ in parts for x in n]
        subs = {k: [x for _, _, s in parts for x in s.get(k, [])] for k in parts[0][2]}
    row = {"valid_reward_mean": statistics.fmean(rewards),
           "valid_completion_tokens_mean": statistics.fmean(lengths)}
    row.update({f"valid_reward/{k}": statistics.fmean(v) for k, v in subs.items()})
    return row


@dataclass
class ValidPrompts:
    """What the loop's `evaluate` reads for objective: grpo: the validation prompts and how to grade them."""

    prompts: list[Prompt]
    rewarder: Rewarder
    tokenizer: object
    stop_ids: list[int]
    pad_id: int
    d: Dist = SINGLE  # several processes: each rank decodes its share

    def __bool__(self) -> bool:
        return bool(self.prompts)
