"""Greedy decoding, logits and tokenization of a GGUF file with llama-cpp-python, in a process of its own.

Used to prove that an exported GGUF answers like the run it came from (export's verification, tests,
bench/export.py). llama.cpp runs in another process, so a crash inside it is an error in the caller instead of
its end: with llama-cpp-python 0.3.36 built for this CPU (AVX512-BF16), decoding a q8_0 GGUF of
models/tiny-chat segfaults in llama_decode when llama.cpp repacks the q8_0 weights into its CPU layout; with
`repack=False` (llama.cpp's `--no-repack`) the same file decodes, as do f32 and f16 files either way.

`llama_cpp_greedy` runs in a spawned worker (a crash raises BrokenProcessPool). `llama_cpp_logits` and
`llama_cpp_adds_bos`, which every GGUF export calls, run this file as a script (`python gguf_run.py`, a JSON job
on stdin, the answer as the last line of stdout): the process imports llama_cpp and numpy only, not the tunekit
package (torch, transformers), which a spawned worker would import first.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

_QUIET = None  # llama.cpp's log callback, kept alive while the process runs


def _load(gguf: str, **params):
    """A llama.cpp model from `gguf` with these llama_model_params set, llama.cpp's own logging off."""
    import llama_cpp as ll

    global _QUIET
    if _QUIET is None:
        _QUIET = ll.llama_log_callback(lambda level, text, user_data: None)
        ll.llama_log_set(_QUIET, None)  # llama.cpp logs every load to stderr otherwise
        ll.llama_backend_init()
    model_params = ll.llama_model_default_params()
    for name, value in params.items():
        setattr(model_params, name, value)
    model = ll.llama_model_load_from_file(gguf.encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    return model


def _run(gguf: str, prompts: list[list[int]], texts: list[str], stop: list[int], max_new_tokens: int,
         threads: int, repack: bool) -> dict:
    """llama.h through llama-cpp-python's ctypes bindings (the `Llama` class cannot turn weight repacking off)."""
    import ctypes

    import llama_cpp as ll
    import numpy as np

    model = _load(gguf, use_extra_bufts=repack)
    cparams = ll.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 512, 512, threads, threads
    ctx = ll.llama_init_from_model(model, cparams)
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)

    def decode(ids: list[int]) -> np.ndarray:
        arr = (ll.llama_token * len(ids))(*ids)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = ll.llama_get_logits_ith(ctx, -1)  # (V,) logits after the last token
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    tokens = [_tokenize(vocab, t) for t in texts]
    answers, generated, start = [], 0, time.perf_counter()
    for ids in prompts:
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        logits = decode(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))  # greedy on llama.cpp's own logits
            if token in stop:
                break
            out.append(token)
            logits = decode([token])
        answers.append(out)
        generated += len(out)
    seconds = time.perf_counter() - start
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return {"tokens": tokens, "answers": answers, "tokens_per_s": generated / seconds if seconds else 0.0}


def llama_cpp_greedy(gguf, prompts, texts=(), stop=(), max_new_tokens: int = 24, threads: int = 2,
                     repack: bool = True) -> dict:
    """{"tokens": llama.cpp's ids of each text, "answers": greedy ids for each prompt (up to a stop id),
    "tokens_per_s": generation speed}. `repack=False` keeps the weights in the file's layout (llama.cpp's
    `--no-repack`) instead of the CPU's interleaved one."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, str(gguf), [list(p) for p in prompts], list(texts), list(stop), max_new_tokens,
                           threads, repack).result()


def _tokenize(vocab, text: str) -> list[int]:
    """llama.cpp's token ids of `text`: no BOS added, special tokens parsed (as rendered prompts hold them)."""
    import llama_cpp as ll

    raw = text.encode()
    buf = (ll.llama_token * (len(raw) + 8))()
    n = ll.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
    return list(buf[:n])


def _logits(gguf: str, sequences: list[list[int]], texts: list[str], dest: str, threads: int,
            repack: bool) -> dict:
    """Every position's logits of each sequence (one llama_decode of the whole sequence, a fresh KV cache each),
    saved as dest/<i>.npy, (T, V) float32: {"paths": the files, "tokens": llama.cpp's ids of each text}."""
    import ctypes

    import llama_cpp as ll
    import numpy as np

    model = _load(gguf, use_extra_bufts=repack)
    tokens = [_tokenize(ll.llama_model_get_vocab(model), t) for t in texts]
    longest = max(len(s) for s in sequences)
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(64, longest)
    cparams.n_threads, cparams.n_threads_batch = threads, threads
    ctx = ll.llama_init_from_model(model, cparams)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    batch = ll.llama_batch_init(longest, 0, 1)
    paths = []
    try:
        for i, ids in enumerate(sequences):
            ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
            batch.n_tokens = len(ids)
            for pos, token in enumerate(ids):
                batch.token[pos], batch.pos[pos], batch.n_seq_id[pos] = token, pos, 1
                batch.seq_id[pos][0], batch.logits[pos] = 0, 1  # logits at every position
            if ll.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = ll.llama_get_logits(ctx)  # (T, V) row-major, one row per position asked for
            rows = np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                         shape=(len(ids), n_vocab))
            paths.append(f"{dest}/{i}.npy")
            np.save(paths[-1], rows.copy())
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
        ll.llama_model_free(model)
    return {"paths": paths, "tokens": tokens}


def _in_process(job: dict):
    """Run `job` by this file as a script in a process of its own; its answer, or RuntimeError when it fails."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(job),
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"llama.cpp failed on {job['gguf']} (exit code {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_logits(gguf, sequences, dest, texts=(), threads: int = 2, repack: bool = True) -> tuple[list, list]:
    """(llama.cpp's logits at every position of each token sequence, one (T, V) float32 array per sequence,
    saved under the folder `dest` (a large vocabulary makes them too big to pass between processes) and
    returned memory-mapped; llama.cpp's token ids of each of `texts`)."""
    import numpy as np

    out = _in_process({"run": "logits", "gguf": str(gguf), "sequences": [[int(t) for t in s] for s in sequences],
                       "texts": list(texts), "dest": str(dest), "threads": threads, "repack": repack})
    return [np.load(path, mmap_mode="r") for path in out["paths"]], out["tokens"]


def _adds_bos(gguf: str) -> bool:
    import llama_cpp as ll

    model = _load(gguf, vocab_only=True)
    try:
        return bool(ll.llama_vocab_get_add_bos(ll.llama_model_get_vocab(model)))
    finally:
        ll.llama_model_free(model)


def llama_cpp_adds_bos(gguf) -> bool:
    """Whether llama.cpp (and so Ollama) puts a BOS token before a prompt it tokenizes from this GGUF."""
    return bool(_in_process({"run": "adds_bos", "gguf": str(gguf)}))


def main() -> None:
    job = json.loads(sys.stdin.read())
    if job["run"] == "logits":
        out = _logits(job["gguf"], job["sequences"], job["texts"], job["dest"], job["threads"], job["repack"])
    elif job["run"] == "adds_bos":
        out = _adds_bos(job["gguf"])
    else:
        raise SystemExit(f"unknown job {job['run']!r}")
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    main()
