"""Pieces shared by the kernels: the tl.dot dispatch on precision, and the interpreter's bf16 workaround."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs (macOS, no triton wheel): the torch paths serve
    HAVE_TRITON = False


def upcast_dot(dtype) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) mis-multiplies bf16 tl.dot operands (numpy has no bf16); there the
    kernels upcast them to fp32, which holds every bf16 value exactly. Compiled kernels never take this branch."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def arch_key(device: torch.device | None) -> str:
    """Which config table: 'sm90' (H100/H200 and newer) or 'sm80' (A100 and older); sm90 when there is no GPU."""
    if device is not None and device.type == "cuda":
        return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"
    return "sm90"


if HAVE_TRITON:

    @triton.jit
    def mma(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a·b with fp32 accumulation: exact fp32 products for fp32 inputs (IEEE; torch does not use TF32
        for matmuls by default either), tensor cores for fp16/bf16."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            out = tl.dot(a, b, acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out
