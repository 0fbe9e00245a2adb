"""PPO and GRPO on tiny GPTs: the known traps (ratio 1, temperature, KL, dropout, padding/positions, where the
score lands), GAE and whitening on hand-computed cases, learning on a bandit-like task, exact resume."""
import math

import pytest
import torch

from numerics import key_bias_mask

from fastllm.model import GPT, GPTConfig
from fastllm import ops
from fastllm.train.rl import (PartialBatchError, PPOConfig, PPOTrainer, RewardError, Rollout, dynamic_sample,
                              overlong_penalty, pack_responses, response_logprobs, token_rewards)
from fastllm.train.rl.advantages import apply_rollout_correction


def kl_estimate(logprobs, ref_logprobs, estimator):
    return ops.kl_penalty(logprobs, ref_logprobs, estimator)[0]

V = 16
PROMPTS = [[2 + i % 5, 3 + i % 7, 4 + i % 3][: 1 + i % 3] for i in range(24)]  # lengths 1..3: packing matters



def tiny_gpt(seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig.gpt2_style(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=dropout, **kw))


def bandit_reward(prompt, response):
    """1 when the first response token is one of 4 'good' tokens of the 16: a bandit with a sequence shape."""
    return float(response[0] < 4)


def graded_reward(prompt, response):
    """Many distinct values, for tests that need every step to train: a batch whose rollouts all score alike has
    zero advantages (with bandit_reward, 8 rollouts all miss its 4 tokens of 16 one draw in 10)."""
    return response[0] / 16 + response[-1] / 256


def config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), steps=20, batch_size=8, minibatch_size=8, ppo_epochs=2, max_new_tokens=2,
                lr=1e-2, critic_lr=1e-2, kl_coef=0.01, progress=False, plot=False, checkpoint_interval=0, seed=3)
    base.update(kw)
    return PPOConfig(**base)


def mean_reward(trainer, steps):
    return sum(trainer.train_step()["reward"] for _ in range(steps)) / steps


# ---------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("critic", ["separate", "head"])
def test_ppo_raises_reward_on_bandit(tmp_path, critic):
    trainer = PPOTrainer(tiny_gpt(), config(tmp_path, critic=critic), PROMPTS, reward_fn=bandit_reward)
    first = mean_reward(trainer, 4)
    for _ in range(12):
        trainer.train_step()
    last = mean_reward(trainer, 4)
    assert first < 0.45 and last > first + 0.3, (first, last)


# ---------------------------------------------------------------------------------------------- traps
def test_first_minibatch_ratio_exactly_one_with_dropout_configured(tmp_path):
    # The models are built with dropout 0.3: PPO must keep them in eval mode, or the ratio would not be 1.
    policy = tiny_gpt(dropout=0.3)
    trainer = PPOTrainer(policy, config(tmp_path, steps=3), PROMPTS, reward_fn=graded_reward)
    for _ in range(3):
        record = trainer.train_step()
        assert record["first_ratio"] == 1.0 and record["first_clip_fraction"] == 0.0
        assert record["clip_fraction"] > 0.0  # later minibatches do move (lr 1e-2): the check is not vacuous
        for model in trainer._models():
            assert not any(m.training for m in model.modules())


def test_kl_zero_when_policy_equals_reference(tmp_path):
    trainer = PPOTrainer(tiny_gpt(), config(tmp_path), PROMPTS, reward_fn=bandit_reward)
    rollout = trainer.rollout()  # step 0: the policy is the reference
    for old, ref in zip(rollout.old_logprobs, rollout.ref_logprobs):
        assert torch.equal(old, ref)
        assert torch.equal(kl_estimate(old, ref, "k1"), torch.zeros_like(old))
        assert torch.equal(kl_estimate(old, ref, "k3"), torch.zeros_like(old))
    assert trainer.train_step()["kl"] == 0.0


def test_k3_never_negative_while_k1_is(tmp_path):
    trainer = PPOTrainer(tiny_gpt(), config(tmp_path, max_new_tokens=4), PROMPTS, reward_fn=bandit_reward)
    for _ in range(6):
        trainer.train_step()
    rollout = trainer.rollout()
    k1 = torch.cat([kl_estimate(o, r, "k1") for o, r in zip(rollout.old_logprobs, rollout.ref_logprobs)])
    k3 = torch.cat([kl_estimate(o, r, "k3") for o, r in zip(rollout.old_logprobs, rollout.ref_logprobs)])
    assert (k1 < 0).any() and (k3 > 0).any()  # the policy has moved, in both directions per token
    assert (k3 >= 0).all()
    assert trainer.train_step()["kl_k3_token_min"] >= 0


