"""layer_norm, rms_norm, add_layer_norm, add_rms_norm: every backend x dtype x shape vs float64."""
import pytest
import torch
from numerics import BACKEND_DEVICES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id, on_backend

from fastllm import ops
from fastllm.ops.norm import reference

INPUTS = ("x", "residual", "weight", "bias")

# name -> (f(namespace, inputs, eps) -> tuple of outputs, the inputs it uses, its eps): the same call on
# fastllm.ops and on the reference.
CASES = {
    "layer_norm": (lambda ns, t, eps: (ns.layer_norm(t["x"], t["weight"], t["bias"], eps),),
                   ("x", "weight", "bias"), 1e-5),
    "layer_norm_weight_only": (lambda ns, t, eps: (ns.layer_norm(t["x"], t["weight"], eps=eps),),
                               ("x", "weight"), 1e-3),
    "layer_norm_bias_only": (lambda ns, t, eps: (ns.layer_norm(t["x"], None, t["bias"], eps),), ("x", "bias"), 1e-5),
    "layer_norm_plain": (lambda ns, t, eps: (ns.layer_norm(t["x"], eps=eps),), ("x",), 1e-5),
    "rms_norm": (lambda ns, t, eps: (ns.rms_norm(t["x"], t["weight"], eps),), ("x", "weight"), 1e-6),
    "rms_norm_gemma": (lambda ns, t, eps: (ns.rms_norm(t["x"], t["weight"], eps, offset=1.0),), ("x", "weight"), 1e-5),
    "rms_norm_plain": (lambda ns, t, eps: (ns.rms_norm(t["x"], eps=eps),), ("x",), 1e-6),
    "add_layer_norm": (lambda ns, t, eps: ns.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], eps),
                       INPUTS, 1e-5),
    "add_rms_norm": (lambda ns, t, eps: ns.add_rms_norm(t["x"], t["residual"], t["weight"], eps, offset=0.5),
                     ("x", "residual", "weight"), 1e-6),
}

# (activation dtype, parameter dtype): same-dtype parameters, and fp32 parameters with half activations.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = [f"{backend_id(x)}-w{backend_id(w)}" for x, w in DTYPE_PAIRS]

# Odd lengths, 3-D, a row longer than Triton's register block (its looping path). Rows of length 1: below.
SHAPES = [(5, 7), (2, 3, 129), (3, 1000), (2, 9000)]
BACKENDS = dict(argnames="backend,device", argvalues=BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
KERNEL_BACKENDS = dict(argnames="backend,device", argvalues=KERNEL_BACKEND_DEVICES,
                       ids=[b for b, _ in KERNEL_BACKEND_DEVICES])


def make_inputs(shape, dtype, param_dtype, scale=1.0, shift=0.0):
    """Inputs rounded to their dtypes (a float64 copy holds the same values); weights near 1, as trained ones."""
    n = shape[-1]
    return {
        "x": (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype),
        "residual": torch.randn(shape, dtype=torch.float64).to(dtype),
        "weight": (1 + 0.5 * torch.randn(n, dtype=torch.float64)).to(param_dtype),
        "bias": (0.5 * torch.randn(n, dtype=torch.float64)).to(param_dtype),
    }


def run_case(case, namespace, inputs, eps=None, cotangent_seed=1):
    """Forward, then backward with fixed random cotangents on every output; returns (outputs, grads by name)."""
    fn, used, case_eps = CASES[case]
    leaves = {name: t.detach().clone().requires_grad_(name in used) for name, t in inputs.items()}
    outputs = fn(namespace, leaves, case_eps if eps is None else eps)
    generator = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype).to(o.device)
                  for o in outputs]
    torch.autograd.backward(outputs, cotangents)
    return [o.detach() for o in outputs], {name: leaves[name].grad for name in used}


