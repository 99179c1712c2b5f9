"""The models a server holds and the generation loop that answers requests.

Loading (`load_models`): every MODEL argument becomes a `Served` name. Weights are loaded once per base:
runs whose adapter was trained on the same base (a model dir, a hub id or a full-weights run) share one copy
of it (`Weights`), their adapters are attached with peft's multi-adapter API on first use and chosen per batch;
past `max_adapters` the least recently used adapter is unloaded. A run whose base is itself an adapter run
(a chain) is loaded on its own with `load_for_inference` (merged), so it answers exactly as `tunekit chat`.

Generation (`Engine`): one worker thread owns the models. Requests that arrive within `window_s` of each other
form a batch of one part (the same weights and adapter); it runs through the loop in `Engine._generate`, which
reads top to bottom: prefill, then per step choose a token for every row (greedy, or sampled with the row's
temperature / top_p / seed), hand it to the request, stop rows at the template's end-of-turn ids, at their
token limit, or when their request is gone, and let requests for the same part that arrived meanwhile join
between two steps, so a new request waits one step, not a whole batch. Requests for another part wait until
the batch ends. Requests read what the worker produces from an asyncio queue (`Job.events`).

The batch's KV cache is `Slots`: one slot per row in preallocated buffers, so a finished row frees its slot
and a joining one is prefilled into a free slot without copying the others (transformers' own cache grows by
concatenation, a copy of the whole cache per token). A prompt that starts like an earlier one is prefilled
from the blocks of it kept in the engine's `PrefixCache`. Models `Slots` does not serve (sliding windows, other
kinds of layers, attention that reads more than masks and positions: `_slots_work`) run as `Padded`:
transformers' cache and masks, rows batched at the start, finished rows dropped, nothing joins.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections import OrderedDict, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunekit.data.render import end_of_turn_ids
from tunekit.errors import Problem, TunekitError
from tunekit.locate import locate_model
from tunekit.model import ADAPTER_CONFIG, read_run_dir

# --------------------------------------------------------------------------------------------------
# What is served


@dataclass(frozen=True)
class ModelSpec:
    """One MODEL argument: a name and what to load (model dir, hub id, run dir, adapter dir)."""

    name: str
    path: str


def parse_model_arg(text: str, relative_to: Path | None = None) -> ModelSpec:
    """`NAME=PATH` or `PATH` (named after the dir, or the hub id itself). NAME may hold `/` and `:`.

    A local PATH is made absolute against `relative_to` (default: the working directory), so that what a
    fine-tuning job's worker is given names the same folder from anywhere; a PATH that is neither a local
    folder nor a loadable hub id fails here, naming the folder looked for (`locate.locate_model`)."""
    folder = (relative_to or Path.cwd()).absolute()
    name, sep, path = text.partition("=")
    if not (sep and name and path) or (folder / Path(text).expanduser()).exists():
        name, path = "", text  # the whole argument is the path (it may hold '=')
    located = locate_model(path, folder, field=f"MODEL {text}")
    if isinstance(located, Problem):
        raise TunekitError(located)
    local = Path(located).is_absolute()
    return ModelSpec(name or (Path(located).name if local else located), located)


@dataclass
class Weights:
    """One copy of model weights in memory, with the adapters attached to it (most recently used last)."""

    key: str  # what was loaded: a resolved local path or a hub id
    model: object  # a transformers model, a peft PeftModel once an adapter is attached
    adapters: OrderedDict[str, Path] = field(default_factory=OrderedDict)
    slots_work: bool | None = None  # whether `Slots` serves this model (`_slots_work`; None: not probed yet)


@dataclass
class Served:
    """A name in /v1/models: weights, optionally an adapter on them, and the tokenizer its prompts use."""

    name: str
    path: str
    weights: Weights
    adapter: Path | None  # the peft adapter dir (a run's final/), None for the weights as they are
    tokenizer: object
    stop_ids: list[int]  # the template's end-of-turn ids, then eos
    pad_id: int
    context: int  # the model's positions: prompt + completion tokens must fit
    created: int = field(default_factory=lambda: int(time.time()))


def _context(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise TunekitError(Problem(str(source), f"cannot load a tokenizer: {exc}",
                                   "the model dir (or the run's final/) must hold tokenizer files")) from None


def _load_model(source: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype="auto", device_map={"": str(device)})
    except (OSError, ValueError) as exc:
        raise TunekitError(Problem(source, f"cannot load a causal LM: {exc}",
                                   "give a model dir, a run dir, NAME=PATH, or a reachable hub id")) from None
    return model.eval()


def _key(path: str | Path) -> str:
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else str(path)


def _plan(spec: ModelSpec) -> tuple[str, Path | None, str | Path]:
    """(weights key, adapter dir or None, tokenizer source) for one spec; ("", None, path) = load on its own."""
    local = Path(spec.path).expanduser()
    if not local.exists():
        return _key(spec.path), None, spec.path  # a hub id
    run = read_run_dir(local)
    if run is None:
        if (local / ADAPTER_CONFIG).is_file():  # a bare adapter dir (e.g. a checkpoint)
            base = json.loads((local / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            if read_run_dir(base) is None:
                return _key(base), local, local if (local / "tokenizer_config.json").is_file() else base
            return "", None, local
        return _key(local), None, local
    if not run.has_adapter:
        return _key(run.final), None, run.final
    base_run = read_run_dir(run.cfg.model.base)
    if base_run is None:
        return _key(run.cfg.model.base), run.final, run.final
    if not base_run.has_adapter:
        return _key(base_run.final), run.final, run.final
    return "", None, local  # adapter on an adapter run: merged on load


def load_models(specs: list[ModelSpec], device: str | torch.device = "cpu",
                shared: dict[str, Weights] | None = None) -> dict[str, Served]:
    """Every spec as a served name; bases shared (see module doc). Errors name the spec and the fix.

    `shared`: weights already in memory by key (those of served models), used instead of loading again."""
    from tunekit.model import load_for_inference

    device = torch.device(device)
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TunekitError(Problem("MODEL", f"two models are named {', '.join(dupes)}",
                                   "name them apart with NAME=PATH"))
    weights: dict[str, Weights] = dict(shared or {})
    served: dict[str, Served] = {}
    for spec in specs:
        key, adapter, tok_source = _plan(spec)
        if key:
            if key not in weights:
                weights[key] = Weights(key, _load_model(key, device))
            w = weights[key]
            tokenizer = _load_tokenizer(tok_source)
        else:
            model, tokenizer = load_for_inference(spec.path, device)
            w = Weights(f"{spec.name}:merged", model)
        if not getattr(tokenizer, "chat_template", None):
            raise TunekitError(Problem(spec.path, "the tokenizer has no chat template",
                                       "serve a chat model: chat completions render messages with its template"))
        stop = end_of_turn_ids(tokenizer)
        if not stop:
            raise TunekitError(Problem(spec.path, "the tokenizer has no end-of-turn token or eos",
                                       "use a tokenizer whose template ends turns with a special token"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
        served[spec.name] = Served(spec.name, spec.path, w, adapter, tokenizer, stop, pad, _context(w.model))
    return served


# --------------------------------------------------------------------------------------------------
# Requests as the worker sees them


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # completion tokens, end-of-turn token included
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token's and that many alternatives


@dataclass(frozen=True)
class Token:
    choice: int
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
    end: bool = False  # an end-of-turn id: counted in usage, not part of the text


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop" (end of turn), "length", "cancelled"


@dataclass(frozen=True)
class Failed:
    message: str


class Job:
    """One request: `n` choices of one prompt. The worker writes events, the request reads them."""

    def __init__(self, served: Served, prompt: list[int], sampling: Sampling, n: int,
                 loop: asyncio.AbstractEventLoop):
        self.served, self.prompt, self.sampling, self.n = served, prompt, sampling, n
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = [False] * n  # set by the request (stop string found, client gone); read by the worker
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache (set by the worker)
        self._loop = loop

    def emit(self, event) -> None:  # called from the worker thread
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, choice: int | None = None) -> None:
        for i in range(self.n) if choice is None else [choice]:
            self.cancelled[i] = True


def _deliver(events: list[tuple[Job, object]]) -> None:
    """Hand a step's events to their requests with one wake-up of each event loop (not one per token)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
    for job, event in events:
        by_loop.setdefault(job._loop, []).append((job, event))
    for loop, items in by_loop.items():
        loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Job, object]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


