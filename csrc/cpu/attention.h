// Shared parts of the CPU flash attention (attention.cpp: overview, sequence geometry and checks;
// attention_forward.cpp: forward and decode; attention_backward.cpp: backward): tile sizes, the register-blocked
// tile GEMM, elementwise helpers on padded rows, which keys each query sees, and the task scheduler.
#pragma once
#include "fastllm.h"
#include "vec_math.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

namespace fastllm {
namespace attention_cpu {

using at::vec::Vectorized;

// Tile sizes. A 64 x 64 fp32 tile is 16 KiB, so a forward task's working set (Q, O, S and one tile each of
// K^T and V at D = 64) is 80 KiB: L2, with the GEMM panels in L1.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// Head dims and key tiles are padded with zeros to a multiple of this: whole fp32 (and fp64) vectors, so
// the GEMM and softmax loops have no ragged tails.
constexpr int64_t kPad = 16;
// The tile GEMMs sum their depth in blocks of this many terms, each block from 0, then add the blocks: one
// chain of fmas over a head dim of 256 made the scores 6x less accurate than PyTorch's sgemm (4.9e-5 vs
// 8.2e-6 at q, k ~ N(0, 1)) and the fp32 outputs 2.5x; blocks cost one load/add/store of C per 32 fmas.
constexpr int64_t kDepthBlock = 32;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }
inline int64_t ceil_div(int64_t n, int64_t d) { return (n + d - 1) / d; }

// ---------------------------------------------------------------------------------------------------------
// Tile GEMM: C (+)= A B
// ---------------------------------------------------------------------------------------------------------
// A register-blocked micro-kernel: kRows x kCols vectors of C stay in registers while depth steps each
// broadcast one element of A per row against kCols vectors of one row of B.
//
// C[m x n] (+)= A[m x depth] B[depth x n], n a multiple of the vector width. A is read as a[r * lda + k], or
// a[k * lda + r] when kTransA: P^T dO and dS^T Q read P and dS where they are, with no transposed copy
// (a broadcast costs the same from either layout).
template <typename acc_t, int kRows, int kCols, bool kTransA>
void gemm_micro_tile(int64_t depth, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* c,
                     int64_t ldc, bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  // Depth in blocks of kDepthBlock (see there), each summed from 0 in registers and then added to C.
  for (int64_t k0 = 0; k0 < std::max<int64_t>(depth, 1); k0 += kDepthBlock) {
    const bool first = k0 == 0;
    Vec acc[kRows][kCols];
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kCols; ++j) {
        acc[r][j] = first && accumulate ? Vec::loadu(c + r * ldc + j * kWidth) : Vec(acc_t(0));
      }
    }
    for (int64_t k = k0; k < std::min(depth, k0 + kDepthBlock); ++k) {
      Vec b_row[kCols];
      for (int j = 0; j < kCols; ++j) b_row[j] = Vec::loadu(b + k * ldb + j * kWidth);
      for (int r = 0; r < kRows; ++r) {
        const Vec a_rk(kTransA ? a[k * lda + r] : a[r * lda + k]);
        for (int j = 0; j < kCols; ++j) acc[r][j] = at::vec::fmadd(a_rk, b_row[j], acc[r][j]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      for (int j = 0; j < kCols; ++j) {
        acc_t* out = c + r * ldc + j * kWidth;
        (first ? acc[r][j] : Vec::loadu(out) + acc[r][j]).store(out);
      }
    }
  }
}

// The micro-kernel for a ragged edge: the largest instantiation with at most `rows` rows and `cols` vectors.
template <typename acc_t, int kRows, int kCols, bool kTransA>
void gemm_edge_tile(int rows, int cols, int64_t depth, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb,
                    acc_t* c, int64_t ldc, bool accumulate) {
  if constexpr (kRows > 1) {
    if (rows < kRows) {
      return gemm_edge_tile<acc_t, kRows - 1, kCols, kTransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, accumulate);
    }
  }
  if constexpr (kCols > 1) {
    if (cols < kCols) {
      return gemm_edge_tile<acc_t, kRows, kCols - 1, kTransA>(rows, cols, depth, a, lda, b, ldb, c, ldc, accumulate);
    }
  }
  gemm_micro_tile<acc_t, kRows, kCols, kTransA>(depth, a, lda, b, ldb, c, ldc, accumulate);
}

