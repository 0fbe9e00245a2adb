"""Benchmark cases for the attention family (fastllm/ops/attention.py): inputs, baselines, FLOP counts.

batch x heads x seqlen x head_dim, causal and not. On the CPU in fp32: 4 x 8 x {512, 1024, 2048} x 64 and
4 x 8 x 1024 x 128 (4096 would take eager ~20 s a run and 8 GiB for its score matrices). The headline is
causal 4 x 8 x 2048 x 64, forward+backward, on the C++ backend: fastllm targets >= 3x over eager and at least
torch SDPA's speed, with peak memory growing linearly with seqlen (eager's grows with its square). On a GPU
in bf16: 4 x 8 x {1024, 4096} x 128 and 1 x 8 x {8192, 16384} x 128 (batch 1 at the long lengths keeps
eager's score matrices at 4 GiB), against SDPA's flash backend.

Grouped-query attention (Llama's layout: 16 query heads reading 4 key/value heads, head dim 128; and 8:1)
adds the peer "sdpa[enable_gqa]", SDPA reading the shared key/value heads itself; "sdpa" and eager repeat
them to every query head first, as model code did before enable_gqa. Shape labels read
batch x heads x seqlen x head_dim, heads as q/kv when they differ.

Every variant takes q, k, v as (batch, seqlen, heads, head_dim), fastllm's layout; the baselines move heads
in front as views, as model code does, and SDPA reads the strided views without copying.

attention_decode (forward only: a decode step) is one new query per row against a KV cache of S positions
filled to per-row lengths in [S/2, S], batch 1 and 8, Llama-style 8 query / 4 key-value heads at head dim 64 and
32 / 8 at 128, S in {128, 1024, 4096}. The peers read the whole cache under a length mask, as HF's decode does:
eager (matmul, masked softmax, matmul), SDPA with enable_gqa and the boolean mask, and torch.compile of eager.
"""
import torch
import torch.nn.functional as F

import fastllm
from bench.harness import Case, Cost, standard_variants

# (batch, query heads, key/value heads, seqlen, head_dim)
CPU_SHAPES = [(4, 8, 8, 512, 64), (4, 8, 8, 1024, 64), (4, 8, 8, 2048, 64), (4, 8, 8, 1024, 128),
              (2, 16, 4, 1024, 128), (2, 32, 4, 1024, 64)]
GPU_SHAPES = [(4, 8, 8, 1024, 128), (4, 8, 8, 4096, 128), (1, 8, 8, 8192, 128), (1, 8, 8, 16384, 128),
              (4, 32, 8, 4096, 128)]
QUICK_SHAPES = [(1, 2, 2, 128, 64), (1, 4, 2, 128, 64)]


# ---------------------------------------------------------------------------------------------------------
# Baselines: what a user writes without fastllm
# ---------------------------------------------------------------------------------------------------------
def _shared_heads_repeated(q, k, v):
    """k and v with each key/value head repeated for the query heads that read it (a no-op for MHA)."""
    group = q.shape[2] // k.shape[2]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


def eager_attention(q, k, v, causal):
    """matmul, mask, softmax, matmul: the (B, H, T, T) scores and probabilities are materialised."""
    k, v = _shared_heads_repeated(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1]**-0.5
    if causal:
        seqlen = q.shape[-2]
        future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def sdpa_attention(q, k, v, causal):
    """torch's fused scaled_dot_product_attention (a flash kernel on the CPU, and on the GPU in bf16)."""
    k, v = _shared_heads_repeated(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def sdpa_gqa_attention(q, k, v, causal):
    """SDPA with enable_gqa: it reads each shared key/value head for its group of query heads itself."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2)


# fastllm.ops is looked up at call time: nothing is imported or built until a case runs.
def fastllm_attention(q, k, v, causal):
    return fastllm.ops.attention(q, k, v, causal=causal)


def _with_mask(fn, causal):
    def call(q, k, v):
        return fn(q, k, v, causal)
    call.__name__ = f"{fn.__name__}_{'causal' if causal else 'full'}"
    return call


def _variants(causal, grouped):
    native = {"sdpa": _with_mask(sdpa_attention, causal)}
    if grouped:
        native["sdpa[enable_gqa]"] = _with_mask(sdpa_gqa_attention, causal)
    return standard_variants(_with_mask(eager_attention, causal), _with_mask(fastllm_attention, causal), native)


# ---------------------------------------------------------------------------------------------------------
# Work: 4 b h s^2 d FLOPs for the forward (two matmuls of 2 b h s^2 d), 2.5x that for the backward (five),
# halved when causal. forward_backward counts both passes: 3.5x the forward.
# ---------------------------------------------------------------------------------------------------------
def _flops(batch, heads, seqlen, head_dim, causal):  # heads: the query heads
    forward = 4 * batch * heads * seqlen**2 * head_dim / (2 if causal else 1)
    return Cost(forward=forward, forward_backward=3.5 * forward)


def _inputs(batch, heads_q, heads_kv, seqlen, head_dim):
    def make_inputs(device, dtype):
        generator = torch.Generator(device).manual_seed(0)
        return tuple(torch.randn(batch, seqlen, heads, head_dim, generator=generator, device=device,
                                 dtype=dtype).requires_grad_() for heads in (heads_q, heads_kv, heads_kv))
    return make_inputs


# ---------------------------------------------------------------------------------------------------------
# Decode: one query per row against a cache filled to per-row lengths
# ---------------------------------------------------------------------------------------------------------
DECODE_CPU_SHAPES = [(batch, heads_q, heads_kv, cache, head_dim) for batch in (1, 8)
                     for heads_q, heads_kv, head_dim in ((8, 4, 64), (32, 8, 128)) for cache in (128, 1024, 4096)]
DECODE_GPU_SHAPES = [(batch, 32, 8, cache, 128) for batch in (1, 8, 64) for cache in (1024, 8192)]
DECODE_QUICK_SHAPES = [(2, 4, 2, 64, 16)]


def _length_mask(k_cache, lengths):
    """(batch, 1, 1, cache) True where a cache position is filled, SDPA's boolean attn_mask."""
    return (torch.arange(k_cache.shape[1], device=k_cache.device) < lengths[:, None])[:, None, None, :]


def eager_attention_decode(q, k_cache, v_cache, lengths):
    k_cache, v_cache = _shared_heads_repeated(q, k_cache, v_cache)
    q, k, v = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1]**-0.5
    scores = scores.masked_fill(~_length_mask(k_cache, lengths), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)


