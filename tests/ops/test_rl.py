"""ppo_policy_loss, value_loss, dpo_loss and gae: hand-computed cases, the definitions in the literature written
out element by element, GAE on every backend against a Python loop, bad input, and torch.compile."""
import math

import pytest
import torch
from numerics import (BACKEND_DEVICES, DTYPES, KERNEL_BACKEND_DEVICES, assert_matches_reference, backend_id,
                      on_backend)

from fastllm import ops
from fastllm.ops import rl, rl_estimators

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


# Loss aggregation: ratio 1 everywhere, so each token's loss is -A_t. Two sequences (rows), the second with its
# last two tokens masked: row 0 has 3 tokens with losses -1, -2, -3; row 1 has 1 token with loss -4.
AGG_ADVANTAGES = [[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]
AGG_MASK = [[1, 1, 1], [1, 0, 0]]
AGG_EXPECTED = {  # (loss, d loss / d logp per token): d l_t / d logp_t = -A_t at ratio 1
    "token_mean": ((-1 - 2 - 3 - 4) / 4, [[-1 / 4, -2 / 4, -3 / 4], [-4 / 4, 0, 0]]),
    "seq_mean_token_mean": (((-1 - 2 - 3) / 3 + -4 / 1) / 2, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 2, 0, 0]]),
    "seq_mean_token_sum": (((-1 - 2 - 3) + -4) / 2, [[-1 / 2, -2 / 2, -3 / 2], [-4 / 2, 0, 0]]),
    "token_sum_norm": ((-1 - 2 - 3 - 4) / 6, [[-1 / 6, -2 / 6, -3 / 6], [-4 / 6, 0, 0]]),  # 2 rows x 3 columns
}


@pytest.mark.parametrize("loss_agg", list(AGG_EXPECTED))
def test_loss_aggregation_hand_computed(loss_agg):
    old = tensor([[-1.0, -2.0, -0.5], [-3.0, float("nan"), float("nan")]])  # NaN padding must not leak
    advantages, mask = tensor(AGG_ADVANTAGES), tensor(AGG_MASK, torch.bool)
    call = lambda x: ops.ppo_policy_loss(x, old, advantages, mask, loss_agg=loss_agg)  # noqa: E731
    loss, grad = AGG_EXPECTED[loss_agg]
    logprobs = torch.where(mask, old, 0.0)
    torch.testing.assert_close(call(logprobs).loss, tensor(loss))
    torch.testing.assert_close(grad_of(lambda x: call(x).loss, logprobs), tensor(grad))
    # the same tokens flat, with the sequences given by cu_seqlens (token_sum_norm's normalizer then explicit)
    flat = dict(cu_seqlens=torch.tensor([0, 3, 6]), normalizer=6.0 if loss_agg == "token_sum_norm" else None)
    flat_loss = ops.ppo_policy_loss(logprobs.flatten(), old.flatten(), advantages.flatten(), mask.flatten(),
                                    loss_agg=loss_agg, **flat).loss
    torch.testing.assert_close(flat_loss, tensor(loss))


def test_token_sum_norm_normalizer_and_statistics():
    logprobs, advantages, mask = torch.zeros(2, 3), tensor(AGG_ADVANTAGES), tensor(AGG_MASK, torch.bool)
    out = ops.ppo_policy_loss(logprobs, logprobs, advantages, mask, loss_agg="token_sum_norm", normalizer=20.0)
    torch.testing.assert_close(out.loss, tensor(-10.0 / 20.0))
    # the statistics stay masked token means whatever the aggregation
    torch.testing.assert_close(out.ratio_mean, tensor(1.0))
    assert out.clip_fraction == 0 and out.clip_low_fraction == 0 and out.clip_high_fraction == 0


