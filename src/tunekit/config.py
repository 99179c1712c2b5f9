"""Typed run configuration: YAML -> pydantic models -> passed down as objects.

`load_config(path, overrides)` reads a YAML file, applies dotted overrides (`train.lr=2e-4`), and
validates everything at once. Every problem is reported together with its field path, the YAML line
where the field stands, and a hint. Nothing here loads weights.

Relative paths in a config file (data files, a local `model.base`, `output.dir`) are resolved against
the directory of that file, so a config works from any working directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunekit.errors import ConfigError, Problem
from tunekit.locate import locate_model


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = Field(description="Hub id, local model dir, or an earlier tunekit run dir")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    # When `base` is an earlier run that produced an adapter: "merge" folds it into the base weights
    # and trains a new adapter on top; "continue" keeps training the same adapter.
    previous_adapter: Literal["merge", "continue"] = "merge"


class DataConfig(Section):
    train: Path
    validation: Path | None = None
    validation_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.0
    # "preference": pairs for objective: dpo (auto recognises them too; see docs/preference.md)
    # "reinforcement": prompts for objective: grpo (chat messages ending with a user or developer turn)
    format: Literal["auto", "chat", "completion", "text", "preference", "reinforcement"] = "auto"
    max_len: Annotated[int, Field(ge=16)] = 2048
    # "drop": examples longer than max_len are left out and reported (default: nothing is cut silently).
    # "truncate": cut at max_len; trained tokens past the cut are lost and counted.
    truncation: Literal["drop", "truncate"] = "drop"
    packing: bool = True
    # A template that rewrites earlier turns when a turn is appended (not prefix-stable):
    # "split" trains each assistant turn in its own sequence, as the model sees it at inference;
    # "error" refuses such examples.
    unstable_template: Literal["split", "error"] = "split"
    # Processes that render examples (chat template + masking), results in file order. "auto": every core
    # this process may use.
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # Rendered data is kept on disk and reused while the file, tokenizer, template and these options are the
    # same (tunekit.data.cache). cache_dir: None is $TUNEKIT_DATA_CACHE or ~/.cache/tunekit/data.
    cache: bool = True
    cache_dir: Path | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.validation is not None and self.validation_fraction > 0:
            raise ValueError("set either data.validation (a file) or data.validation_fraction, not both")
        return self


class LoraConfig(Section):
    r: Annotated[int, Field(ge=1)] = 16
    alpha: Annotated[float, Field(gt=0)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # "all-linear": every nn.Linear in the transformer blocks (not the LM head).
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    # Mixture-of-experts: also train the router that picks each token's experts (all-linear leaves it frozen).
    train_router: bool = False
    use_rslora: bool = False
    use_dora: bool = False


class QuantConfig(Section):
    """bitsandbytes 4-bit base for method: qlora."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


class DistributedConfig(Section):
    """Several processes (`tunekit train --nproc N`, or torchrun): how the model is spread over them."""

    # auto: ddp for lora / qlora, fsdp2 for full. ddp: every process holds the whole model and gradients
    # are averaged. fsdp2: parameters, gradients and optimizer state sharded (torch fully_shard per decoder
    # layer). deepspeed: refused (see docs/distributed.md).
    strategy: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"
    # Seconds a collective (all-reduce, all-gather) waits for the other processes before it fails the run.
    timeout_s: Annotated[int, Field(ge=10)] = 600


