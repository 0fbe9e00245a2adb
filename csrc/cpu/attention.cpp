// Fused multi-head attention on the CPU (flash attention): forward and backward without ever holding the
// Tq x Tk matrix of scores.
//
//   out_i = sum_j softmax_j(scale * q_i . k_j) v_j   over the keys j visible from query i
//
// Queries are cut into tiles of kBlockQ rows and keys into tiles of kBlockK. A task owns one tile of one
// side and streams the other side's tiles through small per-thread buffers that stay in L1/L2.
//
// Forward, one task per (sequence, query head, query tile i) (FlashAttention-2, Dao 2023):
//   for each key tile j that some row of tile i can see:
//     S = Q_i K_j^T                                               tile GEMM
//     m' = max(m, rowmax(scale S));  P = exp(scale S - m')         masked scores are -inf, so P = 0 there
//     l = l exp(m - m') + rowsum(P);  O = O exp(m - m') + P V_j    tile GEMM
//   out_i = O / l and lse_i = m + log l, saved for the backward. A row that sees no key keeps l = 0: its
//   output is 0 and its lse -inf, never NaN.
//
// Backward, Delta_i = rowsum(dO_i * out_i) - dlse_i first (dlse: the gradient reaching lse, usually absent);
// then one task per (sequence, kv head, chunk of key tiles), which for each key tile j, each query head of
// the group and each query tile i that sees tile j recomputes
//     P = exp(scale Q_i K_j^T - lse_i),  dP = dO_i V_j^T,  dS = P (dP - Delta_i)
//     dV_j += P^T dO_i;  dK_j += dS^T Q_i;  dQ_i += dS K_j        (scale applied once, at the end)
// dK_j and dV_j live in the task's buffers and are written once; dQ_i is added into the task's own double
// partial dQ (one per key chunk), and a last pass sums the partials in chunk order. No atomics and nothing
// that depends on which thread runs what: the gradients have the same bits on every run.
//
// Cost for B sequences of T queries and T keys, H query heads, head dim D (causal: half of each):
//   FLOPs  forward 4 B H T^2 D (two GEMMs);  backward 10 B H T^2 D (five GEMMs: S, dP, dV, dK, dQ)
//   exp    B H T^2 in the forward and again in the backward
//   memory beyond inputs, outputs and gradients, all linear in T: the forward's fp32 copies of K^T and V
//   (2 B T H_kv D'); the backward's double partial dQ sums (n_chunks B T H D', n_chunks = 1 once
//   B x H_kv >= kMinBackwardTasks) and Delta (B H T); per thread, tiles of at most ~0.5 MiB. D' is D
//   rounded up to kPad.
//
// fp32 and fp64 compute in their own type. bf16 and fp16 run in 16-bit tiles on ATen's brgemm (oneDNN's
// micro-kernels: AMX on Sapphire Rapids and later; not with oneDNN capped at avx512_core_bf16) where this CPU's oneDNN
// has them, unless the GEMM engine is set to "registers" (set_attention_gemm, FASTLLM_CPU_ATTENTION_GEMM):
// products of the inputs' own values summed in fp32; the forward's P to P V rounded to the input dtype, as
// SDPA's is; the backward's P to dV and dS to dQ as two 16-bit parts (high + low, ~16 mantissa bits), dS to dK
// rounded (attention_forward_16bit_kernel, the kVnni backward: why). Elsewhere they are converted to fp32 on loading a
// tile, and every fp32 tile GEMM runs on fastllm's register micro-kernel (attention.h, GemmEngine: why).
// Against SDPA on a grid of shapes, dtypes and masks (2 threads): bench/RESULTS.md, peers-attention, measured
// with bench/attention_grid.py and bench/cases/attention.py.
//
// Files: attention.h (tile sizes, the tile GEMMs and engines, VNNI-2 packing, row helpers, geometry, the task
// scheduler), attention_forward.cpp (the tiled forward), attention_decode.cpp (decode, and the dense one-call
// entry), attention_backward.cpp (backward), and this one (sequence boundaries and the argument checks shared by
// the entry points).
#include "attention.h"

