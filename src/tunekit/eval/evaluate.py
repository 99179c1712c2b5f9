"""Is fine-tuning worth it? Compare the tuned run against baselines on a held-out chat set.

    evaluate(run_dir, data, baselines=["base", "few-shot:3"]) -> EvalResult

reads top to bottom as:

1. validate everything up front (run dir, its config.yaml, the data, baselines, scorer, few-shot pool),
   reporting every problem at once, before any weight loads;
2. for each model to load (the run, its base, other dirs given with `models`), load it once and, for each
   candidate that uses it (base zero-shot and few-shot share the base):
   - teacher-forced metrics on the held-out set: loss / perplexity / token accuracy at trained positions
     (`render_example`; few-shot and rag shots sit in the prompt with weight 0, so they are never scored),
   - greedy generation of the last assistant message through `tunekit.generate` (the engine the server
     answers with; `render_prompt`, stopping at the template's
     end-of-turn ids), scored against the reference with `tunekit.eval.metrics`,
   - cost: prompt tokens and latency per request;
3. return an `EvalResult`; `EvalResult.to_dict()` is what results.json holds and what `tunekit.eval.report`
   renders.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.config import RunConfig, load_config
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import ConfigError, DataError, Problem, TemplateError, TunekitError
from tunekit.eval.metrics import METRIC_LABELS, Reference, reference_display, reference_of, score_example
from tunekit.eval.shots import choose_shots, jsonl_records, last_assistant, retrieve_shots, with_shots
from tunekit.generate.engine import Generation, generate

# Upper bound on floats in one (B, T, V) logits tensor for teacher forcing (2^27 floats = 512 MiB fp32):
# rows per forward shrink so that long sequences with a large vocabulary still fit.
LOGITS_BUDGET = 2**27


# --------------------------------------------------------------------------------------------------
# Inputs: the held-out examples and the candidates (the shots of few-shot and rag: shots.py)


@dataclass
class EvalExample:
    line: int  # 1-based line in the data file
    example: dict  # the raw OpenAI chat record
    reference: Reference


def read_eval_examples(path: str | Path, *, limit: int | None = None) -> list[EvalExample]:
    """The chat examples of a JSONL file (the first `limit`), each with its reference answer.

    Every unusable line is reported at once (DataError naming file:line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(Problem(str(path), "evaluation data file not found",
                                "pass --data with a JSONL file of OpenAI chat examples"))
    examples, problems = [], []
    for line, record, error in jsonl_records(path):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}:{line}"
        if error:
            problems.append(Problem(where, error, "fix the line or check the file with `tunekit data check`"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            problems.append(Problem(where, "not a chat example (no 'messages' list)",
                                    "evaluation compares assistant answers; use OpenAI chat records"))
            continue
        try:
            reference = reference_of(record)
        except ValueError:
            problems.append(Problem(f"{where} messages", "no assistant message to compare against",
                                    "the last assistant message of each example is the reference answer"))
            continue
        examples.append(EvalExample(line, record, reference))
    if problems:
        raise DataError(problems, title=f"{path}: cannot evaluate on this file")
    if not examples:
        raise DataError(Problem(str(path), "the file holds no examples", "give a JSONL file with chat examples"))
    return examples


@dataclass
class CandidateSpec:
    name: str  # "fine-tuned", "base", "few-shot:3", or the other model's folder name
    kind: str  # "tuned" | "base" | "few-shot" | "rag" | "model"
    path: str  # what load_for_inference gets: a run dir, a model dir or a hub id
    shots: int = 0


def parse_baseline(spec: str) -> tuple[str, int]:
    """"base" -> ("base", 0); "few-shot:3" -> ("few-shot", 3); "rag:3" -> ("rag", 3); anything else ->
    ("model", 0) (a model dir)."""
    text = spec.strip()
    if text == "base":
        return "base", 0
    for kind in ("few-shot", "rag"):
        if text == kind or text.startswith(kind + ":"):
            _, _, k = text.partition(":")
            if not k.strip().isdigit() or int(k) < 1:
                raise ConfigError(Problem(f"baseline '{spec}'", f"{kind} needs a number of shots >= 1",
                                          f"write it as {kind}:K, e.g. {kind}:3"))
            return kind, int(k)
    return "model", 0


# --------------------------------------------------------------------------------------------------
# Scorer


Scorer = Callable[[str, str, dict], Any]


def load_scorer(spec: str) -> Scorer:
    """`module:function` or `path/to/file.py:function` -> the function (errors name the spec)."""
    module_name, sep, func_name = spec.rpartition(":")
    where = f"scorer '{spec}'"
    hint = "write it as module:function or path/to/file.py:function"
    if not sep or not module_name or not func_name:
        raise ConfigError(Problem(where, "not of the form module:function", hint))
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise ConfigError(Problem(where, f"file not found: {file}", hint))
            loader_spec = importlib.util.spec_from_file_location(file.stem, file)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TunekitError:
        raise
    except Exception as exc:  # the user's module failed to import: show why, not a traceback
        raise ConfigError(Problem(where, f"cannot import {module_name}: {type(exc).__name__}: {exc}", hint)) from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(Problem(where, f"{module_name} has no function {func_name}", hint))
    return func


def run_scorer(scorer: Scorer, prediction: str, reference: str, example: dict, where: str) -> dict[str, float]:
    """The scorer's value(s) as {"scorer": x} or {"scorer.key": x, ...}."""
    try:
        value = scorer(prediction, reference, example)
    except Exception as exc:  # user code: report with the example's place
        raise TunekitError(Problem(where, f"the scorer raised {type(exc).__name__}: {exc}",
                                   "fix the scorer; it is called as f(prediction, reference, example)")) from None
    if isinstance(value, bool) or not isinstance(value, int | float | dict):
        raise TunekitError(Problem(where, f"the scorer returned {type(value).__name__}",
                                   "return a float or a dict of floats"))
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TunekitError(Problem(where, f"the scorer returned {key!r}: {type(v).__name__}",
                                           "return a float or a dict of floats"))
            out[f"scorer.{key}"] = float(v)
        return out
    return {"scorer": float(value)}


# --------------------------------------------------------------------------------------------------
# Model computations: teacher forcing and generation


@dataclass
class TeacherForced:
    loss: float  # mean cross-entropy (nats) over trained tokens
    perplexity: float  # exp(loss)
    token_accuracy: float  # fraction of trained tokens where the argmax of the logits is the label
    trained_tokens: int


def _device(model):
    return next(model.parameters()).device


@dataclass
class RowForced:
    """One sequence under teacher forcing: summed over its trained positions (labels != IGNORE)."""

    nll: float  # nats: -log p of the trained tokens given everything before them
    correct: int  # trained tokens where the argmax of the logits is the label
    count: int  # trained tokens


def forced_rows(model, sequences: list[Sequence], *, batch_size: int, pad_id: int) -> list[RowForced]:
    """Per sequence, in input order: summed NLL and argmax hits at trained positions."""
    import torch
    import torch.nn.functional as F

    device = _device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    out: list[RowForced | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths -> less padding
    start = 0
    while start < len(order):
        longest = len(sequences[order[min(start + batch_size, len(order)) - 1]])
        rows = max(1, min(batch_size, LOGITS_BUDGET // max(1, longest * vocab)))
        picked_rows = order[start:start + rows]
        batch = [sequences[i] for i in picked_rows]
        start += rows
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):  # right padding: positions of real tokens are unchanged
            ids[row, :len(seq)] = torch.tensor(seq.input_ids)
            labels[row, :len(seq)] = torch.tensor(seq.labels)
            mask[row, :len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
        targets = labels[:, 1:].to(device)  # token t is predicted from positions < t
        trained = targets != IGNORE  # (B, T-1)
        which = trained.nonzero()[:, 0]  # (N,) the row of each trained position
        picked = logits[:, :-1][trained].float()  # (N, V) logits only at trained positions
        wanted = targets[trained]  # (N,)
        nll = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
            0, which, F.cross_entropy(picked, wanted, reduction="none").double())
        hits = torch.zeros(len(batch), dtype=torch.long, device=device).index_add_(
            0, which, (picked.argmax(-1) == wanted).long())
        counts = trained.sum(1)
        for row, i in enumerate(picked_rows):
            out[i] = RowForced(float(nll[row]), int(hits[row]), int(counts[row]))
    return [r for r in out if r is not None]


def teacher_forced(model, sequences: list[Sequence], *, batch_size: int, pad_id: int) -> TeacherForced:
    """Loss, perplexity and argmax accuracy at trained positions (labels != IGNORE), token-weighted."""
    return summarise_forced(forced_rows(model, sequences, batch_size=batch_size, pad_id=pad_id))


def summarise_forced(rows: list[RowForced]) -> TeacherForced:
    count = sum(r.count for r in rows)
    if count == 0:
        return TeacherForced(float("nan"), float("nan"), float("nan"), 0)
    loss = sum(r.nll for r in rows) / count
    return TeacherForced(loss, math.exp(min(loss, 700.0)), sum(r.correct for r in rows) / count, count)


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class CandidateResult:
    name: str
    kind: str
    path: str
    metrics: dict[str, float | None]  # rates in [0, 1]; loss / perplexity; cost; None where nothing applied
    counts: dict[str, int]  # examples each generation metric applied to
    shot_lines: list[int] = field(default_factory=list)  # training-file lines used as shots (few-shot)
    predictions: list[str] = field(default_factory=list)  # one per example, same order
    scores: list[dict[str, float]] = field(default_factory=list)  # per example, the metrics that applied
    prompt_tokens: list[int] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)  # per example: ended at an end-of-turn id
    example_shot_lines: list[list[int]] = field(default_factory=list)  # per example: its retrieved shots (rag)


@dataclass
class EvalResult:
    run_dir: str
    data: str
    examples: list[EvalExample]
    candidates: list[CandidateResult]
    settings: dict
    # What the run cost to train, from its summary.json: trained_tokens, steps, wall_time_s (None: not a run)
    training: dict | None = None

    def candidate(self, name: str) -> CandidateResult:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict:
        """Plain JSON-ready data: what results.json holds and what the report reads."""
        return {
            "run_dir": self.run_dir,
            "data": self.data,
            "n_examples": len(self.examples),
            "settings": self.settings,
            "metric_labels": METRIC_LABELS,
            "training": self.training,
            "candidates": [
                {"name": c.name, "kind": c.kind, "path": c.path, "metrics": c.metrics, "counts": c.counts,
                 "shot_lines": c.shot_lines}
                for c in self.candidates
            ],
            "examples": [
                {"line": ex.line, "reference": reference_display(ex.reference),
                 "predictions": {c.name: c.predictions[i] for c in self.candidates},
                 "scores": {c.name: c.scores[i] for c in self.candidates},
                 "prompt_tokens": {c.name: c.prompt_tokens[i] for c in self.candidates},
                 "shot_lines": {c.name: c.example_shot_lines[i] for c in self.candidates if c.example_shot_lines}}
                for i, ex in enumerate(self.examples)
            ],
        }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summarise(name: str, kind: str, path: str, tf: TeacherForced, predictions: list[str],
               scores: list[dict[str, float]], prompt_tokens: list[int], gens: list[Generation],
               shot_lines: list[int]) -> CandidateResult:
    keys = list(METRIC_LABELS) + sorted({k for s in scores for k in s if k not in METRIC_LABELS})
    metrics: dict[str, float | None] = {"loss": tf.loss, "perplexity": tf.perplexity,
                                        "token_accuracy": tf.token_accuracy}
    counts = {"trained_tokens": tf.trained_tokens}
    for key in keys:
        values = [s[key] for s in scores if key in s]
        metrics[key] = _mean(values)
        counts[key] = len(values)
    metrics["prompt_tokens"] = _mean([float(n) for n in prompt_tokens])
    metrics["new_tokens"] = _mean([float(len(g.ids)) for g in gens])
    metrics["latency_ms"] = _mean([g.latency_ms for g in gens])
    metrics["stopped"] = _mean([float(g.stopped) for g in gens])
    return CandidateResult(name, kind, path, metrics, counts, shot_lines, predictions, scores, prompt_tokens,
                           [g.latency_ms for g in gens], [g.stopped for g in gens])


# --------------------------------------------------------------------------------------------------
# Orchestration


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _check_model_path(path: Path, where: str) -> Problem | None:
    if not path.exists():
        return Problem(where, f"not found: {path}", "give a tunekit run dir or a saved model dir")
    if not (_is_model_dir(path) or (path / "final").is_dir()):
        return Problem(where, f"{path} holds no model (no final/, config.json or adapter_config.json)",
                       "give a finished run dir, its final/ or a checkpoint, or a saved model dir")
    return None


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _at(where: str, exc: TemplateError) -> TemplateError:
    """The same template problems, with the example's file:line in front."""
    return TemplateError([Problem(f"{where} {p.where}".strip(), p.message, p.hint) for p in exc.problems],
                         title=exc.title)


def _cached_lines(data: str, tokenizer, config: RunConfig | None) -> Callable[[int], list[Sequence] | None]:
    """The sequences that training's rendered-data cache holds for a line of the evaluation file (written now
    when there is no entry), or a function that always answers None when the run turned the cache off or the
    file cannot be rendered whole for training."""
    from tunekit.data.dataset import cached_store_if_whole

    if config is None or not config.data.cache:
        return lambda line: None
    store = cached_store_if_whole(Path(data), tokenizer, config.data)  # its options; the file is `data`
    return (lambda line: None) if store is None else store.line_sequences


def _run_candidate(model, tokenizer, spec: CandidateSpec, examples: list[EvalExample],
                   shots: list[list[tuple[int, dict]]], *, data: str, max_new_tokens: int, batch_size: int,
                   scorer: Scorer | None, log: Callable[[str], None],
                   cached: Callable[[int], list[Sequence] | None] = lambda line: None,
                   grading: Callable | None = None) -> CandidateResult:
    """shots: per example, the (training line, example) pairs placed before it ([] for none). cached: the
    rendered sequences of a line of the data file (training's cache), used for examples shown unchanged."""
    from tunekit.data.render import end_of_turn_ids, render_example, render_prompt

    # The prompt ends before the reference (the last assistant message); later messages play no part.
    asked = [{**ex.example, "messages": ex.example["messages"][:last_assistant(ex.example) + 1]} for ex in examples]
    shown = [with_shots(record, [ex for _, ex in pairs]) if pairs else record
             for record, pairs in zip(asked, shots, strict=True)]
    sequences: list[Sequence] = []
    prompts: list[list[int]] = []
    for ex, record, pairs in zip(examples, shown, shots, strict=True):
        unchanged = not pairs and len(record["messages"]) == len(ex.example["messages"])
        try:
            sequences += (cached(ex.line) if unchanged else None) or render_example(record, tokenizer)
            prompts.append(list(render_prompt(record, tokenizer)))
        except TemplateError as exc:
            raise _at(f"{data}:{ex.line}", exc) from None
    pad = _pad_id(tokenizer)
    log(f"{spec.name}: teacher-forced loss on {len(examples)} examples")
    tf = teacher_forced(model, sequences, batch_size=batch_size, pad_id=pad)
    log(f"{spec.name}: generating up to {max_new_tokens} tokens for {len(examples)} examples")
    gens = generate(model, prompts, stop_ids=list(end_of_turn_ids(tokenizer)), pad_id=pad,
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = [tokenizer.decode(g.ids, skip_special_tokens=False).strip() for g in gens]
    scores = []
    for ex, prediction in zip(examples, predictions, strict=True):
        s = score_example(prediction, ex.reference)
        if scorer is not None:
            s.update(run_scorer(scorer, prediction, reference_display(ex.reference), ex.example,
                                f"{data}:{ex.line}"))
        scores.append(s)
    failed: dict[str, int] = {}
    if grading is not None:
        log(f"{spec.name}: grading {len(predictions)} replies")
        graded, failed = grading(predictions)
        for s, g in zip(scores, graded, strict=True):
            s.update(g)
    shot_lines = [line for line, _ in shots[0]] if spec.kind == "few-shot" and shots else []
    result = _summarise(spec.name, spec.kind, spec.path, tf, predictions, scores, [len(p) for p in prompts], gens,
                        shot_lines)
    for name, n in failed.items():  # grades that failed (scored 0), per grader
        result.metrics[f"grader.{name}.errors"] = float(n)
    if spec.kind == "rag":
        result.example_shot_lines = [[line for line, _ in pairs] for pairs in shots]
    return result


def plan_candidates(run_dir: Path, config: RunConfig | None, baselines: list[str],
                    models: list[str | Path]) -> tuple[list[CandidateSpec], list[Problem]]:
    """The candidates in report order (the tuned run first) and every problem found in the request."""
    specs = [CandidateSpec("fine-tuned", "tuned", str(run_dir))]
    problems = []
    names = {"fine-tuned"}
    others = [str(m) for m in models]
    for spec in baselines:
        try:
            kind, k = parse_baseline(spec)
        except ConfigError as exc:
            problems += exc.problems
            continue
        if kind == "model":
            others.append(spec)
            continue
        if config is None:
            problems.append(Problem(str(run_dir / "config.yaml"), f"not found; baseline '{spec}' needs the "
                                    "run's base model (model.base)", "evaluate a tunekit run dir, or compare "
                                    "against a model dir with --model"))
            continue
        name = "base" if kind == "base" else f"{kind}:{k}"
        if name not in names:
            specs.append(CandidateSpec(name, kind, config.model.base, k))
            names.add(name)
    for other in others:
        problem = _check_model_path(Path(other), f"model '{other}'")
        if problem:
            problems.append(problem)
            continue
        name = Path(other).name or other
        while name in names:
            name += "'"
        specs.append(CandidateSpec(name, "model", other))
        names.add(name)
    return specs, problems


def evaluate(run_dir: str | Path, data: str | Path | None = None, *, baselines: list[str] | tuple[str, ...] | None = None,
             models: list[str | Path] | tuple = (), max_new_tokens: int = 256, batch_size: int = 8,
             limit: int | None = None, scorer: str | None = None, seed: int = 0,
             device: str = "auto", config: RunConfig | None = None, graders: list[str | Path] | tuple = (),
             log: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate the run at `run_dir` and its baselines on the chat examples of `data` (or, for a file of
    preference pairs, on which reply of each pair each candidate finds more likely: eval/preference.py).

    data: a JSONL file of chat examples (default: eval.data, else data.validation of the run's config).
    baselines: "base" (model.base zero-shot), "few-shot:K" (the base with K training examples as earlier
    turns, the same K for every example), "rag:K" (the base with, for each example, the K training examples
    whose prompts are most similar to its prompt, retrieved by BM25: `retrieve_shots`), or a model dir /
    run dir; default ["base"] when the run has a config.yaml. models: more model
    dirs or runs to compare. device: "auto" (cuda when available), "cpu" or "cuda". config: the run's
    RunConfig (read from run_dir/config.yaml when not given). graders: OpenAI grader files (JSON / YAML) that
    score every candidate's replies (eval/grading.py).
    Raises TunekitError listing every problem before any weight loads.
    """
    import torch


    log = log or (lambda message: None)
    run_dir = Path(run_dir)
    problem = _check_model_path(run_dir, "run dir")
    if problem:
        raise TunekitError(problem, title="cannot evaluate")
    if config is None and (run_dir / "config.yaml").is_file():
        config = load_config(run_dir / "config.yaml", check_files=False)

    if baselines is None:
        baselines = ["base"] if config is not None else []
    problems: list[Problem] = []
    if device not in ("auto", "cpu", "cuda"):
        problems.append(Problem("device", f"unknown device '{device}'", "use auto, cpu or cuda"))
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append(Problem("device", "cuda was asked for but torch sees no GPU", "use --device cpu or auto"))
    if data is None:
        data = config.eval.data or config.data.validation if config is not None else None
        if data is None:
            problems.append(Problem("--data", "no evaluation data given and the run names none",
                                    "pass --data valid.jsonl (held-out chat examples)"))
    specs, plan_problems = plan_candidates(run_dir, config, list(baselines), list(models))
    problems += plan_problems
    settings = {"baselines": list(baselines), "models": [str(m) for m in models], "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "limit": limit, "scorer": scorer, "seed": seed, "decoding": "greedy",
                "graders": [str(g) for g in graders]}
    from tunekit.eval.preference import evaluate_preference, is_preference_file

    if not problems and data is not None and is_preference_file(data):
        if graders:
            raise TunekitError(Problem("--grader", "graders score generated replies; a preference file is scored by "
                                       "the likelihood of both given replies", "leave --grader out for a preference "
                                       "file"), title="cannot evaluate")
        return evaluate_preference(run_dir, data, specs, batch_size=batch_size, limit=limit, device=device,
                                   config=config, settings={**settings, "shots_from": None}, log=log)
    examples: list[EvalExample] = []
    if data is not None:
        try:
            examples = read_eval_examples(data, limit=limit)
        except DataError as exc:
            problems += exc.problems
    grader_list: list[dict] = []
    judges: dict[str, str] = {}
    if graders:
        from tunekit.eval.grading import judge_models, load_grader_files

        item_keys = set.intersection(*(set(e.example) for e in examples)) if examples else None
        grader_list, grader_problems = load_grader_files(list(graders), item_keys)
        problems += grader_problems
        for name in sorted(judge_models(grader_list)):
            spec_path = next((s.path for s in specs if s.name == name), None)
            if spec_path is None and _check_model_path(Path(name), name) is not None:
                problems.append(Problem(f"--grader: model {name!r}", "a judge model must be a candidate's name "
                                        f"({', '.join(s.name for s in specs)}) or a local model dir or run",
                                        "set the grader's model to one of those"))
            judges[name] = spec_path or name
    scorer_fn = None
    if scorer:
        try:
            scorer_fn = load_scorer(scorer)
        except TunekitError as exc:
            problems += exc.problems
    # Per candidate name, per example: the (training line, example) pairs shown before it.
    shots_by_name: dict[str, list[list[tuple[int, dict]]]] = {}
    if examples and config is not None:
        evaluated = [e.example for e in examples]
        for spec in specs:
            try:
                if spec.kind == "few-shot":
                    shots_by_name[spec.name] = [choose_shots(config.data.train, evaluated, spec.shots, seed)] * len(examples)
                elif spec.kind == "rag":
                    shots_by_name[spec.name] = retrieve_shots(config.data.train, evaluated, spec.shots)
            except (DataError, ConfigError) as exc:
                problems += exc.problems
    if problems:
        raise TunekitError(problems, title="cannot evaluate")

    # One load per distinct model; base zero-shot and few-shot share it. The tuned run's tokenizer is
    # used for its base when the vocabularies agree, so every candidate sees the same prompt text.
    results: dict[str, CandidateResult] = {}
    with ExitStack() as stack:  # the python graders' sandbox, stopped however this ends
        grading = None
        if grader_list:
            from tunekit.eval.graders import PythonSandbox, leaf_graders
            from tunekit.eval.grading import LocalJudge, grade_replies

            sandbox = stack.enter_context(PythonSandbox(workers=2)) if any(
                g.get("type") == "python" for grader in grader_list for g in leaf_graders(grader)) else None
            judge = LocalJudge(judges, device=device)

            def grading(predictions: list[str]) -> tuple[list[dict[str, float]], dict[str, int]]:
                return grade_replies(grader_list, [e.example for e in examples], predictions, judge=judge,
                                     sandbox=sandbox, where=[f"{data}:{e.line}" for e in examples], log=log)
        for path, (model, tokenizer) in loaded_models(specs, run_dir, device, log):
            cached = _cached_lines(str(data), tokenizer, config) if limit is None else (lambda line: None)
            for spec in (s for s in specs if s.path == path):
                shots = shots_by_name.get(spec.name) or [[] for _ in examples]
                results[spec.name] = _run_candidate(
                    model, tokenizer, spec, examples, shots, data=str(data), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, scorer=scorer_fn, log=log, cached=cached, grading=grading)
            del model  # freed before the next one loads

    settings["shots_from"] = str(config.data.train) if config is not None and shots_by_name else None
    return EvalResult(str(run_dir), str(data), examples, [results[s.name] for s in specs], settings,
                      training_cost(run_dir))


def loaded_models(specs: list[CandidateSpec], run_dir: Path, device: str, log: Callable[[str], None]):
    """Each distinct model of `specs` loaded once, in order, as (path, (model, tokenizer)); each is let go before
    the next loads (the caller drops its own reference at the end of its loop body). The tuned run's tokenizer
    is used for its base when the vocabularies agree, so every candidate sees the same prompt text."""
    import torch

    from tunekit.model import load_for_inference, resolve_device

    run_tokenizer = None
    for path in dict.fromkeys(s.path for s in specs):
        log(f"loading {path}")
        loaded = load_for_inference(path, device=resolve_device(device))
        tokenizer = loaded[1]
        if path == str(run_dir):
            run_tokenizer = tokenizer
        elif run_tokenizer is not None and any(s.path == path and s.kind != "model" for s in specs) \
                and len(run_tokenizer) == len(tokenizer):
            tokenizer = run_tokenizer
        yield path, (loaded[0], tokenizer)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def training_cost(run_dir: Path) -> dict | None:
    """trained_tokens, steps and wall_time_s of a finished run (its summary.json), None when it has none."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    cost = {key: summary.get(key) for key in ("trained_tokens", "steps", "wall_time_s")}
    return cost if all(isinstance(v, int | float) for v in cost.values()) else None


def evaluate_from_config(cfg: RunConfig, run_dir: str | Path, *, log: Callable[[str], None] | None = None,
                         out_dir: str | Path | None = None) -> EvalResult:
    """The `eval` section of a run config: evaluate the finished run and write RUN_DIR/eval/ (the report)."""
    from tunekit.eval.report import write_report

    data = cfg.eval.data or cfg.data.validation
    if data is None:
        raise ConfigError(Problem("eval.data", "eval is enabled but there is no held-out file",
                                  "set eval.data or data.validation (a file the run did not train on)"))
    result = evaluate(run_dir, data, baselines=cfg.eval.baselines, max_new_tokens=cfg.eval.max_new_tokens,
                      batch_size=cfg.eval.batch_size, limit=cfg.eval.limit, scorer=cfg.eval.scorer,
                      seed=cfg.eval.seed, device=cfg.train.device, config=cfg, log=log)
    write_report(result.to_dict(), Path(out_dir) if out_dir else Path(run_dir) / "eval",
                 metrics_path=Path(run_dir) / "metrics.jsonl")
    return result
