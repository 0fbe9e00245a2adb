"""`fastllm demo`: the whole alignment pipeline on a task with a ground-truth reward, on 2 CPU cores.

    fastllm demo                  # full mode (<= 10 minutes on 2 cores)
    fastllm demo --reduced        # CI mode (< 3 minutes)

1. corpus of correct addition facts + a BPE tokenizer (fastllm.data.prepare_dataset)
2. pretrain a small GPT (fastllm.train.pretrain)
3. SFT on chat turns from a sloppy teacher (right only `sft_accuracy` of the time)
4. preference pairs (right answer, wrong answer) -> reward model; its held-out pairwise accuracy
5. PPO from the SFT model against the reward model (the true reward is never shown to PPO)
6. DPO from the SFT model on the same pairs
7. evaluation on held-out prompts (operand pairs no alignment stage saw): the true score of SFT, PPO and DPO
   (sampled at temperature 1, several seeds: the spread is the evaluation noise), greedy scores, KL to the
   SFT model, which backend ran the ops and the time spent in fastllm's kernels; report.md/.json + plots.
"""
from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fastllm.train.chat import write_json, write_jsonl

from .task import AdditionTask


@dataclass
class DemoSizes:
    max_operand: int
    n_docs: int
    vocab_size: int
    n_layer: int
    n_embd: int
    pretrain_steps: int
    sft_steps: int
    rm_steps: int
    ppo_steps: int
    dpo_steps: int
    eval_samples: int
    eval_seeds: int
    ppo_seeds: int  # PPO runs with different seeds: the run-to-run noise


FULL = DemoSizes(max_operand=20, n_docs=400, vocab_size=320, n_layer=2, n_embd=64, pretrain_steps=600,
                 sft_steps=150, rm_steps=150, ppo_steps=60, dpo_steps=100, eval_samples=4, eval_seeds=3, ppo_seeds=2)
REDUCED = DemoSizes(max_operand=10, n_docs=300, vocab_size=300, n_layer=2, n_embd=64, pretrain_steps=1200,
                    sft_steps=200, rm_steps=150, ppo_steps=120, dpo_steps=150, eval_samples=16, eval_seeds=3,
                    ppo_seeds=1)


