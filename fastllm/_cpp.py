"""The C++ extension: imported ahead-of-time build if present, else compiled with ninja on first use.

The JIT build lands in ~/.cache/fastllm (or $FASTLLM_CACHE) under a name that includes the torch version,
the CPU capability and a hash of the sources, so it is rebuilt exactly when one of those changes.
"""
import functools
import importlib.resources
import os

import torch

from . import _build


class CppUnavailable(RuntimeError):
    """The C++ extension could neither be imported nor built here."""


def _csrc_dir():
    return str(importlib.resources.files("fastllm.csrc"))


# bf16/fp16 attention's tile GEMMs: "blas" (the default) runs them in 16-bit tiles on ATen's brgemm where oneDNN
# has 16-bit brgemm micro-kernels (AMX), else in fastllm's fp32 tiles; "registers" always in fp32 tiles
# (bench/RESULTS.md, "Attention on an Intel Xeon with AMX").
ATTENTION_GEMM_VARIABLE = "FASTLLM_CPU_ATTENTION_GEMM"


@functools.cache
def load():
    """Return the extension module, or raise CppUnavailable saying why."""
    module = _load_module()
    engine = os.environ.get(ATTENTION_GEMM_VARIABLE)
    if engine:
        try:
            module.set_attention_gemm(engine)
        except RuntimeError as exc:
            raise ValueError(f"{ATTENTION_GEMM_VARIABLE} must be 'blas' or 'registers', got {engine!r}") from exc
    return module


def _load_module():
    try:
        from . import _C  # built ahead of time by setup.py with FASTLLM_BUILD_EXT=1

        return _C
    except ImportError:
        pass
    try:
        from torch.utils import cpp_extension

        csrc = _csrc_dir()
        capability = torch.backends.cpu.get_cpu_capability()
        tag = f"torch{torch.__version__.split('+')[0].replace('.', '_')}_{capability}_{_build.source_hash(csrc)}"
        build_dir = os.path.join(os.environ.get("FASTLLM_CACHE", os.path.expanduser("~/.cache/fastllm")), tag)
        os.makedirs(build_dir, exist_ok=True)
        return cpp_extension.load(
            name="fastllm_cpp",
            sources=_build.cpp_sources(csrc),
            extra_include_paths=[csrc],
            extra_cflags=_build.cxx_flags(capability),
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir,
            verbose=os.environ.get("FASTLLM_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # a missing compiler, ninja, or headers: the torch backend still works
        raise CppUnavailable(f"the C++ extension could not be built ({type(exc).__name__}: {exc})") from exc
