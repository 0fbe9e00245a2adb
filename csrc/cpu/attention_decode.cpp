// CPU flash attention, decode: sequences of a few queries (a decoding step's new token), one query row and kv head
// at a time, reading K and V rows where they are (packed rows, or transformers' (batch, heads, positions, head_dim)
// cache in place); and attention_dense, the public ops' one-call entry. Overview: attention.cpp.
#include "attention.h"

namespace fastllm {
namespace {

using namespace attention_cpu;

// ---------------------------------------------------------------------------------------------------------
// Decode: a few queries per sequence (a decoding step's one new token)
// ---------------------------------------------------------------------------------------------------------

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
  // (batch * positions, heads, head_dim) views of k's and v's memory, for the checks and sequences()
  const auto key_rows = [](const torch::Tensor& t) {
    return t.as_strided({t.size(0) * t.size(1), t.size(2), t.size(3)}, {t.stride(1), t.stride(2), 1});
  };
  const torch::Tensor k_rows = key_rows(k), v_rows = key_rows(v);
  const Shape shape = check_qkv(op, q_rows, k_rows, v_rows, /*contiguous_kv=*/false);
  check_softmax_scale(op, softmax_scale);
  const int64_t batch = k.size(0), positions = k.size(1);
  auto seqs = sequences(op, q_rows, k_rows, std::nullopt, std::nullopt, lengths, seqlen_q, positions, window_left,
                        window_right);
  for (int64_t b = 0; b < batch; ++b) seqs[b].k_start = b * (k.stride(0) / k.stride(1));
  auto out = torch::empty_like(q_rows);
  auto lse = torch::empty({shape.heads_q, q_rows.size(0)}, q_rows.options().dtype(lse_dtype(q_rows)));
  if (q_rows.numel() == 0) return {out, lse};
  decode_forward(q_rows, k, v, shape, {k.stride(1), k.stride(2)}, seqs, softmax_scale, out, lse);
  return {out, lse};
}

}  // namespace

namespace attention_cpu {

void decode_forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const Shape& shape,
                    KeyStrides strides, const std::vector<Sequence>& seqs, double softmax_scale, torch::Tensor& out,
                    torch::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_decode", [&] {
    attention_decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shape,
                                      strides, seqs, q.size(0), softmax_scale, out.data_ptr<scalar_t>(),
                                      lse.data_ptr<double>());
  });
}

}  // namespace attention_cpu

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
