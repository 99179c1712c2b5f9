"""Render many examples on every core, results in input order.

`render_records` renders (line, record) pairs with `render_example` in `num_workers` processes: chunks of
records go to the workers in order and come back in order (`Pool.imap`), so the output is exactly what one
process gives, line for line. Workers are forked where the platform allows it (the tokenizer is inherited, not
pickled) and spawned elsewhere. A progress bar shows on long renders when stderr is a terminal.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator

from tunekit.data.types import Sequence
from tunekit.errors import Problem, TunekitError

_CHUNK = 64  # records per task: large enough that pickling and queueing cost little against rendering
_PROGRESS_MIN = 2000  # records from which a progress bar is worth showing
_state: dict = {}  # a worker's tokenizer and options, set once by _init


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(num_workers: int | str) -> int:
    return available_cores() if num_workers == "auto" else int(num_workers)


def _init(tokenizer, unstable_template: str) -> None:
    _state["tokenizer"] = tokenizer
    _state["unstable_template"] = unstable_template


def _render_chunk(chunk: list[tuple[int, dict]], tokenizer=None,
                  unstable_template: str | None = None) -> list[tuple[int, list[Sequence], list[Problem]]]:
    """Render a chunk with the given tokenizer, or in a worker with the one `_init` set."""
    from tunekit.data.render import render_example

    tokenizer = tokenizer if tokenizer is not None else _state["tokenizer"]
    unstable_template = unstable_template or _state["unstable_template"]
    out = []
    for line_no, record in chunk:
        try:
            out.append((line_no, render_example(record, tokenizer, unstable_template=unstable_template), []))
        except TunekitError as exc:
            out.append((line_no, [], exc.problems))
    return out


def render_records(records: list[tuple[int, dict]], tokenizer, *, unstable_template: str = "split",
                   num_workers: int = 1, progress: bool | None = None
                   ) -> Iterator[tuple[int, list[Sequence], list[Problem]]]:
    """(line, sequences, problems) for each record, in the order of `records`.

    Problems are the `TunekitError` problems of a record that cannot be rendered (it has no sequences then). `progress`:
    None shows a bar for long renders when stderr is a terminal.
    """
    chunks = [records[i:i + _CHUNK] for i in range(0, len(records), _CHUNK)]
    workers = max(1, min(num_workers, len(chunks)))
    if progress is None:
        progress = len(records) >= _PROGRESS_MIN and sys.stderr.isatty()
    with _progress_bar(len(records), progress) as advance:
        if workers == 1:
            for chunk in chunks:
                results = _render_chunk(chunk, tokenizer, unstable_template)
                advance(len(results))
                yield from results
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(workers, initializer=_init, initargs=(tokenizer, unstable_template)) as pool:
            for results in pool.imap(_render_chunk, chunks):
                advance(len(results))
                yield from results


class _progress_bar:
    """A rich progress bar as a context manager that yields `advance(n)`; nothing when not shown."""

    def __init__(self, total: int, show: bool) -> None:
        self.total, self.show, self.bar = total, show, None

    def __enter__(self):
        if not self.show:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress("rendering", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                            console=Console(stderr=True))
        self.bar.start()
        task = self.bar.add_task("render", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def rendered_ahead(path, tokenizer, *, fmt: str | None = None, max_line_bytes: int,
                   num_workers: int | str = "auto") -> Callable[[dict], list[Sequence]]:
    """`render_example` for the records of a JSONL file that a scan will ask for in file order, rendered ahead
    on every core (`tunekit.data.check`'s count_fn).

    Every record that parses and is valid on its own is rendered, in file order; a call for a record takes the
    next result with the same content (records the scan skips are passed over), and renders it here when none
    is found. Problems raise the record's `TunekitError` as rendering it would.
    """
    from tunekit.data.formats import read_jsonl, record_digest, validate_in_file
    from tunekit.data.render import render_example

    records = []
    for line in read_jsonl(path, max_line_bytes=max_line_bytes):
        if line.record is not None:
            _, issues = validate_in_file(line.record, fmt)  # type: ignore[arg-type]
            if not any(i.severity == "error" for i in issues):
                records.append((line.number, line.record))
    digests = iter([record_digest(record) for _, record in records])
    results = render_records(records, tokenizer, num_workers=resolve_workers(num_workers))

    def count_fn(example: dict) -> list[Sequence]:
        wanted = record_digest(example)
        for digest, (_, seqs, problems) in zip(digests, results, strict=True):
            if digest == wanted:
                if problems:
                    raise TunekitError(problems)
                return seqs
        return render_example(example, tokenizer)

    return count_fn
