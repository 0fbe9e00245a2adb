// CPU flash attention, forward: the tiled kernel (FlashAttention-2 order, queries along the vector lanes) and
// the decode kernel for sequences of a few queries (one query row and kv head at a time). Overview: attention.cpp.
#include "attention.h"

namespace fastllm {
namespace {

using namespace attention_cpu;

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

// One task per (sequence, query head, query tile), its cost the number of scores it computes.
std::vector<ForwardTask> forward_tasks(const std::vector<Sequence>& seqs, int64_t heads_q) {
  std::vector<ForwardTask> tasks;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const Sequence& seq = seqs[b];
    for (int64_t i0 = 0; i0 < seq.q_len; i0 += kBlockQ) {
      const int64_t i1 = std::min(i0 + kBlockQ, seq.q_len);
      const int64_t keys = std::max<int64_t>(0, seq.last_key(i1 - 1) - seq.first_key(i0) + 1);
      for (int64_t h = 0; h < heads_q; ++h) tasks.push_back({static_cast<int64_t>(b), h, i0 / kBlockQ, (i1 - i0) * keys});
    }
  }
  return tasks;
}

// The first packed key tile of each sequence's kv head 0 (a prefix sum; the last entry is the total).
inline std::vector<int64_t> first_key_tiles(const std::vector<Sequence>& seqs, int64_t heads_kv) {
  std::vector<int64_t> first_tile(seqs.size() + 1, 0);
  for (size_t b = 0; b < seqs.size(); ++b) first_tile[b + 1] = first_tile[b] + ceil_div(seqs[b].k_len, kBlockK) * heads_kv;
  return first_tile;
}

template <typename acc_t>
struct ForwardWorkspace {
  // Q^T and O^T (padded_dim x kBlockQ), S^T then P^T (kBlockK x kBlockQ), the running max and sum per query,
  // and one output row.
  std::vector<acc_t> qt, ot, st, row_max, row_sum, out_row;
  explicit ForwardWorkspace(int64_t padded_dim)
      : qt(padded_dim * kBlockQ), ot(padded_dim * kBlockQ), st(kBlockK * kBlockQ), row_max(kBlockQ),
        row_sum(kBlockQ), out_row(padded_dim) {}
};

// Keys per step of the 16-bit forward (attention_forward_16bit_kernel below): one brgemm call each way per 512
// keys rather than per 64 (the calls' fixed cost), and one rescale of O per step.
constexpr int64_t kVnniKeys = 8 * kBlockK;

// A finished row's output factor 1 / l and its lse m + log l (in double: the backward splits lse into an acc_t
// high part and the remainder, see there), from its running max m and sum l. l = 0: the row saw no key (output 0,
// lse -inf); a NaN max or sum: a NaN score (outputs and lse NaN).
template <typename acc_t>
inline std::pair<acc_t, double> finish_row(acc_t m, acc_t l) {
  const bool nan = std::isnan(m) || std::isnan(l);
  const acc_t factor = nan ? std::numeric_limits<acc_t>::quiet_NaN() : l > 0 ? acc_t(1) / l : acc_t(0);
  return {factor, nan || l > 0 ? static_cast<double>(m) + std::log(static_cast<double>(l)) : -kInf<double>};
}

// out = O^T's columns / l and lse = m + log l for the task's rows (O^T, m and l in the workspace).
template <typename scalar_t, typename Workspace>
void store_output_rows(const Sequence& seq, int64_t i0, int64_t rows, int64_t head, int64_t heads_q, int64_t dim,
                       int64_t total_q, Workspace& ws, scalar_t* out, double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t m = ws.row_max[r], l = ws.row_sum[r];
    const int64_t token = seq.q_start + i0 + r;
    for (int64_t d = 0; d < dim; ++d) ws.out_row[d] = ws.ot[d * kBlockQ + r];
    const auto [factor, row_lse] = finish_row(m, l);
    store_row(ws.out_row.data(), dim, factor, out + (token * heads_q + head) * dim);
    lse[head * total_q + token] = row_lse;
  }
}

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
  for (int64_t r = 0; r < cols; ++r) tile_max = max_ignoring_nan(tile_max, Vec::loadu(st + r * kBlockQ));
  const Vec old_max = Vec::loadu(m);
  // A NaN score that made it into tile_max makes m NaN for good; one that did not makes l NaN (its exp): either
  // way the row's outputs are NaN at the end (store_output_rows).
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
  const std::vector<int64_t> first_tile = first_key_tiles(seqs, heads_kv);
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

  std::vector<ForwardTask> tasks = forward_tasks(seqs, heads_q);
  using Workspace = ForwardWorkspace<acc_t>;
  run_tasks<ForwardTask, Workspace>(
      tasks, [&] { return Workspace(pdim); },
      [&](const ForwardTask& task, Workspace& ws) {
        const Sequence& seq = seqs[task.batch];
        const int64_t i0 = task.q_tile * kBlockQ, rows = std::min(kBlockQ, seq.q_len - i0);
        const int64_t padded_rows = round_up(rows, kPad);
        const int64_t kv_head = task.head / shape.group;
        const int64_t row_stride = heads_q * dim;
        const scalar_t* q_rows = q + ((seq.q_start + i0) * heads_q + task.head) * dim;
        load_rows_transposed(q_rows, row_stride, rows, dim, pdim, ws.qt.data(), kBlockQ);
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

        store_output_rows(seq, i0, rows, task.head, heads_q, dim, total_q, ws, out, lse);
      });
}

