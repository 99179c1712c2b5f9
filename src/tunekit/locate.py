"""Where a model argument points: a local folder (made absolute) or a hub id, decided once, before anything loads.

A model argument (`model.base`, `tunekit serve MODEL`, `--model`) is a local path when that path exists
relative to the folder it is read against (a config file's folder, or the folder a command was run from);
it is then made absolute, so that a process started elsewhere (a fine-tuning job's worker) finds the same
folder. Anything else must look like a hub id (`name` or `org/name`), and the hub must be reachable or the
model already in the local hub cache: otherwise the argument fails at once, naming the path that was looked
for, instead of after a minute of network retries. When the hub cannot be reached, the hub libraries are put
in offline mode (`HF_HUB_OFFLINE=1`) so that cached hub models load without network attempts.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from tunekit.errors import Problem

# huggingface_hub's rule for repo ids: [org/]name of letters, digits, '-', '_', '.'; at most 96 characters
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
HUB_TIMEOUT_S = 3.0


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and not text.endswith(".")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the hub answers a TCP connection (HF_ENDPOINT or huggingface.co:443) within a few seconds;
    False in offline mode. Asked once per process."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local hub cache holds `repo_id`'s config.json or tokenizer_config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, name), str)
               for name in ("config.json", "tokenizer_config.json"))


def locate_model(text: str, relative_to: Path | None = None, *, field: str = "model") -> str | Problem:
    """The absolute path of a local model (or run) folder, the hub id itself, or a Problem saying why neither.

    `relative_to`: the folder a relative path is read against (default: the working directory)."""
    folder = (relative_to or Path.cwd()).absolute()
    local = Path(text).expanduser()
    candidate = local if local.is_absolute() else folder / local
    if candidate.exists():
        return str(candidate.resolve())
    where = (f"{candidate}" if local.is_absolute() else f"{candidate} ({text!r} relative to {folder})")
    if not is_hub_id(text):
        return Problem(field, f"no such model folder: {where}, and {text!r} is not a hub id either",
                       "give the path of a model dir or run dir (relative paths are read against "
                       f"{folder}), or a hub id like org/name")
    if hub_reachable():
        return text
    os.environ["HF_HUB_OFFLINE"] = "1"  # the hub libraries then fail at once instead of retrying for a minute
    if in_hub_cache(text):
        return text
    return Problem(field, f"no such model folder: {where}; as a hub id, {text!r} is not in the local hub cache "
                          "and the hub cannot be reached",
                   "give the path of a model dir or run dir (relative paths are read against "
                   f"{folder}), or download the hub model first")
