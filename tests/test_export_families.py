"""GGUF and Ollama export of every model family (tests/families.py): each family either converts, its GGUF run by
llama.cpp and compared with the merged model before the export is published, and gets a learned Ollama TEMPLATE;
or it is refused before any weight is merged, the refusal naming why.

Test ids carry the family: test_gguf_exported_and_verified[llama3], test_gguf_refused_needs_tokenizer_model[phi3],
test_gguf_refused_ignored_config[qwen3_moe], test_ollama_template_learned[qwen2], test_ollama_refused[gemma2]:
the (family, "gguf") and (family, "ollama") cells of docs/models.md come from them.

Each family is a tiny random-init model (hidden 64, 2 layers) fully fine-tuned for 2 steps on 16 quickstart
examples (a run dir as users export it), shared by the tests of the module. A family that converts is exported
once as `--format ollama` at f32: that writes the same verified .gguf as `--format gguf`, plus the Modelfile.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from families import FAMILIES, build_family
from go_template import go_render, ollama_data

from tunekit.config import config_from_dict
from tunekit.errors import TunekitError
from tunekit.export.export import export, missing_modules
from tunekit.export.gguf_verify import TOLERANCES
from tunekit.model import load_tokenizer
from tunekit.train.loop import train

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"

CONVERTS = ["llama3", "qwen2", "qwen3", "gemma3", "mistral", "mixtral"]
NEEDS_TOKENIZER_MODEL = ["gemma2", "phi3"]  # llama.cpp's converter reads a SentencePiece tokenizer.model
IGNORED_CONFIG = {"qwen3_moe": "norm_topk_prob"}  # false in transformers' Qwen3MoeConfig; llama.cpp normalises
assert sorted(CONVERTS + NEEDS_TOKENIZER_MODEL + list(IGNORED_CONFIG)) == sorted(FAMILIES)  # every family's outcome

pytestmark = pytest.mark.skipif(bool(missing_modules("gguf", "llama_cpp")),
                                reason="needs gguf and llama_cpp: pip install 'tunekit[gguf]' (CI installs it)")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:16]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def family_run(root, base_tokenizer):
    """family_run(name, **config overrides) -> the run dir of a 2-step full fine-tune of that family, made once."""
    runs: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        key = name + "".join(f"-{k}" for k in sorted(overrides))
        if key not in runs:
            base = build_family(name, root / f"base-{key}", base_tokenizer, **overrides)
            cfg = {"model": {"base": str(base), "dtype": "fp32"},
                   "data": {"train": str(root / "train.jsonl"), "max_len": 256, "num_workers": 1},
                   "method": "full",
                   "train": {"max_steps": 2, "epochs": 1, "lr": 4e-3, "batch_tokens": 1024, "warmup_ratio": 0.0,
                             "threads": 2, "device": "cpu", "log_every": 100},
                   "output": {"dir": str(root / f"run-{key}")}}
            runs[key] = train(config_from_dict(cfg, base_dir=root)).run_dir
        return runs[key]

    return make


@pytest.fixture(scope="module")
def ollama_export(family_run, root):
    """ollama_export(name) -> the ExportResult of `--format ollama --quant f32` of the family's run, made once."""
    done = {}

    def make(name: str):
        if name not in done:
            done[name] = export(family_run(name), fmt="ollama", quant="f32", out=root / f"ollama-{name}")
        return done[name]

    return make


def _watch_no_weights(monkeypatch):
    """Fail if export loads any weights (the test watches; export itself runs unpatched)."""
    import tunekit.model

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(tunekit.model, "load_for_inference", no_loading)


def _refusal(run: Path, out: Path, monkeypatch, fmt: str = "gguf", **kwargs) -> str:
    _watch_no_weights(monkeypatch)
    with pytest.raises(TunekitError) as err:
        export(run, fmt=fmt, quant="f32", out=out, **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".tmp-{out.name}-*"))  # nothing half-written
    return " ".join(str(err.value).split())


# ------------------------------------------------------------------------------------ families that convert


@pytest.mark.parametrize("family", CONVERTS)
def test_gguf_exported_and_verified(family, ollama_export, matrix):
    """The GGUF is written, and before it was published its logits matched the merged model's on the run's own
    training examples: at f32 within the tolerance, greedy argmax equal at every position."""
    from gguf import GGUFReader

    result = ollama_export(family)
    gguf = result.out / f"run-{family}-f32.gguf"
    assert gguf.is_file() and f"run-{family}-f32.gguf" in result.files
    check = result.verification
    assert check is not None and check.quant == "f32" and check.ok, check
    assert check.sequences == 4 and check.positions > 4 * 32 and "train.jsonl" in check.source
    assert check.rel_rms <= TOLERANCES["f32"] and check.argmax_agree == 1.0, check.summary()
    assert any(n.startswith("verified: GGUF (f32)") and "greedy argmax agrees at 100.0%" in n
               for n in result.notes), result.notes
    assert not any("WARNING" in n for n in result.notes)
    types = {t.tensor_type.name for t in GGUFReader(str(gguf)).tensors}
    assert types == {"F32"}
    # the verification also tokenized the examples' text in llama.cpp: the run tokenizer's ids (the pre-tokenizer
    # llama.cpp was told is the right one)
    assert check.tokens_agree == check.sequences
    matrix(family, "gguf", "yes (verified: f32 argmax equal)")


