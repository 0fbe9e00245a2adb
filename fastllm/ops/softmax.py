"""The softmax family: softmax, log_softmax, token_logprobs, entropy and cross_entropy.

The three label/probability ops are built on one kernel pair. The forward reads each logit once and returns
per-row statistics of z = logits / temperature (online over vocabulary chunks):

    lse = logsumexp(z),  target = z[label],  sum_z = sum(z),  entropy = lse - sum(p * z)

Each op is a few elementwise lines over those (rows,) vectors, so autograd hands the kernel backward one
gradient per statistic, which it folds into four per-row coefficients:

    dx = (p * (a + b * log p) + c * onehot(label) + d) / temperature,   log p = z - lse

The backward recomputes p from the logits and the saved lse, so it allocates exactly one logits-sized tensor:
the gradient. Kernels: kernels/softmax.py (Triton) and csrc/cpu/softmax.cpp (C++), with identical launchers.
Under torch.autocast softmax and log_softmax do what torch's do: float32 on CUDA (its fp32_set_opt_dtype policy),
x's dtype on the CPU (on no list). token_logprobs, entropy and cross_entropy are float32 everywhere, computed
from the logits as they are, which is what cross_entropy's fp32 policy computes (the kernels accumulate in fp32).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (FP32, as_rows, autocast_cast, autocast_device, check_label_range, check_labels_shape,
                      call_op, check_positive, check_tensor, kernels, register_autocast, resolve)

FAMILY = "softmax"


# ---------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch. The test oracle (run in float64) and the eager baseline of the benchmarks.
# ---------------------------------------------------------------------------------------------------------
def _at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


class reference:
    @staticmethod
    def softmax(x, dim=-1):
        return torch.softmax(x, dim)

    @staticmethod
    def log_softmax(x, dim=-1):
        return torch.log_softmax(x, dim)

    @staticmethod
    def token_logprobs(logits, labels, temperature=1.0, ignore_index=-100):
        logprobs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
        valid = labels != ignore_index
        picked = logprobs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, picked, 0.0)

    @staticmethod
    def entropy(logits, temperature=1.0):
        logprobs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
        probs = logprobs.exp()
        # p log p is 0 where p is 0 (a -inf logit); mask before multiplying so no 0 * -inf appears.
        return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1)

    @staticmethod
    def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        loss = F.cross_entropy(_at_least_fp32(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        return loss.reshape(labels.shape) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile; `backend` picks the kernel module at run time.
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllm::softmax", mutates_args=())
def _softmax(x: torch.Tensor, log: bool, backend: str) -> torch.Tensor:
    return kernels(backend, FAMILY).softmax_forward(x, log)


@_softmax.register_fake
def _(x, log, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastllm::softmax_backward", mutates_args=())
def _softmax_backward(dy: torch.Tensor, y: torch.Tensor, log: bool, backend: str) -> torch.Tensor:
    return kernels(backend, FAMILY).softmax_backward(dy.contiguous(), y, log)


@_softmax_backward.register_fake
def _(dy, y, log, backend):
    return torch.empty_like(y)


def _softmax_setup(ctx, inputs, output):
    _, ctx.log, ctx.backend = inputs
    ctx.save_for_backward(output)


def _softmax_grad(ctx, dy):
    (y,) = ctx.saved_tensors
    return call_op(_softmax_backward, dy, y, ctx.log, ctx.backend), None, None


_softmax.register_autograd(_softmax_grad, setup_context=_softmax_setup)

SOFTMAX_AUTOCAST_POLICY = {"cuda": FP32}  # torch's autocast lists: softmax and log_softmax are fp32 on CUDA only


def _autocast_softmax(device_type, op, x, *rest):
    return op(*autocast_cast(SOFTMAX_AUTOCAST_POLICY.get(device_type), device_type, x), *rest)


register_autocast("softmax", _autocast_softmax)
register_autocast("softmax_backward")


@torch.library.custom_op("fastllm::logit_stats", mutates_args=())
def _logit_stats(x: torch.Tensor, labels: Optional[torch.Tensor], inv_temperature: float, ignore_index: int,
                 want_sum: bool, want_entropy: bool, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if labels is not None:  # inside the op, so torch.compile keeps one node and still checks the data
        check_label_range(labels, x.shape[-1], ignore_index)
    return kernels(backend, FAMILY).logit_stats_forward(x, labels, inv_temperature, ignore_index, want_sum,
                                                        want_entropy)


@_logit_stats.register_fake
def _(x, labels, inv_temperature, ignore_index, want_sum, want_entropy, backend):
    rows = x.shape[0]
    stat = lambda wanted: x.new_empty((rows if wanted else 0,), dtype=torch.float32)  # noqa: E731
    return x.new_empty((rows,), dtype=torch.float64), stat(True), stat(want_sum), stat(want_entropy)


@torch.library.custom_op("fastllm::logit_stats_backward", mutates_args=())
def _logit_stats_backward(x: torch.Tensor, labels: Optional[torch.Tensor], lse: torch.Tensor, a: torch.Tensor,
                          b: Optional[torch.Tensor], c: Optional[torch.Tensor], d: Optional[torch.Tensor],
                          inv_temperature: float, backend: str) -> torch.Tensor:
    return kernels(backend, FAMILY).logit_stats_backward(x, labels, lse, a, b, c, d, inv_temperature)


@_logit_stats_backward.register_fake
def _(x, labels, lse, a, b, c, d, inv_temperature, backend):
    return torch.empty_like(x)


def _logit_stats_setup(ctx, inputs, output):
    x, labels, ctx.inv_temperature, ctx.ignore_index, ctx.want_sum, ctx.want_entropy, ctx.backend = inputs
    lse, _, _, entropy = output
    ctx.save_for_backward(x, labels, lse, entropy)


def stat_gradient_coefficients(labels, ignore_index, entropy, g_lse, g_target=None, g_sum=None, g_entropy=None):
    """Fold a loss's gradients with respect to each row's (lse, target, sum_z, entropy) into the per-row
    coefficients (a, b, c, d) of logit_stats_backward; a gradient given as None is 0. Shared with the fused
    linear-head losses (fused_linear.py), whose heads supply these gradients chunk by chunk.

    d lse/dz = p;  d target/dz = onehot;  d sum_z/dz = 1;  d entropy/dz = -p * (log p + entropy).
    The kernel multiplies b by log p = z - lse, not by z: with logits of 1e4, z - E[z] in fp32 would cancel.
    lse is fp64 (see logit_stats_forward), so g_lse arrives in fp64; the kernels take fp32 coefficients.
    """
    g_lse = g_lse.float()
    a, b = g_lse, None
    if g_entropy is not None:
        a = a - g_entropy * entropy
        b = -g_entropy
    c = None
    if labels is not None and g_target is not None:  # an ignored row's target is the constant 0: no gradient
        c = torch.where(labels != ignore_index, g_target, 0.0)
    return a.contiguous(), b, c, g_sum


def _logit_stats_grad(ctx, g_lse, g_target, g_sum, g_entropy):
    x, labels, lse, entropy = ctx.saved_tensors
    a, b, c, d = stat_gradient_coefficients(labels, ctx.ignore_index, entropy, g_lse, g_target,
                                            g_sum if ctx.want_sum else None, g_entropy if ctx.want_entropy else None)
    dx = call_op(_logit_stats_backward, x, labels, lse, a, b, c, d, ctx.inv_temperature, ctx.backend)
    return dx, None, None, None, None, None, None


_logit_stats.register_autograd(_logit_stats_grad, setup_context=_logit_stats_setup)
# fp32 statistics of the logits as given: the same numbers as casting them to fp32 first (cross_entropy's policy)
register_autocast("logit_stats")
register_autocast("logit_stats_backward")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _check_logits(logits, temperature=1.0):
    check_tensor("logits", logits, min_dim=1)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one class in its last dimension, got shape {tuple(logits.shape)}")
    check_positive("temperature", temperature)


def _labels_as_rows(labels):
    return labels.reshape(-1).to(torch.int64).contiguous()


def _check_dim(x, dim):
    if not isinstance(dim, int) or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError(f"dim must be an int in [{-max(x.dim(), 1)}, {max(x.dim(), 1) - 1}] for an input of "
                         f"shape {tuple(x.shape)}, got {dim!r}")


def _softmax_along(x, dim, log):
    device_type = autocast_device(x)
    (x,) = autocast_cast(SOFTMAX_AUTOCAST_POLICY.get(device_type), device_type, x)
    check_tensor("x", x)
    _check_dim(x, dim)
    backend = resolve(x)
    if backend == "torch":
        return reference.log_softmax(x, dim) if log else reference.softmax(x, dim)
    moved = x.unsqueeze(0) if x.dim() == 0 else x.movedim(dim, -1)
    rows, lead = as_rows(moved)
    out = call_op(_softmax, rows, log, backend).reshape(*lead, moved.shape[-1])
    return out.reshape(x.shape) if x.dim() == 0 else out.movedim(-1, dim)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x) along `dim`, in x's dtype (fp32 accumulation). Same as torch.softmax."""
    return _softmax_along(x, dim, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log_softmax(x) along `dim`, in x's dtype (fp32 accumulation). Same as torch.log_softmax."""
    return _softmax_along(x, dim, log=True)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits / temperature)[label] for every position, without materialising the log-probs.

    logits: (..., V) float; labels: (...) integer in [0, V) or ignore_index. Returns fp32 of shape (...);
    ignored positions give 0 and pass no gradient.
    """
    _check_logits(logits, temperature)
    check_labels_shape(labels, logits)
    backend = resolve(logits)
    if backend == "torch":
        return reference.token_logprobs(logits, labels, temperature, ignore_index)
    rows, lead = as_rows(logits)
    flat_labels = _labels_as_rows(labels)
    lse, target, _, _ = call_op(_logit_stats, rows, flat_labels, 1.0 / temperature, ignore_index, False, False, backend)
    # target - lse in fp64 (lse is fp64), rounded once: fp32 log-probs accurate even where |lse| is large
    return torch.where(flat_labels != ignore_index, (target - lse).float(), 0.0).reshape(lead)


def entropy(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at every position: logits (..., V) -> fp32 (...)."""
    _check_logits(logits, temperature)
    backend = resolve(logits)
    if backend == "torch":
        return reference.entropy(logits, temperature)
    rows, lead = as_rows(logits)
    _, _, _, ent = call_op(_logit_stats, rows, None, 1.0 / temperature, -100, False, True, backend)
    return ent.reshape(lead)


_REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with the semantics of torch.nn.functional.cross_entropy, classes on the LAST dimension.

    logits: (..., V) float; labels: (...) integer in [0, V) or ignore_index. The loss is fp32: a scalar for
    reduction "mean" (over non-ignored positions; NaN if all are ignored, as in PyTorch) or "sum", shape (...)
    for "none" (0 at ignored positions). label_smoothing mixes in the uniform distribution over V classes.
    """
    _check_logits(logits)
    check_labels_shape(labels, logits)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    backend = resolve(logits)
    if backend == "torch":
        return reference.cross_entropy(logits, labels, ignore_index, reduction, label_smoothing)
    rows, lead = as_rows(logits)
    flat_labels = _labels_as_rows(labels)
    smoothing = label_smoothing > 0
    lse, target, sum_z, _ = call_op(_logit_stats, rows, flat_labels, 1.0, ignore_index, smoothing, False, backend)
    loss = lse - target  # fp64, as lse is; rounded to fp32 once below
    if smoothing:  # uniform part: -mean_j log p_j = lse - mean_j z_j
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / rows.shape[-1])
    loss = loss.float()
    valid = flat_labels != ignore_index
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss.reshape(lead)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum()
