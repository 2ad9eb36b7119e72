"""int4 weights for the LLM's linears (`Engine.from_pretrained(..., quantize="int4")`, on the CPU and on CUDA).

Format: groups of GROUP = 32 weights along K, llama.cpp's Q4_0 rule: m = the group's weight of largest magnitude,
s = -m / 8 rounded to bf16 (negative where m > 0), q = round_half_even(w / s) in [-8, 7], so that m is q = -8 and
all 16 levels are in use (a step of max|w| / 8; the earlier max|w| / 7 with q in [-7, 7] left -8 unused: 23 % fewer
top-1 disagreements at prompt positions, 13 % at decode ones, benchmarks/bench_quality.py 2048), w ≈ fl32(q · s).
Stored as (N, K / 2) bytes, a row's group g in bytes 16g .. 16g + 15, byte j holding q + 8 of weight 32g + j in its
low nibble and of 32g + 16 + j in its high one (so the kernels widen 16 contiguous weights from one 16-byte load),
and the scales as bf16 (N, K / 32): 0.5625 bytes a weight, against int8's ~1.

Why: memory first. pllava-7b's weights take 4.8 GB in bf16 + int4 against 7.6 in bf16 + int8, pllava-13b 8.4
against 14.0, pllava-34b 21.4 against 36.0 (loading.weight_bytes). Speed second: a decode step streams every
weight once, and int8's GEMV runs at the memory's bandwidth (42-62 GB/s on 2 Zen 5 cores of a noisy VM), while
pllava._C's int4 GEMV (csrc/int8_gemv.cpp) is bound by its instructions (~103 G weights/s in L2, where int8's tile
makes ~110): 2 of 7B's layers 1.27x to 1.73x int8's speed (benchmarks/bench_int8_gemv.py; the less bandwidth, the
more int4 gains), pllava-7b's decode 1.10x to 1.54x. What it costs in agreement is the most of any mode (README,
"quality").

The weights are quantized by quant.quantize_weight_int4 (quant.quantize_weight's formula and native passes over
the groups as rows, signed with 8 levels), then packed here (pack_int4). Decode rows (M <= 16) go through that GEMV with
fp32 activations and an fp32 accumulator; a prefill's rows through the weight dequantized into a reused buffer
(pllava._C's int4_dequant) and a GEMM in the engine's dtype. On CUDA (the Triton path, quant._int4_triton) the
same format runs through pllava.kernels.int4_linear: its fused kernel for up to FUSED_MAX_M (64) rows, its Triton
dequantization and the unquantized engine's GEMM for a longer prefill.
"""
from __future__ import annotations

import torch

from pllava.kernels.int4_linear import GROUP  # weights a scale: the format's one definition, with its CUDA kernels
from pllava.kernels.int4_linear import int4_unpack_reference as unpack_int4  # (N, K / 2) -> (N, K) int8, torch ops

from ..ops import log_once, native_extension


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, G, 32) int8 in [-8, 7] -> (N, G * 16) uint8: byte j of a group = (q[j] + 8) | (q[16 + j] + 8) << 4."""
    u = (q + 8).view(torch.uint8)  # in [0, 15]: no widening (an int16 round trip took 3x as long: 113-152 ms
    # against 24-60 for 7B's MLP weight)
    return torch.bitwise_or(u[..., :16], u[..., 16:] << 4).reshape(q.shape[0], -1)


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """The weight fl32(q · s) (N, K) in `dtype` (rounded once from fp32), into `out` (contiguous) when given: by
    pllava._C's int4_dequant for fp32 / bf16 on the CPU (one pass: 7B's (11008, 4096) MLP weight in ~8 ms on 2 Zen 5
    cores, where these torch ops make five full-size temporaries), else torch ops."""
    n, k = q.shape[0], q.shape[1] * 2
    C = native_extension("int4_dequant")
    if (C is not None and q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and q.is_contiguous()
            and s.is_contiguous() and s.dtype == torch.bfloat16 and not torch.compiler.is_compiling()):
        y = torch.empty(n, k, dtype=dtype) if out is None else out
        C.int4_dequant(q.data_ptr(), s.data_ptr(), n, k, y.data_ptr(), dtype == torch.bfloat16, k,
                       torch.get_num_threads())
        return y
    w = (unpack_int4(q).float().reshape(n, -1, GROUP) * s.float()[..., None]).reshape(n, k).to(dtype)
    return w if out is None else out.copy_(w)


def gemv_int4(C, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp32 contiguous · (q · s)ᵀ -> (M, N) fp32 by pllava._C's int4 GEMV (q, s contiguous)."""
    (m, k), n = x.shape, q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    C.int4_gemv(x.data_ptr(), k, q.data_ptr(), s.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
    return y
