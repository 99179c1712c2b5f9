"""The reinforcement objective (objective: grpo): the loss against its formula, the reference, rollouts on the
generation engine, learning a checkable task, exact resume, and the checks before any weight loads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from toy_runs import WORDS, toy_config

from tunekit.config import GrpoConfig
from tunekit.data.pack import collate_padded
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import ConfigError, TunekitError
from tunekit.model import apply_method, body_and_head, load_base
from tunekit.train import grpo
from tunekit.train.checkpoint import list_checkpoints
from tunekit.train.loop import STOP_FILE, TrainingStopped, backward_step, check_setup, train


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """Reinforcement prompts: a user turn naming a word; the grader reads the line's `word` field."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            word = rng.choice(WORDS)
            fh.write(json.dumps({"messages": [{"role": "developer", "content": "answer in a few words"},
                                              {"role": "user", "content": f"say {word}"}], "word": word}) + "\n")
    return path


# The checkable toy task: the reply must contain a fixed word piece (case-insensitive).
CONTAINS = {"type": "string_check", "name": "has", "input": "{{sample.output_text}}", "reference": "e",
            "operation": "ilike"}


def grpo_config(tmp_path: Path, base, *, out: str = "run", n: int = 16, grader=None, **sections):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts, n)
    sections.setdefault("data", {})
    sections["data"] = {"train": str(prompts), "validation_fraction": 0.0, **sections["data"]}
    sections["grpo"] = {"grader": grader or CONTAINS, "group_size": 4, "max_new_tokens": 6, **sections.get("grpo", {})}
    sections.setdefault("train", {})
    sections["train"] = {"epochs": 1, "batch_size": 2, "micro_batch_size": 4, **sections["train"]}
    return toy_config(tmp_path, base, out=out, objective="grpo", **sections)


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def model_of(cfg):
    torch.manual_seed(0)
    return apply_method(load_base(cfg, torch.device("cpu")), cfg)


def hand_seqs(prompt_len: int = 5, lengths=(3, 4, 2), seed: int = 0) -> list[Sequence]:
    """Random prompts + completions of the given lengths (the completions trained)."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        prompt = torch.randint(5, 400, (prompt_len,), generator=g).tolist()
        completion = torch.randint(5, 400, (n,), generator=g).tolist()
        seqs.append(Sequence(prompt + completion, [IGNORE] * prompt_len + completion))
    return seqs


def hand_batch():
    return collate_padded(hand_seqs(), pad_id=0)


# --------------------------------------------------------------------------------------------------
# The loss


def reference_loss(g: GrpoConfig, logps: list[torch.Tensor], old: list[torch.Tensor], ref: list[torch.Tensor],
                   adv: list[float]) -> torch.Tensor:
    """The GRPO loss written out per completion, one token at a time (the formula of grpo.py's doc)."""
    per_seq, tokens = [], 0
    for lp, o, r, a in zip(logps, old, ref, adv, strict=True):
        terms = []
        for t in range(lp.shape[0]):
            ratio = torch.exp(lp[t] - o[t])
            surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - g.epsilon, 1 + g.epsilon) * a)
            kl = torch.exp(r[t] - lp[t]) - (r[t] - lp[t]) - 1
            terms.append(-surrogate + g.beta * kl)
        per_seq.append(torch.stack(terms))
        tokens += lp.shape[0]
    if g.loss_norm == "token":
        return sum(s.sum() for s in per_seq) / tokens
    if g.loss_norm == "sequence":
        return sum(s.mean() for s in per_seq) / len(per_seq)
    return sum(s.sum() for s in per_seq) / (len(per_seq) * g.max_new_tokens)


@pytest.mark.parametrize("loss_norm", ["token", "sequence", "constant"])
def test_policy_loss_and_gradient_equal_the_formula(loss_norm):
    """policy_loss on hand-made log-probs (off-policy: ratios away from 1, some clipped) equals the formula
    written out token by token, in value and gradient."""
    g = GrpoConfig(beta=0.1, epsilon=0.2, loss_norm=loss_norm, max_new_tokens=5)
    lengths = [3, 4, 2]
    gen = torch.Generator().manual_seed(1)
    base = -torch.rand(sum(lengths), generator=gen, dtype=torch.float64) * 3
    old = base + (torch.rand(sum(lengths), generator=gen, dtype=torch.float64) - 0.5) * 0.8  # ratios 0.67..1.5
    ref = base + (torch.rand(sum(lengths), generator=gen, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.2, -0.7, 0.3], dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))

    mine = base.clone().requires_grad_(True)
    loss, kl, clipped, _ = grpo.policy_loss(g, mine, old, ref, adv, rows)
    units = sum(lengths) if loss_norm == "token" else len(lengths)
    (loss / units).backward()

    theirs = base.clone().requires_grad_(True)
    split = list(torch.split(theirs, lengths))
    expected = reference_loss(g, split, list(torch.split(old, lengths)), list(torch.split(ref, lengths)),
                              adv.tolist())
    expected.backward()
    assert torch.allclose(loss / units, expected, atol=1e-12)
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-12)
    assert 0 < int(clipped.sum()) < sum(lengths)  # the case covers clipped and unclipped tokens
    assert bool((kl >= 0).all())


