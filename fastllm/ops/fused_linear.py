"""Fused linear-head losses: log-probs, entropy and cross-entropy straight from hidden states, and the PPO and
DPO losses built on them, without ever holding the (tokens, vocabulary) logits.

Every op runs on one driver, _chunked_head.run_chunks (the logits of a chunk of token rows at a time, their row
statistics, and the gradients summed chunk by chunk; its docstring gives the loop and the precision rules), on
both kernel backends (cpp and triton differ only in which softmax-family kernels they supply).
Each loss says only how its value depends on the row statistics (a "head": its coefficients are the
derivatives of the loss with respect to lse, z[label], sum(z) and entropy, folded into (a, b, c, d) by
softmax.stat_gradient_coefficients).
The formulas themselves are shared with the unfused ops (softmax.py, rl.py).

Two schedules, and why:
  * Scalar losses (linear_cross_entropy with reduction "mean"/"sum", linear_ppo_loss, linear_dpo_loss):
    the loss's gradient is known chunk by chunk, so it is computed during the forward in the same pass:
    3 matmuls of 2 N H V FLOPs each, as many as eager, and the logits are read twice (statistics, gradient).
    The backward only scales the stored grad_hidden / grad_weight / grad_bias by grad_output, in place, and
    hands them over as the .grad (no second copy). The price
    is holding those gradients from forward to backward (hidden- and weight-sized: eager allocates them
    too); a forward under no_grad, or with nothing requiring grad, skips the two gradient matmuls.
  * Per-token outputs (linear_token_logprobs, its entropy, linear_cross_entropy with reduction "none"): the
    upstream gradient is arbitrary and arrives only in backward, so the forward keeps (N,) statistics and
    the backward recomputes each chunk's logits: 4 matmuls instead of 3 (+33% FLOPs) in exchange for never
    storing N x V. When the loss on top is one of the scalar losses, use that op instead.
  DPO's loss needs whole sequences, so its chunks are whole (chosen, rejected) pairs: one pair's logits are
  computed even when they exceed the chunk budget.

Memory beyond inputs and outputs: one C x V chunk (the logits, then their gradient written over them) plus
the gradients, in the inputs' dtypes (a half-precision weight's summed in fp32); under autocast, one copy of
the weight in the autocast dtype during each call. C is chosen so a chunk of logits is at most CHUNK_BYTES
(64 MiB: at 8192 x 768 x 50257 fp32 that is 25 chunks of 327-328 rows, each still a large, efficient matmul),
or is set by `chunk_size` (token rows). At 4096 x 768 x 50257 that is 0.69x the peak of torch's chunked
F.linear_cross_entropy (bench/RESULTS.md).

Autocast: the ops behave as F.linear + the loss do under torch.autocast (matmuls in the autocast dtype,
losses and log-probs fp32, gradients in the inputs' dtypes), but the inputs reach the op uncast and the op
casts inside its chunk loop: the fp32 master weight's gradient is summed in fp32 and never exists in bf16.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import rl
from ._chunked_head import CHUNK_BYTES  # noqa: F401 (re-exported: the documented chunk budget)
from ._chunked_head import Projection, chunk_rows, put_rows, row_chunks, rows_of, run_chunks
from ._loss_heads import CrossEntropyHead, PolicyHead, PreferenceHead, cross_entropy_rows
from ._common import check_label_range, check_positive, check_same_device, check_tensor, resolve
from ._common import LOWER, autocast_device, autocast_dtype, call_op, register_autocast
from .softmax import reference as softmax_reference
from .softmax import stat_gradient_coefficients

_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch with materialised logits. The test oracle (in float64) and the eager baseline.
# ---------------------------------------------------------------------------------------------------------
class reference:
    @staticmethod
    def linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False):
        logits = F.linear(hidden, weight, bias)
        logprobs = softmax_reference.token_logprobs(logits, labels, temperature, ignore_index)
        if not return_entropy:
            return logprobs
        return logprobs, softmax_reference.entropy(logits, temperature)

    @staticmethod
    def linear_cross_entropy(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean",
                             label_smoothing=0.0):
        return softmax_reference.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index, reduction,
                                               label_smoothing)

    @staticmethod
    def linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, bias=None, ref_logprobs=None,
                        kl_coef=0.0, entropy_coef=0.0, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                        temperature=1.0, ignore_index=-100, kl_estimator="k3", kl_clamp=None, loss_agg="token_mean",
                        normalizer=None, ratio_level="token", cu_seqlens=None):
        logprobs, entropy = reference.linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index,
                                                            return_entropy=True)
        mask = torch.where(labels != ignore_index, mask.to(torch.promote_types(mask.dtype, torch.float32)), 0.0)
        return rl.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps,
                                  clip_eps_high=clip_eps_high, dual_clip=dual_clip, entropy=entropy,
                                  entropy_coef=entropy_coef, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                                  kl_estimator=kl_estimator, kl_clamp=kl_clamp, loss_agg=loss_agg,
                                  normalizer=normalizer, ratio_level=ratio_level, cu_seqlens=cu_seqlens)

    @staticmethod
    def linear_dpo_loss(chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels, ref_chosen_logps,
                        ref_rejected_logps, bias=None, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                        ignore_index=-100):
        def sequence_logprobs(hidden, labels):
            return reference.linear_token_logprobs(hidden, weight, labels, bias, ignore_index=ignore_index).sum(-1)

        return rl.dpo_loss(sequence_logprobs(chosen_hidden, chosen_labels),
                           sequence_logprobs(rejected_hidden, rejected_labels), ref_chosen_logps,
                           ref_rejected_logps, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


def _flatten(hidden, labels):
    """(..., H) hidden and (...) labels -> contiguous (N, H) rows and (N,) int64 labels."""
    return hidden.reshape(-1, hidden.shape[-1]).contiguous(), labels.reshape(-1).to(torch.int64).contiguous()


def _projection(hidden, weight, bias, compute_dtype, labels, inv_temperature, ignore_index):
    """The driver's Projection; compute_dtype None: the matmuls run in hidden's dtype."""
    return Projection(hidden, weight, bias, labels, inv_temperature, ignore_index, compute_dtype or hidden.dtype)


def _wanted_grads(hidden, weight, bias):
    grad_on = torch.is_grad_enabled()
    return [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# Per-token statistics: forward keeps (N,) vectors, backward recomputes the chunks' logits
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllm::linear_logit_stats", mutates_args=())
def _linear_logit_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        compute_dtype: Optional[torch.dtype], labels: torch.Tensor, inv_temperature: float,
                        ignore_index: int, want_sum: bool, want_entropy: bool, chunk_size: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_label_range(labels, weight.shape[0], ignore_index)  # inside the op: data-dependent, one graph node
    rows = hidden.shape[0]
    # lse in fp64, as logit_stats_forward returns it (the backward splits it to keep log p accurate)
    outputs = tuple(torch.empty(rows if wanted else 0, dtype=dtype, device=hidden.device)
                    for wanted, dtype in ((True, torch.float64), (True, torch.float32), (want_sum, torch.float32),
                                          (want_entropy, torch.float32)))

    def store(index, ranges, chunk_labels, *stats):
        for out, value in zip(outputs, stats):
            if out.numel():
                put_rows(out, ranges, value)

    projection = _projection(hidden, weight, bias, compute_dtype, labels, inv_temperature, ignore_index)
    run_chunks(backend, projection, row_chunks(rows, chunk_size), store, want_sum=want_sum, want_entropy=want_entropy)
    return outputs


@_linear_logit_stats.register_fake
def _(hidden, weight, bias, compute_dtype, labels, inv_temperature, ignore_index, want_sum, want_entropy, chunk_size,
      backend):
    rows = hidden.shape[0]
    stat = lambda wanted: hidden.new_empty((rows if wanted else 0,), dtype=torch.float32)  # noqa: E731
    return hidden.new_empty((rows,), dtype=torch.float64), stat(True), stat(want_sum), stat(want_entropy)


@torch.library.custom_op("fastllm::linear_logit_stats_backward", mutates_args=())
def _linear_logit_stats_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 compute_dtype: Optional[torch.dtype], labels: torch.Tensor, lse: torch.Tensor,
                                 a: torch.Tensor, b: Optional[torch.Tensor], c: Optional[torch.Tensor],
                                 d: Optional[torch.Tensor], inv_temperature: float,
                                 chunk_size: int, want_grads: list[bool], backend: str
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coefficients = (a, b, c, d)

    def sliced(index, ranges, chunk_labels, *stats):
        return tuple(None if t is None else rows_of(t, ranges) for t in coefficients)

    projection = _projection(hidden, weight, bias, compute_dtype, labels, inv_temperature, -1)  # ignored: c = 0
    return run_chunks(backend, projection, row_chunks(hidden.shape[0], chunk_size), sliced, saved_lse=lse,
                      want_grads=want_grads)


def _gradient_fakes(hidden, weight, bias, want_grads):
    def grad(like, wanted):
        return like.new_empty(like.shape if wanted else (0,))

    return (grad(hidden, want_grads[0]), grad(weight, want_grads[1]),
            grad(bias if bias is not None else weight, want_grads[2] and bias is not None))


@_linear_logit_stats_backward.register_fake
def _(hidden, weight, bias, compute_dtype, labels, lse, a, b, c, d, inv_temperature, chunk_size, want_grads,
      backend):
    return _gradient_fakes(hidden, weight, bias, want_grads)


def _linear_logit_stats_setup(ctx, inputs, output):
    (hidden, weight, bias, ctx.compute_dtype, labels, ctx.inv_temperature, ctx.ignore_index, ctx.want_sum,
     ctx.want_entropy, ctx.chunk_size, ctx.backend) = inputs
    lse, _, _, entropy = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)


def _linear_logit_stats_grad(ctx, g_lse, g_target, g_sum, g_entropy):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    a, b, c, d = stat_gradient_coefficients(labels, ctx.ignore_index, entropy, g_lse, g_target,
                                            g_sum if ctx.want_sum else None, g_entropy if ctx.want_entropy else None)
    want = [bool(w) for w in ctx.needs_input_grad[:3]]
    grads = call_op(_linear_logit_stats_backward, hidden, weight, bias, ctx.compute_dtype, labels, lse, a, b, c, d,
                    ctx.inv_temperature, ctx.chunk_size, want, ctx.backend)
    return tuple(g if w else None for g, w in zip(grads, want)) + (None,) * 8


_linear_logit_stats.register_autograd(_linear_logit_stats_grad, setup_context=_linear_logit_stats_setup)


# ---------------------------------------------------------------------------------------------------------
# Scalar losses: one pass, the gradient computed in the forward (the heads are in _loss_heads.py).
# ---------------------------------------------------------------------------------------------------------
def _one_pass(backend, projection, head, want_grads):
    """Run a scalar-loss head over its chunks: (loss, stats, grad_hidden, grad_weight, grad_bias)."""
    grads = run_chunks(backend, projection, head.chunks, head, want_sum=head.want_sum,
                        want_entropy=head.want_entropy, want_grads=want_grads)
    return (*head.result(), *grads)


def _one_pass_fake(hidden, weight, bias, want_grads, n_stats):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((n_stats,), dtype=torch.float32),
            *_gradient_fakes(hidden, weight, bias, want_grads))


def _one_pass_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd fills zero "gradients" for the returned grads: V x H zeros
    ctx.save_for_backward(*output[2:])


def _scaled(grad, grad_loss):
    # In place on plain tensors only: a traced backward (torch.compile, AOT autograd) may not mutate what the
    # forward saved, and its compiled graph plans the memory itself.
    if type(grad) is torch.Tensor and type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling():
        return grad.mul_(grad_loss)
    return grad_loss * grad


def _one_pass_grad(ctx, grad_loss, *unused):
    """The gradients were computed in the forward for a loss of 1: scale them by the incoming gradient, in place
    and handed over (a scaled copy of the V x H weight gradient would be the step's largest tensor). A second
    backward through the same graph then fails in autograd (saved tensor modified in place), never scales twice."""
    scaled = tuple(_scaled(grad, grad_loss) if needed else None
                   for grad, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:3]))
    return scaled + (None,) * (len(ctx.needs_input_grad) - 3)


@torch.library.custom_op("fastllm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          compute_dtype: Optional[torch.dtype], labels: torch.Tensor, ignore_index: int,
                          label_smoothing: float, mean: bool, chunk_size: int, want_grads: list[bool], backend: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab = weight.shape[0]
    check_label_range(labels, vocab, ignore_index)
    head = CrossEntropyHead(hidden.shape[0], chunk_size, labels, ignore_index, label_smoothing, vocab, mean)
    projection = _projection(hidden, weight, bias, compute_dtype, labels, 1.0, ignore_index)
    return _one_pass(backend, projection, head, want_grads)


@_linear_cross_entropy.register_fake
def _(hidden, weight, bias, compute_dtype, labels, ignore_index, label_smoothing, mean, chunk_size, want_grads,
      backend):
    return _one_pass_fake(hidden, weight, bias, want_grads, 0)


@torch.library.custom_op("fastllm::linear_ppo_loss", mutates_args=())
def _linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     compute_dtype: Optional[torch.dtype], labels: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor,
                     ref_logprobs: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_temperature: float,
                     ignore_index: int, clip_low: float, clip_high: float, dual_clip: Optional[float], kl_coef: float,
                     kl_estimator: str, kl_clamp: Optional[float], entropy_coef: float, ratio_level: str,
                     chunk_size: int, want_grads: list[bool], backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_label_range(labels, weight.shape[0], ignore_index)
    head = PolicyHead(hidden.shape[0], chunk_size, labels, old_logprobs, advantages, mask, weights, ref_logprobs,
                       cu_seqlens, ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, kl_clamp,
                       entropy_coef, ratio_level)
    projection = _projection(hidden, weight, bias, compute_dtype, labels, inv_temperature, ignore_index)
    return _one_pass(backend, projection, head, want_grads)


@_linear_ppo_loss.register_fake
def _(hidden, weight, bias, compute_dtype, labels, old_logprobs, advantages, mask, weights, ref_logprobs, cu_seqlens,
      inv_temperature, ignore_index, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, kl_clamp, entropy_coef,
      ratio_level, chunk_size, want_grads, backend):
    return _one_pass_fake(hidden, weight, bias, want_grads, PolicyHead.n_sums - 1)


@torch.library.custom_op("fastllm::linear_dpo_loss", mutates_args=())
def _linear_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     compute_dtype: Optional[torch.dtype], labels: torch.Tensor, ref_chosen_logps: torch.Tensor,
                     ref_rejected_logps: torch.Tensor, chosen_length: int, beta: float, loss_type: str,
                     label_smoothing: float, ignore_index: int, chunk_size: int, want_grads: list[bool], backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_label_range(labels, weight.shape[0], ignore_index)
    head = PreferenceHead(chunk_size, labels, ref_chosen_logps, ref_rejected_logps, chosen_length, ignore_index,
                           beta, loss_type, label_smoothing)
    projection = _projection(hidden, weight, bias, compute_dtype, labels, 1.0, ignore_index)
    return _one_pass(backend, projection, head, want_grads)


@_linear_dpo_loss.register_fake
def _(hidden, weight, bias, compute_dtype, labels, ref_chosen_logps, ref_rejected_logps, chosen_length, beta, loss_type,
      label_smoothing, ignore_index, chunk_size, want_grads, backend):
    return _one_pass_fake(hidden, weight, bias, want_grads, 2 * ref_chosen_logps.shape[0])


for _op in (_linear_cross_entropy, _linear_ppo_loss, _linear_dpo_loss):
    _op.register_autograd(_one_pass_grad, setup_context=_one_pass_setup)


# Under torch.autocast the head's matmuls run as F.linear's do, in the autocast dtype (its lower_precision_fp
# policy, on CPU and CUDA), and log-probs and losses stay fp32, as cross_entropy's are. The rule only sets the
# op's compute_dtype: hidden, weight and bias go in uncast, so each gradient comes out in its input's dtype
# (an fp32 master weight's summed in fp32, never held in bf16; see _chunked_head).
def _autocast_projection(device_type, op, hidden, weight, bias, compute_dtype, *rest):
    return op(hidden, weight, bias, autocast_dtype(LOWER, device_type, hidden), *rest)


for _name in ("linear_logit_stats", "linear_cross_entropy", "linear_ppo_loss", "linear_dpo_loss"):
    register_autocast(_name, _autocast_projection)
register_autocast("linear_logit_stats_backward")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _check_labels(name, labels, shape):
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {str(labels.dtype).removeprefix('torch.')}")
    if labels.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (the hidden states' shape without their last "
                         f"dimension), got {tuple(labels.shape)}")


def _check_projection(hidden, weight, bias, chunk_size, hidden_name="hidden"):
    """Check the head's operands; return the dtype its matmuls run in: the inputs' own, or under torch.autocast
    the one F.linear would cast all three to (the tensors themselves go to the op uncast)."""
    check_tensor(hidden_name, hidden, min_dim=1)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (vocab >= 1, {hidden.shape[-1]}) to project {hidden_name} of "
                         f"shape {tuple(hidden.shape)}, got {tuple(weight.shape)}")
    device_type = autocast_device(hidden)
    compute_dtype = autocast_dtype(LOWER, device_type, hidden)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and autocast_dtype(LOWER, device_type, t) != compute_dtype:
            cast = " (as torch.autocast casts them)" if device_type is not None else ""
            raise TypeError(f"{name} must have {hidden_name}'s dtype {str(compute_dtype).removeprefix('torch.')}"
                            f"{cast}, got {str(t.dtype).removeprefix('torch.')}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (weight's vocabulary), got {tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (token rows per chunk) or None, got {chunk_size!r}")
    return compute_dtype


def _check_per_token(labels, **tensors):
    for name, t in tensors.items():
        if t is not None:
            check_tensor(name, t)
            if t.shape != labels.shape:
                raise ValueError(f"{name} must have the labels' shape {tuple(labels.shape)}, got {tuple(t.shape)}")


def _fp32_rows(t):
    return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0, ignore_index: int = -100,
                          return_entropy: bool = False, chunk_size: Optional[int] = None):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token, without the logits.

    hidden: (..., H) float; weight: (V, H) and bias: (V,) in hidden's dtype; labels: (...) integer in [0, V) or
    ignore_index. Returns fp32 (...) log-probs (0 and no gradient where ignored), and with return_entropy also
    the fp32 (...) entropy of each token's distribution. Gradients flow to hidden, weight and bias; the backward
    recomputes each chunk's logits (see the module docstring). chunk_size: token rows per chunk (default: a
    chunk of logits of at most CHUNK_BYTES).
    """
    dtype = _check_projection(hidden, weight, bias, chunk_size)
    _check_labels("labels", labels, hidden.shape[:-1])
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    check_positive("temperature", temperature)
    backend = resolve(hidden, dtype)
    if backend == "torch":
        return reference.linear_token_logprobs(hidden, weight, labels, bias, temperature, ignore_index, return_entropy)
    rows, flat_labels = _flatten(hidden, labels)
    lse, target, _, entropy = call_op(_linear_logit_stats, rows, weight, bias, dtype, flat_labels, 1.0 / temperature,
                                      ignore_index, False, return_entropy,
                                      chunk_rows(weight.shape[0], dtype, chunk_size), backend)
    logprobs = torch.where(flat_labels != ignore_index, (target - lse).float(), 0.0).reshape(labels.shape)
    return (logprobs, entropy.reshape(labels.shape)) if return_entropy else logprobs


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T + bias, labels) without the logits, for SFT and pretraining.

    Shapes as in linear_token_logprobs. The loss is fp32: a scalar for "mean" (over non-ignored tokens; NaN if
    all are ignored, as in PyTorch) and "sum", computed with its gradient in one pass; (...) for "none" (0 at
    ignored tokens), whose backward recomputes the logits. label_smoothing mixes in the uniform distribution.
    """
    dtype = _check_projection(hidden, weight, bias, chunk_size)
    _check_labels("labels", labels, hidden.shape[:-1])
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    backend = resolve(hidden, dtype)
    if backend == "torch":
        return reference.linear_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing)
    rows, flat_labels = _flatten(hidden, labels)
    most = chunk_rows(weight.shape[0], dtype, chunk_size)
    if reduction == "none":
        smoothing = label_smoothing > 0
        lse, target, sum_z, _ = call_op(_linear_logit_stats, rows, weight, bias, dtype, flat_labels, 1.0,
                                        ignore_index, smoothing, False, most, backend)
        loss = cross_entropy_rows(lse, target, sum_z, label_smoothing, weight.shape[0])
        return torch.where(flat_labels != ignore_index, loss, 0.0).reshape(labels.shape)
    loss, *_ = call_op(_linear_cross_entropy, rows, weight, bias, dtype, flat_labels, ignore_index,
                       float(label_smoothing), reduction == "mean", most, _wanted_grads(hidden, weight, bias), backend)
    return loss


def linear_ppo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    ref_logprobs: Optional[torch.Tensor] = None, kl_coef: float = 0.0, entropy_coef: float = 0.0,
                    clip_eps: float = 0.2, clip_eps_high: Optional[float] = None, dual_clip: Optional[float] = None,
                    temperature: float = 1.0, ignore_index: int = -100, kl_estimator: str = "k3",
                    kl_clamp: Optional[float] = None, loss_agg: str = "token_mean", normalizer: Optional[float] = None,
                    ratio_level: str = "token", cu_seqlens: Optional[torch.Tensor] = None,
                    chunk_size: Optional[int] = None) -> rl.PolicyLoss:
    """rl.ppo_policy_loss of the policy's log-probs of `labels`, computed from hidden states in one chunked pass:
    the same values and gradients for every option.

    hidden (..., H), weight (V, H), bias (V,): the policy head; labels (...) the sampled tokens;
    old_logprobs, advantages, ref_logprobs (...) float; mask (...) bool or 0/1 float (tokens whose label is
    ignore_index are masked too). Adds -entropy_coef * entropy and kl_coef * KL (kl_estimator k1 | k2 | k3,
    clamped to +-kl_clamp if given) to ref_logprobs per token; log-probs and entropy are of
    softmax(logits / temperature). loss_agg ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
    "token_sum_norm" with normalizer) and ratio_level ("token", "sequence": GSPO) as in rl.ppo_policy_loss.
    Sequences: the rows of 2-D (batch, T) labels, or cu_seqlens (int, num_sequences + 1 boundaries over the
    token rows of 1-D labels); the per-sequence modes need one of them, and the chunks are then runs of whole
    sequences (one sequence longer than chunk_size is one chunk). Returns rl.PolicyLoss with every statistic
    (entropy always; ref_kl when ref_logprobs is given). Gradients flow to hidden, weight and bias.
    """
    dtype = _check_projection(hidden, weight, bias, chunk_size)
    _check_labels("labels", labels, hidden.shape[:-1])
    _check_per_token(labels, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs)
    rl.check_mask(mask, labels, "labels")
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels, old_logprobs=old_logprobs,
                      advantages=advantages, mask=mask, ref_logprobs=ref_logprobs)
    rl.check_policy_args(clip_eps, clip_eps_high, dual_clip, kl_coef, entropy_coef, ref_logprobs is not None)
    rl.check_loss_args(loss_agg, ratio_level, normalizer, kl_estimator, kl_clamp)
    check_positive("temperature", temperature)
    sequences, normalizer = rl.loss_sequences(labels.shape, cu_seqlens, loss_agg, ratio_level, normalizer,
                                              labels.device, "labels")
    backend = resolve(hidden, dtype)
    if backend == "torch":
        return reference.linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, bias, ref_logprobs,
                                         kl_coef, entropy_coef, clip_eps, clip_eps_high, dual_clip, temperature,
                                         ignore_index, kl_estimator, kl_clamp, loss_agg, normalizer, ratio_level,
                                         cu_seqlens)
    rows, flat_labels = _flatten(hidden, labels)
    flat_mask = torch.where(flat_labels != ignore_index, _fp32_rows(mask), 0.0)
    weights = rl.token_weights(flat_mask, loss_agg, sequences, normalizer)
    if sequences is not None and cu_seqlens is None:  # the rows of 2-D labels
        cu_seqlens = torch.arange(labels.shape[0] + 1, device=labels.device) * labels.shape[1]
    loss, stats, *_ = call_op(
        _linear_ppo_loss,
        rows, weight, bias, dtype, flat_labels, _fp32_rows(old_logprobs), _fp32_rows(advantages), flat_mask, weights,
        _fp32_rows(ref_logprobs), None if sequences is None else cu_seqlens.to(torch.int64), 1.0 / temperature,
        ignore_index, float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_estimator,
        None if kl_clamp is None else float(kl_clamp), float(entropy_coef), ratio_level,
        chunk_rows(weight.shape[0], dtype, chunk_size), _wanted_grads(hidden, weight, bias), backend)
    clip_fraction, approx_kl, ratio_mean, entropy, ref_kl, low, high = stats.unbind(0)
    return rl.PolicyLoss(loss, clip_fraction, approx_kl, ratio_mean, entropy,
                         ref_kl if ref_logprobs is not None else None, low, high)


def linear_dpo_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                    chosen_labels: torch.Tensor, rejected_labels: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, bias: Optional[torch.Tensor] = None, *, beta: float = 0.1,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, ignore_index: int = -100,
                    chunk_size: Optional[int] = None) -> rl.PreferenceLoss:
    """rl.dpo_loss with the policy's sequence log-probs computed from hidden states in one chunked pass.

    chosen_hidden (B, Lc, H) and rejected_hidden (B, Lr, H): the policy's last hidden states of each pair;
    chosen_labels (B, Lc), rejected_labels (B, Lr): next tokens, ignore_index on prompt and padding (a
    sequence's log-prob is the sum over its other tokens); ref_*_logps (B,): the reference model's sequence
    log-probs. A chunk is a run of whole pairs (chunk_size: token rows, rounded down to whole pairs, at least
    one). Returns rl.PreferenceLoss; gradients flow to both hidden tensors, weight and bias.
    """
    dtype = _check_projection(chosen_hidden, weight, bias, chunk_size, "chosen_hidden")
    _check_projection(rejected_hidden, weight, bias, chunk_size, "rejected_hidden")  # the same dtype, as weight's
    for name, hidden in (("chosen_hidden", chosen_hidden), ("rejected_hidden", rejected_hidden)):
        if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[1] == 0:
            raise ValueError(f"{name} must be 3-D (pairs >= 1, tokens >= 1, hidden), got {tuple(hidden.shape)}")
    if rejected_hidden.shape[0] != chosen_hidden.shape[0]:
        raise ValueError(f"rejected_hidden must hold as many pairs as chosen_hidden ({chosen_hidden.shape[0]}), "
                         f"got {rejected_hidden.shape[0]}")
    _check_labels("chosen_labels", chosen_labels, chosen_hidden.shape[:-1])
    _check_labels("rejected_labels", rejected_labels, rejected_hidden.shape[:-1])
    pairs = chosen_hidden.shape[0]
    for name, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_tensor(name, t)
        if t.shape != (pairs,):
            raise ValueError(f"{name} must have shape ({pairs},) (one log-prob per pair), got {tuple(t.shape)}")
    check_same_device(chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden, weight=weight, bias=bias,
                      chosen_labels=chosen_labels, rejected_labels=rejected_labels, ref_chosen_logps=ref_chosen_logps,
                      ref_rejected_logps=ref_rejected_logps)
    rl.check_preference_args(beta, loss_type, label_smoothing)
    backend = resolve(chosen_hidden, dtype)
    if backend == "torch":
        return reference.linear_dpo_loss(chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                                         ref_chosen_logps, ref_rejected_logps, bias, beta, loss_type,
                                         label_smoothing, ignore_index)
    # One (N, H) matrix of both halves: a chunk's rows from each become one matmul. The copy is hidden-sized;
    # autograd's cat backward splits the gradient back.
    chosen_rows, chosen_flat = _flatten(chosen_hidden, chosen_labels)
    rejected_rows, rejected_flat = _flatten(rejected_hidden, rejected_labels)
    hidden, labels = torch.cat([chosen_rows, rejected_rows]), torch.cat([chosen_flat, rejected_flat])
    want_grads = _wanted_grads(chosen_hidden, weight, bias)
    want_grads[0] = want_grads[0] or (torch.is_grad_enabled() and rejected_hidden.requires_grad)
    loss, rewards, *_ = call_op(
        _linear_dpo_loss,
        hidden, weight, bias, dtype, labels, _fp32_rows(ref_chosen_logps), _fp32_rows(ref_rejected_logps),
        chosen_hidden.shape[1], float(beta), loss_type, float(label_smoothing), ignore_index,
        chunk_rows(weight.shape[0], dtype, chunk_size), want_grads, backend)
    return rl.PreferenceLoss(loss, rewards[:pairs], rewards[pairs:])
