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
        "example.npy", "ids.bin", "kind.npy", "line.npy", "meta.json", "offsets.npy", "targets.npy",
        "trained.bin", "turn_offsets.npy", "turns.npy"]
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


# ------------------------------------------------------------------------------ training from the cache


def splits_plain(splits):
    return ([(s.input_ids, s.labels, s.source) for s in splits.train],
            [(s.input_ids, s.labels, s.source) for s in splits.valid],
            splits.n_train_examples, splits.n_valid_examples, splits.train_fit, splits.valid_fit, splits.notes,
            splits.train_lengths())


@pytest.mark.parametrize("options", [
    {"max_len": 96, "truncation": "drop", "validation_fraction": 0.2},
    {"max_len": 96, "truncation": "truncate", "validation_fraction": 0.2},
    {"max_len": 2048, "truncation": "drop", "validation_fraction": 0.0},
])
def test_load_splits_from_the_cache_equals_rendering_in_memory(tmp_path, chat_tokenizer, options):
    from tunekit.data.dataset import SequenceView, load_splits

    path, folder = write(tmp_path / "train.jsonl", 40), tmp_path / "cache"
    with path.open("a") as f:  # a long example: cut or left out at max_len 96
        f.write(json.dumps({"messages": [{"role": "user", "content": "word " * 100},
                                         {"role": "assistant", "content": "done " * 60}]}) + "\n")
    in_memory = load_splits(config(path, folder, cache=False, **options), chat_tokenizer)
    cold = load_splits(config(path, folder, **options), chat_tokenizer)
    warm = load_splits(config(path, folder, **options), chat_tokenizer)
    assert isinstance(warm.train, SequenceView)
    assert splits_plain(cold) == splits_plain(warm) == splits_plain(in_memory)
    if options["max_len"] == 96:
        assert in_memory.train_fit.dropped_too_long + in_memory.train_fit.truncated + \
               in_memory.valid_fit.dropped_too_long + in_memory.valid_fit.truncated == 1


@pytest.mark.parametrize("record", [lambda i: {"text": f"flour sugar {i} 日本語"},
                                    lambda i: {"prompt": f"Question {i}:", "completion": " Paris"}])
def test_text_and_completion_files_from_the_cache(tmp_path, chat_tokenizer, record):
    from tunekit.data.dataset import load_splits

    path, folder = tmp_path / "train.jsonl", tmp_path / "cache"
    path.write_text("".join(json.dumps(record(i)) + "\n" for i in range(10)))
    cached = load_splits(config(path, folder, validation_fraction=0.2), chat_tokenizer)
    assert splits_plain(cached) == splits_plain(load_splits(config(path, folder, cache=False,
                                                                    validation_fraction=0.2), chat_tokenizer))
    assert cached.train[0].source["format"] in ("text", "completion")


def test_validation_file_from_the_cache(tmp_path, chat_tokenizer):
    from tunekit.data.dataset import load_splits

    train, valid, folder = write(tmp_path / "t.jsonl", 12), write(tmp_path / "v.jsonl", 5, "reply"), tmp_path / "c"
    cached = load_splits(config(train, folder, validation=valid), chat_tokenizer)
    plain_ = load_splits(config(train, folder, validation=valid, cache=False), chat_tokenizer)
    assert splits_plain(cached) == splits_plain(plain_)
    assert {s.source["file"] for s in cached.valid} == {str(valid)}


def test_memory_does_not_grow_with_tokens(tmp_path):
    """Opening and fitting an entry of 100,000 sequences (2.4M tokens) allocates per-sequence arrays only."""
    import tracemalloc

    from tunekit.data.dataset import fit_store
    from tunekit.data.types import IGNORE, Sequence

    def examples():
        for e in range(100_000):
            ids = [(e + k) % 500 for k in range(24)]
            yield e + 1, [Sequence(ids, [IGNORE] * 12 + ids[12:], {"turns": [1]})]

    cache.store_stream(tmp_path, "k", {}, tmp_path / "big.jsonl", examples())
    tracemalloc.start()
    store = cache.open_entry(tmp_path, "k", tmp_path / "big.jsonl")
    view, report = fit_store(store, list(range(store.n_examples)), 16, "truncate")
    lengths = view.lengths()
    first, last = view[0], view[len(view) - 1]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.truncated == 100_000 and report.tokens == 1_600_000 and len(lengths) == 100_000
    assert first.input_ids == list(range(16)) and first.labels == [IGNORE] * 12 + [12, 13, 14, 15]
    assert last.source == {"file": str(tmp_path / "big.jsonl"), "line": 100_000, "turns": [1]}
    # 2.4M tokens as Python ints would take > 60 MB; the per-sequence arrays and lists take about 12 MB.
    assert peak < 24 * 2**20, peak


