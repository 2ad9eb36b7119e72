// Per-row symmetric int8 quantization of a weight on the CPU: what quantize="int8" does to every decoder linear
// (and, twice, to lm_head) as a checkpoint loads, bit-equal to quant.quantize_weight's torch formula.
//
// Why: that formula as torch ops (w.float(), abs, amax, divide, round, clamp, to(int8)) makes six full-size
// temporaries a weight, each a fresh mapping page-faulted as it is written: 203 ms for one 11008 x 4096 fp32
// weight on 2 Zen 5 cores (275 ms from bf16), 8.7 s of a 11.9 s load of a 6-layer checkpoint at pllava-7b's
// widths, ~30 s of a whole 7B load. Here a row is read twice (its absmax, then its quotients, while it is in L1 /
// L2) and q written once, with no temporary.
//
// Exactness: the absmax is the integer max of the sign-cleared bits (for IEEE floats that order is the order of
// magnitudes, and inf / NaN sort above every finite value, so a row holding one reports it and the caller keeps
// torch's formula for that weight). The scale itself is rounded to the engine's dtype by torch, on the (N,) vector.
// The quotient is an IEEE fp32 division, as torch's (not a multiply by a reciprocal); it is clamped to [-128, 128]
// and rounded half to even by adding and subtracting 1.5 * 2^23 (exact for |v| < 2^22 in the default rounding mode;
// the build has no -ffast-math to reassociate it), then clamped to [-127, 127]: the same integer as round-then-clamp.
// The head's residual w - q * s is formed in fp64 (q * s is exact there) and rounded to fp32 once, as torch's.
//
// The row bodies are plain loops, compiled once a vector ISA (AVX-512, AVX2, baseline): GCC 12 vectorizes the
// absmax on all three and the quotients on AVX-512 (AVX2's int32 -> int8 narrowing defeats it). One 11008 x 4096
// fp32 weight, 2 Zen 5 cores: 23-32 ms (AVX-512), 45 (AVX2), 51 (portable), against torch's 208.
//
// The same two passes quantize quantize="w8a8"'s prefill activations, a row a token (model/quant.py), and
// int32_dequant_rows turns their int8 x int8 product (int32, exact) back into the model's dtype in one pass:
// y = (float(acc) * row_scale) * col_scale, rounded once to fp32 or to bf16 (nearest even, NaN kept), the order and
// rounding of torch's `(acc.float() * xs[:, None] * s[None, :]).to(dtype)`, which makes three (M, N) temporaries:
// 33 ms against this pass's ~3 for pllava-7b's (2327, 4096) q_proj product on 2 Zen 5 cores. Its rows' outliers
// (|x| past a threshold: LLM.int8()'s decomposition, a row's own) are found in the same two passes: the first
// leaves them out of the absmax and counts them, the second gives them q = 0 and writes their columns and values
// where the caller's prefix sum of the counts says (a random-weight 7B preset's MLP input, 87 k of them in
// (2307, 11008): 30 ms for both passes, against 125 for the same split in torch ops).
//
// quantize="int4"'s groups are quantized here too (int4_quantize_groups, below: each group's scale by least
// squares, its q and its bytes in one pass), and widened back for a prefill's GEMM (int4_dequant).
#include "int8_quantize.h"

#include "cpu_isa.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace pllava {
namespace {

constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: v + kRound - kRound rounds v half to even for |v| < 2^22

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
__attribute__((always_inline)) inline float as_float(T v);
template <>
__attribute__((always_inline)) inline float as_float(float v) {
  return v;
}
template <>
__attribute__((always_inline)) inline float as_float(uint16_t v) {  // bf16 bits -> fp32, exact
  return bits_to_float(static_cast<uint32_t>(v) << 16);
}

template <typename T>
__attribute__((always_inline)) inline uint32_t abs_bits(T v);
template <>
__attribute__((always_inline)) inline uint32_t abs_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u & 0x7FFFFFFFu;
}
template <>
__attribute__((always_inline)) inline uint32_t abs_bits(uint16_t v) {
  return static_cast<uint32_t>(v & 0x7FFFu) << 16;
}

