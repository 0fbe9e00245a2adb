"""The alignment stages under torchrun with 2 processes (gloo on CPU): PPO and GRPO, which do their own gradient
and metric all-reduces, step by step against the ranks' own records (ddp_ppo_worker.py), and DPO through the
real command line (ddp_cli_worker.py) as a smoke test of the Trainer-based stages."""
import json
from pathlib import Path

import pytest
import torch

from ddp_ppo_worker import BASE, GRPO_STEPS, PROMPTS, tiny_gpt  # pytest puts this folder on sys.path
from fastllm import ops
from numerics import key_bias_mask
from fastllm.train.chat import batch_indices
from fastllm.train.checkpoint import load_checkpoint
from fastllm.train.reward import ScalarHeadModel
from torchrun_launch import torchrun as launch

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 240


def torchrun(script, *args):
    launch(HERE / script, *args, timeout_s=TIMEOUT_S)


def ranks(out_dir, name):
    return [torch.load(out_dir / f"{name}.rank{r}.pt") for r in range(2)]


def assert_ranks_identical(r0, r1, steps):
    """Every step left bit-identical trained parameters (and each step moved them) and identical records."""
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["after_step"]) == len(r1["after_step"]) == steps
    previous = r0["initial"]
    for step, (a, b) in enumerate(zip(r0["after_step"], r1["after_step"])):
        assert a.keys() == b.keys() == previous.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)
            assert not torch.equal(a[name], previous[name]), (step, name)  # it trained: the check is not vacuous
        previous = a
    # The logged metrics are the whole batch's (all-reduced), not rank 0's share of it.
    assert r0["records"] == r1["records"]
    for key in ("reward", "kl", "policy_loss", "entropy", "clip_fraction", "grad_norm", "logprob_mismatch"):
        assert key in r0["records"][0], key


def assert_disjoint_shards(r0, r1, steps):
    """At each step the ranks drew disjoint prompts (within an epoch), together the 1-process draw of the
    doubled batch."""
    for step in range(steps):
        a, b = r0["drawn"][step], r1["drawn"][step]
        one_process = batch_indices(len(PROMPTS), step, 2 * BASE["batch_size"], BASE["seed"])
        assert len(a) == len(b) == BASE["batch_size"] and sorted(a + b) == sorted(one_process), (step, a, b)
        if len(set(one_process)) == len(one_process):  # a batch across an epoch's end may draw a prompt twice
            assert not set(a) & set(b), (step, a, b)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ppo")
    torchrun("ddp_ppo_worker.py", out, "fresh")
    return out


def test_ppo_ranks_stay_identical_on_disjoint_prompts(ppo_runs):
    r0, r1 = ranks(ppo_runs, "ppo")
    assert_disjoint_shards(r0, r1, 3)
    assert_ranks_identical(r0, r1, 3)
    assert r0["initial"].keys() == {"policy", "critic"}
    # Only rank 0 wrote: one log line per step, equal to what every rank computed, and one checkpoint per step.
    logged = [json.loads(line) for line in open(ppo_runs / "ppo" / "ppo.jsonl")]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for line, record in zip(logged, r0["records"]):
        assert {k: line[k] for k in record} == record
    assert sorted(p.name for p in (ppo_runs / "ppo" / "checkpoints").glob("step_*")) == [
        f"step_{s:08d}" for s in (1, 2, 3)]
    ckpt = load_checkpoint(ppo_runs / "ppo")
    assert ckpt.step == 3 and ckpt.state["world_size"] == 2
    policy = tiny_gpt(0)
    ckpt.load_model(policy)
    assert torch.equal(torch.cat([p.flatten() for p in policy.parameters()]), r0["after_step"][-1]["policy"])


def test_ppo_value_head_ranks_stay_identical(ppo_runs):
    r0, r1 = ranks(ppo_runs, "head")
    assert r0["initial"].keys() == {"policy", "value_head"}
    assert_disjoint_shards(r0, r1, 2)
    assert_ranks_identical(r0, r1, 2)


def test_grpo_starts_every_rank_from_rank0_weights_and_stays_identical(ppo_runs):
    r0, r1 = ranks(ppo_runs, "grpo")
    rank0_init = torch.cat([p.detach().flatten() for p in tiny_gpt(0).parameters()])
    assert not torch.equal(rank0_init, torch.cat([p.detach().flatten() for p in tiny_gpt(1).parameters()]))
    assert torch.equal(r0["initial"]["policy"], rank0_init) and torch.equal(r1["initial"]["policy"], rank0_init)
    assert r0["initial"].keys() == {"policy"}  # GRPO has no critic
    assert_disjoint_shards(r0, r1, GRPO_STEPS)
    assert_ranks_identical(r0, r1, GRPO_STEPS)


