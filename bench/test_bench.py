"""`pytest bench/`: every case at quick sizes x every variant through pytest-benchmark (forward+backward).

The same Case objects and warm-up as `python -m bench.run`; pytest-benchmark does the timing and keeps
history (--benchmark-autosave, --benchmark-compare). Nothing is asserted about speed.
"""
import pytest
import torch

from bench import harness
from bench.cases import families

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    for family, module in families().items():
        for case in module.cases(DEVICE, quick=True):
            for name in case.variants:
                label = f"{family}-{case.op}-{case.shape}-{harness.dtype_name(case.dtype)}-{name}"
                yield pytest.param(case, name, id=label)


@pytest.mark.parametrize("case, variant", list(_params()))
def test_forward_backward(benchmark, case, variant):
    inputs = case.make_inputs(DEVICE, case.dtype)
    try:
        prepared = harness.prepare(case, variant, inputs, DEVICE)
        step = prepared.forward_backward or prepared.forward
        if case.bytes_moved:
            benchmark.extra_info["bytes_moved"] = case.bytes_moved.forward_backward or case.bytes_moved.forward
        if DEVICE.type == "cuda":  # time the kernels, not just their launch
            benchmark(lambda: (step(), torch.cuda.synchronize()))
        else:
            benchmark(step)
    except harness.Unavailable as reason:
        pytest.skip(str(reason))
    finally:
        if case.variants[variant].compile:
            torch.compiler.reset()  # drop this shape's graphs so dynamo's recompile limit is never reached


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_case_has_peers_and_fastllm_variants(device):
    """Every case compares fastllm with what users already have: eager first, torch.compile of the same code,
    and torch's own fused op where one exists (SDPA, with enable_gqa for grouped heads and for decoding; F.rms_norm;
    F.linear_cross_entropy's chunked path)."""
    for family, module in families().items():
        for case in module.cases(torch.device(device), quick=False):
            names = list(case.variants)
            assert names[0] == harness.BASELINE, (family, case.op)
            assert any(not harness.is_peer(name) for name in names), (family, case.op)
            if family != "gae":  # GAE is a Python loop: nothing to compile or fuse it into
                assert "torch.compile" in names, (family, case.op)
            if case.op == "attention_decode":  # always grouped: SDPA reads the shared heads itself
                assert "sdpa[enable_gqa]" in names, case.shape
            elif family == "attention":
                grouped = "/" in case.shape
                assert ("sdpa[enable_gqa]" in names) == grouped and "sdpa" in names, case.shape
    assert any("/" in case.shape for case in families()["attention"].cases(torch.device(device), quick=False))
