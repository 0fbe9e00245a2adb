"""Triton kernels, one file per op family; installed as `fastllm.kernels`.

Each file holds the @triton.jit kernels followed by plain launchers that take torch tensors, pick block
sizes, allocate outputs and launch. No autograd and no dispatch here: that lives in fastllm.ops.
"""
if __name__ == "kernels":
    # Imported under the top-level name only because a checkout's root is on sys.path (`python -m` from it):
    # that name is Hugging Face's `kernels` package, which transformers (5.25+) imports. Hand the import over to
    # it where it is installed; fastllm itself always imports this folder as fastllm.kernels.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds at its end
        _spec.loader.exec_module(_module)
