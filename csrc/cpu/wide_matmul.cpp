// out = beta * out + a @ b with 16-bit operands (bf16 or fp16) and a float32 out, in one BLAS call: the
// products and their sums stay in fp32 and nothing is rounded to 16 bits. The fused linear heads
// (fastllm/ops/_chunked_head.py) use it for gradients that are summed over chunks in fp32 or returned in fp32
// (mixed precision's fp32 master weights): torch's CPU matmul has no 16-bit x 16-bit -> fp32 form, so without
// it they either upcast the operands (fp32 FMA rate, ~5x slower) or round each chunk's product to 16 bits and
// add it (an extra pass over the V x H accumulator per chunk).
//
// The GEMM is MKL's cblas_gemm_{bf16bf16,f16f16}f32, which x86 builds of torch link statically and export
// (AMX or avx512_bf16 where the CPU has them). It is looked up weakly: a torch without MKL (ARM, macOS) leaves
// it null, wide_matmul_available() says so, and the caller keeps its torch-only path.
#include "fastllm.h"

#include <climits>

extern "C" {
// MKL's LP64 CBLAS interface (MKL_INT = int), the one torch links; enums as MKL defines them.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}

namespace fastllm {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// A row-major view of a 2-D operand for CBLAS: as it is (rows contiguous) or as the transpose of a row-major
// matrix (columns contiguous, e.g. x.t()); anything else is copied first.
struct BlasOperand {
  torch::Tensor tensor;  // keeps a copy alive
  int transpose;
  int64_t leading;
};

BlasOperand blas_operand(const torch::Tensor& t) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) return {t, kNoTrans, t.stride(0)};
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) return {t, kTrans, t.stride(1)};
  torch::Tensor copy = t.contiguous();
  return {copy, kNoTrans, std::max<int64_t>(1, copy.size(1))};
}

bool fits_int(int64_t n) { return n <= INT_MAX; }

}  // namespace

bool wide_matmul_available(torch::ScalarType dtype) {
  if (dtype == torch::kBFloat16) return cblas_gemm_bf16bf16f32 != nullptr;
  if (dtype == torch::kHalf) return cblas_gemm_f16f16f32 != nullptr;
  return false;
}

void wide_addmm_(torch::Tensor& out, const torch::Tensor& a, const torch::Tensor& b, double beta) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, "wide_addmm_: out, a and b must be 2-D, got ",
              out.dim(), "-D, ", a.dim(), "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "wide_addmm_: a and b must have one dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(wide_matmul_available(a.scalar_type()), "wide_addmm_: no 16-bit x 16-bit -> float32 GEMM for ",
              a.scalar_type(), " in this torch (check wide_matmul_available first)");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32, "wide_addmm_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu(),
              "wide_addmm_: out, a and b must be CPU tensors");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k && out.size(0) == m && out.size(1) == n, "wide_addmm_: shapes do not chain: out ",
              out.sizes(), " = a ", a.sizes(), " @ b ", b.sizes());
  TORCH_CHECK(out.stride(1) == 1 && out.stride(0) >= std::max<int64_t>(1, n),
              "wide_addmm_: out must have contiguous rows, got strides ", out.strides());
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: only the scaling of out
    if (beta == 0) out.zero_(); else out.mul_(beta);
    return;
  }
  const BlasOperand lhs = blas_operand(a), rhs = blas_operand(b);
  TORCH_CHECK(fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lhs.leading) && fits_int(rhs.leading) &&
                  fits_int(out.stride(0)),
              "wide_addmm_: sizes and strides must fit a 32-bit int, got out ", out.sizes(), ", a ", a.sizes());
  auto* gemm = a.scalar_type() == torch::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  gemm(kRowMajor, lhs.transpose, rhs.transpose, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
       1.f, reinterpret_cast<const uint16_t*>(lhs.tensor.const_data_ptr()), static_cast<int>(lhs.leading),
       reinterpret_cast<const uint16_t*>(rhs.tensor.const_data_ptr()), static_cast<int>(rhs.leading),
       static_cast<float>(beta), out.data_ptr<float>(), static_cast<int>(out.stride(0)));
}

}  // namespace fastllm