template <typename T>
__attribute__((always_inline)) inline float absmax_row(const T* w, int64_t K) {
  uint32_t m = 0;
  for (int64_t k = 0; k < K; ++k) m = std::max(m, abs_bits(w[k]));
  return bits_to_float(m);
}

template <typename T>
__attribute__((always_inline)) inline void quantize_row(const T* w, int64_t K, float s, int8_t* q, float* resid) {
  for (int64_t k = 0; k < K; ++k) {
    float v = as_float(w[k]) / s;
    v = std::min(std::max(v, -128.0f), 128.0f);
    const float r = (v + kRound) - kRound;
    const int32_t i = std::min(std::max(static_cast<int32_t>(r), -127), 127);
    q[k] = static_cast<int8_t>(i);
  }
  if (resid != nullptr) {
    const double sd = s;
    for (int64_t k = 0; k < K; ++k)
      resid[k] = static_cast<float>(static_cast<double>(as_float(w[k])) - static_cast<double>(q[k]) * sd);
  }
}

constexpr uint32_t kInfBits = 0x7F800000u;

// w8a8's split (tb: the threshold's bits): a value is an outlier where tb < |x| <= inf (an inf is one; a NaN is not,
// and stays in its row, whose absmax then reports it). amax over the rest, and the outliers' count.
template <typename T>
__attribute__((always_inline)) inline float absmax_row_split(const T* w, int64_t K, uint32_t tb, int64_t* cnt) {
  uint32_t m = 0, c = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t b = abs_bits(w[k]);
    const bool out = b > tb && b <= kInfBits;
    m = std::max(m, out ? 0u : b);
    c += out ? 1u : 0u;
  }
  *cnt = c;
  return bits_to_float(m);
}

// quantize_row with the outliers' q set to 0, and (idx, val) of each outlier written in order (nout of them)
template <typename T>
__attribute__((always_inline)) inline void quantize_row_split(const T* w, int64_t K, float s, uint32_t tb, int8_t* q,
                                                              int64_t nout, int64_t* idx, float* val) {
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t b = abs_bits(w[k]);
    float v = as_float(w[k]) / s;
    v = std::min(std::max(v, -128.0f), 128.0f);
    const float r = (v + kRound) - kRound;
    const int32_t i = std::min(std::max(static_cast<int32_t>(r), -127), 127);
    q[k] = (b > tb && b <= kInfBits) ? 0 : static_cast<int8_t>(i);
  }
  for (int64_t k = 0, o = 0; o < nout && k < K; ++k) {  // a row without outliers skips this
    const uint32_t b = abs_bits(w[k]);
    if (b > tb && b <= kInfBits) {
      idx[o] = k;
      val[o++] = as_float(w[k]);
    }
  }
}

// One job: rows [n0, n1) of either pass.
struct Job {
  const void* w;
  bool bf16;
  int64_t K, ldw;
  float* amax;          // pass 1
  const float* scale;   // pass 2
  int8_t* q;
  float* resid;
  bool split = false;   // w8a8's split: the threshold's bits, the counts (pass 1), their offsets and the outliers
  uint32_t tb = 0;
  int64_t* cnt = nullptr;
  const int64_t* off = nullptr;  // (N + 1,)
  int64_t* idx = nullptr;
  float* val = nullptr;
};