def test_temperature_in_rollout_and_update(tmp_path):
    trainer = PPOTrainer(tiny_gpt(), config(tmp_path, temperature=0.5, max_new_tokens=5), PROMPTS,
                         reward_fn=bandit_reward)
    r = trainer.rollout()
    sampled, recomputed = torch.cat(r.sample_logprobs), torch.cat(r.old_logprobs)
    # generation's decode path and the update's packed forward agree at the sampling temperature ...
    torch.testing.assert_close(recomputed, sampled, atol=1e-5, rtol=0)
    # ... and not at temperature 1, so the check can fail
    at_one = response_logprobs(trainer.policy, r.prompts, r.responses, 1.0)
    assert (at_one - sampled).abs().max() > 1e-2


def test_packed_logprobs_match_each_sequence_alone():
    """Prompts of different lengths share a packed batch: each sequence's positions start at 0 and it sees only
    itself, so its log-probs equal those of a plain dense forward of that sequence alone."""
    model = tiny_gpt(position="learned")
    prompts = [[3], [5, 6, 7, 8], [9, 2]]
    responses = [[4, 4, 1], [2], [7, 3, 3, 3]]
    packed = response_logprobs(model, prompts, responses, 0.7)
    expected = []
    for p, r in zip(prompts, responses):
        seq = torch.tensor([p + r[:-1]])
        logits, _ = model(seq)  # dense: positions 0..T-1
        lp = (logits[0, len(p) - 1:] / 0.7).log_softmax(-1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        expected.append(lp)
    torch.testing.assert_close(packed, torch.cat(expected), atol=1e-5, rtol=1e-5)
    _, cu, labels, positions = pack_responses(prompts, responses, "cpu")
    assert cu.tolist() == [0, 3, 7, 12] and labels.tolist() == [4, 4, 1, 2, 7, 3, 3, 3]
    assert positions.tolist() == [0, 1, 2, 6, 8, 9, 10, 11]


def test_score_lands_on_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    kl = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5])]  # a 3-token response and a 1-token one
    rewards = token_rewards(scores, kl, kl_coef=0.5)
    torch.testing.assert_close(rewards[0], torch.tensor([-0.05, -0.1, -0.15 + 2.0]))
    torch.testing.assert_close(rewards[1], torch.tensor([-0.25 - 1.0]))


def test_missing_eos_penalty_and_truncation(tmp_path):
    # Stop token 0 is never sampled by this reward-shaped policy early on; responses hit max_new_tokens.
    trainer = PPOTrainer(tiny_gpt(), config(tmp_path, max_new_tokens=3, missing_eos_penalty=-5.0), PROMPTS,
                         reward_fn=lambda p, r: 0.0, stop_token=0)
    r = trainer.rollout()
    for stopped, response, score in zip(r.stopped, r.responses, r.scores.tolist()):
        assert stopped == (response[-1] == 0)
        assert score == (0.0 if stopped else -5.0)
    assert not all(r.stopped)


