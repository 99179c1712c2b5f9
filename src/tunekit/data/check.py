"""`check_file`: every problem of a data file at once, plus length statistics and an epoch estimate.

One streaming pass per file. Per-example numbers are kept in compact `array`s (4-8 bytes each) and
duplicates are found from 8-byte content digests, so memory grows by well under 100 bytes per example
(columns, digests and the sort that finds repeats) and never with the size of the examples themselves.

Token statistics need a tokenizer: the caller passes `count_fn(example) -> list[Sequence]` (by default
`render_example` bound to the tokenizer), so these numbers are exactly what training will see.
Without one, characters are counted instead and a note says token counts need `--model`.

Percentiles (p5, median, p95) are linear interpolation between the closest ranks (numpy's default,
equal to `statistics.quantiles(..., method="inclusive")`).

A preference file (`tunekit.data.preference`: OpenAI's DPO lines or TRL's chosen / rejected pairs, recognised by
its first record or given as fmt="preference") gets its own statistics, `PreferenceStats`, in the report's
`preference` (its `stats` is None): the pairs, the prompt's and each reply's lengths as `render_pair` renders them
with the tokenizer, what max_len does to them (a reply is never cut: "drop" leaves the pair out, "truncate" cuts
the prompt's first tokens and refuses a pair whose reply alone does not fit) and the pairs whose replies differ
only in whitespace. Each pair is rendered in this process (no cache, no worker pool).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunekit.data.formats import (
    MAX_LINE_BYTES,
    DataIssue,
    Format,
    Severity,
    check_readable,
    detect_format,
    read_jsonl,
    record_digest,
    validate_in_file,
)
from tunekit.data.types import Sequence
from tunekit.errors import TunekitError

MAX_STORED_PROBLEMS = 1000  # problems kept with their details; all are counted
MIN_EXAMPLES = 10  # fewer -> too_few_examples (the OpenAI fine-tuning minimum)

# The OpenAI cookbook's default epoch rule: aim for 3 epochs, but see at least ~100 and at most
# ~25000 examples in total.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

CountFn = Callable[[dict], list[Sequence]]


def recommended_epochs(n_examples: int) -> int:
    """Epochs for `n_examples` by the OpenAI cookbook rule (3, more for tiny sets, fewer for huge ones)."""
    if n_examples < 1:
        raise ValueError("recommended_epochs needs at least one example")
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


@dataclass
class Summary:
    """Distribution of one per-example number."""

    total: int
    min: float
    max: float
    mean: float
    median: float
    p5: float
    p95: float


def summarize(values: array | list[int]) -> Summary | None:
    """min / max / mean / median / p5 / p95 (linear interpolation between closest ranks); None if empty."""
    if len(values) == 0:
        return None
    a = np.asarray(values)  # an array.array is wrapped through the buffer protocol, not copied
    p5, median, p95 = np.percentile(a, [5, 50, 95])
    return Summary(total=int(a.sum()), min=float(a.min()), max=float(a.max()), mean=float(a.mean()),
                   median=float(median), p5=float(p5), p95=float(p95))


@dataclass
class Stats:
    examples: int
    unit: Literal["tokens", "characters"]
    messages: Summary | None  # messages per example (chat files)
    length: Summary | None  # tokens (or characters) per example, all sequences of the example
    trained: Summary | None  # trained tokens (or characters) per example
    max_len: int | None = None
    truncation: Literal["drop", "truncate"] = "drop"  # what training does with sequences over max_len
    over_max_len: int = 0  # examples with a sequence longer than max_len (tokens only)
    trained_lost: int = 0  # trained tokens dropped or cut away with those sequences
    epochs: int | None = None  # recommended_epochs(examples)
    # Per epoch, exactly as training fits the sequences (tunekit.data.dataset.fit_to_max_len): every
    # token processed, and the tokens that carry loss. Compute and cost follow the first.
    tokens_per_epoch: int | None = None
    trained_tokens_per_epoch: int | None = None
    estimated_tokens: int | None = None  # epochs x tokens_per_epoch
    estimated_trained_tokens: int | None = None  # epochs x trained_tokens_per_epoch
    without_system_message: int | None = None  # chat examples with no system message
    without_user_message: int | None = None  # chat examples with an assistant reply but no user message


@dataclass
class PreferenceStats:
    """A preference file's numbers: per valid pair, the prompt's and each reply's length (tokens as `render_pair`
    renders them, or characters without a tokenizer), and what max_len does to the pairs."""

    pairs: int
    unit: Literal["tokens", "characters"]
    forms: dict[str, int]  # valid pairs per wire form: "openai", "trl" (messages), "trl-text"
    prompt: Summary | None
    chosen: Summary | None  # the preferred reply
    rejected: Summary | None  # the non-preferred reply
    whitespace_only: int = 0  # pairs whose replies differ only in whitespace (preference_whitespace_only warnings)
    whitespace_only_share: float = 0.0  # of the valid pairs
    epochs: int | None = None  # recommended_epochs(pairs)
    max_len: int | None = None
    truncation: Literal["drop", "truncate"] = "drop"
    over_max_len: int = 0  # pairs with a side (prompt + reply) longer than max_len, refused ones included
    dropped: int = 0  # "drop": pairs left out for it
    prompt_cut: int = 0  # "truncate": pairs kept with the prompt's first tokens cut, both replies whole
    completion_cut: int = 0  # "truncate": pairs refused, a reply alone does not fit (preference_completion_cut)


@dataclass
class CheckReport:
    path: str
    format: Format | None
    lines: int
    examples: int  # records without errors (the ones statistics describe)
    problems: list[DataIssue]  # the first MAX_STORED_PROBLEMS, by file then line
    counts: dict[str, int]  # code -> how many, counting every problem
    severities: dict[str, Severity]  # code -> its severity
    stats: Stats | None
    validation: str | None = None
    validation_examples: int | None = None
    notes: list[str] = field(default_factory=list)
    preference: PreferenceStats | None = None  # the statistics of a preference file (stats is None then)

    def count(self, severity: Severity) -> int:
        return sum(n for code, n in self.counts.items() if self.severities[code] == severity)

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def to_dict(self) -> dict:
        out = {
            "path": self.path, "validation": self.validation, "format": self.format, "lines": self.lines,
            "examples": self.examples, "validation_examples": self.validation_examples,
            "errors": self.errors, "warnings": self.warnings, "ok": self.ok,
            "counts": dict(self.counts), "severities": dict(self.severities),
            "problems": [p.to_dict() for p in self.problems], "problems_stored": len(self.problems),
            "stats": asdict(self.stats) if self.stats else None, "notes": list(self.notes),
        }
        if self.format == "preference":
            out["preference"] = asdict(self.preference) if self.preference else None
        return out


class _Problems:
    """Counts every problem; keeps the details of the first MAX_STORED_PROBLEMS of each severity, so
    thousands of notes never crowd out an error further down the file."""

    def __init__(self) -> None:
        self.stored: list[DataIssue] = []
        self.stored_per: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.severities: dict[str, Severity] = {}

    def add(self, issue: DataIssue) -> None:
        self.counts[issue.code] += 1
        self.severities.setdefault(issue.code, issue.severity)
        if self.stored_per[issue.severity] < MAX_STORED_PROBLEMS:
            self.stored_per[issue.severity] += 1
            self.stored.append(issue)


@dataclass
class _Scan:
    """What one pass over a file keeps: compact per-example columns, nothing of the examples."""

    format: Format | None = None
    lines: int = 0
    line_of: array = field(default_factory=lambda: array("I"))  # line number of each valid example
    digests: array = field(default_factory=lambda: array("Q"))  # 8-byte content digest of each
    messages: array = field(default_factory=lambda: array("I"))
    length: array = field(default_factory=lambda: array("Q"))  # tokens or characters
    trained: array = field(default_factory=lambda: array("Q"))
    over_max_len: int = 0
    trained_lost: int = 0
    tokens_fitting: int = 0  # tokens of the sequences training keeps (after dropping or cutting)
    trained_fitting: int = 0  # trained tokens of those
    without_system: int = 0
    without_user: int = 0


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _char_counts(record: dict, fmt: Format) -> tuple[int, int]:
    """(characters, trained characters) of a valid record: text plus tool-call arguments."""
    if fmt == "text":
        n = len(record["text"])
        return n, n
    if fmt == "completion":
        return len(record["prompt"]) + len(record["completion"]), len(record["completion"])
    total = trained = 0
    for msg in record["messages"]:
        n = len(_text(msg.get("content")))
        for call in msg.get("tool_calls") or []:
            n += len(call["function"]["name"]) + len(call["function"].get("arguments") or "")
        if msg.get("function_call"):
            n += len(msg["function_call"]["name"]) + len(msg["function_call"].get("arguments") or "")
        total += n
        if msg["role"] == "assistant" and msg.get("weight", 1) != 0:
            trained += n
    return total, trained


def _scan(path: Path, fmt: Format | None, problems: _Problems, *, stats: bool,
          count_fn: CountFn | None, max_len: int | None, max_line_bytes: int,
          truncation: Literal["drop", "truncate"] = "drop", store: Any = None) -> _Scan:
    """One pass over a file. `store` (a `tunekit.data.cache.Store` of this file) gives each line's token counts
    where it has the line, from its arrays; `count_fn` renders the others."""
    scan = _Scan(format=fmt)
    label = str(path)
    stored: dict = {}
    if count_fn is not None and stats:
        from tunekit.data.dataset import (  # token statistics: dataset imports torch
            example_stats,
            fit_to_max_len,
        )

        if store is not None:
            stored = example_stats(store, max_len, truncation)
    for line in read_jsonl(path, max_line_bytes=max_line_bytes):
        scan.lines = line.number
        for issue in line.issues:
            problems.add(_placed(issue, label, line.number))
        if line.record is None:
            continue
        used, issues = validate_in_file(line.record, scan.format)
        counted = stored.get(line.number)
        if count_fn is not None and counted is None and not any(i.severity == "error" for i in issues):
            try:
                sequences = count_fn(line.record)
            except TunekitError as exc:  # e.g. a TemplateError for this example
                message = "; ".join(p.message for p in exc.problems) or str(exc)
                hints = [p.hint for p in exc.problems if p.hint]
                field = exc.problems[0].where if exc.problems else ""
                issues.append(DataIssue("render_failed", field, f"cannot render with the tokenizer: {message}",
                                        hints[0] if hints else "see `tunekit data preview` for this line"))
        for issue in issues:
            problems.add(_placed(issue, label, line.number))
        if any(i.severity == "error" for i in issues):
            continue
        scan.format = scan.format or used  # fixed by the first valid record
        scan.line_of.append(line.number)
        scan.digests.append(record_digest(line.record))
        if not stats:
            continue
        if used == "chat":
            scan.messages.append(len(line.record["messages"]))
            roles = {m["role"] for m in line.record["messages"]}
            scan.without_system += "system" not in roles
            scan.without_user += "user" not in roles
        if count_fn is None:
            total, trained = _char_counts(line.record, used)
        elif counted is not None:
            total, trained, over, lost, fitting, trained_fitting = counted
            scan.over_max_len += over
            scan.trained_lost += lost
            scan.tokens_fitting += fitting
            scan.trained_fitting += trained_fitting
        else:
            total = sum(len(s) for s in sequences)
            trained = sum(s.num_trained for s in sequences)
            _, fit = fit_to_max_len(sequences, max_len or max(total, 1), truncation)  # as training does
            scan.over_max_len += bool(fit.dropped_too_long or fit.truncated)
            scan.trained_lost += fit.dropped_trained_tokens + fit.lost_trained_tokens
            scan.tokens_fitting += fit.tokens
            scan.trained_fitting += fit.trained_tokens
        scan.length.append(total)
        scan.trained.append(trained)
    return scan


def _overlap(scan: Any, vscan: Any, sd: np.ndarray, order: np.ndarray, path: Path, validation: Path,
             problems: _Problems) -> None:
    """train_valid_overlap for each validation example whose digest is in the training file's sorted `sd`."""
    v = np.frombuffer(vscan.digests, dtype=np.uint64) if len(vscan.digests) else np.zeros(0, np.uint64)
    pos = np.searchsorted(sd, v)
    hit = (pos < len(sd)) & (sd[np.minimum(pos, len(sd) - 1)] == v) if len(sd) else np.zeros(len(v), bool)
    for k in np.flatnonzero(hit):
        train_line = scan.line_of[int(order[pos[k]])]  # stable sort: the first train line with it
        problems.add(DataIssue("train_valid_overlap", "", f"also in the training file {path} at line {train_line}",
                               "remove it from one of the files: a validation example seen in training "
                               "makes validation loss look better than it is", "warning",
                               vscan.line_of[int(k)], str(validation)))


