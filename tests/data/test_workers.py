"""Rendering in several processes gives what one process gives, in file order, problems included."""

from __future__ import annotations

import json

import pytest

from tunekit.config import DataConfig
from tunekit.data.dataset import read_examples
from tunekit.data.workers import render_records, resolve_workers
from tunekit.errors import DataError


def records(n: int) -> list[tuple[int, dict]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"question {i} café"},
                    {"role": "assistant", "content": "answer " * (i % 7 + 1)}]
        if i % 50 == 17:  # starts with an assistant message: refused with a problem
            messages = messages[1:]
        out.append((i + 1, {"messages": messages}))
    return out


def as_plain(results) -> list:
    return [(line, [(s.input_ids, s.labels, s.source) for s in seqs], [(p.where, p.message) for p in problems])
            for line, seqs, problems in results]


def test_two_workers_give_the_results_of_one_in_order(chat_tokenizer):
    recs = records(300)  # several chunks per worker
    one = as_plain(render_records(recs, chat_tokenizer, num_workers=1))
    two = as_plain(render_records(recs, chat_tokenizer, num_workers=2))
    assert two == one
    assert [line for line, _, _ in two] == list(range(1, 301))
    refused = [line for line, seqs, problems in two if problems]
    assert refused == [18, 68, 118, 168, 218, 268] and all(not seqs for _, seqs, p in two if p)
    assert all(seqs for _, seqs, p in two if not p)


def test_read_examples_with_workers_matches_one_process(tmp_path, chat_tokenizer):
    path = tmp_path / "train.jsonl"
    good = [(line, r) for line, r in records(200) if r["messages"][0]["role"] == "user"]
    path.write_text("".join(json.dumps(r) + "\n" for _, r in good))
    single = read_examples(path, chat_tokenizer, DataConfig(train=path, num_workers=1, cache=False))
    multi = read_examples(path, chat_tokenizer, DataConfig(train=path, num_workers=2, cache=False))
    assert [[(s.input_ids, s.labels, s.source) for s in ex] for ex in multi] == \
           [[(s.input_ids, s.labels, s.source) for s in ex] for ex in single]
    assert len(multi) == len(good) and multi[0][0].source["line"] == 1


def test_problems_name_file_and_line_with_workers(tmp_path, chat_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for _, r in records(120)))
    with pytest.raises(DataError) as info:
        read_examples(path, chat_tokenizer, DataConfig(train=path, num_workers=2, cache=False))
    wheres = [p.where for p in info.value.problems]
    assert wheres == [f"{path}:18 messages[0]", f"{path}:68 messages[0]", f"{path}:118 messages[0]"]


def test_auto_is_every_available_core():
    assert resolve_workers("auto") >= 1 and resolve_workers(3) == 3


def test_check_with_a_tokenizer_renders_ahead_with_the_same_report(tmp_path, chat_tokenizer):
    from tunekit.data.check import check_file
    from tunekit.data.render import render_example

    lines = [json.dumps(r) for _, r in records(150)]
    lines[5] = '{"messages": [{"role": "user", "content": "hi"}]}'  # invalid: the scan never asks for it
    lines[40] = lines[41]  # a duplicate: both asked for, same content
    lines[60] = "not json"
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ahead = check_file(path, tokenizer=chat_tokenizer, max_len=64)
    serial = check_file(path, count_fn=lambda ex: render_example(ex, chat_tokenizer), max_len=64)
    assert ahead.to_dict() == serial.to_dict()
    codes = {p.code for p in ahead.problems}
    assert {"render_failed", "invalid_json"} <= codes and ahead.stats is not None


def test_progress_bar_goes_to_stderr_only_when_asked(chat_tokenizer, capsys):
    recs = records(10)
    expected = as_plain(render_records(recs, chat_tokenizer, progress=False))
    assert capsys.readouterr().err == ""
    assert as_plain(render_records(recs, chat_tokenizer, progress=True)) == expected
    out = capsys.readouterr()
    assert out.out == "" and out.err  # stdout (reports, --json) stays clean; a live bar needs a terminal
    assert as_plain(render_records(recs, chat_tokenizer)) == expected  # default: not a terminal here
    assert capsys.readouterr().err == ""
