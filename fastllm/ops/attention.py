"""The attention family: fused (flash) multi-head attention, for dense batches, packed variable-length
batches, and decoding against a KV cache.

    out_i = sum_j softmax_j(softmax_scale * q_i . k_j) v_j      over the keys j that query i sees

Queries are aligned to the END of their keys (query i of a sequence with Tq queries and Tk keys sits at key
position i + Tk - Tq, as when new tokens attend to a cache), and query i sees key j iff

    i + Tk - Tq - left <= j <= i + Tk - Tq + right

with window=(left, right) (None or -1: unbounded) and causal meaning right = 0. A query that sees no key
(bottom-right causal with Tq > Tk, or a window past the keys) gets output 0, log-sum-exp -inf, and passes no
gradient: never NaN. Heads: query head h reads key/value head h // (heads_q // heads_kv) (grouped-query and
multi-query attention).

All three entry points are one op over packed sequences (tokens, heads, head_dim): a dense batch is B
sequences of equal length, a decode step a dense batch whose key lengths are kv_lengths. The kernels never
hold the (Tq, Tk) score matrix: the forward keeps a running max and sum per query (online softmax) and saves
the row log-sum-exp; the backward recomputes the probabilities from it, tile by tile. Kernels:
kernels/attention.py (Triton) and csrc/cpu/attention.cpp (C++), with identical launchers.

Under torch.autocast q, k and v are cast to the autocast dtype, as scaled_dot_product_attention's are.
"""
import math
from typing import Optional

import torch

from ._common import (FLOAT_DTYPES, LOWER, autocast_cast, autocast_device, call_op, check_same_device, check_tensor,
                      kernels, needs_dispatcher, register_autocast, resolve)

FAMILY = "attention"
MAX_HEAD_DIM = 256  # what the Triton kernels' register tiles hold; every backend accepts the same range
_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def lse_dtype(dtype):
    """The log-sum-exp's dtype for inputs of `dtype`: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def saved_lse_dtype(dtype, backend):
    """The dtype of the lse the kernels save for the backward: the C++ kernel keeps float64, so its backward
    recomputes the probabilities to fp32 accuracy (see csrc/cpu/attention.cpp); Triton keeps lse_dtype."""
    return torch.float64 if backend == "cpp" else lse_dtype(dtype)


def window_bounds(causal, window):
    """(left, right) key bounds relative to each query's position, -1 meaning unbounded (causal: right <= 0)."""
    left, right = (None, None) if window is None else window
    left = -1 if left is None else left
    right = -1 if right is None else right
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def visible_keys(seqlen_q, seqlen_k, window_left, window_right, device=None):
    """(seqlen_q, seqlen_k) bool: which keys each query sees (bottom-right aligned; bounds of -1 are absent)."""
    position = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= key >= position - window_left
    if window_right >= 0:
        visible &= key <= position + window_right
    return visible