@dataclass
class _Row:
    job: Job
    choice: int
    generator: torch.Generator | None  # sampling rows only
    produced: int = 0


# --------------------------------------------------------------------------------------------------
# The worker


def _part_key(job: Job) -> tuple:
    """Jobs with the same key run in one batch: the same weights with the same adapter (or none)."""
    return id(job.served.weights), str(job.served.adapter) if job.served.adapter else None


def _cache_argument(model) -> str:
    """The name of the KV-cache argument and output: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect

    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, positions), each (B, T): the prompts left-padded to the longest, pads at position 0."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):  # every row's next token is read from the last column
        ids[b, width - len(prompt):] = torch.tensor(prompt)
        mask[b, width - len(prompt):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _slots_fit(model) -> bool:
    """Whether `Slots` can hold this model's keys and values: every layer attends to all earlier tokens (no
    sliding window, no other kind of layer) through torch's SDPA or the eager implementation, whose masks
    `Slots` builds."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", None) is False:
        window = None
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager") and window is None
            and not getattr(config, "is_encoder_decoder", False)
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or []))


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple  # (parent's id or the root, its tokens): its key in the cache
    parent: _Block | None
    keys: list[torch.Tensor]  # per layer: (heads, block tokens, head dim)
    values: list[torch.Tensor]
    nbytes: int
    children: int = 0  # blocks stored after this one


