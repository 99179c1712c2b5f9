"""Preference evaluation: on held-out pairs, does a model give the preferred reply the higher likelihood?

For each pair the prompt is rendered once with the candidate's chat template (`render_pair`), both replies
are scored by teacher forcing, and the pair counts as won when log p(preferred | prompt) is higher than
log p(non-preferred | prompt) (`preference_accuracy`), and also per token, so that a model preferring short
replies is visible (`preference_accuracy_normalized`). `preference_margin` is the mean of
log p(preferred) - log p(non-preferred) in nats; held-out loss, perplexity and token accuracy are those of
the preferred replies. Ties count half. No text is generated here.

The result has the shape of a chat evaluation (`EvalResult`), so the same report, verdict and results.json
serve both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tunekit.config import RunConfig
from tunekit.data.preference import Preference, pair_sequences, preference_form, read_preference, render_pair
from tunekit.errors import DataError, Problem, TunekitError
from tunekit.eval.evaluate import (
    CandidateResult,
    CandidateSpec,
    EvalExample,
    EvalResult,
    _pad_id,
    forced_rows,
    loaded_models,
    summarise_forced,
    training_cost,
)
from tunekit.eval.metrics import Reference, reference_of
from tunekit.eval.shots import jsonl_records

SCORES = ("preference_accuracy", "preference_accuracy_normalized", "preference_margin")


def is_preference_file(path: str | Path) -> bool:
    """The first readable record of a JSONL file is a preference pair (either wire form)."""
    try:
        for _, record, error in jsonl_records(Path(path)):
            if not error:
                return preference_form(record) is not None
    except (OSError, TunekitError):
        return False  # unreadable: the chat reader names the problem
    return False


def read_eval_pairs(path: str | Path, *, limit: int | None = None) -> list[tuple[int, dict, Preference]]:
    """(line, record, pair) for the first `limit` pairs; every unusable line reported at once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(Problem(str(path), "evaluation data file not found",
                                "pass --data with a JSONL file of preference pairs"))
    pairs, problems = [], []
    for line, record, error in jsonl_records(path):
        if limit is not None and len(pairs) >= limit:
            break
        where = f"{path}:{line}"
        if error:
            problems.append(Problem(where, error, "fix the line or check the file with `tunekit data check`"))
            continue
        try:
            pairs.append((line, record, read_preference(record)))
        except DataError as exc:
            problems += [Problem(f"{where} {p.where}".strip(), p.message, p.hint) for p in exc.problems]
    if problems:
        raise DataError(problems, title=f"{path}: cannot evaluate on this file")
    if not pairs:
        raise DataError(Problem(str(path), "the file holds no pairs", "give a JSONL file of preference pairs"))
    return pairs


def _reference(pref: Preference) -> Reference:
    """The preferred reply, as the report shows a reference answer."""
    if isinstance(pref.chosen, str):
        return Reference(text=pref.chosen)
    return reference_of({"messages": [pref.chosen]})


def score_candidate(model, tokenizer, spec: CandidateSpec, pairs: list[tuple[int, dict, Preference]], *,
                    data: str, batch_size: int) -> CandidateResult:
    """Both replies of every pair scored by `model` with its tokenizer's template."""
    rendered, problems = [], []
    for line, _, pref in pairs:
        try:
            rendered.append(render_pair(pref, tokenizer))
        except TunekitError as exc:
            problems += [Problem(f"{data}:{line} {p.where}", p.message, p.hint) for p in exc.problems]
    if problems:
        raise TunekitError(problems, title=f"cannot render the pairs with the template of {spec.path}")
    sequences = [seq for pair in rendered for seq in pair_sequences(pair)]  # chosen, rejected, chosen, ...
    rows = forced_rows(model, sequences, batch_size=batch_size, pad_id=_pad_id(tokenizer))
    chosen, rejected = rows[0::2], rows[1::2]
    scores, predictions = [], []
    for c, r in zip(chosen, rejected, strict=True):
        lc, lr = -c.nll, -r.nll  # log p of each reply given the prompt (nats)
        pc, pr = lc / max(1, c.count), lr / max(1, r.count)  # per token
        scores.append({"preference_accuracy": 1.0 if lc > lr else 0.5 if lc == lr else 0.0,
                       "preference_accuracy_normalized": 1.0 if pc > pr else 0.5 if pc == pr else 0.0,
                       "preference_margin": lc - lr})
        predictions.append(f"log p(preferred) {lc:.3f} vs log p(non-preferred) {lr:.3f} nats; per token "
                           f"{pc:.4f} vs {pr:.4f}")
    tf = summarise_forced(chosen)
    metrics: dict[str, float | None] = {"loss": tf.loss, "perplexity": tf.perplexity,
                                        "token_accuracy": tf.token_accuracy}
    counts = {"trained_tokens": tf.trained_tokens}
    for key in SCORES:
        metrics[key] = sum(s[key] for s in scores) / len(scores)
        counts[key] = len(scores)
    prompt_tokens = [len(pair.prompt) for pair in rendered]
    metrics.update(prompt_tokens=sum(prompt_tokens) / len(prompt_tokens), new_tokens=None, latency_ms=None,
                   stopped=None)
    return CandidateResult(spec.name, spec.kind, spec.path, metrics, counts, [], predictions, scores, prompt_tokens,
                           [], [])


def evaluate_preference(run_dir: Path, data: str | Path, specs: list[CandidateSpec], *, batch_size: int,
                        limit: int | None, device: str, config: RunConfig | None, settings: dict,
                        log: Callable[[str], None]) -> EvalResult:
    """Each candidate (the tuned run first) scored on the pairs of `data`. Few-shot and retrieval baselines
    do not apply to likelihoods of fixed replies and are refused, as is a scorer (nothing is generated)."""


    problems = [Problem("--baseline", f"'{s.name}' applies to chat data (it adds examples to the prompt)",
                        "compare preference pairs against base or a model dir")
                for s in specs if s.kind in ("few-shot", "rag")]
    if settings.get("scorer"):
        problems.append(Problem("--scorer", "a scorer reads generated replies; preference pairs are scored by the "
                                            "likelihood of both given replies", "leave --scorer out for a preference file"))
    pairs: list[tuple[int, dict, Preference]] = []
    try:
        pairs = read_eval_pairs(data, limit=limit)
    except DataError as exc:
        problems += exc.problems
    if problems:
        raise TunekitError(problems, title="cannot evaluate")

    results: dict[str, CandidateResult] = {}
    for path, (model, tokenizer) in loaded_models(specs, run_dir, device, log):
        for spec in (s for s in specs if s.path == path):
            log(f"scoring {len(pairs)} pairs with {spec.name}")
            results[spec.name] = score_candidate(model, tokenizer, spec, pairs, data=str(data), batch_size=batch_size)
        del model  # freed before the next one loads
    examples = [EvalExample(line, record, _reference(pref)) for line, record, pref in pairs]
    settings = {**settings, "kind": "preference", "decoding": None, "max_new_tokens": None}
    return EvalResult(str(run_dir), str(data), examples, [results[s.name] for s in specs], settings,
                      training_cost(run_dir))