# ---------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch (matmul, mask, softmax, matmul). The test oracle (run in float64) and the eager
# baseline of the benchmarks; it runs in the inputs' dtype, like attention code written without fastllm.
# ---------------------------------------------------------------------------------------------------------
class reference:
    @staticmethod
    def attention(q, k, v, causal=False, softmax_scale=None, window=None, return_lse=False):
        seqlen_q, heads_q, head_dim = q.shape[1:]
        seqlen_k, heads_kv = k.shape[1:3]
        scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
        group = heads_q // heads_kv
        qh = q.transpose(1, 2)  # (B, Hq, Tq, D)
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
        visible = visible_keys(seqlen_q, seqlen_k, *window_bounds(causal, window), device=q.device)
        sees_a_key = visible.any(-1, keepdim=True)  # (Tq, 1)
        scores = scores.masked_fill(~visible, float("-inf"))
        # softmax over a row of -inf is NaN, and so is its gradient: give such rows finite scores, then
        # zero their probabilities (their output is 0 and no gradient flows through them).
        safe_scores = scores.masked_fill(~sees_a_key, 0.0)
        probs = torch.softmax(safe_scores, dim=-1).masked_fill(~sees_a_key, 0.0)
        out = (probs @ vh).transpose(1, 2)  # (B, Tq, Hq, D)
        if not return_lse:
            return out
        lse = torch.logsumexp(safe_scores.to(lse_dtype(q.dtype)), dim=-1)  # (B, Hq, Tq)
        return out, lse.masked_fill(~sees_a_key[:, 0], float("-inf"))

    @staticmethod
    def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                         softmax_scale=None, window=None, return_lse=False):
        softmax_scale = q.shape[-1]**-0.5 if softmax_scale is None else softmax_scale
        starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for b in range(len(starts_q) - 1):
            out, lse = reference.attention(
                q[starts_q[b]:starts_q[b + 1]][None], k[starts_k[b]:starts_k[b + 1]][None],
                v[starts_k[b]:starts_k[b + 1]][None], causal, softmax_scale, window, return_lse=True)
            outs.append(out[0])
            lses.append(lse[0])
        out = torch.cat(outs) if outs else q.new_empty(q.shape)
        if not return_lse:
            return out
        lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=lse_dtype(q.dtype))
        return out, lse  # (Hq, total_q)

    @staticmethod
    def attention_decode(q, k_cache, v_cache, kv_lengths, causal=False, softmax_scale=None, window=None,
                         return_lse=False):
        outs, lses = [], []
        for b, length in enumerate(kv_lengths.tolist()):
            out, lse = reference.attention(q[b:b + 1], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length], causal,
                                           softmax_scale, window, return_lse=True)
            outs.append(out)
            lses.append(lse)
        out = torch.cat(outs) if outs else q.new_empty(q.shape)
        if not return_lse:
            return out
        lse = torch.cat(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]), dtype=lse_dtype(q.dtype))
        return out, lse


# ---------------------------------------------------------------------------------------------------------
# Custom ops: one graph node each for torch.compile; `backend` picks the kernel module at run time.
# Tensors are packed: q (total_q, heads_q, head_dim), k and v (total_k, heads_kv, head_dim). Without
# cu_seqlens every sequence has max_seqlen_q queries and max_seqlen_k keys (a dense batch); seqused_k, if
# given, caps each sequence's keys (a KV cache). window_left/right: -1 is unbounded.
# ---------------------------------------------------------------------------------------------------------
def check_sequence_data(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k):
    """Raise ValueError naming the first bad offset or length. Reads the (small) index tensors on the host."""
    if cu_seqlens_q is not None:
        for name, cu, tokens, max_len, what in (
                ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "queries"),
                ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "keys")):
            offsets = cu.tolist()
            if offsets[0] != 0:
                raise ValueError(f"{name}[0] must be 0, got {offsets[0]}")
            if offsets[-1] != tokens:
                raise ValueError(f"{name}[-1] must be the number of tokens ({tokens}), got {offsets[-1]}")
            for b in range(len(offsets) - 1):
                length = offsets[b + 1] - offsets[b]
                if length < 0:
                    raise ValueError(f"{name} must be non-decreasing, got {name}[{b + 1}] = {offsets[b + 1]} < "
                                     f"{name}[{b}] = {offsets[b]}")
                if length > max_len:
                    raise ValueError(f"sequence {b} has {length} {what} ({name}), more than max_seqlen_"
                                     f"{name[-1]} = {max_len}")
    if seqused_k is not None:
        if cu_seqlens_k is not None:
            available = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        else:
            available = [max_seqlen_k] * seqused_k.shape[0]
        for b, (used, limit) in enumerate(zip(seqused_k.tolist(), available)):
            if not 0 <= used <= limit:
                raise ValueError(f"kv_lengths[{b}] = {used} must be in [0, {limit}] (the cache holds {limit} "
                                 f"positions)")


@torch.library.custom_op("fastllm::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
               cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], max_seqlen_q: int,
               max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    # Inside the op, so torch.compile keeps one node and the index data is still checked.
    check_sequence_data(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    return kernels(backend, FAMILY).attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                                      max_seqlen_k, softmax_scale, window_left, window_right)


@_attention.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
      window_right, backend):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=saved_lse_dtype(q.dtype, backend))


