"""Benchmark cases, one module per op family.

Each module bench/cases/<family>.py exposes `cases(device, quick) -> list[harness.Case]`; the runner and
the pytest-benchmark suite find it here, so a new family is one new file and no change elsewhere.
"""
import importlib
import pkgutil


def families() -> dict:
    """Every case module in this package, by family name."""
    return {info.name: importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")}
