"""Run llama.cpp's own HF -> GGUF converter on a merged model dir (a separate process, started by export).

    python -m tunekit.export.gguf_convert LLAMA_CPP_DIR check MODEL_DIR
    python -m tunekit.export.gguf_convert LLAMA_CPP_DIR probe MODEL_DIR [PRE]
    python -m tunekit.export.gguf_convert LLAMA_CPP_DIR convert MODEL_DIR OUTFILE QUANT [PRE]

LLAMA_CPP_DIR is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/). It runs in its own
process because the converter puts its gguf-py on sys.path and keeps state in class attributes.

`check` and `probe` read config.json and the tokenizer files only (MODEL_DIR holds no weights) and print one
JSON line. `check`:
  architecture, supported: the config's architecture and whether the converter has a class for it;
  pre: the pre-tokenizer name llama.cpp recognises the tokenizer as (from its table of tokenizer hashes), or
       null when it does not know it.
`probe` (what export runs before any weight is merged), the same and:
  converter: the converter class's name;
  vocab: the converter's own `_set_vocab_*` methods the class's set_vocab called (e.g. _set_vocab_gpt2,
         _set_vocab_sentencepiece), and "get_vocab_base_pre -> 'PRE'" where PRE stood in for an unknown
         tokenizer hash; empty when set_vocab reads the files itself;
  error: null, or {step, type, message, missing} when the converter's metadata steps raised: `convert` would
         end in the same error, after converting every weight. `missing` is the file of MODEL_DIR the message
         names (e.g. tokenizer.model), or null;
  keys: the GGUF metadata keys those steps wrote (what the file will tell llama.cpp).
The metadata steps are the converter's own set_gguf_parameters() and set_vocab(), run on an instance of the
same class `convert` uses, built on the weightless MODEL_DIR, with PRE standing in for an unknown tokenizer hash
as in `convert`: no table of which family needs which files.

`convert` writes OUTFILE. llama.cpp identifies a BPE tokenizer's pre-tokenizer by hashing the tokens of a test
string and refuses hashes it has no entry for; its documented remedy is to extend `get_vocab_base_pre()`. PRE
(chosen by tunekit.export.export from tokenizer.json) is the answer given for a tokenizer the table does not know; a
tokenizer the table knows keeps llama.cpp's own answer. Nothing here imports tunekit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path


def _import_converter(llama_cpp: Path):
    if "NO_LOCAL_GGUF" not in os.environ:  # as convert_hf_to_gguf.py does: the gguf-py of the same tree
        sys.path.insert(0, str(llama_cpp / "gguf-py"))
    sys.path.insert(0, str(llama_cpp))
    import conversion
    import gguf

    return gguf, conversion


def _model_class(conversion, model_dir: Path):
    hparams = conversion.ModelBase.load_hparams(model_dir, False)
    arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    try:
        return arch, conversion.get_model_class(arch, mmproj=False)
    except NotImplementedError:
        return arch, None


def _known_pre(model_class, model_dir: Path) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, None when its hash table has no entry."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    probe = model_class.__new__(model_class)  # get_vocab_base_pre reads only the tokenizer
    logging.disable(logging.WARNING)  # the converter's banner for an unknown hash; the caller reports it
    try:
        return model_class.get_vocab_base_pre(probe, tokenizer)
    except NotImplementedError:
        return None
    finally:
        logging.disable(logging.NOTSET)


def _converter_class(model_class, pre: str | None, calls: list[str]):
    """The converter class `convert` and `check` both run: llama.cpp's own, answering `pre` for a BPE tokenizer
    its hash table does not know (llama.cpp's documented extension point), and recording in `calls` which of
    the converter's `_set_vocab_*` methods its set_vocab uses (and when it used `pre`)."""

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return super(cls, self).get_vocab_base_pre(tokenizer)
        except NotImplementedError:
            if pre is None:
                raise
            calls.append(f"get_vocab_base_pre -> {pre!r}")
            return pre

    def recording(name: str):
        def method(self, *args, **kwargs):
            calls.append(name)
            return getattr(super(cls, self), name)(*args, **kwargs)
        return method

    body = {"model_arch": model_class.model_arch,  # every converter class declares it in its own body
            "get_vocab_base_pre": get_vocab_base_pre}
    body.update({name: recording(name) for name in dir(model_class)
                 if name.startswith("_set_vocab_") and callable(getattr(model_class, name))})
    cls = type(model_class.__name__, (model_class,), body)
    return cls


def _missing_file(exc: Exception, model_dir: Path) -> str | None:
    """The file of `model_dir` an exception says is missing (FileNotFoundError, or a message naming a path in
    model_dir that does not exist), relative to model_dir."""
    names = [getattr(exc, "filename", None)] if isinstance(exc, FileNotFoundError) else []
    prefix = str(model_dir) + os.sep
    for word in str(exc).replace("'", " ").replace('"', " ").split():
        if word.startswith(prefix):
            names.append(word.rstrip(".,:;)"))
    for name in names:
        if name and str(name).startswith(prefix) and not Path(name).exists():
            return str(name)[len(prefix):]
    return None


def _metadata_steps(gguf, model_class, model_dir: Path, pre: str | None) -> dict:
    """The converter's set_gguf_parameters() and set_vocab() (what `convert` runs after the weights) on the
    weightless model_dir: the error they end in, the vocab methods used and the metadata keys written."""
    calls: list[str] = []
    cls = _converter_class(model_class, pre, calls)
    step, error, model = "init", None, None
    logging.disable(logging.WARNING)  # the converter's banners; the caller reports what matters
    try:
        model = cls(model_dir, gguf.LlamaFileType.ALL_F32, model_dir / "probe.gguf", dry_run=True)
        step = "set_gguf_parameters"
        model.set_gguf_parameters()
        step = "set_vocab"
        model.set_vocab()
    except Exception as exc:  # noqa: BLE001 - whatever the converter raises is what `convert` would end in
        message = " ".join(str(exc).replace(str(model_dir) + os.sep, "").split()) or type(exc).__name__
        error = {"step": step, "type": type(exc).__name__, "message": message[:400],
                 "missing": _missing_file(exc, model_dir)}
    finally:
        logging.disable(logging.NOTSET)
    keys = sorted({key for kv in model.gguf_writer.kv_data for key in kv}) if model is not None else []
    return {"vocab": calls, "error": error, "keys": keys}


def check(llama_cpp: Path, model_dir: Path) -> dict:
    _, conversion = _import_converter(llama_cpp)
    arch, model_class = _model_class(conversion, model_dir)
    if model_class is None:
        return {"architecture": arch, "supported": False, "pre": None}
    pre = _known_pre(model_class, model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return {"architecture": arch, "supported": True, "pre": pre}


def probe(llama_cpp: Path, model_dir: Path, pre: str | None = None) -> dict:
    gguf, conversion = _import_converter(llama_cpp)
    info = check(llama_cpp, model_dir)
    if not info["supported"]:
        return {**info, "converter": None, "vocab": [], "error": None, "keys": []}
    _, model_class = _model_class(conversion, model_dir)
    steps = _metadata_steps(gguf, model_class, model_dir, info["pre"] or pre)
    return {**info, "converter": model_class.__name__, **steps}


def convert(llama_cpp: Path, model_dir: Path, outfile: Path, quant: str, pre: str | None) -> None:
    import torch

    gguf, conversion = _import_converter(llama_cpp)
    arch, model_class = _model_class(conversion, model_dir)
    if model_class is None:
        raise SystemExit(f"llama.cpp's converter does not support the architecture {arch}")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    logging.basicConfig(level=logging.WARNING)
    with torch.inference_mode():
        model = _converter_class(model_class, pre, [])(model_dir, ftype, outfile, model_name=model_dir.name)
        model.write()


def main(argv: list[str]) -> None:
    llama_cpp, command, model_dir = Path(argv[0]), argv[1], Path(argv[2])
    if command == "check":
        sys.stdout.write(json.dumps(check(llama_cpp, model_dir)) + "\n")
    elif command == "probe":
        sys.stdout.write(json.dumps(probe(llama_cpp, model_dir, argv[3] if len(argv) > 3 else None)) + "\n")
    elif command == "convert":
        convert(llama_cpp, model_dir, Path(argv[3]), argv[4], argv[5] if len(argv) > 5 else None)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
