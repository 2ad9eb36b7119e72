// Weight-only int8 GEMV with fp32 activations, for decode rows (M <= 16) on the CPU, and the same kernel over bf16
// weights (the LoRA factors of those rows: bf16_gemv) and over int4 groups (quantize="int4": int4_gemv, below).
//
// Why: torch's _weight_int8pack_mm is fast only with bf16 activations (7B shapes on 2 Zen4 cores: 0.50 ms at
// K = N = 4096 in bf16, 7.9 ms with fp32 activations, 3.3 ms for the fp32 GEMV it replaces), and bf16 activations
// cost agreement with the fp32 model (README, "quality"). This keeps every activation and the accumulator in fp32
// and streams the 1-byte weight once per 4 output rows, all M rows reading it from L1.
//
// Tiling: a tile is up to 4 rows of x by 4 rows of q (16 zmm accumulators, 4 widened weight vectors, one x vector:
// 21 of the 32 registers); 4 independent FMA chains per x row hide the FMA latency at M = 1. Threads split N in
// contiguous blocks, so each streams its own part of q.
//
// Prefetch: a tile reads its 4 rows of q as 4 streams of K bytes, and the hardware prefetcher does not keep up
// with them: with short rows it never gets ahead (the small preset's 56 decode GEMVs, K = 768 and 2048, 57 MB from
// DRAM as in a decode step, streamed at 10.5 GB/s on 2 Zen4 cores), and in long ones the 4 streams cross a 4 KB
// page together every 256 k steps, where it starts over (7B and 34B shapes, K = 4096-20480: 30-35 GB/s on 2 Zen5
// cores whose 1 GiB read is 46). So each k step issues one software prefetch, and the prefetches sweep q's bytes
// linearly one tile ahead (kTile rows, at least 8 KB): while tile b computes, tile b + 1 comes in. Small preset:
// 10.5 -> 24 GB/s on Zen4 (4-8 KB ahead then), 25-27 -> 53-66 on Zen5; 7B and 34B shapes on Zen5, M = 1-4: 30-35
// -> 40-58 GB/s (benchmarks/bench_int8_gemv.py). 8 KB ahead at K = 4096 recovered only a third of that.
//
// bf16 weights: the LoRA's A (r, K) and B (N, r) of a decode row went through torch's bf16 GEMM, 51 us a product on
// 2 Zen4 cores (small preset, r = 128: 1.6 ms of a 9 ms step for 32 products, 3.8 GB/s), with x rounded to bf16.
// Here bf16 is widened exactly (its bits shifted into an fp32's high half) and x stays fp32.
//
// AVX2 + FMA (a CPU without AVX-512: Zen 2 / Zen 3, most laptops): 16 ymm registers, so a tile is one x row by up
// to 4 q rows with two 8-lane accumulators each (lanes k = 0-7 and 8-15 mod 16: the AVX-512 lanes' partial sums,
// split in two), 8 + 4 + 1 registers; more x rows go two at a time against two q rows (8 + 2 + 1). On a 2-core
// EPYC with AVX2 only, the portable loop (compiled for baseline x86-64, so 4-wide SSE) ran the small preset's
// decode weights at a fraction of the AVX2 tiles' rate (benchmarks/bench_int8_gemv.py; numbers in the README).
#include "int8_gemv.h"