// 4 rows x 4 vectors: 16 accumulators, enough independent FMAs to cover their latency on two FMA ports,
// with 8 loads per 16 FMAs. (Measured against 8 x 2, 6 x 4 and 8 x 3 in the attention forward+backward.)
constexpr int kTileRows = 4;
constexpr int kTileCols = 4;

template <typename acc_t, bool kTransA = false>
void gemm(int64_t m, int64_t n, int64_t depth, const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t* c,
          int64_t ldc, bool accumulate) {
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  const int64_t vectors = n / kWidth;
  // Column panels outside, rows inside: one panel of B (depth x kTileCols vectors) is reused from L1 by
  // every row group.
  for (int64_t v0 = 0; v0 < vectors; v0 += kTileCols) {
    const int cols = static_cast<int>(std::min<int64_t>(kTileCols, vectors - v0));
    for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - r0));
      const acc_t* a_tile = kTransA ? a + r0 : a + r0 * lda;
      acc_t* c_tile = c + r0 * ldc + v0 * kWidth;
      if (rows == kTileRows && cols == kTileCols) {
        gemm_micro_tile<acc_t, kTileRows, kTileCols, kTransA>(depth, a_tile, lda, b + v0 * kWidth, ldb, c_tile, ldc,
                                                              accumulate);
      } else {
        gemm_edge_tile<acc_t, kTileRows, kTileCols, kTransA>(rows, cols, depth, a_tile, lda, b + v0 * kWidth, ldb,
                                                             c_tile, ldc, accumulate);
      }
    }
  }
}

// Which engine runs the tile GEMMs of bf16 and fp16: ATen's brgemm on 16-bit tiles (the default; oneDNN's
// micro-kernels, built for this CPU at run time, where it has them: 1.5-3x the fp32 tiles' speed with AMX) or the
// register micro-kernel above on fp32 tiles (everywhere else, and when set). fp32 and fp64
// always take the register micro-kernel: its sums do not depend on the CPU model (oneDNN picks its kernels by
// CPU), the backward recomputes the forward's scores to the bit, and fp32 brgemm for P V and dS K was only 0-10%
// faster (bench/RESULTS.md). Set by set_attention_gemm (attention.cpp), for benchmarks and tests.
enum class GemmEngine { kRegisters, kBlas };
GemmEngine gemm_engine();

// ---------------------------------------------------------------------------------------------------------
// 16-bit tiles for brgemm (bf16 / fp16 on CPUs whose oneDNN has 16-bit brgemm micro-kernels: AMX)
// ---------------------------------------------------------------------------------------------------------
// brgemm takes a 16-bit B operand in VNNI-2 order: element (k, n) of a K x N matrix at [(k / 2) * 2N + 2n + k % 2],
// pairs of depth terms side by side; A is plain row-major. Products are exact in fp32 and summed in fp32.
template <typename scalar_t>
constexpr bool kSixteenBit = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

// Whether this call's 16-bit tiles go through brgemm: the engine is blas and oneDNN has the micro-kernels here.
template <typename scalar_t>
bool use_16bit_tiles() {
  return gemm_engine() == GemmEngine::kBlas &&
         at::native::cpublas::could_pack(c10::CppTypeToScalarType<scalar_t>::value);
}

