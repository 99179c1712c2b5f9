"""Data file -> sequences -> train/validation split -> fitted to max_len -> rows of an epoch.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the rows an
uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.config import DataConfig
from tunekit.data.pack import best_fit_decreasing, num_trained_targets
from tunekit.data.types import Sequence
from tunekit.errors import DataError, Problem, TunekitError


def read_examples(path: Path, tokenizer, data: DataConfig) -> list[list[Sequence]]:
    """Validate and render every example of a JSONL file: one list of sequences per example.

    Several sequences come from one example when a template is not prefix-stable (data.unstable_template:
    split). Every problem names the file and line. Examples render in data.num_workers processes, in file
    order, and come from the on-disk cache (data.cache) when this file was rendered before with the same
    tokenizer, template and options. Validation is `tunekit.data.formats`, rendering (chat template + masking)
    is `tunekit.data.render`.
    """
    if data.cache:
        return cached_store(path, tokenizer, data).examples()
    return [seqs for _, seqs in _rendered(path, tokenizer, data)]


def cached_store(path: Path, tokenizer, data: DataConfig):
    """The cache entry of `path` rendered with `tokenizer` and `data`'s options (`tunekit.data.cache.Store`),
    rendered and written first when there is none."""
    from tunekit.data import cache

    cache_dir = data.cache_dir or cache.default_dir()
    key, parts = cache.cache_key(path, tokenizer, data.format, data.unstable_template)
    store = cache.open_entry(cache_dir, key, path)
    if store is None:
        try:
            cache.store_stream(cache_dir, key, parts, path, _rendered(path, tokenizer, data))
        except OSError as exc:
            raise DataError(Problem("data.cache_dir", f"cannot write the rendered data to {cache_dir}: {exc}",
                                    "set data.cache_dir (or $TUNEKIT_DATA_CACHE) to a writable folder, or "
                                    "data.cache: false")) from None
        store = cache.open_entry(cache_dir, key, path)
    return store


def cached_store_if_whole(path: Path, tokenizer, data: DataConfig):
    """`cached_store` for readers that can do without it (`tunekit data check`, evaluation): None when the file
    cannot be rendered whole for training or the entry cannot be written."""
    try:
        return cached_store(path, tokenizer, data)
    except TunekitError:
        return None


def _rendered(path: Path, tokenizer, data: DataConfig) -> Iterator[tuple[int, list[Sequence]]]:
    """(line, sequences) per example in file order; DataError (up to 50 problems) when any cannot render."""
    from tunekit.data.formats import load_examples  # imported here: render pulls in jinja and templates
    from tunekit.data.workers import render_records, resolve_workers

    _, records = load_examples(path, data.format)
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
        if problems:
            continue  # what is rendered after a problem is not used: the file is refused below
        for seq in seqs:
            seq.source = {"file": str(path), "line": line_no, **seq.source}
        yield line_no, seqs
    if problems:
        raise DataError(problems, title=f"{path}: examples that cannot be rendered for training")


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


class SequenceView(SequenceABC):
    """Sequences of a cache entry chosen by index, each cut to its limit, built from the memory-mapped tokens
    when asked for: memory does not grow with the number of tokens."""

    def __init__(self, store, index, limits) -> None:
        self.store, self.index, self.limits = store, index, limits  # (N,) int64 each

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        return self.store.sequence(int(self.index[k]), int(self.limits[k]))

    def lengths(self) -> list[int]:
        return self.limits.tolist()


@dataclass
class FitArrays:
    """`fit_to_max_len`'s decision for each sequence of a cache entry (numpy arrays, one entry a sequence)."""

    long: object  # longer than max_len (dropped or truncated)
    keep: object  # trained on
    limits: object  # tokens kept of it (its length, or max_len when truncated)
    trained: object  # trained tokens once shifted, after any cut
    targets: object  # trained tokens once shifted, before any cut
    drop: bool  # data.truncation: drop (else truncate)

    def lost(self):
        """Trained tokens (once shifted) of each sequence dropped or cut away."""
        import numpy as np

        return np.where(self.long, self.targets, 0) if self.drop else self.targets - self.trained


