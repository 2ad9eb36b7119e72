// Per-row symmetric int8 quantization of a weight on the CPU (see int8_quantize.cpp).
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

}  // namespace pllava
