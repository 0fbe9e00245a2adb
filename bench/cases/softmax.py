"""Benchmark cases for the softmax family (fastllm/ops/softmax.py): inputs, eager baselines, byte counts.

The headline is 4096 positions x the GPT-2 vocabulary (50257) in fp32: token_logprobs and cross_entropy
forward+backward, where fastllm targets >= 2x (token_logprobs) and >= 1.5x (cross_entropy) over eager with
at most 1/4 of eager's peak memory.
"""
import torch
import torch.nn.functional as F

import fastllm
from bench.harness import Case, Cost, standard_variants

HEADLINE = (4096, 50257)  # GPT-2 vocabulary
SMALL = (1024, 32000)  # Llama-2 vocabulary
QUICK = (64, 1000)
TEMPERATURE = 1.0  # the common case; the eager baselines skip the division at 1, as careful code does

LABEL_BYTES, STAT_BYTES = 8, 4  # int64 label, fp32 per-row result


# ---------------------------------------------------------------------------------------------------------
# Eager PyTorch: what a user writes without fastllm
# ---------------------------------------------------------------------------------------------------------
def _scaled_fp32(logits, temperature):
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def eager_softmax(x):
    return torch.softmax(x, -1)


def eager_log_softmax(x):
    return torch.log_softmax(x, -1)


def eager_token_logprobs(logits, labels):
    logprobs = torch.log_softmax(_scaled_fp32(logits, TEMPERATURE), -1)
    return logprobs.gather(-1, labels[..., None]).squeeze(-1)


def eager_entropy(logits):
    logprobs = torch.log_softmax(_scaled_fp32(logits, TEMPERATURE), -1)
    return -(logprobs.exp() * logprobs).sum(-1)


def eager_cross_entropy(logits, labels):
    return F.cross_entropy(logits, labels)


# fastllm.ops is looked up at call time: nothing is imported or built until a case runs.
def fastllm_softmax(x):
    return fastllm.ops.softmax(x, -1)


def fastllm_log_softmax(x):
    return fastllm.ops.log_softmax(x, -1)


def fastllm_token_logprobs(logits, labels):
    return fastllm.ops.token_logprobs(logits, labels, temperature=TEMPERATURE)


def fastllm_entropy(logits):
    return fastllm.ops.entropy(logits, temperature=TEMPERATURE)


def fastllm_cross_entropy(logits, labels):
    return fastllm.ops.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------------------
# Minimum traffic. L = the logits' bytes, R = rows.
# Elementwise outputs (softmax, log_softmax): forward reads x and writes y (2L); backward reads y and dy and
# writes dx (3L). Per-row results (the rest): forward reads the logits once (L); backward reads them again
# and writes the gradient (2L): a gradient made in the forward would need a second pass to apply a
# cotangent that arrives later, so 3L is the least for separate passes.
# ---------------------------------------------------------------------------------------------------------
def _elementwise_traffic(rows, vocab, dtype):
    logits = rows * vocab * dtype.itemsize
    return Cost(forward=2 * logits, forward_backward=5 * logits)


def _per_row_traffic(row_bytes_forward, row_bytes_backward):
    def traffic(rows, vocab, dtype):
        logits = rows * vocab * dtype.itemsize
        return Cost(forward=logits + rows * row_bytes_forward,
                    forward_backward=3 * logits + rows * (row_bytes_forward + row_bytes_backward))
    return traffic


def _logits_inputs(rows, vocab, with_labels):
    def make_inputs(device, dtype):
        generator = torch.Generator(device).manual_seed(0)
        logits = torch.randn(rows, vocab, generator=generator, device=device, dtype=dtype).requires_grad_()
        if not with_labels:
            return (logits,)
        labels = torch.randint(0, vocab, (rows,), generator=generator, device=device)
        return logits, labels
    return make_inputs


# op -> (eager, fastllm, takes labels, traffic(rows, vocab, dtype))
OPS = {
    "softmax": (eager_softmax, fastllm_softmax, False, _elementwise_traffic),
    "log_softmax": (eager_log_softmax, fastllm_log_softmax, False, _elementwise_traffic),
    # forward: read labels, write log-probs; backward: read labels and the cotangent
    "token_logprobs": (eager_token_logprobs, fastllm_token_logprobs, True,
                       _per_row_traffic(LABEL_BYTES + STAT_BYTES, LABEL_BYTES + STAT_BYTES)),
    # forward: write entropies; backward: read the cotangent
    "entropy": (eager_entropy, fastllm_entropy, False, _per_row_traffic(STAT_BYTES, STAT_BYTES)),
    # forward and backward read the labels; the loss is a scalar
    "cross_entropy": (eager_cross_entropy, fastllm_cross_entropy, True,
                      _per_row_traffic(LABEL_BYTES, LABEL_BYTES)),
}


def _sizes(op, device, quick):
    """(rows, vocab, dtype) to run for `op`: the headline everywhere it matters, bf16 as models emit it."""
    if quick:
        return [(*QUICK, torch.float32), (*QUICK, torch.bfloat16)]
    if device.type == "cuda":
        return [(*HEADLINE, torch.float32), (*HEADLINE, torch.bfloat16), (*SMALL, torch.bfloat16)]
    # A 2-core CPU needs ~2 s for one eager forward+backward at the headline size, so only the two
    # headline ops run there; the rest run at the smaller size.
    small = [(*SMALL, torch.float32), (*SMALL, torch.bfloat16)]
    return [(*HEADLINE, torch.float32), *small] if op in ("token_logprobs", "cross_entropy") else small


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    result = []
    for op, (eager, fastllm_op, with_labels, traffic) in OPS.items():
        for rows, vocab, dtype in _sizes(op, device, quick):
            result.append(Case(op=op, shape=f"{rows}x{vocab}", dtype=dtype,
                               make_inputs=_logits_inputs(rows, vocab, with_labels),
                               variants=standard_variants(eager, fastllm_op),
                               bytes_moved=traffic(rows, vocab, dtype)))
    return result
