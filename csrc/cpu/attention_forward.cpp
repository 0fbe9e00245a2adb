// CPU flash attention, forward: the tiled kernel (FlashAttention-2 order, queries along the vector lanes) and
// the row-at-a-time decode kernel for sequences of a few queries. Overview: attention.cpp.
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

template <typename acc_t, typename tile_t>
struct ForwardWorkspace {
  // Q^T (padded_dim x kBlockQ, in tile_t: VNNI-2 pairs in the 16-bit path) and O^T (padded_dim x kBlockQ),
  // S^T then P^T (keys x kBlockQ, keys = one step's), P^T as the 16-bit path's VNNI-2 operand, the running max
  // and sum per query, and one output row.
  std::vector<tile_t> qt, pt;
  std::vector<acc_t> ot, st, row_max, row_sum, out_row;
  ForwardWorkspace(int64_t padded_dim, int64_t keys, bool vnni)
      : qt(padded_dim * kBlockQ), pt(vnni ? keys * kBlockQ : 0), ot(padded_dim * kBlockQ), st(keys * kBlockQ),
        row_max(kBlockQ), row_sum(kBlockQ), out_row(padded_dim) {}
};

// ---------------------------------------------------------------------------------------------------------
// The 16-bit path: bf16 / fp16 tiles through oneDNN's brgemm (AMX or avx512-bf16 dot products)
// ---------------------------------------------------------------------------------------------------------
// On CPUs whose oneDNN has 16-bit brgemm micro-kernels (cpublas::could_pack), a bf16 or fp16 forward keeps
// Q, K and V in their own dtype and accumulates in fp32: on a Sapphire Rapids core AMX runs a 64 x 64 x 64
// tile at ~0.7 TFLOP/s against ~0.18 for fp32 brgemm. Its steps take kVnniKeys keys at once (one brgemm call
// each way per 256 keys rather than per 64: the calls' fixed cost, and one rescale of O^T per step). P is rounded to the input dtype before P V, as SDPA's
// and FlashAttention's kernels do; the softmax is the fp32 code above. brgemm takes B in VNNI-2 order:
// element (k, n) of a K x N operand at [(k / 2) * 2N + 2n + k % 2], pairs of depth terms side by side.

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
    // l = 0: the row saw no key (output 0, lse -inf); a NaN max or sum: a NaN score (outputs NaN).
    const bool nan = std::isnan(m) || std::isnan(l);
    const acc_t factor = nan ? std::numeric_limits<acc_t>::quiet_NaN() : l > 0 ? acc_t(1) / l : acc_t(0);
    store_row(ws.out_row.data(), dim, factor, out + (token * heads_q + head) * dim);
    // In double: the backward splits lse into an acc_t high part and the remainder (see there).
    lse[head * total_q + token] =
        nan || l > 0 ? static_cast<double>(m) + std::log(static_cast<double>(l)) : -kInf<double>;
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

// The online softmax step for one key tile (or step) and the 16 (or 8) queries of one vector column c of S^T:
// folds scale * S^T[0, cols) into the running max m and sum l, rescales that column of O^T and leaves
// P^T = exp(scale S^T - m) in place; or, given `vnni` (the 16-bit path), writes P^T rounded to vnni_t there in
// VNNI-2 order (this column's offset applied, n queries per row pair), zero in rows [cols, depth).
template <typename acc_t, typename vnni_t = acc_t>
inline void online_softmax_column(acc_t* st, int64_t cols, acc_t* ot, int64_t padded_dim, acc_t* m, acc_t* l,
                                  acc_t scale, vnni_t* vnni = nullptr, int64_t depth = 0, int64_t n = 0) {
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
  const auto p_of = [&](int64_t r) { return vec_exp(at::vec::fmadd(Vec::loadu(st + r * kBlockQ), scale_vec, neg_shift)); };
  Vec sum = zero;
  if constexpr (std::is_same_v<vnni_t, acc_t>) {
    for (int64_t r = 0; r < cols; ++r) {
      const Vec p = p_of(r);
      p.store(st + r * kBlockQ);
      sum = sum + p;
    }
  } else {
    for (int64_t r = 0; r < depth; r += 2) {  // key rows r and r + 1, interleaved lane by lane
      const Vec p0 = r < cols ? p_of(r) : zero, p1 = r + 1 < cols ? p_of(r + 1) : zero;
      sum = sum + p0 + p1;
      const auto [low, high] = at::vec::interleave2(p0, p1);
      at::vec::convert_from_float<vnni_t>(low, high).store(vnni + r * n);
    }
  }
  const Vec rescale = vec_exp(old_max - shift);
  at::vec::fmadd(Vec::loadu(l), rescale, sum).store(l);
  new_max.store(m);
  for (int64_t d = 0; d < padded_dim; ++d) (Vec::loadu(ot + d * kBlockQ) * rescale).store(ot + d * kBlockQ);
}

