"""PPO (RLHF) and GRPO: one trainer, rollouts by KV-cache generation, losses on the fused linear-head ops.

    fastllm ppo --prompts prompts.jsonl --init runs/sft --reward-model runs/rm --out runs/ppo
    fastllm ppo --prompts prompts.jsonl --init runs/sft --reward-fn mypkg.rewards:score --advantage grpo

One step [Ouyang et al. 2022; Ziegler et al. 2019; the "N implementation details of RLHF" checklist]:
  1. Rollout: batch_size prompts (x group_size responses each) are continued by policy.generate with a KV cache
     at `temperature`, stopping at <|end|>. Generation keeps only the log-prob of each sampled token.
  2. Score: a reward model (ScalarHeadModel, read at the response's last real token: its <|end|>, or the last
     token of a truncated response) or any Python function reward(prompt, response) -> float. A response that
     never emitted <|end|> gets `missing_eos_penalty` added.
  3. Old log-probs, reference log-probs and values are recomputed by the update's own forward, grouped exactly
     as the first epoch's minibatches, so on the first minibatch of the first epoch the ratio is exactly 1 and
     nothing is clipped (generation's decode path can differ from a full forward in the last bits).
  4. Advantages. PPO: per-token reward -kl_coef * KL_t (k1 = logp - ref_logp, or k3) plus the score on the last
     token; GAE (fastllm.ops.gae) with the critic's values; advantages whitened over the batch's tokens.
     GRPO [Shao et al. 2024]: the score normalised within each prompt's group of responses, the same for every
     token of a response; no critic; the KL to the reference is a k3 penalty inside the loss instead.
  5. ppo_epochs passes over the batch in minibatches: clipped policy loss with an entropy bonus
     (fastllm.ops.linear_ppo_loss from the policy's hidden states and output weight: the (tokens, vocab) logits
     are never materialised), clipped value loss (fastllm.ops.value_loss), gradient clipping, AdamW.
  6. Adaptive KL coefficient when kl_target > 0 [Ziegler et al. 2019, sec. 2.2].

Every sequence runs packed (varlen attention, cu_seqlens): prompts of different lengths are neither left- nor
right-padded, and each sequence's positions start at 0 wherever it sits in the batch. All models stay in eval
mode (dropout off: with dropout the ratio of identical weights would not be 1). The logits are divided by the
sampling temperature in the rollout and in every recomputation.

Under torchrun every process starts from rank 0's weights, rolls out its own batch_size prompts (disjoint slices
of one shuffled order), and averages its gradients with the others' after each minibatch, so the weights stay
identical on every rank; advantage whitening and the logged metrics cover all processes; rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastllm import ops

from .chat import ChatTemplate, PromptExample, batch_indices, find_tokenizer, load_gpt, read_prompts
from .checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from .config import _f, add_config_arguments, config_from_args
from .distributed import DistContext, init_distributed
from .log import MetricsLogger
from .loop import warn_changed_settings
from .optim import lr_at, param_groups, set_lr
from .reward import ScalarHeadModel



@dataclass
class PPOConfig:
    out_dir: str = _f("runs/ppo", "directory for checkpoints, logs and plots")
    steps: int = _f(100, "rollout + update iterations")
    batch_size: int = _f(16, "prompts per step on each process")
    group_size: int = _f(1, "responses sampled per prompt (GRPO needs >= 2)")
    minibatch_size: int = _f(8, "sequences per minibatch of the update")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    max_new_tokens: int = _f(32, "longest response")
    temperature: float = _f(1.0, "sampling temperature; the update's log-probs use the same")
    advantage: str = _f("gae", "gae (PPO with a critic) | grpo (group-normalised scores, no critic)")
    critic: str = _f("separate", "separate (a GPT + scalar head, from the reward model if any) | head (a value "
                                 "head on the policy's hidden states)")
    lr: float = _f(1e-5, "policy learning rate (constant after the warm-up)")
    critic_lr: float = _f(5e-5, "learning rate of a separate critic")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip each model's gradient norm (0 = off)")
    clip_eps: float = _f(0.2, "policy ratio clip range")
    value_clip_eps: float = _f(0.2, "value clip range around the rollout's values")
    vf_coef: float = _f(0.5, "weight of the value loss")
    entropy_coef: float = _f(0.0, "entropy bonus weight")
    kl_coef: float = _f(0.05, "KL penalty coefficient (initial value when adaptive)")
    kl_target: float = _f(0.0, "adaptive KL: target per-sequence KL (0 = fixed coefficient)")
    kl_horizon: int = _f(10000, "adaptive KL horizon (sequences)")
    kl_estimator: str = _f("k1", "per-token KL in the PPO reward: k1 (logp - ref) | k3 (never negative)")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    whiten_advantages: bool = _f(True, "normalise advantages to mean 0, std 1 over the batch's tokens")
    missing_eos_penalty: float = _f(-1.0, "added to the score of a response that never emitted <|end|> (0 = none)")
    fused: bool = _f(True, "fused linear-head losses (False: materialise the logits; a baseline for benchmarks)")
    seed: int = _f(1234, "seed of prompt order, sampling and minibatch order")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    log_interval: int = _f(1, "log every N steps")
    checkpoint_interval: int = _f(50, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "step checkpoints kept on disk")
    resume: bool = _f(False, "continue from the latest checkpoint in out_dir")
    progress: bool = _f(True, "tqdm progress bar")
    plot: bool = _f(True, "PNG plots of the metrics")

    def __post_init__(self):
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"PPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "group_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                     "kl_horizon", "keep_checkpoints", "log_interval"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.advantage in ("gae", "grpo"), "advantage", "'gae' or 'grpo'")
        need(self.critic in ("separate", "head"), "critic", "'separate' or 'head'")
        need(self.kl_estimator in ("k1", "k3"), "kl_estimator", "'k1' or 'k3'")
        need(self.advantage != "grpo" or self.group_size >= 2, "group_size", ">= 2 with advantage='grpo'")
        need(self.temperature > 0, "temperature", "> 0 (the update divides the logits by it)")
        need(self.lr > 0 and self.critic_lr > 0, "lr", "> 0 (and critic_lr too)")
        need(0 <= self.clip_eps < 1, "clip_eps", "in [0, 1)")
        need(self.kl_coef >= 0 and self.kl_target >= 0, "kl_coef", ">= 0 (and kl_target too)")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "in [0, 1] (and lam too)")

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    def to_dict(self):
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One step's sampled sequences; per-token tensors are lists of (R_i,) fp32 tensors, R_i the response length."""
    prompts: list  # list[list[int]]
    responses: list  # list[list[int]], each ending with the stop token unless truncated
    stopped: list  # list[bool]
    scores: torch.Tensor  # (n,) reward at the last token (with the missing-EOS penalty)
    raw_scores: torch.Tensor  # (n,) reward-model / reward-function output alone
    sample_logprobs: list  # generation's log-probs of the sampled tokens (diagnostic)
    order: list  # the first epoch's sequence order; minibatches are consecutive slices of it
    old_logprobs: list = None
    ref_logprobs: list = None
    values: list = None
    advantages: list = None
    returns: list = None


