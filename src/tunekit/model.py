"""Load a base model (hub id, local dir, or an earlier tunekit run) and make it trainable.

`load_base(cfg)` gives the model training starts from; `apply_method(model, cfg)` makes the
parameters that train trainable: all of them (full), or a LoRA adapter (lora; qlora = the same adapter
over a bitsandbytes 4-bit base). `load_for_inference(path)` loads what a run produced.

Run dir layout (written by tunekit.train.loop): RUN_DIR/config.yaml, RUN_DIR/final/ (a peft adapter or a full
model, plus the tokenizer), RUN_DIR/checkpoints/step-NNNNNN/ (same weight format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunekit.config import RunConfig, load_config
from tunekit.errors import ConfigError, Problem, TunekitError
from tunekit.families import Architecture, architecture, lora_targets, read_architecture
from tunekit.families import check as check_architecture
from tunekit.families import resolve_attn as resolve_family_attn
from tunekit.locate import locate_model

ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------------------------------
# Settings resolved from "auto"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA device that supports it, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def model_architecture(source: str | Path) -> Architecture | None:
    """The family of a model dir or hub id from its config alone (None when the config cannot be read)."""
    arch = read_architecture(source)
    if arch is not None or Path(str(source)).expanduser().is_dir():
        return arch
    try:
        from transformers import AutoConfig

        return architecture(AutoConfig.from_pretrained(str(source)).to_dict())
    except (OSError, ValueError):
        return None


def resolve_attn(name: str, device: torch.device, arch: Architecture | None = None) -> str:
    """auto: what the family supports and needs (`families.resolve_attn`): flash_attention_2 on CUDA with
    flash-attn installed, else sdpa, else eager (Gemma-2)."""
    return resolve_family_attn(name, device.type, arch, flash_attn_installed())


def device_problems(cfg: RunConfig, *, cuda: bool | None = None, bf16: bool | None = None,
                    flash: bool | None = None) -> list[Problem]:
    """Settings this machine's device cannot run, found from the config alone (before any weight loads).

    The facts default to this machine's: `cuda` (a CUDA device is visible), `bf16` (it computes in bfloat16:
    compute capability 8.0, Ampere, or newer), `flash` (the flash-attn package is installed); tests pass
    others to see what a GPU machine would refuse. What runs on a CPU too (bf16 weights or autocast, qlora
    through bitsandbytes' CPU backend, fp16 weights) is not refused there."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if bf16 is None:
        bf16 = cuda and torch.cuda.is_bf16_supported()
    flash = flash_attn_installed() if flash is None else flash
    problems = []
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and cuda)
    if cfg.train.device == "cuda" and not cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        problems.append(Problem("train.device", f"cuda was asked for but no CUDA device is visible (torch "
                                f"{torch.__version__} is {build})", "use train.device: auto or cpu"))
    if cfg.model.attn_implementation == "flash_attention_2":
        if not on_cuda or not cuda or not flash:
            problems.append(Problem("model.attn_implementation", "flash_attention_2 needs CUDA and the flash-attn "
                                    "package" + ("" if cuda else " (no CUDA device is visible)"),
                                    "use attn_implementation: auto (sdpa here)"))
        elif cfg.model.dtype == "fp32" or (cfg.model.dtype == "auto" and not bf16):
            problems.append(Problem("model.attn_implementation", "flash_attention_2 computes in fp16 or bf16 only, "
                                    "and the weights would load in fp32", "set model.dtype: bf16 (or fp16 on a GPU "
                                    "older than Ampere), or use attn_implementation: auto"))
    if on_cuda and cuda and not bf16:  # a GPU before Ampere (V100, T4): no bf16 arithmetic
        for where, value in (("model.dtype", cfg.model.dtype), ("train.mixed_precision", cfg.train.mixed_precision),
                             ("quant.compute_dtype", cfg.quant.compute_dtype if cfg.method == "qlora" else None)):
            if value == "bf16":
                problems.append(Problem(where, "this GPU does not compute in bf16 (it needs compute capability 8.0, "
                                        "Ampere, or newer)", "use fp32, or fp16 weights with method: lora / qlora"))
    return problems


# --------------------------------------------------------------------------------------------------
# Earlier runs used as a base


@dataclass
class RunDir:
    """An earlier tunekit run: its resolved config and its final weights."""

    path: Path
    cfg: RunConfig
    final: Path

    @property
    def has_adapter(self) -> bool:
        return (self.final / ADAPTER_CONFIG).is_file()


def is_run_dir(path: str | Path) -> bool:
    """A tunekit run dir has the resolved config.yaml (a model dir has config.json)."""
    return (Path(path) / "config.yaml").is_file()


def read_run_dir(path: str | Path) -> RunDir | None:
    """The run at `path`, or None for anything else (a hub id, a plain model dir)."""
    path = Path(path).expanduser()
    if not is_run_dir(path):
        return None
    cfg = load_config(path / "config.yaml", check_files=False)
    final = path / "final"
    if not final.is_dir():
        raise ConfigError(Problem(str(path), "this run has no final/ weights (it did not finish)",
                                  f"resume it first: tunekit train {path / 'config.yaml'} --resume"))
    return RunDir(path, cfg, final)


