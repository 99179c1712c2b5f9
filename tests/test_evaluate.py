"""Evaluation on tiny local models: generation, teacher forcing, few-shot selection, the whole run, the CLI.

`tunekit.data.render` and `tunekit.model` come from other parts of the project. Where they are not
importable yet, the fixture `deps` puts minimal stand-ins (ChatML only) in their place for these tests;
once the real modules exist, the tests run against them unchanged.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from tunekit.config import RunConfig, load_config
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import DataError, TunekitError
from tunekit.eval.evaluate import evaluate, read_eval_examples, teacher_forced
from tunekit.eval.shots import choose_shots, retrieve_shots, with_shots
from tunekit.generate.engine import generate

# --------------------------------------------------------------------------------------------------
# Stand-ins for modules other parts of the project provide (used only when those are absent)


def _strip(messages):
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _standin_render() -> types.ModuleType:
    mod = types.ModuleType("tunekit.data.render")

    def text(messages, tokenizer, gen):
        return tokenizer.apply_chat_template(_strip(messages), tokenize=False, add_generation_prompt=gen)

    def render_prompt(example, tokenizer, *, tools=None):
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _ids(tokenizer, text(messages[:last], tokenizer, True))

    def render_example(example, tokenizer, *, unstable_template="split"):
        messages = example["messages"]
        ids = _ids(tokenizer, text(messages, tokenizer, False))
        labels = [IGNORE] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("weight", 1) == 0:
                continue
            start = len(_ids(tokenizer, text(messages[:i], tokenizer, True)))
            end = len(_ids(tokenizer, text(messages[:i + 1], tokenizer, False))) - 1  # not the "\n" after <|im_end|>
            labels[start:end] = ids[start:end]
        return [Sequence(ids, labels)]

    def end_of_turn_ids(tokenizer):
        return [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    mod.render_prompt, mod.render_example, mod.end_of_turn_ids = render_prompt, render_example, end_of_turn_ids
    return mod


def _standin_model() -> types.ModuleType:
    mod = types.ModuleType("tunekit.model")

    def load_for_inference(path, device="cpu"):
        import yaml
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        final = path / "final" if (path / "final").is_dir() else path
        if (final / "adapter_config.json").is_file():
            base = yaml.safe_load((final.parent / "config.yaml").read_text())["model"]["base"]
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), final)
        else:
            model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(final)

    mod.load_for_inference = load_for_inference
    return mod


def render() -> types.ModuleType:
    """tunekit.data.render (or its stand-in while the `deps` fixture holds one)."""
    return importlib.import_module("tunekit.data.render")


@pytest.fixture(autouse=True)
def deps(monkeypatch):
    for name, make in (("tunekit.data.render", _standin_render), ("tunekit.model", _standin_model)):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            monkeypatch.setitem(sys.modules, name, make())


# --------------------------------------------------------------------------------------------------
# Tiny models and data


def rig_chain(model, chain: list[int]) -> None:
    """Make `model` map token chain[i] to chain[i+1] (the last maps to itself), whatever came before.

    Attention and MLP outputs are zeroed, so each position's hidden state is its own token embedding;
    chain tokens embed as basis vectors and the LM head reads each basis vector as the next token.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, token in enumerate(chain):
            emb[token].zero_()
            emb[token, i] = 1.0
            head[chain[min(i + 1, len(chain) - 1)], i] = 10.0


