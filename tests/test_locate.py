"""Where a model argument points (tunekit.locate): a local folder made absolute, a hub id, or a clear error."""

from __future__ import annotations

import pytest

from tunekit import locate
from tunekit.config import config_from_dict
from tunekit.errors import ConfigError, Problem


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: locate sets it when the hub is away
    monkeypatch.setattr(locate, "hub_reachable", lambda: False)


def test_a_local_folder_is_made_absolute_against_the_folder_given(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert locate.locate_model("models/m", tmp_path) == str(tmp_path / "models" / "m")
    monkeypatch.chdir(tmp_path / "models")
    assert locate.locate_model("m") == str(tmp_path / "models" / "m")  # default: the working directory
    assert locate.locate_model(str(tmp_path / "models" / "m"), tmp_path / "elsewhere") == str(tmp_path / "models" / "m")


def test_hub_ids_pass_when_the_hub_answers(tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "hub_reachable", lambda: True)
    assert locate.locate_model("Qwen/Qwen2.5-0.5B-Instruct", tmp_path) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert locate.locate_model("gpt2", tmp_path) == "gpt2"


@pytest.mark.parametrize("text", ["models/tiny-chatt", "gpt2"])
def test_an_unreachable_hub_id_not_in_the_cache_names_the_folder_looked_for(text, tmp_path, no_hub):
    import os

    problem = locate.locate_model(text, tmp_path, field="model.base")
    assert isinstance(problem, Problem) and problem.where == "model.base"
    assert str(tmp_path / text) in problem.message and "cannot be reached" in problem.message
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # hub libraries then fail at once


@pytest.mark.parametrize("text", ["./tiny-chat", "../models/x", "/no/such/dir", "a/b/c", "no such model!", "x/"])
def test_a_path_that_is_not_there_and_no_hub_id_is_refused(text, tmp_path, monkeypatch):
    monkeypatch.setattr(locate, "hub_reachable", lambda: True)  # even with a hub, these are not hub ids
    problem = locate.locate_model(text, tmp_path)
    assert isinstance(problem, Problem) and "no such model folder" in problem.message, problem


def test_config_model_base_relative_to_the_config_and_refused_at_once_when_missing(tmp_path, no_hub):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg = config_from_dict({"model": {"base": "models/m"}, "data": {"train": "train.jsonl"}}, base_dir=tmp_path)
    assert cfg.model.base == str(tmp_path / "models" / "m")
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"model": {"base": "models/n"}, "data": {"train": "train.jsonl"}}, base_dir=tmp_path)
    assert str(tmp_path / "models" / "n") in str(refused.value)
