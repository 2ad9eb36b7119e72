// bf16 flash attention for whole prompts (causal) and CLIP's frames (bidirectional) on CPUs with AVX512-BF16.
//
// Why: torch's CPU SDPA (its flash kernel) ran pllava-7b's prefill attention, 32 heads x 2350 positions x 128,
// causal, at 161 GFLOP/s on 2 Zen 5 cores (281-319 ms a layer, ~9 s of a 47 s prefill), and CLIP ViT-L's, 4 frames
// x 16 heads x 577 x 64, at 145 (38-41 ms a call, 30 % of the vision tower), where the same cores run bf16 GEMMs at
// 760-900. Here both products are VDPBF16PS (16 fp32 sums of bf16 pairs an instruction) on tiles that stay in
// registers: 2350 x 128 causal 111 against 319 ms, CLIP's 12 against 41 ms, pllava-34b's GQA layer (56 / 8 heads)
// 169 against 542 ms (benchmarks/bench_prefill_attention.py).
//
// Layout: K and V of each (b, kv head) are first packed in pairs, K along D (Kp[p][s] = k[s][2p], k[s][2p+1]) and
// V along positions (Vp[s/2][c] = v[s][c], v[s+1][c]), zero past Lk, so that one 32-bit broadcast of a q pair (or
// of two softmax weights) against one 64-byte load of the packed operand is one VDPBF16PS. A work item is 16 query
// rows of one head against 64-key blocks up to its last visible key (causal: the diagonal block is the last):
//   S (16 x 64) = q . k^T, four rows at a time against 64 keys (16 accumulators), times the scale;
//   the online softmax in fp32 (a row's running max m and sum l; e^x by the polynomial below), masked keys exactly 0;
//   O (16 x D, fp32) = O * e^(m_old - m_new) + P . V, P rounded to bf16 (as flash attention's second product is).
// Finally O / l, rounded to bf16. One thread computes a row in one fixed order: the bits do not depend on the thread
// count or on what else is in the batch (the engine's batched and one-at-a-time paths rely on it).
#include "prefill_attention.h"

#include "cpu_isa.h"
#include "simd.h"

#include <cpuid.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define PLLAVA_HAVE_BF16 1  // the compiler has the AVX512-BF16 intrinsics (GCC 10, clang 9)
#else
#define PLLAVA_HAVE_BF16 0
#endif

