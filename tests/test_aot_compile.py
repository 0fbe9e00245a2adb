"""Ahead-of-time compilation of every Triton kernel in fastllm.kernels for sm_80 (A100) and sm_90 (H100/H200).

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code the GPU compiler rejects (types
of loop-carried values, layouts, unsupported casts). triton.compile lowers to PTX and runs ptxas for a named
GPUTarget without a GPU, so this catches those failures on any machine.

To register a kernel family: give kernels/<family>.py a module-level `aot_specs()` that returns a list of
fastllm.kernels.utils.AotSpec, one per configuration its launchers can produce. Every module of the package
is imported and asked; nothing else to edit.

The compiling happens in one child process started without TRITON_INTERPRET: once triton has been imported
in interpret mode (tests/conftest.py sets it on machines without a GPU), every @triton.jit function,
triton.language's own helpers included, is an InterpretedFunction that triton.compile cannot take, and that
cannot be undone inside the process. Run this file as a script to do only the compiling:
    python tests/test_aot_compile.py results.json
"""
import importlib
import json
import multiprocessing
import os
import pkgutil
import subprocess
import sys
import traceback

import pytest

PACKAGE = "fastllm.kernels"
ARCHS = {"sm80": 80, "sm90": 90}


def _specs():
    """[(module name, index, AotSpec)] from every module of the package that defines aot_specs()."""
    found = []
    package = importlib.import_module(PACKAGE)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        if hasattr(module, "aot_specs"):
            found += [(info.name, i, spec) for i, spec in enumerate(module.aot_specs())]
    return found


def _key(module_name, index, arch):
    return f"{module_name}:{index}:sm{arch}"


def _spec_id(module_name, spec):
    dtype = next(t[1:] for t in spec.signature.values() if t.startswith("*"))  # the first tensor's
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.constexprs.items())
    ints = [n for n in spec.divisible_by_16 if not spec.signature[n].startswith("*")]
    return f"{module_name}.{spec.kernel.__name__}-{dtype}-{flags}-w{spec.num_warps}" + "".join(f"-{n}%16" for n in ints)


_JOBS = []  # (module name, index, AotSpec, arch), filled before the compile workers fork


def _compile_one(job_index):
    """Compile _JOBS[job_index]; return (key, kernel name, error text or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, index, spec, arch = _JOBS[job_index]
    kernel = spec.kernel
    try:
        missing = [n for n in kernel.arg_names if n not in spec.signature]
        if missing:
            raise ValueError(f"signature lacks {missing}")
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
        source = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})
        error = None if compiled.asm.get("cubin") else "no cubin produced"
    except Exception:
        error = traceback.format_exc(limit=-6)
    return _key(module_name, index, arch), kernel.__name__, error


def _compile_all(out_path):
    """Child process: compile every spec for every arch, one worker per core; write {key: [kernel, error]}."""
    import triton

    assert not triton.knobs.runtime.interpret, "the AOT child must run without TRITON_INTERPRET"
    _JOBS[:] = [(m, i, spec, arch) for m, i, spec in _specs() for arch in ARCHS.values()]
    # Forked workers inherit the imported kernels (jobs travel as indices: kernels do not pickle);
    # compiling is CPU-bound (MLIR passes, ptxas), so one worker per core.
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
        done = pool.imap_unordered(_compile_one, range(len(_JOBS)), chunksize=4)
        results = {key: [name, error] for key, name, error in done}
    with open(out_path, "w") as f:
        json.dump(results, f)


SPECS = _specs()


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # a fresh cache: every configuration really compiles
    out = tmp / "results.json"
    child = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True)
    if child.returncode != 0:
        pytest.fail(f"AOT compile process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(out.read_text())


def test_some_kernel_file_registers_specs():
    assert SPECS, f"no module in {PACKAGE} defines aot_specs()"


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("module_name,index,spec", SPECS, ids=[_spec_id(m, s) for m, _, s in SPECS])
def test_aot_compile(module_name, index, spec, arch, compile_results):
    key = _key(module_name, index, arch)
    assert key in compile_results, f"{key}: the compile process produced no result (aot_specs() not deterministic?)"
    kernel_name, error = compile_results[key]
    assert kernel_name == spec.kernel.__name__, f"{key}: compiled {kernel_name}, expected {spec.kernel.__name__}"
    assert error is None, f"{module_name}.{kernel_name} {spec.constexprs} failed for sm_{arch}:\n{error}"


if __name__ == "__main__":
    _compile_all(sys.argv[1])