class TrainConfig(Section):
    epochs: Annotated[int, Field(ge=1, le=100)] | Literal["auto"] = "auto"
    max_steps: Annotated[int, Field(ge=1)] | None = None
    lr: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = "auto"
    # Rows (packed sequences of up to data.max_len tokens) per optimizer step. "auto": batch_tokens / max_len.
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    batch_tokens: Annotated[int, Field(ge=16)] = 16384
    micro_batch_size: Annotated[int, Field(ge=1)] = 1
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    gradient_checkpointing: bool = False
    # "bf16": forward in bfloat16 autocast (weights, gradients, optimizer and loss stay in model.dtype).
    # Fast on GPUs and on CPUs with AVX512-BF16/AMX; slower than fp32 on CPUs without them.
    mixed_precision: Literal["no", "bf16"] = "no"
    seed: int = 42
    log_every: Annotated[int, Field(ge=1)] = 1
    eval_every: Annotated[int, Field(ge=1)] | None = None
    save_every: Annotated[int, Field(ge=1)] | None = None
    keep_last: Annotated[int, Field(ge=1)] = 2
    # Tokens per chunk when projecting trained positions through the LM head (bounds peak memory).
    lm_head_chunk: Annotated[int, Field(ge=64)] = 4096
    # torch threads per process: a number, "auto" (the free cores: the affinity's cores less the load average's
    # other work, shared among --nproc processes; tunekit.train.loop.auto_threads), or None (torch's default:
    # every core, also those other work keeps busy)
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class DpoConfig(Section):
    """The preference objective (objective: dpo; docs/preference.md, "Training with preferences")."""

    # Strength of the implicit KL tie to the reference: rewards are beta x (policy - reference) log-probs.
    beta: Annotated[float, Field(gt=0, le=2)] = 0.1
    # sigmoid: DPO; ipo: IPO (squared loss on length-normalised log-ratios); orpo: odds ratio + NLL of the
    # preferred side; simpo: length-normalised margin minus simpo_gamma. ORPO and SimPO use no reference model.
    loss: Literal["sigmoid", "ipo", "orpo", "simpo"] = "sigmoid"
    # Conservative DPO / SimPO: the share of pairs assumed to be labelled the wrong way round.
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.0
    # Weight of an NLL term on the preferred side (per-token mean), as RPO; ORPO has its own at weight 1.
    sft_weight: Annotated[float, Field(ge=0)] = 0.0
    # SimPO's target reward margin (gamma, in reward units).
    simpo_gamma: Annotated[float, Field(ge=0)] = 0.5
    # The reference log-probs: adapter-off (LoRA / QLoRA: the base with the adapter switched off), precompute
    # (computed once before training, kept in the run dir); auto: adapter-off for a new adapter, else precompute.
    reference: Literal["auto", "adapter-off", "precompute"] = "auto"


