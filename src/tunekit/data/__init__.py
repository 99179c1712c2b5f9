"""Data: formats (OpenAI chat, prompt/completion, text), check, render + mask, pack.

The public functions are importable from here; each lives in its own module and is loaded on first use,
so `import tunekit.data` stays light.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "check_file": "tunekit.data.check",
    "recommended_epochs": "tunekit.data.check",
    "read_jsonl": "tunekit.data.formats",
    "load_examples": "tunekit.data.formats",
    "validate_record": "tunekit.data.formats",
    "convert_file": "tunekit.data.convert",
    "render_example": "tunekit.data.render",
    "render_prompt": "tunekit.data.render",
    "end_of_turn_ids": "tunekit.data.render",
    "preview_example": "tunekit.data.preview",
    "Sequence": "tunekit.data.types",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tunekit.data' has no attribute {name!r}")
