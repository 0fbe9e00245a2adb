"""The RL stage (`fastllm ppo`): PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO and DAPO's pieces on one trainer.

    config.py      PPOConfig: every setting (the command line's flags)
    rollout.py     sampling in the packed layout, log-probs, DAPO's dynamic sampling
    rewards.py     weighted reward functions, overlong shaping
    advantages.py  the estimators and the rollout-mismatch (TIS) correction, on fastllm.ops' formulas
    update.py      minibatch losses on the fused linear-head op, the optimizer steps
    trainer.py     PPOTrainer: the step, metrics, checkpoints
    stage.py       ppo() (the Python API), evaluate_policy, the CLI
"""
from .advantages import compute_advantages, pad_right, token_rewards
from .config import ADVANTAGES, PPOConfig
from .rewards import RewardError, RewardFunctions, load_reward_fn, overlong_penalty
from .rollout import (PartialBatchError, Rollout, dynamic_sample, pack_responses, response_logprobs,
                      response_logprobs_from_hidden)
from .stage import add_arguments, evaluate_policy, main, ppo
from .trainer import PPOTrainer
from .update import ValueHead

__all__ = ["ADVANTAGES", "PPOConfig", "PPOTrainer", "PartialBatchError", "RewardError", "RewardFunctions", "Rollout",
           "ValueHead", "add_arguments", "compute_advantages", "dynamic_sample", "evaluate_policy", "load_reward_fn",
           "main", "overlong_penalty", "pack_responses", "pad_right", "ppo", "response_logprobs",
           "response_logprobs_from_hidden", "token_rewards"]
