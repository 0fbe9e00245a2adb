// Softmax family on the CPU: softmax / log_softmax with their backward, and the fused row statistics of
// temperature-scaled logits z = x * s (log-sum-exp, target logit, sum of logits, entropy) behind token
// log-probs, cross entropy and entropy bonuses, with one shared backward.
//
// Rows are split across threads with at::parallel_for, and each row is walked in chunks of kChunk
// columns. A chunk is first *staged*: seen in the accumulation type (fp32, or fp64 for fp64 input) and
// padded to a whole SIMD vector. fp32/fp64 chunks are used in place; fp16/bf16 chunks and a row's ragged
// last chunk are converted into a small buffer. Either way the chunk stays in L1 for the passes over it,
// and the SIMD loops have no tails.
//
// Row statistics use the online softmax: per chunk, take the chunk max, rescale the running sums once
// if the max grew, then accumulate exp(z - max) over the (now cached) chunk while prefetching the next
// one. The forward forms z - max as fma(x, s, -max), so z itself is never rounded; sums are folded into
// double per chunk. Measured against float64, every forward result is within 2x of PyTorch's own error.
//
// Memory traffic for N rows of V columns, in elements of the input dtype unless noted:
//   logit_stats_forward:  read N*V,               write up to 4N fp32
//   logit_stats_backward: read N*V + 5N fp32,     write N*V
//   softmax_forward:      read N*V twice,         write N*V
//   softmax_backward:     read 2*N*V twice,       write N*V
// The second read of a row in softmax_forward/backward comes from L2 while a row fits there
// (V up to ~256K fp32 on a 2 MiB L2), so DRAM sees each input once.
#include "fastllm.h"
#include "cpu/streaming.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastllm {
namespace {

using at::vec::Vectorized;

// Columns per chunk: 8 KiB of fp32, so the input chunk and its staging buffers sit in L1 (48 KiB)
// between the max pass and the exp pass. A multiple of every SIMD width, so only a row's last chunk is
// ragged.
constexpr int64_t kChunk = 2048;
// Rows handed to one thread carry at least this many elements, so small inputs stay single-threaded.
constexpr int64_t kMinElementsPerTask = 1 << 16;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Sum of the lanes in double: chunk sums are folded into double row totals, and a fp32 shuffle tree
// adds rounding of its own (a 7-column log_softmax backward was off by 4.8e-7, PyTorch by 3.9e-9).
template <typename acc_t>
inline double reduce_sum_wide(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double sum = 0;
  for (acc_t lane : lanes) sum += lane;
  return sum;
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto a, auto b) { return at::vec::maximum(a, b); }, v);
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// exp(v) with NaN kept as NaN. exp_u20 (inline, ~20 ulp) makes the forward ~25% faster than Sleef's
// 1-ulp exp and, with sums folded in double, stays within PyTorch's fp32 error; but it maps NaN to a
// huge finite value. Since exp(v) > v for every real v, max(exp(v), v) is exp(v) itself, while the
// NaN-propagating max turns a NaN argument back into NaN. exp(-inf) = 0.
template <typename acc_t>
inline Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& v) {
  return at::vec::maximum(v.exp_u20(), v);
}

// Sleef's 1-ulp exp, for values written out one per element (the gradient's p): there exp_u20's error is
// not averaged away by a sum (the entropy gradient was 5x PyTorch's error with it).
template <typename acc_t>
inline Vectorized<acc_t> vec_exp_accurate(const Vectorized<acc_t>& v) {
  return v.exp();
}

// ---- staging: memory <-> L1 buffer in the accumulation type ----

