"""Reporting for the benchmark harness: machine header, table, JSON, the RESULTS.md section and the chart.

bench/harness.py measures (Result, Skipped); this module only turns its results into text, files and a PNG.
"""
import dataclasses
import datetime
import json
import os
import platform
from typing import Optional

import torch

from .harness import BASELINE, Machine, Result, Skipped, is_peer


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(machine: Machine) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "device": machine.device.type,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "copy_bandwidth_gbps": machine.copy_bytes_per_s / 1e9,
    }
    if machine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(machine.device)
        info["cuda"] = torch.version.cuda
    return info


def machine_title(info: dict) -> str:
    if info["device"] == "cuda":
        return f"GPU: {info['gpu']} (CUDA {info['cuda']}); host CPU {info['cpu']}, {info['cpu_cores']} cores"
    return f"CPU: {info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"


def markdown_table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    """A markdown table, columns from `right_from` on right-aligned (numbers)."""
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if i >= right_from else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i >= right_from else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _fmt_number(value: Optional[float]) -> str:
    """About three significant digits without exponents for the usual range: 1234, 123, 12.3, 1.23, 0.0123."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _fmt_rate(rate: Optional[float], pct: Optional[float]) -> str:
    if rate is None:
        return "-"
    return f"{_fmt_number(rate)} ({pct:.0f}%)" if pct is not None else _fmt_number(rate)


def _fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _fmt_peer_ratio(value: Optional[float], peer: Optional[str]) -> str:
    return "-" if value is None else f"{value:.2f}x {peer}"


def table_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the results table (FLOP columns only when some case counts FLOPs, the compile
    column only when some variant is compiled)."""
    with_flops = any(r.forward_tflops is not None for r in results)
    with_compile = any(r.compile_s is not None for r in results)
    header = ["op", "shape", "dtype", "variant", "fwd ms", "fwd+bwd ms", "fwd MiB", "fwd+bwd MiB",
              "fwd GB/s (% copy)", "fwd+bwd GB/s (% copy)"]
    if with_flops:
        header += ["fwd TFLOP/s (% mm)", "fwd+bwd TFLOP/s (% mm)"]
    header += ["x eager fwd", "x eager fwd+bwd", "x best peer fwd", "x best peer fwd+bwd", "mem/eager fwd",
               "mem/eager fwd+bwd"]
    header += ["compile s"] if with_compile else []
    header += ["note"]
    rows = []
    for r in results:
        row = [r.op, r.shape, r.dtype, r.variant]
        if r.error:
            row += ["-"] * (len(header) - len(row) - 1) + [r.error]
            rows.append(row)
            continue
        row += [_fmt_number(r.forward_ms), _fmt_number(r.forward_backward_ms),
                _fmt_number(r.forward_peak_mib), _fmt_number(r.forward_backward_peak_mib),
                _fmt_rate(r.forward_gbps, r.forward_pct_copy),
                _fmt_rate(r.forward_backward_gbps, r.forward_backward_pct_copy)]
        if with_flops:
            row += [_fmt_rate(r.forward_tflops, r.forward_pct_matmul),
                    _fmt_rate(r.forward_backward_tflops, r.forward_backward_pct_matmul)]
        row += [_fmt_ratio(r.speedup_forward), _fmt_ratio(r.speedup_forward_backward),
                _fmt_peer_ratio(r.x_best_peer_forward, r.best_peer_forward),
                _fmt_peer_ratio(r.x_best_peer_forward_backward, r.best_peer_forward_backward),
                _fmt_ratio(r.memory_vs_eager_forward), _fmt_ratio(r.memory_vs_eager_forward_backward)]
        row += [_fmt_number(r.compile_s)] if with_compile else []
        row += [f"MISMATCH: {r.mismatch}" if r.mismatch else ""]
        rows.append(row)
    return header, rows