def test_damaged_entries_are_rendered_again_and_unwritable_caches_named(tmp_path, chat_tokenizer):
    path, folder = write(tmp_path / "train.jsonl", 6), tmp_path / "cache"
    first = read_examples(path, chat_tokenizer, config(path, folder))
    (entry,) = cache.entries(folder)
    (entry.path / "ids.bin").write_bytes(b"\0\0")  # cut short
    assert cache.entries(folder) == []
    assert plain(read_examples(path, chat_tokenizer, config(path, folder))) == plain(first)
    (entry,) = cache.entries(folder)
    (entry.path / "meta.json").write_text("{not json")
    runner = CliRunner()
    info = runner.invoke(app, ["data", "cache", "info", "--dir", str(folder)])
    assert info.exit_code == 0 and "0 entries" in info.output and "Traceback" not in info.output
    assert plain(read_examples(path, chat_tokenizer, config(path, folder))) == plain(first)

    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    with pytest.raises(DataError) as err:
        read_examples(path, chat_tokenizer, config(path, blocked / "cache"))
    (problem,) = err.value.problems
    assert problem.where == "data.cache_dir" and "cannot write" in problem.message and "data.cache: false" in problem.hint


def test_data_check_writes_and_reads_the_entry_training_uses(tmp_path, chat_tokenizer, monkeypatch):
    """`tunekit data check --model` renders through the cache: the first check writes the entry, a second check
    and training read it without rendering, and the statistics equal a check that renders every line itself."""
    from tunekit.data.check import check_file

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    from tunekit.data import render

    path = write(tmp_path / "train.jsonl", 30)
    options = [dict(max_len=40), dict(max_len=40, truncation="truncate"), dict(max_len=None), dict(max_len=2000)]
    fresh = [check_file(path, tokenizer=chat_tokenizer, cache=False, **o).to_dict() for o in options]
    assert cache.entries(tmp_path / "cache") == []
    first = check_file(path, tokenizer=chat_tokenizer, **options[0]).to_dict()
    assert len(cache.entries(tmp_path / "cache")) == 1
    with monkeypatch.context() as m:
        no_rendering(m)
        m.setattr(render, "render_example", lambda *a, **k: pytest.fail("rendered a line the entry holds"))
        again = [check_file(path, tokenizer=chat_tokenizer, **o).to_dict() for o in options]
        trained = read_examples(path, chat_tokenizer, DataConfig(train=path, num_workers=1))
    assert first == fresh[0] and again == fresh
    stats = [f["stats"] for f in fresh]
    assert stats[0]["over_max_len"] > 0 and stats[0]["trained_lost"] > 0  # the limit matters in drop ...
    assert stats[1]["tokens_per_epoch"] > stats[0]["tokens_per_epoch"]  # ... and in truncate
    assert stats[2]["over_max_len"] == stats[3]["over_max_len"] == 0 and stats[2]["trained"]["max"] > 0
    assert sum(len(ex) for ex in trained) == 30


def test_data_check_of_a_file_that_cannot_be_rendered_reports_each_line(tmp_path, chat_tokenizer, monkeypatch):
    from tunekit.data.check import check_file

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    path = write(tmp_path / "train.jsonl", 12)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "only a question"}]})  # nothing to train
    lines[7] = "{broken"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = check_file(path, tokenizer=chat_tokenizer).to_dict()
    assert report == check_file(path, tokenizer=chat_tokenizer, cache=False).to_dict()
    assert {p["line"] for p in report["problems"] if p["severity"] == "error"} >= {8}
    assert cache.entries(tmp_path / "cache") == []  # a file training refuses is not cached
