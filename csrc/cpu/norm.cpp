// Norm family on the CPU: LayerNorm and RMSNorm, forward and backward, each with an optional fused
// residual add (h = x + residual is returned and normalized in the same pass over the row).
//
// One template serves both norms: kRms drops the centring (mean := 0); everything else is shared. The
// affine part is folded once per call into two acc_t vectors of the row length, scale = offset + weight
// (1 without a weight) and shift = bias (0 without one), so the inner loops never branch on which
// parameters exist and never convert the weight's dtype (fp32 weights with bf16 activations are common).
//
// Forward, per row (rows split across threads by at::parallel_for):
//   pass 0  (residual only) h = x + residual, rounded to x's dtype and stored as residual_out; later
//           passes read it back, so the row that is normalized is exactly the one returned.
//   pass 1  sum h (LayerNorm) or sum h^2 (RMSNorm).
//   pass 2  (LayerNorm only) corrected two-pass variance: d = h - mean, var = sum d^2 / n - (sum d / n)^2
//           and mean += sum d / n. Exact for constant rows, and for x = 1e4 + noise it keeps the
//           precision that one-pass E[x^2] - E[x]^2 loses entirely in fp32 (cancellation of ~1e8).
//   pass 3  y = (h - mean) * rstd * scale + shift.
// Passes 1-3 re-read the row from L1/L2 (<= 64 KiB for n = 16384 fp32), so DRAM sees it once.
//
// Backward, per row, with xhat = (h - mean) * rstd and g = dy * scale:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ d residual_out)     [RMSNorm: no mean(g) term]
//   dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
// Rows are cut into at most kMaxPartials blocks whose boundaries depend only on the shape, not on the
// thread count. Each block accumulates its own dweight/dbias row in acc_t (a cascade: tiles of kTileRows
// rows in registers, groups of kRowsPerGroup rows, then groups into the block's row), and the blocks' rows
// are summed in block order at the end: the same bits on every run, with any number of threads, no atomics.
//
// Memory traffic for N rows of n columns, in elements of x's dtype (mean/rstd: N acc_t each):
//   forward:  read N*n (2N*n with residual),        write N*n (2N*n with residual)
//   backward: read 2N*n (3N*n with d residual_out), write N*n;  plus blocks * n acc_t partials (in cache)
// Outputs larger than most of the last-level cache (y, dx) are written with streaming stores, which skip
// reading each destination line in first (see streaming_output).
// Measured on 2 Xeon cores, fp32 LayerNorm, one thread on rows in L2: 0.32 ns/element forward and 0.44
// backward (ATen: 0.41 and 0.78). At 8192 x 1024 from DRAM, forward+backward takes 1.13x the time of
// x.clone() plus x + dy, the same traffic with no arithmetic: there the fresh output pages cost more than
// the kernels do.
#include "fastllm.h"
#include "cpu/streaming.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>


