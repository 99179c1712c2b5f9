"""Checkpoint I/O of the training loop: weights, optimizer and scheduler, RNG states, trainer state.

A checkpoint is RUN_DIR/checkpoints/step-NNNNNN/, written under a temporary name and renamed into place
(fsio.publish_dir), so a run killed mid-write leaves the previous checkpoint whole. Its format does not
depend on how many processes trained:

- weights as final/ holds them (a peft adapter or the full model, safetensors), gathered from the shards
  under FSDP2, so eval, export and serve read a checkpoint like any model;
- the optimizer state keyed by parameter name: under FSDP2 sharded, each rank writing its own shards with
  torch.distributed.checkpoint into optimizer/ (it is the largest part: two values per trained parameter);
  otherwise whole, in optimizer.pt. optimizer.pt holds the scheduler state either way. Any number of
  processes can load either (torch.distributed.checkpoint reshards);
- rng.pt: the main process's RNG states, and under several processes every rank's;
- trainer_state.json: the step, the position in the data, the metrics so far, the number of processes.

Every rank calls save_checkpoint (gathering is collective); only the main process writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from tunekit.errors import Problem, TunekitError
from tunekit.fsio import publish_dir
from tunekit.train.distributed import SINGLE, Dist, barrier, gather_objects

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
OPTIM_DIR = "optimizer"  # sharded optimizer state (FSDP2)
RNG_FILE = "rng.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _full_options(trainable_only: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # full_state_dict: whole tensors, not this rank's shards; cpu_offload: gathered to the main process's CPU;
    # ignore_frozen_params: only what trains (an adapter's weights), not the frozen base it is attached to.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)


def save_weights(model, path: Path, d: Dist = SINGLE) -> None:
    """peft adapter (adapter_config.json + adapter_model.safetensors) or the full model, safetensors.

    Under FSDP2 every rank takes part in gathering the shards; the main process writes them. An adapter's
    save gathers the trainable parameters only (peft writes nothing else), not the whole frozen base.
    """
    state = None
    if d.strategy == "fsdp2":
        from peft import PeftModel
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_options(trainable_only=isinstance(model, PeftModel)))
    if not d.main:
        return
    model.save_pretrained(str(path), safe_serialization=True, state_dict=state)


def copy_weights(ckpt: Path, dest: Path) -> None:
    """A checkpoint's weight files (what `save_weights` wrote there, the training state left out) into `dest`:
    hard links where the file system allows (files are only ever replaced whole, never written in place)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name not in (OPTIM_FILE, RNG_FILE, STATE_FILE):
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)


def save_checkpoint(run_dir: Path, model, net, optimizer, scheduler, state: dict, keep_last: int,
                    d: Dist = SINGLE) -> Path:
    """Write checkpoints/step-NNNNNN atomically; `net` is the (wrapped) module the optimizer trains."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt_dir = run_dir / "checkpoints"
    name = f"step-{state['step']:06d}"
    tmp, dest = ckpt_dir / f".tmp-{name}", ckpt_dir / name
    if d.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(d)  # the folder exists before any rank writes into it
    save_weights(model, tmp, d)
    optim = {"scheduler": scheduler.state_dict()}
    if d.strategy == "fsdp2":
        import torch.distributed.checkpoint as dcp

        dcp.save({"optimizer": get_optimizer_state_dict(net, optimizer)}, checkpoint_id=str(tmp / OPTIM_DIR))
    else:
        optim["optimizer"] = get_optimizer_state_dict(net, optimizer, options=_full_options())
    rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    ranks = gather_objects(rng, d)  # after dcp.save returned on every rank: all shards are written
    if not d.main:
        return dest
    torch.save(optim, tmp / OPTIM_FILE)
    torch.save({**rng, "ranks": ranks} if d.on else rng, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "world_size": d.world_size}, indent=1))
    publish_dir(tmp, dest)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return dest


def load_weights(model, ckpt: Path) -> None:
    """A checkpoint's weights into the (not yet wrapped) model, on every rank."""
    from safetensors.torch import load_file

    if (ckpt / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        bad = [k for k in result.unexpected_keys]
        if bad:
            raise TunekitError(Problem(str(ckpt), f"checkpoint weights do not fit the adapter: {bad[:3]}",
                                       "resume with the same lora settings"))
        return
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise TunekitError(Problem(str(ckpt), "checkpoint weights do not fit the model "
                                   f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
                                   "resume with the same model.base"))


def _load_state(path: Path) -> dict:
    """A checkpoint's optimizer / RNG file, read with weights_only=True: tensors and plain Python values
    only, so opening a checkpoint folder never runs code from it."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(Problem(str(path), f"cannot read this checkpoint file safely: {first[:300]}",
                                   "it must hold only tensors and plain values as tunekit writes them; "
                                   "resume from another checkpoint or start the run again")) from None


# What torch.distributed.checkpoint's .metadata pickle may name (torch 2.13): its own metadata classes, torch
# dtypes and sizes, the layout helper and a path. Anything else is refused before DCP unpickles the file
# (its FileSystemReader uses plain pickle, which would run code from the checkpoint folder).
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def _check_dcp_metadata(folder: Path) -> None:
    import pickle

    class Allowed(pickle.Unpickler):
        def find_class(self, module, name):
            if ((module, name) in _DCP_GLOBALS or module == "torch.distributed.checkpoint.metadata"
                    or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed")

    path = folder / ".metadata"
    try:
        with open(path, "rb") as fh:
            Allowed(fh).load()
    except (pickle.UnpicklingError, OSError, EOFError, AttributeError, ValueError, TypeError) as exc:
        raise TunekitError(Problem(str(path), f"cannot read this checkpoint file safely: {exc}",
                                   "it must hold only torch.distributed.checkpoint metadata as tunekit writes it; "
                                   "resume from another checkpoint or start the run again")) from None


def load_training_state(ckpt: Path, net, optimizer, scheduler) -> dict:
    """Optimizer and scheduler state into the wrapped module's optimizer (each rank takes its shards);
    returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    opt = _load_state(ckpt / OPTIM_FILE)
    try:
        if (ckpt / OPTIM_DIR).is_dir():  # sharded: each rank reads the parts of its own shards
            import torch.distributed.checkpoint as dcp

            _check_dcp_metadata(ckpt / OPTIM_DIR)
            # The current layout (state initialized), filled in place from the saved shards.
            sharded = {"optimizer": get_optimizer_state_dict(net, optimizer)}
            dcp.load(sharded, checkpoint_id=str(ckpt / OPTIM_DIR))
            set_optimizer_state_dict(net, optimizer, sharded["optimizer"])
        else:
            set_optimizer_state_dict(net, optimizer, opt["optimizer"], options=StateDictOptions(full_state_dict=True))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TunekitError(Problem(str(ckpt), f"the optimizer state does not fit this run: {exc}",
                                   "resume with the same model and method, from a checkpoint this version wrote")) from None
    scheduler.load_state_dict(opt["scheduler"])
    return json.loads((ckpt / STATE_FILE).read_text())


def restore_rng(ckpt: Path, d: Dist = SINGLE) -> None:
    """This rank's RNG states as they were (rank 0's when the checkpoint came from another process count)."""
    rng = _load_state(ckpt / RNG_FILE)
    ranks = rng.get("ranks")
    if ranks is not None and len(ranks) == d.world_size:
        rng = ranks[d.rank]
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