def chat(question: str, answer: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


EVAL = [chat("what is the weather in Paris", "hot"), chat("name a city", "London", system="be short"),
        chat("what is one and one", "two"), chat("say a word about water", "water is good for you")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run dir as training leaves it: config.yaml, final/ with a LoRA adapter (B != 0), metrics.jsonl."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("run")
    train = [chat(f"question {i} about the {w}", f"answer {i} {w}") for i, w in
             enumerate(["sugar", "salt", "rice", "egg", "milk", "onion"])]
    train += [EVAL[0], EVAL[1], chat(EVAL[2]["messages"][0]["content"], "a different answer")]  # never shots
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "valid.jsonl", EVAL)
    cfg = RunConfig.model_validate({"model": {"base": str(tiny_llama_dir)},
                                    "data": {"train": str(root / "train.jsonl"),
                                             "validation": str(root / "valid.jsonl")}})
    (root / "config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(root / "final")
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(root / "final")
    lines = [{"step": s, "epoch": s / 10, "lr": 1e-3, "train_loss": 5.0 - 0.1 * s} for s in range(1, 11)]
    lines[4]["valid_loss"], lines[9]["valid_loss"] = 4.8, 4.4
    write_jsonl(root / "metrics.jsonl", lines)
    return root


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------
# Generation


def test_generation_stops_at_end_of_turn(tiny_llama_dir, chat_tokenizer):
    from transformers import AutoModelForCausalLM

    end_of_turn_ids, render_prompt = render().end_of_turn_ids, render().render_prompt

    tok = chat_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompt = render_prompt(chat("hello", "x"), tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    text, after = _ids(tok, " hot water"), _ids(tok, " the")
    chain = [prompt[-1]] + text + [eot] + after
    assert len(set(chain)) == len(chain)  # the rig needs distinct tokens
    rig_chain(model, chain)

    stops = end_of_turn_ids(tok)
    assert eot in stops
    [out] = generate(model, [prompt], stop_ids=stops, pad_id=tok.pad_token_id, max_new_tokens=20, batch_size=1)
    assert out.ids == text and out.stopped
    assert tok.decode(out.ids) == " hot water"
    # With other stop ids the same model runs on past the end of turn: the stop ids are what end the text.
    [on] = generate(model, [prompt], stop_ids=after, pad_id=tok.pad_token_id, max_new_tokens=12, batch_size=1)
    assert on.ids == text + [eot] and on.stopped
    [cut] = generate(model, [prompt], stop_ids=stops, pad_id=tok.pad_token_id, max_new_tokens=2, batch_size=1)
    assert cut.ids == text[:2] and not cut.stopped


def test_generation_is_greedy_whatever_the_model_config_says(tiny_llama_dir, chat_tokenizer):
    from transformers import AutoModelForCausalLM

    render_prompt = render().render_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompt = render_prompt(EVAL[0], chat_tokenizer)
    kw = dict(stop_ids=[chat_tokenizer.convert_tokens_to_ids("<|im_end|>")], pad_id=0, max_new_tokens=8, batch_size=1)
    greedy = generate(model, [prompt], **kw)[0].ids
    with torch.no_grad():  # the first token is the argmax of the next-token logits
        first = model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax().item()
    assert greedy[0] == first
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0  # as some models ship
    for seed in range(3):
        torch.manual_seed(seed)
        assert generate(model, [prompt], **kw)[0].ids == greedy


def test_batched_generation_equals_one_by_one(tiny_model, chat_tokenizer):
    render_prompt = render().render_prompt

    prompts = [render_prompt(ex, chat_tokenizer) for ex in EVAL]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding is exercised
    kw = dict(stop_ids=[chat_tokenizer.convert_tokens_to_ids("<|im_end|>")], pad_id=chat_tokenizer.pad_token_id,
              max_new_tokens=12)
    one = [g.ids for g in generate(tiny_model, prompts, batch_size=1, **kw)]
    batched = [g.ids for g in generate(tiny_model, prompts, batch_size=3, **kw)]
    assert batched == one
    assert all(len(ids) > 0 for ids in one)


# --------------------------------------------------------------------------------------------------
# Teacher forcing


def test_teacher_forced_matches_transformers_loss_and_is_batch_invariant(tiny_model, chat_tokenizer):
    render_example = render().render_example

    seqs = [s for ex in EVAL for s in render_example(ex, chat_tokenizer)]
    single = [teacher_forced(tiny_model, [s], batch_size=1, pad_id=0) for s in seqs]
    for s, tf in zip(seqs, single, strict=True):
        with torch.no_grad():
            ref = tiny_model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels])).loss.item()
        assert tf.loss == pytest.approx(ref, rel=1e-5)
        assert tf.trained_tokens == s.num_trained
    together = teacher_forced(tiny_model, seqs, batch_size=4, pad_id=chat_tokenizer.pad_token_id)
    n = sum(t.trained_tokens for t in single)
    assert together.trained_tokens == n
    assert together.loss == pytest.approx(sum(t.loss * t.trained_tokens for t in single) / n, rel=1e-5)
    assert together.perplexity == pytest.approx(torch.tensor(together.loss).exp().item(), rel=1e-6)


def test_teacher_forced_accuracy_on_a_rigged_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rig_chain(model, [10, 11, 12, 13])
    right = Sequence([10, 11, 12, 13], [IGNORE, 11, 12, 13])
    wrong = Sequence([10, 11, 12, 14], [IGNORE, IGNORE, 12, 14])  # 12 -> 13 expected, 14 given
    assert teacher_forced(model, [right], batch_size=2, pad_id=0).token_accuracy == 1.0
    both = teacher_forced(model, [right, wrong], batch_size=2, pad_id=0)
    assert both.trained_tokens == 5 and both.token_accuracy == pytest.approx(4 / 5)


