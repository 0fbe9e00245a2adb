"""linear_token_logprobs, linear_cross_entropy, linear_ppo_loss, linear_dpo_loss: every backend x dtype vs a
float64 reference that materialises the logits, values and every gradient, plus cost and registration checks."""
import pytest
import torch
from numerics import (BACKEND_DEVICES, DTYPES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id,
                      on_backend)

from fastllm import ops
from fastllm.ops import _chunked_head, fused_linear, rl
from fastllm.ops.fused_linear import reference

IGNORE = -100
BACKEND_IDS = [b for b, _ in BACKEND_DEVICES]
KERNEL_IDS = [b for b, _ in KERNEL_BACKEND_DEVICES]
# Token shape, hidden size, vocabulary: odd counts, a vocabulary that is not a power of two, 3-D hidden states.
SHAPES = [((7,), 16, 37), ((2, 5), 24, 301)]
# (bias, chunk_size): bias with chunks that do not divide the token count (7 -> 2+2+3, 10 -> 3+3+4), and
# no bias with the automatic chunk size.
CONFIGS = {"bias-chunk3": (True, 3), "nobias-auto": (False, None)}
# Log-ratios of the policy to the old policy, away from the clip boundaries (log 0.8, log 1.2) by more than
# bf16's error on a log-prob, so every backend picks the same side of each clip: below, inside (x2), above,
# and far above (ratio 4.5 > dual_clip for negative advantages).
LOG_RATIOS = torch.tensor([-0.6, -0.02, 0.03, 0.5, 1.5], dtype=torch.float64)
PPO_ARGS = dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01, temperature=0.9)


def make_projection(token_shape, hidden_size, vocab, dtype, bias, ignore_fraction=0.25):
    """hidden, weight, bias (or None), labels: values rounded to `dtype` (float64 copies hold the same values)."""
    def rounded(*shape, scale=1.0):
        return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)

    hidden = rounded(*token_shape, hidden_size)
    weight = rounded(vocab, hidden_size, scale=hidden_size ** -0.5 * 2)
    labels = torch.randint(0, vocab, token_shape)
    labels[torch.rand(token_shape) < ignore_fraction] = IGNORE
    labels.view(-1)[0] = vocab - 1  # at least one valid label, and the last class
    return hidden, weight, rounded(vocab, scale=0.5) if bias else None, labels


def ppo_inputs(hidden, weight, bias, labels):
    """old/ref log-probs, advantages, mask around the true float64 log-probs (see LOG_RATIOS)."""
    true = reference.linear_token_logprobs(hidden.double(), weight.double(), labels,
                                           None if bias is None else bias.double(),
                                           temperature=PPO_ARGS["temperature"], ignore_index=IGNORE)
    pick = torch.randint(0, len(LOG_RATIOS), labels.shape)
    old = true - LOG_RATIOS[pick]
    ref = true + torch.where(torch.rand(labels.shape) < 0.5, -0.3, 0.4)
    advantages = torch.randn(labels.shape, dtype=torch.float64)
    mask = torch.rand(labels.shape) > 0.2
    return old, advantages, mask, ref


# name -> f(namespace, hidden, weight, bias, labels, extra, chunk): one call on fastllm.ops and on the reference.
CASES = {
    "token_logprobs": lambda ns, h, w, b, y, extra, chunk: ns.linear_token_logprobs(
        h, w, y, b, ignore_index=IGNORE, **chunk),
    "token_logprobs_t0.7_entropy": lambda ns, h, w, b, y, extra, chunk: ns.linear_token_logprobs(
        h, w, y, b, temperature=0.7, ignore_index=IGNORE, return_entropy=True, **chunk),
    "cross_entropy": lambda ns, h, w, b, y, extra, chunk: ns.linear_cross_entropy(h, w, y, b, **chunk),
    "cross_entropy_sum_smooth": lambda ns, h, w, b, y, extra, chunk: ns.linear_cross_entropy(
        h, w, y, b, reduction="sum", label_smoothing=0.1, **chunk),
    "cross_entropy_none_smooth": lambda ns, h, w, b, y, extra, chunk: ns.linear_cross_entropy(
        h, w, y, b, reduction="none", label_smoothing=0.2, **chunk),
    "ppo": lambda ns, h, w, b, y, extra, chunk: ns.linear_ppo_loss(
        h, w, y, *extra[:3], bias=b, ref_logprobs=extra[3], ignore_index=IGNORE, **PPO_ARGS, **chunk).loss,
}


