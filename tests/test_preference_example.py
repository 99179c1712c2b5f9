"""examples/preference: the pairs its generator writes, and a shortened run of its pipeline (SFT, DPO from
the SFT run, both evaluations, the table); the shipped settings' numbers are in docs/preference.md."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from example_modules import load_example, read_jsonl

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "preference"


def test_shipped_pairs_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name


def test_each_pair_prefers_the_quickstart_answer_over_a_different_one():
    for split in ("train", "valid"):
        pairs = read_jsonl(EXAMPLE / f"{split}.jsonl")
        chats = read_jsonl(REPO / "examples" / "quickstart" / f"{split}.jsonl")
        assert len(pairs) == len(chats)
        for pair, chat in zip(pairs, chats, strict=True):
            assert pair["input"]["messages"] == chat["messages"][:-1]
            assert pair["preferred_output"][0]["content"] == chat["messages"][-1]["content"]
            assert json.loads(pair["non_preferred_output"][0]["content"]) != json.loads(chat["messages"][-1]["content"])


def test_every_corruption_kind_is_a_plausible_mistake():
    make_data = load_example("preference", "make_data")
    answer = ["flour", "sugar", "eggs"]
    forms = make_data.written_forms("Cake\n\nIngredients:\n- 2 cups all-purpose flour, sifted\n- 1 cup sugar\n"
                                    "- 3 large eggs")
    assert forms == ["all-purpose flour", "sugar", "eggs"]
    seen = {}
    rng = random.Random(0)
    while len(seen) < len(make_data.KINDS):
        kind, wrong = make_data.corrupt(answer, forms, rng)
        seen[kind] = wrong
    assert seen["drop_last"] == ["flour", "sugar"]
    assert seen["written"] == ["all-purpose flour", "sugar", "eggs"]
    assert sorted(seen["swap"]) == sorted(answer) and seen["swap"] != answer
    assert len(seen["repeat"]) == 4 and set(seen["repeat"]) == set(answer)


def test_short_pipeline_runs_and_the_table_prints(tmp_path):
    """SFT 4 steps, DPO 3 steps from it, the pair and task evaluations on a few examples, the table."""
    from tunekit.config import load_config
    from tunekit.eval.evaluate import evaluate
    from tunekit.eval.report import write_report
    from tunekit.train.loop import train

    sft = train(load_config(REPO / "examples" / "quickstart" / "config.yaml",
                            ["train.max_steps=4", f"output.dir={tmp_path / 'sft'}"])).run_dir
    dpo_cfg = load_config(EXAMPLE / "config.yaml", [f"model.base={sft}", "train.max_steps=3", "train.eval_every=3",
                                                    f"output.dir={tmp_path / 'dpo'}"])
    summary = train(dpo_cfg).summary
    rows = read_jsonl(tmp_path / "dpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and "reward_accuracy" in rows[0]
    assert summary["reference"] == "adapter-off"
    pairs = evaluate(tmp_path / "dpo", EXAMPLE / "valid.jsonl", baselines=["base"],
                     models=[REPO / "models" / "tiny-chat"], limit=6)
    task = evaluate(tmp_path / "dpo", REPO / "examples" / "quickstart" / "valid.jsonl", baselines=["base"], limit=3,
                    max_new_tokens=48)
    assert [c.name for c in pairs.candidates] == ["fine-tuned", "base", "tiny-chat"]
    write_report(pairs.to_dict(), tmp_path / "pairs")
    write_report(task.to_dict(), tmp_path / "task")
    out = subprocess.run([sys.executable, str(EXAMPLE / "table.py"), str(tmp_path / "pairs" / "results.json"),
                          str(tmp_path / "task" / "results.json")], check=True, capture_output=True, text=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("| model | preference accuracy (6 held-out pairs)")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base (models/tiny-chat)", "SFT", "SFT+DPO"]
