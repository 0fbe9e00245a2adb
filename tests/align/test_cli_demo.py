"""The stage CLIs chained on files (sft -> reward -> ppo / grpo with a reward function -> dpo), and the demo's
reduced mode end to end."""
import json
import shutil

import pytest

from fastllm.data import train_tokenizer
from fastllm.demo import AdditionTask
from fastllm.cli import main as fastllm_cli
from fastllm.train import rl
from fastllm.train.chat import write_jsonl



def exact_sum(prompt, response):  # importable reward functions for --reward-fn
    return AdditionTask.reward(prompt, response)


def short(prompt, response, token_ids):
    return -len(token_ids) / 8


def test_stage_clis_chain(tmp_path, capsys, addition_setup):
    task, train, base = addition_setup
    write_jsonl(tmp_path / "sft.jsonl", task.sft_records(train))
    write_jsonl(tmp_path / "pairs.jsonl", task.preference_records(train))
    write_jsonl(tmp_path / "prompts.jsonl", task.prompt_records(train))
    common = ["--no-progress", "--eval-interval", "0", "--eval-iters", "1", "--batch-size", "4"]

    assert fastllm_cli(["sft", "--data", str(tmp_path / "sft.jsonl"), "--init", str(base), "--out", str(tmp_path / "sft"),
                    "--steps", "3", *common]) == 0
    assert fastllm_cli(["reward", "--data", str(tmp_path / "pairs.jsonl"), "--init", str(tmp_path / "sft"),
                       "--out", str(tmp_path / "rm"), "--steps", "3", *common]) == 0
    rm_summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= rm_summary["val_accuracy"] <= 1.0
    ppo_flags = ["--prompts", str(tmp_path / "prompts.jsonl"), "--init", str(tmp_path / "sft"), "--steps", "2",
                 "--batch-size", "4", "--minibatch-size", "4", "--max-new-tokens", "3", "--no-progress"]
    assert fastllm_cli(["ppo", *ppo_flags, "--reward-model", str(tmp_path / "rm"), "--out", str(tmp_path / "ppo")]) == 0
    assert fastllm_cli(["ppo", *ppo_flags, "--reward-fn", f"{__name__}:exact_sum", f"{__name__}:short",
                        "--reward-weights", "1", "0.1", "--advantage", "rloo", "--group-size", "2", "--loss-agg",
                        "seq_mean_token_mean", "--ratio-level", "sequence", "--out", str(tmp_path / "grpo")]) == 0
    grpo_log = [json.loads(line) for line in open(tmp_path / "grpo" / "ppo.jsonl")]
    assert {"rewards/exact_sum/mean", "rewards/short/mean"} <= grpo_log[-1].keys()
    assert fastllm_cli(["dpo", "--data", str(tmp_path / "pairs.jsonl"), "--init", str(tmp_path / "sft"),
                    "--out", str(tmp_path / "dpo"), "--steps", "2", *common]) == 0
    for stage, log in (("sft", "sft"), ("rm", "reward"), ("ppo", "ppo"), ("grpo", "ppo"), ("dpo", "dpo")):
        assert (tmp_path / stage / "final" / "model.safetensors").is_file()
        assert (tmp_path / stage / "final" / "tokenizer.json").is_file()
        assert (tmp_path / stage / f"{log}.jsonl").is_file() and (tmp_path / stage / f"{log}.png").is_file()
        assert (tmp_path / stage / "checkpoints" / "latest").is_file()
    # a PPO run resumes from its checkpoint (the reference comes from the checkpoint, not from --init)
    shutil.rmtree(tmp_path / "ppo" / "final")
    assert fastllm_cli(["ppo", *ppo_flags, "--steps", "3", "--reward-model", str(tmp_path / "rm"), "--out",
                    str(tmp_path / "ppo"), "--resume"]) == 0
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "ppo" / "ppo.jsonl"))]
    assert steps == [1, 2, 3]


def test_bad_reward_fn_spec():
    with pytest.raises(ValueError, match="module:function"):
        rl.load_reward_fn("no_colon")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        rl.load_reward_fn(f"{__name__}:nope")


def test_task_teacher_and_pairs():
    task = AdditionTask(max_operand=10, sft_accuracy=0.6, sft_verbose=0.4, seed=3)
    train, held = task.split()
    assert not set(train) & set(held) and len(train) + len(held) == 100
    assert task.reward("7+5=", "12") == 1.0 and task.reward("7+5=", " 12 ") == 1.0
    for wrong in ("13", "12\n3+4=7", "", "12 12"):
        assert task.reward("7+5=", wrong) == 0.0
    with pytest.raises(ValueError, match="not an addition prompt"):
        task.reward("hello", "1")
    records = task.sft_records(train, copies=10)
    score = sum(task.reward(r["prompt"], r["response"]) for r in records) / len(records)
    assert abs(score - task.teacher_score) < 0.05  # the teacher is as sloppy as stated
    verbose = sum("\n" in r["response"] for r in records) / len(records)
    assert abs(verbose - task.sft_verbose) < 0.05
    pairs = task.preference_records(train, copies=3)
    assert {r["kind"] for r in pairs} == {"arithmetic", "verbose", "both"}
    for r in pairs:  # every pair is ranked correctly by the ground truth
        assert task.reward(r["prompt"], r["chosen"]) == 1.0 and task.reward(r["prompt"], r["rejected"]) == 0.0
        assert ("\n" in r["rejected"]) == (r["kind"] != "arithmetic")


