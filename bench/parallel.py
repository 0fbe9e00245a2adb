"""Data parallelism on 2 processes: DDP vs FSDP2 vs FSDP2 + activation checkpointing (issue 15).

    python -m bench.parallel                      # ~50M-parameter Llama-style GPT, writes its bench/RESULTS.md section
    python -m bench.parallel --steps 3 --out /tmp/parallel.md    # a quick run elsewhere
    python -m bench.parallel --modes ddp,fsdp-gloo-native,fsdp-gloo-tcp,fsdp --rounds 2   # + FSDP's other collectives

Each mode runs in its own `torchrun --nproc_per_node=2` launch (gloo on CPU, nccl on GPU; 1 thread per process
on CPU) so its peak memory is its own: the model is built, wrapped by fastllm.train.parallel.parallelize, and
trained with AdamW for warm-up + timed steps on random tokens. Reported per rank: peak resident memory above
the process's footprint before the model existed (bench.harness.PeakMemory: CPU VmHWM - VmRSS with large
blocks mmapped, GPU torch.cuda.max_memory_allocated),
the bytes of parameters + gradients + AdamW state counted from the local shards, and tokens/s (all ranks'
tokens / median step time). Under FSDP the model is built on the meta device and materialised shard by shard,
as a model too large for one process would have to be. --rounds N launches every mode N times round robin
(medians over all their steps): on shared cores a change of load then shifts every mode, not one.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench import harness
from bench import report as reporting
from bench.train_step import loadavg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_MD = os.path.join(REPO, "bench", "RESULTS.md")
SECTION = "parallel"
MODES = {"ddp": ("ddp", False), "fsdp": ("fsdp", False), "fsdp+ac": ("fsdp", True),
         # not by default: FSDP on gloo's own all-gather and reduce-scatter, and on fastllm's TCP ones (what
         # it uses across hosts) instead of shared memory
         "fsdp-gloo-native": ("fsdp", False), "fsdp-gloo-tcp": ("fsdp", False)}
DEFAULT_MODES = "ddp,fsdp,fsdp+ac"
MODEL = dict(vocab_size=8192, n_layer=13, n_head=8, n_embd=512, block_size=128)


def build(mode: str, activation_checkpointing: bool, dist, collectives: str = "fastllm"):
    from fastllm.model import GPT, GPTConfig
    from fastllm.train.parallel import fsdp_modules, parallelize

    config = GPTConfig.llama_style(**MODEL, dropout=0.0)
    if mode == "ddp":
        model = GPT(config)
        return model, parallelize(model, mode, dist, activation_checkpointing=activation_checkpointing)
    with torch.device("meta"):
        model = GPT(config)
    trained = parallelize(model, mode, dist, activation_checkpointing=activation_checkpointing)
    if collectives != "fastllm":  # the baselines fastllm's shared-memory collectives are measured against
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

        from fastllm.train.collectives import GlooAllGather, GlooReduceScatter

        all_gather, reduce_scatter = ((DefaultAllGather(), DefaultReduceScatter()) if collectives == "native"
                                      else (GlooAllGather(), GlooReduceScatter()))
        for m in fsdp_modules(model):
            m.set_custom_all_gather(all_gather)
            m.set_custom_reduce_scatter(reduce_scatter)
    model.to_empty(device=dist.device)
    with torch.no_grad():  # each process initialises its own shards (values do not matter here)
        for p in model.parameters():
            shard = p.to_local()
            shard.normal_(0.0, 0.02) if p.ndim > 1 else shard.fill_(1.0)
    return model, trained


def worker(args) -> None:
    from fastllm.train import TrainConfig, build_optimizer
    from fastllm.train.distributed import init_distributed
    from fastllm.train.parallel import local_bytes

    dist = init_distributed("auto")
    cuda = dist.device.type == "cuda"
    mode, checkpointing = MODES[args.worker]
    # Large blocks mmapped and returned on free: the resident set then follows the live tensors (glibc would
    # otherwise keep every freed all-gather buffer's pages).
    harness.mmap_large_allocations()
    peak = harness.PeakMemory(dist.device).__enter__()
    collectives = {"fsdp-gloo-native": "native", "fsdp-gloo-tcp": "tcp"}.get(args.worker, "fastllm")
    model, trained = build(mode, checkpointing, dist, collectives)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    g = torch.Generator().manual_seed(dist.rank)
    x = torch.randint(0, MODEL["vocab_size"], (args.batch_size, MODEL["block_size"]), generator=g).to(dist.device)
    times, cpu_times, counted = [], [], None
    for step in range(args.warmup + args.steps):
        dist.barrier()
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = trained(x, x)[1]
        loss.backward()
        if step == 0:
            counted = local_bytes(model, optimizer)  # gradients exist; optimizer state after the first step
        optimizer.step()
        if step == 0:
            counted["optimizer"] = local_bytes(model, optimizer)["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        cpu = time.process_time() - cpu0  # this process's threads (compute and gloo's), before waiting for the others
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(cpu)
    peak.__exit__(None, None, None)
    row = {"peak_bytes": peak.extra_bytes, "counted": counted, "step_s": times, "cpu_s": cpu_times}
    rows = dist.gather_objects(row)
    if dist.is_main:
        tokens = dist.world_size * args.batch_size * MODEL["block_size"]
        with open(args.json, "w") as f:
            json.dump({"mode": args.worker, "ranks": rows, "params": sum(p.numel() for p in model.parameters()),  # a DTensor's: global
                       "tokens_per_step": tokens,
                       "device": dist.device.type}, f)
    del trained, model, optimizer
    import gc

    gc.collect()
    dist.close()


def launch(mode: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1",
           f"--master_port={29500 + os.getpid() % 1000}", "-m", "bench.parallel", "--worker", mode, "--json", path,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    with open(path) as f:
        result = json.load(f)
    os.remove(path)
    return result


def merge_rounds(results: list[dict]) -> dict:
    """One result of several launches of a mode: each rank's step times pooled, its peak the highest."""
    merged = {**results[0], "load": "-".join(r["load"] for r in results)}
    merged["ranks"] = [{"peak_bytes": max(r["ranks"][i]["peak_bytes"] for r in results), "counted": ranks["counted"],
                        "step_s": [t for r in results for t in r["ranks"][i]["step_s"]],
                        "cpu_s": [t for r in results for t in r["ranks"][i]["cpu_s"]]}
                       for i, ranks in enumerate(results[0]["ranks"])]
    return merged


