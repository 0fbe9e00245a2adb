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
// fp32 and fp64 compute in their own type; fp16 and bf16 are converted to fp32 on loading a tile.
// Measured with 2 threads (Sapphire Rapids), causal 4 x 8 x 2048 x 64 fp32 forward+backward: see
// bench/cases/attention.py for the numbers and how they compare with eager PyTorch and SDPA.
#include "fastllm.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace fastllm {
namespace {

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
// The backward splits each sequence's keys into chunks until batch x kv heads x chunks reaches this, so a
// single sequence with one kv head still keeps every core busy. It depends on the shapes only, never on the
// thread count, so the summation order (and the bits of dQ) does not change from machine to machine.
constexpr int64_t kMinBackwardTasks = 32;

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

// ---------------------------------------------------------------------------------------------------------
// Elementwise helpers on padded rows
// ---------------------------------------------------------------------------------------------------------
// exp with NaN kept as NaN. exp_u20 (inline polynomial, ~20 ulp) costs a fraction of Sleef's 1-ulp exp; its
// error is below that of the fp32 scores it exponentiates. It maps NaN to a finite value; since exp(v) > v
// for every real v, max(exp(v), v) is exp(v), while the NaN-propagating maximum turns NaN back into NaN.
// exp(-inf) = 0.
template <typename acc_t>
inline Vectorized<acc_t> vec_exp(const Vectorized<acc_t>& v) {
  return at::vec::maximum(v.exp_u20(), v);
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return at::vec::maximum(x, y); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, v);
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

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
// The forward works on transposed tiles, queries along the vector lanes: S^T = K_j Q_i^T and O^T += V_j^T P^T.
// The softmax statistics of 16 queries are then one vector, and the max, the sums, the rescale factors and
// the rescaling of O^T are vertical vector operations: no horizontal reduction and no scalar exp per row per
// tile, which made up a third of the forward when the tiles were row-major.
struct ForwardTask {
  int64_t batch, head, q_tile, cost;
};

template <typename acc_t>
struct ForwardWorkspace {
  // Q^T and O^T (padded_dim x kBlockQ), S^T then P^T (kBlockK x kBlockQ), the running max and sum per query,
  // and one output row.
  std::vector<acc_t> qt, ot, st, row_max, row_sum, out_row;
  explicit ForwardWorkspace(int64_t padded_dim)
      : qt(padded_dim * kBlockQ), ot(padded_dim * kBlockQ), st(kBlockK * kBlockQ), row_max(kBlockQ),
        row_sum(kBlockQ), out_row(padded_dim) {}
};

// Sets st[r * ld + c] = -inf where query i0 + c cannot see key j0 + r (query columns in [0, padded_rows)).
template <typename acc_t>
void mask_tile_transposed(const Sequence& seq, int64_t i0, int64_t padded_rows, int64_t j0, int64_t cols, acc_t* st,
                          int64_t ld) {
  for (int64_t r = 0; r < cols; ++r) {
    const int64_t lo = std::clamp<int64_t>(seq.first_query(j0 + r) - i0, 0, padded_rows);
    const int64_t hi = std::clamp<int64_t>(seq.last_query(j0 + r) - i0 + 1, lo, padded_rows);  // one past
    acc_t* row = st + r * ld;
    std::fill(row, row + lo, -kInf<acc_t>);
    std::fill(row + hi, row + padded_rows, -kInf<acc_t>);
  }
}

// The online softmax step for one key tile and the 16 (or 8) queries of one vector column c of S^T: folds
// scale * S^T[0, cols) into the running max m and sum l, rescales that column of O^T and leaves
// P^T = exp(scale S^T - m) in place.
template <typename acc_t>
inline void online_softmax_column(acc_t* st, int64_t cols, acc_t* ot, int64_t padded_dim, acc_t* m, acc_t* l,
                                  acc_t scale) {
  using Vec = Vectorized<acc_t>;
  const Vec scale_vec(scale), neg_inf(-kInf<acc_t>), zero(acc_t(0));
  Vec tile_max = neg_inf;
  for (int64_t r = 0; r < cols; ++r) tile_max = at::vec::maximum(tile_max, Vec::loadu(st + r * kBlockQ));
  const Vec old_max = Vec::loadu(m);
  // NaN-propagating: a NaN score makes m NaN for good, and the row's outputs NaN at the end.
  const Vec new_max = at::vec::maximum(old_max, tile_max * scale_vec);
  // A query that has seen no key so far has max -inf; shifting by 0 instead keeps exp(-inf - -inf) = NaN
  // out (its p and rescale factor are then exp(-inf) = 0).
  const Vec shift = Vec::blendv(new_max, zero, new_max == neg_inf);
  const Vec neg_shift = zero - shift;
  Vec sum = zero;
  for (int64_t r = 0; r < cols; ++r) {
    const Vec p = vec_exp(at::vec::fmadd(Vec::loadu(st + r * kBlockQ), scale_vec, neg_shift));
    p.store(st + r * kBlockQ);
    sum = sum + p;
  }
  const Vec rescale = vec_exp(old_max - shift);
  at::vec::fmadd(Vec::loadu(l), rescale, sum).store(l);
  new_max.store(m);
  for (int64_t d = 0; d < padded_dim; ++d) (Vec::loadu(ot + d * kBlockQ) * rescale).store(ot + d * kBlockQ);
}

template <typename scalar_t>
void attention_forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const Shape& shape,
                              const std::vector<Sequence>& seqs, int64_t total_q, double softmax_scale, scalar_t* out,
                              double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim, pdim = shape.padded_dim;
  const acc_t scale = static_cast<acc_t>(softmax_scale);

