"""Launch settings shared by every kernel file, and the record each file uses to list its compiled configurations."""
from typing import Any, NamedTuple

import triton

MAX_BLOCK = 4096


def block_size(n, max_block=MAX_BLOCK, min_block=16):
    """A power-of-two block that covers `n` elements of a row, capped at `max_block` (longer rows loop)."""
    return max(min_block, min(max_block, triton.next_power_of_2(max(n, 1))))


def block_sizes(max_block=MAX_BLOCK, min_block=16):
    """Every value `block_size` can return, smallest first: what an ahead-of-time check has to cover."""
    return [1 << k for k in range(min_block.bit_length() - 1, max_block.bit_length())]


def num_warps(block):
    """Warps for a row-wise kernel with `block` elements per step: enough lanes to keep loads wide."""
    if block >= 4096:
        return 16
    if block >= 2048:
        return 8
    if block >= 1024:
        return 4
    return 2 if block >= 256 else 1


class AotSpec(NamedTuple):
    """One configuration a launcher can compile, for tests/test_aot_compile.py.

    Each kernels/<family>.py returns a list of these from a module-level `aot_specs()`.
    """

    kernel: Any  # the @triton.jit function
    signature: dict  # every argument name, in order -> Triton type: "*bf16", "*i64", "i32", "fp32", "constexpr"
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    # Arguments the JIT would see as multiples of 16 (16-byte-aligned tensors, ints such as 32000), which
    # switches on vectorised loads: the path most real launches take.
    divisible_by_16: tuple = ()
    num_stages: int = 3  # software-pipelining depth of loops over tiles; 3 is Triton's default for a launch