def _count_problem(n: int, path: Path, problems: _Problems) -> None:
    if n == 0:
        problems.add(DataIssue("no_examples", "", "no valid examples in the file",
                               "add one JSON object per line (see the problems above)", "error", None, str(path)))
    elif n < MIN_EXAMPLES:
        problems.add(DataIssue("too_few_examples", "", f"only {n} valid examples",
                               f"at least {MIN_EXAMPLES} are needed to learn anything; 50-100 is a better start",
                               "warning", None, str(path)))


def _placed(issue: DataIssue, file: str, line: int | None) -> DataIssue:
    return DataIssue(issue.code, issue.path, issue.message, issue.hint, issue.severity,
                     line if issue.line is None else issue.line, file, issue.column)


def _sorted_digests(digests: array) -> tuple[np.ndarray, np.ndarray]:
    """(sorted digests, order): a stable sort, so among equal digests the earliest line comes first."""
    d = np.frombuffer(digests, dtype=np.uint64) if len(digests) else np.zeros(0, dtype=np.uint64)
    order = np.argsort(d, kind="stable")  # (N,) int64
    return d[order], order


def _duplicates(scan: Any, label: str, problems: _Problems) -> tuple[np.ndarray, np.ndarray]:
    sd, order = _sorted_digests(scan.digests)
    repeats = np.flatnonzero(sd[1:] == sd[:-1]) + 1  # sorted positions equal to the one before
    firsts = order[np.searchsorted(sd, sd[repeats], side="left")]  # earliest example with that digest
    found = sorted((scan.line_of[int(order[p])], scan.line_of[int(f)]) for p, f in zip(repeats, firsts, strict=True))
    for line, earlier in found:
        problems.add(DataIssue("duplicate_example", "", f"same content as line {earlier}",
                               "drop the repeat (it is trained twice as often)", "warning", line, label))
    return sd, order


