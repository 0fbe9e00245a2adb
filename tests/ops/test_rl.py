"""ppo_policy_loss, value_loss, dpo_loss and gae: hand-computed cases, the definitions in the literature written
out element by element, GAE on every backend against a Python loop, bad input, and torch.compile."""
import math

import pytest
import torch
from numerics import (BACKEND_DEVICES, DTYPES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id,
                      on_backend)

from fastllm import ops
from fastllm.ops import rl

BACKEND_IDS = [b for b, _ in BACKEND_DEVICES]
KERNEL_IDS = [b for b, _ in KERNEL_BACKEND_DEVICES]


def tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def grad_of(loss_fn, x):
    x = x.clone().requires_grad_(True)
    loss_fn(x).backward()
    return x.grad


# ---------------------------------------------------------------------------------------------------------
# PPO policy loss
# ---------------------------------------------------------------------------------------------------------
# Ratios 0.5, 1, 1.5, 2 with advantages +1, -1, +1, -1 and clip_eps 0.2. Token losses max(-A r, -A clip(r)):
#   r=0.5, A=+1: max(-0.5, -0.8) = -0.5        unclipped
#   r=1.0, A=-1: max( 1.0,  1.0) =  1.0        unclipped
#   r=1.5, A=+1: max(-1.5, -1.2) = -1.2        clipped (no gradient)
#   r=2.0, A=-1: max( 2.0,  1.2) =  2.0        unclipped (the pessimistic side is the raw ratio)
RATIOS = [0.5, 1.0, 1.5, 2.0]
ADVANTAGES = [1.0, -1.0, 1.0, -1.0]


def ppo_case(mask=(1, 1, 1, 1), **kwargs):
    old = tensor([-1.0, -2.0, -0.5, -3.0])
    logprobs = old + tensor(RATIOS).log()
    out = ops.ppo_policy_loss(logprobs, old, tensor(ADVANTAGES), tensor(mask, torch.bool), **kwargs)
    grad = grad_of(lambda x: ops.ppo_policy_loss(x, old, tensor(ADVANTAGES), tensor(mask, torch.bool),
                                                 **kwargs).loss, logprobs)
    return out, grad


def test_ppo_hand_computed():
    out, grad = ppo_case()
    torch.testing.assert_close(out.loss, tensor((-0.5 + 1.0 - 1.2 + 2.0) / 4))
    torch.testing.assert_close(out.clip_fraction, tensor(0.25))
    torch.testing.assert_close(out.ratio_mean, tensor(1.25))
    torch.testing.assert_close(out.approx_kl, tensor(sum(r - 1 - math.log(r) for r in RATIOS) / 4))
    # d/dlogp (-A r) = -A r where unclipped, 0 where clipped; divided by the 4 tokens
    torch.testing.assert_close(grad, tensor([-0.5, 1.0, 0.0, 2.0]) / 4)
    assert out.entropy is None and out.ref_kl is None


def test_ppo_dual_clip_caps_negative_advantages():
    out, grad = ppo_case(dual_clip=1.5)  # r=2, A=-1: min(2.0, 1.5 * 1) = 1.5, constant
    torch.testing.assert_close(out.loss, tensor((-0.5 + 1.0 - 1.2 + 1.5) / 4))
    torch.testing.assert_close(grad, tensor([-0.5, 1.0, 0.0, 0.0]) / 4)


def test_ppo_clip_higher():
    out, _ = ppo_case(clip_eps_high=0.28)  # r=1.5, A=+1: max(-1.5, -1.28)
    torch.testing.assert_close(out.loss, tensor((-0.5 + 1.0 - 1.28 + 2.0) / 4))


def test_ppo_masked_mean():
    out, grad = ppo_case(mask=(1, 1, 0, 1))
    torch.testing.assert_close(out.loss, tensor((-0.5 + 1.0 + 2.0) / 3))
    torch.testing.assert_close(out.clip_fraction, tensor(0.0))
    torch.testing.assert_close(grad, tensor([-0.5, 1.0, 0.0, 2.0]) / 3)
    nothing, nothing_grad = ppo_case(mask=(0, 0, 0, 0))
    assert nothing.loss == 0 and torch.all(nothing_grad == 0)


def test_ppo_kl_and_entropy_terms():
    logprobs, ref = tensor([-1.0, -2.0]), tensor([-1.5, -1.0])
    entropy = tensor([2.0, 3.0])
    out = ops.ppo_policy_loss(logprobs, logprobs, tensor([0.0, 0.0]), tensor([1, 1], torch.bool), entropy=entropy,
                              entropy_coef=0.1, ref_logprobs=ref, kl_coef=0.5)
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]  # d = ref - logp
    torch.testing.assert_close(out.loss, tensor(0.5 * sum(k3) / 2 - 0.1 * 2.5))
    torch.testing.assert_close(out.ref_kl, tensor(sum(k3) / 2))
    torch.testing.assert_close(out.entropy, tensor(2.5))