def test_gspo_sequence_ratio_hand_computed():
    """GSPO: s_i = exp(mean of the sequence's log-ratios), clipped per sequence, the same for all its tokens."""
    old = torch.zeros(2, 3)
    log_ratios = tensor([[0.1, -0.2, 0.4], [0.5, 0.9, 7.0]])  # row 1's last token is masked
    mask = tensor([[1, 1, 1], [1, 1, 0]], torch.bool)
    advantages = tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    s0, s1 = math.exp(0.3 / 3), math.exp(1.4 / 2)  # 1.105 (inside [0.8, 1.2]), 2.014 (above, A < 0: unclipped)
    out = ops.ppo_policy_loss(log_ratios, old, advantages, mask, ratio_level="sequence",
                              loss_agg="seq_mean_token_mean")
    torch.testing.assert_close(out.loss, tensor((-s0 + 2 * s1) / 2))
    torch.testing.assert_close(out.ratio_mean, tensor((3 * s0 + 2 * s1) / 5))
    grad = grad_of(lambda x: ops.ppo_policy_loss(x, old, advantages, mask, ratio_level="sequence",
                                                 loss_agg="seq_mean_token_mean").loss, log_ratios)
    # d loss / d logp_t = (1/S) * d(-A s_i)/d log s_i * d log s_i / d logp_t = (1/2) (-A s_i) (1 / n_i)
    torch.testing.assert_close(grad, tensor([[-s0 / 6] * 3, [2 * s1 / 4] * 2 + [0.0]]))
    clipped = ops.ppo_policy_loss(log_ratios, old, -advantages, mask, ratio_level="sequence")  # A > 0 at s1: clip
    torch.testing.assert_close(clipped.loss, tensor((3 * s0 - 2 * 2 * 1.2) / 5))
    torch.testing.assert_close(clipped.clip_high_fraction, tensor(2 / 5))
    assert clipped.clip_low_fraction == 0


@pytest.mark.parametrize("loss_agg", rl.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("ratio_level", rl.RATIO_LEVELS)
def test_weighted_derivative_matches_autograd(loss_agg, ratio_level):
    """policy_terms' analytic derivative of sum_t w_t l_t (the fused op's) is autograd's, in every mode."""
    lengths = [5, 1, 0, 9, 4]
    sequences = rl.Sequences.from_cu_seqlens(torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]), 19)
    logprobs = torch.randn(19, dtype=torch.float64) * 0.3 - 1
    old, advantages = logprobs.detach() + torch.randn(19, dtype=torch.float64) * 0.3, torch.randn(19, dtype=torch.float64)
    mask, ref = (torch.rand(19) > 0.2).double(), torch.randn(19, dtype=torch.float64) - 1
    weights = rl.token_weights(mask, loss_agg, sequences, 7.0)
    args = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logprobs=ref, kl_coef=0.1, kl_estimator="k2",
                ratio_level=ratio_level, mask=mask, sequences=sequences)
    terms = rl.policy_terms(logprobs, old, advantages, weights=weights, with_derivative=True, **args)
    autograd = grad_of(lambda x: rl.masked_sum(rl.policy_terms(x, old, advantages, **args).loss, weights), logprobs)
    torch.testing.assert_close(torch.where(mask != 0, terms.dloss_dlogprobs, 0.0), autograd)


@pytest.mark.parametrize("estimator,value,derivative", [
    ("k1", lambda d: d, lambda d: 1.0),
    ("k2", lambda d: d * d / 2, lambda d: d),
    ("k3", lambda d: math.exp(-d) + d - 1, lambda d: 1 - math.exp(-d)),
])
def test_kl_estimators_hand_computed(estimator, value, derivative):
    d = [-1.5, -0.1, 0.0, 0.7, 3.0]  # logp - ref
    logprobs, ref = tensor(d, torch.float64) - 2.0, torch.full((5,), -2.0, dtype=torch.float64)
    kl, grad = rl.kl_penalty(logprobs, ref, estimator, with_derivative=True)
    torch.testing.assert_close(kl, tensor([value(x) for x in d], torch.float64))
    torch.testing.assert_close(grad, tensor([derivative(x) for x in d], torch.float64))
    torch.testing.assert_close(grad, grad_of(lambda x: rl.kl_penalty(x, ref, estimator)[0].sum(), logprobs))
    # the low-variance clamp: values beyond +-c are cut and carry no gradient
    clamped, clamped_grad = rl.kl_penalty(logprobs, ref, estimator, clamp=0.5, with_derivative=True)
    torch.testing.assert_close(clamped, kl.clamp(-0.5, 0.5))
    torch.testing.assert_close(clamped_grad, torch.where(kl.abs() <= 0.5, grad, 0.0))


