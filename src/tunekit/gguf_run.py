"""Greedy decoding and tokenization of a GGUF file with llama-cpp-python, in a process of its own.

Used to prove that an exported GGUF answers like the run it came from (tests, bench/export.py). It runs in a
spawned process, so a crash inside llama.cpp raises BrokenProcessPool in the caller instead of killing it:
with llama-cpp-python 0.3.36 built for this CPU (AVX512-BF16), decoding a q8_0 GGUF of models/tiny-chat
segfaults in llama_decode (f32 and f16 files of the same model decode fine).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor


def _run(gguf: str, prompts: list[list[int]], texts: list[str], stop: list[int], max_new_tokens: int,
         threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, verbose=False, logits_all=True)
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    answers, generated, start = [], 0, time.perf_counter()
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # (V,) logits after the last token: greedy
            if token in stop:
                break
            out.append(token)
            llm.eval([token])
        answers.append(out)
        generated += len(out)
    seconds = time.perf_counter() - start
    llm.close()
    return {"tokens": tokens, "answers": answers, "tokens_per_s": generated / seconds if seconds else 0.0}


def llama_cpp_greedy(gguf, prompts, texts=(), stop=(), max_new_tokens: int = 24, threads: int = 2) -> dict:
    """{"tokens": llama.cpp's ids of each text, "answers": greedy ids for each prompt (up to a stop id),
    "tokens_per_s": generation speed}."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, str(gguf), [list(p) for p in prompts], list(texts), list(stop), max_new_tokens,
                           threads).result()