def test_batch_normalised_advantages_use_the_whole_batch(ppo_runs):
    """scale_rewards="batch" divides by the std of every rank's scores, and REINFORCE++ whitens over every rank's
    tokens: the advantages are those of one process holding both ranks' rollouts."""
    r0, r1 = ranks(ppo_runs, "grpo_batch")
    scores = [r["rollouts"][0]["scores"] for r in (r0, r1)]
    both = ops.group_advantages(torch.cat(scores), 2, scale="batch")
    got = torch.cat([torch.stack([a[0] for a in r["rollouts"][0]["advantages"]]) for r in (r0, r1)])
    torch.testing.assert_close(got, both)
    alone = ops.group_advantages(scores[0], 2, scale="batch")
    assert not torch.allclose(alone, both[:len(alone)])  # rank 0's batch alone has another std: not vacuous
    tokens = [torch.cat(r["rollouts"][0]["advantages"]) for r in ranks(ppo_runs, "reinforce_pp")]
    union = torch.cat(tokens).double()
    assert abs(union.mean().item()) < 1e-6 and abs(union.pow(2).mean().item() - 1.0) < 1e-5
    assert max(abs(t.double().mean().item()) for t in tokens) > 1e-3  # each rank alone is not whitened


def test_ppo_resume_under_torchrun_continues_exactly(ppo_runs):
    torchrun("ddp_ppo_worker.py", ppo_runs, "resume")
    full, resumed = ranks(ppo_runs, "ppo"), ranks(ppo_runs, "resumed")
    for r in range(2):
        assert len(resumed[r]["after_step"]) == 1  # step 3 only: steps 1 and 2 came from the checkpoint
        assert resumed[r]["drawn"] == full[r]["drawn"][2:]
        for name, value in full[r]["after_step"][2].items():
            assert torch.equal(resumed[r]["after_step"][0][name], value), (r, name)
        assert resumed[r]["records"] == full[r]["records"][2:]
        assert resumed[r]["summary"] == full[r]["summary"]  # with the adaptive KL coefficient
    logged = [[json.loads(line)["reward"] for line in open(ppo_runs / run / "ppo.jsonl")] for run in ("ppo", "half")]
    assert logged[0] == logged[1] and len(logged[0]) == 3


