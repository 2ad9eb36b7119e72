"""PLLaVA's projector with its adaptive pooling: AdaptiveAvgPool3d(linear_2(GELU(linear_1(x)))), frame-major.

Average pooling is linear and each window's weights sum to 1, so it commutes with linear_2 and its bias:
pooling H = GELU(x·W1ᵀ + b1) first and running linear_2 on the pooled rows only is the same math with 4x fewer
linear_2 FLOPs for 24x24 -> 12x12 (PLLaVA-7B: 309 -> 77 GFLOP) and no (T·576, 4096) intermediate (75 MB bf16).

The Triton kernel computes the first GEMM row-gathered by pooling window: a program owns BLOCK_P pooled rows and
walks their windows WCH slots at a time, so each tile of H lives only in registers, is GELU'd, weighted and summed
into the pooled rows, and is never written. Windows follow torch's definition, start = floor(i·in/out),
end = ceil((i+1)·in/out); where they overlap (24 -> 7) the shared H rows are recomputed (about 1.3x per dimension)
rather than shared through memory. linear_2 then runs on the pooled rows with cuBLAS (F.linear).

Order of this file: constants -> kernel -> launcher -> custom-op registration -> torch reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ constants
# (BLOCK_P, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_P·WCH is the GEMM's M tile (WCH = window slots per
# chunk, 4 for 2x2 windows), so BLOCK_P=32 gives a 128-row tile for PLLaVA's 24x24 -> 12x12.
CONFIGS = {
    "sm90": [(32, 128, 64, 8, 3), (16, 128, 64, 4, 3), (16, 64, 64, 4, 4)],
    "sm80": [(32, 128, 32, 8, 3), (16, 64, 64, 4, 3), (32, 64, 32, 4, 4)],
}
MAX_WCH = 16  # window slots per chunk; larger windows (global pooling) loop over chunks


def _quick_gelu(t):
    """CLIP's x·σ(1.702x). Without autograd, one temporary instead of three, by the same ops in the same order (the
    bits are equal): each is the size of a CPU vision layer's fc1 output, 19 MB for 4 frames of ViT-L in bf16, and
    written while fresh (16 frames, 6 ViT-L layers, 2 Zen 5 cores, median of 5 interleaved: 3.17 -> 2.96 s)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return t * torch.sigmoid(1.702 * t)
    return t.mul(1.702).sigmoid_().mul_(t)


_ACTS = {
    "gelu": lambda t: F.gelu(t),  # erf, as transformers' "gelu"
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "relu": F.relu,
}

from ._common import HAVE_TRITON, SMS, LaunchSpec, arch_key, upcast_dot

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import mma


