"""softmax, log_softmax, token_logprobs, entropy, cross_entropy: every backend x dtype x shape vs float64."""
import pytest
import torch
import torch.nn.functional as F
from numerics import (BACKEND_DEVICES, DTYPES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id,
                      on_backend)

import fastllm
from fastllm import ops
from fastllm.ops.softmax import reference

IGNORE = -100

# name -> f(namespace, logits, labels): the same call on fastllm.ops and on the reference.
CASES = {
    "softmax": lambda ns, x, y: ns.softmax(x, dim=-1),
    # dim=0 of a view whose classes sit first (not last, not contiguous): the rows stay as few as in the other
    # cases, so the interpreter does not run one program per column of x
    "softmax_dim0": lambda ns, x, y: ns.softmax(x.movedim(-1, 0), dim=0),
    "log_softmax": lambda ns, x, y: ns.log_softmax(x, dim=-1),
    "token_logprobs": lambda ns, x, y: ns.token_logprobs(x, y, ignore_index=IGNORE),
    "token_logprobs_t0.7": lambda ns, x, y: ns.token_logprobs(x, y, temperature=0.7, ignore_index=IGNORE),
    "entropy": lambda ns, x, y: ns.entropy(x),
    "entropy_t1.3": lambda ns, x, y: ns.entropy(x, temperature=1.3),
    "cross_entropy": lambda ns, x, y: ns.cross_entropy(x, y, ignore_index=IGNORE),
    "cross_entropy_sum_smooth": lambda ns, x, y: ns.cross_entropy(x, y, reduction="sum", label_smoothing=0.1),
    "cross_entropy_none_smooth": lambda ns, x, y: ns.cross_entropy(x, y, reduction="none", label_smoothing=0.2,
                                                                   ignore_index=IGNORE),
}

# Odd sizes, V not a power of two, V=1, one row, 3-D, and a vocabulary longer than one block.
SHAPES = [(1, 1), (5, 7), (3, 4, 1000), (9, 5003)]


def make_inputs(shape, dtype, device, scale=3.0, ignore_fraction=0.2):
    """Logits rounded to `dtype` (the float64 copy holds the same values) and labels with some ignored."""
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_fraction] = IGNORE
    labels.view(-1)[0] = shape[-1] - 1  # at least one valid label, and the last class
    return logits.to(device), labels.to(device)


def run_case(case, namespace, logits, labels, cotangent_seed=1):
    """Forward, then backward with a fixed random cotangent; returns (output, logits.grad)."""
    x = logits.detach().clone().requires_grad_(True)
    out = CASES[case](namespace, x, labels)
    generator = torch.Generator().manual_seed(cotangent_seed)
    cotangent = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
    out.backward(cotangent)
    return out.detach(), x.grad


def check_case(case, backend, device, logits, labels):
    with on_backend(backend):
        out, grad = run_case(case, ops, logits.to(device), labels.to(device))
    expected_out, expected_grad = run_case(case, reference, logits.double().cpu(), labels.cpu())
    base_out, base_grad = run_case(case, reference, logits.cpu(), labels.cpu())
    assert out.dtype == base_out.dtype and grad.dtype == logits.dtype
    assert_matches_reference(f"{case} output", out, expected_out, base_out)
    assert_matches_reference(f"{case} grad", grad, expected_grad, base_grad)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=backend_id)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(case, backend, device, dtype, shape):
    logits, labels = make_inputs(shape, dtype, "cpu")
    check_case(case, backend, device, logits, labels)


