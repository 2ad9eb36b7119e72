"""Decode attention over a slot KV cache: one new token per row, each row in its own slot at its own length.

o[b, h] = softmax(q[b, h] · K[slot_b, h // G, lo_b:n_b]ᵀ / √d) · V[slot_b, h // G, lo_b:n_b], where n_b = pos_b + 1
(the row's token is already written at pos_b) and lo_b = max(0, n_b − window) for a sliding window (else 0).

Why a kernel: the torch path slices each row's used positions with host integers (B SDPA calls a layer), which
a CUDA graph cannot replay with new lengths; here slots and positions are device tensors, so one captured step
serves every length. Positions past a row's length, and other slots, are never loaded: stale or NaN contents of a
slot cannot leak into a later request. One program per (row, KV head) handles the G query heads that share it
(GQA), so K/V are read once per row; P·V accumulates in fp32: decode attention is memory-bound (PLLaVA-7B at 2350 positions: 2 x 32 x 2350
x 128 x 2 B = 38 MB per row per step, against 13.5 GB of weights shared by the whole batch).
Order: constants -> kernel -> launcher -> custom-op registration -> reference.
"""
from __future__ import annotations

import math

import torch

from ._common import HAVE_TRITON, upcast_dot

# ------------------------------------------------------------------------------------------------ constants
BLOCK_N = 64  # keys per iteration: 64 x 128 bf16 = 16 KiB of K (and of V) in flight per program
NUM_WARPS = 4
NUM_STAGES = 3  # 2 left 8 B of stack in the GQA fp16 build for sm_90 (compile_check); 1 and 3 none
LOG2E = 1.4426950408889634

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ._common import mma


# ------------------------------------------------------------------------------------------------ kernel
if HAVE_TRITON:

    @triton.jit
    def _slot_decode_kernel(
        q_ptr, k_ptr, v_ptr, slot_ptr, pos_ptr, o_ptr,
        qk_scale, WINDOW,
        stride_qb, stride_qh, stride_qd,
        stride_ks, stride_kh, stride_kn, stride_kd,
        stride_vs, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_od,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_g = tl.program_id(1)
        slot = tl.load(slot_ptr + pid_b).to(tl.int64)
        n = tl.load(pos_ptr + pid_b).to(tl.int32) + 1  # positions [0, n) hold this row's keys
        lo = 0
        if WINDOW > 0:
            lo = tl.maximum(n - WINDOW, 0)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        h_ok = offs_h < GROUP
        d_ok = offs_d < HEAD_DIM
        heads = pid_g * GROUP + offs_h
        q = tl.load(q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
        k_base = k_ptr + slot * stride_ks + pid_g * stride_kh
        v_base = v_ptr + slot * stride_vs + pid_g * stride_vh
        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
        for start in range(lo, n, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            if BLOCK_H == 1:  # one query head a KV head (MHA, PLLaVA-7B/13B): fp32 FMAs, no padded dot rows
                s = tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :] * qk_scale  # (1, BLOCK_N)
            else:  # GQA: the G heads of this KV head as the rows of one dot (exact products, fp32 accumulation)
                s = mma(q, tl.trans(k), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), IEEE, UPCAST) * qk_scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            # P stays fp32 (rounded to bf16, as prefill kernels do, it doubles the error against torch's)
            if BLOCK_H == 1:
                pv = tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]  # (1, BLOCK_D)
                acc = acc * alpha[:, None] + pv
            else:
                # tf32 for half-precision caches (V is exact in tf32, P keeps 10 bits against bf16's 7): an IEEE
                # fp32 dot of (16, 64) x (64, 128) spills 3.9 KB of stack on sm_80
                acc = mma(p, v.to(tl.float32), acc * alpha[:, None], IEEE, False)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + pid_b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------------------------------------ launcher