# ------------------------------------------------------------------------------------------------ FSDP
def assert_records_close(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
            else:
                assert a[k] == b[k], k


@pytest.mark.parametrize("run, baseline", [("grpo_fsdp", "grpo"), ("ppo_fsdp", "half"), ("head_fsdp", "head")])
def test_fsdp_equals_ddp_step_by_step(ppo_runs, run, baseline):
    """Policy, critic and reference sharded: the same draws, per-step metrics and weights as the ddp run (each
    rank its own prompts, gradients averaged), to fp32 rounding: FSDP reduce-scatters them in another order.
    GRPO runs GRPO_STEPS (20): the rounding difference roughly doubles a step, and faster once clipped ratios
    cross the clip boundary in one run and not the other. Measured, as the worst metric's share of the rtol 1e-5 /
    atol 1e-6 tolerance: under 0.25 through step 8, then 1.2 (step 9), 3.2 (step 12) and over 300 by step 20,
    where the weights are up to 6e-4 apart (the grad norm is the first to go). So the metrics and weights
    are compared to rounding over the first 8 steps, and so are the sampled responses and rewards, bit for bit.
    Later a token whose inverse-CDF draw lands within the grown difference of a bucket edge may be sampled
    differently (measured: 1 of the 480 tokens a rank draws in 20 steps); over all 20 at least 98% of the tokens
    must agree, the mean reward to 0.02 (2% of the 0/1 rewards), and the weights within 1e-3."""
    fsdp, ddp = ranks(ppo_runs, run), ranks(ppo_runs, baseline)
    steps = len(ddp[0]["after_step"])
    assert steps == (GRPO_STEPS if run == "grpo_fsdp" else 2)
    assert_ranks_identical(*fsdp, steps)  # gathered from the shards: every rank sees the same full weights
    # The policy's and the critic's key bias: their gradient is rounding noise (key_bias_mask), the critic's too
    # once the policy's rounding has reached the returns it regresses on (measured: 24 of its 32 entries off by up
    # to 7e-6 after PPO's second step, every other entry within 1e-5 relative).
    keep = {"policy": key_bias_mask(tiny_gpt(0)), "critic": key_bias_mask(ScalarHeadModel(tiny_gpt(0)))}
    strict = min(steps, 8)
    for r in range(2):
        assert fsdp[r]["drawn"] == ddp[r]["drawn"]
        assert_records_close(fsdp[r]["records"][:strict], ddp[r]["records"][:strict])
        rewards = [[x["reward"] for x in run[r]["records"]] for run in (fsdp, ddp)]
        responses = [[x["responses"] for x in run[r]["rollouts"]] for run in (fsdp, ddp)]
        assert rewards[0][:strict] == rewards[1][:strict] and responses[0][:strict] == responses[1][:strict]
        width = BASE["max_new_tokens"]  # padded to it: a response that stopped early differs there
        tokens = [[t for step in run for response in step for t in response + [-1] * (width - len(response))]
                  for run in responses]
        agree = sum(a == b for a, b in zip(*tokens)) / len(tokens[1])
        assert len(tokens[0]) == len(tokens[1]) and agree >= 0.98, agree
        assert abs(sum(rewards[0]) - sum(rewards[1])) / steps <= 0.02, rewards  # 0/1 rewards: 2% of responses
        for step, (a, b) in enumerate(zip(fsdp[r]["after_step"], ddp[r]["after_step"])):
            assert a.keys() == b.keys()
            for name in a:
                same = keep.get(name, slice(None))
                tolerance = dict(rtol=1e-5, atol=1e-6) if step < strict else dict(rtol=0, atol=1e-3)
                torch.testing.assert_close(a[name][same], b[name][same], **tolerance, msg=f"{step} {name}")
    assert torch.equal(fsdp[0]["final"], fsdp[0]["after_step"][-1]["policy"]) and fsdp[1]["final"] is None


def assert_resumed_exactly(out_dir, run):
    """`run`_resumed (its first step run alone, then resumed from its sharded checkpoint) equals `run` bit for bit."""
    full, resumed = ranks(out_dir, run), ranks(out_dir, f"{run}_resumed")
    for r in range(2):
        assert resumed[r]["drawn"] == full[r]["drawn"][1:]
        assert resumed[r]["after_step"][0].keys() == full[r]["after_step"][1].keys()
        for name, value in full[r]["after_step"][1].items():
            assert torch.equal(resumed[r]["after_step"][0][name], value), (r, name)
        assert resumed[r]["records"] == full[r]["records"][1:] and resumed[r]["summary"] == full[r]["summary"]
    return full


def test_fsdp_value_head_checkpoint_resumes_exactly(ppo_runs):
    """The value head shares the policy's optimizer: its sharded state is saved and restored with the policy's."""
    assert ranks(ppo_runs, "head_fsdp")[0]["initial"].keys() == {"policy", "value_head"}
    assert_resumed_exactly(ppo_runs, "head_fsdp")
    assert any(k.startswith("optimizer.state.value_head.") for k in load_checkpoint(ppo_runs / "head_fsdp").sharded_keys())


def test_fsdp_checkpoint_resumes_exactly_and_loads_on_one_process(ppo_runs, capsys):
    from fastllm import cli

    full = assert_resumed_exactly(ppo_runs, "ppo_fsdp")
    run = ppo_runs / "ppo_fsdp"
    ckpt = load_checkpoint(run)
    assert ckpt.sharded and ckpt.step == 2
    policy = tiny_gpt(0)
    ckpt.load_model(policy)  # the 2 processes' shards, read by one
    assert torch.equal(torch.cat([p.flatten() for p in policy.parameters()]), full[0]["after_step"][-1]["policy"])
    assert cli.main(["generate", "--ckpt", str(run), "--prompt", "x"]) == 1
    assert "fastllm export --ckpt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ DPO via the CLI
def test_dpo_cli_under_torchrun_ends_with_identical_ranks(tmp_path, addition_setup):
    from fastllm.model import GPT
    from fastllm.train.chat import write_jsonl

    task, train, base = addition_setup
    write_jsonl(tmp_path / "pairs.jsonl", task.preference_records(train))
    torchrun("ddp_cli_worker.py", tmp_path / "report", "dpo", "--data", tmp_path / "pairs.jsonl", "--init", base,
             "--out", tmp_path / "dpo", "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0",
             "--eval-interval", "0", "--eval-iters", "1", "--device", "cpu", "--no-progress", "--no-plot")
    r0, r1 = ranks(tmp_path, "report")
    assert r0.keys() == r1.keys()
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    exported = GPT.from_pretrained(tmp_path / "dpo" / "final")  # written by rank 0 alone
    start = GPT.from_pretrained(base)
    for (name, trained), final in zip(r0.items(), exported.parameters()):
        assert torch.equal(trained, final), name
    assert any(not torch.equal(a, b) for a, b in zip(exported.parameters(), start.parameters()))
    train_records = [r for r in map(json.loads, open(tmp_path / "dpo" / "dpo.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
