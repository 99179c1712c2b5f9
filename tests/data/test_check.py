"""check_file: file-level problems, statistics on a fake token counter, epochs, bounded memory."""

from __future__ import annotations

import importlib.util
import json
import statistics
import tracemalloc

import pytest

from tunekit.data.check import (
    MAX_STORED_PROBLEMS,
    check_file,
    recommended_epochs,
    summarize,
)
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import DataError, TemplateError

NEEDS_RENDER = pytest.mark.skipif(importlib.util.find_spec("tunekit.data.render") is None,
                                  reason="tunekit.data.render is not in this tree yet")


def good(i: int, answer_words: int = 1) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": " ".join([f"answer{i}"] * answer_words)}]}


def write(tmp_path, records, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def word_count_fn(example: dict) -> list[Sequence]:
    """Fake tokenizer: one token per word, assistant words trained; one sequence per example."""
    ids, labels = [], []
    for msg in example["messages"]:
        words = msg["content"].split()
        ids += [1] * len(words)
        labels += [1] * len(words) if msg["role"] == "assistant" else [IGNORE] * len(words)
    return [Sequence(ids, labels)]


# --------------------------------------------------------------------------------------------------
# Epoch rule and percentiles


@pytest.mark.parametrize("n,epochs", [
    (1, 25), (4, 25),  # ceil(100/n) capped at 25
    (5, 20), (33, 4),  # 33*3 = 99 < 100 -> ceil(100/33) = 4
    (34, 3), (8333, 3),  # 102 and 24999 examples seen: the target 3 epochs
    (8334, 2),  # 25002 > 25000 -> 25000 // 8334 = 2
    (12500, 2), (12501, 1), (1_000_000, 1),  # never below 1
])
def test_recommended_epochs_follows_the_cookbook_rule(n, epochs):
    assert recommended_epochs(n) == epochs


def test_recommended_epochs_needs_examples():
    with pytest.raises(ValueError):
        recommended_epochs(0)


def test_percentiles_on_known_numbers():
    s = summarize([40, 10, 30, 20])
    # Linear interpolation between closest ranks: p5 = 10 + 0.15 * 10, p95 = 30 + 0.85 * 10.
    assert (s.min, s.max, s.mean, s.median, s.p5, s.p95, s.total) == (10, 40, 25, 25, 11.5, 38.5, 100)
    values = list(range(1, 101))
    s = summarize(values)
    q = statistics.quantiles(values, n=20, method="inclusive")
    assert (s.p5, s.median, s.p95) == pytest.approx((q[0], 50.5, q[18]))
    assert (s.p5, s.p95) == pytest.approx((5.95, 95.05))
    assert summarize([]) is None
    assert summarize([7]).p95 == 7


# --------------------------------------------------------------------------------------------------
# Statistics


def test_token_statistics_with_an_injected_counter(tmp_path):
    # Example i: 2 prompt words + (i+1) answer words -> total i+3 tokens, i+1 trained.
    records = [good(i, answer_words=i + 1) for i in range(20)]
    report = check_file(write(tmp_path, records), count_fn=word_count_fn, max_len=15)
    s = report.stats
    assert report.ok and s.unit == "tokens" and s.examples == 20
    assert (s.length.min, s.length.max, s.length.total) == (3, 22, sum(range(3, 23)))
    assert (s.trained.min, s.trained.max, s.trained.total) == (1, 20, sum(range(1, 21)))
    assert s.messages.median == 2
    # Longer than 15 tokens: i + 3 > 15 -> i = 13..19 (7 examples) losing i + 1 trained tokens each.
    assert s.over_max_len == 7
    assert s.trained_lost == sum(i + 1 for i in range(13, 20))
    assert s.epochs == recommended_epochs(20) == 5
    assert s.estimated_trained_tokens == 5 * sum(i + 1 for i in range(13))
    assert report.notes == []


def test_split_sequences_lose_only_the_long_part(tmp_path):
    def split_fn(example):
        short = Sequence([1] * 4, [IGNORE, IGNORE, 1, 1])  # 2 trained
        long = Sequence([1] * 10, [IGNORE] * 5 + [1] * 5)  # 5 trained, longer than 8
        return [short, long]

    report = check_file(write(tmp_path, [good(i) for i in range(10)]), count_fn=split_fn, max_len=8)
    s = report.stats
    assert (s.over_max_len, s.trained_lost) == (10, 50)
    assert s.length.total == 140 and s.trained.total == 70
    assert s.estimated_trained_tokens == recommended_epochs(10) * 20


def test_without_a_tokenizer_characters_are_counted_with_a_note(tmp_path):
    records = [good(i) for i in range(10)]
    report = check_file(write(tmp_path, records))
    s = report.stats
    assert s.unit == "characters" and s.estimated_trained_tokens is None
    assert s.trained.total == sum(len(f"answer{i}") for i in range(10))
    assert s.length.total == sum(len(f"question {i}") + len(f"answer{i}") for i in range(10))
    assert any("--model" in note for note in report.notes)


def test_a_render_failure_is_a_problem_of_its_line(tmp_path):
    def failing(example):
        if example["messages"][0]["content"] == "question 4":
            raise TemplateError("the template drops the system message")
        return word_count_fn(example)

    report = check_file(write(tmp_path, [good(i) for i in range(12)]), count_fn=failing)
    assert [(p.code, p.line) for p in report.problems] == [("render_failed", 5)]
    assert "drops the system message" in report.problems[0].message
    assert report.examples == 11 and not report.ok


# --------------------------------------------------------------------------------------------------
# File-level problems


def test_duplicates_name_the_earlier_line(tmp_path):
    records = [good(i) for i in range(10)]
    same_other_order = {"messages": [{"content": "question 2", "role": "user"},
                                     {"content": "answer2", "role": "assistant"}]}
    path = write(tmp_path, records + [good(0), same_other_order, good(0)])
    report = check_file(path)
    dups = [(p.line, p.message, p.severity) for p in report.problems if p.code == "duplicate_example"]
    assert dups == [(11, "same content as line 1", "warning"), (12, "same content as line 3", "warning"),
                    (13, "same content as line 1", "warning")]
    assert report.ok and report.examples == 13


def test_train_validation_overlap_names_both_lines(tmp_path):
    train = write(tmp_path, [good(i) for i in range(10)])
    valid = write(tmp_path, [good(100), good(7), good(101), good(2)], "valid.jsonl")
    report = check_file(train, validation=valid)
    overlap = [(p.file, p.line, p.message) for p in report.problems if p.code == "train_valid_overlap"]
    assert overlap == [(str(valid), 2, f"also in the training file {train} at line 8"),
                       (str(valid), 4, f"also in the training file {train} at line 3")]
    assert report.validation_examples == 4 and report.counts == {"train_valid_overlap": 2}


def test_validation_file_problems_are_reported_with_its_name(tmp_path):
    train = write(tmp_path, [good(i) for i in range(10)])
    valid = tmp_path / "valid.jsonl"
    valid.write_text(json.dumps(good(50)) + "\n{oops\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    report = check_file(train, validation=valid)
    assert [(p.file, p.line, p.code) for p in report.problems] == [
        (str(valid), 2, "invalid_json"), (str(valid), 3, "format_mismatch")]
    assert not report.ok


def test_too_few_examples_is_a_warning(tmp_path):
    report = check_file(write(tmp_path, [good(i) for i in range(9)]))
    assert [(p.code, p.line, p.severity) for p in report.problems] == [("too_few_examples", None, "warning")]
    assert report.ok
    assert check_file(write(tmp_path, [good(i) for i in range(10)], "ten.jsonl")).problems == []


def test_empty_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    report = check_file(path)
    assert report.counts == {"no_examples": 1} and not report.ok and report.stats is None


def test_missing_file_and_directory_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        check_file(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        check_file(tmp_path)
    with pytest.raises(DataError, match="file not found"):
        check_file(write(tmp_path, [good(0)]), validation=tmp_path / "nope.jsonl")


def test_stored_problems_are_capped_but_all_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{\n" * (MAX_STORED_PROBLEMS + 250))
    report = check_file(path)
    assert len(report.problems) == MAX_STORED_PROBLEMS
    assert report.counts == {"invalid_json": MAX_STORED_PROBLEMS + 250, "no_examples": 1}
    assert report.errors == MAX_STORED_PROBLEMS + 251


def test_to_dict_is_json_and_matches_the_report(tmp_path):
    report = check_file(write(tmp_path, [good(i) for i in range(5)] + [good(0)]), count_fn=word_count_fn)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"] == report.counts == {"duplicate_example": 1, "too_few_examples": 1}
    assert data["warnings"] == 2 and data["errors"] == 0 and data["ok"] is True
    assert data["stats"]["trained"]["total"] == 6 and data["stats"]["epochs"] == 17


# --------------------------------------------------------------------------------------------------
# Memory


def _peak_bytes(path, **kwargs) -> int:
    tracemalloc.start()
    try:
        check_file(path, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_grows_by_bytes_per_example_not_with_the_examples(tmp_path):
    """Peak Python allocations on files of 6000 and 12000 examples (~530 bytes each on disk, well over
    1 kB each once parsed): the growth per added example is that of a few compact columns."""
    filler = "lorem ipsum dolor sit amet " * 8
    paths = {}
    for n in (6000, 12000):
        paths[n] = tmp_path / f"{n}.jsonl"
        with paths[n].open("w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{i} {filler}"},
                                                 {"role": "assistant", "content": f"{filler} {i}"}]}) + "\n")
    size = paths[12000].stat().st_size
    assert size > 6_000_000
    _peak_bytes(write(tmp_path, [good(i) for i in range(10)]))  # imports and caches, not per-file memory
    small, big = _peak_bytes(paths[6000]), _peak_bytes(paths[12000])
    per_example = (big - small) / 6000
    assert per_example < 120, f"{per_example:.0f} bytes per example"
    assert big < size / 5, f"peak {big} bytes for a {size}-byte file"
    # With a validation file (here the same file: every line overlaps) the problems list stays capped.
    report_peak = _peak_bytes(paths[12000], validation=paths[12000])
    assert report_peak < size / 3


# --------------------------------------------------------------------------------------------------
# With the real renderer (available once tunekit.data.render is in the tree)


@NEEDS_RENDER
def test_token_statistics_with_the_real_renderer(tmp_path, chat_tokenizer):
    records = [good(i, answer_words=3) for i in range(12)]
    report = check_file(write(tmp_path, records), tokenizer=chat_tokenizer, max_len=8)
    s = report.stats
    assert report.ok and s.unit == "tokens"
    assert 0 < s.trained.min <= s.trained.max < s.length.min
    assert s.over_max_len == 12 and s.estimated_trained_tokens == 0
