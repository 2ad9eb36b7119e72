"""The layer functions model code calls. They pick the Triton kernels (pllava.kernels) or the plain-torch path;
model code never imports triton itself.

`PLLAVA_KERNELS=torch|triton` forces a path; unset, Triton runs on CUDA tensors when it imports, torch elsewhere.
A forced path that cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import logging
import os

import torch

from pllava import kernels as K

log = logging.getLogger("pllava")
_VALID = ("torch", "triton")


def kernel_path(device: torch.device | str) -> str:
    """Which path runs for tensors on `device`: 'triton' or 'torch'."""
    forced = os.environ.get("PLLAVA_KERNELS", "").strip().lower()
    if forced and forced not in _VALID:
        raise ValueError(f"PLLAVA_KERNELS={forced!r}: expected one of {_VALID}")
    dev = torch.device(device)
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not K.triton_available():
            raise RuntimeError("PLLAVA_KERNELS=triton but triton cannot run here "
                               "(not installed, or no CUDA device and TRITON_INTERPRET is not 1)")
        return "triton"
    return "triton" if dev.type == "cuda" and K.triton_available() else "torch"


def log_kernel_path(device) -> str:
    path = kernel_path(device)
    log.info("pllava kernels: %s path for the pool-projector and LoRA linears on %s", path, torch.device(device))
    return path


def lora_linear(x, weight, bias, lora_a, lora_b, scale, path: str = "torch"):
    if path == "triton":
        return K.lora_linear(x, weight, bias, lora_a, lora_b, scale)
    return K.lora_linear_reference(x, weight, bias, lora_a, lora_b, scale)


def pool_projector(x, w1, b1, w2, b2, frame_shape, pooling_shape, act="gelu", path: str = "torch"):
    if path == "triton" and act == "gelu":
        return K.pool_projector(x, w1, b1, w2, b2, frame_shape, pooling_shape)
    return K.pool_projector_torch(x, w1, b1, w2, b2, frame_shape, pooling_shape, act)
