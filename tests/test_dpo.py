"""The preference objective (objective: dpo): losses against their formulas, the reference, the loop."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from toy_runs import WORDS, toy_config

from tunekit.config import DpoConfig
from tunekit.data.dataset import fit_pairs, read_pairs
from tunekit.data.types import Sequence
from tunekit.errors import ConfigError
from tunekit.eval.evaluate import evaluate
from tunekit.eval.report import write_report
from tunekit.model import apply_method, load_base
from tunekit.train.checkpoint import list_checkpoints
from tunekit.train.dpo import (
    REFERENCE_FILE,
    PreferenceLoss,
    make_pair_batches,
    preference_losses,
    sequence_logps,
)
from tunekit.train.loop import STOP_FILE, TrainingStopped, backward_step, train

LN2 = math.log(2)


def write_toy_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable preference: the reply repeats the user's word (preferred), not another word."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            word, other = rng.sample(WORDS, 2)
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"say {word}"}],
                                 "chosen": [{"role": "assistant", "content": f"{word} {word} {word}"}],
                                 "rejected": [{"role": "assistant", "content": f"{other} {other} {other}"}]}) + "\n")
    return path


def dpo_config(tmp_path: Path, base, *, out: str = "run", n: int = 24, **sections):
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.exists():
        write_toy_pairs(pairs, n)
    sections.setdefault("data", {})
    sections["data"] = {"train": str(pairs), **sections["data"]}
    sections.setdefault("train", {})
    sections["train"] = {"epochs": 1, "batch_size": 4, "micro_batch_size": 2, **sections["train"]}
    return toy_config(tmp_path, base, out=out, objective="dpo", **sections)


def toy_pairs(tmp_path, base, tokenizer, n: int = 6):
    cfg = dpo_config(tmp_path, base)
    pairs, _ = fit_pairs(read_pairs(cfg.data.train, tokenizer, cfg.data)[:n], 64, "drop")
    return pairs


def model_of(cfg):
    torch.manual_seed(0)
    return apply_method(load_base(cfg, torch.device("cpu")), cfg)


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# The losses


def test_step0_with_lora_the_sigmoid_loss_is_ln2_for_every_pair(tmp_path, tiny_llama_dir, chat_tokenizer):
    """A new adapter changes nothing yet: policy = reference (the adapter switched off), every pair's loss ln 2."""
    cfg = dpo_config(tmp_path, tiny_llama_dir)
    model = model_of(cfg)
    pairs = toy_pairs(tmp_path, tiny_llama_dir, chat_tokenizer)
    (pb,) = make_pair_batches(pairs, [[0, 1, 2], [3, 4, 5]], 2, True, 0)
    logps, counts = sequence_logps(model, pb, 4096)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = sequence_logps(model, pb, 4096)
    assert torch.equal(counts[:, 0], torch.tensor([float(c.num_trained) for c, _ in pairs]))
    loss, chosen, rejected = preference_losses(cfg.dpo, logps, counts, ref)
    assert loss.tolist() == pytest.approx([LN2] * 6, abs=1e-6)
    assert chosen.abs().max() < 1e-6 and rejected.abs().max() < 1e-6
    total, n, stats = PreferenceLoss(model, cfg.dpo, 4096, "adapter-off")(pb)
    assert n == 6 and float(total) == pytest.approx(6 * LN2, abs=1e-5) and stats[2] == 0  # no pair is "right" yet


def reference_formula(dpo: DpoConfig, model, pairs, ref) -> torch.Tensor:
    """The summed loss of `pairs`, written out: each side alone through the model's full logits."""
    def side(seq: Sequence) -> tuple[torch.Tensor, int]:
        ids = torch.tensor([seq.input_ids])
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
        trained = [t for t in range(1, len(seq)) if seq.labels[t] >= 0]
        return sum(logp[t - 1, seq.input_ids[t]] for t in trained), len(trained)

    b, ls, total = dpo.beta, dpo.label_smoothing, 0
    for p, (c, r) in enumerate(pairs):
        (sc, nc), (sr, nr) = side(c), side(r)
        rc, rr = float(ref[p, 0]), float(ref[p, 1])
        if dpo.loss == "sigmoid":
            z = (sc - sr) - (rc - rr)
            loss = -(1 - ls) * torch.log(torch.sigmoid(b * z)) - ls * torch.log(torch.sigmoid(-b * z))
        elif dpo.loss == "ipo":
            z = (sc / nc - sr / nr) - (rc / nc - rr / nr)
            loss = (z - 1 / (2 * b)) ** 2
        elif dpo.loss == "orpo":
            pc, pr = sc / nc, sr / nr
            log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
            loss = -pc - b * torch.log(torch.sigmoid(log_odds))
        else:
            z = b * (sc / nc - sr / nr) - dpo.simpo_gamma
            loss = -(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z))
        total = total - dpo.sft_weight * sc / nc + loss
    return total


