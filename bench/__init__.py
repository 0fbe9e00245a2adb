"""fastllm's benchmarks: one harness (harness.py, and report.py for its tables, JSON and charts), one case file per op family (cases/), the CLI (run.py)."""
