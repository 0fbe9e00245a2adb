"""Every fastllm op under torch.autocast behaves as the PyTorch op it replaces under autocast: the same dtype for
every output and every gradient, and values within the error-ratio bound (numerics.assert_matches_reference)
of a float64 reference fed the inputs as autocast rounds them. The autocast rules are registered on the custom
ops themselves, so direct torch.ops.fastllm.* calls and torch.compile graphs cast the same way.

What torch does (aten/src/ATen/autocast_mode.{h,cpp}): scaled_dot_product_attention and linear cast their inputs
to the autocast dtype on CPU and CUDA; layer_norm, rms_norm are fp32 on CUDA and on no CPU list (the input's
dtype); softmax, log_softmax are fp32 on CUDA (fp32_set_opt_dtype), on no CPU list; cross_entropy is fp32 on both.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_matches_reference

import fastllm
from fastllm import ops
from fastllm.ops import fused_linear

softmax_family = importlib.import_module("fastllm.ops.softmax")  # fastllm.ops.softmax is also the function

AUTOCASTS = [("cpu", torch.bfloat16), ("cpu", torch.float16)]
if torch.cuda.is_available():
    AUTOCASTS += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
# The kernel backend of each device and the torch reference (Triton's interpreter has no bf16 dots on the CPU).
RUNS = [(device, dtype, backend) for device, dtype in AUTOCASTS
        for backend in (("cpp", "torch") if device == "cpu" else ("triton", "torch"))]
RUN_IDS = [f"{d}-{str(t).removeprefix('torch.')}-{b}" for d, t, b in RUNS]
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # F.rms_norm, mixed
HALF = object()  # marks an input made in the autocast dtype (an activation a matmul under autocast produced)


def _sdpa(q, k, v, causal):
    """SDPA on fastllm's (batch, seqlen, heads, head_dim) layout, grouped-query heads expanded."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def _sdpa_varlen(q, k, v, cu):
    bounds = cu.tolist()
    return torch.cat([_sdpa(q[None, s:e], k[None, s:e], v[None, s:e], True)[0] for s, e in zip(bounds, bounds[1:])])


def _sdpa_decode(q, k_cache, v_cache, lengths):
    return torch.cat([_sdpa(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], False)
                      for b, n in enumerate(lengths.tolist())])


def _add_norm(norm):
    def add_then_norm(x, residual, *params):
        h = x + residual
        return norm(h, *params), h
    return add_then_norm


_LABELS = torch.randint(0, 37, (5, 7), generator=torch.Generator().manual_seed(0))


def L(like, rows=slice(None), cols=slice(None)):  # noqa: E743 (the labels, on like's device)
    return _LABELS[rows, cols].to(like.device)


def CU(like):  # noqa: N802
    return torch.tensor([0, 3, 9, 10], device=like.device)


def LENGTHS(like):  # noqa: N802
    return torch.tensor([4, 9], device=like.device)
