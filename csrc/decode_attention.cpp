// Decode attention over an fp32 or bf16 KV cache, for the CPU's decode steps (q, the scores, the softmax and the
// sums in fp32; a bf16 cache widened exactly in registers).
//
// Why: torch's CPU SDPA (its flash kernel) read the small preset's 8 layers of fp32 K and V at 2330 positions
// (114 MB a step, from DRAM) at 13.6-18.3 GB/s on 2 Zen4 cores, 6.3-8.5 ms a step; two plain passes over the
// used positions (scores against K, then the softmax-weighted sum of V) stream them at 31 GB/s, 3.7 ms.
// A (b, kv head) pair is one work item with all its g query heads, so GQA reads each K and V row once, not g
// times. Pass 1 keeps the g scores of every position (g * (hi - lo) floats a thread, head by head: sc[j * S + s]),
// pass 2 exponentiates them against each head's maximum, so no running rescale is needed.
// A bf16 cache halves what a step streams: a bf16 engine's prefill rows produce bf16 K and V anyway (bf16 GEMMs), so
// only its decode rows' K and V are rounded; batched decode at PLLaVA's prompt lengths is bound by this read (8 rows
// at 2000 positions: 629 MB of fp32 K and V a step against 81 MB of int8 weights, small preset).
// AVX2 + FMA (no AVX-512): the same passes 8 lanes at a time, scores 8 positions at a time (one reduction for the
// 8); AVX-512 scores 8 positions at a time under GQA only (scores_avx512 says why). Both vector paths hold a chunk's
// weighted sums in registers, and take each head's maximum, exponentials (a vector exp, exp_avx2) and sums as AVX2
// loops.
#include "decode_attention.h"

#include "cpu_isa.h"
#include "simd.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace pllava {
namespace {

constexpr int64_t kChunk = 32;

using namespace simd;  // widen, load16, load8, hsum8

template <typename T>
struct Item {  // one (b, kv head): its g query heads' rows of q and o, its K and V rows from position lo
  const float* q;
  int64_t q_sh;
  const T* k;
  const T* v;
  int64_t kv_ss;
  float* o;
  int64_t o_sh;
  int64_t g, D, S;
  float scale;
};

// lane p = the sum of v[p]'s 8 lanes: one horizontal reduction for 8 scores instead of one a score
__attribute__((target("avx2,fma"))) inline __m256 hsum8x8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // (v0..v3 | v0..v3), lanes 0-3 / 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// lane p = the sum of v[p]'s 16 lanes: each folded to 8 (its two halves added), then hsum8x8
__attribute__((target("avx512f,avx2,fma"))) inline __m256 hsum16x8(const __m512* v) {
  __m256 h[8];
  for (int p = 0; p < 8; ++p)
    h[p] = _mm256_add_ps(_mm512_castps512_ps256(v[p]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[p]), 1)));
  return hsum8x8(h);
}

// Whole blocks of 8 positions [0, end) for each head: q_j in NV registers, the 8 rows read one after another (each
// row's NV vectors in order), 8 independent sums, one reduction (hsum16x8) for the 8 scores. Not scores_avx2's
// order (each q vector loaded once for the 8 rows' same vector): with 32 zmm registers q fits beside the 8 sums,
// and this order took pllava-34b's GQA step (fp32 cache, one thread) 3.5 ms against that order's 4.9; AVX2's 16
// ymm registers cannot hold a D = 128 q (16 vectors) and 8 sums.
template <int NV, typename T>
__attribute__((target("avx512f,avx2,fma"))) void scores_blocks_avx512(const Item<T>& it, float* sc, int64_t end) {
  for (int64_t s = 0; s + 8 <= end; s += 8) {
    const T* kr = it.k + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float* qr = it.q + j * it.q_sh;
      __m512 qv[NV], a[8];
      for (int i = 0; i < NV; ++i) qv[i] = _mm512_loadu_ps(qr + 16 * i);
      for (int p = 0; p < 8; ++p) {
        a[p] = _mm512_mul_ps(qv[0], load16(kr + p * it.kv_ss));
        for (int i = 1; i < NV; ++i) a[p] = _mm512_fmadd_ps(qv[i], load16(kr + p * it.kv_ss + 16 * i), a[p]);
      }
      _mm256_storeu_ps(sc + j * it.S + s, _mm256_mul_ps(_mm256_set1_ps(it.scale), hsum16x8(a)));
    }
  }
}