class PrefixCache:
    """Keys and values of prompts already prefilled, in blocks of `block` tokens, so that a prompt starting
    like an earlier one (a system prompt, tool definitions, earlier turns of a chat) is prefilled only from
    the first block that differs. Exact: a prefix sits at the same positions in every prompt that starts with
    it, and its keys and values depend on nothing after it.

    A block is found by its own tokens and its parent block (the key is the parent's id and the tokens; the
    first block's parent is the `root`, one per weights and adapter), so prompts share the blocks of their
    common start, like a tree. To stay within `max_bytes`, the least recently used leaves go (blocks that no
    other block continues): a shared start stays as long as something after it does."""

    def __init__(self, max_bytes: int, block: int = 16):
        self.max_bytes, self.block = max_bytes, block
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self._next_id = 0
        self.bytes = 0

    def find(self, root, prompt: list[int]) -> list[_Block]:
        """The stored blocks `prompt` starts with, in order; never its last token (its logits are needed)."""
        found: list[_Block] = []
        parent = root
        for b in range((len(prompt) - 1) // self.block):
            block = self._blocks.get((parent, tuple(prompt[b * self.block:(b + 1) * self.block])))
            if block is None:
                break
            self._blocks.move_to_end(block.key)
            found.append(block)
            parent = ("block", block.id)
        return found

    def add(self, root, prompt: list[int], found: list[_Block], read, block_bytes: int) -> None:
        """Store the full blocks of `prompt` after the `found` ones, while they fit; `read(lo, hi)` gives the
        keys and values of its tokens lo..hi-1 per layer, `block_bytes` what a block of them takes."""
        parent = found[-1] if found else None
        chain = {id(b) for b in found}  # this prompt's blocks: not evicted while it adds its own
        for b in range(len(found), len(prompt) // self.block):
            lo, hi = b * self.block, (b + 1) * self.block
            key = (("block", parent.id) if parent else root, tuple(prompt[lo:hi]))
            block = self._blocks.get(key)
            if block is None:
                if not self._make_room(block_bytes, chain):
                    return
                keys, values = read(lo, hi)
                self._next_id += 1
                block = _Block(self._next_id, key, parent, keys, values, block_bytes)
                self._blocks[key] = block
                self.bytes += block_bytes
                if parent:
                    parent.children += 1
            self._blocks.move_to_end(key)
            chain.add(id(block))
            parent = block

    def _make_room(self, nbytes: int, keep: set[int]) -> bool:
        """Evict least recently used leaves (not in `keep`) until `nbytes` more fit; False if they cannot."""
        while self.bytes + nbytes > self.max_bytes:
            victim = next((b for b in self._blocks.values() if not b.children and id(b) not in keep), None)
            if victim is None:
                return False
            del self._blocks[victim.key]
            self.bytes -= victim.nbytes
            if victim.parent:
                victim.parent.children -= 1
        return True


def _slots_work(model, pad_id: int) -> bool:
    """Whether `Slots` gives this model's own logits: the layers fit (`_slots_fit`), and two short rows
    prefilled together and stepped once equal each row run alone. Models whose attention reads more than the
    mask and positions `Slots` hands it (an ALiBi bias built from a 2D mask, say) fail here and run `Padded`."""
    if not _slots_fit(model):
        return False
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    rows, nexts = [[(7 * i + 3) % vocab for i in range(6)], [(11 * i + 5) % vocab for i in range(3)]], [1, 2]
    try:
        batch = Slots(model, pad_id)
        got = [*batch.prefill(rows, [0, 1])[0], *batch.step(torch.tensor(nexts, device=device))]
        alone = [model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
                 for ids in (*rows, *(r + [t] for r, t in zip(rows, nexts, strict=True)))]
    except Exception:  # noqa: BLE001 - any failure means: not this way
        return False
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25  # bf16/fp16 round more
    return all(torch.allclose(a, b, atol=tolerance, rtol=tolerance) for a, b in zip(got, alone, strict=True))


class Slots:
    """The KV cache of a running batch, one slot per row, that rows join and leave without moving the others.

    Each layer's keys and values live in (slots, heads, columns, head dim) buffers. All rows write their
    next token's keys and values at the same column `t`, so a row holds its slot's columns `start..t`;
    columns left of its start are masked (the masks are built here and handed to the model as 4D masks, its
    positions as position ids). A finished row frees its slot and nothing moves; joining rows are prefilled
    straight into free slots, ending at column `t`. A step attends over the columns from the oldest row's
    start to `t`; free slots below the last row in use run as padding, and when they are most of the step,
    the last rows move down into them (`compact`). Buffers start small and double (slots, columns); when `t`
    reaches the last column, the live columns move back to the left edge.

    The model calls `update` (transformers' cache protocol) from each attention layer; `_write` says what
    the forward that runs writes."""

    joins = True

    def __init__(self, model, pad_id: int, prefixes: PrefixCache | None = None, root=None):
        self.model, self.pad_id = model, pad_id
        self.prefixes, self.root = prefixes, root  # blocks of earlier prompts (None: none kept), and their root
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.eager = model.config._attn_implementation == "eager"
        self.cache_arg = _cache_argument(model)
        self.keys: list[torch.Tensor] = []  # per layer, allocated by the first prefill
        self.values: list[torch.Tensor] = []
        self.slots = self.columns = 0  # capacity of the buffers
        self.t = 0  # the column the next step writes
        self.start: list[int] = []  # per slot up to the last one in use: the row's first column
        self.length: list[int] = []  # its tokens in the cache (the next token's position)
        self.used: list[bool] = []
        self._write: tuple = ()

    @property
    def n(self) -> int:
        """Slots a step runs: up to the last one in use (free ones below it run as padding)."""
        return len(self.used)

    def free_slots(self, count: int) -> list[int]:
        holes = [s for s in range(self.n) if not self.used[s]]
        return (holes + list(range(self.n, self.n + count)))[:count]

    def _claim(self, slot: int, start: int, length: int) -> None:
        """Mark `slot` in use by a row from column `start` with `length` tokens (slots below it exist, free)."""
        while self.n <= slot:
            self.used.append(False), self.start.append(self.t), self.length.append(0)
        self.used[slot], self.start[slot], self.length[slot] = True, start, length

    def _copy(self, src: int, dst: int) -> None:
        """Give slot `dst` the row of slot `src`: its columns, start and length."""
        for buffer in self.keys + self.values:
            buffer[dst, :, self.start[src]: self.t] = buffer[src, :, self.start[src]: self.t]
        self._claim(dst, self.start[src], self.length[src])

    def free(self, slot: int) -> None:
        self.used[slot], self.length[slot] = False, 0  # a free slot runs at position 0
        while self.used and not self.used[-1]:
            self.used.pop(), self.start.pop(), self.length.pop()

    def compact(self) -> list[tuple[int, int]]:
        """When most of the slots a step runs are free, move the last rows into the lowest free slots (a copy
        of each moved row's columns, not of the batch); the moves (from, to), for the rows' owner to follow."""
        holes = [s for s in range(self.n) if not self.used[s]]
        if 2 * len(holes) <= self.n:
            return []
        moves = []
        while holes and holes[0] < self.n - 1:
            src, dst = self.n - 1, holes.pop(0)
            self._copy(src, dst)
            self.free(src)
            moves.append((src, dst))
        return moves

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Write the prompts into `slots` (free ones) ending at column t: (their next-token logits (J, V), the
        tokens of each taken from the prefix cache). A prompt's cached blocks are copied into its slot and only
        the rest of it runs through the model, attending to them. A prompt given more than once (the choices
        of `n`) runs once; its other slots get copies of its columns."""
        seen: dict[tuple[int, ...], int] = {}  # a prompt -> the first of `prompts` that is it
        for j, prompt in enumerate(prompts):
            seen.setdefault(tuple(prompt), j)
        if len(seen) < len(prompts):
            once = sorted(seen.values())
            logits, cached = self.prefill([prompts[j] for j in once], [slots[j] for j in once])
            self._fit(max(slots) + 1, 0)
            source = [once.index(seen[tuple(p)]) for p in prompts]  # each prompt's row among those that ran
            for slot, k in zip(slots, source, strict=True):
                if slot != slots[once[k]]:
                    self._copy(slots[once[k]], slot)
            return logits[source], [cached[k] for k in source]
        found = [self.prefixes.find(self.root, p) if self.prefixes else [] for p in prompts]
        cached = [len(f) * self.prefixes.block if f else 0 for f in found]
        width = max(len(p) for p in prompts)  # the columns the prompts take: t - width .. t - 1
        self._fit(max(slots) + 1, width)
        for slot, prompt in zip(slots, prompts, strict=True):
            self._claim(slot, self.t - len(prompt), len(prompt))
        # what runs: each prompt's uncached rest, left-padded to one width, at columns t - run .. t - 1,
        # attending to its prompt's columns up to its own (cached ones included)
        ids, mask, positions = _left_padded([p[c:] for p, c in zip(prompts, cached, strict=True)], self.pad_id)
        run = ids.shape[1]
        q = torch.arange(run)
        pad = (run - mask.sum(-1))[:, None, None]  # (J, 1, 1)
        positions = positions + torch.tensor(cached)[:, None]  # the rest continues after its cached prefix
        column = torch.arange(self.t - width, self.t)  # (width,) the keys' columns
        first = torch.tensor([self.start[s] for s in slots])[:, None, None]  # (J, 1, 1) each prompt's first
        query_column = (self.t - run + q)[None, :, None]  # (1, run, 1)
        allowed = torch.where(q[None, :, None] >= pad, (column >= first) & (column <= query_column),
                              column == first)  # (J, run, width); a pad query reads its prompt's first key
        real = mask.nonzero()  # (M, 2): row, query index of every token that runs
        index = [x.to(self.device) for x in (torch.tensor(slots)[real[:, 0]], self.t - run + real[:, 1],
                                              real[:, 0], real[:, 1])]  # where each token that runs goes
        plan = [(slots[j], self.start[slots[j]], f) for j, f in enumerate(found) if f]
        self._write = (torch.tensor(slots, device=self.device), self.t - width, (*index, plan))
        logits = self._forward(ids, allowed[:, None], positions, logits_to_keep=1)
        if self.prefixes:
            block_bytes = self.prefixes.block * sum(x.shape[1] * x.shape[3] * x.element_size()
                                                    for x in self.keys + self.values)
            for slot, prompt, f in zip(slots, prompts, found, strict=True):
                self.prefixes.add(self.root, prompt, f, self._reader(slot), block_bytes)
        return logits, cached

    def _reader(self, slot: int):
        """`read(lo, hi)` for `PrefixCache.add`: copies of the slot's keys and values of its tokens lo..hi-1."""
        first = self.start[slot]
        return lambda lo, hi: ([k[slot, :, first + lo:first + hi].clone() for k in self.keys],
                               [v[slot, :, first + lo:first + hi].clone() for v in self.values])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run one token per slot (`tokens`: (n,), anything for free slots); next-token logits (n, V)."""
        n = self.n
        self._fit(n, 0)
        start = torch.tensor([s if u else self.t for s, u in zip(self.start, self.used, strict=True)])  # free: own column
        lo = int(start.min())
        allowed = torch.arange(lo, self.t + 1)[None, :] >= start[:, None]  # (n, t + 1 - lo)
        positions = torch.tensor(self.length)[:, None]
        self._write = (n, lo)
        logits = self._forward(tokens[:n, None], allowed[:, None, None], positions)
        self.t += 1
        self.length = [length + 1 if used else 0 for length, used in zip(self.length, self.used, strict=True)]
        return logits

    def _forward(self, ids, allowed, positions, **kwargs) -> torch.Tensor:
        if self.eager:  # eager attention adds the mask to its scores
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
        else:
            mask = allowed
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, **{self.cache_arg: self}, **kwargs)
        return out.logits[:, -1, :].float()

    def _fit(self, slots: int, width: int) -> None:
        """Room for `slots` slots, `width` columns left of column t (a prefill's), and column t itself."""
        live = [s for s in range(self.n) if self.used[s]]
        lo = min((self.start[s] for s in live), default=self.t)
        span = self.t - lo  # the live columns: lo..t-1
        move = not width <= self.t < self.columns
        t = max(width, span) if move else self.t  # move them to end at t
        columns = self.columns  # grown when full, or when a move would leave less than half of it to fill
        if t >= self.columns or (move and 2 * span > self.columns):
            columns = max(2 * self.columns, 2 ** (t + 64).bit_length())
        capacity = self.slots if slots <= self.slots else max(2 * self.slots, slots)
        if (t, columns, capacity) == (self.t, self.columns, self.slots):
            return
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old
                if (columns, capacity) != (self.columns, self.slots):
                    new = old.new_zeros((capacity, old.shape[1], columns, old.shape[3]))  # masked columns stay finite
                new[: self.n, :, t - span: t] = old[: self.n, :, lo: self.t].clone()
                buffers[i] = new
        self.start = [s + t - self.t for s in self.start]
        self.t, self.columns, self.slots = t, columns, capacity

    # transformers' cache protocol (the attention layers call it)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if isinstance(self._write[0], int):  # a step: slots 0..n-1 write column t and attend over lo..t
            n, lo = self._write
            keys, values = self.keys[layer_idx], self.values[layer_idx]
            keys[:n, :, self.t] = key_states[:, :, 0]
            values[:n, :, self.t] = value_states[:, :, 0]
            return keys[:n, :, lo: self.t + 1], values[:n, :, lo: self.t + 1]
        slots, lo, reuse = self._write  # a prefill: `slots` attend over the columns lo..t-1
        if layer_idx == len(self.keys):  # the first prefill allocates
            for buffers, states in ((self.keys, key_states), (self.values, value_states)):
                buffers.append(states.new_zeros((self.slots, states.shape[1], self.columns, states.shape[3])))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slot_of, column_of, row_of, query_of, plan = reuse
        for slot, first, blocks in plan:  # the cached prefixes, then the tokens that run
            end = first + len(blocks) * self.prefixes.block
            keys[slot, :, first:end] = torch.cat([block.keys[layer_idx] for block in blocks], dim=1)
            values[slot, :, first:end] = torch.cat([block.values[layer_idx] for block in blocks], dim=1)
        keys[slot_of, :, column_of] = key_states[row_of, :, query_of]
        values[slot_of, :, column_of] = value_states[row_of, :, query_of]
        return keys[slots, :, lo: self.t], values[slots, :, lo: self.t]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed


class Padded:
    """The batch for models `Slots` does not fit (sliding windows, other kinds of layers): transformers' own
    cache and masks over one left-padded batch prefilled at its start. Nothing joins it; finished rows leave
    it (`compact` drops them from the cache, and the rows after them move down)."""

    joins = False

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.cache_arg = _cache_argument(model)
        self.n = 0
        self.live: list[bool] = []
        self.cache = self.mask = self.positions = None

    def free_slots(self, count: int) -> list[int]:
        return list(range(self.n, self.n + count))

    def free(self, slot: int) -> None:
        self.live[slot] = False

    def compact(self) -> list[tuple[int, int]]:
        keep = [b for b in range(self.n) if self.live[b]]
        if len(keep) == self.n:
            return []
        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
        self.n, self.live = len(keep), [True] * len(keep)
        return [(src, dst) for dst, src in enumerate(keep) if src != dst]

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        assert self.n == 0 and slots == list(range(len(prompts)))
        self.n, self.live = len(prompts), [True] * len(prompts)
        device = next(self.model.parameters()).device
        ids, mask, positions = (x.to(device) for x in _left_padded(prompts, self.pad_id))
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.cache, self.mask, self.positions = getattr(out, self.cache_arg), mask, positions[:, -1:]
        return out.logits[:, -1, :].float(), [0] * len(prompts)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.n, 1))], dim=1)
        self.positions = self.positions + 1
        out = self.model(input_ids=tokens[: self.n, None].to(self.mask.device), attention_mask=self.mask,
                         position_ids=self.positions, use_cache=True, **{self.cache_arg: self.cache})
        self.cache = getattr(out, self.cache_arg)
        return out.logits[:, -1, :].float()


