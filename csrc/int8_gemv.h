// Weight-only int8 (and bf16) GEMV with fp32 activations (see int8_gemv.cpp).
#pragma once
#include <cstdint>

namespace pllava {

// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] for m < M, n < N, accumulated and written in fp32.
// x: fp32 rows of K with row stride ldx (elements); q: int8 (N, K) contiguous; scale: fp32 (N,); y: fp32 rows of N
// with row stride ldy. Threads split N (num_threads <= 0: OpenMP's default). generic: the portable loop even where
// AVX-512 or AVX2 runs (tests compare them). prefetch: how many bytes of q ahead to prefetch (0: none; < 0: the default
// for the row's bytes, gemv_prefetch_distance).
void int8_gemv(const float* x, int64_t ldx, const int8_t* q, const float* scale, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int num_threads, bool generic = false, int64_t prefetch = -1);

// The default prefetch distance for weight rows of row_bytes: one 4-row tile ahead, at least 8 KB.
int64_t gemv_prefetch_distance(int64_t row_bytes);

// y[m, n] = alpha * sum_k x[m, k] * w[n, k] (+ y[m, n] where accumulate) for m < M, n < N, in fp32: w holds bf16
// bits (N, K) contiguous, widened exactly. Otherwise as int8_gemv (the LoRA factors of the CPU's decode rows).
void bf16_gemv(const float* x, int64_t ldx, const uint16_t* w, float alpha, bool accumulate, float* y, int64_t ldy,
               int64_t M, int64_t N, int64_t K, int num_threads, bool generic = false, int64_t prefetch = -1);

// int4 weights (quantize="int4"): y[m, n] = sum_k x[m, k] * fl32(q[n, k] * s[n, k / 32]), in fp32. q: (N, K / 2)
// bytes, contiguous, a row's group g of 32 weights in bytes 16g .. 16g + 15 (byte j: weight 32g + j in the low
// nibble, 32g + 16 + j in the high one, each as q + 8, q in [-8, 7]); scale: bf16 bits (N, K / 32) contiguous.
// K % 32 == 0. Otherwise as int8_gemv; the AVX-512 and AVX2 paths give the same bits.
void int4_gemv(const float* x, int64_t ldx, const uint8_t* q, const uint16_t* scale, float* y, int64_t ldy, int64_t M,
               int64_t N, int64_t K, int num_threads, bool generic = false, int64_t prefetch = -1);

}  // namespace pllava