def whiten(values: torch.Tensor, mask: torch.Tensor, dist: Optional[DistContext] = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked entries (of every process under DDP); 0 where mask is 0.
    The variance is the population one (divided by the count)."""
    mask = mask.to(values.dtype)
    stats = torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()]).double()
    if dist is not None:
        dist.all_reduce_sum(stats)
    total, total_sq, count = stats.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    return (values - mean) / math.sqrt(var + eps) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (score - mean of its group) / (std of its group + eps); groups are consecutive runs of group_size.
    The std is the sample one (n - 1), as in the GRPO paper's implementation."""
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimates for tokens sampled from the policy [Schulman 2020]:
    k1 = logp - ref (unbiased, any sign), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    return log_ratio.exp() - log_ratio - 1.0


def token_rewards(scores: torch.Tensor, kl: Sequence[torch.Tensor], kl_coef: float) -> list[torch.Tensor]:
    """PPO's per-token rewards: -kl_coef * KL_t at every response token, plus the sequence's score on its last
    real token (the <|end|>, or the last token of a truncated response; there is no padding in these lists)."""
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


def pack_responses(prompts, responses, device):
    """The update's packed layout of prompt + response sequences (the last response token is not an input).

    Returns input_ids (1, N), cu_seqlens (n + 1,), labels (M,) the response tokens, and positions (M,): the
    column of the hidden state that predicts each response token (its prompt's last token for the first)."""
    sequences, positions, offset = [], [], 0
    for p, r in zip(prompts, responses):
        seq = list(p) + list(r[:-1])
        sequences.append(seq)
        start = offset + len(p) - 1
        positions.extend(range(start, start + len(r)))
        offset += len(seq)
    cu = [0]
    for s in sequences:
        cu.append(cu[-1] + len(s))
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)[None]
    labels = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    return (input_ids, torch.tensor(cu, dtype=torch.int32, device=device), labels,
            torch.tensor(positions, dtype=torch.long, device=device))


