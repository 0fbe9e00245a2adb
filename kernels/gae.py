"""GAE family: generalised advantage estimation as a reverse scan over time.

One program per block of BLOCK sequences, one sequence per lane, walking time backwards and carrying the next
valid step's value and advantage (formulas in fastllm/ops/rl.py; masked steps output 0 and leave the carry
alone). The recurrence is serial in time, so a program's cost is `steps` dependent iterations whatever BLOCK
is; small blocks give more programs, and each lane's loads are independent of the carry, so they issue ahead
of it. Arithmetic in fp32; outputs are cast to the input dtype on store.

Memory traffic for B sequences of T steps: read 2 B T values + B T mask bytes, write 2 B T values. Along time
the loads are strided by T, so each touches its own sector: fine at RL batch sizes (256 x 1024 is 3 MiB).

The launcher mirrors csrc/fastllm.h (same name and semantics); fastllm.ops.rl does the dispatch.
"""
import torch
import triton
import triton.language as tl

from .utils import AotSpec

# Sequences per program: one warp, one sequence per lane.
BLOCK_SEQUENCES = 32
NUM_WARPS = 1


@triton.jit
def _gae_kernel(
    rewards_ptr,  # (batch, steps) rewards
    values_ptr,  # (batch, steps) value estimates, rewards' dtype
    mask_ptr,  # (batch, steps) bool: the step is valid
    advantages_ptr,  # (batch, steps) out, values' dtype
    returns_ptr,  # (batch, steps) out, values' dtype: advantages + values
    n_sequences,
    n_steps,
    gamma,
    gamma_lam,  # gamma * lam
    BLOCK: tl.constexpr,  # sequences per program
):
    sequences = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_batch = sequences < n_sequences
    row = sequences.to(tl.int64) * n_steps  # batch * steps may exceed int32
    next_value = tl.zeros([BLOCK], tl.float32)
    next_advantage = tl.zeros([BLOCK], tl.float32)
    for step in range(0, n_steps):
        offsets = row + (n_steps - 1 - step)
        valid = tl.load(mask_ptr + offsets, mask=in_batch, other=0) != 0
        reward = tl.load(rewards_ptr + offsets, mask=in_batch, other=0.0).to(tl.float32)
        value = tl.load(values_ptr + offsets, mask=in_batch, other=0.0).to(tl.float32)
        advantage = reward + gamma * next_value - value + gamma_lam * next_advantage
        # Selects, not multiplications by the mask: padding may hold NaN, which must not reach the carry.
        advantage = tl.where(valid, advantage, 0.0)
        tl.store(advantages_ptr + offsets, advantage.to(advantages_ptr.dtype.element_ty), mask=in_batch)
        tl.store(returns_ptr + offsets, tl.where(valid, advantage + value, 0.0).to(returns_ptr.dtype.element_ty),
                 mask=in_batch)
        next_value = tl.where(valid, value, next_value)
        next_advantage = tl.where(valid, advantage, next_advantage)


def gae_forward(rewards, values, mask, gamma, lam):
    """(advantages, returns) of contiguous (batch, steps) rewards and values (one float dtype) and a bool mask."""
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if t.dim() != 2 or not t.is_contiguous() or t.shape != values.shape:
            raise ValueError(f"{name} must be a contiguous (batch, steps) tensor of values' shape "
                             f"{tuple(values.shape)}; got shape {tuple(t.shape)} with strides {t.stride()}")
    if rewards.dtype != values.dtype or values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"rewards and values must share a dtype among float32, float16 and bfloat16; got "
                         f"{rewards.dtype} and {values.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool; got {mask.dtype}")
    advantages = torch.empty_like(values)
    returns = torch.empty_like(values)
    batch, steps = values.shape
    if batch and steps:
        _gae_kernel[(triton.cdiv(batch, BLOCK_SEQUENCES),)](
            rewards, values, mask, advantages, returns, batch, steps, float(gamma), float(gamma * lam),
            BLOCK=BLOCK_SEQUENCES, num_warps=NUM_WARPS)
    return advantages, returns


def aot_specs():
    """The kernel in every dtype, with aligned tensors and a step count that is a multiple of 16 (1024, the
    common case) and without (odd lengths)."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        signature = {"rewards_ptr": f"*{dt}", "values_ptr": f"*{dt}", "mask_ptr": "*i1",
                     "advantages_ptr": f"*{dt}", "returns_ptr": f"*{dt}", "n_sequences": "i32", "n_steps": "i32",
                     "gamma": "fp32", "gamma_lam": "fp32", "BLOCK": "constexpr"}
        pointers = tuple(name for name, kind in signature.items() if kind.startswith("*"))
        for divisible in (pointers + ("n_steps",), pointers):
            specs.append(AotSpec(_gae_kernel, signature, {"BLOCK": BLOCK_SEQUENCES}, NUM_WARPS, divisible))
    return specs