// sc[j * S + s] = scale * q_j . k_s. Under GQA (g > 1 heads a KV row: compute-bound, each row used g times) in
// blocks of 8 positions: a reduction a score (_mm512_reduce_add_ps, 4 shuffles + 4 adds) made pllava-34b's step
// (56 heads of 128 on 8 KV heads, 2 layers at 2330 positions) 2.1-3.1 ms, against 1.7-1.9 in blocks, fp32 or bf16
// cache (2 Zen4 cores, medians of 9 processes). With one head a row (MHA: bound by the read) the blocks measured
// slower (1 thread, small preset fp32: 8.0 ms against 5.8 a row at a time), so MHA scores a row at a time.
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) void scores_avx512(const Item<T>& it, float* sc) {
  const int nv = static_cast<int>(it.D / 16);
  int64_t s = 0;
  if (it.g > 1 && (nv == 4 || nv == 8)) {
    s = it.S / 8 * 8;
    if (nv == 4)  // D = 64
      scores_blocks_avx512<4>(it, sc, s);
    else  // D = 128
      scores_blocks_avx512<8>(it, sc, s);
  }
  for (; s < it.S; ++s) {
    const T* kr = it.k + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float* qr = it.q + j * it.q_sh;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // two chains: D = 64 is 4 FMAs
      int i = 0;
      for (; i + 2 <= nv; i += 2) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * i), load16(kr + 16 * i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * i + 16), load16(kr + 16 * i + 16), a1);
      }
      if (i < nv) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * i), load16(kr + 16 * i), a0);
      sc[j * it.S + s] = it.scale * _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

// Up to 8 vectors of one head's sum over the chunk (128 floats) held in registers from zero over its positions,
// then added into the accumulator, as weighted_block8_avx2 does (before: a load and a store of acc per FMA)
template <int NB, typename T>  // NB vectors, at most 8: a constant count the compiler keeps in registers
__attribute__((target("avx512f"))) inline void weighted_block_avx512(const Item<T>& it, const float* pj, float* a,
                                                                    int64_t d0, int nb = NB) {
  __m512 r[NB];
  for (int i = 0; i < NB; ++i) r[i] = _mm512_setzero_ps();
  for (int64_t s = 0; s < it.S; ++s) {
    const __m512 pv = _mm512_set1_ps(pj[s]);
    const T* vr = it.v + s * it.kv_ss + d0;
    for (int i = 0; i < NB; ++i)
      if (i < nb) r[i] = _mm512_fmadd_ps(pv, load16(vr + 16 * i), r[i]);
  }
  for (int i = 0; i < nb; ++i)
    _mm512_storeu_ps(a + d0 + 16 * i, _mm512_add_ps(_mm512_loadu_ps(a + d0 + 16 * i), r[i]));
}

// acc[j * D + d] += (the sum over s of p[j * ps + s] * v_s[d]), each head's positions read in order
template <typename T>
__attribute__((target("avx512f"))) void weighted_sum_avx512(const Item<T>& it, const float* p, int64_t ps,
                                                            float* acc) {
  const int nv = static_cast<int>(it.D / 16);
  for (int64_t j = 0; j < it.g; ++j) {
    for (int i0 = 0; i0 < nv; i0 += 8) {
      const int nb = std::min(8, nv - i0);
      if (nb == 8)
        weighted_block_avx512<8>(it, p + j * ps, acc + j * it.D, 16 * i0);
      else if (nb == 4)  // D = 64
        weighted_block_avx512<4>(it, p + j * ps, acc + j * it.D, 16 * i0);
      else  // an odd head size: a count known only here
        weighted_block_avx512<8>(it, p + j * ps, acc + j * it.D, 16 * i0, nb);
    }
  }
}

