// softmax and log_softmax on the CPU, forward and backward (row machinery: softmax_rows.h).
#include "fastllm.h"
#include "cpu/softmax_rows.h"

#include <array>
#include <vector>

namespace fastllm {
namespace {

using at::vec::Vectorized;
using namespace softmax_rows;

// Rows of up to this many columns keep their exponentials in a per-thread acc_t buffer (256 KiB of fp32,
// in L2), so softmax takes exp once per element, as ATen's does; longer rows take it again in the output pass.
constexpr int64_t kMaxBufferedCols = 1 << 16;

// softmax of rows that fit the buffer: one online pass stores e = exp(x - m) per chunk, m being the running
// max when the chunk was seen; the output pass scales each chunk by exp(m - max) / sum. A chunk seen at the
// final max is scaled by exactly the 1 / sum of the two-pass kernel, so its outputs are the same bits.
template <typename scalar_t>
void softmax_forward_buffered_kernel(const scalar_t* x, int64_t rows, int64_t cols, scalar_t* y, bool stream_y) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t chunks = (cols + kChunk - 1) / kChunk;
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) acc_t buf[kChunk];
    std::vector<acc_t> exps(chunks * kChunk);
    std::vector<acc_t> seen_max(chunks);
    for (int64_t r = row_begin; r < row_end; ++r) {
      OnlineSoftmax<acc_t> stats(1);
      for_each_chunk(x + r * cols, cols, kNegInf<acc_t>, buf, [&](const Chunk<acc_t>& chunk) {
        stats.template add_chunk<false, true>(chunk, exps.data() + chunk.begin);
        seen_max[chunk.begin / kChunk] = stats.max;
      });
      // An all -inf row: max - max = NaN and 1 / 0 = inf, so every output is NaN (0 * inf), as in PyTorch.
      const double inv_total = 1 / stats.sum_exp;
      scalar_t* y_row = y + r * cols;
      const bool stream = stream_row(stream_y, y_row);
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t begin = c * kChunk;
        const acc_t scale = seen_max[c] == stats.max
                                ? static_cast<acc_t>(inv_total)
                                : static_cast<acc_t>(std::exp(static_cast<double>(seen_max[c]) - stats.max) * inv_total);
        const Vec vscale(scale);
        const acc_t* e = exps.data() + begin;
        store_chunk(y_row + begin, std::min(kChunk, cols - begin), [&](int64_t i) { return Vec::loadu(e + i) * vscale; },
                    stream);
      }
    }
    if (stream_y) streaming_fence();
  });
}

template <typename scalar_t, bool kLog>
void softmax_forward_kernel(const scalar_t* x, int64_t rows, int64_t cols, scalar_t* y, bool stream_y) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  if constexpr (!kLog) {
    if (cols <= kMaxBufferedCols) return softmax_forward_buffered_kernel(x, rows, cols, y, stream_y);
  }
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * cols;
      OnlineSoftmax<acc_t> stats(1);
      for_each_chunk(row, cols, kNegInf<acc_t>, buf,
                     [&](const Chunk<acc_t>& chunk) { stats.template add_chunk<false>(chunk); });
      // An all -inf row has max = -inf and sum 0: x - max = NaN, so both results are NaN, as in PyTorch.
      const Vec vmax(stats.max);
      const Vec log_total(static_cast<acc_t>(std::log(stats.sum_exp)));
      const Vec inv_total(static_cast<acc_t>(1 / stats.sum_exp));
      scalar_t* y_row = y + r * cols;
      const bool stream = stream_row(stream_y, y_row);
      for_each_chunk(row, cols, kNegInf<acc_t>, buf, [&](const Chunk<acc_t>& chunk) {
        store_chunk(y_row + chunk.begin, chunk.n, [&](int64_t i) {
          const Vec shifted = Vec::loadu(chunk.data + i) - vmax;
          if constexpr (kLog) return shifted - log_total;
          else return vec_exp(shifted) * inv_total;
        }, stream);
      });
    }
    if (stream_y) streaming_fence();
  });
}

