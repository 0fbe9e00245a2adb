"""RL losses for LLM post-training (PPO/GRPO/GSPO, DPO) and generalised advantage estimation (GAE).

The losses are a few elementwise lines over per-token or per-pair vectors, so they are plain PyTorch
differentiated by autograd; they need no kernels. Each formula lives here once. The fused linear-head losses
(fused_linear.py) evaluate the same functions chunk by chunk; because their custom ops run below autograd,
the functions can also return the derivative of the loss with respect to the policy log-probs
(`with_derivative=True`), written next to the formula it differentiates. The advantage estimators (GRPO, RLOO,
REINFORCE++, Dr. GRPO), whitening and the rollout-mismatch correction are in rl_estimators.py.

PPO clipped surrogate [Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7], written as a
loss to minimise, per token t with advantage A_t:
    r_t = exp(logp_t - old_t)       (the log-ratio is clamped to +-20 first: exp would overflow, and an
                                     inf ratio times a zero gradient is NaN)
    l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))
  eps_high > eps_low is DAPO's "clip-higher" [Yu et al. 2025]. Dual clip [Ye et al. 2020, "Mastering Complex
  Control in MOBA Games with Deep RL"]: for A_t < 0 the loss is also capped, l_t = min(l_t, -c A_t) with
  c > 1, so one very unlikely sampled token cannot dominate the batch.
  ratio_level "sequence" is GSPO [Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7]: every token
  of sequence i uses the sequence's ratio s_i = exp(sum_t m_t (logp_t - old_t) / sum_t m_t) (the geometric
  mean of its token ratios; gradient through every token's logp), clipped per sequence.
  Optional terms: + kl_coef * KL_t(pi || ref) - entropy_coef * H(pi)_t, KL_t by the k1, k2 or k3 estimator
  (kl_penalty; k3 = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 [Schulman 2020], the GRPO penalty).
  Aggregation over tokens, loss = sum_t w_t m_t l_t with per-token weights w_t (`token_weights`), for mask m,
  sequences i of n_i = sum_{t in i} m_t unmasked tokens, S sequences in the batch:
    token_mean           w_t = 1 / sum_t m_t                  every token counts once (DAPO's token-level loss,
                                                              TRL "bnpo"); the default
    seq_mean_token_mean  w_t = 1 / (S n_i)                    each sequence counts once (GRPO's paper, TRL
                                                              "grpo"): short sequences' tokens weigh more
    seq_mean_token_sum   w_t = 1 / S                          the mean over sequences of their token sums
    token_sum_norm       w_t = 1 / normalizer                 a constant (Dr. GRPO [Liu et al. 2025]: S x the
                                                              longest allowed response; DAPO over processes:
                                                              the global token count), no length bias
  (a masked sum of nothing is 0 with no gradient; a sequence without an unmasked token adds 0 and is still
  one of the S). Sequences are the rows of 2-D (batch, T) inputs, or given by cu_seqlens over flat tokens.
  Stats (no gradient), each a masked token mean: clip fraction (share of tokens where the clipped term is the
  larger), split into low (A < 0, ratio below 1 - eps_low) and high (A > 0, ratio above 1 + eps_high); approx
  KL of old vs new policy by k3, (r - 1) - log r; mean ratio; mean entropy and mean KL to the reference if given.

Clipped value loss [OpenAI baselines ppo2]: 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)) with
  v_clip = old_v + clip(v - old_v, -eps, eps).

DPO [Rafailov et al. 2023], over sequence log-probs, u = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected),
averaged over pairs:
    sigmoid: -(1 - ls) log sigmoid(beta u) - ls log sigmoid(-beta u)   (ls > 0: conservative DPO, labels
                                                                      flipped with probability ls)
    ipo:     (u - 1 / (2 beta))^2                                      [Azar et al. 2023, eq. 17]
    hinge:   max(0, 1 - beta u)                                         [SLiC-HF, Zhao et al. 2023]
  Rewards (no gradient): beta (pi_chosen - ref_chosen) and beta (pi_rejected - ref_rejected).

GAE [Schulman et al. 2016, eq. 16] over (batch, steps) with a mask of valid steps, as a reverse scan that
skips masked steps (so right padding ends each sequence: the value after its last valid step is 0):
    delta_t = r_t + gamma V_next - V_t,   A_t = delta_t + gamma lam A_next,   returns_t = A_t + V_t
  where V_next, A_next are those of the next valid step (0 past the end); masked steps give 0.
  Kernels: csrc/cpu/gae.cpp (threads over sequences) and kernels/gae.py (one Triton program per block of
  sequences), both a loop backwards over time; the reference is the same loop in Python, vectorised over
  the batch. Traffic: read 2 B T values + B T mask bytes, write 2 B T values; T dependent steps.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._common import call_op, check_same_device, check_tensor, kernels, resolve

FAMILY = "gae"
LOG_RATIO_LIMIT = 20.0  # |logp - old| is clamped to this before exp: e^20 ~ 5e8 is far outside any clip range
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
RATIO_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16, torch.float64)
STEP_MASK_DTYPES = MASK_DTYPES + (torch.int64, torch.int32, torch.uint8, torch.int8)  # gae's, whiten's


class PolicyLoss(NamedTuple):
    """The PPO loss and its statistics (fp32 scalars; only `loss` carries a gradient)."""
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor  # KL(old || new) by k3, over the masked tokens
    ratio_mean: torch.Tensor
    entropy: Optional[torch.Tensor] = None  # mean entropy, where the entropy was given (or computed)
    ref_kl: Optional[torch.Tensor] = None  # mean KL to the reference policy (kl_estimator), where ref_logprobs was given
    clip_low_fraction: Optional[torch.Tensor] = None  # share of tokens clipped below (A < 0, r < 1 - eps_low)
    clip_high_fraction: Optional[torch.Tensor] = None  # share of tokens clipped above (A > 0, r > 1 + eps_high)


class ValueLoss(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor  # share of masked tokens where the clipped error is the larger


class PreferenceLoss(NamedTuple):
    """The DPO loss (fp32 scalar) and the implicit rewards per pair (no gradient)."""
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# The formulas, once. Inputs are at least fp32; `with_derivative` adds d loss / d policy log-prob.
# ---------------------------------------------------------------------------------------------------------
def _at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def masked_sum(values, mask):
    """sum of mask * values, with values at unset positions dropped (they may be inf or NaN padding)."""
    return torch.where(mask != 0, values * mask, 0.0).sum()


def mask_denominator(mask):
    """sum(mask), or 1 when it is 0: the masked mean of nothing is then 0 with a zero gradient, not 0/0."""
    total = mask.sum(dtype=torch.float32)
    return torch.where(total == 0, 1.0, total)


class Sequences(NamedTuple):
    """Which sequence each token belongs to: ids (N,) int64 in [0, count), non-decreasing."""
    ids: torch.Tensor
    count: int

    @staticmethod
    def rows(batch, length, device):
        """The rows of a (batch, length) tensor, flattened."""
        return Sequences(torch.arange(batch, device=device).repeat_interleave(length), batch)

    @staticmethod
    def from_cu_seqlens(cu_seqlens, tokens):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
        ids = torch.arange(len(lengths), device=cu_seqlens.device).repeat_interleave(lengths, output_size=tokens)
        return Sequences(ids, len(lengths))

    def sum(self, values):
        """Per-sequence sums (count,) of per-token values (N,)."""
        return values.new_zeros(self.count).index_add(0, self.ids, values)


def sequence_means(values, mask, sequences):
    """Per-sequence masked means (count,): sum_t m_t v_t / sum_t m_t (0 for a sequence with no unmasked token)."""
    sums = sequences.sum(torch.where(mask != 0, values * mask, 0.0))
    counts = sequences.sum(mask.to(sums.dtype))
    return sums / torch.where(counts == 0, 1.0, counts)


def token_weights(mask, loss_agg="token_mean", sequences=None, normalizer=None):
    """Per-token weights w (N,) of the aggregated loss sum_t w_t l_t (formulas in the module docstring); 0 where
    the mask is 0. mask: (N,) float; sequences: Sequences, for the per-sequence modes; normalizer: a number,
    for token_sum_norm."""
    if loss_agg == "token_mean":
        return torch.where(mask != 0, mask / mask_denominator(mask), 0.0)
    if loss_agg == "token_sum_norm":
        return torch.where(mask != 0, mask / normalizer, 0.0)
    per_sequence = torch.full((sequences.count,), 1.0 / max(sequences.count, 1), dtype=mask.dtype,
                              device=mask.device)
    if loss_agg == "seq_mean_token_mean":
        counts = sequences.sum(mask)
        per_sequence = per_sequence / torch.where(counts == 0, 1.0, counts)
    return torch.where(mask != 0, mask * per_sequence[sequences.ids], 0.0)


def kl_penalty(logprobs, ref_logprobs, estimator="k3", clamp=None, with_derivative=False):
    """Per-token estimates of KL(pi || ref) for tokens sampled from pi [Schulman 2020], with d = logp - ref:
        k1 = d                                 unbiased, any sign;           d k1/d logp = 1
        k2 = d^2 / 2                           biased, low variance, >= 0;   d k2/d logp = d
        k3 = exp(-d) + d - 1                   unbiased, >= 0 (GRPO's);      d k3/d logp = 1 - exp(-d)
    (k3's -d is clamped to +-20 before exp.) clamp = c: the estimate is clamped to [-c, c] (verl's
    "low_var_kl" is k3 with c = 10), with no gradient where clamped. Returns (kl, derivative or None)."""
    d = logprobs - ref_logprobs
    if estimator == "k1":
        kl, derivative = d, torch.ones_like(d)
    elif estimator == "k2":
        kl, derivative = 0.5 * d * d, d
    else:
        log_ratio = (-d).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        kl = log_ratio.exp() - log_ratio - 1.0
        inside = (d >= -LOG_RATIO_LIMIT) & (d <= LOG_RATIO_LIMIT)
        derivative = torch.where(inside, 1.0 - log_ratio.exp(), 0.0)
    if clamp is not None:
        derivative = torch.where((kl >= -clamp) & (kl <= clamp), derivative, 0.0)
        kl = kl.clamp(-clamp, clamp)
    return kl, (derivative if with_derivative else None)


class PolicyTerms(NamedTuple):
    """Per-token PPO terms; `loss` includes the KL and entropy terms that were asked for."""
    loss: torch.Tensor
    ratio: torch.Tensor  # the token's ratio, or its sequence's (ratio_level "sequence")
    clipped: torch.Tensor  # bool: the clipped surrogate was the larger
    clipped_low: torch.Tensor  # bool: clipped with A < 0 (ratio below the range)
    approx_kl: torch.Tensor
    ref_kl: Optional[torch.Tensor]
    # d (sum_t w_t loss_t) / d logp_t for the weights given (if none: 1, and at ratio_level "sequence" 1 at
    # unmasked tokens only); excludes the entropy term, whose gradient is not through logp
    dloss_dlogprobs: Optional[torch.Tensor]


def policy_terms(logprobs, old_logprobs, advantages, *, clip_low, clip_high, dual_clip=None, entropy=None,
                 entropy_coef=0.0, ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", kl_clamp=None,
                 ratio_level="token", mask=None, sequences=None, weights=None, with_derivative=False):
    """Per-token PPO loss terms over flat (N,) tokens (see the module docstring), with the derivative of their
    weighted sum w.r.t. logprobs on demand. ratio_level "sequence" needs mask and sequences."""
    raw_log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        raw_log_ratio = sequence_means(raw_log_ratio, mask, sequences)[sequences.ids]
    log_ratio = raw_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped  # only when the ratio is outside the clip range: there d clipped/dr = 0
    derivative = None
    if with_derivative:
        # d(-A r)/d log r = -A r inside the log-ratio clamp (inclusive, as torch.clamp passes it), else 0.
        inside = (raw_log_ratio >= -LOG_RATIO_LIMIT) & (raw_log_ratio <= LOG_RATIO_LIMIT)
        derivative = torch.where(was_clipped | ~inside, 0.0, unclipped)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        capped = (advantages < 0) & (cap < loss)
        loss = torch.where(capped, cap, loss)
        if with_derivative:
            derivative = torch.where(capped, 0.0, derivative)
    if with_derivative:
        if weights is not None:
            derivative = derivative * weights
        if ratio_level == "sequence":  # d log s_i / d logp_t = m_t / n_i: the sequence's sum, spread back
            per_sequence = sequences.sum(torch.where(mask != 0, derivative, 0.0))
            counts = sequences.sum(mask.to(per_sequence.dtype))
            spread = per_sequence / torch.where(counts == 0, 1.0, counts)
            derivative = torch.where(mask != 0, mask * spread[sequences.ids], 0.0)
    ref_kl = None
    if ref_logprobs is not None:
        ref_kl, kl_derivative = kl_penalty(logprobs, ref_logprobs, kl_estimator, kl_clamp,
                                           with_derivative=with_derivative and bool(kl_coef))
        if kl_coef:
            loss = loss + kl_coef * ref_kl
            if with_derivative:
                derivative = derivative + kl_coef * (kl_derivative if weights is None else kl_derivative * weights)
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy
    approx_kl = ratio - 1.0 - log_ratio
    return PolicyTerms(loss, ratio, was_clipped, was_clipped & (advantages < 0), approx_kl, ref_kl, derivative)


def preference_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type,
                      label_smoothing=0.0, with_derivative=False):
    """Per-pair DPO losses and, on demand, d loss / du with u = (pi_c - ref_c) - (pi_r - ref_r)."""
    u = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * u) - label_smoothing * F.logsigmoid(-beta * u)
        derivative = beta * (label_smoothing * torch.sigmoid(beta * u)
                             - (1.0 - label_smoothing) * torch.sigmoid(-beta * u))
    elif loss_type == "ipo":
        losses = (u - 1.0 / (2.0 * beta)) ** 2
        derivative = 2.0 * (u - 1.0 / (2.0 * beta))
    else:  # hinge
        losses = torch.relu(1.0 - beta * u)
        derivative = -beta * (1.0 - beta * u > 0).to(u.dtype)
    return losses, (derivative if with_derivative else None)


# ---------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch. GAE's Python loop is the test oracle and the benchmark baseline.
# ---------------------------------------------------------------------------------------------------------
class reference:
    @staticmethod
    def gae(rewards, values, mask, gamma=1.0, lam=0.95):
        """The straightforward loop backwards over time (vectorised over the batch)."""
        rewards, values = _at_least_fp32(rewards), _at_least_fp32(values)
        valid = mask != 0
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, 0.0)
            advantages[:, t] = advantage
            next_value = torch.where(valid[:, t], values[:, t], next_value)
            next_advantage = torch.where(valid[:, t], advantage, next_advantage)
        returns = torch.where(valid, advantages + values, 0.0)
        return advantages, returns


# ---------------------------------------------------------------------------------------------------------
# GAE custom op: no autograd (advantages and returns are targets, computed from detached values)
# ---------------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllm::gae", mutates_args=())
def _gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels(backend, FAMILY).gae_forward(rewards, values, mask, gamma, lam)


@_gae.register_fake
def _(rewards, values, mask, gamma, lam, backend):
    return torch.empty_like(values), torch.empty_like(values)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _check_same_shape(reference_name, reference_tensor, **tensors):
    for name, t in tensors.items():
        if t is not None and t.shape != reference_tensor.shape:
            raise ValueError(f"{name} must have the shape of {reference_name} {tuple(reference_tensor.shape)}, "
                             f"got {tuple(t.shape)}")


def check_mask(mask, like, like_name):
    check_tensor("mask", mask, MASK_DTYPES)
    _check_same_shape(like_name, like, mask=mask)


def _is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < float("inf")


def _check_fraction(name, value, low=0.0, high=1.0, allow_high=True):
    inside = _is_finite_number(value) and low <= value and (value <= high if allow_high else value < high)
    if not inside:
        bracket = "]" if allow_high else ")"
        raise ValueError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")


def check_policy_args(clip_eps, clip_eps_high, dual_clip, kl_coef, entropy_coef, has_ref):
    _check_fraction("clip_eps", clip_eps, allow_high=False)
    if clip_eps_high is not None and not (_is_finite_number(clip_eps_high) and clip_eps_high >= 0):
        raise ValueError(f"clip_eps_high must be a finite number >= 0 or None, got {clip_eps_high!r}")
    if dual_clip is not None and not (_is_finite_number(dual_clip) and dual_clip > 1):
        raise ValueError(f"dual_clip must be a finite number > 1 (the cap on -advantage * ratio, as a multiple of "
                         f"-advantage) or None, got {dual_clip!r}")
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if not _is_finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if kl_coef and not has_ref:
        raise ValueError(f"ref_logprobs is required when kl_coef is not 0 (got kl_coef={kl_coef!r})")


def check_preference_args(beta, loss_type, label_smoothing):
    if not (_is_finite_number(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    _check_fraction("label_smoothing", label_smoothing, high=0.5)
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, got loss_type={loss_type!r} "
                         f"with label_smoothing={label_smoothing!r}")


def check_loss_args(loss_agg, ratio_level, normalizer, kl_estimator, kl_clamp):
    for name, value, options in (("loss_agg", loss_agg, LOSS_AGGREGATIONS), ("ratio_level", ratio_level, RATIO_LEVELS),
                                 ("kl_estimator", kl_estimator, KL_ESTIMATORS)):
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")
    if kl_clamp is not None and not (_is_finite_number(kl_clamp) and kl_clamp > 0):
        raise ValueError(f"kl_clamp must be a positive finite number or None, got {kl_clamp!r}")
    if normalizer is not None:
        if loss_agg != "token_sum_norm":
            raise ValueError(f"normalizer applies to loss_agg='token_sum_norm' only, got loss_agg={loss_agg!r} with "
                             f"normalizer={normalizer!r}")
        if not (_is_finite_number(normalizer) and normalizer > 0):
            raise ValueError(f"normalizer must be a positive finite number, got {normalizer!r}")


def check_cu_seqlens(cu_seqlens, tokens):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    bounds = cu_seqlens.tolist() if cu_seqlens.dim() == 1 else None
    if bounds is None or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != tokens or any(
            b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be 1-D non-decreasing sequence boundaries from 0 to the {tokens} tokens "
                         f"(length num_sequences + 1), got {bounds if bounds is not None else tuple(cu_seqlens.shape)}")


def needs_sequences(loss_agg, ratio_level):
    return loss_agg in ("seq_mean_token_mean", "seq_mean_token_sum") or ratio_level == "sequence"


def loss_sequences(shape, cu_seqlens, loss_agg, ratio_level, normalizer, device, name):
    """(Sequences or None when no mode needs them, normalizer): rows of a 2-D `shape`, or cu_seqlens over flat
    tokens; token_sum_norm's normalizer defaults to rows x columns of a 2-D shape."""
    tokens = math.prod(shape)
    sequences = None
    if cu_seqlens is not None:
        if len(shape) != 1:
            raise ValueError(f"cu_seqlens applies to flat (tokens,) inputs, got {name} of shape {tuple(shape)}")
        check_cu_seqlens(cu_seqlens, tokens)
        if needs_sequences(loss_agg, ratio_level):
            sequences = Sequences.from_cu_seqlens(cu_seqlens.to(device), tokens)
    elif needs_sequences(loss_agg, ratio_level):
        if len(shape) != 2:
            raise ValueError(f"loss_agg={loss_agg!r} with ratio_level={ratio_level!r} needs sequences: a 2-D (batch, T) "
                             f"{name} (rows are sequences) or cu_seqlens, got {name} of shape {tuple(shape)}")
        sequences = Sequences.rows(shape[0], shape[1], device)
    if loss_agg == "token_sum_norm" and normalizer is None:
        if len(shape) != 2 or cu_seqlens is not None:
            raise ValueError(f"loss_agg='token_sum_norm' needs normalizer= (e.g. num_sequences * max_length) unless "
                             f"{name} is 2-D (batch, T), got {name} of shape {tuple(shape)}")
        normalizer = float(max(tokens, 1))
    return sequences, normalizer


def policy_stat_pieces(terms, entropy):
    """The per-token values whose masked means are PolicyLoss's statistics, in its field order after `loss`
    (zeros for an entropy or reference KL not given)."""
    zeros = torch.zeros_like(terms.ratio)
    high = terms.clipped & ~terms.clipped_low
    return (terms.clipped.to(zeros.dtype), terms.approx_kl, terms.ratio,
            zeros if entropy is None else entropy.to(zeros.dtype),
            zeros if terms.ref_kl is None else terms.ref_kl, terms.clipped_low.to(zeros.dtype), high.to(zeros.dtype))


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                    dual_clip: Optional[float] = None, entropy: Optional[torch.Tensor] = None,
                    entropy_coef: float = 0.0, ref_logprobs: Optional[torch.Tensor] = None,
                    kl_coef: float = 0.0, kl_estimator: str = "k3", kl_clamp: Optional[float] = None,
                    loss_agg: str = "token_mean", normalizer: Optional[float] = None, ratio_level: str = "token",
                    cu_seqlens: Optional[torch.Tensor] = None) -> PolicyLoss:
    """PPO's clipped surrogate loss (formulas in the module docstring).

    logprobs (policy, with gradient), old_logprobs (the sampling policy's), advantages and mask: one shape;
    mask is bool or 0/1 float. Ratios clip to [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high defaults to
    clip_eps); dual_clip = c > 1 caps the loss of negative-advantage tokens at -c * advantage. Optional entropy
    (per token, with its own gradient) adds -entropy_coef * entropy, and ref_logprobs adds kl_coef * KL to the
    reference by kl_estimator "k1" | "k2" | "k3", clamped to +-kl_clamp if given.
    loss_agg: "token_mean" (sum_t m_t l_t / sum_t m_t over the whole batch), "seq_mean_token_mean" (the mean
    over sequences of each one's masked token mean), "seq_mean_token_sum" (the mean over sequences of each
    one's masked token sum) or "token_sum_norm" (sum_t m_t l_t / normalizer, normalizer given by the caller;
    for 2-D inputs it defaults to rows * columns). ratio_level: "token", or "sequence" (GSPO: each sequence's
    ratio is exp of the masked mean of its token log-ratios, clipped per sequence, used for all its tokens).
    Sequences: the rows of 2-D (batch, T) inputs, or cu_seqlens (int, num_sequences + 1 boundaries) over 1-D
    tokens; the per-sequence modes need one of them. Gradients flow to logprobs (and entropy) only.
    Returns PolicyLoss (its statistics are masked token means whatever loss_agg is).
    """
    check_tensor("logprobs", logprobs)
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("entropy", entropy),
                    ("ref_logprobs", ref_logprobs)):
        if t is not None:
            check_tensor(name, t)
    check_mask(mask, logprobs, "logprobs")
    _check_same_shape("logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, entropy=entropy,
                      ref_logprobs=ref_logprobs)
    check_same_device(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
                      entropy=entropy, ref_logprobs=ref_logprobs)
    check_policy_args(clip_eps, clip_eps_high, dual_clip, kl_coef, entropy_coef, ref_logprobs is not None)
    check_loss_args(loss_agg, ratio_level, normalizer, kl_estimator, kl_clamp)
    sequences, normalizer = loss_sequences(logprobs.shape, cu_seqlens, loss_agg, ratio_level, normalizer,
                                           logprobs.device, "logprobs")
    flat = lambda t, detach=True: None if t is None else _at_least_fp32(  # noqa: E731
        (t.detach() if detach else t).reshape(-1))
    mask = flat(mask).to(torch.promote_types(logprobs.dtype, torch.float32))  # weights as precise as the loss
    entropy = flat(entropy, detach=False)
    terms = policy_terms(flat(logprobs, detach=False), flat(old_logprobs), flat(advantages),
                         clip_low=clip_eps, clip_high=clip_eps if clip_eps_high is None else clip_eps_high,
                         dual_clip=dual_clip, entropy=entropy, entropy_coef=entropy_coef,
                         ref_logprobs=flat(ref_logprobs), kl_coef=kl_coef, kl_estimator=kl_estimator,
                         kl_clamp=kl_clamp, ratio_level=ratio_level, mask=mask, sequences=sequences)
    weights = token_weights(mask, loss_agg, sequences, normalizer)
    denominator = mask_denominator(mask)
    means = [masked_sum(piece.detach(), mask) / denominator for piece in policy_stat_pieces(terms, entropy)]
    clip_fraction, approx_kl, ratio_mean, entropy_mean, ref_kl, low, high = means
    return PolicyLoss(masked_sum(terms.loss, weights), clip_fraction, approx_kl, ratio_mean,
                      None if entropy is None else entropy_mean, None if ref_logprobs is None else ref_kl, low, high)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
               clip_eps: Optional[float] = 0.2) -> ValueLoss:
    """PPO's clipped value loss: 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2)), v_clip = old_v +
    clip(v - old_v, -clip_eps, clip_eps); clip_eps=None gives the plain squared error. Gradient to values only."""
    check_tensor("values", values)
    check_tensor("old_values", old_values)
    check_tensor("returns", returns)
    check_mask(mask, values, "values")
    _check_same_shape("values", values, old_values=old_values, returns=returns)
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_eps is not None and not (_is_finite_number(clip_eps) and clip_eps >= 0):
        raise ValueError(f"clip_eps must be a finite number >= 0 or None, got {clip_eps!r}")
    values, mask = _at_least_fp32(values), _at_least_fp32(mask)
    old_values, returns = _at_least_fp32(old_values.detach()), _at_least_fp32(returns.detach())
    error = (values - returns) ** 2
    if clip_eps is None:
        clipped_error = error
    else:
        clipped_error = (old_values + (values - old_values).clamp(-clip_eps, clip_eps) - returns) ** 2
    denominator = mask_denominator(mask)
    loss = 0.5 * masked_sum(torch.maximum(error, clipped_error), mask) / denominator
    return ValueLoss(loss, masked_sum((clipped_error > error).to(loss.dtype), mask) / denominator)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO loss over sequence log-probs (one value per pair, any shape), averaged over pairs.

    loss_type "sigmoid" (DPO; label_smoothing in [0, 0.5] gives conservative DPO), "ipo" or "hinge" (SLiC);
    formulas in the module docstring. Gradients flow to the policy log-probs only. Returns PreferenceLoss.
    """
    named = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    for name, t in named.items():
        check_tensor(name, t)
    _check_same_shape("policy_chosen_logps", policy_chosen_logps, **named)
    check_same_device(**named)
    check_preference_args(beta, loss_type, label_smoothing)
    chosen, rejected = _at_least_fp32(policy_chosen_logps), _at_least_fp32(policy_rejected_logps)
    ref_chosen, ref_rejected = _at_least_fp32(ref_chosen_logps.detach()), _at_least_fp32(ref_rejected_logps.detach())
    losses, _ = preference_losses(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                  label_smoothing=label_smoothing)
    return PreferenceLoss(losses.mean(), beta * (chosen - ref_chosen).detach(),
                          beta * (rejected - ref_rejected).detach())


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for a batch of right-padded sequences.

    rewards, values: (batch, steps), one float dtype; mask: (batch, steps), nonzero at valid steps (a masked
    step inside a sequence is skipped). Returns (advantages, returns) in values' dtype (fp32 arithmetic),
    0 at masked steps. Not differentiable: the inputs are detached.
    """
    check_tensor("rewards", rewards)
    check_tensor("values", values)
    check_tensor("mask", mask, STEP_MASK_DTYPES)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D (batch, steps), got shape {tuple(values.shape)}")
    _check_same_shape("values", values, rewards=rewards, mask=mask)
    if rewards.dtype != values.dtype:
        raise TypeError(f"rewards and values must have one dtype, got {str(rewards.dtype).removeprefix('torch.')} "
                        f"and {str(values.dtype).removeprefix('torch.')}")
    check_same_device(rewards=rewards, values=values, mask=mask)
    _check_fraction("gamma", gamma)
    _check_fraction("lam", lam)
    rewards, values = rewards.detach(), values.detach()
    backend = resolve(values)
    if backend == "torch":
        advantages, returns = reference.gae(rewards, values, mask, gamma, lam)
        return advantages.to(values.dtype), returns.to(values.dtype)
    valid = mask if mask.dtype == torch.bool else mask != 0
    return call_op(_gae, rewards.contiguous(), values.contiguous(), valid.contiguous(), float(gamma), float(lam),
                   backend)