@pytest.mark.parametrize("settings", [
    {"loss": "sigmoid"}, {"loss": "sigmoid", "label_smoothing": 0.2, "sft_weight": 0.3}, {"loss": "ipo"},
    {"loss": "orpo", "beta": 0.5}, {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.7, "label_smoothing": 0.1}],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_loss_and_gradient_equal_the_formula(tmp_path, tiny_llama_dir, chat_tokenizer, settings, packing):
    """Both sides of 3 pairs in one forward (packed rows or padded rows) = each side alone through the full
    logits and the loss written out, in value and in gradient (full fine-tuning, a reference that differs)."""
    cfg = dpo_config(tmp_path, tiny_llama_dir, method="full", dpo=settings)
    model = model_of(cfg)
    pairs = toy_pairs(tmp_path, tiny_llama_dir, chat_tokenizer, 3)
    ref = -torch.rand(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 40 - 5
    module = PreferenceLoss(model, cfg.dpo, 64, "none" if settings["loss"] in ("orpo", "simpo") else "precompute")
    module.tables = {"train": ref}
    rows = [[0, 1], [2]] if packing else [[0], [1], [2]]
    batches = make_pair_batches(pairs, rows, 2, packing, 0)
    loss, n, _ = backward_step(module, batches, "cpu")
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    expected = reference_formula(cfg.dpo, model, pairs, ref)
    (expected / 3).backward()
    assert n == 3 and loss == pytest.approx(float(expected), abs=1e-5)
    for k, p in model.named_parameters():
        assert torch.allclose(got[k], p.grad, atol=1e-5, rtol=1e-4), k


def test_a_pair_whose_sides_are_identical_gives_no_gradient(tmp_path, tiny_llama_dir, chat_tokenizer):
    cfg = dpo_config(tmp_path, tiny_llama_dir, method="full")
    model = model_of(cfg)
    (c, r), = toy_pairs(tmp_path, tiny_llama_dir, chat_tokenizer, 1)
    module = PreferenceLoss(model, cfg.dpo, 4096, "precompute")
    module.tables = {"train": torch.tensor([[-30.0, -20.0], [-30.0, -20.0]], dtype=torch.float64)}
    for pair, nonzero in (((c, r), True), ((c, Sequence(c.input_ids, c.labels)), False)):
        model.zero_grad()
        backward_step(module, make_pair_batches([pair, pair], [[0], [1]], 2, True, 0), "cpu")
        biggest = max(float(p.grad.abs().max()) for p in model.parameters())
        assert (biggest > 1e-3) if nonzero else (biggest < 1e-6), biggest


# --------------------------------------------------------------------------------------------------
# Training runs


def test_short_lora_run_raises_reward_accuracy_and_margin(tmp_path, tiny_llama_dir):
    cfg = dpo_config(tmp_path, tiny_llama_dir, n=40, dpo={"beta": 0.5},
                     train={"epochs": 4, "lr": 1e-2, "eval_every": 8, "warmup_ratio": 0.0})
    summary = train(cfg).summary
    rows = metrics_of(cfg.output.dir)
    assert len(rows) >= 16 and rows[0]["train_loss"] == pytest.approx(LN2, abs=1e-5)
    assert rows[0]["reward_accuracy"] == 0 and rows[0]["reward_margin"] == pytest.approx(0, abs=1e-6)
    late = rows[-8:]
    assert sum(r["reward_accuracy"] for r in late) / 8 >= 0.75
    assert sum(r["reward_margin"] for r in late) / 8 > 0.3
    assert summary["initial_valid_reward_accuracy"] == 0 and summary["final_valid_reward_accuracy"] >= 0.75
    assert summary["final_valid_reward_margin"] > 0.2 and summary["reference"] == "adapter-off"
    assert {"valid_loss", "valid_reward_accuracy", "valid_reward_margin"} <= set(rows[7])
    assert (cfg.output.dir / "final" / "adapter_model.safetensors").is_file()

    # tunekit eval on held-out pairs: the tuned run prefers the preferred reply more often than its base.
    held_out = write_toy_pairs(tmp_path / "held_out.jsonl", 12, seed=7)
    result = evaluate(cfg.output.dir, held_out, baselines=["base"]).to_dict()
    tuned, base = (c["metrics"] for c in result["candidates"])
    assert result["n_examples"] == 12 and result["settings"]["kind"] == "preference"
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["preference_margin"] > base["preference_margin"]
    # The base's margin of the first pair, computed here from its logits: log p(preferred) - log p(other).
    from tunekit.data.preference import render_pair
    from tunekit.model import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_llama_dir), device=torch.device("cpu"))
    pair = render_pair(json.loads(held_out.read_text().splitlines()[0]), tokenizer)

    def logp(reply: list[int]) -> float:
        ids = torch.tensor([pair.prompt + reply])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(pair.prompt) - 1:-1].double()
        return float(logits.log_softmax(-1).gather(1, torch.tensor(reply)[:, None]).sum())

    first = result["examples"][0]["scores"]["base"]
    assert first["preference_margin"] == pytest.approx(logp(pair.chosen) - logp(pair.rejected), abs=1e-4)
    files = write_report(result, tmp_path / "report")
    assert "preference accuracy" in files["markdown"].read_text()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, tiny_llama_dir, method):
    """Full fine-tuning computes the reference once (kept in the run dir, read back on --resume); LoRA switches
    the adapter off. Either way a run stopped after step 1 and resumed has the losses of one never stopped."""
    sections = dict(method=method, train={"max_steps": 4, "lr": 1e-3 if method == "full" else 1e-2})
    whole = dpo_config(tmp_path, tiny_llama_dir, out="whole", **sections)
    summary = train(whole).summary
    reference = metrics_of(whole.output.dir)
    assert reference[0]["train_loss"] == pytest.approx(LN2, abs=1e-5)
    assert reference[-1]["train_loss"] != pytest.approx(LN2, abs=1e-3)  # it trains
    assert summary["reference"] == ("precompute" if method == "full" else "adapter-off")
    assert (whole.output.dir / REFERENCE_FILE).is_file() == (method == "full")

    cfg = dpo_config(tmp_path, tiny_llama_dir, out="paused", **sections)
    cfg.output.dir.mkdir(parents=True)
    (cfg.output.dir / STOP_FILE).touch()
    with pytest.raises(TrainingStopped, match="step 1"):
        train(cfg)
    assert [p.name for p in list_checkpoints(cfg.output.dir)] == ["step-000001"]
    if method == "full":
        stamp = (cfg.output.dir / REFERENCE_FILE).stat().st_mtime_ns
    train(cfg, resume=True)
    if method == "full":  # not computed again (it would be of the checkpoint's weights, not the start's)
        assert (cfg.output.dir / REFERENCE_FILE).stat().st_mtime_ns == stamp
    resumed = metrics_of(cfg.output.dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] and len(resumed) >= 3
    for a, b in zip(resumed, reference, strict=True):
        for key in ("train_loss", "reward_margin", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a, b)