// ---------------------------------------------------------------------------------------------------------
// The 16-bit forward, row-major: S = Q K^T and O += P V on brgemm, queries as rows
// ---------------------------------------------------------------------------------------------------------
// Unlike the fp32 kernel above, this one keeps queries as rows: Q is brgemm's A operand in place, P (rounded
// to scalar_t) the A operand of P V as it is written, and O row-major for the output, while K^T and V are the
// VNNI-2 B operands, packed once per (sequence, kv head) for every query tile and head of the group. A row's
// max and sum are then horizontal reductions, but only two per row per 512-key step; the transposed layout
// cost transposes and lane interleaves on every tile instead (1.4-2x slower on AMX). P is rounded once, as in
// SDPA's bf16 P V: the output's own rounding to bf16 dominates its error (within 1.00x of SDPA's against
// float64), and P in two parts (high + low) cost a second P V GEMM, up to a quarter of the forward (bench/RESULTS.md).
template <typename scalar_t>
struct Forward16Workspace {
  // padded Q rows (when head_dim needs padding), and P of one step rounded to scalar_t
  std::vector<scalar_t> q, p;
  std::vector<float> s, o, row_max, row_sum;
  explicit Forward16Workspace(int64_t padded_dim)
      : q(kBlockQ * padded_dim), p(kBlockQ * kVnniKeys), s(kBlockQ * kVnniKeys),
        o(kBlockQ * padded_dim),
        row_max(kBlockQ), row_sum(kBlockQ) {}
};

