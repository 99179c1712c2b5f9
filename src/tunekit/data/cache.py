"""On-disk cache of rendered data: each data file rendered once, reused by every later run that reads it.

An entry is a folder named by a key that hashes everything the rendered tokens depend on: the data file's
bytes, the tokenizer (its tokenizers JSON, special tokens, class), the chat template, the format options
(data.format, data.unstable_template), `render.RENDER_VERSION`, and today's date when the template reads the
clock (`strftime_now`). A changed file, tokenizer or template gives another key, so a stale entry is never
read; `tunekit data cache clear` removes old ones.

An entry holds numpy arrays, read back memory-mapped:

    ids.npy      int32 (T,)       every sequence's tokens, one after the other
    trained.npy  uint8 (T,)       1 where the token is trained (its label is the token itself), else 0
    offsets.npy  int64 (S + 1,)   sequence s is ids[offsets[s]:offsets[s + 1]]
    example.npy  int32 (S,)       the example (0-based, in file order) each sequence comes from
    meta.json    the data file, counts, the key's parts; sources.json: each sequence's line and source

Entries are written to a temporary folder beside the cache and renamed into place, so a reader sees a whole
entry or none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunekit.data.types import IGNORE, Sequence

ENV = "TUNEKIT_DATA_CACHE"  # overrides the default cache folder


def default_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tunekit" / "data"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides the tokens: the tokenizers JSON (vocabulary, merges, normalizer, added tokens,
    post-processor), the special tokens and the chat template."""
    from tunekit.data.render import RENDER_VERSION

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    template = tokenizer.chat_template
    digest.update(json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                              "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
                              "template": template, "render_version": RENDER_VERSION}, sort_keys=True,
                             default=str).encode())
    if "strftime_now" in json.dumps(template):  # the template writes today's date
        digest.update(datetime.date.today().isoformat().encode())
    return digest.hexdigest()


def cache_key(path: Path, tokenizer, fmt: str, unstable_template: str) -> tuple[str, dict]:
    parts = {"data_sha256": _file_digest(path), "tokenizer_sha256": tokenizer_digest(tokenizer), "format": fmt,
             "unstable_template": unstable_template}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return key, parts


@dataclass
class Entry:
    key: str
    path: Path
    meta: dict

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


def load(cache_dir: Path, key: str, data_file: Path) -> list[list[Sequence]] | None:
    """The cached examples (each a list of sequences) for `key`, or None when there is no whole entry."""
    folder = cache_dir / key
    if not (folder / "meta.json").is_file():
        return None
    ids = np.load(folder / "ids.npy", mmap_mode="r")
    trained = np.load(folder / "trained.npy", mmap_mode="r")
    offsets = np.load(folder / "offsets.npy")
    example = np.load(folder / "example.npy")
    sources = json.loads((folder / "sources.json").read_text())
    examples: list[list[Sequence]] = []
    for s, source in enumerate(sources):
        a, b = int(offsets[s]), int(offsets[s + 1])
        seq_ids = ids[a:b].tolist()
        labels = np.where(trained[a:b] != 0, ids[a:b], IGNORE).tolist()
        if int(example[s]) == len(examples):
            examples.append([])
        examples[-1].append(Sequence(seq_ids, labels, {"file": str(data_file), **source}))
    return examples


def store(cache_dir: Path, key: str, parts: dict, data_file: Path, examples: list[list[Sequence]]) -> Path:
    """Write the entry for `key` atomically (a temporary folder renamed into place); returns its folder."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    seqs = [(e, seq) for e, ex in enumerate(examples) for seq in ex]
    lengths = np.array([len(seq) for _, seq in seqs], dtype=np.int64)
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for _, seq in seqs for t in seq.input_ids), dtype=np.int32, count=int(offsets[-1]))
    trained = np.fromiter((label != IGNORE for _, seq in seqs for label in seq.labels), dtype=np.uint8,
                          count=int(offsets[-1]))
    sources = [{k: v for k, v in seq.source.items() if k != "file"} for _, seq in seqs]
    meta = {"data_file": str(data_file), "examples": len(examples), "sequences": len(seqs),
            "tokens": int(offsets[-1]), "trained_tokens": int(trained.sum()),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **parts}
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        np.save(tmp / "ids.npy", ids)
        np.save(tmp / "trained.npy", trained)
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "example.npy", np.array([e for e, _ in seqs], dtype=np.int32))
        (tmp / "sources.json").write_text(json.dumps(sources))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a whole entry
        target = cache_dir / key
        if target.is_dir() and not (target / "meta.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # a folder left without its meta.json is not an entry
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote the same entry first: same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir / key


def entries(cache_dir: Path) -> list[Entry]:
    """Whole entries in `cache_dir`, oldest first (left-over temporary folders are not entries)."""
    if not cache_dir.is_dir():
        return []
    out = []
    for folder in sorted(cache_dir.iterdir()):
        meta = folder / "meta.json"
        if folder.is_dir() and not folder.name.startswith(".") and meta.is_file():
            out.append(Entry(folder.name, folder, json.loads(meta.read_text())))
    return sorted(out, key=lambda e: e.meta.get("created", ""))


def clear(cache_dir: Path) -> int:
    """Remove every entry and left-over temporary folder; returns the number of entries removed."""
    removed = len(entries(cache_dir))
    if cache_dir.is_dir():
        for folder in cache_dir.iterdir():
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
    return removed
