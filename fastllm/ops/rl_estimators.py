"""Advantage estimators and the rollout-mismatch correction for LLM RL, usable without any trainer.

Scores are one number per sampled response; a group is `group_size` consecutive responses to one prompt.
`reduce_sum`, where taken, is a function that sums a tensor over the processes in place (e.g.
torch.distributed.all_reduce, or fastllm.train.DistContext.all_reduce_sum): the statistics that say "batch"
then cover every process's batch, not just this one's. All arithmetic is fp32 at least; nothing has a gradient.

    whiten                 (x - mean) / sqrt(var + eps) over the masked entries (population variance)
    group_advantages       GRPO [Shao et al. 2024]: A_i = (r_i - mean_group(r)) / scale, with scale
                             "group": the group's sample std + eps   (the paper)
                             "batch": the whole batch's sample std + eps   (less bias toward easy or hard
                                      prompts, whose groups have a small std [Liu et al. 2025; TRL])
                             "none":  1   (Dr. GRPO [Liu et al. 2025, "Understanding R1-Zero-Like Training"];
                                      pair it with loss_agg="token_sum_norm")
    rloo_advantages        RLOO [Ahmadian et al. 2024]: A_i = r_i - mean_{j != i in the group} r_j
                             = k / (k - 1) (r_i - mean_group(r))
    reinforce_pp_advantages  REINFORCE++ [Hu 2025]: per-token rewards (the KL penalty in them, the score on
                             the last token) -> discounted returns-to-go G_t = sum_{s >= t} gamma^(s-t) r_s
                             (ops.gae with V = 0, lam = 1) -> whitened over all the batch's tokens
    rollout_importance_weights  truncated importance sampling (TIS) for the rollout engine's log-probs
                             differing from the trainer's [Yao et al. 2025, "Your efficient RL framework
                             secretly brings you off-policy RL training"]: rho = exp(old - rollout) per token
                             ("token") or exp(sum over the sequence's tokens) ("sequence"); mode "truncate"
                             uses min(rho, C), "mask" uses 0 where rho > C and 1 elsewhere. The weight multiplies
                             each token's policy loss; because the clipped surrogate is linear in the advantage
                             (for a weight >= 0), multiplying the advantages by it is the same thing.
"""
from typing import Callable, NamedTuple, Optional

import torch

from . import rl
from ._common import check_tensor

SCALES = ("group", "batch", "none")
TIS_LEVELS = ("token", "sequence")
TIS_MODES = ("truncate", "mask")


def _fp32(t):
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _reduced(values, reduce_sum):
    """values (a small 1-D float64 tensor of sums) summed over the processes."""
    if reduce_sum is not None:
        reduce_sum(values)
    return values