@torch.library.custom_op("fastllm::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                        cu_seqlens_k: Optional[torch.Tensor], seqused_k: Optional[torch.Tensor], max_seqlen_q: int,
                        max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels(backend, FAMILY).attention_backward(
        dout.contiguous(), q, k, v, out, lse, None if dlse is None else dlse.contiguous(), cu_seqlens_q,
        cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right)


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
      softmax_scale, window_left, window_right, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.arguments = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k)
    # Without materialized grads, an unused output's gradient is None: no zero lse gradient to read.
    ctx.set_materialize_grads(False)


def _attention_grad(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k = ctx.saved_tensors
    if dout is None:  # only the lse reached the loss
        dout = torch.zeros_like(out)
    dq, dk, dv = call_op(_attention_backward, dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                         seqused_k, *ctx.arguments)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def autocast_qkv(q, k, v):
    """q, k, v as scaled_dot_product_attention takes them under torch.autocast: each in the autocast dtype (its
    lower_precision_fp policy, on CPU and CUDA), so RoPE's fp32 q and k meet a bf16 v in one dtype."""
    return autocast_cast(LOWER, autocast_device(q), q, k, v)


def _autocast_attention(device_type, op, q, k, v, *rest):
    return op(*autocast_cast(LOWER, device_type, q, k, v), *rest)


register_autocast("attention", _autocast_attention)
register_autocast("attention_backward")  # runs on what the forward saved


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _check_qkv(q, k, v, q_dims, kv_dims, names=("q", "k", "v")):
    """q, k, v: float tensors of one dtype and device, shaped (*q_dims, heads_q, head_dim) and
    (*kv_dims, heads_kv, head_dim); k and v of one shape; heads_q a multiple of heads_kv; one head_dim in
    [1, MAX_HEAD_DIM]. `names` are the arguments' names, for the errors."""
    q_name, k_name, v_name = names
    for name, t, dims in ((q_name, q, (*q_dims, "heads_q")), (k_name, k, (*kv_dims, "heads_kv")),
                          (v_name, v, (*kv_dims, "heads_kv"))):
        check_tensor(name, t)
        if t.dim() != len(dims) + 1:
            raise ValueError(f"{name} must be {len(dims) + 1}-D ({', '.join(dims)}, head_dim), got shape "
                             f"{tuple(t.shape)}")
    for name, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have {q_name}'s dtype ({_dtype_name(q.dtype)}), got {_dtype_name(t.dtype)}")
    check_same_device(**{q_name: q, k_name: k, v_name: v})
    if v.shape != k.shape:
        raise ValueError(f"{v_name} must have {k_name}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{k_name}'s head_dim ({k.shape[-1]}) must equal {q_name}'s head_dim ({q.shape[-1]})")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {q.shape[-1]}")
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"{q_name}'s number of heads ({heads_q}) must be a multiple of {k_name}'s and "
                         f"{v_name}'s ({heads_kv})")
    if len(q_dims) == 2 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{k_name} and {v_name} must have {q_name}'s batch size {q.shape[0]}, got {k.shape[0]}")


def _check_options(causal, softmax_scale, window, head_dim):
    """The softmax scale (default 1/sqrt(head_dim)) and the (left, right) key bounds, -1 unbounded."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not (
            math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number or None, got {softmax_scale!r}")
    if window is not None:
        if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(
                bound is None or (isinstance(bound, int) and not isinstance(bound, bool) and bound >= -1)
                for bound in window)):
            raise ValueError(f"window must be None or a pair (left, right) of ints >= 0, None or -1 for "
                             f"unbounded, got {window!r}")
    return float(softmax_scale), *window_bounds(causal, window)


def _check_index(name, t, length, device):
    """An integer index tensor of shape (length,) on `device`, as contiguous int32 for the kernels."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {_dtype_name(t.dtype)}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    return t.to(torch.int32).contiguous()


def _public_lse(lse, q):
    return lse.to(lse_dtype(q.dtype))  # differentiable: the gradient flows back in the saved dtype


