"""Packing: bins, shifted targets, position_ids, and packed attention == separate sequences."""

from __future__ import annotations

import random

import pytest
import torch
from canary import still_broken
from hypothesis import given, settings
from hypothesis import strategies as st

from tunekit.data.dataset import epoch_rows, fit_to_max_len, split_validation
from tunekit.data.pack import (
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    num_trained_targets,
    packing_efficiency,
)
from tunekit.data.types import IGNORE, Sequence


def seq(ids: list[int], trained_from: int) -> Sequence:
    """A sequence whose labels are trained from index `trained_from` on."""
    return Sequence(list(ids), [IGNORE] * trained_from + list(ids[trained_from:]))


@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 128))
@settings(max_examples=60, deadline=None)
def test_best_fit_decreasing_places_every_item_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Any two bins together hold more than one bin can: a bin is opened only for an item that fits no open bin.
    # (So never more than twice the bins the total needs. BFD's 11/9 OPT + 6/9 bound needs the true optimum,
    # not the lower bound ceil(total / capacity): five items of 33 in bins of 64 need five bins, not three.)
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(fills) < 2 or fills[0] + fills[1] > capacity
    assert len(bins) <= 2 * -(-sum(lengths) // capacity)


def test_best_fit_decreasing_fills_the_fullest_bin_that_fits():
    # 6 -> bin A (free 4), 5 -> bin B (free 5), 4 -> A (free 0, best fit), 5 -> B (free 0)
    assert best_fit_decreasing([6, 5, 4, 5], 10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(3, 40) for _ in range(50)]
    a = epoch_rows(lengths, 64, True, seed=7, epoch=2)
    assert a == epoch_rows(lengths, 64, True, seed=7, epoch=2)
    assert a != epoch_rows(lengths, 64, True, seed=7, epoch=3)
    # The row count does not depend on the shuffle (steps per epoch stay fixed).
    assert {len(epoch_rows(lengths, 64, True, seed=7, epoch=e)) for e in range(5)} == {len(a)}
    assert sorted(i for row in a for i in row) == list(range(50))
    unpacked = epoch_rows(lengths, 64, False, seed=7, epoch=2)
    assert all(len(r) == 1 for r in unpacked) and len(unpacked) == 50


def test_collate_packed_restarts_positions_and_never_shifts_across_sequences():
    a, b = seq([10, 11, 12], 1), seq([20, 21, 22, 23], 2)
    batch = collate_packed([[a, b], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 22, 23], [20, 21, 22, 23, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2]]
    # targets[t] = label of token t+1 in the same sequence; the last token of a sequence predicts nothing.
    assert batch.targets.tolist() == [[11, 12, IGNORE, IGNORE, 22, 23, IGNORE],
                                      [IGNORE, 22, 23, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert batch.attention_mask is None
    assert batch.real_tokens == 11
    assert batch.num_trained == num_trained_targets(a) + 2 * num_trained_targets(b) == 6


def test_collate_padded_masks_padding():
    batch = collate_padded([seq([1, 2, 3], 0), seq([4, 5], 1)], pad_id=9)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.targets.tolist() == [[2, 3, IGNORE], [5, IGNORE, IGNORE]]
    assert batch.position_ids is None


def test_packing_efficiency_counts_real_over_row_tokens():
    assert packing_efficiency([[0, 1], [2]], [30, 30, 20], 64) == pytest.approx(80 / 128)


def test_fit_to_max_len_counts_what_it_drops_or_cuts():
    long = seq(list(range(1, 31)), 10)  # 30 tokens, targets trained: labels[10:30] -> 20 targets
    short = seq([1, 2, 3, 4], 2)  # 2 trained targets
    nothing = seq([1, 2, 3], 3)  # no trained label at all
    kept, rep = fit_to_max_len([long, short, nothing], 20, "drop")
    assert kept == [short]
    assert (rep.dropped_too_long, rep.dropped_trained_tokens, rep.no_trained_tokens, rep.trained_tokens) == (1, 20, 1, 2)
    assert rep.messages("train", 20)  # reported, never silent
    kept, rep = fit_to_max_len([long, short], 20, "truncate")
    assert [len(s) for s in kept] == [20, 4]
    assert (rep.truncated, rep.lost_trained_tokens, rep.trained_tokens) == (1, 10, 10 + 2)


def test_split_validation_holds_out_whole_examples_reproducibly():
    examples = [[seq([i, i + 1], 0)] for i in range(20)]
    train, valid = split_validation(examples, 0.2, seed=3)
    assert len(valid) == 4 and len(train) == 16
    assert split_validation(examples, 0.2, seed=3) == (train, valid)
    assert {id(e) for e in train}.isdisjoint({id(e) for e in valid})


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked_logits(tiny_llama_dir, attn):
    """Each sequence in a packed row gives the logits it gives alone (fp32, <= 1e-5)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    g = torch.Generator().manual_seed(0)
    seqs = [seq(torch.randint(5, 500, (n,), generator=g).tolist(), 0) for n in (7, 13, 4, 20)]
    packed = collate_packed([seqs[:3], seqs[3:]], pad_id=0)
    with torch.no_grad():
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        offset = 0
        for s in seqs[:3]:
            alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(out[0, offset:offset + len(s)], alone, atol=1e-5, rtol=0)
            offset += len(s)
        # Canary: without use_cache=False, transformers 5.23 builds a cache and ignores the packing
        # (documents see each other). When this skips, the note in tunekit.data.pack can go.
        leaky = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
        second = slice(len(seqs[0]), len(seqs[0]) + len(seqs[1]))
        still_broken(not torch.allclose(leaky[0, second], out[0, second], atol=1e-4), "transformers",
                     "packed position_ids are honoured even when use_cache is left on")
