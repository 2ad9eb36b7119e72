// Loads that widen to fp32 in registers (int8, bf16 bits, fp32), 16 lanes on AVX-512 and 8 on AVX2 + FMA, and the
// scalar widenings the portable loops and the tails use: shared by int8_gemv.cpp and decode_attention.cpp; and the
// vector exps' constants (decode_attention.cpp, prefill_attention.cpp).
#pragma once
// GCC 12's AVX-512 intrinsics pass an undefined register (`__Y = __Y`) through, and each inlined use warned
// (-Wuninitialized / -Wmaybe-uninitialized: 160 lines in a build of pllava._C). Silenced for that header alone:
// the diagnostic state at the header's own lines decides, so our code keeps both warnings.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace pllava {
namespace simd {

// Cephes' expf, the vector exps' constants (decode_attention.cpp's 8 lanes, prefill_attention.cpp's 16): e^x =
// 2^n e^r with n = round(x log2(e)), r = x - n ln2 (ln2 in two parts, so r is exact in fp32), e^r = 1 + r + r^2 p(r)
// with p's coefficients below, highest first (Horner).
constexpr float kExpLog2e = 1.44269504088896341f, kExpLn2Hi = 0.693359375f, kExpLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float widen(float x) { return x; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t b) {  // bf16 bits -> fp32, exact
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f"))) inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* p) {
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {  // the 8 lanes' sum
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

}  // namespace simd
}  // namespace pllava