def test_new_adapter_first_step_kl_is_zero_and_ratio_one(tmp_path, tiny_llama_dir):
    """A new LoRA adapter changes nothing yet: the adapter-off reference equals the policy (KL 0), and on the
    live log-probs the ratio is exactly 1; the loss is then -mean(advantage) per token."""
    cfg = grpo_config(tmp_path, tiny_llama_dir, grpo={"beta": 0.5})
    model = model_of(cfg)
    batch = hand_batch()
    rb = grpo.RolloutBatch(batch, torch.tensor([1.0, -1.0, 0.5]), None, batch.num_trained)
    loss, units, (kl, clipped, ratio) = grpo.PolicyLoss(model, cfg.grpo, 4096)(rb)
    lengths = [3, 4, 2]
    assert units == 9
    assert kl == pytest.approx(0.0, abs=1e-7)
    assert clipped == 0
    assert ratio == pytest.approx(9.0, abs=1e-6)  # 9 tokens, each ratio 1
    assert float(loss.detach()) == pytest.approx(-(3 * 1.0 - 4 * 1.0 + 2 * 0.5), abs=1e-6)
    assert units == sum(lengths)


def test_beta_zero_runs_no_reference_pass(tmp_path, tiny_llama_dir):
    """beta 0: no forward with the adapter switched off (a fully fine-tuned model has no adapter to switch off:
    the loss runs on it), KL reported 0."""
    cfg = grpo_config(tmp_path, tiny_llama_dir, method="full", grpo={"beta": 0.0})
    model = model_of(cfg)
    assert not hasattr(model, "disable_adapter")
    batch = hand_batch()
    rb = grpo.RolloutBatch(batch, torch.tensor([1.0, -1.0, 0.5]), None, batch.num_trained)
    loss, _, (kl, _, _) = grpo.PolicyLoss(model, cfg.grpo, 4096)(rb)
    assert kl == 0.0 and loss.requires_grad
    lora = grpo_config(tmp_path, tiny_llama_dir, grpo={"beta": 0.0})
    lora_model = model_of(lora)
    base_calls = {"n": 0}
    body, _ = body_and_head(lora_model)  # the decoder stack every forward runs through
    body.register_forward_pre_hook(lambda *_: base_calls.__setitem__("n", base_calls["n"] + 1))
    grpo.PolicyLoss(lora_model, lora.grpo, 4096)(rb)
    assert base_calls["n"] == 1  # the policy's forward only
    lora.grpo.beta = 0.04
    grpo.PolicyLoss(lora_model, lora.grpo, 4096)(rb)
    assert base_calls["n"] == 3  # and with beta > 0, the reference's


def test_a_group_with_equal_rewards_gives_zero_advantage_and_zero_gradient(tmp_path, tiny_llama_dir):
    """Equal rewards in a group: advantage 0, and (at a new adapter, KL 0 with zero slope) no gradient at all."""
    adv = grpo.group_advantages(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]]), scale=True)
    assert adv[0].abs().max() == 0
    assert adv[1].tolist() == pytest.approx([-0.866, 0.866, -0.866, 0.866], abs=1e-3)  # (r - 0.5) / (0.577 + 1e-4)
    cfg = grpo_config(tmp_path, tiny_llama_dir, grpo={"beta": 0.04})
    model = model_of(cfg)
    batch = hand_batch()
    rb = grpo.RolloutBatch(batch, torch.zeros(3), None, batch.num_trained)
    loss, _, _ = grpo.PolicyLoss(model, cfg.grpo, 4096)(rb)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None for gr in grads)
    assert max(float(gr.abs().max()) for gr in grads) == 0.0
    assert float(loss.detach()) == 0.0


