"""Run llama.cpp's own HF -> GGUF converter on a merged model dir (a separate process, started by export).

    python -m tunekit.export.gguf_convert LLAMA_CPP_DIR check MODEL_DIR
    python -m tunekit.export.gguf_convert LLAMA_CPP_DIR convert MODEL_DIR OUTFILE QUANT [PRE]

LLAMA_CPP_DIR is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/). It runs in its own
process because the converter puts its gguf-py on sys.path and keeps state in class attributes.

`check` prints one JSON line: {"architecture", "supported", "pre"}; "pre" is the pre-tokenizer name llama.cpp
recognises the tokenizer as (from its table of tokenizer hashes), or null when it does not know it. Only
config.json and the tokenizer files are read, no weights.

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


def check(llama_cpp: Path, model_dir: Path) -> dict:
    _, conversion = _import_converter(llama_cpp)
    arch, model_class = _model_class(conversion, model_dir)
    if model_class is None:
        return {"architecture": arch, "supported": False, "pre": None}
    pre = _known_pre(model_class, model_dir) if (model_dir / "tokenizer.json").is_file() else None
    return {"architecture": arch, "supported": True, "pre": pre}


def convert(llama_cpp: Path, model_dir: Path, outfile: Path, quant: str, pre: str | None) -> None:
    import torch

    gguf, conversion = _import_converter(llama_cpp)
    arch, model_class = _model_class(conversion, model_dir)
    if model_class is None:
        raise SystemExit(f"llama.cpp's converter does not support the architecture {arch}")

    class Tagged(model_class):  # llama.cpp's documented extension point for unknown BPE tokenizers
        model_arch = model_class.model_arch  # every converter class must declare it in its own body

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                if pre is None:
                    raise
                return pre

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    logging.basicConfig(level=logging.WARNING)
    with torch.inference_mode():
        model = Tagged(model_dir, ftype, outfile, model_name=model_dir.name)
        model.write()


def main(argv: list[str]) -> None:
    llama_cpp, command, model_dir = Path(argv[0]), argv[1], Path(argv[2])
    if command == "check":
        sys.stdout.write(json.dumps(check(llama_cpp, model_dir)) + "\n")
    elif command == "convert":
        convert(llama_cpp, model_dir, Path(argv[3]), argv[4], argv[5] if len(argv) > 5 else None)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
