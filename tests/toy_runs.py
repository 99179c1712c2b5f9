"""Toy data and run configs shared by test_train.py and test_model.py (tiny, seconds per run)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tunekit.config import RunConfig, config_from_dict
from tunekit.data.pack import collate_packed
from tunekit.data.types import IGNORE, Sequence

WORDS = "apple river stone cloud maple tiger lemon piano candle forest silver ocean".split()


def write_toy_chat(path: Path, n: int, seed: int = 0) -> Path:
    """A learnable task: the assistant repeats the user's word three times."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            word = rng.choice(WORDS)
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"say {word}"},
                {"role": "assistant", "content": f"{word} {word} {word}"},
            ]}) + "\n")
    return path


def toy_config(tmp_path: Path, base: Path | str, *, out: str = "run", n: int = 24, **sections) -> RunConfig:
    """A run config on toy data; `sections` update the default sections, e.g. train={"max_steps": 3}."""
    data_file = tmp_path / "train.jsonl"
    if not data_file.exists():
        write_toy_chat(data_file, n)
    cfg = {
        "model": {"base": str(base)},
        "data": {"train": str(data_file), "max_len": 64, "validation_fraction": 0.2},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16},
        "train": {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 5e-3, "log_every": 1,
                  "warmup_ratio": 0.0, "threads": 1},
        "output": {"dir": str(tmp_path / out)},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return config_from_dict(cfg, base_dir=tmp_path)


def random_sequences(n: int, seed: int, vocab: int = 500, lo: int = 5, hi: int = 30) -> list[Sequence]:
    """Random token sequences whose second half is trained."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        half = length // 2
        out.append(Sequence(ids, [IGNORE] * half + ids[half:]))
    return out


def packed(seqs: list[Sequence]):
    return collate_packed([[s] for s in seqs], pad_id=0)