def test_backward_step_accumulation_equals_one_batch(tmp_path, tiny_llama_dir):
    """Micro-batches of 1 completion give the gradients of one batch of all (units counted first)."""
    cfg = grpo_config(tmp_path, tiny_llama_dir, grpo={"beta": 0.0})
    model = model_of(cfg)
    with torch.no_grad():  # move off the new adapter's zeros so that gradients reach lora_A too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    net = grpo.PolicyLoss(model, cfg.grpo, 4096)
    seqs = [collate_padded([s], pad_id=0) for s in hand_seqs()]
    adv = [1.0, -0.5, 0.25]
    singles = [grpo.RolloutBatch(b, torch.tensor([a]), None, b.num_trained) for b, a in zip(seqs, adv, strict=True)]
    grads = []
    for batches in (singles, [grpo.RolloutBatch(hand_batch(), torch.tensor(adv), None, 9)]):
        model.zero_grad(set_to_none=True)
        loss, units, stats = backward_step(net, batches, "cpu")
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert units == 9
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Rollouts and the loop


def test_rollouts_are_seeded_per_step_and_graded(tmp_path, tiny_llama_dir, chat_tokenizer):
    """The same weights and step give the same completions; another step other ones; rewards are the grader's."""
    cfg = grpo_config(tmp_path, tiny_llama_dir)
    model = model_of(cfg)
    splits = grpo.load_prompt_splits(cfg, chat_tokenizer)
    rewarder = grpo.Rewarder(CONTAINS)
    from tunekit.data.render import end_of_turn_ids

    stop = list(end_of_turn_ids(chat_tokenizer))
    args = (cfg.grpo, rewarder, chat_tokenizer, stop, 0, 42)
    a = grpo.generate_rollouts(model, [splits.train[:2]], 0, *args)
    b = grpo.generate_rollouts(model, [splits.train[:2]], 0, *args)
    c = grpo.generate_rollouts(model, [splits.train[:2]], 1, *args)
    assert a.completions == b.completions and a.rewards == b.rewards
    assert a.completions != c.completions
    assert len(a.completions) == 2 * cfg.grpo.group_size
    assert model.training  # back in train mode after generating in eval mode
    for ids, reward in zip(a.completions, a.rewards, strict=True):
        text = chat_tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=False).strip()
        assert reward == (1.0 if "e" in text.casefold() else 0.0)
        assert 1 <= len(ids) <= cfg.grpo.max_new_tokens


def test_rollouts_of_a_checkpoint_are_taken_by_the_rank_that_sampled_them():
    """A checkpoint of several processes holds one generation per rank; a run with another number of processes
    samples the step again rather than train on another rank's share."""
    from tunekit.train.distributed import SINGLE, Dist

    def rollouts(reward: float) -> grpo.Rollouts:
        return grpo.Rollouts(4, [4, 4], [0, 0], [[1], [1]], [[2], [3]], [True, False], [reward, 0.0], {},
                             [False, False], [0.7, -0.7], None, 0.5, None, 2)

    two = [rollouts(1.0).to_state(), rollouts(0.5).to_state()]
    assert grpo.restored_rollouts(two, Dist(1, 2, 1, "ddp")).rewards == [0.5, 0.0]
    assert grpo.restored_rollouts(two, SINGLE) is None
    assert grpo.restored_rollouts(rollouts(1.0).to_state(), SINGLE).rewards == [1.0, 0.0]
    assert grpo.restored_rollouts(rollouts(1.0).to_state(), Dist(0, 2, 0, "ddp")) is None
    joined = grpo.Rollouts.joined([rollouts(1.0), rollouts(0.5)])
    assert joined.group_of == [0, 0, 1, 1] and joined.generated == 4 and joined.seconds == 0.5
    assert joined.step_metrics(4)["no_signal_share"] == 0.0 and joined.step_metrics(4)["reward_mean"] == 0.375