#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastllm {
namespace {

using at::vec::Vectorized;

// Rows handed to one thread carry at least this many elements, so small inputs stay single-threaded.
constexpr int64_t kNormMinElementsPerTask = 1 << 16;
// Upper bound on the weight-gradient blocks of the backward: enough tasks to keep 64 threads busy, while
// the partial rows (64 x n acc_t) stay a small fraction of the traffic and are summed in microseconds.
constexpr int64_t kMaxPartials = 64;
// Rows per group of the backward's cascade summation of dweight/dbias (see norm_backward_kernel).
constexpr int64_t kRowsPerGroup = 16;
// Rows whose parameter-gradient shares the backward sums in registers before adding them to the group sum
// (a divisor of kRowsPerGroup).
constexpr int64_t kTileRows = 4;
static_assert(kRowsPerGroup % kTileRows == 0, "groups are whole tiles");

// One SIMD vector of acc_t lanes to and from a row of scalar_t: fp32/fp64 rows load directly, fp16/bf16
// rows widen on load and round on store. `count` < width reads/writes only the first count lanes; the
// other lanes of a loaded vector are 0.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const scalar_t* p, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return count == kWidth ? Vec::loadu(p) : Vec::loadu(p, count);
    } else {
      if (count == kWidth) {
        Vec out;
        at::vec::load_to_float<scalar_t>(p, out);
        return out;
      }
      return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count)));
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
    }
  }

  // store(), bypassing the caches for a whole vector when `stream` is set (the caller checked the row's
  // alignment, kStreamAlign) and the SIMD ISA allows it: see streaming_output.
  static void store(scalar_t* p, const Vec& v, int64_t count, bool stream) {
    if constexpr (kHasStreamingStores) {
      if (stream && count == kWidth) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) return stream_register(p, v);
        else return stream_register(p, lower_half(at::vec::convert_from_float<scalar_t>(v, v)));
      }
    }
    store(p, v, count);
  }

  // Whole vectors of a row starting at this alignment can be streamed (the vector's size in bytes).
  static constexpr int64_t kStreamAlign = kWidth * static_cast<int64_t>(sizeof(scalar_t));
  static bool stream_aligned(const scalar_t* row) {
    return reinterpret_cast<uintptr_t>(row) % kStreamAlign == 0;
  }
};

// Vectors handled per step of a row loop, each summing into its own accumulator: one chain of dependent
// adds (4 cycles each on AVX-512) per reduction made the in-cache passes twice as slow.
constexpr int kUnroll = 4;

template <int64_t kWidth, typename F, size_t... K>
inline void vector_group(int64_t i, const F& body, std::index_sequence<K...>) {
  (body(std::integral_constant<int, K>{}, i + static_cast<int64_t>(K) * kWidth, kWidth), ...);
}

// body(k, i, count) for each SIMD vector of a row of n elements: groups of kUnroll whole vectors (k = 0..3,
// a compile-time index that picks the accumulator), then single whole vectors, then one ragged tail (k = 0).
template <int64_t kWidth, typename F>
inline void for_each_vector(int64_t n, const F& body) {
  int64_t i = 0;
  for (; i + kUnroll * kWidth <= n; i += kUnroll * kWidth) {
    vector_group<kWidth>(i, body, std::make_index_sequence<kUnroll>{});
  }
  for (; i + kWidth <= n; i += kWidth) body(std::integral_constant<int, 0>{}, i, kWidth);
  if (i < n) body(std::integral_constant<int, 0>{}, i, n - i);
}

// kUnroll partial sums of one reduction, combined in a fixed order.
template <typename Vec>
struct Accumulator {
  static_assert(kUnroll == 4, "total() adds exactly kUnroll parts");
  Vec part[kUnroll] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  Vec total() const { return (part[0] + part[1]) + (part[2] + part[3]); }
};

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return a + b; }, v);
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// ---- kernels ----

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* residual;  // null: plain norm
  scalar_t* residual_out;    // x + residual; null without residual
  const acc_t* scale;        // offset + weight, padded with zeros to whole vectors
  const acc_t* shift;        // bias or 0, padded likewise
  scalar_t* y;
  acc_t* mean;  // null for RMSNorm
  acc_t* rstd;
  int64_t rows, cols;
  acc_t eps;
  bool stream_y;  // streaming stores for y (see streaming_output)
};

