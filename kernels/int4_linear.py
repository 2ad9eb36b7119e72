"""y = x·(q·s)ᵀ + b + s_lora·((x·Aᵀ)·Bᵀ): the int4 linear of quantize="int4" on CUDA, LoRA fused; and the
int4 weight's dequantization for a prefill's GEMM.

The weight is int4 in groups of GROUP = 32 along K with a bf16 scale a group, of either sign (engine/model/int4.py):
q (N, K / 2) uint8, a row's group g in bytes 16g .. 16g + 15, byte j holding q + 8 of weight 32g + j in its low nibble
and of weight 32g + 16 + j in its high one; s (N, K / 32) bf16. 0.5625 bytes a weight: a decode step streams 0.56x
int8's weight bytes (7B: 3.8 against 6.7 GB), so ~1.75x int8's tokens/s on paper where decode is memory-bound.

Exactness: a group's scale does not factor out of the whole K sum (unlike int8's per-row scale), so the kernel
keeps one fp32 partial a group: the two nibble halves of a group are two K = 16 tensor-core dots of x against the
integers q (exact in bf16 / fp16 / fp32, as are their products with x in the fp32 accumulator), and that partial
times s is added to the tile's accumulator. No weight is ever rounded to the activation dtype: the result is the
product with the fp32 weight fl32(q · s), as the CPU's int4 GEMV forms it, up to fp32 summation order.

Which rows (engine/model/quant.py): up to FUSED_MAX_M rows (decode, and batches of it) take the fused kernel; its
16-row tiles read a weight tile once from DRAM and from L2 for the other row tiles (GROUP_M). A prefill's rows
(M ~ 2400, compute-bound) instead dequantize the weight once into the activation dtype (int4_dequant, fl32(q · s)
rounded once, the CPU's prefill weight bit for bit) and run the engine's own GEMM on it: per group the fused kernel
would add a (BLOCK_M x BLOCK_N) fp32 multiply-add to 32 K of tensor-core work, ~15x slower a flop on H100's CUDA
cores (67 against ~990 TFLOPS): ~45 % more time at 128 x 128 tiles, where the dequantization reads 0.56 and
writes 2 bytes a weight (~13 % of a 7B MLP GEMM's time at M = 2400, on paper: no GPU has run this yet).
The LoRA (q/v_proj) stays unmerged at the live alpha: its shrink runs once a call (lora_linear.scaled_shrink) and
the kernel adds the expand to the accumulator, as int8_linear does. A decode grid short of the SMs splits K.
Order of this file: constants -> kernels -> launchers -> custom-op registration -> references.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (HAVE_TRITON, LaunchSpec, arch_key, check_bias_and_lora, first_covering, output_for,
                      split_k, split_k_reduce, upcast_dot)
from .lora_linear import MAX_RANK, lora_delta, scaled_shrink

# ------------------------------------------------------------------------------------------------ constants
GROUP = 32  # weights a scale; a group is two K = 16 dots (its low and its high nibbles)
FUSED_MAX_M = 64  # rows through the fused kernel; a longer prefill dequantizes the weight for its GEMM
RANK_BLOCK = 64  # the LoRA expand's ranks a step (r = 128: two steps)
# (BLOCK_M, BLOCK_N, GROUPS a K step, GROUP_M, num_warps, num_stages): decode tiles of 16 rows (the tensor cores'
# smallest M), N tiles narrow enough to cover every SM (N = 4096 at 16: 256 CTAs on 132), and 4 groups a step (64
# bytes a weight row a stage: with 4 stages 8 KB in flight a 32-wide CTA, int8_linear's decode tile moves 128 x 32
# bytes a stage). GROUP_M = 4: a batch's 4 row tiles of 16 (M <= FUSED_MAX_M) run next to each other on the same
# weight tile, so it comes from DRAM once.
CONFIGS = {
    "sm90": [(16, 32, 4, 4, 4, 4), (16, 16, 4, 4, 4, 4)],
    "sm80": [(16, 32, 4, 4, 4, 3), (16, 16, 4, 4, 4, 3)],
}
# the dequantization: (BLOCK_N rows, BLOCK_B bytes a row) a CTA, warps (memory-bound, elementwise)
DEQUANT_BLOCK = (32, 64, 4)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import bias_and_store, expand_rank, mma, tile_offsets


# ------------------------------------------------------------------------------------------------ kernels
if HAVE_TRITON:

    @triton.jit
    def _int4_linear_kernel(
        x_ptr, q_ptr, qs_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, ws_ptr,
        M, N, K, R, K_PER,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_xam, stride_xar,
        stride_bn, stride_br, stride_ym, stride_yn, stride_ws,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_M: tl.constexpr,
        RANK_BLOCK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_k = tl.program_id(1)  # the K range [pid_k K_PER, (pid_k + 1) K_PER) of a split K (else all of K)
        offs_m, offs_n, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        j = tl.arange(0, 16)
        # the integers q as dot operands: exact in the activation dtype (the interpreter's UPCAST: fp32, the same
        # values; numpy has no bf16)
        wdt = tl.float32 if UPCAST else x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        q_cols = q_ptr + offs_n[None, :] * stride_qn
        for k0 in range(pid_k * K_PER, tl.minimum(K, (pid_k + 1) * K_PER), GROUPS * 32):
            for gi in tl.static_range(GROUPS):
                kg = k0 + gi * 32  # the group's first weight; K is a multiple of 32: a group is in or out whole
                ok = (kg + j) < K  # (16,): all true or all false
                byt = tl.load(q_cols + (kg // 2 + j)[:, None] * stride_qk, mask=ok[:, None] & n_ok[None, :],
                              other=136)  # (16, BLOCK_N) uint8; 136 = 0x88: q = 0 in both nibbles
                lo = ((byt & 15).to(tl.int32) - 8).to(wdt)  # weights 32g + j
                hi = ((byt >> 4).to(tl.int32) - 8).to(wdt)  # weights 32g + 16 + j
                xl = tl.load(x_rows + (kg + j)[None, :] * stride_xk, mask=m_ok[:, None] & ok[None, :], other=0.0)
                xh = tl.load(x_rows + (kg + 16 + j)[None, :] * stride_xk, mask=m_ok[:, None] & ok[None, :],
                             other=0.0)
                part = mma(xl, lo, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE, UPCAST)
                part = mma(xh, hi, part, IEEE, UPCAST)  # (BLOCK_M, BLOCK_N): Σ over the group of x·q, fp32
                s = tl.load(qs_ptr + offs_n * stride_sn + (kg // 32) * stride_sg, mask=n_ok & ((kg + 0 * offs_n) < K),
                            other=0.0)
                acc += part * s.to(tl.float32)[None, :]
        if HAS_LORA:
            if pid_k == 0:  # (a split K: in the first range only)
                acc = expand_rank(xa_ptr, b_ptr, acc, offs_m, offs_n, tl.arange(0, RANK_BLOCK), m_ok, n_ok, R,
                                  stride_xam, stride_xar, stride_bn, stride_br, RANK_BLOCK, IEEE, UPCAST)
        bias_and_store(acc, bias_ptr, y_ptr, ws_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, N, stride_ym, stride_yn,
                       stride_ws, HAS_BIAS, SPLIT_K)

    @triton.jit
    def _rounded(v, BF16: tl.constexpr, wdt):
        """fp32 v in w's dtype, rounded to nearest even; bf16 by its bits (the interpreter's own fp32 -> bf16 cast
        truncates, the compiled one rounds to nearest even: this is both)."""
        if BF16:
            u = v.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            out = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = v.to(wdt)
        return out

    @triton.jit
    def _int4_dequant_kernel(q_ptr, qs_ptr, w_ptr, N, KB, stride_qn, stride_sn, stride_wn,
                             BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BF16: tl.constexpr):
        """w (N, 2 KB) = fl32(q · s) rounded once to w's dtype; a CTA takes BLOCK_N rows x BLOCK_B bytes."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # byte 16g + j of a row
        ok = (offs_n < N)[:, None] & (offs_b < KB)[None, :]
        byt = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_b[None, :], mask=ok, other=136)
        s = tl.load(qs_ptr + offs_n[:, None] * stride_sn + (offs_b // 16)[None, :], mask=ok, other=0.0)
        s = s.to(tl.float32)
        k_lo = (offs_b // 16) * 32 + offs_b % 16  # the low nibble's weight; the high one's is 16 further
        out = w_ptr + offs_n[:, None] * stride_wn + k_lo[None, :]
        wdt = w_ptr.dtype.element_ty
        tl.store(out, _rounded(((byt & 15).to(tl.int32) - 8).to(tl.float32) * s, BF16, wdt), mask=ok)
        tl.store(out + 16, _rounded(((byt >> 4).to(tl.int32) - 8).to(tl.float32) * s, BF16, wdt), mask=ok)


# ------------------------------------------------------------------------------------------------ launchers
def pick_config(m: int, n: int, arch: str):
    return first_covering(CONFIGS[arch], m, n, arch)


def _validate(x, q, qs, bias, lora_a, lora_b, scale):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"int4_linear: {msg}")

    for name, t in (("x", x), ("qweight", q), ("qscale", qs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int4_linear: {name} must be a tensor, got {type(t).__name__}")
    need(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype} is not fp32, fp16 or bf16")
    k = x.shape[-1]
    need(k % GROUP == 0, f"x's last dim {k} is not a multiple of the int4 group ({GROUP})")
    need(q.dtype == torch.uint8, f"qweight dtype {q.dtype} is not uint8 (packed int4)")
    need(q.dim() == 2 and q.shape[1] * 2 == k, f"qweight shape {tuple(q.shape)} does not pack x's last dim {k} "
                                               f"(want (N, {k // 2}))")
    need(q.stride(1) == 1, "qweight must be contiguous along K")
    n = q.shape[0]
    need(tuple(qs.shape) == (n, k // GROUP), f"qscale shape {tuple(qs.shape)} must be ({n}, {k // GROUP}), "
                                             f"one scale a group of {GROUP}")
    need(qs.dtype.is_floating_point, f"qscale dtype {qs.dtype} is not a float dtype")
    m = x.numel() // k
    check_bias_and_lora("int4_linear", x, m, n, k, bias, lora_a, lora_b, scale, MAX_RANK,
                        (("qweight", q), ("qscale", qs)))
    return m, n, k


def int4_linear_triton(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None,
                       out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """The fused launcher: validates, allocates (or fills `out`, (M, N) contiguous), picks a config, launches.
    Any M runs (the engine sends up to FUSED_MAX_M rows). `config` = (tile[, split]) overrides the table."""
    if not HAVE_TRITON:
        raise RuntimeError("int4_linear: triton is not installed")
    m, n, k = _validate(x, qweight, qscale, bias, lora_a, lora_b, scale)
    x2 = x.reshape(m, k)
    y = output_for("int4_linear", x, m, n, out)
    int4_linear_spec(x2, qweight, qscale, bias, lora_a, lora_b, scale, y, config, arch_key(x.device)).launch()
    return y.reshape(*x.shape[:-1], n)


def int4_linear_spec(x2, q, qs, bias, lora_a, lora_b, scale, y, config=None, arch: str = "sm90"):
    """The launch for x2 (M, K) -> y (M, N): what int4_linear_triton runs and compile_check compiles (tensors may
    be on the meta device). `config` = (tile[, split]); a grid short of the SMs splits K unless `split` is given."""
    m, k = x2.shape
    n = q.shape[0]
    (bm, bn, groups, gm, nw, ns), *forced = config or (pick_config(m, n, arch),)
    groups = max(1, min(groups, k // GROUP))  # a K of fewer groups than a step (tiny models): no dead groups
    step = groups * GROUP
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = forced[0] if forced else split_k(tiles, k, step, arch)
    has_lora = lora_a is not None
    xa = scaled_shrink(x2, lora_a, scale) if has_lora else x2  # (M, r); x2 is a dummy pointer without a LoRA
    b = lora_b if has_lora else x2
    ws = y.new_empty((split, m, n), dtype=torch.float32) if split > 1 else y  # y: a dummy pointer
    args = dict(x_ptr=x2, q_ptr=q, qs_ptr=qs, bias_ptr=bias if bias is not None else qs, xa_ptr=xa, b_ptr=b,
                y_ptr=y, ws_ptr=ws, M=m, N=n, K=k, R=lora_a.shape[0] if has_lora else 0,
                K_PER=triton.cdiv(triton.cdiv(k, step), split) * step,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_qn=q.stride(0), stride_qk=q.stride(1),
                stride_sn=qs.stride(0), stride_sg=qs.stride(1), stride_xam=xa.stride(0), stride_xar=xa.stride(1),
                stride_bn=b.stride(0), stride_br=b.stride(1), stride_ym=y.stride(0), stride_yn=y.stride(1),
                stride_ws=m * n)
    meta = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
                GROUPS=groups, GROUP_M=gm, RANK_BLOCK=RANK_BLOCK, IEEE=x2.dtype == torch.float32,
                UPCAST=upcast_dot(x2.dtype))
    return LaunchSpec(_int4_linear_kernel, (tiles, split), args, meta, nw, ns,
                      split_k_reduce(ws, y) if split > 1 else None)


def int4_dequant_triton(q: torch.Tensor, qs: torch.Tensor, dtype: torch.dtype,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K / 2) packed, (N, K / 32) scales -> the weight (N, K) in `dtype` (fp32, fp16 or bf16)."""
    if not HAVE_TRITON:
        raise RuntimeError("int4_dequant: triton is not installed")
    n, kb = q.shape
    if q.dtype != torch.uint8 or q.stride(1) != 1 or tuple(qs.shape) != (n, kb // 16) or kb % 16 or \
            not qs.dtype.is_floating_point or qs.device != q.device or \
            dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int4_dequant: want a packed uint8 (N, K / 2) weight contiguous along K, (N, K / 32) float "
                         f"scales on its device and a float dtype; got {q.dtype} {tuple(q.shape)}, {qs.dtype} "
                         f"{tuple(qs.shape)}, {dtype}")
    w = output_for("int4_dequant", torch.empty(0, device=q.device, dtype=dtype), n, 2 * kb, out)
    int4_dequant_spec(q, qs, w).launch()
    return w


def int4_dequant_spec(q, qs, w):
    n, kb = q.shape
    bn, bb, nw = DEQUANT_BLOCK
    args = dict(q_ptr=q, qs_ptr=qs, w_ptr=w, N=n, KB=kb, stride_qn=q.stride(0), stride_sn=qs.stride(0),
                stride_wn=w.stride(0))
    return LaunchSpec(_int4_dequant_kernel, (triton.cdiv(n, bn), triton.cdiv(kb, bb)), args,
                      dict(BLOCK_N=bn, BLOCK_B=bb, BF16=w.dtype == torch.bfloat16), nw, 2)


# ------------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("pllava::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None,
                    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                    scale: torch.Tensor | None) -> torch.Tensor:
    return int4_linear_triton(x, qweight, qscale, bias, lora_a, lora_b, scale)


@_int4_linear_op.register_fake
def _(x, qweight, qscale, bias, lora_a, lora_b, scale):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("pllava::int4_dequant", mutates_args=())
def _int4_dequant_op(q: torch.Tensor, qscale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return int4_dequant_triton(q, qscale, dtype)


@_int4_dequant_op.register_fake
def _(q, qscale, dtype):
    return q.new_empty(q.shape[0], q.shape[1] * 2, dtype=dtype)


def int4_linear(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None) -> torch.Tensor:
    """The fused Triton path as the custom op torch.ops.pllava.int4_linear (traceable by torch.compile / CUDA graphs).

    x (..., K); qweight (N, K / 2) uint8; qscale (N, K / 32); bias (N,) or None; lora_a (r, K), lora_b (N, r) and
    scale (0-dim or (M,)) together or all None -> (..., N) in x's dtype.
    """
    return torch.ops.pllava.int4_linear(x.contiguous(), qweight, qscale, bias, lora_a, lora_b, scale)


def int4_dequant(q, qscale, dtype: torch.dtype) -> torch.Tensor:
    """The weight fl32(q · s) (N, K) in `dtype` by the Triton kernel (the custom op torch.ops.pllava.int4_dequant)."""
    return torch.ops.pllava.int4_dequant(q, qscale, dtype)


# ------------------------------------------------------------------------------------------------ references
def int4_unpack_reference(q: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) packed -> (N, K) int8 in [-8, 7], by torch ops."""
    n = q.shape[0]
    g = q.reshape(n, -1, 16)
    return torch.cat([(g & 15).to(torch.int8) - 8, (g >> 4).to(torch.int8) - 8], dim=-1).reshape(n, -1)


def int4_linear_reference(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None) -> torch.Tensor:
    """Plain torch: the dequantized weight in fp32 (at least), then PEFT's order for the LoRA."""
    ct = torch.promote_types(x.dtype, torch.float32)
    n = qweight.shape[0]
    w = (int4_unpack_reference(qweight).to(ct).reshape(n, -1, GROUP) * qscale.to(ct)[..., None]).reshape(n, -1)
    y = F.linear(x.to(ct), w).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y + lora_delta(x, lora_a, lora_b, scale) if lora_a is not None else y