def block_sizes(group: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): 1 head a program without GQA (plain FMAs); with GQA the G heads of a KV head are the
    rows of a tl.dot, which needs >= 16 rows (PLLaVA-34B: 7 heads in 16 rows)."""
    bh = 1 if group == 1 else max(16, triton.next_power_of_2(group))
    return bh, max(16, triton.next_power_of_2(head_dim))


def _validate(q, kc, vc, slots, pos):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"slot_decode_attention: {msg}")

    need(q.dim() == 4 and q.shape[2] == 1, f"q must be (B, H, 1, hd), got {tuple(q.shape)}")
    need(kc.dim() == 4 and kc.shape == vc.shape, f"kc / vc must be equal (slots, KV, S, hd), got {tuple(kc.shape)} "
         f"and {tuple(vc.shape)}")
    b, h, _, d = q.shape
    need(kc.shape[3] == d, f"head_dim of the cache {kc.shape[3]} differs from q's {d}")
    need(h % kc.shape[1] == 0, f"{h} query heads are not a multiple of {kc.shape[1]} KV heads")
    need(tuple(slots.shape) == (b,) and tuple(pos.shape) == (b,), f"slots and pos must be ({b},), got "
         f"{tuple(slots.shape)} and {tuple(pos.shape)}")
    need(not slots.is_floating_point() and not pos.is_floating_point(), "slots and pos must be integer tensors")
    for name, t in (("kc", kc), ("vc", vc), ("slots", slots), ("pos", pos)):
        need(t.device == q.device, f"{name} is on {t.device}, q is on {q.device}")
    need(kc.dtype == q.dtype == vc.dtype, f"dtypes differ: q {q.dtype}, kc {kc.dtype}, vc {vc.dtype}")
    return b, h, d


def slot_decode_attention_triton(q, kc, vc, slots, pos, window: int | None = None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("slot_decode_attention: triton is not installed")
    b, h, d = _validate(q, kc, vc, slots, pos)
    n_kv = kc.shape[1]
    group = h // n_kv
    bh, bd = block_sizes(group, d)
    o = torch.empty_like(q)
    _slot_decode_kernel[(b, n_kv)](
        q, kc, vc, slots, pos, o,
        LOG2E / math.sqrt(d), int(window or 0),
        q.stride(0), q.stride(1), q.stride(3),
        kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3),
        vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3),
        o.stride(0), o.stride(1), o.stride(3),
        GROUP=group, HEAD_DIM=d, BLOCK_H=bh, BLOCK_D=bd, BLOCK_N=BLOCK_N, IEEE=q.dtype == torch.float32,
        UPCAST=upcast_dot(q.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return o


# ------------------------------------------------------------------------------------------------ registration
@torch.library.custom_op("pllava::slot_decode_attention", mutates_args=())
def _slot_decode_op(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                    window: int) -> torch.Tensor:
    return slot_decode_attention_triton(q, kc, vc, slots, pos, window)


@_slot_decode_op.register_fake
def _(q, kc, vc, slots, pos, window):
    return torch.empty_like(q)


def slot_decode_attention(q, kc, vc, slots, pos, window: int | None = None) -> torch.Tensor:
    """The Triton path as torch.ops.pllava.slot_decode_attention. q (B, H, 1, hd); kc / vc (slots, KV, S, hd);
    slots (B,) and pos (B,) integer device tensors (pos: where this step's token was written) -> (B, H, 1, hd)."""
    return torch.ops.pllava.slot_decode_attention(q, kc, vc, slots, pos, int(window or 0))


# ------------------------------------------------------------------------------------------------ reference
def slot_decode_attention_reference(q, kc, vc, slots, pos, window: int | None = None) -> torch.Tensor:
    """Plain torch: each row's keys gathered by index and attended densely (a host sync: not graph-safe)."""
    outs = []
    for b, (s, p) in enumerate(zip(slots.tolist(), pos.tolist())):
        lo = max(0, p + 1 - window) if window else 0
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1], kc[s:s + 1, :, lo:p + 1], vc[s:s + 1, :, lo:p + 1], enable_gqa=kc.shape[1] != q.shape[1]))
    return torch.cat(outs)
