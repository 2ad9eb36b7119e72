"""int4 weights for the LLM's linears (`Engine.from_pretrained(..., quantize="int4")`, on the CPU and on CUDA).

Format: groups of GROUP = 32 weights along K, one bf16 scale s a group, q = round_half_even(w / s) in [-8, 7],
w ≈ fl32(q · s). The scale (quantize_weight_int4): llama.cpp's Q4_0 step, -m / 8 for the group's weight of largest
magnitude m (so m is q = -8 and all 16 levels are in use), is one of 4 candidates -m / t, t in DIVISORS (a step 12.5 %
coarser, or finer with m clipped to -8); each candidate's q gets its least-squares scale sum(w q) / sum(q^2), and the
candidate whose fit leaves the least squared error wins (its fitted scale, rounded to bf16, then q fitted again to
that rounding), as llama.cpp's k-quants search theirs. On Gaussian groups 0.895x Q4_0's squared error, 0.924x with
Student-t(4) tails (tests/test_int4.py holds it under 0.90x and 0.93x).
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

The weights are quantized here (quantize_weight_int4: one pass of pllava._C on the CPU, scales, q and packing; the
same bits as the torch formula that runs elsewhere). Decode rows (M <= 16) go through that GEMV with
fp32 activations and an fp32 accumulator; a prefill's rows through the weight dequantized into a reused buffer
(pllava._C's int4_dequant) and a GEMM in the engine's dtype. On CUDA (the Triton path, quant._int4_triton) the
same format runs through pllava.kernels.int4_linear: its fused kernel for up to FUSED_MAX_M (64) rows, its Triton
dequantization and the unquantized engine's GEMM for a longer prefill.
"""
from __future__ import annotations

import torch

from pllava.kernels.int4_linear import GROUP  # weights a scale: the format's one definition, with its CUDA kernels
from pllava.kernels.int4_linear import int4_unpack_reference as unpack_int4  # (N, K / 2) -> (N, K) int8, torch ops

from ..errors import ConfigError
from ..ops import log_once, native_extension

DIVISORS = (8.0, 7.0, 8.5, 9.0)  # a group's candidate steps max|w| / t, in csrc/int8_quantize.cpp's
# order (kInt4Divisors): the first of equal fits wins, so 8 (Q4_0) comes first. A simulation (200k Gaussian groups):
# 0.895x Q4_0's squared error; [7, 10] in steps of 0.5 0.893x (9.5 and 10 almost never won), a 0.25 grid over
# [6, 12] 0.886x at 6x this cost; 3 of them (8, 7, 8.5) 0.899x.
_CHUNK = 1 << 17  # groups a pass of the torch formula: 4 M weights, 136 MB of temporaries at its peak (measured)


def quantize_weight_int4(w: torch.Tensor, name: str = "weight", generic: bool = False):
    """(N, K) float -> int4 groups: (packed uint8 (N, K / 2), bf16 scales (N, K / GROUP)). Each group's scale by
    least squares among DIVISORS (csrc/int8_quantize.h states the rule), then q = round_half_even(w / s) clamped to
    [-8, 7] in IEEE fp32 divisions, fitted to the bf16 scale, and packed. On the CPU one pass of pllava._C does all
    three (7B's (11008, 4096) MLP weight: ~60 ms on 2 Zen 5 cores; torch's formula ~0.9 s), elsewhere the torch
    formula (the same bits); a group holding inf or NaN takes the torch formula's q. generic: the extension's
    portable loop (tests). K must be a multiple of GROUP: a ConfigError names the weight otherwise."""
    if w.dim() != 2 or w.shape[1] % GROUP:
        raise ConfigError(f"quantize='int4': {name} has shape {tuple(w.shape)}; its input dimension must be a "
                          f"multiple of {GROUP} (use quantize='int8' for this checkpoint)")
    n, k = w.shape
    C = native_extension("int4_quantize_groups")
    if C is not None and w.device.type == "cpu":
        if w.dtype not in (torch.float32, torch.bfloat16):
            w = w.float()  # (an fp16 checkpoint: the formula widens it too)
        g = w.contiguous().view(n * (k // GROUP), GROUP)  # (G, 32)
        log_once("int4 weights: quantized by pllava._C (csrc/int8_quantize.cpp)")
        s = torch.empty(g.shape[0], dtype=torch.bfloat16)
        packed = torch.empty(g.shape[0], GROUP // 2, dtype=torch.uint8)
        C.int4_quantize_groups(g.data_ptr(), g.dtype == torch.bfloat16, g.shape[0], g.stride(0), s.data_ptr(),
                               packed.data_ptr(), torch.get_num_threads(), generic)
        sf = s.float()
        if not bool((torch.isfinite(sf) & (sf != 0)).all()):  # inf / NaN in a group: torch's semantics for q
            packed = pack_int4(_group_q_torch(g, sf).view(n, k // GROUP, GROUP))
        return packed.view(n, k // 2), s.view(n, k // GROUP)
    if w.device.type == "cpu":
        old = native_extension("ABI") is not None  # (built, without this entry)
        log_once("int4 weights: quantized by torch ops" + (" (pllava._C predates int4_quantize_groups: rebuild it)"
                                                          if old else " (pllava._C is not built)"))
    g = w.contiguous().view(n * (k // GROUP), GROUP)
    s = _group_scales_torch(g)
    return pack_int4(_group_q_torch(g, s.float()).view(n, k // GROUP, GROUP)), s.view(n, k // GROUP)


def _group_scales_torch(g: torch.Tensor) -> torch.Tensor:
    """(G, 32) float groups -> their bf16 scales (G,) by the rule in torch ops, a chunk of groups at a time. The sums
    are exact in fp64 whatever their order (csrc/int8_quantize.cpp says why), so this and the native pass give the
    same bits."""
    out = torch.empty(g.shape[0], dtype=torch.bfloat16, device=g.device)
    for c0 in range(0, g.shape[0], _CHUNK):
        x = g[c0:c0 + _CHUNK].float()  # (c, 32)
        amax = x.abs().amax(1)
        neg = x.amax(1) >= amax  # the weight of largest magnitude is positive (or a tie): a negative scale

        def cand(t):
            mag = (amax / t).clamp(min=1e-12)
            return torch.where(neg, -mag, mag).to(torch.bfloat16).float()

        steps, xd = [cand(t) for t in DIVISORS], x.double()  # (steps[0]: Q4_0's, DIVISORS[0] = 8)
        best = torch.full_like(amax, -1.0, dtype=torch.float64)
        fit = torch.zeros_like(best)
        for st in steps:
            q = torch.round(x / st[:, None]).clamp(-8, 7)
            a, b = (xd * q.double()).sum(1), (q * q).sum(1).double()
            score = a * a / b
            better = (b > 0) & (score > best)
            best, fit = torch.where(better, score, best), torch.where(better, a / b, fit)
        s = torch.where((best > 0) & torch.isfinite(amax), fit.float(), steps[0])
        out[c0:c0 + _CHUNK] = s.to(torch.bfloat16)
    return out


def _group_q_torch(g: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
    """(G, 32) groups, their scales as fp32 -> q (G, 32) int8 in [-8, 7]: round_half_even(w / s), clamped."""
    q = torch.empty(g.shape, dtype=torch.int8, device=g.device)
    for c0 in range(0, g.shape[0], _CHUNK):
        q[c0:c0 + _CHUNK] = torch.round(g[c0:c0 + _CHUNK].float() / sf[c0:c0 + _CHUNK, None]).clamp(-8, 7)
    return q


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
