"""`POST /v1/fine_tuning/alpha/graders/run` and `/validate`, driven by the openai SDK with strict response
validation against a live server (the tiny Llama of conftest served as `tiny`, also the judge of model graders).

The tiny model's judgement is noise, so the score_model test holds the server's judge to the same judge run
over HTTP: `grade` with a judge that calls /v1/chat/completions must give the same reward, flags and token
usage as the server's in-process judge.
"""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")

from live_server import serving  # noqa: E402

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.label}}",
         "operation": "eq"}
NO_ERRORS = {"formula_parse_error": False, "sample_parse_error": False, "truncated_observation_error": False,
             "unresponsive_reward_error": False, "invalid_variable_error": False, "other_error": False,
             "python_grader_server_error": False, "python_grader_server_error_type": None,
             "python_grader_runtime_error": False, "python_grader_runtime_error_details": None,
             "model_grader_server_error": False, "model_grader_refusal_error": False,
             "model_grader_parse_error": False, "model_grader_server_error_details": None}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="anything", max_retries=0, timeout=120,
                         _strict_response_validation=True)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], threads=1) as (url, app):  # no data dir: graders need none
        yield url, app


def errors_of(result) -> dict:
    return result.metadata.errors.model_dump(by_alias=True)


def test_string_check_run_and_validate(server):
    client = sdk(server[0])
    graders = client.fine_tuning.alpha.graders
    hit = graders.run(grader=EXACT, model_sample="Hardware", item={"label": "Hardware"})
    assert (hit.reward, hit.sub_rewards, hit.api_model_grader_token_usage_per_model) == (1.0, {}, {})
    assert (hit.metadata.name, hit.metadata.type, hit.metadata.token_usage) == ("exact", "string_check", None)
    assert errors_of(hit) == NO_ERRORS and hit.metadata.execution_time >= 0
    assert graders.run(grader=EXACT, model_sample="hardware", item={"label": "Hardware"}).reward == 0.0
    like = {**EXACT, "operation": "ilike"}
    assert graders.run(grader=like, model_sample="It is HARDWARE.", item={"label": "hardware"}).reward == 1.0
    # a template naming a missing item field: a 200 with the flag set and reward 0, not a 400
    missing = graders.run(grader=EXACT, model_sample="x", item={})
    assert missing.reward == 0.0 and errors_of(missing)["invalid_variable_error"] is True
    assert graders.validate(grader=EXACT).grader.model_dump(exclude_none=True) == EXACT


