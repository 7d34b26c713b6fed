"""deepseek-ext benchmarks: ours against a named baseline, timed in the same process (``python -m benchmarks``)."""
