"""Render + mask: the trained tokens are exactly each assistant reply as the template renders it.

Expectations are written out per template (what its text puts after the generation prompt), not derived
from the code under test.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from canary import still_broken
from conftest import chatml_template, shared_template, shared_template_names, with_template
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunekit.data.render import (
    detect_format,
    end_of_turn_ids,
    prepare_chat,
    render_example,
    render_prompt,
    render_prompt_text,
)
from tunekit.data.types import IGNORE
from tunekit.errors import DataError, TemplateError

# Per template: (whitespace the template writes before the content is trained, reply as rendered for content c).
# The whitespace is the template's own indentation (llama-2, mistral) or the space after "ASSISTANT:".
REPLY = {
    "chatml": (False, "{c}<|im_end|>"),
    "gemma-it": (False, "{c}<end_of_turn>"),
    "hermes-tools": (False, "{c}<|im_end|>"),
    "llama-2-chat": (True, "{c} </s>"),
    "llama-3-instruct": (False, "{c}<|eot_id|>"),
    "llama-3.1-tools-json": (False, "{c}<|eot_id|>"),
    "mistral-instruct": (True, "{c}</s>"),
    "mistral-tools": (True, "{c} </s>"),
    "phi-3": (False, "{c}<|end|>"),
    "qwen2.5-instruct": (False, "{c}<|im_end|>"),
    "vicuna": (True, "{c}</s>"),
    "zephyr": (False, "{c}</s>"),
}
# Templates whose add_generation_prompt=True text is itself the start of the conversation render. The others
# write indentation whitespace after their generation prompt; there render_prompt gives the conversation's own
# text up to the reply (checked below to differ from the template's prompt in whitespace only).
EXACT_PROMPT = {"hermes-tools", "llama-2-chat", "llama-3.1-tools-json", "mistral-instruct", "mistral-tools",
                "qwen2.5-instruct"}
DROPS_SYSTEM = {"mistral-tools"}  # writes no system message at all: refused rather than trained without it
TOOL_TEMPLATES = {
    # the reply for a get_weather(city="Paris") call, as each template writes it
    "hermes-tools": '<tool_call>\n{ "arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call> <|im_end|>',
    "qwen2.5-instruct": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "llama-3.1-tools-json": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
NAMES = shared_template_names() or [pytest.param("none", marks=pytest.mark.skip(reason="../shared is absent"))]


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(tok, seq) -> list[tuple[int, str]]:
    """(first token index, decoded text) of each run of trained tokens."""
    runs, start = [], None
    for k, label in enumerate(seq.labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = k
        if label == IGNORE and start is not None:
            assert seq.labels[start:k] == seq.input_ids[start:k]  # trained labels are the tokens themselves
            runs.append((start, decode(tok, seq.input_ids[start:k])))
            start = None
    return runs


def untrained_text(tok, seq) -> str:
    return decode(tok, [t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label == IGNORE])


def check_reply(name: str, text: str, content: str) -> None:
    leading_ws, form = REPLY[name]
    expected = form.format(c=content)
    if leading_ws:
        assert text.lstrip() == expected and text[: len(text) - len(expected)].isspace(), (text, expected)
    else:
        assert text == expected


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def conversation(system: bool, weights=(1, 1)) -> list[dict]:
    messages = [{"role": "system", "content": "You are terse. Réponds en français."}] if system else []
    messages += [
        {"role": "user", "content": "What is the capital of France? café"},
        {"role": "assistant", "content": "Paris, naïve 日本語 🚀", "weight": weights[0]},
        {"role": "user", "content": "And of Japan → 東京?"},
        {"role": "assistant", "content": "Tokyo. Ελληνικά", "weight": weights[1]},
    ]
    return messages


# ------------------------------------------------------------------------------------- every template


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("weights", [(1, 1), (0, 1)])
def test_every_template_trains_exactly_the_replies(name, system, weights, tokenizer_with_template):
    tok = tokenizer_with_template(name)
    messages = conversation(system, weights)
    if system and name in DROPS_SYSTEM:
        with pytest.raises(TemplateError, match="does not write this system message") as info:
            render_example({"messages": messages}, tok)
        assert info.value.problems[0].where == "messages[0].content"
        return
    (seq,) = render_example({"messages": messages}, tok)
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    full = tok.apply_chat_template(clean, tokenize=False)
    assert seq.input_ids == encode(tok, full)  # the pieces add up to the whole conversation's tokens

    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    trained = [i for i in assistants if messages[i]["weight"]]
    runs = trained_runs(tok, seq)
    assert len(runs) == len(trained)
    for i, (start, text) in zip(trained, runs, strict=True):
        check_reply(name, text, messages[i]["content"])
        # what generation is given for this reply is exactly the tokens before it
        assert seq.input_ids[:start] == render_prompt(clean[:i], tok)
        template_prompt = tok.apply_chat_template(clean[:i], tokenize=False, add_generation_prompt=True)
        if name in EXACT_PROMPT:
            assert seq.input_ids[:start] == encode(tok, template_prompt)
        else:
            assert re.sub(r"\s", "", template_prompt) == re.sub(r"\s", "", render_prompt_text(clean[:i], tok))
    rest = untrained_text(tok, seq)
    for m in messages:
        if m["role"] in ("user", "system") or not m.get("weight", 1):
            assert m["content"] in rest
    assert seq.source == {"turns": trained}


@pytest.mark.parametrize("name", sorted(TOOL_TEMPLATES))
def test_tool_templates_train_tool_calls_not_tool_results(name, tokenizer_with_template):
    tok = tokenizer_with_template(name)
    messages = [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},  # no name: filled from the call
        {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome 😀", "weight": 0},
    ]
    (seq,) = render_example({"messages": messages, "tools": TOOLS}, tok)
    runs = trained_runs(tok, seq)
    assert [text for _, text in runs] == [
        TOOL_TEMPLATES[name], REPLY[name][1].format(c="It is 22 C and sunny in Paris.")]
    rest = untrained_text(tok, seq)
    assert "22 C, sunny" in rest and "You are welcome 😀" in rest and "Weather in Paris?" in rest
    prepared = prepare_chat({"messages": messages, "tools": TOOLS})
    for (start, _), i in zip(runs, (2, 4), strict=True):
        assert seq.input_ids[:start] == render_prompt(messages[:i], tok, tools=TOOLS)
        if name in EXACT_PROMPT:
            text = tok.apply_chat_template(prepared.messages[:i], tools=TOOLS, tokenize=False,
                                           add_generation_prompt=True)
            assert seq.input_ids[:start] == encode(tok, text)


def test_legacy_functions_render_like_tools(tokenizer_with_template):
    tok = tokenizer_with_template("hermes-tools")
    modern = {"tools": TOOLS, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "22 C"},
        {"role": "assistant", "content": "22 C."},
    ]}
    legacy = {"functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": "22 C"},
        {"role": "assistant", "content": "22 C."},
    ]}
    (a,), (b,) = render_example(modern, tok), render_example(legacy, tok)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
    assert a.num_trained > 0


# ------------------------------------------------------------------------------ unstable templates, split


def mistral_tools_conversation() -> dict:
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny and 22 C."},
    ]}


def test_unstable_template_error_names_the_cause(tokenizer_with_template):
    tok = tokenizer_with_template("mistral-tools")
    with pytest.raises(TemplateError) as info:
        render_example(mistral_tools_conversation(), tok, unstable_template="error")
    (problem,) = info.value.problems
    assert problem.where == "messages[1]"
    assert "rendering messages[:2] is not a prefix of the full render" in problem.message
    assert "[AVAILABLE_TOOLS]" in problem.message and "moves the tool list" in problem.message
    assert "unstable_template" in problem.hint


def test_unstable_template_split_gives_one_verified_sequence_per_turn(tokenizer_with_template):
    tok = tokenizer_with_template("mistral-tools")
    example = mistral_tools_conversation()
    seqs = render_example(example, tok, unstable_template="split")
    assert [s.source["turns"] for s in seqs] == [[1], [3]]
    messages = example["messages"]
    for seq, i in zip(seqs, (1, 3), strict=True):
        # each sequence is the conversation up to its turn, rendered alone, with only that turn trained
        upto = tok.apply_chat_template(messages[: i + 1], tools=TOOLS, tokenize=False)
        assert seq.input_ids == encode(tok, upto)
        ((start, text),) = trained_runs(tok, seq)
        check_reply("mistral-tools", text, messages[i]["content"])
        prompt = tok.apply_chat_template(messages[:i], tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert seq.input_ids[:start] == encode(tok, prompt) == render_prompt(messages[:i], tok, tools=TOOLS)
    # without tools the template is prefix-stable: one sequence
    (seq,) = render_example({"messages": messages}, tok, unstable_template="error")
    assert seq.source["turns"] == [1, 3]


def test_template_that_drops_tool_calls_is_refused(tokenizer_with_template):
    tok = tokenizer_with_template("mistral-tools")  # writes '[TOOL_CALLS]' + content, never the calls
    example = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
    ]}
    with pytest.raises(TemplateError) as info:
        render_example(example, tok)
    assert info.value.problems[0].where == "messages[1].tool_calls[0]"
    assert "does not render the tool call 'get_weather'" in info.value.problems[0].message
    example["messages"][1]["weight"] = 0  # not trained: nothing to locate
    (seq,) = render_example(example, tok)
    assert seq.num_trained == 0


# Qwen3-style: reasoning inside <think> is kept only for replies after the last user message.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{%- set content = m.content %}"
    "{%- if '</think>' in content and loop.index0 < ns.last_user %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_qwen3_style_template_that_drops_earlier_reasoning(base_tokenizer):
    tok = with_template(base_tokenizer, QWEN3_STYLE)
    first, second = "<think>\nadd them\n</think>\n\n4", "<think>\ndouble it\n</think>\n\n8"
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "times 2?"}, {"role": "assistant", "content": second}]
    with pytest.raises(TemplateError) as info:
        render_example({"messages": messages}, tok, unstable_template="error")
    assert info.value.problems[0].where == "messages[1]"
    assert "drops earlier reasoning" in info.value.problems[0].message
    seqs = render_example({"messages": messages}, tok)
    assert [[text for _, text in trained_runs(tok, s)] for s in seqs] == [
        [first + "<|im_end|>"], [second + "<|im_end|>"]]
    # the full conversation (earlier reasoning dropped) carries the last turn; its context has no <think> for turn 1
    assert "add them" not in decode(tok, seqs[1].input_ids)
    assert seqs[1].input_ids == encode(tok, tok.apply_chat_template(messages, tokenize=False))


CHATML_GENERATION = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_generation_markers_agree_with_prefix_rendering(base_tokenizer, chat_tokenizer):
    messages = conversation(system=True, weights=(0, 1))
    (marked,) = render_example({"messages": messages}, with_template(base_tokenizer, CHATML_GENERATION))
    (plain,) = render_example({"messages": messages}, chat_tokenizer)
    assert (marked.input_ids, marked.labels) == (plain.input_ids, plain.labels)
    assert [t for _, t in trained_runs(chat_tokenizer, marked)] == ["Tokyo. Ελληνικά<|im_end|>"]


CONTENT_ONLY_GENERATION = CHATML_GENERATION.replace("{{- m.content + '<|im_end|>' }}{% endgeneration %}",
                                                   "{{- m.content }}{% endgeneration %}{{- '<|im_end|>' }}")


def test_generation_block_ending_in_a_split_character_is_trained_whole(base_tokenizer):
    # tunekit takes {% generation %} blocks as characters, so a block that ends inside a multi-token
    # character ("🚀" is several byte-level tokens) is trained to its last byte, whatever transformers does.
    tok = with_template(base_tokenizer, CONTENT_ONLY_GENERATION)
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok 🚀"}]
    assert len(encode(tok, "🚀")) > 1
    (seq,) = render_example({"messages": messages}, tok)
    assert [t for _, t in trained_runs(tok, seq)] == ["ok 🚀"]


def test_canary_transformers_assistant_mask_drops_the_end_of_a_split_character(base_tokenizer):
    # Why render.py takes {% generation %} blocks as characters: transformers 5.23 maps a block's end with
    # char_to_token(end - 1), so the last bytes of "🚀" fall outside the mask (fixed in 5.24). When this
    # skips, the workaround in render._marker_spans can be reconsidered.
    tok = with_template(base_tokenizer, CONTENT_ONLY_GENERATION)
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "ok 🚀"}]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    still_broken(decode(tok, marked) != "ok 🚀", "transformers",
                 "assistant_masks now cover a {% generation %} block that ends inside a multi-token character")


def test_generation_markers_decide_the_trained_span(base_tokenizer):
    # markers around the content only: the template says <|im_end|> is not generated, and that is followed
    tok = with_template(base_tokenizer, CONTENT_ONLY_GENERATION)
    (seq,) = render_example({"messages": conversation(system=False)}, tok)
    assert [t for _, t in trained_runs(tok, seq)] == ["Paris, naïve 日本語 🚀", "Tokyo. Ελληνικά"]
    # markers that take in the role header do not start where the prompt ends: refused
    with_header = CHATML_GENERATION.replace(
        "{{- '<|im_start|>assistant\\n' }}{% generation %}", "{% generation %}{{- '<|im_start|>assistant\\n' }}")
    with pytest.raises(TemplateError, match="generation"):
        render_example({"messages": conversation(system=False)}, with_template(base_tokenizer, with_header))


# ------------------------------------------------------------------------------------------- refusals


def test_template_that_raises_gives_template_error(chat_tokenizer, tokenizer_with_template):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(TemplateError) as info:
        render_example({"messages": messages}, tokenizer_with_template("chatml"))
    assert "Conversation roles must alternate" in info.value.problems[0].message
    assert info.value.problems[0].hint
    two_calls = {"tools": TOOLS, "messages": [{"role": "user", "content": "Paris and Rome?"}, {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{k}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            for k in range(2)]}]}
    with pytest.raises(TemplateError, match="only supports single tool-calls"):
        render_example(two_calls, tokenizer_with_template("llama-3.1-tools-json"))


def test_refusals_name_the_place(base_tokenizer, chat_tokenizer):
    with pytest.raises(TemplateError, match="starts with an assistant message") as info:
        render_example({"messages": [{"role": "assistant", "content": "hi"}]}, chat_tokenizer)
    assert info.value.problems[0].where == "messages[0]"
    bad_args = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}
    with pytest.raises(TemplateError) as info:
        render_example(bad_args, chat_tokenizer)
    assert info.value.problems[0].where == "messages[1].tool_calls[0].function.arguments"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(TemplateError) as info:
        render_example(image, chat_tokenizer)
    assert info.value.problems[0].where == "messages[0].content[0]"
    with pytest.raises(TemplateError, match="no chat template"):
        render_example({"messages": [{"role": "user", "content": "x"}]}, base_tokenizer)
    # a generation prompt that is not how the template starts assistant turns
    bot = chatml_template().replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(TemplateError, match="generation prompt") as info:
        render_example({"messages": conversation(system=False)}, with_template(base_tokenizer, bot))
    assert info.value.problems[0].where == "messages[1]"
    # a template that does not write the assistant content
    hidden = chatml_template().replace("message['content']", "(message['content'] if message['role'] != "
                                                             "'assistant' else '[hidden]')")
    with pytest.raises(TemplateError, match="does not render this content") as info:
        render_example({"messages": conversation(system=False)}, with_template(base_tokenizer, hidden))
    assert info.value.problems[0].where == "messages[1].content"


def test_tokens_merging_across_the_reply_edge_are_refused(base_tokenizer):
    # The generation prompt ends in a space: alone it is tokenized ":", " ", but in "assistant: ok" the space
    # belongs to " ok". The reply's tokens cannot be both, so the example is refused.
    template = ("{%- for m in messages %}{{- m.role + ': ' + m.content + '\\n' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    tok = with_template(base_tokenizer, template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert encode(tok, "user: hi\nassistant: ") + encode(tok, "ok") != encode(tok, "user: hi\nassistant: ok")
    with pytest.raises(TemplateError, match="do not add up") as info:
        render_example({"messages": messages}, tok)
    assert info.value.problems[0].where == "messages[1]"
    messages[1]["content"] = "\nok"  # a newline is a token on its own: the pieces add up
    (seq,) = render_example({"messages": messages}, tok)
    assert [t for _, t in trained_runs(tok, seq)] == ["\nok"]  # no end-of-turn marker in this template


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, word-start marker on the first word only), like Llama 2's."""
    from conftest import SPECIAL_TOKENS, corpus_lines
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(corpus_lines(), trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {"<s>", "</s>", "<unk>", "<pad>"}])