// dst = the transpose of `rows` source rows (padded_dim x n, i.e. element (d, r) = src[r][d]) in VNNI-2 order,
// zero past `dim` and `rows`. A pair (d, d + 1) of one row stays side by side, so with an even dim this is a
// transpose of 32-bit words (the element-wise loop was 8% of the 16-bit forward).
#if defined(CPU_CAPABILITY_AVX512)
// dst[w * ld_dst + r] = src[r * ld_src + w] for a 16 x 16 block of 32-bit words: three rounds of unpacks and lane
// shuffles (pairs of rows, then of pairs, then 128-bit lanes), 16 loads and 16 stores where the word loop took
// 256 of each.
inline void transpose_words_16x16(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {  // t[i]: words 4l, 4l + 1 of rows i, i + 1 per lane l; t[i + 1]: 4l + 2, 4l + 3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // r[g + c]: word 4l + c of rows g .. g + 3, per lane l
    r[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    r[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    r[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    r[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // word 4l + c of all 16 rows: lane l of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512i low_ab = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), high_ab = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i low_cd = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
    const __m512i high_cd = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_si512(dst + c * ld_dst, _mm512_shuffle_i32x4(low_ab, low_cd, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * ld_dst, _mm512_shuffle_i32x4(low_ab, low_cd, 0xDD));
    _mm512_storeu_si512(dst + (8 + c) * ld_dst, _mm512_shuffle_i32x4(high_ab, high_cd, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * ld_dst, _mm512_shuffle_i32x4(high_ab, high_cd, 0xDD));
  }
}
#endif

// dst = the transpose of `rows` source rows (padded_dim x n, i.e. element (d, r) = src[r][d]) in VNNI-2 order,
// zero past `dim` and `rows`. A pair (d, d + 1) of one row stays side by side, so with an even dim this is a
// transpose of 32-bit words, in 16 x 16 blocks where the CPU has AVX-512. With V's packing (load_rows_vnni) it
// was 7.8% of the 16-bit forward's samples as a word loop (perf, bf16 4 x 8 x 1024 x 64 causal), 3% now.
template <typename scalar_t>
void load_rows_vnni_transposed(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t dim,
                               int64_t padded_dim, int64_t n, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "VNNI-2 pairs are two 16-bit values");
  std::fill(dst, dst + padded_dim * n, scalar_t(0));
  const int64_t pairs = dim / 2;
  int64_t block_rows = 0, block_pairs = 0;  // the part done in 16 x 16 blocks
#if defined(CPU_CAPABILITY_AVX512)
  if (src_stride % 2 == 0) {  // rows start on whole words
    block_rows = rows / 16 * 16, block_pairs = pairs / 16 * 16;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(src);
    uint32_t* dst_words = reinterpret_cast<uint32_t*>(dst);
    for (int64_t r = 0; r < block_rows; r += 16) {
      for (int64_t w = 0; w < block_pairs; w += 16) {
        transpose_words_16x16(words + r * (src_stride / 2) + w, src_stride / 2, dst_words + w * n + r, n);
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = src + r * src_stride;
    for (int64_t w = r < block_rows ? block_pairs : 0; w < pairs; ++w) std::memcpy(dst + (w * n + r) * 2, row + 2 * w, 4);
    if (dim % 2) dst[pairs * 2 * n + 2 * r] = row[dim - 1];
  }
}

// dst = `rows` source rows (depth x padded_dim, element (r, d) = src[r][d]) in VNNI-2 order, zero past `dim` and
// `rows`: each pair of rows interleaved element by element.
template <typename scalar_t>
void load_rows_vnni(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t dim, int64_t depth,
                    int64_t padded_dim, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2, "VNNI-2 pairs are two 16-bit values");
  std::fill(dst, dst + depth * padded_dim, scalar_t(0));
  for (int64_t r = 0; r < rows; r += 2) {
    const uint16_t* even = reinterpret_cast<const uint16_t*>(src + r * src_stride);
    const uint16_t* odd = r + 1 < rows ? reinterpret_cast<const uint16_t*>(src + (r + 1) * src_stride) : nullptr;
    uint16_t* out = reinterpret_cast<uint16_t*>(dst + r * padded_dim);
    if (odd != nullptr) {
      int64_t d = 0;
#if defined(CPU_CAPABILITY_AVX512)
      for (; d + 16 <= dim; d += 16) {  // 16 pairs: even in the low, odd in the high half of each 32-bit word
        const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + d)));
        const __m512i high = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + d)));
        _mm512_storeu_si512(out + 2 * d, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
      }
#endif
      for (; d < dim; ++d) out[2 * d] = even[d], out[2 * d + 1] = odd[d];
    } else {
      for (int64_t d = 0; d < dim; ++d) out[2 * d] = even[d];
    }
  }
}

// dst[0, 2 x Vec::size()) = [low, high] rounded to scalar_t. bf16 takes avx512_bf16's native conversion where the
// CPU has it (every CPU whose oneDNN runs 16-bit brgemm: AMX), else ATen's emulated
// round-to-nearest-even, a dozen instructions per pair of vectors (a quarter of the 16-bit softmax loop).
// The instruction is written as inline assembly: its intrinsic needs an avx512_bf16 target, and a function built
// for one cannot be inlined into these kernels (built for AVX-512 without it), so every pair of vectors paid a
// call, around which the loops spilled their accumulators (3.6% of the bf16 backward's samples).
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
inline void store_bf16_native(__m512 low, __m512 high, at::BFloat16* dst) {
  __m512i packed;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(packed) : "v"(high), "v"(low));  // low -> the first 16 values
  _mm512_storeu_si512(reinterpret_cast<void*>(dst), packed);
}
inline bool has_native_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

