"""Benchmark presets: model shape, data size and training settings shared by every runner.

A preset fixes everything the runs must agree on (model, data, LoRA, lr, steps, sequence length, precision),
so that the only difference between the runs is the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    # Model shape (Llama architecture, random init).
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int  # embedding rows; the bench tokenizer uses the first few thousand of them
    # Data
    seq_len: int  # max tokens per sequence (and per packed row)
    n_train: int  # examples trained once (one epoch): every run trains exactly these tokens
    n_eval: int  # held-out examples for the final loss, scored the same way for every run
    median_tokens: int  # log-normal spread of example lengths (tokens), clipped to seq_len
    # Training
    steps: int  # optimizer steps for one epoch (each run sizes its batch to reach this)
    warmup_steps: int  # steps left out of the tokens/s measurement
    lr: float
    lora_r: int
    lora_alpha: float
    dtype: str  # "fp32" on CPU, "bf16" on GPU
    device: str  # "cpu" | "cuda"
    tokenizer_vocab: int  # BPE vocabulary trained by the bench (<= vocab)
    # torch threads per run (None: torch's default). The CPU presets use 1: on a machine shared with other
    # jobs, a 2-thread op waits at its barrier for a descheduled thread (a scheduler quantum, ~10 ms, per op),
    # which swamps the measurement.
    threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def approx_params(self) -> int:
        """Parameters of the base model (embeddings and LM head untied)."""
        head_dim = self.hidden // self.heads
        attn = self.hidden * self.hidden * 2 + self.hidden * self.kv_heads * head_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


PRESETS: dict[str, Preset] = {
    # Seconds per run: to check that the harness works, not to measure anything.
    "cpu-tiny": Preset(
        name="cpu-tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048,
        seq_len=256, n_train=48, n_eval=8, median_tokens=100, steps=6, warmup_steps=2, lr=2e-4,
        lora_r=8, lora_alpha=16, dtype="fp32", device="cpu", tokenizer_vocab=1024, threads=1,
    ),
    # A few minutes per run on 2 CPU cores.
    "cpu-small": Preset(
        name="cpu-small", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688, vocab=8192,
        seq_len=512, n_train=192, n_eval=32, median_tokens=160, steps=12, warmup_steps=3, lr=2e-4,
        lora_r=16, lora_alpha=32, dtype="fp32", device="cpu", tokenizer_vocab=4096, threads=1,
    ),
    "cpu-medium": Preset(
        name="cpu-medium", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376, vocab=32000,
        seq_len=1024, n_train=512, n_eval=32, median_tokens=300, steps=24, warmup_steps=4, lr=2e-4,
        lora_r=16, lora_alpha=32, dtype="fp32", device="cpu", tokenizer_vocab=4096, threads=1,
    ),
    # GPU shapes of Llama 3.2 1B and Llama 3.1 8B with random init (no weights are downloaded).
    "llama-3.2-1b": Preset(
        name="llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
        seq_len=2048, n_train=4000, n_eval=64, median_tokens=500, steps=60, warmup_steps=5, lr=2e-4,
        lora_r=16, lora_alpha=32, dtype="bf16", device="cuda", tokenizer_vocab=8192,
    ),
    "llama-3.1-8b": Preset(
        name="llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
        seq_len=2048, n_train=2000, n_eval=64, median_tokens=500, steps=40, warmup_steps=5, lr=2e-4,
        lora_r=16, lora_alpha=32, dtype="bf16", device="cuda", tokenizer_vocab=8192,
    ),
}