// Blocks of 8 positions: each q vector is loaded once for 8 K rows, the 8 positions' chains are independent (FMA
// latency hidden without splitting one dot product), and one reduction gives their 8 scores; positions past the
// last whole block one at a time.
template <typename T>
__attribute__((target("avx2,fma"))) void scores_avx2(const Item<T>& it, float* sc) {
  const int nv = static_cast<int>(it.D / 8);
  int64_t s = 0;
  for (; s + 8 <= it.S; s += 8) {
    const T* kr = it.k + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float* qr = it.q + j * it.q_sh;
      __m256 a[8];
      for (int p = 0; p < 8; ++p) a[p] = _mm256_setzero_ps();
      for (int i = 0; i < nv; ++i) {
        const __m256 qv = _mm256_loadu_ps(qr + 8 * i);
        for (int p = 0; p < 8; ++p) a[p] = _mm256_fmadd_ps(qv, load8(kr + p * it.kv_ss + 8 * i), a[p]);
      }
      _mm256_storeu_ps(sc + j * it.S + s, _mm256_mul_ps(_mm256_set1_ps(it.scale), hsum8x8(a)));
    }
  }
  for (; s < it.S; ++s) {
    const T* kr = it.k + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float* qr = it.q + j * it.q_sh;
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int i = 0; i < nv; ++i)
        a[i & 3] = _mm256_fmadd_ps(_mm256_loadu_ps(qr + 8 * i), load8(kr + 8 * i), a[i & 3]);
      sc[j * it.S + s] = it.scale * hsum8(_mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3])));
    }
  }
}

// 8 vectors of one head's sum over the chunk (64 floats) held in registers from zero over its positions, then
// added into the accumulator: the sum the portable loop makes in a zeroed `part` and adds in, the same bits
template <typename T>
__attribute__((target("avx2,fma"))) inline void weighted_block8_avx2(const Item<T>& it, const float* pj, float* a,
                                                                    int64_t d0) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_setzero_ps();
  for (int64_t s = 0; s < it.S; ++s) {
    const __m256 pv = _mm256_set1_ps(pj[s]);
    const T* vr = it.v + s * it.kv_ss + d0;
    for (int i = 0; i < 8; ++i) r[i] = _mm256_fmadd_ps(pv, load8(vr + 8 * i), r[i]);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(a + d0 + 8 * i, _mm256_add_ps(_mm256_loadu_ps(a + d0 + 8 * i), r[i]));
}

// acc[j * D + d] += (the sum over s of p[j * ps + s] * v_s[d]), each head's positions read in order
template <typename T>
__attribute__((target("avx2,fma"))) void weighted_sum_avx2(const Item<T>& it, const float* p, int64_t ps,
                                                          float* acc) {
  const int nv = static_cast<int>(it.D / 8);
  const int full = nv / 8 * 8;  // vectors in whole blocks of 8
  for (int64_t j = 0; j < it.g; ++j) {
    float* a = acc + j * it.D;
    const float* pj = p + j * ps;
    for (int i0 = 0; i0 < full; i0 += 8) weighted_block8_avx2(it, pj, a, 8 * i0);
    if (full == nv) continue;
    __m256 r[8];  // the vectors past the last whole block (D % 64 != 0): fewer than 8
    for (int i = full; i < nv; ++i) r[i - full] = _mm256_setzero_ps();
    for (int64_t s = 0; s < it.S; ++s) {
      const __m256 pv = _mm256_set1_ps(pj[s]);
      const T* vr = it.v + s * it.kv_ss;
      for (int i = full; i < nv; ++i) r[i - full] = _mm256_fmadd_ps(pv, load8(vr + 8 * i), r[i - full]);
    }
    for (int i = full; i < nv; ++i)
      _mm256_storeu_ps(a + 8 * i, _mm256_add_ps(_mm256_loadu_ps(a + 8 * i), r[i - full]));
  }
}

template <typename T>
void scores_generic(const Item<T>& it, float* sc) {
  for (int64_t s = 0; s < it.S; ++s) {
    const T* kr = it.k + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float* qr = it.q + j * it.q_sh;
      float lane[16] = {};  // 16 partial sums, as the AVX-512 path's lanes (for MHA)
      int64_t d = 0;
      for (; d + 16 <= it.D; d += 16)
        for (int l = 0; l < 16; ++l) lane[l] += qr[d + l] * widen(kr[d + l]);
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += lane[l];
      for (; d < it.D; ++d) t += qr[d] * widen(kr[d]);
      sc[j * it.S + s] = it.scale * t;
    }
  }
}

template <typename T>
void weighted_sum_generic(const Item<T>& it, const float* p, int64_t ps, float* acc) {
  for (int64_t s = 0; s < it.S; ++s) {
    const T* vr = it.v + s * it.kv_ss;
    for (int64_t j = 0; j < it.g; ++j) {
      const float w = p[j * ps + s];
      float* a = acc + j * it.D;
      for (int64_t d = 0; d < it.D; ++d) a[d] += w * widen(vr[d]);
    }
  }
}

