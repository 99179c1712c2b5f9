"""The Ollama TEMPLATE learned from a chat template (tunekit.export.ollama): executed by Go's text/template, the engine
Ollama uses, it renders conversations exactly as the Jinja template does, for every shared template family it
accepts; templates it cannot translate are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from go_template import go_render, ollama_data

from tunekit.export.ollama import START, OllamaTemplate, learn, verify

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"

# Every shared template but one is translated; mistral-tools moves the system prompt into the last user turn.
TRANSLATED = ["chatml", "gemma-it", "hermes-tools", "llama-2-chat", "llama-3-instruct", "llama-3.1-tools-json",
              "mistral-instruct", "phi-3", "qwen2.5-instruct", "vicuna", "zephyr"]


def conversations() -> list[list[dict]]:
    """Prompts as Ollama gets them: quickstart validation prompts (with and without their system message) and
    longer multi-turn ones, with and without a system message."""
    lines = (QUICKSTART / "valid.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    quick = [json.loads(line)["messages"][:-1] for line in lines]
    turns = [{"role": r, "content": f"{r} says {i}: café, 3 eggs & \"quotes\" {{{{ braces }}}}"}
             for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    return quick + [[m for m in c if m["role"] != "system"] for c in quick] + [
        turns, [{"role": "system", "content": "Be brief."}] + turns, turns[:1]]


def render(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", TRANSLATED)
def test_go_renders_each_shared_family_like_its_jinja_template(name, tokenizer_with_template):
    tok = tokenizer_with_template(name)
    template, why = learn(tok)
    assert template is not None, why
    convs = [c for c in conversations() if c]
    expected = [render(tok, c) for c in convs]
    assert [template.render(c) for c in convs] == expected
    assert go_render(template.go_template(), [ollama_data(c) for c in convs]) == expected


def test_the_shipped_model_and_chatml_without_shared_files(chat_tokenizer):
    from transformers import AutoTokenizer

    tiny = AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "models" / "tiny-chat"))
    for tok in (tiny, chat_tokenizer):
        template, why = learn(tok)
        assert template is not None, why
        convs = conversations()
        assert go_render(template.go_template(), [ollama_data(c) for c in convs]) == [render(tok, c) for c in convs]


def test_a_default_system_prompt_is_kept_and_a_modelfile_system_replaces_it(tokenizer_with_template):
    """Qwen 2.5 writes its own system prompt when a conversation has none; the TEMPLATE does the same, and a
    Modelfile SYSTEM (inserted by Ollama as the first message) renders like that system message in Jinja."""
    tok = tokenizer_with_template("qwen2.5-instruct")
    template, _ = learn(tok)
    user = [{"role": "user", "content": "Hi"}]
    assert "You are Qwen" in template.render(user)
    sys = [{"role": "system", "content": "You are a recipe assistant."}]
    assert go_render(template.go_template(), [ollama_data(user), ollama_data(user, sys[0]["content"])]) == \
        [render(tok, user), render(tok, sys + user)]


def test_templates_that_cannot_be_translated_are_refused_with_the_reason(chat_tokenizer, tokenizer_with_template):
    import copy

    def with_template(source):
        tok = copy.deepcopy(chat_tokenizer)
        tok.chat_template = source
        return tok

    numbered = ("{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    shouting = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    cases = {
        numbered: "depends on more than the two roles",
        shouting: "does not write a system message's content once, as given",  # TkProbe0q -> TKPROBE0Q
        "{{ raise_exception('no') }}": "renders none of the probe conversations",
        shouting.replace("upper", "replace('you', 'thou')"): "changes the text of messages (conversation 1",
    }
    for source, reason in cases.items():
        template, why = learn(with_template(source))
        assert template is None and reason in why, (source, why)
    no_template = copy.deepcopy(chat_tokenizer)
    no_template.chat_template = None
    assert learn(no_template) == (None, "the tokenizer has no chat template")
    template, why = learn(tokenizer_with_template("mistral-tools"))
    assert "today's date" in " ".join(learn(tokenizer_with_template("llama-3.1-tools-json"))[0].notes)
    assert template is None and "system message" in why


def test_verify_names_what_renders_differently(tokenizer_with_template):
    """llama-3's template trims message text and Go's text/template cannot: verify reports such a prompt, and
    a role order the table has no text for."""
    tok = tokenizer_with_template("llama-3-instruct")
    template, _ = learn(tok)
    padded = [{"role": "user", "content": "  padded  "}]
    plain = [{"role": "user", "content": "plain"}]
    problems = verify(template, tok, [plain, padded])
    assert len(problems) == 1 and problems[0].startswith("conversation 2: renders differently from character")
    assert template.render([{"role": "assistant", "content": "first"}]) is None


def test_without_leading_cuts_a_bos_only_where_a_prompt_starts():
    table = {(START, "user"): "<s>[U]", ("user", "assistant"): "<s>[A]", ("user", "gen"): "[A]"}
    cut = OllamaTemplate(table).without_leading("<s>")
    assert cut.transitions == {(START, "user"): "[U]", ("user", "assistant"): "<s>[A]", ("user", "gen"): "[A]"}
    assert cut.render([{"role": "user", "content": "x"}]) == "[U]x[A]"