class Reference:
    """The reference with fastllm.ops' signatures (no chunk_size), for CASES."""

    @staticmethod
    def linear_token_logprobs(h, w, y, b=None, *, temperature=1.0, ignore_index=IGNORE, return_entropy=False):
        return reference.linear_token_logprobs(h, w, y, b, temperature, ignore_index, return_entropy)

    @staticmethod
    def linear_cross_entropy(h, w, y, b=None, *, reduction="mean", label_smoothing=0.0):
        return reference.linear_cross_entropy(h, w, y, b, IGNORE, reduction, label_smoothing)

    @staticmethod
    def linear_ppo_loss(h, w, y, old, advantages, mask, *, bias=None, **kwargs):
        return reference.linear_ppo_loss(h, w, y, old, advantages, mask, bias, **kwargs)

    @staticmethod
    def linear_dpo_loss(*args, **kwargs):
        return reference.linear_dpo_loss(*args, **kwargs)


def run(fn, tensors, cotangent_seed=1):
    """fn(*leaves) -> outputs; backward from the differentiable ones with fixed random cotangents; returns
    (outputs, gradients)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    differentiable = [out for out in outputs if out.requires_grad]
    generator = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
                  for out in differentiable]
    torch.autograd.backward(differentiable, cotangents)
    return [out.detach() for out in outputs], [leaf.grad for leaf in leaves if leaf is not None]


def check(name, backend, device, fn, namespace_fn, tensors):
    """Our op on `backend` vs the reference in float64, judged by the reference at the input precision."""
    with on_backend(backend):
        got = run(lambda *t: fn(ops, *t), [t.to(device) if t is not None else None for t in tensors])
    expected = run(lambda *t: namespace_fn(Reference, *t), [t.double() if t is not None else None for t in tensors])
    baseline = run(lambda *t: namespace_fn(Reference, *t), tensors)
    for kind, ours, exact, plain in zip(("output", "grad"), got, expected, baseline):
        assert len(ours) == len(exact)
        for index, (a, e, p) in enumerate(zip(ours, exact, plain)):
            assert a.dtype == p.dtype, f"{name} {kind} {index}: dtype {a.dtype}, the reference gives {p.dtype}"
            assert_matches_reference(f"{name} {kind} {index}", a, e, p)


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1], s[2]))))
@pytest.mark.parametrize("dtype", DTYPES, ids=backend_id)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(case, backend, device, dtype, shape, config):
    with_bias, chunk_size = CONFIGS[config]
    hidden, weight, bias, labels = make_projection(*shape, dtype, with_bias)
    extra = [t.float() if t.is_floating_point() else t for t in ppo_inputs(hidden, weight, bias, labels)]
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}

    def call(namespace, h, w, b):
        return CASES[case](namespace, h, w, b, labels.to(h.device), [t.to(h.device) for t in extra],
                           chunk if namespace is ops else {})

    check(case, backend, device, lambda ns, *t: call(ns, *t), lambda ns, *t: call(ns, *t), [hidden, weight, bias])


# ---------------------------------------------------------------------------------------------------------
# PPO's aggregation modes and GSPO's sequence ratio: sequences over flat tokens (cu_seqlens: lengths 4, 1, 0, 6, 3,
# chunk_size 5 -> chunks of whole sequences [4 + 1 + 0], [6: longer than a chunk, alone], [3]) and as the rows of
# 2-D labels (3 rows of 5, chunk_size 7 -> one row per chunk)
# ---------------------------------------------------------------------------------------------------------
PPO_MODES = [(agg, level) for agg in rl.LOSS_AGGREGATIONS for level in rl.RATIO_LEVELS]
LAYOUTS = {"cu_seqlens": ((14,), 5, torch.tensor([0, 4, 5, 5, 11, 14]), 20.0), "rows": ((3, 5), 7, None, None)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
@pytest.mark.parametrize("loss_agg,ratio_level", PPO_MODES, ids=[f"{a}-{r}" for a, r in PPO_MODES])
def test_ppo_modes_match_float64(loss_agg, ratio_level, backend, device, layout):
    token_shape, chunk_size, cu_seqlens, normalizer = LAYOUTS[layout]
    hidden, weight, bias, labels = make_projection(token_shape, 16, 37, torch.float32, bias=True)
    extra = [t.float() for t in ppo_inputs(hidden, weight, bias, labels)]
    options = dict(loss_agg=loss_agg, ratio_level=ratio_level, kl_estimator="k2" if layout == "rows" else "k3",
                   kl_clamp=0.05 if layout == "rows" else None, ignore_index=IGNORE, **PPO_ARGS)
    if cu_seqlens is not None:
        options["cu_seqlens"] = cu_seqlens.to(device)
    if loss_agg == "token_sum_norm" and normalizer is not None:
        options["normalizer"] = normalizer

    def call(namespace, h, w, b):
        out = namespace.linear_ppo_loss(h, w, labels.to(h.device), *[t.to(h.device) for t in extra[:3]], bias=b,
                                        ref_logprobs=extra[3].to(h.device), **options,
                                        **({"chunk_size": chunk_size} if namespace is ops else {}))
        return (out.loss, *(getattr(out, field) for field in out._fields[1:]))

    check(f"ppo {loss_agg} {ratio_level}", backend, device, call, call, [hidden, weight, bias])


def test_sequence_chunks_hold_whole_sequences():
    assert _chunked_head.sequence_chunks([0, 4, 5, 5, 11, 14], 5) == [((0, 5),), ((5, 11),), ((11, 14),)]
    assert _chunked_head.sequence_chunks([0, 2, 4, 6], 100) == [((0, 6),)]
    assert _chunked_head.sequence_chunks([0, 0], 3) == [((0, 0),)]


# ---------------------------------------------------------------------------------------------------------
# DPO: chosen and rejected sequences of different lengths, prompts ignored
# ---------------------------------------------------------------------------------------------------------
# (bias, chunk_size in token rows): a pair is 9 rows, so 9 -> one pair per chunk, 18 -> 2 + 1 pairs.
DPO_CONFIGS = {"bias-chunk-1pair": (True, 9), "nobias-chunks-2+1pairs": (False, 18), "bias-auto": (True, None)}


def make_pairs(dtype, pairs=3, chosen_length=5, rejected_length=4, hidden_size=16, vocab=37, bias=True):
    chosen_hidden, weight, bias, chosen_labels = make_projection((pairs, chosen_length), hidden_size, vocab, dtype,
                                                                 bias, ignore_fraction=0)
    rejected_hidden = (torch.randn(pairs, rejected_length, hidden_size, dtype=torch.float64)).to(dtype)
    rejected_labels = torch.randint(0, vocab, (pairs, rejected_length))
    chosen_labels[:, :2] = IGNORE  # the prompt
    rejected_labels[:, :2] = IGNORE
    rejected_labels[1, 3] = IGNORE  # padding
    ref = torch.randn(2, pairs, dtype=torch.float64).to(dtype) - 8
    return chosen_hidden, rejected_hidden, weight, bias, chosen_labels, rejected_labels, ref[0], ref[1]


# Every loss type once (fp32, one pair a chunk), and every dtype x chunking once (smoothed sigmoid): the loss
# formulas themselves are checked against autograd and the papers in test_rl.py.
DPO_LOSSES = {"sigmoid": ("sigmoid", 0.0), "sigmoid-smooth": ("sigmoid", 0.1), "ipo": ("ipo", 0.0),
              "hinge": ("hinge", 0.0)}
DPO_RUNS = ([(loss, torch.float32, "bias-chunk-1pair") for loss in DPO_LOSSES if loss != "sigmoid-smooth"]
            + [("sigmoid-smooth", dtype, config) for dtype in DTYPES for config in DPO_CONFIGS])


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("loss,dtype,config", DPO_RUNS, ids=[f"{l}-{backend_id(d)}-{c}" for l, d, c in DPO_RUNS])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_dpo_matches_float64(backend, device, loss, dtype, config):
    loss_type, smoothing = DPO_LOSSES[loss]
    with_bias, chunk_size = DPO_CONFIGS[config]
    chosen_hidden, rejected_hidden, weight, bias, chosen_labels, rejected_labels, ref_chosen, ref_rejected = \
        make_pairs(dtype, bias=with_bias)
    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}

    def call(namespace, ch, rh, w, b):
        out = namespace.linear_dpo_loss(ch, rh, w, chosen_labels.to(ch.device), rejected_labels.to(ch.device),
                                        ref_chosen.to(ch.device), ref_rejected.to(ch.device), b, beta=0.5,
                                        loss_type=loss_type, label_smoothing=smoothing, ignore_index=IGNORE,
                                        **(chunk if namespace is ops else {}))
        return out.loss, out.chosen_rewards, out.rejected_rewards

    check(f"dpo {loss_type}", backend, device, call, call, [chosen_hidden, rejected_hidden, weight, bias])


# ---------------------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [1, 5003], ids=["V=1", "V=5003"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=KERNEL_IDS)
@pytest.mark.parametrize("case", ["token_logprobs_t0.7_entropy", "cross_entropy_sum_smooth"])
def test_vocabulary_sizes(case, backend, device, vocab):
    """One class, and a vocabulary longer than the Triton block (4096), with chunks."""
    hidden, weight, bias, labels = make_projection((5,), 8, vocab, torch.float32, bias=True)

    def call(namespace, h, w, b):
        return CASES[case](namespace, h, w, b, labels, None, {"chunk_size": 2} if namespace is ops else {})

    check(case, backend, device, call, call, [hidden, weight, bias])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_ignored_tokens_give_zero_and_no_gradient(backend, device):
    hidden, weight, bias, labels = make_projection((8,), 16, 37, torch.float32, bias=True)
    labels[::2] = IGNORE
    labels[1::2] = torch.arange(4)
    h = hidden.to(device).requires_grad_(True)
    with on_backend(backend):
        logprobs = ops.linear_token_logprobs(h, weight.to(device), labels.to(device), bias.to(device), chunk_size=3)
        logprobs.sum().backward()
    assert torch.all(logprobs[::2] == 0) and torch.all(logprobs[1::2] < 0)
    assert torch.all(h.grad[::2] == 0) and torch.all(h.grad[1::2].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_cross_entropy_all_ignored_is_nan_with_zero_gradient(backend, device):
    """As F.cross_entropy: the mean over no token is NaN, and no gradient flows."""
    hidden, weight, _, labels = make_projection((6,), 8, 11, torch.float32, bias=False)
    h = hidden.to(device).requires_grad_(True)
    with on_backend(backend):
        loss = ops.linear_cross_entropy(h, weight.to(device), torch.full_like(labels, IGNORE).to(device))
        loss.backward()
    assert torch.isnan(loss) and torch.all(h.grad == 0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_ppo_statistics(backend, device):
    """Every statistic of linear_ppo_loss matches the reference (fp32; rl.ppo_policy_loss on materialised
    logits), and a fully masked batch gives a zero loss with zero gradients."""
    hidden, weight, bias, labels = make_projection((9,), 16, 37, torch.float32, bias=False)
    old, advantages, mask, ref = (t.float() if t.is_floating_point() else t
                                  for t in ppo_inputs(hidden, weight, bias, labels))
    expected = reference.linear_ppo_loss(hidden.double(), weight.double(), labels, old.double(), advantages.double(),
                                         mask, None, ref.double(), **PPO_ARGS)
    h = hidden.to(device).requires_grad_(True)
    args = [t.to(device) for t in (weight, labels, old, advantages)]
    with on_backend(backend):
        got = ops.linear_ppo_loss(h, *args[:2], *args[2:], mask.to(device), ref_logprobs=ref.to(device),
                                  chunk_size=4, **PPO_ARGS)
        nothing = ops.linear_ppo_loss(h, *args[:2], *args[2:], torch.zeros_like(mask).to(device), chunk_size=4)
        nothing.loss.backward()
    for field in expected._fields:
        torch.testing.assert_close(getattr(got, field).double().cpu(), getattr(expected, field), rtol=1e-5,
                                   atol=1e-6, msg=lambda m: f"{field}: {m}")
    assert nothing.loss == 0 and torch.all(h.grad == 0)


# ---------------------------------------------------------------------------------------------------------
# Cost: matmul FLOPs and the largest allocation
# ---------------------------------------------------------------------------------------------------------
def _matmul_flops(fn):
    """2 M K N summed over every matmul fn runs (the profiler's own FLOP count skips in-place addmm_)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    flops = 0
    for event in prof.events():
        if event.name in ("aten::mm", "aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = event.input_shapes[:2] if event.name == "aten::mm" else event.input_shapes[1:3]
            flops += 2 * m * k * n
    return flops


@pytest.mark.parametrize("op,matmuls", [("linear_cross_entropy", 3), ("linear_token_logprobs", 4)])
def test_matmul_count(op, matmuls):
    """Forward+backward costs 3 N x H x V matmuls for scalar losses (as eager) and 4 for per-token outputs
    (the backward recomputes the logits); a scalar loss under no_grad costs 1."""
    rows, hidden_size, vocab = 64, 32, 500
    hidden, weight, _, labels = make_projection((rows,), hidden_size, vocab, torch.float32, bias=False)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    one_matmul = 2 * rows * hidden_size * vocab

    def forward_backward():
        getattr(ops, op)(h, w, labels, chunk_size=10).sum().backward()

    with on_backend("cpp"):
        assert _matmul_flops(forward_backward) == matmuls * one_matmul
        with torch.no_grad():
            assert _matmul_flops(lambda: getattr(ops, op)(h, w, labels, chunk_size=10)) == one_matmul


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_token_logprobs"])
def test_no_logits_sized_allocation(op):
    """With 8 chunks no allocation comes near the size of the logits."""
    rows, vocab = 64, 4096
    hidden, weight, _, labels = make_projection((rows,), 16, vocab, torch.float32, bias=False)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with on_backend("cpp"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True) as prof:
        getattr(ops, op)(h, w, labels, chunk_size=rows // 8).sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::"))
    assert largest <= rows * vocab * 4 // 4, f"an allocation of {largest} bytes; the logits are {rows * vocab * 4}"


def test_scalar_loss_backward_hands_over_its_gradients():
    """A scalar loss's backward allocates nothing near the weight's size: the gradients made in the forward are
    scaled in place and become .grad (no zero gradients filled in for the op's extra outputs, no scaled copy),
    and a second backward through the same graph is refused rather than scaled twice."""
    rows, vocab = 64, 4096
    hidden, weight, _, labels = make_projection((rows,), 16, vocab, torch.float32, bias=False)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with on_backend("cpp"):
        loss = ops.linear_cross_entropy(h, w, labels, chunk_size=rows // 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        (loss * 3).backward()
    largest = max((e.cpu_memory_usage for e in prof.events() if e.name.startswith("aten::")), default=0)
    assert largest < w.numel() * 4 // 4, f"the backward allocated {largest} bytes; the weight is {w.numel() * 4}"
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    (reference.linear_cross_entropy(h64, w64, labels) * 3).backward()
    torch.testing.assert_close(w.grad, w64.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(h.grad, h64.grad.float(), rtol=1e-4, atol=1e-6)
    with on_backend("cpp"):
        loss = ops.linear_cross_entropy(h, w, labels, chunk_size=rows // 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------------------------
# The C++ backend's 16-bit x 16-bit -> fp32 GEMM (csrc/cpu/wide_matmul.cpp), behind the gradient products that
# end in fp32: fp32 master weights under autocast, and a 16-bit weight's gradient summed over chunks
# ---------------------------------------------------------------------------------------------------------
def _cpp_kernels():
    from fastllm import _cpp

    return _cpp.load()


def _assert_fp32_accurate(got, exact, a, b, c=None):
    """Within fp32 accumulation's bound of the float64 value (k 2^-24 |a| |b|, plus one rounding of c): far
    below one 16-bit rounding of the product (2^-9 of it for bf16)."""
    bound = a.shape[1] * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) + 1e-30
    if c is not None:
        bound += 2.0 ** -24 * c.double().abs() * 2
    assert torch.isfinite(got).all()
    assert ((got.double() - exact).abs() <= bound).all(), f"largest error {(got.double() - exact).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=backend_id)
def test_wide_gemm_matches_float64(dtype):
    """out = beta out + a @ b over plain, transposed and strided operands, into strided rows, with beta 0 on a
    NaN-filled out, beta 1, and an empty sum."""
    kernels = _cpp_kernels()
    assert kernels.wide_matmul_available(dtype), "x86 builds of torch ship MKL's cblas_gemm_*f32"
    m, k, n = 37, 301, 19

    def rounded(*shape):
        return torch.randn(shape, dtype=torch.float64).to(dtype)

    a, b = rounded(m, k), rounded(k, n)
    exact = a.double() @ b.double()
    operands = {"plain": (a, b), "transposed": (a.t().contiguous().t(), b.t().contiguous().t()),
                "strided": (torch.stack([a, a], -1)[..., 0], torch.stack([b, b], -1)[..., 1])}
    for name, (lhs, rhs) in operands.items():
        out = torch.full((m, n), float("nan"))
        kernels.wide_addmm_(out, lhs, rhs, 0.0)
        _assert_fp32_accurate(out, exact, a, b)
    wide = torch.full((m, n + 5), float("nan"))  # rows with a stride: the 5 extra columns must stay untouched
    c = torch.randn(m, n)
    wide[:, :n] = c
    kernels.wide_addmm_(wide[:, :n], a, b, 1.0)
    _assert_fp32_accurate(wide[:, :n], c.double() + exact, a, b, c)
    assert wide[:, n:].isnan().all()
    empty_a, empty_b = a[:, :0], b[:0]
    out = torch.full((m, n), float("nan"))
    kernels.wide_addmm_(out, empty_a, empty_b, 0.0)
    assert torch.equal(out, torch.zeros(m, n))
    kernels.wide_addmm_(out.copy_(c), empty_a, empty_b, 1.0)
    assert torch.equal(out, c)


def test_wide_gemm_bad_input():
    kernels = _cpp_kernels()
    a, b, out = torch.ones(4, 3, dtype=torch.bfloat16), torch.ones(3, 5, dtype=torch.bfloat16), torch.zeros(4, 5)
    assert not kernels.wide_matmul_available(torch.float32)
    bad = [((out, a.float(), b.float(), 0.0), "no 16-bit x 16-bit -> float32 GEMM for Float"),
           ((out, a, b.half(), 0.0), "a and b must have one dtype"),
           ((out.bfloat16(), a, b, 0.0), "out must be float32, got BFloat16"),
           ((torch.zeros(4, 6), a, b, 0.0), r"shapes do not chain: out \[4, 6\] = a \[4, 3\] @ b \[3, 5\]"),
           ((torch.zeros(5, 4).t(), a, b, 0.0), "out must have contiguous rows"),
           ((out, a[None], b, 0.0), "must be 2-D")]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            kernels.wide_addmm_(*args)


@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16], ids=backend_id)
def test_wide_gemm_gradients(master, monkeypatch):
    """bf16 matmuls with fp32 master weights (autocast) or with bf16 weights summed over chunks in fp32: the C++
    backend makes every fp32 product in the wide GEMM (one call per product and chunk, none left to the sliced
    torch path) and gives that path's gradients, at least as close to float64."""
    hidden, weight, bias, labels = make_projection((29,), 24, 301, master, bias=True)
    chunks = 5  # chunk_size 6
    calls = []
    wide_gemm = _chunked_head.wide_gemm

    def counted(*args):
        gemm = wide_gemm(*args)

        def call(*gemm_args):
            calls.append(gemm_args[0].shape)
            return gemm(*gemm_args)
        return call if gemm is not None else None

    def gradients(with_wide_gemm):
        monkeypatch.setattr(_chunked_head, "wide_gemm", counted if with_wide_gemm else lambda *args: None)
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        with on_backend("cpp"), torch.autocast("cpu", torch.bfloat16, enabled=master == torch.float32):
            ops.linear_cross_entropy(*leaves[:2], labels, bias=leaves[2], chunk_size=6).backward()
        return [leaf.grad for leaf in leaves]

    wide, sliced = gradients(True), gradients(False)
    # products: the weight's every chunk, and the hidden's every chunk where its gradient is fp32
    assert len(calls) == chunks * (2 if master == torch.float32 else 1)
    leaves64 = [t.to(torch.bfloat16).double().requires_grad_(True) for t in (hidden, weight, bias)]
    reference.linear_cross_entropy(*leaves64[:2], labels, bias=leaves64[2]).backward()
    for name, ours, theirs, leaf in zip(("hidden", "weight", "bias"), wide, sliced, leaves64):
        assert ours.dtype == theirs.dtype == master, name
        exact = leaf.grad
        ours_error, theirs_error = ((g.double() - exact).norm() / exact.norm() for g in (ours, theirs))
        assert ours_error <= theirs_error * 1.01 + 1e-7, f"{name}: {ours_error:.3g} vs the sliced path's {theirs_error:.3g}"


def test_automatic_chunk_size():
    """A chunk of logits stays within CHUNK_BYTES, and chunks are as even as possible."""
    most = fused_linear.chunk_rows(50257, torch.float32)
    assert most * 50257 * 4 <= fused_linear.CHUNK_BYTES < (most + 1) * 50257 * 4
    assert fused_linear.chunk_rows(50257, torch.float32, chunk_size=7) == 7
    sizes = {end - start for start, end in _chunked_head.even_ranges(8192, most)}
    assert max(sizes) <= most and max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument
# ---------------------------------------------------------------------------------------------------------
def _bad_input_calls():
    tlp, lce, ppo = ops.linear_token_logprobs, ops.linear_cross_entropy, ops.linear_ppo_loss
    return [
        (lambda h, w, y, m: tlp(h.long(), w, y), TypeError, "hidden must have dtype"),
        (lambda h, w, y, m: tlp(h, w.double(), y), TypeError, "weight must have hidden's dtype"),
        (lambda h, w, y, m: tlp(h, w[:, :3], y), ValueError, r"weight must have shape \(vocab >= 1, 16\)"),
        (lambda h, w, y, m: tlp(h, w, y, w[0]), ValueError, r"bias must have shape \(37,\)"),
        (lambda h, w, y, m: tlp(h, w, y.float()), TypeError, "labels must have an integer dtype"),
        (lambda h, w, y, m: tlp(h, w, y[:3]), ValueError, r"labels must have shape \(4,\)"),
        (lambda h, w, y, m: tlp(h, w, y, temperature=-1.0), ValueError, "temperature must be a positive"),
        (lambda h, w, y, m: tlp(h, w, y, chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (lambda h, w, y, m: tlp(h, w.to("meta"), y), ValueError, "one device"),
        (lambda h, w, y, m: lce(h, w, y, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda h, w, y, m: lce(h, w, y, label_smoothing=2.0), ValueError, "label_smoothing must be in"),
        (lambda h, w, y, m: ppo(h, w, y, m, m[:2], y > 0), ValueError, r"advantages must have the labels' shape"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y), TypeError, "mask must have dtype"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, kl_coef=0.1), ValueError, "ref_logprobs is required"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, clip_eps=1.5), ValueError, "clip_eps must be"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, dual_clip=0.5), ValueError, "dual_clip must be"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, ratio_level="sequence"), ValueError,
         r"needs sequences: a 2-D \(batch, T\) labels .* or cu_seqlens"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, loss_agg="seq_mean_token_sum",
                                cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "from 0 to the 4 tokens"),
        (lambda h, w, y, m: ppo(h, w, y, m, m, y > 0, loss_agg="token_sum_norm"), ValueError, "needs normalizer="),
        (lambda h, w, y, m: ppo(h.view(2, 2, 16), w, y.view(2, 2), m.view(2, 2), m.view(2, 2), y.view(2, 2) > 0,
                                cu_seqlens=torch.tensor([0, 4])), ValueError, "cu_seqlens applies to flat"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_input_calls())))