// e^x for x <= 0 (a score less its head's maximum), 8 lanes: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a
// degree-7 polynomial in r, times 2^n built in the exponent bits): within 1 ulp of the correctly rounded e^x for
// every float in [-87.3, 0], as std::exp (tests/native/exp_accuracy.cpp). Below x = -87.7, where e^x is a
// subnormal under 1e-38 (a weight against the maximum's 1), it gives 0. A NaN stays a NaN: max/min return their
// second operand when one is a NaN, so the operand order keeps it.
__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-88.0f), x);
  x = _mm256_min_ps(_mm256_set1_ps(0.0f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(simd::kExpLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(simd::kExpLn2Hi), x);  // ln2 in two parts: r exact to fp32
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(simd::kExpLn2Lo), r);
  __m256 y = _mm256_set1_ps(simd::kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(simd::kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// one head's row of scores (S of them): its maximum, then row[s] = e^(row[s] - max) and the sum of those in
// chunks of kChunk positions, each chunk's sum added to the total (the two levels of the weighted sum)
__attribute__((target("avx2,fma"))) float max_avx2(const float* row, int64_t S) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + s));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float r = -INFINITY;
  for (int l = 0; l < 8; ++l) r = std::max(r, t[l]);
  for (; s < S; ++s) r = std::max(r, row[s]);
  return r;
}

__attribute__((target("avx2,fma"))) float exp_sum_avx2(float* row, int64_t S, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  float sum = 0.f;
  for (int64_t c = 0; c < S; c += kChunk) {
    const int64_t end = std::min<int64_t>(c + kChunk, S);
    __m256 acc = _mm256_setzero_ps();
    int64_t s = c;
    for (; s + 8 <= end; s += 8) {
      const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + s), m));
      _mm256_storeu_ps(row + s, e);
      acc = _mm256_add_ps(acc, e);
    }
    float chunk = hsum8(acc);
    for (; s < end; ++s) chunk += row[s] = std::exp(row[s] - mx);
    sum += chunk;
  }
  return sum;
}

struct Scratch {  // a thread's buffers, sized once per call and reused across its items
  std::vector<float> sc, acc, part, mx, sum;
};

// sc[j * it.S + s] for s in [0, it.S)
template <typename T>
void scores(const Item<T>& it, Isa isa, float* sc) {
  if (isa == Isa::kAvx512)
    scores_avx512(it, sc);
  else if (isa == Isa::kAvx2)
    scores_avx2(it, sc);
  else
    scores_generic(it, sc);
}

// acc += the chunk's weighted sum of V (it.S <= kChunk positions): the vector paths add their sums into acc from
// registers; the portable loop sums into a zeroed `part`, then adds it in
template <typename T>
void weighted_sum(const Item<T>& it, Isa isa, const float* p, int64_t ps, float* acc, std::vector<float>& part) {
  if (isa == Isa::kAvx512) return weighted_sum_avx512(it, p, ps, acc);
  if (isa == Isa::kAvx2) return weighted_sum_avx2(it, p, ps, acc);
  const size_t n = static_cast<size_t>(it.g * it.D);
  part.assign(n, 0.f);
  weighted_sum_generic(it, p, ps, part.data());
  for (size_t i = 0; i < n; ++i) acc[i] += part[i];
}

template <typename T>
void run_item(const Item<T>& it, Isa isa, Scratch& w) {
  std::vector<float>&sc = w.sc, &acc = w.acc, &mx = w.mx, &sum = w.sum;
  sc.resize(static_cast<size_t>(it.S * it.g));
  acc.assign(static_cast<size_t>(it.g * it.D), 0.f);
  mx.assign(static_cast<size_t>(it.g), -INFINITY);
  sum.assign(static_cast<size_t>(it.g), 0.f);
  scores(it, isa, sc.data());
  for (int64_t j = 0; j < it.g; ++j) {
    float* row = sc.data() + j * it.S;
    if (isa != Isa::kGeneric) {  // std::exp was 224K calls a step, small preset at 2330 positions
      mx[j] = max_avx2(row, it.S);
      sum[j] = exp_sum_avx2(row, it.S, mx[j]);
      continue;
    }
    for (int64_t s = 0; s < it.S; ++s) mx[j] = std::max(mx[j], row[s]);
    for (int64_t c = 0; c < it.S; c += kChunk) {  // the normaliser in the same two levels
      float chunk = 0.f;
      for (int64_t s = c; s < std::min<int64_t>(c + kChunk, it.S); ++s) chunk += row[s] = std::exp(row[s] - mx[j]);
      sum[j] += chunk;
    }
  }
  // the weighted sum in chunks of kChunk positions, each added into acc: a running sum over every position lost
  // 2x torch's fp32 error at 257 positions (tests/test_decode_attention.py); two levels keep it near fp32's
  for (int64_t c = 0; c < it.S; c += kChunk) {
    Item<T> sub = it;
    sub.v = it.v + c * it.kv_ss;
    sub.S = std::min<int64_t>(kChunk, it.S - c);
    weighted_sum(sub, isa, sc.data() + c, it.S, acc.data(), w.part);
  }
  for (int64_t j = 0; j < it.g; ++j) {
    const float inv = 1.0f / sum[j];
    for (int64_t d = 0; d < it.D; ++d) it.o[j * it.o_sh + d] = acc[j * it.D + d] * inv;
  }
}

