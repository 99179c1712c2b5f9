"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each imported only when configured.

What a run logs to each: the resolved config at the start, every metrics row (train and validation
losses, lr, grad norm, tokens/s) at its step, the final summary at the end, and the evaluation verdict
with its headline numbers when the run evaluates itself. Nothing is sent anywhere unless the config asks
for it: W&B honours `output.wandb.mode` (offline writes the run under RUN_DIR/wandb for `wandb sync`),
MLflow writes to `output.mlflow.tracking_uri` (default: $MLFLOW_TRACKING_URI, else a local file store
in RUN_DIR/mlruns), TensorBoard writes event files under RUN_DIR/tensorboard.

Two promises. Before any weight loads, `reach` checks each configured tracker the way it will be used
(TensorBoard: the run dir can be written; MLflow: the tracking server answers its API within
REACH_TIMEOUT_S, or a local store's folder can be written; W&B online: an API key is found and the W&B
server answers), so a tracker that cannot work is a config problem reported at once. During the run a
tracker that fails (its server goes away) is switched off with one warning; training, metrics.jsonl and
checkpoints never depend on it.
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tunekit.config import RunConfig
from tunekit.errors import Problem, install_command

# Config key -> (module to import, the package that provides it).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
# Folders trackers write inside the run dir (removed with the run on output.overwrite).
RUN_DIR_FOLDERS = ("tensorboard", "wandb", "mlruns")
# Seconds a reachability check waits for a tracker's server (each check, once, before training).
REACH_TIMEOUT_S = 3.0
# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff factor 2, 120 s
# timeout): bounded here so that a server going away mid-run costs seconds, not the run. Set these
# environment variables yourself to choose other values.
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def configured(cfg: RunConfig) -> list[str]:
    out = cfg.output
    return [name for name, on in (("tensorboard", out.tensorboard), ("wandb", out.wandb is not None),
                                  ("mlflow", out.mlflow is not None)) if on]


def check(cfg: RunConfig) -> list[Problem]:
    """A configured tracker whose package is missing, named with the install command (no import here)."""
    problems = []
    for name in configured(cfg):
        module, package = PACKAGES[name]
        if find_spec(module) is None:
            problems.append(Problem(f"output.{name}", f"{name} is configured but {package} is not installed",
                                    f"{install_command('trackers')} (it installs {package}), or remove output.{name}"))
    return problems


def reach(cfg: RunConfig, run_dir: Path) -> list[Problem]:
    """Each configured tracker checked the way the run will use it, every problem at once; each network
    check waits at most REACH_TIMEOUT_S. Packages are not imported (see `check` for a missing one)."""
    problems = []
    if cfg.output.tensorboard:
        problems += _writable(Path(run_dir) / "tensorboard", "output.tensorboard",
                              "choose an output.dir you can write, or set output.tensorboard: false")
    if cfg.output.mlflow is not None:
        problems += _mlflow_reach(cfg, Path(run_dir))
    if cfg.output.wandb is not None:
        problems += _wandb_reach(cfg)
    return problems


def _writable(folder: Path, where: str, hint: str) -> list[Problem]:
    """The folder, or its nearest existing parent, is a writable directory."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return [Problem(where, f"{probe} is not a folder, so {folder} cannot be created", hint)]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [Problem(where, f"{probe} is not writable, so nothing can be logged to {folder}", hint)]
    return []


def _get(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
    """(HTTP status, '') when the server answers, (None, reason) when it does not within REACH_TIMEOUT_S."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=REACH_TIMEOUT_S) as r:
            return r.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, str(reason) if str(reason) else type(reason).__name__


