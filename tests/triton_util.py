"""Whether this run can execute Triton kernels: triton installed, and a CUDA device or its CPU interpreter
(TRITON_INTERPRET=1, as the CI runs the suite). One rule for every kernel test module."""
import importlib.util
import os

import pytest
import torch

REASON = "needs triton with a CUDA device or TRITON_INTERPRET=1"


def triton_runs() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not triton_runs(), reason=REASON)


def skip_module_without_triton():
    """At a module's top: skip the whole module where Triton kernels cannot run."""
    if not triton_runs():
        pytest.skip(REASON, allow_module_level=True)


# Where a test runs the engine's Triton path: the GPU where there is one (no interpreter runs there, so Triton
# cannot take CPU tensors), else the CPU under the interpreter.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