def response_logprobs(model, prompts, responses, temperature=1.0, *, fused=True, return_entropy=False):
    """Per-token log-probs of `responses` given `prompts` under `model` at `temperature` (a (M,) fp32 tensor, in
    sequence order), computed from the hidden states with linear_token_logprobs (no logits)."""
    device = model.lm_head_weight.device
    input_ids, cu, labels, positions = pack_responses(prompts, responses, device)
    hidden = model.hidden_states(input_ids, cu_seqlens=cu)[0, positions]  # (M, C)
    if fused:
        return ops.linear_token_logprobs(hidden, model.lm_head_weight, labels, temperature=temperature,
                                         return_entropy=return_entropy)
    logits = F.linear(hidden, model.lm_head_weight).float() / temperature
    logprobs = logits.log_softmax(-1)
    out = logprobs.gather(-1, labels[:, None]).squeeze(-1)
    if return_entropy:
        return out, -(logprobs.exp() * logprobs).sum(-1)
    return out


def load_reward_fn(spec: str) -> Callable:
    """'package.module:function' -> the function (reward(prompt, response) -> float)."""
    if ":" not in spec:
        raise ValueError(f"--reward-fn must be 'module:function', got {spec!r}")
    module, name = spec.split(":", 1)
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec!r}: {module} has no callable {name!r}")
    return fn