# ------------------------------------------------------------------------------------------------ kernel
if HAVE_TRITON:

    @triton.jit
    def _pool_gelu_kernel(
        x_ptr, w1_ptr, b1_ptr, out_ptr,
        P, K, N,
        T, H, W, TO, HO, WO,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        WH: tl.constexpr, WW: tl.constexpr, WTOT: tl.constexpr, WCH: tl.constexpr, NCH: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_p = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # pooled rows (t', i', j'), frame-major
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        p_ok = offs_p < P
        n_ok = offs_n < N
        wo = offs_p % WO
        ho = (offs_p // WO) % HO
        to = offs_p // (WO * HO)
        # torch's adaptive windows: [floor(i*in/out), ceil((i+1)*in/out))
        ts = (to * T) // TO
        te = ((to + 1) * T + TO - 1) // TO
        hs = (ho * H) // HO
        he = ((ho + 1) * H + HO - 1) // HO
        ws = (wo * W) // WO
        we = ((wo + 1) * W + WO - 1) // WO
        count = ((te - ts) * (he - hs) * (we - ws)).to(tl.float32)
        b1 = tl.load(b1_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        pooled = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for ch in range(NCH):  # a loop, not unrolled: 4 unrolled chunks of 16 window slots spilled (6x6 pooling at 64 frames)
            slot = ch * WCH + tl.arange(0, WCH)  # window slots (dt, di, dj) of this chunk
            st = slot // (WH * WW)
            sh = (slot // WW) % WH
            sw = slot % WW
            rt = ts[:, None] + st[None, :]  # (BLOCK_P, WCH)
            rh = hs[:, None] + sh[None, :]
            rw = ws[:, None] + sw[None, :]
            ok = (rt < te[:, None]) & (rh < he[:, None]) & (rw < we[:, None]) & p_ok[:, None] & (slot < WTOT)[None, :]
            rows = tl.reshape((rt * H + rh) * W + rw, (BLOCK_P * WCH,))
            rows_ok = tl.reshape(ok, (BLOCK_P * WCH,))
            rows = tl.where(rows_ok, rows, 0)
            acc = tl.zeros((BLOCK_P * WCH, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + offs_k) < K
                a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                            mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w1_ptr + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = mma(a, b, acc, IEEE, UPCAST)
            h = acc + b1[None, :]
            h = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))  # exact GELU (erf)
            h = tl.where(rows_ok[:, None], h, 0.0)
            pooled += tl.sum(tl.reshape(h, (BLOCK_P, WCH, BLOCK_N)), axis=1)
        pooled = pooled / count[:, None]
        tl.store(out_ptr + offs_p[:, None] * stride_om + offs_n[None, :] * stride_on,
                 pooled.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------------------ launcher
def window_sizes(n_in: int, n_out: int) -> int:
    """The largest adaptive window along one dimension."""
    return max(((i + 1) * n_in + n_out - 1) // n_out - (i * n_in) // n_out for i in range(n_out))


M_TILE = 128  # rows of the GEMM tile the table is sized for: BLOCK_P x WCH (32 x 4 for PLLaVA's 2x2 windows)


def fit_window(cfg, wch: int):
    """The config with BLOCK_P cut so the GEMM's M tile (BLOCK_P x WCH window slots) stays at M_TILE rows: a
    table sized for 2x2 windows would otherwise take 4x the shared memory at 64 frames -> (16, 12, 12), whose
    windows are 4x2x2 (BLOCK_P 32 x 16 slots: 240 KB on sm_90, over the 227 KB limit)."""
    bp, bn, bk, nw, ns = cfg
    bp = max(1, min(bp, M_TILE // wch))
    while bp * wch < 16:  # tl.dot needs 16 rows
        bp *= 2
    return bp, bn, bk, nw, ns


def pick_config(p_rows: int, n: int, arch: str, wch: int = 4):
    """First config in the arch's table (fitted to the pooling window) whose tiles fill the GPU (>= 2 waves), else
    the smallest."""
    for cfg in CONFIGS[arch]:
        c = fit_window(cfg, wch)
        if math.ceil(p_rows / c[0]) * math.ceil(n / c[1]) >= 2 * SMS[arch]:
            return c
    return fit_window(CONFIGS[arch][-1], wch)


def kernel_meta(frame_shape, pooling_shape, t: int):
    """Window constants for a (T, h, w) -> (T', h', w') pooling."""
    wt = window_sizes(t, pooling_shape[0])
    wh = window_sizes(frame_shape[0], pooling_shape[1])
    ww = window_sizes(frame_shape[1], pooling_shape[2])
    wtot = wt * wh * ww
    wch = min(triton.next_power_of_2(wtot), MAX_WCH) if HAVE_TRITON else 1
    return dict(WH=wh, WW=ww, WTOT=wtot, WCH=wch, NCH=math.ceil(wtot / wch))


def _check(name, t, dims, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pool_projector: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"pool_projector: {name} must have {dims} dims, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"pool_projector: {name} has dtype {t.dtype}, expected {dtype} (the dtype of x)")
    if device is not None and t.device != device:
        raise ValueError(f"pool_projector: {name} is on {t.device}, x is on {device}")


def pool_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, frame_shape, pooling_shape,
              out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """Pooled GELU(x·W1ᵀ + b1): x (T, h·w, c) -> (T'·h'·w', d) in x.dtype, through the Triton kernel.

    `out` (optional) receives the result; `config` (BLOCK_P, BLOCK_N, BLOCK_K, warps, stages) overrides the table.
    """
    if not HAVE_TRITON:
        raise RuntimeError("pool_projector: triton is not installed")
    _check("x", x, 3)
    _check("w1", w1, 2, x.dtype, x.device)
    _check("b1", b1, 1, x.dtype, x.device)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"pool_projector: x dtype {x.dtype} is not float32, float16 or bfloat16")
    t, hw, c = x.shape
    fh, fw = (int(v) for v in frame_shape)
    pt, ph, pw = (int(v) for v in pooling_shape)
    if fh * fw != hw:
        raise ValueError(f"pool_projector: frame_shape {fh}x{fw} = {fh * fw} patches but x has {hw} per frame")
    if min(pt, ph, pw) <= 0:
        raise ValueError(f"pool_projector: pooling_shape {tuple(pooling_shape)} must be positive")
    if w1.shape[1] != c or b1.shape[0] != w1.shape[0]:
        raise ValueError(f"pool_projector: w1 {tuple(w1.shape)} / b1 {tuple(b1.shape)} do not fit x {tuple(x.shape)}")
    d = w1.shape[0]
    p_rows = pt * ph * pw
    x2 = x.reshape(t * hw, c)
    if out is None:
        out = torch.empty(p_rows, d, device=x.device, dtype=x.dtype)
    elif out.shape != (p_rows, d) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"pool_projector: out must be a contiguous ({p_rows}, {d}) {x.dtype} tensor on {x.device}")
    pool_gelu_spec(x2, w1, b1, out, t, (fh, fw), (pt, ph, pw), config, arch_key(x.device)).launch()
    return out


def pool_gelu_spec(x2, w1, b1, out, t: int, frame_shape, pooling_shape, config=None, arch: str = "sm90"):
    """The launch of pool_gelu for x2 (T*h*w, c) -> out (T'*h'*w', d): what pool_gelu runs and compile_check
    compiles (tensors may be on the meta device)."""
    (fh, fw), (pt, ph, pw) = frame_shape, pooling_shape
    p_rows, c, d = out.shape[0], x2.shape[1], w1.shape[0]
    meta = kernel_meta((fh, fw), (pt, ph, pw), t)
    bp, bn, bk, nw, ns = config or pick_config(p_rows, d, arch, meta["WCH"])
    args = dict(x_ptr=x2, w1_ptr=w1, b1_ptr=b1, out_ptr=out, P=p_rows, K=c, N=d, T=t, H=fh, W=fw, TO=pt, HO=ph, WO=pw,
                stride_xm=x2.stride(0), stride_xk=x2.stride(1), stride_wn=w1.stride(0), stride_wk=w1.stride(1),
                stride_om=out.stride(0), stride_on=out.stride(1))
    meta.update(BLOCK_P=bp, BLOCK_N=bn, BLOCK_K=bk, IEEE=x2.dtype == torch.float32, UPCAST=upcast_dot(x2.dtype))
    return LaunchSpec(_pool_gelu_kernel, (triton.cdiv(p_rows, bp), triton.cdiv(d, bn)), args, meta, nw, ns)


# ------------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("pllava::pool_gelu", mutates_args=())
def _pool_gelu_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, fh: int, fw: int, pt: int, ph: int,
                  pw: int) -> torch.Tensor:
    return pool_gelu(x, w1, b1, (fh, fw), (pt, ph, pw))


@_pool_gelu_op.register_fake
def _(x, w1, b1, fh, fw, pt, ph, pw):
    return x.new_empty(pt * ph * pw, w1.shape[0])


def pool_projector(x, w1, b1, w2, b2, frame_shape, pooling_shape) -> torch.Tensor:
    """Fused path: pooled GELU(linear_1) in Triton (a torch custom op), then linear_2 on the pooled rows.

    x (T, h·w, c); w1 (d, c); b1 (d,); w2 (d, d); b2 (d,) -> (T'·h'·w', d), frame-major.
    """
    fh, fw = (int(v) for v in frame_shape)
    pt, ph, pw = (int(v) for v in pooling_shape)
    pooled = torch.ops.pllava.pool_gelu(x.contiguous(), w1, b1, fh, fw, pt, ph, pw)  # (T'h'w', d)
    return F.linear(pooled, w2, b2)


# ------------------------------------------------------------------------------------------------ torch reference
def _pool(h: torch.Tensor, frame_shape, pooling_shape) -> torch.Tensor:
    t, d = h.shape[0], h.shape[-1]
    fh, fw = frame_shape
    v = h.reshape(t, fh, fw, d).permute(3, 0, 1, 2).unsqueeze(0)  # (1, d, T, h, w)
    v = F.adaptive_avg_pool3d(v, tuple(pooling_shape))  # (1, d, T', h', w')
    return v.squeeze(0).permute(1, 2, 3, 0).reshape(-1, d)  # (T'·h'·w', d), frame-major


def pool_projector_reference(x, w1, b1, w2, b2, frame_shape, pooling_shape, act: str = "gelu") -> torch.Tensor:
    """The literal order of PLLaVA's PllavaMultiModalProjector: linear_1 -> act -> linear_2 -> pool."""
    h = _ACTS[act](F.linear(x, w1, b1))  # (T, h·w, d)
    h = F.linear(h, w2, b2)  # (T, h·w, d)
    return _pool(h, frame_shape, pooling_shape)


def pool_projector_torch(x, w1, b1, w2, b2, frame_shape, pooling_shape, act: str = "gelu") -> torch.Tensor:
    """The commuted order in plain torch (the CPU path): pool after the activation, linear_2 on pooled rows."""
    h = _ACTS[act](F.linear(x, w1, b1))  # (T, h·w, d)
    return F.linear(_pool(h, frame_shape, pooling_shape), w2, b2)  # (T'·h'·w', d)
