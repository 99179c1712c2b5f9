from tunekit.data.preview import TRAINED_STYLE, preview_example, runs
from tunekit.data.render import render_example, template_warnings

EXAMPLE = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hi to café 😀"},
    {"role": "assistant", "content": "hi café 😀"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "not this one", "weight": 0},
]}


def test_runs_cover_the_sequence_in_order(chat_tokenizer):
    [sequence] = render_example(EXAMPLE, chat_tokenizer)
    pieces = runs(sequence)
    assert [t for _, ids in pieces for t in ids] == sequence.input_ids
    assert sum(len(ids) for trained, ids in pieces if trained) == sequence.num_trained
    assert all(a[0] != b[0] for a, b in zip(pieces, pieces[1:], strict=False))  # maximal runs


def test_preview_highlights_exactly_the_trained_reply(chat_tokenizer):
    preview = preview_example(EXAMPLE, chat_tokenizer)
    trained_text = "".join(preview.text.plain[span.start:span.end] for span in preview.text.spans
                           if span.style == TRAINED_STYLE)
    assert trained_text == "hi café 😀<|im_end|>"  # intact unicode; weight-0 reply and prompts not highlighted
    assert "not this one" in preview.text.plain and preview.sequences == 1
    assert preview.trained == len(chat_tokenizer("hi café 😀<|im_end|>", add_special_tokens=False)["input_ids"])


def test_whitespace_only_prompt_difference_is_reported(chat_tokenizer):
    import copy

    assert template_warnings(chat_tokenizer) == []
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = chat_tokenizer.chat_template.replace("'<|im_start|>assistant\\n'",
                                                             "'<|im_start|>assistant\\n\\n'")
    [warning] = template_warnings(tok)
    assert "whitespace" in warning


def test_preview_cli_shows_counts_and_names_bad_lines(tmp_path, chat_tokenizer):
    import json

    from typer.testing import CliRunner

    from tunekit.cli import app

    chat_tokenizer.save_pretrained(tmp_path / "tok")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(EXAMPLE) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "preview", str(good), "--model", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    assert f"{good}:1" in result.output and "trained" in result.output and "hi café 😀" in result.output

    bad = tmp_path / "bad.jsonl"  # an assistant turn first: no prompt to train it on
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "preview", str(bad), "--model", str(tmp_path / "tok")])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_preview_piped_to_a_file_keeps_the_trained_marking(tmp_path, chat_tokenizer):
    """Without a terminal there are no colours: the brackets alone say which tokens train."""
    import json
    import subprocess
    import sys

    chat_tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(EXAMPLE) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "tunekit.cli", "data", "preview", str(data), "--model",
                           str(tmp_path / "tok")], capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout  # piped: plain text
    assert "legend: ⟦trained⟧ not trained" in done.stdout
    assert "⟦hi café 😀<|im_end|>⟧" in done.stdout and "not this one<|im_end|>" in done.stdout
    assert done.stdout.count("⟦") == 2  # the legend and the one reply: weight 0 and prompts not marked


def test_a_preference_pair_shows_its_prompt_once_and_both_replies_marked(tmp_path, chat_tokenizer):
    """The marked tokens of each reply are exactly what the DPO loss reads (pair_sequences)."""
    import json

    from typer.testing import CliRunner

    from tunekit.cli import app
    from tunekit.data.preference import pair_sequences, render_pair
    from tunekit.data.preview import preview_pair

    record = {"input": {"messages": [{"role": "user", "content": "name a fruit"}]},
              "preferred_output": [{"role": "assistant", "content": "pear 🍐"}],
              "non_preferred_output": [{"role": "assistant", "content": "stone"}]}
    shown = preview_pair(record, chat_tokenizer)
    chosen, rejected = pair_sequences(render_pair(record, chat_tokenizer))
    assert (shown.trained, shown.tokens) == (chosen.num_trained + rejected.num_trained, len(chosen) + len(rejected))
    marked = [span.end - span.start for span in shown.text.spans if span.style == TRAINED_STYLE]
    assert len(marked) == 2 and shown.text.plain.count("name a fruit") == 1
    assert "⟦pear 🍐<|im_end|>⟧" in shown.text.plain and "⟦stone<|im_end|>⟧" in shown.text.plain

    chat_tokenizer.save_pretrained(tmp_path / "tok")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(record) + "\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["data", "preview", str(pairs), "--model", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    assert "preferred reply" in result.output and "non-preferred reply" in result.output
