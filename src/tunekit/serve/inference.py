"""The models a server holds and the generation loop that answers requests.

Loading (`load_models`): every MODEL argument becomes a `Served` name. Weights are loaded once per base:
runs whose adapter was trained on the same base (a model dir, a hub id or a full-weights run) share one copy
of it (`Weights`), their adapters are attached with peft's multi-adapter API on first use and chosen per batch;
past `max_adapters` the least recently used adapter is unloaded. A run whose base is itself an adapter run
(a chain) is loaded on its own with `load_for_inference` (merged), so it answers exactly as `tunekit chat`.

Generation (`Engine`): one worker thread owns the models. Requests that arrive within `window_s` of each other
form a batch of one part (the same weights and adapter); it runs as one left-padded batch through the loop in
`Engine._generate`, which reads top to bottom: prefill, then per step choose a token for every row (greedy, or
sampled with the row's temperature / top_p / seed), hand it to the request, stop rows at the template's
end-of-turn ids, at their token limit, or when their request is gone, drop finished rows from the batch and
its KV cache, and let requests for the same part that arrived meanwhile join: they are prefilled on their own
and merged into the batch (cache and mask left-padded to one length), so a new request waits one step, not a
whole batch. Requests for another part wait until the batch ends. Requests read what the worker produces from
an asyncio queue (`Job.events`).
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
from tunekit.model import ADAPTER_CONFIG, read_run_dir

# --------------------------------------------------------------------------------------------------
# What is served


@dataclass(frozen=True)
class ModelSpec:
    """One MODEL argument: a name and what to load (model dir, hub id, run dir, adapter dir)."""

    name: str
    path: str


def parse_model_arg(text: str) -> ModelSpec:
    """`NAME=PATH` or `PATH` (named after the dir, or the hub id itself). NAME may hold `/` and `:`."""
    name, sep, path = text.partition("=")
    local = Path(text).expanduser()
    if sep and name and path and not local.exists():
        return ModelSpec(name, path)
    if local.exists():
        return ModelSpec(local.resolve().name, text)
    return ModelSpec(text, text)


@dataclass
class Weights:
    """One copy of model weights in memory, with the adapters attached to it (most recently used last)."""

    key: str  # what was loaded: a resolved local path or a hub id
    model: object  # a transformers model, a peft PeftModel once an adapter is attached
    adapters: OrderedDict[str, Path] = field(default_factory=OrderedDict)


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
        self._loop = loop

    def emit(self, event) -> None:  # called from the worker thread
        self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self, choice: int | None = None) -> None:
        for i in range(self.n) if choice is None else [choice]:
            self.cancelled[i] = True


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


def _mergeable(cache) -> bool:
    """Rows can join a running batch when every cache layer is a plain growing (B, H, T, D) key/value pair."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _left_pad(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`x` with zeros put before its entries along `dim` up to `width` (masked positions)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _merge_caches(cache, new, width: int) -> None:
    """Append the rows of `new` to `cache`, both left-padded to `width` positions: (B, H, T, D) per layer."""
    for layer, extra in zip(cache.layers, new.layers, strict=True):
        layer.keys = torch.cat([_left_pad(layer.keys, width, 2), _left_pad(extra.keys, width, 2)])
        layer.values = torch.cat([_left_pad(layer.values, width, 2), _left_pad(extra.values, width, 2)])


def _cache_argument(model) -> str:
    """The name of the KV-cache argument and output: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect

    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class Engine:
    """Dynamic batching over one worker thread (see module doc)."""

    def __init__(self, *, window_s: float = 0.01, max_batch: int = 32, max_adapters: int = 4):
        self.window_s, self.max_batch, self.max_adapters = window_s, max_batch, max_adapters
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
        the batch between two steps (prefilled on their own, then merged into the batch and its cache)."""
        served = jobs[0].served
        key = _part_key(jobs[0])
        model, adapter_context = self._select(served)
        device = next(model.parameters()).device
        stop = set(served.stop_ids)
        cache_arg = _cache_argument(model)
        self.batches += 1
        with torch.inference_mode(), adapter_context:
            rows, cache, mask, positions, logits = self._prefill(model, served, jobs, device, cache_arg)
            joinable = _mergeable(cache)
            while rows:
                tokens = self._choose(logits, rows)  # (B,)
                want_logprobs = any(r.job.sampling.top_logprobs is not None for r in rows)
                logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # (B, V)
                keep = []
                for b, row in enumerate(rows):
                    job, token = row.job, int(tokens[b])
                    if job.cancelled[row.choice] or self._stopping.is_set():
                        job.emit(Finished(row.choice, "cancelled"))
                        continue
                    row.produced += 1
                    job.emit(self._token(row, token, token in stop, logprobs, b))
                    if token in stop:
                        job.emit(Finished(row.choice, "stop"))
                    elif row.produced >= job.sampling.max_tokens:
                        job.emit(Finished(row.choice, "length"))
                    else:
                        keep.append(b)
                if len(keep) < len(rows):  # drop finished rows from the batch and the KV cache
                    index = torch.tensor(keep, dtype=torch.long, device=device)
                    cache.batch_select_indices(index)
                    tokens, mask, positions = tokens[index], mask[index], positions[index]
                    rows = [rows[b] for b in keep]
                if rows:
                    mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # (B, T + 1)
                    positions = positions[:, -1:] + 1  # (B, 1)
                    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                                use_cache=True, **{cache_arg: cache})
                    cache = getattr(out, cache_arg)
                    logits = out.logits[:, -1, :].float()
                if not joinable or self._stopping.is_set():
                    continue
                self._take(pending, wait_s=0.0)
                joining = self._admit(pending, key, self.max_batch - len(rows))
                if not joining:
                    continue
                jobs.extend(joining)
                new = self._prefill(model, served, joining, device, cache_arg)
                if not rows:
                    rows, cache, mask, positions, logits = new
                    continue
                new_rows, new_cache, new_mask, new_positions, new_logits = new
                width = max(mask.shape[1], new_mask.shape[1])
                _merge_caches(cache, new_cache, width)
                mask = torch.cat([_left_pad(mask, width), _left_pad(new_mask, width)])
                positions = torch.cat([positions[:, -1:], new_positions[:, -1:]])
                logits = torch.cat([logits, new_logits])
                rows = rows + new_rows

    def _prefill(self, model, served: Served, jobs: list[Job], device, cache_arg: str):
        """(rows, cache, mask, positions, next-token logits) of `jobs` as one left-padded batch."""
        rows: list[_Row] = []
        for job in jobs:
            for choice in range(job.n):
                generator = None
                if job.sampling.temperature > 0:
                    generator = torch.Generator(device="cpu")
                    if job.sampling.seed is not None:
                        generator.manual_seed((job.sampling.seed + choice) % 2**63)  # any int the client sends
                    else:
                        generator.seed()
                rows.append(_Row(job, choice, generator))
        width = max(len(r.job.prompt) for r in rows)
        ids = torch.full((len(rows), width), served.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):  # left padding: every row's next token is read from the last column
            n = len(row.job.prompt)
            ids[b, width - n:] = torch.tensor(row.job.prompt)
            mask[b, width - n:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) pads get position 0, real tokens 0..n-1
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)  # logits of the last position only: (B, 1, V)
        return rows, getattr(out, cache_arg), mask, positions, out.logits[:, -1, :].float()

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """(B,) next tokens: argmax for greedy rows; temperature + top-p sampling with the row's generator."""
        tokens = logits.argmax(dim=-1).cpu()
        for b, row in enumerate(rows):
            s = row.job.sampling
            if s.temperature <= 0:
                continue
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
