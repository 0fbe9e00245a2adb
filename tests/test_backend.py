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


def test_ops_skip_the_dispatcher_only_when_it_has_nothing_to_record():
    """call_op runs a custom op's body directly (no ~20-100 us dispatch) unless autograd, autocast, a compile trace
    or a dispatch mode needs the op: an input requiring grad under grad mode does, grad mode alone does not."""
    from fastllm.ops._common import call_op

    class Op:
        def __call__(self, *args):
            return "dispatcher"

        def _init_fn(self, *args):
            return "direct"

    op, plain, leaf = Op(), torch.ones(3), torch.ones(3, requires_grad=True)
    assert call_op(op, plain, 1.0) == "direct"
    assert call_op(op, plain, leaf) == "dispatcher"
    with torch.no_grad():
        assert call_op(op, plain, leaf) == "direct"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call_op(op, plain) == "dispatcher"
