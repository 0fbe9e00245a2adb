"""Plumbing shared by every op family: argument checks, row flattening, and the backend kernel tables."""
import importlib

import torch

from .. import backend as _backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name, t, dtypes=FLOAT_DTYPES, min_dim=0):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_labels_shape(labels, logits):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {str(labels.dtype).removeprefix('torch.')}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits' shape without its last "
                         f"dimension), got {tuple(labels.shape)}")
    check_same_device(logits=logits, labels=labels)


def check_label_range(labels, num_classes, ignore_index):
    """Raise ValueError naming the first label outside [0, num_classes) that is not ignore_index."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels: label {int(labels[position])} at position {position} is out of range for "
                         f"{num_classes} classes (ignore_index={ignore_index})")


def check_positive(name, value):
    if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def as_rows(x):
    """(..., n) -> a contiguous (rows, n) view or copy, plus the leading shape to restore."""
    lead = x.shape[:-1]
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def resolve(t, dtype=None):
    """The backend for tensor `t`: the requested one if it runs on t's device and dtype (or `dtype`, the one the
    op computes in), else torch."""
    if t.numel() == 0:  # nothing to launch; the reference returns the right empty shapes
        return "torch"
    return _backend.resolve(t.device, dtype or t.dtype)


# Dispatch keys whose kernels call_op's direct paths stand in for: under torch.autocast the public functions
# have already cast the op's inputs (by the rule register_autocast installs), so the body only needs autocast
# off, as the registered autocast kernel runs it, to keep its own matmuls in the dtypes chosen.
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU).add(torch._C.DispatchKey.AutocastCUDA)
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_eager_functions = {}


def _eager_function(op):
    """A torch.autograd.Function running op's body forward and its registered autograd formula backward: what the
    dispatcher's autograd kernel for op runs (torch._library.autograd), without the dispatch around it."""
    function = _eager_functions.get(op)
    if function is None:
        body, setup, formula = op._init_fn, op._setup_context_fn, op._backward_fn

        # forward(ctx, ...) rather than a separate setup_context staticmethod: apply() then skips binding
        # default arguments through inspect.signature, 12 of its 21 us a call.
        def forward(ctx, *args):
            output = body(*args)
            setup(ctx, args, output)
            return output

        def backward(ctx, *grads):
            return formula(ctx, *grads)

        function = _eager_functions[op] = type(f"Eager_{op._namespace}_{op._name}", (torch.autograd.Function,),
                                               {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return function


def needs_dispatcher():
    """Whether an op must go through the dispatcher: a torch.compile trace, a dispatch or torch-function mode,
    or a torch.func transform is active."""
    return (torch.compiler.is_compiling() or bool(torch._C._len_torch_dispatch_stack())
            or torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None)


def call_op(op, *args):
    """op(*args) for one of fastllm's torch.library custom ops, without the dispatcher where it has nothing to add:
    its dispatch costs ~20-100 us a call on a 2-core CPU, more than a decode step's norm kernel takes (22 us of a
    40 us attention_decode call over a 128-position cache). Direct: the body itself when there is no gradient to
    record (grad mode off, or no input requiring one); an autograd.Function of the body and the op's registered
    formula when there is; under autocast either runs with autocast off (the public function cast the inputs);
    under torch.profiler either is recorded under the op's name.
    Through the dispatcher: torch.compile traces, dispatch and torch-function modes, torch.func transforms,
    tensor subclasses (DTensor, fake tensors), and gradients for an op registered without a formula."""
    if needs_dispatcher():
        return op(*args)
    grad_mode, records_grad = torch.is_grad_enabled(), False
    for a in args:  # one plain loop: two any() generators over 12 arguments took 5 us of a 40 us decode call
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TENSOR_TYPES:
                return op(*args)
            records_grad = records_grad or (grad_mode and a.requires_grad)
    if records_grad and getattr(op, "_backward_fn", None) is None:
        return op(*args)
    run = _eager_function(op).apply if records_grad else op._init_fn
    if torch._C._is_any_autocast_enabled():
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return _profiled(op, run, args)
    return _profiled(op, run, args)


def _profiled(op, run, args):
    """run(*args), under the op's name ("fastllm::norm") when torch.profiler records: the event the dispatcher
    would have recorded, so profiles still show the time in each fastllm op."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"{op._namespace}::{op._name}"):
            return run(*args)
    return run(*args)


_kernel_modules = {}


def kernels(backend, family):
    """The module holding `family`'s launchers for a kernel backend: the same function names in each."""
    module = _kernel_modules.get((backend, family))
    if module is None:
        if backend == "triton":
            module = importlib.import_module(f"fastllm.kernels.{family}")
        elif backend == "cpp":
            from .. import _cpp

            module = _cpp.load()
        else:
            raise ValueError(f"backend {backend!r} has no kernels")
        _kernel_modules[backend, family] = module
    return module


# ---------------------------------------------------------------------------------------------------------
# Autocast. Each op family states, per device type, the policy torch's autocast lists give the PyTorch op it
# replaces (aten/src/ATen/autocast_mode.{h,cpp}); a device type it does not name runs the op in the inputs'
# dtypes, as an op on no list does. The same rule casts the public function's inputs (so its checks and the
# torch reference see what the op sees) and is registered at the custom op's autocast dispatch keys (so a
# direct torch.ops.fastllm.* call, and torch.compile's trace, cast the same way).
# ---------------------------------------------------------------------------------------------------------
LOWER = "lower_precision_fp"  # to the autocast dtype: matmul-like ops (linear, scaled_dot_product_attention)
FP32 = "fp32"  # to float32: norms and softmax on CUDA, losses everywhere
AUTOCAST_DEVICES = ("cpu", "cuda")
_autocast_library = torch.library.Library("fastllm", "FRAGMENT")  # keeps the registrations alive


def autocast_device(t):
    """t's device type if t is a tensor and autocast is enabled for that device type, else None."""
    if not isinstance(t, torch.Tensor) or t.device.type not in AUTOCAST_DEVICES:
        return None
    return t.device.type if torch.is_autocast_enabled(t.device.type) else None


def autocast_dtype(policy, device_type, t):
    """The dtype `policy` gives tensor t inside torch.autocast(device_type): floating tensors on that device other
    than float64 (torch's eligibility rule) go to the autocast dtype (LOWER) or float32 (FP32); the rest, and
    every tensor when policy or device_type is None, keep theirs. None for a non-tensor."""
    if not isinstance(t, torch.Tensor):
        return None
    if (policy is None or device_type is None or not t.is_floating_point() or t.dtype == torch.float64
            or t.device.type != device_type):
        return t.dtype
    return torch.get_autocast_dtype(device_type) if policy == LOWER else torch.float32


def autocast_cast(policy, device_type, *tensors):
    """The tensors as `policy` casts them inside torch.autocast(device_type) (autocast_dtype)."""
    if policy is None or device_type is None:  # outside autocast: no per-tensor checks (decode steps are short)
        return tensors
    return tuple(t if not isinstance(t, torch.Tensor) else t.to(autocast_dtype(policy, device_type, t))
                 for t in tensors)


def register_autocast(name, rule=None):
    """Register rule(device_type, *args) -> outputs as torch.ops.fastllm.<name>'s kernel inside torch.autocast on
    every AUTOCAST_DEVICES type. It runs with autocast off, so the op's own matmuls (the fused linear losses')
    keep the dtypes the rule chose; without a rule the op runs on its arguments unchanged (backward ops)."""
    op = getattr(torch.ops.fastllm, name).default
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        autocast_off = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, autocast_off=autocast_off):
            with torch._C._ExcludeDispatchKeyGuard(autocast_off):
                return op(*args) if rule is None else rule(device_type, op, *args)

        _autocast_library.impl(name, kernel, key, with_keyset=True)
