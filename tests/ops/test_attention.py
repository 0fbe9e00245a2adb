"""attention, attention_varlen, attention_decode: every backend x dtype x mask x heads x head dim x lengths vs
float64, plus rows that see no key, determinism, gradcheck, registration and bad input.

The C++ backend runs the full cross product; Triton in the interpreter (no GPU) a reduced set at small sizes,
since the interpreter runs every program as numpy (and cannot multiply bf16: it does the raw bits).
"""
import itertools

import pytest
import torch
from numerics import BACKEND_DEVICES, DTYPES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id, on_backend

from fastllm import ops
from fastllm.ops.attention import reference

ON_GPU = torch.cuda.is_available()
MASKS = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(13, 5)),  # sliding window, both sides
    "causal_window": dict(causal=True, window=(17, None)),  # local causal attention (Mistral)
}
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}  # (heads_q, heads_kv)
HEAD_DIMS = [16, 59, 64, 80, 128, 256]
# (seqlen_q, seqlen_k): single tokens, odd lengths, more keys than queries and fewer (bottom-right causal then
# leaves the first 90 queries with no key), one query against many keys, and lengths past a few tiles.
SEQLENS = [(1, 1), (17, 17), (113, 203), (203, 113), (1, 257), (257, 257)]


def _case_id(dtype, mask, heads, head_dim, seqlens):
    return f"{backend_id(dtype)}-{mask}-{heads}-d{head_dim}-{seqlens[0]}x{seqlens[1]}"


def _full_product(dtypes):
    return [pytest.param(*case, id=_case_id(*case))
            for case in itertools.product(dtypes, MASKS, HEADS, HEAD_DIMS, SEQLENS)]


# The interpreter's share: every mask, head layout and odd head dim once, at small lengths, fp32 and fp16.
_INTERPRETER_CASES = [
    (torch.float32, "full", "mha", 16, (1, 1)),
    (torch.float32, "causal", "gqa", 59, (17, 17)),
    (torch.float16, "causal", "mqa", 80, (20, 37)),
    (torch.float32, "causal", "gqa", 64, (37, 20)),  # queries with no key
    (torch.float16, "window", "mha", 32, (33, 33)),
    (torch.float32, "causal_window", "mqa", 111, (40, 40)),
    (torch.float16, "full", "gqa", 128, (1, 35)),
]
_SMALL_CASES = [pytest.param(*case, id=_case_id(*case)) for case in _INTERPRETER_CASES]


def _cases(backend):
    if backend == "cpp" or (backend == "triton" and ON_GPU):
        return _full_product(DTYPES)
    return _SMALL_CASES  # the torch reference itself, or the Triton interpreter


BACKEND_CASES = [pytest.param(backend, device, *case.values, id=f"{backend}-{case.id}")
                 for backend, device in BACKEND_DEVICES for case in _cases(backend)]


