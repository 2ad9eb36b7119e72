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

// w8a8's rows with their outliers apart. An outlier is a value with threshold < |x| <= inf (an inf is one, a NaN is
// not). row_absmax_split: amax[m] = max |x| over row m's other values (as row_absmax: NaN wins), cnt[m] = its
// outliers. int8_quantize_rows_split: int8_quantize_rows' q with every outlier's q = 0, and row m's outliers, in
// order, at [off[m], off[m + 1]) of idx (their column) and val (their value in fp32); off: (M + 1,), off[m + 1] -
// off[m] = cnt[m] (the caller's prefix sum). threshold: finite, >= 0.
void row_absmax_split(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t ldx, float threshold, float* amax,
                      int64_t* cnt, int num_threads, bool generic = false);
void int8_quantize_rows_split(const void* x, bool x_bf16, int64_t M, int64_t K, int64_t ldx, float threshold,
                              const float* scale, int8_t* q, const int64_t* off, int64_t* idx, float* val,
                              int num_threads, bool generic = false);

// out[m, n] = (fp32(acc[m, n]) * row_scale[m]) * col_scale[n], rounded to fp32 or (out_bf16) to bf16 bits, nearest
// even, a NaN kept a NaN: an int8 x int8 product (int32, exact) back in the model's dtype (quantize="w8a8"). acc rows
// of N with row stride lda, out rows with row stride ldo (elements).
void int32_dequant_rows(const int32_t* acc, int64_t M, int64_t N, int64_t lda, const float* row_scale,
                        const float* col_scale, void* out, bool out_bf16, int64_t ldo, int num_threads,
                        bool generic = false);

// int4 weights (quantize="int4", int4_gemv's layout: q (N, K / 2) bytes, scale bf16 bits (N, K / 32), K % 32 == 0)
// widened: out[n, k] = fl32((q - 8) * s) in fp32, or that rounded to bf16 bits (out_bf16, nearest even), rows of K
// with row stride ldo (elements): the weight of a prefill's GEMM.
void int4_dequant(const uint8_t* q, const uint16_t* scale, int64_t N, int64_t K, void* out, bool out_bf16, int64_t ldo,
                  int num_threads, bool generic = false);

// int4 groups (quantize="int4"), G groups of 32 consecutive weights (group g at w + g * ldw, fp32 or bf16 bits):
// each one's scale, chosen by least squares among kInt4Divisors (int8_quantize.cpp): for each divisor t,
// s_t = bf16(+-max(amax / t, 1e-12)) with the sign that maps the group's weight of largest magnitude (the positive
// one of a tie) below zero, q_t = clamp(round_half_even(w / s_t), -8, 7) in IEEE fp32 divisions, a_t = sum w q_t and
// b_t = sum q_t^2 (both exact in fp64), score_t = a_t^2 / b_t in fp64; the first t of greatest score wins, and
// scale[g] = bf16(fp32(a_t / b_t)) (bits; nearest even twice). A group whose every q_t is 0 keeps s_8; one holding
// inf or NaN gets a non-finite scale. Then q = clamp(round_half_even(w / scale[g]), -8, 7), packed into
// packed[16 g + j] = (q[j] + 8) | (q[16 + j] + 8) << 4 (model/int4.py's layout); a group whose scale is not finite
// and nonzero gets zero bytes (the caller's torch formula owns those).
void int4_quantize_groups(const void* w, bool w_bf16, int64_t G, int64_t ldw, uint16_t* scale, uint8_t* packed,
                          int num_threads, bool generic = false);

}  // namespace pllava
