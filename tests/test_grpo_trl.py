"""The GRPO loss and its gradient against TRL's GRPOTrainer on the same rollouts and the same model.

Needs the bench extra (trl, datasets: `pip install -e '.[bench]'`); the test command does not install it, so
these tests skip there and run where it is installed (bench/grpo.py compares training speed and memory).

Hand-made rollouts (no generation on either side): prompts of different lengths, `group_size` completions of
each of different lengths (some ending with the end-of-turn id), group advantages of random rewards, and either
no old log-probs (one step per generation: ratio 1) or old log-probs away from the live ones (ratios in about
0.67..1.5, so that clipping engages). The model is the peft model the GRPOTrainer built, its LoRA B matrices set
to random values (a new adapter is zero: policy = reference, KL 0); the reference is that model with the adapter
switched off on both sides. TRL's side is its `_compute_loss` on the inputs `_generate_and_score_completions`
would hand it (prompts left-padded, completions right-padded, its own reference log-probs); tunekit's is the
loop's `backward_step` over `grpo.rollout_batches` of the same rollouts in micro-batches of two completions.

The pairs of normalisations: tunekit loss_norm token = TRL loss_type "dapo" (the tokens of the whole batch),
sequence = "grpo" (the mean over completions of each one's token mean), constant = "dr_grpo" (the token sum over
completions x max_new_tokens). TRL's training log-probs are of the logits / temperature: temperature 1 here, as
tunekit's loss reads the model's own log-probs. TRL (1.16) multiplies the KL term by the importance ratio by
default (use_bias_correction_kl, DeepSeek-V3.2's unbiased KL gradient: the ratio's gradient reaches the KL even
on-policy where its value is 1); tunekit's loss is the GRPO paper's k3 term without it, so TRL runs with
use_bias_correction_kl=False here (with it, the loss values agree on-policy and the gradients differ by about
0.3%).
"""

from __future__ import annotations

import pytest
import torch

from tunekit.config import GrpoConfig
from tunekit.train import grpo
from tunekit.train.loop import backward_step

pytest.importorskip("trl", reason="needs the bench extra (TUNEKIT_EXTRAS=bench bash scripts/setup.sh): TRL's GRPOTrainer is "
                    "the reference this loss is compared with; the test command does not install it")
pytest.importorskip("datasets", reason="needs the bench extra (TUNEKIT_EXTRAS=bench bash scripts/setup.sh)")

GROUP = 3
PROMPT_LENGTHS = (5, 9, 3)
COMPLETION_LENGTHS = ((4, 1, 6), (3, 5, 2), (6, 6, 1))  # per prompt, per completion
MAX_NEW_TOKENS = 6
LOSS_TYPE = {"token": "dapo", "sequence": "grpo", "constant": "dr_grpo"}


def trl_trainer(tmp_path, model_dir, tokenizer, *, loss_type: str, beta: float, epsilon: float):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=GROUP * len(PROMPT_LENGTHS),
                      num_generations=GROUP, max_completion_length=MAX_NEW_TOKENS, loss_type=loss_type, beta=beta,
                      epsilon=epsilon, use_bias_correction_kl=False, temperature=1.0, use_cpu=True, bf16=False,
                      gradient_checkpointing=False, report_to="none", seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
                          args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * 3),
                          peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: policy != reference
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    trainer.model.eval()  # TRL's loss then has no accumulation divisor; no dropout either way
    return trainer