// A row of scalar_t read and written a whole vector of scalar_t at a time, held in acc_t registers: one
// Vec for fp32/fp64, two for fp16/bf16, widened and narrowed in registers. (Staging half-precision rows
// through an L1 buffer, as the forward does, costs a store and a reload per element: the bf16 softmax
// backward was 1.4x slower than ATen's that way.) A ragged last vector loads with zeros past the row's end.
template <typename scalar_t>
struct RowVector {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kParts = std::is_same_v<scalar_t, acc_t> ? 1 : 2;
  static constexpr int64_t kWidth = Vectorized<scalar_t>::size();
  std::array<Vec, kParts> part;

  static RowVector load(const scalar_t* p, int64_t count) {
    const auto v = count == kWidth ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, count);
    if constexpr (kParts == 1) {
      return {{v}};
    } else {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
      return {{lo, hi}};
    }
  }

  static void store(scalar_t* p, const RowVector& v, int64_t count, bool stream) {
    Vectorized<scalar_t> narrow;
    if constexpr (kParts == 1) narrow = v.part[0];
    else narrow = at::vec::convert_from_float<scalar_t>(v.part[0], v.part[1]);
    count == kWidth ? store_vector(p, narrow, stream) : narrow.store(p, count);
  }
};

// softmax:     dx = y * (dy - sum(dy * y))
// log_softmax: dx = dy - exp(y) * sum(dy)
// The sum is taken in kChains acc_t vectors per kChunk columns, each chunk's folded into a double row total,
// as in OnlineSoftmax; the second pass re-reads dy and y from L2.
template <typename scalar_t, bool kLog>
void softmax_backward_kernel(const scalar_t* dy, const scalar_t* y, int64_t rows, int64_t cols, scalar_t* dx,
                             bool stream_dx) {
  using R = RowVector<scalar_t>;
  using Vec = typename R::Vec;
  using acc_t = typename R::acc_t;
  constexpr int64_t W = R::kWidth;
  constexpr int kSteps = kChains / R::kParts;  // vectors of scalar_t per group, one accumulator per part
  static_assert(kChunk % (W * kSteps) == 0, "a chunk is whole groups");
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* dy_row = dy + r * cols;
      const scalar_t* y_row = y + r * cols;
      const auto term = [&](int64_t i, int64_t count, Vec* sums) {
        const R dyv = R::load(dy_row + i, count);
        if constexpr (kLog) {
          for (int j = 0; j < R::kParts; ++j) sums[j] = sums[j] + dyv.part[j];
        } else {
          const R yv = R::load(y_row + i, count);
          for (int j = 0; j < R::kParts; ++j) sums[j] = at::vec::fmadd(dyv.part[j], yv.part[j], sums[j]);
        }
      };
      double row_sum = 0;
      for (int64_t begin = 0; begin < cols; begin += kChunk) {
        const int64_t end = std::min(cols, begin + kChunk);
        Vec sums[kChains];
        for (auto& sum : sums) sum = Vec(0);
        int64_t i = begin;
        for (; i + kSteps * W <= end; i += kSteps * W) {
          for (int step = 0; step < kSteps; ++step) term(i + step * W, W, sums + step * R::kParts);
        }
        for (; i < end; i += W) term(i, std::min(W, end - i), sums);
        row_sum += reduce_sum_wide(combine(sums, [](Vec a, Vec b) { return a + b; }));
      }
      const Vec total(static_cast<acc_t>(row_sum));
      scalar_t* dx_row = dx + r * cols;
      const bool stream = stream_row(stream_dx, dx_row);
      for (int64_t i = 0; i < cols; i += W) {
        const int64_t count = std::min(W, cols - i);
        const R dyv = R::load(dy_row + i, count), yv = R::load(y_row + i, count);
        R dxv;
        for (int j = 0; j < R::kParts; ++j) {
          if constexpr (kLog) dxv.part[j] = at::vec::fnmadd(vec_exp(yv.part[j]), total, dyv.part[j]);  // one rounding
          else dxv.part[j] = yv.part[j] * (dyv.part[j] - total);
        }
        R::store(dx_row + i, dxv, count, stream);
      }
    }
    if (stream_dx) streaming_fence();
  });
}

