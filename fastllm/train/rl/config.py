"""The RL stage's settings: one dataclass for PPO, GRPO and their variants (the `fastllm ppo` flags)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastllm.ops.rl import KL_ESTIMATORS, LOSS_AGGREGATIONS, RATIO_LEVELS

from ..config import _f

ADVANTAGES = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp")
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_pp")  # estimators without a value function
GROUPED = ("grpo", "dr_grpo", "rloo")  # estimators that compare a prompt's responses with each other
TIS_CHOICES = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class PPOConfig:
    out_dir: str = _f("runs/ppo", "directory for checkpoints, logs and plots")
    steps: int = _f(100, "rollout + update iterations")
    batch_size: int = _f(16, "prompts per step on each process")
    group_size: int = _f(1, "responses sampled per prompt (grpo, dr_grpo and rloo need >= 2)")
    minibatch_size: int = _f(8, "sequences per minibatch of the update")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    max_new_tokens: int = _f(32, "longest response")
    temperature: float = _f(1.0, "sampling temperature; the update's log-probs use the same")
    advantage: str = _f("gae", "gae (PPO with a critic) | grpo (group-normalised scores) | dr_grpo (group mean "
                               "removed, no std division) | rloo (leave-one-out baseline) | reinforce_pp "
                               "(REINFORCE++: batch-whitened returns, KL in the reward); all but gae need no critic")
    scale_rewards: str = _f("group", "grpo's divisor: group (each group's std) | batch (the whole batch's std, all "
                                     "processes) | none")
    critic: str = _f("separate", "separate (a GPT + scalar head, from the reward model if any) | head (a value "
                                 "head on the policy's hidden states)")
    loss_agg: str = _f("token_mean", "token_mean | seq_mean_token_mean | seq_mean_token_sum | token_sum_norm "
                                     "(sum over tokens / (minibatch sequences x max_new_tokens): Dr. GRPO)")
    ratio_level: str = _f("token", "importance ratio per token, or per sequence (GSPO)")
    lr: float = _f(1e-5, "policy learning rate (constant after the warm-up)")
    critic_lr: float = _f(5e-5, "learning rate of a separate critic")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip each model's gradient norm (0 = off)")
    clip_eps: float = _f(0.2, "policy ratio clip range (below 1)")
    clip_eps_high: float = _f(0.0, "upper clip range (DAPO's clip-higher, e.g. 0.28; 0 = clip_eps)")
    value_clip_eps: float = _f(0.2, "value clip range around the rollout's values")
    vf_coef: float = _f(0.5, "weight of the value loss")
    entropy_coef: float = _f(0.0, "entropy bonus weight")
    kl_coef: float = _f(0.05, "KL penalty coefficient (initial value when adaptive)")
    kl_target: float = _f(0.0, "adaptive KL: target per-sequence KL (0 = fixed coefficient)")
    kl_horizon: int = _f(10000, "adaptive KL horizon (sequences)")
    kl_mode: str = _f("auto", "where the KL to the reference goes: reward (a per-token penalty) | loss (a term of "
                              "the policy loss) | auto (reward for gae and reinforce_pp, loss otherwise)")
    kl_estimator: str = _f("auto", "k1 (logp - ref) | k2 ((logp - ref)^2 / 2) | k3 (never negative) | auto (k1 in "
                                   "the reward, k3 in the loss)")
    kl_clamp: float = _f(0.0, "clamp each token's KL estimate to +-this (10 = verl's low_var_kl; 0 = off)")
    tis: str = _f("off", "truncated importance sampling on the rollout's own log-probs: off | token_truncate | "
                         "token_mask | sequence_truncate | sequence_mask")
    tis_threshold: float = _f(2.0, "TIS cap C on the rollout ratio")
    dynamic_sampling: bool = _f(False, "DAPO: drop groups whose rewards are all equal and sample more prompts "
                                       "until the batch is full")
    max_sampling_rounds: int = _f(4, "dynamic sampling: most generation rounds per step")
    partial_batch: str = _f("error", "dynamic sampling still short after max_sampling_rounds: error | warn (train "
                                     "on the groups kept, with a warning and the fill logged)")
    overlong_buffer: int = _f(0, "DAPO overlong shaping: a penalty rising linearly over the last N tokens before "
                                 "max_new_tokens (0 = off)")
    overlong_penalty: float = _f(1.0, "the overlong penalty at max_new_tokens")
    gamma: float = _f(1.0, "discount")
    lam: float = _f(0.95, "GAE lambda")
    whiten_advantages: bool = _f(True, "gae: normalise advantages to mean 0, std 1 over the batch's tokens")
    missing_eos_penalty: float = _f(-1.0, "added to the score of a response that never emitted <|end|> (0 = none)")
    fused: bool = _f(True, "fused linear-head losses (False: materialise the logits; a baseline for benchmarks)")
    seed: int = _f(1234, "seed of prompt order, sampling and minibatch order")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    parallel: str = _f("ddp", "ddp | fsdp, under torchrun: ddp keeps whole models on every process (gradients "
                              "averaged after each minibatch); fsdp (FSDP2) shards the policy, the critic and the "
                              "reference over the processes (sharded checkpoints; generation gathers the policy)")
    activation_checkpointing: bool = _f(False, "recompute each transformer block's activations in the backward "
                                               "instead of keeping them (less memory, about 1/3 more compute)")
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

        def one_of(name, options):
            need(getattr(self, name) in options, name, f"one of {options}")

        for name in ("steps", "batch_size", "group_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                     "kl_horizon", "keep_checkpoints", "log_interval", "max_sampling_rounds"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        one_of("advantage", ADVANTAGES)
        one_of("scale_rewards", ("group", "batch", "none"))
        one_of("critic", ("separate", "head"))
        one_of("loss_agg", LOSS_AGGREGATIONS)
        one_of("ratio_level", RATIO_LEVELS)
        one_of("kl_mode", ("auto", "reward", "loss"))
        one_of("kl_estimator", ("auto", *KL_ESTIMATORS))
        one_of("tis", TIS_CHOICES)
        one_of("partial_batch", ("error", "warn"))
        one_of("parallel", ("ddp", "fsdp"))
        need(self.advantage not in GROUPED or self.group_size >= 2, "group_size",
             f">= 2 with advantage={self.advantage!r}")
        need(not self.dynamic_sampling or self.group_size >= 2, "group_size", ">= 2 with dynamic_sampling")
        need(self.temperature > 0, "temperature", "> 0 (the update divides the logits by it)")
        need(self.lr > 0 and self.critic_lr > 0, "lr", "> 0 (and critic_lr too)")
        need(0 <= self.clip_eps < 1, "clip_eps", "in [0, 1)")
        need(self.clip_eps_high >= 0, "clip_eps_high", ">= 0")
        need(self.kl_coef >= 0 and self.kl_target >= 0, "kl_coef", ">= 0 (and kl_target too)")
        need(self.kl_clamp >= 0, "kl_clamp", ">= 0")
        # grpo, dr_grpo and rloo give every token of a response its score's advantage: there is no per-token
        # reward for a KL penalty to enter, so asking for one would silently train without any KL
        need(not (self.kl_mode == "reward" and self.kl_coef > 0 and self.advantage not in ("gae", "reinforce_pp")),
             "kl_mode", f"'loss' or 'auto' with advantage {self.advantage!r} (its advantages carry no per-token "
                        "reward for a KL penalty); 'reward' works with gae and reinforce_pp")
        need(self.tis_threshold > 0, "tis_threshold", "> 0")
        need(0 <= self.overlong_buffer <= self.max_new_tokens, "overlong_buffer", "in [0, max_new_tokens]")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "in [0, 1] (and lam too)")

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.group_size

    @property
    def uses_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_mode == "loss" or (self.kl_mode == "auto" and self.advantage not in ("gae", "reinforce_pp"))

    @property
    def reward_kl_estimator(self) -> str:
        return "k1" if self.kl_estimator == "auto" else self.kl_estimator

    @property
    def loss_kl_estimator(self) -> str:
        return "k3" if self.kl_estimator == "auto" else self.kl_estimator

    def to_dict(self):
        return dataclasses.asdict(self)
