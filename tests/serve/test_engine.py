"""The batching loop without HTTP: batched and joined rows give the tokens of one-by-one greedy generation."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")

from tunekit.data.render import render_prompt  # noqa: E402
from tunekit.generate.engine import Engine, Finished, Job, Sampling  # noqa: E402
from tunekit.generate.kvcache import Padded, PrefixCache, Slots, _slots_misfit, _slots_work, fits, window  # noqa: E402
from tunekit.generate.models import load_models, parse_model_arg  # noqa: E402

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
    assert served.weights.slots_work is True  # served through `Slots` (the probe passed)


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
    assert _slots_misfit(model) is None and model.config._attn_implementation == attention
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
                if rng.random() < 0.3:  # the same prompt twice in one prefill (the choices of n=2)
                    prompts.append(list(prompts[0]))
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


def test_prefix_cache_finds_the_longest_stored_start_and_drops_least_recently_used_leaves():
    cache = PrefixCache(max_bytes=3 * 64, block=4)  # room for 3 blocks of 64 bytes (1 layer, 2 x (1, 4, 2) fp32)

    def reader(prompt):
        return lambda lo, hi: ([torch.tensor(prompt[lo:hi], dtype=torch.float32)[None, :, None].repeat(1, 1, 2)],
                               [torch.zeros(1, hi - lo, 2)])

    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    cache.add("m", a, [], reader(a), 64)  # blocks 1-4 and 5-8 (9 is not a full block)
    assert [len(cache.find("m", a))] == [2] and cache.find("other model", a) == []
    assert len(cache.find("m", a[:8])) == 1  # never the last token: its logits are needed
    b = [1, 2, 3, 4, 0, 0, 0, 0, 7]
    found = cache.find("m", b)
    assert len(found) == 1 and found[0].keys[0][0, :, 0].tolist() == [1, 2, 3, 4]
    cache.add("m", b, found, reader(b), 64)  # shares the first block: one new block, 3 held
    assert cache.bytes == 3 * 64 and len(cache.find("m", b)) == 2
    c = [9, 9, 9, 9, 1]
    cache.add("m", c, [], reader(c), 64)  # a 4th block: the least recently used leaf (a's second) goes
    assert len(cache.find("m", a)) == 1 and len(cache.find("m", b)) == 2 and len(cache.find("m", c)) == 1
    assert cache.bytes == 3 * 64
    # a long prompt with b's start: its blocks go in while they fit, without evicting the start it builds on
    long = b[:8] + list(range(20, 36)) + [1]
    cache.add("m", long, cache.find("m", long), reader(long), 64)
    assert cache.bytes == 3 * 64 and len(cache.find("m", long)) == 3  # b's 2 blocks, then 1 that fitted
    assert len(cache.find("m", b)) == 2 and len(cache.find("m", a)) == 1  # the shared start stays
    assert cache.find("m", c) == []  # the least recently used leaf made room


def test_models_the_slots_do_not_fit_are_batched_with_their_own_cache(tmp_path, chat_tokenizer):
    """A sliding-window model (Qwen2 with windowed layers) given prompts longer than its window runs through transformers' cache and masks: rows
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
    prompts = [render_prompt([{"role": "user", "content": f"hello {w} there"}], chat_tokenizer)
               for w in ("a", "bb", "a b c d", "x")]
    assert not any(fits(window(served.weights.model), len(p), 1) for p in prompts)
    alone = [asyncio.run(_run(served, [p], 0.0))[0][0] for p in prompts]
    together, batches = asyncio.run(_run(served, prompts, None))
    assert batches == 1 and together == alone
    staggered, batches = asyncio.run(_run(served, prompts, 0.01))
    assert staggered == alone


def test_a_free_slot_runs_at_position_zero():
    """A finished row's slot, below a live one, keeps running as padding: at position 0, not past its own end
    (a model with learned positions, GPT-2 with 32 of them, would index out of range)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    assert _slots_work(model, pad_id=0)
    batch = Slots(model, pad_id=0)
    long, short = [list(range(3, 23)), [5, 6, 7]]
    with torch.inference_mode():
        batch.prefill([long, short], [0, 1])
        for _ in range(11):  # the long row reaches position 31, its last
            long.append(9), short.append(9)
            batch.step(torch.tensor([9, 9]))
        batch.free(0)
        for _ in range(15):  # the short row goes on; slot 0 runs as padding
            short.append(4)
            logits = batch.step(torch.tensor([0, 4]))
        torch.testing.assert_close(logits[1], _alone_logits(model, short), atol=1e-4, rtol=1e-4)


def test_models_whose_attention_reads_more_than_mask_and_positions_run_padded(tmp_path, chat_tokenizer):
    """Bloom builds its ALiBi bias from a 2D mask: `Slots` cannot feed it, so the engine serves it padded,
    with the tokens of one-by-one generation."""
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(chat_tokenizer), hidden_size=32, n_layer=2, n_head=2,
                         pad_token_id=chat_tokenizer.pad_token_id,
                         eos_token_id=chat_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    served = load_models([parse_model_arg(f"bloom={tmp_path}")], "cpu")["bloom"]
    with torch.inference_mode():
        assert not _slots_work(served.weights.model, served.pad_id)
    prompts = [render_prompt([{"role": "user", "content": f"hi {w}"}], chat_tokenizer) for w in ("a", "b c", "d e f")]
    alone = [asyncio.run(_run(served, [p], 0.0))[0][0] for p in prompts]
    together, batches = asyncio.run(_run(served, prompts, None))
    assert batches == 1 and together == alone


def test_padded_batches_drop_finished_rows():
    """In a padded batch a finished row leaves the cache (the rows after it move down) and the others go on
    with their own logits."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, layer_types=["full_attention", "sliding_attention"])
    model = AutoModelForCausalLM.from_config(config).eval()
    assert window(model) == 4
    batch = Padded(model, pad_id=0)
    rows = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    with torch.inference_mode():
        batch.prefill(rows, [0, 1, 2])
        batch.free(0)
        assert batch.compact() == [(1, 0), (2, 1)] and batch.n == 2
        rows = rows[1:]
        for step in range(6):
            tokens = torch.tensor([20 + step, 30 + step])
            for row, token in zip(rows, tokens.tolist(), strict=True):
                row.append(token)
            logits = batch.step(tokens)
            for b, row in enumerate(rows):
                torch.testing.assert_close(logits[b], _alone_logits(model, row), atol=1e-4, rtol=1e-4)
