import base64
import json
import re

import pytest

from tunekit.eval.report import paired_difference, primary_metric, verdict, write_report


def make_results(tuned_hits: list[int], base_hits: list[int], few_hits: list[int] | None = None) -> dict:
    """A results dict as EvalResult.to_dict() gives it, from per-example exact-match hits (1/0)."""
    runs = {"fine-tuned": tuned_hits, "base": base_hits}
    if few_hits is not None:
        runs["few-shot:3"] = few_hits
    prompt = {"fine-tuned": 40.0, "base": 40.0, "few-shot:3": 652.0}
    loss = {"fine-tuned": 0.8125, "base": 2.5, "few-shot:3": 1.75}
    n = len(tuned_hits)
    examples = []
    for i in range(n):
        examples.append({
            "line": i + 1, "reference": f"answer {i}",
            "predictions": {name: (f"answer {i}" if hits[i] else f"<b>wrong</b> & {i}") for name, hits in runs.items()},
            "scores": {name: {"exact_match": float(hits[i]), "normalized_match": float(hits[i])}
                       for name, hits in runs.items()},
            "prompt_tokens": {name: int(prompt[name]) for name in runs},
        })
    candidates = []
    for name, hits in runs.items():
        rate = sum(hits) / n
        candidates.append({
            "name": name, "kind": {"fine-tuned": "tuned", "base": "base"}.get(name, "few-shot"), "path": "/m",
            "metrics": {"loss": loss[name], "perplexity": 2.0 ** loss[name], "token_accuracy": 0.5,
                        "exact_match": rate, "normalized_match": rate, "json_valid": None, "json_equal": None,
                        "tool_call_name": None, "tool_call_accuracy": None, "prompt_tokens": prompt[name],
                        "new_tokens": 3.0, "latency_ms": 12.5, "stopped": 1.0},
            "counts": {"trained_tokens": 100, "exact_match": n, "normalized_match": n, "json_valid": 0,
                       "json_equal": 0, "tool_call_name": 0, "tool_call_accuracy": 0},
            "shot_lines": [3, 7, 9] if name.startswith("few") else [],
        })
    return {"run_dir": "runs/demo", "data": "valid.jsonl", "n_examples": n,
            "settings": {"max_new_tokens": 32}, "metric_labels": {"exact_match": "exact match",
                                                                  "normalized_match": "normalised match"},
            "candidates": candidates, "examples": examples}


def test_verdict_states_wins_with_token_savings():
    # 40 examples: tuned right on 36, few-shot on 20, base on 4.
    results = make_results([1] * 36 + [0] * 4, [1] * 4 + [0] * 36, [1] * 20 + [0] * 20)
    assert primary_metric(results) == "exact_match"
    lines = verdict(results)
    assert lines[0].startswith("Fine-tuning pays off on this set")
    assert ("Fine-tuned beats few-shot:3 by 40.0 points of exact match (90.0% vs 50.0%) and uses 612 fewer "
            "prompt tokens per request; held-out loss 0.812 vs 1.750.") in lines
    assert "Fine-tuned beats base by 80.0 points of exact match (90.0% vs 10.0%); held-out loss 0.812 vs 2.500." \
        in lines
    # The decision in one line: quality gained and tokens saved against the strongest baseline, and the cost.
    assert lines[-1] == ("The trade against the strongest baseline, few-shot:3 (50.0%): quality gained +40.0 points "
                         "of exact match, prompt tokens saved per request 612 (40 vs 652).")
    results["training"] = {"trained_tokens": 123456, "steps": 192, "wall_time_s": 126.0}
    assert verdict(results)[-1].endswith("saved per request 612 (40 vs 652), for a one-time training cost of "
                                         "123,456 trained tokens (192 steps, 2.1 min of training).")


def test_verdict_is_honest_when_tuning_loses_or_is_within_noise():
    losing = verdict(make_results([1] * 5 + [0] * 35, [1] * 30 + [0] * 10))
    assert losing[0].startswith("Fine-tuning does not pay off")
    assert losing[1].startswith("Fine-tuned does not beat base: it scores 62.5 points of exact match less "
                                "(12.5% vs 75.0%)")
    noisy = make_results([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 0, 0])
    mean, se, n = paired_difference(noisy, "exact_match", "fine-tuned", "base")
    assert n == 6 and mean == pytest.approx(1 / 6) and se > 0
    lines = verdict(noisy)
    assert lines[0].startswith("Not shown")
    assert lines[1].startswith("Fine-tuned scores 16.7 points of exact match more than base (50.0% vs 33.3%), "
                               "within noise on 6 examples (±")


def test_verdict_for_a_user_scorer_uses_its_units():
    results = make_results([1] * 10, [0] * 10)
    for c in results["candidates"]:
        c["metrics"]["scorer"] = 0.75 if c["name"] == "fine-tuned" else 0.25
    for ex in results["examples"]:
        ex["scores"]["fine-tuned"]["scorer"], ex["scores"]["base"]["scorer"] = 0.75, 0.25
    assert primary_metric(results) == "scorer"
    assert verdict(results)[1].startswith("Fine-tuned beats base by 0.500 on scorer (0.750 vs 0.250)")


def test_report_files_hold_the_numbers(tmp_path):
    results = make_results([1] * 9 + [0], [0] * 10, [1] * 5 + [0] * 5)
    results["candidates"][0]["metrics"]["perplexity"] = float("nan")  # JSON has no NaN: stored as null
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "train_loss": 3 - s / 10, **({"valid_loss": 2.5} if s == 5
                                                                                    else {})}) + "\n"
                               for s in range(1, 6)) + "{partial line")
    out = tmp_path / "eval"
    files = write_report(results, out, metrics_path=metrics)

    stored = json.loads((out / "results.json").read_text())
    assert stored["candidates"][0]["metrics"]["exact_match"] == 0.9
    assert stored["candidates"][0]["metrics"]["perplexity"] is None
    assert stored["verdict"] == verdict(results)

    md = (out / "report.md").read_text()
    assert "| exact match (n=10) |" not in md  # n sits in each cell, not the row label
    assert "| exact match | 90.0% (n=10) | 0.0% (n=10) | 50.0% (n=10) |" in md
    assert "| held-out loss | 0.8125 | 2.5000 | 1.7500 |" in md
    assert "| prompt tokens / request | 40.0 | 40.0 | 652.0 |" in md
    assert "training-file lines 3, 7, 9" in md
    assert stored["verdict"][1] in md
    assert "![loss curves](plots/loss_curves.png)" in md
    assert "&lt;b&gt;wrong&lt;/b&gt; &amp; 0" in md  # sample outputs escaped

    page = (out / "report.html").read_text()
    assert "<td class='num'>90.0% (n=10)</td>" in page and "<td class='num'>652.0</td>" in page
    assert "<b>wrong</b>" not in page and "&lt;b&gt;wrong&lt;/b&gt; &amp;amp;" not in page
    assert "&lt;b&gt;wrong&lt;/b&gt; &amp; 0" in page
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # loss curves, metrics per candidate, loss and cost
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert "src='plots/" not in page  # self-contained

    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.html", "report.md", "results.json"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "loss_and_cost_per_candidate.png", "loss_curves.png", "metrics_per_candidate.png"]
    assert files["html"] == out / "report.html"


def test_report_without_training_metrics_has_no_loss_curve(tmp_path):
    write_report(make_results([1, 0], [0, 0]), tmp_path, metrics_path=tmp_path / "absent.jsonl")
    assert not (tmp_path / "plots" / "loss_curves.png").exists()
    assert "loss curves" not in (tmp_path / "report.md").read_text()