@pytest.mark.parametrize("previous_adapter", ["merge", "continue"])
def test_dpo_starts_from_an_sft_run(tmp_path, tiny_llama_dir, previous_adapter):
    """model.base an SFT run: its adapter merged (the reference: the new adapter off) or continued (the reference:
    precomputed, as switching that adapter off would give the model before SFT); either way step 1 is ln 2."""
    sft = train(toy_config(tmp_path, tiny_llama_dir, out="sft", train={"max_steps": 2})).run_dir
    cfg = dpo_config(tmp_path, sft, out=f"dpo-{previous_adapter}", model={"previous_adapter": previous_adapter},
                     train={"max_steps": 2})
    summary = train(cfg).summary
    assert summary["reference"] == ("adapter-off" if previous_adapter == "merge" else "precompute")
    assert metrics_of(cfg.output.dir)[0]["train_loss"] == pytest.approx(LN2, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Refusals


def test_the_wrong_objective_for_the_file_is_refused_before_weights_load(tmp_path, tiny_llama_dir, monkeypatch):
    import importlib

    loop = importlib.import_module("tunekit.train.loop")

    monkeypatch.setattr(loop, "load_base", lambda *a, **k: pytest.fail("weights loaded"))
    pairs = write_toy_pairs(tmp_path / "pairs.jsonl", 4)
    sft_on_pairs = toy_config(tmp_path, tiny_llama_dir, data={"train": str(pairs)})
    with pytest.raises(ConfigError) as err:
        train(sft_on_pairs)
    assert f"{pairs}:1" in str(err.value) and "objective: dpo" in str(err.value)

    dpo_on_chat = toy_config(tmp_path, tiny_llama_dir, objective="dpo")
    with pytest.raises(ConfigError) as err:
        train(dpo_on_chat)
    assert f"{tmp_path / 'train.jsonl'}:1" in str(err.value) and "preference" in str(err.value)

    full_adapter_off = dpo_config(tmp_path, tiny_llama_dir, method="full", dpo={"reference": "adapter-off"})
    with pytest.raises(ConfigError, match="dpo.reference"):
        train(full_adapter_off)
    assert loop.check_setup(dpo_config(tmp_path, tiny_llama_dir), resume=False, world_size=2, run_dir=False) == []
    few_shot = dpo_config(tmp_path, tiny_llama_dir, eval={"baselines": ["base", "few-shot:2"], "scorer": "m:f"})
    problems = loop.check_setup(few_shot, resume=False, run_dir=False)
    assert [p.where for p in problems] == ["eval.baselines", "eval.scorer"]


@pytest.mark.parametrize("beta", [0, -0.1, 2.5])
def test_beta_out_of_range_is_refused(tmp_path, tiny_llama_dir, beta):
    with pytest.raises(ConfigError, match="dpo.beta"):
        dpo_config(tmp_path, tiny_llama_dir, dpo={"beta": beta})


def test_cli_overrides_set_the_objective(tmp_path, tiny_llama_dir):
    from tunekit.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{base: {tiny_llama_dir}}}\ndata: {{train: {write_toy_pairs(tmp_path / 'p.jsonl', 4)}}}\n")
    cfg = load_config(path, ["objective=dpo", "dpo.beta=0.2", "dpo.loss=ipo"])
    assert (cfg.objective, cfg.dpo.beta, cfg.dpo.loss) == ("dpo", 0.2, "ipo")
    assert load_config(path).objective == "sft"
