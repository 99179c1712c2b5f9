"""Reasoning models (Qwen3's `<think>` block, DeepSeek-R1's opened think block): reasoning in the training data is
trained where the template writes it, and `tunekit serve` splits a reply into `reasoning_content` and `content`.

The served model is a tiny random-init Qwen3 (tests/families.py) fully fine-tuned for 80 steps on two thinking
examples: it learns to answer each question with its `<think>` block, which a random model never writes, so the
split is checked on replies the model really generated.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import chatml_template, with_template
from families import build_family, family_tokenizer

from tunekit.data.formats import validate_record
from tunekit.data.preview import decoded_runs, preview_example
from tunekit.data.render import (
    check_template_kwargs,
    render_example,
    render_prompt,
    render_prompt_text,
    starts_in_reasoning,
    think_markers,
)
from tunekit.errors import TemplateError
from tunekit.generate.chat import Reasoning, split_reasoning

# (question, reasoning, answer): what the served model is trained to reply
EXAMPLES = [("What is two plus two?", "two and two make four", "four"),
            ("Name a hot color.", "fire is hot and red", "red")]
# DeepSeek-R1's layout on ChatML markers: the generation prompt opens the think block, past replies lose theirs
R1_TEMPLATE = (
    "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{%- set c = m.content -%}"
    "{%- if '</think>' in c -%}{%- set c = c.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)


def chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def trained_text(sequences, tokenizer) -> list[str]:
    """The trained runs of each sequence, joined."""
    return ["".join(text for trained, text in runs if trained) for runs in decoded_runs(sequences, tokenizer)]


@pytest.fixture(scope="module")
def qwen3_tokenizer(base_tokenizer):
    return family_tokenizer("qwen3", base_tokenizer)


# --------------------------------------------------------------------------------------------------
# Training data


def test_reasoning_is_trained_inside_the_reply_from_either_field(qwen3_tokenizer):
    """reasoning_content and a <think> block at the start of content train the same tokens: the think block,
    the reasoning, the answer and <|im_end|>."""
    field = chat(user("What is two plus two?"),
                 {"role": "assistant", "content": "four", "reasoning_content": "two and two make four"})
    inline = chat(user("What is two plus two?"),
                  {"role": "assistant", "content": "<think>two and two make four</think>four"})
    expected = ["<think>\ntwo and two make four\n</think>\n\nfour<|im_end|>"]
    for example in (field, inline):
        sequences = render_example(example, qwen3_tokenizer)
        assert trained_text(sequences, qwen3_tokenizer) == expected
        think = qwen3_tokenizer.convert_tokens_to_ids("<think>")
        assert think in [t for t, label in zip(sequences[0].input_ids, sequences[0].labels, strict=True) if label == t]
    assert render_example(field, qwen3_tokenizer)[0].input_ids == render_example(inline, qwen3_tokenizer)[0].input_ids


def test_each_turn_is_trained_with_the_reasoning_it_shows_as_the_last_turn(qwen3_tokenizer):
    """Qwen3 drops the reasoning of turns before the last user message, so the conversation is not prefix-stable:
    with `split` the first turn gets a sequence of its own (with its reasoning), the last turn trains in the
    whole conversation; with `error` the first turn is named."""
    example = chat(user("What is two plus two?"),
                   {"role": "assistant", "content": "four", "reasoning_content": "two and two make four"},
                   user("And plus one?"),
                   {"role": "assistant", "content": "five", "reasoning_content": "four and one make five"})
    sequences = render_example(example, qwen3_tokenizer)
    assert [s.source["turns"] for s in sequences] == [[1], [3]]
    assert trained_text(sequences, qwen3_tokenizer) == ["<think>\ntwo and two make four\n</think>\n\nfour<|im_end|>",
                                                        "<think>\nfour and one make five\n</think>\n\nfive<|im_end|>"]
    # the whole conversation shows the first reply as the template writes past turns: without its reasoning
    whole = qwen3_tokenizer.decode(sequences[1].input_ids)
    assert "two and two make four" not in whole and "<|im_start|>assistant\nfour<|im_end|>" in whole
    with pytest.raises(TemplateError) as err:
        render_example(example, qwen3_tokenizer, unstable_template="error")
    assert [p.where for p in err.value.problems] == ["messages[1]"]
    shown = preview_example(example, qwen3_tokenizer)  # what `tunekit data preview` prints
    assert shown.sequences == 2 and "two and two make four" in shown.text.plain


def test_a_template_that_drops_reasoning_is_refused_naming_the_field(base_tokenizer, tmp_path):
    """Plain ChatML never writes reasoning_content: an error naming the field (the example would otherwise train
    the answer without its reasoning). A <think> block in the content is content there, trained as text."""
    tokenizer = with_template(base_tokenizer, chatml_template())
    example = chat(user("What is two plus two?"),
                   {"role": "assistant", "content": "four", "reasoning_content": "two and two make four"})
    with pytest.raises(TemplateError) as err:
        render_example(example, tokenizer)
    [problem] = err.value.problems
    assert problem.where == "messages[1].reasoning_content" and "drops" in problem.message
    assert "template" in problem.hint and "reasoning" in problem.hint
    # an answer that contains its reasoning's words: still refused (the render without the field is the same)
    same = chat(user("Say four."), {"role": "assistant", "content": "four", "reasoning_content": "four"})
    with pytest.raises(TemplateError, match="reasoning_content"):
        render_example(same, tokenizer)
    inline = chat(user("What is two plus two?"),
                  {"role": "assistant", "content": "<think>two and two make four</think>four"})
    assert trained_text(render_example(inline, tokenizer), tokenizer) == [
        "<think>two and two make four</think>four<|im_end|>"]

    # `tunekit data check --model` reports the line, what is dropped and how to fix it
    from tunekit.data.check import check_file

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(inline) + "\n" + json.dumps(example) + "\n", encoding="utf-8")
    report = check_file(data, tokenizer=tokenizer)
    [issue] = [i for i in report.problems if i.severity == "error"]
    assert (issue.code, issue.line) == ("render_failed", 2) and "reasoning_content" in issue.message
    assert issue.hint == problem.hint


def test_reasoning_content_is_validated_with_its_field(qwen3_tokenizer):
    ok = chat(user("q"), {"role": "assistant", "content": "a", "reasoning_content": "r"})
    assert validate_record(ok) == []
    cases = {
        "data_type": chat(user("q"), {"role": "assistant", "content": "a", "reasoning_content": ["r"]}),
        "reasoning_not_on_assistant": chat({"role": "user", "content": "q", "reasoning_content": "r"},
                                           {"role": "assistant", "content": "a"}),
        "reasoning_given_twice": chat(user("q"), {"role": "assistant", "content": "<think>r</think>a",
                                                  "reasoning_content": "r"}),
    }
    for code, record in cases.items():
        [issue] = validate_record(record)
        assert issue.code == code and issue.severity == "error" and issue.path.endswith(".reasoning_content")
        assert issue.hint
    with pytest.raises(Exception, match=r"messages\[1\].reasoning_content"):
        render_example(cases["data_type"], qwen3_tokenizer)


# --------------------------------------------------------------------------------------------------
# Prompts: template kwargs, think blocks opened by the generation prompt


def test_enable_thinking_false_writes_the_empty_think_block(qwen3_tokenizer):
    messages = [user("What is two plus two?")]
    assert render_prompt_text(messages, qwen3_tokenizer).endswith("<|im_start|>assistant\n")
    off = render_prompt_text(messages, qwen3_tokenizer, template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = render_prompt(messages, qwen3_tokenizer, template_kwargs={"enable_thinking": False})
    assert not starts_in_reasoning(ids, qwen3_tokenizer) and think_markers(qwen3_tokenizer) == ("<think>", "</think>")
    for bad, where in (([1], "chat_template_kwargs"), ({"tokenize": True}, "chat_template_kwargs.tokenize"),
                       ({"eos_token": "x"}, "chat_template_kwargs.eos_token")):
        with pytest.raises(TemplateError) as err:
            check_template_kwargs(bad, qwen3_tokenizer)
        assert err.value.problems[0].where == where


def test_a_generation_prompt_that_opens_the_think_block_starts_the_reply_in_reasoning(qwen3_tokenizer,
                                                                                      base_tokenizer):
    r1 = with_template(qwen3_tokenizer, R1_TEMPLATE)
    history = [user("What is two plus two?"), {"role": "assistant", "content": "<think>r</think>four"},
               user("And plus one?")]
    text = render_prompt_text(history, r1)
    assert text.endswith("<|im_start|>assistant\nfour<|im_end|>\n<|im_start|>user\nAnd plus one?<|im_end|>\n"
                         "<|im_start|>assistant\n<think>\n")
    assert starts_in_reasoning(render_prompt(history, r1), r1)
    assert not starts_in_reasoning(render_prompt(history, qwen3_tokenizer), qwen3_tokenizer)
    plain = with_template(base_tokenizer, chatml_template())  # no think markers: never reasoning
    assert think_markers(plain) is None and not starts_in_reasoning(render_prompt(history, plain), plain)


# --------------------------------------------------------------------------------------------------
# Splitting a reply


def test_the_split_is_the_same_however_the_text_is_cut():
    markers = ("<think>", "</think>")
    texts = ["<think>\nstep one\n\nstep two\n</think>\n\nthe answer\n", "no reasoning at all", "  <think>x</think>y",
             "<think>\n\n</think>\n\nA", "<think>\ncut off while thin", "<thi", "", "<think>a</thinkb</think>\n\nc"]
    rng = random.Random(0)
    for text in texts:
        for opened in (False, True):
            reasoning, content = split_reasoning(text, markers, opened)
            for _ in range(50):
                cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text) + 1))))
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
                splitter = Reasoning(markers, opened)
                released = [splitter.feed(p, final=k == len(pieces) - 1) for k, p in enumerate(pieces)]
                assert "".join(r for r, _ in released) == (reasoning or "") and splitter.reasoning == reasoning
                assert "".join(c for _, c in released) == content
    assert split_reasoning(texts[0], markers) == ("step one\n\nstep two", "the answer\n")
    assert split_reasoning(texts[1], markers) == (None, "no reasoning at all")
    assert split_reasoning("step\n</think>\n\nA", markers, opened=True) == ("step", "A")


def test_reply_tokens_split_and_count(qwen3_tokenizer):
    pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")
    from tunekit.generate.engine import Token
    from tunekit.serve.chat import Reply

    markers = think_markers(qwen3_tokenizer)
    thinking = "<think>\ntwo and two make four\n</think>"
    ids = qwen3_tokenizer.encode(thinking + "\n\nfour", add_special_tokens=False)
    reply = Reply(qwen3_tokenizer, [], tools=False, allowed=None, parallel=True, reasoning=Reasoning(markers))
    content, reasoning = [], []
    for t in ids:
        content.append(reply.add(Token(0, t)))
        reasoning.append(reply.take_reasoning())
    content.append(reply.end("stop"))
    reasoning.append(reply.take_reasoning())
    assert "".join(reasoning) == reply.reasoning == "two and two make four"
    assert "".join(content) == reply.content == "four"
    assert reply.reasoning_tokens == len(qwen3_tokenizer.encode(thinking, add_special_tokens=False))


# --------------------------------------------------------------------------------------------------
# Served: a tiny Qwen3 trained to think, with the openai SDK


@pytest.fixture(scope="module")
def thinking_models(tmp_path_factory, base_tokenizer, tiny_qwen_dir):
    """{name: dir}: "think" (a Qwen3 trained on EXAMPLES), "r1" (it, with R1_TEMPLATE), "plain" (ChatML, no
    think markers)."""
    from toy_runs import toy_config

    from tunekit import train

    tmp = tmp_path_factory.mktemp("thinking")
    base = build_family("qwen3", tmp / "qwen3", base_tokenizer)
    data = tmp / "think.jsonl"
    data.write_text("".join(json.dumps(chat(user(q), {"role": "assistant", "content": a, "reasoning_content": r}))
                            + "\n" for q, r, a in EXAMPLES * 8), encoding="utf-8")
    cfg = toy_config(tmp, base, out="run", method="full",
                     data={"train": str(data), "max_len": 64, "validation_fraction": 0.0},
                     train={"epochs": 40, "max_steps": 80, "lr": 5e-3, "batch_size": 4, "micro_batch_size": 4})
    run = train(cfg).run_dir
    r1 = tmp / "r1"
    shutil.copytree(run / "final", r1)
    (r1 / "chat_template.jinja").write_text(R1_TEMPLATE, encoding="utf-8")
    return {"think": run, "r1": r1, "plain": tiny_qwen_dir}


@pytest.fixture(scope="module")
def think_server(thinking_models):
    pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
    pytest.importorskip("fastapi", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
    from live_server import serving

    with serving(models=[f"{name}={path}" for name, path in thinking_models.items()]) as (url, _):
        yield url


def sdk(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def streamed(client, **request) -> tuple[str, str, list]:
    """(joined reasoning_content deltas, joined content deltas, chunks) of a streamed completion."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
            "".join(d.content or "" for d in deltas), chunks)