template <typename scalar_t>
inline void store_rounded(const Vectorized<float>& low, const Vectorized<float>& high, scalar_t* dst) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (has_native_bf16()) return store_bf16_native(low, high, dst);
  }
#endif
  at::vec::convert_from_float<scalar_t>(low, high).store(dst);
}

// The part of fp32 values that scalar_t holds exactly, and the rest: x = high + (x - high), the difference exact
// in fp32. bf16's high part is x truncated to its top 16 bits; fp16's is x rounded to fp16 (a mask would be
// wrong outside fp16's normal range). Two 16-bit GEMMs on the parts carry ~16 mantissa bits of x where one
// carries 8 (bf16): what a 16-bit matrix costs in accuracy where an fp32 one (P, dS) is split into it.
template <typename scalar_t>
inline Vectorized<float> high_part(const Vectorized<float>& x) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return x & Vectorized<float>(c10::bit_cast<float>(0xFFFF0000u));
  } else {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(x, x)));
  }
}

// dst = rows [0, rows) of the fp32 matrix src (ld apart, n columns, zero rows up to depth) in VNNI-2 order (two
// rows interleaved lane by lane), rounded to scalar_t; with low, dst gets high_part and low the rest, rounded.
template <typename scalar_t>
void pack_rows_vnni(const float* src, int64_t ld, int64_t rows, int64_t depth, int64_t n, scalar_t* dst,
                    scalar_t* low = nullptr) {
  using Vec = Vectorized<float>;
  const Vec zero(0.0f);
  for (int64_t r = 0; r < depth; r += 2) {
    for (int64_t c = 0; c < n; c += Vec::size()) {
      const Vec a = r < rows ? Vec::loadu(src + r * ld + c) : zero;
      const Vec b = r + 1 < rows ? Vec::loadu(src + (r + 1) * ld + c) : zero;
      const auto [first, second] = at::vec::interleave2(a, b);
      if (low == nullptr) {
        store_rounded(first, second, dst + r * n + 2 * c);
      } else {
        const Vec first_high = high_part<scalar_t>(first), second_high = high_part<scalar_t>(second);
        store_rounded(first_high, second_high, dst + r * n + 2 * c);
        store_rounded(first - first_high, second - second_high, low + r * n + 2 * c);
      }
    }
  }
}

