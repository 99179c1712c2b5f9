"""On-disk cache of rendered data: each data file rendered once, reused by every later run that reads it.

An entry is a folder named by a key that hashes everything the rendered tokens depend on: the data file's
bytes, the tokenizer (its tokenizers JSON, special tokens, class), the chat template, the format options
(data.format, data.unstable_template), `render.RENDER_VERSION`, and today's date when the template reads the
clock (`strftime_now`). A changed file, tokenizer or template gives another key, so a stale entry is never
read; `tunekit data cache clear` removes old ones.

An entry holds flat arrays, read back memory-mapped (S sequences, T tokens):

    ids.bin        int32 (T,)      every sequence's tokens, one after the other
    trained.bin    uint8 (T,)      1 where the token is trained (its label is the token itself), else 0
    offsets.npy    int64 (S + 1,)  sequence s is ids[offsets[s]:offsets[s + 1]]
    example.npy    int32 (S,)      the example (0-based, in file order) each sequence comes from
    line.npy       int32 (S,)      its line in the data file
    targets.npy    int64 (S,)      its trained tokens once shifted (a trained first token predicts nothing)
    kind.npy       uint8 (S,)      0 chat, 1 text, 2 completion
    turns.npy, turn_offsets.npy    the trained assistant messages of each chat sequence
    meta.json      the data file, counts, the key's parts

so nothing in memory grows with the number of tokens, and per-sequence arrays stay numpy arrays. Entries are
written to a temporary folder beside the cache and renamed into place, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
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


_KINDS = {"chat": 0, "text": 1, "completion": 2}


class Store:
    """An entry opened for reading: token arrays memory-mapped, per-sequence arrays in memory."""

    def __init__(self, folder: Path, data_file: Path) -> None:
        self.folder, self.data_file = folder, data_file
        self.meta = json.loads((folder / "meta.json").read_text())
        tokens = self.meta["tokens"]
        self.ids = np.memmap(folder / "ids.bin", dtype=np.int32, mode="r", shape=(tokens,)) if tokens else \
            np.zeros(0, dtype=np.int32)
        self.trained = np.memmap(folder / "trained.bin", dtype=np.uint8, mode="r", shape=(tokens,)) if tokens \
            else np.zeros(0, dtype=np.uint8)
        self.offsets = np.load(folder / "offsets.npy")
        self.example = np.load(folder / "example.npy")
        self.line = np.load(folder / "line.npy")
        self.targets = np.load(folder / "targets.npy")
        self.kind = np.load(folder / "kind.npy")
        self.turns = np.load(folder / "turns.npy")
        self.turn_offsets = np.load(folder / "turn_offsets.npy")

    @property
    def n_examples(self) -> int:
        return int(self.meta["examples"])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def source(self, s: int) -> dict:
        source: dict = {"file": str(self.data_file), "line": int(self.line[s])}
        kind = int(self.kind[s])
        if kind == _KINDS["chat"]:
            source["turns"] = self.turns[self.turn_offsets[s]:self.turn_offsets[s + 1]].tolist()
        else:
            source["format"] = "text" if kind == _KINDS["text"] else "completion"
        return source

    def sequence(self, s: int, limit: int | None = None) -> Sequence:
        """Sequence s (its first `limit` tokens when given) with labels and source as rendering gave them."""
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        if limit is not None:
            b = min(b, a + limit)
        ids = np.asarray(self.ids[a:b])
        labels = np.where(self.trained[a:b] != 0, ids, IGNORE)
        return Sequence(ids.tolist(), labels.tolist(), self.source(s))

    def trained_targets(self, s: int, limit: int) -> int:
        """Trained tokens once shifted in the first `limit` tokens of sequence s."""
        a = int(self.offsets[s])
        return int(self.trained[a + 1:min(a + limit, int(self.offsets[s + 1]))].sum())

    def line_sequences(self, line: int) -> list[Sequence] | None:
        """The sequences of one line of the data file, None when the entry has none for it."""
        lo, hi = np.searchsorted(self.line, [line, line + 1])  # line.npy is in file order
        return [self.sequence(int(s)) for s in range(lo, hi)] if hi > lo else None

    def examples(self) -> list[list[Sequence]]:
        """Every example as its list of sequences (in memory: for small files and the Python API)."""
        out: list[list[Sequence]] = [[] for _ in range(self.n_examples)]
        for s in range(len(self.example)):
            out[int(self.example[s])].append(self.sequence(s))
        return out


_ARRAYS = ("offsets", "example", "line", "targets", "kind", "turns", "turn_offsets")


def _read_meta(folder: Path) -> dict | None:
    """meta.json of a whole entry (every file there, with the sizes meta.json gives), else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        tokens, sequences = int(meta["tokens"]), int(meta["sequences"])
        whole = ((folder / "ids.bin").stat().st_size == 4 * tokens
                 and (folder / "trained.bin").stat().st_size == tokens
                 and all((folder / f"{name}.npy").is_file() for name in _ARRAYS))
        return meta if whole and sequences >= 0 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_entry(cache_dir: Path, key: str, data_file: Path) -> Store | None:
    """The entry for `key`, or None when there is no whole entry."""
    folder = cache_dir / key
    if _read_meta(folder) is None:
        return None
    try:
        return Store(folder, data_file)
    except (OSError, ValueError):  # a damaged array file: render again
        return None


