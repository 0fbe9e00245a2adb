"""Benchmark fastllm's ops on this machine against eager PyTorch, torch.compile and torch's own fused ops.

    python -m bench.run                      # every op family at full sizes (a few minutes on a 2-core CPU)
    python -m bench.run --quick              # small sizes, no torch.compile: a smoke run of seconds
    python -m bench.run --ops token_logprobs,cross_entropy --device cuda --out /tmp/bench

Writes a table to the terminal, results.json, results.md and speedup.png to --out, and this device's
section of --results-md. Method: bench/harness.py.
"""
import argparse
import dataclasses
import os
import shlex
import sys
import time

import torch
from tqdm import tqdm

from bench import harness
from bench import report as reporting
from bench.cases import families

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "out")
DEFAULT_RESULTS_MD = os.path.join(REPO, "bench", "RESULTS.md")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", help="comma-separated op families (bench/cases/<family>.py), op names, or "
                                      "family.op; a family name selects all its ops, so the softmax op "
                                      "alone is softmax.softmax (default: everything)")
    parser.add_argument("--variants", help="comma-separated variants to run, e.g. eager,fastllm[cpp] "
                                           "(default: all; with --quick all but torch.compile, whose "
                                           "compile takes longer than the whole quick run)")
    parser.add_argument("--dtypes", help="comma-separated dtypes of the cases to run, e.g. bfloat16 "
                                         "(default: every case's)")
    parser.add_argument("--quick", action="store_true", help="small sizes and short measurements")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, results.md, speedup.png")
    parser.add_argument("--results-md", help="markdown file whose section for this device is replaced "
                                             f"(default: {os.path.relpath(DEFAULT_RESULTS_MD)}, or "
                                             "OUT/RESULTS.md with --quick so smoke runs leave it alone)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no new case after this many seconds; the rest are listed as not run")
    parser.add_argument("--allocator", choices=harness.ALLOCATOR_REGIMES, default="fresh",
                        help="CPU: fresh = every allocation >= 1 MiB is a new mmap (every variant pays its page "
                             "faults; peak memory measured); recycled = freed memory is reused (the kernels' "
                             "own time, no first-touch faults; memory not measured). Each regime has its own "
                             "section in the results file")
    parser.add_argument("--section", help="name of the results-file section to replace, for a run of some ops "
                                          "only (default: the device's own section)")
    parser.add_argument("--min-time", type=float, help="CPU: seconds of timed runs per measurement "
                                                       "(default 0.5, 0.05 with --quick)")
    return parser.parse_args(argv)


def select_cases(device, quick, names, dtypes=None):
    """(family, case) pairs: all, or those named in `names` by family, op, or family.op, of the `dtypes` named
    (dtype names as in the tables, e.g. "bfloat16") or of any."""
    selected, known, known_dtypes = [], set(), set()
    for family, module in families().items():
        for case in module.cases(device, quick):
            keys = {family, case.op, f"{family}.{case.op}"}
            known |= keys
            known_dtypes.add(harness.dtype_name(case.dtype))
            if (names is None or keys & set(names)) and (dtypes is None or harness.dtype_name(case.dtype) in dtypes):
                selected.append((family, case))
    unknown = set(names or ()) - known
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; known families, ops and family.op: {sorted(known)}")
    unknown = set(dtypes or ()) - known_dtypes
    if unknown:
        raise SystemExit(f"--dtypes: unknown {sorted(unknown)}; the cases' dtypes are {sorted(known_dtypes)}")
    return selected


def measure_all(selected, machine, variants, budget, json_path, info, command):
    """Run every selected case with a progress bar; returns (results, skipped, labels of cases not run)."""
    def variant_count(case):
        return len([name for name in case.variants if variants is None or name in variants])

    results, skipped, not_run = [], [], []
    started = time.perf_counter()
    with tqdm(total=sum(variant_count(case) for _, case in selected), unit="variant", dynamic_ncols=True) as bar:
        for family, case in selected:
            label = f"{case.op} {case.shape} {harness.dtype_name(case.dtype)}"
            if budget is not None and time.perf_counter() - started > budget:
                not_run.append(label)
                bar.update(variant_count(case))
                continue
            bar.set_postfix_str(label)
            for outcome in harness.run_case(case, family, machine, variants):
                bar.update(1)
                (skipped if isinstance(outcome, harness.Skipped) else results).append(outcome)
            # rewritten after every case, so an interrupted run still leaves what it measured
            reporting.write_json(json_path, info, command, results, skipped)
    return results, skipped, not_run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.run", *argv])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    settings = harness.QUICK_SETTINGS if args.quick else harness.Settings()
    if args.min_time is not None:
        settings = dataclasses.replace(settings, min_time_s=args.min_time)
    variants = set(args.variants.split(",")) if args.variants else None
    if variants is None and args.quick:
        variants = {"eager", "fastllm[cpp]", "fastllm[triton]"}
    results_md = args.results_md or (os.path.join(args.out, "RESULTS.md") if args.quick else DEFAULT_RESULTS_MD)
    os.makedirs(args.out, exist_ok=True)

    selected = select_cases(device, args.quick, args.ops.split(",") if args.ops else None,
                            args.dtypes.split(",") if args.dtypes else None)
    if args.allocator == "recycled" and device.type == "cpu":
        settings = dataclasses.replace(settings, cpu_memory=False)  # RSS keeps freed pages: time only
    allocator = harness.use_allocator(args.allocator)
    machine = harness.Machine.measure(device, settings)
    info = reporting.describe_machine(machine)
    info["allocator"] = allocator
    info["regime"] = args.allocator if device.type == "cpu" else "cuda caching allocator"
    info["section"] = args.section
    print(reporting.machine_title(info), f"| copy bandwidth {info['copy_bandwidth_gbps']:.1f} GB/s", flush=True)
    json_path = os.path.join(args.out, "results.json")
    results, skipped, not_run = measure_all(selected, machine, variants, args.budget, json_path, info, command)

    notes = reporting.format_skipped(skipped)
    if not_run:
        notes.append(f"not run (--budget {args.budget:g} s reached): {', '.join(not_run)}")
    print(reporting.format_table(results))
    for note in notes:
        print("-", note)
    section = reporting.markdown_section(info, command, results, notes)
    with open(os.path.join(args.out, "results.md"), "w") as out:
        out.write(section + "\n")
    reporting.update_results_md(results_md, section, reporting.section_key(info))
    chart = os.path.join(args.out, "speedup.png")
    plotted = reporting.plot(chart, reporting.machine_title(info), results)
    print(f"wrote {json_path}, {results_md}" + (f", {chart}" if plotted else " (no chart: no variant to compare)"))


if __name__ == "__main__":
    main()