# --------------------------------------------------------------------------------------------------
# Few-shot


def test_shots_never_include_evaluated_examples_or_their_duplicates(run_dir, chat_tokenizer):
    render_prompt = render().render_prompt

    evaluated = [ex.example for ex in read_eval_examples(run_dir / "valid.jsonl")]
    shots = choose_shots(run_dir / "train.jsonl", evaluated, 6, seed=0)  # exactly the 6 usable lines
    assert [line for line, _ in shots] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(DataError, match="only 6 training examples"):
        choose_shots(run_dir / "train.jsonl", evaluated, 7, seed=0)
    for ex in evaluated:
        text = chat_tokenizer.decode(render_prompt(with_shots(ex, [s for _, s in shots]), chat_tokenizer))
        for other in evaluated:
            answer = other["messages"][-1]["content"]
            assert answer not in text
            if other is not ex:
                assert other["messages"][-2]["content"] not in text


def test_shot_choice_is_seeded_and_shot_turns_are_untrained(run_dir):
    evaluated = [ex.example for ex in read_eval_examples(run_dir / "valid.jsonl")]
    picks = {s: [line for line, _ in choose_shots(run_dir / "train.jsonl", evaluated, 2, seed=s)] for s in range(6)}
    assert picks[3] == [line for line, _ in choose_shots(run_dir / "train.jsonl", evaluated, 2, seed=3)]
    assert len({tuple(p) for p in picks.values()}) > 1  # the seed matters
    shot = chat("q1", "a1", system="ignored system")
    out = with_shots(EVAL[1], [shot])
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert out["messages"][0]["content"] == "be short"
    assert out["messages"][2] == {"role": "assistant", "content": "a1", "weight": 0}
    assert "weight" not in out["messages"][-1]


def test_retrieved_shots_are_the_most_similar_training_examples(tmp_path):
    pytest.importorskip("qdrant_client", reason="rag:K needs the rag extra: TUNEKIT_EXTRAS=rag bash scripts/setup.sh")
    evaluated = [chat("how long to boil rice", "20 minutes"), chat("how much salt for bread dough", "a pinch")]
    train = [chat("how much sugar in a cake", "a cup"),            # 1
             chat("boil eggs for how long", "8 minutes"),          # 2
             chat("boil rice for how long", "about 20 minutes"),   # 3
             chat("boil rice for how long", "about 20 minutes"),   # 4: a duplicate of 3, counted once
             evaluated[0],                                         # 5: the evaluated example itself
             chat("how long to boil rice", "a different answer"),  # 6: the evaluated prompt: never a shot
             chat("salt for bread dough", "1 teaspoon"),           # 7
             chat("bake bread how long", "40 minutes")]            # 8
    path = write_jsonl(tmp_path / "train.jsonl", train)
    shots = retrieve_shots(path, evaluated, 2)
    lines = [[line for line, _ in pairs] for pairs in shots]
    assert lines[0][-1] == 3 and lines[0][0] == 2  # the most similar sits last, nearest the question
    assert lines[1][-1] == 7
    assert all(not {4, 5, 6} & set(ls) and len(set(ls)) == 2 for ls in lines)
    with pytest.raises(DataError, match="only 5 distinct training examples"):
        retrieve_shots(path, evaluated, 6)


# --------------------------------------------------------------------------------------------------
# The whole evaluation


def test_evaluate_run_against_base_and_few_shot(run_dir, tiny_llama_dir):
    result = evaluate(run_dir, run_dir / "valid.jsonl", baselines=["base", "few-shot:2"],
                      models=[tiny_llama_dir], max_new_tokens=6, batch_size=2)
    names = [c.name for c in result.candidates]
    assert names == ["fine-tuned", "base", "few-shot:2", tiny_llama_dir.name]
    tuned, base, few, other = result.candidates
    # The adapter changes the model; the same base dir compared as --model gives the base's numbers.
    assert tuned.metrics["loss"] != pytest.approx(base.metrics["loss"])
    assert other.metrics["loss"] == pytest.approx(base.metrics["loss"]) and other.predictions == base.predictions
    # Few-shot: the shots cost prompt tokens; they are training lines, never evaluated ones.
    assert few.metrics["prompt_tokens"] > base.metrics["prompt_tokens"] == tuned.metrics["prompt_tokens"]
    assert len(few.shot_lines) == 2 and set(few.shot_lines) <= {1, 2, 3, 4, 5, 6}
    # Aggregates are the means of the per-example scores of the stored predictions.
    from tunekit.eval.metrics import exact_match

    for c in result.candidates:
        assert len(c.predictions) == len(EVAL)
        expected = sum(exact_match(p, ex.reference.text) for p, ex in zip(c.predictions, result.examples,
                                                                          strict=True)) / len(EVAL)
        assert c.metrics["exact_match"] == expected and c.counts["exact_match"] == len(EVAL)
        assert c.metrics["latency_ms"] > 0 and 0 <= c.metrics["token_accuracy"] <= 1
    data = result.to_dict()
    assert data["n_examples"] == 4 and data["examples"][1]["reference"] == "London"
    json.dumps(data)  # plain JSON


