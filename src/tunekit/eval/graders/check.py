"""check_grader: every problem of a grader object at once, each with its JSON path and a fix."""

from __future__ import annotations

import ast

from tunekit.errors import Problem, install_command
from tunekit.eval.graders.formula import FormulaError, parse_formula
from tunekit.eval.graders.similarity import METRICS, WORDNET_HINT, library_missing, wordnet_available
from tunekit.eval.graders.template import NAMESPACES, SAMPLE_KEYS, parse_path, template_paths

TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
REQUIRED = {
    "string_check": ("input", "reference", "operation"),
    "text_similarity": ("input", "reference", "evaluation_metric"),
    "python": ("source",),
    "score_model": ("model", "input"),
    "label_model": ("model", "input", "labels", "passing_labels"),
    "multi": ("graders", "calculate_output"),
}
OPTIONAL = {
    "string_check": (),
    "text_similarity": ("pass_threshold",),
    "python": ("image_tag", "pass_threshold"),
    "score_model": ("range", "sampling_params", "pass_threshold"),
    "label_model": (),
    "multi": ("invalid_grade",),
}
COMMON = ("type", "name", "id")  # "id": what OpenAI adds to eval testing_criteria
OPERATIONS = ("eq", "ne", "like", "ilike")
ROLES = ("user", "assistant", "system", "developer")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
SAMPLING_PARAMS = {"max_completions_tokens": "int", "max_completion_tokens": "int", "reasoning_effort": "enum",
                   "seed": "int", "temperature": "number", "top_p": "number"}
SOURCE_MAX_BYTES = 256 * 1024


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_grader(grader: dict, *, item_keys: set[str] | None = None, where: str = "grader",
                 allowed: tuple[str, ...] = TYPES) -> list[Problem]:
    """Every problem of a grader object (never raises). Problem.where is the JSON path of the field."""
    problems: list[Problem] = []
    _check(grader, where, allowed, item_keys, problems, nested=False)
    return problems


def _check(grader, where: str, allowed: tuple[str, ...], item_keys, problems: list[Problem], *, nested: bool) -> None:
    add = lambda path, message, hint=None: problems.append(Problem(path, message, hint))  # noqa: E731
    if not isinstance(grader, dict):
        add(where, f"a grader must be an object, got {type(grader).__name__}",
            'e.g. {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", '
            '"reference": "{{item.answer}}", "operation": "eq"}')
        return
    kind = grader.get("type")
    if kind is None:
        add(f"{where}.type", "missing: every grader has a type", f"one of: {', '.join(allowed)}")
        return
    if kind not in TYPES:
        add(f"{where}.type", f"unknown grader type {kind!r}", f"one of: {', '.join(allowed)}")
        return
    if kind == "multi" and nested:
        add(f"{where}.type", "a multi grader cannot contain another multi grader",
            "put all sub-graders in one multi's graders and combine them in its calculate_output")
        return
    if kind not in allowed:
        add(f"{where}.type", f"type {kind!r} is not allowed here", f"allowed here: {', '.join(allowed)}")
    if not isinstance(grader.get("name"), str):
        add(f"{where}.name", "missing: every grader has a name (a string)" if "name" not in grader
            else "must be a string", 'e.g. "name": "exact match"')
    for key in REQUIRED[kind]:
        if key not in grader:
            add(f"{where}.{key}", f"missing: a {kind} grader needs {key}",
                f"required fields of {kind}: {', '.join(REQUIRED[kind])}")
    known = set(COMMON) | set(REQUIRED[kind]) | set(OPTIONAL[kind])
    for key in grader:
        if key not in known:
            add(f"{where}.{key}", f"unknown field for a {kind} grader",
                f"the fields of {kind} are: {', '.join(sorted(known - {'id'}))}")
    if "pass_threshold" in grader and grader["pass_threshold"] is not None and not _is_number(grader["pass_threshold"]):
        add(f"{where}.pass_threshold", "must be a number", "e.g. 0.5")

    if kind in ("string_check", "text_similarity"):
        for key in ("input", "reference"):
            if key in grader:
                _check_template(grader[key], f"{where}.{key}", item_keys, add)
    if kind == "string_check" and "operation" in grader and grader["operation"] not in OPERATIONS:
        add(f"{where}.operation", f"unknown operation {grader['operation']!r}", f"one of: {', '.join(OPERATIONS)}")
    if kind == "text_similarity" and "evaluation_metric" in grader:
        _check_metric(grader["evaluation_metric"], f"{where}.evaluation_metric", add)
    if kind == "python" and "source" in grader:
        _check_source(grader["source"], f"{where}.source", add)
    if kind == "python" and "image_tag" in grader and not isinstance(grader["image_tag"], str):
        add(f"{where}.image_tag", "must be a string", 'e.g. "2025-05-08" (tunekit runs its own Python either way)')
    if kind in ("score_model", "label_model"):
        if "model" in grader and (not isinstance(grader["model"], str) or not grader["model"]):
            add(f"{where}.model", "must be a model name (a non-empty string)", "a model this server serves")
        if "input" in grader:
            _check_messages(grader["input"], f"{where}.input", item_keys, add)
    if kind == "score_model":
        if "range" in grader:
            rng = grader["range"]
            if not (isinstance(rng, list) and len(rng) == 2 and all(_is_number(v) for v in rng)):
                add(f"{where}.range", "must be a list of 2 numbers [min, max]", "e.g. [0, 1]")
            elif not rng[0] < rng[1]:
                add(f"{where}.range", f"min must be below max, got {rng}", "e.g. [0, 1] or [1, 10]")
        if "sampling_params" in grader and grader["sampling_params"] is not None:
            _check_sampling(grader["sampling_params"], f"{where}.sampling_params", add)
    if kind == "label_model":
        _check_labels(grader, where, add)
    if kind == "multi":
        _check_multi(grader, where, item_keys, problems, add)