def test_fused_update_matches_materialised_logits(tmp_path):
    params = []
    for fused in (True, False):
        trainer = PPOTrainer(tiny_gpt(), config(tmp_path / str(fused), fused=fused, max_new_tokens=4), PROMPTS,
                             reward_fn=bandit_reward)
        trainer.train_step()
        params.append(torch.cat([p.detach().flatten() for p in trainer.policy.parameters()]))
    keep = key_bias_mask(trainer.policy)  # its gradient is rounding noise: 2.7e-5 apart on an Intel Xeon
    torch.testing.assert_close(params[0][keep], params[1][keep], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- GAE, whitening
def test_gae_hand_computed():
    gamma, lam = 0.9, 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 9.0]])  # 9.0 sits on padding: must be ignored
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    # sequence 0: deltas d2 = 1 - 0.6 = 0.4; d1 = 0 + 0.9*0.6 - 0.4 = 0.14; d0 = 0 + 0.9*0.4 - 0.2 = 0.16
    a2 = 0.4
    a1 = 0.14 + 0.45 * a2
    a0 = 0.16 + 0.45 * a1
    # sequence 1 (2 steps): d1 = 2.0 - 0.5 = 1.5; d0 = 0.5 + 0.9*0.5 - 1.0 = -0.05
    b1 = 1.5
    b0 = -0.05 + 0.45 * b1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.2, a1 + 0.4, a2 + 0.6], [b0 + 1.0, b1 + 0.5, 0.0]]))


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_resume_continues_exactly(tmp_path, advantage):
    kw = dict(steps=4, advantage=advantage, group_size=2 if advantage == "grpo" else 1, kl_target=0.5,
              kl_horizon=100, max_new_tokens=3, plot=True)
    full = PPOTrainer(tiny_gpt(), config(tmp_path / "full", **kw), PROMPTS, reward_fn=bandit_reward)
    full.fit()
    half = PPOTrainer(tiny_gpt(), config(tmp_path / "half", **{**kw, "steps": 2}), PROMPTS, reward_fn=bandit_reward)
    half.fit()
    # A fresh process would rebuild the policy from its initial weights; the checkpoint restores the rest.
    resumed = PPOTrainer(tiny_gpt(), config(tmp_path / "half", **kw, resume=True), PROMPTS, reward_fn=bandit_reward)
    assert resumed.step == 2
    resumed.fit()
    for a, b in zip(full.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert full.kl_coef == resumed.kl_coef != 0.01  # the adaptive coefficient moved and was restored
    logged = [[r["reward"] for r in t.logger.records()] for t in (full, resumed)]
    assert logged[0] == logged[1] and len(logged[0]) == 4
    assert (tmp_path / "half" / "ppo.png").is_file()


def test_ppo_resume_with_changed_settings_warns(tmp_path, recwarn):
    kw = dict(steps=2, max_new_tokens=3)
    PPOTrainer(tiny_gpt(), config(tmp_path, **kw), PROMPTS, reward_fn=bandit_reward).fit()
    PPOTrainer(tiny_gpt(), config(tmp_path, **{**kw, "steps": 3}, resume=True), PROMPTS, reward_fn=bandit_reward)
    assert not [w for w in recwarn if "changed settings" in str(w.message)]  # more steps only extend the run
    with pytest.warns(UserWarning, match=r"changed settings \{'clip_eps': \(0.2, 0.3\)\}"):
        PPOTrainer(tiny_gpt(), config(tmp_path, **kw, clip_eps=0.3, resume=True), PROMPTS, reward_fn=bandit_reward)


# ---------------------------------------------------------------------------------------------- the variants
@pytest.mark.parametrize("advantage,loss_agg,ratio_level,scale", [
    ("grpo", "token_mean", "token", "group"), ("rloo", "seq_mean_token_mean", "token", "group"),
    ("dr_grpo", "token_sum_norm", "token", "group"), ("reinforce_pp", "token_mean", "token", "group"),
    ("grpo", "seq_mean_token_sum", "sequence", "batch")], ids=["grpo", "rloo", "dr_grpo", "reinforce_pp", "gspo"])
def test_critic_free_estimators_raise_reward_on_bandit(tmp_path, advantage, loss_agg, ratio_level, scale):
    cfg = config(tmp_path, advantage=advantage, group_size=4, batch_size=4, minibatch_size=8, loss_agg=loss_agg,
                 ratio_level=ratio_level, scale_rewards=scale, clip_eps_high=0.28 if ratio_level == "token" else 0.0)
    trainer = PPOTrainer(tiny_gpt(), cfg, PROMPTS, reward_fn=bandit_reward)
    assert trainer.critic is None and trainer.value_head is None
    first = mean_reward(trainer, 3)
    for _ in range(10):
        trainer.train_step()
    last = mean_reward(trainer, 3)
    assert first < 0.45 and last > first + 0.3, (first, last)


@pytest.mark.parametrize("loss_agg,ratio_level", [("seq_mean_token_sum", "sequence"), ("token_sum_norm", "token")])
def test_fused_update_matches_materialised_logits_in_every_mode(tmp_path, loss_agg, ratio_level):
    params = []
    for fused in (True, False):
        cfg = config(tmp_path / str(fused), fused=fused, max_new_tokens=4, advantage="grpo", group_size=2,
                     batch_size=4, loss_agg=loss_agg, ratio_level=ratio_level, kl_estimator="k2", kl_clamp=10.0)
        trainer = PPOTrainer(tiny_gpt(), cfg, PROMPTS, reward_fn=graded_reward)
        trainer.train_step()
        params.append(torch.cat([p.detach().flatten() for p in trainer.policy.parameters()]))
    keep = key_bias_mask(trainer.policy)  # its gradient is rounding noise: 2.7e-5 apart on an Intel Xeon
    torch.testing.assert_close(params[0][keep], params[1][keep], atol=2e-5, rtol=1e-4)
    assert not torch.equal(params[0], torch.cat([p.flatten() for p in tiny_gpt().parameters()]))


TRL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
               "completions/max_length", "completions/clipped_ratio", "completions/mean_terminated_length", "kl",
               "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "num_tokens",
               "sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
               "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
               "sampling/importance_sampling_ratio/max")


