// CLIP preprocessing of uint8 RGB frames, pixel-exact with PIL's bicubic resize (what transformers'
// CLIPImageProcessor runs): resize the shortest edge, center crop, rescale, normalize -> planar (T, 3, S, S).
//
// PIL's ImagingResample (libImaging/Resample.c) is reproduced step for step: double-precision filter weights
// normalised per output pixel, then converted to 22-bit fixed point with round-half-away; a horizontal pass into
// uint8, then a vertical pass into uint8, each accumulating in int32 from a 2^21 rounding bias. Only the output
// pixels that survive the center crop are computed (crop columns in the horizontal pass, crop rows - and the
// input rows they read - in the vertical pass); every computed pixel equals PIL's, so the crop is exact.
#include "preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pllava {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;  // PIL: PRECISION_BITS

double bicubic(double x) {  // PIL's bicubic_filter, a = -0.5, support 2
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline uint8_t clip8(int v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // (xmin, xmax-count) per output pixel
  std::vector<int> kk;      // ksize fixed-point weights per output pixel
};

// precompute_coeffs + normalize_coeffs_8bpc for output pixels [out0, out0 + n) of an in_size -> out_size resize.
Coeffs coeffs(int in_size, int out_size, int out0, int n) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * n);
  c.kk.assign(static_cast<size_t>(n) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int i = 0; i < n; ++i) {
    const int xx = out0 + i;
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      c.kk[static_cast<size_t>(i) * c.ksize + x] =
          w < 0 ? static_cast<int>(-0.5 + w * (1 << kPrecisionBits)) : static_cast<int>(0.5 + w * (1 << kPrecisionBits));
    }
    c.bounds[2 * i] = xmin;
    c.bounds[2 * i + 1] = xmax;
  }
  return c;
}

inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t to_fp16(float f) {  // IEEE binary16, round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (x < 0x38800000u) {  // subnormal or zero in half
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);
    const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(x >> 23);  // 14..24
    uint32_t h = mant >> (shift);
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((x - 0x38000000u) >> 13);
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

}  // namespace

void resize_params(const Params& p, int h, int w, int* nh, int* nw) {
  if (!p.do_resize) {
    *nh = h;
    *nw = w;
    return;
  }
  // transformers' get_resize_output_image_size(default_to_square=False): short -> size, long -> int(size*long/short)
  const int s = p.shortest_edge;
  if (h <= w) {
    *nh = s;
    *nw = static_cast<int>(static_cast<double>(s) * w / h);
  } else {
    *nw = s;
    *nh = static_cast<int>(static_cast<double>(s) * h / w);
  }
}

