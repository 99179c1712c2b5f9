"""The supervised fine-tuning objective: the summed next-token NLL at trained positions.

An objective is the loss of one micro-batch as a module, `forward(batch) -> (summed loss, trained tokens,
trained tokens already predicted right)`: the loop (`loop.py`) divides by the step's trained tokens, runs
backward, and DDP / FSDP2 wrap the module (their hooks run on a module's forward). Preference and
reinforcement objectives are files beside this one with the same shape.

The LM head runs only at the positions whose next token is trained, `chunk` rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunekit.data.pack import Batch
from tunekit.data.types import IGNORE
from tunekit.model import body_and_head


def forward_hidden(model, batch: Batch) -> torch.Tensor:
    """(B, T, H) final hidden states of the decoder body."""
    body, _ = body_and_head(model)
    # use_cache=False is what lets transformers build the per-sequence mask from packed position_ids.
    out = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
               attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


def _chunk_logits(head, softcap: float | None, h: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (chunk, V), fp32 for the softmax
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_nll(head, softcap: float | None, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL, count of positions whose argmax is the target) of one chunk; the count has no grad."""
    logits = _chunk_logits(head, softcap, h)  # (chunk, V)
    return F.cross_entropy(logits, target, reduction="sum"), (logits.detach().argmax(-1) == target).sum()


def trained_nll(model, batch: Batch, chunk: int) -> tuple[torch.Tensor, int, int]:
    """(summed NLL over trained positions, their count, how many the model already predicts) for one
    micro-batch.

    Hidden states are gathered at the N positions whose next token is trained, then projected through
    the LM head `chunk` rows at a time. With grad enabled each chunk is recomputed in backward
    (activation checkpointing), so at most one (chunk, V) logits block is alive at a time.
    """
    _, head = body_and_head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    hidden = forward_hidden(model, batch)  # (B, T, H)
    keep = batch.targets != IGNORE  # (B, T)
    h = hidden[keep]  # (N, H)
    target = batch.targets[keep]  # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, h.shape[0], chunk):
        h_c, t_c = h[start:start + chunk], target[start:start + chunk]
        if torch.is_grad_enabled():
            nll_c, right_c = checkpoint(_chunk_nll, head, softcap, h_c, t_c, use_reentrant=False)
        else:
            nll_c, right_c = _chunk_nll(head, softcap, h_c, t_c)
        total, correct = total + nll_c, correct + right_c
    return total, int(target.numel()), int(correct)


class TrainedNLL(torch.nn.Module):
    """The SFT objective: forward(batch) -> trained_nll(model, batch, chunk)."""

    def __init__(self, model, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: Batch) -> tuple[torch.Tensor, int, int]:
        return trained_nll(self.model, batch, self.chunk)