def fit_arrays(store, index, max_len: int | None, mode: str) -> FitArrays:
    """`fit_to_max_len` over the sequences `index` of a cache entry, from its arrays (None: no limit)."""
    import numpy as np

    lengths, targets = store.lengths[index], store.targets[index]
    long = lengths > max_len if max_len is not None else np.zeros(len(index), dtype=bool)
    if mode == "drop":
        keep, limits, trained = ~long, lengths, targets
    else:
        trained = targets.copy()
        for k in np.nonzero(long)[0]:
            trained[k] = store.trained_targets(int(index[k]), max_len)
        keep, limits = np.ones(len(index), dtype=bool), np.minimum(lengths, max_len) if max_len else lengths
    return FitArrays(long, keep & (trained > 0), limits, trained, targets, mode == "drop")


def fit_store(store, examples: list[int], max_len: int, mode: str) -> tuple[SequenceView, FitReport]:
    """`fit_to_max_len` over the sequences of `examples` (indices, in order) of a cache entry, from its arrays."""
    import numpy as np

    chosen = np.zeros(store.n_examples, dtype=bool)
    chosen[np.asarray(examples, dtype=np.int64)] = True
    index = np.nonzero(chosen[store.example])[0]
    fit = fit_arrays(store, index, max_len, mode)
    report = FitReport(sequences=len(index))
    if mode == "drop":
        report.dropped_too_long = int(fit.long.sum())
        report.dropped_trained_tokens = int(fit.targets[fit.long].sum())
        report.no_trained_tokens = int((~fit.long & (fit.trained == 0)).sum())
    else:
        report.truncated = int(fit.long.sum())
        report.lost_trained_tokens = int((fit.targets - fit.trained)[fit.long].sum())
        report.no_trained_tokens = int((fit.trained == 0).sum())
    report.trained_tokens = int(fit.trained[fit.keep].sum())
    report.tokens = int(fit.limits[fit.keep].sum())
    report.kept = int(fit.keep.sum())
    return SequenceView(store, index[fit.keep], fit.limits[fit.keep]), report


def example_stats(store, max_len: int | None, mode: str) -> dict[int, tuple[int, int, bool, int, int, int]]:
    """Per line of a cache entry's file, what `tunekit data check` counts for its example: (tokens, trained
    tokens, whether a sequence is longer than max_len, trained tokens lost to max_len, tokens and trained
    tokens that fit), from the arrays alone (`fit_to_max_len`'s rules, None: no limit)."""
    import numpy as np

    n = len(store.example)
    index = np.arange(n, dtype=np.int64)
    fit = fit_arrays(store, index, max_len, mode)
    starts = store.offsets[:-1]
    lengths = store.lengths
    nonempty = lengths > 0
    trained = np.zeros(n, dtype=np.int64)  # unshifted trained tokens (Sequence.num_trained)
    if nonempty.any():
        trained[nonempty] = np.add.reduceat(store.trained, starts[nonempty], dtype=np.int64)
    ex, m = store.example, store.n_examples

    def per_example(values) -> list:
        return np.bincount(ex, weights=values, minlength=m).astype(np.int64).tolist()

    total, trained_ex = per_example(lengths), per_example(trained)
    over = per_example(fit.long.astype(np.int64))
    lost = per_example(fit.lost())
    fitting = per_example(np.where(fit.keep, fit.limits, 0))
    trained_fitting = per_example(np.where(fit.keep, fit.trained, 0))
    present, first = np.unique(ex, return_index=True)  # each example's first sequence
    lines = store.line[first].tolist()
    return {line: (total[e], trained_ex[e], over[e] > 0, lost[e], fitting[e], trained_fitting[e])
            for e, line in zip(present.tolist(), lines, strict=True)}


