// pybind11 module pllava._C. The Python side (pllava.preprocess) validates arguments and passes raw pointers and
// strides; the work runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "decode_attention.h"
#include "int8_gemv.h"
#include "int8_quantize.h"
#include "prefill_attention.h"
#include "preprocess.h"

namespace py = pybind11;

static void preprocess_frames(uintptr_t data, std::vector<int64_t> shape, std::vector<int64_t> strides, py::dict cfg,
                              uintptr_t out, int dtype, int num_threads) {
  if (shape.size() != 4 || strides.size() != 4 || shape[3] != 3)
    throw std::invalid_argument("frames: shape must be (T, H, W, 3)");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype: expected 0 (fp32), 1 (fp16) or 2 (bf16)");
  pllava::Frames f{reinterpret_cast<const uint8_t*>(data), shape[0], shape[1], shape[2],
                   strides[0], strides[1], strides[2], strides[3]};
  pllava::Params p;
  p.do_resize = cfg["do_resize"].cast<bool>();
  p.shortest_edge = cfg["shortest_edge"].cast<int>();
  p.crop_h = cfg["crop_h"].cast<int>();
  p.crop_w = cfg["crop_w"].cast<int>();
  p.do_rescale = cfg["do_rescale"].cast<bool>();
  p.rescale = cfg["rescale"].cast<double>();
  p.do_normalize = cfg["do_normalize"].cast<bool>();
  auto mean = cfg["mean"].cast<std::vector<double>>();
  auto std_ = cfg["std"].cast<std::vector<double>>();
  if (mean.size() != 3 || std_.size() != 3) throw std::invalid_argument("mean/std: need 3 values");
  for (int c = 0; c < 3; ++c) {
    p.mean[c] = mean[c];
    p.std[c] = std_[c];
  }
  py::gil_scoped_release release;
  pllava::preprocess(f, p, reinterpret_cast<void*>(out), static_cast<pllava::OutDtype>(dtype), num_threads);
}

static py::tuple output_size(int h, int w, int shortest_edge) {
  pllava::Params p;
  p.shortest_edge = shortest_edge;
  int nh, nw;
  pllava::resize_params(p, h, w, &nh, &nw);
  return py::make_tuple(nh, nw);
}

static void int8_gemv(uintptr_t x, int64_t ldx, uintptr_t q, uintptr_t scale, uintptr_t y, int64_t ldy, int64_t m,
                      int64_t n, int64_t k, int num_threads, bool generic, int64_t prefetch) {
  if (m < 0 || n < 0 || k < 0 || ldx < k || ldy < n)
    throw std::invalid_argument("int8_gemv: need M, N, K >= 0, ldx >= K and ldy >= N");
  py::gil_scoped_release release;
  pllava::int8_gemv(reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const int8_t*>(q),
                    reinterpret_cast<const float*>(scale), reinterpret_cast<float*>(y), ldy, m, n, k, num_threads,
                    generic, prefetch);
}

static void int4_gemv(uintptr_t x, int64_t ldx, uintptr_t q, uintptr_t scale, uintptr_t y, int64_t ldy, int64_t m,
                      int64_t n, int64_t k, int num_threads, bool generic, int64_t prefetch) {
  if (m < 0 || n < 0 || k < 0 || k % 32 != 0 || ldx < k || ldy < n)
    throw std::invalid_argument("int4_gemv: need M, N, K >= 0, K % 32 == 0, ldx >= K and ldy >= N");
  py::gil_scoped_release release;
  pllava::int4_gemv(reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const uint8_t*>(q),
                    reinterpret_cast<const uint16_t*>(scale), reinterpret_cast<float*>(y), ldy, m, n, k, num_threads,
                    generic, prefetch);
}

static void int4_dequant(uintptr_t q, uintptr_t scale, int64_t n, int64_t k, uintptr_t out, bool out_bf16, int64_t ldo,
                         int num_threads, bool generic) {
  if (n < 0 || k < 0 || k % 32 != 0 || ldo < k)
    throw std::invalid_argument("int4_dequant: need N, K >= 0, K % 32 == 0 and ldo >= K");
  py::gil_scoped_release release;
  pllava::int4_dequant(reinterpret_cast<const uint8_t*>(q), reinterpret_cast<const uint16_t*>(scale), n, k,
                       reinterpret_cast<void*>(out), out_bf16, ldo, num_threads, generic);
}