// The index of each row's largest value, the first of equals, a NaN counting as the largest (torch.argmax's
// rule): greedy decoding's pick. ATen's CPU argmax takes 1.3 ns an element on one core (320 us for 8 x 32000
// fp32 logits, a decode step's norms and attention together), 13x its amax. Here one pass of vector maxima
// finds the first L1-staged chunk holding the row's largest value (or its first NaN), and a vector search of
// that chunk alone finds the index.
template <typename scalar_t>
void row_argmax_kernel(const scalar_t* x, int64_t rows, int64_t cols, int64_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int kAllLanes = (1 << Vec::size()) - 1;
  parallel_rows(rows, cols, [&](int64_t row_begin, int64_t row_end) {
    alignas(64) acc_t buf[kChunk];
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* row = x + r * cols;
      acc_t best = kNegInf<acc_t>;
      int64_t best_chunk = 0;  // an all -inf row: index 0, in chunk 0
      for_each_chunk(row, cols, kNegInf<acc_t>, buf, [&](const Chunk<acc_t>& chunk) {
        if (std::isnan(best)) return;  // the first NaN is found: nothing later counts
        Vec max(kNegInf<acc_t>);  // the padding is -inf: never above a value
        for (int64_t i = 0; i < chunk.padded_n; i += Vec::size()) {
          max = at::vec::maximum(max, Vec::loadu(chunk.data + i));
        }
        const acc_t chunk_max = reduce_max(max);  // NaN if the chunk holds one
        if (std::isnan(chunk_max) || chunk_max > best) best = chunk_max, best_chunk = chunk.begin;
      });
      const int64_t n = std::min(kChunk, cols - best_chunk);
      const acc_t* data = stage_chunk(row + best_chunk, n, kNegInf<acc_t>, buf);
      const Vec target(best);
      int64_t found = best_chunk;
      for (int64_t i = 0; i < n; i += Vec::size()) {
        const Vec v = Vec::loadu(data + i);
        // zero_mask: the lanes where the comparison is false
        const int hits = ~(std::isnan(best) ? (v != v) : (v == target)).zero_mask() & kAllLanes;
        if (hits != 0) {
          found = best_chunk + i + __builtin_ctz(hits);
          break;
        }
      }
      out[r] = found;
    }
  });
}

}  // namespace

torch::Tensor row_argmax(const torch::Tensor& x) {
  check_matrix(x, "row_argmax", "x");
  TORCH_CHECK(x.size(1) > 0, "row_argmax: x must have at least one column, got shape ", x.sizes());
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_argmax", [&] {
    row_argmax_kernel(x.data_ptr<scalar_t>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  });
  return out;
}

torch::Tensor softmax_forward(const torch::Tensor& x, bool log) {
  check_matrix(x, "softmax_forward", "x");
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_forward", [&] {
    const auto kernel = log ? softmax_forward_kernel<scalar_t, true> : softmax_forward_kernel<scalar_t, false>;
    kernel(x.data_ptr<scalar_t>(), x.size(0), x.size(1), y.data_ptr<scalar_t>(), streaming_output(y));
  });
  return y;
}

torch::Tensor softmax_backward(const torch::Tensor& dy, const torch::Tensor& y, bool log) {
  check_matrix(dy, "softmax_backward", "dy");
  check_matrix(y, "softmax_backward", "y");
  TORCH_CHECK(dy.sizes() == y.sizes(), "softmax_backward: dy and y must have the same shape, got ", dy.sizes(),
              " and ", y.sizes());
  TORCH_CHECK(dy.scalar_type() == y.scalar_type(), "softmax_backward: dy and y must have the same dtype, got ",
              dy.scalar_type(), " and ", y.scalar_type());
  auto dx = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "softmax_backward", [&] {
    const auto kernel = log ? softmax_backward_kernel<scalar_t, true> : softmax_backward_kernel<scalar_t, false>;
    kernel(dy.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), y.size(0), y.size(1), dx.data_ptr<scalar_t>(),
           streaming_output(dx));
  });
  return dx;
}

}  // namespace fastllm
