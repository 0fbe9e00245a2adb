// Vector math shared by the CPU kernels: attention (attention.h) and the softmax family (softmax_rows.h).
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace fastllm {

// max(a, b) in one instruction, where NaNs need not propagate: maximum() (NaN-propagating) takes three, and in the
// running max over a tile of scores it was a fifth of the 16-bit forward. A NaN score reaches the output anyway:
// its exp is NaN (vec_exp), and so are the row's sum and output.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> max_ignoring_nan(const at::vec::Vectorized<acc_t>& a,
                                                   const at::vec::Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<acc_t, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_max_ps(a, b);
  if constexpr (std::is_same_v<acc_t, double>) return _mm256_max_pd(a, b);
#endif
  return at::vec::maximum(a, b);
}

// exp(v) with NaN kept as NaN and exp(-inf) = 0 (masked keys and padding contribute exactly nothing).
//
// fp32 on AVX-512: Cody-Waite reduction to r = v - n ln2, |r| <= ln2 / 2, Horner on the degree-6 Taylor
// polynomial of e^r (truncation r^7 / 7! <= 1.2e-7), then vscalefps for the 2^n: 2.7 ulp at worst over the
// normal range (every 38th float, against double exp) in 13 instructions. ATen's exp_u20 takes 22 (~20
// ulp): it builds 2^n from integer bits and clamps and blends around it; the softmax loops were half exp.
// The clamps keep n finite (n * ln2 would be inf - inf at +-inf); both return their second operand, v,
// when v is NaN, and NaN stays NaN through the polynomial and vscalefps.
// Elsewhere (AVX2, fp64): exp_u20, which maps NaN to a finite value; since exp(v) > v for every real v,
// max(exp(v), v) is exp(v), and max_ignoring_nan returns v when either is NaN.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vec_exp(const at::vec::Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    // Below -87.33 e^v is under FLT_MIN: those lanes come back as exactly 0 (a denormal or underflowing
    // result costs a microcode assist: causal masks' -inf made the forward 10-20% slower); NaN lanes compute.
    const __mmask16 normal = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.33f), _CMP_NLE_UQ);
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(100.0f), _mm512_max_ps(_mm512_set1_ps(-87.33f), v));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln2 = 0.693145751953125 (11 bits: n times it is exact) + 1.4286068e-6
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693145751953125f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.42860682e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(normal, p, n);
  }
#endif
  return max_ignoring_nan(v.exp_u20(), v);
}

}  // namespace fastllm