template <typename T>
__attribute__((always_inline)) inline void run_rows(const Job& j, int64_t n0, int64_t n1) {
  const T* w = static_cast<const T*>(j.w);
  for (int64_t n = n0; n < n1; ++n) {
    if (j.amax != nullptr)
      j.amax[n] = j.split ? absmax_row_split(w + n * j.ldw, j.K, j.tb, j.cnt + n) : absmax_row(w + n * j.ldw, j.K);
    else if (j.split)
      quantize_row_split(w + n * j.ldw, j.K, j.scale[n], j.tb, j.q + n * j.K, j.off[n + 1] - j.off[n],
                         j.idx + j.off[n], j.val + j.off[n]);
    else
      quantize_row(w + n * j.ldw, j.K, j.scale[n], j.q + n * j.K, j.resid ? j.resid + n * j.K : nullptr);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void rows_avx512(const Job& j, int64_t n0, int64_t n1) {
  j.bf16 ? run_rows<uint16_t>(j, n0, n1) : run_rows<float>(j, n0, n1);
}
__attribute__((target("avx2,fma"))) void rows_avx2(const Job& j, int64_t n0, int64_t n1) {
  j.bf16 ? run_rows<uint16_t>(j, n0, n1) : run_rows<float>(j, n0, n1);
}
void rows_generic(const Job& j, int64_t n0, int64_t n1) {
  j.bf16 ? run_rows<uint16_t>(j, n0, n1) : run_rows<float>(j, n0, n1);
}

void run(const Job& j, int64_t N, int num_threads, bool generic) {
  const Isa isa = generic ? Isa::kGeneric : cpu_isa();
  void (*fn)(const Job&, int64_t, int64_t) = isa == Isa::kAvx512 ? rows_avx512
                                            : isa == Isa::kAvx2  ? rows_avx2
                                                                 : rows_generic;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), N)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(j, N * t / nt, N * (t + 1) / nt);
  }
}

struct Dequant {
  const int32_t* acc;
  int64_t N, lda;
  const float* rs;  // (M,)
  const float* cs;  // (N,)
  void* out;
  int64_t ldo;
  bool bf16;
};

