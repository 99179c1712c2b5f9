"""Is the GGUF the model that was trained? Checked twice: config values llama.cpp is known to ignore are refused
before any weight is merged (`ignored_by_llama_cpp`), and the written file is run and compared with the merged
model before the export is published (`verify_gguf`).

The comparison: a few sequences of the run's own training data (each example rendered as training rendered it,
prompt and reply, cut at 128 tokens) go through the GGUF in llama.cpp (tunekit.export.gguf_run) and through the
merged fp32 model in transformers; at every position the two (V,) logit vectors are compared. The decision uses
the relative RMS logit error, sqrt(mean (llama.cpp - transformers)^2) / RMS of the transformers logits (centred
per position), against a tolerance per GGUF type; the max abs logit difference and the share of positions whose
greedy argmax agrees are reported with it. The RMS and not the maximum decides because a mixture-of-experts
model has router near-ties: a 16-bit weight can send a token to another expert, a jump at one position that
is quantisation, not a wrong model (measured below: Mixtral f16 max abs diff 6% of the largest logit at an RMS
error of 0.8%).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Relative RMS logit error allowed per GGUF type. Measured on the tiny random-init test families (hidden 64,
# 2 layers, tests/families.py), 6 quickstart examples (768 positions), llama-cpp-python 0.3.36 on CPU:
#            f32       f16       bf16      q8_0
#   llama3   1.2e-4    4.3e-4    3.6e-3    1.2e-2
#   qwen2    0.9e-4    3.7e-4    3.5e-3    1.1e-2
#   qwen3    1.2e-4    4.7e-4    3.8e-3    1.3e-2
#   mistral  0.9e-4    3.9e-4    3.4e-3    1.2e-2
#   gemma3   3.9e-4    8.9e-4    7.4e-3    2.4e-2
#   mixtral  1.0e-4    7.9e-3    4.2e-3    1.6e-2   (router flips at 16 bits)
# and on models/tiny-chat (Llama, hidden 256, 4 layers) after a 6-step LoRA, logits up to 21, 4 sequences of the
# quickstart data as export picks them: 2.8e-4, 4.6e-4, 3.6e-3, 1.4e-2 (max abs diff 0.013 / 0.016 / 0.097 /
# 0.47; argmax agrees at 100 / 100 / 98.6 / 98.2% of positions),
# and on GGUFs that are not the model (config values llama.cpp ignores, converted anyway):
#   qwen3_moe with norm_topk_prob false: 4.0e-2 at every type (argmax agrees at 95% of positions)
#   gemma3 with layer_types all full_attention: 0.48 (argmax agrees at 32%)
# f32's floor (1e-4, where fp32 rounding of one computation would give ~1e-6) is the same in every family; its
# cause was not isolated. Each tolerance is 2.5-5x the worst measured. The q8_0 one is above the tiny Qwen3-MoE
# mismatch (4e-2, a small effect at random init): that case is refused up front, by ignored_by_llama_cpp.
TOLERANCES = {"f32": 2e-3, "f16": 2e-2, "bf16": 2e-2, "q8_0": 6e-2}
MAX_TOKENS = 128  # per verification sequence
N_SEQUENCES = 4


@dataclass(frozen=True)
class Verification:
    quant: str
    sequences: int
    positions: int
    max_abs_diff: float  # largest |llama.cpp - transformers| logit over every position and token
    max_abs_logit: float  # largest |transformers| logit, for scale
    rel_rms: float  # RMS logit error / RMS of the centred transformers logits
    argmax_agree: float  # share of positions whose greedy next token is the same
    source: str  # where the sequences came from
    tokens_agree: int = 0  # sequences whose text llama.cpp tokenizes into the run tokenizer's ids

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.quant]

    @property
    def ok(self) -> bool:
        return self.rel_rms <= self.tolerance and self.tokens_agree == self.sequences

    def summary(self) -> str:
        return (f"GGUF ({self.quant}) vs the merged fp32 model on {self.sequences} sequences of {self.source} "
                f"({self.positions} positions): relative RMS logit error {self.rel_rms:.2g} (tolerance for "
                f"{self.quant}: {self.tolerance:.0e}), max abs logit diff {self.max_abs_diff:.3g} (largest logit "
                f"{self.max_abs_logit:.3g}), greedy argmax agrees at {self.argmax_agree:.1%} of positions; "
                f"llama.cpp tokenizes {self.tokens_agree} of {self.sequences} texts into the run tokenizer's ids")


# ------------------------------------------------------------------------------ known before converting

# llama.cpp's runtime (C++) reads only what the GGUF holds and fills the rest with constants per architecture,
# so which config.json values it cannot honour is not in the converter's Python code and cannot be probed from
# it: these rules were read from the llama.cpp vendored in llama-cpp-python 0.3.36 (vendor/llama.cpp/src/models/)
# and each was confirmed by converting a tiny model and comparing logits (numbers above). `keys` are the GGUF
# metadata keys the converter writes for this model (probed by gguf_convert probe), so a rule stops firing
# when the converter starts writing what llama.cpp would read instead.
_SWA_PATTERN = {"gemma2": 2, "gemma3_text": 6, "gemma3": 6}  # gemma2.cpp / gemma3.cpp: load_swa_pattern(ml, N)


def ignored_by_llama_cpp(config: dict, keys: list[str]) -> list[tuple[str, object, str]]:
    """(config key, its value, what llama.cpp does instead) for each value of config.json llama.cpp ignores."""
    config = config.get("text_config") or config if config.get("model_type") == "gemma3" else config
    model_type = config.get("model_type")
    arch = next((k.split(".")[0] for k in keys if k.endswith(".block_count")), model_type)
    out = []
    layer_types = config.get("layer_types")
    if model_type in _SWA_PATTERN and isinstance(layer_types, list) \
            and f"{arch}.attention.sliding_window_pattern" not in keys:
        n = _SWA_PATTERN[model_type]
        windowed = f"{arch}.attention.sliding_window" in keys
        llama = ["sliding_attention" if windowed and i % n < n - 1 else "full_attention"
                 for i in range(len(layer_types))]
        if layer_types != llama:
            out.append(("layer_types", layer_types,
                        f"llama.cpp ignores it and applies its fixed pattern for {model_type} (every {n}th layer "
                        f"full attention, the others sliding-window): {llama}"))
    if model_type == "qwen3_moe" and config.get("norm_topk_prob") is False:
        out.append(("norm_topk_prob", False, "llama.cpp always renormalises the top-k router weights of "
                                             "Qwen3-MoE to sum to 1 (qwen3moe.cpp)"))
    if model_type == "qwen2_moe" and config.get("norm_topk_prob") is True:
        out.append(("norm_topk_prob", True, "llama.cpp never renormalises the top-k router weights of "
                                            "Qwen2-MoE (qwen2moe.cpp)"))
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    if model_type in ("mistral", "mixtral") and isinstance(window, int) and window > 0 \
            and isinstance(context, int) and window < context and f"{arch}.attention.sliding_window" not in keys:
        out.append(("sliding_window", window, f"llama.cpp runs {model_type} with full attention over the whole "
                                              f"context (llama.cpp has no sliding window for it): answers "
                                              f"differ for prompts longer than {window} tokens"))
    return out


# --------------------------------------------------------------------------------- after converting


def verification_sequences(cfg, tokenizer, n: int = N_SEQUENCES, max_tokens: int = MAX_TOKENS
                           ) -> tuple[list[list[int]], str]:
    """(token ids of the first `n` examples of the run's training data, rendered as training rendered them and
    cut at `max_tokens`; where they come from). The validation file stands in when the training file is gone;
    a fixed text when neither is readable."""
    from tunekit.data.formats import read_jsonl
    from tunekit.data.render import render_example
    from tunekit.errors import TunekitError

    for path in (cfg.data.train, cfg.data.validation):
        if path is None or not Path(path).is_file():
            continue
        out = []
        for line in read_jsonl(path):
            if line.record is None:
                continue
            try:
                rendered = render_example(line.record, tokenizer)
            except (TunekitError, ValueError):
                continue
            if rendered and len(rendered[0].input_ids) >= 2:
                out.append(rendered[0].input_ids[:max_tokens])
            if len(out) == n:
                break
        if out:
            return out, f"the run's data ({Path(path).name})"
    text = "The quick brown fox jumps over the lazy dog. 1, 2, 3: café, naïve, 日本語."
    return [tokenizer.encode(text, add_special_tokens=False)[:max_tokens]], "a fixed text (the run's data is gone)"


def verify_gguf(gguf: Path, merged_dir: Path, sequences: list[list[int]], tokenizer, quant: str, workdir: Path,
                source: str) -> Verification:
    """Compare the GGUF's logits (llama.cpp) with the merged model's (transformers, fp32) on `sequences`, and
    llama.cpp's tokenization of their text with the run tokenizer's (the logits are compared on the same ids,
    so the GGUF's vocabulary and pre-tokenizer are checked here)."""
    import os

    import numpy as np
    import torch

    from tunekit.export.gguf_run import llama_cpp_logits
    from tunekit.model import load_causal_lm

    # q8_0 decodes without CPU weight repacking: llama-cpp-python 0.3.36 segfaults repacking it (gguf_run).
    texts = [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
             for ids in sequences]
    theirs, their_tokens = llama_cpp_logits(gguf, sequences, workdir, texts, threads=os.cpu_count() or 1,
                                            repack=quant != "q8_0")
    tokens_agree = sum(t == tokenizer.encode(text, add_special_tokens=False)
                       for text, t in zip(texts, their_tokens, strict=True))
    model = load_causal_lm(merged_dir, torch.device("cpu"), where=str(merged_dir)).to(torch.float32)
    sq_err = sq_ref = 0.0
    max_diff = max_logit = 0.0
    agree = positions = 0
    with torch.no_grad():
        for ids, got in zip(sequences, theirs, strict=True):
            ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)
            v = min(ref.shape[1], got.shape[1])  # llama.cpp may drop embedding rows past the tokenizer's vocab
            ref, got = ref[:, :v].astype(np.float64), np.asarray(got[:, :v], dtype=np.float64)
            diff = got - ref
            sq_err += float((diff ** 2).sum())
            sq_ref += float(((ref - ref.mean(-1, keepdims=True)) ** 2).sum())
            max_diff = max(max_diff, float(np.abs(diff).max()))
            max_logit = max(max_logit, float(np.abs(ref).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            positions += len(ids)
    del model
    return Verification(quant=quant, sequences=len(sequences), positions=positions, max_abs_diff=max_diff,
                        max_abs_logit=max_logit, rel_rms=(sq_err / sq_ref) ** 0.5 if sq_ref else 0.0,
                        argmax_agree=agree / positions if positions else 1.0, source=source,
                        tokens_agree=tokens_agree)