def test_bad_configs_are_refused_before_weights_load(tmp_path, tiny_llama_dir):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    cases = {
        "no grader": ({"grpo": {"grader": None}}, "grpo.grader", "needs a grader"),
        "unknown field": ({"grpo": {"grader": {**CONTAINS, "reference": "{{item.answer}}"}}}, "grpo.grader", "answer"),
        "judge grader": ({"grpo": {"grader": {"type": "score_model", "name": "j", "model": "m", "input": []}}},
                         "grpo.grader", ""),
        "chat data": ({"data": {"train": str(chat)}}, f"{chat}:1", "not a reinforcement prompt"),
        "full + beta": ({"method": "full", "grpo": {"beta": 0.04}}, "grpo.beta", "adapter"),
        "format": ({"data": {"format": "chat"}}, "data.format", "grpo"),
        "eval": ({"eval": {"enabled": True}}, "eval.enabled", "validation reward"),
    }
    for name, (sections, where, words) in cases.items():
        cfg = grpo_config(tmp_path, tiny_llama_dir, **sections)
        problems = check_setup(cfg, resume=False)
        assert any(p.where.startswith(where) and words in p.message for p in problems), (name, problems)
    cfg = grpo_config(tmp_path, tiny_llama_dir)
    assert check_setup(cfg, resume=False) == []
    assert check_setup(cfg, resume=False, world_size=2) == []  # LoRA: ddp
    assert any(p.where == "train.batch_size" and "3 processes" in p.message
               for p in check_setup(cfg, resume=False, world_size=3))  # 2 prompts per step
    cfg = grpo_config(tmp_path, tiny_llama_dir, method="full", grpo={"beta": 0.0})
    assert check_setup(cfg, resume=False) == []
    # full fine-tuning picks fsdp2 on several processes, whose forwards are collective: grpo needs ddp
    assert any(p.where == "train.distributed.strategy" and "ddp" in p.hint
               for p in check_setup(cfg, resume=False, world_size=2))
    cfg = grpo_config(tmp_path, tiny_llama_dir, method="full", grpo={"beta": 0.0},
                      train={"distributed": {"strategy": "ddp"}})
    assert check_setup(cfg, resume=False, world_size=2) == []
    # SFT with data.format: reinforcement is refused, pointing at objective: grpo
    sft = toy_config(tmp_path, tiny_llama_dir, data={"format": "reinforcement"})
    assert any(p.where == "data.format" and "grpo" in p.hint for p in check_setup(sft, resume=False))
    with pytest.raises(ConfigError):  # train() refuses before anything loads or is written
        train(grpo_config(tmp_path, tiny_llama_dir, out="refused", grpo={"grader": None}))
    assert not (tmp_path / "refused").exists()


LEARN = {"train": {"epochs": 12, "lr": 1e-3, "batch_size": 4, "micro_batch_size": 8, "warmup_ratio": 0.0,
                   "scheduler": "constant"},
         "grpo": {"group_size": 8, "beta": 0.0, "max_new_tokens": 6}}


def test_a_short_run_raises_the_reward_of_a_checkable_task(tmp_path, tiny_llama_dir):
    """The reply must contain "e" (string_check ilike): 48 steps of 4 prompts x 8 completions raise the reward.
    Measured (tiny random Llama, seed 42, full fine-tuning, beta 0): the first 8 steps average 0.754, the last 8
    0.910 (first step 0.656, last 0.812). LoRA (r 16, lr 3e-3 to 5e-2) on this random tiny model did not raise it
    within 48 steps (its adapters on the blocks barely move a random LM head's choice): see docs/grpo.md."""
    result = train(grpo_config(tmp_path, tiny_llama_dir, method="full", **LEARN))
    rows = metrics_of(tmp_path / "run")
    assert len(rows) == 48
    rewards = [r["reward_mean"] for r in rows]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert first < 0.8 and last > first + 0.1, (first, last)
    for key in ("reward_std", "no_signal_share", "completion_tokens_mean", "clipped_share", "rollout_tokens_per_s",
                "train_loss", "grad_norm"):
        assert key in rows[-1]
    assert 0 <= rows[-1]["no_signal_share"] <= 1 and 1 <= rows[-1]["completion_tokens_mean"] <= 6
    assert result.summary["objective"] == "grpo" and result.summary["first_reward_mean"] == rewards[0]