def test_bad_input(index):
    call, error, message = _bad_input_calls()[index]
    hidden, weight, _, labels = make_projection((4,), 16, 37, torch.float32, bias=False)
    with pytest.raises(error, match=message):
        call(hidden, weight, labels, torch.zeros(4))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=KERNEL_IDS)
@pytest.mark.parametrize("op", ["linear_token_logprobs", "linear_cross_entropy"])
def test_label_out_of_range(backend, device, op):
    hidden, weight, _, labels = make_projection((4,), 16, 37, torch.float32, bias=False)
    labels[2] = 37
    with on_backend(backend), pytest.raises(ValueError, match="label 37 at position 2 is out of range"):
        getattr(ops, op)(hidden.to(device), weight.to(device), labels.to(device))


def test_dpo_bad_input():
    chosen_hidden, rejected_hidden, weight, _, chosen_labels, rejected_labels, ref_c, ref_r = make_pairs(torch.float32)
    args = [chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels, ref_c, ref_r]
    with pytest.raises(ValueError, match="rejected_hidden must hold as many pairs"):
        ops.linear_dpo_loss(chosen_hidden, rejected_hidden[:2], *args[2:])
    with pytest.raises(ValueError, match=r"ref_rejected_logps must have shape \(3,\)"):
        ops.linear_dpo_loss(*args[:6], ref_r[:2])
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only"):
        ops.linear_dpo_loss(*args, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="chosen_hidden must be 3-D"):
        ops.linear_dpo_loss(chosen_hidden[0], *args[1:])


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile(fullgraph=True) see one node per op
# ---------------------------------------------------------------------------------------------------------
def _opcheck_samples(device):
    hidden, weight, bias, labels = (t.to(device) for t in make_projection((6,), 8, 13, torch.float32, bias=True))
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    vectors = torch.randn(4, 6, device=device)
    lse = torch.logsumexp((hidden @ weight.t() + bias).double(), -1)  # the kernels keep lse in fp64
    mask = torch.ones(6, device=device)
    grads = [True, True, True]
    return [
        (torch.ops.fastllm.linear_logit_stats.default, (h, w, b, None, labels, 0.8, IGNORE, True, True, 4)),
        (torch.ops.fastllm.linear_logit_stats_backward.default,
         (hidden, weight, bias, None, labels, lse, *vectors, 1.0, 4, grads)),
        (torch.ops.fastllm.linear_cross_entropy.default, (h, w, b, None, labels, IGNORE, 0.1, True, 4, grads)),
        # fp32 operands, bf16 matmuls (autocast's compute dtype): fp32 gradients
        (torch.ops.fastllm.linear_cross_entropy.default, (h, w, b, torch.bfloat16, labels, IGNORE, 0.0, True, 4,
                                                          grads)),
        (torch.ops.fastllm.linear_logit_stats.default, (h, w, b, torch.bfloat16, labels, 1.0, IGNORE, False, True, 4)),
        (torch.ops.fastllm.linear_ppo_loss.default, (h, w, None, None, labels, vectors[0] - 3, vectors[1], mask,
                                                     mask / 6, vectors[2] - 3, None, 1.0, IGNORE, 0.2, 0.2, 3.0,
                                                     0.1, "k3", None, 0.01, "token", 4, [True, True, False])),
        (torch.ops.fastllm.linear_ppo_loss.default, (h, w, None, None, labels, vectors[0] - 3, vectors[1], mask,
                                                     mask / 2, None, torch.tensor([0, 2, 6]), 1.0, IGNORE, 0.2,
                                                     0.28, None, 0.0, "k2", 10.0, 0.0, "sequence", 3, grads)),
        (torch.ops.fastllm.linear_dpo_loss.default, (h, w, b, None, labels, vectors[0, :2], vectors[1, :2], 2, 0.1,
                                                     "sigmoid", 0.0, IGNORE, 4, grads)),
    ]


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=KERNEL_IDS)
def test_opcheck(backend, device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, (*args, backend))


