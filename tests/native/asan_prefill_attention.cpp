// Runs the bf16 prefill attention under AddressSanitizer/UBSan on awkward shapes (one position, tails of the 16-row
// query block and of the 64-key block, GQA, batches, every head size, a key range longer than the queries, padded
// strides): every read must stay inside q, k and v, every write inside o's rows (built and run by
// tests/test_prefill_attention.py). Each buffer is its own exact-size heap block. Values against a scalar fp32
// reading of the contract (within bf16's rounding of the weights and the output). Skips where the CPU has no
// AVX512-BF16.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/prefill_attention.h"
#include "bf16_bits.h"

int main() {
  if (!pllava::prefill_attention_available()) {
    std::printf("no AVX512-BF16 here; asan prefill attention: ok\n");
    return 0;
  }
  // B, H, KV, L, Lk, D, causal
  const int cases[][7] = {{1, 2, 2, 1, 1, 16, 1},   {1, 4, 2, 17, 17, 128, 1}, {2, 3, 3, 77, 77, 64, 0},
                          {1, 2, 1, 65, 65, 32, 1}, {2, 2, 2, 10, 75, 256, 1}, {1, 1, 1, 64, 64, 16, 0},
                          {1, 2, 2, 130, 130, 64, 1}, {1, 2, 2, 16, 76, 64, 1}};
  unsigned seed = 5;
  auto rnd = [&seed]() { return static_cast<float>((seed = seed * 1103515245u + 12345u) >> 8 & 0xFFFF) / 32768.f - 1.f; };
  for (auto& c : cases) {
    const int B = c[0], H = c[1], KV = c[2], L = c[3], Lk = c[4], D = c[5];
    const bool causal = c[6] != 0;
    for (int pad : {0, 8}) {
      const int ld = D + pad;  // a position's stride; heads then batches, packed
      std::vector<uint16_t> q(static_cast<size_t>(B) * H * L * ld - pad), k(static_cast<size_t>(B) * KV * Lk * ld - pad),
          v(k.size()), o(static_cast<size_t>(B) * H * L * ld - pad, 0x7FC0);  // o: NaN where nothing is written
      for (auto& x : q) x = to_bf16(rnd());
      for (auto& x : k) x = to_bf16(rnd());
      for (auto& x : v) x = to_bf16(rnd());
      pllava::AttnArgs a{q.data(), k.data(), v.data(), o.data(),
                         int64_t(H) * L * ld, int64_t(L) * ld, ld, int64_t(KV) * Lk * ld, int64_t(Lk) * ld, ld,
                         int64_t(KV) * Lk * ld, int64_t(Lk) * ld, ld, int64_t(H) * L * ld, int64_t(L) * ld, ld,
                         B, H, KV, L, Lk, D, causal, 1.0f / std::sqrt(static_cast<float>(D))};
      pllava::prefill_attention_bf16(a, 2);
      std::vector<float> s(Lk);
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
          for (int i = 0; i < L; ++i) {
            const int kh = h / (H / KV), last = causal ? i + (Lk - L) : Lk - 1;
            const uint16_t* qr = &q[(size_t(b) * H + h) * L * ld + size_t(i) * ld];
            float mx = -INFINITY, sum = 0.f;
            for (int t = 0; t <= last; ++t) {
              const uint16_t* kr = &k[(size_t(b) * KV + kh) * Lk * ld + size_t(t) * ld];
              float dot = 0.f;
              for (int e = 0; e < D; ++e) dot += from_bf16(qr[e]) * from_bf16(kr[e]);
              s[t] = dot * a.scale;
              mx = std::fmax(mx, s[t]);
            }
            for (int t = 0; t <= last; ++t) sum += s[t] = std::exp(s[t] - mx);
            for (int e = 0; e < D; ++e) {
              float want = 0.f;
              for (int t = 0; t <= last; ++t) want += s[t] * from_bf16(v[(size_t(b) * KV + kh) * Lk * ld + size_t(t) * ld + e]);
              want /= sum;
              const float got = from_bf16(o[(size_t(b) * H + h) * L * ld + size_t(i) * ld + e]);
              if (!(std::fabs(got - want) <= 0.02f)) {  // |v| <= 1: bf16 weights and output, ~2^-8 each
                std::printf("mismatch B=%d H=%d KV=%d L=%d Lk=%d D=%d causal=%d pad=%d at (%d, %d, %d, %d): %g vs %g\n",
                            B, H, KV, L, Lk, D, causal, pad, b, h, i, e, got, want);
                return 1;
              }
            }
          }
    }
  }
  std::printf("asan prefill attention: ok\n");
  return 0;
}
