"""The update: ppo_epochs passes over a rollout in minibatches, the policy loss on the fused linear-head op (the
(tokens, vocab) logits are never materialised), the clipped value loss, gradient all-reduce, clipping, AdamW.

All models stay in eval mode (dropout off: with dropout the ratio of identical weights would not be 1). Old
log-probs, reference log-probs and values are recomputed by the update's own forward, grouped exactly as the
first epoch's minibatches, so on the first minibatch of the first epoch the ratio is exactly 1 and nothing is
clipped (generation's decode path can differ from a full forward in the last bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from fastllm import ops

from ..distributed import DistContext
from ..parallel import head_weight
from .config import PPOConfig
from .rollout import Rollout, pack_responses, response_cu_seqlens, response_logprobs_from_hidden


class ValueHead(nn.Module):
    """A linear value head on the policy's final hidden states (critic='head')."""

    def __init__(self, n_embd):
        super().__init__()
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden):
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


@dataclass
class Learner:
    """What the update trains: the policy, and a value head or a separate critic (or neither)."""
    policy: nn.Module
    optimizer: torch.optim.Optimizer
    value_head: Optional[nn.Module] = None
    critic: Optional[nn.Module] = None
    critic_optimizer: Optional[torch.optim.Optimizer] = None
    sharded: bool = False  # FSDP: the models reduce their gradients themselves, in the backward

    def forward(self, prompts, responses, cfg: PPOConfig):
        """(log-probs (M,) or None under grad, hidden states (M, C) at the response positions, labels (M,),
        values (M,) or None)."""
        input_ids, cu, labels, positions = pack_responses(prompts, responses, self.policy.lm_head_weight.device)
        hidden = self.policy.hidden_states(input_ids, cu_seqlens=cu)[0, positions]  # (M, C)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden)
        elif self.critic is not None:
            values = self.critic(input_ids, cu_seqlens=cu)[0, positions]
        if torch.is_grad_enabled():
            return None, hidden, labels, values
        logprobs = response_logprobs_from_hidden(hidden, self.head_weight(), labels, cfg.temperature, cfg.fused)
        return logprobs, hidden, labels, values

    def head_weight(self):
        """The policy's output weight for the fused losses; read after this step's forward (under fsdp the root
        then holds it gathered; otherwise it is gathered here, with a gradient that reaches the shards)."""
        return head_weight(self.policy.lm_head_weight)

    def params(self):
        policy = [p for g in self.optimizer.param_groups for p in g["params"]]
        critic = [p for g in self.critic_optimizer.param_groups for p in g["params"]] if self.critic_optimizer else []
        return policy, critic


def minibatches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def policy_loss_options(cfg: PPOConfig, kl_coef: float, sequences: int) -> dict:
    """The keyword arguments of ops.linear_ppo_loss / ppo_policy_loss the configuration asks for."""
    options = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high or None, entropy_coef=cfg.entropy_coef,
                   kl_coef=kl_coef if cfg.kl_in_loss else 0.0, kl_estimator=cfg.loss_kl_estimator,
                   kl_clamp=cfg.kl_clamp or None, loss_agg=cfg.loss_agg, ratio_level=cfg.ratio_level)
    if cfg.loss_agg == "token_sum_norm":  # Dr. GRPO's constant: the minibatch's sequences x the longest response
        options["normalizer"] = float(sequences * cfg.max_new_tokens)
    return options


def minibatch_loss(learner: Learner, cfg: PPOConfig, r: Rollout, mb, kl_coef: float):
    """(total loss, stats) of one minibatch: the clipped policy loss (+ KL, - entropy) and the value loss."""
    device = learner.policy.lm_head_weight.device
    prompts, responses = [r.prompts[i] for i in mb], [r.responses[i] for i in mb]
    cat = lambda xs: torch.cat([xs[i] for i in mb]).to(device)  # noqa: E731
    old, ref, adv = cat(r.old_logprobs), cat(r.ref_logprobs), cat(r.advantages)
    mask = torch.ones_like(old)
    _, hidden, labels, values = learner.forward(prompts, responses, cfg)
    options = policy_loss_options(cfg, kl_coef, len(mb))
    cu_seqlens = response_cu_seqlens(responses, device)
    weight = learner.head_weight()
    if cfg.fused:
        out = ops.linear_ppo_loss(hidden, weight, labels, old, adv, mask, ref_logprobs=ref,
                                  temperature=cfg.temperature, cu_seqlens=cu_seqlens, **options)
    else:  # the materialised-logits baseline: the same loss through ops.ppo_policy_loss
        logprobs, entropy = response_logprobs_from_hidden(hidden, weight, labels,
                                                          cfg.temperature, False, return_entropy=True)
        out = ops.ppo_policy_loss(logprobs, old, adv, mask, entropy=entropy, ref_logprobs=ref, cu_seqlens=cu_seqlens,
                                  **options)
    total = out.loss
    stats = {"policy_loss": out.loss.item(), "clip_fraction": out.clip_fraction.item(),
             "clip_ratio/low_mean": out.clip_low_fraction.item(), "clip_ratio/high_mean": out.clip_high_fraction.item(),
             "approx_kl": out.approx_kl.item(), "ratio_mean": out.ratio_mean.item(), "entropy": out.entropy.item()}
    if values is not None:
        vl = ops.value_loss(values, cat(r.values), cat(r.returns), mask, clip_eps=cfg.value_clip_eps)
        total = total + cfg.vf_coef * vl.loss
        stats.update(value_loss=vl.loss.item(), value_clip_fraction=vl.clip_fraction.item())
    return total, stats


def _sync_grads(dist: DistContext, params):
    if not dist.enabled:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce_sum(p.grad)
            p.grad /= dist.world_size


def _clip_grad_norm(params, max_norm: float) -> float:
    """Clip the parameters' global gradient norm (over every process's shards under fsdp); the norm before."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def run_update(learner: Learner, cfg: PPOConfig, r: Rollout, kl_coef: float, dist: DistContext, epoch_order):
    """ppo_epochs passes in minibatches (epoch_order(epoch) -> the epoch's sequence order). Returns (the means over
    minibatches and ranks, the first minibatch's stats), the same on every rank."""
    sums, first, count = {}, None, 0
    policy_params, critic_params = learner.params()
    for epoch in range(cfg.ppo_epochs):
        for mb in minibatches(epoch_order(epoch), cfg.minibatch_size):
            total, stats = minibatch_loss(learner, cfg, r, mb, kl_coef)
            total.backward()
            if not learner.sharded:  # FSDP reduce-scattered them in the backward
                _sync_grads(dist, policy_params + critic_params)
            if cfg.grad_clip > 0:
                stats["grad_norm"] = _clip_grad_norm(policy_params, cfg.grad_clip)
                if critic_params:
                    _clip_grad_norm(critic_params, cfg.grad_clip)
            for optimizer in (learner.optimizer, learner.critic_optimizer):
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            first = dict(stats) if first is None else first
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    # Each rank averaged its own minibatches; the record is the mean over the ranks, the same on every rank.
    keys, first_keys = sorted(sums), sorted(first)
    means = torch.tensor([sums[k] / count for k in keys] + [first[k] for k in first_keys], dtype=torch.float64)
    means = (dist.all_reduce_sum(means) / dist.world_size).tolist()
    return dict(zip(keys, means[:len(keys)])), dict(zip(first_keys, means[len(keys):]))