def format_table(results: list[Result]) -> str:
    """A markdown table, padded so it also reads as plain text in a terminal."""
    header, rows = table_rows(results)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    numeric = [i >= 4 and header[i] != "note" for i in range(len(header))]

    def line(cells):
        padded = [cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(cells, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if right else ("-" * (w + 2))
                          for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def format_skipped(skipped: list[Skipped]) -> list[str]:
    """One line per variant and reason (not per case): 'fastllm[triton] (10 cases): reason'."""
    counts: dict[tuple[str, str], int] = {}
    for s in skipped:
        counts[(s.variant, s.reason)] = counts.get((s.variant, s.reason), 0) + 1
    return [f"{variant} skipped in {n} case{'s' if n > 1 else ''}: {reason}"
            for (variant, reason), n in counts.items()]


def write_json(path: str, info: dict, command: str, results: list, skipped: list) -> None:
    report = {"machine": info, "command": command,
              "results": [dataclasses.asdict(r) for r in results],
              "skipped": [dataclasses.asdict(s) for s in skipped]}
    with open(path, "w") as out:
        json.dump(report, out, indent=1)


RESULTS_MD_INTRO = """# fastllm benchmark results

Written by `python -m bench.run` (method: the docstring of bench/harness.py). One section per device kind;
a run replaces only its own section. "x eager" is eager PyTorch's time over the variant's, measured in the
same process; "x best peer" is the fastest peer's (eager, torch.compile, or torch's own fused op: the
variants not named fastllm[...]) time over the variant's, and names that peer. The variants of one case are
timed in rotating rounds (interleaved), so drift on a shared machine lands on all alike; "compile s" is
torch.compile's warm-up, outside the timings. "MiB" is peak memory above the inputs (outputs and saved
activations included), and "mem/eager" the variant's peak over eager's. "% copy" is achieved GB/s (the
op's minimum bytes over its time) as a share of the machine's measured copy bandwidth.
"""


def section_key(info: dict) -> str:
    """The results file keeps one section per device kind and allocator regime (and per --section name)."""
    suffix = f"-{info['section']}" if info.get("section") else ""
    return info["device"] + ("-recycled" if info.get("regime") == "recycled" else "") + suffix


def markdown_section(info: dict, command: str, results: list[Result], notes: list[str]) -> str:
    title = machine_title(info) + (", recycled memory" if info.get("regime") == "recycled" else "")
    title += f" ({info['section']})" if info.get("section") else ""
    lines = [f"<!-- bench:{section_key(info)} -->",
             f"## {title}",
             "",
             f"- torch {info['torch']}, triton {info['triton']}, Python {info['python']}; {info['date']}",
             f"- Command: `{command}`",
             f"- Measured copy bandwidth: {info['copy_bandwidth_gbps']:.1f} GB/s "
             "(256 MiB dst.copy_(src), read + write)",
             *([f"- Allocator: {info['allocator']}"] if info.get("allocator") else []),
             "",
             format_table(results),
             ""]
    lines += [f"- {note}" for note in notes]
    lines.append(f"<!-- /bench:{section_key(info)} -->")
    return "\n".join(lines)


def update_results_md(path: str, section: str, device_kind: str) -> None:
    """Replace this device kind's section of the results file (create the file if missing), keep the rest."""
    begin, end = f"<!-- bench:{device_kind} -->", f"<!-- /bench:{device_kind} -->"
    text = open(path).read() if os.path.exists(path) else RESULTS_MD_INTRO
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as out:
        out.write(text)


def plot(path: str, title: str, results: list[Result]) -> bool:
    """Grouped bars per case: fwd+bwd speedup against eager, fastllm's against the case's best peer, and
    peak memory against eager. False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [r for r in results if r.variant != BASELINE and r.speedup_forward_backward is not None]
    if not compared:
        return False
    cases = list(dict.fromkeys(r.case_label for r in compared))
    variants = list(dict.fromkeys(r.variant for r in compared))
    by_key = {(r.case_label, r.variant): r for r in compared}
    best_peer = {r.case_label: r.best_peer_forward_backward for r in compared}
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 3, figsize=(18, 1.5 + 0.25 * len(cases) * len(variants)), sharey=True)
    panels = [("fwd+bwd speedup vs eager (higher is better)", "speedup_forward_backward", variants),
              ("fastllm fwd+bwd vs the best peer (higher is better)", "x_best_peer_forward_backward",
               [v for v in variants if not is_peer(v)]),
              ("fwd+bwd peak extra memory / eager (lower is better)", "memory_vs_eager_forward_backward", variants)]
    for axis, (panel_title, attribute, shown) in zip(axes, panels):
        for k, variant in enumerate(variants):
            if variant not in shown:
                continue
            values = [getattr(by_key.get((case, variant)), attribute, None) or 0.0 for case in cases]
            positions = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(cases))]
            axis.barh(positions, values, height=width, label=variant, color=f"C{k}")
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_title(panel_title, fontsize=10)
        labels = [f"{case} (best peer: {best_peer[case]})" for case in cases]
        axis.set_yticks(range(len(cases)), labels, fontsize=8)
    axes[0].invert_yaxis()  # first case on top (the axes share y, so once inverts all)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
