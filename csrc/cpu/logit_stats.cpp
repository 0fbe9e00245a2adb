// Row statistics of temperature-scaled logits on the CPU (log-sum-exp, target logit, sum, entropy) and their
// shared backward: behind token log-probs, cross entropy, entropy bonuses and the fused linear heads (row
// machinery: softmax_rows.h).
#include "fastllm.h"
#include "cpu/softmax_rows.h"

namespace fastllm {
namespace {

using at::vec::Vectorized;
using namespace softmax_rows;

template <typename scalar_t, bool kWantSum, bool kWantEntropy>
void logit_stats_forward_kernel(const scalar_t* x, int64_t rows, int64_t cols, const int64_t* labels,
                                int64_t ignore_index, double inv_temperature, double* lse_out,
                                float* target_out, float* sum_out, float* entropy_out) {
  using acc_t = at::opmath_type<scalar_t>;
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * cols;
      OnlineSoftmax<acc_t> stats(static_cast<acc_t>(inv_temperature));
      WideSum sum_x;
      for_each_chunk(row, cols, kNegInf<acc_t>, buf, [&](const Chunk<acc_t>& chunk) {
        if constexpr (kWantSum) sum_x.add(chunk.data, chunk.n);  // the n real entries only: the pad is -inf
        stats.template add_chunk<kWantEntropy>(chunk);
      });
      lse_out[r] = stats.lse();
      // labels were range-checked up front
      const bool has_target = labels != nullptr && labels[r] != ignore_index;
      target_out[r] = has_target ? static_cast<float>(static_cast<double>(row[labels[r]]) * inv_temperature) : 0.f;
      if constexpr (kWantSum) sum_out[r] = static_cast<float>(sum_x.total() * inv_temperature);
      if constexpr (kWantEntropy) entropy_out[r] = static_cast<float>(stats.entropy());
    }
  });
}

// Per-row coefficients of dx = s * (p * (a + b * (z - lse)) + c * onehot(label) + d); each may be absent (null).
struct RowCoefficients {
  const float* a;
  const float* b;
  const float* c;
  const float* d;
};

template <typename scalar_t>
void logit_stats_backward_kernel(const scalar_t* x, int64_t rows, int64_t cols, const int64_t* labels,
                                 const double* lse, RowCoefficients coef, double inv_temperature, scalar_t* dx,
                                 bool stream_dx) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const acc_t s = static_cast<acc_t>(inv_temperature);
  const auto coefficient = [s](const float* values, int64_t r) {
    return values == nullptr ? acc_t(0) : s * static_cast<acc_t>(values[r]);
  };
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * cols;
      scalar_t* dx_row = dx + r * cols;
      // dx = p * (s a) + (p * s b) * w + s d (+ s c at the label), with w = z - lse and p = exp(w).
      // lse is split into acc_t high and low parts and w = (z - hi) - lo: z - hi is exact where p matters
      // (z within 2x of lse), so log p keeps fp32's relative accuracy even when |lse| >> |log p|, as
      // PyTorch's (z - max) - log(sum) does; z - fp32(lse) would err by ulp(lse) (1e-3 at logits of 1e4).
      const acc_t sa = coefficient(coef.a, r), sb = coefficient(coef.b, r);
      const acc_t sc = coefficient(coef.c, r), sd = coefficient(coef.d, r);
      const acc_t lse_hi = static_cast<acc_t>(lse[r]);
      const acc_t lse_lo = static_cast<acc_t>(lse[r] - static_cast<double>(lse_hi));
      const Vec vs(s), vsa(sa), vsb(sb), vsd(sd), vlse_hi(lse_hi), vlse_lo(lse_lo), vlowest(lowest);
      const bool stream = stream_row(stream_dx, dx_row);
      // Read before the row is written: dx may be x itself (each staged chunk is read before it is stored).
      const int64_t label = labels == nullptr ? -1 : labels[r];
      const bool has_label = label >= 0 && label < cols;
      const acc_t label_logit = has_label ? static_cast<acc_t>(row[label]) : acc_t(0);
      for_each_chunk(row, cols, kNegInf<acc_t>, buf, [&](const Chunk<acc_t>& chunk) {
        store_chunk(dx_row + chunk.begin, chunk.n, [&](int64_t i) {
          // z rounded to acc_t, exactly as in the forward's max and exp passes.
          const Vec w = (Vec::loadu(chunk.data + i) * vs - vlse_hi) - vlse_lo;
          const Vec p = vec_exp_accurate(w);
          // (p * s b) * max(w, lowest): p = 0 at w = -inf gives 0, not 0 * -inf = NaN.
          return at::vec::fmadd(p * vsb, at::vec::clamp_min(w, vlowest), at::vec::fmadd(p, vsa, vsd));
        }, stream);
      });
      // The one-hot term goes into the label's gradient before rounding, not onto its rounded value.
      if (has_label) {
        const acc_t w = (label_logit * s - lse_hi) - lse_lo;
        const acc_t p = std::exp(w);
        dx_row[label] = static_cast<scalar_t>(std::fma(p * sb, std::max(w, lowest), std::fma(p, sa, sd)) + sc);
      }
    }
    if (stream_dx) streaming_fence();
  });
}

