"""Rendering once gives exactly what prefix rendering gives, on every shared template and on random chats.

`render_example(method="prefix")` is the reference; `_render_chat_fast` is the single-render path, which
returns None where it cannot prove its answer (render_example then renders by prefixes).
"""

from __future__ import annotations

import pytest
from conftest import shared_template, shared_template_names, with_template
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunekit.data import render
from tunekit.data.render import prepare_chat, render_example
from tunekit.errors import TemplateError

NAMES = shared_template_names() or [pytest.param("none", marks=pytest.mark.skip(reason="../shared is absent"))]
# Drops the system message: refused (by prefix rendering, which gives the error).
NO_LAYOUT_WITH_SYSTEM = {"mistral-tools"}
# Fold the system message into the first user turn: the first two messages are rendered together.
FOLDS_SYSTEM = {"gemma-it", "llama-2-chat"}


def fast(example: dict, tok):
    return render._render_chat_fast(tok, tok.chat_template, prepare_chat(example))


def outcome(example: dict, tok, method: str, unstable: str = "split"):
    """(input_ids, labels, source) per sequence, or the problems of the TemplateError raised."""
    try:
        return [(s.input_ids, s.labels, s.source) for s in
                render_example(example, tok, method=method, unstable_template=unstable)]
    except TemplateError as exc:
        return [(p.where, p.message) for p in exc.problems]


def chat(system: bool, weights=(1, 1, 1)) -> dict:
    messages = [{"role": "system", "content": " Be brief.  café\n"}] if system else []
    for k, weight in enumerate(weights):
        messages += [{"role": "user", "content": f"question {k}: naïve 日本語 ?"},
                     {"role": "assistant", "content": f"answer {k} 🚀 Ελληνικά", "weight": weight}]
    return {"messages": messages}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("weights", [(1, 1, 1), (0, 1, 0), (0, 0, 0)])
def test_every_shared_template_renders_once_with_the_prefix_answer(name, system, weights, base_tokenizer):
    tok = with_template(base_tokenizer, shared_template(name))
    example = chat(system, weights)
    reference = outcome(example, tok, "prefix")
    assert outcome(example, tok, "auto") == reference
    if system and name in NO_LAYOUT_WITH_SYSTEM:
        return
    seq = fast(example, tok)
    assert seq is not None  # the single render is taken, not the fallback
    assert [(seq.input_ids, seq.labels, seq.source)] == reference
    layout = render._layout(tok, tok.chat_template, system)
    assert layout.rendered_head == (system and name in FOLDS_SYSTEM)


def test_templates_that_are_not_prefix_stable_keep_split_and_error(base_tokenizer):
    from test_render import QWEN3_STYLE

    tok = with_template(base_tokenizer, QWEN3_STYLE)
    example = {"messages": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
                            {"role": "user", "content": "times 2?"},
                            {"role": "assistant", "content": "<think>\ndouble\n</think>\n\n8"}]}
    assert fast(example, tok) is None  # the render drops earlier reasoning: not the layout's text
    split = outcome(example, tok, "auto")
    assert len(split) == 2 and split == outcome(example, tok, "prefix")
    assert outcome(example, tok, "auto", "error") == outcome(example, tok, "prefix", "error")
    assert "drops earlier reasoning" in outcome(example, tok, "auto", "error")[0][1]


def test_generation_marker_templates_agree(base_tokenizer):
    from test_render import CHATML_GENERATION, CONTENT_ONLY_GENERATION

    for template in (CHATML_GENERATION, CONTENT_ONLY_GENERATION):
        tok = with_template(base_tokenizer, template)
        example = chat(system=True, weights=(1, 0, 1))
        seq = fast(example, tok)
        assert seq is not None
        assert [(seq.input_ids, seq.labels, seq.source)] == outcome(example, tok, "prefix")


def test_tools_and_tool_calls_are_rendered_by_prefixes(base_tokenizer):
    from test_render import TOOLS

    tok = with_template(base_tokenizer, shared_template("qwen2.5-instruct"))
    example = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22 C"},
        {"role": "assistant", "content": "22 C."}]}
    assert fast(example, tok) is None
    assert outcome(example, tok, "auto") == outcome(example, tok, "prefix")


# ------------------------------------------------------------------------------------- property test

PROPERTY_TEMPLATES = [n for n in ("chatml", "gemma-it", "hermes-tools", "llama-2-chat", "llama-3-instruct",
                                  "mistral-instruct", "phi-3", "qwen2.5-instruct", "vicuna", "zephyr")
                      if n in shared_template_names()]
_tokenizers: dict[str, object] = {}
_taken: dict[str, int] = {}

text = st.lists(st.sampled_from(list("abcdefghij KLMN,.?!0123<>|/[]'") +
                               ["é", "ñ", "日", "😀", "→", "\n", "\t", "  ", "<|im_end|>", "</s>", "'s", " 're", "\n\n"]),
               max_size=30).map("".join)
turn = st.tuples(text, text, st.sampled_from([0, 1]))