@pytest.mark.parametrize("family", CONVERTS)
def test_ollama_template_learned(family, ollama_export, family_run, matrix):
    """The Modelfile's TEMPLATE, learned from the family's chat template and executed by Go's text/template as
    Ollama does, renders the run's prompts as the chat template does (with its generation prompt)."""
    from tunekit.export.gguf_run import llama_cpp_adds_bos
    from tunekit.export.ollama import learn

    result = ollama_export(family)
    assert sorted(result.files) == ["Modelfile", "README.md", f"run-{family}-f32.gguf"]
    tok = load_tokenizer(family_run(family) / "final")
    assert learn(tok)[0] is not None
    text = (result.out / "Modelfile").read_text(encoding="utf-8")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    prompts = [json.loads(line)["messages"][:-1]
               for line in (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    expected = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    got = go_render(template, [ollama_data(m) for m in prompts])
    if llama_cpp_adds_bos(result.out / f"run-{family}-f32.gguf") and tok.bos_token:
        got = [tok.bos_token + g if e.startswith(tok.bos_token) else g for g, e in zip(got, expected, strict=True)]
    assert got == expected
    renders = next(n for n in result.notes if n.startswith("the Ollama TEMPLATE renders "))
    assert renders.split()[4] == renders.split()[6], renders  # N of N prompts of the run's data alike
    matrix(family, "ollama", "yes (TEMPLATE learned)")


# ------------------------------------------------------------------------------- families that are refused


@pytest.mark.parametrize("family", NEEDS_TOKENIZER_MODEL)
def test_gguf_refused_needs_tokenizer_model(family, family_run, root, monkeypatch, matrix):
    """llama.cpp's converter builds these families' vocabulary from a SentencePiece tokenizer.model; the run's
    tokenizer (a tokenizer.json) has none: refused up front, by running the converter's own vocabulary step."""
    text = _refusal(family_run(family), root / f"gguf-{family}", monkeypatch)
    arch = {"gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}[family]
    assert f"llama.cpp's converter for {arch}" in text and "needs tokenizer.model (a SentencePiece model)" in text
    assert "use --format merged" in text
    assert "layer_types" not in text  # Gemma-2's default layer pattern is the one llama.cpp applies
    matrix(family, "gguf", "refused: llama.cpp's converter needs a SentencePiece tokenizer.model")


@pytest.mark.parametrize("family", list(IGNORED_CONFIG))
def test_gguf_refused_ignored_config(family, family_run, root, monkeypatch, matrix):
    """A config value llama.cpp ignores is refused up front, here through `tunekit export` (no traceback)."""
    from typer.testing import CliRunner

    from tunekit.cli import app

    _watch_no_weights(monkeypatch)
    out = root / f"gguf-{family}"
    done = CliRunner().invoke(app, ["export", str(family_run(family)), "--format", "gguf", "--quant", "f32",
                                    "--out", str(out)])
    text = " ".join(done.output.split())  # rich wraps long lines
    assert done.exit_code == 1 and "Traceback" not in done.output and not out.exists()
    key = IGNORED_CONFIG[family]
    assert f"config.json {key}:" in text and f"config.json has {key} = false" in text
    assert "llama.cpp always renormalises the top-k router weights" in text and "--allow-mismatch" in text
    help_text = " ".join(CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "--allow-mismatch" in help_text
    matrix(family, "gguf", f"refused: llama.cpp ignores {key}: false (--allow-mismatch writes it)")


@pytest.mark.parametrize("family", NEEDS_TOKENIZER_MODEL + list(IGNORED_CONFIG))
def test_ollama_refused(family, family_run, root, monkeypatch, matrix):
    text = _refusal(family_run(family), root / f"ollama-refused-{family}", monkeypatch, fmt="ollama")
    assert "tokenizer.model" in text or IGNORED_CONFIG.get(family, "-") in text
    matrix(family, "ollama", "refused (as gguf)")


def test_gemma3_layer_types_llama_cpp_cannot_follow_are_refused(family_run, root, monkeypatch):
    """Gemma-3's default layer_types (every 6th layer full attention) is llama.cpp's fixed pattern, so the gemma3
    family converts; a layer_types that differs from it is refused, naming the key, its value and the pattern."""
    run = family_run("gemma3", layer_types=["full_attention", "full_attention"])
    text = _refusal(run, root / "gguf-gemma3-full", monkeypatch)
    assert 'config.json has layer_types = ["full_attention", "full_attention"]' in text
    assert "every 6th layer full attention" in text and "['sliding_attention', 'sliding_attention']" in text


# ------------------------------------------------------------------------- the verification after converting


def test_verification_refuses_a_gguf_that_differs_and_allow_mismatch_writes_it(family_run, root):
    """With the up-front check of ignored config values skipped (a private parameter, for this test), Qwen3-MoE
    with norm_topk_prob false converts, and the comparison of the written file refuses it, naming the numbers;
    nothing is published. allow_mismatch=True writes it, with the warnings and numbers in the notes."""
    run = family_run("qwen3_moe")
    out = root / "gguf-qwen3_moe-unchecked"
    with pytest.raises(TunekitError) as err:
        export(run, fmt="gguf", quant="f32", out=out, _known_mismatches=False)
    text = " ".join(str(err.value).split())
    assert "the GGUF does not answer like the trained model" in text and "(tolerance for f32: 2e-03)" in text
    assert "max abs logit diff" in text and "greedy argmax agrees at" in text and "--allow-mismatch" in text
    assert not out.exists() and not list(root.glob(".tmp-gguf-qwen3_moe-unchecked-*"))

    result = export(run, fmt="gguf", quant="f32", out=out, allow_mismatch=True)
    assert sorted(result.files) == ["README.md", "run-qwen3_moe-f32.gguf"]
    check = result.verification
    assert not check.ok and check.rel_rms > 5 * TOLERANCES["f32"], check  # measured: 4e-2 at random init
    warnings = [n for n in result.notes if n.startswith("WARNING (--allow-mismatch)")]
    assert len(warnings) == 2, result.notes  # the known ignored key, then the measured difference
    assert "norm_topk_prob = false" in warnings[0] and check.summary() in warnings[1]