def _check_max_seqlen(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _attention_direct(q, k, v, kv_lengths, causal, softmax_scale, window, return_lse):
    """attention / attention_decode by one C++ call, or None where the checked path must run.

    Over a short cache the kernel takes less time than the checks and dispatch around it (4 us against 22 at batch 1,
    8 / 4 heads of 64, 128 positions). So a plain eager CPU call (plain tensors, no gradient to record, no autocast,
    trace, mode or profiler) goes straight to it. transformers' (batch, heads, positions, head_dim) caches, seen
    transposed, are read in place by the decode kernel (up to 4 queries a sequence) or copied in C++.
    The kernel checks the shapes, dtypes, devices and lengths it reads and raises; the checked path then runs and
    names the bad argument."""
    if not (type(q) is type(k) is type(v) is torch.Tensor) or (
            kv_lengths is not None and type(kv_lengths) is not torch.Tensor):
        return None
    if q.dim() != 4 or not 1 <= q.shape[3] <= MAX_HEAD_DIM or q.dtype not in FLOAT_DTYPES:
        return None  # (resolve() would warn about a dtype the checked path refuses)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if torch._C._is_any_autocast_enabled() or torch.autograd.profiler._is_profiler_enabled or needs_dispatcher():
        return None
    if resolve(q) != "cpp":
        return None
    try:
        softmax_scale, left, right = _check_options(causal, softmax_scale, window, q.shape[3])
        out, lse = kernels("cpp", FAMILY).attention_dense(q, k, v, kv_lengths, softmax_scale, left, right)
    except (RuntimeError, TypeError, ValueError):
        return None
    if not return_lse:
        return out
    batch, seqlen_q, heads_q = q.shape[:3]
    return out, _public_lse(lse, q).view(heads_q, batch, seqlen_q).transpose(0, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              softmax_scale: Optional[float] = None, window: Optional[tuple] = None, return_lse: bool = False):
    """Fused attention over a dense batch.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), heads_q a multiple
    of heads_kv, head_dim in [1, 256]; one float dtype. causal aligns the queries to the end of the keys;
    window=(left, right) restricts query i to keys within [position - left, position + right] (None or -1:
    unbounded); softmax_scale defaults to 1/sqrt(head_dim).

    Returns out (batch, seqlen_q, heads_q, head_dim) in q's dtype, and with return_lse also the row
    log-sum-exp of the scaled scores, (batch, heads_q, seqlen_q) float32 (float64 for float64 inputs; -inf
    for a query that sees no key). The lse is differentiable.
    """
    direct = _attention_direct(q, k, v, None, causal, softmax_scale, window, return_lse)
    if direct is not None:
        return direct
    q, k, v = autocast_qkv(q, k, v)
    _check_qkv(q, k, v, ("batch", "seqlen_q"), ("batch", "seqlen_k"))
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1:3]
    softmax_scale, left, right = _check_options(causal, softmax_scale, window, head_dim)
    backend = resolve(q)
    if backend == "torch":
        return reference.attention(q, k, v, causal, softmax_scale, window, return_lse)
    out, lse = call_op(_attention, q.reshape(batch * seqlen_q, heads_q, head_dim).contiguous(),
                       k.reshape(batch * seqlen_k, heads_kv, head_dim).contiguous(),
                       v.reshape(batch * seqlen_k, heads_kv, head_dim).contiguous(), None, None, None, seqlen_q,
                       seqlen_k, softmax_scale, left, right, backend)
    out = out.view(batch, seqlen_q, heads_q, head_dim)
    return (out, _public_lse(lse, q).view(heads_q, batch, seqlen_q).transpose(0, 1)) if return_lse else out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, window: Optional[tuple] = None, return_lse: bool = False):
    """Fused attention over a packed batch of variable-length sequences (no padding).

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim). Sequence b is q rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] against k/v rows cu_seqlens_k[b]:cu_seqlens_k[b+1]; cu_seqlens_q and
    cu_seqlens_k are integer (batch + 1,) offsets starting at 0 and ending at the token counts, and no
    sequence is longer than max_seqlen_q / max_seqlen_k. Options as in `attention`, per sequence.

    Returns out (total_q, heads_q, head_dim), and with return_lse also lse (heads_q, total_q). Equal to
    `attention` on each sequence alone. The offsets are checked on the host (a device sync on CUDA).
    """
    q, k, v = autocast_qkv(q, k, v)
    _check_qkv(q, k, v, ("total_q",), ("total_k",))
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if not isinstance(cu_seqlens_q, torch.Tensor) or cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        shape = tuple(cu_seqlens_q.shape) if isinstance(cu_seqlens_q, torch.Tensor) else type(cu_seqlens_q).__name__
        raise ValueError(f"cu_seqlens_q must be a 1-D tensor of batch + 1 offsets, got {shape}")
    batch = cu_seqlens_q.shape[0] - 1
    cu_seqlens_q = _check_index("cu_seqlens_q", cu_seqlens_q, batch + 1, q.device)
    cu_seqlens_k = _check_index("cu_seqlens_k", cu_seqlens_k, batch + 1, q.device)
    softmax_scale, left, right = _check_options(causal, softmax_scale, window, q.shape[-1])
    backend = resolve(q)
    if backend == "torch":
        check_sequence_data(q, k, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k)
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                          softmax_scale, window, return_lse)
    out, lse = call_op(_attention, q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q, cu_seqlens_k, None,
                       max_seqlen_q, max_seqlen_k, softmax_scale, left, right, backend)
    return (out, _public_lse(lse, q)) if return_lse else out


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lengths: torch.Tensor, *,
                     causal: bool = False, softmax_scale: Optional[float] = None, window: Optional[tuple] = None,
                     return_lse: bool = False):
    """Attention of a few new queries per sequence against a KV cache filled to a per-sequence length.

    q: (batch, seqlen_q, heads_q, head_dim), usually seqlen_q = 1; k_cache, v_cache: (batch, cache_len,
    heads_kv, head_dim) with the new tokens' keys already written; kv_lengths: integer (batch,), each in
    [0, cache_len]. Sequence b attends to cache positions [0, kv_lengths[b]), its queries aligned to the end
    of them; positions past kv_lengths[b] are never read (they may hold anything). Options as in `attention`.

    Returns out like q, and with return_lse also lse (batch, heads_q, seqlen_q). Equal to `attention` on
    k_cache[b, :kv_lengths[b]] for each b. Differentiable like `attention` (cache positions past the length
    get zero gradient). The lengths are checked on the host (a device sync on CUDA).
    """
    direct = _attention_direct(q, k_cache, v_cache, kv_lengths, causal, softmax_scale, window, return_lse)
    if direct is not None:
        return direct
    q, k_cache, v_cache = autocast_qkv(q, k_cache, v_cache)
    _check_qkv(q, k_cache, v_cache, ("batch", "seqlen_q"), ("batch", "cache_len"),
               names=("q", "k_cache", "v_cache"))
    batch, seqlen_q, heads_q, head_dim = q.shape
    cache_len, heads_kv = k_cache.shape[1:3]
    kv_lengths = _check_index("kv_lengths", kv_lengths, batch, q.device)
    softmax_scale, left, right = _check_options(causal, softmax_scale, window, head_dim)
    backend = resolve(q)
    if backend == "torch":
        check_sequence_data(q, k_cache, None, None, kv_lengths, seqlen_q, cache_len)
        return reference.attention_decode(q, k_cache, v_cache, kv_lengths, causal, softmax_scale, window, return_lse)
    out, lse = call_op(_attention, q.reshape(batch * seqlen_q, heads_q, head_dim).contiguous(),
                       k_cache.reshape(batch * cache_len, heads_kv, head_dim).contiguous(),
                       v_cache.reshape(batch * cache_len, heads_kv, head_dim).contiguous(), None, None, kv_lengths,
                       seqlen_q, cache_len, softmax_scale, left, right, backend)
    out = out.view(batch, seqlen_q, heads_q, head_dim)
    return (out, _public_lse(lse, q).view(heads_q, batch, seqlen_q).transpose(0, 1)) if return_lse else out