// Each of `rows` fp32 rows of src (ld apart, n columns, n a multiple of Vec::size()) as two 16-bit parts side by
// side in dst (ld_dst apart): high_part in [0, n), the rest rounded in [n, 2 n). Writes run in pairs of vectors,
// so where n is an odd number of vectors each part's last pair writes Vec::size() zeros past it: the columns
// run last to first, so the low part's first pair (written last) overwrites the high part's, and the low part's
// own must fit in ld_dst (2 n + Vec::size() <= ld_dst then).
template <typename scalar_t>
void split_rows(const float* src, int64_t ld, int64_t rows, int64_t n, scalar_t* dst, int64_t ld_dst) {
  using Vec = Vectorized<float>;
  const int64_t last = (n - 1) / (2 * Vec::size()) * (2 * Vec::size());
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = src + r * ld;
    scalar_t* out = dst + r * ld_dst;
    for (int64_t c = last; c >= 0; c -= 2 * Vec::size()) {
      const Vec first = Vec::loadu(row + c);
      const Vec second = c + Vec::size() < n ? Vec::loadu(row + c + Vec::size()) : Vec(0.0f);
      const Vec first_high = high_part<scalar_t>(first), second_high = high_part<scalar_t>(second);
      store_rounded(first_high, second_high, out + c);
      store_rounded(first - first_high, second - second_high, out + n + c);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Elementwise helpers on padded rows
// ---------------------------------------------------------------------------------------------------------
template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return at::vec::maximum(x, y); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, v);
}

// One row of a 16-bit forward step's P: p[c] = exp(s[c] * scale - shift) rounded to scalar_t, for c < n (n a
// multiple of Vec::size(), padded with p = 0 to a multiple of 2 x Vec::size()); returns the fp32 sum of the
// unrounded values. One pass, two accumulators in registers: exp, sum and a separate rounding pass over an fp32
// copy of P spilled the sum to the stack (a fifth of the loop's samples, perf) and read P twice.
template <typename scalar_t>
inline float exp_row(const float* s, int64_t n, float scale, float shift, scalar_t* p) {
  using Vec = Vectorized<float>;
  const Vec scale_vec(scale), neg_shift(-shift);
  Vec sum0(0.0f), sum1(0.0f);
  int64_t c = 0;
  for (; c + 2 * Vec::size() <= n; c += 2 * Vec::size()) {
    const Vec p0 = vec_exp(at::vec::fmadd(Vec::loadu(s + c), scale_vec, neg_shift));
    const Vec p1 = vec_exp(at::vec::fmadd(Vec::loadu(s + c + Vec::size()), scale_vec, neg_shift));
    sum0 = sum0 + p0;
    sum1 = sum1 + p1;
    store_rounded(p0, p1, p + c);
  }
  if (c < n) {
    const Vec p0 = vec_exp(at::vec::fmadd(Vec::loadu(s + c), scale_vec, neg_shift));
    sum0 = sum0 + p0;
    store_rounded(p0, Vec(0.0f), p + c);
  }
  return reduce_sum(sum0 + sum1);
}

// dst[r * ld + d] = src[r * src_stride + d] as acc_t for d < dim, 0 for dim <= d < ld: rows of q, k, v or dout
// (strided by the heads between them) as a padded tile.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t dim, acc_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::convert(src + r * src_stride, dst + r * ld, dim);
    std::fill(dst + r * ld + dim, dst + (r + 1) * ld, acc_t(0));
  }
}

// dst[d * ld + r] = src[r * src_stride + d]: the transposed tile (K^T, V^T) the score GEMMs take as B, zero in
// the padding (d >= dim, or rows <= r < ld).
template <typename scalar_t, typename acc_t>
void load_rows_transposed(const scalar_t* src, int64_t src_stride, int64_t rows, int64_t dim, int64_t padded_dim,
                          acc_t* dst, int64_t ld) {
  std::fill(dst, dst + padded_dim * ld, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = src + r * src_stride;
    for (int64_t d = 0; d < dim; ++d) dst[d * ld + r] = static_cast<acc_t>(row[d]);
  }
}