def _mlflow_reach(cfg: RunConfig, run_dir: Path) -> list[Problem]:
    uri = mlflow_uri(cfg, run_dir)
    where = "output.mlflow.tracking_uri" if cfg.output.mlflow.tracking_uri else "output.mlflow"
    source = "output.mlflow.tracking_uri" if cfg.output.mlflow.tracking_uri else (
        "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the default RUN_DIR/mlruns")
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        query = urllib.parse.urlencode({"experiment_name": cfg.output.mlflow.experiment})
        headers = {}
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        status, reason = _get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}", headers)
        if status is None:
            return [Problem(where, f"the MLflow tracking server at {uri} (from {source}) does not answer within "
                                   f"{REACH_TIMEOUT_S:g} s: {reason}",
                            "start it (mlflow server --host 127.0.0.1 --port PORT), point output.mlflow.tracking_uri "
                            "at one that answers, or leave tracking_uri out to log to RUN_DIR/mlruns")]
        if status in (401, 403):
            return [Problem(where, f"the MLflow tracking server at {uri} refuses the credentials (HTTP {status})",
                            "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")]
        if status not in (200, 404):  # 404: the experiment does not exist yet (it is created)
            return [Problem(where, f"{uri} answered HTTP {status} to MLflow's experiments API: it does not look "
                                   "like an MLflow tracking server", "check output.mlflow.tracking_uri")]
        return []
    if scheme == "file" or "://" not in uri:
        folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path)) if scheme == "file" else Path(uri)
        return _writable(folder, where, "point output.mlflow.tracking_uri at a folder you can write")
    return []  # other stores (databricks, a database URI) are checked by MLflow itself when the run starts


def _wandb_mode(cfg: RunConfig) -> str:
    mode = cfg.output.wandb.mode or os.environ.get("WANDB_MODE") or "online"
    return "offline" if mode == "dryrun" else mode


def _wandb_reach(cfg: RunConfig) -> list[Problem]:
    if _wandb_mode(cfg) != "online":
        return []
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urllib.parse.urlparse(base).hostname or base
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            found = None
        key = found[2] if found else None
    problems = []
    if not key:
        problems.append(Problem("output.wandb.mode", f"W&B runs online but no API key for {host} is found "
                                                     "(WANDB_API_KEY or ~/.netrc)",
                                "run `wandb login` (or set WANDB_API_KEY), or set output.wandb.mode: offline "
                                "and upload later with `wandb sync`"))
    status, reason = _get(base, {})
    if status is None:
        problems.append(Problem("output.wandb.mode", f"W&B runs online but {base} does not answer within "
                                                     f"{REACH_TIMEOUT_S:g} s: {reason}",
                                "set output.wandb.mode: offline (upload later with `wandb sync RUN_DIR/wandb/"
                                "offline-run-*`), or set WANDB_BASE_URL to a W&B server that answers"))
    return problems


def mlflow_uri(cfg: RunConfig, run_dir: Path) -> str:
    """The MLflow tracking URI: the config's, else $MLFLOW_TRACKING_URI, else RUN_DIR/mlruns (a file store)."""
    uri = cfg.output.mlflow.tracking_uri if cfg.output.mlflow else None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / "mlruns").as_uri()
    return uri


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and None as text (MLflow params are strings)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and k != "step"}


# One line per tracker warning in the run dir ({"step", "tracker", "message"}): the jobs API's worker turns
# them into job events.
WARNINGS_FILE = "tracker_warnings.jsonl"


