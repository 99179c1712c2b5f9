"""The batching loop without HTTP: batched and joined rows give the tokens of one-by-one greedy generation."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")

from tunekit.data.render import render_prompt  # noqa: E402
from tunekit.serve.inference import (  # noqa: E402
    Engine,
    Finished,
    Job,
    PrefixCache,
    Sampling,
    Slots,
    _slots_fit,
    load_models,
    parse_model_arg,
)

TINY_CHAT = Path(__file__).resolve().parents[2] / "models" / "tiny-chat"


async def _tokens(job: Job) -> tuple[list[int], str]:
    ids = []
    while True:
        event = await job.events.get()
        if isinstance(event, Finished):
            return ids, event.reason
        ids.append(event.id)


async def _run(served, prompts: list[list[int]], stagger_s: float | None) -> tuple[list, int]:
    """Each prompt's tokens and the batches run; stagger None: all submitted before the engine starts."""
    engine = Engine(window_s=0.0, max_batch=64)
    if stagger_s is not None:
        engine.start()
    loop = asyncio.get_running_loop()
    tasks = []
    for prompt in prompts:
        job = Job(served, prompt, Sampling(max_tokens=24), 1, loop)
        engine.submit(job)
        tasks.append(asyncio.create_task(_tokens(job)))
        await asyncio.sleep(stagger_s or 0)
    if stagger_s is None:
        engine.start()
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


def _alone_logits(model, sequence: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([sequence])).logits[0, -1].float()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # bool masks; float masks added to the scores
@pytest.mark.parametrize("prefix_cache", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_slots_give_each_row_the_logits_of_its_sequence_alone(tiny_llama_dir, prefix_cache, attention):
    """Rows prefilled together and apart, rows leaving (holes refilled), the slot buffers growing and the live
    columns moving back to the left edge, and (with a prefix cache) prompts that start like earlier ones
    prefilled from their cached blocks: every logit equals the model run on that row's tokens alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32,  # GQA: 4 heads, 2 kv
                                                 attn_implementation=attention).eval()
    assert _slots_fit(model) and model.config._attn_implementation == attention
    rng = random.Random(0)
    prefixes = PrefixCache(2**30, block=8) if prefix_cache else None
    batch = Slots(model, pad_id=0, prefixes=prefixes, root="tiny")
    stems = [[rng.randrange(3, 200) for _ in range(n)] for n in (0, 9, 17, 40)]  # shared starts (system prompts)
    earlier: list[list[int]] = []
    reused = compacted = 0
    sequences: dict[int, list[int]] = {}  # slot -> its tokens so far
    life: dict[int, int] = {}  # slot -> steps left
    moved = grown = False
    with torch.inference_mode():
        for step in range(170):
            if step % 7 == 0:  # one to three rows join, of different prompt lengths
                prompts = [list(rng.choice(earlier)) if earlier and rng.random() < 0.2  # a prompt sent again
                           else rng.choice(stems) + [rng.randrange(3, 200) for _ in range(rng.randint(1, 14))]
                           for _ in range(rng.randint(1, 3))]
                earlier += prompts
                slots = batch.free_slots(len(prompts))
                columns, t_before = batch.columns, batch.t
                logits, cached = batch.prefill(prompts, slots)
                reused += sum(cached)
                assert all(c % 8 == 0 and c < len(p) for c, p in zip(cached, prompts, strict=True))
                grown |= batch.columns > columns > 0
                moved |= 0 < batch.t != t_before
                for i, (slot, prompt) in enumerate(zip(slots, prompts, strict=True)):
                    assert slot not in sequences
                    sequences[slot], life[slot] = list(prompt), rng.randint(3, 30)
                    torch.testing.assert_close(logits[i], _alone_logits(model, prompt), atol=1e-4, rtol=1e-4)
            if not sequences:
                continue
            tokens = torch.zeros(batch.n, dtype=torch.long)
            for slot, sequence in sequences.items():
                sequence.append(rng.randrange(3, 200))
                tokens[slot] = sequence[-1]
            t_before = batch.t
            logits = batch.step(tokens)
            moved |= batch.t != t_before + 1
            for slot, sequence in sequences.items():
                torch.testing.assert_close(logits[slot], _alone_logits(model, sequence), atol=1e-4, rtol=1e-4)
            for slot in [s for s in life if life[s] == 1]:
                batch.free(slot)
                del sequences[slot], life[slot]
            life = {s: n - 1 for s, n in life.items()}
            for src, dst in batch.compact():  # the rows follow their moves
                assert dst < src and dst not in sequences
                sequences[dst], life[dst] = sequences.pop(src), life.pop(src)
                compacted += 1
            assert batch.n == max(sequences, default=-1) + 1
    assert moved  # the live columns moved (left edge, or right to make room for a longer prompt)
    assert batch.slots >= 4
    assert (reused > 200) if prefix_cache else (reused == 0)
    assert compacted > 0  # rows moved down into free slots


def test_prefix_cache_finds_the_longest_stored_start_and_drops_the_least_recently_used():
    cache = PrefixCache(max_bytes=3 * 64, block=4)  # room for 3 blocks of 64 bytes (1 layer, 2 x (1, 4, 2) fp32)

    def reader(prompt):
        return lambda lo, hi: ([torch.tensor(prompt[lo:hi], dtype=torch.float32)[None, :, None].repeat(1, 1, 2)],
                               [torch.zeros(1, hi - lo, 2)])

    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    cache.add("m", a, [], reader(a))  # blocks 1-4 and 5-8 (9 is not a full block)
    assert [len(cache.find("m", a))] == [2] and cache.find("other model", a) == []
    assert len(cache.find("m", a[:8])) == 1  # never the last token: its logits are needed
    b = [1, 2, 3, 4, 0, 0, 0, 0, 7]
    found = cache.find("m", b)
    assert len(found) == 1 and found[0].keys[0][0, :, 0].tolist() == [1, 2, 3, 4]
    cache.add("m", b, found, reader(b))  # shares the first block: one new block, 3 held
    assert cache.bytes == 3 * 64 and len(cache.find("m", b)) == 2
    c = [9, 9, 9, 9, 1]
    cache.add("m", c, [], reader(c))  # a 4th block: the least recently used (a's second) goes
    assert len(cache.find("m", a)) == 1 and len(cache.find("m", b)) == 2 and len(cache.find("m", c)) == 1
    assert cache.bytes == 3 * 64


def test_models_the_slots_do_not_fit_are_batched_with_their_own_cache(tmp_path, chat_tokenizer):
    """A sliding-window model (Qwen2 with windowed layers) runs through transformers' cache and masks: rows
    batched together give the tokens of one-by-one generation; later requests wait for the batch."""
    from conftest import tiny_model_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_model_config("qwen2", vocab_size=len(chat_tokenizer))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 6, 1
    config.layer_types = ["full_attention", "sliding_attention"]
    config.pad_token_id, config.eos_token_id = chat_tokenizer.pad_token_id, chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    served = load_models([parse_model_arg(f"windowed={tmp_path}")], "cpu")["windowed"]
    assert not _slots_fit(served.weights.model)
    prompts = [render_prompt([{"role": "user", "content": f"hello {w} there"}], chat_tokenizer)
               for w in ("a", "bb", "a b c d", "x")]
    alone = [asyncio.run(_run(served, [p], 0.0))[0][0] for p in prompts]
    together, batches = asyncio.run(_run(served, prompts, None))
    assert batches == 1 and together == alone
    staggered, batches = asyncio.run(_run(served, prompts, 0.01))
    assert staggered == alone
