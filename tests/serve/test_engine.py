"""The batching loop without HTTP: batched and joined rows give the tokens of one-by-one greedy generation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")

from tunekit.data.render import render_prompt  # noqa: E402
from tunekit.serve.inference import Engine, Finished, Job, Sampling, load_models, parse_model_arg  # noqa: E402

TINY_CHAT = Path(__file__).resolve().parents[2] / "models" / "tiny-chat"


async def _tokens(job: Job) -> tuple[list[int], str]:
    ids = []
    while True:
        event = await job.events.get()
        if isinstance(event, Finished):
            return ids, event.reason
        ids.append(event.id)


async def _run(served, prompts: list[list[int]], stagger_s: float) -> tuple[list, int]:
    engine = Engine(window_s=0.0, max_batch=64)
    engine.start()
    loop = asyncio.get_running_loop()
    tasks = []
    for prompt in prompts:
        job = Job(served, prompt, Sampling(max_tokens=24), 1, loop)
        engine.submit(job)
        tasks.append(asyncio.create_task(_tokens(job)))
        await asyncio.sleep(stagger_s)
    results = await asyncio.gather(*tasks)
    engine.stop()
    return results, engine.batches


def test_rows_joining_a_running_batch_equal_one_by_one_generation():
    served = load_models([parse_model_arg(f"tiny={TINY_CHAT}")], "cpu")["tiny"]
    words = "apples rain bread river soup moon garlic dog snow pancakes sea onions".split()
    prompts = [render_prompt([{"role": "user", "content": "Copy exactly: " + " ".join(words[i:] + words[:i])}],
                             served.tokenizer) for i in range(8)]
    alone = [asyncio.run(_run(served, [p], 0.0))[0][0] for p in prompts]
    assert len({tuple(ids) for ids, _ in alone}) == 8  # different replies
    joined, batches = asyncio.run(_run(served, prompts, 0.01))  # each arrives while the batch runs
    assert batches < len(prompts)  # later requests joined the running batch
    assert joined == alone
