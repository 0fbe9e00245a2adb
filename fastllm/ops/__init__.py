"""fastllm's functional API: every op runs on the backend chosen by fastllm.backend (torch, triton or cpp)."""
from .attention import attention, attention_decode, attention_varlen
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .softmax import cross_entropy, entropy, log_softmax, softmax, token_logprobs
from .fused_linear import linear_cross_entropy, linear_dpo_loss, linear_ppo_loss, linear_token_logprobs
from .rl import dpo_loss, gae, kl_penalty, ppo_policy_loss, value_loss
from .rl_estimators import (group_advantages, reinforce_pp_advantages, rloo_advantages, rollout_importance_weights,
                            whiten)

__all__ = ["softmax", "log_softmax", "token_logprobs", "entropy", "cross_entropy",
           "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "linear_token_logprobs", "linear_cross_entropy", "linear_ppo_loss", "linear_dpo_loss",
           "ppo_policy_loss", "value_loss", "dpo_loss", "gae", "kl_penalty", "group_advantages", "rloo_advantages",
           "reinforce_pp_advantages", "rollout_importance_weights", "whiten",
           "attention", "attention_varlen", "attention_decode"]
