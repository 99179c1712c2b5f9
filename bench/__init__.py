"""Benchmarks: tunekit against TRL on the same model, data and LoRA settings (not part of the test suite).

`python -m bench.sft --preset cpu-small` is the entry point; see docs/benchmarks.md.
"""
