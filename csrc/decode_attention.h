// Decode attention over an fp32 or bf16 KV cache on the CPU (see decode_attention.cpp).
#pragma once
#include <cstdint>

namespace pllava {

// For each batch row b and query head h (one query a head: a decode step):
//   o[b, h] = softmax_s(scale * q[b, h] . k[b, h / g, s]) . v[b, h / g, s] over s in [lo, hi), g = H / KV,
// in fp32. q and o: (B, H, D) by element strides (sb, sh), D contiguous; k and v: (B, KV, S, D) sharing the
// strides (kv_sb, kv_sh, kv_ss), D contiguous. Positions outside [lo, hi) are never read. Requires 0 <= lo < hi,
// H % KV == 0. Threads split the (b, kv head) pairs. generic: the portable loops even where AVX-512 or AVX2 runs.
void decode_attention(const float* q, int64_t q_sb, int64_t q_sh, const float* k, const float* v, int64_t kv_sb,
                      int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh, int64_t B, int64_t H,
                      int64_t KV, int64_t D, int64_t lo, int64_t hi, float scale, int num_threads,
                      bool generic = false);

// The same over a bf16 cache (k, v: bf16 bits), widened exactly; q, o and every sum stay fp32.
void decode_attention_bf16(const float* q, int64_t q_sb, int64_t q_sh, const uint16_t* k, const uint16_t* v,
                           int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh,
                           int64_t B, int64_t H, int64_t KV, int64_t D, int64_t lo, int64_t hi, float scale,
                           int num_threads, bool generic = false);

// Rows in different cache slots, each over its own range (the batched scheduler's decode, one call a layer): row b
// of q attends [lo[b], hi[b]) of k / v's row slot[b] (kv_sb: a slot's stride). The caller checks the ranges.
void decode_attention_rows(const float* q, int64_t q_sb, int64_t q_sh, const void* k, const void* v, bool kv_bf16,
                           int64_t kv_sb, int64_t kv_sh, int64_t kv_ss, float* o, int64_t o_sb, int64_t o_sh,
                           int64_t B, int64_t H, int64_t KV, int64_t D, const int64_t* slot, const int64_t* lo,
                           const int64_t* hi, float scale, int num_threads, bool generic = false);

}  // namespace pllava
