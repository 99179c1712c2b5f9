"""Trackers with the real libraries: W&B offline, TensorBoard event files, MLflow's local file store.

Each run is read back with the library's own reader. No network is touched: W&B runs in offline mode
(asserted on the run object) and every socket this process connects goes to loopback or a Unix socket.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
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
    assert problem.where == "output.wandb" and "TUNEKIT_EXTRAS=trackers bash scripts/setup.sh" in problem.hint


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


# --------------------------------------------------------------------------------------------------
# A tracker that cannot be reached: refused up front in seconds; one that goes away mid-run: switched off


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_is_refused_before_training_within_seconds(tmp_path, tiny_llama_dir):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 3},
                     output={"tensorboard": True, "mlflow": {"tracking_uri": uri, "experiment": "my-exp"},
                             "wandb": {"project": "p", "mode": "offline"}})
    started = time.monotonic()
    problems = trackers.reach(cfg, cfg.output.dir)
    assert time.monotonic() - started < trackers.REACH_TIMEOUT_S + 1
    (problem,) = problems  # TensorBoard's folder is writable, W&B offline needs nothing
    assert problem.where == "output.mlflow.tracking_uri" and uri in problem.message
    assert "mlflow server" in problem.hint and "RUN_DIR/mlruns" in problem.hint

    # The CLI: every problem at once, exit 1, no traceback, nothing written, in seconds (imports included).
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml(), encoding="utf-8")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tunekit.cli", "train", str(config)], capture_output=True,
                          text=True, timeout=120)
    elapsed = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "output.mlflow.tracking_uri" in out and "does not answer" in out and "Traceback" not in out
    assert not Path(cfg.output.dir).exists()
    assert elapsed < 60, f"the refusal took {elapsed:.1f} s"


def test_wandb_online_without_a_key_or_server_is_refused_with_the_offline_hint(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    cfg = config_from_dict({"model": {"base": "org/m"}, "data": {"train": "t.jsonl"},
                            "output": {"dir": str(tmp_path / "run"), "wandb": {"project": "p"}}}, check_files=False)
    problems = trackers.reach(cfg, cfg.output.dir)
    assert [p.where for p in problems] == ["output.wandb.mode", "output.wandb.mode"]
    assert "no API key" in problems[0].message and "wandb login" in problems[0].hint
    assert "does not answer" in problems[1].message and "mode: offline" in problems[1].hint
    # offline (in the config or through WANDB_MODE) needs neither
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.reach(cfg, cfg.output.dir) == []


def test_tensorboard_folder_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = config_from_dict({"model": {"base": "org/m"}, "data": {"train": "t.jsonl"},
                            "output": {"dir": str(blocker / "run"), "tensorboard": True}}, check_files=False)
    (problem,) = trackers.reach(cfg, cfg.output.dir)
    assert problem.where == "output.tensorboard" and "not a folder" in problem.message


class _MlflowStub(http.server.ThreadingHTTPServer):
    """Answers the MLflow REST calls a run makes (experiment, run, log-batch, artifacts) and records the
    metrics; `stop_after` log-batch calls with metrics, it shuts down (the server going away mid-run)."""

    daemon_threads = True

    def __init__(self, stop_after: int):
        self.metrics: list[dict] = []
        self.stop_after = stop_after
        self.gone = threading.Event()
        super().__init__(("127.0.0.1", 0), _MlflowHandler)


class _MlflowHandler(http.server.BaseHTTPRequestHandler):
    RUN = {"info": {"run_id": "r1", "run_uuid": "r1", "experiment_id": "1", "run_name": "run", "status": "RUNNING",
                    "start_time": 0, "artifact_uri": "mlflow-artifacts:/1/r1/artifacts", "lifecycle_stage": "active"},
           "data": {}}

    def log_message(self, *args):
        pass

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(size) if size else b""
        path = self.path.split("?")[0]
        if path.endswith("experiments/get-by-name"):
            return self._answer({"experiment": {"experiment_id": "1", "name": "my-exp", "lifecycle_stage": "active",
                                                "artifact_location": "mlflow-artifacts:/1"}})
        if path.endswith("runs/create") or path.endswith("runs/get"):
            return self._answer({"run": self.RUN})
        if path.endswith("runs/log-batch"):
            metrics = json.loads(body or b"{}").get("metrics", [])
            if metrics:
                self.server.metrics += metrics
                steps = {m["step"] for m in self.server.metrics if m["key"] == "train_loss"}
                if len(steps) >= self.server.stop_after and not self.server.gone.is_set():
                    self.server.gone.set()
                    threading.Thread(target=lambda: (self.server.shutdown(), self.server.server_close())).start()
        self._answer({})

    do_GET = do_POST = do_PUT = do_PATCH = _handle


def test_mlflow_server_going_away_mid_run_is_one_warning_and_the_run_finishes(tmp_path, tiny_llama_dir,
                                                                              monkeypatch, capsys):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stub = _MlflowStub(stop_after=2)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{stub.server_address[1]}"
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 6, "save_every": 2},
                     output={"mlflow": {"tracking_uri": uri, "experiment": "my-exp"}})
    result = train(cfg)
    assert stub.gone.is_set()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # every step, after the server went away too
    assert {m["step"] for m in stub.metrics if m["key"] == "train_loss"} == {1, 2}
    assert (result.run_dir / "final").is_dir()
    assert "step-000004" in {p.name for p in (result.run_dir / "checkpoints").iterdir()}  # saved after it went
    (warning,) = [json.loads(x) for x in (result.run_dir / trackers.WARNINGS_FILE).read_text().splitlines()]
    assert warning["tracker"] == "mlflow" and warning["step"] == 3
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the run's console writes to stderr
    assert out.count("warning:") == 1 and "mlflow stopped working at step 3" in " ".join(out.split())
    assert "Traceback" not in out
