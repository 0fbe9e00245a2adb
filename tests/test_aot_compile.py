"""Ahead-of-time compilation of every Triton kernel in fastllm.kernels for sm_80 (A100) and sm_90 (H100/H200),
and the GPU resources each compiled configuration takes, all without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code the GPU compiler rejects (types
of loop-carried values, layouts, unsupported casts). triton.compile lowers to PTX and runs ptxas for a named
GPUTarget without a GPU, so this catches those failures on any machine.

It also reads what each cubin needs, so that a configuration that would spill or not launch fails here:
  - `cuobjdump --dump-resource-usage` (shipped in triton/backends/nvidia/bin) on the cubin bytes prints
    `REG:<registers per thread> STACK:<stack frame bytes> SHARED:<static shared bytes> LOCAL:<local bytes>`;
  - ptxas's own report (`-v`, which Triton always passes, printed under knobs.nvidia.dump_ptxas_log) gives
    `<n> bytes stack frame, <n> bytes spill stores, <n> bytes spill loads` and `Used <n> registers`;
  - compiled.metadata.shared is the dynamic shared memory Triton requests at launch (its pipeline buffers
    and reduction scratch); the driver refuses a launch above the device's opt-in per-block maximum.
A configuration fails on any stack frame, spill or local memory (registers spilled to DRAM: the tiles are
too large for the warps), on more than 255 registers per thread, or on shared memory (dynamic + what the
cubin declares) above the per-block maximum: 163 KiB on compute capability 8.0, 227 KiB on 9.0 (CUDA C++
Programming Guide, shared memory per compute capability). `python -m bench.gpu_resources` writes the table
of every configuration to bench/RESULTS.md.

To register a kernel family: give kernels/<family>.py a module-level `aot_specs()` that returns a list of
fastllm.kernels.utils.AotSpec, one per configuration its launchers can produce. Every module of the package
is imported and asked; nothing else to edit.

The compiling happens in one child process started without TRITON_INTERPRET: once triton has been imported
in interpret mode (tests/conftest.py sets it on machines without a GPU), every @triton.jit function,
triton.language's own helpers included, is an InterpretedFunction that triton.compile cannot take, and that
cannot be undone inside the process. Run this file as a script to do only the compiling (the JSON holds
each configuration's error or resources):
    python tests/test_aot_compile.py results.json
"""
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback

import pytest

PACKAGE = "fastllm.kernels"
ARCHS = {"sm80": 80, "sm90": 90}
# Opt-in maximum of shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): 163 KiB of the A100's
# 164 KiB per SM, 227 KiB of the H100's 228 KiB (the driver keeps 1 KiB per block).
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255  # per thread, on both


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
    return (f"{module_name}.{spec.kernel.__name__}-{dtype}-{flags}-w{spec.num_warps}-s{spec.num_stages}"
            + "".join(f"-{n}%16" for n in ints))


def cuobjdump_path():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_CUOBJDUMP_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def _resources(compiled, ptxas_log):
    """What the compiled kernel needs per thread and per block, from its cubin (cuobjdump) and ptxas's report.

    The spill counts are None when ptxas did not run (a cache hit): only ptxas reports them.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump_path(), "--dump-resource-usage", cubin.name], capture_output=True,
                              text=True, check=True).stdout
    usage = _CUOBJDUMP_USAGE.findall(dump)
    if len(usage) != 1:
        raise ValueError(f"expected one function's resource usage from cuobjdump, got {len(usage)}:\n{dump}")
    registers, stack, static_shared, local = map(int, usage[0])
    frame = _PTXAS_FRAME.findall(ptxas_log)
    ptxas_registers = _PTXAS_REGISTERS.findall(ptxas_log)
    return {
        "registers": registers, "stack": stack, "local": local,
        "static_shared": static_shared, "dynamic_shared": compiled.metadata.shared,
        "shared": static_shared + compiled.metadata.shared,
        "spill_stores": int(frame[0][1]) if frame else None, "spill_loads": int(frame[0][2]) if frame else None,
        "ptxas_registers": int(ptxas_registers[0]) if ptxas_registers else None,
        "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
    }


def resource_problems(usage, arch):
    """Why a configuration's resources would not run well (or at all) on sm_`arch`; empty if none."""
    problems = []
    if usage["stack"] or usage["local"] or usage["spill_stores"] or usage["spill_loads"]:
        problems.append(f"register spills: {usage['stack']} B stack frame, {usage['local']} B local memory, "
                        f"{usage['spill_stores']} B spill stores, {usage['spill_loads']} B spill loads")
    if usage["spill_stores"] is None:
        problems.append("no ptxas report to read spills from (was the kernel served from a cache?)")
    if usage["registers"] > MAX_REGISTERS:
        problems.append(f"{usage['registers']} registers per thread > {MAX_REGISTERS}")
    if usage["ptxas_registers"] is not None and usage["ptxas_registers"] != usage["registers"]:
        problems.append(f"cuobjdump reads {usage['registers']} registers, ptxas reported {usage['ptxas_registers']}")
    if usage["shared"] > MAX_SHARED_BYTES[arch]:
        problems.append(f"{usage['shared']} B shared memory ({usage['dynamic_shared']} dynamic + "
                        f"{usage['static_shared']} static) > the {MAX_SHARED_BYTES[arch]} B per-block maximum")
    return problems