#include "cpu_isa.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace pllava {
namespace {

constexpr int kTile = 4;
constexpr int64_t kPrefetchMin = 8192;  // bytes ahead, for short rows
constexpr int64_t kLine = 64;

// Prefetches [p, end) a cache line at a time: the tiles call step<L>() once a k step of 16 weights a row, L =
// the weight's bytes, so a 4-row tile (4 * K * L bytes, K / 16 steps) covers its own size ahead; finish() covers
// what its steps left (fewer rows, the K tail).
struct Prefetch {
  const char* p;
  const char* end;
  template <int L>
  inline void step() {
    for (int l = 0; l < L && p < end; ++l, p += kLine) __builtin_prefetch(p, 0, 3);
  }
  inline void finish() {
    for (; p < end; p += kLine) __builtin_prefetch(p, 0, 3);
  }
};

// What a tile writes: y = alpha * (scale ? scale[n] : 1) * sum (+ y where accumulate). gscale: int4's group
// scales (bf16 bits, (N, K / kGroup)), which its tiles apply to the weights themselves.
struct Out {
  const float* scale;
  float alpha;
  bool accumulate;
  const uint16_t* gscale = nullptr;
  inline void put(float* y, int64_t n, float t) const {
    if (scale != nullptr) t *= scale[n];
    if (alpha != 1.0f) t *= alpha;
    *y = accumulate ? *y + t : t;
  }
};

using namespace simd;  // widen, load16, load8, hsum8

template <typename W>
using TileFn = void (*)(const float*, int64_t, const W*, int64_t, const Out&, float*, int64_t, int64_t, Prefetch);

// int4 (quantize="int4"): a row of q is K / 2 bytes; its group g (kGroup = 32 weights; K % 32 == 0) is bytes
// 16g .. 16g + 15, byte j holding weight 32g + j in its low nibble and 32g + 16 + j in its high one, each as q + 8
// (q in [-8, 7]), with the group's scale s (bf16 bits) in Out::gscale. A weight is fl32(q * s): one rounding, the
// value of torch's q.float() * s.float(). Each lane l of a tile's accumulators sums k = l (mod 16) in increasing k,
// as the int8 tiles do, so the AVX-512 and AVX2 tiles give the same bits.
struct Nibble {
  uint8_t b;
};
constexpr int64_t kGroup = 32;

// A group's scale widened to fp32, as a 32-bit broadcast load of it and the next one (in the same row unless it is
// the row's last: then one 16-bit load), shifted: no broadcast from a vector register, which made the tile ~15 %
// slower in L2 (2 Zen 5 cores: ~88 against ~103 G weights/s). The same value as widen(*sp).
__attribute__((target("avx512f"))) inline __m512 scale16(const uint16_t* sp, bool last) {
  if (last) return _mm512_set1_ps(widen(*sp));
  int32_t d;
  std::memcpy(&d, sp, sizeof d);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi32(d), 16));
}
__attribute__((target("avx2,fma"))) inline __m256 scale8(const uint16_t* sp, bool last) {
  if (last) return _mm256_set1_ps(widen(*sp));
  int32_t d;
  std::memcpy(&d, sp, sizeof d);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi32(d), 16));
}

template <typename W>
constexpr int64_t row_bytes(int64_t K) {
  return std::is_same_v<W, Nibble> ? K / 2 : K * static_cast<int64_t>(sizeof(W));
}

// AVX-512: the group's 16 dequantized values (q = -8 .. 7 times s) are one register, and vpermps picks a lane's
// weight from it by its nibble (the low 4 bits of each 32-bit lane): 2 permutes for 32 weights. The tile is
// compute-bound, not bandwidth-bound, at M = 1 (2 Zen 5 cores, weights in L2: ~100 G weights/s where int8's tile
// makes ~110; streamed, int4's 0.5625 bytes a weight need ~107 to fill 60 GB/s), so every instruction counts:
// widening and converting each nibble instead of the permutes made it ~12 % slower, broadcasting the scales from a
// widened block of 16 no faster, a byte order that let a broadcast load and a per-lane shift replace the
// widening ~10 % slower; the group's x loaded once for the NB rows (not once a row) ~10 % faster, and each scale
// broadcast by a 32-bit load rather than from a register (scale16) ~15 % faster.
template <int MB, int NB>
__attribute__((target("avx512f"))) void tile4_avx512(const float* x, int64_t ldx, const Nibble* q, int64_t K,
                                                     const Out& out, float* y, int64_t ldy, int64_t n, Prefetch pf) {
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(q);
  const int64_t G = K / kGroup, row = K / 2;
  const __m512 iota = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    pf.step<1>();  // 16 bytes a row a group: a 4-row tile's 64 bytes
    __m512 xl[MB], xh[MB];  // the group's x, loaded once for the NB rows
    for (int i = 0; i < MB; ++i) {
      xl[i] = _mm512_loadu_ps(x + i * ldx + g * kGroup);
      xh[i] = _mm512_loadu_ps(x + i * ldx + g * kGroup + 16);
    }
    for (int j = 0; j < NB; ++j) {
      const __m512i v = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + (n + j) * row + g * 16)));
      const __m512 table = _mm512_mul_ps(iota, scale16(out.gscale + (n + j) * G + g, g + 1 == G));
      const __m512 lo = _mm512_permutexvar_ps(v, table);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      for (int i = 0; i < MB; ++i) {
        acc[i][j] = _mm512_fmadd_ps(lo, xl[i], acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(hi, xh[i], acc[i][j]);
      }
    }
  }
  pf.finish();
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out.put(y + i * ldy + n + j, n + j, _mm512_reduce_add_ps(acc[i][j]));
}