void preprocess(const Frames& in, const Params& p, void* out, OutDtype dtype, int num_threads) {
  if (in.t <= 0 || in.h <= 0 || in.w <= 0) throw std::invalid_argument("frames: zero-size frames");
  int nh, nw;
  resize_params(p, in.h, in.w, &nh, &nw);
  const int ch = p.crop_h, cw = p.crop_w;
  if (ch > nh || cw > nw) throw std::invalid_argument("frames: image smaller than the crop after resize");
  // transformers' center_crop: top = (h - crop_h) // 2, left = (w - crop_w) // 2
  const int top = (nh - ch) / 2, left = (nw - cw) / 2;
  const bool need_h = nw != in.w, need_v = nh != in.h;
  const Coeffs hc = need_h ? coeffs(in.w, nw, left, cw) : Coeffs{};
  const Coeffs vc = need_v ? coeffs(in.h, nh, top, ch) : Coeffs{};
  // input rows the vertical pass reads (PIL's ybox_first / ybox_last)
  int y0 = top, y1 = top + ch;
  if (need_v) {
    y0 = vc.bounds[0];
    y1 = vc.bounds[2 * (ch - 1)] + vc.bounds[2 * (ch - 1) + 1];
    for (int i = 0; i < ch; ++i) {
      y0 = std::min(y0, vc.bounds[2 * i]);
      y1 = std::max(y1, vc.bounds[2 * i] + vc.bounds[2 * i + 1]);
    }
  }
  const int rows = y1 - y0;
  float mul[3], add[3];
  for (int c = 0; c < 3; ++c) {  // out = (v * rescale - mean) / std
    const double sc = p.do_rescale ? p.rescale : 1.0;
    const double m = p.do_normalize ? p.mean[c] : 0.0, s = p.do_normalize ? p.std[c] : 1.0;
    mul[c] = static_cast<float>(sc / s);
    add[c] = static_cast<float>(-m / s);
  }
  const size_t plane = static_cast<size_t>(ch) * cw;
  const size_t padded = static_cast<size_t>(in.w) + (need_h ? hc.ksize : 0);
  const int n3 = cw * 3;

  // Horizontal pass for input row y0 + r of frame `base` into tmp row r (or a plain copy of the crop columns).
  // The row is first split into three int32 planes (any strides), zero-padded by ksize, so every output pixel is
  // a fixed-length dot product over contiguous memory (taps past a pixel's own count have weight 0): the compiler
  // vectorises it, and integer sums are exact in any order, so the result stays PIL's.
  // (Everything a pass reads is copied into locals first: stores through uint8_t* may alias anything else, and
  // reloading loop bounds through the closure after each store stopped the compiler from vectorising.)
  auto horizontal = [&](const uint8_t* base, int r, uint8_t* tmp, int* pl0, int* pl1, int* pl2) {
    const int64_t sh = in.sh, sw = in.sw, sc = in.sc;
    const int w = static_cast<int>(in.w), ncol = cw, x0 = left, ks = hc.ksize, row0 = y0, stride = n3;
    const int* bounds = hc.bounds.data();
    const int* kk = hc.kk.data();
    const uint8_t* row = base + (row0 + r) * sh;
    uint8_t* dst = tmp + static_cast<size_t>(r) * stride;
    if (!need_h) {
      for (int i = 0; i < ncol; ++i)
        for (int c = 0; c < 3; ++c) dst[i * 3 + c] = row[(x0 + i) * sw + c * sc];
      return;
    }
    for (int x = 0; x < w; ++x) {
      const uint8_t* q = row + x * sw;
      pl0[x] = q[0];
      pl1[x] = q[sc];
      pl2[x] = q[2 * sc];
    }
    for (int i = 0; i < ncol; ++i) {
      const int xmin = bounds[2 * i];
      const int* k = kk + static_cast<size_t>(i) * ks;
      const int *a0 = pl0 + xmin, *a1 = pl1 + xmin, *a2 = pl2 + xmin;
      int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
      for (int x = 0; x < ks; ++x) {
        s0 += a0[x] * k[x];
        s1 += a1[x] * k[x];
        s2 += a2[x] * k[x];
      }
      dst[i * 3 + 0] = clip8(s0);
      dst[i * 3 + 1] = clip8(s1);
      dst[i * 3 + 2] = clip8(s2);
    }
  };

  // Vertical pass for output row j of frame t: whole rows at a time (a contiguous inner loop the compiler
  // vectorises), then rescale + normalize into the planar output.
  auto vertical = [&](int64_t t, int j, const uint8_t* tmp, int* acc) {
    const int m = n3, ncol = cw, row0 = y0;
    const size_t pl = plane;
    const float mul0 = mul[0], mul1 = mul[1], mul2 = mul[2], add0 = add[0], add1 = add[1], add2 = add[2];
    if (!need_v) {
      const uint8_t* src = tmp + static_cast<size_t>(top + j - row0) * m;
      for (int q = 0; q < m; ++q) acc[q] = src[q];
    } else {
      const int ymin = vc.bounds[2 * j] - row0, yn = vc.bounds[2 * j + 1];
      const int* k = vc.kk.data() + static_cast<size_t>(j) * vc.ksize;
      for (int q = 0; q < m; ++q) acc[q] = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < yn; ++y) {
        const uint8_t* src = tmp + static_cast<size_t>(ymin + y) * m;
        const int ky = k[y];
        for (int q = 0; q < m; ++q) acc[q] += src[q] * ky;
      }
      for (int q = 0; q < m; ++q) acc[q] = clip8(acc[q]);
    }
    const float mc[3] = {mul0, mul1, mul2}, ac[3] = {add0, add1, add2};
    for (int c = 0; c < 3; ++c) {
      const size_t o = static_cast<size_t>(t) * 3 * pl + c * pl + static_cast<size_t>(j) * ncol;
      const float mu = mc[c], ad = ac[c];
      switch (dtype) {
        case OutDtype::kFloat32: {
          float* dst = static_cast<float*>(out) + o;
          for (int i = 0; i < ncol; ++i) dst[i] = static_cast<float>(acc[i * 3 + c]) * mu + ad;
          break;
        }
        case OutDtype::kFloat16: {
          uint16_t* dst = static_cast<uint16_t*>(out) + o;
          for (int i = 0; i < ncol; ++i) dst[i] = to_fp16(static_cast<float>(acc[i * 3 + c]) * mu + ad);
          break;
        }
        case OutDtype::kBFloat16: {
          uint16_t* dst = static_cast<uint16_t*>(out) + o;
          for (int i = 0; i < ncol; ++i) dst[i] = to_bf16(static_cast<float>(acc[i * 3 + c]) * mu + ad);
          break;
        }
      }
    }
  };

  int threads = 1;
#ifdef _OPENMP
  threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#endif
  if (in.t >= threads) {
    // enough frames: one frame per thread at a time, each with its own scratch rows
#pragma omp parallel num_threads(threads)
    {
      std::vector<uint8_t> tmp(static_cast<size_t>(rows) * n3);
      std::vector<int> acc(n3), pl0(padded, 0), pl1(padded, 0), pl2(padded, 0);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < in.t; ++t) {
        const uint8_t* base = in.data + t * in.st;
        for (int r = 0; r < rows; ++r) horizontal(base, r, tmp.data(), pl0.data(), pl1.data(), pl2.data());
        for (int j = 0; j < ch; ++j) vertical(t, j, tmp.data(), acc.data());
      }
    }
  } else {
    // fewer frames than threads (a single image): the threads share each frame's rows
    std::vector<uint8_t> tmp(static_cast<size_t>(rows) * n3);
    for (int64_t t = 0; t < in.t; ++t) {
      const uint8_t* base = in.data + t * in.st;
#pragma omp parallel num_threads(threads)
      {
        std::vector<int> pl0(padded, 0), pl1(padded, 0), pl2(padded, 0);
#pragma omp for schedule(static)
        for (int r = 0; r < rows; ++r) horizontal(base, r, tmp.data(), pl0.data(), pl1.data(), pl2.data());
      }
#pragma omp parallel num_threads(threads)
      {
        std::vector<int> acc(n3);
#pragma omp for schedule(static)
        for (int j = 0; j < ch; ++j) vertical(t, j, tmp.data(), acc.data());
      }
    }
  }
}

}  // namespace pllava