// ---- argument checks ----

// A per-row vector of shape (rows,); returned contiguous (it is small, and a broadcast scalar is fine).
torch::Tensor checked_row_vector(const torch::Tensor& t, int64_t rows, at::ScalarType dtype, const char* op,
                                 const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (", rows, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  return t.contiguous();
}

std::optional<torch::Tensor> checked_row_vector(const std::optional<torch::Tensor>& t, int64_t rows,
                                                at::ScalarType dtype, const char* op, const char* name) {
  if (!t.has_value()) return std::nullopt;
  return checked_row_vector(*t, rows, dtype, op, name);
}

template <typename T>
const T* data_or_null(const std::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Every label must be ignore_index or a column: it is used as an index into the row.
void check_label_range(const torch::Tensor& labels, int64_t cols, int64_t ignore_index) {
  const int64_t* values = labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < labels.numel(); ++r) {
    const int64_t label = values[r];
    TORCH_CHECK(label == ignore_index || (label >= 0 && label < cols), "label ", label, " at position ", r,
                " is out of range for ", cols, " classes (expected 0 <= label < ", cols,
                " or label == ignore_index = ", ignore_index, ")");
  }
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> logit_stats_forward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& labels, double inv_temperature,
    int64_t ignore_index, bool want_sum, bool want_entropy) {
  constexpr const char* op = "logit_stats_forward";
  check_matrix(x, op, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto checked_labels = checked_row_vector(labels, rows, at::kLong, op, "labels");
  if (checked_labels.has_value()) check_label_range(*checked_labels, cols, ignore_index);

  const auto stat = [&](bool wanted) { return x.new_empty({wanted ? rows : 0}, x.options().dtype(at::kFloat)); };
  auto lse = x.new_empty({rows}, x.options().dtype(at::kDouble));
  auto target = stat(true), sum_z = stat(want_sum), entropy = stat(want_entropy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    // The wanted statistics are compile-time flags so the hot loop carries no dead work.
    using Kernel = decltype(&logit_stats_forward_kernel<scalar_t, false, false>);
    const Kernel kernels[2][2] = {
        {logit_stats_forward_kernel<scalar_t, false, false>, logit_stats_forward_kernel<scalar_t, false, true>},
        {logit_stats_forward_kernel<scalar_t, true, false>, logit_stats_forward_kernel<scalar_t, true, true>}};
    kernels[want_sum][want_entropy](x.data_ptr<scalar_t>(), rows, cols, data_or_null<int64_t>(checked_labels),
                                    ignore_index, inv_temperature, lse.data_ptr<double>(), target.data_ptr<float>(),
                                    want_sum ? sum_z.data_ptr<float>() : nullptr,
                                    want_entropy ? entropy.data_ptr<float>() : nullptr);
  });
  return {lse, target, sum_z, entropy};
}

torch::Tensor logit_stats_backward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& labels, const torch::Tensor& lse,
    const torch::Tensor& a, const std::optional<torch::Tensor>& b, const std::optional<torch::Tensor>& c,
    const std::optional<torch::Tensor>& d, double inv_temperature, const std::optional<torch::Tensor>& out) {
  constexpr const char* op = "logit_stats_backward";
  check_matrix(x, op, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  // Out-of-range labels (ignore_index) just get no one-hot term, so they need no range check.
  const auto checked_labels = checked_row_vector(labels, rows, at::kLong, op, "labels");
  const auto checked_lse = checked_row_vector(lse, rows, at::kDouble, op, "lse");
  const auto checked_a = checked_row_vector(a, rows, at::kFloat, op, "a");
  const auto checked_b = checked_row_vector(b, rows, at::kFloat, op, "b");
  const auto checked_c = checked_row_vector(c, rows, at::kFloat, op, "c");
  const auto checked_d = checked_row_vector(d, rows, at::kFloat, op, "d");
  const RowCoefficients coef{checked_a.data_ptr<float>(), data_or_null<float>(checked_b),
                             data_or_null<float>(checked_c), data_or_null<float>(checked_d)};

  torch::Tensor dx;
  if (out.has_value()) {
    dx = *out;
    TORCH_CHECK(dx.device().is_cpu() && dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type() &&
                    dx.is_contiguous(),
                op, ": out must be a contiguous CPU tensor of x's shape ", x.sizes(), " and dtype ", x.scalar_type(),
                ", got device ", dx.device(), ", shape ", dx.sizes(), ", dtype ", dx.scalar_type(),
                ", contiguous ", dx.is_contiguous());
  } else {
    dx = torch::empty_like(x);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    logit_stats_backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), rows, cols, data_or_null<int64_t>(checked_labels),
                                          checked_lse.data_ptr<double>(), coef, inv_temperature,
                                          dx.data_ptr<scalar_t>(), streaming_output(dx));
  });
  return dx;
}


}  // namespace fastllm