def make_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, seed=0):
    """q, k, v rounded to `dtype` (as float64 tensors holding those values) and float64 cotangents for the
    output and the lse."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    q = randn(batch, seqlen_q, heads_q, head_dim).to(dtype).double()
    k = randn(batch, seqlen_k, heads_kv, head_dim).to(dtype).double()
    v = randn(batch, seqlen_k, heads_kv, head_dim).to(dtype).double()
    dout = randn(batch, seqlen_q, heads_q, head_dim)
    dlse = randn(batch, heads_q, seqlen_q)
    return (q, k, v), (dout, dlse)


def run_attention(fn, inputs, cotangents, dtype, device, **options):
    """fn(q, k, v, return_lse=True, **options) in `dtype` on `device`, then backward of both outputs with the
    given cotangents. Returns (out, lse, dq, dk, dv), on the CPU."""
    leaves = [t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for t in inputs]
    out, lse = fn(*leaves, return_lse=True, **options)
    dout, dlse = cotangents
    torch.autograd.backward((out, lse), (dout.to(device=device, dtype=dtype), dlse.to(device=device, dtype=lse.dtype)))
    return [t.detach().cpu() for t in (out, lse, *(leaf.grad for leaf in leaves))]


def check_against_float64(fn, reference_fn, backend, device, dtype, inputs, cotangents, **options):
    with on_backend(backend):
        got = run_attention(fn, inputs, cotangents, dtype, device, **options)
    expected = run_attention(reference_fn, inputs, cotangents, torch.float64, "cpu", **options)
    baseline = run_attention(reference_fn, inputs, cotangents, dtype, "cpu", **options)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and all(g.dtype == dtype for g in got[2:])
    for name, actual, want, base in zip(("out", "lse", "dq", "dk", "dv"), got, expected, baseline):
        assert_matches_reference(name, actual, want, base)
    return got


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device,dtype,mask,heads,head_dim,seqlens", BACKEND_CASES)
def test_matches_float64(backend, device, dtype, mask, heads, head_dim, seqlens):
    (heads_q, heads_kv), (seqlen_q, seqlen_k) = HEADS[heads], seqlens
    inputs, cotangents = make_inputs(2, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype)
    check_against_float64(ops.attention, reference.attention, backend, device, dtype, inputs, cotangents,
                          **MASKS[mask])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_options_and_layouts(backend, device):
    """A custom softmax_scale and windows bounded on one side, on q/k/v that are transposed views of
    (batch, heads, seqlen, head_dim) tensors, as model code often holds them."""
    inputs, cotangents = make_inputs(2, 19, 23, 4, 2, 24, torch.float32)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs]
    assert not strided[0].is_contiguous()
    for options in (dict(softmax_scale=0.3), dict(window=(None, 2)), dict(window=(4, -1), causal=True)):
        check_against_float64(ops.attention, reference.attention, backend, device, torch.float32, strided, cotangents,
                              **options)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_rows_without_keys_give_zero_not_nan(backend, device):
    """Bottom-right causal with more queries than keys: the first rows see nothing. Output 0, lse -inf, and
    exactly zero gradient from those rows."""
    inputs, cotangents = make_inputs(1, 37, 20, 2, 1, 32, torch.float32)
    with on_backend(backend):
        out, lse, dq, dk, dv = run_attention(ops.attention, inputs, cotangents, torch.float32, device, causal=True)
    blind = slice(0, 17)  # query i sees keys up to i + 20 - 37
    assert torch.all(out[:, blind] == 0) and torch.all(lse[:, :, blind] == float("-inf"))
    assert torch.all(dq[:, blind] == 0)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv)) and torch.isfinite(lse[:, :, 17:]).all()


# Every backend on a short sequence; the C++ kernels also past one 512-key step, on the 16-bit path too.
NAN_CASES = [(b, d, torch.float32, 40) for b, d in BACKEND_DEVICES] + [
    ("cpp", "cpu", torch.float32, 600), ("cpp", "cpu", torch.bfloat16, 600)]


@pytest.mark.parametrize("backend,device,dtype,seqlen", NAN_CASES,
                         ids=[f"{b}-{backend_id(t)}-{n}" for b, _, t, n in NAN_CASES])
def test_nan_reaches_exactly_the_outputs_that_depend_on_it(backend, device, dtype, seqlen):
    """A NaN in one query row makes that row's output NaN; a NaN in one key makes NaN every causal row that sees
    it (as SDPA's outputs are), and leaves the rest finite: the kernels' one-instruction max and exp keep NaN."""
    inputs, _ = make_inputs(1, seqlen, seqlen, 2, 1, 64, dtype)
    q, k, v = (t.to(device=device, dtype=dtype) for t in inputs)
    bad_row, bad_key = 5, seqlen - 7
    q_nan = q.clone()
    q_nan[0, bad_row, 1, 3] = float("nan")
    k_nan = k.clone()
    k_nan[0, bad_key, 0, 0] = float("nan")
    with on_backend(backend), torch.no_grad():
        out_q = ops.attention(q_nan, k, v).cpu().float()
        out_k = ops.attention(q, k_nan, v, causal=True).cpu().float()
    nan_q = torch.zeros(out_q.shape, dtype=torch.bool)
    nan_q[0, bad_row, 1] = True
    assert torch.equal(out_q.isnan(), nan_q) and torch.isfinite(out_q[~nan_q]).all()
    nan_k = torch.zeros(out_k.shape, dtype=torch.bool)
    nan_k[0, bad_key:] = True  # query i sees keys 0..i
    assert torch.equal(out_k.isnan(), nan_k) and torch.isfinite(out_k[~nan_k]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_no_keys_at_all(backend, device):
    inputs, cotangents = make_inputs(2, 5, 0, 2, 2, 16, torch.float32)
    with on_backend(backend):
        out, lse, dq, dk, dv = run_attention(ops.attention, inputs, cotangents, torch.float32, device)
    assert torch.all(out == 0) and torch.all(lse == float("-inf")) and torch.all(dq == 0)
    assert dk.shape == (2, 0, 2, 16)


# ---------------------------------------------------------------------------------------------------------
# Packed variable-length batches and decoding
# ---------------------------------------------------------------------------------------------------------
def _cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# (query lengths, key lengths): an empty sequence, one token, a sequence with fewer keys than queries, and
# lengths around the tile sizes (64).
VARLEN_LENGTHS = ([3, 0, 1, 70, 33, 65], [5, 4, 1, 70, 20, 130])


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_varlen_equals_loop_over_sequences(backend, device, mask):
    lengths_q, lengths_k = VARLEN_LENGTHS
    if backend == "triton" and not ON_GPU:  # keep the interpreter's share small
        lengths_q, lengths_k = [3, 0, 17, 20], [5, 2, 17, 33]
    cu_q, cu_k = _cu_seqlens(lengths_q), _cu_seqlens(lengths_k)
    inputs, cotangents = make_inputs(1, sum(lengths_q), sum(lengths_k), 4, 2, 40, torch.float32)
    packed = [t[0] for t in inputs]
    dout, dlse = cotangents[0][0], cotangents[1][0]
    args = (cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k))

    def varlen(q, k, v, **options):
        return ops.attention_varlen(q, k, v, *args, **options)

    def loop(q, k, v, **options):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), **options)

    got = check_against_float64(varlen, loop, backend, device, torch.float32, packed, (dout, dlse), **MASKS[mask])
    # The forward is per sequence: the same bits as the dense op on each sequence alone.
    with on_backend(backend):
        for b in range(len(lengths_q)):
            rows = slice(cu_q[b], cu_q[b + 1])
            keys = slice(cu_k[b], cu_k[b + 1])
            q, k, v = (t[None].to(device=device, dtype=torch.float32) for t in (packed[0][rows], packed[1][keys],
                                                                                  packed[2][keys]))
            out, lse = ops.attention(q, k, v, return_lse=True, **MASKS[mask])
            assert torch.equal(out[0].cpu(), got[0][rows]) and torch.equal(lse[0].cpu(), got[1][:, rows])


# The C++ decode kernel's register blocking: query heads per kv head (groups of up to 4 in registers, then the
# rest), head_dim vectors in groups of 4 plus a remainder (80 fp32: 4 + 1, 59: a partial vector), key blocks of
# 32 cut short (70 keys), four-key score chains with a remainder, and an empty cache row.
DECODE_BLOCKING = [(2, 1, 80, torch.float32), (10, 2, 59, torch.float32), (8, 1, 128, torch.bfloat16),
                   (6, 2, 80, torch.bfloat16)]


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("heads_q,heads_kv,head_dim,dtype", DECODE_BLOCKING,
                         ids=[f"{q}-{kv}-d{d}-{backend_id(t)}" for q, kv, d, t in DECODE_BLOCKING])
def test_cpp_decode_kernel_blocking(heads_q, heads_kv, head_dim, dtype):
    kv_lengths = torch.tensor([70, 0, 3, 33])
    inputs, cotangents = make_inputs(4, 1, 72, heads_q, heads_kv, head_dim, dtype)

    def decode(q, k, v, **options):
        return ops.attention_decode(q, k, v, kv_lengths, **options)

    def full(q, k, v, **options):
        return reference.attention_decode(q, k, v, kv_lengths, **options)

    check_against_float64(decode, full, "cpp", "cpu", dtype, inputs, cotangents)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_decode_equals_attention_on_the_filled_cache(backend, device, seqlen_q):
    """Each sequence attends to its first kv_lengths[b] cache positions; the rest hold NaN and are never read."""
    kv_lengths = torch.tensor([5, 0, 70, 1])
    cache_len = 72
    inputs, cotangents = make_inputs(4, seqlen_q, cache_len, 4, 1, 48, torch.float32)
    q, k_cache, v_cache = inputs
    past_end = torch.arange(cache_len)[None, :] >= kv_lengths[:, None]
    k_cache, v_cache = (t.masked_fill(past_end[:, :, None, None], float("nan")) for t in (k_cache, v_cache))

    def decode(q, k, v, **options):
        return ops.attention_decode(q, k, v, kv_lengths.to(device), **options)

    def full(q, k, v, **options):
        return reference.attention_decode(q, k, v, kv_lengths, **options)

    got = check_against_float64(decode, full, backend, device, torch.float32, (q, k_cache, v_cache), cotangents,
                                causal=True)
    out, lse, _, dk_cache, dv_cache = got
    assert torch.all(dk_cache[past_end] == 0) and torch.all(dv_cache[past_end] == 0)
    with on_backend(backend):  # the same bits as attention on the filled part of each cache
        for b, length in enumerate(kv_lengths.tolist()):
            q_b, k_b, v_b = (t.to(device=device, dtype=torch.float32) for t in (q[b:b + 1], k_cache[b:b + 1, :length],
                                                                                 v_cache[b:b + 1, :length]))
            out_b, lse_b = ops.attention(q_b, k_b, v_b, causal=True, return_lse=True)
            assert torch.equal(out_b.cpu(), out[b:b + 1]) and torch.equal(lse_b.cpu(), lse[b:b + 1])


# ---------------------------------------------------------------------------------------------------------
# Determinism and gradcheck
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_backward_is_deterministic(backend, device):
    """Repeated backward passes give the same bits. One sequence with one kv head makes the C++ backward split
    the keys into chunks whose partial dQ sums are added at the end; the thread count must not matter."""
    seqlen = 300 if backend == "cpp" else 40
    inputs, cotangents = make_inputs(1, seqlen, seqlen, 4, 1, 64, torch.float32)
    threads = torch.get_num_threads()
    with on_backend(backend):
        first = run_attention(ops.attention, inputs, cotangents, torch.float32, device, causal=True)
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            second = run_attention(ops.attention, inputs, cotangents, torch.float32, device, causal=True)
        finally:
            torch.set_num_threads(threads)
        third = run_attention(ops.attention, inputs, cotangents, torch.float32, device, causal=True)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name} differs between runs"


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(2, 1)), dict(causal=True, window=(1, 0))],
                         ids=["full", "causal", "window", "causal_window"])
def test_gradcheck_float64(options):
    """The C++ kernel in float64 against finite differences, through both outputs (out and lse)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=generator).requires_grad_()
    k = torch.randn(2, 7, 2, 6, dtype=torch.float64, generator=generator).requires_grad_()
    v = torch.randn(2, 7, 2, 6, dtype=torch.float64, generator=generator).requires_grad_()

    def fn(q, k, v):
        out, lse = ops.attention(q, k, v, return_lse=True, **options)
        return out, lse.masked_fill(lse == float("-inf"), 0.0)

    with on_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (q, k, v))


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, from every backend
# ---------------------------------------------------------------------------------------------------------
def _dense(batch=2, seqlen_q=5, seqlen_k=7, heads_q=4, heads_kv=2, head_dim=16):
    return make_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.float32)[0]


