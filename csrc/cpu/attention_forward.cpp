// CPU flash attention, forward: the tiled kernel (FlashAttention-2 order, queries along the vector lanes); sequences
// of a few queries go to the decode kernel (attention_decode.cpp). Overview: attention.cpp.
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
  if (!short_seqs.empty()) {
    decode_forward(q, k, v, shape, {shape.heads_kv * shape.head_dim, shape.head_dim}, short_seqs, softmax_scale, out,
                   lse);
  }
  if (long_seqs.empty()) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), op, [&] {
    tiled_forward_kernel<scalar_t>()(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape,
                                     long_seqs, q.size(0), softmax_scale, out.data_ptr<scalar_t>(),
                                     lse.data_ptr<double>());
  });
  return {out, lse};
}

}  // namespace fastllm