// AVX2: 8 bytes hold weights 32g + 0-7 (low nibbles) and 32g + 16-23 (high) for the lo accumulators (lanes k = 0-7
// mod 16), the next 8 bytes 32g + 8-15 and 24-31 for the hi ones; each nibble widened and dequantized by one FMA.
// ~7 instructions a 16 weights against int8's 4, so on AVX2 the int4 tiles are compute-bound below int8's speed
// (2 Zen 5 cores capped at AVX2, 2 of 7B's layers: 0.71-0.89x at M = 1-4): int4 there saves memory, not time.
template <int MB, int NB>
__attribute__((target("avx2,fma"))) void kernel4_avx2(const float* x, int64_t ldx, const Nibble* q, int64_t K,
                                                      const Out& out, float* y, int64_t ldy, int64_t n, Prefetch pf) {
  static_assert(2 * MB * NB + 6 <= 16, "the tile must fit the 16 ymm registers");
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(q);
  const int64_t G = K / kGroup, row = K / 2;
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 lo[MB][NB], hi[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) lo[i][j] = hi[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    pf.step<1>();
    for (int j = 0; j < NB; ++j) {
      // w = fma(nibble, s, -8s): one rounding of the exact (nibble - 8) * s, the AVX-512 table's value
      const __m256 s = scale8(out.gscale + (n + j) * G + g, g + 1 == G);
      const __m256 off = _mm256_mul_ps(s, _mm256_set1_ps(-8.0f));  // exact: a power of two
      const uint8_t* p = qb + (n + j) * row + g * 16;
      for (int h = 0; h < 2; ++h) {  // bytes 0-7, then 8-15
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
        const __m256 wl = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), s, off);
        const __m256 wh = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s, off);
        for (int i = 0; i < MB; ++i) {
          const float* xi = x + i * ldx + g * kGroup + 8 * h;
          __m256& a = h == 0 ? lo[i][j] : hi[i][j];
          a = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xi), a);
          a = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xi + 16), a);
        }
      }
    }
  }
  pf.finish();
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) out.put(y + i * ldy + n + j, n + j, hsum8(_mm256_add_ps(lo[i][j], hi[i][j])));
}

template <int MB, int NB>
void tile4_generic(const float* x, int64_t ldx, const Nibble* q, int64_t K, const Out& out, float* y, int64_t ldy,
                   int64_t n, Prefetch pf) {
  pf.finish();
  const uint8_t* qb = reinterpret_cast<const uint8_t*>(q);
  const int64_t G = K / kGroup, row = K / 2;
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const uint8_t* qr = qb + (n + j) * row;
      const float* xr = x + i * ldx;
      float lane[16] = {};
      for (int64_t g = 0; g < G; ++g) {
        const float s = widen(out.gscale[(n + j) * G + g]);
        for (int l = 0; l < 16; ++l) {
          const uint8_t b = qr[g * 16 + l];
          lane[l] += xr[g * kGroup + l] * (static_cast<float>((b & 15) - 8) * s);
          lane[l] += xr[g * kGroup + 16 + l] * (static_cast<float>((b >> 4) - 8) * s);
        }
      }
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += lane[l];
      out.put(y + i * ldy + n + j, n + j, t);
    }
}

// Rows m < MB of x (and y) against rows n .. n + NB of q; x and y already point at the tile's first row. pf: the
// bytes of q to prefetch meanwhile (empty for none).
template <typename W, int MB, int NB>
__attribute__((target("avx512f"))) void tile_avx512(const float* x, int64_t ldx, const W* q, int64_t K,
                                                    const Out& out, float* y, int64_t ldy, int64_t n, Prefetch pf) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    pf.step<sizeof(W)>();
    __m512 w[NB];
    for (int j = 0; j < NB; ++j) w[j] = load16(q + (n + j) * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(w[j], xv, acc[i][j]);
    }
  }
  pf.finish();
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float t = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) t += x[i * ldx + kk] * widen(q[(n + j) * K + kk]);
      out.put(y + i * ldy + n + j, n + j, t);
    }
}

