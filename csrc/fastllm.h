// Declarations of every CPU op, one block per op family; bindings.cpp exposes them to Python.
// All inputs arrive from fastllm.ops already validated for shape, dtype and device, as contiguous
// 2-D (rows, cols) tensors; the kernels still check what they index (labels) and fail with a
// clear error rather than read out of bounds.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace fastllm {

// ---- softmax family (cpu/softmax.cpp, cpu/logit_stats.cpp) ----
torch::Tensor softmax_forward(const torch::Tensor& x, bool log);
torch::Tensor softmax_backward(const torch::Tensor& dy, const torch::Tensor& y, bool log);
torch::Tensor row_argmax(const torch::Tensor& x);

// Row statistics of z = x * inv_temperature: (lse, target, sum_z, entropy) of shape (rows,), lse in fp64 (so
// that z - lse keeps its low bits when |lse| is large, see the backward), the others fp32. target is z[label]
// (0 where label == ignore_index); sum_z and entropy are empty unless asked for.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> logit_stats_forward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& labels, double inv_temperature,
    int64_t ignore_index, bool want_sum, bool want_entropy);

// dx = inv_temperature * (p * (a + b * (z - lse)) + c * onehot(label) + d), p = exp(z - lse); lse fp64 from
// the forward, per-row fp32 coefficients, b/c/d optional (absent = 0). Labels outside [0, cols) get no one-hot
// term. Written into `out` if given, which may be x itself.
torch::Tensor logit_stats_backward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& labels, const torch::Tensor& lse,
    const torch::Tensor& a, const std::optional<torch::Tensor>& b, const std::optional<torch::Tensor>& c,
    const std::optional<torch::Tensor>& d, double inv_temperature, const std::optional<torch::Tensor>& out);

// out = beta * out + a @ b for bf16 or fp16 a and b (2-D, rows or columns contiguous) and a float32 out with
// contiguous rows, products and sums in fp32 (cpu/wide_matmul.cpp: the fused linear heads' fp32 gradients).
// wide_matmul_available(dtype) says whether this torch has the GEMM for dtype; wide_addmm_ fails without it.
bool wide_matmul_available(torch::ScalarType dtype);
void wide_addmm_(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b, double beta);

// ---- norm family (cpu/norm.cpp) ----
// LayerNorm (rms=false) or RMSNorm (rms=true) over the last dimension of x (rows, cols), with an optional
// fused residual add: h = x + residual (rounded to x's dtype) is normalized and returned as residual_out.
// y = (h - mean) * rstd * (offset + weight) + bias; a missing weight scales by 1, a missing bias adds 0.
// weight and bias have x's dtype or float32. Returns (y, residual_out, mean, rstd): residual_out is empty
// without a residual, mean is empty for RMSNorm; mean and rstd are (rows,) in float32 (float64 for float64 x).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> norm_forward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& residual, const std::optional<torch::Tensor>& weight,
    const std::optional<torch::Tensor>& bias, double eps, double offset, bool rms);

// Gradients of norm_forward given dy (and d_residual_out, the gradient reaching residual_out, added to dx);
// h is the normalized input (x, or residual_out). Returns (dx, dweight, dbias): dweight/dbias are (cols,)
// in mean's dtype, empty unless wanted, and have the same bits on every run.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> norm_backward(
    const torch::Tensor& dy, const std::optional<torch::Tensor>& d_residual_out, const torch::Tensor& h,
    const std::optional<torch::Tensor>& weight, const torch::Tensor& mean, const torch::Tensor& rstd,
    double offset, bool rms, bool want_weight_grad, bool want_bias_grad);

// Outputs of at least this many bytes are written with streaming (non-temporal) stores by the norm and softmax
// kernels (cpu/streaming.h), when their memory is already mapped in (reused, not freshly mmapped); -1 (the
// default) means 3/4 of the last-level cache. Returns the previous setting. For tests and tuning.
int64_t set_streaming_store_threshold(int64_t bytes);

// ---- attention family (cpu/attention.cpp) ----
// Fused (flash) attention over packed sequences. q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv,
// head_dim), heads_q a multiple of heads_kv; contiguous, one float dtype. Sequence b owns query rows
// [cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows [cu_seqlens_k[b], cu_seqlens_k[b] + len_k), len_k =
// seqused_k[b] if given, else cu_seqlens_k[b+1] - cu_seqlens_k[b]; without cu_seqlens (int32, given together)
// every sequence has max_seqlen_q queries and max_seqlen_k keys. Queries are aligned to the end of their keys:
// query i of a sequence sees key j iff i + len_k - len_q - window_left <= j <= i + len_k - len_q + window_right,
// a bound of -1 being absent (causal: window_right = 0). Returns (out like q, lse of shape (heads_q, total_q)
// in float64 for every input dtype, for the backward's accuracy); a row that sees no key gets out = 0 and
// lse = -inf.
std::tuple<torch::Tensor, torch::Tensor> attention_forward(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const std::optional<torch::Tensor>& cu_seqlens_q, const std::optional<torch::Tensor>& cu_seqlens_k,
    const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right);

// attention_forward on the public ops' dense layout, in one call (a decode step's kernel over 128 positions takes
// less time than the Python views, copies and int32 lengths it saves): q (batch, seqlen_q, heads_q, head_dim), k
// and v (batch, seqlen_k, heads_kv, head_dim), any strides (copied if not contiguous); kv_lengths, if given,
// (batch,) int32 or int64, sequence b attending to its first kv_lengths[b] keys (a KV cache), else to all.
// Returns (out (batch, seqlen_q, heads_q, head_dim), lse (heads_q, batch * seqlen_q) float64).
std::tuple<torch::Tensor, torch::Tensor> attention_dense(const torch::Tensor& q, const torch::Tensor& k,
                                                         const torch::Tensor& v,
                                                         const std::optional<torch::Tensor>& kv_lengths,
                                                         double softmax_scale, int64_t window_left,
                                                         int64_t window_right);

// The engine of the attention's bf16 and fp16 tile GEMMs: "blas" (the default: 16-bit tiles on ATen's brgemm,
// oneDNN's micro-kernels for this CPU where it has them, AMX; elsewhere the fp32 tiles) or "registers" (fp32
// tiles on fastllm's own register-blocked micro-kernel, which fp32 and fp64 always use). Also set by
// FASTLLM_CPU_ATTENTION_GEMM (fastllm/_cpp.py; bench/RESULTS.md). Returns the previous engine.
std::string set_attention_gemm(const std::string& engine);

// Gradients (dq, dk, dv) of attention_forward given dout and, optionally, dlse (the gradient reaching lse,
// shaped as lse). Deterministic: the same bits on every run.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> attention_backward(
    const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& out, const torch::Tensor& lse, const std::optional<torch::Tensor>& dlse,
    const std::optional<torch::Tensor>& cu_seqlens_q, const std::optional<torch::Tensor>& cu_seqlens_k,
    const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right);

// ---- gae family (cpu/gae.cpp) ----
// Generalised advantage estimation over (batch, steps) rewards and values of one float dtype and a bool mask of
// valid steps: per sequence, a reverse scan that skips masked steps, so the value past a sequence's last valid
// step is 0. Returns (advantages, returns = advantages + values) in the input dtype, 0 at masked steps.
std::tuple<torch::Tensor, torch::Tensor> gae_forward(const torch::Tensor& rewards, const torch::Tensor& values,
                                                     const torch::Tensor& mask, double gamma, double lam);

}  // namespace fastllm
