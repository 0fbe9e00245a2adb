"""Kept for imports written before the RL stage became the package fastllm.train.rl: the same names, plus the
three helpers whose formulas moved to fastllm.ops (kl_penalty, group_advantages, whiten)."""
from fastllm import ops

from .rl import *  # noqa: F401,F403
from .rl import __all__ as _rl_names

__all__ = [*_rl_names, "group_advantages", "kl_estimate", "whiten"]


def kl_estimate(logprobs, ref_logprobs, estimator="k3"):
    return ops.kl_penalty(logprobs, ref_logprobs, estimator)[0]


def group_advantages(scores, group_size, eps=1e-6):
    return ops.group_advantages(scores, group_size, eps=eps)


def whiten(values, mask, dist=None, eps=1e-8):
    return ops.whiten(values, mask, eps=eps, reduce_sum=dist.all_reduce_sum if dist is not None and dist.enabled
                      else None)
