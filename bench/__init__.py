"""fastllm's benchmarks: one harness (harness.py), one case file per op family (cases/), the CLI (run.py)."""
