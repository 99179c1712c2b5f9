"""The training loop: loss, accumulation, output dir, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from toy_runs import packed, random_sequences, toy_config

from tunekit.data.pack import collate_packed
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import ConfigError, DataError, TunekitError
from tunekit.model import apply_method, load_base, load_for_inference
from tunekit.train.checkpoint import list_checkpoints
from tunekit.train.hyper import lr_factor, make_plan
from tunekit.train.loop import backward_step, train
from tunekit.train.sft import TrainedNLL, trained_nll


def full_logits_loss(model, batch) -> torch.Tensor:
    """Reference: the whole (B, T, V) logits, mean cross entropy over trained targets."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                   attention_mask=batch.attention_mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(),
                                             ignore_index=IGNORE)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_selective_lm_head_loss_equals_full_logits_loss(tmp_path, tiny_llama_dir, method):
    cfg = toy_config(tmp_path, tiny_llama_dir, method=method)
    model = apply_method(load_base(cfg), cfg)
    batch = collate_packed([random_sequences(4, 0), random_sequences(4, 1)], pad_id=0)
    # A chunk of 64 splits the trained positions over several LM head chunks.
    nll, n, correct = trained_nll(model, batch, chunk=64)
    assert n == batch.num_trained > 64
    reference = full_logits_loss(model, batch)
    torch.testing.assert_close(nll / n, reference, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the token accuracy counted on the way equals the full logits' argmax
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=batch.attention_mask, use_cache=False).logits
        keep = batch.targets != IGNORE
        assert correct == int((logits[keep].argmax(-1) == batch.targets[keep]).sum())
    # Same gradients as the full-logits loss.
    (nll / n).backward()
    ours = grads(model)
    model.zero_grad()
    full_logits_loss(model, batch).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-5)


def test_accumulation_4x2_equals_batch_8(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, method="full")
    model = apply_method(load_base(cfg), cfg)
    rows = [[s] for s in random_sequences(8, 3)]  # uneven trained counts per row
    nll8, n8, _ = backward_step(TrainedNLL(model, 4096), [collate_packed(rows, 0)], "cpu")
    big = grads(model)
    model.zero_grad()
    nll42, n42, _ = backward_step(TrainedNLL(model, 4096), [collate_packed(rows[i:i + 2], 0) for i in range(0, 8, 2)], "cpu")
    assert n8 == n42
    assert nll8 == pytest.approx(nll42, rel=1e-6)
    small = grads(model)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(small[name], big[name], atol=1e-6, rtol=0)


def test_untrained_tokens_give_no_gradient(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, method="full")
    model = apply_method(load_base(cfg), cfg)
    seqs = random_sequences(2, 5)
    backward_step(TrainedNLL(model, 4096), [packed(seqs)], "cpu")
    alone = grads(model)
    model.zero_grad()
    # The same rows, each with an extra packed sequence whose labels are all IGNORE (weight 0 turns):
    # it adds no trained token, so the gradients cannot change.
    silent = Sequence(list(range(10, 30)), [IGNORE] * 20)
    backward_step(TrainedNLL(model, 4096), [collate_packed([[s, silent] for s in seqs], 0)], "cpu")
    for name, g in grads(model).items():
        torch.testing.assert_close(g, alone[name], atol=1e-6, rtol=1e-5)
    # Relabelling an ignored position's token id changes nothing either, while a trained one does.
    s = seqs[0]
    model.zero_grad()
    backward_step(TrainedNLL(model, 4096), [packed([Sequence(s.input_ids, [IGNORE] + s.labels[1:])])], "cpu")
    before = grads(model)
    model.zero_grad()
    flipped = list(s.labels)
    flipped[0] = 7  # labels[0] is never a target (nothing predicts the first token)
    backward_step(TrainedNLL(model, 4096), [packed([Sequence(s.input_ids, flipped)])], "cpu")
    for name, g in grads(model).items():
        torch.testing.assert_close(g, before[name])