def literature_ppo(logprobs, old, advantages, mask, eps_low, eps_high, dual_clip):
    """Schulman et al. 2017 eq. 7 (and Ye et al. 2020 eq. 5 for dual clip), element by element in Python floats:
    J_t = min(r A, clip(r, 1 - eps, 1 + eps) A), for A < 0 J_t = max(J_t, c A); loss = -sum(m J) / sum(m)."""
    total, count = 0.0, 0
    for lp, o, a, m in zip(logprobs.tolist(), old.tolist(), advantages.tolist(), mask.tolist()):
        if not m:
            continue
        r = math.exp(lp - o)
        objective = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
        if dual_clip is not None and a < 0:
            objective = max(objective, dual_clip * a)
        total, count = total - objective, count + 1
    return total / count


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_ppo_matches_the_paper(eps_high, dual_clip):
    logprobs, old = torch.randn(200, dtype=torch.float64) - 2, torch.randn(200, dtype=torch.float64) - 2
    advantages, mask = torch.randn(200, dtype=torch.float64), torch.rand(200) > 0.3
    out = ops.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, clip_eps_high=eps_high,
                              dual_clip=dual_clip)
    expected = literature_ppo(logprobs, old, advantages, mask, 0.2, 0.2 if eps_high is None else eps_high, dual_clip)
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-12)


def test_ppo_derivative_matches_autograd():
    """policy_terms' analytic d loss / d logp (used by the fused op) is autograd's, clamped log-ratios included."""
    logprobs = torch.randn(300, dtype=torch.float64) * 3
    logprobs[:4] = torch.tensor([30.0, -30.0, 25.0, -25.0])  # beyond the +-20 log-ratio clamp
    old, advantages, ref = logprobs.detach() * 0 - 1, torch.randn(300, dtype=torch.float64), torch.randn(300) - 2
    args = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logprobs=ref.double(), kl_coef=0.1)
    terms = rl.policy_terms(logprobs, old, advantages, with_derivative=True, **args)
    autograd = grad_of(lambda x: rl.policy_terms(x, old, advantages, **args).loss.sum(), logprobs)
    torch.testing.assert_close(terms.dloss_dlogprobs, autograd)


def test_ppo_extreme_log_ratios_are_finite():
    logprobs, old = tensor([0.0, -200.0, -1.0]), tensor([-200.0, 0.0, float("-inf")])
    out, = [ops.ppo_policy_loss(logprobs, old, tensor([1.0, -1.0, 1.0]), tensor([1, 1, 1], torch.bool))]
    grad = grad_of(lambda x: ops.ppo_policy_loss(x, old, tensor([1.0, -1.0, 1.0]),
                                                 tensor([1, 1, 1], torch.bool)).loss, logprobs)
    assert torch.isfinite(out.loss) and torch.all(torch.isfinite(grad))


# ---------------------------------------------------------------------------------------------------------
# Value loss
# ---------------------------------------------------------------------------------------------------------
def test_value_loss_hand_computed():
    # v=1.0, old=0.5, R=2: clipped v = 0.7 -> errors 1.0 and 1.69: max 1.69 (clipped is larger)
    # v=0.0, old=0.1, R=0: clipped v = 0.0 (inside)  -> errors 0 and 0: 0
    values, old, returns = tensor([1.0, 0.0]), tensor([0.5, 0.1]), tensor([2.0, 0.0])
    out = ops.value_loss(values, old, returns, tensor([1, 1], torch.bool), clip_eps=0.2)
    torch.testing.assert_close(out.loss, tensor(0.5 * (1.69 + 0.0) / 2))
    torch.testing.assert_close(out.clip_fraction, tensor(0.5))
    # the clipped branch is constant in v, so the first value gets no gradient
    grad = grad_of(lambda v: ops.value_loss(v, old, returns, tensor([1, 1], torch.bool)).loss, values)
    torch.testing.assert_close(grad, tensor([0.0, 0.0]))
    plain = ops.value_loss(values, old, returns, tensor([1, 0], torch.bool), clip_eps=None)
    torch.testing.assert_close(plain.loss, tensor(0.5 * 1.0))


