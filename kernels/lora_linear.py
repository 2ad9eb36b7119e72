"""y = x·Wᵀ + b + s·((x·Aᵀ)·Bᵀ), the LoRA linear of PLLaVA's q_proj / v_proj, with s = alpha/r a device tensor.

Keeping the adapter unmerged and the scale in a tensor means changing alpha (PLLaVA's post-training knob:
4 for captions, ~20 for multiple choice) never recompiles, re-merges or syncs with the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                          lora_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain torch, in PEFT's order: base(x) + lora_B(lora_A(x)) * scale.

    x (..., K); weight (N, K); lora_a (r, K); lora_b (N, r); scale: 0-dim, or (M,) one per row of x.
    """
    y = F.linear(x, weight, bias)
    delta = F.linear(F.linear(x, lora_a), lora_b)
    s = scale.to(delta.dtype)
    if s.dim() == 1:  # (M,) per-row scales: a batch of requests, each with its own alpha
        s = s.reshape(*x.shape[:-1], 1)
    return y + delta * s


def lora_linear(x, weight, bias, lora_a, lora_b, scale):
    """Public entry point; the Triton path is added by the kernels issue, the torch path is the reference."""
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)
