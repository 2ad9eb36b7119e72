// Weight-only int8 GEMV with fp32 activations, for decode rows (M <= 16) on the CPU.
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
// Prefetch: a tile reads its 4 rows of q as 4 streams of K bytes. With short rows the hardware prefetcher never
// gets ahead of them: the small preset's 56 decode GEMVs (K = 768 and 2048, 57 MB, from DRAM as in a decode step)
// streamed at 10.5 GB/s on 2 Zen4 cores, against 24 GB/s with one software prefetch a k step, a fixed distance
// ahead in q's bytes (benchmarks/bench_int8_gemv.py). Long rows stream well on their own (K = 4096: 20.5 GB/s
// without, 19.4 with), so the default prefetches only rows up to 2048 bytes (kPrefetchMaxK).
#include "int8_gemv.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>

namespace pllava {
namespace {

constexpr int kTile = 4;

constexpr int64_t kPrefetchMaxK = 2048;
constexpr int64_t kLine = 64;

// Prefetches [p, end) one cache line a call: the tiles call it once a k step, so a tile of NB rows (NB * K bytes,
// K / 16 steps) covers NB * 16 / 64 of its own size ahead; finish() covers what its steps left.
struct Prefetch {
  const char* p;
  const char* end;
  inline void step() {
    if (p < end) {
      __builtin_prefetch(p, 0, 3);
      p += kLine;
    }
  }
  inline void finish() {
    for (; p < end; p += kLine) __builtin_prefetch(p, 0, 3);
  }
};

using TileFn = void (*)(const float*, int64_t, const int8_t*, int64_t, const float*, float*, int64_t, int64_t,
                        Prefetch);

// Rows m < MB of x (and y) against rows n .. n + NB of q; x and y already point at the tile's first row. pf: the
// bytes of q to prefetch meanwhile (empty for none).
template <int MB, int NB>
__attribute__((target("avx512f"))) void tile_avx512(const float* x, int64_t ldx, const int8_t* q, int64_t K,
                                                    const float* scale, float* y, int64_t ldy, int64_t n,
                                                    Prefetch pf) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    pf.step();
    __m512 w[NB];
    for (int j = 0; j < NB; ++j)
      w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n + j) * K + k))));
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(w[j], xv, acc[i][j]);
    }
  }
  pf.finish();
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      float t = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) t += x[i * ldx + kk] * static_cast<float>(q[(n + j) * K + kk]);
      y[i * ldy + n + j] = t * scale[n + j];
    }
}

template <int MB, int NB>
void tile_generic(const float* x, int64_t ldx, const int8_t* q, int64_t K, const float* scale, float* y, int64_t ldy,
                  int64_t n, Prefetch pf) {
  pf.finish();  // the row loops below are not a k loop to spread it over; ahead of them is still ahead
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      const int8_t* qr = q + (n + j) * K;
      const float* xr = x + i * ldx;
      float lane[16] = {};  // 16 partial sums, as the AVX-512 path: one sequential sum loses ~K/16 times more
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) lane[l] += xr[k + l] * static_cast<float>(qr[k + l]);
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += lane[l];
      for (; k < K; ++k) t += xr[k] * static_cast<float>(qr[k]);
      y[i * ldy + n + j] = t * scale[n + j];
    }
}

#define PLLAVA_ROW(F, m) {F<m, 1>, F<m, 2>, F<m, 3>, F<m, 4>}
#define PLLAVA_TABLE(F) {PLLAVA_ROW(F, 1), PLLAVA_ROW(F, 2), PLLAVA_ROW(F, 3), PLLAVA_ROW(F, 4)}
const TileFn kAvx512[kTile][kTile] = PLLAVA_TABLE(tile_avx512);
const TileFn kGeneric[kTile][kTile] = PLLAVA_TABLE(tile_generic);
#undef PLLAVA_TABLE
#undef PLLAVA_ROW

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

}  // namespace

const char* int8_gemv_isa() { return has_avx512() ? "avx512" : "generic"; }

int64_t int8_gemv_prefetch_distance(int64_t K) { return K <= 1024 ? 4096 : K <= kPrefetchMaxK ? 8192 : 0; }

void int8_gemv(const float* x, int64_t ldx, const int8_t* q, const float* scale, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int num_threads, bool generic, int64_t prefetch) {
  const TileFn(*table)[kTile] = has_avx512() && !generic ? kAvx512 : kGeneric;
  const int64_t blocks = (N + kTile - 1) / kTile;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), blocks)));
  const int64_t dist = prefetch < 0 ? int8_gemv_prefetch_distance(K) : prefetch;
#pragma omp parallel num_threads(threads)
  {
    // contiguous blocks a thread (as schedule(static)), so its prefetches stay inside the q rows it streams
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    const char* lim = reinterpret_cast<const char*>(q + std::min(N, b1 * kTile) * K);
    const char* ahead = reinterpret_cast<const char*>(q + b0 * kTile * K);
    if (dist > 0) {  // the first `dist` bytes, before the first tile needs them
      Prefetch head{ahead, std::min(lim, ahead + dist)};
      head.finish();
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * kTile;
      const int nb = static_cast<int>(std::min<int64_t>(kTile, N - n));
      const char* start = reinterpret_cast<const char*>(q + n * K) + dist;
      Prefetch pf{start, dist > 0 ? std::min(lim, start + nb * K) : start};
      for (int64_t m = 0; m < M; m += kTile) {  // the tile's q rows stay in L1 across the row blocks
        const int mb = static_cast<int>(std::min<int64_t>(kTile, M - m));
        table[mb - 1][nb - 1](x + m * ldx, ldx, q, K, scale, y + m * ldy, ldy, n, pf);
        pf.p = pf.end;  // prefetched once, by the first row block
      }
    }
  }
}

}  // namespace pllava