@pytest.mark.parametrize("name", ["chatml", "llama-2-chat", "mistral-instruct", "vicuna"])
def test_sentencepiece_style_tokenizer_pieces_add_up(name, metaspace_tokenizer):
    tok = copy.deepcopy(metaspace_tokenizer)
    tok.chat_template = shared_template(name)
    # on its own a reply would start with a word-start marker that it does not have mid-conversation
    assert tok.tokenize("Paris")[0].startswith("▁") and "▁Paris" not in "".join(tok.tokenize("\nParis"))[:7]
    messages = [{"role": "user", "content": "the city of light café"}, {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "and the other one"}, {"role": "assistant", "content": "London is"}]
    (seq,) = render_example({"messages": messages}, tok)
    assert seq.input_ids == encode(tok, tok.apply_chat_template(messages, tokenize=False))
    runs = trained_runs(tok, seq)
    for (start, _), i in zip(runs, (1, 3), strict=True):
        # the Metaspace decoder drops a leading space; the tokens themselves show it
        end = next(k for k in range(start, len(seq) + 1) if k == len(seq) or seq.labels[k] == IGNORE)
        pieces = tok.convert_ids_to_tokens(seq.input_ids[start:end])
        check_reply(name, "".join(pieces).replace("▁", " "), messages[i]["content"])
        assert seq.input_ids[:start] == render_prompt(messages[:i], tok)


