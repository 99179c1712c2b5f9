"""The on-disk cache of rendered data: reused when nothing changed, never when the file, tokenizer or
template changed; entries written whole or not at all; `tunekit data cache info|clear`."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.config import DataConfig
from tunekit.data import cache, workers
from tunekit.data.dataset import read_examples
from tunekit.errors import DataError


def write(path, n: int, word: str = "answer"):
    lines = [{"messages": [{"role": "user", "content": f"question {i} café"},
                           {"role": "assistant", "content": f"{word} {i} 日本語"},
                           {"role": "user", "content": "and?"},
                           {"role": "assistant", "content": f"{word} again", "weight": i % 2}]} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


def plain(examples) -> list:
    return [[(s.input_ids, s.labels, s.source) for s in ex] for ex in examples]


def config(path, cache_dir, **kw) -> DataConfig:
    return DataConfig(train=path, cache_dir=cache_dir, num_workers=1, **kw)


def no_rendering(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("rendered although the cache holds this file")
    monkeypatch.setattr(workers, "render_records", refuse)


def test_second_read_comes_from_the_cache_unchanged(tmp_path, chat_tokenizer, monkeypatch):
    path, folder = write(tmp_path / "train.jsonl", 30), tmp_path / "cache"
    first = read_examples(path, chat_tokenizer, config(path, folder))
    (entry,) = cache.entries(folder)
    assert entry.meta["examples"] == 30 and entry.meta["data_file"] == str(path)
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "example.npy", "ids.npy", "meta.json", "offsets.npy", "sources.json", "trained.npy"]
    assert entry.meta["tokens"] == sum(len(s) for ex in first for s in ex)
    assert entry.meta["trained_tokens"] == sum(s.num_trained for ex in first for s in ex)
    no_rendering(monkeypatch)
    again = read_examples(path, chat_tokenizer, config(path, folder))
    assert plain(again) == plain(first)
    assert again[2][0].source == {"file": str(path), "line": 3, "turns": [1]}  # weight 0 on the second reply


def test_changed_file_template_or_tokenizer_never_reuses_a_stale_entry(tmp_path, chat_tokenizer, monkeypatch):
    path, folder = write(tmp_path / "train.jsonl", 10), tmp_path / "cache"
    read_examples(path, chat_tokenizer, config(path, folder))
    write(path, 10, word="reply")  # same size of file, other content
    changed = read_examples(path, chat_tokenizer, config(path, folder, cache=False))
    assert plain(read_examples(path, chat_tokenizer, config(path, folder))) == plain(changed)
    assert "reply" in chat_tokenizer.decode(changed[0][0].input_ids)

    other_template = copy.deepcopy(chat_tokenizer)
    other_template.chat_template = chat_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    fresh = read_examples(path, other_template, config(path, folder, cache=False))
    assert plain(read_examples(path, other_template, config(path, folder))) == plain(fresh) != plain(changed)

    other_tokens = copy.deepcopy(chat_tokenizer)
    other_tokens.add_tokens(["reply again"])
    fresh = read_examples(path, other_tokens, config(path, folder, cache=False))
    assert plain(read_examples(path, other_tokens, config(path, folder))) == plain(fresh)
    assert len(cache.entries(folder)) == 4  # first file, changed file, other template, other tokenizer

    no_rendering(monkeypatch)  # each of them is now cached under its own key
    assert plain(read_examples(path, other_tokens, config(path, folder))) == plain(fresh)
    with pytest.raises(AssertionError, match="rendered although"):
        read_examples(path, other_tokens, config(path, folder, unstable_template="error"))


def test_entries_are_whole_or_absent(tmp_path, chat_tokenizer):
    path, folder = write(tmp_path / "train.jsonl", 5), tmp_path / "cache"
    key, _ = cache.cache_key(path, chat_tokenizer, "auto", "split")
    (folder / key).mkdir(parents=True)  # as if a writer died before meta.json: not an entry
    (folder / f".{key}.tmp").mkdir()  # a temporary folder left behind
    assert cache.entries(folder) == [] and cache.load(folder, key, path) is None
    examples = read_examples(path, chat_tokenizer, config(path, folder))
    assert [e.key for e in cache.entries(folder)] == [key]
    assert plain(cache.load(folder, key, path)) == plain(examples)


def test_a_file_that_cannot_be_rendered_is_not_cached(tmp_path, chat_tokenizer):
    path, folder = tmp_path / "train.jsonl", tmp_path / "cache"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError):
        read_examples(path, chat_tokenizer, config(path, folder))
    assert cache.entries(folder) == []


def test_cli_info_and_clear(tmp_path, chat_tokenizer):
    path, folder = write(tmp_path / "train.jsonl", 7), tmp_path / "cache"
    read_examples(path, chat_tokenizer, config(path, folder))
    runner = CliRunner()
    info = runner.invoke(app, ["data", "cache", "info", "--dir", str(folder)], env={"COLUMNS": "300"})
    assert info.exit_code == 0, info.output
    assert "1 entry" in info.output and str(path) in info.output and "7 examples" in info.output
    cleared = runner.invoke(app, ["data", "cache", "clear", "--dir", str(folder)])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert cache.entries(folder) == [] and list(folder.iterdir()) == []