# ---------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------
def dpo_inputs():
    # u = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 12) - (-15 + 14) = 3 and (-20 + 19) - (-18 + 20) = -3
    return tensor([-10.0, -20.0]), tensor([-15.0, -18.0]), tensor([-12.0, -19.0]), tensor([-14.0, -20.0])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("loss_type,smoothing,per_pair", [
    ("sigmoid", 0.0, lambda u, b: -math.log(sigmoid(b * u))),
    ("sigmoid", 0.1, lambda u, b: -0.9 * math.log(sigmoid(b * u)) - 0.1 * math.log(sigmoid(-b * u))),
    ("ipo", 0.0, lambda u, b: (u - 1 / (2 * b)) ** 2),
    ("hinge", 0.0, lambda u, b: max(0.0, 1 - b * u)),
], ids=["sigmoid", "sigmoid-smooth", "ipo", "hinge"])
def test_dpo_hand_computed(loss_type, smoothing, per_pair):
    beta = 0.5
    out = ops.dpo_loss(*dpo_inputs(), beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    torch.testing.assert_close(out.loss, tensor((per_pair(3.0, beta) + per_pair(-3.0, beta)) / 2))
    torch.testing.assert_close(out.chosen_rewards, tensor([beta * 2.0, beta * -1.0]))
    torch.testing.assert_close(out.rejected_rewards, tensor([beta * -1.0, beta * 2.0]))


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_derivative_matches_autograd(loss_type, smoothing):
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(50, dtype=torch.float64) * 4 for _ in range(4))
    args = dict(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    _, derivative = rl.preference_losses(chosen, rejected, ref_chosen, ref_rejected, with_derivative=True, **args)
    autograd = grad_of(lambda x: rl.preference_losses(x, rejected, ref_chosen, ref_rejected, **args)[0].sum(), chosen)
    torch.testing.assert_close(derivative, autograd)


def test_dpo_gradient_flows_to_policy_only():
    chosen, rejected, ref_chosen, ref_rejected = (t.requires_grad_(True) for t in dpo_inputs())
    ops.dpo_loss(chosen, rejected, ref_chosen, ref_rejected).loss.backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert ref_chosen.grad is None and ref_rejected.grad is None


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------
def python_gae(rewards, values, mask, gamma, lam):
    """One sequence at a time, one step at a time, in Python floats: the definition with masked steps skipped."""
    advantages = [[0.0] * len(row) for row in rewards]
    returns = [[0.0] * len(row) for row in rewards]
    for b, (r_row, v_row, m_row) in enumerate(zip(rewards, values, mask)):
        next_value = next_advantage = 0.0
        for t in reversed(range(len(r_row))):
            if not m_row[t]:
                continue
            delta = r_row[t] + gamma * next_value - v_row[t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = v_row[t]
            advantages[b][t], returns[b][t] = next_advantage, next_advantage + v_row[t]
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def gae_batch(dtype, batch=37, steps=23):
    """Right-padded sequences of every length from 0 to steps, one with a masked step inside, NaN padding."""
    rewards = torch.randn(batch, steps, dtype=torch.float64).to(dtype)
    values = torch.randn(batch, steps, dtype=torch.float64).to(dtype)
    lengths = torch.arange(batch) % (steps + 1)
    lengths[-1] = steps
    mask = torch.arange(steps)[None] < lengths[:, None]
    mask[-1, 3] = False  # a skipped step inside a full-length sequence
    values[~mask] = float("nan")
    rewards[~mask] = float("nan")
    return rewards, values, mask


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=backend_id)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_gae_matches_python_loop(backend, device, dtype):
    rewards, values, mask = gae_batch(dtype)
    with on_backend(backend):
        advantages, returns = ops.gae(rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95)
    expected = python_gae(rewards.double().tolist(), values.double().tolist(), mask.tolist(), 0.99, 0.95)
    baseline = [t.to(dtype) for t in rl.reference.gae(rewards, values, mask, 0.99, 0.95)]
    for name, ours, exact, plain in zip(("advantages", "returns"), (advantages, returns), expected, baseline):
        assert ours.dtype == dtype
        assert_matches_reference(name, ours, exact, plain)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES, ids=BACKEND_IDS)