template <typename scalar_t, bool kRms>
void norm_forward_kernel(const ForwardArgs<scalar_t>& a) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t W = L::kWidth;
  const int64_t n = a.cols;
  const int64_t grain = std::max<int64_t>(1, kNormMinElementsPerTask / std::max<int64_t>(n, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const scalar_t* h = a.x + r * n;
      if (a.residual != nullptr) {
        const scalar_t* x_row = h;
        const scalar_t* res_row = a.residual + r * n;
        scalar_t* out_row = a.residual_out + r * n;
        for_each_vector<W>(n, [&](auto, int64_t i, int64_t count) {
          L::store(out_row + i, L::load(x_row + i, count) + L::load(res_row + i, count), count);
        });
        h = out_row;
      }

      Accumulator<Vec> sum;  // tails load as 0, which adds nothing to sum h or sum h^2
      for_each_vector<W>(n, [&](auto k, int64_t i, int64_t count) {
        const Vec v = L::load(h + i, count);
        sum.part[k] = kRms ? at::vec::fmadd(v, v, sum.part[k]) : sum.part[k] + v;
      });
      acc_t mean = 0, variance;  // for RMSNorm, "variance" is the mean square
      if constexpr (kRms) {
        variance = reduce_sum(sum.total()) / n;
      } else {
        mean = reduce_sum(sum.total()) / n;
        const Vec vmean(mean);
        Accumulator<Vec> sum_d, sum_d2;
        for_each_vector<W>(n, [&](auto k, int64_t i, int64_t count) {
          Vec d = L::load(h + i, count) - vmean;
          if (count < W) d = Vec::set(Vec(0), d, count);  // the tail's zero lanes are not deviations
          sum_d.part[k] = sum_d.part[k] + d;
          sum_d2.part[k] = at::vec::fmadd(d, d, sum_d2.part[k]);
        });
        const acc_t correction = reduce_sum(sum_d.total()) / n;
        variance = std::max(acc_t(0), reduce_sum(sum_d2.total()) / n - correction * correction);
        mean += correction;
        a.mean[r] = mean;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(variance + a.eps);
      a.rstd[r] = rstd;

      const Vec vmean(mean), vrstd(rstd);
      scalar_t* y_row = a.y + r * n;
      const bool stream = a.stream_y && L::stream_aligned(y_row);
      for_each_vector<W>(n, [&](auto, int64_t i, int64_t count) {
        const Vec xhat = (L::load(h + i, count) - vmean) * vrstd;
        L::store(y_row + i, at::vec::fmadd(xhat, Vec::loadu(a.scale + i), Vec::loadu(a.shift + i)), count,
                 stream);
      });
    }
    if (a.stream_y) streaming_fence();
  });
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const scalar_t* d_residual_out;  // null: nothing to add to dx
  const scalar_t* h;               // the normalized input (x, or x + residual)
  const acc_t* scale;              // offset + weight, padded with zeros to whole vectors
  const acc_t* mean;               // null for RMSNorm
  const acc_t* rstd;
  scalar_t* dx;
  acc_t* dweight_partials;  // (blocks, padded cols), zeroed by the kernel; null when not wanted
  acc_t* dbias_partials;    // likewise
  int64_t rows, cols, padded_cols, blocks, rows_per_block;
  bool stream_dx;  // streaming stores for dx (see streaming_output)
};

// Adds `group` into `total` and clears it: n acc_t, a whole number of vectors.
template <typename acc_t>
void flush_group(acc_t* group, acc_t* total, int64_t n) {
  using Vec = Vectorized<acc_t>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    (Vec::loadu(total + i) + Vec::loadu(group + i)).store(total + i);
    Vec(0).store(group + i);
  }
}