def _float32(*tensors):
    return [t.float() for t in tensors]


BAD_DENSE = [
    (lambda q, k, v: ops.attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
     ValueError, r"q's number of heads \(4\) must be a multiple of k's and v's \(3\)"),
    (lambda q, k, v: ops.attention(q, k[..., :8], v[..., :8]), ValueError,
     r"k's head_dim \(8\) must equal q's head_dim \(16\)"),
    (lambda q, k, v: ops.attention(q, k, v[:, :3]), ValueError, r"v must have k's shape"),
    (lambda q, k, v: ops.attention(q, k[:1], v[:1]), ValueError, "k and v must have q's batch size 2"),
    (lambda q, k, v: ops.attention(q[0], k[0], v[0]), ValueError, r"q must be 4-D \(batch, seqlen_q, heads_q"),
    (lambda q, k, v: ops.attention(q, k.double(), v.double()), TypeError, "k must have q's dtype"),
    (lambda q, k, v: ops.attention(q.long(), k, v), TypeError, "q must have dtype in"),
    (lambda q, k, v: ops.attention(q, k.to("meta"), v.to("meta")), ValueError, "one device"),
    (lambda q, k, v: ops.attention(*(t.new_zeros(*t.shape[:-1], 300) for t in (q, k, v))), ValueError,
     r"head_dim must be in \[1, 256\]"),
    (lambda q, k, v: ops.attention(q, k, v, window=(3,)), ValueError, "window must be None or a pair"),
    (lambda q, k, v: ops.attention(q, k, v, window=(-2, 0)), ValueError, "window must be None or a pair"),
    (lambda q, k, v: ops.attention(q, k, v, softmax_scale=0.0), ValueError, "softmax_scale must be a positive"),
    (lambda q, k, v: ops.attention(q, k, v, causal=1), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize("call,error,message", BAD_DENSE,
                         ids=["heads", "head_dim", "v-shape", "batch", "ndim", "dtype", "int", "device",
                              "head_dim>256", "window-len", "window-neg", "scale", "causal"])
def test_bad_input(call, error, message):
    q, k, v = _float32(*_dense())
    with pytest.raises(error, match=message):
        call(q, k, v)


def _varlen_call(cu_q, cu_k, max_q=4, max_k=6, total_q=7, total_k=9):
    q = torch.randn(total_q, 4, 16)
    k, v = torch.randn(total_k, 2, 16), torch.randn(total_k, 2, 16)
    return lambda: ops.attention_varlen(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), max_q, max_k)


BAD_SEQUENCES = [
    (_varlen_call([1, 3, 7], [0, 3, 9]), "cu_seqlens_q\\[0\\] must be 0, got 1"),
    (_varlen_call([0, 3, 8], [0, 3, 9]), r"cu_seqlens_q\[-1\] must be the number of tokens \(7\), got 8"),
    (_varlen_call([0, 5, 3, 7], [0, 3, 5, 9], max_q=8), r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[2\] = 3"),
    (_varlen_call([0, 3, 7], [0, 1, 9]), r"sequence 1 has 8 keys \(cu_seqlens_k\), more than max_seqlen_k = 6"),
    (_varlen_call([0, 3, 7], [0, 9]), r"cu_seqlens_k must have shape \(3,\)"),
    (_varlen_call([0, 3, 7], [0.0, 3.0, 9.0]), "cu_seqlens_k must have an integer dtype"),
    (_varlen_call([0, 3, 7], [0, 3, 9], max_q=-1), "max_seqlen_q must be an int >= 0"),
]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
@pytest.mark.parametrize("call,message", BAD_SEQUENCES,
                         ids=["start", "end", "decreasing", "too-long", "count", "float", "max"])
def test_bad_cu_seqlens(backend, device, call, message):
    if device != "cpu":
        pytest.skip("the calls build CPU tensors; the check itself is device-independent")
    with on_backend(backend), pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=[b for b, _ in BACKEND_DEVICES])
def test_bad_kv_lengths(backend, device):
    q, k, v = (t.to(device) for t in _float32(*_dense(seqlen_q=1)))
    with on_backend(backend):
        with pytest.raises(ValueError, match=r"kv_lengths\[1\] = 8 must be in \[0, 7\]"):
            ops.attention_decode(q, k, v, torch.tensor([3, 8], device=device))
        with pytest.raises(ValueError, match=r"kv_lengths must have shape \(2,\)"):
            ops.attention_decode(q, k, v, torch.tensor([3], device=device))
        with pytest.raises(ValueError, match="k_cache and v_cache must have q's batch size"):
            ops.attention_decode(q, k[:1], v[:1], torch.tensor([3, 3], device=device))


DIRECT_DECODE = [  # (batch, seqlen_q, heads_q, heads_kv, head_dim, dtype, lengths dtype, options)
    (1, 1, 8, 4, 64, torch.float32, torch.int64, dict()),
    (3, 1, 6, 2, 59, torch.bfloat16, torch.int32, dict(causal=True)),
    (2, 3, 4, 1, 128, torch.float16, torch.int64, dict(causal=True, window=(5, None))),
    (3, 2, 2, 2, 16, torch.float64, torch.int32, dict(softmax_scale=0.3)),
]


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("batch,seqlen_q,heads_q,heads_kv,head_dim,dtype,lengths_dtype,options", DIRECT_DECODE,
                         ids=[f"{c[0]}x{c[1]}-{c[2]}/{c[3]}-d{c[4]}-{backend_id(c[5])}" for c in DIRECT_DECODE])
@pytest.mark.parametrize("return_lse", [False, True])
def test_cpp_decode_direct_call_equals_the_checked_path(monkeypatch, batch, seqlen_q, heads_q, heads_kv, head_dim,
                                                        dtype, lengths_dtype, options, return_lse):
    """Without a gradient to record, attention_decode calls the C++ kernel straight (one binding call, no views or
    int32 copy in Python); it gives the checked path's bits, including under poisoned outputs."""
    from fastllm import _cpp

    generator = torch.Generator().manual_seed(batch * 10 + seqlen_q)
    cache_len = 37
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(batch, cache_len, heads_kv, head_dim, generator=generator).to(dtype) for _ in range(2))
    lengths = torch.randint(seqlen_q, cache_len + 1, (batch,), generator=generator).to(lengths_dtype)
    if batch == 3:  # transformers' (batch, heads, positions, head_dim) cache, seen transposed: read in place
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    module, calls = _cpp.load(), []
    direct = module.attention_dense
    monkeypatch.setattr(module, "attention_dense", lambda *args: calls.append(args) or direct(*args))
    with on_backend("cpp"):
        with torch.no_grad():
            got = ops.attention_decode(q, k, v, lengths, return_lse=return_lse, **options)
        assert len(calls) == 1
        checked = ops.attention_decode(q.requires_grad_(), k, v, lengths, return_lse=return_lse, **options)
        assert len(calls) == 1  # a gradient to record: the checked path (and its autograd formula)
    for a, b in zip(got if return_lse else [got], checked if return_lse else [checked]):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.detach())


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=backend_id)
@pytest.mark.parametrize("layout", ["contiguous", "heads_major"])
@pytest.mark.parametrize("seqlen_q", [1, 3, 5])
def test_cpp_attention_direct_call_equals_the_checked_path(monkeypatch, dtype, layout, seqlen_q):
    """ops.attention without a gradient to record is one C++ call too, on contiguous tensors and on transformers'
    (batch, heads, positions, head_dim) tensors seen transposed (up to 4 queries a sequence, the decode kernel
    reads those in place; more are copied first); the same bits as the checked path."""
    from fastllm import _cpp

    module, calls = _cpp.load(), []
    direct = module.attention_dense
    monkeypatch.setattr(module, "attention_dense", lambda *args: calls.append(args) or direct(*args))
    generator = torch.Generator().manual_seed(seqlen_q)
    shapes = ((2, 6, seqlen_q, 32), (2, 2, 9, 32), (2, 2, 9, 32))  # (batch, heads, positions, head_dim)
    q, k, v = (torch.randn(*shape, generator=generator).to(dtype) for shape in shapes)
    q, k, v = (t.transpose(1, 2) if layout == "heads_major" else t.transpose(1, 2).contiguous() for t in (q, k, v))
    with on_backend("cpp"):
        for options in (dict(causal=True), dict(window=(3, 1), return_lse=True)):
            with torch.no_grad():
                got = ops.attention(q, k, v, **options)
            checked = ops.attention(q.clone().requires_grad_(), k, v, **options)
            got, checked = (out if isinstance(out, tuple) else (out,) for out in (got, checked))
            for a, b in zip(got, checked):
                assert a.shape == b.shape and torch.equal(a, b.detach())
    assert len(calls) == 2


