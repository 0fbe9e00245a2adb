"""bench.run and bench.interleaved end to end on one small case (in subprocesses: mallopt is process-wide),
and bench.harness.run_case's interleaving and best-peer ratios on a case of stand-in variants."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("eager", "F.rms_norm", "fastllm[cpp]")


@pytest.mark.parametrize("allocator", ["fresh", "recycled"])
def test_bench_run_quick_rms_norm(tmp_path, allocator):
    results_md = tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--ops", "norm.rms_norm", "--variants",
           ",".join(VARIANTS), "--out", str(tmp_path), "--results-md", str(results_md), "--min-time", "0.01",
           "--allocator", allocator]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]
    assert {r["variant"] for r in rows} == set(VARIANTS)
    for case_rows in ([r for r in rows if r["dtype"] == dtype] for dtype in ("float32", "bfloat16")):
        by_name = {r["variant"]: r for r in case_rows}
        for pass_name in ("forward", "forward_backward"):
            best = by_name[case_rows[0][f"best_peer_{pass_name}"]]
            assert best["variant"] in ("eager", "F.rms_norm")  # fastllm is never its own peer
            for r in case_rows:
                assert r[f"best_peer_{pass_name}"] == best["variant"]
                assert r[f"x_best_peer_{pass_name}"] == pytest.approx(best[f"{pass_name}_ms"] / r[f"{pass_name}_ms"])
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
    assert "x best peer fwd+bwd" in text
    assert (tmp_path / "speedup.png").stat().st_size > 0


def _recording_case(order):
    """A case of three variants that record their calls: eager, a peer twice as fast, and a fastllm one."""
    def variant(name, repeats):
        def fn(x):
            order.append(name)
            y = x
            for _ in range(repeats):
                y = y * 1.0
            return y
        return harness.Variant(fn)
    variants = {"eager": variant("eager", 40), "peer": variant("peer", 20), "fastllm[stand-in]": variant("f", 1)}
    return harness.Case(op="scale", shape="64", dtype=torch.float32,
                        make_inputs=lambda device, dtype: (torch.randn(64, dtype=dtype, requires_grad=True),),
                        variants=variants)


def test_run_case_interleaves_variants_and_compares_with_the_fastest_peer():
    order = []
    settings = harness.Settings(min_time_s=0.0, min_runs=6, cpu_memory=False)
    machine = harness.Machine(torch.device("cpu"), settings)
    results = list(harness.run_case(_recording_case(order), "test", machine))
    timed = order[-3 * 7:]  # the forward+backward pass: one sizing round and 6 timed rounds
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["eager", "f", "peer"] for r in rounds)  # every round runs each variant once
    assert len({tuple(r) for r in rounds}) == 3  # and who goes first rotates
    by_name = {r.variant: r for r in results}
    for pass_name in ("forward", "forward_backward"):
        peers = [by_name["eager"], by_name["peer"]]
        best = min(peers, key=lambda r: getattr(r, f"{pass_name}_ms"))
        for r in results:
            assert getattr(r, f"best_peer_{pass_name}") == best.variant
            assert getattr(r, f"x_best_peer_{pass_name}") == pytest.approx(
                getattr(best, f"{pass_name}_ms") / getattr(r, f"{pass_name}_ms"))
    assert by_name["fastllm[stand-in]"].speedup_forward_backward is not None


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


def test_bench_generate_quick(tmp_path):
    """bench.generate end to end on a tiny Llama: both sides timed, greedy tokens equal to transformers' (the
    tool exits with an error otherwise), and the decode step's time split."""
    cmd = [sys.executable, "-m", "bench.generate", "--quick", "--rounds", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "generate.json").read_text())
    assert {(r["batch"], r["mode"]) for r in report["speed"]} == {(2, "greedy"), (2, "sampled")}
    for row in report["speed"]:
        assert row["hf_tokens_per_s"] > 0 and row["fastllm_tokens_per_s"] > 0
    assert [split["batch"] for split in report["decode_step"]] == [2]  # one split per batch size
    for split in report["decode_step"]:
        assert split["wall_ms_per_step"] > 0
        assert split["ms_per_step"]["matmuls"] > 0 and "rest: prefill, Python (wall - sections)" in split["ms_per_step"]


def test_select_cases_by_dtype():
    """--dtypes keeps the cases of the named dtypes: the fused heads' bf16 ones include the autocast runs (fp32
    inputs, listed by their bf16 compute dtype); an unknown dtype is refused with the known ones."""
    from bench.run import select_cases

    selected = select_cases(torch.device("cpu"), True, ["fused_linear"], ["bfloat16"])
    assert selected and {case.dtype for _, case in selected} == {torch.bfloat16}
    autocast = [case for _, case in selected if case.op.endswith("_autocast")]
    assert {case.op for case in autocast} == {"linear_token_logprobs_autocast", "linear_cross_entropy_autocast"}
    hidden, weight, _ = autocast[0].make_inputs(torch.device("cpu"), autocast[0].dtype)
    assert hidden.dtype == weight.dtype == torch.float32
    plain = [case for _, case in selected if case.op == "linear_cross_entropy"]
    assert plain[0].make_inputs(torch.device("cpu"), plain[0].dtype)[0].dtype == torch.bfloat16
    with pytest.raises(SystemExit, match=r"--dtypes: unknown \['float8'\]"):
        select_cases(torch.device("cpu"), True, ["fused_linear"], ["float8"])
