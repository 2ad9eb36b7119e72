"""int8 for the LLM's linears: weight-only (`Engine.from_pretrained(..., quantize="int8")`), or w8a8.

Per output channel, symmetric: w ≈ q · s with q = round(w / s) in [-127, 127], s = max|w_row| / 127, the scale in
the weights' dtype. The LoRA stays unmerged in the weights' dtype at the live alpha (only the base weight is
quantized), so set_lora_alpha works as before. Decode (M <= 16 rows) is memory-bound, so a quarter of fp32's weight
bytes (half of bf16's) is the point.

On the CPU, decode rows run in fp32 when pllava._C is built (`native_int8_available(dtype)`): its int8 GEMV keeps the
activations and the accumulator in fp32 and is at least as fast as torch's bf16 one (7B shapes, 2 Zen4 cores, one
row, weights in L3: 0.34 ms at K = N = 4096 against _weight_int8pack_mm's 0.53 ms with bf16 activations, 7.9 ms
with fp32 ones, and 3.1 ms for the fp32 GEMV it replaces; a small-preset step's weights from DRAM, with its
prefetch: 3.8 against 7.9 ms, benchmarks/bench_int8_gemv.py), so bf16 decode activations buy no speed and cost
agreement (README, "quality"). A bf16 LoRA on those rows goes through the extension's bf16 GEMV (its factors
widened exactly, x kept fp32). Without pllava._C, decode rows go through _weight_int8pack_mm in the activations'
dtype (slow in fp32), and the log says so. Prefill rows: a GEMM in the weights' dtype (below). On the Triton path
(CUDA) every call is pllava.kernels.int8_linear: int8 tiles widened in registers, the scale on the fp32
accumulator, the LoRA's expand fused at the live alpha; without triton there the weight is dequantized per call,
and the log says which.

quantize="int4" (model/int4.py) holds the decoder linears as int4 groups of 32 instead: on the CPU through pllava._C,
on the Triton path through pllava.kernels.int4_linear (_int4_triton).

quantize="w8a8" (the CPU only) is the same weights with the prefill rows' activations quantized too, per row, for an
int8 x int8 GEMM summed exactly in int32 (activation_int8, w8a8_mm; a row's outliers multiplied apart in fp32).
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from pllava.kernels.int4_linear import FUSED_MAX_M as INT4_FUSED_MAX_M, int4_dequant
from pllava.kernels.int4_linear import int4_linear as int4_linear_fused
from pllava.kernels.int8_linear import int8_linear as int8_linear_fused
from pllava.kernels.lora_linear import lora_delta

from ..ops import define_cpu_op, log_once, lora_linear, native_extension
from .head import RescoredHead
from .int4 import dequantize_int4, gemv_int4, quantize_weight_int4

# Up to this many rows (decode, small batches) the int8 GEMV streams half the bytes. Past it the product is
# compute-bound, and dequantizing to bf16 for its GEMM wins: M = 2400, K = 768, N = 2048 on 2 Zen4 cores took
# 57.6 ms through _weight_int8pack_mm, 20.1 ms dequantized + bf16 F.linear, 50.6 ms in fp32.
DECODE_ROWS = 16


def quantize_weight(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), per-row scale (N,) in scale_dtype, default w's). The scale is max|w_row| / 127
    rounded to its dtype first, and q = round(w / that scale): the rounding the kernels multiply by is the one q was
    fitted to, not a per-row gain error of up to 2^-9 on every output. benchmarks/bench_quality.py 1024 (tiny
    checkpoint, top-1 disagreements with the fp32 model; q fitted to the fp32 scale before): prompt positions
    767 against 846 of 60416, decode positions 279 against 310 of 16384 (transformers bf16: 913, 259).
    q is fitted to w at w's own precision: the loader passes the checkpoint's tensor (fp32 in the tests' and the
    bench's checkpoints) with scale_dtype = the engine's dtype, not a copy already rounded to it.
    A CPU weight in fp32 or bf16 goes through pllava._C (_quantize_native: the same bits, 9-13x faster)."""
    sd = scale_dtype or w.dtype
    got = _quantize_native(w, sd)
    if got is not None:
        return got[0], got[1]
    w32 = w.float()
    scale = _row_scale(w32.abs().amax(dim=1)).to(sd)
    q = torch.round(w32 / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    # (a scale rounded down: 127.5 at most, |w| / s <= 127 · (1 + 2^-8))
    return q, scale


def _row_scale(amax: torch.Tensor) -> torch.Tensor:
    """A row's step in fp32 (before its rounding to the scale's dtype): max|w| / 127."""
    return (amax / 127.0).clamp(min=1e-12)


def _quantize_native(w: torch.Tensor, scale_dtype: torch.dtype, resid: bool = False, generic: bool = False):
    """quantize_weight's formula in pllava._C (csrc/int8_quantize.cpp) -> (q, scale, the head's residual w - q·s
    formed in fp64 and rounded to fp32, or None), for a CPU (N, K) weight in fp32 or bf16 with unit column stride:
    its rows' absmax, the scale rounded to scale_dtype here by torch, then q (and the residual) in one pass a row.
    One 11008 x 4096 weight on 2 Zen 5 cores: 208 -> 23 ms from fp32, 245 -> 19 ms from bf16 (torch's formula
    makes six full-size temporaries; an fp16 weight is widened to fp32 first). None where the extension is not
    built or the weight is another kind (a CUDA tensor: torch is fast there; a column stride), and where a row's
    scale is not finite and > 0 (a row holding inf or NaN; an fp16 scale under its range): torch's formula keeps
    its own semantics for those. generic: the portable loop (tests)."""
    C = native_extension("int8_quantize_rows")
    if C is not None and w.device.type == "cpu" and w.dtype == torch.float16:
        w = w.float()  # (the formula widens it too; one temporary, not six)
    if (C is None or w.device.type != "cpu" or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16)
            or w.shape[1] < 1 or w.stride(1) != 1 or w.stride(0) < w.shape[1]):
        if w.device.type == "cpu":
            log_once("int8 weights: quantized by torch ops" + (" (pllava._C is not built)" if C is None else ""))
        return None
    log_once("int8 weights: quantized by pllava._C (csrc/int8_quantize.cpp)")
    (n, k), bf16, threads = w.shape, w.dtype == torch.bfloat16, torch.get_num_threads()
    amax = torch.empty(n, dtype=torch.float32)
    C.row_absmax(w.data_ptr(), bf16, n, k, w.stride(0), amax.data_ptr(), threads, generic)
    scale = _row_scale(amax).to(scale_dtype)
    sf = scale.float()
    if not bool((torch.isfinite(sf) & (sf > 0)).all()):
        return None
    q = torch.empty(n, k, dtype=torch.int8)
    r = torch.empty(n, k, dtype=torch.float32) if resid else None
    C.int8_quantize_rows(w.data_ptr(), bf16, n, k, w.stride(0), sf.data_ptr(), q.data_ptr(),
                         0 if r is None else r.data_ptr(), threads, generic)
    return q, scale, r