@dataclass
class DataSplits:
    train: list[Sequence] | SequenceView
    valid: list[Sequence] | SequenceView
    n_train_examples: int
    n_valid_examples: int
    train_fit: FitReport
    valid_fit: FitReport
    notes: list[str] = field(default_factory=list)  # what was left out or cut, for the user

    def train_lengths(self) -> list[int]:
        """Token count of each training sequence (from the arrays alone for a cache view)."""
        return self.train.lengths() if isinstance(self.train, SequenceView) else [len(s) for s in self.train]


def load_splits(data: DataConfig, tokenizer) -> DataSplits:
    """Read the train (and validation) file, split off validation_fraction, fit both to max_len.

    With data.cache the sequences are views of the cache entries (`SequenceView`), built from memory-mapped
    tokens when a batch asks for them; without it they are rendered into memory.
    """
    if data.cache:
        train_store = cached_store(data.train, tokenizer, data)
        train_ex = list(range(train_store.n_examples))
        if data.validation is not None:
            valid_store = cached_store(data.validation, tokenizer, data)
            valid_ex = list(range(valid_store.n_examples))
        else:
            valid_store = train_store
            train_ex, valid_ex = split_validation(train_ex, data.validation_fraction, data.seed)
        train, train_fit = fit_store(train_store, train_ex, data.max_len, data.truncation)
        valid, valid_fit = fit_store(valid_store, valid_ex, data.max_len, data.truncation)
        return _splits(data, train, valid, len(train_ex), len(valid_ex), train_fit, valid_fit)
    train_ex = read_examples(data.train, tokenizer, data)
    if data.validation is not None:
        valid_ex = read_examples(data.validation, tokenizer, data)
    else:
        train_ex, valid_ex = split_validation(train_ex, data.validation_fraction, data.seed)
    train, train_fit = fit_to_max_len([s for ex in train_ex for s in ex], data.max_len, data.truncation)
    valid, valid_fit = fit_to_max_len([s for ex in valid_ex for s in ex], data.max_len, data.truncation)
    return _splits(data, train, valid, len(train_ex), len(valid_ex), train_fit, valid_fit)


def _splits(data: DataConfig, train, valid, n_train: int, n_valid: int, train_fit: FitReport,
            valid_fit: FitReport) -> DataSplits:
    if not train:
        raise DataError(Problem(str(data.train), "no sequence is left to train on after fitting to max_len",
                                "raise data.max_len, set data.truncation: truncate, or check the weights"))
    notes = train_fit.messages("train", data.max_len) + valid_fit.messages("validation", data.max_len)
    return DataSplits(train, valid, n_train, n_valid, train_fit, valid_fit, notes)


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



# --------------------------------------------------------------------------------------------------
# Preference pairs (objective: dpo)


@dataclass
class PairSplits:
    """Preference pairs for training, as (preferred, non-preferred) sequences (`preference.pair_sequences`).

    The fit reports count pairs (`sequences`, `kept`, `dropped_too_long`, `truncated`: pairs whose prompt was
    cut) and the tokens of both sides (`tokens`, `trained_tokens`). Rendered in memory: not in the data cache.
    """

    train: list[tuple[Sequence, Sequence]]
    valid: list[tuple[Sequence, Sequence]]
    n_train_examples: int
    n_valid_examples: int
    train_fit: FitReport
    valid_fit: FitReport
    notes: list[str] = field(default_factory=list)

    def train_lengths(self) -> list[int]:
        """Tokens of each training pair, both sides (what a packed row holds of it)."""
        return [len(c) + len(r) for c, r in self.train]


