"""One benchmark case, fastllm against eager with their runs alternating: ratios robust to machine drift.

    python -m bench.interleaved norm.layer_norm 8192x1024 float32 --allocator recycled --repeats 5

bench.run times all runs of one variant, then all runs of the next; on a shared machine whose bandwidth drifts
(other tenants) that moves a ratio by +-10%. Here the variants' forward+backward calls alternate, who goes
first rotating each round (harness.time_rotating), so drift lands on both alike. Each repeat reports the
median of its runs and their ratio; the repeats show how much the ratio itself moves. The case, its inputs and variants are bench.run's (bench/cases/<family>.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench import harness
from bench.run import select_cases

DEFAULT_VARIANT = "fastllm[cpp]"


def run(op: str, shape: str, dtype: str, variant: str, allocator: str, repeats: int, runs: int,
        quick: bool = False) -> list[dict]:
    harness.use_allocator(allocator)
    device = torch.device("cpu")
    matches = [case for _, case in select_cases(device, quick, [op])
               if case.shape == shape and harness.dtype_name(case.dtype) == dtype]
    if not matches:
        raise SystemExit(f"no case {op} {shape} {dtype} (see python -m bench.run --help)")
    case = matches[0]
    inputs = case.make_inputs(device, case.dtype)
    prepared = {name: harness.prepare(case, name, inputs, device) for name in (harness.BASELINE, variant)}
    calls = {name: p.forward_backward or p.forward for name, p in prepared.items()}
    rows = []
    for _ in range(repeats):
        medians = {name: statistics.median(t) for name, t in harness.time_rotating(calls, runs, warmup=2).items()}
        rows.append({"medians_ms": {k: v * 1e3 for k, v in medians.items()},
                     "speedup": medians[harness.BASELINE] / medians[variant]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.split("\n\n")[0])
    parser.add_argument("op", help="family.op or op, as bench.run --ops takes it (e.g. norm.layer_norm)")
    parser.add_argument("shape", help="the case's shape label, e.g. 8192x1024")
    parser.add_argument("dtype", help="float32, bfloat16, ...")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, help=f"compared with eager (default {DEFAULT_VARIANT})")
    parser.add_argument("--allocator", choices=harness.ALLOCATOR_REGIMES, default="recycled",
                        help="as bench.run --allocator (default recycled: the kernels' own time)")
    parser.add_argument("--repeats", type=int, default=5, help="independent medians of the ratio (default 5)")
    parser.add_argument("--runs", type=int, default=55, help="alternating rounds per repeat (default 55)")
    parser.add_argument("--quick", action="store_true", help="choose among bench.run --quick's small cases")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.runs < 1:
        parser.error("--repeats and --runs must be >= 1")
    rows = run(args.op, args.shape, args.dtype, args.variant, args.allocator, args.repeats, args.runs, args.quick)
    print(f"{args.op} {args.shape} {args.dtype}, fwd+bwd, {args.allocator} memory, {torch.get_num_threads()} threads, "
          f"{args.runs} alternating runs per repeat")
    for i, row in enumerate(rows):
        times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in row["medians_ms"].items())
        print(f"repeat {i + 1}: {times}: {args.variant} {row['speedup']:.2f}x eager")
    speedups = sorted(r["speedup"] for r in rows)
    print(f"speedup median {statistics.median(speedups):.2f}x, range {speedups[0]:.2f}x-{speedups[-1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
