"""The KV cache of a running batch: `Slots` (rows join and leave without moving the others), `Padded`
(transformers' own cache, for models `Slots` does not fit) and `PrefixCache` (the keys and values of earlier
prompts, reused by prompts that start the same way).

`Slots`: one slot per row in preallocated buffers, so a finished row frees its slot and a joining one is
prefilled into a free slot without copying the others (transformers' own cache grows by concatenation, a copy
of the whole cache per token). Models `Slots` does not serve (sliding windows, other kinds of layers,
attention that reads more than masks and positions: `cache_path`) run as `Padded`: transformers' cache and
masks, rows batched at the start, finished rows dropped, nothing joins.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from tunekit.families import sliding_window_of


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


def window(model) -> int | None:
    """The model's sliding window (`families.sliding_window_of`), None when every layer sees every token."""
    return sliding_window_of(model.config.to_dict())


def _slots_misfit(model) -> str | None:
    """Why `Slots` cannot hold this model's keys and values, None when it can: its layers attend through torch's
    SDPA or the eager implementation, whose masks `Slots` builds, and each is full or sliding-window attention.
    A sliding-window layer attends like a full one while a sequence fits in the window: the engine runs such
    sequences here and longer ones `Padded` (`Engine`, `fits`)."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation}"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    other = sorted({kind for kind in getattr(config, "layer_types", None) or []
                    if kind not in ("full_attention", "sliding_attention")})
    if other:
        return f"layers of kind {', '.join(other)}"
    return None


def fits(model_window: int | None, prompt: int, max_tokens: int) -> bool:
    """Whether a sequence of `prompt` + `max_tokens` tokens stays inside a sliding window (always, without one):
    a layer's window covers the token itself and the window - 1 before it."""
    return model_window is None or prompt + max_tokens <= model_window


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


def cache_path(model, pad_id: int) -> tuple[bool, str]:
    """(whether `Slots` serves this model, a sentence saying which path and why): the layers fit
    (`_slots_misfit`), and two short rows prefilled together and stepped once equal each row run alone. Models
    whose attention reads more than the mask and positions `Slots` hands it (an ALiBi bias built from a 2D
    mask, say) fail here and run `Padded`."""
    why = _slots_misfit(model)
    if why is not None:
        return False, f"KV cache: padded (transformers' own cache) for {why}"
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    rows, nexts = [[(7 * i + 3) % vocab for i in range(6)], [(11 * i + 5) % vocab for i in range(3)]], [1, 2]
    try:
        batch = Slots(model, pad_id)
        got = [*batch.prefill(rows, [0, 1])[0], *batch.step(torch.tensor(nexts, device=device))]
        alone = [model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
                 for ids in (*rows, *(r + [t] for r, t in zip(rows, nexts, strict=True)))]
    except Exception as exc:  # noqa: BLE001 - any failure means: not this way
        return False, f"KV cache: padded (transformers' own cache): slots failed its probe ({type(exc).__name__})"
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.25  # bf16/fp16 round more
    if not all(torch.allclose(a, b, atol=tolerance, rtol=tolerance) for a, b in zip(got, alone, strict=True)):
        return False, "KV cache: padded (transformers' own cache): slots' logits differ from the model's own"
    size = window(model)
    if size is None:
        return True, "KV cache: slots (fast path)"
    return True, (f"KV cache: slots (fast path) while prompt + max_tokens <= the sliding window ({size}), "
                  "padded (transformers' own cache) beyond it")


def _slots_work(model, pad_id: int) -> bool:
    return cache_path(model, pad_id)[0]


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


