"""Packaging.

`kernels/` ships as the subpackage `fastllm.kernels` and `csrc/` as `fastllm.csrc` (sources only), so the
C++ extension can be compiled with ninja on first use on the user's machine. Set FASTLLM_BUILD_EXT=1 to
compile it ahead of time instead, into the wheel as `fastllm._C`.
"""
import os

from setuptools import setup

packages = ["fastllm", "fastllm.ops", "fastllm.nn", "fastllm.model", "fastllm.data", "fastllm.train", "fastllm.train.rl",
            "fastllm.demo",
            "fastllm.integrations", "fastllm.kernels", "fastllm.csrc"]
package_dir = {"fastllm.kernels": "kernels", "fastllm.csrc": "csrc"}
package_data = {"fastllm.csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.cu"]}
ext_modules, cmdclass = [], {}

if os.environ.get("FASTLLM_BUILD_EXT") == "1":
    import importlib.util

    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The JIT build's source list and flags, loaded by path so setup.py does not import fastllm itself.
    spec = importlib.util.spec_from_file_location("_build", os.path.join("fastllm", "_build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    sources = [os.path.relpath(p) for p in build.cpp_sources("csrc")]
    ext_modules = [CppExtension("fastllm._C", sources, include_dirs=["csrc"],
                                extra_compile_args=build.cxx_flags("AVX2"))]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(packages=packages, package_dir=package_dir, package_data=package_data,
      include_package_data=True, ext_modules=ext_modules, cmdclass=cmdclass)