template <typename scalar_t>
void attention_forward_16bit_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const Shape& shape,
                                    const std::vector<Sequence>& seqs, int64_t total_q, double softmax_scale,
                                    scalar_t* out, double* lse) {
  using Vec = Vectorized<float>;
  using at::native::cpublas::brgemm;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim, pdim = shape.padded_dim;
  const float scale = static_cast<float>(softmax_scale);

  // Per (sequence, kv head), keys padded to whole tiles (zero past k_len): K^T as one pdim x keys VNNI-2
  // operand (a step is a column range of it, ld = keys) and V as one keys x pdim VNNI-2 operand (a step is a
  // row range).
  const std::vector<int64_t> first_tile = first_key_tiles(seqs, heads_kv);
  const int64_t tile_elems = kBlockK * pdim;
  // Uninitialised (the loads write every element, padding included): a zero-filled vector wrote the buffers twice.
  const std::unique_ptr<scalar_t[]> packed_kt(new scalar_t[first_tile.back() * tile_elems]);
  const std::unique_ptr<scalar_t[]> packed_v(new scalar_t[first_tile.back() * tile_elems]);
  parallel_items(static_cast<int64_t>(seqs.size()) * heads_kv, first_tile.back() * tile_elems / std::max<int64_t>(
                     1, static_cast<int64_t>(seqs.size()) * heads_kv), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads_kv, kv_head = item % heads_kv;
      const Sequence& seq = seqs[b];
      const int64_t keys = ceil_div(seq.k_len, kBlockK) * kBlockK;
      const int64_t base = (first_tile[b] + kv_head * (keys / kBlockK)) * tile_elems;
      const int64_t offset = (seq.k_start * heads_kv + kv_head) * dim;
      load_rows_vnni_transposed(k + offset, heads_kv * dim, seq.k_len, dim, pdim, keys, packed_kt.get() + base);
      load_rows_vnni(v + offset, heads_kv * dim, seq.k_len, dim, keys, pdim, packed_v.get() + base);
    }
  });

  std::vector<ForwardTask> tasks = forward_tasks(seqs, heads_q);
  run_tasks<ForwardTask, Forward16Workspace<scalar_t>>(
      tasks, [&] { return Forward16Workspace<scalar_t>(pdim); },
      [&](const ForwardTask& task, Forward16Workspace<scalar_t>& ws) {
        const Sequence& seq = seqs[task.batch];
        const int64_t i0 = task.q_tile * kBlockQ, rows = std::min(kBlockQ, seq.q_len - i0);
        const int64_t kv_head = task.head / shape.group;
        const int64_t keys = ceil_div(seq.k_len, kBlockK) * kBlockK;
        const int64_t base = (first_tile[task.batch] + kv_head * (keys / kBlockK)) * tile_elems;
        const scalar_t* q_rows = q + ((seq.q_start + i0) * heads_q + task.head) * dim;
        int64_t ld_q = heads_q * dim;
        if (dim != pdim) {
          load_rows(q_rows, ld_q, rows, dim, ws.q.data(), pdim);
          q_rows = ws.q.data(), ld_q = pdim;
        }
        std::fill(ws.o.begin(), ws.o.end(), 0.0f);
        std::fill(ws.row_max.begin(), ws.row_max.end(), -kInf<float>);
        std::fill(ws.row_sum.begin(), ws.row_sum.end(), 0.0f);
        const Vec neg_inf(-kInf<float>);

        const int64_t first_key = seq.first_key(i0), last_key = seq.last_key(i0 + rows - 1);
        for (int64_t j0 = first_key / kBlockK * kBlockK; j0 <= last_key; j0 += kVnniKeys) {
          const int64_t cols = std::min(kVnniKeys, last_key + 1 - j0);  // the step ends at the last key seen
          const int64_t padded_cols = round_up(cols, kPad), depth = round_up(cols, 32);
          brgemm(rows, padded_cols, pdim, ld_q, keys, kVnniKeys, /*add_C=*/false, q_rows,
                 packed_kt.get() + base + 2 * j0, ws.s.data(), /*is_vnni=*/true);  // S = Q K^T
          // -inf for the keys a row does not see and for the padding [cols, padded_cols)
          if (padded_cols != cols || !seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
            mask_tile(seq, i0, rows, j0, cols, padded_cols, ws.s.data(), kVnniKeys);
          }
          for (int64_t r = 0; r < rows; ++r) {
            float* s_row = ws.s.data() + r * kVnniKeys;
            // Four running maxima: one chain of dependent max instructions was latency-bound.
            Vec max0 = neg_inf, max1 = neg_inf, max2 = neg_inf, max3 = neg_inf;
            int64_t c = 0;
            for (; c + 4 * Vec::size() <= padded_cols; c += 4 * Vec::size()) {
              max0 = max_ignoring_nan(max0, Vec::loadu(s_row + c));
              max1 = max_ignoring_nan(max1, Vec::loadu(s_row + c + Vec::size()));
              max2 = max_ignoring_nan(max2, Vec::loadu(s_row + c + 2 * Vec::size()));
              max3 = max_ignoring_nan(max3, Vec::loadu(s_row + c + 3 * Vec::size()));
            }
            for (; c < padded_cols; c += Vec::size()) max0 = max_ignoring_nan(max0, Vec::loadu(s_row + c));
            const Vec step_max = max_ignoring_nan(max_ignoring_nan(max0, max1), max_ignoring_nan(max2, max3));
            const float old_max = ws.row_max[r];
            // NaN-propagating here (once per row and step); a NaN that the running max missed reaches the
            // output through its exp and the row's sum (store below).
            const float new_max = std::isnan(old_max) ? old_max : std::max(old_max, reduce_max(step_max) * scale);
            const float shift = new_max == -kInf<float> ? 0.0f : new_max;  // a row that has seen no key yet
            // P rounded once to scalar_t, as SDPA's P V does
            scalar_t* p_row = ws.p.data() + r * kVnniKeys;
            const float step_sum = exp_row(s_row, padded_cols, scale, shift, p_row);
            std::fill(p_row + round_up(padded_cols, 2 * Vec::size()), p_row + depth, scalar_t(0));
            const float rescale = std::exp(old_max - shift);
            ws.row_sum[r] = ws.row_sum[r] * rescale + step_sum;
            ws.row_max[r] = new_max;
            float* o_row = ws.o.data() + r * pdim;
            if (rescale != 1.0f) {
              for (int64_t d = 0; d < pdim; d += Vec::size()) (Vec::loadu(o_row + d) * Vec(rescale)).store(o_row + d);
            }
          }
          brgemm(rows, pdim, depth, kVnniKeys, pdim, pdim, /*add_C=*/true, ws.p.data(),  // O += P V
                 packed_v.get() + base + j0 * pdim, ws.o.data(), /*is_vnni=*/true);
        }
        at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // AMX's tile state

        for (int64_t r = 0; r < rows; ++r) {
          const float m = ws.row_max[r], l = ws.row_sum[r];
          const int64_t token = seq.q_start + i0 + r;
          const auto [factor, row_lse] = finish_row(m, l);
          store_row(ws.o.data() + r * pdim, dim, factor, out + (token * heads_q + task.head) * dim);
          lse[task.head * total_q + token] = row_lse;
        }
      });
}