def _cache_entry(path: Path, tokenizer: Any, fmt: str, max_line_bytes: int, num_workers: int | str) -> Any:
    """The data cache's entry for `path` rendered with `tokenizer` (training's default options), written now
    when there is none; None when the file cannot be rendered whole (the scan then reports each line) or the
    cache folder cannot be written."""
    from tunekit.config import DataConfig
    from tunekit.data.dataset import cached_store_if_whole

    if max_line_bytes != MAX_LINE_BYTES:  # training reads lines of any length: its entry may hold more
        return None
    return cached_store_if_whole(path, tokenizer, DataConfig(train=path, format=fmt, num_workers=num_workers))


def check_file(path: str | Path, *, validation: str | Path | None = None, tokenizer: Any = None,
               max_len: int | None = None, count_fn: CountFn | None = None,
               fmt: Literal["auto", "chat", "completion", "text", "preference"] = "auto",
               max_line_bytes: int = MAX_LINE_BYTES, truncation: Literal["drop", "truncate"] = "drop",
               cache: bool = True, num_workers: int | Literal["auto"] = "auto") -> CheckReport:
    """Check a training file (and optionally a validation file) in one streaming pass each.

    `count_fn(example) -> list[Sequence]` gives token statistics; when None and a tokenizer is given, the
    rendered-data cache that training reads gives them (`cache`: the entry is written first when there is
    none, so a later `tunekit train` on the file reuses it), and `tunekit.data.render.render_example` bound to
    the tokenizer where the file cannot be rendered whole. Raises DataError only when a file cannot be opened
    at all (missing, a directory); everything else is a problem in the report. A line longer than
    `max_line_bytes` is reported (`line_too_long`) and never loaded. `num_workers`: processes that render
    (1: in this process, as a server does). A preference file is checked as pairs (see the module doc).
    """
    path = check_readable(path)
    if validation is not None:
        validation = check_readable(validation)
    problems = _Problems()
    if tokenizer is not None and count_fn is None and getattr(tokenizer, "chat_template", None):
        from tunekit.data.render import template_problems

        unusable = template_problems(tokenizer)
        for problem in unusable:  # the tokenizer's fault, said once: the lines are checked without it
            problems.add(DataIssue("template_unusable", problem.where, problem.message, problem.hint or "",
                                   "error", None, None))
        if unusable:
            tokenizer = None
    if fmt == "preference" or (fmt == "auto" and _first_format(path, max_line_bytes) == "preference"):
        return _check_pairs(path, validation, problems, tokenizer=tokenizer, max_len=max_len, truncation=truncation,
                            max_line_bytes=max_line_bytes)
    store = None
    if count_fn is None and tokenizer is not None and cache:
        store = _cache_entry(path, tokenizer, fmt, max_line_bytes, num_workers)
        if store is not None:
            from tunekit.data.render import render_example

            def count_fn(example: dict) -> list:  # a line the entry has no sequences for
                return render_example(example, tokenizer)
    if count_fn is None and tokenizer is not None:
        from tunekit.data.workers import rendered_ahead  # imported here: only token statistics need it

        # render_example for each record, rendered ahead on every core in file order
        count_fn = rendered_ahead(path, tokenizer, fmt=None if fmt == "auto" else fmt,
                                  max_line_bytes=max_line_bytes, num_workers=num_workers)

    scan = _scan(path, None if fmt == "auto" else fmt, problems, stats=True, count_fn=count_fn, max_len=max_len,
                 max_line_bytes=max_line_bytes, truncation=truncation, store=store)
    sd, order = _duplicates(scan, str(path), problems)
    n = len(scan.line_of)

    validation_examples = None
    if validation is not None:
        render = None
        if tokenizer is not None:  # validation lines must render as training lines do
            from tunekit.data.render import render_example

            def render(example: dict) -> list:
                return render_example(example, tokenizer)
        vscan = _scan(validation, scan.format, problems, stats=False, count_fn=render, max_len=None,
                      max_line_bytes=max_line_bytes)
        validation_examples = len(vscan.line_of)
        _duplicates(vscan, str(validation), problems)
        _overlap(scan, vscan, sd, order, path, validation, problems)
    _count_problem(n, path, problems)

    notes = []
    stats = None
    if n:
        unit = "characters" if count_fn is None else "tokens"
        stats = Stats(examples=n, unit=unit, messages=summarize(scan.messages), length=summarize(scan.length),
                      trained=summarize(scan.trained), epochs=recommended_epochs(n))
        if scan.format == "chat":
            stats.without_system_message, stats.without_user_message = scan.without_system, scan.without_user
        if count_fn is None:
            notes.append("lengths are in characters; token counts, max-length and trained-token estimates "
                         "need a tokenizer (--model)")
        else:
            stats.max_len = max_len
            stats.truncation = truncation
            stats.over_max_len = scan.over_max_len
            stats.trained_lost = scan.trained_lost
            stats.tokens_per_epoch = scan.tokens_fitting
            stats.trained_tokens_per_epoch = scan.trained_fitting
            stats.estimated_tokens = stats.epochs * scan.tokens_fitting
            stats.estimated_trained_tokens = stats.epochs * scan.trained_fitting
            if max_len is None:
                notes.append("no --max-len given: every sequence is counted as fitting")
    if tokenizer is not None and scan.format == "chat" and getattr(tokenizer, "chat_template", None):
        from tunekit.data.render import template_warnings

        notes += template_warnings(tokenizer)

    file_order = {str(path): 0, str(validation): 1}
    stored = sorted(problems.stored, key=lambda p: (file_order.get(p.file or "", 2), p.line or 0))
    return CheckReport(path=str(path), format=scan.format, lines=scan.lines, examples=n, problems=stored,
                       counts=dict(problems.counts), severities=problems.severities, stats=stats,
                       validation=str(validation) if validation is not None else None,
                       validation_examples=validation_examples, notes=notes)


