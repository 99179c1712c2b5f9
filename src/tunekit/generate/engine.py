"""The generation engine: one batched loop that the server, the evaluation and `tunekit chat` all generate with.

Generation (`Engine`): one worker thread owns the models. Requests that arrive within `window_s` of each other
form a batch of one part (the same weights and adapter); it runs through the loop in `Engine._generate`, which
reads top to bottom: prefill, then per step choose a token for every row (greedy, or sampled with the row's
temperature / top_p / seed), hand it to the request, stop rows at the template's end-of-turn ids, at their
token limit, or when their request is gone, and let requests for the same part that arrived meanwhile join
between two steps, so a new request waits one step, not a whole batch. Requests for another part wait until
the batch ends. A request reads what the loop produces through its `Job`'s sink: an asyncio queue for the
server, a list for `generate` (the same loop run in the caller's thread, for evaluation and chat).

The batch's KV cache is `kvcache.Slots` (or `kvcache.Padded`); a prompt that starts like an earlier one is
prefilled from the blocks of it kept in the engine's `kvcache.PrefixCache`. Adapters are attached to their
base on first use and the least recently used are unloaded past `max_adapters`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from tunekit.generate.kvcache import Padded, PrefixCache, Slots, fits
from tunekit.generate.models import Served

# --------------------------------------------------------------------------------------------------
# Requests as the loop sees them


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
    """One request: `n` choices of one prompt. The loop writes events, the request reads them: from an asyncio
    queue (`loop` given: the server's requests, the loop in the engine's thread), or from `received` once
    `Engine.run` returns (`loop` None: the loop ran in the caller's thread)."""

    def __init__(self, served: Served, prompt: list[int], sampling: Sampling, n: int,
                 loop: asyncio.AbstractEventLoop | None):
        self.served, self.prompt, self.sampling, self.n = served, prompt, sampling, n
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.received: list = []  # the events of a job run by `Engine.run`
        self.cancelled = [False] * n  # set by the request (stop string found, client gone); read by the worker
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache (set by the worker)
        self._loop = loop

    def emit(self, event) -> None:  # called from the thread the loop runs in
        if self._loop is None:
            self.received.append(event)
        else:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, choice: int | None = None) -> None:
        for i in range(self.n) if choice is None else [choice]:
            self.cancelled[i] = True


def _deliver(events: list[tuple[Job, object]]) -> None:
    """Hand a step's events to their requests with one wake-up of each event loop (not one per token)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
    for job, event in events:
        if job._loop is None:
            job.received.append(event)
        else:
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



def _part_key(job: Job) -> tuple:
    """Jobs with the same key run in one batch: the same weights with the same adapter (or none), and either all
    within the model's sliding window (if it has one) or not (those run `Padded`, see `kvcache.fits`)."""
    weights = job.served.weights
    inside = fits(weights.window, len(job.prompt), job.sampling.max_tokens)
    return id(weights), str(job.served.adapter) if job.served.adapter else None, inside



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

    def run(self, jobs: list[Job]) -> None:
        """Run `jobs` (made with `loop=None`) to the end in the calling thread, through the same loop as the
        server's requests: rows leave as they finish and the next jobs join in their place. Their events are
        in each job's `received`."""
        pending = deque(jobs)
        while pending:
            part = self._admit(pending, _part_key(pending[0]), self.max_batch) or [pending.popleft()]
            self._generate(part, pending)

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
        if w.as_is:  # a model handed to `generate`: run as it is, its adapter (if any) active
            return w.model, nullcontext()
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
            served.weights.probe(served.pad_id)  # once per weights (`load_models` probes at load)
            batch = (Slots(model, served.pad_id, self.prefixes, root=(served.weights.key, key[1]))
                     if served.weights.slots_work and key[2] else Padded(model, served.pad_id))
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


# --------------------------------------------------------------------------------------------------
# Generation in the caller's thread (evaluation, chat, rollouts)


@dataclass
class Generation:
    ids: list[int]  # generated tokens up to (not including) the first end-of-turn id
    stopped: bool  # an end-of-turn id was generated (False: cut by max_new_tokens)
    latency_ms: float  # wall time of the whole call / prompts: the mean time a request took at this batch size


def generate(model, prompts: list[list[int]], *, stop_ids: list[int], pad_id: int, max_new_tokens: int,
             batch_size: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
    """The continuation of each prompt by `model` as it is (a peft model with its adapter active included),
    greedy unless `temperature` > 0, stopping at any of `stop_ids` (empty: the model's configured eos), through
    the engine's loop with `batch_size` rows at a time (rows leave as they finish, the next prompts join)."""
    from tunekit.generate.models import Weights

    stop = list(stop_ids) or _configured_eos(model)
    served = Served("", "", Weights("as-is", model, as_is=True), None, None, stop, pad_id,
                    int(getattr(model.config, "max_position_embeddings", None) or 2048))
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    jobs = [Job(served, list(prompt), sampling, 1, None) for prompt in prompts]
    engine = Engine(max_batch=batch_size, prefix_cache_bytes=0)
    began = time.perf_counter()
    engine.run(jobs)
    per_request_ms = (time.perf_counter() - began) * 1000.0 / max(1, len(jobs))
    out = []
    for job in jobs:
        tokens = [e for e in job.received if isinstance(e, Token)]
        failed = [e for e in job.received if isinstance(e, Failed)]
        if failed:
            raise RuntimeError(failed[0].message)
        stopped = any(isinstance(e, Finished) and e.reason == "stop" for e in job.received)
        out.append(Generation([t.id for t in tokens if not t.end], stopped, per_request_ms))
    return out


def _configured_eos(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
