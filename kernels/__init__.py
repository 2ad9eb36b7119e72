"""pllava.kernels: one op per file. Each module holds the Triton kernel(s), a launcher that validates its
arguments, a plain-torch reference (the tests' oracle and the CPU path) and a torch custom-op registration.

Triton is imported lazily: this package imports on machines without triton (macOS, CPU-only CI images).
"""
import sys

if __name__ == "kernels":
    # Imported as the top-level `kernels`, not as pllava.kernels: Python runs from the repository root (python -m
    # and -c put the current directory first on sys.path) and something asked for HF's `kernels` package, which
    # transformers >= 5.25 requires and imports whenever it builds a model config. Without this hand-over every
    # Engine.from_pretrained run from the root failed with "cannot import name 'CUDAProperties' from 'kernels'".
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        # HF's kernels is not installed, so the name must read as absent. Raising ModuleNotFoundError here broke
        # transformers < 5.25 (5.17 is the lent GPU machine's): its availability probe finds this folder, finds no
        # metadata, imports it and lets the error through, so no Llama config could be built from the root. None
        # in sys.modules is Python's own mark of a missing module: this first import returns None (which 5.17's
        # probe reads as "no version, no file: not installed"), every later `import kernels` raises
        # ModuleNotFoundError, and importlib.util.find_spec("kernels") returns None.
        sys.modules["kernels"] = None
    else:
        _real = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _real  # what `import kernels` returns once this body ends
        try:
            _spec.loader.exec_module(_real)
        except BaseException:
            del sys.modules["kernels"]
            raise
else:
    from .int4_linear import int4_dequant, int4_linear, int4_linear_reference
    from .int8_linear import int8_linear, int8_linear_reference
    from .lora_linear import lora_linear, lora_linear_reference, merge, unmerge
    from .pool_projector import pool_projector, pool_projector_reference, pool_projector_torch
    from .slot_attention import slot_decode_attention, slot_decode_attention_reference

__all__ = ["int4_dequant", "int4_linear", "int4_linear_reference", "int8_linear", "int8_linear_reference",
           "lora_linear", "lora_linear_reference", "merge", "unmerge", "pool_projector", "pool_projector_reference",
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