def _all_ops(h, w, b, y, extra):
    old, advantages, mask, ref = extra
    return (ops.linear_token_logprobs(h, w, y, b, temperature=0.9, return_entropy=True)[1].sum()
            + ops.linear_cross_entropy(h, w, y, b, label_smoothing=0.1, chunk_size=3)
            + ops.linear_cross_entropy(h, w, y, b, reduction="none").sum()
            + ops.linear_ppo_loss(h, w, y, old, advantages, mask, bias=b, ref_logprobs=ref, kl_coef=0.1).loss
            + ops.linear_dpo_loss(h[:, None], h[:, None], w, y[:, None], y.flip(0)[:, None], old, ref, b).loss)


# Inductor once, on cpp: for opaque custom ops it traces what aot_eager does, plus a C++ compile of the glue.
COMPILE_RUNS = [(backend, device, "aot_eager") for backend, device in KERNEL_BACKEND_DEVICES]
COMPILE_RUNS.append(("cpp", "cpu", "inductor"))


@pytest.mark.parametrize("backend,device,compile_backend", COMPILE_RUNS, ids=[f"{b}-{c}" for b, _, c in COMPILE_RUNS])
def test_compile_fullgraph(backend, device, compile_backend):
    hidden, weight, bias, labels = (t.to(device) for t in make_projection((6,), 8, 13, torch.float32, bias=True))
    extra = [t.float().to(device) for t in ppo_inputs(hidden, weight, bias, labels)]
    with on_backend(backend):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        eager = _all_ops(*leaves, labels, extra)
        eager.backward()
        torch._dynamo.reset()
        compiled_fn = torch.compile(_all_ops, fullgraph=True, backend=compile_backend)
        compiled_leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        compiled = compiled_fn(*compiled_leaves, labels, extra)
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad)
