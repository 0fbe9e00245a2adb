"""Norm family: LayerNorm and RMSNorm, forward and backward, with an optional fused residual add.

One kernel pair serves both norms: IS_RMS (constexpr) drops the centring, so mean := 0 and the mean(g) term
of the backward vanish; every other line is shared. With a residual, h = x + residual is rounded to x's dtype,
stored as residual_out, and that rounded row is what gets normalized (so normed == norm(residual_out)).

Forward: one program per row. A row of up to MAX_FUSED_BLOCK elements is held in registers (SINGLE_CHUNK)
and read from DRAM once; longer rows are walked in BLOCK-wide chunks three times (sum, centred sum of
squares, output), the re-reads mostly hitting L2. The LayerNorm variance is the corrected two-pass formula,
var = mean(d^2) - mean(d)^2 with d = h - mean(h), and mean(h) += mean(d): exact for constant rows, and precise
for x = 1e4 + noise where one-pass E[x^2] - E[x]^2 cancels every significant bit in fp32. The forward saves
mean and rstd (fp32 per row) for the backward.

Backward, with xhat = (h - mean) * rstd and g = dy * (offset + weight):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ d residual_out),   dweight = sum_rows dy * xhat,
    dbias = sum_rows dy.
A fixed grid of programs each takes a contiguous block of rows, computes dx row by row, and accumulates its
rows' dweight/dbias in fp32: in registers for single-chunk rows, in its own row of the partial buffer for
longer ones (read-modify-write by the one program that owns it). The launcher sums the (programs, cols)
partial buffer over programs with torch, in a fixed order: the same bits on every run, no atomics.

Memory traffic for N rows of n columns (elements of x's dtype):
    forward:  read N*n (2N*n with residual), write N*n (2N*n with residual), write 2N fp32 statistics
    backward: read 2N*n (3N*n with d residual_out), write N*n, plus programs * n fp32 partials per gradient
Rows longer than MAX_FUSED_BLOCK add L2 re-reads (forward: 2 more reads; backward: 1 more, plus the partials).

Measured on an H200 (fp32, kernels alone): forward 16384 x 4096 in 135 us (3.97 TB/s, at copy bandwidth);
backward kernel with both parameter gradients 8192 x 1024 in 33 us and 16384 x 4096 in 207 us (3.9 TB/s;
243 us with the partial-row sums).

Launchers mirror csrc/fastllm.h (same names and semantics) and take torch tensors; fastllm.ops does the
autograd and the dispatch.
"""
import functools

import torch
import triton
import triton.language as tl

from .utils import AotSpec, block_size, block_sizes, num_warps

# The longest row kept in registers: 8192 fp32 over 16 warps is 16 values per thread per live tensor, which
# leaves room for the backward's five (h, dy, scale, dweight and dbias accumulators) without spilling when the
# row length is a multiple of 16 (vectorised loads). Rows of another length need more registers for their
# addresses and masks: the backward with every option on spilled 150-280 B of stack at 8192 (sm_80 and
# sm_90), so for them it keeps rows of up to 4096 whole. Longer rows are walked in 4096-wide chunks: with
# 8192-wide chunks, ptxas kept some variants at 64 (16 warps) or 32 (32 warps) registers and spilled a few
# bytes. Per-configuration registers: bench/RESULTS.md, gpu-resources section.
MAX_FUSED_BLOCK = 8192
UNALIGNED_BACKWARD_MAX_FUSED_BLOCK = 4096
LOOP_BLOCK = 4096
# Programs of the backward when running in the interpreter (no SMs to count). Any fixed number is
# deterministic; a small one keeps the interpreter's per-program Python overhead down.
INTERPRETER_PROGRAMS = 4


@triton.jit
def _round_to(value, dtype: tl.constexpr):
    """fp32 `value` rounded to `dtype` (round to nearest even).

    For bf16 the rounding is spelled out in integer ops. The GPU's cvt.rn does the same in one instruction,
    but TRITON_INTERPRET, where these kernels are tested, truncates instead, and a truncated x + residual
    shifts every statistic derived from it; in a memory-bound kernel the extra integer ops are free.
    """
    if dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)  # carries into bit 16 iff the dropped half is > 0.5 ulp, or = and odd
        value = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)  # exactly representable: the cast is exact
    return value.to(dtype)


