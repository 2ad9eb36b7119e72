// Runs the int8, int4 and bf16 GEMVs under AddressSanitizer/UBSan on awkward shapes (K tails, N off the 4-row tile, M up
// to 16, padded row strides, prefetch off, at its default, one line and past q's end; each of the CPU's vector
// paths, AVX-512 and AVX2 where it runs them, and the portable loop): every read must stay inside
// x, q (or w) and scale, every write inside y's rows of N (built and run by tests/test_int8_gemv.py). Each buffer is
// its own exact-size heap block, so one element past it is caught.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cpu_isa.h"
#include "../../csrc/int8_gemv.h"

int main() {
  const int shapes[][3] = {{1, 1, 1}, {1, 5, 17}, {3, 4, 16}, {4, 9, 31}, {5, 13, 64}, {13, 7, 100}, {16, 33, 257},
                           {2, 130, 15}, {16, 1, 4096}, {3, 6, 2100}, {1, 70, 768}};
  unsigned seed = 7;
  auto rnd = [&seed]() { return (seed = seed * 1103515245u + 12345u) >> 8; };
  for (auto& s : shapes) {
    const int m = s[0], n = s[1], k = s[2];
    for (int pad : {0, 3}) {
      const int ldx = k + pad, ldy = n + pad;
      std::vector<float> x(static_cast<size_t>(m - 1) * ldx + k), scale(n);
      std::vector<int8_t> q(static_cast<size_t>(n) * k);
      for (auto& v : x) v = static_cast<float>(static_cast<int>(rnd() % 17) - 8);
      for (auto& v : q) v = static_cast<int8_t>(static_cast<int>(rnd() % 255) - 127);
      for (auto& v : scale) v = std::ldexp(1.0f, static_cast<int>(rnd() % 9) - 6);
      // the same integers as bf16 bits (|q| <= 127: exact), for bf16_gemv, in their own exact-size block
      std::vector<uint16_t> wb(q.size());
      for (size_t i = 0; i < q.size(); ++i) {
        const float f = q[i];
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        wb[i] = static_cast<uint16_t>(u >> 16);
      }
      for (const char* isa : {"avx512", "avx2", "generic"}) for (long prefetch : {-1L, 0L, 64L, 1L << 20}) {
        pllava::set_isa_cap(isa);
        const int generic = std::strcmp(isa, "generic") == 0;  // (the flag, not the cap, for the portable loop)
        if (generic) pllava::set_isa_cap("best");
        for (int kind = 0; kind < 2; ++kind) {  // int8 with its scales; bf16 at alpha 0.5, added onto y = 1
          std::vector<float> y(static_cast<size_t>(m - 1) * ldy + n, kind ? 1.0f : NAN);
          if (kind)
            pllava::bf16_gemv(x.data(), ldx, wb.data(), 0.5f, true, y.data(), ldy, m, n, k, 2, generic != 0, prefetch);
          else
            pllava::int8_gemv(x.data(), ldx, q.data(), scale.data(), y.data(), ldy, m, n, k, 2, generic != 0,
                              prefetch);
          for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
              long long acc = 0;  // integers: fp32 holds every partial sum exactly (|sum| < 2^24)
              for (int t = 0; t < k; ++t) acc += static_cast<long long>(x[i * ldx + t]) * q[j * k + t];
              const float want = kind ? 1.0f + static_cast<float>(acc) * 0.5f : static_cast<float>(acc) * scale[j];
              if (y[i * ldy + j] != want) {
                std::printf("mismatch %s m=%d n=%d k=%d pad=%d isa=%s prefetch=%ld at (%d, %d)\n",
                            kind ? "bf16" : "int8", m, n, k, pad, generic ? "generic" : pllava::isa_name(pllava::cpu_isa()),
                            prefetch, i, j);
                return 1;
              }
            }
        }
      }
    }
  }
  // int4_gemv: K a multiple of 32 (its groups), the same awkward M, N, strides and prefetches; integer x, nibbles
  // and power-of-two group scales in [1/8, 1], so fp32 holds every partial sum exactly and each path must give the
  // integer answer (|sum| <= 2^18 at K = 4096, in steps of 1/8)
  const int shapes4[][3] = {{1, 1, 32}, {1, 5, 64}, {3, 4, 96}, {4, 9, 32}, {13, 7, 160}, {16, 33, 256},
                            {2, 130, 32}, {16, 1, 4096}, {1, 70, 768}};
  for (auto& s : shapes4) {
    const int m = s[0], n = s[1], k = s[2], groups = k / 32;
    for (int pad : {0, 3}) {
      const int ldx = k + pad, ldy = n + pad;
      std::vector<float> x(static_cast<size_t>(m - 1) * ldx + k);
      std::vector<uint8_t> q(static_cast<size_t>(n) * k / 2);
      std::vector<uint16_t> gs(static_cast<size_t>(n) * groups);
      for (auto& v : x) v = static_cast<float>(static_cast<int>(rnd() % 17) - 8);
      for (auto& v : q) v = static_cast<uint8_t>(rnd() % 256);
      for (auto& v : gs) v = static_cast<uint16_t>((127 - static_cast<int>(rnd() % 4)) << 7);  // 2^0 .. 2^-3
      for (const char* isa : {"avx512", "avx2", "generic"}) for (long prefetch : {-1L, 0L, 64L, 1L << 20}) {
        const int generic = std::strcmp(isa, "generic") == 0;
        pllava::set_isa_cap(generic ? "best" : isa);
        std::vector<float> y(static_cast<size_t>(m - 1) * ldy + n, NAN);
        pllava::int4_gemv(x.data(), ldx, q.data(), gs.data(), y.data(), ldy, m, n, k, 2, generic != 0, prefetch);
        for (int i = 0; i < m; ++i)
          for (int j = 0; j < n; ++j) {
            double want = 0;
            for (int t = 0; t < k; ++t) {
              const int g = t / 32, l = t % 32;
              const uint8_t b = q[static_cast<size_t>(j) * k / 2 + g * 16 + l % 16];
              const int v = (l < 16 ? (b & 15) : (b >> 4)) - 8;
              const double sc = std::ldexp(1.0, (gs[static_cast<size_t>(j) * groups + g] >> 7) - 127);
              want += x[static_cast<size_t>(i) * ldx + t] * v * sc;
            }
            if (y[static_cast<size_t>(i) * ldy + j] != static_cast<float>(want)) {
              std::printf("mismatch int4 m=%d n=%d k=%d pad=%d isa=%s prefetch=%ld at (%d, %d)\n", m, n, k, pad,
                          generic ? "generic" : pllava::isa_name(pllava::cpu_isa()), prefetch, i, j);
              return 1;
            }
          }
      }
    }
  }
  pllava::set_isa_cap("best");
  std::printf("asan int8 gemv: ok (%s)\n", pllava::isa_name(pllava::cpu_isa()));
  return 0;
}