def continues_adapter(cfg: RunConfig, run: RunDir | None) -> bool:
    """True when training keeps training the earlier run's adapter (model.previous_adapter: continue)."""
    return (run is not None and run.has_adapter and cfg.method in ("lora", "qlora")
            and cfg.model.previous_adapter == "continue")


def _from_pretrained(path: str | Path, cfg: RunConfig, device: torch.device, *, quantize: bool):
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    dtype = resolve_dtype(cfg.model.dtype, device)
    arch = model_architecture(path)
    problems = check_architecture(arch, attn_implementation=cfg.model.attn_implementation)
    if problems:
        raise ConfigError(problems)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn(cfg.model.attn_implementation, device, arch),
                  trust_remote_code=cfg.model.trust_remote_code, device_map={"": str(device)})
    if quantize:
        from transformers import BitsAndBytesConfig

        compute = dtype if cfg.quant.compute_dtype == "auto" else resolve_dtype(cfg.quant.compute_dtype, device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
            bnb_4bit_use_double_quant=cfg.quant.double_quant, bnb_4bit_compute_dtype=compute)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as exc:
        raise TunekitError(Problem("model.base", f"cannot load a causal LM from {path}: {exc}",
                                   "give a local model dir, an earlier run dir, or a reachable hub id")) from None
    except ValueError as exc:  # transformers refused a setting for this model (the files were found)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(Problem("model", f"transformers refused to load {path} with attn_implementation="
                                            f"{kwargs['attn_implementation']}, dtype={dtype}: {first}",
                                   "change the model.* setting it names (model.attn_implementation: auto picks "
                                   "what the family supports)")) from None


def config_source(base: str) -> str:
    """Where the config.json of `base`'s architecture is: a model dir or hub id, or for a run the `final/` of
    the first run down its chain that holds full weights (runs on adapters lead to the model they started from)."""
    while (run := read_run_dir(base)) is not None:
        if not run.has_adapter:
            return str(run.final)
        base = run.cfg.model.base
    return base


def adapter_base(run: RunDir, cfg: RunConfig, device: torch.device, *, quantize: bool):
    """The model the adapter in `run.final` was trained on top of (rebuilt from the run's own config)."""
    prev = read_run_dir(run.cfg.model.base)
    if prev is None:
        return _from_pretrained(run.cfg.model.base, cfg, device, quantize=quantize)
    if not prev.has_adapter:
        return _from_pretrained(prev.final, cfg, device, quantize=quantize)
    if continues_adapter(run.cfg, prev):
        return adapter_base(prev, cfg, device, quantize=quantize)
    return _merged(prev, cfg, device, quantize=quantize)


def _merged(run: RunDir, cfg: RunConfig, device: torch.device, *, quantize: bool):
    """The run's adapter folded into its base weights (a plain transformers model)."""
    from peft import PeftModel

    if quantize:
        raise ConfigError(Problem("model.previous_adapter", "cannot fold an adapter into a 4-bit base",
                                  "use model.previous_adapter: continue, or method: lora"))
    base = adapter_base(run, cfg, device, quantize=False)
    return PeftModel.from_pretrained(base, str(run.final)).merge_and_unload()