def check_case(case, backend, device, inputs, eps=None):
    with on_backend(backend):
        outputs, grads = run_case(case, ops, {k: v.to(device) for k, v in inputs.items()}, eps)
    expected_outputs, expected_grads = run_case(case, reference, {k: v.double() for k, v in inputs.items()}, eps)
    base_outputs, base_grads = run_case(case, reference, inputs, eps)
    for i, (out, expected, base) in enumerate(zip(outputs, expected_outputs, base_outputs)):
        assert out.dtype == inputs["x"].dtype, f"{case} output {i}: dtype {out.dtype}, expected x's"
        assert_matches_reference(f"{case} output {i}", out, expected, base)
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == inputs[name].dtype, f"{case} d{name}: {grad!r}"
        assert_matches_reference(f"{case} d{name}", grad, expected_grads[name], base_grads[name])


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_IDS)
@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(case, backend, device, dtype, param_dtype, shape):
    check_case(case, backend, device, make_inputs(shape, dtype, param_dtype))


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("shape", [(1, 1), (6, 1)], ids=["1x1", "6x1"])
@pytest.mark.parametrize("dtype,param_dtype", [DTYPE_PAIRS[0], DTYPE_PAIRS[-1]], ids=[DTYPE_IDS[0], DTYPE_IDS[-1]])
@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_rows_of_length_1(case, backend, device, dtype, param_dtype, shape):
    """n = 1: LayerNorm gives the bias and dx = 0; RMSNorm gives x / sqrt(x^2 + eps) * scale.

    The RMSNorm cases run with eps = 0.5. With eps << x^2 their dx = rstd * g * (1 - xhat^2) is nothing but
    cancellation: its error is set by the last bit of the fp32 rstd, in torch exactly as here (over 2e5 rows
    the two error distributions agree within a few percent), so a max-error ratio over a few rows would compare noise. A
    large eps makes the length-1 path testable on its own terms.
    """
    eps = 0.5 if "rms" in case else None
    check_case(case, backend, device, make_inputs(shape, dtype, param_dtype), eps)


@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["float32", "bfloat16-wfloat32"])
@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("case", ["add_layer_norm", "rms_norm"])
def test_hidden_16384(case, backend, device, dtype, param_dtype):
    check_case(case, backend, device, make_inputs((2, 16384), dtype, param_dtype))


# 5000 columns: not a multiple of 16 and over 4096, the Triton backward's looping path for unaligned rows
@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("case", ["add_layer_norm", "rms_norm"])
def test_unaligned_hidden_5000(case, backend, device):
    check_case(case, backend, device, make_inputs((2, 5000), torch.float32, torch.float32))