  // K and V^T of every (sequence, kv head) in acc_t, tile by tile: a K tile is kBlockK x padded_dim, a V^T
  // tile padded_dim x kBlockK, both contiguous. Packed once and shared by every query tile and head of the
  // group, rather than converted per (query tile, key tile) pair.
  std::vector<int64_t> first_tile(seqs.size() + 1, 0);  // of each sequence's kv head 0
  for (size_t b = 0; b < seqs.size(); ++b) first_tile[b + 1] = first_tile[b] + ceil_div(seqs[b].k_len, kBlockK) * heads_kv;
  const int64_t tile_elems = kBlockK * pdim;
  std::vector<acc_t> packed_k(first_tile.back() * tile_elems), packed_vt(first_tile.back() * tile_elems);
  parallel_items(first_tile.back(), tile_elems, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = std::upper_bound(first_tile.begin(), first_tile.end(), tile) - first_tile.begin() - 1;
      const Sequence& seq = seqs[b];
      const int64_t tiles_per_head = ceil_div(seq.k_len, kBlockK);
      const int64_t kv_head = (tile - first_tile[b]) / tiles_per_head;
      const int64_t j0 = (tile - first_tile[b]) % tiles_per_head * kBlockK;
      const int64_t rows = std::min(kBlockK, seq.k_len - j0);
      const int64_t offset = ((seq.k_start + j0) * heads_kv + kv_head) * dim;
      load_rows(k + offset, heads_kv * dim, rows, dim, packed_k.data() + tile * tile_elems, pdim);
      load_rows_transposed(v + offset, heads_kv * dim, rows, dim, pdim, packed_vt.data() + tile * tile_elems, kBlockK);
    }
  });

  std::vector<ForwardTask> tasks;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const Sequence& seq = seqs[b];
    for (int64_t i0 = 0; i0 < seq.q_len; i0 += kBlockQ) {
      const int64_t i1 = std::min(i0 + kBlockQ, seq.q_len);
      const int64_t keys = std::max<int64_t>(0, seq.last_key(i1 - 1) - seq.first_key(i0) + 1);
      for (int64_t h = 0; h < heads_q; ++h) tasks.push_back({static_cast<int64_t>(b), h, i0 / kBlockQ, (i1 - i0) * keys});
    }
  }

  run_tasks<ForwardTask, ForwardWorkspace<acc_t>>(
      tasks, [&] { return ForwardWorkspace<acc_t>(pdim); },
      [&](const ForwardTask& task, ForwardWorkspace<acc_t>& ws) {
        const Sequence& seq = seqs[task.batch];
        const int64_t i0 = task.q_tile * kBlockQ, rows = std::min(kBlockQ, seq.q_len - i0);
        const int64_t padded_rows = round_up(rows, kPad);
        const int64_t kv_head = task.head / shape.group;
        const int64_t row_stride = heads_q * dim;
        load_rows_transposed(q + ((seq.q_start + i0) * heads_q + task.head) * dim, row_stride, rows, dim, pdim,
                             ws.qt.data(), kBlockQ);
        std::fill(ws.ot.begin(), ws.ot.end(), acc_t(0));
        std::fill(ws.row_max.begin(), ws.row_max.end(), -kInf<acc_t>);
        std::fill(ws.row_sum.begin(), ws.row_sum.end(), acc_t(0));

        const int64_t first_key = seq.first_key(i0), last_key = seq.last_key(i0 + rows - 1);
        const int64_t tiles_per_head = ceil_div(seq.k_len, kBlockK);
        for (int64_t j0 = first_key / kBlockK * kBlockK; j0 <= last_key; j0 += kBlockK) {
          const int64_t cols = std::min(kBlockK, seq.k_len - j0);
          const int64_t tile = first_tile[task.batch] + kv_head * tiles_per_head + j0 / kBlockK;
          gemm(cols, padded_rows, pdim, packed_k.data() + tile * tile_elems, pdim, ws.qt.data(), kBlockQ,
               ws.st.data(), kBlockQ, /*accumulate=*/false);
          // Padding queries (rows <= c < padded_rows) need no mask: their zero Q gives finite scores, and
          // nothing of theirs is stored.
          if (!seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
            mask_tile_transposed(seq, i0, padded_rows, j0, cols, ws.st.data(), kBlockQ);
          }
          for (int64_t c = 0; c < padded_rows; c += Vec::size()) {
            online_softmax_column(ws.st.data() + c, cols, ws.ot.data() + c, pdim, ws.row_max.data() + c,
                                  ws.row_sum.data() + c, scale);
          }
          gemm(pdim, padded_rows, cols, packed_vt.data() + tile * tile_elems, kBlockK, ws.st.data(), kBlockQ,
               ws.ot.data(), kBlockQ, /*accumulate=*/true);
        }

        for (int64_t r = 0; r < rows; ++r) {
          const acc_t m = ws.row_max[r], l = ws.row_sum[r];
          const int64_t token = seq.q_start + i0 + r;
          for (int64_t d = 0; d < dim; ++d) ws.out_row[d] = ws.ot[d * kBlockQ + r];
          // l = 0: the row saw no key (output 0, lse -inf); a NaN max: a NaN score (outputs NaN).
          const acc_t factor = std::isnan(m) ? m : l > 0 ? acc_t(1) / l : acc_t(0);
          store_row(ws.out_row.data(), dim, factor, out + (token * heads_q + task.head) * dim);
          // In double: the backward splits lse into an acc_t high part and the remainder (see there).
          lse[task.head * total_q + token] =
              std::isnan(m) || l > 0 ? static_cast<double>(m) + std::log(static_cast<double>(l)) : -kInf<double>;
        }
      });
}

