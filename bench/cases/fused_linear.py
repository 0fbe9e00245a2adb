"""Benchmark cases for the fused linear-head losses (fastllm/ops/fused_linear.py): inputs, eager baselines, FLOPs.

The headline is 8192 tokens x hidden 768 x the GPT-2 vocabulary (50257) in fp32, forward+backward, on the
C++ backend: fastllm targets at most 1/8 of eager's peak memory at the same speed or faster. The eager
baselines materialise the logits: F.linear then log_softmax().gather() (linear_token_logprobs) or
F.cross_entropy (linear_cross_entropy); "torch.compile" is the same code compiled; torch's native peer is
F.linear_cross_entropy with LinearCrossEntropyOptions() (chunked, never holding the logits; per token for
linear_token_logprobs).

Each op runs in fp32 and in bf16 (weights and activations in bf16, as a model loaded in bf16 trains), and the
two heads also under bf16 autocast with fp32 inputs ("_autocast": mixed precision's fp32 master weights).

The issue's grid is tokens {2048, 8192} x hidden {768, 2048} x vocabulary {32000, 50257, 128256}. It runs in
full on CUDA. On a CPU, one eager forward+backward is 6 N H V FLOPs at ~0.1-0.2 TFLOP/s on 2 cores: 10 s at
the headline and 100 s at 8192 x 2048 x 128256, whose eager run also needs ~17 GB for four fp32 copies of the
logits. So the CPU default is the headline plus the cheapest corner of the grid; name another shape with
FASTLLM_BENCH_FUSED_SHAPES="tokens x hidden x vocab,..." (e.g. "8192x2048x128256").
"""
import os

import torch
import torch.nn.functional as F

import fastllm
from bench.harness import Case, Cost, standard_variants

HEADLINE = (8192, 768, 50257)
GRID = [(tokens, hidden, vocab) for tokens in (2048, 8192) for hidden in (768, 2048)
        for vocab in (32000, 50257, 128256)]
CPU_SHAPES = [(2048, 768, 32000), HEADLINE]
QUICK = [(256, 64, 1000)]
SHAPES_VARIABLE = "FASTLLM_BENCH_FUSED_SHAPES"


# ---------------------------------------------------------------------------------------------------------
# Eager PyTorch: what a user writes without fastllm
# ---------------------------------------------------------------------------------------------------------
def eager_linear_token_logprobs(hidden, weight, labels):
    logprobs = torch.log_softmax(F.linear(hidden, weight).float(), -1)
    return logprobs.gather(-1, labels[:, None]).squeeze(-1)


def eager_linear_cross_entropy(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels)


def eager_linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask):
    # fastllm's plain-PyTorch reference: F.linear, log_softmax, gather, entropy, then the clipped objective
    return fastllm.ops.fused_linear.reference.linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages,
                                                              mask).loss


# torch's own chunked head (torch 2.13): F.linear_cross_entropy with LinearCrossEntropyOptions() never holds
# the whole logits. Per token (reduction="none") it is minus the token's log-prob.
def chunked_linear_token_logprobs(hidden, weight, labels):
    return -F.linear_cross_entropy(hidden, weight, labels, reduction="none",
                                   options=torch.nn.LinearCrossEntropyOptions())


def chunked_linear_cross_entropy(hidden, weight, labels):
    return F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())


# fastllm.ops is looked up at call time: nothing is imported or built until a case runs.
def fastllm_linear_token_logprobs(hidden, weight, labels):
    return fastllm.ops.linear_token_logprobs(hidden, weight, labels)


def fastllm_linear_cross_entropy(hidden, weight, labels):
    return fastllm.ops.linear_cross_entropy(hidden, weight, labels)


def fastllm_linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask):
    return fastllm.ops.linear_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask).loss


# linear_token_logprobs returns per-token values whose gradient is known only in the backward, so its
# backward recomputes the logits; the two losses know theirs in the forward and do it all in one pass.
# op -> (eager, fastllm, torch's native peer or None)
OPS = {
    "linear_token_logprobs": (eager_linear_token_logprobs, fastllm_linear_token_logprobs,
                              chunked_linear_token_logprobs),
    "linear_cross_entropy": (eager_linear_cross_entropy, fastllm_linear_cross_entropy, chunked_linear_cross_entropy),
    "linear_ppo_loss": (eager_linear_ppo_loss, fastllm_linear_ppo_loss, None),
    # scoring rollouts (PPO's old and reference log-probs): nothing requires grad, so only the forward runs
    "linear_token_logprobs_no_grad": (eager_linear_token_logprobs, fastllm_linear_token_logprobs,
                                      chunked_linear_token_logprobs),
}
NATIVE_PEER = "F.linear_cross_entropy[chunked]"