@triton.jit
def _input_chunk(
    x_row,  # first element of a row of x
    residual_row,  # same row of residual; unused unless HAS_RESIDUAL
    residual_out_row,  # same row of residual_out; unused unless STORE_RESIDUAL_OUT
    cols,
    in_row,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
):
    """h = x (+ residual, rounded to x's dtype) at `cols`, as fp32; 0 past the row end."""
    h = tl.load(x_row + cols, mask=in_row, other=0.0)
    if HAS_RESIDUAL:
        summed = h.to(tl.float32) + tl.load(residual_row + cols, mask=in_row, other=0.0).to(tl.float32)
        h = _round_to(summed, x_row.dtype.element_ty)  # round like torch's x + residual does
        if STORE_RESIDUAL_OUT:
            tl.store(residual_out_row + cols, h, mask=in_row)
    return h.to(tl.float32)


@triton.jit
def _scale_chunk(weight_ptr, cols, in_row, offset, HAS_WEIGHT: tl.constexpr):
    """offset + weight at `cols` as fp32 (1 without a weight; 0 past the row end)."""
    if HAS_WEIGHT:
        return offset + tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    return tl.where(in_row, 1.0, 0.0)


@triton.jit
def _store_output_chunk(y_row, h, mean, rstd, weight_ptr, bias_ptr, cols, in_row, offset,
                        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (h - mean) * rstd * _scale_chunk(weight_ptr, cols, in_row, offset, HAS_WEIGHT)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(y_row + cols, _round_to(y, y_row.dtype.element_ty), mask=in_row)


# forward: read N*n (2N*n with residual); write N*n (2N*n with residual) and 2N fp32.
@triton.jit
def _norm_forward_kernel(
    x_ptr,  # (rows, n_cols) input
    residual_ptr,  # (rows, n_cols) added to x before normalizing; unused unless HAS_RESIDUAL
    residual_out_ptr,  # (rows, n_cols) out: x + residual in x's dtype; unused unless HAS_RESIDUAL
    weight_ptr,  # (n_cols,) the scale is offset + weight; unused unless HAS_WEIGHT
    bias_ptr,  # (n_cols,); unused unless HAS_BIAS
    y_ptr,  # (rows, n_cols) out, x's dtype
    mean_ptr,  # (rows,) fp32 out; unused when IS_RMS
    rstd_ptr,  # (rows,) fp32 out: 1 / sqrt(variance + eps), the mean square for RMSNorm
    n_cols,
    eps,
    offset,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # n_cols <= BLOCK: keep the row in registers and read it once
):
    row = tl.program_id(0).to(tl.int64)  # row * n_cols overflows int32 for (256k, 16k) activations
    x_row = x_ptr + row * n_cols
    residual_row = residual_ptr + row * n_cols
    residual_out_row = residual_out_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_CHUNK:
        in_row = offs < n_cols
        h = _input_chunk(x_row, residual_row, residual_out_row, offs, in_row, HAS_RESIDUAL, True)
        if IS_RMS:
            mean = 0.0
            variance = tl.sum(h * h, 0) / n_cols
        else:
            mean = tl.sum(h, 0) / n_cols
            d = tl.where(in_row, h - mean, 0.0)
            correction = tl.sum(d, 0) / n_cols
            variance = tl.maximum(tl.sum(d * d, 0) / n_cols - correction * correction, 0.0)
            mean += correction
    else:
        # Per-lane partial sums, reduced once after each loop.
        partial = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            h = _input_chunk(x_row, residual_row, residual_out_row, cols, in_row, HAS_RESIDUAL, True)
            if IS_RMS:
                partial += h * h
            else:
                partial += h
        if IS_RMS:
            mean = 0.0
            variance = tl.sum(partial, 0) / n_cols
        else:
            mean = tl.sum(partial, 0) / n_cols
            sum_d = tl.zeros([BLOCK], tl.float32)
            sum_d2 = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                in_row = cols < n_cols
                h = _input_chunk(x_row, residual_row, residual_out_row, cols, in_row, HAS_RESIDUAL, False)
                d = tl.where(in_row, h - mean, 0.0)
                sum_d += d
                sum_d2 += d * d
            correction = tl.sum(sum_d, 0) / n_cols
            variance = tl.maximum(tl.sum(sum_d2, 0) / n_cols - correction * correction, 0.0)
            mean += correction
    rstd = 1.0 / tl.sqrt(variance + eps)
    if not IS_RMS:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)
    if SINGLE_CHUNK:
        _store_output_chunk(y_row, h, mean, rstd, weight_ptr, bias_ptr, offs, in_row, offset, HAS_WEIGHT, HAS_BIAS)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            h = _input_chunk(x_row, residual_row, residual_out_row, cols, in_row, HAS_RESIDUAL, False)
            _store_output_chunk(y_row, h, mean, rstd, weight_ptr, bias_ptr, cols, in_row, offset, HAS_WEIGHT,
                                HAS_BIAS)