def quiet_libraries() -> None:
    """transformers' own progress bars ("Loading weights") off: a command shows tunekit's progress only. Its
    warnings stay (Python shows each once)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(source: str | Path, *, where: str = "model", trust_remote_code: bool = False):
    """The tokenizer of a model dir, a run's final/, or a hub id: the one place tunekit loads a tokenizer.

    A TunekitError naming `where` (the argument or config field the source came from) when `source` is not a
    folder or a loadable hub id (`locate.locate_model`), or holds no tokenizer."""
    from transformers import AutoTokenizer

    located = locate_model(str(source), field=where)
    if isinstance(located, Problem):
        raise TunekitError(located)
    try:
        return AutoTokenizer.from_pretrained(located, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(Problem(where, f"cannot load a tokenizer from {source}: {first}",
                                   "the model dir (or the run's final/) must hold tokenizer files")) from None


def run_tokenizer(cfg: RunConfig):
    """The tokenizer of the base (for an earlier run: the one saved in its final/)."""
    run = read_run_dir(cfg.model.base)
    return load_tokenizer(run.final if run is not None else cfg.model.base, where="model.base",
                          trust_remote_code=cfg.model.trust_remote_code)


def load_causal_lm(source: str | Path, device: torch.device, *, where: str = "model"):
    """A causal LM for inference, in eval mode, in its saved dtype, on `device`: the one place tunekit loads a
    model to generate with (training loads through `load_base`, which applies the run's dtype and method)."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    located = locate_model(str(source), field=where)
    if isinstance(located, Problem):
        raise TunekitError(located)
    try:
        model = AutoModelForCausalLM.from_pretrained(located, dtype="auto", device_map={"": str(device)})
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(Problem(where, f"cannot load a causal LM from {source}: {first}",
                                   "give a model dir, a run dir, or a reachable hub id")) from None
    return model.eval()


def load_base(cfg: RunConfig, device: torch.device | None = None):
    """The model training starts from, on `device`, before any adapter is added.

    - a hub id or model dir: that model (4-bit when method is qlora);
    - an earlier run with a full model: its final weights;
    - an earlier run with an adapter: merged into its base (previous_adapter: merge), or its base alone
      (previous_adapter: continue; apply_method then loads the adapter to keep training it).
    """
    device = device or resolve_device(cfg.train.device)
    quantize = cfg.method == "qlora"
    run = read_run_dir(cfg.model.base)
    if run is None:
        model = _from_pretrained(cfg.model.base, cfg, device, quantize=quantize)
    elif not run.has_adapter:
        model = _from_pretrained(run.final, cfg, device, quantize=quantize)
    elif continues_adapter(cfg, run):
        model = adapter_base(run, cfg, device, quantize=quantize)
    else:
        model = _merged(run, cfg, device, quantize=quantize)
    model.config.use_cache = False  # training: no KV cache (and packed position_ids need none)
    return model


# --------------------------------------------------------------------------------------------------
# Methods


def _keep_4bit_layers_differentiable(model) -> None:
    """Workaround for bitsandbytes 0.50.x on CPUs with AVX512-BF16.

    `Linear4bit.forward` repacks its weight into an inference-only layout the first time it runs in
    eval mode on an input that does not require grad (e.g. a validation pass). From then on
    `matmul_4bit` uses `gemv_4bit`, which has no autograd: gradients stop flowing through the base
    layers and every LoRA before the last layer silently gets zero gradient. The layer reads its own
    `support_avx512bf16_for_cpu` flag to decide; clearing it keeps the differentiable path.
    tests/test_model.py::test_qlora_lora_gets_gradients_after_eval_pass fails if this stops working.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_method(model, cfg: RunConfig):
    """Make the trained parameters trainable: all (full) or a LoRA adapter (lora, qlora)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        # Casts the non-quantized params (norms, embeddings) to fp32 and freezes the base.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        _keep_4bit_layers_differentiable(model)

    run = read_run_dir(cfg.model.base)
    if continues_adapter(cfg, run):
        # The earlier adapter keeps its own r / alpha / targets (from its adapter_config.json).
        return PeftModel.from_pretrained(model, str(run.final), is_trainable=True)

    lora = cfg.lora
    targets = {"target_modules": lora.target_modules}
    if lora.target_modules == "all-linear":  # made explicit: fused experts included, routers left out
        found = lora_targets(model, train_router=lora.train_router)
        targets = {"target_modules": found.modules, "target_parameters": found.parameters or None}
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                          use_dora=lora.use_dora, task_type="CAUSAL_LM", **targets)
    return get_peft_model(model, peft_cfg)


def body_and_head(model):
    """(decoder body, LM head) of a plain or peft-wrapped causal LM.

    LoRA layers are injected into the wrapped model's modules, so calling the body runs them.
    """
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.get_decoder(), base.get_output_embeddings()


# --------------------------------------------------------------------------------------------------
# Inference


def _find_run_for(weights: Path) -> RunDir | None:
    """The run that wrote `weights` (its final/ or a checkpoints/step-N dir), if any."""
    if weights.name == "final" and is_run_dir(weights.parent):
        return read_run_dir(weights.parent)
    if weights.parent.name == "checkpoints" and is_run_dir(weights.parent.parent):
        return read_run_dir(weights.parent.parent)
    return None


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode from a run dir, its final/, a checkpoint, or a plain model dir."""
    from peft import PeftModel

    device = torch.device(device)
    located = locate_model(str(path), field=str(path))
    if isinstance(located, Problem):
        raise TunekitError(located)
    if not Path(located).is_absolute():  # a hub id
        return load_causal_lm(located, device, where=str(path)), load_tokenizer(located, where=str(path))
    path = Path(located)
    run = read_run_dir(path) if is_run_dir(path) else None
    weights = run.final if run is not None else path
    if run is None:
        run = _find_run_for(path)
    tok_source = weights if (weights / "tokenizer_config.json").is_file() else (
        run.final if run is not None else weights)

    if (weights / ADAPTER_CONFIG).is_file():
        if run is not None:
            cfg = run.cfg.model_copy(update={"method": "lora"})  # a full-precision base for inference
            base = adapter_base(run, cfg, device, quantize=False)
        else:
            base_name = json.loads((weights / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            base = load_causal_lm(base_name, device, where=f"{weights / ADAPTER_CONFIG} base_model_name_or_path")
        model = PeftModel.from_pretrained(base, str(weights))
    else:
        model = load_causal_lm(weights, device, where=str(path))
    tokenizer = load_tokenizer(tok_source, where=str(path))
    model.eval()
    return model, tokenizer
