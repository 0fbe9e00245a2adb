"""Softmax family: softmax / log-softmax and the row statistics of temperature-scaled logits.

Every kernel runs one program per row of a contiguous (rows, cols) tensor and walks the row in BLOCK-wide
chunks, so any vocabulary size works and no block ever has to hold a whole row. Row maxima are kept online:
the running sum of exponentials is rescaled whenever the maximum grows. Loads are upcast to fp32, everything
accumulates in fp32, and each output is cast to its dtype once, on store.

Launchers mirror csrc/fastllm.h (same names and semantics) and take torch tensors; fastllm.ops does the
autograd and the dispatch.
"""
import itertools

import torch
import triton
import triton.language as tl

from .utils import MAX_BLOCK, AotSpec, block_size, block_sizes, num_warps


@triton.jit
def _finite_or_zero(m):
    # A row maximum used as a shift: -inf (nothing finite seen yet) becomes 0 so x - shift never computes
    # -inf - (-inf) = NaN; exp(-inf - 0) is then the correct 0.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_row_stats(
    x_row,  # first element of one row of logits
    n_cols,
    inv_temperature,
    BLOCK: tl.constexpr,
    WANT_SUM: tl.constexpr,  # also return sum(z)
    WANT_ENTROPY: tl.constexpr,  # also return sum(exp(z - shift) * (z - shift))
):
    """One read of a row of z = x * inv_temperature.

    Returns (shift, sum_exp, sum_z, sum_exp_dz): shift = max(z) (0 for an all -inf row),
    sum_exp = sum exp(z - shift), sum_exp_dz = sum exp(z - shift) * (z - shift). Keeping the entropy term
    relative to the shift avoids the cancellation of lse - sum(p * z) when logits are large (1e4).
    """
    offs = tl.arange(0, BLOCK)
    row_max = tl.full((), float("-inf"), tl.float32)
    # Per-lane partial sums, reduced once after the loop: no cross-warp reduction per chunk for them, and
    # summation error grows with chunks per lane rather than with the row length.
    sum_exp = tl.zeros([BLOCK], tl.float32)
    sum_z = tl.zeros([BLOCK], tl.float32)
    sum_exp_dz = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        z = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature
        if WANT_SUM:
            sum_z += z  # lanes past the row end hold 0
        z = tl.where(in_row, z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, 0))
        new_shift = _finite_or_zero(new_max)
        rescale = tl.exp(row_max - new_shift)  # in [0, 1]; 0 while the row has been all -inf so far
        e = tl.exp(z - new_shift)
        if WANT_ENTROPY:
            # Moving the shift from old to new adds (old - new) to every earlier (z - shift).
            old_shift = _finite_or_zero(row_max)
            dz = tl.where(e == 0.0, 0.0, z - new_shift)  # p * z is 0 where p is 0, even for z = -inf
            sum_exp_dz = rescale * (sum_exp_dz + (old_shift - new_shift) * sum_exp) + e * dz
        sum_exp = sum_exp * rescale + e
        row_max = new_max
    return _finite_or_zero(row_max), tl.sum(sum_exp, 0), tl.sum(sum_z, 0), tl.sum(sum_exp_dz, 0)


# forward: read N*V once when V <= BLOCK, else twice (the second pass mostly hits L2); write N*V.
@triton.jit
def _softmax_forward_kernel(
    x_ptr,  # (rows, n_cols) input
    y_ptr,  # (rows, n_cols) output, x's dtype
    n_cols,
    BLOCK: tl.constexpr,
    LOG: tl.constexpr,  # write log_softmax instead of softmax
    SINGLE_CHUNK: tl.constexpr,  # n_cols <= BLOCK: keep the row in registers and read it once
):
    row = tl.program_id(0).to(tl.int64)  # row * n_cols overflows int32 for (16k, 256k) logits
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_CHUNK:
        in_row = offs < n_cols
        x = tl.load(x_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
        shifted = x - _finite_or_zero(tl.max(x, 0))
        e = tl.exp(shifted)
        sum_exp = tl.sum(e, 0)
        if LOG:
            y = shifted - tl.log(sum_exp)  # (x - max) - log(sum), not x - lse: exact near the max
        else:
            y = e * (1.0 / sum_exp)
        tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=in_row)
    else:
        shift, sum_exp, _, _ = _online_row_stats(x_row, n_cols, 1.0, BLOCK, False, False)
        log_sum_exp = tl.log(sum_exp)
        inv_sum_exp = 1.0 / sum_exp
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            shifted = tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32) - shift
            if LOG:
                y = shifted - log_sum_exp
            else:
                y = tl.exp(shifted) * inv_sum_exp
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)