class GrpoConfig(Section):
    """The reinforcement objective (objective: grpo; docs/grpo.md): GRPO with an OpenAI grader as the reward."""

    # The reward: a grader file (JSON or YAML, one grader object) or the grader inline, in OpenAI's shapes
    # (string_check, text_similarity, python, multi); its {{item.field}} read the training line's fields.
    grader: dict[str, Any] | Path | None = None
    # Completions sampled per prompt; the advantage of each is its reward against its group's.
    group_size: Annotated[int, Field(ge=2)] = 4
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    temperature: Annotated[float, Field(gt=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Weight of the KL to the reference (k3 estimator, per token); the reference is the base with the adapter
    # switched off, never a second copy. 0.04: DeepSeekMath's GRPO; 0 skips the reference forward.
    beta: Annotated[float, Field(ge=0)] = 0.04
    # PPO clipping of the importance ratio to [1 - epsilon, 1 + epsilon].
    epsilon: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # Optimizer steps per rollout batch: generation covers this many steps' prompts at once, later steps
    # correct with the importance ratio against the log-probs at generation.
    steps_per_generation: Annotated[int, Field(ge=1)] = 1
    # token: every completion token of the step weighs the same (DAPO); sequence: each completion's token mean,
    # then the mean over completions (GRPO paper); constant: each completion's token sum / max_new_tokens,
    # then the mean over completions (Dr. GRPO).
    loss_norm: Literal["token", "sequence", "constant"] = "token"
    # Advantage = (reward - group mean) / group std (true), or reward - group mean (false, Dr. GRPO).
    scale_rewards: bool = True
    # Completions the engine runs at once during rollouts (bounds the KV cache).
    generation_batch_size: Annotated[int, Field(ge=1)] = 64
    # The judges of score_model / label_model graders: the grader's `model` name -> a local model dir or run
    # (loaded once in the training process, answering greedily with its chat template).
    judges: dict[str, Path] = Field(default_factory=dict)


class EvalConfig(Section):
    enabled: bool = False
    data: Path | None = None  # default: data.validation
    baselines: list[str] = Field(default_factory=lambda: ["base"])  # "base", "few-shot:K", "rag:K", or a model dir
    max_new_tokens: Annotated[int, Field(ge=1)] = 256
    batch_size: Annotated[int, Field(ge=1)] = 8
    limit: Annotated[int, Field(ge=1)] | None = None
    scorer: str | None = None  # "module:function"
    seed: int = 0


class WandbConfig(Section):
    """Weights & Biases (`TUNEKIT_EXTRAS=trackers bash scripts/setup.sh`)."""

    project: str = "tunekit"
    entity: str | None = None
    name: str | None = None  # default: the run dir's name
    tags: list[str] = Field(default_factory=list)
    # offline: written under RUN_DIR/wandb, nothing sent (upload later with `wandb sync`).
    # None: wandb's own default (the WANDB_MODE environment variable, else online).
    mode: Literal["online", "offline", "disabled"] | None = None


class MlflowConfig(Section):
    """MLflow (`TUNEKIT_EXTRAS=trackers bash scripts/setup.sh`)."""

    # None: $MLFLOW_TRACKING_URI, else a local file store in RUN_DIR/mlruns.
    tracking_uri: str | None = None
    experiment: str = "tunekit"


class OutputConfig(Section):
    dir: Path = Path("runs/default")
    overwrite: bool = False
    tensorboard: bool = False  # event files in RUN_DIR/tensorboard
    wandb: WandbConfig | None = None  # `wandb: {}` turns it on with the defaults
    mlflow: MlflowConfig | None = None  # `mlflow: {}` turns it on with the defaults


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    # sft: next-token NLL on chat / completion / text data; dpo: preference pairs (the dpo section); grpo:
    # reinforcement from a grader on prompts (the grpo section).
    objective: Literal["sft", "dpo", "grpo"] = "sft"
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    grpo: GrpoConfig = Field(default_factory=GrpoConfig)

    def to_yaml(self) -> str:
        """The resolved config as YAML (saved next to the weights so a run can be reproduced)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=2e-4` -> (["train", "lr"], 0.0002). The value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(Problem(text, "an override must look like section.key=value", "e.g. train.lr=2e-4"))
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(Problem(text, "the override has no key", "e.g. train.lr=2e-4"))
    try:
        value = _read_yaml(raw, text) if raw.strip() else None
    except ConfigError:
        value = raw  # not YAML: taken as the literal string (validation decides)
    return path, value


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans; yes/no/on/off stay strings.

    So a literal value such as `mixed_precision: no` keeps its meaning; bool fields still accept
    yes/no/on/off, which pydantic reads as booleans.
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


# What one config may cost to read: its size, its nesting, and the number of values it expands to
# (YAML aliases let a few lines stand for billions of values).
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 10_000


def _read_yaml(text: str, source: str) -> Any:
    """Parse YAML text with bounded cost; every failure is a ConfigError naming `source` (and the line).

    Safe loading only (_Loader is a SafeLoader: tags that would build Python objects are errors).
    """
    def error(message: str, hint: str, line: int | None = None) -> ConfigError:
        return ConfigError(Problem(f"{source}:{line}" if line else source, message, hint))

    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise error(f"the config is larger than {MAX_CONFIG_BYTES // 2**20} MiB", "a run config is a few dozen lines")
    try:
        root = yaml.compose(text, Loader=_Loader)
        stack, seen = [(root, 1)], 0
        while stack:  # iterative: counts values as aliases expand them, without building them
            node, depth = stack.pop()
            seen += 1
            if seen > MAX_CONFIG_VALUES:
                raise error(f"the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases)",
                            "write the values out instead of nesting anchors and aliases")
            if depth > MAX_CONFIG_DEPTH:
                raise error(f"the config is nested more than {MAX_CONFIG_DEPTH} levels deep", "flatten it",
                            node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                stack += [(n, depth + 1) for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                stack += [(n, depth + 1) for n in node.value]
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"not valid YAML: {getattr(exc, 'problem', None) or exc}",
                    "check indentation and quoting on that line", mark.line + 1 if mark else None) from None
    except RecursionError:
        raise error("the config is nested too deeply to read", "flatten it") from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of thousands of digits
        kind = "a number has too many digits" if "digits" in str(exc) else f"a value cannot be read: {exc}"
        raise error(kind, "write numbers as plain decimals of reasonable size") from None


def _set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each mapping-key path in a YAML document to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    if root is not None:
        walk(root, ())
    return lines


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (to suggest close key names)."""
    model: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _hint(err: dict) -> str | None:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        if loc == ("output", "trackers"):
            return "trackers are sections now: output.tensorboard: true, output.wandb: {project: ...}, output.mlflow: {}"
        owner = _model_for(loc)
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1)
            if close:
                return f"did you mean '{close[0]}'?"
            return "known keys here: " + ", ".join(owner.model_fields)
        return "remove this key"
    if kind == "missing":
        return "add this key; it has no default"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected")
        return f"use one of {expected}" if expected else None
    return None


def _is_union_tag(part: object) -> bool:
    """pydantic tags union branches in error locations ("constrained-float", "literal['auto']")."""
    return isinstance(part, str) and ("[" in part or "-" in part or part in {"int", "float", "str", "bool"})


def _validation_problems(exc: ValidationError, source: str, key_lines: dict) -> list[Problem]:
    problems = []
    for err in exc.errors():
        # Drop pydantic's union branch tags like "int" / "literal['auto']" from the location.
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        if err["type"] == "extra_forbidden" and err["loc"]:
            loc = tuple(p for p in err["loc"][:-1] if not _is_union_tag(p)) + (err["loc"][-1],)  # the user's key
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):
            line = key_lines.get(tuple(str(p) for p in loc[:n]))
            if line:
                break
        where = f"{source}:{line} {dotted}" if line else f"{source} {dotted}"
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and loc:
            msg = f"unknown key '{loc[-1]}'"
        problems.append(Problem(where, msg, _hint({**err, "loc": loc})))
    # Union errors report one problem per branch; keep the first per location.
    seen, unique = set(), []
    for p in problems:
        if p.where not in seen:
            seen.add(p.where)
            unique.append(p)
    return unique


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base_dir / p)

    cfg.data.train = fix(cfg.data.train)
    cfg.data.validation = fix(cfg.data.validation)
    cfg.eval.data = fix(cfg.eval.data)
    cfg.output.dir = fix(cfg.output.dir)
    if isinstance(cfg.grpo.grader, Path):
        cfg.grpo.grader = fix(cfg.grpo.grader)
    cfg.grpo.judges = {name: fix(path) for name, path in cfg.grpo.judges.items()}
    local_base = base_dir / cfg.model.base
    if not Path(cfg.model.base).is_absolute() and local_base.exists():
        cfg.model.base = str(local_base.resolve())
    return cfg