_JOBS = []  # (module name, index, AotSpec, arch), filled before the compile workers fork


def _compile_one(job_index):
    """Compile _JOBS[job_index]; return (key, {"kernel": name, "error": text or None, "resources": dict})."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, index, spec, arch = _JOBS[job_index]
    kernel = spec.kernel
    result = {"kernel": kernel.__name__, "error": None, "resources": None}
    try:
        missing = [n for n in kernel.arg_names if n not in spec.signature]
        if missing:
            raise ValueError(f"signature lacks {missing}")
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
        source = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        ptxas_log = io.StringIO()  # Triton prints ptxas's -v report when dump_ptxas_log is on
        with contextlib.redirect_stdout(ptxas_log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        if compiled.asm.get("cubin"):
            result["resources"] = _resources(compiled, ptxas_log.getvalue())
        else:
            result["error"] = "no cubin produced"
    except Exception:
        result["error"] = traceback.format_exc(limit=-6)
    return _key(module_name, index, arch), result


def _compile_all(out_path):
    """Child process: compile every spec for every arch, one worker per core; write {key: result}."""
    import triton

    assert not triton.knobs.runtime.interpret, "the AOT child must run without TRITON_INTERPRET"
    triton.knobs.nvidia.dump_ptxas_log = True
    _JOBS[:] = [(m, i, spec, arch) for m, i, spec in _specs() for arch in ARCHS.values()]
    # Forked workers inherit the imported kernels (jobs travel as indices: kernels do not pickle);
    # compiling is CPU-bound (MLIR passes, ptxas), so one worker per core.
    with multiprocessing.get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
        results = dict(pool.imap_unordered(_compile_one, range(len(_JOBS)), chunksize=4))
    with open(out_path, "w") as f:
        json.dump(results, f)


def compile_in_child(out_path, cache_dir):
    """Run _compile_all in a fresh interpreter without TRITON_INTERPRET, with Triton's cache in `cache_dir`
    (empty, so that everything really compiles and ptxas reports on it); return {key: result}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    child = subprocess.run([sys.executable, os.path.abspath(__file__), str(out_path)], env=env, capture_output=True,
                           text=True)
    if child.returncode != 0:
        raise RuntimeError(f"AOT compile process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f)


SPECS = _specs()


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    try:
        return compile_in_child(tmp / "results.json", tmp / "cache")
    except RuntimeError as e:
        pytest.fail(str(e))


def test_some_kernel_file_registers_specs():
    assert SPECS, f"no module in {PACKAGE} defines aot_specs()"


@pytest.mark.parametrize("arch", ARCHS.values(), ids=ARCHS.keys())
@pytest.mark.parametrize("module_name,index,spec", SPECS, ids=[_spec_id(m, s) for m, _, s in SPECS])
def test_aot_compile(module_name, index, spec, arch, compile_results):
    key = _key(module_name, index, arch)
    assert key in compile_results, f"{key}: the compile process produced no result (aot_specs() not deterministic?)"
    result = compile_results[key]
    expected = spec.kernel.__name__
    assert result["kernel"] == expected, f"{key}: compiled {result['kernel']}, expected {expected}"
    name = _spec_id(module_name, spec)
    assert result["error"] is None, f"{name} failed for sm_{arch}:\n{result['error']}"
    problems = resource_problems(result["resources"], arch)
    assert not problems, f"{name} on sm_{arch} ({result['resources']['registers']} registers): " + "; ".join(problems)


if __name__ == "__main__":
    _compile_all(sys.argv[1])
