from pathlib import Path

import pytest

from tunekit.config import load_config
from tunekit.errors import ConfigError


@pytest.fixture(autouse=True)
def hub_answers(monkeypatch):
    """These configs name a hub id (org/model) and are checked as if the hub answered; what happens when it
    does not is test_locate.py's."""
    from tunekit import locate

    monkeypatch.setattr(locate, "hub_reachable", lambda: True)


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_config_resolves_paths_against_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  base: org/model\ndata:\n  train: train.jsonl\n"))
    assert cfg.data.train == tmp_path / "train.jsonl"
    assert cfg.method == "lora" and cfg.train.lr == "auto"


def test_all_problems_reported_at_once_with_lines_and_hints(tmp_path):
    path = write(tmp_path, "model:\n  base: org/model\ndata:\n  train: train.jsonl\n  max_lenn: 5\n"
                           "train:\n  lr: -1\n  scheduler: wavy\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert f"{path}:5 data.max_lenn" in text and "did you mean 'max_len'" in text
    assert f"{path}:7 train.lr" in text
    assert f"{path}:8 train.scheduler" in text and "cosine" in text
    assert len(info.value.problems) == 3


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "model:\n  base: org/model\ndata:\n  train: train.jsonl\n")
    cfg = load_config(path, ["train.lr=2e-4", "lora.r=8", "data.packing=false"])
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.lora.r == 8 and cfg.data.packing is False
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(path, ["train.nope=1"])


def test_yes_no_are_words_for_literals_and_booleans_for_bools(tmp_path):
    # YAML 1.1 would read a bare `no` as false; configs read it as the word, and bool fields still take it.
    path = write(tmp_path, "model:\n  base: org/model\ndata:\n  train: train.jsonl\n  packing: no\n"
                           "train:\n  mixed_precision: no\n  gradient_checkpointing: yes\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.data.packing is False and cfg.train.gradient_checkpointing is True
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(path, ["data.packing=true"]).data.packing is True
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="'no' or 'bf16'"):
        load_config(path, ["train.mixed_precision=yes"])


def test_missing_files_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: ./nowhere\ndata:\n  train: missing.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    wheres = [p.where for p in info.value.problems]
    assert any("data.train" in w for w in wheres) and any("model.base" in w for w in wheres)


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: x\ndata: [\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d"):
        load_config(path)
