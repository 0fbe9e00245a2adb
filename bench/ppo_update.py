"""PPO update throughput and peak memory: the trainer on the fused linear-head losses vs on materialised logits.

    python -m bench.ppo_update                     # GPT-2 vocabulary, 256 wide, 16 x 64-token responses
    python -m bench.ppo_update --vocab 128256 --rounds 3 --out /tmp/ppo_update.md

Two PPOTrainers with identical weights and configuration but for PPOConfig.fused:

  fused          the update's policy log-probs, entropy and clipped loss come from ops.linear_ppo_loss (and the
                 old/reference log-probs from ops.linear_token_logprobs): the tokens x vocabulary logits never
                 exist, chunks of them do.
  materialised   F.linear -> log_softmax -> gather, then ops.ppo_policy_loss: what the trainer would do without
                 the fused ops (the full fp32 logits, their log-softmax and their gradient are live at once).

One rollout is generated once (by the fused trainer) and fed to both, so both update on the same tokens. Timed:
PPOTrainer.update(rollout), i.e. every epoch and minibatch of policy + critic forward, loss, backward, gradient
clipping and AdamW. The variants alternate (order rotating each round) in one process, after a warm-up update
each. Peak memory is the process's peak RSS above what was live before each update (every allocation >= 1 MiB is
an mmap returned on free, so RSS follows live tensors; see harness.mmap_large_allocations). Tokens/s counts the
response tokens the update trains on: epochs x response tokens of the rollout / median update time.
"""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile

import torch

from bench import harness
from bench import report as reporting
from fastllm.model import GPT, GPTConfig
from fastllm.train.rl import PPOConfig, PPOTrainer

VARIANTS = ("fused", "materialised")


def even_token_share(prompt: list[int], response: list[int]) -> float:
    """A cheap programmatic reward (the benchmark times the update, not the reward)."""
    return sum(1 for t in response if t % 2 == 0) / max(len(response), 1)


def build_trainers(args, out_dir: str) -> dict[str, PPOTrainer]:
    torch.manual_seed(args.seed)
    config = GPTConfig.gpt2_style(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, n_embd=args.hidden,
                                  block_size=args.prompt_len + args.response_len, use_kernels=True)
    policy = GPT(config)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.batch)]
    trainers = {}
    for name in VARIANTS:
        cfg = PPOConfig(out_dir=os.path.join(out_dir, name), steps=1, batch_size=args.batch,
                        minibatch_size=args.minibatch, ppo_epochs=args.epochs, max_new_tokens=args.response_len,
                        critic=args.critic, fused=name == "fused", progress=False, plot=False, device="cpu",
                        seed=args.seed)
        trainers[name] = PPOTrainer(copy.deepcopy(policy), cfg, prompts, reward_fn=even_token_share,
                                    ref_model=copy.deepcopy(policy))
    if trainers["fused"].critic is not None:  # the same critic too (a fresh one is built per trainer)
        trainers["materialised"].critic.load_state_dict(trainers["fused"].critic.state_dict())
    return trainers


def run(args) -> dict:
    """{"variants": {name: {median_s, tokens_per_s, peak_mib, first_minibatch}}, "tokens": ..., ...}"""
    mmapped = harness.mmap_large_allocations()
    with tempfile.TemporaryDirectory() as out_dir:
        trainers = build_trainers(args, out_dir)
        rollout = trainers["fused"].rollout()
        tokens = args.epochs * sum(len(r) for r in rollout.responses)
        first = {}
        for name, trainer in trainers.items():  # warm-up; the first minibatch's stats compare the two losses
            trainer.update(rollout)
            first[name] = dict(trainer.first_minibatch)
        peaks = {name: [] for name in VARIANTS}
        times = harness.time_rotating({name: (lambda t=trainers[name]: t.update(rollout)) for name in VARIANTS},
                                      args.rounds, peaks=peaks)
    variants = {}
    for name in VARIANTS:
        median = statistics.median(times[name])
        peak = max(peaks[name]) / harness.MiB if peaks[name] else None
        variants[name] = {"median_s": median, "min_s": min(times[name]), "tokens_per_s": tokens / median,
                          "peak_mib": peak, "first_minibatch": first[name]}
    return {"variants": variants, "tokens": tokens, "mmapped": mmapped, "threads": torch.get_num_threads()}


def format_report(report: dict, args, machine: dict | None = None, command: str = "") -> str:
    v = report["variants"]
    mat = v["materialised"]
    lines = ["# PPO update: fused linear-head losses vs materialised logits", ""]
    if machine:
        lines.append(f"- {reporting.machine_title(machine)}; torch {machine['torch']}; {machine['date']}")
    if command:
        lines.append(f"- Command: `{command}`")
    lines += [f"- Policy: GPT-2 style, {args.layers} layers x {args.hidden} wide, vocab {args.vocab}; critic "
              f"{args.critic}; {args.batch} prompts x {args.prompt_len} tokens, responses {args.response_len} tokens; "
              f"{args.epochs} epochs x minibatches of {args.minibatch}; {report['threads']} torch threads",
              f"- Median of {args.rounds} updates per variant after one warm-up each, interleaved; tokens/s = "
              f"{report['tokens']} trained response tokens per update / median"
              + ("" if report["mmapped"] else " (mallopt unavailable: heap reuse may hide memory)"), ""]
    header = ["variant", "update s (median)", "min s", "tokens/s", "speed vs materialised", "peak extra MiB",
              "memory vs materialised", "first-minibatch policy loss"]
    rows = []
    for name in VARIANTS:
        r = v[name]
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        mem = ("n/a" if r["peak_mib"] is None or not mat["peak_mib"] else f"{r['peak_mib'] / mat['peak_mib']:.2f}x")
        rows.append([name, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{mat['median_s'] / r['median_s']:.2f}x", peak, mem,
                     f"{r['first_minibatch']['policy_loss']:.6g}"])
    lines.append(reporting.markdown_table(header, rows, right_from=1))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.ppo_update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="prompts in the rollout")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--critic", default="separate", choices=("separate", "head"))
    parser.add_argument("--rounds", type=int, default=5, help="timed updates per variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = reporting.describe_machine(harness.Machine.measure(torch.device("cpu"), harness.QUICK_SETTINGS))
    text = format_report(run(args), args, machine, "python -m bench.ppo_update " + shlex.join(argv))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