__attribute__((always_inline)) inline uint16_t to_bf16(float f) {  // round to nearest even; a NaN stays a NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__attribute__((always_inline)) inline void dequant_run(const Dequant& d, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* a = d.acc + m * d.lda;
    const float r = d.rs[m];
    if (d.bf16) {
      uint16_t* o = static_cast<uint16_t*>(d.out) + m * d.ldo;
      for (int64_t n = 0; n < d.N; ++n) o[n] = to_bf16(static_cast<float>(a[n]) * r * d.cs[n]);
    } else {
      float* o = static_cast<float*>(d.out) + m * d.ldo;
      for (int64_t n = 0; n < d.N; ++n) o[n] = static_cast<float>(a[n]) * r * d.cs[n];
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dequant_avx512(const Dequant& d, int64_t m0,
                                                                                  int64_t m1) {
  dequant_run(d, m0, m1);
}
__attribute__((target("avx2,fma"))) void dequant_avx2(const Dequant& d, int64_t m0, int64_t m1) {
  dequant_run(d, m0, m1);
}
void dequant_generic(const Dequant& d, int64_t m0, int64_t m1) { dequant_run(d, m0, m1); }

// int4 (quantize="int4"): rows [n0, n1) of a packed weight (int4_gemv's layout) widened to fl32(q * s), written
// in fp32 or rounded to bf16, for a prefill's GEMM. A plain loop a 16-byte group, vectorized by the compiler.
struct Int4 {
  const uint8_t* q;
  const uint16_t* s;  // bf16 bits (N, K / 32)
  int64_t K;
  void* out;
  int64_t ldo;
  bool bf16;
};

__attribute__((always_inline)) inline void int4_run(const Int4& d, int64_t n0, int64_t n1) {
  const int64_t G = d.K / 32;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* b = d.q + n * (d.K / 2) + g * 16;
      const float s = as_float(d.s[n * G + g]);
      float v[32];
      for (int j = 0; j < 16; ++j) {
        v[j] = static_cast<float>((b[j] & 15) - 8) * s;
        v[16 + j] = static_cast<float>((b[j] >> 4) - 8) * s;
      }
      const int64_t o = n * d.ldo + g * 32;
      if (d.bf16)
        for (int j = 0; j < 32; ++j) static_cast<uint16_t*>(d.out)[o + j] = to_bf16(v[j]);
      else
        std::memcpy(static_cast<float*>(d.out) + o, v, sizeof v);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void int4_avx512(const Int4& d, int64_t n0,
                                                                              int64_t n1) {
  int4_run(d, n0, n1);
}
__attribute__((target("avx2,fma"))) void int4_avx2(const Int4& d, int64_t n0, int64_t n1) { int4_run(d, n0, n1); }
void int4_generic(const Int4& d, int64_t n0, int64_t n1) { int4_run(d, n0, n1); }

// int4 groups (int8_quantize.h): each divisor's scale, its q, and the least-squares scale for that q; the best fit
// wins, then q is fitted to it and packed. Why: llama.cpp's Q4_0 scale (amax / 8 alone) leaves ~11 % of a Gaussian
// group's squared error on the table (~8 % with Student-t(4) tails). These 4 divisors get 0.895x Q4_0's error
// (t(4): 0.924x); 7 of them on [7, 10] in steps of 0.5 0.893x, a 0.25 grid on [6, 12] 0.886x (10 and 9.5 almost
// never win), one refit more 0.002.
// 8 comes first, so a tie keeps the Q4_0 candidate, whose q_8 is Q4_0's q itself: its refit is never worse than Q4_0
// (bar the scale's bf16 rounding).
// Exactness (the torch formula in model/int4.py gives the same bits in any summation order): a nonzero q_t needs
// |w| >= |s_t| / 2 >= amax / 18.1, so the products w q_t are multiples of one power of two (w's ulp at amax / 18.1,
// or 2^-149) under 2^5 * 2^3 * 2^24 of them, and their sum under 2^37 of them: exact in fp64.
constexpr float kInt4Divisors[] = {8.0f, 7.0f, 8.5f, 9.0f};

// A block of L groups at a time, a group a lane of GCC's vector types (compiled once per ISA like the loops above),
// so a group's sums are lane-wise accumulations: fp32 vectors of L lanes and fp64 ones of L, L = 8 on AVX-512 (ymm
// and zmm), 4 elsewhere (xmm and ymm: on AVX2 8 lanes' fp64 type is split by the compiler, 148 ms against 4 lanes'
// 106; AVX-512 with 4 lanes 74-81 ms). The whole quantization of 7B's (11008, 4096) MLP weight on 2 Zen 5 cores:
// 52-56 ms (AVX-512), 103-106 (AVX2), 144 (portable); a group at a time (plain loops, horizontal sums) took ~2x as
// long, and plain loops over a block, which the compiler left scalar, 6x.
#pragma GCC diagnostic ignored "-Wpsabi"  // (the vector helpers are always inlined: no call passes a vector)
template <int L>
struct Vec {
  typedef float f __attribute__((vector_size(4 * L)));
  typedef uint32_t u __attribute__((vector_size(4 * L)));
  typedef int32_t i __attribute__((vector_size(4 * L)));
  typedef double d __attribute__((vector_size(8 * L)));
};

template <typename FV>
__attribute__((always_inline)) inline FV splat(float v) { return FV{} + v; }

template <typename FV, typename UV>
__attribute__((always_inline)) inline FV bf16_round(FV f) {  // to_bf16 lane-wise, as floats (finite values)
  UV u = (UV)f;
  u = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
  return (FV)u;
}

// Groups [0, n) of a block (n <= L), group j at w + j * ldw -> its scale out[j] and its 16 bytes at packed + 16 j.
template <int L, typename T>
__attribute__((always_inline)) inline void int4_block(const T* w, int64_t ldw, int n, uint16_t* out,
                                                    uint8_t* packed) {
  typedef typename Vec<L>::f fv;
  typedef typename Vec<L>::u uv;
  typedef typename Vec<L>::i iv;
  typedef typename Vec<L>::d dv;
  float xs[32][L];
  for (int j = 0; j < L; ++j)
    for (int k = 0; k < 32; ++k) xs[k][j] = j < n ? as_float(w[j * ldw + k]) : 0.0f;
  fv x[32];
  dv xd[32];
  std::memcpy(x, xs, sizeof x);
  for (int k = 0; k < 32; ++k) xd[k] = __builtin_convertvector(x[k], dv);
  uv mb = {};
  for (int k = 0; k < 32; ++k) {
    const uv b = (uv)x[k] & 0x7FFFFFFFu;
    mb = b > mb ? b : mb;
  }
  const fv amax = (fv)mb;
  iv pos = {};
  for (int k = 0; k < 32; ++k) pos |= x[k] == amax;
  // the weight of largest magnitude positive (or a tie; or all 0): a negative scale
  const fv sign = pos != 0 ? splat<fv>(-1.0f) : splat<fv>(1.0f);
  constexpr int kC = sizeof kInt4Divisors / sizeof kInt4Divisors[0];
  dv a[kC];
  fv b[kC];
  for (int c = 0; c < kC; ++c) {
    fv mag = amax / kInt4Divisors[c];
    mag = mag < 1e-12f ? splat<fv>(1e-12f) : mag;
    const fv st = bf16_round<fv, uv>(sign * mag);
    fv bc = {};
    dv ac = {};
    for (int k = 0; k < 32; ++k) {
      fv v = x[k] / st;
      v = v < -16.0f ? splat<fv>(-16.0f) : v;
      v = v > 16.0f ? splat<fv>(16.0f) : v;
      v = (v + kRound) - kRound;
      v = v < -8.0f ? splat<fv>(-8.0f) : v;
      const fv q = v > 7.0f ? splat<fv>(7.0f) : v;
      bc += q * q;  // (integers under 2^12: exact)
      ac += xd[k] * __builtin_convertvector(q, dv);
    }
    a[c] = ac;
    b[c] = bc;
  }
  for (int j = 0; j < n; ++j) {  // (a lane at a time: GCC scalarizes a select over fp64 lanes anyway)
    double best = -1.0, fit = 0.0;
    for (int c = 0; c < kC; ++c) {
      const double bd = b[c][j], score = bd > 0.0 ? a[c][j] * a[c][j] / bd : -1.0;
      if (score > best) best = score, fit = a[c][j] / bd;
    }
    if (best > 0.0 && mb[j] < kInfBits) {
      out[j] = to_bf16(static_cast<float>(fit));
    } else {  // Q4_0's scale: a group whose every q is 0, or one holding inf or NaN
      const float mag = amax[j] / 8.0f;
      out[j] = to_bf16(sign[j] * (mag < 1e-12f ? 1e-12f : mag));
    }
    const float sj = as_float(out[j]);
    uint8_t* pj = packed + 16 * j;
    if (!(std::fabs(sj) <= std::numeric_limits<float>::max()) || sj == 0.0f) {  // (inf, NaN)
      std::memset(pj, 0, 16);
      continue;
    }
    const T* wj = w + j * ldw;
    float q[32];
    for (int k = 0; k < 32; ++k) {  // q fitted to the scale in use: the same quotient as quantize_row's
      float v = as_float(wj[k]) / sj;
      v = std::min(std::max(v, -16.0f), 16.0f);
      q[k] = std::min(std::max((v + kRound) - kRound, -8.0f), 7.0f);
    }
    for (int k = 0; k < 16; ++k)
      pj[k] = static_cast<uint8_t>((static_cast<int32_t>(q[k]) + 8) | ((static_cast<int32_t>(q[16 + k]) + 8) << 4));
  }
}

struct Int4Groups {
  const void* w;
  bool bf16;
  int64_t ldw;
  uint16_t* scale;
  uint8_t* packed;
};

template <int L, typename T>
__attribute__((always_inline)) inline void int4_groups_run(const Int4Groups& d, int64_t g0, int64_t g1) {
  const T* w = static_cast<const T*>(d.w);
  for (int64_t g = g0; g < g1; g += L)
    int4_block<L>(w + g * d.ldw, d.ldw, static_cast<int>(std::min<int64_t>(L, g1 - g)), d.scale + g,
                  d.packed + 16 * g);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void int4g_avx512(const Int4Groups& d, int64_t g0,
                                                                               int64_t g1) {
  d.bf16 ? int4_groups_run<8, uint16_t>(d, g0, g1) : int4_groups_run<8, float>(d, g0, g1);
}
__attribute__((target("avx2,fma"))) void int4g_avx2(const Int4Groups& d, int64_t g0, int64_t g1) {
  d.bf16 ? int4_groups_run<4, uint16_t>(d, g0, g1) : int4_groups_run<4, float>(d, g0, g1);
}
void int4g_generic(const Int4Groups& d, int64_t g0, int64_t g1) {
  d.bf16 ? int4_groups_run<4, uint16_t>(d, g0, g1) : int4_groups_run<4, float>(d, g0, g1);
}

}  // namespace

void int32_dequant_rows(const int32_t* acc, int64_t M, int64_t N, int64_t lda, const float* row_scale,
                        const float* col_scale, void* out, bool out_bf16, int64_t ldo, int num_threads, bool generic) {
  const Isa isa = generic ? Isa::kGeneric : cpu_isa();
  void (*fn)(const Dequant&, int64_t, int64_t) = isa == Isa::kAvx512 ? dequant_avx512
                                                : isa == Isa::kAvx2  ? dequant_avx2
                                                                     : dequant_generic;
  const Dequant d{acc, N, lda, row_scale, col_scale, out, ldo, out_bf16};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), M)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(d, M * t / nt, M * (t + 1) / nt);
  }
}