def _check_template(value, path: str, item_keys, add) -> None:
    if not isinstance(value, str):
        add(path, "must be a string (a template)", 'e.g. "{{sample.output_text}}"')
        return
    for expr in template_paths(value):
        try:
            steps = parse_path(expr)
        except ValueError as exc:
            add(path, str(exc), "write {{item.<field>}} or {{sample.output_text}}; nested: {{item.a.b}}, {{x[0]}}")
            continue
        if steps[0] not in NAMESPACES:
            add(path, f"{{{{{expr}}}}} names the namespace {steps[0]!r}: only item and sample exist",
                "write {{item.<field>}} for the data row or {{sample.output_text}} for the model's output")
        elif len(steps) == 1:
            add(path, f"{{{{{expr}}}}} names a whole namespace", "name a field, e.g. {{item.answer}}")
        elif steps[0] == "sample" and steps[1] not in SAMPLE_KEYS:
            add(path, f"{{{{{expr}}}}}: the sample has no {steps[1]!r}", f"sample fields: {', '.join(SAMPLE_KEYS)}")
        elif steps[0] == "item" and item_keys is not None and str(steps[1]) not in item_keys:
            add(path, f"{{{{{expr}}}}}: the items have no field {steps[1]!r}",
                f"item fields: {', '.join(sorted(item_keys)) or '(none)'}")


def _check_metric(metric, path: str, add) -> None:
    if metric not in METRICS:
        add(path, f"unknown evaluation_metric {metric!r}", f"one of: {', '.join(METRICS)}")
        return
    if metric == "cosine":
        add(path, "cosine is not available: it needs an embedding model (OpenAI uses text-embedding-3-large) "
            "and tunekit serves none", "use fuzzy_match, bleu, gleu or rouge_1..rouge_5 / rouge_l")
        return
    missing = library_missing(metric)
    if missing:
        add(path, f"{metric} needs the {missing} package, which is not installed",
            f"install the graders extra: {install_command('graders')}")
        return
    if metric == "meteor" and not wordnet_available():
        add(path, f"meteor is not available: needs NLTK's WordNet corpus ({WORDNET_HINT})",
            "download it where this server runs, or use bleu, gleu or rouge_l")


def _check_source(source, path: str, add) -> None:
    if not isinstance(source, str):
        add(path, "must be a string of Python code", "def grade(sample, item) -> float: ...")
        return
    size = len(source.encode("utf-8"))
    if size >= SOURCE_MAX_BYTES:
        add(path, f"the source is {size} bytes: it must be under {SOURCE_MAX_BYTES} (256 kB)",
            "move data out of the source (pass it in the item instead)")
        return
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        add(path, f"the source does not parse: {exc.msg} (line {exc.lineno}, column {exc.offset})",
            "fix the Python syntax; the source must define grade(sample, item)")
        return
    grades = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "grade"]
    if not grades:
        add(path, "the source defines no top-level function grade", "def grade(sample, item) -> float: ...")
        return
    args = grades[-1].args
    positional = len(args.posonlyargs) + len(args.args)
    if positional != 2 or args.vararg or args.kwarg or args.kwonlyargs:
        add(path, f"grade must take exactly 2 arguments (sample, item), it takes "
            f"{positional}{' and more' if args.vararg or args.kwarg or args.kwonlyargs else ''}",
            "def grade(sample, item) -> float: ...")