// dst[0, n) = src[0, n) * factor, rounded to scalar_t.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, int64_t n, acc_t factor, scalar_t* dst) {
  using Vec = Vectorized<acc_t>;
  const Vec f(factor);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * f).store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * factor);
}

// ---------------------------------------------------------------------------------------------------------
// Geometry: which keys each query sees
// ---------------------------------------------------------------------------------------------------------
// One sequence of a batch: its query rows [q_start, q_start + q_len) and key rows [k_start, k_start + k_len)
// in the packed (tokens, heads, head_dim) tensors. Queries are aligned to the end of the keys (query i sits
// at key position i + k_len - q_len), and query i sees key j iff
//   i + shift - window_left <= j <= i + shift + window_right,   shift = k_len - q_len,
// a bound of -1 being absent (causal is window_right = 0). Both ends grow with i, so the keys of a run of
// queries, and the queries of a run of keys, are contiguous ranges.
struct Sequence {
  int64_t q_start, q_len, k_start, k_len;
  int64_t window_left, window_right;

  int64_t shift() const { return k_len - q_len; }
  // The keys [first_key(i), last_key(i)] of query i (empty when first > last).
  int64_t first_key(int64_t i) const { return window_left < 0 ? 0 : std::max<int64_t>(0, i + shift() - window_left); }
  int64_t last_key(int64_t i) const {
    return window_right < 0 ? k_len - 1 : std::min<int64_t>(k_len - 1, i + shift() + window_right);
  }
  // The queries [first_query(j), last_query(j)] that see key j.
  int64_t first_query(int64_t j) const {
    return window_right < 0 ? 0 : std::max<int64_t>(0, j - shift() - window_right);
  }
  int64_t last_query(int64_t j) const {
    return window_left < 0 ? q_len - 1 : std::min<int64_t>(q_len - 1, j - shift() + window_left);
  }
  // Whether every query row in [i0, i1) sees every key in [j0, j1): no per-element mask needed.
  bool tile_unmasked(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return first_key(i1 - 1) <= j0 && last_key(i0) >= j1 - 1;
  }
};

// Sets s[r * ld + c] = -inf for the keys j0 + c that query i0 + r cannot see, and for the padding
// cols <= c < padded_cols, so that exp() makes them exactly 0.
template <typename acc_t>
void mask_tile(const Sequence& seq, int64_t i0, int64_t rows, int64_t j0, int64_t cols, int64_t padded_cols,
               acc_t* s, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t lo = std::clamp<int64_t>(seq.first_key(i0 + r) - j0, 0, cols);
    const int64_t hi = std::clamp<int64_t>(seq.last_key(i0 + r) - j0 + 1, lo, cols);  // one past the last seen
    acc_t* row = s + r * ld;
    std::fill(row, row + lo, -kInf<acc_t>);
    std::fill(row + hi, row + padded_cols, -kInf<acc_t>);
  }
}

// The checked sequence boundaries of one call, from cu_seqlens (packed batches) or from the tensor shapes
// (dense batches: every sequence has max_seqlen queries and keys).
std::vector<Sequence> sequences(const char* op, const torch::Tensor& q, const torch::Tensor& k,
                                const std::optional<torch::Tensor>& cu_seqlens_q,
                                const std::optional<torch::Tensor>& cu_seqlens_k,
                                const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, int64_t window_left, int64_t window_right);

// ---------------------------------------------------------------------------------------------------------
// Scheduling
// ---------------------------------------------------------------------------------------------------------
// A thread is only worth waking for at least this many scores (query x key pairs, about 0.1 ms at head dim
// 64): a parallel region costs microseconds when idle, and milliseconds when the cores are busy elsewhere
// (gradcheck's thousand tiny calls took 40 s on a loaded 2-core machine with a thread per task).
constexpr int64_t kMinScoresPerThread = 1 << 16;
// Elements of a memory-bound pass (packing, Delta, the dQ sum) per thread, by the same reasoning.
constexpr int64_t kMinElementsPerThread = 1 << 16;

