"""What differs between model families, read from the model's own config.json and transformers' own classes: the
attention implementation a family runs with, the layers a LoRA adapter targets (fused projections and
mixture-of-experts weights included, routers left out), and what is refused before any weight loads.

Nothing here is a table of families: a family's facts come from transformers (which class serves its
`model_type`, whether that class supports SDPA or flash-attention) and from its config (sliding windows,
soft-capping, experts), so a family transformers adds later is handled the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunekit.errors import Problem


@dataclass(frozen=True)
class Architecture:
    """A causal LM's family as its config.json and transformers describe it."""

    model_type: str
    class_name: str | None  # the transformers class AutoModelForCausalLM builds, None when there is none
    supports_sdpa: bool
    supports_flash: bool
    experts: int  # routed experts per MoE layer, 0 for a dense model
    sliding_window: int | None  # the window of its sliding-window layers, None when every layer sees all
    softcapping: bool  # attention logits soft-capped (Gemma-2): SDPA cannot compute it

    @property
    def label(self) -> str:
        return f"{self.class_name or self.model_type} (model_type {self.model_type})"


def _causal_lm_class(model_type: str):
    from transformers.models.auto import modeling_auto

    name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        return None
    import transformers

    return getattr(transformers, name, None)


def experts_of(config: dict) -> int:
    """Routed experts per MoE layer from a config's fields (0 for a dense model)."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        value = config.get(key)
        if isinstance(value, int) and value > 1:
            return value
    return 0


def sliding_window_of(config: dict) -> int | None:
    """The sliding window its layers use, None when every layer attends to all earlier tokens."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or window <= 0 or config.get("use_sliding_window") is False:
        return None
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and layer_types and "sliding_attention" not in layer_types:
        return None
    return window


def architecture(config: dict) -> Architecture:
    """The family of a config.json's contents (a Gemma-3 multimodal config is read through its text config)."""
    config = config.get("text_config") or config if config.get("model_type") == "gemma3" else config
    model_type = str(config.get("model_type") or "")
    cls = _causal_lm_class(model_type)
    return Architecture(
        model_type=model_type, class_name=cls.__name__ if cls else None,
        supports_sdpa=bool(getattr(cls, "_supports_sdpa", False)),
        supports_flash=bool(getattr(cls, "_supports_flash_attn", False)),
        experts=experts_of(config), sliding_window=sliding_window_of(config),
        softcapping=config.get("attn_logit_softcapping") not in (None, 0, 0.0))


def read_architecture(model_dir: str | Path) -> Architecture | None:
    """The family of a local model dir (None when it has no readable config.json: a hub id, say)."""
    path = Path(model_dir) / "config.json"
    try:
        return architecture(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def resolve_attn(requested: str, device_type: str, arch: Architecture | None, flash_installed: bool) -> str:
    """The attention implementation to load with. auto: flash_attention_2 on CUDA when flash-attn is installed
    and the family supports it; else SDPA where the family supports it and computes what the family needs
    (not Gemma-2's soft-capped attention logits); else eager."""
    if requested != "auto":
        return requested
    if arch is None:
        return "flash_attention_2" if device_type == "cuda" and flash_installed else "sdpa"
    if device_type == "cuda" and flash_installed and arch.supports_flash and not arch.softcapping:
        return "flash_attention_2"
    return "sdpa" if arch.supports_sdpa and not arch.softcapping else "eager"


def check(arch: Architecture | None, *, attn_implementation: str, where: str = "model.base") -> list[Problem]:
    """What can be refused from the config alone: a family transformers has no causal LM class for, an
    attention implementation the family does not support."""
    if arch is None:
        return []
    if arch.class_name is None:
        return [Problem(where, f"transformers has no causal language model for model_type {arch.model_type!r}",
                        "give a decoder-only chat or base model (Llama, Qwen, Gemma, Mistral, Phi, ...); "
                        "encoder, vision-only and embedding models cannot be fine-tuned as chat models")]
    problems = []
    if attn_implementation == "sdpa" and (not arch.supports_sdpa or arch.softcapping):
        why = ("does not support SDPA attention" if not arch.supports_sdpa
               else "soft-caps its attention logits, which SDPA does not compute")
        problems.append(Problem("model.attn_implementation", f"{arch.label} {why}",
                                "use attn_implementation: auto (eager for this family) or eager"))
    if attn_implementation == "flash_attention_2" and not arch.supports_flash:
        problems.append(Problem("model.attn_implementation", f"{arch.label} does not support flash_attention_2",
                                "use attn_implementation: auto"))
    return problems


# --------------------------------------------------------------------------------------------------
# LoRA targets


def _is_router(module, name: str, experts: int) -> bool:
    """An MoE router: a layer named gate/router whose weight maps the hidden state to one score per expert."""
    leaf = name.rsplit(".", 1)[-1]
    weight = getattr(module, "weight", None)
    return (experts > 0 and leaf in ("gate", "router") and weight is not None and weight.dim() == 2
            and weight.shape[0] == experts)


@dataclass(frozen=True)
class LoraTargets:
    modules: list[str]  # names of nn.Linear layers (peft target_modules)
    parameters: list[str]  # fused expert weights and, when asked, router weights (peft target_parameters)
    routers: list[str]  # the router layers found (trained only with lora.train_router)


def lora_targets(model, *, train_router: bool = False) -> LoraTargets:
    """`all-linear` made explicit for this model: every linear layer of the decoder blocks (fused qkv_proj and
    gate_up_proj included; never the LM head), each mixture-of-experts block's fused expert weights (3-D
    parameters, which are not nn.Linear), and its router only when `train_router` (a router trained by
    accident changes which experts every token reaches)."""
    import torch

    experts = experts_of(model.config.to_dict())
    modules: set[str] = set()
    parameters: set[str] = set()
    routers: set[str] = set()
    for name, module in model.get_decoder().named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if _is_router(module, name, experts):
            routers.add(leaf)
            if train_router:
                if isinstance(module, torch.nn.Linear):
                    modules.add(leaf)
                else:
                    parameters.add(f"{leaf}.weight")
            continue
        if isinstance(module, torch.nn.Linear):
            modules.add(leaf)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3:  # (experts, out, in): fused expert weights
                parameters.add(f"{leaf}.{pname}")
    return LoraTargets(sorted(modules), sorted(parameters), sorted(routers))