def test_labelled_pairs_rank_samples_by_the_true_reward():
    from types import SimpleNamespace

    from fastllm.demo.pipeline import labelled_pairs
    from fastllm.train.chat import ChatTemplate, PromptExample

    task = AdditionTask(max_operand=5)
    tok = train_tokenizer(["".join(f"{a}+{b}={a + b}\n" for a, b in task.all_prompts())] * 3, vocab_size=280)
    template = ChatTemplate(tok)
    canned = {"1+2=": ["3", "4", "3\n1+1=2", "3"], "2+2=": ["5", "6", "5", "1"], "0+0=": ["0", "0", "0", "0"]}
    prompts = [PromptExample(template.prompt_ids(t), t) for t in canned]

    class Stub:  # answers each prompt with its canned responses, in order
        def generate(self, prompts_ids, max_new_tokens, **kw):
            texts = [r for t in canned for r in canned[t]]
            assert len(prompts_ids) == len(texts)
            return SimpleNamespace(tokens=[template.response_ids(t) for t in texts], stopped=[True] * len(texts))

    records = labelled_pairs(Stub(), prompts, template, task.reward, samples=4, max_new_tokens=8, seed=0)
    assert records == [{"prompt": "1+2=", "chosen": "3", "rejected": "3\n1+1=2", "kind": "sft_sample"},
                       {"prompt": "1+2=", "chosen": "3", "rejected": "4", "kind": "sft_sample"}]


def test_demo_reduced_runs_end_to_end(tmp_path):
    from fastllm.demo import run_demo

    report = run_demo(tmp_path / "demo", reduced=True, progress=False, threads=1)
    ev = report["evaluation"]
    assert set(ev) == {"sft", "ppo", "grpo", "dpo"}
    for name, e in ev.items():
        assert 0.0 <= e["true_score"] <= 1.0 and e["true_score_seed_std"] >= 0.0
        assert len(e["true_score_seeds"]) == report["sizes"]["eval_seeds"] >= 2
    for name in ("ppo", "grpo", "dpo"):
        assert ev[name]["kl_to_sft"] >= 0.0 and 1.0 <= ev[name]["mean_length"] <= report["sizes"]["max_new_tokens"]
    rm = report["reward_model"]
    assert 0.0 <= rm["heldout_pairwise_accuracy"] <= 1.0 and rm["pairs"]["labelled_sft_samples"] > 0
    # the surface mistake generalises to prompts the reward model never saw
    assert rm["heldout_accuracy_by_mistake"]["verbose"] >= 0.9
    # the demo's claim: PPO's true score on held-out prompts beats SFT's by more than twice the noise, KL bounded
    p = report["ppo_vs_sft"]
    assert p["improvement"] == pytest.approx(ev["ppo"]["true_score"] - ev["sft"]["true_score"])
    assert p["noise_used"] > 0.0 and p["required_margin"] == pytest.approx(2 * p["noise_used"])
    assert p["improved_beyond_noise"], report["ppo_vs_sft"]
    assert report["final_kl_ppo"] < 5.0
    # GRPO on the task's checker reaches its target, more than twice the noise above PPO on the reward model
    g = report["grpo_vs_ppo"]
    assert g["target"] == report["sizes"]["grpo_target"] >= 0.5 and ev["grpo"]["true_score"] >= g["target"], g
    assert g["reached_target"] and ev["grpo"]["true_score"] > ev["sft"]["true_score"] + 0.3, g
    assert g["beats_ppo_beyond_noise"], report["grpo_vs_ppo"]
    assert report["kernels"]["backend"] in ("cpp", "torch", "triton") and report["kernels"]["ops"]
    assert report["timings_s"]["total"] < 180
    for f in ("report.md", "report.json", "summary.png", "rl_curves.png", "ppo/ppo.png", "grpo/ppo.png", "sft/sft.png",
              "reward/reward.png", "dpo/dpo.png"):
        assert (tmp_path / "demo" / f).is_file(), f
    text = (tmp_path / "demo" / "report.md").read_text()
    assert "PPO beats SFT" in text and f"GRPO reaches the target true score {g['target']:.2f}" in text