class ValueHead(nn.Module):
    """A linear value head on the policy's final hidden states (critic='head')."""

    def __init__(self, n_embd):
        super().__init__()
        self.head = nn.Linear(n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden):
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def _adamw(modules, cfg: PPOConfig, lr: float):
    groups = []
    for m in modules:
        groups.extend(param_groups(m, cfg.weight_decay))
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------
class PPOTrainer:
    """PPO / GRPO on a GPT policy.

    policy: fastllm.model.GPT, trained in place. prompts: PromptExample list (or token-id lists).
    reward_model: a ScalarHeadModel, or reward_fn: reward(prompt, response) -> float, called with text when a
    template is given (prompt text as written in the data, response decoded without its <|end|>), else with
    token-id lists. ref_model: the frozen reference (default: a copy of the policy as given). stop_token: the
    end-of-response id (default: the template's <|end|>). critic: a ScalarHeadModel to use as the separate
    critic (default: a copy of the reward model, else of the policy with a new head).
    """

    def __init__(self, policy, config: PPOConfig, prompts, *, reward_model: Optional[ScalarHeadModel] = None,
                 reward_fn: Optional[Callable] = None, ref_model=None, critic: Optional[ScalarHeadModel] = None,
                 template: Optional[ChatTemplate] = None, stop_token: Optional[int] = None,
                 dist: Optional[DistContext] = None, extra_files: Optional[dict] = None):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("PPOTrainer needs exactly one of reward_model= and reward_fn=")
        if not prompts:
            raise ValueError("PPOTrainer needs at least one prompt")
        self.config = cfg = config
        self._owns_dist = dist is None
        self.dist = dist or init_distributed(cfg.device)
        self.device = self.dist.device
        self.prompts = [p if isinstance(p, PromptExample) else PromptExample(list(p)) for p in prompts]
        longest = max(len(p.prompt) for p in self.prompts)
        if longest + cfg.max_new_tokens > policy.config.block_size:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({cfg.max_new_tokens}) "
                             f"exceeds the policy's context (block_size = {policy.config.block_size})")
        self.template = template
        self.stop_token = stop_token if stop_token is not None else (template.end_id if template else None)
        self.reward_fn = reward_fn
        self.extra_files = dict(extra_files or {})
        self.policy = policy.to(self.device)
        self.ref = _freeze(ref_model.to(self.device) if ref_model is not None else copy.deepcopy(policy))
        self.reward_model = _freeze(reward_model.to(self.device)) if reward_model is not None else None
        self.value_head, self.critic, self.critic_optimizer = None, None, None
        if cfg.advantage == "gae":
            if cfg.critic == "head":
                self.value_head = ValueHead(policy.config.n_embd).to(self.device)
            else:
                if critic is None:
                    if reward_model is not None:
                        critic = copy.deepcopy(reward_model)
                    else:  # a new head at 0: no value noise before the critic has learned anything
                        critic = ScalarHeadModel(copy.deepcopy(policy))
                        nn.init.zeros_(critic.head.weight)
                self.critic = critic.to(self.device)
                for p in self.critic.parameters():
                    p.requires_grad_(True)
                if self.critic.gpt.lm_head is not None:
                    self.critic.gpt.lm_head.requires_grad_(False)
                self.critic_optimizer = _adamw([self.critic], cfg, cfg.critic_lr)
        trained = [self.policy] + ([self.value_head] if self.value_head is not None else [])
        self.optimizer = _adamw(trained, cfg, cfg.lr)
        for m in self._models():
            m.eval()  # dropout off everywhere, for good: PPO never calls .train()
            self.dist.broadcast_module(m)  # rank 0's weights everywhere (no DDP wrapper here to do it)
        self.step = 0
        self.kl_coef = cfg.kl_coef
        self.first_minibatch = None  # stats of the first minibatch of the first epoch of the latest step
        self.last_checkpoint = None
        self._saved_step = -1
        self.out_dir = Path(cfg.out_dir)
        panels = {"reward": [("ppo", "reward"), ("ppo", "score")], "KL to reference": [("ppo", "kl")],
                  "entropy": [("ppo", "entropy")], "clip fraction": [("ppo", "clip_fraction")],
                  "value loss": [("ppo", "value_loss")], "response length": [("ppo", "response_length")]}
        if cfg.advantage == "grpo":
            del panels["value loss"]
        self.logger = MetricsLogger(self.out_dir, "ppo", enabled=self.dist.is_main, plot=cfg.plot, plot_keys=panels)
        if cfg.resume:
            self._resume()

    def _models(self):
        return [m for m in (self.policy, self.ref, self.reward_model, self.critic, self.value_head) if m is not None]

    # ---- checkpoints ----
    def _trained_models(self):
        models = {"model": self.policy, "ref": self.ref}
        if self.critic is not None:
            models["critic"] = self.critic
        if self.value_head is not None:
            models["value_head"] = self.value_head
        optimizers = {"optimizer": self.optimizer}
        if self.critic_optimizer is not None:
            optimizers["critic_optimizer"] = self.critic_optimizer
        return models, optimizers

    def save(self) -> Optional[Path]:
        if self.dist.is_main:
            models, optimizers = self._trained_models()
            state = {"step": self.step, "kl_coef": self.kl_coef, "config": self.config.to_dict(),
                     "world_size": self.dist.world_size, "stage": "ppo"}
            self.last_checkpoint = save_checkpoint(self.out_dir / "checkpoints", self.step, models=models,
                                                   optimizers=optimizers, state=state, extra_files=self.extra_files,
                                                   keep=self.config.keep_checkpoints)
        self._saved_step = self.step
        self.dist.barrier()
        return self.last_checkpoint

    def _resume(self):
        found = find_checkpoint(self.out_dir) if self.out_dir.exists() else None
        if found is None:
            raise CheckpointError(f"resume=True but there is no checkpoint in {self.out_dir}")
        ckpt = load_checkpoint(found)
        models, optimizers = self._trained_models()
        for name, module in models.items():
            ckpt.load_model(module, name)
        for name, opt in optimizers.items():
            ckpt.load_optimizer(opt, name)
        self.step, self.kl_coef = ckpt.state["step"], ckpt.state["kl_coef"]
        # steps only extends the run: PPO's learning rate is constant after the warm-up
        warn_changed_settings(ckpt.path, ckpt.state, self.config.to_dict(), self.dist, ignore=("steps",))
        self._saved_step = self.step
        self.last_checkpoint = ckpt.path
        self.logger.truncate_after(self.step)

    # ---- the step ----
    def _generator(self, *salt):
        seed = self.config.seed
        for s in salt:
            seed = (seed * 1_000_003 + s) % (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _score(self, batch, responses):
        """Rewards (n,) of each prompt + response: the reward model at the last token, or the reward function."""
        if self.reward_model is not None:
            with torch.no_grad():
                return self.reward_model.score([p.prompt + r for p, r in zip(batch, responses)]).float().cpu()
        out = []
        for p, r in zip(batch, responses):
            if self.template is not None:
                prompt = p.text or self.template.decode_prompt(p.prompt)
                value = self.reward_fn(prompt, self.template.decode_response(r))
            else:
                value = self.reward_fn(p.prompt, list(r))
            out.append(float(value))
        return torch.tensor(out, dtype=torch.float32)

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg, dist = self.config, self.dist
        chosen = batch_indices(len(self.prompts), self.step, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
        batch = [self.prompts[i] for i in chosen for _ in range(cfg.group_size)]  # a group's responses adjacent
        gen = self.policy.generate([p.prompt for p in batch], cfg.max_new_tokens, temperature=cfg.temperature,
                                   stop_tokens=() if self.stop_token is None else (self.stop_token,),
                                   return_logprobs=True, generator=self._generator(self.step, dist.rank, 1))
        raw = self._score(batch, gen.tokens)
        penalty = torch.tensor([0.0 if s else cfg.missing_eos_penalty for s in gen.stopped])
        if self.stop_token is None:
            penalty.zero_()
        n = len(batch)
        order = torch.randperm(n, generator=self._generator(self.step, dist.rank, 2, 0)).tolist()
        rollout = Rollout([p.prompt for p in batch], gen.tokens, gen.stopped, raw + penalty, raw, gen.logprobs,
                          order)
        self._recompute(rollout)
        return rollout

    def _minibatches(self, order):
        mb = self.config.minibatch_size
        return [order[i:i + mb] for i in range(0, len(order), mb)]

    def _recompute(self, r: Rollout):
        """Old log-probs, reference log-probs and values, by the update's forward, minibatch by minibatch in the
        first epoch's grouping (the same inputs give the same bits: ratio exactly 1 on that first minibatch)."""
        cfg = self.config
        n = len(r.prompts)
        old, ref, values = [None] * n, [None] * n, [None] * n
        for mb in self._minibatches(r.order):
            prompts, responses = [r.prompts[i] for i in mb], [r.responses[i] for i in mb]
            lengths = [len(x) for x in responses]
            old_lp, _, mb_values = self._policy_forward(prompts, responses)
            ref_lp = response_logprobs(self.ref, prompts, responses, cfg.temperature, fused=cfg.fused)
            for i, a, b in zip(mb, old_lp.split(lengths), ref_lp.split(lengths)):
                old[i], ref[i] = a.detach().cpu(), b.detach().cpu()
            if mb_values is not None:
                for i, v in zip(mb, mb_values.split(lengths)):
                    values[i] = v.detach().cpu()
        r.old_logprobs, r.ref_logprobs = old, ref
        r.values = values if values[0] is not None else None
        self._advantages(r)

    def _policy_forward(self, prompts, responses):
        """(log-probs (M,), hidden states (M, C) at the response positions, values (M,) or None)."""
        device = self.device
        input_ids, cu, labels, positions = pack_responses(prompts, responses, device)
        hidden = self.policy.hidden_states(input_ids, cu_seqlens=cu)[0, positions]  # (M, C)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden)
        elif self.critic is not None:
            values = self.critic(input_ids, cu_seqlens=cu)[0, positions]
        if torch.is_grad_enabled():
            return None, (hidden, labels), values
        logprobs = response_logprobs_from_hidden(hidden, self.policy.lm_head_weight, labels,
                                                 self.config.temperature, self.config.fused)
        return logprobs, (hidden, labels), values

    def _advantages(self, r: Rollout):
        cfg = self.config
        kl = [kl_estimate(o, f, cfg.kl_estimator) for o, f in zip(r.old_logprobs, r.ref_logprobs)]
        if cfg.advantage == "grpo":
            adv = group_advantages(r.scores, cfg.group_size)
            r.advantages = [torch.full_like(o, float(a)) for o, a in zip(r.old_logprobs, adv)]
            r.returns = None
            return
        rewards_t, mask = pad_right(token_rewards(r.scores, kl, self.kl_coef))
        values_t, _ = pad_right(r.values)
        advantages, returns = ops.gae(rewards_t, values_t, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask, self.dist)
        lengths = [len(x) for x in r.old_logprobs]
        r.advantages = [advantages[i, :n] for i, n in enumerate(lengths)]
        r.returns = [returns[i, :n] for i, n in enumerate(lengths)]

    def _sync_grads(self, params):
        if not self.dist.enabled:
            return
        for p in params:
            if p.grad is not None:
                self.dist.all_reduce_sum(p.grad)
                p.grad /= self.dist.world_size

    def update(self, r: Rollout) -> dict:
        cfg = self.config
        sums = {}
        count = 0
        policy_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        critic_params = ([p for g in self.critic_optimizer.param_groups for p in g["params"]]
                         if self.critic_optimizer else [])
        first = None
        for epoch in range(cfg.ppo_epochs):
            order = r.order if epoch == 0 else torch.randperm(
                len(r.order), generator=self._generator(self.step, self.dist.rank, 2, epoch)).tolist()
            for mb in self._minibatches(order):
                stats = self._minibatch(r, mb)
                (stats.pop("total_loss")).backward()
                self._sync_grads(policy_params + critic_params)
                if cfg.grad_clip > 0:
                    stats["grad_norm"] = nn.utils.clip_grad_norm_(policy_params, cfg.grad_clip).item()
                    if critic_params:
                        nn.utils.clip_grad_norm_(critic_params, cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic_optimizer is not None:
                    self.critic_optimizer.step()
                    self.critic_optimizer.zero_grad(set_to_none=True)
                if first is None:
                    first = dict(stats)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        # Each rank averaged its own minibatches; the record is the mean over the ranks, the same on every rank.
        keys, first_keys = sorted(sums), sorted(first)
        means = torch.tensor([sums[k] / count for k in keys] + [first[k] for k in first_keys], dtype=torch.float64)
        means = (self.dist.all_reduce_sum(means) / self.dist.world_size).tolist()
        self.first_minibatch = dict(zip(first_keys, means[len(keys):]))
        return dict(zip(keys, means[:len(keys)]))

    def _minibatch(self, r: Rollout, mb) -> dict:
        cfg = self.config
        prompts, responses = [r.prompts[i] for i in mb], [r.responses[i] for i in mb]
        cat = lambda xs: torch.cat([xs[i] for i in mb]).to(self.device)  # noqa: E731
        old, ref, adv = cat(r.old_logprobs), cat(r.ref_logprobs), cat(r.advantages)
        mask = torch.ones_like(old)
        _, (hidden, labels), values = self._policy_forward(prompts, responses)
        kl_in_loss = self.kl_coef if cfg.advantage == "grpo" else 0.0
        if cfg.fused:
            out = ops.linear_ppo_loss(hidden, self.policy.lm_head_weight, labels, old, adv, mask, ref_logprobs=ref,
                                      kl_coef=kl_in_loss, entropy_coef=cfg.entropy_coef, clip_eps=cfg.clip_eps,
                                      temperature=cfg.temperature)
        else:  # the materialised-logits baseline: the same loss through ops.ppo_policy_loss
            logprobs, entropy = response_logprobs_from_hidden(hidden, self.policy.lm_head_weight, labels,
                                                              cfg.temperature, False, return_entropy=True)
            out = ops.ppo_policy_loss(logprobs, old, adv, mask, clip_eps=cfg.clip_eps, entropy=entropy,
                                      entropy_coef=cfg.entropy_coef, ref_logprobs=ref, kl_coef=kl_in_loss)
        total = out.loss
        stats = {"policy_loss": out.loss.item(), "clip_fraction": out.clip_fraction.item(),
                 "approx_kl": out.approx_kl.item(), "ratio_mean": out.ratio_mean.item(),
                 "entropy": out.entropy.item()}
        if values is not None:
            vl = ops.value_loss(values, cat(r.values), cat(r.returns), mask, clip_eps=cfg.value_clip_eps)
            total = total + cfg.vf_coef * vl.loss
            stats.update(value_loss=vl.loss.item(), value_clip_fraction=vl.clip_fraction.item())
        stats["total_loss"] = total
        return stats

    def train_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        set_lr(self.optimizer, lr)
        if self.critic_optimizer is not None:
            set_lr(self.critic_optimizer, lr * cfg.critic_lr / cfg.lr)
        r = self.rollout()
        t1 = time.perf_counter()
        stats = self.update(r)
        t2 = time.perf_counter()
        k3 = [kl_estimate(o, f, "k3") for o, f in zip(r.old_logprobs, r.ref_logprobs)]
        k1 = [kl_estimate(o, f, "k1") for o, f in zip(r.old_logprobs, r.ref_logprobs)]
        tokens = sum(len(x) for x in r.responses)
        mismatch = torch.cat([(a - b).abs() for a, b in zip(r.sample_logprobs, r.old_logprobs)]).max().item()
        totals = torch.tensor([r.raw_scores.sum().item(), r.scores.sum().item(), sum(x.sum().item() for x in k3),
                               sum(x.sum().item() for x in k1), float(sum(r.stopped)), float(tokens),
                               float(len(r.responses))], dtype=torch.float64)
        self.dist.all_reduce_sum(totals)
        # [largest mismatch, -smallest k3] over every rank's tokens
        extremes = torch.tensor([mismatch, -min(x.min().item() for x in k3)], dtype=torch.float64)
        self.dist.all_reduce_max(extremes)
        n = totals[6].item()
        kl_per_sequence = totals[2].item() / n
        record = {"reward": totals[0].item() / n, "score": totals[1].item() / n, "kl": kl_per_sequence,
                  "kl_k1": totals[3].item() / n, "kl_k3_token_min": -extremes[1].item(),
                  "eos_rate": totals[4].item() / n, "response_length": totals[5].item() / n,
                  "kl_coef": self.kl_coef, "lr": lr, "logprob_mismatch": extremes[0].item(), **stats,
                  "first_ratio": self.first_minibatch["ratio_mean"],
                  "first_clip_fraction": self.first_minibatch["clip_fraction"],
                  "rollout_s": t1 - t0, "update_s": t2 - t1,  # this rank's; the others ran alongside
                  "update_tokens_per_s": totals[5].item() * cfg.ppo_epochs / max(t2 - t1, 1e-9)}
        if cfg.kl_target > 0:  # Ziegler et al.: proportional control of the KL, error clipped to +-20%
            error = max(-0.2, min(0.2, kl_per_sequence / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * n / cfg.kl_horizon
        self.step += 1
        return record

    def fit(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        pbar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                    desc=f"{'grpo' if cfg.advantage == 'grpo' else 'ppo'}", dynamic_ncols=True)
        record, history = {}, []
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                history.append(record)
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    self.logger.log({"kind": "ppo", "step": self.step, **record})
                pbar.update(1)
                pbar.set_postfix_str(f"reward {record['reward']:.3f} kl {record['kl']:.3f}", refresh=False)
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                    self.save()
            if self._saved_step != self.step:
                self.save()
        finally:
            pbar.close()
            self.logger.flush()
            if self._owns_dist:
                self.dist.close()
        return {"step": self.step, "reward": record.get("reward"), "kl": record.get("kl"),
                "kl_coef": self.kl_coef, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "seconds": round(time.perf_counter() - started, 1)}


def response_logprobs_from_hidden(hidden, weight, labels, temperature, fused, return_entropy=False):
    if fused:
        return ops.linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                         return_entropy=return_entropy)
    logprobs = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
    out = logprobs.gather(-1, labels[:, None]).squeeze(-1)
    if return_entropy:
        return out, -(logprobs.exp() * logprobs).sum(-1)
    return out


# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(policy, prompts, reward_fn, *, template=None, ref_model=None, samples: int = 1,
                    max_new_tokens: int = 32, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                    stop_token=None) -> dict:
    """The mean reward_fn score of `samples` sampled responses per prompt (temperature 0: greedy), the share
    that stopped, and with ref_model the mean per-sequence KL(policy || ref) (sum of k3 over the tokens)."""
    prompts = [p if isinstance(p, PromptExample) else PromptExample(list(p)) for p in prompts]
    stop = stop_token if stop_token is not None else (template.end_id if template else None)
    device = policy.lm_head_weight.device
    gen_seed = torch.Generator(device=device).manual_seed(seed)
    scores, stopped, kls = [], [], []
    batch = [p for p in prompts for _ in range(samples)]
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        out = policy.generate([p.prompt for p in chunk], max_new_tokens, temperature=temperature,
                              stop_tokens=() if stop is None else (stop,), generator=gen_seed)
        for p, r in zip(chunk, out.tokens):
            if template is not None:
                scores.append(float(reward_fn(p.text or template.decode_prompt(p.prompt),
                                              template.decode_response(r))))
            else:
                scores.append(float(reward_fn(p.prompt, list(r))))
        stopped.extend(out.stopped)
        if ref_model is not None and temperature > 0:
            ps, rs = [p.prompt for p in chunk], out.tokens
            lp = response_logprobs(policy, ps, rs, temperature)
            rp = response_logprobs(ref_model, ps, rs, temperature)
            lengths = [len(x) for x in rs]
            kls.extend(k.sum().item() for k in kl_estimate(lp, rp, "k3").split(lengths))
    scores_t = torch.tensor(scores)
    result = {"score": scores_t.mean().item(), "score_sem": (scores_t.std() / math.sqrt(len(scores))).item()
              if len(scores) > 1 else 0.0, "eos_rate": sum(stopped) / len(stopped), "n": len(scores)}
    if kls:
        result["kl"] = sum(kls) / len(kls)
    return result


def ppo(config: PPOConfig, *, prompts=None, init=None, policy=None, reward_model=None, reward_fn=None,
        tokenizer=None, ref_model=None) -> dict:
    """The Python API behind `fastllm ppo`: train `policy` (or the GPT under `init`) on `prompts` (a JSONL path
    or a list of PromptExample) against `reward_model` (a ScalarHeadModel or its folder) or `reward_fn`.
    Returns the summary plus "final" (out_dir/final: the policy as a plain GPT with tokenizer.json)."""
    from fastllm.data import load_tokenizer

    from .chat import export_model

    if policy is None:
        if init is None:
            raise ValueError("ppo needs policy= or init= (an SFT run folder or checkpoint)")
        policy = load_gpt(init)
    tokenizer_path = find_tokenizer(init, tokenizer) if (init is not None or tokenizer) else None
    template = ChatTemplate(load_tokenizer(tokenizer_path)) if tokenizer_path else None
    if isinstance(prompts, (str, os.PathLike)):
        if template is None:
            raise ValueError("reading a prompts file needs a tokenizer (init= or tokenizer=)")
        prompts = read_prompts(prompts, template, policy.config.block_size, config.max_new_tokens)
    if isinstance(reward_model, (str, os.PathLike)):
        reward_model = ScalarHeadModel.from_pretrained(reward_model)
    if config.resume:  # the checkpoint holds the reference: the policy is loaded over a copy of the initial one
        ref_model = ref_model if ref_model is not None else copy.deepcopy(policy)
    trainer = PPOTrainer(policy, config, prompts, reward_model=reward_model, reward_fn=reward_fn,
                         ref_model=ref_model, template=template,
                         extra_files={"tokenizer.json": str(tokenizer_path)} if tokenizer_path else None)
    summary = trainer.fit()
    if trainer.dist.is_main:
        summary["final"] = str(export_model(policy, config.out_dir, tokenizer_path))
    summary["trainer"] = trainer
    return summary


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", required=True, help='JSONL file with a "prompt" field per line')
    parser.add_argument("--init", required=True, help="the policy to start from: an SFT run folder or checkpoint")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one next to --init)")
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", default=None, help="a `fastllm reward` run folder or export")
    reward.add_argument("--reward-fn", default=None,
                        help="'module:function' with function(prompt: str, response: str) -> float")
    parser.add_argument("--out", dest="out_dir", default="runs/ppo", help="run folder (default: runs/ppo)")
    add_config_arguments(parser.add_argument_group("ppo"), PPOConfig, skip=("out_dir",))


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args, PPOConfig)
    summary = ppo(config, prompts=args.prompts, init=args.init, tokenizer=args.tokenizer,
                  reward_model=args.reward_model,
                  reward_fn=load_reward_fn(args.reward_fn) if args.reward_fn else None)
    summary.pop("trainer", None)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0