template <typename scalar_t, bool kRms>
void norm_backward_kernel(const BackwardArgs<scalar_t>& a) {
  using L = Lanes<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t W = L::kWidth;
  const int64_t n = a.cols, padded = a.padded_cols;
  at::parallel_for(0, a.blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    // Cascade summation of the parameter gradients: tiles of kTileRows rows (summed in registers) add into a
    // group sum, every kRowsPerGroup rows the group adds into the block's partial row. Error grows with kRowsPerGroup + rows_per_block / kRowsPerGroup
    // instead of rows_per_block (measured on 65536 x 256 fp32: 2.8x closer to float64 than one running sum,
    // within 1.3x of torch.sum; F.layer_norm's own backward is 15x further off).
    std::vector<acc_t> group_sums(2 * padded, acc_t(0));
    acc_t* dweight_group = a.dweight_partials ? group_sums.data() : nullptr;
    acc_t* dbias_group = a.dbias_partials ? group_sums.data() + padded : nullptr;
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_begin = block * a.rows_per_block;
      const int64_t row_end = std::min(a.rows, row_begin + a.rows_per_block);
      if (dweight_group) std::fill_n(a.dweight_partials + block * padded, padded, acc_t(0));
      if (dbias_group) std::fill_n(a.dbias_partials + block * padded, padded, acc_t(0));
      for (int64_t tile_begin = row_begin; tile_begin < row_end; tile_begin += kTileRows) {
        const int64_t tile_rows = std::min(kTileRows, row_end - tile_begin);
        acc_t mean[kTileRows], rstd[kTileRows], mean_g[kTileRows], mean_g_xhat[kTileRows];
        bool stream[kTileRows];

        // Pass 1, row by row: the row sums of dx. A tail's padded lanes have dy = 0, hence g = 0.
        for (int64_t j = 0; j < tile_rows; ++j) {
          const int64_t r = tile_begin + j;
          const scalar_t* dy_row = a.dy + r * n;
          const scalar_t* h_row = a.h + r * n;
          mean[j] = kRms ? acc_t(0) : a.mean[r];
          rstd[j] = a.rstd[r];
          const Vec vmean(mean[j]), vrstd(rstd[j]);
          Accumulator<Vec> sum_g, sum_g_xhat;
          for_each_vector<W>(n, [&](auto k, int64_t i, int64_t count) {
            const Vec xhat = (L::load(h_row + i, count) - vmean) * vrstd;
            const Vec g = L::load(dy_row + i, count) * Vec::loadu(a.scale + i);
            sum_g.part[k] = sum_g.part[k] + g;
            sum_g_xhat.part[k] = at::vec::fmadd(g, xhat, sum_g_xhat.part[k]);
          });
          mean_g[j] = kRms ? acc_t(0) : reduce_sum(sum_g.total()) / n;
          mean_g_xhat[j] = reduce_sum(sum_g_xhat.total()) / n;
          stream[j] = a.stream_dx && L::stream_aligned(a.dx + r * n);
        }

        // Pass 2, column by column across the tile's rows (still in L1/L2): dx, and the tile's share of
        // dweight and dbias summed in registers, so the group sums are loaded and stored once per tile
        // rather than once per row (those loads and stores took over a quarter of the backward's time).
        // `rows` is a compile-time constant for whole tiles, so the loop over them unrolls.
        const auto pass_2 = [&](auto rows) {
          for_each_vector<W>(n, [&](auto, int64_t i, int64_t count) {
            const Vec scale = Vec::loadu(a.scale + i);
            Vec dweight(0), dbias(0);
            for (int64_t j = 0; j < rows; ++j) {
              const int64_t offset = (tile_begin + j) * n + i;
              const Vec dyv = L::load(a.dy + offset, count);
              const Vec xhat = (L::load(a.h + offset, count) - Vec(mean[j])) * Vec(rstd[j]);
              Vec dxv = (dyv * scale - Vec(mean_g[j]) - xhat * Vec(mean_g_xhat[j])) * Vec(rstd[j]);
              if (a.d_residual_out) dxv = dxv + L::load(a.d_residual_out + offset, count);
              L::store(a.dx + offset, dxv, count, stream[j]);
              dweight = at::vec::fmadd(dyv, xhat, dweight);
              dbias = dbias + dyv;
            }
            if (dweight_group) (Vec::loadu(dweight_group + i) + dweight).store(dweight_group + i);
            if (dbias_group) (Vec::loadu(dbias_group + i) + dbias).store(dbias_group + i);
          });
        };
        if (tile_rows == kTileRows) {
          pass_2(std::integral_constant<int64_t, kTileRows>{});
        } else {
          pass_2(tile_rows);
        }

        const int64_t tile_end = tile_begin + tile_rows;
        if ((tile_end - row_begin) % kRowsPerGroup == 0 || tile_end == row_end) {
          if (dweight_group) flush_group(dweight_group, a.dweight_partials + block * padded, padded);
          if (dbias_group) flush_group(dbias_group, a.dbias_partials + block * padded, padded);
        }
      }
    }
    if (a.stream_dx) streaming_fence();
  });
}