// The AVX2 kernel proper: MB x rows against NB q rows, two accumulators a pair (2 * MB * NB + NB + 1 <= 16).
template <typename W, int MB, int NB>
__attribute__((target("avx2,fma"))) void kernel_avx2(const float* x, int64_t ldx, const W* q, int64_t K,
                                                     const Out& out, float* y, int64_t ldy, int64_t n, Prefetch pf) {
  static_assert(2 * MB * NB + NB + 1 <= 16, "the tile must fit the 16 ymm registers");
  __m256 lo[MB][NB], hi[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) lo[i][j] = hi[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    pf.step<sizeof(W)>();
    __m256 w[NB];
    for (int j = 0; j < NB; ++j) w[j] = load8(q + (n + j) * K + k);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) lo[i][j] = _mm256_fmadd_ps(w[j], xv, lo[i][j]);
    }
    for (int j = 0; j < NB; ++j) w[j] = load8(q + (n + j) * K + k + 8);
    for (int i = 0; i < MB; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8);
      for (int j = 0; j < NB; ++j) hi[i][j] = _mm256_fmadd_ps(w[j], xv, hi[i][j]);
    }
  }
  pf.finish();
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float t = hsum8(_mm256_add_ps(lo[i][j], hi[i][j]));
      for (int64_t kk = k; kk < K; ++kk) t += x[i * ldx + kk] * widen(q[(n + j) * K + kk]);
      out.put(y + i * ldy + n + j, n + j, t);
    }
}

// The AVX2 kernel for W: kernel_avx2, or int4's kernel4_avx2.
template <typename W, int MB, int NB>
struct Avx2 {
  static constexpr TileFn<W> fn = kernel_avx2<W, MB, NB>;
};
template <int MB, int NB>
struct Avx2<Nibble, MB, NB> {
  static constexpr TileFn<Nibble> fn = kernel4_avx2<MB, NB>;
};

// A table tile on AVX2: one x row against all NB q rows in one pass; more rows two by two against two q rows at a
// time (the q rows are then read again from L1 / L2). The prefetch goes with the first pass.
template <typename W, int MB, int NB>
void tile_avx2(const float* x, int64_t ldx, const W* q, int64_t K, const Out& out, float* y, int64_t ldy, int64_t n,
               Prefetch pf) {
  if constexpr (MB == 1) {
    Avx2<W, 1, NB>::fn(x, ldx, q, K, out, y, ldy, n, pf);
  } else {
    Prefetch none{pf.end, pf.end};
    for (int i = 0; i < MB; i += 2) {
      const float* xi = x + i * ldx;
      float* yi = y + i * ldy;
      if (MB - i == 1) {  // the last of an odd number of rows
        Avx2<W, 1, NB>::fn(xi, ldx, q, K, out, yi, ldy, n, none);
        continue;
      }
      for (int j = 0; j < NB; j += 2) {
        const Prefetch p = (i == 0 && j == 0) ? pf : none;
        if (NB - j >= 2)
          Avx2<W, 2, 2>::fn(xi, ldx, q, K, out, yi, ldy, n + j, p);
        else
          Avx2<W, 2, 1>::fn(xi, ldx, q, K, out, yi, ldy, n + j, p);
      }
    }
  }
}

template <typename W, int MB, int NB>
void tile_generic(const float* x, int64_t ldx, const W* q, int64_t K, const Out& out, float* y, int64_t ldy,
                  int64_t n, Prefetch pf) {
  pf.finish();  // the row loops below are not a k loop to spread it over; ahead of them is still ahead
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const W* qr = q + (n + j) * K;
      const float* xr = x + i * ldx;
      float lane[16] = {};  // 16 partial sums, as the AVX-512 path: one sequential sum loses ~K/16 times more
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) lane[l] += xr[k + l] * widen(qr[k + l]);
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += lane[l];
      for (; k < K; ++k) t += xr[k] * widen(qr[k]);
      out.put(y + i * ldy + n + j, n + j, t);
    }
}

