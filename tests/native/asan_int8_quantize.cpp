// Runs the int8 weight quantizer under AddressSanitizer/UBSan on awkward shapes (K of 1 and off every vector width,
// padded row strides, one row to many; fp32 and bf16 weights, with and without the residual; each of the CPU's
// vector paths and the portable loop): every read must stay inside w's rows of K, every write inside q, resid and
// amax (built and run by tests/test_int8_quantize.py). Each buffer is its own exact-size heap block. The values are
// checked against a scalar reading of the contract in int8_quantize.h, so an ISA's loop that drifts is caught too.
// The split passes of w8a8 run on the same rows (values past 0.9 leave them), then its dequantization of int32
// products, int4's dequantization and its groups' quantization.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/cpu_isa.h"
#include "../../csrc/int8_quantize.h"
#include "bf16_bits.h"

// Runs body(isa, bf16, generic, src) on each vector path (capped to it) for w as fp32 and as bf16 bits (wb, filled
// here): the six ways a weight reaches the passes.
template <typename F>
int each_path(const std::vector<float>& w, std::vector<uint16_t>& wb, F body) {
  wb.resize(w.size());
  for (size_t i = 0; i < w.size(); ++i) wb[i] = to_bf16(w[i]);
  for (const char* isa : {"avx512", "avx2", "generic"}) for (int bf16 = 0; bf16 < 2; ++bf16) {
    const bool generic = std::strcmp(isa, "generic") == 0;
    pllava::set_isa_cap(generic ? "best" : isa);
    const void* src = bf16 ? static_cast<const void*>(wb.data()) : static_cast<const void*>(w.data());
    if (body(isa, bf16, generic, src) != 0) return 1;
  }
  return 0;
}

