"""fastllm's C++ attention against SDPA (enable_gqa) over a grid: MHA and GQA, head dim, dtype, mask, length.

    python -m bench.attention_grid                                  # the default grid, 2 threads
    python -m bench.attention_grid --shapes 2x16/4x1024x128 --dtypes bfloat16 --masks causal --rounds 5

Shapes read batch x heads x seqlen x head_dim, heads as q/kv when they differ. Per row, fastllm.ops.attention
and F.scaled_dot_product_attention(enable_gqa=True) run on the same (batch, seqlen, heads, head_dim) inputs,
forward (no_grad) and forward+backward, interleaved in rotating rounds (harness.time_rotating), so a ratio
is robust to a shared machine's drift; medians are printed as a markdown table. fastllm runs with each of its
tile-GEMM engines (--engines): "blas", the default (ATen's brgemm; 16-bit tiles through oneDNN's micro-kernels
where the CPU has them, e.g. AMX), and "registers" (fastllm's own micro-kernel on fp32 tiles).
"""
import argparse
import contextlib
import os
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fastllm
from bench.harness import time_rotating

DEFAULT_SHAPES = ["1x1x2048x64", "4x8x512x64", "4x8x1024x64", "2x16/4x1024x128", "2x32/4x1024x64",
                  "1x8/1x4096x128"]


def parse_shape(text):
    batch, heads, seqlen, head_dim = text.split("x")
    heads_q, _, heads_kv = heads.partition("/")
    return int(batch), int(heads_q), int(heads_kv or heads_q), int(seqlen), int(head_dim)


def sdpa(q, k, v, causal):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def fastllm_attention(q, k, v, causal):
    with fastllm.use_backend("cpp"):
        return fastllm.ops.attention(q, k, v, causal=causal)


@contextlib.contextmanager
def gemm_engine(engine):
    """The C++ attention's GEMM engine for the block: its forward and its backward (run later by autograd)."""
    if engine is None:
        yield
        return
    from fastllm import _cpp

    previous = _cpp.load().set_attention_gemm(engine)
    try:
        yield
    finally:
        _cpp.load().set_attention_gemm(previous)


def measure(shape, dtype, causal, rounds, engines):
    batch, heads_q, heads_kv, seqlen, head_dim = parse_shape(shape)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=generator).to(dtype).requires_grad_()
               for heads in (heads_q, heads_kv, heads_kv))
    dout = torch.randn(batch, seqlen, heads_q, head_dim, generator=generator).to(dtype)
    variants = {**{engine: (fastllm_attention, engine) for engine in engines}, "sdpa": (sdpa, None)}

    def forward(fn, engine):
        def call():
            with torch.no_grad(), gemm_engine(engine):
                fn(q, k, v, causal)
        return call

    def forward_backward(fn, engine):
        def call():
            with gemm_engine(engine):
                torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
        return call

    row = {}
    for mode, wrap in (("fwd", forward), ("fwd+bwd", forward_backward)):
        times = time_rotating({name: wrap(*variant) for name, variant in variants.items()}, rounds, warmup=1)
        row[mode] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.attention_grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--masks", default="causal,full")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per row and mode (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="blas,registers", help="fastllm's tile-GEMM engines to time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [(shape, dtype, mask) for shape in args.shapes.split(",") for dtype in args.dtypes.split(",")
            for mask in args.masks.split(",")]
    engines = args.engines.split(",")
    columns = [f"{mode} {name} ms" for mode in ("fwd", "fwd+bwd") for name in (*engines, "sdpa")]
    columns[len(engines) + 1:len(engines) + 1] = [f"fwd x sdpa ({e})" for e in engines]
    columns += [f"fwd+bwd x sdpa ({e})" for e in engines]
    lines = ["| shape | dtype | mask | " + " | ".join(columns) + " | load |",
             "|---|---|---|" + "---:|" * (len(columns) + 1)]
    for shape, dtype, mask in tqdm(rows, unit="row"):
        row = measure(shape, getattr(torch, dtype), mask == "causal", args.rounds, engines)
        cells = []
        for mode in ("fwd", "fwd+bwd"):
            times = row[mode]
            cells += [f"{times[name]:.1f}" for name in (*engines, "sdpa")]
            cells += [f"{times['sdpa'] / times[e]:.2f}x" for e in engines]
        lines.append(f"| {shape} | {dtype} | {mask} | " + " | ".join(cells) + f" | {os.getloadavg()[0]:.1f} |")
        tqdm.write(lines[-1])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