#define PLLAVA_ROW(F, m) {F<W, m, 1>, F<W, m, 2>, F<W, m, 3>, F<W, m, 4>}
#define PLLAVA_TABLE(F) {PLLAVA_ROW(F, 1), PLLAVA_ROW(F, 2), PLLAVA_ROW(F, 3), PLLAVA_ROW(F, 4)}
#define PLLAVA_ROW4(F, m) {F<m, 1>, F<m, 2>, F<m, 3>, F<m, 4>}
#define PLLAVA_TABLE4(F) {PLLAVA_ROW4(F, 1), PLLAVA_ROW4(F, 2), PLLAVA_ROW4(F, 3), PLLAVA_ROW4(F, 4)}
template <typename W>
struct Tables {
  static constexpr TileFn<W> avx512[kTile][kTile] = PLLAVA_TABLE(tile_avx512);
  static constexpr TileFn<W> avx2[kTile][kTile] = PLLAVA_TABLE(tile_avx2);
  static constexpr TileFn<W> generic[kTile][kTile] = PLLAVA_TABLE(tile_generic);
};
template <>
struct Tables<Nibble> {
  using W = Nibble;  // (PLLAVA_TABLE's name for it)
  static constexpr TileFn<Nibble> avx512[kTile][kTile] = PLLAVA_TABLE4(tile4_avx512);
  static constexpr TileFn<Nibble> avx2[kTile][kTile] = PLLAVA_TABLE(tile_avx2);
  static constexpr TileFn<Nibble> generic[kTile][kTile] = PLLAVA_TABLE4(tile4_generic);
};
#undef PLLAVA_TABLE4
#undef PLLAVA_ROW4
#undef PLLAVA_TABLE
#undef PLLAVA_ROW

template <typename W>
void gemv(const float* x, int64_t ldx, const W* q, const Out& out, float* y, int64_t ldy, int64_t M, int64_t N,
          int64_t K, int num_threads, bool generic, int64_t prefetch) {
  const Isa isa = generic ? Isa::kGeneric : cpu_isa();
  const TileFn<W>(*table)[kTile] = isa == Isa::kAvx512 ? Tables<W>::avx512
                                   : isa == Isa::kAvx2 ? Tables<W>::avx2
                                                       : Tables<W>::generic;
  const int64_t blocks = (N + kTile - 1) / kTile;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), blocks)));
  const int64_t row = row_bytes<W>(K);
  const int64_t dist = prefetch < 0 ? gemv_prefetch_distance(row) : prefetch;
#pragma omp parallel num_threads(threads)
  {
    // contiguous blocks a thread (as schedule(static)), so its prefetches stay inside the q rows it streams
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    const char* base = reinterpret_cast<const char*>(q);
    const char* lim = base + std::min(N, b1 * kTile) * row;
    const char* ahead = base + b0 * kTile * row;
    if (dist > 0) {  // the first `dist` bytes, before the first tile needs them
      Prefetch head{ahead, std::min(lim, ahead + dist)};
      head.finish();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kTile;
      const int nb = static_cast<int>(std::min<int64_t>(kTile, N - n));
      const char* start = base + n * row + dist;
      Prefetch pf{start, dist > 0 ? std::min(lim, start + nb * row) : start};
      for (int64_t m = 0; m < M; m += kTile) {  // the tile's q rows stay in L1 across the row blocks
        const int mb = static_cast<int>(std::min<int64_t>(kTile, M - m));
        table[mb - 1][nb - 1](x + m * ldx, ldx, q, K, out, y + m * ldy, ldy, n, pf);
        pf.p = pf.end;  // prefetched once, by the first row block
      }
    }
  }
}

}  // namespace

int64_t gemv_prefetch_distance(int64_t row_bytes) {
  return std::max(kPrefetchMin, kTile * row_bytes);  // one tile ahead (see Prefetch, above)
}

void int8_gemv(const float* x, int64_t ldx, const int8_t* q, const float* scale, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int num_threads, bool generic, int64_t prefetch) {
  gemv(x, ldx, q, Out{scale, 1.0f, false}, y, ldy, M, N, K, num_threads, generic, prefetch);
}

void bf16_gemv(const float* x, int64_t ldx, const uint16_t* w, float alpha, bool accumulate, float* y, int64_t ldy,
               int64_t M, int64_t N, int64_t K, int num_threads, bool generic, int64_t prefetch) {
  gemv(x, ldx, w, Out{nullptr, alpha, accumulate}, y, ldy, M, N, K, num_threads, generic, prefetch);
}

void int4_gemv(const float* x, int64_t ldx, const uint8_t* q, const uint16_t* scale, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int num_threads, bool generic, int64_t prefetch) {
  gemv(x, ldx, reinterpret_cast<const Nibble*>(q), Out{nullptr, 1.0f, false, scale}, y, ldy, M, N, K, num_threads,
       generic, prefetch);
}

}  // namespace pllava
