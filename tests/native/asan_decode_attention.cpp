// Runs the decode attention (fp32 and bf16 caches) under AddressSanitizer/UBSan (built and run by
// tests/test_decode_attention.py): MHA and GQA, head sizes on and off the 16-wide vector, one position and a window's
// lower bound, each ISA (AVX-512 and AVX2 where the CPU runs them, the portable loops), and the per-row form (slots
// reversed). Each of q, k, v and o is its own exact-size heap block (k and v end at position hi), so one element
// past is caught; the result must be a convex mix of V's values (every V row holds one constant per (b, kv head)).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cpu_isa.h"
#include "../../csrc/decode_attention.h"

int main() {
  const int cases[][6] = {{1, 12, 12, 64, 0, 257}, {2, 8, 2, 128, 0, 90}, {1, 7, 1, 80, 5, 33}, {1, 4, 2, 16, 19, 20},
                          {3, 6, 3, 24, 2, 9}, {1, 8, 2, 64, 3, 45}};
  unsigned seed = 11;
  auto rnd = [&seed]() { return static_cast<float>((seed = seed * 1103515245u + 12345u) >> 8) / 16777216.0f - 0.5f; };
  for (auto& c : cases) {
    const int B = c[0], H = c[1], KV = c[2], D = c[3], lo = c[4], hi = c[5], S = hi;  // cache slots end at hi
    std::vector<float> q(static_cast<size_t>(B) * H * D), k(static_cast<size_t>(B) * KV * S * D),
        v(static_cast<size_t>(B) * KV * S * D);
    for (auto& x : q) x = rnd();
    for (auto& x : k) x = rnd();
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < KV; ++h)
        for (int s = 0; s < S * D; ++s)
          v[(static_cast<size_t>(b) * KV + h) * S * D + s] = static_cast<float>(b * KV + h);
    std::vector<uint16_t> kb(k.size()), vb(v.size());  // bf16: the high half of each fp32 (V's integers are exact)
    for (size_t i = 0; i < k.size(); ++i) {
      uint32_t u;
      std::memcpy(&u, &k[i], 4);
      kb[i] = static_cast<uint16_t>(u >> 16);
      std::memcpy(&u, &v[i], 4);
      vb[i] = static_cast<uint16_t>(u >> 16);
    }
    std::vector<int64_t> slot(B), lo_b(B, lo), hi_b(B, hi);  // decode_attention_rows: the slots reversed
    for (int b = 0; b < B; ++b) slot[b] = B - 1 - b;
    for (int run = 0; run < 12; ++run) {
      const int mode = run % 3;  // 0: the best ISA, 1: capped at AVX2, 2: the portable loops (the flag)
      const bool generic = mode == 2, bf16 = (run / 3) % 2 != 0, rows = run >= 6;
      pllava::set_isa_cap(mode == 1 ? "avx2" : "best");
      std::vector<float> o(static_cast<size_t>(B) * H * D, NAN);
      const float sc = 1.0f / std::sqrt(static_cast<float>(D));
      if (rows)
        pllava::decode_attention_rows(q.data(), H * D, D, bf16 ? static_cast<const void*>(kb.data()) : k.data(),
                                      bf16 ? static_cast<const void*>(vb.data()) : v.data(), bf16, KV * S * D, S * D, D,
                                      o.data(), H * D, D, B, H, KV, D, slot.data(), lo_b.data(), hi_b.data(), sc, 2,
                                      generic);
      else if (bf16)
        pllava::decode_attention_bf16(q.data(), H * D, D, kb.data(), vb.data(), KV * S * D, S * D, D, o.data(), H * D,
                                      D, B, H, KV, D, lo, hi, sc, 2, generic);
      else
        pllava::decode_attention(q.data(), H * D, D, k.data(), v.data(), KV * S * D, S * D, D, o.data(), H * D, D, B,
                                 H, KV, D, lo, hi, sc, 2, generic);
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
          for (int d = 0; d < D; ++d) {
            const float want = static_cast<float>((rows ? B - 1 - b : b) * KV + h / (H / KV));
            const float got = o[(static_cast<size_t>(b) * H + h) * D + d];
            if (!(std::fabs(got - want) <= 1e-5f * (1.0f + want))) {
              std::printf("mismatch B=%d H=%d KV=%d D=%d lo=%d hi=%d mode=%d bf16=%d rows=%d at (%d, %d, %d): %g\n",
                          B, H, KV, D, lo, hi, mode, bf16, rows, b, h, d, got);
              return 1;
            }
          }
    }
  }
  pllava::set_isa_cap("best");
  std::printf("asan decode attention: ok\n");
  return 0;
}
