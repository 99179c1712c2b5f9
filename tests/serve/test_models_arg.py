"""MODEL arguments: names and what is loaded for them (no weights loaded here)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")

from tunekit.errors import TunekitError  # noqa: E402
from tunekit.generate.models import ModelSpec, _plan, load_models, parse_model_arg  # noqa: E402
from tunekit.serve.app import ServeSettings, check_exposure  # noqa: E402


def test_names(tmp_path, monkeypatch):
    from tunekit import locate

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert parse_model_arg(str(model_dir)) == ModelSpec("my-model", str(model_dir))
    assert parse_model_arg(f"org/name:v1={model_dir}") == ModelSpec("org/name:v1", str(model_dir))
    monkeypatch.setattr(locate, "hub_reachable", lambda: True)
    assert parse_model_arg("Qwen/Qwen2.5-0.5B-Instruct") == ModelSpec("Qwen/Qwen2.5-0.5B-Instruct",
                                                                       "Qwen/Qwen2.5-0.5B-Instruct")


def test_relative_paths_are_made_absolute_against_the_start_folder(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny-chat").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "models" / "tiny-chat")
    assert parse_model_arg("models/tiny-chat") == ModelSpec("tiny-chat", absolute)
    assert parse_model_arg("base=models/tiny-chat") == ModelSpec("base", absolute)
    assert parse_model_arg("base=tiny-chat", tmp_path / "models") == ModelSpec("base", absolute)
    assert ServeSettings(data_dir="serve-data").data_dir == tmp_path / "serve-data"


def test_a_bare_adapter_dir_shares_the_base_it_names(tmp_path):
    adapter = tmp_path / "step-000010"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "base")}))
    (tmp_path / "base").mkdir()
    key, adapter_dir, _ = _plan(ModelSpec("ckpt", str(adapter)))
    assert key == str((tmp_path / "base").resolve()) and adapter_dir == adapter


def test_duplicate_names_are_refused(tmp_path):
    with pytest.raises(TunekitError, match="two models are named x"):
        load_models([ModelSpec("x", str(tmp_path)), ModelSpec("x", str(tmp_path))])


def test_exposure():
    check_exposure(ServeSettings(host="127.0.0.1"))
    check_exposure(ServeSettings(host="::1"))
    check_exposure(ServeSettings(host="0.0.0.0", api_keys=["k"]))
    with pytest.raises(TunekitError, match="no API key"):
        check_exposure(ServeSettings(host="0.0.0.0"))
    with pytest.raises(TunekitError, match="no API key"):
        check_exposure(ServeSettings(host="192.168.1.5"))
