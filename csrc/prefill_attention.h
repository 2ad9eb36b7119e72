// bf16 attention of whole prompts (a prefill from position 0, causal) and of CLIP's frames (bidirectional) on CPUs
// with AVX512-BF16 (see prefill_attention.cpp).
#pragma once
#include <cstdint>

namespace pllava {

struct AttnArgs {
  const uint16_t* q;  // bf16 bits (B, H, L, D) by element strides (q_sb, q_sh, q_sl), D contiguous
  const uint16_t* k;  // (B, KV, Lk, D) likewise
  const uint16_t* v;  // (B, KV, Lk, D) likewise
  uint16_t* o;        // (B, H, L, D) likewise: written
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  int64_t B, H, KV, L, Lk, D;
  bool causal;  // query i attends keys <= i + (Lk - L) (L == Lk: a prompt from position 0)
  float scale;
};

// Whether this build and this CPU run prefill_attention_bf16 (AVX512-BF16, and the ISA cap at avx512).
bool prefill_attention_available();
// D supported: a multiple of 16 up to 256 whose vectors divide 16 (16, 32, 64, 128, 256).
bool prefill_attention_supports(int64_t D);

// o[b, h, i] = softmax_s(scale * q[b, h, i] . k[b, h / g, s]) . v[b, h / g, s] (g = H / KV), the dot products of
// bf16 pairs summed in fp32, the softmax in fp32, its weights rounded to bf16 for the sum over V (as flash
// attention does), o rounded to bf16. Threads split (b, h, 16-row query block); every output row is computed by one
// thread in one fixed order, so the result does not depend on the thread count or on the other rows of the batch.
void prefill_attention_bf16(const AttnArgs& a, int num_threads);

}  // namespace pllava
