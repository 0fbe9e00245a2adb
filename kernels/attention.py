"""Attention family: fused (flash) attention, forward and backward, over packed sequences.

Layout: q (total_q, heads_q, head_dim), k and v (total_k, heads_kv, head_dim), contiguous; sequence b owns
query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows from cu_seqlens_k[b], seqused_k[b] of them if
given. Query head h reads kv head h // (heads_q // heads_kv). Queries are aligned to the end of the keys:
query i sees key j iff i + shift - window_left <= j <= i + shift + window_right, shift = len_k - len_q, a
bound being absent unless its constexpr flag is set (causal: WINDOW_RIGHT with window_right = 0).

Forward, one program per (query block, sequence x query head) (FlashAttention-2, Dao 2023): for each key
block the block can see, S = Q K^T, then the online softmax (running row max m and sum l in log2 units, so
exp2 is one instruction), O = O * exp2(m_old - m_new) + P V. Stores O / l and lse = (m + log2 l) ln 2.
Key blocks wholly outside the causal/window band are never visited; the band's edges are masked per element.

Backward, deterministic (no atomics):
  1. preprocess, one program per (query block, head): Delta = rowsum(dO * O) - dlse
  2. dK/dV, one program per (key block, sequence x kv head): loops over the query heads of its group and
     the query blocks that see the key block, recomputing P = exp2(S - lse) and dS = P (dP - Delta), and
     accumulates dV += P^T dO and dK += dS^T Q in registers
  3. dQ, one program per (query block, sequence x query head): loops over its key blocks, dQ += dS K
S and dP are computed in both 2 and 3 (7 matmuls instead of the 5 of an atomic dQ): the price of gradients
with the same bits on every run.

Cost per (sequence, query head), Tq queries, Tk keys, head dim D (about half when causal):
  FLOPs  forward 4 Tq Tk D;  backward 14 Tq Tk D (dK/dV 8, dQ 6)
  HBM    forward reads Q once and K, V once per query block; writes O and lse. The backward reads Q, dO
         once per key block (dK/dV) and K, V once per query block (dQ); writes dQ, dK, dV once.
Head dims are padded to BLOCK_D, a power of two >= 16, with masked loads and stores (59, 80, 111 work).
fp32 dots run in full precision (input_precision="ieee"), not tf32, to match PyTorch's fp32 numbers; fp16
and bf16 dots take P and dS rounded to the input dtype, as FlashAttention does, and accumulate in fp32.

Launchers mirror csrc/fastllm.h (same names and semantics) and take torch tensors; fastllm.ops does the
autograd and the dispatch.
"""
import os

import torch
import triton
import triton.language as tl

from .utils import AotSpec

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units: exp2 is one instruction
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs get full-precision products; tl.dot would round them to tf32 on the tensor cores.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, batch, HAS_SEQUSED_K: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence `batch`."""
    q_start = tl.load(cu_seqlens_q_ptr + batch)
    q_len = tl.load(cu_seqlens_q_ptr + batch + 1) - q_start
    k_start = tl.load(cu_seqlens_k_ptr + batch)
    if HAS_SEQUSED_K:
        k_len = tl.load(seqused_k_ptr + batch)
    else:
        k_len = tl.load(cu_seqlens_k_ptr + batch + 1) - k_start
    return q_start, q_len, k_start, k_len


@triton.jit
def _visible(query, key, q_len, k_len, window_left, window_right, WINDOW_LEFT: tl.constexpr,
             WINDOW_RIGHT: tl.constexpr):
    """Whether query index `query` sees key index `key` (broadcasting tensors of in-sequence indices)."""
    position = query + (k_len - q_len)  # bottom-right alignment
    visible = (query < q_len) & (key < k_len)
    if WINDOW_LEFT:
        visible = visible & (key >= position - window_left)
    if WINDOW_RIGHT:
        visible = visible & (key <= position + window_right)
    return visible


@triton.jit
def _key_range(i0, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the keys some query of block [i0, i0 + BLOCK_M) sees, lo rounded down to a key block."""
    shift = k_len - q_len
    lo = 0
    hi = k_len
    if WINDOW_LEFT:
        lo = tl.maximum(i0 + shift - window_left, 0) // BLOCK_N * BLOCK_N
    if WINDOW_RIGHT:
        last_query = tl.minimum(i0 + BLOCK_M, q_len) - 1
        hi = tl.minimum(last_query + shift + window_right + 1, k_len)
    return lo, hi