def _log(msg):
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_demo(out_dir="runs/demo", *, reduced: bool = False, seed: int = 0, threads: Optional[int] = None,
             progress: bool = True) -> dict:
    """Run every stage into out_dir; returns the report (also written to out_dir/report.json and report.md)."""
    from fastllm.data import prepare_dataset
    from fastllm.model import GPT
    from fastllm.train import TrainConfig
    from fastllm.train.dpo import dpo
    from fastllm.train.ppo import PPOConfig, evaluate_policy, ppo
    from fastllm.train.pretrain import parser_defaults, pretrain
    from fastllm.train.reward import ScalarHeadModel, pairwise_accuracy, train_reward_model
    from fastllm.train.sft import sft
    from fastllm.data import load_tokenizer
    from fastllm.train.chat import ChatTemplate, read_preferences, read_prompts

    sizes = REDUCED if reduced else FULL
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage in ("data", "pretrain", "sft", "reward", "ppo", "dpo", *(f"ppo_seed{k}" for k in range(1, 8))):
        shutil.rmtree(out / stage, ignore_errors=True)  # the demo owns these: a rerun starts clean
    task = AdditionTask(max_operand=sizes.max_operand, seed=seed)
    train_prompts, held_prompts = task.split()
    timings, report = {}, {"mode": "reduced" if reduced else "full", "sizes": sizes.__dict__, "seed": seed}
    t_start = time.perf_counter()

    def lap(name, t0):
        timings[name] = round(time.perf_counter() - t0, 1)
        _log(f"{name}: {timings[name]} s")

    def cfg(stage, steps, **kw):
        base = dict(out_dir=str(out / stage), steps=steps, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=10,
                    weight_decay=0.0, eval_interval=0, eval_iters=2, checkpoint_interval=0, progress=progress,
                    seed=seed, device="cpu")
        base.update(kw)
        return TrainConfig(**base)

    # 1. corpus + tokenizer
    t0 = time.perf_counter()
    data_dir = out / "data"
    meta = prepare_dataset(data_dir, task.corpus(sizes.n_docs), vocab_size=sizes.vocab_size, val_fraction=0.05,
                           seed=seed, near_dup_threshold=None, show_progress=False)
    write_jsonl(data_dir / "sft.jsonl", task.sft_records(train_prompts))
    write_jsonl(data_dir / "pairs.jsonl", task.preference_records(train_prompts))
    write_jsonl(data_dir / "prompts.jsonl", task.prompt_records(train_prompts))
    write_jsonl(data_dir / "heldout.jsonl", task.prompt_records(held_prompts))
    seen = random.Random(seed).sample(train_prompts, min(len(train_prompts), len(held_prompts)))
    write_jsonl(data_dir / "seen.jsonl", task.prompt_records(seen))
    write_jsonl(data_dir / "heldout_pairs.jsonl", task.preference_records(held_prompts))
    lap("data", t0)
    report["data"] = {"vocab_size": meta["vocab_size"], "train_prompts": len(train_prompts),
                      "heldout_prompts": len(held_prompts), "sft_teacher_accuracy": task.sft_accuracy}

    # 2. pretrain
    t0 = time.perf_counter()
    args = parser_defaults()
    args.n_layer, args.n_head, args.n_embd, args.block_size = sizes.n_layer, 4, sizes.n_embd, 64
    pre = pretrain(cfg("pretrain", sizes.pretrain_steps, lr=3e-3, min_lr=3e-4, eval_interval=sizes.pretrain_steps,
                       eval_iters=4),
                   data=str(data_dir), preset_args=args, sample_prompt=None)
    lap("pretrain", t0)
    report["pretrain"] = {k: pre.get(k) for k in ("val_loss_first", "val_loss", "val_ppl")}

    # 3. SFT
    t0 = time.perf_counter()
    sft(cfg("sft", sizes.sft_steps), data=str(data_dir / "sft.jsonl"), init=str(out / "pretrain"),
                  val_fraction=0.05)
    lap("sft", t0)

    # 4. reward model
    t0 = time.perf_counter()
    rm_sum = train_reward_model(cfg("reward", sizes.rm_steps, lr=3e-4, weight_decay=0.1),
                                data=str(data_dir / "pairs.jsonl"), init=str(out / "sft"), val_fraction=0.1)
    rm = ScalarHeadModel.from_pretrained(rm_sum["final"])
    held_pairs = read_preferences(data_dir / "heldout_pairs.jsonl", ChatTemplate(load_tokenizer(data_dir / "tokenizer.json")))
    lap("reward", t0)
    report["reward_model"] = {"heldout_pairwise_accuracy": pairwise_accuracy(rm, held_pairs)["accuracy"],
                              "val_split_accuracy": rm_sum.get("val_accuracy"),
                              "train_accuracy": rm_sum.get("train_accuracy")}

    # 5. PPO (one run per seed: the spread of their true scores is the run-to-run noise)
    ppo_runs = []
    for k in range(sizes.ppo_seeds):
        t0 = time.perf_counter()
        name = "ppo" if k == 0 else f"ppo_seed{k}"
        pcfg = PPOConfig(out_dir=str(out / name), steps=sizes.ppo_steps, batch_size=32, minibatch_size=16,
                         ppo_epochs=2, max_new_tokens=6, temperature=1.0, lr=3e-4, critic_lr=3e-4, kl_coef=0.05,
                         entropy_coef=0.0, missing_eos_penalty=-1.0, checkpoint_interval=0, progress=progress,
                         seed=seed + 100 * k, device="cpu")
        summary = ppo(pcfg, prompts=str(data_dir / "prompts.jsonl"), init=str(out / "sft"),
                      reward_model=str(out / "reward" / "final"))
        summary.pop("trainer", None)
        ppo_runs.append((name, summary))
        lap(name, t0)

    # 6. DPO
    t0 = time.perf_counter()
    dpo_sum = dpo(cfg("dpo", sizes.dpo_steps, lr=5e-4, min_lr=5e-5, batch_size=16), data=str(data_dir / "pairs.jsonl"),
                  init=str(out / "sft"), beta=0.1, val_fraction=0.1)
    lap("dpo", t0)

    # 7. evaluation on held-out prompts with the true reward
    t0 = time.perf_counter()
    tok = load_tokenizer(data_dir / "tokenizer.json")
    template = ChatTemplate(tok)
    held = read_prompts(data_dir / "heldout.jsonl", template)
    seen_prompts = read_prompts(data_dir / "seen.jsonl", template)
    sft_model = GPT.from_pretrained(str(out / "sft" / "final"))
    models = {"sft": sft_model, **{name: GPT.from_pretrained(s["final"]) for name, s in ppo_runs},
              "dpo": GPT.from_pretrained(dpo_sum["final"])}
    evaluation = {}
    for name, model in models.items():
        scores = [evaluate_policy(model, held, task.reward, template=template, samples=sizes.eval_samples,
                                  max_new_tokens=6, temperature=1.0, seed=1000 + s,
                                  ref_model=None if name == "sft" else sft_model)
                  for s in range(sizes.eval_seeds)]
        greedy = evaluate_policy(model, held, task.reward, template=template, samples=1, max_new_tokens=6,
                                 temperature=0.0)
        values = [s["score"] for s in scores]
        seen_score = evaluate_policy(model, seen_prompts, task.reward, template=template, samples=sizes.eval_samples,
                                     max_new_tokens=6, temperature=1.0, seed=999)["score"]
        evaluation[name] = {"true_score": statistics.mean(values), "seen_prompts_true_score": seen_score,
                            "true_score_seed_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "true_score_sem": statistics.mean(s["score_sem"] for s in scores),
                            "greedy_true_score": greedy["score"], "eos_rate": statistics.mean(s["eos_rate"] for s in scores)}
        if name != "sft":
            evaluation[name]["kl_to_sft"] = statistics.mean(s["kl"] for s in scores)
    lap("evaluate", t0)
    report["evaluation"] = evaluation
    ppo_scores = [evaluation[name]["true_score"] for name, _ in ppo_runs]
    sft_score = evaluation["sft"]["true_score"]
    eval_noise = max(max(e["true_score_seed_std"], e["true_score_sem"]) for e in evaluation.values())
    run_noise = statistics.stdev(ppo_scores) if len(ppo_scores) > 1 else None
    noise = max(eval_noise, run_noise or 0.0)
    report["ppo_vs_sft"] = {"improvement": statistics.mean(ppo_scores) - sft_score,
                            "evaluation_noise": eval_noise, "ppo_run_to_run_std": run_noise, "noise_used": noise,
                            "improved_beyond_noise": statistics.mean(ppo_scores) - sft_score > 2 * noise}
    report["dpo_vs_sft"] = {"improvement": evaluation["dpo"]["true_score"] - sft_score}
    report["final_kl_ppo"] = evaluation["ppo"]["kl_to_sft"]
    report["kernels"] = kernel_profile(models["ppo"], held[:16], template)
    timings["total"] = round(time.perf_counter() - t_start, 1)
    report["timings_s"] = timings
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render_report(report))
    plot_summary(report, out / "summary.png")
    _log(f"report: {out / 'report.md'}")
    return report