// Row b of q attends [lo, hi) of cache row slot[b] (b where slot is null), or [lo_b[b], hi_b[b]) where given.
struct Rows {
  const int64_t* slot;
  const int64_t* lo;
  const int64_t* hi;
};

template <typename T>
void run(const float* q, int64_t q_sb, int64_t q_sh, const T* k, const T* v, int64_t kv_sb, int64_t kv_sh,
         int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t lo,
         int64_t hi, float scale, int num_threads, bool generic, Rows rows = {nullptr, nullptr, nullptr}) {
  const int64_t g = H / KV, items = B * KV;
  // the vector paths need whole vectors of D (every Llama head: 64, 128); else the portable loops
  const Isa best = generic ? Isa::kGeneric : cpu_isa();
  const Isa isa = best == Isa::kAvx512 && D % 16 == 0 ? Isa::kAvx512
                  : best >= Isa::kAvx2 && D % 8 == 0  ? Isa::kAvx2
                                                      : Isa::kGeneric;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), items)));
#pragma omp parallel num_threads(threads)
  {
    Scratch scratch;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t b = i / KV, kh = i % KV;
      const int64_t s = rows.slot ? rows.slot[b] : b, l = rows.lo ? rows.lo[b] : lo, h = rows.hi ? rows.hi[b] : hi;
      const Item<T> it{q + b * q_sb + kh * g * q_sh, q_sh, k + s * kv_sb + kh * kv_sh + l * kv_ss,
                       v + s * kv_sb + kh * kv_sh + l * kv_ss, kv_ss, o + b * o_sb + kh * g * o_sh, o_sh,
                       g, D, h - l, scale};
      run_item(it, isa, scratch);
    }
  }
}

}  // namespace

void decode_attention(const float* q, int64_t q_sb, int64_t q_sh, const float* k, const float* v, int64_t kv_sb,
                      int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh, int64_t B, int64_t H,
                      int64_t KV, int64_t D, int64_t lo, int64_t hi, float scale, int num_threads, bool generic) {
  run(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_ss, o, o_sb, o_sh, B, H, KV, D, lo, hi, scale, num_threads, generic);
}

void decode_attention_bf16(const float* q, int64_t q_sb, int64_t q_sh, const uint16_t* k, const uint16_t* v,
                           int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh,
                           int64_t B, int64_t H, int64_t KV, int64_t D, int64_t lo, int64_t hi, float scale,
                           int num_threads, bool generic) {
  run(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_ss, o, o_sb, o_sh, B, H, KV, D, lo, hi, scale, num_threads, generic);
}

void decode_attention_rows(const float* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v, bool kv_bf16,
                           int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh,
                           int64_t B, int64_t H, int64_t KV, int64_t D, const int64_t* slot, const int64_t* lo,
                           const int64_t* hi, float scale, int num_threads, bool generic) {
  const Rows rows{slot, lo, hi};
  if (kv_bf16)
    run(q, q_sb, q_sh, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v), kv_sb, kv_sh, kv_ss, o,
        o_sb, o_sh, B, H, KV, D, 0, 1, scale, num_threads, generic, rows);
  else
    run(q, q_sb, q_sh, static_cast<const float*>(k), static_cast<const float*>(v), kv_sb, kv_sh, kv_ss, o, o_sb,
        o_sh, B, H, KV, D, 0, 1, scale, num_threads, generic, rows);
}

}  // namespace pllava
