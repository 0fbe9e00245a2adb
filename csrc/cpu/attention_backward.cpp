// CPU flash attention, backward: one task per (sequence, kv head, chunk of key tiles), recomputing P from the
// saved lse. Overview and cost: attention.cpp.
#include "attention.h"

namespace fastllm {
namespace {

using namespace attention_cpu;

// The backward splits each sequence's keys into chunks until batch x kv heads x chunks reaches this, so a
// single sequence with one kv head still keeps every core busy. It depends on the shapes only, never on the
// thread count, so the summation order (and the bits of dQ) does not change from machine to machine. Each
// chunk costs a double partial dQ (written, then summed in a pass of its own): at 32, GQA 2 x 16/4 heads x
// 1024 x 128 held 128 MiB of partials and a single head 16, whose page faults and passes took more time
// than the parallelism gained on 2 cores; 8 keeps 4 tasks per core here.
constexpr int64_t kMinBackwardTasks = 8;

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

// The 16-bit path (bf16 / fp16 where use_16bit_tiles: brgemm on the inputs' own values, fp32 sums). P reaches
// dV^T = dO^T P and dS reaches dQ = dS K in two 16-bit parts each (high_part and the rest, ~16 mantissa bits),
// concatenated along the GEMM's depth against a doubled other operand (one call per product); dS reaches
// dK^T = Q^T dS rounded once. Rounded to bf16 once everywhere, as SDPA rounds them, each gradient was as accurate
// as SDPA's call by call, but bf16 trainer runs with Adam at lr 1e-2 (a step of ~lr per element, whatever the
// gradient's size) drifted further from float64 than the unpatched runs did, over 4 seeds: 1.1-5x its loss error
// in tests/integrations/test_transformers_trainer.py (P's split brought it to 0.6-0.95x) and up to 2.3x the
// bound of test_trl.py's DPO run (dQ's split brought it to that of fp32 tiles); splitting dK's dS as well moved
// neither and cost 5-8% (bench/RESULTS.md). dK and dV are summed as dK^T, dV^T in fp32 by the GEMMs themselves
// (the tolerance of a 16-bit gradient), dQ's partials in fp32 through add_C. Key side: K^T and V^T as VNNI-2 B
// operands of S and dP, K (twice) of dQ; query side: Q and dO as the A operands of S and dP (in place when
// head_dim needs no padding), Q^T and dO^T (each row twice) as those of dK^T and dV^T, transposed once per query
// tile, before the tasks.
// Keys per step of the 16-bit path: four tiles, a quarter of the brgemm calls (each has a fixed cost) of one
// (measured 3-7% faster than two tiles, 6-14% than one, bf16 fwd+bwd at T 1024).
constexpr int64_t kKeys16 = 4 * kBlockK;

template <typename scalar_t>
struct BackwardVnniWorkspace {
  // p16: P as the VNNI B operand of dV^T, up to kBlockQ rows twice (high part, then low part); ds16: dS as that
  // of dK^T; ds_rows: dS's high and low parts side by side in each row; k: K twice, dQ's B operand for both.
  std::vector<scalar_t> kt, vt, k, q, dout, p16, ds16, ds_rows;
  std::vector<float> p, ds, lse, lse_low, delta, product, dkt, dvt;
  explicit BackwardVnniWorkspace(int64_t padded_dim)
      : kt(padded_dim * kKeys16), vt(padded_dim * kKeys16), k(2 * kKeys16 * padded_dim), q(kBlockQ * padded_dim),
        dout(kBlockQ * padded_dim), p16(2 * kBlockQ * kKeys16), ds16(kBlockQ * kKeys16),
        ds_rows(kBlockQ * 2 * kKeys16), p(kBlockQ * kKeys16), ds(kBlockQ * kKeys16), lse(kBlockQ),
        lse_low(kBlockQ), delta(kBlockQ), product(kBlockQ * padded_dim), dkt(padded_dim * kKeys16),
        dvt(padded_dim * kKeys16) {}
};

// dst[r * ld_dst + d] += src[r * padded_dim + d]: one tile's share of a gradient, added into its double sum.
// dK, dV and dQ are sums over many tiles (every query tile of every head in a kv group for dK, dV); one fp32
// chain of fmas through all of them loses up to ~5x PyTorch's accuracy at GQA with 257 queries, while fp32
// within a tile and double across tiles matches it, for one add per GEMM output (~1/64 of the GEMM's work).
// With overwrite, dst = src instead (the first tile of a partial dQ, whose memory is left uninitialised).
template <typename acc_t>
void add_tile(const acc_t* src, int64_t rows, int64_t padded_dim, double* dst, int64_t ld_dst,
              bool overwrite = false) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* src_row = src + r * padded_dim;
    double* dst_row = dst + r * ld_dst;
    if (overwrite) {
      for (int64_t d = 0; d < padded_dim; ++d) dst_row[d] = static_cast<double>(src_row[d]);
    } else {
      for (int64_t d = 0; d < padded_dim; ++d) dst_row[d] += static_cast<double>(src_row[d]);
    }
  }
}