def kernel_profile(model, prompts, template) -> dict:
    """Which backend fastllm resolves for these tensors, and the time in fastllm's custom ops during one
    generation + one fused PPO-style loss forward/backward (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from fastllm import backend, ops
    from fastllm.train.ppo import pack_responses

    device = model.lm_head_weight.device
    resolved = backend.resolve(device, torch.float32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gen = model.generate([p.prompt for p in prompts], 6, temperature=1.0, stop_tokens=(template.end_id,),
                             return_logprobs=True)
        ids, cu, labels, positions = pack_responses([p.prompt for p in prompts], gen.tokens, device)
        hidden = model.hidden_states(ids, cu_seqlens=cu)[0, positions]
        old = torch.cat(gen.logprobs).to(device)
        out = ops.linear_ppo_loss(hidden, model.lm_head_weight, labels, old, torch.randn_like(old),
                                  torch.ones_like(old))
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    rows = {}
    total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        if e.key.startswith("fastllm::"):
            rows[e.key] = {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 3)}
    kernel_ms = sum(r["cpu_ms"] for r in rows.values())
    return {"backend": resolved, "ops": rows, "kernel_ms": round(kernel_ms, 2),
            "profiled_ms": round(total / 1000, 2)}


def render_report(r: dict) -> str:
    ev = r["evaluation"]
    lines = [f"# fastllm demo ({r['mode']} mode)", "",
             "Task: two-number addition, reward 1 for the exact sum. SFT teacher right "
             f"{r['data']['sft_teacher_accuracy']:.0%} of the time; {r['data']['heldout_prompts']} held-out prompts "
             "(operand pairs unseen by SFT, the reward model, PPO and DPO; the pretraining corpus holds all facts).", "",
             "| model | true score (T=1) | seed std | greedy | KL to SFT | ends with <\\|end\\|> | "
             "score on training prompts (T=1) |",
             "|---|---|---|---|---|---|---|"]
    for name, e in ev.items():
        kl = f"{e['kl_to_sft']:.3f}" if "kl_to_sft" in e else "-"
        lines.append(f"| {name} | {e['true_score']:.3f} | {e['true_score_seed_std']:.3f} | "
                     f"{e['greedy_true_score']:.3f} | {kl} | {e['eos_rate']:.2f} | {e['seen_prompts_true_score']:.3f} |")
    p = r["ppo_vs_sft"]
    lines += ["", f"PPO - SFT: {p['improvement']:+.3f} (noise: evaluation {p['evaluation_noise']:.3f}"
              + (f", PPO run-to-run std {p['ppo_run_to_run_std']:.3f}" if p["ppo_run_to_run_std"] is not None else "")
              + f"; beyond 2x noise: {p['improved_beyond_noise']})",
              f"DPO - SFT: {r['dpo_vs_sft']['improvement']:+.3f}",
              f"Reward model held-out pairwise accuracy: {r['reward_model']['heldout_pairwise_accuracy']:.3f}",
              f"Final KL(PPO || SFT) per response: {r['final_kl_ppo']:.3f}",
              f"Pretraining validation loss: {r['pretrain']['val_loss_first']:.3f} -> {r['pretrain']['val_loss']:.3f}",
              "", f"Backend: {r['kernels']['backend']}; fastllm ops in one profiled rollout + fused PPO loss: "
              f"{r['kernels']['kernel_ms']} ms of {r['kernels']['profiled_ms']} ms profiled", ""]
    for op, row in sorted(r["kernels"]["ops"].items()):
        lines.append(f"- {op}: {row['calls']} calls, {row['cpu_ms']} ms")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()),
              "", "Plots: pretrain/metrics.png, sft/sft.png, reward/reward.png, ppo/ppo.png, dpo/dpo.png, summary.png", ""]
    return "\n".join(lines)


def plot_summary(r: dict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = r["evaluation"]
    names = list(ev)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [ev[n]["true_score"] for n in names], yerr=[ev[n]["true_score_seed_std"] for n in names],
           capsize=4, color=["#888"] + ["#2a7"] * (len(names) - 2) + ["#27a"])
    ax.set_ylabel("true score on held-out prompts")
    ax.set_ylim(0, 1)
    ax.set_title(f"fastllm demo ({r['mode']}): RM accuracy {r['reward_model']['heldout_pairwise_accuracy']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", dest="out_dir", default="runs/demo", help="run folder (default: runs/demo)")
    parser.add_argument("--reduced", action="store_true", help="the CI size: under 3 minutes on 2 cores")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")


def main(args: argparse.Namespace) -> int:
    report = run_demo(args.out_dir, reduced=args.reduced, seed=args.seed, threads=args.threads,
                      progress=args.progress)
    print((Path(args.out_dir) / "report.md").read_text())
    return 0 if report["ppo_vs_sft"]["improvement"] > 0 else 1


def cli(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastllm demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
