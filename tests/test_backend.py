"""Backend dispatch: context > environment > device default > torch fallback with one warning."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastllm
from fastllm import backend, ops


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown fastllm backend 'cuda'"):
        with fastllm.use_backend("cuda"):
            pass


def test_precedence_context_over_environment_over_default(monkeypatch):
    monkeypatch.delenv("FASTLLM_BACKEND", raising=False)
    assert backend.requested_backend("cpu") == "cpp"
    assert backend.requested_backend("cuda") == "triton"
    monkeypatch.setenv("FASTLLM_BACKEND", "torch")
    assert backend.requested_backend("cpu") == "torch"
    with fastllm.use_backend("triton"):
        assert backend.requested_backend("cpu") == "triton"
        with fastllm.use_backend("cpp"):
            assert backend.requested_backend("cpu") == "cpp"
        assert backend.requested_backend("cpu") == "triton"
    assert backend.requested_backend("cpu") == "torch"


def test_environment_value_is_validated(monkeypatch):
    monkeypatch.setenv("FASTLLM_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown fastllm backend 'fast'"):
        backend.requested_backend("cpu")


def test_available_backends_here():
    """On this CPU-only test machine: the reference, the C++ extension, and Triton in the interpreter."""
    assert fastllm.available_backends("cpu") == ["torch", "triton", "cpp"]


def test_triton_without_interpreter_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "triton_interpret", lambda: False)
    backend.warn_fallback.cache_clear()
    x = torch.randn(3, 5)
    with fastllm.use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ops.softmax(x)
        second = ops.log_softmax(x)
    messages = [str(w.message) for w in caught if "fastllm" in str(w.message)]
    assert len(messages) == 1 and "triton runs on CUDA tensors" in messages[0]
    torch.testing.assert_close(first, torch.softmax(x, -1))
    torch.testing.assert_close(second, torch.log_softmax(x, -1))


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(backend, "triton_interpret", lambda: False)
    with fastllm.use_backend("triton", strict=True), pytest.raises(fastllm.BackendUnavailable, match="CUDA"):
        ops.softmax(torch.randn(2, 3))


def test_dtype_without_a_kernel_falls_back():
    """float64 runs on cpp; a dtype a backend lacks (float64 on triton) falls back to torch, or raises if strict."""
    x = torch.randn(3, 5, dtype=torch.float64)
    with fastllm.use_backend("triton", strict=True), pytest.raises(fastllm.BackendUnavailable, match="float64"):
        ops.softmax(x)
    with fastllm.use_backend("cpp", strict=True):
        torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1))


def test_without_a_compiler_the_library_still_works(tmp_path):
    """A machine where the C++ extension cannot build: ops run on torch and say why, once."""
    code = (
        "import warnings, torch, fastllm\n"
        "from fastllm import ops\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(4, 9); y = torch.randint(0, 9, (4,))\n"
        "    a = ops.token_logprobs(x, y); b = ops.cross_entropy(x, y)\n"
        "    assert torch.allclose(a, torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0])\n"
        "msgs = [str(w.message) for w in caught if 'fastllm' in str(w.message)]\n"
        "assert len(msgs) == 1 and 'could not be built' in msgs[0], msgs\n"
        "assert fastllm.available_backends('cpu') == ['torch'], fastllm.available_backends('cpu')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CXX="/nonexistent/c++", FASTLLM_CACHE=str(tmp_path), TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# A custom op whose body notes the dtype its own matmul runs in (bfloat16 if autocast reached it), and a wrapper
# noting the calls that go through the dispatcher (CustomOpDef.__call__): call_op's decisions are observable
# without timing anything.
_body_matmul_dtypes = []


@torch.library.custom_op("fastllm_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    _body_matmul_dtypes.append((x[None] @ x[:, None]).dtype)
    return x * factor


def _scaled_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


_scaled.register_autograd(lambda ctx, grad: (grad * ctx.factor, None), setup_context=_scaled_setup)


@torch.library.custom_op("fastllm_test::scaled_without_formula", mutates_args=())
def _scaled_without_formula(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


class _Recorded:
    def __init__(self, op):
        self.op, self.dispatched = op, 0

    def __call__(self, *args):
        self.dispatched += 1
        return self.op(*args)

    def __getattr__(self, name):
        return getattr(self.op, name)


class _Subclass(torch.Tensor):
    pass


def test_ops_skip_the_dispatcher_only_when_it_has_nothing_to_add():
    """call_op runs a custom op without the dispatcher (~20-100 us a call): the body alone when no gradient is
    recorded, an autograd.Function of body and formula when one is, autocast off around either, named in profiles;
    the dispatcher
    only for what needs it (dispatch modes, torch.func transforms such as vmap, tensor subclasses, ops without
    a formula)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastllm.ops._common import call_op

    op = _Recorded(_scaled)
    plain, leaf = torch.ones(3), torch.ones(3, requires_grad=True)
    _body_matmul_dtypes.clear()
    assert torch.equal(call_op(op, plain, 3.0), torch.full((3,), 3.0)) and op.dispatched == 0
    out = call_op(op, leaf, 3.0)  # recorded by the eager Function: same gradient as the registered formula's
    assert op.dispatched == 0 and out.grad_fn is not None and "Eager_fastllm_test_scaled" in type(out.grad_fn).__name__
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.equal(grad, torch.full((3,), 3.0))
    with torch.no_grad():
        assert call_op(op, leaf, 3.0).grad_fn is None and op.dispatched == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call_op(op, plain, 3.0)
        call_op(op, leaf, 3.0)
    assert op.dispatched == 0 and _body_matmul_dtypes == [torch.float32] * 5  # autocast off inside
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call_op(op, plain, 3.0)
        call_op(op, leaf, 3.0)
    assert op.dispatched == 0  # and yet profiles show the op's time under its name, as the dispatcher's event would
    assert [event.count for event in profile.key_averages() if event.key == "fastllm_test::scaled"] == [2]

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        call_op(op, plain, 3.0)
    assert op.dispatched == 1
    call_op(op, plain.as_subclass(_Subclass), 3.0)
    assert op.dispatched == 2
    batched = torch.vmap(lambda row: call_op(op, row, 2.0))(torch.ones(2, 3))  # the body alone cannot see rows
    assert op.dispatched == 3 and torch.equal(batched, torch.full((2, 3), 2.0))
    without = _Recorded(_scaled_without_formula)
    call_op(without, plain, 3.0)
    assert without.dispatched == 0
    call_op(without, leaf, 3.0)  # no formula to run eagerly: the dispatcher says what autograd does with it
    assert without.dispatched == 1