// The tiled forward for this dtype: the 16-bit brgemm path where this CPU's oneDNN has it and the engine is blas.
template <typename scalar_t>
auto tiled_forward_kernel() {
  if constexpr (kSixteenBit<scalar_t>) {
    if (use_16bit_tiles<scalar_t>()) return &attention_forward_16bit_kernel<scalar_t>;
  }
  return &attention_forward_kernel<scalar_t>;
}

// ---------------------------------------------------------------------------------------------------------
// Decode: a few queries per sequence (a decoding step's one new token)
// ---------------------------------------------------------------------------------------------------------
// A sequence with this many queries or fewer runs one query row at a time, reading K and V rows
// straight from the cache: the tiled path would pack every key into K and V^T tiles (a second pass over the
// cache) and pad the one query to a 16-wide vector (16x the score work), 4x slower than SDPA at batch 8 (measured
// on the per-head kernel this one replaced).
constexpr int64_t kMaxDecodeQueries = 4;

// Keys staged per block (16-bit rows converted to acc_t once, for every query head of their kv head), and query
// heads whose P V sums are held in registers together.
constexpr int64_t kDecodeKeyBlock = 32;
constexpr int kDecodeHeadGroup = 4;

// The rows [j0, j0 + n) of one kv head of K or V (row_of(j) points at row j) as acc_t rows, rows[r]: the cache
// rows themselves when they are acc_t, else converted into stage (kDecodeKeyBlock rows of padded_dim).
template <typename scalar_t, typename acc_t, typename RowOf>
inline void stage_rows(const RowOf& row_of, int64_t j0, int64_t n, int64_t dim, int64_t padded_dim, acc_t* stage,
                       const acc_t** rows) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* src = row_of(j0 + r);
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      rows[r] = src;
    } else {
      at::vec::convert(src, stage + r * padded_dim, dim);  // the padding past dim stays 0 from the start
      rows[r] = stage + r * padded_dim;
    }
  }
}