# --------------------------------------------------------------------------------------------------
# Preference files


def _first_format(path: Path, max_line_bytes: int) -> Format | None:
    """The format of a file's first record that has one (the file's format when it is "auto")."""
    for line in read_jsonl(path, max_line_bytes=max_line_bytes):
        found = detect_format(line.record) if line.record is not None else None
        if found is not None:
            return found
    return None


@dataclass
class _PairScan:
    """What one pass over a preference file keeps: compact per-pair columns."""

    lines: int = 0
    line_of: array = field(default_factory=lambda: array("I"))
    digests: array = field(default_factory=lambda: array("Q"))
    prompt: array = field(default_factory=lambda: array("Q"))
    chosen: array = field(default_factory=lambda: array("Q"))
    rejected: array = field(default_factory=lambda: array("Q"))
    forms: Counter = field(default_factory=Counter)
    chat: bool = False  # some pair is a conversation (rendered with the chat template)
    whitespace_only: int = 0
    over_max_len: int = 0
    dropped: int = 0
    prompt_cut: int = 0
    completion_cut: int = 0


def _scan_pairs(path: Path, problems: _Problems, *, tokenizer: Any, max_len: int | None,
                truncation: Literal["drop", "truncate"], max_line_bytes: int) -> _PairScan:
    from tunekit.data.preference import (
        differ_only_in_whitespace,
        fit_pair,
        preference_lengths,
        read_preference,
        render_pair,
    )

    scan = _PairScan()
    label = str(path)
    for line in read_jsonl(path, max_line_bytes=max_line_bytes):
        scan.lines = line.number
        for issue in line.issues:
            problems.add(_placed(issue, label, line.number))
        if line.record is None:
            continue
        _, issues = validate_in_file(line.record, "preference")
        pref = pair = None
        if not any(i.severity == "error" for i in issues):
            pref = read_preference(line.record)  # valid: cannot raise
            if tokenizer is not None:
                try:
                    pair = render_pair(pref, tokenizer)
                except TunekitError as exc:
                    message = "; ".join(p.message for p in exc.problems) or str(exc)
                    hints = [p.hint for p in exc.problems if p.hint]
                    issues.append(DataIssue("render_failed", exc.problems[0].where if exc.problems else "",
                                            f"cannot render with the tokenizer: {message}",
                                            hints[0] if hints else "see the problems of this line"))
        if pair is not None and pref is not None:
            if pair.chosen == pair.rejected:
                issues.append(DataIssue("preference_identical_sides", pref.places.sides[1], "the chat template "
                                        "renders both replies as the same tokens", "give two different replies (the "
                                        "pair teaches nothing), or leave the pair out"))
            if max_len is not None:
                _, fit = fit_pair(pair, max_len, truncation)
                scan.over_max_len += fit != "fits"
                scan.dropped += fit == "dropped"
                scan.prompt_cut += fit == "prompt_cut"
                if fit == "completion_cut":
                    scan.completion_cut += 1
                    longest = max(len(pair.chosen), len(pair.rejected))
                    issues.append(DataIssue(
                        "preference_completion_cut", "", f"a reply of {longest} tokens does not fit max_len={max_len} "
                        "after even one prompt token: truncation would cut the answer",
                        "raise --max-len (data.max_len), shorten the reply, or use --truncation drop to leave such "
                        "pairs out"))
        for issue in issues:
            problems.add(_placed(issue, label, line.number))
        if pref is None or any(i.severity == "error" for i in issues):
            continue
        scan.line_of.append(line.number)
        scan.digests.append(record_digest(line.record))
        scan.forms["trl-text" if pref.text else pref.form] += 1
        scan.chat = scan.chat or not pref.text
        scan.whitespace_only += differ_only_in_whitespace(pref)
        lengths = (len(pair.prompt), len(pair.chosen), len(pair.rejected)) if pair else preference_lengths(pref)
        for column, n in zip((scan.prompt, scan.chosen, scan.rejected), lengths, strict=True):
            column.append(n)
    return scan


