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


def resolve(t):
    """The backend for tensor `t`: the requested one if it runs on t's device and dtype, else torch."""
    if t.numel() == 0:  # nothing to launch; the reference returns the right empty shapes
        return "torch"
    return _backend.resolve(t.device, t.dtype)


def kernels(backend, family):
    """The module holding `family`'s launchers for a kernel backend: the same function names in each."""
    if backend == "triton":
        return importlib.import_module(f"fastllm.kernels.{family}")
    if backend == "cpp":
        from .. import _cpp

        return _cpp.load()
    raise ValueError(f"backend {backend!r} has no kernels")