@pytest.mark.usefixtures("poison_outputs", "streaming_stores")
@pytest.mark.parametrize("shape", [(5, 7), (3, 1000), (33, 64), (2, 9000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"])
def test_cpp_streaming_stores_match_float64(case, dtype, param_dtype, shape):
    """(33, 64): rows aligned for whole-vector streaming; the odd widths mix aligned and unaligned rows."""
    check_case(case, "cpp", "cpu", make_inputs(shape, dtype, param_dtype))


def test_streaming_store_threshold_rejects_bad_values():
    from fastllm import _cpp

    with pytest.raises(RuntimeError, match="bytes must be >= 0, or -1"):
        _cpp.load().set_streaming_store_threshold(-2)


# The two degenerate-row tests run on the kernel backends only: on CUDA the torch backend is torch's own GPU
# layer_norm, whose Welford variance of a constant row is not 0 (1.6e-4 off on an H200, 240x torch's CPU error).
@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize(**KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"])
def test_zero_variance_rows(case, backend, device):
    """Constant rows (0, 3, -1e4, and a value that is not a binary fraction): finite, and as float64 says."""
    inputs = make_inputs((5, 300), torch.float32, torch.float32)
    inputs["x"][0], inputs["x"][1], inputs["x"][2], inputs["x"][3] = 0.0, 3.0, -1e4, 0.1
    inputs["residual"][:4] = 0.0
    check_case(case, backend, device, inputs)


@pytest.mark.parametrize(**KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["layer_norm", "add_layer_norm"])
def test_large_offset(case, backend, device):
    """x = 1e4 + noise: one-pass E[x^2] - E[x]^2 cancels ~8 digits in fp32; the kernels' two-pass does not."""
    inputs = make_inputs((6, 1000), torch.float32, torch.float32, shift=1e4)
    check_case(case, backend, device, inputs)
    with on_backend(backend):
        y = ops.layer_norm(inputs["x"].to(device))
    expected = reference.layer_norm(inputs["x"].double())
    # Unit variance out, to about the input's own resolution (ulp(1e4) ~ 1e-3 of a unit-variance signal).
    assert (y.double().cpu() - expected).abs().max() < 1e-2


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("case", ["layer_norm", "rms_norm_gemma", "add_layer_norm", "add_rms_norm"])
def test_non_contiguous(case, backend, device):
    inputs = make_inputs((40, 301), torch.float32, torch.float32)
    for name in ("x", "residual"):
        inputs[name] = inputs[name].t().contiguous().t()[::2]  # strided rows and columns
        assert not inputs[name].is_contiguous()
    check_case(case, backend, device, inputs)


@pytest.mark.parametrize(**BACKENDS)
@pytest.mark.parametrize("used", ["normed", "residual_out"])
@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_add_variant_with_one_output_used(op, used, backend, device):
    """Gradients when only one of (normed, residual_out) feeds the loss: the other's gradient is None."""
    inputs = {k: v for k, v in make_inputs((6, 50), torch.float32, torch.float32).items()
              if k != "bias" or op == "add_layer_norm"}

    def grads(namespace, tensors, dev):
        leaves = {k: v.to(dev).clone().requires_grad_(True) for k, v in tensors.items()}
        normed, residual_out = getattr(namespace, op)(**leaves)
        ((normed if used == "normed" else residual_out) * torch.arange(50, device=dev)).sum().backward()
        return {k: v.grad for k, v in leaves.items()}

    with on_backend(backend):
        actual = grads(ops, inputs, device)
    expected = grads(reference, {k: v.double() for k, v in inputs.items()}, "cpu")
    baseline = grads(reference, inputs, "cpu")
    for name, grad in actual.items():
        if expected[name] is None:
            assert grad is None or not grad.any(), f"d{name} should be empty"
        else:
            assert_matches_reference(f"d{name}", grad, expected[name], baseline[name])


@pytest.mark.parametrize("shape", [(64, 257), (12, 9000)], ids=["64x257", "12x9000"])
@pytest.mark.parametrize(**KERNEL_BACKENDS)
def test_parameter_gradients_are_deterministic(backend, device, shape):
    """Two runs (and, on cpp, 1 or 2 threads) give the same bits for dweight and dbias."""
    inputs = {k: v.to(device) for k, v in make_inputs(shape, torch.float32, torch.float32).items()}
    threads = torch.get_num_threads()
    runs = []
    for num_threads in (threads, threads, 1):
        torch.set_num_threads(num_threads)
        try:
            with on_backend(backend):
                _, grads = run_case("add_layer_norm", ops, inputs)
        finally:
            torch.set_num_threads(threads)
        runs.append(grads)
    for name in ("weight", "bias"):
        for run in runs[1:]:
            assert torch.equal(runs[0][name].view(torch.int32), run[name].view(torch.int32)), f"d{name} bits differ"


def test_gradcheck_cpp_float64():
    inputs = {k: v.requires_grad_(True) for k, v in make_inputs((4, 9), torch.float64, torch.float64).items()}
    x, residual, weight, bias = (inputs[k] for k in INPUTS)
    with on_backend("cpp"):
        assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a), (x, residual, weight, bias))
        assert torch.autograd.gradcheck(lambda *a: ops.add_rms_norm(*a, offset=1.0), (x, residual, weight))
        assert torch.autograd.gradcheck(lambda *a: ops.layer_norm(*a), (x, None, bias))
        assert torch.autograd.gradcheck(lambda *a: ops.rms_norm(*a), (x,))


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument.
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,error,message", [
    (lambda t: ops.layer_norm(t["x"], t["weight"][:-1]), ValueError, r"weight must have shape \(50,\)"),
    (lambda t: ops.layer_norm(t["x"], t["weight"], t["bias"][None]), ValueError, r"bias must have shape \(50,\)"),
    (lambda t: ops.add_rms_norm(t["x"], t["residual"][:2]), ValueError, "residual must have x's shape"),
    (lambda t: ops.add_rms_norm(t["x"], t["residual"].double()), TypeError, "residual must have x's dtype"),
    (lambda t: ops.rms_norm(t["x"].long()), TypeError, "x must have dtype"),
    (lambda t: ops.rms_norm(t["x"].half(), t["weight"].bfloat16()), TypeError,
     r"weight must have x's dtype \(float16\)"),
    (lambda t: ops.layer_norm(t["x"], t["weight"], t["bias"].half()), TypeError, "bias must have"),
    (lambda t: ops.layer_norm(t["x"], t["weight"].to("meta")), ValueError, "one device"),
    (lambda t: ops.layer_norm(t["x"], eps=-1.0), ValueError, "eps must be a finite number >= 0"),
    (lambda t: ops.rms_norm(t["x"], offset=float("nan")), ValueError, "offset must be a finite number"),
    (lambda t: ops.layer_norm(t["x"][0, 0]), ValueError, "x must have at least 1 dimension"),
    (lambda t: ops.layer_norm("x"), TypeError, "x must be a torch.Tensor"),
], ids=["weight-shape", "bias-shape", "residual-shape", "residual-dtype", "int-x", "weight-dtype", "bias-dtype",
        "device", "eps", "offset", "0-d", "not-tensor"])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(make_inputs((4, 50), torch.float32, torch.float32))