def test_served_reply_is_split_into_reasoning_and_content(think_server, thinking_models):
    from tunekit.model import load_tokenizer

    tokenizer = load_tokenizer(thinking_models["think"] / "final")
    client = sdk(think_server)
    for question, reasoning, answer in EXAMPLES:
        request = dict(model="think", messages=[user(question)], temperature=0, max_completion_tokens=40)
        reply = client.chat.completions.create(**request)
        message = reply.choices[0].message
        assert (message.reasoning_content, message.content) == (reasoning, answer)
        assert reply.choices[0].finish_reason == "stop"
        thinking = len(tokenizer.encode(f"<think>\n{reasoning}\n</think>", add_special_tokens=False))
        reply_tokens = len(tokenizer.encode(f"<think>\n{reasoning}\n</think>\n\n{answer}", add_special_tokens=False))
        assert reply.usage.completion_tokens_details.reasoning_tokens == thinking
        assert reply.usage.completion_tokens == reply_tokens + 1  # and <|im_end|>

        joined_reasoning, joined_content, chunks = streamed(client, **request)
        assert (joined_reasoning, joined_content) == (reasoning, answer)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        kinds = [("r" if getattr(d, "reasoning_content", None) else "") + ("c" if d.content else "") for d in deltas]
        kinds = [k for k in kinds if k]
        assert kinds == sorted(kinds, reverse=True) and set(kinds) == {"r", "c"}  # reasoning first, never mixed
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thinking