def load(cache_dir: Path, key: str, data_file: Path) -> list[list[Sequence]] | None:
    """The cached examples (each a list of sequences) for `key`, or None when there is no whole entry."""
    store = open_entry(cache_dir, key, data_file)
    return None if store is None else store.examples()


def store_stream(cache_dir: Path, key: str, parts: dict, data_file: Path,
                 examples: Iterable[tuple[int, list[Sequence]]]) -> Path:
    """Write the entry for `key` from (line, sequences) per example, in file order, without holding them all.

    Written to a temporary folder renamed into place when whole; returns the entry's folder.
    """
    from array import array

    from tunekit.data.pack import num_trained_targets

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    offsets, example, line, targets, kind = array("q", [0]), array("i"), array("i"), array("q"), array("B")
    turns, turn_offsets = array("i"), array("q", [0])
    n_examples = trained_total = 0
    try:
        with open(tmp / "ids.bin", "wb") as ids_file, open(tmp / "trained.bin", "wb") as trained_file:
            for e, (line_no, seqs) in enumerate(examples):
                n_examples = e + 1
                for seq in seqs:
                    ids_file.write(np.asarray(seq.input_ids, dtype=np.int32).tobytes())
                    mask = np.asarray(seq.labels) != IGNORE
                    trained_file.write(mask.astype(np.uint8).tobytes())
                    trained_total += int(mask.sum())
                    offsets.append(offsets[-1] + len(seq))
                    example.append(e)
                    line.append(line_no)
                    targets.append(num_trained_targets(seq))
                    fmt = seq.source.get("format", "chat")
                    kind.append(_KINDS.get(fmt, 0))
                    turns.extend(seq.source.get("turns", []))
                    turn_offsets.append(len(turns))
        for name, values, dtype in (("offsets", offsets, np.int64), ("example", example, np.int32),
                                    ("line", line, np.int32), ("targets", targets, np.int64),
                                    ("kind", kind, np.uint8), ("turns", turns, np.int32),
                                    ("turn_offsets", turn_offsets, np.int64)):
            np.save(tmp / f"{name}.npy", np.frombuffer(values, dtype=dtype) if len(values) else
                    np.zeros(0, dtype=dtype))
        meta = {"data_file": str(data_file), "examples": n_examples, "sequences": len(example),
                "tokens": int(offsets[-1]), "trained_tokens": trained_total,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **parts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a whole entry
        target = cache_dir / key
        if target.is_dir() and _read_meta(target) is None:
            shutil.rmtree(target, ignore_errors=True)  # a damaged or partial folder is not an entry
        try:
            os.rename(tmp, target)
        except OSError:  # another process wrote the same entry first: same key, same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir / key


def store(cache_dir: Path, key: str, parts: dict, data_file: Path, examples: list[list[Sequence]]) -> Path:
    """Write the entry for `key` from examples in memory (each a list of sequences with a source line)."""
    return store_stream(cache_dir, key, parts, data_file,
                        ((seqs[0].source.get("line", e + 1) if seqs else e + 1, seqs)
                         for e, seqs in enumerate(examples)))


def entries(cache_dir: Path) -> list[Entry]:
    """Whole entries in `cache_dir`, oldest first (left-over temporary folders are not entries)."""
    if not cache_dir.is_dir():
        return []
    out = []
    for folder in sorted(cache_dir.iterdir()):
        meta = _read_meta(folder) if folder.is_dir() and not folder.name.startswith(".") else None
        if meta is not None:
            out.append(Entry(folder.name, folder, meta))
    return sorted(out, key=lambda e: e.meta.get("created", ""))


def clear(cache_dir: Path) -> int:
    """Remove every entry and left-over or damaged folder; returns the number of whole entries removed."""
    removed = len(entries(cache_dir))
    if cache_dir.is_dir():
        for folder in cache_dir.iterdir():
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
    return removed