// Runs body(task, workspace) for every task, the costliest first (a task's cost is its number of scores),
// handed out one at a time from a shared counter: causal and windowed tiles differ several-fold in work,
// and at::parallel_for's static split would leave threads idle. Each task writes only its own outputs, so
// which thread runs it does not change a bit.
template <typename Task, typename Workspace, typename MakeWorkspace, typename Body>
void run_tasks(std::vector<Task>& tasks, const MakeWorkspace& make_workspace, const Body& body) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  int64_t total_cost = 0;
  for (const Task& task : tasks) total_cost += task.cost;
  const int64_t workers = std::clamp<int64_t>(
      std::min<int64_t>(total_cost / kMinScoresPerThread, static_cast<int64_t>(tasks.size())), 1,
      at::get_num_threads());
  std::atomic<size_t> next{0};
  const auto drain = [&] {
    Workspace workspace = make_workspace();
    for (size_t t = next.fetch_add(1); t < tasks.size(); t = next.fetch_add(1)) body(tasks[t], workspace);
  };
  if (workers == 1) return drain();
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { drain(); });
}

// at::parallel_for over [0, n) items of `item_elements` elements each, kMinElementsPerThread per thread.
template <typename F>
void parallel_items(int64_t n, int64_t item_elements, const F& body) {
  at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(item_elements, 1)), body);
}

struct Shape {
  int64_t heads_q, heads_kv, group, head_dim, padded_dim;
};

// A finished row's output factor 1 / l and its lse m + log l (in double: the backward splits lse into an acc_t
// high part and the remainder, see there), from its running max m and sum l. l = 0: the row saw no key (output 0,
// lse -inf); a NaN max or sum: a NaN score (outputs and lse NaN).
template <typename acc_t>
inline std::pair<acc_t, double> finish_row(acc_t m, acc_t l) {
  const bool nan = std::isnan(m) || std::isnan(l);
  const acc_t factor = nan ? std::numeric_limits<acc_t>::quiet_NaN() : l > 0 ? acc_t(1) / l : acc_t(0);
  return {factor, nan || l > 0 ? static_cast<double>(m) + std::log(static_cast<double>(l)) : -kInf<double>};
}

// A sequence with this many queries or fewer runs one query row at a time, reading K and V rows
// straight from the cache: the tiled path would pack every key into K and V^T tiles (a second pass over the
// cache) and pad the one query to a 16-wide vector (16x the score work), 4x slower than SDPA at batch 8 (measured
// on the per-head kernel this one replaced).
constexpr int64_t kMaxDecodeQueries = 4;

// Where the decode kernel finds K and V rows: key token t of kv head h at base + t * token + h * head. Packed
// tensors have token = heads_kv * head_dim and head = head_dim; transformers' (batch, heads, positions, head_dim)
// cache, read in place, has token = head_dim and head = positions * head_dim (its sequences' k_start then count
// rows of `token`).
struct KeyStrides {
  int64_t token, head;
};

// The decode kernel (attention_decode.cpp) over seqs, each of at most kMaxDecodeQueries queries: q (total_q, heads_q,
// head_dim) contiguous, K and V rows where `strides` says; writes out (like q) and lse (heads_q, total_q) double.
void decode_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Shape& shape,
                    KeyStrides strides, const std::vector<Sequence>& seqs, double softmax_scale, torch::Tensor& out,
                    torch::Tensor& lse);

// Argument checks shared by the entry points (attention.cpp).
// contiguous = false: rows of any strides (the decode kernel reading transformers' cache in place).
void check_tokens(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& like,
                  bool contiguous = true);
Shape check_qkv(const char* op, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                bool contiguous_kv = true);
void check_softmax_scale(const char* op, double softmax_scale);

// The saved lse is double for every input dtype, so the backward can recompute P to acc_t accuracy.
inline torch::ScalarType lse_dtype(const torch::Tensor&) { return at::kDouble; }

}  // namespace attention_cpu
}  // namespace fastllm
