"""Sequences -> rows -> tensors: best-fit-decreasing packing, or one sequence per row with padding.

Targets are shifted inside each sequence before packing: `targets[t]` is the label of token t+1 of the
SAME sequence (IGNORE at its last token), so a packed row never trains a sequence's first token from the
previous sequence's last one.

Packed rows carry position_ids that restart at 0 for every sequence and no attention mask. transformers
5.23 (`masking_utils._preprocess_mask_arguments` / `find_packed_sequence_indices`) turns such position_ids
into a block-diagonal causal mask for sdpa and eager, but ONLY when attention_mask is None and there is no
cache: the forward pass must get `use_cache=False` (Llama's config default use_cache=True creates a
DynamicCache and the documents then silently attend to each other). flash_attention_2 derives cu_seqlens
from the same position_ids (varlen kernel).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from tunekit.data.types import IGNORE, Sequence


def shifted_targets(seq: Sequence) -> list[int]:
    """Next-token label at each position of one sequence: labels[1:] + [IGNORE]."""
    return list(seq.labels[1:]) + [IGNORE]


def num_trained_targets(seq: Sequence) -> int:
    """Tokens that carry loss once shifted (a trained label at position 0 has nothing to predict it)."""
    labels = seq.labels
    if not labels:
        return 0
    return len(labels) - 1 - (labels.count(IGNORE) - (labels[0] == IGNORE))


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Pack items (by index) into bins of `capacity`: longest first, each into the fullest bin it fits.

    Decisions depend only on the lengths, so any order of equal-length items gives the same number of
    bins (the step count of an epoch does not depend on the shuffle). Items within a bin keep the order
    they were placed in. O(n log n) lookups over a sorted list of free space.
    """
    if any(n > capacity for n in lengths):
        raise ValueError("an item is longer than the bin capacity")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))  # smallest free space >= n
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
    return bins


@dataclass
class Batch:
    """One micro-batch as tensors, all (B, T)."""

    input_ids: torch.Tensor
    targets: torch.Tensor  # next-token label per position, IGNORE where no loss
    position_ids: torch.Tensor | None  # packed rows: restart at 0 per sequence
    attention_mask: torch.Tensor | None  # padded rows: 1 for real tokens
    real_tokens: int  # tokens that are not padding

    @property
    def num_trained(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids),
                     move(self.attention_mask), self.real_tokens)


def collate_packed(rows: list[list[Sequence]], pad_id: int) -> Batch:
    """Each row is the concatenation of its sequences; rows are right-padded to the longest row.

    Padding gets its own position_ids run starting at 0, so it forms a separate document that no real
    token attends to (it also comes after them, so causality alone would already hide it).
    """
    width = max(sum(len(s) for s in row) for row in rows)
    ids, tgt, pos = [], [], []
    real = 0
    for row in rows:
        r_ids, r_tgt, r_pos = [], [], []
        for seq in row:
            r_ids += seq.input_ids
            r_tgt += shifted_targets(seq)
            r_pos += range(len(seq))
        real += len(r_ids)
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        tgt.append(r_tgt + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
    return Batch(torch.tensor(ids), torch.tensor(tgt), torch.tensor(pos), None, real)


def collate_padded(seqs: list[Sequence], pad_id: int) -> Batch:
    """One sequence per row, right-padded; an attention mask hides the padding."""
    width = max(len(s) for s in seqs)
    ids, tgt, mask = [], [], []
    for seq in seqs:
        pad = width - len(seq)
        ids.append(seq.input_ids + [pad_id] * pad)
        tgt.append(shifted_targets(seq) + [IGNORE] * pad)
        mask.append([1] * len(seq) + [0] * pad)
    return Batch(torch.tensor(ids), torch.tensor(tgt), None, torch.tensor(mask),
                 sum(len(s) for s in seqs))


def packing_efficiency(rows: list[list[int]], lengths: list[int], max_len: int) -> float:
    """Real tokens / row tokens, with every row counted at max_len."""
    if not rows:
        return 0.0
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * max_len)