def read_pairs(path: Path, tokenizer, data: DataConfig) -> list:
    """Validate and render every pair of a preference file (`preference.render_pair`), in file order, each
    PreferencePair's `source` naming its file and line; a DataError lists every problem (up to 50) by line."""
    from tunekit.data.formats import load_examples
    from tunekit.data.preference import render_pair

    fmt, records = load_examples(path, "preference" if data.format == "preference" else "auto")
    if fmt != "preference":
        raise DataError(Problem(f"{path}:{records[0][0]}", f"a {fmt} record: preference training (objective: dpo) "
                                "reads preference pairs", "give a file of pairs (docs/preference.md), or set "
                                "objective: sft to train on this file"))
    pairs, problems = [], []
    for line, record in records:
        try:
            pair = render_pair(record, tokenizer)
        except TunekitError as exc:
            problems += [Problem(f"{path}:{line} {p.where}".strip(), p.message, p.hint) for p in exc.problems]
            if len(problems) >= 50:
                break
            continue
        pair.source = {"file": str(path), "line": line}
        pairs.append(pair)
    if problems:
        raise DataError(problems, title=f"{path}: pairs that cannot be rendered for training")
    return pairs


def fit_pairs(pairs: list, max_len: int, mode: str) -> tuple[list[tuple[Sequence, Sequence]], FitReport]:
    """`preference.fit_pair` on every pair: (sequences of the pairs kept, what fitting did). A reply is never
    cut: a pair whose reply alone does not fit (data.truncation: truncate) is a DataError naming its line."""
    from tunekit.data.preference import fit_pair, pair_sequences

    report, kept, cut = FitReport(sequences=len(pairs)), [], []
    for pair in pairs:
        fitted, fate = fit_pair(pair, max_len, mode)  # type: ignore[arg-type]
        if fate == "completion_cut":
            cut.append(Problem(f"{pair.source.get('file')}:{pair.source.get('line')}", f"a reply of "
                               f"{max(len(pair.chosen), len(pair.rejected))} tokens does not fit max_len={max_len} "
                               "even after cutting the prompt (a reply is never cut)",
                               "raise data.max_len, set data.truncation: drop, or leave the pair out"))
            continue
        if fitted is None:
            report.dropped_too_long += 1
            report.dropped_trained_tokens += len(pair.chosen) + len(pair.rejected)
            continue
        report.truncated += fate == "prompt_cut"
        chosen, rejected = pair_sequences(fitted)
        report.trained_tokens += num_trained_targets(chosen) + num_trained_targets(rejected)
        report.tokens += len(chosen) + len(rejected)
        kept.append((chosen, rejected))
    if cut:
        raise DataError(cut[:50], title="pairs whose reply does not fit data.max_len")
    report.kept = len(kept)
    return kept, report


def load_pair_splits(data: DataConfig, tokenizer) -> PairSplits:
    """`load_splits` for preference pairs: read the train (and validation) file, split off validation_fraction
    (whole pairs, the same rule), fit both to max_len."""
    train_ex = read_pairs(data.train, tokenizer, data)
    if data.validation is not None:
        valid_ex = read_pairs(data.validation, tokenizer, data)
    else:
        train_ex, valid_ex = split_validation(train_ex, data.validation_fraction, data.seed)
    train, train_fit = fit_pairs(train_ex, data.max_len, data.truncation)
    valid, valid_fit = fit_pairs(valid_ex, data.max_len, data.truncation)
    if not train:
        raise DataError(Problem(str(data.train), "no pair is left to train on after fitting to max_len",
                                "raise data.max_len, or set data.truncation: truncate (the prompt is cut, never a "
                                "reply)"))
    notes = []
    for name, fit in (("train", train_fit), ("validation", valid_fit)):
        if fit.dropped_too_long:
            notes.append(f"{name}: left out {fit.dropped_too_long} pair(s) with a side longer than max_len="
                         f"{data.max_len}; raise data.max_len or set data.truncation: truncate")
        if fit.truncated:
            notes.append(f"{name}: cut the prompt of {fit.truncated} pair(s) to fit max_len={data.max_len} "
                         "(the replies are whole)")
    return PairSplits(train, valid, len(train_ex), len(valid_ex), train_fit, valid_fit, notes)