def sdpa_gqa_attention_decode(q, k_cache, v_cache, lengths):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=_length_mask(k_cache, lengths), enable_gqa=True)
    return out.transpose(1, 2)


def fastllm_attention_decode(q, k_cache, v_cache, lengths):
    return fastllm.ops.attention_decode(q, k_cache, v_cache, lengths)


def _decode_inputs(batch, heads_q, heads_kv, cache, head_dim):
    def make_inputs(device, dtype):
        generator = torch.Generator(device).manual_seed(0)
        q = torch.randn(batch, 1, heads_q, head_dim, generator=generator, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(batch, cache, heads_kv, head_dim, generator=generator, device=device,
                                        dtype=dtype) for _ in range(2))
        lengths = torch.randint(cache // 2, cache + 1, (batch,), generator=generator, device=device)
        return q, k_cache, v_cache, lengths
    return make_inputs


def _shapes_and_dtype(device, quick, quick_shapes, cpu_shapes, gpu_shapes):
    """Quick sizes in fp32, else the GPU's in bf16 or the CPU's in fp32."""
    if quick:
        return quick_shapes, torch.float32
    return (gpu_shapes, torch.bfloat16) if device.type == "cuda" else (cpu_shapes, torch.float32)


def _decode_cases(device, quick):
    shapes, dtype = _shapes_and_dtype(device, quick, DECODE_QUICK_SHAPES, DECODE_CPU_SHAPES, DECODE_GPU_SHAPES)
    variants = standard_variants(eager_attention_decode, fastllm_attention_decode,
                                 {"sdpa[enable_gqa]": sdpa_gqa_attention_decode})
    # Work: 4 b h L d FLOPs over the filled positions, L = 0.75 S on average (lengths uniform in [S/2, S]).
    return [Case(op="attention_decode", shape=f"{batch}x{heads_q}/{heads_kv}x{cache}x{head_dim}", dtype=dtype,
                 make_inputs=_decode_inputs(batch, heads_q, heads_kv, cache, head_dim), variants=variants,
                 flops=Cost(forward=4 * batch * heads_q * 0.75 * cache * head_dim, forward_backward=None))
            for batch, heads_q, heads_kv, cache, head_dim in shapes]


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    shapes, dtype = _shapes_and_dtype(device, quick, QUICK_SHAPES, CPU_SHAPES, GPU_SHAPES)
    result = []
    for causal in (True, False):
        for batch, heads_q, heads_kv, seqlen, head_dim in shapes:
            heads = f"{heads_q}" if heads_q == heads_kv else f"{heads_q}/{heads_kv}"
            result.append(Case(op="attention_causal" if causal else "attention",
                               shape=f"{batch}x{heads}x{seqlen}x{head_dim}", dtype=dtype,
                               make_inputs=_inputs(batch, heads_q, heads_kv, seqlen, head_dim),
                               variants=_variants(causal, grouped=heads_q != heads_kv),
                               flops=_flops(batch, heads_q, seqlen, head_dim, causal)))
    return result + _decode_cases(device, quick)