def head_levels(w: torch.Tensor, scale_dtype: torch.dtype | None = None):
    """lm_head's two int8 levels (Int8Head): w = q·s + r with r ≈ q2·s2 -> (q, s in scale_dtype, q2, s2 in fp32).
    The residual is formed against the scale in use in fp64: exact (for fp32 weights q·s needs 31 bits, and an
    fp32 residual moved second-level values by one step: 2e-6 of a logit against fp32's 3e-7); row chunks bound
    the fp64 copy (34B's head: 64064 x 7168). pllava._C forms it a row at a time in the same pass as q."""
    got = _quantize_native(w, scale_dtype or w.dtype, resid=True)
    if got is not None:
        q, s, resid = got
    else:
        q, s = quantize_weight(w, scale_dtype)
        resid = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        for r in range(0, w.shape[0], 4096):
            resid[r:r + 4096] = w[r:r + 4096].double() - q[r:r + 4096].double() * s[r:r + 4096].double()[:, None]
    q2, s2 = quantize_weight(resid)
    return q, s, q2, s2.float()


def int8_targets(lm) -> dict[str, str]:
    """The weights quantize_lm_int8_ turns into int8, by name under `lm` (a LlamaLM): 'linear' for the decoder
    layers' attention and MLP linears, 'head' for an lm_head not tied to the embedding."""
    out = {}
    for i in range(len(lm.layers)):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"layers.{i}.self_attn.{name}.weight"] = "linear"
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"layers.{i}.mlp.{name}.weight"] = "linear"
    if not (lm.config.tie_word_embeddings or lm.lm_head.weight is lm.embed_tokens.weight):
        out["lm_head.weight"] = "head"
    return out


def quantize_target(w: torch.Tensor, kind: str, scale_dtype: torch.dtype, int4: bool = False, name: str = "weight"):
    """One int8_targets weight, at whatever precision it comes in -> its int8 form: (q, s), or the head's levels;
    with int4 (quantize="int4"), a decoder linear's int4 form (quantize_weight_int4; lm_head stays int8)."""
    if kind == "head":
        return head_levels(w, scale_dtype)
    return quantize_weight_int4(w, name) if int4 else quantize_weight(w, scale_dtype)


_NATIVE: list = []  # [(pllava._C or None, its GEMV's ISA)], looked up once: decode asks ~60 times a token, and a
# compiled step must not call into the extension to ask


def _native():
    """-> (pllava._C, "avx512" | "avx2" | "generic"), or (None, None) where it is not built."""
    if not _NATIVE:
        C = native_extension("int8_gemv")
        _NATIVE.append((C, C.cpu_isa()) if C is not None else (None, None))
    return _NATIVE[0]