// x[0, n) in the accumulation type followed by `pad` up to a whole vector: x itself when it already is
// that (fp32/fp64 input, n a whole number of vectors: every chunk but a row's last), else a copy in buf.
// The pad is chosen per use so that it drops out of every reduction (-inf for max and exp sums, 0 for
// dot products).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
const acc_t* stage_chunk(const scalar_t* x, int64_t n, acc_t pad, acc_t* buf) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (n % Vec::size() == 0) return x;
    for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(x + i).store(buf + i);
  } else {  // fp16/bf16: one vector of halves widens to two fp32 vectors
    using HalfVec = Vectorized<scalar_t>;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(HalfVec::loadu(x + i));
      lo.store(buf + i);
      hi.store(buf + i + Vec::size());
    }
  }
  for (; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
  for (; i < round_up(n, Vec::size()); ++i) buf[i] = pad;
  return buf;
}

// out[i] = vector_at(i)[i % width] for i < n: the result vectors, computed from staged chunks,
// narrowed to the output dtype. vector_at is only called at offsets inside the padded length. With `stream`
// (out aligned to a vector, see stream_row), whole vectors bypass the caches.
template <typename scalar_t, typename F>
void store_chunk(scalar_t* out, int64_t n, const F& vector_at, bool stream = false) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto store = [stream](scalar_t* p, const Vectorized<scalar_t>& v) {
    if constexpr (kHasStreamingStores) {
      if (stream) return stream_register(p, v);
    }
    v.store(p);
  };
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + Vec::size() <= n; i += Vec::size()) store(out + i, vector_at(i));
    if (i < n) vector_at(i).store(out + i, n - i);
  } else {  // two fp32 vectors narrow to one vector of halves
    using HalfVec = Vectorized<scalar_t>;
    for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
      store(out + i, at::vec::convert_from_float<scalar_t>(vector_at(i), vector_at(i + Vec::size())));
    }
    if (i < n) {
      const Vec hi = n - i > Vec::size() ? vector_at(i + Vec::size()) : Vec(0);
      at::vec::convert_from_float<scalar_t>(vector_at(i), hi).store(out + i, n - i);
    }
  }
}

// Columns [begin, begin + n) of a row, staged: padded_n values (n real ones, then the pad) at data.
template <typename acc_t>
struct Chunk {
  int64_t begin;
  int64_t n;
  int64_t padded_n;
  const acc_t* data;
  const char* next_source;  // where the next chunk's input starts (the next row's, after a row's last)
  int64_t source_element_bytes;

  // Starts loading element i of the next chunk's input. Called once per vector of a compute pass over
  // this chunk, it keeps DRAM streaming while the chunk is worked on from L1: the forward at
  // 4096 x 50257 fp32 on 2 threads went from 104 to 70 ms. (Prefetching is harmless past the end.)
  void prefetch_next(int64_t i) const { __builtin_prefetch(next_source + i * source_element_bytes); }
};

// Whether an output row is written with streaming stores: the whole output is (streaming_output) and the row
// starts on a vector boundary, as then every chunk does (kChunk is a multiple of every vector width).
template <typename scalar_t>
bool stream_row(bool stream_output, const scalar_t* row) {
  return stream_output && aligned_to(row, sizeof(Vectorized<scalar_t>));
}

// Walks row[0, cols) chunk by chunk, staging each (through `buf`, kChunk elements, where needed) and
// calling on_chunk(const Chunk&).
template <typename scalar_t, typename acc_t, typename F>
void for_each_chunk(const scalar_t* row, int64_t cols, acc_t pad, acc_t* buf, const F& on_chunk) {
  for (int64_t begin = 0; begin < cols; begin += kChunk) {
    const int64_t n = std::min(kChunk, cols - begin);
    const acc_t* data = stage_chunk(row + begin, n, pad, buf);
    const auto* next_source = reinterpret_cast<const char*>(row + begin + n);
    on_chunk(Chunk<acc_t>{begin, n, round_up(n, Vectorized<acc_t>::size()), data, next_source, sizeof(scalar_t)});
  }
}

// parallel_for over rows with enough columns per task to be worth a thread.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, body);
}

// ---- the online softmax of one row ----

// Independent accumulators per reduction: one running sum or max would serialize every vector on the
// 4-cycle add/max latency.
constexpr int kChains = 4;