def test_evaluate_with_retrieval_shots(run_dir, tmp_path):
    pytest.importorskip("qdrant_client", reason="rag:K needs the rag extra: TUNEKIT_EXTRAS=rag bash scripts/setup.sh")
    result = evaluate(run_dir, run_dir / "valid.jsonl", baselines=["base", "rag:2"], max_new_tokens=4,
                      batch_size=4)
    assert [c.name for c in result.candidates] == ["fine-tuned", "base", "rag:2"]
    _, base, rag = result.candidates
    assert rag.kind == "rag" and rag.metrics["prompt_tokens"] > base.metrics["prompt_tokens"]
    # Each example gets its own nearest training lines (1-6; never 7-9, which are or ask evaluated ones).
    assert len(rag.example_shot_lines) == len(EVAL)
    assert all(len(ls) == 2 and set(ls) <= {1, 2, 3, 4, 5, 6} for ls in rag.example_shot_lines)
    expected = retrieve_shots(run_dir / "train.jsonl", [ex.example for ex in result.examples], 2)
    assert rag.example_shot_lines == [[line for line, _ in pairs] for pairs in expected]
    data = result.to_dict()
    assert data["examples"][0]["shot_lines"] == {"rag:2": rag.example_shot_lines[0]}
    from tunekit.eval.report import RAG_NOTE, write_report

    write_report(data, tmp_path / "eval")
    assert f"- rag:2: {RAG_NOTE}" in (tmp_path / "eval" / "report.md").read_text()


def test_rigged_model_scores_exact_match_end_to_end(tmp_path, run_dir, chat_tokenizer, tiny_llama_dir):
    """A model that always says " hot" then ends its turn: exact match 1 on "hot", 0 elsewhere."""
    from transformers import AutoModelForCausalLM

    render_prompt = render().render_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    last = render_prompt(EVAL[0], chat_tokenizer)[-1]
    assert all(render_prompt(ex, chat_tokenizer)[-1] == last for ex in EVAL)
    hot, eot = _ids(chat_tokenizer, "hot"), chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [last] + hot + [eot]
    assert len(set(chain)) == len(chain)
    rig_chain(model, chain)
    model.save_pretrained(tmp_path / "rigged")
    chat_tokenizer.save_pretrained(tmp_path / "rigged")
    result = evaluate(run_dir, run_dir / "valid.jsonl", baselines=[], models=[tmp_path / "rigged"],
                      max_new_tokens=5, batch_size=4)
    rigged = result.candidate("rigged")
    assert rigged.predictions == ["hot"] * 4
    assert rigged.metrics["exact_match"] == 0.25 and rigged.metrics["stopped"] == 1.0
    assert rigged.metrics["new_tokens"] == len(hot)


def test_user_scorer_gets_prediction_reference_and_example(tmp_path, run_dir):
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text("def score(prediction, reference, example):\n"
                      "    return {'len': float(len(prediction)), 'ref_is_last': "
                      "float(reference == example['messages'][-1]['content'])}\n")
    result = evaluate(run_dir, run_dir / "valid.jsonl", baselines=[], max_new_tokens=3, batch_size=4,
                      scorer=f"{scorer}:score", limit=2)
    tuned = result.candidates[0]
    assert len(result.examples) == 2
    assert tuned.metrics["scorer.ref_is_last"] == 1.0
    assert tuned.metrics["scorer.len"] == sum(len(p) for p in tuned.predictions) / 2