static void bf16_gemv(uintptr_t x, int64_t ldx, uintptr_t w, float alpha, bool accumulate, uintptr_t y, int64_t ldy,
                      int64_t m, int64_t n, int64_t k, int num_threads, bool generic, int64_t prefetch) {
  if (m < 0 || n < 0 || k < 0 || ldx < k || ldy < n)
    throw std::invalid_argument("bf16_gemv: need M, N, K >= 0, ldx >= K and ldy >= N");
  py::gil_scoped_release release;
  pllava::bf16_gemv(reinterpret_cast<const float*>(x), ldx, reinterpret_cast<const uint16_t*>(w), alpha, accumulate,
                    reinterpret_cast<float*>(y), ldy, m, n, k, num_threads, generic, prefetch);
}

static void decode_attention(uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, uintptr_t v, int64_t kv_sb,
                             int64_t kv_sh, int64_t kv_ss, uintptr_t o, int64_t o_sb, int64_t o_sh, int64_t b,
                             int64_t h, int64_t kv, int64_t d, int64_t lo, int64_t hi, float scale, int num_threads,
                             bool generic, bool kv_bf16) {
  if (b < 0 || kv <= 0 || h % kv != 0 || d <= 0 || lo < 0 || hi <= lo)
    throw std::invalid_argument("decode_attention: need B >= 0, H a multiple of KV > 0, D > 0 and 0 <= lo < hi");
  py::gil_scoped_release release;
  const auto* qp = reinterpret_cast<const float*>(q);
  auto* op = reinterpret_cast<float*>(o);
  if (kv_bf16)
    pllava::decode_attention_bf16(qp, q_sb, q_sh, reinterpret_cast<const uint16_t*>(k),
                                  reinterpret_cast<const uint16_t*>(v), kv_sb, kv_sh, kv_ss, op, o_sb, o_sh, b, h, kv,
                                  d, lo, hi, scale, num_threads, generic);
  else
    pllava::decode_attention(qp, q_sb, q_sh, reinterpret_cast<const float*>(k), reinterpret_cast<const float*>(v),
                             kv_sb, kv_sh, kv_ss, op, o_sb, o_sh, b, h, kv, d, lo, hi, scale, num_threads, generic);
}

static void decode_attention_rows(uintptr_t q, int64_t q_sb, int64_t q_sh, uintptr_t k, uintptr_t v, bool kv_bf16,
                                  int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, uintptr_t o, int64_t o_sb, int64_t o_sh,
                                  int64_t h, int64_t kv, int64_t d, int64_t num_slots, int64_t slot_len,
                                  std::vector<int64_t> slot, std::vector<int64_t> lo, std::vector<int64_t> hi,
                                  float scale, int num_threads, bool generic) {
  const size_t b = slot.size();
  if (lo.size() != b || hi.size() != b || kv <= 0 || h % kv != 0 || d <= 0)
    throw std::invalid_argument("decode_attention_rows: slot, lo and hi need one entry a row; H a multiple of KV > 0");
  for (size_t i = 0; i < b; ++i)
    if (slot[i] < 0 || slot[i] >= num_slots || lo[i] < 0 || hi[i] <= lo[i] || hi[i] > slot_len)
      throw std::invalid_argument("decode_attention_rows: row " + std::to_string(i) + " wants slot " +
                                  std::to_string(slot[i]) + " positions [" + std::to_string(lo[i]) + ", " +
                                  std::to_string(hi[i]) + ") of " + std::to_string(num_slots) + " slots of " +
                                  std::to_string(slot_len));
  py::gil_scoped_release release;
  pllava::decode_attention_rows(reinterpret_cast<const float*>(q), q_sb, q_sh, reinterpret_cast<const void*>(k),
                                reinterpret_cast<const void*>(v), kv_bf16, kv_sb, kv_sh, kv_ss,
                                reinterpret_cast<float*>(o), o_sb, o_sh, static_cast<int64_t>(b), h, kv, d,
                                slot.data(), lo.data(), hi.data(), scale, num_threads, generic);
}

