"""Evaluation: a run against its baselines (`evaluate.py`), the scores (`metrics.py`, `toolcalls.py`),
retrieval for the `rag:K` baseline (`retrieval.py`) and the report (`report.py`). Generation goes through
`tunekit.generate`, the engine the server answers with.
"""