// kVnni: the 16-bit path above (tiles in scalar_t, brgemm); otherwise tiles in acc_t and tile_gemm.
template <typename scalar_t, bool kVnni>
void attention_forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const Shape& shape,
                              const std::vector<Sequence>& seqs, int64_t total_q, double softmax_scale, scalar_t* out,
                              double* lse) {
  using acc_t = at::opmath_type<scalar_t>;
  using tile_t = std::conditional_t<kVnni, scalar_t, acc_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t heads_q = shape.heads_q, heads_kv = shape.heads_kv, dim = shape.head_dim, pdim = shape.padded_dim;
  const acc_t scale = static_cast<acc_t>(softmax_scale);

  // K and V^T of every (sequence, kv head) in tile_t, packed once and shared by every query tile and head of
  // the group, rather than converted per (query tile, key tile) pair: K as (keys, padded_dim) rows, kBlockK
  // per tile; V^T as one padded_dim x (tiles x kBlockK) matrix per head, so that a step of several tiles is
  // one GEMM operand. Both zero past the keys.
  const std::vector<int64_t> first_tile = first_key_tiles(seqs, heads_kv);
  const int64_t tile_elems = kBlockK * pdim;
  std::vector<tile_t> packed_k(first_tile.back() * tile_elems), packed_vt(first_tile.back() * tile_elems);
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
      tile_t* vt_head = packed_vt.data() + (first_tile[b] + kv_head * tiles_per_head) * tile_elems;
      load_rows_transposed(v + offset, heads_kv * dim, rows, dim, pdim, vt_head + j0, tiles_per_head * kBlockK,
                           kBlockK);
    }
  });

  std::vector<ForwardTask> tasks = forward_tasks(seqs, heads_q);
  constexpr int64_t kStep = kVnni ? kVnniKeys : kBlockK;  // keys per step
  using Workspace = ForwardWorkspace<acc_t, tile_t>;
  run_tasks<ForwardTask, Workspace>(
      tasks, [&] { return Workspace(pdim, kStep, kVnni); },
      [&](const ForwardTask& task, Workspace& ws) {
        const Sequence& seq = seqs[task.batch];
        const int64_t i0 = task.q_tile * kBlockQ, rows = std::min(kBlockQ, seq.q_len - i0);
        const int64_t padded_rows = round_up(rows, kPad);
        const int64_t kv_head = task.head / shape.group;
        const int64_t row_stride = heads_q * dim;
        const scalar_t* q_rows = q + ((seq.q_start + i0) * heads_q + task.head) * dim;
        if constexpr (kVnni) {
          load_rows_vnni_transposed(q_rows, row_stride, rows, dim, pdim, padded_rows, ws.qt.data());
        } else {
          load_rows_transposed(q_rows, row_stride, rows, dim, pdim, ws.qt.data(), kBlockQ);
        }
        std::fill(ws.ot.begin(), ws.ot.end(), acc_t(0));
        std::fill(ws.row_max.begin(), ws.row_max.end(), -kInf<acc_t>);
        std::fill(ws.row_sum.begin(), ws.row_sum.end(), acc_t(0));

        const int64_t first_key = seq.first_key(i0), last_key = seq.last_key(i0 + rows - 1);
        const int64_t tiles_per_head = ceil_div(seq.k_len, kBlockK);
        const tile_t* vt_head = packed_vt.data() + (first_tile[task.batch] + kv_head * tiles_per_head) * tile_elems;
        for (int64_t j0 = first_key / kBlockK * kBlockK; j0 <= last_key; j0 += kStep) {
          // The 16-bit path's step ends at the last key a row sees (the rest of a tile only costs exp(-inf)).
          const int64_t cols = kVnni ? std::min(kStep, last_key + 1 - j0) : std::min(kBlockK, seq.k_len - j0);
          const int64_t tile = first_tile[task.batch] + kv_head * tiles_per_head + j0 / kBlockK;
          const tile_t* k_rows = packed_k.data() + tile * tile_elems;  // the step's tiles are consecutive
          if constexpr (kVnni) {
            at::native::cpublas::brgemm(cols, padded_rows, pdim, pdim, padded_rows, kBlockQ, /*add_C=*/false, k_rows,
                                        ws.qt.data(), ws.st.data(), /*is_vnni=*/true);
          } else {
            // Not tile_gemm: the backward recomputes these scores with the register micro-kernel, and the two
            // must agree bit for bit (brgemm sums in another order: P = 1 came back 6 ulp off at head dim 256).
            gemm(cols, padded_rows, pdim, k_rows, pdim, ws.qt.data(), kBlockQ, ws.st.data(), kBlockQ,
                 /*accumulate=*/false);
          }
          // Padding queries (rows <= c < padded_rows) need no mask: their zero Q gives finite scores, and
          // nothing of theirs is stored.
          if (!seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
            mask_tile_transposed(seq, i0, padded_rows, j0, cols, ws.st.data(), kBlockQ);
          }
          const int64_t ld_vt = tiles_per_head * kBlockK;
          if constexpr (kVnni) {
            // P^T goes to the VNNI operand with zero rows up to a depth of whole 32-key blocks; V^T has those
            // columns (its rows are whole tiles long), and 0 * V leaves them out.
            const int64_t depth = round_up(cols, 32);
            for (int64_t c = 0; c < padded_rows; c += Vec::size()) {
              online_softmax_column(ws.st.data() + c, cols, ws.ot.data() + c, pdim, ws.row_max.data() + c,
                                    ws.row_sum.data() + c, scale, ws.pt.data() + 2 * c, depth, padded_rows);
            }
            at::native::cpublas::brgemm(pdim, padded_rows, depth, ld_vt, padded_rows, kBlockQ, /*add_C=*/true,
                                        vt_head + j0, ws.pt.data(), ws.ot.data(), /*is_vnni=*/true);
          } else {
            for (int64_t c = 0; c < padded_rows; c += Vec::size()) {
              online_softmax_column(ws.st.data() + c, cols, ws.ot.data() + c, pdim, ws.row_max.data() + c,
                                    ws.row_sum.data() + c, scale);
            }
            tile_gemm(pdim, padded_rows, cols, vt_head + j0, ld_vt, ws.st.data(), kBlockQ, ws.ot.data(), kBlockQ,
                      /*accumulate=*/true);
          }
        }
        if constexpr (kVnni) at::native::cpublas::brgemm_release(/*is_vnni=*/true);  // AMX's tile state

        store_output_rows(seq, i0, rows, task.head, heads_q, dim, total_q, ws, out, lse);
      });
}

// The tiled forward for this dtype: the 16-bit brgemm path where this CPU's oneDNN has it and the engine is blas.
template <typename scalar_t>
auto tiled_forward_kernel() {
  if constexpr (kSixteenBit<scalar_t>) {
    if (use_16bit_tiles<scalar_t>()) return &attention_forward_kernel<scalar_t, true>;
  }
  return &attention_forward_kernel<scalar_t, false>;
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
    const auto tiled = tiled_forward_kernel<scalar_t>();
    for (const auto& [kernel, part] : {std::make_pair(attention_decode_kernel<scalar_t>, &short_seqs),
                                       std::make_pair(tiled, &long_seqs)}) {
      if (part->empty()) continue;
      kernel(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape, *part, q.size(0),
             softmax_scale, out.data_ptr<scalar_t>(), lse.data_ptr<double>());
    }
  });
  return {out, lse};
}

}  // namespace fastllm
