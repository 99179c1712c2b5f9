"""What a server (or an evaluation) holds: base weights loaded once, the adapters of runs on them, the tokenizer
and stop tokens of each name.

Loading (`load_models`): every MODEL argument becomes a `Served` name. Weights are loaded once per base:
runs whose adapter was trained on the same base (a model dir, a hub id or a full-weights run) share one copy
of it (`Weights`), their adapters are attached with peft's multi-adapter API on first use (by the engine) and
chosen per batch. A run whose base is itself an adapter run (a chain) is loaded on its own with
`model.load_for_inference` (merged), so it answers exactly as `tunekit chat`. Files are read by `tunekit.model`,
the one loader.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunekit.data.render import end_of_turn_ids
from tunekit.errors import Problem, TunekitError
from tunekit.generate.kvcache import cache_path, window
from tunekit.locate import locate_model
from tunekit.model import ADAPTER_CONFIG, load_causal_lm, load_tokenizer, read_run_dir

log = logging.getLogger("tunekit.generate")


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
    slots_work: bool | None = None  # whether `Slots` serves this model (`kvcache.cache_path`; None: not probed yet)
    path: str = ""  # which KV cache the engine runs it with, and why (`kvcache.cache_path`)
    window: int | None = None  # its sliding window (`kvcache.window`): longer sequences run `Padded`
    as_is: bool = False  # run the model as given (`engine.generate`): no adapters attached or switched off

    def __post_init__(self) -> None:
        self.window = window(self.model)

    def probe(self, pad_id: int) -> str:
        """Decide (once) which KV cache the engine runs these weights with; the sentence that says it."""
        if self.slots_work is None:
            with torch.inference_mode():
                self.slots_work, self.path = cache_path(self.model, pad_id)
        return self.path


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
                weights[key] = Weights(key, load_causal_lm(key, device, where=f"MODEL {spec.name}"))
            w = weights[key]
            tokenizer = load_tokenizer(tok_source, where=f"MODEL {spec.name}")
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
        log.info("%s: %s", spec.name, w.probe(pad))
    return served


