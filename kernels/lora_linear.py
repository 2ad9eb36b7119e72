"""y = x·Wᵀ + b + s·((x·Aᵀ)·Bᵀ), the LoRA linear of PLLaVA's q_proj / v_proj, with s = alpha/r a device tensor.

Keeping the adapter unmerged and the scale in a tensor means changing alpha (PLLaVA's post-training knob:
4 for captions, ~20 for multiple choice) never recompiles, re-merges or syncs with the host. `scale` is 0-dim, or
(M,) for a batch of requests each with its own alpha.

One kernel, two modes chosen by M:
- decode (M <= 16, memory-bound): the shrink x·Aᵀ is fused into the main K loop; A (r x K, 1 MiB for 7B at r=128)
  is re-read by every N tile but from L2, so HBM traffic is W + A + B once: +6 % bytes over the merged linear.
- prefill (M ~ 2400, compute-bound): fusing the shrink would recompute it in every N tile (+r/BLOCK_N = +100 %
  FLOPs at r=128, BLOCK_N=128), so it runs once as one (M x K)·(K x r) GEMM (3 % of the FLOPs), scaled on the
  device, and the kernel runs the expand as r more steps of its K loop, then adds the bias.
Order of this file: constants -> kernel -> launcher -> custom-op registration -> merge utilities -> reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ constants
FUSE_SHRINK_MAX_M = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per arch, for decode and prefill shapes.
# Decode (M <= 16) is memory-bound: the shrink x·Aᵀ runs once (a (M, r) GEMV), then the kernel streams W and B
# with N tiles narrow enough that the grid covers every SM (N = 4096 at BLOCK_N 16: 256 CTAs on 132 SMs). The
# earlier design fused the shrink into every CTA ("fused", kept for comparison): each CTA re-read all of A
# (r x K: 1 MiB at 7B) and N = 4096 ran 64 CTAs.
CONFIGS = {
    "sm90": {"decode": [(16, 32, 64, 1, 4, 4), (16, 16, 64, 1, 4, 4)],
             "prefill": [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4)]},
    "sm80": {"decode": [(16, 32, 64, 1, 4, 3), (16, 16, 64, 1, 4, 3)],
             "prefill": [(128, 128, 32, 8, 8, 3), (64, 128, 32, 8, 4, 3)]},
}
MAX_RANK = 256

from ._common import (HAVE_TRITON, LaunchSpec, arch_key, output_for, pick_tile, split_k, split_k_reduce,
                      upcast_dot)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import bias_and_store, expand_rank, mma, tile_offsets


# ------------------------------------------------------------------------------------------------ kernel
if HAVE_TRITON:

    @triton.jit
    def _lora_linear_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, xa_ptr, s_ptr, y_ptr, ws_ptr,
        M, N, K, R, K_PER,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_xam, stride_xar, stride_ym, stride_yn, stride_ws,
        HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, FUSE_SHRINK: tl.constexpr, R_PAD: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_k = tl.program_id(1)  # the K range [pid_k K_PER, (pid_k + 1) K_PER) of a split K (else all of K)
        offs_m, offs_n, m_ok, n_ok = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(pid_k * K_PER, tl.minimum(K, (pid_k + 1) * K_PER), BLOCK_K):
            k_ok = (k0 + offs_k) < K
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wk = tl.load(w_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = mma(xk, wk, acc, IEEE, UPCAST)
            if FUSE_SHRINK:
                ak = tl.load(a_ptr + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                             mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                xa = mma(xk, ak, xa, IEEE, UPCAST)
        if FUSE_SHRINK:
            # the expand on the (BLOCK_M, r) shrink held in registers; s folded in before the rounding to the
            # activation dtype (PEFT rounds x·Aᵀ, then scales the expanded result: the same error class)
            if PER_ROW:
                s = tl.load(s_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            else:
                s = tl.load(s_ptr).to(tl.float32)
            xs = (xa * s).to(y_ptr.dtype.element_ty)
            bt = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # (R_PAD, BLOCK_N)
            acc = mma(xs, bt, acc, IEEE, UPCAST)
        elif pid_k == 0:  # the shrink ran once (xa_ptr); the expand on the same accumulator (a split K: first range)
            acc = expand_rank(xa_ptr, b_ptr, acc, offs_m, offs_n, offs_k, m_ok, n_ok, R, stride_xam, stride_xar,
                              stride_bn, stride_br, BLOCK_K, IEEE, UPCAST)
        bias_and_store(acc, bias_ptr, y_ptr, ws_ptr, offs_m, offs_n, m_ok, n_ok, pid_k, N, stride_ym, stride_yn,
                       stride_ws, HAS_BIAS, SPLIT_K)


# ------------------------------------------------------------------------------------------------ launcher
def pick_config(m: int, n: int, arch: str):
    return pick_tile(CONFIGS[arch], m, n, arch, FUSE_SHRINK_MAX_M)


def _validate(x, weight, bias, lora_a, lora_b, scale):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"lora_linear: {msg}")

    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("scale", scale)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a tensor, got {type(t).__name__}")
    need(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype} is not fp32, fp16 or bf16")
    k = x.shape[-1]
    need(weight.dim() == 2 and weight.shape[1] == k, f"weight shape {tuple(weight.shape)} does not take x's last dim {k}")
    n = weight.shape[0]
    need(lora_a.dim() == 2 and lora_a.shape[1] == k, f"lora_a shape {tuple(lora_a.shape)} must be (r, {k})")
    r = lora_a.shape[0]
    need(0 < r <= MAX_RANK, f"rank r={r} is outside 1..{MAX_RANK}")
    need(tuple(lora_b.shape) == (n, r), f"lora_b shape {tuple(lora_b.shape)} must be ({n}, {r})")
    if bias is not None:
        need(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,), f"bias must be ({n},), got "
             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    m = x.numel() // k
    need(scale.dim() == 0 or tuple(scale.shape) == (m,), f"scale must be 0-dim or ({m},) per row, got "
         f"{tuple(scale.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t is not None:
            need(t.dtype == x.dtype, f"{name} dtype {t.dtype} differs from x's {x.dtype}")
            need(t.device == x.device, f"{name} is on {t.device}, x is on {x.device}")
    need(scale.device == x.device, f"scale is on {scale.device}, x is on {x.device} (it must stay on the device: "
         "no host sync)")
    need(weight.stride(-1) == 1 or weight.stride(0) == 1, "weight must be contiguous along one dimension")
    return m, n, k, r


def lora_linear_triton(x, weight, bias, lora_a, lora_b, scale, out: torch.Tensor | None = None,
                       config=None) -> torch.Tensor:
    """The launcher: validates, allocates (or fills `out`, shape (M, N)), picks a config, launches.
    `config` = (mode, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)) overrides the table."""
    if not HAVE_TRITON:
        raise RuntimeError("lora_linear: triton is not installed")
    m, n, k, r = _validate(x, weight, bias, lora_a, lora_b, scale)
    x2 = x.reshape(m, k)
    y = output_for("lora_linear", x, m, n, out)
    lora_linear_spec(x2, weight, bias, lora_a, lora_b, scale, y, config, arch_key(x.device)).launch()
    return y.reshape(*x.shape[:-1], n)


def lora_linear_spec(x2, weight, bias, lora_a, lora_b, scale, y, config=None, arch: str = "sm90"):
    """The launch for x2 (M, K) -> y (M, N): what lora_linear_triton runs and compile_check compiles (tensors may
    be on the meta device). `config` = (mode, tile[, split]) with mode 'decode', 'prefill' or 'fused'; a decode
    grid short of the SMs splits K (_common.split_k) unless `split` is given."""
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]
    mode, (bm, bn, bk, gm, nw, ns), *forced = config or pick_config(m, n, arch)
    fuse = mode == "fused"
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = forced[0] if forced else (split_k(tiles, k, bk, arch) if mode == "decode" else 1)
    if fuse:
        if split != 1:
            raise ValueError("lora_linear: the fused design does not split K")
        xa = x2  # unused (a dummy pointer): the kernel computes the shrink in every CTA
    else:
        xa = scaled_shrink(x2, lora_a, scale)
    k_per = triton.cdiv(triton.cdiv(k, bk), split) * bk
    ws = y.new_empty((split, m, n), dtype=torch.float32) if split > 1 else y  # y: a dummy pointer
    args = dict(x_ptr=x2, w_ptr=weight, bias_ptr=bias if bias is not None else weight, a_ptr=lora_a, b_ptr=lora_b,
                xa_ptr=xa, s_ptr=scale, y_ptr=y, ws_ptr=ws, M=m, N=n, K=k, R=r, K_PER=k_per,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
                stride_br=lora_b.stride(1), stride_xam=xa.stride(0), stride_xar=xa.stride(1), stride_ym=y.stride(0),
                stride_yn=y.stride(1), stride_ws=m * n)
    meta = dict(HAS_BIAS=bias is not None, PER_ROW=scale.dim() == 1, FUSE_SHRINK=fuse,
                R_PAD=max(16, triton.next_power_of_2(r)), SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                GROUP_M=gm, IEEE=x2.dtype == torch.float32, UPCAST=upcast_dot(x2.dtype))
    return LaunchSpec(_lora_linear_kernel, (tiles, split), args, meta, nw, ns,
                      split_k_reduce(ws, y) if split > 1 else None)


def scaled_shrink(x2, lora_a, scale):
    """s·(x2·Aᵀ) (M, r) in x2's dtype: the LoRA shrink once per call, scaled on the device (no host sync); scale
    0-dim, or (M,) one per row."""
    sc = scale.float().reshape(-1, 1) if scale.dim() == 1 else scale.float()
    return (F.linear(x2, lora_a).float() * sc).to(x2.dtype)


# ------------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("pllava::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return lora_linear_triton(x, weight, bias, lora_a, lora_b, scale)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def lora_linear(x, weight, bias, lora_a, lora_b, scale) -> torch.Tensor:
    """The Triton path as the custom op torch.ops.pllava.lora_linear (traceable by torch.compile / CUDA graphs).

    x (..., K); weight (N, K); bias (N,) or None; lora_a (r, K); lora_b (N, r); scale 0-dim or (M,) -> (..., N).
    """
    return torch.ops.pllava.lora_linear(x.contiguous(), weight, bias, lora_a, lora_b, scale)


# ------------------------------------------------------------------------------------------------ merge utilities
@torch.no_grad()
def merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s·B·A (computed in at least fp32, returned in W's dtype): a fixed alpha at zero LoRA cost."""
    ct = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(ct) + float(scale) * (lora_b.to(ct) @ lora_a.to(ct))).to(weight.dtype)


@torch.no_grad()
def unmerge(merged: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Inverse of `merge`: to rounding in fp32/fp64; in bf16/fp16 within one rounding of the original weight."""
    ct = torch.promote_types(merged.dtype, torch.float32)
    return (merged.to(ct) - float(scale) * (lora_b.to(ct) @ lora_a.to(ct))).to(merged.dtype)


# ------------------------------------------------------------------------------------------------ torch reference
def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain torch, in PEFT's order: base(x) + lora_B(lora_A(x)) * scale."""
    return F.linear(x, weight, bias) + lora_delta(x, lora_a, lora_b, scale)


def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """lora_B(lora_A(x)) * scale; scale 0-dim, or (M,) per row: a batch of requests, each with its own alpha."""
    delta = F.linear(F.linear(x, lora_a), lora_b)
    s = scale.to(delta.dtype)
    if s.dim() == 1:
        s = s.reshape(*x.shape[:-1], 1)
    return delta * s
