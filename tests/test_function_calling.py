"""examples/function-calling: its data generator, its tool template, a short fine-tune scored on held-out
tool calls, and client.py (the openai SDK) against `tunekit serve` on that run.

The shipped config trains longer (README: the numbers it reaches); here a shortened run (overrides) must
still reach the floor measured at these settings: it has learned the call format.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_modules import load_example, read_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "function-calling"


def load(name: str):
    return load_example("function-calling", name)


# --------------------------------------------------------------------------------------------------
# Data and template


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    make_data = load("make_data")
    train, valid = make_data.make_split(1500, 100, seed=0)
    make_data.write_jsonl(tmp_path / "train.jsonl", train)
    make_data.write_jsonl(tmp_path / "valid.jsonl", valid)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
    assert make_data.make_split(20, 5, seed=1) != make_data.make_split(20, 5, seed=0)


def test_chats_call_tools_with_their_real_results():
    tools = load("tools")
    train = read_jsonl(EXAMPLE / "train.jsonl")
    valid = read_jsonl(EXAMPLE / "valid.jsonl")
    asked = {row["messages"][1]["content"] for row in train}
    assert not asked & {row["messages"][1]["content"] for row in valid}  # held-out questions are new
    kinds = {"none": 0, "one": 0, "parallel": 0}
    for row in train:
        assert row["tools"] == tools.TOOLS
        calls = row["messages"][2].get("tool_calls") or []
        kinds["none" if not calls else "one" if len(calls) == 1 else "parallel"] += 1
        results = [m for m in row["messages"] if m["role"] == "tool"]
        assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
        for call, result in zip(calls, results, strict=True):  # each result is what the function returns
            arguments = json.loads(call["function"]["arguments"])
            assert json.loads(result["content"]) == tools.call(call["function"]["name"], arguments)
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
    assert all(n >= 0.1 * len(train) for n in kinds.values()), kinds
    for row in valid:  # held out up to the first assistant message: the decision scored
        assert row["messages"][-1]["role"] == "assistant" and len(row["messages"]) == 3


def test_template_renders_tools_calls_and_results():
    from transformers import AutoTokenizer

    from tunekit.data.render import render_example, render_prompt

    tok = AutoTokenizer.from_pretrained(EXAMPLE / "tiny-chat-tools")
    row = next(r for r in read_jsonl(EXAMPLE / "train.jsonl") if len(r["messages"][2].get("tool_calls") or []) == 2)
    [seq] = render_example(row, tok)  # one sequence: the template is prefix-stable
    text = tok.decode(seq.input_ids)
    assert "Tools:\n- get_weather(city): current weather in a city\n" in text
    trained = tok.decode([t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label != -100])
    calls = row["messages"][2]["tool_calls"]
    first = f'<tool_call>{{"name": "{calls[0]["function"]["name"]}", "arguments": {calls[0]["function"]["arguments"]}}}'
    assert trained.startswith(first) and "<|im_start|>tool" not in trained
    assert row["messages"][-1]["content"] in trained  # the reply from the results is trained too
    prompt = tok.decode(render_prompt(read_jsonl(EXAMPLE / "valid.jsonl")[0], tok))
    assert prompt.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------
# A short fine-tune, its held-out tool-call accuracy, and client.py against it

STEPS = 100  # the shipped config trains more; the floors below were measured at these settings
HELD_OUT = 40
# Measured at these settings with the shipped model, on the 36 tool questions of the first 40 held-out ones:
# calls that parse 36/36, the right tool(s) 22/36 (61%), names and arguments right 8/36 (22%). The shipped
# config's 471 steps reach 88.8% on all 89 (README); 200 steps measured 47%.
PARSED_FLOOR = 0.9
NAME_FLOOR = 0.45
ACCURACY_FLOOR = 0.12


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    from tunekit.config import load_config
    from tunekit.train.loop import train

    out = tmp_path_factory.mktemp("fc") / "function-calling"
    # One torch thread: on a machine whose cores other jobs share, two threads that wait on each other are
    # many times slower (measured here: ~45 s vs ~1 s per step).
    cfg = load_config(EXAMPLE / "config.yaml", [f"train.max_steps={STEPS}", "train.threads=1", f"output.dir={out}"])
    return Path(train(cfg).run_dir)


def test_short_run_learns_the_call_format(short_run):
    """100 steps teach the syntax and start on the arguments: the tuned run answers held-out tool questions
    with calls that parse (the base never does), some with the right arguments copied from the question, and
    its held-out loss falls from ~8.5 to under 0.5 (measured: 0.09)."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.eval.toolcalls import parse_tool_calls

    result = evaluate(short_run, EXAMPLE / "valid.jsonl", baselines=["base"], limit=HELD_OUT, max_new_tokens=200,
                      batch_size=20, device="cpu")
    tuned, base = result.candidates
    on_calls = [i for i, ex in enumerate(result.examples) if ex.reference.is_tool_call]
    assert len(on_calls) >= 30  # most held-out answers are calls
    def parsed(c):
        return sum(bool(parse_tool_calls(c.predictions[i])) for i in on_calls) / len(on_calls)
    assert parsed(base) == 0.0 and base.metrics["tool_call_accuracy"] == 0.0
    assert parsed(tuned) >= PARSED_FLOOR
    assert tuned.metrics["tool_call_name"] >= NAME_FLOOR
    assert tuned.metrics["tool_call_accuracy"] >= ACCURACY_FLOOR
    assert tuned.metrics["loss"] < 0.5 < 5 < base.metrics["loss"]


def test_client_runs_the_tools_the_served_model_calls(short_run, capsys):
    pytest.importorskip("openai", reason="client.py needs the serve extra: pip install -e '.[serve]'")
    from live_server import serving

    tools = load("tools")
    client = load("client")
    with serving(models=[f"function-calling={short_run}"]) as (url, _):
        [(_, made, answer)] = client.main(["What's the weather in Lisbon?", "--base-url", url])
    # The served model's reply came back through the API as structured tool_calls; client.py ran each
    # call's Python function on the parsed arguments and sent the result back; the model then replied.
    assert made, "the tuned run made no tool call through the API"
    for call in made:
        assert isinstance(call["arguments"], dict)
        assert call["result"] == tools.call(call["name"], call["arguments"])
    assert isinstance(answer, str) and answer
    assert "tool call " in capsys.readouterr().out
