"""Benchmark cases for generalised advantage estimation (fastllm.ops.gae): inputs, baseline, byte counts.

The headline is 256 sequences x 1024 steps in fp32, right-padded to random lengths: fastllm targets >= 20x
over the Python loop over time (rl.reference.gae, vectorised over the batch, as RL libraries write it).
There is no torch.compile variant: compiling means unrolling the 1024-step loop, minutes of tracing.
"""
import torch

import fastllm
from bench.harness import Case, Cost, Variant
from fastllm.ops.rl import reference

HEADLINE = (256, 1024)
QUICK = (16, 64)
GAMMA, LAM = 1.0, 0.95


def eager_gae(rewards, values, mask):
    return reference.gae(rewards, values, mask, GAMMA, LAM)


def fastllm_gae(rewards, values, mask):
    return fastllm.ops.gae(rewards, values, mask, gamma=GAMMA, lam=LAM)


def _inputs(batch, steps):
    def make_inputs(device, dtype):
        generator = torch.Generator(device).manual_seed(0)
        rewards = torch.randn(batch, steps, generator=generator, device=device, dtype=dtype)
        values = torch.randn(batch, steps, generator=generator, device=device, dtype=dtype)
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator, device=device)
        mask = torch.arange(steps, device=device)[None] < lengths[:, None]
        return rewards, values, mask
    return make_inputs


def _traffic(batch, steps, dtype):
    # read rewards, values and the bool mask; write advantages and returns
    return Cost(forward=batch * steps * (4 * dtype.itemsize + 1))


def cases(device, quick: bool) -> list[Case]:
    batch, steps = QUICK if quick else HEADLINE
    variants = {"eager": Variant(eager_gae), "fastllm[cpp]": Variant(fastllm_gae, backend="cpp"),
                "fastllm[triton]": Variant(fastllm_gae, backend="triton")}
    return [Case(op="gae", shape=f"{batch}x{steps}", dtype=dtype, make_inputs=_inputs(batch, steps),
                 variants=variants, bytes_moved=_traffic(batch, steps, dtype))
            for dtype in (torch.float32, torch.bfloat16)]