# (16, 4096): rows aligned for whole-vector streaming, two chunks each; 2049 and 70001 mix aligned and unaligned rows
# with ragged chunks, and 70001 is past the columns the softmax forward keeps its exponentials for.
@pytest.mark.usefixtures("poison_outputs", "streaming_stores")
@pytest.mark.parametrize("shape", [(16, 4096), (5, 2049), (3, 70001)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["softmax", "log_softmax", "token_logprobs", "cross_entropy_none_smooth"])
def test_cpp_streaming_stores_match_float64(case, dtype, shape):
    logits, labels = make_inputs(shape, dtype, "cpu")
    check_case(case, "cpp", "cpu", logits, labels)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("case", ["softmax", "log_softmax", "token_logprobs", "entropy", "cross_entropy"])
def test_non_contiguous(case, backend, device):
    base, labels = make_inputs((40, 301), torch.float32, "cpu")
    logits = base.t().contiguous().t()[::2]  # strided rows and columns
    assert not logits.is_contiguous()
    check_case(case, backend, device, logits, labels[::2])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("case", ["token_logprobs_t0.7", "cross_entropy_none_smooth", "entropy", "log_softmax"])
def test_vocabulary_262144(case, backend, device):
    logits, labels = make_inputs((2, 262144), torch.float32, "cpu")
    check_case(case, backend, device, logits, labels)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("case", list(CASES))
def test_extreme_logits(case, backend, device):
    """Logits of +-1e4 and -inf entries (never at the label): a number wherever PyTorch in float64 gives one."""
    logits, labels = make_inputs((6, 777), torch.float32, "cpu", scale=1.0)
    logits[0] *= 1e4
    logits[1] = torch.where(logits[1] > 0, 1e4, -1e4)
    logits[2:5, ::3] = float("-inf")
    labels[2:5] = torch.where(labels[2:5] % 3 == 0, labels[2:5] + 1, labels[2:5]).clamp(max=775)
    check_case(case, backend, device, logits, labels)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_across_exp_range(case, backend, device):
    """Logits spread over [max - 130, max], shuffled: exp(z - max) runs through every binade of fp32 down to
    the denormals and below, within 2x of PyTorch's error."""
    generator = torch.Generator().manual_seed(3)
    rows = torch.linspace(-130.0, 0.0, 1500, dtype=torch.float64).repeat(4, 1)
    logits = torch.stack([row[torch.randperm(row.numel(), generator=generator)] for row in rows]) + 7.0
    logits = logits.float()
    labels = torch.randint(0, logits.shape[-1], (4,), generator=generator)
    check_case(case, backend, device, logits, labels)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_ignored_positions_give_zero_and_no_gradient(backend, device):
    logits, labels = make_inputs((8, 50), torch.float32, device)
    labels[::2] = IGNORE
    labels[1::2] = torch.arange(4, device=device)
    x = logits.clone().requires_grad_(True)
    with on_backend(backend):
        logprobs = ops.token_logprobs(x, labels, ignore_index=IGNORE)
        logprobs.sum().backward()
    assert torch.all(logprobs[::2] == 0) and torch.all(logprobs[1::2] < 0)
    assert torch.all(x.grad[::2] == 0) and torch.all(x.grad[1::2].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_cross_entropy_matches_torch_semantics(backend, device):
    """Same numbers as F.cross_entropy, including mean over non-ignored positions and all-ignored -> NaN."""
    logits, labels = make_inputs((4, 3, 11), torch.float32, device)
    with on_backend(backend):
        ours = ops.cross_entropy(logits, labels, label_smoothing=0.15)
        all_ignored = ops.cross_entropy(logits, torch.full_like(labels, IGNORE))
    theirs = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), label_smoothing=0.15)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.isnan(all_ignored)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, from every backend.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
@pytest.mark.parametrize("bad_label", [50, -1])
def test_label_out_of_range(backend, device, bad_label):
    logits, labels = make_inputs((4, 50), torch.float32, device)
    labels[2] = bad_label
    for call in (lambda: ops.token_logprobs(logits, labels), lambda: ops.cross_entropy(logits, labels)):
        with on_backend(backend), pytest.raises(ValueError, match=f"label {bad_label} at position 2 is out of range"):
            call()


def test_cpp_kernel_checks_labels_itself():
    """The C++ kernel refuses an out-of-range label even when called directly, past the Python checks."""
    from fastllm import _cpp

    logits, labels = make_inputs((4, 50), torch.float32, "cpu")
    labels[3] = 1000
    with pytest.raises(RuntimeError, match="label 1000 at position 3 is out of range"):
        _cpp.load().logit_stats_forward(logits, labels, 1.0, IGNORE, False, False)