def first_token_small(prompt, response, token_ids):
    assert response == token_ids  # without a template both are the token ids
    return float(token_ids[0] < 8)


def test_weighted_reward_functions_and_trl_metric_names(tmp_path):
    cfg = config(tmp_path, advantage="grpo", group_size=4, batch_size=4, max_new_tokens=3, tis="token_truncate")
    trainer = PPOTrainer(tiny_gpt(), cfg, PROMPTS, reward_fn=[bandit_reward, first_token_small],
                         reward_weights=[1.0, 0.5])
    r = trainer.rollout()
    bandit, small = r.reward_parts["bandit_reward"], r.reward_parts["first_token_small"]
    torch.testing.assert_close(r.raw_scores, bandit + 0.5 * small)
    assert torch.equal(bandit, torch.tensor([float(x[0] < 4) for x in r.responses]))
    record = trainer.train_step()
    for key in TRL_METRICS + ("rewards/bandit_reward/mean", "rewards/bandit_reward/std",
                              "rewards/first_token_small/mean", "rewards/first_token_small/std"):
        assert key in record and math.isfinite(record[key]), key
    assert record["completions/min_length"] <= record["completions/mean_length"] <= record["completions/max_length"]
    assert record["clip_ratio/region_mean"] == record["clip_fraction"]
    assert 0 <= record["frac_reward_zero_std"] <= 1
    # generation's and the update's log-probs agree on the CPU: TIS weights are ~1 and nothing is corrected
    assert record["sampling/sampling_logp_difference/max"] < 1e-4
    assert record["sampling/corrected_fraction"] == 0.0


def test_a_raising_reward_is_reported_with_its_sample(tmp_path):
    def fragile(prompt, response):
        if response[0] == response[0]:  # always
            raise KeyError("no answer")
        return 0.0

    trainer = PPOTrainer(tiny_gpt(), config(tmp_path, max_new_tokens=2), PROMPTS, reward_fn=[bandit_reward, fragile])
    with pytest.raises(RewardError, match=r"reward function 'fragile' raised KeyError: 'no answer' on the sample "
                                          r"prompt=\[\d.*\] response=\[\d"):
        trainer.rollout()
    nan = PPOTrainer(tiny_gpt(), config(tmp_path, max_new_tokens=2), PROMPTS, reward_fn=lambda p, r: float("nan"))
    with pytest.raises(RewardError, match="must return a finite number, got nan"):
        nan.rollout()


def test_tis_weights_scale_the_advantages():
    r = Rollout(prompts=[[1], [2]], responses=[[3, 4], [5]], stopped=[True, True], scores=torch.zeros(2),
                raw_scores=torch.zeros(2), sample_logprobs=[torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])],
                order=[0, 1], old_logprobs=[torch.tensor([-0.5, -2.0]), torch.tensor([-4.0])],
                advantages=[torch.tensor([1.0, 1.0]), torch.tensor([-2.0])])
    metrics = apply_rollout_correction(r, PPOConfig(tis="token_truncate", tis_threshold=1.5))
    torch.testing.assert_close(torch.cat(r.advantages), torch.tensor([1.5, 1.0, -2.0 * math.exp(-1.0)]))
    assert metrics["sampling/sampling_logp_difference/max"] == 1.0
    assert metrics["sampling/corrected_fraction"] == pytest.approx(1 / 3)


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([4, 6, 7, 8, 10])
    # L_max 10, buffer 4: free up to 6, then -(L - 6) / 4
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 2.0), torch.tensor([0.0, 0.0, -0.5, -1.0, -2.0]))
    assert torch.equal(overlong_penalty(lengths, 10, 0), torch.zeros(5))


