"""Export a run for the runtimes people deploy with: merged weights, the adapter, GGUF, an Ollama Modelfile.

    from tunekit.export.export import export
    result = export("runs/quickstart", fmt="gguf", quant="f16")

Every format is written into a temporary folder beside OUT and renamed into place when complete, so OUT is
either the whole export or absent. Everything that can be known without weights (the run, the checkpoint, the
format's options, the architecture and tokenizer for GGUF, the chat template's Ollama TEMPLATE, optional
dependencies, an existing OUT) is checked first and reported at once as a `TunekitError`. For GGUF that includes
running llama.cpp's converter on config.json and the tokenizer alone (the files its vocabulary step needs, e.g.
a SentencePiece tokenizer.model) and the config values llama.cpp is known to ignore.

- merged: the adapter folded into the base (QLoRA: into the dequantized 4-bit base the adapter was trained on),
  safetensors + tokenizer + chat template + generation_config.json whose eos_token_id lists the end-of-turn ids.
- adapter: the peft adapter, base_model_name_or_path set to the base a user can load (a hub id or a local dir).
- gguf: llama.cpp's converter run on the merged model (tunekit.export.gguf_convert), one .gguf file, verified
  against the merged model before it is published (tunekit.export.gguf_verify; `allow_mismatch` writes a file
  that fails the comparison, with a warning in the notes).
- ollama: the .gguf plus a Modelfile (TEMPLATE, stop parameters, SYSTEM) and the `ollama create` command.

GGUF needs llama.cpp's converter (convert_hf_to_gguf.py and its conversion/ and gguf-py/ folders). It ships in
the llama-cpp-python source distribution, not in its wheel. Looked up in this order: the `converter` argument
(`--converter DIR`), the TUNEKIT_LLAMA_CPP environment variable, the cache folder
($XDG_CACHE_HOME or ~/.cache)/tunekit/llama.cpp-<llama-cpp-python version>/; when none has it, the sdist of the
installed llama-cpp-python version is fetched once with `pip download` into that cache, so the converter and
the llama.cpp runtime come from the same llama.cpp commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.errors import Problem, TunekitError, install_command
from tunekit.export.card import write_model_card
from tunekit.export.ollama import modelfile, ollama_template
from tunekit.fsio import publish_dir

FORMATS = ("merged", "adapter", "gguf", "ollama")
DTYPES = ("auto", "fp32", "bf16", "fp16")
QUANTS = ("f32", "f16", "bf16", "q8_0")
INSTALL_GGUF = install_command("gguf")  # run from the tunekit clone
CONVERTER_ENV = "TUNEKIT_LLAMA_CPP"
_CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_MIB = 1024 * 1024

@dataclass
class ExportResult:
    out: Path
    fmt: str
    files: dict[str, int]  # file name (relative to out) -> size in bytes
    seconds: float
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. QLoRA dequantized)
    command: str | None = None  # the command that runs the export (ollama create ..., vllm serve ...)
    verification: object | None = None  # gguf / ollama: tunekit.export.gguf_verify.Verification of the file


@dataclass
class _Plan:
    """What to export, resolved and checked before any weight loads."""

    run_dir: Path
    weights: Path  # run/final or run/checkpoints/step-N
    checkpoint: str | None
    cfg: object  # tunekit.config.RunConfig of the run
    is_adapter: bool
    tokenizer_dir: Path  # folder with the run's tokenizer files
    base_dir: str  # the model the adapter goes on, as a user can load it (hub id or model dir)
    fmt: str
    out: Path
    dtype: str
    quant: str
    name: str
    converter: Path | None = None
    pre_tokenizer: str | None = None  # tag for an unknown BPE tokenizer (gguf)
    ollama: object | None = None  # tunekit.export.ollama.OllamaTemplate learned from the chat template (ollama)
    allow_mismatch: bool = False  # write a GGUF known or measured to differ from the model (with a warning)
    warnings: list[str] = field(default_factory=list)  # found while checking, for the notes
    verification: object | None = None  # tunekit.export.gguf_verify.Verification, once the GGUF is compared
    _tokenizer: object | None = None

    def tokenizer(self):
        """The run's tokenizer (from `tokenizer_dir`), loaded once per export."""
        if self._tokenizer is None:
            from tunekit.model import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_dir, where=str(self.tokenizer_dir))
        return self._tokenizer