@dataclass
class Trackers:
    """The open trackers of one run (None for those not configured or switched off after a failure).

    Every call into a tracker goes through `_call`: an exception switches that tracker off for the rest of
    the run, with one warning (printed through `warn` and appended to RUN_DIR/WARNINGS_FILE)."""

    tb: Any = None
    wandb: Any = None
    mlflow: Any = None
    run_dir: Path | None = None
    warn: Callable[[str], None] = print
    step: int = 0  # the last step logged (named in a warning)
    failed: dict[str, str] = field(default_factory=dict)  # tracker -> why it was switched off

    @classmethod
    def start(cls, cfg: RunConfig, run_dir: Path, *, resume: bool = False,
              warn: Callable[[str], None] = print) -> Trackers:
        t = cls(run_dir=Path(run_dir), warn=warn)
        config = cfg.model_dump(mode="json")
        if cfg.output.tensorboard:
            t.tb = t._call("tensorboard", lambda: _start_tensorboard(cfg, run_dir))
        if cfg.output.wandb is not None:
            t.wandb = t._call("wandb", lambda: _start_wandb(cfg, run_dir, config, resume))
        if cfg.output.mlflow is not None:
            t.mlflow = t._call("mlflow", lambda: _start_mlflow(cfg, run_dir, config))
        return t

    def _call(self, name: str, fn: Callable[[], Any]) -> Any:
        """fn() for tracker `name`; on an exception the tracker is switched off and None returned."""
        if name in self.failed:
            return None
        try:
            return fn()
        except Exception as exc:  # any failure of a tracker library: the run must go on without it
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            self.failed[name] = reason
            attr = "tb" if name == "tensorboard" else name
            setattr(self, attr, None)
            message = (f"{name} stopped working at step {self.step} and is switched off for the rest of this run "
                       f"({type(exc).__name__}: {reason}); training goes on and metrics.jsonl holds every step")
            self.warn(message)
            if self.run_dir is not None and self.run_dir.is_dir():
                with open(self.run_dir / WARNINGS_FILE, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"step": self.step, "tracker": name, "message": message}) + "\n")
            return None

    def log(self, row: dict) -> None:
        """One metrics row (as written to metrics.jsonl) at its step."""
        numbers, step = _numbers(row), int(row["step"])
        self.step = step
        if self.tb is not None:
            self._call("tensorboard", lambda: [self.tb.add_scalar(k, v, step) for k, v in numbers.items()])
        if self.wandb is not None:
            self._call("wandb", lambda: self.wandb.log(numbers, step=step))
        if self.mlflow is not None:
            self._call("mlflow", lambda: self.mlflow.log_metrics(numbers, step=step))

    def log_summary(self, summary: dict, name: str = "summary") -> None:
        """A final summary (summary.json, or the evaluation's verdict and numbers) as run-level values."""
        numbers = {k: v for k, v in _flat(summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if self.tb is not None:
            self._call("tensorboard", lambda: self.tb.add_text(name, "```json\n" + json.dumps(summary, indent=1)
                                                               + "\n```", 0))
        if self.wandb is not None:
            self._call("wandb", lambda: self.wandb.summary.update({f"{name}/{k}": v
                                                                   for k, v in _flat(summary).items()}))
        if self.mlflow is not None:
            def to_mlflow():
                self.mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in numbers.items()})
                self.mlflow.log_dict(summary, f"{name}.json")
            self._call("mlflow", to_mlflow)

    def close(self, *, failed: bool = False) -> None:
        if self.tb is not None:
            self._call("tensorboard", self.tb.close)
        if self.wandb is not None:
            self._call("wandb", lambda: self.wandb.finish(exit_code=1 if failed else 0))
        if self.mlflow is not None:
            self._call("mlflow", lambda: self.mlflow.end_run(status="FAILED" if failed else "FINISHED"))


def _start_tensorboard(cfg: RunConfig, run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    tb.add_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", 0)
    return tb


def _start_wandb(cfg: RunConfig, run_dir: Path, config: dict, resume: bool):
    import wandb

    w = cfg.output.wandb
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=w.project, entity=w.entity, name=w.name or Path(run_dir).name,
                      tags=w.tags or None, mode=w.mode, dir=str(run_dir), config=config,
                      resume="allow" if resume else None)


def _start_mlflow(cfg: RunConfig, run_dir: Path, config: dict):
    import mlflow

    uri = mlflow_uri(cfg, run_dir)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its local file store in maintenance mode and refuses it unless this
        # documented opt-out is set; a local store is what a local-first run wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.output.mlflow.experiment)
    mlflow.start_run(run_name=Path(run_dir).name)
    mlflow.log_params(_flat(config))
    mlflow.log_dict(config, "config.json")
    return mlflow