def _file_problems(cfg: RunConfig, source: str, key_lines: dict, base_dir: Path) -> list[Problem]:
    problems = []
    for dotted, path in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation),
                         ("eval.data", cfg.eval.data)):
        if path is not None and not Path(path).is_file():
            line = key_lines.get(tuple(dotted.split(".")))
            where = f"{source}:{line} {dotted}" if line else f"{source} {dotted}"
            problems.append(Problem(where, f"file not found: {path}",
                                    "relative paths are resolved against the config file's directory"))
    line = key_lines.get(("model", "base"))
    located = locate_model(cfg.model.base, base_dir,
                           field=f"{source}:{line} model.base" if line else f"{source} model.base")
    if isinstance(located, Problem):
        problems.append(located)
    return problems


def config_from_dict(data: dict, *, source: str = "<config>", base_dir: Path | None = None,
                     key_lines: dict | None = None, check_files: bool = True) -> RunConfig:
    """Validate a plain dict (e.g. built in Python) into a RunConfig, reporting every problem at once."""
    key_lines = key_lines or {}
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, source, key_lines),
                          title=f"{source}: invalid config") from None
    cfg = _resolve_paths(cfg, base_dir or Path.cwd())
    if check_files:
        problems = _file_problems(cfg, source, key_lines, base_dir or Path.cwd())
        if problems:
            raise ConfigError(problems, title=f"{source}: invalid config")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, *, check_files: bool = True) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate everything at once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(Problem(str(path), "config file not found", "check the path"))
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(Problem(str(path), f"the config is larger than {MAX_CONFIG_BYTES // 2**20} MiB",
                                  "a run config is a few dozen lines"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(str(path), f"not UTF-8 text (byte {exc.start + 1})", "save the config as UTF-8")) from None
    data = _read_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(str(path), "the config must be a mapping of sections",
                                  "start with 'model:' and 'data:' sections"))
    for text_override in overrides or []:
        keys, value = parse_override(text_override)
        _set_dotted(data, keys, value)
    return config_from_dict(data, source=str(path), base_dir=path.parent.resolve(),
                            key_lines=_key_lines(text), check_files=check_files)
