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
