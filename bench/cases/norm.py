"""Benchmark cases for the norm family (fastllm/ops/norm.py): inputs, eager baselines, byte counts.

The headline is 8192 rows x hidden 1024 in fp32, forward+backward, on the C++ backend: fastllm targets
>= 1.3x over F.layer_norm and >= 3x over the eager RMSNorm expression that model code writes by hand.
RMSNorm is also compared with F.rms_norm, and the fused residual add (add_rms_norm) with x + residual
followed by that expression.
"""
import torch
import torch.nn.functional as F

import fastllm
from bench.harness import Case, Cost, standard_variants

EPS = 1e-6
QUICK = [(256, 1024)]
CPU_SIZES = [(4096, 768), (8192, 1024), (4096, 4096)]  # rows x hidden; (8192, 1024) is the headline
GPU_SIZES = [(4096, 768), (8192, 1024), (16384, 4096)]


# ---------------------------------------------------------------------------------------------------------
# Eager PyTorch: what a user writes without fastllm
# ---------------------------------------------------------------------------------------------------------
def eager_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def eager_rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def functional_rms_norm(x, weight):
    return F.rms_norm(x, x.shape[-1:], weight, EPS)


def eager_add_rms_norm(x, residual, weight):
    h = x + residual
    return eager_rms_norm(h, weight), h


# fastllm.ops is looked up at call time: nothing is imported or built until a case runs.
def fastllm_layer_norm(x, weight, bias):
    return fastllm.ops.layer_norm(x, weight, bias, EPS)


def fastllm_rms_norm(x, weight):
    return fastllm.ops.rms_norm(x, weight, EPS)


def fastllm_add_rms_norm(x, residual, weight):
    return fastllm.ops.add_rms_norm(x, residual, weight, EPS)


# ---------------------------------------------------------------------------------------------------------
# Minimum traffic. X = one activation tensor's bytes, P = one parameter vector's bytes.
# Norm: forward reads x and writes y (2X); backward reads x and dy and writes dx (3X), reads the weight and
# writes each parameter gradient. With the residual add the forward reads x and residual and writes y and h
# (4X); the backward reads h, dy and dh and writes one gradient, shared by x and residual (4X).
# The per-row statistics (8 bytes a row) are left out: under 0.2% at hidden 768.
# ---------------------------------------------------------------------------------------------------------
def _traffic(activations_forward, activations_backward, parameters):
    def traffic(rows, hidden, dtype):
        x, p = rows * hidden * dtype.itemsize, hidden * dtype.itemsize
        return Cost(forward=activations_forward * x + parameters * p,
                    forward_backward=(activations_forward + activations_backward) * x + 3 * parameters * p)
    return traffic


def _inputs(names):
    def make_inputs(rows, hidden):
        def build(device, dtype):
            generator = torch.Generator(device).manual_seed(0)
            tensors = {
                "x": torch.randn(rows, hidden, generator=generator, device=device, dtype=dtype),
                "residual": torch.randn(rows, hidden, generator=generator, device=device, dtype=dtype),
                "weight": 1 + 0.1 * torch.randn(hidden, generator=generator, device=device, dtype=dtype),
                "bias": 0.1 * torch.randn(hidden, generator=generator, device=device, dtype=dtype),
            }
            return tuple(tensors[name].requires_grad_() for name in names)
        return build
    return make_inputs


def _rms_variants(eager, fastllm_op, functional=None):
    # torch's fused F.rms_norm, where there is one, is the native peer
    return standard_variants(eager, fastllm_op, {"F.rms_norm": functional} if functional else None)


# op -> (variants, input names, traffic)
OPS = {
    "layer_norm": (standard_variants(eager_layer_norm, fastllm_layer_norm), ("x", "weight", "bias"),
                   _traffic(2, 3, 2)),
    "rms_norm": (_rms_variants(eager_rms_norm, fastllm_rms_norm, functional_rms_norm), ("x", "weight"),
                 _traffic(2, 3, 1)),
    "add_rms_norm": (_rms_variants(eager_add_rms_norm, fastllm_add_rms_norm), ("x", "residual", "weight"),
                     _traffic(4, 4, 1)),
}


def cases(device, quick: bool) -> list[Case]:
    device = torch.device(device)
    sizes = QUICK if quick else GPU_SIZES if device.type == "cuda" else CPU_SIZES
    result = []
    for op, (variants, names, traffic) in OPS.items():
        for rows, hidden in sizes:
            for dtype in (torch.float32, torch.bfloat16):
                result.append(Case(op=op, shape=f"{rows}x{hidden}", dtype=dtype,
                                   make_inputs=_inputs(names)(rows, hidden), variants=variants,
                                   bytes_moved=traffic(rows, hidden, dtype)))
    return result
