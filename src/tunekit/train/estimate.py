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

On a CUDA device the estimate is of GPU memory and follows what transformers and peft keep on the GPU
(`estimate_cuda`, docs/gpu.md says the formula and its assumptions): weights at their dtype (LoRA adapters
in fp32, as peft keeps them), activations per tensor that autograd saves (`activation_bytes`: checked against
torch's own saved-tensor hooks on CPU in tests/test_gpu_paths.py), the CUDA context and the caching
allocator's overhead. No GPU has checked its totals yet: bench/gpu/run.sh prints them beside measured peaks.
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
from tunekit.families import architecture
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

# GPU (CUDA) formula, `estimate_cuda`. Assumptions, until bench/gpu/run.sh has measured them on a GPU:
# device memory the CUDA context holds outside torch's allocator (driver state, cuBLAS / cuDNN handles, the
# kernels loaded lazily; 300-600 MiB is usual with torch 2.x and CUDA 12-13);
CUDA_CONTEXT = 600 * MB
# what the caching allocator reserves beyond the tensors it holds (block rounding, fragmentation), as a share
# of them;
ALLOCATOR_OVERHEAD = 0.10
# peft keeps LoRA weights in fp32 over a bf16 / fp16 base (get_peft_model's autocast_adapter_dtype=True).
ADAPTER_BYTES = 4


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
    heads: int = 0  # attention heads
    adapted: int = 0  # LoRA-wrapped linears of one decoder layer (0 for full fine-tuning)
    adapted_in: int = 0  # the sum of their input widths
    eager_only: bool = False  # the family attends only through eager attention (auto picks eager)


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
    overhead: int = 0  # CUDA: what the caching allocator reserves beyond the tensors
    device: str = "cpu"  # "cpu": host memory (baseline: the runtime); "cuda": GPU memory (baseline: CUDA context)

    @property
    def tensors(self) -> int:
        """What the run's tensors take (on CUDA: what torch.cuda.max_memory_allocated measures)."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.lm_head

    @property
    def total(self) -> int:
        return self.baseline + self.tensors + self.overhead

    def lines(self) -> list[str]:
        sharded = " (sharded over processes)" if self.strategy == "fsdp2" and self.processes > 1 else ""
        ckpt = "with" if self.gradient_checkpointing else "without"
        cuda = self.device == "cuda"
        return [f"memory per process (estimate{', GPU' if cuda else ''}): {self.total / MB:,.0f} MiB = "
                f"{'CUDA context' if cuda else 'runtime'} {self.baseline / MB:,.0f} + "
                f"weights {self.weights / MB:,.0f} + gradients {self.gradients / MB:,.0f} + optimizer "
                f"{self.optimizer / MB:,.0f}{sharded} + activations {self.activations / MB:,.0f} ({ckpt} gradient "
                f"checkpointing) + LM head chunk {self.lm_head / MB:,.0f}"
                + (f" + allocator overhead {self.overhead / MB:,.0f}" if cuda else "")]

    def to_dict(self) -> dict:
        return {**{k: v / MB for k, v in asdict(self).items() if isinstance(v, int) and not isinstance(v, bool)
                   and k != "processes"}, "tensors": self.tensors / MB, "total": self.total / MB}


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
    # LoRA-wrapped linears (peft's layers hold the frozen one as base_layer) and their input widths.
    adapted = [m.base_layer for m in layers[0].modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    arch = architecture(config.to_dict())
    return Shapes(
        params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
        layer_params=sum(p.numel() for p in layer0), layer_linear=linear,
        root_params=sum(p.numel() for p in params if id(p) not in in_layers),
        root_trainable=sum(p.numel() for p in params if id(p) not in in_layers and p.requires_grad),
        layers=len(layers), hidden=hidden, kv=getattr(config, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(config, "intermediate_size", 4 * hidden), vocab=config.vocab_size, heads=heads,
        adapted=len(adapted), adapted_in=sum(getattr(m, "in_features", 0) for m in adapted),
        eager_only=not arch.supports_sdpa or arch.softcapping)


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
                    baseline: int | None = None, device: torch.device | None = None) -> MemoryEstimate:
    """Bytes one process holds at its peak. `device`: where it trains (default: cfg.train.device resolved);
    a CUDA device gets the GPU formula (`estimate_cuda`), also on a machine without one."""
    device = device or resolve_device(cfg.train.device)
    if device.type == "cuda":
        return estimate_cuda(cfg, shapes, micro_batch=micro_batch, processes=processes, strategy=strategy,
                             baseline=baseline)
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


def cuda_dtype(cfg: RunConfig) -> torch.dtype:
    """The weights' dtype on a CUDA device. "auto" on a machine without one is taken as bf16 (every GPU since
    Ampere, compute capability 8.0, supports it)."""
    if cfg.model.dtype == "auto" and not torch.cuda.is_available():
        return torch.bfloat16
    return resolve_dtype(cfg.model.dtype, torch.device("cuda"))


def activation_bytes(s: Shapes, *, full: bool, act: int, adapter: int, copies: bool, r: int) -> int:
    """Bytes autograd keeps for backward per token in one decoder layer (Llama-style: RMSNorm, rotary
    attention through SDPA / flash-attention, gated MLP), as transformers and peft compute it:

    - attention: q and k after rotary, v and the attention output at `act` bytes, fp32 log-sum-exp per head;
    - MLP: gate, up and act(gate) at `act` bytes;
    - each of the two RMSNorms: its input upcast to fp32, and (full) the normalized values at `act` bytes,
      kept for the norm weight's gradient;
    - linear inputs: full: the distinct inputs (q/k/v share one, gate/up share one, o, down) at `act` bytes;
      LoRA: the same when the adapter computes in the activations' dtype, else (`copies`: peft casts the
      input to the adapter's dtype, or autocast casts it) one copy per adapted linear at `adapter` bytes;
      plus each adapter's r-wide lora_A output.
    tests/test_gpu_paths.py checks this against the tensors torch's saved-tensor hooks see."""
    h, kv, inter = s.hidden, s.kv, s.intermediate
    attention = (2 * h + 2 * kv) * act + s.heads * 4
    mlp = 3 * inter * act
    norms = 2 * 4 * h + (2 * h * act if full else 0)
    inputs = (3 * h + inter) * act
    if full:
        return attention + mlp + norms + inputs
    if copies:
        inputs = s.adapted_in * adapter
    return attention + mlp + norms + inputs + s.adapted * r * adapter