def test_cpp_decode_direct_call_leaves_odd_inputs_to_the_checked_path(monkeypatch):
    """What the direct call's kernel refuses (int16 lengths, out-of-range lengths, a batch mismatch, mixed dtypes)
    goes to the checked path: computed there, or refused with its error. Strided caches are taken (copied in C++)."""
    from fastllm import _cpp

    module, calls = _cpp.load(), []
    direct = module.attention_dense
    monkeypatch.setattr(module, "attention_dense", lambda *args: calls.append(args) or direct(*args))
    q, k, v = _float32(*_dense(seqlen_q=1))
    lengths = torch.tensor([3, 7])
    with on_backend("cpp"), torch.no_grad():
        expected = ops.attention_decode(q, k, v, lengths)
        assert len(calls) == 1
        strided = ops.attention_decode(q, *(torch.cat([t, t], dim=2)[:, :, :t.shape[2]] for t in (k, v)), lengths)
        assert len(calls) == 2 and torch.equal(strided, expected)
        assert torch.equal(ops.attention_decode(q, k, v, lengths.to(torch.int16)), expected)
        assert len(calls) == 3  # the kernel refused int16; the checked path took it
        with pytest.raises(ValueError, match=r"kv_lengths\[1\] = 8 must be in \[0, 7\]"):
            ops.attention_decode(q, k, v, torch.tensor([3, 8]))
        with pytest.raises(ValueError, match="k_cache and v_cache must have q's batch size"):
            ops.attention_decode(q, k[:1], v[:1], lengths)
        with pytest.raises(TypeError, match="k_cache must have q's dtype"):
            ops.attention_decode(q, k.double(), v.double(), lengths)