@triton.jit
def _query_range(j0, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """[lo, hi): the queries that see some key of block [j0, j0 + BLOCK_N), lo rounded down to a query block."""
    shift = k_len - q_len
    lo = 0
    hi = q_len
    if WINDOW_RIGHT:
        lo = tl.maximum(j0 - shift - window_right, 0) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:
        last_key = tl.minimum(j0 + BLOCK_N, k_len) - 1
        hi = tl.minimum(last_key - shift + window_left + 1, q_len)
    return lo, hi


@triton.jit
def _load_rows(ptr, token_start, rows, n_rows, heads, head, dims, head_dim):
    """Rows `rows` (in-sequence indices < n_rows) of one head of a (tokens, heads, head_dim) tensor, as a
    (len(rows), BLOCK_D) tile; 0 past the sequence and past head_dim."""
    offsets = ((token_start + rows) * heads + head).to(tl.int64) * head_dim
    mask = (rows < n_rows)[:, None] & (dims < head_dim)[None, :]
    return tl.load(ptr + offsets[:, None] + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, token_start, rows, n_rows, heads, head, dims, head_dim):
    offsets = ((token_start + rows) * heads + head).to(tl.int64) * head_dim
    mask = (rows < n_rows)[:, None] & (dims < head_dim)[None, :]
    tl.store(ptr + offsets[:, None] + dims[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_lse_log2(lse_ptr, head, total_q, token_start, rows, q_len):
    """Saved lse of the rows, in log2 units, with -inf (a row that sees no key) and rows past the sequence
    turned into +inf so that exp2(s - lse) is exactly 0 for them."""
    lse = tl.load(lse_ptr + head * total_q + token_start + rows, mask=rows < q_len, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E


@triton.jit
def _program_tile(n_tiles_per_head):
    """(tile, sequence x head) of this program in a 1-D grid; the grid has no 65535 limit, and programs next to
    each other share a head (its K and V stay in L2). Tiles run last-first: with a causal mask the last query
    tiles have the most work, and starting them first shortens the tail."""
    pid = tl.program_id(0)
    return n_tiles_per_head - 1 - pid % n_tiles_per_head, pid // n_tiles_per_head


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------
# read Q once, K and V once per query block; write O and lse.
@triton.jit
def _attention_forward_kernel(
    q_ptr,  # (total_q, heads_q, head_dim)
    k_ptr,  # (total_k, heads_kv, head_dim)
    v_ptr,  # (total_k, heads_kv, head_dim)
    out_ptr,  # (total_q, heads_q, head_dim) out, q's dtype
    lse_ptr,  # (heads_q, total_q) fp32 out: natural-log log-sum-exp of the scaled scores, -inf if no key
    cu_seqlens_q_ptr,  # (batch + 1,) int32 query offsets
    cu_seqlens_k_ptr,  # (batch + 1,) int32 key offsets
    seqused_k_ptr,  # (batch,) int32 keys used per sequence; unused unless HAS_SEQUSED_K
    total_q,
    heads_q,
    heads_kv,
    head_dim,
    max_seqlen_q,
    softmax_scale,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
    WINDOW_LEFT: tl.constexpr,  # keys before position - window_left are masked
    WINDOW_RIGHT: tl.constexpr,  # keys after position + window_right are masked (causal: window_right = 0)
    HAS_SEQUSED_K: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots
):
    q_tile, seq_head = _program_tile(tl.cdiv(max_seqlen_q, BLOCK_M))
    batch = seq_head // heads_q
    head = seq_head % heads_q
    kv_head = head // (heads_q // heads_kv)
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, batch, HAS_SEQUSED_K)
    i0 = q_tile * BLOCK_M
    if i0 >= q_len:
        return
    rows = i0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, q_start, rows, q_len, heads_q, head, dims, head_dim)
    qk_scale = softmax_scale * LOG2E
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(i0, q_len, k_len, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        visible = _visible(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right, WINDOW_LEFT,
                           WINDOW_RIGHT)
        s = tl.where(visible, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # A row that has seen no key so far keeps max -inf; shifting it by 0 avoids exp2(-inf - -inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(s - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = _load_rows(v_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
        acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, IEEE)
        row_max = new_max
    seen = row_sum > 0  # a row that saw no key: output 0 (acc is 0), lse -inf
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    _store_rows(out_ptr, out, q_start, rows, q_len, heads_q, head, dims, head_dim)
    lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + head * total_q + q_start + rows, lse, mask=rows < q_len)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------
# read O and dO once (+ dlse); write Delta.
@triton.jit
def _attention_backward_preprocess_kernel(
    out_ptr,  # (total_q, heads_q, head_dim) forward output
    dout_ptr,  # (total_q, heads_q, head_dim) its gradient
    dlse_ptr,  # (heads_q, total_q) fp32 gradient of lse; unused unless HAS_DLSE
    delta_ptr,  # (heads_q, total_q) fp32 out: rowsum(dO * O) - dlse
    total_q,
    heads_q,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    out = _load_rows(out_ptr, 0, rows, total_q, heads_q, head, dims, head_dim).to(tl.float32)
    dout = _load_rows(dout_ptr, 0, rows, total_q, heads_q, head, dims, head_dim).to(tl.float32)
    delta = tl.sum(out * dout, 1)
    if HAS_DLSE:
        # d lse / d s = P, so the lse's gradient enters dS = P (dP - Delta) as a shift of Delta.
        delta -= tl.load(dlse_ptr + head * total_q + rows, mask=rows < total_q, other=0.0)
    tl.store(delta_ptr + head * total_q + rows, delta, mask=rows < total_q)


# read K, V once; Q, dO (+ lse, Delta) once per key block; write dK, dV once.
@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr,  # (total_q, heads_q, head_dim)
    k_ptr,  # (total_k, heads_kv, head_dim)
    v_ptr,  # (total_k, heads_kv, head_dim)
    dout_ptr,  # (total_q, heads_q, head_dim)
    lse_ptr,  # (heads_q, total_q) fp32 from the forward
    delta_ptr,  # (heads_q, total_q) fp32 from the preprocess kernel
    dk_ptr,  # (total_k, heads_kv, head_dim) out, k's dtype
    dv_ptr,  # (total_k, heads_kv, head_dim) out, v's dtype
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    seqused_k_ptr,
    total_q,
    heads_q,
    heads_kv,
    head_dim,
    max_seqlen_k,
    softmax_scale,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    k_tile, seq_head = _program_tile(tl.cdiv(max_seqlen_k, BLOCK_N))
    batch = seq_head // heads_kv
    kv_head = seq_head % heads_kv
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, batch, HAS_SEQUSED_K)
    j0 = k_tile * BLOCK_N
    if j0 >= k_len:
        return
    cols = j0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
    v = _load_rows(v_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = softmax_scale * LOG2E
    lo, hi = _query_range(j0, q_len, k_len, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    group = heads_q // heads_kv
    for head in range(kv_head * group, (kv_head + 1) * group):
        for i0 in range(lo, hi, BLOCK_M):
            rows = i0 + tl.arange(0, BLOCK_M)
            q = _load_rows(q_ptr, q_start, rows, q_len, heads_q, head, dims, head_dim)
            dout = _load_rows(dout_ptr, q_start, rows, q_len, heads_q, head, dims, head_dim)
            lse = _row_lse_log2(lse_ptr, head, total_q, q_start, rows, q_len)
            delta = tl.load(delta_ptr + head * total_q + q_start + rows, mask=rows < q_len, other=0.0)
            # Transposed tiles (keys x queries), so that dV and dK are plain products with dO and Q.
            st = _dot(k, tl.trans(q), IEEE) * qk_scale
            visible = _visible(rows[None, :], cols[:, None], q_len, k_len, window_left, window_right, WINDOW_LEFT,
                               WINDOW_RIGHT)
            pt = tl.where(visible, tl.math.exp2(st - lse[None, :]), 0.0)
            dv += _dot(pt.to(dout.dtype), dout, IEEE)
            dpt = _dot(v, tl.trans(dout), IEEE)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, IEEE)
    _store_rows(dk_ptr, dk * softmax_scale, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
    _store_rows(dv_ptr, dv, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)


# read Q, dO (+ lse, Delta) once; K, V once per query block; write dQ once.
@triton.jit
def _attention_backward_dq_kernel(
    q_ptr,  # (total_q, heads_q, head_dim)
    k_ptr,  # (total_k, heads_kv, head_dim)
    v_ptr,  # (total_k, heads_kv, head_dim)
    dout_ptr,  # (total_q, heads_q, head_dim)
    lse_ptr,  # (heads_q, total_q) fp32 from the forward
    delta_ptr,  # (heads_q, total_q) fp32 from the preprocess kernel
    dq_ptr,  # (total_q, heads_q, head_dim) out, q's dtype
    cu_seqlens_q_ptr,
    cu_seqlens_k_ptr,
    seqused_k_ptr,
    total_q,
    heads_q,
    heads_kv,
    head_dim,
    max_seqlen_q,
    softmax_scale,
    window_left,
    window_right,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    HAS_SEQUSED_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    q_tile, seq_head = _program_tile(tl.cdiv(max_seqlen_q, BLOCK_M))
    batch = seq_head // heads_q
    head = seq_head % heads_q
    kv_head = head // (heads_q // heads_kv)
    q_start, q_len, k_start, k_len = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, seqused_k_ptr, batch, HAS_SEQUSED_K)
    i0 = q_tile * BLOCK_M
    if i0 >= q_len:
        return
    rows = i0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, q_start, rows, q_len, heads_q, head, dims, head_dim)
    dout = _load_rows(dout_ptr, q_start, rows, q_len, heads_q, head, dims, head_dim)
    lse = _row_lse_log2(lse_ptr, head, total_q, q_start, rows, q_len)
    delta = tl.load(delta_ptr + head * total_q + q_start + rows, mask=rows < q_len, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = softmax_scale * LOG2E
    lo, hi = _key_range(i0, q_len, k_len, window_left, window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
        v = _load_rows(v_ptr, k_start, cols, k_len, heads_kv, kv_head, dims, head_dim)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        visible = _visible(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right, WINDOW_LEFT,
                           WINDOW_RIGHT)
        p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(dout, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    _store_rows(dq_ptr, dq * softmax_scale, q_start, rows, q_len, heads_q, head, dims, head_dim)


# ---------------------------------------------------------------------------------------------------------
# Configurations: autotuned on the GPU over a few candidates per kernel, keyed by head dim (and, implicitly,
# dtype); one small configuration under the interpreter, which runs every program as numpy.
# ---------------------------------------------------------------------------------------------------------
def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Candidates for sm_80 (A100) and sm_90 (H100/H200) by BLOCK_D, after FlashAttention-2's Triton kernels.
# The forward and dQ keep a query tile and stream keys; dK/dV keeps a key tile and streams queries. Tiles
# shrink, or warps grow, as rows widen so that the fp32 accumulators (BLOCK_M x BLOCK_D, or 2 x BLOCK_N x
# BLOCK_D for dK/dV) stay within the 255 registers per thread: tests/test_aot_compile.py reads every
# candidate's registers, stack and shared memory from its cubin and fails on any spill (the table is in
# bench/RESULTS.md, gpu-resources). Retuned from those numbers (the configuration they replaced, and its
# stack frame in bytes per thread on sm_80 / sm_90):
#   16-bit forward 128: (64, 64, 4 warps, 3 stages) -> 8 warps (56 / 0); 256: (64, 32, 4, 2) -> (32, 64, 8, 2)
#     (144 / 0); dK/dV 64: 4 -> 8 warps (120 / 152); 128: (32, 128, 8, 2) -> (32, 64, 8, 2) (96 / 0);
#     256: (16, 64, 4, 2) -> (16, 32, 8, 2) (712 / 1064).
HALF_CONFIGS = {  # fp16 and bf16: tensor-core dots
    "forward": {64: [_config(128, 64, 4, 3), _config(64, 64, 4, 4)],
                128: [_config(128, 64, 8, 3), _config(64, 64, 8, 3)],
                256: [_config(64, 32, 8, 2), _config(32, 64, 8, 2)]},
    "dkdv": {64: [_config(32, 128, 8, 3)], 128: [_config(32, 64, 8, 2)], 256: [_config(16, 32, 8, 2)]},
    "dq": {64: [_config(128, 32, 4, 3)], 128: [_config(128, 32, 8, 2)], 256: [_config(32, 32, 4, 2)]},
}
# fp32 dots in full precision run on the FMA units with operands in registers: small tiles, one candidate
# each (fp32 attention on a GPU is for checking, not for speed; larger tiles took 20 s each to compile).
# Retuned the same way: the forward 64: 4 -> 8 warps (448 / 96), 128: (32, 32, 4, 2) -> (16, 32, 8, 2)
# (160 / 800; sm_90 kept spilling at 32 x 32 with 8 warps), 256: 4 -> 8 warps (16 / 7720); dK/dV 64:
# (16, 64, 4, 2) -> (16, 32, 4, 2) (48 / 224), 128: (16, 32, 4, 2) -> (16, 16, 4, 2) (80 / 0), 256: 4 -> 8
# warps (0 / 8); dQ 64: 4 -> 8 warps (376 / 352), 128: 4 -> 8 warps (152 / 0), 256: 4 -> 8 warps (16 / 0).
FLOAT_CONFIGS = {
    "forward": {64: [_config(64, 32, 8, 2)], 128: [_config(16, 32, 8, 2)], 256: [_config(16, 32, 8, 1)]},
    "dkdv": {64: [_config(16, 32, 4, 2)], 128: [_config(16, 16, 4, 2)], 256: [_config(16, 16, 8, 1)]},
    "dq": {64: [_config(64, 32, 8, 2)], 128: [_config(32, 32, 8, 2)], 256: [_config(16, 16, 8, 1)]},
}
INTERPRETER_CONFIG = _config(16, 16, 1, 1)
MIN_BLOCK_D = 32  # head dims up to 32 share one compiled width: below it the dots are too small to matter


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_configs(kernel, block_d, is_fp32):
    """The autotune candidates for `kernel` ("forward", "dkdv" or "dq") at BLOCK_D in fp32 or 16-bit."""
    by_block_d = (FLOAT_CONFIGS if is_fp32 else HALF_CONFIGS)[kernel]
    return by_block_d[next(limit for limit in sorted(by_block_d) if block_d <= limit)]


def _autotuned(kernel, jit_fn):
    if _interpreting():
        return triton.autotune(configs=[INTERPRETER_CONFIG], key=[])(jit_fn)

    def prune(configs, named_args, **kwargs):
        return gpu_configs(kernel, kwargs["BLOCK_D"], kwargs["IEEE"])

    every = [config for table in (HALF_CONFIGS, FLOAT_CONFIGS) for configs in table[kernel].values()
             for config in configs]
    return triton.autotune(configs=every, key=["BLOCK_D", "IEEE", "WINDOW_LEFT", "WINDOW_RIGHT"],
                           prune_configs_by={"early_config_prune": prune})(jit_fn)


_forward = _autotuned("forward", _attention_forward_kernel)
_backward_dkdv = _autotuned("dkdv", _attention_backward_dkdv_kernel)
_backward_dq = _autotuned("dq", _attention_backward_dq_kernel)
PREPROCESS_BLOCK_M = 64


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------
def _check_tokens(name, t, like):
    if t.dim() != 3 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 3-D (tokens, heads, head_dim) tensor; got shape "
                         f"{tuple(t.shape)} with strides {t.stride()}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.dtype != like.dtype:
        raise ValueError(f"{name} must be float32, float16 or bfloat16 and match q's dtype {like.dtype}; got {t.dtype}")
    if t.shape[2] != like.shape[2]:
        raise ValueError(f"{name} must have q's head_dim {like.shape[2]}; got {t.shape[2]}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tokens(name, t, q)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's heads ({k.shape[1]})")
    if q.shape[2] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be at most {MAX_HEAD_DIM}; got {q.shape[2]}")


def _offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(cu_seqlens_q, cu_seqlens_k, batch): the given int32 offsets, or those of a dense batch (every sequence
    max_seqlen_q queries and max_seqlen_k keys)."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_seqlens_q is not None:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape != cu_seqlens_q.shape:
                raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets; got {cu.dtype} "
                                 f"{tuple(cu.shape)}")
        return cu_seqlens_q, cu_seqlens_k, cu_seqlens_q.shape[0] - 1
    if max_seqlen_q <= 0 or q.shape[0] % max_seqlen_q or k.shape[0] != q.shape[0] // max_seqlen_q * max_seqlen_k:
        raise ValueError(f"without cu_seqlens, q and k must hold whole sequences of max_seqlen_q = {max_seqlen_q} "
                         f"and max_seqlen_k = {max_seqlen_k} tokens; got {q.shape[0]} and {k.shape[0]}")
    batch = q.shape[0] // max_seqlen_q
    starts = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return starts * max_seqlen_q, starts * max_seqlen_k, batch


def _check_seqused(seqused_k, batch):
    if seqused_k is not None and (seqused_k.dtype != torch.int32 or seqused_k.shape != (batch,)):
        raise ValueError(f"seqused_k must be a ({batch},) int32 tensor; got {seqused_k.dtype} {tuple(seqused_k.shape)}")


def _absent(like, dtype):
    # Placeholder for a pointer argument that a constexpr flag keeps the kernel from touching.
    return torch.empty(0, dtype=dtype, device=like.device)


def _block_d(head_dim):
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def _common_meta(q, seqused_k, window_left, window_right):
    return dict(BLOCK_D=_block_d(q.shape[2]), WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0,
                HAS_SEQUSED_K=seqused_k is not None, IEEE=q.dtype == torch.float32)


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                      window_left, window_right):
    """Attention over packed sequences (see the module docstring for the layout and the mask).

    Returns (out like q, lse (heads_q, total_q) fp32); a row that sees no key gets out = 0 and lse = -inf.
    """
    _check_qkv(q, k, v)
    cu_q, cu_k, batch = _offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_seqused(seqused_k, batch)
    total_q, heads_q, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]) * batch * heads_q,)  # noqa: E731
    _forward[grid](q, k, v, out, lse, cu_q, cu_k, seqused_k if seqused_k is not None else _absent(q, torch.int32),
                   total_q, heads_q, k.shape[1], head_dim, max_seqlen_q, float(softmax_scale), int(window_left),
                   int(window_right), **_common_meta(q, seqused_k, window_left, window_right))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                       max_seqlen_k, softmax_scale, window_left, window_right):
    """Gradients (dq, dk, dv) of attention_forward, given dout and optionally dlse (the gradient of lse).

    Deterministic: no atomics, the same bits on every run. Keys past seqused_k get zero gradient.
    """
    _check_qkv(q, k, v)
    for name, t in (("out", out), ("dout", dout)):
        _check_tokens(name, t, q)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}; got {tuple(t.shape)}")
    total_q, heads_q, head_dim = q.shape
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is not None and (t.shape != (heads_q, total_q) or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous ({heads_q}, {total_q}) float32 tensor; got {t.dtype} "
                             f"{tuple(t.shape)}")
    cu_q, cu_k, batch = _offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_seqused(seqused_k, batch)
    dq = torch.empty_like(q)
    # Keys past seqused_k take part in nothing: their gradient is 0, and no program writes it.
    dk = torch.zeros_like(k) if seqused_k is not None else torch.empty_like(k)
    dv = torch.zeros_like(v) if seqused_k is not None else torch.empty_like(v)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    block_d = _block_d(head_dim)
    delta = torch.empty((heads_q, total_q), dtype=torch.float32, device=q.device)
    _attention_backward_preprocess_kernel[(triton.cdiv(total_q, PREPROCESS_BLOCK_M), heads_q)](
        out, dout, dlse if dlse is not None else _absent(q, torch.float32), delta, total_q, heads_q, head_dim,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d, HAS_DLSE=dlse is not None, num_warps=4)
    seqused = seqused_k if seqused_k is not None else _absent(q, torch.int32)
    meta = _common_meta(q, seqused_k, window_left, window_right)
    scalars = (float(softmax_scale), int(window_left), int(window_right))
    heads_kv = k.shape[1]
    if max_seqlen_k > 0:
        grid_dkdv = lambda meta: (triton.cdiv(max_seqlen_k, meta["BLOCK_N"]) * batch * heads_kv,)  # noqa: E731
        _backward_dkdv[grid_dkdv](q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, seqused, total_q, heads_q, heads_kv,
                                  head_dim, max_seqlen_k, *scalars, **meta)
    grid_dq = lambda meta: (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]) * batch * heads_q,)  # noqa: E731
    _backward_dq[grid_dq](q, k, v, dout, lse, delta, dq, cu_q, cu_k, seqused, total_q, heads_q, heads_kv, head_dim,
                          max_seqlen_q, *scalars, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation
# ---------------------------------------------------------------------------------------------------------
def aot_specs():
    """Every configuration the launchers can compile, for tests/test_aot_compile.py.

    Every BLOCK_D (32 to 256) of every tiled kernel with all flags on (window both sides, seqused_k): in bf16,
    the training dtype, with every autotune candidate; in fp16 and fp32 with the first candidate (the others
    only change tile sizes, already compiled in bf16). Then every combination of the window flags, and the
    decode path's, once at the cheapest point (fp16, BLOCK_D 32). The preprocess kernel at every BLOCK_D and
    dtype. (148 compiles for sm_80 and sm_90 took 200 s on 2 loaded cores; this is 136.) Tensors are aligned
    and head_dim a multiple of 16, as the JIT specialises them for real shapes such as 64 and 128.
    """
    block_ds = [32, 64, 128, 256]
    tiled = (("forward", _attention_forward_kernel), ("dkdv", _attention_backward_dkdv_kernel),
             ("dq", _attention_backward_dq_kernel))
    specs = []

    def signature(kernel, dt):
        types = {}
        for name in kernel.arg_names:
            if name in ("lse_ptr", "delta_ptr", "dlse_ptr"):
                types[name] = "*fp32"
            elif name.startswith(("cu_seqlens", "seqused")):
                types[name] = "*i32"
            elif name.endswith("_ptr"):
                types[name] = f"*{dt}"
            elif name == "softmax_scale":
                types[name] = "fp32"
            elif name.isupper():
                types[name] = "constexpr"
            else:
                types[name] = "i32"
        return types

    def add(kernel, dt, constexprs, num_warps, num_stages=3):
        types = signature(kernel, dt)
        divisible = tuple(n for n, t in types.items() if t.startswith("*")) + ("head_dim",)
        specs.append(AotSpec(kernel, types, constexprs, num_warps, divisible, num_stages))

    def add_tiled(kind, kernel, dt, block_d, flags, all_candidates):
        candidates = gpu_configs(kind, block_d, dt == "fp32")
        for config in candidates if all_candidates else candidates[:1]:
            add(kernel, dt, dict(config.kwargs, BLOCK_D=block_d, IEEE=dt == "fp32", **flags), config.num_warps,
                config.num_stages)

    all_on = dict(WINDOW_LEFT=True, WINDOW_RIGHT=True, HAS_SEQUSED_K=True)
    for dt in ("bf16", "fp16", "fp32"):
        for block_d in block_ds:
            for kind, kernel in tiled:
                add_tiled(kind, kernel, dt, block_d, all_on, all_candidates=dt == "bf16")
            add(_attention_backward_preprocess_kernel, dt,
                dict(BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=block_d, HAS_DLSE=True), 4)
    # The window flags shape each kernel's loop bounds and masks; seqused_k only swaps one load, so it is
    # toggled only with the decode path's causal mask.
    for window_left, window_right, has_seqused_k in ((False, False, False), (False, True, False),
                                                     (True, False, False), (True, True, False), (False, True, True)):
        flags = dict(WINDOW_LEFT=window_left, WINDOW_RIGHT=window_right, HAS_SEQUSED_K=has_seqused_k)
        for kind, kernel in tiled:
            add_tiled(kind, kernel, "fp16", MIN_BLOCK_D, flags, all_candidates=False)
    add(_attention_backward_preprocess_kernel, "fp16", dict(BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=MIN_BLOCK_D,
                                                            HAS_DLSE=False), 4)
    return specs