def estimate_cuda(cfg: RunConfig, shapes: Shapes, *, micro_batch: int, processes: int, strategy: str,
                  baseline: int | None = None) -> MemoryEstimate:
    """GPU memory of one process on a CUDA device (docs/gpu.md, "The memory estimate on a GPU"):

    - weights at their dtype; LoRA adapters in fp32; qlora: 4-bit linear weights, the rest fp32 (peft's k-bit
      preparation casts it);
    - gradients and AdamW's two moments of the trained parameters at their dtype (fp32 adapters, or the model's
      dtype for full fine-tuning: torch's AdamW keeps its state in the parameter's dtype);
    - activations: `activation_bytes` per layer and token, at the compute dtype: the weights' dtype, bf16
      under mixed_precision: bf16, fp32 for qlora (its residual stream is fp32 after the k-bit preparation);
      eager attention adds each head's (T, T) probabilities per row (fp32 softmax and its cast); with gradient
      checkpointing only each layer's input is kept, plus one layer recomputed; under autocast the bf16 copies
      of the decoder's weights are kept for backward;
    - the LM head chunk: (chunk, vocab) logits at the compute dtype, fp32 upcast, log-softmax and gradient;
    - the CUDA context (CUDA_CONTEXT) and the caching allocator's overhead (ALLOCATOR_OVERHEAD of the tensors).
    Gradients and activations are added as if both were whole at once (backward frees a layer's activations
    as it writes its gradients), so for full fine-tuning the peak can be lower by up to the gradients."""
    s, n = shapes, processes
    p = torch.finfo(cuda_dtype(cfg)).bits // 8
    lora, qlora = cfg.method != "full", cfg.method == "qlora"
    mixed = cfg.train.mixed_precision == "bf16"
    trained = ADAPTER_BYTES if lora else p  # bytes per trained parameter, its gradient and each Adam moment
    if qlora:
        quantized = s.layer_linear * s.layers
        weights = quantized * QLORA_BYTES + (s.params - quantized) * 4
    else:
        weights = (s.params - s.trainable) * p + s.trainable * trained
    gradients = s.trainable * trained
    optimizer = ADAM_STATES * s.trainable * trained
    if strategy == "fsdp2" and n > 1:
        weights = weights / n + (s.root_params + 2 * s.layer_params) * p * (1 - 1 / n)
        gradients = gradients / n + s.root_trainable * trained * (1 - 1 / n)
        optimizer = optimizer / n
    act = 4 if qlora else 2 if mixed else p
    adapter = 2 if mixed else ADAPTER_BYTES
    copies = lora and (mixed or adapter != act)
    row = cfg.data.max_len
    tokens = micro_batch * row
    per_layer = activation_bytes(s, full=not lora, act=act, adapter=adapter, copies=copies, r=cfg.lora.r) * tokens
    attn = cfg.model.attn_implementation
    if attn == "eager" or (attn == "auto" and s.eager_only):
        per_layer += micro_batch * s.heads * row * row * (4 + act)
    outside = (4 + 2 * act) * s.hidden * tokens  # final norm (fp32 input, output), hidden at trained positions
    if cfg.train.gradient_checkpointing:
        activations = s.layers * s.hidden * act * tokens + per_layer + outside
    else:
        activations = s.layers * per_layer + outside
    if mixed and p > 2:
        activations += s.layers * s.layer_params * 2
    lm_head = (3 * 4 + act) * min(cfg.train.lm_head_chunk, tokens) * s.vocab
    tensors = weights + gradients + optimizer + activations + lm_head
    return MemoryEstimate(int(CUDA_CONTEXT if baseline is None else baseline), int(weights), int(gradients),
                          int(optimizer), int(activations), int(lm_head), cfg.train.gradient_checkpointing, n, strategy,
                          overhead=int(ALLOCATOR_OVERHEAD * tensors), device="cuda")


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
        e = estimate_memory(c, shapes, micro_batch=micro, processes=n, strategy=strategy, baseline=est.baseline,
                            device=device)
        if fits(e, available, local_processes, device):
            out.append(f"{label} (~{e.total / MB:,.0f} MiB per process)")
    return out


def check_memory(cfg: RunConfig, plan, d, device: torch.device, say) -> MemoryEstimate:
    """Print the memory estimate per process (`plan`: hyper.Plan, `d`: distributed.Dist); refuse a run that
    cannot fit, naming settings that would."""
    shapes = model_shapes(cfg)
    # Rows a process runs at once, each counted at max_len tokens.
    micro = min(plan.micro_batch_size, math.ceil(min(plan.batch_size, plan.rows_per_epoch) / d.world_size))
    memory = estimate_memory(cfg, shapes, micro_batch=micro, processes=d.world_size, strategy=d.strategy,
                             device=device)
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