def _check_pairs(path: Path, validation: Path | None, problems: _Problems, *, tokenizer: Any, max_len: int | None,
                 truncation: Literal["drop", "truncate"], max_line_bytes: int) -> CheckReport:
    scan = _scan_pairs(path, problems, tokenizer=tokenizer, max_len=max_len, truncation=truncation,
                       max_line_bytes=max_line_bytes)
    sd, order = _duplicates(scan, str(path), problems)
    n = len(scan.line_of)
    validation_examples = None
    if validation is not None:
        vscan = _scan_pairs(validation, problems, tokenizer=tokenizer, max_len=None, truncation=truncation,
                            max_line_bytes=max_line_bytes)
        validation_examples = len(vscan.line_of)
        _duplicates(vscan, str(validation), problems)
        _overlap(scan, vscan, sd, order, path, validation, problems)
    _count_problem(n, path, problems)

    notes = []
    stats = None
    if n:
        stats = PreferenceStats(
            pairs=n, unit="characters" if tokenizer is None else "tokens", forms=dict(scan.forms),
            prompt=summarize(scan.prompt), chosen=summarize(scan.chosen), rejected=summarize(scan.rejected),
            whitespace_only=scan.whitespace_only, whitespace_only_share=scan.whitespace_only / n,
            epochs=recommended_epochs(n))
        if tokenizer is None:
            notes.append("lengths are in characters; token counts and max-length need a tokenizer (--model)")
        else:
            stats.max_len, stats.truncation = max_len, truncation
            stats.over_max_len, stats.dropped = scan.over_max_len, scan.dropped
            stats.prompt_cut, stats.completion_cut = scan.prompt_cut, scan.completion_cut
            if max_len is None:
                notes.append("no --max-len given: every pair is counted as fitting")
    if tokenizer is not None and scan.chat and getattr(tokenizer, "chat_template", None):
        from tunekit.data.render import template_warnings

        notes += template_warnings(tokenizer)
    file_order = {str(path): 0, str(validation): 1}
    stored = sorted(problems.stored, key=lambda p: (file_order.get(p.file or "", 2), p.line or 0))
    return CheckReport(path=str(path), format="preference", lines=scan.lines, examples=n, problems=stored,
                       counts=dict(problems.counts), severities=problems.severities, stats=None,
                       validation=str(validation) if validation is not None else None,
                       validation_examples=validation_examples, notes=notes, preference=stats)