static void row_absmax(uintptr_t w, bool w_bf16, int64_t n, int64_t k, int64_t ldw, uintptr_t amax, int num_threads,
                       bool generic) {
  if (n < 0 || k < 1 || ldw < k) throw std::invalid_argument("row_absmax: need N >= 0, K >= 1 and ldw >= K");
  py::gil_scoped_release release;
  pllava::row_absmax(reinterpret_cast<const void*>(w), w_bf16, n, k, ldw, reinterpret_cast<float*>(amax),
                     num_threads, generic);
}

static void int8_quantize_rows(uintptr_t w, bool w_bf16, int64_t n, int64_t k, int64_t ldw, uintptr_t scale,
                               uintptr_t q, uintptr_t resid, int num_threads, bool generic) {
  if (n < 0 || k < 1 || ldw < k) throw std::invalid_argument("int8_quantize_rows: need N >= 0, K >= 1 and ldw >= K");
  py::gil_scoped_release release;
  pllava::int8_quantize_rows(reinterpret_cast<const void*>(w), w_bf16, n, k, ldw, reinterpret_cast<const float*>(scale),
                             reinterpret_cast<int8_t*>(q), reinterpret_cast<float*>(resid), num_threads, generic);
}

static void row_absmax_split(uintptr_t x, bool x_bf16, int64_t m, int64_t k, int64_t ldx, float threshold,
                             uintptr_t amax, uintptr_t cnt, int num_threads, bool generic) {
  if (m < 0 || k < 1 || ldx < k || !(threshold >= 0.0f) || std::isinf(threshold))
    throw std::invalid_argument("row_absmax_split: need M >= 0, K >= 1, ldx >= K and a finite threshold >= 0");
  py::gil_scoped_release release;
  pllava::row_absmax_split(reinterpret_cast<const void*>(x), x_bf16, m, k, ldx, threshold,
                           reinterpret_cast<float*>(amax), reinterpret_cast<int64_t*>(cnt), num_threads, generic);
}

static void int8_quantize_rows_split(uintptr_t x, bool x_bf16, int64_t m, int64_t k, int64_t ldx, float threshold,
                                     uintptr_t scale, uintptr_t q, uintptr_t off, uintptr_t idx, uintptr_t val,
                                     int num_threads, bool generic) {
  if (m < 0 || k < 1 || ldx < k || !(threshold >= 0.0f) || std::isinf(threshold))
    throw std::invalid_argument("int8_quantize_rows_split: need M >= 0, K >= 1, ldx >= K and a finite threshold >= 0");
  py::gil_scoped_release release;
  pllava::int8_quantize_rows_split(reinterpret_cast<const void*>(x), x_bf16, m, k, ldx, threshold,
                                   reinterpret_cast<const float*>(scale), reinterpret_cast<int8_t*>(q),
                                   reinterpret_cast<const int64_t*>(off), reinterpret_cast<int64_t*>(idx),
                                   reinterpret_cast<float*>(val), num_threads, generic);
}

static void int4_quantize_groups(uintptr_t w, bool w_bf16, int64_t g, int64_t ldw, uintptr_t scale, uintptr_t packed,
                                 int num_threads, bool generic) {
  if (g < 0 || ldw < 32) throw std::invalid_argument("int4_quantize_groups: need G >= 0 and ldw >= 32");
  py::gil_scoped_release release;
  pllava::int4_quantize_groups(reinterpret_cast<const void*>(w), w_bf16, g, ldw, reinterpret_cast<uint16_t*>(scale),
                               reinterpret_cast<uint8_t*>(packed), num_threads, generic);
}