def _check_messages(messages, path: str, item_keys, add) -> None:
    if not isinstance(messages, list) or not messages:
        add(path, "must be a non-empty list of messages",
            '[{"role": "user", "content": "Score this answer: {{sample.output_text}}"}]')
        return
    for i, message in enumerate(messages):
        mpath = f"{path}[{i}]"
        if not isinstance(message, dict):
            add(mpath, "a message must be an object with role and content", '{"role": "user", "content": "..."}')
            continue
        if message.get("role") not in ROLES:
            add(f"{mpath}.role", f"role must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                'e.g. "role": "user"')
        if "type" in message and message["type"] != "message":
            add(f"{mpath}.type", f"must be \"message\", got {message['type']!r}", "or leave type out")
        for key in message:
            if key not in ("role", "content", "type"):
                add(f"{mpath}.{key}", "unknown field of a message", "a message has role, content and type")
        if "content" not in message:
            add(f"{mpath}.content", "missing", '"content": "..." (a template string or content parts)')
            continue
        content = message["content"]
        parts = content if isinstance(content, list) else [content]
        for j, part in enumerate(parts):
            ppath = f"{mpath}.content" + (f"[{j}]" if isinstance(content, list) else "")
            if isinstance(part, str):
                _check_template(part, ppath, item_keys, add)
            elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text"):
                _check_template(part.get("text"), f"{ppath}.text", item_keys, add)
            elif isinstance(part, dict) and part.get("type") in ("input_image", "input_audio"):
                add(f"{ppath}.type", f"{part['type']} is not supported: tunekit's judges read text only",
                    "give the judge text (input_text)")
            else:
                add(ppath, "content must be a string or an input_text / output_text part",
                    '"content": "..." or {"type": "input_text", "text": "..."}')


def _check_sampling(params, path: str, add) -> None:
    if not isinstance(params, dict):
        add(path, "must be an object", '{"temperature": 0, "max_completions_tokens": 256}')
        return
    for key, value in params.items():
        kind = SAMPLING_PARAMS.get(key)
        if kind is None:
            add(f"{path}.{key}", "unknown sampling parameter", f"known: {', '.join(sorted(SAMPLING_PARAMS))}")
        elif value is None:
            continue
        elif kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            add(f"{path}.{key}", "must be an integer", None)
        elif kind == "int" and key.startswith("max_") and value < 1:
            add(f"{path}.{key}", "must be at least 1", None)
        elif kind == "number" and not _is_number(value):
            add(f"{path}.{key}", "must be a number", None)
        elif kind == "enum" and value not in REASONING_EFFORTS:
            add(f"{path}.{key}", f"unknown reasoning_effort {value!r}", f"one of: {', '.join(REASONING_EFFORTS)}")


def _check_labels(grader: dict, where: str, add) -> None:
    labels = grader.get("labels")
    ok_labels = isinstance(labels, list) and labels and all(isinstance(x, str) and x.strip() for x in labels)
    if "labels" in grader and not ok_labels:
        add(f"{where}.labels", "must be a non-empty list of non-empty strings", '["correct", "incorrect"]')
    elif ok_labels and len({x.strip().lower() for x in labels}) != len(labels):
        add(f"{where}.labels", "labels must differ (compared case-insensitively, trimmed)",
            "the judge's reply is matched to a label ignoring case")
    passing = grader.get("passing_labels")
    if "passing_labels" not in grader:
        return
    if not (isinstance(passing, list) and passing and all(isinstance(x, str) for x in passing)):
        add(f"{where}.passing_labels", "must be a non-empty list of strings", '["correct"]')
    elif ok_labels:
        extra = [x for x in passing if x not in labels]
        if extra:
            add(f"{where}.passing_labels", f"not in labels: {', '.join(map(repr, extra))}",
                "passing_labels must be a subset of labels")


def _check_multi(grader: dict, where: str, item_keys, problems: list[Problem], add) -> None:
    graders = grader.get("graders")
    subs = multi_graders(graders) if "graders" in grader else None
    if "graders" in grader and subs is None:
        add(f"{where}.graders", "must be an object {key: grader} (or one grader object)",
            '{"name": {"type": "string_check", ...}, "email": {...}}')
    for key, sub in (subs or {}).items():
        if not isinstance(key, str) or not key.isidentifier():
            add(f"{where}.graders.{key}", f"the key {key!r} cannot be named in calculate_output",
                "use letters, digits and _ (not starting with a digit)")
        _check(sub, f"{where}.graders.{key}", TYPES[:5], item_keys, problems, nested=True)
    if "invalid_grade" in grader and not _is_number(grader["invalid_grade"]):
        add(f"{where}.invalid_grade", "must be a number", "the score to give when grading fails, e.g. 0")
    if "calculate_output" in grader:
        formula = grader["calculate_output"]
        if not isinstance(formula, str):
            add(f"{where}.calculate_output", "must be a string formula", '"(name + email) / 2"')
            return
        try:
            parse_formula(formula, set(subs or {}) if subs is not None else None)
        except FormulaError as exc:
            add(f"{where}.calculate_output", str(exc),
                "numbers, the keys of graders, + - * / ^ ( ), and min max abs floor ceil exp sqrt log")


def leaf_graders(grader: dict) -> list[dict]:
    """The graders that score: a multi grader's sub-graders, or the grader itself."""
    if isinstance(grader, dict) and grader.get("type") == "multi":
        return [g for g in (multi_graders(grader.get("graders")) or {}).values() if isinstance(g, dict)]
    return [grader]


def multi_graders(graders) -> dict | None:
    """The {key: grader} map of a multi grader: the map as given, or one grader object as {its name: it}."""
    if not isinstance(graders, dict) or not graders:
        return None
    if "type" in graders and isinstance(graders.get("type"), str):
        return {str(graders.get("name", "grader")): graders}
    return graders