int main() {
  const int shapes[][2] = {{1, 1}, {3, 15}, {4, 17}, {5, 31}, {2, 64}, {7, 100}, {1, 4097}, {33, 9}};
  unsigned seed = 11;
  auto rnd = [&seed]() { return (seed = seed * 1103515245u + 12345u) >> 8; };
  for (auto& s : shapes) {
    const int n = s[0], k = s[1];
    for (int pad : {0, 5}) {
      const int ldw = k + pad;
      const size_t span = static_cast<size_t>(n - 1) * ldw + k;  // the last row ends at w's end
      std::vector<float> w(span);
      for (auto& v : w) v = (static_cast<float>(rnd() % 2001) - 1000.0f) * 1e-3f;
      std::vector<uint16_t> wb;
      if (each_path(w, wb, [&](const char* isa, int bf16, bool generic, const void* src) {
        auto at = [&](int r, int c) { return bf16 ? from_bf16(wb[static_cast<size_t>(r) * ldw + c]) : w[static_cast<size_t>(r) * ldw + c]; };
        std::vector<float> amax(n), scale(n), resid(static_cast<size_t>(n) * k);
        std::vector<int8_t> q(static_cast<size_t>(n) * k);
        pllava::row_absmax(src, bf16 != 0, n, k, ldw, amax.data(), 2, generic);
        for (int r = 0; r < n; ++r) {
          float m = 0.0f;
          for (int c = 0; c < k; ++c) m = std::fmax(m, std::fabs(at(r, c)));
          if (amax[r] != m) {
            std::printf("absmax mismatch isa=%s bf16=%d n=%d k=%d pad=%d row %d\n", isa, bf16, n, k, pad, r);
            return 1;
          }
          scale[r] = m > 0.0f ? m / 127.0f : 1e-12f;
        }
        for (int with_resid = 0; with_resid < 2; ++with_resid) {
          pllava::int8_quantize_rows(src, bf16 != 0, n, k, ldw, scale.data(), q.data(),
                                     with_resid ? resid.data() : nullptr, 2, generic);
          for (int r = 0; r < n; ++r)
            for (int c = 0; c < k; ++c) {
              const float want = std::fmin(std::fmax(std::nearbyint(at(r, c) / scale[r]), -127.0f), 127.0f);
              const size_t i = static_cast<size_t>(r) * k + c;
              const float res = static_cast<float>(static_cast<double>(at(r, c)) - static_cast<double>(want) * scale[r]);
              if (q[i] != want || (with_resid && resid[i] != res)) {
                std::printf("quantize mismatch isa=%s bf16=%d n=%d k=%d pad=%d at (%d, %d)\n", isa, bf16, n, k, pad, r, c);
                return 1;
              }
            }
        }
        // w8a8's split passes: values past 0.9 (~10 %) leave their rows, to [off, off + cnt)
        std::vector<float> samax(n), sscale(n);
        std::vector<int64_t> cnt(n), off(n + 1, 0);
        pllava::row_absmax_split(src, bf16 != 0, n, k, ldw, 0.9f, samax.data(), cnt.data(), 2, generic);
        for (int r = 0; r < n; ++r) {
          float mx = 0.0f;
          int64_t c = 0;
          for (int j = 0; j < k; ++j) {
            const float a = std::fabs(at(r, j));
            if (a > 0.9f) ++c; else mx = std::fmax(mx, a);
          }
          if (samax[r] != mx || cnt[r] != c) {
            std::printf("split absmax mismatch isa=%s bf16=%d n=%d k=%d pad=%d row %d\n", isa, bf16, n, k, pad, r);
            return 1;
          }
          sscale[r] = mx > 0.0f ? mx / 127.0f : 1e-12f;
          off[r + 1] = off[r] + c;
        }
        std::vector<int8_t> sq(static_cast<size_t>(n) * k);
        std::vector<int64_t> idx(off[n]);
        std::vector<float> val(off[n]);
        pllava::int8_quantize_rows_split(src, bf16 != 0, n, k, ldw, 0.9f, sscale.data(), sq.data(), off.data(),
                                         idx.data(), val.data(), 2, generic);
        for (int r = 0; r < n; ++r) {
          int64_t o = off[r];
          for (int j = 0; j < k; ++j) {
            const float v = at(r, j);
            const bool out = std::fabs(v) > 0.9f;
            const float want = out ? 0.0f : std::fmin(std::fmax(std::nearbyint(v / sscale[r]), -127.0f), 127.0f);
            bool ok = sq[static_cast<size_t>(r) * k + j] == want;
            if (out) ok = ok && idx[o] == j && val[o] == v, ++o;
            if (!ok) {
              std::printf("split quantize mismatch isa=%s bf16=%d n=%d k=%d pad=%d at (%d, %d)\n", isa, bf16, n, k, pad, r, j);
              return 1;
            }
          }
        }
        return 0;
      }) != 0)
        return 1;
    }
  }
  // int32_dequant_rows (w8a8): reads inside acc's rows of N (row stride lda), writes inside out's (row stride ldo),
  // each the exact span its last row ends at; values against the contract's scalar reading
  for (auto& s : shapes) {
    const int m = s[0], n = s[1];
    for (int pad : {0, 3}) {
      const int lda = n + pad, ldo = n + 2 * pad;
      std::vector<int32_t> acc(static_cast<size_t>(m - 1) * lda + n);
      for (auto& v : acc) v = static_cast<int32_t>(rnd() % 4000001) - 2000000;
      std::vector<float> rs(m), cs(n);
      for (auto& v : rs) v = static_cast<float>(rnd() % 1000 + 1) * 1e-6f;
      for (auto& v : cs) v = static_cast<float>(rnd() % 1000 + 1) * 1e-5f;
      for (const char* isa : {"avx512", "avx2", "generic"}) for (int bf16 = 0; bf16 < 2; ++bf16) {
        const bool generic = std::strcmp(isa, "generic") == 0;
        pllava::set_isa_cap(generic ? "best" : isa);
        const size_t span = static_cast<size_t>(m - 1) * ldo + n;
        std::vector<float> of(bf16 ? 0 : span);
        std::vector<uint16_t> ob(bf16 ? span : 0);
        void* out = bf16 ? static_cast<void*>(ob.data()) : static_cast<void*>(of.data());
        pllava::int32_dequant_rows(acc.data(), m, n, lda, rs.data(), cs.data(), out, bf16 != 0, ldo, 2, generic);
        for (int r = 0; r < m; ++r)
          for (int c = 0; c < n; ++c) {
            const float want = static_cast<float>(acc[static_cast<size_t>(r) * lda + c]) * rs[r] * cs[c];
            const size_t i = static_cast<size_t>(r) * ldo + c;
            if (bf16 ? ob[i] != to_bf16(want) : of[i] != want) {
              std::printf("dequant mismatch isa=%s bf16=%d m=%d n=%d pad=%d at (%d, %d)\n", isa, bf16, m, n, pad, r, c);
              return 1;
            }
          }
      }
    }
  }
  // int4_dequant: reads inside q (N, K / 2) and its scales (N, K / 32), writes inside out's rows of K (row stride
  // ldo); each value fl32((nibble - 8) * s), or that rounded to bf16
  for (int n : {1, 3, 17}) for (int k : {32, 96, 4096}) for (int pad : {0, 5}) {
    const int ldo = k + pad, groups = k / 32;
    std::vector<uint8_t> q(static_cast<size_t>(n) * k / 2);
    std::vector<uint16_t> gs(static_cast<size_t>(n) * groups);
    for (auto& v : q) v = static_cast<uint8_t>(rnd() % 256);
    for (auto& v : gs) v = static_cast<uint16_t>(0x3C00 + rnd() % 0x400);  // bf16 in [2^-7, 2)
    for (const char* isa : {"avx512", "avx2", "generic"}) for (int bf16 = 0; bf16 < 2; ++bf16) {
      const bool generic = std::strcmp(isa, "generic") == 0;
      pllava::set_isa_cap(generic ? "best" : isa);
      const size_t span = static_cast<size_t>(n - 1) * ldo + k;
      std::vector<float> of(bf16 ? 0 : span);
      std::vector<uint16_t> ob(bf16 ? span : 0);
      void* out = bf16 ? static_cast<void*>(ob.data()) : static_cast<void*>(of.data());
      pllava::int4_dequant(q.data(), gs.data(), n, k, out, bf16 != 0, ldo, 2, generic);
      for (int r = 0; r < n; ++r)
        for (int c = 0; c < k; ++c) {
          const uint8_t b = q[static_cast<size_t>(r) * k / 2 + (c / 32) * 16 + c % 16];
          const int v = (c % 32 < 16 ? (b & 15) : (b >> 4)) - 8;
          uint32_t u = static_cast<uint32_t>(gs[static_cast<size_t>(r) * groups + c / 32]) << 16;
          float sc;
          std::memcpy(&sc, &u, sizeof sc);
          const float want = static_cast<float>(v) * sc;
          const size_t i = static_cast<size_t>(r) * ldo + c;
          if (bf16 ? ob[i] != to_bf16(want) : of[i] != want) {
            std::printf("int4 dequant mismatch isa=%s bf16=%d n=%d k=%d pad=%d at (%d, %d)\n", isa, bf16, n, k, pad,
                        r, c);
            return 1;
          }
        }
    }
  }
  // int4_quantize_groups: G groups of 32 at row stride ldw (blocks of 8 groups with tails: G off every multiple of
  // 8), reads inside the groups, writes inside scale (G,) and packed (G, 16); each scale and byte against a scalar
  // reading of int8_quantize.h's rule (with all-zero, tiny and tied groups among them)
  for (int g : {1, 7, 9, 33}) for (int pad : {0, 5}) {
    const int ldw = 32 + pad;
    const size_t span = static_cast<size_t>(g - 1) * ldw + 32;
    std::vector<float> w(span);
    for (auto& v : w) v = (static_cast<float>(rnd() % 2001) - 1000.0f) * 1e-3f;
    for (int c = 0; c < 32 && g > 1; ++c) w[static_cast<size_t>(ldw) + c] = 0.0f;         // group 1: zeros
    if (g > 2) for (int c = 0; c < 32; ++c) w[2 * static_cast<size_t>(ldw) + c] *= 1e-13f;  // group 2: tiny
    if (g > 3) w[3 * static_cast<size_t>(ldw)] = 2.0f, w[3 * static_cast<size_t>(ldw) + 1] = -2.0f;  // a tie
    std::vector<uint16_t> wb;
    if (each_path(w, wb, [&](const char* isa, int bf16, bool generic, const void* src) {
      std::vector<uint16_t> sc(g);
      std::vector<uint8_t> packed(static_cast<size_t>(g) * 16);
      pllava::int4_quantize_groups(src, bf16 != 0, g, ldw, sc.data(), packed.data(), 2, generic);
      for (int r = 0; r < g; ++r) {
        float x[32], amax = 0.0f, top = -1.0f;
        for (int c = 0; c < 32; ++c) {
          const size_t i = static_cast<size_t>(r) * ldw + c;
          x[c] = bf16 ? from_bf16(wb[i]) : w[i];
          amax = std::fmax(amax, std::fabs(x[c]));
          top = std::fmax(top, x[c]);
        }
        const float sign = top >= amax ? -1.0f : 1.0f;
        double best = -1.0, fit = 0.0;
        for (float t : {8.0f, 7.0f, 8.5f, 9.0f}) {
          const float s = from_bf16(to_bf16(sign * std::fmax(amax / t, 1e-12f)));
          double a = 0.0, b = 0.0;
          for (int c = 0; c < 32; ++c) {
            const float q = std::fmin(std::fmax(std::nearbyint(x[c] / s), -8.0f), 7.0f);
            a += static_cast<double>(x[c]) * q;
            b += static_cast<double>(q) * q;
          }
          if (b > 0.0 && a * a / b > best) best = a * a / b, fit = a / b;
        }
        const uint16_t want = best > 0.0 ? to_bf16(static_cast<float>(fit))
                                         : to_bf16(sign * std::fmax(amax / 8.0f, 1e-12f));
        bool ok = sc[r] == want;
        for (int j = 0; j < 16 && ok; ++j) {
          const float s = from_bf16(want);
          const int lo = static_cast<int>(std::fmin(std::fmax(std::nearbyint(x[j] / s), -8.0f), 7.0f)) + 8;
          const int hi = static_cast<int>(std::fmin(std::fmax(std::nearbyint(x[16 + j] / s), -8.0f), 7.0f)) + 8;
          ok = packed[static_cast<size_t>(r) * 16 + j] == (lo | (hi << 4));
        }
        if (!ok) {
          std::printf("int4 group mismatch isa=%s bf16=%d g=%d pad=%d group %d\n", isa, bf16, g, pad, r);
          return 1;
        }
      }
      return 0;
    }) != 0)
      return 1;
  }
  pllava::set_isa_cap("best");
  std::printf("asan int8 quantize: ok\n");
  return 0;
}
