"""Graders in `tunekit eval`: OpenAI grader files (JSON or YAML) scoring every candidate's replies.

Each held-out example is the grader's `item` (the JSON record as the file holds it: `{{item.messages[-1].content}}`
is the reference reply); each generated reply is the `sample` (`output_text`, `output_json` when the reply
parses as JSON, `output_tools` from the tool calls written in it). A grader adds two per-example scores:
`grader.NAME` (its reward) and `grader.NAME.pass` (1 or 0, where the type has a pass rule). A grade that fails
(a missing variable, a python grader error) scores 0 and is counted in `grader.NAME.errors`.

A judge (score_model / label_model) names its model by a candidate's name ("fine-tuned", "base") or a local
model dir or run; it answers greedily with the model's chat template.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tunekit.errors import Problem, TunekitError
from tunekit.eval.graders import JudgeReply, PythonSandbox, check_grader, grade, leaf_graders, make_sample
from tunekit.eval.toolcalls import split_reply

EVAL_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")


def load_grader_files(paths: list[str | Path], item_keys: set[str] | None) -> tuple[list[dict], list[Problem]]:
    """The graders of each file (one grader object, or a list of them), checked; every problem at once.
    Names must be unique across files (they name the report's columns)."""
    import yaml

    graders, problems, names = [], [], set()
    for path in map(Path, paths):
        where = f"--grader {path}"
        if not path.is_file():
            problems.append(Problem(where, "file not found", "give a JSON or YAML file holding an OpenAI grader"))
            continue
        try:
            text = path.read_text(encoding="utf-8")
            value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            problems.append(Problem(where, f"does not parse: {' '.join(str(exc).split())[:200]}",
                                    "write the grader as JSON (.json) or YAML (.yaml)"))
            continue
        for i, grader in enumerate(value if isinstance(value, list) else [value]):
            at = f"{path}" + (f"[{i}]" if isinstance(value, list) else "")
            found = check_grader(grader, item_keys=item_keys, where=at, allowed=EVAL_TYPES)
            if found:
                problems += found
                continue
            if grader["name"] in names:
                problems.append(Problem(f"{at}.name", f"a second grader named {grader['name']!r}",
                                        "give each grader its own name"))
                continue
            names.add(grader["name"])
            graders.append(grader)
    return graders, problems


def judge_models(graders: list[dict]) -> set[str]:
    """The judge model names the graders use (score_model / label_model, also inside multi)."""
    return {g["model"] for grader in graders for g in leaf_graders(grader)
            if g.get("type") in ("score_model", "label_model")}


class LocalJudge:
    """A judge answering with local models: `paths` maps a model name to its dir (loaded once, on first use)."""

    def __init__(self, paths: dict[str, str], *, device: str = "auto"):
        self.paths, self.device, self.loaded = paths, device, {}

    def __call__(self, model: str, messages: list[dict], sampling_params: dict) -> JudgeReply:
        from tunekit.data.render import end_of_turn_ids, render_prompt
        from tunekit.eval.evaluate import _pad_id
        from tunekit.generate.engine import generate
        from tunekit.model import load_for_inference, resolve_device

        if model not in self.paths:
            raise ValueError(f"no judge model {model!r} (known: {', '.join(sorted(self.paths))})")
        if model not in self.loaded:
            self.loaded[model] = load_for_inference(self.paths[model], device=resolve_device(self.device))
        net, tokenizer = self.loaded[model]
        prompt = list(render_prompt({"messages": messages}, tokenizer))
        limit = sampling_params.get("max_completions_tokens") or sampling_params.get("max_completion_tokens") or 64
        (gen,) = generate(net, [prompt], stop_ids=list(end_of_turn_ids(tokenizer)), pad_id=_pad_id(tokenizer),
                          max_new_tokens=int(limit), batch_size=1)
        text = tokenizer.decode(gen.ids, skip_special_tokens=True).strip()
        return JudgeReply(text, prompt_tokens=len(prompt), completion_tokens=len(gen.ids))


def sample_of(prediction: str) -> dict:
    """A generated reply as the grader's `sample`: its text, and the tool calls written in it."""
    _, calls = split_reply(prediction)
    tools = [{"id": f"call_{i}", "type": "function",
              "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                           else json.dumps(c.arguments, ensure_ascii=False)}} for i, c in enumerate(calls)]
    return make_sample(prediction, tool_calls=tools)


def grade_replies(graders: list[dict], items: list[dict], predictions: list[str], *, judge, sandbox: PythonSandbox,
                  where: list[str], log: Callable[[str], None]) -> tuple[list[dict[str, float]], dict[str, int]]:
    """Per example: {grader.NAME: reward, grader.NAME.pass: 1/0}; and per grader the number of failed grades
    (the first few logged with their example's place and reason)."""
    scores: list[dict[str, float]] = [{} for _ in items]
    failed: dict[str, int] = {}
    for grader in graders:
        name = grader["name"]
        failed[name] = 0
        for k, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
            try:
                result = grade(grader, sample_of(prediction), item, judge=judge, sandbox=sandbox)
            except ValueError as exc:  # a grader check_grader accepted but grade refused: a bug to report
                raise TunekitError(Problem(f"grader {name}", str(exc), "check the grader file")) from None
            scores[k][f"grader.{name}"] = result.reward
            if result.passed is not None:
                scores[k][f"grader.{name}.pass"] = float(result.passed)
            if result.error_message:
                failed[name] += 1
                if failed[name] <= 3:
                    log(f"grader {name}: {where[k]}: {result.error_message} (scored 0)")
    return scores, failed
