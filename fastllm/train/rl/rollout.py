"""Rollouts: sampled responses in the update's packed layout, their log-probs, and DAPO's dynamic sampling.

Every sequence runs packed (varlen attention, cu_seqlens): prompts of different lengths are neither left- nor
right-padded, and each sequence's positions start at 0 wherever it sits in the batch. The logits are divided by
the sampling temperature in the rollout and in every recomputation.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from fastllm import ops

from ..parallel import head_weight


@dataclass
class Rollout:
    """One step's sampled sequences; per-token tensors are lists of (R_i,) fp32 tensors, R_i the response length."""
    prompts: list  # list[list[int]]
    responses: list  # list[list[int]], each ending with the stop token unless truncated
    stopped: list  # list[bool]
    scores: torch.Tensor  # (n,) reward at the last token (with the missing-EOS and overlong penalties)
    raw_scores: torch.Tensor  # (n,) reward-model / weighted reward-function output alone
    sample_logprobs: list  # generation's log-probs of the sampled tokens (the rollout engine's, for TIS)
    order: list  # the first epoch's sequence order; minibatches are consecutive slices of it
    reward_parts: dict = None  # name -> (n,) each reward function's own output
    sampling: dict = None  # dynamic sampling's record: rounds, groups seen and kept, batch fill
    old_logprobs: list = None
    ref_logprobs: list = None
    values: list = None
    advantages: list = None
    returns: list = None


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


def response_cu_seqlens(responses, device):
    """cu_seqlens (n + 1,) of the responses' tokens as the update lays them out (labels of pack_responses)."""
    lengths = torch.tensor([0] + [len(r) for r in responses], dtype=torch.int64, device=device)
    return lengths.cumsum(0)


def response_logprobs_from_hidden(hidden, weight, labels, temperature, fused, return_entropy=False):
    """Log-probs (and entropy) of `labels` from hidden states: fused (no logits) or materialised (the baseline)."""
    if fused:
        return ops.linear_token_logprobs(hidden, weight, labels, temperature=temperature,
                                         return_entropy=return_entropy)
    logprobs = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
    out = logprobs.gather(-1, labels[:, None]).squeeze(-1)
    if return_entropy:
        return out, -(logprobs.exp() * logprobs).sum(-1)
    return out


def response_logprobs(model, prompts, responses, temperature=1.0, *, fused=True, return_entropy=False):
    """Per-token log-probs of `responses` given `prompts` under `model` at `temperature` (a (M,) fp32 tensor, in
    sequence order), computed from the hidden states with linear_token_logprobs (no logits)."""
    device = model.lm_head_weight.device
    input_ids, cu, labels, positions = pack_responses(prompts, responses, device)
    hidden = model.hidden_states(input_ids, cu_seqlens=cu)[0, positions]  # (M, C)
    weight = head_weight(model.lm_head_weight)  # after the forward: a sharded model's gathered weight (fsdp)
    return response_logprobs_from_hidden(hidden, weight, labels, temperature, fused, return_entropy)


class PartialBatchError(RuntimeError):
    """Dynamic sampling could not fill the batch within its cap on generation rounds."""


def dynamic_sample(sample_round: Callable, *, groups_wanted: int, group_size: int, max_rounds: int,
                   partial: str = "error", agree: Callable = lambda kept: kept):
    """DAPO's dynamic sampling [Yu et al. 2025, sec. 3.2]: keep only the groups whose rewards are not all equal
    (they carry no GRPO signal), sampling more rounds until `groups_wanted` groups are kept.

    sample_round(round) -> (columns, scores): a dict of per-response lists and the (n,) scores, n a multiple of
    group_size, responses of a group adjacent. Stops after max_rounds rounds; then, short of the target,
    partial="error" raises PartialBatchError and "warn" warns and returns the groups kept (never silently).
    agree(kept) -> the number of groups every process keeps (the minimum over processes, so that all run the
    same number of minibatches). Returns (columns, scores, record) with record = {"rounds", "groups_seen",
    "groups_kept", "fill"}: fill is the share of the wanted groups that were found."""
    columns, scores, seen, rounds = None, [], 0, 0
    kept = 0
    while rounds < max_rounds and kept < groups_wanted:
        round_columns, round_scores = sample_round(rounds)
        rounds += 1
        groups = round_scores.view(-1, group_size)
        keep = (groups.max(dim=1).values != groups.min(dim=1).values).nonzero().flatten().tolist()
        seen += groups.shape[0]
        keep = keep[:groups_wanted - kept]
        rows = [g * group_size + k for g in keep for k in range(group_size)]
        if columns is None:
            columns = {name: [] for name in round_columns}
        for name, values in round_columns.items():
            columns[name].extend(values[i] for i in rows)
        scores.append(round_scores[rows])
        kept += len(keep)
    kept_everywhere = agree(kept)
    if kept_everywhere < groups_wanted:
        message = (f"dynamic sampling kept {kept_everywhere} of the {groups_wanted} groups wanted after "
                   f"{max_rounds} generation rounds ({seen} groups seen here; the others had all-equal rewards)")
        if partial == "error" or kept_everywhere == 0:
            raise PartialBatchError(message + ": raise max_sampling_rounds, or partial_batch='warn' to train on "
                                    "the groups kept")
        warnings.warn(message + "; training on the groups kept", stacklevel=2)
    rows = kept_everywhere * group_size
    columns = {name: values[:rows] for name, values in columns.items()}
    record = {"rounds": rounds, "groups_seen": seen, "groups_kept": kept_everywhere,
              "fill": kept_everywhere / groups_wanted}
    return columns, torch.cat(scores)[:rows], record
