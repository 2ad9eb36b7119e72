// Per-row symmetric int8 quantization of a weight (or of w8a8's activations) on the CPU, and the dequantization of
// an int8 product (see int8_quantize.cpp).
#pragma once
#include <cstdint>

namespace pllava {

// amax[n] = max_k |w[n, k]| for n < N, bit-exact; inf or NaN where a row holds one (NaN wins). w: fp32, or bf16
// bits (w_bf16), rows of K with row stride ldw (elements).
void row_absmax(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t ldw, float* amax, int num_threads,
                bool generic = false);

// q[n, k] = clamp(round_half_even(w[n, k] / scale[n]), -127, 127) as int8 (q contiguous (N, K)); with resid,
// resid[n, k] = fp32(fp64(w[n, k]) - fp64(q[n, k]) * fp64(scale[n])) (contiguous (N, K)). scale: fp32 (N,), every
// one finite and > 0 (the caller checks). The division is IEEE fp32 division, as torch's `w / scale[:, None]`.
void int8_quantize_rows(const void* w, bool w_bf16, int64_t N, int64_t K, int64_t ldw, const float* scale, int8_t* q,
                        float* resid, int num_threads, bool generic = false);

// out[m, n] = (fp32(acc[m, n]) * row_scale[m]) * col_scale[n], rounded to fp32 or (out_bf16) to bf16 bits, nearest
// even, a NaN kept a NaN: an int8 x int8 product (int32, exact) back in the model's dtype (quantize="w8a8"). acc rows
// of N with row stride lda, out rows with row stride ldo (elements).
void int32_dequant_rows(const int32_t* acc, int64_t M, int64_t N, int64_t lda, const float* row_scale,
                        const float* col_scale, void* out, bool out_bf16, int64_t ldo, int num_threads,
                        bool generic = false);

}  // namespace pllava