# ---------------------------------------------------------------------------------------------- dynamic sampling
def scripted_rounds(*rounds):
    """sample_round for dynamic_sample: round k returns the scores rounds[k] (groups of 2) and their indices."""
    def sample(k):
        scores = torch.tensor(rounds[k], dtype=torch.float32)
        return {"id": [(k, i) for i in range(len(scores))]}, scores
    return sample


def test_dynamic_sampling_fills_the_batch_with_informative_groups():
    sample = scripted_rounds([1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 0, 1])  # round 0: one group with signal of 3
    columns, scores, record = dynamic_sample(sample, groups_wanted=3, group_size=2, max_rounds=4)
    assert columns["id"] == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 4), (1, 5)]
    assert scores.tolist() == [0, 1, 1, 0, 0, 1]
    assert record == {"rounds": 2, "groups_seen": 6, "groups_kept": 3, "fill": 1.0}


def test_dynamic_sampling_never_returns_a_partial_batch_silently():
    sample = scripted_rounds([1, 1, 0, 1], [0, 0, 1, 1])  # one informative group in two rounds; 2 wanted
    with pytest.raises(PartialBatchError, match="kept 1 of the 2 groups wanted after 2 generation rounds"):
        dynamic_sample(sample, groups_wanted=2, group_size=2, max_rounds=2)
    with pytest.warns(UserWarning, match="kept 1 of the 2 groups wanted"):
        columns, scores, record = dynamic_sample(sample, groups_wanted=2, group_size=2, max_rounds=2, partial="warn")
    assert len(columns["id"]) == 2 and record["fill"] == 0.5
    # every process keeps as many groups as the one that kept fewest (here a fake other process with none)
    with pytest.raises(PartialBatchError, match="kept 0 of the 2"):
        dynamic_sample(sample, groups_wanted=2, group_size=2, max_rounds=2, partial="warn", agree=lambda kept: 0)


def test_trainer_dynamic_sampling_keeps_full_batches_of_informative_groups(tmp_path):
    cfg = config(tmp_path, advantage="grpo", group_size=4, batch_size=4, max_new_tokens=2, dynamic_sampling=True,
                 max_sampling_rounds=8, overlong_buffer=1, overlong_penalty=0.0)
    trainer = PPOTrainer(tiny_gpt(), cfg, PROMPTS, reward_fn=bandit_reward)
    for _ in range(2):
        r = trainer.rollout()
        assert len(r.responses) == cfg.rollout_size
        groups = r.scores.view(-1, 4)
        assert (groups.max(1).values > groups.min(1).values).all()
        assert r.sampling["groups_kept"] == 4 and r.sampling["fill"] == 1.0
        record = trainer.train_step()
        assert record["frac_reward_zero_std"] == 0.0 and record["dynamic_sampling/fill"] == 1.0


@pytest.mark.parametrize("field,value,message", [
    ("advantage", "ppo", "advantage must be one of"), ("loss_agg", "mean", "loss_agg must be one of"),
    ("ratio_level", "seq", "ratio_level must be one of"), ("tis", "token", "tis must be one of"),
    ("group_size", 1, "group_size must be >= 2 with advantage='rloo'"), ("overlong_buffer", 99, "overlong_buffer"),
    ("kl_mode", "reward", "kl_mode must be 'loss' or 'auto' with advantage 'rloo'")])
def test_bad_config_names_the_field(field, value, message):
    kw = {"advantage": "rloo", "group_size": 2, field: value}
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kw)


def test_reward_weights_must_match_the_functions(tmp_path):
    with pytest.raises(ValueError, match="reward_weights must be 2 finite numbers"):
        PPOTrainer(tiny_gpt(), config(tmp_path), PROMPTS, reward_fn=[bandit_reward, bandit_reward], reward_weights=[1.0])
