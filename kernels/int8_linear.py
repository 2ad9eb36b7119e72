"""y = x·(q·s)ᵀ + b + s_lora·((x·Aᵀ)·Bᵀ): the weight-only int8 linear of quantize="int8" on CUDA, LoRA fused.

q is the (N, K) int8 weight and s its per-output-row scale (symmetric, per channel: engine/model/quant.py). The
per-row scale factors out of the K sum, y_n = s_n · Σ_k x_k q_nk, so the kernel streams int8 tiles, widens them to
the activation dtype in registers (int8 values are exact in bf16/fp16/fp32), accumulates in fp32 and applies s
once to the fp32 accumulator: one rounding to the output dtype, as the dequantized-weight product in fp32 would.

Decode (M <= 16) is memory-bound: the weight bytes halve against bf16 (7B: 13.0 -> 6.5 GB a token plus the LoRA's
0.1 GB), ~1.8-1.9x tokens/s on paper. The LoRA stays unmerged at the live alpha: its shrink x·Aᵀ runs once per
call (a (M, r) GEMV, scaled on the device: lora_linear.scaled_shrink), and the kernel runs the expand as r more
steps of its K loop on the same accumulator (after the int8 part is scaled), then adds the bias. Linears without a
LoRA (k/o_proj, the MLP) skip that loop (HAS_LORA). A decode grid short of the SMs (PLLaVA-34B's v_proj: N = 1024,
64 tiles) splits K into ranges whose fp32 partials the launcher adds in a fixed order (_common.split_k).
Order of this file: constants -> kernel -> launcher -> custom-op registration -> reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (HAVE_TRITON, LaunchSpec, arch_key, check_bias_and_lora, output_for, pick_tile, split_k,
                      split_k_reduce, upcast_dot)
from .lora_linear import CONFIGS as LORA_CONFIGS, FUSE_SHRINK_MAX_M, MAX_RANK, lora_delta, scaled_shrink

# ------------------------------------------------------------------------------------------------ constants
DECODE_MAX_M = FUSE_SHRINK_MAX_M  # decode tiles up to 16 rows, as the tables it derives from
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages), derived from lora_linear's tables: decode tiles
# twice as wide in K (128 int8 bytes a row, the bytes its 64-wide bf16 tiles move; N tiles narrow enough to cover
# every SM: N = 4096 at 16 is 256 CTAs on 132), prefill its tiles as they are (the int8 tile is half their shared
# memory).
CONFIGS = {arch: {"decode": [(bm, bn, 2 * bk, gm, nw, ns) for bm, bn, bk, gm, nw, ns in modes["decode"]],
                  "prefill": list(modes["prefill"])}
           for arch, modes in LORA_CONFIGS.items()}

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import bias_and_store, expand_rank, mma, tile_offsets


# ------------------------------------------------------------------------------------------------ kernel
if HAVE_TRITON:

    @triton.jit
    def _int8_linear_kernel(
        x_ptr, q_ptr, qs_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr, ws_ptr,
        M, N, K, R, K_PER,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_xam, stride_xar, stride_bn, stride_br,
        stride_ym, stride_yn, stride_ws,
        HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_k = tl.program_id(1)  # the K range [pid_k K_PER, (pid_k + 1) K_PER) of a split K (else all of K)
        offs_m, offs_n, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        act = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * K_PER, tl.minimum(K, (pid_k + 1) * K_PER), BLOCK_K):
            k_ok = (k0 + offs_k) < K
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            qk = tl.load(q_ptr + offs_n[None, :] * stride_qn + (k0 + offs_k)[:, None] * stride_qk,
                         mask=k_ok[:, None] & n_ok[None, :], other=0)  # (BLOCK_K, BLOCK_N) int8
            # widened to the activation dtype (exact); the interpreter (UPCAST) goes straight to fp32, the same
            # values: numpy has no bf16 to convert to
            acc = mma(xk, qk.to(tl.float32 if UPCAST else act), acc, IEEE, UPCAST)
        acc = acc * tl.load(qs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            if pid_k == 0:  # (a split K: in the first range only)
                acc = expand_rank(xa_ptr, b_ptr, acc, offs_m, offs_n, offs_k, m_ok, n_ok, R, stride_xam,
                                  stride_xar, stride_bn, stride_br, BLOCK_K, IEEE, UPCAST)
        bias_and_store(acc, bias_ptr, y_ptr, ws_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, N, stride_ym, stride_yn,
                       stride_ws, HAS_BIAS, SPLIT_K)


# ------------------------------------------------------------------------------------------------ launcher
def pick_config(m: int, n: int, arch: str):
    return pick_tile(CONFIGS[arch], m, n, arch, DECODE_MAX_M)


def _validate(x, q, qs, bias, lora_a, lora_b, scale):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"int8_linear: {msg}")

    for name, t in (("x", x), ("qweight", q), ("qscale", qs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"int8_linear: {name} must be a tensor, got {type(t).__name__}")
    need(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype} is not fp32, fp16 or bf16")
    k = x.shape[-1]
    need(q.dtype == torch.int8, f"qweight dtype {q.dtype} is not int8")
    need(q.dim() == 2 and q.shape[1] == k, f"qweight shape {tuple(q.shape)} does not take x's last dim {k}")
    n = q.shape[0]
    need(tuple(qs.shape) == (n,), f"qscale shape {tuple(qs.shape)} must be ({n},), one scale a row")
    need(qs.dtype.is_floating_point, f"qscale dtype {qs.dtype} is not a float dtype")
    m = x.numel() // k
    check_bias_and_lora("int8_linear", x, m, n, k, bias, lora_a, lora_b, scale, MAX_RANK,
                        (("qweight", q), ("qscale", qs)))
    need(q.stride(-1) == 1 or q.stride(0) == 1, "qweight must be contiguous along one dimension")
    return m, n, k


def int8_linear_triton(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None,
                       out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """The launcher: validates, allocates (or fills `out`, (M, N) contiguous), picks a config, launches.
    `config` = (mode, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)) overrides the table."""
    if not HAVE_TRITON:
        raise RuntimeError("int8_linear: triton is not installed")
    m, n, k = _validate(x, qweight, qscale, bias, lora_a, lora_b, scale)
    x2 = x.reshape(m, k)
    y = output_for("int8_linear", x, m, n, out)
    int8_linear_spec(x2, qweight, qscale, bias, lora_a, lora_b, scale, y, config, arch_key(x.device)).launch()
    return y.reshape(*x.shape[:-1], n)


def int8_linear_spec(x2, q, qs, bias, lora_a, lora_b, scale, y, config=None, arch: str = "sm90"):
    """The launch for x2 (M, K) -> y (M, N): what int8_linear_triton runs and compile_check compiles (tensors may
    be on the meta device). `config` = (mode, tile[, split]); a decode grid short of the SMs splits K
    (_common.split_k) unless `split` is given."""
    m, k = x2.shape
    n = q.shape[0]
    mode, (bm, bn, bk, gm, nw, ns), *forced = config or pick_config(m, n, arch)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = forced[0] if forced else (split_k(tiles, k, bk, arch) if mode == "decode" else 1)
    has_lora = lora_a is not None
    xa = scaled_shrink(x2, lora_a, scale) if has_lora else x2  # (M, r); x2 is a dummy pointer without a LoRA
    b = lora_b if has_lora else q
    ws = y.new_empty((split, m, n), dtype=torch.float32) if split > 1 else y  # y: a dummy pointer
    args = dict(x_ptr=x2, q_ptr=q, qs_ptr=qs, bias_ptr=bias if bias is not None else qs, xa_ptr=xa, b_ptr=b,
                y_ptr=y, ws_ptr=ws, M=m, N=n, K=k, R=lora_a.shape[0] if has_lora else 0,
                K_PER=triton.cdiv(triton.cdiv(k, bk), split) * bk,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_qn=q.stride(0), stride_qk=q.stride(1),
                stride_xam=xa.stride(0), stride_xar=xa.stride(1), stride_bn=b.stride(0), stride_br=b.stride(1),
                stride_ym=y.stride(0), stride_yn=y.stride(1), stride_ws=m * n)
    meta = dict(HAS_BIAS=bias is not None, HAS_LORA=has_lora, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                GROUP_M=gm, IEEE=x2.dtype == torch.float32, UPCAST=upcast_dot(x2.dtype))
    return LaunchSpec(_int8_linear_kernel, (tiles, split), args, meta, nw, ns,
                      split_k_reduce(ws, y) if split > 1 else None)


# ------------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("pllava::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, bias: torch.Tensor | None,
                    lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                    scale: torch.Tensor | None) -> torch.Tensor:
    return int8_linear_triton(x, qweight, qscale, bias, lora_a, lora_b, scale)


@_int8_linear_op.register_fake
def _(x, qweight, qscale, bias, lora_a, lora_b, scale):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def int8_linear(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None) -> torch.Tensor:
    """The Triton path as the custom op torch.ops.pllava.int8_linear (traceable by torch.compile / CUDA graphs).

    x (..., K); qweight (N, K) int8; qscale (N,); bias (N,) or None; lora_a (r, K), lora_b (N, r) and scale (0-dim
    or (M,)) together or all None -> (..., N) in x's dtype.
    """
    return torch.ops.pllava.int8_linear(x.contiguous(), qweight, qscale, bias, lora_a, lora_b, scale)


# ------------------------------------------------------------------------------------------------ torch reference
def int8_linear_reference(x, qweight, qscale, bias=None, lora_a=None, lora_b=None, scale=None) -> torch.Tensor:
    """Plain torch: the dequantized weight in fp32 (at least), then PEFT's order for the LoRA."""
    ct = torch.promote_types(x.dtype, torch.float32)
    y = F.linear(x.to(ct), qweight.to(ct) * qscale.to(ct)[:, None]).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y + lora_delta(x, lora_a, lora_b, scale) if lora_a is not None else y