// Vector c of a row of dim elements, zero past dim (a cache row's next elements belong to another head).
template <typename acc_t>
inline Vectorized<acc_t> load_chunk(const acc_t* row, int64_t c, int64_t dim) {
  using Vec = Vectorized<acc_t>;
  const int64_t at = c * Vec::size();
  return at + Vec::size() <= dim ? Vec::loadu(row + at) : Vec::loadu(row + at, dim - at);
}

// out[g][c] += sum over the block's rows r of p[g][r] * rows[r][c] for kHeads query heads g and the kChunks
// vectors from c0: each V vector is loaded once for the kHeads heads, and the kHeads x kChunks sums are
// independent chains held in registers across the block (one chain per head would wait on each fma's latency).
template <int kHeads, int kChunks, typename acc_t>
inline void accumulate_pv(const acc_t* const* p, const acc_t* const* rows, int64_t n, int64_t c0, int64_t dim,
                          acc_t* const* out) {
  using Vec = Vectorized<acc_t>;
  Vec sums[kHeads][kChunks];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < kChunks; ++c) sums[g][c] = Vec(acc_t(0));
  for (int64_t r = 0; r < n; ++r) {
    for (int c = 0; c < kChunks; ++c) {
      const Vec v = load_chunk(rows[r], c0 + c, dim);
      for (int g = 0; g < kHeads; ++g) sums[g][c] = at::vec::fmadd(Vec(p[g][r]), v, sums[g][c]);
    }
  }
  for (int g = 0; g < kHeads; ++g) {
    for (int c = 0; c < kChunks; ++c) {
      acc_t* o = out[g] + (c0 + c) * Vec::size();
      (Vec::loadu(o) + sums[g][c]).store(o);
    }
  }
}

template <int kHeads, typename acc_t>
inline void accumulate_pv_all(const acc_t* const* p, const acc_t* const* rows, int64_t n, int64_t chunks,
                              int64_t dim, acc_t* const* out) {
  int64_t c = 0;
  for (; c + 4 <= chunks; c += 4) accumulate_pv<kHeads, 4>(p, rows, n, c, dim, out);
  for (; c < chunks; ++c) accumulate_pv<kHeads, 1>(p, rows, n, c, dim, out);
}

// scores[r] = (q . rows[r]) * scale for the block's n rows, four rows' dot products as independent chains.
template <typename acc_t>
inline void block_scores(const acc_t* q_row, const acc_t* const* rows, int64_t n, int64_t chunks, int64_t dim,
                         acc_t scale, acc_t* scores) {
  using Vec = Vectorized<acc_t>;
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      const Vec qc = Vec::loadu(q_row + c * Vec::size());
      s0 = at::vec::fmadd(qc, load_chunk(rows[r], c, dim), s0);
      s1 = at::vec::fmadd(qc, load_chunk(rows[r + 1], c, dim), s1);
      s2 = at::vec::fmadd(qc, load_chunk(rows[r + 2], c, dim), s2);
      s3 = at::vec::fmadd(qc, load_chunk(rows[r + 3], c, dim), s3);
    }
    scores[r] = reduce_sum(s0) * scale;
    scores[r + 1] = reduce_sum(s1) * scale;
    scores[r + 2] = reduce_sum(s2) * scale;
    scores[r + 3] = reduce_sum(s3) * scale;
  }
  for (; r < n; ++r) {
    Vec sum(acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      sum = at::vec::fmadd(Vec::loadu(q_row + c * Vec::size()), load_chunk(rows[r], c, dim), sum);
    }
    scores[r] = reduce_sum(sum) * scale;
  }
}

