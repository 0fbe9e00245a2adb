"""Which implementation runs an op.

Order of precedence: `use_backend(...)` context > FASTLLM_BACKEND environment variable > the device's
default (CUDA -> triton, CPU -> cpp) > the torch reference. A backend that cannot run on the tensor's device
falls back to torch with one warning that says why.
"""
import contextlib
import functools
import os
import threading
import warnings

import torch

BACKENDS = ("torch", "triton", "cpp")
# Dtypes each kernel backend implements; anything else runs on the torch reference.
KERNEL_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cpp": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}


class _State(threading.local):
    """The use_backend() in force on this thread (class defaults: a getattr that misses costs a raised
    AttributeError, and resolve() runs once per op call)."""
    name = None
    strict = False


_state = _State()


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fastllm backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name, *, strict=False):
    """Run fastllm ops inside the block on backend `name` ("torch", "triton" or "cpp").

    With strict=True an op whose tensors the backend cannot handle raises BackendUnavailable instead of
    falling back to torch (what tests and benchmarks want: no silent substitution).
    """
    previous = _state.name, _state.strict
    _state.name, _state.strict = _check_name(name), strict
    try:
        yield
    finally:
        _state.name, _state.strict = previous


class BackendUnavailable(RuntimeError):
    """A backend was required (use_backend(..., strict=True)) but cannot run the op here."""


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_problem():
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception as exc:
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _cpp_problem():
    from . import _cpp

    try:
        _cpp.load()
    except _cpp.CppUnavailable as exc:
        return str(exc)
    return None


def _device_type(device):
    # a tensor's .device is already a torch.device: rebuilding it is a third of resolve()'s time
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def why_unavailable(name, device):
    """None if backend `name` can run on tensors on `device`, else the reason it cannot."""
    device_type = _device_type(device)
    if name == "torch":
        return None
    if name == "triton":
        problem = _triton_problem()
        if problem:
            return problem
        if device_type == "cuda" or (device_type == "cpu" and triton_interpret()):
            return None
        return f"triton runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), not on {device_type}"
    if name == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs on CPU tensors, not on {device_type}"
        return _cpp_problem()
    raise ValueError(f"unknown fastllm backend {name!r}; expected one of {BACKENDS}")


def available_backends(device=None):
    """The backends that can run here (on `device`; default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [name for name in BACKENDS if why_unavailable(name, device) is None]


def requested_backend(device):
    """The backend asked for (context, environment, or the device default), before any fallback."""
    name = _state.name or os.environ.get("FASTLLM_BACKEND")
    if name:
        return _check_name(name)
    return "triton" if _device_type(device) == "cuda" else "cpp"


@functools.cache
def warn_fallback(name, reason):
    """Warn, once per backend and reason, that an op runs on torch instead of `name`."""
    warnings.warn(f"fastllm: backend {name!r} is unavailable, using 'torch' instead: {reason}", stacklevel=4)


def fall_back(name, reason):
    """Give up on backend `name` for one op: raise if it was required, else warn once and use torch."""
    if _state.strict:
        raise BackendUnavailable(f"fastllm: backend {name!r} cannot run this op: {reason}")
    warn_fallback(name, reason)
    return "torch"


# torch.compile runs this at trace time and bakes the answer into the graph (no graph break), so the backend
# of a compiled function is the one in force when it was compiled.
@torch.compiler.assume_constant_result
def resolve(device, dtype=None):
    """The backend that will run an op on tensors of `dtype` on `device`."""
    name = requested_backend(device)
    reason = why_unavailable(name, device)
    if reason is None and dtype is not None and name != "torch" and dtype not in KERNEL_DTYPES[name]:
        reason = f"it has no kernel for {str(dtype).removeprefix('torch.')}"
    return name if reason is None else fall_back(name, reason)