def _gemv(C, x, q, scale):
    """The kernel call itself: x (M, K) fp32 and scale (N,) fp32 contiguous, q (N, K) int8 contiguous."""
    (m, k), n = x.shape, q.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    C.int8_gemv(x.data_ptr(), k, q.data_ptr(), scale.data_ptr(), y.data_ptr(), n, m, n, k, torch.get_num_threads())
    return y


def _gemv_bf16(C, x, w, alpha: float, out=None):
    """alpha · x (M, K) fp32 · w (N, K) bf16ᵀ in fp32 (pllava._C's bf16 GEMV), added into `out` (M, N) fp32
    contiguous when given. x and w contiguous."""
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32) if out is None else out
    C.bf16_gemv(x.data_ptr(), k, w.data_ptr(), alpha, out is not None, y.data_ptr(), n, m, n, k,
                torch.get_num_threads())
    return y


def native_int8_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether int8 decode rows of an engine in `dtype` run in fp32 through pllava._C's GEMV: it is built, and for
    bf16 / fp16 engines one of its vector paths (AVX-512, or AVX2 + FMA) runs here (its portable loop is slower than
    torch's bf16 GEMV, which then keeps those rows in bf16). On a 2-core AVX2-only EPYC the AVX2 path ran a decode
    step's int8 weights 1.4-2.2x faster than torch's bf16 GEMV and 2.4-2.7x faster than the portable loop
    (benchmarks/bench_int8_gemv.py)."""
    C, isa = _native()
    return C is not None and (dtype == torch.float32 or isa != "generic")


def _decode_rows(C, isa, xf, q, scale, bias, lora):
    """The CPU's int8 (or int4: q uint8) decode rows by pllava._C: xf (M, K) fp32 contiguous · (q · scale)ᵀ + bias
    [+ the LoRA at its live scale] -> (M, N) fp32. Called directly in eager steps and as the body of
    pllava::int8_gemv_cpu."""
    y = gemv_int4(C, xf, q, scale) if q.dtype == torch.uint8 else _gemv(C, xf, q, scale.float().contiguous())
    if bias is not None:
        y += bias
    if lora is not None:
        a, b, s = lora
        if a.dtype == torch.bfloat16 and isa != "generic" and a.is_contiguous() and b.is_contiguous():
            # the bf16 factors widened in registers, x kept fp32, the delta added into y at the live scale
            # (torch's bf16 GEMM took 51 us a product here, 1.6 ms of a 9 ms small-preset step)
            log_once("int8 decode rows: the LoRA through pllava._C's bf16 GEMV, in fp32")
            t = _gemv_bf16(C, xf, a, 1.0)  # (M, r)
            if s.dim() == 0:
                _gemv_bf16(C, t, b, float(s), out=y)
            else:  # the batched scheduler's rows, one alpha each: the (M, r) product scaled a row at a time
                _gemv_bf16(C, t.mul_(s.float().reshape(-1, 1)), b, 1.0, out=y)
        else:  # in the LoRA's dtype (fp32 copies of A and B would add 2 bytes a LoRA weight)
            y += lora_delta(xf.to(a.dtype), a, b, s)
    return y


def _int8_gemv_op(x, q, scale, bias=None, lora_a=None, lora_b=None, lora_scale=None):
    C, isa = _native()
    if C is None:
        raise RuntimeError("pllava::int8_gemv_cpu: pllava._C is not built with int8_gemv (reinstall the package)")
    if x.device.type != "cpu" or x.dim() != 2 or x.dtype != torch.float32:
        raise ValueError(f"int8_gemv_cpu: x must be a 2-D float32 CPU tensor, got {tuple(x.shape)} {x.dtype} "
                         f"on {x.device}")
    int4 = q.dtype == torch.uint8  # quantize="int4": q packed (N, K / 2), scale bf16 (N, K / 32)
    if (q.dtype not in (torch.int8, torch.uint8) or q.dim() != 2 or q.shape[1] * (2 if int4 else 1) != x.shape[1]
            or q.device.type != "cpu"):
        raise ValueError(f"int8_gemv_cpu: q must be an int8 CPU (N, {x.shape[1]}) or a packed int4 uint8 "
                         f"(N, {x.shape[1] // 2}), got {tuple(q.shape)} {q.dtype}")
    want = (q.shape[0], x.shape[1] // 32) if int4 else (q.shape[0],)
    if (scale.shape != want or not scale.is_floating_point() or scale.device.type != "cpu"
            or (int4 and scale.dtype != torch.bfloat16)):
        raise ValueError(f"int8_gemv_cpu: scale must be a float {want}{' bf16' if int4 else ''}, got "
                         f"{tuple(scale.shape)} {scale.dtype}")
    if bias is not None and bias.shape != (q.shape[0],):
        raise ValueError(f"int8_gemv_cpu: bias must be ({q.shape[0]},), got {tuple(bias.shape)}")
    lora = None
    if lora_a is not None or lora_b is not None or lora_scale is not None:
        if lora_a is None or lora_b is None or lora_scale is None:
            raise ValueError("int8_gemv_cpu: a LoRA needs lora_a, lora_b and lora_scale together")
        r = lora_a.shape[0]
        if lora_a.shape != (r, x.shape[1]) or lora_b.shape != (q.shape[0], r) or lora_scale.dim() > 1:
            raise ValueError(f"int8_gemv_cpu: LoRA factors must be (r, {x.shape[1]}) and ({q.shape[0]}, r) with a "
                             f"0-dim or per-row scale, got {tuple(lora_a.shape)}, {tuple(lora_b.shape)}, "
                             f"{tuple(lora_scale.shape)}")
        lora = (lora_a, lora_b, lora_scale)
    return _decode_rows(C, isa, x.contiguous(), q.contiguous(), scale.contiguous() if int4 else scale, bias, lora)


# x (M, K) fp32 · (q (N, K) int8 · scale (N,))ᵀ [+ bias] [+ lora_scale · (x · lora_aᵀ) · lora_bᵀ] -> (M, N) fp32,
# accumulated in fp32 (pllava._C): the compiled step's int8 decode rows, LoRA included, as one opaque op
define_cpu_op("int8_gemv_cpu(Tensor x, Tensor q, Tensor scale, Tensor? bias=None, Tensor? lora_a=None, "
              "Tensor? lora_b=None, Tensor? lora_scale=None) -> Tensor", _int8_gemv_op,
              lambda x, q, scale, bias=None, lora_a=None, lora_b=None, lora_scale=None:
              x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32))


_SCRATCH = threading.local()  # this thread's reused CPU buffers, by name (scratch)


def scratch(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A (shape) view of this thread's buffer `name` (grown to the largest request yet, never shrunk), for a CPU
    prefill's large temporaries: a fresh tensor of tens of MB is mapped anew by the allocator at each call and
    page-faulted as it is written (~2 us a 4 KB page on a 2-core Xeon VM). The caller must be done with the view
    before it asks for `name` again on this thread."""
    bufs = _SCRATCH.__dict__
    n = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = bufs[name] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _widened(q: torch.Tensor, dtype: torch.dtype, int4_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q (N, K) int8 as `dtype` values, written into this thread's reused buffer (the largest weight yet, e.g.
    90 MB in bf16 for 7B's MLP) rather than a fresh tensor: a fresh one cost a 7B prefill layer (M = 2350, 2-core
    Xeon) 660 against 545 ms (the same products bit for bit). A prefill holds the view only until its GEMM returns.
    int4_scale: q is packed int4 (N, K / 2), and the result is its dequantized weight fl32(q · s) in `dtype`."""
    reuse = not torch.compiler.is_compiling() and q.device.type == "cpu"
    if int4_scale is not None:
        out = scratch("widened", (q.shape[0], q.shape[1] * 2), dtype) if reuse else None
        return dequantize_int4(q, int4_scale, dtype, out=out)
    return scratch("widened", q.shape, dtype).copy_(q) if reuse else q.to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                lora=None, path: str = "torch", out: torch.Tensor | None = None,
                act_int8: bool = False) -> torch.Tensor:
    """x (..., K) · (q · scale)ᵀ + bias [+ the LoRA: lora = (lora_A, lora_B, s) at its live scale], in x's dtype
    but for decode rows on the CPU with pllava._C: those come back in fp32 (module docstring).
    path 'triton': the fused Triton kernel; 'torch': the CPU kernels below (or the dequantized weight).
    `out` (M, N) in x's dtype, M = x's rows: where a CPU prefill row's product is written (the same bits as
    without: the GEMM's out= form), with no bias or LoRA; other calls must pass None.
    act_int8 (quantize="w8a8"): a CPU prefill's rows (more than DECODE_ROWS) are quantized per row to int8 and
    multiplied by q in integers (w8a8_mm); the LoRA still reads x itself. Decode rows are unchanged."""
    if out is not None and (path == "triton" or bias is not None or lora is not None or x.dtype != out.dtype
                            or x.device.type != "cpu" or x.numel() // x.shape[-1] <= DECODE_ROWS):
        raise ValueError("int8_linear: out= is for CPU prefill rows without bias or LoRA, in x's dtype")
    if path == "triton":
        if q.dtype == torch.uint8:
            return _int4_triton(x, q, scale, bias, lora)
        return int8_linear_fused(x, q, scale, bias, *(lora or (None, None, None)))
    x2 = x.reshape(-1, x.shape[-1])
    decode = x2.device.type == "cpu" and x2.shape[0] <= DECODE_ROWS
    C, isa = _native() if decode else (None, None)
    eager = not torch.compiler.is_compiling()
    if decode and native_int8_available(x2.dtype):  # the runtime's rule, per call (fp32 rows: the norms' output)
        if eager:
            bits = "int4" if q.dtype == torch.uint8 else "int8"
            log_once(f"{bits} decode rows: pllava._C's fp32 {bits} GEMV ({isa})")
        xf = x2.float().contiguous()  # (M, K)
        if eager and q.is_contiguous():  # the kernels directly (the op's dispatch costs 7-12 us a call)
            y = _decode_rows(C, isa, xf, q, scale, bias, lora)
        else:  # the op: traceable (the compiled step calls the same kernels), and it checks its arguments
            y = torch.ops.pllava.int8_gemv_cpu(xf, q, scale, bias, *(lora or (None, None, None)))  # (M, N) fp32
        return y.reshape(*x.shape[:-1], q.shape[0])
    if q.dtype == torch.uint8:  # int4 rows but pllava._C's decode rows: the dequantized weight's GEMM
        if eager:
            native = native_extension("int4_dequant") is not None and q.device.type == "cpu"
            log_once("int4 rows: the weight dequantized " + ("by pllava._C" if native else "by torch ops ("
                     + ("pllava._C is not built" if q.device.type == "cpu" else "triton cannot run here") + ")")
                     + ", then a GEMM in the activations' dtype" + ("" if not decode else
                                                                     " (decode rows too: no fp32 int4 GEMV here)"))
        y = _prefill_mm(x2, _widened(q, x2.dtype, scale), out)
    elif decode:
        if eager:
            log_once("int8 decode rows: torch._weight_int8pack_mm in the activations' dtype (pllava._C is "
                      + ("not built)" if C is None else "built without AVX-512 or AVX2 here)"))
        y = torch._weight_int8pack_mm(x2.contiguous(), q, scale.to(x2.dtype))
    elif act_int8 and x2.device.type == "cpu":  # quantize="w8a8"'s prefill rows
        y = w8a8_mm(x, x2, q, scale, out)
    elif x2.dtype == torch.bfloat16:  # prefill: bf16's GEMM on q itself (int8 values are exact in bf16; its range
        # holds x·q), then the scale: torch's bf16 multiply forms y·s in fp32 and rounds once, bit-identical to
        # (y.float() * s.float()).to(bf16) but 5x faster (2.6 against 13.9 ms at M = 2400, N = 2048, 2 cores)
        y = _prefill_mm(x2, _widened(q, x2.dtype), out).mul_(scale)
    else:  # fp16 (whose range x·q could overflow) and fp32: the dequantized weight
        y = _prefill_mm(x2, _widened(q, x2.dtype).mul_(scale.to(x2.dtype)[:, None]), out)
    if bias is not None:
        y = y + bias
    y = y.reshape(*x.shape[:-1], q.shape[0])
    if lora is not None:
        y = y + lora_delta(x, *lora)
    return y


def _int4_triton(x, q, scale, bias, lora):
    """quantize="int4" on the Triton path (pllava.kernels.int4_linear): up to INT4_FUSED_MAX_M rows (decode, and
    batches of it) the fused kernel, whose weight bytes are int4's; more rows (a prefill, compute-bound) the weight
    dequantized by Triton into x's dtype (fl32(q · s) rounded once: the CPU's prefill weight), then the GEMM an
    unquantized engine runs on such a weight (the Triton LoRA linear for q/v_proj, F.linear for the others)."""
    m = x.numel() // x.shape[-1]
    eager = not torch.compiler.is_compiling()
    if m <= INT4_FUSED_MAX_M:
        if eager:
            log_once(f"int4 rows up to {INT4_FUSED_MAX_M}: the fused Triton int4 kernel (pllava.kernels.int4_linear)")
        return int4_linear_fused(x, q, scale, bias, *(lora or (None, None, None)))
    if eager:
        log_once(f"int4 rows past {INT4_FUSED_MAX_M}: the weight dequantized by Triton (int4_dequant), then the "
                 "unquantized engine's GEMM on it")
    w = int4_dequant(q, scale, x.dtype)  # (N, K)
    if lora is None:
        return F.linear(x, w, bias)
    return lora_linear(x, w, bias, *lora, path="triton")


_W8A8 = threading.local()  # this thread's last quantized activation (activation_int8)

# |x| past this in a prefill row's activation marks an outlier (the threshold of LLM.int8()'s decomposition,
# bitsandbytes' default `llm_int8_threshold`): it leaves its row's int8 product and is multiplied in fp32 instead,
# so that one large channel does not coarsen the row's other values. A row's outliers are its own (not the batch's
# columns), so its result still depends on nothing but the row. A tiny checkpoint whose norm weights make 2
# channels a layer 50x larger (the linears' columns 50x smaller: the fp32 model unchanged) took bf16 + w8a8 from
# 57 to 515 top-1 disagreements with the fp32 model in 3776 prompt positions without it (bf16 + int8: 172), and
# to 168 with it (a scratch run).
OUTLIER_THRESHOLD = 6.0


def _split_rows_torch(x2: torch.Tensor):
    """activation_int8's formula in torch ops (no pllava._C, or another dtype): (xq, xs, outlier mask (M, K))."""
    xf = x2.float()
    mask = xf.abs() > OUTLIER_THRESHOLD
    main = torch.where(mask, 0.0, xf)
    xs = (main.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    bad = ~torch.isfinite(xs)
    xq = torch.round(main / torch.where(bad, 1.0, xs)[:, None]).clamp(-127, 127).to(torch.int8)
    xq[bad] = 0
    return xq, xs, mask


def _split_rows_native(C, x2: torch.Tensor):
    """activation_int8's formula in pllava._C's two row passes: (xq, xs, rows, idx, val): the outliers' rows,
    columns and fp32 values (nnz,) each, by row, then column."""
    (m, k), bf16, ld, threads = x2.shape, x2.dtype == torch.bfloat16, x2.stride(0), torch.get_num_threads()
    amax, cnt = torch.empty(m, dtype=torch.float32), torch.empty(m, dtype=torch.int64)
    C.row_absmax_split(x2.data_ptr(), bf16, m, k, ld, OUTLIER_THRESHOLD, amax.data_ptr(), cnt.data_ptr(), threads)
    xs = (amax / 127.0).clamp(min=1e-12)
    bad = ~torch.isfinite(xs)
    any_bad = bool(bad.any())
    off = torch.zeros(m + 1, dtype=torch.int64)  # row m's outliers go to [off[m], off[m + 1])
    torch.cumsum(cnt, 0, out=off[1:])
    nnz = int(off[-1])
    idx, val = torch.empty(nnz, dtype=torch.int64), torch.empty(nnz, dtype=torch.float32)
    xq = scratch("w8a8.x", (m, k), torch.int8)
    qs = torch.where(bad, 1.0, xs) if any_bad else xs  # the pass needs finite scales > 0
    C.int8_quantize_rows_split(x2.data_ptr(), bf16, m, k, ld, OUTLIER_THRESHOLD, qs.data_ptr(), xq.data_ptr(),
                               off.data_ptr(), idx.data_ptr(), val.data_ptr(), threads)  # (nnz = 0: nothing written)
    if any_bad:
        xq[bad] = 0
    rows = torch.repeat_interleave(torch.arange(m), cnt) if nnz else idx
    return xq, xs, rows, idx, val


def activation_int8(x: torch.Tensor, x2: torch.Tensor):
    """x2 = x's (M, K) rows -> (int8 (M, K), fp32 (M,) steps, outliers). A row's values past |x| >
    OUTLIER_THRESHOLD (an inf too, a NaN not) are its outliers: they leave the row and are returned apart,
    outliers = (the channels holding any, (r,); each row's own outliers there in fp32 as a sparse COO (M, r)
    matrix), or None. Of the rest, xs = max|x_row| / 127 (clamped to 1e-12: a row of zeros) and xq =
    round_half_even(x / xs) clamped to [-127, 127], the formula quantize_weight applies to a weight's rows with the
    step kept in fp32 (an outlier's xq is 0). A row holding a NaN gets xq = 0 and its NaN step, a row holding an
    inf an inf outlier, so that the product's row is non-finite (never a finite answer made from a NaN). By
    pllava._C's two row passes where built (bit-equal, the outliers found in the same passes; ~2 ms for
    pllava-7b's (2327, 4096) bf16 rows on 2 Zen 5 cores, 55 ms as torch ops), else torch. The same x feeds
    q/k/v_proj (and gate/up_proj): it is quantized once, then reused while it is the same tensor unchanged (`is`,
    and its version counter). The memo holds x alive until the next activation replaces it, so its address cannot
    be reused by another tensor meanwhile."""
    version = None if x.is_inference() else x._version  # (inference_mode's tensors have no version counter)
    memo = getattr(_W8A8, "memo", None)
    if version is not None and memo is not None and memo[0] is x and memo[1] == version:
        return memo[2]
    m = x2.shape[0]
    C = native_extension("int8_quantize_rows_split")
    if (C is not None and x2.dtype in (torch.float32, torch.bfloat16) and x2.stride(1) == 1
            and x2.stride(0) >= x2.shape[1]):
        xq, xs, rows, idx, val = _split_rows_native(C, x2)
    else:
        xq, xs, mask = _split_rows_torch(x2)
        rows, idx = mask.nonzero().unbind(1)  # row-major: by row, then channel
        val = x2[rows, idx].float()
    outliers = None
    if idx.numel():
        cols = idx.unique()  # (r,), sorted
        # a sparse (M, r) product: a random-weight 7B preset's MLP input holds ~87 k values past 6 over ~1100 of
        # its 11008 channels, whose dense (2307, 1104) fp32 product took 155 ms a call, the sparse one ~3 ms a
        # 5 k values (the invariants checked, O(nnz), and said so: torch 2.11 warns where that is left implicit)
        with torch.sparse.check_sparse_tensor_invariants(enable=True):
            outliers = (cols, torch.sparse_coo_tensor(torch.stack([rows, torch.searchsorted(cols, idx)]), val,
                                                      (m, cols.numel()), is_coalesced=True))
    got = (xq, xs, outliers)
    _W8A8.memo = None if version is None else (x, version, got)
    return got


def w8a8_mm(x: torch.Tensor, x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
            out: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) · (q · scale)ᵀ with x2's rows quantized to int8 (activation_int8): the int8 x int8 product summed
    exactly in int32 by torch._int_mm (oneDNN's VNNI GEMM on these CPUs: pllava-7b's (2327, 4096) x (4096, 4096)
    in 50 ms on 2 Zen 5 cores, against 94 for the bf16 GEMM of the widened weight), then
    y = (float(acc) · xs[m]) · scale[n] in x's dtype (pllava._C's one pass where built; torch's formula, the same
    bits, else). Outliers, where a row has any, add their product with (q · scale)'s columns in fp32 before the
    one rounding to x's dtype. Exact integer sums make a row's result independent of M, of the threads and of the
    other rows. Eager only (its outliers are data-dependent sparse shapes): the compiled step runs decode rows,
    which never come here."""
    (m, _), n = x2.shape, q.shape[0]
    xq, xs, outliers = activation_int8(x, x2)
    C = native_extension("int32_dequant_rows")
    log_once("w8a8 prefill rows: int8 activations (per row) x int8 weights by torch._int_mm, dequantized by "
             + ("pllava._C" if C is not None else "torch ops (pllava._C is not built)"))
    acc = torch._int_mm(xq, q.t(), out=scratch("w8a8.acc", (m, n), torch.int32))  # (M, N) int32
    dt = torch.float32 if outliers is not None else x2.dtype
    if C is None or dt not in (torch.float32, torch.bfloat16):
        y = acc.float() * xs[:, None] * scale.float()[None, :]
    else:
        y = torch.empty(m, n, dtype=dt) if out is None or dt != out.dtype else out
        cs = scale.float().contiguous()  # held by a name: the pass reads it through a raw pointer
        C.int32_dequant_rows(acc.data_ptr(), m, n, acc.stride(0), xs.data_ptr(), cs.data_ptr(), y.data_ptr(),
                             dt == torch.bfloat16, y.stride(0), torch.get_num_threads())
    if outliers is not None:
        cols, xo = outliers
        log_once(f"w8a8: activations past |x| = {OUTLIER_THRESHOLD} multiplied in fp32 apart "
                 "(LLM.int8()'s decomposition, a row's own)")
        y.addmm_(xo, (q[:, cols].float() * scale.float()[:, None]).t().contiguous())  # a row's own entries,
        # in channel order, added to its row only
    if y.dtype != x2.dtype or (out is not None and y is not out):
        y = y.to(x2.dtype) if out is None else out.copy_(y)
    return y


def _prefill_mm(x2: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x2 (M, K) · w (N, K)ᵀ: F.linear's product (its 2-D, bias-free form is this mm), into `out` when given."""
    return F.linear(x2, w) if out is None else torch.mm(x2, w.t(), out=out)