// Calls step(i, k) for each vector offset i of a padded chunk, with k cycling over the kChains
// accumulators (the last few vectors all go to accumulator 0).
template <typename acc_t, typename F>
inline void for_each_vector(int64_t padded_n, const F& step) {
  constexpr int64_t width = Vectorized<acc_t>::size();
  int64_t i = 0;
  for (; i + kChains * width <= padded_n; i += kChains * width) {
    for (int k = 0; k < kChains; ++k) step(i + k * width, k);
  }
  for (; i < padded_n; i += width) step(i, 0);
}

template <typename Vec, typename Op>
inline Vec combine(const Vec (&chains)[kChains], const Op& op) {
  Vec result = chains[0];
  for (int k = 1; k < kChains; ++k) result = op(result, chains[k]);
  return result;
}

// Running max of z = x * scale over the row so far, with sum e and sum e * (z - max), e = exp(z - max).
// Each chunk is summed in SIMD lanes (kChunk / width terms per lane at most) and then added to the row
// totals in double, so rounding does not grow with the vocabulary. Sums relative to the max keep the
// entropy free of the cancellation lse - sum p*z would suffer with logits near 1e4.
template <typename acc_t>
struct OnlineSoftmax {
  using Vec = Vectorized<acc_t>;
  const acc_t scale;
  acc_t max = kNegInf<acc_t>;
  double sum_exp = 0;
  double sum_exp_shifted = 0;  // sum e * (z - max); only kept when the entropy is asked for

  explicit OnlineSoftmax(acc_t scale) : scale(scale) {}

  // Adds a staged chunk of x padded with -inf. With kStoreExp, also writes e = exp(z - max) of the chunk's
  // padded_n entries to exp_out, relative to the max after this chunk (`max`, which the caller records).
  template <bool kWantEntropy, bool kStoreExp = false>
  void add_chunk(const Chunk<acc_t>& chunk, acc_t* exp_out = nullptr) {
    const acc_t* x = chunk.data;
    const Vec vscale(scale);
    Vec chunk_max[kChains];
    for (auto& m : chunk_max) m = Vec(kNegInf<acc_t>);
    // Plain max (not NaN-propagating at::vec::maximum, 3x the instructions): a NaN reaches the results
    // through exp(NaN) = NaN in the sums instead.
    for_each_vector<acc_t>(chunk.padded_n, [&](int64_t i, int k) {
      chunk_max[k] = at::vec::clamp_min(Vec::loadu(x + i) * vscale, chunk_max[k]);
    });
    const acc_t new_max = reduce_max(combine(chunk_max, [](Vec a, Vec b) { return at::vec::clamp_min(a, b); }));
    if (!(new_max <= max)) rebase<kWantEntropy>(new_max);  // a NaN max makes every result NaN
    if (max == kNegInf<acc_t>) {
      // Every e is 0 so far (and z - max would be NaN). With no exp pass to carry a NaN into the sums,
      // look for one here; rows this rare can afford the scalar scan.
      if (std::any_of(x, x + chunk.padded_n, [](acc_t v) { return std::isnan(v); })) {
        sum_exp = sum_exp_shifted = std::numeric_limits<double>::quiet_NaN();
      }
      if constexpr (kStoreExp) std::fill(exp_out, exp_out + chunk.padded_n, acc_t(0));
      return;
    }

    const Vec neg_max(-max);
    // exp(-inf) = 0 must not turn e * (z - max) into 0 * -inf = NaN: clamping z - max to the lowest
    // finite value makes such terms exactly 0.
    const Vec lowest(std::numeric_limits<acc_t>::lowest());
    Vec chunk_sum_exp[kChains], chunk_sum_exp_shifted[kChains];
    for (int k = 0; k < kChains; ++k) chunk_sum_exp[k] = chunk_sum_exp_shifted[k] = Vec(0);
    for_each_vector<acc_t>(chunk.padded_n, [&](int64_t i, int k) {
      chunk.prefetch_next(i);
      // z = x * scale is rounded before the shift (no fma), as the backward and PyTorch's x / T round it:
      // an fma here made lse that of the unrounded z, off by up to ulp(z) / 2 from the backward's log p.
      const Vec shifted = Vec::loadu(x + i) * vscale + neg_max;
      const Vec e = vec_exp(shifted);
      if constexpr (kStoreExp) e.store(exp_out + i);
      chunk_sum_exp[k] = chunk_sum_exp[k] + e;
      if constexpr (kWantEntropy) {
        chunk_sum_exp_shifted[k] = at::vec::fmadd(e, at::vec::clamp_min(shifted, lowest), chunk_sum_exp_shifted[k]);
      }
    });
    const auto add = [](Vec a, Vec b) { return a + b; };
    sum_exp += reduce_sum_wide(combine(chunk_sum_exp, add));
    if constexpr (kWantEntropy) sum_exp_shifted += reduce_sum_wide(combine(chunk_sum_exp_shifted, add));
  }