@triton.jit
def _xhat_and_g(dy_row, h_row, weight_ptr, cols, in_row, mean, rstd, offset, HAS_WEIGHT: tl.constexpr):
    """(dy, xhat, g = dy * scale) at `cols`, fp32; all three are 0 past the row end."""
    dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(tl.float32)
    h = tl.load(h_row + cols, mask=in_row, other=0.0).to(tl.float32)
    xhat = tl.where(in_row, (h - mean) * rstd, 0.0)
    return dy, xhat, dy * _scale_chunk(weight_ptr, cols, in_row, offset, HAS_WEIGHT)


@triton.jit
def _store_dx_chunk(dx_row, d_residual_out_row, dy, xhat, g, mean_g, mean_g_xhat, rstd, cols, in_row,
                    HAS_D_RESIDUAL: tl.constexpr):
    dx = (g - mean_g - xhat * mean_g_xhat) * rstd
    if HAS_D_RESIDUAL:
        dx += tl.load(d_residual_out_row + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(dx_row + cols, _round_to(dx, dx_row.dtype.element_ty), mask=in_row)


# backward: read 2N*n (3N*n with d residual_out) and 2N fp32; write N*n and programs * n fp32 per gradient.
@triton.jit
def _norm_backward_kernel(
    dy_ptr,  # (rows, n_cols) gradient of the normalized output
    d_residual_out_ptr,  # (rows, n_cols) gradient of residual_out, added to dx; unused unless HAS_D_RESIDUAL
    h_ptr,  # (rows, n_cols) the normalized input: x, or residual_out
    weight_ptr,  # (n_cols,); unused unless HAS_WEIGHT
    mean_ptr,  # (rows,) fp32 from the forward; unused when IS_RMS
    rstd_ptr,  # (rows,) fp32 from the forward
    dx_ptr,  # (rows, n_cols) out, h's dtype
    dweight_partial_ptr,  # (programs, n_cols) fp32 out: this program's sum of dy * xhat; unused unless WEIGHT_GRAD
    dbias_partial_ptr,  # (programs, n_cols) fp32 out: this program's sum of dy; unused unless BIAS_GRAD
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    BLOCK: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_D_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,  # n_cols <= BLOCK: rows and gradient accumulators live in registers
):
    program = tl.program_id(0).to(tl.int64)  # int64 rows: row * n_cols overflows int32 for large inputs
    row_start = program * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dweight_partial_row = dweight_partial_ptr + program * n_cols
    dbias_partial_row = dbias_partial_ptr + program * n_cols
    offs = tl.arange(0, BLOCK)
    # Loop-carried accumulators of the single-chunk path (dead code otherwise).
    dweight_acc = tl.zeros([BLOCK], tl.float32)
    dbias_acc = tl.zeros([BLOCK], tl.float32)
    for row in range(row_start, row_end):
        dy_row = dy_ptr + row * n_cols
        h_row = h_ptr + row * n_cols
        dx_row = dx_ptr + row * n_cols
        d_residual_out_row = d_residual_out_ptr + row * n_cols
        rstd = tl.load(rstd_ptr + row)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(mean_ptr + row)
        if SINGLE_CHUNK:
            in_row = offs < n_cols
            dy, xhat, g = _xhat_and_g(dy_row, h_row, weight_ptr, offs, in_row, mean, rstd, offset, HAS_WEIGHT)
            mean_g_xhat = tl.sum(g * xhat, 0) / n_cols
            mean_g = 0.0 if IS_RMS else tl.sum(g, 0) / n_cols
            _store_dx_chunk(dx_row, d_residual_out_row, dy, xhat, g, mean_g, mean_g_xhat, rstd, offs, in_row,
                            HAS_D_RESIDUAL)
            if WEIGHT_GRAD:
                dweight_acc += dy * xhat
            if BIAS_GRAD:
                dbias_acc += dy
        else:
            sum_g = tl.zeros([BLOCK], tl.float32)
            sum_g_xhat = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                in_row = cols < n_cols
                dy, xhat, g = _xhat_and_g(dy_row, h_row, weight_ptr, cols, in_row, mean, rstd, offset, HAS_WEIGHT)
                sum_g += g
                sum_g_xhat += g * xhat
            mean_g_xhat = tl.sum(sum_g_xhat, 0) / n_cols
            mean_g = 0.0 if IS_RMS else tl.sum(sum_g, 0) / n_cols
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                in_row = cols < n_cols
                dy, xhat, g = _xhat_and_g(dy_row, h_row, weight_ptr, cols, in_row, mean, rstd, offset, HAS_WEIGHT)
                _store_dx_chunk(dx_row, d_residual_out_row, dy, xhat, g, mean_g, mean_g_xhat, rstd, cols, in_row,
                                HAS_D_RESIDUAL)
                # This program's own partial row (zeroed by the launcher), touched by no other program; the
                # same offsets in the same layout make each lane reread what it wrote.
                if WEIGHT_GRAD:
                    partial = tl.load(dweight_partial_row + cols, mask=in_row, other=0.0)
                    tl.store(dweight_partial_row + cols, partial + dy * xhat, mask=in_row)
                if BIAS_GRAD:
                    partial = tl.load(dbias_partial_row + cols, mask=in_row, other=0.0)
                    tl.store(dbias_partial_row + cols, partial + dy, mask=in_row)
    if SINGLE_CHUNK:
        in_row = offs < n_cols
        if WEIGHT_GRAD:
            tl.store(dweight_partial_row + offs, dweight_acc, mask=in_row)
        if BIAS_GRAD:
            tl.store(dbias_partial_row + offs, dbias_acc, mask=in_row)


def _check_rows(name, t):
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D (rows, cols) tensor; got shape {tuple(t.shape)} "
                         f"with strides {t.stride()}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")


