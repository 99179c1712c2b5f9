"""Export: a run as merged weights, its adapter, a GGUF file or GGUF + an Ollama Modelfile (`export.py`), with
llama.cpp's converter (`gguf_convert.py`, run as a subprocess), llama.cpp's runtime (`gguf_run.py`) and the
Modelfile TEMPLATE learned from the chat template (`ollama.py`).
"""