namespace pllava {

bool prefill_attention_supports(int64_t D) {
  return D == 16 || D == 32 || D == 64 || D == 128 || D == 256;
}

bool prefill_attention_available() {
#if PLLAVA_HAVE_BF16
  static const bool bf16 = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0 && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return bf16 && cpu_isa() == Isa::kAvx512;
#else
  return false;
#endif
}

#if PLLAVA_HAVE_BF16
namespace {

constexpr int BM = 16;  // query rows a work item
constexpr int BN = 64;  // keys a block
#define PLLAVA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// e^x, 16 lanes, for x <= 0 (a score less its row's maximum): Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a
// degree-7 polynomial in r, times 2^n by VSCALEFPS), as decode_attention.cpp's exp_avx2. Clamped at -87.3, where
// e^x is ~1e-38: a weight that small is nothing beside the maximum's 1 (masked keys are zeroed, not exponentiated).
// A NaN stays a NaN (VMAXPS returns its second operand when one is a NaN, so x goes second): a NaN score makes its
// row's output NaN, as torch's softmax does, never a finite weight of ~0.
PLLAVA_BF16_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(simd::kExpLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(simd::kExpLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(simd::kExpLn2Lo), r);
  __m512 p = _mm512_set1_ps(simd::kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(simd::kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline uint32_t pair_at(const uint16_t* p) {  // two bf16 as one 32-bit word (low: the first), any alignment
  uint32_t u;
  std::memcpy(&u, p, sizeof u);
  return u;
}

// K of (b, kv head) in pairs along D, V in pairs along positions, both zero from Lk to Lp (a multiple of BN).
void pack(const AttnArgs& a, int64_t b, int64_t kh, uint32_t* Kp, uint32_t* Vp, int64_t Lp) {
  const uint16_t* k = a.k + b * a.k_sb + kh * a.k_sh;
  const uint16_t* v = a.v + b * a.v_sb + kh * a.v_sh;
  const int64_t P = a.D / 2;
  for (int64_t s = 0; s < Lp; ++s)
    for (int64_t p = 0; p < P; ++p) Kp[p * Lp + s] = s < a.Lk ? pair_at(k + s * a.k_sl + 2 * p) : 0u;
  for (int64_t s = 0; s < Lp; s += 2) {
    uint32_t* out = Vp + (s / 2) * a.D;
    for (int64_t c = 0; c < a.D; ++c) {
      const uint32_t lo = s < a.Lk ? v[s * a.v_sl + c] : 0u, hi = s + 1 < a.Lk ? v[(s + 1) * a.v_sl + c] : 0u;
      out[c] = lo | (hi << 16);
    }
  }
}

// Rows [i0, i0 + 16) of head h (batch b) against the packed K / V of its kv head. D = 16 * NV; the P . V product
// takes RG = 16 / NV rows at a time (RG * NV = 16 accumulators).
template <int NV>
PLLAVA_BF16_TARGET void rows_block(const AttnArgs& a, int64_t b, int64_t h, int64_t i0, const uint32_t* Kp,
                                   const uint32_t* Vp, int64_t Lp) {
  constexpr int D = 16 * NV, P = D / 2, RG = BM / NV;
  alignas(64) uint32_t qp[BM][P];
  alignas(64) float S[BM][BN];
  alignas(64) uint16_t Pb[BM][BN];
  alignas(64) float O[BM][D];
  float m[BM], l[BM], corr[BM];
  const int64_t rows = std::min<int64_t>(BM, a.L - i0);
  const uint16_t* q = a.q + b * a.q_sb + h * a.q_sh;
  for (int r = 0; r < BM; ++r) {
    if (r < rows)
      std::memcpy(qp[r], q + (i0 + r) * a.q_sl, D * sizeof(uint16_t));
    else
      std::memset(qp[r], 0, sizeof qp[r]);  // rows past L: computed on zeros, never written
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::memset(O, 0, sizeof O);
  const int64_t off = a.Lk - a.L;  // causal: row i sees keys <= i + off
  const int64_t kend = a.causal ? std::min(a.Lk, i0 + rows + off) : a.Lk;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t s0 = 0; s0 < kend; s0 += BN) {
    for (int rg = 0; rg < BM; rg += 4) {  // S = scale * q . k^T: 4 rows x 64 keys a pass
      __m512 acc[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) {
        const uint32_t* kp = Kp + p * Lp + s0;
        __m512bh kv[4];
        for (int c = 0; c < 4; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(kp + 16 * c);
        for (int r = 0; r < 4; ++r) {
          const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(qp[rg + r][p]));
          for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qb, kv[c]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) _mm512_store_ps(&S[rg + r][16 * c], _mm512_mul_ps(acc[r][c], scale));
    }
    for (int r = 0; r < BM; ++r) {  // the online softmax: the block's weights, the running max and sum
      const int64_t lim = (a.causal ? std::min(a.Lk, i0 + r + off + 1) : a.Lk) - s0;  // visible: [0, lim)
      __m512 e[4];
      __mmask16 mk[4];
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int c = 0; c < 4; ++c) {
        const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, lim - 16 * c));
        mk[c] = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
        e[c] = _mm512_load_ps(&S[r][16 * c]);
        mx = _mm512_mask_max_ps(mx, mk[c], mx, e[c]);
      }
      // finite: every row sees key 0 (the first block); a later block may hold no key a row sees (its max is then
      // -inf, the row's state stays as it was: corr 1, weights 0)
      const float mn = std::max(m[r], _mm512_reduce_max_ps(mx));
      corr[r] = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mn);
      m[r] = mn;
      __m512 sum = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(mn);
      for (int c = 0; c < 4; ++c) {
        e[c] = _mm512_maskz_mov_ps(mk[c], exp16(_mm512_sub_ps(e[c], mv)));
        sum = _mm512_add_ps(sum, e[c]);
      }
      l[r] = l[r] * corr[r] + _mm512_reduce_add_ps(sum);
      _mm512_storeu_si512(&Pb[r][0], (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));  // keys 0-31, in order
      _mm512_storeu_si512(&Pb[r][32], (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
    }
    for (int r0 = 0; r0 < BM; r0 += RG) {  // O = O * corr + P . V, RG rows x D a pass
      __m512 acc[RG][NV];
      for (int r = 0; r < RG; ++r) {
        const __m512 cv = _mm512_set1_ps(corr[r0 + r]);
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(&O[r0 + r][16 * c]), cv);
      }
      for (int j = 0; j < BN / 2; ++j) {  // key pairs (2j, 2j + 1) of the block
        const uint32_t* vp = Vp + (s0 / 2 + j) * D;
        __m512bh vv[NV];
        for (int c = 0; c < NV; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(vp + 16 * c);
        for (int r = 0; r < RG; ++r) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(&Pb[r0 + r][2 * j])));
          for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
        }
      }
      for (int r = 0; r < RG; ++r)
        for (int c = 0; c < NV; ++c) _mm512_store_ps(&O[r0 + r][16 * c], acc[r][c]);
    }
  }
  uint16_t* o = a.o + b * a.o_sb + h * a.o_sh;
  for (int r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    uint16_t* orow = o + (i0 + r) * a.o_sl;
    int c = 0;
    for (; c + 1 < NV; c += 2) {
      const __m512 x0 = _mm512_mul_ps(_mm512_load_ps(&O[r][16 * c]), inv);
      const __m512 x1 = _mm512_mul_ps(_mm512_load_ps(&O[r][16 * c + 16]), inv);
      _mm512_storeu_si512(orow + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
    }
    if (c < NV)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(&O[r][16 * c]), inv)));
  }
}

