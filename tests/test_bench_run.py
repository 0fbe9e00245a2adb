"""bench.run and bench.interleaved end to end on one small case (in subprocesses: mallopt is process-wide)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("allocator", ["fresh", "recycled"])
def test_bench_run_quick_layer_norm(tmp_path, allocator):
    results_md = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--ops", "norm.layer_norm", "--variants",
           "eager,fastllm[cpp]", "--out", str(tmp_path), "--results-md", str(results_md), "--min-time", "0.01",
           "--allocator", allocator]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]
    assert {r["variant"] for r in rows} == {"eager", "fastllm[cpp]"}
    for r in rows:
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        # memory is measured with fresh pages only (in the recycled regime RSS keeps freed pages), where Linux
        # lets the process reset its peak RSS
        measured = r["forward_backward_peak_mib"] is not None
        assert measured == (allocator == "fresh" and os.access("/proc/self/clear_refs", os.W_OK)), r
    key = "cpu-recycled" if allocator == "recycled" else "cpu"
    text = results_md.read_text()
    assert f"<!-- bench:{key} -->" in text and f"<!-- /bench:{key} -->" in text
    assert ("recycled memory" in text) == (allocator == "recycled")


def test_bench_interleaved_quick_layer_norm():
    cmd = [sys.executable, "-m", "bench.interleaved", "norm.layer_norm", "256x1024", "float32", "--quick",
           "--repeats", "2", "--runs", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("repeat ") for line in lines) == 2
    assert lines[-1].startswith("speedup median ") and lines[-1].endswith("x")


def test_bench_interleaved_names_a_missing_case():
    cmd = [sys.executable, "-m", "bench.interleaved", "norm.layer_norm", "3x3", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no case norm.layer_norm 3x3 float32" in proc.stderr