// ---------------------------------------------------------------------------------------------------------
// Decode: a few queries per sequence (a decoding step's one new token)
// ---------------------------------------------------------------------------------------------------------
// A sequence with this many queries or fewer runs one query row at a time, reading K and V rows
// straight from the cache: the tiled path would pack every key into K and V^T tiles (a second pass over the
// cache) and pad the one query to a 16-wide vector (16x the score work), 4x slower than SDPA at batch 8.
constexpr int64_t kMaxDecodeQueries = 4;

// row as acc_t: itself, or converted into buffer (dim elements).
template <typename scalar_t, typename acc_t>
inline const acc_t* acc_row(const scalar_t* row, int64_t dim, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, buffer, dim);
    return buffer;
  }
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec sum(acc_t(0));
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) sum = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), sum);
  acc_t result = reduce_sum(sum);
  for (; d < n; ++d) result += a[d] * b[d];
  return result;
}

// y[0, n) += a * x[0, n)
template <typename acc_t>
inline void axpy(acc_t a, const acc_t* x, acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  const Vec a_vec(a);
  int64_t d = 0;
  for (; d + Vec::size() <= n; d += Vec::size()) {
    at::vec::fmadd(a_vec, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  }
  for (; d < n; ++d) y[d] += a * x[d];
}

// The same outputs and lse as attention_forward_kernel, one (sequence, query, head) row per task: scores
// against every visible key, their max, then exp and the weighted sum of V rows.
template <typename scalar_t>
void attention_decode_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const Shape& shape,
                             const std::vector<Sequence>& seqs, int64_t total_q, double softmax_scale, scalar_t* out,
                             double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim;
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  std::vector<int64_t> first_task(seqs.size() + 1, 0);  // tasks of sequence b: (query, head) pairs
  int64_t max_keys = 1;
  for (size_t b = 0; b < seqs.size(); ++b) {
    first_task[b + 1] = first_task[b] + seqs[b].q_len * heads_q;
    max_keys = std::max(max_keys, seqs[b].k_len);
  }
  parallel_items(first_task.back(), max_keys * dim, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(max_keys), q_row(dim), kv_row(dim), out_row(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const Sequence& seq = seqs[b];
      const int64_t i = (task - first_task[b]) / heads_q, head = (task - first_task[b]) % heads_q;
      const int64_t token = seq.q_start + i, kv_head = head / shape.group;
      const acc_t* qr = acc_row(q + (token * heads_q + head) * dim, dim, q_row.data());
      if (qr != q_row.data()) std::copy(qr, qr + dim, q_row.begin());  // k rows may reuse kv_row below
      const int64_t first = seq.first_key(i), keys = std::max<int64_t>(0, seq.last_key(i) - first + 1);
      const auto row_of = [&](const scalar_t* base, int64_t j) {
        return base + ((seq.k_start + first + j) * heads_kv + kv_head) * dim;
      };
      acc_t m = -kInf<acc_t>;
      for (int64_t j = 0; j < keys; ++j) {
        const acc_t score = dot(q_row.data(), acc_row(row_of(k, j), dim, kv_row.data()), dim) * scale;
        scores[j] = score;
        if (score > m || std::isnan(score)) m = std::isnan(m) ? m : score;  // NaN-propagating max
      }
      // As in the tiled forward: a row whose scores are all -inf shifts by 0 (its p are then 0).
      const acc_t shift = m == -kInf<acc_t> ? acc_t(0) : m;
      Vec sum_vec(acc_t(0));
      int64_t j = 0;
      for (; j + Vec::size() <= keys; j += Vec::size()) {
        const Vec p = vec_exp(Vec::loadu(scores.data() + j) - Vec(shift));
        p.store(scores.data() + j);
        sum_vec = sum_vec + p;
      }
      acc_t l = reduce_sum(sum_vec);
      for (; j < keys; ++j) {
        scores[j] = std::isnan(scores[j]) ? scores[j] : std::exp(scores[j] - shift);
        l += scores[j];
      }
      std::fill(out_row.begin(), out_row.end(), acc_t(0));
      for (int64_t jj = 0; jj < keys; ++jj) {
        axpy(scores[jj], acc_row(row_of(v, jj), dim, kv_row.data()), out_row.data(), dim);
      }
      const acc_t factor = std::isnan(m) ? m : l > 0 ? acc_t(1) / l : acc_t(0);
      store_row(out_row.data(), dim, factor, out + (token * heads_q + head) * dim);
      lse[head * total_q + token] =
          std::isnan(m) || l > 0 ? static_cast<double>(m) + std::log(static_cast<double>(l)) : -kInf<double>;
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
struct BackwardTask {
  int64_t batch, kv_head, chunk, cost;
};

template <typename acc_t>
struct BackwardWorkspace {
  // Key side (one key tile): K, K^T, V^T and the dK, dV accumulators. Query side (one query tile): Q, dO,
  // P and dS, lse and Delta.
  // Each tile GEMM's product lands in `product`, and is added from there into the double dK, dV sums.
  std::vector<acc_t> k, kt, vt, q, dout, p, ds, lse, lse_low, delta, product;
  std::vector<double> dk, dv;
  explicit BackwardWorkspace(int64_t padded_dim)
      : k(kBlockK * padded_dim), kt(padded_dim * kBlockK), vt(padded_dim * kBlockK), q(kBlockQ * padded_dim),
        dout(kBlockQ * padded_dim), p(kBlockQ * kBlockK), ds(kBlockQ * kBlockK), lse(kBlockQ), lse_low(kBlockQ),
        delta(kBlockQ),
        product(std::max(kBlockQ, kBlockK) * padded_dim), dk(kBlockK * padded_dim), dv(kBlockK * padded_dim) {}
};

// dst[r * ld_dst + d] += src[r * padded_dim + d]: one tile's share of a gradient, added into its double sum.
// dK, dV and dQ are sums over many tiles (every query tile of every head in a kv group for dK, dV); one fp32
// chain of fmas through all of them loses up to ~5x PyTorch's accuracy at GQA with 257 queries, while fp32
// within a tile and double across tiles matches it, for one add per GEMM output (~1/64 of the GEMM's work).
template <typename acc_t>
void add_tile(const acc_t* src, int64_t rows, int64_t padded_dim, double* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* src_row = src + r * padded_dim;
    double* dst_row = dst + r * ld_dst;
    for (int64_t d = 0; d < padded_dim; ++d) dst_row[d] += static_cast<double>(src_row[d]);
  }
}

// The key tiles [first, last) of chunk `chunk` of `chunks` over a sequence with `tiles` key tiles.
inline std::pair<int64_t, int64_t> chunk_tiles(int64_t tiles, int64_t chunks, int64_t chunk) {
  return {chunk * tiles / chunks, (chunk + 1) * tiles / chunks};
}

template <typename scalar_t>
void attention_backward_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                               const scalar_t* out, const double* lse, const double* dlse, const Shape& shape,
                               const std::vector<Sequence>& seqs, double softmax_scale, scalar_t* dq, scalar_t* dk,
                               scalar_t* dv) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim, pdim = shape.padded_dim;
  const int64_t total_q = seqs.empty() ? 0 : seqs.back().q_start + seqs.back().q_len;
  const acc_t scale = static_cast<acc_t>(softmax_scale);

  // Delta = rowsum(dO * out) - dlse, laid out as lse: (heads_q, total_q). The dot is the same fused
  // multiply-adds, in the same order and depth blocks, as each entry of the dP tile (gemm_micro_tile), so that
  // a row whose probability sits on one key (P = 1 and out = V_j exactly: the first row of every causal mask) gets
  // dP - Delta = 0 exactly, as in PyTorch's softmax backward, rather than the rounding noise of two
  // differently summed dots (which was 15x PyTorch's error in dQ at head dim 59).
  std::vector<acc_t> delta(heads_q * total_q);
  parallel_items(total_q, heads_q * dim, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads_q; ++h) {
        const scalar_t* dout_row = dout + (t * heads_q + h) * dim;
        const scalar_t* out_row = out + (t * heads_q + h) * dim;
        acc_t dot = 0;
        for (int64_t d0 = 0; d0 < dim; d0 += kDepthBlock) {
          acc_t partial = 0;
          for (int64_t d = d0; d < std::min(dim, d0 + kDepthBlock); ++d) {
            partial = std::fma(static_cast<acc_t>(dout_row[d]), static_cast<acc_t>(out_row[d]), partial);
          }
          dot = d0 == 0 ? partial : dot + partial;
        }
        delta[h * total_q + t] = dot - (dlse != nullptr ? static_cast<acc_t>(dlse[h * total_q + t]) : acc_t(0));
      }
    }
  });

  int64_t max_tiles = 1;
  for (const Sequence& seq : seqs) max_tiles = std::max(max_tiles, ceil_div(seq.k_len, kBlockK));
  const int64_t batch = static_cast<int64_t>(seqs.size());
  const int64_t chunks = std::clamp<int64_t>(ceil_div(kMinBackwardTasks, std::max<int64_t>(batch * heads_kv, 1)), 1,
                                             max_tiles);
  // Partial dQ sums, one per key chunk, (chunks, total_q, heads_q, padded_dim); summed in chunk order below.
  std::vector<double> dq_partial(chunks * total_q * heads_q * pdim, 0.0);

  std::vector<BackwardTask> tasks;
  for (int64_t b = 0; b < batch; ++b) {
    const Sequence& seq = seqs[b];
    const int64_t tiles = ceil_div(seq.k_len, kBlockK);
    for (int64_t c = 0; c < chunks; ++c) {
      const auto [first, last] = chunk_tiles(tiles, chunks, c);
      if (first == last) continue;
      int64_t cost = 0;
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t j0 = tile * kBlockK, j1 = std::min(j0 + kBlockK, seq.k_len);
        cost += (j1 - j0) * std::max<int64_t>(0, seq.last_query(j1 - 1) - seq.first_query(j0) + 1);
      }
      for (int64_t h = 0; h < heads_kv; ++h) tasks.push_back({b, h, c, cost * shape.group});
    }
  }

  run_tasks<BackwardTask, BackwardWorkspace<acc_t>>(
      tasks, [&] { return BackwardWorkspace<acc_t>(pdim); },
      [&](const BackwardTask& task, BackwardWorkspace<acc_t>& ws) {
        const Sequence& seq = seqs[task.batch];
        const int64_t kv_stride = heads_kv * dim, q_stride = heads_q * dim;
        const auto [first_tile, last_tile] = chunk_tiles(ceil_div(seq.k_len, kBlockK), chunks, task.chunk);
        for (int64_t tile = first_tile; tile < last_tile; ++tile) {
          const int64_t j0 = tile * kBlockK, cols = std::min(kBlockK, seq.k_len - j0);
          const int64_t padded_cols = round_up(cols, kPad);
          const int64_t kv_offset = ((seq.k_start + j0) * heads_kv + task.kv_head) * dim;
          load_rows(k + kv_offset, kv_stride, cols, dim, ws.k.data(), pdim);
          load_rows_transposed(k + kv_offset, kv_stride, cols, dim, pdim, ws.kt.data(), kBlockK);
          load_rows_transposed(v + kv_offset, kv_stride, cols, dim, pdim, ws.vt.data(), kBlockK);
          std::fill(ws.dk.begin(), ws.dk.end(), 0.0);
          std::fill(ws.dv.begin(), ws.dv.end(), 0.0);

          const int64_t first_query = seq.first_query(j0), last_query = seq.last_query(j0 + cols - 1);
          for (int64_t h = task.kv_head * shape.group; h < (task.kv_head + 1) * shape.group; ++h) {
            for (int64_t i0 = first_query / kBlockQ * kBlockQ; i0 <= last_query; i0 += kBlockQ) {
              const int64_t rows = std::min(kBlockQ, seq.q_len - i0);
              const int64_t token = seq.q_start + i0;
              load_rows(q + (token * heads_q + h) * dim, q_stride, rows, dim, ws.q.data(), pdim);
              load_rows(dout + (token * heads_q + h) * dim, q_stride, rows, dim, ws.dout.data(), pdim);
              for (int64_t r = 0; r < rows; ++r) {
                // P = exp((scale S - hi) - lo) with lse = hi + lo: the first difference is exact where P matters,
                // so P keeps acc_t's relative accuracy; exp(scale S - fp32(lse)) errs by ulp(lse) / 2 (4.8e-7 at
                // lse = 12), which put the fp32 gradients at 3x PyTorch's error (head dim 256).
                const double row_lse = lse[h * total_q + token + r];
                const acc_t high = static_cast<acc_t>(row_lse);
                // A row that sees no key has lse = -inf; +inf makes its P exactly 0.
                ws.lse[r] = row_lse == -kInf<double> ? kInf<acc_t> : high;
                ws.lse_low[r] = std::isfinite(row_lse) ? static_cast<acc_t>(row_lse - high) : acc_t(0);
                ws.delta[r] = delta[h * total_q + token + r];
              }
              // P = exp(scale S - lse), 0 for unseen keys and the padding.
              gemm(rows, padded_cols, pdim, ws.q.data(), pdim, ws.kt.data(), kBlockK, ws.p.data(), kBlockK, false);
              if (padded_cols != cols || !seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
                mask_tile(seq, i0, rows, j0, cols, padded_cols, ws.p.data(), kBlockK);
              }
              // dP = dO V^T into ds, then dS = P (dP - Delta).
              gemm(rows, padded_cols, pdim, ws.dout.data(), pdim, ws.vt.data(), kBlockK, ws.ds.data(), kBlockK, false);
              const Vec scale_vec(scale);
              for (int64_t r = 0; r < rows; ++r) {
                acc_t* p_row = ws.p.data() + r * kBlockK;
                acc_t* ds_row = ws.ds.data() + r * kBlockK;
                const Vec neg_lse(-ws.lse[r]), lse_low(ws.lse_low[r]), row_delta(ws.delta[r]);
                for (int64_t c = 0; c < padded_cols; c += Vec::size()) {
                  const Vec p = vec_exp(at::vec::fmadd(Vec::loadu(p_row + c), scale_vec, neg_lse) - lse_low);
                  p.store(p_row + c);
                  (p * (Vec::loadu(ds_row + c) - row_delta)).store(ds_row + c);
                }
              }
              acc_t* product = ws.product.data();
              gemm<acc_t, /*kTransA=*/true>(cols, pdim, rows, ws.p.data(), kBlockK, ws.dout.data(), pdim, product,
                                             pdim, false);
              add_tile(product, cols, pdim, ws.dv.data(), pdim);
              gemm<acc_t, /*kTransA=*/true>(cols, pdim, rows, ws.ds.data(), kBlockK, ws.q.data(), pdim, product,
                                             pdim, false);
              add_tile(product, cols, pdim, ws.dk.data(), pdim);
              gemm(rows, pdim, cols, ws.ds.data(), kBlockK, ws.k.data(), pdim, product, pdim, false);
              double* dq_rows = dq_partial.data() + ((task.chunk * total_q + token) * heads_q + h) * pdim;
              add_tile(product, rows, pdim, dq_rows, heads_q * pdim);
            }
          }
          for (int64_t r = 0; r < cols; ++r) {
            const int64_t offset = ((seq.k_start + j0 + r) * heads_kv + task.kv_head) * dim;
            store_row(ws.dk.data() + r * pdim, dim, softmax_scale, dk + offset);
            store_row(ws.dv.data() + r * pdim, dim, 1.0, dv + offset);
          }
        }
      });

  // dQ = scale * (sum of the partials, in chunk order).
  parallel_items(total_q * heads_q, chunks * pdim, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(pdim);
    for (int64_t row = begin; row < end; ++row) {
      std::copy_n(dq_partial.data() + row * pdim, pdim, sum.data());
      for (int64_t c = 1; c < chunks; ++c) {
        const double* partial = dq_partial.data() + (c * total_q * heads_q + row) * pdim;
        for (int64_t d = 0; d < pdim; ++d) sum[d] += partial[d];
      }
      store_row(sum.data(), dim, softmax_scale, dq + row * dim);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------------
void check_tokens(const char* op, const char* name, const torch::Tensor& t, const torch::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (tokens, heads, head_dim), got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble, op, ": ",
              name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(dtype == like.scalar_type(), op, ": ", name, " must have q's dtype ", like.scalar_type(), ", got ", dtype);
  TORCH_CHECK(t.size(2) == like.size(2), op, ": ", name, " must have q's head_dim ", like.size(2), ", got ", t.size(2));
}

Shape check_qkv(const char* op, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  check_tokens(op, "q", q, q);
  check_tokens(op, "k", k, q);
  check_tokens(op, "v", v, q);
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

// The saved lse is double for every input dtype, so the backward can recompute P to acc_t accuracy.
torch::ScalarType lse_dtype(const torch::Tensor&) { return at::kDouble; }

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> attention_forward(
    const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const std::optional<torch::Tensor>& cu_seqlens_q, const std::optional<torch::Tensor>& cu_seqlens_k,
    const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right) {
  constexpr const char* op = "attention_forward";
  const Shape shape = check_qkv(op, q, k, v);
  check_softmax_scale(op, softmax_scale);
  const auto seqs = sequences(op, q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                              window_left, window_right);
  auto out = torch::empty_like(q);
  auto lse = torch::empty({shape.heads_q, q.size(0)}, q.options().dtype(lse_dtype(q)));
  if (q.numel() == 0) return {out, lse};
  // Each sequence's path depends on its own query count only, so a sequence gets the same bits alone as
  // packed among others.
  std::vector<Sequence> short_seqs, long_seqs;
  for (const Sequence& seq : seqs) (seq.q_len <= kMaxDecodeQueries ? short_seqs : long_seqs).push_back(seq);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    for (const auto& [kernel, part] : {std::make_pair(attention_decode_kernel<scalar_t>, &short_seqs),
                                       std::make_pair(attention_forward_kernel<scalar_t>, &long_seqs)}) {
      if (part->empty()) continue;
      kernel(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape, *part, q.size(0),
             softmax_scale, out.data_ptr<scalar_t>(), lse.data_ptr<double>());
    }
  });
  return {out, lse};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> attention_backward(
    const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
    const torch::Tensor& out, const torch::Tensor& lse, const std::optional<torch::Tensor>& dlse,
    const std::optional<torch::Tensor>& cu_seqlens_q, const std::optional<torch::Tensor>& cu_seqlens_k,
    const std::optional<torch::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right) {
  constexpr const char* op = "attention_backward";
  const Shape shape = check_qkv(op, q, k, v);
  check_tokens(op, "out", out, q);
  check_tokens(op, "dout", dout, q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), op, ": out and dout must have q's shape ",
              q.sizes(), ", got ", out.sizes(), " and ", dout.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor*>{"lse", &lse},
                                {"dlse", dlse ? &*dlse : nullptr}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == lse_dtype(q) &&
                    t->sizes() == torch::IntArrayRef({shape.heads_q, q.size(0)}),
                op, ": ", name, " must be a contiguous (", shape.heads_q, ", ", q.size(0), ") ", lse_dtype(q),
                " CPU tensor, got ", t->scalar_type(), " of shape ", t->sizes());
  }
  check_softmax_scale(op, softmax_scale);
  const auto seqs = sequences(op, q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                              window_left, window_right);
  auto dq = torch::empty_like(q);
  // Keys past seqused_k take part in nothing: their gradient is 0, and no task writes it.
  auto dk = seqused_k ? torch::zeros_like(k) : torch::empty_like(k);
  auto dv = seqused_k ? torch::zeros_like(v) : torch::empty_like(v);
  if (q.numel() == 0 || k.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    attention_backward_kernel<scalar_t>(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<double>(),
                                        dlse ? dlse->data_ptr<double>() : nullptr, shape, seqs, softmax_scale,
                                        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace fastllm