def test_gae_special_cases(backend, device):
    """lam = 1, gamma = 1: advantages are reward-to-go minus the value; lam = 0: the one-step TD error."""
    rewards, values = tensor([[1.0, 2.0, 3.0, 9.0]]), tensor([[0.5, 0.25, 0.125, 9.0]])
    mask = tensor([[1, 1, 1, 0]], torch.bool)
    with on_backend(backend):
        monte_carlo, returns = ops.gae(rewards.to(device), values.to(device), mask.to(device), gamma=1.0, lam=1.0)
        td, _ = ops.gae(rewards.to(device), values.to(device), mask.to(device), gamma=0.5, lam=0.0)
    torch.testing.assert_close(monte_carlo.cpu(), tensor([[6.0 - 0.5, 5.0 - 0.25, 3.0 - 0.125, 0.0]]))
    torch.testing.assert_close(returns.cpu(), tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(td.cpu(), tensor([[1.0 + 0.5 * 0.25 - 0.5, 2.0 + 0.5 * 0.125 - 0.25, 3.0 - 0.125, 0.0]]))


def test_gae_cpp_float64():
    rewards, values, mask = gae_batch(torch.float64)
    with on_backend("cpp"):
        advantages, returns = ops.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = python_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8)
    torch.testing.assert_close(advantages, expected[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(returns, expected[1], rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument
# ---------------------------------------------------------------------------------------------------------
def _x(n=4):
    return torch.zeros(n)


@pytest.mark.parametrize("call,error,message", [
    (lambda: ops.ppo_policy_loss(_x(), _x(3), _x(), _x()), ValueError, r"old_logprobs must have the shape of logprobs"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x().long()), TypeError, "mask must have dtype"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), clip_eps=-0.1), ValueError, "clip_eps must be"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), dual_clip=1.0), ValueError, "dual_clip must be"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), kl_coef=0.1), ValueError, "ref_logprobs is required"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), entropy_coef=float("nan")), ValueError, "entropy_coef"),
    (lambda: ops.value_loss(_x(), _x(), _x(2), _x()), ValueError, "returns must have the shape of values"),
    (lambda: ops.value_loss(_x(), _x(), _x(), _x(), clip_eps=-1), ValueError, "clip_eps must be"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), beta=0), ValueError, "beta must be a positive"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="kto"), ValueError, "loss_type must be one of"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), label_smoothing=0.7), ValueError, "label_smoothing must be"),
    (lambda: ops.dpo_loss(_x(), _x().long(), _x(), _x()), TypeError, "policy_rejected_logps must have dtype"),
    (lambda: ops.gae(_x(), _x(), _x()), ValueError, r"values must be 2-D \(batch, steps\)"),
    (lambda: ops.gae(_x().view(2, 2), _x().view(2, 2).double(), _x().view(2, 2)), TypeError, "one dtype"),
    (lambda: ops.gae(_x().view(2, 2), _x().view(2, 2), _x().view(1, 4)), ValueError, "mask must have the shape"),
    (lambda: ops.gae(_x().view(2, 2), _x().view(2, 2), _x().view(2, 2), gamma=1.5), ValueError, "gamma must be"),
    (lambda: ops.gae(_x().view(2, 2), _x().view(2, 2), _x().view(2, 2), lam=-0.1), ValueError, "lam must be"),
], ids=["ppo-shape", "ppo-mask-dtype", "ppo-clip", "ppo-dual", "ppo-kl-ref", "ppo-nan-coef", "value-shape",
        "value-clip", "dpo-beta", "dpo-type", "dpo-smoothing", "dpo-dtype", "gae-1d", "gae-dtype", "gae-mask",
        "gae-gamma", "gae-lam"])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_cpp_gae_kernel_checks_its_inputs():
    from fastllm import _cpp

    with pytest.raises(RuntimeError, match="mask must be bool"):
        _cpp.load().gae_forward(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 0.95)


# ---------------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=KERNEL_IDS)
def test_gae_opcheck(backend, device):
    rewards, values, mask = (t.to(device) for t in gae_batch(torch.float32, batch=5, steps=7))
    torch.library.opcheck(torch.ops.fastllm.gae.default, (rewards, values, mask, 0.99, 0.95, backend))


def _losses(logprobs, old, advantages, mask, values, returns):
    ppo = ops.ppo_policy_loss(logprobs, old, advantages, mask, clip_eps_high=0.3, dual_clip=3.0)
    value = ops.value_loss(values, old, returns, mask)
    dpo = ops.dpo_loss(logprobs[:4], logprobs[4:], old[:4], old[4:], loss_type="ipo")
    advantages_gae, _ = ops.gae(advantages.view(2, 4), values.view(2, 4), mask.view(2, 4))
    return ppo.loss + value.loss + dpo.loss + advantages_gae.sum()


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES, ids=KERNEL_IDS)
def test_compile_fullgraph(backend, device):
    inputs = [torch.randn(8, device=device) for _ in range(5)]
    inputs.insert(3, torch.rand(8, device=device) > 0.3)
    with on_backend(backend):
        eager_leaf = inputs[0].clone().requires_grad_(True)
        eager = _losses(eager_leaf, *inputs[1:])
        eager.backward()
        torch._dynamo.reset()
        compiled_leaf = inputs[0].clone().requires_grad_(True)
        compiled = torch.compile(_losses, fullgraph=True, backend="aot_eager")(compiled_leaf, *inputs[1:])
        compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