# ----------------------------------------------------------------------------------------- public API


def export(run_dir: str | Path, *, fmt: str, out: str | Path | None = None, checkpoint: str | None = None,
           dtype: str = "auto", quant: str = "f16", name: str | None = None, overwrite: bool = False,
           converter: str | Path | None = None, allow_mismatch: bool = False,
           log: Callable[[str], None] | None = None, _known_mismatches: bool = True) -> ExportResult:
    """Export RUN_DIR (or one of its checkpoints) as `fmt` into `out` (default RUN_DIR/export/FMT).

    GGUF / Ollama: refused when llama.cpp cannot convert the model or is known to run it differently, and when
    the written GGUF's logits differ from the merged model's beyond what its quantisation explains;
    `allow_mismatch=True` writes it anyway, with a warning and the numbers in the notes. `_known_mismatches=False`
    (tests only) skips the up-front refusal of config values llama.cpp ignores, to exercise the comparison.
    """
    say = log or (lambda message: None)
    plan = plan_export(run_dir, fmt=fmt, out=out, checkpoint=checkpoint, dtype=dtype, quant=quant, name=name,
                       overwrite=overwrite, converter=converter, allow_mismatch=allow_mismatch, log=say,
                       _known_mismatches=_known_mismatches)
    start = time.perf_counter()
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{plan.out.name}-", dir=plan.out.parent))
    try:
        notes, command = _write(plan, tmp, say)
        write_model_card(plan, tmp, notes, base=_root_base(_run(plan)), run_base=_run(plan).cfg.model.base)
        publish_dir(tmp, plan.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {str(p.relative_to(plan.out)): p.stat().st_size for p in sorted(plan.out.rglob("*")) if p.is_file()}
    return ExportResult(plan.out, fmt, files, time.perf_counter() - start, notes, command, plan.verification)


def plan_export(run_dir: str | Path, *, fmt: str, out: str | Path | None = None, checkpoint: str | None = None,
                dtype: str = "auto", quant: str = "f16", name: str | None = None, overwrite: bool = False,
                converter: str | Path | None = None, allow_mismatch: bool = False,
                log: Callable[[str], None] | None = None, _known_mismatches: bool = True) -> _Plan:
    """Resolve and check everything about an export without loading weights; raise every problem at once."""
    from tunekit.model import ADAPTER_CONFIG, read_run_dir

    problems: list[Problem] = []
    if fmt not in FORMATS:
        problems.append(Problem("--format", f"unknown format {fmt!r}", "use " + ", ".join(FORMATS)))
    if dtype not in DTYPES:
        problems.append(Problem("--dtype", f"unknown dtype {dtype!r}", "use " + ", ".join(DTYPES)))
    if quant not in QUANTS:
        problems.append(Problem("--quant", f"unknown GGUF type {quant!r}", "use " + ", ".join(QUANTS)))

    run_path = Path(run_dir).expanduser()
    run = None
    if not run_path.is_dir():
        problems.append(Problem(str(run_path), "no such run directory", "give a tunekit run dir (config.yaml + final/)"))
    elif not (run_path / "config.yaml").is_file():
        problems.append(Problem(str(run_path), "not a tunekit run dir (no config.yaml)",
                                "give the folder named by output.dir of the training config"))
    else:
        try:
            run = read_run_dir(run_path)
        except TunekitError as exc:
            problems.extend(exc.problems)
    if run is None:
        raise TunekitError(problems, title="export")

    weights = run.final
    if checkpoint is not None:
        weights = _checkpoint_dir(run_path, checkpoint, problems)
    is_adapter = (weights / ADAPTER_CONFIG).is_file()
    if fmt == "adapter" and not is_adapter:
        problems.append(Problem(str(weights), f"this run trained all weights (method: {run.cfg.method}): there is "
                                              "no adapter to export", "use --format merged, gguf or ollama"))
    out_path = Path(out).expanduser() if out is not None else run_path / "export" / (
        fmt if checkpoint is None else f"{fmt}-{weights.name}")
    if out_path.exists() and not overwrite:
        problems.append(Problem(str(out_path), "already exists", "pass --overwrite to replace it, or choose --out"))
    tokenizer_dir = weights if (weights / "tokenizer_config.json").is_file() else run.final
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        problems.append(Problem(str(tokenizer_dir), "no tokenizer files in the run", "re-run training"))

    plan = _Plan(run_dir=run_path, weights=weights, checkpoint=checkpoint, cfg=run.cfg, is_adapter=is_adapter,
                 tokenizer_dir=tokenizer_dir, base_dir=_adapter_base_source(run) or "merged-base", fmt=fmt, out=out_path, dtype=dtype,
                 quant=quant, name=name or run_path.resolve().name, allow_mismatch=allow_mismatch)
    if problems:
        raise TunekitError(problems, title="export")

    if fmt in ("gguf", "ollama"):
        _check_gguf(plan, converter, problems, log or (lambda message: None), _known_mismatches)
    if fmt == "ollama":
        _check_ollama(plan, problems)
    if problems:
        raise TunekitError(problems, title="export")
    return plan


# ------------------------------------------------------------------------------------------ checks


def _checkpoint_dir(run_path: Path, checkpoint: str, problems: list[Problem]) -> Path:
    """run/checkpoints/step-NNNNNN for "step-N", "step-NNNNNN" or "N"."""
    ckpts = run_path / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-")) \
        if ckpts.is_dir() else []
    digits = checkpoint.removeprefix("step-")
    wanted = f"step-{int(digits):06d}" if digits.isdigit() else checkpoint
    if wanted not in names:
        problems.append(Problem("--checkpoint", f"no checkpoint {checkpoint!r} in {ckpts}",
                                "available: " + (", ".join(names) if names else "none (export final/ without "
                                                                                "--checkpoint)")))
    return ckpts / wanted


def _root_base(run) -> str:
    """The model at the bottom of a chain of runs (a hub id or a model dir)."""
    from tunekit.model import read_run_dir

    base = run.cfg.model.base
    while (prev := read_run_dir(base)) is not None:
        base = prev.cfg.model.base
    return base


def _adapter_base_source(run) -> str | None:
    """The loadable model (hub id or dir) the run's adapter sits on, or None when that model exists only as
    an earlier run's adapter merged into its base (model.previous_adapter: merge)."""
    from tunekit.model import continues_adapter, read_run_dir

    prev = read_run_dir(run.cfg.model.base)
    if prev is None:
        base = run.cfg.model.base
        return str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base
    if not prev.has_adapter:
        return str(prev.final.resolve())
    if continues_adapter(run.cfg, prev):
        return _adapter_base_source(prev)
    return None


def missing_modules(*modules: str) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _check_gguf(plan: _Plan, converter, problems: list[Problem], log, known_mismatches: bool = True) -> None:
    """What llama.cpp needs, checked on config.json and the run's tokenizer with no weights: the converter's own
    metadata steps (gguf_convert probe) and the config values its runtime ignores (gguf_verify)."""
    from tunekit.export.gguf_verify import ignored_by_llama_cpp

    missing = missing_modules("gguf", "llama_cpp")
    if missing:
        problems.append(Problem("--format " + plan.fmt, f"needs the optional packages {', '.join(missing)}",
                                f"install them (from the tunekit clone): {INSTALL_GGUF}"))
        return
    plan.converter = find_converter(converter, problems, log)
    if plan.converter is None:
        return
    from tunekit.model import config_source

    config_dir = Path(config_source(_run(plan).cfg.model.base))
    if (plan.weights / "config.json").is_file():  # a full fine-tune: the config its weights were saved with
        config_dir = plan.weights
    if not (config_dir / "config.json").is_file():
        problems.append(Problem("model.base", f"cannot read the architecture: no config.json in {config_dir}",
                                "GGUF export needs a local base model dir"))
        return
    tag, why = pre_tokenizer_tag(plan.tokenizer_dir / "tokenizer.json")
    with tempfile.TemporaryDirectory() as probe:  # config.json of the base + the run's tokenizer, no weights
        shutil.copy(config_dir / "config.json", Path(probe) / "config.json")
        for f in plan.tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
                shutil.copy(f, Path(probe) / f.name)
        info = _run_converter(plan.converter, "probe", probe, *([tag] if tag else []))
    arch = f"{info['architecture']} (llama.cpp's converter class {info.get('converter')})"
    if not info["supported"]:
        problems.append(Problem("model.base", f"llama.cpp's converter does not support the architecture "
                                              f"{info['architecture']}", "use --format merged (transformers, "
                                                                          "vLLM) for this model"))
        return
    error = info.get("error")
    used = f" (set_vocab -> {', '.join(info['vocab'])})" if info["vocab"] else ""
    if error and error["type"] == "NotImplementedError" and "pre-tokenizer" in error["message"]:
        problems.append(Problem(str(plan.tokenizer_dir / "tokenizer.json"),
                                f"llama.cpp does not recognise this BPE tokenizer and tunekit cannot map its "
                                f"pre-tokenizer to one llama.cpp implements: {why}",
                                "use --format merged, or a base model whose tokenizer llama.cpp knows"))
    elif error and error["missing"]:
        what = _CONVERTER_FILE_KINDS.get(error["missing"], "a file")
        problems.append(Problem(
            str(plan.tokenizer_dir), f"llama.cpp's converter for {arch} needs {error['missing']} ({what}), which "
                                     f"the run's tokenizer does not have: its {error['step']}{used} ends in "
                                     f"{error['type']}: {error['message']}",
            f"use --format merged (transformers, vLLM), or train from a base whose tokenizer folder has "
            f"{error['missing']} for llama.cpp"))
    elif error:
        problems.append(Problem("model.base", f"llama.cpp's converter for {arch} fails on this model's config "
                                              f"and tokenizer, before any weight: its {error['step']}{used} ends "
                                              f"in {error['type']}: {error['message']}",
                                "use --format merged (transformers, vLLM) for this model"))
    elif any(call.startswith("get_vocab_base_pre") for call in info["vocab"]):
        plan.pre_tokenizer = tag
        log(f"llama.cpp does not know this tokenizer by hash; its pre-tokenizer is {why}: tagged {tag!r}")
    config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    for key, value, instead in ignored_by_llama_cpp(config, info.get("keys") or []) if known_mismatches else []:
        text = (f"{info['architecture']}: config.json has {key} = {json.dumps(value)}; {instead}. The GGUF would "
                f"answer differently from the trained model")
        if plan.allow_mismatch:
            plan.warnings.append(f"WARNING (--allow-mismatch): {text}")
            log(plan.warnings[-1])
        else:
            problems.append(Problem(str(config_dir / "config.json") + f" {key}", text,
                                    "use --format merged (transformers, vLLM serve it as trained), or pass "
                                    "--allow-mismatch to write the GGUF anyway"))


# What a file the converter asks for is, for the refusal (the converter's message names only the path).
_CONVERTER_FILE_KINDS = {"tokenizer.model": "a SentencePiece model", "tokenizer.json": "a tokenizers file",
                         "vocab.json": "a BPE vocabulary", "merges.txt": "BPE merges"}


# Split regexes of tokenizer.json that llama.cpp implements as a named pre-tokenizer: llama.cpp's C++ table
# (src/llama-vocab.cpp of the llama.cpp in llama-cpp-python 0.3.36, each quoted there as the "original regex from
# tokenizer.json"), which no Python code of the converter exposes. Qwen2's, for one, is what transformers 5's
# Qwen2Tokenizer gives any tokenizer loaded for a qwen2 model, whatever its tokenizer.json said.
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


def pre_tokenizer_tag(tokenizer_json: Path) -> tuple[str | None, str]:
    """(llama.cpp pre-tokenizer name, description) from a tokenizer.json, or (None, why not).

    GPT-2's pre-tokenizer is ByteLevel with its built-in regex: a BPE tokenizer with exactly that (no
    normalizer, no prefix space) splits text the way llama.cpp's "gpt-2" pre-tokenizer does. A Split by one of
    the regexes llama.cpp implements (_SPLIT_REGEXES) followed by ByteLevel without its regex splits text the way
    that llama.cpp pre-tokenizer does; Qwen2's NFC normalizer is allowed with it, as llama.cpp's own Qwen2 GGUFs
    allow it (llama.cpp does not normalise: text not in NFC may tokenize differently).
    """
    if not tokenizer_json.is_file():
        return None, "there is no tokenizer.json"
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE":
        return None, f"the tokenizer model is {model.get('type')!r}, not BPE"
    steps = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
        split, byte_level = steps
        tag = _SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex"))
        if tag is not None and split.get("behavior") == "Isolated" and not split.get("invert") \
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space", False) \
                and (norm is None or (tag == "qwen2" and norm.get("type") == "NFC")):
            return tag, f"a Split by llama.cpp's {tag!r} regex, then ByteLevel" + (
                " (its NFC normalizer is not applied by llama.cpp)" if norm else "")
    if norm is not None:
        return None, f"it has a normalizer ({norm.get('type')})"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2", "ByteLevel with the GPT-2 regex"
    return None, f"pre-tokenizer {json.dumps(pre)[:160]}"


def _check_ollama(plan: _Plan, problems: list[Problem]) -> None:
    from tunekit.export.ollama import learn

    plan.ollama, why = learn(plan.tokenizer())
    if plan.ollama is None:
        problems.append(Problem(str(plan.tokenizer_dir), f"the chat template cannot be written as an Ollama "
                                                         f"TEMPLATE: {why}",
                                "use --format gguf and write the Modelfile TEMPLATE yourself"))


# ------------------------------------------------------------------------------------- the converter


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunekit"


def _is_llama_cpp_tree(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "conversion").is_dir()


def find_converter(explicit: str | Path | None, problems: list[Problem], log) -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py (see module doc for the order)."""
    from importlib.metadata import PackageNotFoundError, version

    given = explicit or os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given).expanduser()
        path = path.parent if path.name == "convert_hf_to_gguf.py" else path
        if _is_llama_cpp_tree(path):
            return path
        where = "--converter" if explicit else CONVERTER_ENV
        problems.append(Problem(where, f"{path} holds no convert_hf_to_gguf.py with its conversion/ folder",
                                "give a llama.cpp source tree (git clone or llama-cpp-python's "
                                "vendor/llama.cpp)"))
        return None
    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        problems.append(Problem("--format gguf", "llama-cpp-python is not installed",
                                f"install it (from the tunekit clone): {INSTALL_GGUF}"))
        return None
    cached = _cache_dir() / f"llama.cpp-{llama_version}"
    if _is_llama_cpp_tree(cached):
        return cached
    log(f"fetching llama.cpp's converter (llama-cpp-python {llama_version} source) into {cached}")
    try:
        _fetch_converter(llama_version, cached)
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        problems.append(Problem("--converter", f"cannot fetch llama-cpp-python {llama_version}'s source to get "
                                               f"convert_hf_to_gguf.py: {exc}",
                                f"download a llama.cpp source tree and pass --converter DIR (or set "
                                f"{CONVERTER_ENV})"))
        return None
    return cached


def _fetch_converter(llama_version: str, dest: Path) -> None:
    """`pip download` the llama-cpp-python sdist and keep the converter's files from its vendor/llama.cpp."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_version}", "-d", tmp], check=True, capture_output=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        tree = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 1)
                inner = parts[1] if len(parts) > 1 else ""
                if not inner.startswith("vendor/llama.cpp/"):
                    continue
                rel = inner.removeprefix("vendor/llama.cpp/")
                if not any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in _CONVERTER_FILES):
                    continue
                if member.isfile():
                    target = tree / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        if not _is_llama_cpp_tree(tree):
            raise OSError(f"{sdist.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(tree, dest)


def _run_converter(llama_cpp: Path, *args: str) -> dict | None:
    cmd = [sys.executable, "-m", "tunekit.export.gguf_convert", str(llama_cpp), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        raise TunekitError(Problem("llama.cpp converter", f"failed ({' '.join(args[:1])}): {tail}",
                                   "see the message above; --format merged does not need llama.cpp"),
                           title="export")
    return json.loads(done.stdout.strip().splitlines()[-1]) if args[0] in ("check", "probe") else None


# -------------------------------------------------------------------------------------------- writing


def _write(plan: _Plan, tmp: Path, say) -> tuple[list[str], str | None]:
    if plan.fmt == "adapter":
        return _write_adapter(plan, tmp, say)
    if plan.fmt == "merged":
        notes = _write_merged(plan, tmp, say)
        return notes, f"vllm serve {plan.out}"
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".merged-") as merged:
        notes = list(plan.warnings) + _write_merged(plan, Path(merged), say, dtype="fp32")
        gguf_name = f"{plan.name}-{plan.quant}.gguf"
        say(f"converting to GGUF ({plan.quant}) with llama.cpp's converter")
        _run_converter(plan.converter, "convert", merged, str(tmp / gguf_name), plan.quant,
                       *([plan.pre_tokenizer] if plan.pre_tokenizer else []))
        notes.append(_verify(plan, tmp / gguf_name, Path(merged), say))
    if plan.pre_tokenizer:
        notes.append(f"llama.cpp does not know the tokenizer by hash; its pre-tokenizer was tagged "
                     f"{plan.pre_tokenizer!r} from tokenizer.json")
    if plan.fmt == "gguf":
        return notes, f"llama-cli -m {plan.out / gguf_name} -cnv"
    template, more = ollama_template(plan, tmp / gguf_name)
    notes += more
    (tmp / "Modelfile").write_text(modelfile(plan, gguf_name, template), encoding="utf-8")
    return notes, f"ollama create {plan.name} -f {plan.out / 'Modelfile'}"


def _verify(plan: _Plan, gguf: Path, merged: Path, say) -> str:
    """Run the written GGUF and the merged model on the run's data; refuse (or, allow_mismatch, warn) when their
    logits differ beyond the GGUF type's tolerance. Returns the note with the numbers."""
    from tunekit.export.gguf_verify import verification_sequences, verify_gguf

    say("verifying the GGUF: llama.cpp's logits against the merged model's on the run's data")
    sequences, source = verification_sequences(plan.cfg, plan.tokenizer())
    workdir = merged / ".llama-cpp-logits"
    workdir.mkdir()
    result = plan.verification = verify_gguf(gguf, merged, sequences, plan.tokenizer(), plan.quant, workdir,
                                             source)
    if result.ok:
        return f"verified: {result.summary()}"
    text = (f"the GGUF does not answer like the trained model: {result.summary()}: more than {plan.quant} "
            f"quantisation explains")
    if not plan.allow_mismatch:
        raise TunekitError(Problem(f"--format {plan.fmt}", text,
                                   "use --format merged (transformers, vLLM), another --quant, or pass "
                                   "--allow-mismatch to write it anyway"), title="export")
    say(f"WARNING (--allow-mismatch): {text}")
    return f"WARNING (--allow-mismatch): {text}"


def _torch_dtype(plan: _Plan, name: str):
    import torch

    if name == "auto":
        name = plan.cfg.model.dtype if plan.cfg.model.dtype != "auto" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_merged(plan: _Plan, say=lambda message: None):
    """(merged fp32 model, tokenizer, notes) for the plan's weights."""
    import torch

    from tunekit.model import load_for_inference

    notes = []
    if plan.is_adapter and plan.cfg.method == "qlora":
        model = _qlora_dequantized(plan)
        notes.append("QLoRA: the 4-bit base was dequantized (the weights the adapter was trained on) before "
                     "the adapter was merged into it")
        tokenizer = plan.tokenizer()
    else:
        model, tokenizer = load_for_inference(plan.weights)
        if plan.is_adapter:
            model = model.merge_and_unload()
            notes.append("the LoRA adapter was merged into the base weights in fp32")
    say("merged" if plan.is_adapter else "loaded full weights")
    return model.to(torch.float32).eval(), tokenizer, notes


def _qlora_dequantized(plan: _Plan):
    """The QLoRA run's model with the adapter merged into the dequantized 4-bit base.

    The base is loaded as the run trained it (bitsandbytes 4-bit), each Linear4bit's weight is dequantized into
    the same layer of a full-precision copy of the base, and the adapter is merged there in fp32.
    """
    import bitsandbytes as bnb
    import torch
    from peft import PeftModel

    from tunekit.model import adapter_base, read_run_dir, resolve_device

    run = read_run_dir(plan.run_dir)
    device = resolve_device("cpu")
    quantized = adapter_base(run, run.cfg, device, quantize=True)
    plain = adapter_base(run, run.cfg.model_copy(update={"method": "lora"}), device, quantize=False)
    plain_modules = dict(plain.named_modules())
    for module_name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain_modules[module_name].weight.data = weight.to(torch.float32).reshape(
                plain_modules[module_name].weight.shape)
    del quantized
    return PeftModel.from_pretrained(plain.to(torch.float32), str(plan.weights)).merge_and_unload()


def _write_merged(plan: _Plan, dest: Path, say, dtype: str | None = None) -> list[str]:
    import torch

    from tunekit.data.render import end_of_turn_ids

    model, tokenizer, notes = load_merged(plan, say)
    target = _torch_dtype(plan, dtype or plan.dtype)
    model = model.to(target)
    stop = end_of_turn_ids(tokenizer) if getattr(tokenizer, "chat_template", None) else []
    gen = model.generation_config
    gen.eos_token_id = stop or gen.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    model.config.use_cache = True
    with torch.no_grad():
        model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    if target != torch.float32:
        notes.append(f"weights saved as {str(target).removeprefix('torch.')} after merging in fp32")
    return notes


def _write_adapter(plan: _Plan, tmp: Path, say) -> tuple[list[str], str | None]:
    """The adapter files, tokenizer and template; base_model_name_or_path a user can resolve.

    A run whose base is an earlier run (an adapter on a merged adapter, or continued training) needs that
    earlier model underneath: it is written as merged weights into merged-base/ next to the adapter.
    """
    from tunekit.model import read_run_dir

    run = read_run_dir(plan.run_dir)
    notes = []
    for f in plan.weights.iterdir():
        if f.name.startswith("adapter_"):
            shutil.copy(f, tmp / f.name)
    plan.tokenizer().save_pretrained(str(tmp))
    resolved = _adapter_base_source(run)
    if resolved is None:
        from tunekit.model import adapter_base, resolve_device

        say("the adapter sits on an earlier run's merged adapter: writing that model into merged-base/")
        cfg = run.cfg.model_copy(update={"method": "lora"})
        under = adapter_base(run, cfg, resolve_device("cpu"), quantize=False)
        under.save_pretrained(str(tmp / "merged-base"), safe_serialization=True)
        plan.tokenizer().save_pretrained(str(tmp / "merged-base"))
        resolved = str(plan.out.resolve() / "merged-base")
        notes.append("the adapter was trained on an earlier run's adapter merged into its base: that model is "
                     "in merged-base/")
    config_path = tmp / "adapter_config.json"
    adapter_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_cfg["base_model_name_or_path"] = resolved
    config_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n", encoding="utf-8")
    plan.base_dir = resolved
    say(f"adapter written with base_model_name_or_path = {resolved}")
    return notes, f"vllm serve {resolved} --enable-lora --lora-modules {plan.name}={plan.out}"


def _run(plan: _Plan):
    from tunekit.model import read_run_dir

    return read_run_dir(plan.run_dir)
