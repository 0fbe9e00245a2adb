"""bench/train_step.py on a tiny model: every variant is measured and profiled, and the report is written."""
import torch

from bench import train_step
from fastllm.model import GPTConfig


def test_train_step_tiny(tmp_path):
    config = GPTConfig.gpt2_style(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8)
    spec = train_step.ModelSpec("tiny", config, batch_size=2)
    threads = torch.get_num_threads()
    report = train_step.run([spec], threads=(1,), steps=2, warmup=1, profile_step_count=1, top=5, overhead=False)
    assert torch.get_num_threads() == threads  # restored
    (model,) = report["models"]
    (timing,) = model["timings"]
    assert set(timing["variants"]) == set(train_step.VARIANTS)
    for result in timing["variants"].values():
        assert result["tokens_per_s"] > 0 and result["median_ms"] > 0
    assert set(model["profiles"]) == set(train_step.VARIANTS)
    assert any(op.startswith("fastllm::") for op, _, _ in model["profiles"][train_step.KERNELS]["fastllm_ops"])
    text = train_step.format_report(report)
    for name in train_step.VARIANTS:
        assert name in text
    assert "tokens/s" in text


def test_overhead_rows_tiny():
    config = GPTConfig.gpt2_style(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8)
    rows = train_step.overhead_rows(train_step.ModelSpec("tiny", config, batch_size=2), min_time_s=0.005)
    assert rows and all(us > 0 for _, _, us in rows)