def _check_like(name, t, like, like_name):
    _check_rows(name, t)
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match {like_name} ({tuple(like.shape)} {like.dtype} on {like.device}); "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _check_parameter(name, p, x):
    if p is None:
        return
    if p.shape != (x.shape[1],) or p.dtype not in (x.dtype, torch.float32) or p.device != x.device:
        raise ValueError(f"{name} must be a ({x.shape[1]},) tensor of x's dtype {x.dtype} or float32 on "
                         f"{x.device}; got {tuple(p.shape)} {p.dtype} on {p.device}")


def _check_row_stat(name, t, rows):
    if t.shape != (rows,) or t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous ({rows},) float32 tensor; got {tuple(t.shape)} {t.dtype}")


def _absent(like):
    # Placeholder for a pointer argument that a constexpr flag keeps the kernel from touching.
    return torch.empty(0, dtype=like.dtype, device=like.device)


def _row_block(cols, max_fused_block):
    """(BLOCK, SINGLE_CHUNK): the whole row if it has at most `max_fused_block` elements, else LOOP_BLOCK chunks."""
    if cols <= max_fused_block:
        return block_size(cols, max_block=max_fused_block), True
    return LOOP_BLOCK, False


def _launch_config(cols):
    """(BLOCK, SINGLE_CHUNK, num_warps) of the forward for rows of `cols` elements."""
    block, single_chunk = _row_block(cols, MAX_FUSED_BLOCK)
    return block, single_chunk, num_warps(block)


