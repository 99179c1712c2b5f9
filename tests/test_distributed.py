"""Several processes (torchrun, gloo on CPU) train the same model as one process.

Each test compares a run on 2 processes, started the way users start them (`tunekit train --nproc 2`,
or torchrun itself), with the same config run in this process: same global batch and seed, so the same
rows per step. The batch of 5 rows deals 3 + 2 rows to the two ranks (2 + 1 micro-batches of 2: rank 1
runs a zero-weight filler pass), and the last step of the epoch 2 + 2.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from live_server import free_port
from safetensors.torch import load_file
from toy_runs import toy_config

from tunekit.errors import TunekitError
from tunekit.train.loop import train

REL = 1e-5  # fp32: summation order differs (all-reduce), nothing else


def dist_config(tmp_path: Path, base: Path, name: str, method: str, strategy: str, **train_section):
    cfg = toy_config(tmp_path, base, out=name, method=method, data={"packing": False},
                     train={"batch_size": 5, "epochs": 1, "save_every": 2, "keep_last": 5,
                            "distributed": {"strategy": strategy, "timeout_s": 60}, **train_section})
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.to_yaml())
    return cfg, path


def tunekit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunekit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(rows: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for a, b in zip(rows, reference, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=REL), (a["step"], a, b)
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["train_token_accuracy"] == b["train_token_accuracy"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        if "valid_loss" in b:
            assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=REL)


def assert_same_weights(a: Path, b: Path) -> None:
    (fa,) = a.glob("*.safetensors")
    wa, wb = load_file(str(fa)), load_file(str(b / fa.name))
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("method", "strategy"), [("lora", "ddp"), ("full", "fsdp2"), ("lora", "fsdp2")])
def test_two_processes_train_the_same_model_as_one(tmp_path, tiny_llama_dir, method, strategy):
    one = train(dist_config(tmp_path, tiny_llama_dir, "one", method, strategy)[0])
    cfg, path = dist_config(tmp_path, tiny_llama_dir, "two", method, strategy)
    done = tunekit("train", path, "--nproc", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    two = cfg.output.dir
    assert_same_losses(metrics(two), metrics(one.run_dir))
    assert len(metrics(two)) == 4 and done.stderr.count("step 4/4") == 1  # rank 0 alone prints
    # final/ and the checkpoints hold the same files as a one-process run's, with the same weights.
    assert sorted(os.listdir(two / "final")) == sorted(os.listdir(one.run_dir / "final"))
    assert_same_weights(two / "final", one.run_dir / "final")
    for step in ("step-000002", "step-000004"):
        ours, theirs = two / "checkpoints" / step, one.run_dir / "checkpoints" / step
        # FSDP2 writes the optimizer state sharded, each rank its own part (optimizer/, torch.distributed.checkpoint).
        sharded = {"optimizer"} if strategy == "fsdp2" else set()
        assert set(os.listdir(ours)) == set(os.listdir(theirs)) | sharded
        assert_same_weights(ours, theirs)
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["processes"], summary["strategy"]) == (2, strategy)

    # The 2-process checkpoint at step 2 resumed (DDP: on 2 processes; FSDP2: on 1, resharding the optimizer
    # state): steps 3 and 4 as in the one-process run.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed, ignore=shutil.ignore_patterns("final", "step-000004"))
    cfg_resumed, path_resumed = dist_config(tmp_path, tiny_llama_dir, "resumed", method, strategy)
    (resumed / "config.yaml").write_text(cfg_resumed.to_yaml())  # the copy's own output.dir
    if strategy == "ddp":  # a STOP file (a pause) stops every process after the next step, at a checkpoint
        (resumed / "STOP").touch()
        done = tunekit("train", path_resumed, "--nproc", 2, "--resume")
        assert done.returncode == 3 and "stopped at step 3 on request" in done.stderr, done.stdout + done.stderr
        assert "processes failed" not in done.stderr and not (resumed / "STOP").exists()
        assert (resumed / "checkpoints" / "step-000003").is_dir()
        done = tunekit("train", path_resumed, "--nproc", 2, "--resume")
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        assert train(cfg_resumed, resume=True).summary["processes"] == 1
    assert_same_losses(metrics(resumed), metrics(one.run_dir))
    assert_same_weights(resumed / "final", one.run_dir / "final")

    if strategy == "fsdp2":  # the sharded state's metadata is a pickle: one naming anything else is refused
        metadata = two / "checkpoints" / "step-000004" / "optimizer" / ".metadata"
        marker = tmp_path / "code-ran"
        metadata.write_bytes(pickle.dumps(_RunsCode(marker)))
        shutil.rmtree(two / "final")
        with pytest.raises(TunekitError) as err:
            train(cfg, resume=True)
        assert not marker.exists() and "safely" in err.value.problems[0].message


def one_and_two_processes(tmp_path: Path, base: Path, method: str, sections: dict, train_section: dict):
    """(the result of the config trained in this process, the config of the same run on 2 processes through
    `tunekit train --nproc 2`, which succeeded)."""
    def config(name: str):
        cfg = toy_config(tmp_path, base, out=name, method=method, **sections, train=train_section)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        return cfg, path

    one = train(config("one")[0])
    cfg, path = config("two")
    done = tunekit("train", path, "--nproc", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    return one, cfg


@pytest.mark.parametrize(("method", "strategy"), [("lora", "ddp"), ("full", "fsdp2")])
def test_two_processes_train_the_same_preference_model_as_one(tmp_path, tiny_llama_dir, method, strategy):
    """objective: dpo on 2 processes: the same losses and reward metrics per step as one process, and the same
    weights. LoRA's reference is the adapter switched off on each rank; full's is precomputed once."""
    from test_dpo import write_toy_pairs

    write_toy_pairs(tmp_path / "pairs.jsonl", 25)  # 20 train pairs, 5 validation pairs: 4 steps of 5 pairs
    sections = {"objective": "dpo", "data": {"train": str(tmp_path / "pairs.jsonl"), "packing": False},
                "dpo": {"beta": 0.5}}

    one, cfg = one_and_two_processes(tmp_path, tiny_llama_dir, method, sections, {
        "batch_size": 5, "epochs": 1, "eval_every": 2, "distributed": {"strategy": strategy, "timeout_s": 60}})
    rows, reference = metrics(cfg.output.dir), metrics(one.run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] and len(rows) >= 3
    for a, b in zip(rows, reference, strict=True):
        for key in ("train_loss", "valid_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=REL), (a["step"], key, a, b)
        # Rewards are beta x differences of two summed log-probs (tens of nats each, near each other): REL of
        # each sum is up to ~1e-5 absolute in the difference, whatever the difference's size.
        for key in ("reward_chosen", "reward_rejected", "reward_margin", "valid_reward_margin"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=REL, abs=1e-5), (a["step"], key, a, b)
        assert a["reward_accuracy"] == b["reward_accuracy"]
    # Adam normalises each update, so summation-order noise in a near-zero gradient entry can move that weight by
    # a fraction of lr (5e-3 here): measured at most 1.7e-5 (full, FSDP2) on weights of magnitude ~0.1.
    (fa,) = (cfg.output.dir / "final").glob("*.safetensors")
    ours, theirs = load_file(str(fa)), load_file(str(one.run_dir / "final" / fa.name))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=5e-5, rtol=1e-5, msg=name)
    summary = json.loads((cfg.output.dir / "summary.json").read_text())
    assert (summary["processes"], summary["reference"]) == (2, one.summary["reference"])


def test_two_processes_train_the_same_reinforcement_model_as_one(tmp_path, tiny_llama_dir):
    """objective: grpo on 2 processes (ddp): each rank samples the completions of its share of a step's prompts
    (5 prompts: 3 + 2 of 4 completions, rank 1 runs a zero-weight filler pass), seeded by the prompt's place in the step, so the
    completions, rewards, losses and validation rewards per step are those of one process, and so are the
    weights. A checkpoint mid-generation (steps_per_generation 2) holds each rank's rollouts."""
    from test_grpo import write_prompts

    write_prompts(tmp_path / "prompts.jsonl", 24)  # 19 train prompts, 5 validation: steps of 5, 5, 5, 4 prompts
    sections = {"objective": "grpo", "data": {"train": str(tmp_path / "prompts.jsonl"), "validation_fraction": 0.2},
                "grpo": {"grader": {"type": "string_check", "name": "has", "input": "{{sample.output_text}}",
                                    "reference": "e", "operation": "ilike"},
                         "group_size": 4, "max_new_tokens": 6, "beta": 0.04, "steps_per_generation": 2}}

    one, cfg = one_and_two_processes(tmp_path, tiny_llama_dir, "lora", sections, {
        "batch_size": 5, "micro_batch_size": 4, "epochs": 1, "eval_every": 2, "lr": 1e-2, "save_every": 1,
        "keep_last": 5, "distributed": {"strategy": "ddp", "timeout_s": 60}})
    rows, reference = metrics(cfg.output.dir), metrics(one.run_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for a, b in zip(rows, reference, strict=True):
        for key in ("reward_mean", "reward_std", "no_signal_share", "completion_tokens_mean", "valid_reward_mean"):
            assert a.get(key) == b.get(key), (a["step"], key, a, b)
        for key in ("train_loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key, a, b)
        assert a["trained_tokens"] == b["trained_tokens"]
    assert sum("valid_reward_mean" in r for r in rows) == 2 and rows[-1]["kl"] > 0
    (fa,) = (cfg.output.dir / "final").glob("*.safetensors")
    ours, theirs = load_file(str(fa)), load_file(str(one.run_dir / "final" / fa.name))
    assert ours.keys() == theirs.keys() and ours
    # As for DPO: Adam normalises each update, so summation-order noise in a near-zero gradient entry moves a
    # weight by a fraction of lr (1e-2 here): measured at most 1.7e-5 on weights up to 0.14.
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=5e-5, rtol=1e-5, msg=name)
    # The checkpoint after step 3 is between the two steps of the generation sampled for steps 3 and 4 (5 and 4 of
    # the 19 training prompts): it holds each rank's rollouts, prompts 0, 2, 4 + 0, 2 on rank 0, 1, 3 + 1, 3 on 1.
    state = json.loads((cfg.output.dir / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert [len(set(r["group_of"])) for r in state["grpo_rollouts"]] == [5, 4]
    summary = json.loads((cfg.output.dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["objective"] == "grpo"


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` among the launcher's children."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
    return None


def test_a_killed_rank_ends_the_run_and_resume_matches(tmp_path, tiny_llama_dir):
    """SIGKILL of rank 1 after a checkpoint: the launcher stops rank 0 and names rank 1, in bounded time;
    `--resume --nproc 2` then gives the per-step losses of a run never stopped."""
    section = {"epochs": 3, "keep_last": 2}
    reference = train(dist_config(tmp_path, tiny_llama_dir, "whole", "full", "fsdp2", **section)[0])
    cfg, path = dist_config(tmp_path, tiny_llama_dir, "killed", "full", "fsdp2", **section)
    proc = subprocess.Popen([sys.executable, "-m", "tunekit.cli", "train", str(path), "--nproc", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = cfg.output.dir / "checkpoints" / "step-000002"
    deadline = time.time() + 120
    victim = None
    while victim is None and proc.poll() is None and time.time() < deadline:
        victim = _worker_pid(proc.pid, 1)
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim is not None and ckpt.exists()
    os.kill(victim, signal.SIGSTOP)  # at once (a step takes tens of ms): the run cannot finish without it
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    out, _ = proc.communicate(timeout=90)
    assert time.time() - killed_at < 60, "the other rank should be stopped promptly"
    assert proc.returncode == 1, out
    assert "failed at rank 1" in out and "rank 1: was killed by SIGKILL" in out and "--resume" in out, out
    assert not (cfg.output.dir / "final").exists(), "the run finished before it was killed; use more steps"

    done = tunekit("train", path, "--nproc", 2, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_losses(metrics(cfg.output.dir), metrics(reference.run_dir))
    assert_same_weights(cfg.output.dir / "final", reference.run_dir / "final")


def test_two_nodes_on_one_machine_train_the_same_model(tmp_path, tiny_llama_dir):
    """Two torchrun launches (--nnodes 2, one process each) meeting at 127.0.0.1, as on two machines."""
    one = train(dist_config(tmp_path, tiny_llama_dir, "one", "full", "fsdp2")[0])
    cfg, path = dist_config(tmp_path, tiny_llama_dir, "nodes", "full", "fsdp2")
    port = str(free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                               "-m", "tunekit", "train", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert_same_losses(metrics(cfg.output.dir), metrics(one.run_dir))
    assert_same_weights(cfg.output.dir / "final", one.run_dir / "final")
    assert "2 processes (fsdp2)" in outs[0]


def test_impossible_combinations_are_refused_before_any_process_starts(tmp_path, tiny_llama_dir):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()  # loading weights would fail with another error
    _, path = dist_config(tmp_path, broken, "refused", "qlora", "fsdp2")
    done = tunekit("train", path, "--nproc", 2)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "train.distributed.strategy" in done.stderr and "qlora" in done.stderr, done.stderr
    assert "torch.distributed" not in done.stderr  # refused in the launcher, no worker started
    _, path = dist_config(tmp_path, broken, "deepspeed", "lora", "deepspeed")
    done = tunekit("train", path)
    assert done.returncode == 1 and "deepspeed is not supported" in done.stderr, done.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "deepspeed").exists()
