"""The shots of the `few-shot:K` and `rag:K` baselines: training examples put before an evaluated prompt.

`few-shot:K` shows the same K examples (chosen at random with the seed) before every prompt; `rag:K` the K whose
prompts are most similar to each evaluated prompt (BM25 over the training prompts, `retrieval.TextIndex`). Never
the evaluated example itself, nor a training line asking the same prompt.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunekit.data.formats import read_jsonl
from tunekit.errors import DataError, Problem


def jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed record or None, error message or None) for each non-blank line."""
    for line in read_jsonl(path):
        errors = [issue.message for issue in line.issues if issue.severity == "error"]
        if errors:
            yield line.number, None, "; ".join(errors)
        elif line.record is not None:
            yield line.number, line.record, None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def last_assistant(example: dict) -> int:
    return max(i for i, m in enumerate(example["messages"]) if isinstance(m, dict) and m.get("role") == "assistant")


def _prompt_messages(example: dict) -> list:
    """Messages before the last assistant message (what the model is asked)."""
    return example["messages"][:last_assistant(example)]


def shot_pool(train_path: str | Path, evaluated: list[dict]) -> Iterator[tuple[int, dict]]:
    """(line, example) of each training line that may serve as a shot, in file order.

    Never an evaluated example: lines whose messages equal an evaluated example's are skipped, and so are
    lines asking the same prompt (the answer would sit in the prompt). Unusable lines are skipped.
    """
    train_path = Path(train_path)
    if not train_path.is_file():
        raise DataError(Problem(str(train_path), "training file for few-shot examples not found",
                                "few-shot and rag shots come from data.train of the run's config.yaml"))
    seen_messages = {_canonical(ex["messages"]) for ex in evaluated}
    seen_prompts = {_canonical(_prompt_messages(ex)) for ex in evaluated}
    for line, record, error in jsonl_records(train_path):
        if error or not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            continue
        messages = record["messages"]
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            continue
        if _canonical(messages) in seen_messages or _canonical(_prompt_messages(record)) in seen_prompts:
            continue
        yield line, record


def choose_shots(train_path: str | Path, evaluated: list[dict], k: int, seed: int) -> list[tuple[int, dict]]:
    """K (line, example) pairs from the training file, chosen uniformly with `seed` (reservoir sampling,
    one pass, memory O(K)).

    Never an evaluated example: lines whose messages equal an evaluated example's are skipped, and so are
    lines asking the same prompt (the answer would sit in the prompt). Unusable lines are skipped.
    """
    rng = random.Random(seed)
    chosen: list[tuple[int, dict]] = []
    usable = 0
    for line, record in shot_pool(train_path, evaluated):
        usable += 1
        if len(chosen) < k:
            chosen.append((line, record))
        else:
            j = rng.randrange(usable)  # keep each of the `usable` lines with probability k / usable
            if j < k:
                chosen[j] = (line, record)
    if usable < k:
        raise DataError(Problem(str(train_path), f"only {usable} training examples can serve as shots, "
                                                 f"few-shot:{k} needs {k}",
                                "lower K; evaluated examples (and training lines with the same prompt) "
                                "are never used as shots"))
    return sorted(chosen, key=lambda pair: pair[0])


def prompt_text(example: dict) -> str:
    """What retrieval compares: the text of the messages before the last assistant message, system
    messages left out (they are usually the same in every example)."""
    from tunekit.eval.metrics import message_text

    return "\n".join(message_text(m.get("content")) for m in _prompt_messages(example)
                     if isinstance(m, dict) and m.get("role") != "system")


def retrieve_shots(train_path: str | Path, evaluated: list[dict], k: int) -> list[list[tuple[int, dict]]]:
    """For each evaluated example, the K (line, example) pairs of the training file whose prompts are most
    similar to its prompt (BM25 over `tunekit.eval.retrieval.TextIndex`), most similar last (nearest the
    question).

    The pool is `shot_pool`'s: never an evaluated example or a training line asking the same prompt as
    one. Training lines with identical messages count once, so the K shots are K different examples.
    """
    from tunekit.eval.retrieval import TextIndex

    pool: list[tuple[int, dict]] = []
    seen: set[str] = set()
    for line, record in shot_pool(train_path, evaluated):
        key = _canonical(record["messages"])
        if key not in seen:
            seen.add(key)
            pool.append((line, record))
    if len(pool) < k:
        raise DataError(Problem(str(train_path), f"only {len(pool)} distinct training examples can serve as "
                                                 f"shots, rag:{k} needs {k}",
                                "lower K; evaluated examples (and training lines with the same prompt) "
                                "are never used as shots"))
    index = TextIndex.build([prompt_text(record) for _, record in pool],
                            [{"i": i} for i in range(len(pool))], collection="shots")
    try:
        out = []
        for example in evaluated:
            hits = [pool[payload["i"]] for payload, _ in index.search(prompt_text(example), k)]
            taken = {line for line, _ in hits}
            for pair in pool:  # a prompt sharing no word with K examples: fill with the first others
                if len(hits) >= k:
                    break
                if pair[0] not in taken:
                    hits.append(pair)
            out.append(list(reversed(hits)))
        return out
    finally:
        index.close()


def with_shots(example: dict, shots: list[dict]) -> dict:
    """The example with the shots' conversations as earlier turns (after its system message).

    Shot assistant turns get weight 0 so teacher forcing never scores them; tools declared by shots are
    added to the example's tools (by function name) so a template can render their calls.
    """
    messages = list(example["messages"])
    head = [messages.pop(0)] if messages and messages[0].get("role") == "system" else []
    shot_turns = []
    for shot in shots:
        for m in shot["messages"]:
            if m.get("role") == "system":
                continue
            shot_turns.append({**m, "weight": 0} if m.get("role") == "assistant" else dict(m))
    out = {**example, "messages": head + shot_turns + messages}
    tools = list(example.get("tools") or [])
    names = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
    for shot in shots:
        for t in shot.get("tools") or []:
            name = (t.get("function") or t).get("name") if isinstance(t, dict) else None
            if name not in names:
                tools.append(t)
                names.add(name)
    if tools:
        out["tools"] = tools
    return out
