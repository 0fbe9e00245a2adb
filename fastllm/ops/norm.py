"""The norm family: layer_norm, rms_norm, and their fused residual-add forms add_layer_norm, add_rms_norm.

All four are one kernel pair, normalizing over the last dimension:

    h = x (+ residual, rounded to x's dtype: the add variants return it as the new residual stream)
    y = (h - mean(h)) * rstd * (offset + weight) + bias,    rstd = 1 / sqrt(var(h) + eps)     [LayerNorm]
    y = h * rstd * (offset + weight),                         rstd = 1 / sqrt(mean(h^2) + eps)  [RMSNorm]

Statistics are fp32 (fp64 for fp64 input); the forward saves mean and rstd per row, and the backward
recomputes xhat from h. Gradients flow to x, residual, weight and bias; for the add variants the gradient of
h is dx = d(norm)/dh + d(residual_out), shared by x and residual. Weight and bias gradients are reduced in a
fixed order: the same bits on every run. Kernels: kernels/norm.py (Triton) and csrc/cpu/norm.cpp (C++).
Under torch.autocast the ops do what F.layer_norm / F.rms_norm do: on CUDA (their fp32 policy) x, residual, weight
and bias are cast to float32 and the norm is float32; on the CPU (on no list) they run in x's dtype. The add
forms' h = x + residual promotes mixed dtypes, as `+` does, and keeps that dtype.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (FP32, as_rows, autocast_cast, autocast_device, call_op, check_same_device, check_tensor,
                      kernels, register_autocast, resolve)

FAMILY = "norm"


# ---------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch. The test oracle (run in float64) and the eager baseline of the benchmarks.
# ---------------------------------------------------------------------------------------------------------
def _at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


class reference:
    @staticmethod
    def layer_norm(x, weight=None, bias=None, eps=1e-5):
        param_dtype = (weight if weight is not None else bias).dtype if (weight, bias) != (None, None) else x.dtype
        if param_dtype != x.dtype:
            # fp32 parameters with half activations: what torch's mixed-dtype kernel does inside (fp32 math,
            # one rounding), spelled out because it lacks some combinations (a lone fp32 bias fails backward).
            return F.layer_norm(x.to(param_dtype), x.shape[-1:], weight, bias, eps).to(x.dtype)
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)

    @staticmethod
    def rms_norm(x, weight=None, eps=1e-6, *, offset=0.0):
        # In fp32 and rounded once, with the scale (offset + weight) formed in fp32 as Gemma does: in bf16,
        # 1 + weight would round away most of the weight.
        h = _at_least_fp32(x)
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if weight is not None:
            y = y * (offset + _at_least_fp32(weight))
        return y.to(x.dtype)

    @staticmethod
    def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5):
        h = x + residual
        return reference.layer_norm(h, weight, bias, eps), h

    @staticmethod
    def add_rms_norm(x, residual, weight=None, eps=1e-6, *, offset=0.0):
        h = x + residual
        return reference.rms_norm(h, weight, eps, offset=offset), h


# ---------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile; `backend` picks the kernel module at run time.
# ---------------------------------------------------------------------------------------------------------
def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastllm::norm", mutates_args=())
def _norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
          bias: Optional[torch.Tensor], eps: float, offset: float, rms: bool, backend: str
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels(backend, FAMILY).norm_forward(x, residual, weight, bias, eps, offset, rms)


@_norm.register_fake
def _(x, residual, weight, bias, eps, offset, rms, backend):
    rows = x.shape[0]
    stat = dict(dtype=_stat_dtype(x))
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), residual_out, x.new_empty((0 if rms else rows,), **stat), x.new_empty((rows,), **stat)


@torch.library.custom_op("fastllm::norm_backward", mutates_args=())
def _norm_backward(dy: torch.Tensor, d_residual_out: Optional[torch.Tensor], h: torch.Tensor,
                   weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, offset: float, rms: bool,
                   want_weight_grad: bool, want_bias_grad: bool, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if d_residual_out is not None:
        d_residual_out = d_residual_out.contiguous()
    return kernels(backend, FAMILY).norm_backward(dy.contiguous(), d_residual_out, h, weight, mean, rstd, offset,
                                                  rms, want_weight_grad, want_bias_grad)


@_norm_backward.register_fake
def _(dy, d_residual_out, h, weight, mean, rstd, offset, rms, want_weight_grad, want_bias_grad, backend):
    cols, stat = h.shape[1], dict(dtype=_stat_dtype(h))
    return (torch.empty_like(h), h.new_empty((cols if want_weight_grad else 0,), **stat),
            h.new_empty((cols if want_bias_grad else 0,), **stat))


def _norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, ctx.offset, ctx.rms, ctx.backend = inputs
    _, residual_out, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.want_weight_grad = weight is not None and ctx.needs_input_grad[2]
    ctx.want_bias_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # Unused outputs (mean, rstd, and residual_out of the plain norms) get None, not a tensor of zeros.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, mean, rstd)


def _norm_grad(ctx, dy, d_residual_out, _d_mean, _d_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    dweight = dbias = None
    if dy is None:  # only residual_out fed the loss: h's gradient is its own
        dx = d_residual_out
    else:
        dx, dweight, dbias = call_op(_norm_backward, dy, d_residual_out if ctx.has_residual else None, h, weight,
                                     mean, rstd, ctx.offset, ctx.rms, ctx.want_weight_grad, ctx.want_bias_grad,
                                     ctx.backend)
        dweight = dweight.to(ctx.weight_dtype) if ctx.want_weight_grad else None
        dbias = dbias.to(ctx.bias_dtype) if ctx.want_bias_grad else None
    # x and residual enter only through their sum h, so both receive h's gradient.
    return dx, (dx if ctx.has_residual else None), dweight, dbias, None, None, None, None


_norm.register_autograd(_norm_grad, setup_context=_norm_setup)


AUTOCAST_POLICY = {"cuda": FP32}  # torch's autocast lists: layer_norm and rms_norm are fp32 on CUDA only


def _autocast_inputs(device_type, x, residual, weight, bias):
    """(x, residual, weight, bias) as the PyTorch ops take them under autocast on device_type, and the dtype of
    h = x + residual (`+` promotes and is on no autocast list)."""
    if isinstance(residual, torch.Tensor) and isinstance(x, torch.Tensor) and residual.dtype != x.dtype:
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    stream_dtype = x.dtype
    return autocast_cast(AUTOCAST_POLICY.get(device_type), device_type, x, residual, weight, bias), stream_dtype


def _autocast_norm(device_type, op, x, residual, weight, bias, *rest):
    (x, residual, weight, bias), stream_dtype = _autocast_inputs(device_type, x, residual, weight, bias)
    y, residual_out, mean, rstd = op(x, residual, weight, bias, *rest)
    return y, residual_out.to(stream_dtype) if residual is not None else residual_out, mean, rstd


register_autocast("norm", _autocast_norm)
register_autocast("norm_backward")  # runs on what the forward saved


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _check_number(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def _check_inputs(x, residual, weight, bias, eps, offset):
    check_tensor("x", x, min_dim=1)
    cols = x.shape[-1]
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {str(x.dtype).removeprefix('torch.')}, got "
                            f"{str(residual.dtype).removeprefix('torch.')}")
    allowed = (x.dtype, torch.float32)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_tensor(name, p)
        if p.shape != (cols,):
            raise ValueError(f"{name} must have shape ({cols},) (the last dimension of x, shape "
                             f"{tuple(x.shape)}), got {tuple(p.shape)}")
        if p.dtype not in allowed:
            raise TypeError(f"{name} must have x's dtype ({str(x.dtype).removeprefix('torch.')}) or float32, got "
                            f"{str(p.dtype).removeprefix('torch.')}")
    if weight is not None and bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype ({str(weight.dtype).removeprefix('torch.')}), got "
                        f"{str(bias.dtype).removeprefix('torch.')}")
    check_same_device(x=x, residual=residual, weight=weight, bias=bias)
    _check_number("eps", eps, minimum=0)
    _check_number("offset", offset)


def _reference(x, residual, weight, bias, eps, offset, rms):
    if residual is None:
        if rms:
            return reference.rms_norm(x, weight, eps, offset=offset), None
        return reference.layer_norm(x, weight, bias, eps), None
    if rms:
        return reference.add_rms_norm(x, residual, weight, eps, offset=offset)
    return reference.add_layer_norm(x, residual, weight, bias, eps)


def _normalize(x, residual, weight, bias, eps, offset, rms):
    """(normed, residual_out or None) on the backend that runs x (the torch reference included)."""
    device_type = autocast_device(x)
    if device_type is not None:
        (x, residual, weight, bias), stream_dtype = _autocast_inputs(device_type, x, residual, weight, bias)
    _check_inputs(x, residual, weight, bias, eps, offset)
    backend = resolve(x)
    if backend == "torch":
        y, residual_out = _reference(x, residual, weight, bias, eps, offset, rms)
    else:
        rows, _ = as_rows(x)
        residual_rows = as_rows(residual)[0] if residual is not None else None
        y, residual_out, _, _ = call_op(_norm, rows, residual_rows, weight, bias, float(eps), float(offset), rms,
                                        backend)
        y, residual_out = y.reshape(x.shape), (residual_out.reshape(x.shape) if residual is not None else None)
    if device_type is not None and residual_out is not None:
        residual_out = residual_out.to(stream_dtype)
    return y, residual_out


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension: F.layer_norm(x, x.shape[-1:], weight, bias, eps).

    x: (..., n) float; weight, bias: (n,) of x's dtype or float32 (statistics in fp32 either way).
    Returns x's shape and dtype.
    """
    return _normalize(x, None, weight, bias, eps, 0.0, rms=False)[0]


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
             offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension: x * rsqrt(mean(x^2) + eps) * (offset + weight).

    offset=1.0 is the Gemma convention (weights stored as scale - 1). Without a weight the scale is 1.
    x: (..., n) float; weight: (n,) of x's dtype or float32. Returns x's shape and dtype.
    """
    return _normalize(x, None, weight, None, eps, offset, rms=True)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(h, weight, bias, eps), h) with h = x + residual, in one pass over the rows.

    The pre-norm transformer step: h is the updated residual stream, rounded to x's dtype, and it is this
    rounded h that is normalized. residual: x's shape and dtype. Both outputs take gradients.
    """
    return _normalize(x, residual, weight, bias, eps, 0.0, rms=False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, *, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(h, weight, eps, offset=offset), h) with h = x + residual, in one pass over the rows.

    As add_layer_norm, for RMSNorm. residual: x's shape and dtype. Both outputs take gradients.
    """
    return _normalize(x, residual, weight, None, eps, offset, rms=True)
