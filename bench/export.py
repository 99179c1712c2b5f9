"""Export time and size per format, and llama.cpp vs transformers greedy generation speed on CPU.

    python -m bench.export RUN_DIR [--prompts 100] [--max-new-tokens 48] [--threads 2]

RUN_DIR is a tunekit run (e.g. runs/quickstart after scripts/quickstart.sh). Every format is exported into a
temporary folder; generation uses the quickstart validation prompts, greedy, both runtimes on the same prompt
token ids, scored with the quickstart's exact-match metric too. Prints one JSON object (also written to bench/results/export.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from tunekit.data.render import end_of_turn_ids, render_prompt
from tunekit.export.export import export
from tunekit.export.gguf_run import llama_cpp_greedy
from tunekit.model import load_for_inference

REPO = Path(__file__).resolve().parents[1]


def transformers_greedy(model, prompts, stop, max_new_tokens):
    outs, tokens, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=stop[0])[0, len(ids):].tolist()
            new = new[: next((i for i, t in enumerate(new) if t in stop), len(new))]
            outs.append(new)
            tokens += len(new)
    return outs, tokens / (time.perf_counter() - start)


def llama_greedy(path, prompts, stop, max_new_tokens, threads, repack=True):
    """(answers, tokens/s), or (None, None) when llama.cpp crashed (q8_0 decode with weight repacking segfaults
    with llama-cpp-python 0.3.36 on this CPU)."""
    try:
        got = llama_cpp_greedy(path, prompts, stop=stop, max_new_tokens=max_new_tokens, threads=threads,
                               repack=repack)
    except BrokenProcessPool:
        return None, None
    return got["answers"], got["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    result: dict = {"run": str(args.run_dir), "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, quant in (("adapter", None), ("merged", None), ("gguf", "f32"), ("gguf", "f16"), ("gguf", "bf16"),
                           ("gguf", "q8_0"), ("ollama", "q8_0")):
            key = fmt if quant is None else f"{fmt}-{quant}"
            r = export(args.run_dir, fmt=fmt, quant=quant or "f16", out=Path(tmp) / key, dtype="fp32")
            result["formats"][key] = {"seconds": round(r.seconds, 2), "bytes": sum(r.files.values())}
            if key.startswith("gguf"):
                result["formats"][key]["gguf"] = next(r.out / f for f in r.files if f.endswith(".gguf"))

        model, tok = load_for_inference(args.run_dir)
        model = model.merge_and_unload().eval() if hasattr(model, "merge_and_unload") else model
        lines = (REPO / "examples/quickstart/valid.jsonl").read_text().splitlines()[: args.prompts]
        convs = [json.loads(line)["messages"] for line in lines]
        prompts = [render_prompt(messages, tok) for messages in convs]
        references = [messages[-1]["content"].strip() for messages in convs]

        def exact_match(outs):  # the quickstart metric: the answer text equals the reference
            return sum(tok.decode(o, skip_special_tokens=True).strip() == r
                       for o, r in zip(outs, references, strict=True)) / len(outs)

        stop = end_of_turn_ids(tok)
        ref, tps = transformers_greedy(model, prompts, stop, args.max_new_tokens)
        result["generation"] = {"transformers_fp32": {"tokens_per_s": round(tps, 1), "exact_match": exact_match(ref)}}
        for quant in ("f32", "f16", "bf16", "q8_0"):
            path = result["formats"][f"gguf-{quant}"].pop("gguf")
            outs, tps = llama_greedy(path, prompts, stop, args.max_new_tokens, args.threads, repack=quant != "q8_0")
            if outs is None:
                result["generation"][f"llama.cpp_{quant}"] = {"error": "llama.cpp crashed (segfault) decoding"}
                continue
            agree = sum(a == b for a, b in zip(outs, ref, strict=True)) / len(ref)
            result["generation"][f"llama.cpp_{quant}"] = {"tokens_per_s": round(tps, 1),
                                                          "greedy_agreement": agree, "exact_match": exact_match(outs)}
    result["settings"] = {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads}
    out = REPO / "bench" / "results" / "export.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
