"""PPO (RLHF), GRPO and their variants: one trainer over the rollout, scoring, advantages and update modules.

    fastllm ppo --prompts prompts.jsonl --init runs/sft --reward-model runs/rm --out runs/ppo
    fastllm ppo --prompts prompts.jsonl --init runs/sft --reward-fn mypkg.rewards:score --advantage grpo

One step [Ouyang et al. 2022; Ziegler et al. 2019; the "N implementation details of RLHF" checklist]:
  1. Rollout (rollout.py): batch_size prompts (x group_size responses each) continued by policy.generate with a
     KV cache at `temperature`, stopping at <|end|>; generation keeps each sampled token's log-prob. With
     dynamic_sampling (DAPO), groups whose rewards are all equal are dropped and more prompts sampled.
  2. Score (rewards.py): a reward model (ScalarHeadModel at the response's last token) or weighted reward
     functions; missing_eos_penalty for a response that never emitted <|end|>, DAPO's overlong shaping.
  3. Old log-probs, reference log-probs and values recomputed by the update's own forward (update.py).
  4. Advantages (advantages.py): gae | grpo | dr_grpo | rloo | reinforce_pp; the KL to the reference as a
     per-token reward penalty or a loss term; TIS weights for the rollout/trainer mismatch.
  5. ppo_epochs passes over the batch in minibatches (update.py): ops.linear_ppo_loss with the aggregation mode
     (loss_agg) and ratio level (token, or sequence: GSPO), the clipped value loss, gradient clipping, AdamW.
  6. Adaptive KL coefficient when kl_target > 0 [Ziegler et al. 2019, sec. 2.2].
Metrics carry TRL's names (reward, reward_std, frac_reward_zero_std, completions/..., kl, entropy,
clip_ratio/..., rewards/{name}/..., sampling/...) next to fastllm's own.

Under torchrun every process starts from rank 0's weights, rolls out its own batch_size prompts (disjoint slices
of one shuffled order), and averages its gradients with the others' after each minibatch, so the weights stay
identical on every rank; whitening, batch-scaled advantages and the logged metrics cover all processes; rank 0
writes the files.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fastllm import ops

from ..chat import ChatTemplate, PromptExample, batch_indices
from ..checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint, save_sharded_checkpoint
from ..distributed import DistContext, init_distributed
from ..log import MetricsLogger
from ..loop import warn_changed_settings
from ..optim import lr_at, param_groups, set_lr
from ..parallel import full_copy, parallelize, unsharded
from ..reward import ScalarHeadModel
from .advantages import apply_rollout_correction, compute_advantages
from .config import PPOConfig
from .rewards import RewardFunctions, overlong_penalty
from .rollout import Rollout, dynamic_sample, response_logprobs
from .update import Learner, ValueHead, minibatches, run_update

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


class PPOTrainer:
    """PPO / GRPO and variants on a GPT policy.

    policy: fastllm.model.GPT, trained in place. prompts: PromptExample list (or token-id lists).
    reward_model: a ScalarHeadModel, or reward_fn: one reward function or a list (see rewards.py), with
    reward_weights (one per function). Functions are called with text when a template is given (prompt text as
    written in the data, response decoded without its <|end|>), else with token-id lists. ref_model: the frozen
    reference (default: a copy of the policy as given). stop_token: the end-of-response id (default: the
    template's <|end|>). critic: a ScalarHeadModel to use as the separate critic (default: a copy of the reward
    model, else of the policy with a new head).
    """

    def __init__(self, policy, config: PPOConfig, prompts, *, reward_model: Optional[ScalarHeadModel] = None,
                 reward_fn=None, reward_weights=None, ref_model=None, critic: Optional[ScalarHeadModel] = None,
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
        self.reward_fns = RewardFunctions(reward_fn, reward_weights) if reward_fn is not None else None
        self.extra_files = dict(extra_files or {})
        self.policy = policy.to(self.device)
        self.ref = _freeze(ref_model.to(self.device) if ref_model is not None else copy.deepcopy(policy))
        self.reward_model = _freeze(reward_model.to(self.device)) if reward_model is not None else None
        value_head = critic_model = None
        if cfg.uses_critic:
            if cfg.critic == "head":
                value_head = ValueHead(policy.config.n_embd).to(self.device)
            else:
                if critic is None:
                    if reward_model is not None:
                        critic = copy.deepcopy(reward_model)
                    else:  # a new head at 0: no value noise before the critic has learned anything
                        critic = ScalarHeadModel(copy.deepcopy(policy))
                        nn.init.zeros_(critic.head.weight)
                critic_model = critic.to(self.device)
                for p in critic_model.parameters():
                    p.requires_grad_(True)
                if critic_model.gpt.lm_head is not None:
                    critic_model.gpt.lm_head.requires_grad_(False)
        for m in (self.policy, self.ref, self.reward_model, critic_model, value_head):
            if m is not None:
                m.eval()  # dropout off everywhere, for good: PPO never calls .train()
                self.dist.broadcast_module(m)  # rank 0's weights everywhere (before any sharding)
        # fsdp shards policy, reference and critic in place (the reward model stays whole: it only scores); ddp
        # is this trainer's own gradient average, so parallelize then sees one process (no DDP wrapper) and
        # only applies activation checkpointing. The optimizers are built on the sharded parameters.
        self.sharded = cfg.parallel == "fsdp" and self.dist.enabled
        local = self.dist if cfg.parallel == "fsdp" else DistContext(device=self.device)
        for m in (self.policy, critic_model):
            if m is not None:
                parallelize(m, cfg.parallel, local, activation_checkpointing=cfg.activation_checkpointing)
        parallelize(self.ref, cfg.parallel, local)
        if value_head is not None and self.sharded:  # its own FSDP unit: its gradient is averaged in the backward
            parallelize(value_head, "fsdp", self.dist)
        critic_optimizer = _adamw([critic_model], cfg, cfg.critic_lr) if critic_model is not None else None
        trained = [self.policy] + ([value_head] if value_head is not None else [])
        self.learner = Learner(self.policy, _adamw(trained, cfg, cfg.lr), value_head, critic_model, critic_optimizer,
                               sharded=self.sharded)
        self.step = 0
        self.kl_coef = cfg.kl_coef
        self.first_minibatch = None  # stats of the first minibatch of the first epoch of the latest step
        self.last_checkpoint = None
        self.final_policy = None  # set by fit()
        self._saved_step = -1
        self.out_dir = Path(cfg.out_dir)
        panels = {"reward": [("ppo", "reward"), ("ppo", "score")], "KL to reference (per token)": [("ppo", "kl")],
                  "entropy": [("ppo", "entropy")], "clip fraction": [("ppo", "clip_fraction")],
                  "rollout/trainer mismatch: max |log-prob difference|":
                      [("ppo", "sampling/sampling_logp_difference/max")],
                  "value loss": [("ppo", "value_loss")], "response length": [("ppo", "completions/mean_length")]}
        if not cfg.uses_critic:
            del panels["value loss"]
        self.logger = MetricsLogger(self.out_dir, "ppo", enabled=self.dist.is_main, plot=cfg.plot, plot_keys=panels)
        if cfg.resume:
            self._resume()

    # the models, by the names the checkpoints and tests use
    @property
    def critic(self):
        return self.learner.critic

    @property
    def value_head(self):
        return self.learner.value_head

    @property
    def optimizer(self):
        return self.learner.optimizer

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
        if self.learner.critic_optimizer is not None:
            optimizers["critic_optimizer"] = self.learner.critic_optimizer
        return models, optimizers

    def _optimizer_owners(self):
        """The module whose parameter names key each optimizer's sharded state: the policy, or the policy and the
        value head together when the head shares its optimizer."""
        policy = (self.policy if self.value_head is None
                  else nn.ModuleDict({"model": self.policy, "value_head": self.value_head}))
        return {"optimizer": policy, "critic_optimizer": self.critic}

    def save(self) -> Optional[Path]:
        models, optimizers = self._trained_models()
        state = {"step": self.step, "kl_coef": self.kl_coef, "config": self.config.to_dict(),
                 "world_size": self.dist.world_size, "stage": "ppo"}
        common = dict(state=state, extra_files=self.extra_files, keep=self.config.keep_checkpoints)
        if self.sharded:  # every process writes its shards
            self.last_checkpoint = save_sharded_checkpoint(self.out_dir / "checkpoints", self.step, dist=self.dist,
                                                           models=models, optimizers=optimizers,
                                                           owners=self._optimizer_owners(), **common)
        elif self.dist.is_main:
            self.last_checkpoint = save_checkpoint(self.out_dir / "checkpoints", self.step, models=models,
                                                   optimizers=optimizers, **common)
        self._saved_step = self.step
        self.dist.barrier()
        return self.last_checkpoint

    def _resume(self):
        found = find_checkpoint(self.out_dir) if self.out_dir.exists() else None
        if found is None:
            raise CheckpointError(f"resume=True but there is no checkpoint in {self.out_dir}")
        ckpt = load_checkpoint(found)
        if self.sharded and not ckpt.sharded:
            raise CheckpointError(f"{ckpt.path} was written by an unsharded run (parallel='ddp' or one process); "
                                  f"resume it with parallel='ddp'")
        models, optimizers = self._trained_models()
        for name, module in models.items():
            ckpt.load_model(module, name)
        owners = self._optimizer_owners()
        for name, opt in optimizers.items():  # a sharded checkpoint (any number of processes) needs the owner
            ckpt.load_optimizer(opt, name, model=owners[name] if ckpt.sharded else None)
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
        """(total (n,), {name: (n,)}): the reward model at the last token, or the weighted reward functions."""
        if self.reward_model is not None:
            with torch.no_grad():
                scores = self.reward_model.score([p.prompt + r for p, r in zip(batch, responses)]).float().cpu()
            return scores, {"reward_model": scores}
        if self.template is not None:
            prompts = [p.text or self.template.decode_prompt(p.prompt) for p in batch]
            texts = [self.template.decode_response(r) for r in responses]
        else:
            prompts, texts = [p.prompt for p in batch], [list(r) for r in responses]
        return self.reward_fns(prompts, texts, responses)

    def _draw(self, round_):
        """This rank's prompt indices for generation round `round_` of the step (later rounds: dynamic sampling)."""
        cfg, dist = self.config, self.dist
        if round_ == 0:
            return batch_indices(len(self.prompts), self.step, cfg.batch_size, cfg.seed, dist.rank, dist.world_size)
        return torch.randint(len(self.prompts), (cfg.batch_size,),
                             generator=self._generator(self.step, dist.rank, 3, round_)).tolist()

    def _sample_round(self, round_):
        cfg, rank = self.config, self.dist.rank
        batch = [self.prompts[i] for i in self._draw(round_) for _ in range(cfg.group_size)]  # groups adjacent
        salt = (self.step, rank, 1) if round_ == 0 else (self.step, rank, 1, round_)
        gen = self.policy.generate([p.prompt for p in batch], cfg.max_new_tokens, temperature=cfg.temperature,
                                   stop_tokens=() if self.stop_token is None else (self.stop_token,),
                                   return_logprobs=True, generator=self._generator(*salt))
        raw, parts = self._score(batch, gen.tokens)
        penalty = torch.tensor([0.0 if s else cfg.missing_eos_penalty for s in gen.stopped])
        if self.stop_token is None:
            penalty.zero_()
        lengths = torch.tensor([len(r) for r in gen.tokens])
        penalty += overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        columns = {"prompts": [p.prompt for p in batch], "responses": gen.tokens, "stopped": gen.stopped,
                   "sample_logprobs": gen.logprobs, "raw": raw.tolist(),
                   **{f"part:{name}": values.tolist() for name, values in parts.items()}}
        return columns, raw + penalty

    def _agree_min(self, kept):
        t = torch.tensor([-float(kept)], dtype=torch.float64)
        self.dist.all_reduce_max(t)
        return int(-t.item())

    def _sample(self):
        cfg = self.config
        if cfg.dynamic_sampling:
            return dynamic_sample(self._sample_round, groups_wanted=cfg.batch_size, group_size=cfg.group_size,
                                  max_rounds=cfg.max_sampling_rounds, partial=cfg.partial_batch,
                                  agree=self._agree_min)
        return (*self._sample_round(0), None)

    @torch.no_grad()
    def rollout(self) -> Rollout:
        dist = self.dist
        with unsharded(self.policy):  # one gather for every round: the ranks may sample different numbers
            columns, scores, record = self._sample()
        n = len(columns["responses"])
        order = torch.randperm(n, generator=self._generator(self.step, dist.rank, 2, 0)).tolist()
        parts = {k.removeprefix("part:"): torch.tensor(v) for k, v in columns.items() if k.startswith("part:")}
        rollout = Rollout(columns["prompts"], columns["responses"], columns["stopped"], scores,
                          torch.tensor(columns["raw"]), columns["sample_logprobs"], order, parts, record)
        self._recompute(rollout)
        return rollout

    def _recompute(self, r: Rollout):
        """Old log-probs, reference log-probs and values, by the update's forward, minibatch by minibatch in the
        first epoch's grouping (the same inputs give the same bits: ratio exactly 1 on that first minibatch)."""
        cfg = self.config
        n = len(r.prompts)
        old, ref, values = [None] * n, [None] * n, [None] * n
        for mb in minibatches(r.order, cfg.minibatch_size):
            prompts, responses = [r.prompts[i] for i in mb], [r.responses[i] for i in mb]
            lengths = [len(x) for x in responses]
            old_lp, _, _, mb_values = self.learner.forward(prompts, responses, cfg)
            ref_lp = response_logprobs(self.ref, prompts, responses, cfg.temperature, fused=cfg.fused)
            for i, a, b in zip(mb, old_lp.split(lengths), ref_lp.split(lengths)):
                old[i], ref[i] = a.detach().cpu(), b.detach().cpu()
            if mb_values is not None:
                for i, v in zip(mb, mb_values.split(lengths)):
                    values[i] = v.detach().cpu()
        r.old_logprobs, r.ref_logprobs = old, ref
        r.values = values if values[0] is not None else None
        compute_advantages(r, cfg, self.kl_coef, self.dist)

    def update(self, r: Rollout) -> dict:
        def epoch_order(epoch):
            if epoch == 0:
                return r.order
            return torch.randperm(len(r.order), generator=self._generator(self.step, self.dist.rank, 2, epoch)).tolist()

        stats, self.first_minibatch = run_update(self.learner, self.config, r, self.kl_coef, self.dist, epoch_order)
        return stats

    def train_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        lr = lr_at(self.step, lr=cfg.lr, min_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
        set_lr(self.optimizer, lr)
        if self.learner.critic_optimizer is not None:
            set_lr(self.learner.critic_optimizer, lr * cfg.critic_lr / cfg.lr)
        r = self.rollout()
        mismatch = apply_rollout_correction(r, cfg)
        t1 = time.perf_counter()
        stats = self.update(r)
        t2 = time.perf_counter()
        record = {**self._rollout_metrics(r, mismatch), "kl_coef": self.kl_coef, "lr": lr, **stats,
                  "clip_ratio/region_mean": stats["clip_fraction"],
                  "first_ratio": self.first_minibatch["ratio_mean"],
                  "first_clip_fraction": self.first_minibatch["clip_fraction"],
                  "rollout_s": t1 - t0, "update_s": t2 - t1}  # this rank's; the others ran alongside
        record["update_tokens_per_s"] = record["num_tokens"] * cfg.ppo_epochs / max(t2 - t1, 1e-9)
        if cfg.kl_target > 0:  # Ziegler et al.: proportional control of the KL, error clipped to +-20%
            error = max(-0.2, min(0.2, record["kl_per_sequence"] / cfg.kl_target - 1.0))
            self.kl_coef *= 1.0 + error * record["completions/count"] / cfg.kl_horizon
        self.step += 1
        return record

    def _rollout_metrics(self, r: Rollout, mismatch: dict) -> dict:
        """The step's rollout metrics over every rank's sequences (TRL's names, and fastllm's own)."""
        cfg = self.config
        k3 = torch.cat([ops.kl_penalty(o, f, "k3")[0] for o, f in zip(r.old_logprobs, r.ref_logprobs)])
        k1 = torch.cat([ops.kl_penalty(o, f, "k1")[0] for o, f in zip(r.old_logprobs, r.ref_logprobs)])
        lengths = torch.tensor([len(x) for x in r.responses], dtype=torch.float64)
        stopped = torch.tensor(r.stopped, dtype=torch.bool)
        grouped = cfg.group_size >= 2
        groups = r.raw_scores.double().view(-1, cfg.group_size) if grouped else None
        group_std = groups.std(dim=1) if grouped else None
        parts = {name: v.double() for name, v in (r.reward_parts or {}).items()}
        sums = [r.raw_scores.double().sum(), r.scores.double().sum(), k3.double().sum(), k1.double().sum(),
                stopped.double().sum(), lengths.sum(), float(len(r.responses)), (lengths * stopped).sum(),
                (r.raw_scores.double() ** 2).sum()]
        if grouped:
            sums += [group_std.sum(), (group_std == 0).double().sum(), float(groups.shape[0])]
        for v in parts.values():
            sums += [v.sum(), (v * v).sum()]
        tokens = float(lengths.sum())
        # the mismatch means are token means: weighted by this rank's tokens
        mean_keys = [k for k in mismatch if k.endswith("/mean") or k == "sampling/corrected_fraction"]
        sums += [mismatch[k] * tokens for k in mean_keys]
        sums = self.dist.all_reduce_sum(torch.tensor([float(s) for s in sums], dtype=torch.float64)).tolist()
        extremes = [mismatch["sampling/sampling_logp_difference/max"], -k3.min().item(), lengths.max().item(),
                    -lengths.min().item(), mismatch["sampling/importance_sampling_ratio/max"],
                    -mismatch["sampling/importance_sampling_ratio/min"]]
        extremes = self.dist.all_reduce_max(torch.tensor(extremes, dtype=torch.float64)).tolist()
        raw, score, k3_sum, k1_sum, n_stopped, n_tokens, n, terminated_tokens, raw_sq = sums[:9]
        rest = sums[9:]
        record = {"reward": raw / n, "reward_std": math.sqrt(max(raw_sq / n - (raw / n) ** 2, 0.0) * n / max(n - 1, 1)),
                  "score": score / n, "kl": k3_sum / n_tokens, "kl_per_sequence": k3_sum / n, "kl_k1": k1_sum / n,
                  "kl_k3_token_min": -extremes[1], "eos_rate": n_stopped / n, "response_length": n_tokens / n,
                  "completions/mean_length": n_tokens / n, "completions/max_length": extremes[2],
                  "completions/min_length": -extremes[3], "completions/clipped_ratio": 1.0 - n_stopped / n,
                  "completions/mean_terminated_length": terminated_tokens / max(n_stopped, 1.0),
                  "completions/count": n, "num_tokens": n_tokens, "logprob_mismatch": extremes[0]}
        if grouped:
            std_sum, zero_std, n_groups = rest[:3]
            rest = rest[3:]
            record.update({"reward_std": std_sum / n_groups, "frac_reward_zero_std": zero_std / n_groups})
        for name in parts:
            total, total_sq = rest[:2]
            rest = rest[2:]
            record[f"rewards/{name}/mean"] = total / n
            record[f"rewards/{name}/std"] = math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0) * n / max(n - 1, 1))
        record.update({k: v / n_tokens for k, v in zip(mean_keys, rest)})
        record.update({"sampling/sampling_logp_difference/max": extremes[0],
                       "sampling/importance_sampling_ratio/max": extremes[4],
                       "sampling/importance_sampling_ratio/min": -extremes[5]})
        if r.sampling is not None:
            # this rank's rounds; the groups kept and the fill are the same on every rank
            record.update({f"dynamic_sampling/{k}": v for k, v in r.sampling.items()})
        return record

    def fit(self) -> dict:
        cfg = self.config
        started = time.perf_counter()
        pbar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.is_main),
                    desc=cfg.advantage if cfg.advantage != "gae" else "ppo", dynamic_ncols=True)
        record, history = {}, []
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                history.append(record)
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    self.logger.log({"kind": "ppo", "step": self.step, **record})
                pbar.update(1)
                pbar.set_postfix_str(f"reward {record['reward']:.3f} kl {record['kl']:.4f}", refresh=False)
                if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                    self.save()
            if self._saved_step != self.step:
                self.save()
            # the trained policy with its full weights (under fsdp gathered onto rank 0's CPU: every process
            # takes part, before a process group this trainer owns is closed; None on the other ranks)
            self.final_policy = full_copy(self.policy)
        finally:
            pbar.close()
            self.logger.flush()
            if self._owns_dist:
                self.dist.close()
        return {"step": self.step, "reward": record.get("reward"), "kl": record.get("kl"),
                "kl_per_sequence": record.get("kl_per_sequence"), "kl_coef": self.kl_coef,
                "response_length": record.get("completions/mean_length"),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "seconds": round(time.perf_counter() - started, 1)}