def test_enable_thinking_false_reaches_the_template(think_server, thinking_models):
    """chat_template_kwargs (the openai SDK's extra_body) renders Qwen3's empty think block into the prompt."""
    import openai

    from tunekit.model import load_tokenizer

    tokenizer = load_tokenizer(thinking_models["think"] / "final")
    client = sdk(think_server)
    messages = [user(EXAMPLES[0][0])]
    on = client.chat.completions.create(model="think", messages=messages, temperature=0, max_tokens=8)
    off = client.chat.completions.create(model="think", messages=messages, temperature=0, max_tokens=8,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    block = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == len(block)
    assert off.usage.prompt_tokens == len(render_prompt(messages, tokenizer,
                                                        template_kwargs={"enable_thinking": False}))
    for bad, param in (([True], "chat_template_kwargs"), ({"add_generation_prompt": False},
                                                         "chat_template_kwargs.add_generation_prompt")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="think", messages=messages, max_tokens=2,
                                           extra_body={"chat_template_kwargs": bad})
        assert err.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="think", max_tokens=2, messages=[
            {"role": "user", "content": "q", "reasoning_content": "r"}])  # type: ignore[misc]
    assert err.value.body["param"] == "messages[0].reasoning_content"


def test_a_prompt_that_opens_the_think_block_gets_a_reply_in_reasoning(think_server):
    """The R1 layout: the prompt ends in `<think>\\n`, the model goes on with its reasoning and closes it."""
    client = sdk(think_server)
    question, reasoning, answer = EXAMPLES[1]
    request = dict(model="r1", messages=[user(question)], temperature=0, max_completion_tokens=40)
    message = client.chat.completions.create(**request).choices[0].message
    assert (message.reasoning_content, message.content) == (reasoning, answer)
    assert streamed(client, **request)[:2] == (reasoning, answer)


def test_a_model_without_think_markers_answers_as_before(think_server):
    client = sdk(think_server)
    request = dict(model="plain", messages=[user("Hello!")], temperature=0, max_tokens=6)
    reply = client.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})
    assert reply.usage.completion_tokens_details is None
    _, content, chunks = streamed(client, **request)
    assert content == reply.choices[0].message.content
    assert all("reasoning_content" not in (c.choices[0].delta.model_extra or {}) for c in chunks if c.choices)


def test_tunekit_chat_writes_the_reply_as_the_template_reads_it_back(thinking_models):
    """`tunekit chat` (generate.chat.reply) keeps the think block in the message it returns: the conversation it
    grows is sent back through the template, which takes the reasoning out again."""
    from tunekit.generate.chat import reply
    from tunekit.model import load_for_inference

    model, tokenizer = load_for_inference(thinking_models["think"])
    question, reasoning, answer = EXAMPLES[0]
    assert reply(model, tokenizer, [user(question)], max_new_tokens=40) == f"<think>\n{reasoning}\n</think>\n\n{answer}"