void row_absmax(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t ldw, float* amax, int num_threads,
                bool generic) {
  run(Job{w, w_bf16, K, ldw, amax, nullptr, nullptr, nullptr}, N, num_threads, generic);
}

void int8_quantize_rows(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t ldw, const float* scale, int8_t* q,
                        float* resid, int num_threads, bool generic) {
  run(Job{w, w_bf16, K, ldw, nullptr, scale, q, resid}, N, num_threads, generic);
}

static uint32_t threshold_bits(float t) {
  uint32_t u;
  std::memcpy(&u, &t, sizeof u);
  return u & 0x7FFFFFFFu;
}

void row_absmax_split(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t ldx, float threshold, float* amax,
                      int64_t* cnt, int num_threads, bool generic) {
  Job j{x, x_bf16, K, ldx, amax, nullptr, nullptr, nullptr};
  j.split = true;
  j.tb = threshold_bits(threshold);
  j.cnt = cnt;
  run(j, M, num_threads, generic);
}

void int8_quantize_rows_split(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t ldx, float threshold,
                              const float* scale, int8_t* q, const int64_t* off, int64_t* idx, float* val,
                              int num_threads, bool generic) {
  Job j{x, x_bf16, K, ldx, nullptr, scale, q, nullptr};
  j.split = true;
  j.tb = threshold_bits(threshold);
  j.off = off;
  j.idx = idx;
  j.val = val;
  run(j, M, num_threads, generic);
}