def int8_loader(lm, dtype: torch.dtype, device, norms_fp32: bool, pre: dict, prefix: str = "language_model.",
                int4: bool = False):
    """checkpoint.load_weights' convert for quantize="int8": each int8_targets weight is quantized as it loads, from
    the checkpoint's own tensor (fitted to its precision: fp32 where stored so, with the scale in `dtype`), into
    `pre` for quantize_lm_int8_, never materialised in `dtype` (the load's peak holds one float weight, not all);
    with norms_fp32 the LLM's RMSNorm weights stay in fp32 (for the CPU's fp32 decode rows, LlamaLM.set_fp32_rows);
    everything else goes to `dtype`. benchmarks/bench_quality.py 2048 (disagreements at decode positions;
    transformers bf16: 507): q fitted to bf16-rounded weights 526, to the fp32 ones 503 (a scratch run), with the
    fp32 norm weights too 486 (README, "quality")."""
    from .llm import RMSNorm

    targets = {prefix + n: (n, kind) for n, kind in int8_targets(lm).items()}
    norms = {f"{prefix}{n}.weight" for n, m in lm.named_modules() if isinstance(m, RMSNorm)} if norms_fp32 else set()

    def convert(name, t):
        if name in targets:
            key, kind = targets[name]
            pre[key] = quantize_target(t.to(device), kind, dtype, int4, name)
            return None
        if name in norms:  # a copy: a tensor kept as stored is a view of the file's mapping, which it would pin
            # whole (an fp32 small preset held 430 MB more resident after the load)
            return t.to(device=device, dtype=torch.float32, copy=True)
        # a copy too: a tensor kept as stored (bf16 into a bf16 engine) is a view of its shard's mapping, which
        # would keep every page the quantizing read resident (pllava-7b: 12.8 GB of file pages beside 6.7 GB of
        # weights after the load)
        return t.to(device=device, dtype=dtype, copy=True)

    return convert


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (buffers qweight, qscale). qs: (q, s) already quantized (by the loader, from
    the checkpoint's tensor); otherwise lin's weight is quantized here."""

    def __init__(self, lin: nn.Linear, qs=None):
        super().__init__()
        q, s = quantize_weight(lin.weight.data) if qs is None else qs
        self.register_buffer("qweight", q)
        self.register_buffer("qscale", s)
        self.bias = lin.bias
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel_path = "torch"  # 'triton': pllava.kernels.int8_linear (PllavaModel.set_kernel_path)
        self.act_int8 = False  # quantize="w8a8": prefill rows in int8 too (int8_linear)

    def forward(self, x):
        return int8_linear(x, self.qweight, self.qscale, self.bias, path=self.kernel_path, act_int8=self.act_int8)


class Int8Head(RescoredHead):
    """lm_head at int8 speed without int8's top-1 cost. The weight is stored in two levels, w = q·s + r with
    r ≈ q2·s2 (per row; 2 bytes a weight, as bf16; head_levels): the first pass streams the 1-byte q only; the
    rescored rows come from q·s + q2·s2, whose error (<= s2/2, about max|w_row| / 2·127²) is far under bf16's
    (2^-9 of each weight). levels: head_levels' output already computed (by the loader); otherwise from lin."""

    def __init__(self, lin: nn.Linear, levels=None):
        super().__init__()
        q, s, q2, s2 = head_levels(lin.weight.data) if levels is None else levels
        for name, t in (("qweight", q), ("qscale", s), ("rweight", q2), ("rscale", s2)):
            self.register_buffer(name, t)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel_path = "torch"

    def first_pass(self, h2):
        return int8_linear(h2, self.qweight, self.qscale, None, path=self.kernel_path)

    def weight_rows(self, t):
        return (self.qweight[t].float() * self.qscale[t].float()[..., None]
                + self.rweight[t].float() * self.rscale[t][..., None])


def quantize_lm_int8_(lm, pre: dict | None = None, act_int8: bool = False, int4: bool = False) -> bool:
    """Quantize the decoder layers' linears (attention q/k/v/o with their LoRA left as is, the MLP) and lm_head
    (as an Int8Head) in place; the embedding stays in the weights' dtype. lm_head tied to the embedding stays too
    (its two-level copy would add 2 bytes a weight). Returns whether lm_head was quantized. `pre`: int8_targets'
    weights already quantized by the loader (quantize_target of the checkpoint's own tensors, whose float weights
    were never materialised); the others are quantized from the module's weight.
    benchmarks/bench_quality.py 2048 (tiny checkpoint, top-1 disagreements with the fp32 model at 120832 prompt /
    32768 decode positions; transformers' bf16: 1893 / 507; q fitted to bf16-rounded weights, bf16 norm weights):
    lm_head in bf16 1890 / 623, in plain int8 2326 / 657, as an Int8Head 1565 / 526 (the gain is the fp32 logits
    of the rescored tokens). act_int8 (quantize="w8a8"): the decoder linears quantize a prefill's rows to int8 too
    (int8_linear); lm_head's rows stay as they are. int4 (quantize="int4"): the decoder linears hold int4 groups
    (model/int4.py) instead; lm_head stays an Int8Head."""
    from .llm import LoRALinear

    pre = pre or {}

    def get(name, m):
        if name in pre:
            return pre[name]
        return quantize_weight_int4(m.weight.data, name) if int4 else quantize_weight(m.weight.data)

    for i, layer in enumerate(lm.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m: LoRALinear = getattr(layer.self_attn, name)
            q, s = get(f"layers.{i}.self_attn.{name}.weight", m)
            del m.weight  # the float weight goes: the memory is the point
            m.weight = None
            m.qweight, m.qscale = q, s
            m.act_int8 = act_int8
        for name in ("gate_proj", "up_proj", "down_proj"):
            m = getattr(layer.mlp, name)
            setattr(layer.mlp, name, Int8Linear(m, get(f"layers.{i}.mlp.{name}.weight", m)))
            getattr(layer.mlp, name).act_int8 = act_int8
    if "lm_head.weight" not in int8_targets(lm):
        return False
    lm.lm_head = Int8Head(lm.lm_head, pre.get("lm_head.weight"))
    return True


def quantized_bytes(module) -> int:
    """Bytes of the int8 weights and their scales under `module`."""
    return sum(b.numel() * b.element_size() for n, b in module.named_buffers()
               if n.endswith(("qweight", "qscale", "rweight", "rscale")))