// The NaN-propagating max of s[0, n) (-inf for n = 0).
template <typename acc_t>
inline acc_t row_max_propagating_nan(const acc_t* s, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec m_vec(-kInf<acc_t>);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) m_vec = at::vec::maximum(m_vec, Vec::loadu(s + j));
  if (j < n) m_vec = at::vec::maximum(m_vec, Vec::set(Vec(-kInf<acc_t>), Vec::loadu(s + j, n - j), n - j));
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return at::vec::maximum(x, y); }, m_vec);
}

// Where the decode kernel finds K and V rows: key token t of kv head h at base + t * token + h * head. Packed
// tensors have token = heads_kv * head_dim and head = head_dim; transformers' (batch, heads, positions, head_dim)
// cache, read in place, has token = head_dim and head = positions * head_dim (its sequences' k_start then count
// rows of `token`).
struct KeyStrides {
  int64_t token, head;
};

// The same outputs and lse as attention_forward_kernel, one (sequence, query, kv head) per task: the group's
// query heads share each K and V row as it is read (and converted, in 16 bits). Per head: scores against every
// visible key, their max, exp, then the weighted sum of V rows.
template <typename scalar_t>
void attention_decode_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const Shape& shape,
                             KeyStrides strides, const std::vector<Sequence>& seqs, int64_t total_q,
                             double softmax_scale, scalar_t* out, double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim, group = shape.group;
  const int64_t chunks = ceil_div(dim, Vec::size()), padded_dim = chunks * Vec::size();
  const acc_t scale = static_cast<acc_t>(softmax_scale);
  std::vector<int64_t> first_task(seqs.size() + 1, 0);  // tasks of sequence b: (query, kv head) pairs
  int64_t max_keys = 1;
  for (size_t b = 0; b < seqs.size(); ++b) {
    first_task[b + 1] = first_task[b] + seqs[b].q_len * heads_kv;
    max_keys = std::max(max_keys, seqs[b].k_len);
  }
  parallel_items(first_task.back(), max_keys * dim * group, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_rows(group * padded_dim, acc_t(0)), scores(group * max_keys), out_rows(group * padded_dim),
        stage(std::is_same_v<scalar_t, acc_t> ? 0 : kDecodeKeyBlock * padded_dim, acc_t(0)),  // acc_t rows: unused
        row_max(group), row_sum(group);
    const acc_t* rows[kDecodeKeyBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const Sequence& seq = seqs[b];
      const int64_t i = (task - first_task[b]) / heads_kv, kv_head = (task - first_task[b]) % heads_kv;
      const int64_t token = seq.q_start + i, first_head = kv_head * group;
      for (int64_t g = 0; g < group; ++g) {
        at::vec::convert(q + (token * heads_q + first_head + g) * dim, q_rows.data() + g * padded_dim, dim);
      }
      const int64_t first = seq.first_key(i), keys = std::max<int64_t>(0, seq.last_key(i) - first + 1);
      const auto row_of = [&](const scalar_t* base) {
        return [&seq, base, first, kv_head, strides](int64_t j) {
          return base + (seq.k_start + first + j) * strides.token + kv_head * strides.head;
        };
      };
      for (int64_t j0 = 0; j0 < keys; j0 += kDecodeKeyBlock) {
        const int64_t n = std::min(kDecodeKeyBlock, keys - j0);
        stage_rows<scalar_t>(row_of(k), j0, n, dim, padded_dim, stage.data(), rows);
        for (int64_t g = 0; g < group; ++g) {
          block_scores(q_rows.data() + g * padded_dim, rows, n, chunks, dim, scale, scores.data() + g * max_keys + j0);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        acc_t* s = scores.data() + g * max_keys;
        row_max[g] = row_max_propagating_nan(s, keys);
        // As in the tiled forward: a row whose scores are all -inf shifts by 0 (its p are then 0).
        const acc_t shift = row_max[g] == -kInf<acc_t> ? acc_t(0) : row_max[g];
        Vec sum_vec(acc_t(0));
        int64_t j = 0;
        for (; j + Vec::size() <= keys; j += Vec::size()) {
          const Vec p = vec_exp(Vec::loadu(s + j) - Vec(shift));
          p.store(s + j);
          sum_vec = sum_vec + p;
        }
        acc_t l = reduce_sum(sum_vec);
        for (; j < keys; ++j) {
          s[j] = std::isnan(s[j]) ? s[j] : std::exp(s[j] - shift);
          l += s[j];
        }
        row_sum[g] = l;
      }
      std::fill(out_rows.begin(), out_rows.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < keys; j0 += kDecodeKeyBlock) {
        const int64_t n = std::min(kDecodeKeyBlock, keys - j0);
        stage_rows<scalar_t>(row_of(v), j0, n, dim, padded_dim, stage.data(), rows);
        for (int64_t g0 = 0; g0 < group; g0 += kDecodeHeadGroup) {
          const acc_t* p[kDecodeHeadGroup];
          acc_t* o[kDecodeHeadGroup];
          const int heads = static_cast<int>(std::min<int64_t>(kDecodeHeadGroup, group - g0));
          for (int g = 0; g < heads; ++g) {
            p[g] = scores.data() + (g0 + g) * max_keys + j0;
            o[g] = out_rows.data() + (g0 + g) * padded_dim;
          }
          switch (heads) {
            case 4: accumulate_pv_all<4>(p, rows, n, chunks, dim, o); break;
            case 3: accumulate_pv_all<3>(p, rows, n, chunks, dim, o); break;
            case 2: accumulate_pv_all<2>(p, rows, n, chunks, dim, o); break;
            default: accumulate_pv_all<1>(p, rows, n, chunks, dim, o); break;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t head = first_head + g;
        const auto [factor, row_lse] = finish_row(row_max[g], row_sum[g]);
        store_row(out_rows.data() + g * padded_dim, dim, factor, out + (token * heads_q + head) * dim);
        lse[head * total_q + token] = row_lse;
      }
    }
  });
}

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
    if (!short_seqs.empty()) {
      attention_decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape,
                                        {shape.heads_kv * shape.head_dim, shape.head_dim}, short_seqs, q.size(0),
                                        softmax_scale, out.data_ptr<scalar_t>(), lse.data_ptr<double>());
    }
    if (!long_seqs.empty()) {
      tiled_forward_kernel<scalar_t>()(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape,
                                       long_seqs, q.size(0), softmax_scale, out.data_ptr<scalar_t>(),
                                       lse.data_ptr<double>());
    }
  });
  return {out, lse};
}