void int4_dequant(const uint8_t* q, const uint16_t* scale, int64_t N, int64_t K, void* out, bool out_bf16, int64_t ldo,
                  int num_threads, bool generic) {
  const Isa isa = generic ? Isa::kGeneric : cpu_isa();
  void (*fn)(const Int4&, int64_t, int64_t) = isa == Isa::kAvx512 ? int4_avx512
                                             : isa == Isa::kAvx2  ? int4_avx2
                                                                  : int4_generic;
  const Int4 d{q, scale, K, out, ldo, out_bf16};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), N)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(d, N * t / nt, N * (t + 1) / nt);
  }
}

void int4_quantize_groups(const void* w, bool w_bf16, int64_t G, int64_t ldw, uint16_t* scale, uint8_t* packed,
                          int num_threads, bool generic) {
  const Isa isa = generic ? Isa::kGeneric : cpu_isa();
  void (*fn)(const Int4Groups&, int64_t, int64_t) = isa == Isa::kAvx512 ? int4g_avx512
                                                   : isa == Isa::kAvx2  ? int4g_avx2
                                                                        : int4g_generic;
  const Int4Groups d{w, w_bf16, ldw, scale, packed};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      num_threads > 0 ? num_threads : omp_get_max_threads(), G)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    fn(d, G * t / nt, G * (t + 1) / nt);
  }
}

}  // namespace pllava
