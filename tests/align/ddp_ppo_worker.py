"""Run by test_ddp.py under `torchrun --nproc_per_node=2`: PPO and GRPO on a tiny GPT, recording what each rank
drew and holds after every step.

usage: ddp_ppo_worker.py OUT_DIR fresh|resume
fresh: one process group shared by every run: "ppo" (3 steps, a checkpoint after each), "half" (the same run
stopped after 2 steps), "head" (a value head instead of a separate critic) and "grpo" (each rank builds its policy
from a different seed, as a script seeding torch by rank would: the trainer must start every rank from rank 0's).
"grpo_batch" and "reinforce_pp" (one step of the estimators that normalise over the whole batch). "grpo_fsdp" and
"ppo_fsdp" are "grpo" and "half" with the models sharded (parallel="fsdp"), "ppo_fsdp_half" its first step alone,
then "ppo_fsdp_resumed" continues it to 2 steps from its sharded checkpoint; "head_fsdp", "head_fsdp_half" and
"head_fsdp_resumed" the same with "head" sharded.
resume: "half" continued to 3 steps from its checkpoint, the trainer joining the process group itself (as the CLI).
Each rank writes OUT_DIR/{run}.rank{r}.pt; the runs' own files go to OUT_DIR/{run}/."""
import os
import sys

import torch
from torch.distributed.tensor import DTensor

from fastllm.model import GPT, GPTConfig
from fastllm.train.distributed import init_distributed
from fastllm.train.rl import PPOConfig, PPOTrainer

# GRPO under fsdp is compared with ddp over a whole curve; at BASE's lr (1e-2) the two reduction orders' rounding
# grew to 8e-4 relative on the grad norm by step 20, at 3e-3 it stays near fp32 rounding
GRPO_STEPS, GRPO_LR = 20, 3e-3
PROMPTS = [[2 + i % 12] * (1 + i // 12) for i in range(36)]  # all distinct: a rollout's prompts name its draws
TIMINGS = ("rollout_s", "update_s", "update_tokens_per_s")  # wall-clock, legitimately different per rank
BASE = dict(batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=3, lr=1e-2, critic_lr=1e-2, kl_coef=0.01,
            kl_target=0.5, kl_horizon=100, checkpoint_interval=1, keep_checkpoints=3, progress=False, plot=False,
            seed=3, device="cpu")


def tiny_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig.gpt2_style(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=32))


def bandit_reward(prompt, response):
    # Half the vocabulary pays: a batch of 8 rollouts all paid alike (zero advantages, a step that cannot train
    # and fails the tests' "it trained" check) is then a 1-in-128 draw, not the 1-in-10 of a quarter
    return float(response[0] < 8)


class RecordingPPO(PPOTrainer):
    """Keeps, per step, the prompt indices this rank drew, its trained parameters after the step and its record."""

    def __init__(self, *args, **kw):
        self.drawn, self.after_step, self.records, self.rollouts = [], [], [], []
        super().__init__(*args, **kw)

    def trained_params(self) -> dict:
        """Each trained model's full parameters, flattened (gathered from every rank's shards under fsdp)."""
        modules = {"policy": self.policy, "critic": self.critic, "value_head": self.value_head}
        full = lambda p: p.full_tensor() if isinstance(p, DTensor) else p  # noqa: E731
        return {name: torch.cat([full(p).detach().flatten() for p in m.parameters()]).clone()
                for name, m in modules.items() if m is not None}

    def rollout(self):
        r = super().rollout()
        self.drawn.append(sorted({PROMPTS.index(p) for p in r.prompts}))
        self.rollouts.append({"scores": r.scores.clone(), "advantages": [a.clone() for a in r.advantages],
                              "responses": [list(x) for x in r.responses]})
        return r

    def train_step(self):
        record = super().train_step()
        self.records.append({k: v for k, v in record.items() if k not in TIMINGS})
        self.after_step.append(self.trained_params())
        return record


def graded_reward(prompt, response):
    """Many distinct values: the ranks' batches then have different means and stds."""
    return response[0] / 16 + response[-1] / 256


def run(out_dir, name, *, dist=None, seed=0, run_dir=None, reward_fn=bandit_reward, **kw):
    cfg = PPOConfig(out_dir=os.path.join(out_dir, run_dir or name), **{**BASE, **kw})
    trainer = RecordingPPO(tiny_gpt(seed), cfg, PROMPTS, reward_fn=reward_fn, dist=dist)
    initial = trainer.trained_params()
    summary = {k: v for k, v in trainer.fit().items() if k not in ("checkpoint", "seconds")}  # run-specific
    final = trainer.final_policy  # the full weights, on rank 0 only under fsdp
    final = torch.cat([p.detach().flatten() for p in final.parameters()]) if final is not None else None
    torch.save({"initial": initial, "drawn": trainer.drawn, "after_step": trainer.after_step, "final": final,
                "records": trainer.records, "summary": summary, "rollouts": trainer.rollouts,
                "world_size": trainer.dist.world_size},
               os.path.join(out_dir, f"{name}.rank{trainer.dist.rank}.pt"))


def main(out_dir, mode):
    torch.set_num_threads(1)
    if mode == "resume":
        run(out_dir, "resumed", run_dir="half", steps=3, resume=True)
        return
    dist = init_distributed("cpu")
    try:
        run(out_dir, "ppo", dist=dist, steps=3)
        run(out_dir, "half", dist=dist, steps=2)
        run(out_dir, "head", dist=dist, steps=2, critic="head")
        run(out_dir, "grpo", dist=dist, seed=dist.rank, steps=GRPO_STEPS, advantage="grpo", group_size=2,
            checkpoint_interval=10, lr=GRPO_LR)
        # the same runs with the policy, critic and reference sharded (FSDP2)
        run(out_dir, "grpo_fsdp", dist=dist, seed=dist.rank, steps=GRPO_STEPS, advantage="grpo", group_size=2,
            checkpoint_interval=10, lr=GRPO_LR, parallel="fsdp")
        run(out_dir, "ppo_fsdp", dist=dist, steps=2, parallel="fsdp")
        run(out_dir, "ppo_fsdp_half", dist=dist, steps=1, parallel="fsdp")
        # resumed in this process group: a second init_process_group in one process can hang in its rendezvous
        run(out_dir, "ppo_fsdp_resumed", dist=dist, run_dir="ppo_fsdp_half", steps=2, resume=True, parallel="fsdp")
        # the value head sharded beside the policy, sharing its optimizer; resumed as above
        run(out_dir, "head_fsdp", dist=dist, steps=2, critic="head", parallel="fsdp")
        run(out_dir, "head_fsdp_half", dist=dist, steps=1, critic="head", parallel="fsdp")
        run(out_dir, "head_fsdp_resumed", dist=dist, run_dir="head_fsdp_half", steps=2, resume=True, critic="head",
            parallel="fsdp")
        # the estimators that normalise over the batch: one step each, their advantages checked by the test
        for name, advantage in (("grpo_batch", "grpo"), ("reinforce_pp", "reinforce_pp")):
            run(out_dir, name, dist=dist, steps=1, advantage=advantage, group_size=2, scale_rewards="batch",
                checkpoint_interval=0, reward_fn=graded_reward)
    finally:
        dist.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
