"""The memory estimate printed before any weight loads, against the peak RSS runs really reach."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_runs import toy_config

from tunekit.errors import ConfigError
from tunekit.train.estimate import MB, available_memory, estimate_memory, model_shapes
from tunekit.train.loop import train


def medium_model_dir(path: Path, tokenizer) -> Path:
    """bench's cpu-medium shape (hidden 512, 8 layers, vocab 32000: 56M parameters), random init."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("shape", ["tiny", "medium"])
def test_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, tiny_llama_dir, chat_tokenizer, shape):
    if shape == "tiny":
        base, sections = tiny_llama_dir, dict(method="lora", train={"max_steps": 4})
    else:  # full fine-tuning: weights, gradients and AdamW state of 56M parameters, 2 x 512-token rows
        base = medium_model_dir(tmp_path / "medium", chat_tokenizer)
        sections = dict(method="full", n=200, data={"max_len": 512, "validation_fraction": 0.0},
                        train={"batch_size": 2, "micro_batch_size": 2, "max_steps": 2, "lr": 1e-4})
    cfg = toy_config(tmp_path, base, **sections)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(cfg.to_yaml())
    dry = train(cfg, dry_run=True)  # in this process: the same estimate but for the baseline
    assert not cfg.output.dir.exists()
    if shape == "tiny":  # the command line's dry run for 2 processes: DDP, nothing launched or written
        done = subprocess.run([sys.executable, "-m", "tunekit.cli", "train", str(config_file), "--dry-run", "--nproc",
                               "2"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "2 processes (ddp)" in done.stderr, done.stderr
        assert "memory per process (estimate)" in done.stderr and "torch.distributed" not in done.stderr
        assert not cfg.output.dir.exists()
    done = subprocess.run([sys.executable, "-m", "tunekit.cli", "train", str(config_file)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.lstrip().splitlines()[3].startswith("memory per process (estimate)")  # the first lines
    summary = json.loads((cfg.output.dir / "summary.json").read_text())
    estimate, (peak,) = summary["memory_estimate_mb"], summary["peak_rss_mb"]
    for part in ("weights", "gradients", "optimizer", "activations", "lm_head"):
        assert estimate[part] == pytest.approx(dry.summary["memory_estimate_mb"][part])
    assert estimate["total"] == pytest.approx(peak, rel=0.25), (estimate, peak)
    if shape == "medium":  # the model's own tensors are most of it here, not the runtime
        assert estimate["total"] - estimate["baseline"] > 0.6 * estimate["total"]


def test_fsdp2_divides_what_it_shards(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = toy_config(tmp_path, tiny_llama_dir, method="full")
    real = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shapes = model_shapes(cfg)  # from config.json alone, on the meta device
    assert shapes.params == shapes.trainable == sum(p.numel() for p in real.parameters())
    assert shapes.root_params == sum(p.numel() for n, p in real.named_parameters() if ".layers." not in n)
    # cpu-medium's shape with 32 layers (only its config.json: nothing else is read).
    LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8,
        num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(tmp_path / "shape")
    cfg = toy_config(tmp_path, tmp_path / "shape", method="full")
    shapes = model_shapes(cfg)
    one = estimate_memory(cfg, shapes, micro_batch=2, processes=1, strategy="none", baseline=0)
    two = estimate_memory(cfg, shapes, micro_batch=2, processes=2, strategy="fsdp2", baseline=0)
    ddp = estimate_memory(cfg, shapes, micro_batch=2, processes=2, strategy="ddp", baseline=0)
    assert two.optimizer == one.optimizer // 2 and ddp.optimizer == one.optimizer
    assert one.weights / 2 < two.weights < 0.8 * one.weights  # the gathered root and 2 layers stay whole
    assert one.gradients / 2 < two.gradients < 0.8 * one.gradients
    lora_cfg = toy_config(tmp_path, tmp_path / "shape")
    lora = estimate_memory(lora_cfg, model_shapes(lora_cfg), micro_batch=2, processes=1, strategy="none", baseline=0)
    assert lora.optimizer < one.optimizer / 20 and one.weights < lora.weights < 1.05 * one.weights  # + adapter
    qlora_cfg = toy_config(tmp_path, tmp_path / "shape", method="qlora")
    qlora = estimate_memory(qlora_cfg, model_shapes(qlora_cfg), micro_batch=2, processes=1, strategy="none",
                            baseline=0)
    assert qlora.weights < lora.weights / 2 and qlora.optimizer == lora.optimizer


def test_a_run_that_cannot_fit_is_refused_with_settings_that_would(tmp_path, tiny_llama_dir):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()  # the refusal comes before any weight loads
    available = available_memory(torch.device("cpu"))
    # Without gradient checkpointing the tiny model keeps ~11 KB per token for backward, with it ~6.5 KB:
    # 4 rows of this length need about 1.4x the available memory, 0.8x with checkpointing, 0.35x as 1 row.
    max_len = int(available / 8000 / 4)
    cfg = toy_config(tmp_path, broken, data={"max_len": max_len, "packing": False},
                     train={"batch_size": 4, "micro_batch_size": 4, "lm_head_chunk": 64})
    with pytest.raises(ConfigError) as err:
        train(cfg)
    (problem,) = err.value.problems
    assert problem.where == "train" and "MiB are available" in problem.message
    assert "train.gradient_checkpointing: true" in problem.hint and "train.micro_batch_size: 1" in problem.hint
    assert "qlora" not in problem.hint  # 4-bit weights would not shrink the activations
    assert not cfg.output.dir.exists()
    assert available / MB > 100


def test_peak_rss_is_the_process_own_not_its_parent():
    """A run started by a large process (pytest, the jobs server) reports its own peak: Linux carries
    ru_maxrss across exec, so a child of a 600 MiB parent would otherwise report at least 600 MiB."""
    ballast = bytearray(600 * MB)  # noqa: F841  (resident: bytearray zero-fills its memory)
    code = "from tunekit.train.estimate import peak_rss; print(peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 * MB, child / MB
