"""`train.threads: auto`: torch threads from the cores that are free (the quickstart's setting)."""

import os

import pytest
from conftest import REPO

from tunekit.config import load_config
from tunekit.errors import ConfigError
from tunekit.train import loop
from tunekit.train.distributed import SINGLE


@pytest.mark.parametrize(("cores", "load", "processes", "threads"), [
    (2, 0.0, 1, 2),   # idle machine: every core
    (2, 1.0, 1, 2),   # the load is this process reading its data
    (2, 2.0, 1, 1),   # one other busy process: the other core is taken
    (2, 3.2, 1, 1),   # busier than the cores: still one thread
    (16, 5.0, 1, 12),
    (16, 1.0, 4, 4),  # --nproc 4 share the free cores
    (2, 0.0, 4, 1),
])
def test_auto_threads_take_the_free_cores(cores, load, processes, threads):
    assert loop.auto_threads(cores, load, processes) == threads


def test_the_quickstart_config_asks_for_auto_and_the_run_takes_the_rule(monkeypatch):
    cfg = load_config(REPO / "examples/quickstart/config.yaml")
    assert cfg.train.threads == "auto"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert loop.threads_of(cfg, SINGLE) == 1  # two other processes keep both cores busy
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.2, 0.1))
    assert loop.threads_of(cfg, SINGLE) == 2
    assert loop.threads_of(load_config(REPO / "examples/quickstart/config.yaml", ["train.threads=3"]), SINGLE) == 3


def test_threads_other_than_a_number_or_auto_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "examples/quickstart/config.yaml", ["train.threads=many"])
    assert "train.threads" in str(err.value)
