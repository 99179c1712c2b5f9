"""Measurements shared by every runner, so that each number is computed the same way for each stack.

- trained tokens/s: tokens that carry loss (labels != -100 after the shift; padding never counts), over the
  steps after `warmup_steps`, wall clock between the end of the warm-up step and the end of the last step
  (data loading, optimizer and logging included);
- final loss: mean next-token NLL over the assistant tokens of the same held-out examples, each example
  scored alone (no padding, no packing) after training, in the run's own process;
- peak RSS of the process (ru_maxrss); on CUDA also torch.cuda.max_memory_allocated;
- on CUDA, model FLOP utilisation (MFU) against 989 TFLOP/s (H100/H200 dense bf16) and against a matmul
  peak measured on the spot.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.presets import Preset

H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class StepLog:
    """Per optimizer step: end time (perf_counter seconds), trained tokens, processed tokens (every real token
    the model ran on: trained or not, padding excluded) and the loss the stack reported."""

    ends: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    processed: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def add(self, end: float, tokens: int, processed: int) -> None:
        self.ends.append(end)
        self.tokens.append(tokens)
        self.processed.append(processed)


def throughput(log: StepLog, warmup_steps: int) -> dict:
    """Trained tokens/s after the warm-up steps (the warm-up step's end is the clock's start)."""
    n = len(log.ends)
    if n <= warmup_steps + 1:
        raise ValueError(f"only {n} steps: need more than warmup_steps + 1 = {warmup_steps + 1} to measure")
    seconds = log.ends[-1] - log.ends[warmup_steps - 1] if warmup_steps > 0 else None
    if seconds is None:
        raise ValueError("warmup_steps must be >= 1 (the first step's start is not observable for every runner)")
    tokens = sum(log.tokens[warmup_steps:])
    processed = sum(log.processed[warmup_steps:])
    return {"measured_steps": n - warmup_steps, "measured_tokens": tokens, "measured_seconds": seconds,
            "tokens_per_s": tokens / seconds, "processed_tokens_per_s": processed / seconds,
            "steps": n, "trained_tokens": sum(log.tokens), "processed_tokens": sum(log.processed)}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def eval_loss(model, tokenizer, examples: list[dict], device) -> dict:
    """Mean NLL over the trained (assistant) tokens of `examples`, one example per forward."""
    import torch

    from bench.data import render_with_mask

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, mask = render_with_mask(ex, tokenizer)
            input_ids = torch.tensor([ids], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits.float()  # (1, T, V)
            target = torch.tensor(ids[1:], device=device)
            trained = torch.tensor(mask[1:], device=device).bool()  # predict token t+1 from position t
            nll = torch.nn.functional.cross_entropy(logits[0, :-1][trained], target[trained], reduction="sum")
            total += nll.item()
            count += int(trained.sum())
    return {"eval_loss": total / count, "eval_tokens": count}


def flops_per_token(preset: Preset, method: str, mean_seq_len: float) -> float:
    """Training FLOPs per trained-or-not token: 6N (full) or 4N (LoRA: no weight gradients for the frozen base,
    the adapters are negligible) over the non-embedding parameters plus the LM head, and attention
    (QK^T and AV: 2 * 2 * T * hidden per layer forward, causal half, x3 for backward)."""
    n_dense = preset.approx_params() - 2 * preset.vocab * preset.hidden  # blocks only
    n_head = preset.vocab * preset.hidden  # the LM head matmul (the embedding lookup is free)
    factor = 6 if method == "full" else 4
    attention = 3 * 2 * 2 * preset.layers * preset.hidden * mean_seq_len / 2
    return factor * (n_dense + n_head) + attention


def measured_matmul_tflops(dtype, n: int = 8192, iters: int = 20) -> float:
    """Peak dense matmul TFLOP/s of the current CUDA device at `dtype` (best of `iters`)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def cuda_stats(preset: Preset, method: str, tokens_per_s_all: float, mean_seq_len: float) -> dict:
    """GPU memory and MFU. `tokens_per_s_all` counts every processed token (trained or not, padding excluded):
    the model does the FLOPs for all of them."""
    import torch

    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    achieved = flops_per_token(preset, method, mean_seq_len) * tokens_per_s_all / 1e12
    peak = measured_matmul_tflops(dtype)
    return {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "achieved_tflops": achieved, "mfu_vs_989": achieved / H100_BF16_DENSE_TFLOPS,
            "matmul_peak_tflops": peak, "mfu_vs_matmul_peak": achieved / peak}


def write_result(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__")
                                else str(o)))
