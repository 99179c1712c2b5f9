"""The README.md model card every export writes: base, method, hyperparameters, data, eval numbers when the run
has them, and how to load what was written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunekit.export.export import _Plan as Plan



def write_model_card(plan: Plan, dest: Path, notes: list[str], *, base: str, run_base: str) -> None:
    """`base`: the model the run's chain started from; `run_base`: the run's own model.base."""
    cfg = plan.cfg
    summary_path = plan.run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    lines = [f"# {plan.name}", "", f"Exported by tunekit from the run `{plan.run_dir}`"
             + (f", checkpoint `{plan.checkpoint}`" if plan.checkpoint else "") + f", as **{plan.fmt}**.", ""]
    lines += ["## Training", "", f"- base model: `{base}`"
              + (f" (through the run `{cfg.model.base}`)" if run_base != base
                 else ""),
              f"- method: {cfg.method}"]
    if cfg.method in ("lora", "qlora"):
        lora = cfg.lora
        lines.append(f"- LoRA: r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets "
                     f"{lora.target_modules if isinstance(lora.target_modules, str) else ', '.join(lora.target_modules)}")
    if cfg.method == "qlora":
        lines.append(f"- 4-bit base: {cfg.quant.quant_type}, double quant {cfg.quant.double_quant}")
    t = cfg.train
    lines.append(f"- lr {t.lr}, epochs {t.epochs}, batch {t.batch_size} rows / {t.batch_tokens} tokens, "
                 f"scheduler {t.scheduler}, seed {t.seed}")
    if summary:
        lines.append(f"- steps {summary.get('steps')}, final train loss {_num(summary.get('final_train_loss'))}, "
                     f"validation loss {_num(summary.get('initial_valid_loss'))} -> "
                     f"{_num(summary.get('final_valid_loss'))}")
    lines += ["", "## Data", "", f"- train: `{Path(cfg.data.train).name}`"
              + (f", {summary['train_examples']} examples" if "train_examples" in summary else "")
              + (f", {summary['trained_tokens']:,} trained tokens" if summary.get("trained_tokens") else "")]
    if cfg.data.validation is not None or summary.get("valid_examples"):
        lines.append(f"- validation: `{Path(cfg.data.validation).name if cfg.data.validation else 'held out from train'}`"
                     + (f", {summary['valid_examples']} examples" if "valid_examples" in summary else ""))
    results = plan.run_dir / "eval" / "results.json"
    if results.is_file():
        lines += ["", "## Evaluation", ""] + _eval_lines(json.loads(results.read_text(encoding="utf-8")))
    if notes:
        lines += ["", "## Export notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Use it", ""] + _usage(plan)
    (dest / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _eval_lines(results: dict) -> list[str]:
    rows = []
    for cand in results.get("candidates", []):
        metrics = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in (cand.get("metrics") or {}).items() if isinstance(v, int | float))
        rows.append(f"- {cand.get('name')} ({cand.get('kind')}): {metrics}")
    return rows or ["- (the report has no candidates)"]


def _usage(plan: Plan) -> list[str]:
    out = plan.out
    if plan.fmt == "merged":
        return ["transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{out}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{out}")', "```", "",
                "generation_config.json stops generation at the chat template's end of turn.", "",
                f"vLLM: `vllm serve {out}`", ""]
    if plan.fmt == "adapter":
        return ["peft:", "", "```python", "from peft import AutoPeftModelForCausalLM",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{out}")', "```", "",
                f"vLLM: `vllm serve {plan.base_dir} --enable-lora --lora-modules {plan.name}={out}`", ""]
    gguf_name = f"{plan.name}-{plan.quant}.gguf"
    lines = [f"llama.cpp: `llama-cli -m {out / gguf_name} -cnv` (the chat template is in the file's metadata)",
             "", "llama-cpp-python:", "", "```python", "from llama_cpp import Llama",
             f'llm = Llama(model_path="{out / gguf_name}")', "```"]
    if plan.fmt == "ollama":
        lines += ["", f"Ollama: `ollama create {plan.name} -f {out / 'Modelfile'}` then `ollama run {plan.name}`"]
    return lines
