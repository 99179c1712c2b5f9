"""Several processes training one model: the named steps the loop takes when torchrun started it.

One process is the default and costs nothing here: `setup` sees no WORLD_SIZE and returns SINGLE, whose
steps are no-ops. Under `torchrun` (or `tunekit train --nproc N`, which runs torchrun's code in-process)
every process runs the same loop, and these steps keep the math of one process:

- `setup`: the process group (gloo on CPU, nccl on CUDA) with a timeout, so a lost rank ends a
  collective with an error instead of a hang;
- `wrap`: DDP around the loss module (LoRA / QLoRA), or FSDP2 (`fully_shard` on every decoder layer,
  then on the root) for full fine-tuning or when asked;
- `deal`: the step's rows (the same rows one process would train, in the same order) dealt round-robin
  to ranks: rank r gets rows r, r+N, r+2N, ...;
- `sum_`: all-reduce sums (the trained-token count before the loss divides by it, metrics for logging).

DDP and FSDP2 average gradients over ranks; the loop multiplies each rank's loss by N so that the
gradient is the summed NLL over every rank's trained tokens divided by the global trained-token count,
exactly as in one process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from tunekit.config import RunConfig
from tunekit.errors import Problem, TunekitError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank among world_size processes, and how the model is wrapped."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp2"

    @property
    def on(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only the main process prints, logs, and writes the run dir."""
        return self.rank == 0


SINGLE = Dist()


def launched_world_size() -> int:
    """Processes torchrun started (1 when this process was not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(cfg: RunConfig) -> str:
    """auto: DDP for LoRA / QLoRA (the trained part is small; every rank keeps the frozen base), FSDP2 for
    full fine-tuning (parameters, gradients and optimizer state sharded over ranks)."""
    strategy = cfg.train.distributed.strategy
    if strategy == "auto":
        return "fsdp2" if cfg.method == "full" else "ddp"
    return strategy


def check(cfg: RunConfig, world_size: int) -> list[Problem]:
    """Combinations that cannot run, found before any weight loads."""
    problems = []
    strategy = resolve_strategy(cfg)
    if strategy == "deepspeed":
        problems.append(Problem(
            "train.distributed.strategy", "deepspeed is not supported: tunekit's loop runs on torch's own "
            "engines, and DeepSpeed's ZeRO engine (which owns the optimizer, loss scaling and checkpoints) is "
            "neither installed nor tested with it",
            "use strategy: fsdp2 (ZeRO-3-like sharding of parameters, gradients and optimizer state) or ddp"))
    if world_size > 1 and strategy == "fsdp2" and cfg.method == "qlora":
        problems.append(Problem(
            "train.distributed.strategy", "fsdp2 cannot shard method: qlora's bitsandbytes 4-bit weights "
            "(they are packed uint8 tensors with their quantization state beside them, not plain parameters)",
            "use strategy: ddp (or auto) with method: qlora, or method: lora / full with fsdp2"))
    if world_size > 1 and cfg.train.device != "cpu" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local > torch.cuda.device_count():
            problems.append(Problem("--nproc", f"{local} processes on this machine but {torch.cuda.device_count()} "
                                    "CUDA devices", "start at most one process per GPU"))
    return problems


def setup(cfg: RunConfig) -> Dist:
    """Join the process group torchrun set up in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    world = launched_world_size()
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    die_with_parent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.train.distributed.timeout_s))
    return Dist(rank, world, local_rank, resolve_strategy(cfg))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG; strictly, when
    the thread that started it ends). A training process under torchrun's agent then does not train on alone
    until a collective times out; a job's process (`preexec_fn` of the server's worker) does not outlive the
    server. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def device_of(d: Dist, device: torch.device) -> torch.device:
    """Each process uses its own GPU (cuda:LOCAL_RANK); on CPU they share the CPU."""
    if device.type == "cuda" and d.on:
        return torch.device("cuda", d.local_rank)
    return device


def teardown(d: Dist, together: bool = False) -> None:
    """End the process group. `together`: every process got here in step (the run ended or stopped on
    request), so they meet at a barrier first. Without it, a process that destroyed its group while another
    still used it sometimes made the other abort (gloo: "terminate called without an active exception",
    SIGABRT, in about one 2-process run in seven here). After a failure on one rank there is no barrier: the
    others would wait for it until the timeout."""
    if d.on:
        import torch.distributed as dist

        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.on:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first(d: Dist):
    """The main process runs the block first (e.g. renders data into the shared cache), then the others."""
    if not d.main:
        barrier(d)
    yield
    if d.main:
        barrier(d)


def wrap(loss_module: torch.nn.Module, decoder_layers, d: Dist, mixed_precision: str = "no") -> torch.nn.Module:
    """DDP or FSDP2 around the module whose forward is the loss (what the loop calls).

    FSDP2: `fully_shard` on each decoder layer (its parameters are gathered for its forward and backward,
    then freed), then on the root (embeddings, final norm, LM head, and LoRA weights outside the layers).
    bf16 mixed precision computes in bf16 and reduces gradients in fp32.
    """
    if not d.on:
        return loss_module
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.local_rank] if next(loss_module.parameters()).is_cuda else None
        return DistributedDataParallel(loss_module, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32 if mixed_precision == "bf16" else None)
    for layer in decoder_layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(loss_module, mp_policy=policy)
    return loss_module


def deal(rows: list, d: Dist) -> list:
    """This rank's share of a step's rows: rows[rank::world_size]."""
    return rows[d.rank::d.world_size]


def sum_(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum over ranks (one all-reduce, fp64)."""
    if not d.on:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()


def agree(flag: bool, d: Dist) -> bool:
    """The main process's decision (e.g. "a STOP file appeared"), the same on every rank."""
    if not d.on:
        return flag
    return sum_([float(flag) if d.main else 0.0], d)[0] > 0  # one all-reduce, nothing pickled


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not d.on:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s total norm as a number (under FSDP2 it is a DTensor to be reduced over ranks)."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def launch(nproc: int, args: list[str], stopped_exit_code: int | None = None) -> int:
    """Run `tunekit ARGS` on `nproc` local processes through torch.distributed.run (torchrun's own code,
    in this process: it starts the workers, watches them, and stops them all when one fails).

    Returns 0, or `stopped_exit_code` when the run stopped on request (rank 0 exited with it: it printed
    where). A failed worker is reported by rank: its exit code or the signal that killed it.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                        "-m", "tunekit.cli", *args]))
        return 0
    except ChildFailedError as exc:
        first_rank, first = exc.get_first_failure()
        if first.exitcode == stopped_exit_code and all(f.exitcode in (stopped_exit_code, -signal.SIGTERM)
                                                       for f in exc.failures.values()):
            return stopped_exit_code
        problems = []
        for rank, failure in sorted(exc.failures.items(), key=lambda item: item[0] != first_rank):
            if rank != first_rank and failure.exitcode < 0 and failure.signal_name() == "SIGTERM":
                continue  # stopped by the launcher because of the first failure
            if failure.exitcode < 0:
                how = f"was killed by {failure.signal_name()}"
                hint = ("killed from outside (SIGKILL: the out-of-memory killer, or torchrun after a SIGTERM it "
                        "ignored); continue with --resume from the last checkpoint")
            else:
                how = f"exited with code {failure.exitcode}"
                hint = "its error is printed above; continue with --resume from the last checkpoint"
            problems.append(Problem(f"rank {rank}", f"{how} (pid {failure.pid})", hint))
        raise TunekitError(problems, title=f"training on {nproc} processes failed at rank {first_rank}; "
                                           "the other processes were stopped") from None
