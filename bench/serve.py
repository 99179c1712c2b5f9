"""`tunekit serve` under load: 1, 4 and 16 concurrent openai-SDK clients against plain `model.generate`.

    python -m bench.serve                          # models/tiny-chat, 48 requests per level, 32 tokens each
    python -m bench.serve --clients 1 4 16 --requests 48 --max-tokens 32 --threads 2
    python -m bench.serve --model examples/function-calling/tiny-chat-tools \
        --data examples/function-calling/valid.jsonl --max-tokens 64 --prefix-cache-mib 256

1. Sequential baseline: the same requests one by one through `model.generate` (greedy, batch 1, the prompt
   rendered by `data.render` exactly as the server renders it), in this process.
2. The server: `tunekit serve` started as a subprocess on a free loopback port; for each level C, C threads
   each send their share of the requests one after another with the openai SDK (non-streaming, greedy).
   Throughput = completion tokens (from `usage`) / wall time; latency per request as the client sees it.
3. Optionally (`--engine`), the server's batch loop alone (`Engine`), in this process without HTTP: for each
   level C, C asyncio tasks each submit their share of the requests one after another (closed loop, 2 ms
   batch window), with whether each reply's tokens equal the one-client run's.
4. Optionally (`--continuous`), transformers' own continuous batching (`model.generate_batch`) on all the
   requests at once against the server's batch loop (`Engine`) on the same requests, in this process, and
   whether their tokens equal sequential greedy generation.

Every request asks for `--max-tokens` tokens and ends early at the end of turn, so the token counts are
what the model produced; the same prompts are used everywhere. The server's prefix cache is off unless
`--prefix-cache-mib` is given: the baseline prefills every prompt whole, and every level sends the same
prompts again (with the cache, a level would reuse the blocks of the one before).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("apples rain bread river soup moon garlic dog snow pancakes sea onions garden rice storm butter salt "
         "pepper lemon honey").split()


def prompts(n: int, words: int = 14) -> list[dict]:
    """Copy tasks (tiny-chat learned to copy): replies of about `words` words, each request different."""
    return [{"messages": [{"role": "user", "content": "Copy exactly: " + " ".join(
        WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))}]} for i in range(n)]


def from_data(path: Path, n: int) -> list[dict]:
    """`n` requests from a chat JSONL file: each row's messages up to its last user message, with its tools."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for row in rows:
        last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
        out.append({"messages": row["messages"][:last + 1], **({"tools": row["tools"]} if row.get("tools") else {})})
    return [out[i % len(out)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def sequential(model_dir: Path, requests: list[dict], max_tokens: int) -> dict:
    import torch

    from tunekit.data.render import end_of_turn_ids, render_prompt
    from tunekit.model import load_for_inference

    model, tokenizer = load_for_inference(model_dir)
    stop = end_of_turn_ids(tokenizer)
    latencies, tokens, outputs = [], 0, []
    began = time.perf_counter()
    for example in requests:
        start = time.perf_counter()
        ids = torch.tensor([render_prompt(example, tokenizer)])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        latencies.append(time.perf_counter() - start)
        tokens += len(new)
        outputs.append(new)
    wall = time.perf_counter() - began
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p95_s": percentile(latencies, 0.95), "outputs": outputs}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, threads: int, prefix_cache_mib: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "tunekit.cli", "serve", f"tiny={model_dir}", "--port", str(port),
                             "--device", "cpu", "--threads", str(threads), "--prefix-cache-mib", str(prefix_cache_mib)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.load(r)["status"] == "ok":
                    return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def load(base_url: str, requests: list[dict], clients: int, max_tokens: int) -> dict:
    import openai

    sdk = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens, cached = [0], [0]
    lock = threading.Lock()

    def worker(share: list[dict]) -> None:
        for example in share:
            start = time.perf_counter()
            reply = sdk.chat.completions.create(model="tiny", temperature=0, max_completion_tokens=max_tokens,
                                                **example)
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += reply.usage.completion_tokens
                cached[0] += reply.usage.prompt_tokens_details.cached_tokens

    threads = [threading.Thread(target=worker, args=(requests[i::clients],)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"clients": clients, "tokens": tokens[0], "wall_s": wall, "tokens_per_s": tokens[0] / wall,
            "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95), "cached_tokens": cached[0]}


async def job_tokens(job) -> list[int]:
    """The token ids an engine job produces, read from its events until it finishes."""
    from tunekit.generate.engine import Finished, Token

    ids = []
    while not isinstance(event := await job.events.get(), Finished):
        if isinstance(event, Token):
            ids.append(event.id)
    return ids


def engine_levels(model_dir: Path, requests: list[dict], levels: list[int], max_tokens: int,
                  prefix_cache_mib: int = 0) -> list[dict]:
    """The batch loop alone, in-process: closed-loop clients as asyncio tasks, no HTTP."""
    from tunekit.data.render import render_prompt
    from tunekit.generate.engine import Engine, Job, Sampling
    from tunekit.generate.models import load_models, parse_model_arg

    served = load_models([parse_model_arg(f"tiny={model_dir}")], "cpu")["tiny"]
    rendered = [render_prompt(m, served.tokenizer) for m in requests]

    async def one(engine: Engine, prompt: list[int]) -> tuple[list[int], float]:
        job = Job(served, prompt, Sampling(max_tokens=max_tokens), 1, asyncio.get_running_loop())
        start = time.perf_counter()
        engine.submit(job)
        return await job_tokens(job), time.perf_counter() - start

    async def level(clients: int, prompts: list[list[int]]) -> tuple[dict, dict[int, list[int]]]:
        engine = Engine(window_s=0.002, max_batch=64, prefix_cache_bytes=prefix_cache_mib * 2**20)
        engine.start()
        latencies: list[float] = []
        outputs: dict[int, list[int]] = {}

        async def client(k: int) -> None:
            for i in range(k, len(prompts), clients):
                outputs[i], latency = await one(engine, prompts[i])
                latencies.append(latency)

        began = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - began
        engine.stop()
        tokens = sum(len(o) for o in outputs.values())
        return {"clients": clients, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95)}, outputs

    asyncio.run(level(4, rendered[:8]))  # warm-up
    results, alone = [], None
    for clients in sorted(levels):
        r, outputs = asyncio.run(level(clients, rendered))
        alone = alone or outputs
        r["equal_to_fewest_clients"] = sum(outputs[i] == alone[i] for i in outputs)
        results.append(r)
    return results


def continuous(model_dir: Path, requests: list[dict], max_tokens: int, reference: list[list[int]]) -> dict:
    """transformers' generate_batch against the server's batch loop, offline, same prompts."""
    from transformers import GenerationConfig

    from tunekit.data.render import render_prompt
    from tunekit.generate.engine import Engine, Job, Sampling
    from tunekit.generate.models import load_models, parse_model_arg

    served = load_models([parse_model_arg(f"tiny={model_dir}")], "cpu")["tiny"]
    tokenizer, model = served.tokenizer, served.weights.model
    rendered = [render_prompt(m, tokenizer) for m in requests]
    out: dict = {}

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=served.stop_ids,
                              pad_token_id=served.pad_id, max_batch_tokens=512)
    try:
        began = time.perf_counter()
        results = model.generate_batch(inputs=rendered, generation_config=config, progress_bar=False)
        wall = time.perf_counter() - began
        outputs = [list(results[k].generated_tokens) for k in sorted(results, key=lambda k: int(k.split("_")[-1]))]
        tokens = sum(len(o) for o in outputs)
        out["generate_batch"] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                                 "equal_to_sequential": sum(o == r for o, r in zip(outputs, reference, strict=True))}
    except Exception as exc:  # report, do not hide: transformers' CB may not run on this machine
        out["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"}

    async def engine_run() -> list[list[int]]:
        engine = Engine(window_s=0.0, max_batch=len(rendered))
        loop = asyncio.get_running_loop()
        jobs = [Job(served, p, Sampling(max_tokens=max_tokens), 1, loop) for p in rendered]
        for job in jobs:  # queued before the worker starts: one batch
            engine.submit(job)
        engine.start()
        tokens_out = [await job_tokens(job) for job in jobs]
        engine.stop()
        return tokens_out

    began = time.perf_counter()
    outputs = asyncio.run(engine_run())
    wall = time.perf_counter() - began
    tokens = sum(len(o) for o in outputs)
    out["serve_engine"] = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                           "equal_to_sequential": sum(o == r for o, r in zip(outputs, reference, strict=True))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "tiny-chat")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--data", type=Path, help="requests from this chat JSONL (messages up to the last user "
                                                  "message, and tools) instead of copy tasks")
    parser.add_argument("--prefix-cache-mib", type=int, default=0,
                        help="the server's prefix cache (0, the default: off, every prompt prefilled whole)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, sequential and server alike")
    parser.add_argument("--engine", action="store_true", help="also time the batch loop alone, in-process")
    parser.add_argument("--continuous", action="store_true", help="also time transformers' generate_batch")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    requests = from_data(args.data, args.requests) if args.data else prompts(args.requests)
    seq = sequential(args.model, requests, args.max_tokens)
    reference = seq.pop("outputs")
    print(f"sequential generate: {seq['tokens']} tokens in {seq['wall_s']:.1f}s = {seq['tokens_per_s']:.0f} tok/s, "
          f"p50 {seq['p50_s'] * 1000:.0f} ms, p95 {seq['p95_s'] * 1000:.0f} ms", flush=True)
    results = {"settings": vars(args) | {"model": str(args.model), "out": str(args.out)}, "sequential": seq,
               "server": []}
    proc, url = start_server(args.model, args.threads, args.prefix_cache_mib)
    try:
        load(url, requests[:4], 1, args.max_tokens)  # warm-up
        for clients in args.clients:
            r = load(url, requests, clients, args.max_tokens)
            r["speedup"] = r["tokens_per_s"] / seq["tokens_per_s"]
            r["p95_vs_single_p50"] = None
            results["server"].append(r)
            print(f"{clients:>3} clients: {r['tokens']} tokens in {r['wall_s']:.1f}s = {r['tokens_per_s']:.0f} tok/s "
                  f"({r['speedup']:.2f}x sequential), p50 {r['p50_s'] * 1000:.0f} ms, p95 {r['p95_s'] * 1000:.0f} ms, "
                  f"{r['cached_tokens']} prompt tokens from the prefix cache", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    single = next((r for r in results["server"] if r["clients"] == 1), None)
    for r in results["server"]:
        if single:
            r["p95_vs_single_p50"] = r["p95_s"] / single["p50_s"]
    if args.engine:
        results["engine"] = engine_levels(args.model, requests, args.clients, args.max_tokens, args.prefix_cache_mib)
        for r in results["engine"]:
            print(f"engine alone, {r['clients']:>2} clients: {r['tokens_per_s']:.0f} tok/s, p50 {r['p50_s'] * 1000:.0f} ms, "
                  f"p95 {r['p95_s'] * 1000:.0f} ms, {r['equal_to_fewest_clients']}/{len(requests)} replies equal to "
                  f"{min(args.clients)} client(s)",
                  flush=True)
    if args.continuous:
        results["continuous"] = continuous(args.model, requests[:16], args.max_tokens, reference[:16])
        for name, r in results["continuous"].items():
            print(f"{name}: " + (r["error"] if "error" in r else
                                 f"{r['tokens']} tokens in {r['wall_s']:.2f}s = {r['tokens_per_s']:.0f} tok/s, "
                                 f"{r['equal_to_sequential']}/{min(16, len(requests))} equal to sequential greedy"), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