namespace fastllm {
namespace attention_cpu {

namespace {
std::atomic<GemmEngine> current_gemm_engine{GemmEngine::kBlas};
}  // namespace

GemmEngine gemm_engine() { return current_gemm_engine.load(std::memory_order_relaxed); }

// The checked sequence boundaries of one call, from cu_seqlens (packed batches) or from the tensor shapes
// (dense batches: every sequence has max_seqlen queries and keys).
std::vector<Sequence> sequences(const char* op, const torch::Tensor& q, const torch::Tensor& k,
                                const std::optional<torch::Tensor>& cu_seqlens_q,
                                const std::optional<torch::Tensor>& cu_seqlens_k,
                                const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, int64_t window_left, int64_t window_right) {
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
  const auto check_offsets = [&](const char* name, const std::optional<torch::Tensor>& cu, int64_t tokens) {
    if (!cu) return;
    TORCH_CHECK(cu->device().is_cpu() && cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() &&
                    cu->size(0) >= 1,
                op, ": ", name, " must be a contiguous 1-D int32 CPU tensor of batch + 1 offsets, got ",
                cu->scalar_type(), " of shape ", cu->sizes());
    const int32_t* offsets = cu->data_ptr<int32_t>();
    TORCH_CHECK(offsets[0] == 0, op, ": ", name, "[0] must be 0, got ", offsets[0]);
    TORCH_CHECK(offsets[cu->size(0) - 1] == tokens, op, ": ", name, "[-1] must be the number of tokens, ", tokens,
                ", got ", offsets[cu->size(0) - 1]);
  };
  check_offsets("cu_seqlens_q", cu_seqlens_q, q.size(0));
  check_offsets("cu_seqlens_k", cu_seqlens_k, k.size(0));
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
              ": cu_seqlens_q and cu_seqlens_k must be given together");
  int64_t batch;
  if (cu_seqlens_q) {
    batch = cu_seqlens_q->size(0) - 1;
    TORCH_CHECK(cu_seqlens_k->size(0) == batch + 1, op, ": cu_seqlens_k must have ", batch + 1,
                " entries (as cu_seqlens_q), got ", cu_seqlens_k->size(0));
  } else {
    TORCH_CHECK(max_seqlen_q > 0 && max_seqlen_k >= 0 && q.size(0) % max_seqlen_q == 0, op,
                ": without cu_seqlens, q must hold whole sequences of max_seqlen_q = ", max_seqlen_q, " tokens, got ",
                q.size(0));
    batch = q.size(0) / max_seqlen_q;
    TORCH_CHECK(k.size(0) == batch * max_seqlen_k, op, ": without cu_seqlens, k must hold ", batch,
                " sequences of max_seqlen_k = ", max_seqlen_k, " tokens, got ", k.size(0));
  }
  if (seqused_k) {
    TORCH_CHECK(seqused_k->device().is_cpu() && seqused_k->scalar_type() == at::kInt && seqused_k->dim() == 1 &&
                    seqused_k->is_contiguous() && seqused_k->size(0) == batch,
                op, ": seqused_k must be a contiguous 1-D int32 CPU tensor of ", batch, " lengths, got ",
                seqused_k->scalar_type(), " of shape ", seqused_k->sizes());
  }
  std::vector<Sequence> result(batch);
  for (int64_t b = 0; b < batch; ++b) {
    Sequence& seq = result[b];
    if (cu_seqlens_q) {
      const int32_t* cu_q = cu_seqlens_q->data_ptr<int32_t>();
      const int32_t* cu_k = cu_seqlens_k->data_ptr<int32_t>();
      seq.q_start = cu_q[b];
      seq.q_len = cu_q[b + 1] - cu_q[b];
      seq.k_start = cu_k[b];
      seq.k_len = cu_k[b + 1] - cu_k[b];
      TORCH_CHECK(seq.q_len >= 0 && seq.q_len <= max_seqlen_q, op, ": sequence ", b, " has ", seq.q_len,
                  " queries (cu_seqlens_q must be non-decreasing and differ by at most max_seqlen_q = ", max_seqlen_q,
                  ")");
      TORCH_CHECK(seq.k_len >= 0 && seq.k_len <= max_seqlen_k, op, ": sequence ", b, " has ", seq.k_len,
                  " keys (cu_seqlens_k must be non-decreasing and differ by at most max_seqlen_k = ", max_seqlen_k,
                  ")");
    } else {
      seq.q_start = b * max_seqlen_q;
      seq.q_len = max_seqlen_q;
      seq.k_start = b * max_seqlen_k;
      seq.k_len = max_seqlen_k;
    }
    if (seqused_k) {
      const int64_t used = seqused_k->data_ptr<int32_t>()[b];
      TORCH_CHECK(used >= 0 && used <= seq.k_len, op, ": seqused_k[", b, "] = ", used, " must be in [0, ",
                  seq.k_len, "]");
      seq.k_len = used;
    }
    seq.window_left = window_left;
    seq.window_right = window_right;
  }
  return result;
}

void check_tokens(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& like,
                  bool contiguous) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (tokens, heads, head_dim), got shape ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op, ": ",
              name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(dtype == like.scalar_type(), op, ": ", name, " must have q's dtype ", like.scalar_type(), ", got ", dtype);
  TORCH_CHECK(t.size(2) == like.size(2), op, ": ", name, " must have q's head_dim ", like.size(2), ", got ", t.size(2));
}

Shape check_qkv(const char* op, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                bool contiguous_kv) {
  check_tokens(op, "q", q, q);
  check_tokens(op, "k", k, q, contiguous_kv);
  check_tokens(op, "v", v, q, contiguous_kv);
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  const int64_t heads_q = q.size(1), heads_kv = k.size(1);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": q's heads (", heads_q,
              ") must be a multiple of k's heads (", heads_kv, ")");
  return {heads_q, heads_kv, heads_q / heads_kv, q.size(2), round_up(q.size(2), kPad)};
}

void check_softmax_scale(const char* op, double softmax_scale) {
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, op,
              ": softmax_scale must be a positive finite number, got ", softmax_scale);
}

}  // namespace attention_cpu
std::string set_attention_gemm(const std::string& engine) {
  using attention_cpu::GemmEngine;
  TORCH_CHECK(engine == "blas" || engine == "registers", "set_attention_gemm: engine must be 'blas' or 'registers', got '",
              engine, "'");
  const GemmEngine previous = attention_cpu::current_gemm_engine.exchange(
      engine == "blas" ? GemmEngine::kBlas : GemmEngine::kRegisters);
  return previous == GemmEngine::kBlas ? "blas" : "registers";
}

}  // namespace fastllm
