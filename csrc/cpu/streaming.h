// Streaming (non-temporal) stores for kernel outputs larger than the last-level cache, shared by the norm and
// softmax families. A normal store first reads each destination line in; an output that will not stay cached
// for its consumer anyway saves that read with a streaming store (a third less DRAM traffic for y = f(x), a
// quarter less for dx = f(x, dy)). glibc's memcpy switches to streaming stores at a similar size.
#pragma once
#include <torch/extension.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cstdint>

namespace fastllm {

// Whether `out` is written with streaming stores: at least set_streaming_store_threshold's bytes (by default
// 3/4 of the shared L3), and its first and last pages already mapped in. A freshly mmapped output is not: the
// first write to each page faults and the kernel zeroes the page through the cache, after which a normal store
// hits in cache and a streaming one must evict the line first (measured: LayerNorm 8192x1024 fp32 fwd+bwd
// 0.86x eager with streaming stores on fresh pages, 1.25-1.46x on reused ones).
bool streaming_output(const torch::Tensor& out);

// Whether this build's SIMD ISA has streaming stores of whole vectors.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasStreamingStores = true;
#else
constexpr bool kHasStreamingStores = false;
#endif

// One whole register to p, which must be aligned to the register's size, bypassing the caches.
#if defined(CPU_CAPABILITY_AVX512)
inline void stream_register(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
inline void stream_register(void* p, __m512d v) { _mm512_stream_pd(static_cast<double*>(p), v); }
inline void stream_register(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_register(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline __m256i lower_half(__m512i v) { return _mm512_castsi512_si256(v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_register(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
inline void stream_register(void* p, __m256d v) { _mm256_stream_pd(static_cast<double*>(p), v); }
inline void stream_register(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
inline void stream_register(void* p, __m128i v) { _mm_stream_si128(static_cast<__m128i*>(p), v); }
inline __m128i lower_half(__m256i v) { return _mm256_castsi256_si128(v); }
#else  // never called: kHasStreamingStores is false
template <typename T>
inline void stream_register(void*, const T&) {}
template <typename T>
inline T lower_half(const T& v) { return v; }
#endif

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Orders this thread's streaming stores before whatever follows (they bypass the usual ordering): call it at
// the end of each parallel task that streamed.
inline void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace fastllm
