"""Trackers with the real libraries: W&B offline, TensorBoard event files, MLflow's local file store.

Each run is read back with the library's own reader. No network is touched: W&B runs in offline mode
(asserted on the run object) and every socket this process connects goes to loopback or a Unix socket.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from toy_runs import toy_config, write_toy_chat

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError
from tunekit.train import trackers
from tunekit.train.loop import train


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if this process connects a socket anywhere but loopback / a Unix socket."""
    seen = []
    real_connect = socket.socket.connect

    def connect(self, address):
        seen.append(address)
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a tracker tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def test_tracker_sections_validate_and_old_list_form_gets_a_hint(tmp_path):
    cfg = config_from_dict({"model": {"base": "org/m"}, "data": {"train": "t.jsonl"},
                            "output": {"tensorboard": True, "wandb": {"project": "p", "mode": "offline",
                                                                      "tags": ["a"]}, "mlflow": {}}},
                           check_files=False)
    assert trackers.configured(cfg) == ["tensorboard", "wandb", "mlflow"]
    assert cfg.output.mlflow.experiment == "tunekit" and cfg.output.wandb.tags == ["a"]
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"base": "org/m"}, "data": {"train": "t.jsonl"},
                          "output": {"trackers": ["wandb"], "wandb": {"mode": "sometimes"}}}, check_files=False)
    hints = {p.where.split()[-1]: p.hint for p in err.value.problems}
    assert "output.wandb" in hints["output.trackers"]
    assert "offline" in hints["output.wandb.mode"]


def test_missing_tracker_package_is_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "find_spec", lambda name: None if name == "wandb" else object())
    cfg = config_from_dict({"model": {"base": "org/m"}, "data": {"train": "t.jsonl"},
                            "output": {"wandb": {}, "tensorboard": True}}, check_files=False)
    (problem,) = trackers.check(cfg)
    assert problem.where == "output.wandb" and "tunekit[trackers]" in problem.hint


def _wandb_records(run_dir: Path) -> list[dict]:
    """Records of the run's .wandb log, printed by wandb's own reader (`wandb leet inspect --json`)."""
    (log,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_three_trackers_hold_the_losses_summary_and_config(tmp_path, tiny_llama_dir, loopback_only, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    held_out = write_toy_chat(tmp_path / "held_out.jsonl", 3, seed=1)
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 3},
                     eval={"enabled": True, "data": str(held_out), "max_new_tokens": 4, "batch_size": 3},
                     output={"tensorboard": True, "mlflow": {"experiment": "toy"},
                             "wandb": {"project": "toy", "mode": "offline", "tags": ["test"]}})
    started = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: started.append(real_init(**kw)) or started[-1])
    result = train(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train_loss"] for r in rows}
    assert sorted(losses) == [1, 2, 3]

    # W&B: offline, and its own log holds every step's loss, the config and the summary.
    (run,) = started
    assert run.offline and run.settings.mode == "offline"
    records = _wandb_records(result.run_dir)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert {s: h["train_loss"] for s, h in history.items()} == pytest.approx(losses)
    config = next(r for r in records if r["type"] == "run")["run"]["config"]["update"]
    assert config["train"]["max_steps"] == 3 and config["output"]["wandb"]["project"] == "toy"
    summaries = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"].get("update", {}).items()}
    assert summaries["summary/steps"] == 3
    assert summaries["summary/trained_tokens"] == rows[-1]["trained_tokens"]

    # TensorBoard: the event files hold the scalars, read with tensorboard's event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train_loss")} == pytest.approx(losses)
    assert "valid_loss" in acc.Tags()["scalars"]

    # MLflow: the local file store under the run dir holds the metric history and the summary.
    mlflow.set_tracking_uri((result.run_dir / "mlruns").as_uri())
    (found,) = mlflow.search_runs(experiment_names=["toy"], output_format="list")
    got = mlflow.get_run(found.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["train_loss"] == pytest.approx(losses[3])
    assert got.data.metrics["summary.steps"] == 3
    assert got.data.params["train.max_steps"] == "3"
    # The evaluation after training: its verdict and each candidate's numbers, as in results.json.
    results = json.loads((result.run_dir / "eval" / "results.json").read_text())
    logged = json.loads((Path(got.info.artifact_uri.removeprefix("file://")) / "eval.json").read_text())
    assert logged["verdict"] == results["verdict"] and logged["verdict"]
    tuned = results["candidates"][0]
    assert got.data.metrics[f"eval.{tuned['name']}.loss"] == pytest.approx(tuned["metrics"]["loss"])
    assert json.loads(summaries["eval/verdict"]) == results["verdict"]
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "train_loss")
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    # The guard raises on a non-loopback connect, but a tracker may swallow that error and go on offline:
    # the record of every address is checked here as well.
    assert all(a[0] in ("127.0.0.1", "::1", "localhost") for a in loopback_only if isinstance(a, tuple))