@pytest.mark.parametrize("call,error,message", [
    (lambda x, y: ops.token_logprobs(x.long(), y), TypeError, "logits must have dtype"),
    (lambda x, y: ops.token_logprobs(x, y.float()), TypeError, "labels must have an integer dtype"),
    (lambda x, y: ops.token_logprobs(x, y[:3]), ValueError, r"labels must have shape \(4,\)"),
    (lambda x, y: ops.cross_entropy(x, y.to("meta")), ValueError, "one device"),
    (lambda x, y: ops.token_logprobs(x, y, temperature=0.0), ValueError, "temperature must be a positive"),
    (lambda x, y: ops.cross_entropy(x, y, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda x, y: ops.cross_entropy(x, y, label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (lambda x, y: ops.softmax(x, dim=2), ValueError, "dim must be an int"),
    (lambda x, y: ops.entropy(x[:, :0]), ValueError, "at least one class"),
    (lambda x, y: ops.softmax("x"), TypeError, "x must be a torch.Tensor"),
], ids=["int-logits", "float-labels", "shape", "device", "temperature", "reduction", "smoothing", "dim", "V=0",
        "not-tensor"])
def test_bad_input(call, error, message):
    logits, labels = make_inputs((4, 50), torch.float32, "cpu")
    with pytest.raises(error, match=message):
        call(logits, labels)


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True) see one node per op.
# ---------------------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    logits, labels = make_inputs((5, 37), torch.float32, device)
    x = logits.requires_grad_(True)
    lse = torch.logsumexp(logits.detach().double(), -1)  # the kernels keep lse in fp64
    coefficient = torch.randn(5, device=device)
    return [
        (torch.ops.fastllm.softmax.default, (x, False)),
        (torch.ops.fastllm.softmax.default, (x, True)),
        (torch.ops.fastllm.softmax_backward.default, (torch.randn_like(logits), torch.softmax(logits.detach(), -1),
                                                     False)),
        (torch.ops.fastllm.logit_stats.default, (x, labels, 0.8, IGNORE, True, True)),
        (torch.ops.fastllm.logit_stats.default, (x, None, 1.0, IGNORE, False, True)),
        (torch.ops.fastllm.logit_stats_backward.default,
         (logits.detach(), labels, lse, coefficient, coefficient, coefficient, None, 1.0)),
    ]


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_opcheck(backend, device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, (*args, backend))


def _all_ops(x, y):
    return (ops.softmax(x).sum() + ops.log_softmax(x).sum() + ops.token_logprobs(x, y, temperature=0.9).sum()
            + ops.entropy(x).sum() + ops.cross_entropy(x, y, label_smoothing=0.1))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_compile_fullgraph(backend, device, compile_backend):
    logits, labels = make_inputs((6, 33), torch.float32, device)
    with on_backend(backend):
        x = logits.clone().requires_grad_(True)
        eager = _all_ops(x, labels)
        eager.backward()
        torch._dynamo.reset()
        compiled_fn = torch.compile(_all_ops, fullgraph=True, backend=compile_backend)
        xc = logits.clone().requires_grad_(True)
        compiled = compiled_fn(xc, labels)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xc.grad, x.grad)


def test_kernel_backward_allocates_only_the_gradient():
    """The C++ backward of token_logprobs allocates one logits-sized tensor: the gradient."""
    logits, labels = make_inputs((64, 4096), torch.float32, "cpu")
    x = logits.requires_grad_(True)
    with on_backend("cpp"):
        out = ops.token_logprobs(x, labels)
    big = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out.sum().backward()
    big = [e for e in prof.events() if e.cpu_memory_usage >= logits.numel() * 4]
    assert len(big) >= 1, "the gradient itself should be a logits-sized allocation"
    assert sum(e.cpu_memory_usage for e in big if "logit_stats_backward" in e.name) <= logits.numel() * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=backend_id)
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_logit_stats_backward_in_place(backend, device, dtype):
    """out=x (how the fused heads reuse their one chunk of logits) writes exactly the out-of-place gradient,
    the label column included; a wrong out is refused."""
    from fastllm.ops._common import kernels

    launchers = kernels(backend, "softmax")
    logits, labels = make_inputs((9, 5003), dtype, device)
    labels[1], labels[2] = 0, 5002  # the first and last columns: read before their rows are overwritten
    lse = torch.logsumexp(logits.double() * 0.8, -1)
    a, b, c, d = (torch.randn(9, device=device) for _ in range(4))
    expected = launchers.logit_stats_backward(logits, labels, lse, a, b, c, d, 0.8)
    in_place = logits.clone()
    result = launchers.logit_stats_backward(in_place, labels, lse, a, b, c, d, 0.8, out=in_place)
    assert result.data_ptr() == in_place.data_ptr()
    assert torch.equal(in_place, expected)
    with pytest.raises((ValueError, RuntimeError), match="out must be a contiguous"):
        launchers.logit_stats_backward(logits, labels, lse, a, b, c, d, 0.8, out=logits[:, :100])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpp_row_argmax_matches_torch_argmax(dtype):
    """The C++ greedy pick (fastllm.model.generate.greedy) is torch.argmax exactly: the first of equal maxima,
    across 2048-column chunks and vector lanes; a NaN counts as the largest (its first one); an all -inf row
    gives 0; odd widths."""
    from fastllm.ops._common import kernels

    generator = torch.Generator().manual_seed(5)
    rows = []
    for cols in (1, 7, 33, 2049, 32000, 70001):
        x = torch.randn(4, cols, generator=generator, dtype=torch.float64)
        if cols > 40:
            x[0, [cols // 3, cols - 2, 5]] = 50.0  # ties: the first (5) wins, in another chunk than the rest
            x[1, [cols - 1, cols // 2]] = float("nan")  # the first NaN
            x[2] = float("-inf")
            x[3, cols - 1] = float("inf")
        rows.append(x.to(dtype))
    rows.append(torch.full((3, 100), 2.0, dtype=dtype))  # every value equal: index 0
    for x in rows:
        got = kernels("cpp", "softmax").row_argmax(x)
        assert got.dtype == torch.int64
        assert torch.equal(got, x.argmax(dim=-1)), (x.shape, got, x.argmax(dim=-1))


def test_greedy_is_argmax_on_every_backend():
    from fastllm.model.generate import greedy

    logits = torch.randn(8, 5003).bfloat16()
    for name in ("cpp", "torch"):
        with fastllm.use_backend(name):
            assert torch.equal(greedy(logits), logits.argmax(dim=-1))
    assert torch.equal(greedy(logits.t().contiguous().t()), logits.argmax(dim=-1))  # non-contiguous view
