"""`tunekit serve` driven by the official openai SDK against uvicorn on a free loopback port.

Replies are compared with tunekit's greedy `evaluate.generate` on the same model loaded with
`load_for_inference`: the server must give the same tokens, streamed or not.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")

from conftest import greedy  # noqa: E402
from live_server import serving, start  # noqa: E402
from runs import TOOL_ARGUMENTS, TOOL_QUESTION, WEATHER_TOOL, hermes_base, lora_run, tool_call_run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY_CHAT = REPO / "models" / "tiny-chat"
HELLO = [{"role": "user", "content": "Hello! How are you?"}]


def client(base_url: str, key: str = "anything") -> openai.OpenAI:
    # max_retries=0: the SDK retries 5xx, which would hide a server error
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def streamed(stream) -> tuple[str, list, object]:
    """(joined content, chunks, usage) of a chat completion stream."""
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next((c.usage for c in chunks if c.usage), None)
    return text, chunks, usage


# --------------------------------------------------------------------------------------------------
# tiny-chat: the shipped model


@pytest.fixture(scope="module")
def tiny_server():
    with serving(models=[f"tiny={TINY_CHAT}", f"org/tiny:v1={TINY_CHAT}"]) as (url, app):
        yield url, app


def test_stream_and_non_stream_equal_greedy_generate(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    for messages in (HELLO, [{"role": "system", "content": "Answer in JSON."},
                             {"role": "user", "content": [{"type": "text", "text": "List three fruits."}]}]):
        text, prompt_tokens, completion_tokens = greedy(TINY_CHAT, messages, 24)
        reply = sdk.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                            max_completion_tokens=24)
        assert reply.choices[0].message.content == text and text
        assert reply.choices[0].finish_reason == ("stop" if completion_tokens < 24 else "length")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
        assert reply.usage.total_tokens == prompt_tokens + completion_tokens

        joined, chunks, usage = streamed(sdk.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=24, stream=True,
            stream_options={"include_usage": True}))
        assert joined == text
        roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
        assert roles == ["assistant"]  # role once
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].choices == [] and usage.completion_tokens == completion_tokens
        assert len({c.id for c in chunks}) == 1


def test_a_prompt_starting_like_an_earlier_one_reuses_its_cached_blocks(tiny_server):
    """The second request shares the first one's system prompt: its usage counts the prompt tokens taken
    from the prefix cache (whole blocks of 16), and the replies are still those of greedy generation."""
    url, _ = tiny_server
    sdk = client(url)
    system = {"role": "system", "content": "You answer questions about the weather in Lisbon, Porto and Faro. "
                                           "Keep every answer short, polite and in plain English words."}
    for question, cached in (("Is it sunny?", 0), ("Will it rain tomorrow?", None), ("Will it rain tomorrow?", None)):
        messages = [system, {"role": "user", "content": question}]
        text, prompt_tokens, _ = greedy(TINY_CHAT, messages, 16)
        reply = sdk.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == text
        reused = reply.usage.prompt_tokens_details.cached_tokens
        assert reused == 0 if cached == 0 else (reused >= 32 and reused % 16 == 0 and reused < prompt_tokens)
        _, _, usage = streamed(sdk.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                                           max_tokens=16, stream=True,
                                                           stream_options={"include_usage": True}))
        assert usage.prompt_tokens_details.cached_tokens >= max(reused, 32)  # the same prompt again: its own blocks
    assert reused == (prompt_tokens - 1) // 16 * 16  # asked before: every full block but the last token's


def test_one_log_line_per_request(caplog):
    # a server of its own: a streamed reply of another test is logged when its last (empty) body message goes,
    # which can be after that test's client has read [DONE]
    with serving(models=[f"tiny={TINY_CHAT}"]) as (url, _), caplog.at_level("INFO", logger="tunekit.serve"):
        reply = client(url).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=5)
    [record] = [r for r in caplog.records if r.name == "tunekit.serve"]
    message = record.getMessage()
    assert message.startswith("POST /v1/chat/completions 200 ") and message.endswith(
        f"ms tokens={reply.usage.completion_tokens}")


def test_models_list_and_ids_with_slash_and_colon(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    assert sorted(m.id for m in sdk.models.list()) == ["org/tiny:v1", "tiny"]
    assert sdk.models.retrieve("org/tiny:v1").id == "org/tiny:v1"
    reply = sdk.chat.completions.create(model="org/tiny:v1", messages=HELLO, temperature=0, max_tokens=4)
    assert reply.model == "org/tiny:v1"
    with pytest.raises(openai.NotFoundError) as err:
        sdk.models.retrieve("nope")
    assert err.value.code == "model_not_found"


def test_two_runs_share_one_copy_of_a_base(tiny_server):
    _, app = tiny_server
    models = app.state.models
    assert models["tiny"].weights is models["org/tiny:v1"].weights


def test_n_2_stop_and_logprobs(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    text, _, _ = greedy(TINY_CHAT, HELLO, 24)
    reply = sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [text, text]

    joined = {0: "", 1: ""}
    for chunk in sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24, n=2,
                                             stream=True):
        for choice in chunk.choices:
            joined[choice.index] += choice.delta.content or ""
    assert joined == {0: text, 1: text}

    stop = text.split()[2]  # a word in the middle of the greedy reply
    cut = text[:text.index(stop)]
    reply = sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24, stop=[stop])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    joined, _, _ = streamed(sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24,
                                                        stop=stop, stream=True))
    assert joined == cut

    reply = sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                        top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    assert "".join(e.token for e in entries) == reply.choices[0].message.content


def test_sampling_with_a_seed_repeats(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    ask = dict(model="tiny", messages=HELLO, temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    first = sdk.chat.completions.create(**ask).choices[0].message.content
    assert sdk.chat.completions.create(**ask).choices[0].message.content == first
    assert sdk.chat.completions.create(**{**ask, "seed": -3}).choices[0].message.content  # any int is a seed


def test_unknown_fields_are_ignored_and_developer_is_system(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    as_system = sdk.chat.completions.create(model="tiny", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Be brief."}] + HELLO).choices[0].message.content
    reply = sdk.chat.completions.create(model="tiny", temperature=0, max_tokens=8, user="u1", metadata={"k": "v"},
                                        extra_body={"not_an_openai_field": 1}, messages=[
                                            {"role": "developer", "content": "Be brief."}] + HELLO)
    assert reply.choices[0].message.content == as_system


def test_bad_requests_are_400_naming_the_param(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="missing", messages=HELLO)
    cases = [
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (dict(messages=[]), "messages"),
        (dict(messages=HELLO, temperature=5), "temperature"),
        (dict(messages=HELLO, presence_penalty=1.0), "presence_penalty"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content[0]"),
        (dict(messages=HELLO + [{"role": "assistant", "content": "I"}]), "messages[1]"),
        (dict(messages=[{"role": "user", "content": "word " * 3000}]), "messages"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model="tiny", max_tokens=4, **kwargs)
        assert err.value.param == param, kwargs
        assert set(err.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):  # not JSON at all
        sdk.post("/chat/completions", content=b"{not json", cast_to=object,
                 options={"headers": {"Content-Type": "application/json"}})


def test_json_response_format_is_checked(tiny_server):
    url, _ = tiny_server
    sdk = client(url)
    text, _, _ = greedy(TINY_CHAT, HELLO, 8)
    assert not text.lstrip().startswith("{")  # tiny-chat answers a greeting in words
    with pytest.raises(openai.UnprocessableEntityError) as err:
        sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8,
                                    response_format={"type": "json_object"})
    assert err.value.param == "response_format" and "not valid JSON" in err.value.message


def test_schema_problem():
    from tunekit.serve.chat import schema_problem

    schema = {"type": "object", "required": ["name"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}}}}
    assert schema_problem({"name": "a", "tags": [1, 2]}, schema, "$") is None
    assert "missing 'name'" in schema_problem({}, schema, "$")
    assert "$.tags[1] should be integer" in schema_problem({"name": "a", "tags": [1, True]}, schema, "$")
    assert "'x'" in schema_problem({"name": "a", "x": 1}, schema, "$")


def test_twenty_concurrent_streams_complete_in_batches(tiny_server):
    url, app = tiny_server
    engine = app.state.engine
    before = engine.batches
    results: list[tuple[str, str | None]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            text, chunks, _ = streamed(client(url).chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Tell me about number {i}."}],
                temperature=0, max_tokens=16, stream=True))
            results.append((text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 20 and all(text and finish in ("stop", "length") for text, finish in results)
    assert engine.batches - before < 20  # requests were batched together


def test_server_survives_a_client_that_disconnects_mid_stream(tiny_server):
    url, app = tiny_server
    sdk = client(url)
    stream = sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=1.0, max_tokens=500, stream=True)
    next(iter(stream))  # the role chunk
    stream.close()
    text, _, _ = greedy(TINY_CHAT, HELLO, 8)
    reply = sdk.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == text
    assert client(url).with_options(timeout=5).models.list().data


def test_shutdown_lets_a_running_stream_finish():
    server, thread, url, app = start(models=[f"tiny={TINY_CHAT}"])
    text, _, _ = greedy(TINY_CHAT, HELLO, 24)
    stream = client(url).chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=24,
                                                 stream=True)
    chunks = [next(iter(stream))]
    server.should_exit = True  # what Ctrl-C / SIGTERM does
    chunks += list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(openai.APIConnectionError):  # it is gone
        client(url).models.list()


# --------------------------------------------------------------------------------------------------
# Runs with adapters on one base


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("serve-runs")
    return lora_run(tmp, tiny_llama_dir, "run-a", 1), lora_run(tmp, tiny_llama_dir, "run-b", 2)


def test_adapters_answer_like_their_runs_on_one_base(lora_runs, tiny_llama_dir):
    run_a, run_b = lora_runs
    ask = [{"role": "user", "content": "say apple"}]
    want = {name: greedy(path, ask, 10)[0] for name, path in
            (("base", tiny_llama_dir), ("a", run_a), ("b", run_b))}
    assert len(set(want.values())) == 3  # the adapters change the answer
    with serving(models=[f"base={tiny_llama_dir}", f"a={run_a}", f"b={run_b}"], max_adapters=1) as (url, app):
        models = app.state.models
        assert models["a"].weights is models["b"].weights is models["base"].weights  # one copy of the base
        sdk = client(url)
        for name in ("a", "b", "a", "base", "b", "base"):  # alternating: adapters load, unload, reload
            reply = sdk.chat.completions.create(model=name, messages=ask, temperature=0, max_tokens=10)
            assert reply.choices[0].message.content == want[name], name
            assert len(models["a"].weights.adapters) <= 1
        joined, _, _ = streamed(sdk.chat.completions.create(model="b", messages=ask, temperature=0, max_tokens=10,
                                                            stream=True))
        assert joined == want["b"]

        got: dict[int, tuple[str, str]] = {}  # concurrent requests for all three: batched per adapter

        def one(i: int, name: str) -> None:
            reply = client(url).chat.completions.create(model=name, messages=ask, temperature=0, max_tokens=10)
            got[i] = (name, reply.choices[0].message.content)

        threads = [threading.Thread(target=one, args=(i, name)) for i, name in enumerate(["a", "b", "base"] * 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(got) == 9 and all(text == want[name] for name, text in got.values())


# --------------------------------------------------------------------------------------------------
# Tool calls through the hermes template


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory, base_tokenizer):
    import copy

    from conftest import shared_template

    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.chat_template = shared_template("hermes-tools")
    tmp = tmp_path_factory.mktemp("serve-tools")
    return tool_call_run(tmp, hermes_base(tmp / "hermes-base", tokenizer))


def test_tool_calls_in_both_modes(tool_run):
    ask = [{"role": "user", "content": TOOL_QUESTION}]
    text, _, _ = greedy(tool_run, ask, 40, tools=[WEATHER_TOOL])
    assert "<tool_call>" in text  # the run learned to call the tool
    with serving(models=[f"tools={tool_run}"]) as (url, _):
        sdk = client(url)
        reply = sdk.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=40)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == TOOL_ARGUMENTS

        with sdk.chat.completions.stream(model="tools", messages=ask, tools=[WEATHER_TOOL], temperature=0,
                                         max_tokens=40) as stream:
            events = list(stream)
            final = stream.get_final_completion()
        [call] = final.choices[0].message.tool_calls
        assert final.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather" and call.id.startswith("call_") and len(call.id) == 29
        assert json.loads(call.function.arguments) == TOOL_ARGUMENTS
        assert call.function.parsed_arguments is None or call.function.parsed_arguments == TOOL_ARGUMENTS
        done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
        assert len(done) == 1 and done[0].name == "get_weather"

        # The call and its result go back in: the template renders the tool message, the model answers.
        follow = ask + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]
        reply = sdk.chat.completions.create(model="tools", messages=follow, tools=[WEATHER_TOOL], temperature=0,
                                            max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")

        reply = sdk.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], tool_choice="none",
                                            temperature=0, max_tokens=40)
        assert reply.choices[0].message.tool_calls is None and "<tool_call>" in reply.choices[0].message.content

        forced = {"type": "function", "function": {"name": "get_weather"}}
        reply = sdk.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], tool_choice=forced,
                                            temperature=0, max_tokens=40)
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"
        with pytest.raises(openai.UnprocessableEntityError) as err:  # it answers a greeting in text
            sdk.chat.completions.create(model="tools", messages=[{"role": "user", "content": "hello"}],
                                        tools=[WEATHER_TOOL], tool_choice="required", temperature=0, max_tokens=8)
        assert err.value.param == "tool_choice"
        with pytest.raises(openai.BadRequestError) as err:
            sdk.chat.completions.create(model="tools", messages=ask, tools=[WEATHER_TOOL], max_tokens=8,
                                        tool_choice={"type": "function", "function": {"name": "other"}})
        assert err.value.param == "tool_choice"


# --------------------------------------------------------------------------------------------------
# Keys and exposure


def test_api_keys(tiny_server, tmp_path):
    with serving(models=[f"tiny={TINY_CHAT}"], api_keys=["secret-1", "secret-2"]) as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, key="wrong").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert err.value.code == "invalid_api_key"
        assert client(url, key="secret-2").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        import httpx

        assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"  # no key needed


def test_non_loopback_host_without_key_is_refused():
    from typer.testing import CliRunner

    from tunekit.cli import app

    result = CliRunner().invoke(app, ["serve", str(TINY_CHAT), "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "no API key" in result.output and "--api-key" in result.output


def test_request_body_limit(tmp_path):
    with serving(models=[f"tiny={TINY_CHAT}"], max_body_bytes=2048) as (url, _):
        with pytest.raises(openai.APIStatusError) as err:
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
        assert err.value.status_code == 413