# name: (fastllm op, the PyTorch op it replaces, input shapes (HALF: made in the autocast dtype, else fp32), the
# indices of the inputs that the PyTorch op's autocast policy casts to the autocast dtype)
CASES = {
    "softmax": (ops.softmax, lambda x: torch.softmax(x, -1), [(HALF, 5, 37)], ()),
    "log_softmax": (ops.log_softmax, lambda x: torch.log_softmax(x, -1), [(HALF, 5, 37)], ()),
    "token_logprobs": (lambda x: ops.token_logprobs(x, L(x, cols=0)),
                       lambda x: softmax_family.reference.token_logprobs(x, L(x, cols=0)), [(HALF, 5, 37)], ()),
    "entropy": (ops.entropy, softmax_family.reference.entropy, [(HALF, 5, 37)], ()),
    "cross_entropy": (lambda x: ops.cross_entropy(x, L(x)),
                      lambda x: F.cross_entropy(x.flatten(0, 1), L(x).flatten()), [(HALF, 5, 7, 37)], ()),
    "layer_norm": (ops.layer_norm, lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
                   [(HALF, 6, 33), (33,), (33,)], ()),
    "rms_norm": (ops.rms_norm, lambda x, w: F.rms_norm(x, x.shape[-1:], w, 1e-6), [(HALF, 6, 33), (33,)], ()),
    "add_layer_norm": (ops.add_layer_norm, _add_norm(lambda h, w, b: F.layer_norm(h, h.shape[-1:], w, b)),
                       [(HALF, 6, 33), (6, 33), (33,), (33,)], ()),
    "add_rms_norm": (ops.add_rms_norm, _add_norm(lambda h, w: F.rms_norm(h, h.shape[-1:], w, 1e-6)),
                     [(HALF, 6, 33), (6, 33), (33,)], ()),
    # RoPE hands q and k over in fp32, v comes from a linear in the autocast dtype
    "attention": (lambda q, k, v: ops.attention(q, k, v, causal=True), lambda q, k, v: _sdpa(q, k, v, True),
                  [(2, 7, 4, 16), (2, 7, 2, 16), (HALF, 2, 7, 2, 16)], (0, 1, 2)),
    "attention_varlen": (lambda q, k, v: ops.attention_varlen(q, k, v, CU(q), CU(q), 6, 6, causal=True),
                         lambda q, k, v: _sdpa_varlen(q, k, v, CU(q)), [(10, 4, 16), (10, 2, 16), (HALF, 10, 2, 16)],
                         (0, 1, 2)),
    "attention_decode": (lambda q, k, v: ops.attention_decode(q, k, v, LENGTHS(q)),
                         lambda q, k, v: _sdpa_decode(q, k, v, LENGTHS(q)),
                         [(2, 1, 4, 16), (HALF, 2, 9, 2, 16), (HALF, 2, 9, 2, 16)], (0, 1, 2)),
    "linear_token_logprobs": (
        lambda h, w: ops.linear_token_logprobs(h, w, L(h), return_entropy=True),
        lambda h, w: fused_linear.reference.linear_token_logprobs(h, w, L(h), return_entropy=True),
        [(5, 7, 24), (37, 24)], (0, 1)),
    "linear_cross_entropy": (lambda h, w, b: ops.linear_cross_entropy(h, w, L(h), b),
                             lambda h, w, b: F.cross_entropy(F.linear(h, w, b).flatten(0, 1), L(h).flatten()),
                             [(5, 7, 24), (37, 24), (37,)], (0, 1, 2)),
    # hidden from a matmul under autocast (half), fp32 master weight and bias: gradients in each input's dtype
    "linear_cross_entropy_half_hidden": (lambda h, w, b: ops.linear_cross_entropy(h, w, L(h), b),
                                         lambda h, w, b: F.cross_entropy(F.linear(h, w, b).flatten(0, 1),
                                                                         L(h).flatten()),
                                         [(HALF, 5, 7, 24), (37, 24), (37,)], (0, 1, 2)),
    "linear_ppo_loss": (
        lambda h, w: ops.linear_ppo_loss(h, w, L(h), *_ppo_extra(h), entropy_coef=0.01),
        lambda h, w: fused_linear.reference.linear_ppo_loss(h, w, L(h), *_ppo_extra(h), entropy_coef=0.01),
        [(5, 7, 24), (37, 24)], (0, 1)),
    "linear_dpo_loss": (
        lambda c, r, w: ops.linear_dpo_loss(c, r, w, L(c, slice(2)), L(c, slice(2, 4), slice(5)), *_dpo_extra(c)).loss,
        lambda c, r, w: fused_linear.reference.linear_dpo_loss(c, r, w, L(c, slice(2)), L(c, slice(2, 4), slice(5)),
                                                               *_dpo_extra(c)).loss,
        [(2, 7, 24), (2, 5, 24), (37, 24)], (0, 1, 2)),
}


def _ppo_extra(like):
    """old_logprobs, advantages, mask."""
    g = torch.Generator().manual_seed(1)
    extra = -torch.rand(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g), torch.rand(5, 7, generator=g) > 0.2
    return [t.to(like.device) for t in extra]


def _dpo_extra(like):
    """ref_chosen_logps, ref_rejected_logps."""
    return torch.tensor([-20.0, -15.0], device=like.device), torch.tensor([-18.0, -14.0], device=like.device)


def test_every_public_op_is_covered():
    """Every op outside CASES is an RL op: fp32 elementwise maths and scans on log-probs and rewards, which no
    autocast list touches (test_rl_ops_are_unchanged_by_autocast)."""
    rl_modules = ("fastllm.ops.rl", "fastllm.ops.rl_estimators")
    uncovered = {name for name in ops.__all__ if name not in CASES}
    assert uncovered and all(getattr(ops, name).__module__ in rl_modules for name in uncovered), uncovered