def whiten(values: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8,
           reduce_sum: Optional[Callable] = None) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries (of every process with reduce_sum), 0 where mask is
    0. The variance is the population one (divided by the count)."""
    check_tensor("values", values)
    check_tensor("mask", mask, rl.STEP_MASK_DTYPES)
    if mask.shape != values.shape:
        raise ValueError(f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}")
    values = _fp32(values)
    mask = mask.to(values.dtype)
    masked = torch.where(mask != 0, values * mask, 0.0)
    squares = torch.where(mask != 0, values * values * mask, 0.0)  # padding may be NaN: 0 * NaN is NaN
    stats = _reduced(torch.stack([masked.sum(), squares.sum(), mask.sum()]).double(), reduce_sum)
    total, total_sq, count = stats.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return torch.where(mask != 0, (values - mean) / (var + eps) ** 0.5 * mask, 0.0)


def _groups(scores, group_size):
    check_tensor("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per response), got shape {tuple(scores.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or (
            scores.numel() % group_size):
        raise ValueError(f"group_size must be a positive int dividing the {scores.numel()} scores, got {group_size!r}")
    return _fp32(scores).view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6,
                     reduce_sum: Optional[Callable] = None) -> torch.Tensor:
    """GRPO's advantages (n,) of scores (n,) in groups of group_size consecutive responses: the score minus its
    group's mean, divided by the group's sample std + eps ("group"), the whole batch's ("batch", over every
    process with reduce_sum) or 1 ("none", Dr. GRPO). A group whose scores are all equal gets 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
        centred = centred / torch.where(std + eps == 0, 1.0, std + eps)  # equal scores: 0, also with eps = 0
    elif scale == "batch":
        flat = groups.reshape(-1).double()
        total, total_sq, count = _reduced(torch.stack([flat.sum(), (flat * flat).sum(),
                                                       flat.new_tensor(float(flat.numel()))]), reduce_sum).tolist()
        var = max(total_sq - total * total / count, 0.0) / max(count - 1.0, 1.0)  # the sample variance
        centred = centred / ((var ** 0.5 + eps) or 1.0)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages (n,): each score minus the mean of the other scores of its group (group_size >= 2)."""
    groups = _groups(scores, group_size)
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-8,
                            reduce_sum: Optional[Callable] = None) -> torch.Tensor:
    """REINFORCE++'s advantages (batch, T): the discounted returns-to-go of the per-token rewards (batch, T) of
    right-padded sequences, whitened over the masked tokens of the whole batch (every process with reduce_sum)."""
    check_tensor("rewards", rewards)
    rewards = _fp32(rewards)
    returns, _ = rl.gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return whiten(returns, mask, eps=eps, reduce_sum=reduce_sum)


class RolloutCorrection(NamedTuple):
    """Truncated importance sampling for the rollout/trainer mismatch: the weights and what they corrected."""
    weights: torch.Tensor  # like old_logprobs: the multiplier of each token's policy loss (0 at masked tokens)
    logprob_diff_mean: torch.Tensor  # mean |old - rollout| over the masked tokens
    logprob_diff_max: torch.Tensor  # max |old - rollout|
    ratio_mean: torch.Tensor  # mean of rho (token or sequence level, before truncation), over the masked tokens
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    corrected_fraction: torch.Tensor  # share of masked tokens whose rho was above C (truncated, or masked out)


def rollout_importance_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, *,
                               level: str = "token", mode: str = "truncate", threshold: float = 2.0,
                               cu_seqlens: Optional[torch.Tensor] = None) -> RolloutCorrection:
    """TIS weights from the trainer's log-probs of the sampled tokens (old_logprobs: the policy that the update
    starts from) and the rollout engine's own (rollout_logprobs); formulas in the module docstring.

    Shapes as in ops.ppo_policy_loss: level "sequence" needs 2-D (batch, T) inputs (rows are sequences) or 1-D
    tokens with cu_seqlens. threshold: C > 0. Multiply the advantages (or each token's policy loss) by
    `weights`. The log-ratio is clamped to +-20 before exp."""
    check_tensor("old_logprobs", old_logprobs)
    check_tensor("rollout_logprobs", rollout_logprobs)
    rl.check_mask(mask, old_logprobs, "old_logprobs")
    if rollout_logprobs.shape != old_logprobs.shape:
        raise ValueError(f"rollout_logprobs must have the shape of old_logprobs {tuple(old_logprobs.shape)}, "
                         f"got {tuple(rollout_logprobs.shape)}")
    for name, value, options in (("level", level, TIS_LEVELS), ("mode", mode, TIS_MODES)):
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")
    if not (rl._is_finite_number(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive finite number (the cap C on the ratio), got {threshold!r}")
    sequences, _ = rl.loss_sequences(old_logprobs.shape, cu_seqlens, "token_mean",
                                     "sequence" if level == "sequence" else "token", None, old_logprobs.device,
                                     "old_logprobs")
    shape = old_logprobs.shape
    valid = mask.reshape(-1) != 0
    diff = torch.where(valid, _fp32(old_logprobs).reshape(-1) - _fp32(rollout_logprobs).reshape(-1), 0.0)
    log_rho = diff if level == "token" else sequences.sum(diff)[sequences.ids]
    rho = log_rho.clamp(-rl.LOG_RATIO_LIMIT, rl.LOG_RATIO_LIMIT).exp()
    above = rho > threshold
    weights = rho.clamp(max=threshold) if mode == "truncate" else (~above).to(rho.dtype)
    weights = torch.where(valid, weights, 0.0)
    count = valid.sum().clamp(min=1)
    none = valid.sum() == 0

    def mean(x):
        return torch.where(valid, x, 0.0).sum() / count

    def extreme(x, fill, pick):
        return torch.where(none, 0.0, pick(torch.where(valid, x, fill)))

    inf = float("inf")
    return RolloutCorrection(weights.reshape(shape), mean(diff.abs()), extreme(diff.abs(), 0.0, torch.max),
                             mean(rho), extreme(rho, inf, torch.min), extreme(rho, -inf, torch.max),
                             mean(above.to(rho.dtype)))