static void int32_dequant_rows(uintptr_t acc, int64_t m, int64_t n, int64_t lda, uintptr_t row_scale,
                               uintptr_t col_scale, uintptr_t out, bool out_bf16, int64_t ldo, int num_threads,
                               bool generic) {
  if (m < 0 || n < 1 || lda < n || ldo < n)
    throw std::invalid_argument("int32_dequant_rows: need M >= 0, N >= 1, lda >= N and ldo >= N");
  py::gil_scoped_release release;
  pllava::int32_dequant_rows(reinterpret_cast<const int32_t*>(acc), m, n, lda,
                             reinterpret_cast<const float*>(row_scale), reinterpret_cast<const float*>(col_scale),
                             reinterpret_cast<void*>(out), out_bf16, ldo, num_threads, generic);
}

static void prefill_attention(uintptr_t q, std::vector<int64_t> qs, uintptr_t k, std::vector<int64_t> ks, uintptr_t v,
                              std::vector<int64_t> vs, uintptr_t o, std::vector<int64_t> os, int64_t b, int64_t h,
                              int64_t kv, int64_t l, int64_t lk, int64_t d, bool causal, float scale,
                              int num_threads) {
  if (!pllava::prefill_attention_available())
    throw std::runtime_error("prefill_attention: this build or CPU has no AVX512-BF16 path");
  if (qs.size() != 3 || ks.size() != 3 || vs.size() != 3 || os.size() != 3)
    throw std::invalid_argument("prefill_attention: strides are (batch, head, position) for q, k, v and o");
  if (b < 1 || h < 1 || kv < 1 || l < 1 || lk < 1 || h % kv != 0 || !pllava::prefill_attention_supports(d) ||
      (causal && lk < l))
    throw std::invalid_argument("prefill_attention: need B, H, KV, L, Lk >= 1, H % KV == 0, D in 16/32/64/128/256"
                                " and Lk >= L when causal; got B=" + std::to_string(b) + " H=" + std::to_string(h) +
                                " KV=" + std::to_string(kv) + " L=" + std::to_string(l) + " Lk=" + std::to_string(lk) +
                                " D=" + std::to_string(d));
  pllava::AttnArgs a{reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),
                     reinterpret_cast<const uint16_t*>(v), reinterpret_cast<uint16_t*>(o),
                     qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], os[0], os[1], os[2],
                     b, h, kv, l, lk, d, causal, scale};
  py::gil_scoped_release release;
  pllava::prefill_attention_bf16(a, num_threads);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pllava native preprocessing (PIL-exact bicubic resize + center crop + normalize), int8, int4 and bf16 GEMV, int4 dequantization, int8 weight quantization and w8a8's dequantization, bf16 prefill attention, decode attention over an fp32 or bf16 cache";
  m.def("preprocess", &preprocess_frames, py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("cfg"),
        py::arg("out"), py::arg("dtype"), py::arg("num_threads") = 0);
  m.def("output_size", &output_size);
  m.def("int8_gemv", &int8_gemv, py::arg("x"), py::arg("ldx"), py::arg("q"), py::arg("scale"), py::arg("y"),
        py::arg("ldy"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads") = 0,
        py::arg("generic") = false, py::arg("prefetch") = -1);
  m.def("cpu_isa", [] { return std::string(pllava::isa_name(pllava::cpu_isa())); },
        "The vector ISA the CPU kernels run with now: 'avx512', 'avx2' or 'generic'.");
  m.def("cpu_isa_supported", [] { return std::string(pllava::isa_name(pllava::cpu_isa_supported())); },
        "The best vector ISA this CPU supports, whatever the cap.");
  m.def("set_isa_cap", [](const std::string& name) {
          if (!pllava::set_isa_cap(name.c_str()))
            throw std::invalid_argument("set_isa_cap: '" + name + "' is not one of avx512, avx2, generic, best");
        }, py::arg("name"),
        "Cap the CPU kernels' vector ISA (tests and benchmarks run the AVX2 path on an AVX-512 CPU this way).");
  m.def("bf16_gemv", &bf16_gemv, py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("alpha"), py::arg("accumulate"),
        py::arg("y"), py::arg("ldy"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads") = 0,
        py::arg("generic") = false, py::arg("prefetch") = -1);
  m.def("int4_gemv", &int4_gemv, py::arg("x"), py::arg("ldx"), py::arg("q"), py::arg("scale"), py::arg("y"),
        py::arg("ldy"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads") = 0,
        py::arg("generic") = false, py::arg("prefetch") = -1);
  m.def("int4_dequant", &int4_dequant, py::arg("q"), py::arg("scale"), py::arg("n"), py::arg("k"), py::arg("out"),
        py::arg("out_bf16"), py::arg("ldo"), py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("gemv_prefetch_distance", &pllava::gemv_prefetch_distance);
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("k"),
        py::arg("v"), py::arg("kv_sb"), py::arg("kv_sh"), py::arg("kv_ss"), py::arg("o"), py::arg("o_sb"),
        py::arg("o_sh"), py::arg("b"), py::arg("h"), py::arg("kv"), py::arg("d"), py::arg("lo"), py::arg("hi"),
        py::arg("scale"), py::arg("num_threads") = 0, py::arg("generic") = false, py::arg("kv_bf16") = false);
  m.def("decode_attention_rows", &decode_attention_rows, py::arg("q"), py::arg("q_sb"), py::arg("q_sh"),
        py::arg("k"), py::arg("v"), py::arg("kv_bf16"), py::arg("kv_sb"), py::arg("kv_sh"), py::arg("kv_ss"),
        py::arg("o"), py::arg("o_sb"), py::arg("o_sh"), py::arg("h"), py::arg("kv"), py::arg("d"),
        py::arg("num_slots"), py::arg("slot_len"), py::arg("slot"), py::arg("lo"), py::arg("hi"), py::arg("scale"),
        py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("int4_quantize_groups", &int4_quantize_groups, py::arg("w"), py::arg("w_bf16"), py::arg("g"), py::arg("ldw"),
        py::arg("scale"), py::arg("packed"), py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("row_absmax", &row_absmax, py::arg("w"), py::arg("w_bf16"), py::arg("n"), py::arg("k"), py::arg("ldw"),
        py::arg("amax"), py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("int8_quantize_rows", &int8_quantize_rows, py::arg("w"), py::arg("w_bf16"), py::arg("n"), py::arg("k"),
        py::arg("ldw"), py::arg("scale"), py::arg("q"), py::arg("resid"), py::arg("num_threads") = 0,
        py::arg("generic") = false);
  m.def("row_absmax_split", &row_absmax_split, py::arg("x"), py::arg("x_bf16"), py::arg("m"), py::arg("k"),
        py::arg("ldx"), py::arg("threshold"), py::arg("amax"), py::arg("cnt"), py::arg("num_threads") = 0,
        py::arg("generic") = false);
  m.def("int8_quantize_rows_split", &int8_quantize_rows_split, py::arg("x"), py::arg("x_bf16"), py::arg("m"),
        py::arg("k"), py::arg("ldx"), py::arg("threshold"), py::arg("scale"), py::arg("q"), py::arg("off"),
        py::arg("idx"), py::arg("val"), py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("int32_dequant_rows", &int32_dequant_rows, py::arg("acc"), py::arg("m"), py::arg("n"), py::arg("lda"),
        py::arg("row_scale"), py::arg("col_scale"), py::arg("out"), py::arg("out_bf16"), py::arg("ldo"),
        py::arg("num_threads") = 0, py::arg("generic") = false);
  m.def("prefill_attention", &prefill_attention, py::arg("q"), py::arg("q_strides"), py::arg("k"),
        py::arg("k_strides"), py::arg("v"), py::arg("v_strides"), py::arg("o"), py::arg("o_strides"), py::arg("b"),
        py::arg("h"), py::arg("kv"), py::arg("l"), py::arg("lk"), py::arg("d"), py::arg("causal"), py::arg("scale"),
        py::arg("num_threads") = 0);
  m.def("prefill_attention_available", &pllava::prefill_attention_available,
        "Whether this build and CPU run prefill_attention (AVX512-BF16, the ISA cap at avx512).");
  m.attr("ABI") = 13;
}
