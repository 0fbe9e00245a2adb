"""The chunked LM head under every fused linear op (fused_linear.py): logits of a few token rows at a time, their
row statistics, and the gradients of hidden, weight and bias summed chunk by chunk.

With hidden (N, H), weight (V, H), z = logits / T:

    for each chunk of C token rows:
        logits  = hidden[rows] @ weight.T + bias                    (C, V): a matmul, MKL/oneDNN or cuBLAS
        lse, z[label], sum(z), entropy = logit_stats_forward(logits)     one read of the chunk
        a, b, c, d = on_chunk(the statistics): the loss's per-row coefficients
        dlogits = logit_stats_backward(logits, a, b, c, d)          (C, V), in place: p (a + b log p) + c onehot + d
        grad_hidden[rows] = dlogits @ weight;  grad_weight += dlogits.T @ hidden[rows];  grad_bias += sum(dlogits)
        (one (C, V) buffer serves every chunk's logits and then their gradient)

Precision. The matmuls run in the projection's compute dtype: the inputs' own, or under torch.autocast the
autocast dtype F.linear casts to. Then the weight (and bias) are cast once per call (a V x H copy, freed when
the call returns; never saved for backward), each chunk's hidden rows as it comes, and the logits are in that
dtype, as F.linear's are. Each gradient comes back in its own input's dtype (fp32 master weights get an fp32
gradient, as through autocast's cast) and is computed at that precision: when it is wider than the compute
dtype, a gradient product is never rounded to the half dtype (TRL's chunked head does the same; rounding every
chunk's product to bf16 adds an error TRL's does not have). A half-precision weight gradient is summed over
chunks in fp32 and rounded once at the end. Those fp32 products run, on the C++ backend, as one 16-bit x 16-bit
-> fp32 GEMM each (csrc/cpu/wide_matmul.cpp), the weight's accumulating in the GEMM itself; without one (other
backends, a torch without MKL) the operands are upcast one vocabulary slice at a time (WIDE_BYTES), at the
fp32 matmul's rate, and a half weight gradient's per-chunk product is rounded to the half dtype, as eager's is.
"""
from typing import NamedTuple, Optional

import torch

from ._common import kernels

SOFTMAX = "softmax"  # the kernel family whose row-statistics kernels every chunk runs
CHUNK_BYTES = 64 * 2**20  # most bytes of logits in one chunk, unless chunk_size says otherwise
WIDE_BYTES = 16 * 2**20  # most bytes of one vocabulary slice of a chunk's gradient upcast to a wider dtype