def test_text_similarity_and_json_samples(server):
    pytest.importorskip("rapidfuzz", reason="fuzzy_match needs the graders extra")
    graders = sdk(server[0]).fine_tuning.alpha.graders
    grader = {"type": "text_similarity", "name": "sim", "input": "{{sample.output_text}}",
              "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
    assert graders.run(grader=grader, model_sample="the cat sat", item={"answer": "the cat sat"}).reward == 1.0
    near = graders.run(grader=grader, model_sample="the cat sat down", item={"answer": "the cat sat"}).reward
    assert 0.5 < near < 1.0
    # model_sample that parses as JSON fills sample.output_json
    field = {**EXACT, "input": "{{sample.output_json.label}}"}
    assert graders.run(grader=field, model_sample='{"label": "A"}', item={"label": "A"}).reward == 1.0
    not_json = graders.run(grader=field, model_sample="A", item={"label": "A"})
    assert not_json.reward == 0.0 and errors_of(not_json)["sample_parse_error"] is True


def test_python_grader_runs_in_the_sandbox(server):
    graders = sdk(server[0]).fine_tuning.alpha.graders
    source = ("def grade(sample, item):\n"
              "    return len(sample['output_text']) / item['n']\n")
    result = graders.run(grader={"type": "python", "name": "len", "source": source}, model_sample="abc",
                         item={"n": 4})
    assert result.reward == 0.75 and errors_of(result) == NO_ERRORS
    crash = graders.run(grader={"type": "python", "name": "bad", "source": "def grade(sample, item):\n    return 1 / 0\n"},
                        model_sample="abc")
    errors = errors_of(crash)
    assert crash.reward == 0.0 and errors["python_grader_runtime_error"] is True
    assert "ZeroDivisionError" in errors["python_grader_runtime_error_details"]


def test_multi_grader_with_a_formula(server):
    url = server[0]
    multi = {"type": "multi", "name": "fields", "calculate_output": "(name + 3 * email) / 4",
             "graders": {"name": {**EXACT, "name": "name", "input": "{{sample.output_json.name}}",
                                  "reference": "{{item.name}}"},
                         "email": {**EXACT, "name": "email", "input": "{{sample.output_json.email}}",
                                   "reference": "{{item.email}}"}}}
    result = sdk(url).fine_tuning.alpha.graders.run(grader=multi, model_sample='{"name": "Ann", "email": "a@b"}',
                                                    item={"name": "Bob", "email": "a@b"})
    assert result.reward == 0.75 and result.sub_rewards == {"name": 0.0, "email": 1.0}
    assert (result.metadata.type, errors_of(result)["formula_parse_error"]) == ("multi", False)
    # validate echoes the map form faithfully; the SDK types `graders` as one grader, so strict mode cannot
    # read it (OpenAI's own response has the same mismatch: reference §3.7): read the raw JSON
    echoed = sdk(url).fine_tuning.alpha.graders.with_raw_response.validate(grader=multi)
    assert echoed.http_response.json() == {"grader": multi}
    # a formula that divides by zero at grading time: a 200 with the formula flag
    zero = {**multi, "calculate_output": "name / email"}
    failed = sdk(url).fine_tuning.alpha.graders.run(grader=zero, model_sample='{"name": "Ann", "email": "x"}',
                                                    item={"name": "Ann", "email": "a@b"})
    assert failed.reward == 0.0 and errors_of(failed)["formula_parse_error"] is True


def test_score_model_judged_by_a_served_model(server):
    from tunekit.eval.graders import JudgeReply, grade, make_sample

    url = server[0]
    client = sdk(url)
    judge = {"type": "score_model", "name": "judge", "model": "tiny", "range": [1, 10],
             "sampling_params": {"max_completions_tokens": 12, "temperature": 0},
             "input": [{"role": "system", "content": "Score how well the answer names the fruit."},
                       {"role": "user", "content": "Fruit: {{item.fruit}}\nAnswer: {{sample.output_text}}"}]}
    result = client.fine_tuning.alpha.graders.run(grader=judge, model_sample="an apple", item={"fruit": "apple"})
    usage = result.api_model_grader_token_usage_per_model["tiny"]
    assert result.metadata.sampled_model_name == "tiny" and usage["prompt_tokens"] > 20
    assert 0 < usage["completion_tokens"] <= 12 and usage["total_tokens"] == result.metadata.token_usage
    parse_error = errors_of(result)["model_grader_parse_error"]
    assert (result.reward == 0.0) if parse_error else (1 <= result.reward <= 10)  # clamped to the range

    def over_http(model, messages, params):  # the same judge, through the chat completions route
        reply = client.chat.completions.create(model=model, messages=messages, temperature=params["temperature"],
                                               max_completion_tokens=params["max_completions_tokens"])
        return JudgeReply(reply.choices[0].message.content, reply.usage.prompt_tokens, reply.usage.completion_tokens)

    expected = grade(judge, make_sample("an apple"), {"fruit": "apple"}, judge=over_http)
    assert (result.reward, parse_error) == (expected.reward, expected.errors["model_grader_parse_error"])
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens")} == {
        k: expected.token_usage["tiny"][k] for k in ("prompt_tokens", "completion_tokens")}
    assert result.metadata.scores == expected.scores


@pytest.mark.parametrize("grader, param, words", [
    ({**EXACT, "operation": "equals", "reference": 3}, "grader.reference", ["grader.operation", "equals"]),
    ({"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a +"},
     "grader.calculate_output", ["calculate_output"]),
    ({"type": "multi", "name": "m", "graders": {"a": EXACT}, "calculate_output": "a + b"},
     "grader.calculate_output", ["b"]),
    ({"type": "score_model", "name": "j", "model": "no-such-model", "input": [{"role": "user", "content": "hi"}]},
     "grader.model", ["no-such-model", "tiny"]),
    ({"type": "multi", "name": "m", "calculate_output": "j",
      "graders": {"j": {"type": "score_model", "name": "j", "model": "gpt-4o", "input": [
          {"role": "user", "content": "hi"}]}}}, "grader.graders.j.model", ["gpt-4o"]),
    ({"type": "label_model", "name": "l", "model": "tiny", "input": [{"role": "user", "content": "hi"}],
      "labels": ["a", "b"], "passing_labels": ["a"]}, "grader.type", ["label_model"]),
    ({"type": "python", "name": "p", "source": "def grade(sample):\n    return 1\n"}, "grader.source", ["grade"]),
])
def test_a_bad_grader_is_a_400_naming_the_first_problem_and_listing_all(server, grader, param, words):
    client = sdk(server[0])
    for call in (lambda: client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x"),
                 lambda: client.fine_tuning.alpha.graders.validate(grader=grader)):
        with pytest.raises(openai.BadRequestError) as err:
            call()
        body = err.value.body
        assert (err.value.param, body["type"], body["code"]) == (param, "invalid_request_error", "invalid_grader")
        assert all(w in body["message"] for w in words), body["message"]


def test_every_problem_is_listed(server):
    bad = {"type": "string_check", "name": 7, "input": "{{sample.output_text}}", "operation": "nope"}
    with pytest.raises(openai.BadRequestError) as err:
        sdk(server[0]).fine_tuning.alpha.graders.validate(grader=bad)
    message = err.value.body["message"]
    assert err.value.param == "grader.name" and "3 problems" in message
    assert all(p in message for p in ("grader.name", "grader.reference", "grader.operation"))