class Engine:
    """Dynamic batching over one worker thread (see module doc)."""

    def __init__(self, *, window_s: float = 0.01, max_batch: int = 32, max_adapters: int = 4,
                 prefix_cache_bytes: int = 256 * 2**20):
        self.window_s, self.max_batch, self.max_adapters = window_s, max_batch, max_adapters
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunekit-serve-engine", daemon=True)
        self.batches = 0  # batches run (for tests and the benchmark)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs, fail what waits, end the thread."""
        self._stopping.set()
        self._thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            job.emit(Failed("the server is shutting down"))

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        pending: deque[Job] = deque()  # submitted, not yet in a batch, in arrival order
        while not self._stopping.is_set():
            if not pending:
                try:
                    pending.append(self._queue.get(timeout=0.1))
                except queue.Empty:
                    continue
                self._take(pending, wait_s=self.window_s)
            part = self._admit(pending, _part_key(pending[0]), self.max_batch) or [pending.popleft()]  # n > max
            try:
                self._generate(part, pending)  # jobs that join the batch are appended to `part`
            except Exception as exc:  # a bug or an out-of-memory: the requests get a 500, the server lives
                for job in part:
                    job.emit(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
        for job in pending:
            job.emit(Failed("the server is shutting down"))

    def _take(self, pending: deque[Job], wait_s: float) -> None:
        """Move submitted jobs to `pending`: all that arrive within `wait_s` (0: those already there)."""
        deadline = time.monotonic() + wait_s
        while len(pending) < 4 * self.max_batch:
            try:
                pending.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                               if wait_s > 0 else self._queue.get_nowait())
            except queue.Empty:
                return

    @staticmethod
    def _admit(pending: deque[Job], key: tuple, room: int) -> list[Job]:
        """The jobs at the front of `pending` for the part `key` that fit in `room` rows, taken out of it.

        Only the front: a job for another model or adapter waits for the running batch to end, and later jobs
        do not overtake it (no starvation)."""
        taken: list[Job] = []
        while pending and _part_key(pending[0]) == key and sum(j.n for j in taken) + pending[0].n <= room:
            taken.append(pending.popleft())
        return taken

    # ---- adapters

    def _select(self, served: Served):
        """The model to run for `served`, with its adapter active (loaded on first use, LRU-unloaded)."""
        from peft import PeftModel

        w = served.weights
        if served.adapter is None:
            return w.model, (w.model.disable_adapter() if isinstance(w.model, PeftModel) else nullcontext())
        name = f"a{abs(hash(str(served.adapter)))}"  # peft adapter names may not contain dots or slashes
        if name not in w.adapters:
            if isinstance(w.model, PeftModel):
                w.model.load_adapter(str(served.adapter), adapter_name=name)
            else:
                w.model = PeftModel.from_pretrained(w.model, str(served.adapter), adapter_name=name)
            w.model.eval()
            w.adapters[name] = served.adapter
        w.adapters.move_to_end(name)
        w.model.set_adapter(name)
        while len(w.adapters) > self.max_adapters:
            oldest, _ = w.adapters.popitem(last=False)
            w.model.delete_adapter(oldest)
        w.model.set_adapter(name)
        return w.model, nullcontext()

    # ---- the loop

    def _generate(self, jobs: list[Job], pending: deque[Job]) -> None:
        """Run `jobs` (one model + adapter) to the end; jobs for the same part that arrive meanwhile join
        the batch between two steps (prefilled into free slots of its cache, see `Slots`)."""
        served = jobs[0].served
        key = _part_key(jobs[0])
        model, adapter_context = self._select(served)
        stop = set(served.stop_ids)
        self.batches += 1
        rows: list[_Row | None] = []  # by slot; None: a free slot
        with torch.inference_mode(), adapter_context:
            if served.weights.slots_work is None:  # probed once, at first use
                served.weights.slots_work = _slots_work(model, served.pad_id)
            batch = (Slots(model, served.pad_id, self.prefixes, root=(served.weights.key, key[1]))
                     if served.weights.slots_work else Padded(model, served.pad_id))
            logits = self._join(batch, rows, jobs, None)
            while any(row is not None for row in rows):
                tokens = self._choose(logits, rows)  # (n,)
                want_logprobs = any(r is not None and r.job.sampling.top_logprobs is not None for r in rows)
                logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # (n, V)
                out: list[tuple[Job, object]] = []  # this step's events, handed over at once
                chosen = tokens.tolist()  # one device-to-host copy per step, not one per row
                for slot, row in enumerate(rows):
                    if row is None:
                        continue
                    job, token = row.job, chosen[slot]
                    if job.cancelled[row.choice] or self._stopping.is_set():
                        out.append((job, Finished(row.choice, "cancelled")))
                    else:
                        row.produced += 1
                        out.append((job, self._token(row, token, token in stop, logprobs, slot)))
                        if token in stop:
                            out.append((job, Finished(row.choice, "stop")))
                        elif row.produced >= job.sampling.max_tokens:
                            out.append((job, Finished(row.choice, "length")))
                        else:
                            continue
                    rows[slot] = None  # finished: its slot is free
                    batch.free(slot)
                _deliver(out)
                for src, dst in batch.compact():  # rows that move to other slots (see `compact`)
                    rows[dst], tokens[dst] = rows[src], tokens[src]
                del rows[batch.n:]
                if rows:
                    logits = batch.step(tokens)
                if not batch.joins or self._stopping.is_set():
                    continue
                self._take(pending, wait_s=0.0)
                joining = self._admit(pending, key, self.max_batch - sum(r is not None for r in rows))
                if joining:
                    jobs.extend(joining)
                    logits = self._join(batch, rows, joining, logits if rows else None)

    @staticmethod
    def _join(batch, rows: list[_Row | None], jobs: list[Job], logits: torch.Tensor | None) -> torch.Tensor:
        """Prefill every choice of `jobs` into free slots of `batch` (filling `rows`); the next-token logits
        of all slots: `logits` of the rows already there, the new rows' from their prefill."""
        new: list[_Row] = []
        for job in jobs:
            for choice in range(job.n):
                generator = None
                if job.sampling.temperature > 0:
                    generator = torch.Generator(device="cpu")
                    if job.sampling.seed is not None:
                        generator.manual_seed((job.sampling.seed + choice) % 2**63)  # any int the client sends
                    else:
                        generator.seed()
                new.append(_Row(job, choice, generator))
        slots = batch.free_slots(len(new))
        new_logits, cached = batch.prefill([row.job.prompt for row in new], slots)
        for row, tokens in zip(new, cached, strict=True):
            if row.choice == 0:
                row.job.cached_tokens = tokens
        rows.extend([None] * (batch.n - len(rows)))
        merged = new_logits.new_zeros((batch.n, new_logits.shape[1]))
        if logits is not None:
            merged[: logits.shape[0]] = logits[: batch.n]
        for i, (slot, row) in enumerate(zip(slots, new, strict=True)):
            rows[slot] = row
            merged[slot] = new_logits[i]
        return merged

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[_Row | None]) -> torch.Tensor:
        """(n,) next tokens: argmax for greedy rows; temperature + top-p sampling with the row's generator."""
        tokens = logits.argmax(dim=-1).cpu()
        for b, row in enumerate(rows):
            if row is None or row.job.sampling.temperature <= 0:
                continue
            s = row.job.sampling
            probs = torch.softmax(logits[b].cpu() / s.temperature, dim=-1)  # (V,)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # mass before a token already >= p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[b] = torch.multinomial(probs, 1, generator=row.generator).item()
        return tokens.to(logits.device)

    @staticmethod
    def _token(row: _Row, token: int, end: bool, logprobs: torch.Tensor | None, b: int) -> Token:
        k = row.job.sampling.top_logprobs
        if logprobs is None or k is None:
            return Token(row.choice, token, end=end)
        top = ()
        if k > 0:
            values, indices = logprobs[b].topk(k)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        return Token(row.choice, token, float(logprobs[b, token]), top, end)