def test_kl_as_loss_term_uses_the_estimator():
    logprobs, ref = tensor([-1.0, -2.0]), tensor([-1.5, -1.0])
    out = ops.ppo_policy_loss(logprobs, logprobs, tensor([0.0, 0.0]), tensor([1, 1], torch.bool), ref_logprobs=ref,
                              kl_coef=0.5, kl_estimator="k2")
    torch.testing.assert_close(out.loss, tensor(0.5 * (0.5**2 / 2 + 1.0**2 / 2) / 2))
    torch.testing.assert_close(out.ref_kl, tensor((0.5**2 / 2 + 1.0**2 / 2) / 2))


# ---------------------------------------------------------------------------------------------------------
# Advantage estimators, whitening, rollout-mismatch correction
# ---------------------------------------------------------------------------------------------------------
SCORES = [1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0]  # two groups of 4: one with signal, one without


def test_group_advantages_hand_computed():
    scores = tensor(SCORES)
    group_std = math.sqrt(4 * 0.5**2 / 3)  # the sample std of 1, 0, 0, 1
    mean = sum(SCORES) / 8
    batch_std = math.sqrt(sum((x - mean) ** 2 for x in SCORES) / 7)
    centred = tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    for scale, divisor in (("group", group_std), ("batch", batch_std), ("none", 1.0)):
        adv = rl_estimators.group_advantages(scores, 4, scale=scale, eps=0.0)
        torch.testing.assert_close(adv, centred / divisor, msg=scale)
        assert torch.equal(adv[4:], torch.zeros(4))  # a group with one score carries no signal


def test_batch_scale_reduces_over_processes():
    """With reduce_sum the batch std is over every process's scores: here a fake second process holding the same
    scores again, so the sums double and the sample std is of the 16 scores."""
    scores = tensor(SCORES)
    adv = rl_estimators.group_advantages(scores, 4, scale="batch", eps=0.0, reduce_sum=lambda t: t.mul_(2))
    mean = sum(SCORES) / 8
    std16 = math.sqrt(2 * sum((x - mean) ** 2 for x in SCORES) / 15)
    torch.testing.assert_close(adv, tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / std16)


def test_rloo_hand_computed():
    adv = rl_estimators.rloo_advantages(tensor([1.0, 0.0, 0.0, 1.0, 2.0, 5.0]), 3)
    # group (1, 0, 0): 1 - 0, 0 - 0.5, 0 - 0.5; group (1, 2, 5): 1 - 3.5, 2 - 3, 5 - 1.5
    torch.testing.assert_close(adv, tensor([1.0, -0.5, -0.5, -2.5, -1.0, 3.5]))
    with pytest.raises(ValueError, match="group_size >= 2"):
        rl_estimators.rloo_advantages(tensor([1.0, 2.0]), 1)


def test_reinforce_pp_hand_computed():
    rewards = tensor([[-0.1, -0.2, 1.0], [0.3, 0.5, float("nan")]])  # KL penalties, the score on the last token
    mask = tensor([[1, 1, 1], [1, 1, 0]], torch.bool)
    returns = [0.7, 0.8, 1.0, 0.8, 0.5]  # reward-to-go with gamma = 1
    mean = sum(returns) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 5)
    adv = rl_estimators.reinforce_pp_advantages(rewards, mask, eps=0.0)
    expected = tensor([[0.7, 0.8, 1.0], [0.8, 0.5, mean]]) - mean
    torch.testing.assert_close(adv, torch.where(mask, expected / std, 0.0))
    discounted = rl_estimators.reinforce_pp_advantages(rewards[:1], mask[:1], gamma=0.5, eps=0.0)
    g = [-0.1 + 0.5 * (-0.2 + 0.5 * 1.0), -0.2 + 0.5 * 1.0, 1.0]
    m = sum(g) / 3
    torch.testing.assert_close(discounted, tensor([[x - m for x in g]]) / math.sqrt(sum((x - m) ** 2 for x in g) / 3))


