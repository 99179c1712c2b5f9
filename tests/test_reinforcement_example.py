"""examples/reinforcement: the prompts its generator writes, its grader's scores, and its config checked; the GRPO run itself
is measured by hand (docs/grpo.md), the loop by tests/test_grpo.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tunekit.config import load_config
from tunekit.eval.graders import PythonSandbox, check_grader, grade, make_sample

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "reinforcement"


def test_shipped_prompts_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (EXAMPLE / name).read_bytes(), name
    # the held-out chats repeat no recipe of the training or validation prompts
    def recipe(line: str) -> str:
        return next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")

    seen = {recipe(x) for name in ("train.jsonl", "valid.jsonl") for x in (EXAMPLE / name).read_text().splitlines()}
    test = [recipe(x) for x in (EXAMPLE / "test.jsonl").read_text().splitlines()]
    assert len(test) == 400 and not seen & set(test)
    first = json.loads((EXAMPLE / "train.jsonl").read_text().splitlines()[0])
    chat = json.loads((REPO / "examples/quickstart/train.jsonl").read_text().splitlines()[0])
    assert first["messages"] == chat["messages"][:-1] and first["answer"] == json.loads(chat["messages"][-1]["content"])


def test_the_grader_gives_partial_and_full_credit_on_prompts_and_on_chats():
    grader = yaml.safe_load((EXAMPLE / "grader.yaml").read_text())
    assert check_grader(grader, item_keys={"messages", "answer"}) == []
    prompt = json.loads((EXAMPLE / "valid.jsonl").read_text().splitlines()[0])
    chat = json.loads((REPO / "examples/quickstart/valid.jsonl").read_text().splitlines()[0])
    want = prompt["answer"]
    replies = {json.dumps(want): 1.0, json.dumps(want[:-1]): 0.5 * (len(want) - 1) / len(want),
               json.dumps(list(reversed(want))): 0.5 * sum(a == b for a, b in zip(want, want[::-1], strict=True)) / len(want),
               "not json": 0.0, '{"a": 1}': 0.0}
    with PythonSandbox(workers=1) as sandbox:
        for reply, expected in replies.items():
            for item in (prompt, chat):  # the answer as a field, or the chat's last message
                result = grade(grader, make_sample(reply), item, sandbox=sandbox)
                assert result.error_message is None and abs(result.reward - round(expected, 6)) < 1e-9, (reply, item)


def test_config_validates():
    cfg = load_config(EXAMPLE / "config.yaml", check_files=False)
    assert cfg.objective == "grpo" and cfg.grpo.group_size == 8 and cfg.method == "lora"
