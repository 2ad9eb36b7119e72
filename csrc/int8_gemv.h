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

}  // namespace pllava