def test_whitening_hand_computed():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = rl_estimators.whiten(values, mask, eps=0.0)
    mean, var = 2.5, (1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 4  # population variance of 1, 2, 3, 4
    expected = torch.tensor([[1 - mean, 2 - mean, 3 - mean], [4 - mean, 0, 0]]) / math.sqrt(var)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("level", rl_estimators.TIS_LEVELS)
@pytest.mark.parametrize("mode", rl_estimators.TIS_MODES)
def test_rollout_importance_weights_direct_formula(level, mode):
    old = tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    rollout = tensor([[-1.5, -1.0, -0.5], [-2.0, -2.5, 5.0]])  # the last token is masked: its 5.0 must not count
    mask = tensor([[1, 1, 1], [1, 1, 0]], torch.bool)
    diff = [[0.5, -1.0, 0.0], [-1.0, 1.5, 0.0]]  # old - rollout where masked in
    if level == "token":
        rho = [[math.exp(x) for x in row] for row in diff]
    else:  # the product of the sequence's token ratios
        rho = [[math.exp(sum(row))] * 3 for row in diff]
    cap = 1.5
    if mode == "truncate":
        weights = [[min(r, cap) for r in row] for row in rho]
    else:
        weights = [[0.0 if r > cap else 1.0 for r in row] for row in rho]
    weights[1][2] = 0.0
    out = rl_estimators.rollout_importance_weights(old, rollout, mask, level=level, mode=mode, threshold=cap)
    torch.testing.assert_close(out.weights, tensor(weights))
    valid = [(i, j) for i in range(2) for j in range(3) if mask[i, j]]
    torch.testing.assert_close(out.logprob_diff_mean, tensor(sum(abs(diff[i][j]) for i, j in valid) / 5))
    torch.testing.assert_close(out.logprob_diff_max, tensor(1.5))
    torch.testing.assert_close(out.ratio_max, tensor(max(rho[i][j] for i, j in valid)))
    torch.testing.assert_close(out.ratio_min, tensor(min(rho[i][j] for i, j in valid)))
    torch.testing.assert_close(out.corrected_fraction, tensor(sum(rho[i][j] > cap for i, j in valid) / 5))
    # flat tokens with cu_seqlens give the same weights
    flat = rl_estimators.rollout_importance_weights(old.flatten(), rollout.flatten(), mask.flatten(), level=level,
                                                    mode=mode, threshold=cap, cu_seqlens=torch.tensor([0, 3, 6]))
    torch.testing.assert_close(flat.weights, out.weights.flatten())


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
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), loss_agg="mean"), ValueError, "loss_agg must be one of"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), ratio_level="seq"), ValueError, "ratio_level must be one of"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), loss_agg="seq_mean_token_mean"), ValueError,
     r"needs sequences: a 2-D \(batch, T\) logprobs .* got logprobs of shape \(4,\)"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), ratio_level="sequence"), ValueError, "needs sequences"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), loss_agg="token_sum_norm"), ValueError,
     "needs normalizer="),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), normalizer=4.0), ValueError,
     "normalizer applies to loss_agg='token_sum_norm' only"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), loss_agg="token_sum_norm", normalizer=0), ValueError,
     "normalizer must be a positive"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), cu_seqlens=torch.tensor([0, 3])), ValueError,
     r"cu_seqlens must be 1-D non-decreasing .* from 0 to the 4 tokens .* got \[0, 3\]"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), cu_seqlens=torch.tensor([0.0, 4.0])), TypeError,
     "cu_seqlens must be an int32 or int64"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), kl_estimator="k4"), ValueError, "kl_estimator must be one"),
    (lambda: ops.ppo_policy_loss(_x(), _x(), _x(), _x(), kl_clamp=0), ValueError, "kl_clamp must be"),
    (lambda: rl_estimators.group_advantages(_x(6), 4), ValueError, "group_size must be a positive int dividing"),
    (lambda: rl_estimators.group_advantages(_x(), 2, scale="std"), ValueError, "scale must be one of"),
    (lambda: rl_estimators.rollout_importance_weights(_x(), _x(), _x(), level="sequence"), ValueError,
     "needs sequences"),
    (lambda: rl_estimators.rollout_importance_weights(_x(), _x(), _x(), threshold=-1), ValueError, "threshold must"),
    (lambda: rl_estimators.rollout_importance_weights(_x(), _x(), _x(), mode="clip"), ValueError, "mode must be"),
], ids=["ppo-shape", "ppo-mask-dtype", "ppo-clip", "ppo-dual", "ppo-kl-ref", "ppo-nan-coef", "value-shape",
        "value-clip", "dpo-beta", "dpo-type", "dpo-smoothing", "dpo-dtype", "gae-1d", "gae-dtype", "gae-mask",
        "gae-gamma", "gae-lam", "agg-name", "ratio-level", "agg-1d", "gspo-1d", "norm-missing", "norm-mode",
        "norm-zero", "cu-bounds", "cu-dtype", "kl-estimator", "kl-clamp", "group-size", "group-scale", "tis-1d",
        "tis-threshold", "tis-mode"])
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