def summarise(result: dict) -> dict:
    ranks = result["ranks"]
    median_s = statistics.median(t for r in ranks for t in r["step_s"])
    return {"mode": result["mode"], "peak_mib": max(r["peak_bytes"] for r in ranks) / 2**20,
            "counted_mib": max(sum(r["counted"].values()) for r in ranks) / 2**20,
            "median_s": median_s, "cpu_s": statistics.median(t for r in ranks for t in r["cpu_s"]),
            "tokens_per_s": result["tokens_per_step"] / median_s, "params": result["params"],
            "load": result.get("load", "")}


def format_section(rows: list[dict], machine: dict, command: str, args, load_start: str, load_end: str) -> str:
    base = rows[0]
    table = reporting.markdown_table(
        ["mode", "peak MiB / rank", "x DDP", "params+grads+AdamW MiB / rank", "x DDP", "median step s",
         "CPU s / step / rank", "tokens/s", "x DDP", "load"],
        [[r["mode"], f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / base['peak_mib']:.2f}", f"{r['counted_mib']:.0f}",
          f"{r['counted_mib'] / base['counted_mib']:.2f}", f"{r['median_s']:.2f}", f"{r['cpu_s']:.2f}",
          f"{r['tokens_per_s']:.0f}",
          f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}", r["load"]] for r in rows])
    fsdp = next(r for r in rows if r["mode"] == "fsdp")
    memory_ok = fsdp["peak_mib"] <= 0.6 * base["peak_mib"]
    speed_ok = fsdp["tokens_per_s"] >= 0.8 * base["tokens_per_s"]
    return "\n".join([
        f"<!-- bench:{SECTION} -->",
        "## Data parallelism: DDP vs FSDP2 vs FSDP2 + activation checkpointing (issue 15)",
        "",
        f"- {reporting.machine_title(machine)}, {args.nproc} processes x {os.environ.get('OMP_NUM_THREADS', '1')} "
        f"thread; torch {machine['torch']}, Python {machine['python']}; {machine['date']}",
        f"- Command: `{command}`",
        f"- Load average (1/5/15 min) at start {load_start}, at end {load_end} (other jobs share the cores; each "
        f"row gives the 1-minute load when it finished)",
        f"- Model: Llama-style GPT, {base['params'] / 1e6:.1f}M parameters ({MODEL['n_layer']} blocks x "
        f"{MODEL['n_embd']} wide, vocab {MODEL['vocab_size']}, untied head), fp32, AdamW; {args.batch_size} x "
        f"{MODEL['block_size']} tokens per rank per step; {args.warmup} warm-up + {args.steps} timed steps"
        f"{f' per launch, {args.rounds} launches per mode round robin' if args.rounds > 1 else ''}",
        "",
        table,
        "",
        f"- FSDP peak memory per rank {fsdp['peak_mib'] / base['peak_mib']:.0%} of DDP's "
        f"({'meets' if memory_ok else 'misses'} the <= 60% target); tokens/s "
        f"{fsdp['tokens_per_s'] / base['tokens_per_s']:.0%} of DDP's ({'meets' if speed_ok else 'misses'} the "
        f">= 80% target).",
        "- Peak = the resident set's high-water mark above the process's footprint before the model existed "
        "(includes activations, DDP's gradient buckets and FSDP's gathered blocks); the counted column is "
        "parameters + gradients + AdamW state from the local shards.",
        "- FSDP's collectives on gloo are fastllm's (fastllm.train.collectives): between the processes of one "
        "host through a 16 MiB shared-memory mailbox (fsdp), across hosts from gloo's broadcast and send/recv "
        "(fsdp-gloo-tcp, here over loopback TCP); gloo's own all_gather_into_tensor and reduce_scatter_tensor "
        "are fsdp-gloo-native. What bounds FSDP's speed: each rank moves 1.4x DDP's bytes per step (every "
        "block all-gathered in forward and again in backward but the last, gradients reduce-scattered, vs one "
        "all-reduce), on the cores that compute, and FSDP2 runs them synchronously on CPU (no streams), so "
        "they add to the step where DDP's bucketed all-reduce overlaps the backward in gloo's threads.",
        "- CPU s / step / rank: this process's CPU time (compute and gloo's threads) per step: less sensitive to "
        "the other jobs' load than the wall-clock columns.",
        f"<!-- /bench:{SECTION} -->",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {list(MODES)} (default: "
                                                                f"{DEFAULT_MODES})")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="(default: 2)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step (default: 2)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default: 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="launches per mode, taken round robin; medians over all (default: 1)")
    parser.add_argument("--out", default=RESULTS_MD, help="markdown file whose parallel section is (re)written")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    modes = args.modes.split(",")
    if modes[0] != "ddp" or "fsdp" not in modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must start with ddp (the baseline), include fsdp, and use only {list(MODES)}")
    command = "python -m bench.parallel " + shlex.join(sys.argv[1:] if argv is None else argv)
    machine = reporting.describe_machine(harness.Machine.measure(torch.device("cpu"), harness.QUICK_SETTINGS))
    load_start = loadavg()
    results = {mode: [] for mode in modes}
    for round_ in range(args.rounds):  # round robin: a change of load shifts every mode, not one
        for mode in modes:
            print(f"{mode} (round {round_ + 1}/{args.rounds}): {args.warmup} warm-up + {args.steps} steps on "
                  f"{args.nproc} processes (load {loadavg()})", file=sys.stderr, flush=True)
            results[mode].append(launch(mode, args))
            results[mode][-1]["load"] = loadavg().split()[0]
    rows = [summarise(merge_rounds(results[mode])) for mode in modes]
    text = format_section(rows, machine, command.strip(), args, load_start, loadavg())
    reporting.update_results_md(args.out, text, SECTION)
    print(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