def under_autocast(fn):
    """fn under bf16 autocast: mixed-precision training's fp32 master weights with bf16 matmuls."""
    def autocast_fn(*args):
        with torch.autocast(args[0].device.type, torch.bfloat16):
            return fn(*args)
    return autocast_fn


# Mixed precision (fp32 inputs, bf16 autocast): listed with dtype bfloat16, the dtype the matmuls run in
AUTOCAST_OPS = {f"{op}_autocast": tuple(under_autocast(fn) for fn in OPS[op])
                for op in ("linear_token_logprobs", "linear_cross_entropy")}
DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# Work: the matmuls dominate. Forward: logits, 2 N H V. Forward+backward: also grad_hidden and grad_weight,
# 6 N H V, the least any implementation does (fastllm's per-token backward recomputes the logits: 8 N H V).
# ---------------------------------------------------------------------------------------------------------
def _flops(tokens, hidden, vocab):
    one_matmul = 2 * tokens * hidden * vocab
    return Cost(forward=one_matmul, forward_backward=3 * one_matmul)


def _inputs(tokens, hidden, vocab, requires_grad=True):
    def make_inputs(device, dtype):
        generator = torch.Generator(device).manual_seed(0)
        hidden_states = torch.randn(tokens, hidden, generator=generator, device=device, dtype=dtype)
        weight = torch.randn(vocab, hidden, generator=generator, device=device, dtype=dtype) * hidden ** -0.5
        labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
        return hidden_states.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), labels
    return make_inputs


def _no_grad_inputs(tokens, hidden, vocab):
    return _inputs(tokens, hidden, vocab, requires_grad=False)


def _ppo_inputs(tokens, hidden, vocab):
    """The head's inputs plus a rollout's: old log-probs near the policy's (ratios around 1, some clipped),
    advantages, and a mask with a tenth of the tokens off (padding)."""
    head_inputs = _inputs(tokens, hidden, vocab)

    def make_inputs(device, dtype):
        hidden_states, weight, labels = head_inputs(device, dtype)
        generator = torch.Generator(device).manual_seed(1)
        with torch.no_grad():
            logprobs = fastllm.ops.fused_linear.reference.linear_token_logprobs(hidden_states, weight, labels)
        old_logprobs = logprobs + 0.2 * torch.randn(tokens, generator=generator, device=device)
        advantages = torch.randn(tokens, generator=generator, device=device)
        mask = (torch.rand(tokens, generator=generator, device=device) > 0.1).float()
        return hidden_states, weight, labels, old_logprobs, advantages, mask
    return make_inputs


INPUTS = {"linear_token_logprobs": _inputs, "linear_cross_entropy": _inputs, "linear_ppo_loss": _ppo_inputs,
          "linear_token_logprobs_no_grad": _no_grad_inputs}


def _shapes(device, quick):
    if quick:
        return QUICK
    if os.environ.get(SHAPES_VARIABLE):
        return [tuple(int(n) for n in shape.split("x")) for shape in os.environ[SHAPES_VARIABLE].split(",")]
    return GRID if device.type == "cuda" else CPU_SHAPES


def _fp32_inputs(tokens, hidden, vocab):
    make_inputs = _inputs(tokens, hidden, vocab)
    return lambda device, dtype: make_inputs(device, torch.float32)


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    runs = [(op, fns, dtype, INPUTS[op]) for op, fns in OPS.items() for dtype in DTYPES]
    runs += [(op, fns, torch.bfloat16, _fp32_inputs) for op, fns in AUTOCAST_OPS.items()]
    result = []
    for op, (eager, fastllm_op, native), dtype, inputs in runs:
        variants = standard_variants(eager, fastllm_op, {NATIVE_PEER: native} if native else None)
        for tokens, hidden, vocab in _shapes(device, quick):
            result.append(Case(op=op, shape=f"{tokens}x{hidden}x{vocab}", dtype=dtype,
                               make_inputs=inputs(tokens, hidden, vocab),
                               variants=variants, flops=_flops(tokens, hidden, vocab)))
    return result
