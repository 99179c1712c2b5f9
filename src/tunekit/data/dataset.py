"""Data file -> sequences -> train/validation split -> fitted to max_len -> rows of an epoch.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the rows an
uninterrupted run would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.config import DataConfig
from tunekit.data.pack import best_fit_decreasing, num_trained_targets
from tunekit.data.types import Sequence
from tunekit.errors import DataError, Problem


def read_examples(path: Path, tokenizer, data: DataConfig) -> list[list[Sequence]]:
    """Validate and render every example of a JSONL file: one list of sequences per example.

    Several sequences come from one example when a template is not prefix-stable (data.unstable_template:
    split). Every problem names the file and line. Examples render in data.num_workers processes, in file order,
    and are read from the on-disk cache (data.cache) when the file, tokenizer and template were rendered before. Validation is `tunekit.data.formats`, rendering (chat
    template + masking) is `tunekit.data.render`.
    """
    from tunekit.data import cache
    from tunekit.data.formats import load_examples  # imported here: render pulls in jinja and templates
    from tunekit.data.workers import render_records, resolve_workers

    if data.cache:
        cache_dir = data.cache_dir or cache.default_dir()
        key, parts = cache.cache_key(path, tokenizer, data.format, data.unstable_template)
        cached = cache.load(cache_dir, key, path)
        if cached is not None:
            return cached
    _, records = load_examples(path, data.format)
    examples: list[list[Sequence]] = []
    problems: list[Problem] = []
    rendered = render_records(list(records), tokenizer, unstable_template=data.unstable_template,
                              num_workers=resolve_workers(data.num_workers))
    for line_no, seqs, errors in rendered:
        if errors:
            problems += [Problem(f"{path}:{line_no} {p.where}".strip(), p.message, p.hint) for p in errors]
            if len(problems) >= 50:
                rendered.close()  # stops the workers
                break
            continue
        for seq in seqs:
            seq.source = {"file": str(path), "line": line_no, **seq.source}
        examples.append(seqs)
    if problems:
        raise DataError(problems, title=f"{path}: examples that cannot be rendered for training")
    if data.cache:
        cache.store(cache_dir, key, parts, path, examples)
    return examples


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) whole examples (at least 1), chosen with `seed`."""
    if fraction <= 0:
        return examples, []
    n_valid = max(1, round(len(examples) * fraction))
    if n_valid >= len(examples):
        raise DataError(Problem("data.validation_fraction", f"{len(examples)} examples leave none for training",
                                "lower data.validation_fraction or add examples"))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_valid])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


@dataclass
class FitReport:
    """What fitting to max_len did: nothing is left out or cut without being counted here."""

    sequences: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    dropped_trained_tokens: int = 0  # trained tokens in the sequences left out
    truncated: int = 0
    lost_trained_tokens: int = 0  # trained tokens past the cut of truncated sequences
    no_trained_tokens: int = 0  # sequences left out because nothing in them is trained
    trained_tokens: int = 0  # trained tokens kept
    tokens: int = 0  # all tokens of the sequences kept (what an epoch processes)

    def messages(self, name: str, max_len: int) -> list[str]:
        out = []
        if self.dropped_too_long:
            out.append(f"{name}: left out {self.dropped_too_long} sequence(s) longer than max_len={max_len} "
                       f"({self.dropped_trained_tokens} trained tokens); raise data.max_len or set "
                       f"data.truncation: truncate")
        if self.truncated:
            out.append(f"{name}: cut {self.truncated} sequence(s) at max_len={max_len}, losing "
                       f"{self.lost_trained_tokens} trained tokens")
        if self.no_trained_tokens:
            out.append(f"{name}: left out {self.no_trained_tokens} sequence(s) with no trained tokens")
        return out


def fit_to_max_len(seqs: list[Sequence], max_len: int, mode: str) -> tuple[list[Sequence], FitReport]:
    """Apply data.truncation ("drop" or "truncate") and leave out sequences with nothing to train."""
    report = FitReport(sequences=len(seqs))
    kept = []
    for seq in seqs:
        if len(seq) > max_len:
            if mode == "drop":
                report.dropped_too_long += 1
                report.dropped_trained_tokens += num_trained_targets(seq)
                continue
            cut = Sequence(seq.input_ids[:max_len], seq.labels[:max_len], seq.source)
            report.truncated += 1
            report.lost_trained_tokens += num_trained_targets(seq) - num_trained_targets(cut)
            seq = cut
        n = num_trained_targets(seq)
        if n == 0:
            report.no_trained_tokens += 1
            continue
        report.trained_tokens += n
        report.tokens += len(seq)
        kept.append(seq)
    report.kept = len(kept)
    return kept, report


@dataclass
class DataSplits:
    train: list[Sequence]
    valid: list[Sequence]
    n_train_examples: int
    n_valid_examples: int
    train_fit: FitReport
    valid_fit: FitReport
    notes: list[str] = field(default_factory=list)  # what was left out or cut, for the user


def load_splits(data: DataConfig, tokenizer) -> DataSplits:
    """Read the train (and validation) file, split off validation_fraction, fit both to max_len."""
    train_ex = read_examples(data.train, tokenizer, data)
    if data.validation is not None:
        valid_ex = read_examples(data.validation, tokenizer, data)
    else:
        train_ex, valid_ex = split_validation(train_ex, data.validation_fraction, data.seed)
    train, train_fit = fit_to_max_len([s for ex in train_ex for s in ex], data.max_len, data.truncation)
    valid, valid_fit = fit_to_max_len([s for ex in valid_ex for s in ex], data.max_len, data.truncation)
    if not train:
        raise DataError(Problem(str(data.train), "no sequence is left to train on after fitting to max_len",
                                "raise data.max_len, set data.truncation: truncate, or check the weights"))
    notes = train_fit.messages("train", data.max_len) + valid_fit.messages("validation", data.max_len)
    return DataSplits(train, valid, len(train_ex), len(valid_ex), train_fit, valid_fit, notes)


def epoch_rows(lengths: list[int], max_len: int, packing: bool, seed: int, epoch: int) -> list[list[int]]:
    """The rows of one epoch, each a list of sequence indices, in training order.

    A pure function of its arguments: shuffle the sequences with (seed, epoch), pack them best-fit
    decreasing (or one per row), then shuffle the rows. The row count is the same every epoch.
    """
    rng = random.Random(f"tunekit-epoch:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        bins = best_fit_decreasing([lengths[i] for i in order], max_len)
        rows = [[order[j] for j in b] for b in bins]
        rng.shuffle(rows)
    else:
        rows = [[i] for i in order]
    return rows


def valid_rows(lengths: list[int], max_len: int, packing: bool) -> list[list[int]]:
    """Validation rows: a fixed packing (no shuffle), so every evaluation sees the same batches."""
    if packing:
        return best_fit_decreasing(lengths, max_len)
    return [[i] for i in range(len(lengths))]