namespace {

// A decode call (at most kMaxDecodeQueries queries a sequence) on 4-D k and v of one layout that the decode kernel
// reads in place: head_dim contiguous, and each sequence's first key a whole number of token strides from the base.
bool decode_reads_in_place(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  return q.size(1) <= kMaxDecodeQueries && !k.is_contiguous() && k.strides() == v.strides() && k.stride(3) == 1 &&
         k.stride(1) > 0 && k.stride(2) >= 0 && k.stride(0) >= 0 && k.stride(0) % k.stride(1) == 0;
}

// attention_dense's decode over strided k and v (transformers' cache, transposed), without copying them.
std::tuple<torch::Tensor, torch::Tensor> attention_decode_in_place(
    const char* op, const torch::Tensor& q_rows, const torch::Tensor& k, const torch::Tensor& v,
    const std::optional<torch::Tensor>& lengths, int64_t seqlen_q, double softmax_scale, int64_t window_left,
    int64_t window_right) {
  check_tokens(op, "q", q_rows, q_rows);
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == q_rows.scalar_type(), op, ": ", name, " must have q's dtype ",
                q_rows.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.size(3) == q_rows.size(2), op, ": ", name, " must have q's head_dim ", q_rows.size(2), ", got ",
                t.size(3));
  }
  const int64_t heads_q = q_rows.size(1), heads_kv = k.size(2), dim = q_rows.size(2);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, op, ": q's heads (", heads_q,
              ") must be a multiple of k's heads (", heads_kv, ")");
  check_softmax_scale(op, softmax_scale);
  const Shape shape{heads_q, heads_kv, heads_q / heads_kv, dim, round_up(dim, kPad)};
  const int64_t batch = k.size(0), positions = k.size(1);
  // sequences() reads the key count from k's first size: a (batch * positions, heads, head_dim) view of k's memory
  const torch::Tensor key_rows = k.as_strided({batch * positions, heads_kv, dim}, {k.stride(1), k.stride(2), 1});
  auto seqs = sequences(op, q_rows, key_rows, std::nullopt, std::nullopt, lengths, seqlen_q, positions, window_left,
                        window_right);
  for (int64_t b = 0; b < batch; ++b) seqs[b].k_start = b * (k.stride(0) / k.stride(1));
  auto out = torch::empty_like(q_rows);
  auto lse = torch::empty({heads_q, q_rows.size(0)}, q_rows.options().dtype(lse_dtype(q_rows)));
  if (q_rows.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_rows.scalar_type(), "attention_dense", [&] {
    attention_decode_kernel<scalar_t>(q_rows.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                                      shape, {k.stride(1), k.stride(2)}, seqs, q_rows.size(0), softmax_scale,
                                      out.data_ptr<scalar_t>(), lse.data_ptr<double>());
  });
  return {out, lse};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> attention_dense(const torch::Tensor& q, const torch::Tensor& k,
                                                         const torch::Tensor& v,
                                                         const std::optional<torch::Tensor>& kv_lengths,
                                                         double softmax_scale, int64_t window_left,
                                                         int64_t window_right) {
  constexpr const char* op = "attention_dense";
  for (const auto& [name, t] : {std::pair<const char*, const torch::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (batch, positions, heads, head_dim), got shape ",
                t.sizes());
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.sizes() == k.sizes(), op, ": k and v must have one shape with q's batch ",
              q.size(0), ", got ", k.sizes(), " and ", v.sizes());
  std::optional<torch::Tensor> lengths;
  if (kv_lengths) {
    TORCH_CHECK(kv_lengths->scalar_type() == at::kInt || kv_lengths->scalar_type() == at::kLong, op,
                ": kv_lengths must be int32 or int64, got ", kv_lengths->scalar_type());
    lengths = kv_lengths->to(at::kInt);
  }
  const auto rows = [](const torch::Tensor& t) {
    return t.contiguous().view({t.size(0) * t.size(1), t.size(2), t.size(3)});
  };
  if (decode_reads_in_place(q, k, v)) {  // transformers' cache, transposed: read where it is
    auto [out, lse] = attention_decode_in_place(op, rows(q), k, v, lengths, q.size(1), softmax_scale, window_left,
                                                window_right);
    return {out.view(q.sizes()), lse};
  }
  // Other strided views are copied here, where the copy costs no Python call.
  auto [out, lse] = attention_forward(rows(q), rows(k), rows(v), std::nullopt, std::nullopt, lengths, q.size(1),
                                      k.size(1), softmax_scale, window_left, window_right);
  return {out.view(q.sizes()), lse};
}

}  // namespace fastllm