@pytest.mark.skipif(not PROPERTY_TEMPLATES, reason="../shared is absent")
@pytest.mark.parametrize("name", PROPERTY_TEMPLATES or ["none"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), text), turns=st.lists(turn, min_size=1, max_size=5),
       extra=st.sampled_from([None, "user", "assistant"]))
def test_property_single_render_equals_prefix_rendering(name, system, turns, extra, base_tokenizer):
    if name not in _tokenizers:
        _tokenizers[name] = with_template(base_tokenizer, shared_template(name))
    tok = _tokenizers[name]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, reply, weight in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply, "weight": weight}]
    if extra:  # two messages of a role in a row: some templates raise, others render it
        messages.append({"role": extra, "content": "more"})
    example = {"messages": messages}
    assert outcome(example, tok, "auto") == outcome(example, tok, "prefix")
    seq = fast(example, tok)
    if seq is not None:
        _taken[name] = _taken.get(name, 0) + 1
        (reference,) = render_example(example, tok, method="prefix")
        assert (seq.input_ids, seq.labels, seq.source) == (reference.input_ids, reference.labels, reference.source)


@pytest.mark.skipif(not PROPERTY_TEMPLATES, reason="../shared is absent")
def test_property_test_took_the_single_render():
    # runs after the property test in file order: the comparisons above were not all fallbacks
    if not _taken:
        pytest.skip("the property test did not run in this session (e.g. deselected with -k)")
    assert all(_taken.get(n, 0) > 0 for n in PROPERTY_TEMPLATES), _taken


# A Llama 3 style pre-tokenizer (a Split regex, then bytes) on the same vocabulary: replies are read off the
# conversation's tokens there too (render._suffix_determined), and must still equal prefix rendering.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def with_pre_tokenizer(base_tokenizer, template: str, pre_tokenizer=None, normalizer=None):
    tok = with_template(base_tokenizer, template)
    if pre_tokenizer is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.backend_tokenizer.normalizer = normalizer
    return tok


def llama3_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def test_which_tokenizers_let_replies_be_read_off_the_conversation(base_tokenizer):
    from tokenizers import Regex, normalizers, pre_tokenizers

    def determined(pre=None, norm=None):
        return render._suffix_determined(with_pre_tokenizer(base_tokenizer, "", pre, norm).backend_tokenizer)

    assert determined() and determined(llama3_pre_tokenizer())
    assert not determined(pre_tokenizers.ByteLevel(add_prefix_space=True))  # a space before every segment
    assert not determined(pre_tokenizers.Metaspace())
    assert not determined(pre_tokenizers.Split(Regex(r"(?<=a)b|\w+"), behavior="isolated"))  # look-behind
    assert not determined(pre_tokenizers.Split(Regex(r"\b\w"), behavior="isolated"))  # word boundary
    assert not determined(pre_tokenizers.Split(Regex(r"\w+"), behavior="merged_with_next"))
    assert not determined(norm=normalizers.NFC())


@pytest.mark.skipif("chatml" not in PROPERTY_TEMPLATES, reason="../shared is absent")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), text), turns=st.lists(turn, min_size=1, max_size=5))
def test_property_llama3_pre_tokenizer_single_render_equals_prefix(system, turns, base_tokenizer):
    if "llama3-chatml" not in _tokenizers:
        _tokenizers["llama3-chatml"] = with_pre_tokenizer(base_tokenizer, shared_template("chatml"),
                                                          llama3_pre_tokenizer())
    tok = _tokenizers["llama3-chatml"]
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, reply, weight in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply, "weight": weight}]
    example = {"messages": messages}
    assert outcome(example, tok, "auto") == outcome(example, tok, "prefix")
    if fast(example, tok) is not None:
        _taken["llama3-chatml"] = _taken.get("llama3-chatml", 0) + 1


@pytest.mark.skipif("chatml" not in PROPERTY_TEMPLATES, reason="../shared is absent")
def test_llama3_property_test_took_the_single_render():
    if "llama3-chatml" not in _tokenizers:
        pytest.skip("the property test did not run in this session (e.g. deselected with -k)")
    assert _taken.get("llama3-chatml", 0) > 0, _taken


@pytest.mark.skipif("chatml" not in PROPERTY_TEMPLATES, reason="../shared is absent")
def test_added_tokens_that_take_in_their_neighbours_render_as_prefix_rendering_does(base_tokenizer):
    """An added token that strips the spaces around it (its text no longer the exact span of its token) inside
    a reply: the reply is not read off the conversation across it, and the answer stays prefix rendering's."""
    from tokenizers import AddedToken

    tok = with_template(base_tokenizer, shared_template("chatml"))
    tok.add_tokens([AddedToken("<mask>", lstrip=True, rstrip=True)])
    for reply in ("fill <mask> here", "  <mask>  ", "a\n<mask>\nb", "<mask>", "x <mask><|im_end|> y"):
        example = {"messages": [{"role": "user", "content": "q <mask> r"}, {"role": "assistant", "content": reply}]}
        assert outcome(example, tok, "auto") == outcome(example, tok, "prefix"), reply
