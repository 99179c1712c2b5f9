"""Greedy decoding and tokenization of a GGUF file with llama-cpp-python, in a process of its own.

Used to prove that an exported GGUF answers like the run it came from (tests, bench/export.py). It runs in a
spawned process, so a crash inside llama.cpp raises BrokenProcessPool in the caller instead of killing it:
with llama-cpp-python 0.3.36 built for this CPU (AVX512-BF16), decoding a q8_0 GGUF of models/tiny-chat
segfaults in llama_decode when llama.cpp repacks the q8_0 weights into its CPU layout; with `repack=False`
(llama.cpp's `--no-repack`) the same file decodes, as do f32 and f16 files either way.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

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

    def tokenize(text: str) -> list[int]:
        raw = text.encode()
        buf = (ll.llama_token * (len(raw) + 8))()
        n = ll.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)  # no BOS, parse special
        return list(buf[:n])

    def decode(ids: list[int]) -> np.ndarray:
        arr = (ll.llama_token * len(ids))(*ids)
        if ll.llama_decode(ctx, ll.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        logits = ll.llama_get_logits_ith(ctx, -1)  # (V,) logits after the last token
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    tokens = [tokenize(t) for t in texts]
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


def _adds_bos(gguf: str) -> bool:
    import llama_cpp as ll

    model = _load(gguf, vocab_only=True)
    try:
        return bool(ll.llama_vocab_get_add_bos(ll.llama_model_get_vocab(model)))
    finally:
        ll.llama_model_free(model)


def llama_cpp_adds_bos(gguf) -> bool:
    """Whether llama.cpp (and so Ollama) puts a BOS token before a prompt it tokenizes from this GGUF."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_adds_bos, str(gguf)).result()