def test_plan_resolves_auto_values(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"epochs": "auto", "lr": "auto", "batch_size": "auto",
                                                      "batch_tokens": 256, "max_steps": None})
    plan = make_plan(cfg, n_examples=10, rows_per_epoch=9)
    assert (plan.epochs, plan.lr, plan.batch_size, plan.micro_batch_size) == (10, 2e-4, 4, 2)
    assert plan.steps_per_epoch == 3 and plan.total_steps == 30
    assert make_plan(cfg.model_copy(update={"method": "full"}), 10, 9).lr == 1e-5
    assert make_plan(cfg, 100_000, 9).epochs == 1 and make_plan(cfg, 1000, 9).epochs == 3
    # Warmup then cosine to near zero.
    assert lr_factor(0, "cosine", 2, 10) == pytest.approx(1 / 3)
    assert lr_factor(2, "cosine", 2, 10) == 1.0
    assert 0 < lr_factor(9, "cosine", 2, 10) < 0.05
    assert lr_factor(9, "linear", 0, 10) == pytest.approx(0.1)


def expected_final_files(method: str) -> set[str]:
    tok = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    if method == "full":
        return tok | {"config.json", "generation_config.json", "model.safetensors"}
    return tok | {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_run_lowers_loss_and_writes_the_run_dir(tmp_path, tiny_llama_dir, method):
    cfg = toy_config(tmp_path, tiny_llama_dir, method=method,
                     train={"lr": 1e-2 if method == "lora" else 3e-3, "epochs": 8, "save_every": 4,
                            "keep_last": 2, "eval_every": 4})
    result = train(cfg)
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "final", "metrics.jsonl",
                                                      "summary.json"]
    assert set(os.listdir(run / "final")) == expected_final_files(method)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = result.summary["steps"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {"step", "epoch", "lr", "train_loss", "grad_norm", "trained_tokens", "tokens_per_s"} <= rows[0].keys()
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid) == len([s for s in range(1, steps + 1) if s % 4 == 0 or s == steps])
    # The tiny random model's LM head bounds its logits (~N(0, 0.02) weights), and LoRA cannot change
    # the head, so LoRA learns the toy task less far than full fine-tuning within the same steps.
    start = result.summary["initial_valid_loss"]
    assert valid[-1] < (start * 0.7 if method == "full" else start - 0.4), (start, valid)
    assert result.summary["final_valid_loss"] == valid[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.4
    assert rows[-1]["train_token_accuracy"] > rows[0]["train_token_accuracy"]  # the toy task is learned
    # keep_last=2: the two newest checkpoints, the last one at the final step.
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert len(ckpts) == 2 and ckpts[-1] == f"step-{steps:06d}"
    assert set(os.listdir(run / "checkpoints" / ckpts[-1])) == (
        expected_final_files(method) - {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    ) | {"optimizer.pt", "rng.pt", "trainer_state.json"}
    # final/'s weights are the last checkpoint's files (written once: the same file, linked), plus the tokenizer.
    weights = [f for f in os.listdir(run / "final") if f.endswith(".safetensors")]
    assert weights and all(os.path.samefile(run / "final" / f, run / "checkpoints" / ckpts[-1] / f) for f in weights)
    state = json.loads((run / "checkpoints" / ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == steps and len(state["metrics"]) == steps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trained_tokens"] == rows[-1]["trained_tokens"] > 0
    assert 0 < summary["packing_efficiency"] <= 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == method and saved["model"]["base"] == str(tiny_llama_dir)
    # What was trained is what loads for inference.
    model, tok = load_for_inference(run)
    assert tok.chat_template and not model.training


def test_bad_config_fails_before_weights_load(tmp_path, tiny_llama_dir):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()  # loading weights would fail with a different error
    cfg = toy_config(tmp_path, broken, train={"device": "cuda", "compile": True},
                     model={"attn_implementation": "flash_attention_2"})
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    fields = {p.where for p in err.value.problems}
    assert {"train.device", "train.compile", "model.attn_implementation"} <= fields
    assert not (tmp_path / "run").exists()
    # A bad data line is reported with file:line before weights load, too.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    cfg = toy_config(tmp_path, broken, data={"train": str(bad), "validation_fraction": 0.0})
    with pytest.raises(DataError) as err:
        train(cfg)
    assert any(p.where.startswith(f"{bad}:2") for p in err.value.problems)


def test_existing_run_dir_is_not_overwritten_without_resume(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 2, "save_every": 1})
    train(cfg)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert "--resume" in err.value.problems[0].hint
    cfg_over = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 2, "save_every": 1},
                          output={"overwrite": True})
    assert train(cfg_over).summary["steps"] == 2
    with pytest.raises(ConfigError) as err:  # resuming under a changed config would not be exact
        train(toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 2, "lr": 1e-4}), resume=True)
    assert "train.lr" in err.value.problems[0].message