# backward, softmax: read 2*N*V (4*N*V when V > BLOCK), write N*V.
#           log_softmax: read 2*N*V (3*N*V when V > BLOCK: the first pass needs only dy), write N*V.
@triton.jit
def _softmax_backward_kernel(
    dy_ptr,  # (rows, n_cols) gradient of the output
    y_ptr,  # (rows, n_cols) forward output (softmax, or log_softmax when LOG)
    dx_ptr,  # (rows, n_cols) gradient of the input, y's dtype
    n_cols,
    BLOCK: tl.constexpr,
    LOG: tl.constexpr,  # y is log_softmax: dx = dy - exp(y) * sum(dy); else dx = y * (dy - sum(dy * y))
    SINGLE_CHUNK: tl.constexpr,  # n_cols <= BLOCK: keep the row in registers and read it once
):
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    dx_row = dx_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_CHUNK:
        in_row = offs < n_cols
        dy = tl.load(dy_row + offs, mask=in_row, other=0.0).to(tl.float32)
        y = tl.load(y_row + offs, mask=in_row, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, 0)
        else:
            dx = y * (dy - tl.sum(dy * y, 0))
        tl.store(dx_row + offs, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
    else:
        partial = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(tl.float32)
            if LOG:
                partial += dy
            else:
                partial += dy * tl.load(y_row + cols, mask=in_row, other=0.0).to(tl.float32)
        row_sum = tl.sum(partial, 0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            in_row = cols < n_cols
            dy = tl.load(dy_row + cols, mask=in_row, other=0.0).to(tl.float32)
            y = tl.load(y_row + cols, mask=in_row, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * row_sum
            else:
                dx = y * (dy - row_sum)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)


# forward: read N*V once (+ N labels, + N gathered targets); write 2 to 4 * N floats.
@triton.jit
def _logit_stats_forward_kernel(
    x_ptr,  # (rows, n_cols) logits
    labels_ptr,  # (rows,) int64 target indices; unused unless HAS_LABELS
    lse_ptr,  # (rows,) fp64 out: logsumexp(z), fp64 so the backward's z - lse keeps its low bits
    target_ptr,  # (rows,) fp32 out: z[label], 0 for ignored rows or without labels
    sum_z_ptr,  # (rows,) fp32 out: sum(z); unused unless WANT_SUM
    entropy_ptr,  # (rows,) fp32 out: lse - sum(p * z); unused unless WANT_ENTROPY
    n_cols,
    inv_temperature,
    ignore_index,
    BLOCK: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    WANT_SUM: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    shift, sum_exp, sum_z, sum_exp_dz = _online_row_stats(
        x_row, n_cols, inv_temperature, BLOCK, WANT_SUM, WANT_ENTROPY)
    log_sum_exp = tl.log(sum_exp)
    tl.store(lse_ptr + row, shift.to(tl.float64) + log_sum_exp.to(tl.float64))
    target = 0.0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        has_target = (label != ignore_index) & (label >= 0) & (label < n_cols)
        # Masked so that a bad label can never read out of bounds (the launcher has already rejected it).
        target = tl.load(x_row + label, mask=has_target, other=0.0).to(tl.float32) * inv_temperature
    tl.store(target_ptr + row, target)
    if WANT_SUM:
        tl.store(sum_z_ptr + row, sum_z)
    if WANT_ENTROPY:
        # H = lse - sum(p * z) = log(sum_exp) - sum(p * (z - shift)).
        tl.store(entropy_ptr + row, log_sum_exp - sum_exp_dz / sum_exp)


# backward: read N*V (+ up to 6 * N per-row values); write N*V.
@triton.jit
def _logit_stats_backward_kernel(
    x_ptr,  # (rows, n_cols) logits
    labels_ptr,  # (rows,) int64 target indices; unused unless HAS_C
    lse_ptr,  # (rows,) fp64 logsumexp(z) from the forward
    a_ptr,  # (rows,) fp32 coefficient of p
    b_ptr,  # (rows,) fp32 coefficient of p * log(p); unused unless HAS_B
    c_ptr,  # (rows,) fp32 coefficient of onehot(label); unused unless HAS_C
    d_ptr,  # (rows,) fp32 constant added to every column; unused unless HAS_D
    dx_ptr,  # (rows, n_cols) out, x's dtype
    n_cols,
    inv_temperature,
    BLOCK: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_C: tl.constexpr,
    HAS_D: tl.constexpr,
):
    # dx = inv_temperature * (p * (a + b * (z - lse)) + c * onehot(label) + d), p = exp(z - lse),
    # z = x * inv_temperature. b multiplies log p = z - lse rather than z: with logits near 1e4, p * (a + b * z)
    # would cancel in fp32 (the caller's a would carry -b * lse).
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    dx_row = dx_ptr + row * n_cols
    # log p = (z - lse_hi) - lse_lo: z - lse_hi is exact where p matters (z within 2x of lse), so log p keeps
    # fp32's relative accuracy when |lse| >> |log p|; z - fp32(lse) would err by ulp(lse), 1e-3 at 1e4.
    lse = tl.load(lse_ptr + row)
    lse_hi = lse.to(tl.float32)
    lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
    a = tl.load(a_ptr + row)
    if HAS_B:
        b = tl.load(b_ptr + row)
    if HAS_C:
        c = tl.load(c_ptr + row)
        # A label outside [0, n_cols) (ignore_index) matches no stored column: no one-hot term.
        label = tl.load(labels_ptr + row)
    if HAS_D:
        d = tl.load(d_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        in_row = cols < n_cols
        log_p = (tl.load(x_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_temperature - lse_hi) - lse_lo
        p = tl.exp(log_p)
        grad = p * a
        if HAS_B:
            grad += b * (p * tl.where(p == 0.0, 0.0, log_p))  # p log p is 0 where p is 0, even for z = -inf
        if HAS_C:
            grad += tl.where(cols == label, c, 0.0)
        if HAS_D:
            grad += d
        tl.store(dx_row + cols, (grad * inv_temperature).to(dx_ptr.dtype.element_ty), mask=in_row)


def _check_rows(name, x):
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D (rows, cols) tensor; got shape {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {x.dtype}")


def _checked_out(out, x):
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} {x.dtype} tensor on {x.device} (x's); got "
                         f"shape {tuple(out.shape)} {out.dtype} on {out.device}, contiguous={out.is_contiguous()}")
    return out


def _row_vector(name, t, rows, dtype):
    """t as a contiguous (rows,) tensor: autograd hands over expanded gradients (stride 0), so copy N values
    rather than reject them."""
    if t.shape != (rows,) or t.dtype != dtype:
        raise ValueError(f"{name} must be a ({rows},) {dtype} tensor; got shape {tuple(t.shape)} {t.dtype}")
    return t.contiguous()


def _checked_labels(labels, rows, cols, ignore_index):
    labels = _row_vector("labels", labels, rows, torch.int64)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= cols))
    if bool(bad.any()):  # one device sync, the price of a readable error instead of a silent wrong loss
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{pos}] = {int(labels[pos])} is outside [0, {cols}) and is not "
                         f"ignore_index ({ignore_index})")
    return labels


def _absent(like, dtype):
    # Placeholder for a pointer argument that a constexpr flag keeps the kernel from touching.
    return torch.empty(0, dtype=dtype, device=like.device)


def _softmax_launch_config(cols, log, backward=False):
    """(constexprs, num_warps) for the softmax kernels on rows of `cols` elements."""
    block = block_size(cols)
    return dict(BLOCK=block, LOG=bool(log), SINGLE_CHUNK=cols <= block), _softmax_warps(block, cols <= block, backward)


def _softmax_warps(block, single_chunk, backward):
    # The looping backward (rows longer than MAX_BLOCK) at 16 warps: ptxas kept the fp32 softmax at 40
    # registers and spilled 8 B on sm_80; at 8 warps it takes 40-48 registers and no stack on sm_80 and sm_90.
    return 8 if backward and not single_chunk else num_warps(block)


def softmax_forward(x, log):
    """softmax(x) along the last dim, or log_softmax when `log`. x: (rows, cols) -> y: (rows, cols), x's dtype."""
    _check_rows("x", x)
    rows, cols = x.shape
    y = torch.empty_like(x)
    if rows and cols:
        meta, warps = _softmax_launch_config(cols, log)
        _softmax_forward_kernel[(rows,)](x, y, cols, **meta, num_warps=warps)
    return y


def softmax_backward(dy, y, log):
    """Gradient of softmax (or log_softmax when `log`) given its output y: dx, (rows, cols) in y's dtype."""
    _check_rows("y", y)
    if dy.shape != y.shape or dy.dtype != y.dtype or not dy.is_contiguous():
        raise ValueError(f"dy must be contiguous with y's shape {tuple(y.shape)} and dtype {y.dtype}; "
                         f"got {tuple(dy.shape)} {dy.dtype}")
    rows, cols = y.shape
    dx = torch.empty_like(y)
    if rows and cols:
        meta, warps = _softmax_launch_config(cols, log, backward=True)
        _softmax_backward_kernel[(rows,)](dy, y, dx, cols, **meta, num_warps=warps)
    return dx


def logit_stats_forward(x, labels, inv_temperature, ignore_index, want_sum, want_entropy):
    """Row statistics of z = x * inv_temperature (fp32), one read of the logits.

    x: (rows, cols) logits; labels: (rows,) int64 or None. Returns (rows,) tensors (lse, target, sum_z,
    entropy), lse fp64 and the rest fp32: lse = logsumexp(z); target = z[label], 0 where label ==
    ignore_index (all 0 without labels); sum_z = sum(z); entropy = lse - sum(p * z), p = softmax(z). sum_z
    and entropy are empty tensors unless asked for. A label that is neither ignore_index nor in [0, cols) raises
    ValueError.
    """
    _check_rows("x", x)
    rows, cols = x.shape
    if labels is not None:
        labels = _checked_labels(labels, rows, cols, ignore_index)
    stat = dict(dtype=torch.float32, device=x.device)
    lse = torch.empty(rows, dtype=torch.float64, device=x.device)
    target = torch.empty(rows, **stat)
    sum_z = torch.empty(rows if want_sum else 0, **stat)
    entropy = torch.empty(rows if want_entropy else 0, **stat)
    if rows:
        block = block_size(cols)
        _logit_stats_forward_kernel[(rows,)](
            x, labels if labels is not None else _absent(x, torch.int64), lse, target, sum_z, entropy,
            cols, float(inv_temperature), int(ignore_index),
            BLOCK=block, HAS_LABELS=labels is not None, WANT_SUM=bool(want_sum), WANT_ENTROPY=bool(want_entropy),
            num_warps=num_warps(block))
    return lse, target, sum_z, entropy


def logit_stats_backward(x, labels, lse, a, b, c, d, inv_temperature, out=None):
    """dx = inv_temperature * (p * (a + b * (z - lse)) + c * onehot(label) + d), with z = x * inv_temperature
    and p = exp(z - lse), so z - lse = log p; lse is the forward's fp64 (rows,), a, b, c, d are fp32 (rows,)
    coefficients, b/c/d None meaning 0.

    Covers the gradient of every loss built on logit_stats_forward (cross-entropy, z-loss, entropy bonus).
    Labels outside [0, cols) (ignore_index) get no one-hot term, and neither does anything without labels.
    Returns dx: (rows, cols) in x's dtype; written into `out` if given (x itself allowed: each block of a row is
    read before it is written, so the fused heads need one chunk of logits, not two).
    """
    _check_rows("x", x)
    rows, cols = x.shape
    lse = _row_vector("lse", lse, rows, torch.float64)
    a, b, c, d = (t if t is None else _row_vector(name, t, rows, torch.float32)
                  for name, t in (("a", a), ("b", b), ("c", c), ("d", d)))
    has_c = c is not None and labels is not None
    if has_c:
        labels = _row_vector("labels", labels, rows, torch.int64)
    dx = torch.empty_like(x) if out is None else _checked_out(out, x)
    if rows and cols:
        absent = _absent(x, torch.float32)
        block = block_size(cols)
        _logit_stats_backward_kernel[(rows,)](
            x, labels if has_c else _absent(x, torch.int64), lse, a,
            b if b is not None else absent, c if has_c else absent, d if d is not None else absent, dx,
            cols, float(inv_temperature),
            BLOCK=block, HAS_B=b is not None, HAS_C=has_c, HAS_D=d is not None, num_warps=num_warps(block))
    return dx


def aot_specs():
    """Every configuration the launchers above can compile, for tests/test_aot_compile.py.

    All flag combinations in every dtype at the looping block (MAX_BLOCK, the path of every real vocabulary),
    as the JIT specialises them for aligned tensors and a row length that is a multiple of 16 (32000, 128256);
    then, with all flags on and an odd row length, every block size the shared helper can pick in bf16 (the
    dtype with the most conversions) and the smallest block, fewer elements than threads, in every dtype.
    Crossing every block with every dtype too would double the compile count for layouts already covered.
    """
    dtypes = ("fp32", "fp16", "bf16")
    flags = (False, True)
    specs = []

    def blocks(dt):
        return block_sizes() if dt == "bf16" else block_sizes()[:1]

    def add(kernel, signature, constexprs, block, aligned):
        divisible = tuple(n for n, t in signature.items() if t.startswith("*"))
        warps = (_softmax_warps(block, constexprs["SINGLE_CHUNK"], kernel is _softmax_backward_kernel)
                 if "SINGLE_CHUNK" in constexprs else num_warps(block))
        specs.append(AotSpec(kernel, signature, dict(constexprs, BLOCK=block), warps,
                             divisible + ("n_cols",) if aligned else divisible))

    def softmax_signatures(dt):
        common = {"n_cols": "i32", "BLOCK": "constexpr", "LOG": "constexpr", "SINGLE_CHUNK": "constexpr"}
        forward = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", **common}
        backward = {"dy_ptr": f"*{dt}", "y_ptr": f"*{dt}", "dx_ptr": f"*{dt}", **common}
        return ((_softmax_forward_kernel, forward), (_softmax_backward_kernel, backward))

    def stats_signatures(dt):
        forward = {"x_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp64", "target_ptr": "*fp32",
                   "sum_z_ptr": "*fp32", "entropy_ptr": "*fp32", "n_cols": "i32", "inv_temperature": "fp32",
                   "ignore_index": "i32", "BLOCK": "constexpr", "HAS_LABELS": "constexpr",
                   "WANT_SUM": "constexpr", "WANT_ENTROPY": "constexpr"}
        backward = {"x_ptr": f"*{dt}", "labels_ptr": "*i64", "lse_ptr": "*fp64", "a_ptr": "*fp32",
                    "b_ptr": "*fp32", "c_ptr": "*fp32", "d_ptr": "*fp32", "dx_ptr": f"*{dt}", "n_cols": "i32",
                    "inv_temperature": "fp32", "BLOCK": "constexpr", "HAS_B": "constexpr", "HAS_C": "constexpr",
                    "HAS_D": "constexpr"}
        return ((_logit_stats_forward_kernel, forward, ("HAS_LABELS", "WANT_SUM", "WANT_ENTROPY")),
                (_logit_stats_backward_kernel, backward, ("HAS_B", "HAS_C", "HAS_D")))

    for dt in dtypes:
        for kernel, signature in softmax_signatures(dt):
            for log, single_chunk in itertools.product(flags, flags):
                add(kernel, signature, dict(LOG=log, SINGLE_CHUNK=single_chunk), MAX_BLOCK, aligned=True)
            for block in blocks(dt):
                add(kernel, signature, dict(LOG=True, SINGLE_CHUNK=True), block, aligned=False)
        for kernel, signature, names in stats_signatures(dt):
            for values in itertools.product(flags, repeat=len(names)):
                add(kernel, signature, dict(zip(names, values)), MAX_BLOCK, aligned=True)
            for block in blocks(dt):
                add(kernel, signature, dict.fromkeys(names, True), block, aligned=False)
    return specs
