"""`tunekit eval --grader`: OpenAI grader files scoring every candidate's replies, in results.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from toy_runs import toy_config, write_toy_chat
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.eval.evaluate import evaluate
from tunekit.eval.graders import PythonSandbox
from tunekit.eval.grading import grade_replies, load_grader_files
from tunekit.eval.metrics import reference_of, score_example
from tunekit.eval.report import write_report
from tunekit.train.loop import train

REPO = Path(__file__).resolve().parents[1]
FUNCTION_CALLING = REPO / "examples" / "function-calling"


def _hermes(calls: list[dict]) -> str:
    return "".join(f'<tool_call>{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}'
                   f"</tool_call>" for c in calls)


def test_the_function_calling_grader_agrees_with_the_built_in_metrics_example_by_example():
    """right_action equals tool-call accuracy on every tool question and exact match on the others, for replies
    that are right, that swap or drop a call, change an argument, or answer in text."""
    records = [json.loads(line) for line in (FUNCTION_CALLING / "valid.jsonl").read_text().splitlines()]
    items, replies = [], []
    for k, record in enumerate(records):
        reference = record["messages"][-1]
        calls = reference.get("tool_calls") or []
        if not calls:
            variants = [reference["content"], reference["content"] + " ", "I cannot say."]
        else:
            args = json.loads(calls[0]["function"]["arguments"])
            changed = {**args, next(iter(args)): "changed"} if args else {"x": 1}
            wrong = [{**calls[0], "function": {**calls[0]["function"], "arguments": json.dumps(changed)}}]
            variants = [_hermes(calls), _hermes(list(reversed(calls))), _hermes(calls[:-1]), _hermes(wrong + calls[1:]),
                        "No tool needed."]
        for text in variants[k % 2:]:  # a different mix for alternate records
            items.append(record)
            replies.append(text)
    (grader,) = [g for g in load_grader_files([FUNCTION_CALLING / "graders.yaml"], {"messages", "tools"})[0]
                 if g["name"] == "right_action"]
    with PythonSandbox(workers=2) as sandbox:
        scores, failed = grade_replies([grader], items, replies, judge=None, sandbox=sandbox,
                                       where=[str(i) for i in range(len(items))], log=print)
    assert failed == {"right_action": 0}
    agreed = {"tool_call_accuracy": 0, "exact_match": 0}
    for item, reply, score in zip(items, replies, scores, strict=True):
        builtin = score_example(reply, reference_of(item))
        key = "tool_call_accuracy" if "tool_call_accuracy" in builtin else "exact_match"
        assert score["grader.right_action"] == builtin[key], (reply, item["messages"][-1])
        agreed[key] += 1
    assert agreed["tool_call_accuracy"] > 200 and agreed["exact_match"] > 15
    assert 0 < sum(s["grader.right_action"] for s in scores) < len(scores)  # both outcomes occur


def test_eval_with_graders_reports_means_pass_rates_and_lowest_samples(tmp_path, tiny_llama_dir):
    run = train(toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 2})).run_dir
    held_out = write_toy_chat(tmp_path / "held_out.jsonl", 6, seed=3)
    graders = tmp_path / "graders.yaml"
    graders.write_text(yaml.safe_dump([
        {"type": "string_check", "name": "says_word", "operation": "ilike",
         "input": "{{sample.output_text}}", "reference": "{{item.messages[0].content}}"},
        {"type": "text_similarity", "name": "close", "evaluation_metric": "fuzzy_match", "pass_threshold": 0.5,
         "input": "{{sample.output_text}}", "reference": "{{item.messages[-1].content}}"},
        {"type": "python", "name": "length", "source": "def grade(sample, item):\n    return min(1.0, len(sample['output_text']) / 10)\n"},
    ]))
    result = evaluate(run, held_out, baselines=["base"], graders=[graders], max_new_tokens=6).to_dict()
    for cand in result["candidates"]:
        values = {k: [ex["scores"][cand["name"]][k] for ex in result["examples"]] for k in
                  ("grader.says_word", "grader.close", "grader.length", "grader.close.pass")}
        for key, per_example in values.items():
            assert len(per_example) == 6 and cand["metrics"][key] == pytest.approx(sum(per_example) / 6)
        predictions = [ex["predictions"][cand["name"]] for ex in result["examples"]]
        assert values["grader.length"] == pytest.approx([min(1.0, len(p) / 10) for p in predictions])
        assert values["grader.close.pass"] == [float(v >= 0.5) for v in values["grader.close"]]
    files = write_report(result, tmp_path / "report")
    markdown = files["markdown"].read_text()
    assert "says_word (grader)" in markdown and "close pass rate" in markdown and "±" in markdown
    assert "## Lowest says_word (grader) (fine-tuned)" in markdown


def test_a_bad_grader_file_is_refused_before_any_model_loads(tmp_path, tiny_llama_dir, monkeypatch):
    import tunekit.model

    run = train(toy_config(tmp_path, tiny_llama_dir, train={"max_steps": 1})).run_dir
    monkeypatch.setattr(tunekit.model, "load_for_inference", lambda *a, **k: pytest.fail("a model loaded"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"type": "string_check", "name": "x", "operation": "like", "input": "{{item.nope}}",
                                "reference": "a"},
                               {"type": "multi", "name": "m", "graders": {"a": {"type": "string_check", "name": "a",
                                "operation": "eq", "input": "a", "reference": "a"}}, "calculate_output": "a + b"}]))
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "train.jsonl"), "--grader", str(bad),
                                      "--grader", str(tmp_path / "missing.yaml")], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())
    assert "item.nope" in out and "calculate_output" in out and "missing.yaml" in out
