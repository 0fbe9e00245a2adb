"""Advantages of a rollout for each estimator, on fastllm.ops' estimators (the formulas live there).

    gae           PPO: per-token reward -kl_coef * KL_t plus the score on the last token; GAE with the critic's
                  values; advantages whitened over the batch's tokens (all processes)
    reinforce_pp  the same per-token rewards; discounted returns whitened over the batch's tokens (no critic)
    grpo          the score normalised within each prompt's group (scale_rewards: group | batch | none), the same
                  for every token of a response
    dr_grpo       grpo without the std division (pair with loss_agg token_sum_norm)
    rloo          the score minus the mean of the other responses of its group
With TIS the advantages are multiplied by the rollout-mismatch weights (exactly the per-token loss weighting,
the surrogate being linear in the advantage).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastllm import ops

from ..distributed import DistContext
from .config import PPOConfig
from .rollout import Rollout


def token_rewards(scores: torch.Tensor, kl: Sequence[torch.Tensor], kl_coef: float) -> list[torch.Tensor]:
    """Per-token rewards: -kl_coef * KL_t at every response token, plus the sequence's score on its last real
    token (the <|end|>, or the last token of a truncated response; there is no padding in these lists)."""
    rewards = [-kl_coef * k for k in kl]
    for reward, score in zip(rewards, scores.tolist()):
        reward[-1] += score
    return rewards


def pad_right(rows: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, max_len) right-padded stack of 1-D tensors and its bool mask."""
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = True
    return out, mask


def _rows(padded, lengths):
    return [padded[i, :n] for i, n in enumerate(lengths)]


def compute_advantages(r: Rollout, cfg: PPOConfig, kl_coef: float, dist: Optional[DistContext] = None) -> None:
    """Fill r.advantages (and r.returns for gae) from r.scores, r.old_logprobs, r.ref_logprobs (and r.values)."""
    reduce_sum = dist.all_reduce_sum if dist is not None and dist.enabled else None
    lengths = [len(x) for x in r.old_logprobs]
    r.returns = None
    if cfg.advantage in ("gae", "reinforce_pp"):
        penalty = 0.0 if cfg.kl_in_loss else kl_coef
        kl = [ops.kl_penalty(o, f, cfg.reward_kl_estimator, cfg.kl_clamp or None)[0]
              for o, f in zip(r.old_logprobs, r.ref_logprobs)]
        rewards, mask = pad_right(token_rewards(r.scores, kl, penalty))
        if cfg.advantage == "gae":
            values, _ = pad_right(r.values)
            advantages, returns = ops.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = ops.whiten(advantages, mask, reduce_sum=reduce_sum)
            r.returns = _rows(returns, lengths)
        else:
            advantages = ops.reinforce_pp_advantages(rewards, mask, gamma=cfg.gamma, reduce_sum=reduce_sum)
        r.advantages = _rows(advantages, lengths)
        return
    if cfg.advantage == "rloo":
        per_sequence = ops.rloo_advantages(r.scores, cfg.group_size)
    else:
        scale = "none" if cfg.advantage == "dr_grpo" else cfg.scale_rewards
        per_sequence = ops.group_advantages(r.scores, cfg.group_size, scale=scale, reduce_sum=reduce_sum)
    r.advantages = [torch.full_like(o, float(a)) for o, a in zip(r.old_logprobs, per_sequence)]


def apply_rollout_correction(r: Rollout, cfg: PPOConfig) -> dict:
    """The rollout-mismatch metrics (TRL's names) of r.sample_logprobs vs r.old_logprobs, every step; with
    cfg.tis on, r.advantages multiplied by the TIS weights."""
    old = torch.cat(r.old_logprobs)
    sampled = torch.cat(r.sample_logprobs).to(old.dtype)
    level, mode = ("token", "truncate") if cfg.tis == "off" else cfg.tis.split("_")
    cu = torch.tensor([0] + [len(x) for x in r.old_logprobs]).cumsum(0)
    out = ops.rollout_importance_weights(old, sampled, torch.ones_like(old, dtype=torch.bool), level=level, mode=mode,
                                         threshold=cfg.tis_threshold, cu_seqlens=cu)
    if cfg.tis != "off":
        weights = out.weights.split([len(x) for x in r.old_logprobs])
        r.advantages = [a * w for a, w in zip(r.advantages, weights)]
    return {"sampling/sampling_logp_difference/mean": out.logprob_diff_mean.item(),
            "sampling/sampling_logp_difference/max": out.logprob_diff_max.item(),
            "sampling/importance_sampling_ratio/min": out.ratio_min.item(),
            "sampling/importance_sampling_ratio/mean": out.ratio_mean.item(),
            "sampling/importance_sampling_ratio/max": out.ratio_max.item(),
            "sampling/corrected_fraction": out.corrected_fraction.item()}