def test_resume_after_a_stop_repeats_rewards_and_losses(tmp_path, tiny_llama_dir):
    """Stopped at a checkpoint mid-generation (steps_per_generation 2) and resumed, the run logs the same rewards,
    losses and KL as an uninterrupted one, and ends with the same weights; validation reward (greedy) at
    eval_every."""
    sections = {"train": {"epochs": 2, "batch_size": 2, "micro_batch_size": 4, "eval_every": 2, "lr": 1e-2},
                "data": {"validation_fraction": 0.25}, "grpo": {"beta": 0.04, "steps_per_generation": 2}}
    whole = train(grpo_config(tmp_path, tiny_llama_dir, out="whole", **sections))
    cfg = grpo_config(tmp_path, tiny_llama_dir, out="parts", **sections)
    (tmp_path / "parts").mkdir()
    calls = {"n": 0}
    real = grpo.generate_rollouts

    def stop_after_first_generation(*args, **kwargs):  # STOP appears while step 1 of 2 of a generation runs
        calls["n"] += 1
        if calls["n"] == 2:
            (tmp_path / "parts" / STOP_FILE).write_text("")
        return real(*args, **kwargs)

    grpo.generate_rollouts = stop_after_first_generation
    try:
        with pytest.raises(TrainingStopped):
            train(cfg)
    finally:
        grpo.generate_rollouts = real
    assert [c.name for c in list_checkpoints(tmp_path / "parts")] == ["step-000003"]  # mid-generation (3 = 2 + 1)
    train(cfg, resume=True)
    a, b = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "parts")
    keys = ("reward_mean", "reward_std", "train_loss", "kl", "completion_tokens_mean", "clipped_share")
    assert len(a) == len(b) == whole.summary["steps"] == 12  # 12 train prompts, 2 per step, 2 epochs
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    assert [r.get("valid_reward_mean") for r in a] == [r.get("valid_reward_mean") for r in b]
    assert sum("valid_reward_mean" in r for r in a) == 6  # steps 2, 4, ..., 12
    # rollouts.jsonl: the step's first prompt's 4 completions as graded; the resumed run's file is the same
    samples = (tmp_path / "whole" / grpo.SAMPLES_FILE).read_text()
    assert samples == (tmp_path / "parts" / grpo.SAMPLES_FILE).read_text()
    rows = [json.loads(x) for x in samples.splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(1, 13) for _ in range(4)]
    for r in rows:
        assert r["reward"] == (1.0 if "e" in r["completion"].casefold() else 0.0) and r["prompt"].startswith("say ")
    assert any(r["kl"] > 0 for r in a[1:]) and a[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "parts" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_grader_failing_on_every_completion_stops_the_run_before_it_trains(tmp_path, tiny_llama_dir):
    """Every grade failing (a python grader that raises) ends the run at its first generation with the grader's
    message; one failing on some completions scores them 0, counts them, and the run goes on."""
    boom = {"type": "python", "name": "boom", "source": "def grade(sample, item):\n    raise ValueError('boom')\n"}
    with pytest.raises(TunekitError) as err:
        train(grpo_config(tmp_path, tiny_llama_dir, out="boom", grader=boom, train={"max_steps": 2}))
    (problem,) = err.value.problems
    assert problem.where == "grpo.grader" and "every one of the 8 completions" in problem.message
    assert "boom" in problem.message
    assert list_checkpoints(tmp_path / "boom") == [] and (tmp_path / "boom" / "metrics.jsonl").read_text() == ""
    some = {"type": "python", "name": "some", "source": "def grade(sample, item):\n"
            "    if 'e' not in sample['output_text']:\n        raise ValueError('no e')\n    return 1.0\n"}
    train(grpo_config(tmp_path, tiny_llama_dir, out="some", grader=some, train={"max_steps": 3}))
    rows = metrics_of(tmp_path / "some")
    assert len(rows) == 3 and all(0 <= r["grader_error_share"] < 1 for r in rows)
    assert any(r["grader_error_share"] > 0 for r in rows)
    assert all(r["reward_mean"] == pytest.approx(1 - r["grader_error_share"]) for r in rows)


def test_model_graders_answer_with_the_judges_of_grpo_judges(tmp_path, tiny_llama_dir):
    """A score_model grader's `model` must be mapped in grpo.judges to a local model (refused up front
    otherwise); the reward's judge is that model, loaded once in the training process."""
    judge = {"type": "score_model", "name": "judge", "model": "my-judge", "range": [0, 1],
             "input": [{"role": "user", "content": "Rate 0 to 1: {{sample.output_text}}"}]}
    cfg = grpo_config(tmp_path, tiny_llama_dir, grader=judge)
    (problem,) = check_setup(cfg, resume=False)
    assert problem.where == "grpo.judges" and "my-judge" in problem.message and "grpo.judges" in problem.hint
    cfg = grpo_config(tmp_path, tiny_llama_dir, grader=judge, grpo={"judges": {"my-judge": str(tmp_path)}})
    (problem,) = check_setup(cfg, resume=False)
    assert problem.where == "grpo.judges.my-judge" and "not a model dir" in problem.message
    cfg = grpo_config(tmp_path, tiny_llama_dir, grader=judge, grpo={"judges": {"my-judge": str(tiny_llama_dir)}})
    assert check_setup(cfg, resume=False) == []
    rewarder = grpo.Rewarder(judge, cfg.grpo.judges, "cpu")
    from tunekit.eval.graders import grade
    from tunekit.eval.grading import LocalJudge, sample_of

    mine = rewarder.score("a reply", {})
    theirs = grade(judge, sample_of("a reply"), {}, judge=LocalJudge({"my-judge": str(tiny_llama_dir)}, device="cpu"),
                   sandbox=None)
    assert list(rewarder.judge.loaded) == ["my-judge"]  # the judge model answered
    assert (mine.reward, mine.error_message) == (theirs.reward, theirs.error_message)
    rewarder.close()
