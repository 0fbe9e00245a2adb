// Softmax family on the CPU (softmax.cpp, logit_stats.cpp; this header holds what both walk rows with): softmax / log_softmax with their backward, and the fused row statistics of
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
#pragma once
#include "cpu/streaming.h"
#include "cpu/vec_math.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace fastllm {
namespace softmax_rows {

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

// Terms of a sum take fastllm::vec_exp (cpu/vec_math.h: NaN kept, exp(-inf) = 0; 2.7 ulp for fp32 on AVX-512,
// exp_u20 elsewhere): with the sums folded in double either stays within PyTorch's fp32 error.

// exp for values written out one per element (the gradient's p), where the error is not averaged away by a
// sum (exp_u20's 20 ulp made the entropy gradient 5x PyTorch's error): vec_exp's 2.7 ulp for fp32 on AVX-512,
// else Sleef's 1-ulp exp.
template <typename acc_t>
inline Vectorized<acc_t> vec_exp_accurate(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return vec_exp(v);
#endif
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

// One whole vector to p, bypassing the caches with `stream` (p aligned to the vector, see stream_row).
template <typename scalar_t>
inline void store_vector(scalar_t* p, const Vectorized<scalar_t>& v, bool stream) {
  if constexpr (kHasStreamingStores) {
    if (stream) return stream_register(p, v);
  }
  v.store(p);
}

// out[i] = vector_at(i)[i % width] for i < n: the result vectors, computed from staged chunks,
// narrowed to the output dtype. vector_at is only called at offsets inside the padded length. With `stream`
// (out aligned to a vector, see stream_row), whole vectors bypass the caches.
template <typename scalar_t, typename F>
void store_chunk(scalar_t* out, int64_t n, const F& vector_at, bool stream = false) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto store = [stream](scalar_t* p, const Vectorized<scalar_t>& v) { store_vector(p, v, stream); };
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

// A 2-D contiguous CPU matrix of a floating dtype the kernels take.
inline void check_matrix(const torch::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, cols), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op,
              ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

}  // namespace softmax_rows
}  // namespace fastllm
