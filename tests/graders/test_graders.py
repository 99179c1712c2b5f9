"""The grader types against hand-computed scores, templating, check_grader's problems and the formula parser.

text_similarity is compared with the libraries' own numbers (rapidfuzz, nltk, rouge-score) and, on small
cases, with values worked out by hand in the comments.
"""

from __future__ import annotations

import builtins
import json
import math
import re

import pytest

from tunekit.eval.graders import (
    ERROR_DETAILS,
    ERROR_FLAGS,
    FormulaError,
    JudgeReply,
    PythonSandbox,
    check_grader,
    evaluate,
    grade,
    make_sample,
    pass_threshold,
    render,
)

ITEM = {"label": "Paris", "answer": {"value": 4, "unit": "m"}, "tags": ["a", "b"], "email": "j@x.org",
        "name": "John Smith"}


def sc(input_, reference, operation="eq", name="check"):
    return {"type": "string_check", "name": name, "input": input_, "reference": reference, "operation": operation}


def ts(metric, input_="{{sample.output_text}}", reference="{{item.ref}}", **extra):
    return {"type": "text_similarity", "name": "sim", "input": input_, "reference": reference,
            "evaluation_metric": metric, **extra}


def wheres(problems):
    return [p.where for p in problems]


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(workers=1, timeout_s=5) as sb:
        yield sb


# ---- the sample namespace and templates ----------------------------------------------------------------