class _RunsCode:
    """A pickle payload that would create a file when unpickled by a loader that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_never_runs_code_from_a_checkpoint_file(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 4, "save_every": 2})
    train(cfg)
    ckpt = list_checkpoints(cfg.output.dir)[-1]
    marker = tmp_path / "code-ran"
    # The optimizer and RNG files tunekit writes load under weights_only=True: tensors and plain values.
    assert set(torch.load(ckpt / "optimizer.pt", weights_only=True)) == {"optimizer", "scheduler"}
    assert set(torch.load(ckpt / "rng.pt", weights_only=True)) >= {"python", "torch"}
    torch.save({"optimizer": _RunsCode(marker), "scheduler": {}}, ckpt / "optimizer.pt")
    with pytest.raises(TunekitError) as err:
        train(cfg, resume=True)
    assert not marker.exists()
    (problem,) = err.value.problems
    assert problem.where.endswith("optimizer.pt") and "safely" in problem.message


def _run_cli(config: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.Popen([sys.executable, "-m", "tunekit.cli", "train", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, tiny_llama_dir):
    """SIGKILL after a checkpoint, --resume: the same per-step losses as a run never stopped."""
    sections = dict(lora={"r": 8, "alpha": 16, "dropout": 0.1},  # dropout: the RNG state must be restored
                    train={"epochs": 3, "save_every": 3, "keep_last": 3, "threads": 1})
    whole = train(toy_config(tmp_path, tiny_llama_dir, out="whole", **sections))
    reference = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(reference) >= 9

    cfg = toy_config(tmp_path, tiny_llama_dir, out="killed", **sections)
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(cfg.to_yaml())
    proc = _run_cli(config_file)
    ckpt = cfg.output.dir / "checkpoints" / "step-000006"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), proc.stdout.read()
    assert not (cfg.output.dir / "final").exists(), "the run finished before it was killed; use more steps"

    proc = _run_cli(config_file)  # without --resume: refused, pointing at --resume
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "--resume" in out
    proc = _run_cli(config_file, "--resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    resumed = [json.loads(x) for x in (cfg.output.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(resumed, reference, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), (a["step"], a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    assert resumed[-1]["valid_loss"] == pytest.approx(reference[-1]["valid_loss"], abs=1e-5)


def test_padded_and_packed_batches_give_the_same_loss(tmp_path, tiny_llama_dir):
    from tunekit.data.dataset import valid_rows
    from tunekit.train.loop import evaluate_loss, make_batches

    cfg = toy_config(tmp_path, tiny_llama_dir)
    model = apply_method(load_base(cfg), cfg)
    seqs = random_sequences(9, 4)
    lengths = [len(s) for s in seqs]
    as_packed = make_batches(seqs, valid_rows(lengths, 64, True), 2, True, 0)
    as_padded = make_batches(seqs, valid_rows(lengths, 64, False), 2, False, 0)
    assert len(as_packed) < len(as_padded)
    loss_packed, acc_packed = evaluate_loss(TrainedNLL(model, 4096), as_packed, "cpu")
    loss_padded, acc_padded = evaluate_loss(TrainedNLL(model, 4096), as_padded, "cpu")
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    assert acc_packed == acc_padded


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir)
    torch.manual_seed(0)
    model = apply_method(load_base(cfg), cfg)
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = packed(random_sequences(4, 2))
    backward_step(TrainedNLL(model, 4096), [batch], "cpu")
    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backward_step(TrainedNLL(model, 4096), [batch], "cpu")
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and plain
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, atol=1e-6, rtol=1e-5)


def test_bf16_mixed_precision_keeps_fp32_weights_and_close_gradients(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, method="full")
    model = apply_method(load_base(cfg), cfg)
    batch = packed(random_sequences(4, 5))
    nll32, n, _ = backward_step(TrainedNLL(model, 64), [batch], "cpu")
    fp32 = grads(model)
    model.zero_grad()
    nll16, n16, _ = backward_step(TrainedNLL(model, 64), [batch], "cpu", mixed_precision="bf16")
    bf16 = grads(model)
    assert n == n16 and nll16 == pytest.approx(nll32, rel=2e-2) and nll16 != nll32  # bf16 did run
    assert fp32.keys() == bf16.keys() and fp32
    for name, g in bf16.items():
        assert g.dtype == torch.float32 and dict(model.named_parameters())[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g.flatten(), fp32[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def test_bf16_mixed_precision_run_lowers_loss(tmp_path, tiny_llama_dir):
    cfg = toy_config(tmp_path, tiny_llama_dir, method="full",
                     train={"lr": 3e-3, "epochs": 8, "mixed_precision": "bf16", "eval_every": 4})
    result = train(cfg)
    assert result.summary["final_valid_loss"] < result.summary["initial_valid_loss"] * 0.7


def test_continue_example_config_validates_and_runs(tmp_path, tiny_llama_dir):
    """examples/continue/continue.yaml is a valid config, and it trains from an earlier run."""
    from tunekit.config import load_config

    example = Path(__file__).resolve().parents[1] / "examples" / "continue" / "continue.yaml"
    cfg = load_config(example, check_files=False)  # its base is a run made by the quickstart
    assert cfg.model.previous_adapter == "merge" and cfg.model.base.endswith("runs/quickstart")
    first = train(toy_config(tmp_path, tiny_llama_dir, out="first", train={"max_steps": 2})).run_dir
    for mode in ("merge", "continue"):
        cfg = load_config(example, [f"model.base={first}", f"model.previous_adapter={mode}",
                                    f"data.train={tmp_path / 'train.jsonl'}", "data.validation=null",
                                    "data.max_len=64", "train.batch_size=4", "train.max_steps=2",
                                    f"output.dir={tmp_path / mode}"])
        result = train(cfg)
        assert result.summary["steps"] == 2 and (result.run_dir / "final" / "adapter_config.json").is_file()


def test_eval_section_runs_the_evaluation_after_training(tmp_path, tiny_llama_dir):
    from toy_runs import write_toy_chat

    valid = write_toy_chat(tmp_path / "valid.jsonl", 4, seed=1)
    no_file = toy_config(tmp_path, tiny_llama_dir, out="e0", eval={"enabled": True})
    with pytest.raises(ConfigError) as err:  # validation_fraction is no file the evaluation can read
        train(no_file)
    assert err.value.problems[0].where == "eval.enabled"
    cfg = toy_config(tmp_path, tiny_llama_dir, out="e1", train={"max_steps": 2},
                     data={"validation": str(valid), "validation_fraction": 0.0},
                     eval={"enabled": True, "max_new_tokens": 4, "limit": 2})
    run = train(cfg).run_dir
    assert (run / "eval").is_dir() and any((run / "eval").iterdir())


def test_stop_file_pauses_at_a_checkpoint_and_resume_matches_uninterrupted(tmp_path, tiny_llama_dir):
    """A STOP file in the run dir ends the loop after that step with a checkpoint; --resume finishes it
    with the same per-step losses as a run never stopped (how `tunekit serve` pauses a job)."""
    from tunekit.train.loop import STOP_FILE, TrainingStopped

    sections = dict(train={"max_steps": 4, "threads": 1})
    reference = [json.loads(x) for x in (train(toy_config(tmp_path, tiny_llama_dir, out="whole", **sections))
                                         .run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = toy_config(tmp_path, tiny_llama_dir, out="paused", **sections)
    cfg.output.dir.mkdir(parents=True)
    (cfg.output.dir / STOP_FILE).touch()
    with pytest.raises(TrainingStopped, match="step 1"):
        train(cfg)
    assert [p.name for p in list_checkpoints(cfg.output.dir)] == ["step-000001"]
    assert not (cfg.output.dir / STOP_FILE).exists() and not (cfg.output.dir / "final").exists()
    train(cfg, resume=True)
    resumed = [json.loads(x) for x in (cfg.output.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for a, b in zip(resumed, reference, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), (a["step"], a, b)