// dst[j] = the sum over blocks of partials[block * padded + j], added in block order, for j < cols.
template <typename acc_t>
void sum_partials(const acc_t* partials, int64_t blocks, int64_t padded, int64_t cols, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  for_each_vector<Vec::size()>(cols, [&](auto, int64_t j, int64_t count) {
    Vec total = Vec::loadu(partials + j);  // whole vectors: the partial rows are padded
    for (int64_t block = 1; block < blocks; ++block) total = total + Vec::loadu(partials + block * padded + j);
    total.store(dst + j, count);
  });
}

// ---- argument checks and set-up ----

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

void check_rows(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, cols), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

void check_like(const torch::Tensor& t, const torch::Tensor& like, const char* op, const char* name,
                const char* like_name) {
  check_rows(t, op, name);
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have ", like_name, "'s shape ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

void check_parameter(const std::optional<torch::Tensor>& p, const torch::Tensor& x, const char* op,
                     const char* name) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", p->device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), op, ": ", name, " must have shape (", x.size(1),
              ",), got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op, ": ", name,
              " must have x's dtype ", x.scalar_type(), " or float32, got ", p->scalar_type());
}

void check_row_stat(const torch::Tensor& t, int64_t rows, at::ScalarType dtype, const char* op,
                    const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), op, ": ", name,
              " must be a contiguous (", rows, ",) tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// A parameter as acc_t values padded with zeros to whole SIMD vectors: `value` + p, or `fill` without p.
// A plain loop rather than torch ops: four dispatcher calls cost more than the conversion of 16K values.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> padded_affine(const std::optional<torch::Tensor>& p, double value,
                                                     double fill, int64_t cols, int64_t padded) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> out(padded, acc_t(0));
  if (!p.has_value()) {
    std::fill_n(out.begin(), cols, static_cast<acc_t>(fill));
    return out;
  }
  const auto contiguous = p->contiguous();
  const auto widen = [&](const auto* values) {
    for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<acc_t>(value) + static_cast<acc_t>(values[j]);
  };
  // check_parameter allowed exactly these two dtypes
  if (contiguous.scalar_type() == at::kFloat) {
    widen(contiguous.data_ptr<float>());
  } else {
    widen(contiguous.data_ptr<scalar_t>());
  }
  return out;
}

