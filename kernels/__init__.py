"""pllava.kernels: one op per file. Each module holds the Triton kernel(s), a launcher that validates its
arguments, a plain-torch reference (the tests' oracle and the CPU path) and a torch custom-op registration.

Triton is imported lazily: this package imports on machines without triton (macOS, CPU-only CI images).
"""
from .int8_linear import int8_linear, int8_linear_reference
from .lora_linear import lora_linear, lora_linear_reference, merge, unmerge
from .pool_projector import pool_projector, pool_projector_reference, pool_projector_torch
from .slot_attention import slot_decode_attention, slot_decode_attention_reference

__all__ = ["int8_linear", "int8_linear_reference", "lora_linear", "lora_linear_reference", "merge", "unmerge", "pool_projector", "pool_projector_reference",
           "pool_projector_torch", "slot_decode_attention", "slot_decode_attention_reference", "triton_available"]


def triton_available() -> bool:
    """True when triton imports and can launch here (a CUDA device, or TRITON_INTERPRET=1 on the CPU)."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