# ------------------------------------------------------------------------------------- property test

PROPERTY_TEMPLATES = [n for n in ("chatml", "gemma-it", "hermes-tools", "llama-2-chat", "llama-3-instruct",
                                  "phi-3", "qwen2.5-instruct", "vicuna", "zephyr") if n in shared_template_names()]
_tokenizers: dict[str, object] = {}

words = st.text(alphabet=st.sampled_from(list("abcdefghij KLMN,.?!0123") + ["é", "ñ", "日", "本", "😀", "→", "Ω", "\n"]),
                min_size=1, max_size=24)
content = words.map(str.strip).filter(bool)
turn = st.tuples(content, content, st.sampled_from([0, 1]))


@pytest.mark.skipif(not PROPERTY_TEMPLATES, reason="../shared is absent")
@pytest.mark.parametrize("name", PROPERTY_TEMPLATES or ["none"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), content), turns=st.lists(turn, min_size=1, max_size=4))
def test_property_trained_tokens_are_the_weighted_replies(name, system, turns, base_tokenizer):
    if name not in _tokenizers:
        _tokenizers[name] = with_template(base_tokenizer, shared_template(name))
    tok = _tokenizers[name]
    messages = [{"role": "system", "content": system}] if system else []
    for user, reply, weight in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply, "weight": weight}]
    seqs = render_example({"messages": messages}, tok, unstable_template="error")
    assert len(seqs) == 1
    texts = [text for _, text in trained_runs(tok, seqs[0])]
    weighted = [m["content"] for m in messages if m["role"] == "assistant" and m["weight"]]
    assert len(texts) == len(weighted)  # weight-0 replies are never trained
    for text, reply in zip(texts, weighted, strict=True):
        check_reply(name, text, reply)