def chunk_rows(vocab: int, dtype: torch.dtype, chunk_size: Optional[int] = None) -> int:
    """Most token rows per chunk: `chunk_size` if given, else as many as keep a chunk of logits (in `dtype`, the
    compute dtype) in CHUNK_BYTES."""
    if chunk_size is not None:
        return chunk_size
    return max(1, CHUNK_BYTES // (vocab * dtype.itemsize))


def even_ranges(total, most):
    """[0, total) cut into the fewest ranges of at most `most`, whose sizes differ by at most one (no tiny
    last range: 8192 rows at most 667 a chunk are 13 chunks of 630 or 631, not 12 of 667 and one of 188)."""
    count = max(1, -(-total // most))
    bounds = [i * total // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def row_chunks(rows, most):
    """Chunks of consecutive token rows; a chunk is a tuple of [start, end) row ranges."""
    return [(bounds,) for bounds in even_ranges(rows, most)]


def sequence_chunks(bounds, most):
    """Chunks of whole sequences (bounds: cu_seqlens as a list): runs of consecutive sequences of at most `most`
    rows in all, a longer sequence alone in its chunk."""
    chunks = []
    start = last = bounds[0]
    for end in bounds[1:]:
        if end - start > most and last > start:  # the run so far is full: close it before this sequence
            chunks.append(((start, last),))
            start = last
        last = end
    if last > start or not chunks:
        chunks.append(((start, last),))
    return chunks


def rows_of(t, ranges):
    """The rows of one chunk: a view for one range, a copy for several (rows x hidden: small next to logits)."""
    if len(ranges) == 1:
        start, end = ranges[0]
        return t[start:end]
    return torch.cat([t[start:end] for start, end in ranges])


def put_rows(out, ranges, values):
    """out[rows of the chunk] = values (cast to out's dtype)."""
    offset = 0
    for start, end in ranges:
        out[start:end] = values[offset:offset + end - start]
        offset += end - start


class Projection(NamedTuple):
    """What every chunk shares: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64, and the dtype
    the matmuls run in (see the module docstring)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    inv_temperature: float
    ignore_index: int
    compute_dtype: torch.dtype


def _wider(dtype, than):
    return dtype.itemsize > than.itemsize


class GradientSums:
    """grad_hidden, grad_weight and grad_bias built chunk by chunk, in the inputs' dtypes; each one not wanted is
    an empty tensor. `weight` is the projection's weight in the compute dtype; `wide_gemm` is a kernel backend's
    wide_addmm_(out, a, b, beta) (out = beta out + a @ b, 16-bit a and b, fp32 out: products and sums in fp32),
    or None where it has none for the compute dtype."""

    def __init__(self, projection, want_grads, weight, wide_gemm=None):
        hidden, bias, compute = projection.hidden, projection.bias, projection.compute_dtype
        self.projection, self.compute_weight = projection, weight
        self.want_hidden, self.want_weight = want_grads[0], want_grads[1]
        self.want_bias = want_grads[2] and bias is not None
        # Summed in fp32 at least: each chunk adds one product, and the running sum adds no rounding of its own
        self.sum_dtype = torch.promote_types(projection.weight.dtype, torch.float32)
        self.wide_hidden = self.want_hidden and _wider(hidden.dtype, compute)
        self.wide_weight = self.want_weight and _wider(projection.weight.dtype, compute)
        self.hidden = torch.empty_like(hidden) if self.want_hidden else None  # every row is written by one chunk
        self.weight = self.bias = None  # the first chunk's contribution, then the running sum
        # The fp32 products the wide GEMM makes in one call each, accumulating inside the GEMM: no upcast copy,
        # no V x H temporary, no separate add (what is left goes slice by slice below)
        self.gemm_hidden = wide_gemm is not None and self.wide_hidden and hidden.dtype == torch.float32
        self.gemm_weight = (wide_gemm is not None and self.want_weight and self.sum_dtype == torch.float32
                            and compute != torch.float32)
        self.wide_gemm = wide_gemm
        # products summed into a wider dtype go slice by slice (no V x H temporary in the compute dtype)
        self.sliced = ((self.wide_hidden and not self.gemm_hidden)
                       or (self.want_weight and self.sum_dtype != compute and not self.gemm_weight))
        if self.want_weight and self.sum_dtype != compute and not self.gemm_weight:
            self.weight = torch.zeros(projection.weight.shape, dtype=self.sum_dtype, device=hidden.device)

    @property
    def wanted(self):
        return self.want_hidden or self.want_weight or self.want_bias

    def add(self, ranges, hidden, dlogits):
        """One chunk: hidden (C, H) its rows in the compute dtype, dlogits (C, V) the logits' gradient."""
        weight = self.compute_weight
        if self.sliced:
            self._add_by_vocab_slices(ranges, hidden, dlogits)
        if self.gemm_weight:
            first = self.weight is None
            if first:  # written whole by the first chunk (beta 0), so never zero-filled
                self.weight = torch.empty(self.projection.weight.shape, dtype=torch.float32, device=hidden.device)
            self.wide_gemm(self.weight, dlogits.t(), hidden, 0.0 if first else 1.0)
        elif self.want_weight and self.sum_dtype == dlogits.dtype:
            if self.weight is None:
                self.weight = dlogits.t() @ hidden
            else:
                self.weight.addmm_(dlogits.t(), hidden)  # accumulated inside the matmul: no V x H temporary
        if self.gemm_hidden:
            if len(ranges) == 1:
                self.wide_gemm(self.hidden[ranges[0][0]:ranges[0][1]], dlogits, weight, 0.0)
            else:
                rows = dlogits.new_empty(dlogits.shape[0], weight.shape[1], dtype=torch.float32)
                self.wide_gemm(rows, dlogits, weight, 0.0)
                put_rows(self.hidden, ranges, rows)
        elif self.want_hidden and not self.wide_hidden:
            if len(ranges) == 1 and self.hidden.dtype == dlogits.dtype:
                torch.mm(dlogits, weight, out=self.hidden[ranges[0][0]:ranges[0][1]])
            else:
                put_rows(self.hidden, ranges, dlogits @ weight)
        if self.want_bias:
            bias = dlogits.sum(0, dtype=self.sum_dtype)
            self.bias = bias if self.bias is None else self.bias.add_(bias)

    def _add_by_vocab_slices(self, ranges, hidden, dlogits):
        """The products that end in a wider dtype than the compute dtype and that the wide GEMM does not make,
        one vocabulary slice at a time (no temporary larger than a slice): a wide gradient's from upcast
        operands, a half weight's (summed in fp32) rounded to the compute dtype, as eager's is."""
        weight = self.compute_weight
        hidden_grad = self.wide_hidden and not self.gemm_hidden
        wide_weight = self.wide_weight and not self.gemm_weight
        weight_grad = self.want_weight and self.sum_dtype != dlogits.dtype and not self.gemm_weight
        wide = self.hidden.dtype if hidden_grad else self.sum_dtype
        hidden_rows = torch.zeros(hidden.shape, dtype=wide, device=hidden.device) if hidden_grad else None
        wide_hidden = hidden.to(wide) if wide_weight else None
        for start, end in even_ranges(dlogits.shape[1], max(1, WIDE_BYTES // (dlogits.shape[0] * wide.itemsize))):
            part = dlogits[:, start:end]
            wide_part = part.to(wide) if hidden_grad or wide_weight else None
            if hidden_grad:
                hidden_rows.addmm_(wide_part, weight[start:end].to(wide))
            if wide_weight:
                self.weight[start:end].addmm_(wide_part.t(), wide_hidden)
            elif weight_grad:
                self.weight[start:end] += part.t() @ hidden
        if hidden_grad:
            put_rows(self.hidden, ranges, hidden_rows)

    def result(self):
        projection = self.projection

        def final(grad, like):
            return like.new_empty(0) if grad is None else grad.to(like.dtype)

        bias_like = projection.bias if projection.bias is not None else projection.weight
        return (final(self.hidden, projection.hidden), final(self.weight, projection.weight),
                final(self.bias, bias_like))


def wide_gemm(backend, kernel_module, dtype):
    """The backend's 16-bit x 16-bit -> fp32 GEMM for dtype (see GradientSums), or None: the C++ backend has one
    where this torch has MKL's (x86 builds); elsewhere the fp32 products are torch matmuls, sliced."""
    if backend == "cpp" and dtype in (torch.bfloat16, torch.float16) and kernel_module.wide_matmul_available(dtype):
        return kernel_module.wide_addmm_
    return None


def run_chunks(backend, projection, chunks, on_chunk, *, want_sum=False, want_entropy=False, saved_lse=None,
               want_grads=(False, False, False)):
    """Walk `chunks`; per chunk compute the logits and their row statistics (or take lse from `saved_lse`),
    ask on_chunk(index, ranges, labels, lse, target, sum_z, entropy) for the coefficients (a, b, c, d) of the
    chunk's logit gradient, or None, and accumulate the wanted gradients. Returns (grad_hidden, grad_weight,
    grad_bias), empty where not wanted."""
    softmax_kernels = kernels(backend, SOFTMAX)
    hidden_all, _, _, labels_all, inv_temperature, ignore_index, dtype = projection
    weight, bias = (None if t is None else t.to(dtype) for t in projection[1:3])  # no copy when already in dtype
    grads = GradientSums(projection, want_grads, weight, wide_gemm(backend, softmax_kernels, dtype))
    # One logits buffer for every chunk: a fresh 128 MiB tensor costs ~50 ms of page faults on the CPU
    # (measured: 60 ms to allocate and fill, 10 ms to refill), as much as the softmax kernels themselves.
    most_rows = max(sum(end - start for start, end in ranges) for ranges in chunks)
    logits_buffer = hidden_all.new_empty(most_rows, weight.shape[0], dtype=dtype)
    for index, ranges in enumerate(chunks):
        hidden, labels = rows_of(hidden_all, ranges).to(dtype), rows_of(labels_all, ranges)
        logits = logits_buffer[:hidden.shape[0]]
        if bias is None:
            torch.mm(hidden, weight.t(), out=logits)
        else:
            torch.addmm(bias, hidden, weight.t(), out=logits)
        if saved_lse is None:
            stats = softmax_kernels.logit_stats_forward(logits, labels, inv_temperature, ignore_index, want_sum,
                                                        want_entropy)
        else:
            stats = (rows_of(saved_lse, ranges), None, None, None)
        coefficients = on_chunk(index, ranges, labels, *stats)
        if coefficients is None or not grads.wanted:
            continue
        # over the logits themselves: one chunk of (C, V) is all the head ever holds
        dlogits = softmax_kernels.logit_stats_backward(logits, labels, stats[0], *coefficients, inv_temperature,
                                                       out=logits)
        grads.add(ranges, hidden, dlogits)
    return grads.result()
