"""The preference losses against TRL's DPOTrainer on the same batch, the same model and the same token ids.

Needs the bench extra (trl, datasets: `pip install -e '.[bench]'`); the test command does not install it, so
these tests skip there and run where it is installed (bench/dpo.py compares training speed and memory).

The policy is the peft model the DPOTrainer built, its LoRA B matrices set to random values (a new adapter
is zero, where every loss is at its starting value); the reference is the same model with the adapter
switched off on both sides. tunekit renders the pairs itself (its data path) and TRL applies the chat template
itself; the token ids are checked equal before the losses are compared.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import with_template
from toy_runs import WORDS

from tunekit.config import DataConfig, DpoConfig
from tunekit.data.dataset import fit_pairs, read_pairs
from tunekit.data.types import IGNORE
from tunekit.train.dpo import PreferenceLoss, make_pair_batches

pytest.importorskip("trl", reason="needs the bench extra (TUNEKIT_EXTRAS=bench bash scripts/setup.sh): TRL's DPOTrainer is the "
                    "reference these losses are compared with; the test command does not install it")
pytest.importorskip("datasets", reason="needs the bench extra (TUNEKIT_EXTRAS=bench bash scripts/setup.sh)")

# ChatML without the "\n" after the last assistant turn: TRL trains everything prompt + reply renders to after
# the generation prompt, tunekit the reply up to its end-of-turn token; without that "\n" they are the same.
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
            "+ '<|im_end|>' }}{% if not (loop.last and message['role'] == 'assistant') %}{{ '\\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
N_PAIRS = 6


def write_pairs(path, n: int, seed: int = 0):
    """TRL's conversational form; replies of different lengths, so that length normalisation matters."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            word, other = rng.sample(WORDS, 2)
            fh.write(json.dumps({
                "prompt": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": f"say {word} please"}],
                "chosen": [{"role": "assistant", "content": " ".join([word] * rng.randint(1, 6))}],
                "rejected": [{"role": "assistant", "content": " ".join([other] * rng.randint(1, 6))}]}) + "\n")
    return path


def trl_trainer(tmp_path, model_dir, tokenizer, pairs_path, **dpo_args):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=N_PAIRS, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, report_to="none", max_length=128, seed=0, **dpo_args)
    trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(pairs_path),
                                                                            split="train"),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: policy != reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    trainer.model.eval()
    return trainer


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize(("loss", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.5)])
def test_loss_equals_trl_dpotrainer_on_the_same_batch(tmp_path, tiny_llama_dir, base_tokenizer, loss, beta,
                                                      packing):
    tokenizer = with_template(base_tokenizer, TEMPLATE)
    pairs_path = write_pairs(tmp_path / "pairs.jsonl", N_PAIRS)
    trainer = trl_trainer(tmp_path, tiny_llama_dir, tokenizer, pairs_path, beta=beta, loss_type=[loss])

    # The same token ids on both sides, pair by pair.
    ds = trainer.train_dataset
    pairs, _ = fit_pairs(read_pairs(pairs_path, tokenizer, DataConfig(train=pairs_path, max_len=128)), 128, "drop")
    assert len(pairs) == len(ds) == N_PAIRS
    for (chosen, rejected), p, c, r in zip(pairs, ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"],
                                           strict=True):
        n = next(k for k, label in enumerate(chosen.labels) if label != IGNORE)
        assert (chosen.input_ids[:n], chosen.input_ids[n:], rejected.input_ids[n:]) == (p, c, r)

    # TRL's loss: its collator's batch of every pair, its compute_loss (the mean over pairs).
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * N_PAIRS
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))

    # tunekit's on the same model: one micro-batch of every pair (packed rows of two pairs, or padded sides).
    module = PreferenceLoss(trainer.model, DpoConfig(beta=beta, loss=loss), chunk=4096, reference="adapter-off")
    rows = [[0, 1], [2, 3], [4, 5]] if packing else [[i] for i in range(N_PAIRS)]
    (pb,) = make_pair_batches(pairs, rows, len(rows), packing, tokenizer.pad_token_id)
    with torch.no_grad():
        total, n_pairs, _ = module(pb)
    ours = float(total) / n_pairs

    start = math.log(2) if loss == "sigmoid" else (1 / (2 * beta)) ** 2  # the loss when policy = reference
    assert abs(trl_loss - start) > 1e-3  # the adapter moved the policy: a comparison, not two starting values
    assert ours == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