def test_kernels_check_their_arguments():
    """The launchers refuse mismatched arguments even when called directly, past the Python checks."""
    from fastllm import _cpp
    from fastllm.kernels import norm as triton_norm

    t = make_inputs((4, 50), torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match=r"norm_forward: weight must have shape \(50,\)"):
        _cpp.load().norm_forward(t["x"], None, t["weight"][:7], None, 1e-5, 0.0, False)
    with pytest.raises(RuntimeError, match="norm_forward: residual must have x's shape"):
        _cpp.load().norm_forward(t["x"], t["residual"][:2], None, None, 1e-5, 0.0, False)
    with pytest.raises(ValueError, match="weight must be a"):
        triton_norm.norm_forward(t["x"], None, t["weight"][:7], None, 1e-5, 0.0, False)


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True) see one node per op.
# ---------------------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    t = {k: v.to(device) for k, v in make_inputs((5, 37), torch.float32, torch.float32).items()}
    x, residual, weight, bias = (t[k].requires_grad_(True) for k in INPUTS)
    h = t["x"].detach()
    mean, rstd = h.mean(-1), torch.rsqrt(h.var(-1, unbiased=False) + 1e-5)
    dy = torch.randn_like(h)
    return [
        (torch.ops.fastllm.norm.default, (x, None, weight, bias, 1e-5, 0.0, False)),
        (torch.ops.fastllm.norm.default, (x, residual, weight, None, 1e-6, 1.0, True)),
        (torch.ops.fastllm.norm.default, (x, residual, None, None, 1e-5, 0.0, False)),
        (torch.ops.fastllm.norm_backward.default, (dy, dy, h, weight.detach(), mean, rstd, 0.0, False, True, True)),
        (torch.ops.fastllm.norm_backward.default, (dy, None, h, None, mean[:0], rstd, 0.0, True, False, False)),
    ]


@pytest.mark.parametrize(**KERNEL_BACKENDS)
def test_opcheck(backend, device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, (*args, backend))


def _all_ops(x, residual, weight, bias):
    normed, h = ops.add_layer_norm(x, residual, weight, bias)
    normed2, h2 = ops.add_rms_norm(normed, h, weight, offset=1.0)
    return (ops.layer_norm(x, weight, bias).sum() + ops.rms_norm(x, weight).sum() + (normed2 * h2).sum()
            + ops.layer_norm(h, eps=1e-3).pow(2).sum())


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize(**KERNEL_BACKENDS)
def test_compile_fullgraph(backend, device, compile_backend):
    inputs = {k: v.to(device) for k, v in make_inputs((6, 33), torch.float32, torch.float32).items()}
    with on_backend(backend):
        eager_leaves = [inputs[k].clone().requires_grad_(True) for k in INPUTS]
        eager = _all_ops(*eager_leaves)
        eager.backward()
        torch._dynamo.reset()
        compiled_fn = torch.compile(_all_ops, fullgraph=True, backend=compile_backend)
        compiled_leaves = [inputs[k].clone().requires_grad_(True) for k in INPUTS]
        compiled = compiled_fn(*compiled_leaves)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name, a, b in zip(INPUTS, compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"d{name}: {m}")
