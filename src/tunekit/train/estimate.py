"""Pre-flight: the memory one training process will hold, estimated before any weight loads.

The model is built on the meta device (shapes only, no memory) to count its parameters, the trained ones
(with the LoRA adapter applied) and their split between the decoder layers and the rest. Then, in bytes:

- weights: every parameter at model.dtype (qlora: the decoder's linear weights at 4 bits plus their
  quantization constants, the rest fp32 as peft's k-bit preparation casts it);
- gradients and AdamW state (two moments) of the trained parameters, at the parameter dtype;
- under FSDP2 (N processes): all of that / N, plus what is gathered whole while it runs: the root group
  (embeddings, final norm, LM head: FSDP2 keeps the root unsharded between forward and backward) with its
  gradient before the reduce-scatter, and two decoder layers (the one computing and the one prefetched);
- activations kept for backward, per decoder layer and token: 10 hidden + 4 key/value + 4 MLP-intermediate
  values (Llama-style layer: norms, q/k/v and their rotary copies, attention output, o_proj input,
  gate/up/act/product of the MLP), times micro-batch x max_len tokens; with gradient checkpointing only each
  layer's input is kept, plus one layer recomputed during backward;
- the LM head chunk: (min(lm_head_chunk, tokens), vocab) fp32 logits, their log-softmax and gradient;
- the baseline: what this process already holds when it estimates (the Python runtime, torch and
  transformers, the tokenizer and the data), read from the OS, not estimated (CPU only), plus what the
  runtime itself adds once training starts (model code, autograd, allocator caches): RUNTIME_GROWTH, the
  RSS growth of a run of the tiny test model, whose tensors are a few MiB.

`tests/test_estimate.py` compares the total with the measured peak RSS of real runs.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunekit.config import RunConfig
from tunekit.errors import ConfigError, Problem
from tunekit.model import apply_method, config_source, resolve_device, resolve_dtype

MB = 2**20
# AdamW keeps two moments per trained parameter.
ADAM_STATES = 2
# Values kept for backward per decoder layer and token (see the module docstring).
ACT_HIDDEN, ACT_KV, ACT_MLP = 10, 4, 4
# Bytes the CPU runtime grows by once training starts, beyond the tensors counted here (measured: the peak RSS
# of a tiny-model run minus the RSS when it estimates, 105-110 MiB with torch 2.13 / transformers 5).
RUNTIME_GROWTH = 100 * MB
# Four-bit weights: 0.5 byte per value, plus an fp32 absmax per 64 values (double quantization: ~1 byte).
QLORA_BYTES = 0.5 + 4 / 64


@dataclass(frozen=True)
class Shapes:
    """Parameter counts of the model (with the adapter applied) and its layer sizes."""

    params: int
    trainable: int
    layer_params: int  # one decoder layer
    layer_linear: int  # nn.Linear weights of one decoder layer (what qlora quantizes)
    root_params: int  # outside the decoder layers: embeddings, final norm, LM head
    root_trainable: int
    layers: int
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    baseline: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    lm_head: int
    gradient_checkpointing: bool
    processes: int
    strategy: str

    @property
    def total(self) -> int:
        return self.baseline + self.weights + self.gradients + self.optimizer + self.activations + self.lm_head

    def lines(self) -> list[str]:
        sharded = " (sharded over processes)" if self.strategy == "fsdp2" and self.processes > 1 else ""
        ckpt = "with" if self.gradient_checkpointing else "without"
        return [f"memory per process (estimate): {self.total / MB:,.0f} MiB = runtime {self.baseline / MB:,.0f} + "
                f"weights {self.weights / MB:,.0f} + gradients {self.gradients / MB:,.0f} + optimizer "
                f"{self.optimizer / MB:,.0f}{sharded} + activations {self.activations / MB:,.0f} ({ckpt} gradient "
                f"checkpointing) + LM head chunk {self.lm_head / MB:,.0f}"]

    def to_dict(self) -> dict:
        return {**{k: v / MB for k, v in asdict(self).items() if isinstance(v, int) and not isinstance(v, bool)
                   and k != "processes"}, "total": self.total / MB}


def model_shapes(cfg: RunConfig) -> Shapes:
    """Counts from the model built on the meta device (no weights are read or allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_source(cfg.model.base), trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    if cfg.method == "full":
        model.requires_grad_(True)
    else:  # the same adapter as training (qlora's 4-bit base does not change what trains)
        model = apply_method(model, cfg.model_copy(update={"method": "lora", "model": cfg.model.model_copy(
            update={"previous_adapter": "merge"})}))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    in_layers = {id(p) for p in layers.parameters()}
    params = list(model.parameters())
    layer0 = list(layers[0].parameters())
    # The base linear weights of a layer (not the adapter's lora_A / lora_B, which train).
    linear = sum(m.weight.numel() for m in layers[0].modules()
                 if isinstance(m, torch.nn.Linear) and (cfg.method == "full" or not m.weight.requires_grad))
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return Shapes(
        params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
        layer_params=sum(p.numel() for p in layer0), layer_linear=linear,
        root_params=sum(p.numel() for p in params if id(p) not in in_layers),
        root_trainable=sum(p.numel() for p in params if id(p) not in in_layers and p.requires_grad),
        layers=len(layers), hidden=hidden, kv=getattr(config, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", 4 * hidden), vocab=config.vocab_size)


def current_rss() -> int:
    """Resident memory of this process now, bytes (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def peak_rss() -> int:
    """Peak resident memory of this process so far, bytes.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory. Not ru_maxrss, which
    Linux carries across exec: a process started by a large parent (a test runner, a server) would report the
    parent's size at the fork. ru_maxrss (KiB on Linux) only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except (OSError, IndexError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate_memory(cfg: RunConfig, shapes: Shapes, *, micro_batch: int, processes: int, strategy: str,
                    baseline: int | None = None) -> MemoryEstimate:
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    pbytes = torch.finfo(dtype).bits // 8
    abytes = 2 if cfg.train.mixed_precision == "bf16" else pbytes  # activations at the compute dtype
    s, n = shapes, processes
    if cfg.method == "qlora":
        quantized = s.layer_linear * s.layers
        weights = quantized * QLORA_BYTES + (s.params - quantized) * 4
    else:
        weights = s.params * pbytes
    gradients = s.trainable * pbytes
    optimizer = ADAM_STATES * s.trainable * pbytes
    if strategy == "fsdp2" and n > 1:
        weights = weights / n + (s.root_params + 2 * s.layer_params) * pbytes * (1 - 1 / n)
        gradients = gradients / n + s.root_trainable * pbytes * (1 - 1 / n)
        optimizer = optimizer / n
    tokens = micro_batch * cfg.data.max_len
    per_layer = (ACT_HIDDEN * s.hidden + ACT_KV * s.kv + ACT_MLP * s.intermediate) * tokens * abytes
    outside = 4 * s.hidden * tokens * abytes  # embeddings out, final norm in/out, hidden at trained positions
    if cfg.train.gradient_checkpointing:
        activations = s.layers * s.hidden * tokens * abytes + per_layer + outside
    else:
        activations = s.layers * per_layer + outside
    lm_head = 3 * min(cfg.train.lm_head_chunk, tokens) * s.vocab * 4  # as if every position were trained
    if baseline is None:
        baseline = current_rss() + RUNTIME_GROWTH if device.type == "cpu" else 0
    return MemoryEstimate(int(baseline), int(weights), int(gradients), int(optimizer), int(activations),
                          int(lm_head), cfg.train.gradient_checkpointing, n, strategy)


def available_memory(device: torch.device) -> int | None:
    """Bytes this machine can still give (CPU: MemAvailable; CUDA: the device's free memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits(estimate: MemoryEstimate, available: int | None, local_processes: int, device: torch.device) -> bool:
    """Whether what the run still has to allocate fits in what is available (CPU: all local processes
    share it; the baseline is already resident)."""
    if available is None:
        return True
    need = estimate.total - estimate.baseline
    return need * (local_processes if device.type == "cpu" else 1) <= available


def ways_to_fit(cfg: RunConfig, shapes: Shapes, est: MemoryEstimate, *, micro_batch: int, available: int,
                local_processes: int, device: torch.device) -> list[str]:
    """Settings that would bring the estimate under `available`, each tried on its own."""
    tries = []
    if not cfg.train.gradient_checkpointing:
        tries.append(("train.gradient_checkpointing: true",
                      cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})}),
                      micro_batch, est.processes, est.strategy))
    if micro_batch > 1:
        tries.append(("train.micro_batch_size: 1", cfg, 1, est.processes, est.strategy))
    if cfg.method == "lora":
        tries.append(("method: qlora", cfg.model_copy(update={"method": "qlora"}), micro_batch, est.processes,
                      est.strategy))
    if cfg.method == "full" and device.type == "cuda":
        tries.append(("more processes with train.distributed.strategy: fsdp2 (--nproc)", cfg, micro_batch,
                      max(2, est.processes * 2), "fsdp2"))
    out = []
    for label, c, micro, n, strategy in tries:
        e = estimate_memory(c, shapes, micro_batch=micro, processes=n, strategy=strategy, baseline=est.baseline)
        if fits(e, available, local_processes, device):
            out.append(f"{label} (~{e.total / MB:,.0f} MiB per process)")
    return out


def check_memory(cfg: RunConfig, plan, d, device: torch.device, say) -> MemoryEstimate:
    """Print the memory estimate per process (`plan`: hyper.Plan, `d`: distributed.Dist); refuse a run that
    cannot fit, naming settings that would."""
    shapes = model_shapes(cfg)
    # Rows a process runs at once, each counted at max_len tokens.
    micro = min(plan.micro_batch_size, math.ceil(min(plan.batch_size, plan.rows_per_epoch) / d.world_size))
    memory = estimate_memory(cfg, shapes, micro_batch=micro, processes=d.world_size, strategy=d.strategy)
    for line in memory.lines():
        say(line, highlight=False)
    available = available_memory(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if not fits(memory, available, local, device):
        ways = ways_to_fit(cfg, shapes, memory, micro_batch=micro, available=available,
                           local_processes=local, device=device)
        where = f"{local} processes x " if local > 1 and device.type == "cpu" else ""
        raise ConfigError(Problem(
            "train", f"the run needs about {where}{(memory.total - memory.baseline) / MB:,.0f} MiB more {device.type} "
            f"memory but {available / MB:,.0f} MiB are available",
            ("these would fit: " + "; ".join(ways)) if ways else
            "lower data.max_len, use method: lora or qlora, or a machine with more memory"), title="cannot start training")
    return memory
