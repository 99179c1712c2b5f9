"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each imported only when configured.

What a run logs to each: the resolved config at the start, every metrics row (train and validation
losses, lr, grad norm, tokens/s) at its step, the final summary at the end, and the evaluation verdict
with its headline numbers when the run evaluates itself. Nothing is sent anywhere unless the config asks
for it: W&B honours `output.wandb.mode` (offline writes the run under RUN_DIR/wandb for `wandb sync`),
MLflow writes to `output.mlflow.tracking_uri` (default: $MLFLOW_TRACKING_URI, else a local file store
in RUN_DIR/mlruns), TensorBoard writes event files under RUN_DIR/tensorboard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tunekit.config import RunConfig
from tunekit.errors import Problem

# Config key -> (module to import, what to pip install).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
# Folders trackers write inside the run dir (removed with the run on output.overwrite).
RUN_DIR_FOLDERS = ("tensorboard", "wandb", "mlruns")


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
                                    f"pip install 'tunekit[trackers]' (or {package}), or remove output.{name}"))
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


@dataclass
class Trackers:
    """The open trackers of one run (None for those not configured)."""

    tb: Any = None
    wandb: Any = None
    mlflow: Any = None

    @classmethod
    def start(cls, cfg: RunConfig, run_dir: Path, *, resume: bool = False) -> Trackers:
        t = cls()
        config = cfg.model_dump(mode="json")
        if cfg.output.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            t.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            t.tb.add_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", 0)
        if cfg.output.wandb is not None:
            import wandb

            w = cfg.output.wandb
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            t.wandb = wandb.init(project=w.project, entity=w.entity, name=w.name or Path(run_dir).name,
                                 tags=w.tags or None, mode=w.mode, dir=str(run_dir), config=config,
                                 resume="allow" if resume else None)
        if cfg.output.mlflow is not None:
            import mlflow

            uri = mlflow_uri(cfg, run_dir)
            if uri.startswith("file:") or "://" not in uri:
                # MLflow 3 keeps its local file store in maintenance mode and refuses it unless this
                # documented opt-out is set; a local store is what a local-first run wants.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(cfg.output.mlflow.experiment)
            mlflow.start_run(run_name=Path(run_dir).name)
            mlflow.log_params(_flat(config))
            mlflow.log_dict(config, "config.json")
            t.mlflow = mlflow
        return t

    def log(self, row: dict) -> None:
        """One metrics row (as written to metrics.jsonl) at its step."""
        numbers, step = _numbers(row), int(row["step"])
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics(numbers, step=step)

    def log_summary(self, summary: dict, name: str = "summary") -> None:
        """A final summary (summary.json, or the evaluation's verdict and numbers) as run-level values."""
        numbers = {k: v for k, v in _flat(summary).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if self.tb is not None:
            self.tb.add_text(name, "```json\n" + json.dumps(summary, indent=1) + "\n```", 0)
        if self.wandb is not None:
            self.wandb.summary.update({f"{name}/{k}": v for k, v in _flat(summary).items()})
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in numbers.items()})
            self.mlflow.log_dict(summary, f"{name}.json")

    def close(self, *, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
