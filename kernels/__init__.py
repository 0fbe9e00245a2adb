"""Triton kernels, one file per op family; installed as `fastllm.kernels`.

Each file holds the @triton.jit kernels followed by plain launchers that take torch tensors, pick block
sizes, allocate outputs and launch. No autograd and no dispatch here: that lives in fastllm.ops.
"""