def test_problems_are_reported_together_before_loading(tmp_path, run_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(TunekitError) as info:
        evaluate(run_dir, bad, baselines=["few-shot:0", "base"], models=[tmp_path / "nope"],
                 scorer="no_such_module_xyz:f", device="gpu")
    text = str(info.value)
    assert f"{bad}:1 messages: no assistant message" in text
    assert f"{bad}:2: not valid JSON" in text and "(column 2)" in text
    assert f"{bad}:3: not a chat example" in text
    assert "few-shot needs a number of shots" in text and "nope" in text and "no_such_module_xyz" in text
    assert "unknown device 'gpu'" in text
    with pytest.raises(TunekitError, match="not found"):
        evaluate(tmp_path / "missing-run", bad)


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_eval_writes_the_report(tmp_path, run_dir):
    from typer.testing import CliRunner

    from tunekit.cli import app

    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(run_dir / "valid.jsonl"), "--baseline",
                                   "few-shot:1", "--out", str(out), "--max-new-tokens", "3", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "report.md", "results.json"]
    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["candidates"]] == ["fine-tuned", "few-shot:1"]
    assert results["verdict"] and " ".join(results["verdict"][0].split()) in " ".join(res.output.split())
    assert (out / "plots" / "loss_curves.png").is_file()


def test_cli_eval_errors_exit_1_without_traceback(tmp_path, run_dir):
    from typer.testing import CliRunner

    from tunekit.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path / "no-run"), "--data", str(run_dir / "valid.jsonl")])
    assert res.exit_code == 1 and "run dir" in res.output and "not found" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 1 and "evaluation data file not found" in res.output
    assert "Traceback" not in res.output


def test_tool_call_examples_are_scored_as_calls(tmp_path, tokenizer_with_template):
    from conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "hermes-model", "llama", tokenizer_with_template("hermes-tools"))
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "a city"}}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    examples = [{"messages": [{"role": "user", "content": "weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [call]},
                              {"role": "user", "content": "after the reference: never part of the prompt"}],
                 "tools": tools},
                chat("hi", "hello")]
    data = write_jsonl(tmp_path / "valid.jsonl", examples)
    result = evaluate(model_dir, data, max_new_tokens=4, batch_size=2)  # a plain model dir: no baselines
    [tuned] = result.candidates
    assert tuned.counts["tool_call_accuracy"] == 1 and tuned.counts["exact_match"] == 1
    assert set(tuned.scores[0]) == {"tool_call_name", "tool_call_accuracy"}
    assert result.to_dict()["examples"][0]["reference"] == '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert tuned.counts["trained_tokens"] > 0
    from transformers import AutoTokenizer

    asked = {**examples[0], "messages": examples[0]["messages"][:1]}  # up to the reference, without it
    assert tuned.prompt_tokens[0] == len(render().render_prompt(asked, AutoTokenizer.from_pretrained(model_dir)))


def test_evaluate_from_config_writes_run_eval(run_dir):
    from tunekit.config import load_config
    from tunekit.eval.evaluate import evaluate_from_config

    cfg = load_config(run_dir / "config.yaml", ["eval.limit=2", "eval.max_new_tokens=2", "eval.enabled=true"])
    result = evaluate_from_config(cfg, run_dir)
    assert [c.name for c in result.candidates] == ["fine-tuned", "base"] and len(result.examples) == 2
    stored = json.loads((run_dir / "eval" / "results.json").read_text())
    assert stored["data"] == str(run_dir / "valid.jsonl")
    assert stored["candidates"][1]["metrics"]["loss"] == pytest.approx(result.candidates[1].metrics["loss"])


def test_teacher_forced_sequences_come_from_the_data_cache(run_dir, monkeypatch, tmp_path):
    """Unchanged examples (the tuned run and the base; not few-shot, whose prompts differ) take their sequences
    from training's rendered-data cache, written by the first evaluation: the second renders none of them, and
    its numbers equal those of an evaluation with the cache off."""
    from tunekit.data import cache

    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    config = load_config(run_dir / "config.yaml", check_files=False)
    off = config.model_copy(update={"data": config.data.model_copy(update={"cache": False})})
    kwargs = dict(baselines=["base", "few-shot:1"], max_new_tokens=4, batch_size=2)
    without = evaluate(run_dir, run_dir / "valid.jsonl", config=off, **kwargs)
    assert cache.entries(tmp_path / "cache") == []
    evaluate(run_dir, run_dir / "valid.jsonl", config=config, **kwargs)
    assert len(cache.entries(tmp_path / "cache")) == 1
    real = render().render_example
    rendered = []

    def counting(record, tokenizer, *args, **kw):
        rendered.append(len(record["messages"]))
        return real(record, tokenizer, *args, **kw)

    monkeypatch.setattr(render(), "render_example", counting)
    again = evaluate(run_dir, run_dir / "valid.jsonl", config=config, **kwargs)
    assert len(rendered) == len(EVAL)  # only few-shot's examples, each with its shot before it
    assert all(n > 2 for n in rendered)
    for a, b in zip(without.candidates, again.candidates, strict=True):
        assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], abs=1e-6) and a.predictions == b.predictions