// The key tiles [first, last) of chunk `chunk` of `chunks` over a sequence with `tiles` key tiles.
inline std::pair<int64_t, int64_t> chunk_tiles(int64_t tiles, int64_t chunks, int64_t chunk) {
  return {chunk * tiles / chunks, (chunk + 1) * tiles / chunks};
}

template <typename scalar_t, bool kVnni>
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
  // Not zeroed (a pass over all of it): written[(chunk * q_tiles + q tile) * heads_q + head] says whether the
  // chunk reached that tile of one head's dQ, whose first add then overwrites. Each flag has one task.
  std::vector<int64_t> first_q_tile(batch + 1, 0);  // of each sequence, numbering the q tiles of the batch
  for (int64_t b = 0; b < batch; ++b) first_q_tile[b + 1] = first_q_tile[b] + ceil_div(seqs[b].q_len, kBlockQ);
  const int64_t q_tiles = first_q_tile.back();
  std::vector<uint8_t> written(chunks * q_tiles * heads_q, 0);
  // In the 16-bit path the partials are fp32, summed by the dQ GEMM itself (add_C): adding each tile's product
  // into double partials in a pass of its own was half of that backward's time (a read and a write of a
  // strided 64 x D double tile per tile pair).
  using partial_t = std::conditional_t<kVnni, float, double>;
  std::unique_ptr<partial_t[]> dq_partial(new partial_t[chunks * total_q * heads_q * pdim]);

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

  // lse (split into its acc_t part and the remainder) and Delta of rows [token, token + rows) of head h.
  const auto load_row_stats = [&](auto& ws, int64_t h, int64_t token, int64_t rows) {
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
  };
  // P = exp(scale S - lse) over the scores in p, and dS = P (dP - Delta) over dP in ds, both in place.
  const auto probabilities_and_dscores = [&](auto& ws, int64_t rows, int64_t padded_cols, int64_t ld) {
    const Vec scale_vec(scale);
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* p_row = ws.p.data() + r * ld;
      acc_t* ds_row = ws.ds.data() + r * ld;
      const Vec neg_lse(-ws.lse[r]), lse_low(ws.lse_low[r]), row_delta(ws.delta[r]);
      for (int64_t c = 0; c < padded_cols; c += Vec::size()) {
        const Vec p = vec_exp(at::vec::fmadd(Vec::loadu(p_row + c), scale_vec, neg_lse) - lse_low);
        p.store(p_row + c);
        (p * (Vec::loadu(ds_row + c) - row_delta)).store(ds_row + c);
      }
    }
  };
  // The dQ rows of one (chunk, query tile, head): the tile GEMM's product added into the chunk's partial.
  const auto add_dq = [&](const auto* product, const BackwardTask& task, int64_t h, int64_t i0, int64_t token,
                          int64_t rows) {
    auto* dq_rows = dq_partial.get() + ((task.chunk * total_q + token) * heads_q + h) * pdim;
    uint8_t& reached = written[(task.chunk * q_tiles + first_q_tile[task.batch] + i0 / kBlockQ) * heads_q + h];
    add_tile(product, rows, pdim, dq_rows, heads_q * pdim, /*overwrite=*/!reached);
    reached = 1;
  };

  if constexpr (kVnni) {
    // Q^T and dO^T of every (query tile, head), the A operands of dK^T and dV^T, transposed once for all the
    // key tiles that read them. Each row of dO^T twice ([0, depth) and [depth, 2 depth) of 2 kBlockQ columns),
    // so one GEMM of depth 2 depth takes P's high and low parts at once.
    const int64_t qt_elems = pdim * kBlockQ, doutt_elems = pdim * 2 * kBlockQ;
    std::vector<scalar_t> packed_qt(q_tiles * heads_q * qt_elems), packed_doutt(q_tiles * heads_q * doutt_elems);
    parallel_items(q_tiles * heads_q, qt_elems + doutt_elems, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t q_tile = item / heads_q, h = item % heads_q;
        const int64_t b = std::upper_bound(first_q_tile.begin(), first_q_tile.end(), q_tile) - first_q_tile.begin() - 1;
        const int64_t i0 = (q_tile - first_q_tile[b]) * kBlockQ, rows = std::min(kBlockQ, seqs[b].q_len - i0);
        const int64_t depth = round_up(rows, 32), offset = ((seqs[b].q_start + i0) * heads_q + h) * dim;
        load_rows_transposed(q + offset, heads_q * dim, rows, dim, pdim, packed_qt.data() + item * qt_elems, kBlockQ);
        scalar_t* doutt = packed_doutt.data() + item * doutt_elems;
        load_rows_transposed(dout + offset, heads_q * dim, rows, dim, pdim, doutt, 2 * kBlockQ);
        for (int64_t d = 0; d < pdim; ++d) {
          std::copy(doutt + d * 2 * kBlockQ, doutt + d * 2 * kBlockQ + depth, doutt + d * 2 * kBlockQ + depth);
        }
      }
    });
    run_tasks<BackwardTask, BackwardVnniWorkspace<scalar_t>>(
        tasks, [&] { return BackwardVnniWorkspace<scalar_t>(pdim); },
        [&](const BackwardTask& task, BackwardVnniWorkspace<scalar_t>& ws) {
          using at::native::cpublas::brgemm;
          const Sequence& seq = seqs[task.batch];
          const int64_t kv_stride = heads_kv * dim, q_stride = heads_q * dim;
          const auto [first_tile, last_tile] = chunk_tiles(ceil_div(seq.k_len, kBlockK), chunks, task.chunk);
          for (int64_t tile = first_tile; tile < last_tile; tile += kKeys16 / kBlockK) {
            const int64_t j0 = tile * kBlockK;
            const int64_t cols = std::min({kKeys16, (last_tile - tile) * kBlockK, seq.k_len - j0});
            const int64_t padded_cols = round_up(cols, kPad);
            const int64_t kv_offset = ((seq.k_start + j0) * heads_kv + task.kv_head) * dim;
            load_rows_vnni_transposed(k + kv_offset, kv_stride, cols, dim, pdim, padded_cols, ws.kt.data());
            load_rows_vnni_transposed(v + kv_offset, kv_stride, cols, dim, pdim, padded_cols, ws.vt.data());
            load_rows_vnni(k + kv_offset, kv_stride, cols, dim, padded_cols, pdim, ws.k.data());
            std::copy(ws.k.begin(), ws.k.begin() + padded_cols * pdim, ws.k.begin() + padded_cols * pdim);
            std::fill(ws.dkt.begin(), ws.dkt.end(), 0.0f);
            std::fill(ws.dvt.begin(), ws.dvt.end(), 0.0f);

            const int64_t first_query = seq.first_query(j0), last_query = seq.last_query(j0 + cols - 1);
            for (int64_t h = task.kv_head * shape.group; h < (task.kv_head + 1) * shape.group; ++h) {
              for (int64_t i0 = first_query / kBlockQ * kBlockQ; i0 <= last_query; i0 += kBlockQ) {
                const int64_t rows = std::min(kBlockQ, seq.q_len - i0), depth = round_up(rows, 32);
                const int64_t token = seq.q_start + i0;
                const scalar_t* q_rows = q + (token * heads_q + h) * dim;
                const scalar_t* dout_rows = dout + (token * heads_q + h) * dim;
                // Q and dO in place when their rows need no padding, else padded copies.
                int64_t ld_rows = q_stride;
                if (dim != pdim) {
                  load_rows(q_rows, q_stride, rows, dim, ws.q.data(), pdim);
                  load_rows(dout_rows, q_stride, rows, dim, ws.dout.data(), pdim);
                  q_rows = ws.q.data(), dout_rows = ws.dout.data(), ld_rows = pdim;
                }
                const int64_t item = (first_q_tile[task.batch] + i0 / kBlockQ) * heads_q + h;
                const scalar_t* qt = packed_qt.data() + item * qt_elems;
                const scalar_t* doutt = packed_doutt.data() + item * doutt_elems;
                load_row_stats(ws, h, token, rows);
                brgemm(rows, padded_cols, pdim, ld_rows, padded_cols, kKeys16, false, q_rows, ws.kt.data(),
                       ws.p.data(), true);  // S = Q K^T
                if (padded_cols != cols || !seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
                  mask_tile(seq, i0, rows, j0, cols, padded_cols, ws.p.data(), kKeys16);
                }
                brgemm(rows, padded_cols, pdim, ld_rows, padded_cols, kKeys16, false, dout_rows, ws.vt.data(),
                       ws.ds.data(), true);  // dP = dO V^T
                probabilities_and_dscores(ws, rows, padded_cols, kKeys16);
                // P to dV^T and dS to dQ in two 16-bit parts each (high_part and the rest), concatenated along
                // the GEMM's depth: one call of twice the depth per product. dS to dK^T rounded once.
                pack_rows_vnni(ws.p.data(), kKeys16, rows, depth, padded_cols, ws.p16.data(),
                               ws.p16.data() + depth * padded_cols);
                pack_rows_vnni(ws.ds.data(), kKeys16, rows, depth, padded_cols, ws.ds16.data());
                split_rows(ws.ds.data(), kKeys16, rows, padded_cols, ws.ds_rows.data(), 2 * kKeys16);
                brgemm(pdim, padded_cols, 2 * depth, 2 * kBlockQ, padded_cols, kKeys16, true, doutt, ws.p16.data(),
                       ws.dvt.data(), true);  // dV^T += dO^T P
                brgemm(pdim, padded_cols, depth, kBlockQ, padded_cols, kKeys16, true, qt, ws.ds16.data(),
                       ws.dkt.data(), true);  // dK^T += Q^T dS
                float* dq_rows = dq_partial.get() + ((task.chunk * total_q + token) * heads_q + h) * pdim;
                uint8_t& reached = written[(task.chunk * q_tiles + first_q_tile[task.batch] + i0 / kBlockQ) * heads_q + h];
                brgemm(rows, pdim, 2 * padded_cols, 2 * kKeys16, pdim, heads_q * pdim, /*add_C=*/reached != 0,
                       ws.ds_rows.data(), ws.k.data(), dq_rows, true);  // dQ partial (+)= dS K
                reached = 1;
              }
            }
            for (int64_t r = 0; r < cols; ++r) {  // dK and dV rows out of the transposed sums
              const int64_t offset = ((seq.k_start + j0 + r) * heads_kv + task.kv_head) * dim;
              for (int64_t d = 0; d < dim; ++d) ws.product[d] = ws.dkt[d * kKeys16 + r];
              store_row(ws.product.data(), dim, static_cast<float>(softmax_scale), dk + offset);
              for (int64_t d = 0; d < dim; ++d) ws.product[d] = ws.dvt[d * kKeys16 + r];
              store_row(ws.product.data(), dim, 1.0f, dv + offset);
            }
          }
          at::native::cpublas::brgemm_release(/*is_vnni=*/true);
        });
  } else {
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
                load_row_stats(ws, h, token, rows);
                // P = exp(scale S - lse), 0 for unseen keys and the padding.
                gemm(rows, padded_cols, pdim, ws.q.data(), pdim, ws.kt.data(), kBlockK, ws.p.data(), kBlockK, false);
                if (padded_cols != cols || !seq.tile_unmasked(i0, i0 + rows, j0, j0 + cols)) {
                  mask_tile(seq, i0, rows, j0, cols, padded_cols, ws.p.data(), kBlockK);
                }
                // dP = dO V^T into ds, then dS = P (dP - Delta).
                gemm(rows, padded_cols, pdim, ws.dout.data(), pdim, ws.vt.data(), kBlockK, ws.ds.data(), kBlockK, false);
                probabilities_and_dscores(ws, rows, padded_cols, kBlockK);
                acc_t* product = ws.product.data();
                gemm<acc_t, /*kTransA=*/true>(cols, pdim, rows, ws.p.data(), kBlockK, ws.dout.data(), pdim, product,
                                               pdim, false);
                add_tile(product, cols, pdim, ws.dv.data(), pdim);
                gemm<acc_t, /*kTransA=*/true>(cols, pdim, rows, ws.ds.data(), kBlockK, ws.q.data(), pdim, product,
                                               pdim, false);
                add_tile(product, cols, pdim, ws.dk.data(), pdim);
                gemm(rows, pdim, cols, ws.ds.data(), kBlockK, ws.k.data(), pdim, product, pdim, false);
                add_dq(product, task, h, i0, token, rows);
              }
            }
            for (int64_t r = 0; r < cols; ++r) {
              const int64_t offset = ((seq.k_start + j0 + r) * heads_kv + task.kv_head) * dim;
              store_row(ws.dk.data() + r * pdim, dim, softmax_scale, dk + offset);
              store_row(ws.dv.data() + r * pdim, dim, 1.0, dv + offset);
            }
          }
        });
  }

  // dQ = scale * (sum of the partials, in chunk order), over the chunks that reached each row's tile.
  std::vector<int64_t> tile_of_token(total_q);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < seqs[b].q_len; ++i) tile_of_token[seqs[b].q_start + i] = first_q_tile[b] + i / kBlockQ;
  }
  parallel_items(total_q * heads_q, chunks * pdim, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(pdim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t tile = tile_of_token[row / heads_q], h = row % heads_q;
      bool first = true;
      for (int64_t c = 0; c < chunks; ++c) {
        if (!written[(c * q_tiles + tile) * heads_q + h]) continue;
        const partial_t* partial = dq_partial.get() + (c * total_q * heads_q + row) * pdim;
        if (first) {
          std::copy_n(partial, pdim, sum.data());
        } else {
          for (int64_t d = 0; d < pdim; ++d) sum[d] += partial[d];
        }
        first = false;
      }
      if (first) std::fill(sum.begin(), sum.end(), 0.0);  // a row that sees no key
      store_row(sum.data(), dim, softmax_scale, dq + row * dim);
    }
  });
}

}  // namespace

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
    auto kernel = attention_backward_kernel<scalar_t, false>;
    if constexpr (kSixteenBit<scalar_t>) {
      if (use_16bit_tiles<scalar_t>()) kernel = attention_backward_kernel<scalar_t, true>;
    }
    kernel(dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                        v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<double>(),
                                        dlse ? dlse->data_ptr<double>() : nullptr, shape, seqs, softmax_scale,
                                        dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace fastllm