def test_make_sample_text_json_and_tool_calls():
    s = make_sample('{"email": "j@x.org", "n": 3}')
    assert s["output_text"] == '{"email": "j@x.org", "n": 3}'
    assert s["output_json"] == {"email": "j@x.org", "n": 3}
    assert s["output_tools"] == []
    assert s["choices"] == [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": s["output_text"], "tool_calls": None}}]
    assert make_sample("not json")["output_json"] is None
    assert make_sample("not json", output_json={"a": 1})["output_json"] == {"a": 1}
    assert make_sample('{"a": 1}', json_from_text=False)["output_json"] is None
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    t = make_sample("", tool_calls=calls)
    assert t["output_tools"] == calls and t["choices"][0]["finish_reason"] == "tool_calls"
    assert t["choices"][0]["message"]["tool_calls"] == calls


def test_render_paths_spaces_indexes_and_json_values():
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    s = make_sample('{"email": "é@x.org", "list": [1, {"k": null}]}', tool_calls=calls)
    assert render("{{ item.label }}|{{item.label}}", ITEM, s) == "Paris|Paris"
    assert render("{{item.answer.value}} {{item.tags[1]}} {{item.tags}}", ITEM, s) == '4 b ["a","b"]'
    assert render("{{item.answer}}", ITEM, s) == '{"value":4,"unit":"m"}'  # compact JSON
    assert render("{{sample.output_json.email}}", ITEM, s) == "é@x.org"
    assert render("{{sample.output_json.list[1]}}", ITEM, s) == '{"k":null}'
    assert render("{{sample.output_tools[0].function.arguments}}", ITEM, s) == '{"x": 1}'  # a string: as is
    assert render("{{sample.output_tools.0.function.name}}", ITEM, s) == "f"
    assert render("{{sample.choices[0].message.role}}", ITEM, s) == "assistant"


def test_missing_variable_and_non_json_sample_score_zero_with_their_flags():
    r = grade(sc("{{sample.output_text}}", "{{item.nope}}"), make_sample("x"), ITEM)
    assert r.reward == 0.0 and r.errors["invalid_variable_error"] is True and r.passed is False
    assert "item.nope" in r.error_message
    r = grade(sc("{{sample.output_json.email}}", "{{item.email}}"), make_sample("plain text"), ITEM)
    assert r.reward == 0.0 and r.errors["sample_parse_error"] is True
    assert r.errors["invalid_variable_error"] is False
    r = grade(sc("{{item.tags[5]}}", "a"), make_sample("x"), ITEM)
    assert r.errors["invalid_variable_error"] is True
    assert set(r.errors) == set(ERROR_FLAGS) | set(ERROR_DETAILS) and len(r.errors) == 14


# ---- string_check -------------------------------------------------------------------------------------

@pytest.mark.parametrize("output, reference, operation, expected", [
    ("Paris", "Paris", "eq", 1.0),
    ("paris", "Paris", "eq", 0.0),              # case-sensitive
    ("paris", "Paris", "ne", 1.0),
    ("Paris", "Paris", "ne", 0.0),
    ("It is Paris.", "Paris", "like", 1.0),      # substring, not SQL wildcards
    ("It is PARIS.", "Paris", "like", 0.0),
    ("P%s", "P_s", "like", 0.0),
    ("It is PARIS.", "paris", "ilike", 1.0),
    ("Straße Ünïcode", "ÜNÏ", "ilike", 1.0),     # unicode case folding
    ("STRASSE", "straße", "ilike", 1.0),         # casefold: ß == ss
    ("", "", "eq", 1.0),                         # empty output
    ("", "Paris", "like", 0.0),
])
def test_string_check(output, reference, operation, expected):
    r = grade(sc("{{sample.output_text}}", reference, operation), make_sample(output), ITEM)
    assert r.reward == expected
    assert r.passed is (expected == 1.0)
    assert r.type == "string_check" and r.name == "check" and r.sub_rewards == {} and r.error_message is None


def test_string_check_on_json_and_tool_call_outputs():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    r = grade(sc("{{sample.output_tools[0].function.name}}", "get_weather"), make_sample("", tool_calls=calls), ITEM)
    assert r.reward == 1.0
    r = grade(sc("{{sample.output_tools[0].function.arguments}}", "{{item.label}}", "like"),
              make_sample("", tool_calls=calls), ITEM)
    assert r.reward == 1.0
    r = grade(sc("{{sample.output_json.city}}", "{{item.label}}"), make_sample('{"city": "Paris"}'), ITEM)
    assert r.reward == 1.0


# ---- text_similarity ----------------------------------------------------------------------------------

HYP, REF = "the cat sat on the mat", "the cat is on the mat"


def test_text_similarity_hand_computed():
    item = {"ref": REF}
    score = lambda metric: grade(ts(metric), make_sample(HYP), item).reward  # noqa: E731
    # 6 tokens each, 5 unigrams shared (the x2, cat, on, mat): P = R = F = 5/6
    assert score("rouge_1") == pytest.approx(5 / 6)
    # bigrams shared: "the cat", "on the", "the mat" of 5 each
    assert score("rouge_2") == pytest.approx(3 / 5)
    assert score("rouge_3") == pytest.approx(1 / 4)   # "on the mat"
    assert score("rouge_4") == 0.0
    assert score("rouge_l") == pytest.approx(5 / 6)   # LCS "the cat on the mat"
    # GLEU: 1..4-grams, 18 in each, 5 + 3 + 1 + 0 = 9 shared: min(9/18, 9/18)
    assert score("gleu") == pytest.approx(0.5)
    # BLEU with method1 smoothing: p = 5/6, 3/5, 1/4, and 0/3 -> 0.1/3; equal lengths so no brevity penalty
    assert score("bleu") == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # fuzzy: "jöhn smith" vs "john smith": one substitution = 2 edits (indel) over 20 characters
    assert grade(ts("fuzzy_match"), make_sample("Jöhn Smith"), {"ref": "John Smith"}).reward == pytest.approx(0.9)
    assert grade(ts("fuzzy_match"), make_sample("PARIS!"), {"ref": "paris"}).reward == 1.0


def test_text_similarity_equals_the_libraries_own_numbers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu
    from rapidfuzz import fuzz, utils
    from rouge_score import rouge_scorer

    pairs = [("The quick brown fox jumps over the lazy dog.", "A quick brown dog jumps over the lazy fox!"),
             ("Order #42 ships Monday, 3 items.", "Your order 42 will ship on Monday with 3 items."),
             ("yes", "Yes, it does.")]
    tok = NLTKWordTokenizer().tokenize
    for hyp, ref in pairs:
        item = {"ref": ref}
        def got(metric, hyp=hyp, item=item):
            return grade(ts(metric), make_sample(hyp), item).reward

        assert got("fuzzy_match") == fuzz.WRatio(hyp, ref, processor=utils.default_process) / 100
        assert got("bleu") == sentence_bleu([tok(ref)], tok(hyp), smoothing_function=SmoothingFunction().method1)
        assert got("gleu") == sentence_gleu([tok(ref)], tok(hyp))
        for ours, theirs in [("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_5", "rouge5"), ("rouge_l", "rougeL")]:
            # on ASCII text our tokens are rouge-score's default tokens
            expected = rouge_scorer.RougeScorer([theirs]).score(ref, hyp)[theirs].fmeasure
            assert got(ours) == pytest.approx(expected, abs=1e-12)


def test_text_similarity_unicode_empty_and_threshold():
    # rouge keeps non-ASCII letters: {café, crème} vs {café, au, lait}: P = 1/2, R = 1/3, F = 0.4
    r = grade(ts("rouge_1"), make_sample("Café crème"), {"ref": "café au lait"})
    assert r.reward == pytest.approx(0.4)
    assert grade(ts("rouge_1"), make_sample("東京 大阪"), {"ref": "東京"}).reward == pytest.approx(2 / 3)
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_l"):
        assert grade(ts(metric), make_sample(""), {"ref": "something"}).reward == 0.0, metric
        assert grade(ts(metric), make_sample("something"), {"ref": ""}).reward == 0.0, metric
    r = grade(ts("rouge_1", pass_threshold=0.8), make_sample(HYP), {"ref": REF})
    assert r.passed is True and r.scores == {"rouge_1": pytest.approx(5 / 6)}
    assert grade(ts("rouge_1", pass_threshold=0.9), make_sample(HYP), {"ref": REF}).passed is False
    assert grade(ts("rouge_1"), make_sample(HYP), {"ref": REF}).passed is None  # no threshold, none given


def test_meteor_and_cosine_are_refused_clearly(monkeypatch):
    from tunekit.eval.graders import check

    monkeypatch.setattr(check, "wordnet_available", lambda: False)
    problems = check_grader(ts("meteor"))
    assert wheres(problems) == ["grader.evaluation_metric"]
    assert "meteor is not available: needs NLTK's WordNet corpus" in problems[0].message
    assert "nltk.downloader wordnet" in problems[0].message
    problems = check_grader(ts("cosine"))
    assert wheres(problems) == ["grader.evaluation_metric"] and "embedding model" in problems[0].message
    with pytest.raises(ValueError, match="cosine is not available"):
        grade(ts("cosine"), make_sample("a"), {"ref": "a"})


# ---- python (the sandbox's attacks are in test_sandbox.py) ----------------------------------------------

def test_python_grader_reads_sample_and_item(sandbox):
    source = ("import json\n"
              "def grade(sample, item):\n"
              "    args = json.loads(sample['output_tools'][0]['function']['arguments'])\n"
              "    return 1.0 if args['city'] == item['label'] else 0.25\n")
    g = {"type": "python", "name": "py", "source": source}
    calls = [{"id": "c", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]
    r = grade(g, make_sample("", tool_calls=calls), ITEM, sandbox=sandbox)
    assert (r.reward, r.passed, r.error_message) == (1.0, True, None)
    r = grade(g, make_sample("", tool_calls=[{**calls[0], "function": {"name": "w", "arguments": '{"city": "Rome"}'}}]),
              ITEM, sandbox=sandbox)
    assert (r.reward, r.passed) == (0.25, False)  # default threshold 0.5
    uni = {"type": "python", "name": "u", "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"}
    assert grade(uni, make_sample("日本語の答え"), {}, sandbox=sandbox).reward == pytest.approx(0.6)
    # without a sandbox, grade() starts a one-worker sandbox for the call
    assert grade(uni, make_sample("abc"), {}).reward == pytest.approx(0.3)


def test_python_grader_failures_score_zero_with_their_flags(sandbox):
    cases = {
        "def grade(sample, item):\n    raise KeyError('boom')\n": "KeyError",
        "def grade(sample, item):\n    return 'high'\n": "not a float",
        "def grade(sample, item):\n    return None\n": "not a float",
        "def grade(sample, item):\n    return float('nan')\n": "nan",
    }
    for source, needle in cases.items():
        r = grade({"type": "python", "name": "p", "source": source}, make_sample("x"), {}, sandbox=sandbox)
        assert r.reward == 0.0 and r.passed is False
        assert r.errors["python_grader_runtime_error"] is True
        assert needle in r.errors["python_grader_runtime_error_details"] and needle in r.error_message


# ---- score_model and label_model ------------------------------------------------------------------------

class FakeJudge:
    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = []

    def __call__(self, model, messages, sampling_params):
        self.calls.append((model, messages, sampling_params))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return JudgeReply(reply, prompt_tokens=10, completion_tokens=3)


def score_grader(**extra):
    return {"type": "score_model", "name": "judge", "model": "judge-model",
            "input": [{"role": "developer", "content": "Rate how well the answer matches {{item.label}}."},
                      {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}"}]}],
            **extra}


def test_score_model_renders_input_parses_and_clamps():
    judge = FakeJudge('{"result": 0.8, "steps": [{"description": "city", "conclusion": "right"}]}')
    r = grade(score_grader(sampling_params={"temperature": 0, "seed": None}), make_sample("Paris"), ITEM, judge=judge)
    assert (r.reward, r.passed, r.sampled_model_name) == (0.8, True, "judge-model")
    assert r.scores["steps"] == [{"description": "city", "conclusion": "right"}]
    model, messages, params = judge.calls[0]
    assert model == "judge-model" and params == {"temperature": 0}
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Rate how well the answer matches Paris.")
    assert '"result"' in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": "Answer: Paris"}
    assert r.token_usage == {"judge-model": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                                             "cached_tokens": 0}}
    # clamped to the range; a bare number, a fenced JSON, a numeric string all parse
    assert grade(score_grader(range=[1, 5]), make_sample("x"), ITEM, judge=FakeJudge('{"result": 9}')).reward == 5.0
    assert grade(score_grader(range=[1, 5]), make_sample("x"), ITEM, judge=FakeJudge("0")).reward == 1.0
    assert grade(score_grader(), make_sample("x"), ITEM, judge=FakeJudge(" 0.25\n")).reward == 0.25
    assert grade(score_grader(), make_sample("x"), ITEM,
                 judge=FakeJudge('Sure:\n```json\n{"result": "0.5", "steps": []}\n```')).reward == 0.5
    assert pass_threshold(score_grader(range=[1, 11])) == 6.0
    assert grade(score_grader(range=[1, 11]), make_sample("x"), ITEM, judge=FakeJudge("6")).passed is True


def test_score_model_failures():
    r = grade(score_grader(), make_sample("x"), ITEM, judge=FakeJudge("It is quite good."))
    assert r.reward == 0.0 and r.errors["model_grader_parse_error"] is True and r.passed is False
    r = grade(score_grader(), make_sample("x"), ITEM, judge=FakeJudge('{"result": true}'))
    assert r.errors["model_grader_parse_error"] is True
    r = grade(score_grader(), make_sample("x"), ITEM, judge=FakeJudge(RuntimeError("model not loaded")))
    assert r.reward == 0.0 and r.errors["model_grader_server_error"] is True
    assert "model not loaded" in r.errors["model_grader_server_error_details"]
    r = grade(score_grader(), make_sample("x"), ITEM)  # no judge at all
    assert r.errors["model_grader_server_error"] is True and "judge" in r.error_message
    r = grade(score_grader(), make_sample("x"), {}, judge=FakeJudge("1"))  # {{item.label}} missing
    assert r.errors["invalid_variable_error"] is True and r.reward == 0.0


def label_grader():
    return {"type": "label_model", "name": "sentiment", "model": "judge-model",
            "input": [{"role": "user", "content": "Is this answer right? {{sample.output_text}}"}],
            "labels": ["correct", "incorrect"], "passing_labels": ["correct"]}


@pytest.mark.parametrize("reply, label, reward", [
    ("correct", "correct", 1.0),
    ("  Incorrect.\n", "incorrect", 0.0),
    ('{"label": "CORRECT"}', "correct", 1.0),
    ("The answer is correct.", "correct", 1.0),   # the one label that occurs as a word
    ("The answer is incorrect.", "incorrect", 0.0),
])
def test_label_model(reply, label, reward):
    judge = FakeJudge(reply)
    r = grade(label_grader(), make_sample("42"), ITEM, judge=judge)
    assert (r.scores["label"], r.reward, r.passed) == (label, reward, reward == 1.0)
    assert '"correct", "incorrect"' in judge.calls[0][1][0]["content"]


def test_label_model_unmatched_reply_is_a_parse_error():
    r = grade(label_grader(), make_sample("42"), ITEM, judge=FakeJudge("maybe"))
    assert (r.reward, r.passed, r.errors["model_grader_parse_error"]) == (0.0, False, True)
    r = grade(label_grader(), make_sample("42"), ITEM, judge=FakeJudge("correct or incorrect"))
    assert r.errors["model_grader_parse_error"] is True


# ---- multi and its formula -------------------------------------------------------------------------------

MULTI = {"type": "multi", "name": "json fields",
         "graders": {"name": {"type": "text_similarity", "name": "name_grader", "input": "{{sample.output_json.name}}",
                              "reference": "{{item.name}}", "evaluation_metric": "fuzzy_match"},
                     "email": {"type": "string_check", "name": "email_grader", "input": "{{sample.output_json.email}}",
                               "reference": "{{item.email}}", "operation": "eq"}},
         "calculate_output": "(name + email) / 2"}


def test_multi_the_reference_example():
    r = grade(MULTI, make_sample('{"name": "Jöhn Smith", "email": "j@x.org"}'), ITEM)
    assert r.sub_rewards == {"name": pytest.approx(0.9), "email": 1.0}
    assert r.reward == pytest.approx(0.95) and r.passed is None and r.type == "multi"
    assert r.scores["email"] == {"reward": 1.0}


def test_multi_single_grader_form_and_failures():
    single = {"type": "multi", "name": "m", "graders": {**MULTI["graders"]["email"], "name": "email"},
              "calculate_output": "email * 3"}
    assert check_grader(single) == []
    assert grade(single, make_sample('{"email": "j@x.org"}'), ITEM).reward == 3.0
    bad = {**MULTI, "calculate_output": "name / (email - 1)"}
    r = grade(bad, make_sample('{"name": "John Smith", "email": "j@x.org"}'), ITEM)
    assert r.reward == 0.0 and r.errors["formula_parse_error"] is True and "division by zero" in r.error_message
    assert r.sub_rewards == {"name": 1.0, "email": 1.0}
    r = grade(MULTI, make_sample('{"name": "John Smith"}'), ITEM)  # no email in the output
    assert r.reward == 0.0 and r.errors["invalid_variable_error"] is True and r.sub_rewards["email"] == 0.0
    assert r.error_message.startswith("email:")
    r = grade({**MULTI, "invalid_grade": -1}, make_sample("not json"), ITEM)
    assert r.reward == -1.0 and r.errors["sample_parse_error"] is True


@pytest.mark.parametrize("formula, expected", [
    ("2 + 3 * 4", 14.0),
    ("(2 + 3) * 4", 20.0),
    ("10 - 4 - 3", 3.0),          # left to right
    ("12 / 3 / 2", 2.0),
    ("2 ^ 3 ^ 2", 512.0),         # right to left
    ("-2 ^ 2", -4.0),             # ^ binds tighter than unary minus
    ("2 ^ -1", 0.5),
    ("a * 0.5 + b * .25", 0.5 * 0.5 + 1.0 * 0.25),
    ("min(a, b, 0.1) + max(a, b)", 1.1),
    ("sqrt(16) + log(exp(2))", 6.0),
    ("floor(2.7) + ceil(0.2) + abs(-1.5)", 4.5),
    ("1e-1 * 10", 1.0),
    ("--a", 0.5),
])
def test_formula_values(formula, expected):
    assert evaluate(formula, {"a": 0.5, "b": 1.0}) == pytest.approx(expected)


@pytest.mark.parametrize("formula, message", [
    ("a +", "expected a number"),
    ("(a + b", "expected ')'"),
    ("a b", "unexpected 'b'"),
    ("c + 1", "unknown name 'c'"),
    ("pow(a, 2)", "unknown function 'pow'"),
    ("__import__(a)", "unknown function '__import__'"),
    ("__import__('os')", "unexpected character \"'\""),
    ("a.real", "unexpected character '.'"),
    ("a ** 2", "expected a number"),
    ("sqrt(a, b)", "takes 1 argument"),
    ("1 / 0", "division by zero"),
    ("log(0)", "cannot evaluate"),
    ("sqrt(-1)", "cannot evaluate"),
    ("(-8) ^ 0.5", "cannot evaluate"),
    ("exp(1000)", "cannot evaluate"),
    ("", "empty"),
])
def test_formula_errors(formula, message):
    with pytest.raises(FormulaError, match=re.escape(message)):
        evaluate(formula, {"a": 0.5, "b": 1.0})


def test_formula_never_calls_python_eval(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec/compile called")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, refuse)
    assert evaluate("max(a, 2) ^ 2 / 4", {"a": 1.0}) == 1.0


# ---- check_grader ----------------------------------------------------------------------------------------

def test_check_grader_valid_graders_have_no_problems():
    assert check_grader(sc("{{sample.output_text}}", "{{item.label}}"), item_keys={"label"}) == []
    assert check_grader(ts("rouge_l", pass_threshold=0.5)) == []
    assert check_grader({"type": "python", "name": "p", "image_tag": "2025-05-08", "pass_threshold": 0.7,
                         "source": "def grade(sample, item, /):\n    return 1.0\n"}) == []
    assert check_grader(score_grader(range=[0, 10], sampling_params={"max_completions_tokens": 64,
                                                                     "reasoning_effort": None})) == []
    assert check_grader(label_grader()) == []
    assert check_grader(MULTI, item_keys={"name", "email"}) == []


def test_check_grader_reports_every_problem_with_its_path():
    problems = check_grader({"type": "string_check", "name": 3, "input": "{{ foo.x }}", "operation": "equals",
                             "extra": 1})
    assert sorted(wheres(problems)) == ["grader.extra", "grader.input", "grader.name", "grader.operation",
                                        "grader.reference"]
    messages = {p.where: p.message for p in problems}
    assert "only item and sample" in messages["grader.input"]
    assert "missing" in messages["grader.reference"]
    assert all(p.hint for p in problems)
    assert wheres(check_grader({"type": "regex", "name": "r"})) == ["grader.type"]
    assert wheres(check_grader("string_check")) == ["grader"]
    assert wheres(check_grader(sc("{{item.missing}}", "{{item.label}}"), item_keys={"label"})) == ["grader.input"]
    assert wheres(check_grader(sc("{{sample.output}}", "x"))) == ["grader.input"]
    assert wheres(check_grader(sc("{{item.a b}}", "x"))) == ["grader.input"]
    assert wheres(check_grader(ts("levenshtein"))) == ["grader.evaluation_metric"]


@pytest.mark.parametrize("source, message", [
    ("def grade(sample, item:\n    return 1", "does not parse"),
    ("def score(sample, item):\n    return 1.0\n", "no top-level function grade"),
    ("def grade(sample):\n    return 1.0\n", "exactly 2 arguments"),
    ("def grade(sample, item, extra):\n    return 1.0\n", "exactly 2 arguments"),
    ("def grade(sample, item, *rest):\n    return 1.0\n", "exactly 2 arguments"),
    ("x = '" + "a" * (256 * 1024) + "'\ndef grade(sample, item):\n    return 1.0\n", "under 262144"),
])
def test_check_grader_python_source(source, message):
    problems = check_grader({"type": "python", "name": "p", "source": source})
    assert wheres(problems) == ["grader.source"] and message in problems[0].message


def test_check_grader_model_graders_and_multi():
    g = score_grader(range=[1, 0], sampling_params={"temperature": "hot", "top_k": 3})
    g["input"].append({"role": "tool", "content": [{"type": "input_image", "image_url": "x"}]})
    assert sorted(wheres(check_grader(g))) == ["grader.input[2].content[0].type", "grader.input[2].role",
                                               "grader.range", "grader.sampling_params.temperature",
                                               "grader.sampling_params.top_k"]
    assert wheres(check_grader(score_grader(range=[0]))) == ["grader.range"]
    lab = {**label_grader(), "passing_labels": ["correct", "great"]}
    problems = check_grader(lab)
    assert wheres(problems) == ["grader.passing_labels"] and "'great'" in problems[0].message
    nested = {**MULTI, "graders": {**MULTI["graders"], "inner": MULTI,
                                   "bad": {"type": "string_check", "name": "b", "input": "x", "reference": "y",
                                           "operation": "like", "pass_threshold": "high"}},
              "calculate_output": "(name + email + missing) / 3"}
    problems = check_grader(nested)
    assert wheres(problems) == ["grader.graders.inner.type", "grader.graders.bad.pass_threshold",
                                "grader.graders.bad.pass_threshold", "grader.calculate_output"]
    assert "another multi" in problems[0].message
    assert "unknown name 'missing'" in problems[-1].message
    assert wheres(check_grader({**MULTI, "graders": {"1st": MULTI["graders"]["email"]}, "calculate_output": "1"})) \
        == ["grader.graders.1st"]
    # where each type may be used: RFT top level excludes label_model; eval criteria exclude multi
    rft = ("string_check", "text_similarity", "python", "score_model", "multi")
    assert wheres(check_grader(label_grader(), allowed=rft, where="method.reinforcement.grader")) == \
        ["method.reinforcement.grader.type"]
    assert check_grader(label_grader(), allowed=("label_model",), where="testing_criteria[0]") == []


def test_grade_refuses_an_invalid_grader():
    with pytest.raises(ValueError, match="grader.operation"):
        grade(sc("a", "b", "equals"), make_sample("a"), {})


def test_pass_thresholds():
    assert pass_threshold(sc("a", "b")) == 1.0
    assert pass_threshold(ts("bleu")) is None and pass_threshold(ts("bleu", pass_threshold=0.3)) == 0.3
    assert pass_threshold({"type": "python", "name": "p", "source": ""}) == 0.5
    assert pass_threshold(score_grader()) == 0.5 and pass_threshold(score_grader(pass_threshold=0.9)) == 0.9
    assert pass_threshold(label_grader()) == 1.0 and pass_threshold(MULTI) is None


def test_result_is_json_serialisable_for_the_run_endpoint():
    r = grade(MULTI, make_sample('{"name": "John Smith", "email": "j@x.org"}'), ITEM)
    json.dumps(r.__dict__)
    assert math.isfinite(r.execution_time) and r.execution_time >= 0