def hand_rollouts(vocab: int, eos: int, seed: int = 0) -> grpo.Rollouts:
    """The rollouts of one step: random prompt and completion ids (never the pad id), the last completion of
    each group ending with the end-of-turn id, advantages of random rewards per group."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions, group_of = [], [], []
    for k, (n_prompt, lengths) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS, strict=True)):
        prompt = torch.randint(10, vocab, (n_prompt,), generator=g).tolist()
        for c, n in enumerate(lengths):
            ids = torch.randint(10, vocab, (n,), generator=g).tolist()
            if c == GROUP - 1:
                ids[-1] = eos
            prompts.append(prompt)
            completions.append(ids)
            group_of.append(k)
    rewards = torch.rand(len(PROMPT_LENGTHS), GROUP, generator=g, dtype=torch.float64)
    advantages = grpo.group_advantages(rewards, scale=True).flatten().tolist()
    n = len(completions)
    return grpo.Rollouts(0, [0] * n, group_of, prompts, completions, [c[-1] == eos for c in completions],
                         rewards.flatten().tolist(), {}, [False] * n, advantages, None, 0.0, None)


def trl_inputs(trainer, r: grpo.Rollouts, pad_id: int) -> dict:
    """What TRL's `_generate_and_score_completions` hands `_compute_loss`: prompts left-padded, completions
    right-padded, advantages, old log-probs (None: on-policy), its reference log-probs (adapter off), the
    batch's completion tokens (loss_type dapo)."""
    width_p = max(len(p) for p in r.prompts)
    width_c = max(len(c) for c in r.completions)
    prompt_ids = torch.tensor([[pad_id] * (width_p - len(p)) + p for p in r.prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in r.prompts])
    completion_ids = torch.tensor([c + [pad_id] * (width_c - len(c)) for c in r.completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in r.completions])
    old = None
    if r.old_logps is not None:
        old = torch.tensor([o + [0.0] * (width_c - len(o)) for o in r.old_logps], dtype=torch.float32)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor(r.advantages, dtype=torch.float32),
              "old_per_token_logps": old, "num_items_in_batch": completion_mask.sum()}
    if trainer.beta != 0.0:
        with torch.no_grad(), trainer.model.disable_adapter():
            inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
                width_c)
    return inputs


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_norm", ["token", "sequence", "constant"])
@pytest.mark.parametrize(("beta", "off_policy"), [(0.04, False), (0.1, True)], ids=["on-policy", "off-policy"])
def test_loss_and_gradient_equal_trl_grpotrainer_on_the_same_rollouts(tmp_path, tiny_llama_dir, chat_tokenizer,
                                                                      loss_norm, beta, off_policy):
    g = GrpoConfig(group_size=GROUP, max_new_tokens=MAX_NEW_TOKENS, beta=beta, epsilon=0.2, loss_norm=loss_norm)
    trainer = trl_trainer(tmp_path, tiny_llama_dir, chat_tokenizer, loss_type=LOSS_TYPE[loss_norm], beta=beta,
                          epsilon=g.epsilon)
    model, pad_id = trainer.model, chat_tokenizer.pad_token_id
    r = hand_rollouts(len(chat_tokenizer), chat_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if off_policy:  # the log-probs "at generation": the live ones moved by up to +-0.4 (ratios 0.67..1.5)
        live = grpo.old_logps(model, r, 4, pad_id, 4096)
        noise = torch.Generator().manual_seed(2)
        r.old_logps = [[x + (float(torch.rand(1, generator=noise)) - 0.5) * 0.8 for x in row] for row in live]

    # TRL: its loss on the whole batch, and its gradient.
    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(model, trl_inputs(trainer, r, pad_id))
    trl_loss.backward()
    theirs = lora_grads(model)

    # tunekit: the loop's backward_step over micro-batches of 2 completions (units counted first).
    model.zero_grad(set_to_none=True)
    batches = grpo.rollout_batches(r, 0, 2, pad_id, loss_norm)
    loss_sum, units, (kl, clipped, _) = backward_step(grpo.PolicyLoss(model, g, 4096), batches, "cpu")
    ours = lora_grads(model)

    n_tokens = sum(len(c) for c in r.completions)
    assert units == (n_tokens if loss_norm == "token" else len(r.completions))
    assert kl > 1e-3  # the adapter moved the policy away from the reference
    assert (0 < clipped < n_tokens) if off_policy else clipped == 0
    assert loss_sum / units == pytest.approx(float(trl_loss), abs=1e-5, rel=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert max(float(t.abs().max()) for t in theirs.values()) > 1e-3  # a gradient to compare, not zeros
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
