"""Source list and compiler flags for the C++ extension; shared by the JIT build and setup.py.

Kept free of torch and fastllm imports so setup.py can load it by path.
"""
import glob
import hashlib
import os

# ATen's Vectorized<T> picks its SIMD width from CPU_CAPABILITY_* macros, which an extension must set
# itself; the matching -m flags let the compiler emit those instructions.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}


def cpp_sources(csrc_dir):
    """Every C++ source of the CPU extension: the bindings plus one file per op family."""
    return sorted(glob.glob(os.path.join(csrc_dir, "*.cpp")) + glob.glob(os.path.join(csrc_dir, "cpu", "*.cpp")))


def cxx_flags(capability):
    # No implicit fma contraction: the kernels place their fmas explicitly where the rounding is wanted (e.g.
    # z = x * s must round exactly as in the forward so that z - lse cancels for a dominant logit).
    return ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off",
            *_CAPABILITY_FLAGS.get(capability, _CAPABILITY_FLAGS["DEFAULT"])]


def source_hash(csrc_dir):
    """Hash of every source and header, so an edited checkout gets a fresh build directory."""
    digest = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(csrc_dir, "**", "*.*"), recursive=True))
    for path in files:
        if path.endswith((".cpp", ".h", ".cu")):
            digest.update(os.path.relpath(path, csrc_dir).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]