using RowsFn = void (*)(const AttnArgs&, int64_t, int64_t, int64_t, const uint32_t*, const uint32_t*, int64_t);

RowsFn rows_for(int64_t D) {
  switch (D) {
    case 16: return rows_block<1>;
    case 32: return rows_block<2>;
    case 64: return rows_block<4>;
    case 128: return rows_block<8>;
    default: return rows_block<16>;
  }
}

}  // namespace

void prefill_attention_bf16(const AttnArgs& a, int num_threads) {
  const int64_t Lp = (a.Lk + BN - 1) / BN * BN;
  const int64_t ks = (a.D / 2) * Lp, vs = (Lp / 2) * a.D, items = a.B * a.KV;
  // the packed K and V of every (b, kv head): pllava-7b's prefill, 2 x 38.8 MB a layer, reused call to call
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < static_cast<size_t>(items * (ks + vs))) buf.resize(items * (ks + vs));
  uint32_t* Kp = buf.data();
  uint32_t* Vp = Kp + items * ks;
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t x = 0; x < items; ++x) pack(a, x / a.KV, x % a.KV, Kp + x * ks, Vp + x * vs, Lp);
  const RowsFn fn = rows_for(a.D);
  const int64_t nq = (a.L + BM - 1) / BM, g = a.H / a.KV;
  // causal blocks cost in proportion to their row: the longest first, handed out one at a time
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t x = 0; x < a.B * a.H * nq; ++x) {
    const int64_t qb = nq - 1 - x % nq, bh = x / nq, b = bh / a.H, h = bh % a.H;
    const int64_t kx = b * a.KV + h / g;
    fn(a, b, h, qb * BM, Kp + kx * ks, Vp + kx * vs, Lp);
  }
}
#else
void prefill_attention_bf16(const AttnArgs&, int) {}
#endif

}  // namespace pllava