template <typename scalar_t>
int64_t padded_length(int64_t cols) {
  return round_up(std::max<int64_t>(cols, 1), Lanes<scalar_t>::kWidth);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> norm_forward(
    const torch::Tensor& x, const std::optional<torch::Tensor>& residual, const std::optional<torch::Tensor>& weight,
    const std::optional<torch::Tensor>& bias, double eps, double offset, bool rms) {
  constexpr const char* op = "norm_forward";
  check_rows(x, op, "x");
  if (residual.has_value()) check_like(*residual, x, op, "residual", "x");
  check_parameter(weight, x, op, "weight");
  check_parameter(bias, x, op, "bias");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be a non-negative finite number, got ", eps);
  const int64_t rows = x.size(0), cols = x.size(1);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto stats = x.options().dtype(acc_dtype);

  auto y = torch::empty_like(x);
  auto residual_out = residual.has_value() ? torch::empty_like(x) : x.new_empty({0});
  auto mean = torch::empty({rms ? 0 : rows}, stats);
  auto rstd = torch::empty({rows}, stats);
  if (rows == 0 || cols == 0) return {y, residual_out, mean, rstd};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t padded = padded_length<scalar_t>(cols);
    const auto scale = padded_affine<scalar_t>(weight, offset, 1.0, cols, padded);
    const auto shift = padded_affine<scalar_t>(bias, 0.0, 0.0, cols, padded);
    const ForwardArgs<scalar_t> args{
        x.data_ptr<scalar_t>(),
        residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
        residual.has_value() ? residual_out.data_ptr<scalar_t>() : nullptr,
        scale.data(), shift.data(), y.data_ptr<scalar_t>(),
        rms ? nullptr : mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), rows, cols, static_cast<acc_t>(eps),
        streaming_output(y)};
    rms ? norm_forward_kernel<scalar_t, true>(args) : norm_forward_kernel<scalar_t, false>(args);
  });
  return {y, residual_out, mean, rstd};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> norm_backward(
    const torch::Tensor& dy, const std::optional<torch::Tensor>& d_residual_out, const torch::Tensor& h,
    const std::optional<torch::Tensor>& weight, const torch::Tensor& mean, const torch::Tensor& rstd,
    double offset, bool rms, bool want_weight_grad, bool want_bias_grad) {
  constexpr const char* op = "norm_backward";
  check_rows(h, op, "h");
  check_like(dy, h, op, "dy", "h");
  if (d_residual_out.has_value()) check_like(*d_residual_out, h, op, "d_residual_out", "h");
  check_parameter(weight, h, op, "weight");
  TORCH_CHECK(!want_weight_grad || weight.has_value(), op, ": want_weight_grad needs the weight");
  const int64_t rows = h.size(0), cols = h.size(1);
  const auto acc_dtype = at::toOpMathType(h.scalar_type());
  if (!rms) check_row_stat(mean, rows, acc_dtype, op, "mean");
  check_row_stat(rstd, rows, acc_dtype, op, "rstd");

  auto dx = torch::empty_like(h);
  const auto grad_options = h.options().dtype(acc_dtype);
  auto dweight = torch::empty({want_weight_grad ? cols : 0}, grad_options);
  auto dbias = torch::empty({want_bias_grad ? cols : 0}, grad_options);
  if (rows == 0 || cols == 0) return {dx, dweight.zero_(), dbias.zero_()};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t padded = padded_length<scalar_t>(cols);
    const auto scale = padded_affine<scalar_t>(weight, offset, 1.0, cols, padded);
    // Fixed by the shape alone, so the summation order of the parameter gradients is too.
    const int64_t blocks_wanted = std::clamp<int64_t>(rows * cols / kNormMinElementsPerTask, 1, kMaxPartials);
    const int64_t rows_per_block = (rows + blocks_wanted - 1) / blocks_wanted;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    // Left uninitialised: each block zeroes its own rows inside the one parallel region (a torch::zeros
    // would be a parallel region of its own, and waking the thread pool costs milliseconds on small VMs).
    const auto partials = [&](bool wanted) {
      return std::unique_ptr<acc_t[]>(wanted ? new acc_t[blocks * padded] : nullptr);
    };
    const auto dweight_partials = partials(want_weight_grad), dbias_partials = partials(want_bias_grad);
    const BackwardArgs<scalar_t> args{
        dy.data_ptr<scalar_t>(),
        d_residual_out.has_value() ? d_residual_out->data_ptr<scalar_t>() : nullptr,
        h.data_ptr<scalar_t>(), scale.data(), rms ? nullptr : mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), dweight_partials.get(), dbias_partials.get(),
        rows, cols, padded, blocks, rows_per_block, streaming_output(dx)};
    rms ? norm_backward_kernel<scalar_t, true>(args) : norm_backward_kernel<scalar_t, false>(args);
    if (want_weight_grad) sum_partials(dweight_partials.get(), blocks, padded, cols, dweight.data_ptr<acc_t>());
    if (want_bias_grad) sum_partials(dbias_partials.get(), blocks, padded, cols, dbias.data_ptr<acc_t>());
  });
  return {dx, dweight, dbias};
}

}  // namespace fastllm