  // Moves the sums from being relative to `max` to being relative to the larger `new_max`:
  // e scales by alpha = exp(max - new_max), and z - max = (z - new_max) + (max - new_max).
  template <bool kWantEntropy>
  void rebase(acc_t new_max) {
    if (max != kNegInf<acc_t>) {  // otherwise the sums are still 0
      const double shift = static_cast<double>(max) - new_max;
      const double alpha = std::exp(shift);
      if constexpr (kWantEntropy) sum_exp_shifted = alpha * (sum_exp_shifted + sum_exp * shift);
      sum_exp *= alpha;
    }
    max = new_max;
  }

  // logsumexp z = max + log sum e; -inf for an all -inf row, as torch.logsumexp.
  double lse() const { return max + std::log(sum_exp); }

  // lse - sum p z with p = e / S: (max + log S) - (max + sum e (z - max) / S).
  double entropy() const { return std::log(sum_exp) - sum_exp_shifted / sum_exp; }
};

// Running sum of a row in double lanes. Summing V = 50257 logits of either sign in fp32 lanes was
// 8-50x less accurate than PyTorch's cascade sum; widening each term is nearly free on data in L1.
// Written as independent lanes so the compiler vectorizes it without reassociating.
struct WideSum {
  static constexpr int kLanes = 16;
  double lanes[kLanes] = {};

  template <typename acc_t>
  void add(const acc_t* x, int64_t n) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(x[i + k]);
    }
    for (int k = 0; i < n; ++i, ++k) lanes[k] += static_cast<double>(x[i]);
  }

  double total() const {
    double sum = 0;
    for (double lane : lanes) sum += lane;
    return sum;
  }
};

// ---- kernels ----

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
      const int64_t label = labels == nullptr ? -1 : labels[r];
      if (label >= 0 && label < cols) {
        const acc_t w = (static_cast<acc_t>(row[label]) * s - lse_hi) - lse_lo;
        const acc_t p = std::exp(w);
        dx_row[label] = static_cast<scalar_t>(std::fma(p * sb, std::max(w, lowest), std::fma(p, sa, sd)) + sc);
      }
    }
    if (stream_dx) streaming_fence();
  });
}

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
    if constexpr (kHasStreamingStores) {
      if (stream && count == kWidth) return stream_register(p, narrow);
    }
    count == kWidth ? narrow.store(p) : narrow.store(p, count);
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

// ---- argument checks ----

void check_matrix(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, cols), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

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
    const std::optional<torch::Tensor>& d, double inv_temperature) {
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

  auto dx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    logit_stats_backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), rows, cols, data_or_null<int64_t>(checked_labels),
                                          checked_lse.data_ptr<double>(), coef, inv_temperature,
                                          dx.data_ptr<scalar_t>(), streaming_output(dx));
  });
  return dx;
}

}  // namespace fastllm
