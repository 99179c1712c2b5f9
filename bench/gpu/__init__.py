"""The GPU benchmark: bench/gpu/run.sh runs it end to end on a lent GPU machine in one call (docs/gpu.md)."""
