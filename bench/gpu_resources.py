"""Registers, shared memory and stack frame of every Triton kernel configuration, compiled for sm_80 and sm_90
without a GPU; writes the gpu-resources section of bench/RESULTS.md.

    python -m bench.gpu_resources [--results-md bench/RESULTS.md] [--from-json results.json]

The compiling and the reading of the cubins are tests/test_aot_compile.py's (which fails on any spill or
over-limit configuration); this only lays its results out. --from-json takes the JSON that
`python tests/test_aot_compile.py results.json` writes instead of compiling again (about 3 minutes of
2 cores).
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections import defaultdict

from .report import markdown_table, update_results_md

SECTION = "gpu-resources"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot_module():
    """tests/test_aot_compile.py, imported from its path (tests/ is not a package)."""
    path = os.path.join(ROOT, "tests", "test_aot_compile.py")
    spec = importlib.util.spec_from_file_location("test_aot_compile", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _ptxas_release(arch):
    """'12.8, V12.8.93' from the ptxas Triton uses for sm_`arch`."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    found = re.search(r"release ([\d.]+, V[\d.]+)", get_ptxas_version(arch))
    return found.group(1) if found else get_ptxas_version(arch).strip().splitlines()[-1]


def _kernel_tables(aot, results):
    """{(module, kernel): [row]} with one row per configuration: its id less the kernel's name, then per arch
    registers, shared memory and stack frame."""
    tables = defaultdict(list)
    for module_name, index, spec in aot.SPECS:
        row = [aot._spec_id(module_name, spec).removeprefix(f"{module_name}.{spec.kernel.__name__}-")]
        for arch in aot.ARCHS.values():
            result = results[aot._key(module_name, index, arch)]
            usage = result["resources"]
            row += ["error", "", ""] if usage is None else [usage["registers"], usage["shared"], usage["stack"]]
        tables[module_name, spec.kernel.__name__].append(row)
    return {name: sorted(rows, key=lambda row: row[0]) for name, rows in sorted(tables.items())}


def _summary(aot, tables):
    header = ["kernel", "configs"]
    for arch_name in aot.ARCHS:
        header += [f"max regs {arch_name}", f"max shared B {arch_name}", f"with stack {arch_name}"]
    rows = []
    for (module_name, kernel), configs in tables.items():
        row = [f"{module_name}.{kernel}", len(configs)]
        for a in range(len(aot.ARCHS)):
            numeric = [r for r in configs if r[1 + 3 * a] != "error"]
            row += [max((r[1 + 3 * a] for r in numeric), default="-"),
                    max((r[2 + 3 * a] for r in numeric), default="-"), sum(r[3 + 3 * a] > 0 for r in numeric)]
        rows.append(row)
    return markdown_table(header, rows, right_from=1)


def markdown_section(aot, results, command):
    import triton

    tables = _kernel_tables(aot, results)
    header = ["config"]
    for arch_name in aot.ARCHS:
        header += [f"regs {arch_name}", f"shared B {arch_name}", f"stack B {arch_name}"]
    limits = ", ".join(f"sm_{arch}: {aot.MAX_SHARED_BYTES[arch]} B" for arch in aot.ARCHS.values())
    lines = [f"<!-- bench:{SECTION} -->",
             "## GPU resources per Triton kernel configuration (compiled without a GPU)",
             "",
             f"- triton {triton.__version__}; ptxas {_ptxas_release(80)} (sm_80), {_ptxas_release(90)} (sm_90, "
             f"Triton's ptxas-blackwell); {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- Command: `{command}`; every configuration in the kernel files' aot_specs(), as "
             "tests/test_aot_compile.py compiles it",
             "- regs: registers per thread, stack: stack frame bytes per thread (cuobjdump --dump-resource-usage "
             "on the cubin); shared: Triton's dynamic shared memory plus what the cubin declares (sm_90 "
             "cubins declare 1 KiB whenever a kernel uses any). The test fails on any stack frame, spill or local "
             f"memory, on more than {aot.MAX_REGISTERS} registers, or on shared memory above the per-block "
             f"maximum ({limits}).",
             "",
             _summary(aot, tables),
             ""]
    for (module_name, kernel), rows in tables.items():
        lines += [f"<details><summary>{module_name}.{kernel}: {len(rows)} configurations</summary>", "",
                  markdown_table(header, rows, right_from=1), "", "</details>", ""]
    lines.append(f"<!-- /bench:{SECTION} -->")
    return "\n".join(lines)


def _failures(aot, results):
    """'config sm_N: why' for each configuration the test would fail."""
    failures = []
    for module_name, index, spec in aot.SPECS:
        for arch in aot.ARCHS.values():
            result = results[aot._key(module_name, index, arch)]
            problems = ["compile error"] if result["error"] else aot.resource_problems(result["resources"], arch)
            if problems:
                failures.append(f"{aot._spec_id(module_name, spec)} sm_{arch}: {'; '.join(problems)}")
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-md", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    parser.add_argument("--from-json", help="results written by `python tests/test_aot_compile.py results.json`")
    parser.add_argument("--json", help="also write the compile results here (for a later --from-json)")
    args = parser.parse_args(argv)
    aot = _aot_module()
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_resources") as tmp:
            results = aot.compile_in_child(os.path.join(tmp, "results.json"), os.path.join(tmp, "cache"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    failures = _failures(aot, results)
    update_results_md(args.results_md, markdown_section(aot, results, "python -m bench.gpu_resources"), SECTION)
    print(f"wrote the {SECTION} section of {args.results_md}: {len(aot.SPECS)} configurations x {len(aot.ARCHS)} "
          f"archs, {len(failures)} failing")
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