def test_cpp_kernel_checks_offsets_itself():
    """The C++ kernel refuses offsets past the tensors even when called directly, past the Python checks."""
    from fastllm import _cpp

    q, k = torch.randn(7, 4, 16), torch.randn(9, 2, 16)
    cu_q, cu_k = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([0, 3, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k\[-1\] must be the number of tokens, 9, got 12"):
        _cpp.load().attention_forward(q, k, k, cu_q, cu_k, None, 4, 9, 0.25, -1, -1)


# The C++ kernel's bf16 and fp16 tile GEMMs run by default in 16-bit tiles on ATen's brgemm on CPUs whose oneDNN
# has 16-bit brgemm micro-kernels (AMX), elsewhere in fp32 tiles on fastllm's register micro-kernel;
# set_attention_gemm (FASTLLM_CPU_ATTENTION_GEMM) picks one, and bench/attention_grid.py compares them. The full
# product above runs the default; this runs each engine on every dtype and mask over a multi-step, an odd-head-
# dim, a one-query, a more-queries-than-keys and a head-dim-256 case.
GEMM_ENGINE_CASES = [pytest.param(engine, dtype, mask, case, id=f"{engine}-{_case_id(dtype, mask, *case)}")
                     for engine, dtype, mask, case in
                     itertools.product(("blas", "registers"), DTYPES, MASKS,
                                       [("gqa", 59, (113, 203)), ("mha", 128, (257, 257)), ("mqa", 16, (1, 257)),
                                        ("gqa", 64, (203, 113)), ("mha", 256, (17, 17))])]


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("engine,dtype,mask,case", GEMM_ENGINE_CASES)
def test_cpp_gemm_engines_match_float64(engine, dtype, mask, case):
    from fastllm import _cpp

    heads, head_dim, (seqlen_q, seqlen_k) = case
    inputs, cotangents = make_inputs(2, seqlen_q, seqlen_k, *HEADS[heads], head_dim, dtype)
    previous = _cpp.load().set_attention_gemm(engine)
    try:
        check_against_float64(ops.attention, reference.attention, "cpp", "cpu", dtype, inputs, cotangents,
                              **MASKS[mask])
    finally:
        assert _cpp.load().set_attention_gemm(previous) == engine


def test_set_attention_gemm_names_the_engines(monkeypatch):
    from fastllm import _cpp

    with pytest.raises(RuntimeError, match="engine must be 'blas' or 'registers', got 'mkl'"):
        _cpp.load().set_attention_gemm("mkl")
    assert _cpp.load().set_attention_gemm("blas") == "blas"  # the default, returned as the previous
    monkeypatch.setenv(_cpp.ATTENTION_GEMM_VARIABLE, "mkl")
    _cpp.load.cache_clear()
    try:
        with pytest.raises(ValueError, match="FASTLLM_CPU_ATTENTION_GEMM must be 'blas' or 'registers', got 'mkl'"):
            _cpp.load()
        monkeypatch.setenv(_cpp.ATTENTION_GEMM_VARIABLE, "registers")
        _cpp.load.cache_clear()
        assert _cpp.load().set_attention_gemm("blas") == "registers"  # the variable set it
    finally:
        _cpp.load.cache_clear()
        _cpp.load().set_attention_gemm("blas")


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True) see one node per op
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_opcheck(backend, device):
    (q, k, v), _ = make_inputs(2, 5, 6, 4, 2, 16, torch.float32)
    q, k, v = (t.float().reshape(-1, *t.shape[2:]).to(device).requires_grad_() for t in (q, k, v))
    cu_q = torch.tensor([0, 2, 10], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 7, 12], dtype=torch.int32, device=device)
    kv_lengths = torch.tensor([6, 3], dtype=torch.int32, device=device)
    for args in [(q, k, v, None, None, None, 5, 6, 0.25, -1, -1),  # dense
                 (q, k, v, None, None, kv_lengths, 5, 6, 0.25, -1, 0),  # decode, causal
                 (q, k, v, cu_q, cu_k, None, 8, 7, 0.3, 2, 1)]:  # varlen, window
        torch.library.opcheck(torch.ops.fastllm.attention.default, (*args, backend))
        with torch.no_grad():
            out, lse = torch.ops.fastllm.attention.default(*args, backend)
        dout, dlse = torch.randn_like(out), torch.randn_like(lse)
        torch.library.opcheck(torch.ops.fastllm.attention_backward.default,
                              (dout, q.detach(), k.detach(), v.detach(), out, lse, dlse, *args[3:], backend))


def _attention_loss(q, k, v, cu_q, cu_k):
    out, lse = ops.attention(q, k, v, causal=True, return_lse=True)
    packed = ops.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 13, 11,
                                  window=(3, 2))
    return (out * out).sum() + lse.sum() + packed.sum()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=[b for b, _ in KERNEL_BACKEND_DEVICES])
def test_compile_fullgraph(backend, device, compile_backend):
    (q, k, v), _ = make_inputs(2, 9, 11, 4, 2, 16, torch.float32)
    q, k, v = (t.float().to(device) for t in (q, k, v))
    cu_q = torch.tensor([0, 5, 18], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 11, 22], dtype=torch.int32, device=device)
    with on_backend(backend):
        eager_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        eager = _attention_loss(*eager_leaves, cu_q, cu_k)
        eager.backward()
        torch._dynamo.reset()
        compiled_fn = torch.compile(_attention_loss, fullgraph=True, backend=compile_backend)
        compiled_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        compiled = compiled_fn(*compiled_leaves, cu_q, cu_k)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