# ------------------------------------------------------------------------------ other formats, helpers


def test_detect_format():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"text": "a"}) == "text"
    with pytest.raises(DataError, match="unknown example format"):
        detect_format({"prompt": "a"})


def test_completion_trains_the_completion_and_eos(chat_tokenizer):
    tok = chat_tokenizer
    (seq,) = render_example({"prompt": "Question: capital of France?\nAnswer:", "completion": " Paris"}, tok)
    prompt_ids = encode(tok, "Question: capital of France?\nAnswer:")
    assert seq.input_ids == prompt_ids + encode(tok, " Paris") + [tok.eos_token_id]
    assert [t for _, t in trained_runs(tok, seq)] == [" Paris</s>"]
    assert render_prompt({"prompt": "Question: capital of France?\nAnswer:", "completion": " Paris"}, tok) == prompt_ids
    # eos already there is not doubled; a prompt ending in a space keeps its own tokens before the completion
    (seq,) = render_example({"prompt": "Answer: ", "completion": "Paris</s>"}, tok)
    assert seq.input_ids[: len(encode(tok, "Answer: "))] == encode(tok, "Answer: ")
    assert [t for _, t in trained_runs(tok, seq)] == ["Paris</s>"]


def test_text_trains_every_token_with_bos_when_the_tokenizer_adds_it(chat_tokenizer):
    from tokenizers import processors

    (seq,) = render_example({"text": "flour sugar 日本語"}, chat_tokenizer)
    assert seq.input_ids == encode(chat_tokenizer, "flour sugar 日本語") + [chat_tokenizer.eos_token_id]
    assert seq.labels == seq.input_ids
    with_bos = copy.deepcopy(chat_tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", with_bos.bos_token_id)])
    (seq,) = render_example({"text": "flour sugar"}, with_bos)
    assert seq.input_ids[0] == with_bos.bos_token_id and seq.input_ids[-1] == with_bos.eos_token_id
    with pytest.raises(DataError):
        render_example({"text": 3}, chat_tokenizer)


def test_render_prompt_is_what_training_puts_before_the_last_reply(chat_tokenizer):
    messages = conversation(system=True)
    (seq,) = render_example({"messages": messages}, chat_tokenizer)
    start = trained_runs(chat_tokenizer, seq)[-1][0]
    assert render_prompt({"messages": messages}, chat_tokenizer) == seq.input_ids[:start]
    assert render_prompt_text(messages, chat_tokenizer).endswith("<|im_start|>assistant\n")
    with pytest.raises(TemplateError):
        render_prompt({"text": "abc"}, chat_tokenizer)


@pytest.mark.parametrize("name,marker", [("chatml", "<|im_end|>"), ("llama-3-instruct", "<|eot_id|>"),
                                         ("gemma-it", "<end_of_turn>"), ("phi-3", "<|end|>"), ("zephyr", None),
                                         ("llama-2-chat", None)])
def test_end_of_turn_ids_come_from_the_template(name, marker, tokenizer_with_template):
    tok = tokenizer_with_template(name)
    expected = ([tok.convert_tokens_to_ids(marker)] if marker else []) + [tok.eos_token_id]
    assert end_of_turn_ids(tok) == expected


def test_end_of_turn_ids_without_template(base_tokenizer):
    assert end_of_turn_ids(base_tokenizer) == [base_tokenizer.eos_token_id]