def _backward_launch_config(rows, cols, device):
    """(BLOCK, SINGLE_CHUNK, num_warps, programs) of the backward.

    Each program walks its rows one after another, so its load latency is hidden only by other programs on
    the same SM: smaller programs (<= 16 row elements per thread, at least 4 warps from a 1024 block) and
    32 warps' worth of them per SM. Measured on an H200, fp32 dx + dweight + dbias: 8192 x 1024 took 38 us
    at 4 warps x 4 programs per SM and 33 us (3.0 TB/s) at 4 x 8; 16384 x 4096 took 261 us at 16 x 1 and
    207 us (3.9 TB/s) at 8 x 4. The count depends only on the shape and the device, so the summation order
    of the parameter gradients is fixed.
    """
    # The JIT specialises a row length that is a multiple of 16 (vectorised loads); other lengths take more
    # registers (see UNALIGNED_BACKWARD_MAX_FUSED_BLOCK).
    block, single_chunk = _row_block(cols, MAX_FUSED_BLOCK if cols % 16 == 0 else UNALIGNED_BACKWARD_MAX_FUSED_BLOCK)
    warps = _backward_warps(block)
    if device.type == "cuda":
        wanted = _multiprocessor_count(device.index) * max(1, 32 // warps)
    else:
        wanted = INTERPRETER_PROGRAMS
    return block, single_chunk, warps, max(1, min(rows, wanted))


def _backward_warps(block):
    return min(num_warps(block), max(4, block // 512))


@functools.cache
def _multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def norm_forward(x, residual, weight, bias, eps, offset, rms):
    """LayerNorm (or RMSNorm when `rms`) over the last dim of x: (rows, cols), with an optional residual add.

    h = x (+ residual, rounded to x's dtype); y = (h - mean) * rstd * (offset + weight) + bias, mean = 0 for
    RMSNorm; a missing weight scales by 1 and a missing bias adds 0. weight/bias: (cols,) of x's dtype or
    float32. Returns (y, residual_out, mean, rstd): y and residual_out (= h; empty without residual) in x's
    dtype, mean (empty for RMSNorm) and rstd fp32 of shape (rows,).
    """
    _check_rows("x", x)
    if residual is not None:
        _check_like("residual", residual, x, "x")
    _check_parameter("weight", weight, x)
    _check_parameter("bias", bias, x)
    rows, cols = x.shape
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else _absent(x)
    stat = dict(dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms else rows, **stat)
    rstd = torch.empty(rows, **stat)
    if rows and cols:
        block, single_chunk, warps = _launch_config(cols)
        _norm_forward_kernel[(rows,)](
            x, residual if residual is not None else _absent(x), residual_out,
            weight if weight is not None else _absent(x), bias if bias is not None else _absent(x),
            y, mean, rstd, cols, float(eps), float(offset),
            BLOCK=block, IS_RMS=bool(rms), HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, SINGLE_CHUNK=single_chunk, num_warps=warps)
    return y, residual_out, mean, rstd


def norm_backward(dy, d_residual_out, h, weight, mean, rstd, offset, rms, want_weight_grad, want_bias_grad):
    """Gradients of norm_forward: dy (and d_residual_out, added to dx) given h = the normalized input.

    Returns (dx, dweight, dbias): dx in h's dtype; dweight and dbias fp32 (cols,), empty unless wanted,
    reduced over a fixed number of per-program partial rows in a fixed order (identical bits every run).
    """
    _check_rows("h", h)
    _check_like("dy", dy, h, "h")
    if d_residual_out is not None:
        _check_like("d_residual_out", d_residual_out, h, "h")
    _check_parameter("weight", weight, h)
    if want_weight_grad and weight is None:
        raise ValueError("want_weight_grad needs the weight")
    rows, cols = h.shape
    if not rms:
        _check_row_stat("mean", mean, rows)
    _check_row_stat("rstd", rstd, rows)
    dx = torch.empty_like(h)
    grad = dict(dtype=torch.float32, device=h.device)
    if not (rows and cols):
        return dx, torch.zeros(cols if want_weight_grad else 0, **grad), torch.zeros(cols if want_bias_grad else 0,
                                                                                     **grad)
    block, single_chunk, warps, programs = _backward_launch_config(rows, cols, h.device)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)  # no program without rows
    # Single-chunk programs store their whole partial row once; looping ones accumulate into it.
    allocate = torch.empty if single_chunk else torch.zeros
    dweight_partial = allocate((programs, cols) if want_weight_grad else (0,), **grad)
    dbias_partial = allocate((programs, cols) if want_bias_grad else (0,), **grad)
    _norm_backward_kernel[(programs,)](
        dy, d_residual_out if d_residual_out is not None else _absent(h), h,
        weight if weight is not None else _absent(h), mean, rstd, dx, dweight_partial, dbias_partial,
        rows, cols, rows_per_program, float(offset),
        BLOCK=block, IS_RMS=bool(rms), HAS_D_RESIDUAL=d_residual_out is not None, HAS_WEIGHT=weight is not None,
        WEIGHT_GRAD=bool(want_weight_grad), BIAS_GRAD=bool(want_bias_grad), SINGLE_CHUNK=single_chunk,
        num_warps=warps)
    # torch's sum over dim 0 of a fixed-shape tensor reduces in a fixed order: deterministic.
    dweight = dweight_partial.sum(0) if want_weight_grad else dweight_partial
    dbias = dbias_partial.sum(0) if want_bias_grad else dbias_partial
    return dx, dweight, dbias


def aot_specs():
    """Every configuration class the launchers above can compile, for tests/test_aot_compile.py.

    In every activation/weight dtype pairing: both norms, single-chunk (at the largest block) and looping (at
    LOOP_BLOCK), with every optional input and gradient on and with all of them off, as the JIT specialises
    them for aligned tensors and a row length that is a multiple of 16 (8192, 16384); then, in every
    activation dtype with all options on and an odd row length, every single-chunk block the launchers can
    pick (the backward's stop at UNALIGNED_BACKWARD_MAX_FUSED_BLOCK) and the looping path.
    """
    pairs = (("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"))
    specs = []

    def signatures(dt, wt):
        forward = {"x_ptr": f"*{dt}", "residual_ptr": f"*{dt}", "residual_out_ptr": f"*{dt}", "weight_ptr": f"*{wt}",
                   "bias_ptr": f"*{wt}", "y_ptr": f"*{dt}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                   "n_cols": "i32", "eps": "fp32", "offset": "fp32", "BLOCK": "constexpr", "IS_RMS": "constexpr",
                   "HAS_RESIDUAL": "constexpr", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                   "SINGLE_CHUNK": "constexpr"}
        backward = {"dy_ptr": f"*{dt}", "d_residual_out_ptr": f"*{dt}", "h_ptr": f"*{dt}", "weight_ptr": f"*{wt}",
                    "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": f"*{dt}", "dweight_partial_ptr": "*fp32",
                    "dbias_partial_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
                    "offset": "fp32", "BLOCK": "constexpr", "IS_RMS": "constexpr", "HAS_D_RESIDUAL": "constexpr",
                    "HAS_WEIGHT": "constexpr", "WEIGHT_GRAD": "constexpr", "BIAS_GRAD": "constexpr",
                    "SINGLE_CHUNK": "constexpr"}
        return ((_norm_forward_kernel, forward, ("HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS")),
                (_norm_backward_kernel, backward, ("HAS_D_RESIDUAL", "HAS_WEIGHT", "WEIGHT_GRAD", "BIAS_GRAD")))

    def add(kernel, signature, constexprs, block, aligned):
        divisible = tuple(n for n, t in signature.items() if t.startswith("*"))
        warps = _backward_warps(block) if kernel is _norm_backward_kernel else num_warps(block)
        specs.append(AotSpec(kernel, signature, dict(constexprs, BLOCK=block), warps,
                             divisible + ("n_cols",) if aligned else divisible))

    for dt, wt in pairs:
        for kernel, signature, options in signatures(dt, wt):
            for rms in (False, True):
                for single_chunk in (False, True):
                    for on in (False, True):
                        flags = dict.fromkeys(options, on)
                        if "HAS_BIAS" in flags:
                            flags["HAS_BIAS"] = on and not rms  # RMSNorm has no bias
                        add(kernel, signature, dict(flags, IS_RMS=rms, SINGLE_CHUNK=single_chunk),
                            MAX_FUSED_BLOCK if single_chunk else LOOP_BLOCK, aligned=True)
    for dt in ("fp32", "fp16", "bf16"):
        for kernel, signature, options in signatures(dt, dt):
            all_on = dict(dict.fromkeys(options, True), IS_RMS=False)
            longest = UNALIGNED_BACKWARD_MAX_FUSED_BLOCK if kernel is _norm_backward_kernel else MAX_FUSED_BLOCK
            for block in block_sizes(max_block=longest):
                add(kernel, signature, dict(all_on, SINGLE_CHUNK=True), block, aligned=False)
            add(kernel, signature, dict(all_on, SINGLE_CHUNK=False), LOOP_BLOCK, aligned=False)
    return specs