def _tensors(result):
    """The floating-point tensors of an op's result (a tensor, a tuple, or a NamedTuple with None fields)."""
    items = result if isinstance(result, tuple) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(fn, inputs, weights=None):
    """fn(*inputs) -> (outputs, gradients of sum(weight * output) with respect to every input)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = _tensors(fn(*leaves))
    if weights is None:
        g = torch.Generator().manual_seed(2)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outputs]
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outputs], [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def _inputs(shapes, device, dtype):
    g = torch.Generator().manual_seed(3)
    made = []
    for shape in shapes:
        half = shape[0] is HALF
        t = torch.randn(shape[1:] if half else shape, generator=g)
        made.append((t.to(dtype) if half else t).to(device))
    return made


@pytest.mark.parametrize("device,dtype,backend", RUNS, ids=RUN_IDS)
@pytest.mark.parametrize("name", CASES)
def test_op_under_autocast_matches_torch_under_autocast(name, device, dtype, backend):
    ours, theirs, shapes, lowered = CASES[name]
    inputs = _inputs(shapes, device, dtype)
    with torch.autocast(device, dtype=dtype):
        with fastllm.use_backend(backend, strict=True):
            out, grads = _run(ours, inputs)
        base_out, base_grads = _run(theirs, inputs)
    # float64 reference of the same maths, on the inputs as autocast rounds them
    rounded = [t.to(dtype).double() if i in lowered else t.double() for i, t in enumerate(inputs)]
    exact_out, exact_grads = _run(theirs, rounded)
    assert [o.dtype for o in out] == [o.dtype for o in base_out], f"{name}: output dtypes"
    assert [g.dtype for g in grads] == [t.dtype for t in inputs], f"{name}: gradient dtypes"
    assert [g.dtype for g in base_grads] == [t.dtype for t in inputs]
    if backend == "torch":  # the plain reference: the dtypes above; its values are torch's own, not fused ones
        return
    for i, (a, e, b) in enumerate(zip(out, exact_out, base_out)):
        assert_matches_reference(f"{name} output {i}", a, e, b)
    for i, (a, e, b) in enumerate(zip(grads, exact_grads, base_grads)):
        assert_matches_reference(f"{name} grad {i}", a, e, b)


@pytest.mark.parametrize("device,dtype", AUTOCASTS, ids=[f"{d}-{str(t).removeprefix('torch.')}" for d, t in AUTOCASTS])
def test_rl_ops_are_unchanged_by_autocast(device, dtype):
    """The RL losses and GAE are fp32 elementwise maths on log-probs and rewards: no autocast list touches them."""
    g = torch.Generator().manual_seed(4)
    logp, old, adv, values, returns = (torch.randn(3, 8, generator=g).to(device) for _ in range(5))
    mask = (torch.rand(3, 8, generator=g) > 0.3).to(device)
    runs = []
    for enabled in (False, True):
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            runs.append([*_tensors(ops.ppo_policy_loss(logp, old, adv, mask)),
                         *_tensors(ops.value_loss(values, old, returns, mask)),
                         *_tensors(ops.dpo_loss(logp[0], logp[1], old[0], old[1])),
                         *ops.gae(returns, values, mask)])
    for plain, autocast in zip(*runs):
        assert autocast.dtype == plain.dtype and torch.equal(autocast, plain)


# ---------------------------------------------------------------------------------------------------------
# The rules live on the custom ops: a direct torch.ops.fastllm call casts the same way, eager and compiled
# (aot_eager: dynamo and AOTAutograd dispatch through the autocast keys as inductor does; it adds codegen only).
# ---------------------------------------------------------------------------------------------------------
def _attention_op(q, k, v):
    """The RoPE case straight into the custom op: q, k fp32 and v in the autocast dtype."""
    out, _ = torch.ops.fastllm.attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), None, None, None,
                                         q.shape[1], k.shape[1], q.shape[-1] ** -0.5, -1, 0, "cpp")
    return out.view(q.shape)


def _add_norm_op(x, residual, weight):
    y, h, _, _ = torch.ops.fastllm.norm(x, residual, weight, None, 1e-6, 0.0, True, "cpp")
    return y, h


def _cross_entropy_op(logits):
    return ops.cross_entropy(logits, L(logits))


def _linear_cross_entropy_op(hidden, weight):
    chunk = fused_linear.chunk_rows(weight.shape[0], torch.bfloat16)  # the public op's, for the same bits
    # compute dtype None: the op's autocast rule sets it
    loss, *_ = torch.ops.fastllm.linear_cross_entropy(hidden, weight, None, None, L(hidden).flatten(), -100, 0.0,
                                                      True, chunk, [True, True, False], "cpp")
    return loss


OP_CASES = {  # one per family: (the custom op called directly, the public op, inputs as in CASES)
    "attention": (_attention_op, CASES["attention"][0], CASES["attention"][2]),
    "norm": (_add_norm_op, CASES["add_rms_norm"][0], CASES["add_rms_norm"][2]),
    "softmax": (_cross_entropy_op, CASES["cross_entropy"][0], CASES["cross_entropy"][2]),
    "fused_linear": (lambda h, w: _linear_cross_entropy_op(h.flatten(0, 1), w),
                     lambda h, w: ops.linear_cross_entropy(h, w, L(h)), [(5, 7, 24), (37, 24)]),
}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family", OP_CASES)
def test_custom_ops_carry_the_autocast_rules(family, compiled):
    """Mixed-dtype inputs straight into torch.ops.fastllm.*: the op's own autocast rule casts them, so the result
    is the public op's under autocast (checked against torch above), bit for bit, eager and compiled."""
    op, public, shapes = OP_CASES[family]
    inputs = _inputs(shapes, "cpu", torch.bfloat16)
    fn = torch.compile(op, fullgraph=True, backend="aot_eager") if compiled else op
    with torch.autocast("cpu", dtype=torch.bfloat16), fastllm.use_backend("cpp", strict=True):
        out, grads = _run(fn, inputs)
        expected_out, expected_grads = _run(public, inputs)
    for i, (a, b) in enumerate(zip(out + grads, expected_out + expected_grads)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{family}: result {i} differs ({a.dtype} vs {b.dtype})"
