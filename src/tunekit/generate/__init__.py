"""Generation, for every stage that generates: the models held (`models.py`: bases loaded once, adapters on
them), the KV cache of a batch (`kvcache.py`) and the batched loop (`engine.py`), which the server, the
evaluation and `tunekit chat` (`chat.py`) all run.
"""
